//! Engine events to `phi3d.v1` messages, and engine errors to gRPC statuses.

use phi3d_proto::v1::{self as pb, ChatEvent, chat_event};
use tonic::Status;

use crate::engine::task::{Completion, EngineError, Event, StopReason};

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
            completion_tokens: completion.completion_tokens,
            generation_steps: 1,
        }),
        timings: Some(pb::Timings {
            queued_ms: timings.queued_ms,
            prompt_ms: timings.prompt_ms,
            first_token_ms: timings.first_token_ms,
            generation_ms: timings.generation_ms,
            tokens_per_second: timings.tokens_per_second,
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

pub fn engine_status(error: EngineError) -> Status {
    match error {
        EngineError::Decode(_) | EngineError::Grammar(_) => Status::internal(error.to_string()),
        EngineError::ShuttingDown => Status::unavailable(error.to_string()),
        EngineError::CacheFull { .. } => Status::resource_exhausted(error.to_string()),
    }
}
