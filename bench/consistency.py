#!/usr/bin/env python3
"""mome benchmark of the consistency models with false sharing (make bench).

test-apps/false-share with 4 ranks: every iteration each rank writes its own
disjoint part of EVERY page of a shared array (interleaved 4-byte words, or
contiguous blocks of each page), then a barrier (under weak followed by
MomeSyncMem at the barrier's date) makes them visible, then every rank reads
and checks every word. Measured, per iteration, on rank 0 (MOME_APP_TIMING):
  - write+sync: the writes plus the barrier (and MomeSyncMem) that publishes
    them: what false sharing costs;
  - read: the reading of the whole array that follows;
and the lock phase (8 x ITERS increments of each of 4 counter pages under
mome_lock, in pages every rank also writes without a lock).
Cases: strong, release and weak on 2 and 4 nodes (simulated nodes: one agent
each, TCP on loopback), both patterns, against the native single-process
run of the same binary and 4 ranks on one node (where the models coincide:
every rank maps the same physical pages). Medians of interleaved
repetitions. Appends a dated section to bench/RESULTS.md.

Usage: bench/consistency.py [--reps N] [--pages P] [--iters I] [--quick]
                            [--models strong,release,weak] [--no-record]
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
APPS = os.environ.get("MOME_APPS_DIR", os.path.join(ROOT, "test-apps", "build"))
MOME_RUN = os.path.join(BIN, "mome-run")
FALSE_SHARE = os.path.join(APPS, "false-share")

PATTERNS = ["interleaved", "blocks"]
NODES = [2, 4]
RANKS = 4

TIMING = re.compile(
    r"false-share: timing model=(\w+) pattern=(\w+) ranks=(\d+) pages=(\d+) iters=(\d+) "
    r"write_sync_us_per_iter ([\d.]+) read_us_per_iter ([\d.]+) lock_s ([\d.]+)")


def run(argv, env):
    """Runs one false-share job; returns (write_sync_us, read_us, lock_s, wall_s)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or "MISMATCH" in p.stdout or not re.search(r"^(\[0\] )?OK$", p.stdout, re.M):
        sys.stderr.write(f"failed: {' '.join(argv)}\n{p.stdout}\n{p.stderr}\n")
        raise SystemExit(1)
    m = TIMING.search(p.stderr)
    if m is None:
        sys.stderr.write(f"no timing line: {' '.join(argv)}\n{p.stderr}\n")
        raise SystemExit(1)
    return float(m.group(6)), float(m.group(7)), float(m.group(8)), wall


def med(samples, i):
    return statistics.median(s[i] for s in samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--models", default="strong,release,weak")
    ap.add_argument("--quick", action="store_true", help="one repetition, 64 pages, for a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    pages = 64 if args.quick else args.pages
    iters = args.iters
    models = [m for m in args.models.split(",") if m]
    if not os.path.exists(FALSE_SHARE):
        sys.stderr.write(f"{FALSE_SHARE} is missing: run `make build` first\n")
        raise SystemExit(1)
    home = tempfile.mkdtemp(prefix="mome-bench-consistency-")
    env = dict(os.environ, MOME_HOME=home, MOME_APP_TIMING="1")

    # cases: (label, nodes or 0 for native, model)
    cases = []
    for pattern in PATTERNS:
        cases.append((pattern, 0, "strong"))
        cases.append((pattern, 1, "strong"))
        for nodes in NODES:
            for model in models:
                cases.append((pattern, nodes, model))
    samples = {c: [] for c in cases}
    for _ in range(reps):
        for c in cases:
            pattern, nodes, model = c
            argv = [FALSE_SHARE, model, str(pages), str(iters), pattern]
            if nodes > 0:
                argv = [MOME_RUN, "-n", str(RANKS), "--nodes", str(nodes), "--no-prefix"] + argv
            samples[c].append(run(argv, env))

    rows = []
    for c in cases:
        pattern, nodes, model = c
        s = samples[c]
        where = "native, 1 process" if nodes == 0 else f"{RANKS} ranks, {nodes} node{'s' if nodes > 1 else ''}"
        shown_model = "-" if nodes <= 1 else model
        row = (pattern, where, shown_model, med(s, 0), med(s, 1), med(s, 2), med(s, 3))
        rows.append(row)
        print(f"{pattern:11s} {where:20s} {shown_model:8s} write+sync {row[3]:9.1f} us/iter  "
              f"read {row[4]:8.1f} us/iter  locks {row[5]:.3f} s  wall {row[6]:.2f} s")

    if args.no_record:
        return
    host = platform.node()
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"\n## {when} — issue 6: consistency models with false sharing (simulated nodes on loopback)\n",
        f"Machine: {host}, {cpus} cores, {mem:.0f} GiB, Linux {platform.release()}. Command: "
        f"`python3 bench/consistency.py` (part of `make bench`): `false-share MODEL {pages} {iters} PATTERN`, "
        f"{RANKS} ranks; medians of {reps} interleaved runs. Models benchmarked: {', '.join(models)}.\n",
        f"Every iteration each rank writes its own part of every one of the {pages} pages "
        "(interleaved: 4-byte words w with w % 4 == rank; blocks: a contiguous quarter of each page); "
        "write+sync is the writes plus the barrier (under weak also MomeSyncMem at the barrier's date) "
        "that makes them visible; read is the check of every word by every rank that follows; locks is "
        f"the whole lock phase ({8 * iters} increments of each of 4 counter pages under mome_lock, in pages "
        "all ranks also write). One node and native: the models coincide (same physical pages).\n",
        "| pattern | where | model | write+sync (us/iter) | read (us/iter) | locks (s) | job wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pattern, where, model, ws, rd, lk, wall in rows:
        lines.append(f"| {pattern} | {where} | {model} | {ws:.1f} | {rd:.1f} | {lk:.3f} | {wall:.2f} |")
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
