//! The HTTP routes: what each path accepts, the checks that turn a request into a [`Job`]
//! (each refusal with OpenAI's error body and status), and the answer, whole or as
//! server-sent events.
//!
//! | route | |
//! |---|---|
//! | `GET /health` | liveness and how many sequences run and wait (no API key needed) |
//! | `GET /v1/models` | the one model served |
//! | `POST /v1/completions` | text completion of a prompt |
//! | `POST /v1/chat/completions` | a chat turn, rendered with the model's chat template |

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use binllm_format::chat::{self, ChatMessage};
use binllm_format::TextTokenizer;
use binllm_infer::sampling::SamplingParams;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::api::{self, ChatRequest, CompletionRequest, GenerationSettings, ResponseHeader, Usage};
use crate::error::ApiError;
use crate::scheduler::SchedulerHandle;
use crate::sequence::{Event, Finish, Job};

/// What every handler reads.
pub struct AppState {
    /// The name clients ask for (`model` in a request).
    pub model_id: String,
    pub created: u64,
    pub api_key: Option<String>,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat_template: Option<String>,
    /// The model's context length.
    pub context: usize,
    pub scheduler: SchedulerHandle,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError::not_found("no such route; binllm serves /v1/models, /v1/completions, /v1/chat/completions and /health", "unknown_url")
        })
        .with_state(state)
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let counters = &state.scheduler.counters;
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "active_sequences": counters.active.load(Ordering::SeqCst),
        "waiting_requests": counters.waiting.load(Ordering::SeqCst),
        "max_sequences": state.scheduler.max_sequences,
        "decode_steps": counters.steps.load(Ordering::Relaxed),
        "sequence_steps": counters.sequence_steps.load(Ordering::Relaxed),
    }))
}

async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_api_key(&state, &headers)?;
    Ok(Json(api::model_list(&state.model_id, state.created)))
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let request: CompletionRequest = parse_body(&body)?;
    check_model(&state, request.model.as_deref())?;
    let prompt = request.prompt.ok_or_else(|| ApiError::missing("prompt"))?;
    let ids = completion_prompt(&state.tokenizer, &prompt)?;
    // OpenAI's default for completions.
    let settings = Settings::read(&request.settings, &state, ids.len(), "prompt", 16)?;
    let answer = submit(&state, ids, &settings)?;
    let header = response_header(&state, "cmpl");
    Ok(if settings.stream {
        stream_response(answer, header, Kind::Completion, settings.include_usage)
    } else {
        let (text, finish, usage) = collect(answer).await?;
        Json(api::completion(&header, &text, finish.as_str(), usage)).into_response()
    })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let request: ChatRequest = parse_body(&body)?;
    check_model(&state, request.model.as_deref())?;
    let messages = request
        .messages
        .ok_or_else(|| ApiError::missing("messages"))?;
    let ids = chat_prompt(&state, &messages)?;
    // A chat reply may run until the context is full (OpenAI's default: no limit).
    let room = state.context.saturating_sub(ids.len()).max(1);
    let settings = Settings::read(&request.settings, &state, ids.len(), "messages", room)?;
    let answer = submit(&state, ids, &settings)?;
    let header = response_header(&state, "chatcmpl");
    Ok(if settings.stream {
        stream_response(answer, header, Kind::Chat, settings.include_usage)
    } else {
        let (text, finish, usage) = collect(answer).await?;
        Json(api::chat_completion(&header, &text, finish.as_str(), usage)).into_response()
    })
}

fn check_api_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if given.trim() == key => Ok(()),
        Some(_) => Err(ApiError::unauthorized("incorrect API key provided")),
        None => Err(ApiError::unauthorized(
            "no API key provided: send 'Authorization: Bearer KEY'",
        )),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Parsed in two steps so that a body that is not JSON and a JSON body of the wrong shape
    // get different messages.
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON object",
            None,
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("the request does not fit the API: {e}"), None))
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::missing("model")),
        Some(m) if m == state.model_id => Ok(()),
        Some(m) => Err(ApiError::not_found(
            format!(
                "the model '{m}' does not exist; this server runs '{}'",
                state.model_id
            ),
            "model_not_found",
        )),
    }
}

/// The prompt of a completion request as token ids: a string (or a list of one), or ids.
fn completion_prompt(tokenizer: &TextTokenizer, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let encode = |text: &str| {
        tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e:#}")))
    };
    let ids = |values: &[Value]| -> Result<Vec<u32>, ApiError> {
        values
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .filter(|&id| (id as usize) < tokenizer.vocab_size())
                    .ok_or_else(|| {
                        ApiError::invalid("prompt", format!("{v} is not a token id of this model"))
                    })
            })
            .collect()
    };
    let ids = match prompt {
        Value::String(text) => encode(text)?,
        Value::Array(items) => match items.as_slice() {
            [Value::String(text)] => encode(text)?,
            [Value::Array(inner)] => ids(inner)?,
            items if items.iter().all(Value::is_number) => ids(items)?,
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "give one prompt per request (a string or a list of token ids)",
                ))
            }
        },
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "the prompt must be a string or a list of token ids",
            ))
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
    }
    Ok(ids)
}

/// The chat's messages rendered with the model's template (as `binllm run --chat` renders
/// them) and tokenized.
fn chat_prompt(state: &AppState, messages: &[api::ChatMessageIn]) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' is empty"));
    }
    let template = state.chat_template.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "this model has no chat template: use /v1/completions",
            Some("messages"),
        )
    })?;
    let messages = messages
        .iter()
        .map(|m| {
            Ok(ChatMessage::new(
                &m.role,
                &message_text(m.content.as_ref())?,
            ))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let tokenizer = &state.tokenizer;
    let token_text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    let text = chat::render(
        template,
        &messages,
        true,
        &token_text(tokenizer.bos_id),
        &token_text(tokenizer.eos_ids.first().copied()),
    )
    .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
    // A chat template writes its own BOS when it wants one.
    let ids = tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize the chat: {e:#}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the chat renders to no tokens",
        ));
    }
    Ok(ids)
}

/// A message's content: a string, null, or a list of `{"type": "text", "text": ...}` parts.
fn message_text(content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match (part.get("type"), part.get("text")) {
                (Some(t), Some(Value::String(text))) if t == "text" => Ok(text.as_str()),
                _ => Err(ApiError::invalid(
                    "messages",
                    "only text content parts are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        Some(_) => Err(ApiError::invalid(
            "messages",
            "a message's content must be a string or a list of text parts",
        )),
    }
}

/// A request's generation settings, checked.
struct Settings {
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl Settings {
    fn read(
        s: &GenerationSettings,
        state: &AppState,
        prompt_tokens: usize,
        prompt_param: &'static str,
        default_max_tokens: usize,
    ) -> Result<Self, ApiError> {
        let context = state.context;
        if prompt_tokens >= context {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad_request(
                    format!(
                        "the prompt has {prompt_tokens} tokens; this model's context is {context} tokens, and at least one must be left to generate"
                    ),
                    Some(prompt_param),
                )
            });
        }
        if let Some(n) = &s.n {
            if n.as_u64() != Some(1) {
                return Err(ApiError::invalid("n", "only n=1 is supported"));
            }
        }
        let (max_param, max_value) = match (&s.max_completion_tokens, &s.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v.as_ref()),
        };
        let max_tokens = match max_value {
            None | Some(Value::Null) => default_max_tokens,
            Some(v) => match v.as_u64() {
                Some(m) if m >= 1 && m as usize <= context => m as usize,
                _ => {
                    return Err(ApiError::invalid(
                        max_param,
                        format!("{max_param} must be an integer from 1 to the context length, {context}; got {v}"),
                    ))
                }
            },
        };
        let temperature = number(&s.temperature, "temperature", 1.0, 0.0..=2.0)?;
        let top_p = number(&s.top_p, "top_p", 1.0, 0.0..=1.0)?;
        if top_p <= 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be above 0"));
        }
        let seed = match &s.seed {
            None | Some(Value::Null) => fresh_seed(),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::invalid("seed", "seed must be an integer"))?,
        };
        let stop = match &s.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(stop)) => vec![stop.clone()],
            Some(Value::Array(stops)) if stops.len() <= 4 => stops
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::invalid("stop", "stop must be a string or a list of strings")
                })?,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stop",
                    "stop must be a string or a list of up to 4 strings",
                ))
            }
        };
        let stream = match &s.stream {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("stream", "stream must be true or false")),
        };
        Ok(Settings {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                seed,
                ..SamplingParams::default()
            },
            stop,
            stream,
            include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

/// A number setting, `default` when absent, refused outside `range`.
fn number(
    value: &Option<Value>,
    param: &'static str,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().filter(|x| range.contains(x)).ok_or_else(|| {
            ApiError::invalid(
                param,
                format!(
                    "{param} must be a number from {} to {}; got {v}",
                    range.start(),
                    range.end()
                ),
            )
        }),
    }
}

/// A seed for a request that gives none: different each time, as OpenAI's sampling is.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

fn response_header(state: &AppState, prefix: &str) -> ResponseHeader {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    ResponseHeader {
        id: format!(
            "{prefix}-{:x}{:06x}",
            state.created,
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_seconds(),
        model: state.model_id.clone(),
    }
}

fn submit(
    state: &AppState,
    prompt: Vec<u32>,
    settings: &Settings,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (events, answer) = unbounded_channel();
    state.scheduler.submit(Job {
        prompt,
        max_tokens: settings.max_tokens,
        sampling: settings.sampling.clone(),
        stop: settings.stop.clone(),
        events,
    })?;
    Ok(answer)
}

/// Waits for the whole completion.
async fn collect(
    mut answer: UnboundedReceiver<Event>,
) -> Result<(String, Finish, Usage), ApiError> {
    let mut text = String::new();
    while let Some(event) = answer.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done { finish, usage } => return Ok((text, finish, usage)),
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal(
        "the scheduler stopped before the completion ended",
    ))
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// The completion as server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`.
/// When the client goes away the body, and with it `answer`, is dropped: the scheduler sees
/// the closed channel and frees the sequence before its next step.
fn stream_response(
    answer: UnboundedReceiver<Event>,
    header: ResponseHeader,
    kind: Kind,
    include_usage: bool,
) -> Response {
    let first = match kind {
        // OpenAI's first chat chunk names the role.
        Kind::Chat => Some(sse(&api::chat_chunk(
            &header,
            json!({"role": "assistant", "content": ""}),
            None,
        ))),
        Kind::Completion => None,
    };
    let events = UnboundedReceiverStream::new(answer).map(move |event| {
        let frame = match event {
            Event::Text(piece) => match kind {
                Kind::Completion => sse(&api::completion_chunk(&header, &piece, None)),
                Kind::Chat => sse(&api::chat_chunk(&header, json!({ "content": piece }), None)),
            },
            Event::Done { finish, usage } => {
                let (last, object) = match kind {
                    Kind::Completion => (
                        api::completion_chunk(&header, "", Some(finish.as_str())),
                        "text_completion",
                    ),
                    Kind::Chat => (
                        api::chat_chunk(&header, json!({}), Some(finish.as_str())),
                        "chat.completion.chunk",
                    ),
                };
                let mut frame = sse(&last);
                if include_usage {
                    frame.push_str(&sse(&api::usage_chunk(&header, object, usage)));
                }
                frame.push_str("data: [DONE]\n\n");
                frame
            }
            Event::Failed(message) => sse(&ApiError::internal(message).body()),
        };
        Ok::<_, Infallible>(frame)
    });
    let body = tokio_stream::iter(first.map(Ok::<_, Infallible>)).chain(events);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| {
            ApiError::internal(format!("cannot build the stream: {e}")).into_response()
        })
}
