#!/usr/bin/env bash
# Baseline against the original Go design, same machine, same load:
#   (i)  the tutorial's Go client (etcd resolver + grpc-go round_robin)
#        over 3 of the tutorial's Go servers;
#   (ii) greet-client bench over 3 greet-servers (release build);
# at concurrency 16 and 64 for DURATION each (default 10s), then
#   (iii) failover: SIGKILL of one of the 3 servers FAILOVER_AT (default 3s)
#        into a DURATION run at concurrency 16, for both stacks: failed calls.
# Everything runs on loopback against a private etcd on free ports. Every
# measured run is repeated REPEAT times (default 1), the stacks alternating,
# and the ratio row compares medians.
#
# Needs: etcd, etcdctl, jq, python3, Go + Debian's Go packages
# (scripts/setup.sh), and the release binaries:
#   cargo build --release -p greet-server -p greet-client
# which are looked for in $CARGO_TARGET_DIR/release (or target/release).
#
# Usage: interop/bench-vs-go.sh            (env: DURATION, REPEAT, FAILOVER_AT)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-1}
FAILOVER_AT=${FAILOVER_AT:-3}
rel=${CARGO_TARGET_DIR:-$root/target}/release
for b in greet-server greet-client; do
  [[ -x $rel/$b ]] || { echo "bench-vs-go: $rel/$b missing; run: cargo build --release -p greet-server -p greet-client" >&2; exit 2; }
done
for c in etcd etcdctl jq python3; do
  command -v "$c" >/dev/null || { echo "bench-vs-go: $c not found (scripts/setup.sh)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-go.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$here/build-go.sh" "$work/bin" 2>/dev/null || "$here/build-go.sh" "$work/bin"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cport=$(free_port) pport=$(free_port)
etcd_ep=127.0.0.1:$cport
etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "http://$etcd_ep" --advertise-client-urls "http://$etcd_ep" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "bench=http://127.0.0.1:$pport" >"$work/etcd.log" 2>&1 &
pids+=($!)
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" "$@"; }
for _ in $(seq 100); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
ctl endpoint health >/dev/null 2>&1 || { echo "bench-vs-go: etcd did not start: $(tail -5 "$work/etcd.log")" >&2; exit 1; }

run=0
servers=()
# start_servers STACK SERVICE: three servers registered under SERVICE.
start_servers() {
  local stack=$1 service=$2 port
  servers=()
  for _ in 1 2 3; do
    port=$(free_port)
    if [[ $stack == go ]]; then
      "$work/bin/go-greet-server" -Port "$port" -EtcdAddr "$etcd_ep" -ServiceName "$service" -Quiet \
        >"$work/$service-$port.log" 2>&1 &
    else
      "$rel/greet-server" --listen "127.0.0.1:$port" --etcd-endpoints "$etcd_ep" --service "$service" \
        --ttl 5s --drain 0s >"$work/$service-$port.log" 2>&1 &
    fi
    servers+=($!)
    pids+=($!)
  done
  for _ in $(seq 200); do
    [[ $(ctl get --prefix "/ns/$service/" -w json 2>/dev/null | jq -r '.count // 0' 2>/dev/null) == 3 ]] && return 0
    sleep 0.05
  done
  echo "bench-vs-go: $stack servers of $service did not register" >&2
  exit 1
}

stop_servers() {
  for p in "${servers[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  { for p in "${servers[@]}"; do wait "$p" || true; done; } 2>/dev/null
  servers=()
}

# client STACK SERVICE CONCURRENCY: one JSON line normalised to
# {calls, errors, rps, p50_ms, p99_ms}.
client() {
  local stack=$1 service=$2 conc=$3
  if [[ $stack == go ]]; then
    "$work/bin/go-greet-client" -EtcdAddr "$etcd_ep" -ServiceName "$service" -Bench \
      -Concurrency "$conc" -Duration "${DURATION}s" -Expect 3 2>>"$work/client.log" |
      jq -c '{calls, errors, rps, p50_ms, p99_ms}'
  else
    "$rel/greet-client" bench --etcd-endpoints "$etcd_ep" --service "$service" \
      --concurrency "$conc" --duration "${DURATION}s" --json 2>>"$work/client.log" |
      jq -c '{calls, errors, rps: .throughput, p50_ms: (.p50_us / 1000), p99_ms: (.p99_us / 1000)}'
  fi
}

results=$work/results.jsonl
measure() {
  local stack=$1 conc=$2 service out
  run=$((run + 1))
  service=bench_${stack}_${run}
  start_servers "$stack" "$service"
  out=$(client "$stack" "$service" "$conc")
  stop_servers
  jq -c --arg stack "$stack" --argjson conc "$conc" '. + {stack: $stack, conc: $conc}' <<<"$out" >>"$results"
  echo "  $stack c=$conc: $out" >&2
}

failover() {
  local stack=$1 service out cpid
  run=$((run + 1))
  service=bench_${stack}_${run}
  start_servers "$stack" "$service"
  client "$stack" "$service" 16 >"$work/failover.out" &
  cpid=$!
  pids+=($cpid)
  sleep "$FAILOVER_AT"
  kill -KILL "${servers[0]}"
  { wait "$cpid"; } 2>/dev/null
  out=$(cat "$work/failover.out")
  stop_servers
  jq -c --arg stack "$stack" '. + {stack: $stack, conc: 16, failover: true}' <<<"$out" >>"$results"
  echo "  $stack failover: $out" >&2
}

echo "bench-vs-go: $(nproc) cores, ${DURATION}s per run, $REPEAT repeat(s), etcd on $etcd_ep" >&2
for _ in $(seq "$REPEAT"); do
  for conc in 16 64; do
    measure go "$conc"
    measure rust "$conc"
  done
done
for _ in $(seq "$REPEAT"); do
  failover go
  failover rust
done

python3 - "$results" "$DURATION" "$FAILOVER_AT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
dur, at = sys.argv[2], sys.argv[3]
name = {"go": "Go client + 3 Go servers", "rust": "greet-client + 3 greet-servers"}
def med(xs): return statistics.median(xs)
print(f"Throughput and latency ({dur} s per run, 3 servers, loopback; medians over runs)")
print()
print("| stack | concurrency | runs | calls/s | p50 ms | p99 ms | errors |")
print("|---|---:|---:|---:|---:|---:|---:|")
for conc in (16, 64):
    m = {}
    for stack in ("go", "rust"):
        rs = [r for r in rows if r["stack"] == stack and r["conc"] == conc and not r.get("failover")]
        m[stack] = (med([r["rps"] for r in rs]), med([r["p50_ms"] for r in rs]), med([r["p99_ms"] for r in rs]))
        print(f"| {name[stack]} | {conc} | {len(rs)} | {m[stack][0]:.0f} | {m[stack][1]:.3f} | {m[stack][2]:.3f} | {sum(r['errors'] for r in rs)} |")
    g, r = m["go"], m["rust"]
    print(f"| **ratio Rust / Go** | {conc} | | **{r[0]/g[0]:.2f}x** | {r[1]/g[1]:.2f}x | **{r[2]/g[2]:.2f}x** | |")
print()
print("All runs (calls/s, p50 ms, p99 ms):")
print()
for r in rows:
    if not r.get("failover"):
        print(f"- {r['stack']:4} c={r['conc']:<3} {r['rps']:9.0f} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} errors={r['errors']}")
print()
print(f"Failover (SIGKILL of 1 of 3 servers {at} s into a {dur} s run, concurrency 16)")
print()
print("| stack | run | calls | failed calls |")
print("|---|---:|---:|---:|")
for stack in ("go", "rust"):
    for i, r in enumerate([r for r in rows if r["stack"] == stack and r.get("failover")], 1):
        print(f"| {name[stack]} | {i} | {r['calls']} | {r['errors']} |")
EOF
