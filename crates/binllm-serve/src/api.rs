//! The OpenAI API's request and response bodies, as far as binllm serves them: what a client
//! sends to /v1/completions and /v1/chat/completions, and what it gets back, whole or as
//! server-sent chunks. Requests are read leniently (fields binllm does not use are ignored,
//! as OpenAI's own server ignores unknown ones); the checks that turn a request into
//! generation settings are in `routes.rs`, where each refusal gets its status.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// A string, a list of one string, a list of token ids, or a list of one list of ids.
    pub prompt: Option<Value>,
    #[serde(flatten)]
    pub settings: GenerationSettings,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(flatten)]
    pub settings: GenerationSettings,
}

/// A chat message as clients send it: `content` a string or a list of parts.
#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

/// The settings both endpoints share. Numbers are kept as JSON values until checked, so that a
/// wrong type is reported with the parameter's name rather than as a body that does not parse.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationSettings {
    pub max_tokens: Option<Value>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub n: Option<Value>,
    pub seed: Option<Value>,
    /// A string or a list of up to 4 strings.
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<Value>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `GET /v1/models`: the one model this server runs.
pub fn model_list(id: &str, created: u64) -> Value {
    serde_json::json!({
        "object": "list",
        "data": [{ "id": id, "object": "model", "created": created, "owned_by": "binllm" }],
    })
}

/// What a response is about: its id, time and model, the same in every chunk of a stream.
#[derive(Debug, Clone)]
pub struct ResponseHeader {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A whole `text_completion`.
pub fn completion(header: &ResponseHeader, text: &str, finish: &str, usage: Usage) -> Value {
    serde_json::json!({
        "id": header.id,
        "object": "text_completion",
        "created": header.created,
        "model": header.model,
        "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
        "usage": usage,
    })
}

/// One streamed piece of a `text_completion` (`finish` on the last).
pub fn completion_chunk(header: &ResponseHeader, text: &str, finish: Option<&str>) -> Value {
    serde_json::json!({
        "id": header.id,
        "object": "text_completion",
        "created": header.created,
        "model": header.model,
        "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
    })
}

/// A whole `chat.completion`.
pub fn chat_completion(header: &ResponseHeader, text: &str, finish: &str, usage: Usage) -> Value {
    serde_json::json!({
        "id": header.id,
        "object": "chat.completion",
        "created": header.created,
        "model": header.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": usage,
    })
}

/// One streamed `chat.completion.chunk`; `delta` is `{"role": ...}`, `{"content": ...}` or `{}`.
pub fn chat_chunk(header: &ResponseHeader, delta: Value, finish: Option<&str>) -> Value {
    serde_json::json!({
        "id": header.id,
        "object": "chat.completion.chunk",
        "created": header.created,
        "model": header.model,
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
    })
}

/// The chunk OpenAI sends last when `stream_options.include_usage` is set: no choices, the
/// usage.
pub fn usage_chunk(header: &ResponseHeader, object: &str, usage: Usage) -> Value {
    serde_json::json!({
        "id": header.id,
        "object": object,
        "created": header.created,
        "model": header.model,
        "choices": [],
        "usage": usage,
    })
}
