//! The command line: `validate` output and exit codes, `run` refusing an
//! invalid first config, `split --print-config` routing exactly like `split`,
//! the demo config, and Istio's own Bookinfo samples.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use remora::config::compile::{CompileOptions, compile};
use remora::config::load::{load_paths, load_str};
use remora::upstream::Registry;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_remora");

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples/bookinfo")
}

/// Kills the child on drop, so a failed assertion never leaks a process.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn validate_prints_a_summary_or_every_error() {
    let out = Command::new(BIN).args(["validate", "--config", "config/demo.yaml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("listeners (1)"), "{stdout}");
    assert!(stdout.contains("outbound|80|v2|echo.demo.local"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: a\nspec:\n  hosts: [a]\n  http:\n  - route:\n    - destination:\n        host: nowhere\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: b\nspec:\n  host: b\n  subsets:\n  - name: v1\n    labelz: {}\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["validate", "--config"]).arg(&bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // Both errors, each with file and line.
    assert!(stdout.contains("bad.yaml:20"), "unknown field with its line: {stdout}");
    assert!(stdout.contains("labelz"), "{stdout}");
}

/// `remora validate | head`: a reader that goes away ends the output
/// quietly, with the command's own exit code, not a panic.
#[test]
fn validate_output_to_a_closed_pipe_is_not_a_crash() {
    let mut child = Command::new(BIN)
        .args(["validate", "--config", "config/demo.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // closed before remora has written anything
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn run_exits_64_on_an_invalid_first_config_or_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Nonsense\nmetadata:\n  name: x\n",
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let (metrics, health) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let out = Command::new(BIN)
        .args(["run", "--admin", &admin, "--metrics", &metrics, "--health", &health, "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    // The admin API is never served off loopback.
    let out = Command::new(BIN)
        .args(["run", "--admin", "0.0.0.0:1", "--metrics", &metrics, "--health", &health, "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let out = Command::new(BIN).args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).args(["run", "--config", "x", "--workload-labels", "novalue"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_binary_becomes_ready() {
    let v1 = echo("v1").await;
    let (port, admin, health) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let _child = ChildGuard(
        Command::new(BIN)
            .args([
                "run",
                "--admin",
                &format!("127.0.0.1:{admin}"),
                "--metrics",
                &format!("127.0.0.1:{}", free_port()),
                "--health",
                &format!("127.0.0.1:{health}"),
                "--concurrency",
                "1",
                "--log-format",
                "json",
                "--config",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // `remora wait` on the health port returns once the proxy is ready, as a
    // postStart hook would; traffic flows from that moment on.
    let url = format!("http://127.0.0.1:{health}/healthz/ready");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN).args(["wait", "--url", &url, "--timeout", "10s", "--period", "50ms"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is ready"));
    let c = client();
    let ready = c.get(format!("http://127.0.0.1:{admin}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
}

#[test]
fn wait_gives_up_with_a_reason() {
    // Nothing listens on this port: the wait ends at its timeout, exit 1,
    // and says what the last attempt saw.
    let url = format!("http://127.0.0.1:{}/healthz/ready", free_port());
    let out =
        Command::new(BIN).args(["wait", "--url", &url, "--timeout", "300ms", "--period", "50ms"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready after") && err.contains("connect"), "{err}");
    let out = Command::new(BIN).args(["wait", "--url", "https://127.0.0.1:1/"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_print_config_routes_like_split() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let (split_port, split_admin, run_port) = (free_port(), free_port(), free_port());
    let args = |listen: u16| -> Vec<String> {
        vec![
            "split".into(),
            "--listen".into(),
            format!("127.0.0.1:{listen}"),
            "--backend".into(),
            format!("v1=http://{v1}"),
            "--backend".into(),
            format!("v2=http://localhost:{}", v2.port()),
            "--weight".into(),
            "v1=100".into(),
            "--weight".into(),
            "v2=0".into(),
            "--rule".into(),
            "header:x-user=beta@v2".into(),
            "--rule".into(),
            "cookie:group=b@v2".into(),
            "--rule".into(),
            "query:variant=b@v2".into(),
        ]
    };
    // The printed YAML, served by `remora run` (in-process here).
    let out = Command::new(BIN).args(args(run_port)).arg("--print-config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("kind: VirtualService"), "{yaml}");
    let _run = TestProxy::start(&yaml).await;
    // `remora split` itself, as a process.
    let _split = ChildGuard(
        Command::new(BIN)
            .args(args(split_port))
            .args(["--admin", &format!("127.0.0.1:{split_admin}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    wait_until(Duration::from_secs(10), "split ready", || {
        let c = c.clone();
        async move {
            c.get(format!("http://127.0.0.1:{split_admin}/ready"))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        }
    })
    .await;
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("/", vec![], "v1"),
        ("/", vec![("x-user", "beta")], "v2"),
        ("/", vec![("x-user", "Beta")], "v1"),
        ("/", vec![("cookie", "a=1; group=b; c=2")], "v2"),
        ("/", vec![("cookie", "group=bb")], "v1"),
        ("/?variant=b", vec![], "v2"),
        ("/?variant=a", vec![], "v1"),
    ];
    for (path, headers, want) in cases {
        for port in [split_port, run_port] {
            let (status, body) = get(&c, &format!("http://127.0.0.1:{port}{path}"), &headers).await;
            assert_eq!((status, version_of(&body).as_str()), (200, want), "port {port} {path} {headers:?}");
        }
    }
}

#[test]
fn split_rejects_bad_flags() {
    for bad in [
        vec!["split", "--backend", "v1=http://127.0.0.1:1", "--weight", "v2=5"],
        vec!["split", "--backend", "v1=http://127.0.0.1:1", "--backend", "v2=http://127.0.0.1:2", "--weight", "v1=5"],
        vec!["split", "--backend", "v1=http://127.0.0.1:1", "--rule", "header:x=y@v9"],
        vec!["split", "--backend", "v1=https://127.0.0.1:1"],
    ] {
        let out = Command::new(BIN).args(&bad).arg("--print-config").output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn demo_config_compiles() {
    let set = load_str(Path::new("config/demo.yaml"), remora::cli::demo::DEMO_YAML, "default");
    let snap =
        compile(&set, &CompileOptions { namespace: "default".into(), ..Default::default() }, &Registry::new()).unwrap();
    assert_eq!(snap.listeners.len(), 1);
    assert_eq!(snap.listeners[0].addr.to_string(), remora::cli::demo::DEMO_PROXY);
    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    // Every example config in config/ compiles.
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        let set = load_paths(std::slice::from_ref(&path), "default");
        let res =
            compile(&set, &CompileOptions { namespace: "default".into(), ..Default::default() }, &Registry::new());
        assert!(res.is_ok(), "{}: {:?}", path.display(), res.err());
    }
}

/// ServiceEntries that stand in for Bookinfo's Kubernetes Services, with one
/// endpoint per version, on `port`.
fn bookinfo_services(port: u16, eps: &[(&str, &str, std::net::SocketAddr)]) -> String {
    let mut y = String::new();
    for svc in ["productpage", "reviews", "ratings", "details"] {
        let list: Vec<(std::net::SocketAddr, &str)> =
            eps.iter().filter(|(s, _, _)| *s == svc).map(|(_, v, a)| (*a, *v)).collect();
        y.push_str(&service_entry(svc, svc, port, "HTTP", &list));
    }
    y
}

#[test]
fn every_bookinfo_sample_is_accepted() {
    let dead: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let eps = [("productpage", "v1", dead), ("reviews", "v1", dead), ("ratings", "v1", dead), ("details", "v1", dead)];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), bookinfo_services(9080, &eps)).unwrap();
    let opts = CompileOptions { namespace: "default".into(), ..Default::default() };
    let dr = samples().join("destination-rule-all.yaml");
    for file in std::fs::read_dir(samples()).unwrap() {
        let file = file.unwrap().path();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.starts_with("destination-rule") {
            continue;
        }
        // fault-injection-details-v1.yaml brings its own DestinationRule
        // `details` (subset v1 only), which destination-rule-all.yaml defines
        // differently (v1 and v2); it is applied on its own, as in Istio's task.
        let mut paths = vec![dir.path().join("services.yaml"), file.clone()];
        if !name.starts_with("fault-injection-details") {
            paths.push(dr.clone());
        }
        let set = load_paths(&paths, "default");
        let res = compile(&set, &opts, &Registry::new());
        assert!(res.is_ok(), "{name}: {:#?}", res.err());
    }
    // Loading both definitions of `details` at once is ambiguous: an error
    // that names both places, not a silent pick.
    let set = load_paths(
        &[dir.path().join("services.yaml"), samples().join("fault-injection-details-v1.yaml"), dr.clone()],
        "default",
    );
    let errs = compile(&set, &opts, &Registry::new()).unwrap_err();
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert!(
        text.iter().any(|e| e.contains("defined twice")
            && e.contains("fault-injection-details-v1.yaml")
            && e.contains("destination-rule-all.yaml")),
        "{text:#?}"
    );
    // mTLS DestinationRules need workload certificates: a clear error, never
    // a silent plaintext fallback.
    let set =
        load_paths(&[dir.path().join("services.yaml"), samples().join("destination-rule-all-mtls.yaml")], "default");
    let errs = compile(&set, &opts, &Registry::new()).unwrap_err();
    assert!(errs.iter().any(|e| e.is_error() && e.to_string().contains("ISTIO_MUTUAL")), "{errs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_request_routing_and_traffic_shifting() {
    let (r1, r2, r3) = (echo("v1").await, echo("v2").await, echo("v3").await);
    let rt = echo("ratings-v1").await;
    let (pp, dt) = (echo("productpage-v1").await, echo("details-v1").await);
    let port = free_port();
    let eps = [
        ("productpage", "v1", pp),
        ("reviews", "v1", r1),
        ("reviews", "v2", r2),
        ("reviews", "v3", r3),
        ("ratings", "v1", rt),
        ("details", "v1", dt),
    ];
    let sidecar = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\nspec:\n  egress:\n  - port:\n      number: {port}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts:\n    - \"./*\"\n---\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), format!("{}{sidecar}", bookinfo_services(port, &eps))).unwrap();
    let apply = |files: &[&str]| {
        for f in ["routes-a.yaml", "routes-b.yaml"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        for (i, f) in files.iter().enumerate() {
            std::fs::copy(samples().join(f), dir.path().join(format!("routes-{}.yaml", ["a", "b"][i]))).unwrap();
        }
    };
    std::fs::copy(samples().join("destination-rule-all.yaml"), dir.path().join("dr.yaml")).unwrap();
    apply(&["virtual-service-all-v1.yaml"]);
    let opts = remora::runtime::RunOptions {
        config_paths: vec![dir.path().to_path_buf()],
        compile: CompileOptions { namespace: "default".into(), ..Default::default() },
    };
    let (proxy, _) = remora::cli::start_proxy(opts, None).await.unwrap();
    let c = client();
    let url = format!("http://127.0.0.1:{port}/reviews/0");
    let reviews = |user: Option<&'static str>| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let headers: Vec<(&str, &str)> = user.map(|u| vec![("end-user", u)]).unwrap_or_default();
            let (status, body) = get(&c, &url, &[&[("host", "reviews:9080")][..], &headers].concat()).await;
            assert_eq!(status, 200, "{body}");
            version_of(&body)
        }
    };
    // All v1: no stars for anyone.
    for _ in 0..10 {
        assert_eq!(reviews(Some("jason")).await, "v1");
    }
    // reviews-test-v2: jason (exact, case-sensitive) → v2, everyone else → v1.
    apply(&["virtual-service-reviews-test-v2.yaml"]);
    assert!(matches!(proxy.reload_from_files().await, remora::runtime::ApplyOutcome::Applied { .. }));
    for _ in 0..10 {
        assert_eq!(reviews(Some("jason")).await, "v2");
        assert_eq!(reviews(Some("Jason")).await, "v1");
        assert_eq!(reviews(None).await, "v1");
    }
    // Traffic shifting 50/50 between v1 and v3.
    apply(&["virtual-service-reviews-50-v3.yaml"]);
    assert!(matches!(proxy.reload_from_files().await, remora::runtime::ApplyOutcome::Applied { .. }));
    let mut v3 = 0;
    let n = 2000;
    for _ in 0..n {
        let v = reviews(None).await;
        assert!(v == "v1" || v == "v3", "{v}");
        v3 += usize::from(v == "v3");
    }
    let share = v3 as f64 / n as f64;
    assert!((share - 0.5).abs() < 0.045, "v3 share {share}");
    // Then everything to v3.
    apply(&["virtual-service-reviews-v3.yaml"]);
    assert!(matches!(proxy.reload_from_files().await, remora::runtime::ApplyOutcome::Applied { .. }));
    for _ in 0..20 {
        assert_eq!(reviews(None).await, "v3");
    }
    // Fault injection (abort) for jason on ratings.
    apply(&["virtual-service-ratings-test-abort.yaml"]);
    assert!(matches!(proxy.reload_from_files().await, remora::runtime::ApplyOutcome::Applied { .. }));
    let ratings = format!("http://127.0.0.1:{port}/ratings/0");
    let (status, _) = get(&c, &ratings, &[("host", "ratings:9080"), ("end-user", "jason")]).await;
    assert_eq!(status, 500);
    let (status, body) = get(&c, &ratings, &[("host", "ratings:9080")]).await;
    assert_eq!((status, version_of(&body).as_str()), (200, "ratings-v1"));
}
