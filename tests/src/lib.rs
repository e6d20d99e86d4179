//! Harness for mome's end-to-end tests: finds the built binaries, runs
//! programs natively and under `mome-run`, compiles the small C probes of
//! `tests/c/`, and checks that no process of a job is left behind.
//!
//! The binaries are the release build (`make build`); `MOME_BIN_DIR` and
//! `MOME_APPS_DIR` override where they are looked for.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn bin_dir() -> PathBuf {
    std::env::var_os("MOME_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release"))
}

pub fn apps_dir() -> PathBuf {
    std::env::var_os("MOME_APPS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("test-apps/build"))
}

fn must_exist(p: PathBuf) -> PathBuf {
    assert!(
        p.exists(),
        "{} is missing: run `make build` first (the tests use the release build)",
        p.display()
    );
    p
}

pub fn mome_run() -> PathBuf {
    must_exist(bin_dir().join("mome-run"))
}

pub fn mome_status() -> PathBuf {
    must_exist(bin_dir().join("mome-status"))
}

pub fn app(name: &str) -> PathBuf {
    must_exist(apps_dir().join(name))
}

/// A private MOME_HOME for one test.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::Builder::new()
                .prefix("mome-home")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `mome-run ARGS...` with this home, stdin closed.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(mome_run());
        c.args(args).env("MOME_HOME", self.path());
        c
    }

    pub fn status(&self, args: &[&str]) -> Output {
        Command::new(mome_status())
            .args(args)
            .env("MOME_HOME", self.path())
            .output()
            .unwrap()
    }

    /// Ids of the jobs in this home.
    pub fn jobs(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.path().join("jobs"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Final status.json of the only job.
    pub fn last_status(&self) -> serde_json::Value {
        let id = self.jobs().pop().expect("a job");
        let text =
            std::fs::read_to_string(self.path().join("jobs").join(id).join("status.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Asserts that no pid recorded in the last job's status is alive.
    pub fn assert_nothing_left(&self) {
        let status = self.last_status();
        let mut pids = vec![];
        for list in ["ranks", "agents"] {
            for p in status[list].as_array().unwrap() {
                if let Some(pid) = p["pid"].as_i64() {
                    pids.push(pid as i32);
                }
            }
        }
        for pid in pids {
            assert!(!alive(pid), "process {pid} of the job is still alive");
        }
    }
}

impl Default for Home {
    fn default() -> Self {
        Home::new()
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Panics with both streams when `o` did not exit 0.
pub fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The `checksum NAME VALUE` line of an output.
pub fn checksum_line(out: &str) -> String {
    out.lines()
        .filter(|l| {
            let l = l.trim_start_matches(|c: char| {
                c == '[' || c.is_ascii_digit() || c == ']' || c == ' '
            });
            l.starts_with("checksum ")
        })
        .map(|l| l[l.find("checksum ").unwrap()..].to_string())
        .next_back()
        .unwrap_or_else(|| panic!("no checksum line in:\n{out}"))
}

/// Compiles `tests/c/NAME.c` once per test binary; returns the executable.
pub fn probe(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("mome-probes")
            .tempdir()
            .unwrap()
    });
    // Tests of one binary run in parallel threads: one compiles, the others
    // wait for it (they must never run a half-written executable).
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
    let exe = dir.path().join(name);
    if !exe.exists() {
        let src = workspace().join("tests/c").join(format!("{name}.c"));
        let include = workspace().join("preload/include");
        let o = Command::new("cc")
            .args(["-O1", "-Wall", "-o"])
            .arg(&exe)
            .arg(&src)
            .arg("-I")
            .arg(&include)
            .arg("-L")
            .arg(bin_dir())
            .arg(format!("-Wl,-rpath,{}", bin_dir().display()))
            .args(["-lmome", "-lpthread"])
            .output()
            .unwrap();
        assert_ok(&o, &format!("compiling {}", src.display()));
    }
    exe
}

pub fn native(program: &Path, args: &[&str], stdin: Option<&Path>) -> Output {
    let mut c = Command::new(program);
    c.args(args);
    match stdin {
        Some(p) => c.stdin(std::fs::File::open(p).unwrap()),
        None => c.stdin(Stdio::null()),
    };
    c.output().unwrap()
}

pub fn mome_ckpt() -> PathBuf {
    must_exist(bin_dir().join("mome-ckpt"))
}

pub fn mome_restart() -> PathBuf {
    must_exist(bin_dir().join("mome-restart"))
}

/// A job started in the background, its stdout and stderr going to files,
/// so that a test can checkpoint it, kill it and restart it.
pub struct BackgroundJob {
    pub child: std::process::Child,
    pub id: String,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Home {
    /// Starts `mome-run ARGS...` (or `mome-restart` when `restart`) in the
    /// background; returns once the job id is known.
    pub fn start(&self, args: &[&str], tag: &str) -> BackgroundJob {
        self.start_with_env(args, &[], tag)
    }

    /// Runs `mome-run ARGS` with `env` to its end: (success, stdout,
    /// stderr). A job still running after `timeout` is a hang: killed, and
    /// the test fails saying `what`.
    pub fn run_to_end(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        what: &str,
        timeout: std::time::Duration,
    ) -> (bool, String, String) {
        let mut job = self.start_with_env(args, env, "job");
        let start = std::time::Instant::now();
        let exit = loop {
            if let Some(s) = job.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                job.kill9(self);
                panic!(
                    "{what} did not end in {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    job.stdout(),
                    job.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        (exit.success(), job.stdout(), job.stderr())
    }

    /// The agents' logs of job `id` (of every job of this home when
    /// `None`), concatenated.
    pub fn agent_logs(&self, id: Option<&str>) -> String {
        let ids = match id {
            Some(id) => vec![id.to_string()],
            None => self.jobs(),
        };
        let mut all = String::new();
        for id in ids {
            let dir = self.path().join("jobs").join(id).join("logs");
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("agent") {
                    all += &std::fs::read_to_string(e.path()).unwrap_or_default();
                }
            }
        }
        all
    }

    /// The same, with extra environment variables for mome-run (which
    /// passes its environment on to the ranks).
    pub fn start_with_env(&self, args: &[&str], env: &[(&str, &str)], tag: &str) -> BackgroundJob {
        let out = self.path().join(format!("{tag}.out"));
        let err = self.path().join(format!("{tag}.err"));
        let idfile = self.path().join(format!("{tag}.id"));
        let mut c = Command::new(mome_run());
        c.arg("--jobid-file").arg(&idfile).args(args);
        c.envs(env.iter().copied());
        let child = self.spawn_logged(c, &out, &err);
        let id = wait_for(
            || {
                std::fs::read_to_string(&idfile)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            },
            20,
            "the job id file",
        );
        BackgroundJob {
            child,
            id,
            out,
            err,
        }
    }

    /// `mome-restart ARGS...` in the background.
    pub fn start_restart(&self, id: &str, extra: &[&str], tag: &str) -> BackgroundJob {
        let out = self.path().join(format!("{tag}.out"));
        let err = self.path().join(format!("{tag}.err"));
        let mut c = Command::new(mome_restart());
        c.arg(id).args(extra);
        let child = self.spawn_logged(c, &out, &err);
        BackgroundJob {
            child,
            id: id.to_string(),
            out,
            err,
        }
    }

    fn spawn_logged(&self, mut c: Command, out: &Path, err: &Path) -> std::process::Child {
        c.env("MOME_HOME", self.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(err).unwrap());
        // Its own process group, so that the test can kill the whole job.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c.spawn().unwrap()
    }

    /// `mome-ckpt ID --json`; the parsed JSON on success, the whole output
    /// as the error otherwise.
    pub fn ckpt(&self, id: &str) -> Result<serde_json::Value, String> {
        let o = Command::new(mome_ckpt())
            .arg(id)
            .arg("--json")
            .env("MOME_HOME", self.path())
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(format!("{:?}\n{}\n{}", o.status, stdout(&o), stderr(&o)));
        }
        serde_json::from_str(stdout(&o).trim())
            .map_err(|e| format!("bad JSON from mome-ckpt ({e}): {}", stdout(&o)))
    }

    /// `mome-restart ID ARGS...` in the foreground.
    pub fn restart(&self, id: &str, extra: &[&str]) -> Output {
        Command::new(mome_restart())
            .arg(id)
            .args(extra)
            .env("MOME_HOME", self.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl BackgroundJob {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until the job's stdout has a line containing `text`; on a
    /// timeout the panic shows what the job printed on both streams.
    pub fn wait_output(&self, text: &str, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !self.stdout().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {secs} s waiting for {text:?} in the output of job {}\nstdout:\n{}\nstderr:\n{}",
                self.id,
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Kills mome-run and everything of the job with SIGKILL, the way a
    /// crash would, and waits for mome-run.
    pub fn kill9(&mut self, home: &Home) {
        // The ranks and the agent first (each is in its own process group),
        // then mome-run itself.
        let status = home.path().join("jobs").join(&self.id).join("status.json");
        if let Ok(text) = std::fs::read_to_string(status) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                for list in ["ranks", "agents"] {
                    for p in v[list].as_array().cloned().unwrap_or_default() {
                        if let Some(pid) = p["pid"].as_i64() {
                            // SAFETY: kill has no memory-safety preconditions.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
        // SAFETY: as above; negative pid: mome-run's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "job {} did not end within {secs} s\nstdout:\n{}\nstderr:\n{}",
                    self.id,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Polls `f` every 10 ms for up to `secs` seconds.
pub fn wait_for<T>(mut f: impl FnMut() -> Option<T>, secs: u64, what: &str) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
