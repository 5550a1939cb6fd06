//! The packed runtime (binllm-infer, pure Rust) against the libtorch engine on the same
//! weights: `sign_model::llama_from_packed` builds a libtorch model whose block linears are
//! the dense `row_scale * B * input_scale` of each packed linear, so both must compute the
//! same function. On stories260K, a PTQ sign model with input scales on every linear, as the
//! f32 sign model and as the exported f16 file read back; and on tiny synthetic Qwen2 (q/k/v
//! bias, untied head) and Qwen3 (q/k RMSNorm, head_dim 64, Llama 3 RoPE scaling) models.
//! Also the two engines' `LanguageModel::generate_greedy` (the chat benchmark's answers).
#![cfg(feature = "torch")]

mod common;

use binllm_eval::{LanguageModel, ScoreRequest};
use binllm_format::packed::{export, ExportOptions, PackedModel, QuantTensors};
use binllm_format::PretrainedModel;
use binllm_infer::ptq::{ptq_sign_model, InputScales};
use binllm_infer::{DenseKernel, Model, PackedScorer, RuntimeOptions};
use binllm_train::scorer::TorchScorer;
use common::{compare, compare_ids, PROMPTS};

fn stories() -> PretrainedModel {
    binllm_testing::shared::stories260k_with_tok512_bin()
}

#[test]
fn sign_model_matches_libtorch() {
    let sign = ptq_sign_model(&stories(), InputScales::Independent { seed: 7 }).unwrap();
    compare(&sign, &QuantTensors::new(), "f32 sign model");
}

#[test]
fn exported_file_matches_libtorch() {
    let sign = ptq_sign_model(&stories(), InputScales::Foldable { seed: 9 }).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.b1");
    exported.write(&path).unwrap();
    let (read, q8) = PackedModel::read_parts(&path).unwrap();
    compare(&read, &q8, "exported f16 file");
}

/// Greedy answers through the evaluation trait: the same ids on both engines, with and
/// without a stop id (kept when it ends the answer), and the packed engine's scores after
/// generating (its KV cache is shared with scoring) still those of libtorch.
#[test]
fn greedy_answers_match_libtorch() {
    let sign = ptq_sign_model(&stories(), InputScales::Independent { seed: 7 }).unwrap();
    let tokenizer = sign.tokenizer().unwrap().unwrap();
    let runtime = Model::new(
        &sign,
        &QuantTensors::new(),
        &RuntimeOptions {
            threads: 2,
            head_kernel: Some(DenseKernel::Portable),
            ..Default::default()
        },
    )
    .unwrap();
    let mut packed = PackedScorer::new(runtime, sign.tokenizer().unwrap().unwrap());
    let reference =
        binllm_train::sign_model::llama_from_packed(&sign, tch::Device::Cpu, tch::Kind::Float)
            .unwrap();
    let mut torch = TorchScorer::new(reference, sign.tokenizer().unwrap().unwrap());
    let limit = 24;
    for prompt in PROMPTS {
        let ids = tokenizer.encode(prompt, true).unwrap();
        let free = packed.generate_greedy(&ids, limit, &[]).unwrap();
        assert_eq!(free.len(), limit, "{prompt:?}");
        assert_eq!(
            torch.generate_greedy(&ids, limit, &[]).unwrap(),
            free,
            "{prompt:?}"
        );
        // Stopping on the tenth token: the answer runs to its first occurrence, kept.
        let stop = [free[9]];
        let first = free.iter().position(|&t| t == free[9]).unwrap();
        let ended = &free[..=first];
        assert_eq!(packed.generate_greedy(&ids, limit, &stop).unwrap(), ended);
        assert_eq!(torch.generate_greedy(&ids, limit, &stop).unwrap(), ended);
        // A limit that lands on the stop id still keeps it.
        assert_eq!(
            packed.generate_greedy(&ids, first + 1, &stop).unwrap(),
            ended
        );
        assert!(packed.generate_greedy(&ids, 0, &stop).unwrap().is_empty());

        let request = ScoreRequest {
            tokens: [ids.as_slice(), &free[..12]].concat(),
            score_from: ids.len(),
        };
        let ours = packed.score(std::slice::from_ref(&request)).unwrap();
        let theirs = torch.score(std::slice::from_ref(&request)).unwrap();
        for (a, b) in ours[0].iter().zip(&theirs[0]) {
            assert!(
                (a.logprob - b.logprob).abs() < 1e-3,
                "{prompt:?}: {} vs {}",
                a.logprob,
                b.logprob
            );
            // Every scored token is the greedy answer, so both call it greedy.
            assert!(a.is_greedy && b.is_greedy);
        }
    }
}

fn synthetic(config: binllm_format::ModelConfig) -> PretrainedModel {
    PretrainedModel {
        tensors: binllm_testing::synthetic::synthetic_tensors(&config),
        config,
        tokenizer: None,
        chat_template: None,
        format: binllm_format::SourceFormat::HuggingFace,
        path: "<synthetic>".into(),
        notes: vec![],
    }
}

fn tiny_config(architecture: binllm_format::Architecture) -> binllm_format::ModelConfig {
    binllm_format::ModelConfig {
        architecture,
        vocab_size: 300,
        hidden_size: 128,
        intermediate_size: 192,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

#[test]
fn qwen_variants_match_libtorch() {
    let prompts: Vec<Vec<u32>> = vec![
        (3..40).collect(),
        vec![1, 17, 250, 4, 99, 123, 7],
        (0..90).map(|i| (i * 37 % 300) as u32).collect(),
    ];
    let qwen2 = binllm_format::ModelConfig {
        attention_bias: true,
        ..tiny_config(binllm_format::Architecture::Qwen2)
    };
    let qwen3 = binllm_format::ModelConfig {
        qk_norm: true,
        tie_word_embeddings: true,
        rope_scaling: Some(binllm_format::RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        ..tiny_config(binllm_format::Architecture::Qwen3)
    };
    for (name, config) in [("qwen2", qwen2), ("qwen3", qwen3)] {
        let sign =
            ptq_sign_model(&synthetic(config), InputScales::Independent { seed: 2 }).unwrap();
        compare_ids(
            &sign,
            &QuantTensors::new(),
            &format!("{name} sign model"),
            &prompts,
            1e-3,
        );
        let exported = export(
            &sign,
            &ExportOptions {
                head: binllm_format::packed::HeadFormat::Q8,
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.b1");
        exported.write(&path).unwrap();
        let (read, q8) = PackedModel::read_parts(&path).unwrap();
        assert_eq!(q8.len(), 1, "{name}: the head is stored q8_0");
        compare_ids(
            &read,
            &q8,
            &format!("{name} exported, q8 head"),
            &prompts,
            1e-3,
        );
    }
}
