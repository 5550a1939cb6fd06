//! `binllm bench --model model.b1`: prompt-processing and decode speed of the packed runtime,
//! measured the way llama.cpp's llama-bench does (pp: P tokens from an empty context in one
//! batch; tg: G tokens one at a time from an empty context; mean and standard deviation over
//! repetitions), beside this machine's memory bandwidth.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use binllm_infer::sampling::{argmax, SplitMix64};
use binllm_infer::{KvCache, Model};

use crate::options::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (mean, var.sqrt())
}

/// GB/s of a 256 MiB copy (bytes copied per second) and of a 256 MiB read, best of 5.
pub fn memory_bandwidth() -> (f64, f64) {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut copy = f64::MAX;
    let mut read = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        copy = copy.min(t.elapsed().as_secs_f64());
        let words: &[u64] = bytemuck_u64(&src);
        let t = Instant::now();
        let mut acc = [0u64; 8];
        for chunk in words.chunks_exact(8) {
            for (a, w) in acc.iter_mut().zip(chunk) {
                *a = a.wrapping_add(*w);
            }
        }
        std::hint::black_box(acc);
        read = read.min(t.elapsed().as_secs_f64());
    }
    (n as f64 / copy / 1e9, n as f64 / read / 1e9)
}

fn bytemuck_u64(bytes: &[u8]) -> &[u64] {
    // SAFETY: u64 has no invalid bit patterns; align_to hands back only the aligned middle.
    let (_, words, _) = unsafe { bytes.align_to::<u64>() };
    words
}

pub fn run(args: Args) -> Result<()> {
    let (model, packed) = Model::load(&args.model, &args.runtime.runtime_options())?;
    let vocab = model.config.vocab_size as u64;
    let mut rng = SplitMix64::new(1);
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let reps = args.reps.max(1);

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    // One untimed round warms caches and the thread pool, as llama-bench does.
    for rep in 0..=reps {
        if args.prompt_tokens > 0 {
            let mut cache = KvCache::new(&model.config);
            let t = Instant::now();
            model.forward(&mut cache, &prompt)?;
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                pp.push(args.prompt_tokens as f64 / s);
            }
        }
        if args.gen_tokens > 0 {
            let mut cache = KvCache::new(&model.config);
            let mut token = prompt.first().copied().unwrap_or(1);
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                let logits = model.forward(&mut cache, &[token])?;
                token = argmax(&logits);
            }
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                tg.push(args.gen_tokens as f64 / s);
            }
        }
    }
    let (copy_gbs, read_gbs) = memory_bandwidth();
    let file_size = std::fs::metadata(&args.model)?.len();
    let bpw = packed.bits_per_weight();
    let bytes_per_token = model.bytes_per_token() as f64;
    let (pp_mean, pp_sd) = if pp.is_empty() {
        (0.0, 0.0)
    } else {
        mean_sd(&pp)
    };
    let (tg_mean, tg_sd) = if tg.is_empty() {
        (0.0, 0.0)
    } else {
        mean_sd(&tg)
    };
    let streamed_gbs = bytes_per_token * tg_mean / 1e9;

    if args.json {
        let report = serde_json::json!({
            "model": args.model,
            "file_bytes": file_size,
            "threads": model.threads(),
            "kernel": model.kernel().name(),
            "head": model.head().label(),
            "head_kernel": model.head().kernel().name(),
            "bits_per_weight": bpw,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "pp_tokens_per_second": pp_mean,
            "pp_sd": pp_sd,
            "tg_tokens_per_second": tg_mean,
            "tg_sd": tg_sd,
            "pp_samples": pp,
            "tg_samples": tg,
            "weight_bytes_per_token": bytes_per_token,
            "weights_streamed_gb_per_second": streamed_gbs,
            "memcpy_gb_per_second": copy_gbs,
            "read_gb_per_second": read_gbs,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model            {} ({:.2} MiB, head {}, head kernel {})",
        args.model.display(),
        file_size as f64 / (1 << 20) as f64,
        model.head().label(),
        model.head().kernel().name()
    );
    println!(
        "bits/weight      body {:.4}, embeddings+head {:.3}, whole model {:.4}",
        bpw.body, bpw.embeddings_and_head, bpw.whole_model
    );
    println!(
        "threads          {} (each product split by rows across them; 1-bit kernel {})",
        model.threads(),
        model.kernel()
    );
    println!("memory           memcpy {copy_gbs:.1} GB/s (bytes copied), read {read_gbs:.1} GB/s (256 MiB, 1 thread)");
    println!();
    println!("| test | tokens/s | ± |");
    println!("|---|---|---|");
    if !pp.is_empty() {
        println!("| pp{} | {pp_mean:.2} | {pp_sd:.2} |", args.prompt_tokens);
    }
    if !tg.is_empty() {
        println!("| tg{} | {tg_mean:.2} | {tg_sd:.2} |", args.gen_tokens);
    }
    println!();
    println!(
        "decode streams {:.1} MB of weights per token: {streamed_gbs:.1} GB/s, {:.0}% of the measured read bandwidth",
        bytes_per_token / 1e6,
        100.0 * streamed_gbs / read_gbs
    );
    Ok(())
}
