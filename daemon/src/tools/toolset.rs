//! The tools offered in one chat turn: plugin tools and client tools, each with its argument
//! schema compiled once for validation, and the JSON schemas that grammars are built from.

use serde_json::{Value, json};

/// Who runs a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSide {
    /// A sandboxed plugin, run by phi3d.
    Plugin,
    /// The client runs it and sends the result back in its next request.
    Client,
}

/// One tool the model may call.
pub struct OfferedTool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
    pub side: ToolSide,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for OfferedTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfferedTool").field("name", &self.name).field("side", &self.side).finish()
    }
}

impl OfferedTool {
    /// Compiles the tool's schema; an error names what is wrong with it.
    pub fn new(name: String, description: String, parameters: Value, side: ToolSide) -> Result<OfferedTool, String> {
        let validator = jsonschema::validator_for(&parameters)
            .map_err(|err| format!("the parameters schema of tool `{name}` is invalid: {err}"))?;
        Ok(OfferedTool { name, description, parameters, side, validator })
    }

    /// Checks a call's arguments; the error lists every violation so the model can fix them.
    pub fn validate(&self, arguments: &Value) -> Result<(), String> {
        let problems: Vec<String> = self
            .validator
            .iter_errors(arguments)
            .map(|error| {
                let at = error.instance_path().to_string();
                if at.is_empty() { error.to_string() } else { format!("{at}: {error}") }
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the arguments of {} do not match its schema: {}; call it again with arguments that do",
                self.name,
                problems.join("; ")
            ))
        }
    }

    /// How the tool is described to the model.
    pub fn describe(&self) -> Value {
        json!({ "name": self.name, "description": self.description, "parameters": self.parameters })
    }
}

/// What the model must or may do in one generation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepMode {
    /// Call one of the tools or answer.
    Auto,
    /// Call one of the tools.
    Required,
    /// Call this tool.
    Force(String),
    /// Answer in words (no tools left, or the step budget is spent).
    AnswerOnly,
}

/// The schema of one tool call: `{"name": <const>, "arguments": <the tool's schema>}`.
///
/// A tool schema's own `$defs` are moved to the top level under a per-tool prefix (and its
/// `$ref`s rewritten), because a reference inside an embedded schema would otherwise resolve
/// against the combined document.
pub fn call_schema(tool: &OfferedTool, index: usize, defs: &mut serde_json::Map<String, Value>) -> Value {
    let prefix = format!("tool{index}-");
    let mut parameters = tool.parameters.clone();
    if let Some(object) = parameters.as_object_mut() {
        for key in ["$defs", "definitions"] {
            if let Some(Value::Object(local)) = object.remove(key) {
                for (name, schema) in local {
                    defs.insert(format!("{prefix}{name}"), schema);
                }
            }
        }
        object.remove("$schema");
        object.remove("$id");
        // JSON Schema allows unlisted properties unless told otherwise; a grammar that did too
        // would let the model ramble on in made-up keys. Validation still uses the tool's
        // own schema.
        if object.get("type").and_then(Value::as_str) == Some("object") {
            object.entry("additionalProperties").or_insert(Value::Bool(false));
        }
    }
    rewrite_refs(&mut parameters, &prefix);
    json!({
        "type": "object",
        "properties": { "name": { "const": tool.name }, "arguments": parameters },
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

fn rewrite_refs(value: &mut Value, prefix: &str) {
    match value {
        Value::Object(object) => {
            for (key, child) in object.iter_mut() {
                if key == "$ref" {
                    if let Value::String(reference) = child {
                        for local in ["#/$defs/", "#/definitions/"] {
                            if let Some(name) = reference.strip_prefix(local) {
                                *reference = format!("#/$defs/{prefix}{name}");
                                break;
                            }
                        }
                    }
                } else {
                    rewrite_refs(child, prefix);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite_refs(item, prefix)),
        _ => {}
    }
}

/// The tools a step may call, by mode.
pub fn callable<'a>(tools: &'a [OfferedTool], mode: &StepMode) -> Vec<(usize, &'a OfferedTool)> {
    match mode {
        StepMode::AnswerOnly => Vec::new(),
        StepMode::Force(name) => tools.iter().enumerate().filter(|(_, tool)| &tool.name == name).collect(),
        StepMode::Auto | StepMode::Required => tools.iter().enumerate().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, parameters: Value) -> OfferedTool {
        OfferedTool::new(name.into(), format!("{name} tool"), parameters, ToolSide::Plugin).unwrap()
    }

    #[test]
    fn validation_lists_every_problem() {
        let tool = tool(
            "clock.now",
            json!({"type": "object", "properties": {"zone": {"type": "string"}, "n": {"type": "integer"}}, "required": ["zone"]}),
        );
        assert!(tool.validate(&json!({"zone": "UTC"})).is_ok());
        let error = tool.validate(&json!({"n": "x"})).unwrap_err();
        assert!(error.contains("clock.now") && error.contains("zone") && error.contains("/n"), "{error}");
    }

    #[test]
    fn an_invalid_schema_is_refused() {
        let error = OfferedTool::new("bad".into(), String::new(), json!({"type": 12}), ToolSide::Client).unwrap_err();
        assert!(error.contains("bad"), "{error}");
    }

    #[test]
    fn local_definitions_move_to_the_top_with_a_prefix() {
        let tool = tool(
            "t",
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"when": {"$ref": "#/$defs/When"}},
                "$defs": {"When": {"type": "string"}}
            }),
        );
        let mut defs = serde_json::Map::new();
        let schema = call_schema(&tool, 3, &mut defs);
        assert_eq!(defs.get("tool3-When"), Some(&json!({"type": "string"})));
        assert_eq!(schema["properties"]["arguments"]["properties"]["when"]["$ref"], "#/$defs/tool3-When");
        assert!(schema["properties"]["arguments"].get("$schema").is_none());
        assert_eq!(schema["properties"]["arguments"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["name"]["const"], "t");
    }

    #[test]
    fn modes_choose_the_callable_tools() {
        let tools = vec![tool("a", json!({"type": "object"})), tool("b", json!({"type": "object"}))];
        assert_eq!(callable(&tools, &StepMode::Auto).len(), 2);
        let forced = callable(&tools, &StepMode::Force("b".into()));
        assert_eq!(forced.len(), 1);
        assert_eq!(forced[0].0, 1);
        assert!(callable(&tools, &StepMode::AnswerOnly).is_empty());
    }
}
