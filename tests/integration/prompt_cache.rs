//! The prompt cache: a repeated prefix is not decoded again, in the same slot, copied from a
//! busy one, from a pinned prefix, and after a restart; cells running out evict idle caches;
//! files of another configuration and corrupt files are ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use phi3d_proto::v1::{ChatRequest, GetStatusRequest, GetStatusResponse, Message, Role, Usage, slot_status};

use crate::common::{chat_request, collect, complete_request, exactly, in_background, tiny_daemon, user, wait_active};
use phi3d_tests::harness::{Daemon, DaemonBuilder};

/// A prefix of about 900 tokens, like a home's system prompt with its devices.
pub fn house_prompt() -> String {
    let rooms = ["kitchen", "hall", "bedroom", "office", "garden", "garage"];
    let mut text = String::from("You control a house. Devices:\n");
    for index in 0..70 {
        text.push_str(&format!("- light.{}_{index}: on\n", rooms[index % rooms.len()]));
    }
    text
}

async fn complete_usage(daemon: &Daemon, prompt: &str) -> Usage {
    let mut client = daemon.inference().await;
    let stream = client.complete(complete_request(prompt, exactly(4))).await.unwrap().into_inner();
    collect(stream).await.unwrap().done.usage.unwrap()
}

async fn status(daemon: &Daemon) -> GetStatusResponse {
    daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner()
}

fn with_cache_dir(builder: DaemonBuilder, dir: &Path) -> DaemonBuilder {
    builder.arg("--prompt-cache-dir").arg(dir.to_str().unwrap())
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.map(|entry| entry.unwrap().path()).filter(|path| path.extension().is_some_and(|ext| ext == "kv")).collect()
}

#[tokio::test]
async fn a_repeated_prefix_is_read_once_and_a_new_one_in_full() {
    let daemon = tiny_daemon().start().await;
    let house = house_prompt();
    let first = complete_usage(&daemon, &format!("{house}User: lights off")).await;
    assert_eq!(first.cached_prompt_tokens, 0, "nothing cached yet");
    assert!(first.prompt_tokens > 800, "{first:?}");
    let second = complete_usage(&daemon, &format!("{house}User: lights on in the hall")).await;
    assert!(second.cached_prompt_tokens + 20 > first.prompt_tokens, "the house prefix is reused: {second:?}");
    assert!(second.cached_prompt_tokens < second.prompt_tokens);
    let other = complete_usage(&daemon, "Something else entirely").await;
    assert!(other.cached_prompt_tokens <= 1, "a new prompt shares at most BOS: {other:?}");
    let status = status(&daemon).await;
    assert!(status.cache_entries_in_memory >= 2, "{status:?}");
    assert!(status.kv_cells_used > 800 && status.kv_cells_used <= status.kv_cells_total, "{status:?}");
}

#[tokio::test]
async fn a_busy_slots_prefix_is_copied_not_decoded_again() {
    // Room for the long reply beside the short one.
    let daemon = tiny_daemon().arg("--slots").arg("2").arg("--ctx-size").arg("16384").start().await;
    let house = house_prompt();
    let mut client = daemon.inference().await;
    let long = in_background(
        client.complete(complete_request(&format!("{house}User: tell a long story"), exactly(12000))).await.unwrap().into_inner(),
    );
    wait_active(&daemon, 1).await; // generating: its prompt is in the cache
    let usage = complete_usage(&daemon, &format!("{house}User: is the door locked?")).await;
    assert!(usage.cached_prompt_tokens > 800, "copied from the busy slot: {usage:?}");
    let status = status(&daemon).await;
    let generating = status.slot_status.iter().filter(|slot| slot.state == slot_status::State::Generating as i32).count();
    assert_eq!(generating, 1, "the source was still busy: {status:?}");
    // The copy shares cells: two sequences hold the house prefix, the cache counts it once.
    let tokens: u32 = status.slot_status.iter().map(|slot| slot.tokens).sum();
    assert!(status.kv_cells_used + 800 < tokens, "shared cells counted once: {status:?}");
    long.abort();
}

#[tokio::test]
async fn step_by_step_a_conversation_reuses_its_earlier_turns() {
    let daemon = tiny_daemon().start().await;
    let mut client = daemon.inference().await;
    let system = Message { role: Role::System as i32, content: house_prompt(), ..Message::default() };
    let first = ChatRequest { messages: vec![system.clone(), user("Lights off")], ..chat_request("", exactly(6)) };
    let reply = collect(client.chat(first).await.unwrap().into_inner()).await.unwrap();
    let answer = Message { role: Role::Assistant as i32, content: reply.text(), ..Message::default() };
    let second =
        ChatRequest { messages: vec![system, user("Lights off"), answer, user("And now on")], ..chat_request("", exactly(6)) };
    let usage = collect(client.chat(second).await.unwrap().into_inner()).await.unwrap().done.usage.unwrap();
    let first_usage = reply.done.usage.unwrap();
    assert!(usage.cached_prompt_tokens >= first_usage.prompt_tokens - 1, "{first_usage:?} then {usage:?}");
}

#[tokio::test]
async fn idle_caches_are_evicted_when_cells_run_out() {
    // 2048 cells, three slots: each house prompt takes about 900, so the third cannot be
    // admitted before an idle cache is evicted.
    let daemon = tiny_daemon().arg("--slots").arg("3").arg("--ctx-size").arg("2048").arg("--max-tokens").arg("8").start().await;
    let house = house_prompt();
    for round in 0..4 {
        let usage = complete_usage(&daemon, &format!("{round} {house}")).await;
        assert_eq!(usage.completion_tokens, 4, "round {round} is served: {usage:?}");
        let status = status(&daemon).await;
        assert!(status.kv_cells_used <= status.kv_cells_total, "{status:?}");
    }
    // The latest prompt survived the evictions.
    let usage = complete_usage(&daemon, &format!("3 {house} again")).await;
    assert!(usage.cached_prompt_tokens > 800, "{usage:?}");
}

#[tokio::test]
async fn a_pinned_prefix_is_warm_before_the_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let pinned = dir.path().join("house.txt");
    std::fs::write(&pinned, house_prompt()).unwrap();
    let daemon = tiny_daemon().arg("--pinned-prompt").arg(pinned.to_str().unwrap()).start().await;
    let status = status(&daemon).await;
    assert!(status.kv_cells_used > 800, "decoded at start-up: {status:?}");
    let mut client = daemon.inference().await;
    let system = Message { role: Role::System as i32, content: house_prompt(), ..Message::default() };
    let request = ChatRequest { messages: vec![system, user("Lights off")], ..chat_request("", exactly(4)) };
    let usage = collect(client.chat(request).await.unwrap().into_inner()).await.unwrap().done.usage.unwrap();
    assert!(usage.cached_prompt_tokens > 800, "the very first request starts from the pinned prefix: {usage:?}");
}

#[tokio::test]
async fn the_cache_survives_a_restart_and_is_used() {
    let cache = tempfile::tempdir().unwrap();
    let house = house_prompt();
    let mut first = with_cache_dir(tiny_daemon(), cache.path()).start().await;
    let cold = complete_usage(&first, &format!("{house}User: lights off")).await;
    assert_eq!(cold.cached_prompt_tokens, 0);
    assert!(first.terminate(Duration::from_secs(20)).await.success(), "{}", first.stderr());
    assert!(!cache_files(cache.path()).is_empty(), "saved on shutdown:\n{}", first.stderr());

    let second = with_cache_dir(tiny_daemon(), cache.path()).start().await;
    let status = status(&second).await;
    assert!(status.cache_entries_on_disk >= 1 && status.cache_entries_in_memory >= 1, "{status:?}");
    let warm = complete_usage(&second, &format!("{house}User: lights on")).await;
    assert!(warm.cached_prompt_tokens > 800, "the restored prefix is used: {warm:?}\n{}", second.stderr());
}

#[tokio::test]
async fn a_cache_of_another_configuration_or_a_corrupt_one_is_ignored_and_removed() {
    let cache = tempfile::tempdir().unwrap();
    let house = house_prompt();
    let mut first = with_cache_dir(tiny_daemon(), cache.path()).start().await;
    complete_usage(&first, &format!("{house}User: lights off")).await;
    assert!(first.terminate(Duration::from_secs(20)).await.success());
    assert!(!cache_files(cache.path()).is_empty());

    // Another configuration (a different context size) must not load it.
    let mut other = with_cache_dir(tiny_daemon().arg("--ctx-size").arg("2048"), cache.path()).start().await;
    let usage = complete_usage(&other, &format!("{house}User: lights on")).await;
    assert_eq!(usage.cached_prompt_tokens, 0, "{usage:?}");
    assert!(other.stderr().contains("prompt cache file ignored and removed"), "{}", other.stderr());
    assert!(other.terminate(Duration::from_secs(20)).await.success());

    // Its own file, corrupted, is refused before llama.cpp reads it.
    let files = cache_files(cache.path());
    assert!(!files.is_empty(), "the second daemon saved its own cache");
    for file in &files {
        let mut bytes = std::fs::read(file).unwrap();
        let middle = bytes.len() - 100;
        bytes[middle] ^= 0xff;
        std::fs::write(file, bytes).unwrap();
    }
    let third = with_cache_dir(tiny_daemon().arg("--ctx-size").arg("2048"), cache.path()).start().await;
    assert!(third.stderr().contains("checksum mismatch"), "{}", third.stderr());
    let usage = complete_usage(&third, &format!("{house}User: lights on")).await;
    assert_eq!(usage.cached_prompt_tokens, 0, "{usage:?}");
}

#[tokio::test]
async fn a_changed_pinned_prompt_is_decoded_anew_after_a_restart() {
    let cache = tempfile::tempdir().unwrap();
    let pinned = cache.path().join("pinned.txt");
    std::fs::write(&pinned, house_prompt()).unwrap();
    let start = || {
        with_cache_dir(tiny_daemon(), &cache.path().join("kv"))
            .arg("--ctx-size")
            .arg("2048")
            .arg("--slots")
            .arg("2")
            .arg("--pinned-prompt")
            .arg(pinned.to_str().unwrap())
    };
    let mut first = start().start().await;
    complete_usage(&first, &format!("{} lights", house_prompt())).await;
    complete_usage(&first, &format!("{} doors", house_prompt())).await;
    assert!(first.terminate(Duration::from_secs(20)).await.success());
    // Another prompt of the same size: the saved pinned entry no longer matches.
    std::fs::write(&pinned, house_prompt().replace("light.", "lamp.")).unwrap();
    for _ in 0..2 {
        let mut daemon = start().start().await;
        let mut client = daemon.inference().await;
        let system = Message { role: Role::System as i32, content: house_prompt().replace("light.", "lamp."), ..Message::default() };
        let request = ChatRequest { messages: vec![system, user("Lights off")], ..chat_request("", exactly(4)) };
        let usage = collect(client.chat(request).await.unwrap().into_inner()).await.unwrap().done.usage.unwrap();
        assert!(usage.cached_prompt_tokens > 800, "the new pinned prompt is warm: {usage:?}\n{}", daemon.stderr());
        assert!(daemon.terminate(Duration::from_secs(20)).await.success(), "{}", daemon.stderr());
    }
}

#[tokio::test]
async fn shutdown_saves_the_cache_at_once_while_a_client_keeps_a_stream_open() {
    let cache = tempfile::tempdir().unwrap();
    let mut daemon = with_cache_dir(tiny_daemon(), cache.path()).start().await;
    complete_usage(&daemon, &format!("{}User: lights off", house_prompt())).await;
    // A health watch stays open until the server closes it.
    let mut health = daemon.health().await;
    let watch = health
        .watch(phi3d_tests::harness::tonic_health_client::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    assert!(daemon.terminate(Duration::from_secs(30)).await.success(), "{}", daemon.stderr());
    assert!(started.elapsed() < Duration::from_secs(15), "shutdown took {:?}", started.elapsed());
    assert!(!cache_files(cache.path()).is_empty(), "saved:\n{}", daemon.stderr());
    drop(watch);
}

#[tokio::test]
async fn a_pinned_prompt_longer_than_the_context_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let pinned = dir.path().join("long.txt");
    std::fs::write(&pinned, "word ".repeat(400)).unwrap();
    let model = crate::common::tiny_model();
    let output = phi3d_tests::harness::run(
        Path::new(crate::common::PHI3D),
        &[
            "serve", "--config", "/dev/null", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0",
            "--ctx-size", "256", "--pinned-prompt", pinned.to_str().unwrap(),
            "--prompt-cache-dir", dir.path().join("kv").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1), "a clean refusal, not an abort");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.contains("long.txt is") && error.contains("context of 256") && error.contains("raise ctx_size"), "{stderr}");
}
