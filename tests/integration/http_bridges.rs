//! The HTTP bridges driven by the real client libraries, installed from PyPI into a virtual
//! environment the first time (`ollama==0.6.2` as Home Assistant pins it, and `openai`): Home
//! Assistant's Ollama conversation with a tool call, the `openai` library's calls, and both
//! libraries' authentication errors. Without python3-venv or PyPI the tests skip, saying so
//! (and fail with `PHI3D_TEST_STRICT=1`, as in CI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use phi3d_tests::harness::{Daemon, run};
use serde_json::Value;

use crate::common::{PHI3D, http_address, tiny_daemon};

/// The virtual environment with both clients, made once per build directory.
fn python_clients() -> Option<PathBuf> {
    static MADE: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = made.get_or_insert_with(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-clients");
        let python = venv.join("bin/python");
        let ready = |python: &Path| {
            Command::new(python).args(["-c", "import ollama, openai, prometheus_client"]).status().is_ok_and(|status| status.success())
        };
        if ready(&python) {
            return Ok(python);
        }
        let created = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().map_err(|err| err.to_string())?;
        if !created.status.success() {
            return Err(format!("python3 -m venv failed: {}", String::from_utf8_lossy(&created.stderr)));
        }
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "ollama==0.6.2", "openai", "prometheus_client"])
            .output()
            .map_err(|err| err.to_string())?;
        if !pip.status.success() {
            return Err(format!("pip install ollama==0.6.2 openai prometheus_client failed: {}", String::from_utf8_lossy(&pip.stderr)));
        }
        Ok(python)
    });
    match result {
        Ok(python) => Some(python.clone()),
        Err(why) => {
            phi3d_tests::skip(format!("the Python client libraries are not available ({why})"));
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
    let scrape = run_client(&python, "metrics.py", &[&format!("http://{address}")], &daemon);
    let calls = sample(&scrape, r#"phi3d_plugin_calls_total{outcome="ok",plugin="clock"}"#)
        + sample(&scrape, r#"phi3d_plugin_calls_total{outcome="error",plugin="clock"}"#);
    assert!(calls >= 2.0, "the whole and the streamed reply each called the clock: {scrape}");
    drop(daemon);

    let address = http_address();
    let daemon =
        tiny_daemon().unconfigured_plugins_dir().arg("--tool-choice").arg("auto").arg("--http-listen").arg(&address).start().await;
    let found = run_client(&python, "plugin_tools.py", &[&format!("http://{address}"), "default"], &daemon);
    assert!(found["error"].as_str().unwrap().contains("`clock.now` is not among the offered tools"), "{found}");
    assert!(!found["ollama"].as_str().unwrap().contains("[clock."), "{found}");
}

/// A sample's value in a `metrics.py` scrape; absent samples are 0, as Prometheus reads a
/// series that has not appeared yet.
fn sample(scrape: &Value, key: &str) -> f64 {
    scrape["samples"][key].as_f64().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_what_every_api_did_and_need_a_token_when_tokens_are_on() {
    let Some(python) = python_clients() else { return };
    let address = http_address();
    let daemon = tiny_daemon().arg("--http-listen").arg(&address).start().await;
    let url = format!("http://{address}");
    let before = run_client(&python, "metrics.py", &[&url], &daemon);
    assert_eq!(before["content_type"], "application/openmetrics-text; version=1.0.0; charset=utf-8", "{before}");
    assert_eq!(sample(&before, r#"phi3d_model_state{state="ready"}"#), 1.0, "{before}");
    assert_eq!(sample(&before, r#"phi3d_model_state{state="loading"}"#), 0.0, "{before}");
    assert_eq!(sample(&before, "phi3d_model_load_percent{}"), 100.0, "{before}");
    assert!(sample(&before, "phi3d_process_resident_memory_bytes{}") > 1e6, "{before}");
    assert!(sample(&before, "phi3d_kv_cells_total{}") > 0.0, "{before}");
    assert_eq!(sample(&before, "phi3d_queue_depth{}"), 0.0, "{before}");
    assert_eq!(sample(&before, r#"phi3d_slots{phase="generating"}"#), 0.0, "{before}");
    assert!(sample(&before, r#"phi3d_slots{phase="idle"}"#) >= 1.0, "{before}");
    // The harness fixes one thread.
    assert_eq!(sample(&before, r#"phi3d_inference_threads{step="single"}"#), 1.0, "{before}");
    assert_eq!(sample(&before, "phi3d_inference_threads_max{}"), 1.0, "{before}");

    let mut inference = daemon.inference().await;
    let grpc = inference.chat(crate::common::chat_request("Hello", crate::common::exactly(4))).await.unwrap();
    crate::common::collect(grpc.into_inner()).await.unwrap();
    let conversation = run_client(&python, "home_assistant_ollama.py", &[&url, "phi3-test-tiny"], &daemon);
    run_client(&python, "openai_client.py", &[&format!("{url}/v1"), "unused"], &daemon);
    let after = run_client(&python, "metrics.py", &[&url], &daemon);

    let rose = |key: &str| rose_between(&before, &after, key);
    let requests = |api: &str, endpoint: &str, code: &str| {
        rose(&format!(r#"phi3d_requests_total{{api="{api}",code="{code}",endpoint="{endpoint}"}}"#))
    };
    assert_eq!(requests("grpc", "/phi3d.v1.Inference/Chat", "Ok"), 1.0, "{after}");
    // Home Assistant's conversation: the list, the turns until one called the tool, the one after.
    let turns = conversation["attempts"].as_f64().unwrap() + 1.0;
    assert_eq!(requests("ollama", "/api/tags", "200"), 1.0, "{after}");
    assert_eq!(requests("ollama", "/api/chat", "200"), turns, "{after}");
    assert_eq!(requests("openai", "/v1/models", "200"), 1.0, "{after}");
    assert!(requests("openai", "/v1/chat/completions", "200") >= 4.0, "{after}");
    assert!(requests("openai", "/v1/chat/completions", "400") >= 1.0, "the n=2 refusal: {after}");
    assert_eq!(requests("metrics", "/metrics", "200"), 1.0, "the first scrape: {after}");

    let generations: f64 = ["eos", "stop_sequence", "max_tokens", "cancelled"]
        .iter()
        .map(|reason| rose(&format!(r#"phi3d_generations_total{{stop_reason="{reason}"}}"#)))
        .sum();
    assert!(generations >= 5.0 + turns, "{generations} generations: {after}");
    assert!(rose("phi3d_generated_tokens_total{}") >= 4.0, "{after}");
    assert!(sample(&after, "phi3d_recent_decode_tokens_per_second{}") > 0.0, "{after}");
    assert!(rose("phi3d_prompt_tokens_total{}") > rose("phi3d_cached_prompt_tokens_total{}"), "{after}");
    let lookups: f64 = ["hit", "shifted", "miss"]
        .iter()
        .map(|result| rose(&format!(r#"phi3d_prompt_cache_lookups_total{{result="{result}"}}"#)))
        .sum();
    assert_eq!(lookups, generations, "{after}");
    assert!(rose("phi3d_prompt_tokens_total{}") >= rose("phi3d_shifted_prompt_tokens_total{}"), "{after}");
    // Home Assistant's second turn repeats the first's prompt: the cache has it.
    assert!(rose(r#"phi3d_prompt_cache_lookups_total{result="hit"}"#) >= 1.0, "{after}");
    // Timed when a generation made a token: the gRPC one made 4.
    let timed = rose("phi3d_time_to_first_token_seconds_count{}");
    assert!((1.0..=generations).contains(&timed), "{after}");
    assert_eq!(rose(r#"phi3d_time_to_first_token_seconds_bucket{le="+Inf"}"#), timed, "{after}");
    assert!(rose("phi3d_time_to_first_token_seconds_sum{}") > 0.0, "{after}");
    assert!(rose("phi3d_generation_tokens_per_second_count{}") >= 1.0, "{after}");

    let file = daemon.dir().join("tokens.toml");
    let created = run(Path::new(PHI3D), &["token", "create", "scraper", "--token-file", file.to_str().unwrap()], &[]);
    assert!(created.status.success());
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let refused = run_client(&python, "metrics.py", &[&url], &daemon);
    assert_eq!(refused["status"], 401, "{refused}");
    let allowed = run_client(&python, "metrics.py", &[&url, &token], &daemon);
    assert_eq!(allowed["status"], 200, "{allowed}");
    assert_eq!(rose_between(&after, &allowed, r#"phi3d_requests_total{api="metrics",code="401",endpoint="/metrics"}"#), 1.0);
}

fn rose_between(before: &Value, after: &Value, key: &str) -> f64 {
    sample(after, key) - sample(before, key)
}

#[tokio::test]
async fn ollama_pull_uses_phi3ds_own_download_with_streamed_progress() {
    use phi3d_tests::fake_hub::{FakeFile, FakeHub};
    let Some(python) = python_clients() else { return };
    let good = phi3d::model::catalogue::lookup("phi-3-mini-4k-instruct").unwrap();
    let bad = phi3d::model::catalogue::lookup("phi-3.5-mini-instruct").unwrap();
    let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let good_file = FakeFile::new(good.repo, good.file, bytes.clone());
    let sha256 = good_file.sha256_hex();
    let hub = FakeHub::start(vec![good_file, FakeFile::new(bad.repo, bad.file, bytes.clone()).serving_corrupted()]);
    let models = tempfile::tempdir().unwrap();
    let address = http_address();
    let daemon = tiny_daemon()
        .arg("--http-listen")
        .arg(&address)
        .arg("--model-dir")
        .arg(models.path().to_str().unwrap())
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", "")
        .start()
        .await;
    let found = run_client(&python, "pull.py", &[&format!("http://{address}"), "phi3-test-tiny", good.name, bad.name], &daemon);

    assert_eq!(found["served"], "success", "{found}");
    let statuses = found["good_statuses"].as_array().unwrap();
    assert_eq!(statuses.first().unwrap(), "pulling manifest", "{found}");
    assert_eq!(statuses.last().unwrap(), "success", "{found}");
    assert!(statuses.contains(&Value::from(format!("pulling {}", good.file))), "{found}");
    assert_eq!(
        found["good_last_progress"],
        serde_json::json!({ "digest": format!("sha256:{sha256}"), "total": bytes.len(), "completed": bytes.len() }),
        "{found}"
    );
    assert_eq!(std::fs::read(models.path().join(good.file)).unwrap(), bytes, "the pulled file is the hub's");
    // Once here, the model is not fetched again.
    assert_eq!(found["again"].as_array().unwrap().last().unwrap(), "success", "{found}");
    assert_eq!(hub.downloads().iter().filter(|seen| seen.path.ends_with(good.file)).count(), 1);

    assert!(found["bad_error"].as_str().unwrap().contains("sha256 mismatch"), "{found}");
    assert!(!models.path().join(bad.file).exists(), "a corrupt download is not kept");
    assert_eq!(found["unknown_status"], 404, "{found}");
    assert!(found["unknown_error"].as_str().unwrap().contains("can download phi-3-mini-4k-instruct"), "{found}");

    let _ = rustls::crypto::ring::default_provider().install_default();
    // As `curl -d` sends it: Ollama reads the body as JSON whatever its content type says.
    let refused = reqwest::Client::new()
        .post(format!("http://{address}/api/pull"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"model": 5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("not a valid request for /api/pull"), "{body}");
}

#[tokio::test]
async fn listing_and_metrics_answer_at_once_while_every_slot_is_busy() {
    let address = http_address();
    let daemon =
        tiny_daemon().arg("--slots").arg("1").arg("--ctx-size").arg("16384").arg("--http-listen").arg(&address).start().await;
    let mut client = daemon.inference().await;
    let request = || crate::common::complete_request("Go on:", crate::common::exactly(12000));
    let running = crate::common::in_background(client.complete(request()).await.unwrap().into_inner());
    crate::common::wait_active(&daemon, 1).await;
    let waiting = crate::common::in_background(client.complete(request()).await.unwrap().into_inner());

    // reqwest is built without a default TLS provider (phi3d installs ring's before its hub client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let missing = http.get(format!("http://{address}/no/such/path")).send().await.unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let mut metrics = String::new();
    for path in ["/api/tags", "/api/ps", "/v1/models", "/metrics"] {
        let started = std::time::Instant::now();
        let response = http.get(format!("http://{address}{path}")).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        let body = response.text().await.unwrap();
        // Home Assistant gives /api/tags 5 s; phi3d answers without waiting for the engine.
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{path} took {:?}", started.elapsed());
        if path == "/metrics" {
            metrics = body;
        } else {
            assert!(body.contains("phi3d-test-tiny") || body.contains("phi3-test-tiny"), "{path}: {body}");
        }
    }
    assert!(metrics.contains("phi3d_queue_depth 1\n"), "{metrics}");
    // A path no route has is one `other` series, not a series of its own.
    assert!(metrics.contains(r#"phi3d_requests_total{api="openai",endpoint="other",code="404"} 1"#), "{metrics}");
    assert!(!metrics.contains("/no/such/path"), "{metrics}");
    assert!(metrics.contains("phi3d_slots{phase=\"generating\"} 1\n"), "{metrics}");
    running.abort();
    waiting.abort();
}
