//! Does a Prometheus scrape show in the data path's tail latency?
//!
//! One process: an echo upstream, remora in front of it, and an open-loop
//! load generator at a fixed rate (latency measured from each request's
//! scheduled send time, so stalls are not hidden). Three runs in the same
//! process and the same minute: direct to the upstream (baseline), through
//! remora, and through remora while the metrics are rendered every 100 ms.
//!
//! Run: `cargo bench --bench scrape_impact` (RATE and SECONDS env vars
//! override 2000 req/s for 5 s; ROUNDS repeats the set, default 3).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sends `rate` requests per second for `secs` seconds to `url`; returns
/// the sorted latencies and the number of failures.
async fn load(url: &str, rate: u64, secs: u64) -> (Vec<Duration>, usize) {
    let client = reqwest::Client::builder().no_proxy().http1_only().pool_max_idle_per_host(256).build().unwrap();
    let lat = Arc::new(Mutex::new(Vec::with_capacity((rate * secs) as usize)));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    let total = rate * secs;
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let (client, url, lat, failed) = (client.clone(), url.to_string(), lat.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                lat.lock().unwrap().push(due.elapsed());
            } else {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = lat.lock().unwrap().clone();
    v.sort();
    (v, failed.load(std::sync::atomic::Ordering::Relaxed))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    let rate: u64 = std::env::var("RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let upstream = remora::cli::echo::spawn("127.0.0.1:0".parse().unwrap(), "v1").await.unwrap();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("remora-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc}}\nspec:\n  hosts: [svc.bench]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v1}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, bind: 127.0.0.1, hosts: ['*']}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: ['*']\n  gateways: [gw]\n  http: [{{route: [{{destination: {{host: svc.bench}}}}]}}]\n",
            upstream.port()
        );
        std::fs::write(dir.join("c.yaml"), yaml).unwrap();
        let opts = remora::runtime::RunOptions { config_paths: vec![dir.clone()], compile: Default::default() };
        let (proxy, _) = remora::cli::start_proxy(opts, None).await.unwrap();
        let direct = format!("http://{upstream}/");
        let proxied = format!("http://127.0.0.1:{port}/");
        // Warm up connections and code paths.
        load(&proxied, rate, 1).await;
        load(&direct, rate, 1).await;
        println!("fixed rate {rate} req/s for {secs} s, {rounds} rounds (latency from scheduled send time)");
        println!("{:<28} {:>9} {:>9} {:>9} {:>7}", "target", "p50", "p99", "p99.9", "failed");
        let mut summary: Vec<(&str, Vec<Duration>)> = vec![("direct", vec![]), ("remora", vec![]), ("remora + scrape/100ms", vec![])];
        for _ in 0..rounds {
            for (i, name) in ["direct", "remora", "remora + scrape/100ms"].into_iter().enumerate() {
                let scraping = i == 2;
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let scraper = scraping.then(|| {
                    let (proxy, stop) = (proxy.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut bytes = 0usize;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let p = proxy.clone();
                            bytes = tokio::task::spawn_blocking(move || remora::telemetry::server::render(&p).len()).await.unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        bytes
                    })
                });
                let url = if i == 0 { &direct } else { &proxied };
                let (lat, failed) = load(url, rate, secs).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(s) = scraper {
                    let _ = s.await;
                }
                let (p50, p99, p999) = (percentile(&lat, 0.5), percentile(&lat, 0.99), percentile(&lat, 0.999));
                println!("{name:<28} {:>7.0}µs {:>7.0}µs {:>7.0}µs {failed:>7}", p50.as_micros() as f64, p99.as_micros() as f64, p999.as_micros() as f64);
                summary[i].1.push(p99);
            }
        }
        println!("\nmedian p99 over rounds:");
        for (name, mut p99s) in summary {
            p99s.sort();
            let med = p99s[p99s.len() / 2];
            println!("  {name:<26} {:>7.0}µs (min {:.0}µs, max {:.0}µs)", med.as_micros() as f64, p99s[0].as_micros() as f64, p99s[p99s.len() - 1].as_micros() as f64);
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
