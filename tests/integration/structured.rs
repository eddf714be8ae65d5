//! Structured output over gRPC: `options.json_schema` holds the reply to the schema, on Chat
//! and Complete; a bad schema, or one combined with tools, is INVALID_ARGUMENT naming the field.

use phi3d_proto::v1::{GenerationOptions, StopReason, ToolOptions};
use serde_json::{Value, json};

use crate::common::{chat_request, collect, complete_request, daemon};

fn light_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "room": {"type": "string", "enum": ["kitchen", "hall", "garden"]},
            "on": {"type": "boolean"},
            "level": {"type": "integer", "minimum": 0, "maximum": 100}
        },
        "required": ["room", "on", "level"],
        "additionalProperties": false
    })
}

fn structured(seed: u64) -> GenerationOptions {
    GenerationOptions {
        max_tokens: 64,
        seed: Some(seed),
        temperature: Some(0.8),
        json_schema: light_schema().to_string(),
        ..GenerationOptions::default()
    }
}

#[tokio::test]
async fn replies_follow_the_json_schema_on_chat_and_complete() {
    let daemon = daemon().await;
    let mut client = daemon.inference().await;
    let validator = jsonschema::validator_for(&light_schema()).unwrap();
    for seed in 1..=3 {
        let request = chat_request("Which light, and how bright?", structured(seed));
        let reply = collect(client.chat(request).await.unwrap().into_inner()).await.unwrap();
        let value: Value = serde_json::from_str(&reply.done.text)
            .unwrap_or_else(|err| panic!("seed {seed}: not JSON ({err}): {:?}", reply.done.text));
        assert!(validator.is_valid(&value), "seed {seed}: {value} against the schema");
        assert_eq!(reply.done.stop_reason, StopReason::Eos as i32, "the grammar ends the reply: {:?}", reply.done);
        assert_eq!(reply.done.text, reply.text());
    }
    let reply = collect(client.complete(complete_request("Light:", structured(4))).await.unwrap().into_inner()).await.unwrap();
    let value: Value = serde_json::from_str(&reply.done.text).unwrap();
    assert!(validator.is_valid(&value), "{value}");
}

#[tokio::test]
async fn a_bad_schema_is_invalid_argument_naming_the_problem() {
    let daemon = daemon().await;
    let mut client = daemon.inference().await;
    for (schema, says) in [
        ("{\"type\": ", "options.json_schema is not JSON"),
        ("{\"type\": \"colour\"}", "options.json_schema is not a valid JSON schema"),
        ("\"object\"", "must be a JSON object"),
    ] {
        let options = GenerationOptions { json_schema: schema.into(), ..GenerationOptions::default() };
        let status = client.chat(chat_request("hi", options)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{schema}: {status:?}");
        assert!(status.message().contains(says), "{schema}: {}", status.message());
    }
    let mut request = chat_request("hi", structured(1));
    request.tools = Some(ToolOptions {
        client_tools: vec![phi3d_proto::v1::ClientTool { name: "x".into(), ..Default::default() }],
        ..ToolOptions::default()
    });
    let status = client.chat(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("cannot be combined with tools"), "{}", status.message());
    // The daemon is unharmed and serves the next request.
    let reply = collect(client.chat(chat_request("hi", structured(2))).await.unwrap().into_inner()).await.unwrap();
    assert!(serde_json::from_str::<Value>(&reply.done.text).is_ok(), "{:?}", reply.done.text);
}
