//! Messages between the node agents of a multi-node job, over TCP. Each
//! message is one frame of [`crate::frame`] (4-byte length + postcard).
//!
//! Connection: the connecting agent sends `Hello` with a fresh nonce; the
//! accepting one answers `Challenge` with its own nonce and its proof of the
//! job's secret over both nonces; the connecting one answers `Proof`, its
//! own proof. Either side closes the connection on a wrong proof, job or
//! node (a `Refused` line says why when it can). After that, any message in
//! either direction; `Heartbeat` when there is nothing else to say.
//!
//! Page protocol (strong consistency, see `dsm-agent/src/pages.rs`): the
//! owner of a page is also its manager and keeps its copyset; other nodes
//! keep a probable owner, to which they send `PageRequest`, forwarded along
//! probable owners until it reaches the owner, which answers `PageGrant`
//! straight to the requester. A write grant hands over ownership and the
//! copyset, which the new owner invalidates (`Invalidate`/`InvalidateAck`)
//! before writing. Epochs (one more at each change of owner) let a node
//! tell a read grant overtaken by an invalidation from a fresh one.
//!
//! Release and weak consistency (see `dsm-agent/src/pages.rs`): every
//! request carries the requester's contract (its model for the page) and
//! the date its copy is valid from; copies under a relaxed contract are not
//! invalidated by writes but dropped by their holder at its acquire points.
//! A second writer gets a copy to write (`twin`) instead of ownership and
//! sends its modifications back as an XOR delta (`PageDiff`), merged by the
//! owner. Dates are scalar Lamport clocks: every dated message moves the
//! receiver's clock past its date.

use serde::{Deserialize, Serialize};

use crate::layout::PAGE_SIZE;
use crate::rank::ErrorCode;

/// Bumped whenever a [`PeerMsg`] changes shape.
pub const PEER_PROTOCOL_VERSION: u32 = 4;
/// Bytes of a nonce and of a proof.
pub const NONCE_LEN: usize = 32;
/// Most pages a read grant carries after the one asked for (a frame holds
/// at most 64 KiB).
pub const MAX_PREFETCH: u32 = 14;

/// One page of data, as sent in a grant.
pub type PageData = Vec<u8>;

/// The consistency model a node uses for a page, which is the contract its
/// copies are held under (`MomeConsistency`).
// Lowercase names in job.yaml (`nodes.consistency`); postcard numbers the
// variants, so the names do not reach the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// Sequential consistency: a copy is invalidated before any write.
    #[default]
    Strong,
    /// Writes become visible at release points; stale copies are dropped
    /// at acquire points.
    Release,
    /// Writes become visible at release points; copies are refreshed only
    /// by `MomeSyncMem`.
    Weak,
}

impl Model {
    /// The C API's number of the model (mome.h: MOME_STRONG...).
    pub fn from_c(model: i32) -> Option<Model> {
        match model {
            0 => Some(Model::Strong),
            1 => Some(Model::Release),
            2 => Some(Model::Weak),
            _ => None,
        }
    }

    pub fn relaxed(self) -> bool {
        self != Model::Strong
    }
}

/// Most bytes of a compressed XOR delta of one page (lz4 of a page that
/// does not compress, with its 4-byte size prefix).
pub const MAX_DELTA: usize = PAGE_SIZE as usize + PAGE_SIZE as usize / 255 + 64;

/// A job-wide synchronisation operation, sent to the node that manages it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncOp {
    Barrier,
    Lock { id: u64 },
    TryLock { id: u64 },
    Unlock { id: u64 },
    KeyedBarrier { id: u64, count: u32 },
}

/// The answer to a [`SyncOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncAnswer {
    Ok,
    BarrierDone { date: u64 },
    KeyedBarrierDone { serial: bool },
    Busy,
    Error(String),
}

/// A shared-segment table operation, sent to node 0, which holds the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentOp {
    Open {
        name: String,
        size: u64,
        create: bool,
        exclusive: bool,
    },
    Resize {
        id: u32,
        size: u64,
    },
    Unlink {
        name: String,
    },
    Release {
        id: u32,
    },
    Use {
        id: u32,
    },
}

/// The answer to a [`SegmentOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentAnswer {
    /// Slot and size of the segment (`created`: this open created it).
    Segment {
        slot: u32,
        size: u64,
        created: bool,
    },
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    Hello {
        protocol: u32,
        job: String,
        node: u32,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        node: u32,
        nonce: [u8; NONCE_LEN],
        proof: [u8; NONCE_LEN],
    },
    Proof {
        proof: [u8; NONCE_LEN],
    },
    Refused {
        reason: String,
    },
    Heartbeat,
    /// `from` wants page `page` (a page number of the shared zone) for
    /// reading or writing. `has_copy`: it holds a read copy, so a write
    /// grant may leave the data out. `hops` counts forwards. A request may
    /// ask for up to `prefetch` following pages as well (sequential access):
    /// the owner adds those it owns and can give at once.
    PageRequest {
        page: u64,
        from: u32,
        req: u64,
        write: bool,
        has_copy: bool,
        hops: u32,
        prefetch: u32,
        /// The requester's contract for its copy.
        contract: Model,
        /// With `has_copy`: the date the requester's copy is valid from (the
        /// owner leaves the data out when nothing changed since).
        copy_date: u64,
        /// The requester's date when it asked: the grant is dated after it.
        date: u64,
    },
    /// The owner's answer to request `req` of the receiver. A write grant
    /// makes the receiver the owner: `copyset` (a bit per node) is then the
    /// set of nodes it must invalidate. `data` is absent when the receiver
    /// already holds the current copy.
    PageGrant {
        page: u64,
        req: u64,
        write: bool,
        epoch: u64,
        copyset: u64,
        #[serde(with = "serde_bytes")]
        data: Option<PageData>,
        /// Pages `page + 1`, `page + 2`, ... with their epochs (prefetch):
        /// read copies with a read grant; with a write grant, ownership of
        /// pages nobody else holds a copy of (nothing to invalidate).
        extra: Vec<(u64, PageData)>,
        /// The owner's date when it answered: the copy reflects every write
        /// the owner had merged by then.
        date: u64,
        /// Answer to a relaxed write request while another node writes the
        /// page: a copy the receiver may write, keeping a twin of it, and
        /// whose changes it sends back with `PageDiff` (not ownership).
        twin: bool,
    },
    /// Drop your copy of `page`: `new_owner` owns it from epoch `epoch`.
    Invalidate {
        page: u64,
        epoch: u64,
        new_owner: u32,
    },
    InvalidateAck {
        page: u64,
        epoch: u64,
    },
    /// Pages of a freed or shrunk segment: drop them and forget their
    /// state (they are zero again, owned by their home node).
    DropPages {
        first: u64,
        count: u64,
    },
    /// A sync operation of a rank of the sender (session numbers are the
    /// sender's own), for the receiver, its manager.
    Sync {
        req: u64,
        session: u64,
        rank: u32,
        seq: u64,
        op: SyncOp,
        /// The sender's date (a release's writes are merged before it).
        date: u64,
    },
    SyncDone {
        req: u64,
        answer: SyncAnswer,
        /// The manager's date when it answered.
        date: u64,
    },
    /// A segment table operation of a session of the sender, for node 0.
    Segment {
        req: u64,
        session: u64,
        /// The session's rank: node 0 names segment users by rank in a
        /// checkpoint, and a restored rank takes back what it used.
        rank: u32,
        op: SegmentOp,
    },
    SegmentDone {
        req: u64,
        answer: SegmentAnswer,
    },
    /// A session of the sender ended: what it held (locks, a place in a
    /// barrier, segment uses) goes.
    SessionEnded {
        session: u64,
    },
    /// The sender is shutting down cleanly (the job ended): its connection
    /// closing next is not a failure.
    Leaving,
    /// Restore of a multi-node job: the sender owned these shared-zone
    /// pages (first page, count) at the stamp; sent to their home node,
    /// which points its requests there.
    OwnerHints {
        runs: Vec<(u64, u32)>,
    },
    /// Restore: the sender sent all its `OwnerHints` (this connection is
    /// ordered: the receiver has them all).
    HintsDone,
    /// Diskless checkpoints: a piece of node `source`'s file of `stamp`
    /// (its index when `index`, else its pages file) for the receiver's
    /// memory store: `data` goes at `offset` of a file of `total` bytes.
    /// The pages file comes first, the index last.
    StoreChunk {
        source: u32,
        stamp: u64,
        index: bool,
        offset: u64,
        total: u64,
        // Bytes, not a sequence of u8: the same encoding (length, then the
        // bytes), written and read in one copy instead of byte by byte.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Parity schemes: the sizes of node `source`'s files of `stamp`
    /// (every member of its group needs them to stripe alike).
    ParityInfo {
        source: u32,
        stamp: u64,
        pages_len: u64,
        index_len: u64,
    },
    /// Parity schemes: a piece of chunk `chunk` of node `source`'s
    /// striped files of `stamp` (the chunk is `total` bytes), for the
    /// parity shard the receiver keeps of that chunk's stripe.
    ParityChunk {
        source: u32,
        stamp: u64,
        chunk: u32,
        offset: u64,
        total: u64,
        // Bytes, not a sequence of u8: the same encoding (length, then the
        // bytes), written and read in one copy instead of byte by byte.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The receiver holds node `source`'s files of `stamp` (complete and
    /// checked), or could not keep them (`error`).
    StoreHeld {
        source: u32,
        stamp: u64,
        error: Option<String>,
    },
    /// The changes node `from` made to its writable copy of `page`: the
    /// XOR of the copy and its twin, lz4-compressed with its size first.
    /// Forwarded like requests until it reaches the owner, which merges it
    /// and answers `DiffAck` to `from`.
    PageDiff {
        page: u64,
        from: u32,
        req: u64,
        date: u64,
        hops: u32,
        #[serde(with = "serde_bytes")]
        delta: Vec<u8>,
    },
    /// The owner merged diff `req` of the receiver at date `date`.
    DiffAck {
        page: u64,
        req: u64,
        date: u64,
    },
    /// Shared malloc (MomeMalloc): ranks of the sender freed the blocks at
    /// `addrs` (at most [`MAX_REMOTE_FREES`]), in shared heaps the receiver
    /// owns. `seq` numbers the sender's messages; the receiver queues the
    /// blocks for its ranks and answers `RemoteFreeAck`.
    RemoteFree {
        seq: u64,
        addrs: Vec<u64>,
    },
    /// The receiver's remote free `seq` is queued at the sender.
    RemoteFreeAck {
        seq: u64,
    },
}

/// Most bytes of file data in one `StoreChunk` (a frame is at most 64 KiB).
pub const MAX_STORE_CHUNK: usize = 60 * 1024;

/// Most blocks in one `RemoteFree` message.
pub const MAX_REMOTE_FREES: usize = 256;

/// Most runs in one `OwnerHints` message (a frame is at most 64 KiB).
pub const MAX_HINT_RUNS: usize = 2048;

impl PeerMsg {
    /// Short name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            PeerMsg::Hello { .. } => "Hello",
            PeerMsg::Challenge { .. } => "Challenge",
            PeerMsg::Proof { .. } => "Proof",
            PeerMsg::Refused { .. } => "Refused",
            PeerMsg::Heartbeat => "Heartbeat",
            PeerMsg::PageRequest { .. } => "PageRequest",
            PeerMsg::PageGrant { .. } => "PageGrant",
            PeerMsg::Invalidate { .. } => "Invalidate",
            PeerMsg::InvalidateAck { .. } => "InvalidateAck",
            PeerMsg::PageDiff { .. } => "PageDiff",
            PeerMsg::DiffAck { .. } => "DiffAck",
            PeerMsg::DropPages { .. } => "DropPages",
            PeerMsg::Sync { .. } => "Sync",
            PeerMsg::SyncDone { .. } => "SyncDone",
            PeerMsg::Segment { .. } => "Segment",
            PeerMsg::SegmentDone { .. } => "SegmentDone",
            PeerMsg::SessionEnded { .. } => "SessionEnded",
            PeerMsg::Leaving => "Leaving",
            PeerMsg::OwnerHints { .. } => "OwnerHints",
            PeerMsg::HintsDone => "HintsDone",
            PeerMsg::StoreChunk { .. } => "StoreChunk",
            PeerMsg::StoreHeld { .. } => "StoreHeld",
            PeerMsg::ParityInfo { .. } => "ParityInfo",
            PeerMsg::ParityChunk { .. } => "ParityChunk",
            PeerMsg::RemoteFree { .. } => "RemoteFree",
            PeerMsg::RemoteFreeAck { .. } => "RemoteFreeAck",
        }
    }

    /// Checks what the type system cannot: a page grant carries exactly one
    /// page, names and messages are of sane length.
    pub fn validate(&self) -> Result<(), String> {
        const MAX_TEXT: usize = 4096;
        match self {
            PeerMsg::PageGrant {
                data: Some(data), ..
            } if data.len() as u64 != PAGE_SIZE => Err(format!(
                "page grant with {} bytes of data instead of {PAGE_SIZE}",
                data.len()
            )),
            PeerMsg::PageGrant { extra, .. } if extra.len() > MAX_PREFETCH as usize => Err(
                format!("{} prefetched pages, more than {MAX_PREFETCH}", extra.len()),
            ),
            PeerMsg::PageGrant { extra, .. }
                if extra.iter().any(|(_, d)| d.len() as u64 != PAGE_SIZE) =>
            {
                Err(format!("prefetched page of other than {PAGE_SIZE} bytes"))
            }
            PeerMsg::PageRequest { prefetch, .. } if *prefetch > MAX_PREFETCH => Err(format!(
                "request for {prefetch} prefetched pages, more than {MAX_PREFETCH}"
            )),
            PeerMsg::PageDiff { delta, .. } if delta.len() > MAX_DELTA || delta.len() < 4 => {
                Err(format!(
                    "page delta of {} bytes, not in 4..={MAX_DELTA}",
                    delta.len()
                ))
            }
            PeerMsg::Hello { job, .. } if job.len() > MAX_TEXT => Err("job id too long".into()),
            PeerMsg::StoreChunk { data, .. } | PeerMsg::ParityChunk { data, .. }
                if data.len() > MAX_STORE_CHUNK =>
            {
                Err(format!(
                    "{} of {} bytes, more than {MAX_STORE_CHUNK}",
                    self.name(),
                    data.len()
                ))
            }
            PeerMsg::StoreChunk {
                offset,
                total,
                data,
                ..
            }
            | PeerMsg::ParityChunk {
                offset,
                total,
                data,
                ..
            } if offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > *total) =>
            {
                Err(format!(
                    "{} {offset}+{} past its {total} bytes",
                    self.name(),
                    data.len()
                ))
            }
            PeerMsg::StoreHeld { error: Some(e), .. } if e.len() > MAX_TEXT => {
                Err("store error text too long".into())
            }
            PeerMsg::RemoteFree { addrs, .. } if addrs.len() > MAX_REMOTE_FREES => Err(format!(
                "{} remote frees in one message, more than {MAX_REMOTE_FREES}",
                addrs.len()
            )),
            PeerMsg::OwnerHints { runs } if runs.len() > MAX_HINT_RUNS => Err(format!(
                "{} owner hints, more than {MAX_HINT_RUNS}",
                runs.len()
            )),
            PeerMsg::Segment {
                op: SegmentOp::Open { name, .. } | SegmentOp::Unlink { name },
                ..
            } if name.len() > MAX_TEXT => Err("segment name too long".into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    #[test]
    fn round_trip_and_validation() {
        let msgs = vec![
            PeerMsg::Heartbeat,
            PeerMsg::PageGrant {
                page: 7,
                req: 9,
                write: true,
                epoch: 3,
                copyset: 0b101,
                data: Some(vec![0xab; PAGE_SIZE as usize]),
                extra: vec![],
                date: 11,
                twin: false,
            },
            PeerMsg::PageGrant {
                page: 7,
                req: 9,
                write: false,
                epoch: 3,
                copyset: 0,
                data: Some(vec![0xab; PAGE_SIZE as usize]),
                extra: vec![(2, vec![1; PAGE_SIZE as usize]); MAX_PREFETCH as usize],
                date: 12,
                twin: true,
            },
            PeerMsg::PageDiff {
                page: 3,
                from: 1,
                req: 2,
                date: 9,
                hops: 0,
                delta: vec![0; 40],
            },
            PeerMsg::Sync {
                req: 1,
                session: 2,
                rank: 3,
                seq: 4,
                op: SyncOp::KeyedBarrier { id: 5, count: 6 },
                date: 7,
            },
        ];
        let mut buf = vec![0u8; frame::MAX_FRAME];
        for m in msgs {
            let n = frame::encode(&m, &mut buf).unwrap();
            let back: PeerMsg = frame::decode(&buf[frame::HEADER..n]).unwrap();
            assert_eq!(back, m);
            assert!(back.validate().is_ok());
        }
        let short = PeerMsg::PageGrant {
            page: 0,
            req: 0,
            write: false,
            epoch: 0,
            copyset: 0,
            data: Some(vec![1, 2, 3]),
            extra: vec![],
            date: 0,
            twin: false,
        };
        assert!(short.validate().is_err());
    }
}
