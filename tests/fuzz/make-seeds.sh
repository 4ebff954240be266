#!/usr/bin/env bash
# Makes the fuzz seeds from real Nix output (run as root, from anywhere):
#
#   tests/fuzz/make-seeds.sh [OUT]     default OUT: tests/fuzz/seeds
#
# With an offline nix (as the integration tests use) it builds three paths
# of tests/fixtures/realistic.nix (a directory tree 40 levels deep with
# symlinks, empty and executable files; a one-file path; a symlink path),
# copies their closure and a content-addressed path into a chroot store
# signed with the test key of src/nix/testdata.rs, and then records:
#   narinfo/  `nix copy --to file://...?compression=none` (and one with xz)
#   nar/      `nix-store --dump` of those paths (busybox's is left out: 2 MB)
#   daemon/   what a real nix-daemon sent to peerix's client, per session
#   route/    the request targets nix sent to a real peerix (`nix copy
#             --from http://...` on the root and /local/ endpoints), and
#             peer NAR routes made from them
#   packet/   LAN packets in the original peerix's format for those paths
#   config/   the test configs and the flags the tests start peerix with
# Everything runs on 127.0.0.1 and is stopped and removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(realpath -m "${1:-$repo/tests/fuzz/seeds}")
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"

[ "$(id -u)" = 0 ] || { echo "make-seeds.sh: needs root (chroot store, nix-daemon)" >&2; exit 1; }
install_missing "nix nix-daemon" nix-bin busybox-static

work=$(mktemp -d /tmp/peerix-seeds.XXXXXX)
pids=()
daemon_pid=
cleanup() {
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

log "building the recorder and peerix"
cargo build -q --release --manifest-path "$repo/tests/fuzz/Cargo.toml" --example record
record=$repo/tests/fuzz/target/release/examples/record
(cd "$repo" && cargo build -q --bin peerix)
peerix=$repo/target/debug/peerix

offline_nix "$work"
log "building the fixture paths (cached after the first run)"
mapfile -t built < <(nix-build "$repo/tests/fixtures/realistic.nix" --no-out-link \
    --arg busyboxDir "$work/busybox" -A lib -A script -A link)
store=$work/a
nix copy --no-check-sigs --to "$store" "${built[@]}"
printf 'a content-addressed file\n' >"$work/ca-file.txt"
ca=$(nix-store --store "$store" --add "$work/ca-file.txt")
paths=("${built[@]}" "$ca")
# The secret key of src/nix/testdata.rs, which the narinfo target knows.
sed -n 's/^pub const SECRET_KEY: &str = "\(.*\)\\n";$/\1/p' "$repo/src/nix/testdata.rs" >"$work/sk"
[ -s "$work/sk" ] || { echo "no SECRET_KEY in src/nix/testdata.rs" >&2; exit 1; }
nix store sign --store "$store" -k "$work/sk" -r "${paths[@]}"
busybox_path=$(nix-store --store "$store" -qR "${built[0]}" | grep -- '-busybox$')

rm -rf "$out"/{narinfo,nar,daemon,route,packet,config}
mkdir -p "$out"/{narinfo,nar,daemon,route,packet,config}

log "narinfo: nix copy --to file://"
nix copy --store "$store" --to "file://$work/cache?compression=none" "${paths[@]}"
nix copy --store "$store" --to "file://$work/cache-xz?compression=xz" "${built[1]}"
for f in "$work"/cache/*.narinfo; do cp "$f" "$out/narinfo/$(basename "$f")"; done
for f in "$work"/cache-xz/*.narinfo; do cp "$f" "$out/narinfo/xz-$(basename "$f")"; done

log "nar: nix-store --dump"
for p in "${paths[@]}"; do
    [ "$p" = "$busybox_path" ] && continue
    nix-store --dump "$store$p" >"$out/nar/$(basename "$p").nar"
done

log "daemon: sessions of peerix's client with nix-daemon"
NIX_DAEMON_SOCKET_PATH=$work/d.sock nix-daemon --store "$store" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
pids+=("$daemon_pid")
wait_for "nix-daemon" test -S "$work/d.sock"
"$record" daemon "$work/d.sock" "$out/daemon" "${paths[@]}" "$busybox_path"

log "route: what nix asks a real peerix"
port=$("$record" free-port)
"$peerix" --bind 127.0.0.1 --port "$port" --daemon-socket "$work/d.sock" --store-root "$store" \
    --state-dir "$work/state" --no-lan --no-filter --private-key "$work/sk" >"$work/peerix.log" 2>&1 &
pids+=("$!")
wait_for "peerix" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
relay_port=$("$record" free-port)
"$record" http "$relay_port" "$port" "$work/http" &
pids+=("$!")
wait_for "the relay" bash -c "exec 3<>/dev/tcp/127.0.0.1/$relay_port"
cache=http://127.0.0.1:$relay_port
nix copy --no-check-sigs --from "$cache" --to "$work/b" "${built[0]}" "$ca"
nix copy --no-check-sigs --from "$cache/local" --to "$work/c" "${built[2]}"
# A path no one has: nix asks for its narinfo and gets a 404.
nix path-info --store "$cache" /nix/store/00000000000000000000000000000000-not-there >/dev/null 2>&1 || true
n=0
while read -r target; do
    printf '%s' "$target" >"$out/route/$(printf '%02d' "$n")"
    n=$((n + 1))
done < <(cat "$work"/http/conn-* | tr -d '\r' | awk '$1 == "GET" || $1 == "HEAD" { print $2 }' | sort -u)
[ "$n" -ge 4 ] || { echo "only $n request targets recorded" >&2; exit 1; }
# The URL peerix hands out for a NAR held by a LAN peer: lan/<peer>/<nar url>.
nar_url=$(cat "$work"/http/conn-* | tr -d '\r' | awk '$1 == "GET" && $2 ~ "^/nar/" { print $2; exit }')
printf '/lan/192.168.1.20:12304%s' "$nar_url" >"$out/route/peer-v4"
printf '/lan/[fd00::20]:12304%s' "$nar_url" >"$out/route/peer-v6"

log "packet: LAN requests and responses"
hashes=()
for p in "${paths[@]}" "$busybox_path"; do hashes+=("$(hash_of "$p")"); done
"$record" packets "$out/packet" "${hashes[@]}"

log "config: the test configs and peerix's own flags"
# Each seed: TOML text, then NUL and one argument per NUL (see fuzz_targets/config.rs).
seed_config() { # NAME TOML ARG...
    local name=$1 toml=$2; shift 2
    { printf '%s' "$toml"; for a in "$@"; do printf '\0%s' "$a"; done; } >"$out/config/$name"
}
seed_config flags-tests '' --bind 127.0.0.1 --port "$port" --daemon-socket "$work/d.sock" \
    --store-root "$store" --state-dir "$work/state" --verbose --no-lan
seed_config flags-seeds '' --bind 127.0.0.1 --port "$port" --daemon-socket "$work/d.sock" \
    --store-root "$store" --state-dir "$work/state" --no-lan --no-filter --private-key "$work/sk"
seed_config flags-lan '' --extra-peer 10.0.0.7:4000 --lan-timeout 100 --timeout 2.5 \
    --verify-before-send 1048576 --filter-mode rules --filter-pattern '*-secret-*' --no-broadcast
seed_config file-lan "$(printf '[server]\ntimeout = 2.5\n[lan]\ntimeout_ms = 400\nbroadcast = false\nextra_peers = ["pi.lan"]\n')"
seed_config file-store "$(printf '[server]\nport = 2000\npriority = 40\n[store]\nscan_interval = 0\nfilter_mode = "rules"\nfilter_patterns = ["*-mine-*"]\n')" \
    --port 3000 --filter-pattern '*-other-*'
seed_config file-all "$(printf '%s\n' '[server]' 'bind = "0.0.0.0"' 'port = 12304' 'workers = 16' \
    'priority = 5' 'state_dir = "/var/lib/peerix"' 'verbose = false' 'timeout = 5' \
    'verify_before_send = 4194304' '' '[lan]' 'discovery = true' 'timeout_ms = 250' 'broadcast = true' \
    'extra_peers = ["peer.example:12304", "10.1.2.3"]' '' '[store]' \
    'daemon_socket = "/nix/var/nix/daemon-socket/socket"' 'store_root = "/"' 'scan_interval = 3600' \
    'filter_mode = "signed"' 'filter_patterns = []' 'no_filter = false' \
    "trusted_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\", \"$(cut -d: -f1 "$work/sk"):xinwI5uI3quuMs+xYP44C4fJWyCXVMslJ2CQwHoiG3A=\"]" \
    '' '[signing]' 'private_key = "/etc/nix/peerix-secret-key"')"

du -sh "$out"
find "$out" -type f | sed "s|^$out/||" | cut -d/ -f1 | sort | uniq -c
