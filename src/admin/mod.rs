//! The admin API (`--admin`, localhost) and the health port (`--health`).
//!
//! Admin: `GET /ready`, `/live`, `/config_dump`, `/clusters`, `/logging`;
//! `POST /logging?level=...`, `/drain`, `/quitquitquit`. The health port
//! serves only `GET /healthz/ready` (kubelet probes), which answers as
//! `/ready` does; it never exposes anything that changes the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::body::{self, Body};
use crate::runtime::{ApplyOutcome, Proxy, Readiness};
use crate::telemetry::{self, LogFilterError};
use crate::upstream::Cluster;

/// Istio's health port, on every interface: kubelet probes it from outside
/// the pod's loopback.
pub const DEFAULT_HEALTH: &str = "0.0.0.0:15021";
/// The readiness path on the health port (Istio's).
pub const HEALTH_READY_PATH: &str = "/healthz/ready";
/// Pause after a failed accept (out of file descriptors and the like), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Which endpoints a server exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Health,
}

const GET: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::HEAD, Method::POST];
const POST: &[Method] = &[Method::POST];
const GET_PUT_DELETE: &[Method] = &[Method::GET, Method::HEAD, Method::PUT, Method::DELETE];

/// The methods `path` answers on a server with `role`; `None` for paths it
/// does not serve (404).
fn allowed(role: Role, path: &str) -> Option<&'static [Method]> {
    match (role, path) {
        (Role::Health, HEALTH_READY_PATH) => Some(GET),
        (Role::Health, _) => None,
        (Role::Admin, "/ready" | "/live" | "/config_dump" | "/clusters") => Some(GET),
        (Role::Admin, "/logging") => Some(GET_POST),
        (Role::Admin, "/drain" | "/quitquitquit") => Some(POST),
        (Role::Admin, "/config") => Some(GET_PUT_DELETE),
        (Role::Admin, _) => None,
    }
}

/// An admin or health server running in the background. Dropping the handle
/// leaves it running; [`Server::shutdown`] stops it.
pub struct Server {
    addr: SocketAddr,
    /// `Some(bound)`: stop accepting, give open connections `bound` to finish.
    stop: watch::Sender<Option<Duration>>,
    done: watch::Receiver<bool>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits up to `bound` for open connections to finish
    /// their requests (the response to `/quitquitquit` among them).
    pub async fn shutdown(mut self, bound: Duration) {
        self.stop.send_replace(Some(bound));
        let _ = tokio::time::timeout(bound, self.done.wait_for(|d| *d)).await;
    }
}

/// Binds the admin address and serves it in the background.
pub async fn serve(addr: SocketAddr, proxy: Arc<Proxy>) -> std::io::Result<Server> {
    spawn_server(addr, proxy, Role::Admin).await
}

/// Binds the health address and serves `/healthz/ready` in the background.
pub async fn serve_health(addr: SocketAddr, proxy: Arc<Proxy>) -> std::io::Result<Server> {
    spawn_server(addr, proxy, Role::Health).await
}

async fn spawn_server(addr: SocketAddr, proxy: Arc<Proxy>, role: Role) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(None);
    let (done_tx, done) = watch::channel(false);
    tokio::spawn(async move {
        accept_loop(listener, proxy, role, stop_rx).await;
        done_tx.send_replace(true);
    });
    Ok(Server { addr: local, stop, done })
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    role: Role,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let builder = Arc::new(crate::proxy::server::http_builder());
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    // False once the handle is dropped: the server then runs until the process ends.
    let mut handle_alive = true;
    let bound = loop {
        tokio::select! {
            changed = stop.changed(), if handle_alive => {
                if changed.is_err() {
                    handle_alive = false;
                } else if let Some(bound) = *stop.borrow_and_update() {
                    break bound;
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let proxy = proxy.clone();
                let svc = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(role, &proxy, req).await) }
                });
                let served = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let watched = graceful.watch(served);
                conns.spawn(async move {
                    let _ = watched.await;
                });
            }
        }
    };
    drop(listener);
    if tokio::time::timeout(bound, graceful.shutdown()).await.is_err() {
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
}

fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(body::full(s.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_response(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(serde_json::to_vec_pretty(v).unwrap_or_default()));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn method_not_allowed(methods: &[Method]) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    let allow = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    if let Ok(v) = HeaderValue::from_str(&allow) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}

async fn handle(role: Role, proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if role == Role::Admin && path == "/config" && (method == Method::PUT || method == Method::DELETE) {
        let resp = push(proxy, req).await;
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "admin request");
        return resp;
    }
    let resp = route(role, proxy, &req).await;
    tracing::debug!(method = %req.method(), path = req.uri().path(), status = resp.status().as_u16(), "admin request");
    resp
}

async fn route(role: Role, proxy: &Proxy, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let Some(methods) = allowed(role, path) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if !methods.contains(req.method()) {
        return method_not_allowed(methods);
    }
    match path {
        "/ready" | HEALTH_READY_PATH => ready(proxy),
        "/live" => text(StatusCode::OK, "live\n"),
        "/config_dump" => json_response(&config_dump(proxy)),
        "/clusters" => json_response(&clusters(proxy)),
        "/config" => match proxy.pushed() {
            Some(p) => {
                let mut r = text(StatusCode::OK, p.text);
                r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
                r
            }
            None => text(StatusCode::NOT_FOUND, "nothing pushed\n"),
        },
        "/logging" if req.method() == Method::POST => set_logging(req.uri().query()),
        "/logging" => show_logging(),
        "/drain" => {
            let already = proxy.is_draining();
            proxy.start_drain().await;
            let p = proxy.drain_progress();
            let listeners = p.inbound_listeners.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            text(
                StatusCode::OK,
                format!(
                    "{}: inbound listeners not accepting: [{listeners}]; {} connections open on them, {} requests in flight\n",
                    if already { "already draining" } else { "draining" },
                    p.inbound_connections,
                    p.inflight
                ),
            )
        }
        "/quitquitquit" => {
            proxy.request_exit();
            proxy.start_drain().await;
            text(StatusCode::OK, format!("OK: draining (at most {:?}), then exiting\n", proxy.drain_timeout()))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Largest pushed config accepted, as for config files.
const MAX_PUSH_BYTES: usize = 16 * 1024 * 1024;

/// `PUT /config`: replaces the pushed layer (YAML body; `?version=LABEL`
/// names it); `DELETE /config` removes it. 200 with the applied version, or
/// 400 with every error.
async fn push(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt;
    let label = crate::route::matcher::query_value(req.uri().query(), "version");
    let delete = req.method() == Method::DELETE;
    let body = http_body_util::Limited::new(req.into_body(), MAX_PUSH_BYTES);
    let text = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the body: {e}\n")),
    };
    let text = if delete { String::new() } else { String::from_utf8_lossy(&text).into_owned() };
    if !delete && text.trim().is_empty() {
        return text_response_bad("an empty body; use DELETE /config to remove the pushed set");
    }
    match proxy.push(&text, label.clone()).await {
        ApplyOutcome::Applied { version, warnings } => {
            json_response(&json!({"result": "applied", "version": version, "label": label, "warnings": warnings}))
        }
        ApplyOutcome::Unchanged { version } => {
            json_response(&json!({"result": "unchanged", "version": version, "label": label}))
        }
        ApplyOutcome::Rejected { errors } => {
            let mut r = json_response(&json!({
                "result": "rejected",
                "errors": errors.iter().map(|e| json!({
                    "file": e.file.as_ref().map(|f| f.display().to_string()),
                    "line": e.line,
                    "resource": e.resource,
                    "path": e.path,
                    "message": e.message,
                    "text": e.to_string(),
                })).collect::<Vec<_>>(),
            }));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r
        }
    }
}

fn text_response_bad(msg: &str) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, format!("{msg}\n"))
}

fn ready(proxy: &Proxy) -> Response<Body> {
    match proxy.readiness() {
        Readiness::Ready => text(StatusCode::OK, "ready\n"),
        Readiness::NotConfigured => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no config applied yet\n"),
        Readiness::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
    }
}

fn log_error(e: &LogFilterError) -> Response<Body> {
    let status = match e {
        LogFilterError::NotInitialised => StatusCode::SERVICE_UNAVAILABLE,
        LogFilterError::Invalid { .. } => StatusCode::BAD_REQUEST,
        LogFilterError::Reload(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, format!("{e}\n"))
}

fn show_logging() -> Response<Body> {
    match telemetry::log_filter() {
        Ok(f) => text(StatusCode::OK, format!("{f}\n")),
        Err(e) => log_error(&e),
    }
}

fn set_logging(query: Option<&str>) -> Response<Body> {
    let Some(level) = crate::route::matcher::query_value(query, "level") else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?level=: a level (debug, info, ...) or a filter (info,remora::access=debug)\n",
        );
    };
    match telemetry::set_log_filter(&level) {
        Ok(f) => text(StatusCode::OK, format!("{f}\n")),
        Err(e) => log_error(&e),
    }
}

fn unix_secs(t: Option<std::time::SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs())
}

/// The active config, its sources, the last rejection, and what it compiled to.
pub fn config_dump(proxy: &Proxy) -> serde_json::Value {
    let snap = proxy.snapshot();
    let rejection = proxy
        .last_rejection()
        .map(|r| json!({"version": r.version, "at_unix": unix_secs(Some(r.at)), "errors": r.errors}));
    // Certificates by path and fingerprint; key material is never shown.
    let identity = proxy.identity().and_then(|s| s.current()).map(|id| {
        json!({
            "spiffe_id": id.spiffe_id,
            "serial": id.serial,
            "cert_sha256": id.certified.cert.first().map(crate::tls::fingerprint),
            "seconds_to_expiry": id.seconds_to_expiry(),
            "dir": proxy.options().compile.identity_dir.as_ref().map(|p| p.display().to_string()),
        })
    });
    json!({
        "active": if proxy.is_configured() { snap.dump() } else { serde_json::Value::Null },
        "applied_at_unix": unix_secs(proxy.applied_at()),
        "last_rejection": rejection,
        "config_paths": proxy.options().config_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "pushed": proxy.pushed().map(|p| json!({
            "label": p.label,
            "resources": p.set.resources.len(),
            "hash": p.set.files.first().map(|f| f.hash.clone()),
        })),
        "control_plane": proxy.control_status().map(|c| json!({
            "url": c.url,
            "connected": c.connected,
            "connected_since_unix": unix_secs(c.connected_since),
            "last_error": c.last_error,
            "version": proxy.control_plane_version(),
            "resources": proxy.layer(crate::runtime::Layer::ControlPlane).map_or(0, |p| p.set.resources.len()),
        })),
        "identity": identity,
    })
}

/// Every cluster of the active snapshot with its endpoints' runtime state,
/// its circuit-breaker limits and usage, outlier detection, and its stats.
pub fn clusters(proxy: &Proxy) -> serde_json::Value {
    let snap = proxy.snapshot();
    json!({
        "version": snap.version,
        "clusters": snap.clusters.iter().map(|c| cluster_json(c)).collect::<Vec<_>>(),
    })
}

fn cluster_json(c: &Cluster) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let shared = c.shared();
    let s = &c.settings;
    let endpoints: Vec<_> = c
        .endpoints()
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "address": e.state.addr.to_string(),
                "weight": e.weight,
                "labels": *e.labels,
                "health": if e.state.is_ejected() { "ejected" } else { "healthy" },
                "active_requests": e.state.active(),
                "connections": e.state.connections(),
            })
        })
        .collect();
    let outlier = shared.detector.as_ref().map(|d| {
        let st = &d.stats;
        json!({
            "ejections_active": st.ejections_active.load(Relaxed),
            "ejections_enforced_total": st.ejections_enforced_total.load(Relaxed),
            "ejections_overflow": st.ejections_overflow.load(Relaxed),
            "ejections_enforced_consecutive_5xx": st.ejections_enforced_consecutive_5xx.load(Relaxed),
            "ejections_enforced_consecutive_gateway_failure":
                st.ejections_enforced_consecutive_gateway_failure.load(Relaxed),
            "ejections_enforced_consecutive_local_origin_failure":
                st.ejections_enforced_consecutive_local_origin_failure.load(Relaxed),
        })
    });
    let stats: serde_json::Map<String, serde_json::Value> =
        shared.stats.snapshot().into_iter().map(|(name, v)| (name.to_string(), v.into())).collect();
    json!({
        "name": &*c.name,
        "protocol": format!("{:?}", s.protocol),
        // Unset limits print as 4294967295, as Envoy's /clusters shows them.
        "circuit_breakers": {
            "max_connections": s.max_connections,
            "max_pending_requests": s.max_pending,
            "max_requests": s.max_requests,
            "max_retries": s.max_retries,
            "max_requests_per_connection": s.max_requests_per_connection,
        },
        "usage": {
            "connections": shared.connections.load(Relaxed),
            "pending_requests": shared.pending.load(Relaxed),
            "active_requests": shared.active_requests.load(Relaxed),
            "active_retries": shared.active_retries.load(Relaxed),
        },
        "outlier_detection": outlier,
        "stats": stats,
        "endpoints": endpoints,
    })
}
