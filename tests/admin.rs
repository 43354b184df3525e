//! The admin API and the health port (every endpoint and status code), the
//! `/clusters` view after real traffic, the runtime log level, and drain:
//! in-process where the proxy can run in-process, the `remora` binary for
//! signals, logging and exit codes.

mod support;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_remora");

// === helpers ===

/// A raw keep-alive HTTP/1.1 upstream: each request (GET, no body) is held
/// for `hold`, then answered with `status` and the body `held`. `seen` counts
/// requests received.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
}

async fn upstream(status: u16, hold: Duration) -> Upstream {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    seen.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(hold).await;
                    let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 4\r\n\r\nheld");
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream { addr, seen }
}

/// `N` distinct free ports: held together while chosen, so no two are equal
/// (two `free_port()` calls in a row may return the same one).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

const ROUTE_ALL: &str = "  - route:\n    - destination:\n        host: svc.test\n";

/// A gateway on `port` routing everything to `svc.test` at `backend`.
fn gateway_config(port: u16, backend: SocketAddr) -> String {
    format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(backend, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", ROUTE_ALL)
    )
}

/// A Sidecar with an ingress listener to `app` and an egress listener for
/// the `reviews` service at `reviews`.
fn sidecar_config(ingress: u16, app: SocketAddr, egress: u16, reviews: SocketAddr) -> String {
    let sidecar = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\nspec:\n  ingress:\n  - port:\n      number: {ingress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:{}\n  egress:\n  - port:\n      number: {egress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts:\n    - \"./*\"\n---\n",
        app.port()
    );
    format!("{}{sidecar}", service_entry("reviews", "reviews", egress, "HTTP", &[(reviews, "v1")]))
}

async fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_err()
}

async fn send(c: &reqwest::Client, method: reqwest::Method, url: &str) -> (u16, Option<String>, String) {
    let resp = c.request(method, url).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
    (status, allow, resp.text().await.unwrap())
}

async fn json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    let (status, body) = get(c, url, &[]).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

fn cluster<'a>(clusters: &'a serde_json::Value, suffix: &str) -> &'a serde_json::Value {
    clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no cluster *{suffix} in {clusters:#}"))
}

fn endpoint(cluster: &serde_json::Value, addr: SocketAddr) -> &serde_json::Value {
    let addr = addr.to_string();
    cluster["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.as_str())
        .unwrap_or_else(|| panic!("no endpoint {addr} in {cluster:#}"))
}

/// The `remora` binary, killed when dropped if still running; its stderr is
/// collected line by line.
struct Remora {
    child: Child,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Remora {
    fn start(config_dir: &Path, extra: &[&str]) -> Remora {
        let [admin, health, metrics] = free_ports();
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let mut child = Command::new(BIN)
            .arg("run")
            .args(["--admin", &admin.to_string()])
            .args(["--health", &format!("127.0.0.1:{health}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--concurrency", "2", "--log-format", "json", "--config"])
            .arg(config_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        let lines = stderr.clone();
        // Ends at EOF, when the process exits.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        Remora { child, admin, stderr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    async fn wait_ready(&mut self, c: &reqwest::Client) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = c.get(self.url("/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("remora exited with {status} before becoming ready:\n{}", self.stderr());
            }
            assert!(Instant::now() < end, "remora not ready within 10 s:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "remora still running after {within:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Parsed JSON log lines so far.
    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.stderr.lock().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Remora {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    dir
}

// === in-process ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_their_status_codes() {
    let v1 = echo("v1").await;
    let port = free_port();
    let p = TestProxy::start(&gateway_config(port, v1)).await;
    let c = client();
    let url = |path: &str| format!("http://{}{path}", p.admin);
    use reqwest::Method as M;

    assert_eq!(send(&c, M::GET, &url("/ready")).await, (200, None, "ready\n".into()));
    assert_eq!(send(&c, M::HEAD, &url("/ready")).await, (200, None, String::new()));
    assert_eq!(send(&c, M::GET, &url("/live")).await, (200, None, "live\n".into()));
    assert_eq!(json(&c, &url("/config_dump")).await["active"]["version"], p.version().as_str());
    let clusters = json(&c, &url("/clusters")).await;
    assert_eq!(clusters["version"], p.version().as_str());
    assert_eq!(endpoint(cluster(&clusters, "svc.test"), v1)["health"], "healthy");

    // Logging was not set up by this process (the proxy runs in a test).
    let (status, _, body) = send(&c, M::GET, &url("/logging")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not initialised"), "{body}");
    assert_eq!(send(&c, M::POST, &url("/logging?level=debug")).await.0, 503);
    // A bad value is a bad request either way.
    let (status, _, body) = send(&c, M::POST, &url("/logging?level=verbose")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a level"), "{body}");
    let (status, _, body) = send(&c, M::POST, &url("/logging")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing ?level="), "{body}");

    for path in ["/nope", "/", "/healthz/ready", "/ready/x"] {
        assert_eq!(send(&c, M::GET, &url(path)).await.0, 404, "{path}");
    }
    let get_only = Some("GET, HEAD".to_string());
    for path in ["/ready", "/live", "/config_dump", "/clusters"] {
        let (status, allow, _) = send(&c, M::POST, &url(path)).await;
        assert_eq!((status, allow), (405, get_only.clone()), "POST {path}");
    }
    for path in ["/drain", "/quitquitquit"] {
        let (status, allow, _) = send(&c, M::GET, &url(path)).await;
        assert_eq!((status, allow.as_deref()), (405, Some("POST")), "GET {path}");
    }
    let (status, allow, _) = send(&c, M::PUT, &url("/logging")).await;
    assert_eq!((status, allow.as_deref()), (405, Some("GET, HEAD, POST")));
    // None of that changed anything.
    assert_eq!(send(&c, M::GET, &url("/ready")).await.0, 200);
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_config_ready_is_503_and_live_is_200() {
    let opts = remora::runtime::RunOptions {
        config_paths: Vec::new(),
        compile: remora::config::compile::CompileOptions { namespace: "default".into(), ..Default::default() },
    };
    let proxy = remora::runtime::Proxy::new(opts);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let admin = remora::admin::serve(local, proxy.clone()).await.unwrap().local_addr();
    let health = remora::admin::serve_health(local, proxy.clone()).await.unwrap().local_addr();
    let c = client();
    let not_ready = (503, "not ready: no config applied yet\n".to_string());
    assert_eq!(get(&c, &format!("http://{admin}/ready"), &[]).await, not_ready);
    assert_eq!(get(&c, &format!("http://{health}/healthz/ready"), &[]).await, not_ready);
    assert_eq!(get(&c, &format!("http://{admin}/live"), &[]).await, (200, "live\n".to_string()));
    assert_eq!(json(&c, &format!("http://{admin}/clusters")).await["clusters"], serde_json::json!([]));
    assert!(json(&c, &format!("http://{admin}/config_dump")).await["active"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_port_serves_only_healthz_ready_and_answers_like_ready() {
    let v1 = echo("v1").await;
    let port = free_port();
    let p = TestProxy::start(&gateway_config(port, v1)).await;
    let health = remora::admin::serve_health("127.0.0.1:0".parse().unwrap(), p.proxy.clone()).await.unwrap();
    let c = client();
    let url = |path: &str| format!("http://{}{path}", health.local_addr());
    use reqwest::Method as M;

    assert_eq!(send(&c, M::GET, &url("/healthz/ready")).await, (200, None, "ready\n".into()));
    assert_eq!(send(&c, M::HEAD, &url("/healthz/ready")).await.0, 200);
    let (status, allow, _) = send(&c, M::POST, &url("/healthz/ready")).await;
    assert_eq!((status, allow.as_deref()), (405, Some("GET, HEAD")));
    // Nothing else, and nothing that changes the proxy.
    for (m, path) in [
        (M::GET, "/ready"),
        (M::GET, "/live"),
        (M::GET, "/config_dump"),
        (M::GET, "/clusters"),
        (M::GET, "/logging"),
        (M::POST, "/logging?level=debug"),
        (M::POST, "/drain"),
        (M::POST, "/quitquitquit"),
        (M::GET, "/"),
    ] {
        assert_eq!(send(&c, m.clone(), &url(path)).await.0, 404, "{m} {path}");
    }
    assert!(!p.proxy.is_draining());

    // Draining turns it 503 together with /ready.
    assert_eq!(send(&c, M::POST, &format!("http://{}/drain", p.admin)).await.0, 200);
    let draining = (503, None, "not ready: draining\n".to_string());
    assert_eq!(send(&c, M::GET, &url("/healthz/ready")).await, draining);
    assert_eq!(send(&c, M::GET, &format!("http://{}/ready", p.admin)).await, draining);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_show_endpoints_health_limits_usage_and_stats() {
    let good = upstream(200, Duration::ZERO).await;
    let bad = upstream(500, Duration::ZERO).await;
    let slow = upstream(200, Duration::from_millis(600)).await;
    let port = free_port();
    let policy = "connectionPool:\n  tcp:\n    maxConnections: 7\n  http:\n    http1MaxPendingRequests: 5\n    http2MaxRequests: 9\n    maxRetries: 2\nloadBalancer:\n  simple: ROUND_ROBIN\noutlierDetection:\n  consecutive5xxErrors: 2\n  interval: 50ms\n  baseEjectionTime: 30s\n  maxEjectionPercent: 50";
    let http = "  - match:\n    - uri:\n        prefix: /slow\n    route:\n    - destination:\n        host: slow.test\n  - route:\n    - destination:\n        host: svc.test\n";
    let yaml = format!(
        "{}{}{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(good.addr, "a"), (bad.addr, "b")]),
        destination_rule("svc", "svc.test", &[], Some(policy)),
        service_entry("slow", "slow.test", 80, "HTTP", &[(slow.addr, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", http)
    );
    let p = TestProxy::start(&yaml).await;
    let c = client();
    let clusters_url = format!("http://{}/clusters", p.admin);

    // Before traffic: both healthy, limits as configured.
    let all = json(&c, &clusters_url).await;
    let svc = cluster(&all, "svc.test");
    assert_eq!(svc["circuit_breakers"]["max_connections"], 7);
    assert_eq!(svc["circuit_breakers"]["max_pending_requests"], 5);
    assert_eq!(svc["circuit_breakers"]["max_requests"], 9);
    assert_eq!(svc["circuit_breakers"]["max_retries"], 2);
    assert_eq!(endpoint(svc, bad.addr)["health"], "healthy");
    assert_eq!(endpoint(svc, bad.addr)["labels"]["version"], "b");
    assert!(endpoint(svc, bad.addr)["weight"].as_u64().unwrap() >= 1);
    assert_eq!(svc["outlier_detection"]["ejections_active"], 0);
    // No outlier detection configured: null, not zeros.
    assert!(cluster(&all, "slow.test")["outlier_detection"].is_null());

    // Round robin: the failing endpoint sees every other request and is
    // ejected after its second 500.
    let url = format!("http://127.0.0.1:{port}/");
    let mut sent = 0;
    while bad.seen.load(Ordering::SeqCst) < 2 {
        assert!(sent < 10, "the failing endpoint was not picked twice in 10 requests");
        get(&c, &url, &[]).await;
        sent += 1;
    }
    let all = json(&c, &clusters_url).await;
    let svc = cluster(&all, "svc.test");
    assert_eq!(endpoint(svc, bad.addr)["health"], "ejected", "{svc:#}");
    assert_eq!(endpoint(svc, good.addr)["health"], "healthy");
    assert!(endpoint(svc, good.addr)["connections"].as_u64().unwrap() >= 1, "kept-alive connection: {svc:#}");
    assert_eq!(endpoint(svc, good.addr)["active_requests"], 0);
    assert_eq!(svc["outlier_detection"]["ejections_active"], 1);
    assert_eq!(svc["outlier_detection"]["ejections_enforced_total"], 1);
    assert_eq!(svc["outlier_detection"]["ejections_enforced_consecutive_5xx"], 1);
    assert_eq!(svc["stats"]["upstream_rq_total"], sent);
    assert_eq!(svc["usage"]["active_requests"], 0);

    // A request held upstream shows as active on its endpoint and cluster.
    let held = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/slow"));
        async move { get(&c, &url, &[]).await }
    });
    wait_until(Duration::from_secs(3), "held request reached the upstream", || {
        let seen = slow.seen.clone();
        async move { seen.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let all = json(&c, &clusters_url).await;
    let slow_cluster = cluster(&all, "slow.test");
    assert_eq!(endpoint(slow_cluster, slow.addr)["active_requests"], 1, "{slow_cluster:#}");
    assert_eq!(endpoint(slow_cluster, slow.addr)["connections"], 1);
    assert_eq!(slow_cluster["usage"]["active_requests"], 1);
    assert_eq!(held.await.unwrap(), (200, "held".to_string()));
    wait_until(Duration::from_secs(2), "active request released", || {
        let (c, clusters_url) = (c.clone(), clusters_url.clone());
        let addr = slow.addr;
        async move {
            let all = json(&c, &clusters_url).await;
            endpoint(cluster(&all, "slow.test"), addr)["active_requests"] == 0
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_inbound_keeps_egress_and_finishes_in_flight() {
    let slow = upstream(200, Duration::from_millis(800)).await;
    let (app, reviews) = (echo("app").await, echo("v1").await);
    let [gw, ingress, egress, extra] = free_ports();
    let yaml = format!(
        "{}{}",
        sidecar_config(ingress, app, egress, reviews),
        gateway_config(gw, slow.addr).replace("svc.test", "slow.test")
    );
    let p = TestProxy::start(&yaml).await;
    let c = client();
    let admin = format!("http://{}", p.admin);
    let egress_url = format!("http://127.0.0.1:{egress}/");
    assert_eq!(get(&c, &format!("http://127.0.0.1:{ingress}/"), &[]).await.0, 200);
    assert_eq!(version_of(&get(&c, &egress_url, &[("host", "reviews")]).await.1), "v1");

    // One request in flight on HTTP/1.1 and one on HTTP/2, both on the gateway.
    let h1 = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{gw}/h1"));
        async move {
            let r = c.get(&url).send().await.unwrap();
            let close = r.headers().get("connection").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), close, r.text().await.unwrap())
        }
    });
    let stream = TcpStream::connect(("127.0.0.1", gw)).await.unwrap();
    let (mut h2, h2_conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let h2_req = http::Request::get(format!("http://127.0.0.1:{gw}/h2")).body(Empty::new()).unwrap();
    let h2_resp = tokio::spawn(h2.send_request(h2_req));
    wait_until(Duration::from_secs(3), "both requests reached the upstream", || {
        let seen = slow.seen.clone();
        async move { seen.load(Ordering::SeqCst) == 2 }
    })
    .await;

    let (status, body) = {
        let r = c.post(format!("{admin}/drain")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("draining:"), "{body}");
    assert!(body.contains(&format!("127.0.0.1:{gw}")) && body.contains(&format!("127.0.0.1:{ingress}")), "{body}");
    assert!(!body.contains(&format!("127.0.0.1:{egress}")), "egress is not drained: {body}");
    assert_eq!(get(&c, &format!("{admin}/ready"), &[]).await, (503, "not ready: draining\n".to_string()));
    assert_eq!(get(&c, &format!("{admin}/live"), &[]).await.0, 200);

    // Inbound listeners refuse new connections at once; egress keeps serving.
    wait_until(Duration::from_secs(1), "gateway and ingress refuse connections", || async move {
        refused(gw).await && refused(ingress).await
    })
    .await;
    assert!(!h1.is_finished(), "the held request is still in flight");
    let status = p.proxy.listeners.status();
    let of = |port: u16| status.iter().find(|s| s.addr.port() == port).copied();
    let gw_status = of(gw).expect("the gateway listener is reported while its connections finish");
    assert!(!gw_status.accepting && gw_status.connections >= 2, "{gw_status:?}");
    assert!(of(egress).is_some_and(|s| s.accepting), "{status:?}");
    for _ in 0..3 {
        assert_eq!(version_of(&get(&c, &egress_url, &[("host", "reviews")]).await.1), "v1");
    }

    // In-flight requests finish: HTTP/1.1 with Connection: close, HTTP/2 on
    // a connection that then closes (GOAWAY).
    assert_eq!(h1.await.unwrap(), (200, Some("close".to_string()), "held".to_string()));
    assert_eq!(h2_resp.await.unwrap().unwrap().status(), 200);
    wait_until(Duration::from_secs(3), "HTTP/2 connection closed by the proxy", || {
        let done = h2_conn.is_finished();
        async move { done }
    })
    .await;
    wait_until(Duration::from_secs(3), "drain finished", || {
        let finished = p.proxy.drain_progress().finished;
        async move { finished }
    })
    .await;
    assert_eq!(p.proxy.drain_progress().inbound_connections, 0);
    assert_eq!(p.proxy.drain_progress().cut_off, 0);
    let status = p.proxy.listeners.status();
    assert_eq!(status.iter().map(|s| (s.addr.port(), s.accepting)).collect::<Vec<_>>(), vec![(egress, true)]);

    // A config change during the drain is not applied: it would re-open the
    // inbound listeners (and this one adds another).
    let version = p.version();
    let route = ROUTE_ALL.replace("svc.test", "slow.test");
    p.write(&format!("{yaml}{}{}", gateway("gw2", extra), gateway_vs("vs2", "gw2", &route)));
    assert!(matches!(p.proxy.reload_from_files().await, remora::runtime::ApplyOutcome::Unchanged { .. }));
    assert_eq!(p.version(), version);
    assert!(refused(extra).await && refused(gw).await && refused(ingress).await);
    assert_eq!(version_of(&get(&c, &egress_url, &[("host", "reviews")]).await.1), "v1");

    let (status, body) = get_post(&c, &format!("{admin}/drain")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("already draining:"), "{body}");
}

async fn get_post(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.post(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

// === the binary ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_refuses_new_connections_and_exits_0() {
    let slow = upstream(200, Duration::from_secs(1)).await;
    let port = free_port();
    let dir = config_dir(&gateway_config(port, slow.addr));
    let mut r = Remora::start(dir.path(), &["--drain-timeout", "5s"]);
    let c = client();
    r.wait_ready(&c).await;

    let inflight = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/"));
        async move {
            let resp = c.get(&url).send().await.unwrap();
            let close = resp.headers().get("connection").map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), close, resp.text().await.unwrap())
        }
    });
    wait_until(Duration::from_secs(3), "request reached the upstream", || {
        let seen = slow.seen.clone();
        async move { seen.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let signalled = Instant::now();
    r.terminate();
    wait_until(Duration::from_secs(1), "gateway refuses new connections", || async move { refused(port).await }).await;
    assert!(!inflight.is_finished(), "refused while the request is still in flight");
    assert_eq!(get(&c, &r.url("/ready"), &[]).await, (503, "not ready: draining\n".to_string()));

    assert_eq!(inflight.await.unwrap(), (200, Some("close".to_string()), "held".to_string()));
    let status = r.wait_exit(Duration::from_secs(5 + 3)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", r.stderr());
    // It exited once nothing remained, not at the drain timeout.
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    println!("SIGTERM → exit in {took:?} with a 1 s request in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_a_request_held_longer() {
    let stuck = upstream(200, Duration::from_secs(60)).await;
    let port = free_port();
    let dir = config_dir(&gateway_config(port, stuck.addr));
    let mut r = Remora::start(dir.path(), &["--drain-timeout", "1s"]);
    let c = client();
    r.wait_ready(&c).await;
    let inflight = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/"));
        async move { c.get(&url).send().await.map(|r| r.status().as_u16()) }
    });
    wait_until(Duration::from_secs(3), "request reached the upstream", || {
        let seen = stuck.seen.clone();
        async move { seen.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let signalled = Instant::now();
    r.terminate();
    let status = r.wait_exit(Duration::from_secs(1 + 3)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", r.stderr());
    assert!(took >= Duration::from_millis(900), "it waited for the drain: {took:?}");
    let outcome = inflight.await.unwrap();
    assert!(outcome.is_err(), "the held request cannot have completed: {outcome:?}");
    assert!(r.stderr().contains("drain timeout reached"), "{}", r.stderr());
    println!("SIGTERM → exit in {took:?} with --drain-timeout 1s and a request held 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_without_waiting_for_the_drain() {
    let stuck = upstream(200, Duration::from_secs(60)).await;
    let port = free_port();
    let dir = config_dir(&gateway_config(port, stuck.addr));
    let mut r = Remora::start(dir.path(), &["--drain-timeout", "30s"]);
    let c = client();
    r.wait_ready(&c).await;
    let _inflight = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/"));
        async move { c.get(&url).send().await.map(|r| r.status().as_u16()) }
    });
    wait_until(Duration::from_secs(3), "request reached the upstream", || {
        let seen = stuck.seen.clone();
        async move { seen.load(Ordering::SeqCst) == 1 }
    })
    .await;
    r.terminate();
    // Signals that arrive together count once: send the second after the
    // first has visibly started the drain.
    wait_until(Duration::from_secs(2), "drain started", || async move { refused(port).await }).await;
    let second = Instant::now();
    r.terminate();
    let status = r.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(0), "{}", r.stderr());
    assert!(r.stderr().contains("second signal"), "{}", r.stderr());
    println!("second SIGTERM → exit in {:?} with --drain-timeout 30s", second.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_and_exits_0() {
    let v1 = echo("v1").await;
    let port = free_port();
    let dir = config_dir(&gateway_config(port, v1));
    let mut r = Remora::start(dir.path(), &[]);
    let c = client();
    r.wait_ready(&c).await;
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await.0, 200);
    let (status, allow, _) = send(&c, reqwest::Method::GET, &r.url("/quitquitquit")).await;
    assert_eq!((status, allow.as_deref()), (405, Some("POST")));
    let asked = Instant::now();
    let (status, body) = get_post(&c, &r.url("/quitquitquit")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("OK"), "{body}");
    let status = r.wait_exit(Duration::from_secs(5 + 3)).await;
    assert_eq!(status.code(), Some(0), "{}", r.stderr());
    println!("/quitquitquit → exit in {:?}", asked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_log_level_change_takes_effect() {
    let v1 = echo("v1").await;
    let port = free_port();
    let dir = config_dir(&gateway_config(port, v1));
    let mut r = Remora::start(dir.path(), &["--log-level", "info"]);
    let c = client();
    r.wait_ready(&c).await;
    let is_admin_debug =
        |l: &serde_json::Value| l["level"] == "DEBUG" && l["target"] == "remora::admin" && l["path"] == "/live";

    assert_eq!(get(&c, &r.url("/logging"), &[]).await, (200, "info\n".to_string()));
    assert_eq!(get(&c, &r.url("/live"), &[]).await.0, 200);
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await.0, 200);
    assert!(!r.log_lines().iter().any(|l| l["level"] == "DEBUG"), "no debug output at info:\n{}", r.stderr());

    assert_eq!(get_post(&c, &r.url("/logging?level=debug")).await, (200, "debug\n".to_string()));
    assert_eq!(get(&c, &r.url("/logging"), &[]).await, (200, "debug\n".to_string()));
    assert_eq!(get(&c, &r.url("/live"), &[]).await.0, 200);
    wait_until(Duration::from_secs(3), "a debug line for the admin request", || {
        let found = r.log_lines().iter().any(is_admin_debug);
        async move { found }
    })
    .await;

    // Bad values are refused with the reason; the filter stays as it was.
    let (status, body) = get_post(&c, &r.url("/logging?level=verbose")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a level"), "{body}");
    let (status, body) = get_post(&c, &r.url("/logging?level=info,remora=loud")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("remora=loud"), "{body}");
    assert_eq!(get_post(&c, &r.url("/logging")).await.0, 400);
    assert_eq!(get(&c, &r.url("/logging"), &[]).await, (200, "debug\n".to_string()));

    // A full directive, percent-encoded as a client would send it.
    let (status, body) = get_post(&c, &r.url("/logging?level=warn%2Cremora%3A%3Aadmin%3Ddebug")).await;
    // Shown as `EnvFilter` orders directives: most specific first.
    assert_eq!((status, body.as_str()), (200, "remora::admin=debug,warn\n"));
    assert_eq!(get_post(&c, &r.url("/logging?level=info")).await.0, 200);
    let before = r.log_lines().iter().filter(|l| is_admin_debug(l)).count();
    assert_eq!(get(&c, &r.url("/live"), &[]).await.0, 200);
    // The admin request's log line is written before its response: had it
    // been logged, the next line (below) would follow it.
    assert_eq!(get_post(&c, &r.url("/logging?level=debug")).await.0, 200);
    wait_until(Duration::from_secs(3), "the log line of the last change", || {
        let n = r.log_lines().iter().filter(|l| l["message"] == "log filter changed" && l["filter"] == "debug").count();
        async move { n >= 2 }
    })
    .await;
    assert_eq!(r.log_lines().iter().filter(|l| is_admin_debug(l)).count(), before, "back at info, no debug line");
    assert!(r.child.try_wait().unwrap().is_none());
}
