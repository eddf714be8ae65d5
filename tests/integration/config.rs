//! A bad configuration exits non-zero with one line naming the key and the fix; every key can
//! also come from a flag or a PHI3D_* variable.

use std::path::Path;

use phi3d_tests::harness::run;

use crate::common::{PHI3D, tiny_daemon, tiny_model};

/// Runs `serve` with a config file holding `toml`; returns (success, stderr).
fn serve_with(toml: &str, extra: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("phi3d.toml");
    std::fs::write(&config, toml).unwrap();
    let model = tiny_model();
    let mut args = vec!["serve", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = run(Path::new(PHI3D), &args, env);
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn assert_one_line_error(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, not {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} missing from {stderr:?}");
    }
}

#[test]
fn unknown_key() {
    let (ok, stderr) = serve_with("ctx_size = 1024\nctx_sise = 2048\n", &[], &[]);
    assert!(!ok);
    assert_one_line_error(&stderr, &["ctx_sise", "line 2", "phi3d.toml"]);
}

#[test]
fn wrong_type() {
    let (ok, stderr) = serve_with("queue_size = \"lots\"\n", &[], &[]);
    assert!(!ok);
    assert_one_line_error(&stderr, &["queue_size", "line 1"]);
}

#[test]
fn missing_model_file() {
    let output = run(
        Path::new(PHI3D),
        &["serve", "--config", "/dev/null", "--model", "/nonexistent/model.gguf"],
        &[],
    );
    assert!(!output.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&output.stderr), &["model:", "/nonexistent/model.gguf", "does not exist"]);
}

#[test]
fn unknown_catalogue_name() {
    let output = run(Path::new(PHI3D), &["serve", "--config", "/dev/null", "--model", "phi-9-giant"], &[]);
    assert!(!output.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&output.stderr), &["phi-9-giant", "phi-3-mini-4k-instruct"]);
}

#[test]
fn bad_listen_address() {
    let (ok, stderr) = serve_with("listen = \"localhost\"\n", &[], &[]);
    assert!(!ok);
    assert_one_line_error(&stderr, &["listen", "IP:PORT"]);
}

#[test]
fn a_named_config_file_must_exist() {
    let output = run(Path::new(PHI3D), &["serve", "--config", "/nonexistent/phi3d.toml"], &[]);
    assert!(!output.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&output.stderr), &["/nonexistent/phi3d.toml"]);
}

#[test]
fn zero_is_not_a_queue() {
    let (ok, stderr) = serve_with("", &[], &[("PHI3D_QUEUE_SIZE", "0")]);
    assert!(!ok);
    assert_one_line_error(&stderr, &["queue_size", "at least 1"]);
}

#[tokio::test]
async fn file_then_environment_then_flags() {
    // The file says 1024, the environment 1536, the flag 2048: the flag wins...
    let daemon = tiny_daemon()
        .config("ctx_size = 1024\nmax_tokens = 3\n")
        .env("PHI3D_CTX_SIZE", "1536")
        .arg("--ctx-size")
        .arg("2048")
        .start()
        .await;
    let status = daemon.admin().await.get_status(phi3d_proto::v1::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.model.unwrap().context_length, 2048);
    // ...and keys set only in the file still apply.
    let mut client = daemon.inference().await;
    let options = phi3d_proto::v1::GenerationOptions { ignore_eos: true, ..Default::default() };
    let stream = client.complete(crate::common::complete_request("x", options)).await.unwrap().into_inner();
    let reply = crate::common::collect(stream).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 3);
    drop(daemon);

    let daemon = tiny_daemon().config("ctx_size = 1024\n").env("PHI3D_CTX_SIZE", "1536").start().await;
    let status = daemon.admin().await.get_status(phi3d_proto::v1::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.model.unwrap().context_length, 1536, "the environment beats the file");
}
