#!/usr/bin/env bash
# Builds the three images (greet-server, greet-client, controller) from the
# Dockerfile: static musl binaries in FROM scratch images, tagged
# localhost/greet-etcd/<name>:<workspace version> as manifests/ expects, and
# loads them into a local cluster when one is found.
#
#   ./scripts/build-images.sh               # docker if its daemon answers, else buildah
#   ./scripts/build-images.sh --from-host   # build the binaries here, then FROM scratch only
#                                           # (no base image to pull: works offline)
#   ./scripts/build-images.sh --no-load     # build only
#
# Options (also as environment variables):
#   --builder docker|buildah   (BUILDER) default: docker when `docker info` works, else buildah
#   --from-host                (FROM_HOST=1) cargo build --target x86_64-unknown-linux-musl on
#                              this machine and copy the binaries (the Dockerfile's
#                              BINARIES=prebuilt), instead of its Rust build stage
#   --load kind|k3d|minikube|none  (LOAD) default: every one of them whose cluster is found
#   --out DIR                  (OUT_DIR) also write each image as DIR/<name>.tar (docker-archive)
#   --tag T                    (TAG) default: the workspace version
#
# buildah runs without a daemon, as root or rootless: --storage-driver vfs
# --isolation chroot, so it works in containers and CI machines too.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

BUILDER="${BUILDER:-}"
FROM_HOST="${FROM_HOST:-0}"
LOAD="${LOAD:-auto}"
OUT_DIR="${OUT_DIR:-}"
TAG="${TAG:-}"
IMAGES=(greet-server greet-client controller)
REPO=localhost/greet-etcd

say() { printf 'build-images: %s\n' "$*" >&2; }
die() {
  printf 'build-images: error: %s\n' "$*" >&2
  exit 1
}

while (($#)); do
  case "$1" in
    --builder) BUILDER="${2:?}"; shift 2 ;;
    --from-host) FROM_HOST=1; shift ;;
    --load) LOAD="${2:?}"; shift 2 ;;
    --no-load) LOAD=none; shift ;;
    --out) OUT_DIR="${2:?}"; shift 2 ;;
    --tag) TAG="${2:?}"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if [[ -z "$TAG" ]]; then
  TAG="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)"
  [[ -n "$TAG" ]] || die "cannot read the workspace version from Cargo.toml; pass --tag"
fi

if [[ -z "$BUILDER" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    BUILDER=docker
  elif command -v buildah >/dev/null; then
    BUILDER=buildah
  else
    die "neither a Docker daemon nor buildah found: install buildah (apt-get install buildah) or start Docker"
  fi
fi
case "$BUILDER" in
  docker) command -v docker >/dev/null || die "docker not found" ;;
  buildah) command -v buildah >/dev/null || die "buildah not found: apt-get install buildah" ;;
  *) die "--builder must be docker or buildah" ;;
esac
BUILDAH=(buildah --storage-driver vfs)

# --- the build context -------------------------------------------------------
CTX="$ROOT"
BUILD_ARGS=()
TMP=""
cleanup() { [[ -z "$TMP" ]] || rm -rf "$TMP"; }
trap cleanup EXIT
if ((FROM_HOST)); then
  target=x86_64-unknown-linux-musl
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    say "adding the Rust target $target"
    rustup target add "$target" || die "cannot add $target (rustup); install it, or build with docker"
  fi
  command -v musl-gcc >/dev/null || die "musl-gcc not found (ring builds C): apt-get install musl-tools"
  "$ROOT/scripts/setup.sh" check || die "the build's tools are missing: ./scripts/setup.sh installs them"
  say "building static binaries for $target (release)"
  cargo build --release --locked --target "$target" -p greet-server -p greet-client -p controller
  bin="${CARGO_TARGET_DIR:-$ROOT/target}/$target/release"
  TMP="$(mktemp -d)"
  mkdir -p "$TMP/bin"
  for b in "${IMAGES[@]}"; do
    cp "$bin/$b" "$TMP/bin/$b"
    # The release profile keeps line tables for backtraces; an image needs none.
    if command -v strip >/dev/null; then strip "$TMP/bin/$b"; fi
    # A binary that needs a loader or libc.so would fail in FROM scratch.
    if command -v file >/dev/null && ! file -L "$TMP/bin/$b" | grep -q "static"; then
      die "$bin/$b is not statically linked: $(file -L "$TMP/bin/$b")"
    fi
  done
  CTX="$TMP"
  BUILD_ARGS=(--build-arg BINARIES=prebuilt)
fi

# --- build -----------------------------------------------------------------
BEFORE=""
[[ "$BUILDER" != buildah ]] || BEFORE="$("${BUILDAH[@]}" containers -q 2>/dev/null | tr '\n' ' ')"
for img in "${IMAGES[@]}"; do
  ref="$REPO/$img:$TAG"
  say "building $ref with $BUILDER"
  if [[ "$BUILDER" == docker ]]; then
    DOCKER_BUILDKIT=1 docker build "${BUILD_ARGS[@]}" --target "$img" -t "$ref" -f "$ROOT/Dockerfile" "$CTX"
  else
    "${BUILDAH[@]}" build --isolation chroot --layers=false "${BUILD_ARGS[@]}" \
      --target "$img" -t "$ref" -f "$ROOT/Dockerfile" "$CTX"
  fi
  if [[ -n "$OUT_DIR" ]]; then
    mkdir -p "$OUT_DIR"
    rm -f "$OUT_DIR/$img.tar"
    if [[ "$BUILDER" == docker ]]; then
      docker save -o "$OUT_DIR/$img.tar" "$ref"
    else
      "${BUILDAH[@]}" push "$ref" "docker-archive:$OUT_DIR/$img.tar:$ref"
    fi
    say "wrote $OUT_DIR/$img.tar"
  fi
done

# buildah leaves a working container (and an untagged image) behind for the
# pass-through `binaries` stage: remove the ones this run made.
if [[ "$BUILDER" == buildah ]]; then
  for c in $("${BUILDAH[@]}" containers -q 2>/dev/null); do
    [[ " $BEFORE " == *" $c "* ]] || "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true
  done
  "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
fi

# --- load into a local cluster ----------------------------------------------
archive() { # IMG -> path of a docker-archive tar (made when needed)
  local img="$1" ref="$REPO/$1:$TAG"
  if [[ -n "$OUT_DIR" ]]; then
    echo "$OUT_DIR/$img.tar"
    return
  fi
  [[ -n "$TMP" ]] || TMP="$(mktemp -d)"
  local tar="$TMP/$img.tar"
  if [[ ! -f "$tar" ]]; then
    if [[ "$BUILDER" == docker ]]; then
      docker save -o "$tar" "$ref"
    else
      "${BUILDAH[@]}" push "$ref" "docker-archive:$tar:$ref" >/dev/null
    fi
  fi
  echo "$tar"
}

loaded=0
want() { [[ "$LOAD" == auto || ",$LOAD," == *",$1,"* ]]; }
if [[ "$LOAD" != none ]]; then
  if want kind && command -v kind >/dev/null; then
    for c in $(kind get clusters 2>/dev/null); do
      for img in "${IMAGES[@]}"; do
        say "loading $img into kind cluster $c"
        kind load image-archive "$(archive "$img")" --name "$c"
      done
      loaded=1
    done
  fi
  if want k3d && command -v k3d >/dev/null; then
    for c in $(k3d cluster list --no-headers 2>/dev/null | awk '{print $1}'); do
      for img in "${IMAGES[@]}"; do
        say "loading $img into k3d cluster $c"
        k3d image import "$(archive "$img")" --cluster "$c"
      done
      loaded=1
    done
  fi
  if want minikube && command -v minikube >/dev/null && minikube status >/dev/null 2>&1; then
    for img in "${IMAGES[@]}"; do
      say "loading $img into minikube"
      minikube image load "$(archive "$img")"
    done
    loaded=1
  fi
  ((loaded)) || say "no kind, k3d or minikube cluster found: images built, not loaded (push them to your registry and retag in manifests/kustomization.yaml)"
fi

for img in "${IMAGES[@]}"; do
  echo "$REPO/$img:$TAG"
done
