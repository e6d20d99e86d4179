#!/usr/bin/env python3
"""Checkpoint / restart benchmark (issue 3), run by `make bench` after
bench/run.py; also runs alone: `python3 bench/ckpt.py`.

For one rank of 256 MiB and of 1 GiB (bench/ckpt-mem.c: every page written
with incompressible data, then every 10th page rewritten each round):
  - checkpoint 1 right after the whole memory was written (all dirty),
  - checkpoint 2 after the program re-dirtied 10% of its pages (incremental),
  - SIGKILL of the whole job, then `mome-restart`: time until every rank runs
    again (the coordinator log's `restart until running: N ms`, and the wall
    time from launching mome-restart until that line appears);
and the per-rank fixed image overhead of a tiny program (counter, 1 rank).
Every measurement is the median of --repeat jobs (a new job each time, with
a private MOME_HOME holding the checkpoint store). Results go to stdout and
replace the section "## Checkpoint and restart" of bench/RESULTS.md.

Usage: python3 bench/ckpt.py [--repeat N] [--sizes MIB,MIB] [--no-record]
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("MOME_BIN_DIR", ROOT / "target" / "release"))
APPS = Path(os.environ.get("MOME_APPS_DIR", ROOT / "test-apps" / "build"))
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Checkpoint and restart"

DIRTY_PERCENT = 10
ROUND_MS = 300
# 300 ms rounds: 400 of them keep the program alive for 2 minutes, far more
# than one measurement needs (it is killed as soon as it is measured); if
# cleanup ever failed, the program still ends by itself.
ROUNDS = 400
PAGE = 4096

TIMEOUT_JOBID = 20
TIMEOUT_READY = 90  # writing 1 GiB through the window on a loaded machine
TIMEOUT_ROUND = 30
TIMEOUT_CKPT = 120
TIMEOUT_RESTART = 60
TIMEOUT_COUNTER = 20


class BenchError(Exception):
    pass


def wait_for(pred, secs, what, proc=None, log=None):
    """Polls pred() until it returns something true; raises with `what` after
    `secs` seconds, or as soon as `proc` (the job's mome-run) has ended."""
    deadline = time.monotonic() + secs
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the job ended first (exit {proc.returncode})" + tail(log))
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {secs} s waiting for {what}" + tail(log))
        time.sleep(0.005)


def tail(path, n=8):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    except (OSError, TypeError):
        return ""
    return "\n  " + "\n  ".join(lines) if lines else ""


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def environ_has(pid, markers):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(m in env for m in markers)


class Job:
    """A mome-run or mome-restart process, in its own process group, with a
    private MOME_HOME; stdin /dev/null, stdout and stderr to files."""

    def __init__(self, home, argv, tag, cwd):
        self.home = home
        self.out = home / f"{tag}.out"
        self.err = home / f"{tag}.err"
        self.jobid = None
        env = dict(os.environ, MOME_HOME=str(home))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def text(self):
        return read(self.out)

    def coordinator_log(self):
        return self.home / "jobs" / (self.jobid or "?") / "logs" / "coordinator.log"

    def kill9(self):
        """SIGKILL of everything of the job: mome-run's process group, the
        pids of status.json (ranks, agents, coordinator), the ranks' process
        group, and any leftover process carrying this job's MOME_HOME or
        MOME_JOBID (checked in /proc/PID/environ, so that a recycled pid is
        never someone else's process)."""
        markers = [f"MOME_HOME={self.home}".encode()]
        if self.jobid:
            markers.append(f"MOME_JOBID={self.jobid}".encode())
        if self.proc.returncode is None:  # not reaped: its pgid is still ours
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pids = set()
        if self.jobid:
            try:
                s = json.loads(read(self.home / "jobs" / self.jobid / "status.json") or "{}")
            except ValueError:
                s = {}
            pids |= {p.get("pid") for p in s.get("ranks", []) + s.get("agents", [])}
            pids.add(s.get("coordinator_pid"))
            for g in re.findall(r"in process group (\d+)", read(self.coordinator_log())):
                if environ_has(int(g), markers):
                    try:
                        os.killpg(int(g), signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        for d in os.listdir("/proc"):
            if d.isdigit():
                pids.add(int(d))
        for pid in pids:
            if pid and pid != os.getpid() and environ_has(pid, markers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"warning: {self.proc.args[0]} pid {self.proc.pid} survived SIGKILL\n")


def ckpt(home, jobid):
    try:
        o = subprocess.run(
            [str(BIN / "mome-ckpt"), jobid, "--json"],
            capture_output=True,
            text=True,
            env=dict(os.environ, MOME_HOME=str(home)),
            timeout=TIMEOUT_CKPT,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"mome-ckpt {jobid} did not answer within {TIMEOUT_CKPT} s")
    try:
        j = json.loads(o.stdout)
    except ValueError:
        j = {"error": o.stdout.strip() or "no output"}
    if o.returncode != 0 or "error" in j:
        raise BenchError(f"mome-ckpt {jobid} failed (exit {o.returncode}): {j.get('error')} {o.stderr.strip()}")
    return j


def rounds_in(text):
    return [int(m) for m in re.findall(r"^(?:\[0\] )?round (\d+)$", text, re.M)]


def start(home, argv, tag):
    idfile = home / f"{tag}.id"
    job = Job(home, [BIN / "mome-run", "--jobid-file", idfile, "-n", "1"] + argv, tag, cwd=home)
    try:
        job.jobid = wait_for(lambda: read(idfile).strip(), TIMEOUT_JOBID, f"the job id of {tag}", job.proc, job.err)
    except BaseException:
        job.kill9()
        raise
    return job


def memory_run(exe, mib):
    """One job of ckpt-mem MIB: checkpoint all dirty, checkpoint 10% dirty,
    SIGKILL, restart until running."""
    home = Path(tempfile.mkdtemp(prefix="mome-bench-ckpt-"))
    jobs = []
    try:
        job = start(home, [exe, mib, DIRTY_PERCENT, ROUNDS, ROUND_MS], "run")
        jobs.append(job)
        log = job.coordinator_log()
        wait_for(lambda: re.search(r"^(?:\[0\] )?ready$", job.text(), re.M), TIMEOUT_READY,
                 f"`ready` of ckpt-mem {mib} (the whole memory written)", job.proc, job.err)
        wait_for(lambda: 1 in rounds_in(job.text()), TIMEOUT_ROUND, "`round 1`", job.proc, job.err)
        full = ckpt(home, job.jobid)
        # Rounds go on during checkpoint 1; a round printed after it has
        # re-dirtied the same 10% of the pages since.
        seen = max(rounds_in(job.text()))
        wait_for(lambda: max(rounds_in(job.text())) > seen, TIMEOUT_ROUND,
                 f"a `round` line after `round {seen}` (after checkpoint 1)", job.proc, job.err)
        incr = ckpt(home, job.jobid)
        job.kill9()
        t0 = time.perf_counter()
        restart = Job(home, [BIN / "mome-restart", job.jobid], "restart", cwd=home)
        restart.jobid = job.jobid
        jobs.append(restart)

        def until_running():
            m = re.findall(r"restart until running: (\d+) ms", read(log))
            return m and int(m[-1])

        running_ms = wait_for(until_running, TIMEOUT_RESTART, "`restart until running` in coordinator.log",
                              restart.proc, restart.err)
        wall_ms = (time.perf_counter() - t0) * 1000
        restart.kill9()
        return {"full": full, "incr": incr, "restart_ms": running_ms, "restart_wall_ms": wall_ms,
                "restart_steps": restart_steps(read(log))}
    finally:
        for j in reversed(jobs):
            j.kill9()
        shutil.rmtree(home, ignore_errors=True)


def restart_steps(log):
    """Where restart time goes, from the times of the coordinator log's lines
    of the restart: `incarnation` (stamp chosen and verified) to agent
    started, agent started to ready (loading the stamp's index), ready to
    every rank restored. Milliseconds, or None where a line is missing."""
    def stamp(line):
        m = re.match(r"\S+T(\d+):(\d+):(\d+\.\d+)Z ", line)
        return m and (int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])) * 1000

    lines = log.splitlines()
    start = next((i for i in range(len(lines) - 1, -1, -1) if " incarnation " in lines[i]), None)
    if start is None:
        return None
    t = {"inc": stamp(lines[start])}
    for line in lines[start:]:
        for key, pat in (("agent", "agent of node 0 started"), ("ready", "agent of node 0 is ready"),
                         ("running", "restart until running")):
            if pat in line and key not in t:
                t[key] = stamp(line)
    if len(t) < 4 or None in t.values():
        return None
    return {"launch": t["agent"] - t["inc"], "load": t["ready"] - t["agent"], "ranks": t["running"] - t["ready"]}


def overhead_run():
    """Per-rank fixed overhead: the first checkpoint of counter (64 KiB of
    state), and a second one (what an idle rank costs per increment)."""
    home = Path(tempfile.mkdtemp(prefix="mome-bench-ckpt-"))
    job = None
    try:
        job = start(home, [APPS / "counter", "1000", "50"], "counter")
        wait_for(lambda: re.search(r"^(?:\[0\] )?step 3 ", job.text(), re.M), TIMEOUT_COUNTER,
                 "counter's `step 3`", job.proc, job.err)
        first = ckpt(home, job.jobid)
        time.sleep(0.3)
        second = ckpt(home, job.jobid)
        return {"first": first, "second": second}
    finally:
        if job:
            job.kill9()
        shutil.rmtree(home, ignore_errors=True)


def med(xs):
    return statistics.median(xs)


def machine():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    u = os.uname()
    return f"{u.nodename}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {u.sysname} {u.release} {u.machine}"


def ensure_built():
    need = [BIN / b for b in ("mome-run", "mome-ckpt", "mome-restart", "mome-agent")] + [APPS / "counter"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        print(f"missing {', '.join(missing)}: make build", flush=True)
        subprocess.run(["make", "-C", str(ROOT), "build"], check=True)


def record(text):
    old = read(RESULTS)
    pat = re.compile(r"^" + re.escape(SECTION) + r"\b.*?(?=^## |\Z)", re.M | re.S)
    if pat.search(old):
        new = pat.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="256,1024", help="rank sizes in MiB, comma separated")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    # SIGTERM (or SIGHUP) unwinds like Ctrl-C, so that every job is killed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    t_start = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ensure_built()
    build = Path(tempfile.mkdtemp(prefix="mome-bench-build-"))
    try:
        exe = build / "ckpt-mem"
        subprocess.run(["cc", "-O2", "-o", str(exe), str(ROOT / "bench" / "ckpt-mem.c")], check=True)
        runs = {}
        for mib in sizes:
            runs[mib] = []
            for i in range(args.repeat):
                r = memory_run(exe, mib)
                runs[mib].append(r)
                print(f"{mib:5d} MiB job {i + 1}: all dirty pause {r['full']['pause_us'] / 1000:.1f} ms, "
                      f"commit {r['full']['commit_ms']} ms, {r['full']['bytes_written'] / 2**20:.1f} MiB | "
                      f"10% dirty pause {r['incr']['pause_us'] / 1000:.1f} ms, commit {r['incr']['commit_ms']} ms, "
                      f"{r['incr']['bytes_written'] / 2**20:.1f} MiB | restart until running "
                      f"{r['restart_ms']} ms (wall {r['restart_wall_ms']:.0f} ms)", flush=True)
        over = []
        for i in range(args.repeat):
            o = overhead_run()
            over.append(o)
            print(f"counter job {i + 1}: image {o['first']['image_bytes']} bytes, first checkpoint writes "
                  f"{o['first']['bytes_written']} bytes, second {o['second']['bytes_written']} bytes", flush=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)

    rows = []
    for mib in sizes:
        res = runs[mib]
        mem = mib << 20
        for case, key, dirty in (("all dirty", "full", mem), (f"{DIRTY_PERCENT}% dirty", "incr", mem * DIRTY_PERCENT // 100)):
            js = [r[key] for r in res]
            commit = med([j["commit_ms"] for j in js])
            written = med([j["bytes_written"] for j in js])
            rows.append({
                "mib": mib, "case": case, "key": key, "dirty": dirty,
                "pause_ms": med([j["pause_us"] / 1000 for j in js]),
                "pause_all": [j["pause_us"] / 1000 for j in js],
                "commit_ms": commit,
                "written": written,
                "ratio": written / dirty,
                # GB/s = dirty bytes / commit time (decimal GB)
                "gbps": dirty / 1e6 / commit if commit > 0 else float("inf"),
                "pages": med([j["pages"] for j in js]),
                "pause_pages": med([j["pause_pages"] for j in js]),
                "precopy_pages": med([j["precopy_pages"] for j in js]),
                "image_bytes": med([j["image_bytes"] for j in js]),
                "restart_ms": med([r["restart_ms"] for r in res]),
                "restart_all": [r["restart_ms"] for r in res],
                "restart_steps": {k: med([r["restart_steps"][k] for r in res if r["restart_steps"]] or [float("nan")])
                                  for k in ("launch", "load", "ranks")},
                "restart_wall_ms": med([r["restart_wall_ms"] for r in res]),
            })
    image = med([o["first"]["image_bytes"] for o in over])
    first_written = med([o["first"]["bytes_written"] for o in over])
    next_written = med([o["second"]["bytes_written"] for o in over])
    elapsed = time.monotonic() - t_start

    big = [r for r in rows if r["mib"] == max(sizes)]
    incr = [r for r in rows if r["key"] == "incr"]
    restarts = [r["restart_ms"] for r in incr]
    checks = [
        (f"pause <= 10 ms at {max(sizes)} MiB", max(r["pause_ms"] for r in big) <= 10,
         "median pause " + ", ".join(f"{r['pause_ms']:.1f} ms ({r['case']})" for r in big)),
        ("restart until running <= 100 ms", max(restarts) <= 100,
         ", ".join(f"{r['restart_ms']:.0f} ms at {r['mib']} MiB" for r in incr)),
        # Independent of size: the largest size's median within 1.5 x (+ 10 ms
        # of noise) of the smallest's.
        (f"restart until running independent of size ({min(sizes)} to {max(sizes)} MiB)",
         len(incr) < 2 or incr[-1]["restart_ms"] <= 1.5 * incr[0]["restart_ms"] + 10,
         f"{incr[-1]['restart_ms'] / incr[0]['restart_ms']:.1f} x from {min(sizes)} to {max(sizes)} MiB; "
         "agent start to ready (loading the stamp's index) "
         + " vs ".join(f"{r['restart_steps']['load']:.0f} ms" for r in incr)),
        ("incremental bytes <= 1.2 x dirtied", all(r["ratio"] <= 1.2 for r in incr),
         ", ".join(f"{r['ratio']:.2f} at {r['mib']} MiB" for r in incr)),
        ("per-rank fixed overhead <= 1 MB", first_written <= 1e6,
         f"{first_written / 1e6:.2f} MB written by a 1-rank counter's first checkpoint"),
        ("commit >= 1 GB/s", all(r["gbps"] >= 1 for r in rows),
         ", ".join(f"{r['gbps']:.2f} GB/s ({r['mib']} MiB, {r['case']})" for r in rows)),
    ]

    lines = [
        SECTION,
        "",
        f"{date}. Machine: {machine()}. Command: `python3 bench/ckpt.py` (run by `make bench` after "
        f"bench/run.py), median of {args.repeat} jobs per figure ({elapsed:.0f} s in all). Store: the job "
        "directory's ckpt/ on the local disk, default configuration (fsync on).",
        "",
        f"One rank (`mome-run -n 1`) of bench/ckpt-mem.c (`ckpt-mem MIB {DIRTY_PERCENT} {ROUNDS} {ROUND_MS}`): "
        f"every page written with incompressible data, then every {100 // DIRTY_PERCENT}th page rewritten each "
        f"{ROUND_MS} ms round. `mome-ckpt --json` after `round 1` (all dirty), again after the next `round` line "
        f"({DIRTY_PERCENT}% re-dirtied); then SIGKILL of the job (mome-run, agent, ranks) and `mome-restart`. "
        "Restart until running is the coordinator log's `restart until running` (from the restarted "
        "coordinator's start, once the stamp is chosen and verified, to every rank restored; pages then come "
        "back lazily); wall is from launching mome-restart until that line is in the log. Dirty = the bytes the program rewrote; written = `bytes_written` (lz4 blocks, "
        "incompressible ones stored raw, plus indexes and the private image); commit GB/s = dirty / `commit_ms`.",
        "",
        "| rank size | case | pause (ms) | commit (ms) | written (MiB) | dirty (MiB) | written / dirty "
        "| commit GB/s | restart until running (ms) | restart wall (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rr = f"{r['restart_ms']:.0f}" if r["key"] == "incr" else ""
        rw = f"{r['restart_wall_ms']:.0f}" if r["key"] == "incr" else ""
        lines.append(
            f"| {r['mib']} MiB | {r['case']} | {r['pause_ms']:.1f} | {r['commit_ms']:.0f} | "
            f"{r['written'] / 2**20:.1f} | {r['dirty'] / 2**20:.1f} | {r['ratio']:.2f} | {r['gbps']:.2f} | {rr} | {rw} |"
        )
    lines += [
        "",
        "Details (medians; pages are 4 KiB; restart measured once per job, after checkpoint 2, and split "
        "with the coordinator log's times: `incarnation` line (stamp verified) to agent started / agent started "
        "to ready (loading the stamp's index) / ready to every rank restored; the first part is partly outside "
        "`restart until running`, which starts once the coordinator is set up):",
        "",
        "| rank size | case | pages | paused pages | pre-copied pages | image bytes | pause of each job (ms) "
        "| restart of each job (ms) | restart split (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mib']} MiB | {r['case']} | {r['pages']:.0f} | {r['pause_pages']:.0f} | {r['precopy_pages']:.0f} | "
            f"{r['image_bytes']:.0f} | {', '.join(f'{p:.1f}' for p in r['pause_all'])} | "
            f"{', '.join(str(x) for x in r['restart_all']) if r['key'] == 'incr' else ''} | "
            + (" / ".join(f"{r['restart_steps'][k]:.0f}" for k in ("launch", "load", "ranks")) if r["key"] == "incr" else "")
            + " |"
        )
    lines += [
        "",
        f"Per-rank fixed overhead (`mome-run -n 1 counter 1000 50`, 64 KiB of state): the first checkpoint "
        f"writes {first_written / 1e6:.3f} MB in all; the private image is {image / 1e6:.3f} MB uncompressed "
        f"(`image_bytes`); a second checkpoint 0.3 s later writes {next_written / 1e6:.3f} MB.",
        "",
        "Targets:",
        "",
    ]
    for name, ok, detail in checks:
        lines.append(f"- {name}: {'met' if ok else '**not met**'} ({detail})")
    lines.append("")
    text = "\n".join(lines)
    if not args.no_record:  # before printing: a closed stdout must not lose the results
        record(text)
    print()
    print(text)
    if not args.no_record:
        print(f"recorded in {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        sys.stderr.write(f"bench/ckpt.py: {e}\n")
        sys.exit(1)
