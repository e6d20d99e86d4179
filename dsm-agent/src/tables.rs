//! The agent's tables as saved in a checkpoint (the node index's `tables`
//! blob) and rebuilt at restore: heaps, segments and sync state, every
//! owner named by rank. JSON: small, and readable when debugging a store.
//!
//! At restore, what rank `r` owned belongs to [`placeholder`]`(r)` until the
//! restored rank's sessions connect and take it over (`reassign`): session
//! ids are runtime values. Because the locks of a rank are held by its
//! placeholder meanwhile, other ranks asking for them simply queue: the
//! order in which restored ranks reconnect does not matter.

use serde::{Deserialize, Serialize};

use crate::agent::{Agent, SessionId};
use crate::heaps::{HeapTable, HeapsState};
use crate::segments::{SegmentTable, SegmentsState};
use crate::shmalloc::{RemoteFrees, RemoteFreesState};
use crate::sync::{SyncState, SyncTable};
use mome_protocol::peer::Model;

/// Format of the blob; bumped when a table changes shape.
const TABLES_VERSION: u32 = 1;

/// Session ids from here up stand for a rank whose restored sessions have
/// not connected yet; runtime ids count up from 1 and never get there.
const PLACEHOLDER_BASE: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("cannot encode the agent tables: {0}")]
    Encode(serde_json::Error),
    #[error("the checkpoint's agent tables are unreadable: {0}")]
    Decode(serde_json::Error),
    #[error("the checkpoint's agent tables are of version {found}, this agent reads version {TABLES_VERSION}")]
    Version { found: u32 },
    #[error("the checkpoint's {table} table does not fit this job's window: {detail}")]
    Mismatch { table: &'static str, detail: String },
}

/// The session id standing for rank `rank` until it reconnects.
pub fn placeholder(rank: u32) -> SessionId {
    SessionId(PLACEHOLDER_BASE + u64::from(rank))
}

/// The rank a placeholder stands for.
pub fn placeholder_rank(id: SessionId) -> Option<u32> {
    id.0.checked_sub(PLACEHOLDER_BASE)
        .and_then(|r| u32::try_from(r).ok())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablesState {
    pub version: u32,
    pub heaps: HeapsState,
    pub segments: SegmentsState,
    pub sync: SyncState,
    /// Several nodes: this node's consistency models set by MomeConsistency
    /// (first page, end page, model) and its Lamport clock. Absent from
    /// stamps taken before they existed (strong everywhere, clock 0).
    #[serde(default)]
    pub models: Vec<(u64, u64, Model)>,
    #[serde(default)]
    pub clock: u64,
    /// Shared malloc: blocks other nodes freed, not yet taken by a rank
    /// (absent from blobs written before shared malloc existed).
    #[serde(default)]
    pub shmalloc: RemoteFreesState,
}

/// The live tables rebuilt from a checkpoint.
pub struct Tables {
    pub heaps: HeapTable,
    pub segments: SegmentTable,
    pub sync: SyncTable,
    pub shmalloc: RemoteFrees,
}

impl TablesState {
    /// Takes the agent's tables, owners named by `rank_of`. Called in the
    /// pause, when no rank changes them.
    pub fn capture(agent: &Agent, rank_of: &dyn Fn(SessionId) -> Option<u32>) -> TablesState {
        let heaps = crate::agent::lock(&agent.heaps).to_state(rank_of);
        let segments = crate::agent::lock(&agent.segments).to_state(rank_of);
        let sync = crate::agent::lock(&agent.sync).to_state(rank_of);
        let (models, clock) = match agent.cluster.as_ref() {
            Some(c) => (c.pages.models(), c.pages.tick()),
            None => (Vec::new(), 0),
        };
        let shmalloc = agent.shmalloc.to_state();
        if !shmalloc.queue.is_empty() {
            log!(
                "shared malloc: {} blocks freed by other nodes wait for this node's ranks (kept in the checkpoint)",
                shmalloc.queue.len()
            );
        }
        TablesState {
            version: TABLES_VERSION,
            heaps,
            segments,
            sync,
            models,
            clock,
            shmalloc,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, TablesError> {
        serde_json::to_vec(self).map_err(TablesError::Encode)
    }

    pub fn decode(blob: &[u8]) -> Result<TablesState, TablesError> {
        let state: TablesState = serde_json::from_slice(blob).map_err(TablesError::Decode)?;
        if state.version != TABLES_VERSION {
            return Err(TablesError::Version {
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Live tables for a window of `heaps` heaps and `slots` segment slots
    /// of `reserve` bytes, owned by the ranks' placeholders.
    pub fn rebuild(
        &self,
        heaps: u32,
        slots: u32,
        reserve: u64,
        nranks: u32,
    ) -> Result<Tables, TablesError> {
        if self.heaps.heaps != heaps {
            return Err(TablesError::Mismatch {
                table: "heap",
                detail: format!("{} heaps saved, the window has {heaps}", self.heaps.heaps),
            });
        }
        let mismatch = |table: &'static str, e: &dyn std::fmt::Display| TablesError::Mismatch {
            table,
            detail: e.to_string(),
        };
        Ok(Tables {
            heaps: HeapTable::from_state(heaps, &self.heaps, placeholder)
                .map_err(|e| mismatch("heap", &e))?,
            segments: SegmentTable::from_state(slots, reserve, &self.segments, placeholder)
                .map_err(|e| mismatch("segment", &e))?,
            sync: SyncTable::from_state(nranks, &self.sync, placeholder),
            shmalloc: RemoteFrees::from_state(&self.shmalloc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Caller;

    #[test]
    fn placeholders_name_ranks() {
        assert_eq!(placeholder_rank(placeholder(7)), Some(7));
        assert_eq!(placeholder_rank(SessionId(7)), None);
    }

    #[test]
    fn blob_round_trip_rebuilds_tables_owned_by_placeholders() {
        let (a, b) = (SessionId(1), SessionId(2));
        let mut heaps = HeapTable::new(16);
        heaps.alloc(a, 3).unwrap();
        heaps.alloc(b, 2).unwrap();
        let mut segments = SegmentTable::new(4, 1 << 20);
        segments.open(b, "/s", 4096, true, false).unwrap();
        let mut sync = SyncTable::new(2);
        assert!(sync
            .lock(
                Caller {
                    session: a,
                    rank: 0,
                    seq: 1
                },
                42
            )
            .is_ok());
        let rank_of = |s: SessionId| Some(s.0 as u32 - 1);
        let state = TablesState {
            version: TABLES_VERSION,
            heaps: heaps.to_state(rank_of),
            segments: segments.to_state(rank_of),
            sync: sync.to_state(rank_of),
            models: vec![(3, 9, Model::Weak), (20, 21, Model::Release)],
            clock: 77,
            shmalloc: RemoteFreesState {
                queue: vec![0x4000_0000_0010],
            },
        };
        let blob = state.encode().unwrap();
        let back = TablesState::decode(&blob).unwrap();
        assert_eq!(back, state);
        let t = back.rebuild(16, 4, 1 << 20, 2).unwrap();
        assert_eq!(t.heaps.runs_of(placeholder(0)), vec![0..3]);
        assert_eq!(t.heaps.runs_of(placeholder(1)), vec![3..5]);
        assert_eq!(t.shmalloc.take(8), vec![0x4000_0000_0010]);
        assert!(back.rebuild(8, 4, 1 << 20, 2).is_err());
        assert!(TablesState::decode(b"{}").is_err());
        // A stamp from before the models were saved: none, clock 0.
        let mut old: serde_json::Value = serde_json::from_slice(&blob).unwrap();
        old.as_object_mut().unwrap().remove("models");
        old.as_object_mut().unwrap().remove("clock");
        let back = TablesState::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(back.models.is_empty() && back.clock == 0);
        let mut v = state.clone();
        v.version = 99;
        assert!(matches!(
            TablesState::decode(&v.encode().unwrap()),
            Err(TablesError::Version { found: 99 })
        ));
    }
}
