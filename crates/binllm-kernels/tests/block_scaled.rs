//! Matrices with a scale per block of columns (llama-quantize's Q1_0 / Q2_0 / TQ files) on
//! every kernel: against a float64 dense product of the weights they stand for, exactly on
//! integer inputs, the LUT paths bit for bit against each other, GEMM against GEMV, and row
//! splits (the runtime's threads) against the whole matrix.

use binllm_kernels::{BlockScaledMatrix, BlockScales, Kernel, PackedMatrix, PreparedMatrix};
use half::f16;

mod common;
use common::Rng;

/// (rows, cols, block_cols): Q1_0's 128 at several widths, Q2_0's 64, TQ's 256, Q4_0's 32,
/// and widths whose last block is short or whose rows end inside a 64-bit word.
const SHAPES: [(usize, usize, usize); 14] = [
    (1, 128, 128),
    (16, 256, 128),
    (17, 384, 128),
    (33, 768, 128),
    (70, 2048, 128),
    (15, 128, 64),
    (31, 576, 64),
    (16, 256, 256),
    (45, 768, 256),
    (9, 96, 32),
    (20, 200, 64),
    (7, 160, 128),
    (50, 1000, 96),
    (3, 33, 32),
];

/// A block-scaled matrix and the dense weights it stands for, built apart from the kernels'
/// own unpacking: `dense[r * cols + c] = row_scale[r] * block_scale[r, c / block_cols] *
/// sign(values[r, c])`, in f64. Padding bits past `cols` are set to garbage (no kernel may
/// read them). `scale` draws a scale.
fn random_block_scaled(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    block_cols: usize,
    mut scale: impl FnMut(&mut Rng) -> f32,
) -> (BlockScaledMatrix, Vec<f64>) {
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
    let row_scales: Vec<f32> = (0..rows).map(|_| scale(rng)).collect();
    let blocks_per_row = cols.div_ceil(block_cols);
    let block_scales: Vec<f16> = (0..rows * blocks_per_row)
        .map(|_| f16::from_f32(scale(rng)))
        .collect();
    let mut signs = PackedMatrix::from_signs_and_scales(&values, rows, cols, row_scales.clone());
    let padding = !signs.tail_mask();
    for r in 0..rows {
        signs.bits[(r + 1) * signs.words_per_row - 1] |= padding & rng.next_u64();
    }
    let dense = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let sign = if values[i] >= 0.0 { 1.0 } else { -1.0 };
            row_scales[r] as f64 * block_scales[r * blocks_per_row + c / block_cols].to_f64() * sign
        })
        .collect();
    let m = BlockScaledMatrix::new(signs, BlockScales::new(block_cols, cols, block_scales));
    (m, dense)
}

/// Scales spread over four orders of magnitude, of both signs, as a file's could be.
fn spread_scale(rng: &mut Rng) -> f32 {
    rng.unit() * [1e-3, 0.05, 1.0, 8.0][(rng.next_u64() % 4) as usize]
}

/// `ys[v] = dense xs[v]` in f64, and each output's `sum_c |w x|` (the scale of f32 rounding).
fn f64_product(dense: &[f64], rows: usize, cols: usize, xs: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut want = Vec::new();
    let mut magnitudes = Vec::new();
    for x in xs.chunks_exact(cols) {
        for r in 0..rows {
            let row = &dense[r * cols..(r + 1) * cols];
            want.push(row.iter().zip(x).map(|(w, &x)| w * x as f64).sum());
            magnitudes.push(row.iter().zip(x).map(|(w, &x)| (w * x as f64).abs()).sum());
        }
    }
    (want, magnitudes)
}

fn exact_kernels() -> Vec<Kernel> {
    Kernel::available()
        .into_iter()
        .filter(|k| !k.is_approximate())
        .collect()
}

fn products(kernel: Kernel, m: &BlockScaledMatrix, xs: &[f32], n: usize) -> Vec<f32> {
    let prepared = PreparedMatrix::block_scaled(m.clone(), kernel);
    let mut ys = vec![f32::NAN; n * m.rows()];
    prepared.gemm(xs, n, &mut ys);
    ys
}

#[test]
fn every_exact_kernel_matches_an_f64_dense_product() {
    let mut rng = Rng(21);
    let kernels = exact_kernels();
    assert!(kernels.contains(&Kernel::LutScalar) && kernels.contains(&Kernel::Scalar));
    for (rows, cols, block_cols) in SHAPES {
        let (m, dense) = random_block_scaled(&mut rng, rows, cols, block_cols, spread_scale);
        for n in [1usize, 3, 6] {
            let xs = rng.activations(n * cols);
            let (want, magnitudes) = f64_product(&dense, rows, cols, &xs);
            for &kernel in &kernels {
                let got = products(kernel, &m, &xs, n);
                for (i, ((&got, &want), &mag)) in got.iter().zip(&want).zip(&magnitudes).enumerate()
                {
                    // Another summation order than f64's: 1e-5 of the terms' magnitudes.
                    let tolerance = 1e-5 * mag + 1e-30;
                    assert!(
                        (got as f64 - want).abs() <= tolerance,
                        "{kernel} {rows}x{cols} blocks of {block_cols}, n {n}, output {i}: got \
                         {got}, want {want} (tolerance {tolerance})"
                    );
                }
            }
        }
    }
}

#[test]
fn integer_inputs_and_power_of_two_scales_are_exact() {
    // Every partial sum is an exact f32, so any summation order gives the f64 result; a
    // block or row paired with the wrong scale cannot hide in a tolerance.
    let mut rng = Rng(22);
    let power_of_two =
        |rng: &mut Rng| [0.25f32, -2.0, 1.0, 0.5, 4.0][(rng.next_u64() % 5) as usize];
    for (rows, cols, block_cols) in SHAPES {
        let (m, dense) = random_block_scaled(&mut rng, rows, cols, block_cols, power_of_two);
        let n = 2;
        let xs: Vec<f32> = (0..n * cols)
            // |sum| <= 2048 * 100 * 16 < 2^24: every partial sum is an integer f32 holds.
            .map(|_| (rng.next_u64() % 201) as f32 - 100.0)
            .collect();
        let (want, _) = f64_product(&dense, rows, cols, &xs);
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        for kernel in exact_kernels() {
            assert_eq!(
                products(kernel, &m, &xs, n),
                want,
                "{kernel} {rows}x{cols} blocks of {block_cols}"
            );
        }
    }
}

#[test]
fn lut_paths_are_bit_identical_and_gemm_equals_gemv() {
    let mut rng = Rng(23);
    let luts: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| k.uses_lut_layout())
        .collect();
    for (rows, cols, block_cols) in SHAPES {
        let (m, _) = random_block_scaled(&mut rng, rows, cols, block_cols, spread_scale);
        let n = 5;
        let xs = rng.activations(n * cols);
        let results: Vec<Vec<f32>> = luts.iter().map(|&k| products(k, &m, &xs, n)).collect();
        for (k, ys) in luts.iter().zip(&results) {
            assert_eq!(ys, &results[0], "{k} vs {} {rows}x{cols}", luts[0]);
        }
        for kernel in Kernel::available() {
            let prepared = PreparedMatrix::block_scaled(m.clone(), kernel);
            let mut ys = vec![f32::NAN; n * rows];
            prepared.gemm(&xs, n, &mut ys);
            for (v, x) in xs.chunks_exact(cols).enumerate() {
                let mut y = vec![f32::NAN; rows];
                prepared.gemv(x, &mut y);
                // Tiling over vectors must not change any vector's summation order.
                assert_eq!(
                    &ys[v * rows..(v + 1) * rows],
                    &y[..],
                    "{kernel} {rows}x{cols} blocks of {block_cols}, vector {v}"
                );
            }
        }
    }
}

#[test]
fn row_splits_give_identical_results() {
    let mut rng = Rng(24);
    for (rows, cols, block_cols) in [(70, 2048, 128), (61, 768, 256), (200, 576, 64), (9, 96, 32)] {
        let (m, _) = random_block_scaled(&mut rng, rows, cols, block_cols, spread_scale);
        let n = 3;
        let xs = rng.activations(n * cols);
        for kernel in Kernel::available() {
            let whole = products(kernel, &m, &xs, n);
            // Each part its own prepared matrix of its rows, as each runtime thread holds one;
            // cuts on and off the LUT kernels' 16-row blocks.
            for cuts in [vec![32], vec![16, 48], vec![1, 7, 40], vec![5, 6]] {
                let mut bounds = vec![0];
                bounds.extend(cuts.iter().copied().filter(|&c| c < rows));
                bounds.push(rows);
                let mut ys = vec![f32::NAN; n * rows];
                for range in bounds.windows(2).map(|w| w[0]..w[1]) {
                    let part = products(kernel, &m.rows_slice(range.clone()), &xs, n);
                    for v in 0..n {
                        ys[v * rows + range.start..v * rows + range.end]
                            .copy_from_slice(&part[v * range.len()..(v + 1) * range.len()]);
                    }
                }
                assert_eq!(ys, whole, "{kernel} {rows}x{cols} cut at {cuts:?}");
            }
        }
    }
}

#[test]
fn int8_kernels_stay_within_their_activation_rounding() {
    // By column blocks, each block's input is quantized on its own: every activation moves
    // by at most max|x| / 254.
    let mut rng = Rng(25);
    for kernel in Kernel::available()
        .into_iter()
        .filter(|k| k.is_approximate())
    {
        for (rows, cols, block_cols) in SHAPES {
            let (m, dense) = random_block_scaled(&mut rng, rows, cols, block_cols, spread_scale);
            let x = rng.activations(cols);
            let (want, magnitudes) = f64_product(&dense, rows, cols, &x);
            let max_abs = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
            let got = products(kernel, &m, &x, 1);
            for r in 0..rows {
                let row_l1: f64 = dense[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|w| w.abs())
                    .sum();
                let bound = row_l1 * max_abs / 254.0 * 1.001 + 1e-5 * magnitudes[r];
                assert!(
                    (got[r] as f64 - want[r]).abs() <= bound,
                    "{kernel} {rows}x{cols} row {r}: {} vs {}",
                    got[r],
                    want[r]
                );
            }
        }
    }
}

#[test]
fn scales_that_do_not_fit_are_refused_with_a_reason() {
    let scales = |block_cols, cols, n| BlockScales::new(block_cols, cols, vec![f16::ONE; n]);
    assert_eq!(scales(128, 256, 4).check(2, 256), Ok(()));
    assert_eq!(scales(64, 200, 8).check(2, 200), Ok(()));
    let err = scales(48, 96, 2).check(1, 96).unwrap_err();
    assert!(err.contains("multiple of 32"), "{err}");
    let err = scales(0, 96, 0).check(1, 96).unwrap_err();
    assert!(err.contains("multiple of 32"), "{err}");
    let err = scales(128, 256, 3).check(2, 256).unwrap_err();
    assert!(err.contains("needs 4 block scales"), "{err}");
    // Scales made for another width.
    let err = scales(128, 384, 6).check(2, 256).unwrap_err();
    assert!(err.contains("needs 4 block scales"), "{err}");
    let bad = std::panic::catch_unwind(|| {
        BlockScaledMatrix::new(
            binllm_kernels::pack_signs(&[1.0; 256], 1, 256),
            scales(128, 256, 1),
        )
    });
    assert!(bad.is_err());
}

#[test]
fn packed_bytes_count_sign_bits_and_f16_block_scales() {
    let mut rng = Rng(26);
    let (m, _) = random_block_scaled(&mut rng, 32, 768, 128, spread_scale);
    // 32 rows x 12 words of bits, 32 x 6 f16 scales.
    assert_eq!(m.packed_bytes(), 32 * 12 * 8 + 32 * 6 * 2);
    for kernel in Kernel::available() {
        let prepared = PreparedMatrix::block_scaled(m.clone(), kernel);
        assert_eq!((prepared.rows(), prepared.cols()), (32, 768), "{kernel}");
        if kernel.uses_lut_layout() || kernel.uses_i8_layout() || kernel.uses_lut3_layout() {
            assert!(prepared.packed_bytes() >= m.packed_bytes(), "{kernel}");
        } else {
            assert_eq!(prepared.packed_bytes(), m.packed_bytes(), "{kernel}");
        }
    }
}
