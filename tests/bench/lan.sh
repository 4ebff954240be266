#!/usr/bin/env bash
# Benchmark of LAN mode: host B's peerix finding paths on host A's peerix by
# UDP broadcast and passing them through, against B's client fetching from
# A's /local/ directly. It prints figures; it asserts nothing.
#
# Run as root from the repository: sudo tests/bench/lan.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build);
# PEERIX_ARGS="--lan-timeout 100" adds flags to both peerix daemons.
# Two hosts in network namespaces on a bridge in a third: all traffic stays
# inside them, and everything is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
nar_rounds=${BENCH_NAR_ROUNDS:-9} # single NAR downloads, each way
rounds=${BENCH_ROUNDS:-3}         # 4-at-once NAR runs and nix-store runs
miss_count=100
port=12304
a_ip=10.77.0.1
b_ip=10.77.0.2
read -r -a extra_args <<<"${PEERIX_ARGS:-}"
work=$(mktemp -d /tmp/peerix-benchlan.XXXXXX)
# Namespace and interface names carry our PID: unique, and at most 15 chars.
ns_sw=pxsw$$ ns_a=pxa$$ ns_b=pxb$$
namespaces=() # made so far, deleted on exit
peerix_pids=()
daemon_pids=()

cleanup() {
    # A request loop or nix-store still running (see interruptible), then
    # peerix (its daemon connections end), then the daemons and their
    # workers; the namespaces last, once nothing runs in them.
    for pid in $(jobs -p) "${peerix_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${daemon_pids[@]}"; do stop_daemon "$pid"; done
    for pid in "${peerix_pids[@]}" "${daemon_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix curl busybox python3 ip sha256sum" nix-bin curl busybox-static python3 iproute2 coreutils

in_b() { ip netns exec "$ns_b" "$@"; }
# Runs a command of many seconds in the background and waits for it: bash
# runs a trap only once its foreground command is done, but interrupts a
# wait at once. So SIGTERM stops the benchmark now, not after it.
interruptible() { "$@" & wait "$!"; }

log "making the LAN: bridge in $ns_sw, hosts $ns_a ($a_ip) and $ns_b ($b_ip)"
for ns in "$ns_sw" "$ns_a" "$ns_b"; do
    ip netns add "$ns"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
done
ip -n "$ns_sw" link add "pxbr$$" type bridge
ip -n "$ns_sw" link set "pxbr$$" up
for host in a b; do
    ns=$ns_a addr=$a_ip
    [ "$host" = b ] && ns=$ns_b addr=$b_ip
    ip -n "$ns_sw" link add "pxs$host$$" type veth peer name "px$host$$" netns "$ns"
    ip -n "$ns_sw" link set "pxs$host$$" master "pxbr$$" up
    ip -n "$ns" addr add "$addr/24" broadcast 10.77.0.255 dev "px$host$$"
    ip -n "$ns" link set "px$host$$" up
done

offline_nix "$work"
log "building the store (cached after the first run)"
build_bench_paths "$repo" "$work"
store_a=$work/a
store_b=$work/b
nix copy --no-check-sigs --to "$store_a" "$big" "$top"
nix-store --generate-binary-cache-key upstream-1 "$work/sk" "$work/pk"
pk=$(cat "$work/pk")
nix store sign --store "$store_a" -k "$work/sk" -r "$big" "$top"
closure_size=$(nix path-info --store "$store_a" -r "$top" | wc -l)
mapfile -t small < <(nix path-info --store "$store_a" -r "$top")
nix path-info --store "$store_b" --all >/dev/null # makes the empty store

# The daemons are on unix sockets, which no network namespace hides.
for host in a b; do
    store=$store_a; [ "$host" = b ] && store=$store_b
    NIX_DAEMON_SOCKET_PATH=$work/$host.sock nix-daemon --store "$store" >"$work/daemon-$host.log" 2>&1 &
    daemon_pids+=($!)
    wait_for "nix-daemon of $host" test -S "$work/$host.sock"
done

peerix=$(peerix_bin "$repo")
start_peerix() { # start_peerix a|b: sets a_pid or b_pid
    local ns=$ns_a store=$store_a
    [ "$1" = b ] && ns=$ns_b store=$store_b
    ip netns exec "$ns" "$peerix" --bind 0.0.0.0 --port "$port" --daemon-socket "$work/$1.sock" \
        --store-root "$store" --trusted-key "$pk" --scan-interval 0 --state-dir "$work/state-$1" \
        "${extra_args[@]}" >>"$work/peerix-$1.log" 2>&1 &
    peerix_pids+=($!)
    if [ "$1" = a ]; then a_pid=$!; else b_pid=$!; fi
    wait_for "peerix's first scan on $1" sh -c \
        "ip netns exec $ns curl -sf http://127.0.0.1:$port/health | grep -q '\"scans\":[1-9]'"
}
start_peerix a
start_peerix b
sleep 1
idle_rss_b=$(rss "$b_pid" VmRSS)
idle_rss_a=$(rss "$a_pid" VmRSS)

b_url=http://127.0.0.1:$port # B's root, for B's own nix
a_url=http://$a_ip:$port/local # A as another host sees it
big_hash=$(hash_of "$big")
field() { # field NARINFO-TEXT KEY
    sed -n "s/^$2: //p" <<<"$1"
}
notes=$work/notes
: >"$notes"
note() { printf '%s\n' "$*" | tee -a "$notes" >&2; }
fail() { echo "$*" >&2; exit 1; }

# Sanity checks: the figures below mean nothing if the hosts answer
# something else than what is being timed. These check answers, not speed.
# The small paths are not asked of B here: each is asked of it once, timed.
log "checking answers"
info_a=$(in_b curl -sf "$a_url/$big_hash.narinfo") || fail "A's /local does not have $big"
info_b=$(in_b curl -sf "$b_url/$big_hash.narinfo") || fail "B did not find $big on the LAN"
for key in StorePath NarHash NarSize; do
    [ "$(field "$info_a" "$key")" = "$(field "$info_b" "$key")" ] ||
        fail "B's narinfo of $big has another $key than A's: $(field "$info_b" "$key")"
done
nar_size=$(field "$info_a" NarSize)
nar_hash=$(field "$info_a" NarHash)
b_nar=$(field "$info_b" URL)
case $b_nar in
peer/http:"$a_ip:$port"/nar/*) ;;
*) fail "B's narinfo of $big names URL $b_nar, not one under peer/http:$a_ip:$port/nar/" ;;
esac
b_nar=$b_url/$b_nar
a_nar=$a_url/$(field "$info_a" URL)
for h in "$(hash_of "${small[0]}")" "$(hash_of "${small[-1]}")"; do
    [ "$(in_b curl -s -o /dev/null -w '%{http_code}' "$a_url/$h.narinfo")" = 200 ] ||
        fail "A's /local does not share $h"
done
want=${nar_hash#sha256:}
for url in "$b_nar" "$a_nar"; do
    hex=$(in_b curl -sf "$url" | sha256sum | cut -d' ' -f1)
    got=$(nix hash to-base32 --type sha256 "$hex" 2>/dev/null)
    [ "$got" = "$want" ] || fail "the NAR at $url hashes to sha256:$got, not $nar_hash"
done

results=$work/results
: >"$results"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; } # record METRIC b|a VALUE
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; } # utime + stime
hz=$(getconf CLK_TCK)

# 1. NAR MB/s of the big path from B's namespace: through B's peerix (which
# fetches it from A and hashes it on the way) or from A directly. Single
# downloads alternate, so drift hits both alike; a wrong status or length is
# noted and not timed. The CPU time of both daemons is kept per way.
declare -A cpu_b=([b]=0 [a]=0) cpu_a=([b]=0 [a]=0) wall=([b]=0 [a]=0)
single_download() { # single_download b|a URL: prints MB/s or nan
    local code size time b0 a0
    b0=$(ticks "$b_pid") a0=$(ticks "$a_pid")
    read -r code size time < <(in_b curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' "$2")
    cpu_b[$1]=$((cpu_b[$1] + $(ticks "$b_pid") - b0))
    cpu_a[$1]=$((cpu_a[$1] + $(ticks "$a_pid") - a0))
    wall[$1]=$(awk -v w="${wall[$1]}" -v t="$time" 'BEGIN { print w + t }')
    if [ "$code" != 200 ] || [ "$size" != "$nar_size" ]; then
        note "warning: a download of $2 answered $code with $size bytes, not 200 with $nar_size"
        echo nan
    else
        awk -v b="$size" -v t="$time" 'BEGIN { printf "%.0f\n", b / t / 1e6 }'
    fi
}
parallel_download() { # parallel_download URL N: prints total MB/s or nan
    local start end bytes
    : >"$work/sizes"
    start=$(date +%s.%N)
    for _ in $(seq "$2"); do
        in_b curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "$1" >>"$work/sizes" &
    done
    wait # in a command substitution: its only children are these downloads
    end=$(date +%s.%N)
    bytes=$(awk -v want="$nar_size" '$1 == 200 && $2 == want { s += $2 } END { print s + 0 }' "$work/sizes")
    if [ "$bytes" != $(($2 * nar_size)) ]; then
        note "warning: $2 downloads of $1 at once: $(tr '\n' ' ' <"$work/sizes")(status, bytes), not 200 and $nar_size each"
        echo nan
    else
        awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", b / (e - s) / 1e6 }'
    fi
}
log "NAR download of $nar_size bytes, 1 at a time, $nar_rounds rounds through B then from A"
for _ in $(seq "$nar_rounds"); do
    single_download b "$b_nar" >>"$work/single-b"
    single_download a "$a_nar" >>"$work/single-a"
done
record "NAR 1 download MB/s" b "$(median <"$work/single-b")"
record "NAR 1 download MB/s" a "$(median <"$work/single-a")"
peak_rss_single=$(rss "$b_pid" VmHWM)
for way in b a; do
    url=$b_nar; [ "$way" = a ] && url=$a_nar
    log "NAR download, 4 at once, $rounds rounds, $([ "$way" = b ] && echo through B || echo from A)"
    record "NAR 4 downloads MB/s" "$way" "$(for _ in $(seq "$rounds"); do parallel_download "$url" 4; done | median)"
    # VmHWM is the lifetime peak: read right after the proxy transfers.
    if [ "$way" = b ]; then
        peak_rss=$(rss "$b_pid" VmHWM)
        after_rss=$(rss "$b_pid" VmRSS)
    fi
done

# 3. narinfo latency from B's namespace, one request at a time on one
# keep-alive connection. Every hash is asked once, so each is a fresh
# lookup: B has no answer cached (a miss is kept 10 s, a find 60 s).
# Misses: random valid hash parts no host has. Hits: the small paths,
# which A has and B has not been asked for.
latencies() { # latencies KIND b|a EXPECTED-STATUS HASH...: p50 and p99 in ms, to $work/pct
    local kind=$1 way=$2 want=$3 base=$b_url
    shift 3
    [ "$way" = a ] && base=$a_url
    for h in "$@"; do printf 'url = "%s/%s.narinfo"\noutput = "/dev/null"\n' "$base" "$h"; done >"$work/curl-$kind-$way"
    interruptible ip netns exec "$ns_b" curl -s -K "$work/curl-$kind-$way" -w '%{http_code} %{time_total}\n' >"$work/lat-$kind-$way" || true
    local wrong
    wrong=$(awk -v w="$want" '$1 != w' "$work/lat-$kind-$way" | wc -l)
    if [ "$wrong" != 0 ] || [ "$(wc -l <"$work/lat-$kind-$way")" != $# ]; then
        note "warning: narinfo $kind $way: $wrong of $# answers were not $want ($(wc -l <"$work/lat-$kind-$way") answers); left out of the latencies"
    fi
    awk -v w="$want" '$1 == w { print $2 * 1000 }' "$work/lat-$kind-$way" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "nan nan"; exit }
            i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
            i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
            printf "%.2f %.2f\n", v[i50], v[i99]
        }' >"$work/pct"
}
mapfile -t miss_hashes < <(python3 -c '
import secrets
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
for _ in range('"$miss_count"'):
    print("".join(secrets.choice(alphabet) for _ in range(32)))')
hit_hashes=()
for path in "${small[@]}"; do hit_hashes+=("$(hash_of "$path")"); done
for way in b a; do
    log "narinfo miss latency, $miss_count hashes, $([ "$way" = b ] && echo through B || echo from A)"
    latencies miss "$way" 404 "${miss_hashes[@]}"
    read -r p50 p99 <"$work/pct"
    record "narinfo miss p50 ms" "$way" "$p50"
    record "narinfo miss p99 ms" "$way" "$p99"
done
for way in b a; do
    log "narinfo hit latency, ${#hit_hashes[@]} hashes, $([ "$way" = b ] && echo through B || echo from A)"
    latencies hit "$way" 200 "${hit_hashes[@]}"
    read -r p50 p99 <"$work/pct"
    record "narinfo hit p50 ms" "$way" "$p50"
    record "narinfo hit p99 ms" "$way" "$p99"
done

# 2. nix-store -r of the closure into a fresh store with a fresh
# XDG_CACHE_HOME, in B's namespace. Through B twice: right after B's peerix
# restarted (cold: every path is a broadcast, as the first time a host asks)
# and again at once (warm: B still has the answers, for 60 s); then from A.
# A failed or incomplete run, or one that nix store verify rejects, is noted
# and records nan.
realise_seconds() { # realise_seconds SUBSTITUTER RUN: prints seconds or nan
    local dest=$work/realise-$2
    local start end ok=1
    start=$(date +%s.%N)
    if ! interruptible ip netns exec "$ns_b" env XDG_CACHE_HOME="$dest-cache" nix-store --store "$dest" -r "$top" \
        --option substituters "$1" --option trusted-public-keys "$pk" >/dev/null 2>"$dest.err"; then
        note "warning: nix-store -r ($2) from $1 failed: $(tail -1 "$dest.err")"
        ok=
    fi
    end=$(date +%s.%N)
    if [ -n "$ok" ]; then
        local got
        got=$(nix path-info --store "$dest" -r "$top" 2>/dev/null | wc -l)
        if [ "$got" != "$closure_size" ]; then
            note "warning: nix-store -r ($2) from $1 left $got valid paths, not $closure_size"
            ok=
        elif ! nix store verify --store "$dest" -r --option trusted-public-keys "$pk" "$top" 2>"$dest.err"; then
            note "warning: nix-store -r ($2) from $1: nix store verify failed: $(tail -1 "$dest.err")"
            ok=
        fi
    fi
    if [ -n "$ok" ]; then
        awk -v s="$start" -v e="$end" 'BEGIN { printf "%.2f\n", e - s }'
    else
        echo nan
    fi
    rm -rf "$dest" "$dest-cache" "$dest.err"
}
for run in $(seq "$rounds"); do
    log "nix-store -r of $closure_size paths, round $run of $rounds: restarting B's peerix"
    kill "$b_pid"
    wait "$b_pid" 2>/dev/null || true
    start_peerix b
    log "  through B, cold"
    realise_seconds "$b_url" "b-cold-$run" >>"$work/realise-b-cold"
    log "  through B, warm"
    realise_seconds "$b_url" "b-warm-$run" >>"$work/realise-b-warm"
    log "  from A"
    realise_seconds "$a_url" "a-$run" >>"$work/realise-a"
done
record "nix-store -r $closure_size paths, cold s" b "$(median <"$work/realise-b-cold")"
record "nix-store -r $closure_size paths, cold s" a "$(median <"$work/realise-a")"
record "nix-store -r $closure_size paths, warm s" b "$(median <"$work/realise-b-warm")"
record "nix-store -r $closure_size paths, warm s" a "$(median <"$work/realise-a")"
lan_health=$(in_b curl -sf "$b_url/health" | python3 -c 'import json, sys; h = json.load(sys.stdin); print(json.dumps(h.get("lan")), json.dumps(h.get("peers")))' || echo '?')

{
    echo "peerix $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?') ($("$peerix" --version)), $(nix --version),"
    echo "$(nproc) cores, $(uname -r); NAR of $nar_size bytes: $nar_rounds single downloads each way, $rounds runs of 4;"
    echo "$miss_count misses and ${#hit_hashes[@]} hits asked once each; $rounds nix-store runs each way.${PEERIX_ARGS:+ peerix flags added: $PEERIX_ARGS.}"
    echo "Medians (latencies: percentiles) on a shared, noisy machine: compare the two runs you did."
    echo
}
python3 - "$results" "$notes" "$idle_rss_b" "$idle_rss_a" "$peak_rss_single" "$peak_rss" "$after_rss" \
    "$hz" "${cpu_b[b]}" "${cpu_a[b]}" "${wall[b]}" "${cpu_b[a]}" "${cpu_a[a]}" "${wall[a]}" "$lan_health" <<'PY'
import math, sys
rows, notes = sys.argv[1:3]
idle_b, idle_a, peak_single, peak, after = map(int, sys.argv[3:8])  # KiB
hz = int(sys.argv[8])
cpu_b_via_b, cpu_a_via_b, wall_via_b, cpu_b_direct, cpu_a_direct, wall_direct = map(float, sys.argv[9:15])
health = sys.argv[15]
table = {}
for line in open(rows):
    metric, way, value = line.rstrip("\n").split("\t")
    table.setdefault(metric, {})[way] = float(value)
def ratio(b, a):
    return b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan
print(f"{'metric':36} {'through B':>10} {'A direct':>10} {'B/A':>7}")
for metric, v in table.items():
    digits = 0 if "MB/s" in metric else 2
    print(f"{metric:36} {v['b']:>10.{digits}f} {v['a']:>10.{digits}f} {ratio(v['b'], v['a']):>7.2f}")
print()
MB = 1_000_000
def share(ticks, wall):
    return f"{ticks / hz:.2f} s CPU, {100 * ticks / hz / wall:.0f}% of one core" if wall else "?"
print(f"single NAR downloads through B: B's peerix {share(cpu_b_via_b, wall_via_b)}; A's {share(cpu_a_via_b, wall_via_b)}")
print(f"single NAR downloads from A:    B's peerix {share(cpu_b_direct, wall_direct)}; A's {share(cpu_a_direct, wall_direct)}")
print(f"B's peerix idle RSS              {idle_b} KiB ({idle_b * 1024 / MB:.2f} MB); A's {idle_a} KiB")
print(f"B's peak RSS (VmHWM), 1 at once  {peak_single} KiB ({peak_single * 1024 / MB:.2f} MB)")
print(f"B's peak RSS (VmHWM), then 4     {peak} KiB ({peak * 1024 / MB:.2f} MB); RSS then {after} KiB")
print(f"B's /health lan and peers (last restart): {health}")
print()
def target(name, ok, shown):
    print(f"{'met   ' if ok else 'MISSED'} {name}: {shown}")
nar = table["NAR 1 download MB/s"]
r = ratio(nar["b"], nar["a"])
target("NAR through B, 1 download >= 0.8x A direct", r >= 0.8, f"{r:.2f}x")
# The issue's target is for the 200 MB transfer, one at a time; four at once
# is shown above for information.
target("B's peak RSS during the 200 MB proxy transfers, 1 at a time, <= 8 MB",
       peak_single * 1024 <= 8 * MB, f"{peak_single * 1024 / MB:.2f} MB")
warnings = open(notes).read().strip()
if warnings:
    print()
    print(warnings)
PY
