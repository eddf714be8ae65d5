//! The HTTP bridges' request bodies: `/api/chat`, `/api/generate`, `/v1/chat/completions` and
//! `/v1/completions`, read and mapped to a `ChatRequest` as the handlers do
//! (`phi3d::http::{ollama, openai}::fuzzing`), then checked as gRPC requests are
//! (`service::validate`). Bodies are shaped like the real ones, with any JSON in any place,
//! numbers past every type's range, odd strings, and cut or garbled text. Nothing may panic;
//! every refusal is a 400; what is accepted is well formed.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use phi3d::http::ApiError;
use phi3d::service::validate;
use phi3d_proto::v1::ChatRequest;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::fuzz;
use crate::strategies::{Json, json, mutate, mutation, number_text, odd_string, or_any, some_of};

fn string() -> BoxedStrategy<Json> {
    or_any(odd_string().prop_map(Json::Str).boxed(), 15)
}

/// Mostly numbers a client would send (small counts, temperatures), sometimes any.
fn number() -> BoxedStrategy<Json> {
    let plausible = prop_oneof![
        (0u32..5000).prop_map(|n| n.to_string()),
        (0.0f64..2.0).prop_map(|f| f.to_string()),
        prop::sample::select(&["0", "1", "-1", "0.0", "1e-45", "0.5", "1.0"][..]).prop_map(str::to_owned),
    ];
    or_any(prop_oneof![3 => plausible, 1 => number_text()].prop_map(Json::Number).boxed(), 15)
}

/// A whole number, mostly in range for a `u32` field.
fn count() -> BoxedStrategy<Json> {
    or_any(prop_oneof![4 => (0u32..5000).prop_map(|n| n.to_string()), 1 => number_text()].prop_map(Json::Number).boxed(), 15)
}

fn boolean() -> BoxedStrategy<Json> {
    or_any(any::<bool>().prop_map(Json::Bool).boxed(), 15)
}

fn list(item: BoxedStrategy<Json>, max: usize) -> BoxedStrategy<Json> {
    or_any(prop::collection::vec(item, 0..max).prop_map(Json::Array).boxed(), 15)
}

fn role() -> BoxedStrategy<Json> {
    or_any(
        prop_oneof![
            6 => prop::sample::select(&["system", "user", "assistant", "tool", "developer"][..]).prop_map(Json::str),
            1 => odd_string().prop_map(Json::Str),
        ]
        .boxed(),
        8,
    )
}

fn stop() -> BoxedStrategy<Json> {
    prop_oneof![string(), list(string(), 20)].boxed()
}

/// A JSON schema, or something in its place.
fn schema() -> BoxedStrategy<Json> {
    prop_oneof![
        2 => crate::schemas::schema_json(),
        1 => json(4),
    ]
    .boxed()
}

/// A tool in OpenAI's function shape (both APIs use it).
fn tool() -> BoxedStrategy<Json> {
    let function = some_of(vec![("!name", string()), ("description", string()), ("parameters", schema())]);
    or_any(some_of(vec![("type", Just(Json::str("function")).boxed()), ("function", or_any(function, 15))]), 15)
}

fn tools() -> BoxedStrategy<Json> {
    list(tool(), 4)
}

fn ollama_options() -> BoxedStrategy<Json> {
    or_any(
        some_of(vec![
            ("temperature", number()),
            ("top_p", number()),
            ("top_k", number()),
            ("min_p", number()),
            ("repeat_penalty", number()),
            ("seed", count()),
            ("num_predict", number()),
            ("num_ctx", number()),
            ("stop", stop()),
        ]),
        6,
    )
}

fn ollama_format() -> BoxedStrategy<Json> {
    prop_oneof![
        1 => prop::sample::select(&["json", "", "text"][..]).prop_map(Json::str),
        2 => schema(),
    ]
    .boxed()
}

fn ollama_message() -> BoxedStrategy<Json> {
    let call = some_of(vec![(
        "!function",
        or_any(some_of(vec![("!name", string()), ("arguments", prop_oneof![json(3), string()].boxed())]), 15),
    )]);
    or_any(
        some_of(vec![("!role", role()), ("content", string()), ("tool_calls", list(call, 4)), ("images", json(2))]),
        8,
    )
}

pub fn ollama_chat() -> BoxedStrategy<Json> {
    some_of(vec![
        ("model", string()),
        ("!messages", list(ollama_message(), 5)),
        ("tools", tools()),
        ("stream", boolean()),
        ("options", ollama_options()),
        ("format", ollama_format()),
        ("keep_alive", prop_oneof![number(), string()].boxed()),
        ("think", boolean()),
    ])
}

pub fn ollama_generate() -> BoxedStrategy<Json> {
    some_of(vec![
        ("model", string()),
        ("prompt", string()),
        ("system", string()),
        ("stream", boolean()),
        ("options", ollama_options()),
        ("format", ollama_format()),
        ("keep_alive", prop_oneof![number(), string()].boxed()),
    ])
}

fn openai_content() -> BoxedStrategy<Json> {
    let part = or_any(
        some_of(vec![
            ("!type", prop_oneof![6 => Just("text"), 1 => Just("image_url")].prop_map(Json::str).boxed()),
            ("!text", string()),
        ]),
        6,
    );
    prop_oneof![string(), list(part, 5)].boxed()
}

fn openai_message() -> BoxedStrategy<Json> {
    let call = or_any(
        some_of(vec![
            ("!id", string()),
            ("type", Just(Json::str("function")).boxed()),
            ("!function", or_any(some_of(vec![("!name", string()), ("arguments", string())]), 15)),
        ]),
        6,
    );
    or_any(
        some_of(vec![
            ("!role", role()),
            ("content", openai_content()),
            ("tool_calls", list(call, 4)),
            ("tool_call_id", string()),
            ("name", string()),
        ]),
        8,
    )
}

/// The sampling members both OpenAI endpoints take.
fn sampling() -> Vec<(&'static str, BoxedStrategy<Json>)> {
    let format = or_any(
        some_of(vec![
            ("type", prop::sample::select(&["text", "json_object", "json_schema", "xml"][..]).prop_map(Json::str).boxed()),
            (
                "json_schema",
                or_any(some_of(vec![("name", string()), ("schema", schema()), ("strict", boolean())]), 15),
            ),
        ]),
        6,
    );
    vec![
        ("max_tokens", count()),
        ("max_completion_tokens", count()),
        ("temperature", number()),
        ("top_p", number()),
        ("seed", count()),
        ("stop", stop()),
        ("n", count()),
        ("response_format", format),
    ]
}

pub fn openai_chat() -> BoxedStrategy<Json> {
    let choice = prop_oneof![
        prop::sample::select(&["none", "auto", "required", "auto", "any"][..]).prop_map(Json::str).boxed(),
        some_of(vec![
            ("type", Just(Json::str("function")).boxed()),
            ("function", or_any(some_of(vec![("name", string())]), 15)),
        ]),
    ];
    let mut members = vec![
        ("model", string()),
        ("!messages", list(openai_message(), 5)),
        ("stream", boolean()),
        ("stream_options", or_any(some_of(vec![("include_usage", boolean())]), 15)),
        ("tools", tools()),
        ("tool_choice", or_any(choice.boxed(), 15)),
    ];
    members.extend(sampling());
    some_of(members)
}

pub fn openai_completion() -> BoxedStrategy<Json> {
    let mut members = vec![("model", string()), ("!prompt", string()), ("stream", boolean())];
    members.extend(sampling());
    some_of(members)
}

/// The four endpoints' mappings, by name.
const ENDPOINTS: [(&str, fn(&[u8]) -> Result<ChatRequest, ApiError>); 4] = [
    ("/api/chat", phi3d::http::ollama::fuzzing::chat),
    ("/api/generate", phi3d::http::ollama::fuzzing::generate),
    ("/v1/chat/completions", phi3d::http::openai::fuzzing::chat_completions),
    ("/v1/completions", phi3d::http::openai::fuzzing::completions),
];

/// What every mapping must hold to, whatever the body. Counts the bodies the mapping and the
/// validation accepted in `accepted`.
fn check(endpoint: &str, body: &[u8], accepted: &Accepted) -> Result<(), TestCaseError> {
    let map = ENDPOINTS.iter().find(|(name, _)| *name == endpoint).expect("endpoint").1;
    let request = match map(body) {
        Ok(request) => request,
        Err(err) => {
            if std::env::var_os("PHI3D_FUZZ_DEBUG").is_some() {
                println!("{endpoint} refused: {err:?}");
            }
            let status = err.into_response().status();
            prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{} refused a body with {}", endpoint, status);
            return Ok(());
        }
    };
    accepted.mapped.fetch_add(1, Ordering::Relaxed);
    let options = request.options.as_ref();
    if let Some(schema) = options.map(|options| &options.json_schema).filter(|schema| !schema.is_empty()) {
        prop_assert!(serde_json::from_str::<serde_json::Value>(schema).is_ok(), "json_schema is not JSON: {schema}");
    }
    for tool in request.tools.iter().flat_map(|tools| &tools.client_tools) {
        prop_assert!(!tool.name.is_empty(), "a client tool without a name");
        prop_assert!(serde_json::from_str::<serde_json::Value>(&tool.parameters_json).is_ok(), "{}", tool.parameters_json);
    }
    // The same checks as a gRPC request: they may refuse, never panic, and what they accept
    // is in range for llama.cpp's sampler.
    let defaults = validate::Defaults {
        max_tokens: 512,
        tool_call_max_tokens: 256,
        max_tool_steps: 16,
        max_tokens_limit: 4096,
        schema_limits: phi3d::tools::schema_guard::SchemaLimits::default(),
    };
    if let Ok(params) = validate::generation_params(options, defaults) {
        accepted.valid_options.fetch_add(1, Ordering::Relaxed);
        let sampling = &params.sampling;
        prop_assert!(sampling.temperature.is_finite() && sampling.temperature >= 0.0, "{:?}", sampling);
        prop_assert!(sampling.top_p > 0.0 && sampling.top_p <= 1.0, "{:?}", sampling);
    }
    if validate::chat_messages(&request.messages).is_ok() {
        accepted.valid_messages.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// How far bodies got: mapped to a request, options valid, messages valid.
#[derive(Default)]
struct Accepted {
    mapped: AtomicU64,
    valid_options: AtomicU64,
    valid_messages: AtomicU64,
}

/// Fuzzes one endpoint with bodies shaped by `shape`.
fn endpoint(endpoint: &str, shape: BoxedStrategy<Json>) {
    let accepted = Accepted::default();
    let executions = fuzz(endpoint, body(shape), |body| check(endpoint, &body, &accepted));
    println!(
        "fuzz {endpoint}: of {executions}, {} mapped to a request, {} with valid options, {} with valid messages",
        accepted.mapped.into_inner(),
        accepted.valid_options.into_inner(),
        accepted.valid_messages.into_inner()
    );
}

/// A body as text: shaped JSON, sometimes garbled.
fn body(shape: BoxedStrategy<Json>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        8 => shape.prop_map(|json| json.text().into_bytes()),
        2 => (shape_text(), prop::collection::vec(mutation(), 1..4)).prop_map(|(text, edits)| mutate(&text, &edits).into_bytes()),
        1 => json(4).prop_map(|json| json.text().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
    .boxed()
}

fn shape_text() -> BoxedStrategy<String> {
    prop_oneof![ollama_chat(), openai_chat()].prop_map(|json| json.text()).boxed()
}

#[test]
fn ollama_chat_bodies() {
    endpoint("/api/chat", ollama_chat());
}

#[test]
fn ollama_generate_bodies() {
    endpoint("/api/generate", ollama_generate());
}

#[test]
fn openai_chat_completion_bodies() {
    endpoint("/v1/chat/completions", openai_chat());
}

#[test]
fn openai_completion_bodies() {
    endpoint("/v1/completions", openai_completion());
}

/// Nesting far past serde_json's recursion limit is refused, not a stack overflow.
#[test]
fn deeply_nested_bodies_are_refused() {
    for (endpoint, _) in ENDPOINTS {
        for depth in [200, 100_000] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let body = format!("{{\"messages\":{}1{}}}", open.repeat(depth), close.repeat(depth));
                check(endpoint, body.as_bytes(), &Accepted::default()).unwrap();
                let unclosed = format!("{{\"options\":{}", open.repeat(depth));
                check(endpoint, unclosed.as_bytes(), &Accepted::default()).unwrap();
            }
        }
    }
}
