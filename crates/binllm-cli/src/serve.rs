//! `binllm serve --model model.b1`: an OpenAI-compatible HTTP server on the packed runtime
//! (pure Rust), many conversations decoded together. The server is binllm-serve's; this file
//! reads the options and says where it listens.

use std::path::PathBuf;

use anyhow::Result;
use binllm_serve::{ServeOptions, Server};

use crate::options::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A packed model with its tokenizer (`binllm export` output).
    #[arg(long)]
    pub model: PathBuf,
    /// The name clients give as `model` (default: the file name without its extension).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address to listen on. The default serves this machine only; 0.0.0.0 serves everyone.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the /v1/ routes.
    #[arg(long, env = "BINLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together (one batched product per layer per step).
    #[arg(long, default_value_t = 16)]
    pub max_sequences: usize,
    /// Requests that may wait for a free sequence; beyond that, 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<()> {
    let server = Server::start(&ServeOptions {
        model: args.model,
        model_id: args.model_name,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_sequences: args.max_sequences,
        queue: args.queue,
        runtime: args.runtime.runtime_options(),
    })?;
    // Tests and scripts read this line for the port.
    println!(
        "binllm serve: model '{}' on http://{} (Ctrl-C stops)",
        server.model_id(),
        server.addr()
    );
    server.wait()
}
