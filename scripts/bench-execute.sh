#!/usr/bin/env bash
# Execution benchmark: builds release binaries, starts a server process with
# its built-in workers on loopback and measures Execute latency (uncached and
# cached) and throughput from a client (examples/execute_bench.rs), beside
# the cost of spawning the same process locally; then cached Execute latency
# with metrics recorded and not ([server] metrics), side by side, with a
# control (a second server without metrics: the noise floor).
#
# Usage: scripts/bench-execute.sh [ITERATIONS=500] [CONCURRENCY=64]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cargo-distbuild --bin distbuild-action-init --example execute_bench
exec target/release/examples/execute_bench target/release/cargo-distbuild "${1:-500}" "${2:-64}"
