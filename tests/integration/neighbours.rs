//! Beside a busy neighbour process: a long reply completes, the thread count phi3d chooses
//! stays between 1 and its maximum, and a count fixed by `threads` is never changed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use phi3d_proto::v1::{GetStatusRequest, GetStatusResponse, InferenceThreads};
use phi3d_tests::harness::Daemon;

use crate::common::{collect, complete_request, exactly, tiny_daemon};

/// A shell computing without pause: one core taken, as a busy Home Assistant or speech
/// recognizer takes it. Killed when dropped.
struct BusyNeighbour(Child);

impl BusyNeighbour {
    fn start() -> BusyNeighbour {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start a busy shell");
        BusyNeighbour(child)
    }
}

impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn status(daemon: &Daemon) -> GetStatusResponse {
    daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner()
}

/// A reply of exactly `tokens` tokens, which must end within `deadline`.
async fn reply(daemon: &Daemon, tokens: u32, deadline: Duration) {
    let mut inference = daemon.inference().await;
    let request = complete_request("Once upon a time", exactly(tokens));
    let finished = tokio::time::timeout(deadline, async {
        collect(inference.complete(request).await.unwrap().into_inner()).await.unwrap()
    })
    .await
    .unwrap_or_else(|_| panic!("a {tokens}-token reply beside a busy neighbour did not end within {deadline:?}"));
    assert_eq!(finished.done.usage.unwrap().completion_tokens, tokens);
}

#[tokio::test]
async fn a_long_reply_beside_a_busy_neighbour_completes_with_the_threads_in_bounds() {
    let daemon = tiny_daemon().threads(None).start().await;
    let before = status(&daemon).await.threads.expect("GetStatus names the threads");
    assert!(before.adaptive, "{before:?}");
    assert!(before.max >= 1 && before.single == before.max && before.batch == before.max, "it starts at the maximum: {before:?}");

    let neighbour = BusyNeighbour::start();
    reply(&daemon, 1000, Duration::from_secs(120)).await;
    let beside = status(&daemon).await;
    let threads = beside.threads.unwrap();
    let in_bounds = |threads: &InferenceThreads| (1..=threads.max).contains(&threads.single) && (1..=threads.max).contains(&threads.batch);
    assert!(in_bounds(&threads) && threads.max == before.max, "{threads:?}");
    assert!(beside.recent_decode_tokens_per_second > 0.0, "{beside:?}");
    drop(neighbour);

    reply(&daemon, 300, Duration::from_secs(60)).await;
    let after = status(&daemon).await.threads.unwrap();
    assert!(in_bounds(&after), "{after:?}");
    // The daemon says what it chose.
    assert!(daemon.stderr().contains("inference threads: 1 to"), "{}", daemon.stderr());
}

#[tokio::test]
async fn a_thread_count_fixed_by_threads_is_never_changed() {
    let daemon = tiny_daemon().threads(Some(2)).start().await;
    let _neighbour = BusyNeighbour::start();
    // Short: with two threads beside a busy core, the tiny model is many times slower than alone.
    reply(&daemon, 100, Duration::from_secs(120)).await;
    let threads = status(&daemon).await.threads.unwrap();
    assert_eq!((threads.single, threads.batch, threads.max, threads.adaptive), (2, 2, 2, false), "{threads:?}");
}
