//! Config from a control plane: `remora control-plane` serving a directory,
//! proxies subscribed to it (`--control-plane`), and the protocol itself.
//! A change reaches a proxy under load with no failed request; an invalid
//! set never leaves the control plane; a proxy's refusal shows in
//! `/v1/proxies`; proxies ride out a control-plane restart and a restart of
//! their own with the control plane down (from their cache); each proxy gets
//! only what is exported to its namespace; and with identities the stream is
//! mTLS and a proxy can only speak for its own namespace.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use remora::config::compile::CompileOptions;
use remora::control::client::{Stream, SubscribeOptions};
use remora::control::server::{ControlPlane, Handle, ServerOptions, serve};
use remora::control::{Downstream, Hello, PROTOCOL_VERSION, Upstream};
use remora::runtime::{Proxy, RunOptions};
use support::certs::Ca;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_remora");

/// The mesh config: a service with two versions behind a gateway on `port`,
/// routed to `subset`.
fn mesh(port: u16, v1: SocketAddr, v2: SocketAddr, subset: &str) -> String {
    format!(
        "{}{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1"), (v2, "v2")]),
        destination_rule("svc", "svc.test", &["v1", "v2"], None),
        gateway("gw", port),
        gateway_vs(
            "routes",
            "gw",
            &format!("  - route:\n    - destination:\n        host: svc.test\n        subset: {subset}\n")
        ),
    )
}

struct Cp {
    dir: tempfile::TempDir,
    handle: Option<Handle>,
}

impl Cp {
    async fn start(yaml: &str) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let handle = Self::serve(dir.path(), "127.0.0.1:0".parse().unwrap(), None).await;
        Cp { dir, handle: Some(handle) }
    }

    async fn serve(dir: &Path, listen: SocketAddr, identity: Option<PathBuf>) -> Handle {
        let opts = ServerOptions {
            listen,
            config: vec![dir.to_path_buf()],
            namespace: "default".into(),
            identity_dir: identity,
            trust_domain: "cluster.local".into(),
        };
        let cp = ControlPlane::new(opts).unwrap_or_else(|e| panic!("control plane: {e}"));
        let handle = serve(cp.clone()).await.unwrap();
        cp.watch();
        handle
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().addr
    }

    fn url(&self) -> http::Uri {
        format!("http://{}", self.addr()).parse().unwrap()
    }

    fn write(&self, yaml: &str) {
        write_atomic(&self.dir.path().join("mesh.yaml"), yaml);
    }

    fn cp(&self) -> &Arc<ControlPlane> {
        &self.handle.as_ref().unwrap().cp
    }

    fn proxies(&self) -> serde_json::Value {
        self.cp().proxies_json()
    }
}

/// An in-process proxy with no files, subscribed to `url`.
async fn subscribed(url: http::Uri, namespace: &str, identity: Option<&Path>) -> (Arc<Proxy>, SocketAddr) {
    let opts = RunOptions {
        config_paths: vec![],
        compile: CompileOptions {
            namespace: namespace.into(),
            identity_dir: identity.map(Path::to_path_buf),
            ..Default::default()
        },
    };
    let (proxy, admin) = remora::cli::start_proxy(opts, Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
    proxy.await_control_plane();
    remora::control::client::spawn(
        proxy.clone(),
        SubscribeOptions { url, expected_identity: vec![], cache: None, name: format!("proxy-{namespace}") },
    );
    (proxy, admin.unwrap())
}

fn hello(namespace: &str) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        name: format!("probe-{namespace}"),
        namespace: namespace.into(),
        labels: BTreeMap::new(),
        workload: None,
        proxy_version: "test".into(),
        serving: None,
    }
}

/// The first `config` a subscriber in `namespace` receives.
async fn first_config(url: &http::Uri, namespace: &str) -> (String, String) {
    let mut s = Stream::open(url, None, &hello(namespace)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap() {
        Some(Downstream::Config { version, resources }) => (version, resources),
        other => panic!("{other:?}"),
    }
}

/// The version serving `url`, or `None` when nothing answers 200 (yet).
async fn version_now(c: &reqwest::Client, url: &str) -> Option<String> {
    let r = c.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    Some(version_of(&r.text().await.ok()?))
}

/// Waits until the gateway at `url` serves `want`.
async fn wait_serving(c: &reqwest::Client, url: &str, want: &str, what: &str) {
    wait_until(Duration::from_secs(10), what, || async move { version_now(c, url).await.as_deref() == Some(want) })
        .await;
}

/// A control plane serving the mesh routed to v1, and an in-process proxy
/// subscribed to it and serving that.
struct Mesh {
    cp: Cp,
    proxy: Arc<Proxy>,
    c: reqwest::Client,
    url: String,
    port: u16,
    v1: SocketAddr,
    v2: SocketAddr,
}

impl Mesh {
    async fn start() -> Mesh {
        let (v1, v2) = (echo("v1").await, echo("v2").await);
        let port = free_port();
        let cp = Cp::start(&mesh(port, v1, v2, "v1")).await;
        let (proxy, _admin) = subscribed(cp.url(), "default", None).await;
        let (c, url) = (client(), format!("http://127.0.0.1:{port}/"));
        wait_serving(&c, &url, "v1", "the proxy to apply the first set").await;
        Mesh { cp, proxy, c, url, port, v1, v2 }
    }

    /// Routes the mesh to `subset`, plus `extra` YAML.
    fn route_to(&self, subset: &str, extra: &str) {
        self.cp.write(&(mesh(self.port, self.v1, self.v2, subset) + extra));
    }

    async fn serving(&self) -> Option<String> {
        version_now(&self.c, &self.url).await
    }
}

/// The status `url` answers, or 0 when nothing does.
async fn status_of(c: &reqwest::Client, url: &str) -> u16 {
    c.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_proxy_under_load_with_no_failed_request() {
    let m = Mesh::start().await;
    let (cp, proxy, c, url) = (&m.cp, &m.proxy, &m.c, &m.url);
    assert!(proxy.is_ready());
    wait_until(Duration::from_secs(5), "the ack", || async { cp.proxies()["proxies"][0]["synced"] == true }).await;

    // Continuous load, bounded in count and time, while the set changes.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (c, url, stop, ok, failed) = (c.clone(), url.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && sent < 50_000 && tokio::time::Instant::now() < deadline {
                sent += 1;
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed_at = tokio::time::Instant::now();
    m.route_to("v2", "");
    wait_serving(c, url, "v2", "the change to reach the proxy").await;
    let took = changed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the change");
    assert!(ok.load(Ordering::Relaxed) > 50, "too little load: {}", ok.load(Ordering::Relaxed));
    assert!(took < Duration::from_secs(2), "the change took {took:?}");
    // The proxy's status shows what it runs.
    let dump: serde_json::Value = serde_json::from_str(&remora::admin::config_dump(proxy).to_string()).unwrap();
    assert_eq!(dump["control_plane"]["connected"], true, "{dump}");
    assert_eq!(dump["control_plane"]["version"], cp.proxies()["proxies"][0]["acked"], "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_set_is_refused_centrally_and_a_proxy_refusal_is_reported() {
    let m = Mesh::start().await;
    let cp = &m.cp;
    wait_until(Duration::from_secs(5), "the ack", || async { cp.proxies()["proxies"][0]["synced"] == true }).await;
    let acked = cp.proxies()["proxies"][0]["acked"].clone();

    // A route to an undefined subset: refused at the control plane.
    m.route_to("v9", "");
    wait_until(Duration::from_secs(5), "the refusal", || async { cp.cp().status_json()["refused"].is_object() }).await;
    let status = cp.cp().status_json();
    assert!(status["refused"]["errors"].to_string().contains("subset v9"), "{status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cp.proxies()["proxies"][0]["acked"], acked, "no proxy was sent the invalid set");
    assert_eq!(m.serving().await.as_deref(), Some("v1"));

    // A set only the proxy can refuse: a gateway port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let extra = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: busy}}\nspec:\n  servers:\n  - port: {{number: {busy}, name: http, protocol: HTTP}}\n    bind: 127.0.0.1\n    hosts: [\"*\"]\n"
    );
    m.route_to("v2", &extra);
    wait_until(Duration::from_secs(5), "the nack", || async { cp.proxies()["proxies"][0]["last_nack"].is_object() })
        .await;
    let p = &cp.proxies()["proxies"][0];
    assert!(p["last_nack"]["errors"].to_string().contains("cannot listen"), "{p}");
    assert_eq!(p["synced"], false);
    assert_eq!(p["acked"], acked);
    assert_eq!(m.serving().await.as_deref(), Some("v1"), "the proxy keeps its last good set");
    // `remora status` shows it.
    let out = std::process::Command::new(BIN)
        .args(["status", "--control-plane", &format!("http://{}", cp.addr())])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("proxy-default") && table.contains("NACK: ") && table.contains("cannot listen"), "{table}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_through_a_control_plane_restart_and_resubscribe() {
    let mut m = Mesh::start().await;
    let proxy = m.proxy.clone();
    let addr = m.cp.addr();
    m.cp.handle.take().unwrap().stop();
    wait_until(Duration::from_secs(5), "the proxy to notice", || async {
        proxy.control_status().is_some_and(|s| !s.connected)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(m.serving().await.as_deref(), Some("v1"), "serving while the control plane is down");
    }
    assert!(proxy.is_ready(), "still ready: it has a good set");
    // Back, on the same address, with a change.
    m.route_to("v2", "");
    m.cp.handle = Some(Cp::serve(m.cp.dir.path(), addr, None).await);
    wait_serving(&m.c, &m.url, "v2", "the proxy to resubscribe and apply").await;
    assert_eq!(m.cp.proxies()["proxies"].as_array().unwrap().len(), 1);
}

/// A `remora run` process subscribed with a cache file.
fn run_proxy(url: &str, cache: &Path, admin: u16, health: u16, metrics: u16) -> std::process::Child {
    std::process::Command::new(BIN)
        .args(["run", "--control-plane", url, "--config-cache"])
        .arg(cache)
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--health", &format!("127.0.0.1:{health}")])
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .args(["--access-log", "off", "--drain-timeout", "1s", "--concurrency", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_with_the_control_plane_down_serves_from_its_cache() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    let mut cp = Cp::start(&mesh(port, v1, v2, "v2")).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache.json");
    let (admin, health, metrics) = (free_port(), free_port(), free_port());
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let ready = format!("http://127.0.0.1:{health}/healthz/ready");
    let mut first = support::netns::Child(run_proxy(&format!("http://{}", cp.addr()), &cache, admin, health, metrics));
    wait_serving(&c, &url, "v2", "the proxy to apply the control plane's set").await;
    assert_eq!(status_of(&c, &ready).await, 200);
    wait_until(Duration::from_secs(5), "the cache", || async { cache.exists() }).await;
    let _ = first.0.kill();
    let _ = first.0.wait();
    drop(first);
    let gone = cp.addr();
    cp.handle.take().unwrap().stop();

    // Restarted with the control plane gone: the cached set serves.
    let _second = support::netns::Child(run_proxy(&format!("http://{gone}"), &cache, admin, health, metrics));
    wait_serving(&c, &url, "v2", "the restarted proxy to serve").await;
    assert_eq!(status_of(&c, &ready).await, 200, "ready on the cached set");
    let dump: serde_json::Value =
        serde_json::from_str(&get(&c, &format!("http://127.0.0.1:{admin}/config_dump"), &[]).await.1).unwrap();
    assert_eq!(dump["control_plane"]["connected"], false, "{dump}");
    assert!(dump["control_plane"]["version"].is_string(), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_set_from_the_control_plane_a_proxy_is_not_ready() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (admin, health, metrics) = (free_port(), free_port(), free_port());
    // Nobody listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let _p = support::netns::Child(run_proxy(&nowhere, &cache_dir.path().join("c.json"), admin, health, metrics));
    let c = client();
    let ready = format!("http://127.0.0.1:{health}/healthz/ready");
    wait_until(Duration::from_secs(10), "the health port", || {
        let (c, ready) = (c.clone(), ready.clone());
        async move { status_of(&c, &ready).await == 503 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_receives_only_what_is_exported_to_its_namespace() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: public, namespace: shop}\nspec: {hosts: [public.example], ports: [{number: 80, name: http}], resolution: DNS}\n---\n\
                apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: private, namespace: shop}\nspec: {hosts: [private.example], exportTo: [\".\"], ports: [{number: 80, name: http}], resolution: DNS}\n---\n\
                apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: for-payments, namespace: shop}\nspec: {host: public.example, exportTo: [payments]}\n---\n\
                apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: shop-only, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n";
    let cp = Cp::start(yaml).await;
    let (_, shop) = first_config(&cp.url(), "shop").await;
    let (_, payments) = first_config(&cp.url(), "payments").await;
    let (_, other) = first_config(&cp.url(), "other").await;
    for (ns, text, present, absent) in [
        ("shop", &shop, &["name: public", "name: private", "name: shop-only"][..], &["name: for-payments"][..]),
        ("payments", &payments, &["name: public", "name: for-payments"][..], &["name: private", "name: shop-only"][..]),
        ("other", &other, &["name: public"][..], &["name: private", "name: for-payments", "name: shop-only"][..]),
    ] {
        for p in present {
            assert!(text.contains(p), "{ns} should get `{p}`:\n{text}");
        }
        for a in absent {
            assert!(!text.contains(a), "{ns} must not get `{a}`:\n{text}");
        }
    }
    // Every resource names its namespace, so the proxy reads it as meant.
    assert!(payments.contains("namespace: shop"), "{payments}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_identities_the_stream_is_mtls_and_a_proxy_speaks_for_its_namespace_only() {
    let ca = Ca::new("mesh root");
    let ids = tempfile::tempdir().unwrap();
    let (cp_id, shop_id) = (ids.path().join("cp"), ids.path().join("shop"));
    ca.workload("spiffe://cluster.local/ns/mesh-system/sa/control-plane").write(&cp_id);
    ca.workload("spiffe://cluster.local/ns/shop/sa/web").write(&shop_id);
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), mesh(port, v1, v2, "v1")).unwrap();
    let handle = Cp::serve(dir.path(), "127.0.0.1:0".parse().unwrap(), Some(cp_id)).await;
    let https: http::Uri = format!("https://127.0.0.1:{}", handle.addr.port()).parse().unwrap();

    // A proxy of namespace shop subscribes over mTLS; the control plane knows
    // it by its SPIFFE ID.
    let (_proxy, _admin) = subscribed(https.clone(), "shop", Some(&shop_id)).await;
    wait_until(Duration::from_secs(10), "the subscription", || async {
        handle.cp.proxies_json()["proxies"][0]["synced"] == true
    })
    .await;
    let p = &handle.cp.proxies_json()["proxies"][0];
    assert_eq!(p["identity"], "spiffe://cluster.local/ns/shop/sa/web", "{p}");

    // The same certificate claiming another namespace is refused.
    let store = remora::tls::IdentityStore::new();
    store.install(remora::tls::Identity::load(&shop_id, "cluster.local").unwrap()).unwrap();
    let tls = store.client_config(vec![], "cluster.local".into(), true);
    let err = Stream::open(&https, Some(tls.clone()), &hello("payments")).await.err().unwrap();
    assert!(err.contains("403") && err.contains("not payments"), "{err}");
    // A certificate from another CA is refused in the handshake.
    let stranger = tempfile::tempdir().unwrap();
    Ca::new("other root").workload("spiffe://cluster.local/ns/shop/sa/web").write(stranger.path());
    let other = remora::tls::IdentityStore::new();
    other.install(remora::tls::Identity::load(stranger.path(), "cluster.local").unwrap()).unwrap();
    let bad = other.client_config(vec![], "cluster.local".into(), true);
    assert!(Stream::open(&https, Some(bad), &hello("shop")).await.is_err());
    // Plaintext to the mTLS port gets nowhere.
    let plain: http::Uri = format!("http://127.0.0.1:{}", handle.addr.port()).parse().unwrap();
    assert!(Stream::open(&plain, None, &hello("shop")).await.is_err());
    // A proxy expecting another control-plane identity does not subscribe.
    let wrong = store.client_config(
        vec!["spiffe://cluster.local/ns/mesh-system/sa/impostor".into()],
        "cluster.local".into(),
        true,
    );
    assert!(Stream::open(&https, Some(wrong), &hello("shop")).await.is_err());
    assert_eq!(handle.cp.proxies_json()["proxies"].as_array().unwrap().len(), 1);
    // The acked version is the one it serves.
    let mut s = Stream::open(&https, Some(tls), &hello("shop")).await.unwrap();
    let Some(Downstream::Config { version, .. }) = s.next().await.unwrap() else { panic!("no config") };
    s.send(&Upstream::Ack { version: version.clone() }).await.unwrap();
    wait_until(Duration::from_secs(5), "the probe's ack", || async {
        handle.cp.proxies_json()["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "probe-shop" && p["acked"] == version.as_str())
    })
    .await;
}
