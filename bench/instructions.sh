#!/usr/bin/env bash
# Client instructions per unary Morning call, by variant, under callgrind:
#   plain     a tonic Channel (scenario 1's (a))
#   balancer  etcd-lb's Balancer over the same one server ((b))
#   h2        hyper's HTTP/2 sender on one connection ((d))
# Each variant runs twice per concurrency, at CALLS_LO and CALLS_HI calls
# (defaults 2000 and 12000) after the same warm-up; the difference divided
# by the difference in calls is the cost of one call, with start-up and
# connecting cancelled out. The server is `greet-bench serve`, run natively
# in its own process, so only the client is counted. Instruction counts
# repeat to well under 1 % between runs, where wall time on this machine
# moves by 10-30 %: use this to compare builds and variants (issue 14).
#
# Needs valgrind and the release greet-bench:
#   cargo build --release -p greet-bench
# Usage: bench/instructions.sh   (env: LEVELS="1 16", VARIANTS="plain balancer h2",
#                                 CALLS_LO, CALLS_HI, TIMEOUT=1s for a
#                                 grpc-timeout on every call, as greet-client sets)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release/greet-bench
[[ -x $bin ]] || { echo "instructions: $bin missing; run: cargo build --release -p greet-bench" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions: valgrind not found (scripts/setup.sh)" >&2; exit 2; }
LEVELS=${LEVELS:-"1 16"}
VARIANTS=${VARIANTS:-"plain balancer h2"}
CALLS_LO=${CALLS_LO:-2000}
CALLS_HI=${CALLS_HI:-12000}
(( CALLS_HI > CALLS_LO )) || { echo "instructions: CALLS_HI must exceed CALLS_LO" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/instructions.XXXXXX")
server=
cleanup() {
  [[ -z $server ]] || kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" serve >"$work/addr" 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do [[ -s $work/addr ]] && break; sleep 0.05; done
addr=$(head -1 "$work/addr")
[[ -n $addr ]] || { echo "instructions: server did not start: $(cat "$work/serve.log")" >&2; exit 1; }

# Instructions of one run of `calls`.
count() {
  local variant=$1 conc=$2 n=$3 out="$work/cg.$1.$2.$3"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" calls --target "$addr" --variant "$variant" --calls "$n" --concurrency "$conc" ${TIMEOUT:+--timeout "$TIMEOUT"} \
    >"$out.stdout" 2>"$out.stderr" ||
    { echo "instructions: $variant c=$conc n=$n failed: $(tail -3 "$out.stderr")" >&2; exit 1; }
  grep -q '^failed 0$' "$out.stdout" ||
    { echo "instructions: $variant c=$conc n=$n: calls failed: $(cat "$out.stdout")" >&2; exit 1; }
  awk '/^summary:/ {print $2}' "$out"
}

echo "### Client instructions per call (callgrind, unary Morning, one greet-bench serve${TIMEOUT:+, grpc-timeout $TIMEOUT})"
echo
echo "| concurrency | variant | instructions per call | ÷ plain |"
echo "| ----------: | :------ | --------------------: | ------: |"
for c in $LEVELS; do
  plain=
  for v in $VARIANTS; do
    lo=$(count "$v" "$c" "$CALLS_LO")
    hi=$(count "$v" "$c" "$CALLS_HI")
    per=$(( (hi - lo) / (CALLS_HI - CALLS_LO) ))
    [[ $v != plain ]] || plain=$per
    ratio=-
    [[ -z $plain ]] || ratio=$(awk -v a="$per" -v b="$plain" 'BEGIN {printf "%.3f", a / b}')
    echo "| $c | $v | $per | $ratio |"
  done
done
echo
echo "Each figure: (Ir at $CALLS_HI calls - Ir at $CALLS_LO calls) / $(( CALLS_HI - CALLS_LO )), the client process only."
