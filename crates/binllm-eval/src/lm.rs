//! The one interface an engine implements, and the batching every evaluation shares.

use anyhow::{bail, ensure, Context, Result};
use binllm_format::TextTokenizer;
use binllm_progress::Progress;

/// One sequence to score: the log-probability of `tokens[i]` given `tokens[..i]` for every
/// `i` in `score_from..tokens.len()`.
///
/// The last token is only ever a target, never an input, so an engine runs its forward pass
/// over `tokens[..len - 1]`: `tokens.len()` may be `max_context() + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreRequest {
    pub tokens: Vec<u32>,
    /// First scored position, at least 1 (the first token has no prediction).
    pub score_from: usize,
}

impl ScoreRequest {
    pub fn scored_len(&self) -> usize {
        self.tokens.len().saturating_sub(self.score_from)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    /// log p(token | prefix), natural log, from a log-softmax over the full vocabulary.
    pub logprob: f32,
    /// Whether the token was the argmax of that distribution (lm-eval's `is_greedy` is
    /// the conjunction of these over a continuation).
    pub is_greedy: bool,
}

/// A causal language model as the evaluation sees it.
pub trait LanguageModel {
    /// The most input positions one forward pass may see.
    fn max_context(&self) -> usize;

    fn tokenizer(&self) -> &TextTokenizer;

    /// How many sequences to pass to one [`score`](Self::score) call.
    fn preferred_batch(&self) -> usize {
        1
    }

    /// One `Vec` per request, of length `tokens.len() - score_from`, in request order.
    fn score(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>>;

    /// Greedy (arg-max) continuation of `prompt`: at most `max_new_tokens` new ids, stopping
    /// right after the first id in `stop` (which is included in the result).
    ///
    /// Ties go to the lowest id. Generation also ends when the context is full: the prompt
    /// and the result together take at most [`max_context`](Self::max_context) positions.
    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>>;
}

/// Scores `requests` in batches of the model's preferred size, longest first (as lm-eval
/// orders them: batches of similar length waste less padding, and an out-of-memory shows
/// up at once), and returns the scores in the original order.
pub fn score_all(
    model: &mut dyn LanguageModel,
    requests: &[ScoreRequest],
    progress: &Progress,
) -> Result<Vec<Vec<TokenScore>>> {
    let max_len = model.max_context() + 1;
    for (i, r) in requests.iter().enumerate() {
        ensure!(
            r.score_from >= 1 && r.score_from < r.tokens.len(),
            "request {i}: score_from {} outside 1..{}",
            r.score_from,
            r.tokens.len()
        );
        ensure!(
            r.tokens.len() <= max_len,
            "request {i}: {} tokens exceed the model's context {} (+1 target)",
            r.tokens.len(),
            model.max_context()
        );
    }
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // lm-eval's key: (-len(tokens), tuple(tokens)); ties in token order keep runs stable.
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&requests[a].tokens, &requests[b].tokens);
        rb.len().cmp(&ra.len()).then_with(|| ra.cmp(rb))
    });
    let batch_size = model.preferred_batch().max(1);
    let mut out: Vec<Option<Vec<TokenScore>>> = vec![None; requests.len()];
    for chunk in order.chunks(batch_size) {
        let batch: Vec<ScoreRequest> = chunk.iter().map(|&i| requests[i].clone()).collect();
        let scored = model
            .score(&batch)
            .with_context(|| format!("the engine failed on a batch of {}", batch.len()))?;
        if scored.len() != batch.len() {
            bail!(
                "the engine returned {} results for {} requests",
                scored.len(),
                batch.len()
            );
        }
        for ((&i, req), scores) in chunk.iter().zip(&batch).zip(scored) {
            if scores.len() != req.scored_len() {
                bail!(
                    "the engine returned {} scores for a request with {} scored positions",
                    scores.len(),
                    req.scored_len()
                );
            }
            if let Some(bad) = scores
                .iter()
                .find(|s| !s.logprob.is_finite() || s.logprob > 1e-4)
            {
                bail!(
                    "the engine returned an impossible log-probability {}",
                    bad.logprob
                );
            }
            out[i] = Some(scores);
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

/// Progress of `len` units of work (a bar, or log lines when stderr is not a terminal), or
/// none (tests, `--quiet`).
pub fn progress_bar(len: usize, message: &str, show: bool) -> Progress {
    if show {
        Progress::new(len as u64, message)
    } else {
        Progress::hidden()
    }
}
