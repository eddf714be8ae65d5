//! The `phi3d.v1.Inference` service: validate a request, turn it into a task, and stream the
//! engine's events back as `ChatEvent`s. No llama.cpp calls happen here beyond the model's
//! read-only tokenizer, chat template and grammar compiler.
//!
//! A request is registered (its id, its client's stream count) before any work is done for
//! it, and the CPU-heavy part of that work (schemas, grammars, the prompt's tokens) runs in
//! [`Offload`], never on the runtime's worker.
//!
//! Chats and completions enter through [`InferenceService::run_chat`] and
//! [`InferenceService::run_complete`], with the caller and its deadline as plain values: the
//! gRPC methods read those from the tonic request, the HTTP bridges from their own, and
//! neither dresses up as the other.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use phi3d_proto::v1::inference_server::Inference;
use phi3d_proto::v1::{
    CancelRequest, CancelResponse, ChatEvent, ChatRequest, CompleteRequest, TokenizeRequest, TokenizeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::Instrument;
use tonic::{Request, Response, Status};

use super::convert;
use super::request_scope::{RequestScope, ToolTurnRunner};
use super::live::{LiveReader, LiveSettings};
use super::requests::{CancelOutcome, Requests};
use super::tool_options::{self, ToolPlan};
use super::validate::{self, Defaults};
use crate::auth::Client;
use crate::engine::sampling::build_sampler;
use crate::engine::task::{Event, GenerationParams};
use crate::engine::{Engine, LoadedModel};
use crate::offload::Offload;
use crate::plugins::PluginRegistry;
use crate::tools::{ChatMessage, ToolFormat};
use crate::tools::agent::AgentTurn;
use crate::tools::conversation::{TemplateTurn, could_fit, mark_untrusted, render, tokenize_prompt};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, Status>> + Send>>;

pub struct InferenceService {
    engine: Engine,
    requests: Arc<Requests>,
    /// Defaults and tool choice, as the last reload left them.
    live: LiveReader,
    plugins: PluginRegistry,
    offload: Offload,
}

/// A chat request made ready off the runtime: a tool turn to run, or a plain generation.
enum PreparedChat {
    ToolTurn { messages: Vec<ChatMessage>, plan: ToolPlan, params: GenerationParams },
    Plain { tokens: Vec<LlamaToken>, params: GenerationParams, sampler: LlamaSampler },
}

impl InferenceService {
    pub fn new(engine: Engine, requests: Arc<Requests>, live: LiveReader, plugins: PluginRegistry, offload: Offload) -> Self {
        InferenceService { engine, requests, live, plugins, offload }
    }

    /// The largest request body the HTTP bridges should read (`max_request_bytes`).
    pub fn max_request_bytes(&self) -> usize {
        self.requests.limits.max_request_bytes as usize
    }

    /// Whether the daemon is stopping (told to, or already refusing new requests).
    pub fn is_stopping(&self) -> bool {
        self.requests.is_stopping()
    }

    /// A chat from any transport, accounted to `client`, ended by `deadline` if it has one:
    /// the gRPC service and the HTTP bridges both come here with the request they read, and
    /// each maps only its own wire format.
    pub async fn run_chat(&self, client: &Client, request: ChatRequest, deadline: Option<Duration>) -> Result<EventStream, Status> {
        self.requests.limits.check_size(&request)?;
        let model = ready_model(&self.engine)?;
        let live = *self.live.borrow();
        // Registered first, so that the work below counts against the client's streams.
        let scope = RequestScope::begin(&self.requests, &request.request_id, client, deadline)?;
        let wants_tools = tool_options::wants_tools(request.tools.as_ref(), live.tool_choice);
        // Listing tools starts lazy plugins, so a plain chat does not ask.
        let plugin_tools = if wants_tools { self.plugins.tools().await } else { Vec::new() };
        let prepare_model = model.clone();
        // The job holds the registration: a job left behind past its budget still counts
        // against its client until it ends.
        let offload = self.offload.for_client(client);
        let (prepared, scope) =
            offload.run_holding(scope, move || prepare_chat(&prepare_model, &request, live, &plugin_tools)).await?;
        let prepared = prepared?;
        let stream = match prepared {
            PreparedChat::ToolTurn { messages, plan, params } => {
                self.tool_turn(scope, offload, model, messages, plan, params, live.defaults).await?
            }
            PreparedChat::Plain { tokens, params, sampler } => self.generate(scope, &model, tokens, params, sampler)?,
        };
        Ok(stream)
    }

    /// A raw-prompt completion from any transport (see [`InferenceService::run_chat`]).
    pub async fn run_complete(&self, client: &Client, request: CompleteRequest, deadline: Option<Duration>) -> Result<EventStream, Status> {
        self.requests.limits.check_size(&request)?;
        let model = ready_model(&self.engine)?;
        validate::prompt(&request.prompt)?;
        let defaults = self.live.borrow().defaults;
        let scope = RequestScope::begin(&self.requests, &request.request_id, client, deadline)?;
        let prepare_model = model.clone();
        let (prepared, scope) = self
            .offload
            .for_client(client)
            .run_holding(scope, move || -> Result<_, Status> {
                let params = validate::generation_params(request.options.as_ref(), defaults)?;
                could_fit(&prepare_model, request.prompt.len()).map_err(convert::prompt_status)?;
                let tokens = prepare_model.model.vocab().tokenize(request.prompt.as_bytes(), true, true);
                let sampler = sampler_for(&params, &prepare_model)?;
                Ok((tokens, params, sampler))
            })
            .await?;
        let (tokens, params, sampler) = prepared?;
        self.generate(scope, &model, tokens, params, sampler)
    }

    /// A chat turn with tools: the agent loop runs in its own task and streams every step.
    async fn tool_turn(
        &self,
        scope: RequestScope,
        offload: Offload,
        model: Arc<LoadedModel>,
        messages: Vec<ChatMessage>,
        plan: ToolPlan,
        params: GenerationParams,
        defaults: Defaults,
    ) -> Result<EventStream, Status> {
        // Every log line of the turn (steps, plugin calls) carries the request id; under
        // systemd it is a journal field (REQUEST_ID).
        let span = tracing::info_span!("request", request_id = %scope.request_id());
        let started = convert::started(scope.request_id(), &model.info.name);
        let turn = AgentTurn {
            runner: ToolTurnRunner { scope, engine: self.engine.clone(), model: model.clone() },
            format: ToolFormat::detect(&model),
            model,
            plugins: self.plugins.clone(),
            tools: plan.tools.into(),
            messages,
            max_steps: plan.max_steps,
            call_max_tokens: defaults.tool_call_max_tokens.min(defaults.max_tokens_limit),
            params,
            offload,
        };
        // The first step is queued here, so that a full queue or a prompt too long is the
        // request's status rather than an error inside the stream.
        let first = turn.submit_step(&plan.first_mode).await.map_err(convert::agent_status)?;
        let (sink, events) = mpsc::unbounded_channel();
        // A panic in the loop ends this turn with INTERNAL; the daemon and other turns go on.
        let on_panic = sink.clone();
        let run = std::panic::AssertUnwindSafe(turn.run(plan.first_mode, first, sink));
        tokio::spawn(
            async move {
                if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
                    let message = crate::offload::panic_message(panic.as_ref());
                    tracing::error!("the tool turn panicked: {message}");
                    let _ = on_panic.send(Err(crate::tools::agent::AgentError::Panicked(message)));
                }
            }
            .instrument(span),
        );
        let events = UnboundedReceiverStream::new(events).map(convert::agent_event);
        Ok(Box::pin(futures::stream::once(async { Ok(started) }).chain(events)))
    }

    /// Queues a tokenized prompt and returns the stream of its events.
    fn generate(
        &self,
        scope: RequestScope,
        model: &LoadedModel,
        prompt: Vec<LlamaToken>,
        params: GenerationParams,
        sampler: LlamaSampler,
    ) -> Result<EventStream, Status> {
        let receiver = scope.submit(&self.engine, model, prompt, params, sampler)?;
        let started = convert::started(scope.request_id(), &model.info.name);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let saw_end = ended.clone();
        let events = UnboundedReceiverStream::new(receiver).map(move |event| {
            if matches!(event, Event::Done(_) | Event::Failed(_)) {
                saw_end.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            match event {
                // The scope (and with it the request's registration) lives as long as the stream.
                Event::Done(done) => match scope.deadline_status(&done) {
                    Some(status) => Err(status),
                    None => convert::chat_event(Event::Done(done)),
                },
                event => convert::chat_event(event),
            }
        });
        // The engine dropped the task without ending it: its thread died, or it failed (an RPC
        // worker gone) and its reason says why.
        let engine = self.engine.clone();
        let lost = futures::stream::once(async move { ended.load(std::sync::atomic::Ordering::SeqCst) })
            .filter_map(move |ended| {
                let reason = match engine.state() {
                    crate::engine::LoadState::Failed(reason) => format!(": {reason}"),
                    _ => String::new(),
                };
                async move {
                    (!ended).then(|| {
                        Err(Status::unavailable(format!("the inference engine stopped before finishing this request{reason}")))
                    })
                }
            });
        Ok(Box::pin(futures::stream::once(async { Ok(started) }).chain(events).chain(lost)))
    }
}

/// A pinned system prompt's tokens: the first turn exactly as a chat request with that
/// system message renders and tokenizes it, so that the request finds it cached.
pub fn system_prefix_tokens(model: &LoadedModel, text: &str) -> Result<Vec<LlamaToken>, String> {
    let Some(template) = &model.chat_template else {
        // Without a template, requests use Complete, whose prompts are tokenized this way.
        return Ok(model.model.vocab().tokenize(text.as_bytes(), true, true));
    };
    let system =
        llama_cpp_2::model::LlamaChatMessage::new("system".into(), mark_untrusted(text)).map_err(|err| err.to_string())?;
    let rendered = model
        .model
        .apply_chat_template(template, &[system], false)
        .map_err(|err| format!("the model's chat template cannot render it: {err}"))?;
    tokenize_prompt(model, &rendered).map_err(|err| err.to_string())
}

/// The warm model, or UNAVAILABLE saying how far loading got.
pub fn ready_model(engine: &Engine) -> Result<Arc<LoadedModel>, Status> {
    match engine.state() {
        crate::engine::LoadState::Ready(model) => Ok(model),
        crate::engine::LoadState::Loading { percent } => {
            Err(Status::unavailable(format!("model loading, {percent}%; retry when health reports SERVING")))
        }
        crate::engine::LoadState::Waiting { reason } => {
            Err(Status::unavailable(format!("the model is not loaded yet: {reason}; retry when health reports SERVING")))
        }
        crate::engine::LoadState::Failed(reason) => Err(Status::unavailable(format!("model failed to load: {reason}"))),
    }
}

/// Everything CPU-heavy a chat request needs before it can be queued: its messages and
/// options checked, its schemas compiled, its tools planned, and for a plain chat its prompt
/// rendered and tokenized and its sampler built. Runs in [`Offload`].
fn prepare_chat(
    model: &LoadedModel,
    request: &ChatRequest,
    live: LiveSettings,
    plugin_tools: &[crate::plugins::ToolInfo],
) -> Result<PreparedChat, Status> {
    let messages = validate::chat_messages(&request.messages)?;
    let params = validate::generation_params(request.options.as_ref(), live.defaults)?;
    if let Some(plan) = tool_options::plan(
        request.tools.as_ref(),
        live.tool_choice,
        plugin_tools,
        live.defaults.max_tool_steps,
        &live.defaults.schema_limits,
    )? {
        if params.grammar.is_some() {
            return Err(Status::invalid_argument(
                "options.json_schema cannot be combined with tools: each tool step has its own grammar; \
                 send the request with tool choice NONE, or leave json_schema out",
            ));
        }
        return Ok(PreparedChat::ToolTurn { messages, plan, params });
    }
    let turns: Vec<TemplateTurn> = messages
        .iter()
        .map(|message| TemplateTurn::new(message.role.template_name(), mark_untrusted(&message.content)))
        .collect();
    let prompt = render(model, &turns).map_err(convert::prompt_status)?;
    let tokens = tokenize_prompt(model, &prompt).map_err(convert::prompt_status)?;
    let sampler = sampler_for(&params, model)?;
    Ok(PreparedChat::Plain { tokens, params, sampler })
}

/// The sampler chain; a grammar llama.cpp rejects is the request's mistake.
fn sampler_for(params: &GenerationParams, model: &LoadedModel) -> Result<LlamaSampler, Status> {
    build_sampler(params, &model.model)
        .map_err(|reason| Status::invalid_argument(format!("options.json_schema gives a grammar llama.cpp rejects: {reason}")))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type ChatStream = EventStream;
    type CompleteStream = EventStream;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = validate::grpc_timeout(request.metadata());
        let client = Client::of(&request);
        self.run_chat(&client, request.into_inner(), deadline).await.map(Response::new)
    }

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<Self::CompleteStream>, Status> {
        let deadline = validate::grpc_timeout(request.metadata());
        let client = Client::of(&request);
        self.run_complete(&client, request.into_inner(), deadline).await.map(Response::new)
    }
    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let client = Client::of(&request);
        let request = request.into_inner();
        self.requests.limits.check_size(&request)?;
        let model = ready_model(&self.engine)?;
        let response = self
            .offload
            .for_client(&client)
            .run(move || {
                let vocab = model.model.vocab();
                let tokens = vocab.tokenize(request.text.as_bytes(), request.add_special, request.parse_special);
                let pieces = tokens
                    .iter()
                    .map(|token| String::from_utf8_lossy(&vocab.token_to_piece(*token, true, None)).into_owned())
                    .collect();
                let tokens = tokens.iter().map(|token| token.0 as u32).collect();
                TokenizeResponse { tokens, pieces }
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let client = Client::of(&request);
        let request_id = request.into_inner().request_id;
        if request_id.is_empty() {
            return Err(Status::invalid_argument("request_id must not be empty"));
        }
        let outcome = self.requests.cancel(&request_id, &client);
        tracing::debug!(%request_id, ?outcome, "cancel");
        match outcome {
            CancelOutcome::Cancelled => Ok(Response::new(CancelResponse { found: true })),
            CancelOutcome::NotFound => Ok(Response::new(CancelResponse { found: false })),
            CancelOutcome::NotYours => Err(Status::permission_denied(format!(
                "request `{request_id}` belongs to another client; a client may cancel only its own requests"
            ))),
        }
    }
}
