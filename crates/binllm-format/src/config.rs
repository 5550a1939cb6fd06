//! The architecture description shared by every reader and engine.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The LLaMA-family variants binllm supports. They differ only in small details,
/// all captured by flags on [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about a model's shape.
///
/// Conventions (all readers convert to them): RoPE in the Hugging Face "rotate half"
/// layout, linear weights stored `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Largest accepted RMSNorm epsilon (models use 1e-6 to 1e-5).
pub const MAX_RMS_NORM_EPS: f64 = 0.1;
/// Largest accepted RoPE base (models use 1e4 to about 1e7).
pub const MAX_ROPE_THETA: f64 = 1e10;
/// Largest accepted number of attention heads.
pub const MAX_HEADS: usize = 4096;

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks the internal consistency of the numbers (not the tensors: see
    /// [`crate::names::check_tensors`]).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("{name} must be positive");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_heads ({}) is not a multiple of num_kv_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim);
        }
        // Ranges every released Llama/Qwen/Mistral sits well inside; a value outside is a
        // damaged file, and would load and compute garbage without a word.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= MAX_RMS_NORM_EPS) {
            bail!(
                "rms_norm_eps = {:e} is outside (0, {MAX_RMS_NORM_EPS}]",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta > 1.0 && self.rope_theta <= MAX_ROPE_THETA) {
            bail!(
                "rope_theta = {:e} is outside (1, {MAX_ROPE_THETA:e}]",
                self.rope_theta
            );
        }
        if self.num_heads > MAX_HEADS {
            bail!("num_heads = {} is more than {MAX_HEADS}", self.num_heads);
        }
        let ids = self.bos_token_id.iter().chain(&self.eos_token_ids);
        if let Some(id) = ids.copied().find(|&id| id as usize >= self.vocab_size) {
            bail!(
                "special token id {id} (bos/eos) is beyond the vocabulary of {}",
                self.vocab_size
            );
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama 3 scaling applied when configured
    /// (the same arithmetic as transformers' `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let old_ctx = s.original_max_position_embeddings as f64;
        let low_freq_wavelen = old_ctx / s.low_freq_factor;
        let high_freq_wavelen = old_ctx / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_freq_wavelen {
                    freq
                } else if wavelen > low_freq_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (old_ctx / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }
}
