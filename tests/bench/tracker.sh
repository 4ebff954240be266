#!/usr/bin/env bash
# Benchmark of peerix-tracker: fills it through its own API with signed
# requests (10k peers x 1k hashes = 10M rows by default), then times
# lookups with wrk, and reports the database's size, the tracker's memory
# and the binaries' sizes. It prints figures; it asserts nothing.
#
# Run from the repository: tests/bench/tracker.sh
# BENCH_PEERS, BENCH_HASHES (per peer), BENCH_DELTA (hashes added and
# removed per delta), BENCH_REWORK (peers that send a delta and their full
# set again), BENCH_THREADS (client connections while filling),
# BENCH_SECONDS (per wrk run) change the defaults 10000, 1000, 500, 1000,
# 4, 10.
# TRACKER_BIN=path picks another tracker binary (default: a release build).
# Everything runs on 127.0.0.1 and is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
peers=${BENCH_PEERS:-10000}
hashes=${BENCH_HASHES:-1000}
delta=${BENCH_DELTA:-500}
rework=${BENCH_REWORK:-1000}
threads=${BENCH_THREADS:-4}
seconds=${BENCH_SECONDS:-10}
work=$(mktemp -d /tmp/peerix-tracker-bench.XXXXXX)
tracker_pid=

cleanup() {
    if [ -n "$tracker_pid" ]; then
        kill "$tracker_pid" 2>/dev/null || true
        wait "$tracker_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "wrk" wrk

log "building (release)"
(cd "$repo" && cargo build --release --bins --example tracker-fill >&2)
tracker=${TRACKER_BIN:-$repo/target/release/peerix-tracker}
fill=$repo/target/release/examples/tracker-fill

# A long TTL: filling takes minutes, and the helper does not heartbeat.
"$tracker" --bind 127.0.0.1 --port 0 --db "$work/tracker.db" --max-peers-per-ip 0 \
    --peer-ttl 86400 2>"$work/tracker.log" &
tracker_pid=$!
wait_for "the tracker" grep -q "peerix-tracker .* listening on" "$work/tracker.log"
addr=$(sed -n 's/.*peerix-tracker .* listening on \([0-9.:]*\),.*/\1/p' "$work/tracker.log")
log "tracker on $addr, pid $tracker_pid"

echo "== fill: $peers peers x $hashes hashes, $threads connections (signed requests)"
"$fill" --addr "$addr" --keys "$work/keys" --peers "$peers" --hashes "$hashes" \
    --delta "$delta" --rework "$rework" --threads "$threads" --sample "$work/sample"

rows=$(python3 -c "import sqlite3; c = sqlite3.connect('file:$work/tracker.db?mode=ro', uri=True); print(c.execute('SELECT count(*) FROM packages').fetchone()[0])")
db_bytes=$(du -cb "$work"/tracker.db* | tail -1 | cut -f1)
echo "== database"
printf 'rows\t%s\n' "$rows"
awk -v b="$db_bytes" -v r="$rows" 'BEGIN { printf "size (db + wal)\t%.0f MiB\t%.1f MiB per million rows\n", b / 1048576, b / 1048576 / (r / 1000000) }'
memory() { # memory WHEN
    printf 'tracker RSS %s\t%s KiB (anonymous %s KiB, file %s KiB; peak %s KiB)\n' "$1" \
        "$(rss "$tracker_pid" VmRSS)" "$(rss "$tracker_pid" RssAnon)" \
        "$(rss "$tracker_pid" RssFile)" "$(rss "$tracker_pid" VmHWM)"
}
memory "after filling"

cat >"$work/find.lua" <<EOF
local hashes = {}
for line in io.lines("$work/sample") do hashes[#hashes + 1] = line end
local prefix = os.getenv("FIND_PREFIX") or ""
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
request = function()
    return wrk.format("GET", "/find/" .. prefix .. hashes[math.random(#hashes)]:sub(#prefix + 1))
end
EOF

# wrk_find LABEL THREADS CONNECTIONS: one line of figures.
wrk_find() {
    local out
    out=$(wrk -t"$2" -c"$3" -d"${seconds}s" --latency -s "$work/find.lua" "http://$addr" 2>&1)
    local rps p50 p99 errors
    rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
    p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
    errors=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr -s ' ' | paste -sd';' || true)
    printf '%s\t%s conns\t%s req/s\tp50 %s\tp99 %s\t%s\n' "$1" "$3" "$rps" "$p50" "$p99" "${errors:-no errors}"
}

echo "== GET /find (pool hash parts, each held by ~10 peers; ${seconds} s each)"
curl -s "http://$addr/find/$(head -1 "$work/sample")" | head -c 300 >&2 || true
echo >&2
wrk_find "find hit" 1 1
wrk_find "find hit" 2 16
FIND_PREFIX=zzzz wrk_find "find miss" 2 16
memory "after lookups"

echo "== binaries (stripped)"
(cd "$repo" && cargo build --release --bin peerix >&2)
for bin in "$repo/target/release/peerix" "$tracker"; do
    printf '%s\t%s bytes\n' "$(basename "$bin")" "$(stat -c %s "$bin")"
done
