//! The full-precision forward against Hugging Face transformers (fixtures written by
//! `tools/reference/forward_fixtures.py`), and against llama2.c's published output.

mod common;

use binllm_format::{LoadOptions, PretrainedModel};
use binllm_infer::sampling::SamplingParams;
use binllm_testing::synthetic::{read_reference_fixture, relative_l2, write_hf_dir};
use binllm_train::generate::{generate, GenerateOptions};
use binllm_train::{KvCache, Llama};
use common::*;
use tch::{Device, Kind, Tensor};

const TINY: [&str; 4] = [
    "tiny_llama_gqa",
    "tiny_llama3_rope_tied",
    "tiny_qwen2_bias",
    "tiny_qwen3_qknorm_tied",
];

fn tiny_model(name: &str) -> (binllm_testing::synthetic::ReferenceFixture, Llama) {
    let path = repo_root().join(format!("tests/fixtures/reference/{name}.safetensors"));
    let fixture = read_reference_fixture(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(&fixture.config_json, dir.path()).unwrap();
    let pretrained = PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    (fixture, model)
}

#[test]
fn tiny_models_match_transformers_logits_in_fp32() {
    for name in TINY {
        let (fixture, model) = tiny_model(name);
        for (i, seq) in fixture.sequences.iter().enumerate() {
            let ours = logits_of(&model, &seq.ids[..seq.positions]);
            let ours = fixture.select_columns(&ours).unwrap();
            let diff = max_abs_diff(&ours, &seq.logits);
            println!("{name} sequence {i}: max |binllm - transformers| = {diff:.2e}");
            assert!(diff <= 1e-4, "{name} sequence {i}: max abs diff {diff}");
        }
    }
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for name in TINY {
        let (fixture, model) = tiny_model(name);
        let ids = &fixture.sequences[0].ids;
        let full = logits_of(&model, ids);
        let vocab = model.config.vocab_size;
        let _guard = tch::no_grad_guard();
        let mut cache = KvCache::new(model.config.num_layers);
        // A 5-token prefill, a 3-token chunk (explicit mask path), then single tokens.
        let mut start = 0;
        for chunk in [5usize, 3, 1, 1, 1, 1] {
            let end = (start + chunk).min(ids.len());
            if start >= end {
                break;
            }
            let piece: Vec<i64> = ids[start..end].iter().map(|&i| i as i64).collect();
            let logits = model.forward(&Tensor::from_slice(&piece).unsqueeze(0), Some(&mut cache));
            let logits = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
            let diff = max_abs_diff(&logits, &full[start * vocab..end * vocab]);
            assert!(
                diff < 1e-5,
                "{name}: cached positions {start}..{end} differ by {diff}"
            );
            start = end;
        }
    }
}

#[test]
fn bf16_forward_stays_close_to_fp32() {
    let (fixture, mut model) = tiny_model("tiny_llama_gqa");
    let seq = &fixture.sequences[0];
    model.to_kind(Kind::BFloat16);
    let ours = fixture
        .select_columns(&logits_of(&model, &seq.ids[..seq.positions]))
        .unwrap();
    let err = relative_l2(&seq.logits, &ours);
    println!("bf16 relative L2 vs transformers fp32: {err:.2e}");
    assert!(err < 2e-2, "bf16 relative L2 {err}");
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let gguf = smollm2_gguf();
    assert!(
        gguf.exists(),
        "{} missing: run scripts/setup.sh",
        gguf.display()
    );
    let fixture = read_reference_fixture(
        &repo_root().join("tests/fixtures/reference/smollm2_135m_instruct_q4_1.safetensors"),
    )
    .unwrap();
    let pretrained = PretrainedModel::load(&gguf, &LoadOptions::default()).unwrap();
    let tokenizer = pretrained.tokenizer().unwrap();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let prompts: serde_json::Value = serde_json::from_str(&fixture.metadata["prompts"]).unwrap();
    for (i, seq) in fixture.sequences.iter().enumerate() {
        let prompt = prompts[i]["text"].as_str().unwrap();
        let ids = tokenizer.encode(prompt, true).unwrap();
        assert_eq!(ids, seq.ids, "token ids of prompt {i} ({prompt:?})");
        let ours = logits_of(&model, &seq.ids[..seq.positions]);
        let err = relative_l2(&seq.logits, &fixture.select_columns(&ours).unwrap());
        println!("SmolLM2 prompt {i}: relative L2 on stored columns {err:.2e}");
        assert!(err <= 1e-3, "prompt {i}: relative L2 {err}");
        // The top-32 of the full vocabulary too, so no column outside the subset hides an error.
        let top = seq.top.as_ref().unwrap();
        let vocab = fixture.vocab_size;
        let ours_top: Vec<f32> = (0..seq.positions)
            .flat_map(|p| {
                top.ids[p * top.k..(p + 1) * top.k]
                    .iter()
                    .map(move |&id| (p, id))
            })
            .map(|(p, id)| ours[p * vocab + id as usize])
            .collect();
        let err_top = relative_l2(&top.logits, &ours_top);
        assert!(
            err_top <= 1e-3,
            "prompt {i}: relative L2 on top-32 {err_top}"
        );
    }
}

#[test]
fn stories260k_greedy_continuation_matches_llama2c() {
    let pretrained = stories260k();
    let tokenizer = pretrained.tokenizer().unwrap();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let prompt = tokenizer.encode("Once upon a time", true).unwrap();
    assert_eq!(prompt[0], 1, "llama2.c prepends BOS");
    let options = GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::default(),
        stop_tokens: tokenizer.eos_ids.clone(),
    };
    let mut out = prompt.clone();
    generate(&model, &prompt, &options, |id| {
        out.push(id);
        Ok(true)
    })
    .unwrap();
    let text = tokenizer.decode(&out, true).unwrap();
    println!("{text}");
    assert!(
        text.starts_with(
            "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
        ),
        "got: {text}"
    );
}
