//! The element-wise activation of the LLaMA MLP, SwiGLU (`silu(gate) * up`), and the vector
//! `e^x` it shares with attention's softmax ([`crate::attention`]).
//!
//! The vector path takes `e^x` of `-|x|` only, the arguments `exp_avx512` is accurate for,
//! and is tested against an f64 SwiGLU; elsewhere one element at a time with `f32::exp`.

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`, the SwiGLU MLP's gating, with AVX-512 where the CPU has it.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
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

/// `e^x` lane by lane, within a few ulp for `x <= 0` (softmax arguments; the test bounds it
/// at 4): `x = k ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r`, and
/// `vscalefps` for the `2^k` (exact, flushing to 0 far below the smallest float).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_exp_is_accurate() {
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
    }

    #[test]
    fn swiglu_matches_f64() {
        let mut rng = crate::test_rng::SplitMix64::new(6);
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
}
