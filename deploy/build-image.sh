#!/usr/bin/env bash
# Builds the cargo-distbuild image from binaries already built, without the
# rust image or any registry: deploy/Dockerfile's `prebuilt` target on
# BASE_IMAGE (default distbuild-debian:bookworm, from deploy/images.sh).
#
#   deploy/build-image.sh [BIN_DIR] [TAG]
#     BIN_DIR  holds cargo-distbuild, distbuild-action-init, distbuild-rustc
#              (default target/debug)
#     TAG      the image to make (default cargo-distbuild:local)
#
# The build context is a temporary directory holding only what the
# Dockerfile copies (the two config files and the binaries, hard-linked when
# possible), so nothing of target/ is sent but the three binaries.
# DISTBUILD_STRIP=1 strips their debug info first (smaller image, no
# file/line numbers in backtraces).
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${1:-target/debug}
tag=${2:-cargo-distbuild:local}
base=${BASE_IMAGE:-distbuild-debian:bookworm}
binaries=(cargo-distbuild distbuild-action-init distbuild-rustc)

log() { printf 'build-image.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for b in "${binaries[@]}"; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing (cargo build -p cargo-distbuild -p distbuild-rustc)"
done
docker image inspect "$base" >/dev/null 2>&1 ||
  die "base image $base is not in the engine (deploy/images.sh makes distbuild-debian:bookworm)"

ctx=$(mktemp -d /tmp/distbuild-context.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/deploy/config" "$ctx/deploy/prebuilt"
cp deploy/config/shared-cache.toml "$ctx/deploy/config/"
cp deploy/tokens.toml "$ctx/deploy/"
for b in "${binaries[@]}"; do
  if [ "${DISTBUILD_STRIP:-0}" = 1 ]; then
    strip --strip-debug -o "$ctx/deploy/prebuilt/$b" "$bin_dir/$b"
  else
    ln "$bin_dir/$b" "$ctx/deploy/prebuilt/$b" 2>/dev/null || cp "$bin_dir/$b" "$ctx/deploy/prebuilt/$b"
  fi
done

start=$SECONDS
log "docker build --target prebuilt --build-arg BASE_IMAGE=$base -t $tag ($(du -sh --apparent-size "$ctx" | cut -f1) context)"
DOCKER_BUILDKIT=0 docker build -q -f deploy/Dockerfile --target prebuilt \
  --build-arg BASE_IMAGE="$base" --label org.opencontainers.image.source=cargo-distbuild \
  -t "$tag" "$ctx" >/dev/null
log "$tag built in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%d MB", $1 / 1e6 }'))"
