//! What a scale per block of columns (llama-quantize's Q1_0: one per 128 weights) costs the
//! 1-bit GEMV against one scale per row, per kernel, at the wide test Llama's shapes and
//! larger ones: the one-pass LUT path (`lut-*`) and the path by column blocks (every other
//! kernel), each beside the same kernel on the row-scaled matrix of the same signs.
//!
//!     cargo run -p binllm-kernels --release --example block_scaled_bench [-- --quick]
//!
//! Every product runs on one thread. Times are the minimum over many short batches (the
//! machine is shared: the minimum is the least disturbed figure).

use binllm_kernels::{BlockScaledMatrix, BlockScales, Kernel, PackedMatrix, PreparedMatrix};
use half::f16;
use std::hint::black_box;

mod support;
use support::{seconds_per_call, Rng};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = if quick { 0.05 } else { 0.2 };
    let mut rng = Rng(7);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("# binllm-kernels block_scaled_bench (blocks of 128 columns, 1 thread)");
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "'row' = one scale per row; 'block' = a scale per 128 columns; block / row = time ratio."
    );
    println!();
    println!("| shape | kernel | path | row us | block us | block / row |");
    println!("|---|---|---|---:|---:|---:|");
    let shapes: [(usize, usize, &str); 5] = [
        (768, 256, "wide Llama gate/up"),
        (256, 768, "wide Llama down"),
        (576, 1536, "SmolLM2 down"),
        (2048, 2048, "2k square"),
        (4096, 4096, "4k square"),
    ];
    let kernels: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|&k| k != Kernel::Scalar && k != Kernel::LutScalar)
        .collect();
    for (rows, cols, what) in shapes {
        let signs =
            PackedMatrix::from_signs_and_scales(&rng.vec(rows * cols), rows, cols, vec![1.0; rows]);
        let scales: Vec<f16> = (0..rows * cols / 128)
            .map(|_| f16::from_f32(rng.unit().abs() + 0.01))
            .collect();
        let block_scaled =
            BlockScaledMatrix::new(signs.clone(), BlockScales::new(128, cols, scales));
        let x = rng.vec(cols);
        let mut y = vec![0.0f32; rows];
        for &kernel in &kernels {
            let row = PreparedMatrix::new(signs.clone(), kernel);
            let block = PreparedMatrix::block_scaled(block_scaled.clone(), kernel);
            let row_s = seconds_per_call(budget, || row.gemv(black_box(&x), &mut y));
            let block_s = seconds_per_call(budget, || block.gemv(black_box(&x), &mut y));
            let path = if kernel.uses_lut_layout() {
                "one pass"
            } else {
                "column blocks"
            };
            println!(
                "| {rows}x{cols} ({what}) | {kernel} | {path} | {:.2} | {:.2} | {:.2} |",
                row_s * 1e6,
                block_s * 1e6,
                block_s / row_s
            );
        }
    }
}
