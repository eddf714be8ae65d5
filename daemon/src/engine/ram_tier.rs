//! The prompt cache's RAM tier: cached sequences evicted from the KV cache, kept as
//! llama.cpp's serialised sequence state.
//!
//! When cells run short, the worker evicts the cached sequences least worth keeping; rather
//! than lose them, it keeps their state here, within `prompt_cache_ram_mb`. A task whose
//! prompt one of them serves best has it restored into its slot (a copy of bytes, far faster
//! than decoding the tokens again) and taken out of here. At shutdown what is here is saved to
//! disk with the rest of the cache.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::schedule::worth;

/// At most this many prompts, however small: every placement considers each of them.
const MAX_ENTRIES: usize = 64;

pub struct RamEntry {
    pub tokens: Vec<LlamaToken>,
    /// `state_seq_get_data` of the sequence that held the tokens.
    pub state: Vec<u8>,
    pub last_used: Instant,
    pub hits: u32,
}

impl RamEntry {
    fn bytes(&self) -> usize {
        self.state.len() + self.tokens.len() * std::mem::size_of::<LlamaToken>()
    }

    fn worth(&self, now: Instant) -> f64 {
        worth(self.tokens.len(), self.hits, self.last_used, now)
    }
}

pub struct RamTier {
    entries: Vec<RamEntry>,
    budget_bytes: usize,
}

impl RamTier {
    pub fn new(budget_bytes: usize) -> RamTier {
        RamTier { entries: Vec::new(), budget_bytes }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(RamEntry::bytes).sum()
    }

    pub fn entries(&self) -> &[RamEntry] {
        &self.entries
    }

    /// Whether a prompt of `tokens` whose state takes `state_bytes` would be kept: asked
    /// before its state is serialised, which costs a copy of all its cells.
    pub fn would_keep(&self, tokens: usize, state_bytes: usize, last_used: Instant, hits: u32) -> bool {
        let bytes = state_bytes + tokens * std::mem::size_of::<LlamaToken>();
        if bytes > self.budget_bytes {
            return false;
        }
        if self.bytes() + bytes <= self.budget_bytes && self.entries.len() < MAX_ENTRIES {
            return true;
        }
        let now = Instant::now();
        let worth = worth(tokens, hits, last_used, now);
        self.entries.iter().any(|kept| kept.worth(now) < worth)
    }

    /// Keeps `entry`, first dropping entries whose tokens it extends, then the least worth
    /// keeping until everything fits (which may be `entry` itself). Returns whether it stayed.
    pub fn insert(&mut self, entry: RamEntry) -> bool {
        self.entries.retain(|kept| !entry.tokens.starts_with(&kept.tokens));
        self.entries.push(entry);
        let now = Instant::now();
        while self.bytes() > self.budget_bytes || self.entries.len() > MAX_ENTRIES {
            let least = (0..self.entries.len())
                .min_by(|&a, &b| self.entries[a].worth(now).total_cmp(&self.entries[b].worth(now)))
                .expect("over budget means not empty");
            let dropped = self.entries.remove(least);
            if least == self.entries.len() {
                tracing::debug!(tokens = dropped.tokens.len(), "prompt not kept in RAM: prompt_cache_ram_mb is full");
                return false;
            }
        }
        true
    }

    /// Takes entry `k` out (it is being restored into the KV cache).
    pub fn take(&mut self, k: usize) -> RamEntry {
        self.entries.remove(k)
    }

}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(ids: &[i32], state_bytes: usize, age_s: u64, hits: u32) -> RamEntry {
        RamEntry {
            tokens: ids.iter().copied().map(LlamaToken).collect(),
            state: vec![0; state_bytes],
            last_used: Instant::now() - Duration::from_secs(age_s),
            hits,
        }
    }

    #[test]
    fn entries_are_kept_within_the_budget_the_least_worth_going_first() {
        let mut tier = RamTier::new(1000);
        assert!(tier.insert(entry(&[1; 50], 400, 10, 3)));
        assert!(tier.insert(entry(&[2; 5], 300, 1, 0)));
        // 400 + 200 + 300 + token bytes is over: the short, unused prompt goes.
        assert!(tier.insert(entry(&[3; 40], 200, 1, 0)));
        let kept: Vec<i32> = tier.entries().iter().map(|entry| entry.tokens[0].0).collect();
        assert_eq!(kept, [1, 3]);
        assert!(tier.bytes() <= 1000);
    }

    #[test]
    fn an_entry_worth_less_than_all_the_others_is_not_kept() {
        let mut tier = RamTier::new(1000);
        assert!(tier.insert(entry(&[1; 100], 500, 1, 2)));
        assert!(!tier.insert(entry(&[2; 2], 300, 1, 0)));
        assert_eq!(tier.entries().len(), 1);
        assert!(!tier.insert(entry(&[3; 10], 5000, 0, 0)), "larger than the whole budget");
    }

    #[test]
    fn what_would_not_be_kept_is_known_before_it_is_serialised() {
        let mut tier = RamTier::new(1000);
        assert!(tier.would_keep(10, 500, Instant::now(), 0));
        assert!(!tier.would_keep(10, 2000, Instant::now(), 0), "larger than the budget");
        tier.insert(entry(&[1; 100], 500, 1, 2));
        assert!(!tier.would_keep(2, 300, Instant::now(), 0), "worth less than what it would push out");
        assert!(tier.would_keep(150, 300, Instant::now(), 5));
        let mut many = RamTier::new(1 << 30);
        for k in 0..MAX_ENTRIES + 5 {
            many.insert(entry(&[k as i32 + 1000; 40], 1, 1, 0));
        }
        assert_eq!(many.entries().len(), MAX_ENTRIES);
    }

    #[test]
    fn an_entry_replaces_those_it_extends_and_leaves_when_taken() {
        let mut tier = RamTier::new(10_000);
        tier.insert(entry(&[1, 2, 3], 10, 5, 0));
        tier.insert(entry(&[1, 2, 3, 4, 5], 10, 1, 0));
        assert_eq!(tier.entries().len(), 1);
        let taken = tier.take(0);
        assert_eq!(taken.tokens.len(), 5);
        assert_eq!(tier.bytes(), 0);
    }
}
