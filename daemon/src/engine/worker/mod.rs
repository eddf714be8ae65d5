//! The worker: the one thread that owns the llama context.
//!
//! `LlamaContext` is not `Sync`, and llama.cpp has no abort callback, so one thread loads the
//! model, restores the saved prompt cache, warms the pinned prefixes, then loops: admit queued
//! tasks into free slots (where their prefix is cached, when the KV cells they may need are
//! free), build one batch (first one token from every generating slot, then the drafts from
//! the prompt behind those tokens, then prompt chunks round-robin across the slots still
//! reading), decode, sample (and check the drafts: see [`super::lookup`]), stream. Cancellation is
//! checked before every decode, so a cancelled task stops within one step, even in the middle
//! of a long prompt. The worker never waits on a client: events go out on unbounded channels.
//! On shutdown it saves the cached sequences for the next start.
//!
//! Admission reserves cells: a task may grow to its prompt plus `max_tokens` (at most the
//! context), and is admitted only when that fits beside what the busy slots reserved, after
//! evicting idle cached sequences, least recently used first. A task that does not fit waits
//! at the head of the queue (first come, first served); running alone, it is always admitted. If a decode fails anyway,
//! idle caches are evicted and the batch retried, then the slot with the largest share of the
//! batch fails alone: one failure never fails every slot.
//!
//! The decisions (what goes into a batch, who is admitted, who is evicted) are
//! [`super::schedule`]'s; the prompt cache's persistence is in [`persist`], the test hooks
//! that make the worker fail on purpose in [`faults`].
//!
//! Every pass of the loop beats the [`Heartbeat`], and the blocking wait for a task marks the
//! worker idle, so that the watchdog can tell waiting from wedged.
//!
//! Every decode is timed for the [`ThreadGovernor`], whose thread counts are set before the
//! next one, and every step that only generated counts towards the recent decode speed.

mod entries;
mod faults;
mod persist;
mod placement;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::watch;

use super::LoadState;
use super::heartbeat::Heartbeat;
use super::cache_store::CacheStore;
use super::kv_cells::CellLedger;
use super::loader::{self, EngineConfig, LoadError, LoadedModel};
use super::lookup::DecodeCost;
use super::memory_plan::human_bytes;
use super::prompt_cache::{self, Placement, Source};
use super::backend::backend;
use super::context_threads::ContextThreads;
use super::cpu_use::IdleCores;
use super::decode_rate::DecodeRate;
use super::threads::{ThreadGovernor, ThreadPolicy};
use super::queue::TaskReceiver;
use super::sequence_layout::SequenceLayout;
use super::ram_tier::RamTier;
use super::schedule::{self, CacheHolder};
use super::slot::{Feed, Slot};
use super::status::{EngineStatus, SlotPhase, SlotState, ThreadsInUse};
use super::task::{EngineError, StopReason, Task};

pub struct Worker<'m> {
    model: &'m LoadedModel,
    ctx: LlamaContext<'m>,
    slots: Vec<Slot>,
    pinned: Vec<Pinned>,
    entries: Vec<entries::Entry>,
    ram: RamTier,
    layout: SequenceLayout,
    /// Shortest run reused past a changed span; 0 when off or when the model's positions
    /// cannot be shifted.
    min_chunk: usize,
    /// The longest draft from the prompt checked per step (lookup decoding); 0 when off.
    max_draft: usize,
    /// What decodes of a few generated tokens take, for deciding whether drafts pay.
    decode_cost: DecodeCost,
    cells: CellLedger,
    n_ctx: usize,
    batch: LlamaBatch<'static>,
    batch_size: usize,
    queue: TaskReceiver,
    /// Where the next batch starts looking, so that every slot gets its turn.
    cursor: usize,
    status: Arc<Mutex<EngineStatus>>,
    store: Option<CacheStore>,
    entries_on_disk: usize,
    started_at: Instant,
    heartbeat: Arc<Heartbeat>,
    observer: Arc<dyn super::observer::Observer>,
    faults: faults::Faults,
    governor: ThreadGovernor,
    /// Present when the governor may change the counts (adaptive, and the context found).
    context_threads: Option<ContextThreads>,
    /// The counts set on the context, (single, batch).
    threads_set: (u32, u32),
    idle_cores: IdleCores,
    decode_rate: DecodeRate,
    /// Tasks ended and caches evicted so far: what frees cells and lowers the active count (a
    /// rejected draft frees a few cells for a step only).
    ended: u64,
    /// The task at the head of the queue that did not fit, and `ended` then.
    refused: Option<Refusal>,
}

/// A queued task that did not fit: it is not placed again until a task has ended since, unless
/// a busy slot is still reading its prompt (that prompt's growing prefix may be what the task
/// reuses, so it may need fewer cells each step).
struct Refusal {
    request_id: String,
    enqueued_at: Instant,
    ended: u64,
}

impl Refusal {
    fn of(task: &Task, ended: u64) -> Refusal {
        Refusal { request_id: task.request_id.clone(), enqueued_at: task.enqueued_at, ended }
    }

    fn holds(&self, task: &Task, ended: u64) -> bool {
        self.request_id == task.request_id && self.enqueued_at == task.enqueued_at && self.ended == ended
    }
}

/// A prefix decoded at start-up into a sequence of its own, never evicted.
struct Pinned {
    seq_id: i32,
    tokens: Vec<LlamaToken>,
}

/// Runs on the worker thread: loads the model, publishes progress and readiness through
/// `state`, then serves tasks until the queue is closed and every slot is free.
pub fn run(
    config: EngineConfig,
    queue: TaskReceiver,
    state: watch::Sender<LoadState>,
    status: Arc<Mutex<EngineStatus>>,
    heartbeat: Arc<Heartbeat>,
) {
    let loaded = match load(&config, &state) {
        Ok(loaded) => loaded,
        Err(LoadError::Cancelled) => {
            tracing::info!("model load stopped: shutting down");
            state.send_replace(LoadState::Failed(LoadError::Cancelled.to_string()));
            return;
        }
        Err(err) => {
            tracing::error!("{err}");
            state.send_replace(LoadState::Failed(err.to_string()));
            return;
        }
    };
    let ctx = match loader::create_context(backend(), &loaded, &config) {
        Ok(ctx) => ctx,
        Err(err) => {
            tracing::error!("{err}");
            state.send_replace(LoadState::Failed(err.to_string()));
            return;
        }
    };
    let store = persist::prompt_store(&config);
    let min_chunk = reusable_chunk(&config, &loaded);
    let layout = SequenceLayout::new(config.slots, config.pinned_prompts.len(), config.prompt_cache_entries);
    let (governor, context_threads) = thread_governor(config.threads, &ctx);
    // llama.cpp rounds the cells up (to a multiple of 256) and caps a batch at the context;
    // the worker keeps to what was configured and to what llama.cpp accepts.
    let n_ctx = (ctx.n_ctx() as usize).min(config.ctx_size as usize);
    let batch_size = (config.batch_size as usize).min(ctx.n_batch() as usize);
    let mut worker = Worker {
        model: &loaded,
        ctx,
        slots: (0..config.slots as i32).map(Slot::new).collect(),
        pinned: Vec::new(),
        entries: layout.entries().map(entries::Entry::new).collect(),
        ram: RamTier::new(ram_budget(&config, &loaded)),
        layout,
        min_chunk,
        max_draft: config.lookup_draft_max,
        decode_cost: DecodeCost::new(config.lookup_draft_max + 1),
        cells: CellLedger::default(),
        n_ctx,
        batch: LlamaBatch::new(batch_size, 1),
        batch_size,
        queue,
        cursor: 0,
        status,
        store,
        entries_on_disk: 0,
        started_at: Instant::now(),
        heartbeat,
        observer: config.observer.clone(),
        faults: faults::Faults::from_env(),
        threads_set: (config.threads.max(), config.threads.max()),
        governor,
        context_threads,
        idle_cores: IdleCores::default(),
        decode_rate: DecodeRate::default(),
        ended: 0,
        refused: None,
    };
    if let Err(err) = worker.warm_up() {
        tracing::error!("{err}");
        state.send_replace(LoadState::Failed(err.to_string()));
        return;
    }
    if let Err(err) = worker.warm_cache(&config) {
        tracing::error!("{err}");
        state.send_replace(LoadState::Failed(err.to_string()));
        return;
    }
    worker.publish();
    state.send_replace(LoadState::Ready(loaded.clone()));
    worker.serve();
    worker.save();
    tracing::debug!("worker stopped");
}

/// Until every RPC worker answers: NOT_SERVING, saying which one is missing (a worker being
/// restarted, or not started yet). From then on, a worker that stops answering fails the
/// engine (`rpc::on_worker_lost`) instead of aborting the process.
fn wait_for_workers(config: &EngineConfig, state: &watch::Sender<LoadState>) -> Result<(), LoadError> {
    let lost = state.clone();
    super::rpc::on_worker_lost(&config.rpc_workers, move |why| {
        let reason = format!("{why}; phi3d stops, and once restarted waits until every worker answers");
        tracing::error!("{reason}");
        lost.send_replace(LoadState::Failed(reason));
    });
    let mut last_reason = String::new();
    let reached = super::rpc::wait_until_reachable(
        &config.rpc_workers,
        |reason| {
            if reason != last_reason {
                tracing::warn!("{reason}; waiting for it (NOT_SERVING until it answers)");
                last_reason = reason.to_owned();
            }
            state.send_replace(LoadState::Waiting { reason: reason.to_owned() });
        },
        || config.cancel.is_cancelled(),
    );
    reached.map_err(|()| LoadError::Cancelled)?;
    tracing::info!(workers = %config.rpc_workers.join(", "), "rpc workers answer");
    state.send_replace(LoadState::Loading { percent: 0 });
    Ok(())
}

/// RAM for cached prompts evicted from the KV cache: as configured, or from the memory plan.
fn ram_budget(config: &EngineConfig, loaded: &LoadedModel) -> usize {
    let plan = loaded.info.memory_plan.expect("a loaded model has a memory plan");
    let bytes = config.prompt_cache_ram_bytes.unwrap_or_else(|| plan.default_prompt_cache_ram_bytes());
    tracing::info!(ram = %human_bytes(bytes), "prompts evicted from the KV cache are kept in RAM up to this size");
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// The configured minimum chunk for reuse past a changed span, or 0 where the model's
/// positions cannot be shifted: llama.cpp aborts on a shift of multi-dimensional positions and
/// of architectures whose rotary dimensions vary by layer, and a recurrent state has no
/// positions to shift.
fn reusable_chunk(config: &EngineConfig, loaded: &LoadedModel) -> usize {
    use llama_cpp_2::model::RopeType;
    let model = &loaded.model;
    let multi_dimensional = matches!(model.rope_type(), Some(RopeType::MRope | RopeType::IMRope | RopeType::Vision));
    let per_layer_rope = model.meta_val_str("general.architecture").is_ok_and(|arch| arch == "step35");
    let shiftable = !multi_dimensional && !per_layer_rope && !model.is_recurrent() && !model.is_hybrid();
    if config.prompt_cache_min_chunk > 0 && !shiftable {
        tracing::warn!(
            "prompt_cache_min_chunk: this model's positions cannot be shifted; only exact prefixes are reused"
        );
        return 0;
    }
    config.prompt_cache_min_chunk
}

/// The governor for `policy`, and the handle it needs on the context; where the handle cannot
/// be had, the configured maximum stays fixed, and the log says so.
fn thread_governor(policy: ThreadPolicy, ctx: &LlamaContext<'_>) -> (ThreadGovernor, Option<ContextThreads>) {
    if !policy.is_adaptive() {
        return (ThreadGovernor::new(policy), None);
    }
    match ContextThreads::find(ctx, policy.max()) {
        Some(handle) => {
            tracing::info!("inference threads: {policy}, chosen from measured step times");
            (ThreadGovernor::new(policy), Some(handle))
        }
        None => {
            tracing::warn!(
                "inference threads: {} fixed: this build cannot change a context's thread count, \
                 so the count will not adapt to other programs on the cores",
                policy.max()
            );
            (ThreadGovernor::new(ThreadPolicy::Fixed(policy.max())), None)
        }
    }
}

fn load(config: &EngineConfig, state: &watch::Sender<LoadState>) -> Result<Arc<LoadedModel>, LoadError> {
    let progress = state.clone();
    let mut last_logged = 0;
    tracing::info!(
        cpu_features = %super::cpu_features(),
        cpu_variant = super::backend::cpu_variant().as_deref().unwrap_or("compiled in"),
        board = super::backend::board().as_deref().unwrap_or("unknown"),
        "llama.cpp kernels"
    );
    if !config.rpc_workers.is_empty() {
        wait_for_workers(config, state)?;
    }
    let loaded = loader::load_model(backend(), config, move |percent| {
        progress.send_replace(LoadState::Loading { percent });
        // A 2 GB model from an SD card takes a while: say how far it got, not every tick.
        if percent >= last_logged + 10 || (percent == 100 && last_logged != 100) {
            last_logged = percent;
            tracing::info!(percent, "loading model");
        }
    })?;
    let plan = loaded.info.memory_plan.expect("a loaded model has a memory plan");
    tracing::info!(
        name = %loaded.info.name,
        parameters = loaded.info.parameters,
        weights = %human_bytes(plan.weights_bytes),
        kv_cache = %human_bytes(plan.kv_cache_bytes),
        kv_type = %plan.kv_type,
        compute = %human_bytes(plan.compute_bytes),
        budget = %plan.budget_bytes.map_or_else(|| "unknown".into(), human_bytes),
        ctx_size = loaded.info.context_length,
        slots = config.slots,
        trained_ctx = loaded.info.trained_context_length,
        "model loaded"
    );
    if loaded.info.context_length > loaded.info.trained_context_length {
        tracing::warn!(
            "ctx_size {} exceeds the {} tokens the model was trained on; replies past that may degrade",
            loaded.info.context_length,
            loaded.info.trained_context_length
        );
    }
    Ok(Arc::new(loaded))
}

impl Worker<'_> {
    /// One decode so that the first request does not pay for llama.cpp's lazy allocations.
    fn warm_up(&mut self) -> Result<(), LoadError> {
        let vocab = self.model.model.vocab();
        let token = vocab.bos();
        self.batch.clear();
        self.batch.add(token, 0, &[0], true).map_err(|err| LoadError::WarmUp(err.to_string()))?;
        self.ctx.decode(&mut self.batch).map_err(|err| LoadError::WarmUp(err.to_string()))?;
        self.ctx.clear_kv_cache();
        Ok(())
    }

    fn serve(&mut self) {
        loop {
            self.heartbeat.beat();
            if !self.admit() {
                return;
            }
            self.queue.drop_abandoned();
            self.drop_abandoned();
            if self.active_slots() > 0 {
                self.step();
            }
            self.publish();
        }
    }

    /// Moves queued tasks into free slots, oldest first, blocking only when every slot is
    /// idle. A task that does not fit yet goes back to the head of the queue (where it still
    /// counts against `queue_size`). Returns false when the queue is closed and nothing is
    /// left to do.
    fn admit(&mut self) -> bool {
        while self.slots.iter().any(|slot| !slot.is_busy()) {
            let task = if self.active_slots() == 0 {
                self.heartbeat.set_idle(true);
                let popped = self.queue.pop();
                self.heartbeat.set_idle(false);
                match popped {
                    Some(task) => task,
                    None => return false,
                }
            } else {
                match self.queue.try_pop() {
                    // Placing a prompt walks every cached sequence: a task that waits for cells
                    // is placed again only once something could have freed them.
                    Some(task)
                        if self.refused.as_ref().is_some_and(|refused| refused.holds(&task, self.ended))
                            && !self.slots.iter().any(Slot::is_reading) =>
                    {
                        self.queue.push_front(task);
                        return true;
                    }
                    Some(task) => task,
                    None => return true,
                }
            };
            if let Err(task) = self.try_start(task) {
                self.refused = Some(Refusal::of(&task, self.ended));
                self.queue.push_front(task);
                return true;
            }
        }
        true
    }

    /// Starts `task` in the slot where its prefix is cached, if it fits; gives it back
    /// otherwise.
    fn try_start(&mut self, task: Task) -> Result<(), Task> {
        let reservation = schedule::reservation(task.prompt.len(), task.params.max_tokens, self.n_ctx);
        let mut placement = prompt_cache::place(&task.prompt, &self.sequences(true), self.min_chunk);
        // A prompt in RAM needs cells of its own: where even evicting every idle cache would
        // not free them, the task reuses what the KV cache holds instead.
        if let Some(Placement { source: Source::Restore(k), .. }) = placement
            && !self.could_free(reservation.max(self.ram.entries()[k].tokens.len()))
        {
            placement = prompt_cache::place(&task.prompt, &self.sequences(false), self.min_chunk);
        }
        let Some(placement) = placement else { return Err(task) };
        // Admission comes before anything is moved, so that a task that must wait loses
        // nothing of what it would reuse. A prompt in RAM leaves the tier first: making room
        // may evict other prompts into it.
        let restoring = match placement.source {
            Source::Restore(k) => Some(self.ram.take(k)),
            _ => None,
        };
        let needed = match &restoring {
            // All its cells are new, the whole prompt while it is restored.
            Some(entry) => reservation.max(entry.tokens.len()),
            None => reservation - placement.plan.total(),
        };
        let keep = self.reused_holders(&placement);
        let fits = self.make_room(needed, &keep);
        if !schedule::may_start(fits, self.active_slots()) {
            if let Some(entry) = restoring {
                self.ram.insert(entry);
            }
            return Err(task);
        }
        let plan = self.prepare(&placement, restoring, &task.prompt);
        self.faults.on_start(&task.request_id);
        tracing::debug!(
            request_id = %task.request_id,
            prompt_tokens = task.prompt.len(),
            cached = plan.prefix,
            shifted = plan.shifted(),
            chunks = plan.chunks.len(),
            source = ?placement.source,
            slot = placement.slot,
            "task started"
        );
        self.slots[placement.slot].start(task, &plan, self.n_ctx, self.max_draft);
        self.apply_due_splices(placement.slot);
        // The engine's count of active requests is read from the status: it shows the task
        // before the task's first event goes out.
        self.publish();
        Ok(())
    }

    /// Keeps the first `keep` positions of a slot's sequence.
    fn truncate(&mut self, index: usize, keep: usize) {
        let (seq_id, held) = (self.slots[index].seq_id, self.slots[index].tokens.len());
        if held > keep {
            self.remove_range(seq_id, keep, None);
            self.slots[index].tokens.truncate(keep);
            self.cells.truncate(seq_id, keep as u32);
        }
    }

    /// Whether `needed` cells could be had by evicting every idle cache (an estimate: cells
    /// two idle caches share count for each).
    fn could_free(&self, needed: usize) -> bool {
        let idle_slots = self.slots.iter().filter(|slot| !slot.is_busy()).map(|slot| slot.seq_id);
        let entries = self.entries.iter().map(|entry| entry.seq_id);
        let evictable: usize = idle_slots.chain(entries).map(|seq_id| self.cells.exclusive(seq_id) as usize).sum();
        self.free_cells() + evictable >= needed
    }

    /// Cells neither in use nor reserved by a busy slot.
    fn free_cells(&self) -> usize {
        let reserved: usize = self.slots.iter().map(Slot::reserved_cells).sum();
        self.n_ctx.saturating_sub(self.cells.used() as usize + reserved)
    }

    /// Evicts idle slots' caches and entries, the least worth keeping first, until `needed`
    /// cells are free; never the holders in `keep` (slots by index, then entries). Returns
    /// whether they are.
    fn make_room(&mut self, needed: usize, keep: &[usize]) -> bool {
        loop {
            if self.free_cells() >= needed {
                return true;
            }
            let slots = self.slots.iter().map(|slot| CacheHolder {
                busy: slot.is_busy(),
                last_used: slot.last_used,
                exclusive_cells: self.cells.exclusive(slot.seq_id),
                tokens: slot.tokens.len(),
                hits: slot.hits,
            });
            let entries = self.entries.iter().map(|entry| CacheHolder {
                busy: false,
                last_used: entry.last_used,
                exclusive_cells: self.cells.exclusive(entry.seq_id),
                tokens: entry.tokens.len(),
                hits: entry.hits,
            });
            let holders: Vec<CacheHolder> = slots.chain(entries).collect();
            let Some(victim) = schedule::victim(&holders, keep) else { return false };
            tracing::debug!(tokens = holders[victim].tokens, "evicting a cached prompt");
            // Cells were freed, and a waiting task may have kept this cache for its reuse.
            self.ended += 1;
            match victim.checked_sub(self.slots.len()) {
                None => {
                    let slot = &self.slots[victim];
                    self.keep_evicted(slot.seq_id, slot.tokens.clone(), slot.last_used, slot.hits);
                    self.truncate(victim, 0);
                }
                Some(k) => {
                    let entry = &self.entries[k];
                    self.keep_evicted(entry.seq_id, entry.tokens.clone(), entry.last_used, entry.hits);
                    self.drop_entry(k);
                }
            }
        }
    }

    fn drop_abandoned(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].is_abandoned() {
                self.finish(index, StopReason::Cancelled);
            }
        }
    }

    /// This step's work, as [`schedule::plan_batch`] shares it out.
    fn plan_batch(&mut self) -> Vec<(usize, Feed)> {
        for slot in &mut self.slots {
            slot.draft(self.n_ctx, &self.decode_cost);
        }
        let needs: Vec<_> = self.slots.iter().map(Slot::need).collect();
        let plan = schedule::plan_batch(&needs, self.cursor, self.batch_size);
        self.cursor = (self.cursor + 1) % self.slots.len();
        plan.into_iter()
            .map(|(index, tokens)| {
                let feed = self.slots[index].next_feed(tokens).expect("a slot that needs tokens feeds");
                (index, feed)
            })
            .collect()
    }

    /// One decode over every busy slot, then one sampled token for each slot that asked.
    fn step(&mut self) {
        let started = Instant::now();
        let mut feeds = self.plan_batch();
        let generating_only = feeds.iter().all(|(_, feed)| !feed.from_prompt);
        let mut generated = 0;
        let mut evicted = false;
        while !feeds.is_empty() {
            match self.decode(&feeds) {
                Ok(logits) => {
                    for ((index, feed), logits_index) in feeds.iter().zip(logits) {
                        let seq = self.slots[*index].seq_id;
                        self.cells.append(seq, feed.tokens.len() as u32);
                        self.slots[*index].commit(feed, logits_index);
                        self.apply_due_splices(*index);
                    }
                    break;
                }
                Err(err) => {
                    // Undo whatever the failed decode wrote, so that positions stay consecutive.
                    for (index, _) in &feeds {
                        let (seq_id, held) = (self.slots[*index].seq_id, self.slots[*index].tokens.len());
                        self.remove_range(seq_id, held, None);
                    }
                    if !evicted && matches!(err, DecodeError::NoKvCacheSlot) {
                        evicted = true;
                        // Every idle cache that holds cells of its own goes; retry if any did.
                        let before = self.cells.used();
                        self.make_room(usize::MAX, &[]);
                        if self.cells.used() < before {
                            continue;
                        }
                    }
                    let sizes: Vec<usize> = feeds.iter().map(|(_, feed)| feed.tokens.len()).collect();
                    let largest = schedule::largest(&sizes).expect("feeds is not empty");
                    let (index, feed) = feeds.remove(largest);
                    if !feed.from_prompt && matches!(err, DecodeError::NoKvCacheSlot) {
                        // A reply that has no room left ends as if it reached max_tokens.
                        self.finish(index, StopReason::MaxTokens);
                        continue;
                    }
                    let error = match err {
                        DecodeError::NoKvCacheSlot => {
                            EngineError::CacheFull { used: self.cells.used(), total: self.n_ctx as u32 }
                        }
                        other => EngineError::Decode(other.to_string()),
                    };
                    tracing::error!(slot = index, "decode failed: {error}");
                    self.fail(index, error);
                }
            }
        }
        let n_ctx = self.n_ctx as u32;
        for index in 0..self.slots.len() {
            // Sampling and streaming are one request's business: whatever goes wrong there,
            // a panic included, ends that request and no other.
            let sample_panics = self.faults.sample_panics(self.slots[index].request_id());
            let sampled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if sample_panics {
                    faults::Faults::panic_sampling();
                }
                self.slots[index].sample(&self.ctx, &self.model.model, n_ctx)
            }));
            match sampled {
                Ok(Ok(sampled)) => {
                    generated += sampled.tokens;
                    if sampled.rejected_drafts > 0 {
                        let keep = self.slots[index].tokens.len() - sampled.rejected_drafts;
                        self.truncate(index, keep);
                    }
                    if let Some(reason) = sampled.stop {
                        self.finish(index, reason);
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(slot = index, "{error}");
                    self.fail(index, error);
                }
                Err(panic) => {
                    let error = EngineError::Sampling(crate::offload::panic_message(panic.as_ref()));
                    tracing::error!(slot = index, "sampling panicked: {error}");
                    self.fail(index, error);
                }
            }
        }
        if generating_only && generated > 0 {
            self.decode_rate.record(generated, started.elapsed());
        }
    }

    /// Ends the task in slot `index` with `error`; its sequence, whose contents are no longer
    /// known, is cleared.
    fn fail(&mut self, index: usize, error: EngineError) {
        let Some(ending) = self.slots[index].fail(error) else { return };
        self.ended += 1;
        self.truncate(index, 0);
        self.clear_parked(index);
        self.publish();
        ending.send();
    }

    /// Decodes `feeds` as one batch; the index of the first logits of each feed that asked for
    /// logits (a feed's logits are consecutive).
    fn decode(&mut self, feeds: &[(usize, Feed)]) -> Result<Vec<Option<i32>>, DecodeError> {
        self.batch.clear();
        let mut logits = Vec::with_capacity(feeds.len());
        for (index, feed) in feeds {
            let slot = &self.slots[*index];
            let start = slot.tokens.len() as i32;
            let mut logits_index = None;
            for (offset, token) in feed.tokens.iter().enumerate() {
                let wants = feed.wants_logits_at(offset);
                if wants && logits_index.is_none() {
                    logits_index = Some(self.batch.n_tokens());
                }
                self.batch
                    .add(*token, start + offset as i32, &[slot.seq_id], wants)
                    .expect("the plan never exceeds batch_size");
            }
            logits.push(logits_index);
        }
        let tokens = self.batch.n_tokens() as usize;
        self.set_threads();
        let started = Instant::now();
        self.ctx.decode(&mut self.batch)?;
        if feeds.iter().all(|(_, feed)| !feed.from_prompt) {
            self.decode_cost.record(tokens, started.elapsed());
        }
        // Only a governor that may change the counts needs to know; a fixed count reads nothing.
        if self.context_threads.is_some() {
            let idle = self.idle_cores.recent();
            self.governor.observe(tokens, started.elapsed(), idle);
        }
        Ok(logits)
    }

    /// Gives the context the governor's counts, where they changed.
    fn set_threads(&mut self) {
        let Some(handle) = &self.context_threads else { return };
        let counts = self.governor.counts();
        if counts != self.threads_set {
            tracing::debug!(single = counts.0, batch = counts.1, "inference threads changed");
            handle.set(counts.0, counts.1);
            self.threads_set = counts;
        }
    }

    /// The status is published before the client hears `Done`, so that a client never sees
    /// its own finished request as still active.
    fn finish(&mut self, index: usize, reason: StopReason) {
        if let Some(ending) = self.slots[index].finish(reason) {
            self.ended += 1;
            // A task cancelled while reading its prompt may not have reached every parked chunk.
            self.clear_parked(index);
            self.publish();
            if let Some(done) = ending.completion() {
                self.observer.generation_ended(done);
            }
            ending.send();
        }
    }

    fn active_slots(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_busy()).count()
    }

    /// Replaces the status that `GetStatus` reads.
    fn publish(&self) {
        let slots = self
            .slots
            .iter()
            .map(|slot| SlotState {
                phase: match (slot.is_busy(), slot.is_reading()) {
                    (false, _) => SlotPhase::Idle,
                    (true, true) => SlotPhase::Reading,
                    (true, false) => SlotPhase::Generating,
                },
                tokens: slot.tokens.len() as u32,
                request_id: slot.request_id().unwrap_or_default().to_owned(),
            })
            .collect();
        let cached = self.slots.iter().filter(|slot| !slot.is_busy() && !slot.tokens.is_empty()).count()
            + self.entries.iter().filter(|entry| !entry.tokens.is_empty()).count();
        let status = EngineStatus {
            slots,
            kv_cells_used: self.cells.used(),
            kv_cells_total: self.n_ctx as u32,
            cache_entries_in_memory: (cached + self.pinned.len()) as u32,
            cache_entries_on_disk: self.entries_on_disk as u32,
            cache_entries_in_ram: self.ram.entries().len() as u32,
            cache_ram_bytes: self.ram.bytes() as u64,
            cache_ram_budget_bytes: self.ram.budget_bytes() as u64,
            memory_plan: self.model.info.memory_plan,
            threads: ThreadsInUse {
                single: self.threads_set.0,
                batch: self.threads_set.1,
                max: self.governor.policy().max(),
                adaptive: self.governor.policy().is_adaptive(),
            },
            recent_decode_tokens_per_second: self.decode_rate.tokens_per_second(),
        };
        *self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = status;
    }
}
