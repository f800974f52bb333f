#!/usr/bin/env bash
# `make bench`: side-by-side HTTP/1.1 throughput and latency, in one run, of
#   direct       wrk -> backend
#   weft-1hop    wrk -> weft-proxy (inbound) -> backend
#   nginx        wrk -> nginx reverse proxy -> backend
#   haproxy      wrk -> HAProxy -> backend
#   weft-2hops   wrk -> weft-proxy (outbound) -> weft-proxy (inbound) -> backend
#   haproxy-2hops wrk -> HAProxy -> HAProxy -> backend (two separate processes)
# The backend is nginx answering `return 200` (one worker). Each proxy gets one
# worker/thread, pinned to CPU 0; wrk and the backend share CPU 1. Scenarios
# are interleaved over ROUNDS rounds and the medians reported, since the
# machine is shared and noisy. Then: h2c at fixed rates, one bad instance of
# three, user-space instructions per request under callgrind (weft and
# HAProxy, one process at a time), and the control plane with simulated
# sidecars; the explicit outbound hop against the same hop captured by
# `weft-proxy init` (in a network namespace of its own); then mTLS: weft's sidecars with certificates from their control
# plane's CA beside HAProxy terminating and originating TLS 1.3 with client
# certificates from the same CA. Writes BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
QUICK=${BENCH_QUICK:-0}
# BENCH_ONLY=capture: only the captured-vs-explicit comparison, printed
# (BENCHMARKS.md untouched); BENCH_CAPTURE_ROUNDS sets its rounds.
# BENCH_ONLY=hedge: only the tail latency with and without hedging, printed;
# BENCH_HEDGE_ROUNDS sets its rounds.
# BENCH_ONLY=callgrind: only the instructions per request (no wrk, no
# BENCHMARKS.md); WEFT_PROXY_BIN measures another weft-proxy binary (e.g. a
# build of an earlier commit) with this build's control plane and load tools.
ONLY=${BENCH_ONLY:-}
PROXY_BIN=${WEFT_PROXY_BIN:-$BIN/weft-proxy}
DURATION=${BENCH_DURATION:-$([ "$QUICK" = 1 ] && echo 2 || echo 5)}
ROUNDS=${BENCH_ROUNDS:-$([ "$QUICK" = 1 ] && echo 1 || echo 3)}
CONNS=${BENCH_CONNS:-16}
WORK=$(mktemp -d -t weft-bench.XXXXXX)
PIDS=()
NS=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  if [ -n "$NS" ]; then ip netns del "$NS" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
USED_PORTS=" "
port() { # VAR: a loopback port where nothing listens
  local -n out=$1
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    USED_PORTS+="$p "; out=$p; return
  done
}
start() { local name=$1; shift; "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" & PIDS+=($!); disown $!; }
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1"; exit 1; }
wait_line() { for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "timed out: $1"; exit 1; }
addr() { grep -o "$2=[^ ]*" "$WORK/$1.out" | cut -d= -f2; }

port BACK; port BAD; port BACKH2; port NGX; port HAP; port HAP2; port HAPH2; port EP; port PP; port HTI; port HTO
# nginx_conf NAME: $WORK/NAME.conf, one worker in the foreground, keep-alive
# without limit, with the http block's servers read from stdin.
nginx_conf() {
  { cat <<NGINX
worker_processes 1;
daemon off;
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
NGINX
    cat; echo "}"; } >"$WORK/$1.conf"
}
nginx_conf nginx <<NGINX
  server { listen 127.0.0.1:$BACK; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:$BAD; location / { return 503 "broken\n"; } }
  server { listen 127.0.0.1:$BACKH2 http2; location / { return 200 "ok\n"; } }
NGINX
nginx_conf nginx-proxy <<NGINX
  upstream backend { server 127.0.0.1:$BACK; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
NGINX
# HAProxy as a fair peer: one thread, keep-alive on both sides.
HAPROXY_DEFAULTS='global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive'
cat >"$WORK/haproxy.cfg" <<HAPROXY
$HAPROXY_DEFAULTS
frontend fe
  bind 127.0.0.1:$HAP
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:$BACK
frontend fe-h2
  bind 127.0.0.1:$HAPH2 proto h2
  default_backend be-h2
backend be-h2
  http-reuse always
  server b2 127.0.0.1:$BACKH2 proto h2
HAPROXY

start backend taskset -c 1 nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"
start nginx-proxy taskset -c 0 nginx -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy-error.log"
start haproxy taskset -c 0 haproxy -f "$WORK/haproxy.cfg"
# A second HAProxy in front of the first: two proxy hops, like two sidecars.
cat >"$WORK/haproxy2.cfg" <<HAPROXY
$HAPROXY_DEFAULTS
frontend fe
  bind 127.0.0.1:$HAP2
  default_backend be
backend be
  http-reuse always
  server h1 127.0.0.1:$HAP
HAPROXY
start haproxy2 taskset -c 0 haproxy -f "$WORK/haproxy2.cfg"

# mTLS: one CA; certificates for the load generator and for HAProxy's two
# sides (`weftctl ca issue`), while weft's sidecars get theirs from their
# control plane. HAProxy: TLS 1.3 only, client certificates required.
"$BIN/weftctl" ca init --out "$WORK/pki" >/dev/null
for s in loadgen haproxy-in haproxy-out; do
  "$BIN/weftctl" ca issue --ca-cert "$WORK/pki/ca.crt" --ca-key "$WORK/pki/ca.key" --service "$s" --out "$WORK/pki" >/dev/null
  cat "$WORK/pki/$s.crt" "$WORK/pki/$s.key" >"$WORK/pki/$s.pem"
done
TLS_CLIENT=(--tls-cert "$WORK/pki/loadgen.crt" --tls-key "$WORK/pki/loadgen.key" --tls-ca "$WORK/pki/ca.crt")
cat >"$WORK/haproxy-tls-in.cfg" <<HAPROXY
$HAPROXY_DEFAULTS
frontend fe
  bind 127.0.0.1:$HTI ssl crt $WORK/pki/haproxy-in.pem ca-file $WORK/pki/ca.crt verify required ssl-min-ver TLSv1.3 alpn http/1.1
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:$BACK
HAPROXY
cat >"$WORK/haproxy-tls-out.cfg" <<HAPROXY
$HAPROXY_DEFAULTS
frontend fe
  bind 127.0.0.1:$HTO
  default_backend be
backend be
  http-reuse always
  server h1 127.0.0.1:$HTI ssl crt $WORK/pki/haproxy-out.pem ca-file $WORK/pki/ca.crt verify required ssl-min-ver TLSv1.3 alpn http/1.1
HAPROXY
start haproxy-tls-in taskset -c 0 haproxy -f "$WORK/haproxy-tls-in.cfg"
start haproxy-tls-out taskset -c 0 haproxy -f "$WORK/haproxy-tls-out.cfg"
start etcd taskset -c 1 etcd --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "default=http://127.0.0.1:$PP" --log-level warn
start control taskset -c 1 "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0
wait_line "$WORK/control.out" listening
CONTROL="http://$(addr control grpc)"
# The mTLS mesh: a control plane with the CA (its own etcd prefix) and two
# sidecars with the trust bundle (strict inbound: the default).
start control-tls taskset -c 1 "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
  --prefix /weft-tls --ca-cert "$WORK/pki/ca.crt" --ca-key "$WORK/pki/ca.key"
wait_line "$WORK/control-tls.out" listening
CONTROL_TLS="https://$(addr control-tls grpc)"
MTLS=(--control "$CONTROL_TLS" --ca-bundle "$WORK/pki/ca.crt")
start tls-in taskset -c 0 "$BIN/weft-proxy" "${MTLS[@]}" --service backend-tls --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id bench-tls-in
start tls-out taskset -c 0 "$BIN/weft-proxy" "${MTLS[@]}" --service client-tls --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id bench-tls-out
start side-in taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service backend --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id bench-in
start side-out taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service client --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id bench-out
# Resilience scenarios: `flaky` has three instances, one answering 503;
# `guarded` is the same healthy backend as `backend`, with a resilience policy.
start flaky-a taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service flaky --labels i=a --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id flaky-a
start flaky-b taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service flaky --labels i=b --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id flaky-b
start flaky-c taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service flaky --labels i=c --app "127.0.0.1:$BAD" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id flaky-c
start guarded taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service guarded --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id guarded
# h2c: the same backend answering HTTP/2 with prior knowledge.
start side-h2 taskset -c 0 "$BIN/weft-proxy" --control "$CONTROL" --service backend-h2 --app "127.0.0.1:$BACKH2" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id bench-h2
wait_line "$WORK/side-in.out" listening; wait_line "$WORK/side-out.out" listening
for s in flaky-a flaky-b flaky-c guarded side-h2; do wait_line "$WORK/$s.out" listening; done
IN=$(addr side-in inbound); OUT=$(addr side-out outbound)
wait_http "http://127.0.0.1:$BACK/"; wait_http "http://127.0.0.1:$NGX/"; wait_http "http://127.0.0.1:$HAP/"; wait_http "http://127.0.0.1:$HAP2/"
wait_http "http://$(addr side-in admin)/ready"; wait_http "http://$(addr side-out admin)/ready"
for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: backend' "http://$OUT/")" = 200 ] && break; sleep 0.1; done
wait_line "$WORK/tls-in.out" listening; wait_line "$WORK/tls-out.out" listening
wait_http "http://$(addr tls-in admin)/ready"; wait_http "http://$(addr tls-out admin)/ready"; wait_http "http://127.0.0.1:$HTO/"
TLS_IN=$(addr tls-in inbound); TLS_OUT=$(addr tls-out outbound)
for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: backend-tls' "http://$TLS_OUT/")" = 200 ] && break; sleep 0.1; done

# The resilience policy of the guarded and flaky scenarios.
guard() { # service
  "$BIN/weftctl" --control "$CONTROL" apply --wait -f - >/dev/null <<POLICY
kind: Route
service: $1
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 2s
    retry: { attempts: 2, on: [5xx, connect-failure, reset] }
---
kind: Resilience
service: $1
circuit_breaker: { consecutive_failures: 5, base_ejection: 10s, max_ejection_percent: 50 }
retry_budget: { ratio: 0.2, min_per_second: 10 }
POLICY
}
guard guarded
for h in flaky guarded; do
  for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $h" "http://$OUT/")" = 200 ] && break; sleep 0.1; done
done
for _ in $(seq 1 100); do
  [ "$(curl -s "http://$(addr side-out admin)/config" | grep -o '"proxy_id":"flaky-[abc]"' | wc -l)" -ge 3 ] && break; sleep 0.1
done

declare -A URL=(
  [direct]="http://127.0.0.1:$BACK/"
  [weft-1hop]="http://$IN/"
  [nginx]="http://127.0.0.1:$NGX/"
  [haproxy]="http://127.0.0.1:$HAP/"
  [weft-2hops]="http://$OUT/"
  [weft-2hops-guarded]="http://$OUT/"
  [haproxy-2hops]="http://127.0.0.1:$HAP2/"
)
declare -A ADDR=(
  [direct]="127.0.0.1:$BACK" [weft-1hop]="$IN" [nginx]="127.0.0.1:$NGX" [haproxy]="127.0.0.1:$HAP"
  [weft-2hops]="$OUT" [weft-2hops-guarded]="$OUT" [haproxy-2hops]="127.0.0.1:$HAP2"
)
declare -A HOST=([weft-2hops-guarded]=guarded)
ORDER=(direct weft-1hop nginx haproxy weft-2hops weft-2hops-guarded haproxy-2hops)
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx-proxy.pid")" | head -1)
pid_of() { pgrep -f "weft-proxy.*--id $1\$" | head -1; }
declare -A PIDS_OF=(
  [direct]="" [weft-1hop]="$(pid_of bench-in)" [nginx]="$NGINX_WORKER" [haproxy]="$(pgrep -f "haproxy -f $WORK/haproxy.cfg" | head -1)"
  [weft-2hops]="$(pid_of bench-in) $(pid_of bench-out)" [weft-2hops-guarded]="$(pid_of guarded) $(pid_of bench-out)"
  [haproxy-2hops]="$(pgrep -f "haproxy -f $WORK/haproxy.cfg" | head -1) $(pgrep -f "haproxy -f $WORK/haproxy2.cfg" | head -1)"
)
# CPU time (ms) used so far by the given pids.
cpu_ms() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat") * 1000 / $(getconf CLK_TCK))); done; echo $t; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
RSS_IDLE_IN=$(rss_mb "$(pid_of bench-in)"); RSS_IDLE_OUT=$(rss_mb "$(pid_of bench-out)")

to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.3f", v/1000; else if (v ~ /ms$/) printf "%.3f", v+0; else if (v ~ /s$/) printf "%.3f", v*1000; }'; }
wrk_run() { # scenario conns out-file
  local s=$1
  taskset -c 1 wrk -t1 -c"$2" -d"${DURATION}s" --latency -H "Host: ${HOST[$s]:-backend}" "${URL[$s]}" >"$3"
  if grep -q Non-2xx "$3"; then echo "$s: non-2xx answers"; cat "$3"; exit 1; fi
}
# Hedging: service `tail` has three instances (the example service), each
# stalling 2 % of its calls for 500 ms (a model stuck now and then); the
# same route with and without `hedge: { after: 50ms }` (by path), open loop
# at 200/s through the caller's sidecar, interleaved, medians; hedges sent
# per call (each one extra try).
HEDGE_ROUNDS=${BENCH_HEDGE_ROUNDS:-$ROUNDS}
hedge_bench() {
  local i r mode h0
  for i in a b c; do
    start "tail-app-$i" taskset -c 1 "$BIN/weft-example-service" --listen 127.0.0.1:0 --service tail --version "$i" \
      --stall-percent 2 --stall-ms 500
    wait_line "$WORK/tail-app-$i.out" listening
    start "tail-$i" taskset -c 0 "$PROXY_BIN" --control "$CONTROL" --service tail --labels "i=$i" \
      --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/tail-app-$i.out")" \
      --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id "tail-$i"
  done
  for i in a b c; do wait_line "$WORK/tail-$i.out" listening; done
  "$BIN/weftctl" --control "$CONTROL" apply --wait -f - >/dev/null <<POLICY
kind: Route
service: tail
rules:
  - match: { path_prefix: /hedged }
    backends: [ { subset: {}, weight: 1 } ]
    timeout: 5s
    retry: { attempts: 1, on: [5xx] }
    hedge: { after: 50ms }
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 5s
    retry: { attempts: 1, on: [5xx] }
---
kind: Resilience
service: tail
retry_budget: { ratio: 0.1, min_per_second: 5 }
POLICY
  for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: tail' "http://$OUT/")" = 200 ] && break; sleep 0.1; done
  for _ in $(seq 1 100); do
    [ "$(curl -s "http://$(addr side-out admin)/config" | grep -o '"proxy_id":"tail-[abc]"' | wc -l)" -ge 3 ] && break; sleep 0.1
  done
  hedges() { curl -s "http://$(addr side-out admin)/metrics" | awk '/^weft_hedges_total/ {s+=$2} END {print s+0}'; }
  : >"$WORK/hedge.txt"
  for r in $(seq 1 "$HEDGE_ROUNDS"); do
    for mode in plain hedged; do
      h0=$(hedges)
      taskset -c 1 "$BIN/weft-load" --addr "$OUT" --host tail --path "/$mode" --rate 200 --duration "$DURATION" \
        --warmup 0 --connections 32 >"$WORK/hedge-$mode-$r.json"
      echo "$mode $r $(($(hedges) - h0))" >>"$WORK/hedge.txt"
      echo "hedging $mode round $r: $(cat "$WORK/hedge-$mode-$r.json")"
    done
  done
}
hedge_table() {
  python3 - "$WORK" <<'PY'
import glob, json, statistics, sys
w = sys.argv[1]
rows = {}
for line in open(f"{w}/hedge.txt"):
    mode, r, hedges = line.split()
    j = json.load(open(f"{w}/hedge-{mode}-{r}.json"))
    sent = j["ok"] + j["errors"]
    rows.setdefault(mode, []).append((j, int(hedges), sent))
med = lambda xs: statistics.median(xs)
print("| route | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | hedges (extra tries) / call |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("plain", "hedged"):
    rs = rows.get(mode, [])
    if not rs:
        continue
    k = lambda key: med([j[key] for j, *_ in rs])
    hedge = med([h / s for _, h, s in rs])
    name = "without hedging" if mode == "plain" else "hedge after 50 ms"
    print(f"| {name} | {k('p50_ms'):.3f} | {k('p90_ms'):.3f} | {k('p99_ms'):.3f} | {k('p999_ms'):.3f} | {k('max_ms'):.3f} | {sum(j['errors'] for j, *_ in rs)} | {hedge:.3f} |")
PY
}
if [ -z "$ONLY" ] || [ "$ONLY" = hedge ]; then
  hedge_bench
  if [ "$ONLY" = hedge ]; then
    hedge_table
    exit 0
  fi
fi

if [ "$ONLY" != callgrind ]; then
# Each round starts one scenario later, so no path always runs right after
# the same other one.
rotate() { local r=$1; shift; local a=("$@") n=$#; for i in $(seq 0 $((n - 1))); do echo "${a[$(((i + r - 1) % n))]}"; done; }
OPEN_DURATION=${BENCH_OPEN_DURATION:-$([ "$QUICK" = 1 ] && echo 2 || echo 4)}
if [ "$ONLY" != capture ]; then
# Closed loop, 16 connections, interleaved rounds; CPU per 1000 requests.
for r in $(seq 1 "$ROUNDS"); do
  for s in $(rotate "$r" "${ORDER[@]}"); do
    pids=${PIDS_OF[$s]}
    before=$( [ -n "$pids" ] && cpu_ms $pids || echo 0)
    wrk_run "$s" "$CONNS" "$WORK/wrk-$s-$r.txt"
    after=$( [ -n "$pids" ] && cpu_ms $pids || echo 0)
    total=$(awk '/requests in/ {print $1}' "$WORK/wrk-$s-$r.txt")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$s-$r.txt")
    p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$WORK/wrk-$s-$r.txt")")
    p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$WORK/wrk-$s-$r.txt")")
    cpu=$(awk -v c=$((after - before)) -v n="$total" 'BEGIN { printf "%.1f", c * 1000 / n }')
    echo "$s $rps $p50 $p99 $cpu" >>"$WORK/results.txt"
    echo "round $r $s: $rps req/s p50 ${p50} ms p99 ${p99} ms, proxy CPU ${cpu} ms per 1000 requests"
  done
done
# Closed loop, 64 connections, one round.
for s in "${ORDER[@]}"; do
  wrk_run "$s" 64 "$WORK/wrk64-$s.txt"
  echo "$s $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk64-$s.txt")" >>"$WORK/results64.txt"
  echo "64 connections $s: $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk64-$s.txt") req/s"
done
RSS_LOAD_IN=$(rss_mb "$(pid_of bench-in)"); RSS_LOAD_OUT=$(rss_mb "$(pid_of bench-out)")
# Open loop: fixed rates, latency from dispatch (weft-load).
OPEN_ORDER=(direct weft-1hop nginx haproxy weft-2hops haproxy-2hops)
# Interleaved rounds, like the closed loop: one run per scenario is at the
# mercy of whatever else the shared machine does in those seconds.
for r in $(seq 1 "$ROUNDS"); do
  for rate in 1000 5000; do
    conns=$([ "$rate" = 1000 ] && echo 16 || echo 64)
    for s in $(rotate "$r" "${OPEN_ORDER[@]}"); do
      taskset -c 1 "$BIN/weft-load" --addr "${ADDR[$s]}" --host "${HOST[$s]:-backend}" --rate "$rate" \
        --duration "$OPEN_DURATION" --warmup 1 --connections "$conns" >"$WORK/open-$s-$rate-$r.json"
      echo "round $r open loop $rate/s $s: $(cat "$WORK/open-$s-$rate-$r.json")"
    done
  done
done

# h2c, open loop: many streams on a few connections, as gRPC clients do.
H2IN=$(addr side-h2 inbound)
for _ in $(seq 1 100); do
  taskset -c 1 "$BIN/weft-load" --addr "$OUT" --host backend-h2 --rate 100 --duration 0.2 --warmup 0 --connections 1 --h2 \
    | grep -q '"errors":0' && break
  sleep 0.1
done
declare -A H2ADDR=([direct]="127.0.0.1:$BACKH2" [weft-1hop]="$H2IN" [haproxy]="127.0.0.1:$HAPH2" [weft-2hops]="$OUT")
H2_ORDER=(direct weft-1hop haproxy weft-2hops)
for rate in 1000 5000; do
  for s in "${H2_ORDER[@]}"; do
    taskset -c 1 "$BIN/weft-load" --addr "${H2ADDR[$s]}" --host backend-h2 --rate "$rate" --h2 \
      --duration "$DURATION" --warmup 1 --connections 4 >"$WORK/h2-$s-$rate.json"
    echo "h2c open loop $rate/s $s: $(cat "$WORK/h2-$s-$rate.json")"
  done
done

# One bad instance of three, without and then with a resilience policy.
flaky_run() { # name
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: flaky' "http://$OUT/" >"$WORK/wrk-flaky-$1.txt"
  local total bad p50 p99 rps
  total=$(awk '/requests in/ {print $1}' "$WORK/wrk-flaky-$1.txt")
  bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk-flaky-$1.txt"); bad=${bad:-0}
  p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$WORK/wrk-flaky-$1.txt")")
  p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$WORK/wrk-flaky-$1.txt")")
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-flaky-$1.txt")
  echo "$1 $total $bad $rps $p50 $p99" >>"$WORK/flaky.txt"
  echo "flaky $1: $bad of $total failed, $rps req/s, p50 $p50 ms, p99 $p99 ms"
}
flaky_run no-policy
guard flaky
flaky_run with-policy
EJECTIONS=$(curl -s "http://$(addr side-out admin)/metrics" | awk '/^weft_breaker_ejections_total/ {s+=$2} END {print s+0}')

# mTLS. Two hops (the mesh shape: a plaintext client, mTLS between the two
# proxies, plaintext to the backend) under wrk; one hop (the client itself
# speaks mTLS with a certificate from the CA) and new connections under
# weft-load, which wrk cannot do (no client certificates).
haproxy_pid() { pgrep -f "haproxy -f $WORK/$1.cfg" | head -1; }
declare -A TLS_URL=([weft-2hops-mtls]="http://$TLS_OUT/" [haproxy-2hops-tls]="http://127.0.0.1:$HTO/")
declare -A TLS_HOST=([weft-2hops-mtls]=backend-tls [haproxy-2hops-tls]=backend)
declare -A TLS_ADDR=([weft-1hop-mtls]="$TLS_IN" [haproxy-tls]="127.0.0.1:$HTI" [weft-2hops-mtls]="$TLS_OUT" [haproxy-2hops-tls]="127.0.0.1:$HTO")
declare -A TLS_NAME=([weft-1hop-mtls]=backend-tls [haproxy-tls]=haproxy-in)
declare -A TLS_PIDS=(
  [weft-1hop-mtls]="$(pid_of bench-tls-in)" [haproxy-tls]="$(haproxy_pid haproxy-tls-in)"
  [weft-2hops-mtls]="$(pid_of bench-tls-in) $(pid_of bench-tls-out)"
  [haproxy-2hops-tls]="$(haproxy_pid haproxy-tls-in) $(haproxy_pid haproxy-tls-out)"
)
TLS2=(weft-2hops-mtls haproxy-2hops-tls)
TLS1=(weft-1hop-mtls haproxy-tls)
for r in $(seq 1 "$ROUNDS"); do
  for s in $(rotate "$r" "${TLS2[@]}"); do
    before=$(cpu_ms ${TLS_PIDS[$s]})
    taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Host: ${TLS_HOST[$s]}" "${TLS_URL[$s]}" >"$WORK/tls-$s-$r.txt"
    after=$(cpu_ms ${TLS_PIDS[$s]})
    if grep -q Non-2xx "$WORK/tls-$s-$r.txt"; then echo "$s: non-2xx answers"; cat "$WORK/tls-$s-$r.txt"; exit 1; fi
    total=$(awk '/requests in/ {print $1}' "$WORK/tls-$s-$r.txt")
    echo "$s $(awk '/Requests\/sec/ {print $2}' "$WORK/tls-$s-$r.txt") $(to_ms "$(awk '$1=="50%" {print $2}' "$WORK/tls-$s-$r.txt")") $(to_ms "$(awk '$1=="99%" {print $2}' "$WORK/tls-$s-$r.txt")") $(awk -v c=$((after - before)) -v n="$total" 'BEGIN { printf "%.1f", c * 1000 / n }')" >>"$WORK/tls-closed.txt"
    echo "round $r $s: $(tail -1 "$WORK/tls-closed.txt")"
  done
  for rate in 1000 5000; do
    conns=$([ "$rate" = 1000 ] && echo 16 || echo 64)
    for s in $(rotate "$r" "${TLS1[@]}"); do
      before=$(cpu_ms ${TLS_PIDS[$s]})
      taskset -c 1 "$BIN/weft-load" --addr "${TLS_ADDR[$s]}" --host backend --server-name "${TLS_NAME[$s]}" "${TLS_CLIENT[@]}" \
        --rate "$rate" --duration "$OPEN_DURATION" --warmup 1 --connections "$conns" >"$WORK/tls-open-$s-$rate-$r.json"
      after=$(cpu_ms ${TLS_PIDS[$s]})
      awk -v c=$((after - before)) -v n="$(awk -v r="$rate" -v d="$OPEN_DURATION" 'BEGIN { print r * (d + 1) }')" \
        'BEGIN { printf "%.1f\n", c * 1000 / n }' >"$WORK/tls-open-cpu-$s-$rate-$r.txt"
      echo "round $r mTLS open loop $rate/s $s: $(cat "$WORK/tls-open-$s-$rate-$r.json"), CPU $(cat "$WORK/tls-open-cpu-$s-$rate-$r.txt") ms / 1000"
    done
  done
  for s in $(rotate "$r" "${TLS2[@]}"); do
    taskset -c 1 "$BIN/weft-load" --addr "${TLS_ADDR[$s]}" --host "${TLS_HOST[$s]}" --rate 1000 \
      --duration "$OPEN_DURATION" --warmup 1 --connections 16 >"$WORK/tls-open-$s-1000-$r.json"
    echo "round $r mTLS open loop 1000/s $s: $(cat "$WORK/tls-open-$s-1000-$r.json")"
  done
  # New connections: a handshake (and one request) each.
  for s in $(rotate "$r" "${TLS1[@]}"); do
    before=$(cpu_ms ${TLS_PIDS[$s]})
    taskset -c 1 "$BIN/weft-load" --addr "${TLS_ADDR[$s]}" --host backend --server-name "${TLS_NAME[$s]}" "${TLS_CLIENT[@]}" \
      --fresh --duration "$DURATION" --warmup 0 --connections 16 >"$WORK/tls-fresh-$s-$r.json"
    after=$(cpu_ms ${TLS_PIDS[$s]})
    ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ok'])" "$WORK/tls-fresh-$s-$r.json")
    echo "$s $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['per_second'])" "$WORK/tls-fresh-$s-$r.json") $(awk -v c=$((after - before)) -v n="$ok" 'BEGIN { printf "%.3f", c / n }')" >>"$WORK/tls-fresh.txt"
    echo "round $r new connections $s: $(tail -1 "$WORK/tls-fresh.txt")"
  done
done
for s in "${TLS2[@]}"; do
  taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" -H "Host: ${TLS_HOST[$s]}" "${TLS_URL[$s]}" >"$WORK/tls64-$s.txt"
  echo "$s $(awk '/Requests\/sec/ {print $2}' "$WORK/tls64-$s.txt")" >>"$WORK/tls64.txt"
done
RSS_TLS_IN=$(rss_mb "$(pid_of bench-tls-in)"); RSS_TLS_OUT=$(rss_mb "$(pid_of bench-tls-out)")
RSS_HAP_TLS_IN=$(rss_mb "$(haproxy_pid haproxy-tls-in)"); RSS_HAP_TLS_OUT=$(rss_mb "$(haproxy_pid haproxy-tls-out)")
fi # ONLY != capture

# The capture comparison's table and its summary line (medians of cap.txt
# and the open-loop runs).
median() { sort -n | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }
tmed() { awk -v s="$1" -v c="$2" '$1==s {print $c}' "$3" | median; }
capture_table() {
  cap_open() { # scenario key
    python3 -c "import json,glob,statistics,sys; s,k=sys.argv[1:3]
v=[json.load(open(f))[k] for f in sorted(glob.glob(f'$WORK/cap-open-{s}-*.json'))]
print(f'{statistics.median(v):.3f}')" "$1" "$2"
  }
  echo "| path | req/s (wrk -c$CONNS) | p50 ms | p99 ms | proxy CPU ms / 1000 req | 1000/s p50 ms | p99 ms |"
  echo "|---|---|---|---|---|---|---|"
  for s in explicit captured; do
    echo "| $s | $(tmed "$s" 2 "$WORK/cap.txt" | awk '{printf "%.0f", $1}') | $(tmed "$s" 3 "$WORK/cap.txt") | $(tmed "$s" 4 "$WORK/cap.txt") | $(tmed "$s" 5 "$WORK/cap.txt") | $(cap_open "$s" p50_ms) | $(cap_open "$s" p99_ms) |"
  done
  echo
  awk -v ce="$(tmed explicit 5 "$WORK/cap.txt")" -v cc="$(tmed captured 5 "$WORK/cap.txt")" -v pe="$(cap_open explicit p50_ms)" -v pc="$(cap_open captured p50_ms)" \
    'BEGIN { printf "Captured against explicit: CPU per request %+.1f %%, open-loop p50 %+.3f ms.\n", 100 * (cc - ce) / ce, pc - pe }'
}
# Transparent capture: the same two-sidecar path dialled explicitly
# (127.0.0.1:4140, Host) and captured (an unchanged client dialling
# backend:8080), in a network namespace of the bench's own with its own
# backend, etcd and control plane. The sidecars run as another user (the
# capture rules skip their own traffic); wrk and weft-load are the app.
NS=weft-bench-$$
ip netns add "$NS"
NSX=(ip netns exec "$NS")
"${NSX[@]}" ip link set lo up
"${NSX[@]}" ip addr add 10.78.0.2/32 dev lo
nginx_conf nginx-ns <<NGINX
  server { listen 127.0.0.1:$BACK; location / { return 200 "ok\n"; } }
NGINX
start ns-backend "${NSX[@]}" taskset -c 1 nginx -c "$WORK/nginx-ns.conf" -e "$WORK/nginx-ns-error.log"
start ns-etcd "${NSX[@]}" taskset -c 1 etcd --data-dir "$WORK/etcd-ns" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "default=http://127.0.0.1:$PP" --log-level warn
start ns-control "${NSX[@]}" taskset -c 1 "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0
wait_line "$WORK/ns-control.out" listening
AS_PROXY=(setpriv --reuid 65534 --regid 65534 --clear-groups)
NSCTL=(--control "http://$(addr ns-control grpc)")
start ns-in "${NSX[@]}" "${AS_PROXY[@]}" taskset -c 0 "$BIN/weft-proxy" "${NSCTL[@]}" --service backend --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id ns-in
start ns-out "${NSX[@]}" "${AS_PROXY[@]}" taskset -c 0 "$BIN/weft-proxy" "${NSCTL[@]}" --service client --app "127.0.0.1:$BACK" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:4140 --admin 127.0.0.1:0 --id ns-out
wait_line "$WORK/ns-in.out" listening; wait_line "$WORK/ns-out.out" listening
"${NSX[@]}" "$BIN/weft-proxy" init --proxy-uid 65534 --outbound-port 4140 --inbound-ports 1 >/dev/null
ns_code() { "${NSX[@]}" curl -s -o /dev/null -w '%{http_code}' "$@"; }
for _ in $(seq 1 100); do [ "$(ns_code -H 'Host: backend' http://127.0.0.1:4140/)" = 200 ] && break; sleep 0.1; done
for _ in $(seq 1 100); do [ "$(ns_code -H 'Host: backend:8080' http://10.78.0.2:8080/)" = 200 ] && break; sleep 0.1; done
declare -A CAP_URL=([explicit]="http://127.0.0.1:4140/" [captured]="http://10.78.0.2:8080/")
declare -A CAP_ADDR=([explicit]="127.0.0.1:4140" [captured]="10.78.0.2:8080")
declare -A CAP_HOST=([explicit]=backend [captured]=backend:8080)
CAP_PIDS="$(pgrep -f 'weft-proxy.*--id ns-in$' | head -1) $(pgrep -f 'weft-proxy.*--id ns-out$' | head -1)"
# More rounds than elsewhere: the differences looked for (a few per cent
# of CPU, hundredths of a millisecond) are smaller than one round's noise.
CAP_ROUNDS=${BENCH_CAPTURE_ROUNDS:-$((ROUNDS < 7 && QUICK != 1 ? 7 : ROUNDS))}
for r in $(seq 1 "$CAP_ROUNDS"); do
  for s in $(rotate "$r" explicit captured); do
    before=$(cpu_ms $CAP_PIDS)
    "${NSX[@]}" taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Host: ${CAP_HOST[$s]}" "${CAP_URL[$s]}" >"$WORK/cap-$s-$r.txt"
    after=$(cpu_ms $CAP_PIDS)
    if grep -q Non-2xx "$WORK/cap-$s-$r.txt"; then echo "$s: non-2xx answers"; cat "$WORK/cap-$s-$r.txt"; exit 1; fi
    total=$(awk '/requests in/ {print $1}' "$WORK/cap-$s-$r.txt")
    echo "$s $(awk '/Requests\/sec/ {print $2}' "$WORK/cap-$s-$r.txt") $(to_ms "$(awk '$1=="50%" {print $2}' "$WORK/cap-$s-$r.txt")") $(to_ms "$(awk '$1=="99%" {print $2}' "$WORK/cap-$s-$r.txt")") $(awk -v c=$((after - before)) -v n="$total" 'BEGIN { printf "%.1f", c * 1000 / n }')" >>"$WORK/cap.txt"
    echo "round $r capture $s: $(tail -1 "$WORK/cap.txt")"
    "${NSX[@]}" taskset -c 1 "$BIN/weft-load" --addr "${CAP_ADDR[$s]}" --host "${CAP_HOST[$s]}" --rate 1000 \
      --duration "$OPEN_DURATION" --warmup 1 --connections 16 >"$WORK/cap-open-$s-$r.json"
    echo "round $r capture open loop 1000/s $s: $(cat "$WORK/cap-open-$s-$r.json")"
  done
done
"${NSX[@]}" "$BIN/weft-proxy" init --uninstall >/dev/null
if [ "$ONLY" = capture ]; then
  capture_table
  exit 0
fi

fi # ONLY != callgrind

# User-space instructions per request, under callgrind: a count, so unlike
# CPU time it does not move with whatever else the shared machine runs. The
# kernel's share is not in it (both proxies make the same system calls per
# request). Each proxy runs alone under valgrind; counters are zeroed after a
# warm-up and dumped after a fixed number of requests at a low rate.
CG_SECS=$([ "$QUICK" = 1 ] && echo 2 || echo 4)
port CGPORT; port CGPORT2; port CGPORT3
cat >"$WORK/haproxy-cg.cfg" <<HAPROXY
$HAPROXY_DEFAULTS
frontend fe
  bind 127.0.0.1:$CGPORT
  default_backend be
frontend fe-tls
  bind 127.0.0.1:$CGPORT3 ssl crt $WORK/pki/haproxy-in.pem ca-file $WORK/pki/ca.crt verify required ssl-min-ver TLSv1.3 alpn http/1.1
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:$BACK
frontend fe-h2
  bind 127.0.0.1:$CGPORT2 proto h2
  default_backend be-h2
backend be-h2
  http-reuse always
  server b2 127.0.0.1:$BACKH2 proto h2
HAPROXY
# CG_FLAGS: more weft-load flags (mTLS); CG_CONTROL: the sidecar's control
# plane flags.
CG_FLAGS=(); CG_CONTROL=(--control "$CONTROL")
cg_count() { # name pid addr host h2flag -> appends "name Ir/request" to cg.txt
  local name=$1 pid=$2 addr=$3 host=$4 h2=$5 conns
  conns=$([ -n "$h2" ] && echo 4 || echo 16)
  local up=0
  for _ in $(seq 1 600); do
    taskset -c 1 "$BIN/weft-load" --addr "$addr" --host "$host" --rate 50 --duration 0.1 --warmup 0 --connections 1 $h2 "${CG_FLAGS[@]}" 2>/dev/null \
      | grep -q '"errors":0' && { up=1; break; }
    sleep 0.1
  done
  if [ "$up" != 1 ]; then
    echo "callgrind $name: no answer from $addr in 60 s; its logs:"
    tail -n 5 "$WORK"/cg-*.log
    exit 1
  fi
  taskset -c 1 "$BIN/weft-load" --addr "$addr" --host "$host" --rate 500 --duration 1 --warmup 0 --connections "$conns" $h2 "${CG_FLAGS[@]}" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  taskset -c 1 "$BIN/weft-load" --addr "$addr" --host "$host" --rate 500 --duration "$CG_SECS" --warmup 0 \
    --connections "$conns" $h2 "${CG_FLAGS[@]}" >"$WORK/cg-load.json"
  callgrind_control -d "$pid" >/dev/null
  local dump ok ir
  dump=$(ls -t "$WORK"/callgrind-*.[0-9]* | head -1)
  ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ok'])" "$WORK/cg-load.json")
  ir=$(awk '/^summary:/ {print $2}' "$dump")
  echo "$name $(awk -v i="$ir" -v n="$ok" 'BEGIN { printf "%.0f", i/n }')" >>"$WORK/cg.txt"
  echo "callgrind $name: $(tail -1 "$WORK/cg.txt" | cut -d' ' -f2) instructions per request ($ok requests)"
}
cg_weft() { # name listener(inbound|outbound) h2flag host service app
  local name=$1 listener=$2 h2=$3 host=$4 service=$5 app=$6
  start "cg-$name" taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind-$name" "$PROXY_BIN" \
    "${CG_CONTROL[@]}" --service "$service" --app "$app" --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 \
    --admin 127.0.0.1:0 --id "cg-$name"
  wait_line "$WORK/cg-$name.out" listening
  local pid
  pid=$(pgrep -f "valgrind.*--id cg-$name" | head -1)
  cg_count "$name" "$pid" "$(addr "cg-$name" "$listener")" "$host" "$h2"
  kill "$pid"
}
cg_weft weft-inbound inbound "" backend backend-cg "127.0.0.1:$BACK"
# A quick run counts the HTTP/1.1 hop only.
if [ "$QUICK" != 1 ]; then
  cg_weft weft-outbound outbound "" backend client-cg "127.0.0.1:$BACK"
  cg_weft weft-inbound-h2 inbound --h2 backend-h2 backend-h2-cg "127.0.0.1:$BACKH2"
fi
# The mTLS hop: the client presents a certificate; persistent connections,
# so this is the per-request cost of TLS records, not of handshakes.
# (Not for another build given in WEFT_PROXY_BIN, which may predate mTLS.)
if [ -z "${WEFT_PROXY_BIN:-}" ]; then
  CG_CONTROL=("${MTLS[@]}"); CG_FLAGS=("${TLS_CLIENT[@]}" --server-name backend-tls-cg)
  cg_weft weft-inbound-mtls inbound "" backend backend-tls-cg "127.0.0.1:$BACK"
  CG_CONTROL=(--control "$CONTROL"); CG_FLAGS=()
fi
start cg-haproxy taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind-haproxy" haproxy -f "$WORK/haproxy-cg.cfg"
# The process just started is valgrind itself (taskset execs it); waiting on
# pgrep instead raced with its start.
CGH=${PIDS[-1]}
cg_count haproxy "$CGH" "127.0.0.1:$CGPORT" backend ""
[ "$QUICK" = 1 ] || cg_count haproxy-h2 "$CGH" "127.0.0.1:$CGPORT2" backend-h2 --h2
CG_FLAGS=("${TLS_CLIENT[@]}" --server-name haproxy-in)
cg_count haproxy-tls "$CGH" "127.0.0.1:$CGPORT3" backend ""
CG_FLAGS=()
kill "$CGH"

# BENCH_CG_OUT=DIR keeps the callgrind profiles (for callgrind_annotate).
if [ -n "${BENCH_CG_OUT:-}" ]; then mkdir -p "$BENCH_CG_OUT" && cp "$WORK"/callgrind-* "$BENCH_CG_OUT"/; fi
if [ "$ONLY" = callgrind ]; then
  cat "$WORK/cg.txt"
  exit 0
fi

# Control plane scale: simulated sidecars against a fresh control plane.
SIM_SIZES=${BENCH_SIM:-$([ "$QUICK" = 1 ] && echo "100 1000" || echo "100 1000 10000")}
for n in $SIM_SIZES; do
  start sim-control-$n "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    --prefix "/weft-sim-$n"
  wait_line "$WORK/sim-control-$n.out" listening
  SIMC="http://$(addr sim-control-$n grpc)"
  SIMPID=$(pgrep -f "weft-sim-$n\$" | head -1)
  wait_http "http://$(addr sim-control-$n admin)/ready"
  "$BIN/weft-sim" --control "$SIMC" --proxies "$n" --control-pid "$SIMPID" --timeout-secs 90 >"$WORK/sim-$n.json"
  echo "control plane with $n simulated sidecars: $(cat "$WORK/sim-$n.json")"
  kill "$SIMPID" 2>/dev/null || true
done

declare -A RPS P50 P99 CPU RPS64
for s in "${ORDER[@]}"; do
  RPS[$s]=$(awk -v s="$s" '$1==s {print $2}' "$WORK/results.txt" | median)
  P50[$s]=$(awk -v s="$s" '$1==s {print $3}' "$WORK/results.txt" | median)
  P99[$s]=$(awk -v s="$s" '$1==s {print $4}' "$WORK/results.txt" | median)
  CPU[$s]=$(awk -v s="$s" '$1==s {print $5}' "$WORK/results.txt" | median)
  RPS64[$s]=$(awk -v s="$s" '$1==s {print $2}' "$WORK/results64.txt")
done
# Median over the rounds of one open-loop figure (errors: the sum).
open_med() { # scenario rate key
  python3 -c "import json,glob,statistics,sys; s,r,k=sys.argv[1:4]
v=[json.load(open(f))[k] for f in sorted(glob.glob(f'$WORK/open-{s}-{r}-*.json'))]
print(sum(v) if k=='errors' else f'{statistics.median(v):.3f}')" "$1" "$2" "$3"
}
open_add() { awk -v a="$(open_med "$1" 1000 "$2")" -v d="$(open_med direct 1000 "$2")" 'BEGIN { printf "%.3f", a-d }'; }
jq_get() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); v=d
for k in sys.argv[2].split('.'):
    v = v.get(k) if isinstance(v, dict) else None
print('-' if v is None else (f'{v:.3f}' if isinstance(v, float) else v))" "$1" "$2"; }
{
  echo "# weft benchmarks"
  echo
  echo "Generated by \`make bench\`$([ "$QUICK" = 1 ] && echo " (BENCH_QUICK=1)") on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r). Re-run to refresh; the machine is shared, so compare rows of one run, not runs."
  echo
  echo "## Method"
  echo
  echo "- Backend: nginx \`return 200\`, one worker, on CPU 1. Every proxy has one worker or thread (weft-proxy: current-thread runtime), pinned to CPU 0; load generators run on CPU 1. nginx and HAProxy are keep-alive reverse proxies to the same backend. weft runs release builds with its control plane, metrics and admin on."
  echo "- Paths: \`direct\` (no proxy), \`weft-1hop\` (the callee's inbound sidecar), \`nginx\`, \`haproxy\`, \`weft-2hops\` (caller's outbound sidecar → callee's inbound sidecar: the mesh shape), \`weft-2hops-guarded\` (the same with a resilience policy on the route: timeout, 2 retries, breaker, retry budget), \`haproxy-2hops\` (two HAProxy processes in a row: the same shape with the reference proxy)."
  echo "- Closed loop: \`wrk -t1 -c$CONNS -d${DURATION}s\`, $ROUNDS round(s), scenarios interleaved (each round starting one scenario later), medians; then one \`-c64\` run each. Proxy CPU is utime+stime of the proxy processes from /proc over the \`-c$CONNS\` runs, per 1000 requests."
  echo "- Open loop: \`weft-load\` dispatches at a fixed rate (1000/s on 16 connections, 5000/s on 64) for ${OPEN_DURATION}s after 1 s of warm-up, $ROUNDS round(s), scenarios interleaved and rotated, medians; latency runs from dispatch, including any wait behind earlier requests on the connection."
  echo
  echo "## Throughput, latency and CPU (closed loop)"
  echo
  echo "| path | req/s (-c$CONNS) | vs direct | vs HAProxy | p50 ms | p99 ms | req/s (-c64) | proxy CPU ms / 1000 req |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in "${ORDER[@]}"; do
    awk -v s="$s" -v r="${RPS[$s]}" -v d="${RPS[direct]}" -v h="${RPS[haproxy]}" -v a="${P50[$s]}" -v b="${P99[$s]}" -v r64="${RPS64[$s]}" -v c="${CPU[$s]}" \
      'BEGIN { printf "| %s | %.0f | %.2f× | %.2f× | %s | %s | %.0f | %s |\n", s, r, r/d, r/h, a, b, r64, (s=="direct" ? "-" : c) }'
  done
  echo
  echo "Proxy CPU for the two-hop rows is both proxies together."
  echo
  echo "## Fixed rate (open loop)"
  echo
  echo "| path | 1000/s p50 ms | p99 ms | p99.9 ms | 5000/s p50 ms | p99 ms | p99.9 ms | errors |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in "${OPEN_ORDER[@]}"; do
    echo "| $s | $(open_med "$s" 1000 p50_ms) | $(open_med "$s" 1000 p99_ms) | $(open_med "$s" 1000 p999_ms) | $(open_med "$s" 5000 p50_ms) | $(open_med "$s" 5000 p99_ms) | $(open_med "$s" 5000 p999_ms) | $(( $(open_med "$s" 1000 errors) + $(open_med "$s" 5000 errors) )) |"
  done
  echo
  echo "Added to \`direct\` at 1000/s (medians above): weft-1hop p50 +$(open_add weft-1hop p50_ms) ms, p99 +$(open_add weft-1hop p99_ms) ms; haproxy p50 +$(open_add haproxy p50_ms) ms, p99 +$(open_add haproxy p99_ms) ms; nginx p50 +$(open_add nginx p50_ms) ms, p99 +$(open_add nginx p99_ms) ms; weft-2hops (two sidecars) p50 +$(open_add weft-2hops p50_ms) ms, p99 +$(open_add weft-2hops p99_ms) ms; haproxy-2hops p50 +$(open_add haproxy-2hops p50_ms) ms, p99 +$(open_add haproxy-2hops p99_ms) ms."
  echo
  echo "## h2c, fixed rate (open loop)"
  echo
  echo "\`weft-load --h2\` on 4 h2c connections (prior knowledge), the backend answering HTTP/2; HAProxy speaks h2 on both sides; weft keeps HTTP/2 end to end."
  echo
  echo "| path | 1000/s p50 ms | p99 ms | p99.9 ms | 5000/s p50 ms | p99 ms | p99.9 ms | errors |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in "${H2_ORDER[@]}"; do
    a="$WORK/h2-$s-1000.json"; b="$WORK/h2-$s-5000.json"
    echo "| $s | $(jq_get "$a" p50_ms) | $(jq_get "$a" p99_ms) | $(jq_get "$a" p999_ms) | $(jq_get "$b" p50_ms) | $(jq_get "$b" p99_ms) | $(jq_get "$b" p999_ms) | $(( $(jq_get "$a" errors) + $(jq_get "$b" errors) )) |"
  done
  echo
  echo "## Instructions per request (callgrind)"
  echo
  echo "User-space instructions per request of one proxy process run under \`valgrind --tool=callgrind\`, counted over ${CG_SECS} s at 500 requests/s after a 1 s warm-up. A count, not a time: it does not move with the machine's load, so it is the steadiest CPU comparison here. Kernel work is not included (both proxies make the same system calls per request)."
  echo
  cg() { awk -v k="$1" '$1==k {print $2}' "$WORK/cg.txt"; }
  echo "| hop | weft | HAProxy | weft / HAProxy |"
  echo "|---|---|---|---|"
  cg_row() { # label weft-key haproxy-key
    local w h; w=$(cg "$2"); h=$(cg "$3")
    [ -n "$w" ] && [ -n "$h" ] && awk -v l="$1" -v w="$w" -v h="$h" 'BEGIN { printf "| %s | %d | %d | %.2f× |\n", l, w, h, w/h }'
    return 0
  }
  cg_row "HTTP/1.1, inbound (one hop)" weft-inbound haproxy
  cg_row "HTTP/1.1, outbound (discovery, routing, P2C, breaker)" weft-outbound haproxy
  cg_row "h2c, inbound (one hop)" weft-inbound-h2 haproxy-h2
  cg_row "HTTP/1.1 over mTLS, inbound (one hop, HAProxy with TLS)" weft-inbound-mtls haproxy-tls
  echo
  echo "## mTLS"
  echo
  echo "weft's sidecars with certificates from their control plane's CA (strict inbound mTLS) beside HAProxy terminating and originating TLS with client certificates from the same CA (\`weftctl ca issue\`), in the same run: TLS 1.3, ECDSA P-256, client certificates required and verified on every hop, one worker each, pinned to CPU 0. Two hops: a plaintext client (wrk), mTLS between the two proxies, plaintext to the backend — the mesh shape. One hop: the client (\`weft-load\` with a certificate) speaks mTLS to the proxy, which sends plaintext to the backend. $ROUNDS round(s), interleaved, medians."
  echo
  echo "| two hops, closed loop (wrk -c$CONNS) | req/s | vs haproxy-2hops-tls | p50 ms | p99 ms | req/s (-c64) | proxy CPU ms / 1000 req |"
  echo "|---|---|---|---|---|---|---|"
  for s in "${TLS2[@]}"; do
    awk -v s="$s" -v r="$(tmed "$s" 2 "$WORK/tls-closed.txt")" -v h="$(tmed haproxy-2hops-tls 2 "$WORK/tls-closed.txt")" \
      -v a="$(tmed "$s" 3 "$WORK/tls-closed.txt")" -v b="$(tmed "$s" 4 "$WORK/tls-closed.txt")" \
      -v r64="$(awk -v s="$s" '$1==s {print $2}' "$WORK/tls64.txt")" -v c="$(tmed "$s" 5 "$WORK/tls-closed.txt")" \
      'BEGIN { printf "| %s | %.0f | %.2f× | %s | %s | %.0f | %s |\n", s, r, r/h, a, b, r64, c }'
  done
  echo
  tls_open() { # scenario rate key
    python3 -c "import json,glob,statistics,sys; s,r,k=sys.argv[1:4]
v=[json.load(open(f))[k] for f in sorted(glob.glob(f'$WORK/tls-open-{s}-{r}-*.json'))]
print(sum(v) if k=='errors' else f'{statistics.median(v):.3f}')" "$1" "$2" "$3"
  }
  tls_cpu() { cat "$WORK"/tls-open-cpu-"$1"-"$2"-*.txt | median; }
  echo "| fixed rate (open loop) | 1000/s p50 ms | p99 ms | CPU ms / 1000 req | 5000/s p50 ms | p99 ms | CPU ms / 1000 req | errors |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in "${TLS1[@]}"; do
    echo "| $s (one hop) | $(tls_open "$s" 1000 p50_ms) | $(tls_open "$s" 1000 p99_ms) | $(tls_cpu "$s" 1000) | $(tls_open "$s" 5000 p50_ms) | $(tls_open "$s" 5000 p99_ms) | $(tls_cpu "$s" 5000) | $(( $(tls_open "$s" 1000 errors) + $(tls_open "$s" 5000 errors) )) |"
  done
  for s in "${TLS2[@]}"; do
    echo "| $s | $(tls_open "$s" 1000 p50_ms) | $(tls_open "$s" 1000 p99_ms) | - | - | - | - | $(tls_open "$s" 1000 errors) |"
  done
  echo
  echo "Added to plaintext \`direct\` at 1000/s: weft-2hops-mtls p99 +$(awk -v a="$(tls_open weft-2hops-mtls 1000 p99_ms)" -v d="$(open_med direct 1000 p99_ms)" 'BEGIN { printf "%.3f", a-d }') ms, haproxy-2hops-tls p99 +$(awk -v a="$(tls_open haproxy-2hops-tls 1000 p99_ms)" -v d="$(open_med direct 1000 p99_ms)" 'BEGIN { printf "%.3f", a-d }') ms."
  echo
  echo "| new connections (16 at a time, each: TCP, TLS 1.3 handshake with client certificate, one request) | handshakes/s | proxy CPU ms / handshake |"
  echo "|---|---|---|"
  for s in "${TLS1[@]}"; do
    echo "| $s | $(tmed "$s" 2 "$WORK/tls-fresh.txt") | $(tmed "$s" 3 "$WORK/tls-fresh.txt") |"
  done
  echo
  echo "RSS after the 64-connection runs: weft sidecars $RSS_TLS_IN MB (inbound) and $RSS_TLS_OUT MB (outbound); HAProxy $RSS_HAP_TLS_IN MB and $RSS_HAP_TLS_OUT MB."
  echo
  echo "## Transparent capture"
  echo
  echo "The two-sidecar path in a network namespace of its own, dialled explicitly (\`127.0.0.1:4140\`, \`Host: backend\`) and captured (\`weft-proxy init\`; the client dials \`10.78.0.2:8080\` with \`Host: backend:8080\` as an unchanged app calling \`http://backend:8080/\` does), same processes, same run, $CAP_ROUNDS round(s) interleaved, medians; proxy CPU is both sidecars. Open loop: \`weft-load\` at 1000/s on 16 connections."
  echo
  capture_table
  echo
  echo "## Hedging"
  echo
  echo "Service \`tail\`: three instances (the example service), each stalling 2 % of its calls for 500 ms; the same route with and without \`hedge: { after: 50ms }\` (retry budget 10 % + 5/s), open loop at 200/s on 32 connections through the caller's sidecar for ${DURATION}s (no warm-up, so every call is counted), $HEDGE_ROUNDS round(s) interleaved, medians. Each hedge is one extra try (the retry budget caps them at 10 % of calls + 5/s)."
  echo
  hedge_table
  echo
  echo "## Memory"
  echo
  echo "Sidecar RSS: inbound $RSS_IDLE_IN MB and outbound $RSS_IDLE_OUT MB idle (connected, config received); $RSS_LOAD_IN MB and $RSS_LOAD_OUT MB after the 64-connection runs."
  echo
  echo "## One bad instance of three"
  echo
  echo "Service \`flaky\` has three instances behind weft sidecars; one answers every call with 503. \`wrk -c$CONNS\` through the caller's sidecar, one run each."
  echo
  echo "| policy | calls | failed | success | req/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|---|---|---|"
  while read -r name total bad rps p50 p99; do
    awk -v n="$name" -v t="$total" -v b="$bad" -v r="$rps" -v a="$p50" -v c="$p99" \
      'BEGIN { printf "| %s | %d | %d | %.3f %% | %.0f | %s | %s |\n", n, t, b, 100*(t-b)/t, r, a, c }'
  done <"$WORK/flaky.txt"
  echo
  echo "With the policy: retries (budget 20 % + 10/s) and a breaker (5 consecutive failures, 10 s base ejection); breaker ejections during the run: $EJECTIONS."
  echo
  echo "## Control plane at scale"
  echo
  echo "\`weft-sim\` opens N discovery streams (each a sidecar of its own small service, subscribed to \`target\`) to a fresh \`weft-control\`, plus one instance of \`target\`. Neither is pinned: the simulator, the control plane and etcd share both cores (etcd also holds the other scenarios' state; each control-plane replica writes its sidecars' records under one lease). Apply → update: from the start of the \`Apply\` RPC of a \`target\` route until each stream receives the update (it ACKs at once). Churn: the \`target\` instance deregisters → each stream's update without it. RSS per proxy: the control plane's RSS growth over N."
  echo
  echo "| sidecars | registered | in (s) | apply RPC ms | apply→update p50 ms | p99 ms | max ms | churn p50 ms | p99 ms | max ms | control RSS KB / sidecar |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for n in $SIM_SIZES; do
    j="$WORK/sim-$n.json"
    echo "| $n | $(jq_get "$j" connected) | $(jq_get "$j" connect_secs) | $(jq_get "$j" apply_rpc_ms) | $(jq_get "$j" apply_to_ack.p50_ms) | $(jq_get "$j" apply_to_ack.p99_ms) | $(jq_get "$j" apply_to_ack.max_ms) | $(jq_get "$j" churn.p50_ms) | $(jq_get "$j" churn.p99_ms) | $(jq_get "$j" churn.max_ms) | $(jq_get "$j" control_kb_per_proxy) |"
  done
} >BENCHMARKS.md
cat BENCHMARKS.md
