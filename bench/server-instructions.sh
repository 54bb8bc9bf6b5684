#!/usr/bin/env bash
# Server instructions per unary Morning call under h2load, under callgrind:
# one greet-server (metrics on, registered in a private etcd) run by
# valgrind, loaded by h2load (Debian's nghttp2-client, neither our client
# nor Go's) with gRPC-framed Morning calls, -c 4 -m 16 -t 1, as
# interop/bench-vs-go.sh does. Two runs, at CALLS_LO and CALLS_HI calls
# after the same warm-up; the difference divided by the difference in calls
# is the server's cost of one call, start-up and registration cancelled
# out. Repeatable where req/s is not: use it to compare server builds
# (issue 14, point 5). The Go server cannot be counted this way: Go's
# runtime stops under valgrind.
#
# Needs valgrind, etcd and etcdctl, h2load, curl, python3 and the release greet-server:
#   cargo build --release -p greet-server
# Usage: bench/server-instructions.sh   (env: CALLS_LO=2000, CALLS_HI=12000)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release/greet-server
[[ -x $bin ]] || { echo "server-instructions: $bin missing; run: cargo build --release -p greet-server" >&2; exit 2; }
for c in valgrind etcd etcdctl h2load curl python3; do
  command -v "$c" >/dev/null || { echo "server-instructions: $c not found (scripts/setup.sh)" >&2; exit 2; }
done
CALLS_LO=${CALLS_LO:-2000}
CALLS_HI=${CALLS_HI:-12000}
(( CALLS_HI > CALLS_LO )) || { echo "server-instructions: CALLS_HI must exceed CALLS_LO" >&2; exit 2; }

# shellcheck source=../scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_workdir server-instructions
bench_etcd server-instructions

# count CALLS: the server's instructions over a run of CALLS calls.
count() {
  local calls=$1 sport mport vp i out
  sport=$(free_port) mport=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.$calls" "$bin" --listen "127.0.0.1:$sport" \
    --etcd-endpoints "http://$etcd_ep" --service "instr_$calls" --metrics-listen "127.0.0.1:$mport" \
    --ttl 5s --drain 0s >"$work/server.$calls.log" 2>&1 &
  vp=$!
  pids+=($vp)
  for i in $(seq 200); do
    curl -fs "http://127.0.0.1:$mport/metrics" 2>/dev/null | grep -q '^greet_server_registered 1' && break
    sleep 0.2
  done
  h2load_morning "$sport" 500 >/dev/null
  out=$(h2load_morning "$sport" "$calls")
  grep -q "$calls succeeded, 0 failed, 0 errored" <<<"$out" ||
    { echo "server-instructions: not every call succeeded: $(grep '^requests' <<<"$out")" >&2; exit 1; }
  kill -TERM "$vp"
  wait "$vp" 2>/dev/null || true
  awk '/^summary:/ {print $2}' "$work/cg.$calls"*
}

lo=$(count "$CALLS_LO")
hi=$(count "$CALLS_HI")
echo "### Server instructions per call (callgrind, one greet-server with metrics on, h2load -c 4 -m 16 -t 1)"
echo
echo "| calls | instructions | per call |"
echo "| ----: | -----------: | -------: |"
echo "| $CALLS_LO | $lo | |"
echo "| $CALLS_HI | $hi | $(( (hi - lo) / (CALLS_HI - CALLS_LO) )) |"
echo
echo "Per call: (Ir at $CALLS_HI calls - Ir at $CALLS_LO calls) / $((CALLS_HI - CALLS_LO)), the server process only."
