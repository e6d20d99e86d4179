//! What mome-status shows: the jobs of `$MOME_HOME` (one line each), or one
//! job in detail, as aligned text or as JSON for scripts.
//!
//! A job's state comes from its status.json, except that a job whose
//! coordinator (mome-run) is gone while the file still says running is
//! `lost`; a live job is asked through its control socket, which knows
//! more recent news than the file. A job's checkpoints come from the
//! manifests of its store (what a restart could use).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mome_protocol::job::{
    AgentStatus, ControlReply, ControlRequest, JobDir, JobError, JobSpec, JobState, JobStatus,
    RankStatus,
};
use serde::Serialize;

use crate::control;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long mome-status waits for a live job's control socket.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// A job's state as shown: the recorded one, or `lost`, or `unknown` when
/// status.json is missing or unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShownState {
    Starting,
    Running,
    Finished,
    Failed,
    /// status.json says running, but its mome-run is gone.
    Lost,
    Unknown,
}

impl std::fmt::Display for ShownState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ShownState::Starting => "starting",
            ShownState::Running => "running",
            ShownState::Finished => "finished",
            ShownState::Failed => "failed",
            ShownState::Lost => "lost",
            ShownState::Unknown => "unknown",
        };
        f.pad(s)
    }
}

/// The state to show for a recorded status.
pub fn shown_state(status: Option<&JobStatus>) -> ShownState {
    let Some(status) = status else {
        return ShownState::Unknown;
    };
    match status.state {
        JobState::Finished => ShownState::Finished,
        JobState::Failed => ShownState::Failed,
        JobState::Starting | JobState::Running if !coordinator_alive(status.coordinator_pid) => {
            ShownState::Lost
        }
        JobState::Starting => ShownState::Starting,
        JobState::Running => ShownState::Running,
    }
}

/// Whether `pid` is a running mome-run (and not a process that got its pid
/// after mome-run died).
pub fn coordinator_alive(pid: i32) -> bool {
    if pid <= 0 || !crate::os::process_exists(pid) || crate::os::is_zombie(pid) {
        return false;
    }
    let named = |s: &str| {
        Path::new(s.trim())
            .file_name()
            // comm is cut to 15 characters: "mome-restart" fits.
            .is_some_and(|n| n == "mome-run" || n == "mome-restart")
    };
    let argv0 = crate::os::process_argv0(pid);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    if argv0.is_none() && exe.is_none() && comm.is_none() {
        // /proc tells nothing (hidepid?): the pid exists, trust it.
        return true;
    }
    argv0.as_deref().is_some_and(named)
        || exe.is_some_and(|e| {
            e.file_name()
                .is_some_and(|n| n == "mome-run" || n == "mome-restart")
        })
        || comm.as_deref().is_some_and(named)
}

/// One line of the job list.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: String,
    pub state: ShownState,
    pub ranks: u32,
    pub nodes: u32,
    pub started: String,
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub job_dir: PathBuf,
}

/// Every job of `home`, sorted by id (that is, by start time).
pub fn list_jobs(home: &Path) -> Result<Vec<JobSummary>, StatusError> {
    let jobs = home.join("jobs");
    let entries = match std::fs::read_dir(&jobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StatusError::List { path: jobs, source }),
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    ids.sort();
    let mut summaries = Vec::new();
    for id in ids {
        // A directory without a readable job.yaml is not (yet) a job.
        let Ok(dir) = JobDir::open(home, &id) else {
            continue;
        };
        let Ok(spec) = dir.read_spec() else { continue };
        let status = dir.read_status().ok();
        summaries.push(JobSummary {
            id,
            state: shown_state(status.as_ref()),
            ranks: spec.ranks,
            nodes: spec.nodes,
            started: spec.started.clone(),
            argv: spec.argv.clone(),
            exit_code: status.and_then(|s| s.exit_code),
            job_dir: dir.path.clone(),
        });
    }
    Ok(summaries)
}

/// The job list as aligned columns.
pub fn render_list(jobs: &[JobSummary]) -> String {
    let header = ["ID", "STATE", "RANKS", "NODES", "STARTED", "COMMAND"];
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|j| {
            [
                j.id.clone(),
                j.state.to_string(),
                j.ranks.to_string(),
                j.nodes.to_string(),
                j.started.clone(),
                command_line(&j.argv),
            ]
        })
        .collect();
    render_table(&header, &rows)
}

/// Columns separated by two spaces, each as wide as its widest cell; the
/// last column is not padded.
fn render_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// argv as a shell would need it typed.
pub fn command_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%^".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// One job in full: its status plus what was launched.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub id: String,
    pub state: ShownState,
    /// Where the ranks' states come from: "control socket" or "status.json".
    pub source: String,
    pub job_dir: PathBuf,
    pub command: PathBuf,
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub nodes: u32,
    /// How the ranks were placed over the nodes (nodes.placement).
    pub placement_mode: mome_protocol::config::Placement,
    /// The node of each rank (index: rank).
    pub placement: Vec<u32>,
    pub started: String,
    pub ended: Option<String>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub coordinator_pid: Option<i32>,
    pub ranks: Vec<RankStatus>,
    pub agents: Vec<AgentStatus>,
    pub config: mome_protocol::Config,
    /// 0 for the first run, one more at each restart.
    pub incarnation: u32,
    pub restored_from: Option<mome_protocol::ckpt::Stamp>,
    pub pids_pinned: bool,
    pub pids_note: Option<String>,
    /// The store root.
    pub checkpoint_dir: PathBuf,
    /// Committed checkpoints in the store, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Why the checkpoints could not be listed.
    pub checkpoints_error: Option<String>,
}

/// One committed checkpoint, from its manifest.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    pub stamp: mome_protocol::ckpt::Stamp,
    /// Commit time, RFC 3339.
    pub created: String,
    pub incarnation: u32,
    pub parent: Option<mome_protocol::ckpt::Stamp>,
    pub pause_us: u64,
    pub commit_ms: u64,
    pub bytes_written: u64,
    pub pages: u64,
    pub image_bytes: u64,
    /// Bytes on disk the stamp needs (its files and older data it uses).
    pub size: Option<u64>,
    /// The manifest could not be read: why.
    pub error: Option<String>,
}

/// The committed checkpoints of the store at `root`.
pub fn list_checkpoints(root: &Path) -> Result<Vec<CheckpointInfo>, String> {
    let stamps = match mome_store::list_committed(root) {
        Ok(stamps) => stamps,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    Ok(stamps
        .into_iter()
        .map(|stamp| match mome_store::read_manifest(root, stamp) {
            Ok(m) => CheckpointInfo {
                stamp,
                created: m.created,
                incarnation: m.incarnation,
                parent: m.parent,
                pause_us: m.pause_us,
                commit_ms: m.commit_ms,
                bytes_written: m.bytes_written,
                pages: m.pages,
                image_bytes: m.image_bytes,
                size: mome_store::stamp_sizes(root, stamp).ok().map(|s| s.total()),
                error: None,
            },
            Err(e) => CheckpointInfo {
                stamp,
                created: String::new(),
                incarnation: 0,
                parent: None,
                pause_us: 0,
                commit_ms: 0,
                bytes_written: 0,
                pages: 0,
                image_bytes: 0,
                size: None,
                error: Some(e.to_string()),
            },
        })
        .collect())
}

/// Reads job `id` of `home`, asking its control socket when it is live.
/// Returns the detail and, when the socket did not answer, a warning.
pub fn job_detail(
    home: &Path,
    id: &str,
    timeout: Duration,
) -> Result<(JobDetail, Option<String>), StatusError> {
    let dir = JobDir::open(home, id)?;
    let spec = dir.read_spec()?;
    let recorded = dir.read_status().ok();
    let mut state = shown_state(recorded.as_ref());
    let mut warning = None;
    let mut source = "status.json";
    let mut status = recorded;
    if matches!(state, ShownState::Starting | ShownState::Running) {
        match control::request(&dir.control_socket(), &ControlRequest::Status, timeout) {
            Ok(ControlReply::Status(live)) => {
                state = shown_state(Some(&live));
                status = Some(live);
                source = "control socket";
            }
            Ok(ControlReply::Error { message }) => {
                warning = Some(format!("the job's control socket refused the status request ({message}); showing status.json"));
            }
            Ok(other) => {
                warning = Some(format!(
                    "the job's control socket answered {other:?} to a status request; showing status.json"
                ));
            }
            Err(e) => warning = Some(format!("{e}; showing status.json")),
        }
    }
    Ok((detail_of(&dir, &spec, status, state, source), warning))
}

fn detail_of(
    dir: &JobDir,
    spec: &JobSpec,
    status: Option<JobStatus>,
    state: ShownState,
    source: &str,
) -> JobDetail {
    let (ended, exit_code, reason, pid, ranks, agents) = match status {
        Some(s) => (
            s.ended,
            s.exit_code,
            s.reason,
            Some(s.coordinator_pid),
            s.ranks,
            s.agents,
        ),
        None => (None, None, None, None, Vec::new(), Vec::new()),
    };
    let placement = spec.node_of_ranks();
    // A status file older than multi-node jobs does not list each agent's
    // ranks: every rank of the job ran on its only node.
    let agents = agents
        .into_iter()
        .map(|mut a| {
            if a.ranks.is_empty() {
                a.ranks = (0..spec.ranks)
                    .filter(|&r| placement[r as usize] == a.node)
                    .collect();
            }
            a
        })
        .collect();
    let root = crate::coordinator::store_root(&spec.config, dir, &spec.cwd);
    let (checkpoints, checkpoints_error) = match list_checkpoints(&root) {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    JobDetail {
        id: spec.id.clone(),
        state,
        source: source.to_string(),
        job_dir: dir.path.clone(),
        command: spec.command.clone(),
        argv: spec.argv.clone(),
        cwd: spec.cwd.clone(),
        nodes: spec.nodes,
        placement_mode: spec.config.nodes.placement,
        placement,
        started: spec.started.clone(),
        ended,
        exit_code,
        reason,
        coordinator_pid: pid,
        ranks,
        agents,
        config: spec.config.clone(),
        incarnation: spec.incarnation,
        restored_from: spec.restored_from,
        pids_pinned: spec.pids_pinned,
        pids_note: spec.pids_note.clone(),
        checkpoint_dir: root,
        checkpoints,
        checkpoints_error,
    }
}

/// One job as text: a header, then the ranks and agents tables.
pub fn render_detail(d: &JobDetail) -> String {
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let fields: Vec<(&str, String)> = vec![
        ("job", d.id.clone()),
        ("state", d.state.to_string()),
        ("command", command_line(&d.argv)),
        ("program", d.command.display().to_string()),
        ("cwd", d.cwd.display().to_string()),
        (
            "nodes",
            if d.nodes > 1 {
                format!(
                    "{} ({} placement)",
                    d.nodes,
                    crate::coordinator::placement_name(d.placement_mode)
                )
            } else {
                d.nodes.to_string()
            },
        ),
        ("started", d.started.clone()),
        ("ended", dash(d.ended.clone())),
        ("exit code", dash(d.exit_code.map(|c| c.to_string()))),
        ("reason", dash(d.reason.clone())),
        (
            "mome-run pid",
            dash(d.coordinator_pid.map(|p| p.to_string())),
        ),
        ("job dir", d.job_dir.display().to_string()),
        (
            "incarnation",
            match d.restored_from {
                Some(s) => format!("{} (restored from stamp {s})", d.incarnation),
                None => d.incarnation.to_string(),
            },
        ),
        (
            "pids",
            if d.pids_pinned {
                "pinned (100 + rank in each rank's pid namespace)".to_string()
            } else {
                format!(
                    "not pinned{}",
                    d.pids_note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                )
            },
        ),
        ("checkpoints", d.checkpoint_dir.display().to_string()),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }
    let pid = |p: Option<i32>| p.map_or("-".to_string(), |p| p.to_string());
    out.push('\n');
    let ranks: Vec<[String; 4]> = d
        .ranks
        .iter()
        .map(|r| {
            [
                r.rank.to_string(),
                r.node.to_string(),
                pid(r.pid),
                r.state.to_string(),
            ]
        })
        .collect();
    out.push_str(&render_table(&["RANK", "NODE", "PID", "STATE"], &ranks));
    out.push('\n');
    let agents: Vec<[String; 5]> = d
        .agents
        .iter()
        .map(|a| {
            [
                a.node.to_string(),
                pid(a.pid),
                match &a.failed {
                    Some(_) => format!("{} (failed)", a.state),
                    None => a.state.to_string(),
                },
                a.addr.clone().unwrap_or_else(|| "-".to_string()),
                crate::coordinator::rank_list(&a.ranks),
            ]
        })
        .collect();
    if d.agents.iter().any(|a| a.store.is_some()) {
        // Diskless checkpoints: who holds copies of each node's increments,
        // and the checkpoint memory each node's keeper uses now.
        let rows: Vec<[String; 7]> = d
            .agents
            .iter()
            .zip(&agents)
            .map(|(a, row)| {
                let [n, p, s, l, r] = row.clone();
                let copies = if a.holders.is_empty() {
                    "-".to_string()
                } else {
                    crate::coordinator::rank_list(&a.holders)
                };
                let memory = a
                    .store
                    .as_deref()
                    .and_then(store_usage)
                    .map_or("-".to_string(), human_bytes);
                [n, p, s, l, r, copies, memory]
            })
            .collect();
        out.push_str(&render_table(
            &[
                "NODE",
                "PID",
                "STATE",
                "LISTEN",
                "RANKS",
                "COPIES ON",
                "CKPT MEMORY",
            ],
            &rows,
        ));
    } else {
        out.push_str(&render_table(
            &["NODE", "PID", "STATE", "LISTEN", "RANKS"],
            &agents,
        ));
    }
    for a in &d.agents {
        if let Some(reason) = &a.failed {
            out.push_str(&format!("node {} failed: {reason}\n", a.node));
        }
    }
    out.push('\n');
    if let Some(e) = &d.checkpoints_error {
        out.push_str(&format!("checkpoints cannot be listed: {e}\n"));
    } else if d.checkpoints.is_empty() {
        out.push_str("no checkpoints\n");
    } else {
        let rows: Vec<[String; 6]> = d
            .checkpoints
            .iter()
            .map(|c| match &c.error {
                Some(e) => [
                    c.stamp.to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("unreadable: {e}"),
                ],
                None => [
                    c.stamp.to_string(),
                    c.created.clone(),
                    format!("{:.1} ms", c.pause_us as f64 / 1000.0),
                    human_bytes(c.bytes_written),
                    c.size.map_or("-".into(), human_bytes),
                    c.incarnation.to_string(),
                ],
            })
            .collect();
        out.push_str(&render_table(
            &[
                "STAMP",
                "CREATED",
                "PAUSE",
                "WRITTEN",
                "SIZE",
                "INCARNATION",
            ],
            &rows,
        ));
    }
    out
}

/// `18.2 MB`, `512 B`.
/// Bytes used in a keeper's store (its tmpfs), if it is reachable.
fn store_usage(path: &str) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks() - st.blocks_free()) as u64 * st.fragment_size() as u64)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            command_line(&["./app".into(), "-n".into(), "a b".into(), "it's".into()]),
            "./app -n 'a b' 'it'\\''s'"
        );
        assert_eq!(command_line(&["".into()]), "''");
    }

    #[test]
    fn table_is_aligned() {
        let t = render_table(&["A", "LONGER"], &[["wide cell".into(), "x".into()]]);
        assert_eq!(t, "A          LONGER\nwide cell  x\n");
    }

    #[test]
    fn dead_coordinator_means_lost() {
        assert!(
            !coordinator_alive(std::process::id() as i32),
            "a test binary is not mome-run"
        );
        assert!(!coordinator_alive(0));
        let status = JobStatus {
            id: "x".into(),
            state: JobState::Running,
            coordinator_pid: i32::MAX,
            ranks: vec![],
            agents: vec![],
            exit_code: None,
            reason: None,
            ended: None,
            incarnation: 0,
            checkpoints: vec![],
            checkpointing: None,
        };
        assert_eq!(shown_state(Some(&status)), ShownState::Lost);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(18_200_000), "18.2 MB");
        assert_eq!(shown_state(None), ShownState::Unknown);
    }
}
