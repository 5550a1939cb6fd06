//! Damaged and unsupported Hugging Face directories and llama2.c checkpoints: each gives an
//! error naming the file and the problem, never a panic.
//!
//! The valid inputs are a synthetic HF directory ([`write_hf_dir`]) and stories260K, copied
//! into a temporary directory and damaged there.

use std::path::{Path, PathBuf};

use binllm_format::{LoadOptions, PretrainedModel};
use binllm_testing::shared::stories260k_dir;
use binllm_testing::synthetic::write_hf_dir;
use serde_json::{json, Value};

fn tiny_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    })
}

/// A valid tiny Hugging Face directory (config.json + model.safetensors) in a fresh temp dir.
fn hf_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(&tiny_config(), dir.path()).unwrap();
    dir
}

fn write_config(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Loads `path`, which must fail, and returns the error in anyhow's one-line `{:#}` form
/// (every context, then the cause).
fn load_error(path: &Path, options: &LoadOptions) -> String {
    match PretrainedModel::load(path, options) {
        Ok(_) => panic!("{} loaded, but it should not", path.display()),
        Err(err) => format!("{err:#}"),
    }
}

/// Loading `path` fails with an error that names `file` and contains every `problem`.
fn assert_error_with(path: &Path, options: &LoadOptions, file: &Path, problem: &[&str]) {
    let message = load_error(path, options);
    assert!(
        message.contains(&file.display().to_string()),
        "error does not name {}: {message}",
        file.display()
    );
    for p in problem {
        assert!(message.contains(p), "error lacks {p:?}: {message}");
    }
}

fn assert_error(path: &Path, file: &Path, problem: &[&str]) {
    assert_error_with(path, &LoadOptions::default(), file, problem);
}

/// A writable copy of `name` from the stories260K directory, in `dir`.
fn copy_stories(name: &str, dir: &Path) -> PathBuf {
    let bytes = std::fs::read(stories260k_dir().join(name)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// stories260K.bin with tok512.bin beside it, in a fresh temp dir.
fn stories_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_stories("stories260K.bin", dir.path());
    copy_stories("tok512.bin", dir.path());
    (dir, model)
}

/// Sets i32 field `index` of a legacy llama2.c header (dim, hidden_dim, n_layers, n_heads,
/// n_kv_heads, vocab_size, seq_len).
fn set_header_field(path: &Path, index: usize, value: i32) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn truncate_to(path: &Path, len: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..len]).unwrap();
}

// The undamaged inputs load, so each failure below comes from its damage alone.

#[test]
fn undamaged_inputs_load() {
    let dir = hf_dir();
    let model = PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(model.config.hidden_size, 32);

    let (_dir, path) = stories_copy();
    let model = PretrainedModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(model.tokenizer.unwrap().vocab_size(), 512);
}

// Hugging Face directories.

#[test]
fn hf_directory_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-model");
    assert_error(&path, &path, &["cannot open model", "does it exist"]);
}

#[test]
fn hf_config_missing() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    std::fs::remove_file(&config).unwrap();
    assert_error(
        dir.path(),
        &config,
        &["cannot read", "is this a Hugging Face model directory"],
    );
}

#[test]
fn hf_config_not_json() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{\"model_type\": \"llama\", hidden_size: 32").unwrap();
    assert_error(dir.path(), &config, &["not valid JSON"]);
}

#[test]
fn hf_config_missing_field() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    let mut json = tiny_config();
    json.as_object_mut().unwrap().remove("hidden_size");
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &[
            "unusable model config",
            "missing the integer field 'hidden_size'",
        ],
    );
    // A field of the wrong type is as good as missing.
    json["hidden_size"] = json!("32");
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &["missing the integer field 'hidden_size'"],
    );
}

#[test]
fn hf_config_absurd_sizes() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    for (key, value) in [
        ("hidden_size", json!(1u64 << 40)),
        ("num_key_value_heads", json!(u64::MAX)),
        ("head_dim", json!(1u64 << 62)),
    ] {
        let mut json = tiny_config();
        json[key] = value;
        write_config(dir.path(), &json);
        assert_error(
            dir.path(),
            &config,
            &[&format!("field '{key}'"), "implausibly large"],
        );
    }
}

#[test]
fn hf_config_with_millions_of_layers_fails_at_once() {
    // A layer count far beyond the tensors must be refused before anything is listed or
    // allocated per layer (it grew to 5.5 GB before).
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    let mut json = tiny_config();
    json["num_hidden_layers"] = json!(16_000_000);
    write_config(dir.path(), &json);
    let started = std::time::Instant::now();
    assert_error(
        dir.path(),
        &config,
        &["num_layers = 16000000", "tensors for 2 layers"],
    );
    assert!(
        started.elapsed().as_secs_f64() < 1.0,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn hf_unsupported_architecture() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    let mut json = tiny_config();
    json["architectures"] = json!(["GPT2LMHeadModel"]);
    json["model_type"] = json!("gpt2");
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &["unsupported architecture 'gpt2'", "supported: llama"],
    );
    json.as_object_mut().unwrap().remove("model_type");
    write_config(dir.path(), &json);
    assert_error(dir.path(), &config, &["has no model_type"]);
}

#[test]
fn hf_weights_missing() {
    let dir = hf_dir();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_error(
        dir.path(),
        dir.path(),
        &["no model.safetensors or model.safetensors.index.json"],
    );
}

#[test]
fn hf_weights_truncated() {
    let dir = hf_dir();
    let weights = dir.path().join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();

    // In half: the header is whole, the tensor data is not.
    std::fs::write(&weights, &full[..full.len() / 2]).unwrap();
    assert_error(
        dir.path(),
        &weights,
        &[
            "not a valid safetensors file",
            "the file is truncated",
            &format!(
                "{} bytes, but its header describes {}",
                full.len() / 2,
                full.len()
            ),
        ],
    );
    // Inside the JSON header.
    std::fs::write(&weights, &full[..40]).unwrap();
    assert_error(
        dir.path(),
        &weights,
        &["header but the file has 40 bytes", "truncated"],
    );
    // Inside the header length, and empty.
    for len in [5, 0] {
        std::fs::write(&weights, &full[..len]).unwrap();
        assert_error(
            dir.path(),
            &weights,
            &[
                "the file is truncated",
                &format!("{len} bytes, less than the 8-byte header length"),
            ],
        );
    }
    // The opposite: bytes after the last tensor.
    let mut longer = full.clone();
    longer.extend([0u8; 12]);
    std::fs::write(&weights, &longer).unwrap();
    assert_error(dir.path(), &weights, &["12 bytes follow the last tensor"]);
}

/// Writes `value` (as the tensor's own dtype, f32/f16/bf16) over element `index` of tensor
/// `name` in a safetensors file.
fn poke(path: &Path, name: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let entry = &header[name];
    let start = 8 + header_len + entry["data_offsets"][0].as_u64().unwrap() as usize;
    let encoded: Vec<u8> = match entry["dtype"].as_str().unwrap() {
        "F32" => value.to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(value).to_le_bytes().to_vec(),
        "BF16" => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        other => panic!("poke: dtype {other}"),
    };
    let at = start + index * encoded.len();
    bytes[at..at + encoded.len()].copy_from_slice(&encoded);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn hf_non_finite_weights_are_refused_by_name() {
    for value in [f32::NAN, f32::INFINITY] {
        let dir = hf_dir();
        let weights = dir.path().join("model.safetensors");
        poke(&weights, "model.layers.1.mlp.up_proj.weight", 7, value);
        let err = load_error(dir.path(), &LoadOptions::default());
        assert!(
            err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("element 7"),
            "{err}"
        );
    }
}

#[test]
fn hf_weights_corrupt_header() {
    let dir = hf_dir();
    let weights = dir.path().join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();

    // Garbage from the first byte: the header length is absurd.
    let garbage: Vec<u8> = (0..full.len())
        .map(|i| (i * 7919 % 251) as u8 | 0x80)
        .collect();
    std::fs::write(&weights, &garbage).unwrap();
    assert_error(
        dir.path(),
        &weights,
        &["not a valid safetensors file", "corrupt header"],
    );
    // A sound header length, garbage where the JSON should be.
    let mut bytes = full.clone();
    bytes[8..40].fill(0xff);
    std::fs::write(&weights, &bytes).unwrap();
    assert_error(dir.path(), &weights, &["corrupt header: not UTF-8"]);
    let mut bytes = full.clone();
    bytes[8..40].fill(b'#');
    std::fs::write(&weights, &bytes).unwrap();
    assert_error(dir.path(), &weights, &["corrupt header: not valid JSON"]);
}

#[test]
fn hf_shard_missing() {
    let dir = hf_dir();
    let shard1 = "model-00001-of-00002.safetensors";
    let shard2 = "model-00002-of-00002.safetensors";
    let model = PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join(shard1),
    )
    .unwrap();
    let index_path = dir.path().join("model.safetensors.index.json");

    // A one-shard index loads: the sharded path works.
    let mut weight_map: serde_json::Map<String, Value> = model
        .tensors
        .keys()
        .map(|name| (name.clone(), json!(shard1)))
        .collect();
    let write_index = |map: &serde_json::Map<String, Value>| {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(&index_path, index.to_string()).unwrap();
    };
    write_index(&weight_map);
    PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();

    weight_map.insert("lm_head.weight".into(), json!(shard2));
    write_index(&weight_map);
    assert_error(
        dir.path(),
        &index_path,
        &[
            &format!("names the shard {}", dir.path().join(shard2).display()),
            "missing",
        ],
    );

    std::fs::write(&index_path, "{\"weight_map\": ").unwrap();
    assert_error(dir.path(), &index_path, &["not valid JSON"]);
    std::fs::write(&index_path, "{\"metadata\": {}}").unwrap();
    assert_error(dir.path(), &index_path, &["no weight_map"]);
}

#[test]
fn hf_config_disagrees_with_tensors() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");

    let mut json = tiny_config();
    json["hidden_size"] = json!(64);
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &[
            "config disagrees with the tensors",
            "tensor 'model.embed_tokens.weight' has shape [64, 32] but the config implies [64, 64]",
        ],
    );

    let mut json = tiny_config();
    json["num_hidden_layers"] = json!(3);
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &[
            "config disagrees with the tensors",
            "config calls for tensor 'model.layers.2.",
            "which the file does not have",
        ],
    );

    let mut json = tiny_config();
    json["num_hidden_layers"] = json!(1);
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &["tensors the config does not account for", "model.layers.1."],
    );

    let mut json = tiny_config();
    json["num_key_value_heads"] = json!(3);
    write_config(dir.path(), &json);
    assert_error(
        dir.path(),
        &config,
        &[
            "inconsistent model config",
            "num_heads (4) is not a multiple of num_kv_heads (3)",
        ],
    );
}

/// Rewrites `path` with tensor `name` stored as `dtype` (its first bytes reinterpreted).
fn restore_as(path: &Path, name: &str, dtype: safetensors::Dtype) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            if n != name {
                return (n, view);
            }
            let shape = view.shape().to_vec();
            let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let data = &view.data()[..len];
            (
                n,
                safetensors::tensor::TensorView::new(dtype, shape, data).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn hf_unsupported_tensor_type() {
    let name = "model.layers.0.mlp.up_proj.weight";
    for (dtype, label) in [
        (safetensors::Dtype::I32, "I32"),
        (safetensors::Dtype::F8_E4M3, "F8_E4M3"),
    ] {
        let dir = hf_dir();
        let weights = dir.path().join("model.safetensors");
        restore_as(&weights, name, dtype);
        assert_error(
            dir.path(),
            &weights,
            &[&format!(
                "tensor '{name}' has the unsupported type {label} (supported: F32, F16, BF16)"
            )],
        );
    }
}

#[test]
fn hf_tokenizer_corrupt() {
    let dir = hf_dir();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, "{\"model\": {\"type\": \"BPE\"").unwrap();
    assert_error(dir.path(), &tokenizer, &["not a valid tokenizer.json"]);
    std::fs::write(&tokenizer, "{\"version\": \"1.0\"}").unwrap();
    assert_error(dir.path(), &tokenizer, &["not a valid tokenizer.json"]);
    std::fs::remove_file(&tokenizer).unwrap();

    let tokenizer_config = dir.path().join("tokenizer_config.json");
    std::fs::write(&tokenizer_config, "{\"chat_template\": ").unwrap();
    assert_error(dir.path(), &tokenizer_config, &["not valid JSON"]);
}

#[test]
fn hf_file_given_for_directory() {
    let dir = hf_dir();
    for name in ["model.safetensors", "config.json"] {
        assert_error(
            &dir.path().join(name),
            &dir.path().join(name),
            &[
                "not a model file on its own",
                &format!("pass {}", dir.path().display()),
            ],
        );
    }
}

// llama2.c checkpoints.

#[test]
fn llama2c_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stories260K.bin");
    assert_error(&path, &path, &["cannot open model", "does it exist"]);
}

#[test]
fn llama2c_shorter_than_header() {
    let (_dir, path) = stories_copy();
    let full = std::fs::read(&path).unwrap();
    for len in [0, 3, 10, 27] {
        std::fs::write(&path, &full[..len]).unwrap();
        assert_error(
            &path,
            &path,
            &[
                "not a usable llama2.c checkpoint",
                &format!("the file is truncated: {len} bytes, shorter than its header"),
            ],
        );
    }
    // A version-1 header cut after its magic and version.
    let mut v1 = 0x616b_3432u32.to_le_bytes().to_vec();
    v1.extend(1i32.to_le_bytes());
    std::fs::write(&path, &v1).unwrap();
    assert_error(
        &path,
        &path,
        &["the file is truncated: 8 bytes, shorter than its header"],
    );
}

#[test]
fn llama2c_zero_or_negative_dimensions() {
    // (field, value): dim, n_layers, n_heads, seq_len.
    for (field, value) in [(0, 0), (2, -5), (3, 0), (6, -1)] {
        let (_dir, path) = stories_copy();
        set_header_field(&path, field, value);
        assert_error(
            &path,
            &path,
            &[
                "not a usable llama2.c checkpoint",
                "has a zero or negative field",
            ],
        );
    }
}

#[test]
fn llama2c_truncated() {
    let (_dir, path) = stories_copy();
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    truncate_to(&path, len / 2);
    assert_error(
        &path,
        &path,
        &[
            &format!("{} bytes, but its header", len / 2),
            &format!("implies {len}"),
            "the file is truncated",
        ],
    );
    truncate_to(&path, len / 2 - 3);
    assert_error(&path, &path, &["the file is truncated"]);
}

#[test]
fn llama2c_header_disagrees() {
    let cases: [(usize, i32, &str); 5] = [
        (3, 7, "dim 64 is not a multiple of n_heads 7"),
        (4, 3, "n_heads 8 is not a multiple of n_kv_heads 3"),
        (4, 16, "n_heads 8 is not a multiple of n_kv_heads 16"),
        (0, 1 << 20, "implausibly large dimensions"),
        // Fewer layers than the file holds.
        (2, 4, "the header disagrees with the weights"),
    ];
    for (field, value, problem) in cases {
        let (_dir, path) = stories_copy();
        set_header_field(&path, field, value);
        assert_error(&path, &path, &["not a usable llama2.c checkpoint", problem]);
    }
}

#[test]
fn llama2c_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(
        &path,
        "These are not the weights you are looking for.\n".repeat(10),
    )
    .unwrap();
    assert_error(&path, &path, &["not a usable llama2.c checkpoint"]);
}

#[test]
fn llama2c_tokenizer_missing() {
    let (dir, path) = stories_copy();
    let tokenizer = dir.path().join("tok999.bin");
    let options = LoadOptions {
        tokenizer: Some(tokenizer.clone()),
    };
    assert_error_with(&path, &options, &tokenizer, &["cannot read tokenizer"]);
}

#[test]
fn llama2c_tokenizer_truncated() {
    let (dir, path) = stories_copy();
    // Found beside the model.
    let tokenizer = dir.path().join("tok512.bin");
    let len = std::fs::metadata(&tokenizer).unwrap().len() as usize;
    truncate_to(&tokenizer, len / 2);
    assert_error(
        &path,
        &tokenizer,
        &[
            "not a valid tokenizer file",
            "the file is truncated at token",
        ],
    );
    truncate_to(&tokenizer, 2);
    assert_error(
        &path,
        &tokenizer,
        &["the file is truncated at token 0 of 512"],
    );

    // Given explicitly, with bytes to spare.
    let other = dir.path().join("other.bin");
    let mut bytes = std::fs::read(stories260k_dir().join("tok512.bin")).unwrap();
    bytes.extend([0u8; 9]);
    std::fs::write(&other, &bytes).unwrap();
    let options = LoadOptions {
        tokenizer: Some(other.clone()),
    };
    assert_error_with(&path, &options, &other, &["9 bytes left after 512 tokens"]);
}

#[test]
fn llama2c_sentencepiece_model_corrupt() {
    let (dir, path) = stories_copy();
    let model = copy_stories("tok512.model", dir.path());
    // tok512.model is preferred to tok512.bin beside the checkpoint; undamaged, it loads.
    let loaded = PretrainedModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.tokenizer.unwrap().vocab_size(), 512);

    let full = std::fs::read(&model).unwrap();
    std::fs::write(&model, &full[..full.len() / 2]).unwrap();
    assert_error(&path, &model, &["not a valid tokenizer file", "truncated"]);
    // A field whose length is close to 2^64.
    let mut bytes = vec![0x0a];
    bytes.extend([0xff; 9]);
    bytes.push(0x01);
    std::fs::write(&model, &bytes).unwrap();
    assert_error(
        &path,
        &model,
        &["not a valid tokenizer file", "truncated field"],
    );
    std::fs::write(&model, b"").unwrap();
    assert_error(&path, &model, &["no pieces: not a SentencePiece model"]);
}

#[test]
fn llama2c_vocabulary_too_small_for_bos() {
    // A legacy checkpoint with one token (dim 2, one layer, one head, seq_len 1), all zeros.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bin");
    let header: [i32; 7] = [2, 2, 1, 1, 1, 1, 1];
    let floats = 2 + (2 * 2 + 7 * 4) + 2 + 2;
    let mut bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes.resize(bytes.len() + 4 * floats, 0);
    std::fs::write(&path, &bytes).unwrap();
    // Without a tokenizer the checkpoint loads: only the tokenizer is at fault below.
    PretrainedModel::load(&path, &LoadOptions::default()).unwrap();

    let tokenizer = dir.path().join("tok1.bin");
    let mut tok = 5i32.to_le_bytes().to_vec();
    tok.extend(0f32.to_le_bytes());
    tok.extend(5i32.to_le_bytes());
    tok.extend(b"<unk>");
    std::fs::write(&tokenizer, &tok).unwrap();
    assert_error(
        &path,
        &tokenizer,
        &[
            "unusable tokenizer",
            "BOS id 1 is outside the 1-piece vocabulary",
        ],
    );
}

#[test]
fn hf_config_values_out_of_range() {
    let dir = hf_dir();
    let config = dir.path().join("config.json");
    for (key, value, problem) in [
        (
            "rms_norm_eps",
            json!(1e30),
            "rms_norm_eps = 1e30 is outside",
        ),
        (
            "rms_norm_eps",
            json!(-1e-5),
            "rms_norm_eps = -1e-5 is outside",
        ),
        ("rope_theta", json!(1e30), "rope_theta = 1e30 is outside"),
        ("rope_theta", json!(0.5), "rope_theta = 5e-1 is outside"),
        (
            "bos_token_id",
            json!(64),
            "special token id 64 (bos/eos) is beyond the vocabulary of 64",
        ),
        ("eos_token_id", json!([2, 1000]), "special token id 1000"),
    ] {
        let mut json = tiny_config();
        json[key] = value;
        write_config(dir.path(), &json);
        assert_error(dir.path(), &config, &["inconsistent model config", problem]);
    }
}

/// A tokenizer.json for the tiny HF directory: a byte-level BPE over a few tokens.
fn tiny_tokenizer_json() -> Value {
    let tokenizer = binllm_testing::language_model::char_tokenizer();
    serde_json::from_str(&tokenizer.to_json().unwrap()).unwrap()
}

/// tokenizer.json files the `tokenizers` crate panicked on (fuzzing found the first, third
/// and fourth): a syntax error inside the decoder, a damaged Precompiled normalizer, a template
/// naming an undefined special token, a Strip decoder cutting at the end, a BPE merge longer
/// than any token. Each is an error
/// naming the file now.
#[test]
fn tokenizer_json_that_made_the_tokenizers_crate_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config["vocab_size"] = json!(128);
    write_hf_dir(&config, dir.path()).unwrap();
    let path = dir.path().join("tokenizer.json");
    let mut good = tiny_tokenizer_json();
    good["decoder"] = json!({"type": "Fuse"});
    let text = serde_json::to_string(&good).unwrap();
    let syntax = text.replacen(r#""decoder":{"type""#, r#""decoder":{btype""#, 1);
    assert_ne!(syntax, text, "the decoder is where the damage goes");
    std::fs::write(&path, syntax).unwrap();
    assert_error(
        dir.path(),
        &path,
        &["not a valid tokenizer.json", "not JSON"],
    );

    let mut precompiled = good.clone();
    precompiled["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": 5});
    std::fs::write(&path, precompiled.to_string()).unwrap();
    assert_error(
        dir.path(),
        &path,
        &["Precompiled normalizer", "not supported"],
    );

    let mut template = good.clone();
    template["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<zz>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {}
    });
    std::fs::write(&path, template.to_string()).unwrap();
    assert_error(
        dir.path(),
        &path,
        &["special token \"<zz>\"", "do not define"],
    );

    let mut strip = good.clone();
    strip["decoder"] = json!({"type": "Strip", "content": " ", "start": 0, "stop": 1});
    std::fs::write(&path, strip.to_string()).unwrap();
    assert_error(dir.path(), &path, &["Strip decoder", "stop = 1"]);
    // The same with a damaged "type" key: the crate still reads it as a Strip by its fields.
    strip["decoder"] = json!({"tyxe": "Strip", "content": " ", "start": 0, "stop": 2});
    std::fs::write(&path, strip.to_string()).unwrap();
    assert_error(dir.path(), &path, &["Strip decoder", "stop = 2"]);

    // A merge longer than every token of the vocabulary (fuzzing: the crate copied it into
    // a buffer as long as the longest token).
    let mut merge = good.clone();
    merge["model"]["merges"] = json!([["ab", "cd"]]);
    std::fs::write(&path, merge.to_string()).unwrap();
    assert_error(
        dir.path(),
        &path,
        &["merge 0", "\"abcd\", which is not in the vocabulary"],
    );

    // The undamaged one loads: the damage, not the file, is refused.
    std::fs::write(&path, good.to_string()).unwrap();
    PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();
}
