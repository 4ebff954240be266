#!/usr/bin/env bash
# Benchmark of peerix serving its local store, against nginx serving a
# `nix copy --to file://` export of the same paths (sendfile on): the
# static-files ceiling. It prints figures; it asserts nothing.
#
# Run as root from the repository: sudo tests/bench/local-cache.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build).
# Everything runs on 127.0.0.1 and is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
seconds=${BENCH_SECONDS:-5}
work=$(mktemp -d /tmp/peerix-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as nobody
pids=()       # our direct children: nix-daemon, peerix, nginx (master)
daemon_pid=

cleanup() {
    # Peerix and nginx first, then the daemon and its workers.
    for pid in "${pids[@]}"; do
        [ "$pid" = "$daemon_pid" ] || kill "$pid" 2>/dev/null || true
    done
    [ -z "$daemon_pid" ] || stop_daemon "$daemon_pid"
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix wrk curl nginx busybox python3" nix-bin wrk curl nginx-light busybox-static python3

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

offline_nix "$work"
log "building the store (cached after the first run)"
build_bench_paths "$repo" "$work"
store=$work/a
nix copy --no-check-sigs --to "$store" "$big" "$top"
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
pk=$(cat "$work/pk")
nix store sign --store "$store" -k "$work/sk" -r "$big" "$top"
closure_size=$(nix path-info --store "$store" -r "$top" | wc -l)

log "exporting for nginx"
export_dir=$work/export
nix copy --store "$store" --to "file://$export_dir?compression=none" "$big" "$top"

NIX_DAEMON_SOCKET_PATH=$work/d.sock nix-daemon --store "$store" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
pids+=("$daemon_pid")
wait_for "nix-daemon" test -S "$work/d.sock"

peerix=$(peerix_bin "$repo")
peerix_port=$(free_port)
"$peerix" --bind 127.0.0.1 --port "$peerix_port" --daemon-socket "$work/d.sock" \
    --store-root "$store" --no-lan --no-filter --scan-interval 0 >"$work/peerix.log" 2>&1 &
peerix_pid=$!
pids+=("$peerix_pid")
wait_for "peerix's first scan" sh -c "curl -sf http://127.0.0.1:$peerix_port/health | grep -q '\"scans\":[1-9]'"

nginx_port=$(free_port)
mkdir -p "$work/nginx-tmp"
cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 1024; }
# keep-alive is on by default; these make it last the whole wrk run
http {
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    client_body_temp_path $work/nginx-tmp;
    proxy_temp_path $work/nginx-tmp;
    fastcgi_temp_path $work/nginx-tmp;
    uwsgi_temp_path $work/nginx-tmp;
    scgi_temp_path $work/nginx-tmp;
    types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; text/x-nix-cache-info nix-cache-info; }
    server { listen 127.0.0.1:$nginx_port; root $export_dir; }
}
CONF
nginx -c "$work/nginx.conf" &
pids+=($!)
wait_for "nginx" curl -sf "http://127.0.0.1:$nginx_port/nix-cache-info"

sleep 1
idle_rss=$(rss "$peerix_pid" VmRSS)

big_hash=$(hash_of "$big")
hit=$(hash_of "$top")
miss=0000000000000000000000000000000a # valid nix32, in neither store
peerix_url=http://127.0.0.1:$peerix_port
nginx_url=http://127.0.0.1:$nginx_port
status_of() { curl -s -o /dev/null -w '%{http_code}' "$1"; }
field() { curl -sf "$1/$2.narinfo" | sed -n "s/^$3: //p"; }

# Sanity checks: the figures below mean nothing if the servers answer
# something else than what is being timed. These check answers, not speed.
for url in "$peerix_url" "$nginx_url"; do
    for check in "$hit 200" "$miss 404" "$big_hash 200"; do
        set -- $check
        got=$(status_of "$url/$1.narinfo")
        if [ "$got" != "$2" ]; then
            echo "$url/$1.narinfo answered $got, expected $2" >&2
            exit 1
        fi
    done
done
nar_size=$(field "$nginx_url" "$big_hash" NarSize)
peerix_big_nar=$peerix_url/$(field "$peerix_url" "$big_hash" URL)
nginx_big_nar=$nginx_url/$(field "$nginx_url" "$big_hash" URL)
[ "$(field "$peerix_url" "$big_hash" NarSize)" = "$nar_size" ] ||
    { echo "peerix and nginx disagree on the NarSize of $big" >&2; exit 1; }

results=$work/results
: >"$results"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; }
notes=$work/notes
: >"$notes"
note() { printf '%s\n' "$*" | tee -a "$notes" >&2; }

# wrk: requests/s, p50 and p99 in microseconds, non-2xx/3xx answers, socket
# errors (a 404 is the expected answer of a miss), and the connections that
# were busy on average: requests/s x mean latency (Little's law). wrk only
# times requests that complete, so a server that leaves some connections
# unserved shows low latencies at a low rate; this number gives it away.
run_wrk() { # run_wrk THREADS CONNECTIONS URL
    wrk -t"$1" -c"$2" -d"${seconds}s" --latency "$3" | python3 -c '
import re, sys
text = sys.stdin.read()
def us(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\b", text, re.M)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
non2xx = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
errors = sum(map(int, m.groups())) if m else 0
busy = rps * us("Latency") / 1e6
print("%.0f %.0f %.0f %d %d %.1f" % (rps, us("50%"), us("99%"), non2xx, errors, busy))'
}

for kind in hit miss; do
    hash=$hit; [ "$kind" = miss ] && hash=$miss
    for conns in 1 16; do
        threads=1; [ "$conns" = 16 ] && threads=2
        for server in peerix nginx; do
            url=$peerix_url; [ "$server" = nginx ] && url=$nginx_url
            log "narinfo $kind, $conns connection(s), $server"
            read -r rps p50 p99 non2xx errors busy < <(run_wrk "$threads" "$conns" "$url/$hash.narinfo")
            record "narinfo $kind c=$conns req/s" "$server" "$rps"
            record "narinfo $kind c=$conns p50 us" "$server" "$p50"
            record "narinfo $kind c=$conns p99 us" "$server" "$p99"
            record "narinfo $kind c=$conns busy conns" "$server" "$busy"
            awk -v b="$busy" -v c="$conns" 'BEGIN { exit !(b < c / 2) }' &&
                note "warning: $server narinfo $kind c=$conns: only $busy of $conns connections busy on average: some were left unanswered (or wrk was short of CPU), and its latencies leave those out"
            [ "$kind" = hit ] && [ "$non2xx" != 0 ] && note "warning: $server narinfo hit c=$conns: $non2xx answers were not 2xx"
            [ "$errors" != 0 ] && note "warning: $server narinfo $kind c=$conns: $errors socket errors"
        done
    done
done

# NAR MiB/s: median of single downloads; then 4 at once, total bytes / wall.
# A download of the wrong length is reported, since its speed is meaningless.
single_download() { # single_download URL
    local size time
    read -r size time < <(curl -s -o /dev/null -w '%{size_download} %{time_total}\n' "$1")
    [ "$size" = "$nar_size" ] || note "warning: a download of $1 got $size bytes, not $nar_size"
    awk -v b="$size" -v t="$time" 'BEGIN { printf "%.0f\n", b / t / 1048576 }'
}
parallel_download() { # parallel_download URL N
    local start end bytes=0
    start=$(date +%s.%N)
    for _ in $(seq "$2"); do curl -s -o /dev/null -w '%{size_download}\n' "$1" >>"$work/sizes" & done
    wait # runs in a command substitution: its only children are these curls
    end=$(date +%s.%N)
    bytes=$(awk '{ s += $1 } END { print s }' "$work/sizes")
    [ "$bytes" = $(($2 * nar_size)) ] || note "warning: $2 downloads of $1 got $bytes bytes, not $(($2 * nar_size))"
    rm -f "$work/sizes"
    awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", b / (e - s) / 1048576 }'
}
# Single downloads alternate between the servers, so drift hits both alike.
# Each takes well under a second here, so many rounds are cheap.
rounds=9
log "NAR download, 1 at a time, $rounds rounds of peerix then nginx"
for _ in $(seq "$rounds"); do
    single_download "$peerix_big_nar" >>"$work/single-peerix"
    single_download "$nginx_big_nar" >>"$work/single-nginx"
done
record "NAR 1 download MiB/s" peerix "$(median <"$work/single-peerix")"
record "NAR 1 download MiB/s" nginx "$(median <"$work/single-nginx")"
for server in peerix nginx; do
    url=$peerix_big_nar; [ "$server" = nginx ] && url=$nginx_big_nar
    log "NAR download, 4 at once, 3 rounds, $server"
    record "NAR 4 downloads MiB/s" "$server" "$(for _ in 1 2 3; do parallel_download "$url" 4; done | median)"
    if [ "$server" = peerix ]; then
        # VmHWM is the lifetime peak: read right after the 4-download runs.
        peak_rss=$(rss "$peerix_pid" VmHWM)
        after_rss=$(rss "$peerix_pid" VmRSS)
    fi
done

# nix copy of the 300-path closure, fresh destination and cache each time.
# A failed copy records nan (and its error), never a time.
copy_seconds() { # copy_seconds URL RUN
    local dest=$work/copy-$2
    local start end copied
    start=$(date +%s.%N)
    if ! XDG_CACHE_HOME=$dest-cache nix copy --from "$1" --to "$dest" \
        --option trusted-public-keys "$pk" "$top" 2>"$dest.err"; then
        note "warning: nix copy ($2) from $1 failed: $(tail -1 "$dest.err")"
        echo nan
    else
        end=$(date +%s.%N)
        copied=$(nix path-info --store "$dest" -r "$top" | wc -l)
        [ "$copied" = "$closure_size" ] || note "warning: nix copy ($2) from $1 left $copied paths, not $closure_size"
        awk -v s="$start" -v e="$end" 'BEGIN { printf "%.2f\n", e - s }'
    fi
    rm -rf "$dest" "$dest-cache" "$dest.err"
}
for server in peerix nginx; do
    url=$peerix_url; [ "$server" = nginx ] && url=$nginx_url
    log "nix copy of $closure_size paths, 3 runs, $server"
    record "nix copy $closure_size paths s" "$server" "$(for run in 1 2 3; do copy_seconds "$url" "$server-$run"; done | median)"
done

# nix-store --dump of the physical path (it ignores --store), NAR bytes / wall.
dump_path=$store/nix/store/$(basename "$big")
dump_mibs() {
    local start end
    start=$(date +%s.%N)
    NIX_REMOTE= nix-store --dump "$dump_path" >/dev/null
    end=$(date +%s.%N)
    awk -v b="$nar_size" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", b / (e - s) / 1048576 }'
}
log "nix-store --dump of the big path, best of 3"
dump=$(for _ in 1 2 3; do dump_mibs; done | sort -n | tail -1)
binary_size=$(stat -c %s "$peerix")

# Only if the crate grows an optional `iroh` feature: the size without it.
lean_size=0
if [ -z "${PEERIX_BIN:-}" ] && sed -n '/^\[features\]/,/^\[/p' "$repo/Cargo.toml" | grep -q '^iroh *='; then
    log "building without default features (no iroh)"
    (cd "$repo" && cargo build --release -q --no-default-features --target-dir "$repo/target/bench-lean")
    lean_size=$(stat -c %s "$repo/target/bench-lean/release/peerix")
fi

{
    echo "peerix $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?'), $(nix --version),"
    echo "$(nproc) cores, $(uname -r), narinfo runs ${seconds}s each, NAR of $nar_size bytes"
    echo
}
python3 - "$results" "$notes" "$idle_rss" "$peak_rss" "$after_rss" "$binary_size" "$lean_size" "$dump" <<'PY'
import math, sys
rows, notes = sys.argv[1:3]
idle, peak, after, size, lean, dump = map(int, sys.argv[3:])  # RSS in KiB
table = {}
for line in open(rows):
    metric, server, value = line.rstrip("\n").split("\t")
    table.setdefault(metric, {})[server] = float(value)
def ratio(a, b):
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
print(f"{'metric':34} {'peerix':>10} {'nginx':>10} {'peerix/nginx':>13}")
for metric, v in table.items():
    digits = 2 if metric.endswith(" s") else 1 if metric.endswith(" conns") else 0
    print(f"{metric:34} {v['peerix']:>10.{digits}f} {v['nginx']:>10.{digits}f} {ratio(v['peerix'], v['nginx']):>13.2f}")
print()
MB = 1_000_000
print(f"peerix idle RSS                    {idle} KiB ({idle * 1024 / MB:.2f} MB)")
print(f"peerix peak RSS (VmHWM) after NARs {peak} KiB ({peak * 1024 / MB:.2f} MB); RSS then {after} KiB")
print(f"stripped release binary            {size} bytes ({size / 1048576:.2f} MiB)")
if lean:
    print(f"  built --no-default-features      {lean} bytes ({lean / 1048576:.2f} MiB)")
print(f"nix-store --dump of the big path   {dump} MiB/s (best of 3)")
print()
def target(name, value, limit, higher_is_better, shown):
    ok = value >= limit if higher_is_better else value <= limit
    print(f"{'met   ' if ok else 'MISSED'} {name}: {shown}")
nar = table["NAR 1 download MiB/s"]
hit = table["narinfo hit c=1 req/s"]
target("NAR, 1 download >= 0.9x nginx", ratio(nar["peerix"], nar["nginx"]), 0.9, True,
       f"{ratio(nar['peerix'], nar['nginx']):.2f}x")
target("narinfo hit, 1 connection >= 0.75x nginx", ratio(hit["peerix"], hit["nginx"]), 0.75, True,
       f"{ratio(hit['peerix'], hit['nginx']):.2f}x")
# MB here is 10^6 bytes, as for the binary; /proc gives KiB.
target("idle RSS <= 4 MB", idle * 1024, 4 * MB, False, f"{idle * 1024 / MB:.2f} MB")
target("peak RSS, 4 downloads <= 8 MB", peak * 1024, 8 * MB, False, f"{peak * 1024 / MB:.2f} MB")
target("stripped binary <= 2 MB", size, 2 * MB, False, f"{size / MB:.2f} MB")
warnings = open(notes).read().strip()
if warnings:
    print()
    print(warnings)
PY
