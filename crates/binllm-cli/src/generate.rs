//! `binllm generate MODEL --prompt ...`: full-precision generation on libtorch.

use std::io::Write;
use std::path::PathBuf;

use crate::options::{Dtype, SamplingArgs};
use anyhow::{Context, Result};
use binllm_format::chat::ChatMessage;
use binllm_format::tokenizer::StreamDecoder;
use binllm_format::{LoadOptions, PretrainedModel};
use binllm_train::generate::{generate, GenerateOptions};
use binllm_train::{parse_device, Llama};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory, a GGUF file or a llama2.c checkpoint.
    pub model: PathBuf,
    /// The text to continue (or, with --chat, the user's message).
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template to the prompt (as a user message).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (the template's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Parameter type (default: bf16 on CUDA, f32 on CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Tokenizer file, when it is not beside the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print speeds (prompt and decode tokens/s) to stderr at the end.
    #[arg(long)]
    pub stats: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = match args.dtype {
        Some(dtype) => dtype.kind(),
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    let pretrained = PretrainedModel::load(
        &args.model,
        &LoadOptions {
            tokenizer: args.tokenizer.clone(),
        },
    )?;
    let tokenizer = pretrained.tokenizer()?;
    let text = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        pretrained.render_chat(&messages)?
    } else {
        args.prompt.clone()
    };
    // A chat template writes its own BOS when it wants one.
    let prompt_ids = tokenizer.encode(&text, !args.chat)?;
    let model = Llama::from_pretrained(&pretrained, device, kind)?;

    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_tokens: tokenizer.eos_ids.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let mut decoder = StreamDecoder::new(tokenizer);
    let stats = generate(&model, &prompt_ids, &options, |id| {
        if let Some(piece) = decoder.push(id)? {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
        }
        Ok(true)
    })
    .context("generation failed")?;
    writeln!(stdout)?;
    if args.stats {
        eprintln!(
            "[{} {:?}] prompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s",
            binllm_train::device::device_label(device),
            kind,
            stats.prompt_tokens,
            stats.prefill_tokens_per_second(),
            stats.generated_tokens,
            stats.decode_tokens_per_second()
        );
    }
    Ok(())
}
