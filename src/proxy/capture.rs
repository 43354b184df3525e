//! The capture listeners: connections that `remora iptables` redirected to
//! the proxy, served by where they were headed.
//!
//! Outbound (15001): the app's own connections. The original destination
//! (`SO_ORIGINAL_DST`) gives the port, and the protocol is the port's declared
//! one for a registry address, else detected from the first bytes (Envoy's
//! `http_inspector`). HTTP is routed by Host through the route table of that
//! port, as an explicit egress listener routes it; anything else is carried
//! as TCP to the original destination (`ALLOW_ANY`) or closed
//! (`REGISTRY_ONLY`, unless the destination is a registry address).
//!
//! Inbound (15006): connections to the pod. The original destination port
//! picks the PeerAuthentication mode and the `Sidecar` ingress entry (or the
//! app on that port on loopback). mTLS is terminated, and the protocol inside
//! comes from ALPN; plaintext is detected like outbound. HTTP goes through
//! authorization and the inbound route; TCP is authorized on the connection
//! and carried to the app. The app is always dialled from 127.0.0.6, which
//! the capture rules let through, so it is never captured twice.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::handler::{ConnInfo, ProxyState};
use super::server::{serve_http, xfcc_for};
use crate::config::compile::INBOUND_SOURCE;
use crate::snapshot::{InboundTls, KnownDestination};
use crate::telemetry::metrics::{Destination, Reporter, Special, Target};
use crate::tls::inbound::Inner;
use crate::upstream::pool::{BoxIo, connect_from};

/// How long a new connection may stay silent before it is taken to be a
/// server-first protocol and carried as TCP. Istio leaves detection unbounded
/// by default, so such a protocol on an undeclared port hangs; declaring the
/// port's protocol skips detection altogether.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Ports of server-first protocols Istio never sniffs (SMTP, DNS, MySQL, MongoDB).
const SERVER_FIRST_PORTS: [u16; 4] = [25, 53, 3306, 27017];
/// Bound on connecting to a TCP destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between peeks while the first bytes are still ambiguous (`GE`).
const PEEK_RETRY: Duration = Duration::from_millis(5);
/// Request-line starts that make a connection HTTP (the last one is the
/// HTTP/2 preface).
const HTTP_STARTS: [&[u8]; 10] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ", b"PRI * HTTP/2"];
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What the first bytes of a connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Tls,
    /// Anything else, including silence (a server-first protocol).
    Opaque,
    /// Closed before sending anything.
    Closed,
}

/// Classifies the first bytes; `None` while they could still begin HTTP.
pub fn classify(bytes: &[u8]) -> Option<Sniffed> {
    if bytes.is_empty() {
        return None;
    }
    if bytes[0] == TLS_HANDSHAKE {
        return Some(Sniffed::Tls);
    }
    let mut undecided = false;
    for start in HTTP_STARTS {
        if bytes.starts_with(start) {
            return Some(Sniffed::Http);
        }
        undecided |= start.starts_with(bytes);
    }
    if undecided { None } else { Some(Sniffed::Opaque) }
}

/// Peeks at the first bytes (without consuming them) until they tell the
/// protocol, or `timeout` passes (then: opaque).
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> std::io::Result<Sniffed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 16];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Ok(Sniffed::Opaque),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok(Sniffed::Closed),
            Ok(Ok(n)) => n,
        };
        if let Some(found) = classify(&buf[..n]) {
            return Ok(found);
        }
        // A peek returns at once while bytes are waiting, so wait a little
        // for the rest of the request line.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(PEEK_RETRY)).await.is_err() {
            return Ok(Sniffed::Opaque);
        }
    }
}

/// Where a redirected connection was headed. A connection made to the
/// capture port itself (not redirected) reports the port it reached.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// A connection accepted on a capture listener, with what serving it needs.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The capture listener's address.
    pub local: SocketAddr,
    pub state: Arc<ProxyState>,
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    pub watcher: Watcher,
}

impl Accepted {
    /// The original destination, or `None` (logged) when there is none to
    /// serve: not redirected, or redirected to this very listener.
    fn destination(&self) -> Option<SocketAddr> {
        let dst = match original_dst(&self.stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "captured connection has no original destination");
                return None;
            }
        };
        let local = self.stream.local_addr().ok();
        if Some(dst) == local || dst.port() == self.local.port() && dst.ip().is_loopback() {
            tracing::debug!(peer = %self.peer, %dst, "connection made to the capture port itself; closing");
            return None;
        }
        Some(dst)
    }
}

/// Serves one connection on the outbound capture port.
pub async fn outbound(acc: Accepted) {
    let Some(dst) = acc.destination() else { return };
    let snapshot = acc.state.snapshot.load_full();
    let Some(capture) = &snapshot.capture else { return };
    let known = capture.known.get(&dst).cloned();
    let protocol = match known.as_ref().and_then(|k| k.protocol) {
        Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB") => Sniffed::Http,
        Some(_) => Sniffed::Opaque,
        None if SERVER_FIRST_PORTS.contains(&dst.port()) => Sniffed::Opaque,
        None => match sniff(&acc.stream, DETECT_TIMEOUT).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(peer = %acc.peer, error = %e, "captured connection failed");
                return;
            }
        },
    };
    let metrics = &acc.state.metrics;
    match protocol {
        Sniffed::Closed => {}
        Sniffed::Http => {
            let conn = ConnInfo {
                local: acc.local,
                peer: acc.peer,
                identity: None,
                xfcc: None,
                secure: false,
                original_dst: Some(dst),
                peer_ip: super::handler::peer_ip_header(acc.peer),
            };
            serve_http(Box::new(acc.stream), conn, acc.state.clone(), &acc.builder, acc.watcher).await;
        }
        Sniffed::Tls | Sniffed::Opaque => {
            let target = match &known {
                Some(k) => metrics.target(Reporter::Source, destination_of(k)),
                None if capture.registry_only => {
                    // BlackHoleCluster: the connection is counted and closed.
                    let target = metrics.special(Special::BlackHole);
                    target.tcp_opened();
                    target.tcp_closed(0, 0);
                    tracing::debug!(peer = %acc.peer, %dst, "REGISTRY_ONLY: TCP to an unknown destination closed");
                    return;
                }
                None => metrics.special(Special::Passthrough),
            };
            if snapshot.listeners.iter().any(|l| l.addr.port() == dst.port() && dst.ip().is_loopback()) {
                tracing::debug!(peer = %acc.peer, %dst, "TCP to this proxy's own listener refused");
                return;
            }
            drop(snapshot);
            tcp_proxy(Box::new(acc.stream), dst, None, &target).await;
        }
    }
}

/// Serves one connection on the inbound capture port.
pub async fn inbound(acc: Accepted) {
    let Some(dst) = acc.destination() else { return };
    let snapshot = acc.state.snapshot.load_full();
    let Some(capture) = &snapshot.capture else { return };
    let mode = capture.inbound_tls(dst.port());
    let first = match sniff(&acc.stream, DETECT_TIMEOUT).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(peer = %acc.peer, error = %e, "captured inbound connection failed");
            return;
        }
    };
    let identity = acc.state.identity();
    let Accepted { stream, peer, local, state, builder, watcher } = acc;
    let (io, peer_id, http): (BoxIo, _, bool) = match first {
        Sniffed::Closed => return,
        Sniffed::Tls if mode != InboundTls::Disable => {
            match crate::tls::inbound::terminate(stream, identity.as_ref()).await {
                Ok((io, p, inner)) => (io, Some(p), inner == Inner::Http),
                Err(e) => {
                    tracing::debug!(%peer, %dst, error = %e, "inbound mTLS refused");
                    return;
                }
            }
        }
        _ if mode == InboundTls::Strict => {
            tracing::debug!(%peer, %dst, "plaintext connection refused: the port requires mTLS (STRICT)");
            return;
        }
        other => (Box::new(stream) as BoxIo, None, other == Sniffed::Http),
    };
    if http {
        let xfcc = xfcc_for(identity.as_ref(), peer_id.as_deref());
        let peer_ip = super::handler::peer_ip_header(peer);
        let conn = ConnInfo { local, peer, identity: peer_id, xfcc, secure: false, original_dst: Some(dst), peer_ip };
        drop(snapshot);
        serve_http(io, conn, state, &builder, watcher).await;
        return;
    }
    // TCP: authorization sees the connection only (no HTTP attributes).
    if let Some(listener) = snapshot.route_listener(&local, Some(dst))
        && !listener.authz.is_empty()
    {
        let attrs = crate::authz::Request {
            principal: peer_id.as_ref().map(|p| p.principal()),
            source_ip: peer.ip(),
            destination_port: dst.port(),
            http: None,
        };
        if let crate::authz::Decision::Deny { policy } = listener.authz.evaluate(&attrs) {
            tracing::debug!(%policy, %peer, %dst, "TCP connection denied by authorization");
            return;
        }
    }
    let app = capture
        .inbound_apps
        .get(&dst.port())
        .copied()
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port()));
    let source = (app.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)).then_some(IpAddr::V4(INBOUND_SOURCE));
    let target = state.metrics.special(Special::InboundPassthrough);
    drop(snapshot);
    tcp_proxy(io, app, source, &target).await;
}

fn destination_of(k: &KnownDestination) -> Destination {
    Destination {
        service: k.host.clone(),
        service_name: None,
        namespace: Some(k.namespace.clone()),
        labels: Default::default(),
    }
}

/// Carries a connection to `dst` as bytes, both ways, until both sides
/// close; counted in `istio_tcp_*` under `target`.
async fn tcp_proxy(client: BoxIo, dst: SocketAddr, source: Option<IpAddr>, target: &Arc<Target>) {
    target.tcp_opened();
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, connect_from(dst, source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "TCP connect failed");
            target.tcp_closed(0, 0);
            return;
        }
        Err(_) => {
            tracing::debug!(%dst, "TCP connect timed out");
            target.tcp_closed(0, 0);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut client = Counted { inner: client, read: 0, written: 0 };
    let mut upstream = upstream;
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%dst, error = %e, "TCP connection ended with error");
    }
    // Sent to the client, received from it.
    target.tcp_closed(client.written, client.read);
}

/// Counts the bytes read from and written to a stream.
struct Counted {
    inner: BoxIo,
    read: u64,
    written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written += n as u64;
        }
        r
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

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"POST /x HTTP/1.1"), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Sniffed::Tls));
        assert_eq!(classify(b"ping\n"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"\x00\x00\x00\x0a"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Opaque), "not a method followed by a space");
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Sniffed::Opaque), "methods are case-sensitive");
        assert_eq!(classify(b"GE"), None, "could still be GET");
        assert_eq!(classify(b"PRI * HT"), None, "could still be the HTTP/2 preface");
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn sniffing_waits_for_a_split_request_line_and_times_out_on_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            c.write_all(b"T / HTTP/1.1\r\n\r\n").await.unwrap();
            let silent = TcpStream::connect(addr).await.unwrap();
            (c, silent)
        });
        let (first, _) = listener.accept().await.unwrap();
        assert_eq!(sniff(&first, Duration::from_secs(5)).await.unwrap(), Sniffed::Http);
        let (second, _) = listener.accept().await.unwrap();
        assert_eq!(sniff(&second, Duration::from_millis(50)).await.unwrap(), Sniffed::Opaque);
        // Peeking consumed nothing.
        let mut buf = [0u8; 3];
        first.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn an_unredirected_connection_reports_its_own_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        // Without NAT there is either no entry (an error) or the address itself.
        if let Ok(dst) = original_dst(&s) {
            assert_eq!(dst, addr);
        }
    }
}
