//! lm-evaluation-harness's multiple-choice metrics and their standard errors.

use serde::{Deserialize, Serialize};

/// Index of the first maximum, as `numpy.argmax` (ties go to the earlier choice).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// lm-eval's `mean_stderr`: the sample standard deviation (n - 1) over sqrt(n).
pub fn mean_stderr(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return f64::NAN;
    }
    let mu = mean(values);
    let var = values.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (n - 1) as f64;
    var.sqrt() / (n as f64).sqrt()
}

/// What one example's choices scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleScore {
    pub doc_id: usize,
    pub gold: usize,
    /// Sum of continuation token log-probabilities, one per choice.
    pub loglikelihoods: Vec<f64>,
    /// Every continuation token was the argmax.
    pub is_greedy: Vec<bool>,
    /// argmax of the log-likelihoods (acc).
    pub pred: usize,
    /// argmax of log-likelihood / choice length in characters (acc_norm).
    pub pred_norm: usize,
}

impl ExampleScore {
    /// `choice_chars`: lm-eval's `completion_len`, the length in characters (Unicode code
    /// points, Python's `len`) of each `doc_to_choice` string, without the target
    /// delimiter.
    pub fn new(
        doc_id: usize,
        gold: usize,
        loglikelihoods: Vec<f64>,
        is_greedy: Vec<bool>,
        choice_chars: &[usize],
    ) -> Self {
        let pred = argmax(&loglikelihoods);
        let normalised: Vec<f64> = loglikelihoods
            .iter()
            .zip(choice_chars)
            .map(|(ll, &n)| ll / n as f64)
            .collect();
        let pred_norm = argmax(&normalised);
        ExampleScore {
            doc_id,
            gold,
            loglikelihoods,
            is_greedy,
            pred,
            pred_norm,
        }
    }
}

/// A metric's value and standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
}

impl Estimate {
    pub fn of(samples: &[f64]) -> Self {
        Estimate {
            value: mean(samples),
            stderr: mean_stderr(samples),
        }
    }
}

/// acc and acc_norm over examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McMetrics {
    pub acc: Estimate,
    pub acc_norm: Estimate,
}

pub fn multiple_choice_metrics(examples: &[ExampleScore]) -> McMetrics {
    let hits = |f: fn(&ExampleScore) -> usize| -> Vec<f64> {
        examples
            .iter()
            .map(|e| if f(e) == e.gold { 1.0 } else { 0.0 })
            .collect()
    };
    McMetrics {
        acc: Estimate::of(&hits(|e| e.pred)),
        acc_norm: Estimate::of(&hits(|e| e.pred_norm)),
    }
}
