#!/usr/bin/env bash
# Storage benchmark: builds release binaries, starts a server process on
# loopback and measures it from a client (examples/storage_bench.rs), then
# the same uploads with metrics recorded and not ([server] metrics), side
# by side with their ratio and a control (a second server without metrics:
# the noise floor).
#
# Usage: scripts/bench-storage.sh [BLOB_MIB=256] [SMALL_BLOBS=10000]
#
# WARM_GB=N first writes and deletes an N GiB scratch file. On a virtual
# machine, the first write into guest memory the host has not backed yet
# is several times slower than later writes (here: dd at 360 MB/s cold,
# 4.4 GB/s when repeated), which makes page-cache-bound figures depend on
# what ran before. Warming measures the server, not the hypervisor; the
# default (0) measures the machine as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cargo-distbuild --example storage_bench
if [ "${WARM_GB:-0}" -gt 0 ]; then
  scratch=$(mktemp -p "${TMPDIR:-/tmp}" distbuild-warm.XXXXXX)
  dd if=/dev/zero of="$scratch" bs=1M count=$((WARM_GB * 1024)) status=none
  rm -f "$scratch"
fi
exec target/release/examples/storage_bench target/release/cargo-distbuild "${1:-256}" "${2:-10000}"
