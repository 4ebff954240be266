# Functions shared by the benchmarks in this folder: sourced, not run.
# shellcheck shell=bash

log() { printf '# %s\n' "$*" >&2; }

wait_for() { # wait_for DESCRIPTION COMMAND...: up to 60 s
    local what=$1; shift
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; return 1
}

# The median of the numbers on stdin, one a line (the lower one of an even
# count). `nan` sorts first, so a failed run pulls the median down.
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

rss() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # rss PID VmRSS|VmHWM: KiB

hash_of() { basename "$1" | cut -c1-32; }

# offline_nix WORK: an offline nix, as in the integration tests, configured
# under WORK/conf, caching in WORK/cache; a static busybox in WORK/busybox
# for the builders.
offline_nix() {
    mkdir -p "$1/conf" "$1/busybox/bin"
    printf 'experimental-features = nix-command\nsubstituters =\nbuild-users-group =\nsandbox = false\n' >"$1/conf/nix.conf"
    : >"$1/empty.conf"
    export NIX_CONF_DIR=$1/conf NIX_USER_CONF_FILES=$1/empty.conf XDG_CACHE_HOME=$1/cache
    cp /bin/busybox "$1/busybox/bin/busybox"
    ln -sf busybox "$1/busybox/bin/sh"
}

# build_bench_paths REPO WORK: builds (or finds, after the first run) the
# 200 MB path of big.nix and the 320-path closure of tests/fixtures/many.nix
# in /nix/store; sets `big` and `top` to their store paths.
# shellcheck disable=SC2034 # big and top are the results
build_bench_paths() {
    big=$(nix-build "$1/tests/bench/big.nix" --no-out-link --arg busyboxDir "$2/busybox")
    top=$(nix-build "$1/tests/fixtures/many.nix" --no-out-link --max-jobs 8 --arg busyboxDir "$2/busybox" -A top)
}

# peerix_bin REPO: prints the peerix binary to measure: $PEERIX_BIN, or a
# release build of REPO (built now; cargo's progress goes to stderr).
peerix_bin() {
    if [ -n "${PEERIX_BIN:-}" ]; then
        echo "$PEERIX_BIN"
    else
        (cd "$1" && cargo build --release -q >&2)
        echo "$1/target/release/peerix"
    fi
}

# stop_daemon PID: stops a nix-daemon we started. It forks one worker per
# client connection (peerix's pool): stop those (by their parent's id)
# first, whose clients are gone by now, and give it up to 5 s to reap
# them, so none is left a zombie.
stop_daemon() {
    pkill -TERM -P "$1" 2>/dev/null || true
    for _ in $(seq 50); do pgrep -P "$1" >/dev/null || break; sleep 0.1; done
    kill "$1" 2>/dev/null || true
}

# install_missing "TOOL..." PACKAGE...: installs the Debian packages when any
# of the tools is not on PATH.
install_missing() {
    local tool missing=0
    for tool in $1; do
        command -v "$tool" >/dev/null || missing=1
    done
    shift
    if [ "$missing" = 1 ]; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends "$@"
    fi
}
