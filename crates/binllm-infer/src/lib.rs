//! binllm-infer: the pure-Rust runtime. It owns the LLaMA-family forward pass on packed
//! 1-bit weights (no libtorch), its KV cache and threads, generation with token sampling and
//! the chat loop's prompt handling, the scorer `binllm eval` uses on packed models, and the
//! PTQ sign model used by tests and benchmarks.
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
pub use model::{KvCache, LoadOptions, Model};
pub use scorer::PackedScorer;
