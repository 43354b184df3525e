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
use crate::route::retry::{Attempt, RetryPolicy};
use crate::route::{AbortKind, Action, Fallback, Forward, RequestView, Route, WeightedCluster, roll};
use crate::snapshot::{Listener, ListenerKind, Snapshot};
use crate::telemetry::access;
use crate::telemetry::metrics::{self, Metrics, Special};
use crate::upstream::lb::hash_bytes;
use crate::upstream::outlier::Outcome;
use crate::upstream::pool::{ActiveGuard, RetrySlot, Sent, TcpConnect, bump};
use crate::upstream::{
    Cluster, ClusterShared, Endpoint, EndpointState, HashSource, LbPolicy, PoolSettings, UpstreamError,
};
use std::sync::atomic::AtomicU64;

/// Envoy's request header to override the route timeout for one request.
const TIMEOUT_OVERRIDE: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
const X_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const X_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Bound on cached passthrough endpoints (ALLOW_ANY destinations).
const MAX_PASSTHROUGH_ENDPOINTS: usize = 1024;

/// Process-wide state the data path reads.
pub struct ProxyState {
    pub snapshot: ArcSwap<Snapshot>,
    passthrough: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    /// Limits and stats of `PassthroughCluster` (ALLOW_ANY destinations).
    passthrough_cluster: Arc<ClusterShared>,
    /// Captured inbound traffic to app ports without a `Sidecar` ingress
    /// entry, by app address; connects from 127.0.0.6.
    inbound_passthrough: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    inbound_passthrough_cluster: Arc<ClusterShared>,
    /// Requests being served on any listener, until their response has been
    /// streamed (drain waits for this to reach zero).
    inflight: Arc<std::sync::atomic::AtomicUsize>,
    /// Istio's standard metrics.
    pub metrics: Arc<Metrics>,
    /// The workload identity, when the proxy has one.
    identity: std::sync::OnceLock<Arc<crate::tls::IdentityStore>>,
}

impl ProxyState {
    pub fn new(snapshot: Arc<Snapshot>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ProxyState {
            snapshot: ArcSwap::new(snapshot),
            passthrough: Mutex::new(HashMap::new()),
            passthrough_cluster: ClusterShared::new(PoolSettings::default(), None, Arc::new(TcpConnect)),
            inbound_passthrough: Mutex::new(HashMap::new()),
            inbound_passthrough_cluster: ClusterShared::new(
                PoolSettings {
                    source: Some(IpAddr::V4(crate::config::compile::INBOUND_SOURCE)),
                    ..PoolSettings::default()
                },
                None,
                Arc::new(TcpConnect),
            ),
            inflight: Arc::default(),
            metrics,
            identity: std::sync::OnceLock::new(),
        })
    }

    /// Sets the workload identity (once, at start).
    pub fn set_identity(&self, store: Arc<crate::tls::IdentityStore>) {
        let _ = self.identity.set(store);
    }

    pub fn identity(&self) -> Option<Arc<crate::tls::IdentityStore>> {
        self.identity.get().cloned()
    }

    /// Requests in flight on all listeners.
    pub fn inflight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The endpoint for a passthrough destination: outbound (`ALLOW_ANY`), or
    /// the app behind captured inbound traffic.
    fn passthrough_endpoint(&self, addr: SocketAddr, inbound: bool) -> Arc<EndpointState> {
        let (map, cluster) = if inbound {
            (&self.inbound_passthrough, &self.inbound_passthrough_cluster)
        } else {
            (&self.passthrough, &self.passthrough_cluster)
        };
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = map.get(&addr) {
            return ep.clone();
        }
        if map.len() >= MAX_PASSTHROUGH_ENDPOINTS {
            map.retain(|_, ep| ep.connections() > 0 || ep.active() > 0);
        }
        let ep = EndpointState::new(addr, cluster.clone());
        map.insert(addr, ep.clone());
        ep
    }
}

/// What the server knows about the downstream connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The verified mesh identity of an mTLS peer.
    pub identity: Option<Arc<crate::tls::inbound::Peer>>,
    /// `x-forwarded-client-cert` for requests on this mTLS connection.
    pub xfcc: Option<HeaderValue>,
    /// The client connected over TLS to a gateway (the request's scheme is https).
    pub secure: bool,
    /// Where a captured connection was headed before the capture rules
    /// redirected it (`SO_ORIGINAL_DST`).
    pub original_dst: Option<SocketAddr>,
    /// The peer's IP as a header value (`x-forwarded-for`), made once per
    /// connection rather than once per request.
    pub peer_ip: HeaderValue,
}

/// The peer's IP as a header value, for [`ConnInfo::peer_ip`].
pub fn peer_ip_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Per-request facts gathered while routing, reported when the response has
/// been streamed (metrics and access log).
#[derive(Default)]
struct LogFacts {
    flags: &'static str,
    upstream: Option<SocketAddr>,
    cluster: Option<Arc<str>>,
    route: Option<Arc<str>>,
    /// The metrics series of the destination (endpoint, or cluster when none
    /// was picked, or a special destination).
    target: Option<Arc<metrics::Target>>,
    upstream_time: Option<Duration>,
}

/// Counts a request in flight until dropped.
struct Inflight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What is reported when a request ends: Istio metrics and the access log.
/// Dropped without [`Finish::done`] (the client went away before a response),
/// it reports response code 0 with flag `DC`, as Envoy.
struct Finish {
    start: Instant,
    /// The mTLS peer, for `source_principal` and the access log.
    peer: Option<Arc<str>>,
    wall: Option<std::time::SystemTime>,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
    request_head: u64,
    facts: LogFacts,
    fallback: Arc<metrics::Target>,
    log: Option<access::Entry>,
    status: u16,
    response_head: u64,
    grpc_status: Option<u32>,
    reported: bool,
    _inflight: Inflight,
}

impl Finish {
    fn report(&mut self, response_body: u64, completed: bool) {
        if self.reported {
            return;
        }
        self.reported = true;
        let mut flags = self.facts.flags;
        if !completed {
            flags = if flags == "-" { "DC" } else { flags };
        }
        let code = if self.status == 0 { 0 } else { self.status };
        let outcome =
            metrics::Outcome { peer: self.peer.clone(), grpc: self.grpc, code, grpc_status: self.grpc_status, flags };
        let duration = self.start.elapsed();
        let req_bytes = self.request_head + self.request_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let resp_bytes = if self.status == 0 { 0 } else { self.response_head + response_body };
        let target = self.facts.target.as_ref().unwrap_or(&self.fallback);
        target.record(outcome, duration, req_bytes, resp_bytes);
        if let Some(mut e) = self.log.take() {
            e.start = self.wall;
            e.status = code;
            e.flags = flags;
            e.bytes_received = req_bytes;
            e.bytes_sent = resp_bytes;
            e.duration_ms = duration.as_millis() as u64;
            e.upstream_service_time_ms = self.facts.upstream_time.map(|d| d.as_millis() as u64);
            e.upstream_host = self.facts.upstream.map(|a| a.to_string());
            e.cluster = self.facts.cluster.as_deref().map(str::to_string);
            e.route = self.facts.route.as_deref().map(str::to_string);
            e.peer_principal = self.peer.as_deref().map(str::to_string);
            access::log(e);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        // Not reported yet: the client went away before the response began.
        self.status = 0;
        self.report(0, false);
    }
}

/// Length of a request target as written on the wire, without formatting it.
fn uri_len(uri: &Uri) -> u64 {
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    let pq = uri.path_and_query().map_or(1, |p| p.as_str().len());
    (scheme + authority + pq) as u64
}

/// Approximate wire size of a header block (`name: value\r\n`).
fn head_bytes(headers: &HeaderMap) -> u64 {
    headers.iter().map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64).sum::<u64>() + 2
}

pub async fn handle(state: Arc<ProxyState>, conn: ConnInfo, req: Request<Incoming>) -> Response<Body> {
    state.inflight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let inflight = Inflight(state.inflight.clone());
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // Generated here (not only upstream) so the access log carries it.
    if !parts.headers.contains_key(X_REQUEST_ID) {
        parts.headers.insert(X_REQUEST_ID, request_id());
    }
    let grpc = is_grpc(&parts.headers);
    let log = access::enabled().then(|| access::Entry {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default(),
        protocol: match parts.version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/1.1",
        },
        authority: parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("-")
            .to_string(),
        request_id: parts.headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string(),
        user_agent: parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
        peer: conn.peer.to_string(),
        ..Default::default()
    });
    let request_bytes = Arc::new(AtomicU64::new(0));
    let request_head = head_bytes(&parts.headers) + uri_len(&parts.uri) + 14;
    let req = Request::from_parts(parts, body::boxed(body::Counted::new(body, request_bytes.clone())));
    let snapshot = state.snapshot.load_full();
    let listener = snapshot.route_listener(&conn.local, conn.original_dst).cloned();
    let fallback = state.metrics.special(match listener.as_ref().map(|l| l.kind) {
        Some(ListenerKind::SidecarIngress) => Special::InboundUnknown,
        _ => Special::Unknown,
    });
    let mut finish = Finish {
        start,
        peer: conn.identity.as_ref().map(|p| Arc::from(p.spiffe_id.as_str())),
        wall: log.is_some().then(std::time::SystemTime::now),
        grpc,
        request_bytes,
        request_head,
        facts: LogFacts { flags: "-", ..Default::default() },
        fallback,
        log,
        status: 0,
        response_head: 0,
        grpc_status: None,
        reported: false,
        _inflight: inflight,
    };
    let resp = match &listener {
        Some(listener) => match route_request(&state, &snapshot, listener, &conn, req, &mut finish.facts).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(grpc),
        },
        None => ProxyError::ListenerGone.into_response(grpc),
    };
    if let Some(f) = resp.extensions().get::<ResponseFlag>() {
        finish.facts.flags = f.0;
    }
    finish.status = resp.status().as_u16();
    finish.response_head = head_bytes(resp.headers()) + 17;
    finish.grpc_status = resp.headers().get(GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let (rparts, rbody) = resp.into_parts();
    let body = body::boxed(body::Finished::new(rbody, move |bytes, completed| {
        let mut f = finish;
        f.report(bytes, completed);
    }));
    Response::from_parts(rparts, body)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The request's authority, from the URI or else the Host header. Both share
/// the buffer the request was read into, so holding one copies nothing.
enum RequestAuthority {
    Uri(http::uri::Authority),
    Host(HeaderValue),
}

impl RequestAuthority {
    fn as_str(&self) -> &str {
        match self {
            RequestAuthority::Uri(a) => a.as_str(),
            // Checked to be text when taken (`authority_of`).
            RequestAuthority::Host(h) => h.to_str().unwrap_or_default(),
        }
    }
}

fn authority_of(req: &Request<Body>) -> Option<RequestAuthority> {
    if let Some(a) = req.uri().authority() {
        return Some(RequestAuthority::Uri(a.clone()));
    }
    let host = req.headers().get(header::HOST).filter(|h| h.to_str().is_ok())?;
    Some(RequestAuthority::Host(host.clone()))
}

/// The request's scheme: what the URI says (HTTP/2, absolute form), else
/// that of the connection.
fn scheme_of(uri: &Uri, secure: bool) -> std::borrow::Cow<'static, str> {
    match uri.scheme_str() {
        None if secure => "https".into(),
        None | Some("http") => "http".into(),
        Some("https") => "https".into(),
        Some(other) => other.to_string().into(),
    }
}

async fn route_request(
    state: &Arc<ProxyState>,
    snapshot: &Snapshot,
    listener: &Listener,
    conn: &ConnInfo,
    req: Request<Body>,
    outcome: &mut LogFacts,
) -> Result<Response<Body>, ProxyError> {
    let authority = authority_of(&req).ok_or(ProxyError::BadRequest("missing Host"))?;
    let authority = authority.as_str();
    if !listener.authz.is_empty() {
        let attrs = crate::authz::Request {
            principal: conn.identity.as_ref().map(|p| p.principal()),
            source_ip: conn.peer.ip(),
            // Captured: the port the peer dialled, as Envoy's destination.port.
            destination_port: conn.original_dst.map_or(listener.authz_port, |d| d.port()),
            http: Some(crate::authz::HttpAttrs {
                method: req.method().as_str(),
                host: crate::route::strip_port(authority),
                path: req.uri().path(),
                headers: req.headers(),
            }),
        };
        if let crate::authz::Decision::Deny { policy } = listener.authz.evaluate(&attrs) {
            tracing::debug!(%policy, peer = %conn.peer, "request denied by authorization");
            return Err(ProxyError::Rbac);
        }
    }
    let scheme = scheme_of(req.uri(), conn.secure);
    // A clone shares the request's buffer: path and query are borrowed from it.
    let uri = req.uri().clone();
    let (path, query) = (uri.path(), uri.query());
    let view = RequestView {
        path,
        query,
        method: req.method(),
        authority,
        scheme: &scheme,
        headers: req.headers(),
        port: conn.local.port(),
    };
    let Some(vh) = listener.routes.find(authority) else {
        return match listener.routes.fallback {
            Fallback::NotFound => Err(ProxyError::NoRoute),
            Fallback::BlackHole => {
                outcome.target = Some(state.metrics.special(Special::BlackHole));
                Err(ProxyError::BlackHole)
            }
            // Boxed for the reason `forward` is.
            Fallback::Passthrough => Box::pin(passthrough(state, snapshot, conn, req, authority, outcome, false)).await,
            Fallback::InboundPassthrough => {
                Box::pin(passthrough(state, snapshot, conn, req, authority, outcome, true)).await
            }
        };
    };
    let Some(route) = vh.find(&view) else {
        return Err(ProxyError::NoRoute);
    };
    if access::enabled() {
        outcome.route = Some(Arc::from(route.name.as_str()));
    }
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
            // Boxed: hyper keeps room for the service's future on every
            // connection, idle ones included; the exchange's state is only
            // needed while a request is in flight.
            Box::pin(forward(route, fwd, listener, conn, req, authority, &scheme, path, query, outcome)).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    route: &Route,
    fwd: &Forward,
    listener: &Listener,
    conn: &ConnInfo,
    mut req: Request<Body>,
    authority: &str,
    scheme: &str,
    path: &str,
    query: Option<&str>,
    outcome: &mut LogFacts,
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

    // The route timeout starts after any injected delay, as in Envoy.
    let deadline = timeout_for(route, req.headers()).map(|t| Instant::now() + t);
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
        Some(v) => v.to_str().unwrap_or(authority),
        None => authority,
    };
    let mut upstream_path = std::borrow::Cow::Borrowed(path);
    if let Some(uri_rw) = route.rewrite.as_ref().and_then(|r| r.uri.as_ref()) {
        upstream_path = uri_rw.apply(path, &route.matcher.path).into();
        if let Ok(v) = HeaderValue::from_str(path) {
            parts.headers.insert(X_ORIGINAL_PATH, v);
        }
    }

    // http2MaxRequests: admitted for the whole exchange, retries included.
    let slot = cluster.shared().admit().map_err(|_| ProxyError::Overflow)?;
    // An upgraded connection is never retried: its bytes are the tunnel's.
    let policy = if upgrade.is_some() { None } else { route.retry.as_ref() };
    let needs_copy = policy.is_some_and(RetryPolicy::needs_replay) || !route.mirrors.is_empty();
    let mut source = BodySource::new(body, needs_copy);
    let target = Target { authority: upstream_authority, path: &upstream_path, query, downstream: &parts.uri };
    for m in &route.mirrors {
        if roll(m.percent) {
            spawn_mirror(m.cluster.clone(), &parts, &target, &source);
        }
    }
    let started = Instant::now();
    let exchange = Exchange { cluster, policy, hash, template: &parts, target, deadline };
    let done = exchange.run(&mut source, parts.method.clone()).await;
    let (sent, endpoint, guard, urx) = match done {
        Ok(x) => x,
        Err((e, endpoint)) => {
            outcome.upstream = endpoint.as_ref().map(|e| e.state.addr);
            outcome.target = Some(match endpoint {
                Some(e) => e.metrics,
                None => cluster.cluster_metrics.clone(),
            });
            return Err(e);
        }
    };
    if urx {
        outcome.flags = "URX";
    }
    let elapsed = started.elapsed();
    outcome.upstream = Some(endpoint.state.addr);
    outcome.upstream_time = Some(elapsed);
    let tunnel_metrics = endpoint.metrics.clone();
    outcome.target = Some(endpoint.metrics);
    let mut resp = sent.response;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = upgrade else {
            return Err(ProxyError::UpstreamProtocol);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, Some(tunnel_metrics)));
    }
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching);
    rparts.headers.insert(X_SERVICE_TIME, decimal_header(elapsed.as_millis() as u64));
    route.response_headers.apply(&mut rparts.headers);
    dest.response_headers.apply(&mut rparts.headers);
    if let Some(cookie) = set_cookie {
        rparts.headers.append(header::SET_COOKIE, cookie);
    }
    if urx {
        rparts.extensions.insert(ResponseFlag("URX"));
    }
    // Everything that counts this request (endpoint in-flight count, the
    // HTTP/2 stream, the cluster's active requests) is released when the
    // response body has been streamed.
    let release = (guard, sent.lease, slot);
    // A response to HEAD has no content (RFC 9110 §9.3.2), whatever the
    // upstream sends: some HTTP/2 servers send DATA anyway, which the h2
    // client rejects as malformed, and forwarding that would reset the
    // client's stream after the headers were ready.
    let body = if head {
        drop(rbody);
        drop(release);
        body::empty()
    } else {
        body::boxed(OnDone::new(rbody, move || drop(release)))
    };
    Ok(Response::from_parts(rparts, body))
}

/// Copies bytes both ways between an upgraded client connection and the
/// upgraded upstream connection (WebSocket and other HTTP/1.1 upgrades).
/// The tunnel is reported in Istio's TCP metrics when `metrics` is given.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    metrics: Option<Arc<metrics::Target>>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    if let Some(m) = &metrics {
        m.tcp_opened();
    }
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let (received, sent) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(counts) => counts,
        Err(e) => {
            tracing::debug!(error = %e, "upgraded connection ended with error");
            (0, 0)
        }
    };
    if let Some(m) = &metrics {
        m.tcp_closed(sent, received);
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
    req: &Request<Body>,
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
    const CONNECTION: u8 = 1;
    const TE: u8 = 2;
    const TRANSFER_ENCODING: u8 = 4;
    const UPGRADE: u8 = 8;
    const KEEP_ALIVE_: u8 = 16;
    const PROXY_CONNECTION_: u8 = 32;
    // One pass over the names, without hashing, noting which are present:
    // most messages carry none of these or only `Connection: keep-alive`,
    // and removing absent headers one by one costs a lookup each.
    let mut present = 0u8;
    for n in headers.keys() {
        present |= if n == header::CONNECTION {
            CONNECTION
        } else if n == header::TE {
            TE
        } else if n == header::TRANSFER_ENCODING {
            TRANSFER_ENCODING
        } else if n == header::UPGRADE {
            UPGRADE
        } else if *n == KEEP_ALIVE {
            KEEP_ALIVE_
        } else if *n == PROXY_CONNECTION {
            PROXY_CONNECTION_
        } else {
            0
        };
    }
    if present & CONNECTION != 0 {
        // Headers named as connection options. `keep-alive`, `close` and
        // `upgrade` need no lookup: the first is removed below anyway, the
        // second names no header, the third is decided by `upgrade`.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in
            headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','))
        {
            let token = token.trim();
            if token.is_empty()
                || ["keep-alive", "close", "upgrade"].iter().any(|known| token.eq_ignore_ascii_case(known))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(n);
            }
        }
        for n in named {
            headers.remove(n);
        }
    }
    if present & KEEP_ALIVE_ != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if present & PROXY_CONNECTION_ != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if present & TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & TE != 0 {
        let te_trailers = headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & CONNECTION != 0 {
            headers.remove(header::CONNECTION);
        }
        if present & UPGRADE != 0 {
            headers.remove(header::UPGRADE);
        }
    }
}

fn prepare_request_headers(headers: &mut HeaderMap, conn: &ConnInfo, kind: ListenerKind, scheme: &str, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(TIMEOUT_OVERRIDE);
    // Toward the app, XFCC is the proxy's statement about the mTLS peer; one
    // sent by the client is never passed on.
    if kind == ListenerKind::SidecarIngress {
        headers.remove(X_FORWARDED_CLIENT_CERT);
        if let Some(v) = &conn.xfcc {
            headers.insert(X_FORWARDED_CLIENT_CERT, v.clone());
        }
    }
    // x-forwarded-for: append the peer, as Envoy does.
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).unwrap_or_else(|_| conn.peer_ip.clone())
        }
        _ => conn.peer_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, xff);
    // An edge gateway owns the scheme; a sidecar keeps what the app set.
    if kind == ListenerKind::Gateway || !headers.contains_key(X_FORWARDED_PROTO) {
        let proto = if scheme == "https" { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID, request_id());
    }
}

/// A random (version 4) UUID, as text (`8-4-4-4-12` hex digits).
fn uuid_v4_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let r = fastrand::u128(..);
    let r = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut out = [b'-'; 36];
    let mut j = 0;
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            j += 1;
        }
        out[j] = HEX[((r >> (124 - 4 * i)) & 0xf) as usize];
        j += 1;
    }
    out
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> String {
    String::from_utf8_lossy(&uuid_v4_bytes()).into_owned()
}

/// A fresh `x-request-id` value (a UUID), made without going through a String.
fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&uuid_v4_bytes()).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Where a request goes upstream: authority (Host) and path after rewrites.
struct Target<'a> {
    authority: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    /// The downstream request's URI: reused upstream when path and query
    /// are unchanged, which saves building a new one.
    downstream: &'a Uri,
}

/// A small decimal number as a header value (attempt counts, service times):
/// below 1,000 from a table made once, so it costs no allocation.
fn decimal_header(n: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    const SIZE: u64 = 1000;
    if n >= SIZE {
        return HeaderValue::from(n);
    }
    let table = TABLE.get_or_init(|| {
        let text: &'static str = Box::leak((0..SIZE).map(|i| i.to_string()).collect::<String>().into_boxed_str());
        let mut at = 0;
        (0..SIZE)
            .map(|i| {
                let len = if i < 10 {
                    1
                } else if i < 100 {
                    2
                } else {
                    3
                };
                let v = HeaderValue::from_static(&text[at..at + len]);
                at += len;
                v
            })
            .collect()
    });
    table[n as usize].clone()
}

/// Builds the upstream request for one attempt: protocol version, URI form and
/// Host for the endpoint's protocol, and the attempt count.
fn finish_request(mut req: Request<Body>, ep: &EndpointState, t: &Target<'_>, attempt: u32) -> Request<Body> {
    let pq = || match t.query {
        Some(q) => format!("{}?{q}", t.path),
        None => t.path.to_string(),
    };
    let h2 = ep.settings().protocol == crate::upstream::Protocol::Http2;
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        let uri = format!("http://{}{}", t.authority, pq());
        *req.uri_mut() = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        *req.version_mut() = Version::HTTP_11;
        // The downstream Host is kept when it is already the target and
        // the only one; otherwise it is set (which also collapses repeats).
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let keep = matches!((hosts.next(), hosts.next()), (Some(h), None) if h.as_bytes() == t.authority.as_bytes());
        if !keep && let Ok(v) = HeaderValue::from_str(t.authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        // The downstream target is reused when path and query are unchanged
        // and it is not empty (absolute form without a path: `/` is sent).
        *req.uri_mut() = match t.downstream.path_and_query() {
            Some(same) if !same.as_str().is_empty() && same.path() == t.path && same.query() == t.query => {
                Uri::from(same.clone())
            }
            _ => pq().parse().unwrap_or_else(|_| Uri::from_static("/")),
        };
    }
    req.headers_mut().insert(X_ATTEMPT_COUNT, decimal_header(u64::from(attempt)));
    req
}

/// A request body that may have to be sent more than once.
enum BodySource {
    /// No body: every attempt sends an empty one.
    Empty,
    /// Sent once; a retry is possible only while it has not been sent.
    Once(Option<Body>),
    /// Recorded up to [`body::REPLAY_LIMIT`] for retries and mirrors.
    Recorded(body::Recorder),
}

impl BodySource {
    fn new(b: Body, copy: bool) -> Self {
        if http_body::Body::is_end_stream(&b) {
            BodySource::Empty
        } else if copy {
            BodySource::Recorded(body::Recorder::new(b))
        } else {
            BodySource::Once(Some(b))
        }
    }

    fn take(&mut self) -> Option<Body> {
        match self {
            BodySource::Empty => Some(body::empty()),
            BodySource::Once(b) => b.take(),
            BodySource::Recorded(r) => Some(r.body()),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            BodySource::Empty => true,
            BodySource::Once(b) => b.is_some(),
            BodySource::Recorded(r) => r.can_replay(),
        }
    }
}

type Exchanged = (Sent, Endpoint, ActiveGuard, bool);

/// One request's attempts against a cluster: endpoint picks, per-try and
/// route timeouts, retries with backoff, outlier-detection accounting.
struct Exchange<'a> {
    cluster: &'a Cluster,
    policy: Option<&'a RetryPolicy>,
    hash: Option<u64>,
    template: &'a http::request::Parts,
    target: Target<'a>,
    deadline: Option<Instant>,
}

enum Failure {
    Upstream(UpstreamError),
    PerTryTimeout,
    RouteTimeout,
}

impl Exchange<'_> {
    fn request(&self, method: &Method, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = method.clone();
        *r.headers_mut() = self.template.headers.clone();
        r
    }

    /// Runs attempts until one gives a response to return or a failure that
    /// is not retried. The flag is true when retries ran out on a retriable
    /// outcome (Envoy's `URX`).
    async fn run(&self, source: &mut BodySource, method: Method) -> Result<Exchanged, (ProxyError, Option<Endpoint>)> {
        let shared = self.cluster.shared();
        let stats = &shared.stats;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut handed_back: Option<Request<Body>> = None;
        let mut _retry_slot: Option<RetrySlot> = None;
        let mut attempt: u32 = 0;
        let mut last: Option<Endpoint> = None;
        loop {
            attempt += 1;
            let avoid: &[SocketAddr] = if self.policy.is_some_and(|p| p.avoid_previous_hosts) { &tried } else { &[] };
            let Some(picked) = self.cluster.pick(self.hash, avoid) else {
                return Err((ProxyError::NoHealthyUpstream, last));
            };
            let ep = picked.state.clone();
            last = Some(picked.clone());
            tried.push(ep.addr);
            let guard = ep.begin_request();
            let req = match handed_back.take() {
                Some(r) => r,
                None => match source.take() {
                    Some(b) => self.request(&method, b),
                    None => return Err((ProxyError::ConnectFailure, Some(picked.clone()))),
                },
            };
            let req = finish_request(req, &ep, &self.target, attempt);
            let per_try = self.policy.and_then(|p| p.per_try_timeout).map(|t| Instant::now() + t);
            let limit = match (per_try, self.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let result = match limit {
                Some(at) => match tokio::time::timeout_at(at, ep.send(req)).await {
                    Ok(r) => r.map_err(|e| (Failure::Upstream(e.error), e.request)),
                    Err(_) if self.deadline.is_some_and(|d| at >= d) => Err((Failure::RouteTimeout, None)),
                    Err(_) => Err((Failure::PerTryTimeout, None)),
                },
                None => ep.send(req).await.map_err(|e| (Failure::Upstream(e.error), e.request)),
            };
            let hosts = self.cluster.endpoints().len();
            let detector = shared.detector.as_ref();
            let record = |o: Outcome| {
                if let Some(d) = detector {
                    d.record(ep.as_ref(), o, hosts, Instant::now());
                }
            };
            let (attempt_kind, error) = match result {
                Ok(sent) => {
                    let status = sent.response.status().as_u16();
                    record(Outcome::Response(status));
                    let kind = Attempt::Response { status, headers: sent.response.headers() };
                    let retriable = self.policy.is_some_and(|p| p.retriable(kind));
                    if !retriable {
                        if attempt > 1 {
                            bump(&stats.upstream_rq_retry_success);
                        }
                        return Ok((sent, picked.clone(), guard, false));
                    }
                    if !self.may_retry(attempt, source) {
                        return Ok((sent, picked.clone(), guard, self.exhausted(attempt)));
                    }
                    match shared.begin_retry() {
                        Some(slot) => _retry_slot = Some(slot),
                        None => return Ok((sent, picked.clone(), guard, false)),
                    }
                    drop(sent);
                    drop(guard);
                    if !self.backoff(attempt).await {
                        bump(&stats.upstream_rq_timeout);
                        return Err((ProxyError::Timeout, Some(picked.clone())));
                    }
                    continue;
                }
                Err((Failure::Upstream(UpstreamError::Overflow(_)), _)) => {
                    // Overflows are the proxy's own limits: never retried and
                    // never held against the endpoint.
                    return Err((ProxyError::Overflow, Some(picked.clone())));
                }
                Err((Failure::RouteTimeout, _)) => {
                    record(Outcome::Timeout);
                    bump(&stats.upstream_rq_timeout);
                    return Err((ProxyError::Timeout, Some(picked.clone())));
                }
                Err((Failure::PerTryTimeout, _)) => {
                    record(Outcome::Timeout);
                    bump(&stats.upstream_rq_per_try_timeout);
                    (Attempt::PerTryTimeout, ProxyError::Timeout)
                }
                Err((Failure::Upstream(e), back)) => {
                    let (kind, outlier, err) = classify(&e, back.is_some());
                    tracing::debug!(cluster = %self.cluster.name, endpoint = %ep.addr, error = %e, attempt, "upstream attempt failed");
                    record(outlier);
                    handed_back = back;
                    (kind, err)
                }
            };
            drop(guard);
            let retriable = self.policy.is_some_and(|p| p.retriable(attempt_kind));
            if !retriable {
                return Err((error, Some(picked.clone())));
            }
            let replayable = handed_back.is_some() || source.can_replay();
            if !replayable || !self.may_retry_count(attempt) {
                let err = if self.exhausted(attempt) { ProxyError::Exhausted(Box::new(error)) } else { error };
                return Err((err, Some(picked.clone())));
            }
            match shared.begin_retry() {
                Some(slot) => _retry_slot = Some(slot),
                None => return Err((error, Some(picked.clone()))),
            }
            if !self.backoff(attempt).await {
                bump(&stats.upstream_rq_timeout);
                return Err((ProxyError::Timeout, Some(picked.clone())));
            }
        }
    }

    fn may_retry_count(&self, attempt: u32) -> bool {
        self.policy.is_some_and(|p| attempt <= p.retries)
    }

    fn may_retry(&self, attempt: u32, source: &BodySource) -> bool {
        self.may_retry_count(attempt) && source.can_replay()
    }

    /// Retries ran out on a retriable outcome: counted, and flagged `URX`.
    fn exhausted(&self, attempt: u32) -> bool {
        let out = self.policy.is_some_and(|p| attempt > p.retries);
        if out {
            bump(&self.cluster.shared().stats.upstream_rq_retry_limit_exceeded);
        }
        out
    }

    /// Waits the jittered backoff before retry `attempt`; false if the route
    /// timeout expires first.
    async fn backoff(&self, attempt: u32) -> bool {
        let Some(p) = self.policy else { return true };
        let wake = Instant::now() + p.backoff(attempt);
        match self.deadline {
            Some(d) if d <= wake => {
                tokio::time::sleep_until(d).await;
                false
            }
            _ => {
                tokio::time::sleep_until(wake).await;
                true
            }
        }
    }
}

/// How a failed send counts: for the retry decision, for outlier detection,
/// and as the error answered if it is final.
fn classify(e: &UpstreamError, handed_back: bool) -> (Attempt<'static>, Outcome, ProxyError) {
    match e {
        UpstreamError::Connect(io) => {
            (Attempt::ConnectFailure, Outcome::ConnectFailure, ProxyError::TransportFailure(transport_reason(io)))
        }
        UpstreamError::ConnectTimeout(_) | UpstreamError::Handshake(_) => {
            (Attempt::ConnectFailure, Outcome::ConnectFailure, ProxyError::ConnectFailure)
        }
        _ if handed_back => (Attempt::ResetBeforeRequest, Outcome::Reset, ProxyError::ConnectionTermination),
        _ if e.is_refused_stream() => (Attempt::RefusedStream, Outcome::Reset, ProxyError::ConnectionTermination),
        UpstreamError::Terminated(err) if err.is_parse() => {
            (Attempt::Reset, Outcome::Reset, ProxyError::UpstreamProtocol)
        }
        _ => (Attempt::Reset, Outcome::Reset, ProxyError::ConnectionTermination),
    }
}

/// Why a connection could not be made, for the local reply: the TLS error
/// when the handshake failed (an untrusted or unexpected peer certificate),
/// else the socket error.
fn transport_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("TLS error: {tls}"),
        None => e.to_string(),
    }
}

/// Host of a mirrored request: `-shadow` appended to the host part, as Envoy.
fn shadow_authority(authority: &str) -> String {
    let host = crate::route::strip_port(authority);
    if host.len() == authority.len() || authority.starts_with('[') {
        return format!("{authority}-shadow");
    }
    format!("{host}-shadow{}", &authority[host.len()..])
}

/// Bound on a mirrored request, so a slow mirror cannot pile up work.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Fire-and-forget copy of a request to a mirror cluster. The primary never
/// waits for it; its response is read and discarded. A body larger than the
/// replay limit is not mirrored.
fn spawn_mirror(cluster: Arc<Cluster>, parts: &http::request::Parts, t: &Target<'_>, source: &BodySource) {
    let body = match source {
        BodySource::Empty => MirrorBody::Empty,
        BodySource::Recorded(r) => MirrorBody::Recorded(r.clone()),
        BodySource::Once(_) => {
            bump(&cluster.shared().stats.upstream_rq_mirror_dropped);
            return;
        }
    };
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let (authority, path, query) = (shadow_authority(t.authority), t.path.to_string(), t.query.map(str::to_string));
    let downstream = t.downstream.clone();
    tokio::spawn(async move {
        let stats = &cluster.shared().stats;
        let Ok(_slot) = cluster.shared().admit() else {
            bump(&stats.upstream_rq_mirror_dropped);
            return;
        };
        let body = match body {
            MirrorBody::Empty => body::empty(),
            MirrorBody::Recorded(r) => match r.complete_body(MIRROR_TIMEOUT).await {
                Some(b) => b,
                None => {
                    bump(&stats.upstream_rq_mirror_dropped);
                    return;
                }
            },
        };
        let Some(ep) = cluster.pick(None, &[]) else {
            bump(&stats.upstream_rq_mirror_dropped);
            return;
        };
        let ep = ep.state;
        let _guard = ep.begin_request();
        let target = Target { authority: &authority, path: &path, query: query.as_deref(), downstream: &downstream };
        let (head, ()) = req.into_parts();
        let req = finish_request(Request::from_parts(head, body), &ep, &target, 1);
        bump(&stats.upstream_rq_mirror);
        let drained = tokio::time::timeout(MIRROR_TIMEOUT, async {
            if let Ok(sent) = ep.send(req).await {
                let mut b = sent.response.into_body();
                while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut b).await {}
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!(cluster = %cluster.name, "mirrored request timed out");
        }
    });
}

enum MirrorBody {
    Empty,
    Recorded(body::Recorder),
}

/// `ALLOW_ANY`: an unknown Host is forwarded to where the app was headed: the
/// original destination of a captured connection, else that host as given
/// (the listener's port when it names none), over HTTP/1.1. `inbound`:
/// captured inbound traffic for an app port, forwarded to the app on that
/// port on loopback.
async fn passthrough(
    state: &Arc<ProxyState>,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    req: Request<Body>,
    authority: &str,
    outcome: &mut LogFacts,
    inbound: bool,
) -> Result<Response<Body>, ProxyError> {
    let (cluster, special) = if inbound {
        ("InboundPassthroughCluster", Special::InboundPassthrough)
    } else {
        ("PassthroughCluster", Special::Passthrough)
    };
    outcome.cluster = Some(Arc::from(cluster));
    outcome.target = Some(state.metrics.special(special));
    let addr = match conn.original_dst {
        Some(dst) if inbound => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), dst.port()),
        Some(dst) => dst,
        None => {
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
            addrs.first().copied().ok_or(ProxyError::ConnectFailure)?
        }
    };
    if snapshot.listeners.iter().any(|l| points_at_listener(addr, l.addr)) {
        return Err(ProxyError::PassthroughLoop);
    }
    outcome.upstream = Some(addr);
    let ep = state.passthrough_endpoint(addr, inbound);
    let guard = ep.begin_request();
    let scheme = req.uri().scheme_str().unwrap_or("http").to_string();
    let upgrade_req = is_upgrade(&req);
    let mut req = req;
    let upgrade = upgrade_req.then(|| hyper::upgrade::on(&mut req));
    let downstream = req.uri().clone();
    let (mut parts, body) = req.into_parts();
    let kind = if inbound { ListenerKind::SidecarIngress } else { ListenerKind::SidecarEgress };
    prepare_request_headers(&mut parts.headers, conn, kind, &scheme, upgrade.is_some());
    let target = Target { authority, path: downstream.path(), query: downstream.query(), downstream: &downstream };
    let r = finish_request(Request::from_parts(parts, body), &ep, &target, 1);
    let started = Instant::now();
    let Sent { response: mut resp, lease } = match ep.send(r).await {
        Ok(sent) => sent,
        Err(e) => return Err(classify(&e.error, e.request.is_some()).2),
    };
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = upgrade else { return Err(ProxyError::UpstreamProtocol) };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, Some(state.metrics.special(special))));
    }
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching);
    rparts.headers.insert(X_SERVICE_TIME, decimal_header(started.elapsed().as_millis() as u64));
    let release = (guard, lease);
    Ok(Response::from_parts(rparts, body::boxed(OnDone::new(rbody, move || drop(release)))))
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
    fn hop_by_hop_tokens_any_case_and_upgrades() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive, X-Other, Upgrade"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(PROXY_CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let mut upgrading = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "left: {h:?}");
        strip_hop_by_hop(&mut upgrading, true);
        assert_eq!(upgrading.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(upgrading.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(upgrading.len(), 2, "left: {upgrading:?}");
        // Nothing hop-by-hop: nothing changes.
        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn decimal_headers() {
        for n in [0u64, 7, 10, 99, 100, 999, 1000, 123_456] {
            assert_eq!(decimal_header(n).to_str().unwrap(), n.to_string());
        }
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; user=\"bob\"; c=3"));
        assert_eq!(cookie_value(&h, "user").as_deref(), Some("bob"));
        assert_eq!(cookie_value(&h, "zz"), None);
    }
}
