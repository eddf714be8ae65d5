//! What the worker publishes about itself for `GetStatus`: each slot's state, KV cells, cache
//! entries and the memory plan. The worker replaces it after every step; readers clone it.

use super::memory_plan::MemoryPlan;

#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    pub slots: Vec<SlotState>,
    pub kv_cells_used: u32,
    pub kv_cells_total: u32,
    /// Cached prefixes in the KV cache: idle slots holding tokens, and pinned prefixes.
    pub cache_entries_in_memory: u32,
    pub cache_entries_on_disk: u32,
    pub memory_plan: Option<MemoryPlan>,
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
