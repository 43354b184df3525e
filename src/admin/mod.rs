//! The admin API (localhost): readiness and the config dump.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::runtime::Proxy;

/// Binds the admin address and serves it in the background.
pub async fn serve(addr: SocketAddr, proxy: Arc<Proxy>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let builder = Arc::new(crate::proxy::server::http_builder());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let proxy = proxy.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&proxy, req)) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(local)
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

fn handle(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let allowed: &[Method] = match req.uri().path() {
        "/ready" | "/config_dump" => &[Method::GET, Method::HEAD],
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if !allowed.contains(req.method()) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/ready" => {
            if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no config applied yet\n")
            }
        }
        _ => json_response(&config_dump(proxy)),
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
    json!({
        "active": if proxy.is_ready() { snap.dump() } else { serde_json::Value::Null },
        "applied_at_unix": unix_secs(proxy.applied_at()),
        "last_rejection": rejection,
        "config_paths": proxy.options().config_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}
