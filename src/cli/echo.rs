//! A small echo backend: answers every request with its version and what it
//! received (method, path, query, headers) as JSON. Serves HTTP/1.1 and h2c.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::body::{self, Body};

/// Binds `addr` and serves echo responses in the background; returns the
/// bound address.
pub async fn spawn(addr: SocketAddr, version: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    serve(listener, version);
    Ok(local)
}

/// Serves echo responses on `listener` in the background.
pub fn serve(listener: TcpListener, version: &str) {
    let version = version.to_string();
    let builder = std::sync::Arc::new(crate::proxy::server::http_builder());
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of fds and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let version = version.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let version = version.clone();
                    async move { Ok::<_, Infallible>(respond(&version, req).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

async fn respond(version: &str, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut headers = Map::new();
    for (k, v) in &parts.headers {
        let v = Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match headers.get_mut(k.as_str()) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.clone(), v]),
            None => {
                headers.insert(k.as_str().to_string(), v);
            }
        }
    }
    // Count the body without keeping it.
    let mut body = body;
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
            Err(_) => break,
        }
    }
    let v = json!({
        "version": version,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "protocol": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = Response::new(body::full(format!("{v}\n")));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(version) {
        resp.headers_mut().insert("x-echo-version", v);
    }
    resp
}
