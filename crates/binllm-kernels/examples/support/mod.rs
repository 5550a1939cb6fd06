//! What the kernel examples share: a small deterministic generator of test values and the
//! timing rule of the benchmarks. Each example uses part of it, hence the allowance below.
#![allow(dead_code)]

use std::time::Instant;

/// A linear congruential generator: the same values on every target and run.
pub struct Rng(pub u64);

impl Rng {
    /// A value in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

/// Seconds per call: the minimum over many short batches after a warm-up. Short batches on a
/// shared machine are often not preempted at all, so the minimum approaches the undisturbed
/// time.
pub fn seconds_per_call(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-9);
    let batches = 31;
    let calls = ((budget / batches as f64) / once).clamp(1.0, 1e6) as usize;
    (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            start.elapsed().as_secs_f64() / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}
