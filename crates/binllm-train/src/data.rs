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
        let progress =
            crate::progress::bar(docs.len() as u64, &format!("tokenizing {}", path.display()));
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
/// split into a held-out validation slice and a shuffled training order.
#[derive(Debug, Clone)]
pub struct Windows {
    pub stream: Vec<u32>,
    pub seq_len: usize,
    /// Start offsets of training windows, in training order.
    pub train: Vec<usize>,
    /// Start offsets of the validation windows (the end of the stream, never trained on).
    pub validation: Vec<usize>,
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
        let starts: Vec<usize> = (0..count).map(|i| i * seq_len).collect();
        let (train, validation) = starts.split_at(count - validation_windows);
        let mut train = train.to_vec();
        SplitMix64::new(seed).shuffle(&mut train);
        Ok(Windows {
            stream,
            seq_len,
            train,
            validation: validation.to_vec(),
        })
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
    Ok((value * factor).round() as usize)
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
