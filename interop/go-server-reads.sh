#!/usr/bin/env bash
# What each client costs one original Go server (issue 14, point 3): the Go
# client's load loop and `greet-client bench`, alternating, ROUNDS times
# (default 2) at each of LEVELS (default "16 64"), DURATION each (default
# 6s), against one Go server (-Quiet) with a private etcd. Per call, from
# the server's /proc counters over each client's whole run (so no tracer
# slows anything): its CPU time (user + system), and its read and write
# syscalls (/proc/PID/io syscr, syscw). A read is one wake-up of the Go
# server's reader for whatever the client wrote since the last one, so
# reads per call say how finely the client spreads its writes.
#
# Needs what interop/bench-vs-go.sh needs (scripts/setup.sh), and
#   cargo build --release -p greet-client
# Usage: interop/go-server-reads.sh   (env: LEVELS, ROUNDS, DURATION)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
LEVELS=${LEVELS:-16 64}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
rel=${CARGO_TARGET_DIR:-$root/target}/release
[[ -x $rel/greet-client ]] || { echo "go-server-reads: $rel/greet-client missing; run: cargo build --release -p greet-client" >&2; exit 2; }
for c in etcd etcdctl jq python3; do
  command -v "$c" >/dev/null || { echo "go-server-reads: $c not found (scripts/setup.sh)" >&2; exit 2; }
done

# shellcheck source=../scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_workdir go-server-reads
"$here/build-go.sh" "$work/bin" >/dev/null 2>&1 || "$here/build-go.sh" "$work/bin"
bench_etcd go-server-reads

port=$(free_port)
"$work/bin/go-greet-server" -Port "$port" -EtcdAddr "$etcd_ep" -ServiceName reads -Quiet >"$work/server.log" 2>&1 &
server=$!
pids+=("$server")
registered() {
  [[ $(ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" get --prefix /ns/reads/ -w json 2>/dev/null | jq -r '.count // 0' 2>/dev/null) == 1 ]]
}
for _ in $(seq 200); do registered && break; sleep 0.05; done
registered || { echo "go-server-reads: the Go server did not register: $(tail -3 "$work/server.log")" >&2; exit 1; }

# counters: "cpu_ticks read_syscalls write_syscalls" of the server.
counters() {
  echo "$(awk '{print $14 + $15}' "/proc/$server/stat") $(awk '/^syscr/ {r = $2} /^syscw/ {w = $2} END {print r, w}' "/proc/$server/io")"
}

# run CLIENT CONCURRENCY: one table row.
run() {
  local client=$1 conc=$2 before after calls
  before=$(counters)
  if [[ $client == go ]]; then
    "$work/bin/go-greet-client" -EtcdAddr "$etcd_ep" -ServiceName reads -Bench -Concurrency "$conc" \
      -Duration "${DURATION}s" -Expect 1 >"$work/out.json" 2>>"$work/client.log"
  else
    "$rel/greet-client" bench --etcd-endpoints "$etcd_ep" --service reads --concurrency "$conc" \
      --duration "${DURATION}s" --json >"$work/out.json" 2>>"$work/client.log"
  fi
  after=$(counters)
  calls=$(jq -r '.calls' "$work/out.json")
  python3 - "$client" "$conc" "$calls" "$(getconf CLK_TCK)" $before $after <<'EOF'
import sys
client, conc, calls, tck = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
b = [int(x) for x in sys.argv[5:8]]
a = [int(x) for x in sys.argv[8:11]]
name = {"go": "grpc-go client", "rust": "greet-client"}[client]
print(f"| {conc} | {name} | {calls} | "
      f"{(a[0] - b[0]) / tck * 1e6 / calls:.1f} | {(a[1] - b[1]) / calls:.3f} | {(a[2] - b[2]) / calls:.3f} |")
EOF
}

echo "One Go server; each client ${DURATION}s per run, alternating; per call over the client's whole run"
echo
echo "| concurrency | client | calls | Go server CPU µs / call | server reads / call | server writes / call |"
echo "|---:|---|---:|---:|---:|---:|"
for conc in $LEVELS; do
  for _ in $(seq "$ROUNDS"); do
    run go "$conc"
    run rust "$conc"
  done
done
