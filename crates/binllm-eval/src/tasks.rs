//! The seven zero-shot multiple-choice tasks, built exactly as lm-evaluation-harness v0.4
//! builds them (task yamls and utils of lm-eval 0.4.x; checked against 0.4.13):
//!
//! - every choice is one `(context, continuation)` request, continuation = `" " + choice`
//!   (`target_delimiter` " "), except WinoGrande whose choices go into the context;
//! - requests are tokenized as HFLM's `_encode_pair` does (trailing spaces of the context
//!   move into the continuation; `context + continuation` and `context` are encoded without
//!   special tokens; the continuation tokens are the tail of the whole encoding);
//! - acc = argmax of the log-likelihood sums; acc_norm = argmax of sum / len(choice) in
//!   characters; both with `mean_stderr`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Result};
use binllm_format::TextTokenizer;
use serde::{Deserialize, Serialize};

use crate::data::{self, parse_index, python_rstrip, python_strip, read_jsonl, Location, Row};
use crate::lm::{progress_bar, score_all, LanguageModel, ScoreRequest};
use crate::metrics::{multiple_choice_metrics, ExampleScore, McMetrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Task {
    BoolQ,
    Piqa,
    HellaSwag,
    WinoGrande,
    ArcEasy,
    ArcChallenge,
    OpenBookQa,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::BoolQ,
        Task::Piqa,
        Task::HellaSwag,
        Task::WinoGrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::OpenBookQa,
    ];

    /// lm-eval's task name.
    pub fn name(self) -> &'static str {
        match self {
            Task::BoolQ => "boolq",
            Task::Piqa => "piqa",
            Task::HellaSwag => "hellaswag",
            Task::WinoGrande => "winogrande",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::OpenBookQa => "openbookqa",
        }
    }

    /// Column header as papers print it.
    pub fn display_name(self) -> &'static str {
        match self {
            Task::BoolQ => "BoolQ",
            Task::Piqa => "PIQA",
            Task::HellaSwag => "HellaSwag",
            Task::WinoGrande => "WinoGrande",
            Task::ArcEasy => "ARC-e",
            Task::ArcChallenge => "ARC-c",
            Task::OpenBookQa => "OBQA",
        }
    }

    /// Whether lm-eval's `metric_list` for the task has acc_norm (BoolQ and WinoGrande
    /// report acc only).
    pub fn reports_acc_norm(self) -> bool {
        !matches!(self, Task::BoolQ | Task::WinoGrande)
    }

    /// The split lm-eval evaluates, which is the one the shared files hold.
    pub fn split(self) -> &'static str {
        match self {
            Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => "test",
            _ => "validation",
        }
    }

    /// Files under the data directory.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Task::BoolQ => &["boolq/dev.jsonl.gz"],
            Task::Piqa => &["piqa/valid.jsonl", "piqa/valid-labels.lst"],
            Task::HellaSwag => &["hellaswag/hellaswag_val_full.txt.gz"],
            Task::WinoGrande => &["winogrande/dev.jsonl"],
            Task::ArcEasy => &["arc/ARC-Easy/ARC-Easy-Test.jsonl.gz"],
            Task::ArcChallenge => &["arc/ARC-Challenge/ARC-Challenge-Test.jsonl.gz"],
            Task::OpenBookQa => &["openbookqa/test.jsonl"],
        }
    }

    /// Where this data differs from what lm-eval reads, for the report.
    pub fn notes(self) -> Vec<String> {
        match self {
            Task::BoolQ => vec![
                "Google BoolQ dev file; passage = title + \" -- \" + passage as in \
                 super_glue/boolq, which lm-eval reads"
                    .into(),
            ],
            Task::HellaSwag => vec![
                "llama.cpp text extraction of hellaswag_val.jsonl: the context line is \
                 activity_label + \": \" + ctx with [header]/[title]/[step] already removed; \
                 lm-eval's preprocess is applied on top, but ctx_b.capitalize() cannot be \
                 (the ctx_a/ctx_b split is lost)"
                    .into(),
            ],
            _ => Vec::new(),
        }
    }

    /// Every example of the task, in file order.
    pub fn load(self, data_dir: &Path) -> Result<Vec<McExample>> {
        let path = |i: usize| data_dir.join(self.files()[i]);
        match self {
            Task::BoolQ => load_boolq(&path(0)),
            Task::Piqa => load_piqa(&path(0), &path(1)),
            Task::HellaSwag => load_hellaswag(&path(0)),
            Task::WinoGrande => load_winogrande(&path(0)),
            Task::ArcEasy | Task::ArcChallenge => load_ai2(&path(0), Ai2Prompt::Arc),
            Task::OpenBookQa => load_ai2(&path(0), Ai2Prompt::OpenBookQa),
        }
    }
}

impl FromStr for Task {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let key = s.to_ascii_lowercase().replace('-', "_");
        Ok(match key.as_str() {
            "boolq" => Task::BoolQ,
            "piqa" => Task::Piqa,
            "hellaswag" => Task::HellaSwag,
            "winogrande" => Task::WinoGrande,
            "arc_easy" | "arc_e" | "arce" => Task::ArcEasy,
            "arc_challenge" | "arc_c" | "arcc" => Task::ArcChallenge,
            "openbookqa" | "obqa" => Task::OpenBookQa,
            _ => bail!("unknown task {s:?}"),
        })
    }
}

/// One example: lm-eval's requests for it, the gold index and what acc_norm divides by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McExample {
    pub doc_id: usize,
    /// `(context, continuation)` for each choice, exactly lm-eval's `Instance.args`.
    pub requests: Vec<(String, String)>,
    pub gold: usize,
    /// Characters of each `doc_to_choice` string (lm-eval's `completion_len`).
    pub choice_chars: Vec<usize>,
}

impl McExample {
    /// Choices placed in the continuation after `target_delimiter` " ".
    fn choices_after(doc_id: usize, context: String, choices: &[String], gold: usize) -> Self {
        McExample {
            doc_id,
            requests: choices
                .iter()
                .map(|c| (context.clone(), format!(" {c}")))
                .collect(),
            gold,
            choice_chars: choices.iter().map(|c| c.chars().count()).collect(),
        }
    }
}

// ------------------------------------------------------------------------------- prompts

/// super_glue/boolq.yaml: `{{passage}}\nQuestion: {{question}}?\nAnswer:`, choices
/// ["no", "yes"], target = label (1 = true).
pub fn boolq_example(doc_id: usize, passage: &str, question: &str, answer: bool) -> McExample {
    let context = format!("{passage}\nQuestion: {question}?\nAnswer:");
    McExample::choices_after(
        doc_id,
        context,
        &["no".into(), "yes".into()],
        answer as usize,
    )
}

/// piqa.yaml: `Question: {{goal}}\nAnswer:`, choices [sol1, sol2], target = label.
pub fn piqa_example(doc_id: usize, goal: &str, sol1: &str, sol2: &str, label: usize) -> McExample {
    let context = format!("Question: {goal}\nAnswer:");
    McExample::choices_after(doc_id, context, &[sol1.into(), sol2.into()], label)
}

/// hellaswag/utils.py `preprocess`: strip, " [title]" -> ". ", drop every `[...]`, then
/// one pass of "  " -> " ".
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = python_strip(text).replace(" [title]", ". ");
    remove_bracketed(&text).replace("  ", " ")
}

/// `re.sub("\\[.*?\\]", "", text)`: a `[` up to the nearest `]` on the same line.
fn remove_bracketed(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find(']');
        let newline = after.find('\n');
        match close {
            Some(c) if newline.is_none_or(|n| c < n) => rest = &after[c + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// hellaswag.yaml with utils.process_docs: query = preprocess(activity_label + ": " + ctx),
/// choices = preprocess(ending). `context_line` is the shared file's first line of a block
/// (activity_label + ": " + ctx).
pub fn hellaswag_example(
    doc_id: usize,
    context_line: &str,
    endings: &[String],
    label: usize,
) -> McExample {
    let query = hellaswag_preprocess(context_line);
    let choices: Vec<String> = endings.iter().map(|e| hellaswag_preprocess(e)).collect();
    McExample::choices_after(doc_id, query, &choices, label)
}

/// winogrande/preprocess_winogrande.py (partial evaluation): for each option, context =
/// sentence up to the blank + option; one shared continuation " " + the rest after the
/// blank, stripped. acc_norm would divide by the contexts' length (doc_to_choice returns
/// them); lm-eval reports acc only.
pub fn winogrande_example(
    doc_id: usize,
    sentence: &str,
    options: [&str; 2],
    answer: usize,
) -> Result<McExample> {
    let blank = sentence
        .find('_')
        .ok_or_else(|| anyhow!("sentence has no blank '_'"))?;
    let contexts: Vec<String> = options
        .iter()
        .map(|o| format!("{}{o}", &sentence[..blank]))
        .collect();
    let continuation = format!(" {}", python_strip(&sentence[blank + 1..]));
    Ok(McExample {
        doc_id,
        choice_chars: contexts.iter().map(|c| c.chars().count()).collect(),
        requests: contexts
            .into_iter()
            .map(|c| (c, continuation.clone()))
            .collect(),
        gold: answer,
    })
}

/// arc_easy.yaml / arc_challenge.yaml: `Question: {{question}}\nAnswer:`, choices =
/// choices.text, target = choices.label.index(answerKey).
pub fn arc_example(doc_id: usize, question: &str, choices: &[String], gold: usize) -> McExample {
    let context = format!("Question: {question}\nAnswer:");
    McExample::choices_after(doc_id, context, choices, gold)
}

/// openbookqa.yaml: context = question_stem, choices = choices.text, target =
/// choices.label.index(answerKey.lstrip()).
pub fn openbookqa_example(
    doc_id: usize,
    question_stem: &str,
    choices: &[String],
    gold: usize,
) -> McExample {
    McExample::choices_after(doc_id, question_stem.to_string(), choices, gold)
}

// ------------------------------------------------------------------------------- loaders

fn load_boolq(path: &Path) -> Result<Vec<McExample>> {
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, (at, v))| {
            let row = Row::new(at, v);
            // super_glue's passage (what lm-eval reads) is "<title> -- <passage>".
            let passage = format!("{} -- {}", row.str("title")?, row.str("passage")?);
            Ok(boolq_example(
                i,
                &passage,
                row.str("question")?,
                row.bool("answer")?,
            ))
        })
        .collect()
}

fn load_piqa(questions: &Path, labels: &Path) -> Result<Vec<McExample>> {
    let rows = read_jsonl(questions)?;
    let label_text = data::read_text(labels)?;
    let label_lines: Vec<&str> = label_text.lines().collect();
    if label_lines.len() != rows.len() {
        bail!(
            "{}: {} labels for {} questions in {}",
            labels.display(),
            label_lines.len(),
            rows.len(),
            questions.display()
        );
    }
    rows.iter()
        .zip(label_lines)
        .enumerate()
        .map(|(i, ((at, v), label))| {
            let row = Row::new(at, v);
            let label_at = Location {
                path: labels.to_path_buf(),
                line: i + 1,
            };
            let label = parse_index(label, 2, &label_at, "label")?;
            Ok(piqa_example(
                i,
                row.str("goal")?,
                row.str("sol1")?,
                row.str("sol2")?,
                label,
            ))
        })
        .collect()
}

/// llama.cpp's HellaSwag text: 6 lines per task (context, gold label, 4 endings).
fn load_hellaswag(path: &Path) -> Result<Vec<McExample>> {
    const BLOCK: usize = 6;
    let text = data::read_text(path)?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    if !lines.len().is_multiple_of(BLOCK) {
        let start = lines.len() / BLOCK * BLOCK + 1;
        bail!(
            "{}:{start}: incomplete task block: {} line(s) where 6 are expected (context, \
             label, 4 endings); the file has {} lines, not a multiple of 6",
            path.display(),
            lines.len() % BLOCK,
            lines.len()
        );
    }
    lines
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, block)| {
            let first_line = i * BLOCK + 1;
            let label_at = Location {
                path: path.to_path_buf(),
                line: first_line + 1,
            };
            let label = parse_index(block[1], 4, &label_at, "gold label")?;
            if block[0].trim().is_empty() {
                bail!("{}:{first_line}: empty context line", path.display());
            }
            let endings: Vec<String> = block[2..].iter().map(|s| s.to_string()).collect();
            Ok(hellaswag_example(i, block[0], &endings, label))
        })
        .collect()
}

fn load_winogrande(path: &Path) -> Result<Vec<McExample>> {
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, (at, v))| {
            let row = Row::new(at, v);
            let answer = match row.str("answer")? {
                "1" => 0,
                "2" => 1,
                other => bail!("{at}: answer {other:?} out of range (expected \"1\" or \"2\")"),
            };
            winogrande_example(
                i,
                row.str("sentence")?,
                [row.str("option1")?, row.str("option2")?],
                answer,
            )
            .map_err(|e| anyhow!("{at}: {e}"))
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Ai2Prompt {
    Arc,
    OpenBookQa,
}

/// AI2's format, shared by ARC and OpenBookQA: question.stem, question.choices[{text,
/// label}], answerKey.
fn load_ai2(path: &Path, prompt: Ai2Prompt) -> Result<Vec<McExample>> {
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, (at, v))| {
            let row = Row::new(at, v);
            let stem = row.str("question.stem")?;
            let mut texts = Vec::new();
            let mut labels = Vec::new();
            for (k, choice) in row.array("question.choices")?.iter().enumerate() {
                let c = Row::new(at, choice);
                texts.push(
                    c.str("text")
                        .map_err(|e| anyhow!("{e} (choice {k})"))?
                        .to_string(),
                );
                labels.push(c.str("label").map_err(|e| anyhow!("{e} (choice {k})"))?);
            }
            ensure!(!texts.is_empty(), "{at}: no choices");
            let key = row.str("answerKey")?;
            // openbookqa.yaml strips the key's leading whitespace; ARC's keys have none.
            let key = match prompt {
                Ai2Prompt::OpenBookQa => key.trim_start_matches(char::is_whitespace),
                Ai2Prompt::Arc => key,
            };
            let gold = labels.iter().position(|l| *l == key).ok_or_else(|| {
                anyhow!("{at}: answerKey {key:?} is not one of the choice labels {labels:?}")
            })?;
            Ok(match prompt {
                Ai2Prompt::Arc => arc_example(i, stem, &texts, gold),
                Ai2Prompt::OpenBookQa => openbookqa_example(i, stem, &texts, gold),
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------ encoding

/// HFLM `_encode_pair` (lm-eval's `TemplateLM`), plus `loglikelihood`'s empty-context rule.
/// Returns (context tokens, continuation tokens).
pub fn encode_pair(
    tokenizer: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if context.is_empty() {
        // An empty context conditions on the prefix token: BOS if the tokenizer has one,
        // else EOS; if the continuation already starts with it, it becomes the context.
        let prefix = tokenizer
            .bos_id
            .or_else(|| tokenizer.eos_ids.first().copied())
            .ok_or_else(|| anyhow!("empty context but the tokenizer has neither BOS nor EOS"))?;
        let cont = tokenizer.encode(continuation, false)?;
        ensure!(
            !cont.is_empty(),
            "continuation {continuation:?} encodes to no token"
        );
        return Ok(if cont[0] != prefix {
            (vec![prefix], cont)
        } else {
            (cont[..1].to_vec(), cont[1..].to_vec())
        });
    }
    // A context ending in spaces would tokenize them apart from the word that follows.
    let kept = python_rstrip(context);
    let moved = &context[kept.len()..];
    let (context, continuation) = (kept, format!("{moved}{continuation}"));
    let whole = tokenizer.encode(&format!("{context}{continuation}"), false)?;
    let context_enc = tokenizer.encode(context, false)?;
    let continuation_enc = whole.get(context_enc.len()..).unwrap_or(&[]).to_vec();
    Ok((context_enc, continuation_enc))
}

/// lm-eval's input for one request: `(context + continuation)[-(max_length + 1):]`, scored
/// over the continuation.
pub fn score_request(
    context_enc: &[u32],
    continuation_enc: &[u32],
    max_context: usize,
) -> Result<ScoreRequest> {
    ensure!(!context_enc.is_empty(), "empty context encoding");
    ensure!(!continuation_enc.is_empty(), "empty continuation encoding");
    ensure!(
        continuation_enc.len() <= max_context,
        "continuation of {} tokens exceeds the model context {max_context}",
        continuation_enc.len()
    );
    let mut tokens: Vec<u32> = context_enc
        .iter()
        .chain(continuation_enc)
        .copied()
        .collect();
    if tokens.len() > max_context + 1 {
        tokens.drain(..tokens.len() - (max_context + 1));
    }
    let score_from = tokens.len() - continuation_enc.len();
    Ok(ScoreRequest { tokens, score_from })
}

// ---------------------------------------------------------------------------------- runs

#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// First N examples; `None`: all.
    pub limit: Option<usize>,
    pub show_progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// lm-eval's task name.
    pub task: String,
    pub split: String,
    pub files: Vec<PathBuf>,
    /// Examples in the file.
    pub num_docs: usize,
    /// Examples evaluated (the first `n`).
    pub n: usize,
    pub metrics: McMetrics,
    /// Whether lm-eval reports acc_norm for this task.
    pub reports_acc_norm: bool,
    pub requests: usize,
    pub scored_tokens: usize,
    pub seconds: f64,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Per-example scores (what [`crate::compare_with_reference`] compares).
    #[serde(default)]
    pub examples: Vec<ExampleScore>,
}

impl TaskResult {
    pub fn parsed_task(&self) -> Option<Task> {
        self.task.parse().ok()
    }
}

/// Loads a task's first `limit` examples.
pub fn load_examples(task: Task, data_dir: &Path, limit: Option<usize>) -> Result<Vec<McExample>> {
    let mut examples = task.load(data_dir)?;
    if let Some(limit) = limit {
        examples.truncate(limit);
    }
    Ok(examples)
}

pub fn run_task(
    model: &mut dyn LanguageModel,
    task: Task,
    data_dir: &Path,
    options: &TaskOptions,
) -> Result<TaskResult> {
    let started = Instant::now();
    let all = task.load(data_dir)?;
    let num_docs = all.len();
    let examples: Vec<McExample> = all
        .into_iter()
        .take(options.limit.unwrap_or(usize::MAX))
        .collect();
    ensure!(!examples.is_empty(), "{}: no examples", task.name());

    let max_context = model.max_context();
    let mut requests = Vec::new();
    for e in &examples {
        for (context, continuation) in &e.requests {
            let (ctx, cont) = encode_pair(model.tokenizer(), context, continuation)?;
            requests.push(
                score_request(&ctx, &cont, max_context)
                    .map_err(|err| anyhow!("{} example {}: {err}", task.name(), e.doc_id))?,
            );
        }
    }
    let bar = progress_bar(requests.len(), task.name(), options.show_progress);
    let scores = score_all(model, &requests, &bar)?;
    bar.finish_and_clear();

    let mut next = scores.iter();
    let scored = examples
        .iter()
        .map(|e| {
            let (lls, greedy): (Vec<f64>, Vec<bool>) = e
                .requests
                .iter()
                .map(|_| {
                    let s = next.next().expect("one score list per request");
                    (
                        s.iter().map(|t| t.logprob as f64).sum::<f64>(),
                        s.iter().all(|t| t.is_greedy),
                    )
                })
                .unzip();
            ExampleScore::new(e.doc_id, e.gold, lls, greedy, &e.choice_chars)
        })
        .collect::<Vec<_>>();
    Ok(TaskResult {
        task: task.name().into(),
        split: task.split().into(),
        files: task.files().iter().map(|f| data_dir.join(f)).collect(),
        num_docs,
        n: scored.len(),
        metrics: multiple_choice_metrics(&scored),
        reports_acc_norm: task.reports_acc_norm(),
        requests: requests.len(),
        scored_tokens: requests.iter().map(ScoreRequest::scored_len).sum(),
        seconds: started.elapsed().as_secs_f64(),
        notes: task.notes(),
        examples: scored,
    })
}

pub fn run_tasks(
    model: &mut dyn LanguageModel,
    tasks: &[Task],
    data_dir: &Path,
    options: &TaskOptions,
) -> Result<Vec<TaskResult>> {
    tasks
        .iter()
        .map(|&t| run_task(model, t, data_dir, options))
        .collect()
}
