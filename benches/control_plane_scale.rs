//! One control plane, 1,000 subscribed proxies: how long a change takes to
//! reach all of them, and what the control plane costs (RSS, CPU).
//!
//! `remora control-plane` runs as its own process (release build) on a
//! directory of 100 services with subsets and routes; this process opens
//! 1,000 subscriptions (the protocol's own client, one HTTP/2 connection
//! each, spread over 10 namespaces), acknowledges every config like a proxy,
//! then changes one route and times the delivery to every subscriber.
//! Rounds: 3 (`REMORA_BENCH_ROUNDS`); proxies: 1,000 (`REMORA_BENCH_PROXIES`).
//! Everything stays on loopback and every wait is bounded.
//!
//! Run: `cargo bench --bench control_plane_scale`

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use remora::control::client::Stream;
use remora::control::{Downstream, Hello, PROTOCOL_VERSION, Upstream};
use tokio::sync::mpsc;
use tokio::time::Instant;

const SERVICES: usize = 100;
const NAMESPACES: usize = 10;

fn config(weight: u32) -> String {
    let mut out = String::new();
    for i in 0..SERVICES {
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc{i}, namespace: ns{ns}}}\nspec:\n  hosts: [svc{i}.ns{ns}.svc.cluster.local]\n  ports: [{{number: 8080, name: http}}]\n  resolution: STATIC\n  endpoints:\n  - {{address: 10.1.{a}.{b}, labels: {{version: v1}}}}\n  - {{address: 10.2.{a}.{b}, labels: {{version: v2}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc{i}, namespace: ns{ns}}}\nspec:\n  host: svc{i}.ns{ns}.svc.cluster.local\n  exportTo: [\".\"]\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc{i}, namespace: ns{ns}}}\nspec:\n  hosts: [svc{i}.ns{ns}.svc.cluster.local]\n  exportTo: [\".\"]\n  http:\n  - match: [{{headers: {{x-user: {{exact: beta}}}}}}]\n    route: [{{destination: {{host: svc{i}.ns{ns}.svc.cluster.local, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: svc{i}.ns{ns}.svc.cluster.local, subset: v1}}, weight: {w1}}}\n    - {{destination: {{host: svc{i}.ns{ns}.svc.cluster.local, subset: v2}}, weight: {w2}}}\n---\n",
            ns = i % NAMESPACES,
            a = i / 250,
            b = i % 250 + 1,
            w1 = if i == 0 { 100 - weight } else { 90 },
            w2 = if i == 0 { weight } else { 10 },
        ));
    }
    out
}

/// (RSS KiB, peak RSS KiB) of a process.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ")".
    (ticks(11) + ticks(12)) / 100.0
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `cargo bench -- --list`: nothing to list.
    }
    let proxies: usize = std::env::var("REMORA_BENCH_PROXIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let rounds: usize = std::env::var("REMORA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    raise_fd_limit(proxies as u64 * 2 + 256);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, config(10)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cp = Command::new(env!("CARGO_BIN_EXE_remora"))
        .args(["control-plane", "--listen", &format!("127.0.0.1:{port}"), "--log-level", "warn", "--config"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("remora control-plane");
    let pid = cp.id();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let result = rt.block_on(run(port, pid, proxies, rounds, &file));
    let _ = cp.kill();
    let _ = cp.wait();
    if let Err(e) = result {
        eprintln!("control_plane_scale: {e}");
        std::process::exit(1);
    }
}

async fn run(port: u16, pid: u32, proxies: usize, rounds: usize, file: &Path) -> Result<(), String> {
    let url: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return Err("the control plane did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rss_idle, _) = memory(pid);
    let cpu_start = cpu_seconds(pid);
    // Subscribe everyone; each task acks what it gets and reports arrivals.
    let (arrived_tx, mut arrived_rx) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..proxies {
        let (url, tx, sem) = (url.clone(), arrived_tx.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                name: format!("proxy-{i}"),
                namespace: format!("ns{}", i % NAMESPACES),
                labels: [("app".to_string(), format!("app{}", i % 50))].into(),
                workload: None,
                proxy_version: "bench".into(),
                serving: None,
            };
            let permit = sem.acquire_owned().await.ok();
            let mut stream = Stream::open(&url, None, &hello).await?;
            drop(permit);
            while let Ok(Some(msg)) = stream.next().await {
                if let Downstream::Config { version, .. } = msg {
                    let _ = tx.send((i, version.clone(), Instant::now()));
                    stream.send(&Upstream::Ack { version }).await?;
                }
            }
            Ok::<(), String>(())
        }));
    }
    let mut first = 0;
    let limit = Instant::now() + Duration::from_secs(60);
    while first < proxies {
        match tokio::time::timeout_at(limit, arrived_rx.recv()).await {
            Ok(Some(_)) => first += 1,
            _ => return Err(format!("only {first} of {proxies} subscribers got their first config")),
        }
    }
    let subscribed_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_subscribed, _) = memory(pid);
    let cpu_subscribed = cpu_seconds(pid) - cpu_start;
    println!(
        "control plane: {proxies} proxies subscribed in {:.2} s; RSS {:.1} MiB idle, {:.1} MiB with them; {:.2} CPU-s to subscribe them",
        subscribed_in.as_secs_f64(),
        rss_idle as f64 / 1024.0,
        rss_subscribed as f64 / 1024.0,
        cpu_subscribed
    );
    // Rounds: change the weight of one route; every proxy in its namespace
    // gets a new version (the others' views do not change and get nothing).
    let affected = (0..proxies).filter(|i| i % NAMESPACES == 0).count();
    let (mut all, mut cpu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let cpu_before = cpu_seconds(pid);
        let t0 = Instant::now();
        remora_write(file, &config(20 + round as u32));
        let mut got = 0;
        let mut last = t0;
        let limit = Instant::now() + Duration::from_secs(30);
        while got < affected {
            match tokio::time::timeout_at(limit, arrived_rx.recv()).await {
                Ok(Some((_, _, at))) => {
                    got += 1;
                    last = last.max(at);
                }
                _ => return Err(format!("round {round}: {got} of {affected} proxies got the change")),
            }
        }
        // Nobody else was sent anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let extra = std::iter::from_fn(|| arrived_rx.try_recv().ok()).count();
        if extra > 0 {
            return Err(format!("round {round}: {extra} proxies whose view did not change were sent a config"));
        }
        let took = last - t0;
        let used = cpu_seconds(pid) - cpu_before;
        println!(
            "round {round}: change delivered to all {affected} affected proxies in {:.0} ms (control plane {:.3} CPU-s)",
            took.as_secs_f64() * 1000.0,
            used
        );
        all.push(took.as_secs_f64() * 1000.0);
        cpu.push(used);
    }
    // A change every proxy sees: a ServiceEntry exported everywhere.
    let cpu_before = cpu_seconds(pid);
    let t0 = Instant::now();
    let everyone = config(10).replace("name: http}]", "name: http-web}]");
    remora_write(file, &everyone);
    let mut got = 0;
    let mut last = t0;
    let limit = Instant::now() + Duration::from_secs(30);
    while got < proxies {
        match tokio::time::timeout_at(limit, arrived_rx.recv()).await {
            Ok(Some((_, _, at))) => {
                got += 1;
                last = last.max(at);
            }
            _ => return Err(format!("{got} of {proxies} proxies got the mesh-wide change")),
        }
    }
    let everyone_ms = (last - t0).as_secs_f64() * 1000.0;
    let everyone_cpu = cpu_seconds(pid) - cpu_before;
    let (rss_end, hwm) = memory(pid);
    let (min, max) = (all.iter().cloned().fold(f64::MAX, f64::min), all.iter().cloned().fold(0.0, f64::max));
    println!(
        "\nsummary: {proxies} proxies; one namespace's change ({affected} proxies): median {:.0} ms (min {:.0}, max {:.0}), {:.3} CPU-s; \
         a change to all {proxies}: {:.0} ms, {:.3} CPU-s; RSS {:.1} MiB (peak {:.1} MiB)",
        median(&mut all),
        min,
        max,
        median(&mut cpu),
        everyone_ms,
        everyone_cpu,
        rss_end as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Replaces the file atomically, as a ConfigMap update or a git checkout does.
fn remora_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
