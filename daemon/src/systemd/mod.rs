//! Running as a systemd service: readiness and status notifications, the watchdog, and
//! whether stderr goes to the journal. Outside systemd every part of it is a no-op.
//!
//! | file | job |
//! |---|---|
//! | `notify.rs` | [`Notifier`]: READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1 on `NOTIFY_SOCKET` |
//! | `status.rs` | the task that reports loading progress, readiness and load (slots busy, queued) |
//! | `watchdog.rs` | pings at half `WATCHDOG_USEC` while the inference thread makes progress or waits |
//! | `journal.rs` | whether stderr is the journal (`JOURNAL_STREAM`), so logs go there with fields |

pub mod journal;
pub mod notify;
pub mod status;
pub mod watchdog;

pub use notify::Notifier;
