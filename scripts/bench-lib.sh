# Shared by the shell benchmarks (interop/bench-vs-go.sh,
# bench/server-instructions.sh), sourced after `set -euo pipefail`:
#   bench_workdir NAME    a temporary $work, and $pids, killed (with -9)
#                         and removed when the script exits;
#   free_port             a free loopback port from the kernel;
#   bench_etcd NAME       a private single-member etcd in $work; sets
#                         $etcd_ep (host:port) once it answers, else exits;
#   h2load_morning PORT N [h2load flags...]
#                         N gRPC-framed Greet/Morning calls, -c 4 -m 16 -t 1;
#   morning_body, GRPC_HEADERS
#                         that request (a file) and its headers, for nghttp.

GRPC_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers')

bench_workdir() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bench_etcd() {
  local cport pport
  cport=$(free_port) pport=$(free_port)
  etcd_ep=127.0.0.1:$cport
  etcd --name bench --data-dir "$work/etcd" \
    --listen-client-urls "http://$etcd_ep" --advertise-client-urls "http://$etcd_ep" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "bench=http://127.0.0.1:$pport" >"$work/etcd.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" endpoint health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1: etcd did not start: $(tail -5 "$work/etcd.log")" >&2
  exit 1
}

# morning_body: the path of GreetRequest{name: "world"} behind gRPC's
# 5-byte prefix (uncompressed, big-endian length 7), written once.
morning_body() {
  [[ -f $work/morning.grpc ]] || printf '\x00\x00\x00\x00\x07\x0a\x05world' >"$work/morning.grpc"
  echo "$work/morning.grpc"
}

h2load_morning() {
  local port=$1 n=$2 body
  shift 2
  body=$(morning_body)
  h2load -n "$n" -c 4 -m 16 -t 1 -d "$body" "${GRPC_HEADERS[@]}" "$@" "http://127.0.0.1:$port/Greet/Morning"
}
