#!/usr/bin/env bash
# make bench: run the benchmarks and record them in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/run.py "$@"
