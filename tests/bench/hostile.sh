#!/usr/bin/env bash
# Benchmark of how this host's own nix is served (loopback narinfo and NAR
# requests) while hostile clients on the network hold connections to peerix:
# idle ones, ones that never send the body they announce, and ones that ask
# for a large NAR and never read it. It prints figures; it asserts nothing.
#
# Run as root from the repository: sudo tests/bench/hostile.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build);
# PEERIX_ARGS="--workers 32" adds flags to peerix.
# The attackers run in a network namespace of ours joined to this one by a
# veth pair; they connect only to our end of it, the loopback clients only
# to 127.0.0.1. Everything is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
seconds=${BENCH_SECONDS:-5}              # wrk and probes, per cell
read -r -a counts <<<"${BENCH_COUNTS:-16 256 2000}"
read -r -a kinds <<<"${BENCH_KINDS:-idle body reader}"
peerix_nofile=${BENCH_PEERIX_NOFILE:-1024} # peerix's soft open-files limit
wrk_conns=4
read -r -a extra_args <<<"${PEERIX_ARGS:-}"
work=$(mktemp -d /tmp/peerix-benchhostile.XXXXXX)
# The namespace and the veth ends carry our PID: unique, at most 15 chars.
# Their /30 is picked from 10.79.0.0/16 by our PID too, so two runs at once
# do not collide; no route here may reach it already.
ns=pxhb$$ veth_host=pxhb$$ veth_ns=pxhba$$
slot=$(($$ % 16384))
net=10.79.$((slot / 64)).$((slot % 64 * 4))
host_ip=10.79.$((slot / 64)).$((slot % 64 * 4 + 1))
ns_ip=10.79.$((slot / 64)).$((slot % 64 * 4 + 2))
ns_made=
daemon_pid=
peerix_pid=

# Kills a background job of ours and its children (a probe loop's curl):
# by process id and parent id only.
stop_job() {
    pkill -TERM -P "$1" 2>/dev/null || true
    kill -TERM "$1" 2>/dev/null || true
}

cleanup() {
    # Attackers, probe loops, wrk or curl still running, then peerix, then
    # the daemon and its workers; the namespace (and so the veth pair) once
    # nothing runs in it.
    for pid in $(jobs -p); do
        [ "$pid" = "$daemon_pid" ] || stop_job "$pid"
    done
    [ -z "$daemon_pid" ] || stop_daemon "$daemon_pid"
    for pid in $(jobs -p); do wait "$pid" 2>/dev/null || true; done
    [ -z "$ns_made" ] || ip netns del "$ns" 2>/dev/null || true
    ip link del "$veth_host" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix wrk curl busybox python3 ip ss" nix-bin wrk curl busybox-static python3 iproute2

# Runs a command of many seconds in the background and waits for it: bash
# runs a trap only once its foreground command is done, but interrupts a
# wait at once. So Ctrl-C stops the benchmark now, not after it.
interruptible() { "$@" & wait "$!"; }

log "making the attackers' namespace $ns ($ns_ip), joined by a veth pair to $host_ip here"
if ip -4 route show match "$net/30" | grep -qv '^default' || [ -n "$(ip -o -4 addr show to "$net/30")" ]; then
    echo "$net/30 is in use here already; not touching it" >&2
    exit 1
fi
ip netns add "$ns"
ns_made=1
ip -n "$ns" link set lo up
ip link add "$veth_host" type veth peer name "$veth_ns" netns "$ns"
ip addr add "$host_ip/30" dev "$veth_host"
ip link set "$veth_host" up
ip -n "$ns" addr add "$ns_ip/30" dev "$veth_ns"
ip -n "$ns" link set "$veth_ns" up

offline_nix "$work"
log "building the store (cached after the first run)"
build_bench_paths "$repo" "$work"
store=$work/a
nix copy --no-check-sigs --to "$store" "$big" "$top"

# In a session of its own, so a Ctrl-C at the terminal does not reach it:
# it would die before its workers, which nothing would then reap. The
# cleanup stops it, workers first.
NIX_DAEMON_SOCKET_PATH=$work/d.sock setsid nix-daemon --store "$store" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
wait_for "nix-daemon" test -S "$work/d.sock"

peerix=$(peerix_bin "$repo")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0",0)); print(s.getsockname()[1])'; }

# A fresh peerix for every cell, on a fresh port, so no cell inherits the
# threads, memory or connections of the one before, and VmHWM is the peak
# of this cell alone. Bound to every address, LAN mode off, as a host's
# daemon would run with no LAN; its soft open-files limit is set as a
# service would get it (the hard one is left, so it may raise it itself).
start_peerix() { # start_peerix LOG: sets peerix_pid, port, url, hit_url, remote
    peerix_log=$1
    port=$(free_port)
    url=http://127.0.0.1:$port
    hit_url=$url/$hit.narinfo
    remote=http://$host_ip:$port
    (
        hard=$(ulimit -Hn)
        [ "$hard" = unlimited ] || [ "$hard" -ge "$peerix_nofile" ] || ulimit -Hn "$peerix_nofile"
        ulimit -Sn "$peerix_nofile"
        exec "$peerix" --bind 0.0.0.0 --port "$port" --no-lan --no-filter --scan-interval 0 \
            --daemon-socket "$work/d.sock" --store-root "$store" --state-dir "$work/state" \
            "${extra_args[@]}"
    ) >"$peerix_log" 2>&1 &
    peerix_pid=$!
    for _ in $(seq 600); do # 60 s
        curl -sf -m 5 "$url/health" 2>/dev/null | grep -q '"scans":[1-9]' && return 0
        kill -0 "$peerix_pid" 2>/dev/null || fail "peerix exited: $(tail -3 "$peerix_log")"
        sleep 0.1
    done
    fail "timed out waiting for peerix's first scan"
}
stop_peerix() {
    kill "$peerix_pid" 2>/dev/null || true
    wait "$peerix_pid" 2>/dev/null || true
    peerix_pid=
}
in_ns() { ip netns exec "$ns" "$@"; }
field() { sed -n "s/^$2: //p" <<<"$1"; } # field NARINFO-TEXT KEY

notes=$work/notes
: >"$notes"
note() { printf '%s\n' "$*" | tee -a "$notes" >&2; }
fail() { echo "$*" >&2; exit 1; }

# Sanity checks: what the attackers and the loopback clients ask for must
# be answered as expected, or the figures mean nothing.
log "checking answers"
big_hash=$(hash_of "$big")
hit=$(hash_of "$top")
start_peerix "$work/peerix-check.log"
nofile_seen=$(awk '/^Max open files/ { print $4 " (hard " $5 ")" }' "/proc/$peerix_pid/limits")
[ "$(curl -s -o /dev/null -m 10 -w '%{http_code}' "$hit_url")" = 200 ] || fail "$hit_url is not a hit"
info=$(curl -sf -m 10 "$url/$big_hash.narinfo") || fail "peerix does not have $big"
nar_size=$(field "$info" NarSize)
nar_path=$(field "$info" URL)
{ [ -n "$nar_path" ] && [ -n "$nar_size" ]; } || fail "no URL or NarSize in $url/$big_hash.narinfo"
[ "$(in_ns curl -s -o /dev/null -m 10 -w '%{http_code}' "$remote/local/nix-cache-info")" = 200 ] ||
    fail "$remote/local/nix-cache-info does not answer 200 in $ns"
info_local=$(in_ns curl -sf -m 10 "$remote/local/$big_hash.narinfo") ||
    fail "$remote/local/$big_hash.narinfo does not answer 200 in $ns"
local_nar_path=/local/$(field "$info_local" URL)
[ "$(in_ns curl -s -o /dev/null -m 30 -w '%{http_code} %{size_download}' "$remote$local_nar_path")" = "200 $nar_size" ] ||
    fail "$remote$local_nar_path does not give the $nar_size-byte NAR in $ns"
stop_peerix

results=$work/results
: >"$results"

# Sequential narinfo requests on fresh connections until the window ends,
# each given 10 s (curl writes 000 for one that timed out); on stdout.
probe_loop() { # probe_loop SECONDS
    local end=$((SECONDS + $1))
    while [ "$SECONDS" -lt "$end" ]; do
        curl -s -o /dev/null -m 10 -w '%{http_code} %{time_total} %{errormsg}\n' "$hit_url" || true
    done
}

# wrk on keep-alive connections: completed requests, requests/s, p50 and
# p99 in ms (nan when nothing completed), socket errors + non-2xx answers.
# wrk stops at the end of the run: a request still unanswered then is in
# neither count, which is what the probes are for.
run_wrk() {
    wrk -t1 -c"$wrk_conns" -d"${seconds}s" --timeout 10s --latency "$hit_url" 2>&1 | python3 -c '
import re, sys
text = sys.stdin.read()
m = re.search(r"(\d+) requests in", text)
done = int(m.group(1)) if m else 0
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\b", text, re.M)
    if not m or done == 0:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
m = re.search(r"Requests/sec:\s+([\d.]+)", text)
rps = float(m.group(1)) if m else 0.0
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errors = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
errors += sum(map(int, m.groups())) if m else 0
print(done, "%.0f" % rps, "%.3f" % ms("50%"), "%.3f" % ms("99%"), errors)'
}

# One download of the big NAR on loopback: MiB/s, or `fail` and what went
# wrong when it did not come whole (no byte for 10 s, or over 30 s in all,
# counts as failed).
nar_download() {
    local code size time why
    read -r code size time why < <(curl -s -o /dev/null -m 30 -y 10 -Y 1 \
        -w '%{http_code} %{size_download} %{time_total} %{errormsg}\n' "$url/$nar_path" || true)
    if [ "$code" = 200 ] && [ "$size" = "$nar_size" ]; then
        awk -v b="$size" -v t="$time" 'BEGIN { printf "%.0f\n", b / t / 1048576 }'
    else
        echo "fail $code $size $time $why"
    fi
}

att_field() { sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" "$1" 2>/dev/null; } # att_field STATUS NAME
# Connections to peerix's port from the attackers' address that the kernel
# has as established: held by peerix, or waiting in its accept queue.
established() {
    ss -Htn state established "( sport = :$port )" dst "$ns_ip" 2>/dev/null | wc -l
}

run_cell() { # run_cell KIND COUNT
    local kind=$1 count=$2 att_pid="" opened=- open=- est=-
    local status=$work/attack-$kind-$count.json
    start_peerix "$work/peerix-$kind-$count.log"
    if [ "$kind" != none ]; then
        log "$kind: $count connections from $ns"
        local path=/local/nix-cache-info
        [ "$kind" = reader ] && path=$local_nar_path
        # The attacker raises its own open-files limit for its sockets, and
        # stops by itself after 120 s should this script not stop it.
        ip netns exec "$ns" python3 "$repo/tests/bench/hostile.py" "$kind" "$count" "$host_ip" "$port" \
            --path "$path" --status "$status" --lifetime 120 >"$work/attack.log" 2>&1 &
        att_pid=$!
        for _ in $(seq 300); do # it gives up connecting after 10 s
            grep -qs '"phase": "holding"\|"phase": "done"' "$status" && break
            kill -0 "$att_pid" 2>/dev/null || break
            sleep 0.1
        done
        if ! grep -qs '"phase": "holding"' "$status"; then
            note "$kind $count: the attacker did not get going: $(tail -3 "$work/attack.log" | tr '\n' ' ')"
        fi
        sleep 1 # let slow readers fill their buffers, idle ones settle
    else
        log "baseline: no attack"
    fi

    probe_loop "$seconds" >"$work/probes" &
    local probe_pid=$!
    local completed rps p50 p99 wrk_errors
    read -r completed rps p50 p99 wrk_errors < <(run_wrk)
    wait "$probe_pid" || true
    local probes probe_fail
    probes=$(wc -l <"$work/probes")
    probe_fail=$(awk '$1 != 200' "$work/probes" | wc -l)
    local nar
    nar=$(interruptible nar_download)
    case $nar in
    fail*)
        local code size took why
        read -r _ code size took why <<<"$nar"
        note "$kind $count: the loopback NAR download failed: status $code, $size of $nar_size bytes in ${took}s${why:+ ($why)}"
        nar=fail
        ;;
    esac

    local vmrss=nan vmhwm=nan threads=nan fds=nan
    if kill -0 "$peerix_pid" 2>/dev/null; then
        vmrss=$(rss "$peerix_pid" VmRSS)
        vmhwm=$(rss "$peerix_pid" VmHWM)
        threads=$(rss "$peerix_pid" Threads)
        fds=$(find "/proc/$peerix_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    else
        note "$kind $count: peerix exited during the attack"
    fi

    if [ -n "$att_pid" ]; then
        est=$(established)
        opened=$(att_field "$status" connected)
        open=$(att_field "$status" open)
        local failed closed reset answered
        failed=$(att_field "$status" failed) closed=$(att_field "$status" closed)
        reset=$(att_field "$status" reset) answered=$(att_field "$status" answered)
        if [ "${failed:-0}" != 0 ] || [ "${closed:-0}" != 0 ] || [ "${reset:-0}" != 0 ] || [ "${answered:-0}" != 0 ]; then
            note "$kind $count: attacker: ${opened:-?} of $count connected in 10 s (${failed:-?} did not); of those, peerix closed $closed, reset $reset, sent something on $answered"
        fi
        stop_job "$att_pid"
        for _ in $(seq 30); do kill -0 "$att_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$att_pid" 2>/dev/null || true
        wait "$att_pid" 2>/dev/null || true
        # Does loopback work again once the attackers are gone?
        if [ "$(curl -s -o /dev/null -m 10 -w '%{http_code}' "$hit_url" || true)" != 200 ]; then
            note "$kind $count: loopback narinfo still failing 10 s after the attackers left"
        fi
    fi
    [ "$probe_fail" = 0 ] || note "$kind $count: $probe_fail of $probes loopback narinfo probes failed (no answer in 10 s, or not 200): $(
        awk '$1 != 200 { $2 = ""; gsub(/ after [0-9]+ ms/, ""); print }' "$work/probes" | sort | uniq -c | sort -rn | head -2 |
            awk '{ n = $1; $1 = ""; printf "%s%sx status%s", sep, n, $0; sep = "; " }')"
    [ "$wrk_errors" = 0 ] || note "$kind $count: wrk saw $wrk_errors socket errors or non-2xx answers"
    [ "$completed" != 0 ] || note "$kind $count: wrk got no answer at all in ${seconds}s on $wrk_conns connections"
    stop_peerix
    # What peerix said went wrong, once a message, the most frequent first.
    { grep -E 'ERROR|WARN' "$peerix_log" || true; } | sed 's/^\[[^]]*\] *//' | sort | uniq -c | sort -rn | head -3 |
        while read -r n message; do note "$kind $count: peerix logged ${n}x: $message"; done
    printf '%s\t' "$kind" "$count" "$opened" "$open" "$est" "$rps" "$p50" "$p99" "$wrk_errors" \
        "$probe_fail/$probes" "$nar" "$vmrss" "$vmhwm" "$threads" >>"$results"
    printf '%s\n' "$fds" >>"$results"
}

started=$SECONDS
run_cell none 0
for kind in "${kinds[@]}"; do
    for count in "${counts[@]}"; do
        run_cell "$kind" "$count"
    done
done
elapsed=$((SECONDS - started))

{
    echo "peerix $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?') ($("$peerix" --version)), $(nix --version),"
    echo "$(nproc) cores, $(uname -r); peerix open-files limit $nofile_seen${PEERIX_ARGS:+, flags added: $PEERIX_ARGS};"
    echo "per cell: wrk -t1 -c$wrk_conns ${seconds}s on a loopback narinfo hit, fresh-connection probes alongside"
    echo "(10 s each), then one loopback download of a $nar_size-byte NAR; cells took ${elapsed}s in all."
    echo
}
python3 - "$results" "$notes" <<'PY'
import math, sys
rows, notes = sys.argv[1:3]
def mib(kib):
    return "-" if kib == "nan" else f"{int(kib) / 1024:.1f}"
def num(v, digits):
    f = float(v)
    return "-" if math.isnan(f) else f"{f:.{digits}f}"
head = ("attack", "conns", "opened", "open", "est", "req/s", "p50 ms", "p99 ms", "wrk err",
        "probes fail", "NAR MiB/s", "RSS MiB", "HWM MiB", "threads", "fds")
widths = (7, 6, 7, 6, 6, 7, 8, 8, 8, 12, 10, 8, 8, 8, 6)
def line(cells):
    return " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
print(line(head))
for row in open(rows):
    (kind, count, opened, open_, est, rps, p50, p99, werr, probes, nar, rss, hwm, threads, fds) = \
        row.rstrip("\n").split("\t")
    print(line((kind, count, opened or "?", open_ or "?", est, num(rps, 0), num(p50, 2), num(p99, 2),
                werr, probes, nar, mib(rss), mib(hwm), threads, fds)))
warnings = open(notes).read().strip()
if warnings:
    print()
    print(warnings)
PY
