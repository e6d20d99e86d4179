//! The life of a job as mome-run leads it: preflight, job directory, one
//! agent per node, ranks, then one event loop until every process of the
//! job is gone.
//!
//! ```text
//!  AgentStarting --all ready [, all mesh_ready]--> Running --all ranks exited--> Draining --> Done
//!       |                                            |                          ^
//!       |                    rank failed / node failed / signal --> Ending (TERM, grace, KILL)
//!       +--timeout / agent exit / node failed / signal-------------------------------------> Done
//! ```
//!
//! With one node the agent's first stdout line is `ready`. With K > 1
//! nodes, each agent k is started with `--node k --nodes K --ranks <its
//! ranks>` after the job's secret is written, and prints `ready <ip:port>`
//! (where it listens for its peers); once all did, each gets the
//! [`AgentCommand::Peers`] line with every address, and answers
//! [`AgentEvent::MeshReady`] once connected to all of them. The ranks start
//! only when every agent did: a rank never talks to a node that cannot
//! reach the others. Both waits are bounded by `job.agent_ready_timeout`.
//! A [`AgentEvent::NodeFailed`] from any agent, or an agent that exits
//! while the job runs, fails the whole job (issue 5 brings recovery).
//!
//! Everything runs on the main thread, in one poll() loop: children are
//! forked from it (PR_SET_PDEATHSIG is per thread), and signals, children's
//! exits, the ranks' output, the forwarded terminal input and the control
//! socket are all events of that loop. Every wait has a deadline and says
//! what it waited for. mome-run is the child subreaper of the job, so that
//! whatever the ranks fork is reparented to it and killed at the end:
//! nothing of a job outlives it.
//!
//! The same loop drives checkpoints ([`crate::checkpoint`]: control
//! requests and periodic ones, the agent's events on its stdout) and, for
//! mome-restart, a restored incarnation of an existing job.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::ChildStdin;
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{AgentCommand, AgentEvent, ParityPlan, Stamp};
use mome_protocol::config::{OnFailure, Placement, PrefixMode, SchemeName};
use mome_protocol::job::{
    mome_home, now_rfc3339, signal_name, AgentStatus, ControlReply, ControlRequest, JobDir,
    JobError, JobSpec, JobState, JobStatus, ProcessState, RankStatus,
};
use mome_protocol::Config;
use nix::poll::{PollFd, PollFlags};

use crate::checkpoint::{self, Action, Checkpointer, JobIdentity, Requester};
use crate::control::{ClientId, ControlError, ControlFd, ControlServer};
use crate::jobdir::{self, CoordinatorLog, JobDirError};
use crate::os;
use crate::output::{Dest, LineTagger, Sink};
use crate::pidns::{self, PidNsError, PidPinning};
use crate::preflight::{self, Checked, PreflightError};
use crate::signals::{SignalError, SignalPipes, ENDING};
use crate::spawn::{self, Install, RankLaunch, RankStdin, SpawnError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--nodes {nodes} is more than the {ranks} rank(s) of -n {ranks}: every node needs at least one rank")]
    MoreNodesThanRanks { nodes: u32, ranks: u32 },
    #[error("--nodes {nodes} is out of range: a job runs on 1 to {MAX_NODES} nodes")]
    NodesOutOfRange { nodes: u32 },
    #[error("cannot determine the current directory: {0}")]
    Cwd(std::io::Error),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    JobDir(#[from] JobDirError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error("cannot become the reaper of the job's orphaned processes: {0}")]
    Subreaper(nix::Error),
    #[error("cannot raise the open-files limit to {needed}: {source}")]
    OpenFiles { needed: u64, source: std::io::Error },
    #[error(transparent)]
    PidNs(#[from] PidNsError),
    #[error("cannot read the program {path} to checksum it: {source}")]
    Binary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "job {id} ran its ranks at pinned pids, which this system cannot give any more: {reason}"
    )]
    PinningLost { id: String, reason: String },
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::MoreNodesThanRanks { .. } | RunError::NodesOutOfRange { .. } => 2,
            RunError::Preflight(e) => e.exit_code(),
            RunError::Spawn(e) => e.exit_code(),
            RunError::PidNs(_) => 2,
            _ => 1,
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub ranks: u32,
    pub nodes: u32,
    pub config: Config,
    pub no_prefix: bool,
    pub jobid_file: Option<PathBuf>,
    /// PROGRAM as typed.
    pub program: OsString,
    pub args: Vec<OsString>,
    /// mome-restart: run this existing job again from a stamp (program,
    /// arguments, environment, cwd and ranks come from its job.yaml).
    pub restart: Option<RestartFrom>,
    /// mome-restart: each node's store root for the stamp (empty: the
    /// checkpoint directory for every node).
    pub node_roots: Vec<PathBuf>,
}

/// A job to restart, as mome-restart chose it.
#[derive(Debug, Clone)]
pub struct RestartFrom {
    pub job: JobDir,
    pub spec: JobSpec,
    pub stamp: Stamp,
    /// The store root.
    pub root: PathBuf,
}

/// Checkpoint options of the command line, over the configuration.
#[derive(Debug, Clone, Default)]
pub struct CkptOverrides {
    pub dir: Option<PathBuf>,
    pub keep: Option<u32>,
    pub interval: Option<Duration>,
}

impl CkptOverrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some(dir) = &self.dir {
            config.checkpoint.dir = dir.display().to_string();
        }
        if let Some(keep) = self.keep {
            config.checkpoint.keep = keep;
        }
        if let Some(interval) = self.interval {
            config.checkpoint.interval = mome_protocol::config::Span(interval);
        }
    }
}

/// A duration option (`90s`, `10min`, `500ms`; `0` for none), for clap.
pub fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (write a duration such as 90s, 10min or 500ms)"))
}

/// The checkpoint store of a job: checkpoint.dir (made absolute against
/// `cwd`), else `<jobdir>/ckpt`.
pub fn store_root(config: &Config, job: &JobDir, cwd: &std::path::Path) -> PathBuf {
    if config.checkpoint.dir.is_empty() {
        job.path.join("ckpt")
    } else {
        cwd.join(&config.checkpoint.dir)
    }
}

/// How long a rank may take to die after SIGKILL before mome-run stops
/// waiting for it (a process stuck in the kernel, state D).
const SIGKILL_WAIT: Duration = Duration::from_secs(5);
/// How long the ranks' output pipes may stay open after every rank exited
/// (held by a process that left the job's process group).
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// How long the agent gets to exit on its own once its stdin is closed.
const AGENT_EOF_WAIT: Duration = Duration::from_millis(200);
/// How long the agent gets to exit after SIGTERM (and again after SIGKILL).
const AGENT_STOP_WAIT: Duration = Duration::from_secs(2);
/// How long the job's leftover processes get to die after SIGKILL.
const LEFTOVER_WAIT: Duration = Duration::from_secs(2);
/// How long mome-run waits for its stdout/stderr to take the last output,
/// without any progress, before it gives up on them.
const FLUSH_STALL: Duration = Duration::from_secs(10);
/// How often to look again whether mome-run came to the terminal's
/// foreground (then it can read the terminal for rank 0).
const FOREGROUND_RECHECK: Duration = Duration::from_millis(250);
/// How often, while draining, to look for processes the ranks left behind.
const LEFTOVER_SWEEP: Duration = Duration::from_millis(50);
/// How long mome-run waits for a rank started through mome-rankinit to
/// appear (fork in the new namespace) to learn its pid.
const RANK_PID_WAIT: Duration = Duration::from_secs(5);
/// Upper bound of one poll(): a safety net, every event has its own fd.
const MAX_POLL: Duration = Duration::from_secs(1);
/// Bytes read from one pipe per wakeup, so one chatty rank cannot starve
/// the others.
const READ_CHUNK: usize = 64 << 10;
const READS_PER_WAKEUP: usize = 16;
/// At most this much is read from a rank's pipe once the draining time is
/// over: the pipe's content, unless an escaped writer keeps refilling it.
const FINAL_READ: usize = 4 << 20;

/// Most nodes (agents) of one job.
pub const MAX_NODES: u32 = 64;

/// Runs the job and returns mome-run's exit status.
pub fn run(opts: RunOptions) -> i32 {
    let prepared = match prepare(&opts) {
        Ok(p) => p,
        Err(e) => {
            os::print_stderr(&format!("mome-run: {e}\n"));
            return e.exit_code();
        }
    };
    let mut coordinator = match Coordinator::create(opts, prepared) {
        Ok(c) => c,
        Err(e) => {
            os::print_stderr(&format!("mome-run: {e}\n"));
            return e.exit_code();
        }
    };
    coordinator.boot();
    coordinator.event_loop();
    let no_prefix = coordinator.tagged_off();
    let id = coordinator.job.id.clone();
    // Recoveries in a row that committed nothing new.
    let fruitless = if coordinator.ckpt.history.is_empty() {
        recoveries_so_far() + 1
    } else {
        1
    };
    let (code, recover) = coordinator.finish();
    if recover {
        recover_with_restart(&id, no_prefix, fruitless);
    }
    code
}

/// Recoveries in a row without a new committed stamp after which a node
/// failure ends the job: something fails again at every restart.
const MAX_FRUITLESS_RECOVERIES: u32 = 8;

/// Environment variable carrying the count across the exec.
const RECOVERIES_VAR: &str = "MOME_RECOVERIES";

fn recoveries_so_far() -> u32 {
    std::env::var(RECOVERIES_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A node failed and a committed stamp can bring the job back: this
/// process becomes `mome-restart <id>` (same pid, same output, same
/// parent waiting for the job's status), which picks the newest stamp
/// every node can be restored from (memory of the live nodes, copies on
/// other nodes, the disk level), gives the failed node's ranks a
/// replacement node and runs the job on. Only returns when the exec fails.
fn recover_with_restart(id: &str, no_prefix: bool, fruitless: u32) {
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    let restart = own_dir.join("mome-restart");
    let mut cmd = std::process::Command::new(&restart);
    if no_prefix {
        cmd.arg("--no-prefix");
    }
    cmd.arg(id).env(RECOVERIES_VAR, fruitless.to_string());
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    os::print_stderr(&format!(
        "mome-run: cannot run {} to recover the job: {e}\n",
        restart.display()
    ));
}

/// What is checked and set up before the job directory exists: a failure
/// here leaves nothing behind.
struct Prepared {
    cwd: PathBuf,
    checked: Checked,
    pinning: PidPinning,
    install: Install,
    nofile_soft: u64,
    signals: SignalPipes,
    home: PathBuf,
}

/// The node counts mome-run accepts: 1 to MAX_NODES, at most one per rank.
fn check_nodes(opts: &RunOptions) -> Result<(), RunError> {
    let nodes = opts.nodes;
    if nodes == 0 || nodes > MAX_NODES {
        return Err(RunError::NodesOutOfRange { nodes });
    }
    if nodes > opts.ranks {
        return Err(RunError::MoreNodesThanRanks {
            nodes,
            ranks: opts.ranks,
        });
    }
    Ok(())
}

fn prepare(opts: &RunOptions) -> Result<Prepared, RunError> {
    check_nodes(opts)?;
    let (cwd, program) = match &opts.restart {
        Some(r) => (r.spec.cwd.clone(), r.spec.command.clone().into_os_string()),
        None => (
            std::env::current_dir().map_err(RunError::Cwd)?,
            opts.program.clone(),
        ),
    };
    let checked = preflight::check_all(&program, &opts.config, opts.ranks, opts.nodes, &cwd)?;
    let install = Install::locate()?;
    let pinning = match &opts.restart {
        // A restart keeps what the job had: pinned pids must be pinned
        // again (the program knows its pid), unpinned ones stay so.
        Some(r) if r.spec.pids_pinned => pidns::decide(
            mome_protocol::config::PidNamespaceMode::Always,
            &install.rankinit,
        )
        .map_err(|e| RunError::PinningLost {
            id: r.spec.id.clone(),
            reason: match e {
                PidNsError::Required { reason } => reason,
            },
        })?,
        Some(r) => PidPinning {
            pinned: false,
            note: r.spec.pids_note.clone(),
        },
        None => pidns::decide(opts.config.checkpoint.pid_namespace, &install.rankinit)?,
    };
    let home = mome_home()?;
    let needed = preflight::fds_needed(opts.ranks, opts.nodes);
    let (nofile_soft, _) =
        os::raise_nofile_limit(needed).map_err(|source| RunError::OpenFiles { needed, source })?;
    nix::sys::prctl::set_child_subreaper(true).map_err(RunError::Subreaper)?;
    let signals = SignalPipes::install(
        &[
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGTSTP,
            libc::SIGCHLD,
        ],
        &[libc::SIGCHLD],
    )?;
    Ok(Prepared {
        cwd,
        checked,
        pinning,
        install,
        nofile_soft,
        signals,
        home,
    })
}

/// Why the job ended, when it did not end with every rank exiting 0. The
/// first cause wins: it gives the exit status.
#[derive(Debug, Clone)]
enum EndCause {
    RankFailed {
        rank: u32,
        pid: i32,
        state: ProcessState,
    },
    Interrupted {
        signal: i32,
    },
    /// The agent of a one-node job died.
    AgentDied {
        node: u32,
        pid: i32,
        state: ProcessState,
    },
    /// A node of a multi-node job failed: its agent died, or an agent
    /// reported it.
    NodeFailed {
        node: u32,
        reason: String,
    },
    /// Agents did not get to `ready` (or `mesh_ready`); the message names
    /// them and what was awaited.
    AgentNotReady {
        message: String,
    },
    RestoreFailed {
        node: u32,
        reason: String,
    },
    Setup {
        code: i32,
        message: String,
    },
}

impl EndCause {
    fn exit_code(&self) -> i32 {
        match self {
            EndCause::RankFailed { state, .. } => match state {
                ProcessState::Exited(code) => *code,
                ProcessState::Killed(signal) => 128 + signal,
                _ => 1,
            },
            EndCause::Interrupted { signal } => 128 + signal,
            EndCause::AgentDied { .. }
            | EndCause::NodeFailed { .. }
            | EndCause::AgentNotReady { .. }
            | EndCause::RestoreFailed { .. } => 1,
            EndCause::Setup { code, .. } => *code,
        }
    }

    fn reason(&self) -> String {
        match self {
            EndCause::RankFailed { rank, pid, state } => {
                format!("rank {rank} (pid {pid}) {}", describe_end(*state))
            }
            EndCause::Interrupted { signal } => format!("interrupted by {}", signal_name(*signal)),
            EndCause::AgentDied { node, pid, state } => format!(
                "the agent of node {node} (pid {pid}) exited unexpectedly ({})",
                describe_end(*state).trim_start_matches("was ")
            ),
            EndCause::NodeFailed { node, reason } => format!("node {node} failed: {reason}"),
            EndCause::AgentNotReady { message } => message.clone(),
            EndCause::RestoreFailed { node, reason } => {
                format!("the agent of node {node} cannot restore the job: {reason}")
            }
            EndCause::Setup { message, .. } => message.clone(),
        }
    }
}

/// "exited with status 3", "was killed by SIGSEGV".
fn describe_end(state: ProcessState) -> String {
    match state {
        ProcessState::Exited(code) => format!("exited with status {code}"),
        ProcessState::Killed(signal) => format!("was killed by {}", signal_name(signal)),
        other => other.to_string(),
    }
}

/// What the coordinator waits for from the agents before the ranks start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// Every agent's `ready` line.
    Ready,
    /// Multi-node jobs: every agent's `mesh_ready` event, after `peers`.
    Mesh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The agents were started; waiting for what `awaiting` says, until
    /// `deadline`.
    AgentStarting {
        deadline: Instant,
        awaiting: Awaiting,
    },
    Running,
    /// The ranks were told to end (SIGTERM or the user's signal); SIGKILL
    /// at `sigkill_at`, then wait up to SIGKILL_WAIT.
    Ending {
        sigkill_at: Instant,
        sigkill_sent: Option<Instant>,
    },
    /// Every rank is gone; reading what is left in their pipes.
    Draining {
        until: Instant,
        last_sweep: Instant,
    },
    Done,
}

#[derive(Debug)]
struct AgentProc {
    node: u32,
    /// The ranks placed on this node.
    ranks: Vec<u32>,
    pid: Option<i32>,
    /// mome-run's end of the agent's stdin: the agent exits at EOF.
    stdin: Option<ChildStdin>,
    stdout: Option<OwnedFd>,
    line: Vec<u8>,
    ready: bool,
    /// Multi-node jobs: where it listens for its peers (`ready <ip:port>`).
    addr: Option<String>,
    /// Multi-node jobs: connected to every peer.
    mesh_ready: bool,
    exited: Option<ProcessState>,
}

impl AgentProc {
    fn alive(&self) -> bool {
        self.pid.is_some() && self.exited.is_none()
    }
}

#[derive(Debug)]
struct RankStream {
    fd: OwnedFd,
    dest: Dest,
    tagger: LineTagger,
}

#[derive(Debug)]
struct RankProc {
    rank: u32,
    /// The child mome-run waits for: the rank, or its mome-rankinit relay.
    pid: Option<i32>,
    /// The rank's own pid (in mome-run's namespace): what is shown and
    /// signalled. Same as `pid` without pid pinning.
    shown_pid: Option<i32>,
    exited: Option<ProcessState>,
    /// stdout, stderr; None once at end of file.
    streams: [Option<RankStream>; 2],
}

impl RankProc {
    fn alive(&self) -> bool {
        self.pid.is_some() && self.exited.is_none()
    }
}

/// Terminal input forwarded to rank 0 through a pipe.
#[derive(Debug)]
struct StdinForward {
    to_rank0: OwnedFd,
    buffer: Vec<u8>,
    stdin_done: bool,
}

const STDIN_BUFFER: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Signal(i32),
    Control(ControlFd),
    AgentStdout(usize),
    RankOut { index: usize, stream: usize },
    Stdin,
    Rank0Stdin,
    Sink(Dest),
}

struct Coordinator {
    job: JobDir,
    config: Config,
    log: CoordinatorLog,
    status: JobStatus,
    status_dirty: bool,
    signals: SignalPipes,
    control: Option<ControlServer>,
    install: Install,
    launch: RankLaunch,
    nranks: u32,
    tagged: bool,
    rank0_stdin: RankStdin,
    /// One per node, index = node.
    agents: Vec<AgentProc>,
    ranks: Vec<RankProc>,
    pgid: Option<i32>,
    forward: Option<StdinForward>,
    stdout: Sink,
    stderr: Sink,
    phase: Phase,
    cause: Option<EndCause>,
    /// Ending signals received (SIGINT, SIGTERM, SIGHUP).
    interrupts: usize,
    ckpt: Checkpointer,
    /// When this mome-run started (for "restart until running").
    born: Instant,
    /// Multi-node jobs: when `peers` was sent (for "mesh ready in").
    mesh_sent: Option<Instant>,
    /// The stamp this incarnation restores, and the ranks restored so far.
    restore: Option<Stamp>,
    restored: BTreeSet<u32>,
    /// Restart: each node's store root for the restored stamp (its own
    /// memory store, another node's, or the disk store).
    node_roots: Vec<PathBuf>,
    /// Diskless checkpoints: each node's keeper.
    keepers: Vec<Option<crate::keepers::Keeper>>,
    /// A node failed and the job goes on from its newest recoverable
    /// stamp: once this incarnation is torn down, mome-restart takes over.
    recover: bool,
}

impl Coordinator {
    /// Creates the job directory and its files; from here on, whatever
    /// happens is recorded in status.json.
    fn create(opts: RunOptions, prepared: Prepared) -> Result<Coordinator, RunError> {
        let Prepared {
            cwd,
            checked,
            pinning,
            install,
            nofile_soft,
            signals,
            home,
        } = prepared;
        let binary_xxh3 =
            checkpoint::file_xxh3(&checked.program).map_err(|source| RunError::Binary {
                path: checked.program.clone(),
                source,
            })?;
        let (job, spec, argv, restore) = match &opts.restart {
            Some(r) => {
                // Same job, same directory: a new incarnation of it.
                let mut spec = r.spec.clone();
                spec.incarnation += 1;
                spec.restored_from = Some(r.stamp);
                spec.config = opts.config.clone();
                spec.binary_xxh3 = Some(binary_xxh3);
                r.job.write_spec(&spec)?;
                let argv: Vec<OsString> = spec.argv.iter().map(OsString::from).collect();
                (r.job.clone(), spec, argv, Some((r.stamp, r.root.clone())))
            }
            None => {
                let job = jobdir::create_job_dir(&home)?;
                let mut argv: Vec<OsString> = vec![opts.program.clone()];
                argv.extend(opts.args.iter().cloned());
                let env: BTreeMap<String, String> = std::env::vars_os()
                    .map(|(k, v)| {
                        (
                            k.to_string_lossy().into_owned(),
                            v.to_string_lossy().into_owned(),
                        )
                    })
                    .collect();
                let mut config = opts.config.clone();
                // Recorded resolved: mome-restart and mome-status find the
                // store whatever their current directory.
                config.checkpoint.dir = store_root(&config, &job, &cwd).display().to_string();
                let placement = config.nodes.placement.nodes_of(opts.ranks, opts.nodes);
                let spec = JobSpec {
                    id: job.id.clone(),
                    command: checked.program.clone(),
                    argv: argv
                        .iter()
                        .map(|a| a.to_string_lossy().into_owned())
                        .collect(),
                    env,
                    cwd: cwd.clone(),
                    ranks: opts.ranks,
                    nodes: opts.nodes,
                    started: now_rfc3339(),
                    config,
                    pids_pinned: pinning.pinned,
                    pids_note: pinning.note.clone(),
                    binary_xxh3: Some(binary_xxh3),
                    incarnation: 0,
                    restored_from: None,
                    placement,
                };
                job.write_spec(&spec)?;
                os::print_stderr(&format!("mome: job {}\n", job.id));
                (job, spec, argv, None)
            }
        };
        if let Some(path) = &opts.jobid_file {
            jobdir::write_jobid_file(path, &job.id)?;
        }
        let mut log = CoordinatorLog::open(&job)?;
        if let Some((stamp, root)) = &restore {
            let from = if opts.node_roots.is_empty() {
                root.display().to_string()
            } else {
                opts.node_roots
                    .iter()
                    .enumerate()
                    .map(|(n, r)| format!("node {n} from {}", r.display()))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            log.line(format_args!(
                "incarnation {} of job {}: restoring stamp {stamp}: {from}",
                spec.incarnation, job.id,
            ));
        }
        log.line(format_args!(
            "pids {}",
            if pinning.pinned {
                format!(
                    "pinned: rank r runs at pid {} + r in a pid namespace of its own",
                    pidns::RANK_PID_BASE
                )
            } else {
                format!(
                    "not pinned ({})",
                    pinning.note.as_deref().unwrap_or("no reason given")
                )
            }
        ));
        log.line(format_args!(
            "job {} by mome-run pid {}: {} rank(s) of {} ({} interpreter(s): {:?}) in {}",
            job.id,
            std::process::id(),
            opts.ranks,
            checked.program.display(),
            checked.interpreters.len(),
            checked.interpreters,
            cwd.display()
        ));
        // The node of each rank: as recorded (a restart keeps it), node 0
        // for all in a job file older than multi-node jobs.
        let placement = spec.node_of_ranks();
        let ranks_of = |node: u32| -> Vec<u32> {
            (0..opts.ranks)
                .filter(|&r| placement[r as usize] == node)
                .collect()
        };
        if opts.nodes > 1 {
            log.line(format_args!(
                "{} node(s), {} placement: {}",
                opts.nodes,
                placement_name(spec.config.nodes.placement),
                (0..opts.nodes)
                    .map(|n| format!("node {n}: ranks {}", rank_list(&ranks_of(n))))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        log.line(format_args!(
            "kernel {}: userfaultfd features {:#x}{}; agent {}, preload {}",
            checked.kernel.release,
            checked.kernel.features,
            if checked.kernel.via_device {
                " (via /dev/userfaultfd)"
            } else {
                ""
            },
            install.agent.display(),
            install.preload.display()
        ));

        let status = JobStatus {
            id: job.id.clone(),
            state: JobState::Starting,
            coordinator_pid: std::process::id() as i32,
            ranks: (0..opts.ranks)
                .map(|rank| RankStatus {
                    rank,
                    node: placement[rank as usize],
                    pid: None,
                    state: ProcessState::Starting,
                })
                .collect(),
            agents: (0..opts.nodes)
                .map(|node| AgentStatus {
                    node,
                    pid: None,
                    state: ProcessState::Starting,
                    ranks: ranks_of(node),
                    addr: None,
                    failed: None,
                    store: None,
                    holders: Vec::new(),
                })
                .collect(),
            exit_code: None,
            reason: None,
            ended: None,
            incarnation: spec.incarnation,
            checkpoints: Vec::new(),
            checkpointing: None,
        };
        job.write_status(&status)?;

        let tagged = !opts.no_prefix
            && match opts.config.output.prefix {
                PrefixMode::Auto => opts.ranks > 1,
                PrefixMode::Always => true,
                PrefixMode::Never => false,
            };
        let launch = RankLaunch {
            program: checked.program.clone(),
            argv,
            cwd,
            preload: install.preload.clone(),
            jobid: job.id.clone(),
            nranks: opts.ranks,
            placement: placement.clone(),
            agent_sockets: (0..opts.nodes).map(|n| job.agent_socket(n)).collect(),
            agent_timeout_ms: opts.config.job.agent_timeout.0.as_millis(),
            nofile_soft,
            rankinit: pinning.pinned.then(|| install.rankinit.clone()),
            env: opts.restart.as_ref().map(|r| r.spec.env.clone()),
            extra_env: {
                let mut extra = vec![(
                    mome_protocol::env::CKPT_SIGNAL.to_string(),
                    opts.config.checkpoint.signal.to_string(),
                )];
                if let Some((stamp, _)) = &restore {
                    extra.push((mome_protocol::env::RESTORE.to_string(), stamp.to_string()));
                }
                if opts.config.memory.malloc == mome_protocol::config::MallocMode::Shared {
                    extra.push((mome_protocol::env::MALLOC.to_string(), "shared".into()));
                }
                extra
            },
        };
        let root = restore
            .as_ref()
            .map(|(_, root)| root.clone())
            .unwrap_or_else(|| PathBuf::from(&spec.config.checkpoint.dir));
        let ckpt = Checkpointer::new(
            checkpoint::Settings::from_config(&opts.config.checkpoint, root),
            JobIdentity {
                job_id: job.id.clone(),
                incarnation: spec.incarnation,
                nranks: opts.ranks,
                nodes: opts.nodes,
                binary: checked.program.clone(),
                binary_xxh3,
            },
            restore.as_ref().map(|(stamp, _)| *stamp),
        );
        let rank0_stdin = if os::is_terminal(std::io::stdin()) {
            RankStdin::Pipe
        } else {
            RankStdin::Inherit
        };
        Ok(Coordinator {
            ranks: (0..opts.ranks)
                .map(|rank| RankProc {
                    rank,
                    pid: None,
                    shown_pid: None,
                    exited: None,
                    streams: [None, None],
                })
                .collect(),
            job,
            config: opts.config,
            log,
            status,
            status_dirty: false,
            signals,
            control: None,
            install,
            launch,
            nranks: opts.ranks,
            tagged,
            rank0_stdin,
            agents: (0..opts.nodes)
                .map(|node| AgentProc {
                    node,
                    ranks: ranks_of(node),
                    pid: None,
                    stdin: None,
                    stdout: None,
                    line: Vec::new(),
                    ready: false,
                    addr: None,
                    mesh_ready: false,
                    exited: None,
                })
                .collect(),
            pgid: None,
            forward: None,
            stdout: Sink::stdout(),
            stderr: Sink::stderr(),
            phase: Phase::Done,
            cause: None,
            interrupts: 0,
            ckpt,
            born: Instant::now(),
            mesh_sent: None,
            restore: restore.map(|(stamp, _)| stamp),
            restored: BTreeSet::new(),
            node_roots: opts.node_roots.clone(),
            keepers: Vec::new(),
            recover: false,
        })
    }

    /// Opens the control socket, writes the job's secret (several nodes)
    /// and starts every node's agent.
    fn boot(&mut self) {
        match ControlServer::bind(&self.job.control_socket()) {
            Ok(server) => self.control = Some(server),
            Err(e) => return self.fail_setup(1, e.to_string()),
        }
        let nodes = self.agents.len() as u32;
        if nodes > 1 {
            // Before any agent starts: each reads it at startup.
            if let Err(e) = self.job.write_secret() {
                return self.fail_setup(1, e.to_string());
            }
            self.log.line(format_args!(
                "wrote the job's secret to {}",
                self.job.secret_path().display()
            ));
        }
        self.start_keepers();
        let timeout = self.config.job.agent_ready_timeout.0;
        for index in 0..self.agents.len() {
            let node = self.agents[index].node;
            let mut extra: Vec<OsString> = Vec::new();
            if let Some(stamp) = self.restore {
                let root = self
                    .node_roots
                    .get(node as usize)
                    .cloned()
                    .unwrap_or_else(|| self.ckpt.settings().root.clone());
                extra.extend([
                    "--restore".into(),
                    stamp.to_string().into(),
                    "--ckpt-dir".into(),
                    root.into_os_string(),
                ]);
            }
            if let Some(k) = self.keepers.get(node as usize).and_then(Option::as_ref) {
                extra.extend(["--mem-store".into(), k.path.clone().into_os_string()]);
            }
            let ranks = self.agents[index].ranks.clone();
            match spawn::spawn_agent(&self.install, &self.job, node, nodes, &ranks, &extra) {
                Ok(child) => {
                    if let Err(e) = os::set_nonblocking(child.stdout.as_fd()) {
                        self.log.line(format_args!(
                            "cannot make the stdout of the agent of node {node} non-blocking: {e}"
                        ));
                    }
                    if let Some(stdin) = &child.stdin {
                        // Commands are small and rare; a full pipe means an
                        // agent that reads nothing, which must not block the
                        // loop.
                        if let Err(e) = os::set_nonblocking(stdin.as_fd()) {
                            self.log.line(format_args!(
                                "cannot make the stdin of the agent of node {node} non-blocking: {e}"
                            ));
                        }
                    }
                    let agent = &mut self.agents[index];
                    agent.pid = Some(child.pid);
                    agent.stdin = child.stdin;
                    agent.stdout = Some(child.stdout);
                    self.status.agents[index].pid = Some(child.pid);
                    self.status_dirty = true;
                    self.log.line(format_args!(
                        "agent of node {node} started, pid {}, ranks {}; waiting up to {} for `{}`",
                        child.pid,
                        rank_list(&ranks),
                        humantime::format_duration(timeout),
                        if nodes > 1 {
                            "ready <ip:port>"
                        } else {
                            "ready"
                        }
                    ));
                }
                Err(e) => {
                    // The agents already started are stopped by finish().
                    let code = e.exit_code();
                    self.fail_setup(code, e.to_string());
                    self.flush_status();
                    return;
                }
            }
        }
        self.phase = Phase::AgentStarting {
            deadline: Instant::now() + timeout,
            awaiting: Awaiting::Ready,
        };
        self.flush_status();
    }

    /// Several nodes, diskless checkpoints: every node's keeper, adopted
    /// from a previous incarnation when it still runs, else started. A
    /// node without one makes its checkpoints fail with the reason (the
    /// job itself runs).
    fn start_keepers(&mut self) {
        let nodes = self.agents.len() as u32;
        let red = self.config.redundancy.clone();
        // One node, or the disk store: no keepers.
        let Some(scheme) = crate::parity::scheme(&red).filter(|_| nodes > 1) else {
            return;
        };
        if let Err(e) = mome_redundancy::validate(&scheme, nodes) {
            self.say(format!(
                "mome: redundancy: {e}; checkpoints of this job will fail"
            ));
            return;
        }
        let (replicas, parity): (Vec<Vec<u32>>, Vec<Option<ParityPlan>>) = (0..nodes)
            .map(|n| match scheme {
                mome_redundancy::Scheme::Mirror { copies } => {
                    (mome_redundancy::mirror_holders(n, nodes, copies), None)
                }
                // Parity groups: every member keeps parity shards of the
                // others' stripes (shown as the node's holders).
                _ => (
                    Vec::new(),
                    Some(ParityPlan {
                        members: mome_redundancy::group_of(&scheme, n, nodes),
                        xor: red.scheme == SchemeName::Xor,
                        parity: if red.scheme == SchemeName::Xor {
                            1
                        } else {
                            red.parity
                        },
                    }),
                ),
            })
            .unzip();
        let mut missing = String::new();
        let bin = crate::keepers::locate(&self.install.agent);
        for node in 0..nodes {
            let adopted = if self.restore.is_some() {
                match crate::keepers::Keeper::adopt(&self.job, node) {
                    Ok(k) => k,
                    Err(e) => {
                        self.log.line(format_args!("{e}"));
                        None
                    }
                }
            } else {
                None
            };
            let keeper = match (adopted, &bin) {
                (Some(k), _) => {
                    self.log.line(format_args!(
                        "node {node}: adopted its keeper (pid {}), store {}",
                        k.pid,
                        k.path.display()
                    ));
                    Some(k)
                }
                (None, Some(bin)) => match crate::keepers::Keeper::spawn(
                    bin,
                    &self.job,
                    node,
                    red.memory_limit.0,
                    red.grace.0,
                ) {
                    Ok(k) => {
                        self.log.line(format_args!(
                            "node {node}: keeper started (pid {}), store {}",
                            k.pid,
                            k.path.display()
                        ));
                        Some(k)
                    }
                    Err(e) => {
                        missing = e.to_string();
                        self.log.line(format_args!("{e}"));
                        None
                    }
                },
                (None, None) => {
                    missing = "mome-keeper was not found next to mome-agent (set MOME_KEEPER_BIN, or redundancy.scheme: disk)".into();
                    None
                }
            };
            if let (Some(k), Some(status)) = (&keeper, self.status.agents.get_mut(node as usize)) {
                status.store = Some(k.path.display().to_string());
                status.holders = match &parity[node as usize] {
                    Some(plan) => plan
                        .members
                        .iter()
                        .copied()
                        .filter(|&m| m != node)
                        .collect(),
                    None => replicas[node as usize].clone(),
                };
            }
            self.keepers.push(keeper);
        }
        if !missing.is_empty() {
            self.log.line(format_args!(
                "diskless checkpoints unavailable on some nodes: {missing}"
            ));
        }
        let stores = self
            .keepers
            .iter()
            .map(|k| k.as_ref().map(|k| k.path.clone()))
            .collect();
        self.ckpt.set_memory(crate::checkpoint::MemoryStores {
            stores,
            replicas,
            parity,
            disk_every: red.disk_every,
            missing,
        });
        self.status_dirty = true;
    }

    /// The keepers at the end: a clean end frees their memory; any other
    /// (failure, recovery by mome-restart) leaves it for the grace period.
    fn stop_keepers(&mut self, clean: bool) {
        for k in self.keepers.drain(..).flatten() {
            if clean {
                k.end();
            } else {
                k.release();
            }
        }
    }

    fn fail_setup(&mut self, code: i32, message: String) {
        self.say(format!("mome-run: {message}"));
        self.cause.get_or_insert(EndCause::Setup { code, message });
        self.phase = Phase::Done;
    }

    /// Prints a line of mome-run's own on stderr (after what the ranks
    /// wrote before it) and logs it.
    fn say(&mut self, message: String) {
        self.log.line(&message);
        self.stderr.push(format!("{message}\n").as_bytes());
    }

    // ---- the event loop ----

    fn event_loop(&mut self) {
        while self.phase != Phase::Done {
            let timeout = self.next_timeout();
            let events = match self.poll_once(timeout) {
                Ok(events) => events,
                Err(e) => {
                    // poll fails only on a bad fd or no memory: nothing
                    // sensible can follow; end the job cleanly.
                    self.say(format!(
                        "mome-run: internal error waiting for events: {e}; ending the job"
                    ));
                    self.cause.get_or_insert(EndCause::Setup {
                        code: 1,
                        message: format!("internal error: poll failed: {e}"),
                    });
                    self.kill_now();
                    self.wait_ranks_blocking();
                    self.phase = Phase::Done;
                    break;
                }
            };
            for (token, _revents) in events {
                self.dispatch(token);
            }
            if let Some(control) = self.control.as_mut() {
                control.sweep();
            }
            self.reap_children();
            self.check_deadlines();
            self.advance();
            self.flush_status();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let until = |t: Instant| t.saturating_duration_since(now);
        let mut wait = MAX_POLL;
        match self.phase {
            Phase::AgentStarting { deadline, .. } => wait = wait.min(until(deadline)),
            Phase::Ending {
                sigkill_at,
                sigkill_sent,
            } => {
                wait = wait.min(match sigkill_sent {
                    None => until(sigkill_at),
                    Some(sent) => until(sent + SIGKILL_WAIT),
                })
            }
            Phase::Draining { until: end, .. } => wait = wait.min(until(end)).min(LEFTOVER_SWEEP),
            Phase::Running | Phase::Done => {}
        }
        if let Some(at) = self.ckpt.next_deadline() {
            wait = wait.min(until(at));
        }
        if self.forward.as_ref().is_some_and(|f| !f.stdin_done) && !os::in_foreground_of(stdin_fd())
        {
            wait = wait.min(FOREGROUND_RECHECK);
        }
        Some(wait)
    }

    fn poll_once(&self, timeout: Option<Duration>) -> std::io::Result<Vec<(Token, PollFlags)>> {
        // The fds are borrowed from `self` only until poll returns: events
        // are handled after, with `self` mutable again.
        let mut list: Vec<(BorrowedFd<'_>, PollFlags, Token)> = Vec::new();
        for (signal, fd) in self.signals.fds() {
            list.push((fd, PollFlags::POLLIN, Token::Signal(signal)));
        }
        if let Some(control) = &self.control {
            for (which, fd, wants_write) in control.poll_list() {
                let mut events = PollFlags::POLLIN;
                if wants_write {
                    events |= PollFlags::POLLOUT;
                }
                list.push((fd, events, Token::Control(which)));
            }
        }
        for (index, agent) in self.agents.iter().enumerate() {
            if let Some(fd) = &agent.stdout {
                list.push((fd.as_fd(), PollFlags::POLLIN, Token::AgentStdout(index)));
            }
        }
        for (index, rank) in self.ranks.iter().enumerate() {
            for (stream, s) in rank.streams.iter().enumerate() {
                if let Some(s) = s {
                    // A destination that cannot keep up is not fed more:
                    // the rank blocks on its pipe, as it would natively.
                    if !self.sink(s.dest).backlogged() {
                        list.push((
                            s.fd.as_fd(),
                            PollFlags::POLLIN,
                            Token::RankOut { index, stream },
                        ));
                    }
                }
            }
        }
        if let Some(f) = &self.forward {
            if !f.stdin_done && f.buffer.len() < STDIN_BUFFER && os::in_foreground_of(stdin_fd()) {
                list.push((stdin_fd(), PollFlags::POLLIN, Token::Stdin));
            }
            if !f.buffer.is_empty() {
                list.push((f.to_rank0.as_fd(), PollFlags::POLLOUT, Token::Rank0Stdin));
            }
        }
        for dest in [Dest::Stdout, Dest::Stderr] {
            let sink = self.sink(dest);
            if sink.pending() > 0 {
                list.push((sink.fd(), PollFlags::POLLOUT, Token::Sink(dest)));
            }
        }
        let (mut fds, tokens): (Vec<PollFd<'_>>, Vec<Token>) = list
            .into_iter()
            .map(|(fd, events, token)| (PollFd::new(fd, events), token))
            .unzip();
        match nix::poll::poll(&mut fds, os::poll_timeout(timeout)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
        Ok(fds
            .iter()
            .zip(tokens)
            .filter_map(|(fd, token)| fd.revents().filter(|r| !r.is_empty()).map(|r| (token, r)))
            .collect())
    }

    fn sink(&self, dest: Dest) -> &Sink {
        match dest {
            Dest::Stdout => &self.stdout,
            Dest::Stderr => &self.stderr,
        }
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            Token::Signal(signal) => {
                let count = self.signals.take(signal);
                for _ in 0..count {
                    self.on_signal(signal);
                }
            }
            Token::Control(which) => {
                let status = &self.status;
                let mut deferred = Vec::new();
                if let Some(control) = self.control.as_mut() {
                    control.ready(which, &mut |client, request| {
                        answer_control(status, client, request, &mut deferred)
                    });
                }
                for (client, request) in deferred {
                    self.deferred_request(client, request);
                }
            }
            Token::AgentStdout(index) => self.read_agent_stdout(index),
            Token::RankOut { index, stream } => self.read_rank(index, stream),
            Token::Stdin => self.read_stdin(),
            Token::Rank0Stdin => self.write_rank0_stdin(),
            Token::Sink(dest) => {
                let (sink, name) = match dest {
                    Dest::Stdout => (&mut self.stdout, "stdout"),
                    Dest::Stderr => (&mut self.stderr, "stderr"),
                };
                if let Some(e) = sink.write_ready() {
                    self.log.line(format_args!(
                        "mome-run's {name} stopped taking output ({e}); discarding the ranks' {name} from now on"
                    ));
                }
            }
        }
    }

    // ---- checkpoints ----

    /// A control request that needs the coordinator: a checkpoint.
    fn deferred_request(&mut self, client: ClientId, request: ControlRequest) {
        let ControlRequest::Checkpoint { timeout_ms } = request else {
            return;
        };
        let refused = if self.phase != Phase::Running {
            Some(format!(
                "job {} is not running (it is {})",
                self.job.id,
                match self.phase {
                    Phase::AgentStarting { .. } => "starting",
                    _ => "ending",
                }
            ))
        } else if self
            .agents
            .iter()
            .any(|a| a.stdin.is_none() || a.exited.is_some())
        {
            Some("the job's agent is gone".to_string())
        } else if self.restore.is_some() && self.restored.len() < self.nranks as usize {
            Some(format!(
                "the job is still being restored ({} of {} rank(s) running again)",
                self.restored.len(),
                self.nranks
            ))
        } else {
            self.ranks.iter().find(|r| !r.alive()).map(|rank| {
                format!(
                    "rank {} has ended: only a job whose ranks all run can be checkpointed",
                    rank.rank
                )
            })
        };
        let timeout = timeout_ms.map(Duration::from_millis);
        let result = match refused {
            Some(message) => Err(message),
            None => self
                .ckpt
                .start(Requester::Client(client), timeout, Instant::now())
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(actions) => self.apply(actions),
            Err(message) => {
                self.log
                    .line(format_args!("checkpoint request refused: {message}"));
                self.reply(client, ControlReply::Error { message });
            }
        }
    }

    fn reply(&mut self, client: ClientId, reply: ControlReply) {
        if let Some(control) = self.control.as_mut() {
            if !control.send(client, &reply) && reply.is_final() {
                self.log.line(format_args!(
                    "the client that asked for the checkpoint is gone: {}",
                    serde_json::to_string(&reply).unwrap_or_default()
                ));
            }
        }
    }

    /// Carries out what the checkpointer asks.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::ToAgent { node, command } => {
                    if let Err(e) = self.send_agent(node, &command) {
                        self.log.line(format_args!(
                            "cannot send {command:?} to the agent of node {node}: {e}"
                        ));
                        if matches!(command, AgentCommand::Checkpoint { .. }) {
                            let more = self
                                .ckpt
                                .on_agent_gone(&format!("cannot reach the agent: {e}"));
                            self.apply(more);
                        }
                    }
                }
                Action::Reply { client, reply } => self.reply(client, reply),
                Action::Log(line) => self.log.line(line),
                Action::Say(line) => self.say(line),
            }
        }
        let inflight = self.ckpt.in_progress();
        if self.status.checkpointing != inflight
            || self.status.checkpoints.len() != self.ckpt.history.len()
        {
            self.status.checkpointing = inflight;
            self.status.checkpoints = self.ckpt.history.clone();
            self.status_dirty = true;
        }
    }

    /// One command line on the stdin of node `node`'s agent (non-blocking:
    /// a command is far smaller than the pipe, a full pipe is an agent
    /// reading nothing).
    fn send_agent(&mut self, node: u32, command: &AgentCommand) -> std::io::Result<()> {
        let Some(stdin) = self
            .agents
            .get(node as usize)
            .and_then(|a| a.stdin.as_ref())
        else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "its stdin is closed",
            ));
        };
        let mut line = serde_json::to_vec(command).expect("a command always serializes");
        line.push(b'\n');
        let mut done = 0;
        while done < line.len() {
            match os::write_some(stdin.as_fd(), &line[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        "its stdin pipe is full: it reads no commands",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A JSON event line of node `node`'s agent.
    fn on_agent_event(&mut self, node: u32, event: AgentEvent) {
        match event {
            AgentEvent::MeshReady { elapsed_us } => self.mesh_ready(node, elapsed_us),
            AgentEvent::NodeFailed {
                node: failed,
                reason,
            } => self.node_failed(
                failed,
                format!("{reason} (reported by the agent of node {node})"),
            ),
            AgentEvent::RankRestored {
                rank,
                since_start_us,
            } => {
                self.restored.insert(rank);
                self.log.line(format_args!(
                    "rank {rank} restored ({} ms after the agent started)",
                    since_start_us / 1000
                ));
                if self.restored.len() == self.nranks as usize {
                    self.log.line(format_args!(
                        "restart until running: {} ms (all {} rank(s) restored from stamp {})",
                        self.born.elapsed().as_millis(),
                        self.nranks,
                        self.restore.unwrap_or(0)
                    ));
                }
            }
            AgentEvent::RestoreError { reason } => {
                self.say(format!(
                    "mome: job {} cannot be restored: {reason}",
                    self.job.id
                ));
                if self.cause.is_none() {
                    self.cause = Some(EndCause::RestoreFailed { node, reason });
                    match self.phase {
                        Phase::Running => self.begin_ending(libc::SIGTERM),
                        Phase::AgentStarting { .. } => self.phase = Phase::Done,
                        _ => {}
                    }
                }
            }
            other => {
                let actions = self.ckpt.on_event(node, other, Instant::now());
                self.apply(actions);
            }
        }
    }

    // ---- signals ----

    fn on_signal(&mut self, signal: i32) {
        match signal {
            libc::SIGCHLD => {} // children are reaped after every poll round
            libc::SIGTSTP => self.suspend(),
            s if ENDING.contains(&s) => self.interrupt(s),
            _ => {}
        }
    }

    fn interrupt(&mut self, signal: i32) {
        self.interrupts += 1;
        let name = signal_name(signal);
        match self.phase {
            Phase::AgentStarting { .. } => {
                self.cause.get_or_insert(EndCause::Interrupted { signal });
                self.say(format!(
                    "mome: interrupted by {name}; ending job {}",
                    self.job.id
                ));
                self.phase = Phase::Done;
            }
            Phase::Running => {
                self.cause.get_or_insert(EndCause::Interrupted { signal });
                self.say(format!(
                    "mome: interrupted by {name}; ending job {}",
                    self.job.id
                ));
                self.begin_ending(signal);
            }
            Phase::Ending {
                sigkill_sent: None, ..
            } => {
                self.cause.get_or_insert(EndCause::Interrupted { signal });
                self.say(format!(
                    "mome: {name} again; killing the ranks of job {} now",
                    self.job.id
                ));
                self.kill_now();
            }
            Phase::Ending { .. } | Phase::Draining { .. } => {
                self.log
                    .line(format_args!("{name} while the job is already ending"));
            }
            Phase::Done => {}
        }
    }

    /// Ctrl-Z: stop the ranks, then mome-run itself, as the shell expects
    /// of a foreground job; continue them all when mome-run is continued.
    fn suspend(&mut self) {
        self.log.line("SIGTSTP: stopping the ranks and mome-run");
        if let Some(pgid) = self.pgid {
            let _ = os::signal_group(pgid, libc::SIGSTOP);
        }
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        // Continued (SIGCONT from `fg` or `bg`).
        if let Some(pgid) = self.pgid {
            let _ = os::signal_group(pgid, libc::SIGCONT);
        }
        self.log.line("continued: continuing the ranks");
    }

    // ---- ending the ranks ----

    /// Sends `signal` to the ranks (their group, and each rank by pid in
    /// case it left the group), then SIGKILL after the grace period.
    fn begin_ending(&mut self, signal: i32) {
        self.ckpt.disarm_periodic();
        self.signal_ranks(signal);
        if signal != libc::SIGKILL {
            // A stopped rank handles nothing until it is continued.
            self.signal_ranks(libc::SIGCONT);
        }
        let grace = self.config.job.kill_grace.0;
        self.log.line(format_args!(
            "sent {} to the ranks; SIGKILL in {}",
            signal_name(signal),
            humantime::format_duration(grace)
        ));
        self.phase = Phase::Ending {
            sigkill_at: Instant::now() + grace,
            sigkill_sent: None,
        };
    }

    fn kill_now(&mut self) {
        self.signal_ranks(libc::SIGKILL);
        self.log.line("sent SIGKILL to the ranks");
        let now = Instant::now();
        self.phase = Phase::Ending {
            sigkill_at: now,
            sigkill_sent: Some(now),
        };
    }

    fn signal_ranks(&mut self, signal: i32) {
        if let Some(pgid) = self.pgid {
            if let Err(e) = os::signal_group(pgid, signal) {
                self.log
                    .line(format_args!("kill(-{pgid}, {}): {e}", signal_name(signal)));
            }
        }
        // Ranks not yet reaped keep their pid: signalling it is safe (a
        // pinned rank's own pid too: its relay, not reaped, waits for it).
        for rank in self.ranks.iter().filter(|r| r.alive()) {
            if let Some(pid) = rank.shown_pid.or(rank.pid) {
                let _ = os::signal_process(pid, signal);
            }
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if self.ckpt.next_deadline().is_some_and(|at| now >= at) {
            let actions = self.ckpt.tick(now);
            self.apply(actions);
        }
        match self.phase {
            Phase::AgentStarting { deadline, awaiting } if now >= deadline => {
                let timeout = humantime::format_duration(self.config.job.agent_ready_timeout.0);
                let late: Vec<u32> = self
                    .agents
                    .iter()
                    .filter(|a| match awaiting {
                        Awaiting::Ready => !a.ready,
                        Awaiting::Mesh => !a.mesh_ready,
                    })
                    .map(|a| a.node)
                    .collect();
                let detail = match (awaiting, self.agents.len()) {
                    (Awaiting::Ready, 1) => format!("within {timeout}"),
                    (Awaiting::Ready, _) => {
                        format!("within {timeout} (no `ready <ip:port>` line)")
                    }
                    (Awaiting::Mesh, _) => {
                        format!("within {timeout} of `peers` (not connected to every peer)")
                    }
                };
                self.agents_not_ready(&late, awaiting, detail);
            }
            Phase::Ending {
                sigkill_at,
                sigkill_sent: None,
            } if now >= sigkill_at => {
                let alive: Vec<String> = self
                    .ranks
                    .iter()
                    .filter(|r| r.alive())
                    .map(|r| r.rank.to_string())
                    .collect();
                if !alive.is_empty() {
                    let grace = humantime::format_duration(self.config.job.kill_grace.0);
                    self.say(format!(
                        "mome: rank(s) {} still running {grace} later; killing them (SIGKILL)",
                        alive.join(",")
                    ));
                }
                self.kill_now();
            }
            Phase::Ending {
                sigkill_sent: Some(sent),
                ..
            } if now >= sent + SIGKILL_WAIT => {
                // Unkillable (stuck in the kernel): stop waiting, say so.
                let stuck: Vec<(usize, u32, i32)> = self
                    .ranks
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.alive())
                    .filter_map(|(i, r)| Some((i, r.rank, r.shown_pid.or(r.pid)?)))
                    .collect();
                for (index, rank, pid) in stuck {
                    self.say(format!(
                        "mome: rank {rank} (pid {pid}) did not die within {} of SIGKILL; no longer waiting for it",
                        humantime::format_duration(SIGKILL_WAIT)
                    ));
                    self.ranks[index].exited = Some(ProcessState::Killed(libc::SIGKILL));
                    self.status.ranks[index].state = ProcessState::Killed(libc::SIGKILL);
                    self.status_dirty = true;
                }
            }
            Phase::Draining { until, last_sweep } => {
                if now >= until {
                    let open: Vec<String> = self
                        .ranks
                        .iter()
                        .filter(|r| r.streams.iter().any(Option::is_some))
                        .map(|r| r.rank.to_string())
                        .collect();
                    if !open.is_empty() {
                        self.log.line(format_args!(
                            "output of rank(s) {} still open {} after the ranks ended; closing it",
                            open.join(","),
                            humantime::format_duration(DRAIN_WAIT)
                        ));
                    }
                    // What is already in the pipes was written before the
                    // ranks ended: read it even past the backlog limit (a
                    // slow reader of mome-run's stdout must not lose it),
                    // then close.
                    for index in 0..self.ranks.len() {
                        for stream in 0..2 {
                            self.read_rank_bounded(index, stream, FINAL_READ);
                        }
                    }
                    self.close_rank_streams();
                    self.phase = Phase::Done;
                } else if now >= last_sweep + LEFTOVER_SWEEP {
                    self.kill_leftovers_once();
                    self.phase = Phase::Draining {
                        until,
                        last_sweep: now,
                    };
                }
            }
            _ => {}
        }
    }

    /// Moves on when the ranks are all gone, or their output all read.
    fn advance(&mut self) {
        self.close_streams_to_closed_sinks();
        match self.phase {
            Phase::Running | Phase::Ending { .. } if self.ranks.iter().all(|r| !r.alive()) => {
                self.after_ranks()
            }
            Phase::Draining { .. }
                if self
                    .ranks
                    .iter()
                    .all(|r| r.streams.iter().all(Option::is_none)) =>
            {
                self.phase = Phase::Done;
            }
            _ => {}
        }
    }

    /// Every rank is gone: kill what they left behind (their process
    /// group, and whatever was reparented to mome-run), then read the rest
    /// of their output.
    fn after_ranks(&mut self) {
        self.ckpt.disarm_periodic();
        if let Some(pgid) = self.pgid {
            match os::signal_group(pgid, libc::SIGKILL) {
                Ok(true) => self.log.line(format_args!(
                    "killed the processes left in the ranks' process group {pgid}"
                )),
                Ok(false) => {}
                Err(e) => self.log.line(format_args!("kill(-{pgid}, SIGKILL): {e}")),
            }
        }
        self.forward = None;
        self.kill_leftovers_once();
        let now = Instant::now();
        self.phase = Phase::Draining {
            until: now + DRAIN_WAIT,
            last_sweep: now,
        };
    }

    /// SIGKILLs every child of mome-run but the agents: what is left are
    /// the orphans of the ranks (mome-run is their subreaper).
    fn kill_leftovers_once(&mut self) {
        let me = std::process::id() as i32;
        for pid in os::children_of(me) {
            if self.is_keeper(pid)
                || self.agents.iter().any(|a| a.pid == Some(pid) && a.alive())
                || self
                    .ranks
                    .iter()
                    .any(|r| r.pid == Some(pid) && r.exited.is_none())
            {
                continue;
            }
            let what = os::process_argv0(pid).unwrap_or_default();
            self.log.line(format_args!(
                "killing pid {pid} ({what}), left behind by the ranks"
            ));
            let _ = os::signal_process(pid, libc::SIGKILL);
        }
    }

    /// When mome-run's stdout (or stderr) goes away (`mome-run ... | head`),
    /// closes the ranks' pipes to it: their next write fails with EPIPE /
    /// SIGPIPE, as it would in a native pipeline, instead of the job running
    /// on unheard (think of `yes`).
    fn close_streams_to_closed_sinks(&mut self) {
        for dest in [Dest::Stdout, Dest::Stderr] {
            if self.sink(dest).closed().is_none() {
                continue;
            }
            let mut closed = Vec::new();
            for rank in &mut self.ranks {
                for slot in &mut rank.streams {
                    if slot.as_ref().is_some_and(|s| s.dest == dest) {
                        *slot = None;
                        closed.push(rank.rank.to_string());
                    }
                }
            }
            if !closed.is_empty() {
                self.log.line(format_args!(
                    "mome-run's {dest:?} is closed: closed the pipes of rank(s) {} to it",
                    closed.join(",")
                ));
            }
        }
    }

    fn close_rank_streams(&mut self) {
        for index in 0..self.ranks.len() {
            for stream in 0..2 {
                self.end_stream(index, stream);
            }
        }
    }

    /// Waits (bounded) for the ranks after a SIGKILL, outside the loop.
    fn wait_ranks_blocking(&mut self) {
        let deadline = Instant::now() + SIGKILL_WAIT;
        while self.ranks.iter().any(RankProc::alive) && Instant::now() < deadline {
            self.reap_children();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // ---- children ----

    fn reap_children(&mut self) {
        let mut reaped = Vec::new();
        loop {
            match os::reap(-1) {
                Ok(Some(r)) => reaped.push(r),
                Ok(None) => break,
                Err(e) => {
                    self.log.line(format_args!("waitpid: {e}"));
                    break;
                }
            }
        }
        // Agents first: when a node's agent and one of its ranks die in the
        // same instant (the rank because its agent went away), the job
        // ended because the node failed, not because of the rank.
        reaped.sort_by_key(|r| !self.agents.iter().any(|a| a.pid == Some(r.pid)));
        for r in reaped {
            self.on_reaped(r);
        }
    }

    fn on_reaped(&mut self, reaped: os::Reaped) {
        if let Some(index) = self
            .agents
            .iter()
            .position(|a| a.pid == Some(reaped.pid) && a.exited.is_none())
        {
            return self.on_agent_exit(index, reaped.state);
        }
        if let Some(index) = self
            .ranks
            .iter()
            .position(|r| r.pid == Some(reaped.pid) && r.exited.is_none())
        {
            return self.on_rank_exit(index, reaped.state);
        }
        if let Some(node) = self
            .keepers
            .iter()
            .flatten()
            .find(|k| k.pid == reaped.pid)
            .map(|k| k.node)
        {
            return self.on_keeper_exit(node, reaped.state);
        }
        self.log.line(format_args!(
            "reaped pid {} ({}), a process the ranks left behind",
            reaped.pid, reaped.state
        ));
    }

    /// The keeper of `node` died: the node's checkpoint memory (its own
    /// increments and the copies it held) is gone. With its agent dead too
    /// the node failed; alone, the job goes on, and its next checkpoints
    /// fail until it is restarted.
    fn on_keeper_exit(&mut self, node: u32, state: ProcessState) {
        self.log.line(format_args!(
            "keeper of node {node} {}",
            describe_end(state)
        ));
        if let Some(slot) = self.keepers.get_mut(node as usize) {
            *slot = None;
        }
        let agent_dead = self
            .agents
            .iter()
            .find(|a| a.node == node)
            .and_then(|a| a.pid)
            .is_some_and(|p| !os::process_exists(p) || os::is_zombie(p));
        if agent_dead {
            return self.node_failed(node, "its agent and its keeper died".into());
        }
        if matches!(self.phase, Phase::Running | Phase::AgentStarting { .. }) {
            self.say(format!(
                "mome: the keeper of node {node} {}: the node's checkpoint memory is lost; its checkpoints fail until the job is restarted",
                describe_end(state)
            ));
            self.ckpt
                .lose_store(node, format!("its keeper {}", describe_end(state)));
        }
    }

    fn on_rank_exit(&mut self, index: usize, state: ProcessState) {
        let rank = &mut self.ranks[index];
        rank.exited = Some(state);
        // The rank's own pid, not its mome-rankinit relay's.
        let (rank_no, pid) = (rank.rank, rank.shown_pid.or(rank.pid).unwrap_or(0));
        self.status.ranks[index].state = state;
        self.status_dirty = true;
        self.log.line(format_args!(
            "rank {rank_no} (pid {pid}) {}",
            describe_end(state)
        ));
        if index == 0 {
            // Nobody reads rank 0's stdin any more.
            self.forward = None;
        }
        let failed = state != ProcessState::Exited(0);
        if failed && self.cause.is_none() && self.phase == Phase::Running && self.agents.len() > 1 {
            // A rank ends when it loses its agent: if that agent is dead
            // (not reaped yet), its node failed, and the job may recover.
            let node = self.status.ranks[index].node;
            let agent = self.agents.iter().find(|a| a.node == node);
            if let Some(apid) = agent.and_then(|a| a.pid) {
                if !os::process_exists(apid) || os::is_zombie(apid) {
                    return self.node_failed(
                        node,
                        format!(
                            "its agent (pid {apid}) died (rank {rank_no} {} without it)",
                            describe_end(state)
                        ),
                    );
                }
            }
        }
        if failed && self.cause.is_none() && self.phase == Phase::Running {
            let others = self.ranks.iter().any(RankProc::alive);
            self.say(format!(
                "mome: rank {rank_no} (pid {pid}) {}{}",
                describe_end(state),
                if others { "; ending the job" } else { "" }
            ));
            self.cause = Some(EndCause::RankFailed {
                rank: rank_no,
                pid,
                state,
            });
            if others {
                self.begin_ending(libc::SIGTERM);
            }
        }
    }

    fn on_agent_exit(&mut self, index: usize, state: ProcessState) {
        let agent = &mut self.agents[index];
        agent.exited = Some(state);
        let (node, pid) = (agent.node, agent.pid.unwrap_or(0));
        let how = describe_end(state).trim_start_matches("was ").to_string();
        let actions = self
            .ckpt
            .on_agent_gone(&format!("the agent of node {node} {how}"));
        self.apply(actions);
        self.status.agents[index].state = state;
        self.status_dirty = true;
        self.log.line(format_args!(
            "agent of node {node} (pid {pid}) {}",
            describe_end(state)
        ));
        let log = self.job.agent_log(node);
        match self.phase {
            Phase::AgentStarting { awaiting, .. } => {
                self.agents_not_ready(&[node], awaiting, format!("(it {})", describe_end(state)));
            }
            Phase::Running if self.agents.len() == 1 => {
                let cause = EndCause::AgentDied { node, pid, state };
                self.say(format!("mome: {}; see {}", cause.reason(), log.display()));
                self.cause.get_or_insert(cause);
                self.begin_ending(libc::SIGTERM);
            }
            // While the job runs or its ranks are being ended, a node
            // whose agent is gone has failed. Once every rank is gone
            // (draining), the job's work is done whatever the agents do.
            Phase::Running | Phase::Ending { .. } => self.node_failed(
                node,
                format!(
                    "its agent (pid {pid}) {}; see {}",
                    describe_end(state),
                    log.display()
                ),
            ),
            _ => {}
        }
    }

    /// Node `node` is gone (its agent died, or an agent reported it): the
    /// first such news ends the job, later ones are only logged.
    fn node_failed(&mut self, node: u32, reason: String) {
        let running = matches!(self.phase, Phase::AgentStarting { .. } | Phase::Running);
        // A checkpoint in flight cannot count on that node any more.
        let actions = self
            .ckpt
            .on_agent_gone(&format!("node {node} failed ({reason})"));
        self.apply(actions);
        // While a restart is starting, the stamp it restores is committed.
        let restarting =
            self.restore.is_some() && matches!(self.phase, Phase::AgentStarting { .. });
        if running && self.cause.is_none() && (self.phase == Phase::Running || restarting) {
            if let Some(stamp) = self.recoverable() {
                if let Some(agent) = self.status.agents.get_mut(node as usize) {
                    agent.failed = Some(reason.clone());
                }
                self.say(format!(
                    "mome: node {node} failed: {reason}; restarting the job from its newest recoverable checkpoint (stamp {stamp} or older)"
                ));
                self.cause = Some(EndCause::NodeFailed { node, reason });
                self.recover = true;
                // The ranks and agents go back to the stamp: nothing they do
                // now counts, and their exit (freeing their memory, which
                // takes longer the more there is) is not waited for.
                self.ckpt.disarm_periodic();
                self.signal_ranks(libc::SIGKILL);
                for (_, pid) in self.live_agents() {
                    let _ = os::signal_process(pid, libc::SIGKILL);
                }
                self.phase = Phase::Done;
                return;
            }
        }
        if self.cause.is_some() || !running {
            // Often a consequence of the first failure (agents that lose a
            // peer, or are being stopped): not marked as failed.
            self.log.line(format_args!(
                "node {node} failed: {reason} (the job is already ending)"
            ));
            return;
        }
        if let Some(agent) = self.status.agents.get_mut(node as usize) {
            agent.failed = Some(reason.clone());
            self.status_dirty = true;
        }
        self.say(format!(
            "mome: node {node} failed: {reason}; ending the job"
        ));
        self.cause = Some(EndCause::NodeFailed { node, reason });
        if self.phase == Phase::Running {
            self.begin_ending(libc::SIGTERM);
        } else {
            // Still starting: no rank runs yet.
            self.phase = Phase::Done;
        }
    }

    /// A node failure can be recovered from: diskless checkpoints with
    /// `redundancy.on_failure: restart` and a committed stamp; returns it.
    fn recoverable(&mut self) -> Option<Stamp> {
        let on = self.config.redundancy.on_failure == OnFailure::Restart;
        let stores = self.keepers.iter().any(Option::is_some);
        on.then_some(())?;
        stores.then_some(())?;
        let fruitless = if self.ckpt.history.is_empty() {
            recoveries_so_far()
        } else {
            0
        };
        if fruitless >= MAX_FRUITLESS_RECOVERIES {
            self.say(format!(
                "mome: {fruitless} recoveries in a row committed no new checkpoint: not recovering again"
            ));
            return None;
        }
        self.ckpt.committed()
    }

    /// `pid` is one of the job's keepers (they outlive the job's processes).
    fn is_keeper(&self, pid: i32) -> bool {
        self.keepers.iter().flatten().any(|k| k.pid == pid)
    }

    /// The ranks' output goes untagged.
    fn tagged_off(&self) -> bool {
        !self.tagged
    }

    // ---- the agents ----

    fn read_agent_stdout(&mut self, index: usize) {
        let mut buf = [0u8; 4096];
        let node = self.agents[index].node;
        let Some(fd) = self.agents[index].stdout.as_ref() else {
            return;
        };
        let eof = match os::read_some(fd.as_fd(), &mut buf) {
            Ok(0) => true,
            Ok(n) => {
                self.agents[index].line.extend_from_slice(&buf[..n]);
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                self.log.line(format_args!(
                    "reading the stdout of the agent of node {node}: {e}"
                ));
                true
            }
        };
        while let Some(pos) = self.agents[index].line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.agents[index].line.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            let ready_line = text
                .strip_prefix("ready")
                .filter(|rest| rest.is_empty() || rest.starts_with(' '));
            match ready_line {
                Some(addr) if !self.agents[index].ready => self.agent_ready(index, addr.trim()),
                _ => {
                    if let Ok(event) = serde_json::from_str::<AgentEvent>(&text) {
                        self.on_agent_event(node, event);
                    } else if !text.is_empty() {
                        self.log.line(format_args!("agent {node}: {text}"));
                    }
                }
            }
        }
        if eof {
            self.agents[index].stdout = None;
            let actions = self
                .ckpt
                .on_agent_gone(&format!("the agent of node {node} closed its stdout"));
            self.apply(actions);
            if matches!(self.phase, Phase::AgentStarting { .. }) {
                // Usually the agent died: wait a moment for its status,
                // which says more than "closed its output".
                let deadline = Instant::now() + Duration::from_millis(500);
                while self.agents[index].exited.is_none()
                    && Instant::now() < deadline
                    && self.phase != Phase::Done
                {
                    self.reap_children();
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Phase::AgentStarting { awaiting, .. } = self.phase {
                    let detail = match awaiting {
                        Awaiting::Ready => "(it closed its stdout without printing `ready`)",
                        Awaiting::Mesh => "(it closed its stdout)",
                    };
                    self.agents_not_ready(&[node], awaiting, detail.to_string());
                }
            } else if self.agents[index].exited.is_none() {
                self.log.line(format_args!(
                    "the agent of node {node} closed its stdout: its events (node failures) can no longer be heard"
                ));
            }
        }
    }

    /// Ends the job before any rank started: the agents of `nodes` did not
    /// get to `awaiting`. Names them, what was awaited, and shows the end
    /// of their logs.
    fn agents_not_ready(&mut self, nodes: &[u32], awaiting: Awaiting, detail: String) {
        let who = match nodes {
            [node] => format!("the agent of node {node}"),
            _ => format!("the agents of nodes {}", rank_list(nodes)),
        };
        let what = match awaiting {
            Awaiting::Ready => "did not become ready",
            Awaiting::Mesh => "did not report `mesh_ready`",
        };
        let message = format!("{who} {what} {detail}");
        if self.restore.is_some() && self.cause.is_none() && !self.recover {
            // A node lost while a restart starts: restart again.
            if let (Some(&node), Some(_)) = (nodes.first(), self.recoverable()) {
                return self.node_failed(node, message);
            }
        }
        let logs: Vec<PathBuf> = nodes.iter().map(|&n| self.job.agent_log(n)).collect();
        self.say(format!(
            "mome-run: {message}; see {}",
            logs.iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        // The first few logs are enough to see what went wrong.
        for log in logs.iter().take(4) {
            let tail = jobdir::tail_lines(log, 10);
            if !tail.is_empty() {
                self.say(format!("mome-run: last lines of {}:", log.display()));
                for line in tail {
                    self.stderr.push(format!("  {line}\n").as_bytes());
                }
            }
        }
        self.cause
            .get_or_insert(EndCause::AgentNotReady { message });
        self.phase = Phase::Done;
    }

    /// Agent `index` printed its ready line, with `addr` after `ready`
    /// (required with several nodes: where it listens for its peers).
    fn agent_ready(&mut self, index: usize, addr: &str) {
        let multi = self.agents.len() > 1;
        let node = self.agents[index].node;
        let starting = matches!(
            self.phase,
            Phase::AgentStarting {
                awaiting: Awaiting::Ready,
                ..
            }
        );
        if multi && addr.parse::<std::net::SocketAddr>().is_err() {
            let detail = if addr.is_empty() {
                "(it printed `ready` without the address it listens on for its peers: is it a mome-agent without multi-node support?)".to_string()
            } else {
                format!("(its ready line gives `{addr}`, which is not an ip:port address)")
            };
            if starting {
                self.agents_not_ready(&[node], Awaiting::Ready, detail);
            } else {
                self.log.line(format_args!("agent {node}: ready {addr}"));
            }
            return;
        }
        let agent = &mut self.agents[index];
        agent.ready = true;
        if !addr.is_empty() {
            agent.addr = Some(addr.to_string());
            self.status.agents[index].addr = Some(addr.to_string());
        }
        self.status.agents[index].state = ProcessState::Running;
        self.status_dirty = true;
        self.log.line(format_args!(
            "agent of node {node} is ready{}",
            if addr.is_empty() {
                String::new()
            } else {
                format!(", listening on {addr}")
            }
        ));
        if !starting || !self.agents.iter().all(|a| a.ready) {
            return;
        }
        if multi {
            self.send_peers();
        } else {
            self.spawn_ranks();
        }
    }

    /// Every agent is ready: gives each the addresses of all (by node), and
    /// waits for their `mesh_ready`.
    fn send_peers(&mut self) {
        let addrs: Vec<String> = self
            .agents
            .iter()
            .map(|a| a.addr.clone().unwrap_or_default())
            .collect();
        let command = AgentCommand::Peers {
            addrs: addrs.clone(),
        };
        for node in 0..self.agents.len() as u32 {
            if let Err(e) = self.send_agent(node, &command) {
                return self.agents_not_ready(
                    &[node],
                    Awaiting::Mesh,
                    format!("(the `peers` command cannot be sent to it: {e})"),
                );
            }
        }
        let timeout = self.config.job.agent_ready_timeout.0;
        self.log.line(format_args!(
            "every agent is ready: sent peers {}; waiting up to {} for `mesh_ready`",
            addrs.join(","),
            humantime::format_duration(timeout)
        ));
        self.mesh_sent = Some(Instant::now());
        self.phase = Phase::AgentStarting {
            deadline: Instant::now() + timeout,
            awaiting: Awaiting::Mesh,
        };
    }

    /// Agent `node` is connected to all of its peers; the ranks start once
    /// every agent is.
    fn mesh_ready(&mut self, node: u32, elapsed_us: u64) {
        let meshing = matches!(
            self.phase,
            Phase::AgentStarting {
                awaiting: Awaiting::Mesh,
                ..
            }
        );
        let Some(agent) = self.agents.get_mut(node as usize).filter(|_| meshing) else {
            self.log.line(format_args!(
                "agent {node}: unexpected mesh_ready (the job is not forming its mesh); ignored"
            ));
            return;
        };
        agent.mesh_ready = true;
        self.log.line(format_args!(
            "agent of node {node} is connected to its {} peer(s), {} ms after `peers`",
            self.agents.len() - 1,
            elapsed_us / 1000
        ));
        if self.agents.iter().all(|a| a.mesh_ready) {
            self.log.line(format_args!(
                "mesh of {} nodes ready {} ms after `peers`; starting the ranks",
                self.agents.len(),
                self.mesh_sent.map_or(0, |t| t.elapsed().as_millis())
            ));
            self.spawn_ranks();
        }
    }

    // ---- the ranks ----

    fn spawn_ranks(&mut self) {
        self.status.state = JobState::Running;
        self.status_dirty = true;
        self.phase = Phase::Running;
        for index in 0..self.ranks.len() {
            let rank = index as u32;
            let stdin = if rank == 0 {
                self.rank0_stdin
            } else {
                RankStdin::Null
            };
            let output = if self.tagged {
                spawn::RankOutput::Tagged
            } else {
                spawn::RankOutput::Inherited
            };
            match spawn::spawn_rank(&self.launch, rank, self.pgid, stdin, output) {
                Ok(child) => {
                    self.pgid.get_or_insert(child.pid);
                    let mut streams = [None, None];
                    for (slot, (fd, dest)) in
                        [(child.stdout, Dest::Stdout), (child.stderr, Dest::Stderr)]
                            .into_iter()
                            .enumerate()
                    {
                        let Some(fd) = fd else { continue };
                        if let Err(e) = os::set_nonblocking(fd.as_fd()) {
                            self.log.line(format_args!(
                                "rank {rank}: cannot make its pipe non-blocking: {e}"
                            ));
                        }
                        streams[slot] = Some(RankStream {
                            fd,
                            dest,
                            tagger: LineTagger::new(rank, self.tagged),
                        });
                    }
                    if let Some(stdin) = child.stdin {
                        let to_rank0 = OwnedFd::from(stdin);
                        if let Err(e) = os::set_nonblocking(to_rank0.as_fd()) {
                            self.log.line(format_args!(
                                "cannot make rank 0's stdin pipe non-blocking: {e}"
                            ));
                        }
                        self.forward = Some(StdinForward {
                            to_rank0,
                            buffer: Vec::new(),
                            stdin_done: false,
                        });
                    }
                    let proc = &mut self.ranks[index];
                    proc.pid = Some(child.pid);
                    proc.shown_pid = child.pinned.is_none().then_some(child.pid);
                    proc.streams = streams;
                    self.status.ranks[index].pid = proc.shown_pid;
                    self.status.ranks[index].state = ProcessState::Running;
                }
                Err(e) => {
                    let code = e.exit_code();
                    self.say(format!("mome-run: {e}"));
                    self.cause.get_or_insert(EndCause::Setup {
                        code,
                        message: e.to_string(),
                    });
                    if self.pgid.is_some() {
                        self.begin_ending(libc::SIGTERM);
                    }
                    // With no rank started, advance() moves straight on.
                    return;
                }
            }
        }
        if self.launch.rankinit.is_some() {
            self.find_pinned_ranks();
        }
        self.ckpt.arm_periodic(Instant::now());
        let pids: Vec<String> = self
            .ranks
            .iter()
            .filter_map(|r| r.shown_pid)
            .map(|p| p.to_string())
            .collect();
        self.log.line(format_args!(
            "started {} rank(s) in process group {}: pids {}",
            self.ranks.len(),
            self.pgid.unwrap_or(0),
            pids.join(",")
        ));
    }

    /// Learns each rank's own pid under its mome-rankinit (bounded: the
    /// ranks were all forked already, this waits for their init to fork
    /// them in turn). A rank not found keeps its relay's pid as shown pid.
    fn find_pinned_ranks(&mut self) {
        for index in 0..self.ranks.len() {
            let rank = &self.ranks[index];
            let (Some(relay), None) = (rank.pid, rank.shown_pid) else {
                continue;
            };
            let inner = pidns::pinned_pid(rank.rank);
            let pid = match pidns::wait_rank_pid(relay, inner, RANK_PID_WAIT) {
                Ok(pid) => pid,
                Err(e) => {
                    self.log
                        .line(format_args!("rank {}: {e}; showing pid {relay}", rank.rank));
                    relay
                }
            };
            self.ranks[index].shown_pid = Some(pid);
            self.status.ranks[index].pid = Some(pid);
        }
        self.status_dirty = true;
    }

    fn read_rank(&mut self, index: usize, stream: usize) {
        let mut buf = vec![0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKEUP {
            let Some(s) = self.ranks[index].streams[stream].as_mut() else {
                return;
            };
            let sink = match s.dest {
                Dest::Stdout => &mut self.stdout,
                Dest::Stderr => &mut self.stderr,
            };
            if sink.backlogged() {
                return;
            }
            match os::read_some(s.fd.as_fd(), &mut buf) {
                Ok(0) => return self.end_stream(index, stream),
                Ok(n) => s.tagger.feed(&buf[..n], sink),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.log
                        .line(format_args!("reading the output of rank {index}: {e}"));
                    return self.end_stream(index, stream);
                }
            }
        }
    }

    /// Reads up to `limit` bytes of a rank's pipe whatever the backlog of
    /// its destination, stopping at end of file or an empty pipe.
    fn read_rank_bounded(&mut self, index: usize, stream: usize, limit: usize) {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut total = 0;
        while total < limit {
            let Some(s) = self.ranks[index].streams[stream].as_mut() else {
                return;
            };
            let sink = match s.dest {
                Dest::Stdout => &mut self.stdout,
                Dest::Stderr => &mut self.stderr,
            };
            match os::read_some(s.fd.as_fd(), &mut buf) {
                Ok(0) => return self.end_stream(index, stream),
                Ok(n) => {
                    s.tagger.feed(&buf[..n], sink);
                    total += n;
                }
                Err(_) => return,
            }
        }
    }

    fn end_stream(&mut self, index: usize, stream: usize) {
        if let Some(mut s) = self.ranks[index].streams[stream].take() {
            let sink = match s.dest {
                Dest::Stdout => &mut self.stdout,
                Dest::Stderr => &mut self.stderr,
            };
            s.tagger.finish(sink);
        }
    }

    // ---- terminal input for rank 0 ----

    fn read_stdin(&mut self) {
        let Some(f) = self.forward.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        // The terminal fd is blocking (its flags are shared with the shell),
        // but poll said it is readable: this read returns at once.
        match os::read_some(stdin_fd(), &mut buf) {
            Ok(0) => f.stdin_done = true,
            Ok(n) => f.buffer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                self.log
                    .line(format_args!("reading stdin: {e}; closing rank 0's stdin"));
                f.stdin_done = true;
            }
        }
        self.write_rank0_stdin();
    }

    fn write_rank0_stdin(&mut self) {
        let Some(f) = self.forward.as_mut() else {
            return;
        };
        while !f.buffer.is_empty() {
            match os::write_some(f.to_rank0.as_fd(), &f.buffer) {
                Ok(n) => {
                    f.buffer.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE: rank 0 closed its stdin; nothing more to send.
                    self.forward = None;
                    return;
                }
            }
        }
        if f.stdin_done {
            // End of input: closing the pipe gives rank 0 its EOF.
            self.forward = None;
        }
    }

    // ---- status ----

    fn flush_status(&mut self) {
        if self.status_dirty {
            self.status_dirty = false;
            if let Err(e) = self.job.write_status(&self.status) {
                self.log.line(format_args!("{e}"));
            }
        }
    }

    // ---- the end ----

    /// Stops the agent, kills what is left, writes the final status,
    /// flushes the output; returns the job's exit status, and whether the
    /// job is to be recovered by mome-restart.
    fn finish(mut self) -> (i32, bool) {
        let actions = self.ckpt.on_job_end();
        self.apply(actions);
        if let Some(control) = self.control.as_mut() {
            // The last replies (a checkpoint that will not be) are small:
            // one attempt puts them in the sockets' buffers.
            control.flush_all();
        }
        self.forward = None;
        self.close_rank_streams();
        self.stop_agents();
        self.kill_leftovers();
        drop(self.control.take());
        for agent in &self.agents {
            let _ = std::fs::remove_file(self.job.agent_socket(agent.node));
        }

        let exit_code = self.cause.as_ref().map_or(0, EndCause::exit_code);
        self.status.state = if exit_code == 0 && self.cause.is_none() {
            JobState::Finished
        } else {
            JobState::Failed
        };
        self.status.exit_code = Some(exit_code);
        self.status.reason = self.cause.as_ref().map(EndCause::reason);
        self.status.ended = Some(now_rfc3339());
        self.status_dirty = true;
        self.flush_status();
        self.log.line(format_args!(
            "job ended: {:?}, exit status {exit_code}{}",
            self.status.state,
            self.status
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        self.flush_output();
        // Memory worth keeping for mome-restart: a committed stamp after an
        // abnormal end.
        let keep = (exit_code != 0 || self.cause.is_some()) && self.ckpt.committed().is_some();
        self.stop_keepers(!keep);
        // Decoded data of a parity restart (RAM) is no longer needed.
        crate::parity::remove_decoded(&self.job.id);
        (exit_code, self.recover)
    }

    /// Stops every agent, all at once: EOF on its stdin first (its cue to
    /// exit), SIGTERM for one busy elsewhere, SIGKILL for one that ignores
    /// that; each step bounded.
    fn stop_agents(&mut self) {
        for agent in &mut self.agents {
            agent.stdin = None;
            agent.stdout = None;
        }
        if self.recover {
            // The job restarts from a stamp: nothing of these agents is
            // needed (their checkpoint data is in the keepers). Killed, not
            // waited for: the next incarnation reaps them.
            for (_, pid) in self.live_agents() {
                let _ = os::signal_process(pid, libc::SIGKILL);
            }
            return;
        }
        // An agent that exits on EOF by itself reports a clean exit status.
        if self.wait_for_agents(AGENT_EOF_WAIT) {
            return;
        }
        for (_, pid) in self.live_agents() {
            let _ = os::signal_process(pid, libc::SIGTERM);
        }
        if self.wait_for_agents(AGENT_STOP_WAIT) {
            return;
        }
        for (node, pid) in self.live_agents() {
            self.say(format!(
                "mome: the agent of node {node} (pid {pid}) did not exit within {} of SIGTERM; killing it",
                humantime::format_duration(AGENT_STOP_WAIT)
            ));
            let _ = os::signal_process(pid, libc::SIGKILL);
        }
        if self.wait_for_agents(AGENT_STOP_WAIT) {
            return;
        }
        for (node, pid) in self.live_agents() {
            self.say(format!(
                "mome: the agent of node {node} (pid {pid}) did not die after SIGKILL; leaving it"
            ));
        }
    }

    /// (node, pid) of the agents still running.
    fn live_agents(&self) -> Vec<(u32, i32)> {
        self.agents
            .iter()
            .filter(|a| a.alive())
            .filter_map(|a| Some((a.node, a.pid?)))
            .collect()
    }

    /// Waits up to `timeout` for every agent to have exited.
    fn wait_for_agents(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_children();
            if !self.agents.iter().any(AgentProc::alive) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills and reaps every remaining child of mome-run (bounded).
    fn kill_leftovers(&mut self) {
        if self.recover {
            // As the agents (see stop_agents): killed, not waited for.
            self.kill_leftovers_once();
            return;
        }
        let deadline = Instant::now() + LEFTOVER_WAIT;
        loop {
            self.reap_children();
            let left: Vec<i32> = os::children_of(std::process::id() as i32)
                .into_iter()
                .filter(|&p| !self.is_keeper(p))
                .collect();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let pids: Vec<String> = left.iter().map(i32::to_string).collect();
                self.say(format!(
                    "mome: process(es) {} of the job did not die within {} of SIGKILL",
                    pids.join(","),
                    humantime::format_duration(LEFTOVER_WAIT)
                ));
                return;
            }
            self.kill_leftovers_once();
            for rank in self.ranks.iter().filter(|r| r.alive()) {
                if let Some(pid) = rank.pid {
                    let _ = os::signal_process(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes what the sinks still hold; gives up when they take nothing
    /// for FLUSH_STALL or when the user interrupts again.
    fn flush_output(&mut self) {
        let mut last_progress = Instant::now();
        loop {
            let pending = self.stdout.pending() + self.stderr.pending();
            if pending == 0 {
                return;
            }
            let mut fds = Vec::new();
            for sink in [&self.stdout, &self.stderr] {
                if sink.pending() > 0 {
                    fds.push(PollFd::new(sink.fd(), PollFlags::POLLOUT));
                }
            }
            let signal_fds: Vec<(i32, BorrowedFd<'_>)> = self
                .signals
                .fds()
                .filter(|(s, _)| ENDING.contains(s))
                .collect();
            for (_, fd) in &signal_fds {
                fds.push(PollFd::new(*fd, PollFlags::POLLIN));
            }
            let _ = nix::poll::poll(&mut fds, os::poll_timeout(Some(MAX_POLL)));
            drop(fds);
            if ENDING.iter().any(|&s| self.signals.take(s) > 0) {
                self.log
                    .line("interrupted while writing the last output; dropping it");
                return;
            }
            self.stdout.write_ready();
            self.stderr.write_ready();
            let now_pending = self.stdout.pending() + self.stderr.pending();
            if now_pending < pending {
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= FLUSH_STALL {
                self.log.line(format_args!(
                    "stdout/stderr took nothing for {}; dropping the last {now_pending} bytes",
                    humantime::format_duration(FLUSH_STALL)
                ));
                return;
            }
        }
    }
}

/// The control socket's immediate answers; requests that need the whole
/// coordinator (checkpoints) are put aside in `deferred`.
fn answer_control(
    status: &JobStatus,
    client: ClientId,
    request: ControlRequest,
    deferred: &mut Vec<(ClientId, ControlRequest)>,
) -> Option<ControlReply> {
    match request {
        ControlRequest::Status => Some(ControlReply::Status(status.clone())),
        ControlRequest::Checkpoint { .. } => {
            deferred.push((client, request));
            None
        }
    }
}

/// `block` or `cyclic`, as in the configuration and on the command line.
pub fn placement_name(placement: Placement) -> &'static str {
    match placement {
        Placement::Block => "block",
        Placement::Cyclic => "cyclic",
    }
}

/// `0-3`, `0,2,4`, `0-2,5`: a sorted set of ranks (or nodes), runs of
/// three or more folded into ranges.
pub fn rank_list(items: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i;
        while j + 1 < items.len() && items[j + 1] == items[j] + 1 {
            j += 1;
        }
        parts.push(if j > i + 1 {
            format!("{}-{}", items[i], items[j])
        } else if j == i + 1 {
            format!("{},{}", items[i], items[j])
        } else {
            items[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process (the Rust runtime
    // reopens it on /dev/null if it was closed at startup; mome-run never
    // closes it).
    unsafe { BorrowedFd::borrow_raw(libc::STDIN_FILENO) }
}
