//! Per-endpoint upstream connections over hyper's connection-level client.
//!
//! HTTP/1.1 endpoints keep a LIFO stack of idle keep-alive connections; a
//! connection returns to the stack once hyper reports it ready for the next
//! request (i.e. the previous response body was fully read). HTTP/2 (h2c)
//! endpoints share one multiplexed connection, re-established when it closes.
//!
//! A request sent on a reused connection that turns out to be dead before any
//! byte of the request was written is re-sent on another connection: hyper
//! hands the untouched request back (`try_send_request`), so this is safe for
//! every method, with or without a body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Body;

/// Idle keep-alive connections are closed after this long unused. It sits below
/// the keep-alive timeouts common app servers use (Node.js and uvicorn 5 s), so
/// the proxy, not the app, closes an idle connection and a request never races
/// the app's close (the classic `UC` 503).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Istio's mesh-wide default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            protocol: Protocol::Http1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
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
}

impl UpstreamError {
    /// True when the request never left the proxy, so sending it elsewhere is
    /// safe whatever its method.
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_) | UpstreamError::Handshake(_))
    }
}

/// A failed send, with the request handed back when it was never written.
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<Body>>,
}

struct IdleConn {
    tx: http1::SendRequest<Body>,
    since: Instant,
}

/// Runtime state of one endpoint of one cluster: its connections and the number
/// of requests in flight (which least-request balancing reads).
pub struct EndpointState {
    pub addr: SocketAddr,
    active: AtomicUsize,
    settings: PoolSettings,
    idle: Mutex<Vec<IdleConn>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    h2_connect: tokio::sync::Mutex<()>,
    open_connections: Arc<AtomicUsize>,
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

/// Decrements the endpoint's active request count when dropped.
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    pub fn new(addr: SocketAddr, settings: PoolSettings) -> Arc<Self> {
        Arc::new(EndpointState {
            addr,
            active: AtomicUsize::new(0),
            settings,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connect: tokio::sync::Mutex::new(()),
            open_connections: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Requests in flight to this endpoint (sent and not yet fully answered).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Open upstream connections to this endpoint.
    pub fn connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Counts a request as active until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Sends `req` (URI in origin form for HTTP/1.1, absolute for HTTP/2).
    pub async fn send(self: &Arc<Self>, req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        match self.settings.protocol {
            Protocol::Http1 => self.send_h1(req).await,
            Protocol::Http2 => self.send_h2(req).await,
        }
    }

    async fn send_h1(self: &Arc<Self>, mut req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let mut resends = 0;
        loop {
            let (mut tx, reused) = match self.checkout_h1() {
                Some(tx) => (tx, true),
                None => match self.connect_h1().await {
                    Ok(tx) => (tx, false),
                    Err(error) => return Err(SendError { error, request: Some(req) }),
                },
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.return_when_ready(tx);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused && resends < MAX_STALE_RESENDS => {
                        tracing::debug!(endpoint = %self.addr, "pooled connection was closed; re-sending on another");
                        resends += 1;
                        req = back;
                    }
                    back => {
                        return Err(SendError { error: UpstreamError::Terminated(e.into_error()), request: back });
                    }
                },
            }
        }
    }

    /// Pops the most recently used idle connection that is still usable.
    fn checkout_h1(&self) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if now.duration_since(conn.since) < self.settings.idle_timeout && conn.tx.is_ready() {
                return Some(conn.tx);
            }
            // Dropping the sender closes an idle connection.
        }
        None
    }

    fn return_when_ready(self: &Arc<Self>, mut tx: http1::SendRequest<Body>) {
        let weak: Weak<EndpointState> = Arc::downgrade(self);
        tokio::spawn(async move {
            if tx.ready().await.is_err() {
                return;
            }
            if let Some(this) = weak.upgrade() {
                let mut idle = this.idle.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let ttl = this.settings.idle_timeout;
                idle.retain(|c| now.duration_since(c.since) < ttl);
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    idle.push(IdleConn { tx, since: now });
                }
            }
        });
    }

    async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(timeout)),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let stream = self.connect_tcp().await?;
        let (tx, conn) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(UpstreamError::Handshake)?;
        let counter = self.open_connections.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with error");
            }
            counter.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(tx)
    }

    async fn send_h2(self: &Arc<Self>, mut req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let mut resends = 0;
        loop {
            let (mut tx, reused) = match self.current_h2() {
                Some(tx) => (tx, true),
                None => match self.connect_h2().await {
                    Ok(tx) => tx,
                    Err(error) => return Err(SendError { error, request: Some(req) }),
                },
            };
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused && resends < MAX_STALE_RESENDS => {
                        resends += 1;
                        self.forget_h2(&tx);
                        req = back;
                    }
                    back => {
                        return Err(SendError { error: UpstreamError::Terminated(e.into_error()), request: back });
                    }
                },
            }
        }
    }

    fn current_h2(&self) -> Option<http2::SendRequest<Body>> {
        let guard = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }

    fn forget_h2(&self, dead: &http2::SendRequest<Body>) {
        let mut guard = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|tx| tx.is_closed() || dead.is_closed()) {
            *guard = None;
        }
    }

    /// Connects (once, even when many requests arrive together) and returns the
    /// shared sender; `true` when another request's connection was reused.
    async fn connect_h2(&self) -> Result<(http2::SendRequest<Body>, bool), UpstreamError> {
        let _connecting = self.h2_connect.lock().await;
        if let Some(tx) = self.current_h2() {
            return Ok((tx, true));
        }
        let stream = self.connect_tcp().await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        let counter = self.open_connections.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream h2 connection ended with error");
            }
            counter.fetch_sub(1, Ordering::Relaxed);
        });
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        Ok((tx, false))
    }
}
