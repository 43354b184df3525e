//! Protocol handling end to end, on real sockets with real upstreams: the
//! HTTP/1.1 ↔ h2c matrix, HTTP/1.0, large streamed bodies with bounded proxy
//! memory, trailers, WebSocket, gRPC (unary, server streaming, errors, local
//! replies) and abuse limits (header count, slow headers, idle connections,
//! HTTP/2 rapid reset).

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, Stream, StreamExt};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, TE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use remora::body::{self as rbody, Body};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use support::*;

// === helpers ===

/// Serves `handler` over HTTP/1.1 and h2c (prior knowledge) on a fresh
/// loopback port until the test's runtime ends.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// A VirtualService for one host on gateway `gw` (`http` as in `gateway_vs`).
fn host_vs(name: &str, host: &str, gw: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\nspec:\n  hosts:\n  - {host}\n  gateways:\n  - {gw}\n  http:\n{http}---\n"
    )
}

/// One route item: requests whose path starts with `prefix` go to `host`.
fn prefix_route(prefix: &str, host: &str) -> String {
    format!("  - match:\n    - uri:\n        prefix: {prefix}\n    route:\n    - destination:\n        host: {host}\n")
}

/// One catch-all route item to `host`.
fn route_all(host: &str) -> String {
    format!("  - route:\n    - destination:\n        host: {host}\n")
}

/// A proxy whose gateway on `port` sends every request to one echo backend.
async fn echo_gateway(port: u16) -> TestProxy {
    let echo = support::echo("v1").await;
    let yaml = [
        gateway("gw", port),
        service_entry("echo", "echo.test", 80, "HTTP", &[(echo, "v1")]),
        gateway_vs("vs", "gw", &route_all("echo.test")),
    ]
    .concat();
    TestProxy::start(&yaml).await
}

/// A deterministic, non-repeating-looking payload of `n` bytes.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + i / 251) % 251) as u8).collect()
}

/// FNV-1a, to check that a body arrived byte for byte.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// An upstream that reports what it received: protocol, `:authority` (from the
/// URI for HTTP/2, from `Host` for HTTP/1.1), the `Host` header, and the body's
/// length and FNV-1a hash.
async fn inspect(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let host = parts.headers.get(HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| host.clone());
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("body error: {e}")),
    };
    let v = json!({
        "protocol": format!("{:?}", parts.version),
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "authority": authority,
        "host": host,
        "body_bytes": bytes.len(),
        "body_fnv": fnv1a(&bytes),
    });
    let mut resp = Response::new(rbody::full(v.to_string()));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(rbody::full(text));
    *resp.status_mut() = status;
    resp
}

const CHUNK: usize = 64 * 1024;

/// A body of `total` bytes made on the fly in 64 KiB chunks (one shared buffer,
/// so generating it costs no memory).
fn generated(total: u64) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = (CHUNK as u64).min(total - sent) as usize;
            Some((Ok::<_, Infallible>(Frame::data(chunk.slice(..n))), sent + n as u64))
        }
    });
    rbody::boxed(StreamBody::new(stream))
}

/// Reads a body to its end, counting data bytes without keeping them.
async fn count_body<B>(mut body: B) -> Result<u64, B::Error>
where
    B: hyper::body::Body + Unpin,
{
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.remaining() as u64;
        }
    }
    Ok(n)
}

/// Writes `request` on a new connection and reads until the server closes it or
/// `deadline` passes. Returns what was read and whether the server closed.
async fn raw_exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_until_closed(&mut s, deadline).await
}

/// Reads until EOF (or a reset) or `deadline`; returns the bytes and whether
/// the connection was closed by the peer.
async fn read_until_closed(s: &mut TcpStream, deadline: Duration) -> (Vec<u8>, bool) {
    let end = Instant::now() + deadline;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Bounded: every iteration either reads bytes, ends, or times out.
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Splits a raw HTTP/1.x response into (status line, lower-cased headers, body).
fn parse_raw(resp: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(resp)));
    let head = String::from_utf8_lossy(&resp[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, resp[end + 4..].to_vec())
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// An h2c (prior knowledge) connection to `addr` with hyper's client.
async fn h2c_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// An HTTP/1.1 connection to `addr` with hyper's client.
async fn h1_connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    tx
}

fn proxy_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// === 1. protocol matrix ===

/// h1→h1, h1→h2c, h2c→h1, h2c→h2c: status, the protocol on each side, the
/// authority the upstream saw, and a POST body that arrives byte for byte,
/// sized or of unknown length. HEAD answers carry headers and no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_matrix() {
    let port = free_port();
    let upstream = serve(inspect).await;
    let yaml = [
        gateway("gw", port),
        service_entry("up-h1", "up-h1.test", 80, "HTTP", &[(upstream, "v1")]),
        service_entry("up-h2", "up-h2.test", 80, "HTTP2", &[(upstream, "v1")]),
        gateway_vs(
            "matrix",
            "gw",
            &format!("{}{}", prefix_route("/h1/", "up-h1.test"), prefix_route("/h2/", "up-h2.test")),
        ),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;
    let addr = proxy_addr(port);
    let h1 = reqwest::Client::builder().no_proxy().http1_only().resolve("matrix.test", addr).build().unwrap();
    let h2 =
        reqwest::Client::builder().no_proxy().http2_prior_knowledge().resolve("matrix.test", addr).build().unwrap();
    let body = payload(5000);
    let want_fnv = fnv1a(&body);
    let authority = format!("matrix.test:{port}");

    let cases = [
        ("h1→h1", &h1, Version::HTTP_11, "/h1/post", "HTTP/1.1"),
        ("h1→h2c", &h1, Version::HTTP_11, "/h2/post", "HTTP/2.0"),
        ("h2c→h1", &h2, Version::HTTP_2, "/h1/post", "HTTP/1.1"),
        ("h2c→h2c", &h2, Version::HTTP_2, "/h2/post", "HTTP/2.0"),
    ];
    for (name, client, down_version, path, up_protocol) in cases {
        let resp = client
            .post(format!("http://{authority}{path}"))
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.version(), down_version, "{name}: downstream protocol");
        let text = resp.text().await.unwrap();
        let v = echo_json(&text);
        assert_eq!(v["protocol"], up_protocol, "{name}: upstream protocol: {text}");
        assert_eq!(v["method"], "POST", "{name}: {text}");
        assert_eq!(v["path"], path, "{name}: {text}");
        assert_eq!(v["authority"], authority.as_str(), "{name}: authority: {text}");
        if up_protocol == "HTTP/1.1" {
            assert_eq!(v["host"], authority.as_str(), "{name}: Host: {text}");
        }
        assert_eq!(v["body_bytes"], body.len(), "{name}: body length: {text}");
        assert_eq!(v["body_fnv"], want_fnv, "{name}: body content: {text}");
    }

    // Bodies of unknown length (HTTP/1.1 chunked, HTTP/2 without
    // content-length), streamed in several chunks, with hyper's clients.
    let chunks: Vec<Bytes> = body.chunks(1700).map(Bytes::copy_from_slice).collect();
    let streamed = || {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
            chunks.iter().cloned().map(|c| Ok(Frame::data(c))).collect();
        rbody::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    };
    for (path, up_protocol) in [("/h1/chunked", "HTTP/1.1"), ("/h2/chunked", "HTTP/2.0")] {
        let mut tx = h1_connect(addr).await;
        let req = Request::post(path).header(HOST, authority.as_str()).body(streamed()).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let v = echo_json(&String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()));
        assert_eq!(v["protocol"], up_protocol, "chunked h1 → {path}");
        assert_eq!(v["body_bytes"], body.len(), "chunked h1 → {path}");
        assert_eq!(v["body_fnv"], want_fnv, "chunked h1 → {path}");

        let mut tx = h2c_connect(addr).await;
        let req = Request::post(format!("http://{authority}{path}")).body(streamed()).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let v = echo_json(&String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()));
        assert_eq!(v["protocol"], up_protocol, "unsized h2c → {path}");
        assert_eq!(v["body_bytes"], body.len(), "unsized h2c → {path}");
        assert_eq!(v["body_fnv"], want_fnv, "unsized h2c → {path}");
    }

    // HEAD: the upstream's headers, no body, on every combination.
    for (name, client, path) in [
        ("h1→h1", &h1, "/h1/head"),
        ("h1→h2c", &h1, "/h2/head"),
        ("h2c→h1", &h2, "/h1/head"),
        ("h2c→h2c", &h2, "/h2/head"),
    ] {
        let resp = client
            .head(format!("http://{authority}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("HEAD {name}: {e:?}"));
        assert_eq!(resp.status(), 200, "HEAD {name}");
        assert_eq!(resp.headers().get(CONTENT_TYPE).unwrap(), "application/json", "HEAD {name}");
        let bytes = resp.bytes().await.unwrap();
        assert!(bytes.is_empty(), "HEAD {name}: no body, got {} bytes", bytes.len());
    }

    // The shared echo backend sees the same protocols (and the Host it was
    // sent on HTTP/1.1).
    let echo_port = free_port();
    let echo = support::echo("v1").await;
    let yaml = [
        gateway("gw", echo_port),
        service_entry("echo-h1", "echo-h1.test", 80, "HTTP", &[(echo, "v1")]),
        service_entry("echo-h2", "echo-h2.test", 80, "GRPC", &[(echo, "v1")]),
        gateway_vs(
            "echo",
            "gw",
            &format!("{}{}", prefix_route("/h1/", "echo-h1.test"), prefix_route("/h2/", "echo-h2.test")),
        ),
    ]
    .concat();
    let _p2 = TestProxy::start(&yaml).await;
    for (client, path, proto) in [(client(), "/h1/x", "HTTP/1.1"), (h2c_client(), "/h2/x", "HTTP/2.0")] {
        let resp = client.post(format!("http://127.0.0.1:{echo_port}{path}")).body(body.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v = echo_json(&resp.text().await.unwrap());
        assert_eq!(v["protocol"], proto);
        assert_eq!(v["version"], "v1");
        assert_eq!(v["body_bytes"], body.len());
        if proto == "HTTP/1.1" {
            assert_eq!(v["headers"]["host"], format!("127.0.0.1:{echo_port}"));
        }
    }
}

/// `Expect: 100-continue` (what curl sends with larger bodies): the client
/// gets `100 Continue` promptly instead of waiting out its own timer, then
/// the body goes through, to an HTTP/1.1 and to an h2c upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let port = free_port();
    let upstream = serve(inspect).await;
    let yaml = [
        gateway("gw", port),
        service_entry("up-h1", "up-h1.test", 80, "HTTP", &[(upstream, "v1")]),
        service_entry("up-h2", "up-h2.test", 80, "HTTP2", &[(upstream, "v1")]),
        gateway_vs(
            "vs",
            "gw",
            &format!("{}{}", prefix_route("/h1/", "up-h1.test"), prefix_route("/h2/", "up-h2.test")),
        ),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;
    let body = payload(5000);
    for path in ["/h1/upload", "/h2/upload"] {
        let mut s = TcpStream::connect(proxy_addr(port)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut interim = vec![0u8; 25];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut interim))
            .await
            .unwrap_or_else(|_| panic!("{path}: no 100 Continue within 2 s"))
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{path}");
        s.write_all(&body).await.unwrap();
        let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        let (status, _, resp_body) = parse_raw(&raw);
        assert!(status.contains(" 200 "), "{path}: {status}");
        let v = echo_json(&String::from_utf8_lossy(&resp_body));
        assert_eq!(v["body_bytes"], body.len(), "{path}");
        assert_eq!(v["body_fnv"], fnv1a(&body), "{path}");
    }
}

// === 2. HTTP/1.0 ===

/// An HTTP/1.0 request is answered (and the connection closed, as 1.0 without
/// keep-alive wants), both for a sized upstream response and for a streamed
/// one that HTTP/1.0 can only delimit by closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_is_accepted() {
    const STREAMED: u64 = 300_000;
    let port = free_port();
    let echo = support::echo("v1").await;
    let streamer = serve(|_req| async { Response::new(generated(STREAMED)) }).await;
    let yaml = [
        gateway("gw", port),
        service_entry("echo", "echo.test", 80, "HTTP", &[(echo, "v1")]),
        service_entry("streamer", "streamer.test", 80, "HTTP", &[(streamer, "v1")]),
        gateway_vs("vs", "gw", &format!("{}{}", prefix_route("/stream", "streamer.test"), route_all("echo.test"))),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;
    let addr = proxy_addr(port);

    let (raw, closed) = raw_exchange(addr, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", Duration::from_secs(10)).await;
    assert!(closed, "HTTP/1.0 without keep-alive: the proxy closes after the response");
    let (status, headers, body) = parse_raw(&raw);
    assert!(status.starts_with("HTTP/1.") && status.contains(" 200 "), "status line: {status}");
    let v = echo_json(std::str::from_utf8(&body).unwrap());
    assert_eq!(v["version"], "v1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["headers"]["host"], "x");
    if let Some(len) = header_of(&headers, "content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), body.len());
    }

    let (raw, closed) = raw_exchange(addr, b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n", Duration::from_secs(10)).await;
    assert!(closed);
    let (status, headers, body) = parse_raw(&raw);
    assert!(status.contains(" 200 "), "status line: {status}");
    assert!(header_of(&headers, "transfer-encoding").is_none(), "HTTP/1.0 has no chunked encoding: {headers:?}");
    assert_eq!(body.len() as u64, STREAMED, "streamed body delimited by close");
    assert!(body.iter().all(|b| *b == b'x'));
}

/// The request target and Host reach the upstream as HTTP/1.1 wants them: an
/// absolute-form target without a path goes as `/`, a query as it came, and
/// repeated Host headers as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_and_host_reach_the_upstream_well_formed() {
    let port = free_port();
    let _p = echo_gateway(port).await;
    let addr = proxy_addr(port);
    let cases: [(&[u8], &str, Option<&str>); 3] = [
        (b"GET http://x HTTP/1.0\r\nHost: x\r\n\r\n", "/", None),
        (b"GET /a/b?c=1&d HTTP/1.0\r\nHost: x\r\n\r\n", "/a/b", Some("c=1&d")),
        (b"GET /dup HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n", "/dup", None),
    ];
    for (request, path, query) in cases {
        let (raw, _) = raw_exchange(addr, request, Duration::from_secs(10)).await;
        let (status, _, body) = parse_raw(&raw);
        assert!(status.contains(" 200 "), "{}: {status}", String::from_utf8_lossy(request));
        let v = echo_json(std::str::from_utf8(&body).unwrap());
        assert_eq!(v["path"], path);
        assert_eq!(v["query"].as_str(), query);
        assert_eq!(v["headers"]["host"], "x", "one Host, the routed one: {v}");
    }
}

// === 3. large bodies, bounded memory (the real binary) ===

/// Kills the child proxy when the test ends, passed or panicked.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the child's VmRSS every 50 ms (at most `max` long) and keeps the peak.
fn sample_rss(pid: u32, peak: Arc<AtomicU64>, stop: Arc<AtomicBool>, max: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let end = Instant::now() + max;
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            if let Some(kib) = vm_rss_kib(pid) {
                peak.fetch_max(kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

const GIB: u64 = 1 << 30;
/// Bound on the proxy's resident memory while 1 GiB streams through it each
/// way: streaming must not buffer bodies.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Bound on one 1 GiB transfer (debug build).
const TRANSFER_DEADLINE: Duration = Duration::from_secs(180);

/// 1 GiB up and 1 GiB down through the real binary, HTTP/1.1 end to end and
/// h2c end to end (flow control), with the proxy's RSS sampled throughout and
/// kept under `RSS_BOUND_KIB`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_bounded_memory() {
    // Upstreams: one counts and discards what it receives, one generates.
    let sink = serve(|req: Request<Incoming>| async move {
        match count_body(req.into_body()).await {
            Ok(n) => text_response(StatusCode::OK, n.to_string()),
            Err(e) => text_response(StatusCode::BAD_REQUEST, format!("body error: {e}")),
        }
    })
    .await;
    let source = serve(|_req| async {
        let mut resp = Response::new(generated(GIB));
        resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(GIB));
        resp
    })
    .await;

    let port = free_port();
    let admin = free_port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = [
        gateway("gw", port),
        service_entry("sink", "sink.test", 80, "HTTP", &[(sink, "v1")]),
        service_entry("source", "source.test", 80, "HTTP", &[(source, "v1")]),
        service_entry("sink-h2", "sink-h2.test", 80, "HTTP2", &[(sink, "v1")]),
        service_entry("source-h2", "source-h2.test", 80, "HTTP2", &[(source, "v1")]),
        gateway_vs(
            "big",
            "gw",
            &[
                prefix_route("/upload", "sink.test"),
                prefix_route("/download", "source.test"),
                prefix_route("/h2/upload", "sink-h2.test"),
                prefix_route("/h2/download", "source-h2.test"),
            ]
            .concat(),
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_remora"))
        .arg("run")
        .arg("--config")
        .arg(dir.path())
        .arg("--admin")
        .arg(format!("127.0.0.1:{admin}"))
        .args(["--metrics", &format!("127.0.0.1:{}", support::free_port())])
        .args(["--health", &format!("127.0.0.1:{}", support::free_port())])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let pid = child.0.id();

    let admin_client = client();
    let ready_url = format!("http://127.0.0.1:{admin}/ready");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
            panic!("proxy exited early ({status}):\n{log}");
        }
        if let Ok(r) = admin_client.get(&ready_url).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < end, "proxy not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_kib = vm_rss_kib(pid).unwrap();

    let peak = Arc::new(AtomicU64::new(idle_kib));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, peak.clone(), stop.clone(), 4 * TRANSFER_DEADLINE + Duration::from_secs(10));
    let addr = proxy_addr(port);

    let mut timings = Vec::new();
    for (proto, h2) in [("HTTP/1.1", false), ("h2c", true)] {
        // Upload: 1 GiB generated on the fly, counted by the sink.
        let started = Instant::now();
        let upload = async {
            let path = if h2 { "/h2/upload" } else { "/upload" };
            let req = big_request(h2, path, generated(GIB));
            let resp = send_on_new_connection(addr, h2, req).await;
            let status = resp.status();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&text).into_owned())
        };
        let (status, text) =
            tokio::time::timeout(TRANSFER_DEADLINE, upload).await.unwrap_or_else(|_| panic!("{proto} upload too slow"));
        timings.push((format!("{proto} upload"), started.elapsed()));
        assert_eq!(status, 200, "{proto} upload: {text}");
        assert_eq!(text, GIB.to_string(), "{proto} upload: the sink counted every byte");

        // Download: 1 GiB generated by the source, counted here.
        let started = Instant::now();
        let download = async {
            let path = if h2 { "/h2/download" } else { "/download" };
            let resp = send_on_new_connection(addr, h2, big_request(h2, path, rbody::empty())).await;
            let status = resp.status();
            (status, count_body(resp.into_body()).await.unwrap())
        };
        let (status, n) = tokio::time::timeout(TRANSFER_DEADLINE, download)
            .await
            .unwrap_or_else(|_| panic!("{proto} download too slow"));
        timings.push((format!("{proto} download"), started.elapsed()));
        assert_eq!(status, 200, "{proto} download");
        assert_eq!(n, GIB, "{proto} download: every byte arrived");
    }

    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    if let Some(kib) = vm_rss_kib(pid) {
        peak.fetch_max(kib, Ordering::Relaxed);
    }
    let peak = peak.load(Ordering::Relaxed);
    let timings: Vec<String> = timings
        .iter()
        .map(|(what, d)| format!("{what} 1 GiB in {:.1} s ({:.0} MiB/s)", d.as_secs_f64(), 1024.0 / d.as_secs_f64()))
        .collect();
    println!("proxy RSS: idle {idle_kib} KiB, peak {peak} KiB (bound {RSS_BOUND_KIB} KiB); {}", timings.join(", "));
    assert!(peak < RSS_BOUND_KIB, "proxy RSS peaked at {peak} KiB, bound {RSS_BOUND_KIB} KiB");
}

/// A request to `big.test`: origin-form with `Host` for HTTP/1.1, absolute
/// (`:authority`) for h2c.
fn big_request(h2: bool, path: &str, body: Body) -> Request<Body> {
    let method = if path.ends_with("upload") { http::Method::POST } else { http::Method::GET };
    let mut b = Request::builder().method(method);
    b = if h2 { b.uri(format!("http://big.test{path}")) } else { b.uri(path).header(HOST, "big.test") };
    if path.ends_with("upload") {
        b = b.header(CONTENT_LENGTH, GIB);
    }
    b.body(body).unwrap()
}

async fn send_on_new_connection(addr: SocketAddr, h2: bool, req: Request<Body>) -> Response<Incoming> {
    if h2 {
        h2c_connect(addr).await.send_request(req).await.unwrap()
    } else {
        h1_connect(addr).await.send_request(req).await.unwrap()
    }
}

// === 4. trailers ===

/// h2c client → proxy → h2c upstream: request trailers reach the upstream and
/// response trailers reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_through_h2c() {
    let upstream = serve(|req: Request<Incoming>| async move {
        let collected = match req.into_body().collect().await {
            Ok(c) => c,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("body error: {e}")),
        };
        let seen = collected
            .trailers()
            .and_then(|t| t.get("x-request-trailer"))
            .cloned()
            .unwrap_or(HeaderValue::from_static("none"));
        let body_len = collected.to_bytes().len();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        trailers.insert("x-saw-request-trailer", seen);
        trailers.insert("x-saw-body-bytes", HeaderValue::from(body_len));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::new(rbody::boxed(StreamBody::new(futures_util::stream::iter(frames))))
    })
    .await;
    let port = free_port();
    let yaml = [
        gateway("gw", port),
        service_entry("tr", "trailers.test", 80, "HTTP2", &[(upstream, "v1")]),
        gateway_vs("vs", "gw", &route_all("trailers.test")),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;

    let mut tx = h2c_connect(proxy_addr(port)).await;
    let mut req_trailers = HeaderMap::new();
    req_trailers.insert("x-request-trailer", HeaderValue::from_static("sent-by-client"));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"request body"))), Ok(Frame::trailers(req_trailers))];
    let req = Request::post("http://trailers.test/t")
        .header(TE, "trailers")
        .body(rbody::boxed(StreamBody::new(futures_util::stream::iter(frames))))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await.unwrap().unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers reach the client");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"hello world"));
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    assert_eq!(trailers.get("x-saw-request-trailer").unwrap(), "sent-by-client", "request trailers reach the upstream");
    assert_eq!(trailers.get("x-saw-body-bytes").unwrap(), "12");
}

// === 5. WebSocket ===

/// A WebSocket echo server (tokio-tungstenite) on a fresh loopback port.
async fn ws_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                // Ends when the client closes: tungstenite answers the Close
                // frame itself and then yields None.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_proxy() {
    use tokio_tungstenite::tungstenite::Message;
    let upstream = ws_echo_server().await;
    let port = free_port();
    let yaml = [
        gateway("gw", port),
        service_entry("ws", "ws.test", 80, "HTTP", &[(upstream, "v1")]),
        gateway_vs("vs", "gw", &route_all("ws.test")),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;

    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat")),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    let mut sent = Vec::new();
    for i in 0..5usize {
        sent.push(Message::text(format!("text message {i}")));
        // Sizes from tiny to larger than one read buffer / frame fragment.
        sent.push(Message::binary(payload(1 + i * 40_000)));
    }
    for msg in &sent {
        ws.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .unwrap();
        assert_eq!(&echoed, msg);
    }

    ws.close(None).await.unwrap();
    // After our Close the server answers with its own, then the stream ends.
    let mut got_close = false;
    let end = Instant::now() + Duration::from_secs(10);
    for _ in 0..16 {
        match tokio::time::timeout_at(end, ws.next()).await.expect("close handshake in time") {
            Some(Ok(Message::Close(_))) => got_close = true,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) | None => break,
            Some(Err(e)) => panic!("close handshake failed: {e}"),
        }
    }
    assert!(got_close, "the server's Close frame came back through the proxy");
}

// === 6./7. gRPC ===

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// For the streaming call: how many replies to send.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// For the streaming call: fail with RESOURCE_EXHAUSTED after `count` replies.
    #[prost(bool, tag = "3")]
    pub fail_after: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

/// `test.Echo`: `Unary` echoes (NOT_FOUND for "missing"), `Stream` sends
/// `count` numbered replies.
#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

async fn echo_unary(req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
    // `whoami` answers with the mTLS peer the sidecar in front reported.
    let xfcc = req.metadata().get("x-forwarded-client-cert").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let m = req.into_inner();
    if m.message == "whoami" {
        return Ok(tonic::Response::new(EchoReply { message: xfcc, seq: 0 }));
    }
    if m.message == "missing" {
        return Err(tonic::Status::not_found("no greeting named missing"));
    }
    Ok(tonic::Response::new(EchoReply { message: format!("echo: {}", m.message), seq: 0 }))
}

async fn echo_stream(req: tonic::Request<EchoRequest>) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
    let m = req.into_inner();
    let replies = (0..m.count).map(move |i| Ok(EchoReply { message: format!("{} #{i}", m.message), seq: i }));
    let tail = m.fail_after.then(|| Err(tonic::Status::resource_exhausted("enough for now")));
    let s: ReplyStream = Box::pin(futures_util::stream::iter(replies.chain(tail)));
    Ok(tonic::Response::new(s))
}

impl tower::Service<Request<tonic::body::Body>> for EchoService {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            let path = req.uri().path().to_string();
            Ok(match path.as_str() {
                "/test.Echo/Unary" => grpc.unary(tower::service_fn(echo_unary), req).await,
                "/test.Echo/Stream" => grpc.server_streaming(tower::service_fn(echo_stream), req).await,
                _ => tonic::Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A tonic gRPC server (h2c) for `EchoService` on a fresh loopback port.
async fn grpc_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(EchoService, incoming));
    addr
}

/// A tonic client to the proxy at `port`, sending `:authority` `host`.
async fn grpc_client(port: u16, host: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn call_unary(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    message: &str,
) -> Result<EchoReply, tonic::Status> {
    grpc.ready().await.unwrap();
    let req = EchoRequest { message: message.into(), ..Default::default() };
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    grpc.unary(tonic::Request::new(req), http::uri::PathAndQuery::from_static(path), codec)
        .await
        .map(|r| r.into_inner())
}

async fn call_stream(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    req: EchoRequest,
) -> (Vec<EchoReply>, Result<(), tonic::Status>) {
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Stream");
    let mut stream = match grpc.server_streaming(tonic::Request::new(req), path, codec).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (Vec::new(), Err(s)),
    };
    let mut got = Vec::new();
    // Bounded by the request's count (and the channel's timeout).
    for _ in 0..10_000 {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, Ok(())),
            Err(s) => return (got, Err(s)),
        }
    }
    panic!("stream did not end");
}

/// Unary and server-streaming gRPC through the proxy with tonic on both ends;
/// a server error status reaches the client with its code and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming() {
    let upstream = grpc_server().await;
    let port = free_port();
    let yaml = [
        gateway("gw", port),
        service_entry("grpc", "grpc.test", 80, "GRPC", &[(upstream, "v1")]),
        host_vs("grpc", "grpc.test", "gw", &route_all("grpc.test")),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;
    let mut grpc = grpc_client(port, "grpc.test").await;

    let reply = call_unary(&mut grpc, "/test.Echo/Unary", "hello").await.unwrap();
    assert_eq!(reply, EchoReply { message: "echo: hello".into(), seq: 0 });

    let err = call_unary(&mut grpc, "/test.Echo/Unary", "missing").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no greeting named missing");

    const N: u32 = 50;
    let (got, end) = call_stream(&mut grpc, EchoRequest { message: "tick".into(), count: N, fail_after: false }).await;
    end.unwrap();
    let want: Vec<EchoReply> = (0..N).map(|i| EchoReply { message: format!("tick #{i}"), seq: i }).collect();
    assert_eq!(got, want, "all streamed replies, in order");

    // An error after some messages: the messages, then the status from the trailers.
    let (got, end) =
        call_stream(&mut grpc, EchoRequest { message: "partial".into(), count: 3, fail_after: true }).await;
    assert_eq!(got.len(), 3);
    let err = end.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "enough for now");

    // Unknown method: the upstream's own UNIMPLEMENTED passes through.
    let err = call_unary(&mut grpc, "/test.Echo/Nope", "x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
}

/// Local replies to gRPC callers: no matching route is HTTP 200 with
/// `grpc-status: 12` (Envoy maps its 404); an endpoint that refuses
/// connections is 503 with a body for HTTP callers and `grpc-status: 14` for
/// gRPC callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_local_replies_no_route_and_connect_failure() {
    let upstream = grpc_server().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let port = free_port();
    let yaml = [
        gateway("gw", port),
        service_entry("grpc", "grpc.test", 80, "GRPC", &[(upstream, "v1")]),
        service_entry("down", "down.test", 80, "GRPC", &[(dead, "v1")]),
        host_vs("nr", "grpc-nr.test", "gw", &prefix_route("/other.Service/", "grpc.test")),
        host_vs("down", "down.test", "gw", &route_all("down.test")),
    ]
    .concat();
    let _p = TestProxy::start(&yaml).await;

    // No route, seen by a real gRPC client.
    let mut grpc = grpc_client(port, "grpc-nr.test").await;
    let err = call_unary(&mut grpc, "/test.Echo/Unary", "hello").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

    // ... and on the wire: HTTP 200, grpc-status 12.
    let mut tx = h2c_connect(proxy_addr(port)).await;
    let req = Request::post("http://grpc-nr.test/test.Echo/Unary")
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .body(rbody::boxed(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("grpc-status").map(|v| v.as_bytes()), Some(&b"12"[..]), "{:?}", resp.headers());
    assert!(resp.headers().get(CONTENT_TYPE).unwrap().to_str().unwrap().starts_with("application/grpc"));

    // Connection refused: a plain HTTP caller gets 503 with Envoy's UF text.
    let resp = client().get(format!("http://127.0.0.1:{port}/")).header(HOST, "down.test").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    assert!(body.contains("connection failure"), "UF body: {body:?}");

    // ... and a gRPC caller gets UNAVAILABLE.
    let mut grpc = grpc_client(port, "down.test").await;
    let err = call_unary(&mut grpc, "/test.Echo/Unary", "hello").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

// === 8. abuse limits ===

/// A request with more than 100 headers is refused by the proxy itself (431
/// or closed); exactly 100 is fine. (A direct response, so that no upstream's
/// own header limit is involved: the proxy adds headers when it forwards.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_rejected() {
    let port = free_port();
    let yaml = [gateway("gw", port), gateway_vs("vs", "gw", "  - directResponse:\n      status: 200\n")].concat();
    let _p = TestProxy::start(&yaml).await;
    let request = |extra: usize| {
        let mut r = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 0..extra {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    };
    // Host + Connection + 98 = 100 headers.
    let (raw, _) = raw_exchange(proxy_addr(port), &request(98), Duration::from_secs(10)).await;
    let (status, _, _) = parse_raw(&raw);
    assert!(status.contains(" 200 "), "100 headers are accepted: {status}");

    // 101 and 150 headers.
    for extra in [99, 148] {
        let (raw, closed) = raw_exchange(proxy_addr(port), &request(extra), Duration::from_secs(10)).await;
        assert!(closed, "connection closed after refusing {} headers", extra + 2);
        if !raw.is_empty() {
            let (status, _, _) = parse_raw(&raw);
            assert!(status.contains(" 431 "), "{} headers: {status}", extra + 2);
        }
    }
}

/// Slowloris: a request head that never finishes is cut off by the 15 s
/// header read timeout. This test takes about 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let port = free_port();
    let yaml = [gateway("gw", port), gateway_vs("vs", "gw", "  - directResponse:\n      status: 200\n")].concat();
    let _p = TestProxy::start(&yaml).await;
    let started = Instant::now();
    let (_, closed) = raw_exchange(proxy_addr(port), b"GET / HTTP/1.1\r\nHost: x\r\n", Duration::from_secs(25)).await;
    let elapsed = started.elapsed();
    println!("unfinished request head closed after {elapsed:?}");
    assert!(closed, "the proxy still holds an unfinished request head after 25 s");
    assert!(elapsed >= Duration::from_secs(10), "closed too early ({elapsed:?}) to be the header timeout");
}

/// Connections that send nothing, or only part of the HTTP/2 preface, are
/// closed by the same 15 s bound (while the protocol is not yet known, no HTTP
/// timeout applies). This test takes about 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_cut_off() {
    let port = free_port();
    let yaml = [gateway("gw", port), gateway_vs("vs", "gw", "  - directResponse:\n      status: 200\n")].concat();
    let _p = TestProxy::start(&yaml).await;
    let started = Instant::now();
    let silent = raw_exchange(proxy_addr(port), b"", Duration::from_secs(25));
    let partial_preface = raw_exchange(proxy_addr(port), b"PRI * HTTP/2.0\r\n", Duration::from_secs(25));
    let ((_, silent_closed), (_, partial_closed)) = tokio::join!(silent, partial_preface);
    let elapsed = started.elapsed();
    println!("silent connections closed after {elapsed:?}");
    assert!(elapsed >= Duration::from_secs(10), "closed too early ({elapsed:?}) to be the timeout");
    assert!(silent_closed, "a connection that sends nothing is still open after 25 s");
    assert!(partial_closed, "a connection stuck in the HTTP/2 preface is still open after 25 s");

    // A client that is merely slow to start but then sends a whole request is
    // still served.
    let mut s = TcpStream::connect(proxy_addr(port)).await.unwrap();
    s.write_all(b"GE").await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the pause under test, not a synchronisation
    s.write_all(b"T / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let (status, _, _) = parse_raw(&raw);
    assert!(status.contains(" 200 "), "{status}");
}

/// HTTP/2 rapid reset (CVE-2023-44487 style): a client opening and at once
/// resetting many streams does not take the proxy down; normal requests on
/// new connections still succeed afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_does_not_break_the_proxy() {
    let port = free_port();
    let _p = echo_gateway(port).await;

    const STREAMS: usize = 2000;
    let attack = async {
        let tcp = TcpStream::connect(proxy_addr(port)).await.unwrap();
        let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut reset = 0;
        let mut sender = Some(h2);
        for i in 0..STREAMS {
            let Some(Ok(mut h2)) = (match sender.take() {
                Some(h2) => Some(h2.ready().await),
                None => None,
            }) else {
                break;
            };
            let req = Request::get(format!("http://echo.test/r/{i}")).body(()).unwrap();
            let Ok((_resp, mut stream)) = h2.send_request(req, false) else { break };
            stream.send_reset(h2::Reason::CANCEL);
            reset += 1;
            sender = Some(h2);
        }
        drop(sender);
        let conn_end = tokio::time::timeout(Duration::from_secs(10), conn).await;
        (reset, conn_end)
    };
    let (reset, conn_end) = tokio::time::timeout(Duration::from_secs(60), attack).await.expect("attack loop bounded");
    println!("reset {reset} streams before the proxy stopped accepting; connection ended: {conn_end:?}");
    assert!(reset > 0);

    // The proxy still serves, over both protocols.
    let (status, body) = get(&h2c_client(), &format!("http://127.0.0.1:{port}/after"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(version_of(&body), "v1");
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{port}/after"), &[]).await;
    assert_eq!(status, 200, "{body}");
}

/// gRPC through a client sidecar (ISTIO_MUTUAL) and a server sidecar
/// (STRICT): the app sees the client's SPIFFE ID, streaming works over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_an_mtls_sidecar_pair() {
    let ca = support::certs::Ca::new("mesh");
    let dir = tempfile::tempdir().unwrap();
    let client_id = "spiffe://cluster.local/ns/default/sa/grpc-client";
    ca.workload("spiffe://cluster.local/ns/default/sa/grpc-server").write(&dir.path().join("server"));
    ca.workload(client_id).write(&dir.path().join("client"));
    let app = grpc_server().await;
    let (ingress, egress) = (free_port(), free_port());
    let server_yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s}}\nspec:\n  ingress:\n  - port: {{number: {ingress}, protocol: GRPC, name: grpc}}\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:{}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: STRICT}}}}\n",
        app.port()
    );
    let client_yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: grpc}}\nspec:\n  hosts: [grpc.test]\n  resolution: STATIC\n  ports: [{{number: {egress}, name: grpc, protocol: GRPC}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {ingress}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: grpc}}\nspec:\n  host: grpc.test\n  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: c}}\nspec:\n  egress:\n  - port: {{number: {egress}, protocol: GRPC, name: grpc}}\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n"
    );
    let start = |yaml: String, id: &str, app_label: &str| {
        let identity = dir.path().join(id);
        let cfg_dir = dir.path().join(format!("{id}-config"));
        let app_label = app_label.to_string();
        async move {
            std::fs::create_dir_all(&cfg_dir).unwrap();
            std::fs::write(cfg_dir.join("c.yaml"), yaml).unwrap();
            let opts = remora::runtime::RunOptions {
                config_paths: vec![cfg_dir],
                compile: remora::config::compile::CompileOptions {
                    namespace: "default".into(),
                    workload_labels: [("app".to_string(), app_label)].into(),
                    identity_dir: Some(identity),
                    ..Default::default()
                },
            };
            remora::cli::start_proxy(opts, None).await.unwrap_or_else(|e| panic!("{e:?}")).0
        }
    };
    let _server = start(server_yaml, "server", "grpc-server").await;
    let _client = start(client_yaml, "client", "grpc-client").await;
    let mut grpc = grpc_client(egress, "grpc.test").await;
    let reply = call_unary(&mut grpc, "/test.Echo/Unary", "whoami").await.unwrap();
    assert!(reply.message.contains(&format!("URI={client_id}")), "{reply:?}");
    let (got, end) = call_stream(&mut grpc, EchoRequest { message: "tick".into(), count: 20, fail_after: false }).await;
    end.unwrap();
    assert_eq!(got.len(), 20);
}
