#!/usr/bin/env bash
# Execution benchmark: builds release binaries, starts a server process with
# its built-in workers on loopback and measures Execute latency (uncached and
# cached) and throughput from a client (examples/execute_bench.rs), beside
# the cost of spawning the same process locally; then cached Execute latency
# with metrics recorded and not ([server] metrics), side by side, with a
# control (a second server without metrics: the noise floor).
#
# With --replicas: throughput through two replicas sharing a scheduler
# state on Redis against one server on the memory state (it starts its own
# redis-server).
#
# Usage: scripts/bench-execute.sh [ITERATIONS=500] [CONCURRENCY=64]
#        scripts/bench-execute.sh --replicas [CONCURRENCY=64]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cargo-distbuild --bin distbuild-action-init --example execute_bench
if [ "${1:-}" = --replicas ]; then
  exec target/release/examples/execute_bench "$PWD/target/release/cargo-distbuild" --replicas "${2:-64}"
fi
exec target/release/examples/execute_bench "$PWD/target/release/cargo-distbuild" "${1:-500}" "${2:-64}"
