//! Shared by the tests that hold the packed runtime (binllm-infer, pure Rust) against the
//! libtorch engine on the same weights: `sign_model::llama_from_packed` builds a libtorch
//! model whose block linears are the dense `row_scale * B * input_scale` of each packed
//! linear, so both must compute the same function. (The libtorch side uses a quantized head's
//! dequantized weights, in f32.)
#![allow(dead_code)]

use binllm_format::packed::{PackedModel, QuantTensors};
use binllm_infer::generate::{generate, GenerateOptions};
use binllm_infer::sampling::SamplingParams;
use binllm_infer::{DenseKernel, KvCache, Model, RuntimeOptions};
use tch::{Device, Kind, Tensor};

pub const PROMPTS: [&str; 3] = [
    "Once upon a time, there was a little girl named Lily.",
    "The sun was shining and the birds were singing",
    "Tom and his dog went to the park. They",
];

pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

pub fn compare(packed: &PackedModel, q8: &QuantTensors, label: &str) {
    let tokenizer = packed.tokenizer().unwrap().unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true).unwrap())
        .collect();
    compare_ids(packed, q8, label, &prompts, 1e-3);
}

pub fn compare_ids(
    packed: &PackedModel,
    q8: &QuantTensors,
    label: &str,
    prompts: &[Vec<u32>],
    tolerance: f64,
) {
    let runtime = Model::new(
        packed,
        q8,
        &RuntimeOptions {
            threads: 2,
            // A quantized head with int16 activations, on every CPU: the VNNI default's int8
            // activations are held against their own reference in binllm-kernels' tests.
            head_kernel: Some(DenseKernel::Portable),
            ..Default::default()
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
    for ids in prompts {
        let prompt = format!("{:?}", &ids[..ids.len().min(6)]);
        let ids = ids.clone();
        let ours = runtime
            .forward_all(&mut KvCache::new(&runtime.config), &ids)
            .unwrap();
        let input =
            Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
        let theirs = tch::no_grad(|| reference.forward(&input, None));
        let theirs = Vec::<f32>::try_from(theirs.flatten(0, -1)).unwrap();
        let err = relative_l2(&ours, &theirs);
        eprintln!("{label}: '{prompt}': logits relative L2 {err:.2e}");
        assert!(
            err <= tolerance,
            "{label}: '{prompt}': logits differ by {err}"
        );

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
