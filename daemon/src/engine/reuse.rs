//! What of a cached sequence a new prompt can reuse: its common prefix, and after a changed
//! span, runs of cached tokens that reappear further on in the prompt.
//!
//! Real prompts change early and keep the rest: Home Assistant puts the time to the second at
//! the start of its system prompt, and drops old turns from the middle of a long
//! conversation. An exact-prefix cache re-reads everything after the first changed token.
//! Here the rest is matched in chunks: each chunk of at least `min_chunk` tokens that appears
//! in the prompt in the same order as in the cache is reused, its cells moved to the chunk's
//! new positions (llama.cpp's KV shift), and only the tokens between chunks are decoded.
//!
//! Unlike llama-server's `--cache-reuse`, which only skips text that was removed from the
//! cache, text that changed or was inserted in the prompt is decoded between the chunks.
//!
//! This is an approximation, and why `min_chunk` exists: a reused chunk's cells were computed
//! attending to the old text before it, not the new. The longer the chunk, the more of its
//! context it shares with what the model would have seen; short chunks would also match by
//! coincidence (a JSON key, an entity prefix) and scatter the cache.

use std::collections::HashMap;

use llama_cpp_2::token::LlamaToken;

/// Where a run of the prompt appears many times in the cache (a repeated line, a hostile
/// prompt of one token over and over), only this many of its places are tried, the first
/// after the last chunk: planning stays linear in the prompt's length.
const MAX_CANDIDATES: usize = 8;

/// At most this many chunks per prompt: each is one shift and one copy, and a prompt that
/// differs from the cache every few dozen tokens is not worth piecing together.
const MAX_CHUNKS: usize = 32;

/// Cached tokens `from..from + len` reused at prompt positions `to..to + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub from: usize,
    pub to: usize,
    pub len: usize,
}

impl Chunk {
    /// How far the chunk's positions move (positive: later in the prompt than in the cache).
    pub fn shift(&self) -> i32 {
        self.to as i32 - self.from as i32
    }
}

/// What a prompt reuses of one cached sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReusePlan {
    /// Tokens shared as an exact prefix.
    pub prefix: usize,
    /// Chunks after the first difference, in prompt order.
    pub chunks: Vec<Chunk>,
}

impl ReusePlan {
    /// Tokens reused after the prefix.
    pub fn shifted(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.len).sum()
    }

    /// Every prompt token not decoded again.
    pub fn total(&self) -> usize {
        self.prefix + self.shifted()
    }

    /// Only the common prefix.
    pub fn prefix_only(prefix: usize) -> ReusePlan {
        ReusePlan { prefix, chunks: Vec::new() }
    }
}

/// What of `cached` the prompt can reuse. The prompt's last token is never reused (its
/// logits are needed). Chunks are only taken from cached positions at or after `movable_from`
/// (cells before it are shared with other sequences, and moving them would move theirs) and
/// are at least `min_chunk` tokens; `min_chunk == 0` reuses the prefix only.
pub fn plan(cached: &[LlamaToken], prompt: &[LlamaToken], min_chunk: usize, movable_from: usize) -> ReusePlan {
    let usable = prompt.len().saturating_sub(1);
    let prefix = common_prefix(cached, prompt).min(usable);
    let mut plan = ReusePlan::prefix_only(prefix);
    if min_chunk == 0 {
        return plan;
    }
    let search_from = prefix.max(movable_from);
    if search_from + min_chunk > cached.len() {
        return plan;
    }
    // Where each run of `min_chunk` cached tokens starts.
    let mut starts: HashMap<&[LlamaToken], Vec<usize>> = HashMap::new();
    for from in search_from..=cached.len() - min_chunk {
        starts.entry(&cached[from..from + min_chunk]).or_default().push(from);
    }
    let (mut at, mut cached_from) = (prefix, search_from);
    while at + min_chunk <= usable && plan.chunks.len() < MAX_CHUNKS {
        let matches = starts.get(&prompt[at..at + min_chunk]).map_or(&[][..], Vec::as_slice);
        let after_last_chunk = &matches[matches.partition_point(|&from| from < cached_from)..];
        // Of the places this run appears in the cache after the last chunk, the one that
        // matches longest (the earliest of those), so that a common phrase does not skip text.
        let best = after_last_chunk
            .iter()
            .take(MAX_CANDIDATES)
            .map(|&from| (from, matching_run(&cached[from..], &prompt[at..usable])))
            .max_by_key(|&(from, len)| (len, std::cmp::Reverse(from)));
        match best {
            Some((from, len)) => {
                plan.chunks.push(Chunk { from, to: at, len });
                at += len;
                cached_from = from + len;
            }
            None => at += 1,
        }
    }
    plan
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    matching_run(a, b)
}

fn matching_run(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The order in which `chunks`' cells can be shifted one range at a time without a moved
/// range landing on cells a later shift selects: chunks moving later in the sequence from
/// the last one back, then chunks moving earlier from the first one on. (A range moving later
/// only lands past its old end, where only chunks already moved later can be; a range moving
/// earlier only lands before its old start, where only chunks already moved are.) Chunks
/// that do not move are left out.
pub fn shift_order(chunks: &[Chunk]) -> Vec<Chunk> {
    let later = chunks.iter().rev().filter(|chunk| chunk.shift() > 0);
    let earlier = chunks.iter().filter(|chunk| chunk.shift() < 0);
    later.chain(earlier).copied().collect()
}

#[cfg(test)]
mod tests {
    use llama_cpp_2::token::LlamaToken;

    use super::*;

    fn tokens(ids: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        ids.into_iter().map(LlamaToken).collect()
    }

    #[test]
    fn a_changed_time_at_the_start_reuses_everything_after_it() {
        // "Current time is 12:00:01." + 100 tokens of house, then the question.
        let cached = tokens([1, 50, 12, 0, 1].into_iter().chain(100..200).chain([7, 7]));
        let prompt = tokens([1, 50, 12, 0, 2].into_iter().chain(100..200).chain([8, 9]));
        let plan = plan(&cached, &prompt, 16, 0);
        assert_eq!(plan.prefix, 4);
        assert_eq!(plan.chunks, [Chunk { from: 5, to: 5, len: 100 }]);
        assert_eq!(plan.total(), 104);
    }

    #[test]
    fn a_longer_changed_span_shifts_what_follows() {
        let cached = tokens([1, 2].into_iter().chain(100..140).chain([5]));
        let prompt = tokens([1, 3, 3, 3].into_iter().chain(100..140).chain([6]));
        let plan = plan(&cached, &prompt, 8, 0);
        assert_eq!(plan.prefix, 1);
        assert_eq!(plan.chunks, [Chunk { from: 2, to: 4, len: 40 }]);
        assert_eq!(plan.chunks[0].shift(), 2);
    }

    #[test]
    fn a_dropped_turn_in_the_middle_is_skipped() {
        let cached = tokens((0..50).chain(500..530).chain(50..90));
        let prompt = tokens((0..50).chain(50..90).chain([999]));
        let plan = plan(&cached, &prompt, 10, 0);
        assert_eq!(plan.prefix, 50);
        assert_eq!(plan.chunks, [Chunk { from: 80, to: 50, len: 40 }]);
    }

    #[test]
    fn the_last_prompt_token_is_never_reused() {
        let cached = tokens([9].into_iter().chain(100..130));
        let prompt = tokens([8].into_iter().chain(100..130));
        let plan = plan(&cached, &prompt, 8, 0);
        assert_eq!(plan.chunks, [Chunk { from: 1, to: 1, len: 29 }]);
    }

    #[test]
    fn short_runs_and_a_zero_minimum_reuse_nothing_after_the_prefix() {
        let cached = tokens([1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let prompt = tokens([1, 0, 3, 4, 5, 0, 7, 8, 9, 10]);
        assert_eq!(plan(&cached, &prompt, 4, 0), ReusePlan::prefix_only(1));
        let long_cached = tokens(0..100);
        let long_prompt = tokens([5000].into_iter().chain(1..100).chain([7]));
        assert_eq!(plan(&long_cached, &long_prompt, 0, 0), ReusePlan::prefix_only(0));
    }

    #[test]
    fn cells_shared_with_other_sequences_are_not_moved() {
        let cached = tokens([1, 2].into_iter().chain(100..160));
        let prompt = tokens([1, 3].into_iter().chain(100..160).chain([4]));
        let plan = plan(&cached, &prompt, 8, 20);
        assert_eq!(plan.chunks, [Chunk { from: 20, to: 20, len: 42 }], "only what lies past position 20");
    }

    #[test]
    fn chunks_keep_their_order() {
        // The prompt swaps two blocks: only one of them can be reused in order.
        let cached = tokens((100..120).chain(200..220));
        let prompt = tokens((200..220).chain(100..120).chain([1]));
        let plan = plan(&cached, &prompt, 8, 0);
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.shifted(), 20);
    }

    #[test]
    fn a_common_phrase_does_not_pull_the_match_past_the_text() {
        // The run 10..14 appears early (a phrase) and again at the true continuation.
        let cached = tokens([0].into_iter().chain(10..14).chain([77]).chain(10..40));
        let prompt = tokens([1].into_iter().chain(10..40).chain([5]));
        let plan = plan(&cached, &prompt, 4, 0);
        assert_eq!(plan.chunks, [Chunk { from: 6, to: 1, len: 30 }]);
    }

    #[test]
    fn a_long_repetitive_prompt_is_planned_quickly() {
        // 100k tokens of one repeated short line against a cache of the same with a change
        // every 3125 tokens: every run has thousands of places in the cache.
        let line = [5, 6, 7, 8, 9, 10, 11];
        let cached = tokens((0..100_000).map(|k| line[k % line.len()]));
        let prompt = tokens((0..100_000).map(|k| if k % 3125 == 3 { 99 } else { line[k % line.len()] }));
        let started = std::time::Instant::now();
        let plan = plan(&cached, &prompt, 16, 0);
        assert!(plan.shifted() > 90_000, "{}", plan.shifted());
        assert!(plan.chunks.len() <= MAX_CHUNKS);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn shifts_are_ordered_so_that_no_range_lands_on_another() {
        let chunks = [
            Chunk { from: 10, to: 20, len: 5 },
            Chunk { from: 40, to: 30, len: 5 },
            Chunk { from: 50, to: 60, len: 5 },
            Chunk { from: 70, to: 70, len: 5 },
            Chunk { from: 80, to: 75, len: 5 },
        ];
        let order: Vec<usize> = shift_order(&chunks).iter().map(|chunk| chunk.from).collect();
        assert_eq!(order, [50, 10, 40, 80]);
        // Simulate the shifts over the cells' positions: each selection holds one chunk only.
        let mut positions: Vec<(usize, i32)> =
            chunks.iter().flat_map(|chunk| (0..chunk.len).map(move |k| (chunk.from, (chunk.from + k) as i32))).collect();
        for chunk in shift_order(&chunks) {
            let range = chunk.from as i32..(chunk.from + chunk.len) as i32;
            assert!(positions.iter().filter(|(_, pos)| range.contains(pos)).all(|(owner, _)| *owner == chunk.from));
            for (owner, pos) in positions.iter_mut() {
                if *owner == chunk.from {
                    *pos += chunk.shift();
                }
            }
        }
        for chunk in &chunks {
            let moved: Vec<i32> = positions.iter().filter(|(owner, _)| *owner == chunk.from).map(|(_, pos)| *pos).collect();
            assert_eq!(moved, (chunk.to as i32..(chunk.to + chunk.len) as i32).collect::<Vec<_>>());
        }
    }
}
