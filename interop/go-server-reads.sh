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
# SERVERS=N (default 1) runs N Go servers and sums their counters, as
# bench-vs-go.sh's stacks of 3 do. PPROF=1 also profiles the first server
# with Go's own profiler (its -Pprof flag) over each run but its first 2 s
# and last 1 s, and prints where its CPU went per call (the calls it
# served taken as 1/N of the client's, which the balancers' round robin
# gives), by the functions that differ between the two clients.
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
SERVERS=${SERVERS:-1}
PPROF=${PPROF:-0}
rel=${CARGO_TARGET_DIR:-$root/target}/release
[[ -x $rel/greet-client ]] || { echo "go-server-reads: $rel/greet-client missing; run: cargo build --release -p greet-client" >&2; exit 2; }
for c in etcd etcdctl jq python3 curl go; do
  command -v "$c" >/dev/null || { echo "go-server-reads: $c not found (scripts/setup.sh)" >&2; exit 2; }
done

# shellcheck source=../scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_workdir go-server-reads
"$here/build-go.sh" "$work/bin" >/dev/null 2>&1 || "$here/build-go.sh" "$work/bin"
bench_etcd go-server-reads

servers=()
pprof_addr=
for i in $(seq "$SERVERS"); do
  port=$(free_port)
  extra=()
  if [[ $i == 1 && $PPROF == 1 ]]; then
    pprof_addr=127.0.0.1:$(free_port)
    extra=(-Pprof "$pprof_addr")
  fi
  "$work/bin/go-greet-server" -Port "$port" -EtcdAddr "$etcd_ep" -ServiceName reads -Quiet "${extra[@]}" >"$work/server$i.log" 2>&1 &
  servers+=($!)
  pids+=($!)
done
registered() {
  [[ $(ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" get --prefix /ns/reads/ -w json 2>/dev/null | jq -r '.count // 0' 2>/dev/null) == "$SERVERS" ]]
}
for _ in $(seq 200); do registered && break; sleep 0.05; done
registered || { echo "go-server-reads: the Go servers did not register: $(tail -3 "$work/server1.log")" >&2; exit 1; }

# counters: "cpu_ticks read_syscalls write_syscalls", summed over the servers.
counters() {
  local s cpu=0 r=0 w=0 c
  for s in "${servers[@]}"; do
    read -r -a c <<<"$(awk '{print $14 + $15}' "/proc/$s/stat") $(awk '/^syscr/ {r = $2} /^syscw/ {w = $2} END {print r, w}' "/proc/$s/io")"
    cpu=$((cpu + c[0])) r=$((r + c[1])) w=$((w + c[2]))
  done
  echo "$cpu $r $w"
}

# run CLIENT CONCURRENCY: one table row.
run() {
  local client=$1 conc=$2 before after calls prof_pid=
  if [[ $PPROF == 1 ]]; then
    (sleep 2 && curl -sf -o "$work/$client.$conc.$runs.prof" \
      "http://$pprof_addr/debug/pprof/profile?seconds=$((DURATION - 3))") &
    prof_pid=$!
  fi
  before=$(counters)
  if [[ $client == go ]]; then
    "$work/bin/go-greet-client" -EtcdAddr "$etcd_ep" -ServiceName reads -Bench -Concurrency "$conc" \
      -Duration "${DURATION}s" -Expect "$SERVERS" >"$work/out.json" 2>>"$work/client.log"
  else
    "$rel/greet-client" bench --etcd-endpoints "$etcd_ep" --service reads --concurrency "$conc" \
      --duration "${DURATION}s" --json >"$work/out.json" 2>>"$work/client.log"
  fi
  after=$(counters)
  [[ -z $prof_pid ]] || wait "$prof_pid" || { echo "go-server-reads: no profile from $pprof_addr" >&2; exit 1; }
  calls=$(jq -r '.calls' "$work/out.json")
  [[ $PPROF != 1 ]] || profiles+=("$client $conc $calls $work/$client.$conc.$runs.prof")
  runs=$((runs + 1))
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

runs=0
profiles=()
if [[ $SERVERS == 1 ]]; then
  echo "One Go server; each client ${DURATION}s per run, alternating; per call over the client's whole run"
else
  echo "$SERVERS Go servers (summed); each client ${DURATION}s per run, alternating; per call over the client's whole run"
fi
echo
echo "| concurrency | client | calls | Go server CPU µs / call | server reads / call | server writes / call |"
echo "|---:|---|---:|---:|---:|---:|"
for conc in $LEVELS; do
  for _ in $(seq "$ROUNDS"); do
    run go "$conc"
    run rust "$conc"
  done
done

[[ $PPROF == 1 ]] || exit 0
# Where the first server's CPU went, per call: pprof's cumulative seconds of
# a few functions over the profile window, divided by that window's share
# of the server's calls (the client's calls / SERVERS, prorated).
echo
echo "Go server 1 under Go's profiler ($((DURATION - 3)) s of each run, 100 Hz), CPU µs per call in:"
echo
fns=("syscall.read:read" "syscall.write:write"
  "runtime.findRunnable:scheduler (findRunnable)" "runtime.futex:futex" "runtime.mallocgc:malloc"
  "google.golang.org/grpc/internal/transport.(*http2Server).operateHeaders:operateHeaders"
  "golang.org/x/net/http2/hpack.(*Decoder).Write:HPACK decode"
  "google.golang.org/grpc/internal/transport.(*loopyWriter).run:loopy writer")
header="| concurrency | client | total"
sep="|---:|---|---:"
for f in "${fns[@]}"; do header+=" | ${f#*:}"; sep+="|---:"; done
echo "$header |"
echo "$sep|"
for p in "${profiles[@]}"; do
  read -r client conc calls file <<<"$p"
  top=$(go tool pprof -top -cum -nodecount=100000 "$work/bin/go-greet-server" "$file" 2>/dev/null)
  python3 - "$client" "$conc" "$calls" "$SERVERS" "$DURATION" "$top" "${fns[@]}" <<'EOF'
import re, sys
client, conc, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
servers, duration, top = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
fns = [f.split(":", 1)[0] for f in sys.argv[7:]]
def secs(v):
    m = re.fullmatch(r"([0-9.]+)(s|ms|us|µs)", v)
    if not m:
        return 0.0
    return float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}[m.group(2)]
total = re.search(r"Total samples = ([0-9.]+[mµu]?s)", top)
window = re.search(r"Duration: ([0-9.]+[mµu]?s)", top)
if not total or not window:
    sys.exit(f"go-server-reads: cannot read the profile of {client} at {conc}")
cum = {}
for line in top.splitlines():
    parts = line.split()
    if len(parts) >= 6 and parts[-1] in fns:
        cum[parts[-1]] = secs(parts[3])
served = calls / servers * secs(window.group(1)) / duration
def per(s):
    return f"{s * 1e6 / served:.1f}"
name = {"go": "grpc-go client", "rust": "greet-client"}[client]
print(f"| {conc} | {name} | {per(secs(total.group(1)))} | " + " | ".join(per(cum.get(f, 0.0)) for f in fns) + " |")
EOF
done
