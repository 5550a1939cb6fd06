//! The forward pass multiplies by the concatenated weights of sibling projections (Q|K|V,
//! Gate|Up), normalises with libtorch's `rms_norm` and rotates with a sign-folded sin
//! table: it must compute what the per-projection composition it replaced computes, values
//! and gradients, in every weight form and through the KV caches. The reference here is
//! that composition, written out from the model's public parameters, in float64.

mod common;

use binllm_format::names::BlockLinear as Which;
use binllm_format::PretrainedModel;
use binllm_testing::synthetic::{synthetic_llama, synthetic_tensors};
use binllm_train::linear::{ScaleMode, Stage1Surrogate, WeightForm};
use binllm_train::method::{self, Method};
use binllm_train::model::FUSED_PRODUCTS_MIN_ROWS;
use binllm_train::{KvCache, Llama};
use common::stories260k;
use tch::{Device, Kind, Tensor};

// ---- the reference: one product per projection, RMSNorm and RoPE as separate ops ----

fn reference_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let variance = x
        .pow_tensor_scalar(2)
        .mean_dim(&[-1i64][..], true, x.kind());
    weight * (x * (variance + eps).rsqrt())
}

fn reference_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    x * cos + Tensor::cat(&[-x2, x1], 3) * sin
}

/// Logits `[batch, len, vocab]` of `tokens` from position 0, every query seeing the keys up
/// to itself; with `valid` (`[batch, len]`), padding keys are hidden (each query still sees
/// itself, as the model's padded cache does).
fn reference_forward(model: &Llama, tokens: &Tensor, valid: Option<&Tensor>) -> Tensor {
    let c = &model.config;
    let (b, t) = (tokens.size()[0], tokens.size()[1]);
    let (heads, kv_heads, head_dim) =
        (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
    let kind = model.kind();
    // The rotary tables as transformers builds them: angles in f32, then the model's type.
    let inv_freq: Vec<f32> = c.rope_inv_freq().iter().map(|&f| f as f32).collect();
    let positions = Tensor::arange(t, (Kind::Float, Device::Cpu));
    let freqs = positions.unsqueeze(1) * Tensor::from_slice(&inv_freq).unsqueeze(0);
    let angles = Tensor::cat(&[&freqs, &freqs], 1).view([1, 1, t, -1]);
    let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
    let mask = valid.map(|valid| {
        let rows = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(1);
        let cols = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        cols.le_tensor(&rows)
            .view([1, 1, t, t])
            .logical_and(&valid.view([b, 1, 1, t]))
            .logical_or(&cols.eq_tensor(&rows).view([1, 1, t, t]))
    });
    let eps = c.rms_norm_eps;
    let mut h = Tensor::embedding(&model.embed.tensor, tokens, -1, false, false);
    for block in &model.layers {
        let project = |which: Which, x: &Tensor| {
            let linear = block.linear(which);
            linear.apply(x, &linear.effective_weight(model.form))
        };
        let x = reference_rms_norm(&h, &block.attn_norm.tensor, eps);
        let mut q = project(Which::Q, &x).view([b, t, heads, head_dim]);
        let mut k = project(Which::K, &x).view([b, t, kv_heads, head_dim]);
        let v = project(Which::V, &x)
            .view([b, t, kv_heads, head_dim])
            .transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&block.q_norm, &block.k_norm) {
            q = reference_rms_norm(&q, &qn.tensor, eps);
            k = reference_rms_norm(&k, &kn.tensor, eps);
        }
        let q = reference_rope(&q.transpose(1, 2), &cos, &sin);
        let k = reference_rope(&k.transpose(1, 2), &cos, &sin);
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            mask.is_none(),
            None,
            kv_heads != heads,
        )
        .transpose(1, 2)
        .reshape([b, t, heads * head_dim]);
        h = &h + project(Which::O, &attn);
        let x = reference_rms_norm(&h, &block.mlp_norm.tensor, eps);
        let gated = project(Which::Gate, &x).silu() * project(Which::Up, &x);
        h = &h + project(Which::Down, &gated);
    }
    let h = reference_rms_norm(&h, &model.final_norm.tensor, eps);
    h.linear::<Tensor>(model.head(), None)
}

// ---- helpers ----

/// Deterministic token ids in `[0, vocab)`, `[batch, len]`.
fn tokens(model: &Llama, batch: i64, len: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(
        model.config.vocab_size as i64,
        [batch, len],
        (Kind::Int64, Device::Cpu),
    )
}

/// Largest |a - b| relative to the largest |b| (at least 1).
fn relative_max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1.0)
}

/// Random scale vectors in [0.5, 1.5), so every scale of every form matters.
fn randomise_scales(model: &Llama, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for p in model.params() {
            if method::is_scale_vector(&p.name) {
                let mut t = p.tensor.shallow_clone();
                t.copy_(&(Tensor::rand(t.size(), (Kind::Double, Device::Cpu)) + 0.5));
            }
        }
    });
}

/// The gradient of `sum(logits * probe)` for every parameter (None where none reaches it),
/// by name, with `forward` computing the logits.
fn gradients(
    model: &Llama,
    probe: &Tensor,
    forward: impl Fn() -> Tensor,
) -> Vec<(String, Option<Tensor>)> {
    for p in model.params() {
        let mut g = p.tensor.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    (forward() * probe).sum(Kind::Double).backward();
    model
        .params()
        .into_iter()
        .map(|p| {
            let g = p.tensor.grad();
            (p.name.clone(), g.defined().then(|| g.copy()))
        })
        .collect()
}

/// Checks the model's logits and every parameter's gradient against the reference, for
/// `tokens` (`[batch, len]`).
fn check_against_reference(model: &Llama, tokens: &Tensor, what: &str) {
    let fused = model.forward(tokens, None);
    let reference = reference_forward(model, tokens, None);
    let logits = relative_max_diff(&fused, &reference);
    assert!(logits <= 1e-12, "{what}: logits differ by {logits:e}");

    tch::manual_seed(17);
    let probe = Tensor::randn(reference.size(), (Kind::Double, Device::Cpu));
    let got = gradients(model, &probe, || model.forward(tokens, None));
    let want = gradients(model, &probe, || reference_forward(model, tokens, None));
    let mut reached = 0;
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        match (got, want) {
            (Some(got), Some(want)) => {
                let diff = relative_max_diff(got, want);
                assert!(
                    diff <= 1e-10,
                    "{what}: gradient of {name} differs by {diff:e}"
                );
                reached += 1;
            }
            (None, None) => {}
            _ => panic!("{what}: a gradient reaches {name} in one forward only"),
        }
    }
    assert!(reached > 0, "{what}: no gradient reached any parameter");
}

fn stories_model() -> Llama {
    Llama::from_pretrained(&stories260k(), Device::Cpu, Kind::Double).unwrap()
}

/// A two-layer Qwen2/3-style model: q/k/v biases and per-head q/k norms, 4 query heads
/// over 2 kv heads.
fn qwen_style_model() -> Llama {
    let mut pretrained: PretrainedModel = synthetic_llama(64, 96, 4, 2, 16);
    pretrained.config.attention_bias = true;
    pretrained.config.qk_norm = true;
    pretrained.tensors = synthetic_tensors(&pretrained.config);
    Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Double).unwrap()
}

// ---- the tests ----

#[test]
fn fused_forward_matches_the_per_projection_forward_and_gradients_in_float64() {
    // Rows enough for the concatenated products, and few enough for separate ones.
    let (batch, len) = (2, 160);
    assert!(batch * len >= FUSED_PRODUCTS_MIN_ROWS && 12 < FUSED_PRODUCTS_MIN_ROWS);

    // stories260K: 8 query heads over 4 kv heads, Stage-1 input scales tied over q/k/v and
    // gate/up, row scales: every form the binary methods train or ship.
    let mut model = stories_model();
    method::attach_input_scales(&mut model, true);
    method::attach_method_parameters(&mut model, Method::Binaryllm, ScaleMode::Dual, false);
    randomise_scales(&model, 5);
    method::set_trainable(&model, |_| true);
    let long = tokens(&model, batch, len, 1);
    let short = tokens(&model, 1, 12, 2);
    for form in [
        WeightForm::Full,
        WeightForm::Stage1 {
            surrogate: Stage1Surrogate::ClippedSte,
        },
        WeightForm::Stage1 {
            surrogate: Stage1Surrogate::Progressive { t: 9.0 },
        },
        WeightForm::Progressive { t: 3.57 },
        WeightForm::Sign,
        WeightForm::Ste,
        WeightForm::Ternary,
    ] {
        model.form = form;
        check_against_reference(&model, &long, &format!("stories260K {form:?}, fused"));
        check_against_reference(&model, &short, &format!("stories260K {form:?}, separate"));
    }

    // Frozen S_a (the learnable scale mode) in the stacked Stage-2 form.
    let mut model = stories_model();
    method::attach_method_parameters(&mut model, Method::Binaryllm, ScaleMode::Learnable, true);
    randomise_scales(&model, 6);
    method::set_trainable(&model, |_| true);
    model.form = WeightForm::Progressive { t: 0.72 };
    check_against_reference(&model, &long, "stories260K learnable scales, fused");

    // OneBit's row and column vectors.
    let mut model = stories_model();
    method::attach_method_parameters(&mut model, Method::Onebit, ScaleMode::Dual, false);
    method::set_trainable(&model, |_| true);
    model.form = WeightForm::OneBit;
    check_against_reference(&model, &long, "stories260K OneBit, fused");

    // Biases concatenated with the weights, q/k norms.
    let mut model = qwen_style_model();
    method::attach_method_parameters(&mut model, Method::Binaryllm, ScaleMode::Dual, false);
    randomise_scales(&model, 7);
    method::set_trainable(&model, |_| true);
    let long = tokens(&model, batch, len, 1);
    let short = tokens(&model, 1, 12, 2);
    for form in [WeightForm::Full, WeightForm::Progressive { t: 2.0 }] {
        model.form = form;
        check_against_reference(
            &model,
            &long,
            &format!("biases and q/k norms {form:?}, fused"),
        );
        check_against_reference(
            &model,
            &short,
            &format!("biases and q/k norms {form:?}, separate"),
        );
    }
}

#[test]
fn fused_prefill_and_cached_decoding_match_the_per_projection_forward_in_float64() {
    let _guard = tch::no_grad_guard();
    for (label, mut model) in [
        ("stories260K", stories_model()),
        ("biases and q/k norms", qwen_style_model()),
    ] {
        method::attach_method_parameters(&mut model, Method::Binaryllm, ScaleMode::Dual, false);
        randomise_scales(&model, 8);
        model.form = WeightForm::Sign;
        let layers = model.config.num_layers;

        // One sequence: a prefill long enough for the concatenated products, single
        // tokens after it, then a chunk of 3 (an explicit causal mask over the cache).
        let prompt = 300;
        assert!(prompt >= FUSED_PRODUCTS_MIN_ROWS);
        let all = tokens(&model, 1, prompt + 7, 3);
        let reference = reference_forward(&model, &all, None);
        let mut cache = KvCache::new(layers);
        let mut at = 0;
        for step in [prompt, 1, 1, 1, 1, 3] {
            let logits = model.forward(&all.narrow(1, at, step), Some(&mut cache));
            let diff = relative_max_diff(&logits, &reference.narrow(1, at, step));
            assert!(
                diff <= 1e-12,
                "{label}: positions {at}..{} differ by {diff:e}",
                at + step
            );
            at += step;
        }

        // Two left-padded prompts in a cache allocated once, then decoding steps.
        let (width, pad, new) = (280, 37, 3);
        let all = tokens(&model, 2, width + new, 4);
        let valid = Tensor::ones([2, width + new], (Kind::Bool, Device::Cpu));
        let _ = valid.get(1).narrow(0, 0, pad).fill_(0);
        let reference = reference_forward(&model, &all, Some(&valid));
        let mut cache = KvCache::padded(layers, valid.narrow(1, 0, width), width + new);
        let mut at = 0;
        for step in [width, 1, 1, 1] {
            let logits = model.forward(&all.narrow(1, at, step), Some(&mut cache));
            for row in 0..2 {
                // Only real positions: a padding query's output is never used.
                let first = if row == 1 { pad.max(at) } else { at };
                let real = at + step - first;
                let diff = relative_max_diff(
                    &logits.get(row).narrow(0, first - at, real),
                    &reference.get(row).narrow(0, first, real),
                );
                assert!(
                    diff <= 1e-12,
                    "{label}: padded row {row}, positions {first}..{} differ by {diff:e}",
                    at + step
                );
            }
            at += step;
        }
    }
}
