#!/usr/bin/env bash
# Benchmark of peerix's store scans on a big store: a chroot store of
# BENCH_PATHS (100000) valid paths, each an empty file, all signed by a
# throwaway key. peerix runs in the `signed` mode (with that key trusted)
# and with --no-filter; for each, the first scan, idle memory, rescans with
# nothing new (SIGHUP) and one after BENCH_CHURN (1000) paths came and as
# many went. It prints figures; it asserts nothing.
#
# Run as root from the repository: sudo tests/bench/big-store.sh
# PEERIX_BIN=path picks another peerix binary (default: a release build);
# PEERIX_BASELINE=path runs another one first on the same store, to compare.
# Everything runs on 127.0.0.1 (peerix with --no-lan) and is stopped and
# removed on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
. "$repo/tests/bench/lib.sh"
paths=${BENCH_PATHS:-100000}
rescans=${BENCH_RESCANS:-3}
churn=${BENCH_CHURN:-1000}
work=$(mktemp -d /tmp/peerix-bench.XXXXXX)
root=$work/root
daemon_pid=
peerix_pid=
hz=$(getconf CLK_TCK)

cleanup() {
    [ -z "$peerix_pid" ] || kill "$peerix_pid" 2>/dev/null || true
    [ -z "$peerix_pid" ] || wait "$peerix_pid" 2>/dev/null || true
    [ -z "$daemon_pid" ] || stop_daemon "$daemon_pid"
    [ -z "$daemon_pid" ] || wait "$daemon_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_missing "nix nix-store curl python3 unshare" nix-bin curl python3 util-linux

mkdir -p "$work/conf"
printf 'experimental-features = nix-command\nsubstituters =\nbuild-users-group =\nsandbox = false\n' >"$work/conf/nix.conf"
: >"$work/empty.conf"
export NIX_CONF_DIR=$work/conf NIX_USER_CONF_FILES=$work/empty.conf XDG_CACHE_HOME=$work/cache

# The NAR of an empty regular file, which every path here is.
empty_nar_hash=$(: >"$work/empty" && nix-store --dump "$work/empty" | sha256sum | cut -d' ' -f1)
empty_nar_size=$(nix-store --dump "$work/empty" | wc -c)

# make_paths COUNT FIRST OUT: creates COUNT empty files under $root with
# random hash parts, named bench-FIRST.. , and writes their registration
# (nix-store --register-validity --hash-given) to OUT.
make_paths() {
    python3 - "$1" "$2" "$root" "$3" "sha256:$empty_nar_hash" "$empty_nar_size" <<'PY'
import os, sys
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32(b):
    x = int.from_bytes(b, "little")
    return "".join(ALPHABET[(x >> (5 * i)) & 31] for i in reversed(range(32)))
count, first, root, out, nar_hash, nar_size = sys.argv[1:]
os.makedirs(root + "/nix/store", exist_ok=True)
with open(out, "w") as f:
    for i in range(int(first), int(first) + int(count)):
        path = "/nix/store/%s-bench-empty-%d" % (nix32(os.urandom(20)), i)
        open(root + path, "w").close()
        # path, NAR hash, NAR size, deriver (none), 0 references
        f.write("%s\n%s\n%s\n\n0\n" % (path, nar_hash, nar_size))
PY
}

# register FILE: registers the paths as valid. nix-store --store ROOT would
# look for their files in the real /nix/store, so it runs in a mount
# namespace of its own where ROOT/nix is bound on /nix.
register() {
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare -m --propagation private sh -c \
        'mount --bind "$1/nix" /nix && nix-store --register-validity --hash-given <"$2"' \
        sh "$root" "$1"
    awk 'NR % 5 == 1' "$1" | xargs nix store sign --store "$root" -k "$work/sk" >/dev/null 2>&1
}

nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
log "making a store of $paths valid paths in $root"
make_paths "$paths" 0 "$work/reg"
register "$work/reg"
total=$(nix path-info --store "$root" --all | wc -l)
log "$total valid paths, signed by $(cut -d: -f1 "$work/pk")"

# In a session of its own, so a Ctrl-C does not reach it before its workers.
NIX_DAEMON_SOCKET_PATH=$work/d.sock setsid nix-daemon --store "$root" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
wait_for "nix-daemon" test -S "$work/d.sock"

peerix=$(peerix_bin "$repo")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ticks PID: CPU clock ticks (user + system) of PID and all its descendants,
# with the children it has reaped: peerix's threads, or the nix-daemon and
# the worker it forked for each of peerix's connections.
ticks() {
    local stat fields sum child
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    read -r -a fields <<<"${stat##*) }" # from field 3 (state) on
    sum=$((fields[11] + fields[12] + fields[13] + fields[14]))
    for child in $(pgrep -P "$1"); do sum=$((sum + $(ticks "$child"))); done
    echo "$sum"
}
cpu_ticks() { echo $(($(ticks "$peerix_pid") + $(ticks "$daemon_pid"))); }
seconds() { awk -v t="$1" -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }'; }

scans_logged() { grep -c 'scan: ' "$peerix_log" || true; }
# wait_scan N: until the log has N scan lines (10 min at most); prints the
# last one's time in ms.
wait_scan() {
    for _ in $(seq 6000); do
        if [ "$(scans_logged)" -ge "$1" ]; then
            grep 'scan: ' "$peerix_log" | tail -1 | sed -n 's/.* in \([0-9]*\) ms.*/\1/p'
            return 0
        fi
        kill -0 "$peerix_pid" 2>/dev/null || { echo "peerix exited: $(tail -3 "$peerix_log")" >&2; exit 1; }
        sleep 0.1
    done
    echo "timed out waiting for scan $1" >&2
    exit 1
}
health() { curl -sf "http://127.0.0.1:$port/health" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
status() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/$1.narinfo"; }

# rescan: SIGHUP, then the scan's ms, the CPU seconds it cost peerix and
# the daemon together, and peerix's alone (as "ms cpu peerix-cpu").
rescan() {
    local before before_peerix n ms
    n=$(scans_logged)
    before=$(cpu_ticks)
    before_peerix=$(ticks "$peerix_pid")
    kill -HUP "$peerix_pid"
    ms=$(wait_scan $((n + 1)))
    sleep 0.2 # the index is installed just after the log line
    echo "$ms $(seconds $(($(cpu_ticks) - before))) $(seconds $(($(ticks "$peerix_pid") - before_peerix)))"
}

columns='%-15s %7s %6s %6s %8s %8s %7s %7s %7s %8s %7s %6s\n'
results=()
next=$paths
run_mode() { # run_mode PEERIX NAME PEERIX-ARGS...
    local peerix=$1 name=$2 ms first_cpu idle_rss idle_anon before r c p
    local rescan_ms=() rescan_cpu=() rescan_own=() added gone gone_one churn_ms churn_cpu
    shift 2
    port=$(free_port)
    peerix_log=$work/peerix-${name//\//-}.log
    before=$(ticks "$daemon_pid")
    "$peerix" --bind 127.0.0.1 --port "$port" --no-lan --daemon-socket "$work/d.sock" \
        --store-root "$root" --state-dir "$work/state" --scan-interval 0 "$@" >"$peerix_log" 2>&1 &
    peerix_pid=$!
    ms=$(wait_scan 1)
    sleep 0.2
    first_cpu=$(seconds $(($(cpu_ticks) - before)))
    sleep 1
    idle_rss=$(rss "$peerix_pid" VmRSS)
    idle_anon=$(rss "$peerix_pid" RssAnon)
    log "$name: first scan in $ms ms; $(health indexed_paths) indexed, $(health shared_paths) shared"
    for _ in $(seq "$rescans"); do
        read -r r c p <<<"$(rescan)"
        rescan_ms+=("$r")
        rescan_cpu+=("$c")
        rescan_own+=("$p")
    done
    log "$name: rescans with nothing new: ${rescan_ms[*]} ms, CPU ${rescan_cpu[*]} s (peerix ${rescan_own[*]})"
    # A rescan after some paths came and went: $churn new, $churn deleted.
    make_paths "$churn" "$next" "$work/new"
    next=$((next + churn))
    register "$work/new"
    added=$(head -1 "$work/new")
    gone=$(nix path-info --store "$root" --all | grep -v -F -f <(awk 'NR % 5 == 1' "$work/new") |
        awk -v n="$churn" 'NR <= n')
    gone_one=$(head -1 <<<"$gone")
    # shellcheck disable=SC2086 # one path a word
    nix-store --store "$root" --delete $gone >/dev/null 2>&1
    read -r churn_ms churn_cpu _ <<<"$(rescan)"
    log "$name: after the churn: $(grep 'scan: ' "$peerix_log" | tail -1 | sed 's/.*scan: //')"
    log "$name: a new path's narinfo: $(status "$(hash_of "$added")"), a deleted one's: $(status "$(hash_of "$gone_one")") (want 200, 404)"
    # shellcheck disable=SC2059 # the format is ours
    results+=("$(printf "$columns" "$name" "$(health indexed_paths)" \
        "$(awk -v m="$ms" 'BEGIN { printf "%.2f", m / 1000 }')" "$first_cpu" "$idle_rss" "$idle_anon" \
        "$(printf '%s\n' "${rescan_ms[@]}" | median)" "$(printf '%s\n' "${rescan_cpu[@]}" | median)" \
        "$(printf '%s\n' "${rescan_own[@]}" | median)" \
        "$(rss "$peerix_pid" VmRSS)" "$churn_ms" "$churn_cpu")")
    kill "$peerix_pid"
    wait "$peerix_pid" 2>/dev/null || true
    peerix_pid=
}

bins=(this "$peerix")
[ -z "${PEERIX_BASELINE:-}" ] || bins=(baseline "$PEERIX_BASELINE" "${bins[@]}")
for ((i = 0; i < ${#bins[@]}; i += 2)); do
    run_mode "${bins[i + 1]}" "${bins[i]}/signed" --filter-mode signed --trusted-key "$(cat "$work/pk")"
    run_mode "${bins[i + 1]}" "${bins[i]}/none" --no-filter
done

echo "this: $peerix${PEERIX_BASELINE:+; baseline: $PEERIX_BASELINE}"
echo "store: $paths valid paths (empty files, all signed by the trusted key)"
# shellcheck disable=SC2059 # the format is ours
printf "$columns" "" "" "first" "scan" "idle" "idle" "rescan" "rescan" "rescan" "RSS" "churn" "churn"
# shellcheck disable=SC2059
printf "$columns" peerix/mode paths "scan s" "CPU s" "RSS KiB" "anon KiB" "ms" "CPU s" "peerix" "2 KiB" "ms" "CPU s"
printf '%s\n' "${results[@]}"
cat <<EOF
first scan: its time (peerix's log) and CPU; idle RSS and anon: VmRSS and
  RssAnon 1 s after it (the rest of VmRSS is the binary's and libc's pages)
rescan: one with nothing new (SIGHUP), median of $rescans: time, CPU of peerix
  and its nix-daemon with the daemon's workers, and peerix's alone
RSS 2: VmRSS after those rescans
churn: a rescan after $churn paths came and $churn went: time, CPU (both)
EOF
