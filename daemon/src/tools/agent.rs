//! The agent loop of one tool turn: generate → parse the call → validate it against the tool's
//! schema → run it in its plugin (or hand it to the client) → give the result back → generate
//! again, reporting every step as an [`AgentEvent`].
//!
//! It runs on the async side; the worker thread only ever sees ordinary generation tasks, which
//! it queues through a [`StepRunner`] (the service's request scope). It speaks engine and tool
//! types only: the service maps its events and errors to the wire, as it does for plain chats.
//! A bad call, an unknown tool, a plugin error or timeout becomes a result with `is_error` that
//! the model can act on, and the loop goes on until the model answers or the step budget is
//! spent.

use std::sync::Arc;
use std::time::Duration;

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::conversation::{render, tokenize_prompt, tool_turns};
use super::toolset::{OfferedTool, StepMode, ToolSide};
use super::{CallRecord, ChatMessage, ChatRole, ModelReply, ParsedCall, PromptError, ToolFormat};
use crate::engine::LoadedModel;
use crate::engine::sampling::build_sampler;
use crate::engine::task::{Completion, EngineError, Event, GenerationParams, StopReason, Timings};
use crate::offload::{Offload, OffloadError};
use crate::plugins::PluginRegistry;

/// How often a reply that cannot be parsed is answered with a correction and retried before
/// the turn ends: each retry re-reads a longer prompt.
pub const MAX_REPLY_RETRIES: u32 = 2;

/// Queues the steps of one request and knows its cancellation and deadline.
pub trait StepRunner: Send + Sync + 'static {
    /// How the request itself fails (a full queue, a prompt too long, its deadline).
    type Error: Send + 'static;
    /// Queues one step, its sampler already built; its events arrive on the returned channel.
    fn submit(
        &self,
        prompt: Vec<LlamaToken>,
        params: GenerationParams,
        sampler: LlamaSampler,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Self::Error>;
    /// Cancelled when the request is (Cancel, its deadline, shutdown).
    fn cancelled(&self) -> &CancellationToken;
    /// The request's failure if its deadline has passed: after `completion` was cut short, or
    /// (`None`) during a tool call.
    fn deadline_error(&self, completion: Option<&Completion>) -> Option<Self::Error>;
}

/// What a tool turn reports, in order: deltas, calls and results, then one `Done`.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Answer text for the user.
    Delta(String),
    Call(CallEvent),
    Result(ResultEvent),
    Done(TurnDone),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    pub id: String,
    pub name: String,
    pub arguments: Value,
    /// The client runs it; the turn ends after this step's calls.
    pub client_side: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResultEvent {
    pub id: String,
    pub name: String,
    pub content: String,
    pub is_error: bool,
    pub duration: Duration,
}

/// The end of a turn: every step's accounting summed up.
#[derive(Debug, Clone)]
pub struct TurnDone {
    /// The answer text and the summed usage and timings; its stop reason is the last step's.
    pub completion: Completion,
    pub steps: u32,
    /// The turn ended because the client must run calls.
    pub client_calls: bool,
}

/// Why a turn ended without `Done`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError<E> {
    /// The request itself failed (see [`StepRunner::Error`]).
    #[error("the request failed")]
    Request(E),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("the tools' schemas give a grammar llama.cpp rejects: {0}")]
    Grammar(String),
    #[error(transparent)]
    Engine(EngineError),
    #[error("the model's reply could not be used {attempts} times in a row (last: {problem}); the turn was ended")]
    Unusable { attempts: u32, problem: String },
    /// A step that had to call a tool ran out of tokens mid-call: another try would spend the
    /// same budget again.
    #[error(
        "the model's call did not fit in its budget of {budget} tokens (tool_call_max_tokens, at most \
         max_tokens_limit) and could not be made; give the call's arguments less to say or raise tool_call_max_tokens"
    )]
    CallCutShort { budget: u32 },
    /// The step's grammar and prompt could not be prepared (too slow, or a panic).
    #[error(transparent)]
    Prepare(OffloadError),
    /// The loop itself panicked: this turn ends, nothing else does.
    #[error("the tool turn failed inside phi3d: {0}")]
    Panicked(String),
    #[error("the engine dropped a generation step without an answer")]
    EngineLost,
}

pub type EventSink<E> = mpsc::UnboundedSender<Result<AgentEvent, AgentError<E>>>;

/// Everything one tool turn needs.
pub struct AgentTurn<R: StepRunner> {
    pub runner: R,
    pub model: Arc<LoadedModel>,
    pub plugins: PluginRegistry,
    pub format: ToolFormat,
    pub tools: Arc<[OfferedTool]>,
    pub messages: Vec<ChatMessage>,
    pub max_steps: u32,
    /// The token budget of a step whose grammar allows only a call (`tool_call_max_tokens`,
    /// never above `max_tokens_limit`).
    pub call_max_tokens: u32,
    pub params: GenerationParams,
    /// Where each step's prompt and grammar are prepared, off the runtime.
    pub offload: Offload,
}

/// The sum of every step's accounting.
#[derive(Default)]
struct Totals {
    text: String,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    shifted_prompt_tokens: u32,
    completion_tokens: u32,
    timings: Timings,
    steps: u32,
}

impl<R: StepRunner> AgentTurn<R> {
    /// Renders and queues one step. Errors (a prompt too long, a full queue, a grammar llama.cpp
    /// rejects) end the request.
    pub async fn submit_step(&self, mode: &StepMode) -> Result<mpsc::UnboundedReceiver<Event>, AgentError<R::Error>> {
        // A step that can only be a call gets the call budget, not the client's max_tokens
        // (which limits the answer), and no client stop strings: those would cut the JSON.
        let forced_call = matches!(mode, StepMode::Required | StepMode::Force(_));
        let params = GenerationParams {
            grammar: None,
            render_special_tokens: self.format.renders_special_tokens(),
            max_tokens: if forced_call { self.call_max_tokens } else { self.params.max_tokens },
            stop: if forced_call { Vec::new() } else { self.params.stop.clone() },
            ..self.params.clone()
        };
        let (messages, tools, model, format, mode) =
            (self.messages.clone(), self.tools.clone(), self.model.clone(), self.format, mode.clone());
        // Rendering, tokenizing and compiling the grammar are CPU work (a large schema takes a
        // while): off the runtime, once per step, and never on the worker thread that every
        // slot's decoding waits on.
        let prepared = self.offload.run(move || -> Result<_, AgentError<R::Error>> {
            let turns = tool_turns(&messages, format, &tools, &mode)?;
            let prompt = render(&model, &turns)?;
            let tokens = tokenize_prompt(&model, &prompt)?;
            let grammar = format.grammar(&tools, &mode).map_err(AgentError::Grammar)?;
            let params = GenerationParams { grammar: Some(grammar), ..params };
            let sampler = build_sampler(&params, &model.model).map_err(AgentError::Grammar)?;
            Ok((tokens, params, sampler))
        });
        let (tokens, params, sampler) = prepared.await.map_err(AgentError::Prepare)??;
        self.runner.submit(tokens, params, sampler).map_err(AgentError::Request)
    }

    /// Runs the turn to its end, the first step (in `first_mode`) already queued. Every path
    /// ends with one `Done` or one error.
    pub async fn run(mut self, first_mode: StepMode, first: mpsc::UnboundedReceiver<Event>, sink: EventSink<R::Error>) {
        // A client that goes away cancels the turn, even while a plugin is running. The watcher
        // holds a sender, so it must end with the turn, or the stream would never close.
        let cancel = self.runner.cancelled().clone();
        let watcher = sink.clone();
        let _watcher = AbortOnDropHandle::new(tokio::spawn(async move {
            watcher.closed().await;
            cancel.cancel();
        }));
        let fail = |error| {
            let _ = sink.send(Err(error));
        };

        let mut totals = Totals::default();
        let mut receiver = first;
        let mut unusable_replies = 0;
        let mut mode = first_mode;
        loop {
            let (raw, completion) = match self.follow(receiver, &sink, &mut totals).await {
                Ok(step) => step,
                Err(error) => return fail(error),
            };
            if let Some(error) = self.runner.deadline_error(Some(&completion)) {
                return fail(AgentError::Request(error));
            }
            if completion.stop_reason == StopReason::Cancelled {
                return finish(&sink, totals, StopReason::Cancelled, false);
            }
            match self.format.parse(&raw) {
                Ok(ModelReply::Answer(_)) => return finish(&sink, totals, completion.stop_reason, false),
                Ok(ModelReply::Calls(calls)) => {
                    unusable_replies = 0;
                    let Some(client_calls) = self.dispatch(calls, &sink).await else {
                        return match self.runner.deadline_error(None) {
                            Some(error) => fail(AgentError::Request(error)),
                            None => finish(&sink, totals, StopReason::Cancelled, false),
                        };
                    };
                    if client_calls {
                        return finish(&sink, totals, StopReason::EndOfGeneration, true);
                    }
                }
                Err(_) if matches!(completion.stop_reason, StopReason::MaxTokens | StopReason::StopSequence) => {
                    // A reply cut by its token budget or by one of the client's stop strings
                    // is not a mistake a correction can fix: a retry would be cut the same way,
                    // spending the whole budget again. A step that had to call cannot make its
                    // call; any other ends with what was streamed, cut as the client asked.
                    if matches!(mode, StepMode::Required | StepMode::Force(_)) {
                        return fail(AgentError::CallCutShort { budget: self.call_max_tokens });
                    }
                    return finish(&sink, totals, completion.stop_reason, false);
                }
                Err(problem) if unusable_replies >= MAX_REPLY_RETRIES => {
                    return fail(AgentError::Unusable { attempts: unusable_replies + 1, problem });
                }
                Err(problem) => {
                    unusable_replies += 1;
                    let message = format!("your last reply could not be used: {problem}");
                    send_result(&sink, "", "", &message, true, Duration::ZERO);
                    self.messages.push(ChatMessage::new(ChatRole::User, message));
                    // A retry asks for what the failed step asked for (a forced call stays forced).
                    receiver = match self.submit_step(&mode).await {
                        Ok(receiver) => receiver,
                        Err(error) => return fail(error),
                    };
                    continue;
                }
            }
            mode = if totals.steps >= self.max_steps { StepMode::AnswerOnly } else { StepMode::Auto };
            receiver = match self.submit_step(&mode).await {
                Ok(receiver) => receiver,
                Err(error) => return fail(error),
            };
        }
    }

    /// Streams one step's answer text; returns the raw reply and its completion.
    async fn follow(
        &self,
        mut receiver: mpsc::UnboundedReceiver<Event>,
        sink: &EventSink<R::Error>,
        totals: &mut Totals,
    ) -> Result<(String, Completion), AgentError<R::Error>> {
        let mut stream = self.format.stream();
        while let Some(event) = receiver.recv().await {
            match event {
                Event::Delta(text) => {
                    let answer = stream.push(&text);
                    if !answer.is_empty() {
                        totals.text.push_str(&answer);
                        let _ = sink.send(Ok(AgentEvent::Delta(answer)));
                    }
                }
                Event::Done(completion) => {
                    totals.add(&completion);
                    return Ok((completion.text.clone(), completion));
                }
                Event::Failed(error) => return Err(AgentError::Engine(error)),
            }
        }
        Err(AgentError::EngineLost)
    }

    /// Runs the calls of one reply. `Some(true)` when the turn ends because the client must run
    /// a call; `None` when the request was cancelled meanwhile.
    async fn dispatch(&mut self, calls: Vec<ParsedCall>, sink: &EventSink<R::Error>) -> Option<bool> {
        let mut assistant = ChatMessage::new(ChatRole::Assistant, "");
        let mut results = Vec::new();
        let mut client_side = false;
        for call in calls {
            let id = format!("call-{:012x}", rand::random::<u64>() & 0xFFFF_FFFF_FFFF);
            let checked = match self.tools.iter().find(|tool| tool.name == call.name) {
                None => Err(self.unknown_tool(&call.name)),
                Some(tool) => tool.validate(&call.arguments).map(|()| tool),
            };
            // A client tool whose arguments break its schema is answered here, like any bad call.
            let event = CallEvent {
                id: id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
                client_side: matches!(checked, Ok(tool) if tool.side == ToolSide::Client),
            };
            assistant.tool_calls.push(CallRecord { id: id.clone(), name: call.name.clone(), arguments: call.arguments.clone() });
            let _ = sink.send(Ok(AgentEvent::Call(event)));
            let (content, is_error, duration) = match checked {
                Err(problem) => {
                    // It never reaches a plugin; the registry logs the calls that do.
                    tracing::info!(target: "phi3d::audit", tool = %call.name, %problem, "tool call refused before dispatch");
                    (problem, true, Duration::ZERO)
                }
                Ok(tool) if tool.side == ToolSide::Client => {
                    client_side = true;
                    continue;
                }
                Ok(_) => self.run_plugin(&call.name, call.arguments.clone()).await?,
            };
            send_result(sink, &id, &call.name, &content, is_error, duration);
            results.push(ChatMessage { tool_call_id: id, ..ChatMessage::new(ChatRole::Tool, content) });
        }
        self.messages.push(assistant);
        self.messages.extend(results);
        Some(client_side)
    }

    async fn run_plugin(&self, name: &str, arguments: Value) -> Option<(String, bool, Duration)> {
        tokio::select! {
            outcome = self.plugins.call(name, arguments) => Some((outcome.content, outcome.is_error, outcome.duration)),
            () = self.runner.cancelled().cancelled() => None,
        }
    }

    fn unknown_tool(&self, name: &str) -> String {
        let known: Vec<&str> = self.tools.iter().map(|tool| tool.name.as_str()).collect();
        format!("there is no tool `{name}`; call one of: {}", known.join(", "))
    }
}

impl Totals {
    fn add(&mut self, completion: &Completion) {
        let timings = &completion.timings;
        if self.steps == 0 {
            self.timings.queued_ms = timings.queued_ms;
            self.timings.first_token_ms = timings.first_token_ms;
        }
        self.steps += 1;
        self.prompt_tokens += completion.prompt_tokens;
        self.cached_prompt_tokens += completion.cached_prompt_tokens;
        self.shifted_prompt_tokens += completion.shifted_prompt_tokens;
        self.completion_tokens += completion.completion_tokens;
        self.timings.prompt_ms += timings.prompt_ms;
        self.timings.generation_ms += timings.generation_ms;
        self.timings.draft_tokens += timings.draft_tokens;
        self.timings.accepted_draft_tokens += timings.accepted_draft_tokens;
        if self.timings.generation_ms > 0.0 {
            self.timings.tokens_per_second = f64::from(self.completion_tokens) * 1000.0 / self.timings.generation_ms;
        }
    }
}

fn send_result<E>(sink: &EventSink<E>, id: &str, name: &str, content: &str, is_error: bool, duration: Duration) {
    let result = ResultEvent { id: id.to_owned(), name: name.to_owned(), content: content.to_owned(), is_error, duration };
    let _ = sink.send(Ok(AgentEvent::Result(result)));
}

/// Ends the turn with `Done`: the last step's stop reason, or the client's calls to run.
fn finish<E>(sink: &EventSink<E>, totals: Totals, stop_reason: StopReason, client_calls: bool) {
    let completion = Completion {
        stop_reason,
        text: totals.text,
        prompt_tokens: totals.prompt_tokens,
        cached_prompt_tokens: totals.cached_prompt_tokens,
        shifted_prompt_tokens: totals.shifted_prompt_tokens,
        completion_tokens: totals.completion_tokens,
        timings: totals.timings,
    };
    let _ = sink.send(Ok(AgentEvent::Done(TurnDone { completion, steps: totals.steps, client_calls })));
}
