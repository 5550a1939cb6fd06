//! The LLaMA-family decoder on a packed 1-bit model, readable top to bottom (llama2.c style):
//! embedding lookup, then per layer RMSNorm -> attention (q/k/v, optional bias and q/k
//! RMSNorm, RoPE in the rotate-half layout, GQA over the KV cache) -> residual, RMSNorm ->
//! SwiGLU MLP -> residual; final RMSNorm and the LM head.
//!
//! It computes exactly what `binllm_train::model::Llama` computes for the same weights (the
//! libtorch engine, `sign_model::llama_from_packed`), in f32. Block linears are 1-bit
//! ([`PreparedMatrix`], `y = row_scale * (B (input_scale * x)) + bias`); a prompt goes through
//! them as one GEMM, a decoded token as a GEMV. Every matrix is split by rows into one part
//! per member of the thread [`Team`]; member `i` computes part `i` of each product, and the
//! linears that read one input (q, k, v; gate, up) are stacked so that a member makes one
//! product for its rows of all of them.

use anyhow::{bail, ensure, Context, Result};
use binllm_format::names::{self, BlockLinear};
use binllm_format::packed::{PackedLinear, PackedModel, QuantTensor, QuantTensors};
use binllm_format::{ModelConfig, TensorData};
use binllm_kernels::{DenseKernel, Kernel, PackedMatrix, PreparedMatrix, Q4Matrix, Q8Matrix};
use half::f16;

use crate::threads::{split_rows, SharedOut, Team};

/// How to prepare a model for running.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Threads (0: every core).
    pub threads: usize,
    /// 1-bit kernel (default: [`Kernel::best`]).
    pub kernel: Option<Kernel>,
    /// Kernel of the embedding table and the LM head (default: [`default_head_kernel`]).
    pub head_kernel: Option<DenseKernel>,
}

/// The quantized LM head's default kernel: int8 activations per block of 32, llama.cpp's
/// arithmetic for q8_0 / q4_0 weights, with the same bits on every x86-64 CPU with AVX2
/// (`avx512-vnni` where the CPU has it, else `avx2-int8`). Against int16 activations the SmolLM2
/// head GEMV ran, on one thread of a Xeon, 1.45x (q8_0) and 2.1x (q4_0) as fast with VNNI and
/// 1.3x / 1.5x with AVX2. Elsewhere the portable int16 path.
pub fn default_head_kernel() -> DenseKernel {
    [DenseKernel::Avx512Vnni, DenseKernel::Avx2Int8]
        .into_iter()
        .find(|k| k.is_available())
        .unwrap_or_else(DenseKernel::best)
}

/// Rows per kernel block: parts split on multiples of this never cut a LUT tile.
const ROW_ALIGN: usize = 32;

/// Binarized linear layers that read one input (q, k and v; gate and up), split by rows into
/// one part per team member. A member's rows of every layer in the stack form one matrix, so
/// one product builds the input's lookup tables once for all of them. A stack of one is a
/// plain linear layer.
pub struct Linear {
    cols: usize,
    outputs: Vec<LinearOutput>,
    /// Per member: its rows of each output, one after the other (None: no rows).
    members: Vec<Option<PreparedMatrix>>,
    input_scale: Option<Vec<f32>>,
    packed_bytes: usize,
}

/// One layer of a [`Linear`] stack: its rows, bias, and each member's share of its rows.
struct LinearOutput {
    rows: usize,
    ranges: Vec<std::ops::Range<usize>>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// Stacks of consecutive `linears` that read the same input (same width and input
    /// scale), in order.
    fn stacks(linears: &[&PackedLinear], kernel: Kernel, parts: usize) -> Vec<Linear> {
        let mut stacks: Vec<Vec<&PackedLinear>> = Vec::new();
        for &l in linears {
            match stacks.last_mut() {
                Some(stack) if stack[0].cols == l.cols && stack[0].input_scale == l.input_scale => {
                    stack.push(l)
                }
                _ => stacks.push(vec![l]),
            }
        }
        stacks
            .iter()
            .map(|stack| Linear::new(stack, kernel, parts))
            .collect()
    }

    fn new(stack: &[&PackedLinear], kernel: Kernel, parts: usize) -> Self {
        let cols = stack[0].cols;
        let wpr = binllm_format::packed::words_per_row(cols);
        let outputs: Vec<LinearOutput> = stack
            .iter()
            .map(|l| LinearOutput {
                rows: l.rows,
                ranges: split_rows(l.rows, parts, ROW_ALIGN),
                bias: l.bias.clone(),
            })
            .collect();
        let members: Vec<Option<PreparedMatrix>> = (0..parts.max(1))
            .map(|member| {
                let (mut bits, mut scales) = (Vec::new(), Vec::new());
                for (l, output) in stack.iter().zip(&outputs) {
                    let range = output.ranges[member].clone();
                    bits.extend_from_slice(&l.sign_bits[range.start * wpr..range.end * wpr]);
                    scales.extend_from_slice(&l.row_scale[range]);
                }
                (!scales.is_empty()).then(|| {
                    PreparedMatrix::new(
                        PackedMatrix::from_parts(scales.len(), cols, bits, scales),
                        kernel,
                    )
                })
            })
            .collect();
        Linear {
            cols,
            packed_bytes: members.iter().flatten().map(|m| m.packed_bytes()).sum(),
            outputs,
            members,
            input_scale: stack[0].input_scale.clone(),
        }
    }

    /// Rows of every layer in the stack.
    pub fn rows(&self) -> usize {
        self.outputs.iter().map(|o| o.rows).sum()
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `xs` times the input scale (a copy only when there is one), before the team starts.
    fn scaled_input<'a>(&self, xs: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.input_scale {
            Some(s) => xs
                .chunks_exact(s.len())
                .flat_map(|x| x.iter().zip(s).map(|(x, s)| x * s))
                .collect(),
            None => xs.into(),
        }
    }

    /// Member `member`'s rows of `ys[i][t] = row_scale * (B_i xs[t]) + bias_i` for each layer
    /// `i` of the stack and the `n` rows of `xs` (already input-scaled); `ys[i]` is
    /// `n x rows_i`.
    fn forward_part(&self, member: usize, xs: &[f32], n: usize, ys: &[SharedOut]) {
        assert_eq!(ys.len(), self.outputs.len());
        let Some(Some(matrix)) = self.members.get(member) else {
            return;
        };
        let add_bias = |y: &mut [f32], output: &LinearOutput, range: std::ops::Range<usize>| {
            if let Some(b) = &output.bias {
                y.iter_mut().zip(&b[range]).for_each(|(y, b)| *y += b);
            }
        };
        if let ([output], [ys], 1) = (&self.outputs[..], ys, n) {
            // One layer, one token: this member's rows are contiguous in `ys`.
            let range = output.ranges[member].clone();
            // SAFETY: member parts are disjoint row ranges.
            let y = unsafe { ys.slice(range.start, range.len()) };
            matrix.gemv(xs, y);
            add_bias(y, output, range);
            return;
        }
        let member_rows = matrix.rows();
        let mut local = vec![0f32; n * member_rows];
        if n == 1 {
            matrix.gemv(xs, &mut local);
        } else {
            matrix.gemm(xs, n, &mut local);
        }
        for (t, local) in local.chunks_exact_mut(member_rows).enumerate() {
            let mut first = 0;
            for (output, ys) in self.outputs.iter().zip(ys) {
                let range = output.ranges[member].clone();
                let y = &mut local[first..first + range.len()];
                add_bias(y, output, range.clone());
                // SAFETY: member parts are disjoint row ranges of each output row.
                unsafe { ys.slice(t * output.rows + range.start, range.len()) }.copy_from_slice(y);
                first += range.len();
            }
        }
    }
}

/// Member `member`'s share of `stacks` (whose layers, in order, write `ys`), each stack on its
/// own input from `inputs`.
fn forward_stacks(
    stacks: &[Linear],
    inputs: &[std::borrow::Cow<'_, [f32]>],
    member: usize,
    n: usize,
    ys: &[SharedOut],
) {
    let mut first = 0;
    for (stack, xs) in stacks.iter().zip(inputs) {
        let outputs = stack.outputs.len();
        stack.forward_part(member, xs, n, &ys[first..first + outputs]);
        first += outputs;
    }
}

/// A floating-point matrix, the embedding table and the LM head, split by rows like [`Linear`].
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    parts: Vec<std::ops::Range<usize>>,
    data: DenseData,
    kernel: DenseKernel,
}

enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Q8Matrix),
    Q4(Q4Matrix),
}

impl DenseMatrix {
    fn from_tensor(
        packed: &PackedModel,
        quantized: &QuantTensors,
        name: &str,
        parts: usize,
        kernel: Option<DenseKernel>,
    ) -> Result<Self> {
        let t = packed
            .dense
            .get(name)
            .with_context(|| format!("packed model lacks '{name}'"))?;
        ensure!(t.shape.len() == 2, "'{name}' is not a matrix");
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let parts = split_rows(rows, parts, ROW_ALIGN);
        let data = match (quantized.get(name), &t.data) {
            (Some(QuantTensor::Q4(q)), _) => DenseData::Q4(q.clone()),
            (Some(QuantTensor::Q8(q)), _) => DenseData::Q8(q.clone()),
            (None, TensorData::F16(w)) => DenseData::F16(w.clone()),
            (None, _) => DenseData::F32(t.to_f32_vec()),
        };
        // By default f16 and f32 take the widest vectors, the quantized formats their own pick.
        let kernel = kernel.unwrap_or_else(|| match data {
            DenseData::F32(_) | DenseData::F16(_) => DenseKernel::best(),
            DenseData::Q8(_) | DenseData::Q4(_) => default_head_kernel(),
        });
        ensure!(
            kernel.is_available(),
            "dense kernel {} is not available on this CPU",
            kernel.name()
        );
        Ok(DenseMatrix {
            rows,
            cols,
            parts,
            data,
            kernel,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn label(&self) -> &'static str {
        match self.data {
            DenseData::F32(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::Q8(_) => "q8_0",
            DenseData::Q4(_) => "q4_0",
        }
    }

    /// The kernel its products run on.
    pub fn kernel(&self) -> DenseKernel {
        self.kernel
    }

    /// Bytes read by one product.
    pub fn bytes(&self) -> usize {
        match &self.data {
            DenseData::F32(w) => 4 * w.len(),
            DenseData::F16(w) => 2 * w.len(),
            DenseData::Q8(m) => m.bytes(),
            DenseData::Q4(m) => m.bytes(),
        }
    }

    /// Row `r` as f32 (the embedding lookup).
    fn row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        match &self.data {
            DenseData::F32(w) => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            DenseData::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
            DenseData::Q8(m) => m.dequantize_row(r, out),
            DenseData::Q4(m) => m.dequantize_row(r, out),
        }
    }

    /// Member `member`'s rows of `ys[t] = W xs[t]` for `n` vectors (`ys` is `n x rows`). One
    /// vector is a GEMV; several go tile by tile, so the matrix is read once, not `n` times.
    fn product_part(&self, member: usize, xs: &[f32], n: usize, ys: &SharedOut) {
        if n == 1 {
            return self.gemv_part(member, xs, ys);
        }
        let Some(range) = self.parts.get(member).filter(|r| !r.is_empty()) else {
            return;
        };
        let (rows, cols) = (range.len(), self.cols);
        let mut part = vec![0f32; n * rows];
        match &self.data {
            DenseData::F32(w) => binllm_kernels::gemm_dense_with(
                self.kernel,
                &w[range.start * cols..range.end * cols],
                cols,
                xs,
                &mut part,
            ),
            DenseData::F16(w) => binllm_kernels::gemm_dense_with(
                self.kernel,
                &w[range.start * cols..range.end * cols],
                cols,
                xs,
                &mut part,
            ),
            DenseData::Q8(m) => {
                binllm_kernels::gemm_q8_rows(self.kernel, m, range.clone(), xs, n, &mut part)
            }
            DenseData::Q4(m) => {
                binllm_kernels::gemm_q4_rows(self.kernel, m, range.clone(), xs, n, &mut part)
            }
        }
        for (t, values) in part.chunks_exact(rows).enumerate() {
            // SAFETY: member parts are disjoint row ranges of each output vector.
            unsafe { ys.slice(t * self.rows + range.start, rows) }.copy_from_slice(values);
        }
    }

    /// Member `member`'s rows of `y = W x`.
    fn gemv_part(&self, member: usize, x: &[f32], y: &SharedOut) {
        let Some(range) = self.parts.get(member).filter(|r| !r.is_empty()) else {
            return;
        };
        // SAFETY: member parts are disjoint row ranges.
        let out = unsafe { y.slice(range.start, range.len()) };
        let (rows, cols) = (range.len(), self.cols);
        match &self.data {
            DenseData::F32(w) => binllm_kernels::gemv_f32_with(
                self.kernel,
                &w[range.start * cols..range.end * cols],
                rows,
                cols,
                x,
                out,
            ),
            DenseData::F16(w) => binllm_kernels::gemv_f16_with(
                self.kernel,
                &w[range.start * cols..range.end * cols],
                rows,
                cols,
                x,
                out,
            ),
            DenseData::Q8(m) => {
                binllm_kernels::gemm_q8_rows(self.kernel, m, range.clone(), x, 1, out)
            }
            DenseData::Q4(m) => {
                binllm_kernels::gemm_q4_rows(self.kernel, m, range.clone(), x, 1, out)
            }
        }
    }
}

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
        options: &LoadOptions,
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
    pub fn load(path: &std::path::Path, options: &LoadOptions) -> Result<(Self, PackedModel)> {
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
            .map(|l| l.packed_bytes + 4 * (l.rows() + l.input_scale.as_ref().map_or(0, Vec::len)))
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

    fn forward_chunks(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        ensure!(
            cache.kv_dim == self.config.kv_dim() && cache.keys.len() == self.layers.len(),
            "the KV cache belongs to another model"
        );
        // Long prompts in chunks, to bound the activations held at once.
        const CHUNK: usize = 256;
        let mut logits = Vec::new();
        for chunk in tokens.chunks(CHUNK) {
            let out = self.forward_chunk(cache, chunk, all_logits);
            if all_logits {
                logits.extend_from_slice(&out);
            } else {
                logits = out;
            }
        }
        Ok(logits)
    }

    /// The forward pass for `n` new tokens at positions `cache.len()..`. Products and
    /// attention run on the team (each member its rows / heads); the small element-wise steps
    /// run on the calling thread between them.
    fn forward_chunk(&self, cache: &mut KvCache, tokens: &[u32], all_logits: bool) -> Vec<f32> {
        let c = &self.config;
        let (n, h, inter) = (tokens.len(), c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let start = cache.len();
        let team = &self.team;

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
            (start..start + n).map(|p| self.rope_angles(p)).collect();
        // The same (token, head) items in every layer, so the same runs.
        let attention_runs = {
            let items = n * c.num_heads;
            balanced_runs(items, team.size().min(items), |index| {
                start + index / c.num_heads + 1
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
            cache.keys[l].extend_from_slice(&k);
            cache.values[l].extend_from_slice(&v);
            attention(
                c,
                team,
                &attention_runs,
                &q,
                &cache.keys[l],
                &cache.values[l],
                start,
                &mut attn,
            );
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
                let member_rows = &layer.gate_up[0].outputs[0].ranges;
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
        cache.tokens.extend_from_slice(tokens);

        // Final norm and LM head (only the last position unless every one is asked for).
        let rows = if all_logits { 0..n } else { n - 1..n };
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
        team.run(head.parts.len(), &|m| {
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

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`.
fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { swiglu_avx512(gate, up) };
    }
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u);
}

/// [`swiglu`] 16 lanes at a time. `silu(x) = x / (1 + e^-x)`, written with `e = e^-|x|` as
/// `x / (1 + e)` for `x >= 0` and `x e / (1 + e)` below, so that [`exp_avx512`] only sees the
/// arguments <= 0 it is accurate for.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_avx512(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    for (gate, up) in gate.chunks_mut(16).zip(up.chunks(16)) {
        let mask: __mmask16 = if gate.len() == 16 {
            u16::MAX
        } else {
            (1u16 << gate.len()) - 1
        };
        // SAFETY: masked loads and stores touch only the chunk's lanes.
        let (x, u) = unsafe {
            (
                _mm512_maskz_loadu_ps(mask, gate.as_ptr()),
                _mm512_maskz_loadu_ps(mask, up.as_ptr()),
            )
        };
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        let e = exp_avx512(_mm512_min_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), x)));
        let numerator = _mm512_mask_mul_ps(x, negative, x, e);
        let silu = _mm512_div_ps(numerator, _mm512_add_ps(one, e));
        unsafe { _mm512_mask_storeu_ps(gate.as_mut_ptr(), mask, _mm512_mul_ps(silu, u)) };
    }
}

/// Causal multi-head attention of `n` new queries (positions `start..start + n`) over the
/// cached keys and values (positions `0..start + n`); query head `h` reads kv head
/// `h / (heads / kv_heads)`. Softmax of `q.k / sqrt(head_dim)`, as scaled_dot_product_attention.
///
/// Part `p` takes the (token, head) items `runs[p]..runs[p + 1]` (from [`balanced_runs`], by
/// the positions each item sees), and consecutive heads of a run that share a kv head are
/// attended together: each cached key and value row then comes from memory once per kv head
/// rather than once per query head.
#[allow(clippy::too_many_arguments)]
fn attention(
    c: &ModelConfig,
    team: &Team,
    runs: &[usize],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    start: usize,
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
            attend(
                &q[index * hd..(index + run) * hd],
                hd,
                keys,
                values,
                kv_dim,
                (h / group) * hd,
                start + t + 1,
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

/// Query heads `queries` (`head_dim` floats each, all reading one kv head) over `visible`
/// cached positions (keys and values strided by `kv_dim`, starting at `kv_offset`), into `out`
/// (`head_dim` floats per head).
#[allow(clippy::too_many_arguments)]
fn attend(
    queries: &[f32],
    head_dim: usize,
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    kv_offset: usize,
    visible: usize,
    out: &mut [f32],
) {
    assert_eq!(queries.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if head_dim.is_multiple_of(16)
        && head_dim <= 256
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the features were just detected.
        return unsafe {
            attend_avx512(
                queries, head_dim, keys, values, kv_dim, kv_offset, visible, out,
            )
        };
    }
    for (query, out) in queries
        .chunks_exact(head_dim)
        .zip(out.chunks_exact_mut(head_dim))
    {
        attend_generic(query, keys, values, kv_dim, kv_offset, visible, out)
    }
}

/// Positions per tile of the weighted value sum: a tile's value rows stay in L1 while every
/// head of the group takes its turn.
#[cfg(target_arch = "x86_64")]
const VALUE_TILE: usize = 32;

/// [`attend_generic`] for each head of `queries`, with AVX-512 dot products and updates, for
/// head dims that are whole multiples of 16 up to 256 (64 and 128 in practice). Each phase
/// walks the positions outermost and the heads inside, so the group shares every key and
/// value row brought in from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn attend_avx512(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    kv_offset: usize,
    visible: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(hd.is_multiple_of(16) && hd <= 256);
    assert!(
        keys.len() >= (visible - 1) * kv_dim + kv_offset + hd
            && values.len() >= (visible - 1) * kv_dim + kv_offset + hd
    );
    assert!(out.len() == queries.len() && queries.len().is_multiple_of(hd));
    let heads = queries.len() / hd;
    let chunks = hd / 16;
    let scale = 1.0 / (hd as f32).sqrt();
    let blocks = visible.div_ceil(16);
    let padded = blocks * 16;
    // Scores 16 positions at a time: each position's 16-lane partial dot product, then one
    // transposing reduction gives the block's 16 scores in one register (a horizontal sum per
    // position cost several times the dot product itself at head_dim 64).
    let mut scores = vec![0f32; heads * padded];
    // Lanes of block `block` that hold positions before `visible`.
    let real_positions = |block: usize| -> __mmask16 {
        match visible - block * 16 {
            valid if valid >= 16 => u16::MAX,
            valid => (1u16 << valid) - 1,
        }
    };
    let mut max_lanes = vec![_mm512_set1_ps(f32::NEG_INFINITY); heads];
    for block in 0..blocks {
        let mask = real_positions(block);
        for (g, max_lanes) in max_lanes.iter_mut().enumerate() {
            let mut q = [_mm512_setzero_ps(); 16];
            for (i, q) in q.iter_mut().enumerate().take(chunks) {
                // SAFETY: g * hd + i * 16 + 16 <= queries.len().
                *q = unsafe { _mm512_loadu_ps(queries.as_ptr().add(g * hd + i * 16)) };
            }
            let mut partial = [_mm512_setzero_ps(); 16];
            for (j, partial) in partial.iter_mut().enumerate() {
                let p = block * 16 + j;
                if p >= visible {
                    break;
                }
                // SAFETY: in bounds by the assertion above.
                let key = unsafe { keys.as_ptr().add(p * kv_dim + kv_offset) };
                if g == 0 {
                    // The cache is strided by kv head, which the hardware prefetchers follow
                    // poorly: ask for the row of the next block.
                    binllm_kernels::prefetch_lines(key.wrapping_add(16 * kv_dim), hd);
                }
                for (i, q) in q.iter().enumerate().take(chunks) {
                    *partial =
                        _mm512_fmadd_ps(*q, unsafe { _mm512_loadu_ps(key.add(i * 16)) }, *partial);
                }
            }
            let block_scores = _mm512_mul_ps(transpose_sum16(&partial), _mm512_set1_ps(scale));
            *max_lanes = _mm512_mask_max_ps(*max_lanes, mask, *max_lanes, block_scores);
            // SAFETY: each head's scores hold whole blocks of 16.
            unsafe {
                _mm512_storeu_ps(
                    scores.as_mut_ptr().add(g * padded + block * 16),
                    block_scores,
                )
            };
        }
    }
    // Softmax weights in place: e^(s - max), then times 1 / their sum.
    for (g, max_lanes) in max_lanes.iter().enumerate() {
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(*max_lanes));
        let head_scores = &mut scores[g * padded..(g + 1) * padded];
        let mut total_lanes = _mm512_setzero_ps();
        for block in 0..blocks {
            // SAFETY: each head's scores hold whole blocks of 16.
            let at = unsafe { head_scores.as_mut_ptr().add(block * 16) };
            let e = exp_avx512(_mm512_sub_ps(unsafe { _mm512_loadu_ps(at) }, max));
            let e = _mm512_maskz_mov_ps(real_positions(block), e);
            total_lanes = _mm512_add_ps(total_lanes, e);
            unsafe { _mm512_storeu_ps(at, e) };
        }
        let inv_total = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(total_lanes));
        for block in 0..blocks {
            let at = unsafe { head_scores.as_mut_ptr().add(block * 16) };
            unsafe { _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), inv_total)) };
        }
    }
    out.fill(0.0);
    for tile in (0..visible).step_by(VALUE_TILE) {
        let positions = tile..(tile + VALUE_TILE).min(visible);
        for g in 0..heads {
            // SAFETY (out): g * hd + hd <= out.len() (asserted).
            let out_head = unsafe { out.as_mut_ptr().add(g * hd) };
            let mut acc = [_mm512_setzero_ps(); 16];
            for (i, a) in acc.iter_mut().enumerate().take(chunks) {
                *a = unsafe { _mm512_loadu_ps(out_head.add(i * 16)) };
            }
            for p in positions.clone() {
                let w = _mm512_set1_ps(scores[g * padded + p]);
                // SAFETY: in bounds by the assertion above.
                let value = unsafe { values.as_ptr().add(p * kv_dim + kv_offset) };
                if g == 0 {
                    binllm_kernels::prefetch_lines(value.wrapping_add(VALUE_TILE * kv_dim), hd);
                }
                for (i, a) in acc.iter_mut().enumerate().take(chunks) {
                    *a = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(value.add(i * 16)) }, *a);
                }
            }
            for (i, a) in acc.iter().enumerate().take(chunks) {
                unsafe { _mm512_storeu_ps(out_head.add(i * 16), *a) };
            }
        }
    }
}

/// `v[j]` summed over its 16 lanes, for each of the 16 vectors, as the 16 lanes of one vector
/// (lane `j` = the sum of `v[j]`): unpack-and-add within 128-bit blocks, then across them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose_sum16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Pairs: per 128-bit block, lanes (a, b, a, b) of partial sums.
    let pairs: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // Quads: per 128-bit block, lanes (a, b, c, d), each that block's sum.
    let quads: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (
            _mm512_castps_pd(pairs[2 * i]),
            _mm512_castps_pd(pairs[2 * i + 1]),
        );
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    });
    // Across blocks: (block 0 + 1, block 2 + 3) of two quads side by side, twice.
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    let (low, high) = (halves(quads[0], quads[1]), halves(quads[2], quads[3]));
    halves(low, high)
}

/// `e^x` lane by lane, within a few ulp for `x <= 0` (softmax arguments; the test bounds it
/// at 4): `x = k ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r`, and
/// `vscalefps` for the `2^k` (exact, flushing to 0 far below the smallest float).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 in two parts (Cephes'), the first with few significant bits so that k * LN2_HIGH
    // is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HIGH), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LOW), r);
    // Taylor coefficients 1/7! .. 1/0!, Horner.
    let coefficients = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = _mm512_set1_ps(coefficients[0]);
    for &c in &coefficients[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, k)
}

#[inline(always)]
fn attend_generic(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    kv_offset: usize,
    visible: usize,
    out: &mut [f32],
) {
    let hd = query.len();
    let scale = 1.0 / (hd as f32).sqrt();
    // Plain loops, no closures: a closure would be compiled apart from this body, without
    // the caller's target features.
    let mut scores = Vec::with_capacity(visible);
    let mut max = f32::NEG_INFINITY;
    for p in 0..visible {
        let s = dot(query, &keys[p * kv_dim + kv_offset..][..hd]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut total = 0.0;
    for s in &mut scores {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    let inv_total = 1.0 / total;
    for (p, s) in scores.iter().enumerate() {
        let w = s * inv_total;
        let value = &values[p * kv_dim + kv_offset..][..hd];
        for (o, v) in out.iter_mut().zip(value) {
            *o += w * v;
        }
    }
}

/// Dot product in 16 independent lanes (which the compiler keeps in vector registers; a
/// single running sum would be one long dependency chain).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut sum = tail;
    for l in lanes {
        sum += l;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_exp_and_transposed_sums_are_accurate() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        use std::arch::x86_64::*;
        // SAFETY (all blocks): AVX-512F was just detected.
        for start in 0..700 {
            let xs: [f32; 16] = std::array::from_fn(|i| -((start * 16 + i) as f32) * 0.0093);
            let mut got = [0f32; 16];
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp_avx512(_mm512_loadu_ps(xs.as_ptr()))) };
            for (x, g) in xs.iter().zip(got) {
                let want = (*x as f64).exp();
                if want < f32::MIN_POSITIVE as f64 {
                    assert!(g as f64 <= f32::MIN_POSITIVE as f64, "exp({x}) = {g}");
                    continue;
                }
                let ulp = (want as f32).to_bits().abs_diff(g.to_bits());
                assert!(ulp <= 4, "exp({x}): {g} vs {want} ({ulp} ulp)");
            }
        }
        let mut rng = crate::sampling::SplitMix64::new(5);
        let rows: [[f32; 16]; 16] =
            std::array::from_fn(|_| std::array::from_fn(|_| rng.next_f32() - 0.5));
        let vectors = rows.map(|r| unsafe { _mm512_loadu_ps(r.as_ptr()) });
        let mut sums = [0f32; 16];
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), transpose_sum16(&vectors)) };
        for (row, sum) in rows.iter().zip(sums) {
            let want: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((sum as f64 - want).abs() < 1e-5, "{sum} vs {want}");
        }
    }

    #[test]
    fn grouped_simd_attention_matches_the_generic_loop() {
        let mut rng = crate::sampling::SplitMix64::new(4);
        for (hd, kv_dim, visible, heads) in [
            (64, 192, 1, 1),
            (64, 192, 37, 3),
            (64, 192, 70, 2),
            (128, 256, 300, 4),
            (8, 32, 5, 2),
        ] {
            let mut values = |n: usize| {
                (0..n)
                    .map(|_| rng.next_f32() * 2.0 - 1.0)
                    .collect::<Vec<f32>>()
            };
            let (queries, keys, vals) = (
                values(heads * hd),
                values(visible * kv_dim),
                values(visible * kv_dim),
            );
            let offset = kv_dim - hd;
            let mut fast = vec![f32::NAN; heads * hd];
            attend(
                &queries, hd, &keys, &vals, kv_dim, offset, visible, &mut fast,
            );
            for (query, fast) in queries.chunks_exact(hd).zip(fast.chunks_exact(hd)) {
                let mut reference = vec![0f32; hd];
                attend_generic(query, &keys, &vals, kv_dim, offset, visible, &mut reference);
                for (a, b) in fast.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "head_dim {hd}, {visible} positions, {heads} heads: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn stacked_linears_match_each_dense_layer() {
        let mut rng = crate::sampling::SplitMix64::new(7);
        let cols = 70;
        let mut linear = |rows: usize, bias: bool, input_scale: Option<Vec<f32>>| {
            let signs: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
            let bias = bias.then(|| (0..rows).map(|_| rng.next_f32()).collect());
            PackedLinear {
                rows,
                cols,
                sign_bits: binllm_kernels::pack_signs(&signs, rows, cols).bits,
                row_scale: (0..rows).map(|_| rng.next_f32() + 0.5).collect(),
                input_scale,
                bias,
            }
        };
        let scale: Vec<f32> = (0..cols).map(|c| 0.5 + c as f32 / cols as f32).collect();
        // q, k, v-like shapes; the last reads another input (its own input scale).
        let linears = [
            linear(96, true, None),
            linear(40, false, None),
            linear(40, true, None),
            linear(33, true, Some(scale)),
        ];
        let refs: Vec<&PackedLinear> = linears.iter().collect();
        for parts in [1, 2, 3] {
            let stacks = Linear::stacks(&refs, Kernel::best(), parts);
            assert_eq!(
                stacks.iter().map(|s| s.outputs.len()).collect::<Vec<_>>(),
                [3, 1]
            );
            for n in [1, 3] {
                let xs: Vec<f32> = (0..n * cols).map(|_| rng.next_f32() - 0.5).collect();
                let mut ys: Vec<Vec<f32>> =
                    linears.iter().map(|l| vec![0f32; n * l.rows]).collect();
                let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut::new(y)).collect();
                let inputs: Vec<_> = stacks.iter().map(|s| s.scaled_input(&xs)).collect();
                for member in 0..parts {
                    forward_stacks(&stacks, &inputs, member, n, &outs);
                }
                for (l, y) in linears.iter().zip(&ys) {
                    let w = l.dense_weight();
                    for t in 0..n {
                        for r in 0..l.rows {
                            let x = &xs[t * cols..(t + 1) * cols];
                            let want: f64 = w[r * cols..(r + 1) * cols]
                                .iter()
                                .zip(x)
                                .map(|(&w, &x)| w as f64 * x as f64)
                                .sum::<f64>()
                                + l.bias.as_ref().map_or(0.0, |b| b[r] as f64);
                            let got = y[t * l.rows + r] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{parts} parts, token {t}, row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_f64() {
        let mut rng = crate::sampling::SplitMix64::new(6);
        let gate: Vec<f32> = (0..1000)
            .map(|i| (rng.next_f32() - 0.5) * if i % 10 == 0 { 200.0 } else { 16.0 })
            .collect();
        let up: Vec<f32> = (0..gate.len()).map(|_| rng.next_f32() - 0.5).collect();
        // Every tail length of the 16-lane loop.
        for len in [1, 15, 16, 17, 1000] {
            let mut out = gate[..len].to_vec();
            swiglu(&mut out, &up[..len]);
            for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
                let (g64, u64) = (g as f64, u as f64);
                let want = g64 / (1.0 + (-g64).exp()) * u64;
                let tolerance = 1e-6 * want.abs() + 1e-30;
                assert!(
                    (o as f64 - want).abs() <= tolerance,
                    "silu({g}) * {u}: {o} vs {want}"
                );
            }
        }
    }

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
