#!/usr/bin/env python3
"""mome benchmark of shared malloc (MomeMalloc), part of make bench.

Builds bench/shmalloc-bench.c and runs it, in one run on one machine:
  - natively (libmome.so: mome_shmalloc is glibc's malloc), the yardstick;
  - under `mome-run -n 2` (one node: the remote cases are frees by another
    rank of the same node, so local frees);
  - under `mome-run -n 2 --nodes 2` (rank 1 on another node: remote frees,
    sent to rank 0's node in batches and applied there before it grows).
Reports allocations and frees per second (median of --reps runs) and their
ratio to the rank's private malloc in the same job, and appends a dated
section to bench/RESULTS.md.

Usage: bench/shmalloc.py [--reps N] [--n N] [--rounds R] [--no-record]
"""
import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MOME_BIN_DIR", os.path.join(ROOT, "target", "release"))
MOME_RUN = os.path.join(BIN, "mome-run")
CASES = ["private-alloc", "private-free", "shared-alloc", "shared-free", "remote-alloc", "remote-free"]


def build(out_dir):
    exe = os.path.join(out_dir, "shmalloc-bench")
    subprocess.run(
        ["cc", "-O2", "-std=c11", "-I", os.path.join(ROOT, "preload", "include"),
         "-o", exe, os.path.join(ROOT, "bench", "shmalloc-bench.c"),
         "-L", BIN, "-lmome", "-Wl,-rpath," + BIN],
        check=True)
    return exe


def run(argv, env):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    if p.returncode != 0:
        sys.stderr.write(f"failed: {' '.join(argv)}\n{p.stdout}\n{p.stderr}\n")
        raise SystemExit(1)
    got = {}
    for m in re.finditer(r"^(?:\[\d+\] )?bench (\S+) (\d+) (\d+)$", p.stdout, re.M):
        got[m.group(1)] = int(m.group(2))
    return got


def machine():
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // (1 << 20)
    return f"{platform.node()}, {cores} cores, {mem} GiB, Linux {platform.release()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="mome-bench-home")
    env = dict(os.environ, MOME_HOME=home)
    exe = build(home)
    a = [exe, str(args.n), str(args.rounds)]
    setups = [
        ("native (glibc)", a),
        ("mome, 2 ranks, 1 node", [MOME_RUN, "-n", "2", "--no-prefix"] + a),
        ("mome, 2 ranks, 2 nodes", [MOME_RUN, "-n", "2", "--nodes", "2", "--no-prefix"] + a),
    ]
    results = {name: {c: [] for c in CASES} for name, _ in setups}
    # Interleaved repetitions: load changes hit every setup alike.
    for _ in range(args.reps):
        for name, argv in setups:
            got = run(argv, env)
            for c in CASES:
                if c in got:
                    results[name][c].append(got[c])
    med = {name: {c: statistics.median(v) for c, v in r.items() if v} for name, r in results.items()}
    lines = [
        "| setup | case | ops/s | vs private malloc (same job, same operation) |",
        "|---|---|---|---|",
    ]
    for name, _ in setups:
        for c in CASES:
            v = med[name][c]
            base = med[name]["private-free" if c.endswith("free") else "private-alloc"]
            lines.append(f"| {name} | {c} | {v:,.0f} | {v / base:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.no_record:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = f"""

## {stamp} — issue 6 item 5: shared malloc (MomeMalloc) vs private malloc

Machine: {machine()}. Command: `python3 bench/shmalloc.py --reps {args.reps} --n {args.n} --rounds {args.rounds}` (part of `make bench`), median of {args.reps} interleaved runs.
bench/shmalloc-bench.c: {args.n} blocks of 16..255 bytes per round, {args.rounds} rounds. private = the rank's malloc; shared = mome_shmalloc then mome_shfree by the same rank; remote = rank 0 allocates, rank 1 frees (on 2 nodes: rank 1's node gathers the frees and sends them 32 at a time to rank 0's node, whose allocator applies them before growing; remote-alloc includes that). Natively mome_shmalloc is glibc's malloc.

{table}

Reading: on one node the shared heaps are ordinary node memory; an allocation costs the node lock (a process-shared futex, uncontended here) on top of dlmalloc. On two nodes the first touch of each fresh shared page is a userfaultfd fault served by the agent with the page protocol (the page's home may be the other node), which dominates shared-alloc; a remote free costs one round trip to the local agent per batch of 32, and remote-alloc includes taking the queued frees from the agent (112 per round trip) and applying them. A remote free does not touch the freed block's memory: its page stays on the owner node.
"""
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
