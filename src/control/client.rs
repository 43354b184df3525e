//! The proxy's side of the subscription (`remora run --control-plane URL`):
//! one HTTP/2 stream to the control plane, each `config` applied as the
//! control-plane layer through the proxy's one apply path and answered with
//! `ack` or `nack`; reconnection with jittered exponential backoff; the last
//! applied set written to `--config-cache` so that a restart with the
//! control plane down starts on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ChannelBody, Downstream, Hello, Lines, PROTOCOL_VERSION, SUBSCRIBE_PATH, Upstream, encode};
use crate::runtime::{ApplyOutcome, Layer, Proxy};
use crate::upstream::pool::BoxIo;

/// First wait after a failed or ended stream; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A stream that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings keep the stream honest through idle periods and NATs.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// `http://host:port` or `https://host:port` (mTLS with the workload identity).
    pub url: Uri,
    /// SPIFFE IDs the control plane may present; empty: any in the trust domain.
    pub expected_identity: Vec<String>,
    /// Where the last applied set is kept across restarts.
    pub cache: Option<PathBuf>,
    /// This proxy's name in the control plane's list (the pod name).
    pub name: String,
}

/// The cache file: the last set this proxy applied from the control plane.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cached {
    pub version: String,
    pub resources: String,
}

/// Reads the cache, if there is a readable one.
pub fn read_cache(path: &Path) -> Option<Cached> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "config cache is unreadable; ignoring it");
            None
        }
    }
}

/// Writes the cache atomically (a reader never sees half a file).
pub fn write_cache(path: &Path, version: &str, resources: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec(&Cached { version: version.into(), resources: resources.into() })?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// Starts the subscription in the background; it runs until the process ends.
pub fn spawn(proxy: Arc<Proxy>, opts: SubscribeOptions) -> tokio::task::JoinHandle<()> {
    proxy.update_control_status(|c| c.url = opts.url.to_string());
    tokio::spawn(run(proxy, opts))
}

async fn run(proxy: Arc<Proxy>, opts: SubscribeOptions) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let why = match session(&proxy, &opts).await {
            Ok(why) => why,
            Err(e) => e,
        };
        proxy.update_control_status(|c| {
            c.connected = false;
            c.connected_since = None;
            c.last_error = Some(why.clone());
        });
        if started.elapsed() >= STABLE {
            backoff = BACKOFF_MIN;
        }
        // Full jitter around the backoff, so a fleet that lost its control
        // plane does not come back in lockstep.
        let wait = backoff.mul_f64(0.5 + fastrand::f64());
        tracing::warn!(url = %opts.url, reason = %why, retry_in = ?wait, "control-plane stream down; serving the last good config");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects to a control plane: TCP, then TLS with `tls` for `https://`
/// URLs. Returns the stream and the URL's `scheme://host:port` for request
/// URIs.
pub async fn dial(url: &Uri, tls: Option<Arc<rustls::ClientConfig>>) -> Result<(BoxIo, String), String> {
    let host = url.host().ok_or("the control-plane URL has no host")?.to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((bare.as_str(), port)))
        .await
        .map_err(|_| format!("connect to {host}:{port} timed out"))?
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let io: BoxIo = if https {
        let cfg = tls.ok_or("an https control plane needs the workload identity (--identity-dir)")?;
        let name = rustls_pki_types::ServerName::try_from(bare).map_err(|e| format!("server name: {e}"))?;
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    Ok((io, format!("{}://{host}:{port}", if https { "https" } else { "http" })))
}

/// One open subscription: the messages the control plane sends, and a way
/// to answer. Also what tests and benchmarks use to act as a proxy.
pub struct Stream {
    tx: mpsc::Sender<Bytes>,
    body: hyper::body::Incoming,
    lines: Lines,
    pending: std::collections::VecDeque<Bytes>,
    _conn: AbortOnDrop,
}

impl Stream {
    /// Connects (TLS with `tls` for `https://` URLs), sends `hello` and
    /// waits for the control plane to accept the subscription.
    pub async fn open(url: &Uri, tls: Option<Arc<rustls::ClientConfig>>, hello: &Hello) -> Result<Stream, String> {
        let (io, base) = dial(url, tls).await?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let _ = tx.send(encode(&Upstream::Hello(hello.clone()))).await;
        let req = Request::post(format!("{base}{SUBSCRIBE_PATH}"))
            .header(http::header::CONTENT_TYPE, super::CONTENT_TYPE)
            .body(ChannelBody::new(rx))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("subscribe: {e}"))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).trim().to_string();
            return Err(format!("subscription refused: {status}: {text}"));
        }
        Ok(Stream { tx, body: resp.into_body(), lines: Lines::default(), pending: Default::default(), _conn: conn })
    }

    /// The next message; `None` when the control plane ended the stream.
    pub async fn next(&mut self) -> Result<Option<Downstream>, String> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| format!("a message remora does not understand: {e}"));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(format!("stream: {e}")),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.pending.extend(self.lines.push(data)?);
                    }
                }
            }
        }
    }

    /// Sends an `ack` or a `nack`.
    pub async fn send(&self, msg: &Upstream) -> Result<(), String> {
        self.tx.send(encode(msg)).await.map_err(|_| "the stream closed".to_string())
    }
}

/// One stream, from connect to its end. `Ok` carries why it ended.
async fn session(proxy: &Arc<Proxy>, opts: &SubscribeOptions) -> Result<String, String> {
    let tls = proxy.identity().map(|store| {
        store.client_config(opts.expected_identity.clone(), proxy.options().compile.trust_domain().to_string(), true)
    });
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name: opts.name.clone(),
        namespace: proxy.options().compile.namespace.clone(),
        labels: proxy.options().compile.workload_labels.clone(),
        workload: proxy.options().compile.workload_name.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").into(),
        serving: proxy.control_plane_version(),
    };
    let mut stream = Stream::open(&opts.url, tls, &hello).await?;
    tracing::info!(url = %opts.url, "subscribed to the control plane");
    proxy.update_control_status(|c| {
        c.connected = true;
        c.connected_since = Some(SystemTime::now());
        c.last_error = None;
    });
    while let Some(msg) = stream.next().await? {
        match msg {
            Downstream::Config { version, resources } => {
                let reply = apply(proxy, opts, &version, &resources).await;
                if stream.send(&reply).await.is_err() {
                    return Ok("the stream closed".into());
                }
            }
            Downstream::Error { message } => return Err(format!("the control plane refused: {message}")),
        }
    }
    Ok("the control plane ended the stream".into())
}

/// Applies one `config` and says how it went.
async fn apply(proxy: &Proxy, opts: &SubscribeOptions, version: &str, resources: &str) -> Upstream {
    match proxy.set_layer(Layer::ControlPlane, resources, Some(version.to_string())).await {
        ApplyOutcome::Applied { .. } | ApplyOutcome::Unchanged { .. } => {
            tracing::info!(%version, "control-plane config applied");
            proxy.control_plane_applied();
            if let Some(path) = &opts.cache
                && let Err(e) = write_cache(path, version, resources)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the config cache");
            }
            Upstream::Ack { version: version.to_string() }
        }
        ApplyOutcome::Rejected { errors } => {
            let errors: Vec<String> = if errors.is_empty() {
                // The same set was refused before; say why again.
                proxy.last_rejection().map(|r| r.errors).unwrap_or_default()
            } else {
                errors.iter().map(|e| e.to_string()).collect()
            };
            tracing::warn!(%version, errors = errors.len(), "control-plane config refused; keeping the last good one");
            Upstream::Nack { version: version.to_string(), errors }
        }
    }
}
