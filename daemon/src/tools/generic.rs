//! The generic JSON tool-call format, for Phi-3 / Phi-3.5 and any model without a trained one.
//!
//! Every reply is one JSON object, either `{"tool_call": {"name": ..., "arguments": ...}}` or
//! `{"response": "..."}`, and a grammar built from the offered tools' schemas (llama.cpp's
//! json_schema_to_grammar) makes the model produce exactly that. The text inside `response`
//! is streamed to the client as it is generated ([`ResponseStream`]), not the JSON around it.

use serde_json::{Value, json};

use super::toolset::{OfferedTool, StepMode, call_schema, callable};
use super::{ModelReply, ParsedCall};

/// The instruction appended to the system message when tools are offered.
pub fn system_instruction(tools: &[OfferedTool]) -> String {
    let described: Vec<Value> = tools.iter().map(OfferedTool::describe).collect();
    let mut text = "Respond with one JSON object only: {\"tool_call\": {\"name\": <tool name>, \"arguments\": \
                    <arguments>}} to call a tool, or {\"response\": <your answer>} to answer the user."
        .to_owned();
    if !described.is_empty() {
        text.push_str("\nTools:\n");
        text.push_str(&Value::Array(described).to_string());
    }
    text
}

/// What this step may do, said last, so that every step of a turn shares the prompt before
/// it (and finds it in the prompt cache).
pub fn step_instruction(mode: &StepMode) -> String {
    match mode {
        StepMode::Auto => "Call one tool or answer the user.".to_owned(),
        StepMode::Required => "Call one tool now.".to_owned(),
        StepMode::Force(name) => format!("Call the tool {name} now."),
        StepMode::AnswerOnly => "Answer the user now with {\"response\": <your answer>}.".to_owned(),
    }
}

/// The JSON schema of a reply in `mode`; the grammar is generated from it.
pub fn reply_schema(tools: &[OfferedTool], mode: &StepMode) -> Value {
    let mut defs = serde_json::Map::new();
    let calls: Vec<Value> =
        callable(tools, mode).into_iter().map(|(index, tool)| call_schema(tool, index, &mut defs)).collect();
    let response = json!({
        "type": "object",
        "properties": { "response": { "type": "string" } },
        "required": ["response"],
        "additionalProperties": false
    });
    let call = json!({
        "type": "object",
        "properties": { "tool_call": { "anyOf": calls } },
        "required": ["tool_call"],
        "additionalProperties": false
    });
    let mut schema = match mode {
        StepMode::AnswerOnly => response,
        StepMode::Required | StepMode::Force(_) => call,
        StepMode::Auto => json!({ "anyOf": [call, response] }),
    };
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
}

/// How an assistant message that called a tool is written back into the conversation.
pub fn render_call(name: &str, arguments: &Value) -> String {
    json!({ "tool_call": { "name": name, "arguments": arguments } }).to_string()
}

/// How an assistant answer is written back, so the model keeps to the format.
pub fn render_response(text: &str) -> String {
    json!({ "response": text }).to_string()
}

/// How a tool's result is given to the model (as a user turn: Phi-3 has no tool role).
pub fn render_result(name: &str, content: &str, is_error: bool) -> String {
    let key = if is_error { "error" } else { "content" };
    json!({ "tool_response": { "name": name, key: content } }).to_string()
}

/// Parses a whole reply. Anything but a well-formed reply object is an error a model can act on.
pub fn parse_reply(text: &str) -> Result<ModelReply, String> {
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|err| format!("the reply is not one complete JSON object ({err})"))?;
    if let Some(response) = value.get("response") {
        return response
            .as_str()
            .map(|text| ModelReply::Answer(text.to_owned()))
            .ok_or_else(|| "\"response\" must be a string".to_owned());
    }
    let call = value
        .get("tool_call")
        .ok_or_else(|| "the reply has neither \"tool_call\" nor \"response\"".to_owned())?;
    let name = call
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| "\"tool_call\" needs a string \"name\"".to_owned())?;
    let arguments = call.get("arguments").cloned().unwrap_or_else(|| json!({}));
    Ok(ModelReply::Calls(vec![ParsedCall { name: name.to_owned(), arguments }]))
}

/// Follows a reply while it is generated and hands out the text of `response` as it grows.
///
/// Hand-written because it must work on an unfinished JSON document, character by character;
/// JSON parsers only accept whole values.
#[derive(Debug, Default)]
pub struct ResponseStream {
    state: StreamState,
    /// Text seen before the first key is known.
    prefix: String,
    /// A `\u` escape being read: the hex digits so far, and a high surrogate awaiting its pair.
    escape: Option<String>,
    high_surrogate: Option<u16>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum StreamState {
    #[default]
    Prefix,
    InResponse,
    AfterEscape,
    Done,
    NotAResponse,
}

impl ResponseStream {
    /// Feeds newly generated text; returns the part of the answer it completes.
    pub fn push(&mut self, text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            match self.state {
                StreamState::Prefix => {
                    self.prefix.push(c);
                    self.read_prefix();
                }
                StreamState::InResponse => match c {
                    '"' => self.state = StreamState::Done,
                    '\\' => self.state = StreamState::AfterEscape,
                    c => out.push(c),
                },
                StreamState::AfterEscape => self.escaped(c, &mut out),
                StreamState::Done | StreamState::NotAResponse => {}
            }
        }
        out
    }

    /// Whether the reply turned out to be something other than an answer (a tool call).
    pub fn is_call(&self) -> bool {
        self.state == StreamState::NotAResponse
    }

    fn read_prefix(&mut self) {
        let rest = self.prefix.trim_start();
        let Some(rest) = rest.strip_prefix('{') else {
            if !rest.is_empty() {
                self.state = StreamState::NotAResponse;
            }
            return;
        };
        let rest = rest.trim_start();
        if rest.is_empty() || "\"response\"".starts_with(rest) {
            return;
        }
        let Some(after_key) = rest.strip_prefix("\"response\"") else {
            self.state = StreamState::NotAResponse;
            return;
        };
        let after_key = after_key.trim_start();
        let Some(value) = after_key.strip_prefix(':') else {
            if !after_key.is_empty() {
                self.state = StreamState::NotAResponse;
            }
            return;
        };
        let value = value.trim_start();
        if value.starts_with('"') {
            self.state = StreamState::InResponse;
        } else if !value.is_empty() {
            self.state = StreamState::NotAResponse;
        }
    }

    fn escaped(&mut self, c: char, out: &mut String) {
        if let Some(hex) = self.escape.as_mut() {
            hex.push(c);
            if hex.len() < 4 {
                return;
            }
            let unit = u16::from_str_radix(hex, 16).unwrap_or(0xFFFD);
            self.escape = None;
            self.state = StreamState::InResponse;
            match (self.high_surrogate.take(), unit) {
                (None, 0xD800..=0xDBFF) => self.high_surrogate = Some(unit),
                (Some(high), 0xDC00..=0xDFFF) => {
                    out.push(char::decode_utf16([high, unit]).next().and_then(Result::ok).unwrap_or('\u{FFFD}'));
                }
                (Some(_), unit) => {
                    out.push('\u{FFFD}');
                    out.push(char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}'));
                }
                (None, unit) => out.push(char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}')),
            }
            return;
        }
        self.state = StreamState::InResponse;
        let decoded = match c {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'u' => {
                self.escape = Some(String::new());
                self.state = StreamState::AfterEscape;
                return;
            }
            other => other,
        };
        if self.high_surrogate.take().is_some() {
            out.push('\u{FFFD}');
        }
        out.push(decoded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::toolset::ToolSide;

    fn tools() -> Vec<OfferedTool> {
        vec![
            OfferedTool::new(
                "clock.now".into(),
                "the time".into(),
                json!({"type": "object", "properties": {"zone": {"enum": ["UTC", "Europe/Berlin"]}}, "required": ["zone"]}),
                ToolSide::Plugin,
            )
            .unwrap(),
            OfferedTool::new("lights.off".into(), "lights off".into(), json!({"type": "object"}), ToolSide::Client).unwrap(),
        ]
    }

    fn stream_all(pieces: &[&str]) -> (String, bool) {
        let mut stream = ResponseStream::default();
        let text: String = pieces.iter().map(|piece| stream.push(piece)).collect();
        (text, stream.is_call())
    }

    #[test]
    fn streams_the_answer_text_only() {
        assert_eq!(stream_all(&["{\"resp", "onse\": \"Hel", "lo\\nwor", "ld\"}"]), ("Hello\nworld".into(), false));
        assert_eq!(stream_all(&[" {\n  \"response\"  :  \"a\\\"b\\\\c\"", "}"]), ("a\"b\\c".into(), false));
    }

    #[test]
    fn decodes_unicode_escapes_split_anywhere() {
        let whole = "{\"response\": \"caf\\u00e9 \\ud83e\\udd80!\"}";
        for split in 0..whole.len() {
            let (a, b) = whole.split_at(split);
            assert_eq!(stream_all(&[a, b]).0, "café 🦀!", "split at {split}");
        }
        assert_eq!(stream_all(&["{\"response\": \"\\ud83e\\n\"}"]).0, "\u{FFFD}\n", "a lone surrogate");
    }

    #[test]
    fn a_tool_call_streams_nothing() {
        assert_eq!(stream_all(&["{\"tool_call\": {\"name\": \"x\", \"arguments\": {\"response\": \"no\"}}}"]), (String::new(), true));
        assert_eq!(stream_all(&["[1]"]), (String::new(), true));
    }

    #[test]
    fn parses_answers_and_calls() {
        assert_eq!(parse_reply(" {\"response\": \"hi\"} ").unwrap(), ModelReply::Answer("hi".into()));
        assert_eq!(
            parse_reply("{\"tool_call\": {\"name\": \"clock.now\", \"arguments\": {\"zone\": \"UTC\"}}}").unwrap(),
            ModelReply::Calls(vec![ParsedCall { name: "clock.now".into(), arguments: json!({"zone": "UTC"}) }])
        );
    }

    #[test]
    fn malformed_and_truncated_replies_are_explained() {
        assert!(parse_reply("{\"tool_call\": {\"name\": \"clock.n").unwrap_err().contains("not one complete JSON object"));
        assert!(parse_reply("{\"answer\": 1}").unwrap_err().contains("neither"));
        assert!(parse_reply("{\"response\": 5}").unwrap_err().contains("string"));
        assert!(parse_reply("{\"tool_call\": {\"arguments\": {}}}").unwrap_err().contains("name"));
        assert!(parse_reply("").is_err());
    }

    #[test]
    fn the_schema_follows_the_mode() {
        let tools = tools();
        let auto = reply_schema(&tools, &StepMode::Auto);
        assert_eq!(auto["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(auto["anyOf"][0]["properties"]["tool_call"]["anyOf"].as_array().unwrap().len(), 2);
        let forced = reply_schema(&tools, &StepMode::Force("lights.off".into()));
        let calls = forced["properties"]["tool_call"]["anyOf"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["properties"]["name"]["const"], "lights.off");
        let answer = reply_schema(&tools, &StepMode::AnswerOnly);
        assert_eq!(answer["required"][0], "response");
    }

    #[test]
    fn grammars_build_for_every_mode() {
        let tools = tools();
        for mode in [StepMode::Auto, StepMode::Required, StepMode::Force("clock.now".into()), StepMode::AnswerOnly] {
            let gbnf = crate::tools::schema_grammar(&reply_schema(&tools, &mode)).unwrap_or_else(|err| panic!("{mode:?}: {err}"));
            assert!(gbnf.contains("root ::="), "{gbnf}");
            assert!(gbnf.contains("space ::= \" \"?") && !gbnf.contains("\\n\"{1,2}"), "compact: {gbnf}");
            if mode != StepMode::AnswerOnly {
                assert!(gbnf.contains("clock.now") || matches!(mode, StepMode::Force(_)), "{gbnf}");
            }
        }
    }

    #[test]
    fn the_instruction_lists_every_tool_and_the_step_says_which() {
        let tools = tools();
        let text = system_instruction(&tools);
        assert!(text.contains("clock.now") && text.contains("lights.off"), "{text}");
        assert!(step_instruction(&StepMode::Force("clock.now".into())).contains("clock.now"));
        assert!(step_instruction(&StepMode::AnswerOnly).contains("response"));
    }
}
