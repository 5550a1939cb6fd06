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

/// How a batched generation picks each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    /// The arg-max (ties to the lowest id).
    Greedy,
    /// Sampling from softmax(logits / temperature), restricted to the smallest set of
    /// tokens whose probabilities reach `top_p` (nucleus sampling; 1 keeps every token).
    Sample { temperature: f64, top_p: f64 },
}

/// One row's output of [`generate_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    /// The new ids; when the row stopped, the stop id is the last one.
    pub ids: Vec<u32>,
    /// Whether the row produced a stop id within the limit.
    pub ended: bool,
}

/// How many of the most likely tokens nucleus sampling considers.
const NUCLEUS_CANDIDATES: i64 = 1024;

/// The next id of every row from last-position logits `[batch, vocab]`.
fn pick_next(logits: &Tensor, pick: Pick) -> Tensor {
    match pick {
        Pick::Greedy => logits.argmax(-1, false),
        Pick::Sample { temperature, top_p } => {
            // The nucleus is drawn from the most likely candidates only: a top-k selection
            // is far cheaper than sorting the whole vocabulary for every row, and at the
            // temperatures used here the nucleus never reaches that far down. Their
            // probabilities are exact (normalised over the whole vocabulary).
            let scaled = logits.to_kind(Kind::Float) / temperature.max(1e-6);
            let log_total = scaled.logsumexp(&[-1i64][..], true);
            let candidates = scaled.size()[1].min(NUCLEUS_CANDIDATES);
            let (top, order) = scaled.topk(candidates, -1, true, true);
            let sorted = (top - log_total).exp();
            // Drop a token when the tokens ranked above it already reach top_p.
            let above = sorted.cumsum(-1, Kind::Float) - &sorted;
            let kept = sorted.masked_fill(&above.gt(top_p), 0.0);
            let choice = kept.multinomial(1, false);
            order.gather(-1, &choice, false).squeeze_dim(-1)
        }
    }
}

/// Continues every prompt at once, at most `max_new` ids each, through one KV cache: the
/// prompts are left-padded to one length with `pad` and the padding is masked
/// ([`KvCache::padded`]). A row stops after its first id in `stop`; finished rows leave the
/// batch and the cache ([`KvCache::keep_rows`]) once they are a quarter of it, and the batch
/// stops when every row has finished. Runs under no-grad on the model's device and dtype.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new: usize,
    pick: Pick,
    stop: &[u32],
    pad: u32,
) -> Result<Vec<Continuation>> {
    anyhow::ensure!(!prompts.is_empty(), "no prompts to continue");
    anyhow::ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "a prompt has no tokens"
    );
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = model.config.max_position_embeddings;
    anyhow::ensure!(
        longest + max_new <= limit,
        "prompts of {longest} tokens plus {max_new} new ones exceed the model's context of {limit}"
    );
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    let (rows, width) = (prompts.len(), longest);
    let mut ids = vec![pad as i64; rows * width];
    let mut valid = vec![false; rows * width];
    for (r, prompt) in prompts.iter().enumerate() {
        let offset = r * width + width - prompt.len();
        for (j, &id) in prompt.iter().enumerate() {
            ids[offset + j] = id as i64;
            valid[offset + j] = true;
        }
    }
    let shape = [rows as i64, width as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let valid = Tensor::from_slice(&valid).view(shape).to_device(device);
    let stop_ids =
        Tensor::from_slice(&stop.iter().map(|&s| s as i64).collect::<Vec<_>>()).to_device(device);

    let mut cache = KvCache::padded(model.config.num_layers, valid, (width + max_new) as i64);
    let hidden = model.forward_hidden(&ids, Some(&mut cache));
    let mut logits = model.logits(&hidden.narrow(1, -1, 1)).squeeze_dim(1);
    // Rows that have finished are dropped from the batch (and the cache) every few steps
    // once they are a quarter of it: a batch of sampled answers ends unevenly, and the
    // longest answers would otherwise keep every finished row's attention running.
    let mut origin: Vec<usize> = (0..rows).collect();
    let mut generated: Vec<Vec<i64>> = vec![Vec::new(); rows];
    let mut pending: Vec<Tensor> = Vec::new();
    let flush = |pending: &mut Vec<Tensor>, origin: &[usize], generated: &mut [Vec<i64>]| {
        if pending.is_empty() {
            return Ok::<(), anyhow::Error>(());
        }
        let steps = pending.len();
        let block = Tensor::stack(pending, 1).to_device(tch::Device::Cpu);
        let block = Vec::<i64>::try_from(block.flatten(0, -1))?;
        for (row, ids) in block.chunks(steps).enumerate() {
            generated[origin[row]].extend_from_slice(ids);
        }
        pending.clear();
        Ok(())
    };
    let mut finished = Tensor::zeros([rows as i64], (Kind::Bool, device));
    for step in 0..max_new {
        let mut next = pick_next(&logits, pick);
        pending.push(next.shallow_clone());
        if !stop.is_empty() {
            finished = finished.logical_or(
                &next
                    .unsqueeze(1)
                    .eq_tensor(&stop_ids.unsqueeze(0))
                    .any_dim(1, false),
            );
        }
        // Reading the flags back waits for the device: do it every few steps only.
        if step + 1 == max_new {
            break;
        }
        if step % 8 == 7 {
            let done = i64::try_from(finished.sum(Kind::Int64))? as usize;
            if done == origin.len() {
                break;
            }
            if done > 0 && 4 * done >= origin.len() {
                flush(&mut pending, &origin, &mut generated)?;
                let keep = finished.logical_not().nonzero().squeeze_dim(1);
                let kept = Vec::<i64>::try_from(keep.to_device(tch::Device::Cpu))?;
                origin = kept.iter().map(|&row| origin[row as usize]).collect();
                cache.keep_rows(&keep);
                next = next.index_select(0, &keep);
                finished = Tensor::zeros([origin.len() as i64], (Kind::Bool, device));
            }
        }
        logits = model
            .forward(&next.unsqueeze(1), Some(&mut cache))
            .squeeze_dim(1);
    }
    flush(&mut pending, &origin, &mut generated)?;
    Ok(generated
        .iter()
        .map(|row| {
            let mut ids = Vec::with_capacity(row.len());
            let mut ended = false;
            for &id in row {
                ids.push(id as u32);
                if stop.contains(&(id as u32)) {
                    ended = true;
                    break;
                }
            }
            Continuation { ids, ended }
        })
        .collect())
}
