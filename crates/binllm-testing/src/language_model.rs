//! A language model for tests of the evaluation panel and of engines: a deterministic
//! [`BigramModel`] whose every number can be recomputed independently, a character tokenizer
//! for it, and [`check_language_model`], the consistency check any engine's test can call:
//!
//! ```ignore
//! let mut engine = MyEngine::load(".../stories260K.bin")?;
//! binllm_testing::language_model::check_language_model(&mut engine, &["Once upon a time"], 1e-3)?;
//! let ppl = binllm_eval::run_perplexity(
//!     &mut engine,
//!     &"file:../shared/data/corpus/tinystories/tinystories_val.txt.gz".parse()?,
//!     data_dir,
//!     &Default::default(),
//! )?;
//! ```

use anyhow::{bail, ensure, Result};
use binllm_eval::{LanguageModel, ScoreRequest, TokenScore};
use binllm_format::TextTokenizer;
use serde_json::json;

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

/// A character-level tokenizer: `<unk>`, `<s>`, `</s>`, "\n" and printable ASCII, one token
/// per character; with special tokens it prepends `<s>` (as Llama tokenizers do).
pub fn char_tokenizer() -> TextTokenizer {
    let mut vocab = serde_json::Map::new();
    let mut chars = vec!['\n'];
    chars.extend((0x20u8..0x7f).map(char::from));
    for (i, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(tok.to_string(), json!(i));
    }
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 3));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(UNK, "<unk>"), special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    let mut tok = TextTokenizer::from_json_bytes(spec.to_string().as_bytes())
        .expect("the character tokenizer spec is valid");
    tok.bos_id = Some(BOS);
    tok.eos_ids = vec![EOS];
    tok
}

/// splitmix64: a fixed, platform-independent pseudo-random sequence.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// p(next | previous) from a fixed random logit table, log-softmax in f32 (as an engine
/// would compute it). Records the batches it was given.
pub struct BigramModel {
    tokenizer: TextTokenizer,
    /// `logits[prev * vocab + next]`
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub max_context: usize,
    pub batch: usize,
    /// Sizes and longest sequence of every `score` call.
    pub calls: Vec<(usize, usize)>,
}

impl BigramModel {
    pub fn new(seed: u64, max_context: usize, batch: usize) -> Self {
        let tokenizer = char_tokenizer();
        let vocab = tokenizer.vocab_size();
        let mut state = seed;
        let logits = (0..vocab * vocab)
            .map(|_| {
                let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
                (8.0 * u - 4.0) as f32
            })
            .collect();
        BigramModel {
            tokenizer,
            logits,
            vocab,
            max_context,
            batch,
            calls: Vec::new(),
        }
    }

    pub fn row(&self, prev: u32) -> &[f32] {
        let p = prev as usize;
        &self.logits[p * self.vocab..(p + 1) * self.vocab]
    }

    /// The arg-max of `prev`'s row, the lowest id on ties (the `is_greedy` of its scores).
    pub fn greedy_next(&self, prev: u32) -> u32 {
        let row = self.row(prev);
        (0..row.len()).fold(0, |best, k| if row[k] > row[best] { k } else { best }) as u32
    }
}

impl LanguageModel for BigramModel {
    fn max_context(&self) -> usize {
        self.max_context
    }

    fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn preferred_batch(&self) -> usize {
        self.batch
    }

    fn score(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>> {
        self.calls.push((
            batch.len(),
            batch.iter().map(|r| r.tokens.len()).max().unwrap_or(0),
        ));
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            ensure!(
                r.tokens.len() <= self.max_context + 1,
                "sequence of {} tokens longer than the context {} + 1",
                r.tokens.len(),
                self.max_context
            );
            let mut scores = Vec::with_capacity(r.scored_len());
            for i in r.score_from..r.tokens.len() {
                let row = self.row(r.tokens[i - 1]);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&l| (l - max).exp()).sum();
                let next = r.tokens[i];
                scores.push(TokenScore {
                    logprob: row[next as usize] - max - sum.ln(),
                    is_greedy: self.greedy_next(r.tokens[i - 1]) == next,
                });
            }
            out.push(scores);
        }
        Ok(out)
    }

    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        let Some(&last) = prompt.last() else {
            bail!("the prompt has no tokens");
        };
        ensure!(
            prompt.len() <= self.max_context,
            "the prompt has {} tokens, more than the context {}",
            prompt.len(),
            self.max_context
        );
        // As the real engines: prompt and answer share the context.
        let limit = max_new_tokens.min(self.max_context - prompt.len());
        let mut answer = Vec::new();
        let mut prev = last;
        while answer.len() < limit {
            prev = self.greedy_next(prev);
            answer.push(prev);
            if stop.contains(&prev) {
                break;
            }
        }
        Ok(answer)
    }
}

/// What [`check_language_model`] measured.
#[derive(Debug, Clone, Default)]
pub struct Consistency {
    pub positions: usize,
    /// Largest |difference| between a request scored alone and inside a batch.
    pub batch_difference: f32,
    /// Largest |difference| between a sequence's scores and its prefix's.
    pub prefix_difference: f32,
}

/// Checks what every engine must satisfy, on the given texts:
/// lengths as requested; finite log-probabilities <= 0; a greedy token's log-probability is
/// at least -ln(vocabulary); the same scores alone, in one batch, and for a prefix of the
/// sequence (causality, padding), and for a later `score_from`, within `tolerance`.
pub fn check_language_model(
    model: &mut dyn LanguageModel,
    texts: &[&str],
    tolerance: f32,
) -> Result<Consistency> {
    let vocab = model.tokenizer().vocab_size().max(2) as f32;
    let max_len = model.max_context() + 1;
    let mut requests = Vec::new();
    for text in texts {
        let mut tokens = model.tokenizer().encode(text, true)?;
        tokens.truncate(max_len);
        ensure!(tokens.len() >= 3, "text {text:?} gives fewer than 3 tokens");
        requests.push(ScoreRequest {
            tokens,
            score_from: 1,
        });
    }
    let mut report = Consistency::default();
    let alone: Vec<Vec<TokenScore>> = requests
        .iter()
        .map(|r| {
            model
                .score(std::slice::from_ref(r))
                .map(|mut v| v.remove(0))
        })
        .collect::<Result<_>>()?;
    let together = model.score(&requests)?;
    ensure!(
        together.len() == requests.len(),
        "{} results for {} requests",
        together.len(),
        requests.len()
    );
    for ((r, a), b) in requests.iter().zip(&alone).zip(&together) {
        ensure!(
            a.len() == r.scored_len() && b.len() == r.scored_len(),
            "expected {} scores, got {} alone and {} in a batch",
            r.scored_len(),
            a.len(),
            b.len()
        );
        for (x, y) in a.iter().zip(b) {
            if !x.logprob.is_finite() || x.logprob > 1e-4 {
                bail!("impossible log-probability {}", x.logprob);
            }
            if x.is_greedy && x.logprob < -vocab.ln() - 1e-3 {
                bail!(
                    "a greedy token has log-probability {} < -ln(vocabulary)",
                    x.logprob
                );
            }
            report.batch_difference = report.batch_difference.max((x.logprob - y.logprob).abs());
            report.positions += 1;
        }
        // The prefix of two thirds, scored from its middle: the same numbers.
        let cut = (r.tokens.len() * 2 / 3).max(3);
        let from = (cut / 2).max(1);
        let prefix = ScoreRequest {
            tokens: r.tokens[..cut].to_vec(),
            score_from: from,
        };
        let p = model.score(std::slice::from_ref(&prefix))?.remove(0);
        ensure!(
            p.len() == prefix.scored_len(),
            "wrong score count for a prefix"
        );
        for (k, s) in p.iter().enumerate() {
            let full = a[from - 1 + k];
            report.prefix_difference = report
                .prefix_difference
                .max((s.logprob - full.logprob).abs());
        }
    }
    if report.batch_difference > tolerance {
        bail!(
            "scores depend on the batch: difference {} > {tolerance}",
            report.batch_difference
        );
    }
    if report.prefix_difference > tolerance {
        bail!(
            "scores depend on later tokens or on score_from: difference {} > {tolerance}",
            report.prefix_difference
        );
    }
    Ok(report)
}
