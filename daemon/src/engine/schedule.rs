//! The worker's decisions, apart from llama.cpp so that they can be tested: how far a task may
//! grow, whether it may start, which idle cache is evicted for it, and what goes into the next
//! batch. The worker gathers the facts, asks here, and carries the answer out.

use std::time::Instant;

/// The KV cells a task may come to hold: its prompt and `max_tokens` of reply, at most the
/// context. Admission reserves this much; the slot holds the task to it.
pub fn reservation(prompt_tokens: usize, max_tokens: u32, n_ctx: usize) -> usize {
    (prompt_tokens + max_tokens as usize).min(n_ctx)
}

/// Whether a task may start once the worker has evicted what it could for it: when its
/// reservation fits, or when no other task runs (alone, it gets what there is, and its
/// generation ends when the context is full).
pub fn may_start(fits: bool, busy_slots: usize) -> bool {
    fits || busy_slots == 0
}

/// A cached sequence (an idle slot's or a cache entry's) as eviction sees it.
#[derive(Debug, Clone, Copy)]
pub struct CacheHolder {
    pub busy: bool,
    pub last_used: Instant,
    /// Cells no other sequence shares: what evicting it frees.
    pub exclusive_cells: u32,
    /// Tokens it holds: what a hit on it saves.
    pub tokens: usize,
    /// Times a task reused it.
    pub hits: u32,
}

impl CacheHolder {
    fn worth(&self, now: Instant) -> f64 {
        worth(self.tokens, self.hits, self.last_used, now)
    }
}

/// What keeping a cached prompt is worth, wherever it is kept (KV cells, RAM): the tokens it
/// saves, once per hit and once more for the hit to come, fading with the minutes since it was
/// last used (a prefix used every few minutes outweighs a burst of short prompts; one unused
/// for an hour does not).
pub fn worth(tokens: usize, hits: u32, last_used: Instant, now: Instant) -> f64 {
    let idle_minutes = now.saturating_duration_since(last_used).as_secs_f64() / 60.0;
    tokens as f64 * f64::from(1 + hits) / (1.0 + idle_minutes / 5.0)
}

/// The cache that goes first: the least worth keeping among those that are idle and whose
/// eviction frees cells, never one in `keep` (what the task being admitted reuses). `None`
/// when nothing can go.
pub fn victim(holders: &[CacheHolder], keep: &[usize]) -> Option<usize> {
    let now = Instant::now();
    holders
        .iter()
        .enumerate()
        .filter(|(index, holder)| !keep.contains(index) && !holder.busy && holder.exclusive_cells > 0)
        .min_by(|(_, a), (_, b)| a.worth(now).total_cmp(&b.worth(now)))
        .map(|(index, _)| index)
}

/// What a slot wants decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Idle, or waiting to sample.
    Nothing,
    /// The token it sampled last, and behind it a draft of this many tokens to check.
    Token { drafts: usize },
    /// This many prompt tokens still to read.
    Prompt(usize),
}

/// The next batch, as (slot, tokens) in the order they are added: first one token from every
/// generating slot, then their drafts, then the rest of `batch_size` shared among the slots
/// still reading their prompt, each taking at most an even share of what is left. Every round
/// starts at `cursor`, which the worker moves on every step, so that every slot gets its turn
/// at the front.
pub fn plan_batch(needs: &[Need], cursor: usize, batch_size: usize) -> Vec<(usize, usize)> {
    let count = needs.len();
    let order: Vec<usize> = (0..count).map(|k| (cursor + k) % count).collect();
    let mut budget = batch_size;
    let mut plan = Vec::new();
    for &index in &order {
        if matches!(needs[index], Need::Token { .. }) && budget > 0 {
            budget -= 1;
            plan.push((index, 1));
        }
    }
    // A draft is a guess; the token sampled last is not: every generating slot has its token
    // in before any draft.
    for (index, tokens) in &mut plan {
        let Need::Token { drafts } = needs[*index] else { continue };
        let take = drafts.min(budget);
        budget -= take;
        *tokens += take;
    }
    let mut readers = order.iter().filter(|&&index| matches!(needs[index], Need::Prompt(_))).count();
    for &index in &order {
        let Need::Prompt(left) = needs[index] else { continue };
        if budget == 0 {
            break;
        }
        let share = budget.div_ceil(readers);
        readers -= 1;
        let take = share.min(left);
        if take > 0 {
            budget -= take;
            plan.push((index, take));
        }
    }
    plan
}

/// When a batch cannot be decoded even after eviction, the slot with the largest share of it
/// fails alone (it is the likeliest cause, and the rest may then fit): its place in `sizes`.
pub fn largest(sizes: &[usize]) -> Option<usize> {
    (0..sizes.len()).max_by_key(|&k| sizes[k])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_reservation_is_the_prompt_and_reply_within_the_context() {
        assert_eq!(reservation(100, 50, 4096), 150);
        assert_eq!(reservation(4000, 512, 4096), 4096);
    }

    #[test]
    fn a_task_that_does_not_fit_waits_unless_it_would_run_alone() {
        assert!(may_start(true, 3));
        assert!(!may_start(false, 1));
        assert!(may_start(false, 0));
    }

    fn holder(busy: bool, age_s: u64, exclusive_cells: u32, tokens: usize, hits: u32) -> CacheHolder {
        CacheHolder { busy, last_used: Instant::now() - Duration::from_secs(age_s), exclusive_cells, tokens, hits }
    }

    #[test]
    fn the_idle_cache_least_worth_keeping_that_frees_cells_goes_first() {
        let holders = [
            holder(false, 10, 5, 100, 0),
            holder(true, 90, 5, 1, 0),
            holder(false, 60, 0, 1, 0),
            holder(false, 30, 5, 10, 0),
        ];
        assert_eq!(victim(&holders, &[]), Some(3), "busy slots and shared-only caches stay");
        assert_eq!(victim(&holders, &[3]), Some(0), "what the task reuses stays");
        assert_eq!(victim(&holders, &[3, 0]), None);
        assert_eq!(victim(&[holder(true, 1, 5, 9, 0), holder(false, 1, 0, 9, 0)], &[]), None);
    }

    #[test]
    fn a_long_often_used_prefix_outlasts_a_burst_of_short_prompts() {
        let house = holder(false, 120, 900, 909, 3);
        let burst: Vec<CacheHolder> = (0..4).map(|_| holder(false, 1, 40, 40, 0)).collect();
        let holders: Vec<CacheHolder> = std::iter::once(house).chain(burst).collect();
        assert_ne!(victim(&holders, &[]), Some(0));
        // An hour later and never used again, it goes before a fresh short prompt.
        let stale = [holder(false, 3600 * 24, 900, 909, 0), holder(false, 1, 40, 40, 0)];
        assert_eq!(victim(&stale, &[]), Some(0));
    }

    #[test]
    fn generating_slots_come_first_then_readers_share_the_rest() {
        let token = Need::Token { drafts: 0 };
        let needs = [Need::Prompt(100), token, Need::Nothing, token, Need::Prompt(3)];
        assert_eq!(plan_batch(&needs, 0, 10), [(1, 1), (3, 1), (0, 4), (4, 3)]);
        // A short prompt leaves its share to the next reader.
        assert_eq!(plan_batch(&needs, 4, 10), [(1, 1), (3, 1), (4, 3), (0, 5)]);
    }

    #[test]
    fn drafts_come_after_every_sampled_token_and_before_prompts() {
        let needs = [Need::Token { drafts: 4 }, Need::Prompt(100), Need::Token { drafts: 0 }, Need::Token { drafts: 8 }];
        assert_eq!(plan_batch(&needs, 0, 20), [(0, 5), (2, 1), (3, 9), (1, 5)]);
        // A small batch cuts the drafts, never a sampled token.
        assert_eq!(plan_batch(&needs, 3, 6), [(3, 4), (0, 1), (2, 1)]);
    }

    #[test]
    fn the_batch_never_exceeds_its_size_and_the_cursor_rotates_the_front() {
        let needs = [Need::Token { drafts: 0 }; 3];
        assert_eq!(plan_batch(&needs, 1, 2), [(1, 1), (2, 1)]);
        assert_eq!(plan_batch(&needs, 2, 2), [(2, 1), (0, 1)]);
        let readers = [Need::Prompt(50), Need::Prompt(50)];
        let plan = plan_batch(&readers, 0, 7);
        assert_eq!(plan, [(0, 4), (1, 3)]);
        assert!(plan_batch(&[Need::Nothing, Need::Nothing], 0, 8).is_empty());
    }

    #[test]
    fn the_largest_share_fails_first() {
        assert_eq!(largest(&[1, 7, 3]), Some(1));
        assert_eq!(largest(&[]), None);
    }
}
