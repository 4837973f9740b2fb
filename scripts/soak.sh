#!/usr/bin/env bash
# Soak test (issue 9): builds the release binary, starts `cargo-distbuild
# server` on a free loopback port with a temporary data directory and short
# timeouts, and for DURATION mixes valid build-client load (batch and
# ByteStream uploads, reads, FindMissing, ActionCache writes, small actions
# through `cargo-distbuild exec`) with hostile requests (zstd batch blobs
# claiming huge sizes, a zstd bomb, a 10,000-level input tree, a 100 KB
# resource name, interrupted uploads, idle TCP connections, an action that
# leaves a `setsid` daemon, one that outlives its timeout). Then it checks
# that the server is alive, every acknowledged blob and ActionCache entry
# reads back with its digest, RSS and open fds returned within 64 MiB and 32
# of the baseline, idle connections were closed, and no action process is
# left. Loopback only; stops by itself. Each check prints PASS or FAIL; the
# exit status is 1 if any failed. The driver is examples/soak/.
#
# Usage: scripts/soak.sh [DURATION=3m] [SETTLE=60s]
#   DURATION, SETTLE: seconds, or with an s or m suffix. SETTLE is how long
#   the server gets, after the load, to give memory, fds and processes back.
# Environment: SOAK_SKIP=attack,... leaves attacks out (long_resource_name,
#   interrupted_uploads, setsid_daemon, timeout_action, zstd_bomb_batch,
#   deep_dag, zstd_huge_claim, idle_connections); SOAK_SET='section.key=value;...'
#   adds server settings (e.g. the idle-connection timeout, made short).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds() {
  case "$1" in
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
duration=$(seconds "${1:-3m}")
settle=$(seconds "${2:-60s}")

cargo build --release --quiet --bin cargo-distbuild --example soak

# Every action the soak runs carries this string in its command line.
export SOAK_MARKER="distbuild-soak-$$-$RANDOM"
status=0
target/release/examples/soak target/release/cargo-distbuild "$duration" "$settle" || status=$?

# The driver has stopped the server by now: a process still carrying the
# marker is an action's descendant that outlived the server too.
if leftovers=$(pgrep -f -- "$SOAK_MARKER"); then
  echo "  FAIL no action process after the server stopped"
  ps -o pid=,args= -p "$(echo "$leftovers" | paste -sd,)" | sed 's/^/      /' || true
  # Started by this soak's actions: ended here, by process id.
  # shellcheck disable=SC2086
  kill -KILL $leftovers 2>/dev/null || true
  status=1
else
  echo "  PASS no action process after the server stopped"
fi
exit "$status"
