//! Autoregressive generation on the libtorch model: prefill the prompt once, then one token
//! at a time through the KV cache, picking tokens with the shared sampler.

use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::model::{KvCache, Llama};

// One set of options and statistics for both engines, so `generate` and `run` report alike.
use binllm_infer::generate::decode;
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
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let limit = model.config.max_position_embeddings;
    anyhow::ensure!(
        prompt.len() <= limit,
        "the prompt has {} tokens, more than the model's context of {limit}",
        prompt.len()
    );
    let _no_grad = tch::no_grad_guard();
    let mut cache = KvCache::new(model.config.num_layers);
    let device = model.device();
    let as_tensor = |ids: &[u32]| {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::from_slice(&ids).unsqueeze(0).to_device(device)
    };

    let started = Instant::now();
    let hidden = model.forward_hidden(&as_tensor(prompt), Some(&mut cache));
    let logits = last_logits(&model.logits(&hidden.narrow(1, -1, 1)))?;
    let prefill_seconds = started.elapsed().as_secs_f64();

    let mut stats = decode(
        options,
        prompt,
        logits,
        limit - prompt.len(),
        on_token,
        |next| last_logits(&model.forward(&as_tensor(&[next]), Some(&mut cache))),
    )?;
    stats.prompt_tokens = prompt.len();
    stats.prefill_seconds = prefill_seconds;
    Ok(stats)
}
