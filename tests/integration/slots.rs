//! Parallel slots: concurrent streams share one context, each gets its own reply, the queue
//! is served in order, and a slot is freed on every way a request can end.

use std::time::{Duration, Instant};

use phi3d_proto::v1::{CancelRequest, GetStatusRequest, GetStatusResponse, slot_status};

use std::path::Path;

use crate::common::{PHI3D, collect, complete_request, exactly, in_background, tiny_daemon, wait_active};
use phi3d_tests::harness::{Daemon, DaemonBuilder};
use phi3d_tests::model_gen::{ModelSpec, ensure_model};

const PROMPTS: [&str; 4] = [
    "The kitchen lights are",
    "Tomorrow the weather will be",
    "Turn the thermostat to",
    "A short story about a robot:",
];

async fn status(daemon: &Daemon) -> GetStatusResponse {
    daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner()
}

/// Waits until every slot is idle and nothing is queued.
async fn all_idle(daemon: &Daemon) -> GetStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status(daemon).await;
        let idle = status.slot_status.iter().all(|slot| slot.state == slot_status::State::Idle as i32);
        if idle && status.active_requests == 0 && status.queue_depth == 0 {
            return status;
        }
        assert!(Instant::now() < deadline, "slots still busy: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn concurrent_greedy_streams_each_get_the_reply_they_would_get_alone() {
    let daemon = tiny_daemon().arg("--slots").arg("4").start().await;
    let mut alone = Vec::new();
    for prompt in PROMPTS {
        let mut client = daemon.inference().await;
        let reply = collect(client.complete(complete_request(prompt, exactly(24))).await.unwrap().into_inner());
        alone.push(reply.await.unwrap().text());
    }
    // A fresh daemon, so that no prompt is cached from the runs above.
    let daemon = tiny_daemon().arg("--slots").arg("4").start().await;
    let together = futures::future::join_all(PROMPTS.iter().map(|prompt| {
        let daemon = &daemon;
        async move {
            let mut client = daemon.inference().await;
            let stream = client.complete(complete_request(prompt, exactly(24))).await.unwrap().into_inner();
            collect(stream).await.unwrap()
        }
    }))
    .await;
    for ((prompt, alone), together) in PROMPTS.iter().zip(&alone).zip(&together) {
        assert_eq!(&together.text(), alone, "{prompt:?} run with three others");
        assert_eq!(together.done.usage.unwrap().completion_tokens, 24);
    }
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    assert!(distinct.len() > 1, "different prompts, different replies: {alone:?}");
    let status = all_idle(&daemon).await;
    assert_eq!(status.slots, 4);
    assert_eq!(status.slot_status.len(), 4);
    // Every stream ran at once: none waited for another to finish.
    let queued: Vec<f64> = together.iter().map(|reply| reply.done.timings.unwrap().queued_ms).collect();
    assert!(queued.iter().all(|ms| *ms < 500.0), "queued_ms {queued:?}");
}

#[tokio::test]
async fn a_new_request_joins_while_a_long_one_streams() {
    let daemon = tiny_daemon().arg("--slots").arg("2").arg("--ctx-size").arg("16384").start().await;
    let mut client = daemon.inference().await;
    let long = in_background(client.complete(complete_request("Go on:", exactly(12000))).await.unwrap().into_inner());
    wait_active(&daemon, 1).await;
    let started = Instant::now();
    let short = collect(client.complete(complete_request("Quick:", exactly(8))).await.unwrap().into_inner());
    let short = short.await.unwrap();
    assert_eq!(short.done.usage.unwrap().completion_tokens, 8);
    assert!(started.elapsed() < Duration::from_secs(5), "the short request waited {:?}", started.elapsed());
    let during = status(&daemon).await;
    let generating = during.slot_status.iter().filter(|slot| slot.state == slot_status::State::Generating as i32);
    assert_eq!(generating.count(), 1, "the long request is still generating: {during:?}");
    long.abort();
    all_idle(&daemon).await;
}

#[tokio::test]
async fn requests_beyond_the_slots_wait_in_order() {
    let daemon = tiny_daemon().arg("--slots").arg("1").start().await;
    let replies = futures::future::join_all((0..4).map(|index| {
        let daemon = &daemon;
        async move {
            // Staggered, so that the arrival order is known.
            tokio::time::sleep(Duration::from_millis(30 * index)).await;
            let mut client = daemon.inference().await;
            let stream = client.complete(complete_request("Count:", exactly(400))).await.unwrap().into_inner();
            let reply = collect(stream).await.unwrap();
            (index, Instant::now(), reply.done.timings.unwrap().queued_ms)
        }
    }))
    .await;
    let mut by_finish = replies.clone();
    by_finish.sort_by_key(|(_, finished, _)| *finished);
    let order: Vec<u64> = by_finish.iter().map(|(index, _, _)| *index).collect();
    assert_eq!(order, [0, 1, 2, 3], "first come, first served");
    assert!(replies[3].2 > replies[1].2, "later requests waited longer: {replies:?}");
}

#[tokio::test]
async fn slots_are_freed_on_cancel_disconnect_and_error() {
    let daemon = tiny_daemon().arg("--slots").arg("2").arg("--ctx-size").arg("16384").start().await;
    let mut client = daemon.inference().await;
    // Both fit at once: each reserves its prompt plus 6000 tokens of the 16384 cells.
    let mut request = complete_request("Go on:", exactly(6000));
    request.request_id = "to-cancel".into();
    let cancelled = in_background(client.complete(request).await.unwrap().into_inner());
    let dropped =
        in_background(client.complete(complete_request("Go on and on:", exactly(6000))).await.unwrap().into_inner());
    wait_active(&daemon, 2).await;
    assert_eq!(status(&daemon).await.active_requests, 2);
    assert!(client.cancel(CancelRequest { request_id: "to-cancel".into() }).await.unwrap().into_inner().found);
    dropped.abort();
    let cancelled = cancelled.await.unwrap().unwrap();
    assert_eq!(cancelled.done.stop_reason, phi3d_proto::v1::StopReason::Cancelled as i32);
    all_idle(&daemon).await;
    // A request refused before it reaches the engine (longer than the context) takes no
    // slot, and the next ones run.
    let mut too_long = complete_request(&"word ".repeat(20000), exactly(4));
    too_long.request_id = "too-long".into();
    let status_code = client.complete(too_long).await.expect_err("longer than the context").code();
    assert_eq!(status_code, tonic::Code::InvalidArgument);
    let both = futures::future::join(
        collect(client.clone().complete(complete_request("a", exactly(4))).await.unwrap().into_inner()),
        collect(client.clone().complete(complete_request("b", exactly(4))).await.unwrap().into_inner()),
    )
    .await;
    assert_eq!(both.0.unwrap().done.usage.unwrap().completion_tokens, 4);
    assert_eq!(both.1.unwrap().done.usage.unwrap().completion_tokens, 4);
    all_idle(&daemon).await;
}

#[tokio::test]
async fn a_quantized_kv_cache_serves() {
    // Quantized KV blocks hold 32 values: the model's heads must be a multiple of that wide.
    let spec = ModelSpec { name: "phi3-test-tiny-head32".into(), n_head: 2, n_head_kv: 2, ..ModelSpec::tiny() };
    let model = ensure_model(Path::new(env!("CARGO_TARGET_TMPDIR")), &spec).unwrap();
    let daemon = DaemonBuilder::new(PHI3D, model).arg("--kv-type").arg("q8_0").start().await;
    let mut client = daemon.inference().await;
    let reply = collect(client.complete(complete_request("Hello", exactly(8))).await.unwrap().into_inner());
    assert_eq!(reply.await.unwrap().done.usage.unwrap().completion_tokens, 8);
    let status = status(&daemon).await;
    let plan = status.memory_plan.expect("the memory plan is reported");
    assert_eq!(plan.kv_type, "q8_0");
    assert!(plan.kv_cache_bytes > 0 && plan.total_bytes >= plan.weights_bytes + plan.kv_cache_bytes);
    assert!(plan.budget_bytes > plan.total_bytes);
    assert!(status.cpu_features.contains("SSE") || status.cpu_features.contains("NEON"), "{}", status.cpu_features);
}

#[tokio::test]
async fn a_quantized_kv_cache_the_model_cannot_hold_is_refused_with_the_fix() {
    let model = crate::common::tiny_model();
    let output = phi3d_tests::harness::run(
        Path::new(PHI3D),
        &["serve", "--config", "/dev/null", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--kv-type", "q4_0"],
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.contains("kv_type q4_0") && error.contains("16 wide") && error.contains("use kv_type f16"), "{stderr}");
}
