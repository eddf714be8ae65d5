//! Drives the built `phi3d-plugin-clock` binary over stdio the way phi3d does: an rmcp client
//! on the child's pipes, with the environment cleared except for `TZ`.

use std::time::{SystemTime, UNIX_EPOCH};

use phi3d_plugin_kit::testing::{Plugin, confine, text};
use serde_json::{Value, json};

/// The plugin's local zone in these tests; picked to have DST so calendar arithmetic shows.
const LOCAL_ZONE: &str = "Europe/Berlin";

async fn start() -> Plugin {
    spawn(|_| {}).await
}

async fn spawn(setup: impl FnOnce(&mut tokio::process::Command)) -> Plugin {
    phi3d_plugin_kit::testing::spawn(
        env!("CARGO_BIN_EXE_phi3d-plugin-clock"),
        &[("TZ", LOCAL_ZONE)],
        setup,
    )
    .await
}

/// Structured content of a call that must succeed; every clock answer also has its text.
async fn ok(plugin: &Plugin, tool: &str, arguments: Value) -> Value {
    let result = plugin.succeeded(tool, arguments).await;
    assert!(!text(&result).is_empty(), "{tool} gave no text");
    result.structured_content.expect("structured content")
}

#[tokio::test]
async fn lists_tools_with_flat_input_schemas() {
    let plugin = start().await;
    let info = plugin.client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("phi3d-plugin-clock")
    );

    let tools = plugin.client.list_all_tools().await.expect("tools/list");
    let expected: [(&str, &[&str], &[&str]); 4] = [
        (
            "add_duration",
            &[
                "start",
                "time_zone",
                "years",
                "months",
                "weeks",
                "days",
                "hours",
                "minutes",
                "seconds",
            ],
            &[],
        ),
        (
            "convert_time",
            &["time", "from_time_zone", "to_time_zone"],
            &["time", "to_time_zone"],
        ),
        ("difference", &["start", "end", "time_zone"], &[]),
        ("now", &["time_zone"], &[]),
    ];
    assert_eq!(
        tools.iter().map(|t| t.name.as_ref()).collect::<Vec<_>>(),
        expected.map(|(name, ..)| name)
    );
    for (tool, (name, properties, required)) in tools.iter().zip(expected) {
        let schema = Value::Object((*tool.input_schema).clone());
        assert_eq!(schema["type"], "object", "{name}");
        let listed = schema["properties"].as_object().expect("properties");
        assert_eq!(listed.len(), properties.len(), "{name}: {listed:?}");
        for property in properties {
            let description = listed[*property]["description"]
                .as_str()
                .unwrap_or_default();
            assert!(!description.is_empty(), "{name}.{property} is undocumented");
        }
        let mut listed_required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        listed_required.sort();
        let mut required = required.to_vec();
        required.sort();
        assert_eq!(listed_required, required, "{name}");
        assert!(
            tool.description.as_deref().is_some_and(|d| !d.is_empty()),
            "{name}"
        );
    }
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn now_matches_the_test_clock_and_the_local_zone() {
    let plugin = start().await;
    let now = ok(&plugin, "now", json!({ "time_zone": "UTC" })).await;
    let ours = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let theirs = now["unix_seconds"].as_i64().expect("unix_seconds");
    assert!(
        (theirs - ours).abs() <= 5,
        "plugin says {theirs}, test clock says {ours}"
    );
    assert_eq!(now["time_zone"], "UTC");
    assert_eq!(now["utc_offset"], "+00:00");
    assert!(
        now["datetime"].as_str().unwrap().ends_with("+00:00[UTC]"),
        "{now}"
    );
    let weekday = now["weekday"].as_str().unwrap();
    assert!(
        [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday"
        ]
        .contains(&weekday)
    );

    // No argument: the zone the manifest passed in TZ.
    let local = ok(&plugin, "now", json!({})).await;
    assert_eq!(local["time_zone"], LOCAL_ZONE);
    assert!(
        ["+01:00", "+02:00"].contains(&local["utc_offset"].as_str().unwrap()),
        "{local}"
    );

    // A bare city is accepted when it names exactly one zone.
    let tokyo = ok(&plugin, "now", json!({ "time_zone": "tokyo" })).await;
    assert_eq!(tokyo["time_zone"], "Asia/Tokyo");
    assert_eq!(tokyo["utc_offset"], "+09:00");
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn add_duration_is_exact_and_calendar_aware() {
    let plugin = start().await;
    let cases = [
        // Berlin springs forward on 2024-03-31: a calendar day keeps the wall clock time...
        (
            json!({ "start": "2024-03-30 12:00", "time_zone": "Europe/Berlin", "days": 1 }),
            "2024-03-31T12:00:00+02:00[Europe/Berlin]",
        ),
        // ...while 24 hours are 24 real hours.
        (
            json!({ "start": "2024-03-30 12:00", "time_zone": "Europe/Berlin", "hours": 24 }),
            "2024-03-31T13:00:00+02:00[Europe/Berlin]",
        ),
        // Month arithmetic clamps to the last day of a shorter month (2024 is a leap year).
        (
            json!({ "start": "2024-01-31T10:00", "time_zone": "UTC", "months": 1 }),
            "2024-02-29T10:00:00+00:00[UTC]",
        ),
        (
            json!({ "start": "2024-01-01 00:00", "time_zone": "UTC", "minutes": -90 }),
            "2023-12-31T22:30:00+00:00[UTC]",
        ),
        (
            json!({ "start": "2025-06-15", "time_zone": "UTC", "years": 1, "weeks": 2, "hours": 3, "minutes": 4, "seconds": 5 }),
            "2026-06-29T03:04:05+00:00[UTC]",
        ),
        // Loosely written times: a 12-hour clock, single-digit fields; and a start with its
        // own offset, shown in the requested zone.
        (
            json!({ "start": "2026-05-12 3:15 pm", "time_zone": "UTC", "hours": 1 }),
            "2026-05-12T16:15:00+00:00[UTC]",
        ),
        (
            json!({ "start": "2026-5-3 9:05", "time_zone": "UTC", "minutes": 55 }),
            "2026-05-03T10:00:00+00:00[UTC]",
        ),
        (
            json!({ "start": "2026-05-12T10:00:00Z", "time_zone": "Asia/Tokyo", "days": -1 }),
            "2026-05-11T19:00:00+09:00[Asia/Tokyo]",
        ),
    ];
    for (arguments, expected) in cases {
        let result = ok(&plugin, "add_duration", arguments.clone()).await;
        assert_eq!(result["result"]["datetime"], expected, "{arguments}");
    }

    let from_now = ok(
        &plugin,
        "add_duration",
        json!({ "time_zone": "UTC", "hours": 2 }),
    )
    .await;
    let start = from_now["start"]["unix_seconds"].as_i64().unwrap();
    assert_eq!(
        from_now["result"]["unix_seconds"].as_i64().unwrap() - start,
        7200
    );

    let mixed = plugin
        .err("add_duration", json!({ "days": 1, "hours": -2 }))
        .await;
    assert!(mixed.contains("same way"), "{mixed}");
    let nothing = plugin
        .err("add_duration", json!({ "start": "2024-01-01" }))
        .await;
    assert!(nothing.contains("at least one"), "{nothing}");
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn convert_time_and_difference() {
    let plugin = start().await;
    let converted = ok(&plugin, "convert_time", json!({ "time": "2026-07-01 09:00", "from_time_zone": "America/New_York", "to_time_zone": "Asia/Tokyo" }))
        .await;
    assert_eq!(
        converted["from"]["datetime"],
        "2026-07-01T09:00:00-04:00[America/New_York]"
    );
    assert_eq!(
        converted["to"]["datetime"],
        "2026-07-01T22:00:00+09:00[Asia/Tokyo]"
    );
    assert_eq!(converted["to"]["weekday"], "Wednesday");

    // Without from_time_zone the time is read in the local zone (CEST in July).
    let local = ok(
        &plugin,
        "convert_time",
        json!({ "time": "2026-07-01 12:00", "to_time_zone": "UTC" }),
    )
    .await;
    assert_eq!(local["to"]["datetime"], "2026-07-01T10:00:00+00:00[UTC]");

    let difference = ok(
        &plugin,
        "difference",
        json!({ "start": "2024-01-01", "end": "2024-03-01 06:30", "time_zone": "UTC" }),
    )
    .await;
    assert_eq!(
        difference["total_seconds"],
        60 * 86_400 + 6 * 3_600 + 30 * 60
    );
    assert_eq!(difference["difference"], "2 months, 6 hours, 30 minutes");

    let backwards = ok(
        &plugin,
        "difference",
        json!({ "start": "2024-01-02", "end": "2024-01-01", "time_zone": "UTC" }),
    )
    .await;
    assert_eq!(backwards["total_seconds"], -86_400);
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn bad_input_is_a_tool_error_the_model_can_act_on() {
    let plugin = start().await;
    let zone = plugin
        .err("now", json!({ "time_zone": "Mars/Olympus_Mons" }))
        .await;
    assert!(
        zone.contains("Mars/Olympus_Mons")
            && zone.contains("IANA")
            && zone.contains("Europe/Berlin"),
        "{zone}"
    );

    let target = plugin
        .err(
            "convert_time",
            json!({ "time": "12:00", "to_time_zone": "PST" }),
        )
        .await;
    assert!(target.contains("'PST'"), "{target}");

    let time = plugin
        .err(
            "convert_time",
            json!({ "time": "half past teatime", "to_time_zone": "UTC" }),
        )
        .await;
    assert!(time.contains("YYYY-MM-DD HH:MM"), "{time}");

    // Arguments that do not fit the schema are tool errors too, naming the right field.
    let field = plugin.err("now", json!({ "timezone": "UTC" })).await;
    assert!(field.contains("time_zone"), "{field}");
    let missing = plugin.err("convert_time", json!({ "time": "12:00" })).await;
    assert!(missing.contains("to_time_zone"), "{missing}");

    // The plugin survived all of it.
    ok(&plugin, "now", json!({})).await;
    plugin.client.cancel().await.expect("shut down");
}

#[tokio::test]
async fn serves_under_a_one_process_limit() {
    let plugin = spawn(confine).await;
    // Zone lookups, the city search and the stdio transport all stay on the one thread.
    let tokyo = ok(&plugin, "now", json!({ "time_zone": "tokyo" })).await;
    assert_eq!(tokyo["time_zone"], "Asia/Tokyo");
    ok(&plugin, "difference", json!({ "start": "2024-01-01" })).await;
    plugin.err("now", json!({ "time_zone": "Nowhere" })).await;
    plugin.client.cancel().await.expect("shut down");
}
