#!/usr/bin/env bash
# The whole system on one machine, with one command:
#
#   ./scripts/demo.sh                      # until Ctrl-C
#   ./scripts/demo.sh --duration 20s       # a bounded run
#   ETCD_ENDPOINTS=127.0.0.1:2379 ./scripts/demo.sh   # against an existing etcd
#
# It starts a real etcd on a free loopback port with a temporary data dir
# (installing Debian's etcd-server through scripts/setup.sh when it is
# missing), three greet-servers on 127.0.0.1:3000-3002 with weights
# 100/200/300 and versions 1.0.0/1.1.0/2.0.0, the controller on
# 127.0.0.1:8080 (and its xDS server on 127.0.0.1:18000, for any gRPC
# client resolving xds:///greet_service, or Envoy), and the client, which
# prints who answered each call.
# Ctrl-C or SIGTERM stops every process it started (servers drain first)
# and removes the temporary directory; with ETCD_ENDPOINTS nothing is
# started in etcd's place and nothing but the servers' own keys is written.
#
# Options (each also as an environment variable):
#   --duration D          stop by itself after D (10s, 1m, 90; DEMO_DURATION)
#   --etcd-endpoints E    use this etcd instead of starting one (ETCD_ENDPOINTS)
#   --base-port P         servers on P, P+1, P+2 (DEMO_BASE_PORT, default 3000)
#   --controller-port P   controller's HTTP port (DEMO_CONTROLLER_PORT, default 8080)
#   --xds-port P          controller's xDS port (DEMO_XDS_PORT, default 18000; with
#                         --controller-port given, one the kernel picks)
#   --bin-dir DIR         use these prebuilt binaries, build nothing (DEMO_BIN_DIR)
#   --debug               build the debug profile instead of release (DEMO_PROFILE=dev)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"

DURATION="${DEMO_DURATION:-}"
ENDPOINTS="${ETCD_ENDPOINTS:-}"
BASE_PORT="${DEMO_BASE_PORT:-3000}"
CONTROLLER_PORT="${DEMO_CONTROLLER_PORT:-8080}"
XDS_PORT="${DEMO_XDS_PORT:-}"
BIN_DIR="${DEMO_BIN_DIR:-}"
PROFILE="${DEMO_PROFILE:-release}"

say() { printf 'demo: %s\n' "$*" >&2; }
die() {
  printf 'demo: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

while (($#)); do
  case "$1" in
    --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
    --duration=*) DURATION="${1#*=}"; shift ;;
    --etcd-endpoints) ENDPOINTS="${2:?--etcd-endpoints needs a value}"; shift 2 ;;
    --etcd-endpoints=*) ENDPOINTS="${1#*=}"; shift ;;
    --base-port) BASE_PORT="${2:?--base-port needs a value}"; shift 2 ;;
    --base-port=*) BASE_PORT="${1#*=}"; shift ;;
    --controller-port) CONTROLLER_PORT="${2:?--controller-port needs a value}"; shift 2 ;;
    --controller-port=*) CONTROLLER_PORT="${1#*=}"; shift ;;
    --xds-port) XDS_PORT="${2:?--xds-port needs a value}"; shift 2 ;;
    --xds-port=*) XDS_PORT="${1#*=}"; shift ;;
    --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}"; shift 2 ;;
    --bin-dir=*) BIN_DIR="${1#*=}"; shift ;;
    --debug) PROFILE=dev; shift ;;
    -h | --help) usage 0 ;;
    *) printf 'demo: unknown argument %q\n\n' "$1" >&2; usage 2 ;;
  esac
done

# Durations as people write them: 20s, 2m, 500ms, or plain seconds.
to_seconds() {
  local d="$1"
  case "$d" in
    *ms) awk -v v="${d%ms}" 'BEGIN { printf "%.3f", v / 1000 }' ;;
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *) echo "$d" ;;
  esac
}
if [[ -n "$DURATION" ]]; then
  DURATION_S="$(to_seconds "$DURATION")"
  [[ "$DURATION_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--duration $DURATION: want e.g. 20s, 2m or 90"
fi
# Side by side demos (other --controller-port) must not fight over 18000.
if [[ -z "$XDS_PORT" ]]; then
  if [[ "$CONTROLLER_PORT" == 8080 ]]; then XDS_PORT=18000; else XDS_PORT=0; fi
fi
[[ "$XDS_PORT" =~ ^[0-9]+$ ]] && ((XDS_PORT < 65536)) || die "bad port $XDS_PORT"
for p in "$BASE_PORT" "$CONTROLLER_PORT"; do
  [[ "$p" =~ ^[0-9]+$ ]] && ((p > 0 && p < 65534)) || die "bad port $p"
done
SERVER_PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
WEIGHTS=(100 200 300)
VERSIONS=(1.0.0 1.1.0 2.0.0)

# True when something accepts connections on 127.0.0.1:$1 (or listens on
# that port on any address).
port_busy() {
  if command -v ss >/dev/null; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
who_listens() {
  command -v ss >/dev/null || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/ (\1)/p' | head -1
}

# Refuse to start anything when a fixed port is taken: the servers and the
# controller would fail one by one with less helpful messages.
busy=()
fixed=("${SERVER_PORTS[@]}" "$CONTROLLER_PORT")
((XDS_PORT == 0)) || fixed+=("$XDS_PORT")
for p in "${fixed[@]}"; do
  if port_busy "$p"; then busy+=("127.0.0.1:$p$(who_listens "$p")"); fi
done
if ((${#busy[@]})); then
  die "port(s) already in use: ${busy[*]}. Stop what listens there (an earlier demo?) or choose other ports with --base-port N / --controller-port N / --xds-port N."
fi

# --- binaries -------------------------------------------------------------
if [[ -z "$BIN_DIR" ]]; then
  command -v cargo >/dev/null || die "cargo not found; install Rust (rustup) or pass --bin-dir"
  if ! "$ROOT/scripts/setup.sh" check >/dev/null 2>&1; then
    say "the build's tools are missing (protoc with the well-known types, a C compiler); installing them (scripts/setup.sh demo)"
    "$ROOT/scripts/setup.sh" demo
  fi
  target="${CARGO_TARGET_DIR:-$ROOT/target}"
  if [[ "$PROFILE" == release ]]; then
    say "building release binaries (the first build takes a few minutes)"
    (cd "$ROOT" && cargo build --release --locked -q -p greet-server -p greet-client -p controller)
    BIN_DIR="$target/release"
  else
    say "building debug binaries"
    (cd "$ROOT" && cargo build --locked -q -p greet-server -p greet-client -p controller)
    BIN_DIR="$target/debug"
  fi
fi
for b in greet-server greet-client controller; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b is missing or not executable"
done

# --- cleanup: stop everything we started, newest first ---------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/greet-demo.XXXXXX")"
say "temp dir:    $WORK (logs and etcd data; removed at exit)"
PIDS=()   # in start order
NAMES=()
CLEANED=0
cleanup() {
  local rc=$?
  ((CLEANED)) && return
  CLEANED=1
  trap '' INT TERM
  if ((${#PIDS[@]})); then
    say "stopping (servers drain first; this takes a few seconds)"
  fi
  local i pid
  # Client first, then servers and controller together, etcd last.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    [[ "${NAMES[$i]}" == etcd ]] && continue
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    [[ "${NAMES[$i]}" == client ]] && wait "${PIDS[$i]}" 2>/dev/null || true
  done
  # Bounded wait (drain 2s + shutdown), then SIGKILL what is left.
  local deadline=$((SECONDS + 15))
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    [[ "${NAMES[$i]}" == etcd ]] && continue
    pid="${PIDS[$i]}"
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    [[ "${NAMES[$i]}" == etcd ]] || continue
    pid="${PIDS[$i]}"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((rc != 0)) && [[ -n "${KEEP_LOGS_ON_ERROR:-}" ]]; then
    say "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  say "stopped everything; removed $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG PROGRAM ARGS...: in its own session so a terminal's Ctrl-C
# reaches only this script, which then stops everything in order.
start() {
  local name="$1" log="$2"
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  PIDS+=("$!")
  NAMES+=("$name")
}

# alive NAME PID LOG: fail with the log's tail when the process has exited.
alive() {
  kill -0 "$2" 2>/dev/null && return 0
  printf 'demo: error: %s exited early; the end of its log (%s):\n' "$1" "$3" >&2
  tail -n 20 "$3" >&2 || true
  exit 1
}

# wait_port NAME PID LOG PORT [RETRY]: wait until PORT accepts; with RETRY, a
# process that exited with RETRY in its log returns 1 instead of failing.
wait_port() {
  local deadline=$((SECONDS + 30))
  until (exec 3<>"/dev/tcp/127.0.0.1/$4") 2>/dev/null; do
    if [[ -n ${5:-} ]] && ! kill -0 "$2" 2>/dev/null && grep -q "$5" "$3"; then
      return 1
    fi
    alive "$1" "$2" "$3"
    ((SECONDS < deadline)) || die "$1 did not listen on 127.0.0.1:$4 within 30s (log: $3)"
    sleep 0.1
  done
}

# --- etcd -------------------------------------------------------------------
if [[ -z "$ENDPOINTS" ]]; then
  if ! command -v etcd >/dev/null; then
    say "etcd is missing; installing Debian's etcd-server (scripts/setup.sh)"
    "$ROOT/scripts/setup.sh" demo
  fi
  # Below the kernel's ephemeral range (32768 and up by default), so no
  # outgoing connection holds it; another process may still take a port
  # between the check and etcd's bind, so a bind failure picks again.
  pick_port() {
    local p
    for _ in $(seq 200); do
      p=$((20000 + RANDOM % 12000))
      port_busy "$p" || { echo "$p"; return; }
    done
    die "found no free loopback port for etcd"
  }
  etcd_up=0
  for _ in 1 2 3 4 5; do
    client_port="$(pick_port)"
    peer_port="$(pick_port)"
    [[ "$peer_port" != "$client_port" ]] || peer_port=$((client_port + 1))
    rm -rf "$WORK/etcd-data"
    start etcd "$WORK/etcd.log" etcd --name demo --data-dir "$WORK/etcd-data" \
      --listen-client-urls "http://127.0.0.1:$client_port" \
      --advertise-client-urls "http://127.0.0.1:$client_port" \
      --listen-peer-urls "http://127.0.0.1:$peer_port" \
      --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
      --initial-cluster "demo=http://127.0.0.1:$peer_port"
    if wait_port etcd "${PIDS[-1]}" "$WORK/etcd.log" "$client_port" "address already in use"; then
      etcd_up=1
      break
    fi
    say "etcd: a port was taken before etcd could bind it; picking others"
    unset 'PIDS[-1]' 'NAMES[-1]'
  done
  ((etcd_up)) || die "etcd found no free loopback ports in 5 attempts (log: $WORK/etcd.log)"
  ENDPOINTS="127.0.0.1:$client_port"
  say "etcd         $ENDPOINTS (data in $WORK/etcd-data)"
else
  say "etcd         $ENDPOINTS (given; not started here)"
  if command -v etcdctl >/dev/null &&
    ! ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --dial-timeout 3s --command-timeout 3s \
      endpoint health >/dev/null 2>&1; then
    say "warning: etcd at $ENDPOINTS does not answer (yet); the servers register once it does"
  fi
fi
export ETCD_ENDPOINTS="$ENDPOINTS"

# --- servers, controller, client --------------------------------------------
for i in 0 1 2; do
  port="${SERVER_PORTS[$i]}"
  start "server-$port" "$WORK/server-$port.log" "$BIN_DIR/greet-server" \
    --listen "127.0.0.1:$port" --weight "${WEIGHTS[$i]}" \
    --service-version "${VERSIONS[$i]}" --etcd-endpoints "$ENDPOINTS" \
    --metrics-listen 127.0.0.1:0
done
start controller "$WORK/controller.log" "$BIN_DIR/controller" \
  --listen "127.0.0.1:$CONTROLLER_PORT" --xds-listen "127.0.0.1:$XDS_PORT" \
  --etcd-endpoints "$ENDPOINTS"
for ((i = 0; i < ${#PIDS[@]}; i++)); do
  case "${NAMES[$i]}" in
    server-*) wait_port "${NAMES[$i]}" "${PIDS[$i]}" "$WORK/${NAMES[$i]}.log" "${NAMES[$i]#server-}" ;;
    controller) wait_port controller "${PIDS[$i]}" "$WORK/controller.log" "$CONTROLLER_PORT" ;;
  esac
done

# Let the three registrations land before the client's first list, so its
# first lines already show every server (the client would pick them up
# from its watch anyway).
registered() {
  local n
  if command -v curl >/dev/null; then
    n="$(curl -fsS --max-time 2 "http://127.0.0.1:$CONTROLLER_PORT/services" 2>/dev/null |
      grep -oE "\"127\.0\.0\.1:(${SERVER_PORTS[0]}|${SERVER_PORTS[1]}|${SERVER_PORTS[2]})\"" | sort -u | wc -l)" || n=0
  elif command -v etcdctl >/dev/null; then
    n="$(ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --command-timeout 2s get --prefix --keys-only \
      /ns/greet_service/ 2>/dev/null | grep -cE ":(${SERVER_PORTS[0]}|${SERVER_PORTS[1]}|${SERVER_PORTS[2]})$")" || n=0
  else
    sleep 2
    return 0
  fi
  ((n >= 3))
}
deadline=$((SECONDS + 20))
until registered; do
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    alive "${NAMES[$i]}" "${PIDS[$i]}" "$WORK/${NAMES[$i]}.log"
  done
  if ((SECONDS >= deadline)); then
    say "warning: the controller does not list all three servers after 20s; starting the client anyway"
    break
  fi
  sleep 0.2
done

# Metrics on ports the kernel chose (no fixed port to collide with): each
# server logs where.
metrics_urls=()
for port in "${SERVER_PORTS[@]}"; do
  m="$(grep -oE 'metrics=[0-9.]+:[0-9]+' "$WORK/server-$port.log" | head -1)" || true
  [[ -n "$m" ]] && metrics_urls+=("http://${m#metrics=}/metrics")
done

say "servers      127.0.0.1:${SERVER_PORTS[0]} (weight 100, v1.0.0), 127.0.0.1:${SERVER_PORTS[1]} (weight 200, v1.1.0), 127.0.0.1:${SERVER_PORTS[2]} (weight 300, v2.0.0)"
say "controller   http://127.0.0.1:$CONTROLLER_PORT/ (live membership page)"
say "look:        curl 127.0.0.1:$CONTROLLER_PORT/services"
if ((XDS_PORT == 0)); then
  x="$(grep -oE 'serving xDS.*listen=127\.0\.0\.1:[0-9]+' "$WORK/controller.log" | head -1 | grep -oE '[0-9]+$')" || true
  XDS_PORT="${x:-?}"
fi
say "xds          127.0.0.1:$XDS_PORT (bootstrap: $BIN_DIR/controller xds-bootstrap --server 127.0.0.1:$XDS_PORT; docs/xds.md)"
say "             grpcurl -plaintext 127.0.0.1:${SERVER_PORTS[0]} list   (server reflection)"
((${#metrics_urls[@]})) && say "metrics:     ${metrics_urls[*]} and http://127.0.0.1:$CONTROLLER_PORT/metrics"
say "             etcdctl --endpoints $ENDPOINTS get --prefix /ns/"
say "logs:        $WORK/*.log"
say "client below prints who answered each call; Ctrl-C stops everything${DURATION:+ (or it stops by itself after $DURATION)}"

# The client's replies go to this script's stdout, its logs to client.log.
setsid "$BIN_DIR/greet-client" --etcd-endpoints "$ENDPOINTS" --interval 500ms \
  2>"$WORK/client.log" </dev/null &
PIDS+=("$!")
NAMES+=(client)

if [[ -n "$DURATION" ]]; then
  end=$((SECONDS + ${DURATION_S%.*}))
fi
while :; do
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    alive "${NAMES[$i]}" "${PIDS[$i]}" "$WORK/${NAMES[$i]}.log"
  done
  if [[ -n "$DURATION" ]] && ((SECONDS >= end)); then
    say "--duration $DURATION is over"
    break
  fi
  sleep 0.5 &
  wait $! || true
done
exit 0
