//! Scalar reference kernels: one element at a time, in column order, so they are obviously
//! correct. Every fast path is tested against these, and these against a float64 dense product.

use crate::layout::{PackedMatrix, BITS_PER_WORD};

/// `sum_j B[r, j] * x[j]` for row `r`, accumulated in column order in f32.
pub fn row_dot(m: &PackedMatrix, r: usize, x: &[f32]) -> f32 {
    let row = m.row_bits(r);
    let mut acc = 0.0f32;
    for (j, &xj) in x.iter().enumerate().take(m.cols) {
        let bit = (row[j / BITS_PER_WORD] >> (j % BITS_PER_WORD)) & 1;
        acc += if bit == 1 { xj } else { -xj };
    }
    acc
}

/// `y[r - row_start] = scale[r] * row_dot(r)` for rows `row_start..row_start + y.len()`.
pub fn gemv_rows(m: &PackedMatrix, x: &[f32], row_start: usize, y: &mut [f32]) {
    for (i, out) in y.iter_mut().enumerate() {
        let r = row_start + i;
        *out = m.scales[r] * row_dot(m, r, x);
    }
}
