//! binllm-serve: `binllm serve`, an OpenAI-compatible HTTP server on the packed 1-bit engine
//! (pure Rust, no libtorch). It owns the HTTP side (routes, the API's JSON, its errors) and the
//! scheduler that runs many conversations at once on one [`binllm_infer::Model`]: each
//! sequence has its own KV cache, and the decode steps of all of them run together as one
//! batched product per layer (`Model::forward_batch`), newcomers joining between steps.
//! It comes after binllm-infer in the layering and only the CLI uses it.
//!
//! | module | holds |
//! |---|---|
//! | [`api`] | the OpenAI request and response bodies |
//! | [`error`] | refusals in OpenAI's error shape, with their HTTP status |
//! | `routes` | the HTTP routes, request checks, streaming (server-sent events) |
//! | [`scheduler`] | the thread that owns the model: admission, prefill, batched decode steps |
//! | `sequence` | one request being generated: sampling, stopping, its text |
//!
//! [`Server::start`] loads the model, binds, and serves on a thread of its own until
//! [`Server::stop`] (or Ctrl-C / SIGTERM, with [`Server::wait`]): it then stops taking
//! connections, lets the requests in flight finish, and ends the scheduler.

pub mod api;
pub mod error;
mod routes;
pub mod scheduler;
mod sequence;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use binllm_infer::{Model, RuntimeOptions};
use tokio::sync::oneshot;

pub use scheduler::Counters;
pub use sequence::{Event, Finish};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A packed model with an embedded tokenizer.
    pub model: PathBuf,
    /// The name clients use (default: the file name without its extension).
    pub model_id: Option<String>,
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// When set, /v1/ routes need `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Sequences decoded together; more requests wait.
    pub max_sequences: usize,
    /// Requests that may wait for a slot; beyond, 429.
    pub queue: usize,
    pub runtime: RuntimeOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: PathBuf::new(),
            model_id: None,
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_sequences: 16,
            queue: 64,
            runtime: RuntimeOptions::default(),
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    model_id: String,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Loads the model, binds `host:port` and starts serving on a thread of its own. Returns
    /// once the socket listens, so a client may connect at once.
    pub fn start(options: &ServeOptions) -> Result<Server> {
        let path = &options.model;
        let (model, packed) = Model::load(path, &options.runtime)?;
        let tokenizer = packed
            .tokenizer()
            .with_context(|| format!("{}: bad embedded tokenizer", path.display()))?
            .with_context(|| format!("{}: the model has no tokenizer", path.display()))?;
        let tokenizer = Arc::new(tokenizer);
        let model_id = options.model_id.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned())
        });
        let context = model.config.max_position_embeddings;
        let (scheduler, scheduler_thread) = scheduler::start(
            model,
            tokenizer.clone(),
            options.max_sequences,
            options.queue,
        )?;
        let counters = scheduler.counters.clone();
        let state = Arc::new(routes::AppState {
            model_id: model_id.clone(),
            created: routes::unix_seconds(),
            api_key: options.api_key.clone(),
            tokenizer,
            chat_template: packed.chat_template.clone(),
            context,
            scheduler,
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("binllm-http")
            .enable_all()
            .build()
            .context("cannot start the HTTP runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((
                options.host.as_str(),
                options.port,
            )))
            .with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
        let addr = listener.local_addr().context("the bound address")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("binllm-serve".into())
            .spawn(move || -> Result<()> {
                let app = routes::router(state);
                runtime
                    .block_on(async move {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(async {
                                // A message or a dropped sender: either way, stop.
                                let _ = stopped.await;
                            })
                            .await
                    })
                    .context("the HTTP server failed")?;
                // The router, and with it the last handle to the request queue, is gone:
                // the scheduler finishes what it runs and ends.
                scheduler_thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))
            })
            .context("cannot start the server thread")?;
        Ok(Server {
            addr,
            model_id,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name clients ask for.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Active and waiting sequences, decode steps.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Serves until Ctrl-C or SIGTERM, then drains and returns.
    pub fn wait(self) -> Result<()> {
        let signals = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the signal watcher")?;
        let which = signals.block_on(termination_signal())?;
        eprintln!(
            "[serve] {which}: finishing the requests in flight, then stopping (again to stop at once)"
        );
        // A second signal does not wait for the requests in flight.
        std::thread::spawn(move || {
            if let Ok(which) = signals.block_on(termination_signal()) {
                eprintln!("[serve] {which} again: stopping now");
                std::process::exit(130);
            }
        });
        self.stop()
    }

    /// Stops taking connections, lets the requests in flight finish, and returns.
    pub fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let _ = self.join();
        }
    }
}

/// Waits for Ctrl-C or SIGTERM; says which came.
async fn termination_signal() -> Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map(|_| "Ctrl-C").context("cannot watch for Ctrl-C"),
            _ = terminate.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .map(|_| "Ctrl-C")
            .context("cannot watch for Ctrl-C")
    }
}
