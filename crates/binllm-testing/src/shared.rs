//! Paths the tests read outside the crate under test: the repository's root, `../shared`
//! beside it and the models there, and the default model in `models/`.

use std::path::PathBuf;

use binllm_format::{LoadOptions, PretrainedModel};

/// The repository's root (this crate is `crates/binllm-testing`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `rel` under `../shared`, the models and data beside the repository (CI has them there).
pub fn shared(rel: &str) -> PathBuf {
    repo_root().join("../shared").join(rel)
}

/// The evaluation data sets (`../shared/data/eval`).
pub fn eval_data_dir() -> PathBuf {
    shared("data/eval")
}

/// The stories260K directory: a 260K-parameter Llama checkpoint and its tokenizers.
pub fn stories260k_dir() -> PathBuf {
    shared("models/stories260K")
}

/// stories260K with the tokenizer the llama2.c reader finds beside it (`tok512.model`).
pub fn stories260k() -> PretrainedModel {
    PretrainedModel::load(
        &stories260k_dir().join("stories260K.bin"),
        &LoadOptions::default(),
    )
    .expect("stories260K must sit in ../shared/models beside the repository")
}

/// stories260K with llama2.c's own tokenizer file, `tok512.bin` (what `binllm export --ptq
/// --tokenizer tok512.bin` reads).
pub fn stories260k_with_tok512_bin() -> PretrainedModel {
    let dir = stories260k_dir();
    PretrainedModel::load(
        &dir.join("stories260K.bin"),
        &LoadOptions {
            tokenizer: Some(dir.join("tok512.bin")),
        },
    )
    .expect("stories260K must sit in ../shared/models beside the repository")
}

/// The default model, SmolLM2-135M-Instruct as Q4_1 GGUF (`scripts/setup.sh` unpacks it).
pub fn smollm2_gguf() -> PathBuf {
    repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The reference fixtures that `tools/reference/forward_fixtures.py` wrote
/// (`tests/fixtures/reference/`).
pub fn reference_fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures/reference")
}
