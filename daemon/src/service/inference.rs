//! The `phi3d.v1.Inference` service: validate a request, turn it into a task, and stream the
//! engine's events back as `ChatEvent`s. No llama.cpp calls happen here beyond the model's
//! read-only tokenizer and chat template.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures::{Stream, StreamExt};
use llama_cpp_2::model::LlamaChatMessage;
use llama_cpp_2::token::LlamaToken;
use phi3d_proto::v1::inference_server::Inference;
use phi3d_proto::v1::{
    CancelRequest, CancelResponse, ChatEvent, ChatRequest, CompleteRequest, TokenizeRequest,
    TokenizeResponse, chat_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::requests::Requests;
use super::validate::{self, Defaults};
use crate::engine::task::{Event, GenerationParams, StopReason, Task};
use crate::engine::{Engine, LoadedModel, QueueError};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, Status>> + Send>>;

pub struct InferenceService {
    engine: Engine,
    requests: Arc<Requests>,
    defaults: Defaults,
}

impl InferenceService {
    pub fn new(engine: Engine, requests: Arc<Requests>, defaults: Defaults) -> Self {
        InferenceService { engine, requests, defaults }
    }

    /// Queues a tokenized prompt and returns the stream of its events.
    fn generate(
        &self,
        model: &LoadedModel,
        request_id: &str,
        prompt: Vec<LlamaToken>,
        params: GenerationParams,
        deadline: Option<std::time::Duration>,
    ) -> Result<EventStream, Status> {
        validate::fits_context(prompt.len(), model.info.context_length)?;
        let registration = self.requests.register(request_id).ok_or_else(|| {
            Status::already_exists(format!(
                "request_id `{request_id}` is already in flight; use a unique id per request"
            ))
        })?;
        let deadline_passed = Arc::new(AtomicBool::new(false));
        if let Some(deadline) = deadline {
            let cancel = registration.cancel.clone();
            let passed = deadline_passed.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(deadline) => {
                        passed.store(true, Ordering::SeqCst);
                        cancel.cancel();
                    }
                    () = cancel.cancelled() => {}
                }
            });
        }
        let (events, receiver) = mpsc::unbounded_channel();
        let task = Task {
            request_id: registration.request_id.clone(),
            prompt,
            params,
            events,
            cancel: registration.cancel.clone(),
            enqueued_at: Instant::now(),
        };
        self.engine.submit(task).map_err(|err| match err {
            QueueError::Full { .. } => Status::resource_exhausted(err.to_string()),
            QueueError::Closed => Status::unavailable(err.to_string()),
        })?;
        let started = ChatEvent {
            event: Some(chat_event::Event::Started(phi3d_proto::v1::Started {
                request_id: registration.request_id.clone(),
                model: model.info.name.clone(),
            })),
        };
        let events = UnboundedReceiverStream::new(receiver).map(move |event| {
            // The registration lives exactly as long as the stream.
            let _registration = &registration;
            match event {
                Event::Done(done) if done.stop_reason == StopReason::Cancelled && deadline_passed.load(Ordering::SeqCst) => {
                    Err(Status::deadline_exceeded(format!(
                        "the request's deadline passed after {} generated tokens",
                        done.completion_tokens
                    )))
                }
                event => convert::chat_event(event),
            }
        });
        Ok(Box::pin(futures::stream::once(async { Ok(started) }).chain(events)))
    }
}

/// The warm model, or UNAVAILABLE saying how far loading got.
pub fn ready_model(engine: &Engine) -> Result<Arc<LoadedModel>, Status> {
    match engine.state() {
        crate::engine::LoadState::Ready(model) => Ok(model),
        crate::engine::LoadState::Loading { percent } => {
            Err(Status::unavailable(format!("model loading, {percent}%; retry when health reports SERVING")))
        }
        crate::engine::LoadState::Failed(reason) => Err(Status::unavailable(format!("model failed to load: {reason}"))),
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type ChatStream = EventStream;
    type CompleteStream = EventStream;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = validate::grpc_timeout(request.metadata());
        let request = request.into_inner();
        let model = ready_model(&self.engine)?;
        let messages = validate::chat_messages(&request.messages)?;
        let params = validate::generation_params(request.options.as_ref(), self.defaults)?;
        let template = model.chat_template.as_ref().ok_or_else(|| {
            Status::failed_precondition("the model has no chat template; use Complete with a raw prompt")
        })?;
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new((*role).to_owned(), (*content).to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| Status::invalid_argument(format!("messages: {err}")))?;
        let prompt = model
            .model
            .apply_chat_template(template, &chat, true)
            .map_err(|err| Status::invalid_argument(format!("the model's chat template cannot render these messages: {err}")))?;
        let tokens = model.model.vocab().tokenize(prompt.as_bytes(), true, true);
        let stream = self.generate(&model, &request.request_id, tokens, params, deadline)?;
        Ok(Response::new(stream))
    }

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<Self::CompleteStream>, Status> {
        let deadline = validate::grpc_timeout(request.metadata());
        let request = request.into_inner();
        let model = ready_model(&self.engine)?;
        let prompt = validate::prompt(&request.prompt)?;
        let params = validate::generation_params(request.options.as_ref(), self.defaults)?;
        let tokens = model.model.vocab().tokenize(prompt.as_bytes(), true, true);
        let stream = self.generate(&model, &request.request_id, tokens, params, deadline)?;
        Ok(Response::new(stream))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let request = request.into_inner();
        let model = ready_model(&self.engine)?;
        let vocab = model.model.vocab();
        let tokens = vocab.tokenize(request.text.as_bytes(), request.add_special, request.parse_special);
        let pieces = tokens
            .iter()
            .map(|token| String::from_utf8_lossy(&vocab.token_to_piece(*token, true, None)).into_owned())
            .collect();
        let tokens = tokens.iter().map(|token| token.0 as u32).collect();
        Ok(Response::new(TokenizeResponse { tokens, pieces }))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let request_id = request.into_inner().request_id;
        if request_id.is_empty() {
            return Err(Status::invalid_argument("request_id must not be empty"));
        }
        let found = self.requests.cancel(&request_id);
        tracing::debug!(%request_id, found, "cancel");
        Ok(Response::new(CancelResponse { found }))
    }
}
