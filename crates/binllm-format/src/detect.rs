//! Which format a path holds (the one place that sniffs files), and
//! [`PretrainedModel::load`], which reads it with that format's reader and checks the result:
//! config against tensors, tokenizer against vocabulary.

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
/// GGUF magic is GGUF, any other file is tried as a llama2.c checkpoint. A binllm packed file
/// is refused here: it is not a pretrained model, and its own reader names its damage.
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
    if is_packed_container(path) {
        bail!(
            "{}: a binllm packed model (.b1), not a pretrained model: this command takes a Hugging Face directory, a GGUF file or a llama2.c checkpoint (`binllm run`, `bench`, `eval` and `inspect` take packed files)",
            path.display()
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

/// How much of a packed file's header [`looks_packed`] searches for binllm's format key.
const PACKED_SNIFF_BYTES: u64 = 64 << 20;

/// Whether [`crate::packed::PackedModel::read_parts`] takes `path`: a packed container (see
/// [`is_packed_container`]) or a GGUF whose block linears are 1-bit (`binllm export --format
/// gguf`).
pub fn is_packed_file(path: &Path) -> bool {
    crate::gguf::is_sign_gguf(path) || is_packed_container(path)
}

/// Whether `path` is binllm's packed container: named `*.b1`, or its first bytes say so
/// (see [`looks_packed`]). Either way its reader, not another format's, speaks about its
/// damage.
pub fn is_packed_container(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    if path.extension().is_some_and(|e| e == "b1") && file.metadata().is_ok_and(|m| m.is_file()) {
        return true;
    }
    let mut prefix = Vec::new();
    let mut reader = file.take(8);
    if reader.read_to_end(&mut prefix).is_err() || prefix.len() < 8 {
        return false;
    }
    let mut header_len = [0u8; 8];
    header_len.copy_from_slice(&prefix);
    let header_len = u64::from_le_bytes(header_len).min(PACKED_SNIFF_BYTES);
    let mut reader = reader.into_inner().take(header_len);
    if reader.read_to_end(&mut prefix).is_err() {
        return false;
    }
    looks_packed(&prefix)
}

/// Whether these leading bytes are a packed file's: safetensors' 8-byte header length, a
/// JSON object, and binllm's format key in it. Lenient on purpose: a damaged or truncated
/// packed file is still recognised, so the packed reader (not another format's) says what
/// is wrong with it.
pub fn looks_packed(prefix: &[u8]) -> bool {
    const KEY: &[u8] = b"\"binllm.format\"";
    prefix.len() > 8 && prefix[8] == b'{' && prefix[8..].windows(KEY.len()).any(|w| w == KEY)
}

/// What a file that is not a packed model holds, in words for an error message.
pub fn describe_other_format(path: &Path) -> String {
    match detect_format(path) {
        Ok(SourceFormat::HuggingFace) => "a directory (a Hugging Face model?)".into(),
        Ok(SourceFormat::Gguf) => "a GGUF file".into(),
        Ok(SourceFormat::Llama2c) => "a llama2.c checkpoint or another kind of file".into(),
        Err(_) => "not a binllm packed model".into(),
    }
}
