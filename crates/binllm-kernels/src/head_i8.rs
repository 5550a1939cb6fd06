//! The quantized LM heads (q8_0 and q4_0 weights) with int8 activations, for AVX-512 VNNI:
//! the arithmetic llama.cpp uses for the same weight formats (activations rounded to int8 per
//! block of 32 with an f32 scale each, `scale = max|x| / 127`), so a head of a given format
//! costs the same precision in both engines.
//!
//! Why: with int16 activations ([`crate::q8`], [`crate::q4`]) every block of 32 weights is a
//! widening conversion, two `vpmaddwd`, a conversion and an FMA, and the head GEMV is
//! compute-bound well below the memory's rate (the q4_0 head streamed at 6 GB/s). `vpdpbusd`
//! multiplies 64 unsigned by 64 signed bytes into 16 exact i32 lane sums in one instruction, so
//! a q8_0 block pair or a q4_0 block quad costs about five instructions.
//!
//! Lanes and order (every path): one 512-bit step covers 64 weight bytes; i32 lane `l` holds
//! the exact integer sum of the products its four bytes feed; it is converted to f32 (exact:
//! |sum| < 2^24) and fused-multiply-added with `w_scale[block] * x_scale[block]` (rounded to
//! f32 first) into one of two 16-lane accumulators (even and odd steps). The row is their
//! lane-wise sum reduced by `reduce16`'s fixed tree. The references here do the same one lane
//! at a time, so the SIMD paths equal them bit for bit.
//!
//! - q8_0, 2 blocks per step: lanes 0-7 are block `2k`, 8-15 block `2k + 1`; lane `l` sums the
//!   weights `64k + 4l .. 64k + 4l + 4`. `vpdpbusd` takes |x| as the unsigned operand and the
//!   weights with the sign of x applied (`q` is never -128, so the negation is exact).
//! - q4_0, 4 blocks per step (16 code bytes each): lane `l` is block `4k + l / 4` and sums, for
//!   its code bytes `i = 4 (l % 4) .. + 4`, `(lo_i - 8) x[i] + (hi_i - 8) x[16 + i]`. The codes
//!   0..=15 are the unsigned operand against x rearranged to match, and the `-8` is one
//!   per-lane correction `-8 * (sum of the lane's 8 activations)` computed once per vector.

use crate::dense::DenseKernel;
use crate::q4::{Q4Matrix, Q4_BLOCK, Q4_BLOCK_BYTES};
use crate::q8::{Q8Matrix, Q8_BLOCK};

/// Activations per step: 64 bytes.
const STEP: usize = 64;
/// Blocks whose scales one 512-bit register holds.
const SCALES_PER_REGISTER: usize = 16;

/// One input vector rounded to int8 per block of 32, in the layouts both heads read. Built once
/// per vector and shared by every row.
pub struct I8Activations {
    blocks: usize,
    /// `x[32 b + i] ~ scales[b] * quants[32 b + i]`, zero-padded to whole q4 steps (4 blocks).
    quants: Vec<i8>,
    /// Per block, zero-padded to whole registers of 16.
    scales: Vec<f32>,
    /// q8_0: |quants| as u8.
    magnitudes: Vec<u8>,
    /// q8_0: bit `i` of word `k` is set when `quants[64 k + i] < 0`.
    negative: Vec<u64>,
    /// q4_0: per step, the 64 activations the low nibbles meet, then the 64 the high ones meet.
    q4_pairs: Vec<i8>,
    /// q4_0: per step, the 16 lanes' `-8 * sum of their activations`.
    q4_correction: Vec<i32>,
}

impl I8Activations {
    /// `x` (padded with zeros to `blocks` blocks of 32) rounded to int8 per block, laid out for
    /// the q8_0 kernels.
    pub fn for_q8_0(x: &[f32], blocks: usize) -> Self {
        let mut activations = Self::rounded(x, blocks);
        activations.magnitudes = activations
            .quants
            .iter()
            .map(|q| q.unsigned_abs())
            .collect();
        activations.negative = activations
            .quants
            .chunks(STEP)
            .map(|step| {
                step.iter()
                    .enumerate()
                    .fold(0u64, |bits, (i, &q)| bits | (u64::from(q < 0) << i))
            })
            .collect();
        activations
    }

    /// `x` (padded with zeros to `blocks` blocks of 32) rounded to int8 per block, laid out for
    /// the q4_0 kernels.
    pub fn for_q4_0(x: &[f32], blocks: usize) -> Self {
        let mut activations = Self::rounded(x, blocks);
        let quants = &activations.quants;
        let steps = quants.len() / Q8_BLOCK / 4;
        let mut q4_pairs = vec![0i8; steps * 2 * STEP];
        let mut q4_correction = vec![0i32; steps * 16];
        for step in 0..steps {
            for j in 0..STEP {
                let block = 4 * step + j / Q4_BLOCK_BYTES;
                let i = j % Q4_BLOCK_BYTES;
                q4_pairs[step * 2 * STEP + j] = quants[block * Q4_BLOCK + i];
                q4_pairs[step * 2 * STEP + STEP + j] = quants[block * Q4_BLOCK + 16 + i];
            }
            for lane in 0..16 {
                let pairs = &q4_pairs[step * 2 * STEP..(step + 1) * 2 * STEP];
                let sum: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| i32::from(pairs[j]) + i32::from(pairs[STEP + j]))
                    .sum();
                q4_correction[step * 16 + lane] = -8 * sum;
            }
        }
        activations.q4_pairs = q4_pairs;
        activations.q4_correction = q4_correction;
        activations
    }

    /// Rounds `x` to int8 per block, as llama.cpp's `quantize_row_q8_0`: `scale = max|x| / 127`,
    /// `q = x / scale` rounded to nearest (ties to even, where llama.cpp rounds them away from
    /// zero). A block holding a NaN or an infinity gets a NaN scale, so its rows come out NaN.
    /// The layouts of one weight format are left empty for its constructor to fill.
    fn rounded(x: &[f32], blocks: usize) -> Self {
        assert!(x.len() <= blocks * Q8_BLOCK, "more activations than blocks");
        let padded_blocks = blocks.div_ceil(4) * 4;
        let mut quants = vec![0i8; padded_blocks * Q8_BLOCK];
        let mut scales = vec![0f32; blocks.div_ceil(SCALES_PER_REGISTER) * SCALES_PER_REGISTER];
        for (b, chunk) in x.chunks(Q8_BLOCK).enumerate() {
            let max_abs = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if !max_abs.is_finite() || chunk.iter().any(|v| v.is_nan()) {
                scales[b] = f32::NAN;
                continue;
            }
            if max_abs == 0.0 {
                continue;
            }
            let scale = max_abs / 127.0;
            let inverse = 1.0 / scale;
            scales[b] = scale;
            for (q, &v) in quants[b * Q8_BLOCK..].iter_mut().zip(chunk) {
                *q = round_to_nearest(v * inverse) as i8;
            }
        }
        I8Activations {
            blocks,
            quants,
            scales,
            magnitudes: Vec::new(),
            negative: Vec::new(),
            q4_pairs: Vec::new(),
            q4_correction: Vec::new(),
        }
    }
}

/// `v` (|v| <= 127.5) rounded to the nearest integer, ties to even: adding and subtracting
/// 1.5 * 2^23 leaves no fraction bits, and unlike `f32::round` (a libm call on baseline x86-64)
/// it vectorises.
#[inline(always)]
fn round_to_nearest(v: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0;
    (v + SHIFTER) - SHIFTER
}

/// The fixed reduction tree of 16 lanes: halves, then quarters, then pairs.
#[inline(always)]
fn reduce16(v: [f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|l| v[l] + v[l + 8]);
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    let s2: [f32; 2] = std::array::from_fn(|l| s4[l] + s4[l + 2]);
    s2[0] + s2[1]
}

/// Row `r` of a q8_0 matrix times `x`, lane by lane in the order of the VNNI path.
pub fn dot_q8_reference(m: &Q8Matrix, r: usize, x: &I8Activations) -> f32 {
    assert_eq!(x.blocks, m.blocks_per_row, "activations for another width");
    let quants = &m.quants[r * m.blocks_per_row * Q8_BLOCK..(r + 1) * m.blocks_per_row * Q8_BLOCK];
    let w_scales = &m.scales[r * m.blocks_per_row..(r + 1) * m.blocks_per_row];
    let mut acc = [[0f32; 16]; 2];
    for k in 0..m.blocks_per_row.div_ceil(2) {
        for (l, acc) in acc[k % 2].iter_mut().enumerate() {
            let block = 2 * k + l / 8;
            if block >= m.blocks_per_row {
                continue;
            }
            let lane: i32 = (STEP * k + 4 * l..STEP * k + 4 * l + 4)
                .map(|j| i32::from(quants[j]) * i32::from(x.quants[j]))
                .sum();
            *acc = (lane as f32).mul_add(w_scales[block] * x.scales[block], *acc);
        }
    }
    reduce16(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
}

/// Row `r` of a q4_0 matrix times `x`, lane by lane in the order of the VNNI path.
pub fn dot_q4_reference(m: &Q4Matrix, r: usize, x: &I8Activations) -> f32 {
    assert_eq!(x.blocks, m.blocks_per_row, "activations for another width");
    let per = m.blocks_per_row;
    let codes = &m.codes[r * per * Q4_BLOCK_BYTES..(r + 1) * per * Q4_BLOCK_BYTES];
    let w_scales = &m.scales[r * per..(r + 1) * per];
    let mut acc = [[0f32; 16]; 2];
    for k in 0..per.div_ceil(4) {
        for (l, acc) in acc[k % 2].iter_mut().enumerate() {
            let block = 4 * k + l / 4;
            if block >= per {
                continue;
            }
            let x_block = &x.quants[block * Q4_BLOCK..(block + 1) * Q4_BLOCK];
            let bytes = &codes[block * Q4_BLOCK_BYTES..(block + 1) * Q4_BLOCK_BYTES];
            let lane: i32 = (4 * (l % 4)..4 * (l % 4) + 4)
                .map(|i| {
                    (i32::from(bytes[i] & 0x0f) - 8) * i32::from(x_block[i])
                        + (i32::from(bytes[i] >> 4) - 8) * i32::from(x_block[16 + i])
                })
                .sum();
            let scale = w_scales[block].to_f32() * x.scales[block];
            *acc = (lane as f32).mul_add(scale, *acc);
        }
    }
    reduce16(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
}

/// `out[i]` = row `rows.start + i` of a q8_0 matrix times `x`, on `kernel`'s int8 path
/// ([`DenseKernel::Avx512Vnni`], [`DenseKernel::Avx2Int8`]; any other kernel, or a CPU without
/// it, takes [`dot_q8_reference`]). One call per run of rows, so the checks and the call are
/// paid once per run, not per row. The caller has checked that `kernel` is available (the
/// public products do on entry), not once per run of rows here.
pub(crate) fn rows_q8(
    kernel: DenseKernel,
    m: &Q8Matrix,
    rows: std::ops::Range<usize>,
    x: &I8Activations,
    out: &mut [f32],
) {
    assert!(rows.end <= m.rows && out.len() == rows.len());
    match kernel {
        // SAFETY: the caller checked the kernel's features; lengths are asserted inside.
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx512Vnni => unsafe { x86::rows_q8_vnni(m, rows, x, out) },
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx2Int8 => unsafe { x86::rows_q8_avx2(m, rows, x, out) },
        _ => {
            for (out, r) in out.iter_mut().zip(rows) {
                *out = dot_q8_reference(m, r, x);
            }
        }
    }
}

/// As [`rows_q8`] for a q4_0 matrix ([`dot_q4_reference`] off the SIMD paths).
pub(crate) fn rows_q4(
    kernel: DenseKernel,
    m: &Q4Matrix,
    rows: std::ops::Range<usize>,
    x: &I8Activations,
    out: &mut [f32],
) {
    assert!(rows.end <= m.rows && out.len() == rows.len());
    match kernel {
        // SAFETY: as in `rows_q8`.
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx512Vnni => unsafe { x86::rows_q4_vnni(m, rows, x, out) },
        #[cfg(target_arch = "x86_64")]
        DenseKernel::Avx2Int8 => unsafe { x86::rows_q4_avx2(m, rows, x, out) },
        _ => {
            for (out, r) in out.iter_mut().zip(rows) {
                *out = dot_q4_reference(m, r, x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over the R rows unroll cleanly
mod x86 {
    use super::{I8Activations, SCALES_PER_REGISTER, STEP};
    use crate::q4::{Q4Matrix, Q4_BLOCK_BYTES};
    use crate::q8::{Q8Matrix, Q8_BLOCK};
    use std::arch::x86_64::*;

    /// [`super::reduce16`] in registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce16(v: __m512) -> f32 {
        let s8 = _mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        );
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// 64 bytes from `p`, or only the first `left` (zeros after them) when fewer are left.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load_bytes(p: *const i8, left: usize) -> __m512i {
        if left >= STEP {
            _mm512_loadu_si512(p as *const _)
        } else {
            _mm512_maskz_loadu_epi8((1u64 << left) - 1, p)
        }
    }

    /// For each q8_0 step of a register of 16 block scales, each lane's block: lanes 0-7 take
    /// the step's first block, 8-15 its second.
    static Q8_SCALE_INDEX: [[i32; 16]; 8] = {
        let mut table = [[0i32; 16]; 8];
        let mut step = 0;
        while step < 8 {
            let mut lane = 0;
            while lane < 16 {
                table[step][lane] = (2 * step + lane / 8) as i32;
                lane += 1;
            }
            step += 1;
        }
        table
    };
    /// For each q4_0 step of a register of 16 block scales, each lane's block (`l / 4`).
    static Q4_SCALE_INDEX: [[i32; 16]; 4] = {
        let mut table = [[0i32; 16]; 4];
        let mut step = 0;
        while step < 4 {
            let mut lane = 0;
            while lane < 16 {
                table[step][lane] = (4 * step + lane / 4) as i32;
                lane += 1;
            }
            step += 1;
        }
        table
    };

    /// # Safety
    /// Requires AVX-512F/BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows_q8_vnni(
        m: &Q8Matrix,
        rows: std::ops::Range<usize>,
        x: &I8Activations,
        out: &mut [f32],
    ) {
        let blocks = m.blocks_per_row;
        assert_eq!(x.blocks, blocks, "activations for another width");
        let steps = blocks.div_ceil(2);
        assert!(x.magnitudes.len() >= steps * STEP && x.negative.len() >= steps);
        assert!(x.scales.len() >= blocks.div_ceil(SCALES_PER_REGISTER) * SCALES_PER_REGISTER);
        in_row_pairs(
            rows.start,
            out,
            |r| dot_q8_vnni::<2>(m, r, x),
            |r| dot_q8_vnni::<1>(m, r, x)[0],
        );
    }

    /// Rows `r..r + R` (R rows share each activation load); the caller has checked the
    /// activations' lengths.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn dot_q8_vnni<const R: usize>(m: &Q8Matrix, r: usize, x: &I8Activations) -> [f32; R] {
        let blocks = m.blocks_per_row;
        let row_len = blocks * Q8_BLOCK;
        let quants = &m.quants[r * row_len..(r + R) * row_len];
        let w_scales = &m.scales[r * blocks..(r + R) * blocks];
        let steps = blocks.div_ceil(2);
        let mut scales = [_mm512_setzero_ps(); R];
        let mut step = |k: usize, acc: [__m512; R]| -> [__m512; R] {
            let first = 2 * k;
            if first.is_multiple_of(SCALES_PER_REGISTER) {
                let n = (blocks - first).min(SCALES_PER_REGISTER);
                let x_scales = _mm512_loadu_ps(x.scales.as_ptr().add(first));
                for i in 0..R {
                    // SAFETY: the masked load reads row i's w_scales[first..first + n] only;
                    // x.scales is padded to whole registers (asserted).
                    let w = _mm512_maskz_loadu_ps(
                        ((1u32 << n) - 1) as u16,
                        w_scales.as_ptr().add(i * blocks + first),
                    );
                    scales[i] = _mm512_mul_ps(w, x_scales);
                }
            }
            let offset = STEP * k;
            let negative = *x.negative.get_unchecked(k);
            let magnitudes = _mm512_loadu_si512(x.magnitudes.as_ptr().add(offset) as *const _);
            let index = _mm512_loadu_si512(Q8_SCALE_INDEX[k % 8].as_ptr() as *const _);
            std::array::from_fn(|i| {
                crate::prefetch_ahead(quants.as_ptr().add(i * row_len + offset));
                // SAFETY: the masked load stays inside row i; activations are padded (asserted).
                let w = load_bytes(quants.as_ptr().add(i * row_len + offset), row_len - offset);
                let signed = _mm512_mask_sub_epi8(w, negative, _mm512_setzero_si512(), w);
                let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitudes, signed);
                let scale = _mm512_permutexvar_ps(index, scales[i]);
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, acc[i])
            })
        };
        accumulate_alternately(steps, &mut step)
    }

    /// Fills `out` (rows `start..`) two rows at a time with `two(r)` (rows `r`, `r + 1`), an odd
    /// last row with `one(r)`.
    #[inline(always)]
    fn in_row_pairs(
        start: usize,
        out: &mut [f32],
        mut two: impl FnMut(usize) -> [f32; 2],
        mut one: impl FnMut(usize) -> f32,
    ) {
        let mut pairs = out.chunks_exact_mut(2);
        let mut r = start;
        for pair in &mut pairs {
            pair.copy_from_slice(&two(r));
            r += 2;
        }
        if let [last] = pairs.into_remainder() {
            *last = one(r);
        }
    }

    /// Runs `step(k, acc)` for `k` in `0..steps`, even steps into one set of accumulators and
    /// odd ones into another (named registers: an indexed pair would live on the stack, and
    /// the store-to-load latency would serialise the steps), and reduces each row's sum.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn accumulate_alternately<const R: usize>(
        steps: usize,
        step: &mut impl FnMut(usize, [__m512; R]) -> [__m512; R],
    ) -> [f32; R] {
        let (mut even, mut odd) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        let mut k = 0;
        while k + 1 < steps {
            even = step(k, even);
            odd = step(k + 1, odd);
            k += 2;
        }
        if k < steps {
            even = step(k, even);
        }
        std::array::from_fn(|i| reduce16(_mm512_add_ps(even[i], odd[i])))
    }

    /// # Safety
    /// Requires AVX-512F/BW/VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_q4_vnni(
        m: &Q4Matrix,
        rows: std::ops::Range<usize>,
        x: &I8Activations,
        out: &mut [f32],
    ) {
        let blocks = m.blocks_per_row;
        assert_eq!(x.blocks, blocks, "activations for another width");
        let steps = blocks.div_ceil(4);
        assert!(x.q4_pairs.len() >= steps * 2 * STEP && x.q4_correction.len() >= steps * 16);
        assert!(x.scales.len() >= blocks.div_ceil(SCALES_PER_REGISTER) * SCALES_PER_REGISTER);
        in_row_pairs(
            rows.start,
            out,
            |r| dot_q4_vnni::<2>(m, r, x),
            |r| dot_q4_vnni::<1>(m, r, x)[0],
        );
    }

    /// Rows `r..r + R`, as [`dot_q8_vnni`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot_q4_vnni<const R: usize>(m: &Q4Matrix, r: usize, x: &I8Activations) -> [f32; R] {
        let blocks = m.blocks_per_row;
        let row_bytes = blocks * Q4_BLOCK_BYTES;
        let codes = &m.codes[r * row_bytes..(r + R) * row_bytes];
        let w_scales = &m.scales[r * blocks..(r + R) * blocks];
        let steps = blocks.div_ceil(4);
        let low_nibble = _mm512_set1_epi8(0x0f);
        let mut scales = [_mm512_setzero_ps(); R];
        let mut step = |k: usize, acc: [__m512; R]| -> [__m512; R] {
            let first = 4 * k;
            if first.is_multiple_of(SCALES_PER_REGISTER) {
                let n = (blocks - first).min(SCALES_PER_REGISTER);
                let x_scales = _mm512_loadu_ps(x.scales.as_ptr().add(first));
                for i in 0..R {
                    // SAFETY: the masked load reads row i's w_scales[first..first + n] only.
                    let w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        ((1u32 << n) - 1) as u16,
                        w_scales.as_ptr().add(i * blocks + first) as *const i16,
                    ));
                    scales[i] = _mm512_mul_ps(w, x_scales);
                }
            }
            let offset = STEP * k;
            let pairs = x.q4_pairs.as_ptr().add(2 * offset);
            let x_low = _mm512_loadu_si512(pairs as *const _);
            let x_high = _mm512_loadu_si512(pairs.add(STEP) as *const _);
            let correction = _mm512_loadu_si512(x.q4_correction.as_ptr().add(16 * k) as *const _);
            let index = _mm512_loadu_si512(Q4_SCALE_INDEX[k % 4].as_ptr() as *const _);
            std::array::from_fn(|i| {
                crate::prefetch_ahead(codes.as_ptr().add(i * row_bytes + offset));
                // SAFETY: the masked load stays inside row i; activations are padded (asserted).
                let bytes = load_bytes(
                    codes.as_ptr().add(i * row_bytes + offset) as *const i8,
                    row_bytes - offset,
                );
                let low = _mm512_and_si512(bytes, low_nibble);
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(bytes), low_nibble);
                let lanes = _mm512_dpbusd_epi32(correction, low, x_low);
                let lanes = _mm512_dpbusd_epi32(lanes, high, x_high);
                let scale = _mm512_permutexvar_ps(index, scales[i]);
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, acc[i])
            })
        };
        accumulate_alternately(steps, &mut step)
    }

    /// AVX2 twin of [`rows_q8_vnni`]: a 64-byte step is two 32-byte halves (lanes 0-7 and
    /// 8-15), `vpmaddubsw` (|x| against the weights with x's sign, pairs at most 2 * 127^2, so
    /// no saturation) then `vpmaddwd` by ones gives the same exact i32 lanes, and the
    /// accumulators, scales and reduction are the reference's lane for lane.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_q8_avx2(
        m: &Q8Matrix,
        rows: std::ops::Range<usize>,
        x: &I8Activations,
        out: &mut [f32],
    ) {
        let blocks = m.blocks_per_row;
        assert_eq!(x.blocks, blocks, "activations for another width");
        assert!(x.quants.len() >= blocks.div_ceil(2) * STEP && x.scales.len() >= blocks);
        let row_len = blocks * Q8_BLOCK;
        let ones = _mm256_set1_epi16(1);
        for (out, r) in out.iter_mut().zip(rows) {
            let quants = &m.quants[r * row_len..(r + 1) * row_len];
            let w_scales = &m.scales[r * blocks..(r + 1) * blocks];
            let block = |b: usize, a: __m256| -> __m256 {
                let offset = Q8_BLOCK * b;
                // SAFETY: offset + 32 <= row_len; activations are padded (asserted).
                let w = _mm256_loadu_si256(quants.as_ptr().add(offset) as *const __m256i);
                let xq = _mm256_loadu_si256(x.quants.as_ptr().add(offset) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(w, xq));
                let lanes = _mm256_madd_epi16(pairs, ones);
                let scale = _mm256_set1_ps(w_scales[b] * x.scales[b]);
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, a)
            };
            // Named values, not a loop over references: the accumulators stay in registers.
            let mut step = |k: usize, [low, high]: [__m256; 2]| -> [__m256; 2] {
                crate::prefetch_ahead(quants.as_ptr().add(Q8_BLOCK * 2 * k));
                let low = block(2 * k, low);
                let high = if 2 * k + 1 < blocks {
                    block(2 * k + 1, high)
                } else {
                    high
                };
                [low, high]
            };
            *out = reduce_halves(alternate_halves(blocks.div_ceil(2), &mut step));
        }
    }

    /// Runs `step(k, acc)` over `0..steps` with even and odd steps in separate (named)
    /// accumulator pairs, as [`accumulate_alternately`]; returns `[even, odd]`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn alternate_halves(
        steps: usize,
        step: &mut impl FnMut(usize, [__m256; 2]) -> [__m256; 2],
    ) -> [[__m256; 2]; 2] {
        let zero = [_mm256_setzero_ps(); 2];
        let (mut even, mut odd) = (zero, zero);
        let mut k = 0;
        while k + 1 < steps {
            even = step(k, even);
            odd = step(k + 1, odd);
            k += 2;
        }
        if k < steps {
            even = step(k, even);
        }
        [even, odd]
    }

    /// AVX2 twin of [`rows_q4_vnni`]: each 32-byte half of a step holds two blocks (lanes 0-3
    /// and 4-7 of the half); `vpmaddubsw` of the nibbles against x (at most 2 * 15 * 127 per
    /// pair) and `vpmaddwd` by ones give the exact lane sums, plus the `-8` correction.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_q4_avx2(
        m: &Q4Matrix,
        rows: std::ops::Range<usize>,
        x: &I8Activations,
        out: &mut [f32],
    ) {
        let blocks = m.blocks_per_row;
        assert_eq!(x.blocks, blocks, "activations for another width");
        let steps = blocks.div_ceil(4);
        assert!(x.q4_pairs.len() >= steps * 2 * STEP && x.q4_correction.len() >= steps * 16);
        assert!(x.scales.len() >= blocks);
        let row_bytes = blocks * Q4_BLOCK_BYTES;
        let ones = _mm256_set1_epi16(1);
        let low_nibble = _mm256_set1_epi8(0x0f);
        // Per row, each block's `w_scale * x_scale`, padded with a zero to whole pairs.
        let mut combined = vec![0f32; blocks + 1];
        let pair_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (out, r) in out.iter_mut().zip(rows) {
            let codes = &m.codes[r * row_bytes..(r + 1) * row_bytes];
            let w_scales = &m.scales[r * blocks..(r + 1) * blocks];
            // F16C eight at a time (`f16::to_f32` checks the CPU on every call).
            let mut b = 0;
            while b + 8 <= blocks {
                // SAFETY: b + 8 <= blocks <= w_scales.len(), x.scales.len(), combined.len().
                let w = _mm256_cvtph_ps(_mm_loadu_si128(w_scales.as_ptr().add(b) as *const _));
                let product = _mm256_mul_ps(w, _mm256_loadu_ps(x.scales.as_ptr().add(b)));
                _mm256_storeu_ps(combined.as_mut_ptr().add(b), product);
                b += 8;
            }
            for b in b..blocks {
                combined[b] = w_scales[b].to_f32() * x.scales[b];
            }
            // Half `half` of step `k`: blocks `first` and `first + 1` (if any) into lanes 0-3
            // and 4-7 of `a`.
            let pair = |k: usize, half: usize, a: __m256| -> __m256 {
                let first = 4 * k + 2 * half;
                let offset = Q4_BLOCK_BYTES * first;
                // SAFETY: the half holds one or two whole blocks of the row: a 16-byte masked
                // load when only one is left.
                let bytes = if first + 1 < blocks {
                    _mm256_loadu_si256(codes.as_ptr().add(offset) as *const __m256i)
                } else {
                    _mm256_maskload_epi32(
                        codes.as_ptr().add(offset) as *const i32,
                        _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0),
                    )
                };
                let low = _mm256_and_si256(bytes, low_nibble);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low_nibble);
                let pairs = x.q4_pairs.as_ptr().add(2 * STEP * k + 32 * half);
                let x_low = _mm256_loadu_si256(pairs as *const __m256i);
                let x_high = _mm256_loadu_si256(pairs.add(STEP) as *const __m256i);
                let sums = _mm256_add_epi16(
                    _mm256_maddubs_epi16(low, x_low),
                    _mm256_maddubs_epi16(high, x_high),
                );
                let correction = _mm256_loadu_si256(
                    x.q4_correction.as_ptr().add(16 * k + 8 * half) as *const __m256i,
                );
                let lanes = _mm256_add_epi32(_mm256_madd_epi16(sums, ones), correction);
                // SAFETY: first + 1 <= blocks < combined.len().
                let two = _mm_castpd_ps(_mm_load_sd(combined.as_ptr().add(first) as *const f64));
                let scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), pair_lanes);
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, a)
            };
            // Named values, not a loop over references: the accumulators stay in registers.
            let mut step = |k: usize, [low, high]: [__m256; 2]| -> [__m256; 2] {
                crate::prefetch_ahead(codes.as_ptr().add(Q4_BLOCK_BYTES * 4 * k));
                let low = pair(k, 0, low);
                let high = if 4 * k + 2 < blocks {
                    pair(k, 1, high)
                } else {
                    high
                };
                [low, high]
            };
            *out = reduce_halves(alternate_halves(steps, &mut step));
        }
    }

    /// [`super::reduce16`] of `acc[0] + acc[1]` (even and odd steps), each as two 8-lane
    /// halves.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn reduce_halves(acc: [[__m256; 2]; 2]) -> f32 {
        let low = _mm256_add_ps(acc[0][0], acc[1][0]);
        let high = _mm256_add_ps(acc[0][1], acc[1][1]);
        let s8 = _mm256_add_ps(low, high);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }
}
