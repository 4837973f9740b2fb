#!/usr/bin/env bash
# What the action sandbox costs a real cargo build through the rustc wrapper.
#
# Subject: this repository at HEAD (SUBJECT=/path/to/workspace builds another
# one). Each row is a cold build (`cargo clean`, empty server, empty wrapper
# cache, CARGO_INCREMENTAL=0, dev profile) against a fresh server whose
# built-in worker runs every action:
#   none       [worker] sandbox = "none"   (plain processes, as before)
#   sandboxed  [worker] sandbox = "auto"   (the default: namespaces, run_as)
# ROUNDS=2 runs none, sandboxed, sandboxed, none (drift cancels out).
#
# Usage: scripts/bench-sandbox.sh          (about 10 minutes a round on 2 cores)
# Env:   BENCH_DIR (default /tmp/distbuild-bench-sandbox), SUBJECT, JOBS, ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
B=${BENCH_DIR:-/tmp/distbuild-bench-sandbox}
JOBS=${JOBS:-$(nproc)}
ROUNDS=${ROUNDS:-1}
rm -rf "$B"
mkdir -p "$B"

echo "== building cargo-distbuild, distbuild-rustc and the action init (release)"
cargo build --release --quiet --bin cargo-distbuild --bin distbuild-rustc --bin distbuild-action-init
DB=$REPO/target/release/cargo-distbuild

S=$B/subject
mkdir -p "$S"
if [ -n "${SUBJECT:-}" ]; then
    (cd "$SUBJECT" && tar --exclude=./target -cf - .) | tar -xf - -C "$S"
else
    git -C "$REPO" archive HEAD | tar -xf - -C "$S"
fi
(cd "$S" && cargo fetch --quiet)

export CARGO_INCREMENTAL=0
unset RUSTC_WRAPPER DISTBUILD_SERVER DISTBUILD_CONFIG || true
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true' EXIT

declare -A SUM COUNT
run() { # MODE SANDBOX_SETTING
    local mode=$1 setting=$2 run_dir port t0 t
    run_dir=$B/run-$mode-$RANDOM
    mkdir -p "$run_dir"
    printf '[worker]\nsandbox = "%s"\n' "$setting" > "$run_dir/config.toml"
    port=$(free_port)
    "$DB" server --config "$run_dir/config.toml" --listen "127.0.0.1:$port" --data-dir "$run_dir/server" \
        > "$run_dir/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    grep -m1 -i "sandbox" "$run_dir/server.log" || true
    (cd "$S" && cargo clean --quiet)
    t0=$(now)
    (cd "$S" && XDG_STATE_HOME=$run_dir/state DISTBUILD_CACHE_DIR=$run_dir/wrapper-cache \
        "$DB" build --server "grpc://127.0.0.1:$port" --offline -j "$JOBS" > "$run_dir/build.log" 2>&1) \
        || { echo "$mode build failed, see $run_dir/build.log"; tail -20 "$run_dir/build.log"; exit 1; }
    t=$(python3 -c "print($(now) - $t0)")
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
    tail -1 "$run_dir/build.log"
    printf '%-10s cold build %7.1f s\n' "$mode" "$t"
    SUM[$mode]=$(python3 -c "print(${SUM[$mode]:-0} + $t)")
    COUNT[$mode]=$(( ${COUNT[$mode]:-0} + 1 ))
}

for _ in $(seq "$ROUNDS"); do
    run none none
    run sandboxed auto
    if [ "$ROUNDS" -gt 1 ]; then
        run sandboxed auto
        run none none
    fi
done
python3 - "${SUM[none]}" "${COUNT[none]}" "${SUM[sandboxed]}" "${COUNT[sandboxed]}" <<'EOF'
import sys
n, nc, s, sc = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
n, s = n / nc, s / sc
print(f"mean cold build: none {n:.1f} s, sandboxed {s:.1f} s ({100.0 * (s - n) / n:+.1f}%)")
EOF
