//! Training data: reading corpora (.txt, .txt.gz, .jsonl, .jsonl.gz, or directories of
//! them), splitting documents, tokenizing in parallel with an on-disk cache, packing into
//! windows with EOS between documents, the seeded shuffle, the held-out validation slice and
//! the per-phase chunks.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use binllm_format::TextTokenizer;
use binllm_infer::sampling::SplitMix64;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// The line that separates documents in the plain-text corpora.
pub const DOCUMENT_SEPARATOR: &str = "<|endoftext|>";
const CACHE_MAGIC: &[u8; 8] = b"BLLMTOK1";

/// Every corpus file under `path` (itself if it is a file), sorted for a stable order.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{}: no such data file or directory", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("{}: cannot list", path.display()))?
    {
        let p = entry?.path();
        if p.is_dir() {
            files.extend(corpus_files(&p)?);
        } else if is_corpus_file(&p) {
            files.push(p);
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no .txt, .txt.gz, .jsonl or .jsonl.gz files in this directory",
        path.display()
    );
    Ok(files)
}

fn is_corpus_file(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    [".txt", ".txt.gz", ".jsonl", ".jsonl.gz"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// The documents of one corpus file: split on `<|endoftext|>` lines for text, one per
/// record (its `text` field) for JSON lines.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let name = path.to_string_lossy();
    let jsonl = name.ends_with(".jsonl") || name.ends_with(".jsonl.gz");
    let mut reader = open_text(path)?;
    let mut docs = Vec::new();
    if jsonl {
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| {
                format!(
                    "{}: line {}: cannot read (corrupt gzip?)",
                    path.display(),
                    i + 1
                )
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let record: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}: line {}: not valid JSON", path.display(), i + 1))?;
            let text = record
                .get("text")
                .and_then(|t| t.as_str())
                .with_context(|| {
                    format!(
                        "{}: line {}: no string field \"text\"",
                        path.display(),
                        i + 1
                    )
                })?;
            if !text.trim().is_empty() {
                docs.push(text.to_string());
            }
        }
    } else {
        let mut text = String::new();
        reader.read_to_string(&mut text).with_context(|| {
            format!(
                "{}: cannot read as UTF-8 text (corrupt gzip?)",
                path.display()
            )
        })?;
        let mut current = String::new();
        for line in text.split_inclusive('\n') {
            if line.trim_end_matches(['\n', '\r']) == DOCUMENT_SEPARATOR {
                docs.push(std::mem::take(&mut current));
            } else {
                current.push_str(line);
            }
        }
        docs.push(current);
        docs.retain(|d| !d.trim().is_empty());
        for d in &mut docs {
            // The separator line's own newline belongs to neither document.
            if d.ends_with('\n') {
                d.pop();
            }
        }
    }
    Ok(docs)
}

/// A tokenized corpus: documents concatenated, each followed by EOS (and preceded by BOS
/// when the tokenizer adds one).
#[derive(Debug, Clone)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    pub documents: usize,
}

/// Tokenizes `paths` with `tokenizer`, reusing `cache_dir/<key>.tok` when the same
/// tokenizer already tokenized the same file contents.
pub fn tokenize_corpus(
    paths: &[PathBuf],
    tokenizer: &TextTokenizer,
    cache_dir: Option<&Path>,
) -> Result<TokenStream> {
    let eos = *tokenizer
        .eos_ids
        .first()
        .context("the tokenizer has no end-of-sequence token to separate documents")?;
    let key = cache_key(paths, tokenizer)?;
    let cache_file = cache_dir.map(|d| d.join(format!("{key}.tok")));
    if let Some(file) = &cache_file {
        if let Ok(stream) = read_cache(file) {
            return Ok(stream);
        }
    }
    let mut tokens = Vec::new();
    let mut documents = 0;
    for path in paths {
        let docs = read_documents(path)?;
        let progress = binllm_progress::Progress::new(
            docs.len() as u64,
            &format!("tokenizing {}", path.display()),
        );
        let encoded: Vec<Vec<u32>> = docs
            .par_iter()
            .map(|doc| {
                let ids = tokenizer.encode(doc, true);
                progress.inc(1);
                ids
            })
            .collect::<Result<_>>()
            .with_context(|| format!("{}: tokenizing failed", path.display()))?;
        progress.finish_and_clear();
        documents += encoded.len();
        for ids in encoded {
            tokens.extend(ids);
            tokens.push(eos);
        }
    }
    ensure!(
        !tokens.is_empty(),
        "no text found in {}: the corpus is empty",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let stream = TokenStream { tokens, documents };
    if let Some(file) = &cache_file {
        // A cache that cannot be written only costs time next run.
        if let Err(err) = write_cache(file, &stream) {
            eprintln!(
                "warning: could not write the token cache {}: {err:#}",
                file.display()
            );
        }
    }
    Ok(stream)
}

/// sha256 over the tokenizer's definition and every source file's bytes.
fn cache_key(paths: &[PathBuf], tokenizer: &TextTokenizer) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(CACHE_MAGIC);
    hasher.update(tokenizer.to_json()?.as_bytes());
    hasher.update(format!("{:?}{:?}", tokenizer.bos_id, tokenizer.eos_ids).as_bytes());
    for path in paths {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        hasher.update(Sha256::digest(&bytes));
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn read_cache(path: &Path) -> Result<TokenStream> {
    let bytes = std::fs::read(path)?;
    ensure!(
        bytes.len() >= 24 && &bytes[..8] == CACHE_MAGIC,
        "not a token cache"
    );
    let count = u64::from_le_bytes(bytes[8..16].try_into()?) as usize;
    let documents = u64::from_le_bytes(bytes[16..24].try_into()?) as usize;
    ensure!(bytes.len() == 24 + 4 * count, "truncated token cache");
    let tokens = bytes[24..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(TokenStream { tokens, documents })
}

fn write_cache(path: &Path, stream: &TokenStream) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + 4 * stream.tokens.len());
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&(stream.tokens.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(stream.documents as u64).to_le_bytes());
    for t in &stream.tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    binllm_format::atomic::write_atomically(path, &bytes)
}

/// The token stream cut into windows of `seq_len + 1` tokens (inputs and shifted targets),
/// split into a held-out validation slice and a shuffled training order; optionally a second
/// pool of windows (the teacher's chat transcripts) mixed into training at a fixed share.
#[derive(Debug, Clone)]
pub struct Windows {
    pub stream: Vec<u32>,
    pub seq_len: usize,
    /// Start offsets of training windows, in training order.
    pub train: Vec<usize>,
    /// Start offsets of the validation windows (the end of the corpus, never trained on).
    pub validation: Vec<usize>,
    /// Start offsets of chat windows (after the corpus in `stream`), in training order.
    pub chat: Vec<usize>,
    /// Share of training windows drawn from `chat` (0 when there is none).
    pub chat_share: f64,
    /// Tokens of the corpus at the head of `stream` (the chat tokens follow them).
    pub corpus_tokens: usize,
}

impl Windows {
    pub fn new(
        stream: Vec<u32>,
        seq_len: usize,
        validation_windows: usize,
        seed: u64,
    ) -> Result<Self> {
        ensure!(seq_len >= 2, "sequence length must be at least 2");
        let count = stream.len().saturating_sub(1) / seq_len;
        ensure!(
            count > validation_windows,
            "the corpus has {} tokens: {count} windows of {seq_len}, not enough for {validation_windows} validation windows plus training",
            stream.len()
        );
        let stream_len = stream.len();
        let starts: Vec<usize> = (0..count).map(|i| i * seq_len).collect();
        let (train, validation) = starts.split_at(count - validation_windows);
        let mut train = train.to_vec();
        SplitMix64::new(seed).shuffle(&mut train);
        Ok(Windows {
            stream,
            seq_len,
            train,
            validation: validation.to_vec(),
            chat: Vec::new(),
            chat_share: 0.0,
            corpus_tokens: stream_len,
        })
    }

    /// Appends a second token stream (chat transcripts) as its own pool of windows, drawn
    /// for `share` of all training windows.
    pub fn add_chat(&mut self, tokens: &[u32], share: f64, seed: u64) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&share),
            "the chat share must be in [0, 1), not {share}"
        );
        let base = self.stream.len();
        let count = tokens.len().saturating_sub(1) / self.seq_len;
        ensure!(
            count > 0 || share == 0.0,
            "the chat data has {} tokens, less than one window of {}",
            tokens.len(),
            self.seq_len
        );
        self.stream.extend_from_slice(tokens);
        self.chat = (0..count).map(|i| base + i * self.seq_len).collect();
        // A seed apart from the corpus order's, so the two pools are not shuffled alike.
        SplitMix64::new(seed ^ 0x5eed_c4a7).shuffle(&mut self.chat);
        self.chat_share = if count > 0 { share } else { 0.0 };
        Ok(())
    }

    /// Start of training window `i` (counting every window of every step from 0). Chat
    /// windows are spaced evenly: window i is a chat window when floor((i + 1) * share)
    /// passes an integer, so every stretch of n windows holds n * share of them, +-1. Each
    /// pool is gone through in its own shuffled order and repeats when exhausted.
    pub fn training_window(&self, i: usize) -> usize {
        if self.chat.is_empty() || self.chat_share <= 0.0 {
            return self.train[i % self.train.len()];
        }
        let chat_before = (i as f64 * self.chat_share).floor() as usize;
        let chat_through = ((i + 1) as f64 * self.chat_share).floor() as usize;
        if chat_through > chat_before {
            self.chat[chat_before % self.chat.len()]
        } else {
            self.train[(i - chat_before) % self.train.len()]
        }
    }

    /// How many times the corpus and the chat pools are gone through by `windows` training
    /// windows.
    pub fn passes(&self, windows: usize) -> (f64, f64) {
        let chat = (windows as f64 * self.chat_share).floor();
        let corpus = windows as f64 - chat;
        (
            corpus / self.train.len().max(1) as f64,
            if self.chat.is_empty() {
                0.0
            } else {
                chat / self.chat.len() as f64
            },
        )
    }

    /// Tokens of one window: `seq_len + 1` ids.
    pub fn window(&self, start: usize) -> &[u32] {
        &self.stream[start..start + self.seq_len + 1]
    }

    /// `[n, seq_len]` inputs and targets for the windows at `starts`.
    pub fn batch(&self, starts: &[usize], device: tch::Device) -> (tch::Tensor, tch::Tensor) {
        let mut inputs = Vec::with_capacity(starts.len() * self.seq_len);
        let mut targets = Vec::with_capacity(starts.len() * self.seq_len);
        for &s in starts {
            let w = self.window(s);
            inputs.extend(w[..self.seq_len].iter().map(|&t| t as i64));
            targets.extend(w[1..].iter().map(|&t| t as i64));
        }
        let shape = [starts.len() as i64, self.seq_len as i64];
        (
            tch::Tensor::from_slice(&inputs)
                .view(shape)
                .to_device(device),
            tch::Tensor::from_slice(&targets)
                .view(shape)
                .to_device(device),
        )
    }
}

/// Parses a `--data` argument: a path, or `teacher:N` (N tokens sampled from the FP model).
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Path(PathBuf),
    Teacher { tokens: usize },
}

impl std::str::FromStr for DataSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(n) = s.strip_prefix("teacher:") {
            let tokens = parse_count(n).with_context(|| {
                format!("bad --data '{s}': expected teacher:N, e.g. teacher:2M")
            })?;
            return Ok(DataSpec::Teacher { tokens });
        }
        Ok(DataSpec::Path(PathBuf::from(s)))
    }
}

const MAX_COUNT: f64 = 1e15;

/// `2000`, `500k`, `2M`, `1.5G` -> a count.
pub fn parse_count(s: &str) -> Result<usize> {
    let s = s.trim();
    let (number, factor) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('g' | 'G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let value: f64 = number
        .parse()
        .with_context(|| format!("'{s}' is not a number"))?;
    if !(value >= 0.0 && value.is_finite()) {
        bail!("'{s}' is not a non-negative count");
    }
    let count = value * factor;
    // A quadrillion tokens is far past any budget; beyond it a typo is likelier than intent,
    // and f64 stops counting whole numbers exactly soon after.
    if count > MAX_COUNT {
        bail!("'{s}' is too large: counts go up to 1e15 (1000000G)");
    }
    Ok(count.round() as usize)
}

/// Token ids as little-endian u32 bytes (the run directory's `.tok` files).
pub fn tokens_to_le_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// The inverse of [`tokens_to_le_bytes`] (a trailing partial id is ignored).
pub fn tokens_from_le_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes a token stream as a text corpus for inspection (debug helper of `--data teacher:N`).
pub fn dump_sample(tokenizer: &TextTokenizer, tokens: &[u32], path: &Path) -> Result<()> {
    let text = tokenizer.decode(tokens, false)?;
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_with_suffixes() {
        assert_eq!(parse_count("2000").unwrap(), 2000);
        assert_eq!(parse_count("500k").unwrap(), 500_000);
        assert_eq!(parse_count("1.5M").unwrap(), 1_500_000);
        assert!(parse_count("lots").is_err());
        assert!(parse_count("99999999999999999999").is_err());
        assert!(parse_count("-5").is_err());
        assert_eq!(parse_count("1000000G").unwrap(), 1_000_000_000_000_000);
    }

    #[test]
    fn windows_cover_the_stream_without_overlap_and_hold_out_the_end() {
        let stream: Vec<u32> = (0..101).collect();
        let w = Windows::new(stream, 10, 2, 1).unwrap();
        assert_eq!(w.train.len() + w.validation.len(), 10);
        assert_eq!(w.validation, vec![80, 90]);
        let mut sorted = w.train.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).map(|i| i * 10).collect::<Vec<_>>());
        assert_ne!(w.train, sorted, "the training order is shuffled");
        assert_eq!(w.window(90), &(90..101).collect::<Vec<u32>>()[..]);
    }

    #[test]
    fn chat_windows_are_mixed_in_at_their_share_and_never_validated() {
        let stream: Vec<u32> = (0..1001).collect();
        let mut w = Windows::new(stream, 10, 5, 3).unwrap();
        let chat: Vec<u32> = (5000..5201).collect();
        w.add_chat(&chat, 0.25, 3).unwrap();
        assert_eq!(w.chat.len(), 20);
        assert!(w.chat.iter().all(|&s| s >= 1001 && w.window(s)[0] >= 5000));
        assert!(w.validation.iter().all(|&s| w.window(s)[0] < 1000));
        // Every run of 16 consecutive windows holds 4 chat windows (share 0.25), and each
        // pool is used in its own order without repeats until it is exhausted.
        let drawn: Vec<usize> = (0..400).map(|i| w.training_window(i)).collect();
        for run in drawn.chunks(16) {
            assert_eq!(run.iter().filter(|s| w.chat.contains(s)).count(), 4);
        }
        let chat_order: Vec<usize> = drawn
            .iter()
            .copied()
            .filter(|s| w.chat.contains(s))
            .collect();
        assert_eq!(chat_order[..20], w.chat[..]);
        assert_eq!(chat_order[20..40], w.chat[..]);
        let corpus_order: Vec<usize> = drawn
            .iter()
            .copied()
            .filter(|s| !w.chat.contains(s))
            .collect();
        assert_eq!(corpus_order[..w.train.len()], w.train[..]);
        let (corpus_passes, chat_passes) = w.passes(400);
        assert!((chat_passes - 5.0).abs() < 1e-9 && (corpus_passes - 300.0 / 95.0).abs() < 1e-9);
        // Without chat data the order is the corpus order alone.
        let plain = Windows::new((0..1001).collect(), 10, 5, 3).unwrap();
        assert!((0..200).all(|i| plain.training_window(i) == plain.train[i % plain.train.len()]));
        assert!(w.add_chat(&chat, 1.0, 3).is_err());
    }

    #[test]
    fn text_documents_split_on_separator_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(
            &path,
            "first doc\nline two\n<|endoftext|>\nsecond\n<|endoftext|>\n",
        )
        .unwrap();
        assert_eq!(
            read_documents(&path).unwrap(),
            vec!["first doc\nline two", "second"]
        );
    }

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, "{\"text\": \"ok\"}\n{\"body\": 1}\n").unwrap();
        let err = format!("{:#}", read_documents(&path).unwrap_err());
        assert!(
            err.contains("c.jsonl: line 2") && err.contains("text"),
            "{err}"
        );
    }
}
