//! What does mTLS cost between two sidecars?
//!
//! One process: an echo app, a server sidecar (ingress to the app) and a
//! client sidecar (egress to the server sidecar), twice — once plaintext
//! (PeerAuthentication DISABLE, no DestinationRule tls) and once mTLS
//! (STRICT + ISTIO_MUTUAL with certificates made here). A closed-loop load
//! (CONNS concurrent keep-alive clients for SECONDS) measures requests per
//! second and latency through each pair; a direct run to the app is the
//! baseline. Pairs alternate for ROUNDS rounds in the same run.
//!
//! Run: `cargo bench --bench mtls_pair` (env SECONDS=5 CONNS=16 ROUNDS=3).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use tokio::time::Instant;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_identity(ca: &CertifiedIssuer<'static, KeyPair>, dir: &Path, id: &str) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), ca.pem()).unwrap();
}

async fn sidecar(yaml: String, identity: &Path, app: &str, dir: &Path) -> Arc<remora::runtime::Proxy> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("c.yaml"), yaml).unwrap();
    let opts = remora::runtime::RunOptions {
        config_paths: vec![dir.to_path_buf()],
        compile: remora::config::compile::CompileOptions {
            namespace: "default".into(),
            workload_labels: [("app".to_string(), app.to_string())].into(),
            identity_dir: Some(identity.to_path_buf()),
            ..Default::default()
        },
    };
    remora::cli::start_proxy(opts, None).await.unwrap().0
}

/// Starts a client+server sidecar pair; returns the client's egress port.
async fn pair(
    app: std::net::SocketAddr,
    mtls: bool,
    certs: &Path,
    work: &Path,
) -> (u16, Vec<Arc<remora::runtime::Proxy>>) {
    let (ingress, egress) = (free_port(), free_port());
    let mode = if mtls { "STRICT" } else { "DISABLE" };
    let server = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s}}\nspec:\n  ingress:\n  - port: {{number: {ingress}, protocol: HTTP, name: http}}\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:{}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: {mode}}}}}\n",
        app.port()
    );
    let tls = if mtls {
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: server}\nspec:\n  host: server.bench\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n"
    } else {
        ""
    };
    let client = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: server}}\nspec:\n  hosts: [server.bench]\n  resolution: STATIC\n  ports: [{{number: {egress}, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {ingress}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: c}}\nspec:\n  egress:\n  - port: {{number: {egress}, protocol: HTTP, name: http}}\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n{tls}"
    );
    let tag = if mtls { "mtls" } else { "plain" };
    let s = sidecar(server, &certs.join("server"), "server", &work.join(format!("{tag}-server"))).await;
    let c = sidecar(client, &certs.join("client"), "client", &work.join(format!("{tag}-client"))).await;
    (egress, vec![s, c])
}

/// Closed loop: `conns` clients, each with its own keep-alive connection,
/// for `secs`. Returns (requests per second, sorted latencies, failures).
async fn load(url: &str, host: &str, conns: usize, secs: u64) -> (f64, Vec<Duration>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (url, host, stop, failed) = (url.to_string(), host.to_string(), stop.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().no_proxy().http1_only().pool_max_idle_per_host(1).build().unwrap();
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = match client.get(&url).header("host", &host).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    lat.push(t.elapsed())
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (all.len() as f64 / secs as f64, all, failed.load(Ordering::Relaxed))
}

fn main() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (secs, conns, rounds) = (env("SECONDS", 5), env("CONNS", 16) as usize, env("ROUNDS", 3) as usize);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let work = std::env::temp_dir().join(format!("remora-mtls-bench-{}", std::process::id()));
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let certs = work.join("certs");
        write_identity(&ca, &certs.join("server"), "spiffe://cluster.local/ns/default/sa/server");
        write_identity(&ca, &certs.join("client"), "spiffe://cluster.local/ns/default/sa/client");
        let app = remora::cli::echo::spawn("127.0.0.1:0".parse().unwrap(), "app").await.unwrap();
        let (plain_port, _p) = pair(app, false, &certs, &work).await;
        let (mtls_port, _m) = pair(app, true, &certs, &work).await;
        let targets = [
            ("direct", format!("http://{app}/")),
            ("sidecar pair, plaintext", format!("http://127.0.0.1:{plain_port}/")),
            ("sidecar pair, mTLS", format!("http://127.0.0.1:{mtls_port}/")),
        ];
        for (_, url) in &targets {
            load(url, "server.bench", conns, 1).await; // warm up
        }
        println!("closed loop, {conns} keep-alive clients, {secs} s per run, {rounds} rounds");
        println!("{:<26} {:>10} {:>9} {:>9} {:>7}", "target", "req/s", "p50", "p99", "failed");
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut p50: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
        for _ in 0..rounds {
            for (i, (name, url)) in targets.iter().enumerate() {
                let (r, lat, failed) = load(url, "server.bench", conns, secs).await;
                let q = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or_default();
                println!(
                    "{name:<26} {r:>10.0} {:>7.0}µs {:>7.0}µs {failed:>7}",
                    q(0.5).as_micros() as f64,
                    q(0.99).as_micros() as f64
                );
                rps[i].push(r);
                p50[i].push(q(0.5));
            }
        }
        println!("\nmedians over rounds (min–max):");
        let med_rps: Vec<f64> = rps
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            })
            .collect();
        for (i, (name, _)) in targets.iter().enumerate() {
            let v = &rps[i];
            p50[i].sort();
            println!(
                "  {name:<24} {:>8.0} req/s ({:.0}–{:.0}), p50 {:.0}µs",
                med_rps[i],
                v[0],
                v[v.len() - 1],
                p50[i][p50[i].len() / 2].as_micros() as f64
            );
        }
        println!("\nmTLS pair / plaintext pair throughput: {:.2}", med_rps[2] / med_rps[1]);
        let _ = std::fs::remove_dir_all(&work);
    });
}
