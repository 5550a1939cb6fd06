//! x86-64 row-major kernels (AVX2 + FMA, AVX-512F).
//!
//! Both compute `s1 = sum_{j: bit = 1} x[j]` for a row and let the caller finish with
//! `sum_j B x = 2 * s1 - sum_j x`: selecting (masking) is one instruction per vector of
//! columns, whereas negating needs a select plus a sign flip. `x` is zero-padded to whole words
//! by the caller, so padding bits select zeros and never change a result.
//!
//! `T` input vectors are processed per pass over a row so that GEMM expands each weight word
//! into masks once and reuses them `T` times.

#![allow(clippy::needless_range_loop)] // index loops over the `T` vectors unroll cleanly

use std::arch::x86_64::*;

/// AVX-512F: one 64-bit word is four 16-lane masks; each masked add selects the lanes whose
/// bit is 1 straight from the k-register.
///
/// `out[i][t]` receives the sum for row `i` of `bits` (`words_per_row` words per row) and
/// vector `t`.
///
/// # Safety
/// The CPU must support AVX-512F, and every `xs[t]` must hold at least `64 * words_per_row` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn selected_sums_avx512<const T: usize>(
    bits: &[u64],
    words_per_row: usize,
    xs: &[&[f32]; T],
    out: &mut [[f32; T]],
) {
    assert_eq!(bits.len(), out.len() * words_per_row);
    for x in xs {
        assert!(x.len() >= words_per_row * 64);
    }
    for (r, out) in out.iter_mut().enumerate() {
        *out = row_avx512(&bits[r * words_per_row..(r + 1) * words_per_row], xs);
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_avx512<const T: usize>(row: &[u64], xs: &[&[f32]; T]) -> [f32; T] {
    // Four accumulators per vector (one per 16-lane quarter of a word) hide the add latency.
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
    for (w, &word) in row.iter().enumerate() {
        let base = w * 64;
        for quarter in 0..4 {
            let lane_mask = (word >> (16 * quarter)) as __mmask16;
            for t in 0..T {
                // SAFETY: base + 16 * quarter + 16 <= 64 * row.len() <= xs[t].len() (asserted
                // by the caller).
                let xv = _mm512_loadu_ps(xs[t].as_ptr().add(base + 16 * quarter));
                acc[t][quarter] =
                    _mm512_mask_add_ps(acc[t][quarter], lane_mask, acc[t][quarter], xv);
            }
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        let sum = _mm512_add_ps(
            _mm512_add_ps(acc[t][0], acc[t][1]),
            _mm512_add_ps(acc[t][2], acc[t][3]),
        );
        out[t] = _mm512_reduce_add_ps(sum);
    }
    out
}

/// AVX2: a 32-bit half word is broadcast to 8 lanes and shifted left by a per-lane count so that
/// lane `j` of group `g` gets bit `8 g + j` in its sign position, which `blendv` selects on.
///
/// Same contract as [`selected_sums_avx512`].
///
/// # Safety
/// The CPU must support AVX2 and FMA, and every `xs[t]` must hold at least `64 * words_per_row` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn selected_sums_avx2<const T: usize>(
    bits: &[u64],
    words_per_row: usize,
    xs: &[&[f32]; T],
    out: &mut [[f32; T]],
) {
    assert_eq!(bits.len(), out.len() * words_per_row);
    for x in xs {
        assert!(x.len() >= words_per_row * 64);
    }
    for (r, out) in out.iter_mut().enumerate() {
        *out = row_avx2(&bits[r * words_per_row..(r + 1) * words_per_row], xs);
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn row_avx2<const T: usize>(row: &[u64], xs: &[&[f32]; T]) -> [f32; T] {
    let shift_for_group = [
        _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
        _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
        _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
        _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
    ];
    let zero = _mm256_setzero_ps();
    let mut acc = [[zero; 4]; T];
    for (w, &word) in row.iter().enumerate() {
        for half in 0..2 {
            let half_bits = _mm256_set1_epi32((word >> (32 * half)) as u32 as i32);
            let base = w * 64 + half * 32;
            for group in 0..4 {
                let select =
                    _mm256_castsi256_ps(_mm256_sllv_epi32(half_bits, shift_for_group[group]));
                for t in 0..T {
                    // SAFETY: base + 8 * group + 8 <= 64 * row.len() <= xs[t].len() (asserted
                    // by the caller).
                    let xv = _mm256_loadu_ps(xs[t].as_ptr().add(base + 8 * group));
                    acc[t][group] =
                        _mm256_add_ps(acc[t][group], _mm256_blendv_ps(zero, xv, select));
                }
            }
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        let sum = _mm256_add_ps(
            _mm256_add_ps(acc[t][0], acc[t][1]),
            _mm256_add_ps(acc[t][2], acc[t][3]),
        );
        out[t] = hsum256(sum);
    }
    out
}

#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let single = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
    _mm_cvtss_f32(single)
}
