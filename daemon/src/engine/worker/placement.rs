//! Carrying out a placement: bringing the cached tokens a task reuses into its slot's
//! sequence before it starts, and putting parked chunks back as its prompt reaches them.
//!
//! Chunks reused past a changed span ([`crate::engine::reuse`]) cannot stay in the slot's
//! sequence while the text before them is decoded: llama.cpp requires a sequence's new tokens
//! to follow its last position. So the chunks are shifted to their new positions and parked
//! in the slot's scratch sequence, and each is copied back (sharing its cells, then dropped
//! from the scratch sequence) once the tokens before it are decoded. Only cells no other
//! sequence holds are ever shifted, since a shift moves a cell for every sequence holding it.

use super::Worker;
use crate::engine::prompt_cache::{CachedSequence, FreeSlot, Placement, Role, Source};
use llama_cpp_2::token::LlamaToken;

use crate::engine::ram_tier::RamEntry;
use crate::engine::reuse::{self, ReusePlan};

impl Worker<'_> {
    /// Every sequence of the cache as placement sees it, and the prompts in RAM `with_ram`.
    pub(super) fn sequences(&self, with_ram: bool) -> Vec<CachedSequence<'_>> {
        let movable_from = |seq_id: i32| self.cells.exclusive_from(seq_id) as usize;
        let slots = self.slots.iter().enumerate().map(|(index, slot)| match slot.is_busy() {
            true => CachedSequence { seq_id: slot.seq_id, tokens: &slot.tokens, role: Role::Fixed, movable_from: usize::MAX },
            false => CachedSequence {
                seq_id: slot.seq_id,
                tokens: &slot.tokens,
                role: Role::FreeSlot(FreeSlot { index, last_used: slot.last_used }),
                movable_from: movable_from(slot.seq_id),
            },
        });
        let entries = self.entries.iter().filter(|entry| !entry.tokens.is_empty()).map(|entry| CachedSequence {
            seq_id: entry.seq_id,
            tokens: &entry.tokens,
            role: Role::Entry,
            movable_from: movable_from(entry.seq_id),
        });
        let pinned = self.pinned.iter().map(|pinned| CachedSequence {
            seq_id: pinned.seq_id,
            tokens: &pinned.tokens,
            role: Role::Fixed,
            movable_from: usize::MAX,
        });
        // Restored cells are the slot's own: every chunk can move.
        let in_ram = self.ram.entries().iter().enumerate().filter(|_| with_ram).map(|(k, entry)| CachedSequence {
            seq_id: -1,
            tokens: &entry.tokens,
            role: Role::InRam(k),
            movable_from: 0,
        });
        slots.chain(entries).chain(pinned).chain(in_ram).collect()
    }

    /// What admission must not evict for `placement`, as [`Worker::make_room`] numbers the
    /// holders (slots, then entries): the slot when it reuses its own cells, and the source of
    /// a copy or a take. A slot whose cells the task replaces may go (to the RAM tier).
    pub(super) fn reused_holders(&self, placement: &Placement) -> Vec<usize> {
        let holder_of = |seq_id: i32| {
            let slot = self.slots.iter().position(|slot| slot.seq_id == seq_id);
            let entry = || self.entries.iter().position(|entry| entry.seq_id == seq_id).map(|k| self.slots.len() + k);
            slot.or_else(entry)
        };
        match placement.source {
            Source::Own => vec![placement.slot],
            Source::Copy(seq_id) | Source::Take(seq_id) => holder_of(seq_id).into_iter().collect(),
            Source::Restore(_) => Vec::new(),
        }
    }

    /// Leaves exactly the reused prefix in the chosen slot's sequence and parks the plan's
    /// chunks; what the slot held before is kept as an entry (or in RAM) when it is worth it.
    /// `restoring` is the RAM tier's entry a `Restore` names, already taken out. Returns what
    /// is reused: the plan, or nothing where the cells brought in do not hold what the plan
    /// says (a prompt in RAM that would not restore; a bookkeeping fault, logged).
    pub(super) fn prepare(
        &mut self,
        placement: &Placement,
        restoring: Option<RamEntry>,
        prompt: &[LlamaToken],
    ) -> ReusePlan {
        let index = placement.slot;
        let plan = &placement.plan;
        let seq = self.slots[index].seq_id;
        match placement.source {
            Source::Own => {
                if plan.chunks.is_empty() {
                    self.preserve_as_entry(index, plan.prefix, None);
                }
                // With chunks the slot's own cells move: what it held becomes the new prompt's.
                let slot = &mut self.slots[index];
                slot.hits = if plan.total() > 0 { slot.hits + 1 } else { 0 };
            }
            Source::Copy(source) => {
                self.preserve_as_entry(index, 0, Some(source));
                self.truncate(index, 0);
                self.ctx
                    .copy_kv_cache_seq(source, seq, Some(0), Some(plan.prefix as u32))
                    .expect("positions within the context fit in i32");
                self.cells.copy_prefix(source, seq, plan.prefix as u32);
                self.slots[index].tokens = self.tokens_of(source)[..plan.prefix].to_vec();
                self.slots[index].hits = match self.entries.iter().position(|entry| entry.seq_id == source) {
                    Some(k) => {
                        self.entry_hit(k);
                        self.entries[k].hits
                    }
                    None => 1,
                };
            }
            Source::Take(source) => {
                self.preserve_as_entry(index, 0, Some(source));
                self.truncate(index, 0);
                let k = self.entries.iter().position(|entry| entry.seq_id == source).expect("placement takes entries");
                let len = self.entries[k].tokens.len();
                self.ctx.copy_kv_cache_seq(source, seq, None, None).expect("sequence ids fit in i32");
                self.cells.copy_prefix(source, seq, len as u32);
                self.slots[index].tokens = self.entries[k].tokens.clone();
                self.slots[index].hits = self.entries[k].hits + 1;
                self.drop_entry(k);
            }
            Source::Restore(_) => {
                self.preserve_as_entry(index, 0, None);
                self.truncate(index, 0);
                let entry = restoring.expect("a restore comes with its entry");
                if !self.restore_from_ram(index, entry) {
                    return ReusePlan::default();
                }
            }
        }
        if !self.holds_plan(index, plan, prompt) {
            tracing::error!(slot = index, source = ?placement.source, "cached tokens do not match the plan; reading the prompt anew");
            self.truncate(index, 0);
            return ReusePlan::default();
        }
        if plan.chunks.is_empty() {
            self.truncate(index, plan.prefix);
        } else {
            self.park_chunks(index, plan);
        }
        plan.clone()
    }

    /// Whether slot `index` holds what `plan` reuses of `prompt`: its prefix, and each chunk's
    /// tokens where the chunk comes from. A cheap check that what is about to be reused is
    /// what the prompt says, whatever went before.
    fn holds_plan(&self, index: usize, plan: &ReusePlan, prompt: &[LlamaToken]) -> bool {
        let held = &self.slots[index].tokens;
        let same = |from: usize, to: usize, len: usize| {
            held.get(from..from + len).is_some_and(|cached| prompt.get(to..to + len) == Some(cached))
        };
        same(0, 0, plan.prefix) && plan.chunks.iter().all(|chunk| same(chunk.from, chunk.to, chunk.len))
    }

    /// Restores `entry` (out of the RAM tier) into slot `index`'s empty sequence, evicting
    /// what it must for the cells; false (the entry dropped) where llama.cpp would not take it.
    fn restore_from_ram(&mut self, index: usize, entry: RamEntry) -> bool {
        let seq = self.slots[index].seq_id;
        let len = entry.tokens.len();
        self.make_room(len, &[index]);
        let started = std::time::Instant::now();
        // SAFETY: the state was serialised from this context, or read from a file of this
        // model, configuration and build whose sha256 checked out.
        if !unsafe { self.load_state(seq, &entry.state, len) } {
            tracing::warn!(tokens = len, "a prompt kept in RAM could not be restored; it is read again");
            return false;
        }
        self.cells.append(seq, len as u32);
        self.slots[index].tokens = entry.tokens;
        self.slots[index].hits = entry.hits + 1;
        tracing::debug!(tokens = len, ms = started.elapsed().as_secs_f64() * 1000.0, "prompt restored from RAM");
        true
    }

    fn tokens_of(&self, seq_id: i32) -> &[LlamaToken] {
        let slot = self.slots.iter().find(|slot| slot.seq_id == seq_id).map(|slot| &slot.tokens);
        let entry = || self.entries.iter().find(|entry| entry.seq_id == seq_id).map(|entry| &entry.tokens);
        let pinned = || self.pinned.iter().find(|pinned| pinned.seq_id == seq_id).map(|pinned| &pinned.tokens);
        slot.or_else(entry).or_else(pinned).expect("placement names known sequences")
    }

    /// Drops what the plan does not reuse past the prefix, shifts the chunks to their new
    /// positions and moves them into the slot's scratch sequence.
    fn park_chunks(&mut self, index: usize, plan: &ReusePlan) {
        let (seq, scratch) = (self.slots[index].seq_id, self.scratch_of(index));
        let mut unused_from = plan.prefix;
        for chunk in &plan.chunks {
            self.remove_range(seq, unused_from, Some(chunk.from));
            unused_from = chunk.from + chunk.len;
        }
        self.remove_range(seq, unused_from, None);
        for chunk in reuse::shift_order(&plan.chunks) {
            self.ctx
                .kv_cache_seq_add(seq, Some(chunk.from as u32), Some((chunk.from + chunk.len) as u32), chunk.shift())
                .expect("positions within the context fit in i32");
        }
        self.ctx.copy_kv_cache_seq(seq, scratch, Some(plan.prefix as u32), None).expect("positions fit in i32");
        self.remove_range(seq, plan.prefix, None);
        let ranges: Vec<(u32, u32)> = plan.chunks.iter().map(|chunk| (chunk.from as u32, chunk.len as u32)).collect();
        self.cells.park(seq, &ranges);
        self.cells.truncate(seq, plan.prefix as u32);
        self.slots[index].tokens.truncate(plan.prefix);
    }

    /// Puts back every parked chunk that slot `index`'s prompt has reached.
    pub(super) fn apply_due_splices(&mut self, index: usize) {
        while let Some(chunk) = self.slots[index].due_splice() {
            let (seq, scratch) = (self.slots[index].seq_id, self.scratch_of(index));
            let (start, end) = (chunk.to as u32, (chunk.to + chunk.len) as u32);
            self.ctx.copy_kv_cache_seq(scratch, seq, Some(start), Some(end)).expect("positions fit in i32");
            self.remove_range(scratch, chunk.to, Some(chunk.to + chunk.len));
            self.cells.unpark(seq, chunk.len as u32);
            self.slots[index].commit_splice();
        }
    }

    /// Drops whatever slot `index` still had parked (its task ended before reaching it).
    pub(super) fn clear_parked(&mut self, index: usize) {
        let scratch = self.scratch_of(index);
        self.remove_range(scratch, 0, None);
        self.cells.drop_parked(self.slots[index].seq_id);
    }

    /// The sequence where slot `index` parks chunks.
    fn scratch_of(&self, index: usize) -> i32 {
        (self.slots.len() + index) as i32
    }

    /// Drops a sequence's cells at positions `from..to` (`None`: to the end), in llama.cpp
    /// only (the callers keep their own records).
    pub(super) fn remove_range(&mut self, seq_id: i32, from: usize, to: Option<usize>) {
        let seq = u32::try_from(seq_id).expect("sequence ids are small and positive");
        let _ = self.ctx.clear_kv_cache_seq(Some(seq), Some(from as u32), to.map(|to| to as u32));
    }
}
