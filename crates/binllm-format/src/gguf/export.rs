//! An exported 1-bit model ([`crate::packed::export`]'s output: input scales folded, vectors
//! in f16) as a GGUF file that llama.cpp runs ([`write_gguf`]), and the row orders both
//! directions share.
//!
//! Each block linear `W = row_scale ⊙ B` is written in the smallest ggml type that stores
//! `±scale` exactly for its row width ([`SignBlockType::smallest_for`]: Q1_0 for multiples of
//! 128, Q2_0 for 64, Q4_0 for 32), every block of a row carrying the row's f16 scale; a width
//! none of them fits is written F16 (also exact: `±scale` of an f16 scale is an f16 value).
//! GGUF has no per-column input scale, so a model with an input-scale vector left after
//! folding is refused. Norms and biases are F32; the embedding and head F16, or Q8_0 / Q4_0
//! exactly as the packed export quantized them (the same ggml blocks). For llama / mistral
//! the q/k rows go into llama.cpp's interleaved RoPE order, as its converter writes them.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use super::dequant::GgmlType;
use super::file::MetaValue;
use super::mapping::{
    gguf_linear_name, permutes_qk, LayerNorm, GGUF_EMBED, GGUF_FINAL_NORM, GGUF_HEAD,
};
use super::sign_blocks::{encode_signs, SignBlockType};
use super::tokenizer_write::tokenizer_metadata;
use super::write::GgufWriter;
use crate::names::{self, BlockLinear};
use crate::packed::{
    words_per_row, BlockScales, PackedLinear, PackedModel, QuantTensor, QuantTensors,
};
use crate::tensor::HostTensor;
use crate::{Architecture, ModelConfig};

/// What [`write_gguf`] wrote, for the export report.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufExportReport {
    /// Per ggml type of the block linears: (type, how many linears, bits per weight).
    pub block_types: Vec<(String, usize, f64)>,
    /// Bits per block-linear weight, scales included.
    pub body_bits_per_weight: f64,
    /// Bits per weight over every tensor.
    pub whole_bits_per_weight: f64,
    /// The type of the embedding / head.
    pub head_type: String,
    pub tokenizer: Option<String>,
}

/// `order[i]` = the rotate-half row that becomes row `i` in llama.cpp's interleaved order:
/// interleaved row `h * head_dim + 2 i + j` is rotate-half row `h * head_dim + j * head_dim / 2 + i`.
pub(super) fn rotate_half_to_interleaved_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|row| {
            let (h, within) = (row / head_dim, row % head_dim);
            h * head_dim + (within % 2) * half + within / 2
        })
        .collect()
}

/// The inverse of [`rotate_half_to_interleaved_order`].
pub(super) fn interleaved_to_rotate_half_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let forward = rotate_half_to_interleaved_order(heads, head_dim);
    let mut inverse = vec![0; forward.len()];
    for (i, &from) in forward.iter().enumerate() {
        inverse[from] = i;
    }
    inverse
}

/// The linear with its rows reordered: row `i` of the result is row `order[i]`.
pub(super) fn permute_rows(l: &PackedLinear, order: &[usize]) -> PackedLinear {
    let wpr = words_per_row(l.cols);
    let pick = |v: &[f32]| order.iter().map(|&r| v[r]).collect::<Vec<f32>>();
    PackedLinear {
        rows: l.rows,
        cols: l.cols,
        sign_bits: order
            .iter()
            .flat_map(|&r| l.sign_bits[r * wpr..(r + 1) * wpr].iter().copied())
            .collect(),
        row_scale: pick(&l.row_scale),
        block_scales: l.block_scales.as_ref().map(|b| BlockScales {
            scales: order
                .iter()
                .flat_map(|&r| b.row(r).iter().copied())
                .collect(),
            ..b.clone()
        }),
        input_scale: l.input_scale.clone(),
        bias: l.bias.as_deref().map(pick),
    }
}

/// The heads whose rows `which` holds, when llama.cpp wants them in interleaved RoPE order.
pub(super) fn rope_heads(config: &ModelConfig, which: BlockLinear) -> Option<usize> {
    if !permutes_qk(config.architecture) {
        return None;
    }
    match which {
        BlockLinear::Q => Some(config.num_heads),
        BlockLinear::K => Some(config.num_kv_heads),
        _ => None,
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect()
}

fn ggml(name: &str) -> GgmlType {
    GgmlType::from_name(name).expect("a ggml type binllm knows")
}

/// ggml blocks of a q8_0 / q4_0 matrix: per block its f16 scale, then its payload.
fn quant_blocks(t: &QuantTensor) -> Result<(GgmlType, Vec<u8>)> {
    let mut out = Vec::new();
    match t {
        QuantTensor::Q8(m) => {
            ensure!(
                m.cols.is_multiple_of(32),
                "q8_0 rows of {} are not whole blocks",
                m.cols
            );
            for (scales, quants) in m
                .scales
                .chunks_exact(m.blocks_per_row)
                .zip(m.quants.chunks_exact(m.blocks_per_row * 32))
            {
                for (s, q) in scales.iter().zip(quants.chunks_exact(32)) {
                    out.extend_from_slice(&f16::from_f32(*s).to_le_bytes());
                    out.extend(q.iter().map(|&q| q as u8));
                }
            }
            Ok((ggml("Q8_0"), out))
        }
        QuantTensor::Q4(m) => {
            ensure!(
                m.cols.is_multiple_of(32),
                "q4_0 rows of {} are not whole blocks",
                m.cols
            );
            for (s, codes) in m.scales.iter().zip(m.codes.chunks_exact(16)) {
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(codes);
            }
            Ok((ggml("Q4_0"), out))
        }
    }
}

/// The file being written, with the bits and weights of what went in.
struct Counted {
    writer: GgufWriter,
    bits: f64,
    weights: f64,
}

impl Counted {
    fn add(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: Vec<u8>) -> Result<()> {
        self.bits += 8.0 * bytes.len() as f64;
        self.weights += shape.iter().product::<usize>() as f64;
        self.writer.add_tensor(name, shape, ty, bytes)
    }
}

/// llama.cpp's `general.architecture` for a binllm architecture.
fn architecture_name(config: &ModelConfig) -> &'static str {
    match config.architecture {
        // llama.cpp runs Mistral (without sliding windows) as llama.
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

fn model_metadata(w: &mut GgufWriter, model: &PackedModel, arch: &str) -> Result<()> {
    let c = &model.config;
    ensure!(
        c.rope_scaling.is_none(),
        "RoPE scaling (Llama 3 style) is not written to GGUF yet (llama.cpp needs a \
         rope_freqs tensor for it)"
    );
    let key = |k: &str| format!("{arch}.{k}");
    let count = |v: usize| -> Result<MetaValue> {
        Ok(MetaValue::U32(
            u32::try_from(v).context("a size beyond u32")?,
        ))
    };
    w.set_str("general.architecture", arch);
    w.set_str(
        "general.name",
        &format!("binllm 1-bit {}", model.provenance.source_model),
    );
    w.set_u32("general.quantization_version", 2);
    // Marks the file as binllm's 1-bit export even when no block type fits its rows (F16).
    w.set(super::packed::ONE_BIT_KEY, MetaValue::Bool(true));
    w.set(&key("context_length"), count(c.max_position_embeddings)?);
    w.set(&key("embedding_length"), count(c.hidden_size)?);
    w.set(&key("block_count"), count(c.num_layers)?);
    w.set(&key("feed_forward_length"), count(c.intermediate_size)?);
    w.set(&key("attention.head_count"), count(c.num_heads)?);
    w.set(&key("attention.head_count_kv"), count(c.num_kv_heads)?);
    w.set(&key("attention.key_length"), count(c.head_dim)?);
    w.set(&key("attention.value_length"), count(c.head_dim)?);
    w.set(&key("rope.dimension_count"), count(c.head_dim)?);
    w.set_f32(&key("rope.freq_base"), c.rope_theta as f32);
    w.set_f32(
        &key("attention.layer_norm_rms_epsilon"),
        c.rms_norm_eps as f32,
    );
    w.set(&key("vocab_size"), count(c.vocab_size)?);
    Ok(())
}

/// Writes `model` (an exported packed model, with `quantized` its q8_0 / q4_0 head) as a
/// GGUF v3 file llama.cpp runs; see the module documentation for what goes where.
pub fn write_gguf(
    model: &PackedModel,
    quantized: &QuantTensors,
    path: &Path,
) -> Result<GgufExportReport> {
    model.validate()?;
    let c = &model.config;
    let left: Vec<String> = model
        .linears
        .iter()
        .filter(|(_, l)| l.input_scale.is_some())
        .map(|((layer, which), _)| format!("layer {layer} {}", which.module()))
        .collect();
    if !left.is_empty() {
        bail!(
            "{} input-scale vectors did not fold into neighbouring weights ({}); GGUF has no \
             per-column input scale, so this model cannot be written as GGUF exactly (the packed \
             .b1 export keeps them)",
            left.len(),
            left.join(", ")
        );
    }
    let arch = architecture_name(c);
    let mut out = Counted {
        writer: GgufWriter::new(),
        bits: 0.0,
        weights: 0.0,
    };
    model_metadata(&mut out.writer, model, arch)?;

    let mut counts: std::collections::BTreeMap<&'static str, (usize, f64)> = Default::default();
    let (mut body_bits, mut body_weights) = (0f64, 0f64);
    let dense = |name: &str| -> Result<&HostTensor> {
        model
            .dense
            .get(name)
            .with_context(|| format!("the model lacks '{name}'"))
    };
    let vector = |out: &mut Counted, gguf: &str, name: &str| -> Result<()> {
        let t = dense(name)?;
        out.add(gguf, &t.shape, ggml("F32"), f32_bytes(&t.to_f32_vec()))
    };
    // The embedding and head as the packed export stored them (a tied head is the embedding).
    let matrix = |out: &mut Counted, gguf: &str, name: &str| -> Result<String> {
        let t = dense(name)?;
        let (ty, bytes) = match quantized.get(name) {
            Some(q) => quant_blocks(q)?,
            None => (ggml("F16"), f16_bytes(&t.to_f32_vec())),
        };
        out.add(gguf, &t.shape, ty, bytes)?;
        Ok(ty.name.to_string())
    };

    let norm = |out: &mut Counted, norm: LayerNorm, layer: usize| {
        vector(out, &norm.gguf_name(layer), &norm.canonical_name(layer))
    };
    let mut head_type = matrix(&mut out, GGUF_EMBED, names::EMBED)?;
    for layer in 0..c.num_layers {
        norm(&mut out, LayerNorm::Attn, layer)?;
        for which in BlockLinear::ALL {
            if which == BlockLinear::Gate {
                norm(&mut out, LayerNorm::Mlp, layer)?;
            }
            let mut l = model.linears[&(layer, which)].clone();
            if let Some(heads) = rope_heads(c, which) {
                l = permute_rows(&l, &rotate_half_to_interleaved_order(heads, c.head_dim));
            }
            let base = gguf_linear_name(layer, which);
            // A scale per block of columns (read from a GGUF) needs ggml blocks inside them.
            let sign_type = match l.block_cols() {
                None => SignBlockType::smallest_for(l.cols),
                Some(block_cols) => SignBlockType::smallest_for(block_cols)
                    .filter(|t| l.cols.is_multiple_of(t.block_size())),
            };
            let (ty, bytes) = match sign_type {
                Some(t) => (
                    t.ggml_type(),
                    encode_signs(
                        t,
                        &l.sign_bits,
                        &l.row_scale,
                        l.block_scales.as_ref(),
                        l.rows,
                        l.cols,
                    )
                    .with_context(|| format!("{base}.weight"))?,
                ),
                None => (ggml("F16"), f16_bytes(&l.dense_weight())),
            };
            let entry = counts
                .entry(ty.name)
                .or_insert((0, 8.0 * ty.type_size as f64 / ty.block_size as f64));
            entry.0 += 1;
            body_bits += 8.0 * bytes.len() as f64;
            body_weights += (l.rows * l.cols) as f64;
            out.add(&format!("{base}.weight"), &[l.rows, l.cols], ty, bytes)?;
            if let Some(bias) = &l.bias {
                out.add(
                    &format!("{base}.bias"),
                    &[l.rows],
                    ggml("F32"),
                    f32_bytes(bias),
                )?;
            }
            if c.qk_norm {
                match which {
                    BlockLinear::Q => norm(&mut out, LayerNorm::Q, layer)?,
                    BlockLinear::K => norm(&mut out, LayerNorm::K, layer)?,
                    _ => {}
                }
            }
        }
    }
    vector(&mut out, GGUF_FINAL_NORM, names::FINAL_NORM)?;
    if !c.tie_word_embeddings {
        head_type = matrix(&mut out, GGUF_HEAD, names::LM_HEAD)?;
    }
    let Counted {
        writer: mut w,
        bits: all_bits,
        weights: all_weights,
    } = out;

    let main_type = counts
        .iter()
        .max_by_key(|(_, (n, _))| *n)
        .map(|(name, _)| *name)
        .unwrap_or("F16");
    // llama.cpp's llama_ftype ids.
    let file_type = match main_type {
        "Q1_0" => 40,
        "Q2_0" => 41,
        "Q4_0" => 2,
        _ => 1,
    };
    w.set_u32("general.file_type", file_type);

    let mut tokenizer = None;
    if let Some(json) = &model.tokenizer_json {
        let meta = tokenizer_metadata(json, c.vocab_size, c.bos_token_id, &c.eos_token_ids)
            .context("writing the tokenizer as GGUF metadata")?;
        for (k, v) in meta.entries {
            w.set(&k, v);
        }
        tokenizer = Some(meta.description);
    }
    if let Some(template) = &model.chat_template {
        w.set_str("tokenizer.chat_template", template);
    }
    w.write(path)?;
    Ok(GgufExportReport {
        block_types: counts
            .into_iter()
            .map(|(name, (n, bpw))| (name.to_string(), n, bpw))
            .collect(),
        body_bits_per_weight: body_bits / body_weights.max(1.0),
        whole_bits_per_weight: all_bits / all_weights.max(1.0),
        head_type,
        tokenizer,
    })
}
