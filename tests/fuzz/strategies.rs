//! Input generators shared by the targets: JSON written as text (so that numbers serde_json
//! cannot hold exactly, duplicate keys and odd escapes appear), JSON values, TOML-ish text, and
//! mutations that turn valid documents into nearly valid ones.

use proptest::prelude::*;
use serde_json::Value;

/// Strings a client or a model might send: anything, words the parsers look for, control
/// characters, escapes' look-alikes, private-use and non-BMP characters, long runs.
pub fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        3 => "[a-z_]{0,12}",
        3 => prop::sample::select(WORDS).prop_map(str::to_owned),
        1 => "[\\x00-\\x1f\"\\\\/\u{7f}\u{e000}\u{e001}\u{fffd}\u{10ffff}é😀<|>{}\\[\\]]{0,16}",
        1 => (prop::sample::select(WORDS), 1usize..4096).prop_map(|(word, times)| word.repeat(times)),
    ]
    .boxed()
}

/// Words the parsers and mappers give a meaning to.
pub const WORDS: &[&str] = &[
    "", "system", "user", "assistant", "tool", "developer", "function", "json", "json_object", "json_schema", "text",
    "none", "auto", "required", "name", "arguments", "parameters", "description", "messages", "content", "role",
    "tool_calls", "tool_call", "response", "tool_call_id", "type", "object", "string", "array", "integer", "$ref",
    "#", "#/$defs/a", "#/definitions/a", "#/properties/a", "<|tool_call|>", "<|/tool_call|>", "<|end|>", "<|user|>",
    "-1", "1e999", "NaN", "null", "true", "300s", "-1.0s", "\u{e000}", "\u{e001}",
];

/// A JSON document as a tree that is written out as text by [`Json::text`].
#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number as it is written: may be out of any Rust type's range.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    /// Members in order, duplicates allowed.
    Object(Vec<(String, Json)>),
}

impl Json {
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
            Json::Number(text) => out.push_str(text),
            Json::Str(text) => out.push_str(&Value::String(text.clone()).to_string()),
            Json::Array(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (index, (key, value)) in members.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }

    pub fn str(text: &str) -> Json {
        Json::Str(text.to_owned())
    }
}

/// Numbers as written: ordinary, huge, tiny, negative zero, past u64 and f64.
pub fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => any::<i64>().prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:?}")),
        2 => (-4i32..4).prop_map(|n| n.to_string()),
        2 => prop::sample::select(&[
            "0", "-0", "-0.0", "1e999", "-1e999", "1e-999", "1e-45", "4.9e-324", "1.7976931348623157e308",
            "18446744073709551616", "-9223372036854775809", "123456789012345678901234567890", "4294967296",
            "4294967295", "2147483648", "9007199254740993", "0.5", "1.0", "-1", "-2", "1E+2", "0.0000001",
        ][..]).prop_map(str::to_owned),
    ]
    .boxed()
}

/// A JSON leaf.
pub fn json_leaf() -> BoxedStrategy<Json> {
    prop_oneof![
        1 => Just(Json::Null),
        1 => any::<bool>().prop_map(Json::Bool),
        3 => number_text().prop_map(Json::Number),
        3 => odd_string().prop_map(Json::Str),
    ]
    .boxed()
}

/// Any JSON document, nested up to `depth` levels.
pub fn json(depth: u32) -> BoxedStrategy<Json> {
    json_leaf()
        .prop_recursive(depth, 128, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Json::Array),
                prop::collection::vec((odd_string(), inner), 0..8).prop_map(Json::Object),
            ]
        })
        .boxed()
}

/// Any JSON value (numbers serde_json holds; keys unique).
pub fn json_value(depth: u32) -> BoxedStrategy<Value> {
    json(depth).prop_filter_map("JSON serde_json reads", |json| serde_json::from_str(&json.text()).ok()).boxed()
}

/// Either `good` or, one time in `1 + odds`, any JSON in its place.
pub fn or_any(good: BoxedStrategy<Json>, odds: u32) -> BoxedStrategy<Json> {
    prop_oneof![odds => good, 1 => json(3)].boxed()
}

/// An object holding some of `members` (each a key and a strategy; a key written `!key` is
/// there nearly always), sometimes with an unknown key or a duplicate.
pub fn some_of(members: Vec<(&'static str, BoxedStrategy<Json>)>) -> BoxedStrategy<Json> {
    let picked: Vec<BoxedStrategy<Option<(String, Json)>>> = members
        .into_iter()
        .map(|(key, strategy)| {
            let (key, odds) = key.strip_prefix('!').map_or((key, 0.6), |key| (key, 0.95));
            prop::option::weighted(odds, strategy.prop_map(move |value| (key.to_owned(), value))).boxed()
        })
        .collect();
    let extra = prop::option::weighted(0.1, (odd_string(), json(2)));
    (picked, extra, any::<prop::sample::Index>(), prop::bool::weighted(0.05))
        .prop_map(move |(picked, extra, position, duplicate)| {
            let mut members: Vec<(String, Json)> = picked.into_iter().flatten().collect();
            if let Some(extra) = extra {
                let at = position.index(members.len() + 1);
                members.insert(at, extra);
            }
            if duplicate && !members.is_empty() {
                let copy = members[position.index(members.len())].clone();
                members.push(copy);
            }
            Json::Object(members)
        })
        .boxed()
}

/// Edits that make a document nearly valid: cut it short, drop, repeat or insert a piece.
#[derive(Debug, Clone)]
pub enum Mutation {
    Truncate(prop::sample::Index),
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    Repeat(prop::sample::Index, usize),
}

pub fn mutation() -> BoxedStrategy<Mutation> {
    let piece = prop_oneof![
        prop::sample::select(&["{", "}", "[", "]", "\"", ",", ":", "\\", "\\u", "\\ud800", "\n", "=", "'''", "\"\"\"", "#", "[[", "]]", ".", "\0", "é", "😀", "1e999", "-", "nan", "inf"][..])
            .prop_map(str::to_owned),
        any::<char>().prop_map(String::from),
    ];
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete(at, len)),
        (any::<prop::sample::Index>(), piece).prop_map(|(at, text)| Mutation::Insert(at, text)),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Repeat(at, len)),
    ]
    .boxed()
}

/// Applies `mutations` at character boundaries.
pub fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for mutation in mutations {
        let len = chars.len();
        match mutation {
            Mutation::Truncate(at) => chars.truncate(at.index(len + 1)),
            Mutation::Delete(at, count) => {
                let start = at.index(len + 1);
                chars.drain(start..(start + count).min(len));
            }
            Mutation::Insert(at, piece) => {
                let start = at.index(len + 1);
                chars.splice(start..start, piece.chars());
            }
            Mutation::Repeat(at, count) => {
                let start = at.index(len + 1);
                let piece: Vec<char> = chars[start..(start + count).min(len)].to_vec();
                chars.splice(start..start, piece);
            }
        }
    }
    chars.into_iter().collect()
}

/// `text`, unchanged half the time, else with one to three mutations.
pub fn nearly(text: BoxedStrategy<String>) -> BoxedStrategy<String> {
    (text, prop::collection::vec(mutation(), 0..4)).prop_map(|(text, mutations)| mutate(&text, &mutations)).boxed()
}

/// A TOML value as written, valid or not quite: strings (basic, literal, multi-line), integers
/// (huge, hex, with underscores), floats (inf, nan), booleans, dates, arrays, inline tables.
pub fn toml_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        3 => odd_string().prop_map(|text| Value::String(text).to_string()),
        1 => "[a-z/._ -]{0,20}".prop_map(|text| format!("'{text}'")),
        1 => "[a-z\n ]{0,20}".prop_map(|text| format!("\"\"\"{text}\"\"\"")),
        3 => number_text(),
        1 => prop::sample::select(&[
            "0x7fffffffffffffff", "0xffffffffffffffff", "-9_223_372_036_854_775_808", "1_000", "0o777", "0b1",
            "inf", "-inf", "nan", "+1", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27", "true", "false",
            "\"none\"", "\"loopback\"", "\"127.0.0.1:8123\"", "\"[::1]:80\"", "\"strict\"", "\"best-effort\"",
            "\"lazy\"", "\"startup\"", "\"660\"", "\"0o777\"", "\"127.0.0.1:50051\"", "\"0.0.0.0:0\"", "\"q8_0\"",
        ][..]).prop_map(str::to_owned),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec(("[a-z_]{1,10}", inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members.into_iter().map(|(key, value)| format!("{key} = {value}")).collect();
                format!("{{ {} }}", members.join(", "))
            }),
        ]
    })
    .boxed()
}

/// A TOML document of `key = value` lines, keys mostly from `keys`, with table headers from
/// `tables` (whose keys come from `table_keys`), then mutated.
pub fn toml_document(keys: &'static [&'static str], tables: &'static [&'static str], table_keys: &'static [&'static str]) -> BoxedStrategy<String> {
    let key = prop_oneof![8 => prop::sample::select(keys).prop_map(str::to_owned), 1 => "[a-z_.]{1,12}", 1 => odd_string().prop_map(|k| Value::String(k).to_string())];
    let table_key = prop_oneof![8 => prop::sample::select(table_keys).prop_map(str::to_owned), 1 => "[a-z_]{1,12}"];
    let line = (key, toml_value()).prop_map(|(key, value)| format!("{key} = {value}"));
    let table = (prop::sample::select(tables), prop::collection::vec((table_key, toml_value()), 0..6)).prop_map(|(name, members)| {
        let body: Vec<String> = members.into_iter().map(|(key, value)| format!("{key} = {value}")).collect();
        format!("[{name}]\n{}", body.join("\n"))
    });
    let document = (prop::collection::vec(line, 0..10), prop::collection::vec(table, 0..3))
        .prop_map(|(lines, tables)| format!("{}\n{}\n", lines.join("\n"), tables.join("\n")));
    prop_oneof![8 => nearly(document.boxed()), 1 => any::<String>(), 1 => toml_value().prop_map(|v| format!("x = {v}"))].boxed()
}
