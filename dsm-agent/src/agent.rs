//! The node's shared state: what every session of this agent reads or
//! changes (the memfd, the heap, segment and sync tables, counters), plus
//! the identity of the job and node that connections are checked against.
//!
//! Tables sit behind plain mutexes that are never held across an await:
//! each request changes them in one short critical section. No code holds
//! two of them at once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mome_protocol::WindowLayout;

use crate::ckpt::Ckpt;
use crate::events::Events;
use crate::heaps::HeapTable;
use crate::memfd::NodeMemory;
use crate::restore::Restore;
use crate::segments::SegmentTable;
use crate::sync::SyncTable;
use crate::tables::{TablesError, TablesState};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Tables(#[from] TablesError),
    #[error("cannot duplicate the node memory file for the page protocol: {0}")]
    Memory(std::io::Error),
}

/// One connection of a rank. Heaps and locks belong to it, not to the rank
/// number (see `session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Who this agent is, in which job.
#[derive(Debug, Clone)]
pub struct Identity {
    pub job_id: String,
    pub node: u32,
    pub nodes: u32,
    /// Ranks of the whole job.
    pub nranks: u32,
    /// Ranks that run on this node and may connect here.
    pub local_ranks: BTreeSet<u32>,
    pub layout: WindowLayout,
    /// Only processes of this user may connect.
    pub uid: u32,
    /// Signal that brings a rank to a checkpoint (job.yaml checkpoint.signal).
    pub ckpt_signal: i32,
    /// Address:port to listen on for other nodes (config nodes.listen).
    pub listen: String,
    /// Several nodes: the job's secret and the mesh timings.
    pub mesh: Option<(crate::mesh::Secret, crate::mesh::Timing)>,
    /// Diskless checkpoints: the node's memory store root.
    pub mem_store: Option<std::path::PathBuf>,
    /// Consistency model of the shared zone until MomeConsistency changes
    /// it (config nodes.consistency).
    pub default_model: mome_protocol::peer::Model,
}

#[derive(Debug)]
pub struct Agent {
    pub id: Identity,
    pub memory: NodeMemory,
    pub heaps: Mutex<HeapTable>,
    pub segments: Mutex<SegmentTable>,
    pub sync: Mutex<SyncTable>,
    /// Connections accepted so far.
    pub connections: AtomicU64,
    /// Faults served so far, by every session.
    pub faults: Arc<AtomicU64>,
    next_session: AtomicU64,
    /// Events to the coordinator (stdout).
    pub events: Events,
    /// Checkpoint engine and the session registry it needs.
    pub ckpt: Ckpt,
    /// The checkpoint being restored (`--restore`).
    pub restore: Option<Arc<Restore>>,
    pub started: Instant,
    /// Window pages that ranks also map outside the window (MomeMMap with
    /// MAP_FIXED, e.g. a Fortran common block), by session: writes through
    /// such an alias are not seen by the window's dirty tracking, so every
    /// checkpoint copies these pages (first page, page count).
    pub alias_pages: Mutex<std::collections::BTreeMap<(SessionId, u64), (u64, u64)>>,
    /// Several nodes: the mesh, the page protocol and the managers' routes.
    pub cluster: Option<crate::cluster::Cluster>,
    /// Shared malloc: blocks freed by other nodes, remote frees in flight.
    pub shmalloc: crate::shmalloc::RemoteFrees,
}

impl Agent {
    /// A fresh agent, or with `restore` one whose tables are those of the
    /// restored checkpoint, owned by the ranks' placeholders.
    pub fn new(
        id: Identity,
        memory: NodeMemory,
        events: Events,
        restore: Option<Arc<Restore>>,
    ) -> Result<Agent, AgentError> {
        let layout = id.layout;
        let (heaps, slots, reserve) = (
            layout.private_heaps(),
            layout.segment_slots(),
            layout.segment_reserve,
        );
        let saved = match &restore {
            Some(r) => Some(TablesState::decode(&r.index.tables)?),
            None => None,
        };
        let (heaps, segments, sync, shmalloc) = match &saved {
            Some(t) => {
                let t = t.rebuild(heaps, slots, reserve, id.nranks)?;
                let queued = t.shmalloc.to_state().queue.len();
                if queued > 0 {
                    log!("shared malloc: {queued} blocks freed by other nodes restored, waiting for this node's ranks");
                }
                (t.heaps, t.segments, t.sync, t.shmalloc)
            }
            None => (
                // Several nodes: each hands out its own share of the heaps,
                // so that heap numbers are unique in the job without asking.
                HeapTable::new_part(heaps, id.node, id.nodes),
                SegmentTable::new(slots, reserve),
                SyncTable::new(id.nranks),
                Default::default(),
            ),
        };
        let cluster = match &id.mesh {
            Some((secret, timing)) if id.nodes > 1 => {
                let mesh = Arc::new(crate::mesh::Mesh::new(
                    id.node,
                    id.nodes,
                    id.job_id.clone(),
                    secret.clone(),
                    *timing,
                    events.clone(),
                ));
                let memfd = memory.duplicate().map_err(AgentError::Memory)?;
                let pages =
                    crate::pages::PageEngine::new(layout, memfd, mesh.clone(), id.default_model);
                if let Some(t) = &saved {
                    pages.restore_models(&t.models, t.clock);
                }
                Some(crate::cluster::Cluster::new(mesh, pages))
            }
            _ => None,
        };
        Ok(Agent {
            heaps: Mutex::new(heaps),
            segments: Mutex::new(segments),
            sync: Mutex::new(sync),
            // Diskless: the first checkpoint after a restore is full, so
            // that every holder (a replacement among them) gets every page
            // of the node, not just what changed since the stamp.
            ckpt: Ckpt::new(
                id.ckpt_signal,
                restore
                    .as_ref()
                    .filter(|_| id.mem_store.is_none())
                    .map(|r| r.index.clone()),
            ),
            id,
            memory,
            connections: AtomicU64::new(0),
            faults: Arc::new(AtomicU64::new(0)),
            next_session: AtomicU64::new(1),
            events,
            restore,
            started: Instant::now(),
            alias_pages: Mutex::new(std::collections::BTreeMap::new()),
            cluster,
            shmalloc,
        })
    }

    pub fn new_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }
}

/// Locks a table. Poisoning cannot happen (the agent aborts on panic), so
/// a poisoned lock is simply taken.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
