//! `binllm convert`: a pretrained model and a corpus in, a 1-bit model out.
//!
//! The run, in order (METHOD.md): Stage 1 trains only the per-input-channel scales `s`
//! against the binarized forward; the latent weights become `W / s*`; Stage 2 trains every
//! parameter through `P` phases, phase `c` on its own data chunk at temperature `t(c)`;
//! finally the F-form and the sign form are evaluated on held-out windows and the sign form
//! is saved as a packed sign model.
//!
//! With `--chat-tokens`, the teacher first answers prompts drawn from the corpus in its own
//! chat template (`chat_data`), and those transcripts are mixed into training; at the end
//! the shipped form's chat score is measured beside the teacher's (`chat_score`).
//!
//! A run directory holds everything: `config.toml` (the resolved settings), `metrics.jsonl`,
//! `checkpoints/`, `training.png`, `summary.json` / `summary.md`, `sign-model.safetensors`,
//! `teacher-chat.tok` / `teacher-chat.json` (the chat data) and `chat-reference.json`.
//! Checkpoints are written atomically at every phase end (and every N steps); `--resume`
//! continues from the newest with the same data order, schedule and optimizer state.
//!
//! On several GPUs ([`run_rank`]) every rank runs this same sequence on its shard of each
//! step; rank 0 alone writes into the run directory (the other ranks wait for its data
//! files, then read them) and finishes the run after training (`docs/MULTI_GPU.md`).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use binllm_format::packed::Provenance;
use binllm_format::{LoadOptions, PretrainedModel, TextTokenizer};
use tch::{Device, Kind};

use crate::chat_data::{self, ChatDataReport, ChatSampling};
use crate::chat_score;
use crate::checkpoint::{self, Checkpoint};
use crate::data::{self, DataSpec, Windows};
use crate::linear::WeightForm;
use crate::method;
use crate::model::Llama;
use crate::parallel::{Collective, Single};
use crate::plan::Plan;
use crate::shim;
use crate::summary::{self, ChatComparison, FinalValidation, Stage2Time, Summary};
use crate::trainer::{validation_loss, MetricsLog, Trainer};

pub use crate::config::{ConvertConfig, Preset};

/// Runs a conversion in `run_dir` (created; with `resume`, continued) on one device.
pub fn run(config: ConvertConfig, run_dir: &Path, resume: bool) -> Result<Summary> {
    run_rank(config, run_dir, resume, &Single)?
        .context("the only rank of a single-device run returned no summary")
}

/// One rank of a conversion over the ranks of `collective`: the summary on rank 0, None on
/// the others (they stop once training is done; rank 0 evaluates and writes the model).
pub fn run_rank(
    config: ConvertConfig,
    run_dir: &Path,
    resume: bool,
    collective: &dyn Collective,
) -> Result<Option<Summary>> {
    let started = Instant::now();
    let writer = collective.is_writer();
    // Rank 0 creates (or checks) the run directory; the others only read a resumed run's
    // stored settings.
    let config = if writer || resume {
        prepare_run_dir(config, run_dir, resume)?
    } else {
        config
    };
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
    // Rank 0 writes the data files (teacher samples, chat transcripts) that the other ranks
    // then read: they wait here until it has.
    if !writer {
        collective.barrier().context("waiting for rank 0's data")?;
    }
    let (mut windows, documents) = load_windows(&config, &model, tokenizer, run_dir, writer)?;

    let teacher = if config.loss().needs_teacher() {
        let mut t = Llama::from_pretrained(&pretrained, device, Kind::Float)?;
        if bf16 {
            t.to_kind(Kind::BFloat16);
        }
        Some(t)
    } else {
        None
    };
    let chat_data = if config.chat_tokens > 0 {
        let generator = teacher.as_ref().unwrap_or(&model);
        let (tokens, report) =
            chat_transcripts(&config, &pretrained, generator, bf16, run_dir, writer)?;
        windows.add_chat(&tokens, config.chat_share, config.seed)?;
        Some(report)
    } else {
        None
    };
    if writer {
        collective
            .barrier()
            .context("waiting for the other ranks")?;
    }
    let plan = Plan::new(&config, &windows, documents)?;
    plan.check_world_size(collective.world_size())?;
    if writer {
        print_plan(&config, &plan, &pretrained, device);
        if collective.world_size() > 1 {
            eprintln!(
                "  data parallel over {} GPUs: each trains on about {} of the {} windows of a step",
                collective.world_size(),
                plan.windows_per_step.div_ceil(collective.world_size()),
                plan.windows_per_step
            );
        }
        std::fs::write(
            run_dir.join("plan.json"),
            serde_json::to_string_pretty(&plan)?,
        )?;
        if !resume {
            start_run(&config, run_dir)?;
        }
    }
    let val = windows.validation.clone();
    let micro = plan.micro_batch;
    let fp_val = validation_loss(&mut model, &windows, &val, WeightForm::Full, micro, bf16)?;
    let ptq_val = validation_loss(&mut model, &windows, &val, WeightForm::Sign, micro, bf16)?;
    if writer {
        eprintln!("held-out loss before conversion: full precision {fp_val:.4}, PTQ sign {ptq_val:.4} ({} windows)", val.len());
    }

    let mut trainer = Trainer {
        config: &config,
        plan: &plan,
        windows: &windows,
        run_dir,
        bf16,
        teacher,
        metrics: if writer {
            MetricsLog::open(run_dir)?
        } else {
            MetricsLog::discard()
        },
        collective,
        pending_checkpoint: None,
        profile: None,
        wall_before: 0.0,
        started,
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
    match (&resume_state, resume_step) {
        (Some((path, ckpt)), Some(step)) => {
            trainer.metrics.truncate_after(step)?;
            trainer.wall_before = ckpt.meta["wall_seconds"].as_f64().unwrap_or(0.0);
            if writer {
                eprintln!("resuming from step {step} ({})", path.display());
            }
        }
        _ if resume => {
            // Stopped before the first checkpoint (the end of Stage 1): start over, and
            // drop the log lines of the stopped attempt so none appears twice.
            trainer.metrics.truncate_after(0)?;
            if writer {
                eprintln!(
                "{}: no checkpoint yet (the run stopped before the end of Stage 1): starting again from step 1",
                    run_dir.display()
                );
            }
        }
        _ => {}
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
    if !writer {
        return Ok(None);
    }

    // Final held-out evaluation: the last training form against the form that ships.
    let training_form = if plan.sign_steps > 0 {
        WeightForm::Ste
    } else {
        config.method.training_form(config.t_at(0.999_999))
    };
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

    let chat = if config.method.trains() && config.chat_eval_prompts > 0 {
        shipped_chat_score(&config, &pretrained, &mut model, final_form, run_dir)?
    } else {
        None
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
        wall_seconds: trainer.wall_seconds(),
        peak_gpu_memory_bytes: match device {
            Device::Cuda(i) => shim::cuda_peak_bytes(i),
            _ => None,
        },
        sign_model: sign_path,
        bits_per_weight: bits,
        chat_data,
        chat,
        profile: trainer.profile.clone(),
    };
    summary::write_summary(run_dir, &summary)?;
    if !config.keep_final_checkpoints {
        let checkpoints = run_dir.join("checkpoints");
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints).with_context(|| {
                format!(
                    "{}: cannot delete the finished run's checkpoints",
                    checkpoints.display()
                )
            })?;
        }
    }
    if let Err(err) = summary::write_plot(run_dir, &summary) {
        eprintln!("warning: could not draw training.png: {err:#}");
    }
    Ok(Some(summary))
}

/// The teacher's chat transcripts: read back from the run (a resumed run trains on the same
/// ones) or generated from the corpus documents and kept there.
fn chat_transcripts(
    config: &ConvertConfig,
    pretrained: &PretrainedModel,
    teacher: &Llama,
    bf16: bool,
    run_dir: &Path,
    writer: bool,
) -> Result<(Vec<u32>, ChatDataReport)> {
    let tokens_path = run_dir.join("teacher-chat.tok");
    let report_path = run_dir.join("teacher-chat.json");
    if let (Ok(bytes), Ok(text)) = (
        std::fs::read(&tokens_path),
        std::fs::read_to_string(&report_path),
    ) {
        if let Ok(report) = serde_json::from_str::<ChatDataReport>(&text) {
            let same_request = report.requested_tokens == config.chat_tokens
                && report.seed == config.seed
                && report.teacher == pretrained.path.display().to_string();
            if same_request && bytes.len() == 4 * report.tokens {
                eprintln!(
                    "teacher chat data: {} tokens from {}",
                    report.tokens,
                    tokens_path.display()
                );
                return Ok((data::tokens_from_le_bytes(&bytes), report));
            }
        }
    }
    ensure!(
        writer,
        "{}: rank 0 wrote no chat data matching this run for this rank to read",
        tokens_path.display()
    );
    ensure!(
        pretrained.chat_template.is_some(),
        "{}: --chat-tokens needs a model with a chat template, and this one has none",
        config.model.display()
    );
    let mut documents = Vec::new();
    for spec in &config.data {
        if let DataSpec::Path(p) = spec.parse()? {
            for file in data::corpus_files(&p)? {
                documents.extend(data::read_documents(&file)?);
            }
        }
    }
    // The last documents hold the held-out validation windows: no prompt quotes them.
    let usable = documents.len() - documents.len() / 20;
    documents.truncate(usable.max(1));
    let started = Instant::now();
    let (tokens, report) = shim::with_autocast_bf16(bf16, || {
        chat_data::generate_chat_data(
            teacher,
            pretrained,
            &documents,
            config.chat_tokens,
            ChatSampling {
                batch: config.chat_batch,
                ..ChatSampling::default()
            },
            config.seed,
        )
    })?;
    eprintln!(
        "teacher chat data: {} tokens in {} transcripts ({} unended and {} looping answers dropped) in {:.1} s",
        report.tokens,
        report.transcripts,
        report.dropped_unended,
        report.dropped_loops,
        started.elapsed().as_secs_f64()
    );
    binllm_format::atomic::write_atomically(&tokens_path, &data::tokens_to_le_bytes(&tokens))?;
    binllm_format::atomic::write_atomically(
        &report_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok((tokens, report))
}

/// The shipped form's chat score beside the teacher's, on the held-out prompts; the
/// prompts and the teacher's answers are kept as `RUN/chat-reference.json`. None (with a
/// note) for a model without a chat template.
fn shipped_chat_score(
    config: &ConvertConfig,
    pretrained: &PretrainedModel,
    model: &mut Llama,
    shipped: WeightForm,
    run_dir: &Path,
) -> Result<Option<ChatComparison>> {
    if pretrained.chat_template.is_none() {
        eprintln!("note: the model has no chat template: no chat score");
        return Ok(None);
    }
    // The reference is the teacher in f32: the distillation teacher is a bf16 copy, whose
    // greedy answers loop more often (measured 2026-12-03: 21% of 48).
    let teacher = Llama::from_pretrained(pretrained, model.device(), Kind::Float)?;
    let started = Instant::now();
    let reference = chat_score::build_reference(
        &teacher,
        pretrained,
        &config.model.display().to_string(),
        config.chat_eval_prompts,
    )?;
    let teacher_score = chat_score::score(&teacher, &reference, pretrained.tokenizer()?)?;
    let saved = model.form;
    model.form = shipped;
    let student = chat_score::score(model, &reference, pretrained.tokenizer()?);
    model.form = saved;
    let student = student?;
    let reference = binllm_eval::chat::ChatReference {
        teacher: Some(teacher_score.clone()),
        ..reference
    };
    reference.save(&run_dir.join("chat-reference.json"))?;
    eprintln!(
        "chat score ({} held-out prompts, {:.1} s): shipped model answer ppl {:.2}, clean answers {:.0}%; teacher {:.2}, {:.0}%",
        student.prompts,
        started.elapsed().as_secs_f64(),
        student.answer_perplexity,
        100.0 * student.clean_share,
        teacher_score.answer_perplexity,
        100.0 * teacher_score.clean_share
    );
    Ok(Some(ChatComparison {
        student,
        teacher: teacher_score,
    }))
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
    config.validate()?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("{}: cannot create run directory", run_dir.display()))?;
    // config.toml, which makes the directory resumable, is written once training starts
    // ([`start_run`]): a run that fails before that leaves nothing to resume.
    std::fs::remove_file(&config_path).ok();
    std::fs::remove_file(run_dir.join("metrics.jsonl")).ok();
    check_writable(run_dir, "the run directory")?;
    let cache = config.cache_dir();
    std::fs::create_dir_all(&cache)
        .map_err(anyhow::Error::from)
        .and_then(|_| check_writable(&cache, "the token cache directory"))
        .with_context(|| {
            format!(
                "{}: cannot use as the token cache (set --cache-dir)",
                cache.display()
            )
        })?;
    Ok(config)
}

/// Fails, naming `dir`, unless a file can be created in it.
fn check_writable(dir: &Path, what: &str) -> Result<()> {
    let probe = dir.join(".binllm-write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("{}: {what} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Marks the run as started: its settings go to `config.toml` (what `--resume` reads).
fn start_run(config: &ConvertConfig, run_dir: &Path) -> Result<()> {
    binllm_format::atomic::write_atomically(
        &run_dir.join("config.toml"),
        toml::to_string_pretty(config)?.as_bytes(),
    )
}

fn load_windows(
    config: &ConvertConfig,
    model: &Llama,
    tokenizer: &TextTokenizer,
    run_dir: &Path,
    writer: bool,
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
                    Ok(bytes) if bytes.len() % 4 == 0 => data::tokens_from_le_bytes(&bytes),
                    _ => {
                        ensure!(
                            writer,
                            "{}: rank 0 wrote no teacher samples for this rank to read",
                            cache.display()
                        );
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
                        binllm_format::atomic::write_atomically(
                            &cache,
                            &data::tokens_to_le_bytes(&sampled),
                        )?;
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
    if plan.chat_windows > 0 {
        eprintln!(
            "  teacher chat: {} windows, {:.0}% of training windows ({:.2} passes)",
            plan.chat_windows,
            100.0 * plan.chat_share,
            plan.chat_epochs
        );
    }
    if plan.sign_steps > 0 {
        eprintln!(
            "  the last {} Stage-2 steps train the sign form itself",
            plan.sign_steps
        );
    }
    if plan.epochs > 1.0 {
        eprintln!(
            "  note: the budget needs {:.2} passes over the corpus training windows: data repeats",
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
