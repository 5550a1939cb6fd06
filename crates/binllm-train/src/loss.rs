//! Training losses: next-token cross-entropy (the paper's), knowledge distillation from the
//! frozen full-precision teacher (KL on temperature-softened logits), or a weighted mix.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Distill {
    /// Cross-entropy against the data's next tokens.
    Ce,
    /// KL(teacher || student) on logits softened by the temperature.
    Kd,
    /// `ce_weight * CE + (1 - ce_weight) * KD`.
    Mix,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub distill: Distill,
    pub temperature: f64,
    pub ce_weight: f64,
}

impl LossConfig {
    pub fn needs_teacher(&self) -> bool {
        self.distill != Distill::Ce
    }
}

/// Mean next-token cross-entropy; logits `[b, t, v]`, targets `[b, t]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits
        .view([-1, vocab])
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(&targets.view([-1]), None, Reduction::Mean, -100, 0.0)
}

/// `T^2 * mean_tokens KL(softmax(teacher/T) || softmax(student/T))` (Hinton et al.: the T^2
/// keeps gradient magnitudes comparable across temperatures).
pub fn distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let vocab = student.size()[2];
    let s =
        (student.view([-1, vocab]).to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let t =
        (teacher.view([-1, vocab]).to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let kl = (t.exp() * (&t - &s)).sum_dim_intlist(&[-1i64][..], false, Kind::Float);
    kl.mean(Kind::Float) * (temperature * temperature)
}

pub fn training_loss(
    config: &LossConfig,
    logits: &Tensor,
    targets: &Tensor,
    teacher: Option<&Tensor>,
) -> Tensor {
    match (config.distill, teacher) {
        (Distill::Ce, _) => cross_entropy(logits, targets),
        (Distill::Kd, Some(t)) => distillation(logits, t, config.temperature),
        (Distill::Mix, Some(t)) => {
            cross_entropy(logits, targets) * config.ce_weight
                + distillation(logits, t, config.temperature) * (1.0 - config.ce_weight)
        }
        (_, None) => panic!("distillation loss without teacher logits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distillation_is_zero_for_identical_logits_and_matches_a_direct_kl() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).view([1, 2, 3]);
        let b = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 1.0, 1.0, -2.0]).view([1, 2, 3]);
        assert!(distillation(&a, &a, 2.0).double_value(&[]).abs() < 1e-7);
        // Direct float64 KL(p_b || p_a) at T = 1, averaged over the two positions.
        let (av, bv) = (
            [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]],
            [[0.0, 1.0, 2.0], [1.0, 1.0, -2.0f64]],
        );
        let softmax = |x: [f64; 3]| {
            let z: f64 = x.iter().map(|v| v.exp()).sum();
            x.map(|v| v.exp() / z)
        };
        let mut kl = 0.0;
        for i in 0..2 {
            let (p, q) = (softmax(bv[i]), softmax(av[i]));
            kl += (0..3).map(|j| p[j] * (p[j] / q[j]).ln()).sum::<f64>() / 2.0;
        }
        assert!((distillation(&a, &b, 1.0).double_value(&[]) - kl).abs() < 1e-6);
    }
}
