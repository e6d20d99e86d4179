//! Files of a job directory, `$MOME_HOME/jobs/<jobid>/` (default `~/.mome`):
//!
//! ```text
//! job.yaml          what was launched (JobSpec): command, argv, env, cwd, ranks, nodes, config
//! status.json       live and final state (JobStatus), rewritten atomically by mome-run
//! control.sock      mome-run's control socket (JSON lines, ControlRequest -> ControlReply)
//! node-<k>.sock     agent k's socket for its ranks
//! logs/agent-<k>.log, logs/coordinator.log
//! ```
//! The directory is 0700 and its files 0600: they hold the job's environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {id} in {home} (mome-status lists the jobs)")]
    UnknownJob { id: String, home: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot find the home directory for job files: set MOME_HOME")]
    NoHome,
}

/// `$MOME_HOME`, else `~/.mome`.
pub fn mome_home() -> Result<PathBuf, JobError> {
    if let Some(h) = std::env::var_os(crate::env::HOME).filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".mome"))
        .ok_or(JobError::NoHome)
}

/// Paths inside one job directory.
#[derive(Debug, Clone)]
pub struct JobDir {
    pub id: String,
    pub path: PathBuf,
}

impl JobDir {
    pub fn new(home: &Path, id: &str) -> JobDir {
        JobDir {
            id: id.to_string(),
            path: home.join("jobs").join(id),
        }
    }

    /// An existing job, or the error that names the id.
    pub fn open(home: &Path, id: &str) -> Result<JobDir, JobError> {
        let dir = JobDir::new(home, id);
        let valid = !id.is_empty() && !id.contains('/') && id != "." && id != "..";
        if !valid || !dir.spec_path().is_file() {
            return Err(JobError::UnknownJob {
                id: id.to_string(),
                home: home.display().to_string(),
            });
        }
        Ok(dir)
    }

    pub fn spec_path(&self) -> PathBuf {
        self.path.join("job.yaml")
    }
    pub fn status_path(&self) -> PathBuf {
        self.path.join("status.json")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }
    pub fn agent_socket(&self, node: u32) -> PathBuf {
        self.path.join(format!("node-{node}.sock"))
    }
    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }
    pub fn agent_log(&self, node: u32) -> PathBuf {
        self.logs().join(format!("agent-{node}.log"))
    }
    pub fn coordinator_log(&self) -> PathBuf {
        self.logs().join("coordinator.log")
    }

    pub fn read_spec(&self) -> Result<JobSpec, JobError> {
        let path = self.spec_path();
        let text = std::fs::read_to_string(&path).map_err(|source| JobError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|e| JobError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn read_status(&self) -> Result<JobStatus, JobError> {
        let path = self.status_path();
        let text = std::fs::read_to_string(&path).map_err(|source| JobError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| JobError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn write_spec(&self, spec: &JobSpec) -> Result<(), JobError> {
        let text = serde_yaml_ng::to_string(spec).expect("a JobSpec always serializes");
        write_private_atomic(&self.spec_path(), text.as_bytes())
    }

    pub fn write_status(&self, status: &JobStatus) -> Result<(), JobError> {
        let text = serde_json::to_string_pretty(status).expect("a JobStatus always serializes");
        write_private_atomic(&self.status_path(), text.as_bytes())
    }
}

/// Writes a 0600 file through a temporary name and a rename, so readers see
/// the old or the new content, never a torn one.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> Result<(), JobError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| JobError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// What was launched: enough to relaunch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    /// Absolute path of the executable that was started.
    pub command: PathBuf,
    /// Full argv, argv[0] included, as given on the command line.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub ranks: u32,
    pub nodes: u32,
    /// Start time, RFC 3339.
    pub started: String,
    pub config: Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Starting,
    Running,
    /// Every rank exited 0.
    Finished,
    /// A rank failed, or the job was interrupted.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "value")]
pub enum ProcessState {
    Starting,
    Running,
    Exited(i32),
    Killed(i32),
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessState::Starting => write!(f, "starting"),
            ProcessState::Running => write!(f, "running"),
            ProcessState::Exited(c) => write!(f, "exited({c})"),
            ProcessState::Killed(s) => write!(f, "killed({})", signal_name(*s)),
        }
    }
}

/// `SIGSEGV` for 11, `signal 77` for a number libc does not name.
pub fn signal_name(sig: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string
    // that stays valid until the next call in this thread; we copy it at once.
    let abbrev = unsafe {
        let p = libc::strsignal(sig);
        if p.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    };
    const NAMES: [(i32, &str); 14] = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
    ];
    match NAMES.iter().find(|(n, _)| *n == sig) {
        Some((_, name)) => name.to_string(),
        None => abbrev.map_or(format!("signal {sig}"), |a| format!("signal {sig} ({a})")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankStatus {
    pub rank: u32,
    pub node: u32,
    pub pid: Option<i32>,
    #[serde(flatten)]
    pub state: ProcessState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: u32,
    pub pid: Option<i32>,
    #[serde(flatten)]
    pub state: ProcessState,
}

/// Live and final state of a job, kept in status.json and served on the
/// control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    /// Pid of the mome-run that coordinates the job.
    pub coordinator_pid: i32,
    pub ranks: Vec<RankStatus>,
    pub agents: Vec<AgentStatus>,
    /// Job exit status once ended.
    pub exit_code: Option<i32>,
    /// Why the job ended, when it did not end on its own.
    pub reason: Option<String>,
    /// End time, RFC 3339.
    pub ended: Option<String>,
}

/// Requests on the control socket: one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum ControlRequest {
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum ControlReply {
    Status(JobStatus),
    Error { message: String },
}

/// A new job id: UTC date and time, then 4 random hex digits, e.g.
/// `20261122-001805-3fa2`. Sorts by start time.
pub fn new_job_id() -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(now).to_string(); // 2026-11-22T00:18:05Z
    let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut random = [0u8; 2];
    // SAFETY: getrandom writes at most `random.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if got != random.len() as isize {
        let nanos = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        random = [(nanos >> 8) as u8, nanos as u8];
    }
    format!(
        "{}-{}-{:02x}{:02x}",
        &digits[..8],
        &digits[8..14],
        random[0],
        random[1]
    )
}

/// Current time, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_shape() {
        let id = new_job_id();
        assert_eq!(id.len(), 20, "{id}");
        assert_eq!(&id[8..9], "-");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    }

    #[test]
    fn unknown_job_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("mome-proto-test-{}", std::process::id()));
        let e = JobDir::open(&dir, "nope").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        assert!(JobDir::open(&dir, "../x").is_err());
    }

    #[test]
    fn status_round_trip() {
        let s = JobStatus {
            id: "x".into(),
            state: JobState::Running,
            coordinator_pid: 1,
            ranks: vec![RankStatus {
                rank: 0,
                node: 0,
                pid: Some(5),
                state: ProcessState::Killed(9),
            }],
            agents: vec![],
            exit_code: None,
            reason: None,
            ended: None,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JobStatus>(&j).unwrap(), s);
        assert_eq!(ProcessState::Killed(9).to_string(), "killed(SIGKILL)");
    }
}
