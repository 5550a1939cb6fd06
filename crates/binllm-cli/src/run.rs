//! `binllm run --model model.b1 (--prompt TEXT | --chat)`: the pure-Rust packed runtime,
//! streaming tokens; `--chat` keeps a conversation going over stdin lines.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use binllm_format::chat::{self, ChatMessage};
use binllm_format::packed::PackedModel;
use binllm_format::tokenizer::StreamDecoder;
use binllm_format::TextTokenizer;
use binllm_infer::generate::{generate, GenerateOptions, GenerationStats};
use binllm_infer::{KvCache, Model};

use crate::options::{RuntimeArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    /// A packed model (`binllm export` output, or a sign model).
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue; with --chat, the first user message.
    #[arg(long, required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// Chat with the model's template: user lines from stdin, the conversation kept.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (the template's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Print speeds (prompt and decode tokens/s) to stderr after each reply.
    #[arg(long)]
    pub stats: bool,
}

/// The tokenizer embedded in a packed model, which `run` and `eval` need.
pub fn embedded_tokenizer(packed: &PackedModel, path: &Path) -> Result<TextTokenizer> {
    packed
        .tokenizer()
        .with_context(|| format!("{}: bad embedded tokenizer", path.display()))?
        .with_context(|| format!("{}: the model has no tokenizer", path.display()))
}

pub fn run(args: Args) -> Result<()> {
    let (model, packed) = Model::load(&args.model, &args.runtime.runtime_options())?;
    let tokenizer = embedded_tokenizer(&packed, &args.model)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_tokens: tokenizer.eos_ids.clone(),
    };
    let mut cache = KvCache::new(&model.config);
    if !args.chat {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        let ids = tokenizer.encode(prompt, true)?;
        print!("{prompt}");
        let (_, stats) = stream(&model, &mut cache, &tokenizer, &ids, &options)?;
        println!();
        report(&args, &model, &stats);
        return Ok(());
    }

    let template = packed.chat_template.clone().with_context(|| {
        format!(
            "{}: the model has no chat template; use --prompt",
            args.model.display()
        )
    })?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system));
    }
    let mut pending = args.prompt.clone();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut lines = stdin.lock().lines();
    loop {
        let user = match pending.take() {
            Some(text) => text,
            None => {
                // A prompt is for a person at a terminal; piped input gets answers only.
                if interactive {
                    eprint!("> ");
                    std::io::stderr().flush()?;
                }
                match lines.next() {
                    Some(line) => line.context("reading stdin")?,
                    None => break,
                }
            }
        };
        if user.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", &user));
        let text = render(&template, &messages, &tokenizer)?;
        // A chat template writes its own BOS when it wants one.
        let ids = tokenizer.encode(&text, false)?;
        let (reply, stats) = stream(&model, &mut cache, &tokenizer, &ids, &options)?;
        println!();
        report(&args, &model, &stats);
        messages.push(ChatMessage::new("assistant", &reply));
    }
    Ok(())
}

fn render(template: &str, messages: &[ChatMessage], tokenizer: &TextTokenizer) -> Result<String> {
    let token_text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    chat::render(
        template,
        messages,
        true,
        &token_text(tokenizer.bos_id),
        &token_text(tokenizer.eos_ids.first().copied()),
    )
}

/// Generates after `ids`, printing text as it completes; returns the reply's text.
fn stream(
    model: &Model,
    cache: &mut KvCache,
    tokenizer: &TextTokenizer,
    ids: &[u32],
    options: &GenerateOptions,
) -> Result<(String, GenerationStats)> {
    let mut stdout = std::io::stdout().lock();
    let mut decoder = StreamDecoder::new(tokenizer);
    let mut reply = Vec::new();
    let stats = generate(model, cache, ids, options, |id| {
        reply.push(id);
        if let Some(piece) = decoder.push(id)? {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
        }
        Ok(true)
    })
    .context("generation failed")?;
    if stats.hit_context_limit {
        eprintln!(
            "\n[stopped at the model's context length, {} tokens]",
            model.config.max_position_embeddings
        );
    }
    Ok((tokenizer.decode(&reply, true)?, stats))
}

fn report(args: &Args, model: &Model, stats: &GenerationStats) {
    if args.stats {
        eprintln!(
            "[{} threads, {}] prompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s",
            model.threads(),
            model.kernel(),
            stats.prompt_tokens,
            stats.prefill_tokens_per_second(),
            stats.generated_tokens,
            stats.decode_tokens_per_second()
        );
    }
}
