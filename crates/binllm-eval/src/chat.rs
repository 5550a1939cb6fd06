//! The chat score: how well a (converted, 1-bit) model still behaves as a chat assistant,
//! measured against its full-precision teacher.
//!
//! A [`ChatReference`] file holds, for a fixed set of user prompts (rendered with the chat
//! template and tokenized by whoever wrote it), the teacher's greedy answer. [`score_chat`]
//! measures a model on it two ways:
//!
//! - how likely the model finds the teacher's answers (teacher-forced NLL, a perplexity
//!   restricted to the assistant's turn), and
//! - how its own greedy answers behave: do they end with an end-of-turn token within the
//!   limit, and are they free of repetition loops ([`has_repetition_loop`]). An answer that
//!   ends and does not loop is "clean"; the share of clean answers is the headline number.
//!
//! Everything goes through [`LanguageModel`], so the libtorch and the packed engine are
//! measured by the same code.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lm::{progress_bar, score_all, LanguageModel, ScoreRequest};

pub const CHAT_REFERENCE_FORMAT: &str = "binllm-chat-reference/1";

/// The teacher's greedy answers to a fixed prompt set, and how they were produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatReference {
    /// [`CHAT_REFERENCE_FORMAT`].
    pub format: String,
    /// The teacher, as given.
    pub source_model: String,
    /// Generation limit used for the teacher and the student.
    pub max_new_tokens: usize,
    /// End-of-turn ids (e.g. `<|im_end|>`).
    pub stop_ids: Vec<u32>,
    pub items: Vec<ChatReferenceItem>,
    /// The teacher's own score on these answers, when the writer measured it.
    #[serde(default)]
    pub teacher: Option<ChatScore>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatReferenceItem {
    /// The user message.
    pub prompt: String,
    /// The rendered chat-template prompt, with the generation prompt, tokenized.
    pub prompt_ids: Vec<u32>,
    /// The teacher's greedy answer, stop id included when it ended.
    pub answer_ids: Vec<u32>,
    /// Its text (special tokens skipped).
    pub answer: String,
    pub ended: bool,
}

/// One model's chat figures on one reference.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatScore {
    pub prompts: usize,
    /// Mean negative log-likelihood (nats/token) of the reference answers (stop id
    /// included), teacher-forced after prompt_ids; pooled over every answer token, so long
    /// answers weigh more (as in perplexity).
    pub answer_nll: f64,
    /// exp(answer_nll).
    pub answer_perplexity: f64,
    /// Share of the model's own greedy answers that end with a stop id within max_new_tokens.
    pub ended_share: f64,
    /// Share of the model's greedy answers that contain a repetition loop (see
    /// [`has_repetition_loop`]).
    pub loop_share: f64,
    /// Share that ended AND have no loop: the headline chat score.
    pub clean_share: f64,
    /// Mean length of the model's greedy answers in tokens, stop id included.
    pub mean_answer_tokens: f64,
    /// The model's greedy answers (text, special tokens skipped), in item order.
    pub answers: Vec<String>,
}

/// A chat benchmark's entry in the evaluation report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatResult {
    /// The reference file's path, as given.
    pub reference: String,
    pub score: ChatScore,
    /// The teacher's score as the reference file recorded it.
    #[serde(default)]
    pub teacher: Option<ChatScore>,
    /// The user prompts in item order (the report shows the first answers under them).
    #[serde(default)]
    pub prompts: Vec<String>,
}

impl ChatReference {
    /// Reads and checks a reference file; every error names the file.
    pub fn load(path: &Path) -> Result<Self> {
        let at = path.display();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{at}: cannot read the chat reference"))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{at}: not JSON (expected a chat reference)"))?;
        // The format first: another JSON file (an eval report, say) should be told apart
        // from a damaged reference.
        match value.get("format").and_then(|f| f.as_str()) {
            Some(CHAT_REFERENCE_FORMAT) => {}
            Some(other) => bail!(
                "{at}: format {other:?}, expected {CHAT_REFERENCE_FORMAT:?} (a chat reference)"
            ),
            None => bail!("{at}: no \"format\" field: not a {CHAT_REFERENCE_FORMAT} file"),
        }
        let reference: ChatReference = serde_json::from_value(value)
            .with_context(|| format!("{at}: not a valid {CHAT_REFERENCE_FORMAT} file"))?;
        reference
            .check()
            .with_context(|| format!("{at}: unusable chat reference"))?;
        Ok(reference)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("{}: cannot write the chat reference", path.display()))
    }

    /// What scoring needs: the format, items, a prompt and an answer for each, stop ids
    /// and room to generate.
    fn check(&self) -> Result<()> {
        ensure!(
            self.format == CHAT_REFERENCE_FORMAT,
            "format {:?}, expected {CHAT_REFERENCE_FORMAT:?}",
            self.format
        );
        ensure!(!self.items.is_empty(), "no items");
        ensure!(
            !self.stop_ids.is_empty(),
            "no stop_ids (an answer could never end)"
        );
        ensure!(self.max_new_tokens > 0, "max_new_tokens is 0");
        for (i, item) in self.items.iter().enumerate() {
            ensure!(
                !item.prompt_ids.is_empty(),
                "item {i} ({:?}): empty prompt_ids",
                item.prompt
            );
            ensure!(
                !item.answer_ids.is_empty(),
                "item {i} ({:?}): empty answer_ids",
                item.prompt
            );
        }
        Ok(())
    }
}

/// Scores `model` on the reference: answer NLL via [`score_all`] (one [`ScoreRequest`] per
/// item: tokens = prompt_ids ++ answer_ids, score_from = prompt_ids.len()), then greedy
/// answers via [`LanguageModel::generate_greedy`] (prompt_ids, max_new_tokens, stop_ids).
pub fn score_chat(
    model: &mut dyn LanguageModel,
    reference: &ChatReference,
    show_progress: bool,
) -> Result<ChatScore> {
    reference.check().context("unusable chat reference")?;
    let items = &reference.items;
    let requests: Vec<ScoreRequest> = items
        .iter()
        .map(|item| ScoreRequest {
            tokens: [item.prompt_ids.as_slice(), &item.answer_ids].concat(),
            score_from: item.prompt_ids.len(),
        })
        .collect();
    let bar = progress_bar(items.len(), "chat nll", show_progress);
    let scores = score_all(model, &requests, &bar).context("scoring the reference answers")?;
    bar.finish_and_clear();
    let (mut nll_sum, mut scored) = (0.0f64, 0usize);
    for s in scores.iter().flatten() {
        nll_sum -= f64::from(s.logprob);
        scored += 1;
    }
    let answer_nll = nll_sum / scored as f64;

    let bar = progress_bar(items.len(), "chat answers", show_progress);
    let (mut ended, mut looped, mut clean, mut tokens) = (0usize, 0usize, 0usize, 0usize);
    let mut answers = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ids = model
            .generate_greedy(
                &item.prompt_ids,
                reference.max_new_tokens,
                &reference.stop_ids,
            )
            .with_context(|| format!("greedy answer to item {i} ({:?})", item.prompt))?;
        let did_end = ids.last().is_some_and(|id| reference.stop_ids.contains(id));
        let did_loop = has_repetition_loop(&ids);
        ended += usize::from(did_end);
        looped += usize::from(did_loop);
        clean += usize::from(did_end && !did_loop);
        tokens += ids.len();
        answers.push(
            model
                .tokenizer()
                .decode(&ids, true)
                .with_context(|| format!("decoding the answer to item {i}"))?,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    let share = |count: usize| count as f64 / items.len() as f64;
    Ok(ChatScore {
        prompts: items.len(),
        answer_nll,
        answer_perplexity: answer_nll.exp(),
        ended_share: share(ended),
        loop_share: share(looped),
        clean_share: share(clean),
        mean_answer_tokens: share(tokens),
        answers,
    })
}

/// The longest repeated block [`has_repetition_loop`] looks for.
pub const LOOP_MAX_PERIOD: usize = 24;
/// How many copies of the block, back to back, make a loop.
pub const LOOP_MIN_REPEATS: usize = 3;
/// How many tokens those copies must cover together, so that short natural repeats
/// ("ha ha ha", "no, no, no") are not loops.
pub const LOOP_MIN_TOKENS: usize = 12;

/// True when `tokens` contain a block of p tokens (1 <= p <= [`LOOP_MAX_PERIOD`]) repeated
/// back to back at least [`LOOP_MIN_REPEATS`] times in a row, the copies covering at least
/// [`LOOP_MIN_TOKENS`] tokens: "assistant assistant ..." 12 times, a 5-token phrase 3 times,
/// a 2-token pair 6 times. Partial copies at either end do not count. This is the failure a
/// degraded chat model shows (the same words or sentence until the token limit); two copies
/// of a sentence, or a short refrain, are left alone.
pub fn has_repetition_loop(tokens: &[u32]) -> bool {
    (1..=LOOP_MAX_PERIOD).any(|period| {
        // `run` consecutive positions with tokens[i] == tokens[i + period] mean the
        // `run + period` tokens from the run's start repeat one block of `period`:
        // (run + period) / period whole copies back to back.
        let mut run = 0;
        for i in 0..tokens.len().saturating_sub(period) {
            if tokens[i] != tokens[i + period] {
                run = 0;
                continue;
            }
            run += 1;
            let copies = (run + period) / period;
            if copies >= LOOP_MIN_REPEATS && copies * period >= LOOP_MIN_TOKENS {
                return true;
            }
        }
        false
    })
}

/// A fixed held-out set of 48 plain user questions and instructions (general knowledge,
/// how-to, short writing tasks; English), written for binllm, one per line of
/// `chat_prompts.txt`. The first five are the simple questions the README shows.
pub fn held_out_prompts() -> Vec<&'static str> {
    include_str!("chat_prompts.txt")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect()
}
