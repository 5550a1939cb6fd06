//! Hugging Face model directories: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, and the chat template from
//! `tokenizer_config.json` or `chat_template.jinja`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use serde_json::Value;

use crate::names;
use crate::pretrained::{LoadOptions, PretrainedModel, SourceFormat};
use crate::tensor::{HostTensor, TensorData, TensorMap};
use crate::{Architecture, ModelConfig, RopeScaling, TextTokenizer};

pub fn read_dir(dir: &Path, options: &LoadOptions) -> Result<PretrainedModel> {
    let config_path = dir.join("config.json");
    let config_json = read_json(&config_path)?;
    let config = parse_config(&config_json)
        .with_context(|| format!("{}: unusable model config", config_path.display()))?;

    let mut tensors = read_safetensors_dir(dir)?;
    // Old checkpoints carry RoPE buffers; tied checkpoints sometimes repeat the embedding.
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if config.tie_word_embeddings {
        tensors.remove(names::LM_HEAD);
    }

    let tokenizer_path = options
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
    let tokenizer = if tokenizer_path.exists() {
        let mut tok = TextTokenizer::from_json_file(&tokenizer_path)?;
        tok.bos_id = config.bos_token_id.or_else(|| {
            special_token(tokenizer_config.as_ref(), "bos_token").and_then(|t| tok.token_to_id(&t))
        });
        let mut eos: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
        if let Some(t) = special_token(tokenizer_config.as_ref(), "eos_token") {
            eos.extend(tok.token_to_id(&t));
        }
        if let Some(g) = &generation_config {
            eos.extend(token_ids(g.get("eos_token_id")));
        }
        tok.eos_ids = eos.into_iter().collect();
        Some(tok)
    } else {
        None
    };

    let chat_template = read_chat_template(dir, tokenizer_config.as_ref())?;
    let mut notes = Vec::new();
    if let Some(w) = config_json.get("sliding_window").and_then(Value::as_u64) {
        if config.architecture == Architecture::Mistral {
            notes.push(format!(
                "sliding_window {w} is ignored: attention is full-context (exact up to {w} tokens)"
            ));
        }
    }
    Ok(PretrainedModel {
        config,
        tensors,
        tokenizer,
        chat_template,
        format: SourceFormat::HuggingFace,
        path: dir.to_path_buf(),
        notes,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: cannot read (is this a Hugging Face model directory?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Token ids from a JSON value that is a number, a list of numbers, or absent.
fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// A special token from tokenizer_config.json: either a string or `{"content": ...}`.
fn special_token(tokenizer_config: Option<&Value>, key: &str) -> Option<String> {
    match tokenizer_config?.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_chat_template(dir: &Path, tokenizer_config: Option<&Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .with_context(|| format!("{}: cannot read", jinja.display()));
    }
    Ok(
        match tokenizer_config.and_then(|c| c.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        },
    )
}

/// The largest value a size field of config.json may have (2^24).
const MAX_CONFIG_DIM: u64 = 1 << 24;

/// Parses `config.json` into a [`ModelConfig`], applying transformers' defaults.
pub fn parse_config(json: &Value) -> Result<ModelConfig> {
    let model_type = json
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("config.json has no model_type"))?;
    let architecture = match model_type {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            bail!("unsupported architecture '{other}' (supported: llama, mistral, qwen2, qwen3)")
        }
    };
    // Shapes are products of these fields; a bound keeps that arithmetic from overflowing on
    // a corrupt config (the largest real models are far below it).
    let size_field = |key: &str| -> Result<Option<usize>> {
        match json.get(key).and_then(Value::as_u64) {
            None => Ok(None),
            Some(v) if v > MAX_CONFIG_DIM => {
                bail!(
                    "config.json field '{key}' is {v}, implausibly large (limit {MAX_CONFIG_DIM})"
                )
            }
            Some(v) => Ok(Some(v as usize)),
        }
    };
    let usize_field = |key: &str| -> Result<usize> {
        size_field(key)?.ok_or_else(|| anyhow!("config.json is missing the integer field '{key}'"))
    };
    let hidden_size = usize_field("hidden_size")?;
    let num_heads = usize_field("num_attention_heads")?;
    let num_kv_heads = size_field("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = match size_field("head_dim")? {
        Some(d) => d,
        None if num_heads > 0 => hidden_size / num_heads,
        None => bail!("num_attention_heads must be positive"),
    };
    // transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    let rope = json
        .get("rope_parameters")
        .or_else(|| json.get("rope_scaling"))
        .filter(|v| !v.is_null());
    let rope_theta = json
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| {
            rope.and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10000.0);
    let rope_scaling = match rope {
        None => None,
        Some(r) => {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str);
            match kind {
                None | Some("default") => None,
                Some("llama3") => {
                    let f = |k: &str| {
                        r.get(k)
                            .and_then(Value::as_f64)
                            .ok_or_else(|| anyhow!("llama3 rope scaling lacks '{k}'"))
                    };
                    Some(RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?
                            as usize,
                    })
                }
                Some(other) => bail!("unsupported rope scaling type '{other}' (supported: llama3)"),
            }
        }
    };
    let attention_bias = match architecture {
        Architecture::Qwen2 => true,
        _ => json
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok(ModelConfig {
        architecture,
        vocab_size: usize_field("vocab_size")?,
        hidden_size,
        intermediate_size: usize_field("intermediate_size")?,
        num_layers: usize_field("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: json
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings: json
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map_or(2048, |v| v as usize),
        tie_word_embeddings: json
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        attention_bias,
        qk_norm: architecture == Architecture::Qwen3,
        bos_token_id: token_ids(json.get("bos_token_id")).first().copied(),
        eos_token_ids: token_ids(json.get("eos_token_id")),
    })
}

/// The safetensors files of a directory: the shards of `model.safetensors.index.json`, or
/// `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        // Checked here so the error points at the index that names the shard, not only at
        // a file that is not there.
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            bail!(
                "{}: names the shard {}, which is missing",
                index.display(),
                missing.display()
            );
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)",
        dir.display()
    )
}

fn read_safetensors_dir(dir: &Path) -> Result<TensorMap> {
    let mut tensors = TensorMap::new();
    for file in safetensors_files(dir)? {
        read_safetensors_file(&file, &mut tensors)?;
    }
    Ok(tensors)
}

/// Reads every tensor of one safetensors file into `out`.
pub fn read_safetensors_file(path: &Path, out: &mut TensorMap) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: the map is read-only and dropped before this function returns.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot map", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file: {}",
            path.display(),
            safetensors_problem(&mmap, e)
        )
    })?;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let (data, stored_as) = match view.dtype() {
            safetensors::Dtype::F32 => {
                (TensorData::F32(le_values(bytes, f32::from_le_bytes)), "F32")
            }
            safetensors::Dtype::F16 => (
                TensorData::F16(le_values(bytes, |b| f16::from_bits(u16::from_le_bytes(b)))),
                "F16",
            ),
            safetensors::Dtype::BF16 => (
                TensorData::BF16(le_values(bytes, |b| bf16::from_bits(u16::from_le_bytes(b)))),
                "BF16",
            ),
            other => bail!(
                "{}: tensor '{name}' has the unsupported type {other:?} (supported: F32, F16, BF16)",
                path.display()
            ),
        };
        out.insert(
            name.to_string(),
            HostTensor {
                shape,
                data,
                stored_as: stored_as.to_string(),
            },
        );
    }
    Ok(())
}

/// Describes why `bytes` failed to parse as safetensors in terms of the file (the crate's
/// own messages, such as "incomplete metadata, file not fully covered", do not say that a
/// file is truncated).
fn safetensors_problem(bytes: &[u8], err: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let len = bytes.len();
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match (err, header_len) {
        (E::HeaderTooSmall, _) | (_, None) => {
            format!("the file is truncated: {len} bytes, less than the 8-byte header length")
        }
        (E::HeaderTooLarge, Some(n)) => format!(
            "its first 8 bytes claim a {n}-byte header, more than safetensors allows (corrupt header)"
        ),
        (E::InvalidHeaderLength, Some(n)) => format!(
            "its first 8 bytes claim a {n}-byte header but the file has {len} bytes (truncated, or a corrupt header)"
        ),
        (E::MetadataIncompleteBuffer, Some(n)) => match described_len(bytes, n) {
            Some(expected) if expected > len => format!(
                "the file is truncated: {len} bytes, but its header describes {expected}"
            ),
            Some(expected) => format!(
                "{} bytes follow the last tensor (the header describes {expected} bytes)",
                len - expected
            ),
            None => "the tensor data does not match the header".to_string(),
        },
        (E::InvalidHeader(e), _) => format!("corrupt header: not UTF-8 ({e})"),
        (E::InvalidHeaderDeserialization(e), _) => format!("corrupt header: not valid JSON ({e})"),
        (other, _) => format!("corrupt header: {other}"),
    }
}

/// The file length a safetensors header of `header_len` bytes describes: 8 + header + the
/// end of the last tensor's data.
fn described_len(bytes: &[u8], header_len: u64) -> Option<usize> {
    let end = 8usize.checked_add(usize::try_from(header_len).ok()?)?;
    let header: Value = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let data_end = header
        .as_object()?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, info)| info.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    end.checked_add(usize::try_from(data_end).ok()?)
}

/// Decodes little-endian elements of `N` bytes each.
pub fn le_values<T, const N: usize>(bytes: &[u8], decode: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| decode(c.try_into().expect("chunks_exact")))
        .collect()
}
