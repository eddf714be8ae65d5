//! The graceful stop (SIGTERM, SIGINT): new requests are refused with UNAVAILABLE at once,
//! those in flight get `shutdown_grace_seconds` to finish, and whatever is left is then
//! cancelled by the caller (its streams end with STOP_REASON_CANCELLED).

use std::time::Duration;

use crate::service::requests::Requests;

/// Closes `requests` to new ones and waits up to `grace` for those in flight to end.
pub async fn drain(requests: &Requests, grace: Duration) {
    requests.close();
    let in_flight = requests.count();
    if in_flight == 0 {
        return;
    }
    tracing::info!(in_flight, grace_seconds = grace.as_secs_f64(), "stopping: letting the requests in flight finish");
    match tokio::time::timeout(grace, requests.all_ended()).await {
        Ok(()) => tracing::info!("every request in flight finished"),
        Err(_) => tracing::warn!(
            left = requests.count(),
            "shutdown_grace_seconds passed; cancelling the requests still running"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn the_grace_period_bounds_the_wait() {
        let requests = Arc::new(Requests::default());
        let _stuck = requests.register("stuck", &crate::auth::Client::Unknown).unwrap();
        let started = std::time::Instant::now();
        drain(&requests, Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(requests.count(), 1, "draining cancels nothing itself");
        assert!(requests.register("late", &crate::auth::Client::Unknown).is_err());
    }
}
