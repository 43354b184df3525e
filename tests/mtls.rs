//! mTLS between two remora sidecars on loopback, with certificates made at
//! test time: a client sidecar's egress with ISTIO_MUTUAL to a server
//! sidecar's STRICT ingress, PERMISSIVE, auto-mTLS, untrusted and expired
//! certificates, wrong server identity, and rotation under traffic.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use remora::config::compile::CompileOptions;
use support::certs::{Ca, Workload};
use support::pair::*;
use support::*;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

const ISTIO_MUTUAL: &str = "      mode: ISTIO_MUTUAL\n";

struct Mesh {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh { ca: Ca::new("mesh root"), dir: tempfile::tempdir().unwrap() }
    }

    fn identity(&self, name: &str, id: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        self.ca.workload(id).write(&d);
        d
    }
}

async fn echo_headers(c: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let (status, body) = get(c, url, &[("host", "server.test")]).await;
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_to_strict_carries_the_peer_identity() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let _client = sidecar(
        &client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let c = client();
    let (status, j) = echo_headers(&c, &format!("http://127.0.0.1:{egress}/hello")).await;
    assert_eq!(status, 200, "{j}");
    let xfcc = j["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().to_string();
    assert!(xfcc.contains(&format!("By={SERVER_ID}")), "{xfcc}");
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc}");
    assert!(xfcc.contains("Hash="), "{xfcc}");
    // An XFCC forged by the client never reaches the app.
    let (_, body) = get(
        &c,
        &format!("http://127.0.0.1:{egress}/"),
        &[("host", "server.test"), ("x-forwarded-client-cert", "URI=spiffe://evil")],
    )
    .await;
    assert!(!body.contains("spiffe://evil"), "{body}");
    // HTTP/2 over the same mTLS hop (the server port speaks h2 via ALPN).
    let (ingress2, egress2) = (free_port(), free_port());
    let _server2 =
        sidecar(&server_yaml(ingress2, app, "STRICT"), Some(&mesh.identity("server2", SERVER_ID)), "server").await;
    let _client2 = sidecar(
        &client_yaml(egress2, ingress2, "HTTP2", Some(ISTIO_MUTUAL), ""),
        Some(&mesh.identity("client2", CLIENT_ID)),
        "client",
    )
    .await;
    let (status, j) = echo_headers(&c, &format!("http://127.0.0.1:{egress2}/h2")).await;
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["protocol"], "HTTP/1.1", "the app hop is HTTP/1.1; the mesh hop was h2");
    assert!(j["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().contains(CLIENT_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_untrusted_and_expired_clients() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let ingress = free_port();
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    // Plaintext straight to the STRICT port.
    let r = client().get(format!("http://127.0.0.1:{ingress}/")).send().await;
    assert!(r.is_err(), "plaintext must not be served: {r:?}");
    // A client sidecar whose certificate comes from another CA.
    let rogue = Ca::new("rogue root");
    let rogue_dir = mesh.dir.path().join("rogue");
    let w: Workload = rogue.workload(CLIENT_ID);
    w.write(&rogue_dir);
    let egress = free_port();
    let _c1 = sidecar(&client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""), Some(&rogue_dir), "client").await;
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "an untrusted client certificate fails the handshake");
    assert!(body.contains("transport failure reason: TLS error"), "{body}");
    // An expired client certificate from the right CA.
    let expired_dir = mesh.dir.path().join("expired");
    let mut w = mesh.ca.expired_workload(CLIENT_ID);
    w.root_pem = mesh.ca.pem();
    w.write(&expired_dir);
    let egress = free_port();
    let _c2 =
        sidecar(&client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""), Some(&expired_dir), "client").await;
    let (status, _) = get(&client(), &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "an expired client certificate fails the handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_mtls_and_plaintext() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let _server =
        sidecar(&server_yaml(ingress, app, "PERMISSIVE"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let _client = sidecar(
        &client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let c = client();
    let (status, j) = echo_headers(&c, &format!("http://127.0.0.1:{egress}/")).await;
    assert_eq!(status, 200);
    assert!(j["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().contains(CLIENT_ID));
    let (status, body) = get(&c, &format!("http://127.0.0.1:{ingress}/"), &[]).await;
    assert_eq!(status, 200);
    assert!(!body.contains("x-forwarded-client-cert"), "plaintext peers have no identity: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mtls_follows_the_endpoint_label() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let labels = "      security.istio.io/tlsMode: istio\n";
    let _client = sidecar(
        &client_yaml(egress, ingress, "HTTP", None, labels),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let (status, j) = echo_headers(&client(), &format!("http://127.0.0.1:{egress}/")).await;
    assert_eq!(status, 200, "{j}");
    assert!(j["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().contains(CLIENT_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_identity_is_verified() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let tls =
        "      mode: ISTIO_MUTUAL\n      subjectAltNames:\n      - spiffe://cluster.local/ns/default/sa/someone-else\n";
    let _client = sidecar(
        &client_yaml(egress, ingress, "HTTP", Some(tls), ""),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "a server with the wrong SPIFFE ID is refused");
    // The reply says why, as Envoy's "transport failure reason" does.
    assert!(
        body.contains("transport failure reason: TLS error") && body.contains(SERVER_ID),
        "the reason names the TLS failure and the peer's identity: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_without_identity_is_a_config_error() {
    let yaml = client_yaml(free_port(), free_port(), "HTTP", Some(ISTIO_MUTUAL), "");
    let set = remora::config::load::load_str(Path::new("t.yaml"), &yaml, "default");
    let errs = remora::config::compile::compile(
        &set,
        &CompileOptions { namespace: "default".into(), ..Default::default() },
        &remora::upstream::Registry::new(),
    )
    .unwrap_err();
    assert!(errs.iter().any(|e| e.to_string().contains("needs the workload identity")), "{errs:#?}");
    let strict = server_yaml(free_port(), "127.0.0.1:1".parse().unwrap(), "STRICT");
    let set = remora::config::load::load_str(Path::new("t.yaml"), &strict, "default");
    let errs = remora::config::compile::compile(
        &set,
        &CompileOptions { namespace: "default".into(), ..Default::default() },
        &remora::upstream::Registry::new(),
    )
    .unwrap_err();
    assert!(errs.iter().any(|e| e.to_string().contains("STRICT mTLS")), "{errs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_loses_no_request() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let server_dir = mesh.identity("server", SERVER_ID);
    let server = sidecar(&server_yaml(ingress, app, "STRICT"), Some(&server_dir), "server").await;
    let client_side = sidecar(
        &client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let first = server.proxy.identity().and_then(|s| s.current()).map(|i| i.serial.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                let good = matches!(c.get(format!("http://127.0.0.1:{egress}/")).header("host", "server.test").send().await, Ok(r) if r.status() == 200);
                if good { ok.fetch_add(1, Ordering::Relaxed) } else { failed.fetch_add(1, Ordering::Relaxed) };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new certificate (new key, new serial) written in place.
    let rotated = mesh.ca.workload(SERVER_ID);
    rotated.write(&server_dir);
    wait_until(Duration::from_secs(5), "rotated identity installed", || {
        let (server, first) = (&server, first.clone());
        async move { server.proxy.identity().and_then(|s| s.current()).is_some_and(|i| i.serial != first) }
    })
    .await;
    // A new handshake is served the rotated certificate.
    let store = client_side.proxy.identity().unwrap().clone();
    let cfg = store.client_config(vec![SERVER_ID.into()], "cluster.local".into(), false);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ingress)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("server.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap();
    assert_eq!(presented, rotated.der, "new handshakes see the new certificate");
    drop(tls);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A broken pair is rejected and the rotated identity kept.
    let current = server.proxy.identity().and_then(|s| s.current()).map(|i| i.serial.clone()).unwrap();
    std::fs::write(server_dir.join("key.pem"), mesh.ca.workload(SERVER_ID).key_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(server.proxy.identity().and_then(|s| s.current()).map(|i| i.serial.clone()).unwrap(), current);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 20, "{ok}");
    assert_eq!(failed, 0);
}

/// AuthorizationPolicy on the server sidecar: DENY before ALLOW, principals
/// from the mTLS peer, path normalization, plaintext peers without identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_peer_identity_and_path() {
    let mesh = Mesh::new();
    let app = echo("app").await;
    let (ingress, egress) = (free_port(), free_port());
    let policies = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-client\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-admin\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]\n";
    let server_cfg = format!("{}{policies}", server_yaml(ingress, app, "PERMISSIVE"));
    let server = sidecar(&server_cfg, Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let _client = sidecar(
        &client_yaml(egress, ingress, "HTTP", Some(ISTIO_MUTUAL), ""),
        Some(&mesh.identity("client", CLIENT_ID)),
        "client",
    )
    .await;
    let c = client();
    let via_mesh = |path: &str| format!("http://127.0.0.1:{egress}{path}");
    assert_eq!(get(&c, &via_mesh("/hello"), &[("host", "server.test")]).await.0, 200);
    let (status, body) = get(&c, &via_mesh("/admin/users"), &[("host", "server.test")]).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"), "DENY wins over ALLOW");
    // Normalized before matching: these are /admin/... too.
    for sneaky in ["/public/../admin/users", "//admin/users", "/%61dmin/users"] {
        let (status, _) = get(&c, &via_mesh(sneaky), &[("host", "server.test")]).await;
        assert_eq!(status, 403, "{sneaky}");
    }
    // A plaintext peer has no principal: no ALLOW matches.
    let (status, _) = get(&c, &format!("http://127.0.0.1:{ingress}/hello"), &[]).await;
    assert_eq!(status, 403);
    // The destination side reports the mTLS peer in Istio's labels.
    let text = remora::telemetry::server::render(&server.proxy);
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string();
    assert!(line.contains("reporter=\"destination\""), "{line}");
    assert!(line.contains(&format!("source_principal=\"{CLIENT_ID}\"")), "{line}");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    assert!(text.contains("response_flags=\"RBAC\""), "{text}");
    assert!(text.contains(&format!("remora_identity_info{{spiffe_id=\"{SERVER_ID}\"")), "{text}");
    let expiry = text
        .lines()
        .find_map(|l| l.strip_prefix("remora_identity_cert_expiry_seconds "))
        .and_then(|v| v.parse::<i64>().ok());
    assert!(expiry.is_some_and(|s| s > 3600), "{expiry:?}");
}

/// An SNI that can't be a DNS name (a 63-character subset makes its label
/// too long) must never turn ISTIO_MUTUAL into plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_never_falls_back_to_plaintext() {
    let mesh = Mesh::new();
    let plaintext_app = echo("app").await;
    let egress = free_port();
    let subset = "a".repeat(63);
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: server\nspec:\n  hosts: [server.test]\n  resolution: STATIC\n  ports:\n  - number: {egress}\n    name: http\n    protocol: HTTP\n  endpoints:\n  - address: 127.0.0.1\n    ports:\n      http: {}\n    labels:\n      app: server\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: server\nspec:\n  host: server.test\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n  subsets:\n  - name: {subset}\n    labels:\n      app: server\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: server\nspec:\n  hosts: [server.test]\n  http:\n  - route:\n    - destination:\n        host: server.test\n        subset: {subset}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: client\nspec:\n  egress:\n  - port:\n      number: {egress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n",
        plaintext_app.port()
    );
    let _client = sidecar(&yaml, Some(&mesh.identity("client", CLIENT_ID)), "client").await;
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "a plaintext server must not be reached over ISTIO_MUTUAL: {body}");
}
