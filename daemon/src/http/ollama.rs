//! Ollama's API, as Home Assistant's Ollama integration (`ollama==0.6.2`) and the `ollama`
//! library call it: `/api/tags`, `/api/chat`, `/api/generate`, `/api/show`, `/api/ps`,
//! `/api/version`, and `/api/pull` (in `pull`). Replies stream as NDJSON, one JSON object per line, the last with
//! `"done": true`; a failure after the first line is an `{"error": ...}` line.
//!
//! Ollama's clients send loosely typed values (`keep_alive` as -1.0, "300s" or "-1.0s";
//! `num_ctx` as 4096.0), so options are read from JSON values, not fixed types.

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use phi3d_proto::v1::{
    ChatEvent, ChatRequest, GenerationOptions, Message, Role, StopReason, ToolCall, ToolOptions,
    chat_event,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{Api, ApiError, HttpState};
use crate::auth::Client;

/// The body parsing and mapping, callable without a server, for the fuzz tests.
#[doc(hidden)]
pub mod fuzzing;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/tags", get(tags))
        .route("/api/ps", get(running))
        .route("/api/version", get(version))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/pull", post(super::pull::pull))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(Api::Ollama, StatusCode::BAD_REQUEST, message)
}

/// RFC 3339 now, as Ollama writes `created_at`.
fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// One model entry as `/api/tags` and `/api/ps` list it. Reads no engine queue, so it answers
/// at once while every slot is busy.
fn model_entry(state: &HttpState) -> Value {
    let (size, family, parameters, quantization, modified) = match state.model() {
        Some(model) => {
            let info = &model.info;
            let modified = std::fs::metadata(&info.path)
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|time| jiff::Timestamp::try_from(time).ok())
                .map_or_else(now, |time| time.to_string());
            let quantization = quantization_of(&info.name, &info.path);
            (info.size_bytes, info.architecture.clone(), format!("{:.1}B", info.parameters as f64 / 1e9), quantization, modified)
        }
        None => (0, String::new(), String::new(), String::new(), now()),
    };
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(format!("{}:{size}:{modified}", state.model_name)))
    };
    json!({
        "name": state.model_name,
        "model": state.model_name,
        "modified_at": modified,
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameters,
            "quantization_level": quantization,
        },
    })
}

/// The quantization named in the model or file name (`Q4_0`, `q4_k_m`, …), as Ollama shows it.
fn quantization_of(name: &str, path: &std::path::Path) -> String {
    let text = format!("{name} {}", path.display()).to_uppercase();
    ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"]
        .into_iter()
        .find(|quantization| text.contains(quantization))
        .unwrap_or("unknown")
        .to_owned()
}

async fn tags(State(state): State<HttpState>) -> Json<Value> {
    Json(json!({ "models": [model_entry(&state)] }))
}

async fn running(State(state): State<HttpState>) -> Json<Value> {
    let models = match state.model() {
        Some(_) => {
            let mut entry = model_entry(&state);
            // phi3d keeps its one model loaded for as long as it runs.
            entry["expires_at"] = json!("9999-12-31T23:59:59Z");
            entry["size_vram"] = json!(0);
            vec![entry]
        }
        None => Vec::new(),
    };
    Json(json!({ "models": models }))
}

async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// The body (`{"model": …}`) is read within the limits, as every body is; phi3d has one model,
/// so the name it gives does not matter, as on `/api/chat`.
async fn show(State(state): State<HttpState>, _body: JsonBody<serde::de::IgnoredAny>) -> Result<Json<Value>, ApiError> {
    let model = state
        .model()
        .ok_or_else(|| ApiError::new(Api::Ollama, StatusCode::SERVICE_UNAVAILABLE, "the model is still loading"))?;
    let info = &model.info;
    let entry = model_entry(&state);
    Ok(Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": info.chat_template,
        "details": entry["details"],
        "model_info": {
            "general.architecture": info.architecture,
            "general.name": info.name,
            "general.parameter_count": info.parameters,
            format!("{}.context_length", info.architecture): info.trained_context_length,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": entry["modified_at"],
    })))
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    format: Option<Value>,
    // Accepted and not needed: phi3d keeps its model loaded, has one model, and Phi-3 does not think.
    #[serde(default, rename = "model")]
    _model: Option<Value>,
    #[serde(default, rename = "keep_alive")]
    _keep_alive: Option<Value>,
    #[serde(default, rename = "think")]
    _think: Option<Value>,
}

#[derive(Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<OllamaToolCall>,
    #[serde(default, rename = "images")]
    _images: Option<Value>,
}

#[derive(Deserialize)]
struct OllamaToolCall {
    function: OllamaFunction,
}

#[derive(Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Ollama's `options` onto phi3d's; numbers may arrive as floats.
fn generation_options(options: Option<&Value>) -> Result<GenerationOptions, ApiError> {
    let mut out = GenerationOptions::default();
    let Some(options) = options.and_then(Value::as_object) else {
        return Ok(out);
    };
    let number = |key: &str| options.get(key).and_then(Value::as_f64);
    out.temperature = number("temperature").map(|value| value as f32);
    out.top_p = number("top_p").map(|value| value as f32);
    out.top_k = number("top_k").map(|value| value.max(0.0) as u32);
    out.min_p = number("min_p").map(|value| value as f32);
    out.repeat_penalty = number("repeat_penalty").map(|value| value as f32);
    out.seed = number("seed").map(|value| value as i64 as u64);
    if let Some(predict) = number("num_predict") {
        // Ollama's -1 (and -2) mean "as long as it takes": the server's default.
        out.max_tokens = if predict > 0.0 { predict as u32 } else { 0 };
    }
    out.stop = super::stop_strings(Api::Ollama, "options.stop", options.get("stop"))?;
    Ok(out)
}

/// Ollama's conversation onto phi3d's: its tool calls carry no ids, and its tool results say
/// no more than their order, so calls get ids here and each result answers the oldest call
/// still unanswered.
fn messages(body: &[OllamaMessage]) -> Result<Vec<Message>, ApiError> {
    let mut unanswered = std::collections::VecDeque::new();
    let mut out = Vec::with_capacity(body.len());
    for (index, message) in body.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(invalid(format!(
                    "messages[{index}].role `{other}` is not one of system, user, assistant, tool"
                )));
            }
        };
        let tool_calls = message
            .tool_calls
            .iter()
            .enumerate()
            .map(|(call, tool_call)| {
                let id = format!("call_{index}_{call}");
                unanswered.push_back(id.clone());
                let arguments = match &tool_call.function.arguments {
                    Value::Null => "{}".to_owned(),
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                ToolCall { id, name: tool_call.function.name.clone(), arguments_json: arguments, client_side: true }
            })
            .collect();
        let tool_call_id = if role == Role::Tool { unanswered.pop_front().unwrap_or_default() } else { String::new() };
        out.push(Message { role: role as i32, content: message.content.clone(), tool_calls, tool_call_id });
    }
    Ok(out)
}

async fn chat(
    State(state): State<HttpState>,
    Extension(client): Extension<Client>,
    JsonBody(body): JsonBody<ChatBody>,
) -> Response {
    let request = match chat_request(&body) {
        Ok(request) => state.with_plugin_tools(request),
        Err(err) => return err.into_response(),
    };
    respond(&state, client, request, body.stream.unwrap_or(true), Shape::Chat).await
}

/// What the client asked for in `/api/chat`, before the server adds its plugin tools.
fn chat_request(body: &ChatBody) -> Result<ChatRequest, ApiError> {
    let tools = super::client_tools(Api::Ollama, &body.tools)?;
    let mut options = generation_options(body.options.as_ref())?;
    options.json_schema = json_schema(body.format.as_ref())?;
    Ok(ChatRequest {
        request_id: String::new(),
        messages: messages(&body.messages)?,
        options: Some(options),
        // Offered tools may be called; Ollama has no tool choice, so it is AUTO.
        tools: Some(ToolOptions { client_tools: tools, ..ToolOptions::default() }),
    })
}

/// Ollama's `format`: `"json"` (any JSON object) or a JSON schema, as phi3d's `json_schema`.
fn json_schema(format: Option<&Value>) -> Result<String, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) if text.is_empty() => Ok(String::new()),
        Some(Value::String(text)) if text == "json" => Ok(r#"{"type":"object"}"#.to_owned()),
        Some(schema @ Value::Object(_)) => Ok(schema.to_string()),
        Some(other) => Err(invalid(format!("format must be \"json\" or a JSON schema object, got {other}"))),
    }
}

#[derive(Deserialize)]
struct GenerateBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default, rename = "model")]
    _model: Option<Value>,
    #[serde(default, rename = "keep_alive")]
    _keep_alive: Option<Value>,
}

async fn generate(
    State(state): State<HttpState>,
    Extension(client): Extension<Client>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Response {
    let stream = body.stream.unwrap_or(true);
    let request = match generate_request(body) {
        Ok(request) => state.with_plugin_tools(request),
        Err(err) => return err.into_response(),
    };
    respond(&state, client, request, stream, Shape::Generate).await
}

/// What the client asked for in `/api/generate`, before the server adds its plugin tools.
fn generate_request(body: GenerateBody) -> Result<ChatRequest, ApiError> {
    let options = GenerationOptions { json_schema: json_schema(body.format.as_ref())?, ..generation_options(body.options.as_ref())? };
    let mut messages = Vec::new();
    if let Some(system) = body.system.filter(|system| !system.is_empty()) {
        messages.push(Message { role: Role::System as i32, content: system, ..Message::default() });
    }
    messages.push(Message { role: Role::User as i32, content: body.prompt, ..Message::default() });
    Ok(ChatRequest { request_id: String::new(), messages, options: Some(options), tools: Some(ToolOptions::default()) })
}

/// `/api/chat` answers with `message`, `/api/generate` with `response`.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Generate,
}

impl Shape {
    fn line(self, model: &str, text: &str) -> Value {
        match self {
            Shape::Chat => json!({
                "model": model, "created_at": now(),
                "message": { "role": "assistant", "content": text }, "done": false,
            }),
            Shape::Generate => json!({ "model": model, "created_at": now(), "response": text, "done": false }),
        }
    }
}

/// The last line: counters in nanoseconds, as Ollama reports them.
fn done_line(shape: Shape, model: &str, done: &phi3d_proto::v1::Done, whole_text: Option<&str>) -> Value {
    let usage = done.usage.unwrap_or_default();
    let timings = done.timings.unwrap_or_default();
    let nanos = |ms: f64| (ms * 1e6) as u64;
    let reason = match StopReason::try_from(done.stop_reason) {
        Ok(StopReason::MaxTokens) => "length",
        _ => "stop",
    };
    let mut line = shape.line(model, whole_text.unwrap_or(""));
    line["done"] = json!(true);
    line["done_reason"] = json!(reason);
    line["total_duration"] = json!(nanos(timings.queued_ms + timings.prompt_ms + timings.generation_ms));
    line["load_duration"] = json!(0);
    line["prompt_eval_count"] = json!(usage.prompt_tokens);
    line["prompt_eval_duration"] = json!(nanos(timings.prompt_ms));
    line["eval_count"] = json!(usage.completion_tokens);
    line["eval_duration"] = json!(nanos(timings.generation_ms));
    line
}

fn tool_call_line(model: &str, call: &ToolCall) -> Value {
    let arguments: Value = serde_json::from_str(&call.arguments_json).unwrap_or_else(|_| json!({}));
    json!({
        "model": model, "created_at": now(),
        "message": {
            "role": "assistant", "content": "",
            "tool_calls": [{ "function": { "name": call.name, "arguments": arguments } }],
        },
        "done": false,
    })
}

async fn respond(state: &HttpState, client: Client, request: ChatRequest, stream: bool, shape: Shape) -> Response {
    let events = match state.chat(Api::Ollama, client, request).await {
        Ok(events) => events,
        Err(err) => return err.into_response(),
    };
    let model = state.model_name.clone();
    if stream {
        let lines = events.filter_map(move |event| {
            let line = match event {
                Ok(ChatEvent { event: Some(chat_event::Event::Delta(delta)) }) => Some(shape.line(&model, &delta.text)),
                Ok(ChatEvent { event: Some(chat_event::Event::ToolResult(result)) }) => {
                    Some(shape.line(&model, &super::plugin_result_text(&result)))
                }
                Ok(ChatEvent { event: Some(chat_event::Event::ToolCall(call)) }) if call.client_side => {
                    Some(tool_call_line(&model, &call))
                }
                Ok(ChatEvent { event: Some(chat_event::Event::Done(done)) }) => Some(done_line(shape, &model, &done, None)),
                Ok(_) => None,
                Err(status) => Some(json!({ "error": status.message() })),
            };
            futures::future::ready(line.map(|line| Ok::<_, std::convert::Infallible>(format!("{line}\n"))))
        });
        return ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(lines))
            .into_response();
    }
    let reply = match super::whole_reply(Api::Ollama, events).await {
        Ok(reply) => reply,
        Err(err) => return err.into_response(),
    };
    let mut line = done_line(shape, &model, &reply.done, Some(&reply.text));
    if !reply.calls.is_empty() {
        line["message"]["tool_calls"] =
            reply.calls.iter().map(|call| tool_call_line(&model, call)["message"]["tool_calls"][0].clone()).collect();
    }
    Json(line).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loosely_typed_options_are_read() {
        let options = json!({"num_ctx": 8192.0, "temperature": 0.0, "num_predict": -1, "top_k": 40.0, "seed": 7, "stop": "\n"});
        let options = generation_options(Some(&options)).unwrap();
        assert_eq!((options.temperature, options.top_k, options.seed, options.max_tokens), (Some(0.0), Some(40), Some(7), 0));
        assert_eq!(options.stop, ["\n"]);
        let body: ChatBody = serde_json::from_value(json!({
            "model": "phi3", "messages": [], "keep_alive": "-1.0s", "think": false, "tools": [], "stream": true,
            "options": {"num_ctx": 4096.0}
        }))
        .unwrap();
        assert!(body.tools.is_empty() && body.stream == Some(true));
        let body: ChatBody = serde_json::from_value(json!({"messages": [], "keep_alive": -1.0})).unwrap();
        assert!(body.stream.is_none());
    }

    #[test]
    fn tool_results_answer_the_calls_in_order() {
        let body: Vec<OllamaMessage> = serde_json::from_value(json!([
            {"role": "user", "content": "lights?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "a", "arguments": {"x": 1}}},
                {"function": {"name": "b", "arguments": {}}}
            ]},
            {"role": "tool", "content": "A done"},
            {"role": "tool", "content": "B done"}
        ]))
        .unwrap();
        let converted = messages(&body).unwrap();
        assert_eq!(converted[1].tool_calls[0].arguments_json, r#"{"x":1}"#);
        assert_eq!(converted[2].tool_call_id, converted[1].tool_calls[0].id);
        assert_eq!(converted[3].tool_call_id, converted[1].tool_calls[1].id);
        let bad: Vec<OllamaMessage> = serde_json::from_value(json!([{"role": "robot", "content": ""}])).unwrap();
        assert!(messages(&bad).is_err());
    }
}
