//! `binllm convert`: a pretrained model and a corpus in, a 1-bit model out.
//!
//! The run, in order (METHOD.md): Stage 1 trains only the per-input-channel scales `s`
//! against the binarized forward; the latent weights become `W / s*`; Stage 2 trains every
//! parameter through `P` phases, phase `c` on its own data chunk at temperature `t(c)`;
//! finally the F-form and the sign form are evaluated on held-out windows and the sign form
//! is saved as a packed sign model.
//!
//! A run directory holds everything: `config.toml` (the resolved settings), `metrics.jsonl`,
//! `checkpoints/`, `training.png`, `summary.json` / `summary.md`, `sign-model.safetensors`.
//! Checkpoints are written atomically at every phase end (and every N steps); `--resume`
//! continues from the newest with the same data order, schedule and optimizer state.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use binllm_format::packed::Provenance;
use binllm_format::{LoadOptions, PretrainedModel, TextTokenizer};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{self, DataSpec, Windows};
use crate::linear::{ScaleMode, WeightForm};
use crate::loss::{self, Distill, LossConfig};
use crate::method::{self, Method};
use crate::model::Llama;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::{learning_rate, TSchedule};
use crate::shim;

/// Every setting of a run. Written to `RUN/config.toml`; `--resume` reads it back.
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
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub distill: Distill,
    pub kd_temperature: f64,
    /// Weight of cross-entropy in `mix`.
    pub ce_weight: f64,
    pub device: String,
    /// bf16 autocast with fp32 master weights (CUDA only).
    pub bf16: bool,
    pub seed: u64,
    pub val_windows: usize,
    /// Also checkpoint every N Stage-2 steps (0: phase ends only).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (newest first).
    pub keep_checkpoints: usize,
    /// Token cache directory (default: $BINLLM_CACHE/tokens or ~/.cache/binllm/tokens).
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Minutes on a CPU with a tiny model (stories260K): seq 256, 8 windows a step, 20
    /// phases x 20 steps, lr 2e-3.
    Smoke,
    /// The paper's recipe: seq 2048, 128 sequences a step, lr 1e-4 -> 2e-6, AdamW 0.1.
    Paper,
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
            phases: 20,
            tokens: None,
            steps: None,
            seq_len: 2048,
            batch_tokens: 128 * 2048,
            micro_batch: 16,
            lr: 1e-4,
            min_lr: 2e-6,
            warmup_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            distill: Distill::Ce,
            kd_temperature: 1.0,
            ce_weight: 0.5,
            device: "auto".into(),
            bf16: true,
            seed: 0,
            val_windows: 32,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            cache_dir: None,
        };
        match preset {
            Preset::Paper => base,
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

    fn loss(&self) -> LossConfig {
        LossConfig {
            distill: self.distill,
            temperature: self.kd_temperature,
            ce_weight: self.ce_weight,
        }
    }

    fn cache_dir(&self) -> PathBuf {
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
        method::parse_stage1_surrogate(&self.stage1_surrogate)?;
        Ok(())
    }
}

/// How the budget maps onto steps.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub windows_per_step: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub stage1_steps: usize,
    pub stage2_steps: usize,
    pub steps_per_phase: usize,
    pub tokens_per_step: usize,
    pub stage2_tokens: usize,
    pub corpus_tokens: usize,
    pub corpus_documents: usize,
    pub training_windows: usize,
    /// How many times the training windows are gone through (> 1 means data repeats).
    pub epochs: f64,
}

impl Plan {
    fn new(config: &ConvertConfig, windows: &Windows, documents: usize) -> Result<Plan> {
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
        let needed = (stage1_steps + stage2_steps) * windows_per_step;
        Ok(Plan {
            windows_per_step,
            micro_batch,
            accumulation: windows_per_step / micro_batch,
            stage1_steps,
            stage2_steps,
            steps_per_phase: stage2_steps / config.phases,
            tokens_per_step,
            stage2_tokens: stage2_steps * tokens_per_step,
            corpus_tokens: windows.stream.len(),
            corpus_documents: documents,
            training_windows: available,
            epochs: needed as f64 / available.max(1) as f64,
        })
    }

    /// Phase (1-based) of Stage-2 step `k`.
    fn phase_of(&self, k: usize) -> usize {
        k / self.steps_per_phase.max(1) + 1
    }

    /// Window starts of micro-batch `m` of global step `step` (Stage 1 steps come first).
    fn micro_batch_windows(&self, windows: &Windows, step: usize, m: usize) -> Vec<usize> {
        let first = step * self.windows_per_step + m * self.micro_batch;
        (first..first + self.micro_batch)
            .map(|i| windows.train[i % windows.train.len()])
            .collect()
    }
}

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

/// The model's loss on `starts` windows under `form`, mean nats per predicted token.
pub fn validation_loss(
    model: &mut Llama,
    windows: &Windows,
    starts: &[usize],
    form: WeightForm,
    micro_batch: usize,
    bf16: bool,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let saved = model.form;
    model.form = form;
    let mut total = 0.0;
    for chunk in starts.chunks(micro_batch.max(1)) {
        let (x, y) = windows.batch(chunk, model.device());
        let loss =
            shim::with_autocast_bf16(bf16, || loss::cross_entropy(&model.forward(&x, None), &y));
        total += loss.double_value(&[]) * chunk.len() as f64;
    }
    model.form = saved;
    Ok(total / starts.len().max(1) as f64)
}

/// Runs a conversion in `run_dir` (created; with `resume`, continued).
pub fn run(config: ConvertConfig, run_dir: &Path, resume: bool) -> Result<Summary> {
    let started = Instant::now();
    let config = prepare_run_dir(config, run_dir, resume)?;
    config.validate()?;
    let device = crate::device::parse_device(&config.device)?;
    let bf16 = config.bf16 && device.is_cuda();
    if bf16 {
        shim::set_autocast_bf16()?;
    }
    tch::manual_seed(config.seed as i64);

    let pretrained = PretrainedModel::load(
        &config.model,
        &LoadOptions {
            tokenizer: config.tokenizer.clone(),
        },
    )?;
    let tokenizer = pretrained
        .tokenizer()
        .context("conversion needs the model's tokenizer")?;
    let mut model = Llama::from_pretrained(&pretrained, device, Kind::Float)?;
    let (windows, documents) = load_windows(&config, &model, tokenizer, run_dir)?;
    let plan = Plan::new(&config, &windows, documents)?;
    print_plan(&config, &plan, &pretrained, device);
    std::fs::write(
        run_dir.join("plan.json"),
        serde_json::to_string_pretty(&plan)?,
    )?;

    let teacher = if config.loss().needs_teacher() {
        let mut t = Llama::from_pretrained(&pretrained, device, Kind::Float)?;
        if bf16 {
            t.to_kind(Kind::BFloat16);
        }
        Some(t)
    } else {
        None
    };
    let val = windows.validation.clone();
    let micro = plan.micro_batch;
    let fp_val = validation_loss(&mut model, &windows, &val, WeightForm::Full, micro, bf16)?;
    let ptq_val = validation_loss(&mut model, &windows, &val, WeightForm::Sign, micro, bf16)?;
    eprintln!("held-out loss before conversion: full precision {fp_val:.4}, PTQ sign {ptq_val:.4} ({} windows)", val.len());

    let mut trainer = Trainer {
        config: &config,
        plan: &plan,
        windows: &windows,
        run_dir,
        bf16,
        teacher,
        metrics: MetricsLog::open(run_dir)?,
        pending_checkpoint: None,
    };
    let latest = if resume {
        checkpoint::latest_checkpoint(run_dir)?
    } else {
        None
    };
    let resume_state = latest
        .map(|p| Checkpoint::load(&p).map(|c| (p, c)))
        .transpose()?;
    let resume_step = resume_state
        .as_ref()
        .map(|(_, c)| c.meta["step"].as_u64().unwrap_or(0) as usize);
    if let Some(step) = resume_step {
        trainer.metrics.truncate_after(step)?;
        eprintln!(
            "resuming from step {step} ({})",
            resume_state.as_ref().unwrap().0.display()
        );
    }

    let surrogate = method::parse_stage1_surrogate(&config.stage1_surrogate)?;
    let mut stage1 = None;
    if plan.stage1_steps > 0 {
        method::attach_input_scales(&mut model, config.stage1_tie);
    }
    let stage2_structure = |model: &mut Llama| {
        method::attach_method_parameters(
            model,
            config.method,
            config.scales,
            config.detach_abs_mean,
        );
    };
    match (&resume_state, resume_step) {
        (Some((path, ckpt)), Some(step)) if step >= plan.stage1_steps => {
            stage2_structure(&mut model);
            load_params(&model, ckpt, path)?;
            stage1 = ckpt
                .meta
                .get("stage1")
                .and_then(|v| serde_json::from_value(v.clone()).ok());
        }
        _ => {
            // Stage 1 is short and deterministic: a run killed during it starts it again.
            if plan.stage1_steps > 0 {
                stage1 = Some(trainer.stage1(&mut model, surrogate)?);
                method::fold_input_scales_into_latent(&mut model);
            }
            stage2_structure(&mut model);
            if plan.stage1_steps > 0 && config.method.trains() {
                trainer.checkpoint(&model, None, plan.stage1_steps, &[], &[], stage1.as_ref())?;
            }
        }
    }

    let stage2_start = resume_step.map_or(0, |s| s.saturating_sub(plan.stage1_steps));
    let resume_stage2 = resume_state
        .as_ref()
        .filter(|_| resume_step.is_some_and(|s| s > plan.stage1_steps))
        .map(|(_, c)| c);
    let (phases, stage2_time) = if config.method.trains() {
        trainer.stage2(&mut model, stage2_start, resume_stage2, stage1.as_ref())?
    } else {
        (Vec::new(), Stage2Time::default())
    };
    let stage2_tokens =
        (plan.stage2_steps.saturating_sub(stage2_start) * plan.tokens_per_step) as f64;
    trainer.finish_checkpoint()?;

    // Final held-out evaluation: the last training form against the form that ships.
    let last_t = config.schedule.t(0.999_999, config.phases);
    let training_form = config.method.training_form(last_t);
    let final_form = config.method.final_form();
    let f_val = validation_loss(&mut model, &windows, &val, training_form, micro, bf16)?;
    let sign_val = validation_loss(&mut model, &windows, &val, final_form, micro, bf16)?;
    eprintln!(
        "held-out loss after: training form {f_val:.4}, shipped form {sign_val:.4} (gap {:+.4})",
        sign_val - f_val
    );

    let (sign_path, bits) = if config.method.is_one_bit() {
        let provenance = Provenance {
            method: config.method.name().into(),
            source_model: config.model.display().to_string(),
            details: serde_json::json!({
                "run": run_dir.display().to_string(),
                "tokens_trained": plan.stage2_tokens,
                "stage1_steps": plan.stage1_steps,
                "phases": config.phases,
                "val_loss_sign": sign_val,
            }),
        };
        let packed = crate::sign_model::to_sign_model(&model, final_form, &pretrained, provenance)?;
        let path = run_dir.join("sign-model.safetensors");
        packed.write(&path)?;
        (
            Some(path.display().to_string()),
            Some(packed.bits_per_weight()),
        )
    } else {
        (None, None)
    };

    let summary = Summary {
        method: config.method.name().into(),
        model: config.model.display().to_string(),
        device: crate::device::device_label(device),
        plan_stage2_steps: plan.stage2_steps,
        tokens_trained: plan.stage2_tokens + plan.stage1_steps * plan.tokens_per_step,
        stage1,
        phases,
        validation: FinalValidation {
            windows: val.len(),
            tokens: val.len() * config.seq_len,
            full_precision: fp_val,
            ptq: ptq_val,
            final_training_form: f_val,
            final_sign_form: sign_val,
            sign_gap: sign_val - f_val,
        },
        stage2_tokens_per_second: stage2_tokens / stage2_time.wall.max(1e-9),
        stage2_step_tokens_per_second: stage2_tokens / stage2_time.steps.max(1e-9),
        wall_seconds: started.elapsed().as_secs_f64(),
        peak_gpu_memory_bytes: match device {
            Device::Cuda(i) => shim::cuda_peak_bytes(i),
            _ => None,
        },
        sign_model: sign_path,
        bits_per_weight: bits,
    };
    write_summary(run_dir, &summary)?;
    if let Err(err) = write_plot(run_dir, &summary) {
        eprintln!("warning: could not draw training.png: {err:#}");
    }
    Ok(summary)
}

/// Creates the run directory (or checks it, with `resume`) and fixes the config in it.
fn prepare_run_dir(config: ConvertConfig, run_dir: &Path, resume: bool) -> Result<ConvertConfig> {
    let config_path = run_dir.join("config.toml");
    if resume {
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{}: cannot resume: no config.toml from an earlier run",
                run_dir.display()
            )
        })?;
        let stored: ConvertConfig = toml::from_str(&text)
            .with_context(|| format!("{}: corrupt run config", config_path.display()))?;
        if stored
            != (ConvertConfig {
                device: stored.device.clone(),
                ..config.clone()
            })
        {
            eprintln!("note: resuming with the settings stored in {} (command-line settings other than --device are ignored)", config_path.display());
        }
        return Ok(ConvertConfig {
            device: config.device,
            ..stored
        });
    }
    if checkpoint::latest_checkpoint(run_dir)?.is_some() {
        bail!("{}: holds an earlier run's checkpoints; pass --resume to continue it or choose another --out", run_dir.display());
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("{}: cannot create run directory", run_dir.display()))?;
    binllm_format::atomic::write_atomically(
        &config_path,
        toml::to_string_pretty(&config)?.as_bytes(),
    )?;
    // A fresh run starts a fresh metrics log.
    std::fs::remove_file(run_dir.join("metrics.jsonl")).ok();
    Ok(config)
}

fn load_windows(
    config: &ConvertConfig,
    model: &Llama,
    tokenizer: &TextTokenizer,
    run_dir: &Path,
) -> Result<(Windows, usize)> {
    let specs: Vec<DataSpec> = config
        .data
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    let mut tokens = Vec::new();
    let mut documents = 0;
    let mut files = Vec::new();
    for spec in &specs {
        match spec {
            DataSpec::Path(p) => files.extend(data::corpus_files(p)?),
            DataSpec::Teacher { tokens: n } => {
                // Sampled once and kept in the run, so a resumed run trains on the same text.
                let cache = run_dir.join("teacher-data.tok");
                let stream = match std::fs::read(&cache) {
                    Ok(bytes) if bytes.len() % 4 == 0 => bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    _ => {
                        let eos = *tokenizer
                            .eos_ids
                            .first()
                            .context("the tokenizer has no EOS token")?;
                        let sampled = crate::teacher::sample_tokens(
                            model,
                            *n,
                            config.seq_len,
                            64,
                            eos,
                            config.seed as i64,
                        )?;
                        let bytes: Vec<u8> = sampled.iter().flat_map(|t| t.to_le_bytes()).collect();
                        binllm_format::atomic::write_atomically(&cache, &bytes)?;
                        sampled
                    }
                };
                documents += stream.len() / (config.seq_len + 1);
                tokens.extend(stream);
            }
        }
    }
    if !files.is_empty() {
        let stream = data::tokenize_corpus(&files, tokenizer, Some(&config.cache_dir()))?;
        documents += stream.documents;
        tokens.extend(stream.tokens);
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
        bail!("the tokenizer produced token id {bad}, beyond the model's vocabulary of {vocab}: tokenizer and model do not match");
    }
    Ok((
        Windows::new(tokens, config.seq_len, config.val_windows, config.seed)?,
        documents,
    ))
}

fn print_plan(config: &ConvertConfig, plan: &Plan, model: &PretrainedModel, device: Device) {
    eprintln!(
        "binllm convert: {} on {} ({} layers, hidden {}) on {}",
        config.method.name(),
        config.model.display(),
        model.config.num_layers,
        model.config.hidden_size,
        crate::device::device_label(device)
    );
    eprintln!(
        "  corpus {} tokens in {} documents; {} training windows of {}",
        plan.corpus_tokens, plan.corpus_documents, plan.training_windows, config.seq_len
    );
    eprintln!(
        "  Stage 1: {} steps; Stage 2: {} steps = {} phases x {}, {} tokens/step ({} x {} micro-batches), {} tokens",
        plan.stage1_steps,
        plan.stage2_steps,
        config.phases,
        plan.steps_per_phase,
        plan.tokens_per_step,
        plan.accumulation,
        plan.micro_batch,
        plan.stage2_tokens
    );
    if plan.epochs > 1.0 {
        eprintln!(
            "  warning: the budget needs {:.2} passes over the training windows: data repeats",
            plan.epochs
        );
    }
}

/// Copies every parameter's value from a checkpoint (the structure must already match).
fn load_params(model: &Llama, ckpt: &Checkpoint, path: &Path) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for p in model.params() {
            let src = ckpt.tensors.get(&p.name).with_context(|| {
                format!(
                    "{}: checkpoint lacks parameter '{}' (a different method or model?)",
                    path.display(),
                    p.name
                )
            })?;
            ensure!(
                src.size() == p.tensor.size(),
                "{}: parameter '{}' has shape {:?} in the checkpoint, {:?} in the model",
                path.display(),
                p.name,
                src.size(),
                p.tensor.size()
            );
            let mut dst = p.tensor.shallow_clone();
            dst.copy_(&src.to_device(dst.device()));
        }
        Ok(())
    })
}

/// Appends one JSON object per line to `RUN/metrics.jsonl`.
struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    fn write(&mut self, record: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}")
            .with_context(|| format!("{}: write failed", self.path.display()))
    }

    /// Drops records past `step` (a resumed run writes them again).
    fn truncate_after(&mut self, step: usize) -> Result<()> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["global_step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        binllm_format::atomic::write_atomically(&self.path, kept.as_bytes())?;
        *self = MetricsLog::open(self.path.parent().expect("metrics file has a directory"))?;
        Ok(())
    }
}

struct StepResult {
    loss: f64,
    grad_norm: f64,
}

struct Trainer<'a> {
    config: &'a ConvertConfig,
    plan: &'a Plan,
    windows: &'a Windows,
    run_dir: &'a Path,
    bf16: bool,
    teacher: Option<Llama>,
    metrics: MetricsLog,
    pending_checkpoint: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Trainer<'_> {
    /// One optimizer step at global step `step`: forward/backward over the micro-batches,
    /// a NaN/inf check, clipping, AdamW.
    fn train_step(
        &mut self,
        model: &Llama,
        optimizer: &mut AdamW,
        step: usize,
        lr: f64,
    ) -> Result<StepResult> {
        let loss_config = self.config.loss();
        let mut total = Tensor::zeros([], (Kind::Float, model.device()));
        for m in 0..self.plan.accumulation {
            let starts = self.plan.micro_batch_windows(self.windows, step, m);
            let (x, y) = self.windows.batch(&starts, model.device());
            let loss = shim::with_autocast_bf16(self.bf16, || {
                let teacher_logits = self
                    .teacher
                    .as_ref()
                    .map(|t| tch::no_grad(|| t.forward(&x, None)));
                let logits = model.forward(&x, None);
                loss::training_loss(&loss_config, &logits, &y, teacher_logits.as_ref())
            });
            (&loss / self.plan.accumulation as f64).backward();
            total += loss.detach();
        }
        let loss = total.double_value(&[]) / self.plan.accumulation as f64;
        let grad_norm = optimizer.grad_norm().double_value(&[]);
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.finish_checkpoint()?;
            let last = checkpoint::latest_checkpoint(self.run_dir)?;
            bail!(
                "non-finite training signal at step {} (loss {loss}, gradient norm {grad_norm}): stopping. {} Lower --lr and resume with --resume.",
                step + 1,
                match last {
                    Some(p) => format!("The last good checkpoint is {}.", p.display()),
                    None => "No checkpoint was written yet.".to_string(),
                }
            );
        }
        optimizer.clip_gradients(grad_norm, self.config.grad_clip);
        optimizer.step(lr)?;
        Ok(StepResult { loss, grad_norm })
    }

    fn stage1(
        &mut self,
        model: &mut Llama,
        surrogate: crate::linear::Stage1Surrogate,
    ) -> Result<Stage1Report> {
        let steps = self.plan.stage1_steps;
        let form = WeightForm::Stage1 { surrogate };
        let micro = self.plan.micro_batch;
        let val = self.windows.validation.clone();
        let errors = |model: &Llama| -> Vec<f64> {
            method::reconstruction_errors(model, surrogate)
                .iter()
                .map(|l| l.iter().sum::<f64>() / l.len() as f64)
                .collect()
        };
        let reconstruction_error_before = errors(model);
        let val_loss_before = validation_loss(model, self.windows, &val, form, micro, self.bf16)?;
        method::set_trainable(model, method::stage1_trainable);
        let trainable: Vec<_> = model
            .params()
            .into_iter()
            .filter(|p| p.tensor.requires_grad())
            .collect();
        let mut optimizer = AdamW::new(
            &trainable,
            AdamWConfig {
                betas: (self.config.beta1, self.config.beta2),
                eps: 1e-8,
                weight_decay: 0.0,
            },
        );
        let mut initial_loss = f64::NAN;
        model.form = form;
        let progress = crate::progress::bar(steps as u64, "Stage 1");
        let mut last_loss = f64::NAN;
        for step in 0..steps {
            let result = self.train_step(model, &mut optimizer, step, self.config.stage1_lr)?;
            if step == 0 {
                initial_loss = result.loss;
            }
            last_loss = result.loss;
            self.metrics.write(serde_json::json!({"stage": 1, "global_step": step + 1, "loss": result.loss, "grad_norm": result.grad_norm, "lr": self.config.stage1_lr}))?;
            progress.set_message(format!("Stage 1 loss {:.4}", result.loss));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let report = Stage1Report {
            steps,
            initial_loss,
            final_loss: last_loss,
            val_loss_before,
            val_loss_after: validation_loss(model, self.windows, &val, form, micro, self.bf16)?,
            reconstruction_error_before,
            reconstruction_error_after: errors(model),
        };
        method::set_trainable(model, |_| false);
        eprintln!(
            "Stage 1: loss {:.4} -> {:.4}; held-out {:.4} -> {:.4}; mean reconstruction error {:.4} -> {:.4}",
            report.initial_loss,
            report.final_loss,
            report.val_loss_before,
            report.val_loss_after,
            mean(&report.reconstruction_error_before),
            mean(&report.reconstruction_error_after)
        );
        Ok(report)
    }

    fn stage2(
        &mut self,
        model: &mut Llama,
        start: usize,
        resume: Option<&Checkpoint>,
        stage1: Option<&Stage1Report>,
    ) -> Result<(Vec<PhaseReport>, Stage2Time)> {
        let plan = self.plan;
        let config = self.config;
        method::set_trainable(model, |_| true);
        let trainable: Vec<_> = model
            .params()
            .into_iter()
            .filter(|p| p.tensor.requires_grad())
            .collect();
        let mut optimizer = AdamW::new(
            &trainable,
            AdamWConfig {
                betas: (config.beta1, config.beta2),
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
        );
        if let Some(ckpt) = resume {
            optimizer.load_state(&ckpt.tensors)?;
        }
        let mut phases: Vec<PhaseReport> = resume
            .and_then(|c| c.meta.get("phases"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        if let Device::Cuda(i) = model.device() {
            shim::cuda_reset_peak(i);
        }
        let progress = crate::progress::bar(plan.stage2_steps as u64, "Stage 2");
        progress.set_position(start as u64);
        let timer = Instant::now();
        // Time in optimizer steps alone (the loss read back synchronises the device), apart
        // from the phase-end validation and checkpoints that the wall-clock rate includes.
        let mut step_seconds = 0.0;
        // Losses of the phase in progress: a resumed run continues the same average.
        let mut phase_losses: Vec<f64> = resume
            .and_then(|c| c.meta.get("phase_losses"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        for k in start..plan.stage2_steps {
            let phase = plan.phase_of(k);
            let t = config
                .schedule
                .t(k as f64 / plan.stage2_steps as f64, config.phases);
            model.form = config.method.training_form(t);
            let lr = learning_rate(
                k,
                plan.stage2_steps,
                config.warmup_steps,
                config.lr,
                config.min_lr,
            );
            let global = plan.stage1_steps + k;
            let step_started = Instant::now();
            let result = self.train_step(model, &mut optimizer, global, lr)?;
            step_seconds += step_started.elapsed().as_secs_f64();
            phase_losses.push(result.loss);
            let done = k + 1 - start;
            let tokens_per_second =
                (done * plan.tokens_per_step) as f64 / timer.elapsed().as_secs_f64().max(1e-9);
            self.metrics.write(serde_json::json!({
                "stage": 2, "global_step": global + 1, "step": k + 1, "phase": phase, "t": t, "lr": lr,
                "loss": result.loss, "grad_norm": result.grad_norm, "tokens": (k + 1) * plan.tokens_per_step,
                "tokens_per_second": tokens_per_second,
            }))?;
            progress.set_message(format!(
                "phase {phase}/{} t={t:.2} loss {:.4} {:.1}k tok/s",
                config.phases,
                result.loss,
                tokens_per_second / 1e3
            ));
            progress.inc(1);

            let phase_end = (k + 1) % plan.steps_per_phase == 0;
            if phase_end {
                let micro = plan.micro_batch;
                let val = &self.windows.validation;
                let val_loss =
                    validation_loss(model, self.windows, val, model.form, micro, self.bf16)?;
                let val_loss_sign = if config.method.is_one_bit() {
                    Some(validation_loss(
                        model,
                        self.windows,
                        val,
                        config.method.final_form(),
                        micro,
                        self.bf16,
                    )?)
                } else {
                    None
                };
                let report = PhaseReport {
                    phase,
                    t,
                    end_step: k + 1,
                    train_loss: mean(&phase_losses),
                    val_loss,
                    val_loss_sign,
                };
                phase_losses.clear();
                self.metrics.write(serde_json::json!({"event": "phase_end", "global_step": global + 1, "report": report}))?;
                crate::progress::println(
                    &progress,
                    format!(
                        "phase {phase:>2}/{}  t {t:>7.2}  train {:.4}  held-out {:.4}{}",
                        config.phases,
                        report.train_loss,
                        val_loss,
                        val_loss_sign.map_or(String::new(), |s| format!("  sign {s:.4}"))
                    ),
                );
                phases.push(report);
            }
            if phase_end || (config.checkpoint_every > 0 && (k + 1) % config.checkpoint_every == 0)
            {
                self.checkpoint(
                    model,
                    Some(&optimizer),
                    global + 1,
                    &phases,
                    &phase_losses,
                    stage1,
                )?;
            }
        }
        progress.finish_and_clear();
        Ok((
            phases,
            Stage2Time {
                wall: timer.elapsed().as_secs_f64(),
                steps: step_seconds,
            },
        ))
    }

    /// Starts writing a checkpoint in the background (tensors are copied to the CPU first,
    /// so training continues while the file is written); at most one write is in flight.
    /// Without an optimizer (the Stage-1 boundary) Stage 2 starts its optimizer afresh.
    fn checkpoint(
        &mut self,
        model: &Llama,
        optimizer: Option<&AdamW>,
        step: usize,
        phases: &[PhaseReport],
        phase_losses: &[f64],
        stage1: Option<&Stage1Report>,
    ) -> Result<()> {
        self.finish_checkpoint()?;
        let mut tensors = optimizer.map(AdamW::state_tensors).unwrap_or_default();
        for p in model.params() {
            tensors.insert(p.name.clone(), p.tensor.detach());
        }
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| (k, t.to_device(Device::Cpu).copy()))
            .collect();
        let ckpt = Checkpoint {
            tensors,
            meta: serde_json::json!({"step": step, "phases": phases, "phase_losses": phase_losses, "stage1": stage1}),
        };
        let path = checkpoint::checkpoint_path(self.run_dir, step);
        let run_dir = self.run_dir.to_path_buf();
        let keep = self.config.keep_checkpoints.max(1);
        self.pending_checkpoint = Some(std::thread::spawn(move || {
            ckpt.save(&path)?;
            checkpoint::prune_checkpoints(&run_dir, keep, &[])
        }));
        Ok(())
    }

    fn finish_checkpoint(&mut self) -> Result<()> {
        if let Some(handle) = self.pending_checkpoint.take() {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("the checkpoint writer panicked"))??;
        }
        Ok(())
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn write_summary(run_dir: &Path, summary: &Summary) -> Result<()> {
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
    binllm_format::atomic::write_atomically(&run_dir.join("summary.md"), md.as_bytes())
}

fn write_plot(run_dir: &Path, summary: &Summary) -> Result<()> {
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
