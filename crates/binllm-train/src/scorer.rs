//! The libtorch engine behind `binllm eval`'s scoring trait: batched log-probabilities of
//! tokens given their prefixes, and greedy answers (the chat benchmark), on CPU or CUDA.

use anyhow::Result;
use binllm_eval::{LanguageModel, ScoreRequest, TokenScore};
use binllm_format::TextTokenizer;
use tch::{Kind, Tensor};

use crate::model::Llama;

pub struct TorchScorer {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// Padded tokens per forward pass (bounds the `[batch, len, vocab]` log-softmax).
    pub max_batch_tokens: usize,
}

impl TorchScorer {
    pub fn new(model: Llama, tokenizer: TextTokenizer) -> Self {
        let max_batch_tokens = if model.device().is_cuda() {
            16384
        } else {
            4096
        };
        TorchScorer {
            model,
            tokenizer,
            max_batch_tokens,
        }
    }

    /// Scores requests of similar length in one right-padded forward pass. Padding sits
    /// after every real token, so under causal attention it changes nothing they see.
    fn score_padded(&self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>> {
        let _guard = tch::no_grad_guard();
        let len = batch.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; batch.len() * len];
        for (i, r) in batch.iter().enumerate() {
            for (j, &t) in r.tokens.iter().enumerate() {
                ids[i * len + j] = t as i64;
            }
        }
        let device = self.model.device();
        let ids = Tensor::from_slice(&ids)
            .view([batch.len() as i64, len as i64])
            .to_device(device);
        let inputs = ids.narrow(1, 0, len as i64 - 1);
        let targets = ids.narrow(1, 1, len as i64 - 1);
        let logits = self.model.forward(&inputs, None).to_kind(Kind::Float);
        let logprobs = logits
            .log_softmax(-1, Kind::Float)
            .gather(2, &targets.unsqueeze(2), false)
            .squeeze_dim(2);
        let greedy = logits.argmax(-1, false).eq_tensor(&targets);
        let logprobs = Vec::<f32>::try_from(logprobs.to_device(tch::Device::Cpu).flatten(0, -1))?;
        let greedy = Vec::<bool>::try_from(greedy.to_device(tch::Device::Cpu).flatten(0, -1))?;
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // Position p of the sequence is predicted at output p - 1.
                (r.score_from..r.tokens.len())
                    .map(|p| TokenScore {
                        logprob: logprobs[i * (len - 1) + p - 1],
                        is_greedy: greedy[i * (len - 1) + p - 1],
                    })
                    .collect()
            })
            .collect())
    }
}

impl LanguageModel for TorchScorer {
    fn max_context(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn preferred_batch(&self) -> usize {
        256
    }

    fn score(&mut self, batch: &[ScoreRequest]) -> Result<Vec<Vec<TokenScore>>> {
        // Cut the batch into passes whose padded size stays under the token budget.
        let mut out = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            let mut end = start + 1;
            let mut longest = batch[start].tokens.len();
            while end < batch.len()
                && (end + 1 - start) * longest.max(batch[end].tokens.len()) <= self.max_batch_tokens
            {
                longest = longest.max(batch[end].tokens.len());
                end += 1;
            }
            out.extend(self.score_padded(&batch[start..end])?);
            start = end;
        }
        Ok(out)
    }

    fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        // The packed engine's options and stopping rule, so both give the same answers.
        let options = binllm_infer::generate::greedy_options(max_new_tokens);
        let mut answer = Vec::new();
        if max_new_tokens > 0 {
            crate::generate::generate(&self.model, prompt, &options, |id| {
                answer.push(id);
                Ok(!stop.contains(&id))
            })?;
        }
        Ok(answer)
    }
}
