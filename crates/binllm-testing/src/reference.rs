//! A float64 forward pass of a Llama-family model straight from its float tensors, written
//! for clarity, not speed: the independent reference the packed runtime's logits are held to
//! where libtorch is not at hand (e.g. a GGUF whose blocks carry their own scales, which the
//! float loader reads dequantised).
//!
//! It computes what binllm's engines compute: per layer RMSNorm -> q/k/v (optional bias and
//! q/k RMSNorm per head) -> RoPE in the rotate-half layout -> causal attention with grouped
//! kv heads -> o -> residual; RMSNorm -> SwiGLU -> down -> residual; final RMSNorm and the
//! head (the embedding when tied). Linear weights are `[out, in]`, q/k rows in rotate-half
//! order, as [`PretrainedModel`] holds them whatever the file. RoPE scaling is not modelled.

use binllm_format::names::{self, BlockLinear};
use binllm_format::PretrainedModel;

fn tensor(model: &PretrainedModel, name: &str) -> Vec<f64> {
    model
        .tensors
        .get(name)
        .unwrap_or_else(|| panic!("the model has no tensor '{name}'"))
        .to_f32_vec()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `x / sqrt(mean(x^2) + eps) * weight` over each chunk of `weight.len()`.
fn rms_norm(x: &[f64], weight: &[f64], eps: f64) -> Vec<f64> {
    x.chunks_exact(weight.len())
        .flat_map(|row| {
            let inv =
                1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| v * inv * w)
        })
        .collect()
}

/// `W x (+ b)` for `W` of `[out, in]`.
fn linear(w: &[f64], bias: Option<&[f64]>, x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .enumerate()
        .map(|(r, row)| {
            row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>() + bias.map_or(0.0, |b| b[r])
        })
        .collect()
}

/// The logits of every one of `tokens` (`tokens.len() x vocab`, row-major), from position 0.
pub fn llama_logits_f64(model: &PretrainedModel, tokens: &[u32]) -> Vec<f64> {
    let c = &model.config;
    assert!(
        c.rope_scaling.is_none(),
        "the reference has no RoPE scaling"
    );
    let (h, head_dim) = (c.hidden_size, c.head_dim);
    let eps = c.rms_norm_eps;
    let inv_freq = c.rope_inv_freq();
    let embed = tensor(model, names::EMBED);
    let head = if c.tie_word_embeddings {
        embed.clone()
    } else {
        tensor(model, names::LM_HEAD)
    };
    let rope = |x: &mut [f64], position: usize| {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (sin, cos) = (position as f64 * inv_freq[i]).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for layer in 0..c.num_layers {
        let w = |which: BlockLinear| tensor(model, &names::linear_weight(layer, which));
        let b = |which: BlockLinear| {
            which
                .has_bias(c)
                .then(|| tensor(model, &names::linear_bias(layer, which)))
        };
        let (wq, wk, wv, wo) = (
            w(BlockLinear::Q),
            w(BlockLinear::K),
            w(BlockLinear::V),
            w(BlockLinear::O),
        );
        let (bq, bk, bv) = (b(BlockLinear::Q), b(BlockLinear::K), b(BlockLinear::V));
        let (wg, wu, wd) = (
            w(BlockLinear::Gate),
            w(BlockLinear::Up),
            w(BlockLinear::Down),
        );
        let attn_norm = tensor(model, &names::attn_norm(layer));
        let mlp_norm = tensor(model, &names::mlp_norm(layer));
        let qk_norms = c.qk_norm.then(|| {
            (
                tensor(model, &names::q_norm(layer)),
                tensor(model, &names::k_norm(layer)),
            )
        });
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (position, x) in xs.iter_mut().enumerate() {
            let xn = rms_norm(x, &attn_norm, eps);
            let mut q = linear(&wq, bq.as_deref(), &xn);
            let mut k = linear(&wk, bk.as_deref(), &xn);
            let v = linear(&wv, bv.as_deref(), &xn);
            if let Some((qn, kn)) = &qk_norms {
                q = rms_norm(&q, qn, eps);
                k = rms_norm(&k, kn, eps);
            }
            rope(&mut q, position);
            rope(&mut k, position);
            keys.push(k);
            values.push(v);
            // Causal attention over positions 0..=position; query head `g` reads kv head
            // `g / (heads / kv_heads)`.
            let group = c.num_heads / c.num_kv_heads;
            let mut attn = vec![0.0; c.q_dim()];
            for g in 0..c.num_heads {
                let kv = (g / group) * head_dim..(g / group + 1) * head_dim;
                let qh = &q[g * head_dim..(g + 1) * head_dim];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kv.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (p, weight) in weights.iter().enumerate() {
                    for (out, v) in attn[g * head_dim..(g + 1) * head_dim]
                        .iter_mut()
                        .zip(&values[p][kv.clone()])
                    {
                        *out += weight / total * v;
                    }
                }
            }
            let o = linear(&wo, None, &attn);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let xn = rms_norm(x, &mlp_norm, eps);
            let gate = linear(&wg, None, &xn);
            let up = linear(&wu, None, &xn);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = linear(&wd, None, &act);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
    }
    let final_norm = tensor(model, names::FINAL_NORM);
    xs.iter()
        .flat_map(|x| linear(&head, None, &rms_norm(x, &final_norm, eps)))
        .collect()
}
