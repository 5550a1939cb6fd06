//! A single-threaded self-check of every available kernel against the scalar references, for
//! targets where the test harness cannot run: qemu-user 7.2 (Debian 12) hangs on thread spawn,
//! so `cargo test` cannot check the aarch64 NEON path under emulation, but this can
//! (`scripts/check-aarch64.sh`). Exits non-zero on the first mismatch.

use binllm_kernels::{
    gemm_with, gemv_f16_with, gemv_f32_with, gemv_q8_with, gemv_with, DenseKernel, Kernel,
    PackedMatrix, Q8Matrix,
};
use half::f16;

mod support;
use support::Rng;

fn check(ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        eprintln!("self_check: FAILED: {}", what());
        std::process::exit(1);
    }
}

fn main() {
    let mut rng = Rng(7);
    let kernels = Kernel::available();
    println!("target: {}, kernels: {:?}", std::env::consts::ARCH, kernels);
    let mut passed = 0;
    for &cols in &[1usize, 7, 31, 63, 64, 65, 100, 576, 1000, 1536] {
        for &rows in &[1usize, 7, 16, 17, 33] {
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
            let scales: Vec<f32> = (0..rows).map(|_| rng.unit()).collect();
            let mut m = PackedMatrix::from_signs_and_scales(&values, rows, cols, scales);
            let padding = !m.tail_mask();
            for r in 0..rows {
                m.bits[(r + 1) * m.words_per_row - 1] |= padding; // garbage that must not matter
            }
            let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 10.0).collect();
            let max_abs = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let l1: f32 = x.iter().map(|v| v.abs()).sum();
            let n = 5;
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
            let mut want = vec![0.0; rows];
            gemv_with(Kernel::Scalar, &m, &x, &mut want);
            for &kernel in &kernels {
                let mut y = vec![0.0; rows];
                gemv_with(kernel, &m, &x, &mut y);
                // Int8 activations move each x by at most max|x| / 254.
                let tolerance = if kernel.is_approximate() {
                    cols as f32 * max_abs / 254.0 * 1.01
                } else {
                    1e-5 * l1
                };
                for r in 0..rows {
                    let bound = m.scales[r].abs() * tolerance + 1e-30;
                    check((y[r] - want[r]).abs() <= bound, || {
                        format!("{kernel} {rows}x{cols} row {r}: {} vs {}", y[r], want[r])
                    });
                }
                let mut ys = vec![0.0; n * rows];
                gemm_with(kernel, &m, &xs, n, &mut ys);
                for v in 0..n {
                    let mut yv = vec![0.0; rows];
                    gemv_with(kernel, &m, &xs[v * cols..(v + 1) * cols], &mut yv);
                    check(ys[v * rows..(v + 1) * rows] == yv[..], || {
                        format!("{kernel} gemm {rows}x{cols} vector {v}")
                    });
                }
                passed += 1;
            }
            let w16: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            let q8 = Q8Matrix::quantize(&values, rows, cols);
            let (mut reference, mut y) = (vec![0.0; rows], vec![0.0; rows]);
            for kernel in DenseKernel::available() {
                gemv_f16_with(DenseKernel::Scalar, &w16, rows, cols, &x, &mut reference);
                gemv_f16_with(kernel, &w16, rows, cols, &x, &mut y);
                let ok = reference
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * l1 + 1e-30);
                check(ok, || format!("f16 {} {rows}x{cols}", kernel.name()));
                gemv_f32_with(DenseKernel::Scalar, &values, rows, cols, &x, &mut reference);
                gemv_f32_with(kernel, &values, rows, cols, &x, &mut y);
                let ok = reference
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * l1 + 1e-30);
                check(ok, || format!("f32 {} {rows}x{cols}", kernel.name()));
                gemv_q8_with(DenseKernel::Scalar, &q8, &x, &mut reference);
                gemv_q8_with(kernel, &q8, &x, &mut y);
                // Int16 activations move each x by at most max|x| / 65534; int8 activations
                // per block of 32 (llama.cpp's arithmetic) by at most that block's max / 254.
                let levels = if kernel.int8_activations() {
                    254.0
                } else {
                    65534.0
                };
                let bound = 1e-5 * l1 + cols as f32 * max_abs / levels * 1.01 + 1e-30;
                check(
                    reference
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| (a - b).abs() <= bound),
                    || format!("q8 {} {rows}x{cols}", kernel.name()),
                );
                passed += 3;
            }
        }
    }
    println!("self_check: {passed} passed, 0 failed");
}
