//! Perplexity under the GPTQ protocol (the 1-bit papers' WikiText-2 / C4 / PTB numbers)
//! and under Hugging Face's sliding-window protocol.
//!
//! GPTQ (`datautils.py` + `llama_eval`): the test documents are joined into one text,
//! tokenized once with the tokenizer's special tokens, cut into `len / ctx` non-overlapping
//! windows of `ctx` tokens (a final partial window is dropped), every window predicts its
//! positions 1..ctx, and ppl = exp(mean NLL over all predicted tokens).
//!
//! llama.cpp (`llama-perplexity`'s default): the same `len / ctx` non-overlapping windows,
//! each scoring only its second half (targets `ctx / 2 + 1 .. ctx`, the logits of positions
//! `ctx / 2 .. ctx - 1`), and, when the tokenizer adds BOS, every window's first token
//! replaced by BOS. With the raw file as a `file:` set this is the number `llama-perplexity
//! -f FILE -c CTX` prints, so the two engines can be compared on one protocol.
//!
//! Sliding (HF "Perplexity of fixed-length models"): windows of `ctx` start every `stride`
//! tokens; each scores only the tokens the previous window did not (the first scores all),
//! so every token from position 1 on is scored exactly once, each with up to `ctx - stride`
//! tokens of left context.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::data::{self, python_strip, python_text_lines, read_jsonl, Row};
use crate::lm::{progress_bar, score_all, LanguageModel, ScoreRequest};

/// GPTQ's `get_c4_new`: the first 1100 validation documents, 256 windows.
pub const C4_DOCUMENTS: usize = 1100;
pub const C4_WINDOWS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PerplexitySet {
    /// wikitext-2-raw-v1 test, rows joined with "\n\n" (GPTQ `get_wikitext2`).
    WikiText2,
    /// PTB test split, sentences joined with " " (GPTQ `get_ptb_new`).
    Ptb,
    /// PTB validation split, sentences joined with "\n\n" (GPTQ `get_ptb`, which is what
    /// GPTQ's plain "ptb" evaluates).
    PtbValid,
    /// The first 1100 documents of the shared C4 validation sample joined with " ", at
    /// most 256 windows (GPTQ `get_c4_new`; not GPTQ's document set).
    C4,
    /// Any UTF-8 text file (gzip if it ends in .gz), taken whole.
    TextFile(PathBuf),
}

impl PerplexitySet {
    pub const NAMES: [&'static str; 4] = ["wikitext2", "ptb", "ptb-valid", "c4"];

    pub fn name(&self) -> String {
        match self {
            PerplexitySet::WikiText2 => "wikitext2".into(),
            PerplexitySet::Ptb => "ptb".into(),
            PerplexitySet::PtbValid => "ptb-valid".into(),
            PerplexitySet::C4 => "c4".into(),
            PerplexitySet::TextFile(p) => format!("file:{}", p.display()),
        }
    }

    pub fn file(&self, data_dir: &Path) -> PathBuf {
        match self {
            PerplexitySet::WikiText2 => data_dir.join("wikitext-2-raw/wiki.test.raw"),
            PerplexitySet::Ptb => data_dir.join("ptb/ptb.test.txt"),
            PerplexitySet::PtbValid => data_dir.join("ptb/ptb.valid.txt"),
            PerplexitySet::C4 => data_dir.join("c4/c4_validation_2k.jsonl.gz"),
            PerplexitySet::TextFile(p) => p.clone(),
        }
    }

    /// The most tokens the protocol evaluates for a window of `ctx` (C4: 256 windows).
    pub fn max_tokens(&self, ctx: usize) -> Option<usize> {
        match self {
            PerplexitySet::C4 => Some(C4_WINDOWS * ctx),
            _ => None,
        }
    }

    /// The text the protocol tokenizes, and what it did to build it.
    pub fn text(&self, data_dir: &Path) -> Result<(String, String)> {
        let path = self.file(data_dir);
        Ok(match self {
            PerplexitySet::WikiText2 => {
                // The HF `wikitext` script yields every line of the raw file (newline
                // kept) and "" for a blank line; GPTQ joins those rows with "\n\n".
                let rows: Vec<String> = python_text_lines(&data::read_text(&path)?)
                    .into_iter()
                    .map(|l| {
                        if python_strip(&l).is_empty() {
                            String::new()
                        } else {
                            l
                        }
                    })
                    .collect();
                let n = rows.len();
                (
                    rows.join("\n\n"),
                    format!("{n} HF rows (file lines, blank -> \"\") joined with \"\\n\\n\" (GPTQ get_wikitext2)"),
                )
            }
            PerplexitySet::Ptb | PerplexitySet::PtbValid => {
                // The HF `ptb_text_only` script yields line.strip() for every line.
                let text = data::read_text(&path)?;
                let rows: Vec<&str> = text.lines().map(python_strip).collect();
                let n = rows.len();
                if *self == PerplexitySet::Ptb {
                    (
                        rows.join(" "),
                        format!("{n} sentences (stripped lines) of the test split joined with \" \" (GPTQ get_ptb_new)"),
                    )
                } else {
                    (
                        rows.join("\n\n"),
                        format!("{n} sentences (stripped lines) of the validation split joined with \"\\n\\n\" (GPTQ get_ptb)"),
                    )
                }
            }
            PerplexitySet::C4 => {
                let rows = read_jsonl(&path)?;
                let docs = rows
                    .iter()
                    .take(C4_DOCUMENTS)
                    .map(|(at, v)| Row::new(at, v).str("text"))
                    .collect::<Result<Vec<_>>>()?;
                let n = docs.len();
                (
                    docs.join(" "),
                    format!(
                        "first {n} documents joined with \" \", at most {C4_WINDOWS} windows \
                         (GPTQ get_c4_new protocol; the documents are a 2000-document sample \
                         of C4 validation, not GPTQ's en/c4-validation.00000-of-00008 prefix)"
                    ),
                )
            }
            PerplexitySet::TextFile(_) => {
                (data::read_text(&path)?, "the whole file as one text".into())
            }
        })
    }
}

impl FromStr for PerplexitySet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "wikitext2" | "wikitext" | "wikitext-2" | "wiki2" => PerplexitySet::WikiText2,
            "ptb" => PerplexitySet::Ptb,
            "ptb-valid" | "ptb_valid" | "ptb-gptq" => PerplexitySet::PtbValid,
            "c4" => PerplexitySet::C4,
            _ => match s.strip_prefix("file:") {
                Some(path) => PerplexitySet::TextFile(PathBuf::from(path)),
                None => bail!("unknown perplexity set {s:?}"),
            },
        })
    }
}

/// One window: `tokens[start..end]`, scoring positions `start + score_from .. end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    /// Offset inside the window of the first scored position (>= 1).
    pub score_from: usize,
}

/// The windows of a token stream of length `n`.
///
/// `stride == None` (or `>= ctx`): GPTQ, `n / ctx` full windows each scoring 1..ctx.
/// `stride < ctx`: HF's sliding window, to the end of the stream.
pub fn perplexity_windows(n: usize, ctx: usize, stride: Option<usize>) -> Result<Vec<Window>> {
    ensure!(
        ctx >= 2,
        "the window must hold at least 2 tokens (got {ctx})"
    );
    match stride.filter(|&s| s < ctx) {
        None => Ok((0..n / ctx)
            .map(|i| Window {
                start: i * ctx,
                end: (i + 1) * ctx,
                score_from: 1,
            })
            .collect()),
        Some(stride) => {
            ensure!(stride >= 1, "stride must be at least 1");
            let mut windows = Vec::new();
            let mut prev_end = 0;
            let mut start = 0;
            while start < n {
                let end = (start + ctx).min(n);
                let targets = end - prev_end;
                let score_from = (end - start - targets).max(1);
                if end - start >= 2 {
                    windows.push(Window {
                        start,
                        end,
                        score_from,
                    });
                }
                prev_end = end;
                if end == n {
                    break;
                }
                start += stride;
            }
            Ok(windows)
        }
    }
}

/// llama-perplexity's windows over `n` tokens: `n / ctx` non-overlapping windows, each
/// scoring targets `ctx / 2 + 1 .. ctx` (the module documentation says why).
pub fn llama_cpp_windows(n: usize, ctx: usize) -> Result<Vec<Window>> {
    ensure!(
        ctx >= 4,
        "llama.cpp's protocol needs a window of at least 4 tokens (got {ctx})"
    );
    Ok((0..n / ctx)
        .map(|i| Window {
            start: i * ctx,
            end: (i + 1) * ctx,
            score_from: ctx / 2 + 1,
        })
        .collect())
}

#[derive(Debug, Clone, Default)]
pub struct PerplexityOptions {
    /// Window length; `None`: min(2048, model context).
    pub ctx: Option<usize>,
    /// Sliding stride; `None`: non-overlapping windows.
    pub stride: Option<usize>,
    /// Score only the first N windows (`--limit`); `None`: all.
    pub limit: Option<usize>,
    /// llama-perplexity's protocol instead of GPTQ's ([`llama_cpp_windows`]; no stride).
    pub llama_cpp: bool,
    pub show_progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexityResult {
    pub dataset: String,
    pub file: PathBuf,
    /// How the text was assembled.
    pub text: String,
    /// "gptq (non-overlapping)" or "sliding".
    pub protocol: String,
    pub ctx: usize,
    pub stride: Option<usize>,
    /// Tokens of the whole tokenized text.
    pub tokens: usize,
    pub windows: usize,
    /// Tokens whose log-probability entered the mean.
    pub scored_tokens: usize,
    /// Tokens in no window (GPTQ drops the final partial window; C4 stops at 256 windows).
    pub unused_tokens: usize,
    pub nll_sum: f64,
    pub mean_nll: f64,
    pub ppl: f64,
    pub seconds: f64,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Perplexity of `tokens` under the given windows: exp(sum NLL / scored tokens), the sum
/// taken in f64.
pub fn perplexity_of_tokens(
    model: &mut dyn LanguageModel,
    tokens: &[u32],
    windows: &[Window],
    show_progress: bool,
    label: &str,
) -> Result<(f64, usize)> {
    let bar = progress_bar(windows.len(), label, show_progress);
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    // Windows go to the engine a batch at a time, not all at once: a C4 run holds 256
    // windows of 2048 tokens and the engine needs only one batch of them.
    for chunk in windows.chunks(model.preferred_batch().max(1)) {
        let requests: Vec<ScoreRequest> = chunk
            .iter()
            .map(|w| ScoreRequest {
                tokens: tokens[w.start..w.end].to_vec(),
                score_from: w.score_from,
            })
            .collect();
        for scores in score_all(model, &requests, &bar)? {
            nll_sum -= scores.iter().map(|s| s.logprob as f64).sum::<f64>();
            scored += scores.len();
        }
    }
    bar.finish_and_clear();
    Ok((nll_sum, scored))
}

pub fn run_perplexity(
    model: &mut dyn LanguageModel,
    set: &PerplexitySet,
    data_dir: &Path,
    options: &PerplexityOptions,
) -> Result<PerplexityResult> {
    let started = Instant::now();
    let ctx = options.ctx.unwrap_or(2048.min(model.max_context()));
    ensure!(
        ctx <= model.max_context(),
        "window {ctx} exceeds the model context {}",
        model.max_context()
    );
    let (text, how) = set.text(data_dir)?;
    // With special tokens, as GPTQ's tokenizer(text): a Llama tokenizer prepends BOS once.
    let all_tokens = model.tokenizer().encode(&text, true)?;
    let tokens = &all_tokens[..set
        .max_tokens(ctx)
        .map_or(all_tokens.len(), |m| m.min(all_tokens.len()))];
    ensure!(
        !(options.llama_cpp && options.stride.is_some()),
        "llama.cpp's protocol has no stride"
    );
    let mut windows = if options.llama_cpp {
        llama_cpp_windows(tokens.len(), ctx)?
    } else {
        perplexity_windows(tokens.len(), ctx, options.stride)?
    };
    let all_windows = windows.len();
    if let Some(limit) = options.limit {
        windows.truncate(limit.max(1));
    }
    if windows.is_empty() {
        bail!(
            "{}: {} tokens do not fill one window of {ctx}",
            set.name(),
            tokens.len()
        );
    }
    // llama.cpp puts BOS first in every window when its tokenizer adds one.
    let bos = model
        .tokenizer()
        .bos_id
        .filter(|&b| all_tokens.first() == Some(&b));
    let with_bos: Vec<u32>;
    let tokens = match bos {
        Some(bos) if options.llama_cpp => {
            with_bos = tokens
                .iter()
                .enumerate()
                .map(|(i, &t)| if i % ctx == 0 { bos } else { t })
                .collect();
            &with_bos[..]
        }
        _ => tokens,
    };
    let (nll_sum, scored) =
        perplexity_of_tokens(model, tokens, &windows, options.show_progress, &set.name())?;
    let covered = windows.last().map_or(0, |w| w.end);
    let unused = all_tokens.len() - covered;
    let sliding = options.stride.is_some_and(|s| s < ctx);
    let mut notes = Vec::new();
    if tokens.len() < all_tokens.len() {
        notes.push(format!(
            "only the first {} of {} tokens evaluated ({C4_WINDOWS} windows of {ctx}, as GPTQ)",
            tokens.len(),
            all_tokens.len()
        ));
    }
    if windows.len() < all_windows {
        notes.push(format!(
            "--limit: only the first {} of {all_windows} windows scored (not the published figure)",
            windows.len()
        ));
    } else if covered < tokens.len() {
        notes.push(format!(
            "final partial window of {} tokens dropped, as GPTQ does",
            tokens.len() - covered
        ));
    }
    if *set == PerplexitySet::C4 {
        notes.push("C4: not GPTQ's exact document set (see `text`)".into());
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(PerplexityResult {
        dataset: set.name(),
        file: set.file(data_dir),
        text: how,
        protocol: if options.llama_cpp {
            "llama.cpp (llama-perplexity: second half of each window, BOS first)".into()
        } else if sliding {
            "sliding window (HF perplexity guide)".into()
        } else {
            "non-overlapping windows (GPTQ)".into()
        },
        ctx,
        stride: options.stride.filter(|_| sliding),
        tokens: all_tokens.len(),
        windows: windows.len(),
        scored_tokens: scored,
        unused_tokens: unused,
        nll_sum,
        mean_nll,
        ppl: mean_nll.exp(),
        seconds: started.elapsed().as_secs_f64(),
        notes,
    })
}
