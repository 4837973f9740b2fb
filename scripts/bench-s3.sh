#!/usr/bin/env bash
# S3 benchmark: ByteStream upload and download of one large blob through a
# server whose CAS is the S3 store, beside the same bytes written and read
# directly with object_store, in the same run (examples/s3_bench.rs).
# The issue's target: through the server at least 70% of direct.
#
# Starts s3s-fs (cargo install s3s-fs --features binary) on a free loopback
# port over a temporary directory, unless S3_ENDPOINT and S3_BUCKET name
# another server (credentials then from AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY).
#
# Usage: scripts/bench-s3.sh [BLOB_MIB=256]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example s3_bench
if [ -z "${S3_ENDPOINT:-}" ]; then
  command -v s3s-fs >/dev/null || { echo "s3s-fs is not installed (cargo install s3s-fs --features binary)" >&2; exit 1; }
  root=$(mktemp -d -p "${TMPDIR:-/tmp}" distbuild-s3-bench.XXXXXX)
  while :; do
    port=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
  done
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
  S3_BUCKET=bench
  mkdir -p "$root/$S3_BUCKET"
  RUST_LOG=error s3s-fs --host 127.0.0.1 --port "$port" \
    --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$root" &
  s3s_pid=$!
  trap 'kill $s3s_pid 2>/dev/null; wait $s3s_pid 2>/dev/null; rm -rf "$root"' EXIT
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  S3_ENDPOINT="http://127.0.0.1:$port"
fi
target/release/examples/s3_bench "$S3_ENDPOINT" "$S3_BUCKET" "${1:-256}"
