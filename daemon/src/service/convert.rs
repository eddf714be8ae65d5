//! Engine and tool-turn events to `phi3d.v1` messages, and their errors to gRPC statuses.

use phi3d_proto::v1::{self as pb, ChatEvent, chat_event};
use tonic::Status;

use crate::engine::task::{Completion, EngineError, Event, StopReason};
use crate::offload::OffloadError;
use crate::tools::PromptError;
use crate::tools::agent::{AgentError, AgentEvent};

pub fn chat_event(event: Event) -> Result<ChatEvent, Status> {
    let event = match event {
        Event::Delta(text) => chat_event::Event::Delta(pb::Delta { text }),
        Event::Done(completion) => chat_event::Event::Done(done(completion)),
        Event::Failed(error) => return Err(engine_status(error)),
    };
    Ok(ChatEvent { event: Some(event) })
}

pub fn started(request_id: &str, model: &str) -> ChatEvent {
    ChatEvent {
        event: Some(chat_event::Event::Started(pb::Started { request_id: request_id.to_owned(), model: model.to_owned() })),
    }
}

pub fn done(completion: Completion) -> pb::Done {
    let timings = completion.timings;
    pb::Done {
        stop_reason: stop_reason(completion.stop_reason) as i32,
        usage: Some(pb::Usage {
            prompt_tokens: completion.prompt_tokens,
            cached_prompt_tokens: completion.cached_prompt_tokens,
            shifted_prompt_tokens: completion.shifted_prompt_tokens,
            completion_tokens: completion.completion_tokens,
            generation_steps: 1,
        }),
        timings: Some(pb::Timings {
            queued_ms: timings.queued_ms,
            prompt_ms: timings.prompt_ms,
            first_token_ms: timings.first_token_ms,
            generation_ms: timings.generation_ms,
            tokens_per_second: timings.tokens_per_second,
            draft_tokens: timings.draft_tokens,
            accepted_draft_tokens: timings.accepted_draft_tokens,
        }),
        text: completion.text,
    }
}

pub fn stop_reason(reason: StopReason) -> pb::StopReason {
    match reason {
        StopReason::EndOfGeneration => pb::StopReason::Eos,
        StopReason::StopSequence => pb::StopReason::StopSequence,
        StopReason::MaxTokens => pb::StopReason::MaxTokens,
        StopReason::Cancelled => pb::StopReason::Cancelled,
    }
}

/// A request whose preparation outgrows its budget is the request's fault (its schemas are
/// too complex); a panic is phi3d's, and ends that request only.
impl From<OffloadError> for Status {
    fn from(error: OffloadError) -> Status {
        match error {
            OffloadError::TimedOut(_) => Status::invalid_argument(error.to_string()),
            OffloadError::Busy | OffloadError::ClientBusy => Status::resource_exhausted(error.to_string()),
            OffloadError::Panicked(_) => Status::internal(error.to_string()),
        }
    }
}

pub fn engine_status(error: EngineError) -> Status {
    match error {
        EngineError::Decode(_) | EngineError::Sampling(_) => Status::internal(error.to_string()),
        EngineError::Grammar(_) => Status::invalid_argument(error.to_string()),
        EngineError::ShuttingDown => Status::unavailable(error.to_string()),
        EngineError::CacheFull { .. } => Status::resource_exhausted(error.to_string()),
    }
}

/// A tool turn's event (or its end in error) as the client sees it.
pub fn agent_event(event: Result<AgentEvent, AgentError<Status>>) -> Result<ChatEvent, Status> {
    let event = match event.map_err(agent_status)? {
        AgentEvent::Delta(text) => chat_event::Event::Delta(pb::Delta { text }),
        AgentEvent::Call(call) => chat_event::Event::ToolCall(pb::ToolCall {
            id: call.id,
            name: call.name,
            arguments_json: call.arguments.to_string(),
            client_side: call.client_side,
        }),
        AgentEvent::Result(result) => chat_event::Event::ToolResult(pb::ToolResult {
            id: result.id,
            name: result.name,
            content: result.content,
            is_error: result.is_error,
            duration_ms: result.duration.as_secs_f64() * 1000.0,
        }),
        AgentEvent::Done(end) => {
            let mut done = done(end.completion);
            if end.client_calls {
                done.stop_reason = pb::StopReason::ToolCalls as i32;
            }
            if let Some(usage) = done.usage.as_mut() {
                usage.generation_steps = end.steps;
            }
            chat_event::Event::Done(done)
        }
    };
    Ok(ChatEvent { event: Some(event) })
}

pub fn prompt_status(error: PromptError) -> Status {
    match error {
        PromptError::NoChatTemplate => Status::failed_precondition(error.to_string()),
        PromptError::Invalid(message) => Status::invalid_argument(message),
        PromptError::TooLong { .. } => Status::invalid_argument(error.to_string()),
    }
}

pub fn agent_status(error: AgentError<Status>) -> Status {
    match error {
        AgentError::Request(status) => status,
        AgentError::Prompt(error) => prompt_status(error),
        AgentError::Grammar(_) => Status::invalid_argument(error.to_string()),
        AgentError::Engine(error) => engine_status(error),
        AgentError::Unusable { .. } => Status::aborted(error.to_string()),
        AgentError::CallCutShort { .. } => Status::out_of_range(error.to_string()),
        AgentError::Prepare(error) => error.into(),
        AgentError::EngineLost => Status::unavailable(error.to_string()),
        AgentError::Panicked(_) => Status::internal(error.to_string()),
    }
}
