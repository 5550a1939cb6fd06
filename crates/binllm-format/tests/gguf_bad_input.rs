//! Damaged and unsupported GGUF files: each gives an error naming the file and the problem,
//! never a panic or a huge allocation.

use std::path::{Path, PathBuf};

use binllm_format::gguf::{self, GgufFile};
use binllm_format::{LoadOptions, PretrainedModel};

fn tiny_fixture() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny_llama.gguf");
    std::fs::read(path).unwrap()
}

/// Writes `bytes` to a fresh file and returns the error reading it as a model gives, in
/// anyhow's one-line `{:#}` form (context: cause).
fn read_error(bytes: &[u8]) -> (String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = gguf::read_model(&path, &LoadOptions::default()).unwrap_err();
    (format!("{err:#}"), path, dir)
}

fn assert_error(bytes: &[u8], problem: &[&str]) {
    let (message, path, _dir) = read_error(bytes);
    assert!(
        message.contains(&path.display().to_string()),
        "error does not name the file: {message}"
    );
    for p in problem {
        assert!(message.contains(p), "error lacks {p:?}: {message}");
    }
}

/// A minimal GGUF writer, for files gguf-py would refuse to write.
#[derive(Default)]
struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Builder {
    fn key(&mut self, key: &str, value_type: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        string(&mut self.kv, key);
        self.kv.extend(value_type.to_le_bytes());
        &mut self.kv
    }

    fn str(mut self, key: &str, value: &str) -> Self {
        string(self.key(key, 8), value);
        self
    }

    fn u32(mut self, key: &str, value: u32) -> Self {
        self.key(key, 4).extend(value.to_le_bytes());
        self
    }

    fn f32(mut self, key: &str, value: f32) -> Self {
        self.key(key, 6).extend(value.to_le_bytes());
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, n_bytes: usize) -> Self {
        self.n_tensors += 1;
        string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(std::iter::repeat_n(0u8, n_bytes));
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        self
    }

    /// A llama header with every config key binllm needs.
    fn llama() -> Self {
        Builder::default()
            .str("general.architecture", "llama")
            .u32("llama.context_length", 16)
            .u32("llama.embedding_length", 256)
            .u32("llama.feed_forward_length", 256)
            .u32("llama.block_count", 1)
            .u32("llama.attention.head_count", 4)
            .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }
}

#[test]
fn missing_file() {
    let path = Path::new("/nonexistent/dir/model.gguf");
    let err = format!(
        "{:#}",
        gguf::read_model(path, &LoadOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("/nonexistent/dir/model.gguf") && err.contains("cannot open"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        PretrainedModel::load(path, &LoadOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("/nonexistent/dir/model.gguf") && err.contains("does it exist"),
        "{err}"
    );
}

#[test]
fn wrong_magic() {
    let mut bytes = tiny_fixture();
    bytes[..4].copy_from_slice(b"GGML");
    assert_error(
        &bytes,
        &["not a valid GGUF file", "wrong magic", "\"GGML\""],
    );
}

#[test]
fn empty_file() {
    assert_error(&[], &["the file is empty"]);
}

#[test]
fn unsupported_versions() {
    let mut bytes = tiny_fixture();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_error(&bytes, &["GGUF version 1 is not supported"]);
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert_error(&bytes, &["unsupported GGUF version 7"]);
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_error(&bytes, &["big-endian GGUF files are not supported"]);
}

#[test]
fn truncated_header() {
    let bytes = tiny_fixture();
    assert_error(&bytes[..20], &["truncated", "the metadata count"]);
    // Cut inside the metadata (in the middle of the token list).
    let (message, _, _dir) = read_error(&bytes[..1000]);
    assert!(
        message.contains("truncated") && message.contains("metadata entry"),
        "{message}"
    );
}

#[test]
fn truncated_tensor_data() {
    let bytes = tiny_fixture();
    assert_error(
        &bytes[..bytes.len() - 100],
        &[
            "tensor 'output.weight'",
            "runs past the end of the file",
            "truncated",
        ],
    );
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    // A metadata count of 2^62.
    let mut bytes = Builder::llama().build();
    bytes[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_error(
        &bytes,
        &["metadata entry count", "claims 4611686018427387904"],
    );
    // A tensor count of 2^62.
    let mut bytes = Builder::llama().build();
    bytes[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_error(&bytes, &["tensor count", "claims 4611686018427387904"]);
    // An array of 2^60 u64 values, and a string of 2^60 bytes.
    let mut b = Builder::llama();
    let kv = b.key("tokenizer.ggml.scores", 9);
    kv.extend(10u32.to_le_bytes());
    kv.extend((1u64 << 60).to_le_bytes());
    assert_error(
        &b.build(),
        &[
            "'tokenizer.ggml.scores'",
            "array length",
            "claims 1152921504606846976",
        ],
    );
    let mut b = Builder::llama();
    let kv = b.key("general.name", 8);
    kv.extend((1u64 << 60).to_le_bytes());
    assert_error(&b.build(), &["'general.name'", "truncated"]);
    // Arrays nested without end.
    let mut b = Builder::llama();
    let kv = b.key("general.nested", 9);
    for _ in 0..100 {
        kv.extend(9u32.to_le_bytes());
        kv.extend(1u64.to_le_bytes());
    }
    assert_error(&b.build(), &["nested more than"]);
}

#[test]
fn absurd_tensor_shapes() {
    let b = Builder::llama().tensor("token_embd.weight", &[256, 2, 1, 1, 1], 0, 0);
    assert_error(&b.build(), &["'token_embd.weight'", "5 dimensions"]);
    let b = Builder::llama().tensor("token_embd.weight", &[1 << 40, 1 << 40], 0, 0);
    assert_error(&b.build(), &["'token_embd.weight'", "absurd dimensions"]);
    let b = Builder::llama().tensor("token_embd.weight", &[100, 2], 12, 0);
    assert_error(
        &b.build(),
        &[
            "'token_embd.weight'",
            "not a multiple of the Q4_K block size 256",
        ],
    );
}

#[test]
fn unsupported_tensor_type() {
    // IQ2_XXS: 66 bytes per 256 elements.
    let b = Builder::llama().tensor("token_embd.weight", &[256, 2], 16, 2 * 66);
    assert_error(
        &b.build(),
        &[
            "tensor 'token_embd.weight' has type IQ2_XXS",
            "cannot dequantize",
        ],
    );
    let b = Builder::llama().tensor("token_embd.weight", &[256, 2], 99, 0);
    assert_error(
        &b.build(),
        &["'token_embd.weight'", "unknown ggml type id 99"],
    );
}

#[test]
fn unsupported_models() {
    let b = Builder::default().str("general.architecture", "gemma3");
    assert_error(&b.build(), &["architecture 'gemma3' is not supported"]);
    let b = Builder::llama()
        .tensor("token_embd.weight", &[256, 2], 0, 2048)
        .tensor("rope_freqs.weight", &[32], 0, 128);
    assert_error(&b.build(), &["rope_freqs.weight", "does not support"]);
    let b = Builder::llama()
        .tensor("token_embd.weight", &[256, 2], 0, 2048)
        .tensor("blk.0.ssm_conv1d.weight", &[4], 0, 16);
    assert_error(
        &b.build(),
        &["tensor 'blk.0.ssm_conv1d.weight' is not part of a llama model"],
    );
    let b = Builder::default().str("general.architecture", "llama");
    assert_error(
        &b.build(),
        &["missing metadata key 'llama.embedding_length'"],
    );
}

#[test]
fn gguf_file_open_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.gguf");
    std::fs::write(&path, b"GGUF\x03\x00").unwrap();
    let err = format!("{:#}", GgufFile::open(&path).unwrap_err());
    assert!(
        err.contains("short.gguf") && err.contains("truncated: the version needs 4 bytes"),
        "{err}"
    );
}

/// A block count of u32::MAX in a file that holds one layer: refused at once, naming the
/// field, before anything is listed or allocated per layer.
#[test]
fn huge_block_count_is_refused_at_once() {
    let tiny = tiny_fixture();
    let file = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, &tiny).unwrap();
        GgufFile::open(&path)
            .unwrap()
            .get("llama.block_count")
            .cloned()
    };
    let layers = file.and_then(|v| v.as_u64()).unwrap();
    // The value sits right after its key and type id (4 = u32) in the header.
    let key = b"llama.block_count";
    let at = tiny.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&tiny[at..at + 4], &4u32.to_le_bytes());
    assert_eq!(&tiny[at + 4..at + 8], &(layers as u32).to_le_bytes());
    let mut bytes = tiny.clone();
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge-block-count.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let started = std::time::Instant::now();
    let err = PretrainedModel::load(&path, &LoadOptions::default()).unwrap_err();
    let message = format!("{err:#}");
    for part in [
        path.display().to_string(),
        "num_layers = 4294967295".into(),
        format!("tensors for {layers} layers"),
    ] {
        assert!(message.contains(&part), "error lacks {part:?}: {message}");
    }
    assert!(
        started.elapsed().as_secs_f64() < 1.0,
        "took {:?}",
        started.elapsed()
    );
}

/// A tensor's type id changed to one of another byte size: refused at open (it loaded
/// without a word before), as llama.cpp refuses it.
#[test]
fn a_changed_tensor_type_is_refused() {
    let tiny = tiny_fixture();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("tiny.gguf");
    std::fs::write(&good, &tiny).unwrap();
    let file = GgufFile::open(&good).unwrap();
    let first = &file.tensors[0];
    assert!(file.tensors.len() > 1, "a tensor follows the changed one");
    // Its info: name (u64 length + bytes), n_dims (u32), dims (u64 each), type id (u32).
    let mut name = (first.name.len() as u64).to_le_bytes().to_vec();
    name.extend(first.name.as_bytes());
    let at = tiny
        .windows(name.len())
        .position(|w| w == name.as_slice())
        .unwrap()
        + name.len()
        + 4
        + 8 * first.dims.len();
    let old_type = u32::from_le_bytes(tiny[at..at + 4].try_into().unwrap());
    // F32 <-> F16: both readable, of different sizes.
    let new_type: u32 = if old_type == 0 { 1 } else { 0 };
    let mut bytes = tiny.clone();
    bytes[at..at + 4].copy_from_slice(&new_type.to_le_bytes());
    let second = &file.tensors[1].name;
    let (message, path, _dir) = read_error(&bytes);
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("tensor '{second}' (index 1"))
            && message.contains("does not match the bytes"),
        "{message}"
    );
}
