#!/usr/bin/env bash
# Interoperability test with a third-party REAPI client: BuildGrid's `bgd` CLI
# and its generated Python protos (PyPI package `buildgrid`).
#
#   tests/interop/buildgrid.sh /path/to/cargo-distbuild
#
# Creates (or reuses) a Python 3.13 venv at $BGD_VENV (default
# /tmp/distbuild-bgd-venv) with the pinned buildgrid, starts our server on a
# free 127.0.0.1 port with a temporary data directory, runs real bgd upload /
# download round trips, the action cache commands, remote execution with
# `bgd execute` and `bgd operation` (status, list, wait, cancel) and
# reapi_client.py, then stops the server. The last line is `N passed, M failed`; the exit status is
# non-zero when anything failed.
#
# Environment: BGD_VENV (venv path), BGD_PYTHON (a python3.13 to build the
# venv with; found via PATH or pyenv otherwise), DISTBUILD_LOG (server log
# filter, default debug without h2 frame noise), KEEP_TMP=1 to keep the
# temporary directory (server log, files) for inspection.
set -uo pipefail

BUILDGRID_VERSION=0.9.1
ZSTANDARD_VERSION=0.25.0 # lets reapi_client.py exercise compressed-blobs/zstd

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-}"
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
  echo "usage: $0 /path/to/cargo-distbuild   (binary not found or not executable: '${BIN}')" >&2
  echo "0 passed, 1 failed"
  exit 2
fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
VENV="${BGD_VENV:-/tmp/distbuild-bgd-venv}"

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
finish() {
  echo "${PASSED} passed, ${FAILED} failed"
  [[ $FAILED -eq 0 ]]
  exit $?
}

# ------------------------------------------------------------------ the venv
# A working Python >= 3.13 (buildgrid 0.9 requires it). pyenv shims are
# skipped when the shim's version is not installed/selected: each candidate
# must actually run.
find_python() {
  local root="${PYENV_ROOT:-$HOME/.pyenv}" p
  for p in ${BGD_PYTHON:-} "$(command -v python3.13 2>/dev/null)" "$root"/versions/3.1[3-9]*/bin/python3 \
    "$(command -v python3 2>/dev/null)"; do
    [[ -n "$p" && -x "$p" ]] || continue
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 13) else 1)' >/dev/null 2>&1; then
      echo "$p"
      return
    fi
  done
  return 1
}

venv_ok() {
  [[ -x "$VENV/bin/python" && -x "$VENV/bin/bgd" ]] &&
    "$VENV/bin/python" - "$BUILDGRID_VERSION" "$ZSTANDARD_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("buildgrid"), version("zstandard")) == tuple(sys.argv[1:3]) else 1)
EOF
}

if venv_ok; then
  echo "using the venv at $VENV (buildgrid $BUILDGRID_VERSION)"
else
  PY="$(find_python)" || {
    echo "no Python >= 3.13 found (buildgrid $BUILDGRID_VERSION needs it); set BGD_PYTHON" >&2
    fail "python >= 3.13 available"
    finish
  }
  echo "creating the venv at $VENV with $PY and installing buildgrid==$BUILDGRID_VERSION"
  t0=$SECONDS
  [[ -x "$VENV/bin/python" ]] || timeout 120 "$PY" -m venv "$VENV" || { fail "create venv"; finish; }
  if timeout 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "buildgrid==$BUILDGRID_VERSION" "zstandard==$ZSTANDARD_VERSION"; then
    echo "installed in $((SECONDS - t0))s"
  else
    fail "pip install buildgrid==$BUILDGRID_VERSION"
    finish
  fi
fi
BGD="$VENV/bin/bgd"
VPY="$VENV/bin/python"

# ---------------------------------------------------------------- the server
TMP="$(mktemp -d /tmp/distbuild-interop.XXXXXX)"
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

PORT="$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
REMOTE="http://127.0.0.1:$PORT"
LOG="$TMP/server.log"
DISTBUILD_LOG="${DISTBUILD_LOG:-debug,h2=info,tower=info,hyper=info,tower_http=debug}" \
  "$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" >"$LOG" 2>&1 &
SERVER_PID=$!

ready=0
for _ in $(seq 100); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
  if "$VPY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$PORT" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.1
done
if [[ $ready != 1 ]]; then
  echo "--- server log"; cat "$LOG"
  fail "server started on 127.0.0.1:$PORT"
  finish
fi
echo "server pid $SERVER_PID on $REMOTE, data in $TMP/data"

show_log_tail() { echo "--- last lines of the server log ($LOG)"; tail -n 30 "$LOG" | sed 's/\x1b\[[0-9;]*m//g'; }

# bgd with a time bound; output goes to $TMP/out.txt and on failure to stdout.
bgd() {
  timeout 120 "$BGD" "$@" >"$TMP/out.txt" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "  \$ bgd $*  (exit $rc)"
    sed 's/^/  | /' "$TMP/out.txt"
  fi
  return $rc
}
# The digest bgd reports for a pushed path: "... Pushed path=[P] with digest=[H/S]".
pushed_digest() { sed -n "s|.*Pushed path=\[$1\] with digest=\[\([0-9a-f]*/[0-9]*\)\].*|\1|p" "$TMP/out.txt" | tail -n 1; }
local_digest() { echo "$(sha256sum "$1" | cut -d' ' -f1)/$(stat -c %s "$1")"; }

cd "$TMP" || exit 1

# ------------------------------------------------------------ bgd: capabilities
if bgd capabilities --remote "$REMOTE" && grep -q '"SHA256"' out.txt && grep -q '"updateEnabled": true' out.txt; then
  pass "bgd capabilities"
else
  fail "bgd capabilities (want SHA256 and updateEnabled)"
fi

# ------------------------------------------------------- bgd: files round trip
mkdir -p files got
printf 'hello from bgd\n' >files/small.txt
: >files/empty.bin
head -c $((3 * 1024 * 1024 + 17)) /dev/urandom >files/large.bin # over bgd's batch threshold: ByteStream
FILES=(small.txt empty.bin large.bin)
declare -A DIGEST=()
if (cd files && bgd cas --remote "$REMOTE" upload-file --verify "${FILES[@]}"); then
  ok=1
  for f in "${FILES[@]}"; do
    DIGEST[$f]="$(pushed_digest "$f")"
    want="$(local_digest "files/$f")"
    if [[ "${DIGEST[$f]}" != "$want" ]]; then
      echo "  $f: bgd reported '${DIGEST[$f]}', sha256sum says '$want'"
      ok=0
    fi
  done
  [[ $ok == 1 ]] && pass "bgd cas upload-file --verify (${#FILES[@]} files)" || fail "bgd cas upload-file digests"
else
  fail "bgd cas upload-file --verify"
fi

args=()
for f in "${FILES[@]}"; do args+=("${DIGEST[$f]:-none/0}" "got/$f"); done
if bgd cas --remote "$REMOTE" download-file --verify "${args[@]}"; then
  ok=1
  for f in "${FILES[@]}"; do cmp "files/$f" "got/$f" || ok=0; done
  [[ $ok == 1 ]] && pass "bgd cas download-file --verify + cmp" || fail "downloaded files differ"
else
  fail "bgd cas download-file --verify"
fi

# ---------------------------------------------------- bgd: directory round trip
make_tree() {
  mkdir -p "$1/sub/deeper" "$1/empty-dir"
  printf 'one\n' >"$1/one.txt"
  : >"$1/empty"
  printf '#!/bin/sh\necho hi\n' >"$1/run.sh"
  chmod +x "$1/run.sh"
  head -c $((5 * 1024 * 1024)) /dev/urandom >"$1/sub/big.bin" # two ByteStream chunks
  printf 'deep\n' >"$1/sub/deeper/d.txt"
  cp "$1/one.txt" "$1/sub/deeper/dup.txt" # the same blob twice
  ln -s one.txt "$1/link"
}
same_tree() {
  diff -r --no-dereference "$1" "$2" &&
    [[ -x "$2/run.sh" && ! -x "$2/one.txt" ]] &&
    [[ "$(readlink "$2/link")" == one.txt ]] &&
    [[ -d "$2/empty-dir" ]]
}
make_tree tree
ROOT=""
if bgd cas --remote "$REMOTE" upload-dir --verify tree; then
  ROOT="$(pushed_digest tree)"
  [[ -n "$ROOT" ]] && pass "bgd cas upload-dir --verify (root $ROOT)" || fail "bgd cas upload-dir printed no root digest"
else
  fail "bgd cas upload-dir --verify"
fi
if [[ -n "$ROOT" ]] && bgd cas --remote "$REMOTE" download-dir --verify "$ROOT" tree.out; then
  if same_tree tree tree.out; then
    pass "bgd cas download-dir --verify (GetTree) + diff -r, modes, symlink"
  else
    fail "downloaded directory differs from the uploaded one"
  fi
else
  fail "bgd cas download-dir --verify"
fi

# The same round trip under a non-empty instance name.
INST="interop/ci"
IROOT=""
if bgd cas --remote "$REMOTE" --instance-name "$INST" upload-dir tree; then IROOT="$(pushed_digest tree)"; fi
if [[ -n "$IROOT" ]] && bgd cas --remote "$REMOTE" --instance-name "$INST" download-dir --verify "$IROOT" tree.inst &&
  same_tree tree tree.inst; then
  pass "bgd upload-dir/download-dir with --instance-name $INST"
else
  fail "bgd directory round trip with --instance-name $INST"
fi

# ------------------------------------------------------------ bgd: misc CAS
MISSING="$(printf 'never uploaded %s' "$PORT" | sha256sum | cut -d' ' -f1)/24"
if bgd cas --remote "$REMOTE" download-file "$MISSING" got/missing >/dev/null; then
  fail "bgd download-file of an absent blob succeeded"
elif grep -qi 'not found' out.txt; then
  pass "bgd download-file of an absent blob fails with not found"
else
  fail "bgd download-file of an absent blob: unexpected error: $(head -c 300 out.txt)"
fi

# request-dummy before upload-dummy: its Action is not in the CAS yet (the
# answer is checked with the execution checks below, once its digest is known).
bgd execute --remote "$REMOTE" request-dummy
cp out.txt dummy-before.txt
if bgd cas --remote "$REMOTE" upload-dummy; then
  ACTION="$(sed -n 's|.*Pushed Action, digest=\["\([0-9a-f]*/[0-9]*\).*|\1|p' out.txt)"
  if [[ -n "$ACTION" ]] && bgd cas --remote "$REMOTE" download-file --verify "$ACTION" got/dummy.action &&
    [[ "$(local_digest got/dummy.action)" == "$ACTION" ]]; then
    pass "bgd cas upload-dummy (Action $ACTION readable)"
  else
    fail "bgd cas upload-dummy: the Action blob is not readable back"
  fi
else
  fail "bgd cas upload-dummy"
fi

# -------------------------------------------------------- bgd: action cache
# bgd actioncache update takes the ActionResult's digest in the CAS.
"$VPY" - "${DIGEST[small.txt]:-}" "$PORT" <<'EOF' >ar.log 2>&1
import sys
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
h, s = (sys.argv[1] or "0/0").split("/")
ar = re_pb2.ActionResult(exit_code=0, stdout_raw=b"built\n")
ar.output_files.add(path="out/small.txt", digest=re_pb2.Digest(hash=h, size_bytes=int(s)))
open("result.bin", "wb").write(ar.SerializeToString())
open("action.bin", "wb").write(b"interop action " + sys.argv[2].encode())
EOF
ACT="$(local_digest action.bin)"
AR="$(local_digest result.bin)"
if bgd actioncache --remote "$REMOTE" get "$ACT" && grep -q '^Miss' out.txt; then
  pass "bgd actioncache get (miss)"
else
  fail "bgd actioncache get before update should miss"
fi
if bgd cas --remote "$REMOTE" upload-file result.bin && bgd actioncache --remote "$REMOTE" update "$ACT" "$AR"; then
  pass "bgd actioncache update"
else
  fail "bgd actioncache update"
fi
if bgd actioncache --remote "$REMOTE" get "$ACT" && grep -q "^Hit: .*digest=\[$AR\]" out.txt; then
  pass "bgd actioncache get (hit, byte-identical result $AR)"
else
  fail "bgd actioncache get after update: $(head -c 300 out.txt)"
fi
if bgd actioncache --remote "$REMOTE" get --json "$ACT" && grep -q '"path": "out/small.txt"' out.txt; then
  pass "bgd actioncache get --json"
else
  fail "bgd actioncache get --json"
fi

# ---------------------------------------------------------- bgd: execution
# bgd prints every Operation of the Execute stream as text; the name is on
# lines of their own. Commands go after `--`: bgd's own -c would eat sh's.
op_name() { sed -n 's/^name: "\(.*\)"$/\1/p' "$1" | tail -n 1; }
# bgd execute command --remote "$REMOTE" ARGS...: output in $TMP/out.txt.
bgd_exec() { bgd execute --remote "$REMOTE" command "$@"; }
bgd_op() { bgd operation --remote "$REMOTE" "$@"; }

mkdir -p exec-in/src exec-empty
printf 'input line\n' >exec-in/src/a.txt
EXEC_OP=""
if bgd_exec --output-file out/gen/r.txt --output-directory exec-got -- exec-in \
  /bin/sh -c 'cat src/a.txt > out/gen/r.txt; echo "made remotely" >> out/gen/r.txt; echo to-stdout'; then
  EXEC_OP="$(op_name out.txt)"
  if [[ -n "$EXEC_OP" ]] && grep -q '^done: true' out.txt &&
    [[ "$(cat exec-got/out/gen/r.txt 2>/dev/null)" == $'input line\nmade remotely' ]]; then
    pass "bgd execute command: output file from the input root, downloaded ($EXEC_OP)"
  else
    fail "bgd execute command: no done operation or wrong output: $(cat exec-got/out/gen/r.txt 2>&1 | head -c 200)"
  fi
else
  fail "bgd execute command"
fi

if [[ -n "$EXEC_OP" ]] && bgd_op status "$EXEC_OP" &&
  grep -q "^Success: $EXEC_OP: Completed succesfully (stage=4, exit_code=0)" out.txt &&
  grep -q '^  worker=.' out.txt; then
  pass "bgd operation status (COMPLETED, exit_code=0, worker named)"
else
  fail "bgd operation status of $EXEC_OP: $(head -c 300 out.txt)"
fi

FAIL_OP=""
if bgd_exec -- exec-empty /bin/sh -c 'exit 3'; then FAIL_OP="$(op_name out.txt)"; fi
if [[ -n "$FAIL_OP" ]] && bgd_op status "$FAIL_OP" &&
  grep -q "^Success: $FAIL_OP: Completed with failure (stage=4, exit_code=3)" out.txt; then
  pass "bgd execute command + operation status: exit code 3 comes back"
else
  fail "bgd execute of 'exit 3': $(head -c 300 out.txt)"
fi

# -c: the action may be cached and the cache is checked; the second run is a hit.
CACHED_OP=""
if bgd_exec -c --output-file o.txt --output-directory exec-cached -- exec-in /bin/sh -c 'cat src/a.txt > o.txt' &&
  bgd_exec -c --output-file o.txt --output-directory exec-cached2 -- exec-in /bin/sh -c 'cat src/a.txt > o.txt'; then
  CACHED_OP="$(op_name out.txt)"
fi
if [[ -n "$CACHED_OP" ]] && cmp -s exec-in/src/a.txt exec-cached2/o.txt && bgd_op status --json "$CACHED_OP" &&
  grep -q '"cachedResult": true' out.txt; then
  pass "bgd execute command -c twice: the second is a cachedResult with the same output"
else
  fail "bgd execute command -c twice: no cached result: $(head -c 300 out.txt)"
fi

if bgd_op list && grep -q "^Success: $EXEC_OP: Completed succesfully" out.txt &&
  grep -q "^Success: $FAIL_OP: Completed with failure" out.txt; then
  pass "bgd operation list ($(grep -c '^Success' out.txt) finished operations)"
else
  fail "bgd operation list lacks $EXEC_OP or $FAIL_OP: $(head -c 300 out.txt)"
fi
if bgd_op list --json && grep -q "\"name\": \"$EXEC_OP\"" out.txt; then
  pass "bgd operation list --json"
else
  fail "bgd operation list --json lacks $EXEC_OP"
fi

if [[ -n "$EXEC_OP" ]] && bgd_op wait "$EXEC_OP" && grep -q "^Success: $EXEC_OP: Completed succesfully" out.txt; then
  pass "bgd operation wait of a finished operation"
else
  fail "bgd operation wait $EXEC_OP: $(head -c 300 out.txt)"
fi
if ! bgd_op status "operations/never-$PORT" >/dev/null && grep -qi 'unknown' out.txt; then
  pass "bgd operation status of an unknown operation fails"
else
  fail "bgd operation status of an unknown operation: $(head -c 300 out.txt)"
fi

# request-dummy sends BuildGrid's dummy Action (an empty Command, no input
# root: something only BuildGrid's dummy bots "run"); bgd prints the error and
# exits 0. Before upload-dummy (above): a missing-blobs error naming the
# Action. After it: rejected as invalid, there is no input root and nothing to run.
if grep -q "^Error: Requesting dummy: .*missing blobs .*${ACTION:-no-dummy-action}" dummy-before.txt; then
  pass "bgd execute request-dummy before upload-dummy: the Action ${ACTION%%/*} is a missing blob"
else
  fail "bgd execute request-dummy before upload-dummy (Action ${ACTION:-?}): $(head -c 300 dummy-before.txt)"
fi
if bgd execute --remote "$REMOTE" request-dummy && grep -q '^Error: Requesting dummy: .*input_root_digest' out.txt; then
  pass "bgd execute request-dummy after upload-dummy: rejected (no input root)"
else
  fail "bgd execute request-dummy after upload-dummy: $(head -c 300 out.txt)"
fi

# Cancel: a remote `sleep 30` is found with `bgd operation list` while it runs,
# watched with `bgd operation wait` and cancelled with `bgd operation cancel`.
worker_procs() { # processes running in the server's data dir (the worker's work dirs)
  local p
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/cwd" 2>/dev/null)" == "$TMP/data"/* ]] && echo "${p#/proc/}"
  done
}
timeout 60 "$BGD" execute --remote "$REMOTE" command -- exec-empty /bin/sleep 30 >exec-sleep.txt 2>&1 &
EXEC_PID=$!
SLEEP_OP=""
for _ in $(seq 50); do
  timeout 20 "$BGD" operation --remote "$REMOTE" list >list.txt 2>&1
  SLEEP_OP="$(sed -n 's/^Executing: \([^:]*\): .*/\1/p' list.txt | head -n 1)"
  [[ -n "$SLEEP_OP" ]] && break
  sleep 0.2
done
if [[ -n "$SLEEP_OP" ]]; then
  pass "bgd operation list shows the running action as Executing ($SLEEP_OP)"
  running="$(worker_procs | wc -l)"
  timeout 60 "$BGD" operation --remote "$REMOTE" wait "$SLEEP_OP" >wait.txt 2>&1 &
  WAIT_PID=$!
  sleep 0.5
  t0=$SECONDS
  if bgd_op cancel "$SLEEP_OP" && grep -q '^Operation cancelled' out.txt; then
    wait "$EXEC_PID"
    wait "$WAIT_PID"
    took=$((SECONDS - t0))
    for _ in $(seq 50); do [[ -z "$(worker_procs)" ]] && break; sleep 0.1; done
    left="$(worker_procs | wc -l)"
    if grep -q '^Response status code: code: 1$' exec-sleep.txt &&
      grep -q "^Failure: $SLEEP_OP: .*(code=1)" wait.txt && [[ $took -lt 10 && $running -gt 0 && $left -eq 0 ]]; then
      pass "bgd operation cancel: execute and wait end CANCELLED after ${took}s; sleep killed ($running process(es) before, 0 after)"
    else
      fail "bgd operation cancel: after ${took}s, $running process(es) before, $left after"
      sed 's/^/  execute | /' exec-sleep.txt | tail -n 4
      sed 's/^/  wait | /' wait.txt | tail -n 4
    fi
  else
    fail "bgd operation cancel $SLEEP_OP"
  fi
  if bgd_op status "$SLEEP_OP" && grep -q "^Failure: $SLEEP_OP: .*(code=1)" out.txt; then
    pass "bgd operation status after the cancel: CANCELLED (code=1)"
  else
    fail "bgd operation status of the cancelled $SLEEP_OP: $(head -c 300 out.txt)"
  fi
else
  fail "bgd operation list never showed the remote sleep as Executing: $(head -c 300 list.txt)"
fi
for pid in "$EXEC_PID" "${WAIT_PID:-}"; do [[ -n "$pid" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done

# ------------------------------------------------- the protocol-level checks
echo "--- reapi_client.py"
timeout 300 "$VPY" "$HERE/reapi_client.py" --server "127.0.0.1:$PORT" | tee py.txt
py_rc=${PIPESTATUS[0]}
summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed' py.txt | tail -n 1)"
if [[ -n "$summary" ]]; then
  read -r p _ f _ <<<"${summary//,/}"
  PASSED=$((PASSED + p))
  FAILED=$((FAILED + f))
  if [[ $py_rc -ne 0 && $f -eq 0 ]]; then fail "reapi_client.py exited $py_rc"; fi
else
  fail "reapi_client.py printed no summary (exit $py_rc)"
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then fail "the server died during the test"; fi
[[ $FAILED -gt 0 ]] && show_log_tail

# ------------------------------------- a secured server: TLS and bearer tokens
# A second server with [tls] (a CA and a certificate for localhost made here
# with openssl) and [auth] tokens, reached the way bgd users reach a real
# deployment: --remote https://, --server-cert, --auth-token FILE.
echo "--- TLS and tokens"
SEC="$TMP/secure"
mkdir -p "$SEC"
if ! command -v openssl >/dev/null; then
  fail "openssl available (needed to make test certificates)"
else
  (
    cd "$SEC" &&
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=interop test CA" &&
      openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" &&
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf &&
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf
  ) >"$SEC/openssl.log" 2>&1 || { cat "$SEC/openssl.log"; fail "openssl test certificates"; }
  # Tokens: one that may build (read, write, execute), one read-only.
  "$BIN" token new builder --grant cas-read --grant cas-write --grant ac-read --grant execute \
    >"$SEC/builder.token" 2>"$SEC/builder.entry"
  "$BIN" token new reader --grant cas-read --grant ac-read >"$SEC/reader.token" 2>"$SEC/reader.entry"
  # The entries are the [[token]] lines of the stderr output.
  for who in builder reader; do sed -n '/^\[\[token\]\]/,$p' "$SEC/$who.entry"; done >"$SEC/tokens.toml"
  SPORT="$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  cat >"$SEC/config.toml" <<EOF
[tls]
cert = "$SEC/server.pem"
key = "$SEC/server.key"
[auth]
tokens = "$SEC/tokens.toml"
EOF
  "$BIN" --config "$SEC/config.toml" server --listen "127.0.0.1:$SPORT" --data-dir "$SEC/data" >"$SEC/server.log" 2>&1 &
  SEC_PID=$!
  for _ in $(seq 100); do
    "$VPY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$SPORT" 2>/dev/null && break
    sleep 0.1
  done
  SREMOTE="https://localhost:$SPORT"
  TLS_ARGS=(--remote "$SREMOTE" --server-cert "$SEC/ca.pem")
  printf 'secret bytes\n' >"$SEC/s.txt"
  if bgd cas "${TLS_ARGS[@]}" upload-file "$SEC/s.txt"; then
    fail "bgd cas upload-file over TLS without a token was accepted"
  elif grep -qi "unauthenticated" out.txt; then
    pass "bgd cas upload-file over TLS without a token: UNAUTHENTICATED"
  else
    fail "bgd cas upload-file without a token: want UNAUTHENTICATED: $(head -c 300 out.txt)"
  fi
  if bgd cas "${TLS_ARGS[@]}" --auth-token "$SEC/reader.token" upload-file "$SEC/s.txt"; then
    fail "bgd cas upload-file with a read-only token was accepted"
  elif grep -q 'token:reader does not have the cas-write grant' out.txt; then # bgd prints the message, not the code
    pass "bgd cas upload-file with a read-only token: refused, naming the missing grant"
  else
    fail "bgd cas upload-file with a read-only token: want PERMISSION_DENIED: $(head -c 300 out.txt)"
  fi
  SDIG=""
  if (cd "$SEC" && bgd cas "${TLS_ARGS[@]}" --auth-token builder.token upload-file --verify s.txt); then
    SDIG="$(pushed_digest s.txt)"
    [[ "$SDIG" == "$(local_digest "$SEC/s.txt")" ]] && pass "bgd cas upload-file --verify over TLS with a token" ||
      fail "bgd cas upload-file over TLS: digest '$SDIG'"
  else
    fail "bgd cas upload-file over TLS with the builder token"
  fi
  if [[ -n "$SDIG" ]] && bgd cas "${TLS_ARGS[@]}" --auth-token "$SEC/reader.token" download-file --verify "$SDIG" "$SEC/s.got" &&
    cmp -s "$SEC/s.txt" "$SEC/s.got"; then
    pass "bgd cas download-file over TLS with the read-only token"
  else
    fail "bgd cas download-file over TLS with the read-only token"
  fi
  mkdir -p "$SEC/empty-root"
  if bgd execute "${TLS_ARGS[@]}" --auth-token "$SEC/builder.token" command --output-file r.txt \
    --output-directory "$SEC/exec-got" -- "$SEC/empty-root" /bin/sh -c 'echo secured > r.txt' &&
    grep -q '^done: true' out.txt && [[ "$(cat "$SEC/exec-got/r.txt" 2>/dev/null)" == secured ]]; then
    pass "bgd execute command over TLS with a token: output downloaded"
  else
    fail "bgd execute command over TLS with a token: $(head -c 300 out.txt)"
  fi
  if bgd execute "${TLS_ARGS[@]}" --auth-token "$SEC/reader.token" command -- "$SEC/empty-root" /bin/true; then
    fail "bgd execute with a read-only token was accepted"
  else
    pass "bgd execute with a read-only token refused"
  fi
  kill "$SEC_PID" 2>/dev/null
  wait "$SEC_PID" 2>/dev/null
  if grep -q "$(head -c 20 "$SEC/builder.token")" "$SEC/server.log"; then
    fail "the server log contains a token"
  else
    pass "no token in the server log"
  fi
fi
finish
