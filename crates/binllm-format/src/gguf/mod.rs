//! GGUF v2/v3 files: llama.cpp's single-file format, read and written.
//!
//! - [`mod@file`]: reading the container ([`GgufFile`]: header, metadata, tensor infos, data
//!   offsets), checked against the bytes that are there; [`write`]: writing one
//!   ([`GgufWriter`]).
//! - [`mapping`]: turning a llama / mistral / qwen2 / qwen3 GGUF into a
//!   [`crate::PretrainedModel`] ([`read_model`]).
//! - [`dequant`]: ggml's tensor types back to floats; [`tokenizer`]: the tokenizer built from
//!   the metadata, [`tokenizer_write`] the other way.
//! - [`sign_blocks`]: the low-bit block types that hold sign matrices (Q1_0, Q2_0, TQ1_0,
//!   TQ2_0, Q4_0 as ±d): their layouts, encoding and decoding, in one place.
//! - [`mod@export`]: an exported 1-bit model as a GGUF llama.cpp runs ([`write_gguf`]);
//!   [`packed`]: such a file read back straight into the 1-bit kernels' layout
//!   ([`read_packed`]).

pub mod dequant;
pub mod export;
pub mod file;
pub mod mapping;
pub mod packed;
pub mod sign_blocks;
pub mod tokenizer;
pub mod tokenizer_write;
pub mod write;

pub use dequant::GgmlType;
pub use export::{write_gguf, GgufExportReport};
pub use file::{GgufFile, MetaArray, MetaValue, TensorInfo};
pub use mapping::read_model;
pub use packed::{is_sign_gguf, read_packed};
pub use sign_blocks::SignBlockType;
pub use write::GgufWriter;
