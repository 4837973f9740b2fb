#!/usr/bin/env bash
# CI's end-to-end run of the deployment files: deploy/images.sh,
# deploy/Dockerfile (--target prebuilt) and deploy/compose.yaml, with real
# clients against the stack:
#
#   1. base images (deploy/images.sh; kept between runs), then the image from
#      BIN_DIR's binaries (deploy/build-image.sh, a per-run tag);
#   2. throwaway tokens (workers, client, a client without execute, admin)
#      in a temporary token file, and the compose stack under a unique
#      project name on a free 127.0.0.1 port;
#   3. waits for the server and both workers, and checks that callers
#      without a token or without the execute grant cannot run actions;
#   4. `cargo-distbuild exec` (inputs, outputs, four actions at once);
#   5. Bazel 4.2.3 with --remote_executor on tests/fixtures/bazel (genrules
#      and sh_tests, every spawn remote), then again from the action cache;
#   6. both workers ran actions (`workers list`), and Docker's health checks
#      report every container healthy;
#   7. kills the worker container running a 20 s action: the server
#      re-queues it and it completes on the other worker.
# Everything it made (containers, volumes, network, the image, temp files,
# the Bazel server) goes in an EXIT trap; the base images stay.
#
# Usage (as root, Docker running, bazel-bootstrap, busybox-static and
# debootstrap installed, as .ci/run does):
#   deploy/test-compose.sh [BIN_DIR]     # default target/debug
# BIN_DIR holds cargo-distbuild, distbuild-action-init and distbuild-rustc.
# DISTBUILD_KEEP=1 leaves the stack up on failure (prints how to remove it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

started=$SECONDS
step() { printf '\n--- test-compose: %s (%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { printf '\ntest-compose: FAILED: %s\n' "$*" >&2; exit 1; }
bin_dir=$(cd "${1:-target/debug}" 2>/dev/null && pwd) || fail "no directory ${1:-target/debug} (the binaries' directory)"
cli=$bin_dir/cargo-distbuild

[ -x "$cli" ] || fail "$cli is missing (cargo build)"
command -v docker >/dev/null || fail "docker is not installed"
if command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed"
fi
command -v bazel >/dev/null || fail "bazel is not installed (apt-get install bazel-bootstrap)"

export DOCKER_BUILDKIT=0
project=distbuild-ci-$$-$RANDOM
image=cargo-distbuild:$project
tmp=$(mktemp -d /tmp/distbuild-compose.XXXXXX)
chmod 0755 "$tmp"
bazel_root=$tmp/bazel-root
ws=$tmp/ws
stack=0 # 1 once `compose up` ran

compose() { "${compose_cmd[@]}" -p "$project" -f "$root/deploy/compose.yaml" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ -d "$ws" ]; then
    (cd "$ws" && bazel --nohome_rc --output_user_root="$bazel_root" shutdown >/dev/null 2>&1)
  fi
  if [ "$rc" != 0 ] && [ "$stack" = 1 ]; then
    echo "--- test-compose: logs of the stack (last 40 lines each)" >&2
    for s in server worker-1 worker-2; do
      compose logs --no-color --tail=40 "$s" 2>&1 | sed "s/^/[$s] /" >&2
    done
  fi
  if [ "$rc" != 0 ] && [ "${DISTBUILD_KEEP:-0}" = 1 ]; then
    echo "test-compose: kept; remove with: ${compose_cmd[*]} -p $project -f deploy/compose.yaml down -v; docker rmi $image; rm -rf $tmp" >&2
    exit "$rc"
  fi
  if [ "$stack" = 1 ]; then
    compose down -v --remove-orphans -t 5 >/dev/null 2>&1 ||
      echo "test-compose: warning: compose down failed" >&2
  fi
  docker rmi "$image" >/dev/null 2>&1
  rm -rf "$tmp"
  echo "test-compose: cleaned up (project $project) after $((SECONDS - started))s" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "base images (deploy/images.sh)"
deploy/images.sh

step "image $image from $bin_dir (deploy/build-image.sh)"
t=$SECONDS
deploy/build-image.sh "$bin_dir" "$image" 2>&1 | grep -v -e '^DEPRECATED' -e 'BuildKit is currently disabled' \
  -e 'environment-variable\.' -e '^ *$' || true
docker image inspect "$image" >/dev/null 2>&1 || fail "the image was not built"
build_secs=$((SECONDS - t))

step "tokens"
# Printed once each by `token new`: the token on stdout, its entry (the
# SHA-256 only) on stderr, which goes to the server's token file.
tokens=$tmp/tokens.toml
: >"$tokens"
new_token() { # NAME GRANT...
  local name=$1; shift
  local args=()
  for g in "$@"; do args+=(--grant "$g"); done
  (umask 077 && "$cli" token new "$name" "${args[@]}" >"$tmp/$name.token" 2>>"$tokens.entries")
}
new_token workers worker
new_token client cas-read cas-write ac-read ac-write execute
new_token uploader cas-read cas-write ac-read
new_token admin admin
grep -v '^#' "$tokens.entries" >"$tokens"
chmod 0644 "$tokens"
grep -c '^\[\[token\]\]' "$tokens" | grep -qx 4 || fail "token file has not 4 entries: $(cat "$tokens")"

step "compose up (project $project)"
# The engine's own open-file limit caps the containers' (compose.yaml).
nofile=65536
if pid=$(pidof dockerd 2>/dev/null) && lim=$(awk '/^Max open files/ { print $5 }' "/proc/${pid%% *}/limits" 2>/dev/null); then
  case "$lim" in
    unlimited) ;;
    *[!0-9]*|"") ;;
    *) [ "$lim" -lt "$nofile" ] && nofile=$lim ;;
  esac
fi
export DISTBUILD_IMAGE=$image DISTBUILD_TOKENS=$tokens DISTBUILD_PUBLISH=127.0.0.1: DISTBUILD_HTTP_PUBLISH=127.0.0.1: \
  DISTBUILD_NOFILE=$nofile DISTBUILD_LOG=info
DISTBUILD_WORKER_TOKEN=$(cat "$tmp/workers.token")
export DISTBUILD_WORKER_TOKEN
stack=1
compose up -d --no-build 2>&1 | sed 's/^/  /'
port=$(compose port server 8980 | awk -F: '{ print $NF }')
[ -n "$port" ] || fail "no published port for the server"
export DISTBUILD_SERVER=grpc://127.0.0.1:$port
unset DISTBUILD_TOKEN DISTBUILD_TOKEN_FILE DISTBUILD_CONFIG
as() { local who=$1; shift; DISTBUILD_TOKEN_FILE=$tmp/$who.token "$cli" "$@"; }
# The first worker with a busy slot (waits up to 20 s for one), or nothing.
busy_worker() {
  local w
  for _ in $(seq 100); do
    w=$(as admin workers list 2>/dev/null |
      awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "BUSY") c = i } NR > 1 && $1 ~ /^worker-/ && $c > 0 { print $1; exit }')
    [ -n "$w" ] && { echo "$w"; return; }
    sleep 0.2
  done
}
# awk program: the column named `col` in the header, of the row of worker `w`.
column='NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i } NR > 1 && $1 == w { print $c }'
echo "server: $DISTBUILD_SERVER"

step "wait for the server and both workers"
empty=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0
for _ in $(seq 60); do
  "$cli" cas stat "$empty" >/dev/null 2>&1 && break
  sleep 1
done
"$cli" cas stat "$empty" >/dev/null || fail "the server does not answer on $DISTBUILD_SERVER"
for _ in $(seq 60); do
  n=$(as admin workers list 2>/dev/null | awk 'NR > 1 && ($1 == "worker-1" || $1 == "worker-2")' | wc -l)
  [ "$n" = 2 ] && break
  sleep 1
done
as admin workers list
[ "$n" = 2 ] || fail "both workers should be connected"
as admin workers list | awk 'NR > 1 && $1 ~ /^worker-/ && $0 !~ /namespaces\(/ { bad = 1 } END { exit bad }' ||
  fail "a worker runs actions outside the namespace sandbox"

step "the HTTP port: health without a token, pages and /metrics with one"
hport=$(compose port server 8981 | awk -F: '{ print $NF }')
[ -n "$hport" ] || fail "no published port for the status pages"
http=http://127.0.0.1:$hport
curl -fsS "$http/readyz" || fail "/readyz does not answer 200"
code=$(curl -s -o /dev/null -w '%{http_code}' "$http/")
[ "$code" = 401 ] || fail "the overview answered $code without a token"
# The token goes in a curl config file, not on the command line.
(umask 077 && printf 'user = "admin:%s"\n' "$(cat "$tmp/admin.token")" >"$tmp/admin.curl")
curl -fsS -K "$tmp/admin.curl" "$http/" >"$tmp/overview.html" || fail "the overview refused the admin token"
grep -q 'worker-1' "$tmp/overview.html" || fail "the overview does not list worker-1"
curl -fsS -K "$tmp/admin.curl" "$http/metrics" >"$tmp/metrics.txt" || fail "/metrics refused the admin token"
grep -q '^distbuild_' "$tmp/metrics.txt" || fail "/metrics has no distbuild_ metrics"
echo "pages and metrics: $(wc -c <"$tmp/overview.html") bytes of overview, $(grep -c '^distbuild_' "$tmp/metrics.txt") samples"

step "callers without the execute grant cannot run actions"
if "$cli" exec --no-cache -- true 2>"$tmp/anon.err"; then fail "an anonymous caller ran an action"; fi
grep -q Unauthenticated "$tmp/anon.err" || fail "anonymous exec: unexpected error: $(cat "$tmp/anon.err")"
echo "anonymous: $(head -c 160 "$tmp/anon.err")"
if as uploader exec --no-cache -- true 2>"$tmp/uploader.err"; then fail "a token without execute ran an action"; fi
grep -qi 'execute' "$tmp/uploader.err" || fail "exec without the execute grant: unexpected error: $(cat "$tmp/uploader.err")"
echo "no execute grant: $(head -c 160 "$tmp/uploader.err")"

step "cargo-distbuild exec"
mkdir -p "$tmp/exec" && cd "$tmp/exec"
printf 'pear\napple\nfig\n' >words.txt
as client exec --input words.txt --output sorted.txt -- sh -c 'sort words.txt | tr a-z A-Z > sorted.txt; id -un'
[ "$(cat sorted.txt)" = "$(printf 'APPLE\nFIG\nPEAR')" ] || fail "exec output: $(cat sorted.txt)"
# Four at once: more than one worker's slots (one per CPU), so both get some.
pids=()
for i in 1 2 3 4; do
  as client exec --no-cache -- sh -c "sleep 2; echo action $i on \$(hostname)" >"out.$i" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "a concurrent exec failed: $(cat out.*)"; done
cat out.1 out.2 out.3 out.4
cd "$root"

step "Bazel 4.2.3: tests/fixtures/bazel with --remote_executor"
cp -r tests/fixtures/bazel "$ws"
# The token goes in an rc file, not on a command line others can read (rc
# files split words like a shell: hence the backslash).
printf 'build --remote_header=Authorization=Bearer\\ %s\n' "$(cat "$tmp/client.token")" >"$tmp/auth.bazelrc"
bazel_test() {
  (cd "$ws" && bazel --nohome_rc --bazelrc="$tmp/auth.bazelrc" --output_user_root="$bazel_root" --max_idle_secs=300 \
    test --nosandbox_debug --symlink_prefix=/ --incompatible_strict_action_env --remote_timeout=60 \
    --spawn_strategy=remote --test_output=errors --remote_executor="$DISTBUILD_SERVER" \
    //gen/... //shtest/...)
}
bazel_test >"$tmp/bazel1.out" 2>&1 || { tail -n 60 "$tmp/bazel1.out"; fail "bazel test with --remote_executor failed"; }
summary=$(grep -E '^INFO: [0-9]+ process(es)?[:.]' "$tmp/bazel1.out" | head -n 1)
echo "cold: $summary"
echo "$summary" | grep -qE '[0-9]+ remote[,.]' || fail "no remote spawns: $summary"
echo "$summary" | grep -qE 'local|sandbox|cache hit' && fail "some spawns did not run remotely: $summary"
bin=$(cd "$ws" && bazel --nohome_rc --output_user_root="$bazel_root" info bazel-bin 2>/dev/null)
expected=$(printf 'hello from the distbuild bazel fixture\nPEAR\nAPPLE\nFIG\nBANANA\nCHERRY')
[ "$(cat "$bin/gen/text/greeting_full.txt")" = "$expected" ] || fail "greeting_full.txt: $(cat "$bin/gen/text/greeting_full.txt")"
(cd "$ws" && bazel --nohome_rc --output_user_root="$bazel_root" clean >/dev/null 2>&1)
bazel_test >"$tmp/bazel2.out" 2>&1 || { tail -n 60 "$tmp/bazel2.out"; fail "bazel test after clean failed"; }
summary=$(grep -E '^INFO: [0-9]+ process(es)?[:.]' "$tmp/bazel2.out" | head -n 1)
echo "after clean: $summary"
echo "$summary" | grep -qE 'remote cache hit' || fail "nothing came from the action cache: $summary"
echo "$summary" | grep -qE '[0-9]+ (remote|local)[,.]' && fail "actions ran again after clean: $summary"
(cd "$ws" && bazel --nohome_rc --output_user_root="$bazel_root" shutdown >/dev/null 2>&1) || true

step "both workers ran actions; health checks"
as admin workers list
for w in worker-1 worker-2; do
  done_n=$(as admin workers list | awk -v w="$w" -v col=DONE "$column" )
  [ "${done_n:-0}" -gt 0 ] || fail "$w ran no action (DONE ${done_n:-?})"
done
# Docker's first health probe runs one interval (30 s) after the start.
for _ in $(seq 60); do
  states=$(for c in $(compose ps -q); do docker inspect -f '{{.Name}}={{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$c"; done)
  echo "$states" | grep -qv '=healthy$' || break
  sleep 2
done
echo "$states"
echo "$states" | grep -qv '=healthy$' && fail "not every container is healthy"

step "kill the worker running an action: the action still completes"
t=$SECONDS
as client exec --no-cache -- sh -c 'sleep 20; echo survived' >"$tmp/kill.out" 2>"$tmp/kill.err" &
exec_pid=$!
busy=$(busy_worker)
[ -n "$busy" ] || fail "no worker picked up the action"
op=$(as admin jobs list | awk '$2 == "EXECUTING" { print $1; exit }')
[ -n "$op" ] || fail "no operation is executing"
sleep 2
victim=$(compose ps -q "$busy")
echo "$busy runs $op; docker kill ${victim:0:12}"
docker kill "$victim" >/dev/null
wait "$exec_pid" || fail "the action failed after its worker was killed: $(cat "$tmp/kill.err")"
[ "$(cat "$tmp/kill.out")" = survived ] || fail "unexpected output: $(cat "$tmp/kill.out")"
as admin job status "$op" | tee "$tmp/kill.status"
ran_on=$(awk '$1 == "worker:" { print $2 }' "$tmp/kill.status")
[ -n "$ran_on" ] && [ "$ran_on" != "$busy" ] || fail "expected $op to finish on the other worker, not '${ran_on}'"
echo "re-queued from $busy to $ran_on; done $((SECONDS - t))s after submission"

step "docker stop (SIGTERM) on a busy worker: it drains, the action finishes there"
as client exec --no-cache -- sh -c 'sleep 6; echo drained' >"$tmp/drain.out" 2>"$tmp/drain.err" &
exec_pid=$!
busy=$(busy_worker)
[ -n "$busy" ] || fail "no worker picked up the action to drain"
op=$(as admin jobs list | awk '$2 == "EXECUTING" { print $1; exit }')
victim=$(compose ps -q "$busy")
echo "$busy runs $op; docker stop ${victim:0:12}"
docker stop -t 60 "$victim" >/dev/null &
stop_pid=$!
state=""
for _ in $(seq 50); do
  state=$(as admin workers list 2>/dev/null | awk -v w="$busy" -v col=STATE "$column")
  [ "$state" = draining ] && break
  sleep 0.2
done
[ "$state" = draining ] || fail "$busy is not draining after SIGTERM (state '${state}')"
wait "$exec_pid" || fail "the action failed while its worker drained: $(cat "$tmp/drain.err")"
[ "$(cat "$tmp/drain.out")" = drained ] || fail "unexpected output: $(cat "$tmp/drain.out")"
wait "$stop_pid"
ran_on=$(as admin job status "$op" | awk '$1 == "worker:" { print $2 }')
[ "$ran_on" = "$busy" ] || fail "expected $op to finish on the draining $busy, not '${ran_on}'"
code=$(docker inspect -f '{{.State.ExitCode}}' "$victim")
[ "$code" = 0 ] || fail "the drained worker exited with $code"
echo "$busy drained: $op finished there, then the worker exited 0"

step "passed (image build ${build_secs}s)"
