//! Shared test support: free ports, echo upstreams, an in-process proxy on a
//! config written to a temp dir, YAML builders, and deadline-based waits.
#![allow(dead_code)]

pub mod certs;
pub mod netns;
pub mod pair;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remora::config::compile::CompileOptions;
use remora::runtime::{Proxy, RunOptions};

/// A port that was free a moment ago (bind :0, read, release). Configs name
/// fixed ports, so tests pick them this way.
pub fn free_port() -> u16 {
    // The OS may hand the same ephemeral port out twice in a row once it is
    // released; never give one out twice in this process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh port after 1000 tries");
}

/// An echo backend (HTTP/1.1 and h2c) on a fresh loopback port.
pub async fn echo(version: &str) -> SocketAddr {
    remora::cli::echo::spawn("127.0.0.1:0".parse().unwrap(), version).await.unwrap()
}

pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: SocketAddr,
    _watch: Option<remora::config::watch::WatchHandle>,
}

impl TestProxy {
    /// Writes `yaml` to `<tmp>/config.yaml` and starts a proxy on that
    /// directory (watched), with its admin API on a free port.
    pub async fn start(yaml: &str) -> TestProxy {
        Self::start_with(yaml, BTreeMap::new()).await
    }

    pub async fn start_with(yaml: &str, labels: BTreeMap<String, String>) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let opts = RunOptions {
            config_paths: vec![dir.path().to_path_buf()],
            compile: CompileOptions { namespace: "default".into(), workload_labels: labels, ..Default::default() },
        };
        let (proxy, admin) = remora::cli::start_proxy(opts, Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap_or_else(|e| panic!("config rejected:\n{}", e.join("\n")));
        let watch = remora::config::watch::spawn(proxy.clone()).ok();
        TestProxy { proxy, dir, config, admin: admin.unwrap(), _watch: watch }
    }

    /// Replaces the config file atomically (write + rename), as an editor or a
    /// config management tool would.
    pub fn write(&self, yaml: &str) {
        write_atomic(&self.config, yaml);
    }

    pub fn version(&self) -> String {
        self.proxy.snapshot().version.clone()
    }
}

pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Plain HTTP/1.1 client, no system proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().http1_only().pool_max_idle_per_host(64).build().unwrap()
}

/// h2c prior-knowledge client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap()
}

/// Client that does not follow redirects.
pub fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Polls `cond` until it holds or `deadline` passes; panics with `what`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `version` an echo backend reported.
pub fn version_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not echo JSON: {body}"));
    v["version"].as_str().unwrap_or("").to_string()
}

pub fn echo_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not echo JSON: {body}"))
}

/// GET `url` with `headers`, returning (status, body).
pub async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut r = c.get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

// === YAML builders ===

/// A STATIC ServiceEntry for `host` with one HTTP-family port and endpoints
/// labelled `version: <v>`.
pub fn service_entry(name: &str, host: &str, port: u16, protocol: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\nspec:\n  hosts:\n  - {host}\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - number: {port}\n    name: http\n    protocol: {protocol}\n  endpoints:\n"
    );
    for (addr, v) in endpoints {
        y.push_str(&format!(
            "  - address: {}\n    ports:\n      http: {}\n    labels:\n      version: {v}\n",
            addr.ip(),
            addr.port()
        ));
    }
    y.push_str("---\n");
    y
}

/// A DestinationRule with subsets named after versions, plus an optional
/// `trafficPolicy` block (YAML, indented by the caller to 2 spaces under spec).
pub fn destination_rule(name: &str, host: &str, versions: &[&str], policy: Option<&str>) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\nspec:\n  host: {host}\n"
    );
    if let Some(p) = policy {
        y.push_str("  trafficPolicy:\n");
        for line in p.lines() {
            y.push_str("    ");
            y.push_str(line);
            y.push('\n');
        }
    }
    if !versions.is_empty() {
        y.push_str("  subsets:\n");
        for v in versions {
            y.push_str(&format!("  - name: {v}\n    labels:\n      version: {v}\n"));
        }
    }
    y.push_str("---\n");
    y
}

/// A Gateway `name` listening on 127.0.0.1:`port` for every host.
pub fn gateway(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n  servers:\n  - port:\n      number: {port}\n      name: http\n      protocol: HTTP\n    bind: 127.0.0.1\n    hosts:\n    - \"*\"\n---\n"
    )
}

/// A VirtualService on gateway `gw` for all hosts with `http` (YAML list items
/// indented by two spaces).
pub fn gateway_vs(name: &str, gw: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\nspec:\n  hosts:\n  - \"*\"\n  gateways:\n  - {gw}\n  http:\n{http}---\n"
    )
}

/// `name` on `PATH`: the external tools some tests drive.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}
