#!/usr/bin/env bash
# make bench: run the benchmarks and record them in bench/RESULTS.md.
#   bench/run.py   overhead vs native of every test app and python3, launch time
#   bench/ckpt.py  checkpoint pause, commit, bytes, restart, image overhead
#   bench/nodes.py remote fault latency vs loopback RTT, page fetch, apps on 1/2/4 nodes
#   bench/consistency.py  false sharing under strong/release/weak on 2 and 4 nodes
set -euo pipefail
cd "$(dirname "$0")/.."
python3 bench/run.py "$@"
python3 bench/ckpt.py
python3 bench/nodes.py
python3 bench/consistency.py
python3 bench/diskless.py --mib 128 --small-mib 32
python3 bench/shmalloc.py
