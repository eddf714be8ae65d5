//! OpenAI's API, as the `openai` library calls it: `/v1/models`, `/v1/chat/completions` and
//! `/v1/completions` (also without the `/v1` prefix), whole or streamed as server-sent events
//! ending with `data: [DONE]`; errors as `{"error": {"message", "type", "code"}}`.

use std::convert::Infallible;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use phi3d_proto::v1::{
    ChatEvent, ChatRequest, GenerationOptions, Message, Role, StopReason, ToolCall, ToolChoice, ToolOptions, chat_event,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{Api, ApiError, HttpState, unix_now};
use crate::auth::Client;

/// The body parsing and mapping, callable without a server, for the fuzz tests.
#[doc(hidden)]
pub mod fuzzing;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
}

/// OpenAI's `error.type` for an HTTP status.
pub(super) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// OpenAI's `error.code` for an HTTP status.
pub(super) fn error_code(status: StatusCode) -> Value {
    match status.as_u16() {
        401 => json!("invalid_api_key"),
        429 => json!("rate_limit_exceeded"),
        _ => Value::Null,
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(Api::OpenAi, StatusCode::BAD_REQUEST, message)
}

async fn models(State(state): State<HttpState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": state.model_name, "object": "model", "created": unix_now(), "owned_by": "phi3d" }],
    }))
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<OpenAiMessage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize, Default)]
struct Sampling {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<OpenAiToolCall>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiToolCall {
    id: String,
    function: OpenAiFunction,
}

#[derive(Deserialize)]
struct OpenAiFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

impl Sampling {
    fn options(&self) -> Result<GenerationOptions, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n: phi3d generates one choice per request; leave n out or set it to 1"));
        }
        let stop = super::stop_strings(Api::OpenAi, "stop", self.stop.as_ref())?;
        Ok(GenerationOptions {
            max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(0),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|seed| seed as u64),
            stop,
            json_schema: json_schema(self.response_format.as_ref())?,
            ..GenerationOptions::default()
        })
    }
}

/// `response_format`: `text`, `json_object` (any JSON object) or `json_schema`, as phi3d's
/// `json_schema`.
fn json_schema(format: Option<&Value>) -> Result<String, ApiError> {
    let Some(format) = format.filter(|format| !format.is_null()) else { return Ok(String::new()) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(String::new()),
        Some("json_object") => Ok(r#"{"type":"object"}"#.to_owned()),
        Some("json_schema") => match format.pointer("/json_schema/schema") {
            Some(schema) => Ok(schema.to_string()),
            None => Err(invalid("response_format.json_schema.schema is missing: give the JSON schema the reply must follow")),
        },
        other => Err(invalid(format!(
            "response_format.type must be one of text, json_object, json_schema, got {}",
            other.map_or_else(|| "nothing".to_owned(), |kind| format!("`{kind}`"))
        ))),
    }
}

/// Message content: a string, or a list of parts of which the text ones count.
fn text_of(index: usize, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(part.get("text").and_then(Value::as_str).unwrap_or_default().to_owned()),
                other => Err(invalid(format!(
                    "messages[{index}].content: part type `{}` is not supported; phi3d reads text",
                    other.unwrap_or("?")
                ))),
            })
            .collect(),
        Some(other) => Err(invalid(format!("messages[{index}].content must be a string or a list of parts, got {other}"))),
    }
}

fn messages(body: &[OpenAiMessage]) -> Result<Vec<Message>, ApiError> {
    body.iter()
        .enumerate()
        .map(|(index, message)| {
            let role = match message.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => return Err(invalid(format!("messages[{index}].role `{other}` is not supported"))),
            };
            Ok(Message {
                role: role as i32,
                content: text_of(index, message.content.as_ref())?,
                tool_calls: message
                    .tool_calls
                    .iter()
                    .map(|call| ToolCall {
                        id: call.id.clone(),
                        name: call.function.name.clone(),
                        arguments_json: call.function.arguments.clone(),
                        client_side: true,
                    })
                    .collect(),
                tool_call_id: message.tool_call_id.clone().unwrap_or_default(),
            })
        })
        .collect()
}

/// The client's tools and `tool_choice`: "none", "auto", "required", or a named function to
/// force.
fn tool_options(body: &ChatBody) -> Result<ToolOptions, ApiError> {
    let client_tools = super::client_tools(Api::OpenAi, &body.tools)?;
    let mut options = ToolOptions { client_tools, ..ToolOptions::default() };
    match &body.tool_choice {
        None | Some(Value::Null) => {}
        Some(Value::String(choice)) => {
            options.choice = match choice.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => return Err(invalid(format!("tool_choice `{other}` is not one of none, auto, required"))),
            } as i32;
        }
        Some(choice) => {
            let name = choice.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() {
                return Err(invalid("tool_choice must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}"));
            }
            options.force = name.to_owned();
        }
    }
    Ok(options)
}

fn finish_reason(done: &phi3d_proto::v1::Done) -> &'static str {
    match StopReason::try_from(done.stop_reason) {
        Ok(StopReason::MaxTokens) => "length",
        Ok(StopReason::ToolCalls) => "tool_calls",
        _ => "stop",
    }
}

fn usage(done: &phi3d_proto::v1::Done) -> Value {
    let usage = done.usage.unwrap_or_default();
    let timings = done.timings.unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        // Every prompt token not decoded again, at its old place or moved past a changed span.
        "prompt_tokens_details": { "cached_tokens": usage.cached_prompt_tokens + usage.shifted_prompt_tokens },
        // OpenAI's fields for tokens predicted ahead: here the drafts from the prompt.
        "completion_tokens_details": {
            "accepted_prediction_tokens": timings.accepted_draft_tokens,
            "rejected_prediction_tokens": timings.draft_tokens.saturating_sub(timings.accepted_draft_tokens),
        },
    })
}

/// What the client asked for in `/v1/chat/completions`, before the server adds its plugin tools.
fn chat_request(body: &ChatBody) -> Result<ChatRequest, ApiError> {
    let messages = messages(&body.messages)?;
    let options = body.sampling.options()?;
    let tools = tool_options(body)?;
    Ok(ChatRequest { request_id: String::new(), messages, options: Some(options), tools: Some(tools) })
}

async fn chat_completions(
    State(state): State<HttpState>,
    Extension(client): Extension<Client>,
    JsonBody(body): JsonBody<ChatBody>,
) -> Response {
    let request = match chat_request(&body) {
        Ok(request) => state.with_plugin_tools(request),
        Err(err) => return err.into_response(),
    };
    let events = match state.chat(Api::OpenAi, client, request).await {
        Ok(events) => events,
        Err(err) => return err.into_response(),
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let model = body.model.clone().unwrap_or_else(|| state.model_name.clone());
    let created = unix_now();
    if body.stream {
        let include_usage = body.stream_options.as_ref().is_some_and(|options| options.include_usage);
        return stream_chat(events, id, model, created, include_usage).into_response();
    }
    let super::WholeReply { done, calls, text } = match super::whole_reply(Api::OpenAi, events).await {
        Ok(reply) => reply,
        Err(err) => return err.into_response(),
    };
    let mut message = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        message["content"] = Value::Null;
        message["tool_calls"] = calls.iter().map(whole_call).collect();
    }
    Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason(&done) }],
        "usage": usage(&done),
    }))
    .into_response()
}

fn whole_call(call: &ToolCall) -> Value {
    json!({ "id": call.id, "type": "function", "function": { "name": call.name, "arguments": call.arguments_json } })
}

/// Server-sent chunks: the role first, text deltas, each tool call as its name then its
/// arguments, the finish reason, the usage when asked, then `[DONE]`.
fn stream_chat(
    events: crate::service::inference::EventStream,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    let mut calls = 0usize;
    let data = |value: Value| Event::default().data(value.to_string());
    let first = futures::stream::once(futures::future::ready(json!({ "role": "assistant", "content": "" })));
    let role = first.map({
        let chunk = chunk.clone();
        move |delta| vec![data(chunk(delta, None))]
    });
    let rest = events.map(move |event| match event {
        Ok(ChatEvent { event: Some(chat_event::Event::Delta(delta)) }) => {
            vec![data(chunk(json!({ "content": delta.text }), None))]
        }
        Ok(ChatEvent { event: Some(chat_event::Event::ToolResult(result)) }) => {
            vec![data(chunk(json!({ "content": super::plugin_result_text(&result) }), None))]
        }
        Ok(ChatEvent { event: Some(chat_event::Event::ToolCall(call)) }) if call.client_side => {
            let index = calls;
            calls += 1;
            vec![
                data(chunk(
                    json!({ "tool_calls": [{ "index": index, "id": call.id, "type": "function",
                            "function": { "name": call.name, "arguments": "" } }] }),
                    None,
                )),
                data(chunk(json!({ "tool_calls": [{ "index": index, "function": { "arguments": call.arguments_json } }] }), None)),
            ]
        }
        Ok(ChatEvent { event: Some(chat_event::Event::Done(done)) }) => {
            let mut out = vec![data(chunk(json!({}), Some(finish_reason(&done))))];
            if include_usage {
                let mut last = chunk(json!({}), None);
                last["choices"] = json!([]);
                last["usage"] = usage(&done);
                out.push(data(last));
            }
            out.push(Event::default().data("[DONE]"));
            out
        }
        Ok(_) => Vec::new(),
        Err(status) => {
            let error = ApiError::from_status(Api::OpenAi, &status);
            vec![data(json!({ "error": {
                "message": error.message, "type": error_type(error.status), "code": error_code(error.status),
            }}))]
        }
    });
    let events = role.chain(rest).flat_map(|batch| futures::stream::iter(batch.into_iter().map(Ok)));
    Sse::new(events)
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

/// `/v1/completions` as one user turn (phi3d's models are chat models).
fn completion_request(body: &CompletionBody) -> Result<ChatRequest, ApiError> {
    let Some(prompt) = body.prompt.as_str().map(str::to_owned) else {
        return Err(invalid("prompt must be one string"));
    };
    if body.stream {
        return Err(invalid("stream is not supported on /v1/completions; use /v1/chat/completions"));
    }
    let options = body.sampling.options()?;
    let messages = vec![Message { role: Role::User as i32, content: prompt, ..Message::default() }];
    // A completion is text for text: no tools, whatever the config offers chats.
    let tools = Some(ToolOptions { choice: ToolChoice::None as i32, ..ToolOptions::default() });
    Ok(ChatRequest { request_id: String::new(), messages, options: Some(options), tools })
}

/// The legacy completions endpoint.
async fn completions(
    State(state): State<HttpState>,
    Extension(client): Extension<Client>,
    JsonBody(body): JsonBody<CompletionBody>,
) -> Response {
    let request = match completion_request(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let reply = match state.chat(Api::OpenAi, client, request).await {
        Ok(events) => super::whole_reply(Api::OpenAi, events).await,
        Err(err) => Err(err),
    };
    let done = match reply {
        Ok(reply) => reply.done,
        Err(err) => return err.into_response(),
    };
    Json(json!({
        "id": format!("cmpl-{:016x}", rand::random::<u64>()), "object": "text_completion",
        "created": unix_now(), "model": body.model.unwrap_or_else(|| state.model_name.clone()),
        "choices": [{ "index": 0, "text": done.text, "finish_reason": finish_reason(&done), "logprobs": null }],
        "usage": usage(&done),
    }))
    .into_response()
}
