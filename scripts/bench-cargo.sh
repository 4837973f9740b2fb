#!/usr/bin/env bash
# The rustc wrapper on a real cargo build, against a server started here.
#
# Subject: this repository at HEAD (a two-member workspace with ~190
# crates.io crates: proc-macros such as serde_derive, clap_derive and
# prost-derive; build scripts that compile C: zstd-sys, blake3,
# libmimalloc-sys; binaries). SUBJECT=/path/to/workspace builds another one
# (it is copied twice; it must build offline once fetched).
#
# Measures, each from `cargo clean` with CARGO_INCREMENTAL=0, dev profile:
#   (a) plain `cargo build`
#   (b) through the wrapper, empty server cache
#   (c) through the wrapper after `cargo clean`, warm cache
#   (d) the same warm rebuild from a second checkout in another directory,
#       with another CARGO_HOME
#   (e) as (d) with an empty wrapper cache too (a second machine: every
#       dep-info pre-pass runs)
# and, for comparison, sccache (installed from crates.io into the bench
# directory) cold, (c) and (d).
#
# Usage: scripts/bench-cargo.sh            (about 20 minutes on 2 cores)
# Env:   BENCH_DIR (default /tmp/distbuild-bench), SUBJECT, SCCACHE (a
#        sccache binary to use instead of installing one), JOBS (cargo -j).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
B=${BENCH_DIR:-/tmp/distbuild-bench}
JOBS=${JOBS:-$(nproc)}
rm -rf "$B"
mkdir -p "$B"

echo "== building cargo-distbuild and distbuild-rustc (release)"
cargo build --release --quiet --bin cargo-distbuild --bin distbuild-rustc
DB=$REPO/target/release/cargo-distbuild

copy_subject() { # DEST
    mkdir -p "$1"
    if [ -n "${SUBJECT:-}" ]; then
        (cd "$SUBJECT" && tar --exclude=./target -cf - .) | tar -xf - -C "$1"
    else
        git -C "$REPO" archive HEAD | tar -xf - -C "$1"
    fi
}
A=$B/checkout-a
D=$B/elsewhere/deeper/checkout-d
copy_subject "$A"
copy_subject "$D"
HOME_D=$B/cargo-home-d
echo "== fetching dependencies (default CARGO_HOME, and a second one for (d))"
(cd "$A" && cargo fetch --quiet)
(cd "$D" && CARGO_HOME=$HOME_D cargo fetch --quiet)

export CARGO_INCREMENTAL=0
unset RUSTC_WRAPPER DISTBUILD_SERVER DISTBUILD_CONFIG || true
export XDG_CONFIG_HOME=$B/config XDG_STATE_HOME=$B/state XDG_CACHE_HOME=$B/cache

now() { date +%s.%N; }
declare -A T
timed() { # NAME DIR CMD...
    local name=$1 dir=$2
    shift 2
    (cd "$dir" && cargo clean --quiet)
    local t0
    t0=$(now)
    (cd "$dir" && "$@" > "$B/$name.log" 2>&1) || { echo "$name failed, see $B/$name.log"; tail -20 "$B/$name.log"; exit 1; }
    T[$name]=$(python3 -c "print($(now) - $t0)")
    printf '%-28s %7.1f s\n' "$name" "${T[$name]}"
}

echo "== (a) plain cargo build"
timed a "$A" cargo build --offline -j "$JOBS"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$DB" server --listen "127.0.0.1:$PORT" --data-dir "$B/server" > "$B/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; [ -n "${SCCACHE_BIN:-}" ] && SCCACHE_DIR=$B/sccache "$SCCACHE_BIN" --stop-server >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
URL=grpc://127.0.0.1:$PORT

mark() { wc -l < "$B/state/cargo-distbuild/stats.jsonl" 2>/dev/null || echo 0; }
summarize() { # NAME FROM_LINE
    python3 - "$B/state/cargo-distbuild/stats.jsonl" "$1" "$2" <<'EOF'
import json, sys, collections
path, name, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
recs = [json.loads(l) for l in open(path)][start:]
comp = [r for r in recs if r["krate"]]
ok = [r for r in comp if r["exit"] == 0]
c = collections.Counter(r["outcome"] for r in ok)
why = collections.Counter(r.get("reason") for r in ok if r["outcome"] == "local")
hits = c["hit"]
print(f"   {name}: {len(ok)} rustc compiles (+{len(comp)-len(ok)} failing probes): {hits} hits ({100.0*hits/max(1,len(ok)):.1f}%), {c['remote']} remote, {c['local']} local {dict(why)}")
open(f"{path}.{name}", "w").write(f"{hits} {len(ok)}\n")
EOF
}

wrapped() { # NAME DIR [VAR=VALUE...] [-- CARGO ARGS...]
    local name=$1 dir=$2
    shift 2
    local envs=() extra=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift && extra=("$@")
    local m
    m=$(mark)
    timed "$name" "$dir" env "${envs[@]}" "$DB" build --server "$URL" --offline -j "$JOBS" "${extra[@]}"
    summarize "$name" "$m"
}

echo "== (b) wrapper, cold cache"
wrapped b "$A"
echo "== (c) wrapper, warm cache"
wrapped c "$A"
echo "== (d) wrapper, second checkout, other CARGO_HOME"
wrapped d "$D" CARGO_HOME="$HOME_D"
echo "== (e) as (d), empty wrapper cache (another machine)"
wrapped e "$D" CARGO_HOME="$HOME_D" DISTBUILD_CACHE_DIR="$B/wrapper-cache-e"

if [ -z "${SUBJECT:-}" ]; then
    echo "== the share of (c) that is C compiled by build scripts (run by cargo, not rustc)"
    wrapped c-sys "$A" -- -p zstd-sys -p libmimalloc-sys -p blake3
fi

SCCACHE_BIN=${SCCACHE:-}
if [ -z "$SCCACHE_BIN" ]; then
    echo "== installing sccache from crates.io (local disk cache only)"
    cargo install --quiet --locked sccache --no-default-features --root "$B/tools" > "$B/sccache-install.log" 2>&1
    SCCACHE_BIN=$B/tools/bin/sccache
fi
export SCCACHE_DIR=$B/sccache SCCACHE_CACHE_SIZE=50G
"$SCCACHE_BIN" --start-server > /dev/null
sc() { # NAME DIR [env...]
    local name=$1 dir=$2
    shift 2
    "$SCCACHE_BIN" --zero-stats > /dev/null
    timed "$name" "$dir" env RUSTC_WRAPPER="$SCCACHE_BIN" "$@" cargo build --offline -j "$JOBS"
    "$SCCACHE_BIN" --show-stats --stats-format json > "$B/$name.sccache.json"
    python3 - "$B/$name.sccache.json" "$name" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
hits = sum(s["cache_hits"]["counts"].values())
miss = sum(s["cache_misses"]["counts"].values())
nc = sum(s.get("not_cached", {}).values()) if isinstance(s.get("not_cached"), dict) else 0
print(f"   {sys.argv[2]}: {hits} hits, {miss} misses, {nc} not cacheable")
EOF
}
echo "== sccache"
sc sccache-cold "$A"
sc sccache-c "$A"
sc sccache-d "$D" CARGO_HOME="$HOME_D"

a=${T[a]}
pct() { python3 -c "print(f'{100 * $1 / $a:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $a:.2f}')"; }
read -r dh dn < "$B/state/cargo-distbuild/stats.jsonl.d"
echo
echo "| measure | time | vs (a) | target |"
echo "| --- | --- | --- | --- |"
printf '| (a) plain cargo build | %.1f s | 1.00x | |\n' "$a"
printf '| (b) wrapper, cold cache | %.1f s | %sx | <= 1.3x |\n' "${T[b]}" "$(ratio "${T[b]}")"
printf '| (c) wrapper, warm, after cargo clean | %.1f s | %s%% | <= 20%%, < sccache (c) |\n' "${T[c]}" "$(pct "${T[c]}")"
printf '| (d) second checkout, other CARGO_HOME | %.1f s | %s%% | <= 20%%, >= 95%% hits (%s of %s) |\n' "${T[d]}" "$(pct "${T[d]}")" "$dh" "$dn"
printf '| (e) as (d), empty wrapper cache | %.1f s | %s%% | |\n' "${T[e]}" "$(pct "${T[e]}")"
[ -n "${T[c-sys]:-}" ] && printf '| of (c): C build scripts alone (zstd-sys, mimalloc, blake3) | %.1f s | %s%% | |\n' "${T[c-sys]}" "$(pct "${T[c-sys]}")"
printf '| sccache, cold | %.1f s | %sx | |\n' "${T[sccache-cold]}" "$(ratio "${T[sccache-cold]}")"
printf '| sccache (c) | %.1f s | %s%% | |\n' "${T[sccache-c]}" "$(pct "${T[sccache-c]}")"
printf '| sccache (d) | %.1f s | %s%% | |\n' "${T[sccache-d]}" "$(pct "${T[sccache-d]}")"
echo
echo "logs and stats: $B"
