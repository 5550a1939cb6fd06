//! Sign matrices with a scale per block of columns, the way ggml's 1-bit block types hold
//! them when llama.cpp's `llama-quantize` writes them: Q1_0 gives every 128 weights of a row
//! their own f16 scale (the block's mean |w|), Q2_0 every 64, TQ1_0 / TQ2_0 every 256. They
//! run on the 1-bit kernels as they are, never dequantised to floats.
//!
//! [`BlockScaledMatrix`]: a [`PackedMatrix`] (canonical sign bits, one scale per row) plus
//! [`BlockScales`], one f16 scale per (row, block of `block_cols` columns):
//!
//! `y[r] = scale[r] * sum_b block_scale[r, b] * sum_{j in block b} B[r, j] x[j]`
//!
//! The row scale stays a factor of its own so that nothing is rounded when a model's row
//! scales and a file's block scales meet (binllm reads a GGUF's block scales with row scales
//! of 1). A matrix with one scale per row keeps [`PackedMatrix`] and its kernels: nothing here
//! touches that path.
//!
//! Block scales stay f16, as the file stores them: for Q1_0 the 16 scales of a 16-row block
//! (32 bytes) are read beside 256 bytes of sign bits, 12.5% more, as in llama.cpp; f32 would
//! make it 25%. f16 to f32 is exact, so the precision is the file's.
//!
//! Two ways to compute the product, both behind [`crate::PreparedMatrix::block_scaled`]:
//!
//! - **One pass, LUT kernels** (`LutScalar`, `LutAvx2`, `LutAvx512`; [`LutBlockScaledMatrix`]):
//!   the same 32-column chunks and table lookups as [`crate::lut`]; at the end of each block
//!   the four accumulators are summed and the block's partial sums of 16 rows are multiplied
//!   by those rows' scales into a running total (one fused multiply-add per 16 rows and
//!   block). A block must be a whole number of 32-column chunks, which every ggml block type
//!   is (32 to 256 columns). Summation order (every path): per row and block, the LUT order
//!   (accumulator `nibble % 4`, then `(a0 + a1) + (a2 + a3)`); then
//!   `total = fma(block_scale, partial, total)` block after block. So the three paths are
//!   bit-identical, and GEMM equals GEMV per vector.
//! - **By column blocks, every other kernel** ([`ColumnBlocks`]): one row-scaled
//!   [`crate::PreparedMatrix`] per block of columns (row scale times block scale, in f32), each
//!   product added into the output. It reuses every kernel as it is, at the cost of one pass
//!   over the outputs per block and a kernel call per block.

#![allow(clippy::needless_range_loop)] // index loops over the `T` vectors unroll cleanly

use half::f16;

use crate::kernel::Kernel;
use crate::layout::PackedMatrix;
use crate::lut::{build_tables, LutMatrix, LUT_BLOCK_ROWS, LUT_CHUNK_COLS, LUT_TABLE_LEN};
use crate::PreparedMatrix;

const GROUPS_PER_CHUNK: usize = LUT_CHUNK_COLS / 4;
const ACCUMULATORS: usize = 4;

/// One f16 scale per (row, block of `block_cols` columns), row-major: `scales[r *
/// blocks_per_row + b]` scales columns `b * block_cols..(b + 1) * block_cols` of row `r` (the
/// last block of a row may be shorter).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockScales {
    pub block_cols: usize,
    pub blocks_per_row: usize,
    pub scales: Vec<f16>,
}

/// Columns per block must be a whole number of the LUT kernels' 32-column chunks.
pub const BLOCK_COLS_MULTIPLE: usize = LUT_CHUNK_COLS;

impl BlockScales {
    /// Scales of `rows` rows of `cols` columns in blocks of `block_cols`, row-major.
    pub fn new(block_cols: usize, cols: usize, scales: Vec<f16>) -> Self {
        BlockScales {
            block_cols,
            blocks_per_row: cols.div_ceil(block_cols.max(1)),
            scales,
        }
    }

    /// Whether these scales fit a `rows x cols` matrix, or why not.
    pub fn check(&self, rows: usize, cols: usize) -> Result<(), String> {
        if self.block_cols == 0 || !self.block_cols.is_multiple_of(BLOCK_COLS_MULTIPLE) {
            return Err(format!(
                "blocks of {} columns: the 1-bit kernels take blocks of a multiple of \
                 {BLOCK_COLS_MULTIPLE} columns",
                self.block_cols
            ));
        }
        let blocks_per_row = cols.div_ceil(self.block_cols);
        if self.blocks_per_row != blocks_per_row || self.scales.len() != rows * blocks_per_row {
            return Err(format!(
                "a {rows}x{cols} matrix in blocks of {} columns needs {} block scales \
                 ({blocks_per_row} per row), got {} ({} per row)",
                self.block_cols,
                rows * blocks_per_row,
                self.scales.len(),
                self.blocks_per_row
            ));
        }
        Ok(())
    }

    /// The scales of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[f16] {
        &self.scales[r * self.blocks_per_row..(r + 1) * self.blocks_per_row]
    }

    /// The scales of rows `range`.
    pub fn rows_slice(&self, range: std::ops::Range<usize>) -> BlockScales {
        BlockScales {
            block_cols: self.block_cols,
            blocks_per_row: self.blocks_per_row,
            scales: self.scales[range.start * self.blocks_per_row..range.end * self.blocks_per_row]
                .to_vec(),
        }
    }

    /// Bytes of scales a product reads (f16).
    pub fn bytes(&self) -> usize {
        self.scales.len() * std::mem::size_of::<f16>()
    }
}

/// A sign matrix with a scale per row and a scale per block of columns:
/// `W[r, c] = signs.scales[r] * block_scales[r, c / block_cols] * B[r, c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockScaledMatrix {
    pub signs: PackedMatrix,
    pub block_scales: BlockScales,
}

impl BlockScaledMatrix {
    /// Panics if the scales do not fit the matrix ([`BlockScales::check`]): callers reading a
    /// file check first.
    pub fn new(signs: PackedMatrix, block_scales: BlockScales) -> Self {
        if let Err(e) = block_scales.check(signs.rows, signs.cols) {
            panic!("BlockScaledMatrix: {e}");
        }
        BlockScaledMatrix {
            signs,
            block_scales,
        }
    }

    pub fn rows(&self) -> usize {
        self.signs.rows
    }

    pub fn cols(&self) -> usize {
        self.signs.cols
    }

    /// Rows `range` as a matrix of their own: what one thread of the runtime holds.
    pub fn rows_slice(&self, range: std::ops::Range<usize>) -> Self {
        BlockScaledMatrix {
            signs: self.signs.rows_slice(range.clone()),
            block_scales: self.block_scales.rows_slice(range),
        }
    }

    /// The dense matrix the kernels compute with, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let cols = self.cols();
        let mut out = self.signs.unpack();
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
            let scales = self.block_scales.row(r);
            for (c, v) in row.iter_mut().enumerate() {
                *v *= scales[c / self.block_scales.block_cols].to_f32();
            }
        }
        out
    }

    /// Bytes a product reads: sign bits and block scales.
    pub fn packed_bytes(&self) -> usize {
        self.signs.packed_bytes() + self.block_scales.bytes()
    }

    /// One row-scaled matrix per block of columns: rows `r`, columns of block `b`, scale
    /// `scales[r] * block_scale[r, b]` (rounded to f32).
    fn column_blocks(&self) -> Vec<PackedMatrix> {
        let (rows, cols) = (self.rows(), self.cols());
        let block_cols = self.block_scales.block_cols;
        let signs = self.signs.unpack_signs();
        (0..self.block_scales.blocks_per_row)
            .map(|b| {
                let columns = b * block_cols..((b + 1) * block_cols).min(cols);
                let values: Vec<f32> = (0..rows)
                    .flat_map(|r| signs[r * cols + columns.start..r * cols + columns.end].iter())
                    .copied()
                    .collect();
                let scales = (0..rows)
                    .map(|r| self.signs.scales[r] * self.block_scales.row(r)[b].to_f32())
                    .collect();
                PackedMatrix::from_signs_and_scales(&values, rows, columns.len(), scales)
            })
            .collect()
    }
}

/// A block-scaled matrix re-tiled for the one-pass LUT kernels: the sign bits and row scales
/// as [`LutMatrix`] holds them, and the block scales of each 16-row block side by side:
/// `scales[(row_block * blocks_per_row + b) * 16 + lane]` is the scale of block `b` of row
/// `16 * row_block + lane` (0 for the padding rows of the last row block).
#[derive(Clone, Debug, PartialEq)]
pub struct LutBlockScaledMatrix {
    pub lut: LutMatrix,
    pub chunks_per_block: usize,
    pub blocks_per_row: usize,
    pub scales: Vec<f16>,
}

impl LutBlockScaledMatrix {
    pub fn from_block_scaled(m: &BlockScaledMatrix) -> Self {
        let lut = LutMatrix::from_packed(&m.signs);
        let blocks_per_row = m.block_scales.blocks_per_row;
        let mut scales = vec![f16::ZERO; lut.row_blocks * blocks_per_row * LUT_BLOCK_ROWS];
        for r in 0..m.rows() {
            let (row_block, lane) = (r / LUT_BLOCK_ROWS, r % LUT_BLOCK_ROWS);
            for (b, &s) in m.block_scales.row(r).iter().enumerate() {
                scales[(row_block * blocks_per_row + b) * LUT_BLOCK_ROWS + lane] = s;
            }
        }
        LutBlockScaledMatrix {
            chunks_per_block: m.block_scales.block_cols / LUT_CHUNK_COLS,
            blocks_per_row,
            scales,
            lut,
        }
    }

    pub fn packed_bytes(&self) -> usize {
        self.lut.packed_bytes() + self.scales.len() * std::mem::size_of::<f16>()
    }
}

/// The block-scaled product by column blocks, for kernels without a one-pass path.
#[derive(Clone, Debug)]
pub struct ColumnBlocks {
    pub rows: usize,
    pub cols: usize,
    pub block_cols: usize,
    /// Block `b` holds columns `b * block_cols..` of every row, scaled by row and block.
    pub blocks: Vec<PreparedMatrix>,
}

impl ColumnBlocks {
    pub fn new(m: &BlockScaledMatrix, kernel: Kernel) -> Self {
        ColumnBlocks {
            rows: m.rows(),
            cols: m.cols(),
            block_cols: m.block_scales.block_cols,
            blocks: m
                .column_blocks()
                .into_iter()
                .map(|block| PreparedMatrix::new(block, kernel))
                .collect(),
        }
    }

    /// Sign bits and block scales (f16, as they came), not the f32 copies per block.
    pub fn packed_bytes(&self) -> usize {
        let scales = self.rows * self.blocks.len() * std::mem::size_of::<f16>();
        self.blocks.iter().map(|b| b.packed_bytes()).sum::<usize>() + scales
    }

    /// `ys[v] = W xs[v]` for `n` vectors (`xs`: `n x cols`, `ys`: `n x rows`): block by block,
    /// each block's product added into `ys`.
    pub(crate) fn gemm(&self, xs: &[f32], n: usize, ys: &mut [f32]) {
        ys.fill(0.0);
        let mut inputs = Vec::new();
        let mut block_ys = vec![0.0f32; n * self.rows];
        for (b, block) in self.blocks.iter().enumerate() {
            let columns = b * self.block_cols..((b + 1) * self.block_cols).min(self.cols);
            inputs.clear();
            for x in xs.chunks_exact(self.cols) {
                inputs.extend_from_slice(&x[columns.clone()]);
            }
            if n == 1 {
                block.gemv(&inputs, &mut block_ys);
            } else {
                block.gemm(&inputs, n, &mut block_ys);
            }
            ys.iter_mut().zip(&block_ys).for_each(|(y, v)| *y += v);
        }
    }
}

/// Unscaled-by-row sums of consecutive 16-row blocks for `T` vectors, vector-major in `sums`
/// (`T * 16 * row_blocks` floats), each row's block sums already times their block scales.
/// The kernel must be an available LUT kernel; `tables` are [`build_tables`]'.
pub(crate) fn lut_block_scaled_sums<const T: usize>(
    kernel: Kernel,
    m: &LutBlockScaledMatrix,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    // Checked once here, so that the kernels' loops over 16-row blocks need not.
    assert_eq!(sums.len(), T * m.lut.row_blocks * LUT_BLOCK_ROWS);
    assert_eq!(
        m.blocks_per_row,
        m.lut.chunks.div_ceil(m.chunks_per_block.max(1))
    );
    assert_eq!(
        m.scales.len(),
        m.lut.row_blocks * m.blocks_per_row * LUT_BLOCK_ROWS
    );
    for t in 0..T {
        assert!(tables[t].len() >= m.lut.chunks * GROUPS_PER_CHUNK * LUT_TABLE_LEN);
    }
    match kernel {
        // SAFETY: the caller checked availability (`PreparedMatrix::block_scaled`); the
        // lengths the kernels rely on are asserted above.
        #[cfg(target_arch = "x86_64")]
        Kernel::LutAvx512 => unsafe { sums_avx512::<T>(m, tables, sums) },
        #[cfg(target_arch = "x86_64")]
        Kernel::LutAvx2 => unsafe { sums_avx2::<T>(m, tables, sums) },
        Kernel::LutScalar => for_each_row_block::<T>(m, sums, |data, scales| {
            one_block_scalar::<T>(data, m.chunks_per_block, scales, tables)
        }),
        _ => unreachable!("lut_block_scaled_sums called with {kernel}"),
    }
}

/// Hands `compute` each 16-row block's sign data and block scales and stores its row sums
/// vector-major. Inlined, so that `compute` runs inside the caller's target features.
#[inline(always)]
fn for_each_row_block<const T: usize>(
    m: &LutBlockScaledMatrix,
    sums: &mut [f32],
    mut compute: impl FnMut(&[u32], &[f16]) -> [[f32; LUT_BLOCK_ROWS]; T],
) {
    let padded_rows = m.lut.row_blocks * LUT_BLOCK_ROWS;
    let block_len = m.lut.chunks * LUT_BLOCK_ROWS;
    let scales_len = m.blocks_per_row * LUT_BLOCK_ROWS;
    for row_block in 0..m.lut.row_blocks {
        let data = &m.lut.data[row_block * block_len..(row_block + 1) * block_len];
        let scales = &m.scales[row_block * scales_len..(row_block + 1) * scales_len];
        for (t, row_sums) in compute(data, scales).iter().enumerate() {
            let start = t * padded_rows + row_block * LUT_BLOCK_ROWS;
            sums[start..start + LUT_BLOCK_ROWS].copy_from_slice(row_sums);
        }
    }
}

/// # Safety
/// The CPU must support AVX-512F; lengths as [`lut_block_scaled_sums`] asserts them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512<const T: usize>(
    m: &LutBlockScaledMatrix,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_row_block::<T>(m, sums, |data, scales| unsafe {
        one_block_avx512::<T>(data, m.chunks_per_block, scales, tables)
    })
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; lengths as [`lut_block_scaled_sums`] asserts them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sums_avx2<const T: usize>(
    m: &LutBlockScaledMatrix,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    for_each_row_block::<T>(m, sums, |data, scales| unsafe {
        one_block_avx2::<T>(data, m.chunks_per_block, scales, tables)
    })
}

/// Portable path, the reference of the SIMD ones: one 16-row block, `T` vectors.
#[inline]
fn one_block_scalar<const T: usize>(
    block: &[u32],
    chunks_per_block: usize,
    scales: &[f16],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    let chunks = block.len() / LUT_BLOCK_ROWS;
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for t in 0..T {
        for lane in 0..LUT_BLOCK_ROWS {
            let mut total = 0.0f32;
            for (b, first) in (0..chunks).step_by(chunks_per_block.max(1)).enumerate() {
                let mut acc = [0.0f32; ACCUMULATORS];
                for chunk in first..(first + chunks_per_block).min(chunks) {
                    let mut index = block[chunk * LUT_BLOCK_ROWS + lane];
                    for nibble in 0..GROUPS_PER_CHUNK {
                        let group = chunk * GROUPS_PER_CHUNK + nibble;
                        acc[nibble % ACCUMULATORS] +=
                            tables[t][group * LUT_TABLE_LEN + (index & 15) as usize];
                        index >>= 4;
                    }
                }
                let partial = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                // Fused, as the SIMD paths' multiply-add.
                let scale = scales[b * LUT_BLOCK_ROWS + lane].to_f32();
                total = scale.mul_add(partial, total);
            }
            out[t][lane] = total;
        }
    }
    out
}

/// AVX-512F path: `vpermps` looks up 16 rows at once, as in [`crate::lut`]; `vcvtph2ps`
/// widens a block's 16 scales.
///
/// # Safety
/// The CPU must support AVX-512F; `block.len()` must be a multiple of 16, `scales` must hold
/// 16 scales per block of `chunks_per_block` chunks, and every table slice the tables of
/// `block.len() / 16` chunks (asserted once by [`lut_block_scaled_sums`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn one_block_avx512<const T: usize>(
    block: &[u32],
    chunks_per_block: usize,
    scales: &[f16],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / LUT_BLOCK_ROWS;
    let mut total = [_mm512_setzero_ps(); T];
    for (b, first) in (0..chunks).step_by(chunks_per_block.max(1)).enumerate() {
        let mut acc = [[_mm512_setzero_ps(); ACCUMULATORS]; T];
        for chunk in first..(first + chunks_per_block).min(chunks) {
            // SAFETY: chunk * 16 + 16 <= block.len().
            let lanes = block.as_ptr().add(chunk * LUT_BLOCK_ROWS);
            let mut index = _mm512_loadu_si512(lanes as *const _);
            crate::prefetch_ahead(lanes);
            for nibble in 0..GROUPS_PER_CHUNK {
                let table_offset = (chunk * GROUPS_PER_CHUNK + nibble) * LUT_TABLE_LEN;
                for t in 0..T {
                    // SAFETY: table_offset + 16 <= tables[t].len() (asserted by the caller).
                    let table = _mm512_loadu_ps(tables[t].as_ptr().add(table_offset));
                    let slot = nibble % ACCUMULATORS;
                    acc[t][slot] = _mm512_add_ps(acc[t][slot], _mm512_permutexvar_ps(index, table));
                }
                index = _mm512_srli_epi32::<4>(index);
            }
        }
        // SAFETY: b < blocks per row, so these 16 f16 lie inside `scales`.
        let scale = _mm512_cvtph_ps(_mm256_loadu_si256(
            scales.as_ptr().add(b * LUT_BLOCK_ROWS) as *const __m256i
        ));
        for t in 0..T {
            let partial = _mm512_add_ps(
                _mm512_add_ps(acc[t][0], acc[t][1]),
                _mm512_add_ps(acc[t][2], acc[t][3]),
            );
            total[t] = _mm512_fmadd_ps(scale, partial, total[t]);
        }
    }
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for t in 0..T {
        _mm512_storeu_ps(out[t].as_mut_ptr(), total[t]);
    }
    out
}

/// AVX2 path: two halves of 8 rows, a 16-entry table as two registers, as in [`crate::lut`];
/// `vcvtph2ps` (F16C) widens a half's 8 scales.
///
/// # Safety
/// As [`one_block_avx512`], with AVX2, FMA and F16C instead of AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn one_block_avx2<const T: usize>(
    block: &[u32],
    chunks_per_block: usize,
    scales: &[f16],
    tables: &[&[f32]; T],
) -> [[f32; LUT_BLOCK_ROWS]; T] {
    use std::arch::x86_64::*;
    let chunks = block.len() / LUT_BLOCK_ROWS;
    let mut out = [[0.0f32; LUT_BLOCK_ROWS]; T];
    for half in 0..2 {
        let mut total = [_mm256_setzero_ps(); T];
        for (b, first) in (0..chunks).step_by(chunks_per_block.max(1)).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); ACCUMULATORS]; T];
            for chunk in first..(first + chunks_per_block).min(chunks) {
                // SAFETY: chunk * 16 + half * 8 + 8 <= block.len().
                if half == 0 {
                    crate::prefetch_ahead(block.as_ptr().add(chunk * LUT_BLOCK_ROWS));
                }
                let mut index = _mm256_loadu_si256(
                    block.as_ptr().add(chunk * LUT_BLOCK_ROWS + half * 8) as *const _,
                );
                for nibble in 0..GROUPS_PER_CHUNK {
                    let table_offset = (chunk * GROUPS_PER_CHUNK + nibble) * LUT_TABLE_LEN;
                    let high_half = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
                    for t in 0..T {
                        // SAFETY: table_offset + 16 <= tables[t].len() (asserted by the caller).
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
            // SAFETY: b < blocks per row, so these 8 f16 lie inside `scales`.
            let scale = _mm256_cvtph_ps(_mm_loadu_si128(
                scales.as_ptr().add(b * LUT_BLOCK_ROWS + half * 8) as *const __m128i,
            ));
            for t in 0..T {
                let partial = _mm256_add_ps(
                    _mm256_add_ps(acc[t][0], acc[t][1]),
                    _mm256_add_ps(acc[t][2], acc[t][3]),
                );
                total[t] = _mm256_fmadd_ps(scale, partial, total[t]);
            }
        }
        for t in 0..T {
            _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), total[t]);
        }
    }
    out
}

/// The one-pass LUT product (GEMV is `n = 1`): tables for a tile of vectors, the block-scaled
/// sums, then the row scales.
pub(crate) fn gemm_lut_block_scaled(
    kernel: Kernel,
    m: &LutBlockScaledMatrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    let (rows, cols) = (m.lut.rows, m.lut.cols);
    // No wider than `n`: a GEMV allocates (and zeroes) the tables of one vector only.
    let tile = kernel.gemm_tile().min(n.max(1));
    let tables_len = m.lut.tables_len();
    let padded_rows = m.lut.row_blocks * LUT_BLOCK_ROWS;
    let mut tables = vec![0.0f32; tile * tables_len];
    let mut sums = vec![0.0f32; tile * padded_rows];
    let mut first = 0;
    while first < n {
        let count = tile.min(n - first);
        for t in 0..count {
            let x = &xs[(first + t) * cols..(first + t + 1) * cols];
            build_tables(
                x,
                m.lut.chunks,
                &mut tables[t * tables_len..(t + 1) * tables_len],
            );
        }
        let sums = &mut sums[..count * padded_rows];
        let table = |t: usize| &tables[t * tables_len..(t + 1) * tables_len];
        match count {
            1 => lut_block_scaled_sums::<1>(kernel, m, &[table(0)], sums),
            2 => lut_block_scaled_sums::<2>(kernel, m, &[table(0), table(1)], sums),
            3 => lut_block_scaled_sums::<3>(kernel, m, &[table(0), table(1), table(2)], sums),
            4 => lut_block_scaled_sums::<4>(
                kernel,
                m,
                &[table(0), table(1), table(2), table(3)],
                sums,
            ),
            _ => unreachable!("gemm tile wider than 4"),
        }
        for t in 0..count {
            let out = &mut ys[(first + t) * rows..(first + t + 1) * rows];
            let row_sums = &sums[t * padded_rows..(t + 1) * padded_rows];
            for ((out, &sum), &row_scale) in out.iter_mut().zip(row_sums).zip(&m.lut.scales) {
                *out = row_scale * sum;
            }
        }
        first += count;
    }
}
