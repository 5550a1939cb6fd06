//! q8_0, GGML's 8-bit block format, the one home of it in binllm: the packed file stores it
//! (binllm-format reads and writes [`Q8Matrix`]) and the LM head computes with it. Rows are
//! split into blocks of [`Q8_BLOCK`] weights with one scale each, `w ~ scale * q` with `q` in
//! -127..=127 and `scale = max|w| / 127` rounded to f16 (files hold f16 scales; in memory they
//! are those f16 values widened to f32, the width the products read).
//!
//! This module also holds one row's product with int16 activations ([`crate::head`] rounds
//! them, per-vector scale `max|x| / 32767`, an error of at most 2^-16 of `max|x|` per
//! activation, far below the weights' own rounding): a block is one sign-extend, one
//! `vpmaddwd`, one int-to-float conversion and one FMA; converting int8 weights to f32 instead
//! made the GEMV compute-bound. The portable path does the same in plain Rust (integer block
//! sums vectorise well); the scalar path keeps f32 activations and is the reference.
//!
//! Why: the f16 head of SmolLM2-135M (49152 x 576) is 57 MB read per token, more than the
//! whole 1-bit body; q8_0 halves that (1.125 bytes per weight with f32 block scales in memory)
//! and the GEMV stays memory-bound, so it is about twice as fast.

use crate::dense::DenseKernel;
use half::f16;

/// Weights per block (one scale each).
pub const Q8_BLOCK: usize = 32;

/// A row-major `rows x cols` int8 matrix with one f32 scale per 32 weights of a row. Rows are
/// padded to whole blocks with `q = 0`; `quants[r * blocks_per_row * 32 + 32 * b + i]` is weight
/// `(r, 32 * b + i)` and `scales[r * blocks_per_row + b]` its block's scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub blocks_per_row: usize,
    pub quants: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes a row-major matrix given as any values convertible to f32 (f32 or f16), the
    /// q8_0 way: per block `scale = f16(max|w| / 127)` and `q = round(w / scale)`, dividing by
    /// the rounded scale so that quantizing the dequantized matrix gives it back (what writing
    /// a model read from a file again does) whenever the scales are normal f16 numbers.
    pub fn quantize<E: crate::dense::DenseElement>(w: &[E], rows: usize, cols: usize) -> Self {
        assert_eq!(
            w.len(),
            rows * cols,
            "Q8Matrix::quantize: w.len() != rows * cols"
        );
        let blocks_per_row = cols.div_ceil(Q8_BLOCK);
        let mut quants = vec![0i8; rows * blocks_per_row * Q8_BLOCK];
        let mut scales = vec![0.0f32; rows * blocks_per_row];
        for r in 0..rows {
            for b in 0..blocks_per_row {
                let (start, end) = (b * Q8_BLOCK, ((b + 1) * Q8_BLOCK).min(cols));
                let block = &w[r * cols + start..r * cols + end];
                let max_abs = block.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
                let scale = f16::from_f32(max_abs / 127.0).to_f32();
                scales[r * blocks_per_row + b] = scale;
                if scale == 0.0 {
                    continue;
                }
                let out = &mut quants[(r * blocks_per_row + b) * Q8_BLOCK..];
                for (q, v) in out.iter_mut().zip(block) {
                    *q = (v.to_f32() / scale).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Q8Matrix {
            rows,
            cols,
            blocks_per_row,
            quants,
            scales,
        }
    }

    /// Row `r`, dequantized into `out` (`cols` floats): the embedding lookup of a q8_0 table.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let blocks = self.blocks_per_row;
        let quants = &self.quants[r * blocks * Q8_BLOCK..];
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = self.scales[r * blocks + c / Q8_BLOCK] * f32::from(quants[c]);
        }
    }

    /// The dequantized matrix (`scale * q`), row-major `rows x cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Bytes a GEMV reads: quants plus scales.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }
}

/// One row of `W x` with `kernel`: the scalar reference reads `x`, every other path the int16
/// activations `x_q16` (whole blocks) and their scale.
#[inline(always)]
pub(crate) fn dot_q8(
    kernel: DenseKernel,
    quants: &[i8],
    scales: &[f32],
    x: &[f32],
    x_q16: &[i16],
    x_scale: f32,
) -> f32 {
    match kernel {
        // SAFETY: callers assert the kernel is available; `x_q16` covers whole blocks.
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx512 => unsafe { x86::dot_q8_avx512bw(quants, scales, x_q16) * x_scale },
        DenseKernel::Avx512Vnni | DenseKernel::Avx2Int8 => {
            unreachable!("int8 activations take crate::head_i8")
        }
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx2 => unsafe { x86::dot_q8_avx2(quants, scales, x_q16) * x_scale },
        DenseKernel::Scalar => dot_q8_scalar(quants, scales, x),
        _ => dot_q8_portable(quants, scales, x_q16) * x_scale,
    }
}

/// Reference: f32 activations, one element at a time.
fn dot_q8_scalar(quants: &[i8], scales: &[f32], x: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (j, &xj) in x.iter().enumerate() {
        sum += scales[j / Q8_BLOCK] * quants[j] as f32 * xj;
    }
    sum
}

/// Exact i32 block sums of int8 weights times int16 activations, scaled per block.
fn dot_q8_portable(quants: &[i8], scales: &[f32], x_q16: &[i16]) -> f32 {
    let mut sum = 0.0f32;
    for ((q, &block_scale), xb) in quants
        .chunks_exact(Q8_BLOCK)
        .zip(scales)
        .zip(x_q16.chunks_exact(Q8_BLOCK))
    {
        let block: i32 = q.iter().zip(xb).map(|(&q, &x)| q as i32 * x as i32).sum();
        sum += block_scale * block as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Q8_BLOCK;
    use std::arch::x86_64::*;

    /// Unscaled by the activation scale: `sum_b scale[b] * sum_i q[b, i] * x_q16[b, i]`.
    ///
    /// # Safety
    /// Requires AVX-512F and AVX-512BW; `quants.len() == 32 * scales.len() == x_q16.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_q8_avx512bw(quants: &[i8], scales: &[f32], x_q16: &[i16]) -> f32 {
        assert_eq!(quants.len(), scales.len() * Q8_BLOCK);
        assert_eq!(quants.len(), x_q16.len());
        let (q, xp) = (quants.as_ptr(), x_q16.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        for (b, &block_scale) in scales.iter().enumerate() {
            let base = b * Q8_BLOCK;
            // SAFETY: base + 32 <= quants.len() == x_q16.len().
            let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q.add(base) as *const __m256i));
            // |w * x| <= 127 * 32767, so pair sums fit i32 and convert to f32 exactly (< 2^24).
            let pair_sums = _mm512_madd_epi16(w, _mm512_loadu_si512(xp.add(base) as *const _));
            // Alternate accumulators so consecutive blocks do not wait on each other.
            acc[b % 2] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(pair_sums),
                _mm512_set1_ps(block_scale),
                acc[b % 2],
            );
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// As [`dot_q8_avx512bw`] with 256-bit vectors.
    ///
    /// # Safety
    /// Requires AVX2 and FMA; `quants.len() == 32 * scales.len() == x_q16.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_avx2(quants: &[i8], scales: &[f32], x_q16: &[i16]) -> f32 {
        assert_eq!(quants.len(), scales.len() * Q8_BLOCK);
        assert_eq!(quants.len(), x_q16.len());
        let (q, xp) = (quants.as_ptr(), x_q16.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        for (b, &block_scale) in scales.iter().enumerate() {
            let base = b * Q8_BLOCK;
            let mut pair_sums = _mm256_setzero_si256();
            for half in 0..2 {
                let offset = base + 16 * half;
                // SAFETY: offset + 16 <= quants.len() == x_q16.len().
                let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(offset) as *const __m128i));
                let x = _mm256_loadu_si256(xp.add(offset) as *const __m256i);
                // Two products of at most 127 * 32767 per lane per half: the i32 sums stay exact.
                pair_sums = _mm256_add_epi32(pair_sums, _mm256_madd_epi16(w, x));
            }
            acc[b % 2] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(pair_sums),
                _mm256_set1_ps(block_scale),
                acc[b % 2],
            );
        }
        crate::x86::hsum256(_mm256_add_ps(acc[0], acc[1]))
    }
}
