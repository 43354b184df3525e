//! Istio's standard metrics, with the same names, types, labels and label
//! values, so Istio's Grafana dashboards and Kiali work unchanged.
//!
//! Series are resolved when a snapshot is compiled: every endpoint of every
//! cluster gets a [`Target`] holding its fixed labels (reporter, source and
//! destination workload, service), so a request only picks its response-code
//! slot from a lock-free map and bumps atomics. Targets live as long as some
//! snapshot uses them; a cluster removed by a reload takes its series out of
//! the scrape. Rendering walks the live targets on scrape, off the data path.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

/// Envoy's default histogram buckets, which Istio keeps (milliseconds for
/// durations; the same numbers are the byte buckets).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Label value for anything unknown, as Istio reports it.
const UNKNOWN: &str = "unknown";

/// A cumulative-bucket histogram of atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in millionths, so fractional milliseconds add up exactly enough.
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        // Buckets are stored non-cumulatively; rendering accumulates.
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((v.max(0.0) * 1_000_000.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1_000_000.0;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The per-request labels that vary: protocol, status, gRPC status, flags.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// The mTLS peer's SPIFFE ID on inbound requests (`source_principal`,
    /// and `connection_security_policy="mutual_tls"`).
    pub peer: Option<Arc<str>>,
    pub grpc: bool,
    /// `0` when no response was sent (downstream went away first).
    pub code: u16,
    pub grpc_status: Option<u32>,
    pub flags: &'static str,
}

#[derive(Debug, Default)]
struct Series {
    requests: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug, Default)]
struct TcpSeries {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// The fixed labels of one destination as seen from this proxy, and its
/// series.
#[derive(Debug)]
pub struct Target {
    /// Rendered `reporter="…",source_…,destination_…` (no braces).
    labels: String,
    security_policy: &'static str,
    series: ArcSwap<HashMap<Outcome, Arc<Series>>>,
    tcp: TcpSeries,
}

impl Target {
    fn new(labels: String, security_policy: &'static str) -> Self {
        Target { labels, security_policy, series: ArcSwap::default(), tcp: TcpSeries::default() }
    }

    fn series(&self, o: Outcome) -> Arc<Series> {
        if let Some(s) = self.series.load().get(&o) {
            return s.clone();
        }
        // New combination: copy-on-write insert (rare after warm-up).
        let mut out = None;
        self.series.rcu(|map| {
            let mut map = HashMap::clone(map);
            let s = map.entry(o.clone()).or_insert_with(|| Arc::new(Series::default())).clone();
            out = Some(s);
            map
        });
        out.unwrap_or_default()
    }

    /// Records one finished request.
    pub fn record(&self, o: Outcome, duration: Duration, request_bytes: u64, response_bytes: u64) {
        let s = self.series(o);
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.duration.observe(duration.as_secs_f64() * 1000.0);
        s.request_bytes.observe(request_bytes as f64);
        s.response_bytes.observe(response_bytes as f64);
    }

    /// An upgraded (TCP) connection opened through this target.
    pub fn tcp_opened(&self) {
        self.tcp.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// An upgraded connection closed after `sent` bytes to the client and
    /// `received` from it.
    pub fn tcp_closed(&self, sent: u64, received: u64) {
        self.tcp.closed.fetch_add(1, Ordering::Relaxed);
        self.tcp.sent.fetch_add(sent, Ordering::Relaxed);
        self.tcp.received.fetch_add(received, Ordering::Relaxed);
    }

    fn render(&self, out: &mut Families) {
        for (o, s) in self.series.load().iter() {
            let grpc_status = o.grpc_status.map(|c| c.to_string()).unwrap_or_default();
            let (principal, policy) = match &o.peer {
                Some(p) => (esc(p), "mutual_tls"),
                None => (UNKNOWN.to_string(), self.security_policy),
            };
            let labels = format!(
                "{},source_principal=\"{principal}\",request_protocol=\"{}\",response_code=\"{}\",grpc_response_status=\"{grpc_status}\",response_flags=\"{}\",connection_security_policy=\"{policy}\"",
                self.labels,
                if o.grpc { "grpc" } else { "http" },
                o.code,
                o.flags,
            );
            let _ = writeln!(out.requests, "istio_requests_total{{{labels}}} {}", s.requests.load(Ordering::Relaxed));
            s.duration.render(&mut out.duration, "istio_request_duration_milliseconds", &labels);
            s.request_bytes.render(&mut out.request_bytes, "istio_request_bytes", &labels);
            s.response_bytes.render(&mut out.response_bytes, "istio_response_bytes", &labels);
        }
        let opened = self.tcp.opened.load(Ordering::Relaxed);
        if opened > 0 {
            let labels = format!(
                "{},source_principal=\"unknown\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"{}\"",
                self.labels, self.security_policy
            );
            let t = &self.tcp;
            let _ = writeln!(out.tcp_opened, "istio_tcp_connections_opened_total{{{labels}}} {opened}");
            let _ = writeln!(
                out.tcp_closed,
                "istio_tcp_connections_closed_total{{{labels}}} {}",
                t.closed.load(Ordering::Relaxed)
            );
            let _ = writeln!(out.tcp_sent, "istio_tcp_sent_bytes_total{{{labels}}} {}", t.sent.load(Ordering::Relaxed));
            let _ = writeln!(
                out.tcp_received,
                "istio_tcp_received_bytes_total{{{labels}}} {}",
                t.received.load(Ordering::Relaxed)
            );
        }
    }
}

#[derive(Default)]
struct Families {
    requests: String,
    duration: String,
    request_bytes: String,
    response_bytes: String,
    tcp_opened: String,
    tcp_closed: String,
    tcp_sent: String,
    tcp_received: String,
}

/// This proxy's own workload, from `--namespace`, `--workload-name` and
/// `--workload-labels`.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub name: Option<String>,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Istio's canonical-service and revision labels from pod labels.
fn canonical(labels: &BTreeMap<String, String>, fallback_name: Option<&str>) -> (String, String) {
    let svc = labels
        .get("service.istio.io/canonical-name")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .or_else(|| labels.get("app"))
        .map(String::as_str)
        .or(fallback_name)
        .unwrap_or(UNKNOWN)
        .to_string();
    let rev = labels
        .get("service.istio.io/canonical-revision")
        .or_else(|| labels.get("app.kubernetes.io/version"))
        .or_else(|| labels.get("version"))
        .map(String::as_str)
        .unwrap_or("latest")
        .to_string();
    (svc, rev)
}

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    esc_into(&mut o, v);
    o
}

/// Appends `v` escaped as a label value.
fn esc_into(o: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        o.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
}

/// Label names and values in emission order.
type Labels = Vec<(&'static str, String)>;

/// Which side of the exchange this proxy reports as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Outbound: this proxy is the client's side.
    Source,
    /// Inbound: this proxy is in front of the serving app.
    Destination,
}

/// A destination as the metrics see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Service FQDN, or `unknown`.
    pub service: String,
    /// `PassthroughCluster` and friends override the short name.
    pub service_name: Option<&'static str>,
    pub namespace: Option<String>,
    /// The endpoint's labels (app, version, canonical names).
    pub labels: BTreeMap<String, String>,
}

/// Every live target, by its label string, so a reload that keeps a
/// destination keeps its counters.
pub struct Metrics {
    workload: Workload,
    targets: Mutex<crate::weak::WeakMap<(Reporter, Destination), Target>>,
    special: OnceLock<[Arc<Target>; 5]>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("workload", &self.workload).finish()
    }
}

/// Destinations that are not services.
#[derive(Debug, Clone, Copy)]
pub enum Special {
    /// No route or no service for the request.
    Unknown = 0,
    /// ALLOW_ANY traffic to an unregistered host.
    Passthrough = 1,
    /// REGISTRY_ONLY refused the host.
    BlackHole = 2,
    /// Inbound traffic with no matching listener route.
    InboundUnknown = 3,
    /// Captured inbound traffic to an app port no `Sidecar` ingress names.
    InboundPassthrough = 4,
}

impl Metrics {
    pub fn new(workload: Workload) -> Arc<Self> {
        Arc::new(Metrics { workload, targets: Mutex::new(crate::weak::WeakMap::default()), special: OnceLock::new() })
    }

    /// The target for requests this proxy sends to `dest` (or, as
    /// `Destination` reporter, receives for it).
    pub fn target(&self, reporter: Reporter, dest: Destination) -> Arc<Target> {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let key = (reporter, dest);
        if let Some(t) = targets.get(&key) {
            return t;
        }
        let t = Arc::new(self.build(reporter, &key.1));
        targets.insert(key, &t);
        t
    }

    /// Targets for traffic that reached no service.
    pub fn special(&self, which: Special) -> Arc<Target> {
        let all = self.special.get_or_init(|| {
            let mk = |reporter, name: Option<&'static str>| {
                Arc::new(self.build(
                    reporter,
                    &Destination {
                        service: UNKNOWN.into(),
                        service_name: name,
                        namespace: None,
                        labels: BTreeMap::new(),
                    },
                ))
            };
            [
                mk(Reporter::Source, None),
                mk(Reporter::Source, Some("PassthroughCluster")),
                mk(Reporter::Source, Some("BlackHoleCluster")),
                mk(Reporter::Destination, None),
                mk(Reporter::Destination, Some("InboundPassthroughCluster")),
            ]
        });
        all[which as usize].clone()
    }

    fn build(&self, reporter: Reporter, d: &Destination) -> Target {
        let me = &self.workload;
        let my_name = me.name.clone().unwrap_or_else(|| UNKNOWN.into());
        let (my_canon, my_rev) = canonical(&me.labels, me.name.as_deref());
        let mine = |k: &str| me.labels.get(k).cloned().unwrap_or_else(|| UNKNOWN.into());
        let theirs = |k: &str| d.labels.get(k).cloned().unwrap_or_else(|| UNKNOWN.into());
        let (dest_canon, dest_rev) = canonical(&d.labels, None);
        let short = d.service_name.map(str::to_string).unwrap_or_else(|| {
            if d.service == UNKNOWN {
                UNKNOWN.into()
            } else {
                d.service.split('.').next().unwrap_or(UNKNOWN).to_string()
            }
        });
        let dest_ns = d.namespace.clone().unwrap_or_else(|| UNKNOWN.into());
        // Inbound, the service is this workload's: Kubernetes convention names
        // it after the `app` label.
        let (inbound_service, inbound_short) = match me.labels.get("app") {
            Some(app) if d.service.is_empty() => (format!("{app}.{}.svc.cluster.local", me.namespace), app.clone()),
            _ if d.service.is_empty() => (UNKNOWN.into(), UNKNOWN.into()),
            _ => (d.service.clone(), short.clone()),
        };
        let (src, dst): (Labels, Labels) = match reporter {
            Reporter::Source => (
                vec![
                    ("source_workload", my_name),
                    ("source_canonical_service", my_canon),
                    ("source_canonical_revision", my_rev),
                    ("source_workload_namespace", me.namespace.clone()),
                    ("source_app", mine("app")),
                    ("source_version", mine("version")),
                    ("source_cluster", UNKNOWN.into()),
                ],
                vec![
                    ("destination_workload", theirs("app")),
                    ("destination_workload_namespace", dest_ns.clone()),
                    ("destination_principal", UNKNOWN.into()),
                    ("destination_app", theirs("app")),
                    ("destination_version", theirs("version")),
                    ("destination_service", d.service.clone()),
                    ("destination_service_name", short),
                    ("destination_service_namespace", dest_ns),
                    ("destination_canonical_service", dest_canon),
                    ("destination_canonical_revision", dest_rev),
                    ("destination_cluster", UNKNOWN.into()),
                ],
            ),
            Reporter::Destination => (
                vec![
                    ("source_workload", UNKNOWN.into()),
                    ("source_canonical_service", UNKNOWN.into()),
                    ("source_canonical_revision", "latest".into()),
                    ("source_workload_namespace", UNKNOWN.into()),
                    ("source_app", UNKNOWN.into()),
                    ("source_version", UNKNOWN.into()),
                    ("source_cluster", UNKNOWN.into()),
                ],
                vec![
                    ("destination_workload", my_name),
                    ("destination_workload_namespace", me.namespace.clone()),
                    ("destination_principal", UNKNOWN.into()),
                    ("destination_app", mine("app")),
                    ("destination_version", mine("version")),
                    ("destination_service", inbound_service.clone()),
                    ("destination_service_name", inbound_short),
                    ("destination_service_namespace", me.namespace.clone()),
                    ("destination_canonical_service", my_canon),
                    ("destination_canonical_revision", my_rev),
                    ("destination_cluster", UNKNOWN.into()),
                ],
            ),
        };
        let reporter_value = match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let mut labels = String::with_capacity(1024);
        labels.push_str("reporter=\"");
        labels.push_str(reporter_value);
        labels.push('"');
        for (k, v) in src.iter().chain(&dst) {
            labels.push(',');
            labels.push_str(k);
            labels.push_str("=\"");
            esc_into(&mut labels, v);
            labels.push('"');
        }
        labels.shrink_to_fit();
        // Without mTLS a destination sees plaintext; the source side reports
        // `unknown`, as Istio does.
        let policy = match reporter {
            Reporter::Source => UNKNOWN,
            Reporter::Destination => "none",
        };
        Target::new(labels, policy)
    }

    /// Every live series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let live: Vec<Arc<Target>> = {
            let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            targets.values().collect()
        };
        let mut f = Families::default();
        for t in live.iter().chain(self.special.get().into_iter().flatten()) {
            t.render(&mut f);
        }
        let sections = [
            ("istio_requests_total", "counter", "Requests, by response code and flags.", &f.requests),
            ("istio_request_duration_milliseconds", "histogram", "Request duration.", &f.duration),
            ("istio_request_bytes", "histogram", "Request size (headers and body).", &f.request_bytes),
            ("istio_response_bytes", "histogram", "Response size (headers and body).", &f.response_bytes),
            ("istio_tcp_connections_opened_total", "counter", "Upgraded connections opened.", &f.tcp_opened),
            ("istio_tcp_connections_closed_total", "counter", "Upgraded connections closed.", &f.tcp_closed),
            ("istio_tcp_sent_bytes_total", "counter", "Bytes sent to the client on upgraded connections.", &f.tcp_sent),
            (
                "istio_tcp_received_bytes_total",
                "counter",
                "Bytes received from the client on upgraded connections.",
                &f.tcp_received,
            ),
        ];
        for (name, kind, help, body) in sections {
            if body.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            out.push_str(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        for v in [0.2, 3.0, 3.0, 700.0, 10_000_000.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "m", "a=\"b\"");
        assert!(out.contains("m_bucket{a=\"b\",le=\"0.5\"} 1\n"));
        assert!(out.contains("m_bucket{a=\"b\",le=\"5\"} 3\n"));
        assert!(out.contains("m_bucket{a=\"b\",le=\"1000\"} 4\n"));
        assert!(out.contains("m_bucket{a=\"b\",le=\"3600000\"} 4\n"));
        assert!(out.contains("m_bucket{a=\"b\",le=\"+Inf\"} 5\n"));
        assert!(out.contains("m_count{a=\"b\"} 5\n"));
    }

    #[test]
    fn targets_are_shared_and_dropped() {
        let m = Metrics::new(Workload {
            name: Some("productpage-v1".into()),
            namespace: "default".into(),
            labels: BTreeMap::new(),
        });
        let d = Destination {
            service: "reviews.default.svc.cluster.local".into(),
            service_name: None,
            namespace: Some("default".into()),
            labels: [("version".to_string(), "v2".to_string())].into(),
        };
        let a = m.target(Reporter::Source, d.clone());
        let b = m.target(Reporter::Source, d);
        assert!(Arc::ptr_eq(&a, &b));
        a.record(
            Outcome { peer: None, grpc: false, code: 200, grpc_status: None, flags: "-" },
            Duration::from_millis(3),
            100,
            200,
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("destination_version=\"v2\""), "{out}");
        assert!(out.contains("destination_service_name=\"reviews\""), "{out}");
        assert!(out.contains("source_workload=\"productpage-v1\""), "{out}");
        drop((a, b));
        let mut out = String::new();
        m.render(&mut out);
        assert!(!out.contains("destination_version=\"v2\""), "{out}");
    }
}
