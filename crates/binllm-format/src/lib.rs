//! binllm-format owns every byte binllm reads or writes: Hugging Face directories
//! (config.json + safetensors + tokenizer.json), GGUF (with ggml's dequantisation),
//! llama2.c checkpoints and tokenizers, chat templates, and the packed 1-bit container.
//!
//! Every reader fills the same [`PretrainedModel`]: one [`ModelConfig`], tensors under their
//! Hugging Face names in Hugging Face layout (see [`names`]), an optional tokenizer and chat
//! template. Whatever the source format, the model math downstream sees one description.
//!
//! | module | holds |
//! |---|---|
//! | [`pretrained`] | [`PretrainedModel`], what every reader fills |
//! | [`detect`] | which format a path holds; [`PretrainedModel::load`] |
//! | [`hf`], [`gguf`], [`llama2c`] | the readers (GGUF: [`gguf::file`] reads the file, [`gguf::mapping`] maps it to a model, [`gguf::dequant`] the ggml types) |
//! | [`config`], [`names`], [`tensor`] | the model config, canonical tensor names and shapes, host tensors |
//! | [`tokenizer`], [`chat`] | tokenizers and chat templates |
//! | [`packed`] | the packed 1-bit file: [`packed::container`], [`packed::blocks`], [`mod@packed::export`] |
//! | [`atomic`] | writing a file so that a crash leaves the old one or the new one |
//!
//! The quantized block formats the packed file stores (sign bits, q8_0, q4_0) are
//! binllm-kernels' types, so the file and the products agree by construction.
//!
//! Pure Rust: no libtorch, so the packed runtime can depend on it.

pub mod atomic;
pub mod chat;
pub mod config;
pub mod detect;
pub mod gguf;
pub mod hf;
pub mod llama2c;
pub mod names;
pub mod packed;
pub mod pretrained;
pub mod tensor;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use pretrained::{LoadOptions, PretrainedModel, SourceFormat};
pub use tensor::{DType, HostTensor, TensorData, TensorMap};
pub use tokenizer::{TextTokenizer, TokenizerKind};
