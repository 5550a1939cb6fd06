//! The GGUF reader against independent references (fixtures written by
//! `tools/reference/gguf_fixtures.py`): gguf-py's numpy dequantisation of raw blocks of every
//! supported type, gguf-py's reading of every metadata value type, and transformers' loading
//! of a tiny llama GGUF (tensors after `reverse_permute_weights`, config, token ids).

use std::path::{Path, PathBuf};

use binllm_format::chat::ChatMessage;
use binllm_format::gguf::dequant::{self, GgmlType};
use binllm_format::gguf::{GgufFile, MetaArray, MetaValue};
use binllm_format::{HostTensor, LoadOptions, PretrainedModel, SourceFormat, TensorData};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

fn sha256_f32(tensor: &HostTensor) -> String {
    let bytes: Vec<u8> = tensor
        .to_f32_vec()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn dequantization_is_bit_exact_with_gguf_py() {
    let bytes = std::fs::read(fixture("quant_blocks.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // The 1-bit types (Q1_0, Q2_0, TQ1_0, TQ2_0) are checked against bytes worked out from
    // ggml's definitions in gguf_sign_blocks.rs; the gguf-py fixture predates them.
    let sign_types = ["Q1_0", "Q2_0", "TQ1_0", "TQ2_0"];
    for name in dequant::SUPPORTED
        .iter()
        .filter(|n| !sign_types.contains(n))
    {
        let ty = GgmlType::from_name(name).unwrap();
        let raw = st.tensor(&format!("{name}.raw")).unwrap();
        let expected: Vec<u32> = st
            .tensor(&format!("{name}.values"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert!(expected.len() >= 256, "{name}: too few reference values");
        let data = dequant::dequantize(ty, raw.data(), expected.len()).unwrap();
        // F16/BF16 stay in their own precision; everything quantised becomes f32.
        let expected_dtype = match *name {
            "F16" => "F16",
            "BF16" => "BF16",
            _ => "F32",
        };
        let (got, dtype): (Vec<f32>, _) = match data {
            TensorData::F32(v) => (v, "F32"),
            TensorData::F16(v) => (v.iter().map(|x| x.to_f32()).collect(), "F16"),
            TensorData::BF16(v) => (v.iter().map(|x| x.to_f32()).collect(), "BF16"),
        };
        assert_eq!(dtype, expected_dtype, "{name}");
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        let mismatch = got.iter().zip(&expected).position(|(a, b)| a != b);
        assert!(
            mismatch.is_none(),
            "{name}: element {} is {} but gguf-py says {}",
            mismatch.unwrap(),
            f32::from_bits(got[mismatch.unwrap()]),
            f32::from_bits(expected[mismatch.unwrap()])
        );
        assert_eq!(got.len(), expected.len(), "{name}");
    }
}

#[test]
fn unsupported_types_are_refused_by_name() {
    for name in ["Q2_K", "Q3_K", "IQ2_XXS", "IQ4_NL", "IQ1_S", "Q8_K"] {
        let ty = GgmlType::from_name(name).unwrap();
        assert!(!ty.is_supported());
        let raw = vec![0u8; ty.type_size];
        let err = dequant::dequantize(ty, &raw, ty.block_size).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    let q4k = GgmlType::from_name("Q4_K").unwrap();
    let err = dequant::dequantize(q4k, &[0u8; 100], 256).unwrap_err();
    assert!(err.to_string().contains("need 144 bytes"), "{err}");
}

#[test]
fn every_metadata_value_type_reads_as_gguf_py_wrote_it() {
    let expected = read_json("metadata_types.json");
    let file = GgufFile::open(&fixture("metadata_types.gguf")).unwrap();
    assert_eq!(file.version, 3);
    assert!(file.tensors.is_empty());
    let values = expected["values"].as_object().unwrap();
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing"));
    // Each key's type is the one gguf-py's reader reports.
    let types = expected["types"].as_object().unwrap();
    let type_of = |k: &str| -> Vec<&str> {
        types[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect()
    };
    assert_eq!(type_of("binllm.test.u8"), ["UINT8"]);
    assert_eq!(get("binllm.test.u8"), &MetaValue::U8(200));
    assert_eq!(type_of("binllm.test.i8"), ["INT8"]);
    assert_eq!(get("binllm.test.i8"), &MetaValue::I8(-100));
    assert_eq!(get("binllm.test.u16"), &MetaValue::U16(60000));
    assert_eq!(get("binllm.test.i16"), &MetaValue::I16(-30000));
    assert_eq!(get("binllm.test.u32"), &MetaValue::U32(4_000_000_000));
    assert_eq!(get("binllm.test.i32"), &MetaValue::I32(-2_000_000_000));
    assert_eq!(type_of("binllm.test.u64"), ["UINT64"]);
    assert_eq!(
        get("binllm.test.u64"),
        &MetaValue::U64(values["binllm.test.u64"].as_u64().unwrap())
    );
    assert_eq!(
        get("binllm.test.i64"),
        &MetaValue::I64(values["binllm.test.i64"].as_i64().unwrap())
    );
    assert_eq!(get("binllm.test.f32"), &MetaValue::F32(1.5));
    assert_eq!(type_of("binllm.test.f64"), ["FLOAT64"]);
    assert_eq!(get("binllm.test.f64"), &MetaValue::F64(-2.25));
    assert_eq!(get("binllm.test.bool"), &MetaValue::Bool(true));
    assert_eq!(
        get("binllm.test.string").as_str(),
        values["binllm.test.string"].as_str()
    );
    let strings: Vec<String> = values["binllm.test.strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        get("binllm.test.strings"),
        &MetaValue::Array(MetaArray::String(strings))
    );
    assert_eq!(type_of("binllm.test.i32s"), ["ARRAY", "INT32"]);
    assert_eq!(
        get("binllm.test.i32s"),
        &MetaValue::Array(MetaArray::I32(vec![1, -2, 3]))
    );
    assert_eq!(
        get("binllm.test.bools"),
        &MetaValue::Array(MetaArray::Bool(vec![true, false, true]))
    );
    assert_eq!(
        get("binllm.test.f64s"),
        &MetaValue::Array(MetaArray::F64(vec![0.5, -1.0]))
    );
    assert_eq!(
        get("binllm.test.u16s"),
        &MetaValue::Array(MetaArray::U16(vec![7, 65535]))
    );
    assert_eq!(
        get("binllm.test.nested"),
        &MetaValue::Array(MetaArray::Array(vec![
            MetaArray::I32(vec![1, 2]),
            MetaArray::I32(vec![3])
        ]))
    );
}

fn load(name: &str) -> PretrainedModel {
    PretrainedModel::load(&fixture(name), &LoadOptions::default()).unwrap()
}

fn tiny() -> PretrainedModel {
    load("tiny_llama.gguf")
}

/// The config fields transformers derives from the same metadata.
fn assert_config_matches(model: &PretrainedModel, expected: &Value) {
    let c = &model.config;
    assert_eq!(model.format, SourceFormat::Gguf);
    assert_eq!(
        c.architecture.name(),
        expected["model_type"].as_str().unwrap()
    );
    let n = |k: &str| expected[k].as_u64().unwrap() as usize;
    assert_eq!(c.vocab_size, n("vocab_size"));
    assert_eq!(c.hidden_size, n("hidden_size"));
    assert_eq!(c.intermediate_size, n("intermediate_size"));
    assert_eq!(c.num_layers, n("num_hidden_layers"));
    assert_eq!(c.num_heads, n("num_attention_heads"));
    assert_eq!(c.num_kv_heads, n("num_key_value_heads"));
    assert_eq!(c.head_dim, n("head_dim"));
    assert_eq!(c.max_position_embeddings, n("max_position_embeddings"));
    assert_eq!(c.rms_norm_eps, expected["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(c.rope_theta, expected["rope_theta"].as_f64().unwrap());
    assert_eq!(
        c.tie_word_embeddings,
        expected["tie_word_embeddings"].as_bool().unwrap()
    );
}

/// Every tensor: same names, shapes and f32 values (sha256) as transformers' state dict,
/// and the same stored types as the GGUF file.
fn assert_tensors_match(model: &PretrainedModel, expected: &Value) {
    let tensors = expected["tensors"].as_object().unwrap();
    let mut ours: Vec<&String> = model.tensors.keys().collect();
    let mut theirs: Vec<&String> = tensors.keys().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    let gguf_types = expected["gguf_types"].as_object().unwrap();
    let mut stored: Vec<&str> = model
        .tensors
        .values()
        .map(|t| t.stored_as.as_str())
        .collect();
    let mut written: Vec<&str> = gguf_types.values().map(|t| t.as_str().unwrap()).collect();
    stored.sort();
    written.sort();
    assert_eq!(stored, written);
    for (name, reference) in tensors {
        let t = &model.tensors[name];
        let shape: Vec<usize> = reference["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let head: Vec<u32> = t.to_f32_vec()[..8].iter().map(|v| v.to_bits()).collect();
        assert_eq!(head, u32s(&reference["head_bits"]), "{name}: first values");
        assert_eq!(
            sha256_f32(t),
            reference["sha256"].as_str().unwrap(),
            "{name} ({}) differs from transformers' GGUF loading",
            t.stored_as
        );
    }
}

#[test]
fn tiny_llama_config_matches_transformers() {
    let model = tiny();
    assert_config_matches(&model, &read_json("tiny_llama.json")["config"]);
    let c = &model.config;
    assert!(!c.attention_bias && !c.qk_norm);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(
        model.notes[0],
        "GGUF v3, file type MOSTLY_Q4_0, 5 F32 / 3 Q8_0 / 2 F16 / 2 Q4_0 / 2 Q4_1 / 2 Q5_0 / \
         2 Q5_1 / 1 BF16 / 1 Q4_K / 1 Q5_K tensors"
    );
}

#[test]
fn tiny_llama_tensors_match_transformers_bit_for_bit() {
    // q/k rows are un-permuted (four different quantised types among them).
    let model = tiny();
    assert_tensors_match(&model, &read_json("tiny_llama.json"));
    // F16 and BF16 tensors keep their precision.
    let embed = &model.tensors["model.embed_tokens.weight"];
    assert!(matches!(embed.data, TensorData::F16(_)) && embed.stored_as == "F16");
    let up = &model.tensors["model.layers.0.mlp.up_proj.weight"];
    assert!(matches!(up.data, TensorData::BF16(_)) && up.stored_as == "BF16");
    let down = &model.tensors["model.layers.1.mlp.down_proj.weight"];
    assert!(matches!(down.data, TensorData::F32(_)) && down.stored_as == "Q5_K");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    // Biases, no un-permutation (NEOX RoPE), untied head, byte-level BPE with pre 'qwen2'.
    let model = load("tiny_qwen2.gguf");
    let expected = read_json("tiny_qwen2.json");
    assert_config_matches(&model, &expected["config"]);
    assert!(model.config.attention_bias && !model.config.qk_norm);
    assert!(model.notes.iter().all(|n| !n.contains("un-permuted")));
    assert_tensors_match(&model, &expected);

    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.bos_id, tok.token_to_id("<|endoftext|>"));
    assert_eq!(tok.eos_ids, vec![tok.token_to_id("<|im_end|>").unwrap()]);
    for case in expected["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids,
            "add_bos_token is false"
        );
    }
    let chat = &expected["chat"];
    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        model.render_chat(&messages).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
}

#[test]
fn tiny_qwen3_matches_transformers() {
    // q/k norms, head_dim from attention.key_length (128, not hidden/heads = 16), tied
    // embeddings, a Q6_K tensor, and no tokenizer in the file.
    let model = load("tiny_qwen3.gguf");
    let expected = read_json("tiny_qwen3.json");
    assert_config_matches(&model, &expected["config"]);
    assert!(model.config.qk_norm && !model.config.attention_bias);
    assert_eq!(model.config.q_dim(), 256);
    assert_tensors_match(&model, &expected);
    assert_eq!(
        model.tensors["model.layers.0.self_attn.o_proj.weight"].stored_as,
        "Q6_K"
    );
    assert!(model.tokenizer.is_none());
    assert!(
        model.notes.iter().any(|n| n.contains("no tokenizer")),
        "{:?}",
        model.notes
    );
}

#[test]
fn tiny_llama_tokenizer_matches_transformers() {
    let model = tiny();
    let tok = model.tokenizer().unwrap();
    for case in read_json("tiny_llama.json")["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
        // llama.cpp adds BOS for SentencePiece vocabularies with add_bos_token.
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 1);
        assert_eq!(&with_bos[1..], &ids[..]);
    }
    // A user-defined piece is matched whole, as SentencePiece and llama.cpp do.
    let ids = tok.encode("<tool> the", false).unwrap();
    assert!(ids.contains(&tok.token_to_id("<tool>").unwrap()), "{ids:?}");
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_ids, vec![2]);
}

#[test]
fn tiny_llama_chat_template_comes_from_metadata() {
    let model = tiny();
    let rendered = model
        .render_chat(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ])
        .unwrap();
    assert_eq!(rendered, "[system] Be brief.\n[user] Hi\n");
}

#[test]
fn gguf_v2_reads_like_v3() {
    // v2 and v3 share the layout (v3 only allows big-endian files, which are refused).
    let mut bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny_v2.gguf");
    std::fs::write(&path, bytes).unwrap();
    let v2 = PretrainedModel::load(&path, &LoadOptions::default()).unwrap();
    let v3 = tiny();
    assert!(v2.notes[0].starts_with("GGUF v2"), "{:?}", v2.notes);
    assert_eq!(v2.tensors, v3.tensors);
}

#[test]
fn tiny_llama_file_layout() {
    let file = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
    assert_eq!(file.alignment, 64, "general.alignment is honoured");
    assert_eq!(file.data_offset % 64, 0);
    let q = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dims, vec![32, 32]);
    assert_eq!(q.ggml_type.name, "Q4_0");
    assert_eq!(q.n_bytes, 32 * 18);
    let down = file.tensor_info("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        (down.dims.clone(), down.shape()),
        (vec![256, 32], vec![32, 256])
    );
}
