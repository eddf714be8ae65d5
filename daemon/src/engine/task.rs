//! A task: one generation request as the engine sees it, and the events it sends back.
//!
//! The service builds a [`Task`] from a validated request (the prompt is already tokenized and
//! known to fit the context); the worker runs it in a slot and reports through `events`.
//! Every task ends exactly once: with one [`Event::Done`] or one [`Event::Failed`].

use std::time::Instant;

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One generation request, ready to run.
pub struct Task {
    pub request_id: String,
    pub prompt: Vec<LlamaToken>,
    pub params: GenerationParams,
    /// Built from `params` on the async side, so that compiling a grammar never stalls the
    /// other slots' decoding.
    pub sampler: LlamaSampler,
    /// Unbounded so that the worker never waits on a slow client; a reply is at most
    /// `max_tokens` small events.
    pub events: mpsc::UnboundedSender<Event>,
    /// Cancelled by `Cancel`, a deadline or shutdown; a closed `events` counts too.
    pub cancel: CancellationToken,
    pub enqueued_at: Instant,
}

impl Task {
    /// Whether nobody wants the result any more.
    pub fn is_abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Ends a task that never reached a slot.
    pub fn end_cancelled(&self) {
        let queued_ms = self.enqueued_at.elapsed().as_secs_f64() * 1000.0;
        let _ = self.events.send(Event::Done(Completion {
            stop_reason: StopReason::Cancelled,
            text: String::new(),
            prompt_tokens: self.prompt.len() as u32,
            cached_prompt_tokens: 0,
            shifted_prompt_tokens: 0,
            completion_tokens: 0,
            timings: Timings { queued_ms, ..Timings::default() },
        }));
    }
}

/// How to generate, with every default already applied and every value validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Constrains what may be generated (tool calls); `None` for free text.
    pub grammar: Option<Grammar>,
    /// Stream special tokens as their text (Phi-4-mini's `<|tool_call|>` must be parsed).
    pub render_special_tokens: bool,
}

/// A GBNF grammar (root rule `root`) for constrained generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    pub gbnf: String,
    /// Lazy grammars apply only from this text on (e.g. Phi-4-mini's `<|tool_call|>`), so the
    /// model may answer in free text instead.
    pub trigger: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    pub min_p: f32,
    /// 1 disables the penalty.
    pub repeat_penalty: f32,
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // llama.cpp's own defaults.
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            seed: 0,
        }
    }
}

/// What the worker tells the service about a task.
#[derive(Debug)]
pub enum Event {
    /// Newly generated text: whole UTF-8 characters, never part of a stop string.
    Delta(String),
    Done(Completion),
    Failed(EngineError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfGeneration,
    StopSequence,
    MaxTokens,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub stop_reason: StopReason,
    /// The concatenation of every `Delta` sent for this task.
    pub text: String,
    pub prompt_tokens: u32,
    /// Prompt tokens found in the cache as an exact prefix.
    pub cached_prompt_tokens: u32,
    /// Prompt tokens reused from the cache past a changed span, moved to new positions.
    pub shifted_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub timings: Timings,
}

/// Milliseconds spent in each phase of a task, and the drafts that sped up its generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub queued_ms: f64,
    pub prompt_ms: f64,
    pub first_token_ms: f64,
    pub generation_ms: f64,
    pub tokens_per_second: f64,
    /// Tokens guessed from the prompt and the reply so far, checked beside a sampled token.
    pub draft_tokens: u32,
    /// Of those, the ones the sampler picked: reply tokens that took no decode of their own.
    pub accepted_draft_tokens: u32,
}

/// Why the engine could not finish a task.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("llama.cpp failed to decode: {0}")]
    Decode(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("invalid grammar: {0}")]
    Grammar(String),
    /// Sampling could not go on (no finite logits, a grammar that allows no token, a panic):
    /// this request ends, the others go on.
    #[error("sampling failed: {0}")]
    Sampling(String),
    #[error("the KV cache is full ({used} of {total} cells in use); lower max_tokens or raise ctx_size")]
    CacheFull { used: u32, total: u32 },
}
