//! The JSON-schema limits (`tools::schema_guard::check` with the default `SchemaLimits`):
//! schema-shaped JSON with `$ref`s that may form cycles, deep nesting, many properties, long
//! names and literals, huge repetition bounds. Nothing may panic; what the check accepts,
//! llama.cpp's schema-to-grammar conversion (`tools::schema_grammar`) takes without crashing.

use std::time::{Duration, Instant};

use phi3d::tools::schema_guard::{SchemaLimits, check};
use proptest::prelude::*;
use serde_json::Value;

use crate::fuzz;
use crate::strategies::{Json, json, json_leaf, number_text, odd_string, or_any, some_of};

/// Definition names: few, so that `$ref`s often hit one and cycles form.
const NAMES: &[&str] = &["a", "b", "c", "d"];

fn name() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(NAMES).prop_map(str::to_owned),
        1 => odd_string(),
        1 => (1usize..400).prop_map(|n| "n".repeat(n)),
    ]
    .boxed()
}

fn reference() -> BoxedStrategy<Json> {
    prop_oneof![
        6 => prop::sample::select(NAMES).prop_map(|name| Json::Str(format!("#/$defs/{name}"))),
        1 => prop::sample::select(NAMES).prop_map(|name| Json::Str(format!("#/definitions/{name}"))),
        1 => prop::sample::select(&["#", "#/", "#/properties/a", "#/$defs", "#/$defs/a/properties/a", "#/$defs/%61", "#/$defs/a~1b", "other.json#/a", "#/items/0", "#/$defs/"][..]).prop_map(Json::str),
        1 => json_leaf(),
    ]
    .boxed()
}

fn count() -> BoxedStrategy<Json> {
    prop_oneof![
        3 => (0u64..8).prop_map(|n| Json::Number(n.to_string())),
        1 => (0u64..5000).prop_map(|n| Json::Number(n.to_string())),
        1 => number_text().prop_map(Json::Number),
    ]
    .boxed()
}

fn leaf_schema() -> BoxedStrategy<Json> {
    let types = prop::sample::select(&["string", "integer", "number", "boolean", "null", "object", "array", "other"][..]);
    let kind = prop_oneof![
        4 => types.clone().prop_map(Json::str),
        1 => prop::collection::vec(types.prop_map(Json::str), 0..3).prop_map(Json::Array),
    ];
    let pattern = prop_oneof![
        prop::sample::select(&["^[a-z]+$", "^(a|b)*$", "[", "(((((a)))))", "^\\d{3}-\\d{4}$", ".*", "a{1000}", "(a*)*b"][..]).prop_map(Json::str),
        odd_string().prop_map(Json::Str),
    ];
    let format = prop::sample::select(&["date", "time", "date-time", "uuid", "email", "uri", "weird"][..]).prop_map(Json::str);
    or_any(
        some_of(vec![
            ("type", kind.boxed()),
            ("enum", prop::collection::vec(json_leaf(), 0..6).prop_map(Json::Array).boxed()),
            ("const", json(2)),
            ("minLength", count()),
            ("maxLength", count()),
            ("pattern", pattern.boxed()),
            ("format", format.boxed()),
            ("minimum", number_text().prop_map(Json::Number).boxed()),
            ("maximum", number_text().prop_map(Json::Number).boxed()),
            ("description", odd_string().prop_map(Json::Str).boxed()),
            ("$ref", reference()),
        ]),
        10,
    )
}

/// A schema node, nested up to `depth` levels.
fn node(depth: u32) -> BoxedStrategy<Json> {
    leaf_schema()
        .prop_recursive(depth, 96, 6, |inner| {
            let properties = prop::collection::vec((name(), inner.clone()), 0..6).prop_map(Json::Object);
            let required = prop::collection::vec(name().prop_map(Json::Str), 0..4).prop_map(Json::Array);
            let list = prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array);
            prop_oneof![
                some_of(vec![
                    ("type", Just(Json::str("object")).boxed()),
                    ("properties", properties.boxed()),
                    ("required", required.boxed()),
                    ("additionalProperties", prop_oneof![any::<bool>().prop_map(Json::Bool).boxed(), inner.clone()].boxed()),
                    ("minProperties", count()),
                    ("maxProperties", count()),
                ]),
                some_of(vec![
                    ("type", Just(Json::str("array")).boxed()),
                    ("items", inner.clone()),
                    ("prefixItems", list.clone().boxed()),
                    ("minItems", count()),
                    ("maxItems", count()),
                    ("uniqueItems", any::<bool>().prop_map(Json::Bool).boxed()),
                ]),
                some_of(vec![("anyOf", list.clone().boxed()), ("oneOf", list.clone().boxed()), ("allOf", list.boxed())]),
                some_of(vec![("$ref", reference()), ("description", odd_string().prop_map(Json::Str).boxed())]),
            ]
        })
        .boxed()
}

/// A whole schema: a node, often with `$defs` (or `definitions`) the `$ref`s can point at.
pub fn schema_json() -> BoxedStrategy<Json> {
    let defs = prop::collection::vec((name(), node(4)), 0..5).prop_map(Json::Object);
    (node(6), prop::option::weighted(0.6, defs), any::<bool>())
        .prop_map(|(root, defs, legacy)| match (root, defs) {
            (Json::Object(mut members), Some(defs)) => {
                members.push((if legacy { "definitions" } else { "$defs" }.to_owned(), defs));
                Json::Object(members)
            }
            (root, _) => root,
        })
        .boxed()
}

/// Schemas past each limit in one way: many properties, long names, deep nesting, huge bounds.
fn oversized() -> BoxedStrategy<Value> {
    prop_oneof![
        (100usize..20_000).prop_map(|n| {
            let properties: serde_json::Map<String, Value> = (0..n).map(|i| (format!("p{i}"), serde_json::json!({"type": "string"}))).collect();
            serde_json::json!({"type": "object", "properties": properties})
        }),
        (200usize..200_000).prop_map(|n| serde_json::json!({"type": "object", "properties": {"x".repeat(n): {"type": "string"}}})),
        (50usize..120).prop_map(|depth| {
            let mut schema = serde_json::json!({"type": "string"});
            for _ in 0..depth {
                schema = serde_json::json!({"type": "array", "items": schema});
            }
            schema
        }),
        (1000u64..u64::MAX).prop_map(|n| serde_json::json!({"type": "string", "minLength": n})),
        (2usize..64).prop_map(|n| {
            // A chain of $refs of length n that closes on itself.
            let defs: serde_json::Map<String, Value> = (0..n).map(|i| (format!("d{i}"), serde_json::json!({"$ref": format!("#/$defs/d{}", (i + 1) % n)}))).collect();
            serde_json::json!({"$ref": "#/$defs/d0", "$defs": defs})
        }),
    ]
    .boxed()
}

#[test]
fn schema_checks_never_panic_and_what_passes_converts() {
    let limits = SchemaLimits::default();
    let schemas = prop_oneof![
        6 => or_any(schema_json(), 10).prop_filter_map("JSON serde_json reads", |json| serde_json::from_str::<Value>(&json.text()).ok()),
        1 => oversized(),
    ];
    let slowest = std::sync::Mutex::new(Duration::ZERO);
    fuzz("tools::schema_guard::check", schemas, |schema| {
        let started = Instant::now();
        let checked = check(&schema, &limits);
        prop_assert!(started.elapsed() < Duration::from_secs(2), "the check took {:?}", started.elapsed());
        if let Err(rejection) = checked {
            prop_assert!(!rejection.problem.is_empty() && !rejection.fix.is_empty(), "{rejection:?}");
            return Ok(());
        }
        // Accepted: llama.cpp's converter may refuse it, but must not crash or take long.
        let started = Instant::now();
        let _ = phi3d::tools::schema_grammar(&schema);
        let took = started.elapsed();
        let mut slowest = slowest.lock().unwrap();
        *slowest = (*slowest).max(took);
        prop_assert!(took < Duration::from_secs(10), "converting an accepted schema took {took:?}: {schema}");
        Ok(())
    });
    println!("fuzz tools::schema_grammar: slowest conversion of an accepted schema {:?}", slowest.into_inner().unwrap());
}

/// The cases the issue saw take the daemon down are refused by the default limits.
#[test]
fn the_schemas_that_crashed_phi3d_are_refused() {
    let limits = SchemaLimits::default();
    let cycle = serde_json::json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}});
    let long_name = serde_json::json!({"type": "object", "properties": {"x".repeat(200_000): {"type": "string"}}});
    let options: serde_json::Map<String, Value> = (0..20_000).map(|i| (format!("p{i}"), serde_json::json!({"type": "string"}))).collect();
    let many = serde_json::json!({"type": "object", "properties": options});
    for schema in [cycle, long_name, many] {
        assert!(check(&schema, &limits).is_err(), "accepted: {}", &schema.to_string()[..200.min(schema.to_string().len())]);
    }
}
