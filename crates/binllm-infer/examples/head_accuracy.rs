//! What a quantized LM head costs against another file of the same model (e.g. the f16 head):
//! the logits of every position of a text, their relative L2 error, how often the arg-max
//! token agrees, and each file's perplexity on the text.
//!
//!     cargo run --release -p binllm-infer --example head_accuracy -- REFERENCE.b1 OTHER.b1 TEXT [TOKENS [REFERENCE_HEAD_KERNEL OTHER_HEAD_KERNEL]]
//!
//! Both files must hold the same body (export the same sign model with different `--head`), or
//! be one file run with two head kernels (e.g. `portable` against `avx512-vnni`: int16 against
//! int8 activations).

use anyhow::{ensure, Context, Result};
use binllm_infer::{KvCache, Model, RuntimeOptions};

fn log_softmax_at(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    ensure!(
        args.len() >= 4,
        "usage: head_accuracy REFERENCE.b1 OTHER.b1 TEXT [TOKENS [REFERENCE_HEAD_KERNEL OTHER_HEAD_KERNEL]]"
    );
    let limit: usize = args.get(4).map_or(Ok(1024), |s| s.parse())?;
    let options = |i: usize| -> Result<RuntimeOptions> {
        Ok(RuntimeOptions {
            head_kernel: args
                .get(i)
                .map(|s| s.parse::<binllm_infer::DenseKernel>())
                .transpose()
                .map_err(anyhow::Error::msg)?,
            ..Default::default()
        })
    };
    let (reference, packed) = Model::load(args[1].as_ref(), &options(5)?)?;
    let (other, _) = Model::load(args[2].as_ref(), &options(6)?)?;
    let tokenizer = packed.tokenizer()?.context("the file has no tokenizer")?;
    let text = std::fs::read_to_string(&args[3])?;
    let mut ids = tokenizer.encode(&text, true)?;
    ids.truncate(limit);
    let vocab = reference.config.vocab_size;
    // Windows of at most 512 positions, each from an empty cache.
    let (mut diff, mut norm, mut agree, mut positions) = (0f64, 0f64, 0usize, 0usize);
    let (mut nll_ref, mut nll_other) = (0f64, 0f64);
    for window in ids.chunks(512) {
        let a = reference.forward_all(&mut KvCache::new(&reference.config), window)?;
        let b = other.forward_all(&mut KvCache::new(&other.config), window)?;
        for (t, (la, lb)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
            diff += la
                .iter()
                .zip(lb)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>();
            norm += la.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            agree += usize::from(argmax(la) == argmax(lb));
            positions += 1;
            if let Some(&next) = window.get(t + 1) {
                nll_ref -= log_softmax_at(la, next as usize);
                nll_other -= log_softmax_at(lb, next as usize);
            }
        }
    }
    let predicted = (positions - ids.len().div_ceil(512)) as f64;
    let label = |m: &Model| format!("{} ({})", m.head().label(), m.head().kernel().name());
    println!(
        "{} positions of {}: heads {} vs {}",
        positions,
        args[3],
        label(&reference),
        label(&other)
    );
    println!("relative L2 of the logits: {:.4e}", (diff / norm).sqrt());
    println!(
        "arg-max agreement: {agree}/{positions} ({:.2}%)",
        100.0 * agree as f64 / positions as f64
    );
    println!(
        "perplexity: {:.4} ({}) vs {:.4} ({})",
        (nll_ref / predicted).exp(),
        label(&reference),
        (nll_other / predicted).exp(),
        label(&other)
    );
    Ok(())
}
