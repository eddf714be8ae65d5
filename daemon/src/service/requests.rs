//! The requests in flight, by request_id, so that `Cancel` can reach them and shutdown can
//! stop them all.
//!
//! A request is registered for exactly as long as its stream lives: the [`Registration`] is
//! dropped with the stream, whether it ended, failed or the client went away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Requests {
    in_flight: Mutex<HashMap<String, CancellationToken>>,
    /// Parent of every request's token: cancelling it stops them all.
    shutdown: CancellationToken,
}

/// A request's entry in the registry; removes it when dropped.
pub struct Registration {
    requests: Arc<Requests>,
    pub request_id: String,
    pub cancel: CancellationToken,
}

impl Requests {
    /// Registers `request_id`, or makes one up when it is empty. `None` when that id is taken.
    pub fn register(self: &Arc<Self>, request_id: &str) -> Option<Registration> {
        let request_id =
            if request_id.is_empty() { format!("req-{:016x}", rand::random::<u64>()) } else { request_id.to_owned() };
        let cancel = self.shutdown.child_token();
        let mut in_flight = self.in_flight.lock().expect("request registry lock");
        if in_flight.contains_key(&request_id) {
            return None;
        }
        in_flight.insert(request_id.clone(), cancel.clone());
        Some(Registration { requests: self.clone(), request_id, cancel })
    }

    /// Cancels a request; false when no request has that id.
    pub fn cancel(&self, request_id: &str) -> bool {
        let in_flight = self.in_flight.lock().expect("request registry lock");
        match in_flight.get(request_id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops every request, for shutdown.
    pub fn cancel_all(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut in_flight = self.requests.in_flight.lock().expect("request registry lock");
        in_flight.remove(&self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_in_flight_and_free_after() {
        let requests = Arc::new(Requests::default());
        let first = requests.register("a").unwrap();
        assert!(requests.register("a").is_none());
        assert!(requests.cancel("a"));
        assert!(first.cancel.is_cancelled());
        drop(first);
        assert!(!requests.cancel("a"));
        assert!(requests.register("a").is_some());
    }

    #[test]
    fn made_up_ids_differ_and_shutdown_reaches_all() {
        let requests = Arc::new(Requests::default());
        let one = requests.register("").unwrap();
        let two = requests.register("").unwrap();
        assert_ne!(one.request_id, two.request_id);
        requests.cancel_all();
        assert!(one.cancel.is_cancelled() && two.cancel.is_cancelled());
    }
}
