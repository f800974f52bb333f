#!/usr/bin/env bash
# `make demo`: a small agent platform behind weft sidecars, on loopback.
#
# Starts etcd (temp data dir), weft-control with a CA and tokens, an
# `agent-router` and two versions of `inference`, each behind its own
# weft-proxy (mTLS between sidecars, a certificate each); applies
# examples/policy.yaml; sends traffic through the router's sidecar; shows
# what happened; then stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
WORK=$(mktemp -d -t weft-demo.XXXXXX)
PIDS=()
NS=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.2
  if [ -n "$NS" ]; then ip netns del "$NS" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

USED_PORTS=" "
port() { # VAR: a loopback port where nothing listens (etcd and the router's sidecar need one up front)
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
wait_line() { # file pattern
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1"; cat "${1%.out}.log" 2>/dev/null | tail -20; exit 1
}
wait_ok() { # url
  for _ in $(seq 1 200); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "timed out waiting for $1"; exit 1
}
addr() { grep -o "$2=[^ ]*" "$WORK/$1.out" | cut -d= -f2; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a CA and tokens: weftctl ca init, one proxy:<service> token per service"
"$BIN/weftctl" ca init --out "$WORK/pki"
tok() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
ADMIN=$(tok)
declare -A TOKEN
{
  echo "$ADMIN: admin"
  for s in inference agent-router inference-lite batch-agent search-tool llm; do TOKEN[$s]=$(tok); echo "${TOKEN[$s]}: proxy:$s"; done
} >"$WORK/tokens.yaml"
export WEFT_TOKEN=$ADMIN WEFT_CA_BUNDLE="$WORK/pki/ca.crt"
# A sidecar of service $1 with its own token and the trust bundle.
sidecar() { local s=$1; shift; start "sidecar-$SIDE" "$BIN/weft-proxy" --service "$s" --token "${TOKEN[$s]}" "$@"; }

say "starting etcd, weft-control and the example platform"
port EP; port PP
start etcd etcd --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "default=http://127.0.0.1:$PP" --log-level warn
start control "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --lease-ttl 3 \
  --ca-cert "$WORK/pki/ca.crt" --ca-key "$WORK/pki/ca.key" --tokens "$WORK/tokens.yaml"
wait_line "$WORK/control.out" listening
CONTROL="https://$(addr control grpc)"
wait_ok "http://$(addr control admin)/ready"
export WEFT_CONTROL=$CONTROL

for v in v1 v2; do
  start "app-$v" "$BIN/weft-example-service" --listen 127.0.0.1:0 --service inference --version $v
  wait_line "$WORK/app-$v.out" listening
  APP=$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-$v.out")
  SIDE=$v sidecar inference --labels "version=$v,region=local" --app "$APP" \
    --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id "inference-$v"
done
port RO
start app-router "$BIN/weft-example-service" --listen 127.0.0.1:0 --service agent-router --outbound "127.0.0.1:$RO"
wait_line "$WORK/app-router.out" listening
ROUTER=$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-router.out")
SIDE=router sidecar agent-router --labels region=local --app "$ROUTER" \
  --inbound 127.0.0.1:0 --outbound "127.0.0.1:$RO" --admin 127.0.0.1:0 --id agent-router-1
for s in v1 v2 router; do wait_line "$WORK/sidecar-$s.out" listening; wait_ok "http://$(addr sidecar-$s admin)/ready"; done

say "weftctl endpoints inference"
"$BIN/weftctl" endpoints inference

say "weftctl apply -f examples/policy.yaml --wait"
"$BIN/weftctl" apply -f examples/policy.yaml --wait

say "100 calls: agent-router -> its sidecar -> inference (expect about 90 v1 / 10 v2)"
for i in $(seq 1 100); do curl -s "http://$ROUTER/call/inference/v1/run"; done | grep -o '"served_by":"[^"]*"' | sort | uniq -c

say "10 calls asking for the large model (x-model: large -> v2 only)"
for i in $(seq 1 10); do curl -s -H 'x-model: large' "http://$ROUTER/call/inference/v1/run"; done | grep -o '"served_by":"[^"]*"' | sort | uniq -c

say "a call to a service nobody registered"
curl -s -i -H 'Host: nosuch' "http://127.0.0.1:$RO/" | grep -iE '^(HTTP|x-weft-error)|weft:' || true

say "weftctl status"
"$BIN/weftctl" status

say "resilience: a broken inference v3 (every call 503) and an inference-lite fallback"
start app-v3 "$BIN/weft-example-service" --listen 127.0.0.1:0 --service inference --version v3 --fail-percent 100
wait_line "$WORK/app-v3.out" listening
SIDE=v3 sidecar inference --labels "version=v3,region=local" \
  --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-v3.out")" --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id inference-v3
start app-lite "$BIN/weft-example-service" --listen 127.0.0.1:0 --service inference-lite --version v1
wait_line "$WORK/app-lite.out" listening
SIDE=lite sidecar inference-lite --labels "region=local" \
  --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-lite.out")" --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id inference-lite-1
for s in v3 lite; do wait_line "$WORK/sidecar-$s.out" listening; done
wait_ok "http://$(addr sidecar-lite admin)/ready"
for _ in $(seq 1 100); do [ "$("$BIN/weftctl" endpoints inference | grep -c true)" = 3 ] && break; sleep 0.1; done
"$BIN/weftctl" apply -f examples/resilience.yaml --wait

say "200 calls with v3 taking 10 % of first tries: outcome and x-weft-degraded"
for i in $(seq 1 200); do
  curl -s -o /dev/null -w '%{http_code} ' -D "$WORK/h" "http://$ROUTER/call/inference/v1/run"
  grep -i '^x-weft-degraded' "$WORK/h" | tr -d '\r' | cut -d' ' -f2 || echo clean
done | sort | uniq -c
echo "breaker ejections: $(curl -s "http://$(addr sidecar-router admin)/metrics" | awk '/^weft_breaker_ejections_total/ {s+=$2} END {print s+0}')"

say "large-model calls: only v3 could serve them, so they fall back to inference-lite"
for i in $(seq 1 3); do curl -s -D "$WORK/h" -H 'x-model: large' "http://$ROUTER/call/inference/v1/run"; grep -i '^x-weft-degraded' "$WORK/h"; done

say "chaos: x-chaos aborts half of the tries; retries absorb it"
for i in $(seq 1 20); do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-chaos: 1' "http://$ROUTER/call/inference/v1/run"; done | sort | uniq -c

say "weftctl traces --degraded --since 5m (most recent first)"
sleep 1.2 # reports are batched by the sidecars
"$BIN/weftctl" traces --degraded --since 5m --limit 8

say "tenants: acme pinned to the v2 canary, globex throttled to 5 calls/s"
"$BIN/weftctl" apply -f examples/tenants.yaml --wait
echo "acme, 10 calls:"
for i in $(seq 1 10); do curl -s -H 'x-tenant-id: acme' "http://$ROUTER/call/inference/v1/run"; done | grep -o '"served_by":"[^"]*"' | sort | uniq -c
echo "globex, 40 calls as fast as curl goes (HTTP status, then x-weft-degraded):"
for i in $(seq 1 40); do
  curl -s -o /dev/null -w '%{http_code} ' -D "$WORK/h" -H 'x-tenant-id: globex' "http://$ROUTER/call/inference/v1/run"
  grep -i '^x-weft-degraded' "$WORK/h" | tr -d '\r' | cut -d' ' -f2 || echo -
done | sort | uniq -c
echo "weftctl history route inference:"
"$BIN/weftctl" history route inference

say "agent traffic: a hedge cuts a stalled call"
# Two search-tool instances, each stuck 1.5 s on 30 % of its calls.
for i in 1 2; do
  start "app-tool$i" "$BIN/weft-example-service" --listen 127.0.0.1:0 --service search-tool --version "t$i" \
    --stall-percent 30 --stall-ms 1500
  wait_line "$WORK/app-tool$i.out" listening
  SIDE=tool$i sidecar search-tool --labels "version=t$i,region=local" --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-tool$i.out")" \
    --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id "search-tool-$i"
done
start app-llm "$BIN/weft-example-service" --listen 127.0.0.1:0 --service llm --latency-ms 500 --usage-tokens 70
wait_line "$WORK/app-llm.out" listening
SIDE=llm sidecar llm --labels "region=local" --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-llm.out")" \
  --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id llm-1
for s in tool1 tool2 llm; do wait_line "$WORK/sidecar-$s.out" listening; wait_ok "http://$(addr "sidecar-$s" admin)/ready"; done
for _ in $(seq 1 100); do [ "$("$BIN/weftctl" endpoints search-tool | grep -c true)" = 2 ] && break; sleep 0.1; done
"$BIN/weftctl" apply -f examples/agent-traffic.yaml --wait
tool_calls() { # path: 12 calls, one line each (status, seconds, x-weft-degraded), then the slowest
  for i in $(seq 1 12); do
    curl -s -o /dev/null -D "$WORK/h" -w '%{http_code} %{time_total}' "http://$ROUTER/call/search-tool$1"
    echo " $(grep -i '^x-weft-degraded' "$WORK/h" | tr -d '\r' | cut -d' ' -f2)"
  done >"$WORK/calls"
  awk '{ printf "  %s %.3f s %s\n", $1, $2, $3 } $2 > max { max = $2 } END { printf "  slowest: %.3f s\n", max }' "$WORK/calls"
}
echo "without hedging (/search):"
tool_calls /search
echo "with hedge: { after: 200ms } (/hedged/search):"
tool_calls /hedged/search

say "agent traffic: a token reservation refuses the call that would overshoot"
echo "acme has 500 tokens a minute at llm; 10 calls at once, each declaring x-weft-max-tokens: 100 (each uses 70):"
for i in $(seq 1 10); do
  curl -s -o /dev/null -D "$WORK/llm-$i" -w '%{http_code}\n' -H 'x-tenant-id: acme' -H 'x-weft-max-tokens: 100' \
    "http://$ROUTER/call/llm/v1/chat" >"$WORK/llm-$i.code" &
done
wait
for i in $(seq 1 10); do
  echo "$(cat "$WORK/llm-$i.code") $(grep -i '^x-weft-error' "$WORK/llm-$i" | tr -d '\r' | cut -d' ' -f2)"
done | sort | uniq -c
USED=$(cat "$WORK"/llm-[0-9]* 2>/dev/null | grep -i '^x-weft-usage-tokens' | tr -d '\r' | awk '{s+=$2} END {print s+0}')
echo "tokens used by the admitted calls: $USED of 500 (a quota charged afterwards would have let all 10 run: 700)"

say "identity: each sidecar's certificate (weftctl status)"
"$BIN/weftctl" status

say "authorization: inference takes calls from agent-router, and only GET /v1/run from batch-agent"
"$BIN/weftctl" apply -f examples/authorization.yaml --wait
"$BIN/weftctl" callers inference
port BO
start app-batch "$BIN/weft-example-service" --listen 127.0.0.1:0 --service batch-agent --outbound "127.0.0.1:$BO"
wait_line "$WORK/app-batch.out" listening
BATCH=$(grep -o '127.0.0.1:[0-9]*' "$WORK/app-batch.out")
SIDE=batch sidecar batch-agent --labels "tenant=globex,region=local" --app "$BATCH" \
  --inbound 127.0.0.1:0 --outbound "127.0.0.1:$BO" --admin 127.0.0.1:0 --id batch-agent-1
wait_line "$WORK/sidecar-batch.out" listening; wait_ok "http://$(addr sidecar-batch admin)/ready"
echo "batch-agent GET /v1/run: $(curl -s -o /dev/null -w '%{http_code}' "http://$BATCH/call/inference/v1/run")"
echo "batch-agent GET /v2/run (no rule allows it):"
curl -s -i "http://$BATCH/call/inference/v2/run" | grep -iE '^(HTTP|x-weft-error)|weft:' || true

say "a forged tenant header gains nothing: batch-agent (tenant globex) says it is acme, 20 calls"
echo "(HTTP status, then the tenant the inference app was told)"
for i in $(seq 1 20); do
  curl -s -o /dev/null -w '%{http_code} ' -D "$WORK/h" -H 'x-tenant-id: acme' "http://$BATCH/call/inference/v1/run"
  grep -i '^echo-x-tenant-id' "$WORK/h" | tr -d '\r' | cut -d' ' -f2 || echo -
done | sort | uniq -c
INF_ADMIN=$(addr sidecar-v1 admin)
echo "at inference v1's sidecar:"
curl -s "http://$INF_ADMIN/metrics" | grep -E '^weft_(authz_denied_total|tenant_shed_total)' || true

say "inference v2's sidecar dies; its endpoint goes and traffic moves to v1"
kill -9 "$(pgrep -f 'weft-proxy.*--id inference-v2')"
for _ in $(seq 1 100); do
  "$BIN/weftctl" endpoints inference | grep -q inference-v2 || break; sleep 0.1
done
"$BIN/weftctl" endpoints inference
for i in $(seq 1 20); do curl -s "http://$ROUTER/call/inference/v1/run"; done | grep -o '"served_by":"[^"]*"' | sort | uniq -c

say "transparent capture: an app that knows nothing of weft calls http://inference:8080/"
# In a network namespace of its own (root is needed): a small mesh (etcd,
# control plane, inference behind its sidecar), an agent sidecar running as
# another user, `weft-proxy init`, and curl as the unchanged app.
if [ "$(id -u)" -ne 0 ] || ! command -v iptables >/dev/null; then
  echo "(skipped: needs root and iptables to make a network namespace and its rules)"
else
  NS=weft-demo-$$
  ip netns add "$NS"
  # A plaintext mesh of its own: not the CA and token of the one above.
  NSX=(ip netns exec "$NS" env -u WEFT_CA_BUNDLE -u WEFT_TOKEN -u WEFT_CONTROL)
  "${NSX[@]}" ip link set lo up
  # Any address is routable from the namespace's own address, as in a pod
  # with a default route.
  "${NSX[@]}" ip addr add 10.88.0.2/32 dev lo
  "${NSX[@]}" ip route add default dev lo src 10.88.0.2
  start ns-etcd "${NSX[@]}" etcd --data-dir "$WORK/etcd-ns" --listen-client-urls "http://127.0.0.1:$EP" \
    --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "default=http://127.0.0.1:$PP" --log-level warn
  start ns-control "${NSX[@]}" "$BIN/weft-control" --etcd "http://127.0.0.1:$EP" --listen 127.0.0.1:0 --admin 127.0.0.1:0
  wait_line "$WORK/ns-control.out" listening
  NSC="http://$(addr ns-control grpc)"
  start ns-app "${NSX[@]}" "$BIN/weft-example-service" --listen 127.0.0.1:0 --service inference --version v1
  wait_line "$WORK/ns-app.out" listening
  start ns-inference "${NSX[@]}" "$BIN/weft-proxy" --control "$NSC" --service inference \
    --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/ns-app.out")" --inbound 127.0.0.1:0 --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --id ns-inference
  start ns-agent "${NSX[@]}" setpriv --reuid 65534 --regid 65534 --clear-groups "$BIN/weft-proxy" --control "$NSC" \
    --service legacy-agent --app 127.0.0.1:9 --inbound 127.0.0.1:0 --outbound 127.0.0.1:4140 --admin 127.0.0.1:0 --id ns-agent \
    --dns 127.0.0.1:4153 --dns-upstream 127.0.0.1:53
  wait_line "$WORK/ns-inference.out" listening; wait_line "$WORK/ns-agent.out" listening
  echo "weft-proxy init --proxy-uid 65534 --dns-port 4153 (the agent sidecar's user, and its DNS port):"
  "${NSX[@]}" "$BIN/weft-proxy" init --proxy-uid 65534 --outbound-port 4140 --inbound-ports 1 --dns-port 4153
  AS_APP=("${NSX[@]}" setpriv --reuid 1000 --regid 1000 --clear-groups)
  for _ in $(seq 1 100); do
    [ "$("${AS_APP[@]}" curl -s -o /dev/null -w '%{http_code}' http://inference:8080/)" = 200 ] && break
    sleep 0.1
  done
  echo "getent hosts inference (the app's resolver, answered by its sidecar with a virtual address):"
  "${AS_APP[@]}" getent hosts inference || true
  echo "curl http://inference:8080/v1/run, 5 times, with nothing but the URL:"
  for i in $(seq 1 5); do "${AS_APP[@]}" curl -s http://inference:8080/v1/run; done
  echo "the agent's sidecar saw them:"
  "${NSX[@]}" curl -s "http://$(addr ns-agent admin)/metrics" | grep -E '^weft_requests_total\{direction="outbound",service="inference"' || true

  say "a deadline across three services: the unchanged app -> tool -> inference"
  # tool is an app that calls inference through its own sidecar and passes
  # on only the trace context; its route gives the whole chain 500 ms.
  port TO
  start ns-tool-app "${NSX[@]}" "$BIN/weft-example-service" --listen 127.0.0.1:0 --service tool --version v1 --outbound "127.0.0.1:$TO"
  wait_line "$WORK/ns-tool-app.out" listening
  start ns-tool "${NSX[@]}" "$BIN/weft-proxy" --control "$NSC" --service tool \
    --app "$(grep -o '127.0.0.1:[0-9]*' "$WORK/ns-tool-app.out")" --inbound 127.0.0.1:0 --outbound "127.0.0.1:$TO" --admin 127.0.0.1:0 --id ns-tool
  wait_line "$WORK/ns-tool.out" listening
  "${NSX[@]}" "$BIN/weftctl" --control "$NSC" apply -f - <<'YAML'
kind: Route
service: tool
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 500ms
---
kind: Route
service: inference
rules:
  - match: { path_prefix: /slow }
    backends: [ { subset: {}, weight: 1 } ]
    timeout: 30s
    fault: { delay: { duration: 3s, percent: 100 } }
  - backends: [ { subset: {}, weight: 1 } ]
YAML
  for _ in $(seq 1 100); do
    [ "$("${AS_APP[@]}" curl -s -o /dev/null -w '%{http_code}' http://tool:8080/)" = 200 ] && break
    sleep 0.1
  done
  echo "inference's own route would wait 30 s, and a 3 s delay is injected on /slow:"
  "${AS_APP[@]}" curl -s -o /dev/null -w 'curl http://tool:8080/call/inference/slow -> %{http_code} after %{time_total} s\n' \
    http://tool:8080/call/inference/slow
  echo "tool's sidecar ended its own call to inference at the chain's deadline (504), not after 3 s:"
  for _ in $(seq 1 50); do
    "${NSX[@]}" curl -s "http://$(addr ns-tool admin)/metrics" | grep -qE '^weft_requests_total\{direction="outbound",service="inference".*code="504"' && break
    sleep 0.1
  done
  "${NSX[@]}" curl -s "http://$(addr ns-tool admin)/metrics" | grep -E '^weft_requests_total\{direction="outbound",service="inference"' || true
  "${NSX[@]}" "$BIN/weft-proxy" init --uninstall
fi

say "done; stopping everything"
