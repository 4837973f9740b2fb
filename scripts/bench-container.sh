#!/usr/bin/env bash
# Container benchmark (examples/container_bench.rs): builds release binaries,
# then, against the real Docker Engine here,
#  1. uncached Execute round trips of `true`, host sandbox beside a container
#     (distbuild-busybox:latest, and distbuild-debian:bookworm if present),
#     alternating in the same run: p50/p90/p99 and the container overhead;
#  2. the first action of a fresh worker whose image the engine has, and
#     whose image it must first pull from a registry (Debian's
#     docker-registry on a loopback port), each beside the second action.
#
# Usage: scripts/bench-container.sh [ITERATIONS=100]   (as root, like the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
docker image inspect distbuild-busybox:latest >/dev/null 2>&1 || deploy/images.sh
cargo build --release --quiet --bin cargo-distbuild --bin distbuild-action-init --example container_bench
bench=target/release/examples/container_bench
server=target/release/cargo-distbuild

echo "== latency: busybox"
"$bench" "$server" latency docker://distbuild-busybox:latest "$n"
if docker image inspect distbuild-debian:bookworm >/dev/null 2>&1; then
  echo; echo "== latency: debian (minbase)"
  "$bench" "$server" latency docker://distbuild-debian:bookworm "$n"
fi

echo; echo "== first action, image in the engine"
"$bench" "$server" first docker://distbuild-busybox:latest

command -v docker-registry >/dev/null || { echo "docker-registry is not installed: no cold-pull figure"; exit 0; }
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$dir/config.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $dir/data}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$dir/config.yml" >/dev/null 2>&1 &
registry=$!
cold=127.0.0.1:$port/bench/debian:cold
cleanup() { kill "$registry" 2>/dev/null || true; docker rmi "$cold" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
# The larger image when there is one: a pull of 117 MB, not 2 MB. The layer
# must be new to the engine, so the registry copy is re-made from a fresh
# export (same files, another layer digest than the local image's).
src=distbuild-busybox:latest
docker image inspect distbuild-debian:bookworm >/dev/null 2>&1 && src=distbuild-debian:bookworm
ctr=$(docker create "$src" /bin/true)
docker export "$ctr" | docker import - "$cold" >/dev/null
docker rm "$ctr" >/dev/null
docker push "$cold" >/dev/null
docker rmi "$cold" >/dev/null
echo; echo "== first action, image pulled from a loopback registry ($src, $(du -sh "$dir/data" | cut -f1) in the registry)"
"$bench" "$server" first "docker://$cold"
