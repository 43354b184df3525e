//! `remora demo`: the quickstart. Two echo backends (v1, v2) and the proxy on
//! the checked-in `config/demo.yaml`: a 90/10 canary, and `x-user: beta` → v2.

use std::net::SocketAddr;

use clap::Args;

use super::LogArgs;
use crate::telemetry::init_logging;

/// The demo config, as checked in (tests load the same file).
pub const DEMO_YAML: &str = include_str!("../../config/demo.yaml");
/// Where the demo config expects its backends and proxy.
pub const DEMO_V1: &str = "127.0.0.1:18081";
pub const DEMO_V2: &str = "127.0.0.1:18082";
pub const DEMO_PROXY: &str = "127.0.0.1:18080";

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Admin API address for the demo proxy.
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub log: LogArgs,
}

pub fn main(args: DemoArgs) -> i32 {
    if let Err(e) = init_logging(args.log.log_format, &args.log.log_level) {
        eprintln!("remora: {e}");
        return super::EXIT_USAGE;
    }
    let rt = match super::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(run(args))
}

async fn run(args: DemoArgs) -> i32 {
    for (addr, version) in [(DEMO_V1, "v1"), (DEMO_V2, "v2")] {
        let addr: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => return 1,
        };
        if let Err(e) = super::echo::spawn(addr, version).await {
            eprintln!("remora demo: cannot start the {version} echo backend on {addr}: {e}");
            return 1;
        }
    }
    super::serve_generated("demo", DEMO_YAML, args.admin, print_tour).await
}

fn print_tour(admin: Option<SocketAddr>) {
    println!();
    println!(
        "remora demo is running: proxy on http://{DEMO_PROXY}, echo backends v1 on {DEMO_V1} and v2 on {DEMO_V2}."
    );
    println!();
    println!("  # 90/10 canary: about one request in ten answers \"version\": \"v2\"");
    println!(
        "  for i in $(seq 20); do curl -s http://{DEMO_PROXY}/hello | grep -o '\"version\":\"v[12]\"'; done | sort | uniq -c"
    );
    println!();
    println!("  # A/B rule: beta users always get v2");
    println!("  curl -s -H 'x-user: beta' http://{DEMO_PROXY}/hello");
    println!();
    if let Some(a) = admin {
        println!("  # what the proxy runs: listeners, routes, clusters");
        println!("  curl -s http://{a}/config_dump");
        println!();
    }
    println!("The config is config/demo.yaml (plain Istio resources). Ctrl-C stops the demo.");
}
