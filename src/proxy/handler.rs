//! The request pipeline: snapshot → virtual host → route → fault → weighted
//! destination → endpoint → upstream → response.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::error::{ProxyError, ResponseFlag};
use crate::body::{self, Body, OnDone};
use crate::route::matcher::query_value;
use crate::route::{AbortKind, Action, Fallback, Forward, RequestView, Route, WeightedCluster, roll};
use crate::snapshot::{Listener, ListenerKind, Snapshot};
use crate::upstream::lb::hash_bytes;
use crate::upstream::{Cluster, EndpointState, HashSource, LbPolicy, PoolSettings, SendError, UpstreamError};

/// Envoy's request header to override the route timeout for one request.
const TIMEOUT_OVERRIDE: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
const X_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const X_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Istio's default retry count for requests that never reached an upstream
/// (`connect-failure`): each retry picks an endpoint again.
const CONNECT_RETRIES: usize = 2;

/// Bound on cached passthrough endpoints (ALLOW_ANY destinations).
const MAX_PASSTHROUGH_ENDPOINTS: usize = 1024;

/// Process-wide state the data path reads.
pub struct ProxyState {
    pub snapshot: ArcSwap<Snapshot>,
    passthrough: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

impl ProxyState {
    pub fn new(snapshot: Arc<Snapshot>) -> Arc<Self> {
        Arc::new(ProxyState { snapshot: ArcSwap::new(snapshot), passthrough: Mutex::new(HashMap::new()) })
    }

    fn passthrough_endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.passthrough.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = map.get(&addr) {
            return ep.clone();
        }
        if map.len() >= MAX_PASSTHROUGH_ENDPOINTS {
            map.retain(|_, ep| ep.connections() > 0 || ep.active() > 0);
        }
        let ep = EndpointState::new(addr, PoolSettings::default());
        map.insert(addr, ep.clone());
        ep
    }
}

/// What the server knows about the downstream connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Per-request facts reported once the response is ready (access log).
struct Outcome {
    flags: &'static str,
    upstream: Option<SocketAddr>,
    cluster: Option<Arc<str>>,
}

pub async fn handle(state: Arc<ProxyState>, conn: ConnInfo, req: Request<Incoming>) -> Response<Body> {
    // The access log is a debug-level event; its fields are only gathered when
    // someone listens, so the common path allocates nothing for it.
    let log = tracing::enabled!(target: "remora::access", tracing::Level::DEBUG)
        .then(|| (Instant::now(), req.method().clone(), req.uri().path().to_string()));
    let grpc = is_grpc(req.headers());
    let snapshot = state.snapshot.load_full();
    let mut outcome = Outcome { flags: "-", upstream: None, cluster: None };
    let resp = match snapshot.listener(&conn.local) {
        Some(listener) => match route_request(&state, &snapshot, listener, conn, req, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(grpc),
        },
        None => ProxyError::ListenerGone.into_response(grpc),
    };
    if let Some((start, method, path)) = log {
        let flags = resp.extensions().get::<ResponseFlag>().map(|f| f.0).unwrap_or(outcome.flags);
        tracing::debug!(
            target: "remora::access",
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            flags,
            cluster = outcome.cluster.as_deref().unwrap_or("-"),
            upstream = ?outcome.upstream,
            duration_ms = start.elapsed().as_millis() as u64,
            "request"
        );
    }
    resp
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn authority_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

async fn route_request(
    state: &Arc<ProxyState>,
    snapshot: &Snapshot,
    listener: &Listener,
    conn: ConnInfo,
    req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    let authority = authority_of(&req).ok_or(ProxyError::BadRequest("missing Host"))?;
    let scheme = req.uri().scheme_str().unwrap_or("http").to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let view = RequestView {
        path: &path,
        query: query.as_deref(),
        method: req.method(),
        authority: &authority,
        scheme: &scheme,
        headers: req.headers(),
        port: conn.local.port(),
    };
    let Some(vh) = listener.routes.find(&authority) else {
        return match listener.routes.fallback {
            Fallback::NotFound => Err(ProxyError::NoRoute),
            Fallback::BlackHole => Err(ProxyError::BlackHole),
            Fallback::Passthrough => passthrough(state, snapshot, conn, req, &authority, outcome).await,
        };
    };
    let Some(route) = vh.find(&view) else {
        return Err(ProxyError::NoRoute);
    };
    match &route.action {
        Action::Direct(d) => {
            let mut resp = Response::new(body::full(d.body.clone()));
            *resp.status_mut() = d.status;
            if !d.body.is_empty() {
                resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            route.response_headers.apply(resp.headers_mut());
            Ok(resp)
        }
        Action::Redirect(r) => {
            let location = r.location(&view, &route.matcher.path);
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = r.code;
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            route.response_headers.apply(resp.headers_mut());
            Ok(resp)
        }
        Action::Forward(fwd) => {
            let query = query.clone();
            forward(route, fwd, listener, conn, req, &authority, &scheme, &path, query.as_deref(), outcome).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    route: &Route,
    fwd: &Forward,
    listener: &Listener,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    authority: &str,
    scheme: &str,
    path: &str,
    query: Option<&str>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    let grpc = is_grpc(req.headers());
    if let Some(fault) = &route.fault {
        if let Some(d) = &fault.delay
            && roll(d.percent)
        {
            outcome.flags = "DI";
            tokio::time::sleep(d.delay).await;
        }
        if let Some(a) = &fault.abort
            && roll(a.percent)
        {
            let (status, grpc_code) = match a.kind {
                AbortKind::Http(s) => (s, None),
                AbortKind::Grpc(c) => (StatusCode::OK, Some(c)),
            };
            if grpc_code.is_some() && !grpc {
                // A gRPC abort on a plain HTTP request still answers as gRPC.
                return Ok(ProxyError::FaultAbort { status, grpc: grpc_code }.into_response(true));
            }
            return Err(ProxyError::FaultAbort { status, grpc: grpc_code });
        }
    }
    let dest: &WeightedCluster = fwd.pick();
    let cluster = &dest.cluster;
    outcome.cluster = Some(cluster.name.clone());

    let timeout = timeout_for(route, req.headers());
    let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let head = req.method() == Method::HEAD;
    let (hash, set_cookie) = hash_key(&cluster.lb, &req, conn.peer.ip(), query);

    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts.headers, conn, listener.kind, scheme, upgrade.is_some());
    route.request_headers.apply(&mut parts.headers);
    dest.request_headers.apply(&mut parts.headers);
    let new_authority = route
        .rewrite
        .as_ref()
        .and_then(|r| r.authority.clone())
        .or_else(|| dest.request_headers.authority.clone())
        .or_else(|| route.request_headers.authority.clone());
    let upstream_authority = match &new_authority {
        Some(v) => v.to_str().unwrap_or(authority).to_string(),
        None => authority.to_string(),
    };
    let mut upstream_path = path.to_string();
    if let Some(uri_rw) = route.rewrite.as_ref().and_then(|r| r.uri.as_ref()) {
        upstream_path = uri_rw.apply(path, &route.matcher.path);
        if let Ok(v) = HeaderValue::from_str(path) {
            parts.headers.insert(X_ORIGINAL_PATH, v);
        }
    }
    let req = Request::from_parts(parts, body::boxed(body));
    let sent = send_with_retries(cluster, hash, req, &upstream_authority, &upstream_path, query, timeout).await;
    let (resp, endpoint, guard, elapsed) = match sent {
        Ok(x) => x,
        Err((e, endpoint)) => {
            outcome.upstream = endpoint;
            return Err(e);
        }
    };
    outcome.upstream = Some(endpoint);
    let mut resp = resp;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = upgrade else {
            return Err(ProxyError::UpstreamProtocol);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
    }
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching);
    if let Ok(v) = HeaderValue::from_str(&elapsed.as_millis().to_string()) {
        rparts.headers.insert(X_SERVICE_TIME, v);
    }
    route.response_headers.apply(&mut rparts.headers);
    dest.response_headers.apply(&mut rparts.headers);
    if let Some(cookie) = set_cookie {
        rparts.headers.append(header::SET_COOKIE, cookie);
    }
    // A response to HEAD has no content (RFC 9110 §9.3.2), whatever the
    // upstream sends: some HTTP/2 servers send DATA anyway, which the h2
    // client rejects as malformed, and forwarding that would reset the
    // client's stream after the headers were ready.
    let body = if head {
        drop(rbody);
        drop(guard);
        body::empty()
    } else {
        body::boxed(OnDone::new(rbody, move || drop(guard)))
    };
    Ok(Response::from_parts(rparts, body))
}

/// Copies bytes both ways between an upgraded client connection and the
/// upgraded upstream connection (WebSocket and other HTTP/1.1 upgrades).
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with error");
    }
}

/// The route timeout, or the client's `x-envoy-upstream-rq-timeout-ms` (as the
/// local app is trusted in a sidecar, Envoy honours it).
fn timeout_for(route: &Route, headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) =
        headers.get(TIMEOUT_OVERRIDE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
    {
        return (ms > 0).then(|| Duration::from_millis(ms));
    }
    route.timeout
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// The consistent-hash key of a request, and a `Set-Cookie` to send when the
/// policy generates its cookie.
fn hash_key(
    lb: &LbPolicy,
    req: &Request<Incoming>,
    peer: IpAddr,
    query: Option<&str>,
) -> (Option<u64>, Option<HeaderValue>) {
    let LbPolicy::ConsistentHash { source, .. } = lb else { return (None, None) };
    match source {
        HashSource::Header(name) => (req.headers().get(name).map(|v| hash_bytes(v.as_bytes())), None),
        HashSource::SourceIp => (Some(hash_bytes(peer.to_string().as_bytes())), None),
        HashSource::QueryParameter(name) => (query_value(query, name).map(|v| hash_bytes(v.as_bytes())), None),
        HashSource::Cookie { name, path, ttl } => {
            if let Some(v) = cookie_value(req.headers(), name) {
                return (Some(hash_bytes(v.as_bytes())), None);
            }
            let Some(ttl) = ttl else { return (None, None) };
            let value = format!("{:016x}", fastrand::u64(..));
            let mut cookie = format!("{name}={value}");
            if !ttl.is_zero() {
                cookie.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
            }
            if let Some(p) = path {
                cookie.push_str(&format!("; Path={p}"));
            }
            cookie.push_str("; HttpOnly");
            (Some(hash_bytes(value.as_bytes())), HeaderValue::from_str(&cookie).ok())
        }
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    for h in headers.get_all(header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for pair in s.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                return Some(v.trim_matches('"').to_string());
            }
        }
    }
    None
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded, including any
/// named in `Connection`. An upgrade keeps `Connection: upgrade` and `Upgrade`.
/// `te: trailers` is kept: gRPC over HTTP/2 requires it.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn prepare_request_headers(headers: &mut HeaderMap, conn: ConnInfo, kind: ListenerKind, scheme: &str, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(TIMEOUT_OVERRIDE);
    // x-forwarded-for: append the peer, as Envoy does.
    let peer = conn.peer.ip().to_string();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {peer}"),
        _ => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    // An edge gateway owns the scheme; a sidecar keeps what the app set.
    if kind == ListenerKind::Gateway || !headers.contains_key(X_FORWARDED_PROTO) {
        let proto = if scheme == "https" { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(X_REQUEST_ID)
        && let Ok(v) = HeaderValue::from_str(&uuid_v4())
    {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> String {
    let r = fastrand::u128(..);
    let r = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{r:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Builds the upstream request for one attempt: protocol version, URI form and
/// Host for the endpoint's protocol.
fn finish_request(
    mut req: Request<Body>,
    ep: &EndpointState,
    authority: &str,
    path: &str,
    query: Option<&str>,
    attempt: usize,
) -> Request<Body> {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let h2 = ep.settings().protocol == crate::upstream::Protocol::Http2;
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        let uri = format!("http://{authority}{pq}");
        *req.uri_mut() = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        *req.version_mut() = Version::HTTP_11;
        if let Ok(v) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        *req.uri_mut() = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    req.headers_mut().insert(X_ATTEMPT_COUNT, HeaderValue::from(attempt));
    req
}

type Sent = (Response<Incoming>, SocketAddr, crate::upstream::pool::ActiveGuard, Duration);

/// Sends to an endpoint of `cluster`, re-picking on connect failures (the
/// request never left the proxy, so this is safe for any method), within the
/// route timeout.
async fn send_with_retries(
    cluster: &Cluster,
    hash: Option<u64>,
    req: Request<Body>,
    authority: &str,
    path: &str,
    query: Option<&str>,
    timeout: Option<Duration>,
) -> Result<Sent, (ProxyError, Option<SocketAddr>)> {
    let started = Instant::now();
    let attempts = async {
        let mut req = req;
        let mut last_addr = None;
        for attempt in 1..=CONNECT_RETRIES + 1 {
            let Some(ep) = cluster.pick(hash) else {
                return Err((ProxyError::NoHealthyUpstream, last_addr));
            };
            last_addr = Some(ep.addr);
            let guard = ep.begin_request();
            let r = finish_request(req, &ep, authority, path, query, attempt);
            match ep.send(r).await {
                Ok(resp) => return Ok((resp, ep.addr, guard)),
                Err(SendError { error, request }) => {
                    tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, %error, attempt, "upstream request failed");
                    match (error.is_connect_failure(), request) {
                        (true, Some(back)) if attempt <= CONNECT_RETRIES => req = back,
                        (true, _) => return Err((ProxyError::ConnectFailure, last_addr)),
                        (false, _) => return Err((map_upstream_error(&error), last_addr)),
                    }
                }
            }
        }
        Err((ProxyError::ConnectFailure, last_addr))
    };
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(r) => r,
            Err(_) => Err((ProxyError::Timeout, None)),
        },
        None => attempts.await,
    };
    result.map(|(resp, addr, guard)| (resp, addr, guard, started.elapsed()))
}

fn map_upstream_error(e: &UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_) | UpstreamError::Handshake(_) => {
            ProxyError::ConnectFailure
        }
        UpstreamError::Terminated(err) if err.is_parse() => ProxyError::UpstreamProtocol,
        UpstreamError::Terminated(_) => ProxyError::ConnectionTermination,
    }
}

/// `ALLOW_ANY`: an unknown Host is forwarded to that host as given (the
/// listener's port when it names none), over HTTP/1.1.
async fn passthrough(
    state: &Arc<ProxyState>,
    snapshot: &Snapshot,
    conn: ConnInfo,
    req: Request<Incoming>,
    authority: &str,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    outcome.cluster = Some(Arc::from("PassthroughCluster"));
    let host = crate::route::strip_port(authority).to_string();
    let port = authority
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(']') || authority.starts_with('['))
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(conn.local.port());
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a.collect(),
        Err(_) => return Err(ProxyError::ConnectFailure),
    };
    let Some(addr) = addrs.first().copied() else { return Err(ProxyError::ConnectFailure) };
    if snapshot.listeners.iter().any(|l| points_at_listener(addr, l.addr)) {
        return Err(ProxyError::PassthroughLoop);
    }
    outcome.upstream = Some(addr);
    let ep = state.passthrough_endpoint(addr);
    let guard = ep.begin_request();
    let scheme = req.uri().scheme_str().unwrap_or("http").to_string();
    let upgrade_req = is_upgrade(&req);
    let mut req = req;
    let upgrade = upgrade_req.then(|| hyper::upgrade::on(&mut req));
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts.headers, conn, ListenerKind::SidecarEgress, &scheme, upgrade.is_some());
    let r = finish_request(Request::from_parts(parts, body::boxed(body)), &ep, authority, &path, query.as_deref(), 1);
    let started = Instant::now();
    let mut resp = match ep.send(r).await {
        Ok(resp) => resp,
        Err(e) => return Err(map_upstream_error(&e.error)),
    };
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = upgrade else { return Err(ProxyError::UpstreamProtocol) };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
    }
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching);
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        rparts.headers.insert(X_SERVICE_TIME, v);
    }
    Ok(Response::from_parts(rparts, body::boxed(OnDone::new(rbody, move || drop(guard)))))
}

fn points_at_listener(target: SocketAddr, listener: SocketAddr) -> bool {
    if target.port() != listener.port() {
        return false;
    }
    target.ip() == listener.ip()
        || (listener.ip().is_unspecified() && (target.ip().is_loopback() || target.ip().is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key(KEEP_ALIVE));
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; user=\"bob\"; c=3"));
        assert_eq!(cookie_value(&h, "user").as_deref(), Some("bob"));
        assert_eq!(cookie_value(&h, "zz"), None);
    }
}
