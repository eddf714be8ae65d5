//! What the worker publishes about itself for `GetStatus`: each slot's state, KV cells, cache
//! entries, the memory plan, the inference threads and the recent decode speed. The worker
//! replaces it after every step; readers clone it.

use super::memory_plan::MemoryPlan;

#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    pub slots: Vec<SlotState>,
    pub kv_cells_used: u32,
    pub kv_cells_total: u32,
    /// Cached prompts in the KV cache: idle slots holding tokens, entries, pinned prefixes.
    pub cache_entries_in_memory: u32,
    pub cache_entries_on_disk: u32,
    /// Cached prompts in the RAM tier, the bytes they take and may take.
    pub cache_entries_in_ram: u32,
    pub cache_ram_bytes: u64,
    pub cache_ram_budget_bytes: u64,
    pub memory_plan: Option<MemoryPlan>,
    pub threads: ThreadsInUse,
    /// Tokens generated per second over the last decode steps (0 before any).
    pub recent_decode_tokens_per_second: f64,
}

/// The thread counts decodes use now, and the most they may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadsInUse {
    /// Steps of one token (`n_threads`).
    pub single: u32,
    /// Steps of several tokens (`n_threads_batch`).
    pub batch: u32,
    pub max: u32,
    pub adaptive: bool,
}

impl EngineStatus {
    /// Slots serving a task (reading its prompt or generating): the requests being generated.
    pub fn busy_slots(&self) -> usize {
        self.slots.iter().filter(|slot| slot.phase != SlotPhase::Idle).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotPhase {
    #[default]
    Idle,
    Reading,
    Generating,
}

#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub phase: SlotPhase,
    pub tokens: u32,
    pub request_id: String,
}
