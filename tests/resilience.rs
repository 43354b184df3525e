//! Resilience on real sockets: circuit breaking (Istio's task made
//! deterministic), outlier ejection and return, retries, per-try and route
//! timeouts, fault percentages, mirroring — and Istio's task scenarios.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// What a scripted upstream does with one request.
#[derive(Clone, Copy)]
enum Reply {
    /// Status and body after a delay.
    Status(u16, Duration),
    /// Close the connection without answering.
    Close,
}

/// A raw HTTP/1.1 upstream whose replies follow `script(n)` for the n-th
/// request (0-based). It records each request's head and body length.
struct Scripted {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn scripted(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Scripted {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (c, h) = (count.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let (c, h, script) = (c.clone(), h.clone(), script.clone());
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                loop {
                    // Read one request: head, then a content-length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body_len = len;
                    buf.drain(..head_end + len);
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    h.lock().unwrap().push(format!("{head}body-bytes: {body_len}\r\n"));
                    match script(n) {
                        Reply::Close => return,
                        Reply::Status(code, delay) => {
                            tokio::time::sleep(delay).await;
                            let body = format!("reply {n}");
                            let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Scripted { addr, count, heads }
}

fn one_service(name: &str, eps: &[(SocketAddr, &str)], policy: Option<&str>, http: &str) -> (String, u16) {
    let port = free_port();
    let versions: Vec<&str> = eps.iter().map(|(_, v)| *v).collect();
    let yaml = format!(
        "{}{}{}{}",
        service_entry(name, &format!("{name}.test"), 80, "HTTP", eps),
        destination_rule(name, &format!("{name}.test"), &versions, policy),
        gateway("gw", port),
        gateway_vs(name, "gw", http)
    );
    (yaml, port)
}

fn route_to(host: &str) -> String {
    format!("  - route:\n    - destination:\n        host: {host}\n")
}

fn stat(p: &TestProxy, cluster_suffix: &str, name: &str) -> u64 {
    let snap = p.proxy.snapshot();
    let c = snap.clusters.iter().find(|c| c.name.ends_with(cluster_suffix)).expect("cluster");
    c.shared().stats.snapshot().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).unwrap_or(0)
}

/// Istio's circuit-breaking task (reference §7.5), deterministic: the upstream
/// holds each request, so of k simultaneous requests exactly two are admitted
/// (one active, one pending) and the rest get 503 UO at once. The overflows
/// do not count toward `consecutive5xxErrors: 1`: the only endpoint is not
/// ejected and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaking_task() {
    let up = scripted(|_| Reply::Status(200, Duration::from_millis(400))).await;
    let policy = "connectionPool:\n  tcp:\n    maxConnections: 1\n  http:\n    http1MaxPendingRequests: 1\n    maxRequestsPerConnection: 1\noutlierDetection:\n  consecutive5xxErrors: 1\n  interval: 1s\n  baseEjectionTime: 3m\n  maxEjectionPercent: 100";
    let (yaml, port) = one_service("httpbin", &[(up.addr, "v1")], Some(policy), &route_to("httpbin.test"));
    let p = TestProxy::start(&yaml).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/get");
    let k = 6;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..k {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.unwrap();
            let overloaded = r.headers().get("x-envoy-overloaded").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), overloaded, Instant::now())
        }));
    }
    let mut ok = 0;
    let mut overflowed = 0;
    for t in tasks {
        let (status, overloaded, at) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(overloaded.as_deref(), Some("true"));
                assert!(at - started < Duration::from_millis(350), "overflow answered at once");
                overflowed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, overflowed), (2, k - 2));
    assert_eq!(up.count.load(Ordering::SeqCst), 2, "only the admitted requests reached the upstream");
    assert_eq!(stat(&p, "httpbin.test", "upstream_rq_pending_overflow"), (k - 2) as u64);
    // Still serving: overflows never eject.
    let (status, _) = get(&c, &url, &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_is_ejected_and_returns() {
    let good1 = scripted(|_| Reply::Status(200, Duration::ZERO)).await;
    let good2 = scripted(|_| Reply::Status(200, Duration::ZERO)).await;
    let bad = scripted(|_| Reply::Status(500, Duration::ZERO)).await;
    let policy = "loadBalancer:\n  simple: ROUND_ROBIN\noutlierDetection:\n  consecutive5xxErrors: 2\n  interval: 300ms\n  baseEjectionTime: 1s\n  maxEjectionPercent: 34";
    let (yaml, port) = one_service(
        "svc",
        &[(good1.addr, "a"), (good2.addr, "b"), (bad.addr, "c")],
        Some(policy),
        &route_to("svc.test"),
    );
    let p = TestProxy::start(&yaml).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    // Round robin: the bad endpoint sees every third request; after its
    // second 500 it is ejected.
    for _ in 0..6 {
        get(&c, &url, &[]).await;
    }
    assert_eq!(bad.count.load(Ordering::SeqCst), 2);
    let ejected_at = Instant::now();
    assert_eq!(stat(&p, "svc.test", "upstream_rq_total"), 6);
    {
        let snap = p.proxy.snapshot();
        let d = snap.clusters[0].shared().detector.as_ref().unwrap();
        assert_eq!(d.stats.ejections_active.load(Ordering::SeqCst), 1);
    }
    // While ejected it gets nothing, and clients see only successes.
    while ejected_at.elapsed() < Duration::from_millis(800) {
        let (status, _) = get(&c, &url, &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(bad.count.load(Ordering::SeqCst), 2);
    // Released on an interval tick after baseEjectionTime: traffic returns.
    wait_until(Duration::from_secs(3), "bad endpoint back in rotation", || {
        let (c, url, bad) = (c.clone(), url.clone(), bad.count.clone());
        async move {
            get(&c, &url, &[]).await;
            bad.load(Ordering::SeqCst) > 2
        }
    })
    .await;
    let back_after = ejected_at.elapsed();
    assert!(back_after >= Duration::from_secs(1), "not before the ejection time: {back_after:?}");
    // Two more failures re-eject it, now for 2 × base (the interval is long
    // enough that the backoff has not decayed in between).
    for _ in 0..9 {
        get(&c, &url, &[]).await;
    }
    let reejected = Instant::now();
    let before = bad.count.load(Ordering::SeqCst);
    while reejected.elapsed() < Duration::from_millis(1500) {
        get(&c, &url, &[]).await;
    }
    assert_eq!(bad.count.load(Ordering::SeqCst), before, "second ejection lasts longer than the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoints_ejected_is_503_uh() {
    let bad = scripted(|_| Reply::Status(503, Duration::ZERO)).await;
    let policy = "outlierDetection:\n  consecutive5xxErrors: 1\n  interval: 1s\n  baseEjectionTime: 30s\n  maxEjectionPercent: 100";
    let (yaml, port) = one_service("svc", &[(bad.addr, "a")], Some(policy), &route_to("svc.test"));
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get(&c, &url, &[]).await.0, 503);
    let (status, body) = get(&c, &url, &[]).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    assert_eq!(bad.count.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_reset_before_response_and_attempt_count() {
    // The first request's connection is closed without an answer.
    let up = scripted(|n| if n == 0 { Reply::Close } else { Reply::Status(200, Duration::ZERO) }).await;
    let http = "  - retries:\n      attempts: 2\n      retryOn: reset\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let resp = client().post(format!("http://127.0.0.1:{port}/pay")).body("amount=5").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count.load(Ordering::SeqCst), 2);
    let heads = up.heads.lock().unwrap().clone();
    assert!(heads[1].to_ascii_lowercase().contains("x-envoy-attempt-count: 2"), "{}", heads[1]);
    assert!(heads[1].contains("body-bytes: 8"), "the body was replayed: {}", heads[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_never_retries_a_post_on_503() {
    let up = scripted(|_| Reply::Status(503, Duration::ZERO)).await;
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, &route_to("svc.test"));
    let p = TestProxy::start(&yaml).await;
    let resp = client().post(format!("http://127.0.0.1:{port}/pay")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(up.count.load(Ordering::SeqCst), 1, "Istio >= 1.24: 503 is not in the default retry set");
    drop(p);

    // With `retryOn: 503` (and a bigger budget) it is retried, body included.
    let up =
        scripted(|n| if n < 2 { Reply::Status(503, Duration::ZERO) } else { Reply::Status(201, Duration::ZERO) }).await;
    let http = "  - retries:\n      attempts: 3\n      retryOn: \"503\"\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let p = TestProxy::start(&yaml).await;
    let resp = client().post(format!("http://127.0.0.1:{port}/pay")).body("x".repeat(1000)).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(up.count.load(Ordering::SeqCst), 3);
    for h in up.heads.lock().unwrap().iter() {
        assert!(h.contains("body-bytes: 1000"), "{h}");
    }
    assert_eq!(stat(&p, "svc.test", "upstream_rq_retry"), 2);
    assert_eq!(stat(&p, "svc.test", "upstream_rq_retry_success"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_with_the_last_response() {
    let up = scripted(|_| Reply::Status(502, Duration::ZERO)).await;
    let http = "  - retries:\n      attempts: 2\n      retryOn: gateway-error\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let p = TestProxy::start(&yaml).await;
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, body.as_str()), (502, "reply 2"), "the last upstream response is returned");
    assert_eq!(up.count.load(Ordering::SeqCst), 3);
    assert_eq!(stat(&p, "svc.test", "upstream_rq_retry_limit_exceeded"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_not_replayed() {
    let up = scripted(|_| Reply::Status(503, Duration::ZERO)).await;
    let http = "  - retries:\n      attempts: 3\n      retryOn: \"503\"\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let resp = client().post(format!("http://127.0.0.1:{port}/")).body(vec![b'x'; 200 * 1024]).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(up.count.load(Ordering::SeqCst), 1, "a body above the 64 KiB replay buffer is sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_and_route_timeout_caps_all() {
    // First attempt hangs for 2 s, the second answers at once.
    let up =
        scripted(
            |n| if n == 0 { Reply::Status(200, Duration::from_secs(2)) } else { Reply::Status(200, Duration::ZERO) },
        )
        .await;
    let http = "  - timeout: 1s\n    retries:\n      attempts: 2\n      perTryTimeout: 100ms\n      retryOn: 5xx\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let p = TestProxy::start(&yaml).await;
    let started = Instant::now();
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "reply 1"));
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(stat(&p, "svc.test", "upstream_rq_per_try_timeout"), 1);
    drop(p);

    // Every attempt hangs: the route timeout covers all of them → 504 UT.
    let up = scripted(|_| Reply::Status(200, Duration::from_secs(3))).await;
    let http = "  - timeout: 300ms\n    retries:\n      attempts: 5\n      perTryTimeout: 100ms\n      retryOn: 5xx\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(up.addr, "a")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let started = Instant::now();
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(900), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_percentages_are_statistical() {
    let v1 = echo("v1").await;
    let http = "  - fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 30\n    route:\n    - destination:\n        host: svc.test\n";
    let (yaml, port) = one_service("svc", &[(v1, "v1")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let n = 2000;
    let mut aborted = 0;
    for _ in 0..n {
        if get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await.0 == 503 {
            aborted += 1;
        }
    }
    let share = aborted as f64 / n as f64;
    let sd = (0.3f64 * 0.7 / n as f64).sqrt();
    assert!((share - 0.3).abs() < 4.0 * sd, "abort share {share}");
}

/// A scripted upstream answering 200 after `delay`, recording Host headers.
async fn host_recorder(delay: Duration) -> Scripted {
    scripted(move |_| Reply::Status(200, delay)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_is_fire_and_forget_with_shadow_host() {
    let primary = host_recorder(Duration::ZERO).await;
    let mirror = host_recorder(Duration::from_secs(2)).await;
    let http = "  - route:\n    - destination:\n        host: svc.test\n        subset: v1\n    mirror:\n      host: svc.test\n      subset: v2\n";
    let (yaml, port) = one_service("svc", &[(primary.addr, "v1"), (mirror.addr, "v2")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let started = Instant::now();
    let resp = c
        .post(format!("http://127.0.0.1:{port}/headers"))
        .header("host", "httpbin:8000")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(1000), "a slow mirror does not slow the primary");
    wait_until(Duration::from_secs(3), "mirror received the copy", || {
        let m = mirror.count.clone();
        async move { m.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let head = mirror.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("host: httpbin-shadow:8000"), "{head}");
    assert!(head.contains("body-bytes: 7"), "{head}");
    assert_eq!(primary.count.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_percentages() {
    let primary = host_recorder(Duration::ZERO).await;
    let mirror = host_recorder(Duration::ZERO).await;
    let http = "  - match:\n    - uri:\n        prefix: /none\n    route:\n    - destination:\n        host: svc.test\n        subset: v1\n    mirror:\n      host: svc.test\n      subset: v2\n    mirrorPercentage:\n      value: 0\n  - route:\n    - destination:\n        host: svc.test\n        subset: v1\n    mirror:\n      host: svc.test\n      subset: v2\n    mirrorPercentage:\n      value: 50\n";
    let (yaml, port) = one_service("svc", &[(primary.addr, "v1"), (mirror.addr, "v2")], None, http);
    let p = TestProxy::start(&yaml).await;
    let c = client();
    for _ in 0..50 {
        get(&c, &format!("http://127.0.0.1:{port}/none"), &[]).await;
    }
    let n = 600;
    for _ in 0..n {
        get(&c, &format!("http://127.0.0.1:{port}/half"), &[]).await;
    }
    wait_until(Duration::from_secs(5), "mirrors settled", || {
        let (p, m) = (&p, mirror.count.clone());
        async move { stat(p, "|v2|svc.test", "upstream_rq_mirror") as usize == m.load(Ordering::SeqCst) }
    })
    .await;
    let mirrored = mirror.count.load(Ordering::SeqCst);
    let sd = (0.25f64 / n as f64).sqrt() * n as f64;
    assert!((mirrored as f64 - n as f64 / 2.0).abs() < 4.0 * sd, "mirrored {mirrored} of {n}");
}

/// Istio's request-timeouts task (reference §7.4) with echo stand-ins: a
/// 2 s delay on ratings (deprecated integer `percent`) behind a 0.5 s
/// timeout on reviews gives 504 after 0.5 s; the header override waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_request_timeouts_task() {
    let slow = host_recorder(Duration::from_secs(2)).await;
    let http = "  - timeout: 0.5s\n    route:\n    - destination:\n        host: reviews.test\n";
    let (yaml, port) = one_service("reviews", &[(slow.addr, "v2")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let started = Instant::now();
    let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/reviews/0"), &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(slow.count.load(Ordering::SeqCst), 1, "a route timeout is not retried");
    let (status, _) =
        get(&c, &format!("http://127.0.0.1:{port}/reviews/0"), &[("x-envoy-upstream-rq-timeout-ms", "3000")]).await;
    assert_eq!(status, 200);
}

/// Istio's fault-injection task (reference §7.3) on the Bookinfo sample file:
/// jason's calls to ratings are delayed 7 s; everyone else's are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_fault_injection_delay_task() {
    let ratings = echo("ratings-v1").await;
    let port = free_port();
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples/bookinfo");
    let delay = std::fs::read_to_string(samples.join("virtual-service-ratings-test-delay.yaml")).unwrap();
    let dr = std::fs::read_to_string(samples.join("destination-rule-all.yaml")).unwrap();
    let sidecar = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\nspec:\n  egress:\n  - port:\n      number: {port}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts:\n    - \"./*\"\n---\n"
    );
    let mut services = String::new();
    for svc in ["productpage", "reviews", "details"] {
        services.push_str(&service_entry(svc, svc, port, "HTTP", &[(ratings, "v1")]));
    }
    services.push_str(&service_entry("ratings", "ratings", port, "HTTP", &[(ratings, "v1")]));
    let yaml = format!("{services}{sidecar}{dr}\n---\n{delay}");
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/ratings/0");
    let started = Instant::now();
    let jason = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &[("host", "ratings:9080"), ("end-user", "jason")]).await }
    });
    let (status, _) = get(&c, &url, &[("host", "ratings:9080"), ("end-user", "mike")]).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(2), "other users are not delayed");
    let (status, body) = jason.await.unwrap();
    assert_eq!((status, version_of(&body).as_str()), (200, "ratings-v1"), "delayed, then the real response");
    assert!(started.elapsed() >= Duration::from_secs(7));
}

/// Istio's mirroring task (reference §7.6): all traffic to httpbin v1,
/// mirrored 100 % to v2; v2 sees `httpbin-shadow:8000`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mirroring_task() {
    let v1 = host_recorder(Duration::ZERO).await;
    let v2 = host_recorder(Duration::ZERO).await;
    let http = "  - route:\n    - destination:\n        host: httpbin.test\n        subset: v1\n      weight: 100\n    mirror:\n      host: httpbin.test\n      subset: v2\n    mirrorPercentage:\n      value: 100.0\n";
    let (yaml, port) = one_service("httpbin", &[(v1.addr, "v1"), (v2.addr, "v2")], None, http);
    let _p = TestProxy::start(&yaml).await;
    let (status, _) = get(&client(), &format!("http://127.0.0.1:{port}/headers"), &[("host", "httpbin:8000")]).await;
    assert_eq!(status, 200);
    wait_until(Duration::from_secs(3), "v2 log shows the request", || {
        let n = v2.count.clone();
        async move { n.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let v1_head = v1.heads.lock().unwrap()[0].clone();
    assert!(v1_head.starts_with("GET /headers HTTP/1.1"), "{v1_head}");
    assert!(v1_head.to_ascii_lowercase().contains("x-envoy-attempt-count: 1"), "{v1_head}");
    let v2_head = v2.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(v2_head.starts_with("get /headers http/1.1"), "{v2_head}");
    assert!(v2_head.contains("host: httpbin-shadow:8000"), "{v2_head}");
}

#[test]
fn validate_warns_when_max_ejection_percent_forbids_ejection() {
    let eps: Vec<(SocketAddr, &str)> = (1..=3).map(|i| (format!("127.0.0.{i}:80").parse().unwrap(), "v1")).collect();
    let yaml = format!(
        "{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &eps),
        destination_rule("svc", "svc.test", &[], Some("outlierDetection:\n  consecutive5xxErrors: 3"))
    ) + &gateway("gw", 1)
        + &gateway_vs("vs", "gw", &route_to("svc.test"));
    let set = remora::config::load::load_str(std::path::Path::new("t.yaml"), &yaml, "default");
    let snap = remora::config::compile::compile(&set, &Default::default(), &remora::upstream::Registry::new()).unwrap();
    let w: Vec<String> = snap.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter().any(|w| w.contains("3 endpoint(s) and maxEjectionPercent 10") && w.contains("at least 34")),
        "{w:#?}"
    );
}
