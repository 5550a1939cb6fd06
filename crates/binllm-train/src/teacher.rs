//! `--data teacher:N`: training text sampled from the full-precision model itself, for
//! data-free conversion (as LLM-QAT and OneBit do). Each sequence starts from a random
//! token and continues by sampling the model's own distribution (temperature 1).

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::model::{KvCache, Llama};

/// About `tokens` tokens of model-generated text, sequences of `seq_len` separated by `eos`.
pub fn sample_tokens(
    model: &Llama,
    tokens: usize,
    seq_len: usize,
    batch: usize,
    eos: u32,
    seed: i64,
) -> Result<Vec<u32>> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(seed);
    let vocab = model.config.vocab_size as i64;
    let rounds = tokens.div_ceil(seq_len * batch).max(1);
    let progress =
        binllm_progress::Progress::new((rounds * seq_len) as u64, "sampling teacher data");
    let mut out = Vec::with_capacity(rounds * batch * (seq_len + 1));
    for _ in 0..rounds {
        let mut cache = KvCache::new(model.config.num_layers);
        let mut current = Tensor::randint(vocab, [batch as i64, 1], (Kind::Int64, model.device()));
        let mut columns = vec![current.shallow_clone()];
        for _ in 1..seq_len {
            let logits = model
                .forward(&current, Some(&mut cache))
                .select(1, -1)
                .to_kind(Kind::Float);
            current = logits.softmax(-1, Kind::Float).multinomial(1, true);
            columns.push(current.shallow_clone());
            progress.inc(1);
        }
        let sequences = Tensor::cat(&columns, 1).to_device(tch::Device::Cpu);
        let ids = Vec::<i64>::try_from(sequences.flatten(0, -1))?;
        for row in ids.chunks(seq_len) {
            out.extend(row.iter().map(|&i| i as u32));
            out.push(eos);
        }
    }
    progress.finish_and_clear();
    Ok(out)
}
