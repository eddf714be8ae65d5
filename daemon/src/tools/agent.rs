//! The agent loop of one tool turn: generate → parse the call → validate it against the tool's
//! schema → run it in its plugin (or hand it to the client) → give the result back → generate
//! again, streaming every step to the client.
//!
//! It runs on the async side; the worker thread only ever sees ordinary generation tasks. A bad
//! call, an unknown tool, a plugin error or timeout becomes a `ToolResult` with `is_error` that
//! the model can act on, and the loop goes on until the model answers or the step budget is
//! spent.

use std::sync::Arc;
use std::time::Duration;

use phi3d_proto::v1::{self as pb, ChatEvent, Message, Role, chat_event};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

use super::conversation::{render, tokenize_prompt, tool_turns};
use super::toolset::{OfferedTool, StepMode, ToolSide};
use super::{ModelReply, ParsedCall, ToolFormat};
use crate::engine::task::{Completion, Event, GenerationParams, StopReason, Timings};
use crate::engine::{Engine, LoadedModel};
use crate::plugins::PluginRegistry;
use crate::service::convert;
use crate::service::generation::RequestScope;

/// How often a reply that cannot be parsed is answered with a correction and retried before
/// the turn ends: each retry re-reads a longer prompt.
pub const MAX_REPLY_RETRIES: u32 = 2;

pub type EventSink = mpsc::UnboundedSender<Result<ChatEvent, Status>>;

/// Everything one tool turn needs.
pub struct AgentTurn {
    pub engine: Engine,
    pub model: Arc<LoadedModel>,
    pub plugins: PluginRegistry,
    pub format: ToolFormat,
    pub tools: Vec<OfferedTool>,
    pub messages: Vec<Message>,
    pub max_steps: u32,
    /// The token budget of a step whose grammar allows only a call (`tool_call_max_tokens`).
    pub call_max_tokens: u32,
    pub params: GenerationParams,
    pub scope: RequestScope,
}

/// The sum of every step's accounting.
#[derive(Default)]
struct Totals {
    text: String,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    completion_tokens: u32,
    timings: Timings,
    steps: u32,
}

impl AgentTurn {
    /// Renders and queues one step. Errors (a prompt too long, a full queue, a grammar llama.cpp
    /// rejects) are the request's status.
    pub fn submit_step(&self, mode: &StepMode) -> Result<mpsc::UnboundedReceiver<Event>, Status> {
        let turns = tool_turns(&self.messages, self.format, &self.tools, mode).map_err(Status::invalid_argument)?;
        let prompt = render(&self.model, &turns)?;
        let tokens = tokenize_prompt(&self.model.model, &prompt);
        let grammar = self.format.grammar(&self.tools, mode).map_err(|err| {
            Status::invalid_argument(format!("the tools' schemas cannot be turned into a grammar: {err}"))
        })?;
        crate::engine::sampling::grammar_sampler(&grammar, &self.model.model).map_err(|err| {
            Status::invalid_argument(format!("the tools' schemas give a grammar llama.cpp rejects: {err}"))
        })?;
        // A step that can only be a call gets the call budget, not the client's max_tokens
        // (which limits the answer), and no client stop strings: those would cut the JSON.
        let forced_call = matches!(mode, StepMode::Required | StepMode::Force(_));
        let params = GenerationParams {
            grammar: Some(grammar),
            render_special_tokens: self.format.renders_special_tokens(),
            max_tokens: if forced_call { self.call_max_tokens } else { self.params.max_tokens },
            stop: if forced_call { Vec::new() } else { self.params.stop.clone() },
            ..self.params.clone()
        };
        self.scope.submit(&self.engine, &self.model, tokens, params)
    }

    /// Runs the turn to its end, the first step (in `first_mode`) already queued. Every path
    /// ends the stream with one `done` or one error status.
    pub async fn run(mut self, first_mode: StepMode, first: mpsc::UnboundedReceiver<Event>, sink: EventSink) {
        let _ = sink.send(Ok(convert::started(self.scope.request_id(), &self.model.info.name)));
        // A client that goes away cancels the turn, even while a plugin is running. The watcher
        // holds a sender, so it must end with the turn, or the stream would never close.
        let cancel = self.scope.registration.cancel.clone();
        let watcher = sink.clone();
        let _watcher = AbortOnDropHandle::new(tokio::spawn(async move {
            watcher.closed().await;
            cancel.cancel();
        }));

        let mut totals = Totals::default();
        let mut receiver = first;
        let mut unusable_replies = 0;
        let mut mode = first_mode;
        loop {
            let (raw, completion) = match self.follow(receiver, &sink, &mut totals).await {
                Ok(step) => step,
                Err(status) => {
                    let _ = sink.send(Err(status));
                    return;
                }
            };
            if let Some(status) = self.scope.deadline_status(&completion) {
                let _ = sink.send(Err(status));
                return;
            }
            if completion.stop_reason == StopReason::Cancelled {
                finish(&sink, totals, StopReason::Cancelled);
                return;
            }
            match self.format.parse(&raw) {
                Ok(ModelReply::Answer(_)) => {
                    finish(&sink, totals, completion.stop_reason);
                    return;
                }
                Ok(ModelReply::Calls(calls)) => {
                    unusable_replies = 0;
                    let Some(ended) = self.dispatch(calls, &sink).await else {
                        match self.scope.deadline_exceeded() {
                            Some(status) => {
                                let _ = sink.send(Err(status));
                            }
                            None => finish(&sink, totals, StopReason::Cancelled),
                        }
                        return;
                    };
                    if ended {
                        finish_with(&sink, totals, pb::StopReason::ToolCalls);
                        return;
                    }
                }
                Err(_) if completion.stop_reason == StopReason::MaxTokens && !totals.text.is_empty() => {
                    // An answer cut by max_tokens: what was streamed is the reply.
                    finish(&sink, totals, StopReason::MaxTokens);
                    return;
                }
                Err(problem) if unusable_replies >= MAX_REPLY_RETRIES => {
                    let message = format!(
                        "the model's reply could not be used {} times in a row (last: {problem}); the turn was ended",
                        unusable_replies + 1
                    );
                    let _ = sink.send(Err(Status::aborted(message)));
                    return;
                }
                Err(problem) => {
                    unusable_replies += 1;
                    let message = format!("your last reply could not be used: {problem}");
                    send_result(&sink, "", "", &message, true, Duration::ZERO);
                    self.messages.push(Message { role: Role::User as i32, content: message, ..Message::default() });
                    // A retry asks for what the failed step asked for (a forced call stays forced).
                    receiver = match self.submit_step(&mode) {
                        Ok(receiver) => receiver,
                        Err(status) => {
                            let _ = sink.send(Err(status));
                            return;
                        }
                    };
                    continue;
                }
            }
            mode = if totals.steps >= self.max_steps { StepMode::AnswerOnly } else { StepMode::Auto };
            receiver = match self.submit_step(&mode) {
                Ok(receiver) => receiver,
                Err(status) => {
                    let _ = sink.send(Err(status));
                    return;
                }
            };
        }
    }

    /// Streams one step's answer text; returns the raw reply and its completion.
    async fn follow(
        &self,
        mut receiver: mpsc::UnboundedReceiver<Event>,
        sink: &EventSink,
        totals: &mut Totals,
    ) -> Result<(String, Completion), Status> {
        let mut stream = self.format.stream();
        while let Some(event) = receiver.recv().await {
            match event {
                Event::Delta(text) => {
                    let answer = stream.push(&text);
                    if !answer.is_empty() {
                        totals.text.push_str(&answer);
                        let _ = sink.send(Ok(ChatEvent { event: Some(chat_event::Event::Delta(pb::Delta { text: answer })) }));
                    }
                }
                Event::Done(completion) => {
                    totals.add(&completion);
                    return Ok((completion.text.clone(), completion));
                }
                Event::Failed(error) => return Err(convert::engine_status(error)),
            }
        }
        Err(Status::internal("the engine dropped a generation step without an answer"))
    }

    /// Runs the calls of one reply. `Some(true)` when the turn ends because the client must run
    /// a call; `None` when the request was cancelled meanwhile.
    async fn dispatch(&mut self, calls: Vec<ParsedCall>, sink: &EventSink) -> Option<bool> {
        let mut assistant = Message { role: Role::Assistant as i32, ..Message::default() };
        let mut results = Vec::new();
        let mut client_side = false;
        for call in calls {
            let id = format!("call-{:012x}", rand::random::<u64>() & 0xFFFF_FFFF_FFFF);
            let checked = match self.tools.iter().find(|tool| tool.name == call.name) {
                None => Err(self.unknown_tool(&call.name)),
                Some(tool) => tool.validate(&call.arguments).map(|()| tool),
            };
            // A client tool whose arguments break its schema is answered here, like any bad call.
            let event = pb::ToolCall {
                id: id.clone(),
                name: call.name.clone(),
                arguments_json: call.arguments.to_string(),
                client_side: matches!(checked, Ok(tool) if tool.side == ToolSide::Client),
            };
            assistant.tool_calls.push(event.clone());
            let _ = sink.send(Ok(ChatEvent { event: Some(chat_event::Event::ToolCall(event)) }));
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
            results.push(Message { role: Role::Tool as i32, content, tool_call_id: id, ..Message::default() });
        }
        self.messages.push(assistant);
        self.messages.extend(results);
        Some(client_side)
    }

    async fn run_plugin(&self, name: &str, arguments: Value) -> Option<(String, bool, Duration)> {
        tokio::select! {
            outcome = self.plugins.call(name, arguments) => Some((outcome.content, outcome.is_error, outcome.duration)),
            () = self.scope.registration.cancel.cancelled() => None,
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
        self.completion_tokens += completion.completion_tokens;
        self.timings.prompt_ms += timings.prompt_ms;
        self.timings.generation_ms += timings.generation_ms;
        if self.timings.generation_ms > 0.0 {
            self.timings.tokens_per_second = f64::from(self.completion_tokens) * 1000.0 / self.timings.generation_ms;
        }
    }
}

fn send_result(sink: &EventSink, id: &str, name: &str, content: &str, is_error: bool, duration: Duration) {
    let result = pb::ToolResult {
        id: id.to_owned(),
        name: name.to_owned(),
        content: content.to_owned(),
        is_error,
        duration_ms: duration.as_secs_f64() * 1000.0,
    };
    let _ = sink.send(Ok(ChatEvent { event: Some(chat_event::Event::ToolResult(result)) }));
}

fn finish(sink: &EventSink, totals: Totals, reason: StopReason) {
    finish_with(sink, totals, convert::stop_reason(reason));
}

fn finish_with(sink: &EventSink, totals: Totals, reason: pb::StopReason) {
    let steps = totals.steps;
    let completion = Completion {
        stop_reason: StopReason::EndOfGeneration,
        text: totals.text,
        prompt_tokens: totals.prompt_tokens,
        cached_prompt_tokens: totals.cached_prompt_tokens,
        completion_tokens: totals.completion_tokens,
        timings: totals.timings,
    };
    let mut done = convert::done(completion);
    done.stop_reason = reason as i32;
    if let Some(usage) = done.usage.as_mut() {
        usage.generation_steps = steps;
    }
    let _ = sink.send(Ok(ChatEvent { event: Some(chat_event::Event::Done(done)) }));
}
