//! [`PretrainedModel`]: the one in-memory description every reader fills (the readers are
//! [`crate::hf`], [`crate::gguf`] and [`crate::llama2c`]; [`crate::detect`] picks one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::names::ParamGroup;
use crate::{chat, ModelConfig, TensorMap, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    HuggingFace,
    Gguf,
    Llama2c,
}

impl SourceFormat {
    pub fn label(self) -> &'static str {
        match self {
            SourceFormat::HuggingFace => "Hugging Face directory (safetensors)",
            SourceFormat::Gguf => "GGUF",
            SourceFormat::Llama2c => "llama2.c checkpoint",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Tokenizer file to use instead of the one found beside the model (llama2.c needs one:
    /// `tok512.bin`, `tokenizer.bin` or a SentencePiece `.model`).
    pub tokenizer: Option<PathBuf>,
}

/// A pretrained model, loaded exactly: config, tensors under canonical names in canonical
/// layout, tokenizer and chat template when the source has them.
#[derive(Debug)]
pub struct PretrainedModel {
    pub config: ModelConfig,
    pub tensors: TensorMap,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<String>,
    pub format: SourceFormat,
    pub path: PathBuf,
    /// Format-specific facts for `inspect` (GGUF version, file type, ...).
    pub notes: Vec<String>,
}

impl PretrainedModel {
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .with_context(|| format!("{}: the model has no tokenizer", self.path.display()))
    }

    /// Parameter counts by group (block linears, embeddings, head, norms, biases).
    pub fn parameter_counts(&self) -> BTreeMap<ParamGroup, usize> {
        let mut counts = BTreeMap::new();
        for (name, tensor) in &self.tensors {
            *counts.entry(ParamGroup::of(name)).or_insert(0) += tensor.numel();
        }
        counts
    }

    /// How many tensors of each stored type ("Q4_1", "F32", ...).
    pub fn stored_types(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for tensor in self.tensors.values() {
            *counts.entry(tensor.stored_as.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Applies the model's chat template to one user message (plus an optional system one)
    /// and adds the generation prompt.
    pub fn render_chat(&self, messages: &[chat::ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .with_context(|| format!("{}: the model has no chat template", self.path.display()))?;
        let tok = self.tokenizer()?;
        let token_text =
            |id: Option<u32>| id.and_then(|id| tok.id_to_token(id)).unwrap_or_default();
        chat::render(
            template,
            messages,
            true,
            &token_text(tok.bos_id),
            &token_text(tok.eos_ids.first().copied()),
        )
    }
}
