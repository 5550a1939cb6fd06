//! GGUF v2/v3 files: llama.cpp's single-file format.
//!
//! - [`mod@file`]: reading the container ([`GgufFile`]: header, metadata, tensor infos, data
//!   offsets), checked against the bytes that are there.
//! - [`mapping`]: turning a llama / mistral / qwen2 / qwen3 GGUF into a
//!   [`crate::PretrainedModel`] ([`read_model`]).
//! - [`dequant`]: ggml's tensor types back to floats; [`tokenizer`]: the tokenizer built from
//!   the metadata.

pub mod dequant;
pub mod file;
pub mod mapping;
pub mod tokenizer;

pub use dequant::GgmlType;
pub use file::{GgufFile, MetaArray, MetaValue, TensorInfo};
pub use mapping::read_model;
