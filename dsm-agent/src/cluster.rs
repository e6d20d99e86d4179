//! What an agent does as one node among several: routing the job-wide
//! tables to the node that manages them and answering other nodes'
//! messages. The transport is `mesh`, the page protocol `pages`.
//!
//! Managers: node 0 holds the shared-segment table (names to slots) and
//! manages `mome_barrier`; a lock or keyed barrier id is managed by the node
//! its hash names. A manager runs the same [`SyncTable`] as a single-node
//! agent, in which a rank of another node appears as a session numbered
//! [`remote_session`]; its grants travel back as `SyncDone`. On one node
//! every call below goes straight to the local tables.
//!
//! Checkpoint replay of sync requests (answering a restored rank's request
//! from the record) happens at the manager: each manager records, per rank,
//! the last request of that rank it served, and a rank has one request in
//! flight at a time, so a request number at or below the record was served
//! there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::peer::{PeerMsg, SegmentAnswer, SegmentOp, SyncAnswer, SyncOp};
use mome_protocol::rank::ErrorCode;
use tokio::sync::oneshot;

use crate::agent::{lock, Agent, SessionId};
use crate::mesh::Mesh;
use crate::pages::PageEngine;
use crate::segments::SegmentError;
use crate::sync::{Caller, LockGrant, SyncReply};

/// The multi-node part of an agent.
#[derive(Debug)]
pub struct Cluster {
    pub mesh: Arc<Mesh>,
    pub pages: Arc<PageEngine>,
    next_req: AtomicU64,
    sync_waiting: Mutex<HashMap<u64, oneshot::Sender<SyncAnswer>>>,
    segment_waiting: Mutex<HashMap<u64, oneshot::Sender<SegmentAnswer>>>,
    /// Rank of each session of another node seen by this node's tables
    /// (a checkpoint names lock holders and segment users by rank).
    remote_ranks: Mutex<HashMap<SessionId, u32>>,
    /// Diskless checkpoints: copies in flight.
    pub replicas: crate::replicate::Replicas,
    /// Parity schemes: shards being built.
    pub parity: crate::parity::Parity,
}

impl Cluster {
    pub fn new(mesh: Arc<Mesh>, pages: Arc<PageEngine>) -> Cluster {
        Cluster {
            mesh,
            pages,
            next_req: AtomicU64::new(1),
            sync_waiting: Mutex::new(HashMap::new()),
            segment_waiting: Mutex::new(HashMap::new()),
            remote_ranks: Mutex::new(HashMap::new()),
            replicas: Default::default(),
            parity: Default::default(),
        }
    }

    /// Session `id` of another node is rank `rank`'s. The first time, what
    /// the rank's placeholder holds in this node's tables (a restored job:
    /// locks, segments in use) becomes the session's.
    /// Locks go to the rank's sync session (`sync`), segment uses to its
    /// memory session, as on the rank's own node (`session::take_over`).
    pub fn remote_rank(&self, agent: &Agent, id: SessionId, rank: u32, sync: bool) {
        if lock(&self.remote_ranks).insert(id, rank).is_some() {
            return;
        }
        let from = crate::tables::placeholder(rank);
        let (what, moved) = if sync {
            ("lock(s)", lock(&agent.sync).reassign(from, id))
        } else {
            ("segment use(s)", lock(&agent.segments).reassign(from, id))
        };
        if moved > 0 {
            log!("rank {rank} (a session of another node) took back {moved} {what}");
        }
    }

    /// Rank of a session of another node, as last seen.
    pub fn rank_of_remote(&self, id: SessionId) -> Option<u32> {
        lock(&self.remote_ranks).get(&id).copied()
    }

    fn req(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }
}

/// How a session of node `node` is named in a manager's tables.
pub fn remote_session(node: u32, session: u64) -> SessionId {
    SessionId(((node as u64 + 1) << 48) | session)
}

/// Restore of a multi-node job, before any rank connects: puts the pages
/// of the shared zone this node owned at the stamp back in its memory,
/// takes their ownership, and tells each page's home node where it is
/// (the pages' other nodes ask the home first). `mesh_ready` then waits
/// for every other node's hints.
pub fn restore_shared(agent: &Agent, restore: &crate::restore::Restore) -> Result<u64, String> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Ok(0);
    };
    let layout = agent.id.layout;
    let first = (layout.shared_base() - layout.base) / PAGE_SIZE;
    let mut owned: Vec<u64> = Vec::new();
    let mut failed = None;
    let count = restore
        .shared_pages(|page, data| {
            let offset = layout.file_offset(layout.base + page * PAGE_SIZE);
            if let Err(e) = agent.memory.write_at(data, offset) {
                failed.get_or_insert(format!("cannot put page {page} back: {e}"));
            }
            owned.push(page - first);
        })
        .map_err(|e| e.to_string())?;
    if let Some(e) = failed {
        return Err(e);
    }
    let runs = crate::pages::runs_of(&owned);
    cluster.pages.restore_owned(&runs);
    let mesh = &cluster.mesh;
    mesh.await_hints();
    // Hints by home node: a run is cut where the home changes.
    let mut by_home: HashMap<u32, Vec<(u64, u32)>> = HashMap::new();
    for r in &runs {
        let mut p = r.start;
        while p < r.end {
            let home = crate::pages::home_of(p, mesh.nodes);
            let mut end = p + 1;
            while end < r.end
                && crate::pages::home_of(end, mesh.nodes) == home
                && end - p < u64::from(u32::MAX)
            {
                end += 1;
            }
            if home != mesh.node {
                by_home.entry(home).or_default().push((p, (end - p) as u32));
            }
            p = end;
        }
    }
    for (home, hints) in by_home {
        for part in hints.chunks(mome_protocol::peer::MAX_HINT_RUNS) {
            mesh.send(
                home,
                PeerMsg::OwnerHints {
                    runs: part.to_vec(),
                },
            );
        }
    }
    mesh.broadcast(&PeerMsg::HintsDone);
    Ok(count)
}

/// Node managing lock or keyed barrier `id`.
pub fn manager_of(id: u64, nodes: u32) -> u32 {
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % nodes.max(1) as u64) as u32
}

/// Node managing sync operation `op`: node 0 for `mome_barrier`, the
/// hash of the id otherwise.
fn manager(op: &SyncOp, nodes: u32) -> u32 {
    match *op {
        SyncOp::Barrier => 0,
        SyncOp::Lock { id }
        | SyncOp::TryLock { id }
        | SyncOp::Unlock { id }
        | SyncOp::KeyedBarrier { id, .. } => manager_of(id, nodes),
    }
}

/// A sync operation on its way to its answer.
#[derive(Debug)]
pub enum Pending {
    Now(SyncAnswer),
    Barrier(oneshot::Receiver<u64>),
    Lock(oneshot::Receiver<()>),
    Keyed(oneshot::Receiver<bool>),
    Remote(oneshot::Receiver<SyncAnswer>),
}

impl Pending {
    /// The answer; `None` when the operation was abandoned (its session
    /// ended, or the manager went away).
    pub async fn wait(self) -> Option<SyncAnswer> {
        match self {
            Pending::Now(a) => Some(a),
            Pending::Barrier(rx) => rx.await.ok().map(|date| SyncAnswer::BarrierDone { date }),
            Pending::Lock(rx) => rx.await.ok().map(|()| SyncAnswer::Ok),
            Pending::Keyed(rx) => rx
                .await
                .ok()
                .map(|serial| SyncAnswer::KeyedBarrierDone { serial }),
            Pending::Remote(rx) => rx.await.ok(),
        }
    }
}

impl From<SyncReply> for SyncAnswer {
    fn from(r: SyncReply) -> SyncAnswer {
        match r {
            SyncReply::Ok => SyncAnswer::Ok,
            SyncReply::BarrierDone { date } => SyncAnswer::BarrierDone { date },
            SyncReply::KeyedBarrierDone { serial } => SyncAnswer::KeyedBarrierDone { serial },
            SyncReply::Busy => SyncAnswer::Busy,
            SyncReply::Error(m) => SyncAnswer::Error(m),
        }
    }
}

/// Runs `op` on this node's sync table (this node manages it); `date` is
/// the caller's node's date when it sent it.
fn sync_local(agent: &Agent, caller: Caller, op: SyncOp, date: u64) -> Pending {
    let mut sync = lock(&agent.sync);
    // A restored rank sends again the request it waited in; the manager
    // that served it before the stamp answers from its record.
    if let Some(r) = sync.replay(caller.rank, caller.seq) {
        return Pending::Now(r.into());
    }
    match op {
        SyncOp::Barrier => Pending::Barrier(sync.barrier_arrive(caller, date)),
        SyncOp::Lock { id } => match sync.lock(caller, id) {
            Ok(LockGrant::Granted) => Pending::Now(SyncAnswer::Ok),
            Ok(LockGrant::Queued(rx)) => Pending::Lock(rx),
            Err(e) => Pending::Now(SyncAnswer::Error(e.to_string())),
        },
        SyncOp::TryLock { id } => Pending::Now(if sync.try_lock(caller, id) {
            SyncAnswer::Ok
        } else {
            SyncAnswer::Busy
        }),
        SyncOp::Unlock { id } => match sync.unlock(caller, id) {
            Ok(()) => Pending::Now(SyncAnswer::Ok),
            Err(e) => Pending::Now(SyncAnswer::Error(e.to_string())),
        },
        SyncOp::KeyedBarrier { id, count } => Pending::Keyed(sync.keyed_arrive(caller, id, count)),
    }
}

/// A sync operation of a local session, sent to its manager.
pub fn sync_call(agent: &Agent, caller: Caller, op: SyncOp) -> Pending {
    let Some(cluster) = agent.cluster.as_ref() else {
        return sync_local(agent, caller, op, 0);
    };
    let mesh = &cluster.mesh;
    let manager = manager(&op, mesh.nodes);
    let date = cluster.pages.tick();
    if manager == mesh.node {
        return sync_local(agent, caller, op, date);
    }
    let req = cluster.req();
    let (tx, rx) = oneshot::channel();
    lock(&cluster.sync_waiting).insert(req, tx);
    mesh.send(
        manager,
        PeerMsg::Sync {
            req,
            session: caller.session.0,
            rank: caller.rank,
            seq: caller.seq,
            op,
            date,
        },
    );
    Pending::Remote(rx)
}

/// Whether `op` is a release point (the node's changes must be merged
/// before it).
pub fn releases(op: &SyncOp) -> bool {
    matches!(
        op,
        SyncOp::Barrier | SyncOp::Unlock { .. } | SyncOp::KeyedBarrier { .. }
    )
}

/// Whether `op`, answered `answer`, is an acquire point (copies older
/// than its date must go).
pub fn acquires(op: &SyncOp, answer: &SyncAnswer) -> bool {
    match op {
        SyncOp::Barrier | SyncOp::KeyedBarrier { .. } | SyncOp::Lock { .. } => {
            !matches!(answer, SyncAnswer::Error(_))
        }
        SyncOp::TryLock { .. } => *answer == SyncAnswer::Ok,
        SyncOp::Unlock { .. } => false,
    }
}

/// How long to wait for the owners of pages to merge this node's changes.
fn merge_timeout(cluster: &Cluster) -> std::time::Duration {
    cluster.mesh.timing.peer_timeout
}

async fn merged(cluster: &Cluster, rx: oneshot::Receiver<()>) -> Result<(), String> {
    let limit = merge_timeout(cluster);
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("the page engine stopped".into()),
        Err(_) => Err(format!(
            "changes to shared pages not merged by their owners after {:.1} s",
            limit.as_secs_f64()
        )),
    }
}

/// A release point on this node: returns once every change it made to
/// pages it writes without owning them is merged by their owners.
pub async fn release(agent: &Agent) -> Result<(), String> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Ok(());
    };
    match cluster.pages.release() {
        Some(rx) => merged(cluster, rx).await,
        None => Ok(()),
    }
}

/// Which copies an acquire point drops.
#[derive(Debug, Clone)]
pub struct Acquire {
    /// Copies older than this date.
    pub date: u64,
    /// In this range of shared-zone pages only.
    pub range: Option<std::ops::Range<u64>>,
    /// Copies under the release model only (a lock or barrier), or under
    /// any model (MomeSyncMem, a range made strong).
    pub release_model_only: bool,
}

/// An acquire point on this node: its changes are released, then its
/// copies under a relaxed contract older than the acquire are dropped (the
/// next access fetches the page again). Returns how many were dropped.
pub async fn acquire(agent: &Agent, what: Acquire) -> Result<usize, String> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Ok(0);
    };
    if what.range.is_none() && !cluster.pages.any_relaxed() {
        return Ok(0);
    }
    release(agent).await?;
    let mut dropped = 0;
    // A local rank may write a stale copy meanwhile (its changes are
    // released before the copy goes), or ask for a page whose answer may
    // be older than the acquire: the copies are looked at again until
    // none is stale.
    let deadline = tokio::time::Instant::now() + merge_timeout(cluster);
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "copies of shared pages still stale after {:.1} s",
                merge_timeout(cluster).as_secs_f64()
            ));
        }
        let stale = cluster
            .pages
            .drop_stale(what.date, what.range.clone(), |m| {
                !what.release_model_only || m == mome_protocol::peer::Model::Release
            });
        dropped += stale.dropped;
        if let Some(rx) = stale.merged {
            merged(cluster, rx).await?;
        } else if stale.again {
            // Released copies with nothing to merge: dropped right away.
            continue;
        } else if stale.busy {
            tokio::time::sleep(std::time::Duration::from_micros(100)).await;
        } else {
            return Ok(dropped);
        }
    }
}

/// The date of an acquire that just got its answer (a lock, a barrier):
/// after every date the answer carried.
pub fn acquire_date(agent: &Agent, answer: &SyncAnswer) -> u64 {
    let Some(cluster) = agent.cluster.as_ref() else {
        return 0;
    };
    if let SyncAnswer::BarrierDone { date } = answer {
        cluster.pages.observe(*date);
    }
    cluster.pages.tick()
}

/// A local session ended: the managers on other nodes forget it.
pub fn session_ended(agent: &Agent, session: SessionId) {
    if let Some(cluster) = agent.cluster.as_ref() {
        cluster
            .mesh
            .broadcast(&PeerMsg::SessionEnded { session: session.0 });
    }
}

/// A segment-table operation of session `session` (local, or a remote
/// one named by [`remote_session`]) on this node's table.
pub fn segment_local(
    agent: &Agent,
    session: SessionId,
    op: &SegmentOp,
    label: &str,
) -> SegmentAnswer {
    let error = |e: SegmentError| SegmentAnswer::Error {
        code: e.code(),
        message: e.to_string(),
    };
    let layout = agent.id.layout;
    let mut segments = lock(&agent.segments);
    match op {
        SegmentOp::Open {
            name,
            size,
            create,
            exclusive,
        } => match segments.open(session, name, *size, *create, *exclusive) {
            Ok(seg) => {
                if seg.created {
                    log!(
                        "session {label}: segment {name:?} created in slot {} ({} bytes)",
                        seg.slot,
                        seg.size
                    );
                }
                SegmentAnswer::Segment {
                    slot: seg.slot,
                    size: seg.size,
                    created: seg.created,
                }
            }
            Err(e) => error(e),
        },
        SegmentOp::Resize { id, size } => match segments.resize(*id, *size) {
            Ok((seg, shrunk)) => {
                drop(segments);
                if let Some(s) = shrunk {
                    let offset = layout.file_offset(layout.segment_addr(seg.slot)) + s.from;
                    drop_range(agent, offset, s.to - s.from, label);
                }
                SegmentAnswer::Segment {
                    slot: seg.slot,
                    size: seg.size,
                    created: false,
                }
            }
            Err(e) => error(e),
        },
        SegmentOp::Unlink { name } => match segments.unlink(name) {
            Ok((slot, freed)) => {
                drop(segments);
                let fate = if freed.is_some() {
                    "freed"
                } else {
                    "stays while in use"
                };
                log!("session {label}: segment {name:?} unlinked (slot {slot} {fate})");
                drop_slot(agent, freed, label);
                SegmentAnswer::Ok
            }
            Err(e) => error(e),
        },
        SegmentOp::Use { id } => match segments.use_again(session, *id) {
            Ok(seg) => SegmentAnswer::Segment {
                slot: seg.slot,
                size: seg.size,
                created: false,
            },
            Err(e) => error(e),
        },
        SegmentOp::Release { id } => match segments.release(session, *id) {
            Ok(freed) => {
                drop(segments);
                drop_slot(agent, freed, label);
                SegmentAnswer::Ok
            }
            Err(e) => error(e),
        },
    }
}

/// A segment-table operation of a local session, run where the table is.
pub async fn segment_call(
    agent: &Agent,
    session: SessionId,
    rank: u32,
    op: SegmentOp,
    label: &str,
) -> SegmentAnswer {
    let Some(cluster) = agent.cluster.as_ref().filter(|c| c.mesh.node != 0) else {
        return segment_local(agent, session, &op, label);
    };
    let req = cluster.req();
    let (tx, rx) = oneshot::channel();
    lock(&cluster.segment_waiting).insert(req, tx);
    cluster.mesh.send(
        0,
        PeerMsg::Segment {
            req,
            session: session.0,
            rank,
            op,
        },
    );
    let timeout = cluster.mesh.timing.peer_timeout;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => SegmentAnswer::Error {
            code: ErrorCode::NodeFailed,
            message: "node 0, which holds the segment table, is gone".into(),
        },
        Err(_) => {
            lock(&cluster.segment_waiting).remove(&req);
            let what = format!("no answer to a segment request within {timeout:?}");
            cluster.mesh.node_failed(0, what.clone());
            SegmentAnswer::Error {
                code: ErrorCode::NodeFailed,
                message: format!("node 0, which holds the segment table: {what}"),
            }
        }
    }
}

/// Drops a freed segment slot's pages (the whole reservation: a rank may
/// have written past the size), on every node.
pub fn drop_slot(agent: &Agent, freed: Option<crate::segments::Freed>, label: &str) {
    let Some(f) = freed else { return };
    let layout = agent.id.layout;
    let offset = layout.file_offset(layout.segment_addr(f.slot));
    drop_range(agent, offset, layout.segment_reserve, label);
    log!("session {label}: segment slot {} freed", f.slot);
}

/// Drops memfd range `offset..+len` (of the shared zone) on every node.
fn drop_range(agent: &Agent, offset: u64, len: u64, label: &str) {
    let Some(cluster) = agent.cluster.as_ref() else {
        if let Err(e) = agent.memory.punch(offset, len) {
            log!("session {label}: {e}");
        }
        return;
    };
    // Whole pages only: a partial page (a shrink to an unaligned size)
    // keeps its head, as the page protocol moves whole pages.
    let layout = agent.id.layout;
    let zone = layout.file_offset(layout.shared_base());
    let first = (offset - zone).div_ceil(PAGE_SIZE);
    let end = (offset + len - zone) / PAGE_SIZE;
    if end <= first {
        return;
    }
    let msg = PeerMsg::DropPages {
        first,
        count: end - first,
    };
    cluster.mesh.broadcast(&msg);
    cluster.pages.drop_pages(first, end - first);
}

/// Checks what a message names against this job: pages inside the shared
/// zone, nodes that exist, sync operations sent to their manager. A peer
/// that gets these wrong is broken; its message must not touch the tables.
fn check(agent: &Agent, msg: &PeerMsg) -> Result<(), String> {
    let layout = agent.id.layout;
    let pages = layout.shared_size() / PAGE_SIZE;
    let nodes = agent.id.nodes;
    let node_ok = |n: u32| {
        if n < nodes {
            Ok(())
        } else {
            Err(format!("node {n} does not exist ({nodes} nodes)"))
        }
    };
    let page_ok = |p: u64, extra: u64| {
        if p.checked_add(extra).is_some_and(|end| end < pages) {
            Ok(())
        } else {
            Err(format!(
                "page {p} (+{extra}) is outside the shared zone ({pages} pages)"
            ))
        }
    };
    match msg {
        PeerMsg::PageRequest { page, from, .. } => {
            page_ok(*page, 0)?;
            node_ok(*from)
        }
        PeerMsg::PageGrant { page, extra, .. } => page_ok(*page, extra.len() as u64),
        PeerMsg::Invalidate {
            page, new_owner, ..
        } => {
            page_ok(*page, 0)?;
            node_ok(*new_owner)
        }
        PeerMsg::InvalidateAck { page, .. } | PeerMsg::DiffAck { page, .. } => page_ok(*page, 0),
        PeerMsg::PageDiff { page, from, .. } => {
            page_ok(*page, 0)?;
            node_ok(*from)
        }
        PeerMsg::DropPages { first, count } => {
            if *count == 0 {
                return Ok(());
            }
            page_ok(*first, count - 1)
        }
        PeerMsg::OwnerHints { runs } => runs
            .iter()
            .try_for_each(|&(first, count)| page_ok(first, u64::from(count.max(1)) - 1)),
        PeerMsg::Sync { op, .. } => {
            let manager = manager(op, nodes);
            if manager == agent.id.node {
                Ok(())
            } else {
                Err(format!("node {manager} manages it, not this node"))
            }
        }
        _ => Ok(()),
    }
}

/// Handles a message of node `from` (or of this node, through loopback).
pub fn dispatch(agent: &Arc<Agent>, from: u32, msg: PeerMsg) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    let mesh: &Mesh = &cluster.mesh;
    let pages = &cluster.pages;
    if let Err(why) = check(agent, &msg) {
        log!("node {from} sent {}: {why}; ignored", msg.name());
        return;
    }
    match msg {
        PeerMsg::PageRequest {
            page,
            from: requester,
            req,
            write,
            has_copy,
            hops,
            prefetch,
            contract,
            copy_date,
            date,
        } => {
            pages.observe(date);
            pages.on_request(
                page,
                crate::pages::Request {
                    from: requester,
                    req,
                    write,
                    has_copy,
                    hops,
                    prefetch,
                    contract,
                    copy_date,
                    date,
                },
            )
        }
        PeerMsg::PageGrant {
            page,
            req,
            write,
            epoch,
            copyset,
            data,
            extra,
            date,
            twin,
        } => pages.on_grant(
            from, page, req, write, epoch, copyset, data, extra, date, twin,
        ),
        PeerMsg::PageDiff {
            page,
            from: writer,
            req,
            date,
            hops,
            delta,
        } => pages.on_diff(page, writer, req, date, hops, delta),
        PeerMsg::DiffAck { page, req, date } => pages.on_diff_ack(from, page, req, date),
        PeerMsg::Invalidate {
            page,
            epoch,
            new_owner,
        } => pages.on_invalidate(from, page, epoch, new_owner),
        PeerMsg::InvalidateAck { page, epoch } => pages.on_invalidate_ack(from, page, epoch),
        PeerMsg::DropPages { first, count } => pages.drop_pages(first, count),
        PeerMsg::Sync {
            req,
            session,
            rank,
            seq,
            op,
            date,
        } => {
            pages.observe(date);
            let caller = Caller {
                session: remote_session(from, session),
                rank,
                seq,
            };
            cluster.remote_rank(agent, caller.session, rank, true);
            let done = move |answer: SyncAnswer, pages: &PageEngine| {
                // The answer is dated after the barrier's date (which is
                // after every arrival).
                if let SyncAnswer::BarrierDone { date } = answer {
                    pages.observe(date);
                }
                PeerMsg::SyncDone {
                    req,
                    answer,
                    date: pages.tick(),
                }
            };
            match sync_local(agent, caller, op, date) {
                Pending::Now(answer) => mesh.send(from, done(answer, pages)),
                pending => {
                    let mesh = cluster.mesh.clone();
                    let pages = cluster.pages.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = pending.wait().await {
                            mesh.send(from, done(answer, &pages));
                        }
                    });
                }
            }
        }
        PeerMsg::SyncDone { req, answer, date } => {
            pages.observe(date);
            let waiting = lock(&cluster.sync_waiting).remove(&req);
            match waiting {
                // A dropped receiver: the session ended while waiting; its
                // SessionEnded releases what the grant gave it.
                Some(tx) => {
                    let _ = tx.send(answer);
                }
                None => log!("SyncDone {req} from node {from} matches no request: ignored"),
            }
        }
        PeerMsg::Segment {
            req,
            session,
            rank,
            op,
        } => {
            let answer = if mesh.node == 0 {
                let label = format!("node {from} session {session}");
                let id = remote_session(from, session);
                cluster.remote_rank(agent, id, rank, false);
                segment_local(agent, id, &op, &label)
            } else {
                SegmentAnswer::Error {
                    code: ErrorCode::Invalid,
                    message: format!("node {} does not hold the segment table", mesh.node),
                }
            };
            mesh.send(from, PeerMsg::SegmentDone { req, answer });
        }
        PeerMsg::SegmentDone { req, answer } => match lock(&cluster.segment_waiting).remove(&req) {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => log!("SegmentDone {req} from node {from} matches no request: ignored"),
        },
        PeerMsg::SessionEnded { session } => {
            let id = remote_session(from, session);
            lock(&cluster.remote_ranks).remove(&id);
            lock(&agent.sync).session_ended(id);
            if mesh.node == 0 {
                let freed = lock(&agent.segments).session_ended(id);
                for f in freed {
                    drop_slot(agent, Some(f), &format!("node {from} session {session}"));
                }
            }
        }
        PeerMsg::OwnerHints { runs } => {
            for (first, count) in runs {
                pages.restore_owner_hint(from, first, u64::from(count));
            }
        }
        PeerMsg::HintsDone => mesh.hints_done(from),
        PeerMsg::StoreChunk {
            source,
            stamp,
            index,
            offset,
            total,
            data,
        } => crate::replicate::receive(agent, from, source, stamp, index, offset, total, &data),
        PeerMsg::ParityInfo {
            source,
            stamp,
            pages_len,
            index_len,
        } => {
            if source == from {
                crate::parity::info(agent, source, stamp, pages_len, index_len);
            }
        }
        PeerMsg::ParityChunk {
            source,
            stamp,
            chunk,
            offset,
            total,
            data,
        } => {
            if source == from {
                crate::parity::chunk(agent, source, stamp, chunk, offset, total, &data);
            }
        }
        PeerMsg::RemoteFree { seq, addrs } => {
            crate::shmalloc::on_remote_free(agent, from, seq, &addrs)
        }
        PeerMsg::RemoteFreeAck { seq } => crate::shmalloc::on_ack(agent, from, seq),
        PeerMsg::StoreHeld {
            source,
            stamp,
            error,
        } => {
            if source == mesh.node {
                crate::replicate::held(agent, from, stamp, error);
            } else {
                log!("node {from} says it holds node {source}'s stamp {stamp}: not this node's; ignored");
            }
        }
        other => log!(
            "node {from} sent {} after the handshake: ignored",
            other.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_sessions_do_not_collide() {
        assert_ne!(remote_session(0, 5), remote_session(1, 5));
        assert_ne!(remote_session(0, 5), SessionId(5));
        let spread: std::collections::BTreeSet<u32> =
            (0..64u64).map(|id| manager_of(id, 4)).collect();
        assert_eq!(spread.len(), 4);
    }
}
