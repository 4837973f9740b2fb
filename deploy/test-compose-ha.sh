#!/usr/bin/env bash
# CI's run of deploy/compose-ha.yaml: two replicas on Redis + S3 (s3s-fs),
# a worker connected to replica B only, real clients:
#
#   1. base images, the cargo-distbuild image from BIN_DIR's binaries and the
#      engines image (deploy/engines/Dockerfile: Debian's redis-server and
#      s3s-fs from PATH), per-run tags;
#   2. throwaway tokens and the stack under a unique project name, both
#      replicas on free 127.0.0.1 ports;
#   3. `exec` through replica A runs on B's worker; `workers list` on A
#      names the worker and its replica; `jobs list` on B shows A's job;
#   4. replica A is killed (docker kill): an action sent through B still
#      runs, and a blob uploaded through A before is read through B;
#   5. every replica and Redis restart: the cache survives (the same action
#      is a cache hit through A) and `exec` works again.
# Everything it made goes in an EXIT trap; the base images stay.
#
# Usage (as root, Docker running, s3s-fs on PATH or in ~/.cargo/bin):
#   deploy/test-compose-ha.sh [BIN_DIR]     # default target/debug
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$SECONDS
step() { printf '\n--- test-compose-ha: %s (%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { printf '\ntest-compose-ha: FAILED: %s\n' "$*" >&2; exit 1; }
bin_dir=$(cd "${1:-target/debug}" 2>/dev/null && pwd) || fail "no directory ${1:-target/debug}"
cli=$bin_dir/cargo-distbuild
[ -x "$cli" ] || fail "$cli is missing (cargo build)"
export PATH="$PATH:$HOME/.cargo/bin"
s3s=$(command -v s3s-fs) || fail "s3s-fs is not installed (cargo install s3s-fs --version 0.14.1 --locked --features binary)"
if command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed"
fi

export DOCKER_BUILDKIT=0
project=distbuild-ha-$$-$RANDOM
image=cargo-distbuild:$project
engines=distbuild-engines:$project
tmp=$(mktemp -d /tmp/distbuild-compose-ha.XXXXXX)
chmod 0755 "$tmp"
stack=0
compose() { "${compose_cmd[@]}" -p "$project" -f "$root/deploy/compose-ha.yaml" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ "$stack" = 1 ]; then
    for s in server-a server-b worker redis s3; do
      compose logs --no-color --tail=30 "$s" 2>&1 | sed "s/^/[$s] /" >&2
    done
  fi
  [ "$stack" = 1 ] && compose down -v --remove-orphans -t 5 >/dev/null 2>&1
  docker rmi "$image" "$engines" >/dev/null 2>&1
  rm -rf "$tmp"
  echo "test-compose-ha: cleaned up (project $project) after $((SECONDS - started))s" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "images: base (deploy/images.sh), $image, $engines"
deploy/images.sh
deploy/build-image.sh "$bin_dir" "$image" 2>&1 | grep -v -e '^DEPRECATED' -e 'BuildKit is currently disabled' \
  -e 'environment-variable\.' -e '^ *$' || true
docker image inspect "$image" >/dev/null 2>&1 || fail "the image was not built"
mkdir "$tmp/engines"
cp "$s3s" "$tmp/engines/s3s-fs"
docker build -q -f deploy/engines/Dockerfile --build-arg BASE_IMAGE=distbuild-debian:bookworm -t "$engines" \
  "$tmp/engines" >/dev/null || fail "the engines image was not built"

step "tokens"
tokens=$tmp/tokens.toml
new_token() { # NAME GRANT...
  local name=$1; shift
  local args=()
  for g in "$@"; do args+=(--grant "$g"); done
  (umask 077 && "$cli" token new "$name" "${args[@]}" >"$tmp/$name.token" 2>>"$tokens.entries")
}
new_token workers worker
new_token client cas-read cas-write ac-read ac-write execute
new_token admin admin
grep -v '^#' "$tokens.entries" >"$tokens"
chmod 0644 "$tokens"

step "compose up (project $project)"
export DISTBUILD_IMAGE=$image DISTBUILD_ENGINES_IMAGE=$engines DISTBUILD_TOKENS=$tokens \
  DISTBUILD_PUBLISH=127.0.0.1: DISTBUILD_PUBLISH_B=127.0.0.1: DISTBUILD_S3_SECRET=secret-$RANDOM$RANDOM
DISTBUILD_WORKER_TOKEN=$(cat "$tmp/workers.token")
export DISTBUILD_WORKER_TOKEN
stack=1
compose up -d --no-build 2>&1 | sed 's/^/  /'
port_a=$(compose port server-a 8980 | awk -F: '{ print $NF }')
port_b=$(compose port server-b 8980 | awk -F: '{ print $NF }')
[ -n "$port_a" ] && [ -n "$port_b" ] || fail "no published ports"
unset DISTBUILD_SERVER DISTBUILD_TOKEN DISTBUILD_TOKEN_FILE DISTBUILD_CONFIG
on() { local port=$1 who=$2; shift 2; DISTBUILD_SERVER=grpc://127.0.0.1:$port DISTBUILD_TOKEN_FILE=$tmp/$who.token "$cli" "$@"; }
wait_for_worker() { # PORT: until `workers list` there shows worker-b
  for _ in $(seq 120); do
    on "$1" admin workers list 2>/dev/null | grep -q worker-b && return 0
    sleep 0.5
  done
  fail "replica on port $1 never listed worker-b"
}
wait_for_worker "$port_a"
on "$port_a" admin workers list | tee "$tmp/workers"
grep worker-b "$tmp/workers" | grep -qv local || fail "workers list on A does not name B's replica for worker-b"

step "exec through A runs on B's worker"
out=$(on "$port_a" client exec -- sh -c 'echo ran on $(hostname)')
echo "  $out"
case "$out" in "ran on "*) ;; *) fail "exec through A printed: $out" ;; esac
on "$port_b" admin jobs list | tee "$tmp/jobs"
[ "$(grep -c operations/ "$tmp/jobs")" -ge 1 ] || fail "jobs list on B does not show A's job"
printf 'a blob uploaded through A\n' >"$tmp/blob"
digest=$(on "$port_a" client cas put "$tmp/blob" | awk '{ print $1 }')

step "replica A killed: B serves, with A's blob"
docker kill "$(compose ps -q server-a)" >/dev/null
on "$port_b" client cas get "$digest" "$tmp/blob.b" >/dev/null
cmp -s "$tmp/blob" "$tmp/blob.b" || fail "the blob read through B differs"
out=$(on "$port_b" client exec -- sh -c 'echo still here')
[ "$out" = "still here" ] || fail "exec through B printed: $out"

step "every replica and Redis restarted: the shared cache survives"
compose restart -t 5 redis server-a server-b worker >/dev/null 2>&1
port_a=$(compose port server-a 8980 | awk -F: '{ print $NF }')
port_b=$(compose port server-b 8980 | awk -F: '{ print $NF }')
wait_for_worker "$port_a"
on "$port_a" client exec -- sh -c 'echo still here' | grep -qx 'still here' || fail "exec after the restart"
on "$port_a" client cas get "$digest" "$tmp/blob.a" >/dev/null
cmp -s "$tmp/blob" "$tmp/blob.a" || fail "the blob read through A after the restart differs"
on "$port_a" admin scheduler status | tee "$tmp/status"
grep -Eq '\([1-9][0-9]* hits' "$tmp/status" || fail "the repeated action was not a cache hit after the restart"

step "passed"
