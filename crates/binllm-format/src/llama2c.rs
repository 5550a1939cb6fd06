//! llama2.c checkpoints (the legacy headerless format and the version-1 "ak42" format, both
//! fp32) and their tokenizers (`tok*.bin`, or the SentencePiece `.model` they came from).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::hf::le_values;
use crate::names::{self, BlockLinear};
use crate::pretrained::{LoadOptions, PretrainedModel, SourceFormat};
use crate::tensor::{interleaved_to_rotate_half, HostTensor, TensorMap};
use crate::tokenizer::{sentencepiece_bpe, PieceKind, SentencePiece};
use crate::{Architecture, ModelConfig, TextTokenizer};

const MAGIC_V1: u32 = 0x616b_3432; // "ak42"
const BOS: u32 = 1;
const EOS: u32 = 2;

pub fn read_model(path: &Path, options: &LoadOptions) -> Result<PretrainedModel> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (config, tensors) = parse_checkpoint(&bytes)
        .with_context(|| format!("{}: not a usable llama2.c checkpoint", path.display()))?;
    let tokenizer_path = match &options.tokenizer {
        Some(p) => Some(p.clone()),
        None => find_tokenizer(path, config.vocab_size),
    };
    let tokenizer = match tokenizer_path {
        Some(p) => Some(read_tokenizer(&p, config.vocab_size)?),
        None => None,
    };
    Ok(PretrainedModel {
        config,
        tensors,
        tokenizer,
        chat_template: None,
        format: SourceFormat::Llama2c,
        path: path.to_path_buf(),
        notes: vec![
            "RoPE converted from llama2.c's interleaved pairs to the rotate-half layout".into(),
        ],
    })
}

/// Looks beside the checkpoint for `tok{vocab}.model`, `tok{vocab}.bin`, `tokenizer.model`
/// or `tokenizer.bin`.
fn find_tokenizer(checkpoint: &Path, vocab_size: usize) -> Option<PathBuf> {
    let dir = checkpoint.parent()?;
    [
        format!("tok{vocab_size}.model"),
        format!("tok{vocab_size}.bin"),
        "tokenizer.model".into(),
        "tokenizer.bin".into(),
    ]
    .into_iter()
    .map(|name| dir.join(name))
    .find(|p| p.exists())
}

fn parse_checkpoint(bytes: &[u8]) -> Result<(ModelConfig, TensorMap)> {
    let int = |i: usize| -> Result<i32> {
        let b = bytes.get(4 * i..4 * i + 4).with_context(|| {
            format!(
                "the file is truncated: {} bytes, shorter than its header",
                bytes.len()
            )
        })?;
        Ok(i32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let (header, offset, shared_classifier, v1) = if int(0)? as u32 == MAGIC_V1 {
        let version = int(1)?;
        if version != 1 {
            bail!("llama2.c format version {version} is not supported (fp32 version 1 and legacy are)");
        }
        let h: Vec<i32> = (2..9).map(int).collect::<Result<_>>()?;
        let shared = *bytes.get(36).context("truncated header")? != 0;
        (h, 256usize, shared, true)
    } else {
        let h: Vec<i32> = (0..7).map(int).collect::<Result<_>>()?;
        let shared = h[5] > 0;
        (h, 28usize, shared, false)
    };
    if header
        .iter()
        .enumerate()
        .any(|(i, &v)| v == 0 || (v < 0 && (v1 || i != 5)))
    {
        bail!("header {header:?} has a zero or negative field: not a llama2.c checkpoint");
    }
    let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = <[usize; 7]>::try_from(
        header
            .iter()
            .map(|v| v.unsigned_abs() as usize)
            .collect::<Vec<_>>(),
    )
    .expect("7 fields");
    if dim > 1 << 16 || layers > 1024 || vocab > 1 << 20 {
        bail!(
            "header {header:?} has implausibly large dimensions (dim {dim}, n_layers {layers}, vocab_size {vocab}): not a llama2.c checkpoint"
        );
    }
    if dim % heads != 0 {
        bail!("header {header:?}: dim {dim} is not a multiple of n_heads {heads}");
    }
    if heads % kv_heads != 0 {
        bail!("header {header:?}: n_heads {heads} is not a multiple of n_kv_heads {kv_heads}");
    }
    let head_dim = dim / heads;
    let config = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: dim,
        intermediate_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: seq_len,
        tie_word_embeddings: shared_classifier,
        attention_bias: false,
        qk_norm: false,
        // llama2.c's fixed ids, where the vocabulary has them.
        bos_token_id: Some(BOS).filter(|&id| (id as usize) < vocab),
        eos_token_ids: [EOS]
            .into_iter()
            .filter(|&id| (id as usize) < vocab)
            .collect(),
    };
    let kv_dim = kv_heads * head_dim;
    let per_layer = [
        ("q", dim * dim),
        ("k", kv_dim * dim),
        ("v", kv_dim * dim),
        ("o", dim * dim),
        ("gate", hidden * dim),
        ("down", dim * hidden),
        ("up", hidden * dim),
    ];
    let weights: usize = vocab * dim
        + layers * (2 * dim + per_layer.iter().map(|(_, n)| n).sum::<usize>())
        + dim
        + if v1 { 0 } else { seq_len * head_dim } // freq_cis_real + freq_cis_imag
        + if shared_classifier { 0 } else { vocab * dim };
    let expected = offset + 4 * weights;
    if bytes.len() != expected {
        bail!(
            "{} bytes, but its header {header:?} implies {expected}: {}",
            bytes.len(),
            if bytes.len() < expected {
                "the file is truncated"
            } else {
                "the header disagrees with the weights"
            }
        );
    }

    let floats: Vec<f32> = le_values(&bytes[offset..], f32::from_le_bytes);
    let mut cursor = 0usize;
    let mut take = |n: usize| {
        let s = &floats[cursor..cursor + n];
        cursor += n;
        s
    };
    let mut tensors = TensorMap::new();
    let mut put = |name: String, shape: Vec<usize>, values: &[f32]| {
        tensors.insert(name, HostTensor::from_f32(shape, values.to_vec()));
    };
    fn per_layer_norms<'f>(
        take: &mut impl FnMut(usize) -> &'f [f32],
        layers: usize,
        dim: usize,
    ) -> Vec<Vec<f32>> {
        (0..layers).map(|_| take(dim).to_vec()).collect()
    }
    // Version 1 stores the norms first; legacy interleaves them with the linears.
    let (embed, attn_norms, mlp_norms_v1, final_norm_v1);
    if v1 {
        attn_norms = per_layer_norms(&mut take, layers, dim);
        mlp_norms_v1 = Some(per_layer_norms(&mut take, layers, dim));
        final_norm_v1 = Some(take(dim).to_vec());
        embed = take(vocab * dim).to_vec();
    } else {
        embed = take(vocab * dim).to_vec();
        attn_norms = per_layer_norms(&mut take, layers, dim);
        mlp_norms_v1 = None;
        final_norm_v1 = None;
    }
    put(names::EMBED.into(), vec![vocab, dim], &embed);
    for (layer, norm) in attn_norms.iter().enumerate() {
        put(names::attn_norm(layer), vec![dim], norm);
    }
    let linear_order = [
        BlockLinear::Q,
        BlockLinear::K,
        BlockLinear::V,
        BlockLinear::O,
    ];
    for linear in linear_order {
        for layer in 0..layers {
            let shape = linear.shape(&config);
            let mut w = take(shape[0] * shape[1]).to_vec();
            if matches!(linear, BlockLinear::Q | BlockLinear::K) {
                w = interleaved_to_rotate_half(&w, shape[0] / head_dim, head_dim, shape[1]);
            }
            put(names::linear_weight(layer, linear), shape.to_vec(), &w);
        }
    }
    let mlp_norms = match mlp_norms_v1 {
        Some(n) => n,
        None => per_layer_norms(&mut take, layers, dim),
    };
    for (layer, norm) in mlp_norms.iter().enumerate() {
        put(names::mlp_norm(layer), vec![dim], norm);
    }
    for linear in [BlockLinear::Gate, BlockLinear::Down, BlockLinear::Up] {
        for layer in 0..layers {
            let shape = linear.shape(&config);
            let w = take(shape[0] * shape[1]);
            put(names::linear_weight(layer, linear), shape.to_vec(), w);
        }
    }
    let final_norm = match final_norm_v1 {
        Some(n) => n,
        None => take(dim).to_vec(),
    };
    put(names::FINAL_NORM.into(), vec![dim], &final_norm);
    if !v1 {
        take(seq_len * head_dim); // precomputed RoPE tables: recomputed from theta instead
    }
    if !shared_classifier {
        let head = take(vocab * dim);
        put(names::LM_HEAD.into(), vec![vocab, dim], head);
    }
    Ok((config, tensors))
}

/// Reads a llama2.c `tok*.bin` or a SentencePiece `.model` (chosen by the extension).
pub fn read_tokenizer(path: &Path, vocab_size: usize) -> Result<TextTokenizer> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read tokenizer", path.display()))?;
    let is_model = path.extension().is_some_and(|e| e == "model");
    let (pieces, add_dummy_prefix) = if is_model {
        parse_sentencepiece_model(&bytes)
    } else {
        parse_tok_bin(&bytes, vocab_size).map(|p| (p, true))
    }
    .with_context(|| format!("{}: not a valid tokenizer file", path.display()))?;
    if pieces.len() != vocab_size {
        bail!(
            "{}: tokenizer has {} pieces but the model's vocabulary is {vocab_size} (tokenizer/model mismatch)",
            path.display(),
            pieces.len()
        );
    }
    sentencepiece_bpe(&pieces, Some(BOS), vec![EOS], true, add_dummy_prefix)
        .with_context(|| format!("{}: unusable tokenizer", path.display()))
}

/// llama2.c's tokenizer.bin: i32 max_token_length, then per token f32 score, i32 length,
/// bytes. Pieces use a plain space where SentencePiece writes "▁"; ids 1 and 2 are stored
/// as "\n<s>\n" and "\n</s>\n".
fn parse_tok_bin(bytes: &[u8], vocab_size: usize) -> Result<Vec<SentencePiece>> {
    let mut pos = 4usize;
    let truncated = |id: usize| format!("the file is truncated at token {id} of {vocab_size}");
    let read4 = |pos: &mut usize, id: usize| -> Result<[u8; 4]> {
        let b = bytes.get(*pos..*pos + 4).with_context(|| truncated(id))?;
        *pos += 4;
        Ok(b.try_into().expect("4 bytes"))
    };
    let mut pieces = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let score = f32::from_le_bytes(read4(&mut pos, id)?);
        let len = i32::from_le_bytes(read4(&mut pos, id)?);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= 1024)
            .with_context(|| format!("token {id} has the bad length {len}"))?;
        let raw = bytes.get(pos..pos + len).with_context(|| truncated(id))?;
        pos += len;
        let text =
            String::from_utf8(raw.to_vec()).with_context(|| format!("token {id} is not UTF-8"))?;
        let (piece, kind) = match id {
            0 => ("<unk>".to_string(), PieceKind::Unknown),
            1 => ("<s>".to_string(), PieceKind::Control),
            2 => ("</s>".to_string(), PieceKind::Control),
            _ if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') => {
                (text, PieceKind::Byte)
            }
            _ => (text.replace(' ', "▁"), PieceKind::Normal),
        };
        pieces.push(SentencePiece { piece, score, kind });
    }
    if pos != bytes.len() {
        bail!(
            "{} bytes left after {vocab_size} tokens (tokenizer/model mismatch?)",
            bytes.len() - pos
        );
    }
    Ok(pieces)
}

/// A minimal reader of SentencePiece's ModelProto: the pieces (field 1) and
/// normalizer_spec.add_dummy_prefix (field 3.3).
fn parse_sentencepiece_model(bytes: &[u8]) -> Result<(Vec<SentencePiece>, bool)> {
    let mut pieces = Vec::new();
    let mut add_dummy_prefix = true;
    for field in ProtoFields::new(bytes) {
        match field? {
            (1, ProtoValue::Bytes(msg)) => {
                let mut piece = SentencePiece {
                    piece: String::new(),
                    score: 0.0,
                    kind: PieceKind::Normal,
                };
                for f in ProtoFields::new(msg) {
                    match f? {
                        (1, ProtoValue::Bytes(s)) => {
                            piece.piece =
                                String::from_utf8(s.to_vec()).context("piece is not UTF-8")?
                        }
                        (2, ProtoValue::Fixed32(v)) => piece.score = f32::from_bits(v),
                        (3, ProtoValue::Varint(t)) => {
                            piece.kind = match t {
                                1 => PieceKind::Normal,
                                2 => PieceKind::Unknown,
                                3 => PieceKind::Control,
                                4 => PieceKind::UserDefined,
                                5 => PieceKind::Unused,
                                6 => PieceKind::Byte,
                                other => bail!("unknown piece type {other}"),
                            }
                        }
                        _ => {}
                    }
                }
                pieces.push(piece);
            }
            (3, ProtoValue::Bytes(msg)) => {
                for f in ProtoFields::new(msg) {
                    if let (3, ProtoValue::Varint(v)) = f? {
                        add_dummy_prefix = v != 0;
                    }
                }
            }
            _ => {}
        }
    }
    if pieces.is_empty() {
        bail!("no pieces: not a SentencePiece model");
    }
    Ok((pieces, add_dummy_prefix))
}

enum ProtoValue<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// Iterates over the (field number, value) pairs of one protobuf message.
struct ProtoFields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ProtoFields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        ProtoFields { bytes, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos).context("truncated varint")?;
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint too long")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        // A corrupt length can be near usize::MAX: the end must not overflow.
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .context("truncated field")?;
        self.pos += n;
        Ok(s)
    }
}

impl<'a> Iterator for ProtoFields<'a> {
    type Item = Result<(u64, ProtoValue<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let item = (|| {
            let key = self.varint()?;
            let value = match key & 7 {
                0 => ProtoValue::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    ProtoValue::Fixed64
                }
                2 => {
                    let n = self.varint()? as usize;
                    ProtoValue::Bytes(self.take(n)?)
                }
                5 => ProtoValue::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4"))),
                w => bail!("unsupported protobuf wire type {w}"),
            };
            Ok((key >> 3, value))
        })();
        if item.is_err() {
            self.pos = self.bytes.len();
        }
        Some(item)
    }
}
