//! How many threads the next decode gets: fixed when the configuration says so, otherwise
//! chosen from what the worker observes, so that phi3d stays as fast as the best fixed count
//! would be when other programs share the cores.
//!
//! llama.cpp's threads meet at a barrier after every operation of a decode step (hundreds per
//! token). When a neighbour process takes one of the cores, the thread that shares that core
//! with it is descheduled for whole time slices while the others wait at the barrier, so on a
//! board with two busy cores one thread decodes faster than two. No fixed count is right for
//! both an idle and a shared board, and what a neighbour will do cannot be known in advance:
//! the governor measures instead. It keeps a count per kind of step (one token, which
//! llama.cpp runs with `n_threads`, or a batch, which it runs with `n_threads_batch`) and
//! tries a neighbouring count for a few steps (a probe) when
//!
//! - the steps at the current count became much slower than they were (a neighbour came),
//! - cores were idle while it ran with fewer threads than its maximum (a neighbour left), or
//! - nothing was tried for a long while (a safety net; it costs about 1 % when idle),
//!
//! and keeps whichever count was faster. Step times are compared only between steps of
//! similar size, and always as medians, because a bursty neighbour makes single steps noisy.
//! This module only decides; the worker applies the counts and reports the timings.

use std::time::Duration;

/// The configuration's word on threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadPolicy {
    /// Exactly this many, never changed (`threads` set in the configuration).
    Fixed(u32),
    /// Between 1 and `max`, chosen by measurement (the default).
    Adaptive { max: u32 },
}

impl ThreadPolicy {
    /// `threads` from the configuration: a count fixes it; without one, adaptive up to the
    /// physical cores, and no more than this process may use (its CPU affinity, as systemd's
    /// `CPUAffinity=` sets it, and its cgroup's quota, as `CPUQuota=` does; the standard
    /// library reads both).
    pub fn from_setting(threads: Option<u32>) -> ThreadPolicy {
        match threads {
            Some(count) => ThreadPolicy::Fixed(count),
            None => {
                let allowed = std::thread::available_parallelism().map_or(1, |count| count.get());
                let max = num_cpus::get_physical().min(allowed).max(1);
                ThreadPolicy::Adaptive { max: max as u32 }
            }
        }
    }

    /// The most threads a decode may use.
    pub fn max(self) -> u32 {
        match self {
            ThreadPolicy::Fixed(count) | ThreadPolicy::Adaptive { max: count } => count.max(1),
        }
    }

    pub fn is_adaptive(self) -> bool {
        matches!(self, ThreadPolicy::Adaptive { .. })
    }
}

impl std::fmt::Display for ThreadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadPolicy::Fixed(count) => write!(f, "{count} (fixed)"),
            ThreadPolicy::Adaptive { max } => write!(f, "1 to {max} (adaptive)"),
        }
    }
}

/// Which of llama.cpp's two thread counts a step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// One token in the batch: `n_threads` (one reply being generated).
    Single,
    /// More than one: `n_threads_batch` (prompts, several replies at once).
    Batch,
}

impl StepKind {
    pub fn of(tokens: usize) -> StepKind {
        if tokens <= 1 { StepKind::Single } else { StepKind::Batch }
    }
}

/// Steps timed at a count before a probe may compare against them.
const WINDOW: usize = 5;
/// Steps run at the candidate count in a probe (the first one after a change is not timed:
/// it may pay for starting threads).
const PROBE_STEPS: usize = 4;
/// A candidate must be this much faster to be kept, so that noise does not flip the count.
const KEEP_IF_FASTER: f64 = 0.93;
/// Steps this much slower than after the last probe mean the board changed. A neighbour on one
/// of two cores makes steps 2 to 5 times slower; an idle machine's own drift stays well below.
const SLOWER: f64 = 1.5;
/// Steps between probes triggered by idle cores: doubled after each probe that changed
/// nothing, back to the minimum after one that did.
const MIN_COOLDOWN: u32 = 8;
/// At most this many steps go by without a probe.
const MAX_INTERVAL: u32 = 400;
/// Idle cores, averaged over the steps since the last look, that suggest one more thread.
const IDLE_CORES_FOR_MORE: f64 = 0.6;

/// The thread counts to decode with, per kind of step.
#[derive(Debug)]
pub struct ThreadGovernor {
    policy: ThreadPolicy,
    single: Chooser,
    batch: Chooser,
}

impl ThreadGovernor {
    pub fn new(policy: ThreadPolicy) -> ThreadGovernor {
        let max = policy.max();
        ThreadGovernor { policy, single: Chooser::new(max), batch: Chooser::new(max) }
    }

    pub fn policy(&self) -> ThreadPolicy {
        self.policy
    }

    /// The counts to set before the next decode: (`n_threads`, `n_threads_batch`).
    pub fn counts(&self) -> (u32, u32) {
        (self.single.in_use(), self.batch.in_use())
    }

    /// Tells the governor how long a decode of `tokens` tokens took, and how many cores stood
    /// idle meanwhile (None where that cannot be read).
    pub fn observe(&mut self, tokens: usize, took: Duration, idle_cores: Option<f64>) {
        if !self.policy.is_adaptive() || tokens == 0 {
            return;
        }
        let chooser = match StepKind::of(tokens) {
            StepKind::Single => &mut self.single,
            StepKind::Batch => &mut self.batch,
        };
        chooser.observe(size_class(tokens), took.as_secs_f64(), idle_cores);
    }
}

/// Steps whose sizes are within a factor of about two are compared with each other.
fn size_class(tokens: usize) -> u32 {
    usize::BITS - tokens.max(1).leading_zeros()
}

/// One thread count, chosen by probing its neighbours.
#[derive(Debug)]
struct Chooser {
    max: u32,
    current: u32,
    /// Recent step times at `current`, with their size class, newest last.
    recent: Vec<(u32, f64)>,
    /// The median step time per size class when the count was last confirmed.
    reference: Vec<(u32, f64)>,
    probe: Option<Probe>,
    since_probe: u32,
    cooldown: u32,
    /// Whether the next periodic probe goes up rather than down (alternates when both exist).
    next_up: bool,
    /// After a probe that changed the count, the next count in the same direction is tried
    /// as soon as the new one is measured: with more than two cores, the best count may be
    /// several steps away.
    follow_up: Option<u32>,
}

#[derive(Debug)]
struct Probe {
    candidate: u32,
    class: u32,
    /// The current count's median in this class, measured just before.
    baseline: f64,
    /// Steps already run at the candidate (the first is not timed).
    steps: usize,
    times: Vec<f64>,
}

impl Chooser {
    fn new(max: u32) -> Chooser {
        Chooser {
            max,
            current: max,
            recent: Vec::new(),
            reference: Vec::new(),
            probe: None,
            // The first measured steps are compared with one thread fewer at once: the board
            // may be busy from the start, and then no step would ever look slower than before.
            since_probe: MAX_INTERVAL,
            cooldown: MIN_COOLDOWN,
            next_up: false,
            follow_up: None,
        }
    }

    fn in_use(&self) -> u32 {
        self.probe.as_ref().map_or(self.current, |probe| probe.candidate)
    }

    fn observe(&mut self, class: u32, seconds: f64, idle_cores: Option<f64>) {
        if let Some(probe) = &mut self.probe {
            if probe.class != class {
                // A step of another size tells nothing about this probe; it still ran at the
                // candidate, so it is not the current count's either.
                return;
            }
            probe.steps += 1;
            if probe.steps > 1 {
                probe.times.push(seconds);
            }
            if probe.times.len() >= PROBE_STEPS {
                self.settle();
            }
            return;
        }
        self.recent.push((class, seconds));
        if self.recent.len() > 4 * WINDOW {
            self.recent.remove(0);
        }
        self.since_probe = self.since_probe.saturating_add(1);
        let Some(now) = self.median_of(class) else { return };
        let reference = match self.reference.iter().find(|(c, _)| *c == class) {
            Some((_, time)) => *time,
            None => {
                // The first steps of a size: they become its reference.
                self.reference.push((class, now));
                now
            }
        };
        let slower = now > reference * SLOWER;
        let idle = idle_cores.is_some_and(|idle| idle >= IDLE_CORES_FOR_MORE);
        let follow_up = self.follow_up.take().filter(|&count| (1..=self.max).contains(&count));
        let (candidate, why) = if follow_up.is_some() {
            (follow_up, "the last change helped")
        } else if slower && self.current > 1 && self.since_probe >= MIN_COOLDOWN {
            (Some(self.current - 1), "steps got slower")
        } else if idle && self.current < self.max && self.since_probe >= self.cooldown {
            (Some(self.current + 1), "cores stood idle")
        } else if self.since_probe >= MAX_INTERVAL {
            (self.periodic_candidate(), "a periodic look")
        } else {
            (None, "")
        };
        if let Some(candidate) = candidate {
            tracing::debug!(from = self.current, to = candidate, median_s = now, reference_s = reference, "trying a thread count: {why}");
            self.probe = Some(Probe { candidate, class, baseline: now, steps: 0, times: Vec::new() });
        }
    }

    fn periodic_candidate(&mut self) -> Option<u32> {
        let up = self.current < self.max;
        let down = self.current > 1;
        let go_up = match (up, down) {
            (true, true) => {
                self.next_up = !self.next_up;
                !self.next_up
            }
            (true, false) => true,
            (false, true) => false,
            (false, false) => return None,
        };
        Some(if go_up { self.current + 1 } else { self.current - 1 })
    }

    /// Ends a probe: keeps the candidate if it was clearly faster.
    fn settle(&mut self) {
        let probe = self.probe.take().expect("settle follows a probe");
        let measured = median(&probe.times);
        self.since_probe = 0;
        self.recent.clear();
        if measured < probe.baseline * KEEP_IF_FASTER {
            // One more in the same direction (0 is out of range, so it is never tried).
            self.follow_up = Some((2 * probe.candidate).saturating_sub(self.current));
            self.current = probe.candidate;
            self.cooldown = MIN_COOLDOWN;
            self.reference = vec![(probe.class, measured)];
        } else {
            self.cooldown = (self.cooldown * 2).min(MAX_INTERVAL);
            self.reference = vec![(probe.class, probe.baseline)];
        }
    }

    /// The median of the last [`WINDOW`] steps of `class` at the current count, once there
    /// are that many.
    fn median_of(&self, class: u32) -> Option<f64> {
        let times: Vec<f64> =
            self.recent.iter().rev().filter(|(c, _)| *c == class).take(WINDOW).map(|(_, time)| *time).collect();
        (times.len() == WINDOW).then(|| median(&times))
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A board where a step of one token takes `time(threads)` seconds.
    fn run(governor: &mut ThreadGovernor, steps: usize, idle: Option<f64>, time: impl Fn(u32) -> f64) -> Vec<u32> {
        (0..steps)
            .map(|_| {
                let (threads, _) = governor.counts();
                governor.observe(1, Duration::from_secs_f64(time(threads)), idle);
                threads
            })
            .collect()
    }

    /// Idle: two threads are faster. A full-core neighbour: two threads are five times slower
    /// than one.
    fn idle_board(threads: u32) -> f64 {
        if threads == 2 { 0.19 } else { 0.35 }
    }

    fn shared_board(threads: u32) -> f64 {
        if threads == 2 { 1.7 } else { 0.36 }
    }

    #[test]
    fn a_fixed_count_is_never_changed() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Fixed(2));
        let used = run(&mut governor, 1000, Some(1.0), shared_board);
        assert!(used.iter().all(|&threads| threads == 2));
        assert_eq!(governor.counts(), (2, 2));
    }

    #[test]
    fn idle_it_stays_at_the_maximum_but_for_rare_probes() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 2 });
        let used = run(&mut governor, 2000, Some(0.0), idle_board);
        let fewer = used.iter().filter(|&&threads| threads != 2).count();
        assert!(fewer > 0, "it never looked whether fewer threads were faster");
        assert!(fewer * 100 <= used.len() * 2, "{fewer} of {} steps ran with fewer threads", used.len());
        assert_eq!(governor.counts().0, 2);
    }

    #[test]
    fn a_neighbour_makes_it_use_fewer_threads_and_its_going_brings_them_back() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 2 });
        run(&mut governor, 50, Some(0.0), idle_board);
        assert_eq!(governor.counts().0, 2);
        // The neighbour takes a core: there are no idle cores, and two threads are slow.
        let used = run(&mut governor, 100, Some(0.0), shared_board);
        assert_eq!(governor.counts().0, 1);
        let slow = used.iter().filter(|&&threads| threads == 2).count();
        assert!(slow <= WINDOW + 2, "{slow} steps ran slowly before it moved to one thread");
        // It leaves: a core stands idle while one thread runs.
        let used = run(&mut governor, 100, Some(1.0), idle_board);
        assert_eq!(governor.counts().0, 2);
        let fewer = used.iter().filter(|&&threads| threads == 1).count();
        assert!(fewer <= WINDOW + PROBE_STEPS + 2, "{fewer} steps ran with one thread after the neighbour left");
    }

    #[test]
    fn it_stays_within_one_and_the_maximum() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 4 });
        // Every step slower than the one before: it keeps looking, never below 1.
        let mut step = 0.1;
        for _ in 0..3000 {
            let (single, batch) = governor.counts();
            assert!((1..=4).contains(&single) && (1..=4).contains(&batch));
            governor.observe(1, Duration::from_secs_f64(step), Some(4.0));
            governor.observe(64, Duration::from_secs_f64(step * 8.0), Some(4.0));
            step *= 1.01;
        }
    }

    #[test]
    fn with_more_cores_it_finds_the_best_count_step_by_step() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 4 });
        // Four cores, two of them busy: two threads are best.
        let time = |threads: u32| match threads {
            1 => 0.40,
            2 => 0.22,
            3 => 0.9,
            _ => 1.4,
        };
        run(&mut governor, 300, Some(0.0), time);
        assert_eq!(governor.counts().0, 2);
    }

    #[test]
    fn prompts_and_single_tokens_are_chosen_apart() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 2 });
        for _ in 0..100 {
            let (single, batch) = governor.counts();
            governor.observe(1, Duration::from_secs_f64(shared_board(single)), Some(0.0));
            // Prompt chunks: two threads stay better for them.
            let prompt = if batch == 2 { 2.0 } else { 3.5 };
            governor.observe(256, Duration::from_secs_f64(prompt), Some(0.0));
        }
        assert_eq!(governor.counts(), (1, 2));
    }

    #[test]
    fn steps_of_other_sizes_do_not_trigger_a_probe() {
        let mut governor = ThreadGovernor::new(ThreadPolicy::Adaptive { max: 2 });
        // Batches of 2 and of 300 tokens take very different times at the same count: beyond
        // the first look at one thread fewer (during which the other size runs at that count
        // too), nothing is tried.
        let mut fewer = 0;
        for index in 0..300 {
            let tokens = if index % 2 == 0 { 2 } else { 300 };
            let threads = governor.counts().1;
            fewer += usize::from(threads < 2);
            let seconds = match (tokens, threads) {
                (2, 2) => 0.2,
                (2, _) => 0.3,
                (_, 2) => 5.0,
                _ => 8.0,
            };
            governor.observe(tokens, Duration::from_secs_f64(seconds), Some(0.0));
        }
        assert_eq!(governor.counts().1, 2);
        assert!(fewer <= 2 * (PROBE_STEPS + 1), "{fewer} steps ran with one thread");
    }
}
