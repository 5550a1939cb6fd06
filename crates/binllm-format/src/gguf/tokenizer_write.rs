//! A Hugging Face `tokenizer.json` (what a packed model embeds) as llama.cpp's
//! `tokenizer.ggml.*` metadata: the inverse of [`super::tokenizer`].
//!
//! Two kinds are written, the two the reader understands:
//!
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`): tokens by id, token types (added special
//!   tokens are control, other added tokens user-defined), merges, and `tokenizer.ggml.pre`
//!   recognised from the pre-tokenizer (GPT-2's regex, single digits then GPT-2 as SmolLM
//!   does, Llama 3's, Qwen2's or llama.cpp's `default`); any other pre-tokenizer is refused,
//!   because llama.cpp would split text differently.
//! - SentencePiece BPE with byte fallback (`llama`): pieces, types (unknown, control, byte,
//!   user-defined) and scores. `tokenizer.json` keeps merge ranks, not SentencePiece scores;
//!   llama.cpp merges the pair whose merged piece has the highest score, so each piece gets
//!   `-(rank of the first merge that makes it)`, which orders merges exactly as the ranks do.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::file::{MetaArray, MetaValue};
use super::tokenizer::{pre_tokenizer_json, PreSplit};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The metadata entries, and a one-line description for the export report.
pub struct TokenizerMetadata {
    pub entries: Vec<(String, MetaValue)>,
    pub description: String,
}

/// `tokenizer.ggml.pre` for each split binllm reproduces (one name llama.cpp maps to it).
fn pre_name(split: PreSplit) -> &'static str {
    match split {
        PreSplit::Gpt2 => "gpt2",
        PreSplit::DigitsThenGpt2 => "smollm",
        PreSplit::Llama3 => "llama-bpe",
        PreSplit::Qwen2 => "qwen2",
        PreSplit::Default => "default",
    }
}

/// The pre-tokenizer's steps as (type, regex or digit mode), ignoring options that do not
/// change how text is split into words.
fn pre_steps(pre: &Value) -> Vec<(String, String)> {
    let one = |p: &Value| -> (String, String) {
        let kind = p["type"].as_str().unwrap_or_default().to_string();
        let detail = match kind.as_str() {
            "Split" => p["pattern"]["Regex"]
                .as_str()
                .or_else(|| p["pattern"]["String"].as_str())
                .unwrap_or_default()
                .to_string(),
            "ByteLevel" => p["use_regex"].as_bool().unwrap_or(true).to_string(),
            // HF's Digits(individual_digits) is Split(\p{N}, Isolated).
            "Digits" if p["individual_digits"].as_bool() == Some(true) => {
                return ("Split".into(), r"\p{N}".into())
            }
            _ => p.to_string(),
        };
        (kind, detail)
    };
    match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|v| v.iter().map(one).collect())
            .unwrap_or_default(),
        _ => vec![one(pre)],
    }
}

fn recognise_pre(pre: &Value) -> Result<PreSplit> {
    let steps = pre_steps(pre);
    [
        PreSplit::Gpt2,
        PreSplit::DigitsThenGpt2,
        PreSplit::Llama3,
        PreSplit::Qwen2,
        PreSplit::Default,
    ]
    .into_iter()
    .find(|&split| pre_steps(&pre_tokenizer_json(split)) == steps)
    .ok_or_else(|| {
        anyhow!(
            "the tokenizer's pre-tokenizer ({pre}) is none that llama.cpp's gpt2 vocabulary \
             reproduces (GPT-2, SmolLM digits + GPT-2, Llama 3, Qwen2, default): refusing to \
             write a GGUF that llama.cpp would tokenize differently"
        )
    })
}

/// Whether the post-processor puts a special token before the text (BOS).
fn adds_bos(post: &Value) -> bool {
    match post["type"].as_str() {
        Some("TemplateProcessing") => post["single"]
            .as_array()
            .and_then(|s| s.first())
            .is_some_and(|first| first.get("SpecialToken").is_some()),
        Some("Sequence") => post["processors"]
            .as_array()
            .is_some_and(|v| v.iter().any(adds_bos)),
        _ => false,
    }
}

fn merge_text(m: &Value) -> Result<String> {
    match m {
        Value::String(s) => Ok(s.clone()),
        Value::Array(pair) if pair.len() == 2 => Ok(format!(
            "{} {}",
            pair[0].as_str().context("merge part is not a string")?,
            pair[1].as_str().context("merge part is not a string")?
        )),
        other => bail!("merge {other} is neither \"a b\" nor [a, b]"),
    }
}

/// Builds the metadata from `tokenizer.json` text. `vocab_rows` is the embedding's row count:
/// ids the tokenizer does not use up to it become unused `[PAD{id}]` tokens, since llama.cpp
/// wants one token per embedding row.
pub fn tokenizer_metadata(
    json: &str,
    vocab_rows: usize,
    bos_id: Option<u32>,
    eos_ids: &[u32],
) -> Result<TokenizerMetadata> {
    let spec: Value = serde_json::from_str(json).context("the embedded tokenizer.json")?;
    let model = &spec["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "tokenizer model '{}' cannot be written as GGUF metadata (BPE can)",
            model["type"]
        );
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_rows];
    let mut types = vec![NORMAL; vocab_rows];
    let mut put = |id: u64, text: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("token {text:?} has id {id}, beyond the {vocab_rows} embedding rows")
        })?;
        *slot = Some(text.to_string());
        Ok(())
    };
    for (text, id) in model["vocab"]
        .as_object()
        .context("tokenizer.json model.vocab is not a map")?
    {
        put(id.as_u64().context("a vocab id is not a number")?, text)?;
    }
    let added = spec["added_tokens"].as_array().cloned().unwrap_or_default();
    for t in &added {
        let id = t["id"].as_u64().context("an added token has no id")?;
        put(id, t["content"].as_str().unwrap_or_default())?;
    }
    for (id, t) in tokens.iter().enumerate() {
        if t.is_none() {
            types[id] = UNUSED;
        }
    }
    let sentencepiece = model["byte_fallback"].as_bool() == Some(true);
    for t in &added {
        let id = t["id"].as_u64().unwrap_or_default() as usize;
        types[id] = if t["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| m.iter().map(merge_text).collect::<Result<_>>())
        .transpose()?
        .unwrap_or_default();
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]")))
        .collect();

    let mut entries: Vec<(String, MetaValue)> = Vec::new();
    let mut set = |key: &str, value: MetaValue| entries.push((key.to_string(), value));
    let description;
    if sentencepiece {
        set("tokenizer.ggml.model", MetaValue::String("llama".into()));
        let unk = model["unk_token"].as_str();
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.as_str(), id))
            .collect();
        let mut scores = vec![0f32; tokens.len()];
        let mut scored = vec![false; tokens.len()];
        for (rank, merge) in merges.iter().enumerate() {
            let merged = merge.replacen(' ', "", 1);
            if let Some(&id) = index.get(merged.as_str()) {
                if !scored[id] {
                    scores[id] = -(rank as f32);
                    scored[id] = true;
                }
            }
        }
        for (id, t) in tokens.iter().enumerate() {
            if Some(t.as_str()) == unk {
                types[id] = UNKNOWN;
            } else if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[id] = BYTE;
            }
        }
        // The reader's normalizer prepends "▁" when llama.cpp's add_space_prefix is on.
        let space_prefix = spec["normalizer"].to_string().contains("\"Prepend\"");
        set(
            "tokenizer.ggml.add_space_prefix",
            MetaValue::Bool(space_prefix),
        );
        if let Some(id) = unk.and_then(|u| index.get(u)) {
            set(
                "tokenizer.ggml.unknown_token_id",
                MetaValue::U32(*id as u32),
            );
        }
        description = format!(
            "llama (SentencePiece BPE, byte fallback), {} tokens, scores from {} merge ranks",
            tokens.len(),
            merges.len()
        );
        set(
            "tokenizer.ggml.scores",
            MetaValue::Array(MetaArray::F32(scores)),
        );
    } else {
        let split = recognise_pre(&spec["pre_tokenizer"])?;
        set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
        set(
            "tokenizer.ggml.pre",
            MetaValue::String(pre_name(split).into()),
        );
        description = format!(
            "gpt2 (byte-level BPE), {} tokens, {} merges, pre-tokenizer '{}'",
            tokens.len(),
            merges.len(),
            pre_name(split)
        );
        set(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::String(merges)),
        );
    }
    set(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(tokens)),
    );
    set(
        "tokenizer.ggml.token_type",
        MetaValue::Array(MetaArray::I32(types)),
    );
    if let Some(bos) = bos_id {
        set("tokenizer.ggml.bos_token_id", MetaValue::U32(bos));
    }
    if let Some(&eos) = eos_ids.first() {
        set("tokenizer.ggml.eos_token_id", MetaValue::U32(eos));
    }
    set(
        "tokenizer.ggml.add_bos_token",
        MetaValue::Bool(adds_bos(&spec["post_processor"])),
    );
    set("tokenizer.ggml.add_eos_token", MetaValue::Bool(false));
    Ok(TokenizerMetadata {
        entries,
        description,
    })
}
