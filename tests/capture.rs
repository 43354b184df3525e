//! Transparent capture end to end: two "pods", each a network namespace this
//! test creates, joined directly by a veth pair (no test traffic passes
//! through the host's own namespace; every address is one the test assigns
//! inside its namespaces). Each pod has `remora iptables` capture rules and
//! a sidecar (`remora run --capture`, as UID 1337 like Istio's proxy). App A
//! calls pod B's address on the app port with no proxy settings; the call
//! is captured on both sides, carried over mTLS with B's app seeing A's
//! SPIFFE identity, routed by a VirtualService (an A/B header rule and a
//! weighted split across two versions of B), and counted in both sidecars'
//! metrics. Non-HTTP TCP passes through, and neither sidecar's own traffic
//! is captured again.
//!
//! Needs root, iproute2, iptables, curl and `setpriv` (util-linux); without them it
//! says why and skips, unless `REMORA_REQUIRE_NETNS=1` (as `.ci/run` sets).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::certs::Ca;
use support::netns::{self, Child, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_remora");
const TEST: &str = "two_pods_capture_mtls_routing_and_tcp_passthrough";
const NS: &str = "test";
const HOST: &str = "b.test.svc.cluster.local";

/// Pod A's routing: B's two versions, an A/B rule and a 50/50 split.
fn config_a(ip_b: IpAddr, vip: IpAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: {NS}}}
spec:
  hosts: [{HOST}]
  addresses: [{vip}]
  ports: [{{number: 8080, name: http}}]
  resolution: STATIC
  subjectAltNames: ["spiffe://cluster.local/ns/{NS}/sa/b"]
  endpoints:
  - address: {ip_b}
    labels: {{app: b, version: v1, security.istio.io/tlsMode: istio}}
  - address: {ip_b}
    ports: {{http: 8081}}
    labels: {{app: b, version: v2, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: b, namespace: {NS}}}
spec:
  host: {HOST}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: b, namespace: {NS}}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{headers: {{x-user: {{exact: beta}}}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 50}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 50}}
"#
    )
}

/// Pod B's policy: mesh peers with A's identity on the app ports, anyone on
/// the TCP port.
fn config_b() -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: b, namespace: {NS}}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/{NS}/sa/a"]}}}}]
  - to: [{{operation: {{ports: ["9000"]}}}}]
"#
    )
}

/// A directory the proxy (UID 1337) can read.
fn readable(dir: &Path) {
    for entry in walk(dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// One pod: its namespace, config and identity, and its sidecar.
struct Pod {
    ns: Netns,
    ip: IpAddr,
    _dir: tempfile::TempDir,
    _sidecar: Option<Child>,
}

impl Pod {
    fn start_sidecar(&mut self, name: &str, ca: &Ca, config: &str) {
        let dir = self._dir.path();
        std::fs::create_dir_all(dir.join("config")).unwrap();
        std::fs::write(dir.join("config/config.yaml"), config).unwrap();
        ca.workload(&format!("spiffe://cluster.local/ns/{NS}/sa/{name}")).write(&dir.join("identity"));
        readable(dir);
        let log = std::fs::File::create(dir.join("sidecar.log")).unwrap();
        // UID/GID 1337, as the capture rules expect of the proxy.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.0, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", BIN])
            .args(["run", "--capture", "--namespace", NS, "--workload-name", name])
            .arg("--workload-labels")
            .arg(format!("app={name},version=v1"))
            .arg("--config")
            .arg(dir.join("config"))
            .arg("--identity-dir")
            .arg(dir.join("identity"))
            .args(["--access-log", "off", "--log-level", "info,remora=debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self._sidecar = Some(Child(child));
    }

    /// Replaces the sidecar's config file (atomically; it hot-reloads).
    fn write_config(&self, yaml: &str) {
        let path = self._dir.path().join("config/config.yaml");
        support::write_atomic(&path, yaml);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// Waits for the sidecar's `/healthz/ready`.
    fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let health: SocketAddr = "127.0.0.1:15021".parse().unwrap();
        loop {
            if let Ok((200, _)) = self.ns.http_get(health, "localhost", "/healthz/ready", &[]) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "sidecar in {} not ready; log:\n{}", self.ns.0, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> String {
        let addr: SocketAddr = "127.0.0.1:15090".parse().unwrap();
        self.ns.http_get(addr, "localhost", "/stats/prometheus", &[]).unwrap().1
    }
}

/// Sum of a metric's samples whose labels contain every one of `labels`.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn two_pods_capture_mtls_routing_and_tcp_passthrough() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "iptables-restore", "setpriv", "curl"]) {
        return netns::skip(TEST, &why);
    }
    let id = std::process::id();
    let (ns_a, ns_b) = match (Netns::create(&format!("remora-a-{id}")), Netns::create(&format!("remora-b-{id}"))) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => return netns::skip(TEST, &why),
    };
    // A /24 of the test's own, inside its namespaces only.
    let net = 20 + id % 200;
    let (ip_a, ip_b): (IpAddr, IpAddr) =
        (format!("10.{net}.0.1").parse().unwrap(), format!("10.{net}.0.2").parse().unwrap());
    // The service's address, as a ClusterIP: no pod has it, capture does.
    let vip: IpAddr = format!("10.{net}.0.200").parse().unwrap();
    let (veth_a, veth_b) = (format!("rma{id}"), format!("rmb{id}"));
    let made = Command::new("ip")
        .args(["link", "add", &veth_a, "netns", &ns_a.0, "type", "veth", "peer", "name", &veth_b, "netns", &ns_b.0])
        .output()
        .unwrap();
    assert!(made.status.success(), "veth: {}", String::from_utf8_lossy(&made.stderr));
    for (ns, dev, ip) in [(&ns_a, &veth_a, ip_a), (&ns_b, &veth_b, ip_b)] {
        ns.ok("ip", &["addr", "add", &format!("{ip}/24"), "dev", dev]);
        ns.ok("ip", &["link", "set", dev, "up"]);
        // Istio's capture rules, installed as the init container would.
        ns.ok(BIN, &["iptables"]);
    }

    // Pod B's apps: two versions of an HTTP service and a TCP echo.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        remora::cli::echo::serve(ns_b.listen("0.0.0.0:8080".parse().unwrap()), "v1");
        remora::cli::echo::serve(ns_b.listen("0.0.0.0:8081".parse().unwrap()), "v2");
        let tcp = ns_b.listen("0.0.0.0:9000".parse().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });

    let ca = Ca::new("mesh root");
    let mut a = Pod { ns: ns_a, ip: ip_a, _dir: tempfile::tempdir().unwrap(), _sidecar: None };
    let mut b = Pod { ns: ns_b, ip: ip_b, _dir: tempfile::tempdir().unwrap(), _sidecar: None };
    a.start_sidecar("a", &ca, &config_a(ip_b, vip));
    b.start_sidecar("b", &ca, &config_b());
    a.wait_ready();
    b.wait_ready();

    // App A calls pod B's address on the app port, naming the service in
    // Host (as after a DNS lookup), with no proxy settings.
    let app_port = SocketAddr::new(b.ip, 8080);
    let host = format!("{HOST}:8080");
    let call = |headers: &[(&str, &str)]| {
        let (status, body) =
            a.ns.http_get(app_port, &host, "/hello", headers)
                .unwrap_or_else(|e| panic!("call failed: {e}\nsidecar A:\n{}\nsidecar B:\n{}", a.log(), b.log()));
        assert_eq!(status, 200, "{body}\nsidecar A:\n{}\nsidecar B:\n{}", a.log(), b.log());
        support::echo_json(&body)
    };
    // The A/B rule: x-user: beta always reaches v2, over mTLS, and B's app
    // sees A's identity in XFCC.
    for _ in 0..5 {
        let v = call(&[("x-user", "beta")]);
        assert_eq!(v["version"], "v2", "{v}");
        let xfcc = v["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default();
        assert!(xfcc.contains(&format!("URI=spiffe://cluster.local/ns/{NS}/sa/a")), "XFCC {xfcc:?}");
        assert!(xfcc.contains(&format!("By=spiffe://cluster.local/ns/{NS}/sa/b")), "XFCC {xfcc:?}");
    }
    // The 50/50 split reaches both versions.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let v = call(&[]);
        *seen.entry(v["version"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    assert!(seen.get("v1").copied().unwrap_or(0) >= 5 && seen.get("v2").copied().unwrap_or(0) >= 5, "{seen:?}");

    // The service's address routes like its name (Host is the address), and
    // a real client speaking HTTP/2 with prior knowledge is detected too.
    let by_vip = a.ns.http_get(SocketAddr::new(vip, 8080), &format!("{vip}:8080"), "/vip", &[("x-user", "beta")]);
    let (status, body) = by_vip.unwrap();
    assert_eq!((status, support::echo_json(&body)["version"].as_str()), (200, Some("v2")), "{body}");
    let url = format!("http://{HOST}:8080/h2");
    let resolve = format!("{HOST}:8080:{}", b.ip);
    let curl = a.ns.run("curl", &["-sS", "--http2-prior-knowledge", "--resolve", &resolve, "-H", "x-user: beta", &url]);
    assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
    let v = support::echo_json(&String::from_utf8_lossy(&curl.stdout));
    assert_eq!(v["version"], "v2", "{v}");

    // Non-HTTP TCP passes through both sidecars to B's TCP app.
    let mut s = a.ns.connect(SocketAddr::new(b.ip, 9000)).unwrap();
    s.write_all(b"ping over tcp\n").unwrap();
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping over tcp\n");
    drop(s);

    // Counted once on each side: had a sidecar's own connections been
    // captured again, they would loop or be counted twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ma, mb) = (a.metrics(), b.metrics());
        let out =
            sum(&ma, "istio_requests_total", &["reporter=\"source\"", &format!("destination_service=\"{HOST}\"")]);
        let inb = sum(
            &mb,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"spiffe://cluster.local/ns/{NS}/sa/a\""),
                "connection_security_policy=\"mutual_tls\"",
                "response_code=\"200\"",
            ],
        );
        let tcp_a =
            sum(&ma, "istio_tcp_connections_closed_total", &["destination_service_name=\"PassthroughCluster\""]);
        let tcp_b = sum(&mb, "istio_tcp_connections_closed_total", &["reporter=\"destination\""]);
        let sent_b = sum(&mb, "istio_tcp_sent_bytes_total", &["reporter=\"destination\""]);
        if out == 47.0 && inb == 47.0 && tcp_a == 1.0 && tcp_b == 1.0 && sent_b == 14.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A outbound {out}, B inbound {inb}, TCP A {tcp_a}, TCP B {tcp_b} (sent {sent_b})\nA:\n{ma}\nB:\n{mb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing was refused or looped on either side.
    for pod in [&a, &b] {
        let m = pod.metrics();
        let not_ok = sum(&m, "istio_requests_total", &[]) - sum(&m, "istio_requests_total", &["response_code=\"200\""]);
        assert_eq!(not_ok, 0.0, "{}:\n{m}", pod.ns.0);
    }

    // REGISTRY_ONLY on A: TCP to an unknown destination is closed, HTTP for
    // an unknown host gets 502; B's service still works.
    let sidecar_a = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {NS}}}\nspec:\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n"
    );
    a.write_config(&(config_a(ip_b, vip) + &sidecar_a));
    wait_for(&a, &b, "REGISTRY_ONLY to apply", || {
        matches!(a.ns.http_get(app_port, "unknown.example.com", "/", &[]), Ok((502, _)))
    });
    let mut s = a.ns.connect(SocketAddr::new(b.ip, 9000)).unwrap();
    let _ = s.write_all(b"ping over tcp\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "REGISTRY_ONLY let TCP through: {buf:?}");
    assert_eq!(call(&[("x-user", "beta")])["version"], "v2");

    // A Sidecar ingress entry on B maps app port 8080 to the app on 8081:
    // every call now lands on v2, whichever subset A picked.
    let sidecar_b = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {NS}}}\nspec:\n  ingress:\n  - port: {{number: 8080, protocol: HTTP, name: http}}\n    defaultEndpoint: 127.0.0.1:8081\n  egress:\n  - hosts: [\"./*\"]\n"
    );
    b.write_config(&(config_b() + &sidecar_b));
    wait_for(&a, &b, "B's ingress entry to apply", || (0..10).all(|_| call(&[])["version"] == "v2"));
    drop(rt);
}

/// Polls `cond` until it holds, failing with both sidecars' logs at the deadline.
fn wait_for(a: &Pod, b: &Pod, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
