//! The packed engine behind `binllm eval`'s scoring trait: log-probabilities of tokens given
//! their prefixes, computed from packed 1-bit weights on the CPU.
//!
//! Requests run one at a time through one KV cache. A request that starts with tokens the
//! cache already holds (the choices of one multiple-choice question share their context)
//! keeps those positions instead of recomputing them; that changes nothing in the result,
//! because the forward pass of a position depends only on the positions before it.
//! Greedy generation (the chat benchmark's answers) runs through the same cache.

use anyhow::Result;
use binllm_eval::{LanguageModel, ScoreRequest, TokenScore};
use binllm_format::TextTokenizer;

use crate::generate::{generate, greedy_options};
use crate::model::{KvCache, Model};
use crate::sampling::argmax;

/// Positions per forward call: bounds the `positions x vocab` logits held at once.
const POSITIONS_PER_PASS: usize = 256;

pub struct PackedScorer {
    model: Model,
    tokenizer: TextTokenizer,
    cache: KvCache,
}

impl PackedScorer {
    pub fn new(model: Model, tokenizer: TextTokenizer) -> Self {
        let cache = KvCache::new(&model.config);
        PackedScorer {
            model,
            tokenizer,
            cache,
        }
    }

    fn score_one(&mut self, request: &ScoreRequest) -> Result<Vec<TokenScore>> {
        // The last token is only a target; position p is predicted by the logits of p - 1.
        let inputs = &request.tokens[..request.tokens.len() - 1];
        let first_needed = request.score_from - 1;
        let shared = self.cache.shared_prefix(inputs).min(first_needed);
        self.cache.truncate(shared);
        if shared < first_needed {
            // Context only: the logits are not needed, just the cached keys and values.
            self.model
                .forward(&mut self.cache, &inputs[shared..first_needed])?;
        }
        let vocab = self.model.config.vocab_size;
        let mut scores = Vec::with_capacity(request.scored_len());
        let mut position = first_needed;
        for chunk in inputs[first_needed..].chunks(POSITIONS_PER_PASS) {
            let logits = self.model.forward_all(&mut self.cache, chunk)?;
            for row in logits.chunks_exact(vocab) {
                scores.push(token_score(row, request.tokens[position + 1]));
                position += 1;
            }
        }
        Ok(scores)
    }
}

/// log-softmax of `logits` at `target` (accumulated in f64), and whether it is the argmax.
fn token_score(logits: &[f32], target: u32) -> TokenScore {
    let best = argmax(logits);
    let max = logits[best as usize];
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let logprob = (logits[target as usize] - max) as f64 - sum.ln();
    TokenScore {
        logprob: logprob as f32,
        is_greedy: best == target,
    }
}

impl LanguageModel for PackedScorer {
    fn max_context(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn preferred_batch(&self) -> usize {
        // Large enough that the choices of one question usually meet in a batch (where they
        // are scored next to each other and share their context), small enough for progress.
        512
    }

    fn score(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| batch[a].tokens.cmp(&batch[b].tokens));
        let mut out = vec![Vec::new(); batch.len()];
        for i in order {
            out[i] = self.score_one(&batch[i])?;
        }
        Ok(out)
    }

    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        let options = greedy_options(max_new_tokens);
        let mut answer = Vec::new();
        if max_new_tokens > 0 {
            generate(&self.model, &mut self.cache, prompt, &options, |id| {
                answer.push(id);
                Ok(!stop.contains(&id))
            })?;
        }
        Ok(answer)
    }
}
