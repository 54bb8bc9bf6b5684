#!/usr/bin/env bash
# Proves "a fresh Debian machine with Rust and nothing else" in a clean
# root instead of on this machine, whose earlier installs hide missing
# steps. As root:
#
#   e2e/clean-root.sh            # setup.sh demo in a minbase bookworm root, its checks, a build
#   CLEAN_ROOT_DEMO=1 e2e/clean-root.sh   # ...then the README's demo command from a fresh
#                                         # clone inside the root, timed (a cold release build)
#   CLEAN_ROOT_TEST=1 e2e/clean-root.sh   # ...then the test profile: `setup.sh check-test`
#                                         # must fail, `setup.sh test` must install everything
#                                         # the tests run, and `setup.sh check-test` must pass
#
# Steps, each timed (`step <name> <seconds>` lines on stdout):
#   1. debootstrap --variant=minbase bookworm (the minbase tarball is cached
#      in /var/cache/greet-etcd so later runs unpack it instead of
#      downloading; it holds minbase and nothing else);
#   2. `setup.sh check` in the bare root must FAIL, naming protoc (the
#      checker catches what it exists for);
#   3. `setup.sh demo`, then `setup.sh check` must pass;
#   4. the build: `cargo build -p etcd-client` (the crate whose build script
#      needs protoc and the well-known types; ring needs cc) with the
#      host's Rust toolchain and crate cache bind-mounted, offline;
#   5. libprotobuf-dev removed: `setup.sh check` must FAIL naming it.
# Everything runs in a private mount namespace (unshare -m), so no bind
# mount outlives the script; the root is deleted at the end.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${CLEAN_ROOT_CACHE:-/var/cache/greet-etcd}"
MIRROR="${CLEAN_ROOT_MIRROR:-http://deb.debian.org/debian}"
TARBALL="$CACHE/bookworm-minbase.tgz"

say() { printf 'clean-root: %s\n' "$*" >&2; }
die() {
  printf 'clean-root: error: %s\n' "$*" >&2
  exit 1
}
[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap not found (scripts/setup.sh installs it)"
command -v cargo >/dev/null || die "cargo not found"

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/clean-root.XXXXXX")"
R="$WORK/root"
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT

t0=$SECONDS
timed() { # timed NAME: prints the step's wall time since the last mark
  echo "step $1 $((SECONDS - t0))"
  t0=$SECONDS
}

# --- 1. the root ----------------------------------------------------------
if [[ ! -s "$TARBALL" ]]; then
  say "downloading minbase bookworm (cached in $TARBALL for later runs)"
  debootstrap --variant=minbase --make-tarball="$TARBALL.part" bookworm "$WORK/tarball" "$MIRROR" >/dev/null
  mv "$TARBALL.part" "$TARBALL"
  rm -rf "$WORK/tarball"
fi
say "unpacking minbase bookworm into $R"
debootstrap --variant=minbase --unpack-tarball="$TARBALL" bookworm "$R" "$MIRROR" >/dev/null
timed debootstrap
cp /etc/resolv.conf "$R/etc/resolv.conf"
# Packages must not start services inside the root (etcd-server would).
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod +x "$R/usr/sbin/policy-rc.d"
cp "$ROOT_DIR/scripts/setup.sh" "$R/setup.sh"

# in_root CMD...: runs CMD in the root with /proc, the host's Rust toolchain
# and crate cache, and the checkout (read-only) mounted, in a private mount
# namespace; PATH as a fresh login would have it plus cargo's bin.
RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
in_root() {
  unshare -m bash -euo pipefail -c '
    R="$1"; shift
    mount -t proc proc "$R/proc"
    mkdir -p "$R/rust/rustup" "$R/rust/cargo" "$R/src"
    mount --bind "$RUSTUP_HOME" "$R/rust/rustup"
    mount --bind "$CARGO_HOME" "$R/rust/cargo"
    mount --bind -o ro "$SRC" "$R/src"
    exec chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb \
      PATH=/rust/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      RUSTUP_HOME=/rust/rustup CARGO_HOME=/rust/cargo "$@"
  ' in_root "$R" "$@"
}
export RUSTUP_HOME CARGO_HOME
export SRC="$ROOT_DIR"

# --- 2. the checker catches a bare root ------------------------------------
if out="$(in_root /setup.sh check 2>&1)"; then
  die "setup.sh check passed in a bare minbase root:\n$out"
fi
grep -q "protobuf-compiler" <<<"$out" || die "the bare root's check does not name protobuf-compiler:\n$out"
echo "bare-root check failed as it should: $(grep -c 'check failed' <<<"$out") failures"

# --- 3. setup.sh demo, then its checks --------------------------------------
in_root /setup.sh demo || die "setup.sh demo failed in the clean root"
timed setup-demo
in_root /setup.sh check || die "setup.sh check failed after setup.sh demo"
echo "check after setup.sh demo: ok"

# --- 4. the build etcd-client's build script needs --------------------------
in_root bash -c 'cd /src && CARGO_TARGET_DIR=/tmp/target cargo build -q --offline --locked -p etcd-client' ||
  die "building etcd-client in the clean root failed"
timed build-etcd-client
echo "etcd-client built in the clean root: ok"

# --- optional: the README's demo command from a fresh clone -----------------
if [[ -n "${CLEAN_ROOT_DEMO:-}" ]]; then
  in_root bash -c 'apt-get install -y -qq --no-install-recommends git ca-certificates >/dev/null' || die "git"
  in_root git clone -q /src /clone
  timed clone
  in_root bash -c 'cd /clone && CARGO_NET_OFFLINE=true ./scripts/demo.sh --duration 20s' >"$WORK/demo.log" 2>&1 ||
    { tail -30 "$WORK/demo.log" >&2; die "the demo failed in the clean root"; }
  timed demo-build-and-20s-run
  grep -E "answered|demo:" "$WORK/demo.log" | tail -5
fi

# --- optional: the test profile --------------------------------------------
if [[ -n "${CLEAN_ROOT_TEST:-}" ]]; then
  if out="$(in_root /setup.sh check-test 2>&1)"; then
    die "setup.sh check-test passed before setup.sh test:\n$out"
  fi
  grep -q "chromium" <<<"$out" || die "check-test before setup.sh test does not name chromium:\n$out"
  echo "check-test before setup.sh test failed as it should: $(grep -c 'check failed' <<<"$out") failures"
  # The network's own requirement, not the project's: behind a
  # TLS-intercepting egress proxy (as here) pip needs the proxy's CA, which
  # the host keeps in /usr/local/share/ca-certificates. A machine on an open
  # network has none and skips this.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    in_root bash -c 'apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null 2>&1'
    mkdir -p "$R/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
    in_root update-ca-certificates >/dev/null 2>&1
    echo "the host's local CAs installed in the root (for pip behind the egress proxy)"
  fi
  in_root /setup.sh test || die "setup.sh test failed in the clean root"
  timed setup-test
  in_root /setup.sh check-test || die "setup.sh check-test failed after setup.sh test"
  echo "check-test after setup.sh test: ok"
fi

# --- 5. the checker catches a missing libprotobuf-dev -----------------------
in_root bash -c 'apt-get remove -y -qq libprotobuf-dev >/dev/null'
if out="$(in_root /setup.sh check 2>&1)"; then
  die "setup.sh check passed without libprotobuf-dev"
fi
grep -q "libprotobuf-dev" <<<"$out" || die "the check does not name libprotobuf-dev:\n$out"
echo "check without libprotobuf-dev failed as it should, naming it"
echo "clean-root: ok"
