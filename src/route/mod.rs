//! Compiled route tables: host lookup, ordered first-match routes, weighted
//! destinations, header operations, rewrites, redirects, direct responses and
//! fault injection. Everything here is built once per snapshot; matching
//! allocates nothing on the common path.

pub mod matcher;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

pub use matcher::{PathMatch, RequestView, RouteMatch, StringMatcher};

use crate::upstream::Cluster;

/// Routes for one listener (one port): virtual hosts by domain.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<VirtualHost>>,
    /// `*.example.com` entries as `.example.com`, longest first.
    suffix: Vec<(String, Arc<VirtualHost>)>,
    any: Option<Arc<VirtualHost>>,
    pub fallback: Fallback,
}

/// What happens to a request whose Host matches no virtual host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fallback {
    /// 404 `NR` (gateways, ingress).
    #[default]
    NotFound,
    /// `ALLOW_ANY`: forward to the Host as given.
    Passthrough,
    /// `REGISTRY_ONLY`: 502.
    BlackHole,
    /// Captured inbound traffic to a port with no Sidecar ingress: the app on
    /// that port on loopback (Istio's `InboundPassthroughCluster`).
    InboundPassthrough,
}

impl RouteTable {
    pub fn new(fallback: Fallback) -> Self {
        RouteTable { fallback, ..Default::default() }
    }

    /// Adds a domain (`host`, `*.suffix` or `*`). The first virtual host added
    /// for a domain keeps it; returns false for a duplicate.
    pub fn add_domain(&mut self, domain: &str, vh: &Arc<VirtualHost>) -> bool {
        let domain = domain.to_ascii_lowercase();
        if domain == "*" {
            if self.any.is_some() {
                return false;
            }
            self.any = Some(vh.clone());
            return true;
        }
        if let Some(suffix) = domain.strip_prefix('*') {
            if self.suffix.iter().any(|(s, _)| s == suffix) {
                return false;
            }
            self.suffix.push((suffix.to_string(), vh.clone()));
            self.suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
            return true;
        }
        if self.exact.contains_key(&domain) {
            return false;
        }
        self.exact.insert(domain, vh.clone());
        true
    }

    /// Finds the virtual host for a request's Host/authority (port ignored,
    /// case-insensitive): exact name, then the longest wildcard suffix, then `*`.
    pub fn find(&self, authority: &str) -> Option<&Arc<VirtualHost>> {
        let host = strip_port(authority);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if let Some(vh) = self.exact.get(host) {
            return Some(vh);
        }
        for (suffix, vh) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(vh);
            }
        }
        self.any.as_ref()
    }

    pub fn virtual_hosts(&self) -> Vec<(String, Arc<VirtualHost>)> {
        let mut out: Vec<(String, Arc<VirtualHost>)> = self.exact.iter().map(|(d, v)| (d.clone(), v.clone())).collect();
        out.extend(self.suffix.iter().map(|(s, v)| (format!("*{s}"), v.clone())));
        if let Some(v) = &self.any {
            out.push(("*".into(), v.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// `host:port` → `host`, `[::1]:80` → `::1`.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rfind(':') {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
        _ => authority,
    }
}

#[derive(Debug)]
pub struct VirtualHost {
    /// The VirtualService (`ns/name`) or service host this came from.
    pub name: String,
    pub routes: Vec<Route>,
}

impl VirtualHost {
    /// First route whose match block matches; `None` is Istio's 404 `NR`.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

#[derive(Debug)]
pub struct Route {
    /// `route-name.match-name` as Istio names it, or the VirtualService's name.
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub fault: Option<Fault>,
    /// `None`: retries disabled (`attempts: 0`).
    pub retry: Option<retry::RetryPolicy>,
    pub mirrors: Vec<Mirror>,
}

/// A shadow copy of matching requests to another cluster.
#[derive(Debug)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// 0..=100.
    pub percent: f64,
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug)]
pub struct Forward {
    pub destinations: Vec<WeightedCluster>,
    total_weight: u64,
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    cumulative: u64,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

impl Forward {
    /// `dests` must be non-empty with weights already normalised by Istio's
    /// rules (see the compiler): zero-weight entries removed unless alone.
    pub fn new(mut destinations: Vec<WeightedCluster>) -> Self {
        let mut total = 0u64;
        for d in &mut destinations {
            total += u64::from(d.weight);
            d.cumulative = total;
        }
        Forward { destinations, total_weight: total }
    }

    /// Picks a destination by weight (uniformly random per request).
    pub fn pick(&self) -> &WeightedCluster {
        if self.destinations.len() == 1 || self.total_weight == 0 {
            return &self.destinations[0];
        }
        let r = fastrand::u64(0..self.total_weight);
        let i = self.destinations.partition_point(|d| d.cumulative <= r);
        &self.destinations[i.min(self.destinations.len() - 1)]
    }
}

impl WeightedCluster {
    pub fn new(cluster: Arc<Cluster>, weight: u32, request_headers: HeaderOps, response_headers: HeaderOps) -> Self {
        WeightedCluster { cluster, weight, cumulative: 0, request_headers, response_headers }
    }
}

/// `set`, `add` and `remove` of one header block, applied in that order after
/// removals as Envoy does.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// `set`/`add` of `:authority`/`host` becomes a Host rewrite.
    pub authority: Option<HeaderValue>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty() && self.authority.is_none()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[derive(Debug)]
pub struct Rewrite {
    pub uri: Option<UriRewrite>,
    pub authority: Option<HeaderValue>,
}

#[derive(Debug)]
pub enum UriRewrite {
    /// Replace the matched prefix (or the whole path for exact/regex matches).
    Prefix(String),
    /// RE2-style substitution over the path, every match replaced.
    Regex { pattern: Regex, replacement: String },
}

impl UriRewrite {
    /// Rewrites `path` (without query) given the route's path match.
    pub fn apply(&self, path: &str, matched: &PathMatch) -> String {
        match self {
            UriRewrite::Prefix(new) => {
                let cut = matched.prefix_len(path);
                let mut out = String::with_capacity(new.len() + path.len() - cut);
                out.push_str(new);
                out.push_str(&path[cut..]);
                out
            }
            UriRewrite::Regex { pattern, replacement } => pattern.replace_all(path, replacement.as_str()).into_owned(),
        }
    }
}

#[derive(Debug)]
pub struct Redirect {
    pub uri: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: RedirectPort,
    pub code: StatusCode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectPort {
    /// Keep whatever port the request's authority carried.
    Keep,
    Fixed(u16),
    /// 80 for http, 443 for https (so none appears in Location).
    ProtocolDefault,
    /// The port the request arrived on.
    RequestPort,
}

impl Redirect {
    /// The `Location` for a request.
    pub fn location(&self, req: &RequestView<'_>, matched: &PathMatch) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let req_host = strip_port(req.authority);
        let req_port = authority_port(req.authority);
        let host = match &self.authority {
            Some(a) => strip_port(a),
            None => req_host,
        };
        let port = match self.port {
            RedirectPort::Fixed(p) => Some(p),
            RedirectPort::ProtocolDefault => None,
            RedirectPort::RequestPort => Some(req.port),
            RedirectPort::Keep => match &self.authority {
                Some(a) => authority_port(a),
                // Switching scheme drops a port that belonged to the old one.
                None if self.scheme.is_some() && self.scheme.as_deref() != Some(req.scheme) => None,
                None => req_port,
            },
        };
        let path = match (&self.uri, &self.prefix_rewrite) {
            (Some(uri), _) => uri.clone(),
            (None, Some(prefix)) => {
                let cut = matched.prefix_len(req.path);
                format!("{prefix}{}", &req.path[cut..])
            }
            (None, None) => req.path.to_string(),
        };
        let mut loc = format!("{scheme}://");
        if host.contains(':') {
            loc.push('[');
            loc.push_str(host);
            loc.push(']');
        } else {
            loc.push_str(host);
        }
        match (scheme, port) {
            ("http", Some(80)) | ("https", Some(443)) | (_, None) => {}
            (_, Some(p)) => {
                loc.push(':');
                loc.push_str(&p.to_string());
            }
        }
        loc.push_str(&path);
        if let Some(q) = req.query
            && !path.contains('?')
        {
            loc.push('?');
            loc.push_str(q);
        }
        loc
    }
}

fn authority_port(authority: &str) -> Option<u16> {
    let host = strip_port(authority);
    if host.len() == authority.len() {
        return None;
    }
    authority.rsplit(':').next().and_then(|p| p.parse().ok())
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

#[derive(Debug)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug)]
pub struct FaultDelay {
    pub delay: Duration,
    /// 0..=100.
    pub percent: f64,
}

#[derive(Debug)]
pub struct FaultAbort {
    pub kind: AbortKind,
    /// 0..=100.
    pub percent: f64,
}

#[derive(Debug, Clone, Copy)]
pub enum AbortKind {
    Http(StatusCode),
    Grpc(u32),
}

/// True with probability `percent`/100 (Envoy's fractional percent, in
/// millionths).
pub fn roll(percent: f64) -> bool {
    if percent <= 0.0 {
        return false;
    }
    if percent >= 100.0 {
        return true;
    }
    let threshold = (percent * 10_000.0).round() as u32;
    fastrand::u32(0..1_000_000) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_port_forms() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }

    #[test]
    fn percent_roll_bounds() {
        assert!(!roll(0.0));
        assert!(roll(100.0));
        let hits = (0..20_000).filter(|_| roll(25.0)).count();
        assert!((4_400..5_600).contains(&hits), "{hits}");
    }
}
