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

/// After a draft of which nothing was kept, this many steps (doubling with each miss in a
/// row, up to [`MAX_PAUSE`]) go by without drafts: text that does not repeat its prompt pays
/// for few useless checks.
const FIRST_PAUSE: u32 = 1;
const MAX_PAUSE: u32 = 16;

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

/// One task's drafting: how long its drafts may be, adapted to how many were kept, and what
/// it drafted and kept, for its timings.
#[derive(Debug)]
pub struct Drafter {
    /// The configured longest draft; 0 turns drafting off.
    max: usize,
    /// The longest draft for the next step: grows while whole drafts are kept, shrinks to what
    /// was kept when a draft is cut short.
    length: usize,
    /// Steps left without drafts after misses.
    pause: u32,
    /// Misses in a row.
    misses: u32,
    pub drafted: u32,
    pub accepted: u32,
}

impl Drafter {
    pub fn new(max: usize) -> Drafter {
        Drafter { max, length: max.min(2), pause: 0, misses: 0, drafted: 0, accepted: 0 }
    }

    /// The draft to check behind `last`: at most `room` tokens (what max_tokens and the
    /// context leave).
    pub fn draft<T: Copy + Eq>(&mut self, seen: &[T], last: T, room: usize) -> Vec<T> {
        if self.max == 0 || room == 0 {
            return Vec::new();
        }
        if self.pause > 0 {
            self.pause -= 1;
            return Vec::new();
        }
        propose(seen, last, self.length.min(room)).to_vec()
    }

    /// Records that `accepted` of `drafted` drafted tokens were the sampler's picks.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        if accepted == drafted {
            self.misses = 0;
            self.length = (self.length * 2).min(self.max);
        } else if accepted == 0 {
            self.misses += 1;
            self.length = 1;
            self.pause = (FIRST_PAUSE << (self.misses - 1).min(8)).min(MAX_PAUSE);
        } else {
            self.misses = 0;
            self.length = (accepted + 1).min(self.max);
        }
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

    #[test]
    fn the_draft_length_follows_what_is_kept() {
        let seen = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 1];
        let mut drafter = Drafter::new(8);
        assert_eq!(drafter.draft(&seen, 2, 100), [3, 4]);
        drafter.record(2, 2);
        assert_eq!(drafter.draft(&seen, 2, 100).len(), 4);
        drafter.record(4, 4);
        assert_eq!(drafter.draft(&seen, 2, 100).len(), 8);
        drafter.record(8, 8);
        // Never past the configured maximum, nor past the room left.
        assert_eq!(drafter.draft(&seen, 2, 100).len(), 8);
        assert_eq!(drafter.draft(&seen, 2, 3).len(), 3);
        // Cut short: the next draft is one longer than what was kept.
        drafter.record(8, 3);
        assert_eq!(drafter.draft(&seen, 2, 100).len(), 4);
        assert_eq!((drafter.drafted, drafter.accepted), (22, 17));
    }

    #[test]
    fn misses_in_a_row_pause_drafting_longer_each_time() {
        let seen = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut drafter = Drafter::new(4);
        let mut paused = Vec::new();
        for _ in 0..6 {
            let draft = drafter.draft(&seen, 1, 100);
            assert!(!draft.is_empty());
            drafter.record(draft.len(), 0);
            let mut steps = 0;
            while drafter.draft(&seen, 1, 100).is_empty() {
                steps += 1;
            }
            paused.push(steps);
        }
        assert_eq!(paused, [1, 2, 4, 8, 16, 16]);
        // A kept token ends the run of misses.
        drafter.record(1, 1);
        drafter.record(2, 0);
        assert_eq!((0..).take_while(|_| drafter.draft(&seen, 1, 100).is_empty()).count(), 1);
    }

    #[test]
    fn a_maximum_of_zero_never_drafts() {
        let mut drafter = Drafter::new(0);
        assert!(drafter.draft(&[1, 2, 1], 2, 100).is_empty());
    }
}
