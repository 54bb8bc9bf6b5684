#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, then
# format check, clippy (warnings are errors) and every test. Tests start
# their own etcd processes on free loopback ports and stop them.
#
# CARGO_TARGET_DIR defaults to a cache outside the checkout so repeated runs
# (and CI's fresh clones) reuse the build.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

if [[ -z "${CARGO_TARGET_DIR:-}" ]]; then
  if mkdir -p /var/cache/greet-etcd/target 2>/dev/null && [[ -w /var/cache/greet-etcd/target ]]; then
    export CARGO_TARGET_DIR=/var/cache/greet-etcd/target
  fi
fi

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc (warnings are errors)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== cargo package (the library crates a user adds, verified)" >&2
# cargo verifies etcd-lb against etcd-lb-registry from a temporary local
# registry, and treats that crate as immutable by name and version: its
# unpacked source under CARGO_HOME and its compiled artifacts are reused by
# a later run at the same version, which would then verify etcd-lb against
# the old source. So packaging builds in a target dir of its own, whose
# etcd-lb artifacts (and the unpacked source) are dropped first;
# third-party dependencies stay cached there.
pkg_target="${CARGO_TARGET_DIR:-$PWD/target}-package"
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/etcd-lb-registry-* \
  "$pkg_target"/debug/.fingerprint/etcd-lb-* "$pkg_target"/debug/deps/*etcd_lb* "$pkg_target/package"
CARGO_TARGET_DIR="$pkg_target" cargo package -p etcd-lb-registry -p etcd-lb --locked --allow-dirty --quiet
echo "== fuzz: greet-server's authority layer against an independent HPACK decoder (bounded)" >&2
./reliability/fuzz/run.sh "${FUZZ_SECONDS:-60}" authority
echo "== cargo test" >&2
cargo test --workspace --locked --no-fail-fast "$@"
