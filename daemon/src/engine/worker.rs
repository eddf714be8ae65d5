//! The worker: the one thread that owns the llama context.
//!
//! `LlamaContext` is not `Sync`, and llama.cpp has no abort callback, so one thread loads the
//! model, then loops: take queued tasks into free slots, build one batch from every busy slot
//! (a prompt chunk or the last sampled token each), decode, sample, stream. Cancellation is
//! checked before every decode, so a cancelled task stops within one step, even in the middle
//! of a long prompt. The worker never waits on a client: events go out on unbounded channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::TryRecvError;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use tokio::sync::watch;

use super::loader::{self, EngineConfig, LoadError, LoadedModel};
use super::queue::TaskReceiver;
use super::slot::Slot;
use super::task::{EngineError, StopReason, Task};
use super::LoadState;

pub struct Worker<'m> {
    model: &'m LoadedModel,
    ctx: LlamaContext<'m>,
    slots: Vec<Slot>,
    batch: LlamaBatch<'static>,
    batch_size: usize,
    queue: TaskReceiver,
    active: Arc<AtomicUsize>,
}

/// Runs on the worker thread: loads the model, publishes progress and readiness through
/// `state`, then serves tasks until every queue sender is gone.
pub fn run(
    config: EngineConfig,
    queue: TaskReceiver,
    state: watch::Sender<LoadState>,
    active: Arc<AtomicUsize>,
) {
    let loaded = match load(&config, &state) {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!("{err}");
            state.send_replace(LoadState::Failed(err.to_string()));
            return;
        }
    };
    let backend = backend();
    let ctx = match loader::create_context(backend, &loaded, &config) {
        Ok(ctx) => ctx,
        Err(err) => {
            tracing::error!("{err}");
            state.send_replace(LoadState::Failed(err.to_string()));
            return;
        }
    };
    let mut worker = Worker {
        model: &loaded,
        ctx,
        slots: (0..config.slots as i32).map(Slot::new).collect(),
        batch: LlamaBatch::new(config.batch_size as usize, config.slots as i32),
        batch_size: config.batch_size as usize,
        queue,
        active,
    };
    if let Err(err) = worker.warm_up() {
        tracing::error!("{err}");
        state.send_replace(LoadState::Failed(err.to_string()));
        return;
    }
    state.send_replace(LoadState::Ready(loaded.clone()));
    worker.serve();
    tracing::debug!("worker stopped");
}

/// llama.cpp's backend may be initialised once per process.
fn backend() -> &'static LlamaBackend {
    static BACKEND: std::sync::OnceLock<LlamaBackend> = std::sync::OnceLock::new();
    BACKEND.get_or_init(|| LlamaBackend::init().expect("llama.cpp backend initialises once"))
}

fn load(config: &EngineConfig, state: &watch::Sender<LoadState>) -> Result<Arc<LoadedModel>, LoadError> {
    let progress = state.clone();
    let mut last_logged = 0;
    let loaded = loader::load_model(backend(), config, move |percent| {
        progress.send_replace(LoadState::Loading { percent });
        // A 2 GB model from an SD card takes a while: say how far it got, not every tick.
        if percent >= last_logged + 10 || (percent == 100 && last_logged != 100) {
            last_logged = percent;
            tracing::info!(percent, "loading model");
        }
    })?;
    tracing::info!(
        name = %loaded.info.name,
        parameters = loaded.info.parameters,
        size = %loader::human_bytes(loaded.info.size_bytes),
        kv_cache = %loader::human_bytes(loaded.info.kv_cache_bytes),
        ctx_size = loaded.info.context_length,
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
            if !self.admit() {
                return;
            }
            self.drop_abandoned();
            if self.active_slots() == 0 {
                continue;
            }
            self.step();
        }
    }

    /// Moves queued tasks into free slots, blocking only when every slot is idle. Returns
    /// false when the queue is closed and nothing is left to do.
    fn admit(&mut self) -> bool {
        while let Some(index) = self.slots.iter().position(|slot| !slot.is_busy()) {
            let task = if self.active_slots() == 0 {
                match self.queue.pop() {
                    Ok(task) => task,
                    Err(_) => return false,
                }
            } else {
                match self.queue.try_pop() {
                    Ok(task) => task,
                    Err(TryRecvError::Empty) => return true,
                    // Finish what is running; the next call returns false.
                    Err(TryRecvError::Disconnected) => return true,
                }
            };
            self.start(index, task);
        }
        true
    }

    fn start(&mut self, index: usize, task: Task) {
        let slot = &mut self.slots[index];
        let seq_id = u32::try_from(slot.seq_id).expect("sequence ids are small and positive");
        // A fresh sequence: nothing of the previous task may leak into this one.
        let _ = self.ctx.clear_kv_cache_seq(Some(seq_id), None, None);
        tracing::debug!(request_id = %task.request_id, prompt_tokens = task.prompt.len(), slot = seq_id, "task started");
        if slot.start(task, &self.model.model) {
            self.active.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn drop_abandoned(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].is_abandoned() {
                self.finish(index, StopReason::Cancelled);
            }
        }
    }

    /// One decode over every busy slot, then one sampled token for each slot that asked.
    fn step(&mut self) {
        self.batch.clear();
        let mut budget = self.batch_size;
        for slot in &mut self.slots {
            budget -= slot.fill_batch(&mut self.batch, budget);
        }
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(err) = self.ctx.decode(&mut self.batch) {
            tracing::error!("decode failed: {err}");
            for index in 0..self.slots.len() {
                if self.slots[index].is_busy() {
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    self.slots[index].fail(EngineError::Decode(err.to_string()));
                }
            }
            return;
        }
        let n_ctx = self.ctx.n_ctx();
        for index in 0..self.slots.len() {
            if self.slots[index].logits_index().is_none() {
                continue;
            }
            if let Some(reason) = self.slots[index].sample(&self.ctx, &self.model.model, n_ctx) {
                self.finish(index, reason);
            }
        }
    }

    /// The count drops before the client hears `Done`, so that a client never sees its own
    /// finished request as still active.
    fn finish(&mut self, index: usize, reason: StopReason) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.slots[index].finish(reason);
    }

    fn active_slots(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_busy()).count()
    }
}
