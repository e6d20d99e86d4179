//! `mome-agent`: the per-node agent of a mome job. It owns the node's DSM
//! memory file, accepts the connections of the ranks of its node on a unix
//! socket in the job directory, and serves their requests (heaps, shared
//! segments, barriers, locks) and their shared-segment page faults.
//!
//! This file owns the command line, startup (memfd, socket, the `ready`
//! line, the checkpoint to restore) and shutdown (SIGTERM/SIGINT, or end of
//! stdin: mome-run holds the write end, so the agent goes when mome-run
//! does). Between the two, stdin carries the coordinator's commands and
//! stdout the agent's events (`events`). With several nodes it also
//! listens for the other agents (`mesh`) and says where in its ready line.

#[macro_use]
mod log;
mod agent;
mod ckpt;
mod cluster;
mod dirty;
mod events;
mod faults;
mod heaps;
mod memfd;
mod mesh;
mod pages;
mod parity;
mod relaxed;
mod replicate;
mod restore;
mod segments;
mod session;
mod shmalloc;
mod snapshot;
mod sync;
mod tables;
mod wire;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mome_protocol::ckpt::{AgentEvent, Stamp};
use mome_protocol::job::{JobDir, JobError};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::{lock, Agent, Identity};
use crate::events::Events;
use crate::memfd::{MemoryError, NodeMemory};
use crate::restore::{Restore, RestoreError};

/// Longest path a unix socket address holds (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Parser)]
#[command(
    name = "mome-agent",
    version,
    about = "mome's per-node agent: DSM memory, page faults, heaps, segments, barriers and locks of the ranks of one node",
    long_about = None,
    after_help = "\
mome-run starts one agent per node; it is not meant to be run by hand.

The agent reads DIR/job.yaml (job id, rank count, window layout), creates the
node memory file, listens on DIR/node-K.sock for the ranks listed in --ranks,
prints `ready` on stdout once it accepts connections, and logs to stderr.

Standard input carries checkpoint commands (one JSON object per line),
standard output the agent's events after the ready line (same format).

With --nodes M > 1 the agent also reads the job's secret (DIR/secret, 64
hex digits), listens for the other agents on nodes.listen of job.yaml and
prints `ready <ip:port>` instead; it connects to the other agents when the
`{\"cmd\":\"peers\",\"addrs\":[...]}` command gives their addresses (by node
number), proving the secret both ways, and then says
`{\"event\":\"mesh_ready\"}`. A node that fails (connection lost, heartbeats
stopped, a request unanswered) is reported as `{\"event\":\"node_failed\"}`.
Its heaps are its share of the private zone; the shared zone is kept
coherent with the other agents (docs/nodes.md).

With --restore S --ckpt-dir ROOT the agent starts from checkpoint S: its
tables come from ROOT/node-K/S.index and the restored ranks get their pages
back lazily from the store (one node only).

It exits, removing its socket, on SIGTERM or SIGINT, when its standard input
reaches end of file (mome-run holds the write end), or when its parent dies.

Exit status: 0 after a clean shutdown, 1 when startup fails, 2 for a bad
command line."
)]
struct Cli {
    /// Job directory ($MOME_HOME/jobs/<jobid>) holding job.yaml; the socket is created there.
    #[arg(long, value_name = "DIR")]
    job_dir: PathBuf,
    /// Number of this node (agent), from 0 to M-1.
    #[arg(long, value_name = "K")]
    node: u32,
    /// Number of nodes (agents) of the job, 1 to 64.
    #[arg(long, value_name = "M")]
    nodes: u32,
    /// Comma-separated numbers of the ranks that run on this node, e.g. 0,1,2,3.
    #[arg(long, value_name = "LIST", value_delimiter = ',', required = true)]
    ranks: Vec<u32>,
    /// Restore checkpoint STAMP (its node index under --ckpt-dir) instead of starting fresh.
    #[arg(long, value_name = "STAMP", requires = "ckpt_dir")]
    restore: Option<Stamp>,
    /// Checkpoint store root (the job's checkpoint directory), for --restore.
    #[arg(long, value_name = "ROOT", requires = "restore")]
    ckpt_dir: Option<PathBuf>,
    /// Diskless checkpoints: this node's memory store (its keeper's store
    /// path, see mome-keeper): the node's increments and the copies it
    /// holds for other nodes go there.
    #[arg(long, value_name = "ROOT")]
    mem_store: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Job(#[from] JobError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("socket path {path} is {len} bytes long, more than the {MAX_SOCKET_PATH} a unix socket address holds: use a shorter MOME_HOME")]
    SocketPathTooLong { path: String, len: usize },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write the ready line on stdout: {0}")]
    Ready(std::io::Error),
    #[error("{0}")]
    Restore(#[from] RestoreError),
    #[error("{0}")]
    Agent(#[from] crate::agent::AgentError),
    #[error("{0}")]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("cannot restore the shared zone: {0}")]
    RestoreShared(String),
    #[error("cannot listen for other nodes on {addr}: {source}")]
    PeerListen {
        addr: String,
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    log::set_node(cli.node);
    if cli.nodes == 0 || cli.nodes > 64 {
        log!("--nodes {}: a job has 1 to 64 nodes", cli.nodes);
        return ExitCode::from(2);
    }
    if cli.node >= cli.nodes {
        log!("--node {} is not below --nodes {}", cli.node, cli.nodes);
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("cannot start: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), StartError> {
    // A killed mome-run must not leave agents behind; stdin EOF covers the
    // case where the parent died before this call.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        log!("cannot ask for SIGTERM at parent death: {e}");
    }
    let identity = identity(&cli)?;
    let memory = NodeMemory::create(cli.node, identity.layout.size)?;
    let socket = JobDir {
        id: identity.job_id.clone(),
        path: cli.job_dir.clone(),
    }
    .agent_socket(cli.node);
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(StartError::SocketPathTooLong {
            path: socket.display().to_string(),
            len,
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("mome-agent")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let (events, event_rx) = Events::new();
    let restore = match (cli.restore, &cli.ckpt_dir) {
        (Some(stamp), Some(root)) => {
            let r = Restore::load(
                root,
                cli.node,
                stamp,
                identity.layout,
                cli.nodes > 1,
                events.clone(),
            )?;
            log!(
                "restoring stamp {stamp} from {}: {} pages in {} blocks, {} rank images",
                root.display(),
                r.index.page_count(),
                r.index.blocks().len(),
                r.index.images.len()
            );
            Some(Arc::new(r))
        }
        _ => None,
    };
    let listen_addr = identity.listen.clone();
    let agent = Arc::new(Agent::new(identity, memory, events, restore)?);
    if let Some(r) = agent.restore.as_ref() {
        let started = Instant::now();
        let pages = cluster::restore_shared(&agent, r).map_err(StartError::RestoreShared)?;
        if agent.cluster.is_some() {
            log!(
                "restore: {pages} shared-zone pages of stamp {} back in {} us",
                r.stamp,
                started.elapsed().as_micros()
            );
        }
    }
    let result = runtime.block_on(async {
        let peers =
            match agent.cluster.as_ref() {
                Some(_) => Some(mesh::listen(&listen_addr).await.map_err(|source| {
                    StartError::PeerListen {
                        addr: listen_addr.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        serve(agent, &socket, event_rx, peers).await
    });
    // Sessions still open are dropped with the runtime; nothing they hold
    // outlives the process.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// Job, node and layout this agent serves, from the command line and job.yaml.
fn identity(cli: &Cli) -> Result<Identity, StartError> {
    let id = cli
        .job_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spec = JobDir {
        id,
        path: cli.job_dir.clone(),
    }
    .read_spec()?;
    let layout = spec.config.layout();
    layout
        .validate()
        .map_err(|m| StartError::Config(format!("window layout of job {}: {m}", spec.id)))?;
    let mut local_ranks = BTreeSet::new();
    for &r in &cli.ranks {
        if r >= spec.ranks {
            return Err(StartError::Config(format!(
                "--ranks names rank {r}, but job {} has {} ranks (0..{})",
                spec.id, spec.ranks, spec.ranks
            )));
        }
        if !local_ranks.insert(r) {
            return Err(StartError::Config(format!("--ranks names rank {r} twice")));
        }
    }
    if cli.nodes == 1 && local_ranks.len() as u64 != spec.ranks as u64 {
        // Allowed (a test may serve part of a job), but barriers then wait
        // for ranks that can never connect.
        log!(
            "--ranks lists {} of the job's {} ranks and there is no other node: barriers will not complete",
            local_ranks.len(),
            spec.ranks
        );
    }
    let mesh = if cli.nodes > 1 {
        let nodes = &spec.config.nodes;
        let dir = JobDir {
            id: spec.id.clone(),
            path: cli.job_dir.clone(),
        };
        let secret = mesh::Secret::read(&dir.path.join("secret"))?;
        let timing = mesh::Timing {
            heartbeat_interval: nodes.heartbeat_interval.0,
            heartbeat_timeout: nodes.heartbeat_timeout.0,
            peer_timeout: nodes.peer_timeout.0,
        };
        Some((secret, timing))
    } else {
        None
    };
    if spec.nodes != cli.nodes {
        log!(
            "job.yaml says {} nodes, the command line {}; using {}",
            spec.nodes,
            cli.nodes,
            cli.nodes
        );
    }
    Ok(Identity {
        job_id: spec.id,
        node: cli.node,
        nodes: cli.nodes,
        nranks: spec.ranks,
        local_ranks,
        layout,
        uid: nix::unistd::getuid().as_raw(),
        ckpt_signal: spec.config.checkpoint.signal,
        listen: spec.config.nodes.listen.clone(),
        mesh,
        mem_store: cli.mem_store.clone(),
        default_model: spec.config.nodes.consistency,
    })
}

/// Listens until told to stop, then removes the socket.
async fn serve(
    agent: Arc<Agent>,
    socket: &Path,
    event_rx: std_mpsc::Receiver<AgentEvent>,
    peers: Option<tokio::net::TcpListener>,
) -> Result<(), StartError> {
    let listener = listen(socket)?;
    // With several nodes the ready line gives the address other agents
    // reach this one at; mome-run passes it around in `Peers`.
    let ready = match &peers {
        Some(p) => {
            let addr = p.local_addr().map_err(|source| StartError::PeerListen {
                addr: agent.id.listen.clone(),
                source,
            })?;
            format!("ready {addr}\n")
        }
        None => "ready\n".to_string(),
    };
    if let Some(p) = peers {
        mesh::start(&agent, p);
    }
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Runtime)?;
    let mut commands = events::read_commands(agent.events.clone());

    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(ready.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(StartError::Ready)?;
    drop(stdout);
    // Only now: events must come after the ready line.
    events::start_writer(event_rx);
    let id = &agent.id;
    log!(
        "ready: job {}, node {}/{}, ranks {:?} of {}, window {:#x}+{:#x}, listening on {}",
        id.job_id,
        id.node,
        id.nodes,
        id.local_ranks,
        id.nranks,
        id.layout.base,
        id.layout.size,
        socket.display()
    );

    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(session::serve(agent.clone(), stream));
                }
                Err(e) => {
                    // Out of descriptors or memory: let sessions end and retry.
                    log!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            cmd = commands.recv() => match cmd {
                Some(mome_protocol::ckpt::AgentCommand::Peers { addrs }) => {
                    mesh::connect_peers(&agent, addrs)
                }
                Some(cmd) => ckpt::command(&agent, cmd),
                None => break "end of standard input",
            },
        }
    };
    drop(listener);
    if let Some(c) = agent.cluster.as_ref() {
        c.mesh.leave();
        let st = c.pages.stats();
        log!(
            "page protocol: {} read and {} write faults, {} requests sent, {} served, {} forwarded, {} invalidations, {} stale grants, {} pages prefetched; {} messages in, {} out",
            st.read_faults,
            st.write_faults,
            st.requests_sent,
            st.requests_served,
            st.forwarded,
            st.invalidations,
            st.stale_grants,
            st.prefetched,
            c.mesh.received.load(Ordering::Relaxed),
            c.mesh.sent.load(Ordering::Relaxed)
        );
        log!(
            "relaxed consistency: {} twins, {} deltas sent ({} bytes), {} merged here, {} stale copies dropped",
            st.twins,
            st.diffs_sent,
            st.diff_bytes,
            st.diffs_merged,
            st.stale_dropped
        );
        // Let the writers send Leaving before the runtime goes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = std::fs::remove_file(socket) {
        log!("cannot remove {}: {e}", socket.display());
    }
    log!(
        "exiting ({reason}): {} connections, {} faults served, {} heaps in use, {} segments, {} barriers",
        agent.connections.load(Ordering::Relaxed),
        agent.faults.load(Ordering::Relaxed),
        lock(&agent.heaps).in_use(),
        lock(&agent.segments).len(),
        lock(&agent.sync).barriers(),
    );
    Ok(())
}

/// Binds the socket, replacing a stale one, accessible to this user only.
fn listen(socket: &Path) -> Result<UnixListener, StartError> {
    let err = |source| StartError::Listen {
        path: socket.display().to_string(),
        source,
    };
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // The umask keeps the socket private from its creation on; the chmod
    // makes sure of it whatever the umask was.
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}
