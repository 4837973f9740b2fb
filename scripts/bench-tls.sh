#!/usr/bin/env bash
# TLS benchmark: ByteStream upload and download throughput over plaintext
# and over TLS (rustls, ring) in the same run, release build
# (examples/tls_bench.rs). The issue's target: TLS at least 70% of plaintext.
#
# Usage: scripts/bench-tls.sh [BLOB_MIB=256]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example tls_bench
exec target/release/examples/tls_bench "${1:-256}"
