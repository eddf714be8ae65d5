//! SIGHUP: live keys take effect without dropping the model or a request in flight, keys that
//! need a restart keep their running value, and a bad config is refused whole.

use std::time::Duration;

use phi3d_proto::v1::StopReason;
use phi3d_tests::notify_socket::NotifySocket;

use crate::common::{collect, complete_request, exactly, in_background, tiny_daemon};

/// The length of a reply that leaves max_tokens to the server.
async fn reply_tokens(daemon: &phi3d_tests::harness::Daemon) -> u32 {
    let mut client = daemon.inference().await;
    let stream = client.complete(complete_request("Hi", exactly(0))).await.unwrap().into_inner();
    collect(stream).await.unwrap().done.usage.unwrap().completion_tokens
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let socket = NotifySocket::bind();
    let daemon = tiny_daemon()
        .arg("--ctx-size")
        .arg("8192")
        .config("max_tokens = 3\n")
        .env("NOTIFY_SOCKET", socket.path().to_str().unwrap())
        .start()
        .await;
    assert_eq!(reply_tokens(&daemon).await, 3);
    socket.wait_for("READY=1", 1, Duration::from_secs(5)).await;

    // A long request in flight across both reloads.
    let mut client = daemon.inference().await;
    let long = client.complete(complete_request("Go on:", exactly(3000))).await.unwrap().into_inner();
    let long = in_background(long);

    // Good: a live key changes (max_tokens 0 means the server's default), a restart key is
    // named and keeps its running value.
    std::fs::write(&daemon.config_path, "max_tokens = 5\nslots = 1\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", 1, Duration::from_secs(10)).await;
    assert_eq!(reply_tokens(&daemon).await, 5, "{}", daemon.stderr());
    assert!(daemon.stderr().contains("slots changed but needs a restart"), "{}", daemon.stderr());
    let reloading = socket.wait_for("RELOADING=1", 1, Duration::from_secs(5)).await;
    assert!(reloading.lines().any(|line| line.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    socket.wait_for("READY=1", 2, Duration::from_secs(5)).await;

    // Bad: refused with the key named; the running configuration stays.
    std::fs::write(&daemon.config_path, "max_tokens = \"lots\"\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("reload refused", 1, Duration::from_secs(10)).await;
    let stderr = daemon.stderr();
    let refusal = stderr.lines().find(|line| line.contains("reload refused")).unwrap();
    assert!(refusal.contains("max_tokens"), "{refusal}");
    assert_eq!(reply_tokens(&daemon).await, 5);
    // Parses, but does not validate: refused too, naming the key.
    std::fs::write(&daemon.config_path, "max_tokens = 5\nmax_tool_steps = 0\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("reload refused", 2, Duration::from_secs(10)).await;
    assert!(daemon.stderr().contains("max_tool_steps: 0 is too small"), "{}", daemon.stderr());
    assert_eq!(reply_tokens(&daemon).await, 5);

    let long = long.await.unwrap().expect("the request in flight survives reloads");
    assert_eq!(long.done.stop_reason, StopReason::MaxTokens as i32);
    assert_eq!(long.done.usage.unwrap().completion_tokens, 3000);
}
