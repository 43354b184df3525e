//! The Prometheus endpoint (`--metrics`): `GET /metrics` and
//! `/stats/prometheus` in the text format. Rendering runs on the blocking pool,
//! so a scrape never takes a worker thread from the data path.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::runtime::Proxy;

/// Istio's Prometheus port, on every interface (scraped from outside the pod).
pub const DEFAULT_METRICS: &str = "0.0.0.0:15090";

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` and serves scrapes in the background.
pub async fn serve(addr: SocketAddr, proxy: Arc<Proxy>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let builder = Arc::new(crate::proxy::server::http_builder());
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (proxy, builder) = (proxy.clone(), builder.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(proxy, req).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(local)
}

async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let status = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics" | "/stats/prometheus") => StatusCode::OK,
        (_, "/metrics" | "/stats/prometheus") => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::NOT_FOUND,
    };
    if status != StatusCode::OK {
        let mut r = Response::new(body::full(format!("{}\n", status.canonical_reason().unwrap_or(""))));
        *r.status_mut() = status;
        if status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        return r;
    }
    let text = tokio::task::spawn_blocking(move || render(&proxy)).await.unwrap_or_default();
    let mut r = Response::new(body::full(text));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    r
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Istio's metrics plus remora's own: clusters, reloads, build, process.
pub fn render(proxy: &Proxy) -> String {
    let mut out = String::with_capacity(64 * 1024);
    proxy.state.metrics.render(&mut out);
    render_clusters(proxy, &mut out);

    family(
        &mut out,
        "remora_config_reloads_total",
        "counter",
        "Config sets applied, rejected, or read and found unchanged.",
    );
    let _ = writeln!(
        out,
        "remora_config_reloads_total{{result=\"applied\"}} {}",
        proxy.reloads_applied.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "remora_config_reloads_total{{result=\"rejected\"}} {}",
        proxy.reloads_rejected.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "remora_config_reloads_total{{result=\"unchanged\"}} {}",
        proxy.reloads_unchanged.load(Ordering::Relaxed)
    );
    let snap = proxy.snapshot();
    family(&mut out, "remora_config_active_info", "gauge", "The active config version.");
    let esc = |v: Option<String>| v.unwrap_or_default().replace('\\', "\\\\").replace('"', "\\\"");
    let label = esc(proxy.push_label());
    let cp = esc(proxy.control_plane_version());
    let _ = writeln!(
        out,
        "remora_config_active_info{{version=\"{}\",push_label=\"{label}\",control_plane_version=\"{cp}\"}} 1",
        snap.version
    );
    if let Some(d) = proxy.apply_duration() {
        family(
            &mut out,
            "remora_config_last_apply_duration_seconds",
            "gauge",
            "How long the active config took to compile, bind and swap in.",
        );
        let _ = writeln!(out, "remora_config_last_apply_duration_seconds {:.6}", d.as_secs_f64());
    }
    if let Some(c) = proxy.control_status() {
        family(&mut out, "remora_control_plane_connected", "gauge", "1 while the control-plane stream is up.");
        let _ = writeln!(out, "remora_control_plane_connected {}", u8::from(c.connected));
    }
    if let Some(at) = proxy.applied_at().and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        family(
            &mut out,
            "remora_config_last_applied_timestamp_seconds",
            "gauge",
            "When the active config was applied.",
        );
        let _ = writeln!(out, "remora_config_last_applied_timestamp_seconds {}", at.as_secs());
    }
    if let Some(id) = proxy.identity().and_then(|s| s.current()) {
        family(&mut out, "remora_identity_info", "gauge", "The workload identity in use.");
        let _ = writeln!(out, "remora_identity_info{{spiffe_id=\"{}\",serial=\"{}\"}} 1", id.spiffe_id, id.serial);
        if let Some(secs) = id.seconds_to_expiry() {
            family(
                &mut out,
                "remora_identity_cert_expiry_seconds",
                "gauge",
                "Seconds until the workload certificate expires.",
            );
            let _ = writeln!(out, "remora_identity_cert_expiry_seconds {secs}");
        }
    }
    family(&mut out, "remora_build_info", "gauge", "Build information.");
    let _ = writeln!(out, "remora_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    family(
        &mut out,
        "remora_access_log_dropped_total",
        "counter",
        "Access-log lines dropped because the writer fell behind.",
    );
    let _ = writeln!(out, "remora_access_log_dropped_total {}", super::access::dropped());
    render_process(&mut out);
    out
}

/// A gauge family: name, help, and (labels, value) rows.
type Gauge = (&'static str, &'static str, Vec<(String, u64)>);

fn render_clusters(proxy: &Proxy, out: &mut String) {
    let snap = proxy.snapshot();
    if snap.clusters.is_empty() {
        return;
    }
    let mut counters: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    let mut gauges: Vec<Gauge> = vec![
        ("upstream_rq_active", "Requests in flight.", Vec::new()),
        ("upstream_rq_pending_active", "Requests waiting for a connection.", Vec::new()),
        ("upstream_cx_active", "Open connections.", Vec::new()),
        ("circuit_breakers_remaining_cx", "Connections left before maxConnections.", Vec::new()),
        ("circuit_breakers_remaining_pending", "Pending places left before http1MaxPendingRequests.", Vec::new()),
        ("circuit_breakers_remaining_rq", "Requests left before http2MaxRequests.", Vec::new()),
        ("circuit_breakers_remaining_retries", "Retries left before maxRetries.", Vec::new()),
        ("membership_total", "Endpoints in the cluster.", Vec::new()),
        ("membership_healthy", "Endpoints not ejected.", Vec::new()),
        ("outlier_detection_ejections_active", "Endpoints ejected now.", Vec::new()),
    ];
    for c in &snap.clusters {
        let shared = c.shared();
        let label = format!("cluster_name=\"{}\"", c.name.replace('\\', "\\\\").replace('"', "\\\""));
        for (name, v) in shared.stats.snapshot() {
            match counters.iter_mut().find(|(n, _)| n == name) {
                Some((_, rows)) => rows.push((label.clone(), v)),
                None => counters.push((name.to_string(), vec![(label.clone(), v)])),
            }
        }
        if let Some(d) = &shared.detector {
            for (name, v) in [
                ("outlier_detection_ejections_enforced", d.stats.ejections_enforced_total.load(Ordering::Relaxed)),
                ("outlier_detection_ejections_overflow", d.stats.ejections_overflow.load(Ordering::Relaxed)),
            ] {
                match counters.iter_mut().find(|(n, _)| n == name) {
                    Some((_, rows)) => rows.push((label.clone(), v)),
                    None => counters.push((name.to_string(), vec![(label.clone(), v)])),
                }
            }
        }
        let eps = c.endpoints();
        let s = &shared.settings;
        let active = shared.active_requests.load(Ordering::Relaxed);
        let pending = shared.pending.load(Ordering::Relaxed);
        let cx = shared.connections.load(Ordering::Relaxed);
        let retries = shared.active_retries.load(Ordering::Relaxed);
        let ejected = eps.endpoints.iter().filter(|e| e.state.is_ejected()).count();
        let values = [
            active,
            pending,
            cx,
            s.max_connections.saturating_sub(cx),
            s.max_pending.saturating_sub(pending),
            s.max_requests.saturating_sub(active),
            s.max_retries.saturating_sub(retries),
            eps.len(),
            eps.len() - ejected,
            shared.detector.as_ref().map(|d| d.stats.ejections_active.load(Ordering::Relaxed)).unwrap_or(0),
        ];
        for (g, v) in gauges.iter_mut().zip(values) {
            g.2.push((label.clone(), v as u64));
        }
    }
    for (name, rows) in counters {
        let full = format!("remora_cluster_{name}_total");
        family(out, &full, "counter", &format!("Envoy's cluster stat {name}."));
        for (l, v) in rows {
            let _ = writeln!(out, "{full}{{{l}}} {v}");
        }
    }
    for (name, help, rows) in gauges {
        let full = format!("remora_cluster_{name}");
        family(out, &full, "gauge", help);
        for (l, v) in rows {
            let _ = writeln!(out, "{full}{{{l}}} {v}");
        }
    }
}

/// Resident memory, CPU time, open file descriptors and start time, from /proc.
fn render_process(out: &mut String) {
    let page = 4096u64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(rss_pages) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok())
    {
        family(out, "remora_process_resident_memory_bytes", "gauge", "Resident memory.");
        let _ = writeln!(out, "remora_process_resident_memory_bytes {}", rss_pages * page);
    }
    // Fields 14 and 15 of /proc/self/stat are user and system time in clock
    // ticks (100 per second on Linux), after the parenthesised command name.
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r)
    {
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
        family(out, "remora_process_cpu_seconds_total", "counter", "CPU time (user and system).");
        let _ = writeln!(out, "remora_process_cpu_seconds_total {cpu}");
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(out, "remora_process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(out, "remora_process_open_fds {}", fds.count());
    }
}
