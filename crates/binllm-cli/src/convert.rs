//! `binllm convert`: pretrained model + corpus -> 1-bit model (see binllm_train::convert).

use std::path::PathBuf;

use anyhow::{Context, Result};
use binllm_train::convert::{self, ConvertConfig, Preset};
use binllm_train::parallel::nccl::{NcclGroup, UniqueId};
use binllm_train::parallel::RankEnv;
use binllm_train::summary::Summary;

use crate::launch::{self, Ranks};
use binllm_train::data::parse_count;
use binllm_train::linear::ScaleMode;
use binllm_train::loss::Distill;
use binllm_train::method::Method;
use binllm_train::schedule::{LrSchedule, TSchedule};

#[derive(clap::Args)]
#[command(after_long_help = "Examples:
  binllm convert --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --data ../shared/data/corpus/wikipedia_en.txt.gz --data ../shared/data/corpus/gutenberg_en.slice.txt.gz \\
      --out runs/smollm2 --tokens 16M --batch-tokens 64k --device cuda
  binllm convert --model ../shared/models/stories260K/stories260K.bin \\
      --data ../shared/data/corpus/tinystories --out runs/stories --preset smoke --device cpu
  binllm convert --out runs/stories --resume        # continue a killed run")]
pub struct Args {
    /// The pretrained model: a Hugging Face directory, a GGUF file or a llama2.c checkpoint.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Training text: .txt, .txt.gz, .jsonl(.gz) with a "text" field, or a directory of them
    /// (repeatable). `teacher:N` (e.g. teacher:2M) samples N tokens from the model itself.
    #[arg(long)]
    pub data: Vec<String>,
    /// Run directory: config, metrics, checkpoints, plot, summary and the sign model.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint, with its stored settings.
    #[arg(long)]
    pub resume: bool,
    /// binaryllm (the paper), or a baseline on the same data and budget.
    #[arg(long, value_enum, default_value = "binaryllm")]
    pub method: Method,
    /// Starting settings (every option below overrides them): `quality` (binllm's measured
    /// one-GPU recipe: distillation, teacher chat data, 80M tokens; docs/RECIPE.md), `paper`
    /// (seq 2048, 128 x 2048 tokens a step, lr 1e-4 -> 2e-6, cross-entropy) or `smoke` (a few
    /// CPU minutes on a tiny model). Default: `quality` on CUDA, `paper` on the CPU.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Stage-2 budget in tokens (2M, 500k, ...); default: the whole corpus once.
    #[arg(long, value_parser = parse_count, conflicts_with = "steps")]
    pub tokens: Option<usize>,
    /// Stage-2 optimizer steps (instead of --tokens); rounded down to whole phases.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Stage-1 steps (binary-aware initialisation); 0 skips Stage 1. Default: 50 for
    /// binaryllm, 0 for baselines.
    #[arg(long)]
    pub stage1_steps: Option<usize>,
    /// Stage-1 learning rate for the input scales.
    #[arg(long)]
    pub stage1_lr: Option<f64>,
    /// Do not tie Stage-1 scales (q/k/v, gate/up, o per kv group); untied scales cannot be
    /// folded away at export and cost bits.
    #[arg(long)]
    pub no_stage1_tie: bool,
    /// Stage-1 gradient through sign: `ste` (clipped straight-through) or `progressive:T`.
    #[arg(long)]
    pub stage1_surrogate: Option<String>,
    /// Progressive temperature schedule across phases.
    #[arg(long, value_enum)]
    pub schedule: Option<TSchedule>,
    /// The t of the last phase (the schedule is scaled to reach it; the paper's: 104.6).
    #[arg(long)]
    pub t_max: Option<f64>,
    /// Share of Stage-2 steps, at the end, that train the sign form itself (exactly the
    /// exported forward, straight-through backward), so the shipped form is trained last.
    #[arg(long)]
    pub sign_fraction: Option<f64>,
    /// The sign stage's own peak learning rate (cosine to --min-lr over the stage; the main
    /// schedule then ends where the sign stage begins). Unset: the sign stage runs at the
    /// tail of the one schedule.
    #[arg(long)]
    pub sign_lr: Option<f64>,
    /// Number of Stage-2 phases (the paper: 20).
    #[arg(long)]
    pub phases: Option<usize>,
    /// Row scales: dual (S_l x S_a, the paper), analytical (S_a only), learnable (S_l only).
    #[arg(long, value_enum)]
    pub scales: Option<ScaleMode>,
    /// Stop gradients through the analytical scale S_a.
    #[arg(long)]
    pub detach_abs_mean: bool,
    /// Tokens per training window.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Tokens per optimizer step (reached by gradient accumulation), e.g. 256k.
    #[arg(long, value_parser = parse_count)]
    pub batch_tokens: Option<usize>,
    /// Sequences per forward pass (memory knob; does not change the math).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Peak learning rate (cosine decay to --min-lr).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning-rate shape after warm-up: cosine to --min-lr, or wsd (stable at the peak,
    /// then linear to --min-lr over the last --decay-fraction of the steps).
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// For --lr-schedule wsd: the share of steps over which the rate decays.
    #[arg(long)]
    pub decay_fraction: Option<f64>,
    /// Learning-rate multiplier of the scale vectors (S_l, Stage-1 input scales).
    #[arg(long)]
    pub scale_lr_mult: Option<f64>,
    /// Learning-rate multiplier of the embeddings, head, norms and biases.
    #[arg(long)]
    pub embed_lr_mult: Option<f64>,
    /// AdamW weight decay (matrices only).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// No weight decay on the latent block weights (embeddings and head keep theirs).
    #[arg(long)]
    pub no_decay_latent: bool,
    /// Global gradient-norm clip (0 disables).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Loss: ce (next-token cross-entropy), kd (distillation from the frozen FP teacher), mix.
    #[arg(long, value_enum)]
    pub distill: Option<Distill>,
    #[arg(long)]
    pub kd_temperature: Option<f64>,
    /// Weight of cross-entropy in `mix`.
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Add the mean squared difference of the student's and the teacher's final hidden
    /// states, times this weight, to the loss (0: none).
    #[arg(long)]
    pub kd_hidden_weight: Option<f64>,
    /// Apply the LM head and the loss this many tokens at a time (e.g. 4096), so the
    /// `[tokens, vocab]` logits never exist at once; 0 keeps whole logits.
    #[arg(long, value_parser = parse_count)]
    pub loss_chunk_tokens: Option<usize>,
    /// Tokens of chat transcripts to generate with the teacher before training (e.g. 4M;
    /// 0: none): prompts drawn from the corpus, answered in the model's own chat template.
    #[arg(long, value_parser = parse_count)]
    pub chat_tokens: Option<usize>,
    /// Share of training windows drawn from the chat transcripts (e.g. 0.2).
    #[arg(long)]
    pub chat_share: Option<f64>,
    /// Prompts the teacher answers at once while generating chat data (memory knob).
    #[arg(long)]
    pub chat_batch: Option<usize>,
    /// Held-out prompts (of 48) for the chat score taken at the end of the run; 0 skips it.
    #[arg(long)]
    pub chat_eval_prompts: Option<usize>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// Train data-parallel on N GPUs, one process each (needs --device cuda; NCCL from
    /// torch's nvidia-nccl wheel). Each step's batch is split over the GPUs, so the run
    /// trains on the same data and takes the same steps as on one GPU.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Train in fp32 on CUDA instead of bf16 autocast.
    #[arg(long)]
    pub no_bf16: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Held-out windows for validation loss (taken from the end of the corpus).
    #[arg(long)]
    pub val_windows: Option<usize>,
    /// Also checkpoint every N Stage-2 steps (phase ends always checkpoint).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// How many checkpoints to keep on disk while the run goes (default 1).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Keep the checkpoints after the run has finished (by default they are deleted; the
    /// sign model and summary hold the result).
    #[arg(long)]
    pub keep_final_checkpoints: bool,
    /// Time N Stage-2 steps (after two warm-up steps) section by section (embedding,
    /// binarised weights, attention, MLP, head, loss, backward, optimizer) and write the
    /// breakdown to the log, metrics.jsonl and summary.md.
    #[arg(long, value_name = "N")]
    pub profile: Option<usize>,
    /// Where tokenized corpora are cached.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Tokenizer file when it is not beside the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if RankEnv::from_env()?.is_none() {
        let gpus = args.gpus.unwrap_or(1);
        launch::check_gpus(gpus, args.device.as_deref())?;
        if gpus > 1 {
            launch::disable_nvls();
        }
        launch::check_visible_gpus(gpus, visible_gpus(gpus))?;
    }
    let model = args.model.clone().unwrap_or_default();
    let preset = match args.preset {
        Some(p) => p,
        None => {
            let device = binllm_train::parse_device(args.device.as_deref().unwrap_or("auto"))?;
            Preset::default_for(device.is_cuda())
        }
    };
    let mut c = ConvertConfig::preset(preset, model, args.data.clone(), args.method);
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field.clone() { c.$field = v; } )* };
    }
    set!(
        stage1_steps,
        stage1_lr,
        stage1_surrogate,
        schedule,
        sign_fraction,
        phases,
        scales,
        seq_len,
        batch_tokens,
        micro_batch
    );
    set!(
        lr,
        min_lr,
        warmup_steps,
        lr_schedule,
        decay_fraction,
        scale_lr_mult,
        embed_lr_mult,
        weight_decay,
        grad_clip,
        distill,
        kd_temperature,
        ce_weight,
        loss_chunk_tokens,
        kd_hidden_weight,
        device,
        seed
    );
    set!(
        val_windows,
        checkpoint_every,
        keep_checkpoints,
        chat_tokens,
        chat_share,
        chat_batch,
        chat_eval_prompts
    );
    if args.t_max.is_some() {
        c.t_max = args.t_max;
    }
    if args.sign_lr.is_some() {
        c.sign_lr = args.sign_lr;
    }
    if let Some(n) = args.profile {
        c.profile_steps = n;
    }
    if args.keep_final_checkpoints {
        c.keep_final_checkpoints = true;
    }
    if args.no_decay_latent {
        c.decay_latent = false;
    }
    if args.tokens.is_some() || args.steps.is_some() {
        c.tokens = args.tokens;
        c.steps = args.steps;
    }
    c.cache_dir = args.cache_dir.clone();
    c.tokenizer = args.tokenizer.clone();
    c.stage1_tie = !args.no_stage1_tie;
    c.detach_abs_mean = args.detach_abs_mean;
    c.bf16 = !args.no_bf16;
    let Some(summary) = run_on_ranks(c, &args)? else {
        // Ranks other than 0 report nothing: rank 0 prints the run's results.
        return Ok(());
    };
    let v = &summary.validation;
    println!(
        "{}: held-out perplexity FP {:.2}, PTQ {:.2}, final training form {:.2}, sign form {:.2} (gap {:+.4} nats/token)",
        summary.method,
        v.full_precision.exp(),
        v.ptq.exp(),
        v.final_training_form.exp(),
        v.final_sign_form.exp(),
        v.sign_gap
    );
    if let Some(chat) = &summary.chat {
        println!(
            "chat score ({} held-out prompts): answer ppl {:.2} (teacher {:.2}), clean answers {:.0}% (teacher {:.0}%)",
            chat.student.prompts,
            chat.student.answer_perplexity,
            chat.teacher.answer_perplexity,
            100.0 * chat.student.clean_share,
            100.0 * chat.teacher.clean_share
        );
    }
    println!(
        "tokens trained {}, Stage-2 {:.0} tokens/s ({:.0} in training steps alone), wall-clock {:.1} s; run in {}",
        summary.tokens_trained,
        summary.stage2_tokens_per_second,
        summary.stage2_step_tokens_per_second,
        summary.wall_seconds,
        args.out.display()
    );
    if let Some(p) = &summary.sign_model {
        println!("sign model: {p}");
    }
    Ok(())
}

/// The CUDA devices libtorch sees; not asked (0) for one GPU, so a CPU run never loads CUDA
/// on account of `--gpus`.
fn visible_gpus(gpus: usize) -> usize {
    if gpus > 1 {
        binllm_train::load_cuda_backend();
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// Runs the conversion on this process's GPU(s): a child started by `--gpus` joins as its
/// rank; otherwise one device, or rank 0 of `--gpus N` after starting ranks 1..N. The
/// summary comes back on rank 0 only.
fn run_on_ranks(config: ConvertConfig, args: &Args) -> Result<Option<Summary>> {
    if let Some(env) = RankEnv::from_env()? {
        let (rank, world) = (env.shard.rank, env.shard.world_size);
        let place = || format!("rank {rank} of {world}");
        let device = binllm_train::parse_device(&config.device).with_context(place)?;
        let group = NcclGroup::new(&env.nccl_id, rank, world, device).with_context(place)?;
        convert::run_rank(config, &args.out, args.resume, &group).with_context(place)?;
        return Ok(None);
    }
    let gpus = args.gpus.unwrap_or(1);
    if gpus == 1 {
        return convert::run(config, &args.out, args.resume).map(Some);
    }
    let gpu_ids = launch::visible_gpu_ids(
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        visible_gpus(gpus),
    );
    let id = UniqueId::create()?;
    let ranks = Ranks::spawn(gpus, &id, &gpu_ids)?;
    let rank0 = binllm_train::parse_device(&config.device)
        .and_then(|device| NcclGroup::new(&id, 0, gpus, device))
        .and_then(|group| convert::run_rank(config, &args.out, args.resume, &group))
        .context("rank 0");
    match rank0 {
        Ok(summary) => {
            ranks.wait()?;
            summary.context("rank 0 returned no summary").map(Some)
        }
        Err(e) => {
            ranks.stop();
            Err(e)
        }
    }
}
