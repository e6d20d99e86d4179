//! Files of a job directory, `$MOME_HOME/jobs/<jobid>/` (default `~/.mome`):
//!
//! ```text
//! job.yaml          what was launched (JobSpec): command, argv, env, cwd, ranks, nodes, config
//! status.json       live and final state (JobStatus), rewritten atomically by mome-run
//! control.sock      mome-run's control socket (JSON lines, ControlRequest -> ControlReply)
//! node-<k>.sock     agent k's socket for its ranks
//! secret            multi-node jobs: 32 random bytes, hex, that every agent
//!                   proves to its peers (the file is the only copy)
//! logs/agent-<k>.log, logs/coordinator.log
//! ```
//! The directory is 0700 and its files 0600: they hold the job's environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ckpt::Stamp;
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
    #[error("cannot draw the job's secret from the kernel (getrandom): {0}")]
    Random(std::io::Error),
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
    /// The job's secret (multi-node jobs): what the agents authenticate
    /// their connections with.
    pub fn secret_path(&self) -> PathBuf {
        self.path.join("secret")
    }

    /// Writes a fresh secret: 32 bytes from getrandom, hex encoded, then a
    /// newline, in a 0600 file. No weaker source replaces getrandom: a
    /// guessable secret would let anyone on the network into the job's
    /// memory.
    pub fn write_secret(&self) -> Result<(), JobError> {
        let mut bytes = [0u8; SECRET_BYTES];
        fill_random(&mut bytes).map_err(JobError::Random)?;
        let mut text = String::with_capacity(2 * SECRET_BYTES + 1);
        for b in bytes {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
        write_private_atomic(&self.secret_path(), text.as_bytes())
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

/// Bytes of a job's secret (written as twice as many hex digits).
pub const SECRET_BYTES: usize = 32;

/// Fills `buf` from the kernel's random pool, blocking until it is
/// initialized (early boot only).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid writable memory of that length.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += got as usize;
    }
    Ok(())
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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    /// The effective configuration; `checkpoint.dir` is the resolved store
    /// root (absolute) once mome-run has started the job.
    pub config: Config,
    /// Whether each rank runs in a pid namespace of its own at a pinned pid
    /// (`100 + rank`), the same after a restart.
    #[serde(default)]
    pub pids_pinned: bool,
    /// Why pids are not pinned (checkpoint.pid_namespace, or what the
    /// probe found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_note: Option<String>,
    /// xxh3-64 of the file `command` when the job was launched: a restart
    /// refuses a program that changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_xxh3: Option<u64>,
    /// 0 for the first run, then one more at each mome-restart.
    #[serde(default)]
    pub incarnation: u32,
    /// The stamp this incarnation was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<Stamp>,
    /// The node of each rank (index: rank), as `nodes.placement` (or
    /// `--placement`) put them; empty in job files written before
    /// multi-node jobs, whose ranks all ran on node 0.
    #[serde(default)]
    pub placement: Vec<u32>,
}

impl JobSpec {
    /// The node of each rank: the recorded placement, or node 0 for all
    /// of them in an older job file.
    pub fn node_of_ranks(&self) -> Vec<u32> {
        if self.placement.len() == self.ranks as usize {
            self.placement.clone()
        } else {
            vec![0; self.ranks as usize]
        }
    }
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
    /// The ranks placed on this node (empty in status files written
    /// before multi-node jobs: then every rank).
    #[serde(default)]
    pub ranks: Vec<u32>,
    /// Multi-node jobs: the address the agent listens on for its peers,
    /// once it announced it (`ready <ip:port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Why this node is considered failed (its agent died, or a peer
    /// reported it), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Diskless checkpoints: the node's memory store (its keeper's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Diskless checkpoints: the nodes that hold a copy of this node's
    /// increments (mirror), or the other members of its parity group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<u32>,
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
    /// The incarnation running (0: first run; see [`JobSpec::incarnation`]).
    #[serde(default)]
    pub incarnation: u32,
    /// Checkpoints committed by this incarnation, oldest first (pruned
    /// stamps included: this is a history, the store holds what is kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointDone>,
    /// The checkpoint in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointing: Option<Stamp>,
}

/// Requests on the control socket: one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Answered by one `Status` reply.
    Status,
    /// Take a checkpoint now. Answered by any number of `CkptProgress`
    /// lines, then one `Checkpoint` (committed) or `Error` line.
    Checkpoint {
        /// Give up (and abort the checkpoint) after this long; default
        /// checkpoint.timeout of the job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

/// Replies on the control socket: one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    Status(JobStatus),
    /// Progress of the checkpoint requested on this connection.
    CkptProgress(CkptProgress),
    /// The checkpoint requested on this connection is committed.
    Checkpoint(CheckpointDone),
    Error {
        message: String,
    },
}

impl ControlReply {
    /// Whether this line ends the answer to a request (progress does not).
    pub fn is_final(&self) -> bool {
        !matches!(self, ControlReply::CkptProgress(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CkptProgress {
    pub stamp: Stamp,
    /// "precopy", "pause", "write", "sync" (the agent's phases), then
    /// "commit" for the manifest.
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A committed checkpoint, as the coordinator measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDone {
    pub stamp: Stamp,
    /// Commit time, RFC 3339.
    pub created: String,
    /// The previous committed stamp the increment was taken against.
    pub parent: Option<Stamp>,
    /// Longest time a rank was stopped, microseconds.
    pub pause_us: u64,
    /// Pages copied while the ranks were stopped / before, in pre-copy.
    pub pause_pages: u64,
    pub precopy_pages: u64,
    /// From the request to the commit (manifest written), milliseconds.
    pub commit_ms: u64,
    /// Of which writing the manifest and pruning, milliseconds.
    pub manifest_ms: u64,
    /// Bytes written to the store (all nodes, data + indexes).
    pub bytes_written: u64,
    /// Pages in this increment (all nodes).
    pub pages: u64,
    /// Private image bytes of the ranks (uncompressed).
    pub image_bytes: u64,
    /// Committed stamps in the store after pruning.
    pub kept: Vec<Stamp>,
    /// Requested on the control socket (false: periodic).
    pub requested: bool,
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
            incarnation: 0,
            checkpoints: vec![],
            checkpointing: None,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JobStatus>(&j).unwrap(), s);
        assert_eq!(ProcessState::Killed(9).to_string(), "killed(SIGKILL)");
        // A status.json written before checkpoints existed still reads.
        let old = j
            .replace(",\"incarnation\":0", "")
            .replace(",\"checkpoints\":[]", "");
        assert_eq!(serde_json::from_str::<JobStatus>(&old).unwrap(), s);
    }

    #[test]
    fn secret_is_64_hex_digits_in_a_private_file() {
        use std::os::unix::fs::MetadataExt;
        let home = std::env::temp_dir().join(format!("mome-proto-secret-{}", std::process::id()));
        let job = JobDir::new(&home, "j");
        std::fs::create_dir_all(&job.path).unwrap();
        job.write_secret().unwrap();
        let first = std::fs::read_to_string(job.secret_path()).unwrap();
        assert_eq!(first.len(), 65, "{first:?}");
        assert!(first.ends_with('\n'));
        assert!(first[..64]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let meta = std::fs::metadata(job.secret_path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        job.write_secret().unwrap();
        assert_ne!(std::fs::read_to_string(job.secret_path()).unwrap(), first);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn files_of_older_versions_still_read() {
        // job.yaml without `placement`: every rank on node 0.
        let spec = JobSpec {
            id: "j".into(),
            ranks: 3,
            nodes: 1,
            ..Default::default()
        };
        let text = serde_yaml_ng::to_string(&spec).unwrap();
        let old = text.replace("placement: []\n", "");
        assert!(!old.contains("\nplacement:"), "{old}");
        let read: JobSpec = serde_yaml_ng::from_str(&old).unwrap();
        assert_eq!(read, spec);
        assert_eq!(read.node_of_ranks(), vec![0, 0, 0]);
        let placed = JobSpec {
            placement: vec![0, 1, 0],
            ..spec
        };
        assert_eq!(placed.node_of_ranks(), vec![0, 1, 0]);
        // An agent status without ranks, address or failure.
        let agent: AgentStatus =
            serde_json::from_str(r#"{"node":0,"pid":7,"state":"running"}"#).unwrap();
        assert_eq!(agent.ranks, Vec::<u32>::new());
        assert_eq!((agent.addr, agent.failed), (None, None));
    }

    #[test]
    fn control_lines() {
        let req: ControlRequest = serde_json::from_str(r#"{"cmd":"checkpoint"}"#).unwrap();
        assert_eq!(req, ControlRequest::Checkpoint { timeout_ms: None });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"cmd":"checkpoint"}"#
        );
        let req: ControlRequest =
            serde_json::from_str(r#"{"cmd":"checkpoint","timeout_ms":5}"#).unwrap();
        assert_eq!(
            req,
            ControlRequest::Checkpoint {
                timeout_ms: Some(5)
            }
        );
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"cmd":"status"}"#).unwrap(),
            ControlRequest::Status
        );
        let progress = ControlReply::CkptProgress(CkptProgress {
            stamp: 3,
            phase: "write".into(),
            done_bytes: 1,
            total_bytes: 2,
        });
        let line = serde_json::to_string(&progress).unwrap();
        assert!(
            line.starts_with(r#"{"reply":"ckpt_progress","stamp":3"#),
            "{line}"
        );
        assert_eq!(
            serde_json::from_str::<ControlReply>(&line).unwrap(),
            progress
        );
        assert!(!progress.is_final());
        let error = ControlReply::Error {
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"reply":"error","message":"no"}"#
        );
        assert!(error.is_final());
    }
}
