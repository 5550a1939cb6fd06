//! `binllm export`: the sign model rewritten for deployment. Stage-1 input scales fold into
//! neighbouring weights wherever that computes the same function ([`fold_input_scales`]),
//! vectors and dense tensors are stored in f16, and the LM head in f16, q8_0 or q4_0
//! ([`HeadFormat`]).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use half::f16;
use serde::{Deserialize, Serialize};

use super::blocks::{QuantTensor, QuantTensors};
use super::container::{PackedModel, Precision};
use crate::names::{self, BlockLinear};
use crate::tensor::{HostTensor, TensorData};
use binllm_kernels::{Q4Matrix, Q8Matrix};

/// How `binllm export` stores the LM head (and with a tied head, the embedding it shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum HeadFormat {
    #[cfg_attr(feature = "clap", value(help = "16 bits per weight"))]
    F16,
    /// q8_0 ([`Q8Matrix`]): 8.5 bits per weight.
    #[cfg_attr(
        feature = "clap",
        value(alias = "q8_0", help = "q8_0, 8.5 bits per weight")
    )]
    Q8,
    /// q4_0 ([`Q4Matrix`], format version 3): 4.5 bits per weight.
    #[cfg_attr(
        feature = "clap",
        value(alias = "q4_0", help = "q4_0, 4.5 bits per weight (format version 3)")
    )]
    Q4,
}

impl HeadFormat {
    /// The format's own name: `f16`, `q8_0` or `q4_0`.
    pub fn label(self) -> &'static str {
        match self {
            HeadFormat::F16 => "f16",
            HeadFormat::Q8 => "q8_0",
            HeadFormat::Q4 => "q4_0",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    pub head: HeadFormat,
    /// Of the written vectors and dense tensors: F16 for deployment; F32 keeps the folded
    /// model exactly (tests use it to see folding alone).
    pub precision: Precision,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            head: HeadFormat::F16,
            precision: Precision::F16,
        }
    }
}

/// What folding did, one line per decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FoldReport {
    pub folded: Vec<String>,
    pub kept: Vec<String>,
}

/// An exported model: what [`PackedModel::write_with_quantized`] writes.
#[derive(Debug, Clone)]
pub struct Exported {
    pub model: PackedModel,
    pub quantized: QuantTensors,
    pub report: FoldReport,
}

impl Exported {
    pub fn write(&self, path: &Path) -> Result<()> {
        self.model.write_with_quantized(path, &self.quantized)
    }
}

fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn scale_dense(model: &mut PackedModel, name: &str, by: &[f32]) -> Result<()> {
    let t = model
        .dense
        .get_mut(name)
        .with_context(|| format!("missing dense tensor '{name}'"))?;
    ensure!(
        t.numel() == by.len(),
        "'{name}' has {} values, the input scale {}",
        t.numel(),
        by.len()
    );
    let values: Vec<f32> = t.to_f32_vec().iter().zip(by).map(|(w, s)| w * s).collect();
    *t = HostTensor::from_f32(t.shape.clone(), values);
    Ok(())
}

/// Folds Stage-1 input scales into neighbouring weights wherever that computes the same
/// function (`docs/METHOD.md`), deciding by value: vectors are folded only when the ones that must
/// agree are bitwise equal. Per layer:
///
/// - q/k/v read the same normed input: one vector shared by all three becomes part of the
///   attention RMSNorm weight (`w * (s * x) == (w * s) * x`). Likewise gate/up and the MLP
///   RMSNorm.
/// - o_proj's input is the attention output, a mix of value rows: `s[h * head_dim + d]` can
///   move into v_proj's row scale (and bias) `g * head_dim + d` when it is the same for every
///   query head `h` of kv head `g = h / (heads / kv_heads)`.
/// - down_proj's input is `silu(gate) * up`: its vector always moves into up_proj's row scales.
///
/// The result is f32; anything that cannot fold stays as an input-scale vector.
pub fn fold_input_scales(model: &PackedModel) -> Result<(PackedModel, FoldReport)> {
    model.validate()?;
    let c = model.config.clone();
    let mut out = model.clone();
    let mut report = FoldReport::default();
    for layer in 0..c.num_layers {
        let input = |m: &PackedModel, w: BlockLinear| m.linears[&(layer, w)].input_scale.clone();

        for (group, norm, label) in [
            (
                [BlockLinear::Q, BlockLinear::K, BlockLinear::V].as_slice(),
                names::attn_norm(layer),
                "q/k/v",
            ),
            (
                [BlockLinear::Gate, BlockLinear::Up].as_slice(),
                names::mlp_norm(layer),
                "gate/up",
            ),
        ] {
            let vectors: Vec<Option<Vec<f32>>> = group.iter().map(|&w| input(&out, w)).collect();
            if vectors.iter().all(Option::is_none) {
                continue;
            }
            let first = vectors[0].clone();
            let shared = match &first {
                Some(s) => vectors
                    .iter()
                    .all(|v| v.as_deref().is_some_and(|v| bitwise_equal(v, s))),
                None => false,
            };
            if let (true, Some(s)) = (shared, first) {
                scale_dense(&mut out, &norm, &s)?;
                for &w in group {
                    out.linears
                        .get_mut(&(layer, w))
                        .expect("validated")
                        .input_scale = None;
                }
                report
                    .folded
                    .push(format!("layer {layer}: {label} input scale -> {norm}"));
            } else {
                report.kept.push(format!(
                    "layer {layer}: {label} input scales differ; kept as vectors"
                ));
            }
        }

        if let Some(s) = input(&out, BlockLinear::O) {
            let group = c.num_heads / c.num_kv_heads;
            let per_kv: Option<Vec<f32>> = (0..c.kv_dim())
                .map(|i| {
                    let (g, d) = (i / c.head_dim, i % c.head_dim);
                    let value = s[g * group * c.head_dim + d];
                    (0..group)
                        .all(|k| s[(g * group + k) * c.head_dim + d].to_bits() == value.to_bits())
                        .then_some(value)
                })
                .collect();
            match per_kv {
                Some(per_kv) => {
                    let v = out.linears.get_mut(&(layer, BlockLinear::V)).expect("validated");
                    v.row_scale.iter_mut().zip(&per_kv).for_each(|(r, s)| *r *= s);
                    if let Some(b) = &mut v.bias {
                        b.iter_mut().zip(&per_kv).for_each(|(b, s)| *b *= s);
                    }
                    out.linears.get_mut(&(layer, BlockLinear::O)).expect("validated").input_scale = None;
                    report.folded.push(format!("layer {layer}: o_proj input scale -> v_proj row scales"));
                }
                None => report.kept.push(format!(
                    "layer {layer}: o_proj input scale differs across the query heads of a kv head; kept as a vector"
                )),
            }
        }

        if let Some(s) = input(&out, BlockLinear::Down) {
            let up = out
                .linears
                .get_mut(&(layer, BlockLinear::Up))
                .expect("validated");
            up.row_scale.iter_mut().zip(&s).for_each(|(r, s)| *r *= s);
            out.linears
                .get_mut(&(layer, BlockLinear::Down))
                .expect("validated")
                .input_scale = None;
            report.folded.push(format!(
                "layer {layer}: down_proj input scale -> up_proj row scales"
            ));
        }
    }
    Ok((out, report))
}

fn round_f16(values: &mut [f32]) {
    values
        .iter_mut()
        .for_each(|v| *v = f16::from_f32(*v).to_f32());
}

/// `binllm export`: folds what folds exactly ([`fold_input_scales`]), then stores vectors and
/// dense tensors at `options.precision` (rounded in memory too, so the returned model computes
/// what the file holds) and the head as `options.head`. The fold report goes into the
/// provenance (`details.export`).
pub fn export(sign_model: &PackedModel, options: &ExportOptions) -> Result<Exported> {
    let (mut model, report) = fold_input_scales(sign_model)?;
    model.precision = options.precision;
    if options.precision == Precision::F16 {
        for l in model.linears.values_mut() {
            round_f16(&mut l.row_scale);
            l.input_scale.iter_mut().for_each(|v| round_f16(v));
            l.bias.iter_mut().for_each(|v| round_f16(v));
        }
        for t in model.dense.values_mut() {
            let values: Vec<f16> = t.to_f32_vec().into_iter().map(f16::from_f32).collect();
            *t = HostTensor {
                shape: t.shape.clone(),
                data: TensorData::F16(values),
                stored_as: "F16".into(),
            };
        }
    }
    let mut quantized_tensors = QuantTensors::new();
    if matches!(options.head, HeadFormat::Q8 | HeadFormat::Q4) {
        let name = if model.config.tie_word_embeddings {
            names::EMBED
        } else {
            names::LM_HEAD
        };
        let t = model
            .dense
            .get_mut(name)
            .with_context(|| format!("missing dense tensor '{name}'"))?;
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let values = t.to_f32_vec();
        let quantized = if options.head == HeadFormat::Q8 {
            QuantTensor::Q8(Q8Matrix::quantize(&values, rows, cols))
        } else {
            QuantTensor::Q4(Q4Matrix::quantize(&values, rows, cols))
        };
        *t = HostTensor {
            shape: t.shape.clone(),
            data: TensorData::F32(quantized.dequantize()),
            stored_as: quantized.stored_as().into(),
        };
        quantized_tensors.insert(name.to_string(), quantized);
    }
    let export_details = serde_json::json!({
        "head": options.head,
        "precision": options.precision,
        "folded": report.folded.len(),
        "kept": report.kept,
        "input_scale_vectors_left": model.linears.values().filter(|l| l.input_scale.is_some()).count(),
    });
    match &mut model.provenance.details {
        serde_json::Value::Object(map) => {
            map.insert("export".into(), export_details);
        }
        serde_json::Value::Null => {
            model.provenance.details = serde_json::json!({ "export": export_details })
        }
        other => {
            let previous = other.take();
            *other = serde_json::json!({ "export": export_details, "before_export": previous });
        }
    }
    Ok(Exported {
        model,
        quantized: quantized_tensors,
        report,
    })
}
