//! Requests built to take the daemon down, over every API: JSON schemas that would overflow
//! llama.cpp's converter (a `$ref` cycle, a huge name, thousands of optional properties), a
//! temperature that turns probabilities into NaN under a grammar, a schema that takes seconds
//! to compile while other clients list models and check health, and token budgets that a tool
//! turn must not exceed. Each is refused or ended alone, with a client status; the daemon and
//! every other client go on.

use std::time::{Duration, Instant};

use phi3d_proto::v1::{ClientTool, GenerationOptions, ToolOptions};
use phi3d_tests::harness::tonic_health_client::ServingStatus;
use serde_json::{Value, json};

use crate::common::{chat_request, collect, daemon, http_address, tiny_daemon};

/// The daemon's `/metrics` text.
async fn metrics(address: &str) -> String {
    http_client().get(format!("http://{address}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Generation steps run so far, whatever their stop reason (`phi3d_generations_total`).
fn generation_steps(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("phi3d_generations_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn http_client() -> reqwest::Client {
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The schemas that aborted the process, each with what its refusal names.
fn killer_schemas() -> Vec<(&'static str, Value, &'static str)> {
    let optional: serde_json::Map<String, Value> =
        (0..20_000).map(|i| (format!("p{i}"), json!({"type": "integer"}))).collect();
    vec![
        ("a $ref cycle", json!({"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}), "leads back to itself"),
        ("a self reference", json!({"type": "object", "properties": {"x": {"$ref": "#"}}}), "leads back to itself"),
        (
            "a 200,000-character name",
            json!({"type": "object", "properties": {"n".repeat(200_000): {"type": "string"}}}),
            "schema_max_",
        ),
        ("20,000 optional properties", json!({"type": "object", "properties": optional}), "schema_max_"),
    ]
}

#[tokio::test]
async fn schemas_that_overflowed_the_converter_are_refused_on_every_api() {
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).arg("--max-request-bytes").arg("4000000").start().await;
    let mut client = daemon.inference().await;
    let http = http_client();
    for (what, schema, says) in killer_schemas() {
        // gRPC structured output.
        let options = GenerationOptions { json_schema: schema.to_string(), max_tokens: 4, ..GenerationOptions::default() };
        let status = client.chat(chat_request("hi", options)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains("options.json_schema") && status.message().contains(says), "{what}: {}", status.message());
        // gRPC client tool parameters.
        let mut request = chat_request("hi", GenerationOptions { max_tokens: 4, ..GenerationOptions::default() });
        request.tools = Some(ToolOptions {
            client_tools: vec![ClientTool { name: "x".into(), parameters_json: schema.to_string(), ..ClientTool::default() }],
            ..ToolOptions::default()
        });
        let status = client.chat(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains("tools.client_tools[0].parameters_json") && status.message().contains(says), "{what}: {}", status.message());
        // Ollama's format and tools, OpenAI's response_format and tools.
        let bodies = [
            ("/api/chat", json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}], "format": schema})),
            ("/api/generate", json!({"model": "m", "stream": false, "prompt": "hi", "format": schema})),
            (
                "/api/chat",
                json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "function", "function": {"name": "x", "parameters": schema}}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "function", "function": {"name": "x", "parameters": schema}}]}),
            ),
        ];
        for (path, body) in bodies {
            let response = http.post(format!("http://{address}{path}")).json(&body).send().await.unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{what} on {path}: {text}");
            assert!(text.contains(says), "{what} on {path}: {text}");
        }
    }
    // Still alive, still serving.
    let reply = collect(client.chat(chat_request("hi", crate::common::exactly(3))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn a_vanishing_temperature_under_a_grammar_is_greedy_not_an_abort() {
    let daemon = daemon().await;
    let mut client = daemon.inference().await;
    let schema = json!({"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": false});
    let mut texts = Vec::new();
    for temperature in [1e-45, 0.0] {
        let options = GenerationOptions {
            temperature: Some(temperature),
            json_schema: schema.to_string(),
            max_tokens: 32,
            ..GenerationOptions::default()
        };
        let reply = collect(client.chat(chat_request("Is the light on?", options)).await.unwrap().into_inner()).await.unwrap();
        let value: Value = serde_json::from_str(&reply.done.text).unwrap_or_else(|err| panic!("{err}: {:?}", reply.done.text));
        assert!(value["on"].is_boolean(), "{value}");
        texts.push(reply.done.text);
    }
    assert_eq!(texts[0], texts[1], "a temperature below the floor is greedy");
    assert_eq!(daemon.health_status().await, ServingStatus::Serving);
}

/// Thousands of optional properties: allowed by raised limits, slow to convert (the converter
/// is quadratic in them), so a compile takes seconds.
fn slow_schema(properties: usize) -> Value {
    let optional: serde_json::Map<String, Value> =
        (0..properties).map(|i| (format!("property_{i}"), json!({"type": "integer"}))).collect();
    json!({"type": "object", "properties": optional})
}

#[tokio::test]
async fn a_slow_schema_neither_stalls_other_clients_nor_outlives_its_budget() {
    let address = http_address();
    let daemon = tiny_daemon()
        .arg("--http-listen")
        .arg(&address)
        .arg("--schema-max-properties")
        .arg("100000")
        .arg("--schema-max-bytes")
        .arg("10000000")
        .arg("--max-request-bytes")
        .arg("10000000")
        .arg("--compile-timeout-ms")
        .arg("1500")
        .start()
        .await;
    let schema = slow_schema(3000).to_string();
    let mut slow_client = daemon.inference().await;
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let options = GenerationOptions { json_schema: schema, max_tokens: 4, ..GenerationOptions::default() };
        slow_client.chat(chat_request("hi", options)).await.map(|_| ())
    });
    // While it compiles, listings and health answer at once.
    let http = http_client();
    let mut health = daemon.health().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    while !slow.is_finished() && started.elapsed() < Duration::from_secs(5) {
        let asked = Instant::now();
        let tags = http.get(format!("http://{address}/api/tags")).send().await.unwrap();
        assert!(tags.status().is_success());
        health.check(phi3d_tests::harness::tonic_health_client::HealthCheckRequest { service: String::new() }).await.unwrap();
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = slow.await.unwrap().unwrap_err();
    // Well under 100 ms when the machine is otherwise idle; the bound leaves room for a busy
    // test machine, and is far below the seconds a compile on the runtime's worker took.
    eprintln!("slowest listing + health check during the compile: {slowest:?}");
    assert!(slowest < Duration::from_millis(750), "a listing and a health check took {slowest:?} during the compile");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("compile_timeout_ms"), "{}", status.message());
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "the budget of 1.5 s held: {elapsed:?}");
    // The daemon serves on, at once, for another client (the slow job, left behind, still
    // holds its own client's share of the preparation threads).
    let other = reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().unwrap();
    let body = json!({"model": "m", "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
    let reply = other.post(format!("http://{address}/api/generate")).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 200, "{}", reply.text().await.unwrap());
}

#[tokio::test]
async fn every_token_budget_stays_within_max_tokens_limit() {
    // A call budget above the limit is refused at start-up...
    let output = phi3d_tests::harness::run(
        std::path::Path::new(crate::common::PHI3D),
        &["serve", "--model", "/nonexistent.gguf", "--max-tokens-limit", "16", "--tool-call-max-tokens", "256"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("tool_call_max_tokens") && stderr.contains("max_tokens_limit 16"), "{stderr}");

    // ...and a forced call under a low limit stops within it, with a client status rather than
    // three retries of the whole budget and a 500.
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).arg("--max-tokens-limit").arg("16").start().await;
    let mut client = daemon.inference().await;
    let parameters = json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]});
    let mut request = chat_request("Write a long note", GenerationOptions { max_tokens: 16, ..GenerationOptions::default() });
    request.tools = Some(ToolOptions {
        force: "note".into(),
        client_tools: vec![ClientTool { name: "note".into(), parameters_json: parameters.to_string(), ..ClientTool::default() }],
        ..ToolOptions::default()
    });
    let outcome = collect(client.chat(request).await.unwrap().into_inner()).await;
    let mut generated = 0;
    match outcome {
        Ok(reply) => {
            // The model closed its call in time: fine, and within the limit.
            generated = reply.done.usage.unwrap().completion_tokens;
        }
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
            assert!(status.message().contains("tool_call_max_tokens"), "{}", status.message());
        }
    }
    assert!(generated <= 16, "{generated} tokens under max_tokens_limit 16");
    let metrics = metrics(&address).await;
    let total: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("phi3d_generated_tokens_total "))
        .map_or(0.0, |value| value.trim().parse().unwrap());
    assert!(total <= 16.0, "the turn generated {total} tokens in all, past max_tokens_limit 16:\n{metrics}");
    let steps = generation_steps(&metrics);
    assert_eq!(steps, 1.0, "one step, not retries:\n{metrics}");
}

/// Home Assistant's Ollama integration asks for a tool turn with `options`; the turn must end
/// after one generation step with `done_reason`, not be retried.
async fn a_cut_tool_turn_ends_in_one_step(options: Value, done_reason: &str) {
    let address = http_address();
    let _daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let body = json!({
        "model": "m", "stream": false,
        "messages": [{"role": "user", "content": "Turn on the kitchen light"}],
        "tools": [{"type": "function", "function": {"name": "HassTurnOn", "parameters":
            {"type": "object", "properties": {"name": {"type": "string"}, "area": {"type": "string"}}}}}],
        "options": options
    });
    let response = http_client().post(format!("http://{address}/api/chat")).json(&body).send().await.unwrap();
    let status = response.status();
    let reply: Value = response.json().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{reply}");
    assert_eq!(reply["done_reason"], done_reason, "{reply}");
    let metrics = metrics(&address).await;
    assert_eq!(generation_steps(&metrics), 1.0, "one step, not retries:\n{metrics}");
}

#[tokio::test]
async fn a_tool_reply_cut_by_max_tokens_ends_with_length_at_once() {
    // A small num_predict: the step runs out of tokens and ends with what was generated.
    a_cut_tool_turn_ends_in_one_step(json!({"num_predict": 3, "temperature": 0}), "length").await;
}

#[tokio::test]
async fn a_tool_reply_cut_by_a_stop_string_ends_at_once() {
    // A client's stop string that cuts the JSON of a tool step would cut every retry the same
    // way: the turn ends with what was generated and `stop`.
    a_cut_tool_turn_ends_in_one_step(json!({"num_predict": 32, "temperature": 0, "stop": ["\""]}), "stop").await;
}

#[tokio::test]
async fn a_panic_while_sampling_one_request_ends_that_request_only() {
    let daemon = tiny_daemon().env("PHI3D_FAULT_INJECTION", "sample-panic").start().await;
    let mut client = daemon.inference().await;
    // A neighbour generating at the same time is untouched.
    let mut long = crate::common::chat_request("Go on", crate::common::exactly(200));
    long.request_id = "neighbour".into();
    let neighbour = crate::common::in_background(client.chat(long).await.unwrap().into_inner());
    crate::common::wait_active(&daemon, 1).await;
    let mut doomed = crate::common::chat_request("hi", crate::common::exactly(8));
    doomed.request_id = "fault:sample-panic".into();
    let status = collect(client.chat(doomed).await.unwrap().into_inner()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("sampling failed") && status.message().contains("fault injection"), "{}", status.message());
    let reply = neighbour.await.unwrap().unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 200, "the neighbour finished");
    assert_eq!(daemon.health_status().await, ServingStatus::Serving);
    let reply = collect(client.chat(chat_request("hi", crate::common::exactly(3))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 3, "and the next request is served");
}

#[tokio::test]
async fn a_body_over_max_request_bytes_is_413_naming_the_limit_on_every_route() {
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).arg("--max-request-bytes").arg("4096").start().await;
    let http = http_client();
    // Small enough to be sent whole before the refusal closes the connection.
    let big = json!({"model": "m".repeat(20_000), "messages": [], "prompt": "hi"}).to_string();
    for path in ["/api/chat", "/api/generate", "/api/show", "/api/pull", "/v1/chat/completions", "/v1/completions"] {
        let reply = http.post(format!("http://{address}{path}")).body(big.clone()).send().await.unwrap();
        assert_eq!(reply.status(), 413, "{path}");
        let body: Value = reply.json().await.unwrap();
        let message = body["error"].as_str().or_else(|| body["error"]["message"].as_str()).unwrap_or_default();
        assert!(message.contains("max_request_bytes") && message.contains("4096"), "{path}: {body}");
    }
    // A body that is JSON but not what the route takes is a 400 that names the route.
    let reply = http.post(format!("http://{address}/api/show")).body("[1, 2").send().await.unwrap();
    assert_eq!(reply.status(), 400);
    let body: Value = reply.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("/api/show"), "{body}");
    // And the daemon serves the next, well-formed request.
    let reply = http.post(format!("http://{address}/api/show")).body(r#"{"model": "phi3d"}"#).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    drop(daemon);
}

#[tokio::test]
async fn a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized() {
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).arg("--max-request-bytes").arg("4000000").start().await;
    let http = http_client();
    // 200,000 emoji take llama.cpp's tokenizer seconds that nothing can interrupt; no context
    // this daemon has could hold them.
    let prompt = "\u{1F600}".repeat(200_000);
    let reply = http
        .post(format!("http://{address}/api/generate"))
        .json(&json!({"model": "phi3d", "prompt": prompt, "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: Value = reply.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("ctx_size"), "{body}");
    let mut client = daemon.inference().await;
    let options = GenerationOptions { max_tokens: 4, ..GenerationOptions::default() };
    let mut complete = phi3d_proto::v1::CompleteRequest { prompt: "\u{1F600}".repeat(200_000), ..Default::default() };
    complete.options = Some(options);
    let status = client.complete(complete).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ctx_size"), "{status:?}");
}

#[tokio::test]
async fn a_grammar_whose_alternatives_multiply_ends_its_request_and_no_other() {
    // An anyOf of enums offers all of their values where the first token is chosen: 24,576
    // numbers make the grammar check of each such token take seconds on the engine thread that
    // every client shares. With the default limits it is refused before anything compiles...
    let enums = |count: usize| -> Value {
        let branches: Vec<Value> = (0..count).map(|branch| json!({"enum": (branch * 512..branch * 512 + 512).collect::<Vec<_>>()})).collect();
        json!({"type": "array", "minItems": 2, "maxItems": 2, "items": {"anyOf": branches}})
    };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let http = http_client();
    let body = json!({"model": "m", "prompt": "numbers", "stream": false, "format": enums(4), "options": {"num_predict": 8}});
    let reply = http.post(format!("http://{address}/api/generate")).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 400);
    let reply: Value = reply.json().await.unwrap();
    assert!(reply["error"].as_str().unwrap().contains("schema_max_alternatives"), "{reply}");
    drop(daemon);
    // ...and where an operator raised the limits, the step's CPU budget ends the request.
    let address = http_address();
    let _daemon = tiny_daemon()
        .arg("--http-listen")
        .arg(&address)
        .arg("--schema-max-alternatives")
        .arg("100000")
        .arg("--schema-max-bytes")
        .arg("1000000")
        .arg("--max-request-bytes")
        .arg("4000000")
        .start()
        .await;
    let schema = enums(48);
    let body = json!({"model": "m", "prompt": "numbers", "stream": false, "format": schema, "options": {"num_predict": 8}});
    let started = Instant::now();
    let reply = http.post(format!("http://{address}/api/generate")).json(&body).send().await.unwrap();
    let status = reply.status();
    let reply: Value = reply.json().await.unwrap();
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"].as_str().unwrap();
    assert!(message.contains("CPU time") || message.contains("compile_timeout_ms"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    // The engine goes on serving.
    let body = json!({"model": "m", "prompt": "hello", "stream": false, "options": {"num_predict": 4}});
    let reply = http.post(format!("http://{address}/api/generate")).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 200);
}
