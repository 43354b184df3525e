//! The running proxy: applies config sets (first load, file changes) through
//! one path — load → validate → compile → bind new listeners → swap → close
//! removed listeners — and keeps the status the admin API reports.
//!
//! It also owns the drain: inbound listeners (gateway, sidecar ingress) stop
//! accepting and `/ready` turns 503, outbound listeners (sidecar egress) keep
//! serving the app while it shuts down, and the drain ends when no request is
//! in flight and the inbound connections are closed, or at the drain timeout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::compile::{CompileOptions, compile, start_discovery};
use crate::config::load::{load_paths, load_str};
use crate::config::{Diagnostic, LoadedSet};
use crate::proxy::server::{DRAIN_TIMEOUT, Stopping};
use crate::proxy::{ListenerManager, ProxyState};
use crate::snapshot::{ListenerKind, Snapshot};
use crate::telemetry::metrics::{Metrics, Workload};
use crate::upstream::Registry;

/// Settings fixed at start (from `remora run` flags).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_paths: Vec<PathBuf>,
    pub compile: CompileOptions,
}

/// The file name pushed resources are reported under.
pub const PUSHED_SOURCE: &str = "<pushed>";
/// The file name resources from the control plane are reported under.
pub const CONTROL_PLANE_SOURCE: &str = "<control-plane>";

/// Where config comes from besides the watched files. Each source is a
/// layer of its own (see [`merge_layers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `PUT /config` on the admin API.
    Push,
    /// The control-plane subscription (`--control-plane`).
    ControlPlane,
}

impl Layer {
    pub fn source(self) -> &'static str {
        match self {
            Layer::Push => PUSHED_SOURCE,
            Layer::ControlPlane => CONTROL_PLANE_SOURCE,
        }
    }
}

/// A resource set from a layer other than the files.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub text: String,
    /// The sender's version label (`?version=`, or the control plane's
    /// version), shown beside the hash.
    pub label: Option<String>,
    pub set: LoadedSet,
}

/// Files, the pushed set and the control plane's set are separate layers:
/// their resources add up, and a resource (kind, namespace, name) defined in
/// two layers is an error naming both places.
pub fn merge_layers(mut files: LoadedSet, layers: &[&LoadedSet]) -> LoadedSet {
    for layer in layers {
        for r in &layer.resources {
            if let Some(f) =
                files.resources.iter().find(|f| f.kind == r.kind && f.namespace == r.namespace && f.name == r.name)
            {
                files.diagnostics.push(r.error(
                    "metadata.name",
                    format!(
                        "{} is defined both in {}:{} and in {}; a resource lives in one layer",
                        r.display_name(),
                        f.source.file.display(),
                        f.source.line,
                        r.source.file.display(),
                    ),
                ));
            }
        }
        files.resources.extend(layer.resources.iter().cloned());
        files.files.extend(layer.files.iter().cloned());
        files.diagnostics.extend(layer.diagnostics.iter().cloned());
    }
    files
}

/// The control-plane subscription as `/config_dump` shows it.
#[derive(Debug, Clone, Default)]
pub struct ControlStatus {
    pub url: String,
    pub connected: bool,
    pub connected_since: Option<SystemTime>,
    /// Why the last stream ended or failed to start.
    pub last_error: Option<String>,
}

/// A rejected config set, kept for `/config_dump`.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub version: String,
    pub at: SystemTime,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
struct Status {
    last_rejection: Option<Rejection>,
    applied_at: Option<SystemTime>,
    /// How long the last applied set took from loaded to serving.
    apply_duration: Option<Duration>,
}

/// What one apply did.
#[derive(Debug)]
pub enum ApplyOutcome {
    Applied { version: String, warnings: usize },
    Unchanged { version: String },
    Rejected { errors: Vec<Diagnostic> },
}

/// What `/ready` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// No config applied yet (or its listeners are not bound yet).
    NotConfigured,
    /// Draining: inbound listeners closed or closing.
    Draining,
}

/// Where a drain stands, for the admin API and the exit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainProgress {
    /// Inbound listeners that stopped accepting.
    pub inbound_listeners: Vec<std::net::SocketAddr>,
    /// Connections still open on them.
    pub inbound_connections: usize,
    /// Requests in flight on every listener, outbound included.
    pub inflight: usize,
    /// Inbound connections closed unfinished when the drain timeout ran out.
    pub cut_off: usize,
    /// True when nothing remains: the inbound listeners are closed and no
    /// request is in flight.
    pub finished: bool,
}

/// Listener kinds that take traffic into the workload; a drain closes them.
/// Sidecar egress listeners carry the app's own outbound calls and keep
/// serving until the process exits.
pub const INBOUND_KINDS: &[ListenerKind] =
    &[ListenerKind::Gateway, ListenerKind::SidecarIngress, ListenerKind::CaptureInbound];

pub struct Proxy {
    pub state: Arc<ProxyState>,
    pub listeners: ListenerManager,
    registry: Arc<Registry>,
    opts: RunOptions,
    status: Mutex<Status>,
    ready: AtomicBool,
    apply_lock: tokio::sync::Mutex<()>,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// Config sets read and found the same as the active one.
    pub reloads_unchanged: AtomicU64,
    /// Set when a drain (or shutdown) starts; never cleared.
    draining: AtomicBool,
    /// The inbound listeners the drain stopped, once it has stopped them.
    drained: Mutex<Option<Stopping>>,
    drain_timeout_ms: AtomicU64,
    /// Set by `/quitquitquit`: `remora run` drains and exits.
    exit: watch::Sender<bool>,
    /// The pushed layer (`PUT /config`), applied on top of the files.
    pushed: Mutex<Option<Pushed>>,
    /// The control plane's layer (`--control-plane`).
    subscribed: Mutex<Option<Pushed>>,
    control: Mutex<Option<ControlStatus>>,
    /// Set while a proxy that subscribes to a control plane has applied
    /// nothing from it (nor from its cache): not ready yet.
    awaiting_control_plane: AtomicBool,
    /// Serialises "read the sources, apply, remember the push" so a file
    /// reload never applies a stale pushed layer.
    sources: tokio::sync::Mutex<()>,
    /// The workload identity (`--identity-dir`), and its file watcher.
    identity: Option<Arc<crate::tls::IdentityStore>>,
    identity_watch: Mutex<Option<notify::RecommendedWatcher>>,
}

impl Proxy {
    pub fn new(opts: RunOptions) -> Arc<Self> {
        let metrics = Metrics::new(Workload {
            name: opts.compile.workload_name.clone(),
            namespace: opts.compile.namespace.clone(),
            labels: opts.compile.workload_labels.clone(),
        });
        let state = ProxyState::new(Arc::new(Snapshot::default()), metrics.clone());
        let identity = opts.compile.identity_dir.as_ref().map(|_| crate::tls::IdentityStore::new());
        let mut registry = Registry::with_metrics(metrics);
        if let Some(store) = &identity {
            registry = registry.with_identity(store.clone());
            state.set_identity(store.clone());
        }
        Arc::new(Proxy {
            listeners: ListenerManager::new(state.clone()),
            state,
            registry: Arc::new(registry),
            identity,
            identity_watch: Mutex::new(None),
            pushed: Mutex::new(None),
            subscribed: Mutex::new(None),
            control: Mutex::new(None),
            awaiting_control_plane: AtomicBool::new(false),
            sources: tokio::sync::Mutex::new(()),
            opts,
            status: Mutex::new(Status::default()),
            ready: AtomicBool::new(false),
            apply_lock: tokio::sync::Mutex::new(()),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            reloads_unchanged: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            drained: Mutex::new(None),
            drain_timeout_ms: AtomicU64::new(duration_ms(DEFAULT_DRAIN_TIMEOUT)),
            exit: watch::Sender::new(false),
        })
    }

    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// The workload identity store, when `--identity-dir` is set.
    pub fn identity(&self) -> Option<&Arc<crate::tls::IdentityStore>> {
        self.identity.as_ref()
    }

    /// Loads the workload identity and starts watching its files. A missing
    /// or broken identity at start is an error (the caller exits).
    pub fn start_identity(&self) -> Result<(), crate::tls::TlsError> {
        let (Some(store), Some(dir)) = (&self.identity, &self.opts.compile.identity_dir) else { return Ok(()) };
        let td = self.opts.compile.trust_domain().to_string();
        store.install(crate::tls::Identity::load(dir, &td)?)?;
        let watcher = store.watch(dir.clone(), td)?;
        *self.identity_watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(())
    }

    /// True once a config has been applied and all its listeners are bound,
    /// until a drain starts.
    pub fn is_ready(&self) -> bool {
        self.readiness() == Readiness::Ready
    }

    pub fn readiness(&self) -> Readiness {
        if self.is_draining() {
            Readiness::Draining
        } else if self.is_configured() && !self.awaiting_control_plane.load(Ordering::Acquire) {
            Readiness::Ready
        } else {
            Readiness::NotConfigured
        }
    }

    /// True once a config has been applied (and stays true while draining).
    pub fn is_configured(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// How long a drain may take before the process exits anyway.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_drain_timeout(&self, timeout: Duration) {
        self.drain_timeout_ms.store(duration_ms(timeout), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.snapshot.load_full()
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).last_rejection.clone()
    }

    /// How long the last applied set took to compile, bind and swap in.
    pub fn apply_duration(&self) -> Option<Duration> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).apply_duration
    }

    pub fn applied_at(&self) -> Option<SystemTime> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).applied_at
    }

    fn layer_slot(&self, layer: Layer) -> &Mutex<Option<Pushed>> {
        match layer {
            Layer::Push => &self.pushed,
            Layer::ControlPlane => &self.subscribed,
        }
    }

    /// A layer's resource set, as last accepted.
    pub fn layer(&self, layer: Layer) -> Option<Pushed> {
        self.layer_slot(layer).lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The pushed resource set, as last accepted (`GET /config`).
    pub fn pushed(&self) -> Option<Pushed> {
        self.layer(Layer::Push)
    }

    /// Replaces the pushed layer (`PUT /config`); see [`Proxy::set_layer`].
    pub async fn push(&self, text: &str, label: Option<String>) -> ApplyOutcome {
        self.set_layer(Layer::Push, text, label).await
    }

    /// Replaces one layer with `text` (YAML; empty clears it) and applies
    /// the files and every layer all-or-nothing. The new layer is kept only
    /// if the combined set is applied.
    pub async fn set_layer(&self, which: Layer, text: &str, label: Option<String>) -> ApplyOutcome {
        let _sources = self.sources.lock().await;
        let layer = if text.trim().is_empty() {
            None
        } else {
            let set = load_str(std::path::Path::new(which.source()), text, &self.opts.compile.namespace);
            Some(Pushed { text: text.to_string(), label, set })
        };
        let files = match self.load_files().await {
            Ok(set) => set,
            Err(outcome) => return outcome,
        };
        let others: Vec<Pushed> = [Layer::Push, Layer::ControlPlane]
            .into_iter()
            .filter(|l| *l != which)
            .filter_map(|l| self.layer(l))
            .collect();
        let sets: Vec<&LoadedSet> = others.iter().chain(layer.as_ref()).map(|p| &p.set).collect();
        let outcome = self.apply(merge_layers(files, &sets)).await;
        if matches!(outcome, ApplyOutcome::Applied { .. } | ApplyOutcome::Unchanged { .. }) {
            tracing::info!(
                source = which.source(),
                label = layer.as_ref().and_then(|p| p.label.as_deref()).unwrap_or("-"),
                resources = layer.as_ref().map_or(0, |p| p.set.resources.len()),
                "config layer accepted"
            );
            *self.layer_slot(which).lock().unwrap_or_else(|p| p.into_inner()) = layer;
        }
        outcome
    }

    async fn load_files(&self) -> Result<LoadedSet, ApplyOutcome> {
        let paths = self.opts.config_paths.clone();
        let ns = self.opts.compile.namespace.clone();
        tokio::task::spawn_blocking(move || load_paths(&paths, &ns)).await.map_err(|e| {
            let d = Diagnostic::global(crate::config::Severity::Error, format!("config loader failed: {e}"));
            self.reject(String::new(), vec![d])
        })
    }

    /// The label the pusher gave the active pushed set, if any.
    pub fn push_label(&self) -> Option<String> {
        self.layer(Layer::Push).and_then(|p| p.label)
    }

    /// Holds readiness until the first control-plane set is applied.
    pub fn await_control_plane(&self) {
        self.awaiting_control_plane.store(true, Ordering::Release);
    }

    /// A control-plane set (or the cached one) is applied.
    pub fn control_plane_applied(&self) {
        self.awaiting_control_plane.store(false, Ordering::Release);
    }

    /// The subscription's state, when there is one.
    pub fn control_status(&self) -> Option<ControlStatus> {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Updates the subscription's state.
    pub fn update_control_status(&self, f: impl FnOnce(&mut ControlStatus)) {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        f(c.get_or_insert_with(ControlStatus::default));
    }

    /// The control plane's version of the active subscribed set, if any.
    pub fn control_plane_version(&self) -> Option<String> {
        self.layer(Layer::ControlPlane).and_then(|p| p.label)
    }

    /// Re-reads the config paths and applies them (with the pushed layer) if
    /// they changed.
    pub async fn reload_from_files(&self) -> ApplyOutcome {
        let _sources = self.sources.lock().await;
        let files = match self.load_files().await {
            Ok(set) => set,
            Err(outcome) => return outcome,
        };
        let layers: Vec<Pushed> =
            [Layer::Push, Layer::ControlPlane].into_iter().filter_map(|l| self.layer(l)).collect();
        let sets: Vec<&LoadedSet> = layers.iter().map(|p| &p.set).collect();
        self.apply(merge_layers(files, &sets)).await
    }

    /// Applies a loaded set all-or-nothing.
    pub async fn apply(&self, set: LoadedSet) -> ApplyOutcome {
        let _one_at_a_time = self.apply_lock.lock().await;
        let version = set.version();
        let current = self.snapshot();
        if self.is_draining() {
            // Applying could bind the inbound listeners the drain closed.
            tracing::info!(%version, "draining: config changes are not applied");
            return ApplyOutcome::Unchanged { version: current.version.clone() };
        }
        if self.is_configured() && current.version == version {
            self.reloads_unchanged.fetch_add(1, Ordering::Relaxed);
            return ApplyOutcome::Unchanged { version };
        }
        if let Some(r) = self.last_rejection()
            && r.version == version
            && !version.is_empty()
        {
            return ApplyOutcome::Rejected { errors: Vec::new() };
        }
        let started = Instant::now();
        // Compiling a large set takes a while: off the workers that carry
        // traffic (the set and its result move to the blocking pool and back).
        let (opts, registry) = (self.opts.compile.clone(), self.registry.clone());
        let compiled = tokio::task::spawn_blocking(move || compile(&set, &opts, &registry)).await;
        let snapshot = match compiled {
            Ok(Ok(s)) => s,
            Ok(Err(diags)) => return self.reject(version, diags),
            Err(e) => {
                let d = Diagnostic::global(crate::config::Severity::Error, format!("config compiler failed: {e}"));
                return self.reject(version, vec![d]);
            }
        };
        let wanted: Vec<_> = snapshot.listeners.iter().map(|l| l.addr).collect();
        let prepared = match self.listeners.prepare(&wanted).await {
            Ok(p) => p,
            Err(errors) => {
                let diags = errors
                    .into_iter()
                    .map(|(addr, e)| {
                        Diagnostic::global(crate::config::Severity::Error, format!("cannot listen on {addr}: {e}"))
                    })
                    .collect();
                return self.reject(version, diags);
            }
        };
        start_discovery(&snapshot).await;
        for w in &snapshot.warnings {
            tracing::warn!("{w}");
        }
        let warnings = snapshot.warnings.len();
        let version = snapshot.version.clone();
        let old = self.state.snapshot.swap(Arc::new(snapshot));
        self.listeners.commit(prepared);
        // The old snapshot may be large and the last reference: free it off
        // the workers too.
        tokio::task::spawn_blocking(move || drop(old));
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.applied_at = Some(SystemTime::now());
            st.apply_duration = Some(started.elapsed());
        }
        self.reloads_applied.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
        tracing::info!(%version, warnings, took = ?started.elapsed(), "config applied");
        ApplyOutcome::Applied { version, warnings }
    }

    fn reject(&self, version: String, diags: Vec<Diagnostic>) -> ApplyOutcome {
        let errors: Vec<Diagnostic> = diags.into_iter().filter(Diagnostic::is_error).collect();
        tracing::error!(errors = errors.len(), "config rejected; the running config keeps serving");
        for e in &errors {
            tracing::error!("{e}");
        }
        self.reloads_rejected.fetch_add(1, Ordering::Relaxed);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.last_rejection =
            Some(Rejection { version, at: SystemTime::now(), errors: errors.iter().map(|e| e.to_string()).collect() });
        ApplyOutcome::Rejected { errors }
    }

    /// Starts the drain, once: `/ready` turns 503 at once, config changes
    /// stop being applied, and the inbound listeners stop accepting; their
    /// open connections finish their requests (`Connection: close`, GOAWAY)
    /// within the drain timeout. Outbound listeners keep serving. Returns
    /// when the inbound listeners have stopped accepting.
    pub async fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!(timeout = ?self.drain_timeout(), "draining: inbound listeners stop accepting, outbound listeners keep serving");
        }
        // An apply in progress finishes first; the next one sees the flag.
        let _one_at_a_time = self.apply_lock.lock().await;
        let mut drained = self.drained.lock().unwrap_or_else(|p| p.into_inner());
        if drained.is_none() {
            let stopping = self.listeners.stop_kinds(INBOUND_KINDS, self.drain_timeout());
            for addr in stopping.addresses() {
                tracing::info!(%addr, "inbound listener stopped accepting");
            }
            *drained = Some(stopping);
        }
    }

    /// Where the drain stands (all zero and unfinished before it starts).
    pub fn drain_progress(&self) -> DrainProgress {
        let stopping = self.drained.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let inflight = self.state.inflight();
        match stopping {
            Some(s) => DrainProgress {
                inbound_listeners: s.addresses(),
                inbound_connections: s.open_connections(),
                inflight,
                cut_off: s.cut_off(),
                finished: s.is_done() && inflight == 0,
            },
            None => DrainProgress {
                inbound_listeners: Vec::new(),
                inbound_connections: 0,
                inflight,
                cut_off: 0,
                finished: false,
            },
        }
    }

    /// Drains (see [`Proxy::start_drain`]) and waits until nothing remains or
    /// `deadline` passes. Returns where the drain stood at the end.
    pub async fn drain_until(&self, deadline: Instant) -> DrainProgress {
        let _ = tokio::time::timeout_at(deadline, async {
            self.start_drain().await;
            while !self.drain_progress().finished {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        })
        .await;
        self.drain_progress()
    }

    /// Asks `remora run` to drain and exit (`/quitquitquit`).
    pub fn request_exit(&self) {
        self.exit.send_replace(true);
    }

    /// Resolves once [`Proxy::request_exit`] has been called.
    pub async fn exit_requested(&self) {
        let mut rx = self.exit.subscribe();
        // The sender lives in `self`, so this only ends with `true`.
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Stops every listener, reports not-ready, and waits for open
    /// connections to finish (bounded by [`DRAIN_TIMEOUT`]).
    pub async fn shutdown(&self) {
        self.shutdown_until(Instant::now() + DRAIN_TIMEOUT).await;
    }

    /// Stops every listener; their connections finish their requests until
    /// `deadline`, then are closed.
    pub async fn shutdown_until(&self, deadline: Instant) {
        self.draining.store(true, Ordering::Release);
        // An apply in progress could bind listeners after they are stopped.
        let one_at_a_time = tokio::time::timeout_at(deadline, self.apply_lock.lock()).await.ok();
        let bound = deadline.saturating_duration_since(Instant::now());
        let stopping = self.listeners.stop_all(bound);
        drop(one_at_a_time);
        let _ = tokio::time::timeout_at(deadline, stopping.wait()).await;
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Istio's `terminationDrainDuration` default: how long `remora run` drains
/// before it exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a drain checks whether requests remain; short next to any drain
/// timeout, and the check is two atomic loads per listener.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Debounce for file events: kubelet's symlink swap arrives as a burst.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);
/// Periodic re-read, a safety net for missed inotify events.
pub const RELOAD_RESYNC: Duration = Duration::from_secs(30);
