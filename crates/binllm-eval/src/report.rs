//! The result file (JSON, every number with its settings), its Markdown rendering, and
//! the side-by-side comparison of several runs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatResult, ChatScore};
use crate::perplexity::PerplexityResult;
use crate::tasks::{Task, TaskResult};

pub const REPORT_FORMAT: &str = "binllm-eval/1";

/// Who was evaluated, how, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub format: String,
    /// Model path or name as given by the caller.
    pub model: String,
    /// Engine and dtype label supplied by the caller ("libtorch cuda bf16", ...).
    pub engine: String,
    pub max_context: usize,
    pub limit: Option<usize>,
    pub data_dir: String,
    pub binllm_eval_version: String,
    /// Seconds since the Unix epoch at the start of the run.
    pub started_unix: u64,
    pub wall_seconds: f64,
}

impl RunInfo {
    pub fn new(
        model: &str,
        engine: &str,
        max_context: usize,
        limit: Option<usize>,
        data_dir: &Path,
    ) -> Self {
        RunInfo {
            format: REPORT_FORMAT.into(),
            model: model.into(),
            engine: engine.into(),
            max_context,
            limit,
            data_dir: data_dir.display().to_string(),
            binllm_eval_version: env!("CARGO_PKG_VERSION").into(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            wall_seconds: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub run: RunInfo,
    #[serde(default)]
    pub perplexity: Vec<PerplexityResult>,
    #[serde(default)]
    pub tasks: Vec<TaskResult>,
    #[serde(default)]
    pub chat: Vec<ChatResult>,
}

impl EvalReport {
    pub fn new(run: RunInfo) -> Self {
        EvalReport {
            run,
            perplexity: Vec::new(),
            tasks: Vec::new(),
            chat: Vec::new(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("{}: cannot write the report", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a binllm-eval report", path.display()))
    }

    /// A short column label: the model file name plus the engine.
    pub fn label(&self) -> String {
        self.label_with_folders(0)
    }

    /// The label with the model's last `folders` parent folders, which tell apart models
    /// whose files share a name (`sign-model.safetensors` of several runs).
    fn label_with_folders(&self, folders: usize) -> String {
        let path = Path::new(&self.run.model);
        let parts: Vec<String> = path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let name = if parts.is_empty() {
            self.run.model.clone()
        } else {
            parts[parts.len().saturating_sub(folders + 1)..].join("/")
        };
        if self.run.engine.is_empty() {
            name
        } else {
            format!("{name} ({})", self.run.engine)
        }
    }

    /// Every headline number under a stable row key, in panel order.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for p in &self.perplexity {
            rows.push((format!("{} ppl", p.dataset), format!("{:.3}", p.ppl)));
        }
        for t in &self.tasks {
            let name = t
                .parsed_task()
                .map_or(t.task.clone(), |t| t.display_name().into());
            rows.push((
                format!("{name} acc"),
                pct(t.metrics.acc.value, t.metrics.acc.stderr),
            ));
            if t.reports_acc_norm {
                rows.push((
                    format!("{name} acc_norm"),
                    pct(t.metrics.acc_norm.value, t.metrics.acc_norm.stderr),
                ));
            }
        }
        for c in &self.chat {
            // One reference keeps the plain names, so reports on the same file line up.
            let suffix = if self.chat.len() == 1 {
                String::new()
            } else {
                format!(" ({})", c.reference)
            };
            rows.push((
                format!("chat answer ppl{suffix}"),
                format!("{:.3}", c.score.answer_perplexity),
            ));
            rows.push((
                format!("chat clean share{suffix}"),
                format!("{:.1} %", 100.0 * c.score.clean_share),
            ));
        }
        rows
    }
}

fn pct(value: f64, stderr: f64) -> String {
    format!("{:.2} ± {:.2}", 100.0 * value, 100.0 * stderr)
}

/// The report as Markdown: settings, a perplexity table with token and window counts, a
/// task table with acc / acc_norm and standard errors (in percent), and per chat reference
/// its figures (the teacher's beside them when recorded) and the first answers.
pub fn render_markdown(report: &EvalReport) -> String {
    let mut md = String::new();
    let r = &report.run;
    let _ = writeln!(md, "## Evaluation: {}\n", report.label());
    let _ = writeln!(
        md,
        "model `{}`, engine `{}`, max context {}, limit {}, wall-clock {:.1} s\n",
        r.model,
        r.engine,
        r.max_context,
        r.limit.map_or("none".into(), |l| l.to_string()),
        r.wall_seconds
    );
    if !report.perplexity.is_empty() {
        md.push_str(
            "| dataset | ppl | ctx | stride | tokens | windows | scored tokens | protocol |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
        for p in &report.perplexity {
            let _ = writeln!(
                md,
                "| {} | {:.3} | {} | {} | {} | {} | {} | {} |",
                p.dataset,
                p.ppl,
                p.ctx,
                p.stride.map_or("-".into(), |s| s.to_string()),
                p.tokens,
                p.windows,
                p.scored_tokens,
                p.protocol
            );
        }
        md.push('\n');
        for p in &report.perplexity {
            for note in &p.notes {
                let _ = writeln!(md, "- {}: {note}", p.dataset);
            }
        }
        md.push('\n');
    }
    if !report.tasks.is_empty() {
        md.push_str("| task | split | n | acc (%) | acc_norm (%) |\n");
        md.push_str("|---|---|---:|---:|---:|\n");
        for t in &report.tasks {
            let name = t
                .parsed_task()
                .map_or(t.task.clone(), |t| t.display_name().into());
            let norm = if t.reports_acc_norm {
                pct(t.metrics.acc_norm.value, t.metrics.acc_norm.stderr)
            } else {
                "-".into()
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {}/{} | {} | {norm} |",
                t.split,
                t.n,
                t.num_docs,
                pct(t.metrics.acc.value, t.metrics.acc.stderr)
            );
        }
        md.push('\n');
        for t in &report.tasks {
            for note in &t.notes {
                let _ = writeln!(md, "- {}: {note}", t.task);
            }
        }
    }
    for c in &report.chat {
        render_chat(&mut md, c);
    }
    md
}

/// The chat table's rows: name and formatted figure.
fn chat_figures(s: &ChatScore) -> [(&'static str, String); 5] {
    [
        ("answer ppl", format!("{:.3}", s.answer_perplexity)),
        ("ended (%)", format!("{:.1}", 100.0 * s.ended_share)),
        ("loops (%)", format!("{:.1}", 100.0 * s.loop_share)),
        ("clean (%)", format!("{:.1}", 100.0 * s.clean_share)),
        ("mean answer tokens", format!("{:.1}", s.mean_answer_tokens)),
    ]
}

/// How many answers the Markdown shows under their prompts.
const CHAT_ANSWERS_SHOWN: usize = 5;

fn render_chat(md: &mut String, c: &ChatResult) {
    if !md.ends_with("\n\n") {
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "### Chat: `{}` ({} prompts, greedy answers)\n",
        c.reference, c.score.prompts
    );
    match &c.teacher {
        Some(_) => md.push_str("| | this model | teacher |\n|---|---:|---:|\n"),
        None => md.push_str("| | this model |\n|---|---:|\n"),
    }
    let teacher = c.teacher.as_ref().map(chat_figures);
    for (row, (name, figure)) in chat_figures(&c.score).into_iter().enumerate() {
        let _ = write!(md, "| {name} | {figure} |");
        if let Some(t) = &teacher {
            let _ = write!(md, " {} |", t[row].1);
        }
        md.push('\n');
    }
    md.push('\n');
    for (i, answer) in c.score.answers.iter().take(CHAT_ANSWERS_SHOWN).enumerate() {
        let prompt = c
            .prompts
            .get(i)
            .map_or("(prompt not recorded)", String::as_str);
        let _ = writeln!(md, "**{}**\n", prompt.trim());
        quote(md, "this model", answer);
        if let Some(t) = c.teacher.as_ref().and_then(|t| t.answers.get(i)) {
            quote(md, "teacher", t);
        }
    }
}

/// `text` as a Markdown block quote headed by `who`, so line breaks and markup in an
/// answer stay inside it.
fn quote(md: &mut String, who: &str, text: &str) {
    let _ = writeln!(md, "> *{who}:*");
    let text = text.trim();
    if text.is_empty() {
        md.push_str("> (empty)\n");
    }
    for line in text.lines() {
        let _ = writeln!(md, "> {line}");
    }
    md.push('\n');
}

/// Several reports side by side: one row per metric (union over the reports, panel order),
/// one column per report; "-" where a report lacks the metric.
pub fn compare(reports: &[EvalReport]) -> String {
    let mut keys: Vec<String> = Vec::new();
    let per_report: Vec<Vec<(String, String)>> = reports.iter().map(EvalReport::rows).collect();
    for rows in &per_report {
        for (k, _) in rows {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    keys.sort_by_key(|k| row_rank(k));
    let mut md = String::from("| metric |");
    let unique = |labels: &[String]| {
        labels
            .iter()
            .all(|l| labels.iter().filter(|m| *m == l).count() == 1)
    };
    let mut labels: Vec<String> = reports.iter().map(EvalReport::label).collect();
    for folders in 1..4 {
        if unique(&labels) {
            break;
        }
        labels = reports
            .iter()
            .map(|r| r.label_with_folders(folders))
            .collect();
    }
    for label in &labels {
        let _ = write!(md, " {} |", label.replace('|', "/"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(reports.len()));
    md.push('\n');
    for key in &keys {
        let _ = write!(md, "| {key} |");
        for rows in &per_report {
            let cell = rows.iter().find(|(k, _)| k == key).map_or("-", |(_, v)| v);
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

/// [`compare`] over result files.
pub fn compare_files(paths: &[impl AsRef<Path>]) -> Result<String> {
    let reports = paths
        .iter()
        .map(|p| EvalReport::load(p.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    Ok(compare(&reports))
}

/// Perplexity rows first (wikitext2, c4, ptb, others), then tasks in panel order, then
/// chat rows.
fn row_rank(key: &str) -> (usize, usize, String) {
    if key.starts_with("chat ") {
        return (2, 0, key.into());
    }
    let order = ["wikitext2", "c4", "ptb", "ptb-valid"];
    if let Some(set) = key.strip_suffix(" ppl") {
        let i = order.iter().position(|o| *o == set).unwrap_or(order.len());
        return (0, i, key.into());
    }
    let i = Task::ALL
        .iter()
        .position(|t| key.starts_with(&format!("{} ", t.display_name())))
        .unwrap_or(Task::ALL.len());
    (1, i, key.into())
}
