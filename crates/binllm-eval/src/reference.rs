//! The Python reference (`tools/reference/eval_reference.py`: transformers + lm-eval's own
//! task code) and how a binllm run is checked against it.
//!
//! The reference file holds numbers and hashes only: per perplexity set the token count,
//! windows and ppl; per task example the hashes of every (context, continuation), their
//! token counts and a hash of their token ids, the per-choice log-likelihoods, is_greedy
//! flags and predictions.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use binllm_format::TextTokenizer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::report::EvalReport;
use crate::tasks::{encode_pair, McExample};

/// Relative perplexity difference tolerated against the reference.
pub const PPL_REL_TOLERANCE: f64 = 0.005;
/// Fraction of examples whose chosen answer must match.
pub const SAME_ANSWER_FRACTION: f64 = 0.99;
/// Absolute tolerance on a choice's log-likelihood sum.
pub const LOGLIKELIHOOD_TOLERANCE: f64 = 1e-2;

/// The first 16 hex digits of SHA-256 of the UTF-8 text (the reference's `sha16`).
pub fn sha16(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `sha16(json.dumps([context_tokens, continuation_tokens]))` as Python writes it.
pub fn tokens_sha16(context: &[u32], continuation: &[u32]) -> String {
    let list = |ids: &[u32]| {
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    sha16(&format!("[[{}], [{}]]", list(context), list(continuation)))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceFile {
    pub engine: String,
    pub ctx: usize,
    pub limit: usize,
    pub max_length: usize,
    #[serde(default)]
    pub lm_eval_version: Option<String>,
    pub perplexity: BTreeMap<String, ReferencePerplexity>,
    pub tasks: BTreeMap<String, ReferenceTask>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferencePerplexity {
    pub tokens: usize,
    pub windows: usize,
    pub predicted_tokens: usize,
    pub nll_sum: f64,
    pub ppl: f64,
    pub text_sha16: String,
    #[serde(default)]
    pub text_chars: Option<usize>,
    #[serde(default)]
    pub window_mean_nll: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceTask {
    pub n: usize,
    pub num_docs: usize,
    pub metrics: BTreeMap<String, f64>,
    pub examples: Vec<ReferenceExample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceExample {
    pub doc_id: usize,
    pub gold: usize,
    pub choice_chars: Vec<usize>,
    pub loglikelihoods: Vec<f64>,
    pub is_greedy: Vec<bool>,
    pub pred: usize,
    pub pred_norm: usize,
    pub requests: Vec<ReferenceRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceRequest {
    pub context_sha16: String,
    pub continuation_sha16: String,
    pub context_tokens: usize,
    pub continuation_tokens: usize,
    pub tokens_sha16: String,
}

impl ReferenceFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the reference", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not an eval_reference.py output", path.display()))
    }
}

/// Differences between our prompts and the reference's for one task's examples (text
/// level: no tokenizer needed). Empty when they agree.
pub fn prompt_mismatches(examples: &[McExample], reference: &ReferenceTask) -> Vec<String> {
    let mut out = Vec::new();
    if examples.len() != reference.examples.len() {
        out.push(format!(
            "{} examples here, {} in the reference",
            examples.len(),
            reference.examples.len()
        ));
    }
    for (ours, theirs) in examples.iter().zip(&reference.examples) {
        let id = ours.doc_id;
        if ours.gold != theirs.gold {
            out.push(format!(
                "example {id}: gold {} vs {}",
                ours.gold, theirs.gold
            ));
        }
        if ours.requests.len() != theirs.requests.len() {
            out.push(format!(
                "example {id}: {} choices vs {}",
                ours.requests.len(),
                theirs.requests.len()
            ));
            continue;
        }
        if ours.choice_chars != theirs.choice_chars {
            out.push(format!(
                "example {id}: choice lengths {:?} vs {:?}",
                ours.choice_chars, theirs.choice_chars
            ));
        }
        for (k, ((ctx, cont), r)) in ours.requests.iter().zip(&theirs.requests).enumerate() {
            if sha16(ctx) != r.context_sha16 {
                out.push(format!("example {id} choice {k}: context differs: {ctx:?}"));
            }
            if sha16(cont) != r.continuation_sha16 {
                out.push(format!(
                    "example {id} choice {k}: continuation differs: {cont:?}"
                ));
            }
        }
    }
    out
}

/// Differences between our `encode_pair` token ids and the reference's (needs the
/// reference model's tokenizer). Empty when they agree.
pub fn token_mismatches(
    tokenizer: &TextTokenizer,
    examples: &[McExample],
    reference: &ReferenceTask,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (ours, theirs) in examples.iter().zip(&reference.examples) {
        for (k, ((ctx, cont), r)) in ours.requests.iter().zip(&theirs.requests).enumerate() {
            let (c, t) = encode_pair(tokenizer, ctx, cont)?;
            if c.len() != r.context_tokens
                || t.len() != r.continuation_tokens
                || tokens_sha16(&c, &t) != r.tokens_sha16
            {
                out.push(format!(
                    "example {} choice {k}: {}+{} tokens vs {}+{} in the reference",
                    ours.doc_id,
                    c.len(),
                    t.len(),
                    r.context_tokens,
                    r.continuation_tokens
                ));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexityAgreement {
    pub dataset: String,
    pub ours: f64,
    pub reference: f64,
    pub relative_difference: f64,
    pub same_tokens: bool,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskAgreement {
    pub task: String,
    /// Examples present in both.
    pub compared: usize,
    pub same_pred: usize,
    pub same_pred_norm: usize,
    pub same_greedy: usize,
    /// Choices whose log-likelihood is within [`LOGLIKELIHOOD_TOLERANCE`].
    pub choices: usize,
    pub choices_within_tolerance: usize,
    pub max_abs_loglikelihood_difference: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgreementSummary {
    pub perplexity: Vec<PerplexityAgreement>,
    pub tasks: Vec<TaskAgreement>,
}

impl AgreementSummary {
    pub fn passes(&self) -> bool {
        self.perplexity.iter().all(|p| p.ok) && self.tasks.iter().all(|t| t.ok)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.perplexity {
            s.push_str(&format!(
                "{} {}: ppl {:.4} vs reference {:.4} ({:+.3} %), same token count: {}\n",
                if p.ok { "ok  " } else { "FAIL" },
                p.dataset,
                p.ours,
                p.reference,
                100.0 * p.relative_difference,
                p.same_tokens
            ));
        }
        for t in &self.tasks {
            s.push_str(&format!(
                "{} {}: same answer {}/{}, same acc_norm answer {}/{}, same greedy {}/{}, \
                 log-likelihoods within {LOGLIKELIHOOD_TOLERANCE}: {}/{} (max diff {:.2e})\n",
                if t.ok { "ok  " } else { "FAIL" },
                t.task,
                t.same_pred,
                t.compared,
                t.same_pred_norm,
                t.compared,
                t.same_greedy,
                t.choices,
                t.choices_within_tolerance,
                t.choices,
                t.max_abs_loglikelihood_difference
            ));
        }
        s
    }
}

/// Compares a run with the reference on what both contain: perplexity within 0.5 %, the
/// same chosen answer on at least 99 % of the examples, every choice's log-likelihood
/// within 1e-2.
pub fn compare_with_reference(report: &EvalReport, reference: &ReferenceFile) -> AgreementSummary {
    let mut perplexity = Vec::new();
    for p in &report.perplexity {
        let Some(r) = reference.perplexity.get(&p.dataset) else {
            continue;
        };
        if p.ctx != reference.ctx || p.stride.is_some() {
            continue;
        }
        let rel = (p.ppl - r.ppl) / r.ppl;
        perplexity.push(PerplexityAgreement {
            dataset: p.dataset.clone(),
            ours: p.ppl,
            reference: r.ppl,
            relative_difference: rel,
            same_tokens: p.tokens == r.tokens,
            ok: rel.abs() <= PPL_REL_TOLERANCE,
        });
    }
    let mut tasks = Vec::new();
    for t in &report.tasks {
        let Some(r) = reference.tasks.get(&t.task) else {
            continue;
        };
        let by_id: BTreeMap<usize, _> = r.examples.iter().map(|e| (e.doc_id, e)).collect();
        let mut a = TaskAgreement {
            task: t.task.clone(),
            compared: 0,
            same_pred: 0,
            same_pred_norm: 0,
            same_greedy: 0,
            choices: 0,
            choices_within_tolerance: 0,
            max_abs_loglikelihood_difference: 0.0,
            ok: false,
        };
        for e in &t.examples {
            let Some(re) = by_id.get(&e.doc_id) else {
                continue;
            };
            a.compared += 1;
            a.same_pred += usize::from(e.pred == re.pred);
            a.same_pred_norm += usize::from(e.pred_norm == re.pred_norm);
            for (k, (ll, rll)) in e.loglikelihoods.iter().zip(&re.loglikelihoods).enumerate() {
                let d = (ll - rll).abs();
                a.choices += 1;
                a.choices_within_tolerance += usize::from(d <= LOGLIKELIHOOD_TOLERANCE);
                a.max_abs_loglikelihood_difference = a.max_abs_loglikelihood_difference.max(d);
                a.same_greedy += usize::from(e.is_greedy.get(k) == re.is_greedy.get(k));
            }
            if e.loglikelihoods.len() != re.loglikelihoods.len() {
                a.choices += e.loglikelihoods.len().abs_diff(re.loglikelihoods.len());
            }
        }
        a.ok = a.compared > 0
            && a.same_pred as f64 >= SAME_ANSWER_FRACTION * a.compared as f64
            && a.choices_within_tolerance == a.choices;
        tasks.push(a);
    }
    AgreementSummary { perplexity, tasks }
}
