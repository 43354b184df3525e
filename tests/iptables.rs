//! `remora iptables`: golden files of the rules it prints for the main flag
//! combinations, bad flags, and — as root, in a network namespace the test
//! creates — installing, re-installing (idempotent) and removing them.
//!
//! Golden files live in `tests/golden/iptables/`; `REMORA_UPDATE_GOLDEN=1`
//! rewrites them. The namespace test needs root, `ip` (iproute2) and
//! `iptables-restore`; without them it says why and skips, unless
//! `REMORA_REQUIRE_NETNS=1` (as `.ci/run` sets after installing them).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::netns::{self, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_remora");

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/iptables")
}

fn remora(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn check_golden(name: &str, args: &[&str]) {
    let out = remora(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(out.stdout).unwrap();
    let path = golden_dir().join(format!("{name}.txt"));
    if std::env::var("REMORA_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(got, want, "`remora iptables {}` differs from {}", args.join(" "), path.display());
}

#[test]
fn dry_run_rules_match_the_golden_files() {
    check_golden("default", &["iptables", "--dry-run"]);
    check_golden("ipv6", &["iptables", "--dry-run", "--ipv6"]);
    check_golden(
        "inbound_ports_only",
        &["iptables", "--dry-run", "--include-inbound-ports", "9080,8080", "--uid", "2102", "--gid", "2102"],
    );
    check_golden("no_inbound", &["iptables", "--dry-run", "--include-inbound-ports", ""]);
    check_golden(
        "outbound_cidrs_and_ports",
        &[
            "iptables",
            "--dry-run",
            "--ipv6",
            "--include-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,169.254.169.254",
            "--include-outbound-ports",
            "3306",
            "--exclude-outbound-ports",
            "5432,6379",
        ],
    );
    check_golden("cleanup", &["iptables", "--dry-run", "--cleanup", "--ipv6"]);
}

#[test]
fn bad_flags_exit_64_with_the_reason() {
    for (args, reason) in [
        (&["--include-inbound-ports", "80,http"][..], "`http` is not a port"),
        (&["--exclude-outbound-ports", "0"][..], "`0` is not a port"),
        (&["--include-outbound-cidrs", "10.0.0.0/33"][..], "prefix length"),
        (&["--exclude-outbound-cidrs", "example.com"][..], "not an IP address"),
        (&["--proxy-port", "15006"][..], "two different"),
    ] {
        let out = Command::new(BIN).arg("iptables").arg("--dry-run").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{args:?}: {err}");
    }
}

/// The namespace's `nat` table as `iptables -S` prints it.
fn nat(ns: &Netns, iptables: &str) -> String {
    ns.ok(iptables, &["-w", "-t", "nat", "-S"])
}

/// A rule's words, sorted, without `-m` and `tcp`.
fn key(l: &str) -> Vec<&str> {
    let mut w: Vec<&str> = l.split_whitespace().filter(|w| *w != "-m" && *w != "tcp").collect();
    w.sort_unstable();
    w
}

#[test]
fn install_is_idempotent_and_cleanup_removes_everything() {
    const TEST: &str = "install_is_idempotent_and_cleanup_removes_everything";
    if let Some(why) = netns::unavailable(&["ip", "iptables", "iptables-restore", "ip6tables-restore"]) {
        return netns::skip(TEST, &why);
    }
    let ns = match Netns::create(&format!("remora-ipt-{}", std::process::id())) {
        Ok(ns) => ns,
        Err(why) => return netns::skip(TEST, &why),
    };
    let install = ["iptables", "--ipv6", "--exclude-outbound-cidrs", "10.96.0.0/12"];
    for round in 0..2 {
        let out = ns.run(BIN, &install);
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Installed twice, present once: every rule the dry run prints is there
    // exactly once, in both families.
    for (iptables, v6) in [("iptables", false), ("ip6tables", true)] {
        let live = nat(&ns, iptables);
        let mut dry = vec!["iptables", "--dry-run", "--exclude-outbound-cidrs", "10.96.0.0/12"];
        if v6 {
            dry.push("--ipv6");
        }
        let printed = String::from_utf8(remora(&dry).stdout).unwrap();
        let section = printed.split("# ").find(|s| s.starts_with(&format!("{iptables}-restore"))).unwrap();
        // iptables -S prints options in its own order and adds `-m tcp`:
        // compare each rule's words as a sorted list, without those.
        let live_rules: Vec<Vec<&str>> = live.lines().filter(|l| l.starts_with("-A ")).map(key).collect();
        let dry_rules: Vec<&str> = section.lines().filter(|l| l.starts_with("-A ")).collect();
        assert_eq!(live_rules.len(), dry_rules.len(), "{iptables}: rule count\n{live}");
        for rule in dry_rules {
            let n = live_rules.iter().filter(|l| **l == key(rule)).count();
            assert_eq!(n, 1, "{iptables}: `{rule}` present {n} times in\n{live}");
        }
    }
    let out = ns.run(BIN, &["iptables", "--ipv6", "--cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for iptables in ["iptables", "ip6tables"] {
        let live = nat(&ns, iptables);
        assert!(!live.contains("ISTIO"), "{iptables} after cleanup:\n{live}");
    }
    // Cleaning up what is not there is not an error.
    let out = ns.run(BIN, &["iptables", "--cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
