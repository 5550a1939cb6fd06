//! The conversion methods and what each one does to the model's structure: the paper's
//! BinaryLLM and the baselines of METHOD.md, sharing one engine and one budget.

use serde::{Deserialize, Serialize};

use binllm_format::names::BlockLinear as Which;

use crate::linear::{Param, ScaleMode, Stage1Surrogate, WeightForm};
use crate::model::Llama;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Tu et al. 2025: Stage 1 (binary-aware init), then consistent progressive training.
    Binaryllm,
    /// Straight-through-estimator binary QAT from the pretrained weights.
    Ste,
    /// BitNet b1.58 absmean ternary QAT (the 1.58-bit reference; not exportable as 1-bit).
    Ternary,
    /// mean|W| * sign(W), no training.
    Ptq,
    /// OneBit: sign(W) with two FP vectors from a rank-1 approximation of |W|, STE QAT.
    Onebit,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Binaryllm => "binaryllm",
            Method::Ste => "ste",
            Method::Ternary => "ternary",
            Method::Ptq => "ptq",
            Method::Onebit => "onebit",
        }
    }

    /// Stage-1 steps when the user does not say: the paper's 50 for BinaryLLM, none for the
    /// baselines (their published recipes have no such stage).
    pub fn default_stage1_steps(self) -> usize {
        match self {
            Method::Binaryllm => 50,
            _ => 0,
        }
    }

    pub fn trains(self) -> bool {
        self != Method::Ptq
    }

    /// The weight form used while training at temperature `t`.
    pub fn training_form(self, t: f64) -> WeightForm {
        match self {
            Method::Binaryllm => WeightForm::Progressive { t },
            Method::Ste => WeightForm::Ste,
            Method::Ternary => WeightForm::Ternary,
            Method::Ptq => WeightForm::Sign,
            Method::Onebit => WeightForm::OneBit,
        }
    }

    /// The form the finished model computes with (what is exported).
    pub fn final_form(self) -> WeightForm {
        match self {
            Method::Binaryllm | Method::Ste | Method::Ptq => WeightForm::Sign,
            Method::Ternary => WeightForm::Ternary,
            Method::Onebit => WeightForm::OneBit,
        }
    }

    /// Whether the final form is 1 bit per weight plus vectors (exportable).
    pub fn is_one_bit(self) -> bool {
        self != Method::Ternary
    }
}

/// Attaches Stage-1 input scales (ones) to every block linear. With `tie`, q/k/v share one
/// vector and gate/up another (they fold into the RMSNorm weights at export), and o_proj's
/// is shared by the query heads of each kv head (it folds into v_proj's rows); down_proj's
/// always folds into up_proj's rows.
pub fn attach_input_scales(model: &mut Llama, tie: bool) {
    let c = &model.config;
    let o_groups = tie.then_some([
        c.num_kv_heads as i64,
        (c.num_heads / c.num_kv_heads) as i64,
        c.head_dim as i64,
    ]);
    for (layer, block) in model.layers.iter_mut().enumerate() {
        let name = |which: Which| format!("model.layers.{layer}.{}.input_scale", which.module());
        let mut shared_attn: Option<Param> = None;
        let mut shared_mlp: Option<Param> = None;
        for which in Which::ALL {
            let group = match which {
                Which::Q | Which::K | Which::V if tie => Some(&mut shared_attn),
                Which::Gate | Which::Up if tie => Some(&mut shared_mlp),
                _ => None,
            };
            let linear = block.linear_mut(which);
            match group {
                Some(slot) => {
                    linear.attach_input_scale(slot.as_ref(), name(which), None);
                    if slot.is_none() {
                        let s = linear.input_scale.as_ref().expect("just attached");
                        *slot = Some(Param::new(s.name.clone(), s.tensor.shallow_clone()));
                    }
                }
                None if which == Which::O => linear.attach_input_scale(None, name(which), o_groups),
                None => linear.attach_input_scale(None, name(which), None),
            }
        }
    }
}

/// Ends Stage 1: the latent weights become `W / s*`, and `s*` stays as the input scale, so
/// the full-precision function is unchanged.
pub fn fold_input_scales_into_latent(model: &mut Llama) {
    tch::no_grad(|| {
        for block in &mut model.layers {
            for which in Which::ALL {
                let linear = block.linear_mut(which);
                if let Some(s) = linear.input_scale_vector() {
                    linear.weight.tensor = (&linear.weight.tensor / s.unsqueeze(0)).detach();
                }
            }
        }
    });
}

/// Adds what `method` trains besides the latent weights (row scales, OneBit vectors).
pub fn attach_method_parameters(
    model: &mut Llama,
    method: Method,
    scales: ScaleMode,
    detach_abs_mean: bool,
) {
    for block in &mut model.layers {
        for which in Which::ALL {
            let linear = block.linear_mut(which);
            match method {
                Method::Binaryllm | Method::Ste => linear.attach_row_scale(scales, detach_abs_mean),
                Method::Onebit => linear.attach_onebit_vectors(),
                Method::Ptq | Method::Ternary => {}
            }
        }
    }
}

/// Makes exactly the parameters named by `trainable` require gradients.
pub fn set_trainable(model: &Llama, trainable: impl Fn(&str) -> bool) {
    for p in model.params() {
        let wanted = trainable(&p.name) && !p.name.ends_with(".frozen_abs_mean");
        let _ = p.tensor.set_requires_grad(wanted);
    }
}

pub fn stage1_trainable(name: &str) -> bool {
    name.ends_with(".input_scale")
}

/// Whether `name` is one of the vectors the binary forms add to a block linear (S_l, the
/// Stage-1 input scale, OneBit's column vector).
pub fn is_scale_vector(name: &str) -> bool {
    [".row_scale", ".input_scale", ".column_scale"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// Whether `name` is the latent weight of a block linear (`...q_proj.weight` and kin).
pub fn is_latent_weight(name: &str) -> bool {
    name.strip_suffix(".weight").is_some_and(|module| {
        Which::ALL
            .iter()
            .any(|which| module.ends_with(&format!(".{}", which.module())))
    })
}

/// Parameters a given Stage-1 surrogate name stands for (`ste` or `progressive:T`).
pub fn parse_stage1_surrogate(s: &str) -> anyhow::Result<Stage1Surrogate> {
    if s == "ste" {
        return Ok(Stage1Surrogate::ClippedSte);
    }
    if let Some(t) = s.strip_prefix("progressive:") {
        let t: f64 = t.parse().map_err(|_| {
            anyhow::anyhow!("bad Stage-1 surrogate '{s}': expected ste or progressive:T")
        })?;
        return Ok(Stage1Surrogate::Progressive { t });
    }
    anyhow::bail!("bad Stage-1 surrogate '{s}': expected ste or progressive:T")
}

/// Relative binary reconstruction error of every block linear, `[layer][linear]`.
pub fn reconstruction_errors(model: &Llama, surrogate: Stage1Surrogate) -> Vec<[f64; 7]> {
    model
        .layers
        .iter()
        .map(|block| {
            let mut errs = [0.0; 7];
            for (i, which) in Which::ALL.into_iter().enumerate() {
                errs[i] = block.linear(which).binary_reconstruction_error(surrogate);
            }
            errs
        })
        .collect()
}

/// A detached copy of every parameter (by name), e.g. to compare before and after.
pub fn snapshot(model: &Llama) -> Vec<(String, Tensor)> {
    model
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect()
}
