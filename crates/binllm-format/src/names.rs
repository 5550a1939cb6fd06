//! Canonical tensor names (Hugging Face's) and the check that a set of tensors matches a
//! config. Every reader renames into these; every engine looks tensors up through them.

use anyhow::{bail, Result};

use crate::{ModelConfig, TensorMap};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The seven linear layers of a transformer block: the ones binllm binarizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockLinear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl BlockLinear {
    pub const ALL: [BlockLinear; 7] = [
        BlockLinear::Q,
        BlockLinear::K,
        BlockLinear::V,
        BlockLinear::O,
        BlockLinear::Gate,
        BlockLinear::Up,
        BlockLinear::Down,
    ];

    /// Module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn module(self) -> &'static str {
        match self {
            BlockLinear::Q => "self_attn.q_proj",
            BlockLinear::K => "self_attn.k_proj",
            BlockLinear::V => "self_attn.v_proj",
            BlockLinear::O => "self_attn.o_proj",
            BlockLinear::Gate => "mlp.gate_proj",
            BlockLinear::Up => "mlp.up_proj",
            BlockLinear::Down => "mlp.down_proj",
        }
    }

    /// Short name: q, k, v, o, gate, up, down.
    pub fn short(self) -> &'static str {
        match self {
            BlockLinear::Q => "q",
            BlockLinear::K => "k",
            BlockLinear::V => "v",
            BlockLinear::O => "o",
            BlockLinear::Gate => "gate",
            BlockLinear::Up => "up",
            BlockLinear::Down => "down",
        }
    }

    /// `[out_features, in_features]` for this linear under `config`.
    pub fn shape(self, config: &ModelConfig) -> [usize; 2] {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        match self {
            BlockLinear::Q => [config.q_dim(), h],
            BlockLinear::K | BlockLinear::V => [config.kv_dim(), h],
            BlockLinear::O => [h, config.q_dim()],
            BlockLinear::Gate | BlockLinear::Up => [i, h],
            BlockLinear::Down => [h, i],
        }
    }

    pub fn has_bias(self, config: &ModelConfig) -> bool {
        config.attention_bias && matches!(self, BlockLinear::Q | BlockLinear::K | BlockLinear::V)
    }
}

pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

pub fn linear_weight(layer: usize, linear: BlockLinear) -> String {
    format!("model.layers.{layer}.{}.weight", linear.module())
}

pub fn linear_bias(layer: usize, linear: BlockLinear) -> String {
    format!("model.layers.{layer}.{}.bias", linear.module())
}

pub fn attn_norm(layer: usize) -> String {
    format!("model.layers.{layer}.input_layernorm.weight")
}

pub fn mlp_norm(layer: usize) -> String {
    format!("model.layers.{layer}.post_attention_layernorm.weight")
}

pub fn q_norm(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.q_norm.weight")
}

pub fn k_norm(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.k_norm.weight")
}

/// Parameter groups reported by `binllm inspect` and used for bits-per-weight accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamGroup {
    BlockLinear,
    Embedding,
    Head,
    Norm,
    Bias,
}

impl ParamGroup {
    pub fn of(name: &str) -> ParamGroup {
        if name == EMBED {
            ParamGroup::Embedding
        } else if name == LM_HEAD {
            ParamGroup::Head
        } else if name.ends_with(".bias") {
            ParamGroup::Bias
        } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            ParamGroup::Norm
        } else {
            ParamGroup::BlockLinear
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ParamGroup::BlockLinear => "block linears",
            ParamGroup::Embedding => "embeddings",
            ParamGroup::Head => "lm head",
            ParamGroup::Norm => "norms",
            ParamGroup::Bias => "biases",
        }
    }
}

/// Every tensor the config calls for, with its shape.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let mut out = vec![
        (EMBED.to_string(), vec![config.vocab_size, h]),
        (FINAL_NORM.to_string(), vec![h]),
    ];
    if !config.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![config.vocab_size, h]));
    }
    for layer in 0..config.num_layers {
        out.push((attn_norm(layer), vec![h]));
        out.push((mlp_norm(layer), vec![h]));
        if config.qk_norm {
            out.push((q_norm(layer), vec![config.head_dim]));
            out.push((k_norm(layer), vec![config.head_dim]));
        }
        for linear in BlockLinear::ALL {
            out.push((linear_weight(layer, linear), linear.shape(config).to_vec()));
            if linear.has_bias(config) {
                out.push((linear_bias(layer, linear), vec![linear.shape(config)[0]]));
            }
        }
    }
    out
}

/// How many transformer blocks `tensors` holds tensors for (1 + the largest layer index).
fn layers_present(tensors: &TensorMap) -> usize {
    tensors
        .keys()
        .filter_map(|name| {
            name.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Checks that `tensors` holds exactly what `config` calls for, with the right shapes.
/// The error names the first disagreement; the caller adds the file name.
pub fn check_tensors(config: &ModelConfig, tensors: &TensorMap) -> Result<()> {
    // Before listing what the config calls for: a corrupt layer count (millions) would
    // otherwise make that list itself take gigabytes.
    let present = layers_present(tensors);
    if config.num_layers > present {
        bail!(
            "config calls for tensor '{}', which the file does not have: num_layers = {}, but the file holds tensors for {present} layers",
            attn_norm(present),
            config.num_layers
        );
    }
    let expected = expected_tensors(config);
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => {
                bail!("config calls for tensor '{name}' {shape:?}, which the file does not have")
            }
            Some(t) if &t.shape != shape => bail!(
                "tensor '{name}' has shape {:?} but the config implies {shape:?}",
                t.shape
            ),
            Some(_) => {}
        }
    }
    if tensors.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = tensors
            .keys()
            .map(String::as_str)
            .filter(|n| !known.contains(n))
            .take(5)
            .collect();
        bail!("file has tensors the config does not account for: {extra:?}");
    }
    Ok(())
}
