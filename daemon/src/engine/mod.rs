//! The inference engine: everything that touches llama.cpp, behind an async handle.
//!
//! Vocabulary (after llama.cpp's server): a [`task::Task`] is one request ready to run; the
//! [`queue`] holds tasks waiting for a [`slot::Slot`], one sequence of the llama context; the
//! [`worker`] is the one thread that owns the context and drives every slot. The async side
//! only sees [`Engine`]: submit a task, read the load state and the engine's status, tokenize
//! with the shared model. The [`schedule`] decides what the worker does next (admission,
//! eviction, the batch), the [`prompt_cache`] places tasks where their prefix is cached,
//! [`kv_cells`] counts the cells sequences hold, [`cache_store`] keeps the cache across
//! restarts and [`memory_plan`] checks that everything fits before llama.cpp allocates. The
//! [`threads`] governor chooses how many threads each decode gets, from step times and the
//! idle cores [`cpu_use`] reads, and [`context_threads`] applies its choice. [`rpc`] places
//! layers on other boards through llama.cpp's RPC backend.

pub mod backend;
pub mod cache_store;
pub mod context_threads;
pub mod cpu_use;
pub mod decode_rate;
pub mod heartbeat;
pub mod kv_cells;
pub mod loader;
pub mod lookup;
pub mod memory_plan;
pub mod observer;
pub mod prompt_cache;
pub mod queue;
pub mod ram_tier;
pub mod reuse;
pub mod rpc;
pub mod schedule;
pub mod sequence_layout;
pub mod sampling;
pub mod slot;
pub mod status;
pub mod stop;
pub mod task;
pub mod threads;
pub mod utf8;
pub mod worker;

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub use loader::{EngineConfig, LoadedModel, ModelInfo};
pub use observer::Observer;
pub use queue::QueueError;
pub use status::EngineStatus;

/// The llama-cpp-sys-2 release that built llama.cpp (see build.rs).
pub const LLAMA_CPP_SYS_VERSION: &str = env!("PHI3D_LLAMA_CPP_SYS_VERSION");

/// The CPU features llama.cpp's kernels use, as llama.cpp reports them (e.g.
/// "CPU : SSE3 = 1 | AVX2 = 1 | ..."), trimmed to the features that are on.
pub fn cpu_features() -> String {
    // llama_print_system_info rewrites a static buffer on every call: called once, here.
    static FEATURES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FEATURES.get_or_init(read_cpu_features).clone()
}

fn read_cpu_features() -> String {
    // The CPU backend reports them once it is initialised.
    backend::backend();
    // SAFETY: llama_print_system_info returns a pointer to a static, NUL-terminated string,
    // and the OnceLock makes this the only call.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    let info = info.to_string_lossy();
    let on: Vec<&str> = info
        .split('|')
        .filter_map(|part| {
            let part = part.trim();
            let (name, value) = part.rsplit_once(" = ")?;
            (value.trim() == "1").then(|| name.rsplit(':').next().unwrap_or(name).trim())
        })
        .collect();
    if on.is_empty() { info.trim().to_owned() } else { on.join(" ") }
}

/// Forwards a task's events until they end, the client goes, or the engine fails (then what
/// was sent before the failure is still delivered).
async fn relay(
    mut from_worker: tokio::sync::mpsc::UnboundedReceiver<task::Event>,
    to_client: tokio::sync::mpsc::UnboundedSender<task::Event>,
    mut state: watch::Receiver<LoadState>,
) {
    // One wait for the whole task: false once the worker thread has ended and dropped the
    // state (its channels close too), and then no longer watched.
    let failure = async move { state.wait_for(|state| matches!(state, LoadState::Failed(_))).await.is_ok() };
    tokio::pin!(failure);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            event = from_worker.recv() => match event {
                Some(event) => {
                    if to_client.send(event).is_err() {
                        return;
                    }
                }
                None => return,
            },
            failed = &mut failure, if watching => {
                if !failed {
                    watching = false;
                    continue;
                }
                while let Ok(event) = from_worker.try_recv() {
                    let _ = to_client.send(event);
                }
                return;
            }
            () = to_client.closed() => return,
        }
    }
}

/// Where the model is in its life.
#[derive(Clone)]
pub enum LoadState {
    /// Before loading: something the model needs is not there yet (an RPC worker).
    Waiting { reason: String },
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
    status: Arc<Mutex<EngineStatus>>,
    heartbeat: Arc<heartbeat::Heartbeat>,
    slots: u32,
}

impl Engine {
    /// Starts the worker thread, which begins loading the model at once.
    pub fn start(config: EngineConfig) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
        let (queue, receiver) = queue::task_queue(config.queue_size as usize);
        let (state_tx, state) = watch::channel(LoadState::Loading { percent: 0 });
        let status = Arc::new(Mutex::new(EngineStatus::default()));
        let slots = config.slots;
        let worker_status = status.clone();
        let heartbeat = Arc::new(heartbeat::Heartbeat::default());
        let worker_heartbeat = heartbeat.clone();
        let thread = std::thread::Builder::new().name("phi3d-worker".into()).spawn(move || {
            // A panic must not leave the daemon answering SERVING with nobody decoding: the
            // state says so, and the server stops with the reason.
            let panicked_state = state_tx.clone();
            let run = std::panic::AssertUnwindSafe(|| {
                worker::run(config, receiver, state_tx, worker_status, worker_heartbeat)
            });
            if let Err(panic) = std::panic::catch_unwind(run) {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                panicked_state.send_replace(LoadState::Failed(format!("the inference thread panicked: {reason}")));
            }
        })?;
        Ok((Engine { queue, state, status, heartbeat, slots }, thread))
    }

    pub fn state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Waits until the model is warm (or failed to load).
    pub async fn loaded(&self) -> Result<Arc<LoadedModel>, String> {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|state| !matches!(state, LoadState::Loading { .. } | LoadState::Waiting { .. }))
            .await
            .map(|state| state.clone());
        match result {
            Ok(LoadState::Ready(model)) => Ok(model),
            Ok(LoadState::Failed(reason)) => Err(reason),
            Ok(LoadState::Loading { .. } | LoadState::Waiting { .. }) | Err(_) => {
                Err("the engine stopped while loading".into())
            }
        }
    }

    /// Queues `task`. Its events reach the caller through a relay that ends the channel, with
    /// no end event, once the engine has failed and nothing is left in it: a worker lost inside
    /// llama.cpp (an RPC worker gone) never ends its tasks itself, and their clients must not
    /// wait forever. Called on the runtime.
    pub fn submit(&self, mut task: task::Task) -> Result<(), QueueError> {
        let (events, from_worker) = tokio::sync::mpsc::unbounded_channel();
        let to_client = std::mem::replace(&mut task.events, events);
        self.queue.try_push(task)?;
        tokio::spawn(relay(from_worker, to_client, self.state.clone()));
        Ok(())
    }

    /// Stops taking tasks (shutdown): the worker ends once its slots are free.
    pub fn close(&self) {
        self.queue.close();
    }

    /// Tasks waiting for a slot.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Tasks being generated: the busy slots of the last published status.
    pub fn active_requests(&self) -> usize {
        self.status().busy_slots()
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The worker's progress, for the watchdog.
    pub fn pulse(&self) -> heartbeat::Pulse {
        self.heartbeat.pulse()
    }

    /// What the worker last published about its slots, cache and memory.
    pub fn status(&self) -> EngineStatus {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Completes when the engine has failed after having been ready (the worker died), with
    /// the reason. Never completes while it keeps working.
    pub async fn failed(&self) -> String {
        let mut state = self.state.clone();
        match state.wait_for(|state| matches!(state, LoadState::Failed(_))).await {
            Ok(state) => match &*state {
                LoadState::Failed(reason) => reason.clone(),
                _ => unreachable!("waited for Failed"),
            },
            Err(_) => "the inference thread stopped".into(),
        }
    }
}
