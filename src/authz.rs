//! Istio AuthorizationPolicy for one workload. [`Policies::compile`] turns the
//! policies that select this proxy into matchers once per config;
//! [`Policies::evaluate`] decides one HTTP request, or one TCP connection.
//!
//! The semantics are Istio's (Envoy RBAC as Istio configures it):
//!
//! - A matching `DENY` policy denies. Otherwise, without any `ALLOW` policy the
//!   request is allowed; with some, it is allowed only if one of them matches.
//!   A matching `AUDIT` policy is logged and never changes the decision.
//!   `CUSTOM` (external authorization) is rejected by validation.
//! - A policy matches when one of its rules matches; a policy without rules
//!   never matches (`spec: {}` as an ALLOW policy denies everything, while
//!   `rules: [{}]` allows everything). A rule matches when one `from` source
//!   (or no `from`), one `to` operation (or no `to`) and every `when`
//!   condition match. Inside a source or operation the fields are ANDed, the
//!   entries of a list ORed, and a `notX` list must not match.
//! - Every string matches exactly (`abc`), by prefix (`abc*`), by suffix
//!   (`*abc`) or by presence (`*`: any non-empty value; for request headers,
//!   the header is present). Hosts match case-insensitively, against the
//!   authority without its port.
//! - Peer principals are SPIFFE IDs without `spiffe://`
//!   (`cluster.local/ns/default/sa/sleep`); `namespaces` match the `ns`
//!   segment. A plaintext peer has no principal: `principals`, `namespaces`
//!   and `serviceAccounts` never match it, so their `notX` forms always do.
//! - `remoteIpBlocks` and `remote.ip` are matched against the peer address,
//!   like `ipBlocks`: remora does not take the client address from
//!   X-Forwarded-For or the PROXY protocol.
//! - TCP connections have no HTTP attributes (hosts, methods, paths, request
//!   headers). As in Istio, an ALLOW rule that uses one is dropped for TCP (it
//!   can never allow), and a DENY or AUDIT rule ignores it (the rest of the
//!   rule decides, which denies more). Values that cannot be compiled at all,
//!   which validation rejects, are handled the same way, so a config that
//!   bypassed validation still fails closed.
//!
//! # Path normalization
//!
//! `paths` and `notPaths` are matched against a normalized request path, as
//! Istio's default normalization (`BASE` plus merged slashes) produces it:
//! the query is dropped; percent-encoded unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`) are decoded, once; other percent-encodings are
//! kept, with upper-case hex digits; `.` and `..` segments are resolved as
//! RFC 3986 §5.2.4 says; runs of `/` are merged into one.
//!
//! A path that has no single safe reading is *unsafe*: an encoded slash,
//! backslash or NUL (`%2F`, `%5C`, `%00`), a raw backslash, a broken
//! percent-encoding, a control character or `#`, a path that does not start
//! with `/`, and a path whose meaning depends on whether slashes are merged
//! before or after dot segments are resolved (`/a//../b`). Backends disagree
//! on what such paths name (Istio turns a raw backslash into `/`, many
//! servers do not), so remora trusts no reading: for an unsafe path every
//! `paths`/`notPaths` field of an ALLOW policy fails (such a rule never allows
//! it) and every `paths`/`notPaths` field of a DENY or AUDIT policy matches
//! (such a rule denies it if its other fields match).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::HeaderMap;
use http::header::HeaderName;

use crate::config::model::{self, AuthorizationPolicy, Spec};
use crate::config::{Diagnostic, Resource};

/// Istio's default root namespace: policies there apply to every workload of
/// the mesh (subject to their selector).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Istio's annotation for a policy that is evaluated and logged but not enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Istio's limit on the entries of one `serviceAccounts` list.
pub const MAX_SERVICE_ACCOUNTS: usize = 16;

/// Istio's limit on the length of one `serviceAccounts` entry.
pub const MAX_SERVICE_ACCOUNT_LEN: usize = 320;

// === Public request / decision types ===

/// Everything authorization may look at for one request (or one TCP
/// connection when `http` is `None`).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's SPIFFE ID without `spiffe://`, e.g.
    /// `cluster.local/ns/default/sa/sleep`; `None` for plaintext peers.
    pub principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
    pub http: Option<HttpAttrs<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// The authority without its port.
    pub host: &'a str,
    /// The path without the query; normalized here before matching.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of [`Policies::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the matching DENY policy as `namespace/name`, or empty when
    /// the request was denied because no ALLOW policy matched.
    Deny {
        policy: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// A policy's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    /// Parses `spec.action`; absent means ALLOW.
    pub fn parse(action: Option<&str>) -> Result<Action, String> {
        match action {
            None | Some("ALLOW") => Ok(Action::Allow),
            Some("DENY") => Ok(Action::Deny),
            Some("AUDIT") => Ok(Action::Audit),
            Some("CUSTOM") => Ok(Action::Custom),
            Some(other) => Err(format!("unknown action `{other}` (expected ALLOW, DENY, AUDIT or CUSTOM)")),
        }
    }
}

// === Compiled policies ===

/// The AuthorizationPolicies that apply to one workload, compiled. Immutable
/// and cheap to evaluate: every matcher is built by [`Policies::compile`].
#[derive(Debug, Clone, Default)]
pub struct Policies {
    allow: Vec<CompiledPolicy>,
    deny: Vec<CompiledPolicy>,
    audit: Vec<CompiledPolicy>,
    /// `istio.io/dry-run` ALLOW and DENY policies: evaluated on their own,
    /// logged, never enforced (Istio's shadow rules).
    shadow_allow: Vec<CompiledPolicy>,
    shadow_deny: Vec<CompiledPolicy>,
}

/// Go's `strconv.ParseBool`, which Istio uses for `istio.io/dry-run`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl Policies {
    /// No policies: everything is allowed.
    pub fn empty() -> Self {
        Policies::default()
    }

    /// Whether no policy applies (every request is allowed and none is audited).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of policies that apply.
    pub fn len(&self) -> usize {
        self.allow.len() + self.deny.len() + self.audit.len() + self.shadow_allow.len() + self.shadow_deny.len()
    }

    /// Compiles the AuthorizationPolicies that apply to this workload: those in
    /// `namespace` (the proxy's) and those in [`ROOT_NAMESPACE`] whose
    /// `selector.matchLabels` are all among `workload_labels` (no selector:
    /// every workload). Policies with `targetRef(s)` name gateways or services,
    /// never a sidecar's workload, and are skipped.
    ///
    /// Expects validated resources; validation errors are not repeated here.
    /// Anything invalid is compiled fail-closed: an unknown or CUSTOM action
    /// acts as DENY, and a value that cannot be compiled drops its ALLOW rule
    /// or is ignored by its DENY/AUDIT rule. Warnings about rules that can
    /// never match (and about `remoteIpBlocks`) go to `diags`.
    pub fn compile(
        resources: &[Resource],
        namespace: &str,
        workload_labels: &BTreeMap<String, String>,
        diags: &mut Vec<Diagnostic>,
    ) -> Self {
        let mut out = Policies::default();
        for r in resources {
            let Spec::AuthorizationPolicy(ap) = &r.spec else { continue };
            if !applies(r, ap, namespace, workload_labels) {
                continue;
            }
            lint(r, ap, diags);
            let action = match Action::parse(ap.action.as_deref()) {
                Ok(Action::Allow) => Action::Allow,
                Ok(Action::Audit) => Action::Audit,
                Ok(Action::Deny | Action::Custom) | Err(_) => Action::Deny,
            };
            let policy = CompiledPolicy::new(r, ap, action);
            let dry_run = r.meta.annotations.get(DRY_RUN_ANNOTATION).and_then(|v| parse_bool(v)) == Some(true);
            if dry_run && action != Action::Audit {
                match action {
                    Action::Allow => out.shadow_allow.push(policy),
                    _ => out.shadow_deny.push(policy),
                }
                continue;
            }
            match action {
                Action::Allow => out.allow.push(policy),
                Action::Audit => out.audit.push(policy),
                Action::Deny | Action::Custom => out.deny.push(policy),
            }
        }
        out
    }

    /// Decides one request: any matching DENY policy denies; otherwise the
    /// request is allowed if there is no ALLOW policy or one of them matches.
    /// Matching AUDIT policies are logged.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        if self.is_empty() {
            return Decision::Allow;
        }
        let cx = Ctx::new(req);
        for p in &self.audit {
            if p.matches(&cx, Action::Audit) {
                tracing::info!(
                    policy = %p.id,
                    source = %req.source_ip,
                    principal = req.principal.unwrap_or(""),
                    method = req.http.map_or("", |h| h.method),
                    path = req.http.map_or("", |h| h.path),
                    "request matched an AUDIT authorization policy"
                );
            }
        }
        let (shadow_deny, shadow_allow) = self.shadow_with(&cx);
        for (kind, decision) in [("DENY", shadow_deny), ("ALLOW", shadow_allow)] {
            if let Some(Decision::Deny { policy }) = decision {
                tracing::info!(
                    policy = %policy,
                    source = %req.source_ip,
                    principal = req.principal.unwrap_or(""),
                    method = req.http.map_or("", |h| h.method),
                    path = req.http.map_or("", |h| h.path),
                    "dry-run {kind} authorization policies would deny this request (not enforced)"
                );
            }
        }
        if let Some(p) = self.deny.iter().find(|p| p.matches(&cx, Action::Deny)) {
            return Decision::Deny { policy: p.id.clone() };
        }
        if self.allow.is_empty() || self.allow.iter().any(|p| p.matches(&cx, Action::Allow)) {
            Decision::Allow
        } else {
            Decision::Deny { policy: String::new() }
        }
    }
}

impl Policies {
    /// What the dry-run policies would decide, DENY ones and ALLOW ones
    /// separately as Istio's two shadow engines do; `None` where there are
    /// no dry-run policies of that action.
    pub fn shadow(&self, req: &Request<'_>) -> (Option<Decision>, Option<Decision>) {
        self.shadow_with(&Ctx::new(req))
    }

    fn shadow_with(&self, cx: &Ctx<'_, '_>) -> (Option<Decision>, Option<Decision>) {
        let deny = (!self.shadow_deny.is_empty()).then(|| {
            match self.shadow_deny.iter().find(|p| p.matches(cx, Action::Deny)) {
                Some(p) => Decision::Deny { policy: p.id.clone() },
                None => Decision::Allow,
            }
        });
        let allow = (!self.shadow_allow.is_empty()).then(|| {
            if self.shadow_allow.iter().any(|p| p.matches(cx, Action::Allow)) {
                Decision::Allow
            } else {
                Decision::Deny { policy: String::new() }
            }
        });
        (deny, allow)
    }
}

/// Whether `ap` (in `r.namespace`) applies to a workload of `namespace` with
/// `labels`.
fn applies(r: &Resource, ap: &AuthorizationPolicy, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    (r.namespace == namespace || r.namespace == ROOT_NAMESPACE)
        && !present(&ap.target_ref)
        && !present(&ap.target_refs)
        && ap.selector.as_ref().is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Whether an untyped Istio field carries anything (null, `[]` and `{}` do not).
fn present(v: &model::Unsupported) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

#[derive(Debug, Clone)]
struct CompiledPolicy {
    /// `namespace/name`.
    id: String,
    /// The rules as they apply to HTTP requests.
    http: Vec<RuleMatch>,
    /// The rules as they apply to TCP connections: HTTP-only attributes
    /// dropped (ALLOW: the whole rule; DENY/AUDIT: the attribute).
    tcp: Vec<RuleMatch>,
}

impl CompiledPolicy {
    fn new(r: &Resource, ap: &AuthorizationPolicy, action: Action) -> Self {
        let build = |tcp: bool| -> Vec<RuleMatch> {
            ap.rules.iter().filter_map(|rule| compile_rule(rule, action, tcp, &r.namespace)).collect()
        };
        CompiledPolicy { id: format!("{}/{}", r.namespace, r.name), http: build(false), tcp: build(true) }
    }

    fn matches(&self, cx: &Ctx<'_, '_>, action: Action) -> bool {
        let rules = if cx.req.http.is_some() { &self.http } else { &self.tcp };
        rules.iter().any(|rule| rule.matches(cx, action))
    }
}

#[derive(Debug, Clone)]
struct RuleMatch {
    /// Empty: any source.
    from: Vec<SourceMatch>,
    /// Empty: any operation.
    to: Vec<OperationMatch>,
    when: Vec<ConditionMatch>,
}

impl RuleMatch {
    fn matches(&self, cx: &Ctx<'_, '_>, action: Action) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(cx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(cx, action)))
            && self.when.iter().all(|c| c.matches(cx))
    }
}

/// One attribute's `values` (ORed) and `notValues` (ORed, then negated).
#[derive(Debug, Clone)]
struct Field<M> {
    values: Vec<M>,
    not_values: Vec<M>,
}

impl<M> Default for Field<M> {
    fn default() -> Self {
        Field { values: Vec::new(), not_values: Vec::new() }
    }
}

impl<M> Field<M> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    fn matches(&self, pred: impl Fn(&M) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&pred)) && !self.not_values.iter().any(&pred)
    }
}

#[derive(Debug, Clone, Default)]
struct SourceMatch {
    principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    service_accounts: Field<ServiceAccount>,
    ip_blocks: Field<IpBlock>,
    remote_ip_blocks: Field<IpBlock>,
}

impl SourceMatch {
    fn matches(&self, cx: &Ctx<'_, '_>) -> bool {
        let principal = cx.req.principal;
        self.principals.matches(|m| principal.is_some_and(|p| m.matches(p.as_bytes())))
            && self.namespaces.matches(|m| cx.namespace.is_some_and(|ns| m.matches(ns.as_bytes())))
            && self.service_accounts.matches(|sa| principal.is_some_and(|p| sa.matches(p)))
            && self.ip_blocks.matches(|b| b.contains(cx.source_ip))
            && self.remote_ip_blocks.matches(|b| b.contains(cx.source_ip))
    }
}

#[derive(Debug, Clone, Default)]
struct OperationMatch {
    hosts: Field<StrMatch>,
    ports: Field<u16>,
    methods: Field<StrMatch>,
    paths: Field<PathMatch>,
}

impl OperationMatch {
    fn matches(&self, cx: &Ctx<'_, '_>, action: Action) -> bool {
        let http = cx.req.http;
        self.ports.matches(|p| *p == cx.req.destination_port)
            && (self.hosts.is_empty()
                || http.is_some_and(|h| self.hosts.matches(|m| m.matches_ignore_case(h.host.as_bytes()))))
            && (self.methods.is_empty()
                || http.is_some_and(|h| self.methods.matches(|m| m.matches(h.method.as_bytes()))))
            && (self.paths.is_empty()
                || match cx.path() {
                    ReqPath::Normalized(p) => self.paths.matches(|m| m.matches(p)),
                    ReqPath::Unsafe => action != Action::Allow,
                    ReqPath::Absent => false,
                })
    }
}

#[derive(Debug, Clone)]
enum ConditionMatch {
    Header(HeaderKey, Field<StrMatch>),
    SourceIp(Field<IpBlock>),
    SourcePrincipal(Field<StrMatch>),
    SourceNamespace(Field<StrMatch>),
    DestinationPort(Field<u16>),
}

impl ConditionMatch {
    fn matches(&self, cx: &Ctx<'_, '_>) -> bool {
        match self {
            ConditionMatch::Header(key, f) => cx.req.http.is_some_and(|h| f.matches(|m| header_matches(key, m, &h))),
            ConditionMatch::SourceIp(f) => f.matches(|b| b.contains(cx.source_ip)),
            ConditionMatch::SourcePrincipal(f) => {
                f.matches(|m| cx.req.principal.is_some_and(|p| m.matches(p.as_bytes())))
            }
            ConditionMatch::SourceNamespace(f) => {
                f.matches(|m| cx.namespace.is_some_and(|ns| m.matches(ns.as_bytes())))
            }
            ConditionMatch::DestinationPort(f) => f.matches(|p| *p == cx.req.destination_port),
        }
    }
}

/// A header value condition: presence (`*`) means the header is there, even
/// empty; otherwise any one of the header's values must match.
fn header_matches(key: &HeaderKey, m: &StrMatch, h: &HttpAttrs<'_>) -> bool {
    match key {
        HeaderKey::Authority => !h.host.is_empty() && (*m == StrMatch::Presence || m.matches(h.host.as_bytes())),
        HeaderKey::Method => m.matches(h.method.as_bytes()),
        HeaderKey::Name(name) => {
            let mut values = h.headers.get_all(name).iter().peekable();
            if *m == StrMatch::Presence { values.peek().is_some() } else { values.any(|v| m.matches(v.as_bytes())) }
        }
    }
}

// === Per-request context ===

struct Ctx<'r, 'a> {
    req: &'r Request<'a>,
    /// The source address with IPv4-mapped IPv6 addresses unmapped.
    source_ip: IpAddr,
    /// The `ns` segment of the peer principal.
    namespace: Option<&'a str>,
    /// Normalized on first use.
    path: OnceCell<ReqPath<'a>>,
}

enum ReqPath<'a> {
    /// A TCP connection.
    Absent,
    Unsafe,
    Normalized(Cow<'a, str>),
}

impl<'r, 'a> Ctx<'r, 'a> {
    fn new(req: &'r Request<'a>) -> Self {
        Ctx {
            req,
            source_ip: req.source_ip.to_canonical(),
            namespace: req.principal.and_then(namespace_of),
            path: OnceCell::new(),
        }
    }

    fn path(&self) -> &ReqPath<'a> {
        self.path.get_or_init(|| match self.req.http {
            None => ReqPath::Absent,
            Some(h) => normalize_path(h.path).map_or(ReqPath::Unsafe, ReqPath::Normalized),
        })
    }
}

/// The `ns` segment of a SPIFFE ID without scheme (`<td>/ns/<ns>/sa/<sa>`).
fn namespace_of(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (ns, _) = rest.split_once('/')?;
    Some(ns)
}

/// The `sa` segment that follows the `ns` segment of a SPIFFE ID.
fn service_account_of(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (_, rest) = rest.split_once('/')?;
    let sa = if let Some(sa) = rest.strip_prefix("sa/") { sa } else { rest.split_once("/sa/")?.1 };
    Some(sa.split_once('/').map_or(sa, |(sa, _)| sa))
}

// === Matchers ===

/// Istio's string match: `abc`, `abc*`, `*abc`, `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StrMatch {
    fn parse(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(suffix) = v.strip_prefix('*') {
            StrMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = v.strip_suffix('*') {
            StrMatch::Prefix(prefix.to_string())
        } else {
            StrMatch::Exact(v.to_string())
        }
    }

    fn matches(&self, s: &[u8]) -> bool {
        match self {
            StrMatch::Exact(e) => s == e.as_bytes(),
            StrMatch::Prefix(p) => s.starts_with(p.as_bytes()),
            StrMatch::Suffix(x) => s.ends_with(x.as_bytes()),
            StrMatch::Presence => !s.is_empty(),
        }
    }

    fn matches_ignore_case(&self, s: &[u8]) -> bool {
        match self {
            StrMatch::Exact(e) => s.eq_ignore_ascii_case(e.as_bytes()),
            StrMatch::Prefix(p) => s.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes())),
            StrMatch::Suffix(x) => s
                .len()
                .checked_sub(x.len())
                .and_then(|i| s.get(i..))
                .is_some_and(|t| t.eq_ignore_ascii_case(x.as_bytes())),
            StrMatch::Presence => !s.is_empty(),
        }
    }
}

/// A single IP address or a CIDR block, v4 or v6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    /// Masked to `prefix` bits.
    net: IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// Parses `10.1.2.3`, `10.0.0.0/8`, `2001:db8::/32`. Host bits in a CIDR
    /// are ignored, as Envoy does; IPv4-mapped IPv6 blocks become IPv4 blocks.
    pub fn parse(s: &str) -> Result<IpBlock, String> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max && len.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("`{s}`: the prefix length must be a number from 0 to {max}"))?,
        };
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        Ok(IpBlock { net: mask(addr, prefix), prefix })
    }

    pub fn is_ipv4(&self) -> bool {
        self.net.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

impl std::fmt::Display for IpBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// A port given as a string, `1`..=`65535`.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(format!("`{s}` is not a port number (1 to 65535)")),
    }
}

/// A `serviceAccounts` entry: `namespace/name`, or `name` in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    pub fn parse(s: &str, policy_namespace: &str) -> Result<ServiceAccount, String> {
        let (ns, name) = s.split_once('/').unwrap_or((policy_namespace, s));
        if s.len() > MAX_SERVICE_ACCOUNT_LEN {
            return Err(format!("service account is longer than {MAX_SERVICE_ACCOUNT_LEN} characters"));
        }
        if ns.is_empty() || name.is_empty() || name.contains('/') || s.contains('*') {
            return Err(format!(
                "`{s}` is not a service account: write `namespace/name` (or `name` in the policy's namespace), without wildcards"
            ));
        }
        Ok(ServiceAccount { namespace: ns.to_string(), name: name.to_string() })
    }

    fn matches(&self, principal: &str) -> bool {
        namespace_of(principal) == Some(self.namespace.as_str())
            && service_account_of(principal) == Some(self.name.as_str())
    }
}

/// A `paths` entry: a string match, or a template with `{*}` / `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Str(StrMatch),
    Template(Vec<TemplateSegment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateSegment {
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: the rest of the path (zero or more segments), last only.
    Rest,
}

/// Whether a `paths` entry is a template (uses `{*}` or `{**}`).
pub fn is_path_template(path: &str) -> bool {
    path.contains("{*}") || path.contains("{**}")
}

impl PathMatch {
    fn parse(v: &str) -> Result<PathMatch, String> {
        if !is_path_template(v) {
            return Ok(PathMatch::Str(StrMatch::parse(v)));
        }
        let rest = v.strip_prefix('/').ok_or_else(|| format!("path template `{v}` must start with `/`"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "{*}" => TemplateSegment::One,
                "{**}" if i + 1 == parts.len() => TemplateSegment::Rest,
                "{**}" => return Err(format!("path template `{v}`: `{{**}}` must be the last segment")),
                lit if lit.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path template `{v}`: `{{*}}` and `{{**}}` must be whole path segments, and a template cannot contain other `*`, `{{` or `}}`"
                    ));
                }
                lit => TemplateSegment::Literal(lit.to_string()),
            });
        }
        Ok(PathMatch::Template(segments))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path.as_bytes()),
            PathMatch::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let mut parts = rest.split('/');
                for seg in segments {
                    match seg {
                        TemplateSegment::Literal(l) => {
                            if parts.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                        TemplateSegment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        TemplateSegment::Rest => return parts.next().is_some(),
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// Checks a `paths` entry as validation does: templates must be well formed.
pub fn path_problem(path: &str) -> Option<String> {
    PathMatch::parse(path).err()
}

/// A `when` key remora evaluates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]`.
    Header(HeaderKey),
    SourceIp,
    /// `remote.ip`, evaluated against the peer address.
    RemoteIp,
    SourcePrincipal,
    SourceNamespace,
    DestinationPort,
}

/// The header a `request.headers[...]` condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderKey {
    /// `:authority` or `host`: the request's host, without port.
    Authority,
    /// `:method`.
    Method,
    Name(HeaderName),
}

impl ConditionKey {
    /// Parses a `when` key; the error says why remora cannot evaluate it.
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        if let Some(rest) = key.strip_prefix("request.headers") {
            let name = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')).filter(|n| !n.is_empty()).ok_or_else(
                || format!("`{key}`: write the header name in brackets, as in `request.headers[x-user]`"),
            )?;
            let lower = name.to_ascii_lowercase();
            return match lower.as_str() {
                ":authority" | "host" => Ok(ConditionKey::Header(HeaderKey::Authority)),
                ":method" => Ok(ConditionKey::Header(HeaderKey::Method)),
                ":path" => Err(format!("`{key}` is not supported by remora; match the path with `to.operation.paths`")),
                n if n.starts_with(':') => Err(format!("`{key}` is not supported by remora")),
                n => HeaderName::from_bytes(n.as_bytes())
                    .map(|h| ConditionKey::Header(HeaderKey::Name(h)))
                    .map_err(|_| format!("`{name}` is not a valid HTTP header name")),
            };
        }
        match key {
            "source.ip" => Ok(ConditionKey::SourceIp),
            "remote.ip" => Ok(ConditionKey::RemoteIp),
            "source.principal" => Ok(ConditionKey::SourcePrincipal),
            "source.namespace" => Ok(ConditionKey::SourceNamespace),
            "destination.port" => Ok(ConditionKey::DestinationPort),
            k if k.starts_with("request.auth.") => {
                Err(format!("`{k}` needs RequestAuthentication (JWT), which is not supported by remora"))
            }
            "connection.sni" | "destination.ip" | "source.serviceAccount" => {
                Err(format!("`{key}` is not supported by remora"))
            }
            k if k.starts_with("experimental.") => Err(format!("`{k}` is not supported by remora")),
            "destination.namespace" => Err("`destination.namespace` is replaced by the policy's namespace".into()),
            k if k.starts_with("destination.labels") => Err(format!("`{k}` is replaced by the policy's `selector`")),
            "destination.name" | "destination.user" => {
                Err(format!("`{key}` is a deprecated attribute that only Istio's v1alpha1 API supported"))
            }
            _ => Err(format!("unknown attribute `{key}`")),
        }
    }

    /// Whether the attribute exists only for HTTP requests.
    pub fn is_http_only(&self) -> bool {
        matches!(self, ConditionKey::Header(_))
    }
}

// === Compilation ===

/// Compiles one rule for HTTP (`tcp == false`) or TCP. `None` when an ALLOW
/// rule holds something it cannot evaluate there: the rule can never match.
fn compile_rule(rule: &model::Rule, action: Action, tcp: bool, namespace: &str) -> Option<RuleMatch> {
    let mut b = RuleBuilder { action, tcp, namespace, dropped: false };
    let from = rule.from.iter().flatten().map(|f| b.source(f.source.as_ref())).collect();
    let to = rule.to.iter().flatten().map(|t| b.operation(t.operation.as_ref())).collect();
    let when = rule.when.iter().filter_map(|c| b.condition(c)).collect();
    (!b.dropped).then_some(RuleMatch { from, to, when })
}

struct RuleBuilder<'p> {
    action: Action,
    tcp: bool,
    /// The policy's namespace, for `serviceAccounts` entries without one.
    namespace: &'p str,
    /// An ALLOW rule met a value it cannot evaluate.
    dropped: bool,
}

impl RuleBuilder<'_> {
    /// Something this rule cannot evaluate: ALLOW rules are dropped (they
    /// allow less), DENY/AUDIT rules ignore it (they deny more).
    fn cannot_evaluate(&mut self) {
        if self.action == Action::Allow {
            self.dropped = true;
        }
    }

    fn field<M>(
        &mut self,
        values: &[String],
        not_values: &[String],
        http_only: bool,
        compile: impl Fn(&str) -> Option<M>,
    ) -> Field<M> {
        let evaluable = !(http_only && self.tcp);
        let mut one = |list: &[String]| -> Vec<M> {
            let mut out = Vec::with_capacity(list.len());
            for v in list {
                match evaluable.then(|| compile(v)).flatten() {
                    Some(m) => out.push(m),
                    None => self.cannot_evaluate(),
                }
            }
            out
        };
        let values = one(values);
        let not_values = one(not_values);
        Field { values, not_values }
    }

    fn source(&mut self, s: Option<&model::Source>) -> SourceMatch {
        let Some(s) = s.filter(|s| !source_is_empty(s)) else {
            self.cannot_evaluate();
            return SourceMatch::default();
        };
        let namespace = self.namespace;
        // Request principals need JWT authentication, which remora lacks.
        self.field(&s.request_principals, &s.not_request_principals, false, |_| None::<()>);
        SourceMatch {
            principals: self.field(&s.principals, &s.not_principals, false, |v| Some(StrMatch::parse(v))),
            namespaces: self.field(&s.namespaces, &s.not_namespaces, false, |v| Some(StrMatch::parse(v))),
            service_accounts: self.field(&s.service_accounts, &s.not_service_accounts, false, |v| {
                ServiceAccount::parse(v, namespace).ok()
            }),
            ip_blocks: self.field(&s.ip_blocks, &s.not_ip_blocks, false, |v| IpBlock::parse(v).ok()),
            remote_ip_blocks: self
                .field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, false, |v| IpBlock::parse(v).ok()),
        }
    }

    fn operation(&mut self, o: Option<&model::Operation>) -> OperationMatch {
        let Some(o) = o.filter(|o| !operation_is_empty(o)) else {
            self.cannot_evaluate();
            return OperationMatch::default();
        };
        OperationMatch {
            hosts: self.field(&o.hosts, &o.not_hosts, true, |v| Some(StrMatch::parse(v))),
            ports: self.field(&o.ports, &o.not_ports, false, |v| parse_port(v).ok()),
            methods: self.field(&o.methods, &o.not_methods, true, |v| Some(StrMatch::parse(v))),
            paths: self.field(&o.paths, &o.not_paths, true, |v| PathMatch::parse(v).ok()),
        }
    }

    fn condition(&mut self, c: &model::Condition) -> Option<ConditionMatch> {
        let Ok(key) = ConditionKey::parse(&c.key) else {
            self.cannot_evaluate();
            return None;
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            self.cannot_evaluate();
            return None;
        }
        let http_only = key.is_http_only();
        let strings = |v: &str| Some(StrMatch::parse(v));
        let compiled = match key {
            ConditionKey::Header(h) => {
                ConditionMatch::Header(h, self.field(&c.values, &c.not_values, http_only, strings))
            }
            ConditionKey::SourceIp | ConditionKey::RemoteIp => {
                ConditionMatch::SourceIp(self.field(&c.values, &c.not_values, false, |v| IpBlock::parse(v).ok()))
            }
            ConditionKey::SourcePrincipal => {
                ConditionMatch::SourcePrincipal(self.field(&c.values, &c.not_values, false, strings))
            }
            ConditionKey::SourceNamespace => {
                ConditionMatch::SourceNamespace(self.field(&c.values, &c.not_values, false, strings))
            }
            ConditionKey::DestinationPort => {
                ConditionMatch::DestinationPort(self.field(&c.values, &c.not_values, false, |v| parse_port(v).ok()))
            }
        };
        Some(compiled)
    }
}

fn source_is_empty(s: &model::Source) -> bool {
    [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ]
    .iter()
    .all(|l| l.is_empty())
}

fn operation_is_empty(o: &model::Operation) -> bool {
    [&o.hosts, &o.not_hosts, &o.ports, &o.not_ports, &o.methods, &o.not_methods, &o.paths, &o.not_paths]
        .iter()
        .all(|l| l.is_empty())
}

/// Whether a DENY rule uses HTTP attributes without every operation naming
/// ports: on TCP connections those attributes are ignored, so the rule denies
/// every TCP connection that its other fields match.
pub fn widens_on_tcp(rule: &model::Rule) -> bool {
    let ops: Vec<&model::Operation> = rule.to.iter().flatten().filter_map(|t| t.operation.as_ref()).collect();
    let http_in_ops = ops.iter().any(|o| {
        [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths].iter().any(|l| !l.is_empty())
    });
    let http_in_when = rule.when.iter().any(|c| ConditionKey::parse(&c.key).is_ok_and(|k| k.is_http_only()));
    let unscoped = ops.is_empty() || ops.iter().any(|o| o.ports.is_empty() && o.not_ports.is_empty());
    (http_in_ops || http_in_when) && unscoped
}

// === Compile-time warnings ===

/// Warns about entries that can never match a request, and about
/// `remoteIpBlocks` being evaluated against the peer address.
fn lint(r: &Resource, ap: &AuthorizationPolicy, diags: &mut Vec<Diagnostic>) {
    let mut remote_ip_warned = false;
    let mut remote_ip = |path: String, diags: &mut Vec<Diagnostic>| {
        if !remote_ip_warned {
            remote_ip_warned = true;
            diags.push(r.warning(
                path,
                "remote IPs are matched against the peer address of the connection: remora does not take the \
                 client address from X-Forwarded-For or the PROXY protocol",
            ));
        }
    };
    let never = |path: String, negated: bool, why: String, diags: &mut Vec<Diagnostic>| {
        let effect = if negated { "never excludes anything" } else { "can never match" };
        diags.push(r.warning(path, format!("{why}, so this entry {effect}")));
    };
    for (i, rule) in ap.rules.iter().enumerate() {
        let rule_path = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let Some(s) = &from.source else { continue };
            let path = format!("{rule_path}.from[{j}].source");
            for (field, list, negated) in
                [("principals", &s.principals, false), ("notPrincipals", &s.not_principals, true)]
            {
                for (k, v) in list.iter().enumerate() {
                    if let Some(why) = principal_problem(v) {
                        never(format!("{path}.{field}[{k}]"), negated, why, diags);
                    }
                }
            }
            if !s.remote_ip_blocks.is_empty() {
                remote_ip(format!("{path}.remoteIpBlocks"), diags);
            } else if !s.not_remote_ip_blocks.is_empty() {
                remote_ip(format!("{path}.notRemoteIpBlocks"), diags);
            }
        }
        for (j, to) in rule.to.iter().flatten().enumerate() {
            let Some(o) = &to.operation else { continue };
            let path = format!("{rule_path}.to[{j}].operation");
            for (field, list, negated) in [("hosts", &o.hosts, false), ("notHosts", &o.not_hosts, true)] {
                for (k, v) in list.iter().enumerate() {
                    if let Some(why) = host_problem(v) {
                        never(format!("{path}.{field}[{k}]"), negated, why, diags);
                    }
                }
            }
            for (field, list, negated) in [("methods", &o.methods, false), ("notMethods", &o.not_methods, true)] {
                for (k, v) in list.iter().enumerate() {
                    if let Some(why) = method_problem(v) {
                        never(format!("{path}.{field}[{k}]"), negated, why, diags);
                    }
                }
            }
            for (field, list, negated) in [("paths", &o.paths, false), ("notPaths", &o.not_paths, true)] {
                for (k, v) in list.iter().enumerate() {
                    if let Some(why) = path_pattern_problem(v) {
                        never(format!("{path}.{field}[{k}]"), negated, why, diags);
                    }
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let path = format!("{rule_path}.when[{j}]");
            let check: fn(&str) -> Option<String> = match ConditionKey::parse(&c.key) {
                Ok(ConditionKey::RemoteIp) => {
                    remote_ip(format!("{path}.key"), diags);
                    continue;
                }
                Ok(ConditionKey::SourcePrincipal) => principal_problem,
                Ok(ConditionKey::Header(HeaderKey::Authority)) => host_problem,
                Ok(ConditionKey::Header(HeaderKey::Method)) => method_problem,
                _ => continue,
            };
            for (field, list, negated) in [("values", &c.values, false), ("notValues", &c.not_values, true)] {
                for (k, v) in list.iter().enumerate() {
                    if let Some(why) = check(v) {
                        never(format!("{path}.{field}[{k}]"), negated, why, diags);
                    }
                }
            }
        }
    }
}

fn principal_problem(v: &str) -> Option<String> {
    v.starts_with("spiffe://").then(|| {
        format!("`{v}`: principals are written without `spiffe://`, as in `cluster.local/ns/default/sa/sleep`")
    })
}

fn host_problem(v: &str) -> Option<String> {
    let body = v.trim_matches('*');
    let (host, port) = body.rsplit_once(':')?;
    let has_port =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && (!host.contains(':') || host.ends_with(']'));
    has_port.then(|| format!("`{v}`: remora matches hosts without the port (use `ports` for the port)"))
}

fn method_problem(v: &str) -> Option<String> {
    v.bytes().any(|b| b.is_ascii_lowercase()).then(|| {
        format!("`{v}`: methods are case-sensitive and requests use upper case (`{}`)", v.to_ascii_uppercase())
    })
}

/// Why a `paths` entry can never equal a normalized request path, if it cannot.
fn path_pattern_problem(v: &str) -> Option<String> {
    if v == "*" {
        return None;
    }
    // (text to check, whether its first segment is whole, whether its last is)
    let (body, first_whole, last_whole) = if is_path_template(v) {
        (v, true, true)
    } else if let Some(s) = v.strip_prefix('*') {
        (s, false, true)
    } else if let Some(p) = v.strip_suffix('*') {
        (p, true, false)
    } else {
        (v, true, true)
    };
    if first_whole && !body.starts_with('/') {
        return Some(format!("`{v}`: request paths start with `/`"));
    }
    if body.contains("//") {
        return Some(format!("`{v}`: request paths are normalized with `//` merged into `/`"));
    }
    if body.contains('\\') || body.contains('#') || body.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Some(format!(
            "`{v}`: request paths with a backslash, `#` or control characters are never allowed by path rules"
        ));
    }
    if body.contains('?') {
        return Some(format!("`{v}`: paths are matched without the query"));
    }
    let bytes = body.as_bytes();
    for (i, _) in body.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let decoded =
            hex.and_then(|h| u8::from_str_radix(h, 16).ok().filter(|_| h.bytes().all(|b| b.is_ascii_hexdigit())));
        match (hex, decoded) {
            (Some(h), Some(b)) if is_unreserved(b) => {
                return Some(format!(
                    "`{v}`: `%{h}` is decoded to `{}` in request paths before matching",
                    char::from(b)
                ));
            }
            (_, Some(b'/' | b'\\' | 0)) => {
                return Some(format!(
                    "`{v}`: request paths with an encoded slash, backslash or NUL are never allowed by path rules"
                ));
            }
            (Some(h), Some(_)) if h.bytes().any(|b| b.is_ascii_lowercase()) => {
                return Some(format!(
                    "`{v}`: percent-encodings in request paths are normalized to upper-case hex (`%{}`)",
                    h.to_ascii_uppercase()
                ));
            }
            (_, Some(_)) => {}
            // A prefix may end inside a percent-encoding.
            _ if !last_whole && i + 3 > body.len() => {}
            _ => return Some(format!("`{v}`: `%` must start a percent-encoding such as `%20`")),
        }
    }
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let dot = segments
        .iter()
        .enumerate()
        .any(|(i, s)| (i > 0 || first_whole) && (i < last || last_whole) && matches!(*s, "." | ".."));
    dot.then(|| format!("`{v}`: `.` and `..` segments are resolved in request paths before matching"))
}

// === Path normalization ===

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes a request path for `paths` matching (see the module docs):
/// `None` for an unsafe path. A query, if present, is dropped.
pub fn normalize_path(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.split_once('?').map_or(raw, |(path, _)| path);
    if raw.is_empty() {
        return Some(Cow::Borrowed("/"));
    }
    if raw == "*" {
        return Some(Cow::Borrowed(raw));
    }
    if !raw.starts_with('/') || raw.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\' || b == b'#') {
        return None;
    }
    let has_dot_segment = raw.split('/').any(|s| s == "." || s == "..");
    if !raw.contains('%') && !raw.contains("//") && !has_dot_segment {
        return Some(Cow::Borrowed(raw));
    }
    let decoded = percent_decode_unreserved(raw)?;
    if !decoded.contains("//") {
        return Some(Cow::Owned(resolve_dots(&decoded)));
    }
    // RFC 3986 resolves `..` against empty segments (`/a//../b` is `/a/b`);
    // a server that merges slashes first reads `/b`. Only an unambiguous
    // path is safe.
    let rfc_first = merge_slashes(&resolve_dots(&decoded));
    let merge_first = resolve_dots(&merge_slashes(&decoded));
    (rfc_first == merge_first).then_some(Cow::Owned(rfc_first))
}

/// Decodes `%XX` of unreserved characters and upper-cases the hex digits of
/// the rest; `None` for a broken encoding or an encoded `/`, `\` or NUL.
fn percent_decode_unreserved(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).copied().filter(u8::is_ascii_hexdigit)?;
        let lo = bytes.get(i + 2).copied().filter(u8::is_ascii_hexdigit)?;
        let value = (hex_value(hi) << 4) | hex_value(lo);
        if value == 0 || value == b'/' || value == b'\\' {
            return None;
        }
        if is_unreserved(value) {
            out.push(value);
        } else {
            out.extend_from_slice(&[b'%', hi.to_ascii_uppercase(), lo.to_ascii_uppercase()]);
        }
        i += 3;
    }
    String::from_utf8(out).ok()
}

fn hex_value(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        b'A'..=b'F' => h - b'A' + 10,
        _ => 0,
    }
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments go, `..` removes the
/// segment before it; a trailing `.` or `..` leaves a trailing `/`.
fn resolve_dots(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in rest.split('/') {
        trailing_slash = matches!(seg, "." | "..");
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() || trailing_slash {
        result.push('/');
    }
    result
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http::HeaderValue;

    use super::*;
    use crate::config::load::load_str;
    use crate::config::validate::validate_resource;

    const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
    const FOO_APP: &str = "cluster.local/ns/foo/sa/app";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Loads and validates `yaml` (which must be valid) and compiles it for a
    /// workload in `default` with `workload_labels`; returns the compile warnings too.
    fn compile_with(yaml: &str, workload_labels: &[(&str, &str)]) -> (Policies, Vec<Diagnostic>) {
        let set = load_str(Path::new("t.yaml"), yaml, "default");
        assert!(set.diagnostics.is_empty(), "load: {:#?}", set.diagnostics);
        let mut found = Vec::new();
        for r in &set.resources {
            validate_resource(r, &mut found);
        }
        let errors: Vec<String> = found.iter().filter(|d| d.is_error()).map(ToString::to_string).collect();
        assert!(errors.is_empty(), "validation: {errors:#?}");
        let mut diags = Vec::new();
        let p = Policies::compile(&set.resources, "default", &labels(workload_labels), &mut diags);
        (p, diags)
    }

    fn compile(yaml: &str) -> Policies {
        compile_with(yaml, &[("app", "web")]).0
    }

    /// One AuthorizationPolicy `name` in `default` with `spec` (YAML, indented by 2).
    fn policy(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}\n---\n"
        )
    }

    /// A request under test; HTTP unless made TCP.
    #[derive(Clone)]
    struct T {
        principal: Option<String>,
        ip: IpAddr,
        port: u16,
        tcp: bool,
        method: String,
        host: String,
        path: String,
        headers: HeaderMap,
    }

    fn get(path: &str) -> T {
        T {
            principal: Some(SLEEP.into()),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            port: 8080,
            tcp: false,
            method: "GET".into(),
            host: "web.default.svc.cluster.local".into(),
            path: path.into(),
            headers: HeaderMap::new(),
        }
    }

    fn tcp() -> T {
        T { tcp: true, ..get("/") }
    }

    impl T {
        fn peer(mut self, principal: Option<&str>) -> T {
            self.principal = principal.map(str::to_string);
            self
        }
        fn ip(mut self, ip: &str) -> T {
            self.ip = ip.parse().expect("test IP");
            self
        }
        fn port(mut self, port: u16) -> T {
            self.port = port;
            self
        }
        fn method(mut self, method: &str) -> T {
            self.method = method.into();
            self
        }
        fn host(mut self, host: &str) -> T {
            self.host = host.into();
            self
        }
        fn header(mut self, name: &'static str, value: &'static str) -> T {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }

        fn check(&self, p: &Policies) -> Decision {
            let http = HttpAttrs { method: &self.method, host: &self.host, path: &self.path, headers: &self.headers };
            p.evaluate(&Request {
                principal: self.principal.as_deref(),
                source_ip: self.ip,
                destination_port: self.port,
                http: (!self.tcp).then_some(http),
            })
        }

        fn allowed(&self, p: &Policies) -> bool {
            self.check(p).is_allow()
        }
    }

    #[track_caller]
    fn assert_allowed(p: &Policies, reqs: &[T]) {
        for r in reqs {
            assert!(r.allowed(p), "expected allow: {} {} from {:?} ({})", r.method, r.path, r.principal, r.ip);
        }
    }

    #[track_caller]
    fn assert_denied(p: &Policies, reqs: &[T]) {
        for r in reqs {
            assert!(!r.allowed(p), "expected deny: {} {} from {:?} ({})", r.method, r.path, r.principal, r.ip);
        }
    }

    #[test]
    fn no_policies_allow_everything() {
        let p = Policies::empty();
        assert!(p.is_empty());
        assert_eq!(get("/").check(&p), Decision::Allow);
        assert_eq!(tcp().check(&p), Decision::Allow);
    }

    #[test]
    fn allow_matches_and_no_match_denies() {
        let p = compile(&policy(
            "allow-sleep",
            "  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sleep\"]}",
        ));
        assert_eq!(p.len(), 1);
        assert_eq!(get("/").check(&p), Decision::Allow);
        assert_eq!(get("/").peer(Some(FOO_APP)).check(&p), Decision::Deny { policy: String::new() });
    }

    #[test]
    fn deny_wins_over_allow_and_names_the_policy() {
        let yaml = policy("allow-all", "  rules: [{}]")
            + &policy("deny-admin", "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin\"]}");
        let p = compile(&yaml);
        assert_eq!(get("/admin").check(&p), Decision::Deny { policy: "default/deny-admin".into() });
        assert_eq!(get("/public").check(&p), Decision::Allow);
    }

    #[test]
    fn only_deny_policies_allow_the_rest() {
        let p = compile(&policy("deny-foo", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [foo]}"));
        assert_allowed(&p, &[get("/"), get("/").peer(None)]);
        assert_eq!(get("/").peer(Some(FOO_APP)).check(&p), Decision::Deny { policy: "default/deny-foo".into() });
    }

    #[test]
    fn empty_spec_denies_everything_and_an_empty_rule_allows_everything() {
        let deny_all = compile(&policy("allow-nothing", "  {}"));
        assert_eq!(get("/").check(&deny_all), Decision::Deny { policy: String::new() });
        assert_denied(&deny_all, &[tcp(), get("/").peer(None)]);

        let allow_all = compile(&(policy("allow-nothing", "  {}") + &policy("allow-all", "  rules:\n  - {}")));
        assert_allowed(&allow_all, &[get("/x"), tcp(), get("/").peer(None)]);
    }

    #[test]
    fn principals_exact_prefix_suffix_presence() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sleep\", \"cluster.local/ns/prod/*\", \"*/sa/batch\"]}",
        ));
        assert_allowed(
            &p,
            &[
                get("/"),
                get("/").peer(Some("cluster.local/ns/prod/sa/any")),
                get("/").peer(Some("other.domain/ns/x/sa/batch")),
            ],
        );
        assert_denied(&p, &[get("/").peer(Some(FOO_APP)), get("/").peer(None)]);

        let any_mtls = compile(&policy("p", "  rules:\n  - from:\n    - source: {principals: [\"*\"]}"));
        assert_allowed(&any_mtls, &[get("/"), get("/").peer(Some(FOO_APP))]);
        assert_denied(&any_mtls, &[get("/").peer(None), tcp().peer(None)]);
    }

    #[test]
    fn not_principals_match_plaintext_peers() {
        // Envoy: not(any of) — a peer without a principal matches none, so the negation holds.
        let deny = compile(&policy(
            "deny-others",
            "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"cluster.local/ns/default/sa/sleep\"]}",
        ));
        assert_allowed(&deny, &[get("/")]);
        assert_denied(&deny, &[get("/").peer(None), get("/").peer(Some(FOO_APP))]);

        let allow = compile(&policy(
            "allow-not-foo",
            "  rules:\n  - from:\n    - source: {notPrincipals: [\"cluster.local/ns/foo/*\"]}",
        ));
        assert_allowed(&allow, &[get("/"), get("/").peer(None)]);
        assert_denied(&allow, &[get("/").peer(Some(FOO_APP))]);
    }

    #[test]
    fn namespaces_and_not_namespaces() {
        let p = compile(&policy("p", "  rules:\n  - from:\n    - source: {namespaces: [foo, \"team-*\"]}"));
        assert_allowed(&p, &[get("/").peer(Some(FOO_APP)), get("/").peer(Some("cluster.local/ns/team-a/sa/x"))]);
        assert_denied(&p, &[get("/"), get("/").peer(None), get("/").peer(Some("cluster.local/ns/foobar/sa/foo"))]);

        let not =
            compile(&policy("p", "  action: DENY\n  rules:\n  - from:\n    - source: {notNamespaces: [default]}"));
        assert_allowed(&not, &[get("/")]);
        assert_denied(&not, &[get("/").peer(Some(FOO_APP)), get("/").peer(None)]);
    }

    #[test]
    fn service_accounts() {
        let p = compile(&policy("p", "  rules:\n  - from:\n    - source: {serviceAccounts: [foo/app, sleep]}"));
        assert_allowed(&p, &[get("/"), get("/").peer(Some(FOO_APP)), get("/").peer(Some("td.example/ns/foo/sa/app"))]);
        assert_denied(
            &p,
            &[
                get("/").peer(None),
                get("/").peer(Some("cluster.local/ns/foo/sa/app-2")),
                get("/").peer(Some("cluster.local/ns/bar/sa/app")),
            ],
        );
    }

    #[test]
    fn ip_blocks_v4_and_v6() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\", \"192.168.1.7\", \"2001:db8::/32\"]\n        notIpBlocks: [\"10.9.0.0/16\"]",
        ));
        assert_allowed(
            &p,
            &[
                get("/").ip("10.1.2.3"),
                get("/").ip("192.168.1.7"),
                get("/").ip("2001:db8:1::5"),
                get("/").ip("::ffff:10.1.2.3"),
                tcp().ip("10.200.0.1"),
            ],
        );
        assert_denied(
            &p,
            &[get("/").ip("10.9.1.1"), get("/").ip("192.168.1.8"), get("/").ip("2001:db9::1"), get("/").ip("11.0.0.1")],
        );
    }

    #[test]
    fn remote_ip_blocks_use_the_peer_address_and_warn_once() {
        let (p, diags) = compile_with(
            &policy(
                "p",
                "  rules:\n  - from:\n    - source: {remoteIpBlocks: [\"10.0.0.0/8\"]}\n    - source: {notRemoteIpBlocks: [\"1.2.3.4\"]}\n  - when:\n    - key: remote.ip\n      values: [\"10.0.0.1\"]",
            ),
            &[],
        );
        assert_allowed(&p, &[get("/").ip("10.1.1.1"), get("/").ip("8.8.8.8")]);
        assert_denied(&p, &[get("/").ip("1.2.3.4")]);
        assert_eq!(diags.len(), 1, "{diags:#?}");
        assert!(diags[0].message.contains("peer address"), "{}", diags[0]);
        assert_eq!(diags[0].path, "spec.rules[0].from[0].source.remoteIpBlocks");
    }

    #[test]
    fn hosts_are_case_insensitive() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - to:\n    - operation:\n        hosts: [\"Web.Example.com\", \"*.internal\"]\n        notHosts: [\"secret.internal\"]",
        ));
        assert_allowed(&p, &[get("/").host("web.example.COM"), get("/").host("API.Internal")]);
        assert_denied(&p, &[get("/").host("other.example.com"), get("/").host("SECRET.internal")]);
    }

    #[test]
    fn methods() {
        let p = compile(&policy("p", "  rules:\n  - to:\n    - operation: {methods: [GET, HEAD]}"));
        assert_allowed(&p, &[get("/"), get("/").method("HEAD")]);
        assert_denied(&p, &[get("/").method("POST"), get("/").method("get")]);

        let not = compile(&policy("p", "  action: DENY\n  rules:\n  - to:\n    - operation: {notMethods: [GET]}"));
        assert_allowed(&not, &[get("/")]);
        assert_denied(&not, &[get("/").method("DELETE")]);
    }

    #[test]
    fn paths_exact_prefix_suffix_presence() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - to:\n    - operation: {paths: [\"/exact\", \"/api/*\", \"*.png\"]}\n    - operation: {methods: [PUT], paths: [\"*\"]}",
        ));
        assert_allowed(
            &p,
            &[get("/exact"), get("/api/"), get("/api/v1/x"), get("/img/a.png"), get("/any").method("PUT")],
        );
        assert_denied(&p, &[get("/exact/"), get("/api"), get("/apix"), get("/a.png.txt"), get("/any")]);
    }

    #[test]
    fn path_templates() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - to:\n    - operation: {paths: [\"/shelves/{*}/books/{*}\", \"/files/{**}\", \"/t/{*}\"]}",
        ));
        assert_allowed(
            &p,
            &[
                get("/shelves/1/books/2"),
                get("/files/"),
                get("/files/a"),
                get("/files/a/b/c.txt"),
                get("/t/top"),
                get("/shelves/%31/books/x"),
            ],
        );
        assert_denied(
            &p,
            &[
                get("/shelves/1/books"),
                get("/shelves/1/books/2/3"),
                get("/shelves//books/2"),
                get("/files"),
                get("/t/top/"),
                get("/t/"),
                get("/top"),
                get("/shelves/1/books/x/"),
                get("/"),
            ],
        );
    }

    #[test]
    fn path_normalization_defeats_bypasses() {
        let p = compile(
            &(policy("allow-all", "  rules: [{}]")
                + &policy(
                    "deny-admin",
                    "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin\", \"/admin/*\"]}",
                )),
        );
        assert_denied(
            &p,
            &[
                get("/admin"),
                get("/public/../admin"),
                get("//admin"),
                get("/%61dmin"),
                get("/%61%64%6D%69%6E/x"),
                get("/admin/."),
                get("/admin/./users"),
                get("/./admin"),
                get("/public/%2e%2e/admin"),
                get("/admin/../admin/x"),
                get("/admin%2Fusers"), // encoded slash: unsafe, DENY matches
                get("/public%2F..%2Fadmin"),
                get("/admin\\x"),    // raw backslash: unsafe
                get("/a//../admin"), // ambiguous: RFC gives /a/admin, merge-first gives /admin
                get("/x%00"),
            ],
        );
        assert_allowed(&p, &[get("/admin/../secret"), get("/administrator"), get("/public/admin"), get("/%41dmin")]);

        let allow = compile(&policy("allow-public", "  rules:\n  - to:\n    - operation: {paths: [\"/public/*\"]}"));
        assert_allowed(&allow, &[get("/public/x"), get("/public/./x"), get("//public//x"), get("/public/%7Euser")]);
        assert_denied(
            &allow,
            &[
                get("/public/../admin"),
                get("/public/%2e%2e/admin"),
                get("/public%2F..%2Fadmin"),
                get("/public/x%2fy"),
                get("/public/a//../../admin"),
                get("/public/x%zz"),
            ],
        );

        // An unsafe path also fails an ALLOW rule's notPaths.
        let not = compile(&policy("allow-not-admin", "  rules:\n  - to:\n    - operation: {notPaths: [\"/admin*\"]}"));
        assert_allowed(&not, &[get("/public")]);
        assert_denied(&not, &[get("/admin"), get("/x/../admin"), get("/public%2F")]);
    }

    #[test]
    fn normalize_path_forms() {
        let n = |p: &str| normalize_path(p).map(Cow::into_owned);
        assert_eq!(n("/a/b"), Some("/a/b".into()));
        assert_eq!(n(""), Some("/".into()));
        assert_eq!(n("*"), Some("*".into()));
        assert_eq!(n("/a/b?x=1"), Some("/a/b".into()));
        assert_eq!(n("/admin/../secret"), Some("/secret".into()));
        assert_eq!(n("//admin"), Some("/admin".into()));
        assert_eq!(n("/a///b//"), Some("/a/b/".into()));
        assert_eq!(n("/%61dmin"), Some("/admin".into()));
        assert_eq!(n("/admin/."), Some("/admin/".into()));
        assert_eq!(n("/admin/.."), Some("/".into()));
        assert_eq!(n("/../../x"), Some("/x".into()));
        assert_eq!(n("/a/b/../c/./d"), Some("/a/c/d".into()));
        assert_eq!(n("/.hidden/..x"), Some("/.hidden/..x".into()));
        assert_eq!(n("/%2e%2E/x"), Some("/x".into()));
        assert_eq!(n("/a%3ab%20c"), Some("/a%3Ab%20c".into()));
        assert_eq!(n("/%2561"), Some("/%2561".into()), "decoded once only");
        assert_eq!(n("/caf%C3%A9/é"), Some("/caf%C3%A9/é".into()));
        assert_eq!(n("/a//b/../c"), Some("/a/c".into()), "same either way");
        for unsafe_path in
            ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/a%", "/a%4", "/a%zz", "/a#b", "a/b", "/a\tb", "/a//../b"]
        {
            assert_eq!(n(unsafe_path), None, "{unsafe_path:?}");
        }
    }

    #[test]
    fn ports_and_destination_port() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - to:\n    - operation: {ports: [\"8080\", \"9090\"], notPorts: [\"9090\"]}\n  - to:\n    - operation: {ports: [\"7070\"]}\n    when:\n    - key: destination.port\n      notValues: [\"7070\"]",
        ));
        assert_allowed(&p, &[get("/"), tcp().port(8080)]);
        assert_denied(&p, &[get("/").port(9090), get("/").port(7070), tcp().port(80)]);
    }

    #[test]
    fn when_conditions() {
        let p = compile(&policy(
            "p",
            "  rules:\n  - when:\n    - key: request.headers[X-User]\n      values: [\"alice\", \"admin-*\"]\n    - key: request.headers[x-debug]\n      notValues: [\"*\"]\n    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n    - key: source.namespace\n      values: [default]\n    - key: source.principal\n      notValues: [\"*/sa/blocked\"]",
        ));
        assert_allowed(
            &p,
            &[
                get("/").header("x-user", "alice"),
                get("/").header("x-user", "admin-bob"),
                // Several values: any of them may match.
                get("/").header("x-user", "mallory").header("x-user", "alice"),
            ],
        );
        assert_denied(
            &p,
            &[
                get("/"),
                get("/").header("x-user", "bob"),
                get("/").header("x-user", "alice").header("x-debug", ""),
                get("/").header("x-user", "alice").ip("192.168.0.1"),
                get("/").header("x-user", "alice").peer(Some(FOO_APP)),
                get("/").header("x-user", "alice").peer(None),
                get("/").header("x-user", "alice").peer(Some("cluster.local/ns/default/sa/blocked")),
            ],
        );

        let pseudo = compile(&policy(
            "p",
            "  rules:\n  - when:\n    - key: request.headers[:authority]\n      values: [\"*.example.com\"]\n    - key: request.headers[:method]\n      values: [GET]",
        ));
        assert_allowed(&pseudo, &[get("/").host("a.example.com")]);
        assert_denied(&pseudo, &[get("/").host("a.example.org"), get("/").host("a.example.com").method("POST")]);
    }

    #[test]
    fn selectors_root_namespace_and_other_namespaces() {
        let in_ns = |ns: &str, name: &str, spec: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
            )
        };
        let deny = "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/blocked\"]}";
        let yaml = in_ns("default", "web-only", &format!("  selector: {{matchLabels: {{app: web}}}}\n{deny}"))
            + &in_ns("default", "db-only", "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{}]")
            + &in_ns(
                "istio-system",
                "mesh",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/mesh-blocked\"]}",
            )
            + &in_ns("istio-system", "mesh-db", "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{}]")
            + &in_ns("other", "elsewhere", "  action: DENY\n  rules: [{}]");

        let (web, _) = compile_with(&yaml, &[("app", "web"), ("version", "v1")]);
        assert_eq!(web.len(), 2);
        assert_eq!(get("/blocked").check(&web), Decision::Deny { policy: "default/web-only".into() });
        assert_eq!(get("/mesh-blocked").check(&web), Decision::Deny { policy: "istio-system/mesh".into() });
        assert_allowed(&web, &[get("/ok")]);

        let (db, _) = compile_with(&yaml, &[("app", "db")]);
        assert_eq!(get("/ok").check(&db), Decision::Deny { policy: "default/db-only".into() });

        let (unlabelled, _) = compile_with(&yaml, &[]);
        assert_eq!(unlabelled.len(), 1, "only the selector-less mesh policy applies");
        assert_allowed(&unlabelled, &[get("/blocked")]);
    }

    #[test]
    fn tcp_drops_http_allow_rules_but_ignores_http_fields_in_deny_rules() {
        let allow = compile(&policy(
            "p",
            "  rules:\n  - to:\n    - operation: {methods: [GET], ports: [\"8080\"]}\n  - to:\n    - operation: {ports: [\"5432\"]}\n  - from:\n    - source: {namespaces: [default]}\n    when:\n    - key: request.headers[x-tenant]\n      values: [a]",
        ));
        // HTTP: the method rule allows on 8080.
        assert_allowed(&allow, &[get("/"), tcp().port(5432)]);
        // TCP: rules with HTTP attributes are dropped, so 8080 is not allowed.
        assert_denied(&allow, &[tcp().port(8080), tcp().port(9000)]);

        let deny = compile(&policy(
            "d",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST], ports: [\"8080\"]}\n  - to:\n    - operation: {paths: [\"/admin\"]}\n    from:\n    - source: {namespaces: [foo]}",
        ));
        // HTTP: only POST on 8080 and /admin from foo are denied.
        assert_allowed(&deny, &[get("/"), get("/x").peer(Some(FOO_APP))]);
        assert_denied(&deny, &[get("/").method("POST"), get("/admin").peer(Some(FOO_APP))]);
        // TCP: the method is ignored, so every connection to 8080 is denied; the
        // path is ignored, so every connection from foo is denied.
        assert_eq!(tcp().port(8080).check(&deny), Decision::Deny { policy: "default/d".into() });
        assert_denied(&deny, &[tcp().port(9000).peer(Some(FOO_APP))]);
        assert_allowed(&deny, &[tcp().port(9000)]);
    }

    #[test]
    fn audit_never_changes_the_decision() {
        let audit_only = compile(&policy("audit", "  action: AUDIT\n  rules: [{}]"));
        assert!(!audit_only.is_empty());
        assert_allowed(&audit_only, &[get("/"), tcp()]);

        let with_allow = compile(
            &(policy("audit", "  action: AUDIT\n  rules: [{}]")
                + &policy("allow-get", "  rules:\n  - to:\n    - operation: {methods: [GET]}")),
        );
        assert_allowed(&with_allow, &[get("/")]);
        assert_eq!(get("/").method("POST").check(&with_allow), Decision::Deny { policy: String::new() });
    }

    #[test]
    fn compile_warns_about_entries_that_never_match() {
        let (_, diags) = compile_with(
            &policy(
                "p",
                "  rules:\n  - from:\n    - source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}\n    to:\n    - operation:\n        hosts: [\"web.example.com:8080\"]\n        methods: [get]\n        paths: [\"/a//b\", \"/x/../y\", \"/%7euser\", \"/ok/*\", \"*.png\", \"/.well-known/*\", \"/a%2*\", \"/a/..*\"]\n        notPaths: [\"/a%2fb\"]",
            ),
            &[],
        );
        let found: Vec<String> = diags.iter().map(|d| format!("{}: {}", d.path, d.message)).collect();
        let expect = [
            "spec.rules[0].from[0].source.principals[0]: `spiffe://cluster.local/ns/a/sa/b`: principals are written without",
            "spec.rules[0].to[0].operation.hosts[0]: `web.example.com:8080`: remora matches hosts without the port",
            "spec.rules[0].to[0].operation.methods[0]: `get`: methods are case-sensitive",
            "spec.rules[0].to[0].operation.paths[0]: `/a//b`",
            "spec.rules[0].to[0].operation.paths[1]: `/x/../y`",
            "spec.rules[0].to[0].operation.paths[2]: `/%7euser`: `%7e` is decoded to `~`",
            "spec.rules[0].to[0].operation.notPaths[0]: `/a%2fb`",
        ];
        for want in expect {
            assert!(found.iter().any(|f| f.starts_with(want)), "missing {want:?} in {found:#?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        assert!(found.iter().any(|f| f.ends_with("never excludes anything")));
        assert!(diags.iter().all(|d| !d.is_error()));
    }

    #[test]
    fn invalid_values_fail_closed() {
        let unvalidated = |yaml: &str| {
            let set = load_str(Path::new("t.yaml"), yaml, "default");
            assert!(set.diagnostics.is_empty(), "load: {:#?}", set.diagnostics);
            Policies::compile(&set.resources, "default", &BTreeMap::new(), &mut Vec::new())
        };
        // A value that cannot be compiled drops its ALLOW rule: nothing is allowed.
        let p = unvalidated(&policy("allow", "  rules:\n  - from:\n    - source: {ipBlocks: [\"not-an-ip\"]}"));
        assert_denied(&p, &[get("/"), tcp()]);

        // A DENY rule ignores it (the rest of the rule decides); CUSTOM acts as DENY.
        let p = unvalidated(
            &(policy("all", "  rules: [{}]")
                + &policy(
                    "deny",
                    "  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [bad], namespaces: [foo]}",
                )
                + &policy(
                    "custom",
                    "  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - to:\n    - operation: {paths: [\"/ext\"]}",
                )),
        );
        assert_allowed(&p, &[get("/")]);
        assert_eq!(get("/").peer(Some(FOO_APP)).check(&p), Decision::Deny { policy: "default/deny".into() });
        assert_eq!(get("/ext").check(&p), Decision::Deny { policy: "default/custom".into() });
    }

    #[test]
    fn ip_block_parsing() {
        assert!(IpBlock::parse("10.0.0.0/8").is_ok());
        assert!(IpBlock::parse("10.1.2.3/8").is_ok_and(|b| b.contains("10.200.0.0".parse().expect("ip"))));
        assert!(IpBlock::parse("::/0").is_ok_and(|b| b.contains("2001:db8::1".parse().expect("ip"))));
        assert!(IpBlock::parse("0.0.0.0/0").is_ok_and(|b| !b.contains("2001:db8::1".parse().expect("ip"))));
        for bad in ["10.0.0.0/33", "10.0.0.0/", "10.0.0.0/+8", "::/129", "10.0.0", "x", ""] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_port("8080"), Ok(8080));
        for bad in ["0", "65536", "+80", "http", "", " 80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    /// `istio.io/dry-run` policies are evaluated on their own and never
    /// enforced: a dry-run DENY does not deny, a dry-run ALLOW does not turn
    /// the workload into deny-by-default.
    #[test]
    fn dry_run_policies_are_shadowed_not_enforced() {
        let dry = |name: &str, spec: &str| {
            policy(name, spec).replace(
                &format!("metadata: {{name: {name}}}"),
                &format!("metadata: {{name: {name}, annotations: {{istio.io/dry-run: \"true\"}}}}"),
            )
        };
        let p = compile(
            &(dry(
                "no-post",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST], ports: [\"8080\"]}",
            ) + &dry(
                "only-sleep",
                "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/other\"]}",
            )),
        );
        assert_eq!(p.len(), 2);
        let post = get("/").method("POST");
        assert_eq!(post.check(&p), Decision::Allow, "dry-run policies never deny");
        let attrs = |t: &T| (t.method.clone(), t.path.clone());
        let (m, path) = attrs(&post);
        let req = Request {
            principal: post.principal.as_deref(),
            source_ip: post.ip,
            destination_port: post.port,
            http: Some(HttpAttrs { method: &m, host: &post.host, path: &path, headers: &post.headers }),
        };
        let (deny, allow) = p.shadow(&req);
        assert_eq!(deny, Some(Decision::Deny { policy: "default/no-post".into() }));
        assert_eq!(allow, Some(Decision::Deny { policy: String::new() }), "sleep is not the allowed principal");
        // An enforced policy next to them still decides.
        let enforced = compile(
            &(dry(
                "no-post",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST], ports: [\"8080\"]}",
            ) + &policy(
                "deny-get",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [GET], ports: [\"8080\"]}",
            )),
        );
        assert!(!get("/").check(&enforced).is_allow());
        assert!(get("/").method("POST").check(&enforced).is_allow());
    }
}
