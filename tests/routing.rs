//! Routing semantics end to end: match kinds, first-match order, 404 `NR`,
//! weighted splits, load balancers, rewrites, redirects, direct responses and
//! header operations — on real sockets with real upstreams.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

/// Sends `n` GETs (8 at a time) and counts the echo versions that answered.
async fn count_versions(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    let per_task = n / 8;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        let url = url.to_string();
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        tasks.push(tokio::spawn(async move {
            let mut local: HashMap<String, usize> = HashMap::new();
            for _ in 0..per_task {
                let mut r = c.get(&url);
                for (k, v) in &headers {
                    r = r.header(k.as_str(), v.as_str());
                }
                let resp = r.send().await.unwrap();
                assert_eq!(resp.status(), 200);
                *local.entry(version_of(&resp.text().await.unwrap())).or_default() += 1;
            }
            local
        }));
    }
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    counts
}

/// `share` of `n` trials is within `sigmas` standard deviations of `p`.
fn assert_share(count: usize, n: usize, p: f64, sigmas: f64, what: &str) {
    let share = count as f64 / n as f64;
    let sd = (p * (1.0 - p) / n as f64).sqrt();
    assert!((share - p).abs() <= sigmas * sd, "{what}: share {share:.4} of {n}, expected {p} ± {:.4}", sigmas * sd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_kinds_order_and_no_route() {
    let port = free_port();
    let direct = |body: &str| format!("    directResponse:\n      status: 200\n      body:\n        string: {body}\n");
    let mut http = String::new();
    http.push_str(&format!("  - name: first\n    match:\n    - uri:\n        exact: /order\n{}", direct("first")));
    http.push_str(&format!("  - name: second\n    match:\n    - uri:\n        prefix: /order\n{}", direct("second")));
    http.push_str(&format!("  - name: exact\n    match:\n    - uri:\n        exact: /exact\n{}", direct("exact")));
    http.push_str(&format!(
        "  - name: icase\n    match:\n    - uri:\n        prefix: /Pre\n      ignoreUriCase: true\n{}",
        direct("prefix-icase")
    ));
    http.push_str(&format!(
        "  - name: regex\n    match:\n    - uri:\n        regex: \"/re/[0-9]+\"\n{}",
        direct("regex")
    ));
    http.push_str(&format!(
        "  - name: hexact\n    match:\n    - headers:\n        x-h:\n          exact: Val\n{}",
        direct("header-exact")
    ));
    http.push_str(&format!(
        "  - name: hpresent\n    match:\n    - headers:\n        x-present: {{}}\n{}",
        direct("header-present")
    ));
    http.push_str(&format!(
        "  - name: hregex\n    match:\n    - headers:\n        x-re:\n          regex: \"v[0-9]\"\n{}",
        direct("header-regex")
    ));
    http.push_str(&format!("  - name: without\n    match:\n    - uri:\n        prefix: /without\n      withoutHeaders:\n        x-no: {{}}\n{}", direct("without")));
    http.push_str(&format!(
        "  - name: query\n    match:\n    - queryParams:\n        q:\n          exact: \"1\"\n{}",
        direct("query")
    ));
    http.push_str(&format!("  - name: method\n    match:\n    - method:\n        exact: POST\n{}", direct("method")));
    http.push_str(&format!(
        "  - name: authority\n    match:\n    - authority:\n        prefix: special.\n{}",
        direct("authority")
    ));
    http.push_str(&format!("  - name: orand\n    match:\n    - uri:\n        prefix: /a\n      headers:\n        x-and:\n          exact: \"1\"\n    - uri:\n        prefix: /b\n{}", direct("or-and")));
    let yaml = format!("{}{}", gateway("gw", port), gateway_vs("matches", "gw", &http));
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let body = |status: u16, text: String| (status, text);

    // First match wins: /order matches both; the first rule answers.
    assert_eq!(get(&c, &format!("{base}/order"), &[]).await, body(200, "first".into()));
    assert_eq!(get(&c, &format!("{base}/orderly"), &[]).await, body(200, "second".into()));
    // Exact is exact; the query string is not part of the path.
    assert_eq!(get(&c, &format!("{base}/exact?x=1"), &[]).await.1, "exact");
    assert_eq!(get(&c, &format!("{base}/exact/more"), &[]).await.0, 404);
    // ignoreUriCase on a prefix.
    assert_eq!(get(&c, &format!("{base}/PRE/x"), &[]).await.1, "prefix-icase");
    assert_eq!(get(&c, &format!("{base}/pre"), &[]).await.1, "prefix-icase");
    // Regex is a full-string match.
    assert_eq!(get(&c, &format!("{base}/re/123"), &[]).await.1, "regex");
    assert_eq!(get(&c, &format!("{base}/re/123x"), &[]).await.0, 404);
    // Header exact is case-sensitive on the value; names are not.
    assert_eq!(get(&c, &format!("{base}/h"), &[("X-H", "Val")]).await.1, "header-exact");
    assert_eq!(get(&c, &format!("{base}/h"), &[("x-h", "val")]).await.0, 404);
    // `{}` is presence, whatever the value (even empty).
    assert_eq!(get(&c, &format!("{base}/h"), &[("x-present", "")]).await.1, "header-present");
    assert_eq!(get(&c, &format!("{base}/h"), &[("x-re", "v7")]).await.1, "header-regex");
    assert_eq!(get(&c, &format!("{base}/h"), &[("x-re", "v77")]).await.0, 404);
    // withoutHeaders: matches only when the header is absent.
    assert_eq!(get(&c, &format!("{base}/without"), &[]).await.1, "without");
    assert_eq!(get(&c, &format!("{base}/without"), &[("x-no", "1")]).await.0, 404);
    // Query parameters.
    assert_eq!(get(&c, &format!("{base}/x?a=2&q=1"), &[]).await.1, "query");
    assert_eq!(get(&c, &format!("{base}/x?q=12"), &[]).await.0, 404);
    // Method.
    let resp = c.post(format!("{base}/m")).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "method");
    // Authority (Host as sent).
    assert_eq!(get(&c, &format!("{base}/x"), &[("host", "special.example:1")]).await.1, "authority");
    // Conditions in one block are ANDed, blocks are ORed.
    assert_eq!(get(&c, &format!("{base}/a"), &[("x-and", "1")]).await.1, "or-and");
    assert_eq!(get(&c, &format!("{base}/a"), &[]).await.0, 404);
    assert_eq!(get(&c, &format!("{base}/b"), &[]).await.1, "or-and");
    // Nothing matches: 404 with no body, as Envoy's NR.
    let (status, text) = get(&c, &format!("{base}/nothing"), &[]).await;
    assert_eq!((status, text.as_str()), (404, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_weights() {
    let (v1, v2, v3) = (echo("v1").await, echo("v2").await, echo("v3").await);
    let port = free_port();
    let http = "  - route:\n    - destination:\n        host: svc.test\n        subset: v1\n      weight: 1\n    - destination:\n        host: svc.test\n        subset: v2\n      weight: 3\n    - destination:\n        host: svc.test\n        subset: v3\n      weight: 0\n";
    let yaml = format!(
        "{}{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1"), (v2, "v2"), (v3, "v3")]),
        destination_rule("svc", "svc.test", &["v1", "v2", "v3"], None),
        gateway("gw", port),
        gateway_vs("split", "gw", http)
    );
    let _p = TestProxy::start(&yaml).await;
    let n = 4000;
    let counts = count_versions(&format!("http://127.0.0.1:{port}/"), n, &[]).await;
    // Weights 1:3 that need not sum to 100; weight 0 gets nothing.
    assert_eq!(counts.get("v3"), None, "{counts:?}");
    assert_share(counts.get("v1").copied().unwrap_or(0), n, 0.25, 4.0, "v1");
    assert_share(counts.get("v2").copied().unwrap_or(0), n, 0.75, 4.0, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_destination_takes_all_whatever_its_weight() {
    let v1 = echo("v1").await;
    let port = free_port();
    let http = "  - route:\n    - destination:\n        host: svc.test\n      weight: 0\n";
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("one", "gw", http)
    );
    let _p = TestProxy::start(&yaml).await;
    let counts = count_versions(&format!("http://127.0.0.1:{port}/"), 80, &[]).await;
    assert_eq!(counts.get("v1"), Some(&80));
}

/// One service per load-balancer policy, each behind its own host name.
async fn lb_setup(policy: &str, weights: &[u32]) -> (TestProxy, String) {
    let mut eps = Vec::new();
    let names = ["a", "b", "c"];
    for (i, _) in weights.iter().enumerate() {
        eps.push((echo(names[i]).await, names[i]));
    }
    let port = free_port();
    let mut se = service_entry("svc", "svc.test", 80, "HTTP", &eps);
    // Endpoint weights.
    for (i, w) in weights.iter().enumerate() {
        let marker = format!("      version: {}\n", names[i]);
        se = se.replacen(&marker, &format!("      version: {}\n    weight: {w}\n", names[i]), 1);
    }
    let http = "  - route:\n    - destination:\n        host: svc.test\n";
    let yaml = format!(
        "{se}{}{}{}",
        destination_rule("svc", "svc.test", &[], Some(policy)),
        gateway("gw", port),
        gateway_vs("lb", "gw", http)
    );
    (TestProxy::start(&yaml).await, format!("http://127.0.0.1:{port}/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_and_weighted() {
    let (_p, url) = lb_setup("loadBalancer:\n  simple: ROUND_ROBIN", &[1, 1, 2]).await;
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let (_, body) = get(&c, &url, &[]).await;
        *counts.entry(version_of(&body)).or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&200), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_least_request_follow_endpoint_weights() {
    for policy in ["loadBalancer:\n  simple: RANDOM", "loadBalancer:\n  simple: LEAST_REQUEST"] {
        let (_p, url) = lb_setup(policy, &[1, 3]).await;
        let n = 2000;
        let counts = count_versions(&url, n, &[]).await;
        assert_share(counts.get("a").copied().unwrap_or(0), n, 0.25, 4.5, policy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_is_default_and_spreads() {
    let (_p, url) = lb_setup("connectionPool:\n  tcp:\n    connectTimeout: 1s", &[1, 1, 1]).await;
    let n = 1500;
    let counts = count_versions(&url, n, &[]).await;
    for v in ["a", "b", "c"] {
        assert_share(counts.get(v).copied().unwrap_or(0), n, 1.0 / 3.0, 4.5, v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_header_query_and_source_ip() {
    let (_p, url) = lb_setup("loadBalancer:\n  consistentHash:\n    httpHeaderName: x-user", &[1, 1, 1]).await;
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for user in 0..30 {
        let u = format!("user-{user}");
        let first = version_of(&get(&c, &url, &[("x-user", &u)]).await.1);
        for _ in 0..5 {
            assert_eq!(version_of(&get(&c, &url, &[("x-user", &u)]).await.1), first, "sticky for {u}");
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "30 users all hashed to one endpoint: {seen:?}");
    drop(_p);

    let (_p, url) = lb_setup("loadBalancer:\n  consistentHash:\n    httpQueryParameterName: id", &[1, 1, 1]).await;
    let first = version_of(&get(&c, &format!("{url}?id=42"), &[]).await.1);
    for _ in 0..10 {
        assert_eq!(version_of(&get(&c, &format!("{url}?id=42"), &[]).await.1), first);
    }
    drop(_p);

    let (_p, url) = lb_setup("loadBalancer:\n  consistentHash:\n    useSourceIp: true", &[1, 1, 1]).await;
    let first = version_of(&get(&c, &url, &[]).await.1);
    for _ in 0..10 {
        assert_eq!(version_of(&get(&c, &url, &[]).await.1), first, "same source IP, same endpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_cookie_is_generated_and_sticky() {
    let policy =
        "loadBalancer:\n  consistentHash:\n    httpCookie:\n      name: session\n      path: /\n      ttl: 3600s";
    let (_p, url) = lb_setup(policy, &[1, 1, 1]).await;
    let c = client();
    let resp = c.get(&url).send().await.unwrap();
    let cookie = resp.headers().get("set-cookie").expect("cookie generated").to_str().unwrap().to_string();
    assert!(cookie.starts_with("session="), "{cookie}");
    assert!(cookie.contains("Max-Age=3600") && cookie.contains("Path=/"), "{cookie}");
    let first = version_of(&resp.text().await.unwrap());
    let pair = cookie.split(';').next().unwrap().to_string();
    for _ in 0..10 {
        let resp = c.get(&url).header("cookie", &pair).send().await.unwrap();
        assert!(resp.headers().get("set-cookie").is_none(), "no new cookie when one is sent");
        assert_eq!(version_of(&resp.text().await.unwrap()), first);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_redirect_direct_response_and_headers() {
    let v1 = echo("v1").await;
    let port = free_port();
    let http = r#"  - name: prefix-rewrite
    match:
    - uri:
        prefix: /api/
    rewrite:
      uri: /v2/
      authority: backend.internal
    route:
    - destination:
        host: svc.test
  - name: regex-rewrite
    match:
    - uri:
        prefix: /old/
    rewrite:
      uriRegexRewrite:
        match: ^/old/([^/]+)/(.*)$
        rewrite: /new/\2/\1
    route:
    - destination:
        host: svc.test
  - name: redirect
    match:
    - uri:
        exact: /moved
    redirect:
      uri: /here
      redirectCode: 302
  - name: prefix-redirect
    match:
    - uri:
        prefix: /foo/
    redirect:
      prefixRewrite: /
      scheme: https
  - name: direct
    match:
    - uri:
        exact: /teapot
    directResponse:
      status: 418
      body:
        string: short and stout
  - name: headers
    match:
    - uri:
        prefix: /headers
    headers:
      request:
        set:
          x-set: route
        add:
          x-add: route
        remove:
        - x-drop
      response:
        set:
          x-resp: route
        remove:
        - x-echo-version
    route:
    - destination:
        host: svc.test
      headers:
        request:
          set:
            x-dest: yes
        response:
          add:
            x-resp-dest: dest
"#;
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("rw", "gw", http)
    );
    let _p = TestProxy::start(&yaml).await;
    let c = no_redirect_client();
    let base = format!("http://127.0.0.1:{port}");

    let (_, body) = get(&c, &format!("{base}/api/items?x=1"), &[]).await;
    let j = echo_json(&body);
    assert_eq!(j["path"], "/v2/items");
    assert_eq!(j["query"], "x=1");
    assert_eq!(j["headers"]["host"], "backend.internal");
    assert_eq!(j["headers"]["x-envoy-original-path"], "/api/items");

    let (_, body) = get(&c, &format!("{base}/old/a/b/c"), &[]).await;
    assert_eq!(echo_json(&body)["path"], "/new/b/c/a");

    let resp = c.get(format!("{base}/moved?keep=1")).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], format!("http://127.0.0.1:{port}/here?keep=1").as_str());

    let resp = c.get(format!("{base}/foo/bar")).header("host", "example.com").send().await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "https://example.com/bar");

    let resp = c.get(format!("{base}/teapot")).send().await.unwrap();
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.text().await.unwrap(), "short and stout");

    let resp = c
        .get(format!("{base}/headers"))
        .header("x-drop", "1")
        .header("x-add", "client")
        .header("x-set", "client")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-resp"], "route");
    assert_eq!(resp.headers()["x-resp-dest"], "dest");
    assert!(resp.headers().get("x-echo-version").is_none());
    assert!(resp.headers().get("x-envoy-upstream-service-time").is_some());
    let j = echo_json(&resp.text().await.unwrap());
    assert_eq!(j["headers"]["x-set"], "route");
    assert_eq!(j["headers"]["x-add"], serde_json::json!(["client", "route"]));
    assert_eq!(j["headers"]["x-dest"], "yes");
    assert!(j["headers"].get("x-drop").is_none());
    // Standard proxy headers.
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(j["headers"]["x-envoy-attempt-count"], "1");
    assert_eq!(j["headers"]["x-request-id"].as_str().map(str::len), Some(36));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_kept_and_hop_by_hop_stripped() {
    let v1 = echo("v1").await;
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let (_, body) = get(
        &c,
        &format!("http://127.0.0.1:{port}/"),
        &[
            ("x-request-id", "abc"),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("x-forwarded-for", "10.1.1.1"),
        ],
    )
    .await;
    let j = echo_json(&body);
    assert_eq!(j["headers"]["x-request-id"], "abc");
    assert!(j["headers"].get("x-private").is_none(), "header named in Connection is hop-by-hop");
    assert_eq!(j["headers"]["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_egress_default_route_registry_only_and_ingress() {
    let v1 = echo("v1").await;
    let app = echo("app").await;
    let (egress, ingress) = (free_port(), free_port());
    let sidecar = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\nspec:\n  ingress:\n  - port:\n      number: {ingress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:{}\n  egress:\n  - port:\n      number: {egress}\n      protocol: HTTP\n      name: http\n    bind: 127.0.0.1\n    hosts:\n    - \"./*\"\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n---\n",
        app.port()
    );
    let yaml = format!("{}{sidecar}", service_entry("reviews", "reviews", egress, "HTTP", &[(v1, "v1")]));
    let p = TestProxy::start(&yaml).await;
    let c = client();
    // No VirtualService: Istio's default route to the service, by any alias.
    for host in ["reviews", "reviews.default", "reviews.default.svc.cluster.local", &format!("reviews:{egress}")] {
        let (status, body) = get(&c, &format!("http://127.0.0.1:{egress}/"), &[("host", host)]).await;
        assert_eq!((status, version_of(&body).as_str()), (200, "v1"), "host {host}");
    }
    // REGISTRY_ONLY: an unknown host is refused with 502.
    let (status, _) = get(&c, &format!("http://127.0.0.1:{egress}/"), &[("host", "unknown.example")]).await;
    assert_eq!(status, 502);
    // Ingress forwards everything to the local app.
    let (status, body) = get(&c, &format!("http://127.0.0.1:{ingress}/anything"), &[("host", "whatever")]).await;
    assert_eq!((status, version_of(&body).as_str()), (200, "app"));

    // ALLOW_ANY: unknown hosts are forwarded as given.
    p.write(&yaml.replace("REGISTRY_ONLY", "ALLOW_ANY"));
    let url = format!("http://127.0.0.1:{egress}/");
    let target = format!("127.0.0.1:{}", app.port());
    wait_until(Duration::from_secs(5), "ALLOW_ANY applied", || {
        let c = c.clone();
        let (url, target) = (url.clone(), target.clone());
        async move { get(&c, &url, &[("host", &target)]).await.0 == 200 }
    })
    .await;
    let (_, body) = get(&c, &url, &[("host", &target)]).await;
    assert_eq!(version_of(&body), "app");
    // A passthrough back into the proxy itself is refused instead of looping.
    let (status, _) = get(&c, &url, &[("host", &format!("127.0.0.1:{egress}"))]).await;
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_503_uf_and_retried_on_another_endpoint() {
    let v1 = echo("v1").await;
    // A port nothing listens on.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let yaml = format!(
        "{}{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(dead, "dead"), (v1, "v1")]),
        destination_rule("svc", "svc.test", &["dead"], Some("loadBalancer:\n  simple: ROUND_ROBIN")),
        gateway("gw", port),
        gateway_vs(
            "vs",
            "gw",
            "  - match:\n    - uri:\n        prefix: /dead\n    route:\n    - destination:\n        host: svc.test\n        subset: dead\n  - route:\n    - destination:\n        host: svc.test\n"
        )
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    // Only a dead endpoint: 503 with Envoy's body.
    let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/dead"), &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("connection failure"), "{body}");
    // With a live endpoint beside it, connect failures are retried elsewhere.
    for _ in 0..10 {
        let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await;
        assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_and_header_override() {
    // An upstream that answers after 400 ms.
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
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow").await;
                });
            }
        });
        addr
    };
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("slow", "slow.test", 80, "HTTP", &[(slow, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - timeout: 0.1s\n    route:\n    - destination:\n        host: slow.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let started = tokio::time::Instant::now();
    let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    assert!(started.elapsed() < Duration::from_millis(390), "timed out at the route timeout");
    let (status, body) =
        get(&c, &format!("http://127.0.0.1:{port}/"), &[("x-envoy-upstream-rq-timeout-ms", "3000")]).await;
    assert_eq!((status, body.as_str()), (200, "slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_abort_and_delay() {
    let v1 = echo("v1").await;
    let port = free_port();
    let http = "  - match:\n    - uri:\n        prefix: /abort\n    fault:\n      abort:\n        httpStatus: 555\n        percentage:\n          value: 100\n    route:\n    - destination:\n        host: svc.test\n  - match:\n    - uri:\n        prefix: /delay\n    fault:\n      delay:\n        percent: 100\n        fixedDelay: 0.2s\n    route:\n    - destination:\n        host: svc.test\n  - match:\n    - uri:\n        prefix: /never\n    fault:\n      abort:\n        httpStatus: 500\n    route:\n    - destination:\n        host: svc.test\n";
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", http)
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/abort"), &[]).await.0, 555);
    let started = tokio::time::Instant::now();
    let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/delay"), &[]).await;
    assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // An abort without a percentage never fires (Istio: unset means 0%).
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/never"), &[]).await.0, 200);
}

/// An upstream that closes every keep-alive connection 50 ms after answering,
/// like an app server with a short keep-alive timeout. The proxy must never
/// fail a request because it picked such a connection from its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_closed_by_the_upstream_never_fail_a_request() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let upstream = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    // Serve requests until 50 ms pass without one, then close.
                    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                        if n == 0 {
                            return;
                        }
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                });
            }
        });
        addr
    };
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(upstream, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    for i in 0..12 {
        // Alternate between reusing a live connection and one the upstream
        // has just closed.
        let (status, body) = get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
        let pause = if i % 2 == 0 { 5 } else { 80 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    assert!(accepted.load(Ordering::Relaxed) >= 6, "the upstream closed idle connections");
}

/// Sequential requests reuse one pooled upstream connection (keep-alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let upstream = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut s = tokio::io::BufReader::new(s);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match s.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => {
                                if s.get_mut()
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        addr
    };
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(upstream, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/"), &[]).await, (200, "ok".to_string()));
    }
    // A connection goes back to the pool from a task that runs once hyper
    // reports it ready; on a loaded machine the next request can start first
    // and open a second connection. Reuse must still be the rule.
    let opened = accepted.load(Ordering::Relaxed);
    assert!((1..=3).contains(&opened), "{opened} connections for 50 sequential requests");
}

/// `resolution: DNS` endpoints are resolved in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_resolved() {
    let v1 = echo("v1").await;
    let port = free_port();
    let se = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: svc\nspec:\n  hosts:\n  - svc.test\n  resolution: DNS\n  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n  endpoints:\n  - address: localhost\n    ports:\n      http: {}\n---\n",
        v1.port()
    );
    let yaml = format!(
        "{se}{}{}",
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let (status, body) = get(&client(), &format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
}

/// W3C trace context and B3 headers reach the upstream unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_are_propagated() {
    let v1 = echo("v1").await;
    let port = free_port();
    let yaml = format!(
        "{}{}{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(v1, "v1")]),
        gateway("gw", port),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    );
    let _p = TestProxy::start(&yaml).await;
    let trace = [
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    ];
    let (_, body) = get(&client(), &format!("http://127.0.0.1:{port}/"), &trace).await;
    let j = echo_json(&body);
    for (k, v) in trace {
        assert_eq!(j["headers"][k], v, "{k}");
    }
}
