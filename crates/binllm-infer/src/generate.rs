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

/// Arg-max decoding of at most `max_tokens`, with no stop tokens: `generate` drops a stop
/// token it meets, but a greedy answer keeps the one it ended with, so the caller stops in
/// its callback instead (which receives every chosen id). Shared with the libtorch engine so
/// both pick their tokens alike.
pub fn greedy_options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop_tokens: Vec::new(),
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
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    let started = Instant::now();
    let (logits, fed) = prefill(model, cache, prompt)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let room = model.config.max_position_embeddings - cache.len();
    let mut stats = decode(options, prompt, logits, room, on_token, |next| {
        model.forward(cache, &[next])
    })?;
    stats.prompt_tokens = fed;
    stats.prefill_seconds = prefill_seconds;
    Ok(stats)
}

/// The decode loop of both engines: picks a token from `logits`, hands it to `on_token`, and
/// asks `next_logits` for the logits after it, until `max_tokens`, a stop token, `on_token`
/// returning false, or the context being full. `prompt` is the text so far (for the
/// repetition penalty); `room` is how many more positions the context holds. Fills in the
/// generated-token count and the decode time.
pub fn decode(
    options: &GenerateOptions,
    prompt: &[u32],
    mut logits: Vec<f32>,
    room: usize,
    mut on_token: impl FnMut(u32) -> Result<bool>,
    mut next_logits: impl FnMut(u32) -> Result<Vec<f32>>,
) -> Result<GenerationStats> {
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stats = GenerationStats::default();
    let started = Instant::now();
    for _ in 0..options.max_tokens {
        // A NaN or inf would be sampled as some token and print garbage: stop instead.
        if let Some(bad) = logits.iter().position(|l| !l.is_finite()) {
            anyhow::bail!(
                "the model produced a non-finite logit ({} for token {bad}) after {} generated tokens: its weights or activations overflow",
                logits[bad],
                stats.generated_tokens
            );
        }
        let next = sampler.sample(&mut logits, &history);
        if options.stop_tokens.contains(&next) {
            break;
        }
        stats.generated_tokens += 1;
        history.push(next);
        if !on_token(next)? || stats.generated_tokens == options.max_tokens {
            break;
        }
        // The token just chosen takes a position; the one after it needs another.
        if stats.generated_tokens + 1 > room {
            stats.hit_context_limit = true;
            break;
        }
        logits = next_logits(next)?;
    }
    stats.decode_seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose greedy pick is `token`.
    fn pointing_at(token: u32) -> Vec<f32> {
        let mut logits = vec![0.0; 8];
        logits[token as usize] = 1.0;
        logits
    }

    /// Runs the loop over a fake model whose next token is always the last one plus one,
    /// returning the emitted tokens, the number of forward calls and the statistics.
    fn run(
        max_tokens: usize,
        room: usize,
        stop: &[u32],
        accept: usize,
    ) -> (Vec<u32>, usize, GenerationStats) {
        let options = GenerateOptions {
            max_tokens,
            sampling: SamplingParams::default(),
            stop_tokens: stop.to_vec(),
        };
        let mut emitted = Vec::new();
        let mut forwards = 0;
        let stats = decode(
            &options,
            &[0],
            pointing_at(1),
            room,
            |t| {
                emitted.push(t);
                Ok(emitted.len() < accept)
            },
            |t| {
                forwards += 1;
                Ok(pointing_at(t + 1))
            },
        )
        .unwrap();
        (emitted, forwards, stats)
    }

    #[test]
    fn non_finite_logits_stop_generation_with_an_error() {
        let options = GenerateOptions {
            max_tokens: 10,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
        };
        let mut emitted = Vec::new();
        let err = decode(
            &options,
            &[0],
            pointing_at(1),
            100,
            |t| {
                emitted.push(t);
                Ok(true)
            },
            |t| {
                let mut logits = pointing_at(t + 1);
                if t == 2 {
                    logits[5] = f32::NAN;
                }
                Ok(logits)
            },
        )
        .unwrap_err();
        assert_eq!(emitted, [1, 2], "nothing is emitted from the bad logits");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("non-finite logit") && msg.contains("token 5") && msg.contains("after 2"),
            "{msg}"
        );
    }

    #[test]
    fn stops_at_max_tokens_without_a_wasted_forward() {
        let (emitted, forwards, stats) = run(3, 100, &[], usize::MAX);
        assert_eq!(emitted, [1, 2, 3]);
        assert_eq!(forwards, 2);
        assert_eq!(stats.generated_tokens, 3);
        assert!(!stats.hit_context_limit);
    }

    #[test]
    fn stop_token_is_not_emitted() {
        let (emitted, _, stats) = run(10, 100, &[4], usize::MAX);
        assert_eq!(emitted, [1, 2, 3]);
        assert_eq!(stats.generated_tokens, 3);
    }

    #[test]
    fn caller_can_stop_early() {
        let (emitted, forwards, _) = run(10, 100, &[], 2);
        assert_eq!(emitted, [1, 2]);
        assert_eq!(forwards, 1);
    }

    #[test]
    fn greedy_options_leave_the_stop_token_to_the_callback() {
        // The callback sees the stop token, keeps it and stops: no forward after it.
        let stop = 4;
        let mut emitted = Vec::new();
        let mut forwards = 0;
        let stats = decode(
            &greedy_options(10),
            &[0],
            pointing_at(1),
            100,
            |t| {
                emitted.push(t);
                Ok(t != stop)
            },
            |t| {
                forwards += 1;
                Ok(pointing_at(t + 1))
            },
        )
        .unwrap();
        assert_eq!(emitted, [1, 2, 3, 4]);
        assert_eq!(forwards, 3);
        assert_eq!(stats.generated_tokens, 4);
    }

    #[test]
    fn context_limit_counts_every_position() {
        // Room for 3 more positions: 3 tokens can be chosen, but only 2 of them fed back.
        let (emitted, forwards, stats) = run(10, 3, &[], usize::MAX);
        assert_eq!(emitted, [1, 2, 3]);
        assert_eq!(forwards, 2);
        assert!(stats.hit_context_limit);
    }
}
