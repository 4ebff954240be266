#!/usr/bin/env bash
# Benchmark: how long a new path takes from a scan on host A to a lookup on
# host B through a tracker. It prints figures; it asserts nothing.
#
# Run from the repository, as root: sudo tests/bench/tracker-delta.sh
# BENCH_ROUNDS (default 5) new paths, one after the other.
# PEERIX_BIN / TRACKER_BIN pick other binaries (default: release builds).
#
# Everything runs in one network namespace of its own that has only its
# loopback: the tracker, A's and B's nix-daemons and peerix. A binds
# 0.0.0.0 there (a host bound to loopback announces nothing), which reaches
# nothing but that namespace's loopback. All is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
rounds=${BENCH_ROUNDS:-5}
work=$(mktemp -d /tmp/peerix-tracker-delta.XXXXXX)
ns=pxtd-$$
pids=()
daemons=()

cleanup() {
    local pid
    # `ip netns exec` may fork: stop what runs in the namespace itself.
    for pid in $(ip netns pids "$ns" 2>/dev/null) "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    for pid in "${daemons[@]}"; do stop_daemon "$pid"; done
    for pid in "${daemons[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || { echo "tracker-delta.sh: needs root (a network namespace)" >&2; exit 1; }
install_missing "nix-daemon curl ip" nix-bin curl iproute2

if [ -z "${PEERIX_BIN:-}" ] || [ -z "${TRACKER_BIN:-}" ]; then
    log "building (release)"
    (cd "$repo" && cargo build --release --bins >&2)
fi
peerix=${PEERIX_BIN:-$repo/target/release/peerix}
tracker=${TRACKER_BIN:-$repo/target/release/peerix-tracker}

offline_nix "$work"
# A signs its new paths; B trusts only that key, as a peer's narinfo must
# carry a signature B trusts.
nix key generate-secret --key-name tracker-delta-1 >"$work/sk"
public=$(nix key convert-secret-to-public <"$work/sk")
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }

in_ns "$tracker" --bind 127.0.0.1 --port 12305 --db "$work/tracker.db" 2>"$work/tracker.log" &
pids+=($!)
wait_for "the tracker" grep -q "listening on" "$work/tracker.log"

# host NAME PORT BIND: a chroot store, its nix-daemon and a peerix on it.
host() {
    local name=$1 port=$2 bind=$3
    mkdir -p "$work/$name"
    nix path-info --store "$work/$name/store" --all >/dev/null
    NIX_DAEMON_SOCKET_PATH=$work/$name/d.sock setsid nix-daemon --store "$work/$name/store" \
        >"$work/$name/daemon.log" 2>&1 &
    daemons+=($!)
    wait_for "$name's nix-daemon" test -S "$work/$name/d.sock"
    # Through a shell that writes its own pid and becomes peerix: the pid
    # SIGHUP must reach.
    in_ns sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$work/$name/pid" \
        "$peerix" --bind "$bind" --port "$port" --no-lan --no-filter --scan-interval 0 \
        --daemon-socket "$work/$name/d.sock" --store-root "$work/$name/store" \
        --state-dir "$work/$name/state" --tracker http://127.0.0.1:12305 --trusted-key "$public" \
        >"$work/$name/peerix.log" 2>&1 &
    pids+=($!)
    wait_for "$name's pid" test -s "$work/$name/pid"
    eval "${name}_pid=$(cat "$work/$name/pid")"
    wait_for "$name's peerix" in_ns curl -sf "http://127.0.0.1:$port/nix-cache-info"
}
host a 12304 0.0.0.0
host b 12306 127.0.0.1
wait_for "A to register with the tracker" \
    sh -c "ip netns exec $ns curl -sf http://127.0.0.1:12305/iroh/peers | grep -q node_id"

now_ms() { date +%s%3N; }
echo "== a new path on A: scan (SIGHUP) -> listed by the tracker -> 200 on B"
printf '%-6s %-10s %-10s\n' round tracker_ms lookup_ms
listed=()
found=()
for round in $(seq "$rounds"); do
    printf 'peerix tracker-delta %s %s\n' "$round" "$(date +%s%N)" >"$work/new-$round"
    path=$(nix store add-file --store "unix://$work/a/d.sock" "$work/new-$round")
    nix store sign --store "unix://$work/a/d.sock" -k "$work/sk" "$path" >/dev/null 2>&1
    hash=$(hash_of "$path")
    start=$(now_ms)
    kill -HUP "$a_pid"
    for _ in $(seq 600); do
        in_ns curl -sf "http://127.0.0.1:12305/find/$hash" | grep -q node_id && break
        sleep 0.01
    done
    t_listed=$(($(now_ms) - start))
    status=$(in_ns curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:12306/$hash.narinfo")
    t_found=$(($(now_ms) - start))
    [ "$status" = 200 ] || { t_found=nan; log "B: $status"; tail -5 "$work/b/peerix.log" >&2; tail -3 "$work/a/peerix.log" >&2; }
    printf '%-6s %-10s %-10s\n' "$round" "$t_listed" "$t_found"
    listed+=("$t_listed")
    found+=("$t_found")
done
echo "median: scan to tracker $(printf '%s\n' "${listed[@]}" | median) ms," \
    "scan to a 200 on B $(printf '%s\n' "${found[@]}" | median) ms"
echo "(the times include the poll step of 10 ms and a curl start per poll;" \
    "without SIGHUP a new path waits for the next scan: --scan-interval, 3600 s by default)"
