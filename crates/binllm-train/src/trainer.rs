//! The training loop of a conversion: one optimizer step over its micro-batches, Stage 1
//! (the input scales alone), Stage 2 (every parameter through the phases), the metrics log
//! and background checkpoints. On several GPUs each rank trains on its shard of every step
//! and the gradients are summed over the ranks before clipping and AdamW ([`crate::parallel`]);
//! one rank ([`Single`](crate::parallel::Single)) takes the same path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint};
use crate::config::ConvertConfig;
use crate::data::Windows;
use crate::linear::WeightForm;
use crate::loss;
use crate::method;
use crate::model::Llama;
use crate::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::parallel::buckets::{GradientBuckets, DEFAULT_BUCKET_BYTES};
use crate::parallel::{Collective, Shard};
use crate::plan::Plan;
use crate::profile::SectionTimer;
use crate::schedule::stage2_learning_rate;
use crate::shim;
use crate::summary::{PhaseReport, Stage1Report, Stage2Time};

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

/// Appends one JSON object per line to `RUN/metrics.jsonl` (rank 0 only: the other ranks'
/// log discards its records).
pub(crate) struct MetricsLog {
    sink: Option<(PathBuf, std::fs::File)>,
}

impl MetricsLog {
    pub(crate) fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog {
            sink: Some((path, file)),
        })
    }

    /// A log that writes nothing (ranks other than 0).
    pub(crate) fn discard() -> Self {
        MetricsLog { sink: None }
    }

    pub(crate) fn write(&mut self, record: serde_json::Value) -> Result<()> {
        let Some((path, file)) = &mut self.sink else {
            return Ok(());
        };
        writeln!(file, "{record}").with_context(|| format!("{}: write failed", path.display()))
    }

    /// Drops records past `step` (a resumed run writes them again).
    pub(crate) fn truncate_after(&mut self, step: usize) -> Result<()> {
        let Some((path, _)) = &self.sink else {
            return Ok(());
        };
        let path = path.clone();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
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
        binllm_format::atomic::write_atomically(&path, kept.as_bytes())?;
        *self = MetricsLog::open(path.parent().context("metrics file has no directory")?)?;
        Ok(())
    }
}

struct StepResult {
    loss: f64,
    grad_norm: f64,
}

pub(crate) struct Trainer<'a> {
    pub config: &'a ConvertConfig,
    pub plan: &'a Plan,
    pub windows: &'a Windows,
    pub run_dir: &'a Path,
    pub bf16: bool,
    pub teacher: Option<Llama>,
    pub metrics: MetricsLog,
    /// The ranks of the run ([`Single`](crate::parallel::Single) on one device).
    pub collective: &'a dyn Collective,
    pub pending_checkpoint: Option<std::thread::JoinHandle<Result<()>>>,
    /// Milliseconds per step of each section, from `--profile`.
    pub profile: Option<Vec<(String, f64)>>,
    /// Wall-clock seconds of the run's earlier segments (a resumed run continues the sum).
    pub wall_before: f64,
    /// When this segment started.
    pub started: Instant,
}

impl Trainer<'_> {
    /// A progress bar on rank 0; nothing on the other ranks, which train in step with it.
    fn progress(&self, len: usize, task: &str) -> binllm_progress::Progress {
        if self.collective.is_writer() {
            binllm_progress::Progress::new(len as u64, task)
        } else {
            binllm_progress::Progress::hidden()
        }
    }

    /// A report line, from rank 0 alone.
    fn say(&self, line: String) {
        if self.collective.is_writer() {
            eprintln!("{line}");
        }
    }

    /// A report line above the progress bar, from rank 0 alone.
    fn say_above(&self, progress: &binllm_progress::Progress, line: String) {
        if self.collective.is_writer() {
            progress.println(line);
        }
    }

    /// Wall-clock seconds of the whole run so far, every resumed segment included.
    pub(crate) fn wall_seconds(&self) -> f64 {
        self.wall_before + self.started.elapsed().as_secs_f64()
    }
}

impl Trainer<'_> {
    /// One optimizer step at global step `step`: forward/backward over this rank's
    /// micro-batches, the gradients summed over the ranks, a NaN/inf check, clipping, AdamW.
    fn train_step(
        &mut self,
        model: &Llama,
        optimizer: &mut AdamW,
        buckets: &GradientBuckets,
        step: usize,
        lr: f64,
    ) -> Result<StepResult> {
        let loss_config = self.config.loss();
        let mut total = Tensor::zeros([], (Kind::Float, model.device()));
        let micro_batches =
            self.plan
                .rank_micro_batches(self.windows, step, Shard::of(self.collective));
        for starts in &micro_batches {
            let (x, y) = self.windows.batch(starts, model.device());
            if let Some(timer) = &model.timer {
                timer.mark("batch to device");
            }
            // Each micro-batch's mean loss counts by its share of the whole step's windows
            // (over every rank), so the ranks' gradients sum to the step's gradient. On one
            // rank this is micro_batch / windows_per_step = 1 / accumulation exactly.
            let scale = starts.len() as f64 / self.plan.windows_per_step as f64;
            let chunk = self.config.loss_chunk_tokens as i64;
            let mark = |section| {
                if let Some(timer) = &model.timer {
                    timer.mark(section);
                }
            };
            let loss = shim::with_autocast_bf16(self.bf16, || {
                let teacher_hidden = self
                    .teacher
                    .as_ref()
                    .map(|t| (tch::no_grad(|| t.forward_hidden(&x, None)), t));
                if teacher_hidden.is_some() {
                    mark("teacher forward");
                }
                let hidden = model.forward_hidden(&x, None);
                let hidden_term = teacher_hidden
                    .as_ref()
                    .filter(|_| loss_config.hidden_weight > 0.0)
                    .map(|(th, _)| {
                        loss::hidden_state_loss(&hidden, th) * loss_config.hidden_weight
                    });
                if chunk > 0 {
                    let teacher = teacher_hidden.as_ref().map(|(h, t)| (h, t.head()));
                    let (loss, hidden_grad) = loss::head_and_loss_backward(
                        &loss_config,
                        &hidden,
                        model.head(),
                        &y,
                        teacher,
                        chunk,
                        scale,
                    );
                    mark("head + loss, forward and backward (chunked)");
                    let extra = hidden_term.as_ref().map(|term| term * scale);
                    loss::backward_from(&hidden, &hidden_grad, extra.as_ref());
                    mark("backward");
                    return match hidden_term {
                        Some(term) => loss + term.detach(),
                        None => loss,
                    };
                }
                let logits = model.logits(&hidden);
                let teacher_logits = teacher_hidden
                    .as_ref()
                    .map(|(h, t)| tch::no_grad(|| t.logits(h)));
                mark("head");
                let loss = loss::training_loss(&loss_config, &logits, &y, teacher_logits.as_ref());
                let loss = match hidden_term {
                    Some(term) => loss + term,
                    None => loss,
                };
                mark("loss");
                (&loss * scale).backward();
                mark("backward");
                loss
            });
            // In units of full micro-batches, so that the sum over ranks divided by the
            // accumulation count is the step's mean loss (a full micro-batch counts 1).
            if starts.len() == self.plan.micro_batch {
                total += loss.detach();
            } else {
                total += loss.detach() * (starts.len() as f64 / self.plan.micro_batch as f64);
            }
        }
        buckets.all_reduce_sum(self.collective)?;
        let loss = self
            .collective
            .all_reduce_sum_f64(total.double_value(&[]), model.device())?
            / self.plan.accumulation as f64;
        if self.collective.world_size() > 1 {
            if let Some(timer) = &model.timer {
                timer.mark("gradient all-reduce");
            }
        }
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
        if let Some(timer) = &model.timer {
            timer.mark("gradient norm, clipping, AdamW");
        }
        Ok(StepResult { loss, grad_norm })
    }

    pub(crate) fn stage1(
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
        broadcast_parameters(self.collective, &trainable)?;
        let buckets = GradientBuckets::plan(&trainable, DEFAULT_BUCKET_BYTES);
        let mut initial_loss = f64::NAN;
        model.form = form;
        let progress = self.progress(steps, "Stage 1");
        let mut last_loss = f64::NAN;
        for step in 0..steps {
            let result =
                self.train_step(model, &mut optimizer, &buckets, step, self.config.stage1_lr)?;
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
        self.say(format!(
            "Stage 1: loss {:.4} -> {:.4}; held-out {:.4} -> {:.4}; mean reconstruction error {:.4} -> {:.4}",
            report.initial_loss,
            report.final_loss,
            report.val_loss_before,
            report.val_loss_after,
            mean(&report.reconstruction_error_before),
            mean(&report.reconstruction_error_after)
        ));
        Ok(report)
    }

    pub(crate) fn stage2(
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
        let mut optimizer = AdamW::with_groups(
            &trainable,
            AdamWConfig {
                betas: (config.beta1, config.beta2),
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
            |name, tensor| stage2_group(config, name, tensor),
        );
        if let Some(ckpt) = resume {
            optimizer.load_state(&ckpt.tensors)?;
        }
        broadcast_parameters(self.collective, &trainable)?;
        let buckets = GradientBuckets::plan(&trainable, DEFAULT_BUCKET_BYTES);
        let mut phases: Vec<PhaseReport> = resume
            .and_then(|c| c.meta.get("phases"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        if let Device::Cuda(i) = model.device() {
            shim::cuda_reset_peak(i);
        }
        let progress = self.progress(plan.stage2_steps, "Stage 2");
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
            let t = config.t_at(k as f64 / plan.stage2_steps as f64);
            model.form = if plan.trains_sign_form(k) {
                WeightForm::Ste
            } else {
                config.method.training_form(t)
            };
            let lr = stage2_learning_rate(config, k, plan.stage2_steps, plan.sign_steps);
            let global = plan.stage1_steps + k;
            // Profiled steps come after two warm-up steps (allocator, kernel selection).
            let profiled = (start + 2..start + 2 + config.profile_steps).contains(&k);
            if profiled {
                let device = model.device();
                let timer = model
                    .timer
                    .get_or_insert_with(|| std::rc::Rc::new(SectionTimer::new(device)));
                timer.start_step();
            }
            let step_started = Instant::now();
            let result = self.train_step(model, &mut optimizer, &buckets, global, lr)?;
            step_seconds += step_started.elapsed().as_secs_f64();
            if profiled && k + 1 == start + 2 + config.profile_steps {
                let timer = model.timer.take().expect("set for the profiled steps");
                let sections = timer.milliseconds_per_step();
                self.metrics.write(serde_json::json!({
                    "event": "profile", "global_step": global + 1, "steps": config.profile_steps,
                    "ms_per_step": sections.iter().map(|(name, ms)| (name.clone(), serde_json::json!(ms))).collect::<serde_json::Map<String, serde_json::Value>>(),
                }))?;
                self.say_above(
                    &progress,
                    format!(
                        "profile of {} Stage-2 steps (device synchronised at each boundary):\n{}",
                        config.profile_steps,
                        crate::profile::render(&sections)
                    ),
                );
                self.profile = Some(sections);
            }
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
                self.say_above(
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
    pub(crate) fn checkpoint(
        &mut self,
        model: &Llama,
        optimizer: Option<&AdamW>,
        step: usize,
        phases: &[PhaseReport],
        phase_losses: &[f64],
        stage1: Option<&Stage1Report>,
    ) -> Result<()> {
        if !self.collective.is_writer() {
            // Every rank holds the same parameters and optimizer state: rank 0 saves them.
            return Ok(());
        }
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
            meta: serde_json::json!({"step": step, "phases": phases, "phase_losses": phase_losses, "stage1": stage1, "wall_seconds": self.wall_seconds()}),
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

    pub(crate) fn finish_checkpoint(&mut self) -> Result<()> {
        if let Some(handle) = self.pending_checkpoint.take() {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("the checkpoint writer panicked"))??;
        }
        Ok(())
    }
}

/// Gives every rank rank 0's values of `params`, so the ranks start a stage from the same
/// weights even if their loading differed in the last bit (a no-op on one rank).
fn broadcast_parameters(
    collective: &dyn Collective,
    params: &[&crate::linear::Param],
) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    for p in params {
        let mut t = p.tensor.shallow_clone();
        collective
            .broadcast_from_root(&mut t)
            .with_context(|| format!("broadcasting parameter '{}'", p.name))?;
    }
    Ok(())
}

/// The Stage-2 optimizer group of a parameter: latent block weights at the base rate
/// (decayed unless `decay_latent` is off), scale vectors at `scale_lr_mult`, everything else
/// (embeddings, head, norms, biases) at `embed_lr_mult`, decayed when it is a matrix.
pub(crate) fn stage2_group(config: &ConvertConfig, name: &str, tensor: &Tensor) -> ParamGroup {
    let matrix = tensor.dim() >= 2 && tensor.size().iter().all(|&d| d > 1);
    if method::is_scale_vector(name) {
        ParamGroup {
            lr_mult: config.scale_lr_mult,
            decay: false,
        }
    } else if method::is_latent_weight(name) {
        ParamGroup {
            lr_mult: 1.0,
            decay: config.decay_latent,
        }
    } else {
        ParamGroup {
            lr_mult: config.embed_lr_mult,
            decay: matrix,
        }
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}
