//! Lookup-table kernels over groups of 3 activations (8-entry f32 tables), for AVX2.
//!
//! The [`crate::lut`] kernels use groups of 4 activations and 16-entry tables; on AVX2 a
//! 16-entry f32 table is two registers, so every lookup costs two `vpermps` and a blend. With
//! groups of 3 the table is 8 floats, exactly one 256-bit register: one `vpermps` (which reads
//! only the low 3 bits of each index lane) looks up 8 rows, and a shift by 3 moves every lane on
//! to its next group. That is 8 rows x 3 columns per lookup instead of 8 rows x 4 columns per
//! two lookups and a blend, and the sums stay exact f32 sums of the activations (W1A16).
//!
//! Layout ([`Lut3Matrix`]): rows in blocks of 16 (two 8-lane halves), columns in chunks of 30
//! (10 groups of 3) per u32 lane; bits 30 and 31 of a lane are 0.
//!
//! Summation order (every path): per row, two accumulators take the groups of a chunk
//! alternately (group `g % 2` of the chunk's 10), and the row sum is `acc0 + acc1`. Table entry
//! `e` of group `g` is `(s0 x[3g] + s1 x[3g+1]) + s2 x[3g+2]` with `s_i = bit i of e ? +1 : -1`;
//! the products with ±1 are exact, so the tables, and hence the results, are bit-identical
//! across paths.

#![allow(clippy::needless_range_loop)]

use crate::layout::PackedMatrix;
use crate::lut::for_each_block;

/// Rows per interleaved block: two 256-bit registers of u32 lanes.
pub const LUT3_BLOCK_ROWS: usize = 16;
/// Activations per table (2^3 = 8 entries, one 256-bit register of f32).
pub const LUT3_GROUP: usize = 3;
/// Groups per u32 lane.
pub const LUT3_GROUPS_PER_CHUNK: usize = 10;
/// Columns per u32 lane of a block.
pub const LUT3_CHUNK_COLS: usize = LUT3_GROUP * LUT3_GROUPS_PER_CHUNK;
/// Entries per table.
pub const LUT3_TABLE_LEN: usize = 1 << LUT3_GROUP;

/// Sign bits re-tiled for the 3-activation LUT kernels.
///
/// `data[(block * chunks + chunk) * 16 + lane]` holds, in bit `j < 30`, the sign bit of element
/// `(16 * block + lane, 30 * chunk + j)` (1 = +1); bits for columns past `cols`, and bits 30
/// and 31, are 0. Rows past `rows` (the last block's padding) are zero rows with scale 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Lut3Matrix {
    pub rows: usize,
    pub cols: usize,
    pub row_blocks: usize,
    pub chunks: usize,
    pub data: Vec<u32>,
    /// Per-row scales, padded with zeros to `16 * row_blocks`.
    pub scales: Vec<f32>,
}

impl Lut3Matrix {
    pub fn from_packed(m: &PackedMatrix) -> Self {
        let row_blocks = m.rows.div_ceil(LUT3_BLOCK_ROWS);
        let chunks = m.cols.div_ceil(LUT3_CHUNK_COLS);
        let mut data = vec![0u32; row_blocks * chunks * LUT3_BLOCK_ROWS];
        for r in 0..m.rows {
            let (block, lane) = (r / LUT3_BLOCK_ROWS, r % LUT3_BLOCK_ROWS);
            let row = m.row_bits(r);
            for chunk in 0..chunks {
                let start = chunk * LUT3_CHUNK_COLS;
                let (word, shift) = (start / 64, start % 64);
                let mut bits = row[word] >> shift;
                if shift > 64 - LUT3_CHUNK_COLS && word + 1 < row.len() {
                    bits |= row[word + 1] << (64 - shift);
                }
                // Only real columns: padding bits of the canonical layout never get through.
                let real = (m.cols - start).min(LUT3_CHUNK_COLS);
                let lane_bits = (bits & ((1u64 << real) - 1)) as u32;
                data[(block * chunks + chunk) * LUT3_BLOCK_ROWS + lane] = lane_bits;
            }
        }
        let mut scales = m.scales.clone();
        scales.resize(row_blocks * LUT3_BLOCK_ROWS, 0.0);
        Lut3Matrix {
            rows: m.rows,
            cols: m.cols,
            row_blocks,
            chunks,
            data,
            scales,
        }
    }

    /// Floats of tables one input vector needs.
    pub fn tables_len(&self) -> usize {
        self.chunks * LUT3_GROUPS_PER_CHUNK * LUT3_TABLE_LEN
    }

    pub fn packed_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<u32>()
    }
}

const fn table_signs(i: usize) -> [f32; LUT3_TABLE_LEN] {
    let mut signs = [0.0f32; LUT3_TABLE_LEN];
    let mut entry = 0;
    while entry < LUT3_TABLE_LEN {
        signs[entry] = if (entry >> i) & 1 == 1 { 1.0 } else { -1.0 };
        entry += 1;
    }
    signs
}
const SIGNS: [[f32; LUT3_TABLE_LEN]; LUT3_GROUP] = [table_signs(0), table_signs(1), table_signs(2)];

#[inline(always)]
fn group_inputs(x: &[f32], group: usize) -> [f32; LUT3_GROUP] {
    let mut inputs = [0.0f32; LUT3_GROUP];
    for (i, v) in inputs.iter_mut().enumerate() {
        *v = x.get(group * LUT3_GROUP + i).copied().unwrap_or(0.0);
    }
    inputs
}

/// Fills `tables` (`chunks * 80` floats) for input `x` (`cols` floats; columns past it count
/// as zero).
pub fn build_tables(x: &[f32], chunks: usize, tables: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: feature checked above.
        return unsafe { build_tables_avx2(x, chunks, tables) };
    }
    build_tables_portable(x, chunks, tables)
}

fn build_tables_portable(x: &[f32], chunks: usize, tables: &mut [f32]) {
    let groups = chunks * LUT3_GROUPS_PER_CHUNK;
    assert_eq!(tables.len(), groups * LUT3_TABLE_LEN);
    for (group, table) in tables.chunks_exact_mut(LUT3_TABLE_LEN).enumerate() {
        let inputs = group_inputs(x, group);
        for (entry, out) in table.iter_mut().enumerate() {
            *out = (SIGNS[0][entry] * inputs[0] + SIGNS[1][entry] * inputs[1])
                + SIGNS[2][entry] * inputs[2];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn build_tables_avx2(x: &[f32], chunks: usize, tables: &mut [f32]) {
    use std::arch::x86_64::*;
    let groups = chunks * LUT3_GROUPS_PER_CHUNK;
    assert_eq!(tables.len(), groups * LUT3_TABLE_LEN);
    let signs = SIGNS.map(|s| _mm256_loadu_ps(s.as_ptr()));
    let full_groups = x.len() / LUT3_GROUP;
    for group in 0..groups {
        let inputs = if group < full_groups {
            [
                x[group * LUT3_GROUP],
                x[group * LUT3_GROUP + 1],
                x[group * LUT3_GROUP + 2],
            ]
        } else {
            group_inputs(x, group)
        };
        // Separate mul and add (no FMA): exactly the portable path's roundings.
        let t01 = _mm256_add_ps(
            _mm256_mul_ps(signs[0], _mm256_set1_ps(inputs[0])),
            _mm256_mul_ps(signs[1], _mm256_set1_ps(inputs[1])),
        );
        let table = _mm256_add_ps(t01, _mm256_mul_ps(signs[2], _mm256_set1_ps(inputs[2])));
        // SAFETY: group < groups, so the 8 floats lie inside `tables` (asserted length).
        _mm256_storeu_ps(tables.as_mut_ptr().add(group * LUT3_TABLE_LEN), table);
    }
}

/// Portable path: per-row sums of one block for `T` vectors, in the fixed order. The reference
/// the SIMD path is tested against.
#[inline]
fn one_block_scalar<const T: usize>(
    block: &[u32],
    tables: &[&[f32]; T],
) -> [[f32; LUT3_BLOCK_ROWS]; T] {
    let chunks = block.len() / LUT3_BLOCK_ROWS;
    let mut out = [[0.0f32; LUT3_BLOCK_ROWS]; T];
    for t in 0..T {
        assert!(tables[t].len() >= chunks * LUT3_GROUPS_PER_CHUNK * LUT3_TABLE_LEN);
        for lane in 0..LUT3_BLOCK_ROWS {
            let mut acc = [0.0f32; 2];
            for chunk in 0..chunks {
                let mut index = block[chunk * LUT3_BLOCK_ROWS + lane];
                for g in 0..LUT3_GROUPS_PER_CHUNK {
                    let group = chunk * LUT3_GROUPS_PER_CHUNK + g;
                    acc[g % 2] += tables[t][group * LUT3_TABLE_LEN + (index & 7) as usize];
                    index >>= LUT3_GROUP;
                }
            }
            out[t][lane] = acc[0] + acc[1];
        }
    }
    out
}

/// AVX2 path: each `vpermps` looks up 8 rows in one group's table.
///
/// # Safety
/// The CPU must support AVX2; `block.len()` must be a multiple of 16 and every table slice must
/// hold the tables of `block.len() / 16` chunks (asserted).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn one_block_avx2<const T: usize>(
    block: &[u32],
    tables: &[&[f32]; T],
) -> [[f32; LUT3_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / LUT3_BLOCK_ROWS;
    for t in 0..T {
        assert!(tables[t].len() >= chunks * LUT3_GROUPS_PER_CHUNK * LUT3_TABLE_LEN);
    }
    // acc[t][half][slot]
    let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; T];
    for chunk in 0..chunks {
        // SAFETY: chunk * 16 + 16 <= block.len().
        let lanes = block.as_ptr().add(chunk * LUT3_BLOCK_ROWS);
        crate::prefetch_ahead(lanes);
        let mut index = [
            _mm256_loadu_si256(lanes as *const __m256i),
            _mm256_loadu_si256(lanes.add(8) as *const __m256i),
        ];
        for g in 0..LUT3_GROUPS_PER_CHUNK {
            let table_offset = (chunk * LUT3_GROUPS_PER_CHUNK + g) * LUT3_TABLE_LEN;
            for t in 0..T {
                // SAFETY: table_offset + 8 <= tables[t].len() (asserted).
                let table = _mm256_loadu_ps(tables[t].as_ptr().add(table_offset));
                for half in 0..2 {
                    acc[t][half][g % 2] = _mm256_add_ps(
                        acc[t][half][g % 2],
                        _mm256_permutevar8x32_ps(table, index[half]),
                    );
                }
            }
            for i in &mut index {
                *i = _mm256_srli_epi32::<3>(*i);
            }
        }
    }
    let mut out = [[0.0f32; LUT3_BLOCK_ROWS]; T];
    for t in 0..T {
        for half in 0..2 {
            let sum = _mm256_add_ps(acc[t][half][0], acc[t][half][1]);
            _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), sum);
        }
    }
    out
}

/// Portable path over consecutive blocks: `data` holds whole blocks of `chunks` chunks; `sums`
/// (`T * 16 * blocks` floats) receives the unscaled row sums, vector-major.
pub fn blocks_sums_scalar<const T: usize>(
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_block::<T, LUT3_BLOCK_ROWS>(data, chunks, sums, |block| {
        one_block_scalar::<T>(block, tables)
    })
}

/// AVX2 path over consecutive blocks (contract of [`blocks_sums_scalar`]).
///
/// # Safety
/// The CPU must support AVX2; every table slice must hold the tables of `chunks` chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn blocks_sums_avx2<const T: usize>(
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_block::<T, LUT3_BLOCK_ROWS>(data, chunks, sums, |block| unsafe {
        one_block_avx2::<T>(block, tables)
    })
}
