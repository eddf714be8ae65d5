//! The daemon's life: health before and after the model is warm, GetStatus, shutdown.

use std::time::Duration;

use phi3d_proto::v1::GetStatusRequest;
use phi3d_tests::harness::tonic_health_client::ServingStatus;

use crate::common::{chat_request, collect, exactly, tiny_daemon};

#[tokio::test]
async fn health_turns_serving_only_when_the_model_is_warm() {
    let daemon = tiny_daemon().spawn().await;
    let mut client = daemon.inference().await;
    let mut admin = daemon.admin().await;
    // From the first moment the port answers: while health says NOT_SERVING, inference is
    // UNAVAILABLE with the load progress; once SERVING it never goes back.
    let mut saw_serving = false;
    for _ in 0..2000 {
        let health = daemon.health_status().await;
        let status = admin.get_status(GetStatusRequest {}).await.unwrap().into_inner();
        match health {
            ServingStatus::NotServing => {
                assert!(!saw_serving, "health went back to NOT_SERVING");
                if !status.model.unwrap().loaded {
                    let refused = client.chat(chat_request("hi", exactly(2))).await;
                    if let Err(refused) = refused {
                        assert_eq!(refused.code(), tonic::Code::Unavailable);
                        assert!(refused.message().contains("model loading"), "{}", refused.message());
                    }
                }
            }
            ServingStatus::Serving => {
                saw_serving = true;
                assert!(status.model.unwrap().loaded, "SERVING before the model is loaded");
                assert_eq!(status.load_progress_percent, 100);
                break;
            }
            other => panic!("unexpected health {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(saw_serving, "never SERVING:\n{}", daemon.stderr());
    let reply = collect(client.chat(chat_request("hi", exactly(3))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn get_status_describes_the_model() {
    let daemon = tiny_daemon().arg("--ctx-size").arg("2048").start().await;
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let model = status.model.unwrap();
    assert!(model.loaded);
    assert!(model.name.contains("phi3"), "{model:?}");
    assert_eq!(model.architecture, "phi3");
    assert_eq!(model.context_length, 2048);
    assert!(model.parameters > 0 && model.size_bytes > 0);
    assert!(model.path.ends_with(".gguf"));
    assert!(model.chat_template.contains("<|assistant|>"));
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!((status.active_requests, status.queue_depth), (0, 0));
    assert!(status.kv_cache_bytes > 0);
}

#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly() {
    let mut daemon = tiny_daemon().start().await;
    let status = daemon.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status}:\n{}", daemon.stderr());
}

#[tokio::test]
async fn a_model_that_cannot_load_stops_the_daemon_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not really a model").unwrap();
    let output = phi3d_tests::harness::run(
        std::path::Path::new(crate::common::PHI3D),
        &["serve", "--config", "/dev/null", "--model", broken.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot load model"), "{stderr}");
}

#[tokio::test]
async fn a_context_too_big_for_memory_is_refused_with_the_numbers() {
    let model = crate::common::tiny_model();
    let output = phi3d_tests::harness::run(
        std::path::Path::new(crate::common::PHI3D),
        &[
            "serve", "--config", "/dev/null", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0",
            "--ctx-size", "4000000000",
        ],
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.starts_with("error: ctx_size 4000000000 with kv_type f16 needs"), "{stderr}");
    assert!(error.contains("KV cache") && error.contains("of memory is available"), "{error}");
    // The configuration it suggests really starts.
    let fits = error.split("this fits: ").nth(1).unwrap_or_else(|| panic!("no suggestion: {error}"));
    let flags: Vec<&str> = fits.split(" (").next().unwrap().split_whitespace().collect();
    assert_eq!((flags[0], flags[2]), ("--ctx-size", "--kv-type"), "{error}");
    let suggested: u64 = flags[1].parse().unwrap();
    assert!(suggested < 4_000_000_000 && suggested >= 256, "{error}");
}

#[tokio::test]
async fn a_dead_worker_turns_health_not_serving_and_stops_the_daemon() {
    let mut daemon = crate::common::tiny_daemon().env("PHI3D_FAULT_INJECTION", "worker-panic").start().await;
    let mut client = daemon.inference().await;
    let mut request = crate::common::complete_request("Hello", crate::common::exactly(4));
    request.request_id = "fault:worker-panic".into();
    // The request that kills the worker hears about it instead of waiting forever.
    let outcome = match client.complete(request).await {
        Ok(stream) => crate::common::collect(stream.into_inner()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    let status = outcome.expect_err("the worker died");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon.is_running() {
        assert!(std::time::Instant::now() < deadline, "phi3d kept running:\n{}", daemon.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let exit = daemon.terminate(std::time::Duration::from_secs(1)).await;
    assert!(!exit.success(), "a dead worker is a failure for the supervisor: {exit:?}");
    assert!(daemon.stderr().contains("the inference thread panicked"), "{}", daemon.stderr());
}
