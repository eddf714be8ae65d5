//! Where the CPU-heavy part of a request runs: checking and compiling its JSON schemas and
//! grammars, rendering and tokenizing its prompt. Never on the async runtime's workers (phi3d
//! runs one, so a 20-second schema would stall every listing and health check), but on a
//! thread of its own with a large stack (llama.cpp's converters recurse), a few at a time,
//! within a time budget (`compile_timeout_ms`). A panic in the work ends that request only.
//!
//! A thread per job rather than `spawn_blocking`: tokio's blocking pool has a fixed, small
//! stack size for every thread, and the budget needs a job that can be left behind.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

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
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("preparing the request took longer than {0:?} (compile_timeout_ms); simplify its schemas or shorten its prompt")]
    TimedOut(Duration),
    #[error("phi3d is busy preparing other requests; retry shortly")]
    Busy,
    #[error("preparing the request failed inside phi3d: {0}")]
    Panicked(String),
}

impl Offload {
    /// `jobs` run at once at most; each gets `budget`.
    pub fn new(jobs: usize, budget: Duration) -> Offload {
        Offload { budget, permits: Arc::new(Semaphore::new(jobs.max(1))) }
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
        let permit = tokio::time::timeout(self.budget, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| OffloadError::Busy)?
            .map_err(|_| OffloadError::Busy)?;
        let (sender, receiver) = oneshot::channel();
        std::thread::Builder::new()
            .name("phi3d-prepare".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(job)).map(|value| (value, held));
                drop(permit);
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
}
