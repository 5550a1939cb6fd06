//! One tokenizer type for every source format, backed by Hugging Face `tokenizers`.
//!
//! Hugging Face directories ship `tokenizer.json`; GGUF files carry their vocabulary in
//! metadata ([`crate::gguf::tokenizer`]); llama2.c ships `tok*.bin` or a SentencePiece
//! `.model` ([`crate::llama2c`]). All of them become a `tokenizers::Tokenizer` here, so
//! encoding and decoding behave the same whatever the model came from.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE with merges (SmolLM, Llama 3, Qwen).
    ByteLevelBpe,
    /// SentencePiece BPE with byte fallback (Llama 2, Mistral, llama2.c).
    SentencePieceBpe,
    /// A `tokenizer.json` whose model we did not classify further.
    HuggingFace,
}

impl TokenizerKind {
    pub fn label(self) -> &'static str {
        match self {
            TokenizerKind::ByteLevelBpe => "byte-level BPE (gpt2 style)",
            TokenizerKind::SentencePieceBpe => "SentencePiece BPE with byte fallback",
            TokenizerKind::HuggingFace => "Hugging Face tokenizer.json",
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub kind: TokenizerKind,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// Refuses what the tokenizers crate reads without complaint but panics on later (fuzzing
/// found these): SentencePiece's compiled character map (`Precompiled` normalizer, Unigram
/// models such as T5, no model binllm runs), a `TemplateProcessing` post-processor naming a
/// special token its own table lacks (a panic at the first encode), and a `Strip` decoder
/// cutting characters at the end (a panic decoding an empty token).
fn refuse_known_panics(value: &serde_json::Value) -> Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            // The crate also reads components without (or with a damaged) "type" by their
            // fields alone, so each is recognised by its type or by its fields.
            let kind = map.get("type").and_then(|t| t.as_str());
            let has = |keys: &[&str]| keys.iter().all(|k| map.contains_key(*k));
            if kind == Some("Precompiled") || has(&["precompiled_charsmap"]) {
                bail!("a Precompiled normalizer (SentencePiece character map) is not supported");
            }
            if kind == Some("TemplateProcessing") || has(&["single", "special_tokens"]) {
                check_template_processing(map)?;
            }
            // Llama's tokenizers strip one leading space (start 1, stop 0); cutting at the
            // end indexes past an empty token.
            let strip = kind == Some("Strip") || has(&["content", "start", "stop"]);
            if strip && map.get("stop").and_then(|v| v.as_u64()) != Some(0) {
                bail!(
                    "a Strip decoder that cuts at the end (stop = {}) is not supported",
                    map.get("stop")
                        .map_or_else(|| "missing".into(), |v| v.to_string())
                );
            }
            map.values().try_for_each(refuse_known_panics)
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(refuse_known_panics),
        _ => Ok(()),
    }
}

/// Every BPE merge must make a token of the vocabulary. The tokenizers crate checks this
/// too, but only after copying the pair into a buffer as long as the longest token, which
/// panics when the pair is longer (fuzzing found it).
fn check_bpe_merges(model: &serde_json::Value) -> Result<()> {
    let (Some(vocab), Some(merges)) = (
        model.get("vocab").and_then(|v| v.as_object()),
        model.get("merges").and_then(|m| m.as_array()),
    ) else {
        return Ok(());
    };
    let prefix = model
        .get("continuing_subword_prefix")
        .and_then(|p| p.as_str())
        .unwrap_or("");
    for (index, merge) in merges.iter().enumerate() {
        let (first, second) = match merge {
            serde_json::Value::String(pair) => match pair.split_once(' ') {
                Some(parts) => parts,
                None => continue,
            },
            serde_json::Value::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(serde_json::Value::String(a)), Some(serde_json::Value::String(b))) => {
                    (a.as_str(), b.as_str())
                }
                _ => continue,
            },
            _ => continue,
        };
        let Some(rest) = second.strip_prefix(prefix) else {
            bail!("merge {index} ({first:?}, {second:?}): the second part lacks the continuing_subword_prefix {prefix:?}");
        };
        let merged = format!("{first}{rest}");
        if !vocab.contains_key(&merged) {
            bail!("merge {index} ({first:?}, {second:?}) makes {merged:?}, which is not in the vocabulary");
        }
    }
    Ok(())
}

fn check_template_processing(map: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let defined = map.get("special_tokens").and_then(|t| t.as_object());
    let pieces = ["single", "pair"]
        .iter()
        .filter_map(|key| map.get(*key)?.as_array())
        .flatten();
    for piece in pieces {
        let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")) else {
            continue;
        };
        let id = id.as_str().unwrap_or_default();
        if !defined.is_some_and(|d| d.contains_key(id)) {
            bail!(
                "post_processor TemplateProcessing uses special token {id:?}, which its special_tokens do not define"
            );
        }
    }
    Ok(())
}

impl TextTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        kind: TokenizerKind,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
    ) -> Self {
        TextTokenizer {
            inner,
            kind,
            bos_id,
            eos_ids,
        }
    }

    /// Reads a `tokenizer.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json_bytes(&bytes)
            .with_context(|| format!("{}: not a valid tokenizer.json", path.display()))
    }

    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        // Parsed here first: the tokenizers crate panics on some malformed documents (a
        // syntax error inside the decoder, a damaged Precompiled normalizer, a template
        // naming an undefined special token) instead of returning an error. From a parsed
        // value its deserialisers cannot meet the first; the others are refused by
        // `refuse_known_panics`; anything else it panics on is caught.
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| anyhow!("not JSON: {e}"))?;
        if let Some(model) = value.get("model") {
            check_bpe_merges(model).context("its model")?;
        }
        // Only the pipeline's components: the model's vocabulary is a map whose keys are
        // words ("start", "stop", "content"...), not fields.
        for component in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
            if let Some(part) = value.get(component) {
                refuse_known_panics(part).with_context(|| format!("its {component}"))?;
            }
        }
        let inner = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serde_json::from_value::<tokenizers::Tokenizer>(value)
        }))
        .map_err(|_| anyhow!("the tokenizers library failed on it (it panicked)"))?
        .map_err(|e| anyhow!("{e}"))?;
        let kind = match inner.get_model() {
            tokenizers::models::ModelWrapper::BPE(bpe) if bpe.byte_fallback => {
                TokenizerKind::SentencePieceBpe
            }
            tokenizers::models::ModelWrapper::BPE(_) => TokenizerKind::ByteLevelBpe,
            _ => TokenizerKind::HuggingFace,
        };
        Ok(TextTokenizer::new(inner, kind, None, Vec::new()))
    }

    /// Serialises to `tokenizer.json` text (embedded in exported files).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| anyhow!("{e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text`. With `add_special_tokens` the tokenizer's post-processor runs (for
    /// Llama-style tokenizers it prepends BOS), exactly as transformers' `tokenizer(text)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // The tokenizers crate panics on some documents it accepted: an error here, not a crash.
        let encoding = std::panic::catch_unwind(|| self.inner.encode(text, add_special_tokens))
            .map_err(|_| anyhow!("tokenizing failed: the tokenizers library panicked"))?
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        std::panic::catch_unwind(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|_| anyhow!("detokenizing failed: the tokenizers library panicked"))?
            .map_err(|e| anyhow!("detokenizing failed: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a stream of token ids into text pieces as soon as they are complete UTF-8
/// (a character split over several byte-fallback tokens is held back until whole).
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        StreamDecoder {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        // Decoding a longer sequence may rewrite earlier characters (SentencePiece strips
        // the leading space of the first piece only); never emit less than a char boundary.
        let mut start = self.emitted.min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let piece = text[start..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

/// One SentencePiece vocabulary entry, as llama2.c's `tok*.bin`, SentencePiece's `.model`
/// and GGUF's `tokenizer.ggml.*` (model "llama") all describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePiece {
    /// The piece with SentencePiece's "▁" for spaces, or `<0xAB>` for a byte token.
    pub piece: String,
    pub score: f32,
    pub kind: PieceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Byte,
    Unused,
}

/// Builds a SentencePiece-BPE tokenizer with byte fallback (the Llama 2 family) from its
/// pieces and scores.
///
/// Merges are derived from the scores the way transformers' `SentencePieceExtractor` does:
/// every split of a piece into two pieces that are both in the vocabulary is a merge, ranked
/// by the merged piece's score (highest first). Greedy highest-score merging is exactly what
/// SentencePiece BPE and llama2.c's `encode` do.
pub fn sentencepiece_bpe(
    pieces: &[SentencePiece],
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_dummy_prefix: bool,
) -> Result<TextTokenizer> {
    use serde_json::json;
    let mut vocab = serde_json::Map::new();
    let mut ids = std::collections::HashMap::new();
    for (id, p) in pieces.iter().enumerate() {
        vocab.insert(p.piece.clone(), json!(id));
        ids.insert(p.piece.as_str(), id);
    }
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, p) in pieces.iter().enumerate() {
        if p.kind != PieceKind::Normal && p.kind != PieceKind::UserDefined {
            continue;
        }
        let mut local = Vec::new();
        for (split, _) in p.piece.char_indices().skip(1) {
            let (left, right) = p.piece.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                local.push((l, r));
            }
        }
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (p.score, id, l, r)));
    }
    // Stable sort by score, highest first; ties keep vocabulary order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<_> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([pieces[l].piece, pieces[r].piece]))
        .collect();

    let unk = pieces
        .iter()
        .find(|p| p.kind == PieceKind::Unknown)
        .map(|p| p.piece.clone());
    let added: Vec<_> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            matches!(
                p.kind,
                PieceKind::Control | PieceKind::Unknown | PieceKind::UserDefined
            )
        })
        .map(|(id, p)| {
            json!({"id": id, "content": p.piece, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": p.kind == PieceKind::UserDefined,
                   "special": p.kind != PieceKind::UserDefined})
        })
        .collect();
    let mut normalizers = Vec::new();
    if add_dummy_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_dummy_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post_processor = match (add_bos, bos_id) {
        (true, Some(bos)) => {
            let bos_text = &pieces
                .get(bos as usize)
                .with_context(|| {
                    format!(
                        "BOS id {bos} is outside the {}-piece vocabulary",
                        pieces.len()
                    )
                })?
                .piece;
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_text.clone(): {"id": bos_text, "ids": [bos], "tokens": [bos_text]}}
            })
        }
        _ => serde_json::Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    });
    let mut tok = TextTokenizer::from_json_bytes(spec.to_string().as_bytes())
        .context("building the SentencePiece BPE tokenizer")?;
    tok.kind = TokenizerKind::SentencePieceBpe;
    tok.bos_id = bos_id;
    tok.eos_ids = eos_ids;
    Ok(tok)
}
