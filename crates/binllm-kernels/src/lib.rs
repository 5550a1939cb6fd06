//! binllm-kernels: the CPU compute kernels of binllm's true 1-bit (W1A16) LLMs.
//!
//! This crate owns the packed sign-bit matrix layout and every product the runtime needs on it:
//! 1-bit GEMV (decode) and GEMM (prompt processing) with a scalar reference, SIMD mask paths
//! (AVX2, AVX-512, NEON) and lookup-table paths (f32, and an optional int8-activation variant);
//! plus dense GEMV for the layers that stay in floating point (f32, f16, and q8_0 / q4_0 for
//! the LM head). It is pure Rust (std, half).
//!
//! # Rooms
//!
//! | module | holds |
//! |---|---|
//! | [`layout`] | the packed sign-bit layout ([`PackedMatrix`], [`pack_signs`]) |
//! | `kernel`, `gemm`, [`scalar`], `x86`, `neon` | the 1-bit kernels ([`Kernel`]) on that layout, and the drivers tiling GEMM over vectors |
//! | [`lut`], [`lut3`], [`lut_i8`] | the lookup-table layouts and kernels |
//! | [`block_scaled`] | sign matrices with a scale per block of columns (llama-quantize's Q1_0): [`BlockScaledMatrix`], its one-pass LUT kernels and the by-block path of the others |
//! | this file | [`PreparedMatrix`] (a matrix in its kernel's layout), [`gemv_with`] / [`gemm_with`] |
//! | [`dense`] | f32 and f16 products ([`DenseKernel`]) |
//! | [`q8`], [`q4`] | the q8_0 and q4_0 block formats ([`Q8Matrix`], [`Q4Matrix`]), one home each |
//! | [`head`], [`head_i8`] | the quantized LM head's products (int16 and int8 activations) |
//! | [`attention`], [`activation`] | attention over a KV cache, SwiGLU and the vector `e^x` |
//!
//! # Packed layout
//!
//! [`layout`]: row-major sign bits, each row padded to whole 64-bit words, one scale per row
//! (`docs/FORMAT.md` quotes it). Products: `y[r] = scale[r] * sum_j B[r, j] * x[j]`.
//!
//! The LUT kernels re-tile the same bits once at load time ([`PreparedMatrix::new`]): into
//! [`LutMatrix`] (blocks of 16 rows, one u32 per row per 32 columns; see [`lut`]) or
//! [`LutI8Matrix`] (blocks of 32 rows, one u16 per row per 16 columns; see [`lut_i8`]). Both
//! are the same size as the canonical layout up to padding.
//!
//! # Kernels ([`Kernel`])
//!
//! | kernel | layout | idea | result |
//! |---|---|---|---|
//! | `Scalar` | canonical | one element at a time | the reference |
//! | `Avx2`, `Avx512`, `Neon` | canonical | bits -> lane masks, masked add of `x` | f32, ~1e-7 relative |
//! | `LutScalar`, `LutAvx2`, `LutAvx512` | [`LutMatrix`] | 16-entry f32 tables of 4-activation sums, `vpermps` looks up 16 rows at once | f32, bit-identical across the three |
//! | `Lut3Scalar`, `Lut3Avx2` | [`Lut3Matrix`] | 8-entry f32 tables of 3-activation sums, one `vpermps` per 8 rows x 3 columns (AVX2) | f32, bit-identical across the two |
//! | `LutI8Scalar`, `LutI8Avx512` | [`LutI8Matrix`] | int8 activations, i16 tables, `vpermw` over 32 rows | approximate (W1A8), exact integer sums |
//!
//! # Block-scaled matrices ([`block_scaled`])
//!
//! A GGUF written by llama.cpp's `llama-quantize` gives every block of 128 weights of a row its
//! own f16 scale (Q1_0; Q2_0 every 64, TQ1_0 / TQ2_0 every 256). [`BlockScaledMatrix`] holds
//! the same sign bits as [`PackedMatrix`] (with its row scales) plus those block scales,
//! `y[r] = scale[r] * sum_b block_scale[r, b] * sum_{j in b} B[r, j] x[j]`, and
//! [`PreparedMatrix::block_scaled`] computes with it:
//!
//! | kernels | path | result |
//! |---|---|---|
//! | `LutScalar`, `LutAvx2`, `LutAvx512` | one pass over [`block_scaled::LutBlockScaledMatrix`]: the LUT kernel's lookups, the four accumulators reduced at the end of each block and multiplied by those 16 rows' scales for the block into a running total (`fma`) | f32, bit-identical across the three |
//! | every other kernel | [`block_scaled::ColumnBlocks`]: one row-scaled matrix per block of columns (row scale x block scale), the products added | that kernel's, per block |
//!
//! The row-scaled path above is untouched: a matrix with one scale per row (binllm's own files)
//! never goes through this one. `examples/block_scaled_bench.rs` measures what the block
//! scales cost against the same signs with row scales.
//!
//! [`Kernel::best`] picks the fastest exact kernel available at run time (`LutAvx512` on
//! AVX-512 CPUs; it was 2.5-4x faster than the AVX-512 mask kernel at SmolLM2-135M shapes in
//! `gemv_bench`; `Lut3Avx2` on AVX2-only CPUs); the int8 kernels are opt-in ([`Kernel::is_approximate`]). Any kernel can be
//! forced with [`PreparedMatrix::new`] or [`gemv_with`] / [`gemm_with`].
//!
//! GEMM ([`PreparedMatrix::gemm`]) processes input vectors in tiles of up to 4 per pass over the
//! weights (bits expanded / tables looked up once per tile), with the same per-vector summation
//! order as GEMV, so `gemm` equals `n` GEMVs bit for bit.
//!
//! # Threads
//!
//! None here: every product runs on the calling thread over the rows it is given. The runtime
//! (binllm-infer's thread team) splits each matrix by rows once, at load time, and has each
//! member run the product of its own rows. Every row is computed by the same code whatever the
//! split, so results do not depend on how many threads the runtime uses (the tests split
//! matrices and compare).
//!
//! # Dense products ([`dense`], [`q8`], [`q4`], [`head`])
//!
//! [`gemv_f32`] and [`gemv_f16`] (F16C / AVX-512 conversion on x86), each with a scalar
//! reference and a forced-kernel variant taking a [`DenseKernel`]. The two quantized formats
//! of the LM head have one home each, used by binllm-format to store them and by the runtime to
//! compute with them: [`Q8Matrix`] (q8_0: int8 weights, one scale per 32) and [`Q4Matrix`]
//! (q4_0: 4-bit codes, one f16 scale per 32). Their products ([`head`]: [`gemv_q8_with`],
//! [`gemm_q8_rows`], [`gemv_q4_with`], [`gemm_q4_rows`]) round activations either to int16
//! per vector (`Avx2`, `Avx512`, `Portable`: an error of at most 2^-16 of `max|x|` per
//! activation; the q4 AVX2 path equals its integer reference bit for bit) or to int8 per block
//! of 32 (`Avx512Vnni`, `Avx2Int8`: llama.cpp's arithmetic for those formats, [`head_i8`], bit
//! for bit equal to lane-by-lane references and to each other; the runtime's default on
//! x86-64).
//!
//! # Use
//!
//! ```
//! use binllm_kernels::{pack_signs, Kernel, PreparedMatrix};
//! let (rows, cols) = (3, 5);
//! let w: Vec<f32> = (0..rows * cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
//! let mut packed = pack_signs(&w, rows, cols);
//! packed.scales = vec![0.5, 1.0, 2.0];
//! let layer = PreparedMatrix::new(packed, Kernel::best());
//! let x = [1.0, 2.0, 3.0, 4.0, 5.0];
//! let mut y = [0.0; 3];
//! layer.gemv(&x, &mut y);
//! assert_eq!(y, [0.5 * (-1.0 + 2.0 + 3.0 - 4.0 + 5.0), 1.0 * (1.0 - 2.0 + 3.0 + 4.0 - 5.0), 2.0 * (1.0 + 2.0 - 3.0 + 4.0 + 5.0)]);
//! ```

pub mod activation;
pub mod attention;
pub mod block_scaled;
pub mod dense;
mod gemm;
pub mod head;
pub mod head_i8;
mod kernel;
pub mod layout;
pub mod lut;
pub mod lut3;
pub mod lut_i8;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod q4;
pub mod q8;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

/// The runtime's token sampler's generator (binllm-infer's `sampling::SplitMix64`, which this
/// crate cannot depend on), so that the kernels' unit tests draw the inputs the runtime's tests
/// drew before the kernels moved here.
#[cfg(test)]
mod test_rng {
    pub struct SplitMix64(u64);

    impl SplitMix64 {
        pub fn new(seed: u64) -> Self {
            SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1) with 24 bits.
        pub fn next_f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }
    }
}

/// How far ahead of its reads a streaming kernel asks for weights. The hardware prefetchers
/// alone leave a single core waiting on DRAM for about 40% of a decode step's 1-bit products
/// (measured with `perf annotate`); asking for the line 2 KiB ahead keeps more misses in
/// flight. 1 and 4 KiB measured slower on the development VM.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// Hints the cache line `PREFETCH_AHEAD_BYTES` past `p` into L1. A hint only: the address may
/// lie past the end of the data (prefetches never fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(p: *const T) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: prefetch is a hint that never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_AHEAD_BYTES)) }
}

/// Hints into L1 every cache line of the `len` elements at `p`, for data a caller reads soon
/// and all at once. A hint only: the address may lie past the end of the data.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_lines<T>(p: *const T, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let bytes = len * std::mem::size_of::<T>();
    for line in (0..bytes).step_by(64) {
        // SAFETY: prefetch is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(line)) };
    }
}

pub use activation::swiglu;
pub use attention::attend;
pub use block_scaled::{BlockScaledMatrix, BlockScales};
pub use dense::{gemm_dense_with, gemv_f16, gemv_f16_with, gemv_f32, gemv_f32_with, DenseKernel};
pub use head::{
    gemm_q4_rows, gemm_q4_with, gemm_q8_rows, gemm_q8_with, gemv_q4_with, gemv_q8, gemv_q8_with,
};
pub use kernel::Kernel;
pub use layout::{pack_signs, words_per_row, PackedMatrix};
pub use lut::LutMatrix;
pub use lut3::Lut3Matrix;
pub use lut_i8::LutI8Matrix;
pub use q4::Q4Matrix;
pub use q8::Q8Matrix;

fn check_gemv_shapes(rows: usize, cols: usize, x: &[f32], y: &[f32]) {
    assert_eq!(x.len(), cols, "gemv: x.len() != cols");
    assert_eq!(y.len(), rows, "gemv: y.len() != rows");
}

fn check_gemm_shapes(rows: usize, cols: usize, xs: &[f32], n: usize, ys: &[f32]) {
    assert_eq!(xs.len(), n * cols, "gemm: xs.len() != n * cols");
    assert_eq!(ys.len(), n * rows, "gemm: ys.len() != n * rows");
}

/// `y = W x` with the fastest kernel that works on the canonical layout.
/// For repeated products prefer [`PreparedMatrix`] with [`Kernel::best`].
pub fn gemv(m: &PackedMatrix, x: &[f32], y: &mut [f32]) {
    gemv_with(Kernel::best_row_major(), m, x, y)
}

/// `ys[v] = W xs[v]` for `n` input vectors (`xs`: `n x cols`, `ys`: `n x rows`, row-major).
pub fn gemm(m: &PackedMatrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    gemm_with(Kernel::best_row_major(), m, xs, n, ys)
}

/// [`gemv`] with a forced kernel; a LUT kernel re-tiles `m` on every call (tests, benchmarks).
/// Panics if the kernel is not available on this CPU.
pub fn gemv_with(kernel: Kernel, m: &PackedMatrix, x: &[f32], y: &mut [f32]) {
    check_gemv_shapes(m.rows, m.cols, x, y);
    kernel.assert_available();
    if kernel.uses_lut_layout() {
        gemm::gemv_lut(kernel, &LutMatrix::from_packed(m), x, y)
    } else if kernel.uses_lut3_layout() {
        gemm::gemm_lut3(kernel, &Lut3Matrix::from_packed(m), x, 1, y)
    } else if kernel.uses_i8_layout() {
        gemm::gemm_lut_i8(kernel, &LutI8Matrix::from_packed(m), x, 1, y)
    } else {
        gemm::gemv_row_major(kernel, m, x, y)
    }
}

/// [`gemm`] with a forced kernel; a LUT kernel re-tiles `m` on every call.
pub fn gemm_with(kernel: Kernel, m: &PackedMatrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    check_gemm_shapes(m.rows, m.cols, xs, n, ys);
    kernel.assert_available();
    if kernel.uses_lut_layout() {
        gemm::gemm_lut(kernel, &LutMatrix::from_packed(m), xs, n, ys)
    } else if kernel.uses_lut3_layout() {
        gemm::gemm_lut3(kernel, &Lut3Matrix::from_packed(m), xs, n, ys)
    } else if kernel.uses_i8_layout() {
        gemm::gemm_lut_i8(kernel, &LutI8Matrix::from_packed(m), xs, n, ys)
    } else {
        gemm::gemm_row_major(kernel, m, xs, n, ys)
    }
}

/// A 1-bit matrix in the layout its kernel wants, ready for repeated products: what the
/// runtime holds per linear layer. Built once at load time.
#[derive(Clone, Debug)]
pub struct PreparedMatrix {
    kernel: Kernel,
    weights: Weights,
}

#[derive(Clone, Debug)]
enum Weights {
    RowMajor(PackedMatrix),
    Lut(LutMatrix),
    Lut3(Lut3Matrix),
    LutI8(LutI8Matrix),
    /// A scale per block of columns, one pass ([`block_scaled`]).
    LutBlockScaled(block_scaled::LutBlockScaledMatrix),
    /// A scale per block of columns, block by block on any kernel ([`block_scaled`]).
    ColumnBlocks(block_scaled::ColumnBlocks),
}

impl PreparedMatrix {
    /// Panics if `kernel` is not available on this CPU.
    pub fn new(m: PackedMatrix, kernel: Kernel) -> Self {
        kernel.assert_available();
        let weights = if kernel.uses_lut_layout() {
            Weights::Lut(LutMatrix::from_packed(&m))
        } else if kernel.uses_lut3_layout() {
            Weights::Lut3(Lut3Matrix::from_packed(&m))
        } else if kernel.uses_i8_layout() {
            Weights::LutI8(LutI8Matrix::from_packed(&m))
        } else {
            Weights::RowMajor(m)
        };
        PreparedMatrix { kernel, weights }
    }

    /// With [`Kernel::best`].
    pub fn best(m: PackedMatrix) -> Self {
        Self::new(m, Kernel::best())
    }

    /// A matrix with a scale per block of columns ([`block_scaled`]): in one pass on the LUT
    /// kernels (`lut-scalar`, `lut-avx2`, `lut-avx512`), block by block on the others.
    /// Panics if `kernel` is not available on this CPU.
    pub fn block_scaled(m: BlockScaledMatrix, kernel: Kernel) -> Self {
        kernel.assert_available();
        let weights = if kernel.uses_lut_layout() {
            Weights::LutBlockScaled(block_scaled::LutBlockScaledMatrix::from_block_scaled(&m))
        } else {
            Weights::ColumnBlocks(block_scaled::ColumnBlocks::new(&m, kernel))
        };
        PreparedMatrix { kernel, weights }
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    pub fn rows(&self) -> usize {
        match &self.weights {
            Weights::RowMajor(m) => m.rows,
            Weights::Lut(m) => m.rows,
            Weights::Lut3(m) => m.rows,
            Weights::LutI8(m) => m.rows,
            Weights::LutBlockScaled(m) => m.lut.rows,
            Weights::ColumnBlocks(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match &self.weights {
            Weights::RowMajor(m) => m.cols,
            Weights::Lut(m) => m.cols,
            Weights::Lut3(m) => m.cols,
            Weights::LutI8(m) => m.cols,
            Weights::LutBlockScaled(m) => m.lut.cols,
            Weights::ColumnBlocks(m) => m.cols,
        }
    }

    /// Bytes of sign bits streamed per product, and of block scales (f16) where the matrix
    /// has them; row scales are not counted.
    pub fn packed_bytes(&self) -> usize {
        match &self.weights {
            Weights::RowMajor(m) => m.packed_bytes(),
            Weights::Lut(m) => m.packed_bytes(),
            Weights::Lut3(m) => m.packed_bytes(),
            Weights::LutI8(m) => m.packed_bytes(),
            Weights::LutBlockScaled(m) => m.packed_bytes(),
            Weights::ColumnBlocks(m) => m.packed_bytes(),
        }
    }

    /// `y = W x`; `x` has `cols` floats, `y` has `rows`.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) {
        check_gemv_shapes(self.rows(), self.cols(), x, y);
        match &self.weights {
            Weights::RowMajor(m) => gemm::gemv_row_major(self.kernel, m, x, y),
            Weights::Lut(m) => gemm::gemv_lut(self.kernel, m, x, y),
            Weights::Lut3(m) => gemm::gemm_lut3(self.kernel, m, x, 1, y),
            Weights::LutI8(m) => gemm::gemm_lut_i8(self.kernel, m, x, 1, y),
            Weights::LutBlockScaled(m) => {
                block_scaled::gemm_lut_block_scaled(self.kernel, m, x, 1, y)
            }
            Weights::ColumnBlocks(m) => m.gemm(x, 1, y),
        }
    }

    /// `ys[v] = W xs[v]` for `n` vectors (`xs`: `n x cols`, `ys`: `n x rows`, row-major).
    pub fn gemm(&self, xs: &[f32], n: usize, ys: &mut [f32]) {
        check_gemm_shapes(self.rows(), self.cols(), xs, n, ys);
        match &self.weights {
            Weights::RowMajor(m) => gemm::gemm_row_major(self.kernel, m, xs, n, ys),
            Weights::Lut(m) => gemm::gemm_lut(self.kernel, m, xs, n, ys),
            Weights::Lut3(m) => gemm::gemm_lut3(self.kernel, m, xs, n, ys),
            Weights::LutI8(m) => gemm::gemm_lut_i8(self.kernel, m, xs, n, ys),
            Weights::LutBlockScaled(m) => {
                block_scaled::gemm_lut_block_scaled(self.kernel, m, xs, n, ys)
            }
            Weights::ColumnBlocks(m) => m.gemm(xs, n, ys),
        }
    }
}
