//! [`PretrainedModel`]: the one in-memory description every reader fills, and the format
//! detection behind [`PretrainedModel::load`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::names::{self, ParamGroup};
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
    /// Loads a Hugging Face directory, a GGUF file or a llama2.c checkpoint, detected from
    /// what is at `path`.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        let format = detect_format(path)?;
        let model = match format {
            SourceFormat::HuggingFace => crate::hf::read_dir(path, options)?,
            SourceFormat::Gguf => crate::gguf::read_model(path, options)?,
            SourceFormat::Llama2c => crate::llama2c::read_model(path, options)?,
        };
        // A Hugging Face directory's config lives in its own file: name that file.
        let config_file = match format {
            SourceFormat::HuggingFace => path.join("config.json"),
            _ => path.to_path_buf(),
        };
        model
            .config
            .validate()
            .with_context(|| format!("{}: inconsistent model config", config_file.display()))?;
        names::check_tensors(&model.config, &model.tensors).with_context(|| {
            format!(
                "{}: config disagrees with the tensors",
                config_file.display()
            )
        })?;
        if let Some(tok) = &model.tokenizer {
            if tok.vocab_size() > model.config.vocab_size {
                bail!(
                    "{}: tokenizer has {} tokens but the model's vocabulary is {}",
                    path.display(),
                    tok.vocab_size(),
                    model.config.vocab_size
                );
            }
        }
        Ok(model)
    }

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

/// Decides the format from the path: a directory is Hugging Face, a file starting with the
/// GGUF magic is GGUF, any other file is tried as a llama2.c checkpoint.
pub fn detect_format(path: &Path) -> Result<SourceFormat> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot open model (does it exist?)", path.display()))?;
    if meta.is_dir() {
        return Ok(SourceFormat::HuggingFace);
    }
    // Any other file would be tried as a llama2.c checkpoint, whose error would not say what
    // went wrong: a file of a Hugging Face directory given instead of the directory.
    if path
        .extension()
        .is_some_and(|e| e == "safetensors" || e == "json")
    {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        bail!(
            "{}: not a model file on its own: a Hugging Face model is loaded from its directory (pass {})",
            path.display(),
            dir.map_or_else(|| ".".into(), |d| d.display().to_string())
        );
    }
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let n = file
        .read(&mut magic)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if n == 4 && &magic == b"GGUF" {
        Ok(SourceFormat::Gguf)
    } else {
        Ok(SourceFormat::Llama2c)
    }
}
