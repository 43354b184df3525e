//! Command-line interface: `run`, `validate`, `split`, `demo`.

pub mod demo;
pub mod echo;
pub mod split;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::compile::{CompileOptions, compile};
use crate::config::load::load_paths;
use crate::runtime::{ApplyOutcome, Proxy, RunOptions};
use crate::telemetry::{LogFormat, init_logging};
use crate::upstream::Registry;

/// Exit code for invalid flags or an invalid first config (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Istio's admin port, on loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

#[derive(Debug, Parser)]
#[command(name = "remora", version, about = "A service-mesh sidecar proxy that speaks Istio's traffic API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy on Istio resources from files or directories (hot-reloaded).
    Run(RunArgs),
    /// Parse, validate and compile a config; print a summary or every error.
    Validate(ConfigArgs),
    /// Split local traffic between backends by weight and A/B rules, from flags alone.
    Split(split::SplitArgs),
    /// Start two echo backends and the proxy on the demo config, and print what to curl.
    Demo(demo::DemoArgs),
}

/// Flags that decide how a config is judged; shared by `run` and `validate`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// A YAML file or a directory of them; repeatable.
    #[arg(long = "config", short = 'c', env = "REMORA_CONFIG", value_delimiter = ',', required = true)]
    pub config: Vec<PathBuf>,
    /// Namespace of resources that don't name one, and of this proxy.
    #[arg(long, env = "REMORA_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This workload's labels (`k=v,k2=v2`), for selectors and `sourceLabels`.
    /// Without labels the proxy is standalone: every Gateway applies.
    #[arg(long, env = "REMORA_WORKLOAD_LABELS", value_parser = parse_labels, default_value = "")]
    pub workload_labels: Labels,
    /// This workload's name (reported in logs).
    #[arg(long, env = "REMORA_WORKLOAD_NAME")]
    pub workload_name: Option<String>,
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

impl ConfigArgs {
    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions { namespace: self.namespace.clone(), workload_labels: self.workload_labels.0.clone() }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Admin API address (readiness, config dump). Keep it on loopback.
    #[arg(long, env = "REMORA_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Worker threads (default: the CPUs available).
    #[arg(long, env = "REMORA_CONCURRENCY")]
    pub concurrency: Option<usize>,
    #[command(flatten)]
    pub log: LogArgs,
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
            rt.block_on(run(args))
        }
        Command::Split(args) => split::main(args),
        Command::Demo(args) => demo::main(args),
    }
}

pub fn runtime(concurrency: Option<usize>) -> Result<tokio::runtime::Runtime, i32> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = concurrency {
        if n == 0 {
            eprintln!("remora: --concurrency must be at least 1");
            return Err(EXIT_USAGE);
        }
        b.worker_threads(n);
    }
    b.enable_all().build().map_err(|e| {
        eprintln!("remora: cannot start the runtime: {e}");
        1
    })
}

fn validate(args: &ConfigArgs) -> i32 {
    let set = load_paths(&args.config, &args.namespace);
    match compile(&set, &args.compile_options(), &Registry::new()) {
        Ok(snapshot) => {
            for w in &snapshot.warnings {
                println!("{w}");
            }
            print!("{}", snapshot.summary());
            0
        }
        Err(diags) => {
            let errors = diags.iter().filter(|d| d.is_error()).count();
            for d in &diags {
                println!("{d}");
            }
            println!("{errors} error(s); the config would be rejected");
            1
        }
    }
}

/// `remora run`: admin first (so probes get 503, not refused), then the first
/// config (invalid → exit 64), then watch for changes until a signal.
pub async fn run(args: RunArgs) -> i32 {
    let opts = RunOptions { config_paths: args.config.config.clone(), compile: args.config.compile_options() };
    let proxy = Proxy::new(opts);
    let admin = match crate::admin::serve(args.admin, proxy.clone()).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(addr = %args.admin, error = %e, "cannot bind the admin address");
            return EXIT_USAGE;
        }
    };
    tracing::info!(%admin, "admin API listening");
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
    let _watch = match crate::config::watch::spawn(proxy.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config paths; changes will be picked up by the periodic re-read only");
            None
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    proxy.shutdown().await;
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
        Some(a) => Some(crate::admin::serve(a, proxy.clone()).await.map_err(|e| vec![format!("admin {a}: {e}")])?),
        None => None,
    };
    match proxy.reload_from_files().await {
        ApplyOutcome::Rejected { errors } => Err(errors.iter().map(|e| e.to_string()).collect()),
        _ => Ok((proxy, admin_addr)),
    }
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
