//! binllm-infer: the pure-Rust runtime. It owns the LLaMA-family forward pass on packed
//! 1-bit weights (no libtorch), its KV cache, token sampling and the chat loop.
//!
//! The sampler here is also used by the libtorch engine, so both engines pick tokens the
//! same way.

pub mod sampling;
