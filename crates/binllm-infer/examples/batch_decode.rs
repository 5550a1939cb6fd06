//! Decode tokens/s of `Model::forward_batch` with B independent sequences (each its own KV
//! cache, a short prompt already in it), against B = 1: how much one batched step gains over
//! stepping the sequences one by one, without any server around it.
//!
//!     cargo run --release -p binllm-infer --example batch_decode -- MODEL.b1 [THREADS] [STEPS] [B,...] [KERNEL]

use std::time::Instant;

use anyhow::{Context, Result};
use binllm_infer::{KvCache, Model, RuntimeOptions};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: batch_decode MODEL.b1 [THREADS] [STEPS] [B,...] [KERNEL]")?;
    let threads: usize = args.next().map_or(Ok(0), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(64), |a| a.parse())?;
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,4,16".into())
        .split(',')
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let kernel = args
        .next()
        .map(|k| k.parse::<binllm_infer::Kernel>())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let options = RuntimeOptions {
        threads,
        kernel,
        ..Default::default()
    };
    let (model, _) = Model::load(std::path::Path::new(&path), &options)?;
    println!(
        "{path}: {} threads, kernel {}, {steps} steps",
        model.threads(),
        model.kernel()
    );
    println!("| sequences | step ms | aggregate tok/s |");
    println!("|---:|---:|---:|");
    for &b in &batches {
        let mut caches: Vec<KvCache> = (0..b)
            .map(|i| {
                let mut cache = KvCache::new(&model.config);
                model.forward(&mut cache, &[1, 2 + i as u32, 3, 4, 5, 6, 7, 8])?;
                Ok(cache)
            })
            .collect::<Result<_>>()?;
        let tokens: Vec<u32> = (0..b as u32).map(|i| 100 + i).collect();
        // One warm-up step, then the timed ones.
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        model.forward_batch(&mut refs, &tokens)?;
        let started = Instant::now();
        for _ in 0..steps {
            model.forward_batch(&mut refs, &tokens)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "| {b} | {:.2} | {:.1} |",
            1e3 * seconds / steps as f64,
            (b * steps) as f64 / seconds
        );
    }
    Ok(())
}
