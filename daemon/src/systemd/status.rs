//! What `systemctl status` shows: the load progress, then READY=1 once the model is warm, then
//! how busy the daemon is, refreshed when that changes.

use std::sync::Arc;
use std::time::Duration;

use super::Notifier;
use crate::engine::{Engine, LoadState};

/// How often the state is looked at. Status lines are sent only when their text changes.
const POLL: Duration = Duration::from_millis(250);

/// Reports until the engine fails or the daemon stops (the task is then dropped; the
/// notifier drops status lines once STOPPING=1 went out). READY=1 is
/// sent once, when the model is warm: the listeners were bound before the model began to load.
pub async fn report(engine: Engine, notifier: Arc<Notifier>) {
    let mut last = String::new();
    loop {
        let line = match engine.state() {
            LoadState::Waiting { reason } => format!("waiting: {reason}"),
            LoadState::Loading { percent } => format!("loading model {percent}%"),
            LoadState::Ready(_) => break,
            LoadState::Failed(reason) => {
                notifier.status(&format!("failed: {reason}"));
                return;
            }
        };
        if line != last {
            notifier.status(&line);
            last = line;
        }
        tokio::time::sleep(POLL).await;
    }
    let mut last = warm_line(&engine);
    notifier.ready(&last);
    loop {
        tokio::time::sleep(POLL).await;
        if let LoadState::Failed(reason) = engine.state() {
            notifier.status(&format!("failed: {reason}"));
            return;
        }
        let line = warm_line(&engine);
        if line != last {
            notifier.status(&line);
            last = line;
        }
    }
}

/// The daemon's load while warm, e.g. "warm: 4 slots, 1 busy, 0 queued".
pub fn warm_line(engine: &Engine) -> String {
    format!("warm: {} slots, {} busy, {} queued", engine.slots(), engine.active_requests(), engine.queue_depth())
}
