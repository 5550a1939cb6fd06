//! The container: a [`PackedModel`] as one safetensors file, its metadata (format name and
//! version, config, provenance, precision, bits per weight, tokenizer, chat template), the
//! checks on what is read and written (a damaged file's error says where the damage is).
//!
//! How each stored thing becomes safetensors tensors is [`super::blocks`]'s.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::f16;
use serde::{Deserialize, Serialize};

use super::blocks::{
    q4_bits_per_weight, q8_bits_per_weight, words_per_row, PackedLinear, QuantTensor, QuantTensors,
    StoredTensor, Q4_STORED_AS, Q8_STORED_AS,
};
use crate::hf::le_values;
use crate::names::{self, BlockLinear};
use crate::tensor::{HostTensor, TensorData, TensorMap};
use crate::{ModelConfig, TextTokenizer};
use binllm_kernels::{Q4Matrix, Q8Matrix};

pub const FORMAT_NAME: &str = "binllm-packed";
/// Version 2 added q8_0 dense tensors (`NAME.q8` + `NAME.q8_scale`) and export provenance;
/// a version-1 file is a valid version-2 file without them, so both are read. Version 3 added
/// q4_0 dense tensors (`NAME.q4` + `NAME.q4_scale`); a file without them is still written as
/// version 2 ([`FORMAT_VERSION_WITHOUT_Q4`]), so older readers keep reading it.
pub const FORMAT_VERSION: u32 = 3;
pub const FORMAT_VERSION_WITHOUT_Q4: u32 = 2;
pub const READABLE_VERSIONS: [u32; 3] = [1, 2, 3];

/// How scale vectors and dense tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub fn label(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

/// Who made the model and how (free-form JSON in the file; these fields are always there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub method: String,
    pub source_model: String,
    #[serde(default)]
    pub details: serde_json::Value,
}

/// Bits per weight, honestly counted (`docs/METHOD.md`): the body (block linears with their
/// vectors) and the whole file's parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BitsPerWeight {
    pub body: f64,
    pub embeddings_and_head: f64,
    pub whole_model: f64,
}

#[derive(Debug, Clone)]
pub struct PackedModel {
    pub config: ModelConfig,
    /// Keyed by (layer, linear).
    pub linears: BTreeMap<(usize, BlockLinear), PackedLinear>,
    /// Embedding, norms, q/k norms, LM head (when untied), under canonical names.
    pub dense: TensorMap,
    pub tokenizer_json: Option<String>,
    pub chat_template: Option<String>,
    pub provenance: Provenance,
    /// Storage of scale vectors and dense tensors when written.
    pub precision: Precision,
}

fn module_prefix(layer: usize, linear: BlockLinear) -> String {
    format!("{}.{}", names::layer_prefix(layer), linear.module())
}

impl PackedModel {
    pub fn tokenizer(&self) -> Result<Option<TextTokenizer>> {
        let Some(json) = &self.tokenizer_json else {
            return Ok(None);
        };
        let mut tok = TextTokenizer::from_json_bytes(json.as_bytes())
            .context("metadata 'binllm.tokenizer': the embedded tokenizer.json is damaged")?;
        tok.bos_id = self.config.bos_token_id;
        tok.eos_ids = self.config.eos_token_ids.clone();
        Ok(Some(tok))
    }

    /// Bits per weight as stored (scales and input scales counted at their precision).
    pub fn bits_per_weight(&self) -> BitsPerWeight {
        let vector_bits = match self.precision {
            Precision::F32 => 32.0,
            Precision::F16 => 16.0,
        };
        let (mut body_weights, mut body_bits) = (0f64, 0f64);
        for l in self.linears.values() {
            body_weights += (l.rows * l.cols) as f64;
            body_bits += (l.rows * l.cols) as f64
                + vector_bits * (l.rows + l.input_scale.as_ref().map_or(0, |v| v.len())) as f64
                + l.block_scales.as_ref().map_or(0, |b| 8 * b.bytes()) as f64;
        }
        let (mut dense_weights, mut dense_bits, mut emb_weights, mut emb_bits) =
            (0f64, 0f64, 0f64, 0f64);
        for (name, t) in &self.dense {
            let bits = if t.stored_as == Q8_STORED_AS && t.shape.len() == 2 {
                q8_bits_per_weight(t.shape[0], t.shape[1])
            } else if t.stored_as == Q4_STORED_AS && t.shape.len() == 2 {
                q4_bits_per_weight(t.shape[0], t.shape[1])
            } else {
                match t.data {
                    // write() stores f32 data at the model's precision.
                    TensorData::F32(_) => vector_bits,
                    _ => 16.0,
                }
            } * t.numel() as f64;
            dense_weights += t.numel() as f64;
            dense_bits += bits;
            if name == names::EMBED || name == names::LM_HEAD {
                emb_weights += t.numel() as f64;
                emb_bits += bits;
            }
        }
        let biases: f64 = self
            .linears
            .values()
            .map(|l| l.bias.as_ref().map_or(0, |b| b.len()) as f64)
            .sum();
        BitsPerWeight {
            body: body_bits / body_weights.max(1.0),
            embeddings_and_head: emb_bits / emb_weights.max(1.0),
            whole_model: (body_bits + dense_bits + vector_bits * biases)
                / (body_weights + dense_weights + biases),
        }
    }

    /// Checks shapes against the config (every linear present, every dense tensor right).
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        for layer in 0..self.config.num_layers {
            for which in BlockLinear::ALL {
                let l = self.linears.get(&(layer, which)).with_context(|| {
                    format!("missing packed linear {}", module_prefix(layer, which))
                })?;
                let [rows, cols] = which.shape(&self.config);
                ensure!(
                    l.rows == rows && l.cols == cols,
                    "{}: {}x{} but the config implies {rows}x{cols}",
                    module_prefix(layer, which),
                    l.rows,
                    l.cols
                );
                ensure!(
                    l.sign_bits.len() == rows * words_per_row(cols),
                    "{}: wrong number of sign words",
                    module_prefix(layer, which)
                );
                ensure!(
                    l.row_scale.len() == rows,
                    "{}: wrong row_scale length",
                    module_prefix(layer, which)
                );
                if let Some(b) = &l.block_scales {
                    b.check(rows, cols)
                        .map_err(|e| anyhow!("{}: {e}", module_prefix(layer, which)))?;
                }
                if let Some(s) = &l.input_scale {
                    ensure!(
                        s.len() == cols,
                        "{}: wrong input_scale length",
                        module_prefix(layer, which)
                    );
                }
                ensure!(
                    l.bias.is_some() == which.has_bias(&self.config),
                    "{}: bias presence disagrees with the config",
                    module_prefix(layer, which)
                );
            }
        }
        let expected = names::expected_tensors(&self.config);
        for (name, shape) in expected.iter().filter(|(n, _)| !n.contains("_proj.")) {
            let t = self
                .dense
                .get(name)
                .with_context(|| format!("missing dense tensor '{name}'"))?;
            ensure!(
                &t.shape == shape,
                "dense tensor '{name}' has shape {:?}, expected {shape:?}",
                t.shape
            );
        }
        Ok(())
    }

    /// Writes the model; dense tensors marked `stored_as == "Q8_0"` or `"Q4_0"` (read from a
    /// quantized file) are quantized again, which gives back the stored tensors (see
    /// [`Q8Matrix::quantize`], [`Q4Matrix::quantize`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        let quantized: QuantTensors = self
            .dense
            .iter()
            .filter(|(_, t)| t.shape.len() == 2)
            .filter_map(|(name, t)| {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let quantized = match t.stored_as.as_str() {
                    Q8_STORED_AS => {
                        QuantTensor::Q8(Q8Matrix::quantize(&t.to_f32_vec(), rows, cols))
                    }
                    Q4_STORED_AS => {
                        QuantTensor::Q4(Q4Matrix::quantize(&t.to_f32_vec(), rows, cols))
                    }
                    _ => return None,
                };
                Some((name.clone(), quantized))
            })
            .collect();
        self.write_with_quantized(path, &quantized)
    }

    /// Writes the model with the dense tensors named in `quantized` stored as those q8_0 / q4_0
    /// tensors. Each must also be in `dense` with `stored_as` `"Q8_0"` / `"Q4_0"` (its
    /// dequantized values), so that the in-memory model, its bits per weight and the file agree.
    pub fn write_with_quantized(&self, path: &Path, quantized: &QuantTensors) -> Result<()> {
        self.validate()
            .context("refusing to write an inconsistent packed model")?;
        if let Some((&(layer, which), l)) =
            self.linears.iter().find(|(_, l)| l.block_scales.is_some())
        {
            bail!(
                "{} has a scale per block of {} columns (read from a GGUF); binllm's packed \
                 format stores one scale per row: keep the model as GGUF (`--format gguf`)",
                module_prefix(layer, which),
                l.block_cols().unwrap_or_default()
            );
        }
        for (name, t) in quantized {
            let d = self.dense.get(name).with_context(|| {
                format!("quantized tensor '{name}' is not a dense tensor of the model")
            })?;
            let (rows, cols) = t.shape();
            ensure!(
                d.stored_as == t.stored_as() && d.shape == [rows, cols],
                "dense tensor '{name}' must be marked {} with shape [{rows}, {cols}] to be written quantized",
                t.stored_as()
            );
            t.check()
                .with_context(|| format!("quantized tensor '{name}'"))?;
        }
        let mut blobs: Vec<StoredTensor> = Vec::new();
        let vector = |values: &[f32]| -> (safetensors::Dtype, Vec<u8>) {
            match self.precision {
                Precision::F32 => (
                    safetensors::Dtype::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                Precision::F16 => (
                    safetensors::Dtype::F16,
                    values
                        .iter()
                        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                        .collect(),
                ),
            }
        };
        for (&(layer, which), l) in &self.linears {
            let prefix = module_prefix(layer, which);
            let words: Vec<u8> = l.sign_bits.iter().flat_map(|w| w.to_le_bytes()).collect();
            blobs.push((
                format!("{prefix}.sign_bits"),
                safetensors::Dtype::U64,
                vec![l.rows, words_per_row(l.cols)],
                words,
            ));
            let (dt, b) = vector(&l.row_scale);
            blobs.push((format!("{prefix}.row_scale"), dt, vec![l.rows], b));
            if let Some(s) = &l.input_scale {
                let (dt, b) = vector(s);
                blobs.push((format!("{prefix}.input_scale"), dt, vec![l.cols], b));
            }
            if let Some(bias) = &l.bias {
                let (dt, b) = vector(bias);
                blobs.push((format!("{prefix}.bias"), dt, vec![l.rows], b));
            }
        }
        for (name, t) in quantized {
            blobs.extend(t.stored_tensors(name));
        }
        for (name, t) in self
            .dense
            .iter()
            .filter(|(name, _)| !quantized.contains_key(*name))
        {
            let (dt, b) = match (&t.data, self.precision) {
                (TensorData::F16(v), _) => (
                    safetensors::Dtype::F16,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                (TensorData::BF16(v), _) => (
                    safetensors::Dtype::BF16,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                (TensorData::F32(v), _) => vector(v),
            };
            blobs.push((name.clone(), dt, t.shape.clone(), b));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = blobs
            .iter()
            .map(|(name, dt, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| anyhow!("tensor '{name}': {e}"))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        meta.insert("binllm.format".to_string(), FORMAT_NAME.to_string());
        let version = if quantized.values().any(|t| matches!(t, QuantTensor::Q4(_))) {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_WITHOUT_Q4
        };
        meta.insert("binllm.version".to_string(), version.to_string());
        meta.insert(
            "binllm.config".to_string(),
            serde_json::to_string(&self.config)?,
        );
        meta.insert(
            "binllm.provenance".to_string(),
            serde_json::to_string(&self.provenance)?,
        );
        meta.insert(
            "binllm.precision".to_string(),
            serde_json::to_string(&self.precision)?,
        );
        meta.insert(
            "binllm.bits_per_weight".to_string(),
            serde_json::to_string(&self.bits_per_weight())?,
        );
        if let Some(t) = &self.tokenizer_json {
            meta.insert("binllm.tokenizer".to_string(), t.clone());
        }
        if let Some(t) = &self.chat_template {
            meta.insert("binllm.chat_template".to_string(), t.clone());
        }
        let bytes = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| anyhow!("serializing: {e}"))?;
        crate::atomic::write_atomically(path, &bytes)
    }

    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self::read_parts(path)?.0)
    }

    /// [`PackedModel::read`], plus the q8_0 tensors exactly as stored (the runtime computes
    /// with those; `dense` holds their dequantized values for every other consumer). A GGUF
    /// file whose block linears are 1-bit (`binllm export --format gguf`) is read too
    /// ([`crate::gguf::read_packed`]).
    pub fn read_parts(path: &Path) -> Result<(Self, QuantTensors)> {
        if crate::gguf::is_sign_gguf(path) {
            return crate::gguf::read_packed(path);
        }
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open packed model", path.display()))?;
        if !crate::detect::is_packed_container(path) {
            bail!(
                "{}: {}, not a binllm packed model (.b1); `binllm export --ptq {} --out model.b1` makes one from a pretrained model",
                path.display(),
                crate::detect::describe_other_format(path),
                path.display()
            );
        }
        // SAFETY: read-only map, dropped before returning.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        Self::from_bytes_parts(&mmap)
            .with_context(|| format!("{}: damaged binllm packed file", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Ok(Self::from_bytes_parts(bytes)?.0)
    }

    pub fn from_bytes_parts(bytes: &[u8]) -> Result<(Self, QuantTensors)> {
        let parsed = safetensors::SafeTensors::read_metadata(bytes)
            .and_then(|(_, header)| Ok((header, safetensors::SafeTensors::deserialize(bytes)?)));
        // safetensors' own messages do not say where a file ends short: on failure only, the
        // layout is read again to name the damage.
        let (header, st) = parsed.map_err(|e| match layout_damage(bytes) {
            Some(damage) => anyhow!("{damage}"),
            None => anyhow!("corrupt safetensors data: {e}"),
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| {
            meta.get(key)
                .with_context(|| format!("metadata lacks '{key}'"))
        };
        ensure!(
            field("binllm.format")? == FORMAT_NAME,
            "metadata binllm.format is not '{FORMAT_NAME}'"
        );
        let version: u32 = field("binllm.version")?
            .parse()
            .context("bad binllm.version")?;
        ensure!(
            READABLE_VERSIONS.contains(&version),
            "format version {version} is not supported (this binllm reads versions {READABLE_VERSIONS:?})"
        );
        let config: ModelConfig =
            serde_json::from_str(field("binllm.config")?).context("bad binllm.config")?;
        let provenance: Provenance =
            serde_json::from_str(field("binllm.provenance")?).context("bad binllm.provenance")?;
        let precision: Precision =
            serde_json::from_str(field("binllm.precision")?).context("bad binllm.precision")?;

        let floats = |name: &str| -> Result<Vec<f32>> {
            let v = st
                .tensor(name)
                .map_err(|e| anyhow!("tensor '{name}': {e}"))?;
            match v.dtype() {
                safetensors::Dtype::F32 => Ok(le_values(v.data(), f32::from_le_bytes)),
                safetensors::Dtype::F16 => {
                    Ok(le_values(v.data(), |b| f16::from_le_bytes(b).to_f32()))
                }
                other => bail!("tensor '{name}' has type {other:?}; expected F32 or F16"),
            }
        };
        let mut linears = BTreeMap::new();
        let names_present: std::collections::HashSet<String> =
            st.names().into_iter().map(|s| s.to_string()).collect();
        for layer in 0..config.num_layers {
            for which in BlockLinear::ALL {
                let prefix = module_prefix(layer, which);
                let [rows, cols] = which.shape(&config);
                let bits_name = format!("{prefix}.sign_bits");
                let bits_view = st
                    .tensor(&bits_name)
                    .map_err(|e| anyhow!("tensor '{bits_name}': {e}"))?;
                ensure!(
                    bits_view.dtype() == safetensors::Dtype::U64,
                    "'{bits_name}' must be U64"
                );
                ensure!(
                    bits_view.shape() == [rows, words_per_row(cols)],
                    "'{bits_name}' has shape {:?}, expected [{rows}, {}]",
                    bits_view.shape(),
                    words_per_row(cols)
                );
                let optional = |suffix: &str| -> Result<Option<Vec<f32>>> {
                    let name = format!("{prefix}.{suffix}");
                    if names_present.contains(&name) {
                        floats(&name).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                linears.insert(
                    (layer, which),
                    PackedLinear {
                        rows,
                        cols,
                        sign_bits: le_values(bits_view.data(), u64::from_le_bytes),
                        row_scale: floats(&format!("{prefix}.row_scale"))?,
                        block_scales: None,
                        input_scale: optional("input_scale")?,
                        bias: optional("bias")?,
                    },
                );
            }
        }
        let mut dense = TensorMap::new();
        let mut quantized = QuantTensors::new();
        for (name, shape) in names::expected_tensors(&config)
            .into_iter()
            .filter(|(n, _)| !n.contains("_proj."))
        {
            if !names_present.contains(&name) {
                if let Some(t) = QuantTensor::read(&st, &names_present, &name, &shape, version)? {
                    dense.insert(
                        name.clone(),
                        HostTensor {
                            shape,
                            data: TensorData::F32(t.dequantize()),
                            stored_as: t.stored_as().into(),
                        },
                    );
                    quantized.insert(name, t);
                    continue;
                }
            }
            let v = st
                .tensor(&name)
                .map_err(|e| anyhow!("tensor '{name}': {e}"))?;
            let data = match v.dtype() {
                safetensors::Dtype::F32 => TensorData::F32(le_values(v.data(), f32::from_le_bytes)),
                safetensors::Dtype::F16 => TensorData::F16(le_values(v.data(), f16::from_le_bytes)),
                safetensors::Dtype::BF16 => {
                    TensorData::BF16(le_values(v.data(), half::bf16::from_le_bytes))
                }
                other => bail!("tensor '{name}' has type {other:?}"),
            };
            dense.insert(
                name.clone(),
                HostTensor {
                    shape: v.shape().to_vec(),
                    data,
                    stored_as: format!("{:?}", v.dtype()),
                },
            );
        }
        let model = PackedModel {
            config,
            linears,
            dense,
            tokenizer_json: meta.get("binllm.tokenizer").cloned(),
            chat_template: meta.get("binllm.chat_template").cloned(),
            provenance,
            precision,
        };
        model.validate()?;
        Ok((model, quantized))
    }
}

/// The damage in a packed file's layout (safetensors: an 8-byte header length, the JSON
/// header, then the tensor data), in words; `None` when the layout is whole.
fn layout_damage(bytes: &[u8]) -> Option<String> {
    let size = bytes.len() as u64;
    if size < 8 {
        return Some(format!(
            "the file has {size} bytes; a packed file starts with an 8-byte header length (truncated)"
        ));
    }
    let mut header_len = [0u8; 8];
    header_len.copy_from_slice(&bytes[..8]);
    let header_end = 8u64.saturating_add(u64::from_le_bytes(header_len));
    if header_end > size {
        return Some(format!(
            "header ends at byte {header_end}, the file has {size} bytes (truncated)"
        ));
    }
    let header: serde_json::Value = match serde_json::from_slice(&bytes[8..header_end as usize]) {
        Ok(header) => header,
        Err(e) => {
            return Some(format!(
                "header (bytes 8..{header_end}) is not valid JSON: {e}"
            ))
        }
    };
    let data_end = header
        .as_object()
        .into_iter()
        .flat_map(|tensors| tensors.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let needed = header_end.saturating_add(data_end);
    (needed > size).then(|| {
        format!("tensor data ends at byte {needed}, the file has {size} bytes (truncated)")
    })
}
