#!/usr/bin/env python3
"""mome benchmark of shared memory across nodes (make bench).

Measures, in one run on one machine (simulated nodes: one agent each, TCP on
loopback):
  - the loopback TCP round trip between two processes (bench/tcp-rtt.c),
    the yardstick;
  - remote page faults between two nodes (bench/fault-bench.c under
    `mome-run -n 2 --nodes 2`): read fault (a copy comes), write fault on a
    page the node owns while the other holds a copy (invalidation), write
    fault that takes the page from the other node, each access timed alone
    in a scattered order; and the page-fetch throughput of a sequential read
    (prefetch);
  - jacobi, mat and nbody with 4 ranks on 1, 2 and 4 nodes against the
    native single-process run of the same binary (median of interleaved
    repetitions);
and appends a dated section to bench/RESULTS.md.

Usage: bench/nodes.py [--reps N] [--quick] [--no-record]
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

APP_CASES = [
    ("jacobi", ["jacobi", "2048", "100"]),
    ("mat", ["mat", "1024", "32"]),
    ("nbody", ["nbody", "4096", "5"]),
]
NODES = [1, 2, 4]


def run(argv, env):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    if p.returncode != 0:
        sys.stderr.write(f"failed: {' '.join(argv)}\n{p.stdout}\n{p.stderr}\n")
        raise SystemExit(1)
    return p.stdout


def timed(argv, env):
    t0 = time.perf_counter()
    out = run(argv, env)
    dt = time.perf_counter() - t0
    if "MISMATCH" in out or not re.search(r"^(\[0\] )?OK$", out, re.M):
        sys.stderr.write(f"wrong result: {' '.join(argv)}\n{out}\n")
        raise SystemExit(1)
    return dt


def build(build_dir):
    exes = {}
    inc = os.path.join(ROOT, "preload", "include")
    for name, extra in [("tcp-rtt", []), ("fault-bench", [f"-I{inc}", f"-L{BIN}", "-lmome", f"-Wl,-rpath,{BIN}"])]:
        exe = os.path.join(build_dir, name)
        src = os.path.join(ROOT, "bench", name + ".c")
        subprocess.run(["cc", "-O2", "-o", exe, src] + extra, check=True)
        exes[name] = exe
    return exes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repetition, for a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    home = tempfile.mkdtemp(prefix="mome-bench-nodes-")
    env = dict(os.environ, MOME_HOME=home)
    exes = build(home)

    rtts = []
    phases = {}
    streams = []
    for _ in range(max(reps, 3)):
        m = re.search(r"rtt_us median ([\d.]+)", run([exes["tcp-rtt"]], env))
        rtts.append(float(m.group(1)))
        out = run([MOME_RUN, "-n", "2", "--nodes", "2", "--no-prefix", exes["fault-bench"], "2000", "16384"], env)
        for m in re.finditer(r"phase (\w+) pages \d+ median_us ([\d.]+) p90_us ([\d.]+)", out):
            phases.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
        m = re.search(r"stream pages (\d+) seconds ([\d.]+) MBps ([\d.]+)", out)
        streams.append(float(m.group(3)))
    rtt = statistics.median(rtts)
    print(f"loopback TCP round trip: median {rtt:.1f} us")
    fault_rows = []
    for name, what, trips in [
        ("read", "read fault, the page owned by the other node", 1),
        ("upgrade", "write fault, own page, other node holds a copy (invalidation)", 1),
        ("write", "write fault, page and ownership taken from the other node", 1),
    ]:
        med = statistics.median(p[0] for p in phases[name])
        p90 = statistics.median(p[1] for p in phases[name])
        fault_rows.append((what, trips, med, p90, med / rtt))
        print(f"{name:8s} median {med:6.1f} us  p90 {p90:6.1f} us  = {med / rtt:.2f} x RTT")
    stream = statistics.median(streams)
    print(f"sequential page fetch: {stream:.0f} MB/s")

    app_rows = []
    for name, a in APP_CASES:
        exe = os.path.join(APPS, a[0])
        if not os.path.exists(exe):
            continue
        argv = [exe] + a[1:]
        native, by_nodes = [], {n: [] for n in NODES}
        for _ in range(reps):
            native.append(timed(argv, env))
            for n in NODES:
                by_nodes[n].append(timed([MOME_RUN, "-n", "4", "--nodes", str(n)] + argv, env))
        nt = statistics.median(native)
        times = [statistics.median(by_nodes[n]) for n in NODES]
        app_rows.append((name, " ".join([a[0]] + a[1:]), nt, times))
        print(f"{name:8s} native {nt:.3f} s | " + " | ".join(
            f"{n} node{'s' if n > 1 else ''} {t:.3f} s ({t / nt:.2f}x)" for n, t in zip(NODES, times)))

    if args.no_record:
        return
    host = platform.node()
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"\n## {when} — issue 4: shared memory across nodes (simulated nodes on loopback)\n",
        f"Machine: {host}, {cpus} cores, {mem:.0f} GiB, Linux {platform.release()}. Command: `python3 bench/nodes.py` "
        f"(part of `make bench`); medians of {max(reps, 3)} runs for the faults, {reps} interleaved runs for the applications.\n",
        f"Loopback TCP round trip between two processes (bench/tcp-rtt.c, 64 bytes, TCP_NODELAY): median {rtt:.1f} us.\n",
        "Remote faults (bench/fault-bench.c, 2 ranks on 2 nodes, 2000 pages each, scattered order so that prefetch does not apply); "
        "a fault includes the userfaultfd hand-off from the rank to its agent and back:\n",
        "| fault | network round trips | median (us) | p90 (us) | median / loopback RTT |",
        "|---|---|---|---|---|",
    ]
    for what, trips, med, p90, ratio in fault_rows:
        lines.append(f"| {what} | {trips} | {med:.1f} | {p90:.1f} | {ratio:.2f} |")
    lines.append(f"\nSequential read of 16384 remote pages (64 MiB), prefetch of up to 14 pages per request: {stream:.0f} MB/s.\n")
    lines.append("Applications, 4 ranks, wall time of the whole job (mome-run, agents, ranks, rank 0's sequential check) "
                 "against the native single-process run of the same binary (which also runs the check):\n")
    lines.append("| program | arguments | native (s) | " + " | ".join(f"{n} node{'s' if n > 1 else ''} (s)" for n in NODES)
                 + " | " + " | ".join(f"ratio {n}" for n in NODES) + " |")
    lines.append("|---|---|---|" + "---|" * (2 * len(NODES)))
    for name, shown, nt, times in app_rows:
        lines.append(f"| {name} | `{shown}` | {nt:.3f} | " + " | ".join(f"{t:.3f}" for t in times) + " | "
                     + " | ".join(f"{t / nt:.2f}" for t in times) + " |")
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
