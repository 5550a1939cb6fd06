//! The LLaMA-family decoder on a packed 1-bit model, readable top to bottom (llama2.c style):
//! [`Model::new`] prepares the weights; [`Model::forward`] looks up the embeddings, then per
//! layer RMSNorm -> attention (q/k/v, optional bias and q/k RMSNorm, RoPE in the rotate-half
//! layout, GQA over the [`KvCache`]) -> residual, RMSNorm -> SwiGLU MLP -> residual; final
//! RMSNorm and the LM head.
//!
//! It computes exactly what `binllm_train::model::Llama` computes for the same weights (the
//! libtorch engine, `sign_model::llama_from_packed`), in f32. The matrices are
//! [`crate::linear`]'s: 1-bit block linears (`y = row_scale * (B (input_scale * x)) + bias`)
//! and the dense embedding and head, each split by rows across the thread team (`threads::Team`). A prompt
//! goes through them as one GEMM, a decoded token as a GEMV. Products and attention run on
//! the team, each member its rows or heads; the small element-wise steps run on the calling
//! thread between them. Attention and SwiGLU are binllm-kernels'
//! ([`binllm_kernels::attention`], [`binllm_kernels::activation`]).

use anyhow::{bail, ensure, Context, Result};
use binllm_format::names::{self, BlockLinear};
use binllm_format::packed::{PackedModel, QuantTensors};
use binllm_format::ModelConfig;
use binllm_kernels::{attend, swiglu, DenseKernel, Kernel};

use crate::linear::{forward_stacks, DenseMatrix, Linear};
use crate::threads::{SharedOut, Team};

/// How the runtime runs a model: its threads and kernels.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Threads (0: every core).
    pub threads: usize,
    /// 1-bit kernel (default: [`Kernel::best`]).
    pub kernel: Option<Kernel>,
    /// Kernel of the embedding table and the LM head (default:
    /// [`crate::linear::default_head_kernel`]).
    pub head_kernel: Option<DenseKernel>,
}

/// One transformer block's weights.
pub struct Layer {
    attn_norm: Vec<f32>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// q, k and v, stacked where they read the same input.
    qkv: Vec<Linear>,
    o: Linear,
    mlp_norm: Vec<f32>,
    /// gate and up, stacked where they read the same input.
    gate_up: Vec<Linear>,
    down: Linear,
}

/// The packed model, ready to run.
pub struct Model {
    pub config: ModelConfig,
    embed: DenseMatrix,
    /// None: tied to the embedding.
    head: Option<DenseMatrix>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// RoPE inverse frequencies as the libtorch engine uses them (f32).
    inv_freq: Vec<f32>,
    team: Team,
    kernel: Kernel,
}

/// Keys and values of every layer for the positions seen so far, and the tokens they came
/// from (so a new prompt can reuse the longest common prefix).
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        KvCache {
            keys: vec![Vec::new(); config.num_layers],
            values: vec![Vec::new(); config.num_layers],
            kv_dim: config.kv_dim(),
            tokens: Vec::new(),
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many leading `tokens` the cache already holds.
    pub fn shared_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.tokens.len());
        self.tokens.truncate(len);
        for (k, v) in self.keys.iter_mut().zip(&mut self.values) {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }
}

/// Which positions of a forward pass get logits (the LM head is the largest product).
#[derive(Debug, Clone, Copy)]
enum LogitRows {
    /// Every token (a batched decode step; `forward_all`).
    All,
    /// Only the last token (a prompt).
    Last,
}

fn dense_f32(packed: &PackedModel, name: &str) -> Result<Vec<f32>> {
    Ok(packed
        .dense
        .get(name)
        .with_context(|| format!("packed model lacks '{name}'"))?
        .to_f32_vec())
}

impl Model {
    /// Builds the runtime model from a packed model (and the quantized tensors read with it).
    pub fn new(
        packed: &PackedModel,
        quantized: &QuantTensors,
        options: &RuntimeOptions,
    ) -> Result<Self> {
        packed.validate()?;
        let config = packed.config.clone();
        let kernel = options.kernel.unwrap_or_else(Kernel::best);
        if !kernel.is_available() {
            bail!("kernel {kernel} is not available on this CPU");
        }
        let team = Team::new(options.threads)?;
        // One part per member for the block linears (a LUT GEMV builds its tables once per
        // part); finer parts for the head, the largest product, so that a member the OS
        // descheduled holds up little of it.
        let parts = team.size();
        let head_parts = if parts > 1 { 8 * parts } else { 1 };
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let stacks = |which: &[BlockLinear]| -> Result<Vec<Linear>> {
                let linears = which
                    .iter()
                    .map(|&which| {
                        packed
                            .linears
                            .get(&(layer, which))
                            .with_context(|| format!("layer {layer} lacks {}", which.module()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Linear::stacks(&linears, kernel, parts))
            };
            let linear = |which: BlockLinear| -> Result<Linear> { Ok(stacks(&[which])?.remove(0)) };
            layers.push(Layer {
                attn_norm: dense_f32(packed, &names::attn_norm(layer))?,
                q_norm: config
                    .qk_norm
                    .then(|| dense_f32(packed, &names::q_norm(layer)))
                    .transpose()?,
                k_norm: config
                    .qk_norm
                    .then(|| dense_f32(packed, &names::k_norm(layer)))
                    .transpose()?,
                qkv: stacks(&[BlockLinear::Q, BlockLinear::K, BlockLinear::V])?,
                o: linear(BlockLinear::O)?,
                mlp_norm: dense_f32(packed, &names::mlp_norm(layer))?,
                gate_up: stacks(&[BlockLinear::Gate, BlockLinear::Up])?,
                down: linear(BlockLinear::Down)?,
            });
        }
        let head = if config.tie_word_embeddings {
            None
        } else {
            Some(DenseMatrix::from_tensor(
                packed,
                quantized,
                names::LM_HEAD,
                head_parts,
                options.head_kernel,
            )?)
        };
        Ok(Model {
            embed: DenseMatrix::from_tensor(
                packed,
                quantized,
                names::EMBED,
                head_parts,
                options.head_kernel,
            )?,
            head,
            final_norm: dense_f32(packed, names::FINAL_NORM)?,
            layers,
            inv_freq: config.rope_inv_freq().iter().map(|&f| f as f32).collect(),
            team,
            kernel,
            config,
        })
    }

    /// Reads a packed file and builds the model.
    pub fn load(path: &std::path::Path, options: &RuntimeOptions) -> Result<(Self, PackedModel)> {
        let (packed, quantized) = PackedModel::read_parts(path)?;
        let model = Self::new(&packed, &quantized, options)
            .with_context(|| format!("{}: cannot prepare the model", path.display()))?;
        Ok((model, packed))
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    pub fn threads(&self) -> usize {
        self.team.size()
    }

    pub fn head(&self) -> &DenseMatrix {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights streamed per decoded token: sign bits, vectors (f32 in memory), head.
    pub fn bytes_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(|l| l.qkv.iter().chain(&l.gate_up).chain([&l.o, &l.down]))
            .map(Linear::bytes)
            .sum();
        linears + self.head().bytes()
    }

    /// Logits of the last of `tokens`, which continue the cached positions (and are cached).
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_chunks(cache, tokens, false)
    }

    /// Logits of every one of `tokens` (`tokens.len() x vocab`, row-major): for tests.
    pub fn forward_all(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_chunks(cache, tokens, true)
    }

    /// One decode step of several independent sequences at once: `tokens[i]` continues
    /// `caches[i]` (at its own position) and is cached there. Returns the logits after each
    /// token, one vector per sequence. The products take the sequences as the columns of one
    /// GEMM, so the weights stream from memory once per step rather than once per sequence;
    /// each sequence attends over its own cache only.
    pub fn forward_batch(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(
            caches.len() == tokens.len(),
            "{} caches for {} tokens: a batched step takes one token per sequence",
            caches.len(),
            tokens.len()
        );
        ensure!(!tokens.is_empty(), "no tokens to process");
        self.check_input(tokens)?;
        for cache in caches.iter() {
            self.check_cache(cache)?;
        }
        let slots: Vec<usize> = (0..tokens.len()).collect();
        let logits = self.forward_rows(caches, tokens, &slots, LogitRows::All);
        Ok(logits
            .chunks_exact(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn check_input(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        Ok(())
    }

    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        ensure!(
            cache.kv_dim == self.config.kv_dim() && cache.keys.len() == self.layers.len(),
            "the KV cache belongs to another model"
        );
        Ok(())
    }

    fn forward_chunks(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        self.check_input(tokens)?;
        self.check_cache(cache)?;
        // Long prompts in chunks, to bound the activations held at once.
        const CHUNK: usize = 256;
        let mut logits = Vec::new();
        let which = if all_logits {
            LogitRows::All
        } else {
            LogitRows::Last
        };
        for chunk in tokens.chunks(CHUNK) {
            let out = self.forward_rows(&mut [&mut *cache], chunk, &vec![0; chunk.len()], which);
            if all_logits {
                logits.extend_from_slice(&out);
            } else {
                logits = out;
            }
        }
        Ok(logits)
    }

    /// The forward pass for `n` new tokens: token `t` continues `caches[slots[t]]`, after the
    /// positions that cache held before and the earlier tokens of the same slot (a prompt is
    /// `n` tokens of one slot; a batched decode step one token in each of `n` slots). Products
    /// and attention run on the team (each member its rows / heads); the small element-wise
    /// steps run on the calling thread between them.
    fn forward_rows(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
        slots: &[usize],
        which: LogitRows,
    ) -> Vec<f32> {
        let c = &self.config;
        let (n, h, inter) = (tokens.len(), c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let team = &self.team;
        // Each token's position in its own sequence.
        let positions: Vec<usize> = {
            let mut next: Vec<usize> = caches.iter().map(|cache| cache.len()).collect();
            slots
                .iter()
                .map(|&slot| {
                    next[slot] += 1;
                    next[slot] - 1
                })
                .collect()
        };

        // Embedding lookup.
        let mut x = vec![0f32; n * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.row(t as usize, row);
        }
        let mut xn = vec![0f32; n * h];
        let (mut q, mut k, mut v) = (
            vec![0f32; n * q_dim],
            vec![0f32; n * kv_dim],
            vec![0f32; n * kv_dim],
        );
        let mut attn = vec![0f32; n * q_dim];
        let mut out = vec![0f32; n * h];
        let (mut gate, mut up) = (vec![0f32; n * inter], vec![0f32; n * inter]);
        let rope: Vec<(Vec<f32>, Vec<f32>)> =
            positions.iter().map(|&p| self.rope_angles(p)).collect();
        // The same (token, head) items in every layer, so the same runs.
        let attention_runs = {
            let items = n * c.num_heads;
            balanced_runs(items, team.size().min(items), |index| {
                positions[index / c.num_heads] + 1
            })
        };

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention: q, k, v projections.
            rms_norm(&x, &layer.attn_norm, eps, &mut xn);
            let inputs: Vec<_> = layer.qkv.iter().map(|l| l.scaled_input(&xn)).collect();
            {
                let outs = [
                    SharedOut::new(&mut q),
                    SharedOut::new(&mut k),
                    SharedOut::new(&mut v),
                ];
                team.run(team.size(), &|m| {
                    forward_stacks(&layer.qkv, &inputs, m, n, &outs)
                });
            }
            // q/k RMSNorm per head (Qwen3), then RoPE; keys and values into the cache.
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                rms_norm(&q.clone(), qn, eps, &mut q);
                rms_norm(&k.clone(), kn, eps, &mut k);
            }
            for (t, (cos, sin)) in rope.iter().enumerate() {
                rotate_half(&mut q[t * q_dim..(t + 1) * q_dim], cos, sin);
                rotate_half(&mut k[t * kv_dim..(t + 1) * kv_dim], cos, sin);
            }
            for (t, &slot) in slots.iter().enumerate() {
                let cache = &mut *caches[slot];
                cache.keys[l].extend_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
                cache.values[l].extend_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
            }
            {
                let kv: Vec<(&[f32], &[f32])> = caches
                    .iter()
                    .map(|cache| (&cache.keys[l][..], &cache.values[l][..]))
                    .collect();
                let seen: Vec<(usize, usize)> = slots
                    .iter()
                    .zip(&positions)
                    .map(|(&slot, &p)| (slot, p + 1))
                    .collect();
                attention(c, team, &attention_runs, &q, &kv, &seen, &mut attn);
            }
            // Output projection and residual.
            let ox = layer.o.scaled_input(&attn);
            {
                let oo = SharedOut::new(&mut out);
                team.run(team.size(), &|m| {
                    layer.o.forward_part(m, &ox, n, std::slice::from_ref(&oo))
                });
            }
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);

            // SwiGLU MLP: each member gates its own rows of gate and up.
            rms_norm(&x, &layer.mlp_norm, eps, &mut xn);
            let inputs: Vec<_> = layer.gate_up.iter().map(|l| l.scaled_input(&xn)).collect();
            {
                let outs = [SharedOut::new(&mut gate), SharedOut::new(&mut up)];
                // gate and up have the same rows, so the same split: a member's rows of one
                // are its rows of the other.
                let member_rows = layer.gate_up[0].member_rows();
                team.run(team.size(), &|m| {
                    forward_stacks(&layer.gate_up, &inputs, m, n, &outs);
                    let range = member_rows[m].clone();
                    for t in 0..n {
                        // SAFETY: this member's rows only.
                        let (g, u) = unsafe {
                            (
                                outs[0].slice(t * inter + range.start, range.len()),
                                outs[1].slice(t * inter + range.start, range.len()),
                            )
                        };
                        swiglu(g, u);
                    }
                });
            }
            let dx = layer.down.scaled_input(&gate);
            {
                let oo = SharedOut::new(&mut out);
                team.run(team.size(), &|m| {
                    layer
                        .down
                        .forward_part(m, &dx, n, std::slice::from_ref(&oo))
                });
            }
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
        }
        for (&token, &slot) in tokens.iter().zip(slots) {
            caches[slot].tokens.push(token);
        }

        // Final norm and LM head (only the last position unless every one is asked for).
        let rows = match which {
            LogitRows::All => 0..n,
            LogitRows::Last => n - 1..n,
        };
        let head = self.head();
        let mut normed = vec![0f32; rows.len() * h];
        rms_norm(
            &x[rows.start * h..rows.end * h],
            &self.final_norm,
            eps,
            &mut normed,
        );
        let mut logits = vec![0f32; rows.len() * c.vocab_size];
        let lo = SharedOut::new(&mut logits);
        team.run(head.parts(), &|m| {
            head.product_part(m, &normed, rows.len(), &lo)
        });
        logits
    }

    /// cos and sin of `position * inv_freq` in f32, as the libtorch engine computes the
    /// RoPE angles (the same for every layer, so once per position).
    fn rope_angles(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| (position as f32 * f).sin_cos())
            .map(|(s, c)| (c, s))
            .unzip()
    }
}

/// Rotary embedding in the rotate-half layout: in each head, the pair (i, i + head_dim/2)
/// turns by angle i.
fn rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight`, row by row (rows of `weight.len()`).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean_square = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// Causal multi-head attention of `n` new queries over cached keys and values: query `t`
/// reads the first `seen[t].1` positions of `kv[seen[t].0]` (its own sequence's keys and
/// values, up to and including its own position); query head `h` reads kv head
/// `h / (heads / kv_heads)`. Softmax of `q.k / sqrt(head_dim)`, as scaled_dot_product_attention.
///
/// Part `p` takes the (token, head) items `runs[p]..runs[p + 1]` (from [`balanced_runs`], by
/// the positions each item sees), and consecutive heads of a run that share a kv head are
/// attended together: each cached key and value row then comes from memory once per kv head
/// rather than once per query head.
fn attention(
    c: &ModelConfig,
    team: &Team,
    runs: &[usize],
    q: &[f32],
    kv: &[(&[f32], &[f32])],
    seen: &[(usize, usize)],
    out: &mut [f32],
) {
    let (heads, hd, kv_dim) = (c.num_heads, c.head_dim, c.kv_dim());
    let group = c.num_heads / c.num_kv_heads;
    assert_eq!(runs.last(), Some(&(out.len() / hd)), "runs of other items");
    let shared = SharedOut::new(out);
    team.run(runs.len() - 1, &|part| {
        let mut index = runs[part];
        while index < runs[part + 1] {
            let (t, h) = (index / heads, index % heads);
            // This head and the following ones of its kv head, as far as the part goes.
            let run = (group - h % group).min(runs[part + 1] - index);
            // SAFETY: each (token, head) item belongs to exactly one part.
            let out = unsafe { shared.slice(index * hd, run * hd) };
            let (slot, positions) = seen[t];
            let (keys, values) = kv[slot];
            attend(
                &q[index * hd..(index + run) * hd],
                hd,
                keys,
                values,
                kv_dim,
                (h / group) * hd,
                positions,
                out,
            );
            index += run;
        }
    });
}

/// Boundaries (`parts + 1` of them, from 0 to `items`) of contiguous runs of `0..items` whose
/// summed `cost` is about `1 / parts` of the total each.
fn balanced_runs(items: usize, parts: usize, cost: impl Fn(usize) -> usize) -> Vec<usize> {
    let total: usize = (0..items).map(&cost).sum();
    let mut bounds = vec![0];
    let mut done = 0;
    for index in 0..items {
        done += cost(index);
        while bounds.len() < parts && done * parts >= total * bounds.len() {
            bounds.push(index + 1);
        }
    }
    bounds.resize(parts + 1, items);
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_runs_cover_every_item_once_at_about_equal_cost() {
        assert_eq!(balanced_runs(9, 2, |_| 1), [0, 5, 9]);
        assert_eq!(balanced_runs(1, 1, |_| 1), [0, 1]);
        assert_eq!(balanced_runs(3, 3, |_| 1), [0, 1, 2, 3]);
        // Prefill: 128 tokens x 9 heads, token t sees t + 1 positions.
        let cost = |i: usize| i / 9 + 1;
        let bounds = balanced_runs(128 * 9, 2, cost);
        assert_eq!((bounds[0], bounds.len(), bounds[2]), (0, 3, 128 * 9));
        let first: usize = (bounds[0]..bounds[1]).map(cost).sum();
        let second: usize = (bounds[1]..bounds[2]).map(cost).sum();
        assert!(first.abs_diff(second) <= 2 * 128, "{first} vs {second}");
    }
}
