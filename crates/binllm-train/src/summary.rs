//! What a finished run reports: the types behind `RUN/summary.json`, their Markdown
//! rendering (`RUN/summary.md`) and the training plot (`RUN/training.png`).

use std::path::Path;

use anyhow::Result;
use binllm_eval::chat::ChatScore;
use serde::{Deserialize, Serialize};

use crate::chat_data::ChatDataReport;

/// Where Stage 2's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stage2Time {
    pub wall: f64,
    pub steps: f64,
}

/// What a finished run reports (also `RUN/summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub method: String,
    pub model: String,
    pub device: String,
    pub plan_stage2_steps: usize,
    pub tokens_trained: usize,
    pub stage1: Option<Stage1Report>,
    pub phases: Vec<PhaseReport>,
    pub validation: FinalValidation,
    /// Stage-2 tokens over Stage-2 wall-clock (phase-end validation and checkpoints included).
    pub stage2_tokens_per_second: f64,
    /// Stage-2 tokens over the time spent in optimizer steps alone.
    #[serde(default)]
    pub stage2_step_tokens_per_second: f64,
    pub wall_seconds: f64,
    pub peak_gpu_memory_bytes: Option<u64>,
    pub sign_model: Option<String>,
    pub bits_per_weight: Option<binllm_format::packed::BitsPerWeight>,
    /// The teacher chat transcripts trained on (`--chat-tokens`).
    #[serde(default)]
    pub chat_data: Option<ChatDataReport>,
    /// The chat score of the shipped model and of its teacher on the held-out prompts.
    #[serde(default)]
    pub chat: Option<ChatComparison>,
    /// `--profile`: milliseconds per Stage-2 step of each section.
    #[serde(default)]
    pub profile: Option<Vec<(String, f64)>>,
}

/// The shipped model's chat score beside its teacher's (`RUN/chat-reference.json` holds
/// the prompts and the teacher's answers, for `binllm eval --tasks chat:FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatComparison {
    pub student: ChatScore,
    pub teacher: ChatScore,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage1Report {
    pub steps: usize,
    pub initial_loss: f64,
    pub final_loss: f64,
    pub val_loss_before: f64,
    pub val_loss_after: f64,
    /// Mean relative binary reconstruction error per layer, before and after.
    pub reconstruction_error_before: Vec<f64>,
    pub reconstruction_error_after: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseReport {
    pub phase: usize,
    pub t: f64,
    pub end_step: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_loss_sign: Option<f64>,
}

/// Held-out losses (nats per token) of the model at the start and the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalValidation {
    pub windows: usize,
    pub tokens: usize,
    pub full_precision: f64,
    pub ptq: f64,
    /// The final training form (F at t(P) for binaryllm).
    pub final_training_form: f64,
    /// The form that ships (sign form for 1-bit methods).
    pub final_sign_form: f64,
    /// sign-form minus training-form loss (the paper claims it is negligible).
    pub sign_gap: f64,
}

pub fn write_summary(run_dir: &Path, summary: &Summary) -> Result<()> {
    binllm_format::atomic::write_atomically(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    let v = &summary.validation;
    let ppl = |l: f64| l.exp();
    let mut md = format!(
        "# binllm convert: {} on {}\n\n| model form | held-out loss | perplexity |\n|---|---:|---:|\n",
        summary.method, summary.model
    );
    for (name, loss) in [
        ("full precision (start)", v.full_precision),
        ("PTQ sign (start)", v.ptq),
        ("final training form", v.final_training_form),
        ("final shipped form", v.final_sign_form),
    ] {
        md += &format!("| {name} | {loss:.4} | {:.2} |\n", ppl(loss));
    }
    md += &format!(
        "\nSign-form gap: {:+.4} nats/token. Held-out: {} windows, {} tokens.\n\nTokens trained: {}; Stage-2 speed {:.0} tokens/s ({:.0} in training steps alone, without phase-end validation and checkpoints); wall-clock {:.1} s",
        v.sign_gap, v.windows, v.tokens, summary.tokens_trained, summary.stage2_tokens_per_second, summary.stage2_step_tokens_per_second, summary.wall_seconds
    );
    if let Some(bytes) = summary.peak_gpu_memory_bytes {
        md += &format!(
            "; peak GPU memory {:.2} GiB",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    md += ".\n";
    if let Some(s1) = &summary.stage1 {
        md += &format!(
            "\nStage 1 ({} steps): loss {:.4} -> {:.4}, held-out {:.4} -> {:.4}, mean reconstruction error {:.4} -> {:.4}.\n",
            s1.steps,
            s1.initial_loss,
            s1.final_loss,
            s1.val_loss_before,
            s1.val_loss_after,
            mean(&s1.reconstruction_error_before),
            mean(&s1.reconstruction_error_after)
        );
    }
    if !summary.phases.is_empty() {
        md += "\n| phase | t | train loss | held-out (training form) | held-out (sign form) |\n|---:|---:|---:|---:|---:|\n";
        for p in &summary.phases {
            md += &format!(
                "| {} | {:.2} | {:.4} | {:.4} | {} |\n",
                p.phase,
                p.t,
                p.train_loss,
                p.val_loss,
                p.val_loss_sign.map_or("-".into(), |s| format!("{s:.4}"))
            );
        }
    }
    if let Some(chat) = &summary.chat_data {
        md += &format!(
            "\nTeacher chat data: {} tokens in {} transcripts (mean answer {:.0} tokens; {} unended and {} looping answers dropped), generated in {:.1} s.\n",
            chat.tokens, chat.transcripts, chat.mean_answer_tokens, chat.dropped_unended, chat.dropped_loops, chat.seconds
        );
    }
    if let Some(chat) = &summary.chat {
        md += &format!(
            "\n## Chat score ({} held-out prompts, greedy, teacher's answers as reference)\n\n| model | answer ppl | ended | loops | clean (ended, no loop) | mean answer tokens |\n|---|---:|---:|---:|---:|---:|\n",
            chat.student.prompts
        );
        for (name, s) in [
            ("shipped (sign form)", &chat.student),
            ("teacher (FP)", &chat.teacher),
        ] {
            md += &format!(
                "| {name} | {:.2} | {:.0}% | {:.0}% | {:.0}% | {:.0} |\n",
                s.answer_perplexity,
                100.0 * s.ended_share,
                100.0 * s.loop_share,
                100.0 * s.clean_share,
                s.mean_answer_tokens
            );
        }
    }
    if let Some(profile) = &summary.profile {
        md += &format!(
            "\n## Where a Stage-2 step's time goes (`--profile`)\n\n{}",
            crate::profile::render(profile)
        );
    }
    binllm_format::atomic::write_atomically(&run_dir.join("summary.md"), md.as_bytes())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub fn write_plot(run_dir: &Path, summary: &Summary) -> Result<()> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let mut curves = crate::plot::Curves {
        train_loss: Vec::new(),
        val_loss: Vec::new(),
        val_loss_sign: Vec::new(),
        t: Vec::new(),
    };
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["stage"] == 2 {
            let step = v["step"].as_f64().unwrap_or(0.0);
            curves
                .train_loss
                .push((step, v["loss"].as_f64().unwrap_or(f64::NAN)));
            curves
                .t
                .push((step, v["t"].as_f64().unwrap_or(0.0).max(0.1)));
        }
    }
    for p in &summary.phases {
        curves.val_loss.push((p.end_step as f64, p.val_loss));
        if let Some(s) = p.val_loss_sign {
            curves.val_loss_sign.push((p.end_step as f64, s));
        }
    }
    if curves.train_loss.is_empty() {
        return Ok(());
    }
    crate::plot::plot(
        &curves,
        &format!("binllm convert: {} on {}", summary.method, summary.model),
        &run_dir.join("training.png"),
    )
}
