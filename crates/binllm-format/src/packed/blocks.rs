//! Block storage: how the packed model's blocks are laid out as safetensors tensors. A block
//! linear's sign bits are the kernels' layout ([`binllm_kernels::layout`]): row-major, each row
//! padded to whole 64-bit words stored little-endian; bit `j` (least significant = 0) of word
//! `w` of row `r` is element `(r, 64 w + j)`; 1 means +1 and 0 means -1; padding bits are 0.
//! A dense matrix stored quantized is the kernels' q8_0 ([`Q8Matrix`]) or q4_0
//! ([`Q4Matrix`]) written as two tensors, its payload and its f16 block scales.

use std::collections::{BTreeMap, HashSet};

use anyhow::{anyhow, ensure, Result};
use half::f16;

use crate::hf::le_values;
use binllm_kernels::{BlockScales, Q4Matrix, Q8Matrix};

/// A tensor as written to the file: name, type, shape and little-endian bytes.
pub(crate) type StoredTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// A dense tensor stored q8_0 is written as two tensors: `NAME` + this suffix (I8
/// `[rows, 32 * blocks_per_row]`) and `NAME` + [`Q8_SCALE_SUFFIX`] (F16 `[rows, blocks_per_row]`).
pub const Q8_SUFFIX: &str = ".q8";
pub const Q8_SCALE_SUFFIX: &str = ".q8_scale";
/// `stored_as` of a dense [`crate::HostTensor`] that is q8_0 in its file (its data is dequantized).
pub const Q8_STORED_AS: &str = "Q8_0";
pub use binllm_kernels::q8::Q8_BLOCK;
/// A dense tensor stored q4_0 (version 3) is written as `NAME` + this suffix (U8
/// `[rows, 16 * blocks_per_row]`, GGML's q4_0 nibble order) and `NAME` + [`Q4_SCALE_SUFFIX`]
/// (F16 `[rows, blocks_per_row]`).
pub const Q4_SUFFIX: &str = ".q4";
pub const Q4_SCALE_SUFFIX: &str = ".q4_scale";
/// `stored_as` of a dense [`crate::HostTensor`] that is q4_0 in its file (its data is dequantized).
pub const Q4_STORED_AS: &str = "Q4_0";
pub use binllm_kernels::q4::{Q4_BLOCK, Q4_BLOCK_BYTES};

pub use binllm_kernels::layout::words_per_row;

/// Packs the signs of a row-major `rows x cols` matrix (sign(0) = +1) in the kernels' layout.
pub fn pack_signs(values: &[f32], rows: usize, cols: usize) -> Vec<u64> {
    binllm_kernels::pack_signs(values, rows, cols).bits
}

/// The +-1 matrix the bits encode.
pub fn unpack_signs(bits: &[u64], rows: usize, cols: usize) -> Vec<f32> {
    binllm_kernels::PackedMatrix::from_parts(rows, cols, bits.to_vec(), vec![1.0; rows])
        .unpack_signs()
}

/// One binarized linear: `y = row_scale * ((B * block_scale) (input_scale * x)) + bias`.
///
/// `block_scales` is a GGUF's own scale per block of columns (llama-quantize's Q1_0 gives
/// each 128 weights of a row theirs), `None` for binllm's own models, whose rows have one
/// scale. binllm reads such a GGUF with row scales of 1; the packed file (`.b1`) stores one
/// scale per row only, so a linear with block scales is written as GGUF only.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedLinear {
    pub rows: usize,
    pub cols: usize,
    pub sign_bits: Vec<u64>,
    pub row_scale: Vec<f32>,
    pub block_scales: Option<BlockScales>,
    pub input_scale: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// The dense weight this linear computes with:
    /// `row_scale[r] * block_scale[r, c / block_cols] * B[r,c] * input_scale[c]`.
    pub fn dense_weight(&self) -> Vec<f32> {
        let mut w = unpack_signs(&self.sign_bits, self.rows, self.cols);
        for r in 0..self.rows {
            let block_scales = self.block_scales.as_ref().map(|b| (b.block_cols, b.row(r)));
            for c in 0..self.cols {
                let s = self.input_scale.as_ref().map_or(1.0, |v| v[c]);
                let block = block_scales.map_or(1.0, |(cols, scales)| scales[c / cols].to_f32());
                w[r * self.cols + c] *= self.row_scale[r] * block * s;
            }
        }
        w
    }

    /// Blocks of columns with a scale of their own, when the linear has them.
    pub fn block_cols(&self) -> Option<usize> {
        self.block_scales.as_ref().map(|b| b.block_cols)
    }
}

/// How a blocked quantized matrix `NAME` is stored: `NAME{payload_suffix}` (`payload_dtype`,
/// `block_bytes` bytes per block of `block_cols` columns) and `NAME{scale_suffix}` (F16, one
/// scale per block).
struct BlockedFormat {
    label: &'static str,
    payload_suffix: &'static str,
    payload_dtype: safetensors::Dtype,
    scale_suffix: &'static str,
    block_cols: usize,
    block_bytes: usize,
}

const Q8_FORMAT: BlockedFormat = BlockedFormat {
    label: "q8_0",
    payload_suffix: Q8_SUFFIX,
    payload_dtype: safetensors::Dtype::I8,
    scale_suffix: Q8_SCALE_SUFFIX,
    block_cols: Q8_BLOCK,
    block_bytes: Q8_BLOCK,
};

const Q4_FORMAT: BlockedFormat = BlockedFormat {
    label: "q4_0",
    payload_suffix: Q4_SUFFIX,
    payload_dtype: safetensors::Dtype::U8,
    scale_suffix: Q4_SCALE_SUFFIX,
    block_cols: Q4_BLOCK,
    block_bytes: Q4_BLOCK_BYTES,
};

/// A blocked quantized matrix as read: its shape, blocks per row, payload bytes and scales.
struct BlockedTensor<'a> {
    rows: usize,
    cols: usize,
    blocks_per_row: usize,
    payload: &'a [u8],
    scales: Vec<f16>,
}

/// The two tensors of the blocked quantized matrix `name` of `shape`, checked against `format`.
fn read_blocked<'a>(
    st: &safetensors::SafeTensors<'a>,
    name: &str,
    shape: &[usize],
    format: &BlockedFormat,
) -> Result<BlockedTensor<'a>> {
    ensure!(
        shape.len() == 2,
        "tensor '{name}' is stored {} but is not a matrix",
        format.label
    );
    let (rows, cols) = (shape[0], shape[1]);
    let blocks = cols.div_ceil(format.block_cols);
    let payload_name = format!("{name}{}", format.payload_suffix);
    let scales_name = format!("{name}{}", format.scale_suffix);
    let payload = st
        .tensor(&payload_name)
        .map_err(|e| anyhow!("tensor '{payload_name}': {e}"))?;
    let scales = st
        .tensor(&scales_name)
        .map_err(|e| anyhow!("tensor '{scales_name}': {e}"))?;
    ensure!(
        payload.dtype() == format.payload_dtype,
        "'{payload_name}' must be {:?}",
        format.payload_dtype
    );
    ensure!(
        scales.dtype() == safetensors::Dtype::F16,
        "'{scales_name}' must be F16"
    );
    ensure!(
        payload.shape() == [rows, blocks * format.block_bytes],
        "'{payload_name}' has shape {:?}, expected [{rows}, {}]",
        payload.shape(),
        blocks * format.block_bytes
    );
    ensure!(
        scales.shape() == [rows, blocks],
        "'{scales_name}' has shape {:?}, expected [{rows}, {blocks}]",
        scales.shape()
    );
    Ok(BlockedTensor {
        rows,
        cols,
        blocks_per_row: blocks,
        payload: payload.data(),
        scales: le_values(scales.data(), f16::from_le_bytes),
    })
}

fn read_q8(st: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Q8Matrix> {
    let t = read_blocked(st, name, shape, &Q8_FORMAT)?;
    Ok(Q8Matrix {
        rows: t.rows,
        cols: t.cols,
        blocks_per_row: t.blocks_per_row,
        quants: t.payload.iter().map(|&b| b as i8).collect(),
        scales: t.scales.iter().map(|s| s.to_f32()).collect(),
    })
}

fn read_q4(st: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Q4Matrix> {
    let t = read_blocked(st, name, shape, &Q4_FORMAT)?;
    Ok(Q4Matrix {
        rows: t.rows,
        cols: t.cols,
        blocks_per_row: t.blocks_per_row,
        codes: t.payload.to_vec(),
        scales: t.scales,
    })
}

/// Bits per weight of a q8_0 matrix as stored (block padding and f16 scales included): 8.5
/// when `cols` is a multiple of 32.
pub fn q8_bits_per_weight(rows: usize, cols: usize) -> f64 {
    let blocks = cols.div_ceil(Q8_BLOCK) as f64;
    (rows as f64 * blocks * (Q8_BLOCK as f64 * 8.0 + 16.0)) / (rows * cols).max(1) as f64
}

/// Bits per weight of a q4_0 matrix as stored (block padding and f16 scales included): 4.5
/// when `cols` is a multiple of 32.
pub fn q4_bits_per_weight(rows: usize, cols: usize) -> f64 {
    let blocks = cols.div_ceil(Q4_BLOCK) as f64;
    (rows as f64 * blocks * (Q4_BLOCK as f64 * 4.0 + 16.0)) / (rows * cols).max(1) as f64
}

/// A dense matrix stored quantized: q8_0 or (version 3) q4_0.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantTensor {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
}

impl QuantTensor {
    /// Reads the dense tensor `name` of `shape` if the file stores it quantized (its two
    /// tensors are there); `Ok(None)` when it does not.
    pub(crate) fn read(
        st: &safetensors::SafeTensors,
        names_present: &HashSet<String>,
        name: &str,
        shape: &[usize],
        version: u32,
    ) -> Result<Option<Self>> {
        let q8_name = format!("{name}{Q8_SUFFIX}");
        let q4_name = format!("{name}{Q4_SUFFIX}");
        if names_present.contains(&q8_name) {
            Ok(Some(QuantTensor::Q8(read_q8(st, name, shape)?)))
        } else if names_present.contains(&q4_name) {
            ensure!(
                version >= 3,
                "'{q4_name}' is a version-3 tensor in a version-{version} file"
            );
            Ok(Some(QuantTensor::Q4(read_q4(st, name, shape)?)))
        } else {
            Ok(None)
        }
    }

    /// The two tensors it is stored as, under `name` and the format's suffixes.
    pub(crate) fn stored_tensors(&self, name: &str) -> [StoredTensor; 2] {
        let f16_bytes = |scales: &mut dyn Iterator<Item = f16>| -> Vec<u8> {
            scales.flat_map(|s| s.to_le_bytes()).collect()
        };
        match self {
            QuantTensor::Q8(t) => [
                (
                    format!("{name}{Q8_SUFFIX}"),
                    safetensors::Dtype::I8,
                    vec![t.rows, t.blocks_per_row * Q8_BLOCK],
                    t.quants.iter().map(|&q| q as u8).collect(),
                ),
                (
                    format!("{name}{Q8_SCALE_SUFFIX}"),
                    safetensors::Dtype::F16,
                    vec![t.rows, t.blocks_per_row],
                    f16_bytes(&mut t.scales.iter().map(|&s| f16::from_f32(s))),
                ),
            ],
            QuantTensor::Q4(t) => [
                (
                    format!("{name}{Q4_SUFFIX}"),
                    safetensors::Dtype::U8,
                    vec![t.rows, t.blocks_per_row * Q4_BLOCK_BYTES],
                    t.codes.clone(),
                ),
                (
                    format!("{name}{Q4_SCALE_SUFFIX}"),
                    safetensors::Dtype::F16,
                    vec![t.rows, t.blocks_per_row],
                    f16_bytes(&mut t.scales.iter().copied()),
                ),
            ],
        }
    }

    /// Checks that its lengths agree with its shape, and (q8_0) that f16, which the file holds
    /// the scales in, holds every scale exactly.
    pub fn check(&self) -> Result<()> {
        let consistent = match self {
            QuantTensor::Q8(t) => {
                t.blocks_per_row == t.cols.div_ceil(Q8_BLOCK)
                    && t.quants.len() == t.rows * t.blocks_per_row * Q8_BLOCK
                    && t.scales.len() == t.rows * t.blocks_per_row
            }
            QuantTensor::Q4(t) => {
                t.blocks_per_row == t.cols.div_ceil(Q4_BLOCK)
                    && t.codes.len() == t.rows * t.blocks_per_row * Q4_BLOCK_BYTES
                    && t.scales.len() == t.rows * t.blocks_per_row
            }
        };
        ensure!(consistent, "inconsistent lengths");
        if let QuantTensor::Q8(t) = self {
            ensure!(
                t.scales
                    .iter()
                    .all(|&s| s.is_nan() || f16::from_f32(s).to_f32() == s),
                "q8_0 scales that f16 cannot hold exactly"
            );
        }
        Ok(())
    }

    /// `[rows, cols]` of the matrix.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantTensor::Q8(t) => (t.rows, t.cols),
            QuantTensor::Q4(t) => (t.rows, t.cols),
        }
    }

    /// The `stored_as` label of its dense tensor: `"Q8_0"` or `"Q4_0"`.
    pub fn stored_as(&self) -> &'static str {
        match self {
            QuantTensor::Q8(_) => Q8_STORED_AS,
            QuantTensor::Q4(_) => Q4_STORED_AS,
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        let (rows, cols) = self.shape();
        match self {
            QuantTensor::Q8(_) => q8_bits_per_weight(rows, cols),
            QuantTensor::Q4(_) => q4_bits_per_weight(rows, cols),
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantTensor::Q8(t) => t.dequantize(),
            QuantTensor::Q4(t) => t.dequantize(),
        }
    }
}

/// Dense tensors stored quantized (q8_0 or q4_0), by canonical name.
pub type QuantTensors = BTreeMap<String, QuantTensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_round_trip_with_padding_zeroed() {
        let (rows, cols) = (3, 70);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32) - 5.0)
            .collect();
        let bits = pack_signs(&values, rows, cols);
        assert_eq!(bits.len(), rows * 2);
        let back = unpack_signs(&bits, rows, cols);
        for (v, b) in values.iter().zip(&back) {
            assert_eq!(*b, if *v >= 0.0 { 1.0 } else { -1.0 });
        }
        for r in 0..rows {
            assert_eq!(
                bits[r * 2 + 1] >> 6,
                0,
                "padding bits of row {r} must be zero"
            );
        }
    }
}
