//! Hot reload: weight flips under load with zero failed requests, kubelet's
//! `..data` symlink swap, rejected writes that keep the old config serving,
//! listeners bound and closed alone, cluster state kept across reloads.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use support::*;

fn split_config(port: u16, v1: std::net::SocketAddr, v2: std::net::SocketAddr, w1: u32, w2: u32) -> String {
    let http = format!(
        "  - route:\n    - destination:\n        host: svc.test\n        subset: v1\n      weight: {w1}\n    - destination:\n        host: svc.test\n        subset: v2\n      weight: {w2}\n"
    );
    format!(
        "{}{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1"), (v2, "v2")]),
        destination_rule("svc", "svc.test", &["v1", "v2"], None),
        gateway("gw", port),
        gateway_vs("split", "gw", &http)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_flips_under_load_lose_no_request() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    let p = TestProxy::start(&split_config(port, v1, v2, 100, 0)).await;
    let url = format!("http://127.0.0.1:{port}/");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // Four clients in a loop, bounded by the stop flag and a hard cap.
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let good = match c.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.text().await.is_ok(),
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let c = client();
    let mut worst = Duration::ZERO;
    for flip in 0..12 {
        let (w1, w2, want) = if flip % 2 == 0 { (0, 100, "v2") } else { (100, 0, "v1") };
        let written = Instant::now();
        p.write(&split_config(port, v1, v2, w1, w2));
        // The split follows within 1 s of the write: wait until 5 requests in a
        // row answer from the new version.
        let mut streak = 0;
        while streak < 5 {
            assert!(written.elapsed() < Duration::from_secs(1), "flip {flip} not applied within 1 s");
            let (_, body) = get(&c, &url, &[]).await;
            if version_of(&body) == want { streak += 1 } else { streak = 0 }
        }
        worst = worst.max(written.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("12 flips, slowest {worst:?}; {ok} requests ok, {failed} failed");
    assert!(ok > 100, "load ran: {ok}");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_configmap_symlink_swap_is_picked_up() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    // Kubernetes' AtomicWriter layout: ..<ts>/config.yaml, ..data -> ..<ts>,
    // config.yaml -> ..data/config.yaml.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_12_01_00_00_00.000")).unwrap();
    std::fs::write(d.join("..2026_12_01_00_00_00.000/config.yaml"), split_config(port, v1, v2, 100, 0)).unwrap();
    std::os::unix::fs::symlink("..2026_12_01_00_00_00.000", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", d.join("config.yaml")).unwrap();
    let opts = remora::runtime::RunOptions {
        config_paths: vec![d.to_path_buf()],
        compile: remora::config::compile::CompileOptions { namespace: "default".into(), ..Default::default() },
    };
    let (proxy, _) = remora::cli::start_proxy(opts, None).await.unwrap();
    let _watch = remora::config::watch::spawn(proxy.clone()).unwrap();
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(version_of(&get(&c, &url, &[]).await.1), "v1");

    // The swap: new timestamped dir, ..data_tmp -> it, rename over ..data,
    // remove the old dir. Nothing ever writes config.yaml itself.
    std::fs::create_dir(d.join("..2026_12_01_00_01_00.000")).unwrap();
    std::fs::write(d.join("..2026_12_01_00_01_00.000/config.yaml"), split_config(port, v1, v2, 0, 100)).unwrap();
    std::os::unix::fs::symlink("..2026_12_01_00_01_00.000", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_12_01_00_00_00.000")).unwrap();

    wait_until(Duration::from_secs(3), "swap picked up", || {
        let (c, url) = (c.clone(), url.clone());
        async move { version_of(&get(&c, &url, &[]).await.1) == "v2" }
    })
    .await;

    // Reading the files is not a change: the reload's own reads must not
    // set off reload after reload. Absence can only be watched over a
    // window: a second is several debounce periods.
    let before = proxy.reloads_unchanged.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reread = proxy.reloads_unchanged.load(Ordering::Relaxed) - before;
    assert!(reread <= 1, "the config was read {reread} more times with nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_write_is_rejected_and_old_config_keeps_serving() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    let p = TestProxy::start(&split_config(port, v1, v2, 100, 0)).await;
    let good = p.version();
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    // A route to an undefined subset: rejected as a whole, never a runtime 503.
    let bad = split_config(port, v1, v2, 0, 100).replace("subset: v2", "subset: v9");
    p.write(&bad);
    let dump_url = format!("http://{}/config_dump", p.admin);
    wait_until(Duration::from_secs(3), "rejection visible in /config_dump", || {
        let (c, dump_url) = (c.clone(), dump_url.clone());
        async move {
            let dump: serde_json::Value = serde_json::from_str(&get(&c, &dump_url, &[]).await.1).unwrap();
            !dump["last_rejection"].is_null()
        }
    })
    .await;
    let dump: serde_json::Value = serde_json::from_str(&get(&c, &dump_url, &[]).await.1).unwrap();
    let errors = dump["last_rejection"]["errors"].to_string();
    assert!(errors.contains("subset v9"), "{errors}");
    assert!(errors.contains("config.yaml"), "errors name the file: {errors}");
    assert_eq!(dump["active"]["version"], good.as_str());
    assert_eq!(p.version(), good);
    for _ in 0..20 {
        let (status, body) = get(&c, &url, &[]).await;
        assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
    }
    // YAML that doesn't parse at all is rejected the same way.
    p.write("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: [unclosed\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(p.version(), good);
    assert_eq!(get(&c, &url, &[]).await.0, 200);
    // A good write afterwards applies.
    p.write(&split_config(port, v1, v2, 0, 100));
    wait_until(Duration::from_secs(3), "good config applied", || {
        let (c, url) = (c.clone(), url.clone());
        async move { version_of(&get(&c, &url, &[]).await.1) == "v2" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_alone() {
    let v1 = echo("v1").await;
    let (a, b) = (free_port(), free_port());
    let vs = |gw: &str, name: &str| gateway_vs(name, gw, "  - route:\n    - destination:\n        host: svc.test\n");
    let base = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw-a", a),
        vs("gw-a", "vs-a")
    );
    let p = TestProxy::start(&base).await;

    // A raw keep-alive connection to listener A, used before and after reloads.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", a)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = |sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>| {
        let req = http::Request::get("/").header("host", "svc").body(http_body_util::Empty::new()).unwrap();
        sender.send_request(req)
    };
    assert_eq!(send(&mut sender).await.unwrap().status(), 200);

    let state_before = p.proxy.snapshot().clusters[0].state().clone();
    p.write(&format!("{base}{}{}", gateway("gw-b", b), vs("gw-b", "vs-b")));
    let c = client();
    wait_until(Duration::from_secs(3), "listener B bound", || {
        let c = c.clone();
        async move { c.get(format!("http://127.0.0.1:{b}/")).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    // The unchanged cluster kept its runtime state (pools, LB position).
    assert!(Arc::ptr_eq(&state_before, p.proxy.snapshot().clusters[0].state()));
    // The connection to A never noticed.
    sender.ready().await.unwrap();
    assert_eq!(send(&mut sender).await.unwrap().status(), 200);

    p.write(&base);
    wait_until(Duration::from_secs(3), "listener B closed", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", b)).await.is_err()
    })
    .await;
    sender.ready().await.unwrap();
    assert_eq!(send(&mut sender).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_finishes_on_its_snapshot() {
    // An upstream that holds each request for 500 ms.
    let slow = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow").await;
                });
            }
        });
        addr
    };
    let port = free_port();
    let cfg = |prefix: &str| {
        format!(
            "{}{}{}",
            service_entry("slow", "slow.test", 80, "HTTP", &[(slow, "v1")]),
            gateway("gw", port),
            gateway_vs(
                "vs",
                "gw",
                &format!(
                    "  - match:\n    - uri:\n        prefix: {prefix}\n    route:\n    - destination:\n        host: slow.test\n"
                )
            )
        )
    };
    let p = TestProxy::start(&cfg("/slow")).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/slow");
    let inflight = tokio::spawn({
        let c = c.clone();
        async move { get(&c, &url, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = p.version();
    p.write(&cfg("/other"));
    wait_until(Duration::from_secs(3), "reload applied", || {
        let before = before.clone();
        let p = &p;
        async move { p.version() != before }
    })
    .await;
    assert_eq!(inflight.await.unwrap(), (200, "slow".to_string()));
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/slow"), &[]).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ready_config_dump_and_methods() {
    let v1 = echo("v1").await;
    let port = free_port();
    let p = TestProxy::start(&split_config(port, v1, v1, 1, 1)).await;
    let c = client();
    let admin = format!("http://{}", p.admin);
    assert_eq!(get(&c, &format!("{admin}/ready"), &[]).await, (200, "ready\n".to_string()));
    let dump: serde_json::Value = serde_json::from_str(&get(&c, &format!("{admin}/config_dump"), &[]).await.1).unwrap();
    assert_eq!(dump["active"]["version"], p.version().as_str());
    assert_eq!(dump["active"]["files"][0]["path"].as_str().map(|s| s.ends_with("config.yaml")), Some(true));
    assert!(dump["active"]["files"][0]["hash"].as_str().is_some());
    assert_eq!(dump["active"]["listeners"][0]["address"], format!("127.0.0.1:{port}").as_str());
    assert_eq!(dump["active"]["clusters"].as_array().map(Vec::len), Some(2));
    assert!(dump["last_rejection"].is_null());
    assert_eq!(get(&c, &format!("{admin}/nope"), &[]).await.0, 404);
    assert_eq!(c.post(format!("{admin}/ready")).send().await.unwrap().status(), 405);
}
