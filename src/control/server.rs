//! `remora control-plane`: serves a directory of Istio resources to every
//! subscribed proxy.
//!
//! The directory is watched. A change is validated centrally — loaded,
//! validated and compiled once for each namespace it names — and a set that
//! fails is refused whole: no proxy sees it, the errors are logged and shown
//! on `/v1/status`, and the last good set keeps being served. A good set is
//! published to every subscriber, each getting only what is visible to it
//! (`scope`); a subscriber whose scoped set did not change is not sent
//! anything. `/v1/proxies` lists the subscribers with what they
//! acknowledged or refused.
//!
//! With `--identity-dir` the port is mTLS only: a proxy must present a
//! certificate from the mesh's trust bundle, and the namespace in its hello
//! must be the one its SPIFFE ID names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::scope::{self, Doc};
use super::{ChannelBody, Downstream, Hello, Lines, PROTOCOL_VERSION, Upstream, encode};
use crate::body::{self, Body};
use crate::config::compile::{CapturePorts, CompileOptions, compile};
use crate::config::load::{load_paths, parse_values};
use crate::config::{Diagnostic, fnv1a64};
use crate::upstream::Registry;

/// Time a subscriber has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a change is seen, so an editor's several writes publish once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Re-read the directory this often even without a change event.
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub config: Vec<PathBuf>,
    /// Namespace of resources that name none.
    pub namespace: String,
    pub identity_dir: Option<PathBuf>,
    pub trust_domain: String,
}

/// A validated set, as published.
struct Published {
    version: String,
    docs: Vec<Doc>,
    at: SystemTime,
}

struct Refused {
    version: String,
    errors: Vec<String>,
    at: SystemTime,
}

/// One subscribed proxy.
#[derive(Clone)]
struct Subscriber {
    hello: Hello,
    identity: Option<String>,
    peer: SocketAddr,
    since: SystemTime,
    sent: Option<String>,
    acked: Option<String>,
    nack: Option<(String, Vec<String>, SystemTime)>,
}

pub struct ControlPlane {
    opts: ServerOptions,
    published: ArcSwap<Option<Published>>,
    refused: Mutex<Option<Refused>>,
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
    /// Bumped on every publish; subscribers wait on it.
    generation: watch::Sender<u64>,
    identity: Option<Arc<crate::tls::IdentityStore>>,
    _watches: Mutex<Vec<notify::RecommendedWatcher>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ControlPlane {
    /// Loads the identity (if any) and the first config; a bad first config
    /// is an error.
    pub fn new(opts: ServerOptions) -> Result<Arc<Self>, String> {
        let identity = match &opts.identity_dir {
            Some(dir) => {
                let store = crate::tls::IdentityStore::new();
                let id = crate::tls::Identity::load(dir, &opts.trust_domain).map_err(|e| e.to_string())?;
                store.install(id).map_err(|e| e.to_string())?;
                Some(store)
            }
            None => None,
        };
        let cp = Arc::new(ControlPlane {
            opts,
            published: ArcSwap::from_pointee(None),
            refused: Mutex::new(None),
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generation: watch::Sender::new(0),
            identity,
            _watches: Mutex::new(Vec::new()),
        });
        if let Err(errors) = cp.reload() {
            return Err(errors.join("\n"));
        }
        Ok(cp)
    }

    /// The version being served.
    pub fn version(&self) -> Option<String> {
        self.published.load().as_ref().as_ref().map(|p| p.version.clone())
    }

    /// Reads, validates and (when it changed and is valid) publishes the
    /// directory. Returns the errors of a refused set.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let set = load_paths(&self.opts.config, &self.opts.namespace);
        let version = set.version();
        if self.version().as_deref() == Some(version.as_str()) {
            return Ok(());
        }
        let errors = validate(&set);
        if !errors.is_empty() {
            tracing::error!(%version, errors = errors.len(), "config refused; proxies keep the last good set");
            for e in &errors {
                tracing::error!("{e}");
            }
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Refused { version, errors: errors.clone(), at: SystemTime::now() });
            return Err(errors);
        }
        let mut docs = Vec::new();
        for f in &set.files {
            let text = std::fs::read_to_string(&f.path).map_err(|e| vec![format!("{}: {e}", f.path.display())])?;
            let values = parse_values(&text).map_err(|(line, e)| vec![format!("{}:{line}: {e}", f.path.display())])?;
            docs.extend(scope::docs_from(values, &self.opts.namespace).map_err(|e| vec![e])?);
        }
        tracing::info!(%version, resources = docs.len(), "config published");
        self.published.store(Arc::new(Some(Published { version, docs, at: SystemTime::now() })));
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// What `proxy` receives now: the set's version, a hash of this
    /// proxy's view, and the YAML. The version a proxy is sent is
    /// `<set version>-<view hash>`; a proxy whose view did not change is
    /// not sent anything (and keeps its version).
    fn render_for(&self, hello: &Hello) -> Option<(String, String, String)> {
        let published = self.published.load_full();
        let p = published.as_ref().as_ref()?;
        let text = scope::render(&p.docs, &hello.namespace, &hello.labels);
        Some((p.version.clone(), format!("{:08x}", fnv1a64(text.as_bytes()) as u32), text))
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Subscriber)) {
        if let Some(s) = self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            f(s);
        }
    }

    /// `/v1/proxies`.
    pub fn proxies_json(&self) -> serde_json::Value {
        let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<&Subscriber> = subs.values().collect();
        list.sort_by(|a, b| (&a.hello.namespace, &a.hello.name).cmp(&(&b.hello.namespace, &b.hello.name)));
        let proxies: Vec<_> = list
            .into_iter()
            .map(|s| {
                json!({
                    "name": s.hello.name,
                    "namespace": s.hello.namespace,
                    "labels": s.hello.labels,
                    "workload": s.hello.workload,
                    "identity": s.identity,
                    "address": s.peer.to_string(),
                    "proxy_version": s.hello.proxy_version,
                    "connected_since_unix": unix(s.since),
                    "sent": s.sent,
                    "acked": s.acked,
                    "synced": s.sent.is_some() && s.sent == s.acked,
                    "last_nack": s.nack.as_ref().map(|(v, errors, at)| json!({"version": v, "errors": errors, "at_unix": unix(*at)})),
                })
            })
            .collect();
        json!({"version": self.version(), "proxies": proxies})
    }

    /// `/v1/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let published = self.published.load_full();
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        json!({
            "version": self.version(),
            "published_at_unix": published.as_ref().as_ref().map(|p| unix(p.at)),
            "resources": published.as_ref().as_ref().map_or(0, |p| p.docs.len()),
            "proxies": self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).len(),
            "refused": refused.as_ref().map(|r| json!({"version": r.version, "errors": r.errors, "at_unix": unix(r.at)})),
        })
    }

    /// Watches the config paths and republishes on change (and every
    /// [`RESYNC`]).
    pub fn watch(self: &Arc<Self>) {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        for path in &self.opts.config {
            let tx = tx.clone();
            let watched =
                if path.is_dir() { path.clone() } else { path.parent().map(PathBuf::from).unwrap_or_default() };
            match notify::recommended_watcher(move |_| {
                let _ = tx.send(());
            }) {
                Ok(mut w) => match w.watch(&watched, RecursiveMode::NonRecursive) {
                    Ok(()) => self._watches.lock().unwrap_or_else(|p| p.into_inner()).push(w),
                    Err(e) => {
                        tracing::warn!(path = %watched.display(), error = %e, "cannot watch; re-reading every 30 s")
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch the config; re-reading every 30 s"),
            }
        }
        let cp = self.clone();
        tokio::spawn(async move {
            let mut resync = tokio::time::interval(RESYNC);
            resync.tick().await;
            loop {
                tokio::select! {
                    ev = rx.recv() => if ev.is_none() { return },
                    _ = resync.tick() => {}
                }
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                let cp = cp.clone();
                let _ = tokio::task::spawn_blocking(move || cp.reload()).await;
            }
        });
    }
}

/// Central validation: load and validation errors, and the compile errors
/// of each namespace the set names (as a proxy there, with an identity and
/// capture, would compile it).
fn validate(set: &crate::config::LoadedSet) -> Vec<String> {
    let mut errors: Vec<String> = set.diagnostics.iter().filter(|d| d.is_error()).map(Diagnostic::to_string).collect();
    if !errors.is_empty() {
        return errors;
    }
    let mut namespaces: Vec<&str> = set.resources.iter().map(|r| r.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let registry = Registry::new();
    for ns in namespaces {
        let opts = CompileOptions {
            namespace: ns.to_string(),
            // Only whether there is one matters to compilation.
            identity_dir: Some(PathBuf::from("/")),
            capture: Some(CapturePorts::default()),
            ..Default::default()
        };
        if let Err(diags) = compile(set, &opts, &registry) {
            for d in diags.iter().filter(|d| d.is_error()) {
                let e = d.to_string();
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    errors
}

/// A running control plane's address.
pub struct Handle {
    pub addr: SocketAddr,
    pub cp: Arc<ControlPlane>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Stops accepting and closes every subscription.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds and serves (HTTP/1.1 and HTTP/2; mTLS with an identity).
pub async fn serve(cp: Arc<ControlPlane>) -> std::io::Result<Handle> {
    let listener = TcpListener::bind(cp.opts.listen).await?;
    let addr = listener.local_addr()?;
    let server = cp.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(server.clone(), stream, peer));
                }
            }
        }
    });
    tracing::info!(%addr, tls = cp.identity.is_some(), "control plane listening");
    Ok(Handle { addr, cp, task })
}

async fn connection(cp: Arc<ControlPlane>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let (io, identity): (crate::upstream::pool::BoxIo, Option<String>) = match &cp.identity {
        Some(store) => match crate::tls::inbound::terminate(stream, Some(store)).await {
            Ok((io, p, _)) => (io, Some(p.spiffe_id.clone())),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "control-plane connection refused");
                return;
            }
        },
        None => (Box::new(stream), None),
    };
    let svc = service_fn(move |req| {
        let (cp, identity) = (cp.clone(), identity.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(cp, req, peer, identity).await) }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(10));
    let _ = b.serve_connection(TokioIo::new(io), svc).await;
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(format!("{v:#}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(status, &json!({"error": msg}))
}

async fn handle(
    cp: Arc<ControlPlane>,
    req: Request<Incoming>,
    peer: SocketAddr,
    identity: Option<String>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, super::PROXIES_PATH) => json_response(StatusCode::OK, &cp.proxies_json()),
        (&Method::GET, super::STATUS_PATH) => json_response(StatusCode::OK, &cp.status_json()),
        (&Method::POST, super::SUBSCRIBE_PATH) => subscribe(cp, req, peer, identity).await,
        (_, super::PROXIES_PATH | super::STATUS_PATH | super::SUBSCRIBE_PATH) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Reads the next complete line of a request body.
async fn next_line(body: &mut Incoming, lines: &mut Lines, pending: &mut Vec<Bytes>) -> Result<Option<Bytes>, String> {
    loop {
        if !pending.is_empty() {
            return Ok(Some(pending.remove(0)));
        }
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    pending.extend(lines.push(d)?);
                }
            }
        }
    }
}

async fn subscribe(
    cp: Arc<ControlPlane>,
    req: Request<Incoming>,
    peer: SocketAddr,
    identity: Option<String>,
) -> Response<Body> {
    let mut body = req.into_body();
    let mut lines = Lines::default();
    let mut pending = Vec::new();
    let first = tokio::time::timeout(HELLO_TIMEOUT, next_line(&mut body, &mut lines, &mut pending)).await;
    let hello = match first {
        Ok(Ok(Some(line))) => match serde_json::from_slice::<Upstream>(&line) {
            Ok(Upstream::Hello(h)) => h,
            _ => return error(StatusCode::BAD_REQUEST, "the stream must start with a hello"),
        },
        Ok(Ok(None)) | Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "no hello"),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "no hello in time"),
    };
    if hello.protocol != PROTOCOL_VERSION {
        let msg = format!("protocol {} is not supported; this control plane speaks {PROTOCOL_VERSION}", hello.protocol);
        return error(StatusCode::BAD_REQUEST, &msg);
    }
    // With mTLS, a proxy speaks for its own namespace only.
    if let Some(id) = &identity {
        let td = &cp.opts.trust_domain;
        let ns =
            id.strip_prefix(&format!("spiffe://{td}/ns/")).and_then(|rest| rest.split_once("/sa/")).map(|(ns, _)| ns);
        match ns {
            Some(ns) if ns == hello.namespace => {}
            Some(ns) => {
                tracing::warn!(%peer, identity = %id, claimed = %hello.namespace, "subscription refused: namespace does not match the identity");
                return error(
                    StatusCode::FORBIDDEN,
                    &format!("identity {id} is in namespace {ns}, not {}", hello.namespace),
                );
            }
            None => {
                tracing::warn!(%peer, identity = %id, "subscription refused: not a workload of trust domain {td}");
                return error(StatusCode::FORBIDDEN, &format!("identity {id} is not a workload of trust domain {td}"));
            }
        }
    }
    let id = cp.next_id.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, name = %hello.name, namespace = %hello.namespace, identity = identity.as_deref().unwrap_or("-"), "proxy subscribed");
    cp.subscribers.lock().unwrap_or_else(|p| p.into_inner()).insert(
        id,
        Subscriber {
            hello: hello.clone(),
            identity,
            peer,
            since: SystemTime::now(),
            sent: None,
            acked: hello.serving.clone(),
            nack: None,
        },
    );
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    // Acks and nacks; the proxy leaving ends the subscription (the reader
    // drops `gone` when it returns).
    let (gone, mut left) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let cp = cp.clone();
        tokio::spawn(async move {
            let _gone = gone;
            loop {
                match next_line(&mut body, &mut lines, &mut pending).await {
                    Ok(Some(line)) => match serde_json::from_slice::<Upstream>(&line) {
                        Ok(Upstream::Ack { version }) => cp.update(id, |s| s.acked = Some(version)),
                        Ok(Upstream::Nack { version, errors }) => {
                            tracing::warn!(id, %version, errors = ?errors, "proxy refused a config");
                            cp.update(id, |s| s.nack = Some((version, errors, SystemTime::now())));
                        }
                        Ok(Upstream::Hello(_)) | Err(_) => {
                            tracing::debug!(id, "unexpected message; ending the subscription");
                            return;
                        }
                    },
                    Ok(None) | Err(_) => return,
                }
            }
        })
    };
    // Sends the proxy its set now and whenever its view changes.
    let writer = cp.clone();
    tokio::spawn(async move {
        let mut generation = writer.generation.subscribe();
        // What the proxy has: the version it says it serves, whose suffix is
        // the hash of its view.
        let mut last: Option<String> = hello.serving.clone();
        let view_of = |v: &Option<String>| v.as_deref().and_then(|v| v.rsplit_once('-')).map(|(_, h)| h.to_string());
        loop {
            if let Some((set, hash, text)) = writer.render_for(&hello) {
                if view_of(&last).as_deref() != Some(hash.as_str()) {
                    let version = format!("{set}-{hash}");
                    let msg = encode(&Downstream::Config { version: version.clone(), resources: text });
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                    last = Some(version);
                }
                writer.update(id, |s| s.sent = last.clone());
            }
            tokio::select! {
                changed = generation.changed() => if changed.is_err() { break },
                _ = tx.closed() => break,
                _ = &mut left => break,
            }
        }
        reader.abort();
        writer.subscribers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        tracing::info!(id, name = %hello.name, "proxy unsubscribed");
    });
    let mut resp = Response::new(body::boxed(ChannelBody::new(rx)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(super::CONTENT_TYPE));
    resp
}
