#!/usr/bin/env bash
# FindMissingBlobs of 10,000 digests on tiered(filesystem, S3), with and
# without the existence cache in front of S3, through a server in one
# process (examples/find_missing_bench.rs). It starts s3s-fs itself
# (cargo install s3s-fs --version 0.14.1 --locked --features binary).
# The issue's target: under 20 ms warm with the existence cache.
#
# Usage: scripts/bench-find-missing.sh [DIGESTS=10000] [ROUNDS=20]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v s3s-fs >/dev/null || { echo "s3s-fs is not installed (cargo install s3s-fs --features binary)" >&2; exit 1; }
cargo build --release --quiet --example find_missing_bench
RUST_LOG=error target/release/examples/find_missing_bench "$@"
