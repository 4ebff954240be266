#!/usr/bin/env bash
# Benchmark of what the peers' store summaries cost a host: B's RSS while it
# holds the summaries of BENCH_PEERS (20) peers of BENCH_PATHS (100 000)
# shared paths each, and how fast a miss is when B must probe them all.
# It prints figures; it asserts nothing.
#
# Run as root from the repository: tests/bench/summaries-rss.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build).
# Two network namespaces on a bridge in a third: B (peerix, an empty chroot
# store and its nix-daemon) and F, whose one Python process plays all the
# peers, each from an address of its own. All traffic stays inside them;
# everything is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
peers=${BENCH_PEERS:-20}
paths=${BENCH_PATHS:-100000}
miss_count=${BENCH_MISSES:-2000}
port=12304
if [ "$peers" -lt 1 ] || [ "$peers" -gt 200 ]; then echo "BENCH_PEERS: 1 to 200" >&2; exit 2; fi
work=$(mktemp -d /tmp/peerix-benchsumrss.XXXXXX)
ns_sw=pxrs$$ ns_b=pxrb$$ ns_f=pxrf$$
namespaces=()
pids=()
daemon_pid=

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$daemon_pid" ] && stop_daemon "$daemon_pid"
    for pid in "${pids[@]}" $daemon_pid; do wait "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix curl python3 ip" nix-bin curl python3 iproute2

log "making the LAN: bridge in $ns_sw; B in $ns_b (10.78.0.2), $peers peers in $ns_f (10.78.1.x)"
for ns in "$ns_sw" "$ns_b" "$ns_f"; do
    ip netns add "$ns"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
done
ip -n "$ns_sw" link add "pxrbr$$" type bridge
ip -n "$ns_sw" link set "pxrbr$$" up
for host in b f; do
    ns=$ns_b
    [ "$host" = f ] && ns=$ns_f
    ip -n "$ns_sw" link add "pxrs$host$$" type veth peer name "pxr$host$$" netns "$ns"
    ip -n "$ns_sw" link set "pxrs$host$$" master "pxrbr$$" up
    ip -n "$ns" link set "pxr$host$$" up
done
ip -n "$ns_b" addr add 10.78.0.2/16 broadcast 10.78.255.255 dev "pxrb$$"
for i in $(seq "$peers"); do
    ip -n "$ns_f" addr add "10.78.1.$i/16" broadcast 10.78.255.255 dev "pxrf$$"
done

offline_nix "$work"
nix path-info --store "$work/b" --all >/dev/null # makes the empty store
NIX_DAEMON_SOCKET_PATH=$work/b.sock nix-daemon --store "$work/b" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
wait_for "nix-daemon" test -S "$work/b.sock"

peerix=$(peerix_bin "$repo")
ip netns exec "$ns_b" "$peerix" --bind 0.0.0.0 --port "$port" --daemon-socket "$work/b.sock" \
    --store-root "$work/b" --scan-interval 0 --state-dir "$work/state-b" >"$work/peerix.log" 2>&1 &
b_pid=$!
pids+=("$b_pid")
health() { ip netns exec "$ns_b" curl -sf "http://127.0.0.1:$port/health"; }
json() { python3 -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)' "$1"; }
wait_for "peerix's first scan" sh -c "ip netns exec $ns_b curl -sf http://127.0.0.1:$port/health | grep -q '\"scans\":[1-9]'"
sleep 3 # past the settling time after start
idle_rss=$(rss "$b_pid" VmRSS)
idle_hwm=$(rss "$b_pid" VmHWM)

# The peers: each announces (type 2: generation, paths, HTTP port) by
# broadcast from its own address every 2 s, and serves a Bloom filter of
# `paths` random hash parts at /local/summary, in the format of
# src/lan/summary.rs. The filters are built before the first announcement.
log "building $peers summaries of $paths paths each"
cat >"$work/peers.py" <<'PY'
import http.server, os, socket, struct, sys, threading, time
peers, paths, port, ready = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
PROBES, MASK = 7, (1 << 64) - 1
bits = (paths * 10 + 7) // 8 * 8

def summary(generation):
    filt = bytearray(bits // 8)
    for _ in range(paths):
        raw = os.urandom(16)
        h1, h2 = struct.unpack("<QQ", raw)
        h2 |= 1
        for j in range(PROBES):
            bit = ((h1 + j * h2) & MASK) % bits
            filt[bit >> 3] |= 1 << (bit & 7)
    head = b"PXSM" + bytes([1, PROBES, 0, 0]) + struct.pack("<QII", generation, paths, bits)
    return head + bytes(filt)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body, etag = self.server.body, f'"{self.server.generation}"'
        if self.path != "/local/summary":
            body, status = b"not found\n", 404
        elif self.headers.get("If-None-Match") == etag:
            body, status = b"", 304
        else:
            status = 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass # B closing a kept connection

servers = []
for i in range(1, peers + 1):
    ip, generation = f"10.78.1.{i}", 1000 + i
    server = Server((ip, port), Handler)
    server.body, server.generation = summary(generation), generation
    threading.Thread(target=server.serve_forever, daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    udp.bind((ip, port))
    servers.append((udp, struct.pack(">BQII", 2, generation, paths, port)))
open(ready, "w").write(str(len(servers[0][1]) if servers else 0))
while True:
    for udp, packet in servers:
        udp.sendto(packet, ("10.78.255.255", port))
    time.sleep(2)
PY
ip netns exec "$ns_f" python3 "$work/peers.py" "$peers" "$paths" "$port" "$work/ready" &
pids+=($!)
for _ in $(seq 600); do [ -e "$work/ready" ] && break; sleep 0.5; done
[ -e "$work/ready" ] || { echo "the peers did not start" >&2; exit 1; }
wait_for "B to hold $peers summaries" sh -c "ip netns exec $ns_b curl -sf http://127.0.0.1:$port/health | python3 -c '
import json, sys
s = json.load(sys.stdin)[\"lan\"][\"summaries\"]
sys.exit(0 if s[\"covers_lan\"] and s[\"hosts_with_summary\"] == $peers else 1)'"
sleep 5 # a few more announcements: nothing is fetched again
held_rss=$(rss "$b_pid" VmRSS)
held_hwm=$(rss "$b_pid" VmHWM)
summaries=$(health | json lan.summaries)

# Misses with every summary probed: random hash parts, one keep-alive
# connection, one at a time.
cat >"$work/misses.py" <<'PY'
import http.client, secrets, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
c = http.client.HTTPConnection("127.0.0.1", port)
lat, other = [], 0
for _ in range(n):
    h = "".join(secrets.choice(alphabet) for _ in range(32))
    t = time.perf_counter()
    c.request("GET", f"/{h}.narinfo")
    r = c.getresponse(); r.read()
    if r.status == 404:
        lat.append((time.perf_counter() - t) * 1000)
    else:
        other += 1
    if r.will_close:
        c.close(); c = http.client.HTTPConnection("127.0.0.1", port)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] if lat else float("nan")
print(f"{q(.5):.3f} {q(.9):.3f} {q(.99):.3f} {other}")
PY
log "$miss_count misses on B"
q0=$(health | json lan.queries)
a0=$(health | json lan.summaries.misses_answered)
read -r p50 p90 p99 other < <(ip netns exec "$ns_b" python3 "$work/misses.py" "$port" "$miss_count")
q1=$(health | json lan.queries)
a1=$(health | json lan.summaries.misses_answered)
after_rss=$(rss "$b_pid" VmRSS)

summary_bytes=$(( 24 + (paths * 10 + 7) / 8 ))
echo "peerix $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?') ($("$peerix" --version)), $(nproc) cores, $(uname -r)"
echo "B holds the summaries of $peers peers of $paths paths each ($summary_bytes bytes each, $((summary_bytes * peers)) in all)"
echo
echo "B's RSS, idle, no peer heard:        ${idle_rss} KiB (peak ${idle_hwm} KiB)"
echo "B's RSS, holding the $peers summaries:  ${held_rss} KiB (peak ${held_hwm} KiB); +$((held_rss - idle_rss)) KiB"
echo "B's RSS after $miss_count misses:          ${after_rss} KiB"
echo "misses, $peers summaries probed each: p50 $p50 ms, p90 $p90 ms, p99 $p99 ms; not 404: $other; LAN queries $((q1 - q0))"
echo "  answered by the summaries at once: $((a1 - a0)) of $miss_count; the rest some filter claimed (false positives), asked of that peer"
echo "B's /health lan.summaries: $summaries"
if [ -n "${BENCH_LOG:-}" ]; then cp "$work/peerix.log" "$BENCH_LOG"; fi # B's log, to look into
