//! A llama / mistral / qwen2 / qwen3 GGUF as a [`PretrainedModel`]: the config from the
//! `{arch}.*` metadata, tensors renamed to Hugging Face names with dimensions reversed to
//! row-major `[out, in]`, the q/k rows of llama-family models un-permuted back to the
//! rotate-half RoPE layout, the tokenizer built from metadata (or given), the chat template.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::file::{file_type_name, GgufFile, MetaArray, MetaValue};
use super::tokenizer;
use crate::names::{self, BlockLinear};
use crate::pretrained::{LoadOptions, PretrainedModel, SourceFormat};
use crate::tensor::{interleaved_to_rotate_half, TensorData, TensorMap};
use crate::{Architecture, ModelConfig, TextTokenizer};

/// Reads a llama / mistral / qwen2 / qwen3 GGUF into canonical names and layout.
pub fn read_model(path: &Path, options: &LoadOptions) -> Result<PretrainedModel> {
    let file = GgufFile::open(path)?;
    let mut config = model_config(&file)?;
    let architecture = config.architecture;

    let mut notes = vec![format!(
        "GGUF v{}, file type {}, {} tensors",
        file.version,
        file.get("general.file_type")
            .and_then(MetaValue::as_u64)
            .map(|id| file_type_name(id)
                .map(str::to_string)
                .unwrap_or_else(|| format!("#{id}")))
            .unwrap_or_else(|| "unspecified".into()),
        file.type_counts()
            .iter()
            .map(|(name, n)| format!("{n} {name}"))
            .collect::<Vec<_>>()
            .join(" / ")
    )];
    if let Some(name) = file.get("general.name").and_then(MetaValue::as_str) {
        notes.push(format!("model name: {name}"));
    }
    if permutes_qk(architecture) {
        notes.push(
            "q/k projection rows un-permuted from llama.cpp's interleaved RoPE order to rotate-half"
                .into(),
        );
    }

    let tokenizer = match &options.tokenizer {
        Some(p) => Some(read_external_tokenizer(p, config.vocab_size)?),
        None => {
            let built = tokenizer::from_metadata(&file)
                .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
            notes.extend(built.notes);
            built.tokenizer
        }
    };
    // SentencePiece vocabularies without explicit ids get llama.cpp's defaults from the
    // tokenizer; the config should agree with it.
    if let Some(tok) = &tokenizer {
        if config.bos_token_id.is_none() {
            config.bos_token_id = tok.bos_id;
        }
        if config.eos_token_ids.is_empty() {
            config.eos_token_ids = tok.eos_ids.clone();
        }
    }
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(str::to_string);
    let tensors = read_tensors(&file, &config)?;

    Ok(PretrainedModel {
        config,
        tensors,
        tokenizer,
        chat_template,
        format: SourceFormat::Gguf,
        path: path.to_path_buf(),
        notes,
    })
}

/// The architecture (`general.architecture`) and the config from the `{arch}.*` metadata.
pub(super) fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    let path = &file.path;
    let arch_name = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| {
            anyhow!(
                "{}: GGUF metadata has no string 'general.architecture'",
                path.display()
            )
        })?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => bail!(
            "{}: GGUF architecture '{other}' is not supported (supported: llama, mistral, qwen2, qwen3)",
            path.display()
        ),
    };
    read_config(file, arch_name, architecture)
        .with_context(|| format!("{}: unusable GGUF model metadata", path.display()))
}

fn read_external_tokenizer(path: &Path, vocab_size: usize) -> Result<TextTokenizer> {
    if path.extension().is_some_and(|e| e == "json") {
        TextTokenizer::from_json_file(path)
    } else {
        crate::llama2c::read_tokenizer(path, vocab_size)
    }
}

/// llama.cpp's converter permutes q/k rows into the interleaved order its NORM RoPE
/// expects for these architectures; qwen2/qwen3 use NEOX RoPE (rotate-half) and are stored
/// as Hugging Face has them.
pub(super) fn permutes_qk(architecture: Architecture) -> bool {
    matches!(architecture, Architecture::Llama | Architecture::Mistral)
}

fn read_config(file: &GgufFile, arch: &str, architecture: Architecture) -> Result<ModelConfig> {
    let key = |k: &str| format!("{arch}.{k}");
    let get = |k: &str| file.get(&key(k));
    // Some files store per-layer values as arrays; uniform ones are fine.
    let count = |k: &str| -> Result<Option<usize>> {
        let Some(v) = get(k) else { return Ok(None) };
        if let Some(n) = v.as_u64() {
            return Ok(Some(n as usize));
        }
        let per_layer = v.as_array().and_then(MetaArray::to_i64_vec);
        match per_layer.as_deref() {
            Some([first, rest @ ..]) if *first >= 0 && rest.iter().all(|x| x == first) => {
                Ok(Some(*first as usize))
            }
            Some(_) => bail!("'{}' varies per layer, which is not supported", key(k)),
            None => bail!(
                "'{}' should be an integer, got {} {}",
                key(k),
                v.type_name(),
                v.summary()
            ),
        }
    };
    let required = |k: &str| -> Result<usize> {
        count(k)?.ok_or_else(|| anyhow!("missing metadata key '{}'", key(k)))
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("'{}' should be a number, got {}", key(k), v.type_name())),
        }
    };

    let hidden_size = required("embedding_length")?;
    let num_layers = required("block_count")?;
    let num_heads = required("attention.head_count")?;
    let num_kv_heads = count("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 {
        bail!("'{}' is 0", key("attention.head_count"));
    }
    let head_dim = count("attention.key_length")?.unwrap_or(hidden_size / num_heads);
    if let Some(v) = count("attention.value_length")? {
        if v != head_dim {
            bail!("value head size {v} differs from key head size {head_dim}: not supported");
        }
    }
    if let Some(rope_dims) = count("rope.dimension_count")? {
        if rope_dims != head_dim {
            bail!(
                "RoPE covers {rope_dims} of {head_dim} head dimensions (partial rotary): not supported"
            );
        }
    }
    if let Some(kind) = get("rope.scaling.type").and_then(MetaValue::as_str) {
        if kind != "none" {
            bail!("RoPE scaling '{kind}' is not supported");
        }
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        bail!(
            "the file carries 'rope_freqs.weight' (Llama 3.1-style RoPE frequency scaling baked \
             into a tensor), which binllm does not support: the scaling parameters cannot be \
             recovered exactly from it; load the Hugging Face checkpoint instead"
        );
    }
    let embed = file
        .tensor_info(GGUF_EMBED)
        .ok_or_else(|| anyhow!("the file has no '{GGUF_EMBED}' tensor"))?;
    let vocab_size = embed.shape()[0];
    let token_id = |k: &str| -> Result<Option<u32>> {
        let key = format!("tokenizer.ggml.{k}");
        match file.get(&key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(id) if id < vocab_size as u64 => Ok(Some(id as u32)),
                _ => bail!(
                    "{key} = {} is not a token id (the vocabulary has {vocab_size} rows)",
                    v.summary()
                ),
            },
        }
    };
    let mut eos_token_ids = Vec::new();
    for k in ["eos_token_id", "eot_token_id", "eom_token_id"] {
        if let Some(id) = token_id(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    Ok(ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            anyhow!(
                "missing metadata key '{}'",
                key("attention.layer_norm_rms_epsilon")
            )
        })?,
        rope_theta: float("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling: None,
        max_position_embeddings: required("context_length")?,
        tie_word_embeddings: file.tensor_info(GGUF_HEAD).is_none(),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        qk_norm: file.tensor_info(&LayerNorm::Q.gguf_name(0)).is_some(),
        bos_token_id: token_id("bos_token_id")?,
        eos_token_ids,
    })
}

/// GGUF's names of the tensors outside the layers. With [`gguf_linear_name`] and
/// [`LayerNorm`] they are the one table of GGUF names that the float reader, the packed reader
/// and the writer share.
pub(super) const GGUF_EMBED: &str = "token_embd.weight";
pub(super) const GGUF_HEAD: &str = "output.weight";
pub(super) const GGUF_FINAL_NORM: &str = "output_norm.weight";

/// A norm vector inside a layer, under its GGUF and its canonical (Hugging Face) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayerNorm {
    /// Before attention (`input_layernorm`).
    Attn,
    /// Before the MLP (`post_attention_layernorm`).
    Mlp,
    /// Per-head norm of the queries (Qwen3-style `qk_norm` models only).
    Q,
    /// Per-head norm of the keys (`qk_norm` models only).
    K,
}

impl LayerNorm {
    pub(super) const ALL: [LayerNorm; 4] =
        [LayerNorm::Attn, LayerNorm::Mlp, LayerNorm::Q, LayerNorm::K];

    /// The GGUF module (`attn_norm`, ...), without `blk.N.` and `.weight`.
    fn gguf_module(self) -> &'static str {
        match self {
            LayerNorm::Attn => "attn_norm",
            LayerNorm::Mlp => "ffn_norm",
            LayerNorm::Q => "attn_q_norm",
            LayerNorm::K => "attn_k_norm",
        }
    }

    /// `blk.N.attn_norm.weight`, ...
    pub(super) fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.gguf_module())
    }

    pub(super) fn canonical_name(self, layer: usize) -> String {
        match self {
            LayerNorm::Attn => names::attn_norm(layer),
            LayerNorm::Mlp => names::mlp_norm(layer),
            LayerNorm::Q => names::q_norm(layer),
            LayerNorm::K => names::k_norm(layer),
        }
    }

    /// Its length in a model of `config`, or `None` where the model has no such norm.
    pub(super) fn width(self, config: &ModelConfig) -> Option<usize> {
        match self {
            LayerNorm::Attn | LayerNorm::Mlp => Some(config.hidden_size),
            LayerNorm::Q | LayerNorm::K => config.qk_norm.then_some(config.head_dim),
        }
    }
}

/// The GGUF name of a block linear's module in layer `layer` (`blk.N.attn_q`, ...), without
/// the `.weight` / `.bias` suffix.
pub(super) fn gguf_linear_name(layer: usize, which: BlockLinear) -> String {
    let module = match which {
        BlockLinear::Q => "attn_q",
        BlockLinear::K => "attn_k",
        BlockLinear::V => "attn_v",
        BlockLinear::O => "attn_output",
        BlockLinear::Gate => "ffn_gate",
        BlockLinear::Up => "ffn_up",
        BlockLinear::Down => "ffn_down",
    };
    format!("blk.{layer}.{module}")
}

/// Which RoPE permutation a tensor needs undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rope {
    None,
    Query,
    Key,
}

/// The canonical (Hugging Face) name of a GGUF tensor, or `None` for names outside the
/// llama family.
fn canonical_name(gguf_name: &str, num_layers: usize) -> Option<(String, Rope)> {
    match gguf_name {
        GGUF_EMBED => return Some((names::EMBED.into(), Rope::None)),
        GGUF_FINAL_NORM => return Some((names::FINAL_NORM.into(), Rope::None)),
        GGUF_HEAD => return Some((names::LM_HEAD.into(), Rope::None)),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer_text, part) = rest.split_once('.')?;
    let layer: usize = layer_text.parse().ok()?;
    if layer >= num_layers || layer.to_string() != layer_text {
        return None;
    }
    let (module, kind) = part.rsplit_once('.')?;
    let linear = |l: BlockLinear| match kind {
        "weight" => Some(names::linear_weight(layer, l)),
        "bias" => Some(names::linear_bias(layer, l)),
        _ => None,
    };
    if let Some(norm) = LayerNorm::ALL
        .into_iter()
        .find(|n| n.gguf_module() == module)
    {
        return (kind == "weight").then(|| (norm.canonical_name(layer), Rope::None));
    }
    let name = match module {
        "attn_q" => return Some((linear(BlockLinear::Q)?, Rope::Query)),
        "attn_k" => return Some((linear(BlockLinear::K)?, Rope::Key)),
        "attn_v" => linear(BlockLinear::V)?,
        "attn_output" => linear(BlockLinear::O)?,
        "ffn_gate" => linear(BlockLinear::Gate)?,
        "ffn_up" => linear(BlockLinear::Up)?,
        "ffn_down" => linear(BlockLinear::Down)?,
        _ => return None,
    };
    Some((name, Rope::None))
}

fn read_tensors(file: &GgufFile, config: &ModelConfig) -> Result<TensorMap> {
    let path = file.path.display();
    let mut tensors = TensorMap::new();
    for info in &file.tensors {
        let (name, rope) = canonical_name(&info.name, config.num_layers).ok_or_else(|| {
            anyhow!(
                "{path}: tensor '{}' is not part of a {} model with {} layers",
                info.name,
                config.architecture,
                config.num_layers
            )
        })?;
        let mut tensor = file.read_tensor(info)?;
        let heads = match rope {
            Rope::Query => config.num_heads,
            Rope::Key => config.num_kv_heads,
            Rope::None => 0,
        };
        if heads > 0 && permutes_qk(config.architecture) {
            let rows = tensor.shape[0];
            if rows != heads * config.head_dim {
                bail!(
                    "{path}: tensor '{}' has {rows} rows, but {heads} heads of {} imply {}",
                    info.name,
                    config.head_dim,
                    heads * config.head_dim
                );
            }
            let cols = tensor.shape.get(1).copied().unwrap_or(1);
            let (heads, head_dim) = (heads, config.head_dim);
            tensor.data = match &tensor.data {
                TensorData::F32(w) => {
                    TensorData::F32(interleaved_to_rotate_half(w, heads, head_dim, cols))
                }
                TensorData::F16(w) => {
                    TensorData::F16(interleaved_to_rotate_half(w, heads, head_dim, cols))
                }
                TensorData::BF16(w) => {
                    TensorData::BF16(interleaved_to_rotate_half(w, heads, head_dim, cols))
                }
            };
        }
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}
