//! `remora split`: local traffic splitting from flags alone.
//!
//! The flags are turned into plain Istio resources (a ServiceEntry with one
//! endpoint per backend, a DestinationRule with a subset per backend, a Gateway
//! on the listen address, and a VirtualService with the A/B rules first and the
//! weighted split last). `--print-config` prints exactly that YAML, which
//! `remora run` accepts and routes identically.

use std::fmt::Write as _;
use std::net::SocketAddr;

use clap::Args;

use super::LogArgs;
use crate::telemetry::init_logging;

/// Service name used for the generated resources.
const SPLIT_HOST: &str = "split.local";

#[derive(Debug, Clone, Args)]
#[command(after_help = "EXAMPLES:
  # 90/10 canary between two local versions
  remora split --listen 127.0.0.1:8080 \\
    --backend v1=http://127.0.0.1:9001 --backend v2=http://127.0.0.1:9002 \\
    --weight v1=90 --weight v2=10

  # A/B: beta testers (header), cookie group b, or ?variant=b go to v2
  remora split --listen 127.0.0.1:8080 \\
    --backend v1=http://127.0.0.1:9001 --backend v2=http://127.0.0.1:9002 \\
    --rule header:x-user=beta@v2 --rule cookie:group=b@v2 --rule query:variant=b@v2

Rules are tried in order before the weighted split. Without --weight, traffic
is split evenly between the backends.")]
pub struct SplitArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A backend: NAME=http://HOST:PORT (repeat for each version).
    #[arg(long = "backend", required = true)]
    pub backends: Vec<String>,
    /// A weight: NAME=N (relative; give every backend one, or none for an even split).
    #[arg(long = "weight")]
    pub weights: Vec<String>,
    /// An A/B rule: KIND:NAME=VALUE@BACKEND with KIND header, cookie or query.
    #[arg(long = "rule")]
    pub rules: Vec<String>,
    /// Print the equivalent Istio YAML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Admin API address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, PartialEq)]
struct Backend {
    name: String,
    host: String,
    port: u16,
    weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
enum RuleKind {
    Header,
    Cookie,
    Query,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    kind: RuleKind,
    name: String,
    value: String,
    backend: String,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("--backend {s:?}: expected NAME=http://HOST:PORT"))?;
    if !is_name(name) {
        return Err(format!("--backend {s:?}: name {name:?} must be lowercase letters, digits and '-'"));
    }
    let rest =
        url.strip_prefix("http://").ok_or_else(|| format!("--backend {s:?}: only http:// backends are supported"))?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(format!("--backend {s:?}: a backend is HOST:PORT without a path"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(']') || authority.starts_with('[') && h.ends_with(']') => {
            let port = p.parse::<u16>().map_err(|_| format!("--backend {s:?}: bad port {p:?}"))?;
            (h.trim_start_matches('[').trim_end_matches(']').to_string(), port)
        }
        _ => (authority.to_string(), 80),
    };
    if host.is_empty() || port == 0 {
        return Err(format!("--backend {s:?}: expected NAME=http://HOST:PORT"));
    }
    Ok(Backend { name: name.to_string(), host, port, weight: None })
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    let err = || format!("--rule {s:?}: expected KIND:NAME=VALUE@BACKEND (KIND is header, cookie or query)");
    let (kind, rest) = s.split_once(':').ok_or_else(err)?;
    let kind = match kind {
        "header" => RuleKind::Header,
        "cookie" => RuleKind::Cookie,
        "query" => RuleKind::Query,
        _ => return Err(err()),
    };
    let (cond, backend) = rest.rsplit_once('@').ok_or_else(err)?;
    let (name, value) = cond.split_once('=').ok_or_else(err)?;
    if name.is_empty() || backend.is_empty() {
        return Err(err());
    }
    let name = if kind == RuleKind::Header { name.to_ascii_lowercase() } else { name.to_string() };
    Ok(Rule { kind, name, value: value.to_string(), backend: backend.to_string() })
}

/// Parses the flags into backends and rules, checking every reference.
fn plan(args: &SplitArgs) -> Result<(Vec<Backend>, Vec<Rule>), String> {
    let mut backends = Vec::new();
    for b in &args.backends {
        let b = parse_backend(b)?;
        if backends.iter().any(|x: &Backend| x.name == b.name) {
            return Err(format!("backend {} is given twice", b.name));
        }
        backends.push(b);
    }
    for w in &args.weights {
        let (name, n) = w.split_once('=').ok_or_else(|| format!("--weight {w:?}: expected NAME=N"))?;
        let n: u32 = n.parse().map_err(|_| format!("--weight {w:?}: N must be a non-negative integer"))?;
        let b = backends
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| format!("--weight {w:?}: no backend named {name}"))?;
        b.weight = Some(n);
    }
    let given = backends.iter().filter(|b| b.weight.is_some()).count();
    if given != 0 && given != backends.len() {
        return Err("give every backend a --weight, or none for an even split".into());
    }
    if given == 0 {
        for b in &mut backends {
            b.weight = Some(1);
        }
    }
    if backends.len() > 1 && backends.iter().all(|b| b.weight == Some(0)) {
        return Err("the weights add up to 0".into());
    }
    let mut rules = Vec::new();
    for r in &args.rules {
        let r = parse_rule(r)?;
        if !backends.iter().any(|b| b.name == r.backend) {
            return Err(format!("--rule sends traffic to {}, which is not a --backend", r.backend));
        }
        rules.push(r);
    }
    Ok((backends, rules))
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn regex_escape(s: &str) -> String {
    regex::escape(s)
}

/// The Istio resources equivalent to the flags.
fn render(listen: SocketAddr, backends: &[Backend], rules: &[Rule]) -> String {
    let all_ips = backends.iter().all(|b| b.host.parse::<std::net::IpAddr>().is_ok());
    let mut y = String::new();
    let _ =
        writeln!(y, "# Generated by `remora split --print-config`; `remora run --config FILE` serves the same routes.");
    let _ = writeln!(
        y,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: split\nspec:\n  hosts:\n  - {SPLIT_HOST}"
    );
    let _ = writeln!(y, "  location: MESH_INTERNAL\n  resolution: {}", if all_ips { "STATIC" } else { "DNS" });
    let _ = writeln!(y, "  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n  endpoints:");
    for b in backends {
        let _ = writeln!(
            y,
            "  - address: {}\n    ports:\n      http: {}\n    labels:\n      version: {}",
            yaml_str(&b.host),
            b.port,
            b.name
        );
    }
    let _ = writeln!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: split\nspec:\n  host: {SPLIT_HOST}\n  subsets:"
    );
    for b in backends {
        let _ = writeln!(y, "  - name: {}\n    labels:\n      version: {}", b.name, b.name);
    }
    let _ = writeln!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: split\nspec:\n  servers:"
    );
    let _ = writeln!(
        y,
        "  - port:\n      number: {}\n      name: http\n      protocol: HTTP\n    bind: {}\n    hosts:\n    - \"*\"",
        listen.port(),
        yaml_str(&listen.ip().to_string())
    );
    let _ = writeln!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: split\nspec:\n  hosts:\n  - \"*\"\n  gateways:\n  - split\n  http:"
    );
    for (i, r) in rules.iter().enumerate() {
        let _ = writeln!(y, "  - name: rule-{i}\n    match:");
        match r.kind {
            RuleKind::Header => {
                let _ = writeln!(y, "    - headers:\n        {}:\n          exact: {}", r.name, yaml_str(&r.value));
            }
            RuleKind::Cookie => {
                // Istio's idiom for a cookie match: a regex over the Cookie header.
                let re = format!("^(.*?;\\s*)?({}={})(;.*)?$", regex_escape(&r.name), regex_escape(&r.value));
                let _ = writeln!(y, "    - headers:\n        cookie:\n          regex: {}", yaml_str(&re));
            }
            RuleKind::Query => {
                let _ = writeln!(
                    y,
                    "    - queryParams:\n        {}:\n          exact: {}",
                    yaml_str(&r.name),
                    yaml_str(&r.value)
                );
            }
        }
        let _ =
            writeln!(y, "    route:\n    - destination:\n        host: {SPLIT_HOST}\n        subset: {}", r.backend);
    }
    let _ = writeln!(y, "  - name: split\n    route:");
    for b in backends {
        let _ = writeln!(
            y,
            "    - destination:\n        host: {SPLIT_HOST}\n        subset: {}\n      weight: {}",
            b.name,
            b.weight.unwrap_or(0)
        );
    }
    y
}

/// The YAML for `args`, or a message about the first bad flag.
pub fn config_yaml(args: &SplitArgs) -> Result<String, String> {
    let (backends, rules) = plan(args)?;
    Ok(render(args.listen, &backends, &rules))
}

pub fn main(args: SplitArgs) -> i32 {
    let yaml = match config_yaml(&args) {
        Ok(y) => y,
        Err(e) => {
            eprintln!("remora split: {e}");
            return super::EXIT_USAGE;
        }
    };
    if args.print_config {
        print!("{yaml}");
        return 0;
    }
    if let Err(e) = init_logging(args.log.log_format, &args.log.log_level) {
        eprintln!("remora: {e}");
        return super::EXIT_USAGE;
    }
    let rt = match super::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(super::serve_generated("split", &yaml, args.admin, |_| {
        println!("remora split: listening on http://{}", args.listen)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_forms() {
        let b = parse_backend("v1=http://127.0.0.1:9001").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 9001));
        let b = parse_backend("v2=http://localhost").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("localhost", 80));
        let b = parse_backend("v3=http://[::1]:81/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 81));
        assert!(parse_backend("V1=http://x:1").is_err());
        assert!(parse_backend("v1=https://x:1").is_err());
        assert!(parse_backend("v1=http://x:1/path").is_err());
    }

    #[test]
    fn rule_forms() {
        let r = parse_rule("header:X-User=beta@v2").unwrap();
        assert_eq!(
            r,
            Rule { kind: RuleKind::Header, name: "x-user".into(), value: "beta".into(), backend: "v2".into() }
        );
        assert!(parse_rule("body:x=y@v2").is_err());
        assert!(parse_rule("header:x@v2").is_err());
    }
}
