//! Dense f32 and f16 GEMV, for the parts of a model that stay in floating point (embedding
//! tied LM head in f16; small f32 projections). `w` is row-major `rows x cols`, `x` has `cols`
//! floats and `y[r] = sum_j w[r, j] * x[j]`, accumulated in f32.
//!
//! Once the transformer body is 1-bit, the LM head (49152 x 576 in SmolLM2-135M, 57 MB in f16)
//! is the largest single read per token, so this is memory-bound: the SIMD paths only have to
//! convert f16 (F16C `vcvtph2ps`) and FMA fast enough to keep up with DRAM.

use half::f16;

/// Dense GEMV implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseKernel {
    /// Sequential f32 accumulation, one element at a time: the reference.
    Scalar,
    /// Eight interleaved accumulators in plain Rust, which the compiler vectorises on any target
    /// (the path aarch64 takes).
    Portable,
    /// x86-64 AVX2 + FMA (+ F16C for f16).
    Avx2,
    /// x86-64 AVX-512F + BW (f16 conversion is part of AVX-512F).
    Avx512,
    /// x86-64 AVX-512 VNNI: the q8_0 and q4_0 heads with int8 activations, llama.cpp's
    /// arithmetic for those formats ([`crate::head_i8`]); f16 and f32 as `Avx512`.
    Avx512Vnni,
    /// x86-64 AVX2: the q8_0 and q4_0 heads with int8 activations, equal to `Avx512Vnni` bit
    /// for bit; f16 and f32 as `Avx2`.
    Avx2Int8,
}

impl DenseKernel {
    pub const ALL: [DenseKernel; 6] = [
        DenseKernel::Scalar,
        DenseKernel::Portable,
        DenseKernel::Avx2,
        DenseKernel::Avx512,
        DenseKernel::Avx512Vnni,
        DenseKernel::Avx2Int8,
    ];

    pub fn is_available(self) -> bool {
        match self {
            DenseKernel::Scalar | DenseKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx2 | DenseKernel::Avx2Int8 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx512 => {
                // BW for the q8 path's 16-bit integer arithmetic (every AVX-512 CPU but Xeon Phi).
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    pub fn available() -> Vec<DenseKernel> {
        DenseKernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    pub fn best() -> DenseKernel {
        [DenseKernel::Avx512, DenseKernel::Avx2]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(DenseKernel::Portable)
    }

    /// Whether the q8_0 / q4_0 products take int8 activations per block of 32
    /// ([`crate::head_i8`]) rather than int16 per vector (f32 for `Scalar`).
    pub fn int8_activations(self) -> bool {
        matches!(self, DenseKernel::Avx512Vnni | DenseKernel::Avx2Int8)
    }

    pub fn name(self) -> &'static str {
        match self {
            DenseKernel::Scalar => "scalar",
            DenseKernel::Portable => "portable",
            DenseKernel::Avx2 => "avx2",
            DenseKernel::Avx512 => "avx512",
            DenseKernel::Avx512Vnni => "avx512-vnni",
            DenseKernel::Avx2Int8 => "avx2-int8",
        }
    }
}

/// On a command line a dense kernel is its [`DenseKernel::name`].
#[cfg(feature = "clap")]
impl clap::ValueEnum for DenseKernel {
    fn value_variants<'a>() -> &'a [Self] {
        &DenseKernel::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl std::str::FromStr for DenseKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DenseKernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown dense kernel {s:?}"))
    }
}

/// Element types a dense matrix can be stored in.
pub trait DenseElement: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}
impl DenseElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl DenseElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

fn check_shapes<E>(w: &[E], rows: usize, cols: usize, x: &[f32], y: &[f32]) {
    assert_eq!(w.len(), rows * cols, "dense gemv: w.len() != rows * cols");
    assert_eq!(x.len(), cols, "dense gemv: x.len() != cols");
    assert_eq!(y.len(), rows, "dense gemv: y.len() != rows");
}

/// `y = W x` for an f16 matrix with the fastest available kernel.
pub fn gemv_f16(w: &[f16], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    gemv_f16_with(DenseKernel::best(), w, rows, cols, x, y)
}

/// `y = W x` for an f32 matrix with the fastest available kernel.
pub fn gemv_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    gemv_f32_with(DenseKernel::best(), w, rows, cols, x, y)
}

/// `y = W x` for an f16 matrix with a chosen kernel (panics if it is unavailable).
pub fn gemv_f16_with(
    kernel: DenseKernel,
    w: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    gemv_dense_with(kernel, w, rows, cols, x, y)
}

/// `y = W x` for an f32 matrix with a chosen kernel (panics if it is unavailable).
pub fn gemv_f32_with(
    kernel: DenseKernel,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    gemv_dense_with(kernel, w, rows, cols, x, y)
}

/// `y = W x` for a row-major f16 or f32 matrix `w` of `rows x cols`, one row at a time.
pub fn gemv_dense_with<E: DotKernels>(
    kernel: DenseKernel,
    w: &[E],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    check_shapes(w, rows, cols, x, y);
    assert!(
        kernel.is_available(),
        "dense kernel {} is not available on this CPU",
        kernel.name()
    );
    for (r, out) in y.iter_mut().enumerate() {
        *out = E::dot(kernel, &w[r * cols..(r + 1) * cols], x);
    }
}

/// Rows per tile of the multi-vector products (an f16 tile of 64 x 576 is 74 KB, L2-resident
/// while every vector passes over it).
const GEMM_ROW_TILE: usize = 64;

/// `ys[t * rows + r] = (W xs[t])[r]` for the vectors `xs` (row-major, `cols` each) and a
/// row-major f16 or f32 matrix `w` of `cols` columns: the same numbers as one GEMV per vector
/// with `kernel`, tile by tile so each weight is read once.
pub fn gemm_dense_with<E: DotKernels>(
    kernel: DenseKernel,
    w: &[E],
    cols: usize,
    xs: &[f32],
    ys: &mut [f32],
) {
    assert!(
        cols > 0 && w.len().is_multiple_of(cols) && xs.len().is_multiple_of(cols),
        "dense gemm: w and xs must be whole rows of {cols}"
    );
    let (rows, n) = (w.len() / cols, xs.len() / cols);
    assert_eq!(ys.len(), n * rows, "dense gemm: ys.len() != n * rows");
    assert!(
        kernel.is_available(),
        "dense kernel {} is not available on this CPU",
        kernel.name()
    );
    for tile_start in (0..rows).step_by(GEMM_ROW_TILE) {
        let tile = tile_start..(tile_start + GEMM_ROW_TILE).min(rows);
        for (t, x) in xs.chunks_exact(cols).enumerate() {
            let out = &mut ys[t * rows + tile.start..t * rows + tile.end];
            for (out, r) in out.iter_mut().zip(tile.clone()) {
                *out = E::dot(kernel, &w[r * cols..(r + 1) * cols], x);
            }
        }
    }
}

/// The dot product of one stored row with f32 activations, per kernel: what the GEMVs and
/// [`gemm_dense_with`] share.
pub trait DotKernels: Sized + Sync {
    fn dot(kernel: DenseKernel, row: &[Self], x: &[f32]) -> f32;
}

impl DotKernels for f16 {
    fn dot(kernel: DenseKernel, row: &[f16], x: &[f32]) -> f32 {
        match kernel {
            DenseKernel::Scalar => dot_scalar(row, x),
            DenseKernel::Portable => dot_portable_f16(row, x),
            // SAFETY: callers assert the kernel is available.
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx2 | DenseKernel::Avx2Int8 => unsafe { x86::dot_f16_avx2(row, x) },
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx512 | DenseKernel::Avx512Vnni => unsafe { x86::dot_f16_avx512(row, x) },
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    }
}

impl DotKernels for f32 {
    fn dot(kernel: DenseKernel, row: &[f32], x: &[f32]) -> f32 {
        match kernel {
            DenseKernel::Scalar => dot_scalar(row, x),
            DenseKernel::Portable => dot_portable(row, x),
            // SAFETY: callers assert the kernel is available.
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx2 | DenseKernel::Avx2Int8 => unsafe { x86::dot_f32_avx2(row, x) },
            #[cfg(target_arch = "x86_64")]
            DenseKernel::Avx512 | DenseKernel::Avx512Vnni => unsafe { x86::dot_f32_avx512(row, x) },
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    }
}

fn dot_scalar<E: DenseElement>(row: &[E], x: &[f32]) -> f32 {
    row.iter()
        .zip(x)
        .fold(0.0f32, |acc, (&w, &xj)| acc + w.to_f32() * xj)
}

/// Eight interleaved lanes so the compiler can vectorise the f32 dot on any target.
fn dot_portable(row: &[f32], x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let row_chunks = row.chunks_exact(LANES);
    let x_chunks = x.chunks_exact(LANES);
    let (row_tail, x_tail) = (row_chunks.remainder(), x_chunks.remainder());
    for (w, xc) in row_chunks.zip(x_chunks) {
        for lane in 0..LANES {
            acc[lane] += w[lane] * xc[lane];
        }
    }
    let tail: f32 = row_tail.iter().zip(x_tail).map(|(&w, &xj)| w * xj).sum();
    acc.iter().sum::<f32>() + tail
}

/// f16 rows are converted a block at a time with `half`'s slice conversion, which uses the
/// CPU's conversion instructions (x86 F16C, aarch64 FP16) when present; converting one
/// element at a time costs a feature check per element.
fn dot_portable_f16(row: &[f16], x: &[f32]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    const BLOCK: usize = 256;
    let mut converted = [0.0f32; BLOCK];
    let mut sum = 0.0f32;
    for (w, xb) in row.chunks(BLOCK).zip(x.chunks(BLOCK)) {
        let converted = &mut converted[..w.len()];
        w.convert_to_f32_slice(converted);
        sum += dot_portable(converted, xb);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over accumulator arrays unroll cleanly
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX-512F; `row.len() == x.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f16_avx512(row: &[f16], x: &[f32]) -> f32 {
        assert_eq!(row.len(), x.len());
        let n = row.len();
        let (w, xp) = (row.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY (all loads): j + width <= n, checked by each loop condition.
        while j + 64 <= n {
            crate::prefetch_ahead(w.add(j));
            crate::prefetch_ahead(w.add(j + 32));
            for k in 0..4 {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(j + 16 * k) as *const __m256i));
                acc[k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(j + 16 * k)), acc[k]);
            }
            j += 64;
        }
        while j + 16 <= n {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(j) as *const __m256i));
            acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(j)), acc[0]);
            j += 16;
        }
        if j < n {
            // A masked load never touches memory past the slices.
            let mask: __mmask16 = (1u16 << (n - j)) - 1;
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.add(j) as *const i16));
            acc[1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xp.add(j)), acc[1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    /// # Safety
    /// Requires AVX-512F; `row.len() == x.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(row: &[f32], x: &[f32]) -> f32 {
        assert_eq!(row.len(), x.len());
        let n = row.len();
        let (w, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY (all loads): j + width <= n, checked by each loop condition.
        while j + 64 <= n {
            for k in 0..4 {
                acc[k] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(w.add(j + 16 * k)),
                    _mm512_loadu_ps(xp.add(j + 16 * k)),
                    acc[k],
                );
            }
            j += 64;
        }
        while j + 16 <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(w.add(j)),
                _mm512_loadu_ps(xp.add(j)),
                acc[0],
            );
            j += 16;
        }
        if j < n {
            let mask: __mmask16 = (1u16 << (n - j)) - 1;
            acc[1] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(mask, w.add(j)),
                _mm512_maskz_loadu_ps(mask, xp.add(j)),
                acc[1],
            );
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    /// # Safety
    /// Requires AVX2, FMA and F16C; `row.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(row: &[f16], x: &[f32]) -> f32 {
        assert_eq!(row.len(), x.len());
        let n = row.len();
        let (w, xp) = (row.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY (all loads): j + width <= n, checked by each loop condition.
        while j + 32 <= n {
            crate::prefetch_ahead(w.add(j));
            for k in 0..4 {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(j + 8 * k) as *const __m128i));
                acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(j + 8 * k)), acc[k]);
            }
            j += 32;
        }
        while j + 8 <= n {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(j) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(j)), acc[0]);
            j += 8;
        }
        let mut tail = 0.0f32;
        while j < n {
            tail += (*row.get_unchecked(j)).to_f32() * *x.get_unchecked(j);
            j += 1;
        }
        crate::x86::hsum256(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        )) + tail
    }

    /// # Safety
    /// Requires AVX2 and FMA; `row.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(row: &[f32], x: &[f32]) -> f32 {
        assert_eq!(row.len(), x.len());
        let n = row.len();
        let (w, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY (all loads): j + width <= n, checked by each loop condition.
        while j + 32 <= n {
            for k in 0..4 {
                acc[k] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(w.add(j + 8 * k)),
                    _mm256_loadu_ps(xp.add(j + 8 * k)),
                    acc[k],
                );
            }
            j += 32;
        }
        while j + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.add(j)),
                _mm256_loadu_ps(xp.add(j)),
                acc[0],
            );
            j += 8;
        }
        let mut tail = 0.0f32;
        while j < n {
            tail += *row.get_unchecked(j) * *x.get_unchecked(j);
            j += 1;
        }
        crate::x86::hsum256(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        )) + tail
    }
}
