//! ggml's tensor types and their dequantisation.
//!
//! This module owns the table of ggml types (id, name, block geometry) and the decoding of
//! the block formats binllm supports. Every `dequantize_*` function reproduces ggml-quants.c's
//! `dequantize_row_*` operation for operation (gguf-py's `quants.py` is the numpy mirror the
//! tests compare against): the same products in the same order, no fused multiply-adds, so
//! the results are bit-identical to ggml's reference CPU path.

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use super::sign_blocks::{self, SignBlockType};
use crate::tensor::TensorData;

/// One ggml tensor type: its id in GGUF files, its name, and how many elements one block of
/// `type_size` bytes holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block_size: usize,
    pub type_size: usize,
}

const QK_K: usize = 256;

/// Every type ggml has defined (gguf-py `GGML_QUANT_SIZES`), supported or not, so that a
/// file can be measured and bounds-checked before anything is decoded, and so an
/// unsupported type is reported by name.
const GGML_TYPES: &[GgmlType] = &[
    ty(0, "F32", 1, 4),
    ty(1, "F16", 1, 2),
    ty(2, "Q4_0", 32, 2 + 16),
    ty(3, "Q4_1", 32, 2 + 2 + 16),
    ty(6, "Q5_0", 32, 2 + 4 + 16),
    ty(7, "Q5_1", 32, 2 + 2 + 4 + 16),
    ty(8, "Q8_0", 32, 2 + 32),
    ty(9, "Q8_1", 32, 4 + 4 + 32),
    ty(10, "Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
    ty(11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
    ty(12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
    ty(13, "Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
    ty(14, "Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
    ty(15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
    ty(16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
    ty(17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
    ty(18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
    ty(19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
    ty(20, "IQ4_NL", 32, 2 + 16),
    ty(21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
    ty(22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
    ty(23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
    ty(24, "I8", 1, 1),
    ty(25, "I16", 1, 2),
    ty(26, "I32", 1, 4),
    ty(27, "I64", 1, 8),
    ty(28, "F64", 1, 8),
    ty(29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
    ty(30, "BF16", 1, 2),
    ty(34, "TQ1_0", QK_K, 2 + 4 * 13),
    ty(35, "TQ2_0", QK_K, 2 + 64),
    ty(39, "MXFP4", 32, 1 + 16),
    ty(40, "NVFP4", 64, 4 + 32),
    ty(41, "Q1_0", 128, 2 + 16),
    ty(42, "Q2_0", 64, 2 + 16),
];

const fn ty(id: u32, name: &'static str, block_size: usize, type_size: usize) -> GgmlType {
    GgmlType {
        id,
        name,
        block_size,
        type_size,
    }
}

/// The types [`dequantize`] decodes.
pub const SUPPORTED: &[&str] = &[
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q1_0",
    "Q2_0", "TQ1_0", "TQ2_0",
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().copied().find(|t| t.id == id)
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        GGML_TYPES.iter().copied().find(|t| t.name == name)
    }

    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self.name)
    }

    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is not a whole
    /// number of blocks or the size overflows.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size as u64;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(self.type_size as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Decodes `n_elements` elements of type `ty` from `bytes`. F32, F16 and BF16 keep their
/// precision; quantised types become f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<TensorData> {
    let expected = ty.byte_size(n_elements as u64);
    if expected != Some(bytes.len() as u64) {
        bail!(
            "{n_elements} elements of type {ty} need {} bytes, got {}",
            expected.map_or("a whole number of blocks and".to_string(), |b| b
                .to_string()),
            bytes.len()
        );
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty.name {
        "F32" => {
            return Ok(TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ))
        }
        "F16" => {
            return Ok(TensorData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            ))
        }
        "BF16" => {
            return Ok(TensorData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            ))
        }
        // The low-bit types that can hold sign matrices live with their layouts.
        "Q1_0" | "Q2_0" | "TQ1_0" | "TQ2_0" => {
            let sign_type = SignBlockType::readable(ty).expect("a sign block type");
            return Ok(TensorData::F32(sign_blocks::dequantize(
                sign_type, bytes, n_elements,
            )?));
        }
        "Q4_0" => dequantize_q4_0,
        "Q4_1" => dequantize_q4_1,
        "Q5_0" => dequantize_q5_0,
        "Q5_1" => dequantize_q5_1,
        "Q8_0" => dequantize_q8_0,
        "Q4_K" => dequantize_q4_k,
        "Q5_K" => dequantize_q5_k,
        "Q6_K" => dequantize_q6_k,
        other => bail!(
            "type {other} cannot be dequantized (supported: {})",
            SUPPORTED.join(", ")
        ),
    };
    let mut out = vec![0.0f32; n_elements];
    // A few hundred blocks per task keeps rayon's overhead negligible next to the decoding.
    const BLOCKS_PER_TASK: usize = 256;
    out.par_chunks_mut(ty.block_size * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(ty.type_size * BLOCKS_PER_TASK))
        .for_each(|(values, blocks)| {
            for (y, x) in values
                .chunks_exact_mut(ty.block_size)
                .zip(blocks.chunks_exact(ty.type_size))
            {
                block_fn(x, y);
            }
        });
    Ok(TensorData::F32(out))
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// `block_q4_0`: f16 d, 16 bytes of nibbles (low nibbles are elements 0..16, high 16..32).
fn dequantize_q4_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles; y = q*d + m.
fn dequantize_q4_1(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let m = f16_at(x, 2);
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `block_q5_0`: f16 d, 32 high bits (u32 LE; bit j belongs to element j), 16 bytes of nibbles.
fn dequantize_q5_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let qs = &x[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = (((qs[j] & 0x0F) | (h0 << 4)) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | (h1 << 4)) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1`: f16 d, f16 m, 32 high bits, 16 bytes of nibbles; y = q*d + m.
fn dequantize_q5_1(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let m = f16_at(x, 2);
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let qs = &x[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = ((qs[j] & 0x0F) | (h0 << 4)) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as f32 * d + m;
    }
}

/// `block_q8_0`: f16 d, 32 signed bytes.
fn dequantize_q8_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    for (v, &q) in y.iter_mut().zip(&x[2..34]) {
        *v = (q as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: eight 6-bit (scale, min) pairs packed into 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// `block_q4_K`: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles. Each 64
/// elements use one 32-byte run: low nibbles with one (scale, min), high nibbles with the next.
fn dequantize_q4_k(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let dmin = f16_at(x, 2);
    let scales = &x[4..16];
    let qs = &x[16..144];
    for j in 0..QK_K / 64 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, dm1) = (d * sc1, dmin * m1);
        let (d2, dm2) = (d * sc2, dmin * m2);
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - dm1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - dm2;
        }
    }
}

/// `block_q5_K`: as Q4_K plus 32 bytes of fifth bits (bit s of byte l belongs to element
/// l of the s-th run of 32).
fn dequantize_q5_k(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let dmin = f16_at(x, 2);
    let scales = &x[4..16];
    let qh = &x[16..48];
    let qs = &x[48..176];
    for j in 0..QK_K / 64 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, dm1) = (d * sc1, dmin * m1);
        let (d2, dm2) = (d * sc2, dmin * m2);
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = (qh[l] >> (2 * j)) & 1;
            let h2 = (qh[l] >> (2 * j + 1)) & 1;
            out[l] = d1 * ((q[l] & 0x0F) | (h1 << 4)) as f32 - dm1;
            out[l + 32] = d2 * ((q[l] >> 4) | (h2 << 4)) as f32 - dm2;
        }
    }
}

/// `block_q6_K`: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit
/// scales (one per 16 elements), f16 d.
fn dequantize_q6_k(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 208);
    for n in 0..QK_K / 128 {
        let ql = &x[64 * n..64 * n + 64];
        let qh = &x[128 + 32 * n..128 + 32 * n + 32];
        let sc = &x[192 + 8 * n..192 + 8 * n + 8];
        let out = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let scale = |k: usize| d * (sc[is + k] as i8) as f32;
            out[l] = scale(0) * q1 as f32;
            out[l + 32] = scale(2) * q2 as f32;
            out[l + 64] = scale(4) * q3 as f32;
            out[l + 96] = scale(6) * q4 as f32;
        }
    }
}
