//! `binllm serve` driven with raw HTTP on a packed stories260K: the routes, whole and streamed
//! answers, every refusal's status and body, a client leaving mid-stream, a full queue.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use binllm_format::packed::PackedModel;
use binllm_format::tokenizer::StreamDecoder;
use binllm_infer::generate::{generate, GenerateOptions};
use binllm_infer::sampling::SamplingParams;
use binllm_infer::{KvCache, Model, RuntimeOptions};
use common::*;
use serde_json::{json, Value};

const PROMPT: &str = "Once upon a time, there was a little girl named Lily.";

/// What `binllm run --prompt` prints after the prompt, greedy, and the tokens it generated.
fn run_greedy(model: &std::path::Path, ids: &[u32], max_tokens: usize) -> (String, usize) {
    let (model, packed) = Model::load(
        model,
        &RuntimeOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let tokenizer = packed.tokenizer().unwrap().unwrap();
    let mut decoder = StreamDecoder::new(&tokenizer);
    let mut text = String::new();
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop_tokens: tokenizer.eos_ids.clone(),
    };
    let mut cache = KvCache::new(&model.config);
    let stats = generate(&model, &mut cache, ids, &options, |id| {
        if let Some(piece) = decoder.push(id)? {
            text.push_str(&piece);
        }
        Ok(true)
    })
    .unwrap();
    (text, stats.generated_tokens)
}

fn tokenizer_of(model: &std::path::Path) -> binllm_format::TextTokenizer {
    PackedModel::read(model)
        .unwrap()
        .tokenizer()
        .unwrap()
        .unwrap()
}

#[test]
fn models_health_and_completions_whole_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), false);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let id = server.model_id().to_string();
    assert_eq!(id, "stories");

    let h = health(addr);
    assert_eq!(
        (h["status"].as_str(), h["active_sequences"].as_u64()),
        (Some("ok"), Some(0))
    );
    let models = get(addr, "/v1/models");
    assert_eq!(models.status, 200);
    let models = models.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], id);
    assert_eq!(models["data"][0]["object"], "model");

    // Whole: the text `binllm run` prints, and the token counts.
    let ids = tokenizer_of(&model).encode(PROMPT, true).unwrap();
    let (expected, generated) = run_greedy(&model, &ids, 40);
    let request = json!({"model": id, "prompt": PROMPT, "max_tokens": 40, "temperature": 0});
    let reply = post(addr, "/v1/completions", &request);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], id);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"].as_str().unwrap(), expected);
    let finish = if generated == 40 { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": ids.len(), "completion_tokens": generated, "total_tokens": ids.len() + generated})
    );

    // Streamed: the same text in chunks, a last chunk with the finish reason, usage, [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let reply = post(addr, "/v1/completions", &streamed);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{events:?}");
    let (usage, pieces) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], body["usage"]);
    let mut text = String::new();
    for (i, chunk) in pieces.iter().enumerate() {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], pieces[0]["id"]);
        let last = i + 1 == pieces.len();
        let want_finish = if last { json!(finish) } else { Value::Null };
        assert_eq!(chunk["choices"][0]["finish_reason"], want_finish, "{chunk}");
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, expected);

    // A stop string cuts the text before it, finish "stop".
    let cut = expected
        .char_indices()
        .nth(expected.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = expected[cut..].chars().take(3).collect();
    let want = &expected[..expected.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut request = request.clone();
        request["stop"] = json!([stop, "never appears"]);
        request["stream"] = json!(stream);
        let reply = post(addr, "/v1/completions", &request);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let (text, finish) = if stream {
            let events = reply.events();
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
                .collect();
            (
                text,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let body = reply.json();
            (
                body["choices"][0]["text"].as_str().unwrap().to_string(),
                body["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, want, "stop {stop:?}, stream {stream}");
        assert_eq!(finish, "stop");
    }

    // Seeded sampling repeats; a list of token ids is a prompt too.
    let sampled = json!({"model": id, "prompt": ids, "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 7});
    let a = post(addr, "/v1/completions", &sampled).json();
    let b = post(addr, "/v1/completions", &sampled).json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["usage"]["prompt_tokens"], ids.len());
    server.stop().unwrap();
}

#[test]
fn chat_whole_and_streamed_use_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), false);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let messages = json!([
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "a cat."}]},
    ]);
    let rendered = "<|system|>You tell stories.\n<|user|>Tell me about a cat.\n<|assistant|>";
    let ids = tokenizer_of(&model).encode(rendered, false).unwrap();
    let (expected, generated) = run_greedy(&model, &ids, 30);
    let request = json!({"model": "stories", "messages": messages, "max_completion_tokens": 30, "temperature": 0, "n": 1});
    let reply = post(addr, "/v1/chat/completions", &request);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str().unwrap(),
        expected
    );
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    assert_eq!(body["usage"]["completion_tokens"], generated);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let reply = post(addr, "/v1/chat/completions", &streamed);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(
        last["choices"][0]["finish_reason"],
        body["choices"][0]["finish_reason"]
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    server.stop().unwrap();
}

#[test]
fn refusals_have_openai_error_bodies_and_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), false);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let context = PackedModel::read(&model)
        .unwrap()
        .config
        .max_position_embeddings;
    let long_prompt = "the cat sat on the mat. ".repeat(context);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{\"model\": ".into(), 400, None),
        ("/v1/completions", "[1, 2]".into(), 400, None),
        (
            "/v1/completions",
            json!({"prompt": "Hi"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories"}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories", "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "Hi"}).to_string(),
            404,
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}).to_string(),
            404,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories", "messages": [{"role": "user", "content": long_prompt}]})
                .to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "max_tokens": context + 1}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "max_tokens": -3}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "max_tokens": "ten"}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "n": 2}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "temperature": 3}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Hi", "stop": 5}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": ["a", "b"]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": [1, 99999]}).to_string(),
            400,
            Some("prompt"),
        ),
        ("/v1/nothing", json!({}).to_string(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let reply = request(addr, "POST", path, &[], &body);
        let shown: String = body.chars().take(80).collect();
        assert_eq!(reply.status, status, "{path} {shown}: {}", reply.body);
        let error = reply.error();
        assert_eq!(error["param"].as_str(), param, "{path} {shown}: {error}");
        if status == 400 {
            assert_eq!(error["type"], "invalid_request_error");
        }
    }
    // Too long for the context: OpenAI's code for it.
    let reply = post(
        addr,
        "/v1/completions",
        &json!({"model": "stories", "prompt": long_prompt}),
    );
    assert_eq!(reply.error()["code"], "context_length_exceeded");
    assert_eq!(
        post(
            addr,
            "/v1/completions",
            &json!({"model": "stories", "prompt": "Hi", "max_tokens": 2})
        )
        .status,
        200
    );
    server.stop().unwrap();

    // With an API key: none or a wrong one is 401 on /v1/ (not on /health).
    let server = start(&model, |o| o.api_key = Some("sesame".into()));
    let addr = server.addr();
    let body = json!({"model": "stories", "prompt": "Hi", "max_tokens": 2}).to_string();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer open")],
        vec![("Authorization", "sesame")],
    ] {
        for (method, path, body) in [
            ("POST", "/v1/completions", body.as_str()),
            ("GET", "/v1/models", ""),
        ] {
            let reply = request(addr, method, path, &headers, body);
            assert_eq!(reply.status, 401, "{headers:?} {path}: {}", reply.body);
            assert_eq!(reply.error()["code"], "invalid_api_key");
        }
    }
    let key = [("Authorization", "Bearer sesame")];
    assert_eq!(
        request(addr, "POST", "/v1/completions", &key, &body).status,
        200
    );
    assert_eq!(request(addr, "GET", "/v1/models", &key, "").status, 200);
    assert_eq!(get(addr, "/health").status, 200);
    server.stop().unwrap();
}

/// Opens a stream on the endless model and reads until `events` data events came.
fn open_stream(addr: std::net::SocketAddr, events: usize) -> BufReader<std::net::TcpStream> {
    let body = json!({"model": "stories-endless", "prompt": PROMPT, "max_tokens": 1_000_000, "stream": true, "temperature": 0});
    let stream = send(addr, "POST", "/v1/completions", &[], &body.to_string());
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    let mut seen = 0;
    while seen < events {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
        if line.contains("data: ") {
            seen += 1;
        }
    }
    reader
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_sequence_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), true);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let reader = open_stream(addr, 5);
    let h = health(addr);
    assert_eq!(h["active_sequences"], 1, "{h}");
    drop(reader);
    // Freed within moments (it would otherwise decode for minutes), and no step runs after.
    let h = wait_for_health(addr, Duration::from_secs(5), |h| h["active_sequences"] == 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(health(addr)["decode_steps"], h["decode_steps"]);
    // The server still serves.
    let reply = post(
        addr,
        "/v1/completions",
        &json!({"model": "stories-endless", "prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
    server.stop().unwrap();
}

#[test]
fn beyond_the_slots_requests_wait_then_a_full_queue_gets_429() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), true);
    let server = start(&model, |o| {
        o.max_sequences = 1;
        o.queue = 1;
    });
    let addr = server.addr();
    let running = open_stream(addr, 2);
    // The second waits in the queue (its response has not started).
    let waiting = send(
        addr,
        "POST",
        "/v1/completions",
        &[],
        &json!({"model": "stories-endless", "prompt": "Hi", "max_tokens": 3}).to_string(),
    );
    wait_for_health(addr, Duration::from_secs(5), |h| h["waiting_requests"] == 1);
    let refused = post(
        addr,
        "/v1/completions",
        &json!({"model": "stories-endless", "prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.error()["type"], "rate_limit_error");
    // Once the first leaves, the waiting one runs to its end.
    drop(running);
    let reply = read_reply(waiting);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
    server.stop().unwrap();
}

#[test]
fn a_client_that_leaves_before_a_whole_answer_frees_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), true);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let body = json!({"model": "stories-endless", "prompt": PROMPT, "max_tokens": 1_000_000, "temperature": 0});
    let stream = send(addr, "POST", "/v1/completions", &[], &body.to_string());
    wait_for_health(addr, Duration::from_secs(5), |h| h["active_sequences"] == 1);
    drop(stream);
    wait_for_health(addr, Duration::from_secs(5), |h| h["active_sequences"] == 0);
    server.stop().unwrap();
}

#[test]
fn stopping_lets_a_stream_in_flight_finish_then_refuses_connections() {
    let dir = tempfile::tempdir().unwrap();
    let model = stories_packed(dir.path(), true);
    let server = start(&model, |_| {});
    let addr = server.addr();
    let body = json!({"model": "stories-endless", "prompt": PROMPT, "max_tokens": 400, "stream": true, "temperature": 0});
    let stream = send(addr, "POST", "/v1/completions", &[], &body.to_string());
    wait_for_health(addr, Duration::from_secs(5), |h| h["active_sequences"] == 1);
    let stopping = std::thread::spawn(move || server.stop());
    let reply = read_reply(stream);
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    stopping.join().unwrap().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err());
}
