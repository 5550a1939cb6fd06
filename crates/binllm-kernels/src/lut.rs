//! Lookup-table kernels (T-MAC / bitnet.cpp style), in f32.
//!
//! For every group of [`LUT_GROUP`] = 4 consecutive activations the 16 possible signed sums
//! `sum_i (bit_i ? +x : -x)` are computed once per input vector ([`build_tables`]); a row then
//! needs one table lookup per 4 columns instead of 4 selects. The lookups are vectorised across
//! rows: the weights are re-tiled ([`LutMatrix`]) so that one 512-bit load gives the next 32
//! sign bits of 16 consecutive rows, one u32 lane per row, and `vpermps` (which reads only the low
//! 4 bits of each index lane) looks up all 16 rows in one 16-entry table at once; shifting the
//! lanes right by 4 moves on to the next group.
//!
//! Summation order is fixed (per lane: four accumulators taking nibbles `n % 4`, combined as
//! `(a0 + a1) + (a2 + a3)`), and the tables are bit-identical across paths because their terms
//! are exact products with ±1, so every LUT path gives bit-identical results.

#![allow(clippy::needless_range_loop)]

use crate::layout::PackedMatrix;

/// Rows per interleaved block: one 512-bit register of u32 lanes.
pub const LUT_BLOCK_ROWS: usize = 16;
/// Columns per u32 lane of a block.
pub const LUT_CHUNK_COLS: usize = 32;
/// Activations per table (2^4 = 16 entries, one 512-bit register of f32).
pub const LUT_GROUP: usize = 4;
/// Entries per table.
pub const LUT_TABLE_LEN: usize = 1 << LUT_GROUP;
const GROUPS_PER_CHUNK: usize = LUT_CHUNK_COLS / LUT_GROUP;
const ACCUMULATORS: usize = 4;

/// Sign bits re-tiled for the LUT kernels.
///
/// Layout: rows are grouped in blocks of 16 (the last block padded with zero rows), columns in
/// chunks of 32 (the last chunk padded with zero bits). `data[(block * chunks + chunk) * 16 + lane]`
/// holds, in bit `j`, the sign bit of element `(16 * block + lane, 32 * chunk + j)` with the
/// canonical convention (1 = +1). It is the same size as the canonical layout up to padding and
/// is built once at load time with [`LutMatrix::from_packed`].
#[derive(Clone, Debug, PartialEq)]
pub struct LutMatrix {
    pub rows: usize,
    pub cols: usize,
    pub row_blocks: usize,
    pub chunks: usize,
    pub data: Vec<u32>,
    /// Per-row scales, padded with zeros to `16 * row_blocks`.
    pub scales: Vec<f32>,
}

impl LutMatrix {
    pub fn from_packed(m: &PackedMatrix) -> Self {
        let row_blocks = m.rows.div_ceil(LUT_BLOCK_ROWS);
        let chunks = m.cols.div_ceil(LUT_CHUNK_COLS);
        let mut data = vec![0u32; row_blocks * chunks * LUT_BLOCK_ROWS];
        for r in 0..m.rows {
            let (block, lane) = (r / LUT_BLOCK_ROWS, r % LUT_BLOCK_ROWS);
            let row = m.row_bits(r);
            for chunk in 0..chunks {
                // Padding bits are copied as they are: the tables give them zero weight.
                let half_word = (row[chunk / 2] >> (32 * (chunk % 2))) as u32;
                data[(block * chunks + chunk) * LUT_BLOCK_ROWS + lane] = half_word;
            }
        }
        let mut scales = m.scales.clone();
        scales.resize(row_blocks * LUT_BLOCK_ROWS, 0.0);
        LutMatrix {
            rows: m.rows,
            cols: m.cols,
            row_blocks,
            chunks,
            data,
            scales,
        }
    }

    /// The `chunks * 16` u32 lanes of row block `block`.
    #[inline]
    pub fn block(&self, block: usize) -> &[u32] {
        self.blocks(block..block + 1)
    }

    /// The data of consecutive row blocks.
    #[inline]
    pub fn blocks(&self, blocks: std::ops::Range<usize>) -> &[u32] {
        let len = self.chunks * LUT_BLOCK_ROWS;
        &self.data[blocks.start * len..blocks.end * len]
    }

    /// Floats of tables one input vector needs.
    pub fn tables_len(&self) -> usize {
        self.chunks * GROUPS_PER_CHUNK * LUT_TABLE_LEN
    }

    pub fn packed_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<u32>()
    }
}

/// Sign of activation `i` of a group in table entry `entry`, as the bit convention says.
const fn table_signs(i: usize) -> [f32; LUT_TABLE_LEN] {
    let mut signs = [0.0f32; LUT_TABLE_LEN];
    let mut entry = 0;
    while entry < LUT_TABLE_LEN {
        signs[entry] = if (entry >> i) & 1 == 1 { 1.0 } else { -1.0 };
        entry += 1;
    }
    signs
}
const SIGNS: [[f32; LUT_TABLE_LEN]; LUT_GROUP] = [
    table_signs(0),
    table_signs(1),
    table_signs(2),
    table_signs(3),
];

/// Fills `tables` (`tables_len()` floats) for input `x` (exactly `cols` floats; columns past
/// `cols` count as zero so padding bits add nothing): table `g` entry `e` is
/// `sum_{i<4} (bit i of e ? +1 : -1) * x[4 g + i]`, summed left to right.
pub fn build_tables(x: &[f32], chunks: usize, tables: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: feature checked above.
        return unsafe { build_tables_avx512(x, chunks, tables) };
    }
    build_tables_portable(x, chunks, tables)
}

#[inline(always)]
fn group_inputs(x: &[f32], group: usize) -> [f32; LUT_GROUP] {
    let mut inputs = [0.0f32; LUT_GROUP];
    for (i, v) in inputs.iter_mut().enumerate() {
        *v = x.get(group * LUT_GROUP + i).copied().unwrap_or(0.0);
    }
    inputs
}

fn build_tables_portable(x: &[f32], chunks: usize, tables: &mut [f32]) {
    let groups = chunks * GROUPS_PER_CHUNK;
    assert_eq!(tables.len(), groups * LUT_TABLE_LEN);
    for (group, table) in tables.chunks_exact_mut(LUT_TABLE_LEN).enumerate() {
        let inputs = group_inputs(x, group);
        for (entry, out) in table.iter_mut().enumerate() {
            *out = SIGNS[0][entry] * inputs[0]
                + SIGNS[1][entry] * inputs[1]
                + SIGNS[2][entry] * inputs[2]
                + SIGNS[3][entry] * inputs[3];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn build_tables_avx512(x: &[f32], chunks: usize, tables: &mut [f32]) {
    use std::arch::x86_64::*;
    let groups = chunks * GROUPS_PER_CHUNK;
    assert_eq!(tables.len(), groups * LUT_TABLE_LEN);
    let signs = SIGNS.map(|s| _mm512_loadu_ps(s.as_ptr()));
    let full_groups = x.len() / LUT_GROUP;
    // `x` was usually just written by another core: ask for all of it at once rather than
    // waiting for one cache line after the other.
    crate::prefetch_lines(x.as_ptr(), x.len());
    for group in 0..groups {
        let inputs = if group < full_groups {
            let mut inputs = [0.0f32; LUT_GROUP];
            inputs.copy_from_slice(&x[group * LUT_GROUP..(group + 1) * LUT_GROUP]);
            inputs
        } else {
            group_inputs(x, group)
        };
        // Products with ±1 are exact, so each fused multiply-add rounds exactly like the
        // portable sum's add.
        let mut table = _mm512_mul_ps(signs[0], _mm512_set1_ps(inputs[0]));
        for i in 1..LUT_GROUP {
            table = _mm512_fmadd_ps(signs[i], _mm512_set1_ps(inputs[i]), table);
        }
        // SAFETY: group < groups, so the 16 floats lie inside `tables` (asserted length).
        _mm512_storeu_ps(tables.as_mut_ptr().add(group * LUT_TABLE_LEN), table);
    }
}

/// Portable LUT path: per-row sums of one block for `T` vectors, in the fixed order.
#[inline]
fn one_block_scalar<const T: usize>(
    block: &[u32],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    let chunks = block.len() / LUT_BLOCK_ROWS;
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for t in 0..T {
        assert!(tables[t].len() >= chunks * GROUPS_PER_CHUNK * LUT_TABLE_LEN);
        for lane in 0..LUT_BLOCK_ROWS {
            let mut acc = [0.0f32; ACCUMULATORS];
            for chunk in 0..chunks {
                let mut index = block[chunk * LUT_BLOCK_ROWS + lane];
                for nibble in 0..GROUPS_PER_CHUNK {
                    let group = chunk * GROUPS_PER_CHUNK + nibble;
                    acc[nibble % ACCUMULATORS] +=
                        tables[t][group * LUT_TABLE_LEN + (index & 15) as usize];
                    index >>= LUT_GROUP;
                }
            }
            out[t][lane] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    }
    out
}

/// AVX-512F LUT path: `vpermps` looks up 16 rows per instruction.
///
/// # Safety
/// The CPU must support AVX-512F; `block.len()` must be a multiple of 16 and every table slice
/// must hold the tables of `block.len() / 16` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn one_block_avx512<const T: usize>(
    block: &[u32],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / LUT_BLOCK_ROWS;
    for t in 0..T {
        assert!(tables[t].len() >= chunks * GROUPS_PER_CHUNK * LUT_TABLE_LEN);
    }
    let mut acc = [[_mm512_setzero_ps(); ACCUMULATORS]; T];
    for chunk in 0..chunks {
        // SAFETY: chunk * 16 + 16 <= block.len().
        let mut index = _mm512_loadu_si512(block.as_ptr().add(chunk * LUT_BLOCK_ROWS) as *const _);
        crate::prefetch_ahead(block.as_ptr().add(chunk * LUT_BLOCK_ROWS));
        for nibble in 0..GROUPS_PER_CHUNK {
            let table_offset = (chunk * GROUPS_PER_CHUNK + nibble) * LUT_TABLE_LEN;
            for t in 0..T {
                // SAFETY: table_offset + 16 <= tables[t].len() (asserted).
                let table = _mm512_loadu_ps(tables[t].as_ptr().add(table_offset));
                let slot = nibble % ACCUMULATORS;
                acc[t][slot] = _mm512_add_ps(acc[t][slot], _mm512_permutexvar_ps(index, table));
            }
            index = _mm512_srli_epi32::<4>(index);
        }
    }
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for t in 0..T {
        let sum = _mm512_add_ps(
            _mm512_add_ps(acc[t][0], acc[t][1]),
            _mm512_add_ps(acc[t][2], acc[t][3]),
        );
        _mm512_storeu_ps(out[t].as_mut_ptr(), sum);
    }
    out
}

/// AVX2 LUT path: a block is two halves of 8 rows; a 16-entry table is two 8-entry
/// registers, `vpermps` looks up both with the low 3 index bits and `blendv` picks by bit 3
/// (shifted into the sign position).
///
/// # Safety
/// As [`one_block_avx512`], with AVX2 instead of AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn one_block_avx2<const T: usize>(
    block: &[u32],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / LUT_BLOCK_ROWS;
    for t in 0..T {
        assert!(tables[t].len() >= chunks * GROUPS_PER_CHUNK * LUT_TABLE_LEN);
    }
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for half in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); ACCUMULATORS]; T];
        for chunk in 0..chunks {
            // SAFETY: chunk * 16 + half * 8 + 8 <= block.len().
            if half == 0 {
                // One line holds both halves' lanes; the second half finds it cached.
                crate::prefetch_ahead(block.as_ptr().add(chunk * LUT_BLOCK_ROWS));
            }
            let mut index = _mm256_loadu_si256(
                block.as_ptr().add(chunk * LUT_BLOCK_ROWS + half * 8) as *const _,
            );
            for nibble in 0..GROUPS_PER_CHUNK {
                let table_offset = (chunk * GROUPS_PER_CHUNK + nibble) * LUT_TABLE_LEN;
                let high_half = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
                for t in 0..T {
                    // SAFETY: table_offset + 16 <= tables[t].len() (asserted).
                    let low_table = _mm256_loadu_ps(tables[t].as_ptr().add(table_offset));
                    let high_table = _mm256_loadu_ps(tables[t].as_ptr().add(table_offset + 8));
                    let looked_up = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(low_table, index),
                        _mm256_permutevar8x32_ps(high_table, index),
                        high_half,
                    );
                    let slot = nibble % ACCUMULATORS;
                    acc[t][slot] = _mm256_add_ps(acc[t][slot], looked_up);
                }
                index = _mm256_srli_epi32::<4>(index);
            }
        }
        for t in 0..T {
            let sum = _mm256_add_ps(
                _mm256_add_ps(acc[t][0], acc[t][1]),
                _mm256_add_ps(acc[t][2], acc[t][3]),
            );
            _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), sum);
        }
    }
    out
}

/// Splits `data` (whole blocks of `chunks` chunks of `ROWS` rows) into blocks, asks `compute`
/// for each block's row sums of the `T` vectors, and stores them vector-major:
/// `sums[t * data_rows + ROWS * block + lane]`. Shared by the LUT kernel families; inlined so
/// `compute` runs inside the caller's target features.
#[inline(always)]
pub(crate) fn for_each_block<const T: usize, const ROWS: usize>(
    data: &[u32],
    chunks: usize,
    sums: &mut [f32],
    mut compute: impl FnMut(&[u32]) -> [[f32; ROWS]; T],
) {
    let block_len = chunks * ROWS;
    // With no columns there is no data to count blocks by; the output size tells.
    let blocks = data
        .len()
        .checked_div(block_len)
        .unwrap_or(sums.len() / (T * ROWS).max(1));
    let data_rows = blocks * ROWS;
    assert_eq!(data.len(), blocks * block_len);
    assert_eq!(sums.len(), T * data_rows);
    for block_index in 0..blocks {
        let block_sums = compute(&data[block_index * block_len..(block_index + 1) * block_len]);
        for (t, row_sums) in block_sums.iter().enumerate() {
            let start = t * data_rows + block_index * ROWS;
            sums[start..start + ROWS].copy_from_slice(row_sums);
        }
    }
}

/// Portable LUT path over consecutive blocks: `data` holds whole blocks of `chunks` chunks;
/// `sums` (`T * 16 * blocks` floats) receives the unscaled row sums, vector-major.
pub fn blocks_sums_scalar<const T: usize>(
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_block::<T, LUT_BLOCK_ROWS>(data, chunks, sums, |block| {
        one_block_scalar::<T>(block, tables)
    })
}

/// AVX-512F LUT path over consecutive blocks (contract of [`blocks_sums_scalar`]).
///
/// # Safety
/// The CPU must support AVX-512F; every table slice must hold the tables of `chunks` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn blocks_sums_avx512<const T: usize>(
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_block::<T, LUT_BLOCK_ROWS>(data, chunks, sums, |block| unsafe {
        one_block_avx512::<T>(block, tables)
    })
}

/// AVX2 LUT path over consecutive blocks (contract of [`blocks_sums_scalar`]).
///
/// # Safety
/// The CPU must support AVX2 and FMA; every table slice must hold the tables of `chunks` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn blocks_sums_avx2<const T: usize>(
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_block::<T, LUT_BLOCK_ROWS>(data, chunks, sums, |block| unsafe {
        one_block_avx2::<T>(block, tables)
    })
}
