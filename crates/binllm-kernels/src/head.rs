//! The quantized LM head's products (q8_0 and q4_0 weights, [`crate::q8`] and [`crate::q4`]):
//! the input vectors are rounded once per product, then the rows are taken tile by tile so
//! each weight is read once per call whatever the number of vectors.
//!
//! How the activations are rounded is the kernel's choice ([`DenseKernel::int8_activations`]):
//! int8 per block of 32 for `avx512-vnni` and `avx2-int8` (llama.cpp's arithmetic,
//! [`crate::head_i8`]); int16 per vector for `avx2`, `avx512` and `portable` (an error of at
//! most 2^-16 of `max|x|` per activation, the row products in [`crate::q8`] and [`crate::q4`]);
//! none for `scalar`, the f32 reference.
//!
//! Each product takes the range of rows it computes: one thread of the runtime owns a range
//! of the head's rows and computes them with `gemm_q8_rows` / `gemm_q4_rows`.

use std::ops::Range;

use crate::dense::DenseKernel;
use crate::head_i8::I8Activations;
use crate::q4::{Q4Matrix, Q4_BLOCK, Q4_BLOCK_BYTES};
use crate::q8::{Q8Matrix, Q8_BLOCK};

/// Rows per tile of the multi-vector products: a tile of the SmolLM2 head (64 x 576 weights,
/// 37 KB in q8_0, 20 KB in q4_0) stays in L2 while every vector passes over it, so the matrix
/// is read once per call instead of once per vector.
const GEMM_ROW_TILE: usize = 64;

/// `y = W x` with the fastest available kernel.
pub fn gemv_q8(m: &Q8Matrix, x: &[f32], y: &mut [f32]) {
    gemv_q8_with(DenseKernel::best(), m, x, y)
}

/// `y = W x` with a chosen kernel (panics if it is unavailable).
pub fn gemv_q8_with(kernel: DenseKernel, m: &Q8Matrix, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "gemv_q8: x.len() != cols");
    assert_eq!(y.len(), m.rows, "gemv_q8: y.len() != rows");
    gemm_q8_with(kernel, m, x, 1, y)
}

/// `ys[t * rows + r] = (W xs[t])[r]` for `n` vectors `xs` (row-major `n x cols`): the same
/// numbers as `n` calls of [`gemv_q8_with`], computed tile by tile so each weight is read once.
pub fn gemm_q8_with(kernel: DenseKernel, m: &Q8Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    gemm_q8_rows(kernel, m, 0..m.rows, xs, n, ys)
}

/// [`gemm_q8_with`] for the rows `rows` of `m` only: `ys` is `n x rows.len()`. A thread that
/// owns some rows of the head computes them with this.
pub fn gemm_q8_rows(
    kernel: DenseKernel,
    m: &Q8Matrix,
    rows: Range<usize>,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    let shape = Shape {
        name: "gemm_q8",
        rows: m.rows,
        cols: m.cols,
        blocks_per_row: m.blocks_per_row,
    };
    let (blocks, row_len) = (m.blocks_per_row, m.blocks_per_row * Q8_BLOCK);
    gemm_rows(
        kernel,
        &shape,
        rows,
        xs,
        n,
        ys,
        I8Activations::for_q8_0,
        |tile, x, out| crate::head_i8::rows_q8(kernel, m, tile, x, out),
        // The scalar reference reads the f32 vector, every other path its int16 rounding.
        |r, x, x_q16, x_scale| {
            crate::q8::dot_q8(
                kernel,
                &m.quants[r * row_len..(r + 1) * row_len],
                &m.scales[r * blocks..(r + 1) * blocks],
                x,
                x_q16,
                x_scale,
            )
        },
    )
}

/// `y = W x` with a chosen kernel: `Avx2` and `Avx512` run the AVX2 path, `Scalar` and
/// `Portable` the reference (panics if the kernel is unavailable).
pub fn gemv_q4_with(kernel: DenseKernel, m: &Q4Matrix, x: &[f32], y: &mut [f32]) {
    gemm_q4_with(kernel, m, x, 1, y)
}

/// `ys[t * rows + r] = (W xs[t])[r]` for `n` vectors (row-major `n x cols`): the same numbers
/// as `n` calls of [`gemv_q4_with`], each weight read once per tile.
pub fn gemm_q4_with(kernel: DenseKernel, m: &Q4Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    gemm_q4_rows(kernel, m, 0..m.rows, xs, n, ys)
}

/// [`gemm_q4_with`] for the rows `rows` of `m` only: `ys` is `n x rows.len()`.
pub fn gemm_q4_rows(
    kernel: DenseKernel,
    m: &Q4Matrix,
    rows: Range<usize>,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    let shape = Shape {
        name: "gemm_q4",
        rows: m.rows,
        cols: m.cols,
        blocks_per_row: m.blocks_per_row,
    };
    let per = m.blocks_per_row;
    let simd = matches!(kernel, DenseKernel::Avx2 | DenseKernel::Avx512);
    gemm_rows(
        kernel,
        &shape,
        rows,
        xs,
        n,
        ys,
        I8Activations::for_q4_0,
        |tile, x, out| crate::head_i8::rows_q4(kernel, m, tile, x, out),
        // q4_0 has no f32 path: `scalar` and `portable` take the integer reference.
        |r, _x, x_q16, x_scale| {
            let codes = &m.codes[r * per * Q4_BLOCK_BYTES..(r + 1) * per * Q4_BLOCK_BYTES];
            let w_scales = &m.scales[r * per..(r + 1) * per];
            let sum = if simd {
                crate::q4::dot_q4_simd(codes, w_scales, x_q16)
            } else {
                crate::q4::dot_q4_reference(codes, w_scales, x_q16)
            };
            sum * x_scale
        },
    )
}

/// A quantized head matrix as the tiled product sees it (`name` for assertion messages).
struct Shape {
    name: &'static str,
    rows: usize,
    cols: usize,
    blocks_per_row: usize,
}

/// The rows `rows` of a `shape` matrix times `n` vectors, tile by tile, for both formats:
/// `int8_layout` lays out one vector's int8 activations for the format's int8 kernels,
/// `int8_rows(tile, x, out)` computes a tile's rows on them, and `int16_row(r, x, x_q16,
/// x_scale)` one row on the vector's int16 rounding (or the f32 vector itself).
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    kernel: DenseKernel,
    shape: &Shape,
    rows: Range<usize>,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    int8_layout: fn(&[f32], usize) -> I8Activations,
    int8_rows: impl Fn(Range<usize>, &I8Activations, &mut [f32]),
    int16_row: impl Fn(usize, &[f32], &[i16], f32) -> f32,
) {
    let (name, cols, blocks) = (shape.name, shape.cols, shape.blocks_per_row);
    assert_eq!(xs.len(), n * cols, "{name}: xs.len() != n * cols");
    assert!(rows.end <= shape.rows, "{name}: rows past the matrix");
    assert_eq!(ys.len(), n * rows.len(), "{name}: ys.len() != n * rows");
    assert!(
        kernel.is_available(),
        "dense kernel {} is not available on this CPU",
        kernel.name()
    );
    // Both formats' blocks are 32 weights: one int16 activation per weight of a padded row.
    const _: () = assert!(Q8_BLOCK == Q4_BLOCK);
    let row_len = blocks * Q8_BLOCK;
    let activations = Activations::new(kernel, xs, n, cols, blocks, int8_layout);
    let width = rows.len();
    for tile_start in rows.clone().step_by(GEMM_ROW_TILE) {
        let tile = tile_start..(tile_start + GEMM_ROW_TILE).min(rows.end);
        let at = tile.start - rows.start;
        for t in 0..n {
            let out = &mut ys[t * width + at..t * width + at + tile.len()];
            match &activations {
                Activations::Int8(x) => int8_rows(tile.clone(), &x[t], out),
                Activations::Int16 { quants, scales } => {
                    let x = &xs[t * cols..(t + 1) * cols];
                    let x_q16 = &quants[t * row_len..(t + 1) * row_len];
                    for (out, r) in out.iter_mut().zip(tile.clone()) {
                        *out = int16_row(r, x, x_q16, scales[t]);
                    }
                }
            }
        }
    }
}

/// The input vectors as a kernel reads them, quantized once per product and shared by every
/// row: int8 per block for the int8 kernels ([`DenseKernel::int8_activations`],
/// [`crate::head_i8`]), otherwise int16
/// per vector (which the scalar reference ignores: it reads the f32 vectors).
enum Activations {
    Int8(Vec<I8Activations>),
    Int16 { quants: Vec<i16>, scales: Vec<f32> },
}

impl Activations {
    fn new(
        kernel: DenseKernel,
        xs: &[f32],
        n: usize,
        cols: usize,
        blocks_per_row: usize,
        int8_layout: fn(&[f32], usize) -> I8Activations,
    ) -> Self {
        let vectors = xs.chunks_exact(cols.max(1)).take(n);
        if kernel.int8_activations() {
            return Activations::Int8(vectors.map(|x| int8_layout(x, blocks_per_row)).collect());
        }
        let row_len = blocks_per_row * Q8_BLOCK;
        let mut quants = vec![0i16; n * row_len];
        let scales = vectors
            .zip(quants.chunks_exact_mut(row_len.max(1)))
            .map(|(x, q)| quantize_i16(x, q))
            .collect();
        Activations::Int16 { quants, scales }
    }
}

/// Symmetric per-vector int16 quantization: `x[j] ~ scale * q[j]`; `q` past `x.len()` is 0.
pub(crate) fn quantize_i16(x: &[f32], q: &mut [i16]) -> f32 {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max_abs == 0.0 || !max_abs.is_finite() {
        q.fill(0);
        return if max_abs == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 32767.0 / max_abs;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inverse).round().clamp(-32767.0, 32767.0) as i16;
    }
    q[x.len()..].fill(0);
    max_abs / 32767.0
}
