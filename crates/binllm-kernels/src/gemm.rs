//! GEMV and GEMM drivers: input preparation and tiling over input vectors, so that GEMM reads
//! each weight word once per tile of vectors, not per vector. Every product here runs on the
//! calling thread over the whole matrix it is given; splitting rows across threads is the
//! runtime's business (binllm-infer gives each thread a matrix of its own rows).
//!
//! Layouts: `x` has exactly `cols` floats; GEMM inputs `xs` are `n x cols` row-major (one token
//! per row) and outputs `ys` are `n x rows` row-major.

use crate::kernel::{lut_blocks_sums, lut_i8_blocks_sums, scalar_row_dot, selected_sums, Kernel};
use crate::layout::{PackedMatrix, BITS_PER_WORD};
use crate::lut::{build_tables, LutMatrix, LUT_BLOCK_ROWS};
use crate::lut3::{Lut3Matrix, LUT3_BLOCK_ROWS};
use crate::lut_i8::{LutI8Matrix, I8_BLOCK_ROWS, I8_CHUNK_COLS};

/// Copies `x` into `buf` zero-padded to `padded_len` (so SIMD loads stay in bounds and padding
/// bits select zeros) and returns `sum_j x[j]` for the `2 * s1 - sum x` identity.
fn pad_input(x: &[f32], padded_len: usize, buf: &mut [f32]) -> f32 {
    buf[..x.len()].copy_from_slice(x);
    buf[x.len()..padded_len].fill(0.0);
    x.iter().sum()
}

pub(crate) fn gemv_row_major(kernel: Kernel, m: &PackedMatrix, x: &[f32], y: &mut [f32]) {
    if kernel == Kernel::Scalar {
        crate::scalar::gemv_rows(m, x, 0, y);
        return;
    }
    let padded_len = m.words_per_row * BITS_PER_WORD;
    let mut padded = vec![0.0f32; padded_len];
    let total = pad_input(x, padded_len, &mut padded);
    let mut selected = vec![[0.0f32; 1]; m.rows];
    selected_sums::<1>(kernel, &m.bits, m.words_per_row, &[&padded], &mut selected);
    for ((out, [selected]), scale) in y.iter_mut().zip(selected).zip(&m.scales) {
        *out = scale * (2.0 * selected - total);
    }
}

pub(crate) fn gemm_row_major(
    kernel: Kernel,
    m: &PackedMatrix,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    let cols = m.cols;
    if kernel == Kernel::Scalar {
        for v in 0..n {
            let x = &xs[v * cols..(v + 1) * cols];
            for (r, out) in ys[v * m.rows..(v + 1) * m.rows].iter_mut().enumerate() {
                *out = m.scales[r] * scalar_row_dot(m, r, x);
            }
        }
        return;
    }
    let tile = kernel.gemm_tile();
    let padded_len = m.words_per_row * BITS_PER_WORD;
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
        };
        let out = &mut ys[first * m.rows..(first + count) * m.rows];
        match count {
            1 => tile_job.run::<1>(out),
            2 => tile_job.run::<2>(out),
            3 => tile_job.run::<3>(out),
            4 => tile_job.run::<4>(out),
            _ => unreachable!("gemm tile wider than 4"),
        }
        first += count;
    }
}

struct RowMajorTile<'a> {
    kernel: Kernel,
    m: &'a PackedMatrix,
    padded: &'a [f32],
    padded_len: usize,
    totals: &'a [f32],
}

impl RowMajorTile<'_> {
    /// The tile's `T` output vectors, one after the other in `out`.
    fn run<const T: usize>(&self, out: &mut [f32]) {
        let xs: [&[f32]; T] =
            std::array::from_fn(|t| &self.padded[t * self.padded_len..(t + 1) * self.padded_len]);
        let rows = self.m.rows;
        let mut selected = vec![[0.0f32; T]; rows];
        selected_sums::<T>(
            self.kernel,
            &self.m.bits,
            self.m.words_per_row,
            &xs,
            &mut selected,
        );
        for t in 0..T {
            let out = &mut out[t * rows..(t + 1) * rows];
            for ((out, selected), scale) in out.iter_mut().zip(&selected).zip(&self.m.scales) {
                *out = scale * (2.0 * selected[t] - self.totals[t]);
            }
        }
    }
}

/// Scales unscaled block sums (`sums[r]` for matrix row `r`, padding rows included) into `out`
/// for the real rows.
fn write_scaled(sums: &[f32], scales: &[f32], out: &mut [f32]) {
    for ((out, &sum), &row_scale) in out.iter_mut().zip(sums).zip(scales) {
        *out = row_scale * sum;
    }
}

pub(crate) fn gemv_lut(kernel: Kernel, lm: &LutMatrix, x: &[f32], y: &mut [f32]) {
    let mut tables = vec![0.0f32; lm.tables_len()];
    build_tables(x, lm.chunks, &mut tables);
    let mut sums = vec![0.0f32; lm.row_blocks * LUT_BLOCK_ROWS];
    lut_blocks_sums::<1>(
        kernel,
        lm.blocks(0..lm.row_blocks),
        lm.chunks,
        &[&tables],
        &mut sums,
    );
    write_scaled(&sums, &lm.scales, y);
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

pub(crate) fn gemm_lut(kernel: Kernel, lm: &LutMatrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    let matrix = TableMatrix {
        rows: lm.rows,
        cols: lm.cols,
        row_blocks: lm.row_blocks,
        chunks: lm.chunks,
        scales: &lm.scales,
        tables_len: lm.tables_len(),
        data: &lm.data,
    };
    gemm_tables(kernel, &matrix, build_tables, xs, n, ys)
}

/// 3-activation LUT product (GEMV is `n = 1`).
pub(crate) fn gemm_lut3(kernel: Kernel, lm: &Lut3Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    let matrix = TableMatrix {
        rows: lm.rows,
        cols: lm.cols,
        row_blocks: lm.row_blocks,
        chunks: lm.chunks,
        scales: &lm.scales,
        tables_len: lm.tables_len(),
        data: &lm.data,
    };
    gemm_tables(kernel, &matrix, crate::lut3::build_tables, xs, n, ys)
}

/// The tiled f32-table product of both LUT families; `build_tables` is the family's own.
fn gemm_tables(
    kernel: Kernel,
    lm: &TableMatrix,
    build_tables: impl Fn(&[f32], usize, &mut [f32]),
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    let cols = lm.cols;
    let tile = kernel.gemm_tile();
    let tables_len = lm.tables_len;
    let padded_rows = lm.row_blocks * LUT_BLOCK_ROWS;
    let mut tables = vec![0.0f32; tile * tables_len];
    let mut sums = vec![0.0f32; tile * padded_rows];
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
        let sums = &mut sums[..count * padded_rows];
        let data = &lm.data[..lm.row_blocks * lm.chunks * LUT_BLOCK_ROWS];
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
                &sums[t * padded_rows..(t + 1) * padded_rows],
                lm.scales,
                &mut ys[(first + t) * lm.rows..(first + t + 1) * lm.rows],
            );
        }
        first += count;
    }
}

/// Int8-activation LUT product (GEMV is `n = 1`): quantizes and builds tables tile by tile, as
/// in [`gemm_lut`].
pub(crate) fn gemm_lut_i8(kernel: Kernel, lm: &LutI8Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    let cols = lm.cols;
    let tile = kernel.gemm_tile();
    let padded_len = lm.chunks * I8_CHUNK_COLS;
    let tables_len = lm.tables_len();
    let padded_rows = lm.row_blocks * I8_BLOCK_ROWS;
    let mut qs = vec![0i8; tile * padded_len];
    let mut tables = vec![0i16; tile * tables_len];
    let mut act_scales = vec![0.0f32; tile];
    let mut sums = vec![0i32; tile * padded_rows];
    let mut scaled = vec![0.0f32; padded_rows];
    let mut first = 0;
    while first < n {
        let count = tile.min(n - first);
        for t in 0..count {
            let x = &xs[(first + t) * cols..(first + t + 1) * cols];
            let q = &mut qs[t * padded_len..(t + 1) * padded_len];
            act_scales[t] = crate::lut_i8::quantize(x, q);
            if kernel != Kernel::LutI8Scalar {
                crate::lut_i8::build_tables(q, &mut tables[t * tables_len..(t + 1) * tables_len]);
            }
        }
        let sums = &mut sums[..count * padded_rows];
        let data = lm.blocks(0..lm.row_blocks);
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
                .zip(&sums[t * padded_rows..(t + 1) * padded_rows])
            {
                *scaled = act_scales[t] * sum as f32;
            }
            write_scaled(
                &scaled,
                &lm.scales,
                &mut ys[(first + t) * lm.rows..(first + t + 1) * lm.rows],
            );
        }
        first += count;
    }
}
