#!/usr/bin/env bash
# Benchmark of LAN store summaries: what peerix costs in front of an
# upstream cache on a quiet LAN (no peer has anything), what it costs on a
# warm one (a peer has everything), how fast a miss is once every host's
# summary is known, and how many LAN queries a lookup sends with and without
# a host that publishes no summary. It prints figures; it asserts nothing.
#
# Run as root from the repository: sudo tests/bench/quiet-lan.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build).
# Three hosts in network namespaces on a bridge in a fourth: all traffic
# stays inside them, and everything is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
rounds=${BENCH_ROUNDS:-3}            # nix-store runs each way
miss_count=${BENCH_MISSES:-300}      # misses timed once summaries cover the LAN
broadcast_misses=${BENCH_BROADCAST_MISSES:-20} # misses with a summary-less host
port=12304
upstream_port=8080
floor_port=8081 # nginx answering 404 to every narinfo: the floor of any substituter in front
a_ip=10.77.0.1
c_ip=10.77.0.3
work=$(mktemp -d /tmp/peerix-benchquiet.XXXXXX)
chmod 755 "$work" # nginx workers run as nobody
# Namespace and interface names carry our PID: unique, and at most 15 chars.
ns_sw=pxqs$$ ns_a=pxqa$$ ns_b=pxqb$$ ns_c=pxqc$$
namespaces=() # made so far, deleted on exit
peerix_pids=()
daemon_pids=()
nginx_pid=

cleanup() {
    # A nix-store still running (see interruptible), then peerix and nginx,
    # then the daemons and their workers; the namespaces last, once nothing
    # runs in them.
    for pid in $(jobs -p) "${peerix_pids[@]}" $nginx_pid; do kill "$pid" 2>/dev/null || true; done
    for pid in "${daemon_pids[@]}"; do stop_daemon "$pid"; done
    for pid in "${peerix_pids[@]}" "${daemon_pids[@]}" $nginx_pid; do wait "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix curl nginx busybox python3 ip" nix-bin curl nginx-light busybox-static python3 iproute2

in_b() { ip netns exec "$ns_b" "$@"; }
# Runs a command of many seconds in the background and waits for it, so
# SIGTERM stops the benchmark now, not after it (see lan.sh).
interruptible() { "$@" & wait "$!"; }
notes=$work/notes
: >"$notes"
note() { printf '%s\n' "$*" | tee -a "$notes" >&2; }
fail() { echo "$*" >&2; exit 1; }

log "making the LAN: bridge in $ns_sw; hosts $ns_a ($a_ip), $ns_b (10.77.0.2), $ns_c ($c_ip)"
for ns in "$ns_sw" "$ns_a" "$ns_b" "$ns_c"; do
    ip netns add "$ns"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
done
ip -n "$ns_sw" link add "pxqbr$$" type bridge
ip -n "$ns_sw" link set "pxqbr$$" up
for host in a b c; do
    case $host in a) ns=$ns_a addr=$a_ip ;; b) ns=$ns_b addr=10.77.0.2 ;; c) ns=$ns_c addr=$c_ip ;; esac
    ip -n "$ns_sw" link add "pxqs$host$$" type veth peer name "pxq$host$$" netns "$ns"
    ip -n "$ns_sw" link set "pxqs$host$$" master "pxqbr$$" up
    ip -n "$ns" addr add "$addr/24" broadcast 10.77.0.255 dev "pxq$host$$"
    ip -n "$ns" link set "pxq$host$$" up
done

offline_nix "$work"
log "building the 320-path closure (cached after the first run)"
top=$(nix-build "$repo/tests/fixtures/many.nix" --no-out-link --max-jobs 8 --arg busyboxDir "$work/busybox" -A top)
nix-store --generate-binary-cache-key upstream-1 "$work/sk" "$work/pk"
pk=$(cat "$work/pk")
src=$work/src
nix copy --no-check-sigs --to "$src" "$top"
nix store sign --store "$src" -k "$work/sk" -r "$top"
closure_size=$(nix path-info --store "$src" -r "$top" | wc -l)

log "exporting the closure for the upstream cache (nginx, Priority: 40)"
export_dir=$work/export
# The floor: a cache that has nothing, with peerix's priority, served by the
# same nginx. What nix spends on it is what any substituter in front of the
# upstream costs, however fast its misses.
floor_dir=$work/floor
mkdir -p "$floor_dir"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 5\n' >"$floor_dir/nix-cache-info"
nix copy --from "$src" --to "file://$export_dir?compression=none" "$top"
sed -i '/^Priority:/d' "$export_dir/nix-cache-info"
echo 'Priority: 40' >>"$export_dir/nix-cache-info"
mkdir -p "$work/nginx-tmp"
cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 1024; }
http {
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    client_body_temp_path $work/nginx-tmp;
    proxy_temp_path $work/nginx-tmp;
    fastcgi_temp_path $work/nginx-tmp;
    uwsgi_temp_path $work/nginx-tmp;
    scgi_temp_path $work/nginx-tmp;
    types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; text/x-nix-cache-info nix-cache-info; }
    server { listen 127.0.0.1:$upstream_port; root $export_dir; }
    server { listen 127.0.0.1:$floor_port; root $floor_dir; }
}
CONF
# In B's namespace, on its loopback: where B's nix finds it.
ip netns exec "$ns_b" nginx -c "$work/nginx.conf" &
nginx_pid=$!
upstream=http://127.0.0.1:$upstream_port
floor=http://127.0.0.1:$floor_port
wait_for "nginx" in_b curl -sf "$upstream/nix-cache-info"
wait_for "nginx" in_b curl -sf "$floor/nix-cache-info"

# A starts with an empty store (it gets the closure for the warm LAN); B's
# store stays empty: nix realises into fresh stores of its own.
for host in a b; do
    nix path-info --store "$work/$host" --all >/dev/null # makes the empty store
    NIX_DAEMON_SOCKET_PATH=$work/$host.sock nix-daemon --store "$work/$host" >"$work/daemon-$host.log" 2>&1 &
    daemon_pids+=($!)
    wait_for "nix-daemon of $host" test -S "$work/$host.sock"
done

peerix=$(peerix_bin "$repo")
start_peerix() { # start_peerix a|b: sets a_pid or b_pid
    local ns=$ns_a
    [ "$1" = b ] && ns=$ns_b
    ip netns exec "$ns" "$peerix" --bind 0.0.0.0 --port "$port" --daemon-socket "$work/$1.sock" \
        --store-root "$work/$1" --trusted-key "$pk" --scan-interval 0 --state-dir "$work/state-$1" \
        >>"$work/peerix-$1.log" 2>&1 &
    peerix_pids+=($!)
    if [ "$1" = a ]; then a_pid=$!; else b_pid=$!; fi
    wait_for "peerix's first scan on $1" sh -c \
        "ip netns exec $ns curl -sf http://127.0.0.1:$port/health | grep -q '\"scans\":[1-9]'"
}
health() { # health a|b: /health of that host's peerix
    local ns=$ns_a
    [ "$1" = b ] && ns=$ns_b
    ip netns exec "$ns" curl -sf "http://127.0.0.1:$port/health"
}
json() { python3 -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)' "$1"; }
b_queries() { health b | json lan.queries; }
# wait_covered HOSTS: B has heard HOSTS hosts, all with a fresh summary, and
# takes the LAN as covered.
wait_covered() {
    wait_for "B to cover the LAN with $1 summary(ies)" sh -c \
        "ip netns exec $ns_b curl -sf http://127.0.0.1:$port/health | python3 -c '
import json, sys
s = json.load(sys.stdin)[\"lan\"][\"summaries\"]
sys.exit(0 if s[\"covers_lan\"] and s[\"hosts_heard\"] == $1 and s[\"hosts_with_summary\"] == $1 else 1)'"
}
restart_b() {
    kill "$b_pid"
    wait "$b_pid" 2>/dev/null || true
    start_peerix b
    wait_covered 1
}
start_peerix a
start_peerix b
wait_covered 1
if [ "$(in_b curl -sf "http://127.0.0.1:$port/nix-cache-info" | sed -n 's/^Priority: //p')" != 5 ]; then
    note "warning: peerix's priority is not 5, the floor's"
fi

# realise_seconds SUBSTITUTERS RUN: nix-store -r of the closure into a fresh
# store with a fresh XDG_CACHE_HOME, in B's namespace; prints seconds, or
# nan for a failed or incomplete run or one nix store verify rejects.
realise_seconds() {
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

results=$work/results
: >"$results"
record() { printf '%s\t%s\n' "$1" "$2" >>"$results"; } # record NAME VALUE

# 1. Cold update on a quiet LAN: A (a peerix) and B know each other's
# summaries and neither has a path. With B's peerix in front of upstream,
# every narinfo is asked of B first: a 404 at once when the summaries cover
# the LAN. B is restarted before each of its runs (nothing cached).
# The two ways take turns going first, so drift hits both alike.
b_url=http://127.0.0.1:$port
cold_queries=0
cold_b() {
    log "cold update, round $1 of $rounds: $closure_size paths, B's peerix then upstream"
    restart_b
    local q0
    q0=$(b_queries)
    realise_seconds "$b_url $upstream" "cold-b-$1" >>"$work/cold-b"
    cold_queries=$((cold_queries + $(b_queries) - q0))
}
cold_up() {
    log "cold update, round $1 of $rounds: upstream alone"
    realise_seconds "$upstream" "cold-up-$1" >>"$work/cold-up"
}
cold_floor() {
    log "cold update, round $1 of $rounds: a static 404 server, then upstream"
    realise_seconds "$floor $upstream" "cold-floor-$1" >>"$work/cold-floor"
}
# The three ways take turns going first.
for run in $(seq "$rounds"); do
    case $((run % 3)) in
        1) cold_b "$run"; cold_floor "$run"; cold_up "$run" ;;
        2) cold_up "$run"; cold_b "$run"; cold_floor "$run" ;;
        0) cold_floor "$run"; cold_up "$run"; cold_b "$run" ;;
    esac
done
record cold_b "$(median <"$work/cold-b")"
record cold_up "$(median <"$work/cold-up")"
record cold_floor "$(median <"$work/cold-floor")"
record cold_queries "$((cold_queries / rounds))"

# 2. Warm LAN: A gets the whole closure (signed: it shares it), rescans on
# SIGHUP, and announces its new summary. B's peerix alone, against A's
# /local/ as the only substituter.
log "giving A the closure"
nix copy --no-check-sigs --from "$src" --to "unix://$work/a.sock" "$top"
kill -HUP "$a_pid"
wait_for "A's summary to hold the closure" sh -c \
    "ip netns exec $ns_a curl -sf http://127.0.0.1:$port/health | grep -q '\"paths\":$closure_size'"
wait_covered 1
a_local=http://$a_ip:$port/local
warm_b() {
    log "warm LAN, round $1 of $rounds: through B"
    restart_b
    realise_seconds "$b_url" "warm-b-$1" >>"$work/warm-b"
}
warm_a() {
    log "warm LAN, round $1 of $rounds: A's /local directly"
    realise_seconds "$a_local" "warm-a-$1" >>"$work/warm-a"
}
for run in $(seq "$rounds"); do
    if [ $((run % 2)) = 1 ]; then warm_b "$run"; warm_a "$run"; else warm_a "$run"; warm_b "$run"; fi
done
record warm_b "$(median <"$work/warm-b")"
record warm_a "$(median <"$work/warm-a")"
# B was restarted before its last run: these are that run's.
record warm_read_ahead "$(health b | json read_ahead)"

# 3. Misses once the summaries are known: root narinfo requests to B for
# random valid hash parts nobody has, each asked once (B remembers a miss
# for 10 s), one at a time on one keep-alive connection. With a second URL,
# its requests take turns with B's (on a connection of their own), so both
# meet the same moments of this machine's load.
percentiles() { # percentiles QUERIES COUNT < "code seconds" lines: p50 p90 p99 ms, queries a miss
    awk '$1 == 404 { print $2 * 1000 }' | sort -g | awk -v q="$1" -v n="$2" '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "nan nan nan nan"; exit }
            i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
            i90 = int(NR * 0.90); if (i90 < NR * 0.90) i90++
            i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
            printf "%.3f %.3f %.3f %.2f\n", v[i50], v[i90], v[i99], q / n
        }'
}
latencies() { # latencies NAME COUNT [PAIR_URL]: B's p50 p90 p99 in ms and LAN queries per miss [, PAIR_URL's p50 p90 p99]
    local name=$1 count=$2 pair=${3:-} q0 q1
    python3 -c '
import secrets, sys
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
urls = [u for u in sys.argv[2:] if u]
for i in range(int(sys.argv[1])):
    for url in urls if i % 2 == 0 else urls[::-1]:
        h = "".join(secrets.choice(alphabet) for _ in range(32))
        print(f"url = \"{url}/{h}.narinfo\"\noutput = \"/dev/null\"")' "$count" "$b_url" "$pair" >"$work/curl-$name"
    q0=$(b_queries)
    interruptible in_b curl -s -K "$work/curl-$name" -w '%{url_effective} %{http_code} %{time_total}\n' >"$work/lat-$name" || true
    q1=$(b_queries)
    awk -v b="$b_url/" 'index($1, b) == 1 { print $2, $3 }' "$work/lat-$name" >"$work/lat-$name-b"
    local wrong
    wrong=$(awk '$1 != 404' "$work/lat-$name-b" | wc -l)
    if [ "$wrong" != 0 ] || [ "$(wc -l <"$work/lat-$name-b")" != "$count" ]; then
        note "warning: misses ($name): $wrong of $count answers were not 404; left out of the latencies"
    fi
    local mine theirs=""
    mine=$(percentiles "$((q1 - q0))" "$count" <"$work/lat-$name-b")
    if [ -n "$pair" ]; then
        theirs=$(awk -v p="$pair/" 'index($1, p) == 1 { print $2, $3 }' "$work/lat-$name" | percentiles 0 "$count" | cut -d' ' -f1-3)
    fi
    echo "$mine $theirs"
}
log "$miss_count misses on B, every host's summary known, taking turns with as many on the static 404 server"
read -r p50 p90 p99 per_miss f50 f90 f99 < <(latencies covered "$miss_count" "$floor")
record miss_p50 "$p50"
record miss_p90 "$p90"
record miss_p99 "$p99"
record miss_queries "$per_miss"
record floor_p50 "$f50"
record floor_p90 "$f90"
record floor_p99 "$f99"
covers=$(health b | json lan.summaries.covers_lan)
record covers_during_misses "$covers"

# 4. The summaries' size, while nothing has changed.
record a_summary_paths "$(health a | json lan.summary.paths)"
record a_summary_bytes "$(health a | json lan.summary.bytes)"
record b_summaries_bytes "$(health b | json lan.summaries.bytes)"
a_shared=$(health a | json shared_paths)

# 3b. A host with no summary (an original peerix) makes itself heard from
# C's namespace, as it does when its own nix asks the LAN for a path: B
# must ask by broadcast again, and wait the LAN window for each miss.
log "a summary-less host speaks up from $c_ip; $broadcast_misses misses on B"
ip netns exec "$ns_c" python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.bind(("0.0.0.0", '"$port"'))
s.sendto(b"\x00\x12\x34\x56\x78" + b"0" * 32, ("10.77.0.255", '"$port"'))'
wait_for "B to hear the summary-less host" sh -c \
    "ip netns exec $ns_b curl -sf http://127.0.0.1:$port/health | grep -q '\"hosts_heard\":2'"
read -r p50 p90 p99 per_miss < <(latencies broadcast "$broadcast_misses")
record bcast_p50 "$p50"
record bcast_p90 "$p90"
record bcast_p99 "$p99"
record bcast_queries "$per_miss"
record covers_with_silent "$(health b | json lan.summaries.covers_lan)"
lan_b=$(health b | json lan)

{
    echo "peerix $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?') ($("$peerix" --version)), $(nix --version), $(nginx -v 2>&1 | sed 's/^nginx version: //'),"
    echo "$(nproc) cores, $(uname -r); $closure_size paths; $rounds nix-store runs each way (medians, seconds);"
    echo "$miss_count misses with summaries and $broadcast_misses with a summary-less host, each hash asked once."
    echo "On a shared, noisy machine: compare the two runs you did."
    echo
}
python3 - "$results" "$notes" "$lan_b" "$a_shared" <<'PY'
import math, sys
rows = dict(line.rstrip("\n").split("\t") for line in open(sys.argv[1]))
notes, lan_b, a_shared = sys.argv[2], sys.argv[3], sys.argv[4]
def f(key):
    try:
        return float(rows[key])
    except (KeyError, ValueError):
        return math.nan
def ratio(x, y):
    return x / y if y and not math.isnan(x) and not math.isnan(y) else math.nan
cold_b, cold_up, warm_b, warm_a = f("cold_b"), f("cold_up"), f("warm_b"), f("warm_a")
cold_floor = f("cold_floor")
print(f"{'':44} {'peerix':>9} {'direct':>9} {'ratio':>6}")
print(f"{'1. cold update, quiet LAN (s): B+upstream / upstream':44} {cold_b:>9.2f} {cold_up:>9.2f} {ratio(cold_b, cold_up):>6.3f}")
print(f"{'   floor: static 404 server+upstream / upstream':44} {cold_floor:>9.2f} {cold_up:>9.2f} {ratio(cold_floor, cold_up):>6.3f}")
print(f"{'   B+upstream / static 404 server+upstream':44} {cold_b:>9.2f} {cold_floor:>9.2f} {ratio(cold_b, cold_floor):>6.3f}")
print(f"{'2. warm LAN (s): through B / A /local':44} {warm_b:>9.2f} {warm_a:>9.2f} {ratio(warm_b, warm_a):>6.3f}")
print()
print(f"2. B's read-ahead in its last warm run: {rows.get('warm_read_ahead')}")
print(f"1. LAN queries B sent per cold update, when no host had a path: {rows.get('cold_queries')} (target 0)")
print(f"3. misses on B, summaries known (covers_lan {rows['covers_during_misses']}):")
print(f"   p50 {rows['miss_p50']} ms, p90 {rows['miss_p90']} ms, p99 {rows['miss_p99']} ms; LAN queries per miss {rows['miss_queries']}")
print(f"   the static 404 server, its requests taking turns with B's (this machine's floor then):")
print(f"   p50 {rows['floor_p50']} ms, p90 {rows['floor_p90']} ms, p99 {rows['floor_p99']} ms")
print(f"   with a summary-less host heard (covers_lan {rows['covers_with_silent']}):")
print(f"   p50 {rows['bcast_p50']} ms, p90 {rows['bcast_p90']} ms, p99 {rows['bcast_p99']} ms; LAN queries per miss {rows['bcast_queries']}")
paths, size = f("a_summary_paths"), f("a_summary_bytes")
print(f"4. A's summary: {paths:.0f} paths ({a_shared} shared), {size:.0f} bytes"
      f" ({size / paths if paths else math.nan:.2f} bytes a path); B holds {rows['b_summaries_bytes']} bytes of summaries")
print(f"B's /health lan at the end: {lan_b}")
print()
def target(name, ok, shown):
    print(f"{'met   ' if ok else 'MISSED'} {name}: {shown}")
r = ratio(cold_b, cold_up)
target("cold update through peerix <= 1.05x upstream alone", r <= 1.05,
       f"{r:.3f}x (a static 404 server in front: {ratio(cold_floor, cold_up):.3f}x)")
r = ratio(warm_b, warm_a)
target("warm LAN through B <= 1.1x A's /local directly", r <= 1.1, f"{r:.3f}x")
p99 = f("miss_p99")
target("miss p99 < 1 ms once summaries are known", p99 < 1,
       f"{p99:.3f} ms (the static 404 server: {f('floor_p99'):.3f} ms)")
q = f("miss_queries")
target("no LAN query for a miss once summaries are known", q == 0, f"{q:.2f} a miss")
warnings = open(notes).read().strip()
if warnings:
    print()
    print(warnings)
PY
