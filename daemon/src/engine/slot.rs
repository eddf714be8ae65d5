//! A slot: one sequence of the llama context and the task it is serving.
//!
//! The slot owns everything per-sequence: the tokens its sequence holds in the KV cache (kept
//! after the task ends, as the prompt cache), how much of the prompt is fed, the sampler, the
//! UTF-8 decoder and the stop matcher, the text sent so far and the timings. Its task ends
//! exactly once, through [`Slot::finish`] or [`Slot::fail`]; a slot that is dropped while
//! still busy (a worker panic, shutdown) fails its task instead of leaving the client waiting.

use std::collections::VecDeque;
use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::lookup::{DecodeCost, Drafter};
use super::reuse::{Chunk, ReusePlan};
use super::schedule::{self, Need};
use super::stop::{StopMatcher, StopStep};
use super::task::{Completion, EngineError, Event, StopReason, Task, Timings};
use super::utf8::Utf8Decoder;

pub struct Slot {
    pub seq_id: i32,
    /// What this slot's sequence holds in the KV cache, position by position: the prompt and
    /// reply of the task it serves or served last.
    pub tokens: Vec<LlamaToken>,
    pub last_used: Instant,
    /// Tasks that reused what this slot holds (or what it was brought from): what eviction
    /// weighs beside its length.
    pub hits: u32,
    busy: Option<Busy>,
}

/// What a slot asks to have decoded in the next batch.
pub struct Feed {
    pub tokens: Vec<LlamaToken>,
    /// Prompt tokens (as opposed to the token sampled last and its draft, every one of which
    /// needs its logits).
    pub from_prompt: bool,
    /// Whether the last prompt token's logits are needed (the end of the prompt).
    pub wants_logits: bool,
}

impl Feed {
    /// Whether the token at `offset` needs its logits.
    pub fn wants_logits_at(&self, offset: usize) -> bool {
        !self.from_prompt || (self.wants_logits && offset + 1 == self.tokens.len())
    }
}

/// What sampling after a decode did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sampled {
    /// Why the task must end, if it must.
    pub stop: Option<StopReason>,
    /// Tokens sampled (and streamed, unless they ended the task).
    pub tokens: usize,
    /// Drafted tokens at the end of the sequence that were not the sampler's picks: the
    /// caller removes them from the sequence.
    pub rejected_drafts: usize,
}

/// The state of a slot while it serves a task.
struct Busy {
    task: Task,
    decoder: Utf8Decoder,
    stop: StopMatcher,
    /// Prompt tokens already in the KV cache (reused from the cache or decoded).
    prompt_fed: usize,
    cached_prompt_tokens: usize,
    shifted_prompt_tokens: usize,
    /// Cached chunks past a changed span, parked at their new positions, that the worker
    /// puts back into the sequence when the prompt has been fed up to them.
    splices: VecDeque<Chunk>,
    /// The token sampled last, to be decoded in the next batch.
    pending: Option<LlamaToken>,
    /// Guesses of the tokens after `pending`, to be checked in the same batch; once decoded,
    /// the part that went into the batch, until sampling checks it.
    draft: Vec<LlamaToken>,
    drafter: Drafter<LlamaToken>,
    /// Where this slot's (first) logits are in the batch just decoded.
    logits_index: Option<i32>,
    /// The sequence may grow up to this many positions: KV cells held back for this task.
    reserved_until: usize,
    completion_tokens: u32,
    text: String,
    started_at: Instant,
    prompt_done_at: Option<Instant>,
    first_token_at: Option<Instant>,
}

impl Slot {
    pub fn new(seq_id: i32) -> Slot {
        Slot { seq_id, tokens: Vec::new(), last_used: Instant::now(), hits: 0, busy: None }
    }

    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    pub fn request_id(&self) -> Option<&str> {
        self.busy.as_ref().map(|busy| busy.task.request_id.as_str())
    }

    /// Still reading its prompt (as opposed to generating).
    pub fn is_reading(&self) -> bool {
        self.busy.as_ref().is_some_and(|busy| busy.prompt_fed < busy.task.prompt.len())
    }

    /// Takes a task whose reused prefix the caller has already put in this sequence (and
    /// nothing after it), and the plan's chunks parked at their new positions. `n_ctx`
    /// bounds how far the sequence may grow; `max_draft` is the longest draft checked per step.
    pub fn start(&mut self, task: Task, plan: &ReusePlan, n_ctx: usize, max_draft: usize) {
        let reuse = plan.prefix;
        debug_assert!(self.tokens.len() == reuse && self.tokens[..] == task.prompt[..reuse]);
        let stop = StopMatcher::new(task.params.stop.clone());
        let reserved_until = schedule::reservation(task.prompt.len(), task.params.max_tokens, n_ctx);
        self.busy = Some(Busy {
            task,
            decoder: Utf8Decoder::new(),
            stop,
            prompt_fed: reuse,
            cached_prompt_tokens: reuse,
            shifted_prompt_tokens: plan.shifted(),
            splices: plan.chunks.iter().copied().collect(),
            pending: None,
            draft: Vec::new(),
            drafter: Drafter::new(max_draft),
            logits_index: None,
            reserved_until,
            completion_tokens: 0,
            text: String::new(),
            started_at: Instant::now(),
            prompt_done_at: None,
            first_token_at: None,
        });
    }

    /// KV cells this slot's task may still need beyond what its sequence holds and what it
    /// has parked (parked cells are in use already).
    pub fn reserved_cells(&self) -> usize {
        self.busy.as_ref().map_or(0, |busy| {
            let parked: usize = busy.splices.iter().map(|chunk| chunk.len).sum();
            busy.reserved_until.saturating_sub(self.tokens.len() + parked)
        })
    }

    /// Whether the client has gone or asked to stop.
    pub fn is_abandoned(&self) -> bool {
        self.busy.as_ref().is_some_and(|busy| busy.task.is_abandoned())
    }

    /// The parked chunk that goes back into the sequence now: the prompt is fed up to it.
    pub fn due_splice(&self) -> Option<Chunk> {
        let busy = self.busy.as_ref()?;
        busy.splices.front().copied().filter(|chunk| chunk.to == busy.prompt_fed)
    }

    /// Records that the due chunk is back in the sequence.
    pub fn commit_splice(&mut self) {
        let Some(busy) = self.busy.as_mut() else { return };
        let Some(chunk) = busy.splices.pop_front() else { return };
        self.tokens.extend_from_slice(&busy.task.prompt[chunk.to..chunk.to + chunk.len]);
        busy.prompt_fed += chunk.len;
    }

    /// The prompt tokens to feed before the next parked chunk (or the prompt's end).
    fn feed_until(busy: &Busy) -> usize {
        busy.splices.front().map_or(busy.task.prompt.len(), |chunk| chunk.to)
    }

    /// What this slot needs decoded, for the batch plan.
    pub fn need(&self) -> Need {
        let Some(busy) = self.busy.as_ref() else { return Need::Nothing };
        let left = Self::feed_until(busy) - busy.prompt_fed;
        match (left, busy.pending) {
            (0, Some(_)) => Need::Token { drafts: busy.draft.len() },
            (0, None) => Need::Nothing,
            (left, _) => Need::Prompt(left),
        }
    }

    /// Guesses the tokens after the one sampled last, for the next batch to check: from where
    /// the last tokens appeared before in this sequence, as long as max_tokens and the context
    /// leave room for and `cost` says pays.
    pub fn draft(&mut self, n_ctx: usize, cost: &DecodeCost) {
        let Some(busy) = self.busy.as_mut() else { return };
        let Some(last) = busy.pending else { return };
        // Every drafted token that is kept is one more reply token, and needs a cell.
        let replies_left = busy.task.params.max_tokens.saturating_sub(busy.completion_tokens + 1) as usize;
        let cells_left = n_ctx.saturating_sub(self.tokens.len() + 1);
        busy.draft = busy.drafter.draft(&self.tokens, last, replies_left.min(cells_left), cost);
    }

    /// What this slot wants decoded next, at most `budget` tokens: the next chunk of the
    /// prompt, or the token sampled last and as much of its draft as fits. Nothing changes
    /// until [`Slot::commit`].
    pub fn next_feed(&self, budget: usize) -> Option<Feed> {
        let busy = self.busy.as_ref()?;
        if budget == 0 {
            return None;
        }
        let prompt = &busy.task.prompt;
        if busy.prompt_fed < prompt.len() {
            let end = Self::feed_until(busy).min(busy.prompt_fed + budget);
            return Some(Feed {
                tokens: prompt[busy.prompt_fed..end].to_vec(),
                from_prompt: true,
                wants_logits: end == prompt.len(),
            });
        }
        let token = busy.pending?;
        let drafts = busy.draft.len().min(budget - 1);
        let tokens = std::iter::once(token).chain(busy.draft[..drafts].iter().copied()).collect();
        Some(Feed { tokens, from_prompt: false, wants_logits: true })
    }

    /// Records that `feed` was decoded, its logits (if it asked) at `logits_index`.
    pub fn commit(&mut self, feed: &Feed, logits_index: Option<i32>) {
        let Some(busy) = self.busy.as_mut() else { return };
        if feed.from_prompt {
            busy.prompt_fed += feed.tokens.len();
        } else {
            busy.pending = None;
            busy.draft.truncate(feed.tokens.len() - 1);
        }
        busy.logits_index = logits_index;
        self.tokens.extend_from_slice(&feed.tokens);
    }

    /// Samples after a decode and streams the text: the next token, and while the drafted
    /// tokens behind it are what the sampler picks, one more from each of their logits. The
    /// sampler sees exactly the tokens plain decoding would give it, so the text is the same.
    /// Fails when sampling fails (the caller fails the task).
    pub fn sample(
        &mut self,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        model: &LlamaModel,
        n_ctx: u32,
    ) -> Result<Sampled, EngineError> {
        let Some(busy) = self.busy.as_mut() else { return Ok(Sampled::default()) };
        let Some(first) = busy.logits_index.take() else { return Ok(Sampled::default()) };
        let checking = std::mem::take(&mut busy.draft);
        let mut sampled = Sampled::default();
        let mut kept = 0;
        let mut first_sampled = None;
        loop {
            let token = busy.sample_one(ctx, model, first + kept as i32, &mut sampled)?;
            let Some(token) = token else { break };
            first_sampled.get_or_insert(token);
            if checking.get(kept) == Some(&token) {
                kept += 1;
                continue;
            }
            // The sampled token still needs a place in the context to be decoded.
            if self.tokens.len() - (checking.len() - kept) + 1 > n_ctx as usize {
                sampled.stop = Some(StopReason::MaxTokens);
            } else {
                busy.pending = Some(token);
            }
            break;
        }
        busy.drafter.record(checking.len(), kept, first_sampled);
        sampled.rejected_drafts = checking.len() - kept;
        Ok(sampled)
    }

    /// Ends the task with `Done`, flushing held-back text unless it was cancelled, and frees
    /// the slot. Its tokens stay cached. The caller sends the returned event, after it has
    /// published the slot as free.
    pub fn finish(&mut self, reason: StopReason) -> Option<Ending> {
        let mut busy = self.busy.take()?;
        self.last_used = Instant::now();
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
        Some(Ending { events: busy.task.events.clone(), event: Event::Done(completion) })
    }

    /// Ends the task with an error and frees the slot. The caller clears the sequence, whose
    /// contents are no longer known, and sends the returned event.
    pub fn fail(&mut self, error: EngineError) -> Option<Ending> {
        let busy = self.busy.take()?;
        self.last_used = Instant::now();
        Some(Ending { events: busy.task.events.clone(), event: Event::Failed(error) })
    }
}

/// A task's last event, sent once the engine's status shows its slot free, so that a client
/// never sees its own finished request as still running.
#[must_use]
pub struct Ending {
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    event: Event,
}

impl Ending {
    /// What a finished task reports, for the engine's observer.
    pub fn completion(&self) -> Option<&Completion> {
        match &self.event {
            Event::Done(done) => Some(done),
            Event::Failed(_) | Event::Delta(_) => None,
        }
    }

    pub fn send(self) {
        let _ = self.events.send(self.event);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ending) = self.fail(EngineError::ShuttingDown) {
            ending.send();
        }
    }
}

impl Busy {
    /// Samples one token from the logits at batch position `index` and streams it. `None`
    /// when the task ends with it (`sampled.stop` says why).
    fn sample_one(
        &mut self,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        model: &LlamaModel,
        index: i32,
        sampled: &mut Sampled,
    ) -> Result<Option<LlamaToken>, EngineError> {
        let now = Instant::now();
        self.prompt_done_at.get_or_insert(now);
        let token = super::sampling::sample(&mut self.task.sampler, ctx, index)?;
        self.first_token_at.get_or_insert(now);
        sampled.tokens += 1;
        let vocab = model.vocab();
        if vocab.is_eog(token) && !self.task.params.ignore_eos {
            sampled.stop = Some(StopReason::EndOfGeneration);
            return Ok(None);
        }
        self.completion_tokens += 1;
        let piece = vocab.token_to_piece(token, self.task.params.render_special_tokens, None);
        let text = self.decoder.push(&piece);
        if self.send_text(&text) {
            sampled.stop = Some(StopReason::StopSequence);
            return Ok(None);
        }
        if self.completion_tokens >= self.task.params.max_tokens {
            sampled.stop = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        Ok(Some(token))
    }

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
            draft_tokens: self.drafter.drafted,
            accepted_draft_tokens: self.drafter.accepted,
        };
        Completion {
            stop_reason,
            text: std::mem::take(&mut self.text),
            prompt_tokens: self.task.prompt.len() as u32,
            cached_prompt_tokens: self.cached_prompt_tokens as u32,
            shifted_prompt_tokens: self.shifted_prompt_tokens as u32,
            completion_tokens: self.completion_tokens,
            timings,
        }
    }
}
