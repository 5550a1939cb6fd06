//! The PTQ sign model: `B = sign(W)`, `row_scale = mean_c |W[r, c] / s[c]|` with optional
//! positive input scales `s`, no training. Its quality is poor (that is why binllm trains),
//! but it has the exact shape and cost of a converted model: tests use it to check the
//! runtime against the libtorch engine, and benchmarks use it for speed (which does not
//! depend on the values). `binllm export --ptq` writes one.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use binllm_format::names::{self, BlockLinear};
use binllm_format::packed::{pack_signs, PackedLinear, PackedModel, Precision, Provenance};
use binllm_format::{HostTensor, PretrainedModel, TensorMap};

use crate::sampling::SplitMix64;

/// Which input scales the PTQ model gets (all random in [0.5, 2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputScales {
    None,
    /// Shaped so that export can fold every one: q/k/v share one vector, gate/up share one,
    /// o_proj's is equal across the query heads of a kv head, down_proj's is free.
    Foldable {
        seed: u64,
    },
    /// An independent vector on every linear: export must keep the q/k/v, gate/up and (with
    /// grouped heads) o_proj vectors.
    Independent {
        seed: u64,
    },
}

fn random_scales(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| 0.5 + 1.5 * rng.next_f32()).collect()
}

/// Binarizes every block linear of `model` by PTQ; everything else is copied in f32.
pub fn ptq_sign_model(model: &PretrainedModel, input_scales: InputScales) -> Result<PackedModel> {
    let c = &model.config;
    let mut rng = SplitMix64::new(match input_scales {
        InputScales::None => 0,
        InputScales::Foldable { seed } | InputScales::Independent { seed } => seed,
    });
    let mut linears = BTreeMap::new();
    for layer in 0..c.num_layers {
        let mut scales: BTreeMap<BlockLinear, Vec<f32>> = BTreeMap::new();
        match input_scales {
            InputScales::None => {}
            InputScales::Independent { .. } => {
                for which in BlockLinear::ALL {
                    scales.insert(which, random_scales(&mut rng, which.shape(c)[1]));
                }
            }
            InputScales::Foldable { .. } => {
                let attn = random_scales(&mut rng, c.hidden_size);
                let mlp = random_scales(&mut rng, c.hidden_size);
                for which in [BlockLinear::Q, BlockLinear::K, BlockLinear::V] {
                    scales.insert(which, attn.clone());
                }
                scales.insert(BlockLinear::Gate, mlp.clone());
                scales.insert(BlockLinear::Up, mlp);
                // One value per (kv head, dim), repeated over the query heads sharing it.
                let per_kv = random_scales(&mut rng, c.kv_dim());
                let group = c.num_heads / c.num_kv_heads;
                let o: Vec<f32> = (0..c.q_dim())
                    .map(|i| {
                        let (h, d) = (i / c.head_dim, i % c.head_dim);
                        per_kv[(h / group) * c.head_dim + d]
                    })
                    .collect();
                scales.insert(BlockLinear::O, o);
                scales.insert(
                    BlockLinear::Down,
                    random_scales(&mut rng, c.intermediate_size),
                );
            }
        }
        for which in BlockLinear::ALL {
            let name = names::linear_weight(layer, which);
            let w = model
                .tensors
                .get(&name)
                .with_context(|| format!("{}: lacks '{name}'", model.path.display()))?
                .to_f32_vec();
            let [rows, cols] = which.shape(c);
            let input_scale = scales.remove(&which);
            let row_scale = w
                .chunks_exact(cols)
                .map(|row| {
                    let sum: f32 = match &input_scale {
                        Some(s) => row.iter().zip(s).map(|(w, s)| (w / s).abs()).sum(),
                        None => row.iter().map(|w| w.abs()).sum(),
                    };
                    sum / cols as f32
                })
                .collect();
            let bias = which
                .has_bias(c)
                .then(|| {
                    model
                        .tensors
                        .get(&names::linear_bias(layer, which))
                        .map(|b| b.to_f32_vec())
                })
                .flatten();
            linears.insert(
                (layer, which),
                PackedLinear {
                    rows,
                    cols,
                    sign_bits: pack_signs(&w, rows, cols),
                    row_scale,
                    block_scales: None,
                    input_scale,
                    bias,
                },
            );
        }
    }
    let mut dense = TensorMap::new();
    for (name, t) in &model.tensors {
        if !name.contains("_proj.") {
            dense.insert(
                name.clone(),
                HostTensor::from_f32(t.shape.clone(), t.to_f32_vec()),
            );
        }
    }
    let packed = PackedModel {
        config: c.clone(),
        linears,
        dense,
        tokenizer_json: model.tokenizer.as_ref().map(|t| t.to_json()).transpose()?,
        chat_template: model.chat_template.clone(),
        provenance: Provenance {
            method: "ptq-sign".into(),
            source_model: model.path.display().to_string(),
            details: serde_json::json!({ "input_scales": format!("{input_scales:?}") }),
        },
        precision: Precision::F32,
    };
    packed.validate()?;
    Ok(packed)
}
