//! The sd_notify protocol: one datagram per state change on the socket `NOTIFY_SOCKET` names.
//!
//! The `sd-notify` crate speaks it directly (no libsystemd); see the workspace Cargo.toml for
//! why that crate. Without `NOTIFY_SOCKET` (not run by systemd, or not `Type=notify`) every
//! call does nothing. A failed send is logged once and never stops the daemon: a supervisor
//! that cannot be told is no reason to stop serving.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

#[derive(Debug, Default)]
pub struct Notifier {
    /// READY=1 was sent: after a reload it is sent again, before warm-up it is not.
    ready: AtomicBool,
    /// STOPPING=1 was sent: later status lines would hide it, and the watchdog leaves the
    /// stop to systemd's stop timeout.
    stopping: AtomicBool,
    /// A send failed and was logged.
    failed: AtomicBool,
}

impl Notifier {
    /// The model is warm and the listeners are up.
    pub fn ready(&self, status: &str) {
        self.ready.store(true, Ordering::SeqCst);
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A free-form line that `systemctl status` shows (until the daemon is stopping).
    pub fn status(&self, status: &str) {
        if !self.is_stopping() {
            self.send(&[NotifyState::Status(status)]);
        }
    }

    /// A reload begins; systemd 253+ wants the time it began with it (MONOTONIC_USEC).
    pub fn reloading(&self) {
        let status = NotifyState::Status("reloading the configuration");
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, status]),
            Err(error) => {
                tracing::warn!(%error, "cannot read CLOCK_MONOTONIC for MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading, status]);
            }
        }
    }

    /// The reload is over (applied or refused): ready again, if it was before.
    pub fn reloaded(&self, status: &str) {
        if self.is_stopping() {
            return;
        }
        if self.ready.load(Ordering::SeqCst) {
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            self.status(status);
        }
    }

    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing the requests in flight")]);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        // The variable stays set: the watchdog reads its own, and plugins get a scrubbed
        // environment anyway.
        if let Err(error) = sd_notify::notify(false, states)
            && !self.failed.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET); carrying on without it");
        }
    }
}
