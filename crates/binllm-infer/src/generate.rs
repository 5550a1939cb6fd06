//! Autoregressive generation on the packed runtime: the prompt through the model once (GEMM),
//! then one token at a time through the KV cache (GEMV), tokens picked by the shared sampler.
//! A prompt that extends what the cache already holds (a chat's next turn) only runs the new
//! part.

use std::time::Instant;

use anyhow::{bail, ensure, Result};

use crate::model::{KvCache, Model};
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at any of these tokens (not emitted).
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Prompt tokens run through the model (those the cache did not already hold).
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// True when generation stopped at the context length.
    pub hit_context_limit: bool,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Decode speed, counting the tokens produced after the first (which comes from prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Feeds `prompt` (the whole text so far, as tokens) to the model, reusing the longest
/// prefix the cache already holds, and returns the logits after its last token.
pub fn prefill(model: &Model, cache: &mut KvCache, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
    ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let limit = model.config.max_position_embeddings;
    if prompt.len() > limit {
        bail!(
            "the prompt has {} tokens, more than the model's context of {limit}",
            prompt.len()
        );
    }
    let common = cache.shared_prefix(prompt);
    // At least one token must run to produce logits.
    let keep = common.min(prompt.len() - 1);
    cache.truncate(keep);
    let logits = model.forward(cache, &prompt[keep..])?;
    Ok((logits, prompt.len() - keep))
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id as soon
/// as it is chosen; `on_token` returns false to stop early. The cache ends holding the prompt
/// and every generated token but the last.
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stats = GenerationStats::default();

    let started = Instant::now();
    let (mut logits, fed) = prefill(model, cache, prompt)?;
    stats.prompt_tokens = fed;
    stats.prefill_seconds = started.elapsed().as_secs_f64();

    let limit = model.config.max_position_embeddings;
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
        if cache.len() + 1 >= limit {
            stats.hit_context_limit = true;
            break;
        }
        logits = model.forward(cache, &[next])?;
    }
    stats.decode_seconds = decode_started.elapsed().as_secs_f64();
    Ok(stats)
}
