//! Training losses: next-token cross-entropy (the paper's), knowledge distillation from the
//! frozen full-precision teacher (KL on temperature-softened logits), or a weighted mix;
//! computed on whole logits, or chunk by chunk over tokens with the LM head
//! ([`backward_chunked`]) so that the `[tokens, vocab]` logits never exist at once.

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
    /// Weight of the hidden-state term: the mean squared difference between the student's
    /// and the teacher's final (normalised) hidden states, added to the loss.
    pub hidden_weight: f64,
}

impl LossConfig {
    pub fn needs_teacher(&self) -> bool {
        self.distill != Distill::Ce || self.hidden_weight > 0.0
    }
}

/// `mean((student - teacher)^2)` over every token and dimension of the final hidden states.
pub fn hidden_state_loss(student: &Tensor, teacher: &Tensor) -> Tensor {
    let diff = at_least_f32(student) - at_least_f32(teacher);
    (&diff * &diff).mean(diff.kind())
}

/// `t` in f32, or f64 when it already is (so the f64 tests measure the formulas, not f32).
fn at_least_f32(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Double {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}

/// Mean next-token cross-entropy; logits `[b, t, v]`, targets `[b, t]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    at_least_f32(&logits.view([-1, vocab])).cross_entropy_loss::<Tensor>(
        &targets.view([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// `T^2 * mean_tokens KL(softmax(teacher/T) || softmax(student/T))` (Hinton et al.: the T^2
/// keeps gradient magnitudes comparable across temperatures).
pub fn distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let vocab = student.size()[2];
    let s = at_least_f32(&student.view([-1, vocab])) / temperature;
    let t = at_least_f32(&teacher.view([-1, vocab])) / temperature;
    let (s, t) = (s.log_softmax(-1, s.kind()), t.log_softmax(-1, t.kind()));
    let kl = (t.exp() * (&t - &s)).sum_dim_intlist(&[-1i64][..], false, t.kind());
    kl.mean(t.kind()) * (temperature * temperature)
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

/// The per-token losses of `training_loss`, summed (not averaged) over `[n, vocab]` logits.
fn summed_loss(
    config: &LossConfig,
    logits: &Tensor,
    targets: &Tensor,
    teacher: Option<&Tensor>,
) -> Tensor {
    let ce = || {
        at_least_f32(logits).cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, -100, 0.0)
    };
    let kd = |t: &Tensor| {
        let temperature = config.temperature;
        let s = at_least_f32(logits) / temperature;
        let t = at_least_f32(t) / temperature;
        let (s, t) = (s.log_softmax(-1, s.kind()), t.log_softmax(-1, t.kind()));
        (t.exp() * (&t - &s)).sum(t.kind()) * (temperature * temperature)
    };
    match (config.distill, teacher) {
        (Distill::Ce, _) => ce(),
        (Distill::Kd, Some(t)) => kd(t),
        (Distill::Mix, Some(t)) => ce() * config.ce_weight + kd(t) * (1.0 - config.ce_weight),
        (_, None) => panic!("distillation loss without teacher logits"),
    }
}

/// One micro-batch's loss and its whole backward pass, with the LM head applied and the
/// loss taken `chunk` tokens at a time: the `[tokens, vocab]` logits (6.4 GB in f32 for 32k
/// tokens of SmolLM2) never exist at once, forward or backward, and neither do the
/// teacher's. Gradients reach every parameter as `(training_loss(...) * scale).backward()`
/// would leave them; the loss value (unscaled, the mean over tokens) is returned.
pub fn backward_chunked(
    config: &LossConfig,
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    teacher: Option<(&Tensor, &Tensor)>,
    chunk: i64,
    scale: f64,
) -> Tensor {
    let (loss, hidden_grad) =
        head_and_loss_backward(config, hidden, head, targets, teacher, chunk, scale);
    backward_from(hidden, &hidden_grad, None);
    loss
}

/// The first half of [`backward_chunked`]: the head and loss of each chunk run forward and
/// backward at once against a detached copy of the final hidden states, which collects
/// their gradient (returned, beside the loss); the head's gradient is accumulated.
pub fn head_and_loss_backward(
    config: &LossConfig,
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    teacher: Option<(&Tensor, &Tensor)>,
    chunk: i64,
    scale: f64,
) -> (Tensor, Tensor) {
    let width = hidden.size()[2];
    let tokens = hidden.size()[0] * hidden.size()[1];
    let leaf = hidden
        .view([tokens, width])
        .detach()
        .set_requires_grad(true);
    let targets = targets.view([tokens]);
    let teacher_flat = teacher.map(|(h, w)| (h.view([tokens, width]), w));
    let mut total = Tensor::zeros([], (Kind::Double, hidden.device()));
    let mut start = 0;
    while start < tokens {
        let len = chunk.min(tokens - start);
        let logits = leaf.narrow(0, start, len).linear::<Tensor>(head, None);
        let teacher_logits = teacher_flat
            .as_ref()
            .map(|(h, w)| tch::no_grad(|| h.narrow(0, start, len).linear::<Tensor>(w, None)));
        let loss = summed_loss(
            config,
            &logits,
            &targets.narrow(0, start, len),
            teacher_logits.as_ref(),
        ) / tokens as f64;
        (&loss * scale).backward();
        total += loss.detach().to_kind(Kind::Double);
        start += len;
    }
    (
        total.to_kind(at_least_f32(hidden).kind()),
        leaf.grad().detach().view_as(hidden),
    )
}

/// The model's backward pass from the gradient of its final hidden states, plus that of
/// `extra` (a loss term on the hidden states themselves, already scaled):
/// d/dθ sum(hidden * g) = g^T dhidden/dθ.
pub fn backward_from(hidden: &Tensor, hidden_grad: &Tensor, extra: Option<&Tensor>) {
    let through_head = (hidden * hidden_grad).sum(hidden.kind());
    match extra {
        Some(term) => (through_head + term).backward(),
        None => through_head.backward(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_state_loss_is_the_mean_squared_difference() {
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).view([1, 2, 2]);
        let b = Tensor::from_slice(&[1.0f64, 0.0, 3.0, 7.0]).view([1, 2, 2]);
        // (0 + 4 + 0 + 9) / 4
        assert!((hidden_state_loss(&a, &b).double_value(&[]) - 3.25).abs() < 1e-15);
    }

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

    /// A two-matrix "model" (hidden = tanh(x A), tied or separate head) in f64: the chunked
    /// loss must leave the gradients the plain composition leaves, for every loss and for
    /// chunks that do not divide the token count.
    #[test]
    fn chunked_head_and_loss_match_the_plain_composition_in_f64() {
        let opts = (Kind::Double, tch::Device::Cpu);
        tch::manual_seed(5);
        let (b, t, d, v) = (3i64, 7i64, 6i64, 11i64);
        let x = Tensor::randn([b, t, d], opts);
        let y = Tensor::randint(v, [b, t], (Kind::Int64, tch::Device::Cpu));
        let teacher_hidden = Tensor::randn([b, t, d], opts);
        let teacher_head = Tensor::randn([v, d], opts);
        for (distill, hidden_weight) in [
            (Distill::Ce, 0.0),
            (Distill::Kd, 0.0),
            (Distill::Mix, 0.0),
            (Distill::Kd, 0.7),
        ] {
            let config = LossConfig {
                distill,
                temperature: 2.0,
                ce_weight: 0.3,
                hidden_weight,
            };
            // Each run draws the same parameters: the caller reseeds before it.
            let run = |chunk: Option<i64>| {
                let a = Tensor::randn([d, d], opts).set_requires_grad(true);
                let head = Tensor::randn([v, d], opts).set_requires_grad(true);
                let hidden = x.matmul(&a).tanh();
                let teacher = (distill != Distill::Ce).then_some((&teacher_hidden, &teacher_head));
                let hidden_term = (hidden_weight > 0.0)
                    .then(|| hidden_state_loss(&hidden, &teacher_hidden) * hidden_weight);
                let value = match chunk {
                    None => {
                        let logits = hidden.linear::<Tensor>(&head, None);
                        let t_logits = teacher.map(|(h, w)| h.linear::<Tensor>(w, None));
                        let loss = training_loss(&config, &logits, &y, t_logits.as_ref());
                        let loss = match &hidden_term {
                            Some(term) => loss + term,
                            None => loss,
                        };
                        (&loss * 0.5).backward();
                        loss.double_value(&[])
                    }
                    Some(c) => {
                        let (loss, grad) =
                            head_and_loss_backward(&config, &hidden, &head, &y, teacher, c, 0.5);
                        let extra = hidden_term.as_ref().map(|t| t * 0.5);
                        backward_from(&hidden, &grad, extra.as_ref());
                        loss.double_value(&[]) + hidden_term.map_or(0.0, |t| t.double_value(&[]))
                    }
                };
                (value, a.grad(), head.grad())
            };
            tch::manual_seed(9);
            let (plain, ga, gh) = run(None);
            for chunk in [1, 4, 21, 100] {
                tch::manual_seed(9);
                let (chunked, ca, ch) = run(Some(chunk));
                assert!(
                    (plain - chunked).abs() < 1e-12 * plain.abs().max(1.0),
                    "{distill:?} {chunk}: {plain} vs {chunked}"
                );
                let err = |p: &Tensor, q: &Tensor| {
                    (p - q).abs().max().double_value(&[]) / p.abs().max().double_value(&[])
                };
                assert!(
                    err(&ga, &ca) < 1e-12,
                    "{distill:?} chunk {chunk}: body gradient off by {}",
                    err(&ga, &ca)
                );
                assert!(
                    err(&gh, &ch) < 1e-12,
                    "{distill:?} chunk {chunk}: head gradient off by {}",
                    err(&gh, &ch)
                );
            }
        }
    }
}
