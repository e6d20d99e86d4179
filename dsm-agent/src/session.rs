//! One connection of a rank (a session): the Hello handshake, then its
//! requests, each answered by exactly one reply, in order.
//!
//! A rank opens two sessions, `Memory` (heaps, segments, userfaultfds) and
//! `Sync` (barriers and locks, which wait for other ranks). What a session
//! acquires (heaps, locks, a place in a barrier, fault tasks) is released
//! when it ends, whatever the rank number: a rank that execs itself connects
//! again with the same rank and pid while its old sessions may still be open.
//!
//! Sync requests carry the rank's sequence number: one the rank was already
//! served (a restored rank sending again the call it was blocked in at the
//! checkpoint) is answered from the sync table's record, not run again.
//!
//! A restoring rank (`Hello{restoring: true}`, agent in restore mode) takes
//! over what its rank had at the checkpoint: its memory session the heaps
//! and segment uses, its sync session the locks (see `tables`).
//!
//! A peer that breaks the protocol (malformed, oversized or truncated frame,
//! request on the wrong channel, descriptors where none belong) loses its
//! connection, and only that: nothing a peer sends may stop the agent.

use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use mome_protocol::ckpt::AgentEvent;
use mome_protocol::frame::{self, FrameError};
use mome_protocol::layout::{Zone, HEAP_SIZE, PAGE_SIZE};
use mome_protocol::rank::{AgentReply, Channel, ErrorCode, RankRequest, SHMALLOC_AREA};
use mome_protocol::PROTOCOL_VERSION;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::agent::{lock, Agent, SessionId};
use crate::cluster;
use crate::faults::{self, Alias, AliasTable, FaultContext, FaultCounters};
use crate::restore::FaultServer;
use crate::sync::Caller;
use crate::tables::placeholder;
use crate::wire::{Wire, WireError};
use mome_protocol::peer::{Model, SegmentAnswer, SegmentOp, SyncAnswer, SyncOp};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("malformed request: {0}")]
    Malformed(FrameError),
    #[error("{0} request on the {1:?} channel")]
    WrongChannel(&'static str, Channel),
    #[error("{request} came with {count} file descriptors instead of 1")]
    Fds { request: &'static str, count: usize },
    #[error("{request} request came with {count} unexpected file descriptor(s)")]
    UnexpectedFds { request: &'static str, count: usize },
    #[error("Hello again on an established connection")]
    SecondHello,
}

/// A reply, owning its error message until it is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ok,
    Heaps { first: u32, count: u32 },
    Segment { id: u32, addr: u64, size: u64 },
    BarrierDone { date: u64 },
    KeyedBarrierDone { serial: bool },
    Resume { stamp: u64 },
    Image { addr: u64, len: u64 },
    Error { code: ErrorCode, message: String },
    Frees { addrs: Vec<u8> },
}

impl From<SyncAnswer> for Reply {
    fn from(a: SyncAnswer) -> Reply {
        match a {
            SyncAnswer::Ok => Reply::Ok,
            SyncAnswer::BarrierDone { date } => Reply::BarrierDone { date },
            SyncAnswer::KeyedBarrierDone { serial } => Reply::KeyedBarrierDone { serial },
            SyncAnswer::Busy => Reply::error(ErrorCode::Busy, "busy"),
            SyncAnswer::Error(message) => Reply::Error {
                code: ErrorCode::Invalid,
                message,
            },
        }
    }
}

impl Reply {
    fn error(code: ErrorCode, message: impl std::fmt::Display) -> Reply {
        Reply::Error {
            code,
            message: message.to_string(),
        }
    }

    fn wire(&self) -> AgentReply<'_> {
        match self {
            Reply::Ok => AgentReply::Ok,
            Reply::Heaps { first, count } => AgentReply::Heaps {
                first: *first,
                count: *count,
            },
            Reply::Segment { id, addr, size } => AgentReply::Segment {
                id: *id,
                addr: *addr,
                size: *size,
            },
            Reply::BarrierDone { date } => AgentReply::BarrierDone { date: *date },
            Reply::KeyedBarrierDone { serial } => AgentReply::KeyedBarrierDone { serial: *serial },
            Reply::Resume { stamp } => AgentReply::Resume { stamp: *stamp },
            Reply::Image { addr, len } => AgentReply::Image {
                addr: *addr,
                len: *len,
            },
            Reply::Error { code, message } => AgentReply::Error {
                code: *code,
                message,
            },
            Reply::Frees { addrs } => AgentReply::Frees { addrs },
        }
    }
}

/// Outcome of waiting for other ranks.
enum Waited<T> {
    Done(T),
    /// The peer closed its connection meanwhile.
    PeerGone,
}

/// Serves one accepted connection until it ends.
pub async fn serve(agent: Arc<Agent>, stream: UnixStream) {
    agent.connections.fetch_add(1, Ordering::Relaxed);
    let (uid, peer_pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid().unwrap_or(0)),
        Err(e) => {
            log!("connection without peer credentials ({e}); closing");
            return;
        }
    };
    if uid != agent.id.uid {
        log!(
            "connection from pid {peer_pid} of uid {uid} refused: only uid {} may connect; closing",
            agent.id.uid
        );
        return;
    }
    let mut wire = Wire::new(stream);
    let Some(mut session) = handshake(&agent, &mut wire, peer_pid).await else {
        return;
    };
    log!(
        "session {} connected ({:?} channel)",
        session.label,
        session.channel
    );
    let ending = match session.run(&mut wire).await {
        Ok(()) => "",
        Err(e) => {
            log!("session {}: {e}; closing", session.label);
            " after an error"
        }
    };
    drop(wire);
    session.end(ending);
}

/// Reads and checks Hello, answers Welcome (with the memfd on the memory
/// channel) or a refusal. `None`: the connection is to be closed.
async fn handshake(agent: &Arc<Agent>, wire: &mut Wire, peer_pid: i32) -> Option<Session> {
    let frame = match wire.recv().await {
        Ok(Some(frame)) => frame,
        Ok(None) => {
            log!("connection from pid {peer_pid} closed before Hello");
            return None;
        }
        Err(e) => {
            log!("connection from pid {peer_pid}: {e}; closing");
            return None;
        }
    };
    if !frame.fds.is_empty() {
        log!("connection from pid {peer_pid}: file descriptors attached to Hello; closing");
        return None;
    }
    let (rank, pid, channel, restoring) = match frame::decode::<RankRequest>(&frame.body) {
        Ok(RankRequest::Hello {
            protocol,
            rank,
            pid,
            channel,
            jobid,
            restoring,
        }) => match check_hello(agent, protocol, rank, jobid, restoring) {
            Ok(()) => (rank, pid, channel, restoring),
            Err(why) => {
                refuse(wire, peer_pid, &why).await;
                return None;
            }
        },
        Ok(other) => {
            let why = format!(
                "the first message must be Hello, not {}",
                request_name(&other)
            );
            refuse(wire, peer_pid, &why).await;
            return None;
        }
        Err(e) => {
            log!("connection from pid {peer_pid}: malformed Hello: {e}; closing");
            return None;
        }
    };
    let id = &agent.id;
    let welcome = AgentReply::Welcome {
        layout: id.layout,
        node: id.node,
        nodes: id.nodes,
        nranks: id.nranks,
    };
    let fd = (channel == Channel::Memory).then(|| agent.memory.as_fd());
    let label = format!("rank {rank} pid {pid}");
    if let Err(e) = wire.send(&welcome, fd).await {
        log!("session {label}: cannot send Welcome: {e}; closing");
        return None;
    }
    let id = agent.new_session_id();
    agent.ckpt.session_started(id, rank, channel, peer_pid);
    if restoring {
        take_over(agent, rank, channel, id, &label);
    } else if channel == Channel::Sync {
        // A new process of the rank numbers its sync requests from 1.
        lock(&agent.sync).reset_rank(rank);
    }
    Some(Session {
        agent: agent.clone(),
        id,
        channel,
        label,
        private_uffds: Vec::new(),
        fault_tasks: Vec::new(),
        aliases: Arc::new(Mutex::new(AliasTable::default())),
        faults: Arc::new(FaultCounters::default()),
        rank,
        restoring,
        restored: false,
        restore_server: None,
    })
}

/// A restored rank's new session takes over what its placeholder holds:
/// heaps and segment uses (memory channel), locks (sync channel).
fn take_over(agent: &Agent, rank: u32, channel: Channel, id: SessionId, label: &str) {
    let from = placeholder(rank);
    match channel {
        Channel::Memory => {
            let heaps = lock(&agent.heaps).reassign(from, id);
            let segments = lock(&agent.segments).reassign(from, id);
            log!("session {label}: restored rank takes back {heaps} heaps and {segments} segment uses");
        }
        Channel::Sync => {
            let locks = lock(&agent.sync).reassign(from, id);
            log!("session {label}: restored rank takes back {locks} locks");
        }
    }
}

fn check_hello(
    agent: &Agent,
    protocol: u32,
    rank: u32,
    jobid: &str,
    restoring: bool,
) -> Result<(), String> {
    let id = &agent.id;
    if restoring && agent.restore.is_none() {
        return Err(format!(
            "rank {rank} is being restored, but this agent was not started with --restore"
        ));
    }
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {protocol}, but this agent speaks version {PROTOCOL_VERSION}"
        ));
    }
    if jobid != id.job_id {
        return Err(format!(
            "job {jobid:?}, but this agent serves job {}",
            id.job_id
        ));
    }
    if !id.local_ranks.contains(&rank) {
        let mut list = String::new();
        for r in &id.local_ranks {
            let sep = if list.is_empty() { "" } else { "," };
            let _ = write!(list, "{sep}{r}");
        }
        return Err(format!(
            "rank {rank} does not run on node {} (its ranks are {list})",
            id.node
        ));
    }
    Ok(())
}

async fn refuse(wire: &mut Wire, peer_pid: i32, why: &str) {
    log!("connection from pid {peer_pid} refused: {why}");
    let reply = AgentReply::Error {
        code: ErrorCode::Refused,
        message: why,
    };
    // The connection closes right after; a failed send changes nothing.
    let _ = wire.send(&reply, None).await;
}

fn request_name(req: &RankRequest<'_>) -> &'static str {
    match req {
        RankRequest::Hello { .. } => "Hello",
        RankRequest::RegisterUffd { .. } => "RegisterUffd",
        RankRequest::AllocHeaps { .. } => "AllocHeaps",
        RankRequest::FreeHeaps { .. } => "FreeHeaps",
        RankRequest::SegmentOpen { .. } => "SegmentOpen",
        RankRequest::SegmentResize { .. } => "SegmentResize",
        RankRequest::SegmentUnlink { .. } => "SegmentUnlink",
        RankRequest::SegmentRelease { .. } => "SegmentRelease",
        RankRequest::SegmentUse { .. } => "SegmentUse",
        RankRequest::AliasMapped { .. } => "AliasMapped",
        RankRequest::RegisterPagemap => "RegisterPagemap",
        RankRequest::CkptParked { .. } => "CkptParked",
        RankRequest::CkptRefused { .. } => "CkptRefused",
        RankRequest::RestoreImage => "RestoreImage",
        RankRequest::Restored => "Restored",
        RankRequest::Barrier { .. } => "Barrier",
        RankRequest::Lock { .. } => "Lock",
        RankRequest::Unlock { .. } => "Unlock",
        RankRequest::TryLock { .. } => "TryLock",
        RankRequest::KeyedBarrier { .. } => "KeyedBarrier",
        RankRequest::Consistency { .. } => "Consistency",
        RankRequest::SyncMem { .. } => "SyncMem",
        RankRequest::ShmallocFree { .. } => "ShmallocFree",
        RankRequest::ShmallocTake { .. } => "ShmallocTake",
    }
}

/// The segment-table operation a request stands for, if it is one.
fn segment_op(req: &RankRequest<'_>) -> Option<SegmentOp> {
    Some(match *req {
        RankRequest::SegmentOpen {
            name,
            size,
            create,
            exclusive,
        } => SegmentOp::Open {
            name: name.to_string(),
            size,
            create,
            exclusive,
        },
        RankRequest::SegmentResize { id, size } => SegmentOp::Resize { id, size },
        RankRequest::SegmentUnlink { name } => SegmentOp::Unlink {
            name: name.to_string(),
        },
        RankRequest::SegmentRelease { id } => SegmentOp::Release { id },
        RankRequest::SegmentUse { id } => SegmentOp::Use { id },
        _ => return None,
    })
}

/// The channel a request belongs on (None: Hello, which belongs on neither
/// once the connection is established).
fn channel_of(req: &RankRequest<'_>) -> Option<Channel> {
    match req {
        RankRequest::Hello { .. } => None,
        RankRequest::Barrier { .. }
        | RankRequest::Lock { .. }
        | RankRequest::Unlock { .. }
        | RankRequest::TryLock { .. }
        | RankRequest::KeyedBarrier { .. }
        | RankRequest::Consistency { .. }
        | RankRequest::SyncMem { .. } => Some(Channel::Sync),
        _ => Some(Channel::Memory),
    }
}

struct Session {
    agent: Arc<Agent>,
    id: SessionId,
    rank: u32,
    channel: Channel,
    /// `rank R pid P`, as the log names the session.
    label: String,
    /// Private-zone userfaultfds, kept for dirty tracking (async
    /// write-protect: the kernel resolves their faults itself).
    private_uffds: Vec<OwnedFd>,
    fault_tasks: Vec<JoinHandle<()>>,
    aliases: Arc<Mutex<AliasTable>>,
    faults: Arc<FaultCounters>,
    /// The rank said it is being restored.
    restoring: bool,
    /// ... and it said `Restored`: what it holds is its own from now on.
    restored: bool,
    /// Serves the missing pages of a restoring rank's window.
    restore_server: Option<FaultServer>,
}

impl Session {
    /// Serves requests until the peer closes (`Ok`) or breaks the protocol.
    async fn run(&mut self, wire: &mut Wire) -> Result<(), SessionError> {
        loop {
            let Some(frame) = wire.recv().await? else {
                return Ok(());
            };
            let req: RankRequest = frame::decode(&frame.body).map_err(SessionError::Malformed)?;
            let name = request_name(&req);
            match channel_of(&req) {
                None => return Err(SessionError::SecondHello),
                Some(c) if c != self.channel => {
                    return Err(SessionError::WrongChannel(name, self.channel))
                }
                Some(_) => {}
            }
            let mut fds = frame.fds;
            let reply = match req {
                RankRequest::RegisterUffd { .. } | RankRequest::RegisterPagemap
                    if fds.len() != 1 =>
                {
                    return Err(SessionError::Fds {
                        request: name,
                        count: fds.len(),
                    })
                }
                RankRequest::RegisterUffd { zone } => self.register_uffd(zone, fds.remove(0)),
                RankRequest::RegisterPagemap => self.register_pagemap(fds.remove(0)),
                _ if !fds.is_empty() => {
                    return Err(SessionError::UnexpectedFds {
                        request: name,
                        count: fds.len(),
                    })
                }
                RankRequest::Barrier { seq } => {
                    match self.sync_request(wire, SyncOp::Barrier, seq).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
                RankRequest::Lock { id, seq } => {
                    match self.sync_request(wire, SyncOp::Lock { id }, seq).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
                RankRequest::TryLock { id, seq } => {
                    match self.sync_request(wire, SyncOp::TryLock { id }, seq).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
                RankRequest::Unlock { id, seq } => {
                    match self.sync_request(wire, SyncOp::Unlock { id }, seq).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
                RankRequest::KeyedBarrier { id, count, seq } => {
                    let op = SyncOp::KeyedBarrier { id, count };
                    match self.sync_request(wire, op, seq).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
                RankRequest::Consistency {
                    addr, len, model, ..
                } => match wait(wire, self.consistency(addr, len, model)).await? {
                    Waited::Done(reply) => reply,
                    Waited::PeerGone => return Ok(()),
                },
                RankRequest::SyncMem {
                    addr, len, date, ..
                } => match wait(wire, self.sync_mem(addr, len, date)).await? {
                    Waited::Done(reply) => reply,
                    Waited::PeerGone => return Ok(()),
                },
                ref req if segment_op(req).is_some() => {
                    let op = segment_op(req).expect("checked");
                    let shmalloc_area =
                        matches!(&op, SegmentOp::Open { name, .. } if name == SHMALLOC_AREA);
                    let answer =
                        cluster::segment_call(&self.agent, self.id, self.rank, op, &self.label)
                            .await;
                    if let (true, SegmentAnswer::Segment { slot, .. }) = (shmalloc_area, &answer) {
                        self.keep_strong(*slot);
                    }
                    self.segment_reply(answer)
                }
                RankRequest::CkptParked {
                    entered_ns,
                    image_addr,
                    image_len,
                } => {
                    let parked = self
                        .agent
                        .ckpt
                        .park(self.rank, entered_ns, image_addr, image_len);
                    match parked {
                        None => Reply::Resume { stamp: 0 },
                        Some(rx) => match wait(wire, async { rx.await.ok() }).await? {
                            Waited::Done(stamp) => Reply::Resume {
                                stamp: stamp.unwrap_or(0),
                            },
                            Waited::PeerGone => return Ok(()),
                        },
                    }
                }
                RankRequest::CkptRefused { reason } => {
                    log!("session {}: checkpoint refused: {reason}", self.label);
                    self.agent.ckpt.refuse(self.rank, reason);
                    Reply::Resume { stamp: 0 }
                }
                RankRequest::RestoreImage => {
                    match self
                        .agent
                        .restore
                        .as_ref()
                        .and_then(|r| r.image_of(self.rank))
                    {
                        Some(image) => Reply::Image {
                            addr: image.addr,
                            len: image.len,
                        },
                        None => Reply::error(
                            ErrorCode::NotFound,
                            format!(
                                "no private image of rank {} in the restored checkpoint",
                                self.rank
                            ),
                        ),
                    }
                }
                RankRequest::Restored => {
                    self.restored = true;
                    let since_start_us = self.agent.started.elapsed().as_micros() as u64;
                    log!(
                        "session {}: rank restored, {} ms after the agent started",
                        self.label,
                        since_start_us / 1000
                    );
                    self.agent.events.send(AgentEvent::RankRestored {
                        rank: self.rank,
                        since_start_us,
                    });
                    Reply::Ok
                }
                req => self.memory_request(req),
            };
            wire.send(&reply.wire(), None).await?;
        }
    }

    fn caller(&self, seq: u64) -> Caller {
        Caller {
            session: self.id,
            rank: self.rank,
            seq,
        }
    }

    /// A barrier or lock operation, sent to the node that manages it;
    /// `None` when the peer left while waiting.
    async fn sync_request(
        &self,
        wire: &mut Wire,
        op: SyncOp,
        seq: u64,
    ) -> Result<Option<Reply>, SessionError> {
        // Release consistency: this node's changes are merged before the
        // operation can tell anyone it happened.
        if cluster::releases(&op) {
            match wait(wire, cluster::release(&self.agent)).await? {
                Waited::Done(Ok(())) => {}
                Waited::Done(Err(e)) => return Ok(Some(Reply::error(ErrorCode::NodeFailed, e))),
                Waited::PeerGone => return Ok(None),
            }
        }
        // Replay of a restored rank's request: see `cluster::sync_local`.
        let pending = cluster::sync_call(&self.agent, self.caller(seq), op);
        let answer = match wait(wire, pending.wait()).await? {
            Waited::Done(Some(answer)) => answer,
            Waited::Done(None) => {
                return Ok(Some(Reply::error(
                    ErrorCode::NodeFailed,
                    "abandoned: the node managing it is gone",
                )))
            }
            Waited::PeerGone => return Ok(None),
        };
        // ... and copies older than the acquire are dropped before the
        // rank goes on.
        if cluster::acquires(&op, &answer) {
            let what = cluster::Acquire {
                date: cluster::acquire_date(&self.agent, &answer),
                range: None,
                release_model_only: true,
            };
            match wait(wire, cluster::acquire(&self.agent, what)).await? {
                Waited::Done(Ok(_)) => {}
                Waited::Done(Err(e)) => return Ok(Some(Reply::error(ErrorCode::NodeFailed, e))),
                Waited::PeerGone => return Ok(None),
            }
        }
        Ok(Some(answer.into()))
    }

    /// Shared-zone pages of window range `addr..addr+len`; `Ok(None)` for a
    /// range of the private zone (memory of this node only, where every
    /// model holds at once).
    fn shared_pages(&self, addr: u64, len: u64) -> Result<Option<std::ops::Range<u64>>, Reply> {
        let layout = self.agent.id.layout;
        if len == 0 || !layout.contains_range(addr, len) {
            return Err(Reply::error(
                ErrorCode::Invalid,
                format!("range {addr:#x}+{len:#x} is not inside the DSM window"),
            ));
        }
        if addr + len <= layout.shared_base() {
            return Ok(None);
        }
        if addr < layout.shared_base() {
            return Err(Reply::error(
                ErrorCode::Invalid,
                format!("range {addr:#x}+{len:#x} spans the private and the shared zone"),
            ));
        }
        let first = (addr - layout.shared_base()) / PAGE_SIZE;
        let end = (addr + len - layout.shared_base()).div_ceil(PAGE_SIZE);
        Ok(Some(first..end))
    }

    /// MomeConsistency: the range uses `model` on this node from now on.
    async fn consistency(&self, addr: u64, len: u64, model: Model) -> Reply {
        let range = match self.shared_pages(addr, len) {
            Ok(Some(r)) => r,
            Ok(None) => return Reply::Ok,
            Err(reply) => return reply,
        };
        let Some(cluster) = self.agent.cluster.as_ref() else {
            // One node: every rank maps the same pages, every model holds.
            return Reply::Ok;
        };
        log!(
            "{}: pages {}..{} of the shared zone are {model:?} on this node",
            self.label,
            range.start,
            range.end
        );
        for part in cluster.pages.set_model(range, model) {
            // Relaxed copies of pages now strong go: their owner would not
            // keep them current.
            let what = cluster::Acquire {
                date: u64::MAX,
                range: Some(part),
                release_model_only: false,
            };
            if let Err(e) = cluster::acquire(&self.agent, what).await {
                return Reply::error(ErrorCode::NodeFailed, e);
            }
        }
        Reply::Ok
    }

    /// MomeSyncMem: the range reflects every write released before `date`.
    async fn sync_mem(&self, addr: u64, len: u64, date: u64) -> Reply {
        let range = match self.shared_pages(addr, len) {
            Ok(Some(r)) => r,
            Ok(None) => return Reply::Ok,
            Err(reply) => return reply,
        };
        let what = cluster::Acquire {
            date,
            range: Some(range),
            release_model_only: false,
        };
        match cluster::acquire(&self.agent, what).await {
            Ok(_) => Reply::Ok,
            Err(e) => Reply::error(ErrorCode::NodeFailed, e),
        }
    }

    /// The shared malloc area stays under strong consistency whatever the
    /// node's default model: its allocator state, lock words and heap owner
    /// table are read and written by every rank without synchronisation
    /// the relaxed models would need.
    fn keep_strong(&self, slot: u32) {
        let Some(cluster) = self.agent.cluster.as_ref() else {
            return;
        };
        let layout = self.agent.id.layout;
        let first = (layout.segment_addr(slot) - layout.shared_base()) / PAGE_SIZE;
        let count = layout.segment_reserve / PAGE_SIZE;
        // Opened before any block of it is used on this node: no relaxed
        // copy of it can be held yet.
        cluster.pages.set_model(first..first + count, Model::Strong);
    }

    fn segment_reply(&self, answer: SegmentAnswer) -> Reply {
        let layout = self.agent.id.layout;
        match answer {
            SegmentAnswer::Segment { slot, size, .. } => Reply::Segment {
                id: slot,
                addr: layout.segment_addr(slot),
                size,
            },
            SegmentAnswer::Ok => Reply::Ok,
            SegmentAnswer::Error { code, message } => Reply::Error { code, message },
        }
    }

    /// Keeps the rank's `/proc/<pid>/pagemap` for dirty scans.
    fn register_pagemap(&mut self, fd: OwnedFd) -> Reply {
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        match std::fs::read_link(&fd_path) {
            Ok(target) if target.to_string_lossy().ends_with("/pagemap") => {
                self.agent.ckpt.set_pagemap(self.rank, self.id, fd);
                Reply::Ok
            }
            Ok(target) => Reply::error(
                ErrorCode::Invalid,
                format!("RegisterPagemap: {} is not a pagemap", target.display()),
            ),
            Err(e) => Reply::error(ErrorCode::Invalid, format!("RegisterPagemap: {e}")),
        }
    }

    /// Requests of the memory channel, all answered at once.
    fn memory_request(&mut self, req: RankRequest<'_>) -> Reply {
        let agent = &*self.agent;
        let layout = agent.id.layout;
        match req {
            RankRequest::AllocHeaps { count } => match lock(&agent.heaps).alloc(self.id, count) {
                Ok(first) => Reply::Heaps { first, count },
                Err(e) => Reply::error(e.code(), e),
            },
            RankRequest::FreeHeaps { first, count } => {
                let mut heaps = lock(&agent.heaps);
                if let Err(e) = heaps.check_owned(self.id, first, count) {
                    return Reply::error(e.code(), e);
                }
                // Pages go before the heaps are marked free, so the next
                // owner of these heaps finds them zeroed.
                let offset = layout.file_offset(layout.heap_addr(first));
                match agent.memory.punch(offset, count as u64 * HEAP_SIZE) {
                    Ok(()) => {
                        heaps.release(first, count);
                        Reply::Ok
                    }
                    Err(e) => {
                        log!(
                            "session {}: {e}; heaps {first}+{count} stay allocated",
                            self.label
                        );
                        Reply::error(ErrorCode::Invalid, e)
                    }
                }
            }
            RankRequest::AliasMapped {
                addr,
                len,
                window_addr,
            } => {
                let aligned = (addr | len | window_addr) % PAGE_SIZE == 0;
                if len == 0
                    || !aligned
                    || addr.checked_add(len).is_none()
                    || !layout.contains_range(window_addr, len)
                {
                    return Reply::error(
                        ErrorCode::Invalid,
                        format!(
                            "alias {addr:#x}+{len:#x} of {window_addr:#x} is empty, unaligned or not inside the window"
                        ),
                    );
                }
                lock(&self.aliases).insert(Alias {
                    addr,
                    len,
                    window_addr,
                });
                if let Some(c) = self.agent.cluster.as_ref() {
                    c.pages.alias_added(self.id, window_addr, len);
                }
                lock(&self.agent.alias_pages).insert(
                    (self.id, addr),
                    ((window_addr - layout.base) / PAGE_SIZE, len / PAGE_SIZE),
                );
                Reply::Ok
            }
            RankRequest::ShmallocFree { frees } => {
                match crate::shmalloc::free_remote(agent, frees) {
                    Ok(()) => Reply::Ok,
                    Err(e) => {
                        log!("session {}: remote free refused: {e}", self.label);
                        Reply::error(e.code(), e)
                    }
                }
            }
            RankRequest::ShmallocTake { max } => Reply::Frees {
                addrs: crate::shmalloc::take_bytes(agent, max),
            },
            // The caller routes the other requests elsewhere.
            other => Reply::error(
                ErrorCode::Invalid,
                format!("{} is not a memory request", request_name(&other)),
            ),
        }
    }

    fn register_uffd(&mut self, zone: Zone, fd: OwnedFd) -> Reply {
        match zone {
            Zone::Private if self.restoring && self.restore_server.is_none() => {
                self.serve_restore(fd)
            }
            Zone::Private => {
                match faults::check_userfaultfd(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
                    Ok(()) => {
                        self.private_uffds.push(fd);
                        Reply::Ok
                    }
                    Err(e) => Reply::error(ErrorCode::Invalid, e),
                }
            }
            Zone::Shared => {
                let pages = match self.agent.cluster.as_ref() {
                    Some(c) => {
                        // The page protocol keeps its own descriptor of the
                        // userfaultfd to install, protect and wake pages.
                        let dup = match fd.try_clone() {
                            Ok(d) => d,
                            Err(e) => {
                                return Reply::error(
                                    ErrorCode::Invalid,
                                    format!("cannot keep the shared-zone userfaultfd: {e}"),
                                )
                            }
                        };
                        if let Err(e) = faults::check_userfaultfd(dup.as_raw_fd()) {
                            return Reply::error(ErrorCode::Invalid, e);
                        }
                        // SAFETY: `dup` is a userfaultfd (checked above) that
                        // we own and hand over.
                        let uffd = unsafe { mome_uffd::Uffd::from_raw_fd(dup.into_raw_fd()) };
                        c.pages.add_rank(self.id, uffd, self.aliases.clone());
                        Some((c.pages.clone(), self.id))
                    }
                    None => None,
                };
                let ctx = FaultContext {
                    label: self.label.clone(),
                    layout: self.agent.id.layout,
                    aliases: self.aliases.clone(),
                    session: self.faults.clone(),
                    total: self.agent.faults.clone(),
                    pages,
                };
                match faults::spawn(fd, ctx) {
                    Ok(task) => {
                        self.fault_tasks.push(task);
                        Reply::Ok
                    }
                    Err(e) => {
                        log!(
                            "session {}: shared-zone userfaultfd refused: {e}",
                            self.label
                        );
                        Reply::error(ErrorCode::Invalid, e)
                    }
                }
            }
        }
    }

    /// A restoring rank's window userfaultfd (MISSING | WP): its faults
    /// are served from the restored checkpoint. A duplicate is kept with
    /// the other private userfaultfds for as long as the session lives.
    /// Registers MISSING | WP on the heaps and segment slots in use (what a
    /// restored checkpoint can hold data in) on a restoring rank's window
    /// userfaultfd. UFFDIO_REGISTER acts on the userfaultfd's own process.
    fn register_restored_ranges(&self, fd: &OwnedFd) -> Result<(), String> {
        let layout = self.agent.id.layout;
        let mut ranges: Vec<(u64, u64)> = lock(&self.agent.heaps)
            .used_runs()
            .iter()
            .map(|r| {
                (
                    layout.heap_addr(r.start),
                    u64::from(r.end - r.start) * HEAP_SIZE,
                )
            })
            .collect();
        // Several nodes: segments are in the shared zone, back in the node's
        // memory before any rank started (`cluster::restore_shared`).
        if self.agent.cluster.is_none() {
            for (slot, _) in lock(&self.agent.segments).taken_slot_sizes() {
                ranges.push((layout.segment_addr(slot), layout.segment_reserve));
            }
        }
        // SAFETY: the descriptor stays owned by `fd`; ManuallyDrop keeps this
        // borrowed view from closing it.
        let uffd = std::mem::ManuallyDrop::new(unsafe {
            mome_uffd::Uffd::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(fd))
        });
        for (start, len) in &ranges {
            uffd.register(*start, *len, mome_uffd::mode::MISSING | mome_uffd::mode::WP)
                .map_err(|e| {
                    format!("cannot register the restored range {start:#x}+{len:#x}: {e}")
                })?;
        }
        log!(
            "session {}: {} restored ranges served by the agent",
            self.label,
            ranges.len()
        );
        Ok(())
    }

    fn serve_restore(&mut self, fd: OwnedFd) -> Reply {
        let Some(restore) = self.agent.restore.clone() else {
            return Reply::error(ErrorCode::Invalid, "no checkpoint is being restored");
        };
        let kept = match fd.try_clone() {
            Ok(k) => k,
            Err(e) => {
                return Reply::error(
                    ErrorCode::Invalid,
                    format!("cannot keep the userfaultfd: {e}"),
                )
            }
        };
        // The rank registered its window for write protection only: pages
        // it touches for the first time after the restart (fresh heaps) are
        // plain shmem faults. Only the part of the window the checkpoint
        // held data in (heaps and segments in use) is served by the agent.
        if let Err(e) = self.register_restored_ranges(&fd) {
            log!("session {}: {e}", self.label);
            return Reply::error(ErrorCode::Invalid, e);
        }
        let agent = Arc::downgrade(&self.agent);
        // The rank owning the heap of a page, if the page is a heap page.
        let owner_of = Arc::new(move |page: u64| {
            let agent = agent.upgrade()?;
            let layout = agent.id.layout;
            let addr = layout.base + page * PAGE_SIZE;
            if layout.zone_of(addr) != Some(Zone::Private) {
                return None;
            }
            let owner = lock(&agent.heaps).owner(layout.heap_index(addr))?;
            agent.ckpt.rank_of(owner)
        });
        match restore.serve(self.rank, fd, self.label.clone(), owner_of) {
            Ok(server) => {
                log!(
                    "session {}: serving the restored window of stamp {}",
                    self.label,
                    restore.stamp
                );
                self.restore_server = Some(server);
                self.private_uffds.push(kept);
                Reply::Ok
            }
            Err(e) => {
                log!("session {}: restore userfaultfd refused: {e}", self.label);
                Reply::error(ErrorCode::Invalid, e)
            }
        }
    }

    /// Releases what the session held: fault tasks, heaps (their pages
    /// dropped), locks, its place in a barrier, its segments.
    fn end(self, ending: &str) {
        for task in &self.fault_tasks {
            task.abort();
        }
        self.agent.ckpt.session_ended(self.id, self.rank);
        let agent = &*self.agent;
        lock(&agent.alias_pages).retain(|(id, _), _| *id != self.id);
        if self.restoring && !self.restored {
            // A wrapper of the restored program (a script's interpreter, a
            // launcher) that exec'd it, or a restore that failed: what the
            // rank had stays for its next connection.
            let to = placeholder(self.rank);
            let heaps = lock(&agent.heaps).reassign(self.id, to);
            let segments = lock(&agent.segments).reassign(self.id, to);
            let locks = lock(&agent.sync).reassign(self.id, to);
            log!(
                "session {} ({:?} channel) ended before the rank was restored{ending}: {heaps} heaps, {segments} segment uses and {locks} locks kept for the rank's next connection",
                self.label,
                self.channel
            );
            return;
        }
        let layout = agent.id.layout;
        let mut freed = 0u64;
        {
            let mut heaps = lock(&agent.heaps);
            for run in heaps.runs_of(self.id) {
                let offset = layout.file_offset(layout.heap_addr(run.start));
                let count = run.end - run.start;
                match agent.memory.punch(offset, count as u64 * HEAP_SIZE) {
                    Ok(()) => {
                        heaps.release(run.start, count);
                        freed += count as u64;
                    }
                    // A heap whose old data could not be dropped is never
                    // handed out again: allocators expect fresh heaps zeroed.
                    Err(e) => log!(
                        "session {}: {e}; heaps {}+{count} are lost",
                        self.label,
                        run.start
                    ),
                }
            }
        }
        lock(&agent.sync).session_ended(self.id);
        let unused = lock(&agent.segments).session_ended(self.id);
        for freed in unused {
            cluster::drop_slot(agent, Some(freed), &self.label);
        }
        if let Some(c) = agent.cluster.as_ref() {
            c.pages.remove_rank(self.id);
        }
        cluster::session_ended(agent, self.id);
        let served = self.faults.served.load(Ordering::Relaxed);
        let via_alias = self.faults.via_alias.load(Ordering::Relaxed);
        log!(
            "session {} ({:?} channel) ended{ending}: {served} faults served ({via_alias} through aliases), {freed} heaps freed",
            self.label,
            self.channel
        );
    }
}

/// Waits for an answer (a grant of another session, a manager's reply),
/// watching for the peer leaving.
async fn wait<T>(
    wire: &mut Wire,
    answer: impl std::future::Future<Output = T>,
) -> Result<Waited<T>, SessionError> {
    tokio::select! {
        biased;
        got = answer => Ok(Waited::Done(got)),
        closed = wire.closed() => {
            closed?;
            Ok(Waited::PeerGone)
        }
    }
}
