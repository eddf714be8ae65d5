//! Prompt cache entries: cached sequences beside the slots.
//!
//! A slot's tokens stay cached after its task, but the slot is soon given to another prompt.
//! Before that overwrites a sequence worth keeping, the sequence is copied into an entry (a
//! copy shares cells, so it costs nothing until cells run short). Entries are only sources:
//! a task copies an entry's prefix into its slot, or takes the entry whole when it also reuses
//! chunks past a changed span. When cells run short, entries are evicted with the idle slots,
//! the least worth keeping first ([`crate::engine::schedule::victim`]); when every entry is in
//! use, a new one replaces the one least worth keeping, if it is worth more; what leaves the
//! KV cache either way goes to the RAM tier when it fits there.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::Worker;
use crate::engine::ram_tier::RamEntry;
use crate::engine::schedule::worth;

/// Fewer tokens than this do not make an entry, nor are they kept in RAM: re-reading them is
/// quick.
const MIN_ENTRY_TOKENS: usize = 32;

/// One entry's sequence and what it holds (nothing when free).
pub(super) struct Entry {
    pub seq_id: i32,
    pub tokens: Vec<LlamaToken>,
    pub last_used: Instant,
    pub hits: u32,
}

impl Entry {
    pub fn new(seq_id: i32) -> Entry {
        Entry { seq_id, tokens: Vec::new(), last_used: Instant::now(), hits: 0 }
    }
}

impl Worker<'_> {
    /// Keeps what slot `index` holds as an entry, when `keep` of its tokens stay in the slot
    /// and the rest would be lost; where no entry can take it, in the RAM tier. The entry
    /// `spare` (the task's source) is not replaced.
    pub(super) fn preserve_as_entry(&mut self, index: usize, keep: usize, spare: Option<i32>) {
        let slot = &self.slots[index];
        if slot.tokens.len() < keep + MIN_ENTRY_TOKENS {
            return;
        }
        // An entry the slot's tokens extend says less than they do: it is replaced.
        let covered = |entry: &Entry| {
            Some(entry.seq_id) != spare && !entry.tokens.is_empty() && slot.tokens.starts_with(&entry.tokens)
        };
        let candidate = worth(slot.tokens.len(), slot.hits, slot.last_used, Instant::now());
        let target = match self.entries.iter().position(covered) {
            Some(k) => Some(k),
            None => match self.entries.iter().position(|entry| entry.tokens.is_empty()) {
                Some(k) => Some(k),
                None => match self.least_worth_entry(spare).filter(|&k| self.entry_worth(k) < candidate) {
                    Some(k) => {
                        // The entry it replaces leaves the KV cache: the RAM tier keeps it.
                        let entry = &self.entries[k];
                        self.keep_evicted(entry.seq_id, entry.tokens.clone(), entry.last_used, entry.hits);
                        Some(k)
                    }
                    None => None,
                },
            },
        };
        let Some(k) = target else {
            let slot = &self.slots[index];
            self.keep_evicted(slot.seq_id, slot.tokens.clone(), slot.last_used, slot.hits);
            return;
        };
        self.drop_entry(k);
        let (source, dest, len) = (self.slots[index].seq_id, self.entries[k].seq_id, self.slots[index].tokens.len());
        self.ctx.copy_kv_cache_seq(source, dest, None, None).expect("sequence ids fit in i32");
        self.cells.copy_prefix(source, dest, len as u32);
        let entry = &mut self.entries[k];
        entry.tokens = self.slots[index].tokens.clone();
        entry.last_used = self.slots[index].last_used;
        entry.hits = self.slots[index].hits;
        tracing::debug!(slot = index, entry = k, tokens = len, "prompt kept as a cache entry");
    }

    /// Empties entry `k`, in llama.cpp and the ledger.
    pub(super) fn drop_entry(&mut self, k: usize) {
        if self.entries[k].tokens.is_empty() {
            return;
        }
        let seq_id = self.entries[k].seq_id;
        self.remove_range(seq_id, 0, None);
        self.cells.truncate(seq_id, 0);
        self.entries[k].tokens.clear();
    }

    fn entry_worth(&self, k: usize) -> f64 {
        let entry = &self.entries[k];
        worth(entry.tokens.len(), entry.hits, entry.last_used, Instant::now())
    }

    fn least_worth_entry(&self, spare: Option<i32>) -> Option<usize> {
        (0..self.entries.len())
            .filter(|&k| Some(self.entries[k].seq_id) != spare)
            .min_by(|&a, &b| self.entry_worth(a).total_cmp(&self.entry_worth(b)))
    }

    /// Keeps a cached sequence that is being evicted in the RAM tier, when it is long enough
    /// and its state fits there.
    pub(super) fn keep_evicted(&mut self, seq_id: i32, tokens: Vec<LlamaToken>, last_used: Instant, hits: u32) {
        if tokens.len() < MIN_ENTRY_TOKENS {
            return;
        }
        let flags = llama_cpp_2::context::session::LlamaStateSeqFlags::empty();
        let state_bytes = self.ctx.state_seq_get_size_ext(seq_id, flags);
        if !self.ram.would_keep(tokens.len(), state_bytes, last_used, hits) {
            return;
        }
        let state = self.sequence_state(seq_id);
        let len = tokens.len();
        if self.ram.insert(RamEntry { tokens, state, last_used, hits }) {
            tracing::debug!(tokens = len, "evicted prompt kept in RAM");
        }
    }

    /// Records that a task reused entry `k`.
    pub(super) fn entry_hit(&mut self, k: usize) {
        let entry = &mut self.entries[k];
        entry.hits += 1;
        entry.last_used = Instant::now();
    }
}
