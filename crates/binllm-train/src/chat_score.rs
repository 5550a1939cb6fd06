//! The chat score on the libtorch engine, batched for the end of a conversion: the teacher's
//! greedy answers to the held-out prompts ([`binllm_eval::chat::held_out_prompts`]) become
//! the reference, and a model is scored by its perplexity on those answers and by whether
//! its own greedy answers end, without a loop, within the limit.
//!
//! The rules (what counts as ended, as a loop, which tokens are scored) are
//! `binllm_eval::chat`'s, which `binllm eval --tasks chat:FILE` applies one prompt at a time
//! on either engine; here the prompts go through together (left-padded), which is what
//! makes the score cheap enough to take at the end of every run.

use anyhow::{ensure, Result};
use binllm_eval::chat::{
    has_repetition_loop, held_out_prompts, ChatReference, ChatReferenceItem, ChatScore,
    CHAT_REFERENCE_FORMAT,
};
use binllm_format::{PretrainedModel, TextTokenizer};
use tch::{Kind, Tensor};

use crate::chat_data::render_prompt;
use crate::generate::{generate_batch, Continuation, Pick};
use crate::model::Llama;

/// New tokens allowed per answer, for the teacher and the scored model alike (fewer when
/// the model's context is shorter).
pub const MAX_ANSWER_TOKENS: usize = 192;

/// Sequences per forward pass when scoring answers (bounds the `[n, len, vocab]` logits).
const SCORE_BATCH: usize = 8;

/// The first `count` held-out prompts answered greedily by `teacher`.
pub fn build_reference(
    teacher: &Llama,
    pretrained: &PretrainedModel,
    source_model: &str,
    count: usize,
) -> Result<ChatReference> {
    let tokenizer = pretrained.tokenizer()?;
    let mut prompts = held_out_prompts();
    prompts.truncate(count.max(1));
    let prompt_ids = prompts
        .iter()
        .map(|p| render_prompt(pretrained, tokenizer, p))
        .collect::<Result<Vec<_>>>()?;
    // A model with a short context answers in what its context leaves.
    let longest = prompt_ids.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = MAX_ANSWER_TOKENS.min(
        teacher
            .config
            .max_position_embeddings
            .saturating_sub(longest),
    );
    ensure!(
        max_new > 0,
        "the held-out chat prompts ({longest} tokens) fill the model's context"
    );
    let answers = greedy_answers(teacher, &prompt_ids, tokenizer, max_new)?;
    let items = prompts
        .iter()
        .zip(prompt_ids)
        .zip(answers)
        .map(|((prompt, prompt_ids), answer)| {
            Ok(ChatReferenceItem {
                prompt: prompt.to_string(),
                prompt_ids,
                answer: tokenizer.decode(&answer.ids, true)?,
                answer_ids: answer.ids,
                ended: answer.ended,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ChatReference {
        format: CHAT_REFERENCE_FORMAT.to_string(),
        source_model: source_model.to_string(),
        max_new_tokens: max_new,
        stop_ids: tokenizer.eos_ids.clone(),
        items,
        teacher: None,
    })
}

fn greedy_answers(
    model: &Llama,
    prompts: &[Vec<u32>],
    tokenizer: &TextTokenizer,
    max_new: usize,
) -> Result<Vec<Continuation>> {
    let stop = &tokenizer.eos_ids;
    ensure!(!stop.is_empty(), "the tokenizer has no end-of-turn token");
    generate_batch(model, prompts, max_new, Pick::Greedy, stop, stop[0])
}

/// `model`'s chat score on `reference` (in the model's current weight form).
pub fn score(
    model: &Llama,
    reference: &ChatReference,
    tokenizer: &TextTokenizer,
) -> Result<ChatScore> {
    let nll = answer_nll(model, &reference.items)?;
    let prompts: Vec<Vec<u32>> = reference
        .items
        .iter()
        .map(|i| i.prompt_ids.clone())
        .collect();
    let answers = generate_batch(
        model,
        &prompts,
        reference.max_new_tokens,
        Pick::Greedy,
        &reference.stop_ids,
        reference.stop_ids.first().copied().unwrap_or(0),
    )?;
    let n = answers.len().max(1) as f64;
    let ended = answers.iter().filter(|a| a.ended).count() as f64;
    let loops = answers
        .iter()
        .filter(|a| has_repetition_loop(&a.ids))
        .count() as f64;
    let clean = answers
        .iter()
        .filter(|a| a.ended && !has_repetition_loop(&a.ids))
        .count() as f64;
    Ok(ChatScore {
        prompts: answers.len(),
        answer_nll: nll,
        answer_perplexity: nll.exp(),
        ended_share: ended / n,
        loop_share: loops / n,
        clean_share: clean / n,
        mean_answer_tokens: answers.iter().map(|a| a.ids.len()).sum::<usize>() as f64 / n,
        answers: answers
            .iter()
            .map(|a| tokenizer.decode(&a.ids, true))
            .collect::<Result<_>>()?,
    })
}

/// Mean negative log-likelihood per answer token (stop id included) of the reference
/// answers, each after its prompt: right-padded batches, so padding sees nothing real.
pub fn answer_nll(model: &Llama, items: &[ChatReferenceItem]) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in items.chunks(SCORE_BATCH) {
        let len = chunk
            .iter()
            .map(|i| i.prompt_ids.len() + i.answer_ids.len())
            .max()
            .unwrap_or(0);
        ensure!(len >= 2, "a chat reference item has no tokens");
        let mut ids = vec![0i64; chunk.len() * len];
        // 1 where position p's token is an answer token, scored from the output at p - 1.
        let mut scored = vec![0f32; chunk.len() * (len - 1)];
        for (r, item) in chunk.iter().enumerate() {
            ensure!(
                !item.prompt_ids.is_empty(),
                "a chat reference item has an empty prompt"
            );
            let tokens = item.prompt_ids.iter().chain(&item.answer_ids);
            for (p, &t) in tokens.enumerate() {
                ids[r * len + p] = t as i64;
            }
            let first = item.prompt_ids.len();
            for p in first..first + item.answer_ids.len() {
                scored[r * (len - 1) + p - 1] = 1.0;
            }
            count += item.answer_ids.len();
        }
        let ids = Tensor::from_slice(&ids)
            .view([chunk.len() as i64, len as i64])
            .to_device(device);
        let mask = Tensor::from_slice(&scored)
            .view([chunk.len() as i64, len as i64 - 1])
            .to_device(device);
        let inputs = ids.narrow(1, 0, len as i64 - 1);
        let targets = ids.narrow(1, 1, len as i64 - 1);
        let logprobs = model
            .forward(&inputs, None)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .gather(2, &targets.unsqueeze(2), false)
            .squeeze_dim(2);
        total -= (logprobs * mask).sum(Kind::Double).double_value(&[]);
    }
    ensure!(count > 0, "the chat reference has no answer tokens");
    Ok(total / count as f64)
}
