#!/usr/bin/env bash
# Fuzzes the registry schema parsers and greet-server's authority layer for
# a bounded time (default 60 s per target): ./run.sh [seconds] [target...]
# Seeds in seeds/<target>/ and a dictionary <target>.dict are used when
# present; the corpus grows in corpus/<target>/.
#
# Uses cargo-fuzz when installed; otherwise builds the targets with the same
# flags cargo-fuzz passes (nightly, SanitizerCoverage, AddressSanitizer) and
# runs the libFuzzer binaries directly. Findings land in artifacts/<target>/
# and the command exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(parse_value parse_key authority)
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/greet-etcd/target-fuzz}"

# A target's seed directory and dictionary, when it has them.
seeds() { if [[ -d "seeds/$1" ]]; then printf '%s\n' "seeds/$1"; fi; }
dict() { if [[ -f "$1.dict" ]]; then printf '%s\n' "-dict=$1.dict"; fi; }

if cargo fuzz --version >/dev/null 2>&1; then
  for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    mapfile -t more < <(seeds "$t")
    mapfile -t args < <(dict "$t")
    cargo +nightly fuzz run "$t" "corpus/$t" "${more[@]}" -- \
      -max_total_time="$secs" -rss_limit_mb=1024 "${args[@]}"
  done
  exit 0
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks"
cargo +nightly build --release --target "$triple" --bins
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  mapfile -t more < <(seeds "$t")
  mapfile -t args < <(dict "$t")
  "$CARGO_TARGET_DIR/$triple/release/$t" "corpus/$t" "${more[@]}" "${args[@]}" \
    -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -rss_limit_mb=1024 -max_len=200000
done
