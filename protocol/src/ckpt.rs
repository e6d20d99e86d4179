//! Checkpoint and restart: what the coordinator (mome-run / mome-restart)
//! and a node agent say to each other, and the names of the files of a
//! checkpoint store.
//!
//! The coordinator drives each agent through the agent's stdin (one JSON
//! [`AgentCommand`] per line) and reads [`AgentEvent`]s from the agent's
//! stdout (one JSON object per line, after the `ready` line). mome-run holds
//! both pipes; nobody else can speak to an agent this way.
//!
//! A checkpoint of stamp `S`, seen by one agent:
//! 1. `Checkpoint{stamp: S, ..}` arrives. The agent pre-copies (ranks run),
//!    then signals its ranks; each rank parks (saves its private image into
//!    its image heaps in the window and sends `CkptParked`), the agent takes
//!    the final increment and resumes them: event `Paused`.
//! 2. In the background it compresses, checksums and writes the increment
//!    and its node index to the store: event `Durable` (or `Failed`).
//! 3. The coordinator writes the stamp's manifest (the commit point) and
//!    sends `Commit{stamp: S}`: the agent takes S as the base of the next
//!    increment. `Abort{stamp: S}` drops S (the next increment is taken
//!    against the last committed base, with S's dirty pages included).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A checkpoint's number, unique in a job; later checkpoints have larger
/// numbers (a restarted job continues after the largest number present).
pub type Stamp = u64;

/// Coordinator -> agent, one JSON object per line on the agent's stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AgentCommand {
    Checkpoint {
        stamp: Stamp,
        /// Store root (the job's checkpoint directory); the agent writes
        /// under `node_dir(root, node)`.
        store: PathBuf,
        /// fsync data and index before reporting `Durable`.
        fsync: bool,
        /// Pre-copy rounds before the pause (0: copy everything in the pause).
        precopy_rounds: u32,
        /// How long ranks may take to park, in milliseconds.
        park_timeout_ms: u64,
        /// Multi-node jobs: the pause is coordinated across nodes. Once its
        /// ranks are parked and its page traffic drained the agent reports
        /// `Parked` and waits for `Capture`; once it took its part of the
        /// stamp it reports `Captured` and waits for `Resume` before its
        /// ranks run again (each wait bounded by `park_timeout_ms`).
        #[serde(default)]
        coordinated: bool,
        /// Diskless checkpoints: the nodes that keep a copy of this node's
        /// increment (in their memory stores); `Durable` comes once each
        /// holds it.
        #[serde(default)]
        replicas: Vec<u32>,
        /// Also copy the stamp's files (and the older pages files its index
        /// uses) to this store root on disk (the disk level).
        #[serde(default)]
        disk: Option<PathBuf>,
        /// Parity schemes (xor, rs): this node's parity group; its
        /// increment is striped over the group and each member keeps
        /// parity shards of the others'.
        #[serde(default)]
        parity: Option<ParityPlan>,
        /// Take every page, not only what changed since the base (parity
        /// sets cover one stamp: each is a full checkpoint).
        #[serde(default)]
        full: bool,
    },
    /// Coordinated checkpoints: every node finished its pre-copy, park
    /// the ranks (all nodes at once, so that none waits parked for a node
    /// still copying).
    Park {
        stamp: Stamp,
    },
    /// Coordinated checkpoints: every node is parked and drained, take the
    /// stamp's pages.
    Capture {
        stamp: Stamp,
    },
    /// Coordinated checkpoints: every node has taken its part, the ranks
    /// may run again.
    Resume {
        stamp: Stamp,
    },
    Commit {
        stamp: Stamp,
        /// Diskless checkpoints: the committed manifest (the file's text),
        /// kept in the node's memory store next to the data, and how many
        /// committed stamps that store keeps.
        #[serde(default)]
        manifest: Option<String>,
        #[serde(default)]
        keep: u32,
    },
    Abort {
        stamp: Stamp,
    },
    /// Multi-node jobs: the peer addresses of every agent of the job, by node
    /// number (this agent's own included), sent once every agent printed its
    /// `ready <addr>` line. The agent connects to its peers and answers
    /// `MeshReady` once it is connected to all of them.
    Peers {
        addrs: Vec<String>,
    },
}

/// A parity group, as the coordinator tells each member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParityPlan {
    /// Node numbers of the members, in group order.
    pub members: Vec<u32>,
    /// xor (one parity shard per stripe, plain XOR) or Reed-Solomon with
    /// `parity` shards per stripe.
    pub xor: bool,
    pub parity: u32,
}

/// Agent -> coordinator, one JSON object per line on the agent's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// Progress of the copy/write of a checkpoint, for progress bars.
    Progress {
        stamp: Stamp,
        /// "precopy", "pause", "write", "sync".
        phase: String,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Coordinated checkpoints: this node's pre-copy is done (its ranks
    /// still run); it parks them on `Park`.
    PreCopied { stamp: Stamp },
    /// Coordinated checkpoints: this node's ranks are parked and no page
    /// request of this node is in flight.
    Parked { stamp: Stamp },
    /// Coordinated checkpoints: this node took its part of the stamp (its
    /// ranks wait for `Resume`).
    Captured { stamp: Stamp },
    /// Ranks resumed: the application-visible pause is over.
    Paused {
        stamp: Stamp,
        /// Longest time one rank did not run (from entering the checkpoint
        /// signal handler to being resumed), microseconds.
        pause_us: u64,
        /// Pages copied during the pause (re-dirtied after pre-copy).
        pause_pages: u64,
        /// Pages copied in pre-copy rounds while ranks ran.
        precopy_pages: u64,
    },
    /// The increment and the node index of `stamp` are written (and synced
    /// when asked).
    Durable {
        stamp: Stamp,
        node: u32,
        /// Node index file, relative to the store root.
        index: PathBuf,
        index_len: u64,
        /// xxh3-64 of the index file.
        index_xxh3: u64,
        /// Pages in this increment (dirtied since the base stamp).
        pages: u64,
        /// Bytes written to the store for this stamp (data + index).
        bytes_written: u64,
        /// Private image bytes of the node's ranks (uncompressed).
        image_bytes: u64,
        /// Microseconds from the command to durability.
        elapsed_us: u64,
        /// Diskless checkpoints: the other nodes that hold a copy.
        #[serde(default)]
        held_by: Vec<u32>,
        /// The stamp is also in the disk store.
        #[serde(default)]
        on_disk: bool,
        /// Microseconds spent sending the copies (and writing to disk).
        #[serde(default)]
        copy_us: u64,
    },
    /// The checkpoint cannot be taken: ranks were resumed (or never
    /// stopped), nothing of `stamp` is to be used.
    Failed { stamp: Stamp, reason: String },
    /// A restored rank finished restoring its private state and runs again.
    RankRestored {
        rank: u32,
        /// Microseconds since the agent started.
        since_start_us: u64,
    },
    /// A restored page could not be read from the store (corrupt or
    /// missing data): the job cannot go on from this stamp.
    RestoreError { reason: String },
    /// Multi-node jobs: this agent is connected to every other agent (each
    /// proved the job's secret); its ranks may start.
    MeshReady {
        /// Microseconds from `Peers` to the last connection.
        elapsed_us: u64,
    },
    /// Multi-node jobs: node `node` is considered dead (heartbeats stopped,
    /// its connection broke, or it did not answer a request in time). The
    /// job cannot go on; `reason` says what was seen.
    NodeFailed { node: u32, reason: String },
}

/// Files of a checkpoint store (`--ckpt-dir`, default `<jobdir>/ckpt`).
pub mod files {
    use super::Stamp;
    use std::path::{Path, PathBuf};

    /// Directory of node `node`'s increments and indexes.
    pub fn node_dir(root: &Path, node: u32) -> PathBuf {
        root.join(format!("node-{node}"))
    }
    /// Page data written by node `node` for `stamp`.
    pub fn pages_file(root: &Path, node: u32, stamp: Stamp) -> PathBuf {
        node_dir(root, node).join(format!("{stamp:08}.pages"))
    }
    /// Node index of `stamp`: where every page of the node's window is.
    pub fn index_file(root: &Path, node: u32, stamp: Stamp) -> PathBuf {
        node_dir(root, node).join(format!("{stamp:08}.index"))
    }
    /// Directory of committed manifests.
    pub fn stamps_dir(root: &Path) -> PathBuf {
        root.join("stamps")
    }
    /// The manifest of `stamp`: present (complete) means committed.
    pub fn manifest_file(root: &Path, stamp: Stamp) -> PathBuf {
        stamps_dir(root).join(format!("{stamp:08}.manifest"))
    }
}
