#!/usr/bin/env bash
# make demo: run a 4-rank job on the DSM and show that it computes what a
# native single-process run computes.
#
# Checkpoint / kill / restart joins this demo with mome-ckpt and mome-restart
# (issue 3); until then it shows a job, its shared memory and mome-status.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${MOME_BIN_DIR:-$PWD/target/release}
APPS=${MOME_APPS_DIR:-$PWD/test-apps/build}
export MOME_HOME=${MOME_HOME:-$(mktemp -d /tmp/mome-demo.XXXXXX)}
idfile=$(mktemp)
trap 'rm -f "$idfile"' EXIT

echo "== native, one process: jacobi 512 100"
native=$("$APPS/jacobi" 512 100 | grep '^checksum')
echo "$native"

echo
echo "== mome-run -n 4: the grid lives in a shared segment of the DSM window"
"$BIN/mome-run" -n 4 --jobid-file "$idfile" "$APPS/jacobi" 512 100 | tee /tmp/mome-demo-out.$$
id=$(cat "$idfile")
mome=$(grep -o 'checksum .*' /tmp/mome-demo-out.$$ | tail -1)
rm -f /tmp/mome-demo-out.$$

echo
echo "== mome-status $id"
"$BIN/mome-status" "$id"

echo
if [ "$native" = "$mome" ]; then
  echo "demo: OK — 4 ranks under mome computed the native result ($mome)"
else
  echo "demo: MISMATCH — native '$native', mome '$mome'" >&2
  exit 1
fi
