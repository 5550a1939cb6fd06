//! The scheduler: one thread that owns the model and runs every active sequence.
//!
//! Each turn of its loop it (1) takes waiting requests while fewer than `max_sequences` run,
//! running each newcomer's prompt on its own (a GEMM over the prompt) and picking its first
//! token; (2) lets go of sequences that finished or whose client went away; (3) runs one
//! decode step of all the others together, `Model::forward_batch`: each layer's products
//! take the sequences as the columns of one GEMM, so the 1-bit weights stream from memory
//! once per step however many conversations there are, while each sequence attends over its
//! own KV cache. New requests thus join between steps (continuous batching).
//!
//! Requests wait in a bounded queue (a `sync_channel`): when it is full, `submit` refuses at
//! once and the client gets 429. When every handle to the queue is gone (the server stopped
//! taking requests), the loop finishes the sequences it has and the thread ends.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use binllm_format::TextTokenizer;
use binllm_infer::generate::prefill;
use binllm_infer::{KvCache, Model};

use crate::error::ApiError;
use crate::sequence::{Job, Sequence};

/// How many sequences run and wait, for /health and the tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub active: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Decode steps run, and the sequence-steps in them (their ratio is the mean batch).
    pub steps: AtomicUsize,
    pub sequence_steps: AtomicUsize,
}

/// The request handlers' side of the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    jobs: SyncSender<Job>,
    pub counters: Arc<Counters>,
    pub max_sequences: usize,
}

impl SchedulerHandle {
    /// Queues `job`, or refuses it when the queue is full (429) or the scheduler has stopped.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before it is sent, so that the scheduler's decrement never comes first.
        self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match err {
                    TrySendError::Full(_) => ApiError::overloaded(format!(
                        "all {} sequence slots are busy and the waiting queue is full; retry later",
                        self.max_sequences
                    )),
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("the server is shutting down")
                    }
                })
            }
        }
    }
}

/// Starts the scheduler thread on `model`: at most `max_sequences` run at once, at most
/// `queue` more wait.
pub fn start(
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    max_sequences: usize,
    queue: usize,
) -> Result<(SchedulerHandle, JoinHandle<()>)> {
    let (jobs, incoming) = sync_channel(queue);
    let counters = Arc::new(Counters::default());
    let max_sequences = max_sequences.max(1);
    let scheduler = Scheduler {
        model,
        tokenizer,
        incoming,
        counters: counters.clone(),
        max_sequences,
    };
    let thread = std::thread::Builder::new()
        .name("binllm-scheduler".into())
        .spawn(move || scheduler.run())
        .context("cannot start the scheduler thread")?;
    Ok((
        SchedulerHandle {
            jobs,
            counters,
            max_sequences,
        },
        thread,
    ))
}

struct Scheduler {
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    incoming: Receiver<Job>,
    counters: Arc<Counters>,
    max_sequences: usize,
}

impl Scheduler {
    fn run(self) {
        let tokenizer = self.tokenizer.clone();
        let mut active: Vec<Sequence> = Vec::new();
        let mut accepting = true;
        loop {
            // Newcomers: block for one when idle, else take what waits, up to the limit.
            if active.is_empty() {
                if !accepting {
                    break;
                }
                match self.incoming.recv() {
                    Ok(job) => self.admit(job, &tokenizer, &mut active),
                    Err(_) => break,
                }
            }
            while accepting && active.len() < self.max_sequences {
                match self.incoming.try_recv() {
                    Ok(job) => self.admit(job, &tokenizer, &mut active),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => accepting = false,
                }
            }
            active.retain(|s| !s.is_finished());
            self.counters.active.store(active.len(), Ordering::SeqCst);
            if active.is_empty() {
                continue;
            }
            self.step(&mut active);
            active.retain(|s| !s.is_finished());
            self.counters.active.store(active.len(), Ordering::SeqCst);
        }
        self.counters.active.store(0, Ordering::SeqCst);
    }

    /// Runs `job`'s prompt and picks its first token; it joins `active` unless that already
    /// finished it.
    fn admit<'t>(&self, job: Job, tokenizer: &'t TextTokenizer, active: &mut Vec<Sequence<'t>>) {
        self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            return; // its client left while it waited
        }
        let mut cache = KvCache::new(&self.model.config);
        let prompt = job.prompt.clone();
        let context = self.model.config.max_position_embeddings;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            prefill(&self.model, &mut cache, &prompt)
        }));
        let mut sequence = Sequence::new(job, cache, tokenizer, context);
        match outcome {
            Ok(Ok((logits, _))) => advance_guarded(&mut sequence, logits),
            Ok(Err(err)) => sequence.fail(format!("the prompt failed: {err:#}")),
            Err(_) => sequence.fail("the engine panicked on the prompt".into()),
        }
        if !sequence.is_finished() {
            active.push(sequence);
            self.counters.active.store(active.len(), Ordering::SeqCst);
        }
    }

    /// One decode step of every sequence in `active`, as one batch.
    fn step(&self, active: &mut [Sequence]) {
        let tokens: Vec<u32> = active.iter().map(|s| s.pending).collect();
        let outcome = {
            let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
            catch_unwind(AssertUnwindSafe(|| {
                self.model.forward_batch(&mut caches, &tokens)
            }))
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .sequence_steps
            .fetch_add(active.len(), Ordering::Relaxed);
        match outcome {
            Ok(Ok(logits)) => {
                for (sequence, logits) in active.iter_mut().zip(logits) {
                    advance_guarded(sequence, logits);
                }
            }
            Ok(Err(err)) => {
                let message = format!("a decode step failed: {err:#}");
                active.iter_mut().for_each(|s| s.fail(message.clone()));
            }
            Err(_) => active
                .iter_mut()
                .for_each(|s| s.fail("the engine panicked in a decode step".into())),
        }
    }
}

/// [`Sequence::advance`], with a panic (a bug in sampling or detokenising) failing that one
/// request instead of ending the scheduler thread and with it every other request.
fn advance_guarded(sequence: &mut Sequence, logits: Vec<f32>) {
    if catch_unwind(AssertUnwindSafe(|| sequence.advance(logits))).is_err() {
        sequence.fail("the server failed choosing the next token (a bug: please report it)".into());
    }
}
