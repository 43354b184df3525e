//! Per-resource validation: the rules of Istio's admission webhook for the
//! fields remora models, and an explicit finding for every Istio field that
//! remora does not implement. Cross-references (a route to an unknown host or
//! subset) are checked by the compiler, which sees the whole set.
//!
//! Every finding is collected; validation never stops at the first one.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::load::field_path;
use super::model::{self, Duration, Percent, Spec, StringMatch, Unsupported};
use super::{Diagnostic, Resource};
use crate::authz;

/// Upper bound on a compiled regex program, in bytes. Envoy rejects large
/// regexes too; 100 KiB allows any realistic route pattern while keeping
/// per-request matching cheap.
pub const REGEX_SIZE_LIMIT: usize = 100 * 1024;

/// Largest `directResponse` body Istio accepts.
const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

/// `directResponse` bodies above this size get a warning, as in Istio.
const LARGE_DIRECT_RESPONSE_BODY: usize = 100 * 1024;

/// Envoy's upper bound on `ringHash.minimumRingSize`.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// Istio's limit on `ServiceEntry.hosts`.
const MAX_SERVICE_ENTRY_HOSTS: usize = 256;

/// Istio's integer fields in connection pools and outlier detection are int32.
const MAX_INT32: i64 = i32::MAX as i64;

/// gRPC status code names, indexed by code.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Port protocols remora knows, upper-case as Istio names them.
const PROTOCOLS: [&str; 8] = ["HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "MONGO", "TCP", "TLS"];

/// Checks one resource on its own; cross-references are checked by the compiler.
pub fn validate_resource(r: &Resource, out: &mut Vec<Diagnostic>) {
    let mut v = Validator { r, out };
    match &r.spec {
        Spec::VirtualService(s) => v.virtual_service(s),
        Spec::DestinationRule(s) => v.destination_rule(s),
        Spec::ServiceEntry(s) => v.service_entry(s),
        Spec::Gateway(s) => v.gateway(s),
        Spec::Sidecar(s) => v.sidecar(s),
        Spec::PeerAuthentication(pa) => v.peer_authentication(pa),
        Spec::AuthorizationPolicy(s) => v.authorization_policy(s),
    }
}

/// The protocol of a ServiceEntry port, upper-case: the declared `protocol`
/// (case-insensitive, as Istio parses it), or else the one its name starts
/// with by Kubernetes' `<protocol>[-<suffix>]` convention (`http-web`,
/// `grpc`), or else `TCP`. An unknown declared protocol also yields `TCP`;
/// validation reports it.
pub fn port_protocol(p: &model::ServicePort) -> &'static str {
    if let Some(declared) = p.protocol.as_deref().filter(|s| !s.is_empty()) {
        return known_protocol(declared).unwrap_or("TCP");
    }
    inferred_protocol(&p.name).unwrap_or("TCP")
}

/// The protocol a port declares or names, or `None` when it does neither
/// (Istio then detects the protocol on the connection).
pub fn declared_protocol(p: &model::ServicePort) -> Option<&'static str> {
    match p.protocol.as_deref().filter(|s| !s.is_empty()) {
        Some(declared) => Some(known_protocol(declared).unwrap_or("TCP")),
        None => inferred_protocol(&p.name),
    }
}

fn known_protocol(s: &str) -> Option<&'static str> {
    PROTOCOLS.iter().copied().find(|p| p.eq_ignore_ascii_case(s))
}

/// The protocol a port name announces: `http`, `http-web`, `grpc-api`, `http2`.
fn inferred_protocol(name: &str) -> Option<&'static str> {
    if let Some(p) = known_protocol(name) {
        return Some(p);
    }
    let (prefix, _) = name.split_once('-')?;
    known_protocol(prefix)
}

/// A DNS-1123 label as Istio checks it (`labels.IsDNS1123Label`): 1 to 63
/// letters, digits and `-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// The percentage a fault applies to: `percentage.value`, else the deprecated
/// integer `percent`, else 0 (Istio: an unset percentage injects nothing).
/// Clamped to 0..=100.
pub fn percent_of(percentage: Option<Percent>, deprecated: Option<i64>) -> f64 {
    let v = match (percentage, deprecated) {
        (Some(p), _) => p.value,
        (None, Some(n)) => n as f64,
        (None, None) => 0.0,
    };
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 100.0) }
}

/// Retry conditions Istio accepts in `retryOn` (besides HTTP status codes).
pub const RETRY_ON_POLICIES: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The numeric code of an upper-case gRPC status name (`UNAVAILABLE` → 14).
pub fn grpc_status_code(name: &str) -> Option<u32> {
    GRPC_CODES.iter().position(|c| *c == name).and_then(|i| u32::try_from(i).ok())
}

/// Decodes protobuf JSON's `bytes`: base64 in the standard or URL-safe
/// alphabet, with or without `=` padding. `None` if malformed.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let data = bytes.strip_suffix(b"==").or_else(|| bytes.strip_suffix(b"=")).unwrap_or(bytes);
    if data.len() != bytes.len() && !bytes.len().is_multiple_of(4) {
        return None;
    }
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    Some(out)
}

/// Whether an untyped Istio field carries anything (null, `[]` and `{}` do not).
fn present(v: &Unsupported) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// Whether a proto3 string field is set (empty means unset).
fn set(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

/// Why `host` is not a valid host name, if it is not. A wildcard may only be
/// the whole first label (`*.example.com`) or the whole host (`*`, where
/// `allow_star`). A trailing dot is allowed; an all-numeric last label is
/// not, unless `allow_ip` and the host is an IP address.
fn host_problem(host: &str, allow_star: bool, allow_ip: bool) -> Option<String> {
    if host.is_empty() {
        return Some("host must not be empty".into());
    }
    if host == "*" {
        return (!allow_star).then(|| "`*` is not allowed here; name a host".into());
    }
    if allow_ip && host.parse::<IpAddr>().is_ok() {
        return None;
    }
    if host.len() > 255 {
        return Some(format!("host `{host}` is longer than 255 characters"));
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if rest.contains('*') {
        return Some(format!(
            "host `{host}`: a wildcard is only allowed as the whole first label, as in `*.example.com`"
        ));
    }
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    let labels: Vec<&str> = rest.split('.').collect();
    if let Some(bad) = labels.iter().find(|l| !is_dns1123_label(l)) {
        return Some(format!("`{host}` is not a valid host name (label `{bad}` is invalid)"));
    }
    if labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Some(format!("`{host}` is not a valid host name (its last label is all digits)"));
    }
    None
}

fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("header name must not be empty".into());
    }
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Some(format!("`{name}` is not a valid HTTP header name"));
    }
    None
}

fn is_authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

/// Compiles `pattern` under remora's size limit; `anchored` compiles it as
/// a full-string match, as Envoy's `safe_regex` matches.
fn regex_problem(pattern: &str, anchored: bool) -> Option<String> {
    let full;
    let source = if anchored {
        full = format!("^(?:{pattern})$");
        &full
    } else {
        pattern
    };
    match regex::RegexBuilder::new(source).size_limit(REGEX_SIZE_LIMIT).build() {
        Ok(_) => None,
        Err(regex::Error::CompiledTooBig(limit)) => {
            Some(format!("regex `{pattern}` is too large (its compiled form exceeds {limit} bytes)"))
        }
        Err(e) => {
            let text = e.to_string();
            let reason = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("invalid syntax");
            Some(format!("invalid regex `{pattern}`: {}", reason.trim().trim_start_matches("error: ")))
        }
    }
}

/// Where a string match is used, which decides what it may leave empty.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MatchUse {
    /// `match.uri`: exactly one of exact/prefix/regex; `prefix: ""` allowed.
    Uri,
    /// `scheme`, `method`, `authority`: exactly one, none empty.
    Required,
    /// Header and query parameter matches: at most one; `{}` means present.
    Presence,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

struct Validator<'a> {
    r: &'a Resource,
    out: &'a mut Vec<Diagnostic>,
}

impl Validator<'_> {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.out.push(self.r.error(path, msg));
    }

    fn warn(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.out.push(self.r.warning(path, msg));
    }

    /// An Istio field remora does not implement.
    fn unsupported(&mut self, path: &str) {
        self.err(path, format!("`{path}` is not supported by remora"));
    }

    /// An Istio field remora will implement later.
    fn not_yet(&mut self, path: &str) {
        self.err(path, format!("`{path}` is not supported by remora yet"));
    }

    /// An Istio field that carries no meaning for remora.
    fn capture_mode(&mut self, path: &str, mode: &Option<String>) {
        if let Some(m) = mode
            && !matches!(m.as_str(), "DEFAULT" | "IPTABLES" | "NONE")
        {
            self.err(path, format!("captureMode {m:?} is not one of DEFAULT, IPTABLES, NONE"));
        }
    }

    fn ignored(&mut self, path: &str) {
        self.warn(path, format!("`{path}` is parsed and ignored by remora"));
    }

    fn port(&mut self, path: &str, n: u32) {
        if n == 0 || n > 65535 {
            self.err(path, format!("port number {n} is not in 1..=65535"));
        }
    }

    /// Istio's `ValidateDuration`: at least 1ms and whole milliseconds.
    fn duration(&mut self, path: &str, d: Duration, allow_zero: bool) {
        let d = d.0;
        if d.is_zero() && allow_zero {
            return;
        }
        if d < std::time::Duration::from_millis(1) {
            self.err(path, "duration must be at least 1ms");
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            self.err(path, "only durations to ms precision are supported");
        }
    }

    fn percentage(&mut self, path: &str, p: Percent) {
        if !(0.0..=100.0).contains(&p.value) {
            self.err(format!("{path}.value"), format!("percentage {} is not between 0 and 100", p.value));
        }
    }

    fn int32(&mut self, path: &str, v: Option<i64>) {
        match v {
            Some(n) if n < 0 => self.err(path, format!("{n} must not be negative")),
            Some(n) if n > MAX_INT32 => self.err(path, format!("{n} is larger than {MAX_INT32}")),
            _ => {}
        }
    }

    fn bind(&mut self, path: &str, bind: &Option<String>) {
        let Some(b) = bind.as_deref().filter(|b| !b.is_empty()) else { return };
        if b.starts_with("unix://") {
            self.err(path, "unix domain sockets are not supported by remora");
        } else if b.parse::<IpAddr>().is_err() {
            self.err(path, format!("bind `{b}` must be an IP address"));
        }
    }

    fn regex(&mut self, path: &str, pattern: &str, anchored: bool) {
        if let Some(problem) = regex_problem(pattern, anchored) {
            self.err(path, problem);
        }
    }

    // === VirtualService ===

    fn virtual_service(&mut self, vs: &model::VirtualService) {
        if vs.hosts.is_empty() {
            self.err("spec.hosts", "at least one host is required");
        }
        for (i, h) in vs.hosts.iter().enumerate() {
            if let Some(problem) = host_problem(h, true, true) {
                self.err(format!("spec.hosts[{i}]"), problem);
            }
        }
        for (i, g) in vs.gateways.iter().enumerate() {
            if g.is_empty() || g.split('/').count() > 2 {
                self.err(
                    format!("spec.gateways[{i}]"),
                    format!("`{g}` is not a gateway name (`mesh`, `name` or `namespace/name`)"),
                );
            }
        }
        if present(&vs.tls) {
            self.unsupported("spec.tls");
        }
        if present(&vs.tcp) {
            self.unsupported("spec.tcp");
        }
        if vs.http.is_empty() && !present(&vs.tls) && !present(&vs.tcp) {
            self.err("spec", "a VirtualService needs `http` routes");
        }
        if !vs.export_to.is_empty() {
            self.ignored("spec.exportTo");
        }
        for (i, h) in vs.http.iter().enumerate() {
            self.http_route(&format!("spec.http[{i}]"), h);
        }
    }

    fn http_route(&mut self, path: &str, h: &model::HttpRoute) {
        let route = !h.route.is_empty();
        let redirect = h.redirect.is_some();
        let direct = h.direct_response.is_some();
        let delegate = present(&h.delegate);
        let rewrite = h.rewrite.is_some();
        let fault = h.fault.is_some();
        if delegate {
            self.unsupported(&format!("{path}.delegate"));
        } else if !route && !redirect && !direct {
            self.err(path, "an HTTP route needs one of `route`, `redirect` or `directResponse`");
        }
        if redirect {
            for (other, set) in [("route", route), ("rewrite", rewrite), ("fault", fault)] {
                if set {
                    self.err(format!("{path}.{other}"), format!("`{other}` cannot be combined with `redirect`"));
                }
            }
            if direct {
                self.err(format!("{path}.directResponse"), "`directResponse` cannot be combined with `redirect`");
            }
        }
        if direct {
            for (other, set) in [("route", route), ("rewrite", rewrite), ("fault", fault)] {
                if set {
                    self.err(format!("{path}.{other}"), format!("`{other}` cannot be combined with `directResponse`"));
                }
            }
        }

        for (k, m) in h.matches.iter().enumerate() {
            self.http_match(&format!("{path}.match[{k}]"), m);
        }
        let authority_rewrite = h.rewrite.as_ref().is_some_and(|rw| set(&rw.authority));
        for (j, d) in h.route.iter().enumerate() {
            let dpath = format!("{path}.route[{j}]");
            self.destination(&format!("{dpath}.destination"), &d.destination);
            match d.weight {
                Some(w) if w < 0 => self.err(format!("{dpath}.weight"), format!("weight {w} must not be negative")),
                Some(w) if w > MAX_INT32 => {
                    self.err(format!("{dpath}.weight"), format!("weight {w} is larger than {MAX_INT32}"))
                }
                _ => {}
            }
            if let Some(hdrs) = &d.headers {
                self.headers(&format!("{dpath}.headers"), hdrs, authority_rewrite);
            }
        }
        if h.route.len() >= 2 && h.route.iter().all(|d| d.weight.unwrap_or(0) <= 0) {
            self.err(
                format!("{path}.route"),
                "total destination weight = 0; with two or more destinations, give at least one a positive weight",
            );
        }
        if let Some(r) = &h.redirect {
            self.redirect(path, r, &h.matches);
        }
        if let Some(d) = &h.direct_response {
            self.direct_response(&format!("{path}.directResponse"), d);
        }
        if let Some(rw) = &h.rewrite {
            self.rewrite(&format!("{path}.rewrite"), rw);
        }
        if let Some(t) = h.timeout {
            self.duration(&format!("{path}.timeout"), t, true);
        }
        if let Some(r) = &h.retries {
            self.retries(&format!("{path}.retries"), r);
        }
        if let Some(f) = &h.fault {
            self.fault(&format!("{path}.fault"), f);
        }
        self.mirrors(path, h);
        if present(&h.cors_policy) {
            self.not_yet(&format!("{path}.corsPolicy"));
        }
        if let Some(hdrs) = &h.headers {
            self.headers(&format!("{path}.headers"), hdrs, authority_rewrite);
        }
    }

    /// Istio's retry rules (`validateHTTPRetry`).
    fn retries(&mut self, path: &str, r: &model::HttpRetry) {
        match r.attempts {
            Some(n) if n < 0 => self.err(format!("{path}.attempts"), "attempts must not be negative"),
            Some(n) if n > MAX_INT32 => self.err(format!("{path}.attempts"), format!("attempts {n} is too large")),
            Some(0) => {
                for (name, set) in [
                    ("perTryTimeout", r.per_try_timeout.is_some()),
                    ("retryOn", r.retry_on.is_some()),
                    ("retryRemoteLocalities", r.retry_remote_localities.is_some()),
                ] {
                    if set {
                        self.err(
                            format!("{path}.{name}"),
                            format!("`{name}` cannot be set when attempts is 0 (retries disabled)"),
                        );
                    }
                }
            }
            _ => {}
        }
        if let Some(t) = r.per_try_timeout {
            self.duration(&format!("{path}.perTryTimeout"), t, false);
        }
        if let Some(b) = r.backoff {
            self.duration(&format!("{path}.backoff"), b, false);
        }
        if let Some(on) = &r.retry_on {
            for token in on.split(',').map(str::trim) {
                if token.is_empty() {
                    continue;
                }
                let status_ok = token.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status_ok && !RETRY_ON_POLICIES.contains(&token) {
                    self.err(
                        format!("{path}.retryOn"),
                        format!(
                            "`{token}` is not a retry condition (one of {} or an HTTP status code)",
                            RETRY_ON_POLICIES.join(", ")
                        ),
                    );
                }
            }
        }
        if r.retry_remote_localities == Some(true) {
            self.warn(
                format!("{path}.retryRemoteLocalities"),
                "remora has no locality information; `retryRemoteLocalities` has no effect",
            );
        }
    }

    /// `mirror` / `mirrors` / `mirrorPercentage` / deprecated `mirrorPercent`.
    fn mirrors(&mut self, path: &str, h: &model::HttpRoute) {
        if h.mirror.is_some() && !h.mirrors.is_empty() {
            self.err(format!("{path}.mirrors"), "`mirror` and `mirrors` cannot both be set");
        }
        if let Some(m) = &h.mirror {
            self.destination(&format!("{path}.mirror"), m);
        }
        if let Some(p) = h.mirror_percentage {
            self.percentage(&format!("{path}.mirrorPercentage"), p);
        }
        if let Some(p) = h.mirror_percent {
            if !(0..=100).contains(&p) {
                self.err(format!("{path}.mirrorPercent"), format!("mirrorPercent {p} must be between 0 and 100"));
            }
            self.warn(
                format!("{path}.mirrorPercent"),
                "`mirrorPercent` is deprecated; use `mirrorPercentage: {value: N}`",
            );
            if h.mirror_percentage.is_some() {
                self.err(format!("{path}.mirrorPercent"), "set only one of `mirrorPercentage` and `mirrorPercent`");
            }
        }
        if (h.mirror_percentage.is_some() || h.mirror_percent.is_some()) && h.mirror.is_none() {
            self.err(format!("{path}.mirrorPercentage"), "a mirror percentage needs `mirror`");
        }
        for (i, m) in h.mirrors.iter().enumerate() {
            self.destination(&format!("{path}.mirrors[{i}].destination"), &m.destination);
            if let Some(p) = m.percentage {
                self.percentage(&format!("{path}.mirrors[{i}].percentage"), p);
            }
        }
        if (h.mirror.is_some() || !h.mirrors.is_empty()) && h.route.is_empty() {
            self.err(format!("{path}.mirror"), "mirroring needs a `route`");
        }
    }

    fn http_match(&mut self, path: &str, m: &model::HttpMatchRequest) {
        if let Some(uri) = &m.uri {
            self.string_match(&format!("{path}.uri"), uri, MatchUse::Uri);
            if uri.regex.is_some() && m.ignore_uri_case == Some(true) {
                self.warn(
                    format!("{path}.ignoreUriCase"),
                    "ignoreUriCase has no effect on a regex match; use `(?i)` in the regex",
                );
            }
        }
        for (field, sm) in [("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)] {
            if let Some(sm) = sm {
                self.string_match(&format!("{path}.{field}"), sm, MatchUse::Required);
            }
        }
        for (field, headers) in [("headers", &m.headers), ("withoutHeaders", &m.without_headers)] {
            let hpath = format!("{path}.{field}");
            for (name, sm) in headers {
                let p = field_path(&hpath, name);
                self.match_header_name(&p, name);
                self.string_match(&p, sm, MatchUse::Presence);
            }
        }
        let qpath = format!("{path}.queryParams");
        for (name, sm) in &m.query_params {
            let p = field_path(&qpath, name);
            if name.is_empty() {
                self.err(p.clone(), "query parameter name must not be empty");
            }
            self.string_match(&p, sm, MatchUse::Presence);
        }
        if let Some(port) = m.port {
            self.port(&format!("{path}.port"), port);
        }
        if let Some(ns) = m.source_namespace.as_deref().filter(|ns| !ns.is_empty())
            && !is_dns1123_label(ns)
        {
            self.err(format!("{path}.sourceNamespace"), format!("`{ns}` is not a valid namespace name"));
        }
        for (i, g) in m.gateways.iter().enumerate() {
            if g.is_empty() {
                self.err(format!("{path}.gateways[{i}]"), "gateway name must not be empty");
            }
        }
        if m.stat_prefix.is_some() {
            self.ignored(&format!("{path}.statPrefix"));
        }
    }

    fn match_header_name(&mut self, path: &str, name: &str) {
        if name.starts_with("@request.auth.claims") {
            self.err(path, "matching JWT claims (`@request.auth.claims`) is not supported by remora");
        } else if let Some(problem) = header_name_problem(name) {
            self.err(path, problem);
        } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.err(path, format!("header names in matches must be lowercase: `{}`", name.to_ascii_lowercase()));
        } else if matches!(name, "uri" | "scheme" | "method" | "authority") {
            self.warn(path, format!("Istio ignores `{name}` as a header name; use the match's `{name}` field"));
        }
    }

    fn string_match(&mut self, path: &str, m: &StringMatch, usage: MatchUse) {
        let count = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()].iter().filter(|b| **b).count();
        if count > 1 {
            self.err(path, "set only one of exact, prefix and regex");
        } else if count == 0 && usage != MatchUse::Presence {
            self.err(path, "set one of exact, prefix or regex");
        }
        if m.prefix.as_deref() == Some("") && usage != MatchUse::Uri {
            self.err(format!("{path}.prefix"), "prefix must not be empty");
        }
        if let Some(re) = &m.regex {
            // Istio translates `regex: "*"` in header and query matches to a presence match.
            if !(usage == MatchUse::Presence && re == "*") {
                self.regex(&format!("{path}.regex"), re, true);
            }
        }
    }

    fn destination(&mut self, path: &str, d: &model::Destination) {
        if d.host.is_empty() {
            self.err(format!("{path}.host"), "destination host is required");
        } else if d.host == "*" {
            self.err(format!("{path}.host"), "`*` is not a valid destination host");
        } else if let Some(problem) = host_problem(&d.host, false, false) {
            self.err(format!("{path}.host"), problem);
        }
        if let Some(subset) = d.subset.as_deref().filter(|s| !s.is_empty())
            && !is_dns1123_label(subset)
        {
            self.err(format!("{path}.subset"), format!("subset name `{subset}` is not a valid DNS-1123 label"));
        }
        if let Some(port) = &d.port {
            self.port(&format!("{path}.port.number"), port.number);
        }
    }

    fn redirect(&mut self, route_path: &str, r: &model::HttpRedirect, matches: &[model::HttpMatchRequest]) {
        let path = format!("{route_path}.redirect");
        let any = set(&r.uri)
            || set(&r.prefix_rewrite)
            || set(&r.authority)
            || set(&r.scheme)
            || r.port.is_some()
            || r.derive_port.is_some();
        if !any {
            self.err(
                path.clone(),
                "a redirect must set at least one of uri, prefixRewrite, authority, scheme, port or derivePort",
            );
        }
        if set(&r.uri) && set(&r.prefix_rewrite) {
            self.err(format!("{path}.prefixRewrite"), "`uri` and `prefixRewrite` are mutually exclusive");
        }
        if set(&r.prefix_rewrite) {
            for (k, m) in matches.iter().enumerate() {
                if m.uri.as_ref().is_some_and(|u| u.prefix.is_none()) {
                    self.err(
                        format!("{route_path}.match[{k}].uri"),
                        "a redirect with `prefixRewrite` needs every uri match to be a prefix match",
                    );
                }
            }
        }
        if let Some(s) = r.scheme.as_deref().filter(|s| !s.is_empty())
            && s != "http"
            && s != "https"
        {
            self.err(format!("{path}.scheme"), format!("scheme `{s}` must be http or https"));
        }
        if let Some(code) = r.redirect_code
            && code != 0
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            self.err(
                format!("{path}.redirectCode"),
                format!("redirectCode {code} must be one of 301, 302, 303, 307, 308"),
            );
        }
        if let Some(d) = &r.derive_port {
            if d != "FROM_PROTOCOL_DEFAULT" && d != "FROM_REQUEST_PORT" {
                self.err(
                    format!("{path}.derivePort"),
                    format!("derivePort `{d}` must be FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
                );
            }
            if r.port.is_some() {
                self.err(format!("{path}.derivePort"), "`port` and `derivePort` are mutually exclusive");
            }
        }
        if let Some(p) = r.port {
            self.port(&format!("{path}.port"), p);
        }
        if let Some(a) = r.authority.as_deref().filter(|a| !a.is_empty())
            && a.parse::<http::uri::Authority>().is_err()
        {
            self.err(format!("{path}.authority"), format!("`{a}` is not a valid authority"));
        }
    }

    fn direct_response(&mut self, path: &str, d: &model::HttpDirectResponse) {
        if !(200..=599).contains(&d.status) {
            self.err(format!("{path}.status"), format!("status {} must be between 200 and 599", d.status));
        }
        let Some(body) = &d.body else { return };
        let bpath = format!("{path}.body");
        let len = match (&body.string, &body.bytes) {
            (Some(_), Some(_)) => {
                self.err(bpath.clone(), "set only one of `string` and `bytes`");
                None
            }
            (Some(s), None) => Some(s.len()),
            (None, Some(b)) => match decode_base64(b) {
                Some(bytes) => Some(bytes.len()),
                None => {
                    self.err(format!("{bpath}.bytes"), "`bytes` must be valid base64");
                    None
                }
            },
            (None, None) => None,
        };
        match len {
            Some(n) if n > MAX_DIRECT_RESPONSE_BODY => {
                self.err(bpath, format!("the body is {n} bytes; the limit is {MAX_DIRECT_RESPONSE_BODY} (1 MiB)"))
            }
            Some(n) if n > LARGE_DIRECT_RESPONSE_BODY => self.warn(
                bpath,
                format!("the body is {n} bytes; large direct responses are held in memory by every proxy"),
            ),
            _ => {}
        }
    }

    fn rewrite(&mut self, path: &str, rw: &model::HttpRewrite) {
        let uri = set(&rw.uri);
        if !uri && !set(&rw.authority) && rw.uri_regex_rewrite.is_none() {
            self.err(path, "a rewrite must set uri, uriRegexRewrite or authority");
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            let rpath = format!("{path}.uriRegexRewrite");
            if uri {
                self.err(rpath.clone(), "`uri` and `uriRegexRewrite` are mutually exclusive");
            }
            if rr.match_.is_empty() {
                self.err(format!("{rpath}.match"), "`match` is required");
            } else {
                self.regex(&format!("{rpath}.match"), &rr.match_, false);
            }
            if rr.rewrite.is_empty() {
                self.err(format!("{rpath}.rewrite"), "`rewrite` is required");
            }
        }
        if let Some(a) = rw.authority.as_deref().filter(|a| !a.is_empty())
            && a.parse::<http::uri::Authority>().is_err()
        {
            self.err(format!("{path}.authority"), format!("`{a}` is not a valid authority"));
        }
    }

    fn fault(&mut self, path: &str, f: &model::HttpFaultInjection) {
        if f.delay.is_none() && f.abort.is_none() {
            self.err(path, "a fault must set `delay` or `abort`");
        }
        if let Some(d) = &f.delay {
            let dpath = format!("{path}.delay");
            let exponential = present(&d.exponential_delay);
            if exponential {
                self.unsupported(&format!("{dpath}.exponentialDelay"));
            }
            match d.fixed_delay {
                Some(fd) => self.duration(&format!("{dpath}.fixedDelay"), fd, false),
                None if !exponential => self.err(dpath.clone(), "a delay needs `fixedDelay`"),
                None => {}
            }
            self.fault_percent(&dpath, "delay", d.percentage, d.percent);
        }
        if let Some(a) = &f.abort {
            let apath = format!("{path}.abort");
            let http2 = present(&a.http2_error);
            let kinds = [a.http_status.is_some(), a.grpc_status.is_some(), http2].iter().filter(|b| **b).count();
            if http2 {
                self.unsupported(&format!("{apath}.http2Error"));
            }
            if kinds == 0 {
                self.err(apath.clone(), "an abort needs `httpStatus` or `grpcStatus`");
            } else if kinds > 1 {
                self.err(apath.clone(), "set only one of httpStatus, grpcStatus and http2Error");
            }
            if let Some(s) = a.http_status
                && !(200..=599).contains(&s)
            {
                self.err(format!("{apath}.httpStatus"), format!("httpStatus {s} must be between 200 and 599"));
            }
            if let Some(g) = &a.grpc_status
                && grpc_status_code(g).is_none()
            {
                self.err(
                    format!("{apath}.grpcStatus"),
                    format!("`{g}` is not a gRPC status name; use an upper-case name such as UNAVAILABLE"),
                );
            }
            self.fault_percent(&apath, "abort", a.percentage, a.percent);
        }
    }

    fn fault_percent(&mut self, path: &str, what: &str, percentage: Option<Percent>, percent: Option<i64>) {
        if let Some(p) = percentage {
            self.percentage(&format!("{path}.percentage"), p);
        }
        if let Some(n) = percent {
            let ppath = format!("{path}.percent");
            if percentage.is_some() {
                self.err(ppath.clone(), "set only one of `percentage` and the deprecated `percent`");
            } else {
                self.warn(ppath.clone(), format!("`percent` is deprecated; use `percentage: {{value: {n}}}`"));
            }
            if !(0..=100).contains(&n) {
                self.err(ppath, format!("percent {n} is not between 0 and 100"));
            }
        }
        if percentage.is_none() && percent.is_none() {
            self.warn(
                path,
                format!("no `percentage` is set, so this {what} applies to no request (Istio's default is 0%)"),
            );
        }
    }

    fn headers(&mut self, path: &str, h: &model::Headers, authority_rewrite: bool) {
        if let Some(ops) = &h.request {
            let rpath = format!("{path}.request");
            self.header_ops(&rpath, ops, Side::Request);
            let authority_ops = ops.set.keys().chain(ops.add.keys()).filter(|k| is_authority_header(k)).count();
            if authority_ops + usize::from(authority_rewrite) > 1 {
                self.err(
                    rpath,
                    "the request authority is set more than once (by `rewrite.authority` and `:authority`/`host` header operations)",
                );
            }
        }
        if let Some(ops) = &h.response {
            self.header_ops(&format!("{path}.response"), ops, Side::Response);
        }
    }

    fn header_ops(&mut self, path: &str, ops: &model::HeaderOperations, side: Side) {
        for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
            let opath = format!("{path}.{op}");
            for (name, value) in map {
                let p = field_path(&opath, name);
                self.header_op_name(&p, name, side, false);
                if http::HeaderValue::from_str(value).is_err() {
                    self.err(p, "not a valid HTTP header value (control characters are not allowed)");
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            self.header_op_name(&format!("{path}.remove[{i}]"), name, side, true);
        }
    }

    fn header_op_name(&mut self, path: &str, name: &str, side: Side, remove: bool) {
        if name.starts_with(':') {
            let authority_rewrite = side == Side::Request && !remove && name.eq_ignore_ascii_case(":authority");
            if !authority_rewrite {
                let verb = if remove { "removed" } else { "set" };
                self.err(path, format!("pseudo-header `{name}` cannot be {verb}"));
            }
        } else if remove && side == Side::Request && name.eq_ignore_ascii_case("host") {
            self.err(path, "`host` cannot be removed");
        } else if let Some(problem) = header_name_problem(name) {
            self.err(path, problem);
        }
    }

    // === DestinationRule ===

    fn destination_rule(&mut self, dr: &model::DestinationRule) {
        if dr.host.is_empty() {
            self.err("spec.host", "host is required");
        } else if let Some(problem) = host_problem(&dr.host, true, false) {
            self.err("spec.host", problem);
        }
        if let Some(tp) = &dr.traffic_policy {
            self.traffic_policy("spec.trafficPolicy", tp);
        }
        let mut names = HashSet::new();
        for (i, s) in dr.subsets.iter().enumerate() {
            let spath = format!("spec.subsets[{i}]");
            if s.name.is_empty() {
                self.err(format!("{spath}.name"), "subset name is required");
            } else if !is_dns1123_label(&s.name) {
                self.err(format!("{spath}.name"), format!("subset name `{}` is not a valid DNS-1123 label", s.name));
            } else if !names.insert(s.name.as_str()) {
                self.err(format!("{spath}.name"), format!("subset `{}` is defined twice", s.name));
            }
            self.labels(&format!("{spath}.labels"), &s.labels);
            if let Some(tp) = &s.traffic_policy {
                self.traffic_policy(&format!("{spath}.trafficPolicy"), tp);
            }
        }
        if !dr.export_to.is_empty() {
            self.ignored("spec.exportTo");
        }
        if dr.workload_selector.is_some() {
            self.ignored("spec.workloadSelector");
        }
    }

    fn labels(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        for k in labels.keys() {
            if k.is_empty() {
                self.err(path, "label names must not be empty");
            }
        }
    }

    fn traffic_policy(&mut self, path: &str, tp: &model::TrafficPolicy) {
        let empty = tp.load_balancer.is_none()
            && tp.connection_pool.is_none()
            && tp.outlier_detection.is_none()
            && tp.tls.is_none()
            && tp.port_level_settings.is_empty()
            && !present(&tp.retry_budget)
            && !present(&tp.tunnel)
            && !present(&tp.proxy_protocol);
        if empty {
            self.err(path, "a traffic policy must set at least one field");
        }
        self.policy_blocks(path, &tp.load_balancer, &tp.connection_pool, &tp.outlier_detection, &tp.tls);
        let mut ports = HashSet::new();
        for (i, pls) in tp.port_level_settings.iter().enumerate() {
            let ppath = format!("{path}.portLevelSettings[{i}]");
            match &pls.port {
                None => self.err(format!("{ppath}.port"), "port is required"),
                Some(p) if p.number == 0 => self.err(format!("{ppath}.port.number"), "port.number is required"),
                Some(p) => {
                    self.port(&format!("{ppath}.port.number"), p.number);
                    if !ports.insert(p.number) {
                        self.err(format!("{ppath}.port.number"), format!("port {} has more than one entry", p.number));
                    }
                }
            }
            if pls.load_balancer.is_none()
                && pls.connection_pool.is_none()
                && pls.outlier_detection.is_none()
                && pls.tls.is_none()
            {
                self.err(ppath.clone(), "a port traffic policy must set at least one field");
            }
            self.policy_blocks(&ppath, &pls.load_balancer, &pls.connection_pool, &pls.outlier_detection, &pls.tls);
        }
        if present(&tp.retry_budget) {
            self.not_yet(&format!("{path}.retryBudget"));
        }
        if present(&tp.tunnel) {
            self.unsupported(&format!("{path}.tunnel"));
        }
        if present(&tp.proxy_protocol) {
            self.unsupported(&format!("{path}.proxyProtocol"));
        }
    }

    fn policy_blocks(
        &mut self,
        path: &str,
        lb: &Option<model::LoadBalancerSettings>,
        cp: &Option<model::ConnectionPoolSettings>,
        od: &Option<model::OutlierDetection>,
        tls: &Option<model::ClientTlsSettings>,
    ) {
        if let Some(lb) = lb {
            self.load_balancer(&format!("{path}.loadBalancer"), lb);
        }
        if let Some(cp) = cp {
            self.connection_pool(&format!("{path}.connectionPool"), cp);
        }
        if let Some(od) = od {
            self.outlier_detection(&format!("{path}.outlierDetection"), od);
        }
        if let Some(tls) = tls {
            self.client_tls(&format!("{path}.tls"), tls);
        }
    }

    fn load_balancer(&mut self, path: &str, lb: &model::LoadBalancerSettings) {
        if let Some(simple) = &lb.simple {
            let spath = format!("{path}.simple");
            match simple.as_str() {
                "LEAST_REQUEST" | "ROUND_ROBIN" | "RANDOM" | "UNSPECIFIED" => {}
                "LEAST_CONN" => self.warn(spath, "LEAST_CONN is a deprecated alias of LEAST_REQUEST"),
                "PASSTHROUGH" => self.err(spath, "PASSTHROUGH load balancing is not supported by remora"),
                other => self.err(
                    spath,
                    format!("unknown load balancer `{other}`; expected LEAST_REQUEST, ROUND_ROBIN or RANDOM"),
                ),
            }
            if lb.consistent_hash.is_some() {
                self.err(path, "set only one of `simple` and `consistentHash`");
            }
        }
        if let Some(ch) = &lb.consistent_hash {
            self.consistent_hash(&format!("{path}.consistentHash"), ch);
        }
        for (name, value) in [
            ("localityLbSetting", &lb.locality_lb_setting),
            ("warmup", &lb.warmup),
            ("warmupDurationSecs", &lb.warmup_duration_secs),
        ] {
            if present(value) {
                self.ignored(&format!("{path}.{name}"));
            }
        }
    }

    fn consistent_hash(&mut self, path: &str, ch: &model::ConsistentHashLb) {
        let keys = [
            set(&ch.http_header_name),
            ch.http_cookie.is_some(),
            ch.use_source_ip == Some(true),
            set(&ch.http_query_parameter_name),
        ];
        match keys.iter().filter(|b| **b).count() {
            0 => self.err(
                path,
                "consistentHash needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
            ),
            1 => {}
            _ => self.err(path, "set only one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName"),
        }
        if let Some(name) = ch.http_header_name.as_deref().filter(|n| !n.is_empty())
            && let Some(problem) = header_name_problem(name)
        {
            self.err(format!("{path}.httpHeaderName"), problem);
        }
        if let Some(cookie) = &ch.http_cookie {
            let cpath = format!("{path}.httpCookie");
            if cookie.name.is_empty() {
                self.err(format!("{cpath}.name"), "cookie name is required");
            }
            if let Some(ttl) = cookie.ttl {
                self.duration(&format!("{cpath}.ttl"), ttl, true);
            }
            if present(&cookie.attributes) {
                self.ignored(&format!("{cpath}.attributes"));
            }
        }
        if let Some(size) = ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size)
            && size > MAX_RING_SIZE
        {
            self.err(
                format!("{path}.ringHash.minimumRingSize"),
                format!("minimumRingSize {size} is larger than {MAX_RING_SIZE}"),
            );
        }
        if let Some(size) = ch.minimum_ring_size {
            let mpath = format!("{path}.minimumRingSize");
            self.warn(mpath.clone(), "`minimumRingSize` is deprecated; use `ringHash.minimumRingSize`");
            if size > MAX_RING_SIZE {
                self.err(mpath, format!("minimumRingSize {size} is larger than {MAX_RING_SIZE}"));
            }
        }
        if present(&ch.maglev) {
            self.not_yet(&format!("{path}.maglev"));
        }
    }

    fn peer_authentication(&mut self, pa: &model::PeerAuthentication) {
        let mode_ok = |m: &model::PeerMtls| {
            m.mode.as_deref().is_none_or(|m| matches!(m, "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT"))
        };
        if let Some(m) = &pa.mtls
            && !mode_ok(m)
        {
            self.err("spec.mtls.mode", "mode must be UNSET, DISABLE, PERMISSIVE or STRICT");
        }
        if !pa.port_level_mtls.is_empty() && pa.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
            self.err("spec.portLevelMtls", "portLevelMtls requires a workload selector");
        }
        for (port, m) in &pa.port_level_mtls {
            let path = format!("spec.portLevelMtls[\"{port}\"]");
            if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                self.err(path.clone(), format!("port {port} is not in 1..=65535"));
            }
            if !mode_ok(m) {
                self.err(format!("{path}.mode"), "mode must be UNSET, DISABLE, PERMISSIVE or STRICT");
            }
        }
    }

    fn connection_pool(&mut self, path: &str, cp: &model::ConnectionPoolSettings) {
        if cp.tcp.is_none() && cp.http.is_none() {
            self.err(path, "a connectionPool must set `tcp` or `http`");
        }
        if let Some(tcp) = &cp.tcp {
            let t = format!("{path}.tcp");
            self.int32(&format!("{t}.maxConnections"), tcp.max_connections);
            if let Some(d) = tcp.connect_timeout {
                self.duration(&format!("{t}.connectTimeout"), d, false);
            }
            if let Some(ka) = &tcp.tcp_keepalive {
                if let Some(d) = ka.time {
                    self.duration(&format!("{t}.tcpKeepalive.time"), d, false);
                }
                if let Some(d) = ka.interval {
                    self.duration(&format!("{t}.tcpKeepalive.interval"), d, false);
                }
            }
            if let Some(d) = tcp.max_connection_duration {
                self.duration(&format!("{t}.maxConnectionDuration"), d, false);
            }
            if let Some(d) = tcp.idle_timeout {
                self.duration(&format!("{t}.idleTimeout"), d, true);
            }
        }
        if let Some(http) = &cp.http {
            let h = format!("{path}.http");
            for (name, v) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
                ("maxConcurrentStreams", http.max_concurrent_streams),
            ] {
                self.int32(&format!("{h}.{name}"), v);
            }
            if let Some(d) = http.idle_timeout {
                self.duration(&format!("{h}.idleTimeout"), d, false);
            }
            if let Some(policy) = &http.h2_upgrade_policy
                && !matches!(policy.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE")
            {
                self.err(
                    format!("{h}.h2UpgradePolicy"),
                    format!("h2UpgradePolicy `{policy}` must be DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                );
            }
            if http.use_client_protocol == Some(true) && http.h2_upgrade_policy.as_deref() == Some("UPGRADE") {
                self.err(
                    format!("{h}.useClientProtocol"),
                    "useClientProtocol cannot be combined with h2UpgradePolicy UPGRADE",
                );
            }
            if present(&http.http2_keep_alive) {
                self.ignored(&format!("{h}.http2KeepAlive"));
            }
            if http.use_client_protocol == Some(true) {
                self.warn(
                    format!("{h}.useClientProtocol"),
                    "`useClientProtocol` is not supported by remora yet: the upstream protocol comes from the port's protocol and h2UpgradePolicy",
                );
            }
        }
    }

    fn outlier_detection(&mut self, path: &str, od: &model::OutlierDetection) {
        if od.consecutive_errors.is_some() {
            self.warn(
                format!("{path}.consecutiveErrors"),
                "`consecutiveErrors` is deprecated and Istio ignores it; use consecutive5xxErrors or consecutiveGatewayErrors",
            );
        }
        for (name, v) in [
            ("consecutiveErrors", od.consecutive_errors),
            ("consecutive5xxErrors", od.consecutive_5xx_errors),
            ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
            ("consecutiveLocalOriginFailures", od.consecutive_local_origin_failures),
        ] {
            self.int32(&format!("{path}.{name}"), v);
        }
        if od.consecutive_local_origin_failures.is_some() && od.split_external_local_origin_errors != Some(true) {
            self.err(
                format!("{path}.consecutiveLocalOriginFailures"),
                "consecutiveLocalOriginFailures needs `splitExternalLocalOriginErrors: true`",
            );
        }
        if let Some(d) = od.interval {
            self.duration(&format!("{path}.interval"), d, false);
        }
        if let Some(d) = od.base_ejection_time {
            self.duration(&format!("{path}.baseEjectionTime"), d, false);
        }
        for (name, v) in [("maxEjectionPercent", od.max_ejection_percent), ("minHealthPercent", od.min_health_percent)]
        {
            if let Some(n) = v
                && !(0..=100).contains(&n)
            {
                self.err(format!("{path}.{name}"), format!("{name} {n} is not between 0 and 100"));
            }
        }
        if present(&od.outlier_detection_http_error_codes) {
            self.ignored(&format!("{path}.outlierDetectionHttpErrorCodes"));
        }
    }

    fn client_tls(&mut self, path: &str, tls: &model::ClientTlsSettings) {
        let mode = tls.mode.as_deref().filter(|m| !m.is_empty()).unwrap_or("DISABLE");
        let mpath = format!("{path}.mode");
        let certs = set(&tls.client_certificate)
            || set(&tls.private_key)
            || set(&tls.ca_certificates)
            || set(&tls.credential_name);
        match mode {
            "DISABLE" => {}
            "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL" => {
                if mode != "ISTIO_MUTUAL" && set(&tls.credential_name) {
                    self.err(
                        format!("{path}.credentialName"),
                        "Kubernetes secrets are not supported by remora; use file paths",
                    );
                }
                if set(&tls.ca_crl) {
                    self.not_yet(&format!("{path}.caCrl"));
                }
                if mode == "ISTIO_MUTUAL" && certs {
                    self.err(
                        path,
                        "with ISTIO_MUTUAL the mesh's certificates are used: clientCertificate, privateKey, caCertificates and credentialName must not be set",
                    );
                }
                if mode == "MUTUAL" && !(set(&tls.client_certificate) && set(&tls.private_key)) {
                    self.err(path, "tls mode MUTUAL needs clientCertificate and privateKey");
                }
            }
            other => {
                self.err(mpath, format!("unknown tls mode `{other}`; expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"))
            }
        }
    }

    // === ServiceEntry ===

    fn service_entry(&mut self, se: &model::ServiceEntry) {
        if se.hosts.is_empty() {
            self.err("spec.hosts", "at least one host is required");
        } else if se.hosts.len() > MAX_SERVICE_ENTRY_HOSTS {
            self.err("spec.hosts", format!("{} hosts; at most {MAX_SERVICE_ENTRY_HOSTS} are allowed", se.hosts.len()));
        }
        for (i, h) in se.hosts.iter().enumerate() {
            if let Some(problem) = host_problem(h, false, false) {
                self.err(format!("spec.hosts[{i}]"), problem);
            }
        }

        let resolution = se.resolution.as_deref().filter(|r| !r.is_empty()).unwrap_or("NONE");
        match resolution {
            "NONE" | "STATIC" | "DNS" => {}
            "DNS_ROUND_ROBIN" => {
                self.warn("spec.resolution", "DNS_ROUND_ROBIN is treated as DNS: every resolved address is used")
            }
            "DYNAMIC_DNS" => self.err("spec.resolution", "resolution DYNAMIC_DNS is not supported by remora"),
            other => self.err(
                "spec.resolution",
                format!("unknown resolution `{other}`; expected NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            ),
        }
        if let Some(loc) = se.location.as_deref().filter(|l| !l.is_empty())
            && loc != "MESH_EXTERNAL"
            && loc != "MESH_INTERNAL"
        {
            self.err("spec.location", format!("unknown location `{loc}`; expected MESH_EXTERNAL or MESH_INTERNAL"));
        }

        if se.ports.is_empty() {
            self.err("spec.ports", "at least one port is required");
        }
        let mut names = HashSet::new();
        let mut numbers = HashSet::new();
        for (i, p) in se.ports.iter().enumerate() {
            let ppath = format!("spec.ports[{i}]");
            self.port(&format!("{ppath}.number"), p.number);
            if p.number != 0 && !numbers.insert(p.number) {
                self.err(format!("{ppath}.number"), format!("port {} is declared twice", p.number));
            }
            if p.name.is_empty() {
                self.err(format!("{ppath}.name"), "port name is required");
            } else if !names.insert(p.name.as_str()) {
                self.err(format!("{ppath}.name"), format!("port name `{}` is used twice", p.name));
            }
            match p.protocol.as_deref().filter(|s| !s.is_empty()) {
                Some(proto) if known_protocol(proto).is_none() => self.err(
                    format!("{ppath}.protocol"),
                    format!("protocol `{proto}` is not supported by remora; expected one of {}", PROTOCOLS.join(", ")),
                ),
                Some(_) => {}
                None if inferred_protocol(&p.name).is_none() => self.warn(
                    ppath.clone(),
                    "no protocol is set and the port name does not start with one (as in `http-web`); the port is treated as TCP",
                ),
                None => {}
            }
            if let Some(t) = p.target_port {
                self.port(&format!("{ppath}.targetPort"), t);
            }
        }

        match resolution {
            "NONE" if !se.endpoints.is_empty() => {
                self.err("spec.endpoints", "endpoints are not allowed with resolution NONE");
            }
            "STATIC" if se.endpoints.is_empty() => {
                self.err("spec.endpoints", "resolution STATIC needs endpoints with IP addresses");
            }
            "DNS_ROUND_ROBIN" if se.endpoints.len() > 1 => {
                self.err("spec.endpoints", "resolution DNS_ROUND_ROBIN allows at most one endpoint");
            }
            "DNS" | "DNS_ROUND_ROBIN" if se.endpoints.is_empty() => {
                for (i, h) in se.hosts.iter().enumerate() {
                    if h.starts_with('*') {
                        self.err(
                            format!("spec.hosts[{i}]"),
                            "with resolution DNS and no endpoints, hosts must be resolvable names, not wildcards",
                        );
                    }
                }
            }
            _ => {}
        }
        for (i, ep) in se.endpoints.iter().enumerate() {
            self.service_endpoint(&format!("spec.endpoints[{i}]"), ep, resolution, &names);
        }

        if se.workload_selector.is_some() {
            self.err(
                "spec.workloadSelector",
                "`spec.workloadSelector` is not supported by remora (it has no workload registry); list `endpoints`",
            );
        }
        for (i, a) in se.addresses.iter().enumerate() {
            if a.parse::<std::net::IpAddr>().is_err() {
                let path = format!("spec.addresses[{i}]");
                if a.contains('/') {
                    self.warn(
                        path,
                        format!("address range {a:?} is parsed and ignored by remora; list single IP addresses"),
                    );
                } else {
                    self.err(path, format!("{a:?} is not an IP address"));
                }
            }
        }
        if !se.subject_alt_names.is_empty() {
            self.ignored("spec.subjectAltNames");
        }
        if !se.export_to.is_empty() {
            self.ignored("spec.exportTo");
        }
    }

    fn service_endpoint(
        &mut self,
        path: &str,
        ep: &model::WorkloadEntry,
        resolution: &str,
        port_names: &HashSet<&str>,
    ) {
        let apath = format!("{path}.address");
        let addr = ep.address.as_str();
        if addr.is_empty() {
            self.err(apath, "address is required");
        } else if addr.starts_with("unix://") {
            self.err(apath, "unix domain socket endpoints are not supported by remora");
        } else if resolution == "STATIC" {
            if addr.parse::<IpAddr>().is_err() {
                self.err(apath, format!("with resolution STATIC the address must be an IP address, not `{addr}`"));
            }
        } else if (resolution == "DNS" || resolution == "DNS_ROUND_ROBIN")
            && addr.parse::<IpAddr>().is_err()
            && let Some(problem) = host_problem(addr, false, false)
        {
            self.err(apath, format!("with resolution DNS the address must be a DNS name or an IP address: {problem}"));
        }
        let ports_path = format!("{path}.ports");
        for (name, number) in &ep.ports {
            let p = field_path(&ports_path, name);
            if !port_names.contains(name.as_str()) {
                self.err(p.clone(), format!("`{name}` is not the name of a port of this ServiceEntry"));
            }
            self.port(&p, *number);
        }
        self.labels(&format!("{path}.labels"), &ep.labels);
    }

    // === Gateway ===

    /// A Gateway server's TLS: SIMPLE and MUTUAL from files.
    fn server_tls(&mut self, path: &str, t: &model::ServerTlsSettings) {
        match t.mode.as_deref().unwrap_or("SIMPLE") {
            "SIMPLE" | "MUTUAL" => {
                for (name, v) in [("serverCertificate", &t.server_certificate), ("privateKey", &t.private_key)] {
                    if !set(v) {
                        self.err(format!("{path}.{name}"), format!("`{name}` (a file path) is required"));
                    }
                }
                if t.mode.as_deref() == Some("MUTUAL") && !set(&t.ca_certificates) {
                    self.err(format!("{path}.caCertificates"), "MUTUAL needs `caCertificates` to verify clients");
                }
            }
            m @ ("PASSTHROUGH" | "AUTO_PASSTHROUGH" | "ISTIO_MUTUAL" | "OPTIONAL_MUTUAL") => {
                self.err(format!("{path}.mode"), format!("tls mode {m} on a Gateway is not supported by remora yet"))
            }
            other => self.err(format!("{path}.mode"), format!("unknown tls mode `{other}`")),
        }
        if set(&t.credential_name) || !t.credential_names.is_empty() || present(&t.tls_certificates) {
            self.err(
                format!("{path}.credentialName"),
                "Kubernetes secrets are not supported by remora; use serverCertificate and privateKey files",
            );
        }
        for (name, v) in
            [("minProtocolVersion", &t.min_protocol_version), ("maxProtocolVersion", &t.max_protocol_version)]
        {
            match v.as_deref() {
                None | Some("TLS_AUTO" | "TLSV1_2" | "TLSV1_3") => {}
                Some(other @ ("TLSV1_0" | "TLSV1_1")) => self.err(
                    format!("{path}.{name}"),
                    format!("{other} is not offered: remora speaks TLS 1.2 and 1.3 only"),
                ),
                Some(other) => self.err(format!("{path}.{name}"), format!("unknown TLS version `{other}`")),
            }
        }
        if set(&t.ca_crl) {
            self.not_yet(&format!("{path}.caCrl"));
        }
        if !t.verify_certificate_spki.is_empty() || !t.verify_certificate_hash.is_empty() {
            self.not_yet(&format!("{path}.verifyCertificateSpki"));
        }
        if !t.cipher_suites.is_empty() {
            self.warn(
                format!("{path}.cipherSuites"),
                "remora uses rustls' default cipher suites; `cipherSuites` is ignored",
            );
        }
    }

    fn gateway(&mut self, gw: &model::Gateway) {
        if gw.servers.is_empty() {
            self.err("spec.servers", "at least one server is required");
        }
        for (i, s) in gw.servers.iter().enumerate() {
            let spath = format!("spec.servers[{i}]");
            if s.port.number == 0 {
                self.err(format!("{spath}.port.number"), "port.number is required");
            } else {
                self.port(&format!("{spath}.port.number"), s.port.number);
            }
            let ppath = format!("{spath}.port.protocol");
            match s.port.protocol.as_deref().filter(|p| !p.is_empty()) {
                None => self.err(ppath, "port.protocol is required (HTTP, HTTP2 or GRPC)"),
                Some(p) => match known_protocol(p) {
                    Some("HTTP" | "HTTP2" | "GRPC") => {
                        if s.tls.as_ref().is_some_and(|t| t.mode.is_some()) {
                            self.err(format!("{spath}.tls.mode"), "a TLS mode needs protocol HTTPS");
                        }
                    }
                    Some("HTTPS") => match &s.tls {
                        None => self.err(format!("{spath}.tls"), "protocol HTTPS needs `tls`"),
                        Some(t) => self.server_tls(&format!("{spath}.tls"), t),
                    },
                    Some("TLS" | "TCP") => self.err(
                        ppath,
                        format!("protocol {} on a Gateway is not supported by remora yet", p.to_ascii_uppercase()),
                    ),
                    _ => self.err(
                        ppath,
                        format!("protocol `{p}` is not supported on a Gateway; use HTTP, HTTPS, HTTP2 or GRPC"),
                    ),
                },
            }
            if s.hosts.is_empty() {
                self.err(format!("{spath}.hosts"), "at least one host is required");
            }
            for (j, h) in s.hosts.iter().enumerate() {
                if let Some(problem) = gateway_host_problem(h) {
                    self.err(format!("{spath}.hosts[{j}]"), problem);
                }
            }
            self.bind(&format!("{spath}.bind"), &s.bind);
            if set(&s.default_endpoint) {
                self.ignored(&format!("{spath}.defaultEndpoint"));
            }
        }
    }

    // === Sidecar ===

    fn sidecar(&mut self, sc: &model::Sidecar) {
        let mut ports = HashSet::new();
        for (i, ing) in sc.ingress.iter().enumerate() {
            let ipath = format!("spec.ingress[{i}]");
            if ing.port.number == 0 {
                self.err(format!("{ipath}.port.number"), "port.number is required");
            } else {
                self.port(&format!("{ipath}.port.number"), ing.port.number);
                if !ports.insert(ing.port.number) {
                    self.err(
                        format!("{ipath}.port.number"),
                        format!("port {} has more than one ingress listener", ing.port.number),
                    );
                }
            }
            if let Some(p) = ing.port.protocol.as_deref().filter(|p| !p.is_empty())
                && !matches!(known_protocol(p), Some("HTTP" | "HTTP2" | "GRPC"))
            {
                self.err(
                    format!("{ipath}.port.protocol"),
                    format!(
                        "protocol `{p}` on a sidecar ingress is not supported by remora yet; use HTTP, HTTP2 or GRPC"
                    ),
                );
            }
            match ing.default_endpoint.as_deref().filter(|e| !e.is_empty()) {
                None => self.err(
                    format!("{ipath}.defaultEndpoint"),
                    "remora needs `defaultEndpoint`: where the local app listens, e.g. 127.0.0.1:8080",
                ),
                Some(e) => self.default_endpoint(&format!("{ipath}.defaultEndpoint"), e),
            }
            self.bind(&format!("{ipath}.bind"), &ing.bind);
            self.capture_mode(&format!("{ipath}.captureMode"), &ing.capture_mode);
            if present(&ing.tls) {
                self.not_yet(&format!("{ipath}.tls"));
            }
            if let Some(cp) = &ing.connection_pool {
                self.connection_pool(&format!("{ipath}.connectionPool"), cp);
            }
        }
        let last = sc.egress.len().saturating_sub(1);
        for (i, eg) in sc.egress.iter().enumerate() {
            let epath = format!("spec.egress[{i}]");
            if eg.hosts.is_empty() {
                self.err(format!("{epath}.hosts"), "at least one host is required");
            }
            for (j, h) in eg.hosts.iter().enumerate() {
                if let Some(problem) = egress_host_problem(h) {
                    self.err(format!("{epath}.hosts[{j}]"), problem);
                }
            }
            match &eg.port {
                Some(p) if p.number != 0 => self.port(&format!("{epath}.port.number"), p.number),
                _ if i != last => self.err(epath.clone(), "only the last egress listener may omit `port`"),
                _ => {}
            }
            self.bind(&format!("{epath}.bind"), &eg.bind);
            self.capture_mode(&format!("{epath}.captureMode"), &eg.capture_mode);
        }
        if let Some(otp) = &sc.outbound_traffic_policy {
            if let Some(mode) = otp.mode.as_deref()
                && mode != "ALLOW_ANY"
                && mode != "REGISTRY_ONLY"
            {
                self.err(
                    "spec.outboundTrafficPolicy.mode",
                    format!("unknown mode `{mode}`; expected ALLOW_ANY or REGISTRY_ONLY"),
                );
            }
            if present(&otp.egress_proxy) {
                self.unsupported("spec.outboundTrafficPolicy.egressProxy");
            }
        }
        if let Some(cp) = &sc.inbound_connection_pool {
            self.connection_pool("spec.inboundConnectionPool", cp);
        }
    }

    fn default_endpoint(&mut self, path: &str, e: &str) {
        if e.starts_with("unix://") {
            self.err(path, "unix domain socket endpoints are not supported by remora");
            return;
        }
        let valid = e.parse::<SocketAddr>().is_ok_and(|sa| {
            let ip = sa.ip();
            sa.port() != 0
                && (ip.is_loopback() && (ip == IpAddr::from([127, 0, 0, 1]) || ip.is_ipv6()) || ip.is_unspecified())
        });
        if !valid {
            self.err(
                path,
                format!("defaultEndpoint `{e}` must be 127.0.0.1:PORT, [::1]:PORT, 0.0.0.0:PORT or [::]:PORT"),
            );
        }
    }

    // === AuthorizationPolicy ===

    fn authorization_policy(&mut self, ap: &model::AuthorizationPolicy) {
        let action = match authz::Action::parse(ap.action.as_deref()) {
            Ok(a) => Some(a),
            Err(msg) => {
                self.err("spec.action", msg);
                None
            }
        };
        if action == Some(authz::Action::Custom) {
            self.err("spec.action", "action CUSTOM (external authorization) is not supported by remora");
        } else if present(&ap.provider) {
            self.err("spec.provider", "`provider` is only allowed with action CUSTOM");
        }
        let target_ref = present(&ap.target_ref);
        let target_refs = present(&ap.target_refs);
        if target_ref {
            self.unsupported("spec.targetRef");
        }
        if target_refs {
            self.unsupported("spec.targetRefs");
        }
        if let Some(selector) = &ap.selector {
            if target_ref || target_refs {
                self.err("spec.selector", "only one of `selector`, `targetRef` and `targetRefs` may be set");
            }
            for (k, v) in &selector.match_labels {
                let path = field_path("spec.selector.matchLabels", k);
                if k.is_empty() {
                    self.err(path, "label keys must not be empty");
                } else if v.contains('*') {
                    self.err(path, "wildcards are not allowed in label values");
                }
            }
        }
        self.dry_run(action);
        if action == Some(authz::Action::Deny) && ap.rules.is_empty() {
            self.err(
                "spec.rules",
                "a DENY policy without `rules` never matches; add an empty rule `{}` to deny every request",
            );
        }
        for (i, rule) in ap.rules.iter().enumerate() {
            let path = format!("spec.rules[{i}]");
            self.authz_rule(&path, rule);
            if action == Some(authz::Action::Deny) && authz::widens_on_tcp(rule) {
                self.warn(
                    path,
                    "this DENY rule matches HTTP attributes (hosts, methods, paths or request headers) without \
                     naming `ports`; TCP connections have no HTTP attributes, so on TCP ports it denies every \
                     connection its other fields match",
                );
            }
        }
    }

    /// `istio.io/dry-run`: a boolean, on ALLOW and DENY policies only.
    fn dry_run(&mut self, action: Option<authz::Action>) {
        let Some(value) = self.r.meta.annotations.get(authz::DRY_RUN_ANNOTATION) else { return };
        let path = field_path("metadata.annotations", authz::DRY_RUN_ANNOTATION);
        if authz::parse_bool(value).is_none() {
            self.err(path, format!("`{value}` is not a boolean"));
            return;
        }
        if let Some(authz::Action::Audit | authz::Action::Custom) = action {
            self.err(path, format!("`{}` is only defined for ALLOW and DENY policies", authz::DRY_RUN_ANNOTATION))
        }
    }

    fn authz_rule(&mut self, path: &str, rule: &model::Rule) {
        if let Some(from) = &rule.from {
            if from.is_empty() {
                self.err(format!("{path}.from"), "`from` must not be empty; leave it out to match any source");
            }
            for (j, f) in from.iter().enumerate() {
                let fpath = format!("{path}.from[{j}]");
                match &f.source {
                    Some(s) => self.authz_source(&format!("{fpath}.source"), s),
                    None => self.err(fpath, "`source` is required"),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                self.err(format!("{path}.to"), "`to` must not be empty; leave it out to match any operation");
            }
            for (j, t) in to.iter().enumerate() {
                let tpath = format!("{path}.to[{j}]");
                match &t.operation {
                    Some(o) => self.authz_operation(&format!("{tpath}.operation"), o),
                    None => self.err(tpath, "`operation` is required"),
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            self.authz_condition(&format!("{path}.when[{j}]"), c);
        }
    }

    /// Istio rejects empty strings in every AuthorizationPolicy list.
    fn authz_no_empty_values(&mut self, path: &str, name: &str, list: &[String]) {
        for (k, v) in list.iter().enumerate() {
            if v.is_empty() {
                self.err(format!("{path}.{name}[{k}]"), "empty values are not allowed");
            }
        }
    }

    fn authz_source(&mut self, path: &str, s: &model::Source) {
        let lists = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ];
        if lists.iter().all(|(_, l)| l.is_empty()) {
            self.err(path, "`source` must set at least one field");
        }
        for (name, list) in lists {
            self.authz_no_empty_values(path, name, list);
        }
        for (name, list) in
            [("requestPrincipals", &s.request_principals), ("notRequestPrincipals", &s.not_request_principals)]
        {
            if !list.is_empty() {
                self.err(
                    format!("{path}.{name}"),
                    format!("`{name}` needs RequestAuthentication (JWT), which is not supported by remora"),
                );
            }
        }
        let identities = [&s.principals, &s.not_principals, &s.namespaces, &s.not_namespaces];
        let accounts = [("serviceAccounts", &s.service_accounts), ("notServiceAccounts", &s.not_service_accounts)];
        if accounts.iter().any(|(_, l)| !l.is_empty()) && identities.iter().any(|l| !l.is_empty()) {
            self.err(path, "`serviceAccounts` cannot be combined with `principals` or `namespaces`");
        }
        for (name, list) in accounts {
            if list.len() > authz::MAX_SERVICE_ACCOUNTS {
                self.err(
                    format!("{path}.{name}"),
                    format!("at most {} service accounts are allowed", authz::MAX_SERVICE_ACCOUNTS),
                );
            }
            for (k, v) in list.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                if let Err(msg) = authz::ServiceAccount::parse(v, &self.r.namespace) {
                    self.err(format!("{path}.{name}[{k}]"), msg);
                }
            }
        }
        for (name, list) in [
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            for (k, v) in list.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                if let Err(msg) = authz::IpBlock::parse(v) {
                    self.err(format!("{path}.{name}[{k}]"), msg);
                }
            }
        }
    }

    fn authz_operation(&mut self, path: &str, o: &model::Operation) {
        let lists = [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("ports", &o.ports),
            ("notPorts", &o.not_ports),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ];
        if lists.iter().all(|(_, l)| l.is_empty()) {
            self.err(path, "`operation` must set at least one field");
        }
        for (name, list) in lists {
            self.authz_no_empty_values(path, name, list);
        }
        for (name, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
            for (k, v) in list.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                if let Err(msg) = authz::parse_port(v) {
                    self.err(format!("{path}.{name}[{k}]"), msg);
                }
            }
        }
        for (name, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
            for (k, v) in list.iter().enumerate() {
                if let Some(msg) = authz::path_problem(v) {
                    self.err(format!("{path}.{name}[{k}]"), msg);
                }
            }
        }
    }

    fn authz_condition(&mut self, path: &str, c: &model::Condition) {
        if c.key.is_empty() {
            self.err(format!("{path}.key"), "`key` is required");
            return;
        }
        let key = match authz::ConditionKey::parse(&c.key) {
            Ok(key) => key,
            Err(msg) => {
                self.err(format!("{path}.key"), msg);
                return;
            }
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            self.err(path, "at least one of `values` and `notValues` is required");
        }
        for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
            self.authz_no_empty_values(path, name, list);
            for (k, v) in list.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                let problem = match key {
                    authz::ConditionKey::SourceIp | authz::ConditionKey::RemoteIp => authz::IpBlock::parse(v).err(),
                    authz::ConditionKey::DestinationPort => authz::parse_port(v).err(),
                    _ => None,
                };
                if let Some(msg) = problem {
                    self.err(format!("{path}.{name}[{k}]"), msg);
                }
            }
        }
    }
}

/// A Gateway server host: `host`, `ns/host`, `*`, `*.example.com`, where
/// `ns` is `*`, `.` or a namespace name.
fn gateway_host_problem(h: &str) -> Option<String> {
    let (ns, host) = match h.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, h),
    };
    if let Some(ns) = ns
        && ns != "*"
        && ns != "."
        && !is_dns1123_label(ns)
    {
        return Some(format!("`{ns}` in `{h}` is not `*`, `.` or a namespace name"));
    }
    host_problem(host, true, false)
}

/// A Sidecar egress host: `namespace/dnsName`, where `namespace` is `*`,
/// `.`, `~` or a namespace name, and `dnsName` is `*` or a (wildcard) name.
fn egress_host_problem(h: &str) -> Option<String> {
    let Some((ns, host)) = h.split_once('/') else {
        return Some(format!("`{h}` must have the form namespace/dnsName, as in `./*` or `istio-system/*`"));
    };
    if !matches!(ns, "*" | "." | "~") && !is_dns1123_label(ns) {
        return Some(format!("`{ns}` in `{h}` is not `*`, `.`, `~` or a namespace name"));
    }
    host_problem(host, true, false)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Severity;
    use crate::config::load::load_str;

    /// Loads `yaml` (which must load cleanly) and validates every resource.
    fn check(yaml: &str) -> Vec<Diagnostic> {
        let set = load_str(Path::new("t.yaml"), yaml, "default");
        assert!(set.diagnostics.iter().all(|d| !d.is_error()), "load: {:?}", set.diagnostics);
        assert!(!set.resources.is_empty());
        let mut out = Vec::new();
        for r in &set.resources {
            validate_resource(r, &mut out);
        }
        out
    }

    fn rendered(diags: &[Diagnostic], severity: Severity) -> Vec<String> {
        diags.iter().filter(|d| d.severity == severity).map(|d| format!("{}: {}", d.path, d.message)).collect()
    }

    fn errors(yaml: &str) -> Vec<String> {
        rendered(&check(yaml), Severity::Error)
    }

    fn warnings(yaml: &str) -> Vec<String> {
        rendered(&check(yaml), Severity::Warning)
    }

    fn vs(body: &str) -> String {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n{body}")
    }

    fn dr(body: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n  host: r\n{body}"
        )
    }

    fn se(body: &str) -> String {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: r}}\nspec:\n{body}")
    }

    /// Asserts that some error's `path: message` contains `want`.
    #[track_caller]
    fn assert_error(found: &[String], want: &str) {
        assert!(found.iter().any(|e| e.contains(want)), "no error containing {want:?} in {found:#?}");
    }

    #[test]
    fn exported_helpers() {
        let port = |name: &str, protocol: Option<&str>| model::ServicePort {
            number: 80,
            protocol: protocol.map(str::to_string),
            name: name.into(),
            target_port: None,
        };
        assert_eq!(port_protocol(&port("x", Some("http"))), "HTTP");
        assert_eq!(port_protocol(&port("http-web", Some("Grpc"))), "GRPC");
        assert_eq!(port_protocol(&port("http-web", None)), "HTTP");
        assert_eq!(port_protocol(&port("http2", None)), "HTTP2");
        assert_eq!(port_protocol(&port("grpc-web", None)), "GRPC-WEB");
        assert_eq!(port_protocol(&port("grpc-api", None)), "GRPC");
        assert_eq!(port_protocol(&port("web", None)), "TCP");
        assert_eq!(port_protocol(&port("web", Some("REDIS"))), "TCP");
        assert!(is_dns1123_label("v2-mysql-vm"));
        assert!(is_dns1123_label("a"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("a_b"));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert_eq!(percent_of(None, None), 0.0);
        assert_eq!(percent_of(None, Some(100)), 100.0);
        assert_eq!(percent_of(Some(Percent { value: 0.1 }), Some(100)), 0.1);
        assert_eq!(percent_of(Some(Percent { value: 250.0 }), None), 100.0);
        assert_eq!(grpc_status_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_status_code("unavailable"), None);
        assert_eq!(decode_base64("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("aGk-_w=="), Some(vec![0x68, 0x69, 0x3e, 0xff]));
        assert_eq!(decode_base64(""), Some(Vec::new()));
        assert_eq!(decode_base64("aGVsbG8=x"), None);
        assert_eq!(decode_base64("aGVsbG8==="), None);
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("aGV sbG8"), None);
    }

    #[test]
    fn bookinfo_samples_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples/bookinfo");
        for name in [
            "bookinfo-gateway.yaml",
            "destination-rule-all.yaml",
            "fault-injection-details-v1.yaml",
            "virtual-service-all-v1.yaml",
            "virtual-service-ratings-test-abort.yaml",
            "virtual-service-ratings-test-delay.yaml",
            "virtual-service-reviews-50-v3.yaml",
            "virtual-service-reviews-80-20.yaml",
            "virtual-service-reviews-jason-v2-v3.yaml",
            "virtual-service-reviews-test-v2.yaml",
            "virtual-service-reviews-v3.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let diags = check(&text);
            assert!(diags.iter().all(|d| !d.is_error()), "{name}: {diags:#?}");
            let warns = rendered(&diags, Severity::Warning);
            match name {
                "virtual-service-ratings-test-abort.yaml" => {
                    assert_eq!(
                        warns,
                        vec![
                            "spec.http[0].fault.abort.percent: `percent` is deprecated; use `percentage: {value: 100}`"
                        ]
                    )
                }
                "virtual-service-ratings-test-delay.yaml" => {
                    assert_eq!(
                        warns,
                        vec![
                            "spec.http[0].fault.delay.percent: `percent` is deprecated; use `percentage: {value: 100}`"
                        ]
                    )
                }
                _ => assert!(warns.is_empty(), "{name}: {warns:?}"),
            }
        }
        // ISTIO_MUTUAL is valid on its own; whether this proxy has the
        // identity it needs is the compiler's question.
        let text = std::fs::read_to_string(dir.join("destination-rule-all-mtls.yaml")).unwrap();
        let diags = check(&text);
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:#?}");
    }

    #[test]
    fn route_actions_and_exclusions() {
        let e = errors(&vs("  hosts: [a]\n  http:\n  - name: nothing\n"));
        assert_error(&e, "spec.http[0]: an HTTP route needs one of `route`, `redirect` or `directResponse`");
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - redirect: {uri: /x}\n    route: [{destination: {host: a}}]\n    fault: {abort: {httpStatus: 500, percentage: {value: 1}}}\n    directResponse: {status: 200}\n",
        ));
        assert_error(&e, "spec.http[0].route: `route` cannot be combined with `redirect`");
        assert_error(&e, "spec.http[0].fault: `fault` cannot be combined with `redirect`");
        assert_error(&e, "spec.http[0].directResponse: `directResponse` cannot be combined with `redirect`");
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - directResponse: {status: 700, body: {string: x, bytes: eA==}}\n    rewrite: {uri: /x}\n",
        ));
        assert_error(&e, "spec.http[0].rewrite: `rewrite` cannot be combined with `directResponse`");
        assert_error(&e, "spec.http[0].directResponse.status: status 700 must be between 200 and 599");
        assert_error(&e, "spec.http[0].directResponse.body: set only one of `string` and `bytes`");
        let e =
            errors(&vs("  hosts: [a]\n  http:\n  - directResponse: {status: 503, body: {bytes: \"not base64!\"}}\n"));
        assert_error(&e, "spec.http[0].directResponse.body.bytes: `bytes` must be valid base64");
        let big = "x".repeat(200 * 1024);
        let w = warnings(&vs(&format!(
            "  hosts: [a]\n  http:\n  - directResponse: {{status: 200, body: {{string: {big}}}}}\n"
        )));
        assert_error(&w, "spec.http[0].directResponse.body: the body is 204800 bytes");
        let big = "x".repeat(1024 * 1024 + 1);
        let e = errors(&vs(&format!(
            "  hosts: [a]\n  http:\n  - directResponse: {{status: 200, body: {{string: {big}}}}}\n"
        )));
        assert_error(&e, "the limit is 1048576 (1 MiB)");
    }

    #[test]
    fn redirects() {
        let e = errors(&vs("  hosts: [a]\n  http:\n  - redirect: {redirectCode: 301}\n"));
        assert_error(&e, "spec.http[0].redirect: a redirect must set at least one of");
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - match: [{uri: {exact: /a}}, {uri: {prefix: /b}}]\n    redirect: {uri: /x, prefixRewrite: /y, scheme: ftp, redirectCode: 304, port: 8080, derivePort: FROM_REQUEST_PORT}\n",
        ));
        assert_error(&e, "spec.http[0].redirect.prefixRewrite: `uri` and `prefixRewrite` are mutually exclusive");
        assert_error(
            &e,
            "spec.http[0].match[0].uri: a redirect with `prefixRewrite` needs every uri match to be a prefix match",
        );
        assert!(!e.iter().any(|x| x.contains("match[1]")), "{e:?}");
        assert_error(&e, "spec.http[0].redirect.scheme: scheme `ftp` must be http or https");
        assert_error(&e, "spec.http[0].redirect.redirectCode: redirectCode 304 must be one of 301, 302, 303, 307, 308");
        assert_error(&e, "spec.http[0].redirect.derivePort: `port` and `derivePort` are mutually exclusive");
        let e = errors(&vs("  hosts: [a]\n  http:\n  - redirect: {derivePort: SOMETIMES}\n"));
        assert_error(&e, "derivePort `SOMETIMES` must be FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT");
        assert!(errors(&vs("  hosts: [a]\n  http:\n  - match: [{uri: {prefix: /a/}}]\n    redirect: {prefixRewrite: /, redirectCode: 308}\n")).is_empty());
    }

    #[test]
    fn rewrites_and_regexes() {
        let e = errors(&vs("  hosts: [a]\n  http:\n  - rewrite: {}\n    route: [{destination: {host: a}}]\n"));
        assert_error(&e, "spec.http[0].rewrite: a rewrite must set uri, uriRegexRewrite or authority");
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - rewrite: {uri: /x, uriRegexRewrite: {match: \"(\"}}\n    route: [{destination: {host: a}}]\n",
        ));
        assert_error(&e, "spec.http[0].rewrite.uriRegexRewrite: `uri` and `uriRegexRewrite` are mutually exclusive");
        assert_error(&e, "spec.http[0].rewrite.uriRegexRewrite.match: invalid regex `(`: unclosed group");
        assert_error(&e, "spec.http[0].rewrite.uriRegexRewrite.rewrite: `rewrite` is required");
        let huge = "a{1000}{1000}";
        let e = errors(&vs(&format!(
            "  hosts: [a]\n  http:\n  - match: [{{uri: {{regex: \"{huge}\"}}}}]\n    route: [{{destination: {{host: a}}}}]\n"
        )));
        assert_error(&e, "spec.http[0].match[0].uri.regex: regex `a{1000}{1000}` is too large");
        let w = warnings(&vs(
            "  hosts: [a]\n  http:\n  - match: [{uri: {regex: /a.*}, ignoreUriCase: true}]\n    route: [{destination: {host: a}}]\n",
        ));
        assert_error(&w, "spec.http[0].match[0].ignoreUriCase: ignoreUriCase has no effect on a regex match");
    }

    #[test]
    fn matches() {
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - match:\n    - uri: {exact: /a, prefix: /b}\n      method: {}\n      scheme: {prefix: \"\"}\n      headers:\n        End-User: {exact: x}\n        \"@request.auth.claims.group\": {exact: x}\n        ok: {}\n        present: {regex: \"*\"}\n        \"bad header\": {exact: x}\n      queryParams: {v: {prefix: \"\"}}\n      port: 70000\n      sourceNamespace: Not_A_Namespace\n    route: [{destination: {host: a}}]\n",
        ));
        assert_error(&e, "spec.http[0].match[0].uri: set only one of exact, prefix and regex");
        assert_error(&e, "spec.http[0].match[0].method: set one of exact, prefix or regex");
        assert_error(&e, "spec.http[0].match[0].scheme.prefix: prefix must not be empty");
        assert_error(
            &e,
            "spec.http[0].match[0].headers.End-User: header names in matches must be lowercase: `end-user`",
        );
        assert_error(
            &e,
            "headers[\"@request.auth.claims.group\"]: matching JWT claims (`@request.auth.claims`) is not supported by remora",
        );
        assert_error(&e, "headers[\"bad header\"]: `bad header` is not a valid HTTP header name");
        assert_error(&e, "spec.http[0].match[0].queryParams.v.prefix: prefix must not be empty");
        assert_error(&e, "spec.http[0].match[0].port: port number 70000 is not in 1..=65535");
        assert_error(&e, "spec.http[0].match[0].sourceNamespace: `Not_A_Namespace` is not a valid namespace name");
        assert_eq!(e.len(), 9, "{e:#?}");
        // `prefix: ""` is fine for uri; sourceLabels and gateways are accepted.
        let d = check(&vs(
            "  hosts: [a]\n  http:\n  - match: [{uri: {prefix: \"\"}, sourceLabels: {app: x}, gateways: [mesh], statPrefix: s}]\n    route: [{destination: {host: a}}]\n",
        ));
        assert!(rendered(&d, Severity::Error).is_empty(), "{d:?}");
        assert_eq!(
            rendered(&d, Severity::Warning),
            vec![
                "spec.http[0].match[0].statPrefix: `spec.http[0].match[0].statPrefix` is parsed and ignored by remora"
            ]
        );
    }

    #[test]
    fn destinations_and_weights() {
        let e = errors(&vs(
            "  hosts: [\"*\", \"*.example.com\", \"10.0.0.1\", \"a.*.com\"]\n  http:\n  - route:\n    - destination: {host: \"*\", subset: V_1, port: {number: 0}}\n      weight: -1\n    - destination: {host: \"\"}\n  - route:\n    - destination: {host: a}\n      weight: 0\n    - destination: {host: b}\n",
        ));
        assert_error(&e, "spec.hosts[3]: host `a.*.com`: a wildcard is only allowed as the whole first label");
        assert_error(&e, "spec.http[0].route[0].destination.host: `*` is not a valid destination host");
        assert_error(&e, "spec.http[0].route[0].destination.subset: subset name `V_1` is not a valid DNS-1123 label");
        assert_error(&e, "spec.http[0].route[0].destination.port.number: port number 0 is not in 1..=65535");
        assert_error(&e, "spec.http[0].route[0].weight: weight -1 must not be negative");
        assert_error(&e, "spec.http[0].route[1].destination.host: destination host is required");
        assert_error(&e, "spec.http[1].route: total destination weight = 0");
        assert_eq!(e.len(), 8, "{e:#?}");
        // One destination gets all traffic whatever its weight; weights need not sum to 100.
        assert!(errors(&vs("  hosts: [a]\n  http:\n  - route: [{destination: {host: a}, weight: 0}]\n  - route: [{destination: {host: a}, weight: 3}, {destination: {host: b}, weight: 500}]\n")).is_empty());
        assert_error(&errors(&vs("  http: []\n")), "spec.hosts: at least one host is required");
    }

    #[test]
    fn unsupported_route_fields() {
        let e = errors(&vs(
            "  hosts: [a]\n  tcp: [{route: [{destination: {host: a}}]}]\n  tls: [{match: [{sniHosts: [a]}]}]\n  http:\n  - delegate: {name: x}\n  - route: [{destination: {host: a}}]\n    corsPolicy: {allowOrigins: [{exact: x}]}\n",
        ));
        assert_error(&e, "spec.tcp: `spec.tcp` is not supported by remora");
        assert_error(&e, "spec.tls: `spec.tls` is not supported by remora");
        assert_error(&e, "spec.http[0].delegate: `spec.http[0].delegate` is not supported by remora");
        assert_error(&e, "spec.http[1].corsPolicy: `spec.http[1].corsPolicy` is not supported by remora yet");
        assert_eq!(e.len(), 4, "{e:#?}");
    }

    #[test]
    fn retries_and_mirrors() {
        let ok = "  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,connect-failure,503,unavailable\", backoff: 50ms}\n    mirror: {host: b, subset: v2}\n    mirrorPercentage: {value: 5}\n  - route: [{destination: {host: a}}]\n    mirrors: [{destination: {host: b}, percentage: {value: 50}}, {destination: {host: c}}]\n";
        assert!(errors(&vs(ok)).is_empty(), "{:#?}", errors(&vs(ok)));
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    retries: {attempts: 0, perTryTimeout: 1s, retryOn: 5xx}\n  - route: [{destination: {host: a}}]\n    retries: {attempts: -1, retryOn: \"5xx,bogus,700\"}\n    mirror: {host: b}\n    mirrors: [{destination: {host: c}}]\n    mirrorPercentage: {value: 150}\n  - route: [{destination: {host: a}}]\n    mirrorPercent: 20\n",
        ));
        assert_error(
            &e,
            "spec.http[0].retries.perTryTimeout: `perTryTimeout` cannot be set when attempts is 0 (retries disabled)",
        );
        assert_error(&e, "spec.http[0].retries.retryOn: `retryOn` cannot be set when attempts is 0 (retries disabled)");
        assert_error(&e, "spec.http[1].retries.attempts: attempts must not be negative");
        assert!(e.iter().any(|x| x.contains("`bogus` is not a retry condition")), "{e:#?}");
        assert!(e.iter().any(|x| x.contains("`700` is not a retry condition")), "{e:#?}");
        assert_error(&e, "spec.http[1].mirrors: `mirror` and `mirrors` cannot both be set");
        assert!(e.iter().any(|x| x.starts_with("spec.http[1].mirrorPercentage")), "{e:#?}");
        assert_error(&e, "spec.http[2].mirrorPercentage: a mirror percentage needs `mirror`");
    }

    #[test]
    fn timeouts_and_faults() {
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - timeout: 1.5ms\n    route: [{destination: {host: a}}]\n  - timeout: 500us\n    route: [{destination: {host: a}}]\n  - timeout: 0s\n    route: [{destination: {host: a}}]\n",
        ));
        assert_eq!(
            e,
            vec![
                "spec.http[0].timeout: only durations to ms precision are supported",
                "spec.http[1].timeout: duration must be at least 1ms"
            ]
        );
        let d = check(&vs(
            "  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    fault:\n      delay: {exponentialDelay: 1s, percentage: {value: 101}}\n      abort: {httpStatus: 100, grpcStatus: unavailable, percent: 5, percentage: {value: 5}}\n  - route: [{destination: {host: a}}]\n    fault: {}\n  - route: [{destination: {host: a}}]\n    fault: {delay: {percent: 50}, abort: {http2Error: x}}\n",
        ));
        let e = rendered(&d, Severity::Error);
        assert_error(
            &e,
            "spec.http[0].fault.delay.exponentialDelay: `spec.http[0].fault.delay.exponentialDelay` is not supported by remora",
        );
        assert_error(&e, "spec.http[0].fault.delay.percentage.value: percentage 101 is not between 0 and 100");
        assert_error(&e, "spec.http[0].fault.abort: set only one of httpStatus, grpcStatus and http2Error");
        assert_error(&e, "spec.http[0].fault.abort.httpStatus: httpStatus 100 must be between 200 and 599");
        assert_error(&e, "spec.http[0].fault.abort.grpcStatus: `unavailable` is not a gRPC status name");
        assert_error(&e, "spec.http[0].fault.abort.percent: set only one of `percentage` and the deprecated `percent`");
        assert_error(&e, "spec.http[1].fault: a fault must set `delay` or `abort`");
        assert_error(&e, "spec.http[2].fault.delay: a delay needs `fixedDelay`");
        assert_error(
            &e,
            "spec.http[2].fault.abort.http2Error: `spec.http[2].fault.abort.http2Error` is not supported by remora",
        );
        assert_eq!(e.len(), 9, "{e:#?}");
        let w = rendered(&d, Severity::Warning);
        assert_error(&w, "spec.http[2].fault.delay.percent: `percent` is deprecated");
        assert_error(&w, "spec.http[2].fault.abort: no `percentage` is set, so this abort applies to no request");
        assert!(errors(&vs("  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}, delay: {fixedDelay: 7s, percentage: {value: 100}}}\n")).is_empty());
    }

    #[test]
    fn header_operations() {
        let e = errors(&vs(
            "  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a}\n      headers: {request: {set: {host: b}}}\n    rewrite: {authority: c}\n    headers:\n      request:\n        set: {\":path\": /x, x-ok: \"fine\", \"bad\\u0001\": v, x-ctl: \"a\\nb\"}\n        add: {\":authority\": b}\n        remove: [host, \":method\"]\n      response:\n        set: {\":status\": \"200\"}\n        remove: [x-powered-by]\n",
        ));
        assert_error(&e, "spec.http[0].headers.request.set[\":path\"]: pseudo-header `:path` cannot be set");
        assert_error(&e, "`bad\u{1}` is not a valid HTTP header name");
        assert_error(&e, "spec.http[0].headers.request.set.x-ctl: not a valid HTTP header value");
        assert_error(&e, "spec.http[0].headers.request.remove[0]: `host` cannot be removed");
        assert_error(&e, "spec.http[0].headers.request.remove[1]: pseudo-header `:method` cannot be removed");
        assert_error(&e, "spec.http[0].headers.response.set[\":status\"]: pseudo-header `:status` cannot be set");
        assert_error(&e, "spec.http[0].headers.request: the request authority is set more than once");
        assert_error(&e, "spec.http[0].route[0].headers.request: the request authority is set more than once");
        assert_eq!(e.len(), 8, "{e:#?}");
        assert!(errors(&vs("  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a}\n      headers: {request: {set: {X-Version: v2}}}\n    headers: {request: {add: {\":authority\": b.example}}, response: {remove: [server]}}\n")).is_empty());
    }

    #[test]
    fn destination_rules() {
        let d = check(&dr(
            "  exportTo: [\".\"]\n  trafficPolicy:\n    loadBalancer: {simple: LEAST_CONN, consistentHash: {httpCookie: {ttl: 0s}, useSourceIp: true, maglev: {tableSize: 7}}, warmupDurationSecs: 10s}\n    connectionPool:\n      tcp: {maxConnections: -1, connectTimeout: 0s, idleTimeout: 0s}\n      http: {http2MaxRequests: 3000000000, useClientProtocol: true, h2UpgradePolicy: UPGRADE}\n    outlierDetection: {consecutiveErrors: 1, consecutiveLocalOriginFailures: 3, maxEjectionPercent: 101, interval: 0s}\n    tls: {mode: ISTIO_MUTUAL, caCertificates: /etc/ca.pem}\n    portLevelSettings:\n    - port: {number: 80}\n      loadBalancer: {simple: PASSTHROUGH}\n    - port: {number: 80}\n      connectionPool: {}\n    - loadBalancer: {simple: FASTEST}\n    tunnel: {protocol: CONNECT}\n    proxyProtocol: {version: V1}\n    retryBudget: {percent: 20}\n  subsets:\n  - name: v1\n  - name: v1\n  - name: Not_Valid\n    trafficPolicy: {}\n",
        ));
        let e = rendered(&d, Severity::Error);
        let tp = "spec.trafficPolicy";
        for want in [
            format!("{tp}.loadBalancer: set only one of `simple` and `consistentHash`"),
            format!("{tp}.loadBalancer.consistentHash: set only one of httpHeaderName"),
            format!("{tp}.loadBalancer.consistentHash.httpCookie.name: cookie name is required"),
            format!(
                "{tp}.loadBalancer.consistentHash.maglev: `{tp}.loadBalancer.consistentHash.maglev` is not supported by remora yet"
            ),
            format!("{tp}.connectionPool.tcp.maxConnections: -1 must not be negative"),
            format!("{tp}.connectionPool.tcp.connectTimeout: duration must be at least 1ms"),
            format!("{tp}.connectionPool.http.http2MaxRequests: 3000000000 is larger than 2147483647"),
            format!(
                "{tp}.connectionPool.http.useClientProtocol: useClientProtocol cannot be combined with h2UpgradePolicy UPGRADE"
            ),
            format!(
                "{tp}.outlierDetection.consecutiveLocalOriginFailures: consecutiveLocalOriginFailures needs `splitExternalLocalOriginErrors: true`"
            ),
            format!("{tp}.outlierDetection.maxEjectionPercent: maxEjectionPercent 101 is not between 0 and 100"),
            format!("{tp}.outlierDetection.interval: duration must be at least 1ms"),
            format!("{tp}.tls: with ISTIO_MUTUAL the mesh's certificates are used"),
            format!(
                "{tp}.portLevelSettings[0].loadBalancer.simple: PASSTHROUGH load balancing is not supported by remora"
            ),
            format!("{tp}.portLevelSettings[1].port.number: port 80 has more than one entry"),
            format!("{tp}.portLevelSettings[1].connectionPool: a connectionPool must set `tcp` or `http`"),
            format!("{tp}.portLevelSettings[2].port: port is required"),
            format!("{tp}.portLevelSettings[2].loadBalancer.simple: unknown load balancer `FASTEST`"),
            format!("{tp}.tunnel: `{tp}.tunnel` is not supported by remora"),
            format!("{tp}.proxyProtocol: `{tp}.proxyProtocol` is not supported by remora"),
            format!("{tp}.retryBudget: `{tp}.retryBudget` is not supported by remora yet"),
            "spec.subsets[1].name: subset `v1` is defined twice".to_string(),
            "spec.subsets[2].name: subset name `Not_Valid` is not a valid DNS-1123 label".to_string(),
            "spec.subsets[2].trafficPolicy: a traffic policy must set at least one field".to_string(),
        ] {
            assert_error(&e, &want);
        }
        assert_eq!(e.len(), 23, "{e:#?}");
        let w = rendered(&d, Severity::Warning);
        for want in [
            format!("{tp}.loadBalancer.simple: LEAST_CONN is a deprecated alias of LEAST_REQUEST"),
            format!(
                "{tp}.loadBalancer.warmupDurationSecs: `{tp}.loadBalancer.warmupDurationSecs` is parsed and ignored by remora"
            ),
            format!("{tp}.outlierDetection.consecutiveErrors: `consecutiveErrors` is deprecated and Istio ignores it"),
            "spec.exportTo: `spec.exportTo` is parsed and ignored by remora".to_string(),
        ] {
            assert_error(&w, &want);
        }
        assert!(!w.iter().any(|x| x.contains("not enforced")), "{w:#?}");
        assert!(errors(&dr("  trafficPolicy:\n    tls: {mode: DISABLE}\n    loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}\n    connectionPool: {tcp: {maxConnections: 100, idleTimeout: 0s}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}\n")).is_empty());
    }

    #[test]
    fn service_entries() {
        let e = errors(&se(
            "  hosts: [\"*\", api.example.com]\n  resolution: STATIC\n  location: MESH_SOMEWHERE\n  ports:\n  - {number: 80, name: http, protocol: http}\n  - {number: 80, name: http, protocol: REDIS}\n  - {number: 0, protocol: TCP}\n  endpoints:\n  - address: api.example.com\n    ports: {http: 8080, grpc: 70000}\n  - address: unix:///var/run/app.sock\n  workloadSelector: {labels: {app: a}}\n",
        ));
        for want in [
            "spec.hosts[0]: `*` is not allowed here",
            "spec.location: unknown location `MESH_SOMEWHERE`",
            "spec.ports[1].number: port 80 is declared twice",
            "spec.ports[1].name: port name `http` is used twice",
            "spec.ports[1].protocol: protocol `REDIS` is not supported by remora",
            "spec.ports[2].number: port number 0 is not in 1..=65535",
            "spec.ports[2].name: port name is required",
            "spec.endpoints[0].address: with resolution STATIC the address must be an IP address, not `api.example.com`",
            "spec.endpoints[0].ports.grpc: `grpc` is not the name of a port of this ServiceEntry",
            "spec.endpoints[0].ports.grpc: port number 70000 is not in 1..=65535",
            "spec.endpoints[1].address: unix domain socket endpoints are not supported by remora",
            "spec.workloadSelector: `spec.workloadSelector` is not supported by remora",
        ] {
            assert_error(&e, want);
        }
        assert_eq!(e.len(), 12, "{e:#?}");
        let e = errors(&se(
            "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n  endpoints: [{address: 10.0.0.1}]\n",
        ));
        assert_eq!(e, vec!["spec.endpoints: endpoints are not allowed with resolution NONE"]);
        let e = errors(&se("  hosts: [\"*.example.com\"]\n  resolution: DNS\n  ports: [{number: 80, name: http}]\n"));
        assert_eq!(
            e,
            vec!["spec.hosts[0]: with resolution DNS and no endpoints, hosts must be resolvable names, not wildcards"]
        );
        let e =
            errors(&se("  hosts: [a.example.com]\n  resolution: DYNAMIC_DNS\n  ports: [{number: 80, name: http}]\n"));
        assert_eq!(e, vec!["spec.resolution: resolution DYNAMIC_DNS is not supported by remora"]);
        let e = errors(&se("  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, name: http}]\n"));
        assert_eq!(e, vec!["spec.endpoints: resolution STATIC needs endpoints with IP addresses"]);
        let d = check(&se(
            "  hosts: [a.example.com]\n  addresses: [240.0.0.1, 10.0.0.0/16]\n  resolution: DNS_ROUND_ROBIN\n  ports: [{number: 80, name: web}, {number: 9080, name: http-api}]\n  endpoints: [{address: backend.example.com, ports: {web: 8080}, labels: {version: v1}, weight: 3}]\n",
        ));
        assert!(rendered(&d, Severity::Error).is_empty(), "{d:#?}");
        assert_eq!(
            rendered(&d, Severity::Warning),
            vec![
                "spec.resolution: DNS_ROUND_ROBIN is treated as DNS: every resolved address is used",
                "spec.ports[0]: no protocol is set and the port name does not start with one (as in `http-web`); the port is treated as TCP",
                "spec.addresses[1]: address range \"10.0.0.0/16\" is parsed and ignored by remora; list single IP addresses",
            ]
        );
        let e = errors(&se("  hosts: []\n  ports: []\n"));
        assert_eq!(e, vec!["spec.hosts: at least one host is required", "spec.ports: at least one port is required"]);
    }

    #[test]
    fn gateways() {
        let gw = |servers: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}"
            )
        };
        let e = errors(&gw(
            "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"Bad_NS/x\", \"./*.example.com\", \"*\", \"prod/a.example.com\", \"*/x.*\"]\n    tls: {mode: SIMPLE}\n    bind: localhost\n  - port: {number: 80}\n    hosts: []\n  - port: {number: 8080, protocol: http2}\n    hosts: [\"*\"]\n    bind: 127.0.0.1\n",
        ));
        for want in [
            "spec.servers[0].tls.serverCertificate: `serverCertificate` (a file path) is required",
            "spec.servers[0].tls.privateKey: `privateKey` (a file path) is required",
            "spec.servers[0].hosts[0]: `Bad_NS` in `Bad_NS/x` is not `*`, `.` or a namespace name",
            "spec.servers[0].hosts[4]: host `x.*`: a wildcard is only allowed as the whole first label",
            "spec.servers[0].bind: bind `localhost` must be an IP address",
            "spec.servers[1].port.protocol: port.protocol is required",
            "spec.servers[1].hosts: at least one host is required",
        ] {
            assert_error(&e, want);
        }
        assert_eq!(e.len(), 7, "{e:#?}");
        let e = errors(&gw(
            "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH, credentialName: x, minProtocolVersion: TLSV1_1}\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE}\n",
        ));
        for want in [
            "spec.servers[0].tls.mode: tls mode PASSTHROUGH on a Gateway is not supported by remora yet",
            "spec.servers[0].tls.credentialName: Kubernetes secrets are not supported by remora",
            "spec.servers[0].tls.minProtocolVersion: TLSV1_1 is not offered",
            "spec.servers[1].tls.mode: a TLS mode needs protocol HTTPS",
        ] {
            assert_error(&e, want);
        }
        let e = errors("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n");
        assert_eq!(e, vec!["spec.servers: at least one server is required"]);
    }

    #[test]
    fn sidecars() {
        let text = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec:\n  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    defaultEndpoint: 127.0.0.1:8080\n  - port: {number: 9080, protocol: TCP}\n    defaultEndpoint: 10.0.0.1:8080\n    captureMode: NONE\n    tls: {mode: SIMPLE}\n  - port: {number: 9090}\n  - port: {number: 9091}\n    defaultEndpoint: unix:///sock\n    connectionPool: {http: {maxRetries: 1}}\n  - port: {number: 9092}\n    defaultEndpoint: \"[::]:80\"\n  egress:\n  - hosts: [\"istio-system/*\", \"./*\", \"~/*\", reviews, \"Bad_NS/x\"]\n  - port: {number: 9081}\n    bind: 127.0.0.2\n    hosts: [\"*/ratings.default.svc.cluster.local\"]\n  outboundTrafficPolicy: {mode: DENY_ALL, egressProxy: {host: x}}\n  inboundConnectionPool: {tcp: {maxConnections: 10}}\n";
        let d = check(text);
        let e = rendered(&d, Severity::Error);
        for want in [
            "spec.ingress[1].port.number: port 9080 has more than one ingress listener",
            "spec.ingress[1].port.protocol: protocol `TCP` on a sidecar ingress is not supported by remora yet",
            "spec.ingress[1].defaultEndpoint: defaultEndpoint `10.0.0.1:8080` must be 127.0.0.1:PORT, [::1]:PORT, 0.0.0.0:PORT or [::]:PORT",
            "spec.ingress[1].tls: `spec.ingress[1].tls` is not supported by remora yet",
            "spec.ingress[2].defaultEndpoint: remora needs `defaultEndpoint`",
            "spec.ingress[3].defaultEndpoint: unix domain socket endpoints are not supported by remora",
            "spec.egress[0]: only the last egress listener may omit `port`",
            "spec.egress[0].hosts[3]: `reviews` must have the form namespace/dnsName",
            "spec.egress[0].hosts[4]: `Bad_NS` in `Bad_NS/x` is not",
            "spec.outboundTrafficPolicy.mode: unknown mode `DENY_ALL`",
            "spec.outboundTrafficPolicy.egressProxy: `spec.outboundTrafficPolicy.egressProxy` is not supported by remora",
        ] {
            assert_error(&e, want);
        }
        assert_eq!(e.len(), 11, "{e:#?}");
        let bad_mode = text.replace("captureMode: NONE", "captureMode: SOMETIMES");
        let e = rendered(&check(&bad_mode), Severity::Error);
        assert_error(
            &e,
            "spec.ingress[1].captureMode: captureMode \"SOMETIMES\" is not one of DEFAULT, IPTABLES, NONE",
        );
    }

    #[test]
    fn peer_authentication() {
        let ok = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: web}\nspec: {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {\"8080\": {mode: DISABLE}}}\n";
        assert!(check(ok).is_empty(), "{:#?}", check(ok));
        let bad = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {mtls: {mode: SOMETIMES}, portLevelMtls: {\"0\": {mode: STRICT}}}\n";
        let e = rendered(&check(bad), Severity::Error);
        assert_error(&e, "spec.mtls.mode: mode must be UNSET, DISABLE, PERMISSIVE or STRICT");
        assert_error(&e, "spec.portLevelMtls: portLevelMtls requires a workload selector");
        assert!(e.iter().any(|x| x.contains("port 0 is not in 1..=65535")), "{e:#?}");
    }

    fn authz(meta: &str, spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\nspec:\n{spec}")
    }

    #[test]
    fn authorization_policy_valid_forms() {
        let spec = r#"  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep", "*"]
        notNamespaces: [dev]
        ipBlocks: ["10.0.0.0/8", "2001:db8::/32", "192.168.0.1"]
    - source: {serviceAccounts: [prod/api, sleep], notIpBlocks: ["10.9.0.0/16"]}
    to:
    - operation:
        hosts: ["*.example.com"]
        ports: ["8080"]
        methods: [GET, HEAD]
        paths: ["/api/*", "/v1/{*}/items/{**}", "*.png"]
        notPaths: ["/admin"]
    when:
    - key: request.headers[x-user]
      values: ["alice"]
    - key: source.ip
      notValues: ["10.1.0.0/16"]
    - key: source.namespace
      values: [default]
    - key: source.principal
      values: ["*"]
    - key: destination.port
      values: ["8080"]
  - {}"#;
        let d = check(&authz("{name: p}", spec));
        assert!(d.is_empty(), "{d:#?}");
        for spec in ["  {}", "  action: AUDIT\n  rules: [{}]", "  action: DENY\n  rules: [{}]"] {
            let d = check(&authz("{name: p}", spec));
            assert!(d.is_empty(), "{spec}: {d:#?}");
        }
    }

    #[test]
    fn authorization_policy_errors() {
        let e = errors(&authz("{name: p}", "  action: deny\n  rules: [{}]"));
        assert_eq!(e, ["spec.action: unknown action `deny` (expected ALLOW, DENY, AUDIT or CUSTOM)"]);
        let e = errors(&authz("{name: p}", "  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]"));
        assert_eq!(e, ["spec.action: action CUSTOM (external authorization) is not supported by remora"]);
        let e = errors(&authz("{name: p}", "  action: DENY\n  provider: {name: ext}\n  rules: [{}]"));
        assert_eq!(e, ["spec.provider: `provider` is only allowed with action CUSTOM"]);
        let e = errors(&authz("{name: p}", "  action: DENY"));
        assert_eq!(
            e,
            ["spec.rules: a DENY policy without `rules` never matches; add an empty rule `{}` to deny every request"]
        );
        let e = errors(&authz(
            "{name: p}",
            "  selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n  rules: [{}]",
        ));
        assert_eq!(
            e,
            [
                "spec.targetRefs: `spec.targetRefs` is not supported by remora",
                "spec.selector: only one of `selector`, `targetRef` and `targetRefs` may be set",
            ]
        );

        let spec = r#"  rules:
  - from: []
    to: []
  - from:
    - {}
    - source: {}
    - source: {requestPrincipals: ["iss/sub"], principals: [""]}
    - source: {serviceAccounts: ["ns/sa"], namespaces: [x]}
    - source: {serviceAccounts: ["a/b/c", "ns/*"]}
    - source: {ipBlocks: ["10.0.0.0/33", "300.1.1.1"], notRemoteIpBlocks: ["x"]}
  - to:
    - {}
    - operation: {}
    - operation:
        ports: ["0", "65536", "http"]
        notPorts: ["80"]
        paths: ["/a/{**}/b", "/a/x{*}", "/{*}/*", "{*}/a"]
        methods: [""]
  - when:
    - key: ""
    - key: request.auth.claims[iss]
      values: [x]
    - key: connection.sni
      values: [x]
    - key: experimental.envoy.filters.a[b]
      values: [x]
    - key: destination.labels[app]
      values: [x]
    - key: bogus
      values: [x]
    - key: request.headers
      values: [x]
    - key: request.headers[:path]
      values: [x]
    - key: source.ip
    - key: source.ip
      values: [nope]
    - key: destination.port
      notValues: ["99999"]"#;
        let e = errors(&authz("{name: p}", spec));
        let r = "spec.rules";
        let expect = [
            format!("{r}[0].from: `from` must not be empty"),
            format!("{r}[0].to: `to` must not be empty"),
            format!("{r}[1].from[0]: `source` is required"),
            format!("{r}[1].from[1].source: `source` must set at least one field"),
            format!("{r}[1].from[2].source.principals[0]: empty values are not allowed"),
            format!("{r}[1].from[2].source.requestPrincipals: `requestPrincipals` needs RequestAuthentication"),
            format!("{r}[1].from[3].source: `serviceAccounts` cannot be combined with `principals` or `namespaces`"),
            format!("{r}[1].from[4].source.serviceAccounts[0]: `a/b/c` is not a service account"),
            format!("{r}[1].from[4].source.serviceAccounts[1]: `ns/*` is not a service account"),
            format!(
                "{r}[1].from[5].source.ipBlocks[0]: `10.0.0.0/33`: the prefix length must be a number from 0 to 32"
            ),
            format!("{r}[1].from[5].source.ipBlocks[1]: `300.1.1.1` is not an IP address or CIDR block"),
            format!("{r}[1].from[5].source.notRemoteIpBlocks[0]: `x` is not an IP address"),
            format!("{r}[2].to[0]: `operation` is required"),
            format!("{r}[2].to[1].operation: `operation` must set at least one field"),
            format!("{r}[2].to[2].operation.methods[0]: empty values are not allowed"),
            format!("{r}[2].to[2].operation.ports[0]: `0` is not a port number (1 to 65535)"),
            format!("{r}[2].to[2].operation.ports[1]: `65536` is not a port number"),
            format!("{r}[2].to[2].operation.ports[2]: `http` is not a port number"),
            format!("{r}[2].to[2].operation.paths[0]: path template `/a/{{**}}/b`: `{{**}}` must be the last segment"),
            format!("{r}[2].to[2].operation.paths[1]: path template `/a/x{{*}}`: `{{*}}` and `{{**}}` must be whole"),
            format!("{r}[2].to[2].operation.paths[2]: path template `/{{*}}/*`: `{{*}}` and `{{**}}` must be whole"),
            format!("{r}[2].to[2].operation.paths[3]: path template `{{*}}/a` must start with `/`"),
            format!("{r}[3].when[0].key: `key` is required"),
            format!("{r}[3].when[1].key: `request.auth.claims[iss]` needs RequestAuthentication (JWT)"),
            format!("{r}[3].when[2].key: `connection.sni` is not supported by remora"),
            format!("{r}[3].when[3].key: `experimental.envoy.filters.a[b]` is not supported by remora"),
            format!("{r}[3].when[4].key: `destination.labels[app]` is replaced by the policy's `selector`"),
            format!("{r}[3].when[5].key: unknown attribute `bogus`"),
            format!("{r}[3].when[6].key: `request.headers`: write the header name in brackets"),
            format!("{r}[3].when[7].key: `request.headers[:path]` is not supported by remora"),
            format!("{r}[3].when[8]: at least one of `values` and `notValues` is required"),
            format!("{r}[3].when[9].values[0]: `nope` is not an IP address or CIDR block"),
            format!("{r}[3].when[10].notValues[0]: `99999` is not a port number"),
        ];
        for want in &expect {
            assert_error(&e, want);
        }
        assert_eq!(e.len(), expect.len(), "{e:#?}");
    }

    #[test]
    fn authorization_policy_warnings() {
        let meta = "{name: p, annotations: {istio.io/dry-run: \"true\"}}";
        let w = warnings(&authz(meta, "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST]}"));
        assert_eq!(
            w,
            [
                "spec.rules[0]: this DENY rule matches HTTP attributes (hosts, methods, paths or request headers) without naming `ports`; TCP connections have no HTTP attributes, so on TCP ports it denies every connection its other fields match",
            ]
        );
        // Scoped to ports, or not a DENY policy, or dry-run off: nothing to say.
        let quiet = [
            authz(
                "{name: p}",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST], ports: [\"8080\"]}",
            ),
            authz("{name: p}", "  rules:\n  - to:\n    - operation: {methods: [POST]}"),
            authz("{name: p, annotations: {istio.io/dry-run: \"false\"}}", "  rules: [{}]"),
        ];
        for text in &quiet {
            assert!(check(text).is_empty(), "{text}");
        }
        let e = errors(&authz("{name: p, annotations: {istio.io/dry-run: \"yes\"}}", "  rules: [{}]"));
        assert_eq!(e, ["metadata.annotations[\"istio.io/dry-run\"]: `yes` is not a boolean"]);
        let e =
            errors(&authz("{name: p, annotations: {istio.io/dry-run: \"true\"}}", "  action: AUDIT\n  rules: [{}]"));
        assert_eq!(
            e,
            [
                "metadata.annotations[\"istio.io/dry-run\"]: `istio.io/dry-run` is only defined for ALLOW and DENY policies"
            ]
        );
    }
}
