//! GEMV and GEMM drivers: input preparation, row splitting across threads, and tiling over
//! input vectors so that GEMM reads each weight word once per tile of vectors, not per vector.
//!
//! Layouts: `x` has exactly `cols` floats; GEMM inputs `xs` are `n x cols` row-major (one token
//! per row) and outputs `ys` are `n x rows` row-major.

use crate::kernel::{lut_blocks_sums, lut_i8_blocks_sums, scalar_row_dot, selected_sums, Kernel};
use crate::layout::{PackedMatrix, BITS_PER_WORD};
use crate::lut::{build_tables, LutMatrix, LUT_BLOCK_ROWS};
use crate::lut3::{Lut3Matrix, LUT3_BLOCK_ROWS};
use crate::lut_i8::{LutI8Matrix, I8_BLOCK_ROWS, I8_CHUNK_COLS};
use crate::parallel::{for_each_range, SharedOut};
use std::ops::Range;

/// Copies `x` into `buf` zero-padded to `padded_len` (so SIMD loads stay in bounds and padding
/// bits select zeros) and returns `sum_j x[j]` for the `2 * s1 - sum x` identity.
fn pad_input(x: &[f32], padded_len: usize, buf: &mut [f32]) -> f32 {
    buf[..x.len()].copy_from_slice(x);
    buf[x.len()..padded_len].fill(0.0);
    x.iter().sum()
}

pub(crate) fn gemv_row_major(
    kernel: Kernel,
    m: &PackedMatrix,
    x: &[f32],
    y: &mut [f32],
    threads: usize,
) {
    let out = SharedOut::new(y);
    if kernel == Kernel::Scalar {
        for_each_range(m.rows, threads, |rows| {
            // SAFETY: row ranges from `for_each_range` are disjoint.
            let out = unsafe { out.slice(rows.start, rows.len()) };
            crate::scalar::gemv_rows(m, x, rows.start, out);
        });
        return;
    }
    let padded_len = m.words_per_row * BITS_PER_WORD;
    let mut padded = vec![0.0f32; padded_len];
    let total = pad_input(x, padded_len, &mut padded);
    for_each_range(m.rows, threads, |rows| {
        // SAFETY: row ranges from `for_each_range` are disjoint.
        let out = unsafe { out.slice(rows.start, rows.len()) };
        let wpr = m.words_per_row;
        let mut selected = vec![[0.0f32; 1]; rows.len()];
        selected_sums::<1>(
            kernel,
            &m.bits[rows.start * wpr..rows.end * wpr],
            wpr,
            &[&padded],
            &mut selected,
        );
        for ((out, [selected]), r) in out.iter_mut().zip(selected).zip(rows) {
            *out = m.scales[r] * (2.0 * selected - total);
        }
    });
}

pub(crate) fn gemm_row_major(
    kernel: Kernel,
    m: &PackedMatrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    threads: usize,
) {
    let out = SharedOut::new(ys);
    let cols = m.cols;
    for_each_range(m.rows, threads, |rows| {
        if kernel == Kernel::Scalar {
            for v in 0..n {
                // SAFETY: each task owns its row range in every output vector.
                let out = unsafe { out.slice(v * m.rows + rows.start, rows.len()) };
                for (out, r) in out.iter_mut().zip(rows.clone()) {
                    *out = m.scales[r] * scalar_row_dot(m, r, &xs[v * cols..(v + 1) * cols]);
                }
            }
            return;
        }
        let tile = kernel.gemm_tile();
        let padded_len = m.words_per_row * BITS_PER_WORD;
        // Each task pads its own copy: cheap next to the product, and no sync between tiles.
        let mut padded = vec![0.0f32; tile * padded_len];
        let mut totals = vec![0.0f32; tile];
        let mut first = 0;
        while first < n {
            let count = tile.min(n - first);
            for t in 0..count {
                let x = &xs[(first + t) * cols..(first + t + 1) * cols];
                totals[t] = pad_input(
                    x,
                    padded_len,
                    &mut padded[t * padded_len..(t + 1) * padded_len],
                );
            }
            let tile_job = RowMajorTile {
                kernel,
                m,
                padded: &padded,
                padded_len,
                totals: &totals,
                first,
                out: &out,
            };
            match count {
                1 => tile_job.run::<1>(rows.clone()),
                2 => tile_job.run::<2>(rows.clone()),
                3 => tile_job.run::<3>(rows.clone()),
                4 => tile_job.run::<4>(rows.clone()),
                _ => unreachable!("gemm tile wider than 4"),
            }
            first += count;
        }
    });
}

struct RowMajorTile<'a> {
    kernel: Kernel,
    m: &'a PackedMatrix,
    padded: &'a [f32],
    padded_len: usize,
    totals: &'a [f32],
    /// Index of the tile's first input vector.
    first: usize,
    out: &'a SharedOut,
}

impl RowMajorTile<'_> {
    fn run<const T: usize>(&self, rows: Range<usize>) {
        let xs: [&[f32]; T] =
            std::array::from_fn(|t| &self.padded[t * self.padded_len..(t + 1) * self.padded_len]);
        let wpr = self.m.words_per_row;
        let mut selected = vec![[0.0f32; T]; rows.len()];
        let bits = &self.m.bits[rows.start * wpr..rows.end * wpr];
        selected_sums::<T>(self.kernel, bits, wpr, &xs, &mut selected);
        for t in 0..T {
            // SAFETY: each task owns its row range in every output vector.
            let out = unsafe {
                self.out
                    .slice((self.first + t) * self.m.rows + rows.start, rows.len())
            };
            for ((out, selected), r) in out.iter_mut().zip(&selected).zip(rows.clone()) {
                *out = self.m.scales[r] * (2.0 * selected[t] - self.totals[t]);
            }
        }
    }
}

/// Scales unscaled block sums (`sums[i]` for matrix row `first_row + i`, padding rows included)
/// into `out[first_row + i]` for the real rows.
fn write_scaled(
    sums: &[f32],
    scales: &[f32],
    rows: usize,
    first_row: usize,
    out: &SharedOut,
    out_offset: usize,
) {
    let count = sums.len().min(rows.saturating_sub(first_row));
    // SAFETY: row blocks are owned by exactly one task, so their row ranges are disjoint.
    let out = unsafe { out.slice(out_offset + first_row, count) };
    for ((out, &sum), &row_scale) in out.iter_mut().zip(sums).zip(&scales[first_row..]) {
        *out = row_scale * sum;
    }
}

pub(crate) fn gemv_lut(kernel: Kernel, lm: &LutMatrix, x: &[f32], y: &mut [f32], threads: usize) {
    // One set of tables per input vector, built once and shared read-only by all threads.
    let mut tables = vec![0.0f32; lm.tables_len()];
    build_tables(x, lm.chunks, &mut tables);
    let out = SharedOut::new(y);
    for_each_range(lm.row_blocks, threads, |blocks| {
        let mut sums = vec![0.0f32; blocks.len() * LUT_BLOCK_ROWS];
        lut_blocks_sums::<1>(
            kernel,
            lm.blocks(blocks.clone()),
            lm.chunks,
            &[&tables],
            &mut sums,
        );
        write_scaled(
            &sums,
            &lm.scales,
            lm.rows,
            blocks.start * LUT_BLOCK_ROWS,
            &out,
            0,
        );
    });
}

/// A matrix in either f32-table layout (`lut`: groups of 4 activations; `lut3`: groups of 3),
/// as the tiled product sees it. Both interleave 16-row blocks, so only the tables differ.
struct TableMatrix<'a> {
    rows: usize,
    cols: usize,
    row_blocks: usize,
    chunks: usize,
    scales: &'a [f32],
    tables_len: usize,
    data: &'a [u32],
}

const _: () = assert!(LUT_BLOCK_ROWS == LUT3_BLOCK_ROWS);

pub(crate) fn gemm_lut(
    kernel: Kernel,
    lm: &LutMatrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    threads: usize,
) {
    let matrix = TableMatrix {
        rows: lm.rows,
        cols: lm.cols,
        row_blocks: lm.row_blocks,
        chunks: lm.chunks,
        scales: &lm.scales,
        tables_len: lm.tables_len(),
        data: &lm.data,
    };
    gemm_tables(kernel, &matrix, build_tables, xs, n, ys, threads)
}

/// 3-activation LUT product (GEMV is `n = 1`: each task builds its own tables, as in GEMM).
pub(crate) fn gemm_lut3(
    kernel: Kernel,
    lm: &Lut3Matrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    threads: usize,
) {
    let matrix = TableMatrix {
        rows: lm.rows,
        cols: lm.cols,
        row_blocks: lm.row_blocks,
        chunks: lm.chunks,
        scales: &lm.scales,
        tables_len: lm.tables_len(),
        data: &lm.data,
    };
    gemm_tables(
        kernel,
        &matrix,
        crate::lut3::build_tables,
        xs,
        n,
        ys,
        threads,
    )
}

/// The tiled f32-table product of both LUT families; `build_tables` is the family's own.
fn gemm_tables(
    kernel: Kernel,
    lm: &TableMatrix,
    build_tables: impl Fn(&[f32], usize, &mut [f32]) + Sync,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    threads: usize,
) {
    let out = SharedOut::new(ys);
    let cols = lm.cols;
    for_each_range(lm.row_blocks, threads, |blocks| {
        let tile = kernel.gemm_tile();
        let tables_len = lm.tables_len;
        let task_rows = blocks.len() * LUT_BLOCK_ROWS;
        // Each task builds the tables of a tile itself: a few percent of the lookups' cost,
        // and tasks never wait on each other.
        let mut tables = vec![0.0f32; tile * tables_len];
        let mut sums = vec![0.0f32; tile * task_rows];
        let mut first = 0;
        while first < n {
            let count = tile.min(n - first);
            for t in 0..count {
                let x = &xs[(first + t) * cols..(first + t + 1) * cols];
                build_tables(
                    x,
                    lm.chunks,
                    &mut tables[t * tables_len..(t + 1) * tables_len],
                );
            }
            let sums = &mut sums[..count * task_rows];
            let block_len = lm.chunks * LUT_BLOCK_ROWS;
            let data = &lm.data[blocks.start * block_len..blocks.end * block_len];
            let table = |t: usize| &tables[t * tables_len..(t + 1) * tables_len];
            match count {
                1 => lut_blocks_sums::<1>(kernel, data, lm.chunks, &[table(0)], sums),
                2 => lut_blocks_sums::<2>(kernel, data, lm.chunks, &[table(0), table(1)], sums),
                3 => lut_blocks_sums::<3>(
                    kernel,
                    data,
                    lm.chunks,
                    &[table(0), table(1), table(2)],
                    sums,
                ),
                4 => lut_blocks_sums::<4>(
                    kernel,
                    data,
                    lm.chunks,
                    &[table(0), table(1), table(2), table(3)],
                    sums,
                ),
                _ => unreachable!("gemm tile wider than 4"),
            }
            for t in 0..count {
                write_scaled(
                    &sums[t * task_rows..(t + 1) * task_rows],
                    lm.scales,
                    lm.rows,
                    blocks.start * LUT_BLOCK_ROWS,
                    &out,
                    (first + t) * lm.rows,
                );
            }
            first += count;
        }
    });
}

/// Int8-activation LUT product (GEMV is `n = 1`): each task quantizes and builds tables for its
/// tiles itself, as in [`gemm_lut`]; quantization is deterministic, so thread counts still give
/// identical results.
pub(crate) fn gemm_lut_i8(
    kernel: Kernel,
    lm: &LutI8Matrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    threads: usize,
) {
    let out = SharedOut::new(ys);
    let cols = lm.cols;
    for_each_range(lm.row_blocks, threads, |blocks| {
        let tile = kernel.gemm_tile();
        let padded_len = lm.chunks * I8_CHUNK_COLS;
        let tables_len = lm.tables_len();
        let task_rows = blocks.len() * I8_BLOCK_ROWS;
        let mut qs = vec![0i8; tile * padded_len];
        let mut tables = vec![0i16; tile * tables_len];
        let mut act_scales = vec![0.0f32; tile];
        let mut sums = vec![0i32; tile * task_rows];
        let mut scaled = vec![0.0f32; task_rows];
        let mut first = 0;
        while first < n {
            let count = tile.min(n - first);
            for t in 0..count {
                let x = &xs[(first + t) * cols..(first + t + 1) * cols];
                let q = &mut qs[t * padded_len..(t + 1) * padded_len];
                act_scales[t] = crate::lut_i8::quantize(x, q);
                if kernel != Kernel::LutI8Scalar {
                    crate::lut_i8::build_tables(
                        q,
                        &mut tables[t * tables_len..(t + 1) * tables_len],
                    );
                }
            }
            let sums = &mut sums[..count * task_rows];
            let data = lm.blocks(blocks.clone());
            let q = |t: usize| &qs[t * padded_len..(t + 1) * padded_len];
            let table = |t: usize| &tables[t * tables_len..(t + 1) * tables_len];
            match count {
                1 => lut_i8_blocks_sums::<1>(kernel, data, lm.chunks, &[q(0)], &[table(0)], sums),
                2 => lut_i8_blocks_sums::<2>(
                    kernel,
                    data,
                    lm.chunks,
                    &[q(0), q(1)],
                    &[table(0), table(1)],
                    sums,
                ),
                3 => lut_i8_blocks_sums::<3>(
                    kernel,
                    data,
                    lm.chunks,
                    &[q(0), q(1), q(2)],
                    &[table(0), table(1), table(2)],
                    sums,
                ),
                4 => lut_i8_blocks_sums::<4>(
                    kernel,
                    data,
                    lm.chunks,
                    &[q(0), q(1), q(2), q(3)],
                    &[table(0), table(1), table(2), table(3)],
                    sums,
                ),
                _ => unreachable!("gemm tile wider than 4"),
            }
            for t in 0..count {
                for (scaled, &sum) in scaled
                    .iter_mut()
                    .zip(&sums[t * task_rows..(t + 1) * task_rows])
                {
                    *scaled = act_scales[t] * sum as f32;
                }
                let first_row = blocks.start * I8_BLOCK_ROWS;
                write_scaled(
                    &scaled,
                    &lm.scales,
                    lm.rows,
                    first_row,
                    &out,
                    (first + t) * lm.rows,
                );
            }
            first += count;
        }
    });
}
