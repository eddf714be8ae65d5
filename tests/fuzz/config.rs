//! The config file (`config.rs`): TOML-ish text with the real keys and any values, cut or
//! garbled, read as `--config FILE` reads it and then validated. Nothing may panic; a refusal
//! is an error that names the file.

use std::io::Write;

use phi3d::config::{Config, Settings};
use proptest::prelude::*;

use crate::fuzz;
use crate::strategies::toml_document;

const KEYS: &[&str] = &[
    "model", "model_dir", "listen", "threads", "ctx_size", "batch_size", "queue_size", "max_tokens", "mlock", "offline",
    "log", "plugins_dir", "tool_choice", "sandbox", "slots", "kv_type", "pinned_prompts", "prompt_cache_dir",
    "prompt_cache_disk_mb", "tool_call_max_tokens", "max_tool_steps", "unix_socket", "unix_socket_mode",
    "unix_socket_group", "token_file", "tls_cert", "tls_key", "tls_client_ca", "allow_unauthenticated_network",
    "max_request_bytes", "max_prompt_tokens", "max_tokens_limit", "max_streams_per_client", "http_listen",
    "http_plugin_tools", "shutdown_grace_seconds", "gpu_layers", "sandbox.require", "schema_max_bytes",
    "schema_max_depth", "schema_max_properties", "schema_max_name_bytes", "schema_max_literal_bytes",
    "schema_max_repetition", "compile_timeout_ms", "http_allowed_origins", "http_allowed_hosts",
    "header_timeout_seconds", "body_timeout_seconds", "idle_timeout_seconds", "max_connections_per_client",
    "max_connections",
];
const TABLES: &[&str] = &["sandbox", "model", "limits"];
const TABLE_KEYS: &[&str] = &["require", "strict", "listen"];

#[test]
fn config_files_never_panic_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phi3d.toml");
    fuzz("config::Settings::from_file + Config::from_settings", toml_document(KEYS, TABLES, TABLE_KEYS), |text| {
        std::fs::File::create(&path).and_then(|mut file| file.write_all(text.as_bytes())).unwrap();
        match Settings::from_file(&path, true) {
            Ok(settings) => {
                // Validation may refuse what parsed (a bad address, a zero), but not panic.
                if let Err(err) = Config::from_settings(settings) {
                    prop_assert!(!err.0.is_empty(), "an empty error for {text:?}");
                }
            }
            Err(err) => prop_assert!(err.0.contains(&path.display().to_string()), "{err} does not name the file"),
        }
        Ok(())
    });
}

/// Nesting deep enough to exhaust a recursive parser's stack is an error, not a crash.
#[test]
fn deeply_nested_config_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phi3d.toml");
    for depth in [100, 2_000] {
        let text = format!("pinned_prompts = {}{}\n", "[".repeat(depth), "]".repeat(depth));
        std::fs::write(&path, text).unwrap();
        assert!(Settings::from_file(&path, true).is_err());
    }
}
