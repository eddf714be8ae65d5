//! The requests in flight, by request_id, with the client each belongs to: `Cancel` reaches
//! them (only its own client's), a client's streams are counted against
//! `max_streams_per_client`, and shutdown closes the door to new ones, waits for these to end,
//! and stops those still running.
//!
//! A request is registered for exactly as long as its stream lives: the [`Registration`] is
//! dropped with the stream, whether it ended, failed or the client went away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::limits::Limits;
use crate::auth::Client;

#[derive(Default)]
pub struct Requests {
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// Parent of every request's token: cancelling it stops them all.
    shutdown: CancellationToken,
    /// Set once the daemon has been told to stop, before `closed` (a shutdown delay lies
    /// between): health checks say it is stopping while requests are still taken.
    stop_announced: AtomicBool,
    /// Set once the daemon is stopping: new requests are refused.
    closed: AtomicBool,
    /// Woken whenever a request ends.
    ended: Notify,
    pub limits: Limits,
}

struct InFlight {
    cancel: CancellationToken,
    client: Client,
}

/// A request's entry in the registry; removes it when dropped.
pub struct Registration {
    requests: Arc<Requests>,
    pub request_id: String,
    pub cancel: CancellationToken,
}

/// What `Cancel` found.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    NotFound,
    /// The request belongs to another client, which this one must not disturb.
    NotYours,
}

impl Requests {
    pub fn new(limits: Limits) -> Self {
        Requests { limits, ..Requests::default() }
    }

    /// Registers `request_id` for `client`, or makes an id up when it is empty. ALREADY_EXISTS
    /// when the id is taken, RESOURCE_EXHAUSTED when the client has all its streams open.
    pub fn register(self: &Arc<Self>, request_id: &str, client: &Client) -> Result<Registration, Status> {
        let id = if request_id.is_empty() { format!("req-{:016x}", rand::random::<u64>()) } else { request_id.to_owned() };
        let mut in_flight = self.in_flight.lock().expect("request registry lock");
        // Checked under the lock, so that no request slips in after `close` counted them.
        if self.closed.load(Ordering::SeqCst) {
            return Err(Status::unavailable("shutting down: phi3d takes no new requests; retry once it has restarted"));
        }
        if in_flight.contains_key(&id) {
            return Err(Status::already_exists(format!(
                "request_id `{request_id}` is already in flight; use a unique id per request"
            )));
        }
        let open = in_flight.values().filter(|request| request.client == *client).count();
        if open >= self.limits.max_streams_per_client as usize {
            return Err(Status::resource_exhausted(format!(
                "{client} already has {open} requests in flight, the most one client may have \
                 (max_streams_per_client); wait for one to finish"
            )));
        }
        let cancel = self.shutdown.child_token();
        in_flight.insert(id.clone(), InFlight { cancel: cancel.clone(), client: client.clone() });
        Ok(Registration { requests: self.clone(), request_id: id, cancel })
    }

    /// Refuses every new request from now on (shutdown); those in flight carry on.
    pub fn close(&self) {
        let _in_flight = self.in_flight.lock().expect("request registry lock");
        self.closed.store(true, Ordering::SeqCst);
    }

    /// The daemon has been told to stop: health checks say so from now on, while requests are
    /// still taken until `close`.
    pub fn announce_stop(&self) {
        self.stop_announced.store(true, Ordering::SeqCst);
    }

    /// Whether the daemon is stopping: announced, or closed to new requests.
    pub fn is_stopping(&self) -> bool {
        self.stop_announced.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst)
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

    /// Cancels `client`'s request `request_id`.
    pub fn cancel(&self, request_id: &str, client: &Client) -> CancelOutcome {
        let in_flight = self.in_flight.lock().expect("request registry lock");
        match in_flight.get(request_id) {
            Some(request) if request.client != *client => CancelOutcome::NotYours,
            Some(request) => {
                request.cancel.cancel();
                CancelOutcome::Cancelled
            }
            None => CancelOutcome::NotFound,
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

    const ME: Client = Client::LocalUser(1000);

    #[test]
    fn ids_are_unique_while_in_flight_and_free_after() {
        let requests = Arc::new(Requests::default());
        let first = requests.register("a", &ME).unwrap();
        assert_eq!(requests.register("a", &ME).err().unwrap().code(), tonic::Code::AlreadyExists);
        assert_eq!(requests.cancel("a", &ME), CancelOutcome::Cancelled);
        assert!(first.cancel.is_cancelled());
        drop(first);
        assert_eq!(requests.cancel("a", &ME), CancelOutcome::NotFound);
        assert!(requests.register("a", &ME).is_ok());
    }

    #[test]
    fn a_client_cancels_only_its_own_and_has_a_stream_limit() {
        let limits = Limits { max_streams_per_client: 2, ..Limits::default() };
        let requests = Arc::new(Requests::new(limits));
        let other = Client::Token("other".into());
        let mine = requests.register("a", &ME).unwrap();
        assert_eq!(requests.cancel("a", &other), CancelOutcome::NotYours);
        assert!(!mine.cancel.is_cancelled());
        let _second = requests.register("b", &ME).unwrap();
        let refused = requests.register("c", &ME).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_streams_per_client"), "{}", refused.message());
        assert!(requests.register("c", &other).is_ok(), "another client is not affected");
        drop(mine);
        assert!(requests.register("c2", &ME).is_ok(), "a finished stream frees its place");
    }

    #[tokio::test]
    async fn a_closed_registry_refuses_new_requests_and_says_when_the_last_ends() {
        let requests = Arc::new(Requests::default());
        let running = requests.register("a", &ME).unwrap();
        requests.close();
        assert_eq!(requests.register("b", &ME).err().unwrap().code(), tonic::Code::Unavailable);
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
        let one = requests.register("", &ME).unwrap();
        let two = requests.register("", &ME).unwrap();
        assert_ne!(one.request_id, two.request_id);
        requests.cancel_all();
        assert!(one.cancel.is_cancelled() && two.cancel.is_cancelled());
    }
}
