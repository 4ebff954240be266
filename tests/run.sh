#!/bin/sh
# Run the whole peerix test suite on a fresh Debian machine, as root.
#
#   tests/run.sh [extra cargo test args...]   e.g. tests/run.sh -- --nocapture
#
# Installs what the integration tests drive (real nix, a static busybox as
# the fixture builder, iproute2 for network namespaces, curl as the client
# inside them, pkill and prlimit, promtool and chromium for tests/ops.rs)
# only when something is missing, then runs `cargo test --all-targets`.
# Exits non-zero when anything fails.
set -eu

cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "run.sh: the integration tests need root (chroot stores, nix-daemons, network namespaces)" >&2
    exit 1
fi

missing=""
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}
need nix-build nix-bin
need nix-daemon nix-bin
need ip iproute2
need curl curl
need pkill procps
need prlimit util-linux
# tests/ops.rs: Prometheus's own checker for /metrics, and a real headless
# browser for the dashboard.
need promtool prometheus
need chromium chromium
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || missing="$missing busybox-static"
# The fixtures run /bin/busybox as a builder with no libraries around it.
if [ -x /bin/busybox ] && command -v file >/dev/null 2>&1 && ! file -L /bin/busybox | grep -q 'statically linked'; then
    missing="$missing busybox-static"
fi

if [ -n "$missing" ]; then
    # Deduplicate; keep the order.
    # shellcheck disable=SC2086
    packages=$(printf '%s\n' $missing | awk '!seen[$0]++' | tr '\n' ' ')
    echo "run.sh: installing missing packages: $packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $packages ca-certificates
fi

# nix as root opens /nix/store directly; make sure its directories exist.
mkdir -p /nix/store /nix/var/nix

if ! command -v cargo >/dev/null 2>&1; then
    echo "run.sh: cargo not found; install Rust >= 1.85 (e.g. with rustup) and rerun" >&2
    exit 1
fi

exec cargo test --all-targets "$@"
