//! q4_0, GGML's 4-bit block format, the one home of it in binllm: the packed file stores it
//! (binllm-format reads and writes [`Q4Matrix`]) and the LM head computes with it. Rows are
//! split into blocks of [`Q4_BLOCK`] weights, `w = scale * (q - 8)` with `q` in 0..=15 and one
//! f16 scale per block, stored as GGML's q4_0 stores a block: 16 bytes, byte `i` holding weight
//! `i` in its low nibble and weight `16 + i` in its high nibble. 4.5 bits per weight: the
//! SmolLM2-135M head (49152 x 576) is 15.9 MB against 30.1 MB in q8_0, and decode reads all of
//! it for every token.
//!
//! One row's product with int16 activations ([`crate::head`] rounds them once per product:
//! error at most 2^-16 of `max|x|` per activation): each block gives eight exact i32 lane sums
//! (lane `l` = the products of weights `2l, 2l + 1, 16 + 2l, 17 + 2l`, as `vpmaddwd` pairs
//! them), which are converted to f32 and fused-multiply-added with the block's scale into one
//! of two accumulators of 8 lanes (even and odd blocks); the row is
//! `hsum(acc0 + acc1) * x_scale` with a fixed horizontal order. [`dot_q4_reference`] does the
//! same arithmetic one lane at a time, so the AVX2 path equals it bit for bit, and it is
//! tested against an f64 product of the dequantized weights. AVX-512 CPUs run the AVX2 path.

use half::f16;

/// Weights per block (one scale each).
pub const Q4_BLOCK: usize = 32;
/// Bytes of 4-bit codes per block.
pub const Q4_BLOCK_BYTES: usize = Q4_BLOCK / 2;

/// A row-major `rows x cols` 4-bit matrix. `codes[(r * blocks_per_row + b) * 16 + i]` holds
/// weight `(r, 32 b + i)` in bits 0..4 and weight `(r, 32 b + 16 + i)` in bits 4..8;
/// `scales[r * blocks_per_row + b]` is the block's scale. Padding weights of a row's last
/// block have `q = 8` (zero).
#[derive(Clone, Debug, PartialEq)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub blocks_per_row: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
}

impl Q4Matrix {
    /// Quantizes a row-major matrix the q4_0 way: per block, `m` = the weight of largest
    /// magnitude (sign kept), `scale = f16(m / -8)`, `q = clamp(round(w / scale) + 8, 0, 15)`
    /// (dividing by the rounded scale, so that quantizing the dequantized matrix gives it
    /// back).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            w.len(),
            rows * cols,
            "Q4Matrix::quantize: w.len() != rows * cols"
        );
        let blocks_per_row = cols.div_ceil(Q4_BLOCK);
        let mut codes = vec![0x88u8; rows * blocks_per_row * Q4_BLOCK_BYTES];
        let mut scales = vec![f16::ZERO; rows * blocks_per_row];
        for r in 0..rows {
            for b in 0..blocks_per_row {
                let (start, end) = (b * Q4_BLOCK, ((b + 1) * Q4_BLOCK).min(cols));
                let block = &w[r * cols + start..r * cols + end];
                let extreme = block
                    .iter()
                    .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let scale = f16::from_f32(extreme / -8.0);
                scales[r * blocks_per_row + b] = scale;
                let scale = scale.to_f32();
                if scale == 0.0 || !scale.is_finite() {
                    continue;
                }
                let out = &mut codes[(r * blocks_per_row + b) * Q4_BLOCK_BYTES..][..Q4_BLOCK_BYTES];
                for (i, &v) in block.iter().enumerate() {
                    let q = ((v / scale).round() + 8.0).clamp(0.0, 15.0) as u8;
                    let byte = &mut out[i % Q4_BLOCK_BYTES];
                    *byte = if i < Q4_BLOCK_BYTES {
                        (*byte & 0xf0) | q
                    } else {
                        (*byte & 0x0f) | (q << 4)
                    };
                }
            }
        }
        Q4Matrix {
            rows,
            cols,
            blocks_per_row,
            codes,
            scales,
        }
    }

    /// The 4-bit code (0..=15) of weight `(r, c)`.
    #[inline]
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let byte = self.codes[(r * self.blocks_per_row + c / Q4_BLOCK) * Q4_BLOCK_BYTES
            + (c % Q4_BLOCK) % Q4_BLOCK_BYTES];
        if c % Q4_BLOCK < Q4_BLOCK_BYTES {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// Row `r` dequantized (`scale * (q - 8)`) into `out` (`cols` floats).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            let scale = self.scales[r * self.blocks_per_row + c / Q4_BLOCK].to_f32();
            *o = scale * (self.code(r, c) as f32 - 8.0);
        }
    }

    /// The dequantized matrix, row-major `rows x cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Bytes a GEMV reads: codes plus f16 scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }
}

/// [`dot_q4_reference`] on the AVX2 path (AVX-512 CPUs take it too).
#[inline(always)]
pub(crate) fn dot_q4_simd(codes: &[u8], scales: &[f16], x_q16: &[i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller asserted that an AVX2 (or AVX-512, which implies it) kernel is
    // available; lengths are checked inside.
    return unsafe { x86::dot_q4_avx2(codes, scales, x_q16) };
    #[cfg(not(target_arch = "x86_64"))]
    dot_q4_reference(codes, scales, x_q16)
}

/// The reference: `sum_b scale_b * sum_i (q[b, i] - 8) * x_q16[b, i]` (unscaled by the
/// activation scale), lane by lane in the order the AVX2 path computes it.
pub fn dot_q4_reference(codes: &[u8], scales: &[f16], x_q16: &[i16]) -> f32 {
    assert_eq!(codes.len(), scales.len() * Q4_BLOCK_BYTES);
    assert_eq!(x_q16.len(), scales.len() * Q4_BLOCK);
    let mut acc = [[0.0f32; 8]; 2];
    for (b, scale) in scales.iter().enumerate() {
        let scale = scale.to_f32();
        let bytes = &codes[b * Q4_BLOCK_BYTES..(b + 1) * Q4_BLOCK_BYTES];
        let x = &x_q16[b * Q4_BLOCK..(b + 1) * Q4_BLOCK];
        for (l, acc) in acc[b % 2].iter_mut().enumerate() {
            let mut lane = 0i32;
            for i in [2 * l, 2 * l + 1] {
                lane += (i32::from(bytes[i] & 0x0f) - 8) * i32::from(x[i]);
                lane += (i32::from(bytes[i] >> 4) - 8) * i32::from(x[16 + i]);
            }
            *acc = (lane as f32).mul_add(scale, *acc);
        }
    }
    let v: [f32; 8] = std::array::from_fn(|l| acc[0][l] + acc[1][l]);
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q4_BLOCK, Q4_BLOCK_BYTES};
    use half::f16;
    use std::arch::x86_64::*;

    /// One block: `acc += f32(lane sums of (q - 8) * x) * scale`.
    #[inline(always)]
    unsafe fn block(c: *const u8, xp: *const i16, scale: __m256, acc: &mut __m256) {
        let bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(c as *const _));
        let eight = _mm256_set1_epi16(8);
        let lo = _mm256_sub_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x0f)), eight);
        let hi = _mm256_sub_epi16(_mm256_srli_epi16::<4>(bytes), eight);
        let x_lo = _mm256_loadu_si256(xp as *const __m256i);
        let x_hi = _mm256_loadu_si256(xp.add(16) as *const __m256i);
        // |q - 8| <= 8 and |x| <= 32767: four products per lane stay far inside i32, and the
        // sums (< 2^21) convert to f32 exactly.
        let lanes = _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, *acc);
    }

    /// # Safety
    /// Requires AVX2, FMA and F16C; lengths are asserted.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_avx2(codes: &[u8], scales: &[f16], x_q16: &[i16]) -> f32 {
        let blocks = scales.len();
        assert_eq!(codes.len(), blocks * Q4_BLOCK_BYTES);
        assert_eq!(x_q16.len(), blocks * Q4_BLOCK);
        let (c, xp, sp) = (codes.as_ptr(), x_q16.as_ptr(), scales.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let full = blocks / 8 * 8;
        let mut b = 0;
        while b < full {
            // SAFETY: blocks b..b + 8 are in bounds (asserted lengths).
            let s8 = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(b) as *const _));
            for k in 0..8 {
                let scale = _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(k as i32));
                block(
                    c.add((b + k) * Q4_BLOCK_BYTES),
                    xp.add((b + k) * Q4_BLOCK),
                    scale,
                    &mut acc[k % 2],
                );
            }
            b += 8;
        }
        while b < blocks {
            let scale = _mm256_set1_ps(scales[b].to_f32());
            // SAFETY: block b is in bounds.
            block(
                c.add(b * Q4_BLOCK_BYTES),
                xp.add(b * Q4_BLOCK),
                scale,
                &mut acc[b % 2],
            );
            b += 1;
        }
        crate::x86::hsum256(_mm256_add_ps(acc[0], acc[1]))
    }
}
