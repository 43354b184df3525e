//! `remora inject`: golden files of its output for every kind with a pod
//! template, the per-pod annotations and the command's options; injecting
//! the output again changes nothing; bad input fails with its line.
//!
//! Inputs are `tests/golden/inject/NAME.in.yaml`, outputs `CASE.out.yaml`;
//! `REMORA_UPDATE_GOLDEN=1` rewrites the outputs. `.ci/run` also checks every
//! output against the Kubernetes schemas (`kubernetes-validate --strict`).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_remora");

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject").join(name)
}

/// `remora inject ARGS` with `input` on stdin.
fn inject(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn check(case: &str, input: &str, args: &[&str]) {
    let text = std::fs::read_to_string(golden(&format!("{input}.in.yaml"))).unwrap();
    let out = inject(args, &text);
    assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(out.stdout).unwrap();
    let path = golden(&format!("{case}.out.yaml"));
    if std::env::var("REMORA_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &got).unwrap();
    } else {
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got, want, "{case}: output differs from {}", path.display());
    }
    // Idempotent: the injected output goes through unchanged.
    let again = inject(args, &got);
    assert!(again.status.success(), "{case} again: {}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8(again.stdout).unwrap(), got, "{case}: injecting twice changed the output");
}

#[test]
fn output_matches_the_golden_files_and_is_idempotent() {
    check("deployment", "deployment", &[]);
    check("deployment-classic", "deployment", &["--classic"]);
    check(
        "deployment-options",
        "deployment",
        &[
            "--image",
            "registry.example/remora:1.2",
            "--init-image",
            "registry.example/remora-init:1.2",
            "--config-map",
            "mesh-routing",
            "--identity-secret",
            "",
        ],
    );
    check(
        "deployment-control-plane",
        "deployment",
        &["--control-plane", "https://remora-control-plane.mesh-system.svc:15012"],
    );
    check("kinds", "kinds", &[]);
    check("list", "list", &[]);
    check("options", "options", &[]);
}

#[test]
fn reads_a_file_and_writes_what_it_does_not_inject_verbatim() {
    let path = golden("kinds.in.yaml");
    let out = Command::new(BIN).args(["inject", "-f"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(out.stdout).unwrap();
    // The ConfigMap and the VirtualService keep their text, comments included.
    assert!(got.contains("# Untouched: kinds without a pod template keep their text and comments.\n"), "{got}");
    assert!(got.contains("  mode: \"on\"   # a YAML 1.1 boolean, quoted\n"), "{got}");
    assert!(got.contains("  http: [{route: [{destination: {host: web}}]}]\n"), "{got}");
}

#[test]
fn bad_input_fails_with_the_line() {
    for (input, want) in [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers: [\n", "line"),
        ("a: 1\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n", "line 3"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n", "no containers"),
    ] {
        let out = inject(&[], input);
        assert_eq!(out.status.code(), Some(1), "{input}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{input}: {err}");
    }
    let out = Command::new(BIN).args(["inject", "-f", "/nonexistent/manifests.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/manifests.yaml"));
}

/// The example under `deploy/example`: its injected manifests are what
/// `remora inject` makes of `apps.yaml` today, and its routing is valid
/// for a captured sidecar in its namespace.
#[test]
fn deploy_example_is_current_and_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/example");
    let apps = std::fs::read_to_string(dir.join("apps.yaml")).unwrap();
    let out = inject(&[], &apps);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let injected_path = dir.join("apps.injected.yaml");
    let got = String::from_utf8(out.stdout).unwrap();
    if std::env::var("REMORA_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&injected_path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&injected_path).unwrap();
    assert_eq!(got, want, "deploy/example/apps.injected.yaml is stale: run `remora inject -f apps.yaml`");
    let ids = support::certs::Ca::new("example root").workload("spiffe://cluster.local/ns/shop/sa/frontend");
    let id_dir = tempfile::tempdir().unwrap();
    ids.write(id_dir.path());
    let out = Command::new(BIN)
        .args(["validate", "--namespace", "shop", "--capture", "--workload-labels", "app=frontend,version=v1"])
        .arg("--identity-dir")
        .arg(id_dir.path())
        .arg("--config")
        .arg(dir.join("routing.yaml"))
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}{}", String::from_utf8_lossy(&out.stderr));
    assert!(summary.contains("beta-users -> outbound|8080|v2|backend.shop.svc.cluster.local"), "{summary}");
    assert!(summary.contains("(weight 90)") && summary.contains("(weight 10)"), "{summary}");
}

/// `deploy/control-plane`: the control plane accepts its mesh, which is the
/// example's routing with the namespace written out.
#[test]
fn deploy_control_plane_serves_the_example_routing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mesh = std::fs::read_to_string(root.join("control-plane/mesh.yaml")).unwrap();
    let routing = std::fs::read_to_string(root.join("example/routing.yaml")).unwrap();
    let mut want = remora::config::load::parse_values(&routing).unwrap();
    for v in &mut want {
        v["metadata"]["namespace"] = serde_json::Value::String("shop".into());
    }
    assert_eq!(
        remora::config::load::parse_values(&mesh).unwrap(),
        want,
        "control-plane/mesh.yaml drifted from example/routing.yaml"
    );
    let cp = remora::control::server::ControlPlane::new(remora::control::server::ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        config: vec![root.join("control-plane/mesh.yaml")],
        namespace: "mesh-system".into(),
        identity_dir: None,
        trust_domain: "cluster.local".into(),
    });
    assert!(cp.is_ok(), "{:?}", cp.err());
}
