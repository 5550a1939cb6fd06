//! Which format a path holds, and [`PretrainedModel::load`], which reads it with that
//! format's reader and checks the result: config against tensors, tokenizer against
//! vocabulary.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::names;
use crate::pretrained::{LoadOptions, PretrainedModel, SourceFormat};

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
        // NaN or inf weights would load and generate garbage ("$$$$"): refuse them by name.
        for (name, tensor) in &model.tensors {
            if let Some((index, value)) = tensor.first_non_finite() {
                bail!(
                    "{}: tensor '{name}' holds {value} at element {index}: the weights are damaged",
                    path.display()
                );
            }
        }
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
