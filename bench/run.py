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
d = {str(i): [i, i * 2, str(i)] for i in range(300000)}
s = json.dumps(d)
print(hashlib.sha256(zlib.compress(s.encode())).hexdigest())
"""

# (name, argv relative to the apps dir) — sizes chosen to run ~0.5-3 s natively.
APP_CASES = [
    ("counter", ["counter", "200000", "0"]),
    ("jacobi", ["jacobi", "1024", "200"]),
    ("mat", ["mat", "512", "64"]),
    ("nbody", ["nbody", "2048", "10"]),
    ("cell", ["cell", "1024", "100"]),
    ("pcg", ["pcg", "256", "1000"]),
    ("common-f77", ["common-f77", "262144", "200"]),
    # Sync-bound, not private-memory work: every lock is a round trip to the
    # agent under mome, a no-op in the native single-process library.
    ("shared-counter", ["shared-counter", "20000"]),
]


def timed(argv, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(f"failed: {' '.join(argv)}\n{p.stderr.decode(errors='replace')}\n")
        raise SystemExit(1)
    return dt, p.stdout


def compare(argv, reps, home):
    env = dict(os.environ, MOME_HOME=home)
    native, mome = [], []
    timed(argv)  # warm the page cache
    for _ in range(reps):
        native.append(timed(argv)[0])
        mome.append(timed([MOME_RUN, "-n", "1"] + argv, env)[0])
    n, m = statistics.median(native), statistics.median(mome)
    return n, m, m / n


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
        n, m, r = compare(argv, reps, home)
        rows.append((name, " ".join(os.path.basename(argv[0]) if i == 0 else a for i, a in enumerate(argv)), n, m, r))
        print(f"{name:15s} native {n:7.3f} s  mome {m:7.3f} s  ratio {r:6.3f}", flush=True)
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
        "| program | arguments | native (s) | mome-run -n 1 (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, argv, n, m, r in rows:
        lines.append(f"| {name} | `{argv}` | {n:.3f} | {m:.3f} | {r:.3f} |")
    lines.append(f"\nLaunch of 16 ranks (`mome-run -n 16 /bin/true`, whole job incl. agent start and teardown): "
                 f"median {lmed * 1000:.0f} ms, best {lmin * 1000:.0f} ms (target < 500 ms).\n")
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
