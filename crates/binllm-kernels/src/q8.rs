//! q8_0-style int8 dense GEMV for the LM head: rows are split into blocks of 32 weights with
//! one scale each (`w ~ scale * q`, `q` in -127..=127, `scale = max|w| / 127`), like GGML's
//! q8_0. The fast paths quantize the activations to int16 once per product (per-vector scale
//! `max|x| / 32767`, an error of at most 2^-16 of `max|x|` per activation, far below the
//! weights' own rounding) so that a block is one sign-extend, one `vpmaddwd`, one int-to-float
//! conversion and one FMA; converting int8 weights to f32 instead made the GEMV compute-bound.
//! The portable path does the same in plain Rust (integer block sums vectorise well); the
//! scalar path keeps f32 activations and is the reference.
//!
//! Why: the f16 head of SmolLM2-135M (49152 x 576) is 57 MB read per token, more than the
//! whole 1-bit body; q8_0 halves that (1.125 bytes per weight with f32 block scales) and the
//! GEMV stays memory-bound, so it is about twice as fast.

use crate::dense::DenseKernel;
use crate::head_i8::HeadFormat;

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
    /// Quantizes a row-major matrix given as any values convertible to f32 (f32 or f16).
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
                let block_scale = max_abs / 127.0;
                scales[r * blocks_per_row + b] = block_scale;
                if block_scale == 0.0 {
                    continue;
                }
                let inverse = 1.0 / block_scale;
                let out = &mut quants[(r * blocks_per_row + b) * Q8_BLOCK..];
                for (q, v) in out.iter_mut().zip(block) {
                    *q = (v.to_f32() * inverse).round().clamp(-127.0, 127.0) as i8;
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

    /// The dequantized matrix (`scale * q`), row-major `rows x cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = r * self.blocks_per_row + c / Q8_BLOCK;
                out.push(self.scales[b] * self.quants[b * Q8_BLOCK + c % Q8_BLOCK] as f32);
            }
        }
        out
    }

    /// Bytes a GEMV reads: quants plus scales.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }
}

/// `y = W x` with the fastest available kernel.
pub fn gemv_q8(m: &Q8Matrix, x: &[f32], y: &mut [f32]) {
    gemv_q8_with(DenseKernel::best(), m, x, y)
}

/// `y = W x` with a chosen kernel (panics if it is unavailable).
pub fn gemv_q8_with(kernel: DenseKernel, m: &Q8Matrix, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "gemv_q8: x.len() != cols");
    assert_eq!(y.len(), m.rows, "gemv_q8: y.len() != rows");
    gemm_q8_with(kernel, m, x, 1, y)
}

/// Rows per tile of the multi-vector product: a tile of a q8 head row block (64 x 576 weights,
/// 37 KB) stays in L2 while every vector passes over it, so the matrix is read once per call
/// instead of once per vector.
const GEMM_ROW_TILE: usize = 64;

/// `ys[t * rows + r] = (W xs[t])[r]` for `n` vectors `xs` (row-major `n x cols`): the same
/// numbers as `n` calls of [`gemv_q8_with`], computed tile by tile so each weight is read once.
pub fn gemm_q8_with(kernel: DenseKernel, m: &Q8Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    gemm_q8_rows(kernel, m, 0..m.rows, xs, n, ys)
}

/// [`gemm_q8_with`] for the rows `rows` of `m` only: `ys` is `n x rows.len()`. A thread that
/// owns some rows of the head computes them with this.
pub fn gemm_q8_rows(
    kernel: DenseKernel,
    m: &Q8Matrix,
    rows: std::ops::Range<usize>,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    assert_eq!(xs.len(), n * m.cols, "gemm_q8: xs.len() != n * cols");
    assert!(rows.end <= m.rows, "gemm_q8: rows past the matrix");
    assert_eq!(ys.len(), n * rows.len(), "gemm_q8: ys.len() != n * rows");
    assert!(
        kernel.is_available(),
        "dense kernel {} is not available on this CPU",
        kernel.name()
    );
    let row_len = m.blocks_per_row * Q8_BLOCK;
    let activations = Activations::new(kernel, xs, n, m.cols, m.blocks_per_row, HeadFormat::Q8_0);
    let width = rows.len();
    for tile_start in rows.clone().step_by(GEMM_ROW_TILE) {
        let tile = tile_start..(tile_start + GEMM_ROW_TILE).min(rows.end);
        let at = tile.start - rows.start;
        for t in 0..n {
            let out = &mut ys[t * width + at..t * width + at + tile.len()];
            match &activations {
                Activations::Int8(x) => {
                    crate::head_i8::rows_q8(kernel, m, tile.clone(), &x[t], out)
                }
                Activations::Int16 { quants, scales } => {
                    for (out, r) in out.iter_mut().zip(tile.clone()) {
                        *out = dot_q8(
                            kernel,
                            &m.quants[r * row_len..(r + 1) * row_len],
                            &m.scales[r * m.blocks_per_row..(r + 1) * m.blocks_per_row],
                            &xs[t * m.cols..(t + 1) * m.cols],
                            &quants[t * row_len..(t + 1) * row_len],
                            scales[t],
                        );
                    }
                }
            }
        }
    }
}

/// The input vectors as a kernel reads them, quantized once per product and shared by every
/// row: int8 per block for the int8 kernels ([`DenseKernel::int8_activations`],
/// [`crate::head_i8`]), otherwise int16
/// per vector (which the scalar reference ignores: it reads the f32 vectors).
pub(crate) enum Activations {
    Int8(Vec<crate::head_i8::I8Activations>),
    Int16 { quants: Vec<i16>, scales: Vec<f32> },
}

impl Activations {
    pub(crate) fn new(
        kernel: DenseKernel,
        xs: &[f32],
        n: usize,
        cols: usize,
        blocks_per_row: usize,
        format: HeadFormat,
    ) -> Self {
        let vectors = xs.chunks_exact(cols.max(1)).take(n);
        if kernel.int8_activations() {
            return Activations::Int8(
                vectors
                    .map(|x| crate::head_i8::I8Activations::new(x, blocks_per_row, format))
                    .collect(),
            );
        }
        let row_len = blocks_per_row * Q8_BLOCK;
        let mut quants = vec![0i16; n * row_len];
        let scales = vectors
            .zip(quants.chunks_exact_mut(row_len.max(1)))
            .map(|(x, q)| quantize_i16(x, q))
            .collect();
        Activations::Int16 { quants, scales }
    }
}

/// Symmetric per-vector int16 quantization: `x[j] ~ scale * q[j]`; `q` past `x.len()` is 0.
pub(crate) fn quantize_i16(x: &[f32], q: &mut [i16]) -> f32 {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max_abs == 0.0 || !max_abs.is_finite() {
        q.fill(0);
        return if max_abs == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 32767.0 / max_abs;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inverse).round().clamp(-32767.0, 32767.0) as i16;
    }
    q[x.len()..].fill(0);
    max_abs / 32767.0
}

/// One row of `W x` with `kernel`: the scalar reference reads `x`, every other path the int16
/// activations `x_q16` (whole blocks) and their scale.
#[inline(always)]
fn dot_q8(
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
