//! Drafts from the prompt (lookup decoding): guesses of the next tokens, found where the last
//! few tokens appeared before in the prompt or the reply, and how many to guess.
//!
//! A home's replies repeat what its prompts hold (entity ids and names, the keys of a tool
//! call, the user's words). Decoding one token reads every weight from memory, and a Pi's
//! decode is bound by that; checking several guessed tokens in the same decode costs little
//! more. The worker decodes the token sampled last with the draft behind it, samples each
//! position in turn with the task's own sampler, and keeps drafted tokens only while they are
//! the tokens the sampler picked: the text is the one plain decoding gives.
//!
//! This module only guesses and adapts; it never knows about the KV cache or the sampler.
//! Hand-written: the search is a few lines over the slot's own tokens, and no crate offers
//! prompt lookup without a model or an index to keep in step with the sequence.

/// The longest run of recent tokens looked for; a longer match is more likely to continue the
/// same way, and the longest match found wins.
const NGRAM_MAX: usize = 4;

/// How fast the estimate of how often a drafted token is kept follows the text: the weight of
/// each new observation. A reply turns from free text to a copied list and back within tens
/// of tokens.
const KEEP_RATE_STEP: f64 = 0.15;

/// Up to `max` tokens that followed the latest earlier occurrence of the longest suffix (at
/// most [`NGRAM_MAX`] tokens) of `seen` followed by `last`. Empty when `last` never appeared
/// with a successor.
pub fn propose<T: Copy + Eq>(seen: &[T], last: T, max: usize) -> &[T] {
    if max == 0 || seen.is_empty() {
        return &[];
    }
    // The suffix to find ends with `last`, which is not in `seen`: `at(k)` is the suffix's
    // k-th token from its end.
    let at = |k: usize| if k == 0 { Some(last) } else { seen.len().checked_sub(k).map(|i| seen[i]) };
    let mut best: Option<(usize, usize)> = None;
    // `end` is where a candidate occurrence ends in `seen`; its continuation starts after it,
    // so the last position cannot end one.
    for end in (0..seen.len() - 1).rev() {
        let mut length = 0;
        while length < NGRAM_MAX && length <= end && at(length) == Some(seen[end - length]) {
            length += 1;
        }
        if length > best.map_or(0, |(_, best_length)| best_length) {
            best = Some((end, length));
            if length == NGRAM_MAX {
                break;
            }
        }
    }
    let Some((end, _)) = best else { return &[] };
    let from = end + 1;
    &seen[from..(from + max).min(seen.len())]
}

/// What decoding a batch of n generated tokens takes, measured: the worker records every
/// decode that only generated, and drafting asks what a step with a draft costs against one
/// without. Where decode waits on memory (a Pi), a few more tokens cost little more; where it
/// waits on arithmetic (a small x86 machine), each costs most of a token, and drafts rarely
/// pay.
#[derive(Debug)]
pub struct DecodeCost {
    /// Moving average of milliseconds per decode, by tokens in the batch (index 0 unused).
    ms: Vec<Option<f64>>,
}

impl DecodeCost {
    /// For batches of up to `max_tokens` tokens.
    pub fn new(max_tokens: usize) -> DecodeCost {
        DecodeCost { ms: vec![None; max_tokens + 1] }
    }

    pub fn record(&mut self, tokens: usize, elapsed: std::time::Duration) {
        let Some(slot) = self.ms.get_mut(tokens).filter(|_| tokens > 0) else { return };
        let ms = elapsed.as_secs_f64() * 1000.0;
        *slot = Some(slot.map_or(ms, |average| average + 0.2 * (ms - average)));
    }

    /// Whether a decode of one generated token has been measured: what every draft is weighed
    /// against.
    pub fn knows_one_token(&self) -> bool {
        self.ms.get(1).copied().flatten().is_some()
    }

    /// A decode of `tokens` tokens against one of a single token. A size not measured yet is
    /// extrapolated from the nearest measured size below it (each more token costing what
    /// each did there), or, with none, guessed to favour drafting a little (each more token a
    /// tenth of one), so that the lengths drafting would use get measured.
    pub fn relative(&self, tokens: usize) -> f64 {
        let measured = |n: usize| self.ms.get(n).copied().flatten();
        let Some(single) = measured(1).filter(|&single| single > 0.0) else {
            return 1.0 + 0.1 * tokens.saturating_sub(1) as f64;
        };
        if let Some(batch) = measured(tokens) {
            return batch / single;
        }
        let below = (2..tokens.min(self.ms.len())).rev().find_map(|n| measured(n).map(|ms| (n, ms / single)));
        let per_token = below.map_or(0.1, |(n, relative)| (relative - 1.0) / (n - 1) as f64);
        1.0 + per_token * tokens.saturating_sub(1) as f64
    }
}

/// One task's drafting: how likely a drafted token is to be kept, the draft length that pays
/// best for that and for what a longer decode costs, and what it drafted and kept, for its
/// timings.
#[derive(Debug)]
pub struct Drafter<T> {
    /// The configured longest draft; 0 turns drafting off.
    max: usize,
    /// How often a drafted token is the sampler's pick, learned from drafts and from guesses
    /// made but not sent (compared with the token sampled next, at no cost).
    keep_rate: f64,
    /// The first token of a draft not sent this step, to compare with the next sampled token.
    unsent: Option<T>,
    pub drafted: u32,
    pub accepted: u32,
}

impl<T: Copy + Eq> Drafter<T> {
    pub fn new(max: usize) -> Drafter<T> {
        Drafter { max, keep_rate: 0.5, unsent: None, drafted: 0, accepted: 0 }
    }

    /// The draft to check behind `last`: at most `room` tokens (what max_tokens and the
    /// context leave), and only as many as pay for their share of the decode.
    pub fn draft(&mut self, seen: &[T], last: T, room: usize, cost: &DecodeCost) -> Vec<T> {
        self.unsent = None;
        if self.max == 0 || room == 0 {
            return Vec::new();
        }
        let proposal = propose(seen, last, self.max.min(room));
        // Steps without drafts measure the single token's decode first, so that the guess at
        // what drafts cost is never all there is to weigh them against.
        let length = if cost.knows_one_token() { self.paying_length(proposal.len(), cost) } else { 0 };
        if length == 0 {
            self.unsent = proposal.first().copied();
        }
        proposal[..length].to_vec()
    }

    /// The draft length, up to `available`, with the most tokens expected per unit of decode
    /// time; 0 when no draft beats decoding one token. A drafted token is kept only when every
    /// one before it was, so a draft of k keeps 1 + r + ... + r^k tokens (the sampled one
    /// included) at keep rate r.
    fn paying_length(&self, available: usize, cost: &DecodeCost) -> usize {
        let mut best = (0, 1.0);
        let mut expected = 1.0;
        let mut kept_all = 1.0;
        for length in 1..=available {
            kept_all *= self.keep_rate;
            expected += kept_all;
            let per_cost = expected / cost.relative(length + 1);
            if per_cost > best.1 {
                best = (length, per_cost);
            }
        }
        best.0
    }

    /// Records that `accepted` of `drafted` drafted tokens were the sampler's picks, or, when
    /// nothing was drafted, compares the guess not sent with `sampled`, the token picked next.
    pub fn record(&mut self, drafted: usize, accepted: usize, sampled: Option<T>) {
        if drafted == 0 {
            if let (Some(guess), Some(sampled)) = (self.unsent.take(), sampled) {
                self.observe(guess == sampled);
            }
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        for _ in 0..accepted {
            self.observe(true);
        }
        // Past the first rejected token nothing was observed.
        if accepted < drafted {
            self.observe(false);
        }
    }

    fn observe(&mut self, kept: bool) {
        self.keep_rate += KEEP_RATE_STEP * (f64::from(u8::from(kept)) - self.keep_rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_latest_match_gives_what_followed_it() {
        //            0  1  2  3  4  5  6  7  8  9
        let seen = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2];
        // "2 3" occurs at 1-2 and 4-5; the latest is followed by 7 8 5.
        assert_eq!(propose(&seen, 3, 3), [7, 8, 5]);
        // "1 2 3" is longer than "2 3", and only at the start.
        let seen = [1, 2, 3, 4, 2, 3, 6, 1, 2];
        assert_eq!(propose(&seen, 3, 2), [4, 2]);
        // The draft stops where `seen` ends.
        assert_eq!(propose(&[5, 6, 7, 5], 6, 8), [7, 5]);
    }

    #[test]
    fn nothing_is_proposed_without_a_match_or_room() {
        assert!(propose(&[1, 2, 3], 4, 4).is_empty());
        assert!(propose(&[1, 2, 3], 1, 0).is_empty());
        assert!(propose::<u32>(&[], 1, 4).is_empty());
        // The last seen token has no successor yet.
        assert!(propose(&[1, 2, 3], 3, 4).is_empty());
    }

    #[test]
    fn a_long_repetitive_history_is_searched_quickly() {
        let seen: Vec<u32> = (0..200_000).map(|i| i % 7).collect();
        let started = std::time::Instant::now();
        // "2 4" never occurs: every search reads the whole history, and takes the latest "4".
        for _ in 0..100 {
            assert_eq!(propose(&seen, 4, 3), [5, 6, 0]);
        }
        // A step's decode takes tens of milliseconds at best; a search must not count beside it.
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    /// Decode costs as measured: `extra` of one token's time for each token past the first.
    fn costs(extra: f64) -> DecodeCost {
        let mut cost = DecodeCost::new(33);
        for tokens in 1..=33 {
            let ms = 100.0 * (1.0 + extra * (tokens - 1) as f64);
            cost.record(tokens, std::time::Duration::from_secs_f64(ms / 1000.0));
        }
        cost
    }

    #[test]
    fn where_more_tokens_cost_little_long_drafts_pay() {
        // A memory-bound board: each more token costs 5% of one.
        let cheap = costs(0.05);
        let seen: Vec<u32> = (0..40).chain(0..3).collect();
        let mut drafter = Drafter::new(8);
        // Half the drafted tokens kept (the prior): a few pay.
        let first = drafter.draft(&seen, 3, 100, &cheap);
        assert_eq!(first, [4, 5, 6]);
        // Kept whole, drafts grow to the configured maximum.
        drafter.record(3, 3, None);
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let draft = drafter.draft(&seen, 3, 100, &cheap);
            drafter.record(draft.len(), draft.len(), None);
            lengths.push(draft.len());
        }
        assert!(lengths.windows(2).all(|pair| pair[0] <= pair[1]) && lengths[2] == 8, "{lengths:?}");
        // Never past the room left, nor past what the history holds.
        assert_eq!(drafter.draft(&seen, 3, 3, &cheap), [4, 5, 6]);
        assert_eq!(drafter.draft(&seen, 38, 100, &cheap), [39, 0, 1, 2]);
        assert_eq!(drafter.drafted, drafter.accepted);
    }

    #[test]
    fn where_each_token_costs_most_of_one_only_likely_drafts_are_sent() {
        // A compute-bound machine: each more token costs 70% of one (measured on 2 x86 cores).
        let dear = costs(0.7);
        let seen: Vec<u32> = (0..40).chain(0..3).collect();
        let mut drafter = Drafter::new(8);
        // Half the drafted tokens kept (the prior): no draft pays.
        assert!(drafter.draft(&seen, 3, 100, &dear).is_empty());
        // The guess not sent is compared with what the sampler picks: right every time, the
        // keep rate rises until a short draft pays.
        let mut steps = 0;
        while drafter.draft(&seen, 3, 100, &dear).is_empty() {
            drafter.record(0, 0, Some(4));
            steps += 1;
            assert!(steps < 30, "drafting never resumed");
        }
        let draft = drafter.draft(&seen, 3, 100, &dear);
        assert!((1..=3).contains(&draft.len()), "{draft:?}");
        // Drafts cut at their first token bring the rate down again.
        for _ in 0..10 {
            let sent = drafter.draft(&seen, 3, 100, &dear).len();
            drafter.record(sent, 0, Some(99));
        }
        assert!(drafter.draft(&seen, 3, 100, &dear).is_empty());
        // Nothing is drafted before one token's decode is measured; batches not yet measured
        // are guessed to cost a little more than one token, so that they get measured.
        let mut unmeasured = DecodeCost::new(33);
        assert!(Drafter::new(8).draft(&seen, 3, 100, &unmeasured).is_empty());
        unmeasured.record(1, std::time::Duration::from_millis(100));
        assert_eq!(Drafter::new(8).draft(&seen, 3, 100, &unmeasured).len(), 2);
    }

    #[test]
    fn costs_are_measured_relative_to_one_token() {
        let mut cost = DecodeCost::new(8);
        assert!((cost.relative(3) - 1.2).abs() < 1e-9, "the guess before any measurement");
        cost.record(1, std::time::Duration::from_millis(200));
        cost.record(3, std::time::Duration::from_millis(500));
        assert!((cost.relative(3) - 2.5).abs() < 1e-9);
        // A moving average: one slow step moves it a fifth of the way.
        cost.record(3, std::time::Duration::from_millis(1000));
        assert!((cost.relative(3) - 3.0).abs() < 1e-9);
        // Batches longer than the table are not recorded.
        cost.record(50, std::time::Duration::from_millis(1));
        // A size not measured costs per token what the nearest measured one below did.
        assert!((cost.relative(5) - 5.0).abs() < 1e-9, "{}", cost.relative(5));
        assert!((cost.relative(2) - 1.1).abs() < 1e-9, "nothing measured below 2: the guess");
    }

    #[test]
    fn a_maximum_of_zero_never_drafts() {
        let mut drafter = Drafter::new(0);
        assert!(drafter.draft(&[1, 2, 1], 2, 100, &costs(0.0)).is_empty());
    }
}
