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
mod options;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Write the deployment file: input scales folded where exact, f16 (or q8_0 head).
    Export(export::Args),
    /// Run a packed 1-bit model (pure Rust): complete a prompt or chat, streaming tokens.
    Run(run::Args),
    /// Measure a packed model's prompt and decode tokens/s and the memory bandwidth.
    Bench(bench::Args),
}

fn main() {
    // Behave like other Unix tools when the reader of our output goes away (`| head`).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    #[cfg(feature = "torch")]
    binllm_train::load_cuda_backend();
    let cli = Cli::parse();
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
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
