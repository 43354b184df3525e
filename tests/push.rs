//! Config pushed through the admin API (`PUT /config`): the same apply path as
//! files, a separate layer on top of them, every error returned.

mod support;

use std::time::Duration;

use support::*;

fn files(port: u16, v1: std::net::SocketAddr, v2: std::net::SocketAddr) -> String {
    format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1"), (v2, "v2")]),
        destination_rule("svc", "svc.test", &["v1", "v2"], None),
        gateway("gw", port)
    )
}

fn pushed_vs(subset: &str) -> String {
    gateway_vs(
        "pushed",
        "gw",
        &format!("  - route:\n    - destination:\n        host: svc.test\n        subset: {subset}\n"),
    )
}

async fn put(c: &reqwest::Client, admin: std::net::SocketAddr, query: &str, body: String) -> (u16, serde_json::Value) {
    let r = c.put(format!("http://{admin}/config{query}")).body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_applies_reports_errors_and_layers_over_files() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let port = free_port();
    let p = TestProxy::start(&files(port, v1, v2)).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    // Nothing routes yet: the files hold no VirtualService.
    assert_eq!(get(&c, &url, &[]).await.0, 404);

    let (status, j) = put(&c, p.admin, "?version=release-42", pushed_vs("v2")).await;
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["result"], "applied");
    assert_eq!(j["label"], "release-42");
    assert_eq!(j["version"], p.version().as_str());
    assert_eq!(version_of(&get(&c, &url, &[]).await.1), "v2");
    let shown = c.get(format!("http://{}/config", p.admin)).send().await.unwrap().text().await.unwrap();
    assert!(shown.contains("name: pushed"), "{shown}");
    let dump: serde_json::Value =
        serde_json::from_str(&get(&c, &format!("http://{}/config_dump", p.admin), &[]).await.1).unwrap();
    assert_eq!(dump["pushed"]["label"], "release-42");
    assert!(dump["active"]["files"].to_string().contains("<pushed>"), "{dump}");

    // An invalid push is rejected whole, with every error; the old config serves.
    let before = p.version();
    let bad = format!(
        "{}{}",
        pushed_vs("v9"),
        gateway_vs("other", "gw", "  - route:\n    - destination:\n        host: nowhere.test\n")
    );
    let (status, j) = put(&c, p.admin, "", bad).await;
    assert_eq!(status, 400, "{j}");
    assert_eq!(j["result"], "rejected");
    let errors = j["errors"].as_array().unwrap();
    assert!(errors.len() >= 2, "{j}");
    assert!(
        errors.iter().any(|e| e["text"].as_str().unwrap().contains("subset v9")
            && e["file"] == "<pushed>"
            && e["line"].as_u64().is_some()),
        "{j}"
    );
    assert!(errors.iter().any(|e| e["text"].as_str().unwrap().contains("nowhere.test")), "{j}");
    assert_eq!(p.version(), before);
    assert_eq!(version_of(&get(&c, &url, &[]).await.1), "v2");

    // A resource defined both in the files and in the push is an error.
    let (status, j) = put(&c, p.admin, "", destination_rule("svc", "svc.test", &["v1"], None)).await;
    assert_eq!(status, 400);
    let text = j.to_string();
    assert!(
        text.contains("is defined both in") && text.contains("config.yaml:") && text.contains("and in <pushed>"),
        "{j}"
    );

    // A file change keeps the pushed layer.
    p.write(&format!("{}# edited\n", files(port, v1, v2)));
    wait_until(Duration::from_secs(3), "file reload applied", || {
        let (p, before) = (&p, before.clone());
        async move { p.version() != before }
    })
    .await;
    assert_eq!(version_of(&get(&c, &url, &[]).await.1), "v2");

    // DELETE removes the pushed layer.
    let r = c.delete(format!("http://{}/config", p.admin)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, &url, &[]).await.0, 404);
    assert_eq!(c.get(format!("http://{}/config", p.admin)).send().await.unwrap().status(), 404);
    // An empty PUT is refused (DELETE says what is meant).
    assert_eq!(put(&c, p.admin, "", String::new()).await.0, 400);
}
