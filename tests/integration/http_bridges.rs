//! The HTTP bridges driven by the real client libraries, installed from PyPI into a virtual
//! environment the first time (`ollama==0.6.2` as Home Assistant pins it, and `openai`): Home
//! Assistant's Ollama conversation with a tool call, the `openai` library's calls, and both
//! libraries' authentication errors. Without python3-venv or PyPI the tests skip, saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use phi3d_tests::harness::{Daemon, run};
use serde_json::Value;

use crate::common::{PHI3D, tiny_daemon};

/// The virtual environment with both clients, made once per build directory.
fn python_clients() -> Option<PathBuf> {
    static MADE: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = made.get_or_insert_with(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-clients");
        let python = venv.join("bin/python");
        let ready = |python: &Path| {
            Command::new(python).args(["-c", "import ollama, openai"]).status().is_ok_and(|status| status.success())
        };
        if ready(&python) {
            return Ok(python);
        }
        let created = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().map_err(|err| err.to_string())?;
        if !created.status.success() {
            return Err(format!("python3 -m venv failed: {}", String::from_utf8_lossy(&created.stderr)));
        }
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "ollama==0.6.2", "openai"])
            .output()
            .map_err(|err| err.to_string())?;
        if !pip.status.success() {
            return Err(format!("pip install ollama==0.6.2 openai failed: {}", String::from_utf8_lossy(&pip.stderr)));
        }
        Ok(python)
    });
    match result {
        Ok(python) => Some(python.clone()),
        Err(why) => {
            eprintln!("skipped: the Python client libraries are not available ({why})");
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/http").join(name)
}

/// Runs a client script and returns the JSON line it prints.
fn run_client(python: &Path, name: &str, args: &[&str], daemon: &Daemon) -> Value {
    let output = Command::new(python).arg(script(name)).args(args).output().expect("run python");
    assert!(
        output.status.success(),
        "{name} failed:\n{}\n{}\ndaemon:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        daemon.stderr()
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|err| panic!("{err}: {stdout}"))
}

/// A free loopback address for the HTTP listener.
fn http_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test]
async fn home_assistants_ollama_conversation_with_a_tool_call() {
    let Some(python) = python_clients() else { return };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let url = format!("http://{address}");
    let found = run_client(&python, "home_assistant_ollama.py", &[&url, "phi3-test-tiny"], &daemon);
    assert_eq!(found["tool"], "HassTurnOn", "{found}");
    assert!(found["arguments"]["name"].is_string(), "arguments arrive as a JSON object: {found}");
}

#[tokio::test]
async fn the_openai_library_chats_streams_and_calls_tools() {
    let Some(python) = python_clients() else { return };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let found = run_client(&python, "openai_client.py", &[&format!("http://{address}/v1"), "unused"], &daemon);
    assert_eq!(found["models"], serde_json::json!(["phi3-test-tiny"]), "{found}");
    assert!(found["forced_arguments"]["on"].is_boolean(), "{found}");
    assert!(found["n_error"].as_str().unwrap().contains("one choice"), "{found}");
}

#[tokio::test]
async fn tokens_guard_the_http_apis_in_each_clients_error_shape() {
    let Some(python) = python_clients() else { return };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let file = daemon.dir().join("tokens.toml");
    let created = run(Path::new(PHI3D), &["token", "create", "ha", "--token-file", file.to_str().unwrap()], &[]);
    assert!(created.status.success());
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let url = format!("http://{address}");
    let found = run_client(&python, "refused.py", &[&url], &daemon);
    assert!(found["openai"].as_str().unwrap().contains("not valid"), "{found}");
    assert!(found["ollama"].as_str().unwrap().contains("requires a token"), "{found}");
    let allowed = run_client(&python, "home_assistant_ollama.py", &[&url, "phi3-test-tiny", &token], &daemon);
    assert_eq!(allowed["tool"], "HassTurnOn");
}

#[tokio::test]
async fn structured_output_through_both_libraries() {
    let Some(python) = python_clients() else { return };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let found = run_client(&python, "structured_output.py", &[&format!("http://{address}")], &daemon);
    for key in ["ollama_streamed", "ollama_whole", "openai_whole", "openai_streamed"] {
        assert!(found[key]["on"].is_boolean(), "{key}: {found}");
    }
    // "json" is any JSON object: whole when the model ends it, a valid beginning when cut short.
    let text = found["ollama_json"].as_str().unwrap();
    match found["ollama_json_done"].as_str() {
        Some("stop") => assert!(serde_json::from_str::<Value>(text).unwrap().is_object(), "{text}"),
        _ => assert!(text.starts_with('{'), "{text}"),
    }
    assert!(found["ollama_error"].as_str().unwrap().contains("not a valid JSON schema"), "{found}");
    assert!(found["openai_error"].as_str().unwrap().contains("response_format.json_schema.schema"), "{found}");
}

#[tokio::test]
async fn plugin_tools_reach_http_clients_only_when_the_config_offers_them() {
    let Some(python) = python_clients() else { return };
    let year = crate::tools::chrono_year();
    let address = http_address();
    let daemon = tiny_daemon()
        .unconfigured_plugins_dir()
        .arg("--http-listen")
        .arg(&address)
        .arg("--http-plugin-tool")
        .arg("clock.now")
        .start()
        .await;
    let found = run_client(&python, "plugin_tools.py", &[&format!("http://{address}"), "offered"], &daemon);
    for key in ["whole", "streamed"] {
        let text = found[key].as_str().unwrap();
        // The clock answers with today's date, or (a random model's time zone) says why not.
        assert!(text.contains("[clock.now: ") && text.contains(&year) || text.contains("[clock.now failed: "), "{key}: {text}");
    }
    drop(daemon);

    let address = http_address();
    let daemon =
        tiny_daemon().unconfigured_plugins_dir().arg("--tool-choice").arg("auto").arg("--http-listen").arg(&address).start().await;
    let found = run_client(&python, "plugin_tools.py", &[&format!("http://{address}"), "default"], &daemon);
    assert!(found["error"].as_str().unwrap().contains("`clock.now` is not among the offered tools"), "{found}");
    assert!(!found["ollama"].as_str().unwrap().contains("[clock."), "{found}");
}
