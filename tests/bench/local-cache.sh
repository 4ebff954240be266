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
seconds=${BENCH_SECONDS:-5}
work=$(mktemp -d /tmp/peerix-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as nobody
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

missing=()
for tool in nix wrk curl nginx busybox python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends nix-bin wrk curl nginx-light busybox-static python3
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for DESCRIPTION COMMAND...: up to 60 s
    local what=$1; shift
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; return 1
}
log() { printf '# %s\n' "$*" >&2; }

# An offline nix, as in the integration tests.
mkdir -p "$work/conf" "$work/busybox/bin"
printf 'experimental-features = nix-command\nsubstituters =\nbuild-users-group =\nsandbox = false\n' >"$work/conf/nix.conf"
: >"$work/empty.conf"
export NIX_CONF_DIR=$work/conf NIX_USER_CONF_FILES=$work/empty.conf XDG_CACHE_HOME=$work/cache
cp /bin/busybox "$work/busybox/bin/busybox"
ln -s busybox "$work/busybox/bin/sh"

log "building the store (cached after the first run)"
big=$(nix-build "$repo/tests/bench/big.nix" --no-out-link --arg busyboxDir "$work/busybox")
top=$(nix-build "$repo/tests/fixtures/many.nix" --no-out-link --max-jobs 8 --arg busyboxDir "$work/busybox" -A top)
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
pids+=($!)
wait_for "nix-daemon" test -S "$work/d.sock"

peerix=${PEERIX_BIN:-}
if [ -z "$peerix" ]; then
    (cd "$repo" && cargo build --release -q)
    peerix=$repo/target/release/peerix
fi
peerix_port=$(free_port)
"$peerix" --bind 127.0.0.1 --port "$peerix_port" --daemon-socket "$work/d.sock" \
    --store-root "$store" --no-filter --scan-interval 0 >"$work/peerix.log" 2>&1 &
peerix_pid=$!
pids+=("$peerix_pid")
wait_for "peerix's first scan" sh -c "curl -sf http://127.0.0.1:$peerix_port/health | grep -q '\"scans\":[1-9]'"

nginx_port=$(free_port)
mkdir -p "$work/nginx-tmp"
cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon on;
events { worker_connections 1024; }
http {
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/nginx-tmp;
    proxy_temp_path $work/nginx-tmp;
    fastcgi_temp_path $work/nginx-tmp;
    uwsgi_temp_path $work/nginx-tmp;
    scgi_temp_path $work/nginx-tmp;
    types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; text/x-nix-cache-info nix-cache-info; }
    server { listen 127.0.0.1:$nginx_port; root $export_dir; }
}
CONF
nginx -c "$work/nginx.conf"
wait_for "nginx" curl -sf "http://127.0.0.1:$nginx_port/nix-cache-info"

rss() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
sleep 1
idle_rss=$(rss "$peerix_pid" VmRSS)

hash_of() { basename "$1" | cut -c1-32; }
big_hash=$(hash_of "$big")
hit=$(hash_of "$top")
miss=0000000000000000000000000000000a
peerix_url=http://127.0.0.1:$peerix_port
nginx_url=http://127.0.0.1:$nginx_port
nar_url() { curl -sf "$1/$2.narinfo" | sed -n 's/^URL: //p'; }
peerix_big_nar=$peerix_url/$(nar_url "$peerix_url" "$big_hash")
nginx_big_nar=$nginx_url/$(nar_url "$nginx_url" "$big_hash")

results=$work/results
: >"$results"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; }

# wrk: requests/s, p50 and p99 in microseconds.
run_wrk() { # run_wrk THREADS CONNECTIONS URL
    wrk -t"$1" -c"$2" -d"${seconds}s" --latency "$3" | python3 -c '
import re, sys
text = sys.stdin.read()
def us(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
print("%.0f %.0f %.0f" % (rps, us("50%"), us("99%")))'
}

for kind in hit miss; do
    hash=$hit; [ "$kind" = miss ] && hash=$miss
    for conns in 1 16; do
        threads=1; [ "$conns" = 16 ] && threads=2
        for server in peerix nginx; do
            url=$peerix_url; [ "$server" = nginx ] && url=$nginx_url
            log "narinfo $kind, $conns connection(s), $server"
            read -r rps p50 p99 < <(run_wrk "$threads" "$conns" "$url/$hash.narinfo")
            record "narinfo $kind c=$conns req/s" "$server" "$rps"
            record "narinfo $kind c=$conns p50 us" "$server" "$p50"
            record "narinfo $kind c=$conns p99 us" "$server" "$p99"
        done
    done
done

# NAR MiB/s: median of three single downloads; then 4 at once, total bytes / wall.
single_download() {
    curl -sf -o /dev/null -w '%{size_download} %{time_total}\n' "$1" |
        awk '{ printf "%.0f\n", $1 / $2 / 1048576 }'
}
parallel_download() { # parallel_download URL N
    local start end bytes=0
    start=$(date +%s.%N)
    for _ in $(seq "$2"); do curl -sf -o /dev/null -w '%{size_download}\n' "$1" >>"$work/sizes" & done
    wait # runs in a command substitution: its only children are these curls
    end=$(date +%s.%N)
    bytes=$(awk '{ s += $1 } END { print s }' "$work/sizes")
    rm -f "$work/sizes"
    awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", b / (e - s) / 1048576 }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Single downloads alternate between the servers, so drift hits both alike.
log "NAR download, 1 at a time, 7 rounds of peerix then nginx"
for _ in 1 2 3 4 5 6 7; do
    single_download "$peerix_big_nar" >>"$work/single-peerix"
    single_download "$nginx_big_nar" >>"$work/single-nginx"
done
record "NAR 1 download MiB/s" peerix "$(median <"$work/single-peerix")"
record "NAR 1 download MiB/s" nginx "$(median <"$work/single-nginx")"
for server in peerix nginx; do
    url=$peerix_big_nar; [ "$server" = nginx ] && url=$nginx_big_nar
    log "NAR download, 4 at once, $server"
    record "NAR 4 downloads MiB/s" "$server" "$(for _ in 1 2; do parallel_download "$url" 4; done | median)"
    if [ "$server" = peerix ]; then
        peak_rss=$(rss "$peerix_pid" VmHWM)
        after_rss=$(rss "$peerix_pid" VmRSS)
    fi
done

# nix copy of the 300-path closure, fresh destination and cache each time.
copy_seconds() { # copy_seconds URL RUN
    local dest=$work/copy-$RANDOM-$2
    local start end
    start=$(date +%s.%N)
    XDG_CACHE_HOME=$dest-cache nix copy --from "$1" --to "$dest" \
        --option trusted-public-keys "$pk" "$top" 2>/dev/null
    end=$(date +%s.%N)
    rm -rf "$dest" "$dest-cache"
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.2f\n", e - s }'
}
for server in peerix nginx; do
    url=$peerix_url; [ "$server" = nginx ] && url=$nginx_url
    log "nix copy of $closure_size paths, $server"
    record "nix copy $closure_size paths s" "$server" "$(for run in 1 2; do copy_seconds "$url" "$run"; done | median)"
done

dump_path=$store/nix/store/$(basename "$big")
dump_mibs() {
    local start end
    start=$(date +%s.%N)
    NIX_REMOTE= nix-store --dump "$dump_path" >/dev/null
    end=$(date +%s.%N)
    awk -v b="$(du -sb "$dump_path" | cut -f1)" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", b / (e - s) / 1048576 }'
}
dump=$(for _ in 1 2 3; do dump_mibs; done | sort -n | tail -1)
binary_size=$(stat -c %s "$peerix")

python3 - "$results" "$idle_rss" "$peak_rss" "$after_rss" "$binary_size" "$dump" <<'PY'
import sys
rows, idle, peak, after, size, dump = sys.argv[1], *map(int, sys.argv[2:])
table = {}
for line in open(rows):
    metric, server, value = line.rstrip("\n").split("\t")
    table.setdefault(metric, {})[server] = float(value)
print(f"{'metric':34} {'peerix':>10} {'nginx':>10} {'peerix/nginx':>13}")
for metric, v in table.items():
    digits = 2 if metric.endswith(" s") else 0
    print(f"{metric:34} {v['peerix']:>10.{digits}f} {v['nginx']:>10.{digits}f} {v['peerix'] / v['nginx']:>13.2f}")
print()
print(f"peerix idle RSS                    {idle / 1024:.1f} MiB")
print(f"peerix peak RSS (VmHWM) after NARs {peak / 1024:.1f} MiB (RSS then {after / 1024:.1f} MiB)")
print(f"stripped release binary            {size} bytes ({size / 1048576:.2f} MiB)")
print(f"nix-store --dump of the big path   {dump} MiB/s (best of 3)")
print()
def target(name, ok, detail):
    print(f"{'met   ' if ok else 'MISSED'} {name}: {detail}")
nar = table["NAR 1 download MiB/s"]
hit = table["narinfo hit c=1 req/s"]
target("NAR, 1 download >= 0.9x nginx", nar["peerix"] >= 0.9 * nar["nginx"], f"{nar['peerix'] / nar['nginx']:.2f}x")
target("narinfo hit, 1 connection >= 0.75x nginx", hit["peerix"] >= 0.75 * hit["nginx"], f"{hit['peerix'] / hit['nginx']:.2f}x")
target("idle RSS <= 4 MB", idle <= 4000, f"{idle} kB")
target("peak RSS, 4 downloads <= 8 MB", peak <= 8000, f"{peak} kB")
target("stripped binary <= 2 MB", size <= 2_000_000, f"{size} bytes")
PY
