#!/usr/bin/env bash
# Makes the base images that deploy/Dockerfile and the container tests use,
# from Debian packages on this machine, for hosts that cannot pull from a
# registry:
#
#   distbuild-busybox:latest   FROM scratch: Debian's busybox-static as
#                              /bin/busybox, a symlink per applet, /tmp,
#                              /etc/passwd and /etc/group with root and nobody.
#   distbuild-debian:bookworm  A Debian bookworm rootfs from
#                              `debootstrap --variant=minbase`, imported with
#                              `docker import`: the BASE_IMAGE of the server
#                              image here (it has /bin/sh, useradd, bash).
#
# Usage (as root: debootstrap and the Docker socket need it):
#   deploy/images.sh            # make whichever image is missing
#   deploy/images.sh --force    # make both again
#
# Idempotent: an image already in the engine is kept (CI caches them). With
# DISTBUILD_IMAGE_CACHE=DIR it also keeps `docker save` tarballs in DIR and
# loads from there before building, for CI caches that hold files, not
# engine state.
#
# Needs: docker, busybox-static (for /bin/busybox), debootstrap, and a Debian
# mirror (DEBIAN_MIRROR, default: this machine's apt source, else
# deb.debian.org). Names: DISTBUILD_BUSYBOX_IMAGE, DISTBUILD_DEBIAN_IMAGE.
set -euo pipefail

BUSYBOX_IMAGE=${DISTBUILD_BUSYBOX_IMAGE:-distbuild-busybox:latest}
DEBIAN_IMAGE=${DISTBUILD_DEBIAN_IMAGE:-distbuild-debian:bookworm}
SUITE=bookworm
CACHE_DIR=${DISTBUILD_IMAGE_CACHE:-}
FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { printf 'images.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is it running, and are you root?)"

tmp=$(mktemp -d /tmp/distbuild-images.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# The mirror apt uses here (deb822 or one-line sources), else the default.
mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m=""
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
      /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -r /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
      /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

cache_file() { echo "$CACHE_DIR/$(echo "$1" | tr '/:' '__').tar"; }

# Returns 0 if the image is there (already, or loaded from the cache dir).
present() {
  local image=$1
  [ "$FORCE" = 1 ] && return 1
  if have_image "$image"; then
    log "$image: already present ($(docker image inspect -f '{{.Id}}' "$image" | cut -c8-19)), kept"
    return 0
  fi
  if [ -n "$CACHE_DIR" ] && [ -s "$(cache_file "$image")" ]; then
    local start=$SECONDS
    if docker load -i "$(cache_file "$image")" >/dev/null && have_image "$image"; then
      log "$image: loaded from $(cache_file "$image") in $((SECONDS - start))s"
      return 0
    fi
    log "$image: $(cache_file "$image") did not load; building it"
  fi
  return 1
}

save_to_cache() {
  [ -n "$CACHE_DIR" ] || return 0
  mkdir -p "$CACHE_DIR"
  docker save -o "$(cache_file "$1").part" "$1" && mv "$(cache_file "$1").part" "$(cache_file "$1")"
  log "$1: saved to $(cache_file "$1")"
}

build_busybox() {
  local image=$BUSYBOX_IMAGE start=$SECONDS
  local busybox=/bin/busybox
  [ -x "$busybox" ] || die "$busybox is missing (apt-get install busybox-static)"
  # The dynamically linked `busybox` package also installs /bin/busybox; a
  # FROM scratch image has no libc, so only the static one works.
  if ! "$busybox" --list-full >/dev/null 2>&1; then die "$busybox does not run"; fi
  if command -v file >/dev/null && ! file -L "$busybox" | grep -q 'statically linked'; then
    die "$busybox is not statically linked (apt-get install busybox-static)"
  fi
  local root=$tmp/busybox
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,dev,proc,sys,tmp}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  install -m 0755 "$busybox" "$root/bin/busybox"
  local applet n=0
  while read -r applet; do
    case "$applet" in
      */*) ;;
      *) continue ;; # linuxrc and the like: not a command
    esac
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
    n=$((n + 1))
  done < <("$busybox" --list-full)
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
  tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
    docker import \
      --change 'CMD ["/bin/sh"]' \
      --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "busybox-static $(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo '?'): /bin/busybox and $n applets" \
      - "$image" >/dev/null
  log "$image: built from $busybox ($n applets) in $((SECONDS - start))s"
  save_to_cache "$image"
}

build_debian() {
  local image=$DEBIAN_IMAGE start=$SECONDS m
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  m=$(mirror)
  local root=$tmp/debian
  log "$image: debootstrap --variant=minbase $SUITE from $m (a minute or two)"
  if ! debootstrap --variant=minbase --arch="$(dpkg --print-architecture)" "$SUITE" "$root" "$m" \
    >"$tmp/debootstrap.log" 2>&1; then
    tail -n 30 "$tmp/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  # What an image has no use for: package caches and lists (apt-get update
  # fetches them again), logs, and the files Docker provides at run time.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* \
    "$root"/dev/* "$root"/proc/* "$root"/sys/* "$root"/run/*
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  printf 'deb %s %s main\n' "$m" "$SUITE" >"$root/etc/apt/sources.list"
  tar -C "$root" --numeric-owner -c . |
    docker import \
      --change 'CMD ["/bin/bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "debootstrap --variant=minbase $SUITE $m" \
      - "$image" >/dev/null
  rm -rf "$root"
  log "$image: built in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%d MB", $1 / 1e6 }'))"
  save_to_cache "$image"
}

# With --force, the image a tag named before is removed once replaced
# (unless something else still uses it).
drop_replaced() { # IMAGE OLD_ID
  [ -n "$2" ] && [ "$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null)" != "$2" ] &&
    docker rmi "$2" >/dev/null 2>&1 || true
}

total=$SECONDS
old_busybox=$(docker image inspect -f '{{.Id}}' "$BUSYBOX_IMAGE" 2>/dev/null || true)
old_debian=$(docker image inspect -f '{{.Id}}' "$DEBIAN_IMAGE" 2>/dev/null || true)
present "$BUSYBOX_IMAGE" || { build_busybox; drop_replaced "$BUSYBOX_IMAGE" "$old_busybox"; }
present "$DEBIAN_IMAGE" || { build_debian; drop_replaced "$DEBIAN_IMAGE" "$old_debian"; }
log "done in $((SECONDS - total))s: $BUSYBOX_IMAGE $DEBIAN_IMAGE"
