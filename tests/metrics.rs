//! Istio's standard metrics and remora's own, checked through a real
//! Prometheus text-format parser against the traffic sent.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use support::*;

fn scrape(p: &TestProxy) -> (String, Scrape) {
    let text = remora::telemetry::server::render(&p.proxy);
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid text format");
    (text, parsed)
}

fn counter(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => panic!("not a counter: {s:?}"),
    }
}

/// Sum of `metric` over samples whose labels include all of `want`.
fn sum(s: &Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(counter)
        .sum()
}

fn canary(port: u16, v1: std::net::SocketAddr, v2: std::net::SocketAddr, slow: std::net::SocketAddr) -> String {
    let http = "  - match:\n    - uri:\n        prefix: /slow\n    route:\n    - destination:\n        host: slow.test\n  - match:\n    - uri:\n        prefix: /app\n    route:\n    - destination:\n        host: reviews.test\n        subset: v1\n      weight: 50\n    - destination:\n        host: reviews.test\n        subset: v2\n      weight: 50\n";
    format!(
        "{}{}{}{}{}{}",
        service_entry("reviews", "reviews.test", 80, "HTTP", &[(v1, "v1"), (v2, "v2")]),
        destination_rule("reviews", "reviews.test", &["v1", "v2"], None),
        service_entry("slow", "slow.test", 80, "HTTP", &[(slow, "v1")]),
        destination_rule(
            "slow",
            "slow.test",
            &[],
            Some("connectionPool:\n  tcp:\n    maxConnections: 1\n  http:\n    http1MaxPendingRequests: 1")
        ),
        gateway("gw", port),
        gateway_vs("vs", "gw", http)
    )
}

/// An upstream that answers after 300 ms.
async fn slow_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_request_metrics_follow_the_traffic() {
    let (v1, v2, slow) = (echo("v1").await, echo("v2").await, slow_upstream().await);
    let port = free_port();
    let p = TestProxy::start(&canary(port, v1, v2, slow)).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let mut versions: HashMap<String, usize> = HashMap::new();
    let n = 200;
    for i in 0..n {
        // Some requests carry a body, so byte counts are checked too.
        let resp = c.post(format!("{base}/app/secret-path-{i}")).body(vec![b'x'; 1000]).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        *versions.entry(version_of(&resp.text().await.unwrap())).or_default() += 1;
    }
    // 404 NR, with a client-controlled Host that must not show up in labels.
    for _ in 0..7 {
        assert_eq!(get(&c, &format!("{base}/nowhere"), &[("host", "evil-host.example")]).await.0, 404);
    }
    // 503 UO: four at once against one connection and one pending place.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), format!("{base}/slow"));
        tasks.push(tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(codes, vec![200, 200, 503, 503]);

    // Metrics are recorded when the response has been streamed.
    let expected = (n + 7 + 4) as f64;
    wait_until(Duration::from_secs(3), "every request recorded", || {
        let p = &p;
        async move { sum(&scrape(p).1, "istio_requests_total", &[]) == expected }
    })
    .await;
    let (text, s) = scrape(&p);
    for (version, count) in &versions {
        let got = sum(
            &s,
            "istio_requests_total",
            &[
                ("destination_version", version),
                ("response_code", "200"),
                ("reporter", "source"),
                ("destination_service", "reviews.test"),
            ],
        );
        assert_eq!(got, *count as f64, "destination_version={version}");
        let got = sum(
            &s,
            "istio_requests_total",
            &[
                ("destination_service", "reviews.test"),
                ("destination_service_name", "reviews"),
                ("destination_version", version),
            ],
        );
        assert_eq!(got, *count as f64);
    }
    assert_eq!(sum(&s, "istio_requests_total", &[("response_code", "404"), ("response_flags", "NR")]), 7.0);
    assert_eq!(
        sum(
            &s,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO"), ("destination_service", "slow.test")]
        ),
        2.0
    );
    assert_eq!(
        sum(&s, "istio_requests_total", &[("request_protocol", "http"), ("connection_security_policy", "unknown")]),
        expected
    );

    // Histograms: one observation per request, cumulative buckets.
    let hist: Vec<_> = s.samples.iter().filter(|x| x.metric == "istio_request_duration_milliseconds").collect();
    assert!(!hist.is_empty());
    let mut total = 0.0;
    for h in &hist {
        let Value::Histogram(buckets) = &h.value else { panic!("not a histogram: {h:?}") };
        let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative: {counts:?}");
        total += counts.last().copied().unwrap_or(0.0);
    }
    assert_eq!(total, expected, "histogram counts equal requests");
    // Request bytes: each POST carried 1000 body bytes plus its headers.
    let sums: f64 = text
        .lines()
        .filter(|l| l.starts_with("istio_request_bytes_sum{") && l.contains("destination_service=\"reviews.test\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    assert!(sums >= 1000.0 * n as f64 && sums <= 1600.0 * n as f64, "request bytes {sums}");
    let resp_sums: f64 = text
        .lines()
        .filter(|l| l.starts_with("istio_response_bytes_sum{") && l.contains("destination_service=\"reviews.test\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    assert!(resp_sums > 200.0 * n as f64, "response bytes {resp_sums}");
    // Bounded labels: no raw path, no client Host.
    assert!(!text.contains("secret-path"), "a raw path leaked into labels");
    assert!(!text.contains("evil-host"), "a client Host leaked into labels");

    // remora's cluster stats.
    assert_eq!(
        sum(&s, "remora_cluster_upstream_rq_pending_overflow_total", &[("cluster_name", "outbound|80||slow.test")]),
        2.0
    );
    assert_eq!(
        sum(&s, "remora_cluster_circuit_breakers_remaining_pending", &[("cluster_name", "outbound|80||slow.test")]),
        1.0
    );
    assert_eq!(sum(&s, "remora_config_reloads_total", &[("result", "applied")]), 1.0);
    assert!(sum(&s, "remora_process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(sum(&s, "remora_build_info", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_a_removed_cluster_are_dropped() {
    let (v1, v2, slow) = (echo("v1").await, echo("v2").await, slow_upstream().await);
    let port = free_port();
    let yaml = canary(port, v1, v2, slow);
    let p = TestProxy::start(&yaml).await;
    let c = client();
    get(&c, &format!("http://127.0.0.1:{port}/slow"), &[]).await;
    wait_until(Duration::from_secs(3), "slow recorded", || {
        let p = &p;
        async move { sum(&scrape(p).1, "istio_requests_total", &[("destination_service", "slow.test")]) == 1.0 }
    })
    .await;
    // A reload that keeps the cluster keeps its counters.
    p.write(&format!("{yaml}# touched\n"));
    let before = p.version();
    wait_until(Duration::from_secs(3), "reload applied", || {
        let (p, before) = (&p, before.clone());
        async move { p.version() != before }
    })
    .await;
    assert_eq!(sum(&scrape(&p).1, "istio_requests_total", &[("destination_service", "slow.test")]), 1.0);
    // A reload that removes it drops its series.
    let without: String = yaml.replace(
        "  - match:\n    - uri:\n        prefix: /slow\n    route:\n    - destination:\n        host: slow.test\n",
        "",
    );
    let without = without.split("---\n").filter(|doc| !doc.contains("slow.test")).collect::<Vec<_>>().join("---\n");
    let before = p.version();
    p.write(&without);
    wait_until(Duration::from_secs(3), "reload applied", || {
        let (p, before) = (&p, before.clone());
        async move { p.version() != before }
    })
    .await;
    let (text, _) = scrape(&p);
    assert!(!text.contains("slow.test"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_text_format() {
    let v1 = echo("v1").await;
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let p = TestProxy::start(&yaml).await;
    let addr = remora::telemetry::server::serve("127.0.0.1:0".parse().unwrap(), p.proxy.clone()).await.unwrap();
    let c = client();
    get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await;
    for path in ["/metrics", "/stats/prometheus"] {
        let resp = c.get(format!("http://{addr}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let text = resp.text().await.unwrap();
        assert!(text.contains("# TYPE istio_requests_total counter"), "{text}");
        assert!(
            text.contains("remora_cluster_upstream_rq_total_total")
                || text.contains("remora_cluster_upstream_rq_total"),
            "{text}"
        );
    }
    assert_eq!(c.get(format!("http://{addr}/nope")).send().await.unwrap().status(), 404);
    assert_eq!(c.post(format!("http://{addr}/metrics")).send().await.unwrap().status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_are_tcp_metrics() {
    use futures_util::{SinkExt, StreamExt};
    // A WebSocket echo upstream.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("ws", "ws.test", 80, "HTTP", &[(ws_addr, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: ws.test\n")
    );
    let p = TestProxy::start(&yaml).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat")).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("hello")).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "hello");
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    wait_until(Duration::from_secs(3), "tunnel closed and counted", || {
        let p = &p;
        async move { sum(&scrape(p).1, "istio_tcp_connections_closed_total", &[("destination_service", "ws.test")]) == 1.0 }
    })
    .await;
    let (_, s) = scrape(&p);
    assert_eq!(sum(&s, "istio_tcp_connections_opened_total", &[("request_protocol", "tcp")]), 1.0);
    assert!(sum(&s, "istio_tcp_received_bytes_total", &[]) >= 5.0);
    assert!(sum(&s, "istio_tcp_sent_bytes_total", &[]) >= 5.0);
}

/// Kills the child on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_and_scrape_from_the_binary() {
    use std::io::BufRead;
    let v1 = echo("v1").await;
    let (port, admin, metrics) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - name: main\n    route:\n    - destination:\n        host: svc.test\n")
    );
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_remora"))
        .args([
            "run",
            "--log-format",
            "json",
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ])
        .args(["--health", &format!("127.0.0.1:{}", free_port())])
        .arg("--config")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let c = client();
    wait_until(Duration::from_secs(10), "ready", || {
        let c = c.clone();
        async move {
            c.get(format!("http://127.0.0.1:{admin}/ready")).send().await.map(|r| r.status() == 200).unwrap_or(false)
        }
    })
    .await;
    let resp = c
        .post(format!("http://127.0.0.1:{port}/orders?id=7"))
        .header("x-request-id", "req-42")
        .header("user-agent", "probe/1.0")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let line = rx.recv_timeout(Duration::from_secs(5)).expect("an access-log line");
    let j: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("JSON line: {line}"));
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/orders?id=7");
    assert_eq!(j["protocol"], "HTTP/1.1");
    assert_eq!(j["response_code"], 200);
    assert_eq!(j["response_flags"], "-");
    assert_eq!(j["request_id"], "req-42");
    assert_eq!(j["user_agent"], "probe/1.0");
    assert_eq!(j["upstream_cluster"], "outbound|80||svc.test");
    assert_eq!(j["upstream_host"], v1.to_string());
    assert_eq!(j["route_name"], "main");
    assert!(j["bytes_received"].as_u64().unwrap() >= 5);
    assert!(j["bytes_sent"].as_u64().unwrap() > 0);
    assert!(j["start_time"].as_str().unwrap().ends_with('Z'));
    // The same request in the scrape.
    let text =
        c.get(format!("http://127.0.0.1:{metrics}/stats/prometheus")).send().await.unwrap().text().await.unwrap();
    let s = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(sum(&s, "istio_requests_total", &[("destination_service", "svc.test"), ("response_code", "200")]), 1.0);
}
