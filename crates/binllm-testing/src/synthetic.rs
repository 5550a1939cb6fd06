//! Deterministic synthetic weights for tiny models, and the reader for the reference fixtures
//! in `tests/fixtures/reference/`.
//!
//! binllm commits no weights, not even random tiny ones. A tiny model is its `config.json`
//! plus this generator: [`write_hf_dir`] recreates the Hugging Face directory that
//! `tools/reference/forward_fixtures.py` built with transformers, bit for bit, and the
//! fixture records per-tensor digests to prove it.
//!
//! # The generator (`binllm-synthetic-v1`)
//!
//! For element `index` (row-major, 0-based) of the tensor named `name` (its Hugging Face
//! name):
//!
//! 1. `seed = fnv1a64(utf8(name))` (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`);
//! 2. `bits = splitmix64_output(seed, index)`: `z = seed + (index + 1) * 0x9e3779b97f4a7c15`,
//!    `z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9`, `z = (z ^ z >> 27) * 0x94d049bb133111eb`,
//!    `bits = z ^ z >> 31` (wrapping u64), i.e. output `index` of the splitmix64 stream;
//! 3. `u = ((bits >> 40) - 2^23) * 2^-23`: uniform on `[-1, 1)` on a 2^-23 grid, exact in f32;
//! 4. `value = offset + scale * u`, two f32 roundings (no fused multiply-add), where
//!    `(offset, scale)` is [`SyntheticInit::for_tensor`]: `(1, 0.1)` for names ending in
//!    `norm.weight`, `(0, 0.1)` for `.bias`, `(0, 0.2)` otherwise.
//!
//! `scale` is the half-width of the uniform, not its standard deviation (`scale / sqrt(3)`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use binllm_format::hf::{le_values, parse_config};
use binllm_format::names::expected_tensors;
use binllm_format::{
    Architecture, HostTensor, ModelConfig, PretrainedModel, SourceFormat, TensorMap,
};

/// Recorded in fixtures; bump it (in the Python script too) if the definition changes.
pub const GENERATOR_ID: &str = "binllm-synthetic-v1";

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// Output number `index` (0-based) of the splitmix64 stream seeded with `seed`.
pub fn splitmix64_output(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(SPLITMIX_GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uniform_from_bits(bits: u64) -> f32 {
    // 24 bits: |k| <= 2^23 converts exactly and the power-of-two scale is exact.
    let k = (bits >> 40) as i32 - (1 << 23);
    k as f32 * (1.0 / 8_388_608.0)
}

/// Element `index` of tensor `name` as a uniform on `[-1, 1)`.
pub fn synthetic_uniform(name: &str, index: usize) -> f32 {
    uniform_from_bits(splitmix64_output(fnv1a64(name.as_bytes()), index as u64))
}

/// `scale * synthetic_uniform(name, index)`, in f32.
pub fn synthetic_value(name: &str, index: usize, scale: f32) -> f32 {
    scale * synthetic_uniform(name, index)
}

/// How a tensor's uniforms become weights: `offset + scale * u`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticInit {
    pub offset: f32,
    pub scale: f32,
}

impl SyntheticInit {
    /// The rule both implementations share, from the tensor's Hugging Face name.
    pub fn for_tensor(name: &str) -> SyntheticInit {
        if name.ends_with("norm.weight") {
            // Around 1 but not 1, so a forward that skips a norm weight fails.
            SyntheticInit {
                offset: 1.0,
                scale: 0.1,
            }
        } else if name.ends_with(".bias") {
            SyntheticInit {
                offset: 0.0,
                scale: 0.1,
            }
        } else {
            SyntheticInit {
                offset: 0.0,
                scale: 0.2,
            }
        }
    }

    pub fn apply(self, uniform: f32) -> f32 {
        self.offset + self.scale * uniform
    }
}

/// The tensor `name` with `shape`, filled by the generator under [`SyntheticInit::for_tensor`].
pub fn synthetic_tensor(name: &str, shape: &[usize]) -> HostTensor {
    let init = SyntheticInit::for_tensor(name);
    let seed = fnv1a64(name.as_bytes());
    let numel: usize = shape.iter().product();
    let values = (0..numel as u64)
        .map(|i| init.apply(uniform_from_bits(splitmix64_output(seed, i))))
        .collect();
    HostTensor::from_f32(shape.to_vec(), values)
}

/// Every tensor `config` calls for (see [`binllm_format::names::expected_tensors`]), synthetic.
pub fn synthetic_tensors(config: &ModelConfig) -> TensorMap {
    expected_tensors(config)
        .into_iter()
        .map(|(name, shape)| {
            let tensor = synthetic_tensor(&name, &shape);
            (name, tensor)
        })
        .collect()
}

/// Gives block `block` of row 0 of the Q1_0 tensor `tensor` in the GGUF at `path` the f16
/// scale `scale` (its little-endian bytes), in place: llama.cpp's own Q1_0 files have a
/// scale per block of 128, binllm's one per row. Returns the file offset of the tensor's
/// data.
pub fn set_q1_0_block_scale(path: &Path, tensor: &str, block: usize, scale: [u8; 2]) -> usize {
    let file = binllm_format::gguf::GgufFile::open(path).expect("a GGUF");
    let info = file.tensor_info(tensor).expect("the tensor").clone();
    let at = (file.data_offset + info.offset) as usize;
    drop(file);
    // A Q1_0 block is 18 bytes: the f16 scale, then 128 sign bits.
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at + 18 * block..at + 18 * block + 2].copy_from_slice(&scale);
    std::fs::write(path, &bytes).unwrap();
    at
}

/// A two-layer Llama with synthetic weights, no tokenizer: the shapes a test needs (e.g.
/// widths of multiples of 128 for Q1_0) without a file.
pub fn synthetic_llama(
    hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> PretrainedModel {
    let config = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 320,
        hidden_size,
        intermediate_size,
        num_layers: 2,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    PretrainedModel {
        tensors: synthetic_tensors(&config),
        config,
        tokenizer: None,
        chat_template: None,
        format: SourceFormat::HuggingFace,
        path: "synthetic".into(),
        notes: vec![],
    }
}

/// FNV-1a 64 of the little-endian f32 bytes: the digest fixtures record per tensor.
pub fn tensor_digest(values: &[f32]) -> u64 {
    values.iter().fold(FNV_OFFSET, |h, v| {
        v.to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
    })
}

struct F32View<'a> {
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes a Hugging Face directory for `config_json`: `config.json` as given and a
/// `model.safetensors` (F32, `{"format": "pt"}` metadata, as transformers saves it) holding
/// every tensor the config calls for, synthetic. A tied model gets no `lm_head.weight`.
pub fn write_hf_dir(config_json: &Value, dir: &Path) -> Result<()> {
    let config = parse_config(config_json).context("synthetic model config")?;
    config.validate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let config_path = dir.join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(config_json)? + "\n",
    )
    .with_context(|| format!("{}: cannot write", config_path.display()))?;

    let tensors = synthetic_tensors(&config);
    let views = tensors.iter().map(|(name, tensor)| {
        let view = F32View {
            shape: &tensor.shape,
            bytes: tensor.as_bytes().to_vec(),
        };
        (name.as_str(), view)
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &weights_path)
        .map_err(|e| anyhow!("{}: cannot write: {e}", weights_path.display()))
}

/// Shape and digest of one tensor of the model a synthetic fixture was computed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDigest {
    pub shape: Vec<usize>,
    /// [`tensor_digest`] of the values transformers held after reloading the saved model.
    pub fnv1a64: u64,
}

/// The `k` largest logits of each position, largest first (ties by lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogits {
    pub k: usize,
    /// `[positions, k]`, row-major.
    pub ids: Vec<u32>,
    /// `[positions, k]`, row-major; the float32 logit of `ids` at the same place.
    pub logits: Vec<f32>,
}

/// One prompt of a fixture and what transformers computed for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSequence {
    /// The whole prompt's token ids (may be longer than `positions`).
    pub ids: Vec<u32>,
    /// Rows of `logits`: the logits of positions `0..positions`, from a forward pass over
    /// `ids[..positions]`.
    pub positions: usize,
    /// float32 logits `[positions, columns.len()]`, row-major: column `j` is vocab id
    /// `columns[j]` of the owning [`ReferenceFixture`].
    pub logits: Vec<f32>,
    /// The same logits from a float64 run of the same model (synthetic fixtures only).
    pub logits_f64: Option<Vec<f64>>,
    /// Top-k over the full vocabulary (fixtures that store a column subset).
    pub top: Option<TopLogits>,
    /// Per-position L2 norm of the full float32 logit vector (computed in float64).
    pub l2_norm: Option<Vec<f32>>,
    /// Per-position logsumexp of the full float32 logit vector (computed in float64).
    pub logsumexp: Option<Vec<f32>>,
}

impl ReferenceSequence {
    /// `[positions, columns]` of [`ReferenceSequence::logits`].
    pub fn logits_shape(&self) -> [usize; 2] {
        [self.positions, self.logits.len() / self.positions.max(1)]
    }
}

/// A fixture file written by `tools/reference/forward_fixtures.py`: one safetensors file
/// whose tensors hold ids and logits and whose metadata holds the rest.
#[derive(Debug, Clone)]
pub struct ReferenceFixture {
    /// `tiny_llama_gqa`, `smollm2_135m_instruct_q4_1`, ...
    pub name: String,
    /// `synthetic` (weights from this module's generator) or `gguf` (a real model file).
    pub kind: String,
    /// The model's config.json as transformers wrote it (synthetic: the exact text of the
    /// saved file; gguf: the config transformers derived from the GGUF metadata).
    pub config_json: Value,
    pub vocab_size: usize,
    /// The vocab ids of the stored logit columns: all of `0..vocab_size`, or a strided subset.
    pub columns: Vec<usize>,
    pub sequences: Vec<ReferenceSequence>,
    /// Synthetic fixtures: every tensor of the model's `model.safetensors`, by HF name.
    pub weights_digest: BTreeMap<String, TensorDigest>,
    /// All of the file's metadata (versions, prompts, f32-vs-f64 error, ...).
    pub metadata: BTreeMap<String, String>,
}

impl ReferenceFixture {
    /// The model config the fixture was computed with, parsed as binllm parses config.json.
    pub fn model_config(&self) -> Result<ModelConfig> {
        parse_config(&self.config_json)
    }

    /// Picks the stored columns out of full logits `[positions, vocab_size]`, giving a
    /// vector laid out like [`ReferenceSequence::logits`].
    pub fn select_columns(&self, full_logits: &[f32]) -> Result<Vec<f32>> {
        let rows = full_logits.chunks_exact(self.vocab_size);
        ensure!(
            rows.remainder().is_empty(),
            "{} logits are not whole rows of {}",
            full_logits.len(),
            self.vocab_size
        );
        Ok(rows
            .flat_map(|row| self.columns.iter().map(move |&c| row[c]))
            .collect())
    }
}

/// `||candidate - reference|| / ||reference||`, accumulated in f64.
pub fn relative_l2(reference: &[f32], candidate: &[f32]) -> f64 {
    assert_eq!(
        reference.len(),
        candidate.len(),
        "relative_l2 of different lengths"
    );
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&r, &c) in reference.iter().zip(candidate) {
        diff += (f64::from(c) - f64::from(r)).powi(2);
        norm += f64::from(r).powi(2);
    }
    (diff / norm).sqrt()
}

/// Reads a fixture written by `tools/reference/forward_fixtures.py` and checks that its
/// parts agree in shape.
pub fn read_reference_fixture(path: &Path) -> Result<ReferenceFixture> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    read_fixture_bytes(&bytes).with_context(|| format!("{}: bad reference fixture", path.display()))
}

fn read_fixture_bytes(bytes: &[u8]) -> Result<ReferenceFixture> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
    let meta = |key: &str| -> Result<&str> {
        metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("metadata lacks '{key}'"))
    };

    let config_json: Value = serde_json::from_str(meta("config_json")?)?;
    let vocab_size = config_json
        .get("vocab_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("config_json has no vocab_size"))? as usize;
    let num_sequences: usize = meta("num_sequences")?.parse()?;
    let names: HashSet<&str> = st.names().into_iter().collect();
    let has = |name: &str| names.contains(name);
    let columns = if has("columns") {
        let (_, cols) = read_i64(&st, "columns")?;
        cols.into_iter().map(|c| c as usize).collect()
    } else {
        (0..vocab_size).collect::<Vec<_>>()
    };
    ensure!(
        columns.iter().all(|&c| c < vocab_size),
        "column ids beyond the vocabulary"
    );

    let mut sequences = Vec::with_capacity(num_sequences);
    for i in 0..num_sequences {
        let (_, ids) = read_i64(&st, &format!("ids_{i}"))?;
        let ids: Vec<u32> = ids
            .into_iter()
            .map(|id| u32::try_from(id).map_err(|_| anyhow!("token id {id} out of range")))
            .collect::<Result<_>>()?;
        let (shape, logits) = read_f32(&st, &format!("logits_{i}"))?;
        ensure!(
            shape.len() == 2 && shape[1] == columns.len(),
            "logits_{i} has shape {shape:?}; expected [positions, {}]",
            columns.len()
        );
        let positions = shape[0];
        ensure!(
            positions <= ids.len(),
            "logits_{i} has {positions} positions but the prompt only {} ids",
            ids.len()
        );
        let logits_f64 = if has(&format!("logits_f64_{i}")) {
            let (s, v) = read_f64(&st, &format!("logits_f64_{i}"))?;
            ensure!(
                s == shape,
                "logits_f64_{i} has shape {s:?}, logits_{i} {shape:?}"
            );
            Some(v)
        } else {
            None
        };
        let top = if has(&format!("top_ids_{i}")) {
            let (s, top_ids) = read_i64(&st, &format!("top_ids_{i}"))?;
            let (s2, top_logits) = read_f32(&st, &format!("top_logits_{i}"))?;
            ensure!(
                s.len() == 2 && s[0] == positions && s == s2,
                "top_ids_{i} {s:?} / top_logits_{i} {s2:?} do not match {positions} positions"
            );
            Some(TopLogits {
                k: s[1],
                ids: top_ids.into_iter().map(|v| v as u32).collect(),
                logits: top_logits,
            })
        } else {
            None
        };
        let per_position = |key: String| -> Result<Option<Vec<f32>>> {
            if !has(&key) {
                return Ok(None);
            }
            let (s, v) = read_f32(&st, &key)?;
            ensure!(
                s == [positions],
                "{key} has shape {s:?}, expected [{positions}]"
            );
            Ok(Some(v))
        };
        sequences.push(ReferenceSequence {
            ids,
            positions,
            logits,
            logits_f64,
            top,
            l2_norm: per_position(format!("l2_{i}"))?,
            logsumexp: per_position(format!("logsumexp_{i}"))?,
        });
    }

    let weights_digest = match metadata.get("weights_digest") {
        None => BTreeMap::new(),
        Some(text) => parse_digests(text)?,
    };
    Ok(ReferenceFixture {
        name: meta("fixture")?.to_string(),
        kind: meta("kind")?.to_string(),
        config_json,
        vocab_size,
        columns,
        sequences,
        weights_digest,
        metadata,
    })
}

fn parse_digests(text: &str) -> Result<BTreeMap<String, TensorDigest>> {
    let json: BTreeMap<String, Value> = serde_json::from_str(text)?;
    json.into_iter()
        .map(|(name, entry)| {
            let shape = entry
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("digest of '{name}' has no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow!("digest of '{name}': bad shape"))?;
            let hex = entry
                .get("fnv1a64_le_f32")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("digest of '{name}' has no fnv1a64_le_f32"))?;
            let fnv1a64 = u64::from_str_radix(hex, 16)?;
            Ok((name, TensorDigest { shape, fnv1a64 }))
        })
        .collect()
}

fn tensor_bytes<'a>(
    st: &'a safetensors::SafeTensors<'a>,
    name: &str,
    dtype: safetensors::Dtype,
) -> Result<(Vec<usize>, &'a [u8])> {
    let view = st
        .tensor(name)
        .map_err(|e| anyhow!("tensor '{name}': {e}"))?;
    if view.dtype() != dtype {
        bail!("tensor '{name}' is {:?}, expected {dtype:?}", view.dtype());
    }
    Ok((view.shape().to_vec(), view.data()))
}

fn read_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, bytes) = tensor_bytes(st, name, safetensors::Dtype::F32)?;
    Ok((shape, le_values(bytes, f32::from_le_bytes)))
}

fn read_f64(st: &safetensors::SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let (shape, bytes) = tensor_bytes(st, name, safetensors::Dtype::F64)?;
    Ok((shape, le_values(bytes, f64::from_le_bytes)))
}

fn read_i64(st: &safetensors::SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let (shape, bytes) = tensor_bytes(st, name, safetensors::Dtype::I64)?;
    Ok((shape, le_values(bytes, i64::from_le_bytes)))
}
