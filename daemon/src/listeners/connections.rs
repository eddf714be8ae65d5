//! What one TCP connection may hold, on every TCP listener (gRPC and the HTTP bridges): a cap
//! on the connections of one client (peer address) and of all clients together, and deadlines,
//! so that a client that trickles or says nothing cannot keep a descriptor for long.
//!
//! Each accepted stream is wrapped in [`Watched`], which knows whether a request is in flight on
//! it ([`Activity`]):
//! - none in flight: the connection must start (TLS handshake included) and send its next
//!   request's headers within `header_timeout_seconds` of being accepted, and a kept-alive
//!   connection is closed after `idle_timeout_seconds` without a request (a request that has
//!   begun to arrive then still gets `header_timeout_seconds`);
//! - a request's body must arrive whole within `body_timeout_seconds` of its headers
//!   ([`DeadlineBody`]);
//! - a write that cannot make progress for `idle_timeout_seconds` (a client that stops reading)
//!   ends the connection.
//!
//! A request counts as in flight from its headers until its response body has been sent (or
//! dropped), so a long streamed reply is never cut. The HTTP bridges mark their requests
//! directly; tonic's requests are marked by [`TrackRequests`], which finds the connection by
//! its addresses.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Bytes;
use tonic::codegen::http;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::config::Config;

/// HTTP/2 keep-alive pings (both listeners): a peer that stops answering is dropped.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS), on
/// gRPC and on the HTTP bridges. Requests that generate are limited per client by
/// `max_streams_per_client`; this bounds everything else a connection can open (reflection and
/// health watches, listings), so that with `max_connections_per_client` a client's streams are
/// bounded too. hyper's default is 200; a home client needs a handful.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Descriptors phi3d needs besides its client connections: the model, listeners, the journal,
/// plugin pipes, prompt-cache files, the token file and the config watcher.
pub const FD_RESERVE: u64 = 256;

/// The connection limits the config sets.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub per_client: u32,
    pub total: u32,
}

impl ConnectionLimits {
    pub fn of(config: &Config) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(config.header_timeout_seconds),
            body_timeout: Duration::from_secs(config.body_timeout_seconds),
            idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
            per_client: config.max_connections_per_client,
            total: config.max_connections,
        }
    }

    /// The open-file limit these caps need: every connection is a descriptor.
    pub fn descriptors_needed(&self) -> u64 {
        u64::from(self.total) + FD_RESERVE
    }
}

/// Admits connections to every TCP listener: one per-client count and one total, shared.
#[derive(Clone)]
pub struct Gate {
    limits: ConnectionLimits,
    counts: Arc<Mutex<Counts>>,
    /// Connections by (local, remote) address, for [`TrackRequests`].
    connections: Arc<Mutex<HashMap<(SocketAddr, SocketAddr), Weak<Activity>>>>,
}

#[derive(Default)]
struct Counts {
    open: HashMap<IpAddr, PeerCount>,
    total: u32,
    /// Whether the total cap was reached and said so (logged once until it frees up).
    total_full: bool,
}

#[derive(Default)]
struct PeerCount {
    open: u32,
    full: bool,
}

impl Gate {
    pub fn new(limits: ConnectionLimits) -> Gate {
        Gate { limits, counts: Arc::default(), connections: Arc::default() }
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Wraps an accepted stream, or `None` (the stream is closed at once) when its client, or
    /// everyone together, is at the cap. TCP_NODELAY is set: streams are many small messages.
    pub fn admit(&self, stream: TcpStream) -> Option<Watched<TcpStream>> {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { return None };
        let permit = self.permit(peer.ip())?;
        let _ = stream.set_nodelay(true);
        let activity = Activity::new(self.limits);
        let key = (local, peer);
        let entry = Arc::downgrade(&activity);
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, entry.clone());
        let deadline = activity.phase().deadline;
        Some(Watched {
            io: stream,
            write_stall: None,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            activity,
            idle_timeout: self.limits.idle_timeout,
            _permit: permit,
            _registered: Registered { gate: self.clone(), key, entry },
        })
    }

    fn permit(&self, peer: IpAddr) -> Option<Permit> {
        let peer = peer.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if counts.total >= self.limits.total {
            if !counts.total_full {
                counts.total_full = true;
                tracing::warn!(
                    limit = self.limits.total,
                    "max_connections reached: new connections are closed at once until some close"
                );
            }
            return None;
        }
        let entry = counts.open.entry(peer).or_default();
        if entry.open >= self.limits.per_client {
            if !entry.full {
                entry.full = true;
                tracing::warn!(
                    %peer,
                    limit = self.limits.per_client,
                    "a client reached max_connections_per_client: its new connections are closed at once \
                     until some of its own close"
                );
            }
            return None;
        }
        entry.open += 1;
        counts.total += 1;
        Some(Permit { counts: self.counts.clone(), peer, limits: self.limits })
    }

    /// The connection with these addresses, while it is open.
    fn activity(&self, local: SocketAddr, remote: SocketAddr) -> Option<Arc<Activity>> {
        let connections = self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        connections.get(&(local, remote)).and_then(Weak::upgrade)
    }
}

/// One admitted connection's place in the counts, given back when it closes.
struct Permit {
    counts: Arc<Mutex<Counts>>,
    peer: IpAddr,
    limits: ConnectionLimits,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if counts.total < self.limits.total {
            counts.total_full = false;
        }
        if let Some(entry) = counts.open.get_mut(&self.peer) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 {
                counts.open.remove(&self.peer);
            } else if entry.open < self.limits.per_client {
                entry.full = false;
            }
        }
    }
}

/// The connection's entry in the gate's address map, removed when it closes.
struct Registered {
    gate: Gate,
    key: (SocketAddr, SocketAddr),
    entry: Weak<Activity>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut connections = self.gate.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A new connection may already have the same addresses: only this one's entry goes.
        if connections.get(&self.key).is_some_and(|weak| weak.ptr_eq(&self.entry)) {
            connections.remove(&self.key);
        }
    }
}

/// Whether a connection has a request in flight, and when it must next show progress.
pub struct Activity {
    header_timeout: Duration,
    idle_timeout: Duration,
    phase: Mutex<Phase>,
}

#[derive(Clone)]
struct Phase {
    in_flight: usize,
    /// With nothing in flight: when the connection is closed unless a request arrives.
    deadline: Instant,
    /// Whether bytes arrived since the deadline was set (and it was moved for them).
    reading: bool,
    /// The reader parked while a request was in flight, woken to arm the deadline.
    reader: Option<Waker>,
}

impl Activity {
    fn new(limits: ConnectionLimits) -> Arc<Activity> {
        Arc::new(Activity {
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            phase: Mutex::new(Phase {
                in_flight: 0,
                deadline: Instant::now() + limits.header_timeout,
                reading: false,
                reader: None,
            }),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A request's headers arrived: it is in flight until the guard goes.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.phase().in_flight += 1;
        RequestGuard(self.clone())
    }

    /// Bytes arrived: with nothing in flight, a request has begun and gets `header_timeout`
    /// (never less than the idle time left).
    fn read_bytes(&self) {
        let mut phase = self.phase();
        if phase.in_flight == 0 && !phase.reading {
            phase.reading = true;
            phase.deadline = phase.deadline.max(Instant::now() + self.header_timeout);
        }
    }

    /// The deadline a reader waits under: none while a request is in flight.
    fn deadline(&self, waker: &Waker) -> Option<Instant> {
        let mut phase = self.phase();
        if phase.in_flight > 0 {
            if !phase.reader.as_ref().is_some_and(|reader| reader.will_wake(waker)) {
                phase.reader = Some(waker.clone());
            }
            return None;
        }
        Some(phase.deadline)
    }

    fn end(&self) {
        let mut phase = self.phase();
        phase.in_flight = phase.in_flight.saturating_sub(1);
        if phase.in_flight == 0 {
            phase.deadline = Instant::now() + self.idle_timeout;
            phase.reading = false;
            if let Some(reader) = phase.reader.take() {
                reader.wake();
            }
        }
    }
}

/// A request in flight on its connection.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// An admitted stream under the gate's deadlines; closing it gives back its place.
pub struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// The read deadline, armed while a read waits with nothing in flight.
    sleep: Pin<Box<Sleep>>,
    /// When a write that cannot make progress gives up.
    write_stall: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    _permit: Permit,
    _registered: Registered,
}

impl<IO> Watched<IO> {
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    fn timed_out(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connection closed: {what}"))
    }

    /// Counts a write's progress; a write that waits past `idle_timeout` fails.
    fn write_progress<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Pending => {
                let idle = self.idle_timeout;
                let stall = self.write_stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(Self::timed_out("the client stopped reading"))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let deadline = this.activity.deadline(cx.waker());
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Poll::Ready(Err(Self::timed_out("no request within the header or idle timeout")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.read_bytes();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => {}
        }
        let Some(deadline) = this.activity.deadline(cx.waker()) else { return Poll::Pending };
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Self::timed_out("no request within the header or idle timeout"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.write_progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.write_progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.write_progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.write_progress(cx, polled)
    }
}

/// tonic reads the peer's addresses from this, as from a plain `TcpStream`.
impl tonic::transport::server::Connected for Watched<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts on `listeners` through `gate`, for tonic: refused connections are closed at once,
/// and an accept error (out of descriptors) pauses accepting briefly instead of spinning.
pub fn incoming(listeners: Vec<TcpListener>, gate: Gate) -> impl Stream<Item = std::io::Result<Watched<TcpStream>>> {
    use futures::StreamExt;
    futures::stream::select_all(listeners.into_iter().map(tokio_stream::wrappers::TcpListenerStream::new)).filter_map(
        move |accepted| {
            let gate = gate.clone();
            async move {
                match accepted {
                    Ok(stream) => gate.admit(stream).map(Ok),
                    Err(err) => {
                        accept_failed(&err).await;
                        None
                    }
                }
            }
        },
    )
}

/// After a failed accept: a peer that left is nothing; anything else (EMFILE, ENFILE, ENOMEM)
/// is logged at most every ten seconds and waited out for a moment, so that the loop does not
/// spin while descriptors are short.
pub async fn accept_failed(err: &std::io::Error) {
    use std::io::ErrorKind;
    use std::sync::atomic::{AtomicU64, Ordering};
    if matches!(err.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted) {
        return;
    }
    static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    if now >= LAST_WARNED.load(Ordering::Relaxed) + 10 {
        LAST_WARNED.store(now, Ordering::Relaxed);
        tracing::warn!(error = %err, "accepting a connection failed; pausing accepts briefly");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A request body that must end within its deadline.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        DeadlineBody { inner, deadline: Some(Box::pin(tokio::time::sleep(timeout))), expired: false }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    this.expired = true;
                    Poll::Ready(Some(Err("the request body did not arrive within body_timeout_seconds".into())))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped.
pub struct GuardedBody<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, guard: Option<RequestGuard>) -> Self {
        GuardedBody { inner, guard }
    }
}

impl<B: Body + Unpin> Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// tonic's requests, marked in flight on their connection (found by its addresses), with
/// their bodies under `body_timeout_seconds`. Reflection is a client stream that a tool may
/// hold open between questions, so its body has no deadline.
#[derive(Clone)]
pub struct TrackRequests {
    pub gate: Gate,
}

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner, gate: self.gate.clone() }
    }
}

#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    gate: Gate,
}

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for Tracked<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<GuardedBody<ResBody>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let extensions = request.extensions();
        let info = extensions
            .get::<TcpConnectInfo>()
            .cloned()
            .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().map(|info| info.get_ref().clone()));
        let guard = info
            .and_then(|info| self.gate.activity(info.local_addr?, info.remote_addr?))
            .map(|activity| activity.begin());
        let request = if request.uri().path().starts_with("/grpc.reflection.") {
            request
        } else {
            let timeout = self.gate.limits.body_timeout;
            request.map(|body| tonic::body::Body::new(DeadlineBody::new(body, timeout)))
        };
        let response = self.inner.call(request);
        Box::pin(async move { Ok(response.await?.map(|body| GuardedBody::new(body, guard))) })
    }
}

/// Raises the soft open-file limit to the hard one (systemd's `LimitNOFILE=`, or the shell's
/// `ulimit -Hn`), so that the connection caps fit; returns (soft, hard) as they are after.
pub fn raise_fd_limit() -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard one is
        // always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    (rlim(limit.rlim_cur), rlim(limit.rlim_max))
}

/// The current (soft, hard) open-file limits.
pub fn fd_limits() -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rlim(limit.rlim_cur), rlim(limit.rlim_max))
}

/// rlim_t as u64 (it is 32 bits on 32-bit ARM); infinity as u64::MAX.
#[allow(clippy::useless_conversion)]
fn rlim(value: libc::rlim_t) -> u64 {
    if value == libc::RLIM_INFINITY { u64::MAX } else { u64::from(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_client: u32, total: u32) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            per_client,
            total,
        }
    }

    #[tokio::test]
    async fn caps_count_per_client_and_in_all_and_free_on_close() {
        let gate = Gate::new(limits(2, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let first = gate.permit(a).unwrap();
        let _second = gate.permit(a).unwrap();
        assert!(gate.permit(a).is_none(), "a third from the same client");
        let _other = gate.permit(b).unwrap();
        assert!(gate.permit("10.0.0.3".parse().unwrap()).is_none(), "the total is reached");
        drop(first);
        let _third = gate.permit("10.0.0.3".parse().unwrap()).expect("a place is free again");
        assert!(gate.permit("10.0.0.2".parse().unwrap()).is_none(), "the total again");
    }

    #[tokio::test]
    async fn the_deadline_waits_while_a_request_is_in_flight() {
        let activity = Activity::new(limits(1, 1));
        let waker = futures::task::noop_waker();
        let fresh = activity.deadline(&waker).unwrap();
        let guard = activity.begin();
        assert!(activity.deadline(&waker).is_none());
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        let idle = activity.deadline(&waker).unwrap();
        assert!(idle > fresh, "the idle time counts from the request's end");
        activity.read_bytes();
        assert!(activity.deadline(&waker).unwrap() >= idle, "never less than the idle time left");
    }
}
