//! `binllm`: turn a pretrained LLM into a true 1-bit LLM, evaluate it, export it, run it.
//!
//! One file per subcommand; `options.rs` holds the options several of them take (the packed
//! runtime's threads and kernels, token sampling, the libtorch parameter type).

mod bench;
#[cfg(feature = "torch")]
mod convert;
mod eval;
mod export;
#[cfg(feature = "torch")]
mod generate;
mod inspect;
#[cfg(feature = "torch")]
mod launch;
mod options;
mod run;
mod serve;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "binllm",
    version,
    about = "Pretrained LLM -> true 1-bit LLM: convert, evaluate, export, run."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a pretrained model into a 1-bit model (binary-aware init + progressive training).
    #[cfg(feature = "torch")]
    Convert(Box<convert::Args>),
    /// Evaluate a model: WikiText-2 / C4 / PTB perplexity and seven zero-shot tasks.
    Eval(Box<eval::Args>),
    /// Show a model's architecture, parameter counts by group, tensor types and tokenizer.
    Inspect(inspect::Args),
    /// Generate text from a full-precision model on libtorch (CPU or CUDA), streaming tokens.
    #[cfg(feature = "torch")]
    Generate(generate::Args),
    /// Write the deployment file: input scales folded where exact; an f16, q8_0 or q4_0 head.
    Export(export::Args),
    /// Run a packed 1-bit model (pure Rust): complete a prompt or chat, streaming tokens.
    Run(run::Args),
    /// Measure a packed model's prompt and decode tokens/s and the memory bandwidth.
    Bench(bench::Args),
    /// Serve a packed model over HTTP with OpenAI's API (pure Rust), many conversations at once.
    Serve(serve::Args),
    /// (needs the libtorch build)
    #[cfg(not(feature = "torch"))]
    #[command(hide = true)]
    Convert(MissingCommand),
    /// (needs the libtorch build)
    #[cfg(not(feature = "torch"))]
    #[command(hide = true)]
    Generate(MissingCommand),
}

/// A command this build lacks: its arguments are taken whole, to say which build has it.
#[cfg(not(feature = "torch"))]
#[derive(clap::Args)]
struct MissingCommand {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _rest: Vec<String>,
}

/// What this binary was built with and what the CPU it runs on offers (`--version`).
fn build_info() -> String {
    let engines = if cfg!(feature = "torch") {
        "libtorch engine (convert, generate, eval --engine torch; CUDA when libtorch_cuda.so is found) and the pure-Rust packed engine"
    } else {
        "the pure-Rust packed engine only (no convert or generate: build without --no-default-features for those)"
    };
    let mut simd = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            simd.push("avx2");
        }
        if std::is_x86_feature_detected!("avx512f") {
            simd.push("avx512f");
        }
        if std::is_x86_feature_detected!("avx512vnni") {
            simd.push("avx512-vnni");
        }
    }
    let simd = if simd.is_empty() {
        "none (portable kernels)".to_string()
    } else {
        simd.join(", ")
    };
    format!(
        "{}\nbuild: {engines}\nthis CPU: {simd}",
        env!("CARGO_PKG_VERSION")
    )
}

fn main() {
    // Behave like other Unix tools when the reader of our output goes away (`| head`).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    #[cfg(feature = "torch")]
    binllm_train::load_cuda_backend();
    // clap keeps a version text for the whole run: leaking the one string is what that costs.
    let version: &'static str = Box::leak(build_info().into_boxed_str());
    let matches = Cli::command().long_version(version).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result: Result<()> = match cli.command {
        #[cfg(feature = "torch")]
        Command::Convert(args) => convert::run(*args),
        Command::Eval(args) => eval::run(*args),
        Command::Inspect(args) => inspect::run(args),
        #[cfg(feature = "torch")]
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        #[cfg(not(feature = "torch"))]
        Command::Convert(_) | Command::Generate(_) => Err(anyhow::anyhow!(
            "this binllm is the pure-Rust build, without the libtorch engine that converts and generates; \
             build the default one: cargo build --release -p binllm-cli (see README)"
        )),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
