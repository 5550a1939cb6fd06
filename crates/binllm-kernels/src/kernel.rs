//! Which implementation computes a product, and run-time dispatch to it.

use crate::lut;
use crate::scalar;

/// A 1-bit GEMV/GEMM implementation. `Lut*` kernels use the [`crate::LutMatrix`] layout, the
/// others the canonical [`crate::PackedMatrix`] layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Element-by-element reference ([`crate::scalar`]).
    Scalar,
    /// x86-64 AVX2 + FMA, bits expanded to lane masks by variable shifts.
    Avx2,
    /// x86-64 AVX-512F, bits used directly as k-masks.
    Avx512,
    /// aarch64 NEON, bits expanded by `vtst`.
    Neon,
    /// Lookup tables of 4-activation partial sums, portable code.
    LutScalar,
    /// Lookup tables, AVX2 + FMA + F16C (`vpermps` over two 8-entry halves).
    LutAvx2,
    /// Lookup tables, AVX-512F (`vpermps` over 16 rows at once).
    LutAvx512,
    /// Lookup tables of 3-activation sums ([`crate::Lut3Matrix`]), portable code: the
    /// reference of `Lut3Avx2`.
    Lut3Scalar,
    /// Lookup tables of 3-activation sums, AVX2 (one `vpermps` per 8 rows x 3 columns).
    Lut3Avx2,
    /// Int8 activations (W1A8, approximate): exact integer reference for the i8 paths.
    LutI8Scalar,
    /// Int8 activations, i16 lookup tables, AVX-512BW (`vpermw` over 32 rows at once).
    LutI8Avx512,
}

impl Kernel {
    pub const ALL: [Kernel; 11] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Neon,
        Kernel::LutScalar,
        Kernel::LutAvx2,
        Kernel::LutAvx512,
        Kernel::Lut3Scalar,
        Kernel::Lut3Avx2,
        Kernel::LutI8Scalar,
        Kernel::LutI8Avx512,
    ];

    /// Whether this CPU can run the kernel (checked at run time).
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar | Kernel::LutScalar | Kernel::Lut3Scalar | Kernel::LutI8Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Lut3Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
            }
            // F16C widens the f16 block scales of a block-scaled matrix (every AVX2 CPU has it).
            #[cfg(target_arch = "x86_64")]
            Kernel::LutAvx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 | Kernel::LutAvx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::LutI8Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// All kernels this CPU can run.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The fastest available kernel, in the order `gemv_bench` measured (LUT paths are faster
    /// than mask expansion on both AVX-512 and AVX2 at SmolLM2 shapes; on AVX2 alone the
    /// 3-activation tables beat the 4-activation ones).
    pub fn best() -> Kernel {
        [
            Kernel::LutAvx512,
            Kernel::Lut3Avx2,
            Kernel::LutAvx2,
            Kernel::Neon,
            Kernel::LutScalar,
        ]
        .into_iter()
        .find(|k| k.is_available())
        .unwrap_or(Kernel::Scalar)
    }

    /// The fastest available kernel that works on the canonical layout (no re-tiling).
    pub fn best_row_major() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// Whether the kernel needs the [`crate::LutMatrix`] layout.
    pub fn uses_lut_layout(self) -> bool {
        matches!(
            self,
            Kernel::LutScalar | Kernel::LutAvx2 | Kernel::LutAvx512
        )
    }

    /// Whether the kernel needs the [`crate::Lut3Matrix`] layout.
    pub fn uses_lut3_layout(self) -> bool {
        matches!(self, Kernel::Lut3Scalar | Kernel::Lut3Avx2)
    }

    /// Whether the kernel needs the [`crate::LutI8Matrix`] layout.
    pub fn uses_i8_layout(self) -> bool {
        matches!(self, Kernel::LutI8Scalar | Kernel::LutI8Avx512)
    }

    /// Whether results differ from the f32 reference by more than f32 rounding (int8
    /// activations). [`Kernel::best`] never returns one of these.
    pub fn is_approximate(self) -> bool {
        self.uses_i8_layout()
    }

    /// Input vectors processed per pass over the weights in GEMM (bounded by registers).
    pub(crate) fn gemm_tile(self) -> usize {
        match self {
            Kernel::Scalar | Kernel::LutI8Scalar => 1,
            Kernel::Avx2 | Kernel::Neon | Kernel::Lut3Scalar | Kernel::Lut3Avx2 => 2,
            Kernel::Avx512
            | Kernel::LutScalar
            | Kernel::LutAvx2
            | Kernel::LutAvx512
            | Kernel::LutI8Avx512 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Neon => "neon",
            Kernel::LutScalar => "lut-scalar",
            Kernel::LutAvx2 => "lut-avx2",
            Kernel::LutAvx512 => "lut-avx512",
            Kernel::Lut3Scalar => "lut3-scalar",
            Kernel::Lut3Avx2 => "lut3-avx2",
            Kernel::LutI8Scalar => "lut-i8-scalar",
            Kernel::LutI8Avx512 => "lut-i8-avx512",
        }
    }

    pub(crate) fn assert_available(self) {
        assert!(
            self.is_available(),
            "kernel {} is not available on this CPU",
            self.name()
        );
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// On a command line a kernel is its [`Kernel::name`].
#[cfg(feature = "clap")]
impl clap::ValueEnum for Kernel {
    fn value_variants<'a>() -> &'a [Self] {
        &Kernel::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown kernel {s:?}"))
    }
}

/// Row-major kernels: per-row, per-vector sums of the activations whose bit is 1, for the
/// rows whose words are `bits`. `xs` are zero-padded to `64 * words_per_row` floats. The kernel
/// must be available and row-major (not Scalar).
#[inline]
pub(crate) fn selected_sums<const T: usize>(
    kernel: Kernel,
    bits: &[u64],
    words_per_row: usize,
    xs: &[&[f32]; T],
    out: &mut [[f32; T]],
) {
    match kernel {
        // SAFETY: availability is checked by every public entry point (`assert_available`);
        // the kernels assert the padded lengths themselves.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe {
            crate::x86::selected_sums_avx512::<T>(bits, words_per_row, xs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe {
            crate::x86::selected_sums_avx2::<T>(bits, words_per_row, xs, out)
        },
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => unsafe {
            crate::neon::selected_sums_neon::<T>(bits, words_per_row, xs, out)
        },
        _ => unreachable!("selected_sums called with {kernel}"),
    }
}

/// The f32-table LUT kernels (`lut` and `lut3` families): unscaled row sums of consecutive
/// 16-row blocks (`data`) for `T` vectors, stored vector-major in `sums` (`T * 16 * blocks`
/// floats). `tables` must be the family's own.
#[inline]
pub(crate) fn lut_blocks_sums<const T: usize>(
    kernel: Kernel,
    data: &[u32],
    chunks: usize,
    tables: &[&[f32]; T],
    sums: &mut [f32],
) {
    match kernel {
        // SAFETY: as in `selected_sums`; the kernels assert table lengths.
        #[cfg(target_arch = "x86_64")]
        Kernel::LutAvx512 => unsafe { lut::blocks_sums_avx512::<T>(data, chunks, tables, sums) },
        #[cfg(target_arch = "x86_64")]
        Kernel::LutAvx2 => unsafe { lut::blocks_sums_avx2::<T>(data, chunks, tables, sums) },
        Kernel::LutScalar => lut::blocks_sums_scalar::<T>(data, chunks, tables, sums),
        #[cfg(target_arch = "x86_64")]
        Kernel::Lut3Avx2 => unsafe {
            crate::lut3::blocks_sums_avx2::<T>(data, chunks, tables, sums)
        },
        Kernel::Lut3Scalar => crate::lut3::blocks_sums_scalar::<T>(data, chunks, tables, sums),
        _ => unreachable!("lut_blocks_sums called with {kernel}"),
    }
}

/// Int8 LUT kernels: exact integer row sums of consecutive 32-row blocks for `T` vectors,
/// vector-major in `sums`. The scalar path takes the quantized activations, SIMD the tables.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // tables feed SIMD paths only
pub(crate) fn lut_i8_blocks_sums<const T: usize>(
    kernel: Kernel,
    data: &[u16],
    chunks: usize,
    qs: &[&[i8]; T],
    tables: &[&[i16]; T],
    sums: &mut [i32],
) {
    match kernel {
        // SAFETY: as in `selected_sums`; the kernel asserts table lengths.
        #[cfg(target_arch = "x86_64")]
        Kernel::LutI8Avx512 => unsafe {
            crate::lut_i8::blocks_sums_avx512bw::<T>(data, chunks, tables, sums)
        },
        Kernel::LutI8Scalar => crate::lut_i8::blocks_sums_scalar::<T>(data, chunks, qs, sums),
        _ => unreachable!("lut_i8_blocks_sums called with {kernel}"),
    }
}

/// Reference row dot for the Scalar kernel (unpadded `x`).
#[inline]
pub(crate) fn scalar_row_dot(m: &crate::PackedMatrix, r: usize, x: &[f32]) -> f32 {
    scalar::row_dot(m, r, x)
}
