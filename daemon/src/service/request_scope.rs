//! One request's life on the async side: registering its id, enforcing its deadline, and
//! submitting generation steps to the engine. Shared by plain chats and tool turns (for which
//! [`ToolTurnRunner`] is the agent's [`StepRunner`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::requests::{Registration, Requests};
use super::validate;
use crate::auth::Client;
use crate::engine::task::{Completion, Event, GenerationParams, StopReason, Task};
use crate::engine::{Engine, LoadedModel, QueueError};
use crate::tools::agent::StepRunner;

/// A request in flight. Dropping it unregisters the id.
pub struct RequestScope {
    pub registration: Registration,
    deadline_passed: Arc<AtomicBool>,
    max_prompt_tokens: u32,
    /// The deadline's timer, stopped when the request ends, not when the deadline would pass.
    _timer: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

impl RequestScope {
    /// Registers the id and arms the client's deadline, if it sent one.
    pub fn begin(
        requests: &Arc<Requests>,
        request_id: &str,
        client: &Client,
        deadline: Option<Duration>,
    ) -> Result<RequestScope, Status> {
        let registration = requests.register(request_id, client)?;
        let max_prompt_tokens = requests.limits.max_prompt_tokens;
        let deadline_passed = Arc::new(AtomicBool::new(false));
        let timer = deadline.map(|deadline| {
            let cancel = registration.cancel.clone();
            let passed = deadline_passed.clone();
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(deadline) => {
                        passed.store(true, Ordering::SeqCst);
                        cancel.cancel();
                    }
                    () = cancel.cancelled() => {}
                }
            }))
        });
        Ok(RequestScope { registration, deadline_passed, max_prompt_tokens, _timer: timer })
    }

    pub fn request_id(&self) -> &str {
        &self.registration.request_id
    }

    /// Queues one generation step, its sampler already built (off the runtime, in
    /// `offload`); its events arrive on the returned channel.
    pub fn submit(
        &self,
        engine: &Engine,
        model: &LoadedModel,
        prompt: Vec<LlamaToken>,
        params: GenerationParams,
        sampler: LlamaSampler,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Status> {
        validate::fits_context(prompt.len(), model.info.context_length, self.max_prompt_tokens)?;
        let (events, receiver) = mpsc::unbounded_channel();
        let task = Task {
            request_id: self.registration.request_id.clone(),
            prompt,
            params,
            sampler,
            events,
            cancel: self.registration.cancel.clone(),
            enqueued_at: Instant::now(),
        };
        engine.submit(task).map_err(|err| match err {
            QueueError::Full { .. } => Status::resource_exhausted(err.to_string()),
            QueueError::Closed => Status::unavailable(err.to_string()),
        })?;
        Ok(receiver)
    }

    /// DEADLINE_EXCEEDED if the deadline has passed (whatever was running: a step, a plugin).
    pub fn deadline_exceeded(&self) -> Option<Status> {
        self.deadline_passed
            .load(Ordering::SeqCst)
            .then(|| Status::deadline_exceeded("the request's deadline passed during a tool call"))
    }

    /// A cancelled completion caused by the deadline is DEADLINE_EXCEEDED for the client.
    pub fn deadline_status(&self, completion: &Completion) -> Option<Status> {
        (completion.stop_reason == StopReason::Cancelled && self.deadline_passed.load(Ordering::SeqCst)).then(|| {
            Status::deadline_exceeded(format!(
                "the request's deadline passed after {} generated tokens",
                completion.completion_tokens
            ))
        })
    }
}

/// A tool turn's request: its scope, and the engine and model its steps run on.
pub struct ToolTurnRunner {
    pub scope: RequestScope,
    pub engine: Engine,
    pub model: Arc<LoadedModel>,
}

impl StepRunner for ToolTurnRunner {
    type Error = Status;

    fn submit(
        &self,
        prompt: Vec<LlamaToken>,
        params: GenerationParams,
        sampler: LlamaSampler,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Status> {
        self.scope.submit(&self.engine, &self.model, prompt, params, sampler)
    }

    fn cancelled(&self) -> &CancellationToken {
        &self.scope.registration.cancel
    }

    fn deadline_error(&self, completion: Option<&Completion>) -> Option<Status> {
        match completion {
            Some(completion) => self.scope.deadline_status(completion),
            None => self.scope.deadline_exceeded(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_deadline_timer_ends_with_the_request() {
        let requests = Arc::new(Requests::default());
        let scope = RequestScope::begin(&requests, "r", &Client::Unknown, Some(Duration::from_secs(3600))).unwrap();
        let passed = scope.deadline_passed.clone();
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&passed), 3, "the scope, the timer and this test");
        drop(scope);
        for _ in 0..100 {
            if Arc::strong_count(&passed) == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the timer outlived its request");
    }
}
