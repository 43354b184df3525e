//! A pair of in-process remora sidecars on loopback: a server sidecar's
//! ingress in front of an app, and a client sidecar's egress to it, each with
//! its own config directory and optional workload identity.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use remora::config::compile::CompileOptions;
use remora::runtime::RunOptions;

pub struct Sidecar {
    pub proxy: Arc<remora::runtime::Proxy>,
    _dir: tempfile::TempDir,
}

/// Starts an in-process sidecar on `yaml` with the identity in `identity`.
pub async fn sidecar(yaml: &str, identity: Option<&Path>, app: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let labels: BTreeMap<String, String> = [("app".to_string(), app.to_string())].into();
    let opts = RunOptions {
        config_paths: vec![dir.path().to_path_buf()],
        compile: CompileOptions {
            namespace: "default".into(),
            workload_labels: labels,
            identity_dir: identity.map(Path::to_path_buf),
            ..Default::default()
        },
    };
    let (proxy, _) = remora::cli::start_proxy(opts, None).await.unwrap_or_else(|e| panic!("rejected: {e:?}"));
    Sidecar { proxy, _dir: dir }
}

/// A server sidecar: ingress `ingress` on loopback to the app, under
/// PeerAuthentication `mode`.
pub fn server_yaml(ingress: u16, app: std::net::SocketAddr, mode: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: server\nspec:\n  ingress:\n  - port:\n      number: {ingress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:{}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\nspec:\n  mtls:\n    mode: {mode}\n",
        app.port()
    )
}

/// A client sidecar whose egress port `egress` reaches `server.test` at
/// `127.0.0.1:<upstream>` (a server sidecar's ingress, or another peer), with
/// `tls` as the DestinationRule's tls block.
pub fn client_yaml(egress: u16, upstream: u16, protocol: &str, tls: Option<&str>, labels: &str) -> String {
    let dr = match tls {
        Some(t) => format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: server\nspec:\n  host: server.test\n  trafficPolicy:\n    tls:\n{t}---\n"
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: server\nspec:\n  hosts: [server.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - number: {egress}\n    name: http\n    protocol: {protocol}\n  endpoints:\n  - address: 127.0.0.1\n    ports:\n      http: {upstream}\n    labels:\n      app: server\n{labels}---\n{dr}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: client\nspec:\n  egress:\n  - port:\n      number: {egress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n"
    )
}
