//! Starting the processes of a job: the node agents and the ranks.
//!
//! Every child is forked from the main thread, because PR_SET_PDEATHSIG
//! fires when the *thread* that forked exits, not the process: a child
//! spawned from a worker thread would be killed when that thread ends.
//! Children die with mome-run (PDEATHSIG = SIGKILL), the agent in a process
//! group of its own and the ranks all together in another (so a Ctrl-C on
//! the terminal reaches mome-run only, which decides what the job does).
//! With pinned pids a rank is started through mome-rankinit (see
//! [`crate::pidns`]), which keeps all of the above for the rank itself.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};

use mome_protocol::env;
use mome_protocol::job::JobDir;

/// Environment variable overriding where mome-agent is found.
pub const AGENT_BIN_VAR: &str = "MOME_AGENT_BIN";
/// Environment variable overriding where libmome_preload.so is found.
pub const PRELOAD_LIB_VAR: &str = "MOME_PRELOAD_LIB";
pub const AGENT_BIN_NAME: &str = "mome-agent";
pub const PRELOAD_LIB_NAME: &str = "libmome_preload.so";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot find {what}: {path} does not exist{hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("{what} {path} cannot be used: {reason}")]
    Unusable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot locate mome-run's own executable (to find mome-agent next to it): {0}")]
    OwnPath(std::io::Error),
    #[error("cannot open the agent's log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the agent of node {node} ({path}): {source}")]
    Agent {
        node: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start rank {rank} ({path}): {source}")]
    Rank {
        rank: u32,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SpawnError {
    /// Exit status of mome-run when this ends the job: as a shell reports
    /// a command that cannot be executed.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::Rank { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) => 127,
                Some(libc::EACCES) | Some(libc::ENOEXEC) => 126,
                _ => 1,
            },
            SpawnError::Missing { .. } | SpawnError::Unusable { .. } | SpawnError::OwnPath(_) => 2,
            _ => 1,
        }
    }
}

/// Where mome's own pieces are: next to mome-run unless overridden.
#[derive(Debug, Clone)]
pub struct Install {
    pub agent: PathBuf,
    pub preload: PathBuf,
    /// mome-rankinit, checked only when pids are to be pinned.
    pub rankinit: PathBuf,
}

impl Install {
    /// Finds mome-agent and libmome_preload.so next to mome-run's own
    /// executable, or where MOME_AGENT_BIN / MOME_PRELOAD_LIB say.
    pub fn locate() -> Result<Install, SpawnError> {
        let own_dir = || -> Result<PathBuf, SpawnError> {
            let exe = std::env::current_exe().map_err(SpawnError::OwnPath)?;
            Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        let agent = match std::env::var_os(AGENT_BIN_VAR).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => own_dir()?.join(AGENT_BIN_NAME),
        };
        let preload = match std::env::var_os(PRELOAD_LIB_VAR).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => own_dir()?.join(PRELOAD_LIB_NAME),
        };
        let rankinit = crate::pidns::locate_rankinit(&own_dir()?);
        let rankinit = std::path::absolute(&rankinit).unwrap_or(rankinit);
        let hint = |var: &str| {
            format!(" (build the whole workspace with `make`, or set {var} to where it is)")
        };
        if !agent.is_file() {
            return Err(SpawnError::Missing {
                what: AGENT_BIN_NAME,
                path: agent,
                hint: hint(AGENT_BIN_VAR),
            });
        }
        if nix::unistd::access(&agent, nix::unistd::AccessFlags::X_OK).is_err() {
            return Err(SpawnError::Unusable {
                what: AGENT_BIN_NAME,
                path: agent,
                reason: "it is not executable".into(),
            });
        }
        if !preload.is_file() {
            return Err(SpawnError::Missing {
                what: PRELOAD_LIB_NAME,
                path: preload,
                hint: hint(PRELOAD_LIB_VAR),
            });
        }
        let preload = std::path::absolute(&preload).unwrap_or(preload);
        // ld.so splits LD_PRELOAD at spaces and colons: such a path cannot
        // be preloaded at all.
        if preload
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|&b| b == b' ' || b == b':')
        {
            return Err(SpawnError::Unusable {
                what: PRELOAD_LIB_NAME,
                path: preload,
                reason:
                    "LD_PRELOAD cannot name a path with a space or a colon; install mome elsewhere"
                        .into(),
            });
        }
        let agent = std::path::absolute(&agent).unwrap_or(agent);
        Ok(Install {
            agent,
            preload,
            rankinit,
        })
    }
}

/// A started agent: its pid, the pipe it reads (it exits when mome-run
/// closes it, or dies), and the pipe it announces `ready` on.
#[derive(Debug)]
pub struct AgentChild {
    pub pid: i32,
    pub stdin: Option<ChildStdin>,
    pub stdout: OwnedFd,
}

/// Starts `mome-agent --job-dir DIR --node K --nodes N --ranks a,b,...
/// [EXTRA...]` with stderr into logs/agent-K.log (`extra`: `--restore S
/// --ckpt-dir ROOT` for a restart).
pub fn spawn_agent(
    install: &Install,
    job: &JobDir,
    node: u32,
    nodes: u32,
    ranks: &[u32],
    extra: &[OsString],
) -> Result<AgentChild, SpawnError> {
    let log_path = job.agent_log(node);
    let log = crate::jobdir::open_private_log(&log_path).map_err(|e| SpawnError::Log {
        path: log_path.clone(),
        source: match e {
            crate::jobdir::JobDirError::Create { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        },
    })?;
    let rank_list = ranks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(&install.agent);
    cmd.arg("--job-dir")
        .arg(&job.path)
        .arg("--node")
        .arg(node.to_string())
        .arg("--nodes")
        .arg(nodes.to_string())
        .arg("--ranks")
        .arg(rank_list)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Its own group: a Ctrl-C on the terminal must not reach it.
        .process_group(0);
    die_with_parent(&mut cmd, None);
    let mut child = cmd.spawn().map_err(|source| SpawnError::Agent {
        node,
        path: install.agent.clone(),
        source,
    })?;
    let stdout = OwnedFd::from(child.stdout.take().expect("stdout was piped"));
    Ok(AgentChild {
        pid: child.id() as i32,
        stdin: child.stdin.take(),
        stdout,
    })
}

/// Where a rank's stdin comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankStdin {
    /// mome-run's own stdin, shared (not a terminal).
    Inherit,
    /// A pipe that mome-run fills from its terminal: the ranks run in a
    /// background process group and would be stopped reading the tty.
    Pipe,
    Null,
}

/// What every rank of the job is started with.
#[derive(Debug, Clone)]
pub struct RankLaunch {
    /// Resolved absolute path of the program.
    pub program: PathBuf,
    /// argv, argv[0] as the user typed it.
    pub argv: Vec<OsString>,
    pub cwd: PathBuf,
    pub preload: PathBuf,
    pub jobid: String,
    pub nranks: u32,
    /// The node of each rank (index: rank).
    pub placement: Vec<u32>,
    /// The socket of each node's agent (index: node).
    pub agent_sockets: Vec<PathBuf>,
    pub agent_timeout_ms: u128,
    /// The soft RLIMIT_NOFILE mome-run started with: mome-run raises its
    /// own for the ranks' pipes, the ranks get the original back.
    pub nofile_soft: u64,
    /// mome-rankinit, when each rank runs in a pid namespace of its own at
    /// pid `pidns::pinned_pid(rank)`.
    pub rankinit: Option<PathBuf>,
    /// The whole environment of the ranks (a restart gives them the
    /// recorded one); None: mome-run's own.
    pub env: Option<BTreeMap<String, String>>,
    /// Set for every rank on top (MOME_CKPT_SIGNAL, MOME_RESTORE).
    pub extra_env: Vec<(String, String)>,
}

/// A started rank and mome-run's ends of its pipes (none for output the
/// rank writes straight to mome-run's own stdout/stderr).
#[derive(Debug)]
pub struct RankChild {
    /// The child mome-run waits for: the rank, or its mome-rankinit relay,
    /// which ends as the rank did.
    pub pid: i32,
    /// With a pid namespace: the rank's pid inside it.
    pub pinned: Option<i32>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Where a rank's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankOutput {
    /// Pipes read by mome-run, which tags each line with the rank.
    Tagged,
    /// mome-run's own stdout and stderr: untagged output needs no relay,
    /// costs nothing, and the program sees what it would natively (a
    /// terminal, a file, SIGPIPE from a closed pipe).
    Inherited,
}

/// Starts rank `rank` in process group `pgid` (None: a new group led by
/// this rank, for rank 0).
pub fn spawn_rank(
    launch: &RankLaunch,
    rank: u32,
    pgid: Option<i32>,
    stdin: RankStdin,
    output: RankOutput,
) -> Result<RankChild, SpawnError> {
    let existing_preload = match &launch.env {
        Some(env) => env.get("LD_PRELOAD").map(OsString::from),
        None => std::env::var_os("LD_PRELOAD"),
    };
    let preload = preload_value(&launch.preload, existing_preload.as_deref());
    let pinned = launch
        .rankinit
        .as_ref()
        .map(|_| crate::pidns::pinned_pid(rank));
    let mut cmd = match (&launch.rankinit, pinned) {
        (Some(rankinit), Some(pid)) => {
            // mome-rankinit itself must not be preloaded: the value goes
            // under another name, for the rank only.
            let mut cmd = Command::new(rankinit);
            cmd.arg("--pid")
                .arg(pid.to_string())
                .arg("--")
                .arg(&launch.program)
                .args(&launch.argv);
            if launch.argv.is_empty() {
                cmd.arg(&launch.program);
            }
            cmd.env_remove("LD_PRELOAD")
                .env(crate::pidns::PRELOAD_VAR, &preload);
            cmd
        }
        _ => {
            let mut cmd = Command::new(&launch.program);
            if let Some(argv0) = launch.argv.first() {
                cmd.arg0(argv0);
            }
            cmd.args(launch.argv.iter().skip(1))
                .env("LD_PRELOAD", &preload);
            cmd
        }
    };
    if let Some(env) = &launch.env {
        cmd.env_clear().envs(env);
        if pinned.is_some() {
            cmd.env_remove("LD_PRELOAD")
                .env(crate::pidns::PRELOAD_VAR, &preload);
        } else {
            cmd.env("LD_PRELOAD", &preload);
        }
    }
    let node = launch.placement.get(rank as usize).copied().unwrap_or(0);
    let socket = launch
        .agent_sockets
        .get(node as usize)
        .expect("every node of the placement has an agent socket");
    cmd.current_dir(&launch.cwd)
        .envs(launch.extra_env.iter().map(|(k, v)| (k, v)))
        .env(env::RANK, rank.to_string())
        .env(env::NRANKS, launch.nranks.to_string())
        .env(env::NODE, node.to_string())
        .env(env::JOBID, &launch.jobid)
        .env(env::AGENT_SOCKET, socket)
        .env(env::AGENT_TIMEOUT_MS, launch.agent_timeout_ms.to_string())
        // A MOME_RANK_PID inherited from an enclosing job would make the
        // preload think this rank is someone's forked child.
        .env_remove(env::RANK_PID)
        .stdin(match stdin {
            RankStdin::Inherit => Stdio::inherit(),
            RankStdin::Pipe => Stdio::piped(),
            RankStdin::Null => Stdio::null(),
        })
        .process_group(pgid.unwrap_or(0));
    match output {
        RankOutput::Tagged => cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
        RankOutput::Inherited => cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit()),
    };
    die_with_parent(&mut cmd, Some(launch.nofile_soft));
    let mut child = cmd.spawn().map_err(|source| SpawnError::Rank {
        rank,
        path: launch.program.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    // The child calls setpgid itself before exec; calling it here as well
    // closes the window in which mome-run could signal the group before
    // the child joined it. EACCES (it already exec'd) and ESRCH (it already
    // died) mean there is nothing left to do.
    let group = pgid.unwrap_or(pid);
    let _ = nix::unistd::setpgid(
        nix::unistd::Pid::from_raw(pid),
        nix::unistd::Pid::from_raw(group),
    );
    Ok(RankChild {
        pid,
        pinned,
        stdin: child.stdin.take(),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}

/// `ours` first, then what was already in LD_PRELOAD.
pub fn preload_value(ours: &Path, existing: Option<&OsStr>) -> OsString {
    let mut value = ours.as_os_str().to_os_string();
    if let Some(existing) = existing.filter(|e| !e.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    value
}

/// Makes the child die with mome-run and, for ranks (`nofile` given), run
/// with ASLR disabled and the open-files limit mome-run started with.
fn die_with_parent(cmd: &mut Command, nofile: Option<u64>) {
    let parent = std::process::id() as libc::pid_t;
    let closure = move || -> std::io::Result<()> {
        // Only raw system calls here: this runs between fork and exec, where
        // allocating or locking could deadlock.
        if let Some(soft) = nofile {
            // A rank gets stdin, stdout and stderr, nothing else mome-run
            // inherited: a descriptor leaked by whatever started mome-run
            // (a pipe of a shell or a CI runner) would otherwise make the
            // rank uncheckpointable (a pipe to outside the job).
            // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
            unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                )
            };
            // The job runs with ASLR disabled from its first launch, so that
            // a restart finds libraries and stacks at the same addresses.
            // SAFETY: personality(0xffffffff) only reads the persona.
            let persona = unsafe { libc::personality(0xffff_ffff) };
            if persona == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let wanted = persona as libc::c_ulong | libc::ADDR_NO_RANDOMIZE as libc::c_ulong;
            // SAFETY: sets a flag of this (child) process's persona.
            if unsafe { libc::personality(wanted) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit/setrlimit read and write one rlimit struct
            // that lives on this stack.
            unsafe {
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur > soft {
                    limit.rlim_cur = soft;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                }
            }
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes the signal by value.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // mome-run may have died between fork and prctl: then the death
        // signal will never come, so give up now.
        // SAFETY: getppid has no arguments and cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure makes only async-signal-safe system calls
    // (close_range, personality, getrlimit, setrlimit, prctl, getppid), allocates
    // nothing and takes no lock, as required between fork and exec.
    unsafe {
        cmd.pre_exec(closure);
    }
}
