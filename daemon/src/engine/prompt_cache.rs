//! The prompt cache: where a new task's prompt is already in the KV cache.
//!
//! A slot keeps its tokens (prompt and reply) after its task ends. A new task goes to the
//! free slot whose tokens share the longest prefix with its prompt, or, when a busy slot or a
//! pinned prefix shares a longer one, that prefix is copied into a free slot (with the
//! unified KV cache a copy shares cells and costs nothing). Only the rest of the prompt is
//! decoded. At least the prompt's last token is always decoded, since its logits are needed.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

/// A sequence of the KV cache as placement sees it.
pub struct CachedSequence<'a> {
    pub seq_id: i32,
    pub tokens: &'a [LlamaToken],
    /// Free to take for a new task (an idle slot); busy slots and pinned prefixes can only be
    /// copied from.
    pub free_slot: Option<FreeSlot>,
}

#[derive(Clone, Copy)]
pub struct FreeSlot {
    pub index: usize,
    pub last_used: Instant,
}

/// Where a task runs and what of its prompt it finds cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The slot the task runs in.
    pub slot: usize,
    /// Prompt tokens already in the cache.
    pub reuse: usize,
    /// The sequence to copy the reused prefix from; `None` when the slot holds it itself.
    pub copy_from: Option<i32>,
}

/// Chooses a free slot for `prompt`; `None` when every slot is busy.
pub fn place(prompt: &[LlamaToken], sequences: &[CachedSequence<'_>]) -> Option<Placement> {
    let usable = prompt.len().saturating_sub(1);
    let shared = |tokens: &[LlamaToken]| common_prefix(tokens, prompt).min(usable);
    // A free slot whose cache is mostly this prompt's prefix is taken for it. Reusing a
    // sliver of a long cached sequence would throw the rest away instead.
    let own = sequences
        .iter()
        .filter_map(|sequence| sequence.free_slot.map(|free| (free, sequence.tokens, shared(sequence.tokens))))
        .filter(|(_, tokens, reuse)| *reuse > 0 && reuse * 2 >= tokens.len())
        .max_by_key(|(free, _, reuse)| (*reuse, free.last_used));
    let best_copy = |except: usize| {
        sequences
            .iter()
            .filter(|sequence| sequence.free_slot.is_none_or(|free| free.index != except))
            .map(|sequence| (sequence.seq_id, shared(sequence.tokens)))
            .max_by_key(|(_, reuse)| *reuse)
    };
    if let Some((free, _, reuse)) = own
        && best_copy(free.index).is_none_or(|(_, copied)| copied <= reuse)
    {
        return Some(Placement { slot: free.index, reuse, copy_from: None });
    }
    // Otherwise the slot whose cache is least likely to be wanted again (empty first, then
    // least recently used), with the longest prefix found anywhere copied into it.
    let (target, target_tokens) = sequences
        .iter()
        .filter_map(|sequence| sequence.free_slot.map(|free| (free, sequence.tokens)))
        .min_by_key(|(free, tokens)| (!tokens.is_empty(), free.last_used))
        .map(|(free, tokens)| (free.index, tokens))?;
    let kept = shared(target_tokens);
    Some(match best_copy(target) {
        Some((seq_id, reuse)) if reuse > kept => Placement { slot: target, reuse, copy_from: Some(seq_id) },
        _ => Placement { slot: target, reuse: kept, copy_from: None },
    })
}

pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use llama_cpp_2::token::LlamaToken;

    use super::*;

    fn tokens(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken).collect()
    }

    fn free(index: usize, age_s: u64) -> Option<FreeSlot> {
        let now = Instant::now() + Duration::from_secs(100);
        Some(FreeSlot { index, last_used: now - Duration::from_secs(age_s) })
    }

    #[test]
    fn the_slot_holding_the_longest_prefix_wins() {
        let (a, b) = (tokens(&[1, 2, 3, 4]), tokens(&[1, 2, 9]));
        let sequences = [
            CachedSequence { seq_id: 0, tokens: &b, free_slot: free(0, 1) },
            CachedSequence { seq_id: 1, tokens: &a, free_slot: free(1, 50) },
        ];
        let placed = place(&tokens(&[1, 2, 3, 4, 5]), &sequences).unwrap();
        assert_eq!(placed, Placement { slot: 1, reuse: 4, copy_from: None });
    }

    #[test]
    fn the_last_prompt_token_is_always_decoded() {
        let a = tokens(&[1, 2, 3]);
        let sequences = [CachedSequence { seq_id: 0, tokens: &a, free_slot: free(0, 1) }];
        assert_eq!(place(&a, &sequences).unwrap().reuse, 2);
    }

    #[test]
    fn a_longer_prefix_in_a_busy_slot_is_copied_into_the_least_recently_used_free_slot() {
        let (busy, recent, old) = (tokens(&[7, 7, 7, 7]), tokens(&[7, 1]), tokens(&[3]));
        let sequences = [
            CachedSequence { seq_id: 0, tokens: &busy, free_slot: None },
            CachedSequence { seq_id: 1, tokens: &recent, free_slot: free(1, 1) },
            CachedSequence { seq_id: 2, tokens: &old, free_slot: free(2, 60) },
        ];
        let placed = place(&tokens(&[7, 7, 7, 7, 8]), &sequences).unwrap();
        assert_eq!(placed, Placement { slot: 2, reuse: 4, copy_from: Some(0) });
    }

    #[test]
    fn a_new_prompt_takes_an_empty_slot_before_evicting_a_cache() {
        let (cached, empty) = (tokens(&[5, 6]), tokens(&[]));
        let sequences = [
            CachedSequence { seq_id: 0, tokens: &cached, free_slot: free(0, 90) },
            CachedSequence { seq_id: 1, tokens: &empty, free_slot: free(1, 1) },
        ];
        let placed = place(&tokens(&[1, 2]), &sequences).unwrap();
        assert_eq!(placed, Placement { slot: 1, reuse: 0, copy_from: None });
    }

    #[test]
    fn a_sliver_of_a_long_cache_is_not_worth_its_loss() {
        let (house, empty) = (tokens(&[1, 5, 5, 5, 5, 5]), tokens(&[]));
        let sequences = [
            CachedSequence { seq_id: 0, tokens: &house, free_slot: free(0, 1) },
            CachedSequence { seq_id: 1, tokens: &empty, free_slot: free(1, 9) },
        ];
        let placed = place(&tokens(&[1, 9, 9]), &sequences).unwrap();
        assert_eq!(placed, Placement { slot: 1, reuse: 1, copy_from: Some(0) }, "the house stays cached");
        // The prefix of a long idle cache is copied rather than the cache overwritten.
        let placed = place(&tokens(&[1, 5, 9]), &sequences).unwrap();
        assert_eq!(placed, Placement { slot: 1, reuse: 2, copy_from: Some(0) });
    }

    #[test]
    fn no_free_slot_means_wait() {
        let busy = tokens(&[1]);
        let sequences = [CachedSequence { seq_id: 0, tokens: &busy, free_slot: None }];
        assert_eq!(place(&tokens(&[1, 2]), &sequences), None);
    }
}
