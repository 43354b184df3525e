//! The one place where proxy failures become responses: each failure has an
//! Envoy response flag, a status, a body, and for gRPC callers a `grpc-status`.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, Body};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matched")]
    NoRoute,
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection failure")]
    ConnectFailure,
    /// A connect failure with its cause (a refused connection, a TLS
    /// verification error), as Envoy's "transport failure reason".
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {0}"
    )]
    TransportFailure(String),
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection termination")]
    ConnectionTermination,
    #[error("upstream request timeout")]
    Timeout,
    #[error("blocked by outboundTrafficPolicy REGISTRY_ONLY")]
    BlackHole,
    #[error("fault filter abort")]
    FaultAbort { status: StatusCode, grpc: Option<u32> },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("upstream protocol error")]
    UpstreamProtocol,
    #[error("passthrough destination is this proxy's own listener")]
    PassthroughLoop,
    #[error("upstream connect error or disconnect/reset before headers. reset reason: overflow")]
    Overflow,
    #[error("RBAC: access denied")]
    Rbac,
    /// Retries ran out; the last attempt failed this way.
    #[error("{0}")]
    Exhausted(Box<ProxyError>),
    #[error("listener is no longer configured")]
    ListenerGone,
}

impl ProxyError {
    /// Envoy's `%RESPONSE_FLAGS%` value for this failure.
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "NR",
            ProxyError::NoHealthyUpstream => "UH",
            ProxyError::ConnectFailure | ProxyError::TransportFailure(_) => "UF",
            ProxyError::ConnectionTermination => "UC",
            ProxyError::Timeout => "UT",
            ProxyError::BlackHole => "NR",
            ProxyError::FaultAbort { .. } => "FI",
            ProxyError::BadRequest(_) => "DPE",
            ProxyError::UpstreamProtocol => "UPE",
            ProxyError::PassthroughLoop => "NR",
            ProxyError::Overflow => "UO",
            ProxyError::Rbac => "RBAC",
            ProxyError::Exhausted(inner) => match inner.flag() {
                "UF" => "UF,URX",
                "UC" => "UC,URX",
                "UT" => "UT,URX",
                "UPE" => "UPE,URX",
                _ => "URX",
            },
            ProxyError::ListenerGone => "NR",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyUpstream
            | ProxyError::ConnectFailure
            | ProxyError::TransportFailure(_)
            | ProxyError::ConnectionTermination => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BlackHole | ProxyError::UpstreamProtocol | ProxyError::PassthroughLoop => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::ListenerGone | ProxyError::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Exhausted(inner) => inner.status(),
            ProxyError::FaultAbort { status, .. } => *status,
            ProxyError::Rbac => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn body(&self) -> String {
        match self {
            // Envoy's local replies for these carry no body.
            ProxyError::NoRoute | ProxyError::BlackHole => String::new(),
            other => other.to_string(),
        }
    }

    /// The local reply. `grpc` is true when the request is a gRPC call: then the
    /// answer is HTTP 200 with a trailers-only `grpc-status`, as Envoy does.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let status = self.status();
        let flag = self.flag();
        if grpc {
            let code = match &self {
                ProxyError::FaultAbort { grpc: Some(code), .. } => *code,
                _ => http_to_grpc_status(status),
            };
            let mut resp = Response::new(body::empty());
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            if let Ok(v) = HeaderValue::from_str(&self.body()) {
                h.insert("grpc-message", v);
            }
            resp.extensions_mut().insert(ResponseFlag(flag));
            return resp;
        }
        let overloaded = matches!(self, ProxyError::Overflow);
        let text = self.body();
        let has_text = !text.is_empty();
        let mut resp = Response::new(if has_text { body::full(text) } else { body::empty() });
        *resp.status_mut() = status;
        if has_text {
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if overloaded {
            resp.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        }
        resp.extensions_mut().insert(ResponseFlag(flag));
        resp
    }
}

/// The response flag attached to a locally generated response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseFlag(pub &'static str);

/// Envoy's HTTP → gRPC status mapping for local replies.
pub fn http_to_grpc_status(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}
