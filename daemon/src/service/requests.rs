//! The requests in flight, by request_id, so that `Cancel` can reach them and shutdown can
//! stop them all, or close the door to new ones and wait for these to end.
//!
//! A request is registered for exactly as long as its stream lives: the [`Registration`] is
//! dropped with the stream, whether it ended, failed or the client went away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Requests {
    in_flight: Mutex<HashMap<String, CancellationToken>>,
    /// Parent of every request's token: cancelling it stops them all.
    shutdown: CancellationToken,
    /// Set once the daemon is stopping: new requests are refused.
    closed: AtomicBool,
    /// Woken whenever a request ends.
    ended: Notify,
}

/// Why a request could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Another request in flight uses this id.
    Duplicate,
    /// The daemon is stopping.
    ShuttingDown,
}

/// A request's entry in the registry; removes it when dropped.
pub struct Registration {
    requests: Arc<Requests>,
    pub request_id: String,
    pub cancel: CancellationToken,
}

impl Requests {
    /// Registers `request_id`, or makes one up when it is empty.
    pub fn register(self: &Arc<Self>, request_id: &str) -> Result<Registration, Refused> {
        let request_id =
            if request_id.is_empty() { format!("req-{:016x}", rand::random::<u64>()) } else { request_id.to_owned() };
        let cancel = self.shutdown.child_token();
        let mut in_flight = self.in_flight.lock().expect("request registry lock");
        // Checked under the lock, so that no request slips in after `close` counted them.
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refused::ShuttingDown);
        }
        if in_flight.contains_key(&request_id) {
            return Err(Refused::Duplicate);
        }
        in_flight.insert(request_id.clone(), cancel.clone());
        Ok(Registration { requests: self.clone(), request_id, cancel })
    }

    /// Refuses every new request from now on (shutdown); those in flight carry on.
    pub fn close(&self) {
        let _in_flight = self.in_flight.lock().expect("request registry lock");
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Requests in flight.
    pub fn count(&self) -> usize {
        self.in_flight.lock().expect("request registry lock").len()
    }

    /// Completes once no request is in flight.
    pub async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            if self.count() == 0 {
                return;
            }
            ended.await;
        }
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
        drop(in_flight);
        self.requests.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_in_flight_and_free_after() {
        let requests = Arc::new(Requests::default());
        let first = requests.register("a").unwrap();
        assert_eq!(requests.register("a").err(), Some(Refused::Duplicate));
        assert!(requests.cancel("a"));
        assert!(first.cancel.is_cancelled());
        drop(first);
        assert!(!requests.cancel("a"));
        assert!(requests.register("a").is_ok());
    }

    #[tokio::test]
    async fn a_closed_registry_refuses_new_requests_and_says_when_the_last_ends() {
        let requests = Arc::new(Requests::default());
        let running = requests.register("a").unwrap();
        requests.close();
        assert_eq!(requests.register("b").err(), Some(Refused::ShuttingDown));
        assert!(!running.cancel.is_cancelled(), "closing does not stop the requests in flight");
        let waiter = tokio::spawn({
            let requests = requests.clone();
            async move { requests.all_ended().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(running);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
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
