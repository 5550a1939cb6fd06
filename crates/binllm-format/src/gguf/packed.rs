//! A GGUF whose block linears are 1-bit (Q1_0, Q2_0 with ±d codes, TQ1_0 / TQ2_0 without
//! zeros) read straight into a [`PackedModel`] for the 1-bit kernels, without going through
//! floats: the signs become binllm's sign bits (for Q1_0 the same bytes), and the scales
//! ([`super::sign_blocks::decode_signs`]) either one per row, where every block of a row has
//! the same (binllm's own export: the row-scaled kernels, as for a `.b1` file), or the file's
//! own scale per block, where they differ (llama-quantize gives each block of 128 its mean
//! |w|: [`PackedLinear::block_scales`], which the runtime computes with on the block-scaled
//! kernels, `binllm_kernels::block_scaled`). The embedding and head keep their storage: Q8_0
//! / Q4_0 become the runtime's q8_0 / q4_0 matrices as stored, F16 / F32 stay dense, other
//! types are dequantised.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;

use super::export::{interleaved_to_rotate_half_order, permute_rows, rope_heads};
use super::file::{GgufFile, TensorInfo};
use super::mapping::{
    gguf_linear_name, model_config, LayerNorm, GGUF_EMBED, GGUF_FINAL_NORM, GGUF_HEAD,
};
use super::sign_blocks::{decode_signs, DecodedSigns, SignBlockType};
use super::tokenizer;
use crate::names::{self, BlockLinear};
use crate::packed::{
    PackedLinear, PackedModel, Precision, Provenance, Q4Matrix, Q8Matrix, QuantTensor, QuantTensors,
};
use crate::tensor::{HostTensor, TensorData, TensorMap};

/// Metadata key `write_gguf` sets on every file it writes.
pub const ONE_BIT_KEY: &str = "binllm.one_bit";

/// Whether `path` is a GGUF file written by `write_gguf` or whose first block linear is of a
/// type binllm reads as sign bits (reads the header only). The rest is checked when it is
/// read.
pub fn is_sign_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF";
    is_gguf
        && GgufFile::open(path).is_ok_and(|f| {
            let marked = f.get(ONE_BIT_KEY).and_then(|v| v.as_bool()) == Some(true);
            f.tensor_info("blk.0.attn_q.weight").is_some_and(|t| {
                SignBlockType::readable(t.ggml_type).is_some()
                    // F16 rows of ±scale, only in binllm's own export (a file requantized by
                    // llama-quantize keeps the key but not the types, and reads as floats).
                    || (marked && matches!(t.ggml_type.name, "F16" | "F32"))
            })
        })
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    file.tensor_info(name)
        .ok_or_else(|| anyhow!("{}: the file has no tensor '{name}'", file.path.display()))
}

fn check_shape(file: &GgufFile, info: &TensorInfo, shape: &[usize]) -> Result<()> {
    if info.shape() != shape {
        bail!(
            "{}: tensor '{}' has shape {:?}, but the model's config implies {shape:?}",
            file.path.display(),
            info.name,
            info.shape()
        );
    }
    Ok(())
}

fn floats(file: &GgufFile, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let info = tensor(file, name)?;
    check_shape(file, info, shape)?;
    Ok(file.read_tensor(info)?.to_f32_vec())
}

/// The embedding or head as the runtime keeps it: q8_0 / q4_0 as stored, else dense.
fn dense_matrix(
    file: &GgufFile,
    gguf_name: &str,
    shape: &[usize],
) -> Result<(HostTensor, Option<QuantTensor>)> {
    let info = tensor(file, gguf_name)?;
    check_shape(file, info, shape)?;
    let (rows, cols) = (shape[0], shape[1]);
    let bytes = file.tensor_bytes(info)?;
    let quantized = match info.ggml_type.name {
        "Q8_0" => {
            let blocks_per_row = cols / 32;
            let mut quants = Vec::with_capacity(rows * cols);
            let mut scales = Vec::with_capacity(rows * blocks_per_row);
            for block in bytes.chunks_exact(34) {
                scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
                quants.extend(block[2..].iter().map(|&q| q as i8));
            }
            Some(QuantTensor::Q8(Q8Matrix {
                rows,
                cols,
                blocks_per_row,
                quants,
                scales,
            }))
        }
        "Q4_0" => {
            let blocks_per_row = cols / 32;
            let mut codes = Vec::with_capacity(rows * cols / 2);
            let mut scales = Vec::with_capacity(rows * blocks_per_row);
            for block in bytes.chunks_exact(18) {
                scales.push(half::f16::from_le_bytes([block[0], block[1]]));
                codes.extend_from_slice(&block[2..]);
            }
            Some(QuantTensor::Q4(Q4Matrix {
                rows,
                cols,
                blocks_per_row,
                codes,
                scales,
            }))
        }
        _ => None,
    };
    Ok(match quantized {
        Some(q) => {
            q.check()
                .with_context(|| format!("{}: tensor '{gguf_name}'", file.path.display()))?;
            let dense = HostTensor {
                shape: shape.to_vec(),
                data: TensorData::F32(q.dequantize()),
                stored_as: q.stored_as().into(),
            };
            (dense, Some(q))
        }
        None => (file.read_tensor(info)?, None),
    })
}

/// A float matrix whose rows are each `±scale` of one scale, as sign bits and row scales.
fn signs_from_floats(values: &[f32], rows: usize, cols: usize) -> Result<DecodedSigns> {
    let wpr = crate::packed::words_per_row(cols);
    let mut sign_bits = vec![0u64; rows * wpr];
    let mut row_scale = Vec::with_capacity(rows);
    for (r, row) in values.chunks_exact(cols).enumerate() {
        let scale = row[0].abs();
        if let Some(c) = row.iter().position(|v| v.abs() != scale) {
            bail!(
                "row {r} is not ±one scale (|w[{r}, 0]| = {scale}, |w[{r}, {c}]| = {}): not a \
                 sign matrix",
                row[c].abs()
            );
        }
        row_scale.push(scale);
        for (c, v) in row.iter().enumerate() {
            if v.is_sign_positive() {
                sign_bits[r * wpr + c / 64] |= 1u64 << (c % 64);
            }
        }
    }
    Ok(DecodedSigns {
        sign_bits,
        row_scale,
        block_scales: None,
    })
}

fn block_linear(
    file: &GgufFile,
    layer: usize,
    which: BlockLinear,
    config: &crate::ModelConfig,
) -> Result<PackedLinear> {
    let base = gguf_linear_name(layer, which);
    let name = format!("{base}.weight");
    let info = tensor(file, &name)?;
    let [rows, cols] = which.shape(config);
    check_shape(file, info, &[rows, cols])?;
    let context = || {
        format!(
            "{}: tensor '{name}' ({})",
            file.path.display(),
            info.ggml_type
        )
    };
    let signs = match (SignBlockType::readable(info.ggml_type), info.ggml_type.name) {
        (Some(sign_type), _) => {
            decode_signs(sign_type, file.tensor_bytes(info)?, rows, cols).with_context(context)?
        }
        // What `write_gguf` writes for rows of a multiple of 32 but not 64: codes 7 and 9
        // (any other code is refused, so an ordinary Q4_0 matrix is not taken for signs).
        (None, "Q4_0") => decode_signs(SignBlockType::Q4_0, file.tensor_bytes(info)?, rows, cols)
            .with_context(context)?,
        // What `write_gguf` writes for rows no sign block type fits (e.g. 172 columns).
        (None, "F16" | "F32") => {
            signs_from_floats(&file.read_tensor(info)?.to_f32_vec(), rows, cols)
                .with_context(context)?
        }
        (None, _) => bail!(
            "{}: tensor '{name}' is {}, not a 1-bit type (Q1_0, Q2_0, TQ1_0, TQ2_0); the \
             packed engine reads GGUF files whose block linears are all 1-bit (for another \
             GGUF, `binllm export --ptq` binarises it)",
            file.path.display(),
            info.ggml_type
        ),
    };
    let bias_name = format!("{base}.bias");
    let bias = match file.tensor_info(&bias_name) {
        Some(_) => Some(floats(file, &bias_name, &[rows])?),
        None => None,
    };
    let linear = PackedLinear {
        rows,
        cols,
        sign_bits: signs.sign_bits,
        row_scale: signs.row_scale,
        block_scales: signs.block_scales,
        input_scale: None,
        bias,
    };
    Ok(match rope_heads(config, which) {
        Some(heads) => permute_rows(
            &linear,
            &interleaved_to_rotate_half_order(heads, config.head_dim),
        ),
        None => linear,
    })
}

/// Reads a 1-bit GGUF as a packed model and its quantized head (see the module
/// documentation). Errors name the file and the tensor.
pub fn read_packed(path: &Path) -> Result<(PackedModel, QuantTensors)> {
    let file = GgufFile::open(path)?;
    let config = model_config(&file)?;
    let mut linears = BTreeMap::new();
    for layer in 0..config.num_layers {
        for which in BlockLinear::ALL {
            linears.insert((layer, which), block_linear(&file, layer, which, &config)?);
        }
    }
    let mut dense = TensorMap::new();
    let mut quantized = QuantTensors::new();
    let vector = |gguf: &str, shape: &[usize]| -> Result<HostTensor> {
        Ok(HostTensor::from_f32(
            shape.to_vec(),
            floats(&file, gguf, shape)?,
        ))
    };
    let (h, vocab) = (config.hidden_size, config.vocab_size);
    for (canonical, gguf) in [(names::EMBED, GGUF_EMBED), (names::LM_HEAD, GGUF_HEAD)] {
        if canonical == names::LM_HEAD && config.tie_word_embeddings {
            continue;
        }
        let (t, q) = dense_matrix(&file, gguf, &[vocab, h])?;
        dense.insert(canonical.to_string(), t);
        if let Some(q) = q {
            quantized.insert(canonical.to_string(), q);
        }
    }
    dense.insert(names::FINAL_NORM.into(), vector(GGUF_FINAL_NORM, &[h])?);
    for layer in 0..config.num_layers {
        for norm in LayerNorm::ALL {
            if let Some(width) = norm.width(&config) {
                dense.insert(
                    norm.canonical_name(layer),
                    vector(&norm.gguf_name(layer), &[width])?,
                );
            }
        }
    }
    let built = tokenizer::from_metadata(&file)
        .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
    let tokenizer_json = built
        .tokenizer
        .map(|t| t.to_json())
        .transpose()
        .with_context(|| format!("{}: cannot serialise the tokenizer", path.display()))?;
    let model = PackedModel {
        tokenizer_json,
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        provenance: Provenance {
            method: "gguf".into(),
            source_model: path.display().to_string(),
            details: serde_json::json!({
                "gguf": file
                    .type_counts()
                    .iter()
                    .map(|(name, n)| format!("{n} {name}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
            }),
        },
        precision: Precision::F16,
        config,
        linears,
        dense,
    };
    model
        .validate()
        .with_context(|| format!("{}: not a usable 1-bit model", path.display()))?;
    Ok((model, quantized))
}
