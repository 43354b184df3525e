//! Micro-benchmarks of the per-request work and of compilation: route
//! matching over 10, 100 and 1,000 routes, the weighted pick, load-balancer
//! picks, compiling 1,000 services, and rendering 1,000 metric series.
//!
//! Run: `cargo bench --bench hot_path`. On this shared machine prefer
//! comparing runs of the same build; `valgrind --tool=callgrind` on the bench
//! binary gives repeatable instruction counts.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use remora::config::compile::{CompileOptions, compile};
use remora::config::load::load_str;
use remora::route::{Action, RequestView};
use remora::snapshot::Snapshot;
use remora::telemetry::metrics::{Destination, Metrics, Outcome, Reporter, Workload};
use remora::upstream::Registry;

/// A gateway with one VirtualService of `n` routes of mixed kinds (prefix,
/// exact, regex, header), the last one a catch-all, over 10 services.
fn routes_yaml(n: usize) -> String {
    let mut y = String::new();
    for s in 0..10 {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{s}}}\nspec:\n  hosts: [s{s}.bench]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints:\n  - {{address: 127.0.0.1, ports: {{http: 9001}}, labels: {{version: v1}}}}\n  - {{address: 127.0.0.2, ports: {{http: 9001}}, labels: {{version: v2}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s{s}}}\nspec:\n  host: s{s}.bench\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n"
        ));
    }
    y.push_str("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers: [{port: {number: 18999, name: http, protocol: HTTP}, bind: 127.0.0.1, hosts: ['*']}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: ['*']\n  gateways: [gw]\n  http:\n");
    for i in 0..n.saturating_sub(1) {
        let m = match i % 4 {
            0 => format!("{{uri: {{prefix: /api/p{i}/}}}}"),
            1 => format!("{{uri: {{exact: /api/e{i}}}}}"),
            2 => format!("{{uri: {{regex: \"/api/r{i}/[0-9]+\"}}}}"),
            _ => format!("{{headers: {{x-route: {{exact: h{i}}}}}}}"),
        };
        y.push_str(&format!(
            "  - match: [{m}]\n    route:\n    - {{destination: {{host: s{}.bench, subset: v1}}, weight: 90}}\n    - {{destination: {{host: s{}.bench, subset: v2}}, weight: 10}}\n",
            i % 10,
            i % 10
        ));
    }
    y.push_str("  - route: [{destination: {host: s0.bench}}]\n");
    y
}

fn build(yaml: &str) -> Snapshot {
    let set = load_str(Path::new("bench.yaml"), yaml, "default");
    compile(&set, &CompileOptions { namespace: "default".into(), ..Default::default() }, &Registry::new())
        .unwrap_or_else(|e| panic!("{e:#?}"))
}

fn route_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    let headers = HeaderMap::new();
    for n in [10, 100, 1000] {
        let snap = build(&routes_yaml(n));
        let table = &snap.listeners[0].routes;
        // Falls through every route to the catch-all: the worst case.
        let view = RequestView {
            path: "/nothing/matches/here",
            query: None,
            method: &Method::GET,
            authority: "shop.example.com",
            scheme: "http",
            headers: &headers,
            port: 18999,
        };
        g.bench_with_input(BenchmarkId::new("last_route", n), &n, |b, _| {
            b.iter(|| {
                let vh = table.find(black_box(view.authority)).unwrap();
                black_box(vh.find(black_box(&view)).map(|r| r.name.len()))
            })
        });
    }
    g.finish();
}

fn picks(c: &mut Criterion) {
    let snap = build(&routes_yaml(10));
    let vh = snap.listeners[0].routes.find("x").unwrap().clone();
    let Action::Forward(fwd) = &vh.routes[0].action else { panic!("first route forwards") };
    c.bench_function("weighted_pick_90_10", |b| b.iter(|| black_box(fwd.pick().weight)));

    let lb = |policy: &str| {
        let mut y = String::from(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [s.bench]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints:\n",
        );
        for i in 1..=10 {
            y.push_str(&format!("  - {{address: 127.0.0.{i}, ports: {{http: 9001}}, weight: {i}}}\n"));
        }
        y.push_str(&format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s}}\nspec:\n  host: s.bench\n  trafficPolicy:\n    loadBalancer: {policy}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers: [{{port: {{number: 18999, name: http, protocol: HTTP}}, hosts: ['*']}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: ['*']\n  gateways: [gw]\n  http: [{{route: [{{destination: {{host: s.bench}}}}]}}]\n"));
        build(&y)
    };
    let mut g = c.benchmark_group("lb_pick_10_weighted_endpoints");
    for (name, policy) in [
        ("least_request", "{simple: LEAST_REQUEST}"),
        ("round_robin", "{simple: ROUND_ROBIN}"),
        ("random", "{simple: RANDOM}"),
        ("ring_hash", "{consistentHash: {httpHeaderName: x-user}}"),
    ] {
        let snap = lb(policy);
        let cluster = snap.clusters[0].clone();
        let mut key = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(cluster.pick(Some(key), &[]).map(|e| e.weight))
            })
        });
    }
    g.finish();
}

fn services_yaml(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\nspec:\n  egress:\n  - port: {number: 9080, name: http, protocol: HTTP}\n    bind: 127.0.0.1\n    hosts: ['./*']\n---\n",
    );
    for s in 0..n {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{s}}}\nspec:\n  hosts: [s{s}]\n  resolution: STATIC\n  ports: [{{number: 9080, name: http, protocol: HTTP}}]\n  endpoints:\n  - {{address: 10.0.{}.{}, labels: {{version: v1}}}}\n  - {{address: 10.1.{}.{}, labels: {{version: v2}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s{s}}}\nspec:\n  host: s{s}\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: s{s}}}\nspec:\n  hosts: [s{s}]\n  http:\n  - match: [{{headers: {{x-user: {{exact: beta}}}}}}]\n    route: [{{destination: {{host: s{s}, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: s{s}, subset: v1}}, weight: 90}}\n    - {{destination: {{host: s{s}, subset: v2}}, weight: 10}}\n---\n",
            s / 250,
            s % 250,
            s / 250,
            s % 250
        ));
    }
    y
}

fn compilation(c: &mut Criterion) {
    let yaml = services_yaml(1000);
    let set = load_str(Path::new("bench.yaml"), &yaml, "default");
    let opts = CompileOptions { namespace: "default".into(), ..Default::default() };
    let mut g = c.benchmark_group("config_1000_services");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("load", |b| {
        b.iter(|| black_box(load_str(Path::new("bench.yaml"), black_box(&yaml), "default").resources.len()))
    });
    let registry = Registry::new();
    g.bench_function("compile", |b| {
        b.iter(|| black_box(compile(&set, &opts, &registry).map(|s| s.clusters.len()).unwrap_or(0)))
    });
    g.finish();
}

fn metrics_render(c: &mut Criterion) {
    let m = Metrics::new(Workload {
        name: Some("productpage-v1".into()),
        namespace: "default".into(),
        labels: BTreeMap::new(),
    });
    let mut keep = Vec::new();
    for i in 0..1000 {
        let d = Destination {
            service: format!("s{i}.default.svc.cluster.local"),
            service_name: None,
            namespace: Some("default".into()),
            labels: [("version".to_string(), "v1".to_string())].into(),
        };
        let t = m.target(Reporter::Source, d);
        t.record(
            Outcome { peer: None, grpc: false, code: 200, grpc_status: None, flags: "-" },
            Duration::from_millis(3),
            300,
            900,
        );
        keep.push(t);
    }
    let target = keep[0].clone();
    c.bench_function("metrics_record", |b| {
        b.iter(|| {
            target.record(
                black_box(Outcome { peer: None, grpc: false, code: 200, grpc_status: None, flags: "-" }),
                Duration::from_micros(800),
                300,
                900,
            )
        })
    });
    let mut sample = String::new();
    m.render(&mut sample);
    eprintln!("render_1000_series: {} lines, {} bytes per render", sample.lines().count(), sample.len());
    let mut g = c.benchmark_group("metrics");
    g.sample_size(20);
    g.bench_function("render_1000_series", |b| {
        b.iter(|| {
            let mut out = String::new();
            m.render(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, route_matching, picks, compilation, metrics_render);
criterion_main!(benches);
