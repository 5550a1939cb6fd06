//! Batched generation with left padding, the teacher chat data and the chat score, on CPU:
//! padding must change nothing a real token sees, the transcripts must be the model's own
//! template (checked against transformers' rendering of SmolLM2's), and the data must be
//! what the generator says it is.

mod common;

use binllm_format::{LoadOptions, PretrainedModel};
use binllm_infer::sampling::SamplingParams;
use binllm_train::chat_data::{
    after_turn_ids, generate_chat_data, prompts_from_documents, render_prompt, transcript,
    ChatSampling,
};
use binllm_train::generate::{generate, generate_batch, GenerateOptions, Pick};
use binllm_train::Llama;
use common::{repo_root, smollm2_gguf, stories260k};
use tch::{Device, Kind, Tensor};

fn tiny_chat_gguf() -> PretrainedModel {
    PretrainedModel::load(
        &repo_root().join("crates/binllm-format/tests/fixtures/gguf/tiny_llama.gguf"),
        &LoadOptions::default(),
    )
    .expect("the tiny GGUF fixture loads")
}

/// Greedy ids after `prompt`, one sequence alone, through the single-sequence generator.
fn greedy_alone(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let options = GenerateOptions {
        max_tokens: n,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop_tokens: Vec::new(),
    };
    let mut out = Vec::new();
    generate(model, prompt, &options, |id| {
        out.push(id);
        Ok(true)
    })
    .unwrap();
    out
}

#[test]
fn left_padded_batches_generate_what_each_prompt_generates_alone() {
    let pretrained = stories260k();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 403, 407, 261],
        vec![1, 9, 281, 285, 330, 268, 305, 299, 355, 271, 264],
        vec![1, 366],
    ];
    let batch = generate_batch(&model, &prompts, 24, Pick::Greedy, &[], 0).unwrap();
    for (prompt, got) in prompts.iter().zip(&batch) {
        assert!(!got.ended);
        assert_eq!(
            got.ids,
            greedy_alone(&model, prompt, 24),
            "prompt {prompt:?}"
        );
    }
    // The last-position logits of the padded prefill equal each prompt's own, to f32 noise.
    let _guard = tch::no_grad_guard();
    let width = 11;
    let mut ids = vec![0i64; 3 * width];
    let mut valid = vec![false; 3 * width];
    for (r, p) in prompts.iter().enumerate() {
        for (j, &t) in p.iter().enumerate() {
            ids[r * width + width - p.len() + j] = t as i64;
            valid[r * width + width - p.len() + j] = true;
        }
    }
    let mut cache = binllm_train::KvCache::padded(
        model.config.num_layers,
        Tensor::from_slice(&valid).view([3, width as i64]),
        width as i64,
    );
    let hidden = model.forward_hidden(
        &Tensor::from_slice(&ids).view([3, width as i64]),
        Some(&mut cache),
    );
    let padded = model.logits(&hidden.narrow(1, -1, 1));
    for (r, p) in prompts.iter().enumerate() {
        let alone = common::logits_of(&model, p);
        let vocab = model.config.vocab_size;
        let last = &alone[(p.len() - 1) * vocab..];
        let row = Vec::<f32>::try_from(padded.get(r as i64).flatten(0, -1)).unwrap();
        assert!(common::max_abs_diff(last, &row) < 1e-4, "row {r}");
    }
}

#[test]
fn batched_rows_stop_at_their_own_stop_token() {
    let pretrained = stories260k();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let prompts = vec![vec![1u32, 403, 407], vec![1u32, 366, 261, 9]];
    let free = generate_batch(&model, &prompts, 16, Pick::Greedy, &[], 0).unwrap();
    // Stop on the 5th id of row 0: row 0 must end right there; row 1 ends at its own first
    // occurrence of that id, if any, and otherwise runs to the limit.
    let stop = free[0].ids[4];
    let stopped = generate_batch(&model, &prompts, 16, Pick::Greedy, &[stop], 0).unwrap();
    for (f, s) in free.iter().zip(&stopped) {
        match f.ids.iter().position(|&id| id == stop) {
            Some(i) => {
                assert!(s.ended);
                assert_eq!(s.ids, f.ids[..=i]);
            }
            None => {
                assert!(!s.ended);
                assert_eq!(s.ids, f.ids);
            }
        }
    }
    assert_eq!(
        stopped[0].ids.len(),
        free[0].ids.iter().position(|&i| i == stop).unwrap() + 1
    );
}

/// Finished rows leave the batch (and the KV cache) every 8 steps once they are a quarter of
/// it: the rows that go on must continue exactly as in a batch that keeps everyone, and
/// each answer must come back to its own prompt.
#[test]
fn rows_dropped_from_the_batch_leave_the_others_unchanged() {
    let pretrained = stories260k();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 403, 407],
        vec![1, 366, 261, 9],
        vec![1, 9, 281, 285],
        vec![1, 330, 268],
        vec![1, 305, 299, 355],
        vec![1, 271, 264, 403, 407, 261],
    ];
    let steps = 40;
    let free = generate_batch(&model, &prompts, steps, Pick::Greedy, &[], 0).unwrap();
    // A stop id that ends at least two rows within the first 7 steps (so the check at step 8
    // drops them) and leaves at least one row running past step 16.
    let first = |row: &[u32], id: u32| row.iter().position(|&x| x == id);
    let candidates: std::collections::BTreeSet<u32> =
        free.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let stop = candidates
        .into_iter()
        .find(|&id| {
            let early = free
                .iter()
                .filter(|c| first(&c.ids, id).is_some_and(|i| i < 7))
                .count();
            let late = free
                .iter()
                .filter(|c| first(&c.ids, id).is_none_or(|i| i > 16))
                .count();
            early >= 2 && late >= 1
        })
        .expect("stories260K's greedy text has an id that ends rows early and late");
    let stopped = generate_batch(&model, &prompts, steps, Pick::Greedy, &[stop], 0).unwrap();
    for (r, (f, s)) in free.iter().zip(&stopped).enumerate() {
        match first(&f.ids, stop) {
            Some(i) => {
                assert!(s.ended, "row {r}");
                assert_eq!(s.ids, f.ids[..=i], "row {r}");
            }
            None => {
                assert!(!s.ended, "row {r}");
                assert_eq!(s.ids, f.ids, "row {r}");
            }
        }
    }
}

#[test]
fn sampling_keeps_to_the_nucleus() {
    let pretrained = stories260k();
    let model = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(3);
    let prompts = vec![vec![1u32, 403, 407]; 64];
    // top_p near 0 keeps only the most likely token: sampling becomes greedy.
    let narrow = Pick::Sample {
        temperature: 1.0,
        top_p: 1e-6,
    };
    let greedy = generate_batch(&model, &prompts[..1], 12, Pick::Greedy, &[], 0).unwrap();
    for row in generate_batch(&model, &prompts, 12, narrow, &[], 0).unwrap() {
        assert_eq!(row.ids, greedy[0].ids);
    }
    // The full distribution at temperature 1 gives different continuations.
    let wide = Pick::Sample {
        temperature: 1.0,
        top_p: 1.0,
    };
    let rows = generate_batch(&model, &prompts, 12, wide, &[], 0).unwrap();
    let distinct: std::collections::HashSet<_> = rows.iter().map(|r| r.ids.clone()).collect();
    assert!(
        distinct.len() > 8,
        "{} distinct continuations",
        distinct.len()
    );
}

#[test]
fn transcripts_are_smollm2s_own_chat_template() {
    let gguf = smollm2_gguf();
    assert!(
        gguf.exists(),
        "{} missing: run scripts/setup.sh",
        gguf.display()
    );
    let pretrained = PretrainedModel::load(&gguf, &LoadOptions::default()).expect("SmolLM2 loads");
    let tok = pretrained.tokenizer().unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo_root().join("crates/binllm-format/tests/fixtures/gguf/smollm2_tokenizer.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // transformers' apply_chat_template of one user message, with the generation prompt.
    let rendered = fixture["chats"]["user_only"]["rendered"].as_str().unwrap();
    let prompt = render_prompt(&pretrained, tok, "What is the capital of France?").unwrap();
    assert_eq!(prompt, tok.encode(rendered, false).unwrap());
    // A user turn and the assistant's answer, as transformers renders the conversation:
    // the transcript is that text up to the next generation prompt.
    let conversation = fixture["chats"]["user_assistant"]["rendered"]
        .as_str()
        .unwrap();
    let expected = conversation
        .strip_suffix("<|im_start|>assistant\n")
        .expect("the fixture ends with a generation prompt");
    let hi = render_prompt(&pretrained, tok, "Hi!").unwrap();
    let mut answer = tok.encode("Hello! How can I help?", false).unwrap();
    answer.push(tok.eos_ids[0]);
    let after = after_turn_ids(&pretrained, tok).unwrap();
    assert_eq!(tok.decode(&after, false).unwrap(), "\n");
    assert_eq!(
        transcript(&hi, &answer, &after),
        tok.encode(expected, false).unwrap()
    );
}

#[test]
fn chat_data_is_prompts_in_the_template_then_the_teachers_answers() {
    let pretrained = tiny_chat_gguf();
    let tok = pretrained.tokenizer().unwrap();
    let teacher = Llama::from_pretrained(&pretrained, Device::Cpu, Kind::Float).unwrap();
    let lead = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(4);
    let documents: Vec<String> = (0..30)
        .map(|i| {
            format!(
                "Topic {i}\n\n{lead}\n\nMore text about topic {i}, {}",
                "and more words ".repeat(12)
            )
        })
        .collect();
    let sampling = ChatSampling {
        temperature: 1.0,
        top_p: 1.0,
        max_answer_tokens: 48,
        batch: 8,
    };
    let (stream, report) =
        generate_chat_data(&teacher, &pretrained, &documents, 600, sampling, 5).unwrap();
    assert_eq!(report.tokens, stream.len());
    assert!(stream.len() >= 600);
    assert!(report.transcripts > 0);
    assert_eq!(
        report.prompts_tried,
        report.transcripts + report.dropped_unended + report.dropped_loops
    );
    // Cut the stream at end-of-turn ids: every piece is the rendered form of the next
    // prompt in draw order (skipping dropped ones) followed by a non-empty answer.
    let prompts =
        prompts_from_documents(&documents, 400, 5, &binllm_eval::chat::held_out_prompts());
    let rendered: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| render_prompt(&pretrained, tok, p).unwrap())
        .collect();
    let eos = tok.eos_ids[0];
    let after = after_turn_ids(&pretrained, tok).unwrap();
    let mut next = 0;
    let mut rest = &stream[..];
    let mut pieces = 0;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&t| t == eos)
            .expect("every transcript ends its turn");
        let piece = &rest[..end];
        let at = (next..rendered.len())
            .find(|&i| piece.starts_with(&rendered[i]) && piece.len() > rendered[i].len() - 1)
            .expect("each transcript starts with a rendered prompt, in draw order");
        next = at + 1;
        pieces += 1;
        rest = &rest[end + 1..];
        assert!(rest.starts_with(&after));
        rest = &rest[after.len()..];
    }
    assert_eq!(pieces, report.transcripts);
}
