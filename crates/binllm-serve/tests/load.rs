//! A bounded load test: 16 clients at once, 4 requests each of 32 greedy tokens, half of them
//! streamed. Every answer must be complete and well-formed, and identical to what a lone
//! `binllm run` generates for the same prompt (the sequences were decoded in batches of up to
//! 16, with their own caches, at different positions).

mod common;

use std::collections::HashMap;
use std::time::Instant;

use binllm_format::tokenizer::StreamDecoder;
use binllm_infer::generate::{generate, GenerateOptions};
use binllm_infer::sampling::SamplingParams;
use binllm_infer::{KvCache, Model, RuntimeOptions};
use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 16;
const REQUESTS: usize = 4;
const MAX_TOKENS: usize = 32;

const OPENINGS: [&str; 8] = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the",
    "One day, a big bird",
    "Tom had a red ball.",
    "The sun was shining and",
    "Mom said to Sue,",
    "In the garden there was",
];

fn prompt(client: usize, request: usize) -> String {
    // Prompts of different lengths, so the batch holds sequences at different positions.
    let opening = OPENINGS[(client + request) % OPENINGS.len()];
    format!(
        "{opening}{}",
        " and then".repeat((client * REQUESTS + request) % 5)
    )
}

#[test]
fn sixteen_clients_get_what_a_lone_run_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = stories_packed(dir.path(), false);

    // What `binllm run --prompt P --max-tokens 32` prints after the prompt, per prompt.
    let (model, packed) = Model::load(
        &model_path,
        &RuntimeOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let tokenizer = packed.tokenizer().unwrap().unwrap();
    let mut expected: HashMap<String, (String, usize, usize)> = HashMap::new();
    for client in 0..CLIENTS {
        for request in 0..REQUESTS {
            let text = prompt(client, request);
            if expected.contains_key(&text) {
                continue;
            }
            let ids = tokenizer.encode(&text, true).unwrap();
            let mut decoder = StreamDecoder::new(&tokenizer);
            let mut out = String::new();
            let options = GenerateOptions {
                max_tokens: MAX_TOKENS,
                sampling: SamplingParams::default(),
                stop_tokens: tokenizer.eos_ids.clone(),
            };
            let mut cache = KvCache::new(&model.config);
            let stats = generate(&model, &mut cache, &ids, &options, |id| {
                if let Some(piece) = decoder.push(id)? {
                    out.push_str(&piece);
                }
                Ok(true)
            })
            .unwrap();
            expected.insert(text, (out, ids.len(), stats.generated_tokens));
        }
    }
    drop(model);

    let server = start(&model_path, |o| {
        o.max_sequences = CLIENTS;
        o.queue = CLIENTS;
    });
    let addr = server.addr();
    let started = Instant::now();
    let answers: Vec<(String, bool, Reply)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                scope.spawn(move || {
                    (0..REQUESTS)
                        .map(|request| {
                            let text = prompt(client, request);
                            let stream = (client + request) % 2 == 1;
                            let body = json!({"model": "stories", "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream});
                            (text, stream, post(addr, "/v1/completions", &body))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(answers.len(), CLIENTS * REQUESTS);
    let mut generated = 0;
    for (text, stream, reply) in &answers {
        assert_eq!(reply.status, 200, "{text:?}: {}", reply.body);
        let (want, prompt_tokens, want_tokens) = &expected[text];
        let (got, finish, usage) = if *stream {
            let events = reply.events();
            assert_eq!(
                events.last().map(String::as_str),
                Some("[DONE]"),
                "{text:?}"
            );
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let got: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            let finish = chunks.last().unwrap()["choices"][0]["finish_reason"].clone();
            (got, finish, None)
        } else {
            let body = reply.json();
            let got = body["choices"][0]["text"].as_str().unwrap().to_string();
            (
                got,
                body["choices"][0]["finish_reason"].clone(),
                Some(body["usage"].clone()),
            )
        };
        assert_eq!(&got, want, "{text:?} (stream {stream})");
        let want_finish = if *want_tokens == MAX_TOKENS {
            "length"
        } else {
            "stop"
        };
        assert_eq!(finish, want_finish, "{text:?}");
        if let Some(usage) = usage {
            assert_eq!(
                usage,
                json!({"prompt_tokens": prompt_tokens, "completion_tokens": want_tokens, "total_tokens": prompt_tokens + want_tokens})
            );
        }
        generated += want_tokens;
    }
    let h = health(addr);
    let mean_batch = h["sequence_steps"].as_f64().unwrap() / h["decode_steps"].as_f64().unwrap();
    eprintln!(
        "{} requests, {generated} tokens in {seconds:.2} s; {} decode steps, mean batch {mean_batch:.1}",
        answers.len(),
        h["decode_steps"]
    );
    assert!(mean_batch > 2.0, "the sequences were not batched: {h}");
    // Every sequence is let go (the last answers may arrive a moment before the count drops).
    wait_for_health(addr, std::time::Duration::from_secs(5), |h| {
        h["active_sequences"] == 0
    });
    server.stop().unwrap();
}
