//! `remora iptables`: what a pod's init container runs to send the pod's TCP
//! traffic through the sidecar, with Istio's chains, ports and exclusions
//! (`istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT`), REDIRECT mode.
//!
//! The rules are written in `iptables-restore` format and applied with
//! `iptables-restore --noflush` (and `ip6tables-restore` for IPv6) after
//! removing any earlier copy, so running it twice leaves one set.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use clap::Args;

use crate::authz::IpBlock;

/// The chains remora installs in the `nat` table.
const CHAINS: [&str; 4] = ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"];
/// Istio's HBONE port, never captured.
const HBONE_PORT: u16 = 15008;

#[derive(Debug, Clone, Args)]
pub struct IptablesArgs {
    /// Port of the outbound capture listener.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// Port of the inbound capture listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// UID the proxy runs as; its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    pub uid: u32,
    /// GID the proxy runs as; its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    pub gid: u32,
    /// Inbound ports to capture: `*` for all, a comma-separated list, or empty for none.
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured when all are (`*`): the proxy's own.
    #[arg(long, default_value = "15090,15021,15020")]
    pub exclude_inbound_ports: String,
    /// Outbound destinations to capture: `*` for all, comma-separated CIDRs, or empty for none.
    #[arg(long, default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Outbound destinations never captured (comma-separated CIDRs).
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// Outbound ports always captured, whatever the destination.
    #[arg(long, default_value = "")]
    pub include_outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Also install the rules for IPv6 (ip6tables).
    #[arg(long)]
    pub ipv6: bool,
    /// Print the rules (iptables-restore input) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

/// Inbound ports to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    All { except: Vec<u16> },
    Only(Vec<u16>),
}

/// The capture plan, with every flag parsed and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub uid: u32,
    pub gid: u32,
    pub inbound: Ports,
    /// `None`: every destination.
    pub include_cidrs: Option<Vec<IpBlock>>,
    pub exclude_cidrs: Vec<IpBlock>,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
}

fn port_list(flag: &str, s: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u16 = p.parse().ok().filter(|n| *n > 0).ok_or_else(|| format!("--{flag}: `{p}` is not a port"))?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

fn cidr_list(flag: &str, s: &str) -> Result<Vec<IpBlock>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| IpBlock::parse(c).map_err(|e| format!("--{flag}: {e}")))
        .collect()
}

impl Plan {
    pub fn from_args(a: &IptablesArgs) -> Result<Plan, String> {
        let inbound = if a.include_inbound_ports.trim() == "*" {
            Ports::All { except: port_list("exclude-inbound-ports", &a.exclude_inbound_ports)? }
        } else {
            Ports::Only(port_list("include-inbound-ports", &a.include_inbound_ports)?)
        };
        let include_cidrs = if a.include_outbound_cidrs.trim() == "*" {
            None
        } else {
            Some(cidr_list("include-outbound-cidrs", &a.include_outbound_cidrs)?)
        };
        if a.proxy_port == 0 || a.inbound_port == 0 || a.proxy_port == a.inbound_port {
            return Err("--proxy-port and --inbound-port must be two different, non-zero ports".into());
        }
        Ok(Plan {
            proxy_port: a.proxy_port,
            inbound_port: a.inbound_port,
            uid: a.uid,
            gid: a.gid,
            inbound,
            include_cidrs,
            exclude_cidrs: cidr_list("exclude-outbound-cidrs", &a.exclude_outbound_cidrs)?,
            include_ports: port_list("include-outbound-ports", &a.include_outbound_ports)?,
            exclude_ports: port_list("exclude-outbound-ports", &a.exclude_outbound_ports)?,
        })
    }

    /// The `nat` table rules for one address family, in `iptables-restore`
    /// format; the input of `iptables-restore --noflush`.
    pub fn rules(&self, ipv6: bool) -> String {
        let (lo, inbound_src) = if ipv6 { ("::1/128", "::6/128") } else { ("127.0.0.1/32", "127.0.0.6/32") };
        let mut r = String::from("*nat\n");
        for c in CHAINS {
            let _ = writeln!(r, ":{c} - [0:0]");
        }
        let _ = writeln!(r, "-A ISTIO_INBOUND -p tcp --dport {HBONE_PORT} -j RETURN");
        let _ = writeln!(r, "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", self.proxy_port);
        let _ = writeln!(r, "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}", self.inbound_port);
        match &self.inbound {
            Ports::All { except } => {
                r.push_str("-A PREROUTING -p tcp -j ISTIO_INBOUND\n");
                // Never capture what the inbound listener itself receives.
                let _ = writeln!(r, "-A ISTIO_INBOUND -p tcp --dport {} -j RETURN", self.inbound_port);
                for p in except {
                    let _ = writeln!(r, "-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN");
                }
                r.push_str("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n");
            }
            Ports::Only(ports) if !ports.is_empty() => {
                r.push_str("-A PREROUTING -p tcp -j ISTIO_INBOUND\n");
                for p in ports {
                    let _ = writeln!(r, "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT");
                }
            }
            Ports::Only(_) => {}
        }
        r.push_str("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n");
        // The proxy's connections to the app (from 127.0.0.6) are delivered.
        let _ = writeln!(r, "-A ISTIO_OUTPUT -o lo -s {inbound_src} -j RETURN");
        for (m, id) in [("--uid-owner", self.uid), ("--gid-owner", self.gid)] {
            // The proxy calling its own pod's address goes through inbound.
            let _ = writeln!(
                r,
                "-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport {HBONE_PORT} -m owner {m} {id} -j ISTIO_IN_REDIRECT"
            );
            // The app talking to localhost is left alone.
            let _ = writeln!(r, "-A ISTIO_OUTPUT -o lo -m owner ! {m} {id} -j RETURN");
            // The proxy's own egress is never captured again.
            let _ = writeln!(r, "-A ISTIO_OUTPUT -m owner {m} {id} -j RETURN");
        }
        let _ = writeln!(r, "-A ISTIO_OUTPUT -d {lo} -j RETURN");
        for p in &self.exclude_ports {
            let _ = writeln!(r, "-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN");
        }
        for p in &self.include_ports {
            let _ = writeln!(r, "-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT");
        }
        for c in self.exclude_cidrs.iter().filter(|c| c.is_ipv4() != ipv6) {
            let _ = writeln!(r, "-A ISTIO_OUTPUT -d {c} -j RETURN");
        }
        match &self.include_cidrs {
            None => r.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"),
            Some(cidrs) => {
                for c in cidrs.iter().filter(|c| c.is_ipv4() != ipv6) {
                    let _ = writeln!(r, "-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT");
                }
            }
        }
        r.push_str("COMMIT\n");
        r
    }
}

/// Removes remora's jumps and chains from the `nat` table; what is already
/// gone is not an error.
fn cleanup(iptables: &str) -> Result<(), String> {
    for (chain, rule) in [("PREROUTING", "ISTIO_INBOUND"), ("OUTPUT", "ISTIO_OUTPUT")] {
        // Earlier versions of the jump (with or without `-p tcp`) and duplicates.
        for spec in [&["-p", "tcp", "-j", rule][..], &["-j", rule][..]] {
            for _ in 0..16 {
                let ok = Command::new(iptables)
                    .args(["-w", "-t", "nat", "-D", chain])
                    .args(spec)
                    .stderr(Stdio::null())
                    .status()
                    .map_err(|e| format!("cannot run {iptables}: {e}"))?
                    .success();
                if !ok {
                    break;
                }
            }
        }
    }
    for op in ["-F", "-X"] {
        for c in CHAINS {
            let _ = Command::new(iptables).args(["-w", "-t", "nat", op, c]).stderr(Stdio::null()).status();
        }
    }
    Ok(())
}

fn restore(bin: &str, rules: &str) -> Result<(), String> {
    let mut child = Command::new(bin)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(|e| format!("{bin}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{bin} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

pub fn main(args: IptablesArgs) -> i32 {
    let plan = match Plan::from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("remora iptables: {e}");
            return super::EXIT_USAGE;
        }
    };
    let families: &[bool] = if args.ipv6 { &[false, true] } else { &[false] };
    if args.dry_run {
        let mut out = String::new();
        for &v6 in families {
            let tool = if v6 { "ip6tables" } else { "iptables" };
            if args.cleanup {
                out.push_str(&format!("# {tool}: remove chains {}\n", CHAINS.join(", ")));
            } else {
                out.push_str(&format!("# {tool}-restore --noflush\n"));
                out.push_str(&plan.rules(v6));
            }
        }
        super::emit(&out);
        return 0;
    }
    for &v6 in families {
        let (iptables, restore_bin) =
            if v6 { ("ip6tables", "ip6tables-restore") } else { ("iptables", "iptables-restore") };
        let result =
            cleanup(iptables).and_then(|()| if args.cleanup { Ok(()) } else { restore(restore_bin, &plan.rules(v6)) });
        if let Err(e) = result {
            eprintln!("remora iptables: {e}");
            return 1;
        }
    }
    println!("remora iptables: {}", if args.cleanup { "capture rules removed" } else { "capture rules installed" });
    if !args.cleanup {
        println!(
            "remora iptables: run the proxy with `remora run --capture --proxy-port {} --inbound-port {}` as UID {}",
            plan.proxy_port, plan.inbound_port, args.uid
        );
    }
    0
}
