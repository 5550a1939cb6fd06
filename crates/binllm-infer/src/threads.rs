//! Threads: one rayon pool per model, and per layer shape the thread count a single-token
//! product runs with. Waking a pool thread costs a few microseconds, as much as a whole small
//! GEMV (binllm-kernels' BENCHMARKS.md), so decode may be fastest single-threaded for small
//! layers and multi-threaded only for large ones (the LM head); [`Model::tune_threads`]
//! measures both at load and keeps the faster.

use std::time::Instant;

use anyhow::{anyhow, Result};

use crate::model::Model;

pub struct ThreadPlan {
    pub threads: usize,
    pool: Option<rayon::ThreadPool>,
    /// Threads for the LM head GEMV.
    pub head_threads: usize,
}

impl ThreadPlan {
    /// `threads == 0`: every core.
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("binllm-{i}"))
                    .build()
                    .map_err(|e| anyhow!("cannot start {threads} threads: {e}"))?,
            )
        } else {
            None
        };
        Ok(ThreadPlan {
            threads,
            pool,
            head_threads: threads,
        })
    }

    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

/// Median time of `reps` calls after one warm-up call.
fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

impl Model {
    /// Every product with all threads (no tuning).
    pub(crate) fn use_threads_everywhere(&mut self) {
        let threads = self.plan.threads;
        for layer in &mut self.layers {
            for l in layer.linears_mut() {
                l.gemv_threads = threads;
            }
        }
        self.plan.head_threads = threads;
    }

    /// Picks, per layer shape (the same for every layer), one thread or all of them for
    /// decode products, whichever the measurement here says is faster.
    pub(crate) fn tune_threads(&mut self) {
        let threads = self.plan.threads;
        if threads <= 1 {
            self.use_threads_everywhere();
            return;
        }
        let Some(first) = self.layers.first() else {
            return;
        };
        // Index into Layer::linears_mut order: q k v o gate up down.
        let mut choice = [threads; 7];
        {
            let linears = [
                &first.q,
                &first.k,
                &first.v,
                &first.o,
                &first.gate,
                &first.up,
                &first.down,
            ];
            for (i, l) in linears.iter().enumerate() {
                let x = vec![0.5f32; l.cols()];
                let mut y = vec![0f32; l.rows()];
                let time = |t: usize, y: &mut [f32]| {
                    self.plan
                        .install(|| median_seconds(41, || l.matrix.gemv(&x, y, t)))
                };
                let one = time(1, &mut y);
                let all = time(threads, &mut y);
                choice[i] = if one <= all { 1 } else { threads };
            }
        }
        let head = self.head();
        let x = vec![0.5f32; self.config.hidden_size];
        let mut y = vec![0f32; head.rows()];
        let one = self
            .plan
            .install(|| median_seconds(7, || head.gemv(&x, &mut y, 1)));
        let all = self
            .plan
            .install(|| median_seconds(7, || head.gemv(&x, &mut y, threads)));
        let head_threads = if one <= all { 1 } else { threads };
        for layer in &mut self.layers {
            for (l, &t) in layer.linears_mut().into_iter().zip(&choice) {
                l.gemv_threads = t;
            }
        }
        self.plan.head_threads = head_threads;
    }
}
