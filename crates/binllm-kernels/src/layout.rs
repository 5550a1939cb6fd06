//! The canonical packed sign-bit layout, which the packed file stores as is (`docs/FORMAT.md`
//! quotes this) and the row-major kernels read directly.
//!
//! A linear layer `y = W x` with `W` of shape `rows x cols` (out x in) is stored as sign bits
//! `B` in {-1, +1}^(rows x cols) and one scale per output row, `W[r, j] = scale[r] * B[r, j]`:
//!
//! - Row-major; each row is padded to whole 64-bit words: `words_per_row = ceil(cols / 64)`, so
//!   the matrix is `rows * words_per_row` u64 words. Words are little-endian in files.
//! - Bit `j` (LSB = 0) of word `w` of row `r` is the sign of element `(r, 64 * w + j)`:
//!   bit 1 means +1, bit 0 means -1. Upstream `sign(0) = +1` ([`pack_signs`] maps +0.0, -0.0
//!   and NaN to +1, only values `< 0` to -1).
//! - Padding bits (columns `cols..64 * words_per_row` of a row) are written as 0, and no kernel
//!   lets them affect a result whatever their value (the kernels give padding columns zero
//!   activation; the tests set them to garbage).
//! - One scale per row; files store it as f16, the kernels take f32.
//!
//! Products: `y[r] = scale[r] * sum_j B[r, j] * x[j]`. The mask kernels use the identity
//! `sum_j B[r, j] x[j] = 2 * sum_{j: bit = 1} x[j] - sum_j x[j]`.
//!

/// Number of sign bits per storage word.
pub const BITS_PER_WORD: usize = 64;

/// A `rows x cols` matrix of signs in {-1, +1} with one f32 scale per row.
///
/// Canonical layout: row-major, each row padded to whole 64-bit words
/// (`words_per_row = ceil(cols / 64)`); bit `j` (LSB = 0) of word `w` of row `r` is the sign of
/// element `(r, 64 * w + j)`; bit 1 means +1, bit 0 means -1. Padding bits are written as 0 by
/// [`pack_signs`], but the kernels never let them affect a result whatever their value.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub words_per_row: usize,
    /// `rows * words_per_row` words; row `r` is `bits[r * words_per_row..(r + 1) * words_per_row]`.
    pub bits: Vec<u64>,
    /// One scale per output row: `y[r] = scales[r] * sum_j B[r, j] * x[j]`.
    pub scales: Vec<f32>,
}

/// `ceil(cols / 64)`: the number of u64 words one packed row occupies.
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(BITS_PER_WORD)
}

/// Packs the signs of a row-major `rows x cols` f32 matrix; `sign(0) = +1` (and `-0.0` too, so
/// that packing does not depend on how a zero was produced). Scales are set to 1.
pub fn pack_signs(values: &[f32], rows: usize, cols: usize) -> PackedMatrix {
    assert_eq!(
        values.len(),
        rows * cols,
        "pack_signs: values.len() != rows * cols"
    );
    let wpr = words_per_row(cols);
    let mut bits = vec![0u64; rows * wpr];
    for (row_values, row_bits) in values
        .chunks_exact(cols.max(1))
        .zip(bits.chunks_exact_mut(wpr.max(1)))
    {
        for (j, &v) in row_values.iter().enumerate() {
            // +0, -0 and NaN map to +1; only strictly negative values become -1.
            if v >= 0.0 || v.is_nan() {
                row_bits[j / BITS_PER_WORD] |= 1u64 << (j % BITS_PER_WORD);
            }
        }
    }
    PackedMatrix {
        rows,
        cols,
        words_per_row: wpr,
        bits,
        scales: vec![1.0; rows],
    }
}

impl PackedMatrix {
    /// Builds a matrix from already packed words (e.g. read from a file) and per-row scales.
    /// Panics if the lengths do not match the shape.
    pub fn from_parts(rows: usize, cols: usize, bits: Vec<u64>, scales: Vec<f32>) -> Self {
        let wpr = words_per_row(cols);
        assert_eq!(
            bits.len(),
            rows * wpr,
            "PackedMatrix: bits.len() != rows * ceil(cols / 64)"
        );
        assert_eq!(scales.len(), rows, "PackedMatrix: scales.len() != rows");
        PackedMatrix {
            rows,
            cols,
            words_per_row: wpr,
            bits,
            scales,
        }
    }

    /// Rows `range` as a matrix of their own: what one thread of the runtime holds of a layer.
    pub fn rows_slice(&self, range: std::ops::Range<usize>) -> PackedMatrix {
        let wpr = self.words_per_row;
        PackedMatrix::from_parts(
            range.len(),
            self.cols,
            self.bits[range.start * wpr..range.end * wpr].to_vec(),
            self.scales[range].to_vec(),
        )
    }

    /// Packs signs and attaches the given per-row scales.
    pub fn from_signs_and_scales(
        values: &[f32],
        rows: usize,
        cols: usize,
        scales: Vec<f32>,
    ) -> Self {
        assert_eq!(scales.len(), rows, "PackedMatrix: scales.len() != rows");
        PackedMatrix {
            scales,
            ..pack_signs(values, rows, cols)
        }
    }

    /// The packed words of row `r`.
    #[inline]
    pub fn row_bits(&self, r: usize) -> &[u64] {
        &self.bits[r * self.words_per_row..(r + 1) * self.words_per_row]
    }

    /// The sign (+1.0 or -1.0) of element `(r, c)`.
    #[inline]
    pub fn sign(&self, r: usize, c: usize) -> f32 {
        let word = self.bits[r * self.words_per_row + c / BITS_PER_WORD];
        if (word >> (c % BITS_PER_WORD)) & 1 == 1 {
            1.0
        } else {
            -1.0
        }
    }

    /// The ±1 matrix, row-major `rows x cols`, without the scales.
    pub fn unpack_signs(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            out.extend((0..self.cols).map(|c| self.sign(r, c)));
        }
        out
    }

    /// The dense matrix the kernels compute with: `scales[r] * B[r, c]`, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = self.unpack_signs();
        for (row, &row_scale) in out.chunks_exact_mut(self.cols.max(1)).zip(&self.scales) {
            row.iter_mut().for_each(|v| *v *= row_scale);
        }
        out
    }

    /// Bytes of sign bits a kernel streams for one product (the figure GB/s is measured against).
    pub fn packed_bytes(&self) -> usize {
        self.bits.len() * std::mem::size_of::<u64>()
    }

    /// Mask of the valid bits of the last word of each row (all ones when `cols % 64 == 0`).
    pub fn tail_mask(&self) -> u64 {
        match self.cols % BITS_PER_WORD {
            0 => u64::MAX,
            valid => (1u64 << valid) - 1,
        }
    }

    /// Debug check that every padding bit is 0, as [`pack_signs`] writes them.
    pub fn padding_is_zero(&self) -> bool {
        if self.words_per_row == 0 {
            return true;
        }
        let padding = !self.tail_mask();
        (0..self.rows).all(|r| self.bits[(r + 1) * self.words_per_row - 1] & padding == 0)
    }
}
