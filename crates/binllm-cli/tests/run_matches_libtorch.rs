//! The packed runtime (binllm-infer, pure Rust) against the libtorch engine on the same
//! weights: `sign_model::llama_from_packed` builds a libtorch model whose block linears are
//! the dense `row_scale * B * input_scale` of each packed linear, so both must compute the
//! same function. On stories260K, a PTQ sign model with input scales on every linear, as the
//! f32 sign model and as the exported f16 file read back.
#![cfg(feature = "torch")]

use std::path::Path;

use binllm_format::packed::{export, ExportOptions, PackedModel, Q8Tensors};
use binllm_format::{LoadOptions as SourceOptions, PretrainedModel};
use binllm_infer::generate::{generate, GenerateOptions};
use binllm_infer::ptq::{ptq_sign_model, InputScales};
use binllm_infer::sampling::SamplingParams;
use binllm_infer::{KvCache, LoadOptions, Model};
use tch::{Device, Kind, Tensor};

const PROMPTS: [&str; 3] = [
    "Once upon a time, there was a little girl named Lily.",
    "The sun was shining and the birds were singing",
    "Tom and his dog went to the park. They",
];

fn stories() -> PretrainedModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K");
    PretrainedModel::load(
        &dir.join("stories260K.bin"),
        &SourceOptions {
            tokenizer: Some(dir.join("tok512.bin")),
        },
    )
    .expect("stories260K must sit in ../shared/models beside the repository")
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn compare(packed: &PackedModel, q8: &Q8Tensors, label: &str) {
    let tokenizer = packed.tokenizer().unwrap().unwrap();
    let runtime = Model::new(
        packed,
        q8,
        &LoadOptions {
            threads: 2,
            kernel: None,
        },
    )
    .unwrap();
    let reference =
        binllm_train::sign_model::llama_from_packed(packed, Device::Cpu, Kind::Float).unwrap();
    let options = GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    for prompt in PROMPTS {
        let ids = tokenizer.encode(prompt, true).unwrap();
        let ours = runtime
            .forward_all(&mut KvCache::new(&runtime.config), &ids)
            .unwrap();
        let input =
            Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
        let theirs = tch::no_grad(|| reference.forward(&input, None));
        let theirs = Vec::<f32>::try_from(theirs.flatten(0, -1)).unwrap();
        let err = relative_l2(&ours, &theirs);
        eprintln!("{label}: '{prompt}': logits relative L2 {err:.2e}");
        assert!(err <= 1e-3, "{label}: '{prompt}': logits differ by {err}");

        let mut ours = Vec::new();
        generate(
            &runtime,
            &mut KvCache::new(&runtime.config),
            &ids,
            &options,
            |id| {
                ours.push(id);
                Ok(true)
            },
        )
        .unwrap();
        let mut theirs = Vec::new();
        let train_options = binllm_train::generate::GenerateOptions {
            max_tokens: options.max_tokens,
            sampling: options.sampling.clone(),
            stop_tokens: vec![],
        };
        binllm_train::generate::generate(&reference, &ids, &train_options, |id| {
            theirs.push(id);
            Ok(true)
        })
        .unwrap();
        assert_eq!(ours.len(), options.max_tokens);
        assert_eq!(
            ours, theirs,
            "{label}: greedy generation differs after '{prompt}'"
        );
    }
}

#[test]
fn sign_model_matches_libtorch() {
    let sign = ptq_sign_model(&stories(), InputScales::Independent { seed: 7 }).unwrap();
    compare(&sign, &Q8Tensors::new(), "f32 sign model");
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
