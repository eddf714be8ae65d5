//! What the machine's cores are doing, as the thread governor needs it: how many stood idle
//! lately, from `/proc/stat`.
//!
//! Read by hand rather than through a crate: the first lines of one kernel file, where the
//! available crates (procfs, sysinfo) would bring far more than they are needed for.

use std::time::{Duration, Instant};

/// How often `/proc/stat` is read at most: its counters tick every 10 ms, so a shorter window
/// would be mostly rounding, and a decode step of a small model is shorter than that.
const REFRESH: Duration = Duration::from_millis(250);

/// Idle cores between two looks at `/proc/stat`.
#[derive(Debug, Default)]
pub struct IdleCores {
    last: Option<(Instant, Counters)>,
    value: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Counters {
    idle: u64,
    total: u64,
    cpus: usize,
}

impl IdleCores {
    /// The cores that stood idle, on average, over the last window of at least [`REFRESH`]
    /// (the previous window's figure until a new one is complete); None where `/proc/stat`
    /// cannot be read.
    pub fn recent(&mut self) -> Option<f64> {
        let now = Instant::now();
        if self.last.is_some_and(|(at, _)| now - at < REFRESH) {
            return self.value;
        }
        let counters = std::fs::read_to_string("/proc/stat").ok().and_then(|text| parse_stat(&text))?;
        if let Some((_, before)) = self.last {
            self.value = idle_between(before, counters);
        }
        self.last = Some((now, counters));
        self.value
    }
}

fn idle_between(before: Counters, after: Counters) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    (total > 0).then(|| idle as f64 / total as f64 * after.cpus as f64)
}

/// The `cpu` line's idle and total ticks (idle and iowait count as idle), and the number of
/// `cpuN` lines.
fn parse_stat(text: &str) -> Option<Counters> {
    let mut lines = text.lines();
    let first = lines.next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = first.split_whitespace().filter_map(|field| field.parse().ok()).collect();
    if ticks.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks[4];
    let cpus = lines.take_while(|line| line.starts_with("cpu")).count().max(1);
    Some(Counters { idle, total, cpus })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";

    #[test]
    fn idle_cores_are_the_idle_share_of_the_ticks_times_the_cores() {
        let before = parse_stat(STAT).unwrap();
        assert_eq!((before.idle, before.total, before.cpus), (850, 1000, 2));
        // 100 more ticks, 50 of them idle: half the time idle on two cores.
        let after = Counters { idle: 900, total: 1100, cpus: 2 };
        assert_eq!(idle_between(before, after), Some(1.0));
        assert_eq!(idle_between(after, after), None);
    }

    #[test]
    fn this_machine_reports_idle_cores_after_a_window() {
        let mut idle = IdleCores::default();
        assert_eq!(idle.recent(), None, "one look is not a window");
        std::thread::sleep(REFRESH + Duration::from_millis(20));
        let cores = idle.recent().expect("/proc/stat is readable on Linux");
        assert!((0.0..=num_cpus::get() as f64 + 0.01).contains(&cores), "{cores}");
    }
}
