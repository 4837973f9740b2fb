#!/usr/bin/env bash
# Storage benchmark: builds release binaries, starts a server process on
# loopback and measures it from a client (examples/storage_bench.rs).
# Usage: scripts/bench-storage.sh [BLOB_MIB=256] [SMALL_BLOBS=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cargo-distbuild --example storage_bench
exec target/release/examples/storage_bench target/release/cargo-distbuild "${1:-256}" "${2:-10000}"
