//! Compiles a validated resource set into a [`Snapshot`]: listeners with their
//! route tables, and clusters with endpoints and policy. This is Istio's
//! translator in miniature (reference: `pilot/pkg/networking/core`), and the
//! place where cross-references are checked: a route to an unknown host, an
//! undefined subset or an ambiguous port is an error here, never a runtime 503.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderName, HeaderValue};
use serde_json::json;

use super::model::{self, Spec};
use super::validate::{
    declared_protocol, decode_base64, grpc_status_code, percent_of, port_protocol, validate_resource,
};
use super::{Diagnostic, LoadedSet, Resource};
use crate::route::Mirror;
use crate::route::matcher::{HeaderCondition, QueryCondition, anchored_regex};
use crate::route::retry::RetryPolicy;
use crate::route::{
    AbortKind, Action, DirectResponse, Fallback, Fault, FaultAbort, FaultDelay, Forward, HeaderOps, PathMatch,
    Redirect, RedirectPort, Rewrite, Route, RouteMatch, RouteTable, StringMatcher, UriRewrite, VirtualHost,
    WeightedCluster,
};
use crate::snapshot::{Capture, InboundTls, KnownDestination, Listener, ListenerKind, Snapshot};
use crate::tls::UpstreamTls;
use crate::upstream::OutlierConfig;
use crate::upstream::pool::Keepalive;
use crate::upstream::{
    ClusterKey, ClusterSpec, Direction, Discovery, DnsTarget, EndpointSpec, HashSource, LbPolicy, PoolSettings,
    Protocol, Registry, dns,
};

/// Kubernetes' cluster domain; short names expand to `name.ns.svc.cluster.local`.
pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// Paths of every `tls` block with mode ISTIO_MUTUAL in a DestinationRule.
fn istio_mutual_blocks(dr: &model::DestinationRule) -> Vec<String> {
    fn visit(base: &str, p: Option<&model::TrafficPolicy>, out: &mut Vec<String>) {
        let Some(p) = p else { return };
        let mutual =
            |t: &Option<model::ClientTlsSettings>| t.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL");
        if mutual(&p.tls) {
            out.push(format!("{base}.tls.mode"));
        }
        for (i, pl) in p.port_level_settings.iter().enumerate() {
            if mutual(&pl.tls) {
                out.push(format!("{base}.portLevelSettings[{i}].tls.mode"));
            }
        }
    }
    let mut out = Vec::new();
    visit("spec.trafficPolicy", dr.traffic_policy.as_ref(), &mut out);
    for (i, s) in dr.subsets.iter().enumerate() {
        visit(&format!("spec.subsets[{i}].trafficPolicy"), s.traffic_policy.as_ref(), &mut out);
    }
    out
}

/// The endpoint label Istio's injection adds to meshed workloads; it turns on
/// auto-mTLS towards them.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Istio's root namespace: policies there apply mesh-wide.
const ROOT_NAMESPACE: &str = "istio-system";

/// Default bind address for an egress listener that names only a port: the
/// outbound side serves the local app, so it is not exposed beyond loopback.
const DEFAULT_EGRESS_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Default bind for gateway servers and sidecar ingress: all interfaces, as Istio.
const DEFAULT_PUBLIC_BIND: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Process-level settings that shape compilation (from `remora run` flags).
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// The proxy's own namespace (`--namespace`).
    pub namespace: String,
    /// The proxy's workload labels (`--workload-labels`). Empty: a standalone
    /// proxy, to which every Gateway applies.
    pub workload_labels: BTreeMap<String, String>,
    /// The workload's name (`--workload-name`), for metric labels.
    pub workload_name: Option<String>,
    /// The workload identity directory (`--identity-dir`), which
    /// `ISTIO_MUTUAL` and STRICT mTLS need.
    pub identity_dir: Option<std::path::PathBuf>,
    /// `--trust-domain`; empty means Istio's default, `cluster.local`.
    pub trust_domain: String,
    /// `--capture`: serve the capture ports that `remora iptables` redirects to.
    pub capture: Option<CapturePorts>,
}

/// The ports `remora iptables` redirects captured traffic to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturePorts {
    /// The app's outbound connections (Istio: 15001).
    pub outbound: u16,
    /// Connections to the pod (Istio: 15006).
    pub inbound: u16,
}

impl Default for CapturePorts {
    fn default() -> Self {
        CapturePorts { outbound: 15001, inbound: 15006 }
    }
}

/// Where captured inbound traffic reaches the app from, so that the capture
/// rules (`-o lo -s 127.0.0.6 -j RETURN`) never redirect it again; Istio's
/// `InboundPassthroughBindIpv4`.
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

impl CompileOptions {
    pub fn has_identity(&self) -> bool {
        self.identity_dir.is_some()
    }

    pub fn trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() { crate::tls::DEFAULT_TRUST_DOMAIN } else { &self.trust_domain }
    }
}

/// Validates and compiles. On any error, returns every diagnostic (errors and
/// warnings); on success the snapshot carries the warnings.
pub fn compile(set: &LoadedSet, opts: &CompileOptions, registry: &Registry) -> Result<Snapshot, Vec<Diagnostic>> {
    let mut diags = set.diagnostics.clone();
    for r in &set.resources {
        validate_resource(r, &mut diags);
    }
    if diags.iter().any(Diagnostic::is_error) {
        return Err(diags);
    }
    let authz =
        Arc::new(crate::authz::Policies::compile(&set.resources, &opts.namespace, &opts.workload_labels, &mut diags));
    let mut c = Compiler {
        opts,
        registry,
        diags,
        services: BTreeMap::new(),
        drs: HashMap::new(),
        clusters: BTreeMap::new(),
        authz,
        capture: CaptureParts::default(),
    };
    c.build_registry(&set.resources);
    c.build_destination_rules(&set.resources);
    let (listeners, capture) = c.build_listeners(&set.resources);
    if c.diags.iter().any(Diagnostic::is_error) {
        return Err(c.diags);
    }
    let version = set.version();
    let clusters = c.clusters.into_values().collect();
    let mut warnings = c.diags;
    // Capture compiles one route table per port; a finding about a resource
    // is reported once.
    let mut seen = std::collections::HashSet::new();
    warnings.retain(|d| seen.insert(d.to_string()));
    Ok(Snapshot::new(version, listeners, clusters, set.files.clone(), warnings, set.resources.len(), capture))
}

/// Resolves DNS clusters of a freshly compiled snapshot (first answer awaited
/// with a bound) and starts their refresh tasks. Call before publishing.
pub async fn start_discovery(snapshot: &Snapshot) {
    let dns_clusters: Vec<_> =
        snapshot.clusters.iter().filter(|c| matches!(c.discovery, Discovery::Dns { .. })).cloned().collect();
    let tasks: Vec<_> = dns_clusters.iter().map(dns::start).collect();
    futures_util::future::join_all(tasks).await;
}

/// Expands a short host name with a namespace, as Istio does.
pub fn expand_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" || host.starts_with('*') {
        host.to_ascii_lowercase()
    } else {
        format!("{}.{namespace}.{DOMAIN_SUFFIX}", host.to_ascii_lowercase())
    }
}

/// One service from the registry (a ServiceEntry host).
struct Service {
    host: String,
    namespace: String,
    ports: Vec<model::ServicePort>,
    resolution: String,
    endpoints: Vec<model::WorkloadEntry>,
    subject_alt_names: Vec<String>,
    /// Service addresses (`spec.addresses`, a Kubernetes ClusterIP): route
    /// domains and, under capture, original destinations.
    addresses: Vec<IpAddr>,
    from: String,
}

/// What the `Sidecar` contributes to the capture listeners.
#[derive(Default)]
struct CaptureParts {
    /// Inbound listeners of `Sidecar` ingress entries, by port.
    inbound: HashMap<u16, Listener>,
    /// Their default endpoints.
    apps: HashMap<u16, SocketAddr>,
    /// Egress host scopes: by port, and (`None`) for every other port.
    egress_hosts: HashMap<Option<u16>, Vec<String>>,
    fallback: Option<Fallback>,
}

struct DrInfo {
    /// The first DestinationRule for the host (for diagnostics).
    res: Resource,
    namespace: String,
    name: String,
    policy: Option<model::TrafficPolicy>,
    subsets: Vec<model::Subset>,
}

struct Compiler<'a> {
    opts: &'a CompileOptions,
    registry: &'a Registry,
    diags: Vec<Diagnostic>,
    services: BTreeMap<String, Service>,
    drs: HashMap<String, DrInfo>,
    clusters: BTreeMap<ClusterKey, Arc<crate::upstream::Cluster>>,
    /// AuthorizationPolicies for this workload, shared by inbound listeners.
    authz: Arc<crate::authz::Policies>,
    capture: CaptureParts,
}

fn is_http_protocol(p: &str) -> bool {
    matches!(p, "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB")
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Compiler<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    // === services ===

    fn build_registry(&mut self, resources: &[Resource]) {
        for r in resources {
            let Spec::ServiceEntry(se) = &r.spec else { continue };
            let resolution = se.resolution.clone().unwrap_or_else(|| "NONE".into()).to_ascii_uppercase();
            for (i, h) in se.hosts.iter().enumerate() {
                let host = expand_host(h, &r.namespace);
                if let Some(prev) = self.services.get(&host) {
                    let msg =
                        format!("host {host} is also defined by {}; remora needs one ServiceEntry per host", prev.from);
                    self.push(r.error(format!("spec.hosts[{i}]"), msg));
                    continue;
                }
                self.services.insert(
                    host.clone(),
                    Service {
                        host,
                        namespace: r.namespace.clone(),
                        ports: se.ports.clone(),
                        resolution: resolution.clone(),
                        endpoints: se.endpoints.clone(),
                        subject_alt_names: se.subject_alt_names.clone(),
                        addresses: se.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        from: r.display_name(),
                    },
                );
            }
        }
    }

    fn build_destination_rules(&mut self, resources: &[Resource]) {
        for r in resources {
            let Spec::DestinationRule(dr) = &r.spec else { continue };
            if !self.opts.has_identity() {
                for path in istio_mutual_blocks(dr) {
                    self.push(r.error(
                        path,
                        "tls mode ISTIO_MUTUAL needs the workload identity: start remora with --identity-dir",
                    ));
                }
            }
            let host = expand_host(&dr.host, &r.namespace);
            if !self.services.contains_key(&host) {
                self.push(r.warning(
                    "spec.host",
                    format!("no ServiceEntry defines host {host}; this DestinationRule has no effect"),
                ));
            }
            match self.drs.get_mut(&host) {
                None => {
                    self.drs.insert(
                        host,
                        DrInfo {
                            res: r.clone(),
                            namespace: r.namespace.clone(),
                            name: r.name.clone(),
                            policy: dr.traffic_policy.clone(),
                            subsets: dr.subsets.clone(),
                        },
                    );
                }
                Some(existing) => {
                    // Istio merges DestinationRules for one host: the first
                    // traffic policy wins, subsets are merged by name.
                    let first = format!("DestinationRule {}/{}", existing.namespace, existing.name);
                    if dr.traffic_policy.is_some() && existing.policy.is_some() {
                        self.diags.push(r.warning(
                            "spec.trafficPolicy",
                            format!("host {host} already has a traffic policy from {first}; this one is ignored"),
                        ));
                    } else if existing.policy.is_none() {
                        existing.policy = dr.traffic_policy.clone();
                    }
                    for (i, s) in dr.subsets.iter().enumerate() {
                        if existing.subsets.iter().any(|e| e.name == s.name) {
                            self.diags.push(r.warning(
                                format!("spec.subsets[{i}]"),
                                format!(
                                    "subset {} of host {host} is already defined by {first}; this one is ignored",
                                    s.name
                                ),
                            ));
                        } else {
                            existing.subsets.push(s.clone());
                        }
                    }
                }
            }
        }
    }

    /// The cluster for `host`/`subset`/`port`, built on first use.
    fn cluster(
        &mut self,
        host: &str,
        subset: Option<&str>,
        port: u16,
    ) -> Result<Arc<crate::upstream::Cluster>, String> {
        let key = ClusterKey {
            direction: Direction::Outbound,
            port,
            subset: subset.map(str::to_string),
            host: host.to_string(),
        };
        if let Some(c) = self.clusters.get(&key) {
            return Ok(c.clone());
        }
        let svc = self.services.get(host).ok_or_else(|| format!("host {host} is not defined by any ServiceEntry"))?;
        let svc_port = svc
            .ports
            .iter()
            .find(|p| p.number == u32::from(port))
            .ok_or_else(|| format!("service {host} has no port {port}"))?;
        let protocol = port_protocol(svc_port);
        if !is_http_protocol(protocol) {
            return Err(format!("port {port} of {host} is {protocol}; remora routes HTTP, HTTP2 and GRPC ports"));
        }
        let dr = self.drs.get(host);
        let subset_def = match subset {
            None => None,
            Some(name) => match dr.and_then(|d| d.subsets.iter().find(|s| s.name == name)) {
                Some(s) => Some(s),
                None => {
                    return Err(match dr {
                        Some(d) => format!(
                            "subset {name} is not defined by DestinationRule {}/{} for {host}",
                            d.namespace, d.name
                        ),
                        None => format!("subset {name} needs a DestinationRule for {host}, and there is none"),
                    });
                }
            },
        };
        let policy = effective_policy(
            dr.and_then(|d| d.policy.as_ref()),
            subset_def.and_then(|s| s.traffic_policy.as_ref()),
            port,
        );
        let selector = subset_def.map(|s| s.labels.clone()).unwrap_or_default();
        let mut settings = PoolSettings {
            protocol: if protocol == "HTTP" { Protocol::Http1 } else { Protocol::Http2 },
            ..PoolSettings::default()
        };
        apply_pool_policy(&mut settings, policy.connection_pool.as_ref());
        let lb = lb_policy(policy.load_balancer.as_ref());
        let outlier = outlier_config(policy.outlier_detection.as_ref());
        let target_port = |ep: &model::WorkloadEntry| -> u16 {
            let p = ep.ports.get(&svc_port.name).copied().or(svc_port.target_port).unwrap_or(svc_port.number);
            u16::try_from(p).unwrap_or(port)
        };
        let (discovery, endpoints) = match svc.resolution.as_str() {
            "STATIC" => {
                let eps = svc
                    .endpoints
                    .iter()
                    .filter_map(|ep| {
                        let ip: IpAddr = ep.address.parse().ok()?;
                        Some(EndpointSpec {
                            addr: SocketAddr::new(ip, target_port(ep)),
                            weight: ep.weight.unwrap_or(1),
                            labels: ep.labels.clone(),
                        })
                    })
                    .collect();
                (Discovery::Static, eps)
            }
            _ => {
                // DNS (and NONE, which in explicit-listener mode has no original
                // destination to use): resolve endpoint names, or the host itself.
                let targets: Vec<DnsTarget> = if svc.endpoints.is_empty() {
                    if svc.host.starts_with('*') {
                        Vec::new()
                    } else {
                        vec![DnsTarget {
                            name: svc.host.clone(),
                            port: u16::try_from(svc_port.target_port.unwrap_or(svc_port.number)).unwrap_or(port),
                            weight: 1,
                            labels: BTreeMap::new(),
                        }]
                    }
                } else {
                    svc.endpoints
                        .iter()
                        .map(|ep| DnsTarget {
                            name: ep.address.clone(),
                            port: target_port(ep),
                            weight: ep.weight.unwrap_or(1),
                            labels: ep.labels.clone(),
                        })
                        .collect()
                };
                (Discovery::Dns { targets, refresh: dns::DEFAULT_REFRESH }, Vec::new())
            }
        };
        let policy_json = json!({
            "loadBalancer": format!("{:?}", lb),
            "connectTimeoutMs": settings.connect_timeout.as_millis() as u64,
            "idleTimeoutMs": settings.idle_timeout.as_millis() as u64,
            "subsetLabels": selector,
            "destinationRule": dr.map(|d| format!("{}/{}", d.namespace, d.name)),
        });
        let dr_res = dr.map(|d| d.res.clone());
        let tls =
            self.upstream_tls(policy.tls.as_ref(), &key, svc.subject_alt_names.clone(), &endpoints, &svc.endpoints)?;
        let cluster = self.registry.build(ClusterSpec {
            key: key.clone(),
            lb,
            settings,
            outlier,
            tls,
            discovery,
            selector,
            endpoints,
            policy_json,
        });
        // The "fewer than 10 hosts never eject" trap: Envoy's strict rule
        // allows an ejection only if 100·(ejected+1)/hosts ≤ maxEjectionPercent.
        let hosts = cluster.endpoints().len();
        if let (Some(cfg), Some(res)) = (outlier, dr_res)
            && matches!(cluster.discovery, Discovery::Static)
            && hosts > 0
            && !cfg.can_eject_any(hosts)
        {
            let need = 100usize.div_ceil(hosts);
            self.diags.push(res.warning(
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                format!(
                    "cluster {} has {hosts} endpoint(s) and maxEjectionPercent {}: no endpoint can ever be ejected (100·(ejected+1)/hosts must stay ≤ maxEjectionPercent); set it to at least {need}",
                    cluster.name, cfg.max_ejection_percent
                ),
            ));
        }
        self.clusters.insert(key, cluster.clone());
        Ok(cluster)
    }

    /// The upstream TLS of a cluster: the DestinationRule's `tls`, or
    /// auto-mTLS for endpoints labelled `security.istio.io/tlsMode: istio`.
    fn upstream_tls(
        &self,
        tls: Option<&model::ClientTlsSettings>,
        key: &ClusterKey,
        service_sans: Vec<String>,
        endpoints: &[EndpointSpec],
        entries: &[model::WorkloadEntry],
    ) -> Result<UpstreamTls, String> {
        let mesh = |only: Option<Vec<SocketAddr>>, sans: &[String]| UpstreamTls::IstioMutual {
            sni: format!("outbound_.{}_.{}_.{}", key.port, key.subset.as_deref().unwrap_or(""), key.host),
            expected: sans.to_vec(),
            trust_domain: self.opts.trust_domain().to_string(),
            only,
        };
        match tls.and_then(|t| t.mode.as_deref()) {
            Some("ISTIO_MUTUAL") => {
                if !self.opts.has_identity() {
                    return Err(format!(
                        "tls mode ISTIO_MUTUAL to {} needs the workload identity: start remora with --identity-dir",
                        key.host
                    ));
                }
                let sans = tls.map(|t| t.subject_alt_names.clone()).filter(|s| !s.is_empty()).unwrap_or(service_sans);
                Ok(mesh(None, &sans))
            }
            Some(mode @ ("SIMPLE" | "MUTUAL")) => {
                let t = tls.cloned().unwrap_or_default();
                let spec = crate::tls::OriginateTls {
                    server_name: t.sni.clone().unwrap_or_else(|| key.host.clone()),
                    ca: t.ca_certificates.clone().map(std::path::PathBuf::from),
                    sans: if t.subject_alt_names.is_empty() { service_sans } else { t.subject_alt_names.clone() },
                    insecure: t.insecure_skip_verify.unwrap_or(false),
                    client: match (mode, &t.client_certificate, &t.private_key) {
                        ("MUTUAL", Some(c), Some(k)) => Some((c.into(), k.into())),
                        _ => None,
                    },
                    h2: false,
                };
                // Read the files now: a broken certificate rejects the config.
                spec.client_config().map_err(|e| format!("tls for {}: {e}", key.host))?;
                Ok(UpstreamTls::Originate(spec))
            }
            Some(_) => Ok(UpstreamTls::Plain),
            None => {
                // Auto-mTLS: Istio's injection labels meshed endpoints.
                let meshed =
                    |labels: &BTreeMap<String, String>| labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio");
                if !entries.iter().any(|e| meshed(&e.labels)) {
                    return Ok(UpstreamTls::Plain);
                }
                if !self.opts.has_identity() {
                    tracing::debug!(host = %key.host, "endpoints ask for mTLS, but there is no workload identity; using plaintext");
                    return Ok(UpstreamTls::Plain);
                }
                let only: Vec<SocketAddr> = endpoints.iter().filter(|e| meshed(&e.labels)).map(|e| e.addr).collect();
                let all = only.len() == endpoints.len();
                Ok(mesh(if all { None } else { Some(only) }, &service_sans))
            }
        }
    }

    // === listeners ===

    fn build_listeners(&mut self, resources: &[Resource]) -> (Vec<Listener>, Option<Capture>) {
        let mut listeners: Vec<Listener> = Vec::new();
        self.build_gateways(resources, &mut listeners);
        self.build_sidecar(resources, &mut listeners);
        let capture = self.build_capture(resources, &mut listeners);
        listeners.sort_by_key(|l| l.addr);
        (listeners, capture)
    }

    /// The capture listeners and what they serve: a route table for each
    /// port of a visible HTTP service (outbound), and the `Sidecar` ingress
    /// entries or the app on the same port (inbound).
    fn build_capture(&mut self, resources: &[Resource], out: &mut Vec<Listener>) -> Option<Capture> {
        let ports = self.opts.capture?;
        for (port, kind) in
            [(ports.outbound, ListenerKind::CaptureOutbound), (ports.inbound, ListenerKind::CaptureInbound)]
        {
            let addr = SocketAddr::new(DEFAULT_PUBLIC_BIND, port);
            out.push(Listener {
                name: format!("{} {addr}", kind.as_str()),
                addr,
                kind,
                routes: RouteTable::new(Fallback::NotFound),
                tls: InboundTls::Disable,
                gateway_tls: None,
                authz: Arc::new(crate::authz::Policies::empty()),
                authz_port: port,
            });
        }
        let parts = std::mem::take(&mut self.capture);
        let fallback = parts.fallback.unwrap_or(Fallback::Passthrough);
        let all = vec!["*/*".to_string()];
        let default_hosts = parts.egress_hosts.get(&None).cloned().unwrap_or(all);
        // Every port some service serves HTTP on, plus the Sidecar's own.
        let mut http_ports: Vec<u16> = self
            .services
            .values()
            .flat_map(|s| s.ports.iter())
            .filter(|p| is_http_protocol(port_protocol(p)))
            .filter_map(|p| u16::try_from(p.number).ok())
            .chain(parts.egress_hosts.keys().filter_map(|p| *p))
            .collect();
        http_ports.sort_unstable();
        http_ports.dedup();
        let mut outbound = HashMap::new();
        for port in http_ports {
            let hosts = parts.egress_hosts.get(&Some(port)).unwrap_or(&default_hosts).clone();
            let table = self.egress_table(resources, &hosts, port, fallback, None);
            outbound.insert(port, Arc::new(capture_egress_listener(port, table)));
        }
        let outbound_default = Arc::new(capture_egress_listener(0, RouteTable::new(fallback)));
        // Inbound: the Sidecar's ingress entries, else the app on the same port.
        let inbound: HashMap<u16, Arc<Listener>> = parts.inbound.into_iter().map(|(p, l)| (p, Arc::new(l))).collect();
        let inbound_default = Arc::new(Listener {
            name: "capture-inbound passthrough".into(),
            addr: SocketAddr::new(DEFAULT_PUBLIC_BIND, ports.inbound),
            kind: ListenerKind::SidecarIngress,
            routes: RouteTable::new(Fallback::InboundPassthrough),
            tls: self.inbound_tls(resources, 0, None),
            gateway_tls: None,
            authz: self.authz.clone(),
            authz_port: 0,
        });
        let mut inbound_tls_ports = HashMap::new();
        for port in self.port_level_mtls_ports(resources) {
            let mode = self.inbound_tls(resources, port, None);
            inbound_tls_ports.insert(port, mode);
        }
        Some(Capture {
            outbound,
            outbound_default,
            registry_only: fallback == Fallback::BlackHole,
            inbound,
            inbound_default,
            inbound_apps: parts.apps,
            inbound_tls_ports,
            known: self.known_destinations(),
        })
    }

    /// Ports named by `portLevelMtls` of PeerAuthentications for this workload.
    fn port_level_mtls_ports(&self, resources: &[Resource]) -> Vec<u16> {
        let mut ports: Vec<u16> = resources
            .iter()
            .filter(|r| r.namespace == self.opts.namespace)
            .filter_map(|r| match &r.spec {
                Spec::PeerAuthentication(pa) => Some(pa),
                _ => None,
            })
            .filter(|pa| {
                pa.selector.as_ref().is_some_and(|s| labels_match(&s.match_labels, &self.opts.workload_labels))
            })
            .flat_map(|pa| pa.port_level_mtls.keys().filter_map(|k| k.parse().ok()))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Registry addresses a captured connection may be headed for: service
    /// addresses on each service port, and STATIC endpoints on their ports.
    fn known_destinations(&self) -> HashMap<SocketAddr, KnownDestination> {
        let mut known = HashMap::new();
        for svc in self.services.values() {
            for p in &svc.ports {
                let Ok(number) = u16::try_from(p.number) else { continue };
                let info = KnownDestination {
                    host: svc.host.clone(),
                    namespace: svc.namespace.clone(),
                    protocol: declared_protocol(p),
                };
                for ip in &svc.addresses {
                    known.entry(SocketAddr::new(*ip, number)).or_insert_with(|| info.clone());
                }
                if svc.resolution != "STATIC" {
                    continue;
                }
                for ep in &svc.endpoints {
                    let Ok(ip) = ep.address.parse::<IpAddr>() else { continue };
                    let target = ep.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.number);
                    let Ok(target) = u16::try_from(target) else { continue };
                    known.entry(SocketAddr::new(ip, target)).or_insert_with(|| info.clone());
                }
            }
        }
        known
    }

    fn build_gateways(&mut self, resources: &[Resource], out: &mut Vec<Listener>) {
        // Servers grouped by listen address.
        struct Server<'r> {
            gateway: &'r Resource,
            index: usize,
            hosts: Vec<String>,
            tls: Option<&'r model::ServerTlsSettings>,
            https: bool,
        }
        let mut by_addr: BTreeMap<SocketAddr, Vec<Server>> = BTreeMap::new();
        for r in resources {
            let Spec::Gateway(gw) = &r.spec else { continue };
            let standalone = self.opts.workload_labels.is_empty();
            if !standalone && !labels_match(&gw.selector, &self.opts.workload_labels) {
                continue;
            }
            for (i, s) in gw.servers.iter().enumerate() {
                let ip = match &s.bind {
                    Some(b) => match b.parse::<IpAddr>() {
                        Ok(ip) => ip,
                        Err(_) => continue, // validation reported it
                    },
                    None => DEFAULT_PUBLIC_BIND,
                };
                let Ok(port) = u16::try_from(s.port.number) else { continue };
                let https = s.port.protocol.as_deref().is_some_and(|p| p.eq_ignore_ascii_case("HTTPS"));
                by_addr.entry(SocketAddr::new(ip, port)).or_default().push(Server {
                    gateway: r,
                    index: i,
                    hosts: s.hosts.clone(),
                    tls: s.tls.as_ref(),
                    https,
                });
            }
        }
        for (addr, servers) in by_addr {
            let mut table = RouteTable::new(Fallback::NotFound);
            let mut names = Vec::new();
            let https: Vec<&Server> = servers.iter().filter(|s| s.https).collect();
            if !https.is_empty() && https.len() != servers.len() {
                let first = servers[0].gateway;
                self.push(first.error(
                    "spec.servers",
                    format!("port {} mixes HTTPS and plaintext servers; give them different ports", addr.port()),
                ));
                continue;
            }
            let gateway_tls = if https.is_empty() {
                None
            } else {
                let specs = https
                    .iter()
                    .filter_map(|s| s.tls.map(|t| crate::tls::gateway::ServerTls::from_settings(&s.hosts, t)))
                    .collect();
                match crate::tls::gateway::GatewayTls::load(specs) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let path = format!("spec.servers[{}].tls", https[0].index);
                        self.push(https[0].gateway.error(path, e));
                        continue;
                    }
                }
            };
            for server in &servers {
                let gw = server.gateway;
                let gw_ref = format!("{}/{}", gw.namespace, gw.name);
                if !names.contains(&gw_ref) {
                    names.push(gw_ref.clone());
                }
                // `httpsRedirect`: every request to the server's hosts is
                // sent to https instead of being routed.
                if server.tls.and_then(|t| t.https_redirect) == Some(true) && !server.https {
                    let vh = Arc::new(VirtualHost {
                        name: format!("{gw_ref} https redirect"),
                        routes: vec![https_redirect_route()],
                    });
                    for h in &server.hosts {
                        table.add_domain(h.rsplit('/').next().unwrap_or(h), &vh);
                    }
                    continue;
                }
                for vs_res in resources {
                    let Spec::VirtualService(vs) = &vs_res.spec else { continue };
                    let bound = vs.gateways.iter().any(|g| gateway_ref(g, &vs_res.namespace) == gw_ref);
                    if !bound {
                        continue;
                    }
                    let domains = gateway_domains(&vs.hosts, &server.hosts, &vs_res.namespace);
                    if domains.is_empty() {
                        continue;
                    }
                    let vh = self.virtual_host(vs_res, vs, addr.port(), Some(&gw_ref));
                    let Some(vh) = vh else { continue };
                    for d in domains {
                        if !table.add_domain(&d, &vh) {
                            let msg = format!(
                                "host {d} on gateway {gw_ref} port {} is already routed by another VirtualService; this one is ignored for it",
                                addr.port()
                            );
                            self.push(vs_res.warning("spec.hosts", msg));
                        }
                    }
                }
                let _ = server.index;
            }
            out.push(Listener {
                name: format!("gateway {} {addr}", names.join(",")),
                addr,
                kind: ListenerKind::Gateway,
                routes: table,
                tls: InboundTls::Disable,
                gateway_tls,
                authz: self.authz.clone(),
                authz_port: addr.port(),
            });
        }
    }

    /// The Sidecar that applies to this proxy: one with a matching
    /// `workloadSelector` in the proxy's namespace wins over the namespace-wide one.
    fn select_sidecar<'r>(&mut self, resources: &'r [Resource]) -> Option<&'r Resource> {
        let mut with_selector = Vec::new();
        let mut namespace_wide = Vec::new();
        for r in resources {
            let Spec::Sidecar(sc) = &r.spec else { continue };
            if r.namespace != self.opts.namespace {
                continue;
            }
            match &sc.workload_selector {
                Some(sel) if !sel.labels.is_empty() => {
                    if labels_match(&sel.labels, &self.opts.workload_labels) {
                        with_selector.push(r);
                    }
                }
                _ => namespace_wide.push(r),
            }
        }
        for extra in with_selector.iter().skip(1).chain(namespace_wide.iter().skip(1)) {
            self.diags.push(extra.error("spec", "more than one Sidecar applies to this proxy; keep one per workload (and at most one without workloadSelector per namespace)"));
        }
        with_selector.first().or(namespace_wide.first()).copied()
    }

    fn build_sidecar(&mut self, resources: &[Resource], out: &mut Vec<Listener>) {
        let Some(sc_res) = self.select_sidecar(resources) else { return };
        let Spec::Sidecar(sc) = &sc_res.spec else { return };
        let fallback = match sc.outbound_traffic_policy.as_ref().and_then(|p| p.mode.as_deref()) {
            Some("REGISTRY_ONLY") => Fallback::BlackHole,
            _ => Fallback::Passthrough,
        };
        self.capture.fallback = Some(fallback);
        let capture_on = self.opts.capture.is_some();
        let taken: Vec<SocketAddr> = out.iter().map(|l| l.addr).collect();
        for (i, ing) in sc.ingress.iter().enumerate() {
            let path = format!("spec.ingress[{i}]");
            let Ok(port) = u16::try_from(ing.port.number) else { continue };
            // Under capture an ingress entry describes traffic to that port
            // of the pod, which arrives on the inbound capture port; only
            // `captureMode: NONE` asks for a listener of its own.
            let captured = capture_on && ing.capture_mode.as_deref() != Some("NONE");
            let ip = ing.bind.as_deref().and_then(|b| b.parse().ok()).unwrap_or(DEFAULT_PUBLIC_BIND);
            let addr = SocketAddr::new(ip, port);
            let Some(endpoint) = ing.default_endpoint.as_deref().and_then(parse_default_endpoint) else { continue };
            if captured && self.capture.inbound.contains_key(&port) {
                self.push(sc_res.error(path, format!("port {port} has another ingress entry")));
                continue;
            }
            if !captured && (taken.contains(&addr) || out.iter().any(|l| l.addr == addr)) {
                self.push(sc_res.error(path, format!("address {addr} is already used by another listener")));
                continue;
            }
            let protocol = ing.port.protocol.as_deref().unwrap_or("HTTP").to_ascii_uppercase();
            let key = ClusterKey { direction: Direction::Inbound, port, subset: None, host: String::new() };
            let mut settings = PoolSettings {
                protocol: if protocol == "HTTP" { Protocol::Http1 } else { Protocol::Http2 },
                ..PoolSettings::default()
            };
            if captured && endpoint.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
                settings.source = Some(IpAddr::V4(INBOUND_SOURCE));
            }
            apply_pool_policy(&mut settings, ing.connection_pool.as_ref().or(sc.inbound_connection_pool.as_ref()));
            let cluster = self.registry.build(ClusterSpec {
                key: key.clone(),
                lb: LbPolicy::RoundRobin,
                settings,
                outlier: None,
                tls: UpstreamTls::Plain,
                discovery: Discovery::Static,
                selector: BTreeMap::new(),
                endpoints: vec![EndpointSpec { addr: endpoint, weight: 1, labels: BTreeMap::new() }],
                policy_json: json!({"defaultEndpoint": endpoint.to_string()}),
            });
            self.clusters.insert(key, cluster.clone());
            let vh = Arc::new(VirtualHost { name: format!("inbound|{port}"), routes: vec![route_all_to(cluster)] });
            let mut table = RouteTable::new(Fallback::NotFound);
            table.add_domain("*", &vh);
            let tls = self.inbound_tls(resources, endpoint.port(), Some((sc_res, &path)));
            let listener = Listener {
                name: format!("sidecar-ingress {}/{} {addr}", sc_res.namespace, sc_res.name),
                addr,
                kind: ListenerKind::SidecarIngress,
                routes: table,
                tls,
                gateway_tls: None,
                authz: self.authz.clone(),
                authz_port: endpoint.port(),
            };
            if captured {
                self.capture.apps.insert(port, endpoint);
                self.capture
                    .inbound
                    .insert(port, Listener { name: format!("capture-inbound port {port} -> {endpoint}"), ..listener });
            } else {
                out.push(listener);
            }
        }
        for (i, eg) in sc.egress.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            let port = eg.port.as_ref().and_then(|p| u16::try_from(p.number).ok()).filter(|p| *p != 0);
            // Under capture, an entry without `bind` scopes the services the
            // app reaches through the outbound capture port (on its port, or
            // on every other port when it names none).
            if capture_on && eg.bind.is_none() && eg.capture_mode.as_deref() != Some("NONE") {
                if self.capture.egress_hosts.insert(port, eg.hosts.clone()).is_some() {
                    self.push(sc_res.error(path, "another egress entry already covers this port"));
                }
                continue;
            }
            let Some(port) = port else {
                self.push(sc_res.warning(
                    path,
                    "an egress entry without `port` scopes captured traffic; without --capture it opens no listener",
                ));
                continue;
            };
            let ip = eg.bind.as_deref().and_then(|b| b.parse().ok()).unwrap_or(DEFAULT_EGRESS_BIND);
            let addr = SocketAddr::new(ip, port);
            if out.iter().any(|l| l.addr == addr) {
                self.push(sc_res.error(path, format!("address {addr} is already used by another listener")));
                continue;
            }
            let table = self.egress_table(resources, &eg.hosts, port, fallback, Some((sc_res, &path)));
            out.push(Listener {
                name: format!("sidecar-egress {}/{} {addr}", sc_res.namespace, sc_res.name),
                addr,
                kind: ListenerKind::SidecarEgress,
                routes: table,
                tls: InboundTls::Disable,
                gateway_tls: None,
                authz: Arc::new(crate::authz::Policies::empty()),
                authz_port: port,
            });
        }
    }

    /// The mTLS mode for inbound traffic to the app's `app_port`, from
    /// PeerAuthentication: the most specific policy wins (workload selector,
    /// then namespace-wide, then mesh-wide in `istio-system`), a port-level
    /// mode overrides its policy's mode, `UNSET` inherits, and with no policy
    /// at all Istio's default is PERMISSIVE.
    fn inbound_tls(&mut self, resources: &[Resource], app_port: u16, origin: Option<(&Resource, &str)>) -> InboundTls {
        let mut workload: Option<&Resource> = None;
        let mut namespace: Option<&Resource> = None;
        let mut mesh: Option<&Resource> = None;
        for r in resources {
            let Spec::PeerAuthentication(pa) = &r.spec else { continue };
            let selector = pa.selector.as_ref().map(|s| &s.match_labels).filter(|l| !l.is_empty());
            match selector {
                Some(sel)
                    if r.namespace == self.opts.namespace
                        && labels_match(sel, &self.opts.workload_labels)
                        && workload.is_none() =>
                {
                    workload = Some(r);
                }
                None if r.namespace == self.opts.namespace => namespace = namespace.or(Some(r)),
                None if r.namespace == ROOT_NAMESPACE => mesh = mesh.or(Some(r)),
                _ => {}
            }
        }
        fn mode_of(m: Option<&model::PeerMtls>) -> Option<&str> {
            m.and_then(|m| m.mode.as_deref()).filter(|m| *m != "UNSET")
        }
        let mut chosen: Option<(&str, &Resource)> = None;
        if let Some(r) = workload
            && let Spec::PeerAuthentication(pa) = &r.spec
        {
            let port_level = mode_of(pa.port_level_mtls.get(&app_port.to_string()));
            chosen = port_level.or(mode_of(pa.mtls.as_ref())).map(|m| (m, r));
        }
        for r in [namespace, mesh].into_iter().flatten() {
            if chosen.is_some() {
                break;
            }
            if let Spec::PeerAuthentication(pa) = &r.spec {
                chosen = mode_of(pa.mtls.as_ref()).map(|m| (m, r));
            }
        }
        let mode = match chosen.map(|(m, _)| m) {
            Some("STRICT") => InboundTls::Strict,
            Some("DISABLE") => InboundTls::Disable,
            _ => InboundTls::Permissive,
        };
        if !self.opts.has_identity() {
            if mode == InboundTls::Strict {
                let msg = format!(
                    "STRICT mTLS on the app port {app_port} needs the workload identity: start remora with --identity-dir"
                );
                match (chosen, origin) {
                    (Some((_, r)), _) => self.diags.push(r.error("spec.mtls.mode", msg)),
                    (None, Some((sc, path))) => self.diags.push(sc.error(path.to_string(), msg)),
                    (None, None) => {}
                }
            }
            // Without an identity PERMISSIVE can only ever see plaintext.
            return InboundTls::Disable;
        }
        mode
    }

    /// The outbound route table for one egress port: every visible service with
    /// that port, routed by its mesh VirtualService or by Istio's default route.
    fn egress_table(
        &mut self,
        resources: &[Resource],
        hosts: &[String],
        port: u16,
        fallback: Fallback,
        origin: Option<(&Resource, &str)>,
    ) -> RouteTable {
        let mut table = RouteTable::new(fallback);
        let scope_ns = origin.map(|(sc, _)| sc.namespace.clone()).unwrap_or_else(|| self.opts.namespace.clone());
        let visible = |host: &str, ns: &str| hosts.iter().any(|h| egress_host_visible(h, host, ns, &scope_ns));
        // Mesh VirtualServices by host; the first one for a host wins.
        let mut vs_by_host: BTreeMap<String, &Resource> = BTreeMap::new();
        for r in resources {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            if !(vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")) {
                continue;
            }
            for h in &vs.hosts {
                let host = expand_host(h, &r.namespace);
                if let Some(prev) = vs_by_host.get(&host) {
                    if prev.source != r.source {
                        let msg = format!(
                            "host {host} is already routed by {}; Istio does not merge VirtualServices for sidecars, so this one is ignored for it",
                            prev.display_name()
                        );
                        self.diags.push(r.warning("spec.hosts", msg));
                    }
                    continue;
                }
                vs_by_host.insert(host, r);
            }
        }
        let service_hosts: Vec<(String, String, Vec<IpAddr>)> = self
            .services
            .values()
            .filter(|s| s.ports.iter().any(|p| p.number == u32::from(port) && is_http_protocol(port_protocol(p))))
            .map(|s| (s.host.clone(), s.namespace.clone(), s.addresses.clone()))
            .collect();
        let mut built: HashMap<String, Arc<VirtualHost>> = HashMap::new();
        for (host, ns, addresses) in &service_hosts {
            if !visible(host, ns) {
                continue;
            }
            let vh = match vs_by_host.get(host) {
                Some(vs_res) => {
                    let Spec::VirtualService(vs) = &vs_res.spec else { continue };
                    let key = vs_res.display_name();
                    match built.get(&key) {
                        Some(vh) => Some(vh.clone()),
                        None => {
                            let vh = self.virtual_host(vs_res, vs, port, None);
                            if let Some(vh) = &vh {
                                built.insert(key, vh.clone());
                            }
                            vh
                        }
                    }
                }
                None => None,
            };
            let vh = match vh {
                Some(vh) => vh,
                None => match self.default_virtual_host(host, port) {
                    Ok(vh) => vh,
                    Err(e) => {
                        match origin {
                            Some((sc, path)) => self.diags.push(sc.error(path.to_string(), e)),
                            None => tracing::warn!(%host, port, error = %e, "service not routed on the capture port"),
                        }
                        continue;
                    }
                },
            };
            for alias in host_aliases(host, &self.opts.namespace) {
                table.add_domain(&alias, &vh);
            }
            // A request to the service's address (a ClusterIP) names it in Host.
            for ip in addresses {
                let domain = match ip {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                table.add_domain(&domain, &vh);
            }
        }
        // VirtualService hosts that are not services (external names routed to
        // services) are served on every egress port.
        for (host, vs_res) in &vs_by_host {
            if self.services.contains_key(host) || !visible(host, &vs_res.namespace) {
                continue;
            }
            let Spec::VirtualService(vs) = &vs_res.spec else { continue };
            let key = vs_res.display_name();
            let vh = match built.get(&key) {
                Some(vh) => Some(vh.clone()),
                None => self.virtual_host(vs_res, vs, port, None),
            };
            if let Some(vh) = vh {
                built.insert(key, vh.clone());
                for alias in host_aliases(host, &self.opts.namespace) {
                    table.add_domain(&alias, &vh);
                }
            }
        }
        table
    }

    /// Istio's route for a host with no VirtualService: everything to the service.
    fn default_virtual_host(&mut self, host: &str, port: u16) -> Result<Arc<VirtualHost>, String> {
        let cluster = self.cluster(host, None, port)?;
        Ok(Arc::new(VirtualHost { name: host.to_string(), routes: vec![route_all_to(cluster)] }))
    }

    /// Compiles a VirtualService's HTTP routes for one listener port. `gateway`
    /// is the gateway it is being bound to, or `None` for sidecars (`mesh`).
    /// Returns `None` when no route applies to this proxy and port.
    fn virtual_host(
        &mut self,
        r: &Resource,
        vs: &model::VirtualService,
        port: u16,
        gateway: Option<&str>,
    ) -> Option<Arc<VirtualHost>> {
        let mut routes = Vec::new();
        let mut catch_all_at: Option<usize> = None;
        for (i, http) in vs.http.iter().enumerate() {
            let path = format!("spec.http[{i}]");
            if let Some(at) = catch_all_at {
                self.diags
                    .push(r.warning(path, format!("unreachable: spec.http[{at}] before it matches every request")));
                continue;
            }
            let blocks: Vec<(usize, Option<&model::HttpMatchRequest>)> = if http.matches.is_empty() {
                vec![(0, None)]
            } else {
                http.matches.iter().enumerate().map(|(j, m)| (j, Some(m))).collect()
            };
            let mut compiled_any = false;
            for (j, m) in blocks {
                if let Some(m) = m
                    && !self.match_applies(m, &r.namespace, port, gateway)
                {
                    continue;
                }
                let mpath = format!("{path}.match[{j}]");
                let matcher = match m {
                    None => RouteMatch::default(),
                    Some(m) => match compile_match(m) {
                        Ok(x) => x,
                        Err(e) => {
                            self.diags.push(r.error(mpath, e));
                            continue;
                        }
                    },
                };
                let is_catch_all = matcher_is_catch_all(&matcher);
                let name = route_name(http, m, &r.name);
                match self.compile_route(r, http, &path, matcher, name, port) {
                    Ok(route) => {
                        routes.push(route);
                        compiled_any = true;
                    }
                    Err(()) => continue,
                }
                if is_catch_all {
                    catch_all_at = Some(i);
                    break;
                }
            }
            let _ = compiled_any;
        }
        if routes.is_empty() {
            return None;
        }
        Some(Arc::new(VirtualHost { name: format!("{}/{}", r.namespace, r.name), routes }))
    }

    /// Istio drops match blocks at config-build time when their `port`,
    /// `sourceLabels`, `sourceNamespace` or `gateways` exclude this proxy.
    fn match_applies(&self, m: &model::HttpMatchRequest, _vs_ns: &str, port: u16, gateway: Option<&str>) -> bool {
        if let Some(p) = m.port
            && p != u32::from(port)
        {
            return false;
        }
        if !m.source_labels.is_empty() && !labels_match(&m.source_labels, &self.opts.workload_labels) {
            return false;
        }
        if let Some(ns) = &m.source_namespace
            && *ns != self.opts.namespace
        {
            return false;
        }
        if !m.gateways.is_empty() {
            let here = gateway.unwrap_or("mesh");
            if !m.gateways.iter().any(|g| if g == "mesh" { here == "mesh" } else { gateway_ref(g, _vs_ns) == here }) {
                return false;
            }
        }
        true
    }

    fn compile_route(
        &mut self,
        r: &Resource,
        http: &model::HttpRoute,
        path: &str,
        matcher: RouteMatch,
        name: String,
        port: u16,
    ) -> Result<Route, ()> {
        let mut ok = true;
        let action = if let Some(d) = &http.direct_response {
            let body = match &d.body {
                Some(model::HttpBody { string: Some(s), .. }) => Bytes::from(s.clone()),
                Some(model::HttpBody { bytes: Some(b), .. }) => match decode_base64(b) {
                    Some(v) => Bytes::from(v),
                    None => Bytes::new(),
                },
                _ => Bytes::new(),
            };
            let status = StatusCode::from_u16(u16::try_from(d.status).unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Action::Direct(DirectResponse { status, body })
        } else if let Some(rd) = &http.redirect {
            let port_mode = match (rd.port, rd.derive_port.as_deref()) {
                (Some(p), _) => RedirectPort::Fixed(u16::try_from(p).unwrap_or(80)),
                (None, Some("FROM_PROTOCOL_DEFAULT")) => RedirectPort::ProtocolDefault,
                (None, Some("FROM_REQUEST_PORT")) => RedirectPort::RequestPort,
                _ => RedirectPort::Keep,
            };
            let code = rd
                .redirect_code
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY);
            Action::Redirect(Redirect {
                uri: rd.uri.clone(),
                prefix_rewrite: rd.prefix_rewrite.clone(),
                authority: rd.authority.clone(),
                scheme: rd.scheme.clone(),
                port: port_mode,
                code,
            })
        } else {
            // Istio: one destination takes all traffic whatever its weight;
            // with several, weight-0 destinations get nothing.
            let several = http.route.len() > 1;
            let mut dests = Vec::new();
            for (k, d) in http.route.iter().enumerate() {
                let dpath = format!("{path}.route[{k}]");
                let weight = if several { d.weight.unwrap_or(0).max(0) as u32 } else { 100 };
                if several && weight == 0 {
                    continue;
                }
                let host = expand_host(&d.destination.host, &r.namespace);
                let dport = match self.destination_port(&host, d.destination.port.as_ref().map(|p| p.number), port) {
                    Ok(p) => p,
                    Err(e) => {
                        self.diags.push(r.error(format!("{dpath}.destination"), e));
                        ok = false;
                        continue;
                    }
                };
                let cluster = match self.cluster(&host, d.destination.subset.as_deref(), dport) {
                    Ok(c) => c,
                    Err(e) => {
                        self.diags.push(r.error(format!("{dpath}.destination"), e));
                        ok = false;
                        continue;
                    }
                };
                let (req_ops, resp_ops) = match header_ops(d.headers.as_ref()) {
                    Ok(x) => x,
                    Err(e) => {
                        self.diags.push(r.error(format!("{dpath}.headers"), e));
                        ok = false;
                        continue;
                    }
                };
                dests.push(WeightedCluster::new(cluster, weight, req_ops, resp_ops));
            }
            if dests.is_empty() {
                if ok {
                    self.diags.push(r.error(format!("{path}.route"), "no destination receives traffic"));
                }
                return Err(());
            }
            Action::Forward(Forward::new(dests))
        };
        let (request_headers, response_headers) = match header_ops(http.headers.as_ref()) {
            Ok(x) => x,
            Err(e) => {
                self.diags.push(r.error(format!("{path}.headers"), e));
                return Err(());
            }
        };
        let rewrite = match &http.rewrite {
            None => None,
            Some(rw) => {
                let uri = match (&rw.uri, &rw.uri_regex_rewrite) {
                    (Some(u), _) => Some(UriRewrite::Prefix(u.clone())),
                    (None, Some(rr)) => match regex::RegexBuilder::new(&rr.match_)
                        .size_limit(crate::route::matcher::REGEX_SIZE_LIMIT)
                        .build()
                    {
                        Ok(pattern) => Some(UriRewrite::Regex { pattern, replacement: re2_replacement(&rr.rewrite) }),
                        Err(e) => {
                            self.diags.push(
                                r.error(format!("{path}.rewrite.uriRegexRewrite.match"), format!("invalid regex: {e}")),
                            );
                            return Err(());
                        }
                    },
                    (None, None) => None,
                };
                let authority = match rw.authority.as_deref().map(HeaderValue::from_str) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(_)) => {
                        self.diags.push(r.error(format!("{path}.rewrite.authority"), "not a valid authority"));
                        return Err(());
                    }
                    None => None,
                };
                Some(Rewrite { uri, authority })
            }
        };
        let fault = http.fault.as_ref().map(|f| Fault {
            delay: f.delay.as_ref().and_then(|d| {
                d.fixed_delay.map(|fd| FaultDelay { delay: fd.0, percent: percent_of(d.percentage, d.percent) })
            }),
            abort: f.abort.as_ref().and_then(|a| {
                let percent = percent_of(a.percentage, a.percent);
                let kind = match (&a.http_status, &a.grpc_status) {
                    (Some(s), _) => AbortKind::Http(StatusCode::from_u16(u16::try_from(*s).ok()?).ok()?),
                    (None, Some(g)) => AbortKind::Grpc(grpc_status_code(g)?),
                    _ => return None,
                };
                Some(FaultAbort { kind, percent })
            }),
        });
        let timeout = http.timeout.map(|t| t.0).filter(|t| !t.is_zero());
        let consistent_hash = match &action {
            Action::Forward(f) => {
                f.destinations.iter().any(|d| matches!(d.cluster.lb, LbPolicy::ConsistentHash { .. }))
            }
            _ => false,
        };
        let retry = RetryPolicy::from_config(http.retries.as_ref(), consistent_hash);
        let mut mirrors = Vec::new();
        let mirror_list: Vec<(String, &model::Destination, f64)> = match &http.mirror {
            Some(m) => {
                let percent = match (http.mirror_percentage, http.mirror_percent) {
                    (Some(p), _) => p.value,
                    (None, Some(p)) => p as f64,
                    // Istio: an absent percentage mirrors everything.
                    (None, None) => 100.0,
                };
                vec![(format!("{path}.mirror"), m, percent)]
            }
            None => http
                .mirrors
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        format!("{path}.mirrors[{i}].destination"),
                        &m.destination,
                        m.percentage.map(|p| p.value).unwrap_or(100.0),
                    )
                })
                .collect(),
        };
        for (mpath, dest, percent) in mirror_list {
            let host = expand_host(&dest.host, &r.namespace);
            let cluster = self
                .destination_port(&host, dest.port.as_ref().map(|p| p.number), port)
                .and_then(|p| self.cluster(&host, dest.subset.as_deref(), p));
            match cluster {
                Ok(cluster) if percent > 0.0 => mirrors.push(Mirror { cluster, percent }),
                Ok(_) => {}
                Err(e) => {
                    self.diags.push(r.error(mpath, e));
                    ok = false;
                }
            }
        }
        if !ok {
            return Err(());
        }
        Ok(Route { name, matcher, action, request_headers, response_headers, rewrite, timeout, fault, retry, mirrors })
    }

    /// Which service port a destination means: the explicit one, else the only
    /// port, else the listener's port if the service has it.
    fn destination_port(&self, host: &str, explicit: Option<u32>, listener_port: u16) -> Result<u16, String> {
        let svc = self.services.get(host).ok_or_else(|| format!("host {host} is not defined by any ServiceEntry"))?;
        if let Some(p) = explicit {
            return u16::try_from(p).map_err(|_| format!("port {p} is out of range"));
        }
        let http_ports: Vec<&model::ServicePort> =
            svc.ports.iter().filter(|p| is_http_protocol(port_protocol(p))).collect();
        match http_ports.as_slice() {
            [one] => u16::try_from(one.number).map_err(|_| "port out of range".to_string()),
            [] => Err(format!("service {host} has no HTTP port")),
            many => {
                if many.iter().any(|p| p.number == u32::from(listener_port)) {
                    Ok(listener_port)
                } else {
                    Err(format!("service {host} has several ports; set destination.port.number"))
                }
            }
        }
    }
}

/// Envoy's `require_tls: ALL`: a 301 to the same host and path over https.
fn https_redirect_route() -> Route {
    Route {
        name: "https-redirect".into(),
        matcher: RouteMatch::default(),
        action: Action::Redirect(Redirect {
            uri: None,
            prefix_rewrite: None,
            authority: None,
            scheme: Some("https".into()),
            port: RedirectPort::ProtocolDefault,
            code: StatusCode::MOVED_PERMANENTLY,
        }),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout: None,
        fault: None,
        retry: None,
        mirrors: Vec::new(),
    }
}

/// Istio's default route: every request to `cluster`, with the mesh's
/// default retry policy and no timeout.
fn route_all_to(cluster: Arc<crate::upstream::Cluster>) -> Route {
    Route {
        name: "default".into(),
        matcher: RouteMatch::default(),
        action: Action::Forward(Forward::new(vec![WeightedCluster::new(
            cluster,
            100,
            HeaderOps::default(),
            HeaderOps::default(),
        )])),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout: None,
        fault: None,
        retry: Some(RetryPolicy::istio_default()),
        mirrors: Vec::new(),
    }
}

/// Envoy-style `\1` references → the regex crate's `${1}`.
fn re2_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn route_name(http: &model::HttpRoute, m: Option<&model::HttpMatchRequest>, vs_name: &str) -> String {
    let base = http.name.clone().unwrap_or_else(|| vs_name.to_string());
    match m.and_then(|m| m.name.as_deref()) {
        Some(n) => format!("{base}.{n}"),
        None => base,
    }
}

fn matcher_is_catch_all(m: &RouteMatch) -> bool {
    let path_all = match &m.path {
        PathMatch::Any => true,
        PathMatch::Prefix { value, .. } => value.is_empty() || value == "/",
        _ => false,
    };
    path_all
        && m.method.is_none()
        && m.authority.is_none()
        && m.scheme.is_none()
        && m.headers.is_empty()
        && m.query.is_empty()
}

fn string_matcher(m: &model::StringMatch) -> Result<StringMatcher, String> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Ok(StringMatcher::Exact(e.clone())),
        (None, Some(p), None) => Ok(StringMatcher::Prefix(p.clone())),
        // Envoy treats `regex: "*"` as a presence match (Istio's translation).
        (None, None, Some(r)) if r == "*" => Ok(StringMatcher::Present),
        (None, None, Some(r)) => anchored_regex(r).map(StringMatcher::Regex).map_err(|e| format!("invalid regex: {e}")),
        (None, None, None) => Ok(StringMatcher::Present),
        _ => Err("set only one of exact, prefix and regex".into()),
    }
}

fn compile_match(m: &model::HttpMatchRequest) -> Result<RouteMatch, String> {
    let ignore_case = m.ignore_uri_case.unwrap_or(false);
    let path = match &m.uri {
        None => PathMatch::Any,
        Some(u) => match (&u.exact, &u.prefix, &u.regex) {
            (Some(e), None, None) => PathMatch::Exact { value: e.clone(), ignore_case },
            (None, Some(p), None) => PathMatch::Prefix { value: p.clone(), ignore_case },
            (None, None, Some(r)) => {
                PathMatch::Regex(anchored_regex(r).map_err(|e| format!("uri: invalid regex: {e}"))?)
            }
            _ => return Err("uri: set exactly one of exact, prefix and regex".into()),
        },
    };
    let opt = |x: &Option<model::StringMatch>| -> Result<Option<StringMatcher>, String> {
        x.as_ref().map(string_matcher).transpose()
    };
    let method = opt(&m.method)?;
    let authority = opt(&m.authority)?;
    let scheme = opt(&m.scheme)?;
    let mut headers = Vec::new();
    for (invert, map) in [(false, &m.headers), (true, &m.without_headers)] {
        for (k, v) in map {
            // Istio ignores pseudo-header names here; they have their own fields.
            if matches!(k.as_str(), "uri" | "scheme" | "method" | "authority") {
                continue;
            }
            let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("headers: invalid header name {k}"))?;
            headers.push(HeaderCondition { name, matcher: string_matcher(v)?, invert });
        }
    }
    let mut query = Vec::new();
    for (k, v) in &m.query_params {
        query.push(QueryCondition { name: k.clone(), matcher: string_matcher(v)? });
    }
    Ok(RouteMatch { path, method, authority, scheme, headers, query })
}

fn header_ops(h: Option<&model::Headers>) -> Result<(HeaderOps, HeaderOps), String> {
    let Some(h) = h else { return Ok((HeaderOps::default(), HeaderOps::default())) };
    Ok((ops(h.request.as_ref(), true)?, ops(h.response.as_ref(), false)?))
}

fn ops(o: Option<&model::HeaderOperations>, request: bool) -> Result<HeaderOps, String> {
    let mut out = HeaderOps::default();
    let Some(o) = o else { return Ok(out) };
    let name = |k: &str| {
        HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|_| format!("invalid header name {k}"))
    };
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| format!("invalid header value {v:?}"));
    for k in &o.remove {
        if k.starts_with(':') || k.eq_ignore_ascii_case("host") {
            continue;
        }
        out.remove.push(name(k)?);
    }
    for (set, map) in [(true, &o.set), (false, &o.add)] {
        for (k, v) in map {
            let lk = k.to_ascii_lowercase();
            if request && (lk == ":authority" || lk == "host") {
                out.authority = Some(value(v)?);
                continue;
            }
            if lk.starts_with(':') {
                continue;
            }
            let pair = (name(k)?, value(v)?);
            if set { out.set.push(pair) } else { out.add.push(pair) }
        }
    }
    Ok(out)
}

/// `gateways` entries are `name` (the VirtualService's namespace) or `ns/name`.
fn gateway_ref(g: &str, vs_namespace: &str) -> String {
    if g.contains('/') { g.to_string() } else { format!("{vs_namespace}/{g}") }
}

/// Domains a gateway-bound VirtualService serves: each VS host that falls
/// within a server host; the narrower of the two where one is a wildcard.
fn gateway_domains(vs_hosts: &[String], server_hosts: &[String], vs_ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for sh in server_hosts {
        let (ns, pattern) = match sh.split_once('/') {
            Some((ns, h)) => (Some(ns), h),
            None => (None, sh.as_str()),
        };
        if let Some(ns) = ns
            && ns != "*"
            && ns != vs_ns
            && !(ns == "." && vs_ns.is_empty())
        {
            continue;
        }
        for vh in vs_hosts {
            let vh = vh.to_ascii_lowercase();
            let pattern = pattern.to_ascii_lowercase();
            let d = if host_within(&vh, &pattern) {
                Some(vh.clone())
            } else if host_within(&pattern, &vh) {
                Some(pattern.clone())
            } else {
                None
            };
            if let Some(d) = d
                && !out.contains(&d)
            {
                out.push(d);
            }
        }
    }
    out
}

/// Whether `host` (maybe a wildcard) lies within `pattern`.
fn host_within(host: &str, pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return host.ends_with(suffix) && host.len() > suffix.len();
    }
    host == pattern
}

/// Sidecar egress `hosts` entry (`ns/dnsName`, `*/...`, `./...`, `~/...`).
fn egress_host_visible(entry: &str, host: &str, host_ns: &str, sidecar_ns: &str) -> bool {
    let (ns, pattern) = entry.split_once('/').unwrap_or(("*", entry));
    let ns_ok = match ns {
        "*" => true,
        "." => host_ns == sidecar_ns,
        "~" => false,
        other => other == host_ns,
    };
    ns_ok && host_within(host, &pattern.to_ascii_lowercase())
}

/// A captured outbound port's view: its route table as an egress listener.
fn capture_egress_listener(port: u16, routes: RouteTable) -> Listener {
    Listener {
        name: if port == 0 { "capture-outbound other ports".into() } else { format!("capture-outbound port {port}") },
        addr: SocketAddr::new(DEFAULT_PUBLIC_BIND, port),
        kind: ListenerKind::SidecarEgress,
        routes,
        tls: InboundTls::Disable,
        gateway_tls: None,
        authz: Arc::new(crate::authz::Policies::empty()),
        authz_port: port,
    }
}

/// Domains under which a service is reachable from this proxy, as Istio's
/// sidecar route configuration lists them.
fn host_aliases(host: &str, proxy_ns: &str) -> Vec<String> {
    let mut out = vec![host.to_string()];
    if let Some(prefix) = host.strip_suffix(&format!(".{DOMAIN_SUFFIX}")) {
        // prefix = name.ns
        out.push(format!("{prefix}.svc"));
        out.push(prefix.to_string());
        if let Some((name, ns)) = prefix.split_once('.')
            && ns == proxy_ns
        {
            out.push(name.to_string());
        }
    }
    out
}

/// `127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:8080` (the pod IP; loopback here).
fn parse_default_endpoint(s: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = s.parse().ok()?;
    Some(match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    })
}

/// The policy blocks that apply to one cluster, after Istio's layering:
/// port-level settings replace the top level; a subset's blocks replace the
/// corresponding blocks; a subset's port-level entry replaces all four.
#[derive(Debug, Default, Clone)]
struct EffectivePolicy {
    load_balancer: Option<model::LoadBalancerSettings>,
    connection_pool: Option<model::ConnectionPoolSettings>,
    outlier_detection: Option<model::OutlierDetection>,
    tls: Option<model::ClientTlsSettings>,
}

fn layer(policy: Option<&model::TrafficPolicy>, port: u16) -> Option<EffectivePolicy> {
    let p = policy?;
    if let Some(pl) =
        p.port_level_settings.iter().find(|pl| pl.port.as_ref().map(|s| s.number) == Some(u32::from(port)))
    {
        return Some(EffectivePolicy {
            load_balancer: pl.load_balancer.clone(),
            connection_pool: pl.connection_pool.clone(),
            outlier_detection: pl.outlier_detection.clone(),
            tls: pl.tls.clone(),
        });
    }
    Some(EffectivePolicy {
        load_balancer: p.load_balancer.clone(),
        connection_pool: p.connection_pool.clone(),
        outlier_detection: p.outlier_detection.clone(),
        tls: p.tls.clone(),
    })
}

fn effective_policy(
    top: Option<&model::TrafficPolicy>,
    subset: Option<&model::TrafficPolicy>,
    port: u16,
) -> EffectivePolicy {
    let mut eff = layer(top, port).unwrap_or_default();
    if let Some(sp) = subset {
        let port_level =
            sp.port_level_settings.iter().any(|pl| pl.port.as_ref().map(|s| s.number) == Some(u32::from(port)));
        if let Some(sub) = layer(Some(sp), port) {
            if port_level {
                return sub;
            }
            if sub.load_balancer.is_some() {
                eff.load_balancer = sub.load_balancer;
            }
            if sub.connection_pool.is_some() {
                eff.connection_pool = sub.connection_pool;
            }
            if sub.outlier_detection.is_some() {
                eff.outlier_detection = sub.outlier_detection;
            }
            if sub.tls.is_some() {
                eff.tls = sub.tls;
            }
        }
    }
    eff
}

fn lb_policy(lb: Option<&model::LoadBalancerSettings>) -> LbPolicy {
    let Some(lb) = lb else { return LbPolicy::LeastRequest };
    if let Some(ch) = &lb.consistent_hash {
        let min_ring_size = ch
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(ch.minimum_ring_size)
            .unwrap_or(crate::upstream::lb::DEFAULT_MIN_RING_SIZE);
        let source = if let Some(h) = &ch.http_header_name {
            match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(n) => HashSource::Header(n),
                Err(_) => return LbPolicy::LeastRequest,
            }
        } else if let Some(c) = &ch.http_cookie {
            HashSource::Cookie { name: c.name.clone(), path: c.path.clone(), ttl: c.ttl.map(|d| d.0) }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashSource::QueryParameter(q.clone())
        } else {
            HashSource::SourceIp
        };
        return LbPolicy::ConsistentHash { source, min_ring_size };
    }
    match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
        Some("RANDOM") => LbPolicy::Random,
        _ => LbPolicy::LeastRequest,
    }
}

/// Positive integer limit from a connection-pool field; 0 or unset keeps the
/// default (Istio cannot tell them apart and treats both as unlimited).
fn limit(v: Option<i64>) -> Option<usize> {
    v.filter(|n| *n > 0).and_then(|n| usize::try_from(n).ok())
}

/// Applies `connectionPool` to a cluster's pool settings (Istio's
/// `applyConnectionPool`).
fn apply_pool_policy(settings: &mut PoolSettings, cp: Option<&model::ConnectionPoolSettings>) {
    let Some(cp) = cp else { return };
    let nonzero = |d: Option<model::Duration>| d.map(|d| d.0).filter(|d| !d.is_zero());
    if let Some(tcp) = &cp.tcp {
        if let Some(n) = limit(tcp.max_connections) {
            settings.max_connections = n;
        }
        if let Some(t) = nonzero(tcp.connect_timeout) {
            settings.connect_timeout = t;
        }
        if let Some(k) = &tcp.tcp_keepalive {
            settings.keepalive =
                Some(Keepalive { time: k.time.map(|d| d.0), interval: k.interval.map(|d| d.0), probes: k.probes });
        }
        if let Some(t) = nonzero(tcp.max_connection_duration) {
            settings.max_connection_duration = Some(t);
        }
        // The TCP idle timeout also bounds HTTP connections unless
        // `http.idleTimeout` says otherwise.
        if let Some(t) = nonzero(tcp.idle_timeout) {
            settings.idle_timeout = t;
        }
    }
    if let Some(h) = &cp.http {
        if let Some(n) = limit(h.http1_max_pending_requests) {
            settings.max_pending = n;
        }
        if let Some(n) = limit(h.http2_max_requests) {
            settings.max_requests = n;
        }
        if let Some(n) = limit(h.max_retries) {
            settings.max_retries = n;
        }
        if let Some(n) = limit(h.max_requests_per_connection) {
            settings.max_requests_per_connection = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(n) = limit(h.max_concurrent_streams) {
            settings.max_concurrent_streams = n;
        }
        if let Some(t) = nonzero(h.idle_timeout) {
            settings.idle_timeout = t;
        }
        if h.h2_upgrade_policy.as_deref() == Some("UPGRADE") {
            settings.protocol = Protocol::Http2;
        }
    }
}

/// `outlierDetection` → the detector's settings (Istio's `applyOutlierDetection`).
fn outlier_config(od: Option<&model::OutlierDetection>) -> Option<OutlierConfig> {
    let od = od?;
    let d = OutlierConfig::default();
    let count =
        |v: Option<i64>, default: u32| v.map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX)).unwrap_or(default);
    let base = od.base_ejection_time.map(|t| t.0).filter(|t| !t.is_zero()).unwrap_or(d.base_ejection);
    Some(OutlierConfig {
        consecutive_5xx: count(od.consecutive_5xx_errors, d.consecutive_5xx),
        consecutive_gateway: count(od.consecutive_gateway_errors, 0),
        split_local_origin: od.split_external_local_origin_errors.unwrap_or(false),
        consecutive_local_origin: count(od.consecutive_local_origin_failures, d.consecutive_local_origin),
        interval: od.interval.map(|t| t.0).filter(|t| !t.is_zero()).unwrap_or(d.interval),
        base_ejection: base,
        max_ejection_time: d.max_ejection_time,
        max_ejection_percent: od
            .max_ejection_percent
            .filter(|p| *p > 0)
            .map(|p| p.min(100) as u32)
            .unwrap_or(d.max_ejection_percent),
        min_health_percent: od.min_health_percent.map(|p| p.clamp(0, 100) as u32).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn build(yaml: &str, labels: &[(&str, &str)]) -> Result<Snapshot, Vec<Diagnostic>> {
        let set = super::super::load::load_str(std::path::Path::new("t.yaml"), yaml, "default");
        let opts = CompileOptions {
            namespace: "default".into(),
            workload_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        compile(&set, &opts, &Registry::new())
    }

    const SE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc.test]
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 81, name: http-alt, protocol: HTTP}
  endpoints:
  - {address: 127.0.0.1, labels: {version: v1}}
  - {address: 127.0.0.2, labels: {version: v2}}
---
";

    fn cluster<'a>(s: &'a Snapshot, name: &str) -> &'a Arc<crate::upstream::Cluster> {
        s.clusters.iter().find(|c| &*c.name == name).unwrap_or_else(|| {
            panic!("no cluster {name}: {:?}", s.clusters.iter().map(|c| c.name.to_string()).collect::<Vec<_>>())
        })
    }

    /// Routes a gateway VS to every cluster combination so they get built.
    fn with_routes(extra: &str) -> String {
        format!(
            "{SE}{extra}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers:
  - port: {{number: 18999, name: http, protocol: HTTP}}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: ['*']
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /a}}}}]
    route: [{{destination: {{host: svc.test, subset: v1, port: {{number: 80}}}}}}]
  - match: [{{uri: {{prefix: /b}}}}]
    route: [{{destination: {{host: svc.test, subset: v2, port: {{number: 81}}}}}}]
  - match: [{{uri: {{prefix: /c}}}}]
    route: [{{destination: {{host: svc.test, port: {{number: 81}}}}}}]
  - route: [{{destination: {{host: svc.test, port: {{number: 80}}}}}}]
"
        )
    }

    #[test]
    fn policy_layering_port_level_and_subset_blocks() {
        let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.test
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {connectTimeout: 3s}}
    portLevelSettings:
    - port: {number: 81}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  - name: v2
    labels: {version: v2}
---
";
        let s = build(&with_routes(dr), &[]).unwrap();
        // Top level applies to the default cluster on port 80.
        let c = cluster(&s, "outbound|80||svc.test");
        assert_eq!(c.lb, LbPolicy::RoundRobin);
        assert_eq!(c.settings.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.endpoints().len(), 2);
        // A port-level entry replaces the whole top-level policy: RANDOM, and
        // the top-level connectTimeout does not carry over.
        let c = cluster(&s, "outbound|81||svc.test");
        assert_eq!(c.lb, LbPolicy::Random);
        assert_eq!(c.settings.connect_timeout, crate::upstream::pool::DEFAULT_CONNECT_TIMEOUT);
        // A subset's loadBalancer block replaces the top-level one; its other
        // blocks still come from the top level.
        let c = cluster(&s, "outbound|80|v1|svc.test");
        assert!(matches!(c.lb, LbPolicy::ConsistentHash { .. }));
        assert_eq!(c.settings.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.endpoints().len(), 1);
        // A subset without a policy on port 81 gets the port-level policy.
        let c = cluster(&s, "outbound|81|v2|svc.test");
        assert_eq!(c.lb, LbPolicy::Random);
        assert_eq!(c.endpoints().endpoints[0].state.addr.to_string(), "127.0.0.2:81");
    }

    #[test]
    fn cross_references_are_errors() {
        let bad = with_routes("").replace("subset: v2", "subset: v9");
        let errs = build(&bad, &[]).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(text.iter().any(|e| e.contains("subset v1 needs a DestinationRule")), "{text:#?}");
        assert!(
            text.iter().any(|e| e.contains("t.yaml:") && e.contains("spec.http[1].route[0].destination")),
            "{text:#?}"
        );
        let bad = with_routes("").replace("host: svc.test, port: {number: 80}", "host: nowhere.test");
        let errs = build(&bad, &[]).unwrap_err();
        assert!(errs.iter().any(|e| e.to_string().contains("nowhere.test is not defined")), "{errs:#?}");
        // A service with two ports needs an explicit destination port.
        let bad = with_routes("").replace("host: svc.test, port: {number: 80}", "host: svc.test");
        let errs = build(&bad, &[]).unwrap_err();
        assert!(errs.iter().any(|e| e.to_string().contains("several ports")), "{errs:#?}");
    }

    #[test]
    fn gateway_selector_applies_only_to_matching_workloads() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\nspec:\n  host: svc.test\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\n";
        let yaml = with_routes(dr).replace(
            "metadata: {name: gw}\nspec:\n",
            "metadata: {name: gw}\nspec:\n  selector: {istio: ingressgateway}\n",
        );
        // Standalone (no labels): every Gateway applies.
        assert_eq!(build(&yaml, &[]).unwrap().listeners.len(), 1);
        assert_eq!(build(&yaml, &[("istio", "ingressgateway")]).unwrap().listeners.len(), 1);
        assert_eq!(build(&yaml, &[("app", "reviews")]).unwrap().listeners.len(), 0);
    }

    #[test]
    fn source_labels_and_match_port_are_static() {
        let yaml = format!(
            "{SE}apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ['./*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: [svc.test]
  http:
  - name: canary-only
    match: [{{sourceLabels: {{app: canary}}}}]
    route: [{{destination: {{host: svc.test, port: {{number: 80}}}}}}]
  - match: [{{port: 81}}]
    route: [{{destination: {{host: svc.test, port: {{number: 81}}}}}}]
  - route: [{{destination: {{host: svc.test, port: {{number: 80}}}}}}]
"
        );
        let routes = |labels: &[(&str, &str)]| {
            let s = build(&yaml, labels).unwrap();
            let vh = s.listeners[0].routes.find("svc.test").unwrap().clone();
            vh.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
        };
        // For a canary workload the sourceLabels rule applies, and since it
        // has no other condition it matches everything there. Elsewhere it is
        // dropped, and the port-81 rule never applies on the port-80 listener.
        assert_eq!(routes(&[("app", "canary")]), vec!["canary-only"]);
        assert_eq!(routes(&[("app", "other")]), vec!["vs"]);
    }

    #[test]
    fn most_specific_sidecar_wins() {
        let sc = |name: &str, selector: &str, port: u16| {
            format!(
                "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}}}
spec:
{selector}  egress:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ['./*']
---
"
            )
        };
        let yaml = format!(
            "{SE}{}{}",
            sc("ns-wide", "", 80),
            sc("reviews", "  workloadSelector: {labels: {app: reviews}}\n", 81)
        );
        let s = build(&yaml, &[("app", "reviews")]).unwrap();
        assert_eq!(s.listeners[0].addr.port(), 81);
        let s = build(&yaml, &[("app", "ratings")]).unwrap();
        assert_eq!(s.listeners[0].addr.port(), 80);
    }

    #[test]
    fn catch_all_makes_later_rules_unreachable() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\nspec:\n  host: svc.test\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\n";
        let yaml = with_routes(dr).replace(
            "  - match: [{uri: {prefix: /a}}]",
            "  - route: [{destination: {host: svc.test, port: {number: 80}}}]\n  - match: [{uri: {prefix: /a}}]",
        );
        let s = build(&yaml, &[]).unwrap();
        assert_eq!(s.listeners[0].routes.find("x").unwrap().routes.len(), 1);
        assert!(s.warnings.iter().any(|w| w.message.contains("unreachable")), "{:?}", s.warnings);
    }

    #[test]
    fn expands_short_names() {
        assert_eq!(expand_host("reviews", "default"), "reviews.default.svc.cluster.local");
        assert_eq!(expand_host("httpbin.org", "x"), "httpbin.org");
        assert_eq!(expand_host("*", "x"), "*");
    }

    #[test]
    fn aliases_for_same_namespace() {
        let a = host_aliases("reviews.default.svc.cluster.local", "default");
        assert!(a.contains(&"reviews".to_string()));
        assert!(a.contains(&"reviews.default".to_string()));
        let b = host_aliases("reviews.other.svc.cluster.local", "default");
        assert!(!b.contains(&"reviews".to_string()));
    }

    #[test]
    fn gateway_host_intersection() {
        let d = gateway_domains(&["*".into()], &["*".into()], "default");
        assert_eq!(d, vec!["*"]);
        let d = gateway_domains(&["*".into()], &["bookinfo.example.com".into()], "default");
        assert_eq!(d, vec!["bookinfo.example.com"]);
        let d = gateway_domains(&["a.example.com".into()], &["*.example.com".into()], "default");
        assert_eq!(d, vec!["a.example.com"]);
        let d = gateway_domains(&["a.other.com".into()], &["*.example.com".into()], "default");
        assert!(d.is_empty());
        let d = gateway_domains(&["a.example.com".into()], &["prod/*".into()], "default");
        assert!(d.is_empty());
    }

    #[test]
    fn replacement_syntax() {
        assert_eq!(re2_replacement(r"/v2/\1"), "/v2/${1}");
        assert_eq!(re2_replacement("$x"), "$$x");
    }
}
