#!/usr/bin/env bash
# Fuzzing (issue 9): builds every cargo-fuzz target in fuzz/ and runs each
# for SECONDS; exits non-zero if any target crashes (the input that did is
# left in fuzz/artifacts/TARGET/; reproduce with
# `cargo fuzz run -O -a --sanitizer none TARGET FILE`, shrink with
# `cargo fuzz tmin`, same flags).
#
# Usage: scripts/fuzz.sh [SECONDS=30] [TARGET...]   (default: every target)
#
# On a stable toolchain: with `--sanitizer none`, cargo-fuzz passes only
# stable flags (-Cpasses=sancov-module, -Cllvm-args=..., --cfg fuzzing), so
# stable builds the targets as they are. cargo-fuzz's default sanitizer,
# AddressSanitizer, needs the nightly-only -Zsanitizer=address; stable
# accepts it with RUSTC_BOOTSTRAP=1 (and ships the ASan runtime). These
# targets are safe Rust over C libraries that cargo-fuzz would not
# instrument anyway, so the default here is none: libFuzzer's coverage
# guidance stays, and panics, aborts, timeouts and out-of-memory are still
# crashes. FUZZ_SANITIZER=address picks ASan (a separate, slower build).
# Builds go to fuzz/target (fuzz/ is its own workspace, not the main one);
# the corpus grows in fuzz/corpus/TARGET, seeded from fuzz/seeds/TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
sanitizer="${FUZZ_SANITIZER:-none}"
if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
flags=(-O -a --sanitizer "$sanitizer")

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "=== building ${#targets[@]} fuzz targets (${SECONDS}s)"
cargo fuzz build "${flags[@]}"

failed=()
for target in "${targets[@]}"; do
  echo "=== fuzzing $target for ${seconds}s (${SECONDS}s)"
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  dirs=("$corpus")
  [ -d "fuzz/seeds/$target" ] && dirs+=("fuzz/seeds/$target")
  # -rss_limit_mb: a target that needs more than 2 GiB for one input is a
  # finding (every decoder here must stay bounded).
  # libFuzzer's progress lines, its recommended dictionary and the warnings
  # about sanitizer hooks (absent without a sanitizer) are left out; its
  # findings are not.
  set +e
  cargo fuzz run "${flags[@]}" "$target" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -v -e '^#[0-9]*[[:space:]]*\(NEW\|REDUCE\|pulse\)' -e '^"' -e '^###### ' -e '^WARNING: Failed to find function'
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || failed+=("$target")
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAIL: fuzz targets crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
echo "PASS: ${#targets[@]} fuzz targets ran ${seconds}s each without a crash (${SECONDS}s in all)"
