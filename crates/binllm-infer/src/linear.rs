//! The runtime's matrices, split by rows across the thread team: the 1-bit block linears
//! ([`Linear`], stacked where they read one input) and the dense matrices of the embedding
//! table and the LM head ([`DenseMatrix`], f32, f16, q8_0 or q4_0).
//!
//! A block linear read from a GGUF whose blocks carry their own scales (llama-quantize's
//! Q1_0) keeps them: its parts are the kernels' block-scaled matrices
//! ([`binllm_kernels::block_scaled`]), the others row-scaled ones, as a `.b1` file's.
//!
//! Every matrix is split by rows into one part per member of the thread team
//! (`threads::Team`) when the model is loaded; member `i` computes part `i` of each product
//! with the kernels' single-threaded products and writes its rows of the shared output. Parts
//! are cut on multiples of `ROW_ALIGN` rows so no kernel block straddles two members, and a
//! member's rows are computed by the same code whatever the split: results do not depend on
//! the number of threads.

use anyhow::{ensure, Context, Result};
use binllm_format::packed::{PackedLinear, PackedModel, QuantTensor, QuantTensors};
use binllm_format::TensorData;
use binllm_kernels::{
    BlockScaledMatrix, BlockScales, DenseKernel, Kernel, PackedMatrix, PreparedMatrix, Q4Matrix,
    Q8Matrix,
};
use half::f16;

use crate::threads::{split_rows, SharedOut};

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
    /// scale) and are scaled alike (by row, or by blocks of the same width), in order.
    pub(crate) fn stacks(linears: &[&PackedLinear], kernel: Kernel, parts: usize) -> Vec<Linear> {
        let mut stacks: Vec<Vec<&PackedLinear>> = Vec::new();
        for &l in linears {
            match stacks.last_mut() {
                Some(stack)
                    if stack[0].cols == l.cols
                        && stack[0].input_scale == l.input_scale
                        && stack[0].block_cols() == l.block_cols() =>
                {
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
                let (mut bits, mut scales, mut block_scales) = (Vec::new(), Vec::new(), Vec::new());
                for (l, output) in stack.iter().zip(&outputs) {
                    let range = output.ranges[member].clone();
                    bits.extend_from_slice(&l.sign_bits[range.start * wpr..range.end * wpr]);
                    scales.extend_from_slice(&l.row_scale[range.clone()]);
                    if let Some(b) = &l.block_scales {
                        block_scales.extend_from_slice(&b.rows_slice(range).scales);
                    }
                }
                (!scales.is_empty()).then(|| {
                    let signs = PackedMatrix::from_parts(scales.len(), cols, bits, scales);
                    match stack[0].block_cols() {
                        None => PreparedMatrix::new(signs, kernel),
                        Some(block_cols) => PreparedMatrix::block_scaled(
                            BlockScaledMatrix::new(
                                signs,
                                BlockScales::new(block_cols, cols, block_scales),
                            ),
                            kernel,
                        ),
                    }
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

    /// Bytes one product streams: sign bits, block scales (f16) where there are any, and the
    /// row and input scales (f32 in memory).
    pub fn bytes(&self) -> usize {
        self.packed_bytes + 4 * (self.rows() + self.input_scale.as_ref().map_or(0, Vec::len))
    }

    /// Each member's rows of the stack's first layer (the same split as every layer of the
    /// same height).
    pub(crate) fn member_rows(&self) -> &[std::ops::Range<usize>] {
        &self.outputs[0].ranges
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `xs` times the input scale (a copy only when there is one), before the team starts.
    pub(crate) fn scaled_input<'a>(&self, xs: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.input_scale {
            Some(s) => xs
                .chunks_exact(s.len())
                .flat_map(|x| x.iter().zip(s).map(|(x, s)| x * s))
                .collect(),
            None => xs.into(),
        }
    }

    /// Member `member`'s rows of `ys[i][t] = row_scale * (B_i xs[t]) + bias_i` (`B_i` times
    /// its block scales, where it has them) for each layer
    /// `i` of the stack and the `n` rows of `xs` (already input-scaled); `ys[i]` is
    /// `n x rows_i`.
    pub(crate) fn forward_part(&self, member: usize, xs: &[f32], n: usize, ys: &[SharedOut]) {
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
pub(crate) fn forward_stacks(
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
    pub(crate) fn from_tensor(
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

    /// How many parts its rows are split into (the jobs of one product on the team).
    pub(crate) fn parts(&self) -> usize {
        self.parts.len()
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
    pub(crate) fn row(&self, r: usize, out: &mut [f32]) {
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
    pub(crate) fn product_part(&self, member: usize, xs: &[f32], n: usize, ys: &SharedOut) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `ys[i]` for every linear, computed part by part as the team would, against a float64
    /// product of each linear's dense weight.
    fn check_stacks_against_dense(
        linears: &[PackedLinear],
        stack_sizes: &[usize],
        rng: &mut crate::sampling::SplitMix64,
    ) {
        let cols = linears[0].cols;
        let refs: Vec<&PackedLinear> = linears.iter().collect();
        for parts in [1, 2, 3] {
            let stacks = Linear::stacks(&refs, Kernel::best(), parts);
            assert_eq!(
                stacks.iter().map(|s| s.outputs.len()).collect::<Vec<_>>(),
                stack_sizes
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
                block_scales: None,
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
        check_stacks_against_dense(&linears, &[3, 1], &mut rng);
    }

    #[test]
    fn block_scaled_linears_stack_with_their_own_kind_and_match_each_dense_layer() {
        let mut rng = crate::sampling::SplitMix64::new(11);
        let cols = 256;
        let mut linear = |rows: usize, block_cols: Option<usize>| {
            let signs: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
            let block_scales = block_cols.map(|block_cols| {
                let n = rows * cols.div_ceil(block_cols);
                let scales = (0..n)
                    .map(|_| half::f16::from_f32(rng.next_f32() + 0.25))
                    .collect();
                BlockScales::new(block_cols, cols, scales)
            });
            PackedLinear {
                rows,
                cols,
                sign_bits: binllm_kernels::pack_signs(&signs, rows, cols).bits,
                row_scale: (0..rows).map(|_| rng.next_f32() + 0.5).collect(),
                block_scales,
                input_scale: None,
                bias: Some((0..rows).map(|_| rng.next_f32()).collect()),
            }
        };
        // Blocks of 128 stack together; one scale per row, or blocks of 64, start a stack.
        let linears = [
            linear(96, Some(128)),
            linear(40, Some(128)),
            linear(40, None),
            linear(33, Some(64)),
        ];
        check_stacks_against_dense(&linears, &[2, 1, 1], &mut rng);
    }
}
