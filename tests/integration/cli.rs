//! The client commands against a running daemon: `phi3d chat` (one-shot and interactive) and
//! `phi3d status`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use phi3d_tests::harness::run;

use crate::common::{PHI3D, daemon};

#[tokio::test]
async fn chat_streams_a_reply_to_the_terminal() {
    let daemon = daemon().await;
    let output = run(
        Path::new(PHI3D),
        &["chat", "--addr", &daemon.url(), "--max-tokens", "12", "--temperature", "0", "--stats", "Hello there"],
        &[],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let reply = String::from_utf8(output.stdout).unwrap();
    assert!(reply.trim().len() > 3, "a reply: {reply:?}");
    let stats = String::from_utf8_lossy(&output.stderr);
    assert!(stats.contains("12 reply tokens") || stats.contains("EndOfGeneration"), "{stats}");
}

#[tokio::test]
async fn chat_without_a_prompt_is_a_conversation_on_stdin() {
    let daemon = daemon().await;
    let mut child = Command::new(PHI3D)
        .args(["chat", "--addr", &daemon.url(), "--max-tokens", "5", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"first question\nsecond question\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let replies = String::from_utf8(output.stdout).unwrap();
    assert_eq!(replies.lines().filter(|line| !line.trim().is_empty()).count(), 2, "one reply a line: {replies:?}");
    assert_eq!(String::from_utf8_lossy(&output.stderr).matches("> ").count(), 3, "a prompt before each line and at the end");
}

#[tokio::test]
async fn status_describes_the_daemon() {
    let daemon = daemon().await;
    let output = run(Path::new(PHI3D), &["status", "--addr", &daemon.url()], &[]);
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("phi3-test-tiny") && printed.contains("0 active, 0 queued"), "{printed}");
    // The harness fixes one thread.
    assert!(printed.contains("threads    1 per token, 1 per batch (fixed)"), "{printed}");
}

#[tokio::test]
async fn status_into_a_closed_pipe_ends_quietly() {
    let daemon = daemon().await;
    // As in `phi3d status | head -1`, with the reader gone before the first line.
    for command in ["status", "tools"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(PHI3D).args([command, "--addr", &daemon.url()]).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.is_empty(), "phi3d {command}: {:?}: {stderr}", output.status);
    }
}

#[test]
fn a_client_without_a_daemon_says_what_is_wrong() {
    let output = run(Path::new(PHI3D), &["status", "--addr", "http://127.0.0.1:9"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: cannot reach phi3d at http://127.0.0.1:9"), "{stderr}");
}
