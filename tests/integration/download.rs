//! `phi3d pull` end to end: the real binary against a fake Hugging Face hub, checking what ends
//! up in the model directory, what the hub was asked, and what the user is told.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use phi3d::model::catalogue;
use phi3d_tests::fake_hub::{FakeFile, FakeHub};

/// The default catalogue entry, which the fake hub serves under its real repo and file names.
const NAME: &str = "phi-3-mini-4k-instruct";
const REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
const FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";

/// Big enough to arrive in many chunks, small enough to keep the tests quick.
const SIZE: usize = 3 << 20;

/// A pull that takes longer than this is hung, not slow.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// Deterministic pseudo-random bytes (xorshift), so a misplaced or repeated chunk shows.
fn model_bytes() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = Vec::with_capacity(SIZE);
    while bytes.len() < SIZE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(SIZE);
    bytes
}

fn default_file() -> FakeFile {
    FakeFile::new(REPO, FILE, model_bytes())
}

/// Runs `phi3d pull {name} --model-dir {dir} {extra...}` against `hub`, with none of the
/// caller's phi3d or Hugging Face settings leaking in.
fn pull(hub: &FakeHub, name: &str, dir: &Path, extra: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phi3d"));
    command
        .arg("pull")
        .arg(name)
        .arg("--model-dir")
        .arg(dir)
        .args(extra)
        .env_remove("PHI3D_MODEL_DIR")
        .env_remove("PHI3D_OFFLINE")
        .env_remove("HF_TOKEN")
        .env("HF_ENDPOINT", hub.endpoint())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("HF_TOKEN", token);
    }
    run_with_timeout(command)
}

fn run_with_timeout(mut command: Command) -> Output {
    let mut child = command.spawn().expect("start phi3d");
    // Drain both pipes on threads, so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + PULL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for phi3d") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("phi3d pull did not finish within {PULL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

fn final_path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

fn part_path(dir: &Path) -> PathBuf {
    dir.join(format!("{FILE}.part"))
}

fn assert_failed_with_error_line(output: &Output) {
    assert!(
        !output.status.success(),
        "expected failure\n{}",
        describe(output)
    );
    assert!(
        text(&output.stderr)
            .lines()
            .any(|l| l.starts_with("error: ")),
        "expected an `error: ...` line\n{}",
        describe(output)
    );
}

#[test]
fn pull_downloads_verifies_and_prints_the_path() {
    let hub = FakeHub::start(vec![default_file()]);
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("models");

    let output = pull(&hub, NAME, &model_dir, &[], None);
    assert!(output.status.success(), "{}", describe(&output));
    let path = final_path(&model_dir);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        model_bytes(),
        "downloaded bytes differ"
    );
    assert!(!part_path(&model_dir).exists(), "a .part was left behind");
    assert!(
        text(&output.stdout).contains(&path.display().to_string()),
        "stdout should name {}\n{}",
        path.display(),
        describe(&output)
    );
    let downloads = hub.downloads();
    assert_eq!(downloads.len(), 1, "{:?}", hub.requests());
    assert_eq!(downloads[0].range, None);
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.path == format!("/api/models/{REPO}/tree/main")),
        "the hub's size and sha256 were never asked for: {:?}",
        hub.requests()
    );
}

#[test]
fn an_interrupted_pull_resumes_with_a_range_for_the_rest_only() {
    let hub = FakeHub::start(vec![default_file()]);
    let dir = tempfile::tempdir().unwrap();
    hub.cut_next_download_after(1 << 20);

    let first = pull(&hub, NAME, dir.path(), &[], None);
    assert_failed_with_error_line(&first);
    assert!(
        !final_path(dir.path()).exists(),
        "a partial file got the final name"
    );
    let kept = std::fs::metadata(part_path(dir.path()))
        .unwrap_or_else(|e| panic!("no .part after the cut: {e}\n{}", describe(&first)))
        .len();
    assert!(kept > 0 && kept < SIZE as u64, "kept {kept} bytes");

    let second = pull(&hub, NAME, dir.path(), &[], None);
    assert!(second.status.success(), "{}", describe(&second));
    assert_eq!(
        std::fs::read(final_path(dir.path())).unwrap(),
        model_bytes()
    );
    assert!(!part_path(dir.path()).exists());

    let downloads = hub.downloads();
    assert_eq!(downloads.len(), 2, "{:?}", hub.requests());
    assert_eq!(downloads[0].range, None);
    assert_eq!(
        downloads[1].range,
        Some(format!("bytes={kept}-")),
        "the resume must ask for the rest only"
    );
}

#[test]
fn a_sha256_mismatch_fails_and_leaves_no_file() {
    let wrong = "0".repeat(64);
    let file = default_file().stating_sha256(&wrong);
    let actual = file.sha256_hex();
    let hub = FakeHub::start(vec![file]);
    let dir = tempfile::tempdir().unwrap();

    let output = pull(&hub, NAME, dir.path(), &[], None);
    assert_failed_with_error_line(&output);
    let stderr = text(&output.stderr).to_lowercase();
    assert!(
        stderr.contains("sha256") && stderr.contains("mismatch"),
        "{}",
        describe(&output)
    );
    assert!(
        stderr.contains(&wrong) && stderr.contains(&actual),
        "both digests should be named\n{}",
        describe(&output)
    );
    assert!(
        !final_path(dir.path()).exists(),
        "a corrupt file got the final name"
    );
    assert!(
        !part_path(dir.path()).exists(),
        "the corrupt .part should be deleted"
    );
}

#[test]
fn bytes_corrupted_in_transit_are_rejected() {
    let hub = FakeHub::start(vec![default_file().serving_corrupted()]);
    let dir = tempfile::tempdir().unwrap();

    let output = pull(&hub, NAME, dir.path(), &[], None);
    assert_failed_with_error_line(&output);
    assert!(
        text(&output.stderr).to_lowercase().contains("sha256"),
        "{}",
        describe(&output)
    );
    assert!(!final_path(dir.path()).exists());
    assert!(!part_path(dir.path()).exists());
}

#[test]
fn an_unknown_model_name_lists_the_known_ones() {
    let hub = FakeHub::start(vec![default_file()]);
    let dir = tempfile::tempdir().unwrap();

    let output = pull(&hub, "phi-2-nonexistent", dir.path(), &[], None);
    assert_failed_with_error_line(&output);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("phi-2-nonexistent"),
        "{}",
        describe(&output)
    );
    for entry in catalogue::entries() {
        assert!(
            stderr.contains(entry.name),
            "{} not listed\n{}",
            entry.name,
            describe(&output)
        );
    }
    assert_eq!(
        hub.request_count(),
        0,
        "an unknown name should not reach the hub"
    );
}

#[test]
fn offline_without_the_model_fails_without_asking_the_hub() {
    let hub = FakeHub::start(vec![default_file()]);
    let dir = tempfile::tempdir().unwrap();

    let output = pull(&hub, NAME, dir.path(), &["--offline"], None);
    assert_failed_with_error_line(&output);
    assert!(
        text(&output.stderr).to_lowercase().contains("offline"),
        "{}",
        describe(&output)
    );
    assert_eq!(
        hub.request_count(),
        0,
        "offline must not reach the hub: {:?}",
        hub.requests()
    );
    assert!(!final_path(dir.path()).exists());
}

#[test]
fn offline_with_the_model_present_succeeds_without_asking_the_hub() {
    let hub = FakeHub::start(vec![default_file()]);
    let dir = tempfile::tempdir().unwrap();
    assert!(pull(&hub, NAME, dir.path(), &[], None).status.success());
    let before = hub.request_count();

    let output = pull(&hub, NAME, dir.path(), &["--offline"], None);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text(&output.stdout).contains(&final_path(dir.path()).display().to_string()));
    assert_eq!(
        hub.request_count(),
        before,
        "offline must not reach the hub"
    );
}

#[test]
fn hf_token_is_sent_as_a_bearer_token() {
    let hub = FakeHub::start(vec![default_file()]);
    hub.require_token("hf_test_token");
    let dir = tempfile::tempdir().unwrap();

    let refused = pull(&hub, NAME, dir.path(), &[], None);
    assert_failed_with_error_line(&refused);
    assert!(
        text(&refused.stderr).contains("HF_TOKEN"),
        "should say how to authenticate\n{}",
        describe(&refused)
    );
    assert!(!final_path(dir.path()).exists());

    let before = hub.request_count();
    let output = pull(&hub, NAME, dir.path(), &[], Some("hf_test_token"));
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        std::fs::read(final_path(dir.path())).unwrap(),
        model_bytes()
    );
    let sent: Vec<_> = hub.requests().into_iter().skip(before).collect();
    assert!(!sent.is_empty());
    for request in &sent {
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer hf_test_token"),
            "{request:?}"
        );
    }
}
