//! Listeners and the HTTP server on each accepted connection.
//!
//! Each listener is its own accept task. A reload binds listeners it adds
//! before the new snapshot is published (a bind failure rejects the reload),
//! and closes listeners it removes after: they stop accepting and their open
//! connections are drained gracefully. Listeners the reload keeps are not
//! touched, so their connections never notice the change.
//!
//! A process drain stops a subset of listeners the same way (the inbound
//! ones, by [`ListenerKind`]) and keeps the others serving; every listener
//! counts its open connections so the drain can tell when none remain.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::handler::{self, ConnInfo, ProxyState};
use crate::snapshot::InboundTls;
use crate::snapshot::ListenerKind;
use crate::upstream::pool::BoxIo;

/// Time allowed to read a request's headers (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/1 read buffer bound, which caps the request head (Envoy allows 60 KiB
/// of headers by default).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most headers accepted in one HTTP/1 request (Envoy's default is 100).
pub const MAX_HEADERS: usize = 100;
/// HTTP/2 header list bound, as Envoy's default (hyper's own is 16 KiB).
pub const MAX_H2_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 streams one client may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 rapid-reset guard: streams a client may reset before being accepted.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Time allowed for a new connection's first bytes, enough to tell HTTP/1 from
/// the HTTP/2 preface. hyper's timeouts only start once the protocol is known,
/// so without this a client that connects and sends nothing holds the
/// connection forever. Same bound as the request head.
pub const PROTOCOL_DETECT_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// How long a listener removed by a reload gives its connections to finish
/// (long requests and downloads; the process keeps running meanwhile).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of file descriptors and the like), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The server settings shared by every connection.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
    // MAX_HEADERS is hyper's own default limit; setting it explicitly would
    // make hyper size a header array on the heap for every request.
    const _: () = assert!(MAX_HEADERS == 100);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS);
    b
}

/// Counters of one listener, shared between its accept loop and the manager.
struct Track {
    /// Connections accepted and not yet closed.
    connections: AtomicUsize,
    /// Connections still open at the end of the drain bound, closed unfinished.
    cut_off: AtomicUsize,
    /// True once the accept loop has ended: socket closed, no connection left.
    done: watch::Sender<bool>,
}

impl Track {
    fn new() -> Arc<Self> {
        Arc::new(Track {
            connections: AtomicUsize::new(0),
            cut_off: AtomicUsize::new(0),
            done: watch::Sender::new(false),
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    fn is_done(&self) -> bool {
        *self.done.borrow()
    }
}

struct Running {
    /// `Some(bound)` tells the accept loop to stop and give its open
    /// connections at most `bound` to finish.
    stop: watch::Sender<Option<Duration>>,
    track: Arc<Track>,
}

/// One listener as [`ListenerManager::status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerStatus {
    pub addr: SocketAddr,
    /// False once the listener was told to stop (removed by a reload, or drained).
    pub accepting: bool,
    /// Open downstream connections.
    pub connections: usize,
}

/// The set of bound listeners, reconciled with each snapshot.
pub struct ListenerManager {
    state: Arc<ProxyState>,
    running: Mutex<HashMap<SocketAddr, Running>>,
    /// Listeners told to stop whose connections may still be open.
    closing: Mutex<Vec<(SocketAddr, Arc<Track>)>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

/// Listeners bound for a snapshot that is not yet published.
pub struct Prepared {
    new: Vec<(SocketAddr, TcpListener)>,
    removed: Vec<SocketAddr>,
}

/// Listeners that were told to stop: they accept nothing more and their open
/// connections are finishing.
#[derive(Clone, Default)]
pub struct Stopping {
    listeners: Vec<(SocketAddr, Arc<Track>)>,
}

impl Stopping {
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(a, _)| *a).collect()
    }

    /// Connections still open on these listeners.
    pub fn open_connections(&self) -> usize {
        self.listeners.iter().map(|(_, t)| t.connections()).sum()
    }

    /// Connections that were still open when their listener's drain bound
    /// ran out, and were closed with their requests unfinished.
    pub fn cut_off(&self) -> usize {
        self.listeners.iter().map(|(_, t)| t.cut_off.load(Ordering::Acquire)).sum()
    }

    /// True once every one of these listeners has closed its last connection.
    pub fn is_done(&self) -> bool {
        self.listeners.iter().all(|(_, t)| t.is_done())
    }

    /// Resolves when [`Stopping::is_done`]: each listener's connections have
    /// finished or been closed at the end of its drain bound.
    pub async fn wait(&self) {
        for (_, t) in &self.listeners {
            let mut done = t.done.subscribe();
            // The sender lives in `t`, so this only ends with `true`.
            let _ = done.wait_for(|d| *d).await;
        }
    }
}

impl ListenerManager {
    pub fn new(state: Arc<ProxyState>) -> Self {
        ListenerManager {
            state,
            running: Mutex::new(HashMap::new()),
            closing: Mutex::new(Vec::new()),
            builder: Arc::new(http_builder()),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closing(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, Arc<Track>)>> {
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        closing.retain(|(_, t)| !t.is_done());
        closing
    }

    /// Addresses currently accepting.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self.running().keys().copied().collect();
        v.sort();
        v
    }

    /// Every listener that accepts or still has connections, by address.
    pub fn status(&self) -> Vec<ListenerStatus> {
        let mut v: Vec<_> = self
            .running()
            .iter()
            .map(|(addr, r)| ListenerStatus { addr: *addr, accepting: true, connections: r.track.connections() })
            .collect();
        v.extend(self.closing().iter().map(|(addr, t)| ListenerStatus {
            addr: *addr,
            accepting: false,
            connections: t.connections(),
        }));
        v.sort_by_key(|s| (s.addr, !s.accepting));
        v
    }

    /// Open downstream connections on all listeners, stopping ones included.
    pub fn open_connections(&self) -> usize {
        self.status().iter().map(|s| s.connections).sum()
    }

    /// Binds every listener in `wanted` that is not running yet. On any
    /// failure nothing is kept and the errors are returned.
    pub async fn prepare(&self, wanted: &[SocketAddr]) -> Result<Prepared, Vec<(SocketAddr, std::io::Error)>> {
        let current: Vec<SocketAddr> = self.addresses();
        let mut new = Vec::new();
        let mut errors = Vec::new();
        for addr in wanted {
            if current.contains(addr) {
                continue;
            }
            match bind(*addr) {
                Ok(l) => new.push((*addr, l)),
                Err(e) => errors.push((*addr, e)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let removed = current.into_iter().filter(|a| !wanted.contains(a)).collect();
        Ok(Prepared { new, removed })
    }

    /// Starts the listeners bound by `prepare` and stops the removed ones. Call
    /// right after the snapshot that wants them has been published.
    pub fn commit(&self, prepared: Prepared) {
        let removed = self.stop_where(|addr| prepared.removed.contains(&addr), DRAIN_TIMEOUT);
        for addr in removed.addresses() {
            tracing::info!(%addr, "closing listener");
        }
        let mut running = self.running();
        for (addr, listener) in prepared.new {
            let (stop, stop_rx) = watch::channel(None);
            let track = Track::new();
            tracing::info!(%addr, "listening");
            tokio::spawn(accept_loop(listener, addr, self.state.clone(), self.builder.clone(), stop_rx, track.clone()));
            running.insert(addr, Running { stop, track });
        }
    }

    /// Stops the listeners whose address `pick` selects: they stop accepting
    /// at once (new connections are refused), and their open connections
    /// finish their requests — HTTP/1.1 responses carry `Connection: close`,
    /// HTTP/2 clients get GOAWAY — for at most `drain`, after which the
    /// remaining ones are closed. The others are not touched.
    pub fn stop_where(&self, pick: impl Fn(SocketAddr) -> bool, drain: Duration) -> Stopping {
        let stopped: Vec<(SocketAddr, Arc<Track>)> = {
            let mut running = self.running();
            let addrs: Vec<SocketAddr> = running.keys().copied().filter(|a| pick(*a)).collect();
            addrs
                .into_iter()
                .filter_map(|addr| running.remove(&addr).map(|r| (addr, r)))
                .map(|(addr, r)| {
                    r.stop.send_replace(Some(drain));
                    (addr, r.track)
                })
                .collect()
        };
        self.closing().extend(stopped.iter().cloned());
        Stopping { listeners: stopped }
    }

    /// Stops the listeners of the given kinds in the current snapshot, as
    /// [`ListenerManager::stop_where`] does.
    pub fn stop_kinds(&self, kinds: &[ListenerKind], drain: Duration) -> Stopping {
        let snapshot = self.state.snapshot.load();
        self.stop_where(|addr| snapshot.listener(&addr).is_some_and(|l| kinds.contains(&l.kind)), drain)
    }

    /// Stops every listener (see [`ListenerManager::stop_where`]); the handle
    /// also covers listeners that were already stopping.
    pub fn stop_all(&self, drain: Duration) -> Stopping {
        let mut stopping = self.stop_where(|_| true, drain);
        let already: Vec<_> = self
            .closing()
            .iter()
            .filter(|(_, t)| !stopping.listeners.iter().any(|(_, s)| Arc::ptr_eq(s, t)))
            .cloned()
            .collect();
        stopping.listeners.extend(already);
        stopping
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Counts one open connection for as long as it lives.
struct ConnGuard(Arc<Track>);

impl ConnGuard {
    fn new(track: &Arc<Track>) -> Self {
        track.connections.fetch_add(1, Ordering::AcqRel);
        ConnGuard(track.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks the listener done when its accept loop ends, however it ends.
struct DoneOnDrop(Arc<Track>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.done.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<ProxyState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<Option<Duration>>,
    track: Arc<Track>,
) {
    let _done = DoneOnDrop(track.clone());
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let drain = loop {
        tokio::select! {
            changed = stop.changed() => {
                // A dropped sender (the manager is gone) stops the listener too.
                let bound = if changed.is_ok() { *stop.borrow_and_update() } else { Some(DRAIN_TIMEOUT) };
                if let Some(bound) = bound {
                    break bound;
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of fds and the like: back off instead of spinning.
                        tracing::warn!(%addr, error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The mTLS mode comes from the snapshot the connection
                // arrives under (PeerAuthentication on a sidecar ingress).
                let (kind, mode, gateway_tls) = match state.snapshot.load().listener(&addr) {
                    Some(l) => (Some(l.kind), l.tls, l.gateway_tls.clone()),
                    None => (None, InboundTls::default(), None),
                };
                let (state, builder) = (state.clone(), builder.clone());
                let watcher = graceful.watcher();
                let open = ConnGuard::new(&track);
                conns.spawn(async move {
                    let _open = open;
                    let accepted = super::capture::Accepted { stream, peer, local: addr, state, builder, watcher };
                    // The task lives as long as its connection, sized by its
                    // largest state: the capture paths and TLS handshakes
                    // are boxed so that a plain HTTP connection does not
                    // carry their room while it sits idle.
                    match kind {
                        Some(ListenerKind::CaptureOutbound) => {
                            return Box::pin(super::capture::outbound(accepted)).await;
                        }
                        Some(ListenerKind::CaptureInbound) => return Box::pin(super::capture::inbound(accepted)).await,
                        _ => {}
                    }
                    let super::capture::Accepted { stream, peer, state, builder, watcher, .. } = accepted;
                    let identity = state.identity();
                    let secure = gateway_tls.is_some();
                    let (io, peer_id): (BoxIo, _) = if let Some(tls) = gateway_tls {
                        match Box::pin(tls.accept(stream)).await {
                            Ok(x) => x,
                            Err(e) => {
                                tracing::debug!(%peer, %addr, error = %e, "TLS connection refused");
                                return;
                            }
                        }
                    } else if mode == InboundTls::Disable {
                        (Box::new(stream), None)
                    } else {
                        match Box::pin(crate::tls::inbound::accept(stream, mode, identity.as_ref())).await {
                            Ok(x) => x,
                            Err(e) => {
                                tracing::debug!(%peer, %addr, error = %e, "inbound connection refused");
                                return;
                            }
                        }
                    };
                    let xfcc = xfcc_for(identity.as_ref(), peer_id.as_deref());
                    let peer_ip = handler::peer_ip_header(peer);
                    let conn =
                        ConnInfo { local: addr, peer, identity: peer_id, xfcc, secure, original_dst: None, peer_ip };
                    serve_http(io, conn, state, &builder, watcher).await;
                });
            }
        }
    };
    // New connections are refused from here on.
    drop(listener);
    // HTTP connections finish their requests (graceful shutdown); TCP
    // tunnels of the capture listeners run on until they end or the bound.
    let finished = tokio::time::timeout(drain, async {
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        let open = track.connections();
        track.cut_off.store(open, Ordering::Release);
        tracing::warn!(%addr, open, "listener drain timed out; closing the remaining connections");
        conns.abort_all();
    }
    // Aborted tasks end at their next poll; finished ones are only reaped here.
    while conns.join_next().await.is_some() {}
}

/// `x-forwarded-client-cert` for requests on a connection from a verified
/// mesh peer: this proxy's identity, the peer's certificate hash and ID.
pub(super) fn xfcc_for(
    identity: Option<&Arc<crate::tls::IdentityStore>>,
    peer: Option<&crate::tls::inbound::Peer>,
) -> Option<http::HeaderValue> {
    let p = peer?;
    let own = identity?.current()?.spiffe_id.clone();
    let v = format!("By={own};Hash={};Subject=\"\";URI={}", p.cert_hash, p.spiffe_id);
    http::HeaderValue::from_str(&v).ok()
}

/// Serves HTTP/1.1 and h2c on an accepted (and, for mTLS, terminated)
/// connection until it ends or the listener's graceful shutdown closes it.
pub(super) fn serve_http(
    io: BoxIo,
    conn: ConnInfo,
    state: Arc<ProxyState>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) -> impl Future<Output = ()> + Send + 'static {
    use futures_util::FutureExt;
    let peer = conn.peer;
    let svc =
        service_fn(move |req| handler::handle(state.clone(), conn.clone(), req).map(Ok::<_, std::convert::Infallible>));
    let io = TokioIo::new(DetectDeadline::new(io, PROTOCOL_DETECT_TIMEOUT));
    // Not an `async fn`, and built in one expression: this future lives as
    // long as the connection, and an async fn would hold its arguments and
    // intermediates in room of their own beside the connection's state.
    let served = watcher.watch(builder.serve_connection_with_upgrades(io, svc).into_owned());
    served.map(move |r| {
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "connection ended with error");
        }
    })
}

/// The HTTP/2 client preface; a connection that starts with it is h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Fails reads with `TimedOut` when the connection has not shown its protocol
/// (a byte that differs from the HTTP/2 preface, or the whole preface) within
/// the deadline. Once it has, or at EOF, the deadline is gone and reads pass
/// through untouched, so hyper's own timeouts govern the rest.
struct DetectDeadline<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
}

impl<S> DetectDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        DetectDeadline { inner, deadline: Some(Box::pin(tokio::time::sleep(timeout))), seen: 0 }
    }

    fn observe(&mut self, read: &[u8]) {
        let start = self.seen.min(H2_PREFACE.len());
        let end = (self.seen + read.len()).min(H2_PREFACE.len());
        let still_preface = read[..end - start] == H2_PREFACE[start..end];
        self.seen += read.len();
        if read.is_empty() || !still_preface || self.seen >= H2_PREFACE.len() {
            self.deadline = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DetectDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    this.observe(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no HTTP request or HTTP/2 preface in time",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DetectDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(reads: &[&[u8]]) -> bool {
        let mut d = DetectDeadline::new((), Duration::from_secs(1));
        for r in reads {
            d.observe(r);
        }
        d.deadline.is_some()
    }

    #[tokio::test]
    async fn detect_deadline_disarms_once_protocol_is_known() {
        assert!(armed(&[]));
        assert!(armed(&[b"PRI * HTTP/2.0\r\n"]), "part of the preface");
        assert!(armed(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM"]), "preface split across reads");
        assert!(!armed(&[H2_PREFACE]), "whole preface");
        assert!(!armed(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n\0\0\x12"]), "preface and a frame");
        assert!(!armed(&[b"G"]), "HTTP/1 from the first byte");
        assert!(!armed(&[b"PRI * HTTP/1.1\r\n"]), "differs from the preface");
        assert!(!armed(&[b"PRI", b""]), "EOF");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_times_out() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let mut d = DetectDeadline::new(server, Duration::from_secs(15));
        let mut buf = [0u8; 8];
        let err = d.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }
}
