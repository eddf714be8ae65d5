//! The inference engine: everything that touches llama.cpp, behind an async handle.
//!
//! Vocabulary (after llama.cpp's server): a [`task::Task`] is one request ready to run; the
//! [`queue`] holds tasks waiting for a [`slot::Slot`], one sequence of the llama context; the
//! [`worker`] is the one thread that owns the context and drives every slot. The async side
//! only sees [`Engine`]: submit a task, read the load state, tokenize with the shared model.

pub mod loader;
pub mod queue;
pub mod sampling;
pub mod slot;
pub mod stop;
pub mod task;
pub mod utf8;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

pub use loader::{EngineConfig, LoadedModel, ModelInfo};
pub use queue::QueueError;

/// Where the model is in its life.
#[derive(Clone)]
pub enum LoadState {
    Loading { percent: u32 },
    Ready(Arc<LoadedModel>),
    Failed(String),
}

/// The async side's handle on the worker thread. Cheap to clone; the worker stops once every
/// clone is dropped and the tasks in its slots have ended.
#[derive(Clone)]
pub struct Engine {
    queue: queue::TaskQueue,
    state: watch::Receiver<LoadState>,
    active: Arc<AtomicUsize>,
    slots: u32,
}

impl Engine {
    /// Starts the worker thread, which begins loading the model at once.
    pub fn start(config: EngineConfig) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
        let (queue, receiver) = queue::task_queue(config.queue_size as usize);
        let (state_tx, state) = watch::channel(LoadState::Loading { percent: 0 });
        let active = Arc::new(AtomicUsize::new(0));
        let slots = config.slots;
        let worker_active = active.clone();
        let thread = std::thread::Builder::new()
            .name("phi3d-worker".into())
            .spawn(move || worker::run(config, receiver, state_tx, worker_active))?;
        Ok((Engine { queue, state, active, slots }, thread))
    }

    pub fn state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Waits until the model is warm (or failed to load).
    pub async fn loaded(&self) -> Result<Arc<LoadedModel>, String> {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|state| !matches!(state, LoadState::Loading { .. }))
            .await
            .map(|state| state.clone());
        match result {
            Ok(LoadState::Ready(model)) => Ok(model),
            Ok(LoadState::Failed(reason)) => Err(reason),
            Ok(LoadState::Loading { .. }) | Err(_) => Err("the engine stopped while loading".into()),
        }
    }

    pub fn submit(&self, task: task::Task) -> Result<(), QueueError> {
        self.queue.try_push(task)
    }

    /// Tasks waiting for a slot.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Tasks being generated.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }
}
