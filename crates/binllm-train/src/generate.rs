//! Autoregressive generation on the libtorch model: prefill the prompt once, then one token
//! at a time through the KV cache, picking tokens with the shared sampler.

use std::time::Instant;

use anyhow::Result;
use binllm_infer::sampling::Sampler;
use tch::{Kind, Tensor};

use crate::model::{KvCache, Llama};

// One set of options and statistics for both engines, so `generate` and `run` report alike.
pub use binllm_infer::generate::{GenerateOptions, GenerationStats};

fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let last = logits
        .select(1, -1)
        .squeeze_dim(0)
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu);
    Ok(Vec::<f32>::try_from(&last)?)
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id as soon
/// as it is chosen; `on_token` returns false to stop early.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let _no_grad = tch::no_grad_guard();
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut cache = KvCache::new(model.config.num_layers);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let device = model.device();
    let as_tensor = |ids: &[u32]| {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::from_slice(&ids).unsqueeze(0).to_device(device)
    };

    let started = Instant::now();
    let hidden = model.forward_hidden(&as_tensor(prompt), Some(&mut cache));
    let mut logits = last_logits(&model.logits(&hidden.narrow(1, -1, 1)))?;
    stats.prefill_seconds = started.elapsed().as_secs_f64();

    let decode_started = Instant::now();
    for _ in 0..options.max_tokens {
        let next = sampler.sample(&mut logits, &history);
        if options.stop_tokens.contains(&next) {
            break;
        }
        stats.generated_tokens += 1;
        history.push(next);
        if !on_token(next)? || stats.generated_tokens == options.max_tokens {
            break;
        }
        logits = last_logits(&model.forward(&as_tensor(&[next]), Some(&mut cache)))?;
    }
    stats.decode_seconds = decode_started.elapsed().as_secs_f64();
    Ok(stats)
}
