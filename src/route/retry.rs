//! Retry policy with Envoy's conditions (`x-envoy-retry-on` and
//! `x-envoy-retry-grpc-on`), Istio's default policy and Envoy's fully
//! jittered exponential backoff.

use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderName;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
const X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

use crate::config::model::HttpRetry;

/// Istio's mesh default: two retries.
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// Envoy's default backoff base interval; the cap is ten times the base.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Retry conditions as bits.
pub mod on {
    pub const FIVE_XX: u32 = 1 << 0;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 3;
    pub const CONNECT_FAILURE: u32 = 1 << 4;
    pub const RETRIABLE_4XX: u32 = 1 << 5;
    pub const REFUSED_STREAM: u32 = 1 << 6;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 7;
    pub const RETRIABLE_HEADERS: u32 = 1 << 8;
    pub const ENVOY_RATELIMITED: u32 = 1 << 9;
    pub const HTTP3_POST_CONNECT_FAILURE: u32 = 1 << 10;
    pub const GRPC_CANCELLED: u32 = 1 << 11;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 12;
    pub const GRPC_INTERNAL: u32 = 1 << 13;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 14;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 15;
}

fn condition(token: &str) -> Option<u32> {
    Some(match token {
        "5xx" => on::FIVE_XX,
        "gateway-error" => on::GATEWAY_ERROR,
        "reset" => on::RESET,
        "reset-before-request" => on::RESET_BEFORE_REQUEST,
        "connect-failure" => on::CONNECT_FAILURE,
        "retriable-4xx" => on::RETRIABLE_4XX,
        "refused-stream" => on::REFUSED_STREAM,
        "retriable-status-codes" => on::RETRIABLE_STATUS_CODES,
        "retriable-headers" => on::RETRIABLE_HEADERS,
        "envoy-ratelimited" => on::ENVOY_RATELIMITED,
        "http3-post-connect-failure" => on::HTTP3_POST_CONNECT_FAILURE,
        "cancelled" => on::GRPC_CANCELLED,
        "deadline-exceeded" => on::GRPC_DEADLINE_EXCEEDED,
        "internal" => on::GRPC_INTERNAL,
        "resource-exhausted" => on::GRPC_RESOURCE_EXHAUSTED,
        "unavailable" => on::GRPC_UNAVAILABLE,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: u32,
    pub status_codes: Vec<u16>,
    /// Prefer endpoints not tried yet (Envoy's `previous_hosts` predicate).
    pub avoid_previous_hosts: bool,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// How one attempt ended, as the retry decision sees it.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    RefusedStream,
    /// The connection failed before any of the request was written.
    ResetBeforeRequest,
    /// Reset or closed after the request was (maybe) written, before a response.
    Reset,
    PerTryTimeout,
    Response {
        status: u16,
        headers: &'a HeaderMap,
    },
}

impl RetryPolicy {
    /// Istio ≥ 1.24's default policy: 2 retries on connection failures,
    /// refused streams and gRPC `unavailable`/`cancelled` — never on an HTTP
    /// 503, which the upstream may have acted on.
    pub fn istio_default() -> Self {
        RetryPolicy {
            retries: DEFAULT_ATTEMPTS,
            per_try_timeout: None,
            on: on::CONNECT_FAILURE
                | on::REFUSED_STREAM
                | on::GRPC_UNAVAILABLE
                | on::GRPC_CANCELLED
                | on::RETRIABLE_STATUS_CODES,
            status_codes: Vec::new(),
            avoid_previous_hosts: true,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_BASE * 10,
        }
    }

    /// The policy for a route: Istio's default when `retries` is absent,
    /// `None` when retries are disabled (`attempts: 0`). Previous-host
    /// avoidance is off for consistent-hash destinations, as in Istio.
    pub fn from_config(r: Option<&HttpRetry>, consistent_hash: bool) -> Option<Self> {
        let mut p = RetryPolicy::istio_default();
        if let Some(r) = r {
            match r.attempts {
                Some(0) => return None,
                Some(n) if n > 0 => p.retries = u32::try_from(n).unwrap_or(u32::MAX),
                _ => {}
            }
            if let Some(t) = r.per_try_timeout.filter(|t| !t.0.is_zero()) {
                p.per_try_timeout = Some(t.0);
            }
            if let Some(list) = &r.retry_on {
                p.on = 0;
                p.status_codes.clear();
                for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if let Ok(code) = token.parse::<u16>() {
                        // Istio moves bare codes into retriable_status_codes.
                        p.status_codes.push(code);
                        p.on |= on::RETRIABLE_STATUS_CODES;
                    } else if let Some(bit) = condition(token) {
                        p.on |= bit;
                    }
                }
            }
            if let Some(b) = r.backoff.filter(|b| !b.0.is_zero()) {
                p.backoff_base = b.0;
                p.backoff_max = b.0 * 10;
            }
            if let Some(ignore) = r.retry_ignore_previous_hosts {
                p.avoid_previous_hosts = ignore;
            }
        }
        if consistent_hash {
            p.avoid_previous_hosts = false;
        }
        Some(p)
    }

    fn has(&self, bit: u32) -> bool {
        self.on & bit != 0
    }

    /// Whether an attempt that ended this way should be retried (given
    /// attempts and budget remain). Circuit-breaker overflows and the global
    /// timeout never reach this question.
    pub fn retriable(&self, a: Attempt<'_>) -> bool {
        match a {
            Attempt::ConnectFailure => self.has(on::CONNECT_FAILURE | on::FIVE_XX | on::GATEWAY_ERROR | on::RESET),
            Attempt::RefusedStream => self.has(on::REFUSED_STREAM | on::FIVE_XX | on::RESET),
            Attempt::ResetBeforeRequest => {
                self.has(on::RESET_BEFORE_REQUEST | on::RESET | on::FIVE_XX | on::GATEWAY_ERROR)
            }
            Attempt::Reset => self.has(on::RESET | on::FIVE_XX | on::GATEWAY_ERROR),
            // A per-try timeout is a 504 with no response.
            Attempt::PerTryTimeout => self.has(on::FIVE_XX | on::GATEWAY_ERROR | on::RESET),
            Attempt::Response { status, headers } => {
                // Most responses are retriable by neither their status nor a
                // header this policy looks at: answer without header lookups.
                let by_status = (self.has(on::FIVE_XX) && (500..600).contains(&status))
                    || (self.has(on::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (self.has(on::RETRIABLE_4XX) && status == 409)
                    || (self.has(on::RETRIABLE_STATUS_CODES) && self.status_codes.contains(&status));
                const GRPC: u32 = on::GRPC_CANCELLED
                    | on::GRPC_DEADLINE_EXCEEDED
                    | on::GRPC_INTERNAL
                    | on::GRPC_RESOURCE_EXHAUSTED
                    | on::GRPC_UNAVAILABLE;
                if !by_status && !self.has(GRPC | on::ENVOY_RATELIMITED) {
                    return false;
                }
                if headers.contains_key(X_ENVOY_OVERLOADED) {
                    return false;
                }
                if headers.contains_key(X_ENVOY_RATELIMITED) {
                    return self.has(on::ENVOY_RATELIMITED);
                }
                if by_status {
                    return true;
                }
                // gRPC status in the response headers (trailers-only responses).
                let grpc = headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
                match grpc {
                    Some(1) => self.has(on::GRPC_CANCELLED),
                    Some(4) => self.has(on::GRPC_DEADLINE_EXCEEDED),
                    Some(8) => self.has(on::GRPC_RESOURCE_EXHAUSTED),
                    Some(13) => self.has(on::GRPC_INTERNAL),
                    Some(14) => self.has(on::GRPC_UNAVAILABLE),
                    _ => false,
                }
            }
        }
    }

    /// Whether any condition of this policy needs the request body again
    /// (beyond connection failures, where the request was never sent).
    pub fn needs_replay(&self) -> bool {
        self.on & !on::CONNECT_FAILURE != 0
    }

    /// Envoy's fully jittered exponential backoff before retry `n` (1-based):
    /// uniform in [0, (2^n − 1) × base), capped at `backoff_max`.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = (1u64 << n.min(30)).saturating_sub(1);
        let ceiling = self.backoff_base.saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX)).min(self.backoff_max);
        let ms = ceiling.as_micros() as u64;
        if ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(fastrand::u64(0..ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model;

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn istio_default_never_retries_a_503() {
        let p = RetryPolicy::from_config(None, false).unwrap();
        assert_eq!(p.retries, 2);
        let none = HeaderMap::new();
        assert!(p.retriable(Attempt::ConnectFailure));
        assert!(p.retriable(Attempt::RefusedStream));
        assert!(!p.retriable(Attempt::Response { status: 503, headers: &none }));
        assert!(!p.retriable(Attempt::Reset));
        assert!(p.retriable(Attempt::Response { status: 200, headers: &hm(&[("grpc-status", "14")]) }));
        assert!(!p.retriable(Attempt::Response { status: 200, headers: &hm(&[("grpc-status", "13")]) }));
    }

    #[test]
    fn configured_conditions_and_codes() {
        let r = model::HttpRetry {
            attempts: Some(3),
            retry_on: Some("gateway-error,409,reset".into()),
            ..Default::default()
        };
        let p = RetryPolicy::from_config(Some(&r), false).unwrap();
        let none = HeaderMap::new();
        assert_eq!(p.retries, 3);
        assert!(p.retriable(Attempt::Response { status: 502, headers: &none }));
        assert!(!p.retriable(Attempt::Response { status: 500, headers: &none }));
        assert!(p.retriable(Attempt::Response { status: 409, headers: &none }));
        assert!(p.retriable(Attempt::Reset));
        assert!(p.retriable(Attempt::PerTryTimeout));
        assert!(!p.retriable(Attempt::Response { status: 503, headers: &hm(&[("x-envoy-overloaded", "true")]) }));
        let r = model::HttpRetry { attempts: Some(0), ..Default::default() };
        assert!(RetryPolicy::from_config(Some(&r), false).is_none());
        let p = RetryPolicy::from_config(None, true).unwrap();
        assert!(!p.avoid_previous_hosts);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetryPolicy::istio_default();
        for _ in 0..200 {
            assert!(p.backoff(1) < Duration::from_millis(25));
            assert!(p.backoff(2) < Duration::from_millis(75));
            assert!(p.backoff(10) < Duration::from_millis(250));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3).as_micros()).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
