#!/usr/bin/env bash
# Stress of the page protocol, not part of `make test` (about 6 minutes):
# every multi-node test application, 2 to 8 ranks on 2 to 4 simulated
# nodes, block and cyclic placement, three rounds. Prints each failing run
# (the end of its output) and a count; exits 1 when any run failed.
#   scripts/stress-nodes.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${MOME_BIN_DIR:-$PWD/target/release}
APPS=${MOME_APPS_DIR:-$PWD/test-apps/build}
rounds=${1:-3}
home=$(mktemp -d /tmp/mome-stress.XXXXXX)
trap 'rm -rf "$home"' EXIT
export MOME_HOME=$home
fail=0
runs=0
for round in $(seq 1 "$rounds"); do
  placement=$([ $((round % 2)) = 1 ] && echo block || echo cyclic)
  for spec in "fanout 128 3" "jacobi 256 30" "mat 128 16" "nbody 512 4" "cell 256 20" \
              "pcg 64 100" "page-share 200" "read-into 64" "shared-counter 200" \
              "pthread-sync" "common-f77 4096 3"; do
    set -- $spec
    [ -x "$APPS/$1" ] || continue
    for layout in "4 2" "6 3" "4 4" "8 4" "5 2"; do
      set -- $layout
      out=$(timeout 120 "$BIN/mome-run" -n "$1" --nodes "$2" --placement "$placement" \
              "$APPS"/$spec 2>&1)
      runs=$((runs + 1))
      if ! grep -q 'OK$' <<<"$out" || grep -q MISMATCH <<<"$out"; then
        fail=$((fail + 1))
        echo "FAIL: $spec, $1 ranks on $2 nodes ($placement)"
        tail -5 <<<"$out"
      fi
    done
  done
done
echo "stress: $runs runs, $fail failed"
[ "$fail" = 0 ]
