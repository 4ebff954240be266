# One large store path for the benchmark: a 200 MB file of random bytes plus
# a few small files. Input-addressed, so it is built once and reused.
#
# Build: nix-build big.nix --arg busyboxDir /path/to/dir
{
  busyboxDir,
  megabytes ? 200,
}:
let
  inherit (import ../fixtures/lib.nix { inherit busyboxDir; }) mk;
in
mk "peerix-bench-big" ''
  mkdir -p $out/share
  dd if=/dev/urandom of=$out/share/blob bs=1000000 count=${toString megabytes} 2>/dev/null
  printf 'readme\n' > $out/README
  printf '#!/bin/sh\necho big\n' > $out/run
  chmod 0755 $out/run
''
