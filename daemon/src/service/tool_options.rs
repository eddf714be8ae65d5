//! A chat request's `ToolOptions` checked against what exists: which tools are offered, what
//! the first step must do and how many round trips are allowed. Every mistake is
//! INVALID_ARGUMENT naming the field.

use phi3d_proto::v1::{ToolChoice, ToolOptions};
use tonic::Status;

use super::validate::invalid;
use crate::plugins::ToolInfo;
use crate::tools::schema_guard::{self, SchemaLimits};
use crate::tools::toolset::{OfferedTool, StepMode, ToolSide};

/// Round trips allowed when a request does not say.
pub const DEFAULT_MAX_STEPS: u32 = 4;

/// What a tool turn will offer and demand.
pub struct ToolPlan {
    pub tools: Vec<OfferedTool>,
    pub first_mode: StepMode,
    pub max_steps: u32,
}

/// Whether the request may involve tools at all (an unknown choice counts, so that `plan`
/// reports it).
pub fn wants_tools(options: Option<&ToolOptions>, default_choice: ToolChoice) -> bool {
    let Some(options) = options else { return default_choice != ToolChoice::None };
    match ToolChoice::try_from(options.choice) {
        Ok(ToolChoice::Unspecified) => implied_choice(options, default_choice) != ToolChoice::None,
        Ok(choice) => choice != ToolChoice::None || !options.force.is_empty(),
        Err(_) => true,
    }
}

/// A request that forces a tool or brings its own tools but leaves the choice unset means
/// AUTO, whatever the configured default.
fn implied_choice(options: &ToolOptions, default_choice: ToolChoice) -> ToolChoice {
    if !options.force.is_empty() || !options.client_tools.is_empty() { ToolChoice::Auto } else { default_choice }
}

/// `None` when the turn is a plain chat (choice NONE, or AUTO with nothing to call).
///
/// `max_steps_limit` is the configured bound on `tools.max_steps` (`max_tool_steps`); every
/// tool schema must keep to `schema_limits` before it is compiled. Compiling is CPU work:
/// callers run this off the runtime (`offload`).
pub fn plan(
    options: Option<&ToolOptions>,
    default_choice: ToolChoice,
    plugin_tools: &[ToolInfo],
    max_steps_limit: u32,
    schema_limits: &SchemaLimits,
) -> Result<Option<ToolPlan>, Status> {
    let fallback = ToolOptions::default();
    let options = options.unwrap_or(&fallback);
    let choice = match ToolChoice::try_from(options.choice) {
        Ok(ToolChoice::Unspecified) => implied_choice(options, default_choice),
        Ok(choice) => choice,
        Err(_) => return Err(invalid(format!("tools.choice: unknown value {}", options.choice))),
    };
    if choice == ToolChoice::None {
        if !options.force.is_empty() {
            return Err(invalid("tools.force names a tool but tools.choice is TOOL_CHOICE_NONE; drop one of them".into()));
        }
        return Ok(None);
    }
    if options.client_tools_only && !options.allow.is_empty() {
        return Err(invalid("tools.allow names plugin tools but tools.client_tools_only is set; drop one of them".into()));
    }
    let mut tools = Vec::new();
    for (index, name) in options.allow.iter().enumerate() {
        if !plugin_tools.iter().any(|tool| &tool.qualified_name == name) {
            return Err(invalid(format!(
                "tools.allow[{index}]: `{name}` is not a plugin tool; known tools: {}",
                known(plugin_tools)
            )));
        }
    }
    for tool in plugin_tools.iter().filter(|_| !options.client_tools_only) {
        if options.allow.is_empty() || options.allow.contains(&tool.qualified_name) {
            // A tool whose schema does not compile is left out; the others are still offered.
            if let Err(err) = schema_guard::check(&tool.input_schema, schema_limits) {
                tracing::warn!(plugin = %tool.plugin, tool = %tool.qualified_name, "tool not offered: its input schema: {err}");
                continue;
            }
            match OfferedTool::new(tool.qualified_name.clone(), tool.description.clone(), tool.input_schema.clone(), ToolSide::Plugin) {
                Ok(offered) => tools.push(offered),
                Err(err) => tracing::warn!(plugin = %tool.plugin, tool = %tool.qualified_name, "tool not offered: {err}"),
            }
        }
    }
    for (index, client) in options.client_tools.iter().enumerate() {
        if client.name.trim().is_empty() {
            return Err(invalid(format!("tools.client_tools[{index}].name must not be empty")));
        }
        if tools.iter().any(|tool| tool.name == client.name) {
            return Err(invalid(format!("tools.client_tools[{index}].name `{}` is already a tool; choose another name", client.name)));
        }
        let parameters = if client.parameters_json.trim().is_empty() {
            serde_json::json!({ "type": "object" })
        } else {
            serde_json::from_str(&client.parameters_json)
                .map_err(|err| invalid(format!("tools.client_tools[{index}].parameters_json is not JSON: {err}")))?
        };
        schema_guard::check(&parameters, schema_limits)
            .map_err(|err| invalid(format!("tools.client_tools[{index}].parameters_json: {err}")))?;
        let offered = OfferedTool::new(client.name.clone(), client.description.clone(), parameters, ToolSide::Client)
            .map_err(|err| invalid(format!("tools.client_tools[{index}].parameters_json: {err}")))?;
        tools.push(offered);
    }
    let first_mode = if !options.force.is_empty() {
        if !tools.iter().any(|tool| tool.name == options.force) {
            let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_str()).collect();
            return Err(invalid(format!(
                "tools.force: `{}` is not among the offered tools ({})",
                options.force,
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            )));
        }
        StepMode::Force(options.force.clone())
    } else if tools.is_empty() {
        if choice == ToolChoice::Required {
            return Err(invalid("tools.choice is TOOL_CHOICE_REQUIRED but no tool is offered (no plugin tools, no client_tools)".into()));
        }
        return Ok(None);
    } else if choice == ToolChoice::Required {
        StepMode::Required
    } else {
        StepMode::Auto
    };
    if options.max_steps > max_steps_limit {
        return Err(invalid(format!(
            "tools.max_steps is {}; this server allows at most {max_steps_limit} (max_tool_steps)",
            options.max_steps
        )));
    }
    let max_steps = if options.max_steps == 0 { DEFAULT_MAX_STEPS.min(max_steps_limit) } else { options.max_steps };
    Ok(Some(ToolPlan { tools, first_mode, max_steps }))
}

fn known(tools: &[ToolInfo]) -> String {
    if tools.is_empty() {
        return "none (no plugin is installed)".into();
    }
    tools.iter().map(|tool| tool.qualified_name.as_str()).collect::<Vec<_>>().join(", ")
}

