//! The recent decode speed that `GetStatus`, `/metrics` and `phi3d status` show: tokens
//! generated per second over the last steps that only generated (no prompt in the batch), so
//! that a user can see a neighbour process slow the model down.

use std::collections::VecDeque;
use std::time::Duration;

/// Steps the speed is averaged over: a few seconds of decoding on a board.
const STEPS: usize = 32;

#[derive(Debug, Default)]
pub struct DecodeRate {
    steps: VecDeque<(usize, Duration)>,
}

impl DecodeRate {
    /// A step that generated `tokens` tokens (one per generating slot) in `took`, sampling
    /// included.
    pub fn record(&mut self, tokens: usize, took: Duration) {
        if self.steps.len() == STEPS {
            self.steps.pop_front();
        }
        self.steps.push_back((tokens, took));
    }

    /// Tokens per second over the recorded steps; 0 before the first.
    pub fn tokens_per_second(&self) -> f64 {
        let tokens: usize = self.steps.iter().map(|(tokens, _)| tokens).sum();
        let seconds: f64 = self.steps.iter().map(|(_, took)| took.as_secs_f64()).sum();
        if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_steps_only() {
        let mut rate = DecodeRate::default();
        assert_eq!(rate.tokens_per_second(), 0.0);
        for _ in 0..STEPS {
            rate.record(1, Duration::from_millis(100));
        }
        assert!((rate.tokens_per_second() - 10.0).abs() < 1e-9);
        // A neighbour arrives: steps take five times as long, and the old ones drop out.
        for _ in 0..STEPS {
            rate.record(1, Duration::from_millis(500));
        }
        assert!((rate.tokens_per_second() - 2.0).abs() < 1e-9);
    }
}
