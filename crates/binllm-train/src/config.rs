//! Every setting of a conversion ([`ConvertConfig`], written to `RUN/config.toml` and read
//! back by `--resume`), the presets the CLI starts from, and the checks on them.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::linear::ScaleMode;
use crate::loss::{Distill, LossConfig};
use crate::method::{self, Method};
use crate::schedule::{LrSchedule, TSchedule};

/// Every setting of a run. Written to `RUN/config.toml`; `--resume` reads it back. Fields
/// added after the first release carry serde defaults, so older runs still resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertConfig {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// Corpus paths, or `teacher:N`.
    pub data: Vec<String>,
    pub method: Method,
    pub scales: ScaleMode,
    /// Stop gradients through S_a (METHOD.md leaves it open; ours: they flow).
    pub detach_abs_mean: bool,
    pub stage1_steps: usize,
    pub stage1_lr: f64,
    /// Tie s across q/k/v and gate/up (and o_proj's across each kv group) so export folds
    /// them away exactly.
    pub stage1_tie: bool,
    /// `ste` (clipped straight-through) or `progressive:T`.
    pub stage1_surrogate: String,
    pub schedule: TSchedule,
    /// The t of the last phase (the schedule is scaled to reach it); None: the paper's
    /// t(20) = 104.6.
    #[serde(default)]
    pub t_max: Option<f64>,
    /// Share of Stage-2 steps, at the end, that train the sign form itself (forward
    /// exactly as exported, clipped straight-through backward), so the shipped form is
    /// the one trained last.
    #[serde(default)]
    pub sign_fraction: f64,
    /// The sign stage's own peak learning rate, decayed by a cosine to `min_lr` over the
    /// stage; the main schedule then ends where the sign stage begins. None: one schedule
    /// spans every Stage-2 step, so the sign stage runs at its tail.
    #[serde(default)]
    pub sign_lr: Option<f64>,
    pub phases: usize,
    /// Stage-2 budget in tokens (rounded to whole steps per phase); `steps` wins if both.
    pub tokens: Option<usize>,
    pub steps: Option<usize>,
    pub seq_len: usize,
    /// Tokens per optimizer step (gradient accumulation reaches it).
    pub batch_tokens: usize,
    /// Sequences per forward pass.
    pub micro_batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Shape of the learning-rate decay after warm-up.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// For `wsd`: the share of steps, at the end, over which the rate decays.
    #[serde(default = "default_decay_fraction")]
    pub decay_fraction: f64,
    /// Learning-rate multiplier of the scale vectors (S_l, Stage-1 s, OneBit's vectors).
    #[serde(default = "one")]
    pub scale_lr_mult: f64,
    /// Learning-rate multiplier of the embeddings, the head, norms and biases.
    #[serde(default = "one")]
    pub embed_lr_mult: f64,
    pub weight_decay: f64,
    /// Whether weight decay applies to the latent block weights (it always applies to the
    /// embedding and head matrices, never to vectors).
    #[serde(default = "yes")]
    pub decay_latent: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub distill: Distill,
    pub kd_temperature: f64,
    /// Weight of cross-entropy in `mix`.
    pub ce_weight: f64,
    /// Weight of the hidden-state distillation term (0: none).
    #[serde(default)]
    pub kd_hidden_weight: f64,
    /// Tokens per chunk of the LM head and loss (0: the whole micro-batch's logits at once).
    #[serde(default)]
    pub loss_chunk_tokens: usize,
    /// Tokens of teacher chat transcripts to generate (0: none).
    #[serde(default)]
    pub chat_tokens: usize,
    /// Share of training windows drawn from the chat transcripts.
    #[serde(default)]
    pub chat_share: f64,
    /// Prompts the teacher answers at once while generating chat data (a memory knob).
    #[serde(default = "default_chat_batch")]
    pub chat_batch: usize,
    /// Held-out prompts of the chat score taken at the end of the run (0: none).
    #[serde(default = "default_chat_eval_prompts")]
    pub chat_eval_prompts: usize,
    pub device: String,
    /// bf16 autocast with fp32 master weights (CUDA only).
    pub bf16: bool,
    pub seed: u64,
    pub val_windows: usize,
    /// Also checkpoint every N Stage-2 steps (0: phase ends only).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk while the run goes (newest first).
    pub keep_checkpoints: usize,
    /// Keep the checkpoints once the run has finished (by default they are deleted: the
    /// sign model and the summary hold the result, and each checkpoint of a 135M model
    /// takes 1.6 GB).
    #[serde(default)]
    pub keep_final_checkpoints: bool,
    /// Token cache directory (default: $BINLLM_CACHE/tokens or ~/.cache/binllm/tokens).
    pub cache_dir: Option<PathBuf>,
    /// Stage-2 steps timed section by section (`--profile`; 0: none).
    #[serde(default)]
    pub profile_steps: usize,
}

fn default_decay_fraction() -> f64 {
    0.2
}

fn default_chat_batch() -> usize {
    2048
}

fn default_chat_eval_prompts() -> usize {
    48
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// binllm's measured one-GPU recipe (docs/RECIPE.md): distillation from the FP teacher
    /// at lr 2e-3, 3M tokens of the teacher's chat transcripts as 20% of the windows, 80M
    /// Stage-2 tokens, the paper's t schedule (to 104.6), the last 4% of steps on the sign
    /// form (SmolLM2-135M: 17.5 minutes on one H200, WikiText-2 47.4; docs/RECIPE.md).
    Quality,
    /// The paper's recipe: seq 2048, 128 sequences a step, lr 1e-4 -> 2e-6, AdamW 0.1.
    Paper,
    /// Minutes on a CPU with a tiny model (stories260K): seq 256, 8 windows a step, 20
    /// phases x 20 steps, lr 2e-3.
    Smoke,
}

impl Preset {
    /// The preset used when none is named: `quality` on CUDA, `paper` elsewhere (the
    /// quality recipe's teacher chat data and budget are out of a CPU's reach).
    pub fn default_for(cuda: bool) -> Preset {
        if cuda {
            Preset::Quality
        } else {
            Preset::Paper
        }
    }
}

impl ConvertConfig {
    pub fn preset(preset: Preset, model: PathBuf, data: Vec<String>, method: Method) -> Self {
        let base = ConvertConfig {
            model,
            tokenizer: None,
            data,
            method,
            scales: ScaleMode::Dual,
            detach_abs_mean: false,
            stage1_steps: method.default_stage1_steps(),
            stage1_lr: 1e-3,
            stage1_tie: true,
            stage1_surrogate: "ste".into(),
            schedule: TSchedule::Exp,
            t_max: None,
            sign_fraction: 0.0,
            sign_lr: None,
            phases: 20,
            tokens: None,
            steps: None,
            seq_len: 2048,
            batch_tokens: 128 * 2048,
            micro_batch: 16,
            lr: 1e-4,
            min_lr: 2e-6,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Cosine,
            decay_fraction: default_decay_fraction(),
            scale_lr_mult: 1.0,
            embed_lr_mult: 1.0,
            weight_decay: 0.1,
            decay_latent: true,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            distill: Distill::Ce,
            kd_temperature: 1.0,
            ce_weight: 0.5,
            loss_chunk_tokens: 0,
            kd_hidden_weight: 0.0,
            chat_tokens: 0,
            chat_share: 0.0,
            chat_batch: default_chat_batch(),
            chat_eval_prompts: default_chat_eval_prompts(),
            device: "auto".into(),
            bf16: true,
            seed: 0,
            val_windows: 32,
            checkpoint_every: 0,
            keep_checkpoints: 1,
            keep_final_checkpoints: false,
            cache_dir: None,
            profile_steps: 0,
        };
        match preset {
            Preset::Paper => base,
            Preset::Quality => ConvertConfig {
                batch_tokens: 16 * 2048,
                tokens: Some(80_000_000),
                lr: 2e-3,
                distill: Distill::Kd,
                chat_tokens: 3_000_000,
                chat_share: 0.2,
                // The sign stage is binaryllm's; the baselines train their final form
                // throughout.
                sign_fraction: if method == Method::Binaryllm {
                    0.04
                } else {
                    0.0
                },
                ..base
            },
            Preset::Smoke => ConvertConfig {
                seq_len: 256,
                batch_tokens: 8 * 256,
                micro_batch: 8,
                steps: Some(400),
                lr: 2e-3,
                min_lr: 1e-4,
                stage1_lr: 1e-2,
                val_windows: 32,
                ..base
            },
        }
    }

    pub fn loss(&self) -> LossConfig {
        LossConfig {
            distill: self.distill,
            temperature: self.kd_temperature,
            ce_weight: self.ce_weight,
            hidden_weight: self.kd_hidden_weight,
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            let base = std::env::var_os("BINLLM_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/binllm"))
                })
                .unwrap_or_else(|| PathBuf::from(".binllm-cache"));
            base.join("tokens")
        })
    }

    /// The t of the progressive form at `progress` in [0, 1) through Stage 2.
    pub fn t_at(&self, progress: f64) -> f64 {
        let t = self.schedule.t(progress, self.phases);
        match self.t_max {
            Some(max) => t * max / crate::schedule::exp_t(20.0),
            None => t,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.phases >= 1, "--phases must be at least 1");
        ensure!(self.seq_len >= 2, "--seq-len must be at least 2");
        ensure!(
            self.batch_tokens >= self.seq_len,
            "--batch-tokens ({}) must hold at least one sequence of --seq-len ({})",
            self.batch_tokens,
            self.seq_len
        );
        ensure!(self.micro_batch >= 1, "--micro-batch must be at least 1");
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr must be positive"
        );
        ensure!(
            !self.data.is_empty() || !self.method.trains(),
            "--data is required for training methods"
        );
        ensure!(
            (0.0..=1.0).contains(&self.ce_weight),
            "--ce-weight must be in [0, 1]"
        );
        ensure!(
            (0.0..1.0).contains(&self.chat_share),
            "--chat-share must be in [0, 1)"
        );
        ensure!(
            self.chat_share == 0.0 || self.chat_tokens > 0,
            "--chat-share {} needs chat data: set --chat-tokens",
            self.chat_share
        );
        ensure!(self.chat_batch >= 1, "--chat-batch must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.sign_fraction),
            "--sign-fraction must be in [0, 1)"
        );
        ensure!(
            self.sign_fraction == 0.0 || self.method == Method::Binaryllm,
            "--sign-fraction applies to binaryllm (the baselines train their final form throughout)"
        );
        ensure!(
            self.sign_lr.is_none_or(|lr| lr > 0.0 && lr.is_finite()),
            "--sign-lr must be a positive number"
        );
        ensure!(
            self.t_max.is_none_or(|t| t > 0.0 && t.is_finite()),
            "--t-max must be positive"
        );
        ensure!(
            self.decay_fraction > 0.0 && self.decay_fraction <= 1.0,
            "--decay-fraction must be in (0, 1]"
        );
        ensure!(
            self.scale_lr_mult > 0.0 && self.embed_lr_mult > 0.0,
            "learning-rate multipliers must be positive"
        );
        method::parse_stage1_surrogate(&self.stage1_surrogate)?;
        self.check_budget()
    }

    /// Tokens in one optimizer step, as the plan will round them (whole micro-batches).
    pub fn tokens_per_step(&self) -> usize {
        let mut windows = (self.batch_tokens / self.seq_len).max(1);
        windows -= windows % self.micro_batch.min(windows).max(1);
        windows * self.seq_len
    }

    /// A Stage-2 budget too small for one step per phase fails before any work, in the
    /// user's own option names and with the smallest value that works.
    fn check_budget(&self) -> Result<()> {
        if !self.method.trains() {
            return Ok(());
        }
        let phases = self.phases;
        if let Some(steps) = self.steps {
            ensure!(
                steps >= phases,
                "--steps {steps} is fewer than the {phases} phases (each phase needs a step): use --steps {phases} or more, a multiple of {phases}"
            );
        } else if let Some(tokens) = self.tokens {
            let per_step = self.tokens_per_step();
            ensure!(
                tokens / per_step >= phases,
                "--tokens {tokens} gives {} Stage-2 steps of {per_step} tokens, fewer than the {phases} phases: use --tokens {} or more, or a smaller --batch-tokens",
                tokens / per_step,
                phases * per_step
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_validates_and_quality_is_the_cuda_default() {
        for preset in [Preset::Quality, Preset::Paper, Preset::Smoke] {
            let c = ConvertConfig::preset(preset, "m".into(), vec!["d".into()], Method::Binaryllm);
            c.validate().unwrap();
        }
        assert_eq!(Preset::default_for(true), Preset::Quality);
        assert_eq!(Preset::default_for(false), Preset::Paper);
        let mut bad =
            ConvertConfig::preset(Preset::Paper, "m".into(), vec!["d".into()], Method::Ste);
        bad.sign_fraction = 0.1;
        assert!(bad.validate().is_err(), "the sign stage is binaryllm's");
        bad.sign_fraction = 0.0;
        bad.chat_share = 0.2;
        assert!(bad.validate().is_err(), "a chat share needs chat data");
    }

    #[test]
    fn t_max_scales_the_whole_schedule() {
        let mut c = ConvertConfig::preset(Preset::Paper, "m".into(), vec![], Method::Binaryllm);
        let paper: Vec<f64> = (0..20).map(|i| c.t_at(i as f64 / 20.0)).collect();
        c.t_max = Some(300.0);
        for (i, &t) in paper.iter().enumerate() {
            let scaled = c.t_at(i as f64 / 20.0);
            assert!((scaled / t - 300.0 / crate::schedule::exp_t(20.0)).abs() < 1e-9);
        }
        assert!((c.t_at(0.999) - 300.0).abs() < 1e-9);
    }

    #[test]
    fn the_quality_preset_keeps_the_paper_t_and_gives_only_binaryllm_a_sign_stage() {
        // t_max 300 won a CPU proxy but lost badly on the GPU (docs/RECIPE.md): the preset
        // keeps the paper's schedule.
        let quality =
            |method| ConvertConfig::preset(Preset::Quality, "m".into(), vec!["d".into()], method);
        let binaryllm = quality(Method::Binaryllm);
        assert_eq!(binaryllm.t_max, None);
        assert!((binaryllm.t_at(0.999) - crate::schedule::exp_t(20.0)).abs() < 1e-9);
        assert_eq!(binaryllm.sign_fraction, 0.04);
        for baseline in [Method::Ste, Method::Ternary] {
            let c = quality(baseline);
            assert_eq!(c.sign_fraction, 0.0, "{baseline:?}");
            c.validate().unwrap();
        }
    }
}
