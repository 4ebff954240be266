#!/usr/bin/env bash
# Runs the fuzz targets one after the other (see README.md):
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; TARGETs default to all of them. Each
# target starts from its seeds (tests/fuzz/seeds/TARGET, checked in) and
# its corpus (tests/fuzz/corpus/TARGET, kept between runs, not in git), in
# one job on one core. Crash inputs land in tests/fuzz/artifacts/TARGET and
# libFuzzer's log in tests/fuzz/logs/TARGET.log. Exits non-zero if any
# target crashed (a panic, an out-of-memory or a timeout).
#
# FUZZ_SANITIZER=address runs under ASan (about half the speed); the default
# is none, as peerix forbids unsafe code. Debug assertions (overflow checks)
# are always on.
set -euo pipefail

fuzz=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$fuzz/../.." && pwd)
all=(narinfo nar packet route daemon config)
seconds=${1:-600}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
case $seconds in '' | *[!0-9]*) echo "run.sh: SECONDS_PER_TARGET must be a number, not '$seconds'" >&2; exit 2 ;; esac
for t in "${targets[@]}"; do
    [ -f "$fuzz/fuzz_targets/$t.rs" ] || { echo "run.sh: no target '$t' (have: ${all[*]})" >&2; exit 2; }
done

# Inputs longer than the seeds are of little use; the NAR seeds go to 11 KB.
max_len() {
    case $1 in
        packet) echo 600 ;;
        route) echo 1024 ;;
        daemon | config) echo 4096 ;;
        *) echo 16384 ;;
    esac
}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

flags=(--fuzz-dir "$fuzz" --sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions)
cd "$repo"
cargo +nightly fuzz build "${flags[@]}"

mkdir -p "$fuzz/logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$fuzz/corpus/$t
    artifacts=$fuzz/artifacts/$t
    log=$fuzz/logs/$t.log
    mkdir -p "$corpus" "$artifacts"
    before=$(find "$artifacts" -type f | wc -l)
    dict=()
    [ -f "$fuzz/dicts/$t.dict" ] && dict=(-dict="$fuzz/dicts/$t.dict")
    echo "== $t: ${seconds}s" >&2
    status=0
    # -jobs=1 runs the fuzzer in one child whose output goes to fuzz-0.log in
    # the working directory: run from a scratch dir and keep that log.
    scratch=$(mktemp -d)
    (cd "$scratch" && cargo +nightly fuzz run "${flags[@]}" "$t" "$corpus" "$fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}") >"$scratch/run.log" 2>&1 || status=$?
    cat "$scratch"/fuzz-*.log "$scratch/run.log" >"$log" 2>/dev/null || cp "$scratch/run.log" "$log"
    rm -rf "$scratch"
    after=$(find "$artifacts" -type f | wc -l)
    crashes=$((after - before))
    runs=$(grep -a -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    speed=$(grep -a -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
    cov=$(grep -a -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*' "$log" | tail -1)
    line="$t: ${runs:-?} execs, ${speed:-?} exec/s, ${cov:-no coverage line}, $crashes new crash files, exit $status"
    summary+=("$line")
    echo "$line" >&2
    if [ "$status" != 0 ] || [ "$crashes" -gt 0 ]; then
        failed+=("$t")
        grep -a -m1 -A3 "panicked at\|ERROR: libFuzzer\|SUMMARY" "$log" >&2 || true
        echo "   log: $log; crash inputs: $artifacts" >&2
    fi
done

echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
