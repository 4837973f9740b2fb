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
#   (b) through the wrapper, empty server cache, the server's built-in
#       workers on this machine
#   (c) through the wrapper after `cargo clean`, warm cache
#   (d) the same warm rebuild from a second checkout in another directory,
#       with another CARGO_HOME
#   (e) as (d) with an empty wrapper cache too (a second machine: every
#       dep-info pre-pass runs)
#   (f) as (b), but the server has no built-in workers: its one worker is a
#       `cargo-distbuild worker` in a network namespace behind a veth pair
#       with a 2 ms round trip and 1 Gbit/s each way (a worker in the next
#       rack). The rate is `tc tbf` on both ends of the pair; the delay is
#       `tc netem` when the kernel has it, else examples/delay_proxy.rs (a
#       TCP delay line on the host that holds each chunk 1 ms each way),
#       through which the worker reaches the server in either case. Needs
#       root and `ip netns`; skipped with a message otherwise.
# and, for comparison, sccache (installed from crates.io into the bench
# directory) cold, (c) and (d).
#
# For (b) and (f) it reports the bytes moved per build: between cargo's
# side (the wrappers) and the server, from the server's /metrics
# (distbuild_grpc_{received,sent}_bytes_total: gRPC messages, framing
# included); and over the worker's link, from the delay line's counts (TCP
# payload) and the veth pair's counters (frames: TCP/IP headers included).
# In (f) the server's counts include the worker's traffic; cargo's side is
# the server's total minus the worker's payload (HTTP/2 frame headers make
# it approximate, well under 1%).
#
# C compiled by build scripts through the C compiler wrapper (stats records
# with "tool": "cc") is counted apart from rustc compiles.
#
# Usage: scripts/bench-cargo.sh            (about 25 minutes on 2 cores)
# Quick check of every step (a minute or two):
#   SUBJECT=tests/fixtures/cargo-ws PROFILE=debug SKIP_SCCACHE=1 scripts/bench-cargo.sh
# Env:   BENCH_DIR (default /tmp/distbuild-bench), SUBJECT, SCCACHE (a
#        sccache binary to use instead of installing one), SKIP_SCCACHE=1,
#        SKIP_NET=1 (no (f)), JOBS (cargo -j), PROFILE (release, or debug:
#        the binaries of the dev profile), CARGO_TARGET_DIR (where this
#        repository's binaries are built; the subject's builds never use it),
#        NET_DELAY_US (one way, default 1000), NET_RATE (default 1gbit),
#        WORKER_SLOTS (the remote worker's, default: the built-in workers'
#        count, the number of CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
B=${BENCH_DIR:-/tmp/distbuild-bench}
JOBS=${JOBS:-$(nproc)}
PROFILE=${PROFILE:-release}
NET_DELAY_US=${NET_DELAY_US:-1000}
NET_RATE=${NET_RATE:-1gbit}
WORKER_SLOTS=${WORKER_SLOTS:-$(nproc)}
[ -n "${SUBJECT:-}" ] && SUBJECT=$(realpath "$SUBJECT")
rm -rf "$B"
mkdir -p "$B"

# Everything started here, undone on any exit (success, failure, signal).
PIDS=()
NS=""
VETH=""
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
    if [ -n "$NS" ]; then
        # Whatever still runs in the namespace was started by this run.
        for pid in $(ip netns pids "$NS" 2> /dev/null); do kill -9 "$pid" 2> /dev/null || true; done
        ip netns del "$NS" 2> /dev/null || true
    fi
    [ -n "$VETH" ] && ip link del "$VETH" 2> /dev/null || true
    if [ -n "${SCCACHE_BIN:-}" ]; then
        SCCACHE_DIR=$B/sccache "$SCCACHE_BIN" --stop-server > /dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
case $PROFILE in
    release) BIN=$TARGET/release PROFILE_FLAG=(--release) ;;
    debug) BIN=$TARGET/debug PROFILE_FLAG=() ;;
    *) echo "PROFILE is release or debug" >&2; exit 2 ;;
esac
echo "== building cargo-distbuild, distbuild-rustc and the delay line ($PROFILE)"
cargo build "${PROFILE_FLAG[@]}" --quiet --bin cargo-distbuild --bin distbuild-rustc --bin distbuild-cc --example delay_proxy
DB=$BIN/cargo-distbuild
PROXY=$BIN/examples/delay_proxy
# The subject's builds use their own target directories.
unset CARGO_TARGET_DIR

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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # HOST PORT LOG
    for _ in $(seq 200); do (echo > "/dev/tcp/$1/$2") 2> /dev/null && return 0; sleep 0.1; done
    echo "nothing listens on $1:$2, see $3"; tail -20 "$3"; exit 1
}
# Starts a server on loopback with /metrics on a port of its own.
# Sets URL_<NAME> and METRICS_<NAME>.
start_server() { # NAME [SERVER ARGS...]
    local name=$1 port mport
    shift
    port=$(free_port)
    mport=$(free_port)
    printf '[server]\nmetrics_listen = "127.0.0.1:%s"\n' "$mport" > "$B/server-$name.toml"
    "$DB" --config "$B/server-$name.toml" server --listen "127.0.0.1:$port" --data-dir "$B/server-$name" "$@" \
        > "$B/server-$name.log" 2>&1 &
    PIDS+=($!)
    wait_port 127.0.0.1 "$port" "$B/server-$name.log"
    wait_port 127.0.0.1 "$mport" "$B/server-$name.log"
    printf -v "URL_$name" 'grpc://127.0.0.1:%s' "$port"
    printf -v "METRICS_$name" 'http://127.0.0.1:%s/metrics' "$mport"
}
# "RECEIVED SENT": the server's gRPC bytes so far, all methods.
grpc_bytes() { # METRICS_URL
    python3 - "$1" << 'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
tot = {"received": 0.0, "sent": 0.0}
for line in text.splitlines():
    for k in tot:
        if line.startswith(f"distbuild_grpc_{k}_bytes_total"):
            tot[k] += float(line.rsplit(" ", 1)[1])
print(int(tot["received"]), int(tot["sent"]))
EOF
}
metric() { # METRICS_URL NAME: the sum of its samples
    python3 - "$1" "$2" << 'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
              if l.startswith(sys.argv[2] + " ") or l.startswith(sys.argv[2] + "{"))))
EOF
}
mb() { python3 -c "print(f'{$1 / 1e6:,.1f} MB')"; }

start_server b
URL=$URL_b

STATS=$B/state/cargo-distbuild/stats.jsonl
mark() { if [ -f "$STATS" ]; then wc -l < "$STATS"; else echo 0; fi; }
# Prints rustc and C compiles of one build apart; leaves "$B/NAME.counts":
# rustc hits, rustc compiles, C hits, C compiles.
summarize() { # NAME FROM_LINE
    python3 - "$STATS" "$1" "$2" "$B/$1.counts" << 'EOF'
import json, sys, collections
path, name, start, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
recs = [json.loads(l) for l in open(path)][start:]
def line(kind, comp):
    ok = [r for r in comp if r["exit"] == 0]
    c = collections.Counter(r["outcome"] for r in ok)
    why = collections.Counter(r.get("reason") for r in ok if r["outcome"] == "local")
    print(f"   {name}: {len(ok)} {kind} compiles (+{len(comp) - len(ok)} failing): {c['hit']} hits "
          f"({100.0 * c['hit'] / max(1, len(ok)):.1f}%), {c['remote']} remote, {c['local']} local {dict(why)}")
    return c["hit"], len(ok)
rustc = [r for r in recs if "tool" not in r and r.get("krate")]
cc = [r for r in recs if r.get("tool") == "cc"]
rh, rn = line("rustc", rustc)
ch, cn = line("C", cc)
open(out, "w").write(f"{rh} {rn} {ch} {cn}\n")
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

echo "== (b) wrapper, cold cache, built-in workers"
read -r r0 s0 <<< "$(grpc_bytes "$METRICS_b")"
wrapped b "$A"
read -r r1 s1 <<< "$(grpc_bytes "$METRICS_b")"
BYTES_b_up=$((r1 - r0)) BYTES_b_down=$((s1 - s0))
echo "   b: cargo's side uploaded $(mb $BYTES_b_up), downloaded $(mb $BYTES_b_down)"

# (f): a server without workers, one worker in a namespace behind a slow link.
net_skip=""
if [ -n "${SKIP_NET:-}" ]; then
    net_skip="SKIP_NET is set"
elif [ "$(id -u)" != 0 ]; then
    net_skip="needs root (a network namespace and a veth pair)"
elif ! ip netns list > /dev/null 2>&1; then
    net_skip="\`ip netns\` is unavailable"
fi
NET_HOW=""
net_setup() {
    local sub=$((($$ % 250) + 1))
    NS=distbuild-bench-$$
    VETH=dbb$$h
    local peer=dbb$$w
    HOST_IP=10.254.$sub.1 WORKER_IP=10.254.$sub.2
    ip netns add "$NS"
    ip link add "$VETH" type veth peer name "$peer"
    ip link set "$peer" netns "$NS"
    ip addr add "$HOST_IP/30" dev "$VETH"
    ip link set "$VETH" up
    ip -n "$NS" addr add "$WORKER_IP/30" dev "$peer"
    ip -n "$NS" link set "$peer" up
    ip -n "$NS" link set lo up
    # netem when the kernel has it: delay and rate in one qdisc each way;
    # else tbf for the rate, the delay line for the delay.
    local half_us=$NET_DELAY_US
    if tc qdisc add dev "$VETH" root netem delay "${half_us}us" rate "$NET_RATE" limit 10000 2> /dev/null; then
        tc -n "$NS" qdisc add dev "$peer" root netem delay "${half_us}us" rate "$NET_RATE" limit 10000
        PROXY_DELAY_US=0
        NET_HOW="tc netem: ${half_us} us each way, $NET_RATE"
    else
        tc qdisc add dev "$VETH" root tbf rate "$NET_RATE" burst 256kb latency 5ms
        tc -n "$NS" qdisc add dev "$peer" root tbf rate "$NET_RATE" burst 256kb latency 5ms
        PROXY_DELAY_US=$NET_DELAY_US
        NET_HOW="tc tbf $NET_RATE each way (no netem in this kernel), delay line ${NET_DELAY_US} us each way"
    fi
    echo "   link: $NET_HOW"
}
veth_bytes() { # "RX TX" of the host end: RX is what the worker sent
    echo "$(cat "/sys/class/net/$VETH/statistics/rx_bytes") $(cat "/sys/class/net/$VETH/statistics/tx_bytes")"
}
# The link as the worker sees it, through a second delay line of the same
# delay to a test peer on the host: round trip (median of 200) and 100 MB
# each way. Prints one line; LINK_MEASURED keeps it for the summary.
link_check() {
    local peer pport
    peer=$(free_port)
    python3 - "$peer" > "$B/link-peer.log" 2>&1 << 'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    c, _ = s.accept()
    mode = c.recv(1)
    if mode == b"e":
        while (d := c.recv(64)):
            c.sendall(d)
    elif mode == b"d":
        buf = bytes(1 << 20)
        for _ in range(100):
            c.sendall(buf)
    else:
        while c.recv(1 << 20):
            pass
        c.sendall(b"k")
    c.close()
EOF
    PIDS+=($!)
    pport=$(free_port)
    "$PROXY" "$HOST_IP:$pport" "127.0.0.1:$peer" "$PROXY_DELAY_US" > "$B/link-proxy.log" 2>&1 &
    PIDS+=($!)
    wait_port 127.0.0.1 "$peer" "$B/link-peer.log"
    wait_port "$HOST_IP" "$pport" "$B/link-proxy.log"
    LINK_MEASURED=$(ip netns exec "$NS" python3 - "$HOST_IP" "$pport" << 'EOF'
import socket, sys, time
addr = (sys.argv[1], int(sys.argv[2]))
c = socket.create_connection(addr); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.sendall(b"e")
rtt = []
for _ in range(200):
    t = time.perf_counter(); c.sendall(b"ping"); c.recv(64); rtt.append(time.perf_counter() - t)
c.close()
c = socket.create_connection(addr); c.sendall(b"d"); n = 0; t = time.perf_counter()
while (d := c.recv(1 << 20)):
    n += len(d)
down = n / (time.perf_counter() - t) / 1e6
c = socket.create_connection(addr); c.sendall(b"u"); buf = bytes(1 << 20); t = time.perf_counter()
for _ in range(100):
    c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1)
up = 100 * (1 << 20) / (time.perf_counter() - t) / 1e6
print(f"RTT {sorted(rtt)[100] * 1e3:.2f} ms (median), {down:.0f} MB/s to the worker, {up:.0f} MB/s from it")
EOF
    )
    echo "   link as measured: $LINK_MEASURED"
}
proxy_bytes() { # "TO_SERVER FROM_SERVER"
    python3 -c "import json; s = json.load(open('$B/proxy.json')); print(s['to_upstream'], s['from_upstream'])"
}
run_net() {
    start_server f --workers 0
    net_setup
    link_check
    local pport
    pport=$(free_port)
    "$PROXY" "$HOST_IP:$pport" "${URL_f#grpc://}" "$PROXY_DELAY_US" "$B/proxy.json" > "$B/proxy.log" 2>&1 &
    PIDS+=($!)
    wait_port "$HOST_IP" "$pport" "$B/proxy.log"
    ip netns exec "$NS" "$DB" worker --scheduler "grpc://$HOST_IP:$pport" --slots "$WORKER_SLOTS" \
        --work-dir "$B/worker-f" --name next-rack > "$B/worker-f.log" 2>&1 &
    PIDS+=($!)
    local slots=0
    for _ in $(seq 300); do
        slots=$(metric "$METRICS_f" distbuild_workers_slots)
        [ "$slots" -ge "$WORKER_SLOTS" ] && break
        sleep 0.1
    done
    [ "$slots" -ge "$WORKER_SLOTS" ] || { echo "the worker did not connect, see $B/worker-f.log"; tail -20 "$B/worker-f.log"; exit 1; }
    echo "   worker connected ($slots slots) through $HOST_IP:$pport"
    sleep 0.2 # the proxy's counts file catches up with the connection
    local r0 s0 r1 s1 p0 q0 p1 q1 v0 w0 v1 w1
    read -r r0 s0 <<< "$(grpc_bytes "$METRICS_f")"
    read -r p0 q0 <<< "$(proxy_bytes)"
    read -r v0 w0 <<< "$(veth_bytes)"
    URL=$URL_f wrapped f "$A" DISTBUILD_CACHE_DIR="$B/wrapper-cache-f"
    sleep 0.2
    read -r r1 s1 <<< "$(grpc_bytes "$METRICS_f")"
    read -r p1 q1 <<< "$(proxy_bytes)"
    read -r v1 w1 <<< "$(veth_bytes)"
    BYTES_f_wup=$((p1 - p0)) BYTES_f_wdown=$((q1 - q0))
    BYTES_f_vup=$((v1 - v0)) BYTES_f_vdown=$((w1 - w0))
    BYTES_f_up=$((r1 - r0 - BYTES_f_wup)) BYTES_f_down=$((s1 - s0 - BYTES_f_wdown))
    echo "   f: cargo's side uploaded $(mb $BYTES_f_up), downloaded $(mb $BYTES_f_down) (server's total minus the worker's)"
    echo "   f: the worker's link: worker to server $(mb $BYTES_f_wup) ($(mb $BYTES_f_vup) on the wire)," \
        "server to worker $(mb $BYTES_f_wdown) ($(mb $BYTES_f_vdown) on the wire)"
    local executed
    executed=$(metric "$METRICS_f" distbuild_worker_actions_total)
    echo "   f: the remote worker finished $executed actions"
}
if [ -z "$net_skip" ]; then
    echo "== (f) wrapper, cold cache, one remote worker behind a 2 ms, 1 Gbit/s link"
    run_net
else
    echo "== (f) skipped: $net_skip"
fi

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

if [ -z "${SKIP_SCCACHE:-}" ]; then
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
        python3 - "$B/$name.sccache.json" "$name" << 'EOF'
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
else
    echo "== sccache skipped (SKIP_SCCACHE is set)"
fi

a=${T[a]}
pct() { python3 -c "print(f'{100 * $1 / $a:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $a:.2f}')"; }
cached() { # NAME: "R of N rustc, C of M C compiles from the cache"
    local rh rn ch cn
    read -r rh rn ch cn < "$B/$1.counts"
    echo "$rh of $rn rustc, $ch of $cn C from the cache"
}
cmd="scripts/bench-cargo.sh"
[ -n "${SUBJECT:-}" ] && cmd="SUBJECT=${SUBJECT#"$REPO"/} $cmd"
[ "$PROFILE" != release ] && cmd="PROFILE=$PROFILE $cmd"
[ -n "${SKIP_SCCACHE:-}" ] && cmd="SKIP_SCCACHE=1 $cmd"
echo
echo "For README.md (the command, then the table; $(nproc) cores, -j$JOBS, $(date -u +%Y-%m-%d)):"
echo
echo '```sh'
echo "$cmd"
echo '```'
echo
echo "| measure | time | vs (a) | target |"
echo "| --- | --- | --- | --- |"
printf '| (a) plain `cargo build` | %.1f s | 1.00x | |\n' "$a"
printf '| (b) `cargo distbuild build`, empty cache, built-in workers on this machine | %.1f s | %sx | <= 1.10x |\n' \
    "${T[b]}" "$(ratio "${T[b]}")"
if [ -n "${T[f]:-}" ]; then
    printf '| (f) as (b), one remote worker in the next rack (2 ms RTT, %s) | %.1f s | %sx | beside (b) |\n' \
        "$NET_RATE" "${T[f]}" "$(ratio "${T[f]}")"
else
    echo "| (f) as (b), one remote worker in the next rack (2 ms RTT, $NET_RATE) | skipped: $net_skip | | |"
fi
printf '| (c) the same after `cargo clean`, warm cache (%s) | %.1f s | %s%% | <= 8%%, C from the cache |\n' \
    "$(cached c)" "${T[c]}" "$(pct "${T[c]}")"
printf '| (d) a second checkout, another `CARGO_HOME` (%s) | %.1f s | %s%% | <= 8%%, C from the cache |\n' \
    "$(cached d)" "${T[d]}" "$(pct "${T[d]}")"
printf '| (e) as (d), empty wrapper cache too (%s) | %.1f s | %s%% | |\n' "$(cached e)" "${T[e]}" "$(pct "${T[e]}")"
if [ -n "${T[c-sys]:-}" ]; then
    printf '| part of (c): the packages whose build scripts compile C (zstd-sys, mimalloc, blake3) | %.1f s | %s%% | |\n' \
        "${T[c-sys]}" "$(pct "${T[c-sys]}")"
fi
if [ -n "${T[sccache-cold]:-}" ]; then
    printf '| sccache, empty cache | %.1f s | %sx | |\n' "${T[sccache-cold]}" "$(ratio "${T[sccache-cold]}")"
    printf '| sccache (c) | %.1f s | %s%% | |\n' "${T[sccache-c]}" "$(pct "${T[sccache-c]}")"
    printf '| sccache (d) | %.1f s | %s%% | |\n' "${T[sccache-d]}" "$(pct "${T[sccache-d]}")"
fi
echo
echo "| bytes per build | cargo's side <-> server: up / down | worker's link: to / from the server (on the wire) |"
echo "| --- | --- | --- |"
echo "| (b) | $(mb "$BYTES_b_up") / $(mb "$BYTES_b_down") | (in the server process) |"
if [ -n "${T[f]:-}" ]; then
    echo "| (f) | $(mb "$BYTES_f_up") / $(mb "$BYTES_f_down") | $(mb "$BYTES_f_wup") / $(mb "$BYTES_f_wdown") ($(mb "$BYTES_f_vup") / $(mb "$BYTES_f_vdown")) |"
    echo
    echo "(f)'s link: $NET_HOW; as measured: $LINK_MEASURED"
fi
echo
echo "logs and stats: $B"
