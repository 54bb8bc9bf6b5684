#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine, and
# nothing that is already there: a real etcd (Debian's etcd-server, plus
# etcdctl), protoc for etcd-client's build script. Idempotent.
set -euo pipefail

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)

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
