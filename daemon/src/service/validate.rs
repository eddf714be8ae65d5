//! Checking requests before they become tasks: every out-of-range value is rejected with
//! INVALID_ARGUMENT naming the field and what it accepts, and every default is applied here,
//! so the engine only ever sees valid parameters.

use std::time::Duration;

use phi3d_proto::v1::{GenerationOptions, Message, Role};
use tonic::Status;

use crate::engine::task::{GenerationParams, Grammar, SamplingParams};
use crate::tools::schema_guard::{self, SchemaLimits};
use crate::tools::{CallRecord, ChatMessage, ChatRole};

/// Server-side defaults that a request may leave unset.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub max_tokens: u32,
    /// The token budget of a step that must call a tool (`tool_call_max_tokens`).
    pub tool_call_max_tokens: u32,
    /// The largest `tools.max_steps` a request may ask for (`max_tool_steps`).
    pub max_tool_steps: u32,
    /// The largest `max_tokens` a request may ask for (`max_tokens_limit`).
    pub max_tokens_limit: u32,
    /// What a schema from a request must keep to (`schema_max_*`).
    pub schema_limits: SchemaLimits,
}

/// Temperatures below this are greedy sampling. Dividing logits by a temperature near zero
/// overflows them to infinity, the probabilities become NaN, and a grammar sampler then meets
/// a token it forbids, which llama.cpp answers by throwing; greedy is what such a temperature
/// means anyway.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 0.01;

/// The most stop strings one request may give: each is checked against every new character.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

pub fn generation_params(options: Option<&GenerationOptions>, defaults: Defaults) -> Result<GenerationParams, Status> {
    let fallback = GenerationOptions::default();
    let options = options.unwrap_or(&fallback);
    let base = SamplingParams::default();
    let temperature = options.temperature.unwrap_or(base.temperature);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(invalid(format!("options.temperature must be >= 0 (0 is greedy), got {temperature}")));
    }
    let temperature = if temperature < GREEDY_BELOW_TEMPERATURE { 0.0 } else { temperature };
    let top_p = options.top_p.unwrap_or(base.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("options.top_p must be in (0, 1], got {top_p}")));
    }
    let min_p = options.min_p.unwrap_or(base.min_p);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid(format!("options.min_p must be in [0, 1], got {min_p}")));
    }
    let repeat_penalty = options.repeat_penalty.unwrap_or(base.repeat_penalty);
    if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
        return Err(invalid(format!("options.repeat_penalty must be > 0 (1 disables it), got {repeat_penalty}")));
    }
    let top_k = options.top_k.unwrap_or(base.top_k);
    if top_k > i32::MAX as u32 {
        return Err(invalid(format!("options.top_k must be at most {}, got {top_k}", i32::MAX)));
    }
    if let Some(index) = options.stop.iter().position(String::is_empty) {
        return Err(invalid(format!("options.stop[{index}] is empty; stop strings must have at least one character")));
    }
    if options.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!(
            "options.stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
            options.stop.len()
        )));
    }
    if let Some(index) = options.stop.iter().position(|stop| stop.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!(
            "options.stop[{index}] is {} bytes long; a stop string may have at most {MAX_STOP_BYTES} bytes",
            options.stop[index].len()
        )));
    }
    let seed = match options.seed {
        // llama.cpp seeds with 32 bits; fold so that every bit of the client's seed counts.
        Some(seed) => (seed ^ (seed >> 32)) as u32,
        None => rand::random(),
    };
    let max_tokens = if options.max_tokens == 0 { defaults.max_tokens } else { options.max_tokens };
    if max_tokens > defaults.max_tokens_limit {
        return Err(invalid(format!(
            "options.max_tokens {max_tokens} is above this phi3d's limit of {} (max_tokens_limit)",
            defaults.max_tokens_limit
        )));
    }
    Ok(GenerationParams {
        max_tokens,
        sampling: SamplingParams { temperature, top_p, top_k, min_p, repeat_penalty, seed },
        stop: options.stop.clone(),
        ignore_eos: options.ignore_eos,
        grammar: structured_output(&options.json_schema, &defaults.schema_limits)?,
        render_special_tokens: false,
    })
}

/// The grammar that holds a reply to `options.json_schema`, or `None` for free text. The
/// schema is checked against the limits and as a schema first, so that a mistake is named in
/// the client's terms rather than in the grammar converter's, and nothing the converter cannot
/// take reaches it. Compiling is CPU work: callers run this off the runtime (`offload`).
fn structured_output(schema_text: &str, limits: &SchemaLimits) -> Result<Option<Grammar>, Status> {
    if schema_text.trim().is_empty() {
        return Ok(None);
    }
    let schema: serde_json::Value = serde_json::from_str(schema_text)
        .map_err(|err| invalid(format!("options.json_schema is not JSON: {err}")))?;
    if !schema.is_object() {
        return Err(invalid(format!("options.json_schema must be a JSON object (a schema), got {schema}")));
    }
    schema_guard::check(&schema, limits).map_err(|err| invalid(format!("options.json_schema: {err}")))?;
    if let Err(err) = jsonschema::validator_for(&schema) {
        return Err(invalid(format!("options.json_schema is not a valid JSON schema: {err}")));
    }
    let gbnf = crate::tools::schema_grammar(&schema)
        .map_err(|err| invalid(format!("options.json_schema cannot be turned into a grammar: {err}")))?;
    Ok(Some(Grammar { gbnf, trigger: None }))
}

/// The request's messages as the tools layer and the chat template take them: every role
/// set, no NUL in the text, every earlier call's arguments JSON.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, Status> {
    if messages.is_empty() {
        return Err(invalid("messages must not be empty; send at least one ROLE_USER message".into()));
    }
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let role = match Role::try_from(message.role) {
                Ok(Role::System) => ChatRole::System,
                Ok(Role::User) => ChatRole::User,
                Ok(Role::Assistant) => ChatRole::Assistant,
                Ok(Role::Tool) => ChatRole::Tool,
                Ok(Role::Unspecified) | Err(_) => {
                    return Err(invalid(format!(
                        "messages[{index}].role must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL, got {}",
                        message.role
                    )));
                }
            };
            if message.content.contains('\0') {
                return Err(invalid(format!("messages[{index}].content contains a NUL character")));
            }
            let tool_calls = message
                .tool_calls
                .iter()
                .enumerate()
                .map(|(call_index, call)| {
                    let arguments = serde_json::from_str(&call.arguments_json).map_err(|err| {
                        invalid(format!("messages[{index}].tool_calls[{call_index}].arguments_json is not JSON: {err}"))
                    })?;
                    Ok(CallRecord { id: call.id.clone(), name: call.name.clone(), arguments })
                })
                .collect::<Result<Vec<_>, Status>>()?;
            Ok(ChatMessage { role, content: message.content.clone(), tool_calls, tool_call_id: message.tool_call_id.clone() })
        })
        .collect()
}

pub fn prompt(prompt: &str) -> Result<&str, Status> {
    if prompt.is_empty() {
        return Err(invalid("prompt must not be empty".into()));
    }
    Ok(prompt)
}

/// A prompt must leave room for at least one generated token; nothing is truncated.
pub fn fits_context(prompt_tokens: usize, ctx_size: u32, max_prompt_tokens: u32) -> Result<(), Status> {
    if prompt_tokens > max_prompt_tokens as usize {
        return Err(invalid(format!(
            "the prompt is {prompt_tokens} tokens; this phi3d accepts at most {max_prompt_tokens} \
             (max_prompt_tokens); shorten the prompt"
        )));
    }
    if prompt_tokens + 1 > ctx_size as usize {
        return Err(invalid(format!(
            "the prompt is {prompt_tokens} tokens but the context holds {ctx_size} (ctx_size), \
             including the reply; shorten the prompt or raise ctx_size"
        )));
    }
    Ok(())
}

/// The client's deadline from the `grpc-timeout` header ("100m", "5S", ...).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// INVALID_ARGUMENT with `message`, which names the field.
pub(super) fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            max_tokens: 77,
            tool_call_max_tokens: 256,
            max_tool_steps: 16,
            max_tokens_limit: 1000,
            schema_limits: SchemaLimits::default(),
        }
    }

    fn rejects(options: GenerationOptions, field: &str) {
        let status = generation_params(Some(&options), defaults()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }

    #[test]
    fn out_of_range_options_name_their_field() {
        rejects(GenerationOptions { temperature: Some(-0.1), ..Default::default() }, "options.temperature");
        rejects(GenerationOptions { temperature: Some(f32::NAN), ..Default::default() }, "options.temperature");
        rejects(GenerationOptions { top_p: Some(0.0), ..Default::default() }, "options.top_p");
        rejects(GenerationOptions { top_p: Some(1.5), ..Default::default() }, "options.top_p");
        rejects(GenerationOptions { min_p: Some(-1.0), ..Default::default() }, "options.min_p");
        rejects(GenerationOptions { repeat_penalty: Some(0.0), ..Default::default() }, "options.repeat_penalty");
        rejects(GenerationOptions { stop: vec!["x".into(), String::new()], ..Default::default() }, "options.stop[1]");
        rejects(GenerationOptions { stop: vec!["x".into(); 17], ..Default::default() }, "options.stop has 17");
        rejects(GenerationOptions { stop: vec!["x".into(), "y".repeat(257)], ..Default::default() }, "options.stop[1]");
        let bounded = GenerationOptions { stop: vec!["y".repeat(256); 16], ..Default::default() };
        assert_eq!(generation_params(Some(&bounded), defaults()).unwrap().stop.len(), 16);
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let params = generation_params(None, defaults()).unwrap();
        assert_eq!(params.max_tokens, 77);
        let options = GenerationOptions { max_tokens: 5, temperature: Some(0.0), seed: Some(9), ..Default::default() };
        let params = generation_params(Some(&options), defaults()).unwrap();
        assert_eq!(params.max_tokens, 5);
        assert_eq!(params.sampling.temperature, 0.0);
        assert_eq!(params.sampling.seed, 9);
        let tiny = GenerationOptions { temperature: Some(1e-45), ..Default::default() };
        assert_eq!(generation_params(Some(&tiny), defaults()).unwrap().sampling.temperature, 0.0, "greedy");
    }

    #[test]
    fn a_json_schema_becomes_a_grammar_and_a_bad_one_is_named() {
        let schema = r#"{"type":"object","properties":{"room":{"enum":["kitchen","hall"]}},"required":["room"]}"#;
        let options = GenerationOptions { json_schema: schema.into(), ..Default::default() };
        let grammar = generation_params(Some(&options), defaults()).unwrap().grammar.expect("a grammar");
        assert!(grammar.gbnf.contains("root ::=") && grammar.gbnf.contains("kitchen"), "{}", grammar.gbnf);
        assert_eq!(grammar.trigger, None);
        assert_eq!(generation_params(None, defaults()).unwrap().grammar, None);
        rejects(GenerationOptions { json_schema: "{".into(), ..Default::default() }, "options.json_schema is not JSON");
        rejects(GenerationOptions { json_schema: "[1]".into(), ..Default::default() }, "must be a JSON object");
        rejects(
            GenerationOptions { json_schema: r#"{"type":"nonsense"}"#.into(), ..Default::default() },
            "options.json_schema is not a valid JSON schema",
        );
        rejects(
            GenerationOptions { json_schema: r##"{"$ref":"#"}"##.into(), ..Default::default() },
            "options.json_schema: the $ref chain",
        );
    }

    #[test]
    fn messages_need_a_role() {
        assert!(chat_messages(&[]).unwrap_err().message().contains("messages must not be empty"));
        let messages = [
            Message { role: Role::User as i32, content: "hi".into(), ..Message::default() },
            Message { role: Role::Unspecified as i32, content: "x".into(), ..Message::default() },
        ];
        assert!(chat_messages(&messages).unwrap_err().message().contains("messages[1].role"));
    }

    #[test]
    fn earlier_calls_need_json_arguments() {
        let call = phi3d_proto::v1::ToolCall { id: "a".into(), name: "x".into(), arguments_json: "{".into(), client_side: false };
        let messages = [Message { role: Role::Assistant as i32, tool_calls: vec![call], ..Message::default() }];
        let status = chat_messages(&messages).unwrap_err();
        assert!(status.message().starts_with("messages[0].tool_calls[0].arguments_json"), "{status:?}");
    }

    #[test]
    fn context_overflow_names_both_numbers() {
        assert!(fits_context(4095, 4096, 4096).is_ok());
        let limited = fits_context(100, 4096, 99).unwrap_err();
        assert!(limited.message().contains("max_prompt_tokens"), "{}", limited.message());
        let message = fits_context(5000, 4096, 4096).unwrap_err().message().to_owned();
        assert!(message.contains("5000") && message.contains("4096"), "{message}");
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&metadata), Some(Duration::from_millis(250)));
        metadata.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&metadata), Some(Duration::from_secs(3)));
        metadata.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&metadata), None);
    }
}
