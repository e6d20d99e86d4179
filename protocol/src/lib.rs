//! Definitions shared by every mome component: the address-space layout of
//! the DSM window, the rank <-> agent wire messages and their framing, the
//! job configuration (YAML) and the files of a job directory.
//!
//! Nothing here owns a live resource (socket, process, mapping): this crate
//! is the serializable state, kept apart from the live objects that use it.

pub mod ckpt;
pub mod config;
pub mod frame;
pub mod job;
pub mod layout;
pub mod peer;
pub mod rank;

pub use config::Config;
pub use layout::WindowLayout;

/// Bumped whenever a message of [`rank`] changes shape.
pub const PROTOCOL_VERSION: u32 = 4;

/// Environment variables set by `mome-run` for every rank.
pub mod env {
    /// Rank number, 0..N.
    pub const RANK: &str = "MOME_RANK";
    /// Number of ranks in the job.
    pub const NRANKS: &str = "MOME_NRANKS";
    /// Node (agent) number the rank runs on.
    pub const NODE: &str = "MOME_NODE";
    /// Job id.
    pub const JOBID: &str = "MOME_JOBID";
    /// Path of the node agent's unix socket (consumed by the preload library).
    pub const AGENT_SOCKET: &str = "MOME_AGENT_SOCKET";
    /// Milliseconds the preload waits for an answer of its agent (barriers
    /// and locks excepted, which wait for other ranks).
    pub const AGENT_TIMEOUT_MS: &str = "MOME_AGENT_TIMEOUT_MS";
    /// Set by the preload library once connected: the pid of the rank. A
    /// process that inherits the preload but has another pid (a forked and
    /// exec'd child) runs natively instead of joining the job.
    pub const RANK_PID: &str = "MOME_RANK_PID";
    /// Home of job directories; default `~/.mome`.
    pub const HOME: &str = "MOME_HOME";
    /// Set by mome-restart: the rank restores its private image (the agent
    /// says where it is) instead of starting the program afresh. The value
    /// is the stamp restored.
    pub const RESTORE: &str = "MOME_RESTORE";
    /// Signal number that brings a rank to a checkpoint.
    pub const CKPT_SIGNAL: &str = "MOME_CKPT_SIGNAL";
    /// `shared` when `memory.malloc` is shared: the program's malloc family
    /// allocates from the job's shared heaps (MomeMalloc).
    pub const MALLOC: &str = "MOME_MALLOC";
}
