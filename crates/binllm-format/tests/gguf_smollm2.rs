//! The real default model, `models/SmolLM2-135M-Instruct.Q4_1.gguf` (placed by
//! `scripts/setup.sh`), against transformers' reading of the same file: config, every
//! tensor's values (sha256 of the f32 values in Hugging Face layout, after transformers'
//! dequantisation and `reverse_permute_weights`), token ids of real strings and rendered
//! chat templates. References: `tools/reference/gguf_fixtures.py`.

use std::path::Path;
use std::sync::OnceLock;

use binllm_format::chat::ChatMessage;
use binllm_format::{HostTensor, LoadOptions, PretrainedModel, TensorData};
use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The model, loaded once for all tests. `scripts/test.sh` runs `scripts/setup.sh` first,
/// which installs it: a missing file is a failure, not a skip.
fn model() -> &'static PretrainedModel {
    static MODEL: OnceLock<PretrainedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = binllm_testing::shared::smollm2_gguf();
        assert!(
            path.exists(),
            "{} is missing: run scripts/setup.sh (scripts/test.sh does)",
            path.display()
        );
        PretrainedModel::load(&path, &LoadOptions::default()).unwrap()
    })
}

fn reference(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn sha256_f32(tensor: &HostTensor) -> String {
    let digest = match &tensor.data {
        TensorData::F32(_) => Sha256::digest(tensor.as_bytes()),
        _ => Sha256::digest(
            tensor
                .to_f32_vec()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
    };
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_config_and_tensor_types() {
    let model = model();
    let c = &model.config;
    assert_eq!(c.architecture.name(), "llama");
    assert_eq!(c.num_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_heads, 9);
    assert_eq!(c.num_kv_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert!(c.rope_scaling.is_none() && !c.attention_bias && !c.qk_norm);
    assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);

    // The same numbers transformers derives from the metadata.
    let expected = reference("smollm2_reference.json");
    let r = &expected["config"];
    let n = |k: &str| r[k].as_u64().unwrap() as usize;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers
        ),
        (
            n("vocab_size"),
            n("hidden_size"),
            n("intermediate_size"),
            n("num_hidden_layers")
        )
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim),
        (
            n("num_attention_heads"),
            n("num_key_value_heads"),
            n("head_dim")
        )
    );
    assert_eq!(c.rms_norm_eps, r["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(c.rope_theta, r["rope_theta"].as_f64().unwrap());

    assert_eq!(model.tensors.len(), 272);
    assert_eq!(
        expected["tensor_count"].as_u64().unwrap() as usize,
        model.tensors.len()
    );
    let types = model.stored_types();
    for (ty, count) in expected["gguf_types"].as_object().unwrap() {
        assert_eq!(types[ty], count.as_u64().unwrap() as usize, "{ty}");
    }
    assert_eq!(
        model.notes[0],
        "GGUF v3, file type MOSTLY_Q4_1, 210 Q4_1 / 61 F32 / 1 Q8_0 tensors"
    );
    assert_eq!(model.tensors["model.embed_tokens.weight"].stored_as, "Q8_0");
    assert!(!model.tensors.contains_key("lm_head.weight"));
}

#[test]
fn smollm2_tensors_match_transformers_bit_for_bit() {
    let model = model();
    let expected = reference("smollm2_reference.json");
    let tensors = expected["tensors"].as_object().unwrap();
    assert_eq!(
        model.tensors.keys().collect::<Vec<_>>(),
        tensors.keys().collect::<Vec<_>>()
    );
    // Sample rows first: a mismatch there says which values differ.
    for (name, reference) in tensors {
        let Some(rows) = reference.get("sample_rows") else {
            continue;
        };
        let t = &model.tensors[name];
        let values = t.to_f32_vec();
        let cols = t.shape[1];
        for (row, bits) in rows.as_object().unwrap() {
            let row: usize = row.parse().unwrap();
            let bits = u32s(bits);
            let got: Vec<u32> = values[row * cols..row * cols + bits.len()]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, bits, "{name} row {row}");
        }
    }
    let mismatches: Vec<String> = tensors
        .iter()
        .collect::<Vec<_>>()
        .into_par_iter()
        .filter_map(|(name, reference)| {
            let t = &model.tensors[name];
            let shape: Vec<usize> = reference["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (t.shape != shape || sha256_f32(t) != reference["sha256"].as_str().unwrap())
                .then(|| format!("{name} ({}, {:?})", t.stored_as, t.shape))
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} tensors differ from transformers' GGUF loading: {mismatches:?}",
        mismatches.len()
    );
}

#[test]
fn smollm2_token_ids_match_the_reference() {
    let model = model();
    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_ids, vec![2]);
    assert_eq!(tok.vocab_size(), 49152);
    let expected = reference("smollm2_tokenizer.json");
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{text:?}");
        if let Some(theirs) = case.get("transformers_ids") {
            // Where transformers' GGUF tokenizer ignores the 'smollm' pre-tokenizer, the
            // reference is llama.cpp's digit split (see gguf_fixtures.py); the case is there
            // to prove that split is applied.
            assert_ne!(ids, u32s(theirs), "{text:?}");
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
        // add_bos_token is false in this file: no BOS, whatever the caller asks.
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn smollm2_chat_template_renders_like_transformers() {
    let model = model();
    let expected = reference("smollm2_tokenizer.json");
    for (name, chat) in expected["chats"].as_object().unwrap() {
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            model.render_chat(&messages).unwrap(),
            chat["rendered"].as_str().unwrap(),
            "{name}"
        );
    }
}
