//! Command-line interface: `run`, `validate`, `split`, `demo`, `wait`, `iptables`.

pub mod control;
pub mod demo;
pub mod echo;
pub mod inject;
pub mod iptables;
pub mod split;
pub mod wait;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use crate::config::compile::{CompileOptions, compile};
use crate::config::load::load_paths;
use crate::runtime::{ApplyOutcome, Layer, Proxy, RunOptions};
use crate::telemetry::{LogFormat, init_logging};
use crate::upstream::Registry;

/// Exit code for invalid flags or an invalid first config (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Istio's admin port, on loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Istio's `terminationDrainDuration` default (see `runtime::DEFAULT_DRAIN_TIMEOUT`).
pub const DEFAULT_DRAIN_TIMEOUT: &str = "5s";
/// After the drain, time for the admin server's last responses (the one to
/// `/quitquitquit` among them) to be written before the process exits.
const ADMIN_FINAL_WRITE: Duration = Duration::from_millis(500);
/// Time the runtime gives its tasks to stop once `run` has returned; blocking
/// work still running (a DNS lookup) must not hold the exit.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(200);

#[derive(Debug, Parser)]
#[command(name = "remora", version, about = "A service-mesh sidecar proxy that speaks Istio's traffic API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy on Istio resources from files or directories (hot-reloaded).
    Run(Box<RunArgs>),
    /// Parse, validate and compile a config; print a summary or every error.
    Validate(ConfigArgs),
    /// Split local traffic between backends by weight and A/B rules, from flags alone.
    Split(split::SplitArgs),
    /// Start two echo backends and the proxy on the demo config, and print what to curl.
    Demo(demo::DemoArgs),
    /// Wait until a proxy answers ready (for a `postStart` hook); exit 1 on timeout.
    Wait(wait::WaitArgs),
    /// Install (or print, or remove) the pod's traffic-capture rules; run by the init container.
    Iptables(iptables::IptablesArgs),
    /// Add the sidecar to Kubernetes manifests (like `istioctl kube-inject`).
    Inject(inject::InjectArgs),
    /// Serve a directory of Istio resources to subscribed proxies.
    ControlPlane(control::ControlPlaneArgs),
    /// Show which proxy runs which version, from a control plane.
    Status(control::StatusArgs),
}

/// Flags that decide how a config is judged; shared by `run` and `validate`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// A YAML file or a directory of them; repeatable. `run` may go without
    /// when it subscribes to a control plane.
    #[arg(long = "config", short = 'c', env = "REMORA_CONFIG", value_delimiter = ',')]
    pub config: Vec<PathBuf>,
    /// Namespace of resources that don't name one, and of this proxy.
    #[arg(long, env = "REMORA_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This workload's labels (`k=v,k2=v2`), for selectors and `sourceLabels`.
    /// Without labels the proxy is standalone: every Gateway applies.
    #[arg(long, env = "REMORA_WORKLOAD_LABELS", value_parser = parse_labels, default_value = "")]
    pub workload_labels: Labels,
    /// A file of labels in the downward API's format (`key="value"` lines),
    /// read at start and merged under `--workload-labels`; Kubernetes writes
    /// the pod's labels there.
    #[arg(long, env = "REMORA_WORKLOAD_LABELS_FILE")]
    pub workload_labels_file: Option<PathBuf>,
    /// This workload's name (reported in logs and metrics).
    #[arg(long, env = "REMORA_WORKLOAD_NAME")]
    pub workload_name: Option<String>,
    /// Directory with the workload certificate (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`, Istio's file-mounted layout); watched for rotation.
    #[arg(long, env = "REMORA_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = crate::tls::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Serve the traffic that `remora iptables` captures: the app's outbound
    /// connections on `--proxy-port`, connections to the pod on `--inbound-port`.
    #[arg(long, env = "REMORA_CAPTURE")]
    pub capture: bool,
    /// Outbound capture port (with `--capture`).
    #[arg(long, env = "REMORA_PROXY_PORT", default_value_t = 15001)]
    pub proxy_port: u16,
    /// Inbound capture port (with `--capture`).
    #[arg(long, env = "REMORA_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
}

#[derive(Debug, Clone, Default)]
pub struct Labels(pub BTreeMap<String, String>);

fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} is not k=v"))?;
        if k.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(Labels(out))
}

/// Labels as the Kubernetes downward API writes them: one `key="value"` per
/// line, the value quoted with Go's escapes.
pub fn parse_downward_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = || format!("line {}: {line:?} is not key=\"value\"", i + 1);
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let v = v.trim().strip_prefix('"').and_then(|v| v.strip_suffix('"')).ok_or_else(bad)?;
        let mut value = String::with_capacity(v.len());
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    Some(other) => value.push(other),
                    None => return Err(bad()),
                },
                c => value.push(c),
            }
        }
        out.insert(k.trim().to_string(), value);
    }
    Ok(out)
}

impl ConfigArgs {
    /// `--workload-labels` over the labels file, if any.
    fn labels(&self) -> Result<BTreeMap<String, String>, String> {
        let mut labels = match &self.workload_labels_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                parse_downward_labels(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => BTreeMap::new(),
        };
        labels.extend(self.workload_labels.0.clone());
        Ok(labels)
    }

    pub fn compile_options(&self) -> Result<CompileOptions, String> {
        Ok(CompileOptions {
            namespace: self.namespace.clone(),
            workload_labels: self.labels()?,
            workload_name: self.workload_name.clone(),
            identity_dir: self.identity_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            capture: self.capture.then_some(crate::config::compile::CapturePorts {
                outbound: self.proxy_port,
                inbound: self.inbound_port,
            }),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Admin API address (readiness, config dump, clusters, log level, drain
    /// and quit). Keep it on loopback.
    #[arg(long, env = "REMORA_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Health port for kubelet probes: only `GET /healthz/ready`, answered as
    /// the admin API's `/ready`.
    #[arg(long, env = "REMORA_HEALTH", default_value = crate::admin::DEFAULT_HEALTH)]
    pub health: SocketAddr,
    /// Longest drain on SIGTERM, SIGINT or `/quitquitquit` (`5s`, `500ms`,
    /// `1m`): in-flight requests get this long to finish before the process
    /// exits anyway.
    #[arg(long, env = "REMORA_DRAIN_TIMEOUT", value_parser = parse_drain_timeout, default_value = DEFAULT_DRAIN_TIMEOUT)]
    pub drain_timeout: Duration,
    /// Worker threads (default: the CPUs available).
    #[arg(long, env = "REMORA_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Prometheus endpoint (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "REMORA_METRICS", default_value = crate::telemetry::server::DEFAULT_METRICS)]
    pub metrics: SocketAddr,
    /// Access log to stdout, one line per request (`--log-format` decides
    /// text or JSON).
    #[arg(long, env = "REMORA_ACCESS_LOG", value_enum, default_value = "on")]
    pub access_log: Switch,
    /// Subscribe to a control plane: `http://host:15010`, or `https://...`
    /// for mTLS with the workload identity. Its resources are a layer over
    /// the files.
    #[arg(long, env = "REMORA_CONTROL_PLANE")]
    pub control_plane: Option<http::Uri>,
    /// SPIFFE ID an https control plane must present (repeatable); default:
    /// any workload of the trust domain.
    #[arg(long, env = "REMORA_CONTROL_PLANE_IDENTITY", value_delimiter = ',')]
    pub control_plane_identity: Vec<String>,
    /// Keep the last set from the control plane in this file; a restart with
    /// the control plane unreachable starts on it.
    #[arg(long, env = "REMORA_CONFIG_CACHE")]
    pub config_cache: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

fn parse_drain_timeout(s: &str) -> Result<Duration, String> {
    crate::config::model::parse_duration(s)
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "REMORA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `info,remora::access=debug`).
    #[arg(long, env = "REMORA_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Entry point used by `main`; returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Run(args) => {
            if let Err(e) = init_logging(args.log.log_format, &args.log.log_level) {
                eprintln!("remora: {e}");
                return EXIT_USAGE;
            }
            let rt = match runtime(args.concurrency) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let code = rt.block_on(run(*args));
            rt.shutdown_timeout(RUNTIME_SHUTDOWN);
            code
        }
        Command::Split(args) => split::main(args),
        Command::Demo(args) => demo::main(args),
        Command::Wait(args) => wait::main(args),
        Command::Iptables(args) => iptables::main(args),
        Command::Inject(args) => inject::main(args),
        Command::ControlPlane(args) => control::control_plane_main(args),
        Command::Status(args) => control::status_main(args),
    }
}

pub fn runtime(concurrency: Option<usize>) -> Result<tokio::runtime::Runtime, i32> {
    let mut b = match concurrency {
        Some(0) => {
            eprintln!("remora: --concurrency must be at least 1");
            return Err(EXIT_USAGE);
        }
        // One worker: the single-threaded scheduler, without work-stealing's
        // cross-thread bookkeeping (the blocking pool still takes compiles).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("remora: cannot start the runtime: {e}");
        1
    })
}

/// Writes a command's output to stdout. A reader that stops early (`| head`)
/// ends the output quietly instead of failing the command.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("remora: cannot write the output: {e}");
    }
}

fn validate(args: &ConfigArgs) -> i32 {
    use std::fmt::Write as _;
    if args.config.is_empty() {
        eprintln!("remora: --config is required");
        return EXIT_USAGE;
    }
    let opts = match args.compile_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("remora: --workload-labels-file {e}");
            return EXIT_USAGE;
        }
    };
    let set = load_paths(&args.config, &args.namespace);
    match compile(&set, &opts, &Registry::new()) {
        Ok(snapshot) => {
            let mut out = String::new();
            for w in &snapshot.warnings {
                let _ = writeln!(out, "{w}");
            }
            out.push_str(&snapshot.summary());
            emit(&out);
            0
        }
        Err(diags) => {
            let errors = diags.iter().filter(|d| d.is_error()).count();
            let mut out = String::new();
            for d in &diags {
                let _ = writeln!(out, "{d}");
            }
            let _ = writeln!(out, "{errors} error(s); the config would be rejected");
            emit(&out);
            1
        }
    }
}

/// `remora run`: admin and health first (so probes get 503, not refused),
/// then the first config (invalid → exit 64), then watch for changes until
/// SIGTERM, SIGINT or `/quitquitquit`; then drain and exit 0.
pub async fn run(args: RunArgs) -> i32 {
    let mut signals = Signals::new();
    let compile = match args.config.compile_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("remora: --workload-labels-file {e}");
            return EXIT_USAGE;
        }
    };
    // Set by `remora inject` from the downward API, for the operator reading logs.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        namespace = %compile.namespace,
        pod = std::env::var("POD_NAME").ok().as_deref().unwrap_or("-"),
        service_account = std::env::var("SERVICE_ACCOUNT").ok().as_deref().unwrap_or("-"),
        capture = compile.capture.is_some(),
        "remora starting"
    );
    if args.config.config.is_empty() && args.control_plane.is_none() {
        eprintln!("remora: --config is required (or --control-plane)");
        return EXIT_USAGE;
    }
    if let Some(url) = &args.control_plane
        && !matches!(url.scheme_str(), Some("http" | "https"))
    {
        eprintln!("remora: --control-plane {url}: use http://host:port or https://host:port");
        return EXIT_USAGE;
    }
    let opts = RunOptions { config_paths: args.config.config.clone(), compile };
    let proxy = Proxy::new(opts);
    proxy.set_drain_timeout(args.drain_timeout);
    if let Err(e) = proxy.start_identity() {
        eprintln!("remora: workload identity: {e}");
        return EXIT_USAGE;
    }
    // The admin API can drain and reconfigure the proxy: never off the pod.
    if !args.admin.ip().is_loopback() {
        eprintln!(
            "remora: --admin {} is not a loopback address; the admin API is served on localhost only",
            args.admin
        );
        return EXIT_USAGE;
    }
    let admin = match crate::admin::serve(args.admin, proxy.clone()).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(addr = %args.admin, error = %e, "cannot bind the admin address");
            return EXIT_USAGE;
        }
    };
    tracing::info!(admin = %admin.local_addr(), "admin API listening");
    let health = match crate::admin::serve_health(args.health, proxy.clone()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(addr = %args.health, error = %e, "cannot bind the health address");
            return EXIT_USAGE;
        }
    };
    tracing::info!(health = %health.local_addr(), "health endpoint listening");
    match crate::telemetry::server::serve(args.metrics, proxy.clone()).await {
        Ok(m) => tracing::info!(metrics = %m, "Prometheus endpoint listening"),
        Err(e) => {
            tracing::error!(addr = %args.metrics, error = %e, "cannot bind the metrics address");
            return EXIT_USAGE;
        }
    }
    if args.access_log == Switch::On {
        crate::telemetry::access::init(match args.log.log_format {
            LogFormat::Json => crate::telemetry::access::Format::Json,
            LogFormat::Text => crate::telemetry::access::Format::Text,
        });
    }
    if args.control_plane.is_some() {
        // Not ready until the control plane (or the cache) has delivered.
        proxy.await_control_plane();
        if let Some(cached) = args.config_cache.as_deref().and_then(crate::control::client::read_cache) {
            let version = cached.version.clone();
            match proxy.set_layer(Layer::ControlPlane, &cached.resources, Some(cached.version)).await {
                ApplyOutcome::Applied { .. } | ApplyOutcome::Unchanged { .. } => {
                    proxy.control_plane_applied();
                    tracing::info!(%version, "starting on the cached control-plane config");
                }
                ApplyOutcome::Rejected { .. } => {
                    tracing::warn!(%version, "the cached control-plane config is refused; waiting for the control plane");
                }
            }
        }
    }
    match proxy.reload_from_files().await {
        ApplyOutcome::Applied { .. } | ApplyOutcome::Unchanged { .. } => {}
        ApplyOutcome::Rejected { errors } => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("remora: the config is invalid ({} errors); not starting", errors.len());
            return EXIT_USAGE;
        }
    }
    let _subscription = args.control_plane.clone().map(|url| {
        let name = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "remora".into());
        crate::control::client::spawn(
            proxy.clone(),
            crate::control::client::SubscribeOptions {
                url,
                expected_identity: args.control_plane_identity.clone(),
                cache: args.config_cache.clone(),
                name,
            },
        )
    });
    let _watch = match crate::config::watch::spawn(proxy.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config paths; changes will be picked up by the periodic re-read only");
            None
        }
    };
    tokio::select! {
        _ = signals.recv() => tracing::info!("signal received"),
        _ = proxy.exit_requested() => tracing::info!("exit requested on the admin API"),
    }
    let deadline = Instant::now() + proxy.drain_timeout();
    let forced = tokio::select! {
        progress = proxy.drain_until(deadline) => {
            if progress.finished && progress.cut_off == 0 {
                tracing::info!("drained: no request in flight");
            } else {
                tracing::warn!(
                    inflight = progress.inflight,
                    inbound_connections = progress.inbound_connections.max(progress.cut_off),
                    timeout = ?proxy.drain_timeout(),
                    "drain timeout reached; requests still open are cut off"
                );
            }
            false
        }
        _ = signals.recv() => {
            tracing::warn!("second signal: exiting without waiting for the drain");
            true
        }
    };
    if !forced {
        // Outbound listeners served the app until now; close them with what
        // is left of the drain time (nothing is in flight unless it ran out).
        proxy.shutdown_until(deadline).await;
        tokio::join!(admin.shutdown(ADMIN_FINAL_WRITE), health.shutdown(ADMIN_FINAL_WRITE));
    }
    tracing::info!("exiting");
    0
}

/// Runs a proxy in-process on a config (tests, `split`, `demo`). Returns the
/// proxy once the first config is applied.
pub async fn start_proxy(
    opts: RunOptions,
    admin: Option<SocketAddr>,
) -> Result<(Arc<Proxy>, Option<SocketAddr>), Vec<String>> {
    let proxy = Proxy::new(opts);
    let admin_addr = match admin {
        Some(a) => {
            Some(crate::admin::serve(a, proxy.clone()).await.map_err(|e| vec![format!("admin {a}: {e}")])?.local_addr())
        }
        None => None,
    };
    proxy.start_identity().map_err(|e| vec![format!("workload identity: {e}")])?;
    match proxy.reload_from_files().await {
        ApplyOutcome::Rejected { errors } => Err(errors.iter().map(|e| e.to_string()).collect()),
        _ => Ok((proxy, admin_addr)),
    }
}

/// Runs an in-process proxy on a config made from flags (`split`, `demo`)
/// until SIGTERM or SIGINT. The YAML goes to a temporary directory of this
/// process, removed on exit; `on_ready` gets the admin address once the
/// config is applied. Returns the exit code.
pub async fn serve_generated(
    command: &str,
    yaml: &str,
    admin: SocketAddr,
    on_ready: impl FnOnce(Option<SocketAddr>),
) -> i32 {
    let dir = std::env::temp_dir().join(format!("remora-{command}-{}", std::process::id()));
    let path = dir.join(format!("{command}.yaml"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, yaml)) {
        eprintln!("remora {command}: cannot write {}: {e}", path.display());
        return 1;
    }
    let opts = RunOptions {
        config_paths: vec![path],
        compile: CompileOptions { namespace: "default".into(), ..Default::default() },
    };
    let code = match start_proxy(opts, Some(admin)).await {
        Ok((proxy, admin)) => {
            on_ready(admin);
            wait_for_signal().await;
            proxy.shutdown().await;
            0
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            1
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    code
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    Signals::new().recv().await;
}

/// SIGTERM and SIGINT, caught from the moment this is created: a signal that
/// arrives before anyone waits is kept for the next [`Signals::recv`] instead
/// of killing the process.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate());
            let int = signal(SignalKind::interrupt());
            if let Err(e) = &term {
                tracing::warn!(error = %e, "cannot catch SIGTERM");
            }
            if let Err(e) = &int {
                tracing::warn!(error = %e, "cannot catch SIGINT");
            }
            Signals { term: term.ok(), int: int.ok() }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// The next SIGTERM or SIGINT. Never resolves when neither can be caught.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    // `None` means the signal stream ended: nothing more comes.
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.term) => {}
                _ = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downward_api_labels_file() {
        let text = "app=\"reviews\"\npod-template-hash=\"5c7b\"\nnote=\"say \\\"hi\\\"\\n\"\n\n";
        let labels = parse_downward_labels(text).unwrap();
        assert_eq!(labels["app"], "reviews");
        assert_eq!(labels["pod-template-hash"], "5c7b");
        assert_eq!(labels["note"], "say \"hi\"\n");
        assert!(parse_downward_labels("app=reviews\n").unwrap_err().contains("line 1"));
        assert!(parse_downward_labels("no equals sign\n").is_err());
    }
}
