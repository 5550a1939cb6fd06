//! The LLaMA-family decoder on libtorch, readable top to bottom: embedding, then per layer
//! RMSNorm -> attention (RoPE, GQA, optional q/k norm and q/k/v bias) -> residual,
//! RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and the LM head.
//!
//! One code path for CPU and CUDA, fp32 and bf16. The block linears are
//! [`BlockLinear`]s, so the same model runs full precision, any binary training form, or
//! the final sign form, chosen by [`Llama::form`].

use anyhow::{Context, Result};
use binllm_format::names::{self, BlockLinear as Which};
use binllm_format::{HostTensor, ModelConfig, PretrainedModel, TensorData};
use tch::{Device, Kind, Tensor};

use crate::linear::{BlockLinear, Param, WeightForm};
use crate::profile::SectionTimer;

pub struct Block {
    pub attn_norm: Param,
    pub q: BlockLinear,
    pub k: BlockLinear,
    pub v: BlockLinear,
    pub o: BlockLinear,
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
    pub mlp_norm: Param,
    pub gate: BlockLinear,
    pub up: BlockLinear,
    pub down: BlockLinear,
}

impl Block {
    pub fn linear(&self, which: Which) -> &BlockLinear {
        match which {
            Which::Q => &self.q,
            Which::K => &self.k,
            Which::V => &self.v,
            Which::O => &self.o,
            Which::Gate => &self.gate,
            Which::Up => &self.up,
            Which::Down => &self.down,
        }
    }

    pub fn linear_mut(&mut self, which: Which) -> &mut BlockLinear {
        match which {
            Which::Q => &mut self.q,
            Which::K => &mut self.k,
            Which::V => &mut self.v,
            Which::O => &mut self.o,
            Which::Gate => &mut self.gate,
            Which::Up => &mut self.up,
            Which::Down => &mut self.down,
        }
    }

    fn linears(&self, kinds: &[Which]) -> Vec<&BlockLinear> {
        kinds.iter().map(|&which| self.linear(which)).collect()
    }
}

/// Keys and values of every layer for the positions seen so far.
///
/// A plain cache grows by concatenation, which copies it at every step; a cache made with a
/// capacity ([`KvCache::padded`]) writes new positions into buffers allocated once, which is
/// what batched generation of long answers needs.
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, positions or capacity, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions cached.
    len: i64,
    /// Positions the buffers hold, when allocated once.
    capacity: Option<i64>,
    /// `[batch, positions or capacity]` true where a position is a real token: set for a
    /// left-padded batch, so no query attends to the padding.
    key_valid: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity: None,
            key_valid: None,
        }
    }

    /// A cache for a batch of prompts of different lengths, left-padded to one length, that
    /// will hold at most `capacity` positions: `valid` (`[batch, len]`, bool) marks the real
    /// tokens of the prompts that will be fed first; positions fed later are all real. Since
    /// RoPE scores depend only on relative positions, left padding changes nothing a real
    /// query sees.
    pub fn padded(num_layers: usize, valid: Tensor, capacity: i64) -> Self {
        let (batch, prompt) = (valid.size()[0], valid.size()[1]);
        assert!(capacity >= prompt, "the cache must hold the prompts");
        let later = Tensor::ones([batch, capacity - prompt], (Kind::Bool, valid.device()));
        KvCache {
            key_valid: Some(Tensor::cat(&[valid, later], 1)),
            capacity: Some(capacity),
            ..KvCache::new(num_layers)
        }
    }

    /// Keeps only the batch rows `rows` (int64 indices, in the order given), dropping the
    /// others' keys, values and padding flags, so that finished sequences stop costing
    /// attention reads.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
        if let Some(valid) = &mut self.key_valid {
            *valid = valid.index_select(0, rows);
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores the keys and values of positions `past..past + t` of one layer; returns every
    /// cached key and value so far (views of the buffers when allocated once).
    fn store(&mut self, layer: usize, past: i64, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let slot = &mut self.layers[layer];
        match self.capacity {
            Some(capacity) => {
                assert!(past + t <= capacity, "the KV cache is full");
                let (kb, vb) = slot.get_or_insert_with(|| {
                    let mut shape = k.size();
                    shape[2] = capacity;
                    (
                        Tensor::zeros(&shape[..], (k.kind(), k.device())),
                        Tensor::zeros(&shape[..], (v.kind(), v.device())),
                    )
                });
                kb.narrow(2, past, t).copy_(&k);
                vb.narrow(2, past, t).copy_(&v);
                (kb.narrow(2, 0, past + t), vb.narrow(2, 0, past + t))
            }
            None => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
        }
    }
}

/// Which keys each query may see, built once per forward pass for every layer.
enum AttentionMask {
    /// Plain causal attention over the new positions (no cache, or an empty one).
    Causal,
    /// Every key (one new query after cached keys).
    All,
    /// `[batch or 1, 1, queries, keys]`, true where attention is allowed.
    Explicit(Tensor),
}

pub struct Llama {
    pub config: ModelConfig,
    pub embed: Param,
    pub layers: Vec<Block>,
    pub final_norm: Param,
    /// None when the head is tied to the embedding.
    pub lm_head: Option<Param>,
    /// The weight form every block linear uses in the forward pass.
    pub form: WeightForm,
    /// When set, the forward pass marks its sections (`--profile`).
    pub timer: Option<std::rc::Rc<SectionTimer>>,
    inv_freq: Tensor,
}

/// One block's effective weights under a form, built before its products (so that a
/// profile can tell the binarised-weight transform from the matrix products).
struct BlockWeights {
    /// Q, K, V.
    qkv: SiblingProducts,
    o: Tensor,
    /// Gate, Up.
    gate_up: SiblingProducts,
    down: Tensor,
}

/// Rows (batch x positions) from which a forward pass multiplies by the concatenated
/// weights of sibling projections ([`SiblingProducts::Fused`]). Concatenating copies the
/// weights once per forward pass, which a product over many rows repays (training,
/// prefill) and one over a few rows does not (a decoding step reads each weight once).
pub const FUSED_PRODUCTS_MIN_ROWS: i64 = 256;

/// The projections that read the same input (Q, K, V; Gate, Up) of one block.
enum SiblingProducts {
    /// One product by the effective weights concatenated along the output dimension, split
    /// afterwards into `widths`. On a 576-wide model each product is small: one
    /// `[q + 2 kv, hidden]` and one `[2 intermediate, hidden]` matmul launch fewer kernels
    /// and read the activations once instead of three and two times. The effective weights
    /// already include every scale of every form, so this is the same arithmetic.
    Fused {
        weight: Tensor,
        bias: Option<Tensor>,
        widths: Vec<i64>,
    },
    /// One product per projection: `(weight, bias)`.
    Separate(Vec<(Tensor, Option<Tensor>)>),
}

impl SiblingProducts {
    /// Each projection's output `[.., out]`, in the order the projections were given.
    fn apply(&self, x: &Tensor) -> Vec<Tensor> {
        match self {
            SiblingProducts::Fused {
                weight,
                bias,
                widths,
            } => x
                .linear(weight, bias.as_ref())
                .split_with_sizes(widths.as_slice(), -1),
            SiblingProducts::Separate(products) => products
                .iter()
                .map(|(weight, bias)| x.linear(weight, bias.as_ref()))
                .collect(),
        }
    }
}

/// The projections of a [`SiblingProducts`], in their output order.
const QKV: [Which; 3] = [Which::Q, Which::K, Which::V];
const GATE_UP: [Which; 2] = [Which::Gate, Which::Up];

/// `tensors` concatenated along `dim` (the tensor itself when there is one: no copy).
fn concat(tensors: &[Tensor], dim: i64) -> Tensor {
    match tensors {
        [one] => one.shallow_clone(),
        many => Tensor::cat(many, dim),
    }
}

/// The biases of `linears` concatenated like their weights, zeros standing in for a linear
/// without one; None when none has a bias.
fn concat_bias(linears: &[&BlockLinear]) -> Option<Tensor> {
    let some = &linears.iter().find_map(|l| l.bias.as_ref())?.tensor;
    let parts: Vec<Tensor> = linears
        .iter()
        .map(|l| match &l.bias {
            Some(bias) => bias.tensor.shallow_clone(),
            None => Tensor::zeros([l.out_features()], (some.kind(), some.device())),
        })
        .collect();
    Some(concat(&parts, 0))
}

impl BlockWeights {
    /// Every block's weights under `form`, sibling projections concatenated when `fuse`.
    ///
    /// The binary forms are built for one projection of all layers at once
    /// ([`BlockLinear::stacked`]): the same values from 7 chains of tensor ops instead of
    /// one per linear (210 for SmolLM2), since each op costs the host about as much as the
    /// device's work on one weight matrix. Fused siblings concatenate their stacked
    /// `[layers, out, in]` weights before splitting them into layers: two more ops, not
    /// two per layer.
    fn all(layers: &[Block], form: WeightForm, fuse: bool) -> Vec<Self> {
        let stacks = BlockLinear::stacks(form) && layers.len() > 1;
        // Per layer, the effective weights of `kinds` concatenated along the output
        // dimension.
        let concatenated = |kinds: &[Which]| -> Vec<Tensor> {
            let stacked = |which: Which| {
                let linears: Vec<&BlockLinear> = layers.iter().map(|b| b.linear(which)).collect();
                Some(BlockLinear::stacked(&linears)?.effective_weight(form))
            };
            let all_stacked: Option<Vec<Tensor>> = stacks
                .then(|| kinds.iter().map(|&which| stacked(which)).collect())
                .flatten();
            match all_stacked {
                Some(weights) => concat(&weights, 1).unbind(0),
                None => layers
                    .iter()
                    .map(|b| {
                        let weights: Vec<Tensor> = kinds
                            .iter()
                            .map(|&which| b.linear(which).effective_weight(form))
                            .collect();
                        concat(&weights, 0)
                    })
                    .collect(),
            }
        };
        let siblings = |kinds: &[Which]| -> Vec<SiblingProducts> {
            if fuse {
                return concatenated(kinds)
                    .into_iter()
                    .zip(layers)
                    .map(|(weight, block)| {
                        let linears = block.linears(kinds);
                        SiblingProducts::Fused {
                            weight,
                            bias: concat_bias(&linears),
                            widths: linears.iter().map(|l| l.out_features()).collect(),
                        }
                    })
                    .collect();
            }
            let per_kind: Vec<Vec<Tensor>> = kinds.iter().map(|&w| concatenated(&[w])).collect();
            layers
                .iter()
                .enumerate()
                .map(|(layer, block)| {
                    let products = block
                        .linears(kinds)
                        .iter()
                        .zip(&per_kind)
                        .map(|(linear, weights)| {
                            let bias = linear.bias.as_ref().map(|b| b.tensor.shallow_clone());
                            (weights[layer].shallow_clone(), bias)
                        })
                        .collect();
                    SiblingProducts::Separate(products)
                })
                .collect()
        };
        let single = |which: Which| concatenated(&[which]).into_iter();
        let (mut o, mut down) = (single(Which::O), single(Which::Down));
        siblings(&QKV)
            .into_iter()
            .zip(siblings(&GATE_UP))
            .map(|(qkv, gate_up)| BlockWeights {
                qkv,
                o: o.next().expect("one weight per layer"),
                gate_up,
                down: down.next().expect("one weight per layer"),
            })
            .collect()
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight`, normalised in f32 (f64 for f64 input) and cast
/// back to x's type before the weight multiplies it, as transformers does.
///
/// libtorch's `rms_norm` does this in one kernel on CUDA, forward and backward, instead of
/// six elementwise passes. It multiplies by the weight before casting back, and it falls
/// back to a composition (with a warning) when the weight's type differs from x's, so it
/// runs only where it computes the same thing: x and the weight both f32 or both f64 (the
/// training residual stream), the weight one value per element of the last dimension.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let last = x.size()[x.dim() - 1];
    let same_numerics = matches!(x.kind(), Kind::Float | Kind::Double)
        && weight.kind() == x.kind()
        && weight.size() == [last];
    if same_numerics {
        x.rms_norm([last], Some(weight), eps)
    } else {
        rms_norm_composed(x, weight, eps)
    }
}

/// [`rms_norm`] as separate tensor ops, for the types and weight shapes the fused kernel
/// does not compute alike (bf16 input, a weight broadcast over heads).
fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let compute = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let upcast = x.to_kind(compute);
    let variance = upcast
        .pow_tensor_scalar(2)
        .mean_dim(&[-1i64][..], true, compute);
    let normed = upcast * (variance + eps).rsqrt();
    weight * normed.to_kind(kind)
}

/// Rotary embedding in the rotate-half layout, pairs (i, i + head_dim/2), over the last
/// dimension: `x * cos + [-x2, x1] * sin`. `sin_signed` is the sin table with its first
/// half negated, so the rotation is a swap of halves, `[x2, x1] * sin_signed`: the same
/// products (negation is exact) without a pass that negates x2.
fn apply_rope(x: &Tensor, cos: &Tensor, sin_signed: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let swapped = Tensor::cat(&[x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    x * cos + swapped * sin_signed
}

pub fn host_to_tensor(t: &HostTensor, device: Device, kind: Kind) -> Tensor {
    let src_kind = match t.data {
        TensorData::F32(_) => Kind::Float,
        TensorData::F16(_) => Kind::Half,
        TensorData::BF16(_) => Kind::BFloat16,
    };
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(t.as_bytes(), &shape, src_kind)
        .to_device(device)
        .to_kind(kind)
}

impl Llama {
    /// Builds the model from a loaded pretrained description, on `device`, with parameters
    /// of type `kind` (Float for training masters and exact checks, BFloat16 for inference).
    pub fn from_pretrained(model: &PretrainedModel, device: Device, kind: Kind) -> Result<Self> {
        let config = model.config.clone();
        let param = |name: &str| -> Result<Param> {
            let host = model
                .tensors
                .get(name)
                .with_context(|| format!("{}: tensor '{name}' missing", model.path.display()))?;
            Ok(Param::new(
                name.to_string(),
                host_to_tensor(host, device, kind),
            ))
        };
        let linear = |layer: usize, which: Which| -> Result<BlockLinear> {
            let weight = param(&names::linear_weight(layer, which))?;
            let bias = if which.has_bias(&config) {
                Some(param(&names::linear_bias(layer, which))?)
            } else {
                None
            };
            Ok(BlockLinear::new(weight, bias))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            layers.push(Block {
                attn_norm: param(&names::attn_norm(layer))?,
                q: linear(layer, Which::Q)?,
                k: linear(layer, Which::K)?,
                v: linear(layer, Which::V)?,
                o: linear(layer, Which::O)?,
                q_norm: config
                    .qk_norm
                    .then(|| param(&names::q_norm(layer)))
                    .transpose()?,
                k_norm: config
                    .qk_norm
                    .then(|| param(&names::k_norm(layer)))
                    .transpose()?,
                mlp_norm: param(&names::mlp_norm(layer))?,
                gate: linear(layer, Which::Gate)?,
                up: linear(layer, Which::Up)?,
                down: linear(layer, Which::Down)?,
            });
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(param(names::LM_HEAD)?)
        };
        let inv_freq: Vec<f32> = config.rope_inv_freq().iter().map(|&f| f as f32).collect();
        Ok(Llama {
            embed: param(names::EMBED)?,
            final_norm: param(names::FINAL_NORM)?,
            lm_head,
            layers,
            form: WeightForm::Full,
            timer: None,
            inv_freq: Tensor::from_slice(&inv_freq).to_device(device),
            config,
        })
    }

    pub fn device(&self) -> Device {
        self.embed.tensor.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed.tensor.kind()
    }

    /// cos and signed sin tables (see [`apply_rope`]) `[1, 1, len, head_dim]` for positions
    /// `start..start+len`, computed in f32 like transformers' rotary embedding and cast to
    /// `kind` once per forward pass.
    fn rope_tables(&self, start: i64, len: i64, kind: Kind) -> (Tensor, Tensor) {
        let positions = Tensor::arange_start(start, start + len, (Kind::Float, self.device()));
        let freqs = positions.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let (cos, sin) = (freqs.cos(), freqs.sin());
        let table =
            |halves: [Tensor; 2]| Tensor::cat(&halves, 1).view([1, 1, len, -1]).to_kind(kind);
        (table([cos.shallow_clone(), cos]), table([-&sin, sin]))
    }

    fn attention(
        &self,
        block: &Block,
        weights: &BlockWeights,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &AttentionMask,
        cache: Option<(&mut KvCache, usize, i64)>,
    ) -> Tensor {
        let c = &self.config;
        let (b, t) = (x.size()[0], x.size()[1]);
        let (heads, kv_heads, head_dim) =
            (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let [q, k, v]: [Tensor; 3] = weights.qkv.apply(x).try_into().expect("Q, K and V");
        let mut q = q.view([b, t, heads, head_dim]);
        let mut k = k.view([b, t, kv_heads, head_dim]);
        let v = v.view([b, t, kv_heads, head_dim]).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&block.q_norm, &block.k_norm) {
            q = rms_norm(&q, &qn.tensor, c.rms_norm_eps);
            k = rms_norm(&k, &kn.tensor, c.rms_norm_eps);
        }
        let q = apply_rope(&q.transpose(1, 2), &rope.0, &rope.1);
        let k = apply_rope(&k.transpose(1, 2), &rope.0, &rope.1);
        let (k, v) = match cache {
            Some((cache, layer, past)) => cache.store(layer, past, k, v),
            None => (k, v),
        };
        let (explicit, is_causal) = match mask {
            AttentionMask::Causal => (None, t > 1),
            AttentionMask::All => (None, false),
            AttentionMask::Explicit(m) => (Some(m.shallow_clone()), false),
        };
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            explicit,
            0.0,
            is_causal,
            None,
            kv_heads != heads,
        );
        let attn = attn.transpose(1, 2).reshape([b, t, heads * head_dim]);
        block.o.apply(&attn, &weights.o)
    }

    fn mlp(&self, block: &Block, weights: &BlockWeights, x: &Tensor) -> Tensor {
        let [gate, up]: [Tensor; 2] = weights.gate_up.apply(x).try_into().expect("Gate and Up");
        block.down.apply(&(gate.silu() * up), &weights.down)
    }

    /// Ends a profiled section (nothing unless `--profile` set a timer).
    fn mark(&self, section: &'static str) {
        if let Some(timer) = &self.timer {
            timer.mark(section);
        }
    }

    /// The keys each of `t` new queries may see after `past` cached positions. With cached
    /// keys, one new query sees everything and several need an explicit causal mask (query
    /// i sees keys up to past + i); a padded cache also hides its padding, while letting
    /// every query see itself, so a padding row never has an empty softmax (no NaN).
    fn attention_mask(&self, past: i64, t: i64, key_valid: Option<&Tensor>) -> AttentionMask {
        let device = self.device();
        let causal = || {
            let rows = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1) + past;
            let cols = Tensor::arange(past + t, (Kind::Int64, device)).unsqueeze(0);
            (cols.le_tensor(&rows), cols.eq_tensor(&rows))
        };
        match key_valid {
            // One new (real) query after the cache sees every real key: no causal part.
            Some(valid) if t == 1 => {
                AttentionMask::Explicit(valid.view([valid.size()[0], 1, 1, past + t]))
            }
            Some(valid) => {
                let (allowed, itself) = causal();
                let batch = valid.size()[0];
                let visible = valid.view([batch, 1, 1, past + t]);
                AttentionMask::Explicit(
                    allowed
                        .view([1, 1, t, past + t])
                        .logical_and(&visible)
                        .logical_or(&itself.view([1, 1, t, past + t])),
                )
            }
            None if past == 0 => AttentionMask::Causal,
            None if t == 1 => AttentionMask::All,
            None => AttentionMask::Explicit(causal().0.view([1, 1, t, past + t])),
        }
    }

    /// Hidden states after the final norm, `[batch, len, hidden]`. With a cache, `tokens`
    /// continue the cached positions and are appended to the cache.
    pub fn forward_hidden(&self, tokens: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let t = tokens.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.len());
        let key_valid = cache
            .as_ref()
            .and_then(|c| c.key_valid.as_ref())
            .map(|valid| valid.narrow(1, 0, start + t));
        let mask = self.attention_mask(start, t, key_valid.as_ref());
        let mut h = Tensor::embedding(&self.embed.tensor, tokens, -1, false, false);
        let rope = self.rope_tables(start, t, h.kind());
        let eps = self.config.rms_norm_eps;
        self.mark("embedding");
        let rows = tokens.size()[0] * t;
        let all_weights =
            BlockWeights::all(&self.layers, self.form, rows >= FUSED_PRODUCTS_MIN_ROWS);
        self.mark("binarised weights");
        for (i, (block, weights)) in self.layers.iter().zip(&all_weights).enumerate() {
            let slot = cache.as_deref_mut().map(|c| (c, i, start));
            h = &h
                + self.attention(
                    block,
                    weights,
                    &rms_norm(&h, &block.attn_norm.tensor, eps),
                    &rope,
                    &mask,
                    slot,
                );
            self.mark("attention");
            h = &h + self.mlp(block, weights, &rms_norm(&h, &block.mlp_norm.tensor, eps));
            self.mark("mlp");
        }
        if let Some(c) = cache {
            c.len += t;
        }
        rms_norm(&h, &self.final_norm.tensor, eps)
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn head(&self) -> &Tensor {
        &self.lm_head.as_ref().unwrap_or(&self.embed).tensor
    }

    /// LM head: `[.., hidden]` -> `[.., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.head(), None)
    }

    /// Logits for every position, `[batch, len, vocab]`.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let hidden = self.forward_hidden(tokens, cache);
        let logits = self.logits(&hidden);
        self.mark("head");
        logits
    }

    /// Every parameter once, in a fixed order (shared tensors by their first name).
    pub fn params(&self) -> Vec<&Param> {
        let mut seen = std::collections::HashSet::new();
        let mut out = vec![&self.embed];
        for block in &self.layers {
            out.push(&block.attn_norm);
            out.extend(block.q_norm.iter());
            out.extend(block.k_norm.iter());
            out.push(&block.mlp_norm);
            for which in Which::ALL {
                out.extend(block.linear(which).params());
            }
        }
        out.push(&self.final_norm);
        out.extend(self.lm_head.iter());
        out.retain(|p| seen.insert(p.name.clone()));
        out
    }

    /// Every parameter slot, shared tensors once per holder (see [`Llama::map_params`]).
    fn param_slots_mut(&mut self) -> Vec<&mut Param> {
        let mut out = vec![&mut self.embed, &mut self.final_norm];
        out.extend(self.lm_head.iter_mut());
        for block in &mut self.layers {
            out.push(&mut block.attn_norm);
            out.push(&mut block.mlp_norm);
            out.extend(block.q_norm.iter_mut());
            out.extend(block.k_norm.iter_mut());
            for linear in [
                &mut block.q,
                &mut block.k,
                &mut block.v,
                &mut block.o,
                &mut block.gate,
                &mut block.up,
                &mut block.down,
            ] {
                out.extend(linear.params_mut());
            }
        }
        out
    }

    /// Replaces every parameter by `f(parameter)`, once per name, so tensors shared between
    /// layers (tied Stage-1 input scales) stay shared.
    pub fn map_params(&mut self, f: impl Fn(&Tensor) -> Tensor) {
        let mut mapped: std::collections::HashMap<String, Tensor> =
            std::collections::HashMap::new();
        for slot in self.param_slots_mut() {
            let new = mapped
                .entry(slot.name.clone())
                .or_insert_with(|| f(&slot.tensor));
            slot.tensor = new.shallow_clone();
        }
    }

    /// Moves every parameter to `kind` (e.g. bf16 for inference), without gradients.
    pub fn to_kind(&mut self, kind: Kind) {
        self.map_params(|t| t.detach().to_kind(kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        assert_eq!(a.kind(), b.kind());
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    }

    #[test]
    fn model_rms_norm_through_libtorch_matches_the_composition() {
        tch::manual_seed(1);
        let x = Tensor::randn([3, 5, 64], (Kind::Double, Device::Cpu)) * 3.0;
        let weight = Tensor::rand([64], (Kind::Double, Device::Cpu)) + 0.5;
        let eps = 1e-5;

        // f64: values and both gradients.
        let grads = |norm: fn(&Tensor, &Tensor, f64) -> Tensor| {
            let (x, w) = (
                x.copy().requires_grad_(true),
                weight.copy().requires_grad_(true),
            );
            let y = norm(&x, &w, eps);
            (&y * &y.sin()).sum(Kind::Double).backward();
            (y.detach(), x.grad(), w.grad())
        };
        let (fused, composed) = (grads(rms_norm), grads(rms_norm_composed));
        for (what, a, b) in [
            ("values", &fused.0, &composed.0),
            ("input gradient", &fused.1, &composed.1),
            ("weight gradient", &fused.2, &composed.2),
        ] {
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-13, "f64 {what} differ by {diff:e}");
        }

        // f32, as the training residual stream: f32 rounding apart at most.
        let (x32, w32) = (x.to_kind(Kind::Float), weight.to_kind(Kind::Float));
        let diff = max_abs_diff(
            &rms_norm(&x32, &w32, eps),
            &rms_norm_composed(&x32, &w32, eps),
        );
        assert!(diff <= 1e-5, "f32 values differ by {diff:e}");
        // ... and both within f32 rounding of the f64 result.
        let diff = max_abs_diff(&rms_norm(&x32, &w32, eps).to_kind(Kind::Double), &fused.0);
        assert!(diff <= 1e-5, "f32 against f64 differ by {diff:e}");

        // bf16 activations with f32 weights stay with the composition (libtorch's kernel
        // would return bf16): normalised in f32, rounded to bf16 (relative error at most
        // 2^-8), multiplied by the f32 weight into an f32 result.
        let x16 = x.to_kind(Kind::BFloat16);
        let y = rms_norm(&x16, &w32, eps);
        assert_eq!(y.kind(), Kind::Float);
        assert!(y.equal(&rms_norm_composed(&x16, &w32, eps)));
        let exact = rms_norm_composed(&x16.to_kind(Kind::Double), &weight, eps);
        let relative = ((y.to_kind(Kind::Double) - &exact).abs() / exact.abs())
            .max()
            .double_value(&[]);
        assert!(
            relative <= 1.0 / 256.0 + 1e-6,
            "bf16 relative error {relative:e}"
        );
    }

    #[test]
    fn model_rope_with_a_sign_folded_sin_is_bit_identical_to_rotate_half() {
        tch::manual_seed(2);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
            let x = Tensor::randn([2, 3, 7, 16], (Kind::Float, Device::Cpu)).to_kind(kind);
            let angles = Tensor::rand([1, 1, 7, 8], (Kind::Float, Device::Cpu)) * 20.0;
            let angles = Tensor::cat(&[&angles, &angles], 3);
            let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
            let sin_signed = Tensor::cat(&[-sin.narrow(3, 0, 8), sin.narrow(3, 8, 8)], 3);
            let rotated = Tensor::cat(&[-x.narrow(3, 8, 8), x.narrow(3, 0, 8)], 3);
            let expected = &x * &cos + rotated * &sin;
            let got = apply_rope(&x, &cos, &sin_signed);
            assert!(got.equal(&expected), "{kind:?}: not bit-identical");
        }
    }
}
