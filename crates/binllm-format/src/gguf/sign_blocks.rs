//! ggml's low-bit block types that can hold a sign matrix, in one place: Q1_0 and Q2_0
//! (written and read), TQ1_0 and TQ2_0 (read), and Q4_0 used as a sign type (written when a
//! row is not a whole number of 64-element blocks).
//!
//! The layouts, as llama.cpp (vendored by llama-cpp-python 0.3.36) defines them in
//! `ggml/src/ggml-common.h` and `ggml-quants.c` (type ids in `ggml/include/ggml.h`):
//!
//! | type | id | elements per block | bytes | layout | value |
//! |---|---|---|---|---|---|
//! | Q1_0 | 41 | 128 | 18 | f16 `d`, then 16 bytes: element `j` is bit `j % 8` of byte `j / 8` | bit 1: `+d`, bit 0: `-d` |
//! | Q2_0 | 42 | 64 | 18 | f16 `d`, then 16 bytes: element `j` is bits `2 (j % 4) ..` of byte `j / 4` | `(q - 1) d`: 0 = `-d`, 1 = 0, 2 = `+d`, 3 = `2d` |
//! | TQ2_0 | 35 | 256 | 66 | 64 bytes, then f16 `d`: element `128 h + 32 l + m` is bits `2 l ..` of byte `32 h + m` | `(q - 1) d` |
//! | TQ1_0 | 34 | 256 | 54 | 48 bytes of 5 trits, 4 bytes of 4 trits, then f16 `d` (see [`tq1_0_codes`]) | `(t - 1) d` |
//! | Q4_0 | 2 | 32 | 18 | f16 `d`, then 16 bytes: element `i` in the low nibble of byte `i`, element `16 + i` in its high nibble | `(q - 8) d` |
//!
//! Q1_0's bit order is binllm's own (`binllm_kernels::layout`: bit `j` of a row's bit stream
//! is bit `j % 8` of byte `j / 8`, 1 = +1), so a Q1_0 row of `cols` elements is binllm's packed
//! row byte for byte, with one f16 scale inserted every 16 bytes. When every block of every
//! row has its row's scale (binllm's own export), a tensor reads as `row_scale * signs`; when
//! they differ (llama-quantize gives each block its mean |w|), as signs with the file's block
//! scales ([`binllm_kernels::BlockScales`]). The 1-bit kernels compute with either.

use anyhow::{bail, ensure, Result};
use half::f16;

use super::dequant::GgmlType;
use crate::packed::{words_per_row, BlockScales};

/// A ggml block type that stores `±scale` exactly, used for a sign matrix's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignBlockType {
    /// 128 signs + one f16 scale: 1.125 bits per weight.
    Q1_0,
    /// 64 two-bit codes + one f16 scale, codes 0 and 2 only: 2.25 bits per weight.
    Q2_0,
    /// 32 four-bit codes + one f16 scale, codes 7 and 9 only: 4.5 bits per weight (written only
    /// when rows are not a multiple of 64).
    Q4_0,
    /// Ternary, 256 two-bit codes + one f16 scale (read only).
    Tq2_0,
    /// Ternary, 256 base-3 trits + one f16 scale (read only).
    Tq1_0,
}

impl SignBlockType {
    pub fn ggml_type(self) -> GgmlType {
        let name = match self {
            SignBlockType::Q1_0 => "Q1_0",
            SignBlockType::Q2_0 => "Q2_0",
            SignBlockType::Q4_0 => "Q4_0",
            SignBlockType::Tq2_0 => "TQ2_0",
            SignBlockType::Tq1_0 => "TQ1_0",
        };
        GgmlType::from_name(name).expect("every sign block type is in ggml's table")
    }

    pub fn name(self) -> &'static str {
        self.ggml_type().name
    }

    pub fn block_size(self) -> usize {
        self.ggml_type().block_size
    }

    /// Stored bits per weight, the block scale included.
    pub fn bits_per_weight(self) -> f64 {
        let t = self.ggml_type();
        (t.type_size * 8) as f64 / t.block_size as f64
    }

    /// The smallest type that stores `±scale` exactly for rows of `cols` elements: Q1_0 when
    /// `cols` is a multiple of 128, else Q2_0 (multiple of 64), else Q4_0 (multiple of 32).
    pub fn smallest_for(cols: usize) -> Option<SignBlockType> {
        [
            SignBlockType::Q1_0,
            SignBlockType::Q2_0,
            SignBlockType::Q4_0,
        ]
        .into_iter()
        .find(|t| cols > 0 && cols.is_multiple_of(t.block_size()))
    }

    /// The types a GGUF block linear can be read from as sign bits.
    pub fn readable(ty: GgmlType) -> Option<SignBlockType> {
        match ty.name {
            "Q1_0" => Some(SignBlockType::Q1_0),
            "Q2_0" => Some(SignBlockType::Q2_0),
            "TQ2_0" => Some(SignBlockType::Tq2_0),
            "TQ1_0" => Some(SignBlockType::Tq1_0),
            _ => None,
        }
    }
}

/// Whether element `c` of a packed row is +1.
fn sign_bit(row: &[u64], c: usize) -> bool {
    (row[c / 64] >> (c % 64)) & 1 == 1
}

/// Encodes a sign matrix (binllm's packed bits, `rows x cols`) with one scale per row and,
/// where it has them, one per block of columns: the block of row `r` at column `c` gets
/// `f16(row_scale[r] * block_scale[r, c / block_cols])`, exact when that product is an f16
/// value (row scales of f16 values and no block scales, or block scales and row scales of 1,
/// as binllm reads a GGUF). A ggml block must lie inside one block of scales.
pub fn encode_signs(
    ty: SignBlockType,
    sign_bits: &[u64],
    row_scale: &[f32],
    block_scales: Option<&BlockScales>,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>> {
    let block = ty.block_size();
    ensure!(
        cols.is_multiple_of(block),
        "{cols} columns are not a whole number of {} blocks of {block}",
        ty.name()
    );
    let wpr = words_per_row(cols);
    ensure!(
        sign_bits.len() == rows * wpr && row_scale.len() == rows,
        "a {rows}x{cols} sign matrix needs {} words and {rows} scales, got {} and {}",
        rows * wpr,
        sign_bits.len(),
        row_scale.len()
    );
    if let Some(b) = block_scales {
        b.check(rows, cols).map_err(anyhow::Error::msg)?;
        ensure!(
            b.block_cols.is_multiple_of(block),
            "a scale per {} columns cannot be written as {} (blocks of {block})",
            b.block_cols,
            ty.name()
        );
    }
    let type_size = ty.ggml_type().type_size;
    let mut out = Vec::with_capacity(rows * cols / block * type_size);
    for (r, (row, &scale)) in sign_bits
        .chunks_exact(wpr.max(1))
        .zip(row_scale)
        .enumerate()
    {
        for start in (0..cols).step_by(block) {
            let block_scale = block_scales.map_or(1.0, |b| b.row(r)[start / b.block_cols].to_f32());
            let d = f16::from_f32(scale * block_scale).to_le_bytes();
            let positive = |j: usize| sign_bit(row, start + j);
            out.extend_from_slice(&d);
            match ty {
                SignBlockType::Q1_0 => {
                    // Bit j % 8 of byte j / 8: binllm's own order, so whole bytes copy over.
                    let words = &row[start / 64..start / 64 + 2];
                    out.extend(words.iter().flat_map(|w| w.to_le_bytes()));
                }
                SignBlockType::Q2_0 => {
                    for byte in 0..16 {
                        let code = |k: usize| if positive(4 * byte + k) { 2u8 } else { 0 };
                        out.push((0..4).fold(0, |acc, k| acc | code(k) << (2 * k)));
                    }
                }
                SignBlockType::Q4_0 => {
                    let code = |j: usize| if positive(j) { 9u8 } else { 7 };
                    out.extend((0..16).map(|i| code(i) | code(16 + i) << 4));
                }
                SignBlockType::Tq1_0 | SignBlockType::Tq2_0 => {
                    bail!(
                        "binllm writes sign matrices as Q1_0, Q2_0 or Q4_0, not {}",
                        ty.name()
                    )
                }
            }
        }
    }
    Ok(out)
}

/// A block type's codes (`q` with value `(q - offset) d`) and scales, decoded.
struct Codes {
    /// One code per element, row-major.
    codes: Vec<u8>,
    /// One scale per block, row-major.
    scales: Vec<f16>,
}

/// TQ1_0 trits of one block in element order (ggml's `dequantize_row_tq1_0`): 32 bytes of
/// five trits each (trit `n` of byte `m` is element `32 n + m`), 16 bytes of five (element
/// `160 + 16 n + m`), then 4 bytes of four (element `240 + 4 n + j`). A byte holds its trits
/// as a fixed-point fraction: trit `n` is `((byte * 3^n mod 256) * 3) >> 8`.
fn tq1_0_codes(block: &[u8], out: &mut Vec<u8>) {
    let trit = |byte: u8, n: u32| ((byte.wrapping_mul(3u8.pow(n)) as u16 * 3) >> 8) as u8;
    for (start, len) in [(0usize, 32usize), (32, 16)] {
        for n in 0..5 {
            out.extend(block[start..start + len].iter().map(|&b| trit(b, n)));
        }
    }
    for n in 0..4 {
        out.extend(block[48..52].iter().map(|&b| trit(b, n)));
    }
}

fn decode_codes(ty: SignBlockType, bytes: &[u8], n_elements: usize) -> Result<Codes> {
    let t = ty.ggml_type();
    let expected = t.byte_size(n_elements as u64);
    ensure!(
        expected == Some(bytes.len() as u64),
        "{n_elements} elements of {} need {} bytes, but the tensor has {}",
        t.name,
        expected.map_or_else(
            || format!("a whole number of {}-element blocks and", t.block_size),
            |b| b.to_string()
        ),
        bytes.len()
    );
    let mut codes = Vec::with_capacity(n_elements);
    let mut scales = Vec::with_capacity(n_elements / t.block_size);
    let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
    for block in bytes.chunks_exact(t.type_size) {
        match ty {
            SignBlockType::Q1_0 => {
                scales.push(f16_at(block, 0));
                codes.extend((0..128).map(|j| (block[2 + j / 8] >> (j % 8)) & 1));
            }
            SignBlockType::Q2_0 => {
                scales.push(f16_at(block, 0));
                codes.extend((0..64).map(|j| (block[2 + j / 4] >> (2 * (j % 4))) & 3));
            }
            SignBlockType::Q4_0 => {
                scales.push(f16_at(block, 0));
                codes.extend((0..16).map(|i| block[2 + i] & 0x0F));
                codes.extend((0..16).map(|i| block[2 + i] >> 4));
            }
            SignBlockType::Tq2_0 => {
                scales.push(f16_at(block, 64));
                for half in 0..2 {
                    for l in 0..4 {
                        codes.extend((0..32).map(|m| (block[32 * half + m] >> (2 * l)) & 3));
                    }
                }
            }
            SignBlockType::Tq1_0 => {
                scales.push(f16_at(block, 52));
                tq1_0_codes(block, &mut codes);
            }
        }
    }
    Ok(Codes { codes, scales })
}

/// Which code means +1 and which -1 in each type.
fn sign_codes(ty: SignBlockType) -> (u8, u8) {
    match ty {
        SignBlockType::Q1_0 => (1, 0),
        SignBlockType::Q2_0 | SignBlockType::Tq2_0 | SignBlockType::Tq1_0 => (2, 0),
        SignBlockType::Q4_0 => (9, 7),
    }
}

/// Values of a block tensor of one of these types as floats, as ggml's `dequantize_row_*`
/// computes them (`code_value * d`).
pub fn dequantize(ty: SignBlockType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let Codes { codes, scales } = decode_codes(ty, bytes, n_elements)?;
    let offset = match ty {
        SignBlockType::Q1_0 => {
            return Ok(codes
                .chunks_exact(128)
                .zip(&scales)
                .flat_map(|(c, d)| {
                    let d = d.to_f32();
                    c.iter().map(move |&bit| if bit == 1 { d } else { -d })
                })
                .collect())
        }
        SignBlockType::Q4_0 => 8,
        _ => 1,
    };
    let block = ty.block_size();
    Ok(codes
        .chunks_exact(block)
        .zip(&scales)
        .flat_map(|(c, d)| {
            let d = d.to_f32();
            c.iter().map(move |&q| (q as i32 - offset) as f32 * d)
        })
        .collect())
}

/// A sign matrix read back from blocks: binllm's packed bits, one scale per row, and the
/// block scales when the blocks of a row differ (then the row scales are 1).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSigns {
    pub sign_bits: Vec<u64>,
    pub row_scale: Vec<f32>,
    pub block_scales: Option<BlockScales>,
}

/// Reads a `rows x cols` block tensor as signs times scales, exactly, or says why it is not a
/// sign matrix: a code other than the two sign codes (a zero or `2d` weight of a ternary or
/// 2-bit matrix). When every block of each row has the same scale (binllm's own export), the
/// result has one scale per row and no block scales, which keeps the row-scaled kernels;
/// otherwise (llama-quantize's files) it keeps the file's scale per block.
pub fn decode_signs(
    ty: SignBlockType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<DecodedSigns> {
    ensure!(
        cols > 0 && cols.is_multiple_of(ty.block_size()),
        "rows of {cols} elements are not a whole number of {} blocks of {}",
        ty.name(),
        ty.block_size()
    );
    let Codes { codes, scales } = decode_codes(ty, bytes, rows * cols)?;
    let (plus, minus) = sign_codes(ty);
    let wpr = words_per_row(cols);
    let blocks_per_row = cols / ty.block_size();
    let one_scale_per_row = scales
        .chunks_exact(blocks_per_row)
        .all(|row| row.iter().all(|s| s.to_bits() == row[0].to_bits()));
    let (row_scale, block_scales) = if one_scale_per_row {
        let row_scale = scales
            .chunks_exact(blocks_per_row)
            .map(|row| row[0].to_f32())
            .collect();
        (row_scale, None)
    } else {
        let block_scales = BlockScales::new(ty.block_size(), cols, scales);
        (vec![1.0; rows], Some(block_scales))
    };
    let mut sign_bits = vec![0u64; rows * wpr];
    for r in 0..rows {
        let row_bits = &mut sign_bits[r * wpr..(r + 1) * wpr];
        for (c, &q) in codes[r * cols..(r + 1) * cols].iter().enumerate() {
            if q == plus {
                row_bits[c / 64] |= 1u64 << (c % 64);
            } else if q != minus {
                bail!(
                    "element ({r}, {c}) has code {q}, which is neither +d ({plus}) nor -d \
                     ({minus}): not a sign matrix"
                );
            }
        }
    }
    Ok(DecodedSigns {
        sign_bits,
        row_scale,
        block_scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_type_follows_the_row_width() {
        assert_eq!(SignBlockType::smallest_for(256), Some(SignBlockType::Q1_0));
        assert_eq!(SignBlockType::smallest_for(576), Some(SignBlockType::Q2_0));
        assert_eq!(SignBlockType::smallest_for(1536), Some(SignBlockType::Q1_0));
        assert_eq!(SignBlockType::smallest_for(96), Some(SignBlockType::Q4_0));
        assert_eq!(SignBlockType::smallest_for(100), None);
        assert_eq!(SignBlockType::Q1_0.bits_per_weight(), 1.125);
        assert_eq!(SignBlockType::Q2_0.bits_per_weight(), 2.25);
    }
}
