#!/usr/bin/env bash
# Builds the original tutorial's Go server and client (interop/go/) into OUT_DIR
# as `go-greet-server` and `go-greet-client`, offline, from Debian's packages:
# golang-go (Go 1.19), golang-google-grpc-dev (grpc-go 1.33),
# golang-goprotobuf-dev (protoc-gen-go with the grpc plugin),
# golang-etcd-server-dev (etcd 3.4's go.etcd.io/etcd/clientv3) and
# protobuf-compiler. GOPATH mode over /usr/share/gocode: nothing is
# downloaded (GOPROXY=off). The generated greet.pb.go lives only in a
# temporary GOPATH, never in the repository. scripts/setup.sh installs the
# packages.
#
# Usage: interop/build-go.sh OUT_DIR
set -euo pipefail

out=${1:?usage: $0 OUT_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gocode=/usr/share/gocode/src

missing=()
command -v go >/dev/null || missing+=("go (Debian package golang-go)")
command -v protoc >/dev/null || missing+=("protoc (Debian package protobuf-compiler)")
command -v protoc-gen-go >/dev/null || missing+=("protoc-gen-go (Debian package golang-goprotobuf-dev)")
[[ -d $gocode/google.golang.org/grpc ]] || missing+=("$gocode/google.golang.org/grpc (Debian package golang-google-grpc-dev)")
[[ -d $gocode/github.com/golang/protobuf/proto ]] || missing+=("$gocode/github.com/golang/protobuf (Debian package golang-goprotobuf-dev)")
[[ -d $gocode/go.etcd.io/etcd/clientv3 ]] || missing+=("$gocode/go.etcd.io/etcd/clientv3 (Debian package golang-etcd-server-dev)")
if ((${#missing[@]})); then
  echo "build-go: cannot build the Go tutorial code offline; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "build-go: run scripts/setup.sh (apt-get install golang-go golang-google-grpc-dev golang-goprotobuf-dev golang-etcd-server-dev protobuf-compiler)" >&2
  exit 2
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/interop-go.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The tutorial's layout: $GOPATH/src/go-git/etcd-demo/{proto,server,client}.
demo=$work/src/go-git/etcd-demo
mkdir -p "$demo/proto" "$demo/server" "$demo/client"
cp -L "$here/go/proto/greet.proto" "$demo/proto/"
cp "$here/go/server/main.go" "$demo/server/"
cp "$here/go/client/main.go" "$demo/client/"
# The tutorial's own command (protoc-gen-go 1.3 with its grpc plugin).
(cd "$demo/proto" && protoc --go_out=plugins=grpc:. greet.proto)

export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOPATH="$work:/usr/share/gocode"
export GOCACHE=${GOCACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/go-build-interop}
(cd "$demo/server" && go build -o "$out/go-greet-server" .)
(cd "$demo/client" && go build -o "$out/go-greet-client" .)
echo "build-go: built $out/go-greet-server and $out/go-greet-client ($(go version))" >&2
