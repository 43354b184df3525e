//! The compiled, immutable routing world a request is served from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::json;

use crate::config::{Diagnostic, SourceFile};
use crate::route::{Action, Fallback, RouteTable};
use crate::upstream::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// A `Gateway` server: a standalone reverse-proxy port.
    Gateway,
    /// A `Sidecar` egress listener with an explicit `port` (+ `bind`).
    SidecarEgress,
    /// A `Sidecar` ingress listener forwarding to the local app.
    SidecarIngress,
    /// The outbound capture port (15001): the app's connections redirected
    /// by `remora iptables`, served by their original destination.
    CaptureOutbound,
    /// The inbound capture port (15006): connections to the pod redirected by
    /// `remora iptables`, served by their original destination port.
    CaptureInbound,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Gateway => "gateway",
            ListenerKind::SidecarEgress => "sidecar-egress",
            ListenerKind::SidecarIngress => "sidecar-ingress",
            ListenerKind::CaptureOutbound => "capture-outbound",
            ListenerKind::CaptureInbound => "capture-inbound",
        }
    }
}

/// What an inbound listener accepts, from PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundTls {
    /// Plaintext only (also every gateway and egress listener).
    #[default]
    Disable,
    /// mTLS or plaintext, told apart by the first byte.
    Permissive,
    /// mTLS only, with a client certificate from the mesh's trust bundle.
    Strict,
}

impl InboundTls {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundTls::Disable => "DISABLE",
            InboundTls::Permissive => "PERMISSIVE",
            InboundTls::Strict => "STRICT",
        }
    }
}

#[derive(Debug)]
pub struct Listener {
    /// e.g. `gateway default/bookinfo-gateway 0.0.0.0:8080`.
    pub name: String,
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    pub routes: RouteTable,
    /// mTLS mode of a sidecar ingress listener.
    pub tls: InboundTls,
    /// TLS of an HTTPS gateway listener.
    pub gateway_tls: Option<std::sync::Arc<crate::tls::gateway::GatewayTls>>,
    /// AuthorizationPolicies enforced on this (inbound) listener.
    pub authz: std::sync::Arc<crate::authz::Policies>,
    /// The port authorization sees as `destination.port` (the app's port on
    /// a sidecar ingress, the listener's on a gateway).
    pub authz_port: u16,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    /// Content hash of the sources; shown in `/config_dump` and logs.
    pub version: String,
    pub listeners: Vec<Arc<Listener>>,
    by_addr: HashMap<SocketAddr, Arc<Listener>>,
    /// Sorted by name.
    pub clusters: Vec<Arc<Cluster>>,
    pub files: Vec<SourceFile>,
    pub warnings: Vec<Diagnostic>,
    pub resource_count: usize,
    /// What the capture listeners serve (`--capture`).
    pub capture: Option<Capture>,
}

/// What the capture listeners serve, by a connection's original destination
/// (the address the app or the peer dialled before `remora iptables`
/// redirected it).
#[derive(Debug)]
pub struct Capture {
    /// Outbound HTTP by original destination port: the services visible on
    /// that port, routed as an explicit egress listener would route them.
    pub outbound: HashMap<u16, Arc<Listener>>,
    /// Outbound HTTP to any other port: no service, only the fallback.
    pub outbound_default: Arc<Listener>,
    /// `REGISTRY_ONLY`: traffic to unknown destinations is refused (TCP is
    /// closed, HTTP gets 502) instead of passed through.
    pub registry_only: bool,
    /// Inbound by original destination port (a `Sidecar` ingress entry).
    pub inbound: HashMap<u16, Arc<Listener>>,
    /// Inbound to any other port: the app on that port.
    pub inbound_default: Arc<Listener>,
    /// Where a `Sidecar` ingress entry sends its port's traffic (its
    /// `defaultEndpoint`); TCP goes there directly.
    pub inbound_apps: HashMap<u16, SocketAddr>,
    /// PeerAuthentication port-level modes for ports without a listener of
    /// their own (`inbound_default.tls` covers the rest).
    pub inbound_tls_ports: HashMap<u16, InboundTls>,
    /// Registry addresses (endpoint and service addresses with a port) and
    /// what is known about them.
    pub known: HashMap<SocketAddr, KnownDestination>,
}

/// A registry address the outbound capture may see as an original destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDestination {
    /// The service host.
    pub host: String,
    pub namespace: String,
    /// The port's declared protocol (`HTTP`, `TCP`, ...), or `None` when the
    /// port neither names nor declares one (the protocol is then sniffed).
    pub protocol: Option<&'static str>,
}

impl Capture {
    /// The mTLS mode for inbound traffic to `port`.
    pub fn inbound_tls(&self, port: u16) -> InboundTls {
        match self.inbound.get(&port) {
            Some(l) => l.tls,
            None => self.inbound_tls_ports.get(&port).copied().unwrap_or(self.inbound_default.tls),
        }
    }
}

impl Snapshot {
    pub fn new(
        version: String,
        listeners: Vec<Listener>,
        clusters: Vec<Arc<Cluster>>,
        files: Vec<SourceFile>,
        warnings: Vec<Diagnostic>,
        resource_count: usize,
        capture: Option<Capture>,
    ) -> Self {
        let listeners: Vec<Arc<Listener>> = listeners.into_iter().map(Arc::new).collect();
        let by_addr = listeners.iter().map(|l| (l.addr, l.clone())).collect();
        Snapshot { version, listeners, by_addr, clusters, files, warnings, resource_count, capture }
    }

    /// The listener configured on `addr` (the address a connection was accepted on).
    pub fn listener(&self, addr: &SocketAddr) -> Option<&Arc<Listener>> {
        self.by_addr.get(addr)
    }

    /// The listener whose routes serve a connection accepted on `addr`: the
    /// listener itself, or, on a capture port, the one for the connection's
    /// original destination port.
    pub fn route_listener(&self, addr: &SocketAddr, original_dst: Option<SocketAddr>) -> Option<&Arc<Listener>> {
        let l = self.by_addr.get(addr)?;
        match (l.kind, original_dst, &self.capture) {
            (ListenerKind::CaptureOutbound, Some(dst), Some(c)) => {
                Some(c.outbound.get(&dst.port()).unwrap_or(&c.outbound_default))
            }
            (ListenerKind::CaptureInbound, Some(dst), Some(c)) => {
                Some(c.inbound.get(&dst.port()).unwrap_or(&c.inbound_default))
            }
            _ => Some(l),
        }
    }

    pub fn route_count(&self) -> usize {
        self.listeners.iter().flat_map(|l| l.routes.virtual_hosts()).map(|(_, vh)| vh.routes.len()).sum()
    }

    /// A short human summary, as `remora validate` prints it.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "config version {}: {} resources from {} files\n",
            self.version,
            self.resource_count,
            self.files.len()
        ));
        out.push_str(&format!("listeners ({}):\n", self.listeners.len()));
        for l in &self.listeners {
            describe_listener(l, &mut out);
        }
        if let Some(c) = &self.capture {
            let mut ports: Vec<_> = c.outbound.iter().collect();
            ports.sort_by_key(|(p, _)| **p);
            out.push_str(&format!(
                "captured outbound ({} ports; other ports: {}):\n",
                ports.len(),
                if c.registry_only { "refused (REGISTRY_ONLY)" } else { "passed through (ALLOW_ANY)" }
            ));
            for (_, l) in ports {
                describe_listener(l, &mut out);
            }
            let mut ports: Vec<_> = c.inbound.iter().collect();
            ports.sort_by_key(|(p, _)| **p);
            out.push_str(&format!("captured inbound ({} ports with a Sidecar ingress entry):\n", ports.len()));
            for (_, l) in ports {
                describe_listener(l, &mut out);
            }
            describe_listener(&c.inbound_default, &mut out);
        }
        out.push_str(&format!("clusters ({}):\n", self.clusters.len()));
        for c in &self.clusters {
            let eps = c.endpoints();
            out.push_str(&format!("  {} ({:?}, {} endpoints)\n", c.name, c.settings.protocol, eps.len()));
        }
        out
    }

    /// The compiled config as JSON for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let listeners: Vec<_> = self.listeners.iter().map(|l| dump_listener(l)).collect();
        let capture = self.capture.as_ref().map(|c| {
            let mut out: Vec<_> = c.outbound.iter().collect();
            out.sort_by_key(|(p, _)| **p);
            let mut inb: Vec<_> = c.inbound.iter().collect();
            inb.sort_by_key(|(p, _)| **p);
            json!({
                "registry_only": c.registry_only,
                "outbound": out.into_iter().map(|(_, l)| dump_listener(l)).collect::<Vec<_>>(),
                "inbound": inb.into_iter().map(|(_, l)| dump_listener(l)).collect::<Vec<_>>(),
                "inbound_default_mtls": c.inbound_default.tls.as_str(),
                "known_destinations": c.known.len(),
            })
        });
        let clusters: Vec<_> = self
            .clusters
            .iter()
            .map(|c| {
                let eps: Vec<_> = c
                    .endpoints()
                    .endpoints
                    .iter()
                    .map(|e| json!({"address": e.state.addr.to_string(), "weight": e.weight, "labels": *e.labels}))
                    .collect();
                json!({
                    "name": &*c.name,
                    "protocol": format!("{:?}", c.settings.protocol),
                    "lb": format!("{:?}", c.lb),
                    "policy": c.policy_json,
                    "endpoints": eps,
                })
            })
            .collect();
        json!({
            "version": self.version,
            "files": self.files.iter().map(|f| json!({"path": f.path.display().to_string(), "hash": f.hash, "bytes": f.len})).collect::<Vec<_>>(),
            "warnings": self.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "listeners": listeners,
            "capture": capture,
            "clusters": clusters,
        })
    }
}

/// One listener and its routes as JSON for `/config_dump`.
fn dump_listener(l: &Listener) -> serde_json::Value {
    let hosts: Vec<_> = l
        .routes
        .virtual_hosts()
        .into_iter()
        .map(|(domain, vh)| {
            let routes: Vec<_> = vh
                .routes
                .iter()
                .map(|r| {
                    json!({
                        "name": r.name,
                        "match": format!("{:?}", r.matcher.path),
                        "action": describe_action(&r.action),
                        "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                    })
                })
                .collect();
            json!({"domain": domain, "virtual_host": vh.name, "routes": routes})
        })
        .collect();
    json!({
        "name": l.name,
        "address": l.addr.to_string(),
        "kind": l.kind.as_str(),
        "mtls": l.tls.as_str(),
        "virtual_hosts": hosts,
    })
}

/// One listener and its routes, as `remora validate` prints it.
fn describe_listener(l: &Listener, out: &mut String) {
    if matches!(l.kind, ListenerKind::CaptureOutbound | ListenerKind::CaptureInbound) {
        out.push_str(&format!("  {} ({}; served by original destination, below)\n", l.name, l.kind.as_str()));
        return;
    }
    let vhs = l.routes.virtual_hosts();
    let fallback = match l.routes.fallback {
        Fallback::NotFound => "404",
        Fallback::Passthrough => "ALLOW_ANY",
        Fallback::BlackHole => "REGISTRY_ONLY",
        Fallback::InboundPassthrough => "app on the same port",
    };
    let mtls =
        if l.kind == ListenerKind::SidecarIngress { format!("; mTLS {}", l.tls.as_str()) } else { String::new() };
    out.push_str(&format!("  {} ({}; unknown hosts: {fallback}{mtls})\n", l.name, l.kind.as_str()));
    let mut seen = Vec::new();
    for (domain, vh) in vhs {
        if seen.iter().any(|p| Arc::ptr_eq(p, &vh)) {
            continue;
        }
        seen.push(vh.clone());
        out.push_str(&format!("    host {domain} ({}): {} routes\n", vh.name, vh.routes.len()));
        for r in &vh.routes {
            out.push_str(&format!("      {} -> {}\n", r.name, describe_action(&r.action)));
        }
    }
}

fn describe_action(a: &Action) -> String {
    match a {
        Action::Forward(f) => f
            .destinations
            .iter()
            .map(|d| {
                if f.destinations.len() == 1 {
                    d.cluster.name.to_string()
                } else {
                    format!("{} (weight {})", d.cluster.name, d.weight)
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        Action::Redirect(r) => format!("redirect {}", r.code.as_u16()),
        Action::Direct(d) => format!("direct response {}", d.status.as_u16()),
    }
}
