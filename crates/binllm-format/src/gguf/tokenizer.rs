//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, rebuilt as a
//! Hugging Face `tokenizers` tokenizer that encodes the way llama.cpp does.
//!
//! Two vocabularies are understood: `gpt2` (byte-level BPE with merges; the pre-tokenizer
//! regexes are chosen from `tokenizer.ggml.pre` exactly as llama.cpp's `llama-vocab.cpp`
//! chooses them) and `llama` (SentencePiece BPE with byte fallback, built by
//! [`crate::tokenizer::sentencepiece_bpe`]). Anything else leaves the model without a
//! tokenizer and says so in the notes.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{GgufFile, MetaArray, MetaValue};
use crate::tokenizer::{sentencepiece_bpe, PieceKind, SentencePiece, TokenizerKind};
use crate::TextTokenizer;

/// What [`from_metadata`] built, and what `inspect` should say about it.
pub struct BuiltTokenizer {
    pub tokenizer: Option<TextTokenizer>,
    pub notes: Vec<String>,
}

/// llama.cpp's token types (`llama_token_type`), which are SentencePiece's piece types.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub fn from_metadata(file: &GgufFile) -> Result<BuiltTokenizer> {
    let model = match file.get("tokenizer.ggml.model") {
        None => {
            return Ok(BuiltTokenizer {
                tokenizer: None,
                notes: vec!["the file has no tokenizer (no tokenizer.ggml.model)".into()],
            })
        }
        Some(v) => v
            .as_str()
            .ok_or_else(|| anyhow!("tokenizer.ggml.model is a {}, not a string", v.type_name()))?,
    };
    let vocab = Vocab::read(file)?;
    match model {
        "gpt2" => byte_level_bpe(file, &vocab),
        "llama" => sentencepiece(file, &vocab),
        other => Ok(BuiltTokenizer {
            tokenizer: None,
            notes: vec![format!(
                "tokenizer model '{other}' is not supported (gpt2 and llama are): no tokenizer"
            )],
        }),
    }
}

/// The parts of the vocabulary both kinds share.
struct Vocab<'a> {
    tokens: &'a [String],
    token_types: Option<Vec<i64>>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl<'a> Vocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        let tokens = match file.get("tokenizer.ggml.tokens") {
            Some(MetaValue::Array(MetaArray::String(t))) if !t.is_empty() => t.as_slice(),
            Some(other) => bail!(
                "tokenizer.ggml.tokens should be a non-empty array of strings, got {}",
                other.summary()
            ),
            None => bail!("tokenizer.ggml.model is set but tokenizer.ggml.tokens is missing"),
        };
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => None,
            Some(v) => {
                let types = v
                    .as_array()
                    .and_then(MetaArray::to_i64_vec)
                    .ok_or_else(|| {
                        anyhow!("tokenizer.ggml.token_type should be an integer array")
                    })?;
                if types.len() != tokens.len() {
                    bail!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        types.len(),
                        tokens.len()
                    );
                }
                Some(types)
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = file.get(&format!("tokenizer.ggml.{key}")) else {
                return Ok(None);
            };
            match v.as_u64() {
                Some(id) if id < tokens.len() as u64 => Ok(Some(id as u32)),
                _ => bail!(
                    "tokenizer.ggml.{key} = {} is not a token id (the vocabulary has {} tokens)",
                    v.summary(),
                    tokens.len()
                ),
            }
        };
        let bos_id = id("bos_token_id")?;
        let mut eos_ids = Vec::new();
        for key in ["eos_token_id", "eot_token_id", "eom_token_id"] {
            if let Some(id) = id(key)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Vocab {
            tokens,
            token_types,
            bos_id,
            eos_ids,
        })
    }

    fn token_type(&self, id: usize) -> i64 {
        self.token_types.as_ref().map_or(1, |t| t[id])
    }
}

fn flag(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| anyhow!("{key} should be a bool, got {}", v.type_name())),
    }
}

/// How llama.cpp splits text into words before BPE, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PreSplit {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (starcoder, refact, smollm, ...).
    DigitsThenGpt2,
    /// Llama 3's regex (numbers in runs of up to three digits).
    Llama3,
    /// Qwen2's regex (Llama 3's with single digits).
    Qwen2,
    /// llama.cpp's fallback for `default`: punctuation runs, GPT-2, digit runs, digit triples.
    Default,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

struct PreTokenizerChoice {
    split: PreSplit,
    /// llama.cpp's `ignore_merges`: a word that is itself a token is not merged further.
    ignore_merges: bool,
    /// llama.cpp's default for adding BOS when `tokenizer.ggml.add_bos_token` is absent.
    add_bos_default: bool,
}

/// The `tokenizer.ggml.pre` names llama.cpp maps to the splits binllm implements.
fn pre_tokenizer_choice(pre: &str) -> Option<PreTokenizerChoice> {
    let choice = |split, ignore_merges, add_bos_default| PreTokenizerChoice {
        split,
        ignore_merges,
        add_bos_default,
    };
    Some(match pre {
        "default" => choice(PreSplit::Default, false, false),
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" | "exaone4" => choice(PreSplit::Gpt2, false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => choice(PreSplit::DigitsThenGpt2, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => choice(PreSplit::Llama3, true, true),
        "dbrx" | "smaug-bpe" => choice(PreSplit::Llama3, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => choice(PreSplit::Qwen2, false, false),
        _ => return None,
    })
}

fn split_isolated(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

pub(super) fn pre_tokenizer_json(split: PreSplit) -> Value {
    let sequence = match split {
        // HF's ByteLevel regex is GPT-2's (with the trailing `|\s+`, which only matters for
        // text the other alternatives leave unmatched: llama.cpp keeps such text as a word
        // too).
        PreSplit::Gpt2 => return byte_level(true),
        PreSplit::DigitsThenGpt2 => vec![split_isolated(r"\p{N}"), byte_level(true)],
        PreSplit::Llama3 => vec![split_isolated(LLAMA3_REGEX), byte_level(false)],
        PreSplit::Qwen2 => vec![split_isolated(QWEN2_REGEX), byte_level(false)],
        PreSplit::Default => vec![
            split_isolated(r"[\p{P}\$\+<=>\^~\|]+"),
            split_isolated(GPT2_REGEX),
            split_isolated(r"\p{N}+"),
            split_isolated("[0-9][0-9][0-9]"),
            byte_level(false),
        ],
    };
    json!({"type": "Sequence", "pretokenizers": sequence})
}

/// A post-processor adding BOS before and/or EOS after each sequence, or `null`.
fn special_tokens_processor(tokens: &[String], bos: Option<u32>, eos: Option<u32>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}});
    let wrap = |sequence: &str, type_id: u32| {
        let mut items: Vec<Value> = bos.map(special).into_iter().collect();
        items.push(json!({"Sequence": {"id": sequence, "type_id": type_id}}));
        items.extend(eos.map(special));
        items
    };
    let single = wrap("A", 0);
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    let mut specials = serde_json::Map::new();
    for id in bos.into_iter().chain(eos) {
        let text = &tokens[id as usize];
        specials.insert(
            text.clone(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn byte_level_bpe(file: &GgufFile, vocab: &Vocab) -> Result<BuiltTokenizer> {
    let mut notes = Vec::new();
    let merges = match file.get("tokenizer.ggml.merges") {
        Some(MetaValue::Array(MetaArray::String(m))) => m,
        Some(other) => bail!(
            "tokenizer.ggml.merges should be an array of strings, got {}",
            other.summary()
        ),
        None => bail!("a gpt2 tokenizer needs tokenizer.ggml.merges, which is missing"),
    };
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| anyhow!("merge {i} ({m:?}) is not two space-separated tokens"))
        })
        .collect::<Result<Vec<_>>>()?;

    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let choice = pre_tokenizer_choice(pre).unwrap_or_else(|| {
        notes.push(format!(
            "pre-tokenizer '{pre}' is unknown to binllm: using GPT-2's regex, so tokenization \
             may differ from llama.cpp's"
        ));
        PreTokenizerChoice {
            split: PreSplit::Gpt2,
            ignore_merges: false,
            add_bos_default: false,
        }
    });
    notes.push(format!(
        "tokenizer: byte-level BPE, {} tokens, {} merges, pre-tokenizer '{pre}' ({:?})",
        vocab.tokens.len(),
        merges.len(),
        choice.split
    ));

    let mut token_ids = serde_json::Map::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        token_ids.insert(token.clone(), json!(id));
    }
    // Control tokens are special (skipped when decoding with skip_special_tokens);
    // user-defined ones are plain added tokens. llama.cpp matches both verbatim in the raw
    // text before pre-tokenizing, which is what non-normalized added tokens do.
    let added: Vec<Value> = (0..vocab.tokens.len())
        .filter_map(|id| {
            let special = match vocab.token_type(id) {
                TOKEN_TYPE_CONTROL => true,
                TOKEN_TYPE_USER_DEFINED => false,
                _ => return None,
            };
            Some(
                json!({"id": id, "content": vocab.tokens[id], "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": false,
                        "special": special}),
            )
        })
        .collect();

    let add_bos = flag(file, "tokenizer.ggml.add_bos_token")?.unwrap_or(choice.add_bos_default);
    let add_eos = flag(file, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = match (add_bos, vocab.bos_id) {
        (true, None) => bail!("tokenizer.ggml.add_bos_token is true but there is no bos_token_id"),
        (true, id) => id,
        (false, _) => None,
    };
    let eos = match (add_eos, vocab.eos_ids.first()) {
        (true, None) => bail!("tokenizer.ggml.add_eos_token is true but there is no eos_token_id"),
        (true, id) => id.copied(),
        (false, _) => None,
    };

    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(choice.split),
        "post_processor": special_tokens_processor(vocab.tokens, bos, eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": choice.ignore_merges, "vocab": token_ids, "merges": merges
        }
    });
    let mut tok = TextTokenizer::from_json_bytes(spec.to_string().as_bytes())
        .context("building the byte-level BPE tokenizer")?;
    tok.kind = TokenizerKind::ByteLevelBpe;
    tok.bos_id = vocab.bos_id;
    tok.eos_ids = vocab.eos_ids.clone();
    Ok(BuiltTokenizer {
        tokenizer: Some(tok),
        notes,
    })
}

fn sentencepiece(file: &GgufFile, vocab: &Vocab) -> Result<BuiltTokenizer> {
    let scores: Option<Vec<f32>> = match file.get("tokenizer.ggml.scores") {
        None => None,
        Some(MetaValue::Array(MetaArray::F32(s))) if s.len() == vocab.tokens.len() => {
            Some(s.clone())
        }
        Some(other) => bail!(
            "tokenizer.ggml.scores should be {} f32 values, got {}",
            vocab.tokens.len(),
            other.summary()
        ),
    };
    let pieces: Vec<SentencePiece> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| SentencePiece {
            piece: token.clone(),
            score: scores.as_ref().map_or(0.0, |s| s[id]),
            kind: match vocab.token_type(id) {
                2 => PieceKind::Unknown,
                3 => PieceKind::Control,
                4 => PieceKind::UserDefined,
                5 => PieceKind::Unused,
                6 => PieceKind::Byte,
                _ => PieceKind::Normal,
            },
        })
        .collect();
    // llama.cpp's defaults for SentencePiece vocabularies: <unk>=0, <s>=1, </s>=2, BOS added,
    // a space prepended.
    let bos_id = vocab.bos_id.or((pieces.len() > 1).then_some(1));
    let eos_ids = if vocab.eos_ids.is_empty() && pieces.len() > 2 {
        vec![2]
    } else {
        vocab.eos_ids.clone()
    };
    let add_bos = flag(file, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_space_prefix = flag(file, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mut notes = vec![format!(
        "tokenizer: SentencePiece BPE with byte fallback, {} pieces{}",
        pieces.len(),
        if add_space_prefix {
            ", space prefix"
        } else {
            ""
        }
    )];
    if flag(file, "tokenizer.ggml.add_eos_token")? == Some(true) {
        notes.push("tokenizer.ggml.add_eos_token is ignored: EOS is not appended".into());
    }
    let tok = sentencepiece_bpe(&pieces, bos_id, eos_ids, add_bos, add_space_prefix)?;
    Ok(BuiltTokenizer {
        tokenizer: Some(tok),
        notes,
    })
}
