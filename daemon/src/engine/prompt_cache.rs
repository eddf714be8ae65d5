//! The prompt cache: where a new task's prompt is already in the KV cache.
//!
//! A slot keeps its tokens (prompt and reply) after its task ends. When a slot is given to
//! another prompt, what it held is kept as a cache *entry*, a sequence of its own that only
//! serves as a source (see the worker). A new task goes to the free slot whose tokens it can
//! reuse most of, or, when an entry, a busy slot or a pinned prefix offers more, into a free
//! slot that gets that reuse: a common prefix is copied (with the unified KV cache a copy
//! shares cells and costs nothing); an entry that also offers chunks past a changed span
//! ([`super::reuse`]) is taken whole, since moving its cells moves them for every holder. A
//! prompt evicted to RAM ([`super::ram_tier`]) is restored into the slot when it serves best.
//! Only the rest of the prompt is decoded; at least its last token, whose logits are needed.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::reuse::{self, ReusePlan};

/// A sequence of the KV cache as placement sees it.
pub struct CachedSequence<'a> {
    /// Its sequence in the KV cache (-1 for a prompt in RAM, which has none).
    pub seq_id: i32,
    pub tokens: &'a [LlamaToken],
    pub role: Role,
    /// The first position from which on its cells are its own: chunks past a changed span
    /// are only reused from there on.
    pub movable_from: usize,
}

#[derive(Clone, Copy)]
pub enum Role {
    /// An idle slot: a task can run in it.
    FreeSlot(FreeSlot),
    /// A cache entry: copied from, or taken whole.
    Entry,
    /// A busy slot or a pinned prefix: its prefix can be copied, nothing moved.
    Fixed,
    /// The RAM tier's entry at this index: restored into the slot, its cells then the slot's.
    InRam(usize),
}

#[derive(Clone, Copy)]
pub struct FreeSlot {
    pub index: usize,
    pub last_used: Instant,
}

/// Where the reused tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The slot holds them itself.
    Own,
    /// A prefix of this sequence is copied into the slot; the sequence keeps it.
    Copy(i32),
    /// This entry moves into the slot whole and is gone as an entry.
    Take(i32),
    /// The RAM tier's entry at this index is restored into the slot and leaves the tier.
    Restore(usize),
}

/// Where a task runs and what of its prompt it finds cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The slot the task runs in.
    pub slot: usize,
    pub plan: ReusePlan,
    pub source: Source,
}

/// Chooses a free slot for `prompt`; `None` when every slot is busy. `min_chunk` is the
/// shortest run reused past a changed span (0: the common prefix only).
pub fn place(prompt: &[LlamaToken], sequences: &[CachedSequence<'_>], min_chunk: usize) -> Option<Placement> {
    // Each sequence is planned once (a plan walks the prompt); the choices below read them.
    let plans: Vec<ReusePlan> = sequences
        .iter()
        .map(|sequence| match sequence.role {
            Role::Fixed => ReusePlan::prefix_only(reuse::plan(sequence.tokens, prompt, 0, 0).prefix),
            Role::FreeSlot(_) | Role::Entry | Role::InRam(_) => {
                reuse::plan(sequence.tokens, prompt, min_chunk, sequence.movable_from)
            }
        })
        .collect();
    let free_slots = || {
        sequences.iter().zip(&plans).filter_map(|(sequence, plan)| match sequence.role {
            Role::FreeSlot(free) => Some((free, sequence, plan)),
            _ => None,
        })
    };
    // A free slot whose cache is mostly this prompt is taken for it. Reusing a sliver of a
    // long cached sequence would throw the rest away instead (it would become an entry, but
    // crowd the others).
    let own = free_slots()
        .filter(|(_, sequence, plan)| plan.total() > 0 && plan.total() * 2 >= sequence.tokens.len())
        .max_by_key(|(free, _, plan)| (plan.total(), free.last_used));
    // The best reuse another sequence offers a slot `except` does not hold itself.
    let best_elsewhere = |except: usize| {
        sequences
            .iter()
            .zip(&plans)
            .filter(|(sequence, _)| !matches!(sequence.role, Role::FreeSlot(free) if free.index == except))
            .map(|(sequence, plan)| match sequence.role {
                Role::Entry if !plan.chunks.is_empty() => (Source::Take(sequence.seq_id), plan.clone()),
                Role::InRam(k) => (Source::Restore(k), plan.clone()),
                // Another idle slot's cells stay its own: only its prefix is shared.
                _ => (Source::Copy(sequence.seq_id), ReusePlan::prefix_only(plan.prefix)),
            })
            // At equal reuse, what is already in the KV cache: restoring costs a copy.
            .max_by_key(|(source, plan)| (plan.total(), !matches!(source, Source::Restore(_))))
    };
    if let Some((free, _, plan)) = own
        && best_elsewhere(free.index).is_none_or(|(_, other)| other.total() <= plan.total())
    {
        return Some(Placement { slot: free.index, plan: plan.clone(), source: Source::Own });
    }
    // Otherwise the slot whose cache is least likely to be wanted again (empty first, then
    // least recently used), with the best reuse found anywhere brought into it.
    let (target, kept) = free_slots()
        .min_by_key(|(free, sequence, _)| (!sequence.tokens.is_empty(), free.last_used))
        .map(|(free, _, plan)| (free.index, plan))?;
    Some(match best_elsewhere(target) {
        Some((source, plan)) if plan.total() > kept.total() => Placement { slot: target, plan, source },
        _ => Placement { slot: target, plan: kept.clone(), source: Source::Own },
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use llama_cpp_2::token::LlamaToken;

    use super::*;
    use crate::engine::reuse::Chunk;

    fn tokens(ids: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        ids.into_iter().map(LlamaToken).collect()
    }

    fn free(index: usize, age_s: u64) -> Role {
        let now = Instant::now() + Duration::from_secs(100);
        Role::FreeSlot(FreeSlot { index, last_used: now - Duration::from_secs(age_s) })
    }

    fn sequence(seq_id: i32, tokens: &[LlamaToken], role: Role) -> CachedSequence<'_> {
        CachedSequence { seq_id, tokens, role, movable_from: 0 }
    }

    fn prefix(slot: usize, reuse: usize, source: Source) -> Placement {
        Placement { slot, plan: ReusePlan::prefix_only(reuse), source }
    }

    #[test]
    fn the_slot_holding_the_longest_prefix_wins() {
        let (a, b) = (tokens([1, 2, 3, 4]), tokens([1, 2, 9]));
        let sequences = [sequence(0, &b, free(0, 1)), sequence(1, &a, free(1, 50))];
        let placed = place(&tokens([1, 2, 3, 4, 5]), &sequences, 0).unwrap();
        assert_eq!(placed, prefix(1, 4, Source::Own));
    }

    #[test]
    fn the_last_prompt_token_is_always_decoded() {
        let a = tokens([1, 2, 3]);
        let sequences = [sequence(0, &a, free(0, 1))];
        assert_eq!(place(&a, &sequences, 0).unwrap().plan.total(), 2);
    }

    #[test]
    fn a_longer_prefix_in_a_busy_slot_is_copied_into_the_least_recently_used_free_slot() {
        let (busy, recent, old) = (tokens([7, 7, 7, 7]), tokens([7, 1]), tokens([3]));
        let sequences =
            [sequence(0, &busy, Role::Fixed), sequence(1, &recent, free(1, 1)), sequence(2, &old, free(2, 60))];
        let placed = place(&tokens([7, 7, 7, 7, 8]), &sequences, 0).unwrap();
        assert_eq!(placed, prefix(2, 4, Source::Copy(0)));
    }

    #[test]
    fn a_new_prompt_takes_an_empty_slot_before_evicting_a_cache() {
        let (cached, empty) = (tokens([5, 6]), tokens([]));
        let sequences = [sequence(0, &cached, free(0, 90)), sequence(1, &empty, free(1, 1))];
        let placed = place(&tokens([1, 2]), &sequences, 0).unwrap();
        assert_eq!(placed, prefix(1, 0, Source::Own));
    }

    #[test]
    fn a_sliver_of_a_long_cache_is_not_worth_its_loss() {
        let (house, empty) = (tokens([1, 5, 5, 5, 5, 5]), tokens([]));
        let sequences = [sequence(0, &house, free(0, 1)), sequence(1, &empty, free(1, 9))];
        let placed = place(&tokens([1, 9, 9]), &sequences, 0).unwrap();
        assert_eq!(placed, prefix(1, 1, Source::Copy(0)), "the house stays cached");
        // The prefix of a long idle cache is copied rather than the cache overwritten.
        let placed = place(&tokens([1, 5, 9]), &sequences, 0).unwrap();
        assert_eq!(placed, prefix(1, 2, Source::Copy(0)));
    }

    #[test]
    fn no_free_slot_means_wait() {
        let busy = tokens([1]);
        let sequences = [sequence(0, &busy, Role::Fixed)];
        assert_eq!(place(&tokens([1, 2]), &sequences, 0), None);
    }

    #[test]
    fn a_slot_holding_the_prompt_with_an_old_time_reuses_it_past_the_time() {
        let old = tokens([1, 40, 2].into_iter().chain(100..200));
        let sequences = [sequence(0, &old, free(0, 5))];
        let placed = place(&tokens([1, 40, 3].into_iter().chain(100..200).chain([9])), &sequences, 32).unwrap();
        assert_eq!(placed.source, Source::Own);
        assert_eq!(placed.plan.chunks, [Chunk { from: 3, to: 3, len: 100 }]);
        assert_eq!(placed.plan.total(), 102);
    }

    #[test]
    fn an_entry_with_chunks_is_taken_and_one_with_a_prefix_is_copied() {
        let (house, empty) = (tokens([1, 2].into_iter().chain(100..200)), tokens([]));
        let sequences = [sequence(5, &house, Role::Entry), sequence(0, &empty, free(0, 1))];
        let changed = place(&tokens([1, 3].into_iter().chain(100..200).chain([9])), &sequences, 32).unwrap();
        assert_eq!(changed.source, Source::Take(5));
        assert_eq!(changed.plan.shifted(), 100);
        let extended = place(&tokens([1, 2].into_iter().chain(100..200).chain([9])), &sequences, 32).unwrap();
        assert_eq!(extended, prefix(0, 102, Source::Copy(5)), "an exact prefix is shared and the entry stays");
    }

    #[test]
    fn a_prompt_in_ram_is_restored_when_it_serves_best_and_not_at_a_tie() {
        let (house, empty) = (tokens([1, 2].into_iter().chain(100..200)), tokens([]));
        let in_ram = [CachedSequence { seq_id: -1, ..sequence(0, &house, Role::InRam(3)) }, sequence(0, &empty, free(0, 1))];
        let placed = place(&tokens([1, 3].into_iter().chain(100..200).chain([9])), &in_ram, 32).unwrap();
        assert_eq!((placed.slot, placed.source, placed.plan.total()), (0, Source::Restore(3), 101));
        let both = [
            sequence(7, &house, Role::Entry),
            CachedSequence { seq_id: -1, ..sequence(0, &house, Role::InRam(0)) },
            sequence(0, &empty, free(0, 1)),
        ];
        let placed = place(&tokens([1, 2].into_iter().chain(100..200).chain([9])), &both, 32).unwrap();
        assert_eq!(placed.source, Source::Copy(7));
    }

    #[test]
    fn chunks_are_never_moved_out_of_a_busy_slot_or_another_idle_slot() {
        let (house, empty) = (tokens([1, 2].into_iter().chain(100..200)), tokens([]));
        let prompt = tokens([1, 3].into_iter().chain(100..200).chain([9]));
        let busy = [sequence(0, &house, Role::Fixed), sequence(1, &empty, free(1, 1))];
        assert_eq!(place(&prompt, &busy, 32).unwrap(), prefix(1, 1, Source::Copy(0)));
        let shared = [CachedSequence { movable_from: 60, ..sequence(0, &house, Role::Entry) }, sequence(1, &empty, free(1, 1))];
        let placed = place(&prompt, &shared, 32).unwrap();
        assert_eq!(placed.plan.chunks, [Chunk { from: 60, to: 60, len: 42 }], "only cells nobody else holds move");
    }
}
