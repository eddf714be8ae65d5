//! The limits a JSON schema from outside (a request's structured output, a client's or a
//! plugin's tool parameters) must keep before anything compiles it.
//!
//! llama.cpp's schema-to-grammar converter recurses over the schema, runs `std::regex` over
//! names and literals, and expands repetition bounds and optional properties into grammar
//! rules: a `$ref` cycle, a 200,000-character name or 20,000 optional properties overflow any
//! stack, and a process cannot survive a stack overflow. So every schema is walked here first,
//! iteratively in what it allocates and bounded in how deep it goes, and refused with the limit
//! it broke, named as the config key that raises it. A schema within the limits converts in
//! bounded time and stack.

use std::collections::HashMap;

use serde_json::Value;

/// Bounds on a schema; each is a config key (`schema_max_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    /// The schema as JSON text, in bytes (`schema_max_bytes`).
    pub max_bytes: usize,
    /// Nesting of JSON objects and arrays, counted through every `$ref` followed
    /// (`schema_max_depth`).
    pub max_depth: usize,
    /// Properties of one object schema (`schema_max_properties`): optional properties cost
    /// the converter a level of recursion and a quadratic number of grammar alternatives each.
    pub max_properties: usize,
    /// Property names, `$defs` names and `$ref`s, in bytes (`schema_max_name_bytes`).
    pub max_name_bytes: usize,
    /// `enum` and `const` values, `pattern`, `format` and other strings the grammar spells
    /// out, in bytes (`schema_max_literal_bytes`).
    pub max_literal_bytes: usize,
    /// `minLength`, `maxLength`, `minItems`, `maxItems`, `minProperties`, `maxProperties`,
    /// `minContains`, `maxContains` (`schema_max_repetition`): each becomes that many grammar
    /// repetitions.
    pub max_repetition: u64,
    /// `enum` values and `anyOf`/`oneOf` branches in the whole schema, each `$defs` entry
    /// counted once (`schema_max_alternatives`): the grammar checks every candidate token
    /// against every alternative open at a step, so 10,000 of them make such a step take
    /// seconds (65,536: a minute), on the one engine thread every client shares. A sum, not a
    /// per-keyword count, because an `anyOf` of enums opens all of their values at once.
    pub max_alternatives: usize,
}

impl Default for SchemaLimits {
    /// Room for real tool schemas (Home Assistant's Assist tools use a few KiB, 10 properties
    /// and 6 levels) with a wide margin, and far from what hurts the converter.
    fn default() -> Self {
        SchemaLimits {
            max_bytes: 64 * 1024,
            max_depth: 64,
            max_properties: 128,
            max_name_bytes: 256,
            max_literal_bytes: 1024,
            max_repetition: 1024,
            max_alternatives: 1024,
        }
    }
}

/// Why a schema was refused: what broke which limit, where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} (at {at}); {fix}")]
pub struct SchemaRejection {
    /// A JSON pointer into the schema.
    pub at: String,
    pub problem: String,
    /// The config key that raises the limit, or what to change in the schema.
    pub fix: String,
}

/// Keywords whose string values are prose the grammar never sees: bounded by `max_bytes` only.
const PROSE: [&str; 5] = ["description", "title", "$comment", "examples", "default"];

/// Keywords whose values are repetition counts.
const REPETITION: [&str; 8] =
    ["minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains"];

/// Keywords whose arrays are alternatives the grammar tries side by side.
const ALTERNATIVES: [&str; 3] = ["enum", "anyOf", "oneOf"];

/// Numeric bounds llama.cpp reads as 64-bit integers for integer schemas.
const NUMERIC_BOUNDS: [&str; 4] = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];

/// The largest magnitude a numeric bound may have: what a double holds exactly.
const MAX_BOUND: f64 = 9_007_199_254_740_992.0;

/// Checks `schema` against `limits`. `Ok` means llama.cpp's converter and the validator can
/// take it within bounded stack and time.
pub fn check(schema: &Value, limits: &SchemaLimits) -> Result<(), SchemaRejection> {
    let bytes = serde_json::to_string(schema).map_or(usize::MAX, |text| text.len());
    if bytes > limits.max_bytes {
        return Err(reject(
            "",
            format!("the schema is {bytes} bytes, more than {}", limits.max_bytes),
            "send a smaller schema or raise schema_max_bytes",
        ));
    }
    let mut walk = Walk { limits, refs: Vec::new(), alternatives: 0 };
    walk.node(schema, &mut String::new(), 0, None)?;
    check_refs(schema, &walk.refs, limits)
}

/// One `$ref` found in the walk: where it is, at which depth, and what it names.
struct RefSite {
    at: String,
    depth: usize,
    target: String,
}

struct Walk<'a> {
    limits: &'a SchemaLimits,
    refs: Vec<RefSite>,
    /// `enum` values and `anyOf`/`oneOf` branches seen so far.
    alternatives: usize,
}

impl Walk<'_> {
    /// `key` is the member name under which `value` sits in its parent object.
    fn node(&mut self, value: &Value, at: &mut String, depth: usize, key: Option<&str>) -> Result<(), SchemaRejection> {
        if depth > self.limits.max_depth {
            return Err(self.too_deep(at));
        }
        match value {
            Value::Object(members) => {
                let is_properties = key == Some("properties") || key == Some("patternProperties");
                if is_properties && members.len() > self.limits.max_properties {
                    return Err(reject(
                        at,
                        format!("an object schema has {} properties, more than {}", members.len(), self.limits.max_properties),
                        "split the tool or raise schema_max_properties",
                    ));
                }
                for (name, child) in members {
                    if name.len() > self.limits.max_name_bytes {
                        return Err(reject(
                            at,
                            format!("a name is {} bytes long, more than {}", name.len(), self.limits.max_name_bytes),
                            "use shorter property names or raise schema_max_name_bytes",
                        ));
                    }
                    let length = at.len();
                    at.push('/');
                    at.push_str(&escape_pointer(name));
                    self.member(name, child, at, depth, is_properties)?;
                    at.truncate(length);
                }
                if is_properties { Ok(()) } else { satisfiable(members, at) }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let length = at.len();
                    at.push('/');
                    at.push_str(&index.to_string());
                    self.node(item, at, depth + 1, key)?;
                    at.truncate(length);
                }
                Ok(())
            }
            Value::String(text) => self.literal(text, at, key),
            Value::Number(_) | Value::Bool(_) | Value::Null => Ok(()),
        }
    }

    /// A member of an object; `in_properties` when the object is a `properties` map, whose
    /// member names are property names, not keywords.
    fn member(&mut self, name: &str, child: &Value, at: &mut String, depth: usize, in_properties: bool) -> Result<(), SchemaRejection> {
        if !in_properties {
            if name == "$ref" {
                let Value::String(target) = child else {
                    return Err(reject(at, "a $ref must be a string".into(), "write it as \"#/$defs/name\""));
                };
                if target.len() > self.limits.max_name_bytes {
                    return Err(reject(
                        at,
                        format!("a $ref is {} bytes long, more than {}", target.len(), self.limits.max_name_bytes),
                        "use shorter names or raise schema_max_name_bytes",
                    ));
                }
                if !target.starts_with('#') {
                    return Err(reject(
                        at,
                        format!("the $ref `{target}` points outside the schema"),
                        "only references into the same schema (\"#/...\") are followed; inline the referenced schema",
                    ));
                }
                self.refs.push(RefSite { at: at.clone(), depth, target: target.clone() });
                return Ok(());
            }
            if REPETITION.contains(&name) {
                return self.repetition(name, child, at);
            }
            if ALTERNATIVES.contains(&name) {
                self.alternatives(name, child, at)?;
            }
            if NUMERIC_BOUNDS.contains(&name) {
                if let Some(bound) = child.as_f64() {
                    if !(bound.abs() <= MAX_BOUND) {
                        return Err(reject(
                            at,
                            format!("{name} is {child}, beyond ±2^53"),
                            "use a bound a 64-bit integer and a double both hold exactly",
                        ));
                    }
                }
            }
            if name == "pattern" {
                if let Value::String(pattern) = child {
                    self.pattern(pattern, at)?;
                }
            }
            if PROSE.contains(&name) {
                // Not turned into grammar; only its nesting matters.
                return self.node_without_literals(child, at, depth + 1);
            }
        }
        self.node(child, at, depth + 1, Some(name))
    }

    fn literal(&self, text: &str, at: &str, key: Option<&str>) -> Result<(), SchemaRejection> {
        if key.is_some_and(|key| PROSE.contains(&key)) {
            return Ok(());
        }
        if text.len() > self.limits.max_literal_bytes {
            return Err(reject(
                at,
                format!("a string in the schema is {} bytes long, more than {}", text.len(), self.limits.max_literal_bytes),
                "shorten the literal or raise schema_max_literal_bytes",
            ));
        }
        Ok(())
    }

    /// A pattern's `{n}` and `{n,m}` repeat what they follow, as `maxLength` does.
    fn pattern(&self, pattern: &str, at: &str) -> Result<(), SchemaRejection> {
        for counts in pattern.split('{').skip(1).filter_map(|rest| rest.split_once('}').map(|(inside, _)| inside)) {
            for count in counts.split(',').filter(|count| !count.trim().is_empty()) {
                let Ok(count) = count.trim().parse::<f64>() else { continue };
                if count > self.limits.max_repetition as f64 {
                    return Err(reject(
                        at,
                        format!("the pattern repeats something {count} times, more than {}", self.limits.max_repetition),
                        "lower the repetition or raise schema_max_repetition",
                    ));
                }
            }
        }
        Ok(())
    }

    fn alternatives(&mut self, name: &str, value: &Value, at: &str) -> Result<(), SchemaRejection> {
        let Value::Array(choices) = value else { return Ok(()) };
        self.alternatives = self.alternatives.saturating_add(choices.len());
        if self.alternatives > self.limits.max_alternatives {
            return Err(reject(
                at,
                format!(
                    "with this {name}, the schema offers {} enum values and anyOf/oneOf branches, more than {}",
                    self.alternatives, self.limits.max_alternatives
                ),
                "offer fewer choices (a plain string the tool checks itself) or raise schema_max_alternatives",
            ));
        }
        Ok(())
    }

    fn repetition(&self, name: &str, value: &Value, at: &str) -> Result<(), SchemaRejection> {
        let count = match value {
            Value::Number(number) => number.as_f64().unwrap_or(f64::INFINITY),
            _ => return Ok(()), // not a count: the validator names the mistake
        };
        if !(count <= self.limits.max_repetition as f64) {
            return Err(reject(
                at,
                format!("{name} is {value}, more than {}", self.limits.max_repetition),
                "lower it or raise schema_max_repetition",
            ));
        }
        Ok(())
    }

    fn too_deep(&self, at: &str) -> SchemaRejection {
        reject(
            at,
            format!("the schema nests deeper than {} levels", self.limits.max_depth),
            "flatten the schema or raise schema_max_depth",
        )
    }

    /// Prose (`description`, `examples`, ...): depth still counts, strings do not.
    fn node_without_literals(&self, value: &Value, at: &str, depth: usize) -> Result<(), SchemaRejection> {
        // An explicit stack: prose may be arbitrary JSON.
        let mut pending = vec![(value, depth)];
        while let Some((value, depth)) = pending.pop() {
            if depth > self.limits.max_depth {
                return Err(self.too_deep(at));
            }
            match value {
                Value::Object(members) => pending.extend(members.values().map(|child| (child, depth + 1))),
                Value::Array(items) => pending.extend(items.iter().map(|child| (child, depth + 1))),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Bounds that contradict each other leave nothing a reply could be: llama.cpp's converter
/// then writes a grammar that expands without end (`x{3,2}`) or that allows no token at all.
fn satisfiable(members: &serde_json::Map<String, Value>, at: &str) -> Result<(), SchemaRejection> {
    let number = |key: &str| members.get(key).and_then(Value::as_f64);
    let contradiction = |problem: String| Err(reject(at, problem, "fix the bounds: no value can satisfy them"));
    for (low, high) in [
        ("minLength", "maxLength"),
        ("minItems", "maxItems"),
        ("minProperties", "maxProperties"),
        ("minContains", "maxContains"),
    ] {
        if let (Some(lower), Some(upper)) = (number(low), number(high)) {
            if lower > upper {
                return contradiction(format!("{low} {lower} is above {high} {upper}"));
            }
        }
    }
    let (minimum, exclusive_minimum) = (number("minimum"), number("exclusiveMinimum"));
    let (maximum, exclusive_maximum) = (number("maximum"), number("exclusiveMaximum"));
    if members.get("type").and_then(Value::as_str) == Some("integer") {
        let lowest = [minimum.map(f64::ceil), exclusive_minimum.map(|bound| bound.floor() + 1.0)].into_iter().flatten().reduce(f64::max);
        let highest = [maximum.map(f64::floor), exclusive_maximum.map(|bound| bound.ceil() - 1.0)].into_iter().flatten().reduce(f64::min);
        if let (Some(lowest), Some(highest)) = (lowest, highest) {
            if lowest > highest {
                return contradiction(format!("no integer lies between the bounds (the least is {lowest}, the most {highest})"));
            }
        }
        return Ok(());
    }
    let empty = match (minimum, exclusive_minimum, maximum, exclusive_maximum) {
        (Some(low), _, Some(high), _) => low > high,
        (_, Some(low), Some(high), _) | (Some(low), _, _, Some(high)) | (_, Some(low), _, Some(high)) => low >= high,
        _ => false,
    };
    if empty {
        return contradiction("the minimum is not below the maximum".into());
    }
    Ok(())
}

/// Every `$ref` must resolve inside the schema, no chain of references may lead back to
/// where it started, and the depth reached through references stays within `max_depth`.
fn check_refs(schema: &Value, refs: &[RefSite], limits: &SchemaLimits) -> Result<(), SchemaRejection> {
    // The references found under each referenced target, with their depth below it.
    let mut targets: HashMap<&str, Vec<(usize, &str)>> = HashMap::new();
    for site in refs {
        if targets.contains_key(site.target.as_str()) {
            continue;
        }
        let pointer = &site.target[1..];
        if schema.pointer(pointer).is_none() {
            return Err(reject(&site.at, format!("the $ref `{}` names nothing in the schema", site.target), "fix the reference"));
        }
        let prefix = pointer.to_owned();
        let inner = refs
            .iter()
            .filter(|other| other.at == prefix || other.at.starts_with(&format!("{prefix}/")))
            .map(|other| (other.depth.saturating_sub(pointer_depth(pointer)), other.target.as_str()))
            .collect();
        targets.insert(site.target.as_str(), inner);
    }
    // The deepest nesting reachable from each target, by depth-first search over the reference
    // graph with an explicit stack; a target met again on the current path is a cycle.
    let mut deepest: HashMap<&str, usize> = HashMap::new();
    for site in refs {
        let below = deepest_below(&site.target, &targets, &mut deepest).map_err(|cycle| {
            reject(
                &site.at,
                format!("the $ref chain {} leads back to itself", cycle.join(" → ")),
                "recursive schemas cannot become a grammar here; unroll the recursion to a fixed depth",
            )
        })?;
        if site.depth + below > limits.max_depth {
            return Err(reject(
                &site.at,
                format!("following $refs, the schema nests {} levels, more than {}", site.depth + below, limits.max_depth),
                "flatten the schema or raise schema_max_depth",
            ));
        }
    }
    Ok(())
}

/// How deep the schema goes below `target` through its references, or the cycle met.
fn deepest_below<'a>(
    target: &'a str,
    targets: &HashMap<&'a str, Vec<(usize, &'a str)>>,
    deepest: &mut HashMap<&'a str, usize>,
) -> Result<usize, Vec<String>> {
    if let Some(&known) = deepest.get(target) {
        return Ok(known);
    }
    let edges = |node: &str| targets.get(node).map_or(&[][..], Vec::as_slice);
    // The current path: (target, index of its next reference to follow, deepest found so far).
    let mut path: Vec<(&'a str, usize, usize)> = vec![(target, 0, 0)];
    while let Some(&(node, next, best)) = path.last() {
        let inner = edges(node);
        if next == inner.len() {
            deepest.insert(node, best);
            path.pop();
            if let Some(parent) = path.last_mut() {
                let (offset, _) = edges(parent.0)[parent.1 - 1];
                parent.2 = parent.2.max(offset + best);
            }
            continue;
        }
        let (offset, child) = inner[next];
        let on_path = path.iter().any(|entry| entry.0 == child);
        let top = path.last_mut().expect("the path is not empty");
        top.1 += 1;
        if let Some(&known) = deepest.get(child) {
            top.2 = top.2.max(offset + known);
        } else if on_path {
            let mut cycle: Vec<String> = path.iter().map(|entry| entry.0.to_owned()).collect();
            cycle.push(child.to_owned());
            return Err(cycle);
        } else {
            path.push((child, 0, 0));
        }
    }
    Ok(deepest[target])
}

/// Levels of nesting a JSON pointer goes down.
fn pointer_depth(pointer: &str) -> usize {
    pointer.matches('/').count()
}

/// A member name as a JSON pointer segment.
fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn reject(at: &str, problem: String, fix: &str) -> SchemaRejection {
    SchemaRejection { at: if at.is_empty() { "/".to_owned() } else { at.to_owned() }, problem, fix: fix.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(schema: Value, words: &str) {
        let error = check(&schema, &SchemaLimits::default()).unwrap_err().to_string();
        assert!(error.contains(words), "{error}");
    }

    #[test]
    fn home_assistant_tool_schemas_pass() {
        // HassTurnOn as Home Assistant's Assist API describes it, and a schema with $defs.
        let turn_on = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"},
                "domain": {"type": "array", "items": {"type": "string", "enum": ["light", "switch", "fan", "cover"]}},
                "device_class": {"type": "array", "items": {"type": "string", "enum": ["outlet", "switch", "tv", "speaker"]}}
            },
            "required": []
        });
        check(&turn_on, &SchemaLimits::default()).unwrap();
        let with_defs = json!({
            "$defs": {"room": {"type": "string", "enum": ["kitchen", "hall"]}, "rooms": {"type": "array", "items": {"$ref": "#/$defs/room"}, "maxItems": 8}},
            "type": "object", "properties": {"where": {"$ref": "#/$defs/rooms"}}
        });
        check(&with_defs, &SchemaLimits::default()).unwrap();
    }

    #[test]
    fn cycles_are_refused_wherever_they_start() {
        refused(json!({"$ref": "#"}), "leads back to itself");
        refused(
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "array", "items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}),
            "leads back to itself",
        );
        refused(json!({"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}, "$ref": "#/$defs/node"}), "leads back");
        refused(json!({"allOf": [{"$ref": "#/allOf/0"}]}), "leads back to itself");
    }

    #[test]
    fn references_must_resolve_inside_the_schema() {
        refused(json!({"$ref": "https://example.com/schema.json"}), "points outside the schema");
        refused(json!({"$ref": "#/$defs/missing"}), "names nothing");
        refused(json!({"$ref": 3}), "must be a string");
    }

    #[test]
    fn each_limit_is_named_by_its_key() {
        refused(json!({"properties": {"x".repeat(300): {"type": "string"}}}), "schema_max_name_bytes");
        let many: serde_json::Map<String, Value> = (0..200).map(|i| (format!("p{i}"), json!({"type": "integer"}))).collect();
        refused(json!({"type": "object", "properties": many}), "schema_max_properties");
        refused(json!({"enum": ["y".repeat(2000)]}), "schema_max_literal_bytes");
        refused(json!({"type": "string", "minLength": 100000}), "schema_max_repetition");
        refused(json!({"type": "array", "maxItems": 1e300}), "schema_max_repetition");
        refused(json!({"type": "integer", "minimum": 1e300}), "beyond");
        let mut deep = json!({"type": "string"});
        for _ in 0..70 {
            deep = json!({"type": "array", "items": deep});
        }
        refused(deep, "schema_max_depth");
        let big = json!({"enum": (0..20000).map(|i| format!("value number {i}")).collect::<Vec<_>>()});
        refused(big, "schema_max_bytes");
        refused(json!({"type": "array", "items": {"enum": (0..1100).collect::<Vec<_>>()}}), "schema_max_alternatives");
        let branches: Vec<Value> = (0..1100).map(|i| json!({"const": i})).collect();
        refused(json!({"anyOf": branches}), "schema_max_alternatives");
        // Enums side by side add up: an anyOf of them opens every value at once.
        let enums: Vec<Value> = (0..4).map(|branch| json!({"enum": (branch * 300..branch * 300 + 300).collect::<Vec<_>>()})).collect();
        refused(json!({"anyOf": enums}), "schema_max_alternatives");
        // A house's worth of entity names is fine.
        check(&json!({"enum": (0..300).map(|i| format!("light.room_{i}")).collect::<Vec<_>>()}), &SchemaLimits::default()).unwrap();
    }

    #[test]
    fn bounds_that_nothing_satisfies_are_refused() {
        refused(json!({"type": "string", "minLength": 3, "maxLength": 2}), "minLength 3 is above maxLength 2");
        refused(json!({"type": "array", "minItems": 10, "maxItems": 2}), "minItems 10 is above maxItems 2");
        refused(json!({"type": "integer", "minimum": 5, "maximum": 4}), "no integer lies between");
        refused(json!({"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6}), "no integer lies between");
        refused(json!({"type": "integer", "exclusiveMinimum": 0, "maximum": 0}), "no integer lies between");
        refused(json!({"type": "number", "exclusiveMinimum": 1, "maximum": 1}), "not below the maximum");
        refused(json!({"type": "string", "pattern": "a{0,100000}"}), "schema_max_repetition");
        for fine in [
            json!({"type": "string", "minLength": 2, "maxLength": 2}),
            json!({"type": "integer", "minimum": 4, "maximum": 4}),
            json!({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 6}),
            json!({"type": "number", "minimum": 0.5, "maximum": 0.5}),
            json!({"type": "string", "pattern": "^[a-z]{2,8}$"}),
        ] {
            check(&fine, &SchemaLimits::default()).unwrap_or_else(|err| panic!("{fine}: {err}"));
        }
    }

    #[test]
    fn depth_counts_through_references() {
        // Each definition is shallow, but the chain of them is deep.
        let mut defs = serde_json::Map::new();
        for i in 0..70 {
            defs.insert(format!("d{i}"), json!({"type": "array", "items": {"$ref": format!("#/$defs/d{}", i + 1)}}));
        }
        defs.insert("d70".into(), json!({"type": "string"}));
        refused(json!({"$defs": defs, "$ref": "#/$defs/d0"}), "following $refs");
        // A short chain passes.
        let mut defs = serde_json::Map::new();
        for i in 0..3 {
            defs.insert(format!("d{i}"), json!({"type": "array", "items": {"$ref": format!("#/$defs/d{}", i + 1)}}));
        }
        defs.insert("d3".into(), json!({"type": "string"}));
        check(&json!({"$defs": defs, "$ref": "#/$defs/d0"}), &SchemaLimits::default()).unwrap();
    }

    #[test]
    fn prose_is_free_but_still_bounded_in_depth() {
        check(&json!({"type": "string", "description": "d".repeat(5000)}), &SchemaLimits::default()).unwrap();
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        refused(json!({"type": "string", "examples": deep}), "schema_max_depth");
    }
}
