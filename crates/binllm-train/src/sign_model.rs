//! The sign form of a converted model as a [`PackedModel`] (sign bits, merged row scales
//! `S_l S_a`, Stage-1 input scales, FP rest), and back into a libtorch [`Llama`] whose
//! block linears compute exactly that function.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use binllm_format::names::{self, BlockLinear as Which};
use binllm_format::packed::{pack_signs, PackedLinear, PackedModel, Precision, Provenance};
use binllm_format::{HostTensor, PretrainedModel, TensorMap};
use tch::{Device, Kind, Tensor};

use crate::linear::{row_abs_mean, BlockLinear, Param, WeightForm};
use crate::model::Llama;

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous()
            .flatten(0, -1),
    )?)
}

fn host(t: &Tensor) -> Result<HostTensor> {
    let shape = t.size().iter().map(|&d| d as usize).collect();
    Ok(HostTensor::from_f32(shape, to_vec(t)?))
}

/// The per-row scale and input scale of `linear` in `form` (Sign or OneBit).
fn sign_form_vectors(linear: &BlockLinear, form: WeightForm) -> Result<(Tensor, Option<Tensor>)> {
    let latent = &linear.weight.tensor;
    let input = linear.input_scale_vector().map(|s| s.detach());
    Ok(match form {
        WeightForm::Sign => {
            let sa = match &linear.frozen_abs_mean {
                Some(f) => f.tensor.detach(),
                None => row_abs_mean(latent).detach(),
            };
            let scale = match &linear.row_scale {
                Some(sl) => &sl.tensor.detach() * sa,
                None => sa,
            };
            (scale.view([-1]), input)
        }
        WeightForm::OneBit => {
            let a = linear
                .row_scale
                .as_ref()
                .context("OneBit linear without its row vector")?
                .tensor
                .detach();
            let b = linear
                .column_scale
                .as_ref()
                .context("OneBit linear without its column vector")?
                .tensor
                .detach();
            let input = Some(match input {
                Some(s) => s * b,
                None => b,
            });
            (a.view([-1]), input)
        }
        other => bail!("the {other:?} form is not 1 bit per weight: it cannot be packed"),
    })
}

/// Packs the model's `form` (Sign or OneBit) into a sign model with f32 vectors.
pub fn to_sign_model(
    model: &Llama,
    form: WeightForm,
    source: &PretrainedModel,
    provenance: Provenance,
) -> Result<PackedModel> {
    let _guard = tch::no_grad_guard();
    let mut linears = BTreeMap::new();
    for (layer, block) in model.layers.iter().enumerate() {
        for which in Which::ALL {
            let linear = block.linear(which);
            let [rows, cols] = which.shape(&model.config);
            let (row_scale, input_scale) = sign_form_vectors(linear, form)?;
            linears.insert(
                (layer, which),
                PackedLinear {
                    rows,
                    cols,
                    sign_bits: pack_signs(&to_vec(&linear.weight.tensor)?, rows, cols),
                    row_scale: to_vec(&row_scale)?,
                    block_scales: None,
                    input_scale: input_scale.map(|s| to_vec(&s)).transpose()?,
                    bias: linear
                        .bias
                        .as_ref()
                        .map(|b| to_vec(&b.tensor))
                        .transpose()?,
                },
            );
        }
    }
    let mut dense = TensorMap::new();
    dense.insert(names::EMBED.into(), host(&model.embed.tensor)?);
    dense.insert(names::FINAL_NORM.into(), host(&model.final_norm.tensor)?);
    if let Some(head) = &model.lm_head {
        dense.insert(names::LM_HEAD.into(), host(&head.tensor)?);
    }
    for (layer, block) in model.layers.iter().enumerate() {
        dense.insert(names::attn_norm(layer), host(&block.attn_norm.tensor)?);
        dense.insert(names::mlp_norm(layer), host(&block.mlp_norm.tensor)?);
        if let (Some(q), Some(k)) = (&block.q_norm, &block.k_norm) {
            dense.insert(names::q_norm(layer), host(&q.tensor)?);
            dense.insert(names::k_norm(layer), host(&k.tensor)?);
        }
    }
    Ok(PackedModel {
        config: model.config.clone(),
        linears,
        dense,
        tokenizer_json: source.tokenizer.as_ref().map(|t| t.to_json()).transpose()?,
        chat_template: source.chat_template.clone(),
        provenance,
        precision: Precision::F32,
    })
}

/// A libtorch model computing exactly what a packed model computes: each block linear's
/// dense weight is `row_scale * B * input_scale` (built once), everything else as stored.
pub fn llama_from_packed(packed: &PackedModel, device: Device, kind: Kind) -> Result<Llama> {
    let mut tensors = TensorMap::new();
    for (name, t) in &packed.dense {
        tensors.insert(name.clone(), t.clone());
    }
    for (&(layer, which), linear) in &packed.linears {
        tensors.insert(
            names::linear_weight(layer, which),
            HostTensor::from_f32(vec![linear.rows, linear.cols], linear.dense_weight()),
        );
        if let Some(b) = &linear.bias {
            tensors.insert(
                names::linear_bias(layer, which),
                HostTensor::from_f32(vec![linear.rows], b.clone()),
            );
        }
    }
    let pretrained = PretrainedModel {
        config: packed.config.clone(),
        tensors,
        tokenizer: packed.tokenizer()?,
        chat_template: packed.chat_template.clone(),
        format: binllm_format::SourceFormat::HuggingFace,
        path: std::path::PathBuf::from("<packed>"),
        notes: vec![],
    };
    Llama::from_pretrained(&pretrained, device, kind)
}

/// Replaces every block linear's weight by its effective weight under the current form
/// (detached), leaving a plain full-precision model: fast evaluation of any trained form.
pub fn materialize(model: &mut Llama) {
    let form = model.form;
    tch::no_grad(|| {
        for block in &mut model.layers {
            for which in Which::ALL {
                let linear = block.linear_mut(which);
                let w = linear.effective_weight(form).detach();
                let name = linear.weight.name.clone();
                let bias = linear.bias.take();
                *linear = BlockLinear::new(Param::new(name, w), bias);
            }
        }
    });
    model.form = WeightForm::Full;
}
