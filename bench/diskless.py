#!/usr/bin/env python3
"""Diskless checkpoints and recovery benchmark (issue 5), run by `make bench`
(bench/run.sh); also runs alone: `python3 bench/diskless.py`.

4 simulated nodes, 4 ranks (`mome-run -n 4 --nodes 4`, one rank per node),
each rank holding MIB MiB of private memory, every page written with
incompressible data, then 10% of the pages rewritten each round, a
different tenth each round (so that the whole memory is dirty again every
10 rounds). The program (dl-mem, below, compiled into a temporary
directory) runs until a stop file appears, then checks every word of its
memory against what its rounds wrote and prints `verified ...` or
`MISMATCH ...`: a recovered job is only counted as finished OK when each
rank's memory is exactly what the program wrote.

For each redundancy scheme (mirror: 2 copies; disk; xor and rs when the
configuration accepts them) and each size (--small-mib and --mib), one job:
  1. `mome-ckpt --json` after every rank's `round 1` (the whole memory
     dirty): pause (`pause_us`), commit (`commit_ms`, command to
     committed), bytes written; the wall time of mome-ckpt;
  2. per node, from `logs/agent-N.log`: `checkpoint S: B bytes copied to
     node(s) [..] in M ms` (duplication throughput = B / M, B being what
     each holder received; xor/rs: `B' bytes of chunks sent to the parity
     holders of group [..] in M ms`, throughput = the node's increment / M)
     and `durable, ... bytes written in X ms`; the memory in use until the
     stamp is committed (lowest MemAvailable, sampled every 20 ms);
  3. memory held by each node's keeper (the files of the tmpfs at the
     `path` of `keepers/node-N.json`) / the node's own increment;
  4. kill -9 of node 1 (its keeper, then its agent); recovery = from the
     coordinator log's `node 1 failed` line to the last `rank R restored`
     line of the next incarnation (with the disk scheme, mome-run ends the
     job and this script runs `mome-restart` at once, as a user or a batch
     system would: included in the figure); then the stop file, and the job
     must end with status 0 and every rank `verified`.
Plus, for comparison, the same checkpoint of one rank alone
(`mome-run --nodes 1 -n 1`, store on the local disk) at each size, and the
loopback TCP yardstick (tcp-stream, below: 1 stream, and 8 at once as the
4 nodes x 2 holders copy). A job that fails is retried once; both attempts
are reported. The binaries are copied from target/release first, so that a
rebuild during the run does not change them under a running job.

Results go to stdout and are appended to bench/RESULTS.md as a dated
section "Diskless checkpoints and recovery (issue 5)".

Usage: python3 bench/diskless.py [--mib 256] [--small-mib 64]
           [--schemes mirror,disk,xor,rs] [--round-ms 300] [--no-record]
           [--keep-logs DIR]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("MOME_BIN_DIR", ROOT / "target" / "release"))
RESULTS = ROOT / "bench" / "RESULTS.md"
TITLE = "Diskless checkpoints and recovery (issue 5)"

NODES = 4
FAILED_NODE = 1
SCHEMES = {
    "mirror": "redundancy:\n  scheme: mirror\n  copies: 2\n",
    "disk": "redundancy:\n  scheme: disk\n",
    "xor": "redundancy:\n  scheme: xor\n  group: 4\n",
    "rs": "redundancy:\n  scheme: rs\n  data: 2\n  parity: 2\n",
}
# Memory each node's keeper should hold per byte of the node's own
# increment: its own, plus 2 copies of others' (mirror), plus a parity
# share (xor: 1/(group-1); rs: parity/data).
EXPECTED_OVERHEAD = {"mirror": 3.0, "xor": 1 + 1 / 3, "rs": 1 + 2 / 2}
SCHEME_TEXT = {
    "mirror": "mirror, 2 copies (node n's increment on n+1 and n+2)",
    "disk": "disk (checkpoint.dir on the local disk, no memory copies)",
    "xor": "xor, one parity group of 4 nodes",
    "rs": "rs, Reed-Solomon 2 data + 2 parity",
}

KEEP_LOGS = None  # --keep-logs DIR

TIMEOUT_JOBID = 20
TIMEOUT_READY = 180  # 4 ranks writing their memory on 2 cores
TIMEOUT_ROUND = 60
TIMEOUT_CKPT = 300
TIMEOUT_RECOVER = 120
TIMEOUT_END = 120

DL_MEM_C = r"""
/* dl-mem MIB ROUND_MS STOPFILE: memory for bench/diskless.py.
 * Writes every page (incompressible), prints "ready", then each round r
 * rewrites the pages p with p % 10 == r % 10, prints "round r" and sleeps
 * ROUND_MS; stops after the round in which STOPFILE exists, checks every
 * word against what the rounds wrote and prints "verified ..." (exit 0)
 * or "MISMATCH ..." (exit 1). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t val(uint64_t w, long r)
{
    return mix(w * 0x9e3779b97f4a7c15ULL + ((uint64_t)r << 40) + (uint64_t)r);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: dl-mem MIB ROUND_MS STOPFILE\n");
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    long round_ms = atol(argv[2]);
    const char *stop = argv[3];
    size_t page_words = 512, pages = bytes / 4096;
    uint64_t *mem = NULL;
    if (posix_memalign((void **)&mem, 4096, bytes) != 0 || !mem) {
        perror("malloc");
        return 1;
    }
    for (size_t w = 0; w < pages * page_words; w++)
        mem[w] = val(w, 0);
    printf("ready\n");
    fflush(stdout);
    long r = 0;
    for (;;) {
        r++;
        for (size_t p = (size_t)(r % 10); p < pages; p += 10)
            for (size_t w = p * page_words; w < (p + 1) * page_words; w++)
                mem[w] = val(w, r);
        printf("round %ld\n", r);
        fflush(stdout);
        struct timespec ts = {round_ms / 1000, (round_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        if (access(stop, F_OK) == 0)
            break;
    }
    for (size_t p = 0; p < pages; p++) {
        long k = (long)(p % 10);
        long last = r - (((r - k) % 10) + 10) % 10;
        if (last < 1)
            last = 0;
        for (size_t w = p * page_words; w < (p + 1) * page_words; w++)
            if (mem[w] != val(w, last)) {
                printf("MISMATCH page %zu word %zu after %ld rounds\n", p, w, r);
                return 1;
            }
    }
    printf("verified %ld rounds, %zu pages\n", r, pages);
    return 0;
}
"""

TCP_STREAM_C = r"""
/* tcp-stream PAIRS MIB: PAIRS sender/receiver process pairs on loopback TCP
 * at once, each sender writing MIB MiB in 1 MiB writes; prints
 * "stream pairs P mib M seconds S aggregate_GBps G" (wall time from the
 * first byte offered to the last byte received). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    int pairs = argc > 1 ? atoi(argv[1]) : 1;
    long mib = argc > 2 ? atol(argv[2]) : 1024;
    size_t chunk = 1 << 20;
    int go[2];
    if (pipe(go) != 0)
        return 1;
    for (int p = 0; p < pairs; p++) {
        int ls = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1) || getsockname(ls, (struct sockaddr *)&a, &al))
            return 1;
        if (fork() == 0) { /* receiver */
            close(go[0]);
            close(go[1]);
            int c = accept(ls, NULL, NULL);
            char *buf = malloc(chunk);
            size_t got = 0, want = (size_t)mib << 20;
            while (got < want) {
                ssize_t n = read(c, buf, chunk);
                if (n <= 0)
                    _exit(1);
                got += (size_t)n;
            }
            _exit(0);
        }
        close(ls);
        if (fork() == 0) { /* sender */
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(s, (struct sockaddr *)&a, sizeof a))
                _exit(1);
            char *buf = malloc(chunk);
            memset(buf, 0x5a, chunk);
            char b;
            close(go[1]);
            if (read(go[0], &b, 1) < 0)
                _exit(1);
            for (long i = 0; i < mib; i++)
                for (size_t d = 0; d < chunk;) {
                    ssize_t n = write(s, buf + d, chunk - d);
                    if (n <= 0)
                        _exit(1);
                    d += (size_t)n;
                }
            _exit(0);
        }
    }
    usleep(100000);
    double t0 = now();
    close(go[1]); /* every sender starts */
    int st, bad = 0;
    while (wait(&st) > 0)
        bad |= !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    double dt = now() - t0;
    if (bad)
        return 1;
    printf("stream pairs %d mib %ld seconds %.3f aggregate_GBps %.2f\n", pairs, mib, dt,
           (double)pairs * mib * 1048576 / 1e9 / dt);
    return 0;
}
"""


class BenchError(Exception):
    pass


class Refused(BenchError):
    """mome-run refused the job (a configuration it does not accept)."""


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def tail(path, n=8):
    lines = read(path).splitlines()[-n:]
    return "\n  " + "\n  ".join(lines) if lines else ""


def wait_for(pred, secs, what, proc=None, log=None):
    """Polls pred() until it returns something true; raises with `what` after
    `secs` seconds, or as soon as `proc` has ended."""
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


def environ_has(pid, markers):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(m in env for m in markers)


def log_time(line):
    """Epoch seconds of a coordinator log line (RFC 3339, UTC, ms)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z ", line)
    if not m:
        return None
    return datetime.datetime.fromisoformat(m[1]).replace(tzinfo=datetime.timezone.utc).timestamp()


class Job:
    """A mome-run or mome-restart process in its own process group, with a
    private MOME_HOME; stdin /dev/null, stdout and stderr to files."""

    def __init__(self, home, argv, tag):
        self.home = home
        self.out = home / f"{tag}.out"
        self.err = home / f"{tag}.err"
        self.jobid = None
        env = dict(os.environ, MOME_HOME=str(home))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, cwd=home, start_new_session=True)

    def text(self):
        return read(self.out)

    def jobdir(self):
        return self.home / "jobs" / (self.jobid or "?")

    def coordinator_log(self):
        return self.jobdir() / "logs" / "coordinator.log"

    def kill9(self):
        """SIGKILL of everything of the job: mome-run's process group and
        every process carrying this MOME_HOME or MOME_JOBID in its
        environment (ranks, agents, keepers; checked in /proc/PID/environ so
        that a recycled pid is never someone else's process)."""
        markers = [f"MOME_HOME={self.home}".encode()]
        if self.jobid:
            markers.append(f"MOME_JOBID={self.jobid}".encode())
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid() and environ_has(int(d), markers):
                try:
                    os.kill(int(d), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"warning: {self.proc.args[0]} pid {self.proc.pid} survived SIGKILL\n")


class MemSampler:
    """The lowest MemAvailable seen (every 20 ms) while it runs."""

    def __init__(self):
        self.low = mem_available()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.02):
            self.low = min(self.low, mem_available())

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.low


def settled_mem_available(secs=10):
    """MemAvailable once it stops growing (the previous job's memory is
    freed asynchronously after its processes were killed)."""
    deadline = time.monotonic() + secs
    a = mem_available()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        b = mem_available()
        if abs(b - a) < 32 << 20:
            return b
        a = b
    return a


def start(home, argv, tag):
    idfile = home / f"{tag}.id"
    job = Job(home, [BIN / "mome-run", "--jobid-file", idfile] + argv, tag)
    try:
        job.jobid = wait_for(lambda: read(idfile).strip(), TIMEOUT_JOBID, f"the job id of {tag}", job.proc, job.err)
    except BenchError as e:
        job.kill9()
        if job.proc.returncode == 2:
            raise Refused(f"mome-run refused the job: {read(job.err).strip()}") from e
        raise
    except BaseException:
        job.kill9()
        raise
    return job


def ckpt(home, jobid):
    t0 = time.perf_counter()
    try:
        o = subprocess.run([str(BIN / "mome-ckpt"), jobid, "--json"], capture_output=True, text=True,
                           env=dict(os.environ, MOME_HOME=str(home)), timeout=TIMEOUT_CKPT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"mome-ckpt {jobid} did not answer within {TIMEOUT_CKPT} s")
    wall = (time.perf_counter() - t0) * 1000
    try:
        j = json.loads(o.stdout)
    except ValueError:
        j = {"error": o.stdout.strip() or "no output"}
    if o.returncode != 0 or "error" in j:
        raise BenchError(f"mome-ckpt {jobid} failed (exit {o.returncode}): {j.get('error')} {o.stderr.strip()}")
    j["wall_ms"] = wall
    return j


def ranks_saw(text, nranks, pattern):
    """Every rank printed a line matching `pattern` (lines are `[r] ...`
    with several ranks)."""
    if nranks == 1:
        return re.search(r"^" + pattern + r"$", text, re.M) is not None
    seen = {int(m[1]) for m in re.finditer(r"^\[(\d+)\] " + pattern + r"$", text, re.M)}
    return len(seen) == nranks


def store_usage(path):
    """Bytes of the files under `path`: apparent size and allocated (tmpfs
    pages), in all and for each node-K/ directory."""
    size = blocks = 0
    per = {}
    for d, _, files in os.walk(path):
        m = re.search(r"/node-(\d+)(?:/|$)", d[len(str(path)):])
        for f in files:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            size += st.st_size
            blocks += st.st_blocks * 512
            if m:
                per[int(m[1])] = per.get(int(m[1]), 0) + st.st_size
    return {"size": size, "alloc": blocks, "per_node": per}


def agent_figures(jobdir, stamp, nodes):
    """Per node, from logs/agent-N.log: bytes copied to the holders and the
    copy time, bytes written and write time (`durable` line)."""
    out = {}
    for n in range(nodes):
        log = read(jobdir / "logs" / f"agent-{n}.log")
        f = {}
        m = re.search(rf"checkpoint {stamp}: (\d+) bytes copied to node\(s\) \[([\d, ]*)\] in (\d+) ms", log)
        if m:
            f["copied"], f["holders"], f["copy_ms"] = int(m[1]), [int(x) for x in m[2].split(",") if x.strip()], int(m[3])
        m = re.search(rf"checkpoint {stamp}: (\d+) bytes of chunks sent to the parity holders of group "
                      rf"\[([\d, ]*)\] in (\d+) ms", log)
        if m:
            f["parity_sent"], f["copy_ms"] = int(m[1]), int(m[3])
            f["group"] = [int(x) for x in m[2].split(",") if x.strip()]
        m = re.search(rf"checkpoint {stamp}: (\d+) bytes copied to the disk store", log)
        if m:
            f["to_disk"] = int(m[1])
        m = re.search(rf"checkpoint {stamp}: durable, (\d+) pages .*?, (\d+) bytes written in (\d+) ms \((\d+) ms from the command\)", log)
        if m:
            f["pages"], f["written"], f["write_ms"], f["durable_ms"] = (int(m[i]) for i in range(1, 5))
        m = re.search(rf"checkpoint {stamp}: ranks resumed after (\d+) us", log)
        if m:
            f["pause_us"] = int(m[1])
        m = re.search(rf"checkpoint {stamp}: (\d+) us from the last rank parked to resume", log)
        if m:
            f["own_pause_us"] = int(m[1])
        out[n] = f
    return out


def build(tmp):
    exes = {}
    for name, text in (("dl-mem", DL_MEM_C), ("tcp-stream", TCP_STREAM_C)):
        src = tmp / f"{name}.c"
        src.write_text(text)
        subprocess.run(["cc", "-O2", "-o", str(tmp / name), str(src)], check=True)
        exes[name] = tmp / name
    return exes


def loopback(exe, pairs, mib):
    """Aggregate GB/s of `pairs` TCP streams at once on loopback."""
    o = subprocess.run([str(exe), str(pairs), str(mib)], capture_output=True, text=True, timeout=120)
    m = re.search(r"aggregate_GBps ([\d.]+)", o.stdout)
    if o.returncode != 0 or not m:
        raise BenchError(f"tcp-stream {pairs} {mib} failed: {o.stdout} {o.stderr}")
    return float(m[1])


def single_run(exe, mib, round_ms):
    """One rank alone (`--nodes 1 -n 1`): the pause and commit of the same
    all-dirty checkpoint, store on the local disk."""
    home = Path(tempfile.mkdtemp(prefix="mome-bench-dl-"))
    job = None
    try:
        job = start(home, ["--nodes", "1", "-n", "1", exe, mib, round_ms, home / "stop"], "single")
        wait_for(lambda: ranks_saw(job.text(), 1, "ready"), TIMEOUT_READY, "`ready`", job.proc, job.err)
        wait_for(lambda: ranks_saw(job.text(), 1, r"round \d+"), TIMEOUT_ROUND, "`round 1`", job.proc, job.err)
        return ckpt(home, job.jobid)
    finally:
        if job:
            job.kill9()
        shutil.rmtree(home, ignore_errors=True)


def cluster_run(exe, scheme, mib, round_ms):
    home = Path(tempfile.mkdtemp(prefix="mome-bench-dl-"))
    jobs = []
    r = {"scheme": scheme, "mib": mib}
    try:
        cfg = home / "job.yaml"
        cfg.write_text(SCHEMES[scheme])
        stop = home / "stop"
        baseline = settled_mem_available()
        sampler = MemSampler()
        job = start(home, ["--config", cfg, "-n", NODES, "--nodes", NODES, exe, mib, round_ms, stop], "run")
        jobs.append(job)
        jd = job.jobdir()
        log = job.coordinator_log()
        wait_for(lambda: ranks_saw(job.text(), NODES, "ready"), TIMEOUT_READY,
                 f"`ready` of every rank ({mib} MiB each written)", job.proc, job.err)
        wait_for(lambda: ranks_saw(job.text(), NODES, "round 1"), TIMEOUT_ROUND, "`round 1` of every rank",
                 job.proc, job.err)
        try:
            c = ckpt(home, job.jobid)
        finally:
            r["peak_mem"] = baseline - sampler.stop()
        r["ckpt"] = c
        stamp = c["stamp"]
        r["agents"] = agent_figures(jd, stamp, NODES)
        r["coordinator_ckpt"] = [l for l in read(log).splitlines() if f"checkpoint {stamp}" in l]

        # Memory held by each keeper.
        r["keepers"] = {}
        for n in range(NODES):
            try:
                k = json.loads(read(jd / "keepers" / f"node-{n}.json"))
            except ValueError:
                continue
            u = store_usage(Path(k["path"]))
            u["pid"] = k["pid"]
            r["keepers"][n] = u
        r["disk_store"] = store_usage(jd / "ckpt")

        # Node 1 fails: its keeper (its memory) and its agent, kill -9.
        status = json.loads(read(jd / "status.json"))
        agent_pid = status["agents"][FAILED_NODE]["pid"]
        keeper = r["keepers"].get(FAILED_NODE)
        offset = len(read(log))
        t_kill = time.time()
        if keeper:
            os.kill(keeper["pid"], signal.SIGKILL)
        os.kill(agent_pid, signal.SIGKILL)
        r["t_kill"] = t_kill

        def after_kill():
            return read(log)[offset:]

        fail_re = re.compile(rf"^(\S+) mome: node {FAILED_NODE} failed: .*$", re.M)
        m = wait_for(lambda: fail_re.search(after_kill()), TIMEOUT_RECOVER, f"`node {FAILED_NODE} failed` in "
                     "coordinator.log", None, log)
        r["fail_line"] = m[0]
        t_fail = log_time(m[0])
        restarter = job
        if "restarting the job" not in m[0]:
            # The job ends (no memory copies to recover from): restart it
            # from the disk at once.
            code = wait_for(lambda: job.proc.poll() is not None and [job.proc.returncode], TIMEOUT_RECOVER,
                            "mome-run's exit after the node failure")[0]
            r["run_exit"] = code
            restarter = Job(home, [BIN / "mome-restart", job.jobid], "restart")
            restarter.jobid = job.jobid
            jobs.append(restarter)
            r["manual_restart"] = True
        running_re = re.compile(r"^(\S+) restart until running: (\d+) ms", re.M)
        m = wait_for(lambda: running_re.search(after_kill()), TIMEOUT_RECOVER,
                     "`restart until running` in coordinator.log", restarter.proc, restarter.err)
        t_running_line = log_time(m[0])
        text = after_kill()
        inc = text.rfind(" incarnation ")
        restored = [l for l in text[inc:].splitlines() if re.search(r" rank \d+ restored \(", l)]
        t_last = max(log_time(l) for l in restored) if restored else t_running_line
        r["restart_until_running_ms"] = int(m[2])
        # Where the time goes: the old incarnation ends, the new one starts
        # (stamp chosen, keepers adopted, agents and mesh up), ranks restored.
        steps = {}
        for line in text.splitlines():
            for key, pat in (("ended", " job ended: "), ("incarnation", " incarnation "),
                             ("started", r" started \d+ rank\(s\) ")):
                if key not in steps and re.search(pat, line):
                    steps[key] = log_time(line)
        r["steps_ms"] = {k: (v - t_fail) * 1000 for k, v in steps.items() if v}
        r["recovery_ms"] = (t_last - t_fail) * 1000
        r["detect_ms"] = (t_fail - t_kill) * 1000
        r["restored_lines"] = restored
        if len(restored) != NODES:
            raise BenchError(f"{len(restored)} `rank R restored` line(s) after the failure, not {NODES}")
        r["restore_sources"] = [l for l in read(restarter.err).splitlines() if "restores from" in l]
        out_len = len(restarter.text()) if restarter is not job else len(job.text())

        # Every rank makes progress again (a new round: its pages are back).
        def progressed():
            t = (restarter.text())[out_len:]
            return ranks_saw(t, NODES, r"round \d+")

        wait_for(progressed, TIMEOUT_ROUND, "a `round` line of every rank after the recovery", restarter.proc,
                 restarter.err)
        r["progress_ms"] = (time.time() - t_fail) * 1000

        # The job must then end well, every rank's memory verified.
        stop.write_text("")
        code = wait_for(lambda: restarter.proc.poll() is not None and [restarter.proc.returncode], TIMEOUT_END,
                        "the end of the recovered job")[0]
        out = restarter.text()
        r["exit"] = code
        r["verified"] = ranks_saw(out, NODES, r"verified \d+ rounds, \d+ pages") and "MISMATCH" not in out
        r["mismatch"] = [l for l in out.splitlines() if "MISMATCH" in l]
        r["err_tail"] = read(restarter.err).splitlines()[-6:]
        return r
    except Refused:
        raise
    except BenchError as e:
        said = [l for j in jobs for l in read(j.err).splitlines() if l.startswith("mome:") and "mome: job " not in l]
        if jobs and jobs[0].proc.returncode == 2 and not jobs[0].jobid:
            raise Refused(str(e)) from e
        said = [l for l in said if l not in str(e)]
        raise BenchError(" ".join(str(e).split()) + ("; mome said: " + " | ".join(said) if said else "")) from e
    finally:
        for j in reversed(jobs):
            j.kill9()
        if KEEP_LOGS and jobs and jobs[0].jobid:
            dest = Path(KEEP_LOGS) / f"{scheme}-{mib}"
            n = 1
            while dest.exists():  # a retry: beside the first attempt's
                n += 1
                dest = Path(KEEP_LOGS) / f"{scheme}-{mib}-{n}"
            shutil.copytree(jobs[0].jobdir() / "logs", dest / "logs", dirs_exist_ok=True)
            for f in ("run.out", "run.err", "restart.out", "restart.err"):
                if (home / f).exists():
                    shutil.copy(home / f, dest / f)
        shutil.rmtree(home, ignore_errors=True)


def code_version():
    """The commit the binaries were built from, as far as git knows (the
    binaries are those of target/release at the start of the run)."""
    try:
        o = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=10)
        return o.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    u = os.uname()
    return f"{u.nodename}, {os.cpu_count()} cores (nproc), {mem:.0f} GiB RAM, {u.sysname} {u.release} {u.machine}"


def mem_available():
    m = re.search(r"^MemAvailable:\s+(\d+) kB", read("/proc/meminfo"), re.M)
    return int(m[1]) * 1024 if m else 0


def ensure_built():
    need = [BIN / b for b in ("mome-run", "mome-ckpt", "mome-restart", "mome-agent", "mome-keeper")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        print(f"missing {', '.join(missing)}: make build", flush=True)
        subprocess.run(["make", "-C", str(ROOT), "build"], check=True)


INSTALL = ("mome-run", "mome-ckpt", "mome-restart", "mome-status", "mome-agent", "mome-keeper", "mome-rankinit",
           "libmome_preload.so")


def snapshot_bin(tmp):
    """Copies the binaries into `tmp/bin` and uses them from there: a
    rebuild in target/release during the run (the workspace is shared)
    must not replace the agent or the preload under a running job."""
    global BIN
    dest = tmp / "bin"
    dest.mkdir()
    for name in INSTALL:
        if (BIN / name).exists():
            shutil.copy2(BIN / name, dest / name)
    BIN = dest


def fmt(v, spec=".0f", none="—"):
    return none if v is None else format(v, spec)


def summarize(r):
    """The figures of one cluster run."""
    a = r["agents"]
    own = {n: a[n].get("written") for n in a}
    copies = [a[n] for n in a if "copy_ms" in a[n] and a[n].get("written")]
    # Protected bytes per second: the node's own increment (mirror: what
    # each holder received; parity: what the node wrote) / the copy time;
    # on the wire: every byte sent (mirror: to each holder; parity: chunks).
    for f in copies:
        f["protected"] = f.get("copied", f["written"])
        f["wire"] = f["copied"] * len(f["holders"]) if "copied" in f else f.get("parity_sent", 0)
    dup = [f["protected"] / 1e6 / f["copy_ms"] for f in copies if f["copy_ms"] > 0]
    over = []
    for n, k in r.get("keepers", {}).items():
        if own.get(n):
            over.append(k["size"] / own[n])
    return {
        "pause_ms": r["ckpt"]["pause_us"] / 1000,
        "commit_ms": r["ckpt"]["commit_ms"],
        "written": r["ckpt"]["bytes_written"],
        "dup_min": min(dup) if dup else None,
        "dup_med": sorted(dup)[len(dup) // 2] if dup else None,
        "copy_ms": [f["copy_ms"] for f in copies],
        # Every node copies at once: all bytes on the wire / the longest copy.
        "wire_all": (sum(f["wire"] for f in copies) / 1e6 / max(f["copy_ms"] for f in copies))
        if copies and max(f["copy_ms"] for f in copies) > 0 else None,
        "over": (sum(over) / len(over)) if over else None,
        "over_max": max(over) if over else None,
        "keeper_bytes": sum(k["size"] for k in r.get("keepers", {}).values()),
        "disk_bytes": r["disk_store"]["size"],
        "node_pause_ms": [a[n].get("pause_us", 0) / 1000 for n in sorted(a)],
        "own_pause_ms": [a[n].get("own_pause_us", 0) / 1000 for n in sorted(a)],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="memory of each rank (MiB); 1024 for the issue's 1 GiB")
    ap.add_argument("--small-mib", type=int, default=64, help="second size, for the dependence of recovery on size")
    ap.add_argument("--schemes", default="mirror,disk,xor,rs")
    ap.add_argument("--round-ms", type=int, default=300)
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy each job's logs and output to DIR/SCHEME-MIB/")
    args = ap.parse_args()
    global KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    sizes = sorted({args.small_mib, args.mib})
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:
        if s not in SCHEMES:
            ap.error(f"unknown scheme {s} (known: {', '.join(SCHEMES)})")
    # Ranks' memory, 3 copies in the keepers, buffers: measured up to 4.6 x
    # the ranks' data in use until committed (mirror, 1 GiB per rank).
    need = NODES * max(sizes) * 2**20 * 4.7
    if mem_available() < need * 1.1:
        sys.stderr.write(f"bench/diskless.py: {max(sizes)} MiB per rank needs about {need / 2**30:.1f} GiB "
                         f"(ranks, 3 copies, buffers); {mem_available() / 2**30:.1f} GiB available\n")
        return 1

    t_start = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python3 bench/diskless.py" + "".join(f" {a}" for a in sys.argv[1:])
    version = code_version()
    ensure_built()
    tmp = Path(tempfile.mkdtemp(prefix="mome-bench-dl-build-"))
    results, single, skipped, failures = {}, {}, {}, []
    try:
        exes = build(tmp)
        exe = exes["dl-mem"]
        snapshot_bin(tmp)
        copies = 2
        stream1 = loopback(exes["tcp-stream"], 1, 1024)
        streams = loopback(exes["tcp-stream"], NODES * copies, 256)
        print(f"loopback TCP: 1 stream {stream1:.2f} GB/s, {NODES * copies} streams at once {streams:.2f} GB/s "
              f"in all", flush=True)
        for mib in sizes:
            s = single_run(exe, mib, args.round_ms)
            single[mib] = s
            print(f"1 node, 1 rank, {mib} MiB: pause {s['pause_us'] / 1000:.1f} ms, commit {s['commit_ms']} ms, "
                  f"{s['bytes_written'] / 2**20:.1f} MiB written", flush=True)
        for scheme in schemes:
            for mib in sizes:
                if scheme in skipped:
                    continue
                r = None
                for attempt in (1, 2):  # once more after a failure: the machine is shared
                    try:
                        r = cluster_run(exe, scheme, mib, args.round_ms)
                        break
                    except Refused as e:
                        skipped[scheme] = str(e)
                        print(f"{scheme}: skipped: {e}", flush=True)
                        break
                    except BenchError as e:
                        failures.append((scheme, mib, attempt, str(e)))
                        print(f"{scheme} {mib} MiB, attempt {attempt}: FAILED: {e}", flush=True)
                if r is None:
                    continue
                results[(scheme, mib)] = r
                s = summarize(r)
                print(f"{scheme:6s} {mib:5d} MiB: pause {s['pause_ms']:.1f} ms (per node "
                      f"{', '.join(f'{p:.1f}' for p in s['node_pause_ms'])}), commit {s['commit_ms']} ms, "
                      f"dup {fmt(s['dup_med'], '.2f')} GB/s/node (copy ms {s['copy_ms']}), keeper/own "
                      f"{fmt(s['over'], '.2f')}, recovery {r['recovery_ms']:.0f} ms (detect {r['detect_ms']:.0f} ms,"
                      f" until running {r['restart_until_running_ms']} ms), exit {r['exit']}, "
                      f"verified {r['verified']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    big, small = max(sizes), min(sizes)
    lines = [
        f"## {date} — {TITLE}",
        "",
        f"Machine: {machine()}. Code: {version} (target/release at the start). Command: `{command}` "
        "(part of `make bench` with `--mib 128 --small-mib 32`), one job per line "
        f"({elapsed:.0f} s in all). Each job: `mome-run -n 4 --nodes 4` (4 simulated nodes on loopback, one rank each) "
        f"of dl-mem (embedded in bench/diskless.py: every page of MIB MiB written with incompressible data, then "
        f"each {args.round_ms} ms round rewrites another tenth of the pages); `mome-ckpt --json` once every rank "
        "printed `round 1` (the whole memory dirty); then kill -9 of node 1's keeper and agent; then a stop file, "
        "and each rank checks every word of its memory (`verified`) before the job ends.",
        "",
        f"Loopback TCP on this machine, same run (tcp-stream, embedded: 1 MiB writes): one stream {stream1:.2f} GB/s; "
        f"{NODES * copies} streams at once (4 nodes x 2 holders) {streams:.2f} GB/s in all.",
        "",
        "Columns: pause = `pause_us` of mome-ckpt (the longest any rank stayed parked, over all nodes); 1-node "
        "pause = the same checkpoint of one rank of the same size alone (`mome-run --nodes 1 -n 1`, disk store), "
        "same run; commit = `commit_ms` (command to committed); dup GB/s = per node, bytes each holder received / "
        "copy time, from `checkpoint S: B bytes copied to node(s) [..] in M ms` in logs/agent-N.log (median and "
        "slowest node; the wire carries B x holders; for xor/rs: the node's increment (`durable, ... B bytes written`) "
        "/ M of `B' bytes of chunks sent to the parity holders of group [..] in M ms`); wire GB/s, all nodes = every "
        "node's bytes sent (B x holders, or B') / the longest copy (the 4 nodes copy at once, on the same 2 cores and loopback); keeper / own = bytes in a node's keeper tmpfs / the node's own "
        "increment (mean of the 4 nodes); recovery = coordinator.log time of `mome: node 1 failed` to the last "
        "`rank R restored` line of the next incarnation; progress = until every rank printed a new `round` "
        f"(its pages fetched back; includes up to one {args.round_ms} ms sleep); end = exit status of the recovered "
        "job and the memory check.",
        "",
        "| scheme | MiB / rank | pause (ms) | 1-node pause (ms) | commit (ms) | 1-node commit (ms) | written (MiB) "
        "| dup GB/s / node (median, slowest) | wire GB/s, all nodes | keeper / own | detect (ms) | recovery (ms) "
        "| restart until running (ms) | progress (ms) | end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (scheme, mib), r in results.items():
        s = summarize(r)
        end = f"exit {r['exit']}, " + ("verified" if r["verified"] else "**not verified**")
        rec = f"{r['recovery_ms']:.0f}" + (" (incl. mome-restart)" if r.get("manual_restart") else "")
        keeper = fmt(s["over"], ".2f") if scheme != "disk" else f"— ({s['disk_bytes'] / 2**20:.0f} MiB on disk)"
        lines.append(
            f"| {scheme} | {mib} | {s['pause_ms']:.1f} | {single[mib]['pause_us'] / 1000:.1f} | {s['commit_ms']} | "
            f"{single[mib]['commit_ms']} | {s['written'] / 2**20:.0f} | {fmt(s['dup_med'], '.2f')}, "
            f"{fmt(s['dup_min'], '.2f')} | {fmt(s['wire_all'], '.2f')} | {keeper} | "
            f"{r['detect_ms']:.0f} | {rec} | {r['restart_until_running_ms']} | {r['progress_ms']:.0f} | {end} |")
    lines += ["", "Per node (node 0..3): pause each node reports (`ranks resumed after`); of it, the work after "
              "the last local rank parked (`us from the last rank parked to resume`); copy time; and the steps of "
              "the recovery in coordinator.log (old incarnation `job ended`, new `incarnation` line, `started N "
              "rank(s)`); memory = the machine's MemAvailable before the job minus its lowest until the stamp is "
              "committed (sampled every 20 ms; other processes count too, so only figures above 1 GiB mean "
              "anything):", ""]
    for (scheme, mib), r in results.items():
        s = summarize(r)
        lines.append(f"- {scheme} {mib} MiB: pause {', '.join(f'{p:.1f}' for p in s['node_pause_ms'])} ms; "
                     f"after parking {', '.join(f'{p:.1f}' for p in s['own_pause_ms'])} ms; copies "
                     f"{', '.join(str(x) for x in s['copy_ms']) or '—'} ms; "
                     "recovery steps from `node 1 failed`: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in r.get("steps_ms", {}).items())
                     + f", last rank restored {r['recovery_ms']:.0f} ms; memory: "
                     + (f"{r['peak_mem'] / 2**30:.1f} GiB in use until committed "
                        f"({r['peak_mem'] / (NODES * mib * 2**20):.1f} x the ranks' data)" if r["peak_mem"] >= 2**30
                        else "below 1 GiB (within the noise)"))
    for (scheme, mib), r in results.items():
        s = summarize(r)
        if scheme in EXPECTED_OVERHEAD and s["over"] is not None:
            lines.append(f"- {scheme} {mib} MiB: keeper / own {s['over']:.2f}, the scheme's own figure is "
                         f"{EXPECTED_OVERHEAD[scheme]:.2f} ({SCHEME_TEXT[scheme]})"
                         + ("" if abs(s["over"] - EXPECTED_OVERHEAD[scheme]) < 0.1 else
                            ": every member keeps whole copies of the others' increments, not parity"
                            if s["over"] > EXPECTED_OVERHEAD[scheme] else ""))
    for scheme, why in skipped.items():
        lines.append(f"- {scheme}: skipped: {' '.join(why.split())}")
    if failures:
        lines += ["", "Failed runs (each is retried once):", ""]
        for scheme, mib, attempt, why in failures:
            lines.append(f"- {scheme} {mib} MiB, attempt {attempt}: {' '.join(why.split())}")

    # Targets.
    mirror = {mib: results.get(("mirror", mib)) for mib in sizes}
    checks = []
    dups = [summarize(r)["dup_min"] for r in mirror.values() if r and summarize(r)["dup_min"] is not None]
    wires = [summarize(r)["wire_all"] for r in mirror.values() if r and summarize(r)["wire_all"]]
    checks.append(("duplication >= 1 GB/s per node on loopback (mirror, slowest node)",
                   bool(dups) and min(dups) >= 1,
                   ", ".join(f"{summarize(r)['dup_min']:.2f} GB/s at {m} MiB" for m, r in mirror.items()
                             if r and summarize(r)['dup_min'] is not None)
                   + f"; all nodes' copies together {', '.join(f'{w:.2f}' for w in wires)} GB/s on the wire, against "
                   f"{streams:.2f} GB/s for {NODES * copies} plain TCP streams at once on this machine's loopback "
                   f"({stream1:.2f} GB/s for one): with {NODES} simulated nodes sharing {os.cpu_count()} cores, "
                   f"the most each node could reach is about {streams / (NODES * copies):.2f} GB/s"))
    recs = {m: r["recovery_ms"] for m, r in mirror.items() if r}
    checks.append(("recovery until running <= 1 s (mirror)", bool(recs) and max(recs.values()) <= 1000,
                   ", ".join(f"{v:.0f} ms at {m} MiB" for m, v in recs.items())))
    if len(recs) == 2:
        checks.append((f"recovery independent of memory size ({small} to {big} MiB)",
                       recs[big] <= 1.5 * recs[small] + 50,
                       f"{recs[big] / recs[small]:.2f} x from {small} to {big} MiB; of it, ending the failed "
                       "incarnation (`node 1 failed` to `job ended`) "
                       + " vs ".join(f"{mirror[m]['steps_ms'].get('ended', float('nan')):.0f} ms" for m in (small, big))
                       + ", the new incarnation until every rank restored "
                       + " vs ".join(f"{mirror[m]['recovery_ms'] - mirror[m]['steps_ms'].get('incarnation', float('nan')):.0f} ms"
                                     for m in (small, big))))
    pauses = {m: (summarize(r)["pause_ms"], single[m]["pause_us"] / 1000) for m, r in mirror.items() if r}
    checks.append(("pause unchanged from the single-node figure (mirror; within 2 x + 2 ms)",
                   bool(pauses) and all(p <= 2 * s1 + 2 for p, s1 in pauses.values()),
                   ", ".join(f"{p:.1f} ms vs {s1:.1f} ms at {m} MiB" for m, (p, s1) in pauses.items())))
    commits = {m: r["ckpt"]["commit_ms"] for m, r in mirror.items() if r}
    if commits:
        checks.append(("durable with 2 remote copies <= 1.5 s for 1 GiB per rank (mirror commit)",
                       big >= 1024 and commits.get(big, 1e9) <= 1500 if big >= 1024 else None,
                       ", ".join(f"{v} ms at {m} MiB" for m, v in commits.items())
                       + ("" if big >= 1024 else " (not run at 1 GiB: `--mib 1024`)")))
    ends = [(k, r) for k, r in results.items()]
    checks.append(("every recovered job ends with status 0 and its memory verified",
                   all(r["exit"] == 0 and r["verified"] for _, r in ends),
                   ", ".join(f"{k[0]} {k[1]} MiB: exit {r['exit']}{'' if r['verified'] else ' not verified'}"
                             for k, r in ends)))
    lines += ["", "Targets (issue 5):", ""]
    if failures:
        checks.append(("every job ran to its end", False,
                       f"{len(failures)} failed run(s), listed above"))
    for name, ok, detail in checks:
        verdict = "not measured" if ok is None else "met" if ok else "**not met**"
        lines.append(f"- {name}: {verdict} ({detail})")
    lines.append("")
    text = "\n".join(lines)
    if not args.no_record:
        old = read(RESULTS)
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)
    print()
    print(text)
    if not args.no_record:
        print(f"recorded in {RESULTS.relative_to(ROOT)}")
    # Raw figures for the curious (not recorded).
    dump = Path(tempfile.gettempdir()) / "mome-bench-diskless.json"
    dump.write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in results.items()}, indent=1, default=str))
    print(f"raw figures: {dump}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        sys.stderr.write(f"bench/diskless.py: {e}\n")
        sys.exit(1)
