//! Where the CPU-heavy part of a request runs: checking and compiling its JSON schemas and
//! grammars, rendering and tokenizing its prompt. Never on the async runtime's workers (phi3d
//! runs one, so a 20-second schema would stall every listing and health check), but on a
//! thread of its own with a large stack (llama.cpp's converters recurse), a few at a time,
//! within a time budget (`compile_timeout_ms`). A panic in the work ends that request only.
//! One client holds at most half of the jobs at once, so that a client whose work runs long
//! (llama.cpp's tokenizer cannot be interrupted) leaves room for every other client.
//!
//! A thread per job rather than `spawn_blocking`: tokio's blocking pool has a fixed, small
//! stack size for every thread, and the budget needs a job that can be left behind.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;

use crate::auth::Client;

/// The stack of an offloaded job. Reserved address space, touched only as deep as the work
/// goes; the schema limits keep real work far below it.
const STACK_BYTES: usize = 64 * 1024 * 1024;

/// Runs request preparation off the runtime.
#[derive(Clone)]
pub struct Offload {
    budget: Duration,
    /// One permit per job running; a job past its budget keeps its permit until it ends, so
    /// runaway work cannot pile up threads.
    permits: Arc<Semaphore>,
    shares: Arc<Shares>,
    /// Whose work this handle runs ([`Offload::for_client`]); `None`: daemon work, bounded by
    /// the global permits only.
    client: Option<Client>,
}

/// Each client's share of the jobs: a semaphore per client with work running or waiting.
struct Shares {
    per_client: usize,
    by_client: Mutex<HashMap<Client, Arc<Semaphore>>>,
}

/// A client's share held by one job; the client's entry goes when nothing holds or awaits it.
struct Share {
    permit: Option<OwnedSemaphorePermit>,
    semaphore: Arc<Semaphore>,
    shares: Arc<Shares>,
    client: Client,
}

impl Shares {
    async fn acquire(self: &Arc<Self>, client: &Client, deadline: Instant) -> Result<Share, OffloadError> {
        let semaphore = {
            let mut by_client = self.by_client.lock().expect("offload shares lock");
            by_client.entry(client.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_client))).clone()
        };
        // Built before waiting, so that a wait that times out still tidies the entry up.
        let mut share = Share { permit: None, semaphore, shares: self.clone(), client: client.clone() };
        let acquired = tokio::time::timeout_at(deadline, share.semaphore.clone().acquire_owned()).await;
        share.permit = Some(acquired.map_err(|_| OffloadError::ClientBusy)?.map_err(|_| OffloadError::ClientBusy)?);
        Ok(share)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut by_client = self.shares.by_client.lock().expect("offload shares lock");
        // Clones are taken under this lock: two references (the map's and this one) mean
        // nobody else holds or awaits this client's share.
        if Arc::strong_count(&self.semaphore) == 2 {
            by_client.remove(&self.client);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("preparing the request took longer than {0:?} (compile_timeout_ms); simplify its schemas or shorten its prompt")]
    TimedOut(Duration),
    #[error("phi3d is busy preparing other requests; retry shortly")]
    Busy,
    #[error("this client's earlier requests are still being prepared (compile_timeout_ms); retry when they have ended")]
    ClientBusy,
    #[error("preparing the request failed inside phi3d: {0}")]
    Panicked(String),
}

impl Offload {
    /// `jobs` run at once at most, half of them (at least one) for one client; each gets
    /// `budget`.
    pub fn new(jobs: usize, budget: Duration) -> Offload {
        let jobs = jobs.max(1);
        Offload {
            budget,
            permits: Arc::new(Semaphore::new(jobs)),
            shares: Arc::new(Shares { per_client: (jobs / 2).max(1), by_client: Mutex::default() }),
            client: None,
        }
    }

    /// This offload, for `client`'s work: counted against its share.
    pub fn for_client(&self, client: &Client) -> Offload {
        Offload { client: Some(client.clone()), ..self.clone() }
    }

    /// Runs `job` on its own thread and waits for it without blocking the runtime: its
    /// result, or why there is none.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, OffloadError> {
        self.run_holding((), job).await.map(|(value, ())| value)
    }

    /// [`Offload::run`], with `held` kept by the job's thread until the job ends and handed
    /// back with its result. A job left behind past its budget keeps what it holds: a
    /// request's registration, so that the work still counts against its client.
    pub async fn run_holding<T: Send + 'static, H: Send + 'static>(
        &self,
        held: H,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<(T, H), OffloadError> {
        // Waiting for a share or a permit counts against the same budget.
        let deadline = Instant::now() + self.budget;
        let share = match &self.client {
            Some(client) => Some(self.shares.acquire(client, deadline).await?),
            None => None,
        };
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| OffloadError::Busy)?
            .map_err(|_| OffloadError::Busy)?;
        let (sender, receiver) = oneshot::channel();
        std::thread::Builder::new()
            .name("phi3d-prepare".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(job)).map(|value| (value, held));
                drop((permit, share));
                let _ = sender.send(outcome);
            })
            .map_err(|err| OffloadError::Panicked(format!("cannot start a thread: {err}")))?;
        match tokio::time::timeout(self.budget, receiver).await {
            Err(_) => Err(OffloadError::TimedOut(self.budget)),
            Ok(Err(_)) => Err(OffloadError::Panicked("the job ended without an answer".into())),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(panic))) => Err(OffloadError::Panicked(panic_message(panic.as_ref()))),
        }
    }
}

/// What a panic said, when it said it with a string.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_runs_on_a_deep_stack_and_its_panic_is_an_error() {
        let offload = Offload::new(2, Duration::from_secs(10));
        // Deeper than a runtime worker's 2 MiB stack would allow.
        fn deep(levels: u32) -> u64 {
            let frame = std::hint::black_box([0u8; 1024]);
            if levels == 0 { u64::from(frame[0]) } else { 1 + deep(levels - 1) + u64::from(std::hint::black_box(frame)[1023]) }
        }
        assert_eq!(offload.run(|| deep(20_000)).await.unwrap(), 20_000);
        let panicked = offload.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(matches!(&panicked, OffloadError::Panicked(message) if message == "boom"), "{panicked:?}");
    }

    #[tokio::test]
    async fn a_job_past_its_budget_is_left_behind_and_holds_its_permit() {
        let offload = Offload::new(1, Duration::from_millis(100));
        let held = std::sync::Arc::new(());
        let slow = offload.run_holding(held.clone(), || std::thread::sleep(Duration::from_millis(600))).await.unwrap_err();
        assert!(matches!(slow, OffloadError::TimedOut(_)), "{slow:?}");
        assert_eq!(std::sync::Arc::strong_count(&held), 2, "the job still holds what it was given");
        // The slow job still runs: the next one cannot start within its budget.
        let busy = offload.run(|| ()).await.unwrap_err();
        assert!(matches!(busy, OffloadError::Busy), "{busy:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(std::sync::Arc::strong_count(&held), 1, "and lets go when it ends");
        offload.run(|| ()).await.unwrap();
    }

    #[tokio::test]
    async fn one_client_holds_half_of_the_jobs_and_others_go_past_it() {
        let offload = Offload::new(2, Duration::from_millis(300));
        let greedy = offload.for_client(&Client::Address([192, 168, 1, 9].into()));
        let other = offload.for_client(&Client::Address([192, 168, 1, 10].into()));
        let long = tokio::spawn({
            let greedy = greedy.clone();
            async move { greedy.run(|| std::thread::sleep(Duration::from_millis(1000))).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The same client's next job waits for its share, within the budget, and gets none.
        let refused = greedy.run(|| ()).await.unwrap_err();
        assert!(matches!(refused, OffloadError::ClientBusy), "{refused:?}");
        // Another client still finds a job free.
        let started = Instant::now();
        other.run(|| ()).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
        assert!(matches!(long.await.unwrap(), Err(OffloadError::TimedOut(_))));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Once its job has ended, the client's entry is gone and it runs again.
        assert!(offload.shares.by_client.lock().unwrap().is_empty());
        greedy.run(|| ()).await.unwrap();
    }
}
