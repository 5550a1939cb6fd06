//! binllm-eval owns the paper's evaluation panel and nothing engine-specific:
//!
//! - perplexity on WikiText-2, C4 and PTB (and any text file) under the GPTQ protocol
//!   (non-overlapping windows, the final partial window dropped) or HF's sliding window;
//! - the seven zero-shot multiple-choice tasks (BoolQ, PIQA, HellaSwag, WinoGrande,
//!   ARC-Easy, ARC-Challenge, OpenBookQA) with prompts, tokenization and metrics exactly as
//!   lm-evaluation-harness v0.4 defines them (acc, acc_norm, `mean_stderr`);
//! - the chat score: the teacher's greedy answers' likelihood, and whether the model's own
//!   greedy answers end cleanly, against a reference file of the teacher's answers;
//! - the JSON report, its Markdown rendering, side-by-side comparison of several reports,
//!   and agreement checks against the Python reference (`tools/reference/eval_reference.py`).
//!
//! An engine implements only [`LanguageModel`] (token log-probabilities for a batch of
//! sequences, and greedy generation); windows, prompts, request ordering, batching and
//! metrics all live here, so every engine is measured by the same code.
//!
//! Pure Rust: no libtorch, so the packed 1-bit runtime can be evaluated too.

pub mod chat;
pub mod data;
pub mod lm;
pub mod metrics;
pub mod perplexity;
pub mod reference;
pub mod report;
pub mod tasks;

pub use chat::{
    has_repetition_loop, held_out_prompts, score_chat, ChatReference, ChatReferenceItem,
    ChatResult, ChatScore, CHAT_REFERENCE_FORMAT,
};
pub use lm::{score_all, LanguageModel, ScoreRequest, TokenScore};
pub use perplexity::{
    llama_cpp_windows, perplexity_windows, run_perplexity, PerplexityOptions, PerplexityResult,
    PerplexitySet, Window,
};
pub use reference::{compare_with_reference, AgreementSummary, ReferenceFile};
pub use report::{compare, compare_files, render_markdown, EvalReport, RunInfo};
pub use tasks::{run_task, run_tasks, McExample, Task, TaskOptions, TaskResult};

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// One item of a `--tasks` list: a perplexity set, a zero-shot task, or a chat reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Benchmark {
    Perplexity(PerplexitySet),
    Task(Task),
    /// `chat:PATH`: the chat score against a [`ChatReference`] file.
    Chat(PathBuf),
}

impl FromStr for Benchmark {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        if let Some(path) = name.strip_prefix("chat:") {
            if path.is_empty() {
                bail!("chat: needs a reference file (chat:PATH)");
            }
            return Ok(Benchmark::Chat(PathBuf::from(path)));
        }
        if let Ok(task) = name.parse::<Task>() {
            return Ok(Benchmark::Task(task));
        }
        if let Ok(set) = name.parse::<PerplexitySet>() {
            return Ok(Benchmark::Perplexity(set));
        }
        bail!(
            "unknown benchmark {name:?}: expected one of {}, {}, file:PATH or chat:PATH",
            PerplexitySet::NAMES.join(", "),
            Task::ALL.map(|t| t.name()).join(", ")
        )
    }
}

/// Parses a comma-separated list such as `wikitext2,c4,ptb,boolq,piqa`; `all` expands to
/// the paper's panel (three perplexity sets and seven tasks; no chat reference, which is
/// a file of the caller's).
pub fn parse_benchmarks(list: &str) -> Result<Vec<Benchmark>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(
                [
                    PerplexitySet::WikiText2,
                    PerplexitySet::C4,
                    PerplexitySet::Ptb,
                ]
                .map(Benchmark::Perplexity),
            );
            out.extend(Task::ALL.map(Benchmark::Task));
        } else {
            out.push(name.parse()?);
        }
    }
    if out.is_empty() {
        bail!("no benchmark selected");
    }
    Ok(out)
}

/// Everything `binllm eval` needs besides the model: what to run and how.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Where the data sets live (`<repo>/../shared/data/eval` in this project).
    pub data_dir: PathBuf,
    /// Model path as the user gave it (recorded in the report).
    pub model_label: String,
    /// Engine and dtype, e.g. "libtorch cuda bf16" (recorded in the report).
    pub engine_label: String,
    /// Perplexity window; `None`: min(2048, model context).
    pub ctx: Option<usize>,
    /// Sliding-window stride; `None`: non-overlapping windows (GPTQ).
    pub stride: Option<usize>,
    /// First N examples of every task; `None`: all.
    pub limit: Option<usize>,
    /// Perplexity under llama-perplexity's protocol (`perplexity::llama_cpp_windows`).
    pub llama_cpp_perplexity: bool,
    pub show_progress: bool,
}

/// Runs a benchmark list against one model and collects the report (the body of
/// `binllm eval`).
pub fn run_benchmarks(
    model: &mut dyn LanguageModel,
    benchmarks: &[Benchmark],
    settings: &EvalSettings,
) -> Result<EvalReport> {
    let started = Instant::now();
    let mut report = EvalReport::new(RunInfo::new(
        &settings.model_label,
        &settings.engine_label,
        model.max_context(),
        settings.limit,
        &settings.data_dir,
    ));
    let ppl_options = PerplexityOptions {
        ctx: settings.ctx,
        stride: settings.stride,
        limit: settings.limit,
        llama_cpp: settings.llama_cpp_perplexity,
        show_progress: settings.show_progress,
    };
    let task_options = TaskOptions {
        limit: settings.limit,
        show_progress: settings.show_progress,
    };
    let mut tasks = Vec::new();
    for benchmark in benchmarks {
        match benchmark {
            Benchmark::Perplexity(set) => report.perplexity.push(run_perplexity(
                model,
                set,
                &settings.data_dir,
                &ppl_options,
            )?),
            Benchmark::Task(task) => tasks.push(*task),
            Benchmark::Chat(path) => {
                let reference = ChatReference::load(path)?;
                let score = score_chat(model, &reference, settings.show_progress)
                    .with_context(|| format!("chat benchmark {}", path.display()))?;
                report.chat.push(ChatResult {
                    reference: path.display().to_string(),
                    score,
                    teacher: reference.teacher.clone(),
                    prompts: reference.items.iter().map(|i| i.prompt.clone()).collect(),
                });
            }
        }
    }
    report.tasks = run_tasks(model, &tasks, &settings.data_dir, &task_options)?;
    report.run.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
