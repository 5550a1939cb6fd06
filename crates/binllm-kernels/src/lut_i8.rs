//! Int8-activation lookup-table kernels (W1A8): an optional, faster, approximate variant.
//!
//! The input vector is quantized per vector to int8 (`q = round(x * 127 / max|x|)`), so a
//! 4-activation table entry fits in i16 (|entry| <= 508) and `vpermw` (AVX-512BW) looks up 32
//! rows at once in 16-bit lanes: twice the rows per instruction of the f32 tables. Sums stay in
//! i16 for at most [`GROUPS_PER_FLUSH`] groups (64 * 508 < 32767) and are then widened to i32,
//! so integer accumulation is exact; the only error is the activation rounding, quantified by
//! `gemv_bench` and bounded in the tests.
//!
//! Result: `y[r] = scale[r] * act_scale * sum_j B[r, j] q[j]` with `act_scale = max|x| / 127`.

#![allow(clippy::needless_range_loop)]

use crate::layout::PackedMatrix;

/// Rows per interleaved block: one 512-bit register of u16 lanes.
pub const I8_BLOCK_ROWS: usize = 32;
/// Columns per u16 lane of a block.
pub const I8_CHUNK_COLS: usize = 16;
const GROUPS_PER_CHUNK: usize = I8_CHUNK_COLS / 4;
/// The 16 entries are stored twice, so `vpermw`'s 5-bit index may ignore the next nibble.
pub const I8_TABLE_LEN: usize = 32;
/// Groups summed in i16 before widening: each of the two i16 accumulators gets half of them,
/// `32 * 508 = 16256 < 32767`.
pub const GROUPS_PER_FLUSH: usize = 64;
#[cfg(target_arch = "x86_64")]
const CHUNKS_PER_FLUSH: usize = GROUPS_PER_FLUSH / GROUPS_PER_CHUNK;

/// Sign bits re-tiled for the int8 LUT kernels: blocks of 32 rows (the last padded with zero
/// rows), chunks of 16 columns; `data[(block * chunks + chunk) * 32 + lane]` holds in bit `j` the
/// sign bit of element `(32 * block + lane, 16 * chunk + j)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LutI8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub row_blocks: usize,
    pub chunks: usize,
    pub data: Vec<u16>,
    /// Per-row scales, padded with zeros to `32 * row_blocks`.
    pub scales: Vec<f32>,
}

impl LutI8Matrix {
    pub fn from_packed(m: &PackedMatrix) -> Self {
        let row_blocks = m.rows.div_ceil(I8_BLOCK_ROWS);
        let chunks = m.cols.div_ceil(I8_CHUNK_COLS);
        let mut data = vec![0u16; row_blocks * chunks * I8_BLOCK_ROWS];
        for r in 0..m.rows {
            let (block, lane) = (r / I8_BLOCK_ROWS, r % I8_BLOCK_ROWS);
            let row = m.row_bits(r);
            for chunk in 0..chunks {
                // Padding bits are copied as they are: padding columns quantize to q = 0.
                let quarter_word = (row[chunk / 4] >> (16 * (chunk % 4))) as u16;
                data[(block * chunks + chunk) * I8_BLOCK_ROWS + lane] = quarter_word;
            }
        }
        let mut scales = m.scales.clone();
        scales.resize(row_blocks * I8_BLOCK_ROWS, 0.0);
        LutI8Matrix {
            rows: m.rows,
            cols: m.cols,
            row_blocks,
            chunks,
            data,
            scales,
        }
    }

    #[inline]
    pub fn block(&self, block: usize) -> &[u16] {
        self.blocks(block..block + 1)
    }

    /// The data of consecutive row blocks.
    #[inline]
    pub fn blocks(&self, blocks: std::ops::Range<usize>) -> &[u16] {
        let len = self.chunks * I8_BLOCK_ROWS;
        &self.data[blocks.start * len..blocks.end * len]
    }

    pub fn tables_len(&self) -> usize {
        self.chunks * GROUPS_PER_CHUNK * I8_TABLE_LEN
    }

    pub fn packed_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<u16>()
    }
}

/// Per-vector symmetric int8 quantization: returns `act_scale` with `x[j] ~ act_scale * q[j]`.
/// `q` gets `padded_len >= x.len()` values, zeros past `x.len()`.
pub fn quantize(x: &[f32], q: &mut [i8]) -> f32 {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max_abs == 0.0 || !max_abs.is_finite() {
        q.fill(0);
        return if max_abs == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 127.0 / max_abs;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
    }
    q[x.len()..].fill(0);
    max_abs / 127.0
}

const fn table_signs(i: usize) -> [i16; I8_TABLE_LEN] {
    let mut signs = [0i16; I8_TABLE_LEN];
    let mut entry = 0;
    while entry < I8_TABLE_LEN {
        signs[entry] = if (entry >> i) & 1 == 1 { 1 } else { -1 };
        entry += 1;
    }
    signs
}
const SIGNS: [[i16; I8_TABLE_LEN]; 4] = [
    table_signs(0),
    table_signs(1),
    table_signs(2),
    table_signs(3),
];

/// Tables from quantized activations (`q.len() == 16 * chunks`): entry `e` (and `e + 16`, as
/// bit 4 of the index is ignored) of group `g` is `sum_{i<4} (bit i of e ? +1 : -1) * q[4 g + i]`.
pub fn build_tables(q: &[i8], tables: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512f") {
        // SAFETY: features checked above.
        return unsafe { build_tables_avx512bw(q, tables) };
    }
    build_tables_inline(q, tables)
}

#[inline(always)]
fn build_tables_inline(q: &[i8], tables: &mut [i16]) {
    assert_eq!(tables.len() * 4, q.len() * I8_TABLE_LEN);
    for (table, inputs) in tables.chunks_exact_mut(I8_TABLE_LEN).zip(q.chunks_exact(4)) {
        let inputs = [
            inputs[0] as i16,
            inputs[1] as i16,
            inputs[2] as i16,
            inputs[3] as i16,
        ];
        for (entry, out) in table.iter_mut().enumerate() {
            *out = SIGNS[0][entry] * inputs[0]
                + SIGNS[1][entry] * inputs[1]
                + SIGNS[2][entry] * inputs[2]
                + SIGNS[3][entry] * inputs[3];
        }
    }
}

/// Reference: exact integer sums `sum_j B[r, j] q[j]` for the 32 rows of a block, no tables.
#[inline]
fn one_block_scalar<const T: usize>(block: &[u16], qs: &[&[i8]; T]) -> [[i32; I8_BLOCK_ROWS]; T] {
    let chunks = block.len() / I8_BLOCK_ROWS;
    let mut out = [[0i32; I8_BLOCK_ROWS]; T];
    for t in 0..T {
        for lane in 0..I8_BLOCK_ROWS {
            let mut acc = 0i32;
            for chunk in 0..chunks {
                let bits = block[chunk * I8_BLOCK_ROWS + lane];
                for j in 0..I8_CHUNK_COLS {
                    let q = qs[t][chunk * I8_CHUNK_COLS + j] as i32;
                    acc += if (bits >> j) & 1 == 1 { q } else { -q };
                }
            }
            out[t][lane] = acc;
        }
    }
    out
}

/// AVX-512BW: `vpermw` looks up 32 rows per instruction in i16 tables.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `block.len()` must be a multiple of 32 and each
/// table slice must hold the tables of `block.len() / 32` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn one_block_avx512bw<const T: usize>(
    block: &[u16],
    tables: &[&[i16]; T],
) -> [[i32; I8_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / I8_BLOCK_ROWS;
    for t in 0..T {
        assert!(tables[t].len() >= chunks * GROUPS_PER_CHUNK * I8_TABLE_LEN);
    }
    let mut wide_low = [_mm512_setzero_si512(); T];
    let mut wide_high = [_mm512_setzero_si512(); T];
    let mut chunk = 0;
    while chunk < chunks {
        let flush_end = chunks.min(chunk + CHUNKS_PER_FLUSH);
        let mut narrow = [[_mm512_setzero_si512(); 2]; T];
        while chunk < flush_end {
            // SAFETY: chunk * 32 + 32 <= block.len().
            let index = _mm512_loadu_si512(block.as_ptr().add(chunk * I8_BLOCK_ROWS) as *const _);
            let indices = [
                index,
                _mm512_srli_epi16::<4>(index),
                _mm512_srli_epi16::<8>(index),
                _mm512_srli_epi16::<12>(index),
            ];
            for nibble in 0..GROUPS_PER_CHUNK {
                let table_offset = (chunk * GROUPS_PER_CHUNK + nibble) * I8_TABLE_LEN;
                for t in 0..T {
                    // SAFETY: table_offset + 32 <= tables[t].len() (asserted).
                    let table =
                        _mm512_loadu_si512(tables[t].as_ptr().add(table_offset) as *const _);
                    let slot = nibble % 2;
                    narrow[t][slot] = _mm512_add_epi16(
                        narrow[t][slot],
                        _mm512_permutexvar_epi16(indices[nibble], table),
                    );
                }
            }
            chunk += 1;
        }
        for t in 0..T {
            let sum = _mm512_add_epi16(narrow[t][0], narrow[t][1]);
            wide_low[t] = _mm512_add_epi32(
                wide_low[t],
                _mm512_cvtepi16_epi32(_mm512_castsi512_si256(sum)),
            );
            wide_high[t] = _mm512_add_epi32(
                wide_high[t],
                _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(sum)),
            );
        }
    }
    let mut out = [[0i32; I8_BLOCK_ROWS]; T];
    for t in 0..T {
        _mm512_storeu_si512(out[t].as_mut_ptr() as *mut _, wide_low[t]);
        _mm512_storeu_si512(out[t].as_mut_ptr().add(16) as *mut _, wide_high[t]);
    }
    out
}

/// Runs `one_block` over the whole blocks in `data` and stores block sums for vector `t` at
/// `sums[t * 32 * blocks + 32 * block + lane]`.
#[inline(always)]
fn for_each_block<const T: usize>(
    data: &[u16],
    chunks: usize,
    sums: &mut [i32],
    mut one_block: impl FnMut(&[u16]) -> [[i32; I8_BLOCK_ROWS]; T],
) {
    let block_len = chunks * I8_BLOCK_ROWS;
    // With no columns there is no data to count blocks by; the output size tells.
    let blocks = data
        .len()
        .checked_div(block_len)
        .unwrap_or(sums.len() / (T * I8_BLOCK_ROWS).max(1));
    let data_rows = blocks * I8_BLOCK_ROWS;
    assert_eq!(data.len(), blocks * block_len);
    assert_eq!(sums.len(), T * data_rows);
    for block_index in 0..blocks {
        let block_sums = one_block(&data[block_index * block_len..(block_index + 1) * block_len]);
        for t in 0..T {
            let start = t * data_rows + block_index * I8_BLOCK_ROWS;
            sums[start..start + I8_BLOCK_ROWS].copy_from_slice(&block_sums[t]);
        }
    }
}

/// Exact integer reference over consecutive blocks, from the quantized activations
/// (`qs[t]` zero-padded to `16 * chunks`).
pub fn blocks_sums_scalar<const T: usize>(
    data: &[u16],
    chunks: usize,
    qs: &[&[i8]; T],
    sums: &mut [i32],
) {
    for_each_block::<T>(data, chunks, sums, |block| one_block_scalar::<T>(block, qs))
}

/// AVX-512BW path over consecutive blocks, from the tables of [`build_tables`].
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; every table slice must hold the tables of
/// `chunks` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn blocks_sums_avx512bw<const T: usize>(
    data: &[u16],
    chunks: usize,
    tables: &[&[i16]; T],
    sums: &mut [i32],
) {
    for_each_block::<T>(data, chunks, sums, |block| {
        one_block_avx512bw::<T>(block, tables)
    })
}

/// [`build_tables`] compiled for AVX-512BW so the i16 arithmetic is vectorised.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn build_tables_avx512bw(q: &[i8], tables: &mut [i16]) {
    build_tables_inline(q, tables)
}
