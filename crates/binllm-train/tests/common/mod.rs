//! Shared helpers for the libtorch engine's integration tests.
#![allow(dead_code)]

use binllm_train::Llama;
use tch::{Device, Kind, Tensor};

// Each test binary uses its own share of these.
#[allow(unused_imports)]
pub use binllm_testing::shared::{repo_root, shared, smollm2_gguf, stories260k};

/// Full logits `[len, vocab]` (f32, CPU) for one sequence.
pub fn logits_of(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let _guard = tch::no_grad_guard();
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let input = Tensor::from_slice(&ids)
        .unsqueeze(0)
        .to_device(model.device());
    let logits = model
        .forward(&input, None)
        .squeeze_dim(0)
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    Vec::<f32>::try_from(logits.flatten(0, -1)).expect("f32 logits")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
