//! Messages between a rank (the preload library) and its node agent, over the
//! agent's unix socket. Each message is one frame (see [`crate::frame`]).
//!
//! Segment names: `anon:<k>` is the k-th MAP_SHARED anonymous mapping of a
//! rank (shared by the ranks that map it, freed when none does);
//! `mome-seg:<n>` a MomeMMap segment; any other name an shm_open object.
//!
//! Message types borrow their strings from the receive buffer, so the preload
//! can encode and decode them without allocating: some are sent from inside
//! the allocator, with its lock held.
//!
//! Conversation:
//! 1. rank: `Hello` (channel `Memory` first, then a second connection with
//!    channel `Sync` for barriers and locks, which may block for long).
//! 2. agent: `Welcome`, with the node's memfd attached (SCM_RIGHTS) on the
//!    memory channel.
//! 3. rank (memory channel): `RegisterUffd` twice, each with a userfaultfd
//!    attached, answered `Ok`.
//! 4. requests, each answered by exactly one reply, in order.

use serde::{Deserialize, Serialize};

use crate::layout::{WindowLayout, Zone};

/// Which of a rank's two connections this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// Heaps, segments and userfaultfd registration: short requests.
    Memory,
    /// Barriers and locks: requests that wait for other ranks.
    Sync,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankRequest<'a> {
    Hello {
        protocol: u32,
        rank: u32,
        pid: i32,
        channel: Channel,
        /// Job id the rank was started for; the agent refuses another.
        #[serde(borrow)]
        jobid: &'a str,
        /// The rank is being restored from a checkpoint (MOME_RESTORE): the
        /// agent gives it back the heaps, segments and locks it had.
        restoring: bool,
    },
    /// `/proc/self/pagemap` of the rank is attached: the agent scans it for
    /// pages written since the last checkpoint (PAGEMAP_SCAN).
    RegisterPagemap,
    /// Sent from the checkpoint signal handler: the rank stopped, wrote its
    /// private image (`image_len` bytes at window address `image_addr`,
    /// inside heaps it owns) and waits for `Resume`. `entered_ns` is
    /// CLOCK_MONOTONIC when the handler started, to measure the pause.
    CkptParked {
        entered_ns: u64,
        image_addr: u64,
        image_len: u64,
    },
    /// Sent from the checkpoint signal handler instead of `CkptParked`: this
    /// rank cannot be checkpointed (threads, sockets to outside the job...).
    /// The agent abandons the checkpoint and answers `Resume`.
    CkptRefused {
        #[serde(borrow)]
        reason: &'a str,
    },
    /// A restoring rank asks where its private image is.
    RestoreImage,
    /// A restoring rank finished restoring and runs again.
    Restored,
    /// A userfaultfd of the rank for `zone` is attached.
    RegisterUffd {
        zone: Zone,
    },
    /// `count` contiguous private heaps for this rank.
    AllocHeaps {
        count: u32,
    },
    /// Give heaps back; the agent drops their pages.
    FreeHeaps {
        first: u32,
        count: u32,
    },
    /// Open (and with `create`, create) a named shared segment. With `size`
    /// > 0 the segment grows to at least `size` bytes.
    SegmentOpen {
        #[serde(borrow)]
        name: &'a str,
        size: u64,
        create: bool,
        exclusive: bool,
    },
    /// Set the size of a segment (ftruncate); shrinking drops the pages past it.
    SegmentResize {
        id: u32,
        size: u64,
    },
    /// Remove a segment's name. Its memory stays while some rank uses it.
    SegmentUnlink {
        #[serde(borrow)]
        name: &'a str,
    },
    /// The rank no longer maps segment `id`. A segment nobody uses any more
    /// is freed when it has no name (unlinked) or is an anonymous one
    /// (`anon:<k>`); a named segment persists until unlinked, like POSIX shm.
    SegmentRelease {
        id: u32,
    },
    /// The rank maps segment `id` again (through an shm_open descriptor it
    /// kept) after releasing it: it uses the segment again.
    SegmentUse {
        id: u32,
    },
    /// The rank mapped `len` bytes of the window at `window_addr` also at
    /// `addr` outside the window (MomeMMap with MAP_FIXED): faults reported
    /// at `addr` belong to `window_addr`.
    AliasMapped {
        addr: u64,
        len: u64,
        window_addr: u64,
    },
    /// Distributed barrier over all ranks of the job.
    ///
    /// `seq` numbers the rank's sync-channel requests (1, 2, ...). A restored
    /// rank sends again the request it was waiting on at the checkpoint with
    /// the same `seq`: the agent answers it from its saved state when it had
    /// already served it, instead of serving it twice.
    Barrier {
        seq: u64,
    },
    /// Acquire / release a job-wide lock.
    Lock {
        id: u64,
        seq: u64,
    },
    Unlock {
        id: u64,
        seq: u64,
    },
    /// Take lock `id` if free, without waiting: `Ok`, or `Error{Busy}`.
    TryLock {
        id: u64,
        seq: u64,
    },
    /// A barrier of `count` participants named `id` (a process-shared
    /// `pthread_barrier_t` in the window: its address with the top bit
    /// set). Answered `KeyedBarrierDone` once `count` arrivals were seen;
    /// exactly one of them gets `serial: true`.
    KeyedBarrier {
        id: u64,
        count: u32,
        seq: u64,
    },
    /// `MomeConsistency`: window range `addr..addr+len` (shared zone,
    /// rounded out to pages) uses `model` on this rank's node from now on.
    /// Sent on the sync channel: leaving a relaxed model merges the node's
    /// changes first, which waits for other nodes.
    Consistency {
        addr: u64,
        len: u64,
        model: crate::peer::Model,
        seq: u64,
    },
    /// `MomeSyncMem`: make window range `addr..addr+len` reflect every
    /// write released before `date`.
    SyncMem {
        addr: u64,
        len: u64,
        date: u64,
        seq: u64,
    },
    /// Shared malloc (MomeMalloc): blocks of shared heaps owned by other
    /// nodes were freed. `frees` holds up to [`MAX_SHMALLOC_FREES`] entries
    /// of 12 bytes: owner node (u32) and block address (u64), little-endian.
    /// The agent sends each to its node, which queues it for its ranks;
    /// answered `Ok` at once.
    ShmallocFree {
        #[serde(borrow, with = "serde_bytes")]
        frees: &'a [u8],
    },
    /// Shared malloc: up to `max` queued frees of blocks this node owns,
    /// for the rank to apply. Answered `Frees`.
    ShmallocTake {
        max: u32,
    },
}

/// Most entries in one `ShmallocFree` (the preload's request buffer is 512
/// bytes).
pub const MAX_SHMALLOC_FREES: usize = 32;

/// Name of the shared malloc area's segment: the preload opens it, the
/// agent keeps it under strong consistency.
pub const SHMALLOC_AREA: &str = "mome:shmalloc";
/// Bytes of one `ShmallocFree` entry.
pub const SHMALLOC_FREE_ENTRY: usize = 12;
/// Most addresses in one `Frees` reply (the preload's reply buffer is 1 KiB).
pub const MAX_SHMALLOC_TAKE: usize = 112;

/// Lock and barrier ids with this bit set name process-shared pthread
/// objects placed in the window (the bit or'ed with the object's address);
/// `mome_lock` ids should not use it.
pub const PTHREAD_ID_BIT: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is not valid in this state (e.g. unlock of a lock not held).
    Invalid,
    /// Out of window address space or of segment slots.
    NoSpace,
    /// Segment does not exist (open without create).
    NotFound,
    /// Segment exists (create + exclusive).
    Exists,
    /// Size above the segment reservation.
    TooBig,
    /// The agent refuses the connection (wrong job, protocol, credentials).
    Refused,
    /// TryLock of a lock held by another rank.
    Busy,
    /// The request needed another node, which failed: the job is ending.
    NodeFailed,
}

impl ErrorCode {
    /// errno the preload reports to the application for this error.
    pub fn errno(self) -> i32 {
        match self {
            ErrorCode::Invalid => libc::EINVAL,
            ErrorCode::NoSpace => libc::ENOMEM,
            ErrorCode::NotFound => libc::ENOENT,
            ErrorCode::Exists => libc::EEXIST,
            ErrorCode::TooBig => libc::EFBIG,
            ErrorCode::Refused => libc::EACCES,
            ErrorCode::Busy => libc::EBUSY,
            ErrorCode::NodeFailed => libc::EHOSTDOWN,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentReply<'a> {
    /// Answer to `Hello`; on the memory channel the memfd is attached.
    Welcome {
        layout: WindowLayout,
        node: u32,
        nodes: u32,
        nranks: u32,
    },
    Ok,
    Heaps {
        first: u32,
        count: u32,
    },
    Segment {
        id: u32,
        addr: u64,
        size: u64,
    },
    /// All ranks reached the barrier; `date` counts the job's barriers.
    BarrierDone {
        date: u64,
    },
    /// Answer to `KeyedBarrier`: `serial` for exactly one participant
    /// (PTHREAD_BARRIER_SERIAL_THREAD).
    KeyedBarrierDone {
        serial: bool,
    },
    /// Answer to `CkptParked` / `CkptRefused`: go on. `stamp` is the
    /// checkpoint taken (0 when none was).
    Resume {
        stamp: u64,
    },
    /// Answer to `RestoreImage`.
    Image {
        addr: u64,
        len: u64,
    },
    Error {
        code: ErrorCode,
        #[serde(borrow)]
        message: &'a str,
    },
    /// Answer to `ShmallocTake`: block addresses, 8 bytes little-endian each.
    Frees {
        #[serde(borrow, with = "serde_bytes")]
        addrs: &'a [u8],
    },
}
