#!/usr/bin/env python3
"""mome benchmarks (make bench).

Measures, in one run on one machine (so the ratios compare like with like):
  - each test application and a python3 workload under `mome-run -n 1`
    vs the same binary run natively (median of interleaved repetitions);
  - launch of a 16-rank job (`mome-run -n 16 /bin/true`) end to end;
and appends a dated section to bench/RESULTS.md.

Usage: bench/run.py [--reps N] [--quick] [--no-record]
"""
import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MOME_BIN_DIR", os.path.join(ROOT, "target", "release"))
APPS = os.environ.get("MOME_APPS_DIR", os.path.join(ROOT, "test-apps", "build"))
MOME_RUN = os.path.join(BIN, "mome-run")

PYTHON_WORK = r"""
import hashlib, json, zlib
d = {str(i): [i, i * 2, str(i)] for i in range(600000)}
s = json.dumps(d)
print(hashlib.sha256(zlib.compress(s.encode())).hexdigest())
"""

# (name, argv relative to the apps dir) — sizes chosen to run ~0.5-3 s natively.
APP_CASES = [
    ("counter", ["counter", "30000", "0"]),
    ("jacobi", ["jacobi", "2048", "200"]),
    ("mat", ["mat", "1024", "64"]),
    ("nbody", ["nbody", "4096", "10"]),
    ("cell", ["cell", "2048", "150"]),
    ("pcg", ["pcg", "384", "1500"]),
    ("common-f77", ["common-f77", "262144", "1000"]),
    # Sync-bound, not private-memory work: every lock is a round trip to the
    # agent under mome, a no-op in the native single-process library.
    ("shared-counter", ["shared-counter", "20000"]),
]


def timed(argv, env=None):
    """Wall time and CPU time (user + system of the whole process tree: for
    mome-run that includes the agent and mome-run itself)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.stderr.write(f"failed: {' '.join(argv)}\n{p.stderr.decode(errors='replace')}\n")
        raise SystemExit(1)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu


def compare(argv, reps, home):
    """Interleaved native / mome runs; medians of wall and CPU time."""
    env = dict(os.environ, MOME_HOME=home)
    native, mome = [], []
    timed(argv)  # warm the page cache
    for _ in range(reps):
        native.append(timed(argv))
        mome.append(timed([MOME_RUN, "-n", "1"] + argv, env))
    nw, mw = statistics.median(x[0] for x in native), statistics.median(x[0] for x in mome)
    nc, mc = statistics.median(x[1] for x in native), statistics.median(x[1] for x in mome)
    return nw, mw, mw / nw, nc, mc, mc / nc


def launch(ranks, reps, home):
    env = dict(os.environ, MOME_HOME=home)
    times = [timed([MOME_RUN, "-n", str(ranks), "/bin/true"], env)[0] for _ in range(reps)]
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one repetition, for a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    home = tempfile.mkdtemp(prefix="mome-bench-")
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PYTHON_WORK)
        py = f.name
    cases = [(name, [os.path.join(APPS, a[0])] + a[1:]) for name, a in APP_CASES if os.path.exists(os.path.join(APPS, a[0]))]
    cases.append(("python3", [sys.executable, py]))
    for name, argv in cases:
        nw, mw, rw, nc, mc, rc = compare(argv, reps, home)
        shown = " ".join(os.path.basename(argv[0]) if i == 0 else a for i, a in enumerate(argv))
        rows.append((name, shown, nw, mw, rw, nc, mc, rc))
        print(f"{name:15s} wall native {nw:7.3f} mome {mw:7.3f} ratio {rw:6.3f} | "
              f"cpu native {nc:7.3f} mome {mc:7.3f} ratio {rc:6.3f}", flush=True)
    lmed, lmin = launch(16, max(reps, 3), home)
    print(f"launch 16 ranks: median {lmed * 1000:.0f} ms, best {lmin * 1000:.0f} ms")

    if args.no_record:
        return
    host = platform.node()
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernel = platform.release()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"\n## {when} — issue 2 (one node): overhead vs native, launch time\n",
        f"Machine: {host}, {cpus} cores, {mem:.0f} GiB, Linux {kernel}. Command: `make bench` "
        f"(bench/run.py, median of {reps} interleaved runs each).\n",
        "Wall = elapsed; CPU = user + system time of the whole process tree (mome-run, agent, rank).\n",
        "| program | arguments | wall native (s) | wall mome (s) | wall ratio | CPU native (s) | CPU mome (s) | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, argv, nw, mw, rw, nc, mc, rc in rows:
        lines.append(f"| {name} | `{argv}` | {nw:.3f} | {mw:.3f} | {rw:.3f} | {nc:.3f} | {mc:.3f} | {rc:.3f} |")
    lines.append(f"\nLaunch of 16 ranks (`mome-run -n 16 /bin/true`, whole job incl. agent start and teardown): "
                 f"median {lmed * 1000:.0f} ms, best {lmin * 1000:.0f} ms (target < 500 ms).\n")
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
