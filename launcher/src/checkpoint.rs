//! Checkpoint coordination, the coordinator's side (see
//! docs/checkpoint.md): choosing the stamp, driving the agents with
//! [`AgentCommand`]s, following their [`AgentEvent`]s, the commit (writing
//! the manifest once every node is durable), `Commit`/`Abort`, pruning to
//! `keep` stamps, periodic checkpoints, the overall timeout.
//!
//! [`Checkpointer`] owns that state and nothing live: it is fed events and
//! the clock by the coordinator's loop and answers with [`Action`]s (a
//! command for an agent, a reply for a control client, a line to log or to
//! print), so the loop stays the only place that does I/O on pipes and
//! sockets. Only the store's files are written here (the manifest and the
//! prune: small, done inline).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{AgentCommand, AgentEvent, Stamp};
use mome_protocol::config::CheckpointConfig;
use mome_protocol::job::{now_rfc3339, CheckpointDone, CkptProgress, ControlReply};

use crate::control::ClientId;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {stamp} is in progress; try again when it is done")]
    Busy { stamp: Stamp },
    #[error("cannot choose a stamp in {root}: {source}")]
    Stamp {
        root: PathBuf,
        source: mome_store::StoreError,
    },
    #[error("node {node} has no memory store for diskless checkpoints: {why}")]
    NoMemoryStore { node: u32, why: String },
    #[error("cannot create the checkpoint directory {root}: {source}")]
    Root {
        root: PathBuf,
        source: std::io::Error,
    },
}

/// How checkpoints are taken (checkpoint: section of the job, resolved).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Store root, absolute.
    pub root: PathBuf,
    pub fsync: bool,
    pub keep: u32,
    /// None: no periodic checkpoints.
    pub interval: Option<Duration>,
    pub precopy_rounds: u32,
    pub park_timeout: Duration,
    pub timeout: Duration,
    /// Diskless checkpoints (several nodes), set once the keepers run.
    pub memory: Option<MemoryStores>,
}

/// Where a diskless checkpoint goes: each node's memory store (its
/// keeper's; `None`: that node has none, so checkpoints fail saying so),
/// the nodes holding a copy of each node's increment, and the disk level.
#[derive(Debug, Clone)]
pub struct MemoryStores {
    pub stores: Vec<Option<PathBuf>>,
    pub replicas: Vec<Vec<u32>>,
    /// Parity schemes: each node's group (then no replicas; every stamp
    /// is a full checkpoint).
    pub parity: Vec<Option<mome_protocol::ckpt::ParityPlan>>,
    /// Every this many stamps, also to `root` (0: never).
    pub disk_every: u32,
    /// Why a node has no store, for the error.
    pub missing: String,
}

impl Settings {
    pub fn from_config(c: &CheckpointConfig, root: PathBuf) -> Settings {
        Settings {
            root,
            fsync: c.fsync,
            keep: c.keep,
            interval: Some(c.interval.0).filter(|d| !d.is_zero()),
            precopy_rounds: c.precopy_rounds,
            park_timeout: c.park_timeout.0,
            timeout: c.timeout.0,
            memory: None,
        }
    }
}

/// What goes into every manifest of this incarnation.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    pub job_id: String,
    pub incarnation: u32,
    pub nranks: u32,
    pub nodes: u32,
    pub binary: PathBuf,
    pub binary_xxh3: u64,
}

/// Who asked for the checkpoint in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    Client(ClientId),
    Periodic,
}

/// What the coordinator is to do for the checkpointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    ToAgent {
        node: u32,
        command: AgentCommand,
    },
    Reply {
        client: ClientId,
        reply: ControlReply,
    },
    /// A line for the coordinator log.
    Log(String),
    /// A line for mome-run's stderr (and the log).
    Say(String),
}

#[derive(Debug, Clone, Copy, Default)]
struct Paused {
    pause_us: u64,
    pause_pages: u64,
    precopy_pages: u64,
}

#[derive(Debug, Clone)]
struct Durable {
    index: PathBuf,
    index_len: u64,
    index_xxh3: u64,
    pages: u64,
    bytes_written: u64,
    image_bytes: u64,
}

#[derive(Debug)]
struct InFlight {
    stamp: Stamp,
    requester: Requester,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    paused: Option<Paused>,
    durable: BTreeMap<u32, Durable>,
    /// Several nodes: the nodes pre-copied, parked (and drained), then
    /// captured.
    precopied: std::collections::BTreeSet<u32>,
    parked: std::collections::BTreeSet<u32>,
    captured: std::collections::BTreeSet<u32>,
    /// Diskless: which nodes hold a copy of each node's increment, and
    /// whether every node also wrote the stamp to the disk store.
    held_by: BTreeMap<u32, Vec<u32>>,
    on_disk: bool,
}

/// The checkpoints of one incarnation of a job.
#[derive(Debug)]
pub struct Checkpointer {
    settings: Settings,
    identity: JobIdentity,
    /// The last committed stamp: the base of the agents' next increment.
    parent: Option<Stamp>,
    /// The largest stamp used by this incarnation (never reused, even when
    /// a failed attempt left no file behind).
    last_stamp: Stamp,
    inflight: Option<InFlight>,
    next_periodic: Option<Instant>,
    /// Committed by this incarnation, oldest first.
    pub history: Vec<CheckpointDone>,
    /// Diskless: the newest committed stamp whose files are all in the
    /// disk store (its manifest is kept there until a newer one is).
    last_on_disk: Option<Stamp>,
}

impl Checkpointer {
    /// `parent`: the stamp the agents start from (the restored one).
    pub fn new(settings: Settings, identity: JobIdentity, parent: Option<Stamp>) -> Checkpointer {
        Checkpointer {
            settings,
            identity,
            parent,
            last_stamp: parent.unwrap_or(0),
            inflight: None,
            next_periodic: None,
            history: Vec::new(),
            last_on_disk: None,
        }
    }

    /// The newest committed stamp of the job (this incarnation's, or the
    /// one it was restored from).
    pub fn committed(&self) -> Option<Stamp> {
        self.parent
    }

    /// Node `node`'s memory store is gone (`why`): its checkpoints fail.
    pub fn lose_store(&mut self, node: u32, why: String) {
        if let Some(m) = self.settings.memory.as_mut() {
            if let Some(s) = m.stores.get_mut(node as usize) {
                *s = None;
                m.missing = why;
            }
        }
    }

    /// Diskless checkpoints from now on.
    pub fn set_memory(&mut self, memory: MemoryStores) {
        // The newest stamp the disk store holds whole (a restarted job
        // keeps it until the next disk-level stamp).
        let root = &self.settings.root;
        self.last_on_disk = mome_store::list_committed(root)
            .unwrap_or_default()
            .into_iter()
            .rev()
            .find(|&s| {
                mome_store::read_manifest(root, s)
                    .is_ok_and(|m| m.indexes.iter().all(|i| root.join(&i.index).is_file()))
            });
        self.settings.memory = Some(memory);
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The stamp in progress.
    pub fn in_progress(&self) -> Option<Stamp> {
        self.inflight.as_ref().map(|f| f.stamp)
    }

    /// Starts the periodic clock (when the ranks run).
    pub fn arm_periodic(&mut self, now: Instant) {
        self.next_periodic = self.settings.interval.map(|i| now + i);
    }

    /// Stops periodic checkpoints (the job is ending).
    pub fn disarm_periodic(&mut self) {
        self.next_periodic = None;
    }

    /// The next time [`Checkpointer::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.inflight.as_ref().map(|f| f.deadline);
        match (timeout, self.next_periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts a checkpoint: picks the stamp and tells every agent.
    /// `timeout`: the requester's, else checkpoint.timeout.
    pub fn start(
        &mut self,
        requester: Requester,
        timeout: Option<Duration>,
        now: Instant,
    ) -> Result<Vec<Action>, CheckpointError> {
        if let Some(f) = &self.inflight {
            return Err(CheckpointError::Busy { stamp: f.stamp });
        }
        let root = &self.settings.root;
        crate::jobdir::create_private_dir_all(root).map_err(|source| CheckpointError::Root {
            root: root.clone(),
            source,
        })?;
        let next = mome_store::next_stamp(root).map_err(|source| CheckpointError::Stamp {
            root: root.clone(),
            source,
        })?;
        let stamp = next.max(self.last_stamp + 1);
        if let Some(m) = &self.settings.memory {
            if let Some(node) = m.stores.iter().position(Option::is_none) {
                return Err(CheckpointError::NoMemoryStore {
                    node: node as u32,
                    why: m.missing.clone(),
                });
            }
        }
        self.last_stamp = stamp;
        // Diskless: every `disk_every`-th stamp of this incarnation also
        // goes to the disk store.
        let to_disk = self.settings.memory.as_ref().is_some_and(|m| {
            m.disk_every > 0 && (self.history.len() as u32 + 1).is_multiple_of(m.disk_every)
        });
        let timeout = timeout.unwrap_or(self.settings.timeout);
        self.inflight = Some(InFlight {
            stamp,
            requester,
            started: now,
            deadline: now + timeout,
            timeout,
            paused: None,
            durable: BTreeMap::new(),
            precopied: Default::default(),
            parked: Default::default(),
            captured: Default::default(),
            held_by: BTreeMap::new(),
            on_disk: to_disk || self.settings.memory.is_none(),
        });
        let mut actions = vec![Action::Log(format!(
            "checkpoint {stamp} started ({}; base {}; up to {})",
            match requester {
                Requester::Client(_) => "requested",
                Requester::Periodic => "periodic",
            },
            self.parent
                .map_or("none: full".to_string(), |p| format!("stamp {p}")),
            humantime::format_duration(timeout)
        ))];
        for node in 0..self.identity.nodes {
            let memory = self.settings.memory.as_ref();
            let store = memory
                .and_then(|m| m.stores[node as usize].clone())
                .unwrap_or_else(|| root.clone());
            actions.push(Action::ToAgent {
                node,
                command: AgentCommand::Checkpoint {
                    stamp,
                    store,
                    fsync: self.settings.fsync,
                    precopy_rounds: self.settings.precopy_rounds,
                    park_timeout_ms: self.settings.park_timeout.as_millis() as u64,
                    // Several nodes: the shared zone is taken when every
                    // node is parked and drained (Parked -> Capture ->
                    // Captured -> Resume).
                    coordinated: self.identity.nodes > 1,
                    replicas: memory
                        .map(|m| m.replicas[node as usize].clone())
                        .unwrap_or_default(),
                    disk: to_disk.then(|| root.clone()),
                    parity: memory.and_then(|m| m.parity[node as usize].clone()),
                    full: memory.is_some_and(|m| m.parity[node as usize].is_some()),
                },
            });
        }
        Ok(actions)
    }

    /// Periodic checkpoints and the overall timeout.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(f) = &self.inflight {
            if now >= f.deadline {
                let reason = format!(
                    "not committed within {}",
                    humantime::format_duration(f.timeout)
                );
                actions.extend(self.fail(&reason, true));
            }
        }
        if let (Some(due), Some(interval)) = (self.next_periodic, self.settings.interval) {
            if now >= due {
                self.next_periodic = Some(now + interval);
                if let Some(f) = &self.inflight {
                    actions.push(Action::Log(format!(
                        "periodic checkpoint skipped: checkpoint {} is still in progress",
                        f.stamp
                    )));
                } else {
                    match self.start(Requester::Periodic, None, now) {
                        Ok(more) => actions.extend(more),
                        Err(e) => actions.push(Action::Say(format!(
                            "mome: periodic checkpoint failed: {e}"
                        ))),
                    }
                }
            }
        }
        actions
    }

    /// An event of agent `node` (RankRestored and RestoreError are the
    /// coordinator's; they are ignored here).
    pub fn on_event(&mut self, node: u32, event: AgentEvent, now: Instant) -> Vec<Action> {
        let Some(f) = self.inflight.as_mut() else {
            return match event_stamp(&event) {
                Some(stamp) => vec![Action::Log(format!(
                    "agent {node}: event for checkpoint {stamp}, which is no longer in progress: {event:?}"
                ))],
                None => Vec::new(),
            };
        };
        if event_stamp(&event).is_some_and(|s| s != f.stamp) {
            return vec![Action::Log(format!(
                "agent {node}: event for another checkpoint than {}: {event:?}",
                f.stamp
            ))];
        }
        match event {
            AgentEvent::Progress {
                stamp,
                phase,
                done_bytes,
                total_bytes,
            } => match f.requester {
                Requester::Client(client) => vec![Action::Reply {
                    client,
                    reply: ControlReply::CkptProgress(CkptProgress {
                        stamp,
                        phase,
                        done_bytes,
                        total_bytes,
                    }),
                }],
                Requester::Periodic => Vec::new(),
            },
            AgentEvent::Paused {
                stamp,
                pause_us,
                pause_pages,
                precopy_pages,
            } => {
                // With several nodes the job's pause is the longest one.
                let p = f.paused.get_or_insert_with(Paused::default);
                p.pause_us = p.pause_us.max(pause_us);
                p.pause_pages += pause_pages;
                p.precopy_pages += precopy_pages;
                vec![Action::Log(format!(
                    "checkpoint {stamp}: node {node} resumed its ranks after {pause_us} us ({pause_pages} page(s) copied paused, {precopy_pages} in pre-copy)"
                ))]
            }
            AgentEvent::Durable {
                stamp,
                node: durable_node,
                index,
                index_len,
                index_xxh3,
                pages,
                bytes_written,
                image_bytes,
                elapsed_us,
                held_by,
                on_disk,
                copy_us,
            } => {
                f.on_disk &= on_disk;
                f.held_by.insert(durable_node, held_by.clone());
                f.durable.insert(
                    durable_node,
                    Durable {
                        index,
                        index_len,
                        index_xxh3,
                        pages,
                        bytes_written,
                        image_bytes,
                    },
                );
                let copies = if held_by.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", copies on node(s) {} in {} ms",
                        crate::coordinator::rank_list(&held_by),
                        copy_us / 1000
                    )
                };
                let mut actions = vec![Action::Log(format!(
                    "checkpoint {stamp}: node {durable_node} durable after {} ms ({pages} page(s), {bytes_written} bytes written{copies})",
                    elapsed_us / 1000
                ))];
                if (0..self.identity.nodes).all(|n| f.durable.contains_key(&n)) {
                    actions.extend(self.commit(now));
                }
                actions
            }
            AgentEvent::PreCopied { stamp } => {
                f.precopied.insert(node);
                let all = f.precopied.len() as u32 == self.identity.nodes;
                self.to_all_when(
                    all,
                    AgentCommand::Park { stamp },
                    format!("checkpoint {stamp}: every node pre-copied: park"),
                )
            }
            AgentEvent::Parked { stamp } => {
                f.parked.insert(node);
                let all = f.parked.len() as u32 == self.identity.nodes;
                self.to_all_when(
                    all,
                    AgentCommand::Capture { stamp },
                    format!("checkpoint {stamp}: every node parked and drained: capture"),
                )
            }
            AgentEvent::Captured { stamp } => {
                f.captured.insert(node);
                let all = f.captured.len() as u32 == self.identity.nodes;
                self.to_all_when(
                    all,
                    AgentCommand::Resume { stamp },
                    format!("checkpoint {stamp}: every node captured: resume"),
                )
            }
            AgentEvent::Failed { reason, .. } => {
                // The agent dropped the stamp already; Abort says so again,
                // harmlessly, and keeps one way of ending a checkpoint.
                self.fail(&format!("node {node}: {reason}"), true)
            }
            AgentEvent::RankRestored { .. }
            | AgentEvent::RestoreError { .. }
            | AgentEvent::MeshReady { .. }
            | AgentEvent::NodeFailed { .. } => Vec::new(),
        }
    }

    /// `command` to every agent (and `log`) when `all`.
    fn to_all_when(&self, all: bool, command: AgentCommand, log: String) -> Vec<Action> {
        if !all {
            return Vec::new();
        }
        let mut actions = vec![Action::Log(log)];
        actions.extend((0..self.identity.nodes).map(|node| Action::ToAgent {
            node,
            command: command.clone(),
        }));
        actions
    }

    /// An agent exited (or closed its stdout): the checkpoint cannot end.
    pub fn on_agent_gone(&mut self, what: &str) -> Vec<Action> {
        if self.inflight.is_none() {
            return Vec::new();
        }
        self.fail(what, false)
    }

    /// The job is ending: a checkpoint in progress will not be committed.
    pub fn on_job_end(&mut self) -> Vec<Action> {
        self.disarm_periodic();
        if self.inflight.is_none() {
            return Vec::new();
        }
        self.fail("the job ended before the checkpoint was committed", true)
    }

    fn fail(&mut self, reason: &str, abort: bool) -> Vec<Action> {
        let Some(f) = self.inflight.take() else {
            return Vec::new();
        };
        let stamp = f.stamp;
        let mut actions = Vec::new();
        if abort {
            for node in 0..self.identity.nodes {
                actions.push(Action::ToAgent {
                    node,
                    command: AgentCommand::Abort { stamp },
                });
            }
        }
        match f.requester {
            Requester::Client(client) => {
                actions.push(Action::Log(format!("checkpoint {stamp} failed: {reason}")));
                actions.push(Action::Reply {
                    client,
                    reply: ControlReply::Error {
                        message: format!("checkpoint {stamp} failed: {reason}"),
                    },
                });
            }
            Requester::Periodic => {
                actions.push(Action::Say(format!(
                    "mome: checkpoint {stamp} failed: {reason}"
                )));
            }
        }
        actions
    }

    /// Every node is durable: write the manifest (the commit point), tell
    /// the agents, prune, answer.
    fn commit(&mut self, now: Instant) -> Vec<Action> {
        let Some(f) = self.inflight.as_ref() else {
            return Vec::new();
        };
        let stamp = f.stamp;
        let paused = f.paused.unwrap_or_default();
        let sum = |get: fn(&Durable) -> u64| f.durable.values().map(get).sum::<u64>();
        let created = now_rfc3339();
        let manifest = mome_store::Manifest {
            stamp,
            job_id: self.identity.job_id.clone(),
            incarnation: self.identity.incarnation,
            created: created.clone(),
            nranks: self.identity.nranks,
            nodes: self.identity.nodes,
            binary: self.identity.binary.clone(),
            binary_xxh3: self.identity.binary_xxh3,
            parent: self.parent,
            indexes: f
                .durable
                .iter()
                .map(|(&node, d)| mome_store::IndexRef {
                    node,
                    index: d.index.clone(),
                    len: d.index_len,
                    xxh3: d.index_xxh3,
                })
                .collect(),
            pause_us: paused.pause_us,
            commit_ms: now.saturating_duration_since(f.started).as_millis() as u64,
            bytes_written: sum(|d| d.bytes_written),
            pages: sum(|d| d.pages),
            image_bytes: sum(|d| d.image_bytes),
        };
        let write_start = Instant::now();
        if let Err(e) =
            mome_store::commit_manifest(&self.settings.root, &manifest, self.settings.fsync)
        {
            return self.fail(&format!("cannot write the manifest: {e}"), true);
        }
        let f = self.inflight.take().expect("checked above");
        let mut actions = Vec::new();
        // Diskless: each memory store keeps the manifest next to the data.
        let text = self.settings.memory.as_ref().and_then(|_| {
            std::fs::read_to_string(mome_protocol::ckpt::files::manifest_file(
                &self.settings.root,
                stamp,
            ))
            .ok()
        });
        for node in 0..self.identity.nodes {
            actions.push(Action::ToAgent {
                node,
                command: AgentCommand::Commit {
                    stamp,
                    manifest: text.clone(),
                    keep: self.settings.keep,
                },
            });
        }
        self.parent = Some(stamp);
        if self.settings.memory.is_some() && f.on_disk {
            self.last_on_disk = Some(stamp);
        }
        let pruned = match &self.settings.memory {
            None => mome_store::prune(&self.settings.root, self.settings.keep as usize),
            Some(_) => {
                // The disk store of a diskless job holds the manifests and
                // the disk-level stamps: it keeps the `keep` newest
                // manifests, and everything back to the newest stamp it
                // holds whole.
                let committed = mome_store::list_committed(&self.settings.root).unwrap_or_default();
                let back_to_disk = self
                    .last_on_disk
                    .map_or(0, |d| committed.iter().filter(|&&s| s >= d).count());
                let keep = (self.settings.keep as usize).max(back_to_disk).max(1);
                mome_store::prune_held(&self.settings.root, keep)
            }
        };
        let kept = match pruned {
            Ok(summary) => {
                if !summary.removed_stamps.is_empty() || summary.files_removed > 0 {
                    actions.push(Action::Log(format!(
                        "pruned stamp(s) {:?}: {} file(s), {} bytes freed",
                        summary.removed_stamps, summary.files_removed, summary.bytes_freed
                    )));
                }
                summary.kept
            }
            Err(e) => {
                // The commit stands; old stamps stay until the next prune.
                actions.push(Action::Log(format!(
                    "pruning {} after checkpoint {stamp}: {e}",
                    self.settings.root.display()
                )));
                mome_store::list_committed(&self.settings.root).unwrap_or_default()
            }
        };
        let manifest_ms = write_start.elapsed().as_millis() as u64;
        let done = CheckpointDone {
            stamp,
            created,
            parent: manifest.parent,
            pause_us: paused.pause_us,
            pause_pages: paused.pause_pages,
            precopy_pages: paused.precopy_pages,
            commit_ms: f.started.elapsed().as_millis() as u64,
            manifest_ms,
            bytes_written: manifest.bytes_written,
            pages: manifest.pages,
            image_bytes: manifest.image_bytes,
            kept,
            requested: matches!(f.requester, Requester::Client(_)),
        };
        actions.push(Action::Log(format!(
            "checkpoint {stamp} committed: pause_us {} ({} page(s) paused, {} pre-copied), {} page(s), {} bytes written, image {} bytes, commit {} ms (manifest and prune {} ms); kept {:?}",
            done.pause_us,
            done.pause_pages,
            done.precopy_pages,
            done.pages,
            done.bytes_written,
            done.image_bytes,
            done.commit_ms,
            done.manifest_ms,
            done.kept
        )));
        if let Requester::Client(client) = f.requester {
            actions.push(Action::Reply {
                client,
                reply: ControlReply::Checkpoint(done.clone()),
            });
        }
        self.history.push(done);
        actions
    }
}

fn event_stamp(event: &AgentEvent) -> Option<Stamp> {
    match event {
        AgentEvent::Progress { stamp, .. }
        | AgentEvent::PreCopied { stamp }
        | AgentEvent::Parked { stamp }
        | AgentEvent::Captured { stamp }
        | AgentEvent::Paused { stamp, .. }
        | AgentEvent::Durable { stamp, .. }
        | AgentEvent::Failed { stamp, .. } => Some(*stamp),
        AgentEvent::RankRestored { .. }
        | AgentEvent::RestoreError { .. }
        | AgentEvent::MeshReady { .. }
        | AgentEvent::NodeFailed { .. } => None,
    }
}

/// xxh3-64 of a file's content, read in chunks.
pub fn file_xxh3(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.digest());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpointer(root: PathBuf) -> Checkpointer {
        let mut config = CheckpointConfig::default();
        config.fsync = false;
        config.keep = 1;
        config.interval = mome_protocol::config::Span(Duration::from_secs(60));
        Checkpointer::new(
            Settings::from_config(&config, root),
            JobIdentity {
                job_id: "j".into(),
                incarnation: 0,
                nranks: 2,
                nodes: 1,
                binary: "/bin/true".into(),
                binary_xxh3: 7,
            },
            None,
        )
    }

    fn durable(stamp: Stamp) -> AgentEvent {
        AgentEvent::Durable {
            stamp,
            node: 0,
            index: mome_protocol::ckpt::files::index_file(std::path::Path::new(""), 0, stamp),
            index_len: 10,
            index_xxh3: 11,
            pages: 3,
            bytes_written: 4096,
            image_bytes: 100,
            elapsed_us: 5000,
            held_by: Vec::new(),
            on_disk: false,
            copy_us: 0,
        }
    }

    #[test]
    fn commit_writes_the_manifest_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = checkpointer(dir.path().join("ckpt"));
        let now = Instant::now();
        let client = ClientId(1);
        let actions = c.start(Requester::Client(client), None, now).unwrap();
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::ToAgent {
                node: 0,
                command: AgentCommand::Checkpoint { stamp: 1, .. }
            }
        )));
        assert!(matches!(
            c.start(Requester::Periodic, None, now),
            Err(CheckpointError::Busy { stamp: 1 })
        ));
        let actions = c.on_event(
            0,
            AgentEvent::Progress {
                stamp: 1,
                phase: "write".into(),
                done_bytes: 1,
                total_bytes: 2,
            },
            now,
        );
        assert!(matches!(
            &actions[..],
            [Action::Reply {
                reply: ControlReply::CkptProgress(_),
                ..
            }]
        ));
        c.on_event(
            0,
            AgentEvent::Paused {
                stamp: 1,
                pause_us: 1500,
                pause_pages: 2,
                precopy_pages: 9,
            },
            now,
        );
        let actions = c.on_event(0, durable(1), now);
        assert!(actions.contains(&Action::ToAgent {
            node: 0,
            command: AgentCommand::Commit {
                stamp: 1,
                manifest: None,
                keep: 1
            }
        }));
        let done = actions
            .iter()
            .find_map(|a| match a {
                Action::Reply {
                    reply: ControlReply::Checkpoint(d),
                    ..
                } => Some(d.clone()),
                _ => None,
            })
            .expect("a final reply");
        assert_eq!((done.stamp, done.pause_us, done.pages), (1, 1500, 3));
        let m = mome_store::read_manifest(&dir.path().join("ckpt"), 1).unwrap();
        assert_eq!((m.parent, m.binary_xxh3, m.bytes_written), (None, 7, 4096));
        assert_eq!(c.in_progress(), None);
        // The next one is against stamp 1, with a new number.
        c.start(Requester::Periodic, None, now).unwrap();
        assert_eq!(c.in_progress(), Some(2));
    }

    #[test]
    fn failure_and_timeout_abort() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = checkpointer(dir.path().to_path_buf());
        let now = Instant::now();
        c.start(Requester::Periodic, Some(Duration::from_secs(1)), now)
            .unwrap();
        let actions = c.tick(now + Duration::from_secs(2));
        assert!(actions.contains(&Action::ToAgent {
            node: 0,
            command: AgentCommand::Abort { stamp: 1 }
        }));
        assert!(
            actions.iter().any(|a| matches!(a, Action::Say(s)
                if s.starts_with("mome: checkpoint 1 failed: not committed within"))),
            "{actions:?}"
        );
        // A failed number is not reused, even without any file of it.
        let client = ClientId(4);
        c.start(Requester::Client(client), None, now).unwrap();
        let actions = c.on_event(
            0,
            AgentEvent::Failed {
                stamp: 2,
                reason: "rank 1 refused: 2 threads".into(),
            },
            now,
        );
        assert!(actions.iter().any(|a| matches!(a,
            Action::Reply { client: c, reply: ControlReply::Error { message } }
                if *c == client && message.contains("2 threads"))));
        assert!(mome_store::list_committed(dir.path())
            .unwrap_or_default()
            .is_empty());
    }

    #[test]
    fn periodic_checkpoints_come_due() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = checkpointer(dir.path().to_path_buf());
        let now = Instant::now();
        assert_eq!(c.next_deadline(), None);
        c.arm_periodic(now);
        assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(60)));
        assert!(c.tick(now).is_empty());
        let actions = c.tick(now + Duration::from_secs(61));
        assert!(actions.iter().any(|a| matches!(a, Action::ToAgent { .. })));
        assert_eq!(c.in_progress(), Some(1));
        let actions = c.on_agent_gone("the agent died");
        assert!(!actions.iter().any(|a| matches!(a, Action::ToAgent { .. })));
    }
}
