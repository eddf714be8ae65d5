//! systemd's notification protocol, with a datagram socket of the test's own as NOTIFY_SOCKET:
//! loading progress, READY=1 only once warm, status lines, watchdog pings that stop when the
//! inference thread wedges, STOPPING=1.

use std::time::Duration;

use phi3d_tests::harness::tonic_health_client::ServingStatus;
use phi3d_tests::notify_socket::NotifySocket;

use crate::common::{collect, complete_request, exactly, tiny_daemon};

#[tokio::test]
async fn ready_only_once_warm_then_status_lines_then_stopping() {
    let socket = NotifySocket::bind();
    let mut daemon = tiny_daemon().env("NOTIFY_SOCKET", socket.path().to_str().unwrap()).spawn().await;
    socket.wait_for("READY=1", 1, Duration::from_secs(60)).await;
    // At READY=1 the model is warm: health says so, and a request is served at once.
    assert_eq!(daemon.health_status().await, ServingStatus::Serving, "READY=1 before SERVING:\n{}", daemon.stderr());
    let messages = socket.messages();
    let ready_at = messages.iter().position(|message| message.lines().any(|line| line == "READY=1")).unwrap();
    assert!(
        messages[..ready_at].iter().any(|message| message.contains("STATUS=loading model")),
        "no loading status before READY=1: {messages:?}"
    );
    assert!(messages[ready_at].contains("STATUS=warm: "), "{messages:?}");
    let mut client = daemon.inference().await;
    let reply = collect(client.complete(complete_request("Hi", exactly(3))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 3);
    assert_eq!(socket.count("READY=1"), 1, "READY=1 is sent once: {:?}", socket.messages());

    let exit = daemon.terminate(Duration::from_secs(20)).await;
    assert!(exit.success(), "exit {exit}:\n{}", daemon.stderr());
    socket.wait_for("STOPPING=1", 1, Duration::from_secs(1)).await;
    let messages = socket.messages();
    let stopping_at = messages.iter().position(|message| message.lines().any(|line| line == "STOPPING=1")).unwrap();
    assert!(
        messages[stopping_at + 1..].iter().all(|message| !message.contains("STATUS=")),
        "a status line hid STOPPING: {messages:?}"
    );
}

#[tokio::test]
async fn watchdog_pings_while_idle_and_stops_when_the_inference_thread_wedges() {
    let socket = NotifySocket::bind();
    // systemd's WatchdogSec=400ms: a ping every 200 ms.
    let daemon = tiny_daemon()
        .env("NOTIFY_SOCKET", socket.path().to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .env("PHI3D_FAULT_INJECTION", "worker-wedge")
        .start()
        .await;
    socket.wait_for("READY=1", 1, Duration::from_secs(10)).await;
    let before = socket.count("WATCHDOG=1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let idle_pings = socket.count("WATCHDOG=1") - before;
    assert!(idle_pings >= 3, "an idle engine is alive: {idle_pings} pings in 1 s");

    let mut request = complete_request("Hello", exactly(4));
    request.request_id = "fault:worker-wedge".into();
    let mut client = daemon.inference().await;
    let _wedged = tokio::spawn(async move { client.complete(request).await.map(|stream| stream.into_inner()) });
    daemon.wait_for_log("watchdog pings withheld", 1, Duration::from_secs(5)).await;
    let withheld_from = socket.count("WATCHDOG=1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(socket.count("WATCHDOG=1"), withheld_from, "a wedged engine got pinged:\n{}", daemon.stderr());
}

#[tokio::test]
async fn a_watchdog_meant_for_another_process_is_left_alone() {
    let socket = NotifySocket::bind();
    let _daemon = tiny_daemon()
        .env("NOTIFY_SOCKET", socket.path().to_str().unwrap())
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1")
        .start()
        .await;
    socket.wait_for("READY=1", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(socket.count("WATCHDOG=1"), 0, "{:?}", socket.messages());
}
