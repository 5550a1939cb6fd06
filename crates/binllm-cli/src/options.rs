//! Options that several subcommands take, defined once: how the packed runtime runs
//! (`run`, `bench`, `eval`), how tokens are sampled (`run`, `generate`) and the libtorch
//! parameter type (`eval`, `generate`).

use binllm_infer::sampling::SamplingParams;
use binllm_infer::{DenseKernel, Kernel, RuntimeOptions};

/// How the packed runtime runs: threads and kernels.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Threads of the packed runtime (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// 1-bit kernel (default: the fastest exact one here). `lut-i8-avx512` is faster on some
    /// shapes but rounds activations to int8 (approximate), to measure what that costs.
    #[arg(long, value_enum)]
    pub kernel: Option<Kernel>,
    /// LM-head kernel. q8_0/q4_0 heads: `avx512-vnni` or `avx2-int8` (int8 activations per
    /// block of 32, llama.cpp's arithmetic, the same bits on both; the default on x86-64),
    /// `avx2`, `avx512` or `portable` (int16 activations), `scalar` (f32, the reference).
    #[arg(long, value_enum)]
    pub head_kernel: Option<DenseKernel>,
}

impl RuntimeArgs {
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            threads: self.threads,
            kernel: self.kernel,
            head_kernel: self.head_kernel,
        }
    }
}

/// Token sampling options, shared by `run` (packed engine) and `generate` (libtorch).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 picks the most likely token every step (greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// Parameter type of the libtorch engine.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// Exact.
    F32,
    /// Half the memory; CUDA's fast path.
    Bf16,
}

#[cfg(feature = "torch")]
impl Dtype {
    pub fn label(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}
