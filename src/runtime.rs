//! The running proxy: applies config sets (first load, file changes) through
//! one path — load → validate → compile → bind new listeners → swap → close
//! removed listeners — and keeps the status the admin API reports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::compile::{CompileOptions, compile, start_discovery};
use crate::config::load::load_paths;
use crate::config::{Diagnostic, LoadedSet};
use crate::proxy::{ListenerManager, ProxyState};
use crate::snapshot::Snapshot;
use crate::upstream::Registry;

/// Settings fixed at start (from `remora run` flags).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_paths: Vec<PathBuf>,
    pub compile: CompileOptions,
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
}

/// What one apply did.
#[derive(Debug)]
pub enum ApplyOutcome {
    Applied { version: String, warnings: usize },
    Unchanged { version: String },
    Rejected { errors: Vec<Diagnostic> },
}

pub struct Proxy {
    pub state: Arc<ProxyState>,
    pub listeners: ListenerManager,
    registry: Registry,
    opts: RunOptions,
    status: Mutex<Status>,
    ready: AtomicBool,
    apply_lock: tokio::sync::Mutex<()>,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
}

impl Proxy {
    pub fn new(opts: RunOptions) -> Arc<Self> {
        let state = ProxyState::new(Arc::new(Snapshot::default()));
        Arc::new(Proxy {
            listeners: ListenerManager::new(state.clone()),
            state,
            registry: Registry::new(),
            opts,
            status: Mutex::new(Status::default()),
            ready: AtomicBool::new(false),
            apply_lock: tokio::sync::Mutex::new(()),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
        })
    }

    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// True once a config has been applied and all its listeners are bound.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.snapshot.load_full()
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).last_rejection.clone()
    }

    pub fn applied_at(&self) -> Option<SystemTime> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).applied_at
    }

    /// Re-reads the config paths and applies them if they changed.
    pub async fn reload_from_files(&self) -> ApplyOutcome {
        let paths = self.opts.config_paths.clone();
        let ns = self.opts.compile.namespace.clone();
        // File reads happen on the blocking pool, never on a worker thread.
        let set = match tokio::task::spawn_blocking(move || load_paths(&paths, &ns)).await {
            Ok(set) => set,
            Err(e) => {
                let d = Diagnostic::global(crate::config::Severity::Error, format!("config loader failed: {e}"));
                return self.reject(String::new(), vec![d]);
            }
        };
        self.apply(set).await
    }

    /// Applies a loaded set all-or-nothing.
    pub async fn apply(&self, set: LoadedSet) -> ApplyOutcome {
        let _one_at_a_time = self.apply_lock.lock().await;
        let version = set.version();
        let current = self.snapshot();
        if self.is_ready() && current.version == version {
            return ApplyOutcome::Unchanged { version };
        }
        if let Some(r) = self.last_rejection()
            && r.version == version
            && !version.is_empty()
        {
            return ApplyOutcome::Rejected { errors: Vec::new() };
        }
        let snapshot = match compile(&set, &self.opts.compile, &self.registry) {
            Ok(s) => s,
            Err(diags) => return self.reject(version, diags),
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
        self.state.snapshot.store(Arc::new(snapshot));
        self.listeners.commit(prepared);
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.applied_at = Some(SystemTime::now());
        }
        self.reloads_applied.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
        tracing::info!(%version, warnings, "config applied");
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

    /// Stops accepting, reports not-ready, and waits for open connections to
    /// finish (bounded by the listeners' drain timeout).
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.listeners.stop_all().await;
    }
}

/// Debounce for file events: kubelet's symlink swap arrives as a burst.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);
/// Periodic re-read, a safety net for missed inotify events.
pub const RELOAD_RESYNC: Duration = Duration::from_secs(30);
