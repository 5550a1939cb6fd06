//! acc / acc_norm / stderr arithmetic on hand-made scores.

use binllm_eval::metrics::{argmax, mean_stderr, multiple_choice_metrics, ExampleScore};

/// Three examples worked by hand.
///
/// ex 0: lls [-4, -6], chars [2, 6]: acc picks 0; per char [-2, -1] -> acc_norm picks 1.
/// ex 1: lls [-9, -3, -3], chars [3, 3, 1]: acc picks 1 (first of the tie, numpy.argmax);
///       per char [-3, -1, -3] -> 1.
/// ex 2: lls [-1, -2], chars [1, 10]: acc 0; per char [-1, -0.2] -> 1.
/// Golds 1, 1, 0: acc hits [0, 1, 1] = 2/3; acc_norm hits [1, 1, 0] = 2/3.
#[test]
fn acc_and_acc_norm_by_hand() {
    let examples = [
        ExampleScore::new(0, 1, vec![-4.0, -6.0], vec![false, false], &[2, 6]),
        ExampleScore::new(
            1,
            1,
            vec![-9.0, -3.0, -3.0],
            vec![false, true, false],
            &[3, 3, 1],
        ),
        ExampleScore::new(2, 0, vec![-1.0, -2.0], vec![true, false], &[1, 10]),
    ];
    assert_eq!(
        examples
            .iter()
            .map(|e| (e.pred, e.pred_norm))
            .collect::<Vec<_>>(),
        [(0, 1), (1, 1), (0, 1)]
    );
    let m = multiple_choice_metrics(&examples);
    assert!((m.acc.value - 2.0 / 3.0).abs() < 1e-15);
    assert!((m.acc_norm.value - 2.0 / 3.0).abs() < 1e-15);
    // Samples [0, 1, 1]: mean 2/3, sample variance ((4/9) + 2 (1/9)) / 2 = 1/3,
    // stderr = sqrt(1/3) / sqrt(3) = 1/3.
    assert!((m.acc.stderr - 1.0 / 3.0).abs() < 1e-15, "{}", m.acc.stderr);
    assert!((m.acc_norm.stderr - 1.0 / 3.0).abs() < 1e-15);
}

#[test]
fn argmax_takes_the_first_maximum() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    assert_eq!(argmax(&[-1.0]), 0);
    assert_eq!(argmax(&[-5.0, -5.0]), 0);
}

/// mean_stderr against a plain two-pass loop on pseudo-random 0/1 samples, and the
/// closed form for Bernoulli samples, sqrt(p (1 - p) / (n - 1)).
#[test]
fn mean_stderr_matches_an_independent_loop() {
    let mut state = 12345u64;
    let samples: Vec<f64> = (0..997)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33).is_multiple_of(3) as u8 as f64
        })
        .collect();
    let n = samples.len() as f64;
    let mut sum = 0.0;
    for s in &samples {
        sum += s;
    }
    let mu = sum / n;
    let mut ss = 0.0;
    for s in &samples {
        ss += (s - mu) * (s - mu);
    }
    let expected = (ss / (n - 1.0)).sqrt() / n.sqrt();
    assert!((mean_stderr(&samples) - expected).abs() < 1e-15);
    assert!((expected - (mu * (1.0 - mu) / (n - 1.0)).sqrt()).abs() < 1e-12);
    assert!(
        mean_stderr(&[1.0]).is_nan(),
        "one sample has no standard error"
    );
}
