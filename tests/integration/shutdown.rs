//! SIGTERM: new requests are refused at once, requests in flight finish within
//! shutdown_grace_seconds or end CANCELLED, and the daemon exits 0.

use std::time::{Duration, Instant};

use phi3d_proto::v1::{ChatEvent, Done, StopReason, chat_event};
use tonic::codec::Streaming;

use crate::common::{complete_request, exactly, tiny_daemon};

/// Reads until the first delta, so the request is surely running.
async fn first_delta(stream: &mut Streaming<ChatEvent>) {
    loop {
        let event = stream.message().await.unwrap().expect("stream ended early");
        if matches!(event.event, Some(chat_event::Event::Delta(_))) {
            return;
        }
    }
}

/// Reads the rest of a stream; its `done`, which must come last.
async fn read_to_done(mut stream: Streaming<ChatEvent>) -> Done {
    let mut done = None;
    while let Some(event) = stream.message().await.expect("the stream ends with done, not an error") {
        assert!(done.is_none(), "an event after done: {event:?}");
        if let Some(chat_event::Event::Done(end)) = event.event {
            done = Some(end);
        }
    }
    done.expect("the stream ended without done")
}

#[tokio::test]
async fn requests_in_flight_finish_within_the_grace_period() {
    let mut daemon = tiny_daemon().arg("--shutdown-grace-seconds").arg("30").start().await;
    let mut client = daemon.inference().await;
    let mut stream = client.complete(complete_request("Count:", exactly(400))).await.unwrap().into_inner();
    first_delta(&mut stream).await;
    daemon.signal("TERM");
    daemon.wait_for_log("letting the requests in flight finish", 1, Duration::from_secs(5)).await;
    // Stopping: a new request is refused at once, saying why.
    let refused = client.complete(complete_request("late", exactly(2))).await.expect_err("refused while stopping");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{}", refused.message());
    // The one in flight runs to its end.
    let done = read_to_done(stream).await;
    assert_eq!(done.stop_reason, StopReason::MaxTokens as i32);
    drop(client);
    let exit = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "exit {exit}:\n{}", daemon.stderr());
    assert!(daemon.stderr().contains("prompt cache saved"), "{}", daemon.stderr());
}

#[tokio::test]
async fn requests_still_running_after_the_grace_period_end_cancelled() {
    let mut daemon = tiny_daemon()
        .arg("--ctx-size")
        .arg("16384")
        .arg("--shutdown-grace-seconds")
        .arg("1")
        .start()
        .await;
    let mut client = daemon.inference().await;
    let mut stream = client.complete(complete_request("Go on forever:", exactly(16000))).await.unwrap().into_inner();
    first_delta(&mut stream).await;
    let asked = Instant::now();
    daemon.signal("TERM");
    let done = read_to_done(stream).await;
    assert_eq!(done.stop_reason, StopReason::Cancelled as i32);
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(900), "cancelled before the grace period passed: {waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    drop(client);
    let exit = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "exit {exit}:\n{}", daemon.stderr());
}
