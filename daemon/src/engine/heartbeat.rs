//! The worker's heartbeat: a counter it advances on every pass of its loop, and whether it is
//! waiting for work. The systemd watchdog reads it to tell an idle engine from a wedged one.
//!
//! A pass is one admission round plus at most one decode step, so a worker with work advances
//! the counter at least once per decode; a worker blocked on an empty queue says so instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Heartbeat {
    beats: AtomicU64,
    idle: AtomicBool,
}

/// One reading of the heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pulse {
    pub beats: u64,
    /// The worker is blocked waiting for a task, with none in its slots.
    pub idle: bool,
}

impl Heartbeat {
    /// Called by the worker once per pass of its loop.
    pub fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by the worker around its blocking wait for a task.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    pub fn pulse(&self) -> Pulse {
        Pulse { beats: self.beats.load(Ordering::Relaxed), idle: self.idle.load(Ordering::SeqCst) }
    }
}

impl Pulse {
    /// Whether the worker did its job between `earlier` and this reading: it passed through its
    /// loop, or it is waiting for work.
    pub fn alive_since(self, earlier: Pulse) -> bool {
        self.idle || self.beats != earlier.beats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_alive_when_it_beats_or_waits() {
        let heart = Heartbeat::default();
        let first = heart.pulse();
        assert!(!heart.pulse().alive_since(first), "no beat, not waiting: wedged");
        heart.beat();
        assert!(heart.pulse().alive_since(first));
        let second = heart.pulse();
        heart.set_idle(true);
        assert!(heart.pulse().alive_since(second), "waiting for work is not a wedge");
    }
}
