//! Reuse beyond an exact prefix, as real homes need it: a system prompt that starts with the
//! time, a state that changes in the middle, a burst of short requests between two home
//! turns, and a restart after it.

use std::time::Duration;

use phi3d_proto::v1::{GetStatusRequest, Usage};

use crate::common::{collect, complete_request, exactly, in_background, tiny_daemon};
use phi3d_tests::harness::{Daemon, DaemonBuilder};

use crate::prompt_cache::house_prompt as house;

/// The house prompt as Home Assistant before 2025.10 sends it: the time to the second first.
fn house_at(time: &str) -> String {
    format!("Current time is {time}. Today's date is Friday, December 4, 2026.\n{}", house())
}

async fn usage(daemon: &Daemon, prompt: &str) -> Usage {
    let mut client = daemon.inference().await;
    let stream = client.complete(complete_request(prompt, exactly(4))).await.unwrap().into_inner();
    let reply = collect(stream).await.unwrap();
    let usage = reply.done.usage.unwrap();
    assert_eq!(usage.completion_tokens, 4, "the reply is generated: {usage:?}\n{}", daemon.stderr());
    usage
}

/// `count` short requests at once, `{k}` in `template` replaced by each one's number, each
/// generating `generate` tokens; returns when all have ended.
async fn burst(daemon: &Daemon, count: u32, template: &str, generate: u32) {
    let mut client = daemon.inference().await;
    let mut requests = Vec::new();
    for k in 0..count {
        let prompt = template.replace("{k}", &k.to_string());
        requests.push(in_background(client.complete(complete_request(&prompt, exactly(generate))).await.unwrap().into_inner()));
    }
    for request in requests {
        request.await.unwrap().unwrap();
    }
}

fn with_cache_dir(builder: DaemonBuilder, dir: &std::path::Path) -> DaemonBuilder {
    builder.arg("--prompt-cache-dir").arg(dir.to_str().unwrap())
}

#[tokio::test]
async fn a_new_time_at_the_start_is_decoded_and_the_house_after_it_reused() {
    let daemon = tiny_daemon().arg("--slots").arg("1").start().await;
    let first = usage(&daemon, &format!("{}User: lights off", house_at("12:00:01"))).await;
    assert_eq!(first.shifted_prompt_tokens, 0, "{first:?}");
    let second = usage(&daemon, &format!("{}User: is the door locked?", house_at("12:00:02"))).await;
    assert!(second.cached_prompt_tokens < 20, "the exact prefix ends at the time: {second:?}");
    assert!(second.shifted_prompt_tokens > 800, "the house is reused past it: {second:?}");
    assert!(second.cached_prompt_tokens + second.shifted_prompt_tokens < second.prompt_tokens);
    // The new text (the time, the question) was decoded: the next turn finds it at its place.
    let third = usage(&daemon, &format!("{}User: is the door locked? Yes", house_at("12:00:02"))).await;
    assert!(third.cached_prompt_tokens > 850, "{third:?}");

    // With reuse past a changed span off, the same turn re-reads the house.
    let exact_only = tiny_daemon().arg("--slots").arg("1").arg("--prompt-cache-min-chunk").arg("0").start().await;
    usage(&exact_only, &format!("{}User: lights off", house_at("12:00:01"))).await;
    let again = usage(&exact_only, &format!("{}User: is the door locked?", house_at("12:00:02"))).await;
    assert_eq!(again.shifted_prompt_tokens, 0, "{again:?}");
    assert!(again.cached_prompt_tokens < 20, "{again:?}");
}

#[tokio::test]
async fn a_longer_state_in_the_middle_shifts_the_rest_to_new_positions() {
    let daemon = tiny_daemon().arg("--slots").arg("1").start().await;
    let text = house();
    let middle = text.match_indices('\n').nth(35).unwrap().0 + 1;
    let (head, tail) = text.split_at(middle);
    let before = format!("{head}State: the front door is locked.\n{tail}User: lights off");
    let after = format!(
        "{head}State: the front door is open, and the window of the hall has been open for an hour.\n{tail}User: close it"
    );
    usage(&daemon, &before).await;
    let changed = usage(&daemon, &after).await;
    assert!(changed.cached_prompt_tokens > 300, "the head is an exact prefix: {changed:?}");
    assert!(changed.shifted_prompt_tokens > 300, "the tail moved later and was reused: {changed:?}");
    // Shorter again: the tail moves back earlier.
    let shorter = usage(&daemon, &format!("{head}State: closed.\n{tail}User: thanks")).await;
    assert!(shorter.shifted_prompt_tokens > 300, "{shorter:?}");
}

#[tokio::test]
async fn a_burst_of_short_requests_does_not_evict_the_house_nor_lose_it_at_restart() {
    let cache = tempfile::tempdir().unwrap();
    let slots = 2;
    let builder = || with_cache_dir(tiny_daemon().arg("--slots").arg(slots.to_string()), cache.path());
    let mut daemon = builder().start().await;
    let house = house();
    usage(&daemon, &format!("{house}User: lights off")).await;
    // As many short requests as there are slots, at once: every slot is taken.
    burst(&daemon, slots, "Timer {k}: how long until the pasta is done?", 24).await;
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(status.kv_cells_used < status.kv_cells_total / 2, "cells were free all along: {status:?}");
    let after_burst = usage(&daemon, &format!("{house}User: lights on")).await;
    assert!(after_burst.cached_prompt_tokens > 800, "the house was kept as an entry: {after_burst:?}");

    // Another burst, then a restart: the house is what was saved, and it is used.
    burst(&daemon, slots, "Alarm {k}: wake me at seven", 8).await;
    assert!(daemon.terminate(Duration::from_secs(20)).await.success(), "{}", daemon.stderr());
    let restarted = builder().start().await;
    let after_restart = usage(&restarted, &format!("{house}User: lights on")).await;
    assert!(after_restart.cached_prompt_tokens > 800, "{after_restart:?}\n{}", restarted.stderr());

    // Without entries the house leaves the KV cache when the burst takes its slot: the RAM
    // tier keeps it, and without that too it is read again.
    for (ram_mb, kept) in [("256", true), ("0", false)] {
        let without = tiny_daemon()
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--prompt-cache-entries")
            .arg("0")
            .arg("--prompt-cache-ram-mb")
            .arg(ram_mb)
            .start()
            .await;
        usage(&without, &format!("{house}User: lights off")).await;
        burst(&without, slots, "Timer {k}: how long until the pasta is done?", 24).await;
        let after = usage(&without, &format!("{house}User: lights on")).await;
        assert_eq!(after.cached_prompt_tokens > 800, kept, "RAM {ram_mb} MB: {after:?}");
    }
}

#[tokio::test]
async fn a_restored_entry_is_reused_past_a_changed_span_but_never_under_another_configuration() {
    let (cache, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = with_cache_dir(tiny_daemon(), cache.path()).start().await;
    usage(&first, &format!("{}User: lights off", house_at("07:59:59"))).await;
    assert!(first.terminate(Duration::from_secs(20)).await.success(), "{}", first.stderr());
    for file in std::fs::read_dir(cache.path()).unwrap() {
        let path = file.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }

    // Another context size: the saved cells are not loaded, so nothing is shifted either.
    let other = with_cache_dir(tiny_daemon().arg("--ctx-size").arg("2048"), cache.path()).start().await;
    let elsewhere = usage(&other, &format!("{}User: lights on", house_at("08:00:00"))).await;
    assert_eq!((elsewhere.cached_prompt_tokens, elsewhere.shifted_prompt_tokens), (0, 0), "{elsewhere:?}");

    // The same configuration: restored, and reused past the new time.
    let restored = with_cache_dir(tiny_daemon(), copy.path()).start().await;
    let reused = usage(&restored, &format!("{}User: lights on", house_at("08:00:00"))).await;
    assert!(reused.shifted_prompt_tokens > 800, "{reused:?}\n{}", restored.stderr());
}

/// A home's prompt of about 880 tokens whose devices are all of one `kind`: prompts of
/// different kinds share their first words and no long run of tokens.
fn house_of(kind: &str) -> String {
    let rooms = ["kitchen", "hall", "bedroom", "office", "garden", "garage"];
    let mut text = format!("You control a house. Its {kind} devices:\n");
    for index in 0..60 {
        text.push_str(&format!("- {kind}.{}_{index}: on\n", rooms[index % rooms.len()]));
    }
    text
}

#[tokio::test]
async fn a_prompt_evicted_to_ram_and_then_to_disk_is_restored_and_used() {
    let cache = tempfile::tempdir().unwrap();
    // Room in the cells for two houses: a third evicts the least worth keeping.
    let builder = || {
        with_cache_dir(tiny_daemon(), cache.path())
            .arg("--ctx-size")
            .arg("2048")
            .arg("--slots")
            .arg("1")
            .arg("--prompt-cache-entries")
            .arg("2")
    };
    let mut daemon = builder().start().await;
    for kind in ["light", "switch", "fan"] {
        let cold = usage(&daemon, &format!("{}User: all off", house_of(kind))).await;
        assert!(cold.cached_prompt_tokens < 20, "{kind}: {cold:?}");
    }
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.cache_entries_in_ram, 1, "the light house went to RAM: {status:?}");
    assert!(status.cache_ram_bytes > 0 && status.cache_ram_bytes <= status.cache_ram_budget_bytes, "{status:?}");
    let restored = usage(&daemon, &format!("{}User: all on", house_of("light"))).await;
    assert!(restored.cached_prompt_tokens > 700, "restored from RAM, not read again: {restored:?}");

    // The switch house is in RAM now; at shutdown it is saved with the rest, and after the
    // restart, with the cells taken by the others, it waits in RAM until asked for.
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.cache_entries_in_ram, 1, "{status:?}");
    assert!(daemon.terminate(Duration::from_secs(20)).await.success(), "{}", daemon.stderr());
    let restarted = builder().start().await;
    let status = restarted.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(status.cache_entries_on_disk >= 3 && status.cache_entries_in_ram >= 1, "{status:?}\n{}", restarted.stderr());
    for kind in ["switch", "fan", "light"] {
        let warm = usage(&restarted, &format!("{}User: all on", house_of(kind))).await;
        assert!(warm.cached_prompt_tokens > 700, "{kind}: {warm:?}\n{}", restarted.stderr());
    }
}
