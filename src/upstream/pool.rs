//! Per-endpoint upstream connections over hyper's connection-level client,
//! with Envoy's circuit-breaking model.
//!
//! Limits are per cluster and per proxy ([`ClusterShared`]): open connections
//! (`maxConnections`), requests waiting for a connection (`http1MaxPendingRequests`),
//! active requests (`http2MaxRequests`, checked by the caller at admission),
//! concurrent retries (`maxRetries`). A request that finds no idle connection
//! and no room for a new one waits in the endpoint's pending queue; if the
//! queue is full it fails at once with an overflow, which the proxy answers
//! with 503 `UO` and never retries.
//!
//! HTTP/1.1 connections sit in a LIFO idle stack and return to it (or go
//! straight to a waiting request) once hyper reports them ready again. HTTP/2
//! connections carry up to `maxConcurrentStreams` requests each. A connection
//! is retired after `maxRequestsPerConnection` requests or once older than
//! `maxConnectionDuration`, and closed by a timer once unused for `idleTimeout`
//! (HTTP/1.1 and HTTP/2 alike), as Envoy does.
//!
//! Every slot (connection reservation, stream, pending place) is released by a
//! `Drop` impl, so a cancelled request never leaks capacity. No lock is held
//! across an await.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::outlier::{Detector, HostMonitor, Monitored};
use crate::body::Body;

/// Idle keep-alive connections are closed after this long unused. It sits below
/// the keep-alive timeouts common app servers use (Node.js and uvicorn 5 s), so
/// the proxy, not the app, closes an idle connection and a request never races
/// the app's close (the classic `UC` 503).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Istio's mesh-wide default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Istio sets every circuit-breaker threshold to 2^32−1: unset means unlimited.
pub const UNLIMITED: usize = u32::MAX as usize;

/// HTTP/2 streams per upstream connection when `maxConcurrentStreams` is unset
/// (the peer's own SETTINGS still apply underneath).
pub const DEFAULT_MAX_STREAMS: usize = 1024;

/// Bound on idle HTTP/1.1 connections kept per endpoint, so a burst does not
/// leave thousands of sockets open until they expire.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// How many times a request is re-sent because a pooled connection was found
/// dead before the request was written. Each attempt takes another connection.
const MAX_STALE_RESENDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge over plaintext (h2c).
    Http2,
}

/// TCP keepalive probes (`tcp.tcpKeepalive`); unset fields keep the OS default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

/// A cluster's connection-pool policy (DestinationRule `connectionPool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_pending: usize,
    pub max_requests: usize,
    pub max_retries: usize,
    /// 0 = unlimited; 1 disables keep-alive.
    pub max_requests_per_connection: u32,
    pub max_connection_duration: Option<Duration>,
    pub keepalive: Option<Keepalive>,
    pub max_concurrent_streams: usize,
    /// Local address to connect from (captured inbound traffic reaches the
    /// app from 127.0.0.6, which the capture rules let through).
    pub source: Option<std::net::IpAddr>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            protocol: Protocol::Http1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: UNLIMITED,
            max_pending: UNLIMITED,
            max_requests: UNLIMITED,
            max_retries: UNLIMITED,
            max_requests_per_connection: 0,
            max_connection_duration: None,
            keepalive: None,
            max_concurrent_streams: DEFAULT_MAX_STREAMS,
            source: None,
        }
    }
}

/// Which circuit-breaker limit a request overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The pending queue was full (`http1MaxPendingRequests`).
    Pending,
    /// Too many active requests (`http2MaxRequests`).
    Requests,
}

/// Why an upstream request failed. The proxy maps these to response flags.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(std::io::Error),
    #[error("connection timeout after {0:?}")]
    ConnectTimeout(Duration),
    #[error("protocol handshake failed: {0}")]
    Handshake(hyper::Error),
    /// The connection closed or reset before a response arrived.
    #[error("connection termination: {0}")]
    Terminated(hyper::Error),
    #[error("circuit breaker overflow: {0:?}")]
    Overflow(Overflow),
}

impl UpstreamError {
    /// True when the request never left the proxy because no connection could
    /// be made.
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_) | UpstreamError::Handshake(_))
    }

    /// HTTP/2 REFUSED_STREAM: the server did not process the request.
    pub fn is_refused_stream(&self) -> bool {
        match self {
            UpstreamError::Terminated(e) => std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .and_then(h2::Error::reason)
                .is_some_and(|r| r == h2::Reason::REFUSED_STREAM),
            _ => false,
        }
    }
}

/// A failed send, with the request handed back when it was never written.
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<Body>>,
}

// === counters ===

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fm])* pub $field: AtomicU64,)* }
        impl $name {
            /// `(envoy stat name, value)` pairs.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Per-cluster statistics, named after Envoy's cluster stats.
    ClusterStats {
        upstream_rq_total,
        upstream_rq_pending_total,
        upstream_rq_pending_overflow,
        upstream_rq_active_overflow,
        upstream_cx_total,
        upstream_cx_overflow,
        upstream_cx_connect_fail,
        upstream_cx_connect_timeout,
        upstream_cx_max_requests,
        upstream_cx_max_duration_reached,
        upstream_cx_idle_timeout,
        upstream_rq_retry,
        upstream_rq_retry_success,
        upstream_rq_retry_overflow,
        upstream_rq_retry_limit_exceeded,
        upstream_rq_timeout,
        upstream_rq_per_try_timeout,
        upstream_rq_mirror,
        upstream_rq_mirror_dropped,
    }
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Opens transport connections to endpoints. The default is plain TCP;
/// tests substitute in-memory pipes.
pub trait Connect: Send + Sync {
    fn connect(
        &self,
        addr: SocketAddr,
        settings: &PoolSettings,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>>;
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Plain TCP with `TCP_NODELAY` and the configured keepalive.
pub struct TcpConnect;

impl Connect for TcpConnect {
    fn connect(
        &self,
        addr: SocketAddr,
        settings: &PoolSettings,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>> {
        let keepalive = settings.keepalive;
        let source = settings.source;
        Box::pin(async move {
            let stream = connect_from(addr, source).await?;
            let _ = stream.set_nodelay(true);
            if let Some(k) = keepalive {
                let mut ka = socket2::TcpKeepalive::new();
                if let Some(t) = k.time {
                    ka = ka.with_time(t);
                }
                if let Some(i) = k.interval {
                    ka = ka.with_interval(i);
                }
                if let Some(p) = k.probes {
                    ka = ka.with_retries(p);
                }
                if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka) {
                    tracing::debug!(%addr, error = %e, "cannot set TCP keepalive");
                }
            }
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// Connects to `addr`, from `source` when given (port chosen by the kernel).
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(source) = source else { return tokio::net::TcpStream::connect(addr).await };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Fails every connect: used where sending plaintext would be wrong.
pub struct Refuse(pub &'static str);

impl Connect for Refuse {
    fn connect(&self, _: SocketAddr, _: &PoolSettings) -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>> {
        let why = self.0;
        Box::pin(async move { Err(std::io::Error::other(why)) })
    }
}

/// State shared by all endpoints of one cluster: limits, counters, stats and
/// the outlier detector.
pub struct ClusterShared {
    pub settings: PoolSettings,
    pub connections: AtomicUsize,
    pub pending: AtomicUsize,
    pub active_requests: AtomicUsize,
    pub active_retries: AtomicUsize,
    pub stats: ClusterStats,
    pub detector: Option<Detector>,
    connector: Arc<dyn Connect>,
}

impl std::fmt::Debug for ClusterShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterShared").field("settings", &self.settings).finish()
    }
}

impl ClusterShared {
    pub fn new(settings: PoolSettings, detector: Option<Detector>, connector: Arc<dyn Connect>) -> Arc<Self> {
        Arc::new(ClusterShared {
            settings,
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active_requests: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
            stats: ClusterStats::default(),
            detector,
            connector,
        })
    }

    /// Admits one request against `http2MaxRequests`; the guard releases it.
    pub fn admit(self: &Arc<Self>) -> Result<RequestSlot, Overflow> {
        let prev = self.active_requests.fetch_add(1, Ordering::AcqRel);
        if prev >= self.settings.max_requests {
            self.active_requests.fetch_sub(1, Ordering::AcqRel);
            // Envoy counts this in the pending-overflow stat too (historical).
            bump(&self.stats.upstream_rq_pending_overflow);
            bump(&self.stats.upstream_rq_active_overflow);
            return Err(Overflow::Requests);
        }
        bump(&self.stats.upstream_rq_total);
        Ok(RequestSlot(self.clone()))
    }

    /// Takes a retry slot against `maxRetries`; `None` when the budget is used
    /// up (the retry is not attempted).
    pub fn begin_retry(self: &Arc<Self>) -> Option<RetrySlot> {
        let prev = self.active_retries.fetch_add(1, Ordering::AcqRel);
        if prev >= self.settings.max_retries {
            self.active_retries.fetch_sub(1, Ordering::AcqRel);
            bump(&self.stats.upstream_rq_retry_overflow);
            return None;
        }
        bump(&self.stats.upstream_rq_retry);
        Some(RetrySlot(self.clone()))
    }
}

/// One admitted request (counts toward `http2MaxRequests`).
pub struct RequestSlot(Arc<ClusterShared>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One retry in flight (counts toward `maxRetries`).
pub struct RetrySlot(Arc<ClusterShared>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

// === endpoint pool ===

#[derive(Debug, Clone, Copy)]
struct ConnMeta {
    id: u64,
    created: Instant,
    requests: u32,
}

struct IdleConn {
    tx: http1::SendRequest<Body>,
    since: Instant,
    meta: ConnMeta,
}

struct H2Conn {
    tx: http2::SendRequest<Body>,
    meta: ConnMeta,
    streams: usize,
    /// No new streams (max requests or age reached); closes when drained.
    retired: bool,
    /// When the last stream ended, while none is open.
    idle_since: Option<Instant>,
}

/// Capacity handed to one request.
enum Grant {
    Ready(Ready),
    /// Room for a new connection, which the request opens itself.
    Connect(Reservation),
}

/// A connection (HTTP/1.1) or stream (HTTP/2) ready to carry a request.
enum Ready {
    H1(http1::SendRequest<Body>, ConnMeta),
    H2(http2::SendRequest<Body>, StreamGuard),
}

#[derive(Default)]
struct PoolInner {
    idle: Vec<IdleConn>,
    h2: Vec<H2Conn>,
    waiters: VecDeque<oneshot::Sender<Grant>>,
    /// This endpoint's connections, open or being opened.
    open: usize,
    /// HTTP/2 connections being opened.
    h2_connecting: usize,
    /// A task is set to close connections when their idle timeout ends.
    reaper_armed: bool,
}

impl PoolInner {
    /// When the next idle connection reaches its idle timeout.
    fn next_idle_expiry(&self, ttl: Duration) -> Option<Instant> {
        let h1 = self.idle.iter().map(|c| c.since);
        let h2 = self.h2.iter().filter(|c| c.streams == 0).filter_map(|c| c.idle_since);
        h1.chain(h2).min().map(|t| t + ttl)
    }

    /// Drops (so closes) the connections idle for `ttl` or more; returns how many.
    fn reap(&mut self, now: Instant, ttl: Duration) -> usize {
        // Idle HTTP/1.1 connections are kept in the order they went idle, so
        // the expired ones lead: found without looking at every connection.
        let expired = self.idle.partition_point(|c| now.duration_since(c.since) >= ttl);
        self.idle.drain(..expired);
        let h2 = self.h2.len();
        self.h2.retain(|c| c.streams > 0 || c.idle_since.is_none_or(|t| now.duration_since(t) < ttl));
        expired + h2 - self.h2.len()
    }
}

/// Runtime state of one endpoint of one cluster.
pub struct EndpointState {
    pub addr: SocketAddr,
    pub shared: Arc<ClusterShared>,
    active: AtomicUsize,
    inner: Mutex<PoolInner>,
    next_id: AtomicU64,
    monitor: HostMonitor,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointState")
            .field("addr", &self.addr)
            .field("active", &self.active())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Monitored for EndpointState {
    fn monitor(&self) -> &HostMonitor {
        &self.monitor
    }
    fn label(&self) -> String {
        self.addr.to_string()
    }
}

/// Decrements the endpoint's active request count when dropped.
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection slot being opened. Dropped unused, it frees the slot and lets a
/// waiting request try.
struct Reservation {
    ep: Arc<EndpointState>,
    h2: bool,
    armed: bool,
}

impl Reservation {
    /// The slot now belongs to a live connection; its task releases it.
    fn into_connection(mut self) -> ConnSlot {
        self.armed = false;
        ConnSlot { ep: self.ep.clone(), h2: self.h2 }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.ep.release_connection(self.h2, true, None);
        }
    }
}

/// Held by a connection's task; frees the slot when the connection ends.
struct ConnSlot {
    ep: Arc<EndpointState>,
    h2: bool,
}

/// One HTTP/2 stream on a pooled connection; dropped when the response ends.
pub struct StreamGuard {
    ep: Arc<EndpointState>,
    conn: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.ep.stream_done(self.conn);
    }
}

/// A place in the pending queue (counts toward `http1MaxPendingRequests`).
struct PendingSlot(Arc<ClusterShared>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `send` hands back besides the response: the connection's lease, held
/// until the response body ends.
pub struct Sent {
    pub response: Response<Incoming>,
    pub lease: Lease,
}

/// The part of a connection a response holds while its body streams.
pub enum Lease {
    /// An HTTP/1.1 connection, returned to the pool when dropped.
    Http1(H1Lease),
    /// One stream of a shared HTTP/2 connection.
    Http2(StreamGuard),
    /// Nothing to give back (the connection closes after this response).
    None,
}

/// An HTTP/1.1 connection serving one response. Dropped (when the response
/// body has been read, or abandoned) it goes back to the pool: at once when
/// hyper has finished the exchange, which is the usual case by the time the
/// body's end has been seen, else from a task that waits for the connection
/// to be ready.
pub struct H1Lease {
    ep: Arc<EndpointState>,
    conn: Option<(http1::SendRequest<Body>, ConnMeta)>,
}

impl Drop for H1Lease {
    fn drop(&mut self) {
        let Some((tx, meta)) = self.conn.take() else { return };
        if tx.is_ready() {
            self.ep.put_back(tx, meta);
        } else if !tx.is_closed() {
            self.ep.return_when_ready(tx, meta);
        }
    }
}

impl EndpointState {
    pub fn new(addr: SocketAddr, shared: Arc<ClusterShared>) -> Arc<Self> {
        Arc::new(EndpointState {
            addr,
            shared,
            active: AtomicUsize::new(0),
            inner: Mutex::new(PoolInner::default()),
            next_id: AtomicU64::new(0),
            monitor: HostMonitor::default(),
        })
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.shared.settings
    }

    /// Requests in flight to this endpoint (sent and not yet fully answered).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Open (or opening) upstream connections to this endpoint.
    pub fn connections(&self) -> usize {
        self.lock().open
    }

    pub fn is_ejected(&self) -> bool {
        self.monitor.is_ejected()
    }

    /// Counts a request as active until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` (URI in origin form for HTTP/1.1, absolute for HTTP/2).
    pub async fn send(self: &Arc<Self>, mut req: Request<Body>) -> Result<Sent, SendError> {
        let mut resends = 0;
        loop {
            let grant = match self.acquire().await {
                Ok(g) => g,
                Err(o) => return Err(SendError { error: UpstreamError::Overflow(o), request: Some(req) }),
            };
            let (ready, reused) = match grant {
                Grant::Ready(r) => (r, true),
                // Boxed: connecting (TLS, HTTP/2 handshake) is rare next to
                // reusing a connection, and its state is large.
                Grant::Connect(res) => match Box::pin(self.open(res)).await {
                    Ok(r) => (r, false),
                    Err(error) => return Err(SendError { error, request: Some(req) }),
                },
            };
            let result = match ready {
                Ready::H1(tx, meta) => self.send_h1(tx, meta, req).await,
                Ready::H2(tx, stream) => send_h2(tx, stream, req).await,
            };
            match result {
                Ok(sent) => return Ok(sent),
                Err(SendError { error, request: Some(back) }) if reused && resends < MAX_STALE_RESENDS => {
                    tracing::debug!(endpoint = %self.addr, %error, "pooled connection was closed; re-sending on another");
                    resends += 1;
                    req = back;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Finds capacity for one request: an idle connection or stream, a slot
    /// for a new connection, or a place in the pending queue.
    async fn acquire(self: &Arc<Self>) -> Result<Grant, Overflow> {
        let rx = {
            let mut inner = self.lock();
            if let Some(g) = self.take_ready(&mut inner) {
                return Ok(g);
            }
            let h2 = self.shared.settings.protocol == Protocol::Http2;
            // HTTP/2 requests wait for a connection already being opened.
            let joins_connect = h2
                && inner.h2_connecting > 0
                && inner.waiters.len() < inner.h2_connecting * self.shared.settings.max_concurrent_streams;
            if !joins_connect && let Some(r) = self.reserve(&mut inner) {
                return Ok(Grant::Connect(r));
            }
            let prev = self.shared.pending.fetch_add(1, Ordering::AcqRel);
            if prev >= self.shared.settings.max_pending {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                bump(&self.shared.stats.upstream_rq_pending_overflow);
                return Err(Overflow::Pending);
            }
            bump(&self.shared.stats.upstream_rq_pending_total);
            let (tx, rx) = oneshot::channel();
            inner.waiters.push_back(tx);
            rx
        };
        let _slot = PendingSlot(self.shared.clone());
        // A grant always arrives: every connection end, stream end and failed
        // connect hands capacity to the queue. The route timeout bounds the wait.
        rx.await.map_err(|_| Overflow::Pending)
    }

    /// An idle HTTP/1.1 connection or a free HTTP/2 stream, if any.
    fn take_ready(self: &Arc<Self>, inner: &mut PoolInner) -> Option<Grant> {
        let now = Instant::now();
        let s = &self.shared.settings;
        while let Some(conn) = inner.idle.pop() {
            if now.duration_since(conn.since) >= s.idle_timeout {
                bump(&self.shared.stats.upstream_cx_idle_timeout);
                continue; // dropping the sender closes the connection
            }
            if s.max_connection_duration.is_some_and(|d| now.duration_since(conn.meta.created) >= d) {
                bump(&self.shared.stats.upstream_cx_max_duration_reached);
                continue;
            }
            if conn.tx.is_ready() {
                return Some(Grant::Ready(Ready::H1(conn.tx, conn.meta)));
            }
        }
        for c in inner.h2.iter_mut() {
            if c.retired || c.tx.is_closed() {
                continue;
            }
            if s.max_connection_duration.is_some_and(|d| now.duration_since(c.meta.created) >= d) {
                c.retired = true;
                bump(&self.shared.stats.upstream_cx_max_duration_reached);
                continue;
            }
            if c.streams == 0 && c.idle_since.is_some_and(|t| now.duration_since(t) >= s.idle_timeout) {
                c.retired = true;
                bump(&self.shared.stats.upstream_cx_idle_timeout);
                continue;
            }
            if c.streams < s.max_concurrent_streams {
                c.streams += 1;
                c.idle_since = None;
                c.meta.requests += 1;
                if s.max_requests_per_connection > 0 && c.meta.requests >= s.max_requests_per_connection {
                    c.retired = true;
                    bump(&self.shared.stats.upstream_cx_max_requests);
                }
                let guard = StreamGuard { ep: self.clone(), conn: c.meta.id };
                return Some(Grant::Ready(Ready::H2(c.tx.clone(), guard)));
            }
        }
        inner.h2.retain(|c| !(c.tx.is_closed() || c.retired && c.streams == 0));
        None
    }

    /// A slot for a new connection if the cluster's `maxConnections` allows it.
    /// As Envoy, an endpoint with no connection at all may always open one.
    fn reserve(self: &Arc<Self>, inner: &mut PoolInner) -> Option<Reservation> {
        let s = &self.shared.settings;
        let total = self.shared.connections.load(Ordering::Acquire);
        if total >= s.max_connections {
            bump(&self.shared.stats.upstream_cx_overflow);
            if inner.open > 0 {
                return None;
            }
        }
        self.shared.connections.fetch_add(1, Ordering::AcqRel);
        inner.open += 1;
        let h2 = s.protocol == Protocol::Http2;
        if h2 {
            inner.h2_connecting += 1;
        }
        Some(Reservation { ep: self.clone(), h2, armed: true })
    }

    /// Frees a connection slot (a failed connect or a closed connection) and
    /// hands the capacity to the next waiting request.
    fn release_connection(self: &Arc<Self>, h2: bool, was_connecting: bool, conn: Option<u64>) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        {
            let mut inner = self.lock();
            inner.open = inner.open.saturating_sub(1);
            if h2 && was_connecting {
                inner.h2_connecting = inner.h2_connecting.saturating_sub(1);
            }
            if let Some(id) = conn {
                inner.h2.retain(|c| c.meta.id != id);
            }
        }
        self.serve_waiters();
    }

    /// Hands whatever capacity exists to waiting requests, in order.
    fn serve_waiters(self: &Arc<Self>) {
        loop {
            let (waiter, grant) = {
                let mut inner = self.lock();
                if inner.waiters.is_empty() {
                    return;
                }
                let grant = match self.take_ready(&mut inner) {
                    Some(g) => g,
                    None => {
                        let h2 = self.shared.settings.protocol == Protocol::Http2;
                        if h2 && inner.h2_connecting > 0 {
                            return; // they will be served when it connects
                        }
                        match self.reserve(&mut inner) {
                            Some(r) => Grant::Connect(r),
                            None => return,
                        }
                    }
                };
                let Some(waiter) = inner.waiters.pop_front() else { return };
                (waiter, grant)
            };
            // Outside the lock: a refused grant is dropped here, which may
            // release capacity and re-enter this function.
            if let Err(grant) = waiter.send(grant) {
                drop(grant);
            }
        }
    }

    fn stream_done(self: &Arc<Self>, conn: u64) {
        {
            let mut inner = self.lock();
            if let Some(c) = inner.h2.iter_mut().find(|c| c.meta.id == conn) {
                c.streams = c.streams.saturating_sub(1);
                if c.streams == 0 {
                    c.idle_since = Some(Instant::now());
                }
            }
            // A retired connection with no streams left is dropped, which
            // closes it; its task then frees the slot.
            inner.h2.retain(|c| !(c.retired && c.streams == 0));
            self.arm_reaper(&mut inner);
        }
        self.serve_waiters();
    }

    /// Opens a connection for a reservation and returns the grant for the
    /// request that opened it.
    async fn open(self: &Arc<Self>, res: Reservation) -> Result<Ready, UpstreamError> {
        let s = self.shared.settings;
        let io = match tokio::time::timeout(s.connect_timeout, self.shared.connector.connect(self.addr, &s)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                bump(&self.shared.stats.upstream_cx_connect_fail);
                return Err(UpstreamError::Connect(e));
            }
            Err(_) => {
                bump(&self.shared.stats.upstream_cx_connect_fail);
                bump(&self.shared.stats.upstream_cx_connect_timeout);
                return Err(UpstreamError::ConnectTimeout(s.connect_timeout));
            }
        };
        let meta = ConnMeta { id: self.next_id.fetch_add(1, Ordering::Relaxed), created: Instant::now(), requests: 0 };
        bump(&self.shared.stats.upstream_cx_total);
        let addr = self.addr;
        match s.protocol {
            Protocol::Http1 => {
                let (tx, conn) =
                    http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(UpstreamError::Handshake)?;
                let slot = res.into_connection();
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with error");
                    }
                    slot.ep.release_connection(slot.h2, false, None);
                });
                Ok(Ready::H1(tx, meta))
            }
            Protocol::Http2 => {
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(UpstreamError::Handshake)?;
                let slot = res.into_connection();
                let id = meta.id;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(endpoint = %addr, error = %e, "upstream h2 connection ended with error");
                    }
                    slot.ep.release_connection(slot.h2, false, Some(id));
                });
                let mut meta = meta;
                meta.requests = 1;
                let retired = s.max_requests_per_connection == 1;
                {
                    let mut inner = self.lock();
                    inner.h2_connecting = inner.h2_connecting.saturating_sub(1);
                    inner.h2.push(H2Conn { tx: tx.clone(), meta, streams: 1, retired, idle_since: None });
                }
                let guard = StreamGuard { ep: self.clone(), conn: id };
                // Requests that waited for this connection get their streams.
                self.serve_waiters();
                Ok(Ready::H2(tx, guard))
            }
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut tx: http1::SendRequest<Body>,
        mut meta: ConnMeta,
        req: Request<Body>,
    ) -> Result<Sent, SendError> {
        meta.requests += 1;
        match tx.try_send_request(req).await {
            Ok(response) => {
                let s = &self.shared.settings;
                let lease = if s.max_requests_per_connection > 0 && meta.requests >= s.max_requests_per_connection {
                    // Dropping the sender lets hyper finish this response and close.
                    bump(&self.shared.stats.upstream_cx_max_requests);
                    Lease::None
                } else {
                    Lease::Http1(H1Lease { ep: self.clone(), conn: Some((tx, meta)) })
                };
                Ok(Sent { response, lease })
            }
            Err(mut e) => {
                let request = e.take_message();
                Err(SendError { error: UpstreamError::Terminated(e.into_error()), request })
            }
        }
    }

    /// A task that puts an HTTP/1.1 connection back once hyper has finished
    /// its exchange (see [`H1Lease`]); it ends if the connection closes.
    fn return_when_ready(self: &Arc<Self>, mut tx: http1::SendRequest<Body>, meta: ConnMeta) {
        let weak: Weak<EndpointState> = Arc::downgrade(self);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            if tx.ready().await.is_err() {
                return;
            }
            if let Some(this) = weak.upgrade() {
                this.put_back(tx, meta);
            }
        });
    }

    /// A connection ready for its next request serves the next waiting
    /// request or goes idle, unless it has reached its age limit.
    fn put_back(self: &Arc<Self>, tx: http1::SendRequest<Body>, meta: ConnMeta) {
        if self.shared.settings.max_connection_duration.is_some_and(|d| meta.created.elapsed() >= d) {
            bump(&self.shared.stats.upstream_cx_max_duration_reached);
            return;
        }
        let mut grant = Grant::Ready(Ready::H1(tx, meta));
        loop {
            let mut inner = self.lock();
            let Some(waiter) = inner.waiters.pop_front() else {
                // No one waits: idle, under the same lock that found the
                // queue empty, so a request that queues meanwhile (it looks
                // for idle connections under this lock) cannot be missed.
                let Grant::Ready(Ready::H1(tx, meta)) = grant else { return };
                // Taken under the lock, so the idle list stays in the order
                // connections went idle (`PoolInner::reap` relies on it).
                let now = Instant::now();
                self.close_idle(&mut inner, now);
                if inner.idle.len() < MAX_IDLE_PER_ENDPOINT {
                    inner.idle.push(IdleConn { tx, since: now, meta });
                }
                self.arm_reaper(&mut inner);
                return;
            };
            drop(inner);
            match waiter.send(grant) {
                Ok(()) => return,
                Err(back) => grant = back,
            }
        }
    }

    /// Closes the connections idle for `idleTimeout` or more, counting each.
    fn close_idle(&self, inner: &mut PoolInner, now: Instant) {
        for _ in 0..inner.reap(now, self.shared.settings.idle_timeout) {
            bump(&self.shared.stats.upstream_cx_idle_timeout);
        }
    }

    /// Makes sure a task closes idle connections when their idle timeout
    /// ends (Envoy's `idle_timeout`), so an unused connection does not stay
    /// open, holding a place under `maxConnections`, until the upstream
    /// closes it. One task per endpoint, re-armed for the next expiry.
    fn arm_reaper(self: &Arc<Self>, inner: &mut PoolInner) {
        let ttl = self.shared.settings.idle_timeout;
        if inner.reaper_armed {
            return;
        }
        let Some(mut at) = inner.next_idle_expiry(ttl) else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        inner.reaper_armed = true;
        let weak: Weak<EndpointState> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep_until(at).await;
                let Some(this) = weak.upgrade() else { return };
                let mut inner = this.lock();
                this.close_idle(&mut inner, Instant::now());
                match inner.next_idle_expiry(ttl) {
                    Some(next) => at = next,
                    None => {
                        inner.reaper_armed = false;
                        return;
                    }
                }
            }
        });
    }
}

async fn send_h2(mut tx: http2::SendRequest<Body>, stream: StreamGuard, req: Request<Body>) -> Result<Sent, SendError> {
    match tx.try_send_request(req).await {
        Ok(response) => Ok(Sent { response, lease: Lease::Http2(stream) }),
        Err(mut e) => {
            let request = e.take_message();
            Err(SendError { error: UpstreamError::Terminated(e.into_error()), request })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::sync::Semaphore;

    use super::*;

    /// An in-memory upstream: each connect is a duplex pipe with a hyper
    /// server on the far end. Requests wait for a permit of `gate` before
    /// they are answered, so tests decide when responses happen.
    struct MemUpstream {
        gate: Arc<Semaphore>,
        connects: AtomicUsize,
        requests: Arc<AtomicUsize>,
        h2: bool,
    }

    impl MemUpstream {
        fn new(h2: bool) -> Arc<Self> {
            Arc::new(MemUpstream {
                gate: Arc::new(Semaphore::new(0)),
                connects: AtomicUsize::new(0),
                requests: Arc::default(),
                h2,
            })
        }
    }

    impl Connect for MemUpstream {
        fn connect(
            &self,
            _: SocketAddr,
            _: &PoolSettings,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (gate, requests, h2) = (self.gate.clone(), self.requests.clone(), self.h2);
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (gate, requests) = (gate.clone(), requests.clone());
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.map(|p| p.forget()).ok();
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = TokioIo::new(server);
                if h2 {
                    let _ =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                }
            });
            Box::pin(async move { Ok(Box::new(client) as BoxIo) })
        }
    }

    fn endpoint(settings: PoolSettings, up: &Arc<MemUpstream>) -> Arc<EndpointState> {
        let shared = ClusterShared::new(settings, None, up.clone());
        EndpointState::new("127.0.0.1:1".parse().unwrap(), shared)
    }

    fn get() -> Request<Body> {
        let mut r = Request::new(crate::body::empty());
        *r.uri_mut() = "http://svc/".parse().unwrap();
        r.headers_mut().insert(http::header::HOST, "svc".parse().unwrap());
        r
    }

    fn get_h1() -> Request<Body> {
        let mut r = get();
        *r.uri_mut() = "/".parse().unwrap();
        r
    }

    async fn finish(sent: Sent) {
        let body = sent.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        drop(sent.lease);
    }

    /// Lets spawned tasks run until the runtime is idle.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// An HTTP/1.1 connection goes back to the pool when its response body
    /// has been read and the lease dropped, without waiting for a task, and
    /// serves the next request.
    #[tokio::test]
    async fn h1_connection_returns_when_the_lease_drops() {
        let up = MemUpstream::new(false);
        up.gate.add_permits(100);
        let ep = endpoint(PoolSettings::default(), &up);
        for _ in 0..5 {
            let Ok(sent) = ep.send(get_h1()).await else { panic!("send failed") };
            assert!(matches!(sent.lease, Lease::Http1(_)));
            finish(sent).await;
            assert_eq!(ep.lock().idle.len(), 1, "the connection is idle again at once");
        }
        assert_eq!(up.connects.load(Ordering::SeqCst), 1);
        assert_eq!(up.requests.load(Ordering::SeqCst), 5);
    }

    /// A lease dropped before hyper has finished the exchange (the body was
    /// not read) does not put a busy connection in the pool.
    #[tokio::test]
    async fn h1_lease_dropped_early_never_pools_a_busy_connection() {
        let up = MemUpstream::new(false);
        up.gate.add_permits(100);
        let ep = endpoint(PoolSettings::default(), &up);
        let Ok(sent) = ep.send(get_h1()).await else { panic!("send failed") };
        let Sent { response, lease } = sent;
        drop(lease);
        assert!(ep.lock().idle.iter().all(|c| c.tx.is_ready()));
        drop(response);
        settle().await;
        let Ok(sent) = ep.send(get_h1()).await else { panic!("send failed") };
        finish(sent).await;
        assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    }

    /// Istio's circuit-breaking task, made deterministic: one connection, one
    /// pending request, one request per connection. Of five simultaneous
    /// requests two are admitted (one active, one pending); three overflow.
    #[tokio::test(start_paused = true)]
    async fn pending_queue_bounds_and_overflow() {
        let up = MemUpstream::new(false);
        let settings =
            PoolSettings { max_connections: 1, max_pending: 1, max_requests_per_connection: 1, ..Default::default() };
        let ep = endpoint(settings, &up);
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move { ep.send(get_h1()).await }));
            settle().await;
        }
        settle().await;
        // Three failed at once with an overflow, without touching the upstream.
        let mut done = Vec::new();
        let mut waiting = Vec::new();
        for t in tasks {
            if t.is_finished() { done.push(t.await.unwrap()) } else { waiting.push(t) }
        }
        assert_eq!(done.len(), 3);
        for r in &done {
            assert!(matches!(
                r,
                Err(SendError { error: UpstreamError::Overflow(Overflow::Pending), request: Some(_) })
            ));
        }
        assert_eq!(ep.shared.stats.upstream_rq_pending_overflow.load(Ordering::SeqCst), 3);
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 1);
        assert_eq!(up.requests.load(Ordering::SeqCst), 1, "only the active request reached the upstream");
        assert_eq!(ep.connections(), 1);
        // Answering the first lets the pending one through on a new
        // connection (maxRequestsPerConnection: 1 closes the first).
        up.gate.add_permits(1);
        for t in waiting {
            up.gate.add_permits(1);
            finish(t.await.unwrap().ok().unwrap()).await;
        }
        settle().await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 2);
        assert_eq!(up.requests.load(Ordering::SeqCst), 2);
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_reuse_and_idle_timeout() {
        let up = MemUpstream::new(false);
        up.gate.add_permits(100);
        let ep = endpoint(PoolSettings { idle_timeout: Duration::from_secs(4), ..Default::default() }, &up);
        for _ in 0..3 {
            finish(ep.send(get_h1()).await.ok().unwrap()).await;
            settle().await;
        }
        assert_eq!(up.connects.load(Ordering::SeqCst), 1, "one keep-alive connection");
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(ep.connections(), 1, "not idle long enough to close");
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(ep.connections(), 0, "closed at its idle timeout, with no request to notice");
        finish(ep.send(get_h1()).await.ok().unwrap()).await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 2, "an idle connection past its timeout is not reused");
        assert_eq!(ep.shared.stats.upstream_cx_idle_timeout.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_connection_duration_retires_connections() {
        let up = MemUpstream::new(false);
        up.gate.add_permits(100);
        let settings = PoolSettings { max_connection_duration: Some(Duration::from_secs(2)), ..Default::default() };
        let ep = endpoint(settings, &up);
        finish(ep.send(get_h1()).await.ok().unwrap()).await;
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        finish(ep.send(get_h1()).await.ok().unwrap()).await;
        settle().await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        finish(ep.send(get_h1()).await.ok().unwrap()).await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_release_their_place() {
        let up = MemUpstream::new(false);
        let settings = PoolSettings { max_connections: 1, max_pending: 1, ..Default::default() };
        let ep = endpoint(settings, &up);
        let first = tokio::spawn({
            let ep = ep.clone();
            async move { ep.send(get_h1()).await }
        });
        settle().await;
        let second = tokio::spawn({
            let ep = ep.clone();
            async move { ep.send(get_h1()).await }
        });
        settle().await;
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 1);
        second.abort();
        settle().await;
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 0, "an abandoned request frees its pending place");
        // The queue has room again.
        let third = tokio::spawn({
            let ep = ep.clone();
            async move { ep.send(get_h1()).await }
        });
        settle().await;
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 1);
        up.gate.add_permits(2);
        finish(first.await.unwrap().ok().unwrap()).await;
        finish(third.await.unwrap().ok().unwrap()).await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 1, "the waiter got the freed keep-alive connection");
    }

    #[tokio::test(start_paused = true)]
    async fn h2_streams_per_connection_and_limits() {
        let up = MemUpstream::new(true);
        let settings = PoolSettings {
            protocol: Protocol::Http2,
            max_connections: 1,
            max_concurrent_streams: 2,
            max_pending: 10,
            ..Default::default()
        };
        let ep = endpoint(settings, &up);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move { ep.send(get()).await }));
            settle().await;
        }
        settle().await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 1, "one multiplexed connection");
        assert_eq!(up.requests.load(Ordering::SeqCst), 2, "two streams; the third waits for one");
        assert_eq!(ep.shared.pending.load(Ordering::SeqCst), 1);
        up.gate.add_permits(3);
        for t in tasks {
            finish(t.await.unwrap().ok().unwrap()).await;
        }
        assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    }

    /// An HTTP/2 connection closes once it has had no stream for the idle
    /// timeout; a stream in between restarts the clock.
    #[tokio::test(start_paused = true)]
    async fn h2_idle_timeout_closes_unused_connections() {
        let up = MemUpstream::new(true);
        up.gate.add_permits(100);
        let settings =
            PoolSettings { protocol: Protocol::Http2, idle_timeout: Duration::from_secs(4), ..Default::default() };
        let ep = endpoint(settings, &up);
        finish(ep.send(get()).await.ok().unwrap()).await;
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        finish(ep.send(get()).await.ok().unwrap()).await;
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(ep.connections(), 1, "the second stream restarted the idle clock");
        assert_eq!(up.connects.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(ep.connections(), 0, "closed after 4 s without a stream");
        assert_eq!(ep.shared.stats.upstream_cx_idle_timeout.load(Ordering::SeqCst), 1);
        finish(ep.send(get()).await.ok().unwrap()).await;
        assert_eq!(up.connects.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_and_retry_budgets() {
        let up = MemUpstream::new(false);
        let shared =
            ClusterShared::new(PoolSettings { max_requests: 2, max_retries: 1, ..Default::default() }, None, up);
        let a = shared.admit().unwrap();
        let _b = shared.admit().unwrap();
        assert!(matches!(shared.admit(), Err(Overflow::Requests)));
        drop(a);
        assert!(shared.admit().is_ok());
        let r = shared.begin_retry().unwrap();
        assert!(shared.begin_retry().is_none());
        assert_eq!(shared.stats.upstream_rq_retry_overflow.load(Ordering::SeqCst), 1);
        drop(r);
        assert!(shared.begin_retry().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connect_timeout_and_failure_free_the_slot() {
        struct Never;
        impl Connect for Never {
            fn connect(
                &self,
                _: SocketAddr,
                _: &PoolSettings,
            ) -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>> {
                Box::pin(std::future::pending())
            }
        }
        let settings =
            PoolSettings { connect_timeout: Duration::from_secs(1), max_connections: 1, ..Default::default() };
        let shared = ClusterShared::new(settings, None, Arc::new(Never));
        let ep = EndpointState::new("127.0.0.1:1".parse().unwrap(), shared);
        let r = ep.send(get_h1()).await;
        assert!(matches!(r, Err(SendError { error: UpstreamError::ConnectTimeout(_), request: Some(_) })));
        assert_eq!(ep.connections(), 0);
        assert_eq!(ep.shared.connections.load(Ordering::SeqCst), 0);
        assert_eq!(ep.shared.stats.upstream_cx_connect_timeout.load(Ordering::SeqCst), 1);
    }
}
