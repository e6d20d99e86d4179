//! The agent's part of the shared allocator (MomeMalloc, see
//! `preload/src/shmalloc.rs`): frees of blocks owned by another node.
//!
//! Each node allocates shared blocks from heaps of its own, with an
//! allocator only its ranks touch. A rank that frees a block of another
//! node's heap does not touch that allocator: it hands the address to its
//! agent (`ShmallocFree`), which sends it to the owner node (`RemoteFree`);
//! the owner queues it, and its ranks take the queue (`ShmallocTake`) and
//! free the blocks themselves, under their node's allocator lock.
//!
//! Owns: the queue of blocks freed by other nodes waiting for a rank of
//! this node, and the remote frees this node sent that are not yet
//! acknowledged (`outbox`). A coordinated checkpoint waits until the outbox
//! is empty (`ckpt::drain`, as for page requests), so at the stamp every
//! remote free sent is in its owner's queue, which the owner saves with its
//! tables ([`RemoteFreesState`]): no free is lost or applied twice by a
//! restart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use mome_protocol::peer::{PeerMsg, MAX_REMOTE_FREES};
use mome_protocol::rank::{ErrorCode, MAX_SHMALLOC_FREES, MAX_SHMALLOC_TAKE, SHMALLOC_FREE_ENTRY};
use serde::{Deserialize, Serialize};

use crate::agent::{lock, Agent};

/// Largest queue kept: past it the owner's ranks are not freeing at all
/// (none allocates any more) and the job is leaking anyway; further frees
/// are refused with a message rather than growing the agent without bound.
const MAX_QUEUED: usize = 1 << 22;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShmallocError {
    #[error("block {addr:#x} is outside the shared zone of the window")]
    OutsideShared { addr: u64 },
    #[error("node {node} does not exist ({nodes} nodes)")]
    NoSuchNode { node: u32, nodes: u32 },
    #[error("block {addr:#x} belongs to this node (node {node}): the rank frees it itself")]
    OwnNode { addr: u64, node: u32 },
    #[error("block {addr:#x} is not 16-byte aligned: not a block of mome_shmalloc")]
    Unaligned { addr: u64 },
    #[error("{queued} remote frees already wait for node {node}'s ranks")]
    Full { node: u32, queued: usize },
    #[error("a remote free request of {0} bytes: not whole entries of {SHMALLOC_FREE_ENTRY} bytes, or more than {MAX_SHMALLOC_FREES}")]
    BadBatch(usize),
}

impl ShmallocError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ShmallocError::Full { .. } => ErrorCode::NoSpace,
            _ => ErrorCode::Invalid,
        }
    }
}

/// What a checkpoint keeps: the blocks other nodes freed that this node's
/// ranks have not taken yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFreesState {
    pub queue: Vec<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Blocks of this node freed on other nodes, oldest first.
    queue: VecDeque<u64>,
    /// Remote frees sent and not acknowledged: seq -> owner node.
    outbox: BTreeMap<u64, u32>,
    next_seq: u64,
}

#[derive(Debug, Default)]
pub struct RemoteFrees {
    inner: Mutex<Inner>,
}

impl RemoteFrees {
    pub fn from_state(state: &RemoteFreesState) -> RemoteFrees {
        RemoteFrees {
            inner: Mutex::new(Inner {
                queue: state.queue.iter().copied().collect(),
                ..Inner::default()
            }),
        }
    }

    pub fn to_state(&self) -> RemoteFreesState {
        RemoteFreesState {
            queue: lock(&self.inner).queue.iter().copied().collect(),
        }
    }

    /// Remote frees sent and not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        lock(&self.inner).outbox.len()
    }

    /// Up to `max` queued blocks, oldest first, removed from the queue.
    pub fn take(&self, max: usize) -> Vec<u64> {
        let mut i = lock(&self.inner);
        let n = max.min(i.queue.len());
        i.queue.drain(..n).collect()
    }

    /// Queues blocks; those past the queue's limit are refused (their count).
    fn queue(&self, addrs: &[u64]) -> Result<(), usize> {
        let mut i = lock(&self.inner);
        let room = MAX_QUEUED.saturating_sub(i.queue.len());
        i.queue.extend(addrs.iter().take(room));
        if addrs.len() > room {
            return Err(addrs.len() - room);
        }
        Ok(())
    }
}

/// Ranks of this node freed blocks of other nodes' heaps: `frees` as in
/// `RankRequest::ShmallocFree`. Each is checked, then sent to its node
/// (one message per node).
pub fn free_remote(agent: &Agent, frees: &[u8]) -> Result<(), ShmallocError> {
    if !frees.len().is_multiple_of(SHMALLOC_FREE_ENTRY)
        || frees.len() / SHMALLOC_FREE_ENTRY > MAX_SHMALLOC_FREES
    {
        return Err(ShmallocError::BadBatch(frees.len()));
    }
    let layout = agent.id.layout;
    let nodes = agent.id.nodes;
    let mut by_node: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for e in frees.chunks_exact(SHMALLOC_FREE_ENTRY) {
        let (n, a) = e.split_at(4);
        let node = u32::from_le_bytes(n.try_into().expect("4 bytes"));
        let addr = u64::from_le_bytes(a.try_into().expect("8 bytes"));
        if addr < layout.shared_base() || addr >= layout.end() {
            return Err(ShmallocError::OutsideShared { addr });
        }
        if !addr.is_multiple_of(16) {
            return Err(ShmallocError::Unaligned { addr });
        }
        if node >= nodes {
            return Err(ShmallocError::NoSuchNode { node, nodes });
        }
        if node == agent.id.node {
            return Err(ShmallocError::OwnNode { addr, node });
        }
        by_node.entry(node).or_default().push(addr);
    }
    let Some(cluster) = agent.cluster.as_ref() else {
        // One node owns every heap: any entry was refused above.
        return Ok(());
    };
    for (node, addrs) in by_node {
        let seq = {
            let mut i = lock(&agent.shmalloc.inner);
            i.next_seq += 1;
            let seq = i.next_seq;
            i.outbox.insert(seq, node);
            seq
        };
        debug_assert!(addrs.len() <= MAX_REMOTE_FREES);
        cluster.mesh.send(node, PeerMsg::RemoteFree { seq, addrs });
    }
    Ok(())
}

/// Node `from` freed blocks of this node: queue them, acknowledge.
pub fn on_remote_free(agent: &Agent, from: u32, seq: u64, addrs: &[u64]) {
    let layout = agent.id.layout;
    let bad = |a: &u64| *a < layout.shared_base() || *a >= layout.end() || !a.is_multiple_of(16);
    if let Some(a) = addrs.iter().find(|a| bad(a)) {
        log!("node {from} sent remote free {seq} with {a:#x}, not a shared block: ignored");
    } else if let Err(dropped) = agent.shmalloc.queue(addrs) {
        let e = ShmallocError::Full {
            node: agent.id.node,
            queued: MAX_QUEUED,
        };
        log!("node {from}: {dropped} remote frees dropped: {e} (they no longer allocate)");
    }
    // Acknowledged whatever became of it: the sender must not wait for it
    // (a checkpoint waits for every acknowledgement).
    if let Some(c) = agent.cluster.as_ref() {
        c.mesh.send(from, PeerMsg::RemoteFreeAck { seq });
    }
}

/// Node `from` queued our remote free `seq`.
pub fn on_ack(agent: &Agent, from: u32, seq: u64) {
    let mut i = lock(&agent.shmalloc.inner);
    match i.outbox.get(&seq) {
        Some(&node) if node == from => {
            i.outbox.remove(&seq);
        }
        _ => log!("node {from} acknowledged remote free {seq}, which it was not sent: ignored"),
    }
}

/// The answer to `ShmallocTake`: addresses as little-endian bytes.
pub fn take_bytes(agent: &Agent, max: u32) -> Vec<u8> {
    let max = (max as usize).min(MAX_SHMALLOC_TAKE);
    agent
        .shmalloc
        .take(max)
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_take_and_state() {
        let f = RemoteFrees::default();
        f.queue(&[16, 32, 48]).unwrap();
        assert_eq!(f.take(2), vec![16, 32]);
        let s = f.to_state();
        assert_eq!(s.queue, vec![48]);
        let back = RemoteFrees::from_state(
            &serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap(),
        );
        assert_eq!(back.take(10), vec![48]);
        assert!(back.take(10).is_empty());
        assert_eq!(back.outstanding(), 0);
    }
}
