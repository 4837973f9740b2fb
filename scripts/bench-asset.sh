#!/usr/bin/env bash
# Remote Asset benchmark: builds the release server, then FetchBlob of a
# large archive from a loopback HTTP server beside curl of the same URL, and
# the cached FetchBlob latency (examples/asset_bench.rs).
#
# Usage: scripts/bench-asset.sh [SIZE_MIB=100] [RUNS=3] [ITERATIONS=2000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cargo-distbuild --example asset_bench
exec target/release/examples/asset_bench target/release/cargo-distbuild "${1:-100}" "${2:-3}" "${3:-2000}"
