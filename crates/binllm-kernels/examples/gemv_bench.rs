//! Figures for the 1-bit kernels at SmolLM2-135M shapes, against references measured in the
//! same run: DRAM bandwidth (large memcpy and large read), L2-resident read bandwidth, a dense
//! f32 GEMV of the same shape, and the f16 LM-head GEMV.
//!
//!     cargo run -p binllm-kernels --release --example gemv_bench [-- --quick] [-- --no-scalar]
//!
//! Every product runs on one thread (the kernels have no threading of their own; the
//! runtime's thread team is measured by `binllm bench --threads N`). Times are the minimum
//! over several batches (the machine is shared: the minimum is the
//! least disturbed figure). GB/s counts the bytes of weights a product must read (packed sign
//! bits for 1-bit kernels, the f32/f16 matrix for dense ones), not activations.

use binllm_kernels::{
    gemv_f16_with, gemv_f32_with, gemv_q4_with, gemv_q8_with, pack_signs, DenseKernel, Kernel,
    PackedMatrix, PreparedMatrix, Q4Matrix, Q8Matrix,
};
use half::f16;
use std::hint::black_box;

mod support;
use support::{seconds_per_call, Rng};

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// Read bandwidth over `buf`: sixteen independent sums, compiled for AVX2 where available (two
/// ymm accumulators' worth), so add latency does not limit the read rate.
fn read_all(buf: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: feature checked above.
        return unsafe { read_all_avx2(buf) };
    }
    read_all_portable(buf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_all_avx2(buf: &[f32]) -> f32 {
    read_all_portable(buf)
}

#[inline(always)]
fn read_all_portable(buf: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for chunk in buf.chunks_exact(16) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let with_scalar = !args.iter().any(|a| a == "--no-scalar");
    let budget = if quick { 0.05 } else { 0.25 };
    let mut rng = Rng(42);

    println!("# binllm-kernels gemv_bench");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "cpu: {} ({} logical cpus), kernels available: {}, best: {}, dense best: {}",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        Kernel::available()
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(" "),
        Kernel::best(),
        DenseKernel::best().name()
    );

    // References.
    let big = 256 << 20;
    let src = rng.vec(big / 4);
    let mut dst = vec![0.0f32; big / 4];
    let memcpy_s = seconds_per_call(budget * 4.0, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let dram_read_s = seconds_per_call(budget * 4.0, || {
        black_box(read_all(black_box(&src)));
    });
    let l2_buf = rng.vec((256 << 10) / 4);
    let l2_read_s = seconds_per_call(budget, || {
        black_box(read_all(black_box(&l2_buf)));
    });
    let memcpy_gbps = gbps(big, memcpy_s);
    let dram_gbps = gbps(big, dram_read_s);
    let l2_gbps = gbps(256 << 10, l2_read_s);
    println!();
    println!("## references (1 thread)");
    println!("| reference | GB/s |");
    println!("|---|---|");
    println!("| memcpy 256 MiB (bytes copied / s) | {memcpy_gbps:.1} |");
    println!("| read 256 MiB (DRAM) | {dram_gbps:.1} |");
    println!("| read 256 KiB repeated (L2-resident) | {l2_gbps:.1} |");
    drop((src, dst));

    let shapes: [(usize, usize, &str); 5] = [
        (576, 576, "q/o proj"),
        (192, 576, "k/v proj"),
        (1536, 576, "gate/up"),
        (576, 1536, "down"),
        (4096, 4096, "large"),
    ];
    let mut kernels = Kernel::available();
    if !with_scalar {
        kernels.retain(|&k| k != Kernel::Scalar);
    }

    println!();
    println!("## 1-bit GEMV (W1A16), per product");
    println!(
        "GB/s = packed sign bits read per second. 'vs f32' = dense f32 GEMV time of the same shape"
    );
    println!("/ this time; 'vs L2' and 'vs DRAM' = this GB/s / the reference read GB/s.");
    println!();
    println!("| shape | kernel | us | GB/s | vs f32 dense | vs L2 read | vs DRAM read |");
    println!("|---|---|---|---|---|---|---|");
    for &(rows, cols, what) in &shapes {
        let values = rng.vec(rows * cols);
        let scales = rng.vec(rows);
        let packed = PackedMatrix::from_signs_and_scales(&values, rows, cols, scales);
        let x = rng.vec(cols);
        let mut y = vec![0.0f32; rows];
        let dense_w = packed.unpack();
        let dense_s = seconds_per_call(budget, || {
            gemv_f32_with(
                DenseKernel::best(),
                black_box(&dense_w),
                rows,
                cols,
                black_box(&x),
                &mut y,
            )
        });
        let dense_bytes = rows * cols * 4;
        println!(
            "| {rows}x{cols} ({what}) | dense f32 ({}) | {:.2} | {:.1} | 1.00 | {:.2} | {:.2} |",
            DenseKernel::best().name(),
            dense_s * 1e6,
            gbps(dense_bytes, dense_s),
            gbps(dense_bytes, dense_s) / l2_gbps,
            gbps(dense_bytes, dense_s) / dram_gbps
        );
        for &kernel in &kernels {
            let prepared = PreparedMatrix::new(packed.clone(), kernel);
            let bytes = packed.packed_bytes();
            let scale_budget = if kernel == Kernel::Scalar {
                budget / 2.0
            } else {
                budget
            };
            let s = seconds_per_call(scale_budget, || prepared.gemv(black_box(&x), &mut y));
            println!(
                "| {rows}x{cols} ({what}) | {kernel} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} |",
                s * 1e6,
                gbps(bytes, s),
                dense_s / s,
                gbps(bytes, s) / l2_gbps,
                gbps(bytes, s) / dram_gbps
            );
        }
    }

    println!();
    println!("## int8-activation (W1A8) error against the f32 path");
    println!(
        "relative error = ||y_i8 - y_f32||_2 / ||y_f32||_2 over the rows; 'outliers' puts 1% of"
    );
    println!("activations at 20x the typical magnitude, as LLM hidden states have.");
    println!();
    println!("| shape | activations | relative L2 error | max abs error / max abs y |");
    println!("|---|---|---|---|");
    let i8_kernel = if Kernel::LutI8Avx512.is_available() {
        Kernel::LutI8Avx512
    } else {
        Kernel::LutI8Scalar
    };
    for &(rows, cols, what) in &shapes[..4] {
        let packed =
            PackedMatrix::from_signs_and_scales(&rng.vec(rows * cols), rows, cols, rng.vec(rows));
        let exact = PreparedMatrix::new(packed.clone(), Kernel::best());
        let approximate = PreparedMatrix::new(packed, i8_kernel);
        for outliers in [false, true] {
            let mut x = rng.vec(cols);
            if outliers {
                for v in x.iter_mut().step_by(100) {
                    *v *= 20.0;
                }
            }
            let (mut y32, mut y8) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            exact.gemv(&x, &mut y32);
            approximate.gemv(&x, &mut y8);
            let norm = y32.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let err = y32
                .iter()
                .zip(&y8)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let max_err = y32
                .iter()
                .zip(&y8)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let max_y = y32.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            println!(
                "| {rows}x{cols} ({what}) | {} | {:.2e} | {:.2e} |",
                if outliers {
                    "uniform + 1% outliers"
                } else {
                    "uniform"
                },
                err / norm,
                max_err / max_y
            );
        }
    }

    println!();
    println!("## 1-bit GEMM (prompt processing), n = 64 tokens");
    println!("'vs gemv' = (64 x GEMV time of the same kernel) / GEMM time.");
    println!();
    println!("| shape | kernel | us per token | vs gemv |");
    println!("|---|---|---|---|");
    let n = 64;
    for &(rows, cols, what) in &shapes[..4] {
        let packed = pack_signs(&rng.vec(rows * cols), rows, cols);
        let xs = rng.vec(n * cols);
        let mut ys = vec![0.0f32; n * rows];
        let mut y = vec![0.0f32; rows];
        for &kernel in kernels.iter().filter(|&&k| k != Kernel::Scalar) {
            let prepared = PreparedMatrix::new(packed.clone(), kernel);
            let gemm_s = seconds_per_call(budget, || prepared.gemm(black_box(&xs), n, &mut ys));
            let gemv_s = seconds_per_call(budget / 2.0, || {
                prepared.gemv(black_box(&xs[..cols]), &mut y)
            });
            println!(
                "| {rows}x{cols} ({what}) | {kernel} | {:.2} | {:.2} |",
                gemm_s / n as f64 * 1e6,
                gemv_s * n as f64 / gemm_s
            );
        }
    }

    println!();
    println!("## dense LM head GEMV, 49152x576 (SmolLM2-135M tied embedding): f16, q8_0 and q4_0");
    println!();
    println!(
        "GB/s counts the matrix bytes (f16: 2 per weight; q8_0: 1 per weight + an f32 scale per 32; \
         q4_0: 0.5 per weight + an f16 scale per 32). q8_0/q4_0 activations: int16 per vector \
         (avx2, avx512, portable) or int8 per block of 32 (avx512-vnni, avx2-int8)."
    );
    println!();
    println!("| kernel | ms | GB/s | vs DRAM read | vs memcpy |");
    println!("|---|---|---|---|---|");
    let (head_rows, head_cols) = (49152, 576);
    let head: Vec<f16> = rng
        .vec(head_rows * head_cols)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let x = rng.vec(head_cols);
    let mut y = vec![0.0f32; head_rows];
    let head_bytes = head.len() * 2;
    let mut y_f16 = vec![0.0f32; head_rows];
    for kernel in DenseKernel::available() {
        if kernel == DenseKernel::Scalar && !with_scalar {
            continue;
        }
        let s = seconds_per_call(budget * 2.0, || {
            gemv_f16_with(
                kernel,
                black_box(&head),
                head_rows,
                head_cols,
                black_box(&x),
                &mut y,
            )
        });
        println!(
            "| f16 {} | {:.3} | {:.1} | {:.2} | {:.2} |",
            kernel.name(),
            s * 1e3,
            gbps(head_bytes, s),
            gbps(head_bytes, s) / dram_gbps,
            gbps(head_bytes, s) / memcpy_gbps
        );
    }
    gemv_f16_with(
        DenseKernel::best(),
        &head,
        head_rows,
        head_cols,
        &x,
        &mut y_f16,
    );
    let head_q8 = Q8Matrix::quantize(&head, head_rows, head_cols);
    let head_q4 = Q4Matrix::quantize(
        &head.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(),
        head_rows,
        head_cols,
    );
    drop(head);
    let q8_bytes = head_q8.bytes();
    for kernel in DenseKernel::available() {
        if kernel == DenseKernel::Scalar && !with_scalar {
            continue;
        }
        let s = seconds_per_call(budget * 2.0, || {
            gemv_q8_with(kernel, black_box(&head_q8), black_box(&x), &mut y)
        });
        println!(
            "| q8_0 {} | {:.3} | {:.1} | {:.2} | {:.2} |",
            kernel.name(),
            s * 1e3,
            gbps(q8_bytes, s),
            gbps(q8_bytes, s) / dram_gbps,
            gbps(q8_bytes, s) / memcpy_gbps
        );
    }
    gemv_q8_with(DenseKernel::best(), &head_q8, &x, &mut y);
    let norm = y_f16
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let err = y_f16
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let q4_bytes = head_q4.bytes();
    for kernel in DenseKernel::available() {
        if kernel == DenseKernel::Scalar && !with_scalar {
            continue;
        }
        let s = seconds_per_call(budget * 2.0, || {
            gemv_q4_with(kernel, black_box(&head_q4), black_box(&x), &mut y)
        });
        println!(
            "| q4_0 {} | {:.3} | {:.1} | {:.2} | {:.2} |",
            kernel.name(),
            s * 1e3,
            gbps(q4_bytes, s),
            gbps(q4_bytes, s) / dram_gbps,
            gbps(q4_bytes, s) / memcpy_gbps
        );
    }
    let mut y_q4 = vec![0.0f32; head_rows];
    gemv_q4_with(DenseKernel::best(), &head_q4, &x, &mut y_q4);
    let err_q4 = y_f16
        .iter()
        .zip(&y_q4)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    println!();
    println!(
        "q8_0 head: {:.1} MB read per token vs {:.1} MB for f16; relative L2 error of the logits vs f16: {:.2e}",
        q8_bytes as f64 / 1e6,
        head_bytes as f64 / 1e6,
        err / norm
    );
    println!(
        "q4_0 head: {:.1} MB read per token; relative L2 error of the logits vs f16 (random weights): {:.2e}",
        q4_bytes as f64 / 1e6,
        err_q4 / norm
    );
}
