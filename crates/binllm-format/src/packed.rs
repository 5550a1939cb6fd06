//! The packed 1-bit model container (`docs/FORMAT.md`): a safetensors file that standard
//! tools can open, holding per block linear the sign bits, one scale per output row and an
//! optional input-scale vector; everything else (embeddings, norms, head, biases) dense; and
//! the config, tokenizer, chat template and provenance in the metadata.
//!
//! One container serves two stages: `binllm convert` writes the *sign model* (f32 scales,
//! Stage-1 input scales kept separate, exactly the trained function) and `binllm export`
//! rewrites it for deployment (f16 scales, input scales folded where exact).
//!
//! Sign-bit layout: the kernels' ([`binllm_kernels::layout`]): row-major, each row padded
//! to whole 64-bit words stored little-endian; bit `j` (least significant = 0) of word `w`
//! of row `r` is element `(r, 64 w + j)`; 1 means +1 and 0 means -1; padding bits are 0.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::hf::le_values;
use crate::names::{self, BlockLinear};
use crate::tensor::{HostTensor, TensorData, TensorMap};
use crate::{ModelConfig, TextTokenizer};

pub const FORMAT_NAME: &str = "binllm-packed";
/// Version 2 added q8_0 dense tensors (`NAME.q8` + `NAME.q8_scale`) and export provenance;
/// a version-1 file is a valid version-2 file without them, so both are read. Version 3 added
/// q4_0 dense tensors (`NAME.q4` + `NAME.q4_scale`); a file without them is still written as
/// version 2 ([`FORMAT_VERSION_WITHOUT_Q4`]), so older readers keep reading it.
pub const FORMAT_VERSION: u32 = 3;
pub const FORMAT_VERSION_WITHOUT_Q4: u32 = 2;
pub const READABLE_VERSIONS: [u32; 3] = [1, 2, 3];

/// A dense tensor stored q8_0 is written as two tensors: `NAME` + this suffix (I8
/// `[rows, 32 * blocks_per_row]`) and `NAME` + [`Q8_SCALE_SUFFIX`] (F16 `[rows, blocks_per_row]`).
pub const Q8_SUFFIX: &str = ".q8";
pub const Q8_SCALE_SUFFIX: &str = ".q8_scale";
/// `stored_as` of a dense [`HostTensor`] that is q8_0 in its file (its data is dequantized).
pub const Q8_STORED_AS: &str = "Q8_0";
pub use binllm_kernels::q8::Q8_BLOCK;
/// A dense tensor stored q4_0 (version 3) is written as `NAME` + this suffix (U8
/// `[rows, 16 * blocks_per_row]`, GGML's q4_0 nibble order) and `NAME` + [`Q4_SCALE_SUFFIX`]
/// (F16 `[rows, blocks_per_row]`).
pub const Q4_SUFFIX: &str = ".q4";
pub const Q4_SCALE_SUFFIX: &str = ".q4_scale";
/// `stored_as` of a dense [`HostTensor`] that is q4_0 in its file (its data is dequantized).
pub const Q4_STORED_AS: &str = "Q4_0";
pub use binllm_kernels::q4::{Q4_BLOCK, Q4_BLOCK_BYTES};
pub use binllm_kernels::{Q4Matrix, Q8Matrix};

pub use binllm_kernels::layout::words_per_row;

/// Packs the signs of a row-major `rows x cols` matrix (sign(0) = +1) in the kernels' layout.
pub fn pack_signs(values: &[f32], rows: usize, cols: usize) -> Vec<u64> {
    binllm_kernels::pack_signs(values, rows, cols).bits
}

/// The +-1 matrix the bits encode.
pub fn unpack_signs(bits: &[u64], rows: usize, cols: usize) -> Vec<f32> {
    binllm_kernels::PackedMatrix::from_parts(rows, cols, bits.to_vec(), vec![1.0; rows])
        .unpack_signs()
}

/// How scale vectors and dense tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

/// One binarized linear: `y = row_scale * (B (input_scale * x)) + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedLinear {
    pub rows: usize,
    pub cols: usize,
    pub sign_bits: Vec<u64>,
    pub row_scale: Vec<f32>,
    pub input_scale: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// The dense weight this linear computes with: `row_scale[r] * B[r,c] * input_scale[c]`.
    pub fn dense_weight(&self) -> Vec<f32> {
        let mut w = unpack_signs(&self.sign_bits, self.rows, self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let s = self.input_scale.as_ref().map_or(1.0, |v| v[c]);
                w[r * self.cols + c] *= self.row_scale[r] * s;
            }
        }
        w
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

/// Bits per weight, honestly counted (METHOD.md): the body (block linears with their
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
        let mut tok = TextTokenizer::from_json_bytes(json.as_bytes())?;
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
                + vector_bits * (l.rows + l.input_scale.as_ref().map_or(0, |v| v.len())) as f64;
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
            let consistent = match t {
                QuantTensor::Q8(t) => {
                    t.blocks_per_row == t.cols.div_ceil(Q8_BLOCK)
                        && t.quants.len() == t.rows * t.blocks_per_row * Q8_BLOCK
                        && t.scales.len() == t.rows * t.blocks_per_row
                }
                QuantTensor::Q4(t) => {
                    t.blocks_per_row == t.cols.div_ceil(Q4_BLOCK)
                        && t.codes.len() == t.rows * t.blocks_per_row * Q4_BLOCK_BYTES
                        && t.scales.len() == t.rows * t.blocks_per_row
                }
            };
            ensure!(
                consistent,
                "quantized tensor '{name}' has inconsistent lengths"
            );
            if let QuantTensor::Q8(t) = t {
                // The file holds f16 scales: a scale that is not an f16 value would change.
                ensure!(
                    t.scales
                        .iter()
                        .all(|&s| s.is_nan() || f16::from_f32(s).to_f32() == s),
                    "quantized tensor '{name}' has q8_0 scales that f16 cannot hold exactly"
                );
            }
        }
        let mut blobs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
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
            match t {
                QuantTensor::Q8(t) => {
                    let blocks = t.blocks_per_row;
                    blobs.push((
                        format!("{name}{Q8_SUFFIX}"),
                        safetensors::Dtype::I8,
                        vec![t.rows, blocks * Q8_BLOCK],
                        t.quants.iter().map(|&q| q as u8).collect(),
                    ));
                    blobs.push((
                        format!("{name}{Q8_SCALE_SUFFIX}"),
                        safetensors::Dtype::F16,
                        vec![t.rows, blocks],
                        t.scales
                            .iter()
                            .flat_map(|&s| f16::from_f32(s).to_le_bytes())
                            .collect(),
                    ));
                }
                QuantTensor::Q4(t) => {
                    let blocks = t.blocks_per_row;
                    blobs.push((
                        format!("{name}{Q4_SUFFIX}"),
                        safetensors::Dtype::U8,
                        vec![t.rows, blocks * Q4_BLOCK_BYTES],
                        t.codes.clone(),
                    ));
                    blobs.push((
                        format!("{name}{Q4_SCALE_SUFFIX}"),
                        safetensors::Dtype::F16,
                        vec![t.rows, blocks],
                        t.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    ));
                }
            }
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
    /// with those; `dense` holds their dequantized values for every other consumer).
    pub fn read_parts(path: &Path) -> Result<(Self, QuantTensors)> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open packed model", path.display()))?;
        // SAFETY: read-only map, dropped before returning.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        Self::from_bytes_parts(&mmap)
            .with_context(|| format!("{}: not a valid binllm packed model", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Ok(Self::from_bytes_parts(bytes)?.0)
    }

    pub fn from_bytes_parts(bytes: &[u8]) -> Result<(Self, QuantTensors)> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("bad safetensors header (truncated or corrupt file?): {e}"))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow!("truncated or corrupt safetensors data: {e}"))?;
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
            let q8_name = format!("{name}{Q8_SUFFIX}");
            let q4_name = format!("{name}{Q4_SUFFIX}");
            if !names_present.contains(&name)
                && (names_present.contains(&q8_name) || names_present.contains(&q4_name))
            {
                let t = if names_present.contains(&q8_name) {
                    QuantTensor::Q8(read_q8(&st, &name, &shape)?)
                } else {
                    ensure!(
                        version >= 3,
                        "'{q4_name}' is a version-3 tensor in a version-{version} file"
                    );
                    QuantTensor::Q4(read_q4(&st, &name, &shape)?)
                };
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

/// How a blocked quantized matrix `NAME` is stored: `NAME{payload_suffix}` (`payload_dtype`,
/// `block_bytes` bytes per block of `block_cols` columns) and `NAME{scale_suffix}` (F16, one
/// scale per block).
struct BlockedFormat {
    label: &'static str,
    payload_suffix: &'static str,
    payload_dtype: safetensors::Dtype,
    scale_suffix: &'static str,
    block_cols: usize,
    block_bytes: usize,
}

const Q8_FORMAT: BlockedFormat = BlockedFormat {
    label: "q8_0",
    payload_suffix: Q8_SUFFIX,
    payload_dtype: safetensors::Dtype::I8,
    scale_suffix: Q8_SCALE_SUFFIX,
    block_cols: Q8_BLOCK,
    block_bytes: Q8_BLOCK,
};

const Q4_FORMAT: BlockedFormat = BlockedFormat {
    label: "q4_0",
    payload_suffix: Q4_SUFFIX,
    payload_dtype: safetensors::Dtype::U8,
    scale_suffix: Q4_SCALE_SUFFIX,
    block_cols: Q4_BLOCK,
    block_bytes: Q4_BLOCK_BYTES,
};

/// A blocked quantized matrix as read: its shape, blocks per row, payload bytes and scales.
struct BlockedTensor<'a> {
    rows: usize,
    cols: usize,
    blocks_per_row: usize,
    payload: &'a [u8],
    scales: Vec<f16>,
}

/// The two tensors of the blocked quantized matrix `name` of `shape`, checked against `format`.
fn read_blocked<'a>(
    st: &safetensors::SafeTensors<'a>,
    name: &str,
    shape: &[usize],
    format: &BlockedFormat,
) -> Result<BlockedTensor<'a>> {
    ensure!(
        shape.len() == 2,
        "tensor '{name}' is stored {} but is not a matrix",
        format.label
    );
    let (rows, cols) = (shape[0], shape[1]);
    let blocks = cols.div_ceil(format.block_cols);
    let payload_name = format!("{name}{}", format.payload_suffix);
    let scales_name = format!("{name}{}", format.scale_suffix);
    let payload = st
        .tensor(&payload_name)
        .map_err(|e| anyhow!("tensor '{payload_name}': {e}"))?;
    let scales = st
        .tensor(&scales_name)
        .map_err(|e| anyhow!("tensor '{scales_name}': {e}"))?;
    ensure!(
        payload.dtype() == format.payload_dtype,
        "'{payload_name}' must be {:?}",
        format.payload_dtype
    );
    ensure!(
        scales.dtype() == safetensors::Dtype::F16,
        "'{scales_name}' must be F16"
    );
    ensure!(
        payload.shape() == [rows, blocks * format.block_bytes],
        "'{payload_name}' has shape {:?}, expected [{rows}, {}]",
        payload.shape(),
        blocks * format.block_bytes
    );
    ensure!(
        scales.shape() == [rows, blocks],
        "'{scales_name}' has shape {:?}, expected [{rows}, {blocks}]",
        scales.shape()
    );
    Ok(BlockedTensor {
        rows,
        cols,
        blocks_per_row: blocks,
        payload: payload.data(),
        scales: le_values(scales.data(), f16::from_le_bytes),
    })
}

fn read_q8(st: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Q8Matrix> {
    let t = read_blocked(st, name, shape, &Q8_FORMAT)?;
    Ok(Q8Matrix {
        rows: t.rows,
        cols: t.cols,
        blocks_per_row: t.blocks_per_row,
        quants: t.payload.iter().map(|&b| b as i8).collect(),
        scales: t.scales.iter().map(|s| s.to_f32()).collect(),
    })
}

fn read_q4(st: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Q4Matrix> {
    let t = read_blocked(st, name, shape, &Q4_FORMAT)?;
    Ok(Q4Matrix {
        rows: t.rows,
        cols: t.cols,
        blocks_per_row: t.blocks_per_row,
        codes: t.payload.to_vec(),
        scales: t.scales,
    })
}

/// Bits per weight of a q8_0 matrix as stored (block padding and f16 scales included): 8.5
/// when `cols` is a multiple of 32.
pub fn q8_bits_per_weight(rows: usize, cols: usize) -> f64 {
    let blocks = cols.div_ceil(Q8_BLOCK) as f64;
    (rows as f64 * blocks * (Q8_BLOCK as f64 * 8.0 + 16.0)) / (rows * cols).max(1) as f64
}

/// Bits per weight of a q4_0 matrix as stored (block padding and f16 scales included): 4.5
/// when `cols` is a multiple of 32.
pub fn q4_bits_per_weight(rows: usize, cols: usize) -> f64 {
    let blocks = cols.div_ceil(Q4_BLOCK) as f64;
    (rows as f64 * blocks * (Q4_BLOCK as f64 * 4.0 + 16.0)) / (rows * cols).max(1) as f64
}

/// A dense matrix stored quantized: q8_0 or (version 3) q4_0.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantTensor {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
}

impl QuantTensor {
    /// `[rows, cols]` of the matrix.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantTensor::Q8(t) => (t.rows, t.cols),
            QuantTensor::Q4(t) => (t.rows, t.cols),
        }
    }

    /// The `stored_as` label of its dense tensor: `"Q8_0"` or `"Q4_0"`.
    pub fn stored_as(&self) -> &'static str {
        match self {
            QuantTensor::Q8(_) => Q8_STORED_AS,
            QuantTensor::Q4(_) => Q4_STORED_AS,
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        let (rows, cols) = self.shape();
        match self {
            QuantTensor::Q8(_) => q8_bits_per_weight(rows, cols),
            QuantTensor::Q4(_) => q4_bits_per_weight(rows, cols),
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantTensor::Q8(t) => t.dequantize(),
            QuantTensor::Q4(t) => t.dequantize(),
        }
    }
}

/// Dense tensors stored quantized (q8_0 or q4_0), by canonical name.
pub type QuantTensors = BTreeMap<String, QuantTensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_round_trip_with_padding_zeroed() {
        let (rows, cols) = (3, 70);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32) - 5.0)
            .collect();
        let bits = pack_signs(&values, rows, cols);
        assert_eq!(bits.len(), rows * 2);
        let back = unpack_signs(&bits, rows, cols);
        for (v, b) in values.iter().zip(&back) {
            assert_eq!(*b, if *v >= 0.0 { 1.0 } else { -1.0 });
        }
        for r in 0..rows {
            assert_eq!(
                bits[r * 2 + 1] >> 6,
                0,
                "padding bits of row {r} must be zero"
            );
        }
    }
}

/// How `binllm export` stores the LM head (and with a tied head, the embedding it shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadFormat {
    F16,
    /// q8_0 ([`Q8Matrix`]): 8.5 bits per weight.
    Q8,
    /// q4_0 ([`Q4Matrix`], format version 3): 4.5 bits per weight.
    Q4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    pub head: HeadFormat,
    /// Of the written vectors and dense tensors: F16 for deployment; F32 keeps the folded
    /// model exactly (tests use it to see folding alone).
    pub precision: Precision,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            head: HeadFormat::F16,
            precision: Precision::F16,
        }
    }
}

/// What folding did, one line per decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FoldReport {
    pub folded: Vec<String>,
    pub kept: Vec<String>,
}

/// An exported model: what [`PackedModel::write_with_quantized`] writes.
#[derive(Debug, Clone)]
pub struct Exported {
    pub model: PackedModel,
    pub quantized: QuantTensors,
    pub report: FoldReport,
}

impl Exported {
    pub fn write(&self, path: &Path) -> Result<()> {
        self.model.write_with_quantized(path, &self.quantized)
    }
}

fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn scale_dense(model: &mut PackedModel, name: &str, by: &[f32]) -> Result<()> {
    let t = model
        .dense
        .get_mut(name)
        .with_context(|| format!("missing dense tensor '{name}'"))?;
    ensure!(
        t.numel() == by.len(),
        "'{name}' has {} values, the input scale {}",
        t.numel(),
        by.len()
    );
    let values: Vec<f32> = t.to_f32_vec().iter().zip(by).map(|(w, s)| w * s).collect();
    *t = HostTensor::from_f32(t.shape.clone(), values);
    Ok(())
}

/// Folds Stage-1 input scales into neighbouring weights wherever that computes the same
/// function (METHOD.md), deciding by value: vectors are folded only when the ones that must
/// agree are bitwise equal. Per layer:
///
/// - q/k/v read the same normed input: one vector shared by all three becomes part of the
///   attention RMSNorm weight (`w * (s * x) == (w * s) * x`). Likewise gate/up and the MLP
///   RMSNorm.
/// - o_proj's input is the attention output, a mix of value rows: `s[h * head_dim + d]` can
///   move into v_proj's row scale (and bias) `g * head_dim + d` when it is the same for every
///   query head `h` of kv head `g = h / (heads / kv_heads)`.
/// - down_proj's input is `silu(gate) * up`: its vector always moves into up_proj's row scales.
///
/// The result is f32; anything that cannot fold stays as an input-scale vector.
pub fn fold_input_scales(model: &PackedModel) -> Result<(PackedModel, FoldReport)> {
    model.validate()?;
    let c = model.config.clone();
    let mut out = model.clone();
    let mut report = FoldReport::default();
    for layer in 0..c.num_layers {
        let input = |m: &PackedModel, w: BlockLinear| m.linears[&(layer, w)].input_scale.clone();

        for (group, norm, label) in [
            (
                [BlockLinear::Q, BlockLinear::K, BlockLinear::V].as_slice(),
                names::attn_norm(layer),
                "q/k/v",
            ),
            (
                [BlockLinear::Gate, BlockLinear::Up].as_slice(),
                names::mlp_norm(layer),
                "gate/up",
            ),
        ] {
            let vectors: Vec<Option<Vec<f32>>> = group.iter().map(|&w| input(&out, w)).collect();
            if vectors.iter().all(Option::is_none) {
                continue;
            }
            let first = vectors[0].clone();
            let shared = match &first {
                Some(s) => vectors
                    .iter()
                    .all(|v| v.as_deref().is_some_and(|v| bitwise_equal(v, s))),
                None => false,
            };
            if let (true, Some(s)) = (shared, first) {
                scale_dense(&mut out, &norm, &s)?;
                for &w in group {
                    out.linears
                        .get_mut(&(layer, w))
                        .expect("validated")
                        .input_scale = None;
                }
                report
                    .folded
                    .push(format!("layer {layer}: {label} input scale -> {norm}"));
            } else {
                report.kept.push(format!(
                    "layer {layer}: {label} input scales differ; kept as vectors"
                ));
            }
        }

        if let Some(s) = input(&out, BlockLinear::O) {
            let group = c.num_heads / c.num_kv_heads;
            let per_kv: Option<Vec<f32>> = (0..c.kv_dim())
                .map(|i| {
                    let (g, d) = (i / c.head_dim, i % c.head_dim);
                    let value = s[g * group * c.head_dim + d];
                    (0..group)
                        .all(|k| s[(g * group + k) * c.head_dim + d].to_bits() == value.to_bits())
                        .then_some(value)
                })
                .collect();
            match per_kv {
                Some(per_kv) => {
                    let v = out.linears.get_mut(&(layer, BlockLinear::V)).expect("validated");
                    v.row_scale.iter_mut().zip(&per_kv).for_each(|(r, s)| *r *= s);
                    if let Some(b) = &mut v.bias {
                        b.iter_mut().zip(&per_kv).for_each(|(b, s)| *b *= s);
                    }
                    out.linears.get_mut(&(layer, BlockLinear::O)).expect("validated").input_scale = None;
                    report.folded.push(format!("layer {layer}: o_proj input scale -> v_proj row scales"));
                }
                None => report.kept.push(format!(
                    "layer {layer}: o_proj input scale differs across the query heads of a kv head; kept as a vector"
                )),
            }
        }

        if let Some(s) = input(&out, BlockLinear::Down) {
            let up = out
                .linears
                .get_mut(&(layer, BlockLinear::Up))
                .expect("validated");
            up.row_scale.iter_mut().zip(&s).for_each(|(r, s)| *r *= s);
            out.linears
                .get_mut(&(layer, BlockLinear::Down))
                .expect("validated")
                .input_scale = None;
            report.folded.push(format!(
                "layer {layer}: down_proj input scale -> up_proj row scales"
            ));
        }
    }
    Ok((out, report))
}

fn round_f16(values: &mut [f32]) {
    values
        .iter_mut()
        .for_each(|v| *v = f16::from_f32(*v).to_f32());
}

/// `binllm export`: folds what folds exactly ([`fold_input_scales`]), then stores vectors and
/// dense tensors at `options.precision` (rounded in memory too, so the returned model computes
/// what the file holds) and the head as `options.head`. The fold report goes into the
/// provenance (`details.export`).
pub fn export(sign_model: &PackedModel, options: &ExportOptions) -> Result<Exported> {
    let (mut model, report) = fold_input_scales(sign_model)?;
    model.precision = options.precision;
    if options.precision == Precision::F16 {
        for l in model.linears.values_mut() {
            round_f16(&mut l.row_scale);
            l.input_scale.iter_mut().for_each(|v| round_f16(v));
            l.bias.iter_mut().for_each(|v| round_f16(v));
        }
        for t in model.dense.values_mut() {
            let values: Vec<f16> = t.to_f32_vec().into_iter().map(f16::from_f32).collect();
            *t = HostTensor {
                shape: t.shape.clone(),
                data: TensorData::F16(values),
                stored_as: "F16".into(),
            };
        }
    }
    let mut quantized_tensors = QuantTensors::new();
    if matches!(options.head, HeadFormat::Q8 | HeadFormat::Q4) {
        let name = if model.config.tie_word_embeddings {
            names::EMBED
        } else {
            names::LM_HEAD
        };
        let t = model
            .dense
            .get_mut(name)
            .with_context(|| format!("missing dense tensor '{name}'"))?;
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let values = t.to_f32_vec();
        let quantized = if options.head == HeadFormat::Q8 {
            QuantTensor::Q8(Q8Matrix::quantize(&values, rows, cols))
        } else {
            QuantTensor::Q4(Q4Matrix::quantize(&values, rows, cols))
        };
        *t = HostTensor {
            shape: t.shape.clone(),
            data: TensorData::F32(quantized.dequantize()),
            stored_as: quantized.stored_as().into(),
        };
        quantized_tensors.insert(name.to_string(), quantized);
    }
    let export_details = serde_json::json!({
        "head": options.head,
        "precision": options.precision,
        "folded": report.folded.len(),
        "kept": report.kept,
        "input_scale_vectors_left": model.linears.values().filter(|l| l.input_scale.is_some()).count(),
    });
    match &mut model.provenance.details {
        serde_json::Value::Object(map) => {
            map.insert("export".into(), export_details);
        }
        serde_json::Value::Null => {
            model.provenance.details = serde_json::json!({ "export": export_details })
        }
        other => {
            let previous = other.take();
            *other = serde_json::json!({ "export": export_details, "before_export": previous });
        }
    }
    Ok(Exported {
        model,
        quantized: quantized_tensors,
        report,
    })
}

/// Whether `path` is a file whose safetensors header says it is a binllm packed model
/// (reads the header only).
pub fn is_packed_file(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return false;
    }
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return false;
    }
    let mut header = vec![0u8; len as usize];
    if file.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|h| {
            h.get("__metadata__")?
                .get("binllm.format")?
                .as_str()
                .map(|f| f == FORMAT_NAME)
        })
        .unwrap_or(false)
}
