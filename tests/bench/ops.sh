#!/usr/bin/env bash
# Benchmark of the stats pages: what /metrics, /dashboard.json and the
# dashboard page cost, and peerix's RSS with them. It prints figures; it
# asserts nothing.
#
#   sudo tests/bench/ops.sh
#   sudo BASE_BIN=/path/to/main/peerix tests/bench/ops.sh   # RSS side by side
#   sudo PEERIX_BIN=/path/to/peerix tests/bench/ops.sh      # skip the build
#
# 1. With a full peer table (1,000 peers) and 100,000 distinct paths
#    requested and served through the top-N lists: the time to take a
#    snapshot and render /metrics, /dashboard.json and /health, their
#    sizes, the cost of counting a request, and of one state write
#    (stats.json and peers.json, atomically, with fsyncs) (the ignored test
#    `http::bench` in a release build; it fills the stats core directly).
# 2. A real peerix (release build, LAN on) over a private nix-daemon with
#    the 320-path closure of tests/fixtures/many.nix, in a network
#    namespace of its own holding only loopback: idle RSS after the first
#    scan, the dashboard page's weight, /metrics and /dashboard.json as
#    served (size, median time of 20 curl requests), and RSS after 400 page
#    requests. With BASE_BIN, the same idle RSS for that binary.
# Everything is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
work=$(mktemp -d /tmp/peerix-bench-ops.XXXXXX)
ns=pxops$$
pids=()
daemon_pid=

cleanup() {
    for pid in "${pids[@]}"; do
        [ "$pid" = "$daemon_pid" ] || kill "$pid" 2>/dev/null || true
    done
    [ -z "$daemon_pid" ] || stop_daemon "$daemon_pid"
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix curl busybox ip" nix-bin curl busybox-static iproute2

echo "== 1. the stats core with 1,000 peers and 100,000 paths (release build)"
(cd "$repo" && cargo test --release -q --lib http::bench -- --ignored --nocapture 2>&1) |
    grep -v -e '^running' -e '^test ' -e '^$' -e '^\.$' -e 'test result'

offline_nix "$work"
log "building the store (cached after the first run)"
build_bench_paths "$repo" "$work"
store=$work/a
nix copy --no-check-sigs --to "$store" "$top"
NIX_DAEMON_SOCKET_PATH=$work/d.sock nix-daemon --store "$store" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
pids+=("$daemon_pid")
wait_for "nix-daemon" test -S "$work/d.sock"

peerix=$(peerix_bin "$repo")

# A namespace with loopback only: LAN mode runs (its UDP thread, the
# summaries), and nothing leaves it.
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
port=12304
url=http://127.0.0.1:$port

# start BINARY: peerix on 0.0.0.0:12304 in the namespace, LAN on; sets pid.
start() {
    # `ip netns exec` execs peerix: $! is peerix's pid.
    ip netns exec "$ns" "$1" --bind 0.0.0.0 --port "$port" --daemon-socket "$work/d.sock" \
        --store-root "$store" --no-filter --scan-interval 0 \
        --state-dir "$work/state" >"$work/peerix.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_for "peerix's first scan" sh -c "ip netns exec $ns curl -s $url/health | grep -q '\"scans\":[1-9]'"
    sleep 1
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "peerix ($1) exited:" >&2
        cat "$work/peerix.log" >&2
        exit 1
    fi
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

# served PATH: "<bytes> <median seconds>" of 20 GETs.
served() {
    local size times
    size=$(in_ns curl -s "$url$1" | wc -c)
    times=$(for _ in $(seq 20); do in_ns curl -s -o /dev/null -w '%{time_total}\n' "$url$1"; done | median)
    echo "$size $times"
}

echo
echo "== 2. a real peerix (LAN on, 320 paths, no peers)"
base_rss=
if [ -n "${BASE_BIN:-}" ]; then
    start "$BASE_BIN"
    base_rss=$(rss "$pid" VmRSS)
    stop
fi
start "$peerix"
idle_rss=$(rss "$pid" VmRSS)
read -r page_bytes _ < <(served /dashboard)
read -r metrics_bytes metrics_s < <(served /metrics)
read -r json_bytes json_s < <(served /dashboard.json)
for _ in $(seq 200); do
    in_ns curl -s -o /dev/null "$url/metrics" -o /dev/null "$url/dashboard.json"
done
busy_rss=$(rss "$pid" VmRSS)
hwm=$(rss "$pid" VmHWM)
stop

printf '%-44s %s\n' \
    "idle RSS (KiB), this build" "$idle_rss" \
    "idle RSS (KiB), BASE_BIN" "${base_rss:-not measured (set BASE_BIN)}" \
    "RSS after 400 page requests (KiB)" "$busy_rss" \
    "peak RSS, VmHWM (KiB)" "$hwm" \
    "/dashboard page (bytes)" "$page_bytes" \
    "/metrics (bytes, median s of 20 curls)" "$metrics_bytes $metrics_s" \
    "/dashboard.json (bytes, median s of 20 curls)" "$json_bytes $json_s" \
    "binary size (bytes)" "$(stat -c %s "$peerix")"
