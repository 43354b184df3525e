//! `remora control-plane` (serve a directory of Istio resources to
//! subscribed proxies) and `remora status` (which proxy runs which version,
//! like `istioctl proxy-status`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{EXIT_USAGE, LogArgs, Signals, runtime};
use crate::control::server::{ControlPlane, ServerOptions, serve};
use crate::telemetry::init_logging;

#[derive(Debug, Clone, Args)]
pub struct ControlPlaneArgs {
    /// A YAML file or a directory of them (repeatable); watched.
    #[arg(long = "config", short = 'c', env = "REMORA_CONFIG", value_delimiter = ',', required = true)]
    pub config: Vec<PathBuf>,
    /// Address proxies subscribe to (Istio's istiod uses 15010, and 15012 with TLS).
    #[arg(long, env = "REMORA_LISTEN", default_value = "0.0.0.0:15010")]
    pub listen: SocketAddr,
    /// Namespace of resources that name none.
    #[arg(long, env = "REMORA_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The control plane's identity (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`): the port then takes mTLS only, from workloads of the
    /// trust domain, each speaking for its own namespace.
    #[arg(long, env = "REMORA_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = crate::tls::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[command(flatten)]
    pub log: LogArgs,
}

pub fn control_plane_main(args: ControlPlaneArgs) -> i32 {
    if let Err(e) = init_logging(args.log.log_format, &args.log.log_level) {
        eprintln!("remora: {e}");
        return EXIT_USAGE;
    }
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mut signals = Signals::new();
        let opts = ServerOptions {
            listen: args.listen,
            config: args.config,
            namespace: args.namespace,
            identity_dir: args.identity_dir,
            trust_domain: args.trust_domain,
        };
        let cp = match tokio::task::spawn_blocking(move || ControlPlane::new(opts)).await {
            Ok(Ok(cp)) => cp,
            Ok(Err(e)) => {
                eprintln!("{e}");
                eprintln!("remora control-plane: the config is invalid; not starting");
                return EXIT_USAGE;
            }
            Err(e) => {
                eprintln!("remora control-plane: {e}");
                return 1;
            }
        };
        let handle = match serve(cp.clone()).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("remora control-plane: cannot listen: {e}");
                return EXIT_USAGE;
            }
        };
        cp.watch();
        signals.recv().await;
        tracing::info!("signal received; stopping");
        handle.stop();
        0
    })
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The control plane (`http://host:15010`, or `https://` with `--identity-dir`).
    #[arg(long, env = "REMORA_CONTROL_PLANE")]
    pub control_plane: Uri,
    /// Identity to present to an https control plane.
    #[arg(long, env = "REMORA_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = crate::tls::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Print the control plane's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn status_main(args: StatusArgs) -> i32 {
    let rt = match runtime(Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fetch_proxies(&args)) {
        Ok(v) if args.json => {
            super::emit(&format!("{v:#}\n"));
            0
        }
        Ok(v) => {
            super::emit(&status_table(&v));
            0
        }
        Err(e) => {
            eprintln!("remora status: {e}");
            1
        }
    }
}

async fn fetch_proxies(args: &StatusArgs) -> Result<serde_json::Value, String> {
    let tls = match (&args.identity_dir, args.control_plane.scheme_str()) {
        (Some(dir), Some("https")) => {
            let store = crate::tls::IdentityStore::new();
            let id = crate::tls::Identity::load(dir, &args.trust_domain).map_err(|e| e.to_string())?;
            store.install(id).map_err(|e| e.to_string())?;
            Some(store.client_config(Vec::new(), args.trust_domain.clone(), true))
        }
        _ => None,
    };
    let (io, base) = crate::control::client::dial(&args.control_plane, tls).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(format!("{base}{}", crate::control::PROXIES_PATH))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

/// The proxies as a table: one line each, with what they run.
pub fn status_table(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_string();
    let mut rows = vec![[
        "NAME".to_string(),
        "NAMESPACE".into(),
        "IDENTITY".into(),
        "CONNECTED".into(),
        "VERSION".into(),
        "STATUS".into(),
    ]];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for p in v["proxies"].as_array().into_iter().flatten() {
        let since = p["connected_since_unix"].as_u64().map(|t| format!("{}s ago", now.saturating_sub(t)));
        let status = match (&p["last_nack"], p["synced"].as_bool()) {
            (n, _) if n.is_object() && n["version"] == p["sent"] => {
                format!("NACK: {}", n["errors"].get(0).and_then(|e| e.as_str()).unwrap_or("refused"))
            }
            (_, Some(true)) => "SYNCED".into(),
            _ if p["sent"].is_null() => "NOT SENT".into(),
            _ => "STALE".into(),
        };
        rows.push([
            s(&p["name"]),
            s(&p["namespace"]),
            s(&p["identity"]),
            since.unwrap_or_else(|| "-".into()),
            s(&p["acked"]),
            status,
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = format!("control plane version {}\n", s(&v["version"]));
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
