//! binllm-testing: what binllm's tests share, in one place and out of the libraries (a
//! dev-dependency only; never published).
//!
//! - [`shared`]: where the tests find what the repository does not hold: `../shared` beside
//!   the clone (stories260K, the corpora and evaluation data; CI has it there) and the default
//!   model `scripts/setup.sh` unpacks into `models/`.
//! - [`synthetic`]: deterministic synthetic weights for tiny models (binllm commits no
//!   weights), and the reader of the reference fixtures in `tests/fixtures/reference/`.
//! - [`language_model`]: a bigram model whose every number can be recomputed, a character
//!   tokenizer for it, and the consistency check any engine's [`binllm_eval::LanguageModel`]
//!   can be held to.
//! - [`mod@reference`]: a float64 forward pass of a Llama-family model from its float tensors,
//!   the packed runtime's reference where libtorch is not at hand.

pub mod language_model;
pub mod reference;
pub mod shared;
pub mod synthetic;
