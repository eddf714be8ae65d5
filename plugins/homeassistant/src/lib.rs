//! `phi3d-plugin-homeassistant`: an MCP server on stdio that reads and switches Home Assistant
//! entities through its REST API.
//!
//! Tools: `list_entities`, `get_state` and `call_service`. Configuration comes only from the
//! environment the manifest passes: `HA_URL`, `HA_TOKEN` (a long-lived access token) and
//! `HA_ALLOWED_DOMAINS`, the comma-separated domains the model may see and act on. A request
//! outside those domains is refused before anything is sent. Every failure, from a bad
//! argument to a rejected token, is a tool error (`isError: true`) worded for the model.

mod ha;

use ha::HomeAssistant;
use rmcp::{
    ServerHandler, ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, ContentBlock},
    tool, tool_handler, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Most entities `list_entities` shows; a house can have thousands, and the host caps output.
const MAX_LISTED: usize = 200;
/// Longest attribute value quoted in `get_state`'s text (lists of effects or sources get long).
const MAX_ATTRIBUTE_CHARS: usize = 200;
/// Keys that pick targets; in `data` they would reach entities the `entity_id` check never saw.
const TARGET_KEYS: [&str; 5] = ["entity_id", "device_id", "area_id", "floor_id", "label_id"];

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListEntitiesArgs {
    /// Only list entities of this domain, such as "light" or "switch". Leave out to list all allowed domains.
    domain: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetStateArgs {
    /// The entity to read, such as "light.kitchen".
    entity_id: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CallServiceArgs {
    /// Service domain, such as "light".
    domain: String,
    /// Service name within the domain, such as "turn_on", "turn_off" or "toggle".
    service: String,
    /// The entity to act on, such as "light.kitchen".
    entity_id: String,
    /// Extra service data, such as {"brightness_pct": 50} for light.turn_on. Leave out if none.
    data: Option<Map<String, Value>>,
}

/// A tool's answer: readable text for the model, the same facts as JSON for programs.
fn answer(text: String, structured: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(structured);
    result
}

/// Normalises a model-written name; Home Assistant's names are always lower case.
fn normalise(text: &str) -> String {
    text.trim().to_ascii_lowercase()
}

fn field<'v>(state: &'v Value, key: &str) -> &'v str {
    state.get(key).and_then(Value::as_str).unwrap_or("")
}

fn friendly_name(state: &Value) -> &str {
    state
        .pointer("/attributes/friendly_name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// "light.kitchen (Kitchen Light)", or just the id when there is no friendly name.
fn label(state: &Value) -> String {
    match friendly_name(state) {
        "" => field(state, "entity_id").to_owned(),
        name => format!("{} ({name})", field(state, "entity_id")),
    }
}

fn shorten(text: String, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

struct Plugin {
    ha: HomeAssistant,
    tool_router: ToolRouter<Self>,
}

// A tool body's `Err(message)` reaches the model as a tool error (`isError: true`) carrying
// that message; rmcp does the same for arguments that do not fit the schema.
#[tool_router]
impl Plugin {
    /// Until `HA_URL` and `HA_TOKEN` are set, every tool's description starts by saying so,
    /// so that `phi3d tools` shows the plugin as unconfigured and the model can tell the user.
    fn new(ha: HomeAssistant) -> Self {
        let mut tool_router = Self::tool_router();
        if let Some(problem) = ha.configuration_problem() {
            for route in tool_router.map.values_mut() {
                let description = route.attr.description.as_deref().unwrap_or_default();
                route.attr.description = Some(format!("NOT CONFIGURED ({problem}). {description}").into());
            }
        }
        Self { ha, tool_router }
    }

    /// An entity id in an allowed domain, or why not.
    fn allowed_entity(&self, entity_id: &str) -> Result<String, String> {
        let entity_id = normalise(entity_id);
        self.ha.check_domain(ha::entity_domain(&entity_id)?)?;
        Ok(entity_id)
    }

    #[tool(
        description = "List Home Assistant entities (id, name, state) in the allowed domains, optionally only one domain.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn list_entities(
        &self,
        Parameters(args): Parameters<ListEntitiesArgs>,
    ) -> Result<CallToolResult, String> {
        let only = args
            .domain
            .as_deref()
            .map(normalise)
            .filter(|d| !d.is_empty());
        if let Some(domain) = &only {
            self.ha.check_domain(domain)?;
        }
        let states = self
            .ha
            .get(
                "states",
                "Home Assistant has no /api/states endpoint; is HA_URL right?",
            )
            .await?;
        let mut entities: Vec<&Value> = states
            .as_array()
            .ok_or("Home Assistant's state list is not a JSON array")?
            .iter()
            .filter(|state| {
                let domain = ha::entity_domain(field(state, "entity_id")).unwrap_or_default();
                self.ha.check_domain(domain).is_ok()
                    && only.as_deref().is_none_or(|only| only == domain)
            })
            .collect();
        entities.sort_by_key(|state| field(state, "entity_id"));
        let scope = match &only {
            Some(domain) => format!("domain '{domain}'"),
            None => format!(
                "the allowed domains ({})",
                self.ha.allowed_domains().collect::<Vec<_>>().join(", ")
            ),
        };
        let total = entities.len();
        entities.truncate(MAX_LISTED);
        let mut text = if total == 0 {
            format!("No entities in {scope}.")
        } else {
            format!("{total} entities in {scope}:")
        };
        for state in &entities {
            text.push_str(&format!("\n{}: {}", label(state), field(state, "state")));
        }
        if total > MAX_LISTED {
            text.push_str(&format!(
                "\n… and {} more; pass a domain to see fewer.",
                total - MAX_LISTED
            ));
        }
        let listed: Vec<Value> = entities
            .iter()
            .map(|s| json!({ "entity_id": field(s, "entity_id"), "name": friendly_name(s), "state": field(s, "state") }))
            .collect();
        Ok(answer(text, json!({ "entities": listed, "total": total })))
    }

    #[tool(
        description = "Get the current state and attributes of one Home Assistant entity.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn get_state(
        &self,
        Parameters(args): Parameters<GetStateArgs>,
    ) -> Result<CallToolResult, String> {
        let entity_id = self.allowed_entity(&args.entity_id)?;
        let missing = format!(
            "there is no entity '{entity_id}' in Home Assistant; call list_entities to see the valid ids"
        );
        let state = self
            .ha
            .get(&format!("states/{entity_id}"), &missing)
            .await?;
        let mut text = format!("{} is {}", label(&state), field(&state, "state"));
        if let Some(since) = state.get("last_changed").and_then(Value::as_str) {
            text.push_str(&format!(" (since {since})"));
        }
        text.push('.');
        let attributes: Vec<String> = state
            .get("attributes")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(key, _)| *key != "friendly_name")
            .map(|(key, value)| {
                let value = match value {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                format!("{key}: {}", shorten(value, MAX_ATTRIBUTE_CHARS))
            })
            .collect();
        if !attributes.is_empty() {
            text.push_str(&format!("\nAttributes: {}", attributes.join("; ")));
        }
        Ok(answer(text, state))
    }

    #[tool(
        description = "Call a Home Assistant service on one entity, such as light.turn_on for light.kitchen. Only allowed domains can be used.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = true
        )
    )]
    async fn call_service(
        &self,
        Parameters(args): Parameters<CallServiceArgs>,
    ) -> Result<CallToolResult, String> {
        let domain = normalise(&args.domain);
        let service = normalise(&args.service);
        if !ha::is_slug(&domain) || !ha::is_slug(&service) {
            return Err(format!(
                "'{domain}.{service}' is not a service name; give the domain and service separately, \
                 e.g. domain \"light\" and service \"turn_on\""
            ));
        }
        self.ha.check_domain(&domain)?;
        let entity_id = self.allowed_entity(&args.entity_id)?;
        let mut body = args.data.unwrap_or_default();
        if let Some(key) = TARGET_KEYS.iter().find(|key| body.contains_key(**key)) {
            return Err(format!(
                "'{key}' cannot be given in data; name the one entity to act on in entity_id"
            ));
        }
        body.insert("entity_id".into(), entity_id.clone().into());
        let missing = format!("Home Assistant has no service '{domain}.{service}'");
        let changed = self
            .ha
            .post(
                &format!("services/{domain}/{service}"),
                Value::Object(body),
                &missing,
            )
            .await?;
        // Home Assistant replies with the states that changed while the call ran; a device that
        // reports back later, or one already in the asked-for state, leaves this empty.
        let changed: Vec<&Value> = changed.as_array().into_iter().flatten().collect();
        let mut text = format!("Called {domain}.{service} for {entity_id}.");
        if changed.is_empty() {
            text.push_str(" No state changed yet; call get_state to check.");
        }
        for state in &changed {
            text.push_str(&format!(
                " {} is now {}.",
                label(state),
                field(state, "state")
            ));
        }
        let changed: Vec<Value> = changed
            .iter()
            .map(|s| json!({ "entity_id": field(s, "entity_id"), "state": field(s, "state") }))
            .collect();
        Ok(answer(
            text,
            json!({ "service": format!("{domain}.{service}"), "entity_id": entity_id, "changed": changed }),
        ))
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "phi3d-plugin-homeassistant",
    instructions = "Controls the user's Home Assistant smart home: list entities, read a state, call a service such as light.turn_on. Only some domains are allowed."
)]
impl ServerHandler for Plugin {}

/// Serves MCP on stdin and stdout until the client closes them: what the plugin's binary runs,
/// and what `phi3d` runs when it is started under the plugin's name.
pub fn serve_stdio() -> Result<(), Box<dyn std::error::Error>> {
    // reqwest is built without a crypto backend, so https:// HA_URLs need one installed. It
    // returns Err only when a provider is installed already, which nothing else here does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the sandbox caps processes (threads count too) and memory, and the plugin
    // serves one call at a time anyway.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let plugin = Plugin::new(HomeAssistant::from_env()?);
        // Anything but pipes (a terminal, a file) gets Tokio's thread-backed stdio instead.
        let server = match phi3d_plugin_kit::stdio::pipes() {
            Some(pipes) => plugin.serve(pipes).await?,
            None => plugin.serve(rmcp::transport::stdio()).await?,
        };
        server.waiting().await?;
        Ok(())
    })
}
