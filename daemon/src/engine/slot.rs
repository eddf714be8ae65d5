//! A slot: one sequence of the llama context and the task it is serving.
//!
//! The slot owns everything per-sequence: how much of the prompt is in the KV cache, the
//! sampler, the UTF-8 decoder and the stop matcher, the text sent so far and the timings.
//! Its task ends exactly once, through [`Slot::finish`]; a slot that is dropped while still
//! busy (a worker panic, shutdown) fails its task instead of leaving the client waiting.

use std::time::Instant;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::sampling::build_sampler;
use super::stop::{StopMatcher, StopStep};
use super::task::{Completion, EngineError, Event, StopReason, Task, Timings};
use super::utf8::Utf8Decoder;

pub struct Slot {
    pub seq_id: i32,
    busy: Option<Busy>,
}

/// The state of a slot while it serves a task.
struct Busy {
    task: Task,
    sampler: LlamaSampler,
    decoder: Utf8Decoder,
    stop: StopMatcher,
    /// Prompt tokens already sent to the context.
    prompt_fed: usize,
    /// The token sampled last, to be decoded in the next batch.
    pending: Option<LlamaToken>,
    /// The position of the next token in the sequence.
    position: i32,
    /// Where this slot's logits are in the batch being decoded.
    logits_index: Option<i32>,
    completion_tokens: u32,
    text: String,
    started_at: Instant,
    prompt_done_at: Option<Instant>,
    first_token_at: Option<Instant>,
}

impl Slot {
    pub fn new(seq_id: i32) -> Slot {
        Slot { seq_id, busy: None }
    }

    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    /// Takes a task; the caller has already cleared this sequence from the KV cache. A task
    /// whose sampler cannot be built ends at once with `Failed`.
    pub fn start(&mut self, task: Task, model: &LlamaModel) -> bool {
        let sampler = match build_sampler(&task.params, model) {
            Ok(sampler) => sampler,
            Err(reason) => {
                let _ = task.events.send(Event::Failed(EngineError::Grammar(reason)));
                return false;
            }
        };
        let stop = StopMatcher::new(task.params.stop.clone());
        self.busy = Some(Busy {
            task,
            sampler,
            decoder: Utf8Decoder::new(),
            stop,
            prompt_fed: 0,
            pending: None,
            position: 0,
            logits_index: None,
            completion_tokens: 0,
            text: String::new(),
            started_at: Instant::now(),
            prompt_done_at: None,
            first_token_at: None,
        });
        true
    }

    /// Whether the client has gone or asked to stop.
    pub fn is_abandoned(&self) -> bool {
        self.busy.as_ref().is_some_and(|busy| busy.task.is_abandoned())
    }

    /// Adds this slot's next tokens to `batch`, at most `budget` of them: the next chunk of
    /// the prompt, or the token sampled last. Returns how many were added.
    pub fn fill_batch(&mut self, batch: &mut LlamaBatch, budget: usize) -> usize {
        let Some(busy) = self.busy.as_mut() else { return 0 };
        busy.logits_index = None;
        if budget == 0 {
            return 0;
        }
        let prompt = &busy.task.prompt;
        let tokens: Vec<LlamaToken> = if busy.prompt_fed < prompt.len() {
            let end = prompt.len().min(busy.prompt_fed + budget);
            let chunk = prompt[busy.prompt_fed..end].to_vec();
            busy.prompt_fed = end;
            chunk
        } else if let Some(token) = busy.pending.take() {
            vec![token]
        } else {
            return 0;
        };
        let wants_logits = busy.prompt_fed == prompt.len();
        let last = tokens.len() - 1;
        for (i, token) in tokens.into_iter().enumerate() {
            let logits = wants_logits && i == last;
            if logits {
                busy.logits_index = Some(batch.n_tokens());
            }
            batch
                .add(token, busy.position, &[self.seq_id], logits)
                .expect("the worker sizes the batch to hold every slot's budget");
            busy.position += 1;
        }
        last + 1
    }

    /// Where this slot's logits are in the batch just decoded, if it wants a new token.
    pub fn logits_index(&self) -> Option<i32> {
        self.busy.as_ref().and_then(|busy| busy.logits_index)
    }

    /// Samples the next token after a decode and streams its text. Returns why the task
    /// must end, if it must.
    pub fn sample(
        &mut self,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        model: &LlamaModel,
        n_ctx: u32,
    ) -> Option<StopReason> {
        let busy = self.busy.as_mut()?;
        let index = busy.logits_index.take()?;
        let now = Instant::now();
        busy.prompt_done_at.get_or_insert(now);
        let token = busy.sampler.sample(ctx, index);
        busy.first_token_at.get_or_insert(now);
        let vocab = model.vocab();
        if vocab.is_eog(token) && !busy.task.params.ignore_eos {
            return Some(StopReason::EndOfGeneration);
        }
        busy.completion_tokens += 1;
        let piece = vocab.token_to_piece(token, busy.task.params.render_special_tokens, None);
        let text = busy.decoder.push(&piece);
        if busy.send_text(&text) {
            return Some(StopReason::StopSequence);
        }
        if busy.completion_tokens >= busy.task.params.max_tokens {
            return Some(StopReason::MaxTokens);
        }
        // The sampled token still needs a place in the context to be decoded.
        if busy.position as u32 + 1 > n_ctx {
            return Some(StopReason::MaxTokens);
        }
        busy.pending = Some(token);
        None
    }

    /// Ends the task with `Done`, flushing held-back text unless it was cancelled, and frees
    /// the slot.
    pub fn finish(&mut self, reason: StopReason) {
        let Some(mut busy) = self.busy.take() else { return };
        let mut reason = reason;
        if matches!(reason, StopReason::EndOfGeneration | StopReason::MaxTokens) {
            let tail = busy.decoder.finish();
            if busy.send_text(&tail) {
                reason = StopReason::StopSequence;
            } else {
                let held = busy.stop.finish();
                busy.send_delta(held);
            }
        }
        let completion = busy.completion(reason);
        let _ = busy.task.events.send(Event::Done(completion));
    }

    /// Ends the task with an error and frees the slot.
    pub fn fail(&mut self, error: EngineError) {
        if let Some(busy) = self.busy.take() {
            let _ = busy.task.events.send(Event::Failed(error));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.fail(EngineError::ShuttingDown);
    }
}

impl Busy {
    /// Streams what the stop matcher lets through; true when a stop string completed.
    fn send_text(&mut self, text: &str) -> bool {
        if text.is_empty() {
            return false;
        }
        match self.stop.push(text) {
            StopStep::Continue { emit } => {
                self.send_delta(emit);
                false
            }
            StopStep::Stopped { emit } => {
                self.send_delta(emit);
                true
            }
        }
    }

    fn send_delta(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        self.text.push_str(&text);
        let _ = self.task.events.send(Event::Delta(text));
    }

    fn completion(&mut self, stop_reason: StopReason) -> Completion {
        let now = Instant::now();
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
        let prompt_done = self.prompt_done_at.unwrap_or(now);
        let generation_ms = ms(prompt_done, now);
        let timings = Timings {
            queued_ms: ms(self.task.enqueued_at, self.started_at),
            prompt_ms: ms(self.started_at, prompt_done),
            first_token_ms: self.first_token_at.map_or(0.0, |first| ms(self.started_at, first)),
            generation_ms,
            tokens_per_second: if generation_ms > 0.0 {
                f64::from(self.completion_tokens) * 1000.0 / generation_ms
            } else {
                0.0
            },
        };
        Completion {
            stop_reason,
            text: std::mem::take(&mut self.text),
            prompt_tokens: self.task.prompt.len() as u32,
            cached_prompt_tokens: 0,
            completion_tokens: self.completion_tokens,
            timings,
        }
    }
}
