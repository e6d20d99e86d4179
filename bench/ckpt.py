#!/usr/bin/env python3
"""Checkpoint / restart benchmark (issue 3), run by `make bench`.

For ranks of 256 MiB and 1 GiB (bench/ckpt-mem.c: every page written with
incompressible data, then 10% of the pages rewritten every round):
  - checkpoint 1 right after the whole memory was written (all dirty),
  - checkpoint 2 after the program re-dirtied 10% (incremental),
  - SIGKILL of the whole job, then mome-restart: time until every rank runs
    again (the coordinator log's `restart until running`),
and the per-rank fixed image overhead of a small program (counter). Each
measurement is the median of REPEAT jobs. Results go to stdout and to
bench/RESULTS.md (section "Checkpoint and restart").

Usage: python3 bench/ckpt.py [--repeat N] [--no-record]
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("MOME_BIN_DIR", ROOT / "target/release"))
APPS = Path(os.environ.get("MOME_APPS_DIR", ROOT / "test-apps/build"))
ROUND_MS = 300


def wait_for(pred, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {secs} s waiting for {what}")


class Job:
    def __init__(self, home, argv, tag):
        self.home = home
        self.out = home / f"{tag}.out"
        self.err = home / f"{tag}.err"
        env = dict(os.environ, MOME_HOME=str(home))
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(self.out, "w"),
            stderr=open(self.err, "w"),
            env=env,
            start_new_session=True,
        )

    def text(self):
        return self.out.read_text() if self.out.exists() else ""

    def kill9(self, jobid):
        status = self.home / "jobs" / jobid / "status.json"
        try:
            s = json.loads(status.read_text())
            for p in s.get("ranks", []) + s.get("agents", []):
                if p.get("pid"):
                    try:
                        os.kill(p["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except (OSError, ValueError):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def ckpt(home, jobid):
    o = subprocess.run(
        [BIN / "mome-ckpt", jobid, "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, MOME_HOME=str(home)),
        timeout=120,
    )
    if o.returncode != 0:
        raise RuntimeError(f"mome-ckpt failed: {o.stdout} {o.stderr}")
    return json.loads(o.stdout)


def rounds_in(text):
    return [int(m) for m in re.findall(r"^round (\d+)$", text, re.M)]


def one_memory_run(exe, mib):
    with tempfile.TemporaryDirectory(prefix="mome-bench-ckpt") as d:
        home = Path(d)
        idfile = home / "id"
        job = Job(home, [BIN / "mome-run", "--jobid-file", idfile, exe, str(mib), "10", "1000", str(ROUND_MS)], "run")
        jobid = None
        try:
            jobid = wait_for(lambda: idfile.exists() and idfile.read_text().strip(), 20, "the job id")
            wait_for(lambda: rounds_in(job.text()), 120, "the memory to be written")
            full = ckpt(home, jobid)
            seen = max(rounds_in(job.text()))
            wait_for(lambda: max(rounds_in(job.text())) > seen, 30, "a round after checkpoint 1")
            incr = ckpt(home, jobid)
            job.kill9(jobid)
            t0 = time.time()
            restart = Job(home, [BIN / "mome-restart", jobid], "restart")
            log = home / "jobs" / jobid / "logs" / "coordinator.log"

            def until_running():
                m = re.findall(r"restart until running: (\d+) ms", log.read_text() if log.exists() else "")
                return m and int(m[-1])

            running_ms = wait_for(until_running, 60, "the restarted ranks to run")
            wall_ms = (time.time() - t0) * 1000
            restart.kill9(jobid)
            return full, incr, running_ms, wall_ms
        finally:
            if jobid:
                job.kill9(jobid)
            else:
                job.proc.kill()


def image_overhead():
    with tempfile.TemporaryDirectory(prefix="mome-bench-ckpt") as d:
        home = Path(d)
        idfile = home / "id"
        job = Job(home, [BIN / "mome-run", "--jobid-file", idfile, APPS / "counter", "100000", "50"], "counter")
        jobid = None
        try:
            jobid = wait_for(lambda: idfile.exists() and idfile.read_text().strip(), 20, "the job id")
            wait_for(lambda: "step 3 " in job.text(), 20, "counter to run")
            first = ckpt(home, jobid)
            time.sleep(0.3)
            second = ckpt(home, jobid)
            return first, second
        finally:
            if jobid:
                job.kill9(jobid)
            else:
                job.proc.kill()


def median(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    build = Path(tempfile.mkdtemp(prefix="mome-bench-build"))
    exe = build / "ckpt-mem"
    subprocess.run(["cc", "-O2", "-o", exe, ROOT / "bench/ckpt-mem.c"], check=True)

    rows = []
    for mib in (256, 1024):
        res = [one_memory_run(exe, mib) for _ in range(args.repeat)]
        dirty_full = mib << 20
        dirty_incr = dirty_full // 10
        for case, idx, dirty in (("all dirty", 0, dirty_full), ("10% dirty", 1, dirty_incr)):
            pause = median([r[idx]["pause_us"] / 1000 for r in res])
            commit = median([r[idx]["commit_ms"] for r in res])
            written = median([r[idx]["bytes_written"] for r in res])
            rows.append({
                "size": f"{mib} MiB",
                "case": case,
                "pause_ms": pause,
                "commit_ms": commit,
                "written_mb": written / 1e6,
                "dirty_mb": dirty / 1e6,
                "ratio": written / dirty,
                "gbps": dirty / 1e9 / (commit / 1000),
                "restart_ms": median([r[2] for r in res]) if idx == 1 else None,
                "restart_wall_ms": median([r[3] for r in res]) if idx == 1 else None,
            })
    over = [image_overhead() for _ in range(args.repeat)]
    image_first = median([o[0]["bytes_written"] for o in over])
    image_len = median([o[0]["image_bytes"] for o in over])
    image_next = median([o[1]["bytes_written"] for o in over])

    machine = f"{platform.node()}, {os.cpu_count()} cores, " + \
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Linux {platform.release()}"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"## {date} — issue 3: checkpoint and restart (one node, store on local disk, fsync on)",
        "",
        f"Machine: {machine}. Command: `python3 bench/ckpt.py` (part of `make bench`), median of {args.repeat} jobs per line.",
        "One rank of bench/ckpt-mem.c: every page written with incompressible data, then every 10th page rewritten each "
        f"{ROUND_MS} ms. Checkpoint 1 after the whole memory was written (all dirty), checkpoint 2 after 10% was "
        "re-dirtied; then SIGKILL of the job and mome-restart.",
        "",
        "| rank size | case | pause (ms) | commit (ms, from the command) | written (MB) | dirtied (MB) | written / dirtied | commit GB/s | restart until running (ms) | mome-restart wall until running (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rr = f"{r['restart_ms']:.0f}" if r["restart_ms"] is not None else ""
        rw = f"{r['restart_wall_ms']:.0f}" if r["restart_wall_ms"] is not None else ""
        lines.append(
            f"| {r['size']} | {r['case']} | {r['pause_ms']:.1f} | {r['commit_ms']:.0f} | {r['written_mb']:.1f} | "
            f"{r['dirty_mb']:.1f} | {r['ratio']:.2f} | {r['gbps']:.2f} | {rr} | {rw} |"
        )
    big = [r for r in rows if r["size"] == "1024 MiB"]
    incr = [r for r in rows if r["case"] == "10% dirty"]
    restart = [r["restart_ms"] for r in incr]
    checks = [
        ("pause <= 10 ms at 1 GiB", max(r["pause_ms"] for r in big) <= 10),
        ("restart until running <= 100 ms, independent of size", max(restart) <= 100),
        ("incremental bytes <= 1.2 x dirtied", all(r["ratio"] <= 1.2 for r in incr)),
        ("per-rank fixed overhead <= 1 MB", image_first <= 1e6),
        ("commit >= 1 GB/s", all(r["gbps"] >= 1 for r in rows)),
    ]
    lines += [
        "",
        f"Per-rank fixed overhead (counter, 1 rank): first checkpoint writes {image_first / 1e6:.2f} MB in all "
        f"(private image of {image_len / 1e6:.2f} MB uncompressed, reserved layout mostly zero, plus the heap); "
        f"a second checkpoint 0.3 s later writes {image_next / 1e6:.3f} MB.",
        "",
        "Targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        results = ROOT / "bench/RESULTS.md"
        with open(results, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
