//! Test harness for mome-run and mome-status run as real processes: a
//! private MOME_HOME, a fake agent (a shell script that says `ready` and
//! waits for EOF) and an empty preload library, so these tests depend on
//! neither the real agent nor the real preload library.

#![allow(dead_code)] // each test binary uses a different part of it

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mome_protocol::job::{JobDir, JobState, JobStatus};

pub const MOME_RUN: &str = env!("CARGO_BIN_EXE_mome-run");
pub const MOME_STATUS: &str = env!("CARGO_BIN_EXE_mome-status");

/// Every test process is bounded by this: a hang fails the test instead of
/// blocking the suite.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub agent: PathBuf,
    pub preload: PathBuf,
}

/// The fake agent: announces readiness, then lives until its stdin closes.
pub const FAKE_AGENT: &str = "#!/bin/sh\necho ready\nexec cat >/dev/null\n";

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let agent = dir.path().join("fake-agent");
        write_script(&agent, FAKE_AGENT);
        let preload = empty_library(dir.path());
        TestEnv {
            dir,
            home,
            agent,
            preload,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a config file and returns its path.
    pub fn config(&self, yaml: &str) -> PathBuf {
        let path = self.path("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// `mome-run` with this environment's home, agent and preload.
    pub fn mome_run(&self) -> Command {
        let mut cmd = Command::new(MOME_RUN);
        cmd.env("MOME_HOME", &self.home)
            .env("MOME_AGENT_BIN", &self.agent)
            .env("MOME_PRELOAD_LIB", &self.preload)
            .env_remove("LD_PRELOAD")
            .current_dir(self.dir.path());
        cmd
    }

    pub fn mome_status(&self) -> Command {
        let mut cmd = Command::new(MOME_STATUS);
        cmd.env("MOME_HOME", &self.home);
        cmd
    }

    pub fn job_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = match std::fs::read_dir(self.home.join("jobs")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        ids.sort();
        ids
    }

    /// The job directory of the only job run so far.
    pub fn only_job(&self) -> JobDir {
        let ids = self.job_ids();
        assert_eq!(ids.len(), 1, "expected exactly one job, found {ids:?}");
        JobDir::new(&self.home, &ids[0])
    }
}

pub fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A shared library with nothing in it, for LD_PRELOAD; libc itself (already
/// loaded by every dynamic program, so preloading it changes nothing) when
/// no C compiler is installed.
fn empty_library(dir: &Path) -> PathBuf {
    let path = dir.join("libempty.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-x", "c", "/dev/null", "-o"])
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if built {
        return path;
    }
    for libc in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/lib64/libc.so.6",
    ] {
        if Path::new(libc).exists() {
            return PathBuf::from(libc);
        }
    }
    panic!("no C compiler to build an empty library, and no libc.so.6 to preload instead");
}

/// What a finished process left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `cmd` to the end with `input` on its stdin, bounded by TEST_TIMEOUT.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Finished {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let finished = wait_output(child, start);
    writer.join().unwrap();
    finished
}

/// Runs `cmd` to the end with stdin on /dev/null.
pub fn run(cmd: &mut Command) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().unwrap();
    wait_output(child, start)
}

/// Collects a spawned child's piped stdout/stderr (those not taken yet)
/// until it exits.
pub fn wait_output(mut child: Child, start: Instant) -> Finished {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut out) = out {
            let _ = out.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut err) = err {
            let _ = err.read_to_end(&mut buf);
        }
        buf
    });
    let status = wait_bounded(&mut child, TEST_TIMEOUT);
    let elapsed = start.elapsed();
    Finished {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
        elapsed,
    }
}

/// Waits for `child`, killing it and failing the test after `timeout`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not finish within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls status.json until `ready` accepts it (bounded).
pub fn wait_for_status(job: &JobDir, what: &str, ready: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(status) = job.read_status() {
            if ready(&status) {
                return status;
            }
        }
        assert!(Instant::now() < deadline, "status.json never showed {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the job directory exists and its ranks all run.
pub fn wait_until_running(env: &TestEnv) -> (JobDir, JobStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.job_ids().is_empty() {
        assert!(Instant::now() < deadline, "no job directory appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let job = env.only_job();
    let status = wait_for_status(&job, "every rank running", |s| {
        s.state == JobState::Running && s.ranks.iter().all(|r| r.pid.is_some())
    });
    (job, status)
}

/// Whether a process (or, with a negative number, a process group) still
/// exists, zombies excluded.
pub fn exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return false;
    }
    if pid > 0 {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
                return !rest.trim_start().starts_with('Z');
            }
        }
    }
    true
}

/// Asserts that none of `pids` (nor the group `pgid`) exists any more.
pub fn assert_all_gone(pids: &[i32], pgid: Option<i32>) {
    // Reparented orphans may need a moment to be reaped by init.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| exists(p)).collect();
        let group_left = pgid.is_some_and(|g| exists(-g) && group_has_live_member(g));
        if left.is_empty() && !group_left {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {left:?}, group {pgid:?} alive: {group_left}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether some non-zombie process is in group `pgid` (kill(-pgid, 0)
/// also counts zombies waiting for their reaper).
fn group_has_live_member(pgid: i32) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                    return false;
                };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.len() > 3 && fields[0] != "Z" && fields[3] == pgid.to_string()
            })
        })
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill takes two integers.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// Reads a pid written by a test program into a file, waiting for it.
pub fn read_pid_file(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never got a pid",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
