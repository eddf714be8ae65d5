//! The systemd watchdog: with `WatchdogSec=` set, systemd passes `WATCHDOG_USEC` and restarts
//! the service when no WATCHDOG=1 arrives within it.
//!
//! Pinging from a timer alone would only prove that the async side runs. The pings are sent
//! only while the inference thread makes progress (its heartbeat advanced since the last
//! look) or waits for work, or while the model is still loading or the daemon stopping
//! (bounded by systemd's start and stop timeouts instead), so a wedged engine stops them and gets the daemon restarted. One decode
//! step must therefore take less than half of `WatchdogSec=` (see deploy/README.md).

use std::sync::Arc;
use std::time::Duration;

use super::Notifier;
use crate::engine::{Engine, LoadState};

/// Half of the interval systemd expects, when the watchdog is on for this process
/// (`WATCHDOG_USEC` set and `WATCHDOG_PID`, if set, naming it). Read here rather than with
/// `sd_notify::watchdog_enabled`, which wants `WATCHDOG_PID` set, where sd_watchdog_enabled(3)
/// takes its absence to mean this process.
pub fn ping_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings every `period` while the engine is alive; runs until dropped.
pub async fn run(engine: Engine, notifier: Arc<Notifier>, period: Duration) {
    let mut last = engine.pulse();
    let mut withheld = false;
    loop {
        tokio::time::sleep(period).await;
        let pulse = engine.pulse();
        let loading = matches!(engine.state(), LoadState::Loading { .. } | LoadState::Waiting { .. });
        // Once stopping, the worker finishes and saves the cache without beating; systemd's
        // stop timeout bounds that.
        if loading || notifier.is_stopping() || pulse.alive_since(last) {
            if withheld {
                tracing::warn!("the inference thread is making progress again; watchdog pings resumed");
                withheld = false;
            }
            notifier.watchdog();
        } else if !withheld {
            tracing::error!(
                "the inference thread has made no progress for {period:?} while work is pending; \
                 watchdog pings withheld, so that systemd restarts phi3d"
            );
            withheld = true;
        }
        last = pulse;
    }
}
