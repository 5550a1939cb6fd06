//! Schedules: the progressive temperature t per phase (the paper's exponential, and the
//! ablation shapes), and the learning rate (warm-up, then cosine or warm-up/stable/decay).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TSchedule {
    /// The paper's `t(c) = 1.3 e^{0.22 c} - 1.3`, constant within phase c = 1..P.
    Exp,
    /// Linear from t(1) to t(P) of the exponential schedule, per phase.
    Linear,
    /// Cosine ramp between the same end points, per phase.
    Cosine,
    /// The exponential evaluated at the fractional phase of every step (no jumps).
    Smooth,
}

/// The paper's exponential schedule at (possibly fractional) phase `c`.
pub fn exp_t(c: f64) -> f64 {
    1.3 * (0.22 * c).exp() - 1.3
}

impl TSchedule {
    /// t for a step at `progress` in [0, 1) through Stage 2, with `phases` phases (phase c
    /// = floor(progress * phases) + 1).
    pub fn t(self, progress: f64, phases: usize) -> f64 {
        let p = phases as f64;
        let c = (progress * p).floor().min(p - 1.0) + 1.0;
        // The per-phase shapes span the same range as the paper's 20-phase schedule,
        // stretched to `phases` phases.
        let c20 = 1.0 + (c - 1.0) * 19.0 / (p - 1.0).max(1.0);
        let (first, last) = (exp_t(1.0), exp_t(20.0));
        let frac = (c20 - 1.0) / 19.0;
        match self {
            TSchedule::Exp => exp_t(c20),
            TSchedule::Linear => first + (last - first) * frac,
            TSchedule::Cosine => {
                first + (last - first) * 0.5 * (1.0 - (std::f64::consts::PI * frac).cos())
            }
            TSchedule::Smooth => exp_t(1.0 + progress * 19.0 * p / (p - 1.0).max(1.0)).min(last),
        }
    }
}

/// The shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Cosine from the peak to the floor over every step after warm-up (the paper's).
    #[default]
    Cosine,
    /// Warm-up, stable at the peak, then a linear decay to the floor over the last
    /// `decay_fraction` of the steps.
    Wsd,
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then `shape`
/// from `peak` to `floor`.
pub fn learning_rate(
    shape: LrSchedule,
    step: usize,
    total: usize,
    warmup: usize,
    decay_fraction: f64,
    peak: f64,
    floor: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    match shape {
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        LrSchedule::Wsd => {
            let decay_steps = ((total as f64 * decay_fraction).round() as usize).max(1);
            let decay_start = total.saturating_sub(decay_steps).max(warmup);
            if step < decay_start {
                return peak;
            }
            let progress =
                ((step - decay_start + 1) as f64 / (total - decay_start).max(1) as f64).min(1.0);
            peak + (floor - peak) * progress
        }
    }
}

/// Learning rate of Stage-2 step `k` of `steps`, whose last `sign_steps` train the sign
/// form. With `--sign-lr` the sign stage restarts at that peak and decays by a cosine to
/// the floor, and the main schedule ends where the sign stage begins: a sign stage at the
/// tail of one cosine runs near the floor and can hardly move the signs it inherits.
pub fn stage2_learning_rate(
    config: &crate::config::ConvertConfig,
    k: usize,
    steps: usize,
    sign_steps: usize,
) -> f64 {
    let own_sign_stage = config.sign_lr.filter(|_| sign_steps > 0);
    let main_steps = match own_sign_stage {
        Some(_) => steps.saturating_sub(sign_steps),
        None => steps,
    };
    match own_sign_stage {
        Some(sign_peak) if k >= main_steps => learning_rate(
            LrSchedule::Cosine,
            k - main_steps,
            sign_steps,
            0,
            0.0,
            sign_peak,
            config.min_lr,
        ),
        _ => learning_rate(
            config.lr_schedule,
            k,
            main_steps,
            config.warmup_steps,
            config.decay_fraction,
            config.lr,
            config.min_lr,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_schedule_matches_the_paper() {
        // METHOD.md: t(1) = 0.32, t(10) = 10.4, t(20) = 104.6.
        assert!((exp_t(1.0) - 0.32).abs() < 0.005);
        assert!((exp_t(10.0) - 10.4).abs() < 0.05);
        assert!((exp_t(20.0) - 104.6).abs() < 0.05);
        assert_eq!(TSchedule::Exp.t(0.0, 20), exp_t(1.0));
        assert_eq!(TSchedule::Exp.t(0.999, 20), exp_t(20.0));
        assert_eq!(TSchedule::Exp.t(0.5, 20), exp_t(11.0));
    }

    #[test]
    fn ablation_schedules_share_the_end_points_and_increase() {
        for s in [
            TSchedule::Exp,
            TSchedule::Linear,
            TSchedule::Cosine,
            TSchedule::Smooth,
        ] {
            let ts: Vec<f64> = (0..200).map(|i| s.t(i as f64 / 200.0, 20)).collect();
            assert!(
                ts.windows(2).all(|w| w[1] >= w[0]),
                "{s:?} must not decrease"
            );
            assert!((ts[0] - exp_t(1.0)).abs() < 1e-9, "{s:?} starts at t(1)");
            assert!(
                (ts[199] - exp_t(20.0)).abs() < 1.0,
                "{s:?} ends near t(20): {}",
                ts[199]
            );
        }
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_the_floor() {
        let cos = |s| learning_rate(LrSchedule::Cosine, s, 100, 10, 0.2, 1e-4, 2e-6);
        assert!((cos(0) - 1e-5).abs() < 1e-12);
        assert!((cos(10) - 1e-4).abs() < 1e-12);
        assert!((cos(55) - (2e-6 + 0.5 * (1e-4 - 2e-6))).abs() < 1e-12);
        assert!((cos(100) - 2e-6).abs() < 1e-12);
    }

    #[test]
    fn wsd_holds_the_peak_then_decays_linearly_over_its_fraction() {
        let wsd = |s| learning_rate(LrSchedule::Wsd, s, 100, 10, 0.2, 1e-3, 1e-5);
        assert!((wsd(4) - 5e-4).abs() < 1e-15);
        for s in 10..80 {
            assert_eq!(wsd(s), 1e-3, "stable at step {s}");
        }
        // Steps 80..99 decay linearly; the last one reaches the floor.
        assert!((wsd(80) - (1e-3 + (1e-5 - 1e-3) / 20.0)).abs() < 1e-15);
        assert!((wsd(89) - (1e-3 + (1e-5 - 1e-3) * 0.5)).abs() < 1e-15);
        assert!((wsd(99) - 1e-5).abs() < 1e-15);
        let steps: Vec<f64> = (80..100).map(wsd).collect();
        assert!(steps.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn the_sign_stage_restarts_at_its_own_rate_only_when_asked() {
        use crate::config::{ConvertConfig, Preset};
        let mut c = ConvertConfig::preset(
            Preset::Quality,
            "m".into(),
            vec!["d".into()],
            crate::method::Method::Binaryllm,
        );
        let (steps, sign_steps) = (100, 10);
        let lr = |c: &ConvertConfig, k| stage2_learning_rate(c, k, steps, sign_steps);
        // Unset: one cosine over all 100 steps, the sign stage at its tail.
        for k in 0..steps {
            let one = learning_rate(c.lr_schedule, k, steps, 0, 0.2, c.lr, c.min_lr);
            assert_eq!(lr(&c, k), one, "step {k}");
        }
        c.sign_lr = Some(5e-4);
        // The main cosine reaches the floor at step 90, where the sign stage restarts.
        assert_eq!(lr(&c, 0), c.lr);
        let main_end = learning_rate(c.lr_schedule, 89, 90, 0, 0.2, c.lr, c.min_lr);
        assert_eq!(lr(&c, 89), main_end);
        assert!(lr(&c, 89) < 1e-5, "the main schedule ends near the floor");
        assert_eq!(lr(&c, 90), 5e-4);
        let tail: Vec<f64> = (90..steps).map(|k| lr(&c, k)).collect();
        assert!(tail.windows(2).all(|w| w[1] < w[0]), "{tail:?}");
        assert!(tail[9] > c.min_lr && tail[9] < 2e-5, "{}", tail[9]);
        // No sign stage: the switch changes nothing.
        for k in 0..steps {
            let one = learning_rate(c.lr_schedule, k, steps, 0, 0.2, c.lr, c.min_lr);
            assert_eq!(stage2_learning_rate(&c, k, steps, 0), one);
        }
    }
}
