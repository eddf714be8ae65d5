//! Drives the built `phi3d-plugin-homeassistant` binary over stdio, as phi3d does, against a
//! fake Home Assistant REST API served by axum on loopback. The fake records every request, so
//! the tests can see the bearer token and prove that refused calls never reach it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use phi3d_plugin_kit::testing::{Plugin, confine, spawn};
use serde_json::{Value, json};

const TOKEN: &str = "test-token";

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    authorization: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Records the request and says whether it carried the right token.
    fn record(&self, method: Method, uri: &Uri, headers: &HeaderMap, body: Value) -> bool {
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let authorized = authorization == format!("Bearer {TOKEN}");
        self.seen.lock().unwrap().push(Seen {
            method,
            path: uri.path().to_owned(),
            authorization,
            body,
        });
        authorized
    }
}

/// Home Assistant's answer to a missing or wrong token.
fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "401: Unauthorized").into_response()
}

fn states() -> Value {
    json!([
        { "entity_id": "switch.coffee", "state": "off", "attributes": { "friendly_name": "Coffee Machine" }, "last_changed": "2026-05-12T06:00:00+00:00" },
        { "entity_id": "lock.front_door", "state": "locked", "attributes": { "friendly_name": "Front Door" }, "last_changed": "2026-05-12T06:00:00+00:00" },
        { "entity_id": "light.kitchen", "state": "on", "attributes": { "friendly_name": "Kitchen Light", "brightness": 180, "color_mode": "brightness" }, "last_changed": "2026-05-12T07:30:00+00:00" },
        { "entity_id": "sensor.outside_temperature", "state": "12.5", "attributes": { "unit_of_measurement": "°C" }, "last_changed": "2026-05-12T07:00:00+00:00" },
        { "entity_id": "light.porch", "state": "off", "attributes": {}, "last_changed": "2026-05-12T05:00:00+00:00" }
    ])
}

async fn all_states(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !fake.record(method, &uri, &headers, Value::Null) {
        return unauthorized();
    }
    Json(states()).into_response()
}

async fn one_state(
    State(fake): State<Fake>,
    Path(entity_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !fake.record(method, &uri, &headers, Value::Null) {
        return unauthorized();
    }
    if entity_id == "light.slow" {
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    match states()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["entity_id"] == entity_id.as_str())
    {
        Some(state) => Json(state.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": "Entity not found." })),
        )
            .into_response(),
    }
}

async fn call_service(
    State(fake): State<Fake>,
    Path((domain, service)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !fake.record(method, &uri, &headers, body.clone()) {
        return unauthorized();
    }
    match (domain.as_str(), service.as_str()) {
        ("light", "turn_on") => {
            let entity_id = body["entity_id"].as_str().unwrap_or_default();
            Json(json!([{ "entity_id": entity_id, "state": "on", "attributes": { "friendly_name": "Kitchen Light" } }]))
                .into_response()
        }
        ("light", "turn_off") => Json(json!([])).into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "message": format!("Service {domain}.{service} not found.") })),
        )
            .into_response(),
    }
}

/// Serves the fake on an ephemeral loopback port for the rest of the test.
async fn serve_fake() -> (Fake, SocketAddr) {
    let fake = Fake::default();
    let app = Router::new()
        .route("/api/states", get(all_states))
        .route("/api/states/{entity_id}", get(one_state))
        .route("/api/services/{domain}/{service}", post(call_service))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, addr)
}

const PLUGIN: &str = env!("CARGO_BIN_EXE_phi3d-plugin-homeassistant");

/// Starts the plugin with exactly the given environment, as the manifest's [env] would.
async fn start(env: &[(&str, &str)]) -> Plugin {
    spawn(PLUGIN, env, |_| {}).await
}

async fn start_against(url: &str, token: &str) -> Plugin {
    start(&[("HA_URL", url), ("HA_TOKEN", token)]).await
}

#[tokio::test]
async fn tools_say_they_are_unconfigured_until_url_and_token_are_set() {
    let description = |tools: &[rmcp::model::Tool]| {
        tools
            .iter()
            .map(|t| t.description.as_deref().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let bare = start(&[("HA_URL", "http://homeassistant.local:8123"), ("HA_TOKEN", "")]).await;
    let tools = bare.client.list_all_tools().await.expect("tools/list");
    for text in description(&tools) {
        assert!(
            text.starts_with("NOT CONFIGURED (HA_TOKEN is not set"),
            "{text}"
        );
    }
    let configured = start_against("http://127.0.0.1:9", "token").await;
    let tools = configured.client.list_all_tools().await.expect("tools/list");
    assert!(
        description(&tools)
            .iter()
            .all(|text| !text.contains("NOT CONFIGURED")),
        "{tools:?}"
    );
}

#[tokio::test]
async fn lists_tools_with_input_schemas() {
    let plugin = start(&[]).await;
    let info = plugin.client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("phi3d-plugin-homeassistant")
    );
    let tools = plugin.client.list_all_tools().await.expect("tools/list");
    let expected: [(&str, &[&str], &[&str]); 3] = [
        (
            "call_service",
            &["data", "domain", "entity_id", "service"],
            &["domain", "entity_id", "service"],
        ),
        ("get_state", &["entity_id"], &["entity_id"]),
        ("list_entities", &["domain"], &[]),
    ];
    assert_eq!(
        tools.iter().map(|t| t.name.as_ref()).collect::<Vec<_>>(),
        expected.map(|(name, ..)| name)
    );
    for (tool, (name, properties, required)) in tools.iter().zip(expected) {
        let schema = Value::Object((*tool.input_schema).clone());
        assert_eq!(schema["type"], "object", "{name}");
        let mut listed: Vec<&str> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
        listed.sort();
        assert_eq!(listed, properties, "{name}");
        for property in properties {
            assert!(
                schema["properties"][*property]["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{name}.{property}"
            );
        }
        let mut listed_required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        listed_required.sort();
        assert_eq!(listed_required, required, "{name}");
    }
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn lists_gets_and_calls_with_the_bearer_token() {
    let (fake, addr) = serve_fake().await;
    // A host name rather than an IP, so that name resolution is exercised too; all of it, and
    // the HTTP, must work without the threads the one-process limit forbids.
    let url = format!("http://localhost:{}/", addr.port());
    let plugin = spawn(PLUGIN, &[("HA_URL", &url), ("HA_TOKEN", TOKEN)], confine).await;

    let (text, listed) = plugin.ok("list_entities", json!({})).await;
    let ids: Vec<&str> = listed["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity_id"].as_str().unwrap())
        .collect();
    // Sorted, and only the allowed domains: no lock, no sensor.
    assert_eq!(ids, ["light.kitchen", "light.porch", "switch.coffee"]);
    assert!(text.contains("light.kitchen (Kitchen Light): on"), "{text}");
    let (_, lights) = plugin
        .ok("list_entities", json!({ "domain": "Light" }))
        .await;
    assert_eq!(lights["total"], 2);

    let (text, state) = plugin
        .ok("get_state", json!({ "entity_id": "light.kitchen" }))
        .await;
    assert_eq!(state["state"], "on");
    assert_eq!(state["attributes"]["brightness"], 180);
    assert!(
        text.contains("Kitchen Light") && text.contains("brightness: 180"),
        "{text}"
    );

    let missing = plugin
        .err("get_state", json!({ "entity_id": "light.attic" }))
        .await;
    assert!(
        missing.contains("no entity 'light.attic'") && missing.contains("list_entities"),
        "{missing}"
    );

    let (text, called) = plugin
        .ok("call_service", json!({ "domain": "light", "service": "turn_on", "entity_id": "light.kitchen", "data": { "brightness_pct": 40 } }))
        .await;
    assert!(text.contains("Kitchen Light) is now on"), "{text}");
    assert_eq!(called["changed"][0]["state"], "on");
    let (text, _) = plugin
        .ok(
            "call_service",
            json!({ "domain": "light", "service": "turn_off", "entity_id": "light.porch" }),
        )
        .await;
    assert!(text.contains("No state changed yet"), "{text}");

    let unknown = plugin
        .err(
            "call_service",
            json!({ "domain": "light", "service": "fly", "entity_id": "light.kitchen" }),
        )
        .await;
    assert!(
        unknown.contains("HTTP 400") && unknown.contains("Service light.fly not found"),
        "{unknown}"
    );

    let seen = fake.seen();
    assert!(
        seen.iter()
            .all(|s| s.authorization == format!("Bearer {TOKEN}")),
        "{seen:?}"
    );
    let paths: Vec<(&Method, &str)> = seen.iter().map(|s| (&s.method, s.path.as_str())).collect();
    assert_eq!(
        paths,
        [
            (&Method::GET, "/api/states"),
            (&Method::GET, "/api/states"),
            (&Method::GET, "/api/states/light.kitchen"),
            (&Method::GET, "/api/states/light.attic"),
            (&Method::POST, "/api/services/light/turn_on"),
            (&Method::POST, "/api/services/light/turn_off"),
            (&Method::POST, "/api/services/light/fly"),
        ]
    );
    assert_eq!(
        seen[4].body,
        json!({ "entity_id": "light.kitchen", "brightness_pct": 40 })
    );

    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn disallowed_domains_never_reach_home_assistant() {
    let (fake, addr) = serve_fake().await;
    let plugin = start_against(&format!("http://127.0.0.1:{}", addr.port()), TOKEN).await;

    let refused = plugin
        .err(
            "call_service",
            json!({ "domain": "lock", "service": "unlock", "entity_id": "lock.front_door" }),
        )
        .await;
    assert!(refused.contains("'lock' is not allowed"), "{refused}");
    assert!(
        refused.contains("climate, cover, fan, light, media_player, scene, switch"),
        "{refused}"
    );
    // An allowed service pointed at a disallowed entity, or smuggling targets through data.
    let sideways = plugin
        .err(
            "call_service",
            json!({ "domain": "switch", "service": "turn_off", "entity_id": "lock.front_door" }),
        )
        .await;
    assert!(sideways.contains("'lock' is not allowed"), "{sideways}");
    let smuggled = plugin
        .err("call_service", json!({ "domain": "light", "service": "turn_on", "entity_id": "light.kitchen", "data": { "area_id": "garage" } }))
        .await;
    assert!(smuggled.contains("area_id"), "{smuggled}");
    let traversal = plugin
        .err(
            "call_service",
            json!({ "domain": "light", "service": "../config", "entity_id": "light.kitchen" }),
        )
        .await;
    assert!(traversal.contains("not a service name"), "{traversal}");
    let state = plugin
        .err("get_state", json!({ "entity_id": "lock.front_door" }))
        .await;
    assert!(state.contains("'lock' is not allowed"), "{state}");
    let listing = plugin
        .err("list_entities", json!({ "domain": "sensor" }))
        .await;
    assert!(listing.contains("'sensor' is not allowed"), "{listing}");
    let shape = plugin
        .err("get_state", json!({ "entity_id": "kitchen light" }))
        .await;
    assert!(shape.contains("light.kitchen"), "{shape}");

    assert!(
        fake.seen().is_empty(),
        "refused calls reached Home Assistant: {:?}",
        fake.seen()
    );
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn allow_list_comes_from_the_environment() {
    let (fake, addr) = serve_fake().await;
    let url = format!("http://127.0.0.1:{}", addr.port());
    let plugin = start(&[
        ("HA_URL", &url),
        ("HA_TOKEN", TOKEN),
        ("HA_ALLOWED_DOMAINS", " Lock, sensor "),
    ])
    .await;
    let (_, listed) = plugin.ok("list_entities", json!({})).await;
    let ids: Vec<&str> = listed["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["lock.front_door", "sensor.outside_temperature"]);
    let light = plugin
        .err("get_state", json!({ "entity_id": "light.kitchen" }))
        .await;
    assert!(light.contains("allowed domains: lock, sensor"), "{light}");
    assert_eq!(fake.seen().len(), 1);
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn http_failures_become_clear_tool_errors() {
    let (fake, addr) = serve_fake().await;
    let url = format!("http://127.0.0.1:{}", addr.port());

    let wrong_token = start_against(&url, "not-the-token").await;
    let rejected = wrong_token
        .err("get_state", json!({ "entity_id": "light.kitchen" }))
        .await;
    assert!(
        rejected.contains("the Home Assistant token was rejected"),
        "{rejected}"
    );
    assert_eq!(fake.seen()[0].authorization, "Bearer not-the-token");
    wrong_token.client.cancel().await.expect("shut down");

    let no_token = start_against(&url, "").await;
    let unset = no_token.err("list_entities", json!({})).await;
    assert!(unset.contains("HA_TOKEN is not set"), "{unset}");
    no_token.client.cancel().await.expect("shut down");

    let no_url = start(&[("HA_TOKEN", TOKEN)]).await;
    let unset = no_url.err("list_entities", json!({})).await;
    assert!(unset.contains("HA_URL is not set"), "{unset}");
    no_url.client.cancel().await.expect("shut down");

    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nobody = start_against(&format!("http://127.0.0.1:{closed}"), TOKEN).await;
    let refused = nobody
        .err("get_state", json!({ "entity_id": "light.kitchen" }))
        .await;
    assert!(
        refused.contains("connection refused") && refused.contains(&closed.to_string()),
        "{refused}"
    );
    nobody.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn a_hanging_home_assistant_times_out() {
    let (_fake, addr) = serve_fake().await;
    let plugin = start_against(&format!("http://127.0.0.1:{}", addr.port()), TOKEN).await;
    let started = std::time::Instant::now();
    let slow = plugin
        .err("get_state", json!({ "entity_id": "light.slow" }))
        .await;
    assert!(slow.contains("did not answer within 8 seconds"), "{slow}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    plugin.client.cancel().await.expect("shut down");
}
