//! aarch64 NEON row-major kernel, the same selection scheme as the x86 paths: each byte of a
//! weight word is broadcast and tested against per-lane bit masks (`vtst`), the resulting lane
//! masks AND the activations, and the caller finishes with `2 * s1 - sum_j x`.

#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

/// Sums of the activations whose sign bit is 1, for `T` input vectors at once: `out[i][t]`
/// receives the sum for row `i` of `bits` (`words_per_row` words per row) and vector `t`.
///
/// # Safety
/// The CPU must support NEON (always true on aarch64-unknown-linux-gnu), and every `xs[t]`
/// must hold at least `64 * words_per_row` floats.
#[target_feature(enable = "neon")]
pub unsafe fn selected_sums_neon<const T: usize>(
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
        *out = row_neon(&bits[r * words_per_row..(r + 1) * words_per_row], xs);
    }
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn row_neon<const T: usize>(row: &[u64], xs: &[&[f32]; T]) -> [f32; T] {
    let low_nibble_bits: [u32; 4] = [1, 2, 4, 8];
    let high_nibble_bits: [u32; 4] = [16, 32, 64, 128];
    let low_bits = vld1q_u32(low_nibble_bits.as_ptr());
    let high_bits = vld1q_u32(high_nibble_bits.as_ptr());
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for (w, &word) in row.iter().enumerate() {
        for byte in 0..8 {
            let byte_bits = vdupq_n_u32(((word >> (8 * byte)) & 0xff) as u32);
            let select_low = vtstq_u32(byte_bits, low_bits);
            let select_high = vtstq_u32(byte_bits, high_bits);
            let base = w * 64 + byte * 8;
            // Alternate accumulator pairs between even and odd bytes to hide the add latency.
            let pair = 2 * (byte & 1);
            for t in 0..T {
                // SAFETY: base + 8 <= 64 * row.len() <= xs[t].len() (asserted by the caller).
                let x_low = vld1q_f32(xs[t].as_ptr().add(base));
                let x_high = vld1q_f32(xs[t].as_ptr().add(base + 4));
                let picked_low =
                    vreinterpretq_f32_u32(vandq_u32(select_low, vreinterpretq_u32_f32(x_low)));
                let picked_high =
                    vreinterpretq_f32_u32(vandq_u32(select_high, vreinterpretq_u32_f32(x_high)));
                acc[t][pair] = vaddq_f32(acc[t][pair], picked_low);
                acc[t][pair + 1] = vaddq_f32(acc[t][pair + 1], picked_high);
            }
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        let sum = vaddq_f32(
            vaddq_f32(acc[t][0], acc[t][1]),
            vaddq_f32(acc[t][2], acc[t][3]),
        );
        out[t] = vaddvq_f32(sum);
    }
    out
}
