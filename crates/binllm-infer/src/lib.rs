//! binllm-infer: the pure-Rust runtime. It owns the LLaMA-family forward pass on packed
//! 1-bit weights (no libtorch), its KV cache and threads, generation with token sampling and
//! the chat loop's prompt handling, the scorer `binllm eval` uses on packed models, and the
//! PTQ sign model used by tests and benchmarks.
//!
//! | module | holds |
//! |---|---|
//! | [`model`] | the forward pass, top to bottom: [`Model`], its layers, [`KvCache`] |
//! | [`linear`] | the matrices split by rows across the threads: 1-bit linear stacks, the dense embedding and head |
//! | `threads` | the thread team: the only threading in binllm's CPU path (the kernels are single-threaded) |
//! | [`generate`], [`sampling`] | generation and token sampling (the libtorch engine samples with these too) |
//! | [`scorer`] | [`PackedScorer`], the runtime behind `binllm eval`'s scoring trait |
//! | [`ptq`] | the PTQ sign model (sign(W), mean\|W\| row scales) |
//!
//! The sampler here is also used by the libtorch engine, so both engines pick tokens the
//! same way.

pub mod generate;
pub mod linear;
pub mod model;
pub mod ptq;
pub mod sampling;
pub mod scorer;
mod threads;

pub use binllm_kernels::{DenseKernel, Kernel};
pub use linear::default_head_kernel;
pub use model::{KvCache, Model, RuntimeOptions};
pub use scorer::PackedScorer;
