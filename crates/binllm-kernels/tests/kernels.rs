//! Every kernel against the scalar reference, and the reference against a float64 dense product.

use binllm_kernels::lut::LutMatrix;
use binllm_kernels::Lut3Matrix;
use binllm_kernels::{gemm_dense_with, gemm_q8_rows, gemm_q8_with, gemv_q8_with, Q8Matrix};
use binllm_kernels::{gemm_q4_rows, gemm_q4_with, gemv_q4_with, Q4Matrix};
use binllm_kernels::{
    gemm_with, gemv_f16_with, gemv_f32_with, gemv_with, pack_signs, scalar, DenseKernel, Kernel,
    PackedMatrix, PreparedMatrix,
};
use half::f16;

mod common;
use common::Rng;

const COLS: [usize; 16] = [
    1, 7, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 576, 1000, 1536, 2049,
];
const ROWS: [usize; 8] = [1, 2, 7, 15, 16, 17, 33, 61];

fn random_matrix(rng: &mut Rng, rows: usize, cols: usize) -> PackedMatrix {
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
    let scales: Vec<f32> = (0..rows).map(|_| rng.unit() * 0.1).collect();
    PackedMatrix::from_signs_and_scales(&values, rows, cols, scales)
}

/// `rows` cut into `parts` contiguous ranges of about equal size, the way a runtime gives each
/// of its threads a matrix's rows.
fn row_parts(rows: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let per = rows.div_ceil(parts.max(1)).max(1);
    (0..rows)
        .step_by(per)
        .map(|s| s..(s + per).min(rows))
        .collect()
}

/// The `n x rows` outputs of a product computed part by part: `product(range, out)` fills the
/// `n x range.len()` outputs of the rows `range`.
fn by_row_parts(
    rows: usize,
    n: usize,
    parts: usize,
    product: impl Fn(std::ops::Range<usize>, &mut [f32]),
) -> Vec<f32> {
    let mut ys = vec![f32::NAN; n * rows];
    for range in row_parts(rows, parts) {
        let width = range.len();
        let mut part = vec![f32::NAN; n * width];
        product(range.clone(), &mut part);
        for t in 0..n {
            ys[t * rows + range.start..t * rows + range.end]
                .copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
    ys
}

fn reference_gemv(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; m.rows];
    scalar::gemv_rows(m, x, 0, &mut y);
    y
}

/// Float paths may sum in another order: allow 1e-5 of the sum of the terms' magnitudes
/// (`|scale| * sum |x|`), the scale of f32 rounding error; plain relative error is meaningless
/// when the terms cancel.
fn assert_close(got: &[f32], want: &[f32], magnitudes: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &mag)) in got.iter().zip(want).zip(magnitudes).enumerate() {
        let tolerance = 1e-5 * mag + f32::MIN_POSITIVE;
        assert!(
            (g - w).abs() <= tolerance,
            "{what}: row {i}: got {g}, want {w} (tolerance {tolerance})"
        );
    }
}

fn magnitudes(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    let l1: f32 = x.iter().map(|v| v.abs()).sum();
    m.scales.iter().map(|s| s.abs() * l1).collect()
}

#[test]
fn pack_unpack_round_trip() {
    let mut rng = Rng(1);
    for &cols in &COLS {
        for &rows in &[1usize, 3, 17] {
            let signs: Vec<f32> = (0..rows * cols)
                .map(|_| if rng.next_u64() & 1 == 1 { 1.0 } else { -1.0 })
                .collect();
            let m = pack_signs(&signs, rows, cols);
            assert_eq!(m.words_per_row, cols.div_ceil(64));
            assert_eq!(m.bits.len(), rows * m.words_per_row);
            assert!(m.padding_is_zero());
            assert_eq!(m.unpack_signs(), signs, "rows {rows} cols {cols}");
            let repacked = PackedMatrix::from_parts(rows, cols, m.bits.clone(), m.scales.clone());
            assert_eq!(repacked, m);
        }
    }
}

#[test]
fn pack_bit_order_and_zero_sign() {
    // Element (0, 0) -> bit 0 of word 0; (0, 65) -> bit 1 of word 1; (1, 2) -> row 1's word 0.
    let cols = 70;
    let mut values = vec![-1.0f32; 2 * cols];
    values[0] = 0.5;
    values[65] = 0.0; // sign(0) = +1
    values[cols + 2] = -0.0; // -0.0 is a zero too
    values[cols + 69] = 3.0;
    let m = pack_signs(&values, 2, cols);
    assert_eq!(m.bits, vec![1, 1 << 1, 1 << 2, 1 << 5]);
    let mut scaled = m.clone();
    scaled.scales = vec![2.0, -0.5];
    let dense = scaled.unpack();
    assert_eq!(dense[0], 2.0);
    assert_eq!(dense[1], -2.0);
    assert_eq!(dense[cols + 2], -0.5);
    assert_eq!(dense[cols + 3], 0.5);
}

#[test]
fn scalar_reference_matches_f64_dense() {
    let mut rng = Rng(2);
    for &cols in &COLS {
        for &rows in &[1usize, 5, 17] {
            let m = random_matrix(&mut rng, rows, cols);
            let x = rng.activations(cols);
            let dense = m.unpack_signs();
            let want: Vec<f32> = (0..rows)
                .map(|r| {
                    let dot: f64 = (0..cols)
                        .map(|j| dense[r * cols + j] as f64 * x[j] as f64)
                        .sum();
                    (m.scales[r] as f64 * dot) as f32
                })
                .collect();
            assert_close(
                &reference_gemv(&m, &x),
                &want,
                &magnitudes(&m, &x),
                &format!("reference {rows}x{cols}"),
            );
        }
    }
}

#[test]
fn every_kernel_matches_reference() {
    let mut rng = Rng(3);
    let kernels: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| !k.is_approximate())
        .collect();
    assert!(kernels.contains(&Kernel::Scalar) && kernels.contains(&Kernel::LutScalar));
    for &cols in &COLS {
        for &rows in &ROWS {
            let m = random_matrix(&mut rng, rows, cols);
            let x = rng.activations(cols);
            let want = reference_gemv(&m, &x);
            let mags = magnitudes(&m, &x);
            for &kernel in &kernels {
                let mut y = vec![f32::NAN; rows];
                gemv_with(kernel, &m, &x, &mut y);
                assert_close(&y, &want, &mags, &format!("{kernel} {rows}x{cols}"));
            }
        }
    }
}

#[test]
fn integer_inputs_are_exact_on_every_kernel() {
    // Small integers and power-of-two scales make every partial sum exact in f32, so any
    // summation order must give exactly the float64 result.
    let mut rng = Rng(4);
    for &cols in &[1usize, 63, 65, 576, 1536] {
        let rows = 37;
        let mut m = random_matrix(&mut rng, rows, cols);
        m.scales = (0..rows).map(|r| [0.25, -2.0, 1.0, 0.5][r % 4]).collect();
        let x: Vec<f32> = (0..cols)
            .map(|_| (rng.next_u64() % 2001) as f32 - 1000.0)
            .collect();
        let dense = m.unpack();
        let want: Vec<f32> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|j| dense[r * cols + j] as f64 * x[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        for kernel in Kernel::available()
            .into_iter()
            .filter(|k| !k.is_approximate())
        {
            let mut y = vec![0.0; rows];
            gemv_with(kernel, &m, &x, &mut y);
            assert_eq!(y, want, "{kernel} cols {cols}");
        }
    }
}

#[test]
fn lut_paths_are_bit_identical() {
    let mut rng = Rng(5);
    let luts: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| k.uses_lut_layout())
        .collect();
    for &cols in &COLS {
        let m = random_matrix(&mut rng, 45, cols);
        let x = rng.activations(cols);
        let results: Vec<Vec<f32>> = luts
            .iter()
            .map(|&k| {
                let mut y = vec![0.0; m.rows];
                gemv_with(k, &m, &x, &mut y);
                y
            })
            .collect();
        for (k, y) in luts.iter().zip(&results) {
            assert_eq!(y, &results[0], "{k} vs {} cols {cols}", luts[0]);
        }
    }
}

#[test]
fn lut3_paths_are_bit_identical_to_their_scalar_reference() {
    let mut rng = Rng(15);
    let luts: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| k.uses_lut3_layout())
        .collect();
    assert!(luts.contains(&Kernel::Lut3Scalar));
    for &cols in COLS.iter().chain(&[29, 30, 31, 59, 60, 61, 90]) {
        for rows in [1usize, 16, 45] {
            let m = random_matrix(&mut rng, rows, cols);
            let xs = rng.activations(3 * cols);
            for n in [1usize, 2, 3] {
                let results: Vec<Vec<f32>> = luts
                    .iter()
                    .map(|&k| {
                        let mut y = vec![f32::NAN; n * rows];
                        gemm_with(k, &m, &xs[..n * cols], n, &mut y);
                        y
                    })
                    .collect();
                for (k, y) in luts.iter().zip(&results) {
                    assert_eq!(y, &results[0], "{k} vs lut3-scalar {rows}x{cols} n {n}");
                }
            }
        }
    }
}

#[test]
fn row_splits_give_identical_results() {
    let mut rng = Rng(6);
    for &(rows, cols) in &[(1usize, 576usize), (61, 65), (200, 576), (577, 100)] {
        let m = random_matrix(&mut rng, rows, cols);
        let x = rng.activations(cols);
        let n = 5;
        let xs = rng.activations(n * cols);
        for kernel in Kernel::available() {
            let prepared = PreparedMatrix::new(m.clone(), kernel);
            let mut y1 = vec![0.0; rows];
            prepared.gemv(&x, &mut y1);
            let mut ys1 = vec![0.0; n * rows];
            prepared.gemm(&xs, n, &mut ys1);
            // Each part its own prepared matrix of its rows, as each runtime thread holds one.
            for parts in [2, 3, 7, 64] {
                let y = by_row_parts(rows, 1, parts, |range, y| {
                    PreparedMatrix::new(m.rows_slice(range), kernel).gemv(&x, y)
                });
                assert_eq!(y, y1, "{kernel} gemv {rows}x{cols} parts {parts}");
                let ys = by_row_parts(rows, n, parts, |range, ys| {
                    PreparedMatrix::new(m.rows_slice(range), kernel).gemm(&xs, n, ys)
                });
                assert_eq!(ys, ys1, "{kernel} gemm {rows}x{cols} parts {parts}");
            }
        }
    }
}

#[test]
fn gemm_equals_gemv_per_vector() {
    let mut rng = Rng(7);
    for &(rows, cols) in &[(17usize, 65usize), (48, 576), (5, 1536), (33, 7)] {
        let m = random_matrix(&mut rng, rows, cols);
        for n in [1usize, 2, 3, 4, 5, 9] {
            let xs = rng.activations(n * cols);
            for kernel in Kernel::available() {
                let mut ys = vec![f32::NAN; n * rows];
                gemm_with(kernel, &m, &xs, n, &mut ys);
                for v in 0..n {
                    let x = &xs[v * cols..(v + 1) * cols];
                    let mut y = vec![0.0; rows];
                    gemv_with(kernel, &m, x, &mut y);
                    // Tiling over vectors must not change any vector's summation order.
                    assert_eq!(
                        &ys[v * rows..(v + 1) * rows],
                        &y[..],
                        "{kernel} {rows}x{cols} n {n} v {v}"
                    );
                    if !kernel.is_approximate() {
                        let mags = magnitudes(&m, x);
                        let want = reference_gemv(&m, x);
                        assert_close(&y, &want, &mags, &format!("{kernel} gemm ref"));
                    }
                }
            }
        }
    }
}

#[test]
fn padding_bits_and_memory_past_x_never_matter() {
    let mut rng = Rng(8);
    for &cols in &[1usize, 7, 33, 63, 65, 100, 1000] {
        let rows = 19;
        let clean = random_matrix(&mut rng, rows, cols);
        let mut dirty = clean.clone();
        let padding = !dirty.tail_mask();
        for r in 0..rows {
            dirty.bits[(r + 1) * dirty.words_per_row - 1] |=
                padding & rng.next_u64() | (padding & (1 << 63));
        }
        assert_eq!(cols % 64 == 0, dirty == clean);
        // x is an exact-length slice of a buffer whose next elements are NaN: any read past
        // `cols` that reached a result would turn it into NaN.
        let mut buffer = rng.activations(cols);
        buffer.extend([f32::NAN; 80]);
        let x = &buffer[..cols];
        let n = 3;
        let mut xs_buffer = rng.activations(n * cols);
        xs_buffer.extend([f32::NAN; 80]);
        let xs = &xs_buffer[..n * cols];
        for kernel in Kernel::available() {
            let (mut y_clean, mut y_dirty) = (vec![0.0; rows], vec![0.0; rows]);
            gemv_with(kernel, &clean, x, &mut y_clean);
            gemv_with(kernel, &dirty, x, &mut y_dirty);
            assert!(
                y_clean.iter().all(|v| v.is_finite()),
                "{kernel} cols {cols}: read past x"
            );
            assert_eq!(
                y_clean, y_dirty,
                "{kernel} cols {cols}: padding bits changed the result"
            );
            let (mut ys_clean, mut ys_dirty) = (vec![0.0; n * rows], vec![0.0; n * rows]);
            gemm_with(kernel, &clean, xs, n, &mut ys_clean);
            gemm_with(kernel, &dirty, xs, n, &mut ys_dirty);
            assert!(
                ys_clean.iter().all(|v| v.is_finite()),
                "{kernel} cols {cols}: gemm read past xs"
            );
            assert_eq!(
                ys_clean, ys_dirty,
                "{kernel} cols {cols}: padding bits changed the gemm result"
            );
        }
    }
}

#[test]
fn degenerate_shapes() {
    for kernel in Kernel::available() {
        let empty = pack_signs(&[], 0, 10);
        let mut y: Vec<f32> = vec![];
        gemv_with(kernel, &empty, &[1.0; 10], &mut y);
        gemm_with(kernel, &empty, &[], 0, &mut []);
        let no_cols = pack_signs(&[], 3, 0);
        let mut y = vec![f32::NAN; 3];
        gemv_with(kernel, &no_cols, &[], &mut y);
        assert_eq!(y, vec![0.0; 3], "{kernel}");
        let m = pack_signs(&[1.0; 6], 2, 3);
        gemm_with(kernel, &m, &[], 0, &mut []);
    }
}

#[test]
#[should_panic(expected = "x.len() != cols")]
fn wrong_input_length_panics() {
    let m = pack_signs(&[1.0; 6], 2, 3);
    gemv_with(Kernel::Scalar, &m, &[1.0; 4], &mut [0.0; 2]);
}

#[test]
fn kernel_names_and_selection() {
    for kernel in Kernel::ALL {
        assert_eq!(kernel.name().parse::<Kernel>().unwrap(), kernel);
    }
    assert!(Kernel::best().is_available());
    assert!(Kernel::best_row_major().is_available() && !Kernel::best_row_major().uses_lut_layout());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        assert!(Kernel::Avx512.is_available() && Kernel::LutAvx512.is_available());
    }
    let m = pack_signs(&[1.0; 6], 2, 3);
    let lm = LutMatrix::from_packed(&m);
    assert_eq!((lm.row_blocks, lm.chunks, lm.data.len()), (1, 1, 16));
    assert_eq!(lm.data[0], 0b111);
    // 3-activation layout: 30 columns per lane; bits past `cols` are cleared.
    let mut m = pack_signs(&[1.0; 2 * 31], 2, 31);
    m.bits[0] |= 1 << 40;
    let lm = Lut3Matrix::from_packed(&m);
    assert_eq!((lm.row_blocks, lm.chunks, lm.data.len()), (1, 2, 32));
    assert_eq!(lm.data[0], (1 << 30) - 1);
    assert_eq!(lm.data[16], 1);
}

#[test]
fn int8_paths_are_exact_integer_and_within_quantization_error() {
    let mut rng = Rng(10);
    let i8_kernels: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| k.is_approximate())
        .collect();
    assert!(i8_kernels.contains(&Kernel::LutI8Scalar));
    for &cols in &COLS {
        for &rows in &[1usize, 31, 32, 33, 70] {
            let m = random_matrix(&mut rng, rows, cols);
            let x = rng.activations(cols);
            let want = reference_gemv(&m, &x);
            let max_abs = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let results: Vec<Vec<f32>> = i8_kernels
                .iter()
                .map(|&k| {
                    let mut y = vec![f32::NAN; rows];
                    gemv_with(k, &m, &x, &mut y);
                    y
                })
                .collect();
            for (k, y) in i8_kernels.iter().zip(&results) {
                // Integer accumulation: every int8 path equals the scalar one bit for bit.
                assert_eq!(y, &results[0], "{k} vs lut-i8-scalar {rows}x{cols}");
            }
            // Rounding moves each activation by at most half a step (max|x| / 254).
            for r in 0..rows {
                let bound = m.scales[r].abs() * (cols as f32 * max_abs / 254.0) * 1.001
                    + 1e-5 * magnitudes(&m, &x)[r];
                assert!(
                    (results[0][r] - want[r]).abs() <= bound,
                    "{rows}x{cols} row {r}: {} vs {}",
                    results[0][r],
                    want[r]
                );
            }
        }
    }
    // Integers within ±127 whose maximum is 127 quantize exactly, so the result is exact.
    let (rows, cols) = (45, 1000);
    let mut m = random_matrix(&mut rng, rows, cols);
    m.scales = vec![1.0; rows];
    let mut x: Vec<f32> = (0..cols)
        .map(|_| (rng.next_u64() % 255) as f32 - 127.0)
        .collect();
    x[17] = 127.0;
    let dense = m.unpack();
    let want: Vec<f32> = (0..rows)
        .map(|r| (0..cols).map(|j| dense[r * cols + j] * x[j]).sum())
        .collect();
    for &k in &i8_kernels {
        let mut y = vec![0.0; rows];
        gemv_with(k, &m, &x, &mut y);
        assert_eq!(y, want, "{k}");
    }
}

fn dense_magnitudes(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    (0..rows)
        .map(|r| (0..cols).map(|j| (w[r * cols + j] * x[j]).abs()).sum())
        .collect()
}

#[test]
fn dense_kernels_match_reference() {
    let mut rng = Rng(9);
    for &cols in &[1usize, 7, 15, 16, 17, 31, 33, 63, 64, 65, 576, 1000] {
        let rows = 23;
        let w32: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let w16_as_f32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let mut buffer = rng.activations(cols);
        buffer.extend([f32::NAN; 40]);
        let x = &buffer[..cols];
        let want32: Vec<f32> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|j| w32[r * cols + j] as f64 * x[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let want16: Vec<f32> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|j| w16_as_f32[r * cols + j] as f64 * x[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let mags32 = dense_magnitudes(&w32, rows, cols, x);
        let mags16 = dense_magnitudes(&w16_as_f32, rows, cols, x);
        for kernel in DenseKernel::available() {
            let mut y1 = vec![0.0; rows];
            gemv_f32_with(kernel, &w32, rows, cols, x, &mut y1);
            assert_close(
                &y1,
                &want32,
                &mags32,
                &format!("f32 {} cols {cols}", kernel.name()),
            );
            let y2 = by_row_parts(rows, 1, 3, |r, y| {
                gemv_f32_with(
                    kernel,
                    &w32[r.start * cols..r.end * cols],
                    r.len(),
                    cols,
                    x,
                    y,
                )
            });
            assert_eq!(y1, y2, "f32 {} row parts", kernel.name());
            let mut y1 = vec![0.0; rows];
            gemv_f16_with(kernel, &w16, rows, cols, x, &mut y1);
            assert_close(
                &y1,
                &want16,
                &mags16,
                &format!("f16 {} cols {cols}", kernel.name()),
            );
            let y2 = by_row_parts(rows, 1, 2, |r, y| {
                gemv_f16_with(
                    kernel,
                    &w16[r.start * cols..r.end * cols],
                    r.len(),
                    cols,
                    x,
                    y,
                )
            });
            assert_eq!(y1, y2, "f16 {} row parts", kernel.name());
        }
    }
}

#[test]
fn q8_head_gemv_matches_dequantized_reference() {
    let mut rng = Rng(11);
    for &cols in &[1usize, 7, 31, 32, 33, 63, 64, 65, 576, 1000] {
        let rows = 21;
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let m = Q8Matrix::quantize(&w, rows, cols);
        assert_eq!(
            Q8Matrix::quantize(&w16, rows, cols).blocks_per_row,
            cols.div_ceil(32)
        );
        let dequantized = m.dequantize();
        // Rounding error of each weight is at most half its block's step.
        for r in 0..rows {
            for c in 0..cols {
                let step = m.scales[r * m.blocks_per_row + c / 32];
                assert!(
                    (dequantized[r * cols + c] - w[r * cols + c]).abs()
                        <= step * 0.5 * 1.0001 + 1e-7
                );
            }
        }
        let mut buffer = rng.activations(cols);
        buffer.extend([f32::NAN; 40]);
        let x = &buffer[..cols];
        let want: Vec<f32> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|j| dequantized[r * cols + j] as f64 * x[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let mags = dense_magnitudes(&dequantized, rows, cols, x);
        // All but the scalar path quantize x to int16: each activation moves by at most
        // max|x| / 65534.
        let max_abs = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let x_error: Vec<f32> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|j| dequantized[r * cols + j].abs())
                    .sum::<f32>()
                    * max_abs
                    / 65534.0
            })
            .collect();
        // The int8-activation path has its own test (`int8_activation_heads_...`).
        for kernel in DenseKernel::available()
            .into_iter()
            .filter(|k| !k.int8_activations())
        {
            let mut y1 = vec![0.0; rows];
            gemv_q8_with(kernel, &m, x, &mut y1);
            let simd = kernel != DenseKernel::Scalar;
            for r in 0..rows {
                let x_part = if simd { x_error[r] * 1.01 } else { 0.0 };
                let tolerance = 1e-5 * mags[r] + x_part + f32::MIN_POSITIVE;
                let what = format!("q8 {} cols {cols} row {r}", kernel.name());
                assert!(
                    (y1[r] - want[r]).abs() <= tolerance,
                    "{what}: {} vs {}",
                    y1[r],
                    want[r]
                );
            }
            let y2 = by_row_parts(rows, 1, 3, |r, y| gemm_q8_rows(kernel, &m, r, x, 1, y));
            assert_eq!(y1, y2, "q8 {} row parts", kernel.name());
        }
    }
}

/// The multi-vector dense products (the LM head over many positions) give exactly what one
/// GEMV per vector gives, for every kernel, split of the rows and shape (row counts across the
/// 64-row tile boundary, widths that are not whole blocks).
#[test]
fn dense_and_q8_gemm_equal_gemv_per_vector() {
    let mut rng = Rng(29);
    for &(rows, cols) in &[(1usize, 7usize), (63, 33), (64, 64), (65, 576), (200, 100)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let q8 = Q8Matrix::quantize(&w, rows, cols);
        for n in [1usize, 2, 5] {
            let xs = rng.activations(n * cols);
            for kernel in DenseKernel::available() {
                for parts in [1, 3] {
                    let what = format!(
                        "{} rows {rows} cols {cols} n {n} parts {parts}",
                        kernel.name()
                    );
                    let per_vector = |gemv: &dyn Fn(&[f32], &mut [f32])| -> Vec<f32> {
                        let mut ys = vec![0f32; n * rows];
                        for (x, y) in xs.chunks_exact(cols).zip(ys.chunks_exact_mut(rows)) {
                            gemv(x, y);
                        }
                        ys
                    };
                    let ys = by_row_parts(rows, n, parts, |r, ys| {
                        gemm_q8_rows(kernel, &q8, r, &xs, n, ys)
                    });
                    assert_eq!(
                        ys,
                        per_vector(&|x, y| gemv_q8_with(kernel, &q8, x, y)),
                        "q8 {what}"
                    );
                    let ys = by_row_parts(rows, n, parts, |r, ys| {
                        gemm_dense_with(kernel, &w16[r.start * cols..r.end * cols], cols, &xs, ys)
                    });
                    let want = per_vector(&|x, y| gemv_f16_with(kernel, &w16, rows, cols, x, y));
                    assert_eq!(ys, want, "f16 {what}");
                    let ys = by_row_parts(rows, n, parts, |r, ys| {
                        gemm_dense_with(kernel, &w[r.start * cols..r.end * cols], cols, &xs, ys)
                    });
                    let want = per_vector(&|x, y| gemv_f32_with(kernel, &w, rows, cols, x, y));
                    assert_eq!(ys, want, "f32 {what}");
                }
            }
        }
    }
}

/// Quantized-head shapes: one row, widths around whole blocks of 32, odd and even block
/// counts (the int8 kernels take blocks in pairs and quads), several 16-block scale registers.
const HEAD_SHAPES: [(usize, usize); 11] = [
    (1, 7),
    (21, 31),
    (21, 32),
    (63, 33),
    (65, 64),
    (21, 65),
    (70, 576),
    (9, 1000),
    (5, 8 * 32 * 3 + 5),
    (5, 17 * 32),
    (3, 33 * 32 + 5),
];

/// The 4-bit head: quantization round trip, every kernel exactly equal to the integer reference
/// (`Scalar`), all within the int16 activation error of an f64 product of the dequantized
/// weights, and GEMM equal to per-vector GEMVs for every split of the rows.
#[test]
fn q4_head_is_exact_against_its_reference_and_close_to_f64() {
    let mut rng = Rng(31);
    for &(rows, cols) in &HEAD_SHAPES {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let m = Q4Matrix::quantize(&w, rows, cols);
        assert_eq!(m.codes.len(), rows * cols.div_ceil(32) * 16);
        let dequantized = m.dequantize();
        // Each weight moves by at most half a step, except near the opposite of the block's
        // extreme, which the codes reach only to 7 steps (q4_0's range is -8..=7): about one step.
        for r in 0..rows {
            for c in 0..cols {
                let step = m.scales[r * m.blocks_per_row + c / 32].to_f32().abs();
                let (d, v) = (dequantized[r * cols + c], w[r * cols + c]);
                // (f16 rounding of the scale can put the extreme a hair past 8 steps.)
                let bound = ((v / step).abs() - 7.0).max(0.5);
                assert!(
                    (d - v).abs() <= step * bound * 1.0001 + 1e-7,
                    "q4 rounding at ({r}, {c}): {v} -> {d}, step {step}"
                );
            }
        }
        // Quantizing the dequantized matrix gives it back (what re-writing a read file does).
        assert_eq!(Q4Matrix::quantize(&dequantized, rows, cols), m);
        for n in [1usize, 3] {
            let mut buffer = rng.activations(n * cols);
            buffer.extend([f32::NAN; 40]);
            let xs = &buffer[..n * cols];
            let mut reference = vec![f32::NAN; n * rows];
            gemm_q4_with(DenseKernel::Scalar, &m, xs, n, &mut reference);
            for t in 0..n {
                let x = &xs[t * cols..(t + 1) * cols];
                let max_abs = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for r in 0..rows {
                    let row = &dequantized[r * cols..(r + 1) * cols];
                    let want: f64 = row.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
                    let mag: f32 = row.iter().zip(x).map(|(w, x)| (w * x).abs()).sum();
                    let x_error = row.iter().map(|w| w.abs()).sum::<f32>() * max_abs / 65534.0;
                    let got = reference[t * rows + r];
                    assert!(
                        (got as f64 - want).abs() <= (1e-5 * mag + 1.01 * x_error) as f64 + 1e-30,
                        "q4 reference rows {rows} cols {cols} row {r}: {got} vs {want}"
                    );
                }
            }
            for kernel in DenseKernel::available()
                .into_iter()
                .filter(|k| !k.int8_activations())
            {
                for parts in [1, 3] {
                    let ys = by_row_parts(rows, n, parts, |r, ys| {
                        gemm_q4_rows(kernel, &m, r, xs, n, ys)
                    });
                    assert_eq!(
                        ys,
                        reference,
                        "q4 {} rows {rows} cols {cols} n {n} parts {parts}",
                        kernel.name()
                    );
                    let y = by_row_parts(rows, 1, parts, |r, y| {
                        gemm_q4_rows(kernel, &m, r, &xs[..cols], 1, y)
                    });
                    assert_eq!(y, reference[..rows], "q4 gemv {}", kernel.name());
                    let mut y = vec![f32::NAN; rows];
                    gemv_q4_with(kernel, &m, &xs[..cols], &mut y);
                    assert_eq!(y, reference[..rows], "q4 gemv {}", kernel.name());
                }
            }
        }
    }
}

/// The q8_0 and q4_0 heads with int8 activations (`DenseKernel::Avx512Vnni` and `Avx2Int8`,
/// llama.cpp's arithmetic for those formats): the lane-by-lane references are within the int8
/// rounding of the activations (half a step of each block's `max|x| / 127`) of an f64 product
/// of the dequantized weights, and every int8 kernel this CPU has equals them bit for bit for
/// every width (odd block counts, partial blocks, one row), split of the rows and batch.
#[test]
fn int8_activation_heads_match_their_references_and_f64() {
    use binllm_kernels::head_i8::{dot_q4_reference, dot_q8_reference, I8Activations};
    let int8_kernels: Vec<DenseKernel> = DenseKernel::available()
        .into_iter()
        .filter(|k| k.int8_activations())
        .collect();
    let mut rng = Rng(37);
    for &(rows, cols) in &HEAD_SHAPES {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let q8 = Q8Matrix::quantize(&w, rows, cols);
        let q4 = Q4Matrix::quantize(&w, rows, cols);
        let blocks = cols.div_ceil(32);
        for n in [1usize, 3] {
            let mut buffer = rng.activations(n * cols);
            buffer.extend([f32::NAN; 40]);
            let xs = &buffer[..n * cols];
            let mut want_q8 = vec![0f32; n * rows];
            let mut want_q4 = vec![0f32; n * rows];
            for t in 0..n {
                let x = &xs[t * cols..(t + 1) * cols];
                let act_q8 = I8Activations::for_q8_0(x, blocks);
                let act_q4 = I8Activations::for_q4_0(x, blocks);
                // Each activation moves by at most half its block's step.
                let half_steps: Vec<f32> = (0..cols)
                    .map(|j| {
                        let block = &x[j / 32 * 32..((j / 32 + 1) * 32).min(cols)];
                        block.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 254.0
                    })
                    .collect();
                for (m, want, name) in [
                    (q8.dequantize(), &mut want_q8, "q8"),
                    (q4.dequantize(), &mut want_q4, "q4"),
                ] {
                    for r in 0..rows {
                        let row = &m[r * cols..(r + 1) * cols];
                        let exact: f64 =
                            row.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
                        let mag: f32 = row.iter().zip(x).map(|(w, x)| (w * x).abs()).sum();
                        let x_error: f32 =
                            row.iter().zip(&half_steps).map(|(w, h)| w.abs() * h).sum();
                        let got = if name == "q8" {
                            dot_q8_reference(&q8, r, &act_q8)
                        } else {
                            dot_q4_reference(&q4, r, &act_q4)
                        };
                        assert!(
                            (got as f64 - exact).abs() <= (1e-5 * mag + 1.01 * x_error) as f64 + 1e-30,
                            "{name} int8 reference rows {rows} cols {cols} row {r}: {got} vs {exact}"
                        );
                        want[t * rows + r] = got;
                    }
                }
            }
            for (&kernel, parts) in int8_kernels.iter().flat_map(|k| [(k, 1), (k, 3)]) {
                let what = format!(
                    "{} rows {rows} cols {cols} n {n} parts {parts}",
                    kernel.name()
                );
                let ys = by_row_parts(rows, n, parts, |r, ys| {
                    gemm_q8_rows(kernel, &q8, r, xs, n, ys)
                });
                assert_eq!(ys, want_q8, "q8 {what}");
                let ys = by_row_parts(rows, n, parts, |r, ys| {
                    gemm_q4_rows(kernel, &q4, r, xs, n, ys)
                });
                assert_eq!(ys, want_q4, "q4 {what}");
                let mut ys = vec![f32::NAN; n * rows];
                gemm_q8_with(kernel, &q8, xs, n, &mut ys);
                assert_eq!(ys, want_q8, "q8 {what}");
                gemm_q4_with(kernel, &q4, xs, n, &mut ys);
                assert_eq!(ys, want_q4, "q4 {what}");
                let y = by_row_parts(rows, 1, parts, |r, y| {
                    gemm_q8_rows(kernel, &q8, r, &xs[..cols], 1, y)
                });
                assert_eq!(y, want_q8[..rows], "q8 gemv {what}");
                let mut y = vec![f32::NAN; rows];
                gemv_q8_with(kernel, &q8, &xs[..cols], &mut y);
                assert_eq!(y, want_q8[..rows], "q8 gemv {what}");
            }
        }
    }
    // A NaN activation makes its rows NaN, as in the other paths.
    let q8 = Q8Matrix::quantize(&[0.5f32; 64], 1, 64);
    let mut x = vec![1.0f32; 64];
    x[40] = f32::NAN;
    assert!(dot_q8_reference(&q8, 0, &I8Activations::for_q8_0(&x, 2)).is_nan());
}
