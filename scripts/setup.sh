#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine, and
# nothing that is already there: a real etcd (Debian's etcd-server, plus
# etcdctl), protoc for etcd-client's build script; for the e2e checks
# kubectl (Debian's kubernetes-client: `kubectl kustomize`),
# kubernetes-validate (PyPI), buildah and musl-tools plus the
# x86_64-unknown-linux-musl Rust target (the image build); chromium for the
# controller's browser test; Go and Debian's Go packages for the interop
# tests (interop/build-go.sh). Idempotent.
set -euo pipefail

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
# Test certificates for the TLS tests (testkit::Pki) are made at test time.
command -v openssl >/dev/null || need+=(openssl)
command -v setsid >/dev/null || need+=(util-linux)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v buildah >/dev/null || need+=(buildah)
command -v musl-gcc >/dev/null || need+=(musl-tools)
command -v chromium >/dev/null || need+=(chromium)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
# The original Go tutorial server and client for the interop tests and the
# baseline (interop/build-go.sh builds them offline, GOPATH mode over
# /usr/share/gocode): Go 1.19, grpc-go, protoc-gen-go, etcd 3.4's clientv3.
command -v go >/dev/null || need+=(golang-go)
[[ -d /usr/share/gocode/src/google.golang.org/grpc ]] || need+=(golang-google-grpc-dev)
command -v protoc-gen-go >/dev/null || need+=(golang-goprotobuf-dev)
[[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ]] || need+=(golang-etcd-server-dev)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's package starts a system etcd on 2379; tests use their own on
  # free ports, so leave the system one alone if it runs, but never rely on it.
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup)" >&2; exit 1; }

# Static binaries for the FROM scratch images (e2e/tests/images.rs).
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  echo "setup: adding the Rust target x86_64-unknown-linux-musl" >&2
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 ||
    echo "setup: warning: could not add x86_64-unknown-linux-musl; the image test will fail" >&2
fi

# Schema validation of the rendered manifests (e2e/tests/manifests.rs);
# pinned so the schemas it carries do not change under the tests.
KUBERNETES_VALIDATE=1.37.0
if ! python3 -m kubernetes_validate --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE"; then
  command -v python3 >/dev/null || { echo "setup: python3 not found (needed for kubernetes-validate)" >&2; exit 1; }
  echo "setup: installing kubernetes-validate $KUBERNETES_VALIDATE (pip)" >&2
  python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE" 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "kubernetes-validate==$KUBERNETES_VALIDATE"
  command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true
fi
