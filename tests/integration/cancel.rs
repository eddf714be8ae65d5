//! Cancellation (by Cancel, by a dropped stream, by deadline, during the prompt) and the
//! bounded queue: the engine is free for the next request at once.

use std::time::{Duration, Instant};

use phi3d_proto::v1::{CancelRequest, ChatEvent, CompleteRequest, GetStatusRequest, StopReason, chat_event};
use phi3d_tests::harness::Daemon;
use tonic::codec::Streaming;

use crate::common::{collect, complete_request, exactly, tiny_daemon};

/// A context long enough that a full-length reply takes many seconds with the tiny model.
async fn roomy_daemon(extra: &[&str]) -> Daemon {
    let mut builder = tiny_daemon().arg("--ctx-size").arg("16384");
    for arg in extra {
        builder = builder.arg(*arg);
    }
    builder.start().await
}

fn endless(request_id: &str) -> CompleteRequest {
    CompleteRequest { request_id: request_id.into(), prompt: "Go on forever:".into(), options: Some(exactly(16000)) }
}

/// Reads until the first delta, so the request is surely running.
async fn first_delta(stream: &mut Streaming<ChatEvent>) {
    loop {
        let event = stream.message().await.unwrap().expect("stream ended early");
        if matches!(event.event, Some(chat_event::Event::Delta(_))) {
            return;
        }
    }
}

/// The daemon is idle again, and a new request runs without waiting.
async fn served_at_once(daemon: &Daemon) {
    let mut admin = daemon.admin().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = admin.get_status(GetStatusRequest {}).await.unwrap().into_inner();
        if status.active_requests == 0 && status.queue_depth == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled request still holds the engine: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = daemon.inference().await;
    let reply = collect(client.complete(complete_request("next", exactly(4))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 4);
    let queued = reply.done.timings.unwrap().queued_ms;
    assert!(queued < 1000.0, "the next request waited {queued} ms");
}

#[tokio::test]
async fn cancel_rpc_stops_a_running_request() {
    let daemon = roomy_daemon(&[]).await;
    let mut client = daemon.inference().await;
    let mut stream = client.complete(endless("long-1")).await.unwrap().into_inner();
    first_delta(&mut stream).await;
    let asked = Instant::now();
    let found = client.cancel(CancelRequest { request_id: "long-1".into() }).await.unwrap().into_inner().found;
    assert!(found);
    let mut done = None;
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(chat_event::Event::Done(end)) = event.event {
            done = Some(end);
        }
    }
    let done = done.expect("a cancelled stream still ends with done");
    assert_eq!(done.stop_reason, StopReason::Cancelled as i32);
    assert!(done.usage.unwrap().completion_tokens < 16000);
    assert!(asked.elapsed() < Duration::from_secs(2), "cancel took {:?}", asked.elapsed());
    let again = client.cancel(CancelRequest { request_id: "long-1".into() }).await.unwrap().into_inner();
    assert!(!again.found, "a finished request is forgotten");
    served_at_once(&daemon).await;
}

#[tokio::test]
async fn dropping_the_stream_cancels() {
    let daemon = roomy_daemon(&[]).await;
    let mut client = daemon.inference().await;
    let mut stream = client.complete(endless("dropped")).await.unwrap().into_inner();
    first_delta(&mut stream).await;
    drop(stream);
    served_at_once(&daemon).await;
}

#[tokio::test]
async fn a_deadline_cancels() {
    let daemon = roomy_daemon(&[]).await;
    let mut client = daemon.inference().await;
    let mut request = tonic::Request::new(endless("deadline"));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let result = match client.complete(request).await {
        Ok(response) => collect(response.into_inner()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    let status = result.expect_err("a 16000-token reply cannot finish in 300 ms");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    served_at_once(&daemon).await;
}

#[tokio::test]
async fn cancel_reaches_a_request_still_reading_its_prompt() {
    // One token per decode step: a ~10000-token prompt takes thousands of steps.
    let daemon = roomy_daemon(&["--batch-size", "1"]).await;
    let mut client = daemon.inference().await;
    let prompt = "lorem ipsum dolor sit amet ".repeat(600);
    let request = CompleteRequest { request_id: "prompt".into(), prompt, options: Some(exactly(10)) };
    let mut stream = client.complete(request).await.unwrap().into_inner();
    let started = stream.message().await.unwrap().unwrap();
    assert!(matches!(started.event, Some(chat_event::Event::Started(_))));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    assert!(client.cancel(CancelRequest { request_id: "prompt".into() }).await.unwrap().into_inner().found);
    let rest = stream.message().await.unwrap().unwrap();
    let Some(chat_event::Event::Done(done)) = rest.event else { panic!("expected done, got {rest:?}") };
    assert_eq!(done.stop_reason, StopReason::Cancelled as i32);
    assert_eq!(done.usage.unwrap().completion_tokens, 0, "cancelled before the prompt was read");
    assert!(asked.elapsed() < Duration::from_secs(2), "cancel took {:?}", asked.elapsed());
    served_at_once(&daemon).await;
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted() {
    let daemon = roomy_daemon(&["--queue-size", "1", "--slots", "1"]).await;
    let mut client = daemon.inference().await;
    let mut running = client.complete(endless("running")).await.unwrap().into_inner();
    first_delta(&mut running).await;
    // The worker is busy: the next request waits in the queue, the one after is refused.
    let _waiting = client.complete(endless("waiting")).await.unwrap().into_inner();
    let status = client.complete(endless("refused")).await.expect_err("the queue holds one request");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queue"), "{}", status.message());
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.active_requests, status.queue_depth), (1, 1));
    // Nothing was lost: both admitted requests are still alive and cancellable.
    for id in ["running", "waiting"] {
        assert!(client.cancel(CancelRequest { request_id: id.into() }).await.unwrap().into_inner().found, "{id}");
    }
    drop(running);
    served_at_once(&daemon).await;
}

#[tokio::test]
async fn duplicate_request_ids_are_refused() {
    let daemon = roomy_daemon(&[]).await;
    let mut client = daemon.inference().await;
    let mut running = client.complete(endless("twin")).await.unwrap().into_inner();
    first_delta(&mut running).await;
    let status = client.complete(endless("twin")).await.expect_err("the id is in flight");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
}
