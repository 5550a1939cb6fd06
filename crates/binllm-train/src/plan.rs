//! How a run's budget maps onto optimizer steps, phases and training windows
//! (`RUN/plan.json`).

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::config::ConvertConfig;
use crate::data::Windows;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub windows_per_step: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub stage1_steps: usize,
    pub stage2_steps: usize,
    pub steps_per_phase: usize,
    /// The last Stage-2 steps, which train the sign form itself (`--sign-fraction`).
    pub sign_steps: usize,
    pub tokens_per_step: usize,
    pub stage2_tokens: usize,
    pub corpus_tokens: usize,
    pub corpus_documents: usize,
    pub training_windows: usize,
    /// Windows of teacher chat transcripts, and their share of training windows.
    pub chat_windows: usize,
    pub chat_share: f64,
    /// How many times the corpus training windows are gone through (> 1: data repeats).
    pub epochs: f64,
    /// How many times the chat windows are gone through.
    pub chat_epochs: f64,
}

impl Plan {
    pub fn new(config: &ConvertConfig, windows: &Windows, documents: usize) -> Result<Plan> {
        let mut windows_per_step = (config.batch_tokens / config.seq_len).max(1);
        let micro_batch = config.micro_batch.min(windows_per_step);
        windows_per_step -= windows_per_step % micro_batch;
        let tokens_per_step = windows_per_step * config.seq_len;
        let available = windows.train.len();
        let stage2_steps = match (config.steps, config.tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => t / tokens_per_step,
            (None, None) => {
                available.saturating_sub(config.stage1_steps * windows_per_step) / windows_per_step
            }
        };
        let stage2_steps = if config.method.trains() {
            stage2_steps - stage2_steps % config.phases
        } else {
            0
        };
        ensure!(
            !config.method.trains() || stage2_steps >= config.phases,
            "the budget gives {stage2_steps} Stage-2 steps, fewer than the {} phases: raise --tokens/--steps or lower --batch-tokens",
            config.phases
        );
        let stage1_steps = if config.method.trains() {
            config.stage1_steps
        } else {
            0
        };
        let sign_steps = (stage2_steps as f64 * config.sign_fraction).round() as usize;
        let (epochs, chat_epochs) =
            windows.passes((stage1_steps + stage2_steps) * windows_per_step);
        Ok(Plan {
            windows_per_step,
            micro_batch,
            accumulation: windows_per_step / micro_batch,
            stage1_steps,
            stage2_steps,
            steps_per_phase: stage2_steps / config.phases,
            sign_steps,
            tokens_per_step,
            stage2_tokens: stage2_steps * tokens_per_step,
            corpus_tokens: windows.corpus_tokens,
            corpus_documents: documents,
            training_windows: available,
            chat_windows: windows.chat.len(),
            chat_share: windows.chat_share,
            epochs,
            chat_epochs,
        })
    }

    /// Phase (1-based) of Stage-2 step `k`.
    pub fn phase_of(&self, k: usize) -> usize {
        k / self.steps_per_phase.max(1) + 1
    }

    /// Whether Stage-2 step `k` trains the sign form itself.
    pub fn trains_sign_form(&self, k: usize) -> bool {
        k + self.sign_steps >= self.stage2_steps
    }

    /// Window starts of micro-batch `m` of global step `step` (Stage 1 steps come first).
    pub fn micro_batch_windows(&self, windows: &Windows, step: usize, m: usize) -> Vec<usize> {
        let first = step * self.windows_per_step + m * self.micro_batch;
        (first..first + self.micro_batch)
            .map(|i| windows.training_window(i))
            .collect()
    }
}
