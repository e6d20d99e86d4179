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
