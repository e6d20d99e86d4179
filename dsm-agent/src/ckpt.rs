//! The checkpoint engine: the agent side of `Checkpoint`, `Commit` and
//! `Abort` (see docs/checkpoint.md), and what sessions tell it (which rank
//! is which session, its pagemap, parking and refusals).
//!
//! A checkpoint of stamp S:
//! 1. pre-copy rounds while ranks run: scan every rank's pagemap (which
//!    re-arms write protection on what it reports), copy those pages from
//!    the memfd into the [`Snapshot`]. Without a base (first checkpoint of a
//!    fresh job) the first round takes every data page of the memfd instead.
//! 2. the pause: signal every rank, wait until each has parked
//!    (`CkptParked`), scan again, copy what was re-dirtied, find which
//!    punched pages are holes now (removed; only the agent punches the
//!    memfd, see `memfd`), take the tables, resume the ranks (`Resume{S}`).
//! 3. in the background, write the increment with the store; the new index
//!    is pending until `Commit{S}` makes it the base.
//!
//! Pages re-armed by a scan are reported by no later scan: when a
//! checkpoint fails or is aborted, the pages it copied are kept as "carry"
//! and go into the next increment.
//!
//! Only one checkpoint runs at a time, write included. Locks: `shared` (the
//! session registry and the pause) and `engine` are never held together,
//! nor across an await; the agent's tables are locked one at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{AgentCommand, AgentEvent, Stamp};
use mome_protocol::layout::{HEAP_SIZE, PAGE_SIZE};
use mome_protocol::rank::Channel;
use mome_store::{IncrementInput, NodeIndex, RankImage};
use tokio::sync::{mpsc, oneshot};

use crate::agent::{lock, Agent, SessionId};
use crate::dirty;
use crate::snapshot::{data_runs, data_within, Runs, Snapshot};
use crate::tables::{placeholder_rank, TablesState};

/// Write progress is reported every this many bytes.
const PROGRESS_STEP: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("checkpoint {0} in progress")]
    Busy(Stamp),
    #[error(
        "the restore of stamp {0} is still filling the window; checkpoint again once it is done"
    )]
    Restoring(Stamp),
    #[error("stamp {stamp} is not newer than the base stamp {base}")]
    OldStamp { stamp: Stamp, base: Stamp },
    #[error("rank {0} has not registered its pagemap: its dirty pages cannot be tracked")]
    NoPagemap(u32),
    #[error("dirty scan of rank {rank}: {source}")]
    Scan {
        rank: u32,
        source: dirty::DirtyError,
    },
    #[error("rank {0} ended during the checkpoint")]
    RankEnded(u32),
    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("cannot signal rank {rank} (pid {pid}) with signal {signal}: {errno}")]
    Signal {
        rank: u32,
        pid: i32,
        signal: i32,
        errno: nix::errno::Errno,
    },
    #[error("rank {rank} refused: {reason}")]
    Refused { rank: u32, reason: String },
    #[error("rank {0} exited during the checkpoint")]
    Gone(u32),
    #[error("rank {0} is not connected to its agent (it exited, or has not started or been restored yet)")]
    NotConnected(u32),
    #[error("{} did not reach the checkpoint within {}", ranks_text(.ranks), humantime_ms(*.timeout))]
    ParkTimeout { ranks: Vec<u32>, timeout: Duration },
    #[error("{0}")]
    Tables(#[from] crate::tables::TablesError),
    #[error("cannot write the increment: {0}")]
    Store(#[from] mome_store::StoreError),
    #[error("checkpoint task failed: {0}")]
    Task(String),
    #[error("{count} page request(s) or remote free(s) of this node still in flight after {}: the traffic did not drain", humantime_ms(*.timeout))]
    Drain { count: usize, timeout: Duration },
    #[error("no `{step}` from the coordinator within {} (the other nodes did not all get there)", humantime_ms(*.timeout))]
    NoStep {
        step: &'static str,
        timeout: Duration,
    },
    #[error("aborted by the coordinator (another node failed it)")]
    Aborted,
    #[error("{0}")]
    Replicate(#[from] crate::replicate::ReplicateError),
    #[error("cannot write the node's increment: its checkpoint memory is full (redundancy.memory_limit)")]
    MemoryFull,
    #[error("{0}")]
    Parity(#[from] crate::parity::ParityError),
}

/// Coordinated checkpoints: what the coordinator lets this node do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Park,
    Capture,
    Resume,
    Abort,
}

fn ranks_text(ranks: &[u32]) -> String {
    match ranks {
        [r] => format!("rank {r}"),
        _ => format!(
            "ranks {}",
            ranks
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn humantime_ms(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What the engine hears from sessions during a pause.
#[derive(Debug)]
enum PauseEvent {
    Parked,
    Refused(u32, String),
    Gone(u32),
}

#[derive(Debug)]
struct Parked {
    entered_ns: u64,
    image: RankImage,
    resume: oneshot::Sender<Stamp>,
}

#[derive(Debug)]
struct Pause {
    expected: BTreeSet<u32>,
    parked: BTreeMap<u32, Parked>,
    tx: mpsc::UnboundedSender<PauseEvent>,
}

#[derive(Debug)]
struct MemorySession {
    session: SessionId,
    pid: i32,
    pagemap: Option<Arc<OwnedFd>>,
}

/// What sessions and the engine share.
#[derive(Debug, Default)]
struct Shared {
    /// Rank of every live session.
    ranks: HashMap<SessionId, u32>,
    /// The memory session of each connected rank (the last one to connect).
    memory: BTreeMap<u32, MemorySession>,
    pause: Option<Pause>,
}

#[derive(Debug)]
struct Pending {
    stamp: Stamp,
    index: Arc<NodeIndex>,
    pages: Runs,
}

#[derive(Debug, Default)]
struct EngineState {
    busy: Option<Stamp>,
    /// Last committed index (or the restored one).
    base: Option<Arc<NodeIndex>>,
    /// Durable, waiting for Commit or Abort.
    pending: Option<Pending>,
    /// Pages re-armed by scans of checkpoints that did not make it.
    carry: Runs,
}

#[derive(Debug)]
pub struct Ckpt {
    signal: i32,
    shared: Mutex<Shared>,
    engine: Mutex<EngineState>,
    /// Coordinated checkpoint in progress: its stamp and where its steps go.
    steps: Mutex<Option<(Stamp, mpsc::UnboundedSender<Step>)>>,
}

/// One checkpoint's parameters and the engine state it starts from.
#[derive(Debug)]
struct Job {
    stamp: Stamp,
    store: PathBuf,
    fsync: bool,
    precopy_rounds: u32,
    park_timeout: Duration,
    started: Instant,
    base: Option<Arc<NodeIndex>>,
    carry: Runs,
    /// Coordinated checkpoints: the coordinator's steps.
    steps: Option<mpsc::UnboundedReceiver<Step>>,
    /// Diskless: nodes to hold a copy, and the disk store to copy to.
    replicas: Vec<u32>,
    disk: Option<PathBuf>,
    /// Parity schemes: this node's group.
    parity: Option<mome_protocol::ckpt::ParityPlan>,
}

/// What the pause produced.
struct Captured {
    snap: Snapshot,
    /// Pages that became holes.
    removed: Runs,
    /// Pages of the snapshot not to write: shared pages pre-copied that
    /// this node no longer holds at the pause.
    dropped: Runs,
    tables: Vec<u8>,
    images: Vec<RankImage>,
    pause_us: u64,
    pause_pages: u64,
    precopy_pages: u64,
}

impl Ckpt {
    /// `signal` brings ranks to the checkpoint; `base` is the restored
    /// index, if any.
    pub fn new(signal: i32, base: Option<Arc<NodeIndex>>) -> Ckpt {
        Ckpt {
            signal,
            shared: Mutex::new(Shared::default()),
            engine: Mutex::new(EngineState {
                base,
                ..EngineState::default()
            }),
            steps: Mutex::new(None),
        }
    }

    /// A session of `rank` started; `pid` is its peer pid (agent's pid
    /// namespace), used to signal the rank.
    pub fn session_started(&self, id: SessionId, rank: u32, channel: Channel, pid: i32) {
        let mut s = lock(&self.shared);
        s.ranks.insert(id, rank);
        if channel == Channel::Memory {
            s.memory.insert(
                rank,
                MemorySession {
                    session: id,
                    pid,
                    pagemap: None,
                },
            );
        }
    }

    pub fn set_pagemap(&self, rank: u32, id: SessionId, fd: OwnedFd) {
        let mut s = lock(&self.shared);
        if let Some(m) = s.memory.get_mut(&rank).filter(|m| m.session == id) {
            m.pagemap = Some(Arc::new(fd));
        }
    }

    /// A session ended. A rank whose memory session ends during a pause
    /// fails the checkpoint.
    pub fn session_ended(&self, id: SessionId, rank: u32) {
        let mut s = lock(&self.shared);
        s.ranks.remove(&id);
        if s.memory.get(&rank).is_some_and(|m| m.session == id) {
            s.memory.remove(&rank);
            if let Some(p) = &mut s.pause {
                if p.expected.contains(&rank) {
                    p.parked.remove(&rank);
                    let _ = p.tx.send(PauseEvent::Gone(rank));
                }
            }
        }
    }

    /// Rank of a session (or of a restored rank's placeholder).
    pub fn rank_of(&self, id: SessionId) -> Option<u32> {
        placeholder_rank(id).or_else(|| lock(&self.shared).ranks.get(&id).copied())
    }

    /// `rank` parked in its checkpoint handler. `None`: no checkpoint is
    /// waiting for it, resume at once; otherwise the receiver gets the
    /// stamp (0 when the checkpoint failed) when the pause ends.
    pub fn park(
        &self,
        rank: u32,
        entered_ns: u64,
        image_addr: u64,
        image_len: u64,
    ) -> Option<oneshot::Receiver<Stamp>> {
        let mut s = lock(&self.shared);
        let p = s.pause.as_mut().filter(|p| p.expected.contains(&rank))?;
        let (tx, rx) = oneshot::channel();
        p.parked.insert(
            rank,
            Parked {
                entered_ns,
                image: RankImage {
                    rank,
                    addr: image_addr,
                    len: image_len,
                },
                resume: tx,
            },
        );
        let _ = p.tx.send(PauseEvent::Parked);
        Some(rx)
    }

    /// `rank` refuses the checkpoint.
    pub fn refuse(&self, rank: u32, reason: &str) {
        let s = lock(&self.shared);
        match &s.pause {
            Some(p) if p.expected.contains(&rank) => {
                let _ = p.tx.send(PauseEvent::Refused(rank, reason.to_string()));
            }
            _ => log!("rank {rank} refused a checkpoint that is not in progress: {reason}"),
        }
    }

    /// Resumes every parked rank with `stamp`; returns the longest pause
    /// (µs), the images of the parked ranks, and a rank that is gone (its
    /// session ended after it parked, so its image may be half written):
    /// then the ranks resume with stamp 0, as from a failed checkpoint.
    fn end_pause(&self, stamp: Stamp) -> (u64, Vec<RankImage>, Option<u32>) {
        let Some(pause) = lock(&self.shared).pause.take() else {
            return (0, Vec::new(), None);
        };
        let gone = pause
            .expected
            .iter()
            .find(|r| !pause.parked.contains_key(r))
            .copied();
        let stamp = if gone.is_some() { 0 } else { stamp };
        let now = monotonic_ns();
        let mut longest = 0;
        let mut images = Vec::new();
        for (_, p) in pause.parked {
            longest = longest.max(now.saturating_sub(p.entered_ns) / 1000);
            images.push(p.image);
            // A rank gone meanwhile has dropped its receiver.
            let _ = p.resume.send(stamp);
        }
        (longest, images, gone)
    }
}

/// Pre-copy stops when a round copied at most this many pages (8 MiB,
/// about a millisecond of copying in the pause).
const PAUSE_PAGES_GOAL: u64 = 2048;

fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// Handles one coordinator command. Checkpoints run in their own task.
pub fn command(agent: &Arc<Agent>, cmd: AgentCommand) {
    match cmd {
        AgentCommand::Peers { .. } => {
            log!("Peers command for a single-node agent ignored");
        }
        AgentCommand::Checkpoint {
            stamp,
            store,
            fsync,
            precopy_rounds,
            park_timeout_ms,
            coordinated,
            replicas,
            disk,
            parity,
            full,
        } => {
            let started = Instant::now();
            let job = match start(agent, stamp, full) {
                Ok((base, carry)) => Job {
                    stamp,
                    store,
                    fsync,
                    precopy_rounds,
                    park_timeout: Duration::from_millis(park_timeout_ms),
                    started,
                    base,
                    carry,
                    steps: coordinated.then(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        *lock(&agent.ckpt.steps) = Some((stamp, tx));
                        rx
                    }),
                    replicas,
                    disk,
                    parity,
                },
                Err(e) => {
                    log!("checkpoint {stamp} refused: {e}");
                    agent.events.send(AgentEvent::Failed {
                        stamp,
                        reason: e.to_string(),
                    });
                    return;
                }
            };
            tokio::spawn(run(agent.clone(), job));
        }
        AgentCommand::Commit {
            stamp,
            manifest,
            keep,
        } => {
            if let (Some(root), Some(text)) = (agent.id.mem_store.as_ref(), manifest.as_ref()) {
                if let Err(e) = crate::replicate::commit(root, stamp, text, keep) {
                    log!("checkpoint {stamp}: {e}");
                }
            }
            let mut e = lock(&agent.ckpt.engine);
            match e.pending.take() {
                Some(p) if p.stamp == stamp => {
                    log!("checkpoint {stamp} committed: it is the base of the next increment");
                    e.base = Some(p.index);
                }
                other => {
                    log!(
                        "commit of stamp {stamp}, which is not the pending checkpoint ({}); ignored",
                        other.as_ref().map_or("none".into(), |p| p.stamp.to_string())
                    );
                    e.pending = other;
                }
            }
        }
        AgentCommand::Park { stamp } => step(agent, stamp, Step::Park),
        AgentCommand::Capture { stamp } => step(agent, stamp, Step::Capture),
        AgentCommand::Resume { stamp } => step(agent, stamp, Step::Resume),
        AgentCommand::Abort { stamp } => {
            step(agent, stamp, Step::Abort);
            if let Some(root) = agent.id.mem_store.as_ref() {
                // What this stamp left in the memory store (this node's
                // files, copies and shards of others') is of no use.
                let freed = crate::replicate::forget_stamp(root, stamp);
                if freed > 0 {
                    log!("checkpoint {stamp} aborted: {freed} bytes of the memory store freed");
                }
            }
            let mut e = lock(&agent.ckpt.engine);
            match e.pending.take() {
                Some(p) if p.stamp == stamp => {
                    log!(
                        "checkpoint {stamp} aborted: its {} pages go into the next increment",
                        p.pages.pages()
                    );
                    drop(e);
                    let carry = carry_back(agent, p.pages);
                    let mut e = lock(&agent.ckpt.engine);
                    e.carry = e.carry.union(&carry);
                }
                other => {
                    log!("abort of stamp {stamp}, which is not the pending checkpoint; ignored");
                    e.pending = other;
                }
            }
        }
    }
}

/// Passes a coordinator step to the coordinated checkpoint of `stamp`.
fn step(agent: &Agent, stamp: Stamp, step: Step) {
    match lock(&agent.ckpt.steps).as_ref() {
        Some((s, tx)) if *s == stamp => {
            let _ = tx.send(step);
        }
        _ if step == Step::Abort => {}
        _ => log!("{step:?} for stamp {stamp}, which is not a checkpoint in its pause: ignored"),
    }
}

/// Coordinated checkpoints: waits for the coordinator's `want` (an abort,
/// or nothing within the park timeout, fails the checkpoint).
async fn wait_step(job: &mut Job, want: Step) -> Result<(), CkptError> {
    let Some(rx) = job.steps.as_mut() else {
        return Ok(());
    };
    let name = match want {
        Step::Park => "park",
        Step::Capture => "capture",
        _ => "resume",
    };
    loop {
        match tokio::time::timeout(job.park_timeout, rx.recv()).await {
            Ok(Some(s)) if s == want => return Ok(()),
            Ok(Some(Step::Abort)) => return Err(CkptError::Aborted),
            Ok(Some(other)) => log!(
                "checkpoint {}: {other:?} while waiting for {name}: ignored",
                job.stamp
            ),
            Ok(None) => return Err(CkptError::Task("step channel closed".into())),
            Err(_) => {
                return Err(CkptError::NoStep {
                    step: name,
                    timeout: job.park_timeout,
                })
            }
        }
    }
}

/// Coordinated checkpoints: releases this node's changes to pages it
/// writes without owning them (release and weak consistency), then waits
/// until no page request, none of those changes and no remote free (shared
/// malloc) of this node is in flight (its ranks are parked, so none
/// starts). Once every node is drained, each page's owner holds every write
/// made to it: the stamp is the state after a release by every rank
/// (docs/consistency.md); a remote free acknowledged is in its owner's
/// tables.
async fn drain(agent: &Agent, job: &Job) -> Result<(), CkptError> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Ok(());
    };
    let twinned = cluster.pages.twinned();
    if twinned > 0 {
        log!("checkpoint {}: releasing changes to {twinned} pages written with a twin before the capture", job.stamp);
    }
    // Completion shows as `outstanding` reaching zero.
    drop(cluster.pages.release());
    let deadline = Instant::now() + job.park_timeout;
    loop {
        let count = cluster.pages.outstanding() + agent.shmalloc.outstanding();
        if count == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CkptError::Drain {
                count,
                timeout: job.park_timeout,
            });
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Checks that a checkpoint may start and marks the engine busy; returns
/// the base and the carry it takes over.
fn start(
    agent: &Agent,
    stamp: Stamp,
    full: bool,
) -> Result<(Option<Arc<NodeIndex>>, Runs), CkptError> {
    if let Some(r) = agent.restore.as_ref().filter(|r| !r.filled()) {
        return Err(CkptError::Restoring(r.stamp));
    }
    let mut e = lock(&agent.ckpt.engine);
    if let Some(busy) = e.busy {
        return Err(CkptError::Busy(busy));
    }
    if let Some(base) = e.base.as_ref().filter(|b| b.stamp >= stamp) {
        return Err(CkptError::OldStamp {
            stamp,
            base: base.stamp,
        });
    }
    if let Some(p) = e.pending.take() {
        // The coordinator went on without Commit or Abort: the pending
        // stamp counts as aborted (the next increment contains its pages).
        log!(
            "checkpoint {} was neither committed nor aborted before checkpoint {stamp}: treating it as aborted",
            p.stamp
        );
        e.carry = e.carry.union(&carry_back(agent, p.pages));
    }
    e.busy = Some(stamp);
    // A full checkpoint has no base: every page goes in.
    let base = e.base.clone().filter(|_| !full);
    Ok((base, std::mem::take(&mut e.carry)))
}

/// One checkpoint, from pre-copy to durability.
async fn run(agent: Arc<Agent>, mut job: Job) {
    let stamp = job.stamp;
    log!(
        "checkpoint {stamp}: {} pre-copy rounds, base {}",
        job.precopy_rounds,
        job.base
            .as_ref()
            .map_or("none (full)".into(), |b| b.stamp.to_string())
    );
    let captured = capture(&agent, &mut job).await;
    if job.steps.is_some() {
        *lock(&agent.ckpt.steps) = None;
    }
    let captured = match captured {
        Ok(c) => c,
        Err((e, copied)) => {
            log!("checkpoint {stamp} failed: {e}");
            finish(&agent, None, job.carry.union(&copied));
            agent.events.send(AgentEvent::Failed {
                stamp,
                reason: e.to_string(),
            });
            return;
        }
    };
    log!(
        "checkpoint {stamp}: ranks resumed after {} us ({} pages in the pause, {} in pre-copy)",
        captured.pause_us,
        captured.pause_pages,
        captured.precopy_pages
    );
    agent.events.send(AgentEvent::Paused {
        stamp,
        pause_us: captured.pause_us,
        pause_pages: captured.pause_pages,
        precopy_pages: captured.precopy_pages,
    });
    let writer = agent.clone();
    let carry = job.carry.clone();
    let written = tokio::task::spawn_blocking(move || write(&writer, &job, captured)).await;
    match written {
        Ok(Ok((index, pages, event))) => {
            finish(
                &agent,
                Some(Pending {
                    stamp,
                    index: Arc::new(index),
                    pages,
                }),
                Runs::new(),
            );
            agent.events.send(event);
        }
        Ok(Err((e, pages))) => {
            log!("checkpoint {stamp} failed: {e}");
            finish(&agent, None, pages);
            agent.events.send(AgentEvent::Failed {
                stamp,
                reason: e.to_string(),
            });
        }
        Err(e) => {
            finish(&agent, None, carry);
            agent.events.send(AgentEvent::Failed {
                stamp,
                reason: CkptError::Task(e.to_string()).to_string(),
            });
        }
    }
}

/// The checkpoint is over: the engine is free again.
fn finish(agent: &Agent, pending: Option<Pending>, carry: Runs) {
    let carry = carry_back(agent, carry);
    let mut e = lock(&agent.ckpt.engine);
    e.busy = None;
    e.carry = e.carry.union(&carry);
    if pending.is_some() {
        e.pending = pending;
    }
}

/// A rank taking part in the checkpoint.
#[derive(Debug, Clone)]
struct Member {
    rank: u32,
    pid: i32,
    pagemap: Arc<OwnedFd>,
}

/// Pre-copy and pause. On failure, the pages copied so far (re-armed, so
/// to be carried) come with the error.
async fn capture(agent: &Arc<Agent>, job: &mut Job) -> Result<Captured, (CkptError, Runs)> {
    let members = members(agent).map_err(|e| (e, Runs::new()))?;
    let full = job.base.is_none();
    let mut snap = Snapshot::new();
    let mut precopy_pages = 0;
    // Pages to copy besides what the next scan reports: the carry, and on a
    // full checkpoint every data page of the memfd.
    let mut extra = Some(job.carry.clone());
    // Shared pages taken by pre-copy rounds (several nodes).
    let mut shared_precopied = Runs::new();
    for round in 0..job.precopy_rounds {
        let all_shared = full && round == 0;
        let (s, result) =
            precopy_round(agent, &members, snap, extra.take(), full, all_shared).await;
        snap = s;
        let (copied, shared) = result.map_err(|e| (e, snap.runs()))?;
        shared_precopied = shared_precopied.union(&shared);
        precopy_pages += copied;
        log!(
            "checkpoint {}: pre-copy round {} copied {copied} pages",
            job.stamp,
            round + 1
        );
        // Iterative pre-copy: stop as soon as a round found little to copy
        // (what the pause will copy is about what the next round would).
        let converged = round > 0 && copied <= PAUSE_PAGES_GOAL;
        agent.events.send(AgentEvent::Progress {
            stamp: job.stamp,
            phase: "precopy".into(),
            done_bytes: precopy_pages * PAGE_SIZE,
            total_bytes: precopy_pages * PAGE_SIZE,
        });
        if converged {
            break;
        }
    }
    if job.steps.is_some() {
        // Several nodes: all park together, once every node has pre-copied
        // (a node parked early would wait, paused, for the slowest copy).
        agent
            .events
            .send(AgentEvent::PreCopied { stamp: job.stamp });
        if let Err(e) = wait_step(job, Step::Park).await {
            return Err((e, snap.runs()));
        }
    }
    if job.steps.is_some() && job.precopy_rounds > 0 {
        // What was written while waiting for the others (without pre-copy
        // everything is copied in the pause anyway).
        let (s, result) = precopy_round(agent, &members, snap, None, false, false).await;
        snap = s;
        let (copied, shared) = result.map_err(|e| (e, snap.runs()))?;
        shared_precopied = shared_precopied.union(&shared);
        precopy_pages += copied;
    }
    if let Err(e) = park(agent, job, &members).await {
        agent.ckpt.end_pause(0);
        return Err((e, snap.runs()));
    }
    if job.steps.is_some() {
        // Several nodes: the shared zone holds still once every node's
        // ranks are parked and no page message is in flight anywhere.
        let agreed = async {
            drain(agent, job).await?;
            agent.events.send(AgentEvent::Parked { stamp: job.stamp });
            wait_step(job, Step::Capture).await
        }
        .await;
        if let Err(e) = agreed {
            agent.ckpt.end_pause(0);
            return Err((e, snap.runs()));
        }
    }
    // Every rank is parked: the window and the tables hold still.
    let a = agent.clone();
    let parked_at = Instant::now();
    let stamp = job.stamp;
    let base = job.base.clone();
    let precopied = shared_precopied.clone();
    let (snap, result) = blocking(snap, move |snap| {
        let t0 = Instant::now();
        // Punched pages: holes now (removed) unless written again, or
        // partly zeroed by the kernel (copied again).
        let punched = Runs::from_ranges(a.memory.take_punched());
        // Every data page was taken already unless no pre-copy round ran.
        let full = full && extra.is_some();
        let extra = extra.unwrap_or_default().union(&punched);
        let mut copied = copy_round(&a, &members, snap, Some(extra), full)?;
        let shared = capture_shared(&a, base.as_deref(), &precopied);
        snap.copy_from(a.memory.as_fd(), &shared.copy)?;
        copied += shared.copy.pages();
        let (shared_removed, dropped) = (shared.removed, shared.dropped);
        let t1 = Instant::now();
        // Holes can only come from punches: the rest of the snapshot still
        // holds data.
        let punched = match private_zone(&a) {
            Some(zone) => punched.intersect(&zone),
            None => punched,
        };
        let removed = punched
            .subtract(&data_within(a.memory.as_fd(), &punched)?)
            .union(&shared_removed);
        let rank_of = |id| {
            a.ckpt.rank_of(id).or_else(|| {
                a.cluster
                    .as_ref()
                    .and_then(|c| c.rank_of_remote(id))
            })
        };
        let tables = TablesState::capture(&a, &rank_of).encode()?;
        log!(
            "checkpoint {stamp}: pause work: scan + copy of {copied} pages {} us, holes + tables {} us",
            (t1 - t0).as_micros(),
            t1.elapsed().as_micros()
        );
        Ok((copied, tables, removed, dropped))
    })
    .await;
    log!(
        "checkpoint {stamp}: {} us from the last rank parked to resume",
        parked_at.elapsed().as_micros()
    );
    let mut outcome = result.map_err(|e| (e, snap.runs()));
    if outcome.is_ok() && job.steps.is_some() {
        agent.events.send(AgentEvent::Captured { stamp: job.stamp });
        if let Err(e) = wait_step(job, Step::Resume).await {
            outcome = Err((e, snap.runs()));
        }
    }
    let stamp = if outcome.is_ok() { job.stamp } else { 0 };
    let (pause_us, mut images, gone) = agent.ckpt.end_pause(stamp);
    let (pause_pages, tables, removed, dropped) = outcome?;
    if let Some(rank) = gone {
        // Without its image the stamp could not restore that rank.
        return Err((CkptError::Gone(rank), snap.runs()));
    }
    images.sort_by_key(|i| i.rank);
    Ok(Captured {
        snap,
        removed,
        dropped,
        tables,
        images,
        pause_us,
        pause_pages,
        precopy_pages,
    })
}

/// One pre-copy round, ranks running: the heaps' dirty pages (see
/// `copy_round`) and the shared pages this node owns that changed (all it
/// owns when `all_shared`). Returns the pages copied and the shared ones.
async fn precopy_round(
    agent: &Arc<Agent>,
    members: &[Member],
    snap: Snapshot,
    extra: Option<Runs>,
    full: bool,
    all_shared: bool,
) -> (Snapshot, Result<(u64, Runs), CkptError>) {
    let (a, m) = (agent.clone(), members.to_vec());
    blocking(snap, move |snap| {
        let private = copy_round(&a, &m, snap, extra, full)?;
        let shared = precopy_shared(&a, snap, all_shared)?;
        Ok((private + shared.pages(), shared))
    })
    .await
}

/// Runs `f` on the snapshot in a blocking thread and gives the snapshot
/// back with the result (also when the thread failed: then empty).
async fn blocking<T: Send + 'static>(
    snap: Snapshot,
    f: impl FnOnce(&mut Snapshot) -> Result<T, CkptError> + Send + 'static,
) -> (Snapshot, Result<T, CkptError>) {
    let joined = tokio::task::spawn_blocking(move || {
        let mut snap = snap;
        let r = f(&mut snap);
        (snap, r)
    })
    .await;
    match joined {
        Ok(pair) => pair,
        Err(e) => (Snapshot::new(), Err(CkptError::Task(e.to_string()))),
    }
}

/// The connected ranks, each with its pagemap.
fn members(agent: &Agent) -> Result<Vec<Member>, CkptError> {
    let s = lock(&agent.ckpt.shared);
    // A stamp without a rank's image could not restart that rank: a rank
    // that is not connected (it exited, or a restored one has not come
    // back yet) makes the checkpoint fail.
    if let Some(&r) = agent
        .id
        .local_ranks
        .iter()
        .find(|r| !s.memory.contains_key(r))
    {
        return Err(CkptError::NotConnected(r));
    }
    s.memory
        .iter()
        .map(|(&rank, m)| match &m.pagemap {
            Some(p) => Ok(Member {
                rank,
                pid: m.pid,
                pagemap: p.clone(),
            }),
            None => Err(CkptError::NoPagemap(rank)),
        })
        .collect()
}

/// Scans every member (re-arming protection), then copies what the scans
/// reported plus `extra` (and every data page when `full`). Returns the
/// pages copied.
///
/// Only the window in use is scanned (heaps in use, taken segment slots): a
/// scan installs write-protect markers, and so page tables, on every page
/// of its range, which over a mostly empty 1 TiB window would cost GiBs. A
/// range scanned for the first time reports all its mapped pages, and
/// unpopulated pages count as written too: what is copied is cut to the
/// memfd's data, since a hole reads as zeros and needs no copy.
fn copy_round(
    agent: &Agent,
    members: &[Member],
    snap: &mut Snapshot,
    extra: Option<Runs>,
    full: bool,
) -> Result<u64, CkptError> {
    let layout = agent.id.layout;
    let ranges = in_use(agent);
    let mut dirty = Vec::new();
    for m in members {
        for r in ranges.ranges() {
            let (start, end) = (
                layout.base + r.start * PAGE_SIZE,
                layout.base + r.end * PAGE_SIZE,
            );
            dirty::scan(m.pagemap.as_fd(), &layout, start..end, &mut dirty).map_err(|source| {
                // ESRCH: the process of the pagemap is gone.
                let gone = matches!(
                    &source,
                    dirty::DirtyError::Scan {
                        source: mome_uffd::UffdError::Os { errno, .. },
                        ..
                    } if errno.0 == libc::ESRCH
                );
                if gone {
                    CkptError::RankEnded(m.rank)
                } else {
                    CkptError::Scan {
                        rank: m.rank,
                        source,
                    }
                }
            })?;
        }
    }
    let mut set = Runs::from_ranges(dirty);
    let aliased = Runs::from_ranges(
        lock(&agent.alias_pages)
            .values()
            .map(|&(first, count)| first..first + count)
            .collect(),
    );
    set = set.union(&aliased);
    if let Some(extra) = extra {
        set = set.union(&extra);
        if full {
            // After the scan: a page written from now on is reported by
            // the next scan, so nothing falls between the two.
            set = set.union(&data_runs(agent.memory.as_fd(), layout.size)?);
        }
    }
    // Several nodes: the shared zone is the page protocol's (see
    // `capture_shared`); this node's memory there holds read copies too.
    if let Some(zone) = private_zone(agent) {
        set = set.intersect(&zone);
    }
    let set = data_within(agent.memory.as_fd(), &set)?;
    snap.copy_from(agent.memory.as_fd(), &set)?;
    Ok(set.pages())
}

/// Several nodes: the pages of the private zone (heaps, each on the node
/// of its rank); `None` on one node, where the whole window is the node's.
fn private_zone(agent: &Agent) -> Option<Runs> {
    agent.cluster.as_ref()?;
    let layout = agent.id.layout;
    let end = layout.private_size / PAGE_SIZE;
    Some(Runs::from_ranges(std::iter::once(0..end).collect()))
}

/// First store page number (window page) of the shared zone.
fn shared_first_page(agent: &Agent) -> u64 {
    let layout = agent.id.layout;
    (layout.shared_base() - layout.base) / PAGE_SIZE
}

/// This node's part of the shared zone in a stamp, decided in the pause.
struct SharedPart {
    /// Shared pages of the base this node no longer holds: removed from its
    /// index (another node's index has them now, or they are zero).
    removed: Runs,
    /// Pages to copy now: those it holds that changed since the base and
    /// were not pre-copied since their last change (every page it holds
    /// but those, on a full checkpoint).
    copy: Runs,
    /// Pre-copied pages it no longer holds: left out of the increment.
    dropped: Runs,
}

/// Shared-zone page numbers (of the page protocol) as window page runs.
fn window_runs(agent: &Agent, runs: Vec<std::ops::Range<u64>>) -> Runs {
    let first = shared_first_page(agent);
    Runs::from_ranges(
        runs.into_iter()
            .map(|r| r.start + first..r.end + first)
            .collect(),
    )
}

/// Several nodes, pre-copy round: copies the shared pages this node holds
/// that changed since the last stamp (all it holds when `all`) while the
/// ranks run; returns them (window page numbers).
fn precopy_shared(agent: &Agent, snap: &mut Snapshot, all: bool) -> Result<Runs, CkptError> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Ok(Runs::new());
    };
    let pages = window_runs(agent, cluster.pages.precopy(all));
    snap.copy_from(agent.memory.as_fd(), &pages)?;
    Ok(pages)
}

/// Several nodes: this node's part of the shared zone (called in the
/// coordinated pause, every node's ranks parked and no page in flight).
/// `precopied`: what pre-copy rounds took.
fn capture_shared(agent: &Agent, base: Option<&NodeIndex>, precopied: &Runs) -> SharedPart {
    let Some(cluster) = agent.cluster.as_ref() else {
        return SharedPart {
            removed: Runs::new(),
            copy: Runs::new(),
            dropped: Runs::new(),
        };
    };
    let first = shared_first_page(agent);
    let (owned, changed) = cluster.pages.capture();
    let (owned, changed) = (window_runs(agent, owned), window_runs(agent, changed));
    let copy = if base.is_none() {
        // A full checkpoint takes every page the node holds.
        owned.subtract(&precopied.subtract(&changed))
    } else {
        changed
    };
    let in_base = Runs::from_ranges(
        base.map(|b| {
            b.extents()
                .filter(|&(p, ..)| p >= first)
                .map(|(p, n, ..)| p..p + u64::from(n))
                .collect()
        })
        .unwrap_or_default(),
    );
    SharedPart {
        removed: in_base.subtract(&owned),
        copy,
        dropped: precopied.subtract(&owned),
    }
}

/// Pages of a checkpoint that did not make it, to take again next time:
/// the private part is returned (the carry); shared pages are marked
/// changed again in the page protocol (the next capture takes them if
/// this node still holds them then).
fn carry_back(agent: &Agent, pages: Runs) -> Runs {
    let (Some(cluster), Some(zone)) = (agent.cluster.as_ref(), private_zone(agent)) else {
        return pages;
    };
    let first = shared_first_page(agent);
    let shared = pages.subtract(&zone);
    cluster.pages.mark_written(
        shared
            .ranges()
            .iter()
            .map(|r| r.start - first..r.end - first),
    );
    pages.intersect(&zone)
}

/// Pages of the window in use: heaps owned by some session and the
/// reservations of taken segment slots.
fn in_use(agent: &Agent) -> Runs {
    let layout = agent.id.layout;
    let page = |addr: u64| (addr - layout.base) / PAGE_SIZE;
    let heap_pages = HEAP_SIZE / PAGE_SIZE;
    let mut ranges: Vec<std::ops::Range<u64>> = lock(&agent.heaps)
        .used_runs()
        .into_iter()
        .map(|r| {
            let first = page(layout.heap_addr(r.start));
            first..first + u64::from(r.end - r.start) * heap_pages
        })
        .collect();
    // Several nodes: segments are in the shared zone (`capture_shared`).
    let slots = if agent.cluster.is_some() {
        Vec::new()
    } else {
        lock(&agent.segments).taken_slot_sizes()
    };
    for (slot, size) in slots {
        // The segment's size, not its whole reservation (16 GiB by
        // default): scanning costs ~1 ms per GiB of range, per rank. Pages
        // written past the size (no SIGBUS in the window) are found by a
        // SEEK_DATA probe, and then the whole reservation is scanned.
        let start = layout.segment_addr(slot);
        let used = size.next_multiple_of(HEAP_SIZE).min(layout.segment_reserve);
        let data_past = used < layout.segment_reserve
            && next_data(agent.memory.as_fd(), layout.file_offset(start + used))
                .is_some_and(|off| off < layout.file_offset(start) + layout.segment_reserve);
        let len = if data_past {
            layout.segment_reserve
        } else {
            used.max(PAGE_SIZE)
        };
        let first = page(start);
        ranges.push(first..first + len / PAGE_SIZE);
    }
    Runs::from_ranges(ranges)
}

/// Offset of the first data byte of the memfd at or after `from`.
fn next_data(fd: std::os::fd::BorrowedFd<'_>, from: u64) -> Option<u64> {
    // SAFETY: lseek on a descriptor we hold; no memory is involved.
    let r = unsafe {
        libc::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            from as libc::off_t,
            libc::SEEK_DATA,
        )
    };
    (r >= 0).then_some(r as u64)
}

/// Signals every member and waits until all have parked.
async fn park(agent: &Agent, job: &Job, members: &[Member]) -> Result<(), CkptError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut s = lock(&agent.ckpt.shared);
        let expected: BTreeSet<u32> = members.iter().map(|m| m.rank).collect();
        // A rank whose session ended since `members` was taken.
        if let Some(r) = expected.iter().find(|r| !s.memory.contains_key(r)) {
            return Err(CkptError::Gone(*r));
        }
        s.pause = Some(Pause {
            expected,
            parked: BTreeMap::new(),
            tx,
        });
    }
    let signal = agent.ckpt.signal;
    for m in members {
        // SAFETY: kill(2) with a pid and a signal number has no memory
        // effects on this process; the pid is the rank's (SO_PEERCRED of
        // its live connection), in this process's pid namespace.
        if unsafe { libc::kill(m.pid, signal) } != 0 {
            return Err(CkptError::Signal {
                rank: m.rank,
                pid: m.pid,
                signal,
                errno: nix::errno::Errno::last(),
            });
        }
    }
    let deadline = tokio::time::Instant::now() + job.park_timeout;
    loop {
        {
            let s = lock(&agent.ckpt.shared);
            if let Some(p) = &s.pause {
                if p.parked.len() == p.expected.len() {
                    return Ok(());
                }
            }
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(PauseEvent::Parked)) => {}
            Ok(Some(PauseEvent::Refused(rank, reason))) => {
                return Err(CkptError::Refused { rank, reason })
            }
            Ok(Some(PauseEvent::Gone(rank))) => return Err(CkptError::Gone(rank)),
            // The sender lives in the pause, which only this task removes.
            Ok(None) => return Err(CkptError::Task("pause channel closed".into())),
            Err(_) => {
                let s = lock(&agent.ckpt.shared);
                let ranks = s
                    .pause
                    .as_ref()
                    .map(|p| {
                        p.expected
                            .iter()
                            .filter(|r| !p.parked.contains_key(r))
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(CkptError::ParkTimeout {
                    ranks,
                    timeout: job.park_timeout,
                });
            }
        }
    }
}

/// Writes the increment (blocking). Returns the new index, the pages of
/// the increment (for the carry if it is aborted) and the `Durable` event;
/// on failure the error and the pages to carry.
fn write(
    agent: &Agent,
    job: &Job,
    c: Captured,
) -> Result<(NodeIndex, Runs, AgentEvent), (CkptError, Runs)> {
    // Holes can only come from punches (`removed`, found in the pause):
    // the rest of the snapshot is the increment.
    let pages = c.snap.runs().subtract(&c.removed).subtract(&c.dropped);
    // What to look at again if this increment is not committed.
    let copied = pages.union(&c.removed);
    let removed = c.removed;
    let image_bytes = c.images.iter().map(|i| i.len).sum();
    let total = pages.pages() * PAGE_SIZE;
    let mut next_report = PROGRESS_STEP;
    let mut progress = |done: u64| {
        if done >= next_report {
            next_report = done + PROGRESS_STEP;
            agent.events.send(AgentEvent::Progress {
                stamp: job.stamp,
                phase: "write".into(),
                done_bytes: done,
                total_bytes: total,
            });
        }
    };
    let input = IncrementInput {
        root: &job.store,
        node: agent.id.node,
        stamp: job.stamp,
        base: job.base.as_deref(),
        removed: removed.ranges(),
        tables: c.tables,
        images: c.images,
        fsync: job.fsync,
    };
    let snap = &c.snap;
    let iter = pages
        .iter()
        .filter_map(|p| snap.get(p).map(|bytes| (p, bytes)));
    let write_started = Instant::now();
    let (index, summary) =
        mome_store::write_increment(input, iter, &mut progress).map_err(|e| {
            let e = if e.is_no_space() && agent.id.mem_store.is_some() {
                // What was written of it goes with the abort.
                CkptError::MemoryFull
            } else {
                e.into()
            };
            (e, copied.clone())
        })?;
    let copy_started = Instant::now();
    let timeout = agent
        .cluster
        .as_ref()
        .map_or(Duration::from_secs(10), |c| c.mesh.timing.peer_timeout);
    if !job.replicas.is_empty() {
        let sent = crate::replicate::send(agent, &job.store, job.stamp, &job.replicas, timeout)
            .map_err(|e| (e.into(), copied.clone()))?;
        log!(
            "checkpoint {}: {sent} bytes copied to node(s) {:?} in {} ms",
            job.stamp,
            job.replicas,
            copy_started.elapsed().as_millis()
        );
    }
    if let Some(plan) = &job.parity {
        let sent = crate::parity::exchange(agent, &job.store, job.stamp, plan, timeout)
            .map_err(|e| (e.into(), copied.clone()))?;
        log!(
            "checkpoint {}: {sent} bytes of chunks sent to the parity holders of group {:?} in {} ms",
            job.stamp,
            plan.members,
            copy_started.elapsed().as_millis()
        );
    }
    if let Some(disk) = &job.disk {
        let bytes = crate::replicate::copy_to_disk(&job.store, disk, agent.id.node, &index)
            .map_err(|e| (e.into(), copied.clone()))?;
        log!(
            "checkpoint {}: {bytes} bytes copied to the disk store {}",
            job.stamp,
            disk.display()
        );
    }
    let copy_us = copy_started.elapsed().as_micros() as u64;
    let elapsed_us = job.started.elapsed().as_micros() as u64;
    log!(
        "checkpoint {}: durable, {} pages ({} zero, {} removed), {} bytes written in {} ms ({} ms from the command)",
        job.stamp,
        summary.pages,
        summary.zero_pages,
        removed.pages(),
        summary.bytes_written,
        write_started.elapsed().as_millis(),
        elapsed_us / 1000
    );
    let event = AgentEvent::Durable {
        stamp: job.stamp,
        node: summary.index.node,
        index: summary.index.index,
        index_len: summary.index.len,
        index_xxh3: summary.index.xxh3,
        pages: summary.pages,
        bytes_written: summary.bytes_written,
        image_bytes,
        elapsed_us,
        held_by: job.replicas.clone(),
        on_disk: job.disk.is_some(),
        copy_us,
    };
    Ok((index, copied, event))
}
