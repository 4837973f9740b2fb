#!/usr/bin/env bash
# Redis store benchmark: ActionCache reads (GetActionResult's storage step)
# and blob operations through the Redis store, beside the bare Redis client
# in the same run (examples/redis_bench.rs), release build. Starts its own
# redis-server on a free loopback port unless given a URL.
# The issue's target: GetActionResult p50 under 1 ms on Redis.
#
# Usage: scripts/bench-redis.sh [REDIS_URL|-] [GETS=10000] [VALUE_BYTES=1024]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example redis_bench
exec target/release/examples/redis_bench "${1:--}" "${2:-10000}" "${3:-1024}"
