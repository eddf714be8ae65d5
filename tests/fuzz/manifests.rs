//! Plugin manifests (`plugins/manifest.rs`): TOML-ish text, shaped like a manifest or not,
//! cut or garbled. Nothing may panic; a refusal is an error naming a line that exists; what is
//! accepted holds valid values.

use std::path::Path;

use phi3d::plugins::{CommandSearch, Manifest};
use proptest::prelude::*;

use crate::fuzz;
use crate::strategies::toml_document;

const KEYS: &[&str] = &["name", "command", "args", "start", "env", "permissions", "permissions.read", "permissions.network"];
const TABLES: &[&str] = &["permissions", "env", "permissions.env", "args"];
const TABLE_KEYS: &[&str] = &[
    "read", "write", "network", "unix_sockets", "memory_mb", "cpu_seconds", "timeout_seconds", "max_output_bytes",
    "max_concurrent_calls", "max_processes", "max_open_files", "max_file_size_mb", "HA_TOKEN", "PATH", "",
];

fn manifest_text() -> BoxedStrategy<String> {
    let command = prop::sample::select(&["", "command = \"/bin/sh\"\n", "command = \"sh\"\n", "command = \"./missing\"\n"][..]);
    (command, toml_document(KEYS, TABLES, TABLE_KEYS)).prop_map(|(command, rest)| format!("{command}{rest}")).boxed()
}

#[test]
fn manifests_never_panic_and_errors_name_a_line() {
    let search = CommandSearch { exe_dir: None, path: vec!["/usr/bin".into(), "/bin".into()], phi3d: None };
    let file = Path::new("/nonexistent/plugins.d/fuzz.toml");
    fuzz("plugins::Manifest::parse", manifest_text(), |text| {
        match Manifest::parse(file, &text, &search) {
            Ok(manifest) => {
                prop_assert!(!manifest.name.is_empty(), "accepted without a name: {text:?}");
                prop_assert!(manifest.permissions.max_concurrent_calls >= 1, "{text:?}");
                prop_assert!(manifest.permissions.timeout.as_secs() >= 1, "{text:?}");
            }
            Err(err) => {
                let lines = text.lines().count().max(1) + 1;
                prop_assert!(err.line.is_none_or(|line| (1..=lines).contains(&line)), "line {:?} of {lines}: {err}", err.line);
                prop_assert!(!err.message.is_empty(), "an empty message for {text:?}");
            }
        }
        Ok(())
    });
}

/// Nesting deep enough to exhaust a recursive parser's stack is an error, not a crash.
#[test]
fn deeply_nested_manifests_are_refused() {
    let search = CommandSearch::default();
    for depth in [100, 2_000] {
        let text = format!("command = \"/bin/sh\"\nargs = {}{}\n", "[".repeat(depth), "]".repeat(depth));
        assert!(Manifest::parse(Path::new("/x/deep.toml"), &text, &search).is_err());
        let text = format!("command = \"/bin/sh\"\nenv = {}1{}\n", "{a=".repeat(depth), "}".repeat(depth));
        assert!(Manifest::parse(Path::new("/x/deep.toml"), &text, &search).is_err());
    }
}
