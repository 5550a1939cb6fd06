//! `binllm eval`: the paper's panel (WikiText-2 / C4 / PTB perplexity and seven zero-shot
//! tasks) and the chat score on any model binllm loads, and `binllm eval compare` for
//! side-by-side tables.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use binllm_eval::{
    compare_files, compare_with_reference, parse_benchmarks, render_markdown, run_benchmarks,
    Benchmark, EvalSettings, LanguageModel, PerplexitySet, ReferenceFile,
};

use crate::options::{Dtype, RuntimeArgs};

#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_long_help = "Examples:
  binllm eval --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks all --device cuda --out results/fp.json
  binllm eval --model runs/smollm2/sign-model.safetensors --tasks wikitext2,piqa --limit 200
  binllm eval --model runs/smollm2/model.b1 --tasks chat:smollm2-chat-reference.json
  binllm eval compare results/fp.json results/binaryllm.json results/ste.json"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Render several result files side by side (one column per model).
    Compare {
        /// Result JSON files written by `binllm eval --out`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also write the table to this Markdown file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// A Hugging Face directory, GGUF, llama2.c checkpoint, or a binllm packed / sign model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated: wikitext2, c4, ptb, ptb-valid, file:PATH, boolq, piqa, hellaswag,
    /// winogrande, arc_easy, arc_challenge, openbookqa, chat:PATH (the chat score against a
    /// reference of the teacher's greedy answers); `all` is the paper's panel (no chat).
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Score only the first N examples of each task, and the first N windows of each
    /// perplexity set (a quick look, not the published figure).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Perplexity window in tokens (default: min(2048, the model's context)).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Sliding-window stride for perplexity (default: non-overlapping windows, as GPTQ).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Perplexity the way llama.cpp's llama-perplexity computes it (non-overlapping windows
    /// scoring their second half, BOS first in each): with a `file:` set, the figure
    /// `llama-perplexity -f FILE -c CTX` prints for the same model.
    #[arg(long, conflicts_with = "stride")]
    pub llama_cpp_perplexity: bool,
    /// Evaluation data (default: $BINLLM_EVAL_DATA, else ../shared/data/eval).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write every number and setting to this JSON file (and a .md beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A reference JSON from tools/reference/eval_reference.py: print the agreement.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Engine: torch (libtorch, CPU/CUDA) or packed (pure Rust, CPU, packed files only);
    /// auto picks packed for packed files (torch when --device asks for CUDA), else torch.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// The packed engine's threads and kernels.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// cpu, cuda, cuda:N or auto (torch engine).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Parameter type for the torch engine.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Padded tokens per forward pass (torch engine; default 16384 on CUDA, 4096 on CPU).
    #[arg(long)]
    pub batch_tokens: Option<usize>,
    /// Tokenizer file when it is not beside the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Which engine scores the model.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Auto,
    /// libtorch, CPU or CUDA, any model binllm loads.
    Torch,
    /// The pure-Rust runtime, CPU, packed files only.
    Packed,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(Action::Compare { files, out }) = args.action {
        let table = compare_files(&files)?;
        println!("{table}");
        if let Some(out) = out {
            std::fs::write(&out, &table)
                .with_context(|| format!("{}: cannot write", out.display()))?;
        }
        return Ok(());
    }
    let a = args.run;
    let model_path = a
        .model
        .clone()
        .context("--model is required (or use `binllm eval compare`)")?;
    let benchmarks = parse_benchmarks(&a.tasks)?;
    let data_dir = a
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("BINLLM_EVAL_DATA").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data/eval"));
    // A chat reference carries its own prompts; every other benchmark reads the data dir.
    // Chat references and file: texts name their own files; the rest read the data sets.
    let needs_data = benchmarks.iter().any(|b| {
        !matches!(
            b,
            Benchmark::Chat(_) | Benchmark::Perplexity(PerplexitySet::TextFile(_))
        )
    });
    if needs_data && !data_dir.is_dir() {
        bail!(
            "{}: evaluation data directory not found (set --data-dir or BINLLM_EVAL_DATA)",
            data_dir.display()
        );
    }
    let (mut engine, engine_label) = open_engine(&a, &model_path)?;
    let settings = EvalSettings {
        data_dir,
        model_label: model_path.display().to_string(),
        engine_label,
        ctx: a.ctx,
        stride: a.stride,
        limit: a.limit,
        llama_cpp_perplexity: a.llama_cpp_perplexity,
        show_progress: true,
    };
    let report = run_benchmarks(engine.as_mut(), &benchmarks, &settings)?;
    let markdown = render_markdown(&report);
    println!("{markdown}");
    if let Some(out) = &a.out {
        report.save(out)?;
        let md = out.with_extension("md");
        std::fs::write(&md, &markdown)
            .with_context(|| format!("{}: cannot write", md.display()))?;
        eprintln!("wrote {} and {}", out.display(), md.display());
    }
    if let Some(reference) = &a.reference {
        let summary = compare_with_reference(&report, &ReferenceFile::load(reference)?);
        println!("{}", summary.render());
    }
    Ok(())
}

/// The engine for `model` as the options ask.
fn open_engine(a: &RunArgs, model: &std::path::Path) -> Result<(Box<dyn LanguageModel>, String)> {
    let packed = binllm_format::packed::is_packed_file(model);
    let engine = match a.engine {
        Engine::Auto if packed && !a.device.starts_with("cuda") => Engine::Packed,
        Engine::Auto if cfg!(feature = "torch") => Engine::Torch,
        Engine::Auto => Engine::Packed,
        chosen => chosen,
    };
    match engine {
        Engine::Packed => packed_engine(a, model, packed),
        #[cfg(feature = "torch")]
        Engine::Torch => torch_engine(a, model),
        #[cfg(not(feature = "torch"))]
        Engine::Torch => {
            bail!("this binllm was built without the libtorch engine (feature `torch`)")
        }
        Engine::Auto => unreachable!("auto is resolved above"),
    }
}

fn packed_engine(
    a: &RunArgs,
    model: &std::path::Path,
    packed: bool,
) -> Result<(Box<dyn LanguageModel>, String)> {
    if !packed {
        let alternative = if cfg!(feature = "torch") {
            "use --engine torch for other formats"
        } else {
            "this binllm was built without the libtorch engine (feature `torch`) that reads \
             other formats"
        };
        bail!(
            "{}: the packed engine runs binllm packed models only (`binllm export` makes one); \
             {alternative}",
            model.display()
        );
    }
    let (runtime, file) = binllm_infer::Model::load(model, &a.runtime.runtime_options())?;
    let tokenizer = crate::run::embedded_tokenizer(&file, model)?;
    let label = format!(
        "packed (pure Rust, {} kernel, {} threads)",
        runtime.kernel(),
        runtime.threads()
    );
    Ok((
        Box::new(binllm_infer::PackedScorer::new(runtime, tokenizer)),
        label,
    ))
}

#[cfg(feature = "torch")]
fn torch_engine(a: &RunArgs, model: &std::path::Path) -> Result<(Box<dyn LanguageModel>, String)> {
    use binllm_format::{LoadOptions, PretrainedModel};
    use binllm_train::scorer::TorchScorer;
    let device = binllm_train::parse_device(&a.device)?;
    let kind = a.dtype.kind();
    // A 1-bit GGUF goes through the float loader, which dequantises every block type (a
    // `.b1` has no float form of its own, so it is rebuilt from its signs and scales): the
    // libtorch engine scores what the file holds independently of the 1-bit reader.
    let (llama, tokenizer) = if binllm_format::detect::is_packed_container(model) {
        let p = binllm_format::packed::PackedModel::read(model)?;
        let tok = crate::run::embedded_tokenizer(&p, model)?;
        (
            binllm_train::sign_model::llama_from_packed(&p, device, kind)?,
            tok,
        )
    } else {
        let mut p = PretrainedModel::load(
            model,
            &LoadOptions {
                tokenizer: a.tokenizer.clone(),
            },
        )?;
        let tok = p
            .tokenizer
            .take()
            .with_context(|| format!("{}: the model has no tokenizer", model.display()))?;
        (binllm_train::Llama::from_pretrained(&p, device, kind)?, tok)
    };
    let mut scorer = TorchScorer::new(llama, tokenizer);
    if let Some(b) = a.batch_tokens {
        scorer.max_batch_tokens = b;
    }
    let label = format!(
        "libtorch {} {}",
        binllm_train::device::device_label(device),
        a.dtype.label()
    );
    Ok((Box::new(scorer), label))
}
