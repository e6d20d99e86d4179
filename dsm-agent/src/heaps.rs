//! The private heap table: which session owns each 8 MiB heap of the private
//! zone of the window. Heaps belong to a connection (session), not to a rank
//! number, because a rank that execs itself connects again while its old
//! connection may still be open; whatever a session owns is freed when it
//! ends.
//!
//! Pure bookkeeping: dropping the pages of freed heaps is the caller's job
//! (it owns the memfd), done before the heaps are marked free so that a new
//! owner never sees old data.
//!
//! [`HeapsState`] is the serializable form (checkpoint tables): owners are
//! named by rank, since session ids do not survive a restart.

use std::ops::Range;

use mome_protocol::rank::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::agent::SessionId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeapError {
    #[error("a heap request for 0 heaps")]
    ZeroCount,
    #[error("no run of {count} free heaps left in the private zone ({total} heaps, {free} free)")]
    NoSpace { count: u32, total: u32, free: u32 },
    #[error("heaps {first}..{end} are outside the private zone (heaps 0..{total})", end = *first as u64 + *count as u64)]
    OutOfRange { first: u32, count: u32, total: u32 },
    #[error("heap {heap} is not owned by this connection")]
    NotOwned { heap: u32 },
}

impl HeapError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HeapError::NoSpace { .. } => ErrorCode::NoSpace,
            _ => ErrorCode::Invalid,
        }
    }
}

/// A run of heaps owned by one rank, as saved in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapRun {
    pub first: u32,
    pub count: u32,
    pub rank: u32,
}

/// Serializable heap table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapsState {
    pub heaps: u32,
    pub runs: Vec<HeapRun>,
}

#[derive(Debug)]
pub struct HeapTable {
    owners: Vec<Option<SessionId>>,
    /// Every heap below this index is owned: allocation starts here, so the
    /// common case (a growing job) does not rescan the used part of the zone.
    lowest_free: usize,
    /// This node's share of the zone: allocation stays in `first..limit`.
    first: usize,
    limit: usize,
    in_use: usize,
}

impl HeapTable {
    pub fn new(heaps: u32) -> HeapTable {
        HeapTable {
            owners: vec![None; heaps as usize],
            lowest_free: 0,
            first: 0,
            limit: heaps as usize,
            in_use: 0,
        }
    }

    /// The table of node `node` of `nodes`: it hands out only its share,
    /// the `node`-th of `nodes` equal parts of the zone.
    pub fn new_part(heaps: u32, node: u32, nodes: u32) -> HeapTable {
        let nodes = nodes.max(1) as u64;
        let start = (heaps as u64 * node as u64 / nodes) as usize;
        let end = (heaps as u64 * (node as u64 + 1) / nodes) as usize;
        HeapTable {
            owners: vec![None; heaps as usize],
            lowest_free: start,
            first: start,
            limit: end,
            in_use: 0,
        }
    }

    /// Heaps currently owned by some session.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// First-fit run of `count` free heaps, given to `owner`; returns the first.
    pub fn alloc(&mut self, owner: SessionId, count: u32) -> Result<u32, HeapError> {
        if count == 0 {
            return Err(HeapError::ZeroCount);
        }
        let count = count as usize;
        let n = self.limit;
        let mut start = self.lowest_free;
        while start + count <= n {
            // Jump past the last owned heap of the candidate run: no run
            // starting before it can be free.
            match self.owners[start..start + count]
                .iter()
                .rposition(Option::is_some)
            {
                Some(last_owned) => start += last_owned + 1,
                None => {
                    self.owners[start..start + count].fill(Some(owner));
                    self.in_use += count;
                    if start == self.lowest_free {
                        self.lowest_free = self.owners[start + count..]
                            .iter()
                            .position(Option::is_none)
                            .map_or(n, |i| start + count + i);
                    }
                    return Ok(start as u32);
                }
            }
        }
        Err(HeapError::NoSpace {
            count: count as u32,
            total: (n - self.first) as u32,
            free: (n - self.first - self.in_use) as u32,
        })
    }

    /// Checks that `owner` owns every heap of `first..first+count`.
    pub fn check_owned(&self, owner: SessionId, first: u32, count: u32) -> Result<(), HeapError> {
        if count == 0 {
            return Err(HeapError::ZeroCount);
        }
        let range = self.range(first, count)?;
        match range.clone().find(|&h| self.owners[h] != Some(owner)) {
            Some(h) => Err(HeapError::NotOwned { heap: h as u32 }),
            None => Ok(()),
        }
    }

    /// Marks `first..first+count` free; the caller checked ownership and
    /// dropped their pages.
    pub fn release(&mut self, first: u32, count: u32) {
        let Ok(range) = self.range(first, count) else {
            return;
        };
        for owner in &mut self.owners[range] {
            if owner.take().is_some() {
                self.in_use -= 1;
            }
        }
        self.lowest_free = self.lowest_free.min(first as usize).max(self.first);
    }

    /// The heaps `owner` holds, as maximal runs of consecutive heaps.
    pub fn runs_of(&self, owner: SessionId) -> Vec<Range<u32>> {
        let mut runs: Vec<Range<u32>> = Vec::new();
        for (i, o) in self.owners.iter().enumerate() {
            if *o != Some(owner) {
                continue;
            }
            let i = i as u32;
            match runs.last_mut() {
                Some(run) if run.end == i => run.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// The heaps of `from` become `to`'s (a restored rank's placeholder
    /// handing them to its new memory session). Returns how many moved.
    pub fn reassign(&mut self, from: SessionId, to: SessionId) -> usize {
        let mut moved = 0;
        for owner in self.owners.iter_mut().filter(|o| **o == Some(from)) {
            *owner = Some(to);
            moved += 1;
        }
        moved
    }

    /// Runs of heaps in use, whoever owns them.
    pub fn used_runs(&self) -> Vec<Range<u32>> {
        let mut runs: Vec<Range<u32>> = Vec::new();
        for (i, _) in self.owners.iter().enumerate().filter(|(_, o)| o.is_some()) {
            let i = i as u32;
            match runs.last_mut() {
                Some(run) if run.end == i => run.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// The session owning `heap`, if any.
    pub fn owner(&self, heap: u32) -> Option<SessionId> {
        self.owners.get(heap as usize).copied().flatten()
    }

    /// The state to save, owners named by rank (`rank_of`). Heaps of a
    /// session whose rank is unknown are saved as free.
    pub fn to_state(&self, rank_of: impl Fn(SessionId) -> Option<u32>) -> HeapsState {
        let mut runs: Vec<HeapRun> = Vec::new();
        for (i, owner) in self.owners.iter().enumerate() {
            let Some(rank) = owner.and_then(&rank_of) else {
                continue;
            };
            let i = i as u32;
            match runs.last_mut() {
                Some(r) if r.rank == rank && r.first + r.count == i => r.count += 1,
                _ => runs.push(HeapRun {
                    first: i,
                    count: 1,
                    rank,
                }),
            }
        }
        HeapsState {
            heaps: self.owners.len() as u32,
            runs,
        }
    }

    /// A table of `heaps` heaps from saved state, heaps owned by
    /// `session_of(rank)`. Runs outside the zone are errors.
    pub fn from_state(
        heaps: u32,
        state: &HeapsState,
        session_of: impl Fn(u32) -> SessionId,
    ) -> Result<HeapTable, HeapError> {
        let mut t = HeapTable::new(heaps);
        for run in &state.runs {
            let range = t.range(run.first, run.count)?;
            let owner = session_of(run.rank);
            for o in &mut t.owners[range] {
                if o.is_none() {
                    t.in_use += 1;
                }
                *o = Some(owner);
            }
        }
        t.lowest_free = t
            .owners
            .iter()
            .position(Option::is_none)
            .unwrap_or(t.owners.len());
        Ok(t)
    }

    fn range(&self, first: u32, count: u32) -> Result<Range<usize>, HeapError> {
        let total = self.owners.len();
        let end = first as usize + count as usize;
        if end > total {
            return Err(HeapError::OutOfRange {
                first,
                count,
                total: total as u32,
            });
        }
        Ok(first as usize..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);

    #[test]
    fn first_fit_reuses_holes() {
        let mut t = HeapTable::new(16);
        assert_eq!(t.alloc(A, 2), Ok(0));
        assert_eq!(t.alloc(B, 3), Ok(2));
        assert_eq!(t.alloc(A, 1), Ok(5));
        t.check_owned(A, 0, 2).unwrap();
        assert_eq!(t.check_owned(A, 1, 2), Err(HeapError::NotOwned { heap: 2 }));
        t.release(2, 3);
        assert_eq!(t.in_use(), 3);
        // A run of 4 does not fit in the 3-heap hole.
        assert_eq!(t.alloc(A, 4), Ok(6));
        assert_eq!(t.alloc(B, 3), Ok(2));
        assert_eq!(t.alloc(B, 1), Ok(10));
        assert_eq!(t.runs_of(A), vec![0..2, 5..10]);
    }

    #[test]
    fn errors() {
        let mut t = HeapTable::new(4);
        assert_eq!(t.alloc(A, 0), Err(HeapError::ZeroCount));
        assert_eq!(t.alloc(A, 4), Ok(0));
        assert!(matches!(
            t.alloc(A, 1),
            Err(HeapError::NoSpace { free: 0, .. })
        ));
        assert!(matches!(
            t.check_owned(A, 3, 2),
            Err(HeapError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check_owned(A, u32::MAX, 2),
            Err(HeapError::OutOfRange { .. })
        ));
        assert_eq!(t.check_owned(B, 0, 1), Err(HeapError::NotOwned { heap: 0 }));
        t.release(0, 4);
        assert_eq!(t.in_use(), 0);
        assert_eq!(t.alloc(B, 4), Ok(0));
    }

    #[test]
    fn state_round_trip_by_rank() {
        let mut t = HeapTable::new(8);
        assert_eq!(t.alloc(A, 2), Ok(0));
        assert_eq!(t.alloc(B, 1), Ok(2));
        assert_eq!(t.alloc(A, 1), Ok(3));
        let state = t.to_state(|s| Some(s.0 as u32 * 10));
        assert_eq!(
            state.runs,
            vec![
                HeapRun {
                    first: 0,
                    count: 2,
                    rank: 10
                },
                HeapRun {
                    first: 2,
                    count: 1,
                    rank: 20
                },
                HeapRun {
                    first: 3,
                    count: 1,
                    rank: 10
                },
            ]
        );
        let json = serde_json::to_string(&state).unwrap();
        let back: HeapsState = serde_json::from_str(&json).unwrap();
        let ph = |r: u32| SessionId(100 + r as u64);
        let mut r = HeapTable::from_state(8, &back, ph).unwrap();
        assert_eq!(r.in_use(), 4);
        assert_eq!(r.alloc(A, 1), Ok(4));
        assert_eq!(r.reassign(ph(10), B), 3);
        assert_eq!(r.runs_of(B), vec![0..2, 3..4]);
        assert_eq!(r.runs_of(ph(20)), vec![2..3]);
        let bad = HeapsState {
            heaps: 8,
            runs: vec![HeapRun {
                first: 7,
                count: 2,
                rank: 0,
            }],
        };
        assert!(HeapTable::from_state(8, &bad, ph).is_err());
    }

    #[test]
    fn node_shares_do_not_overlap() {
        let mut a = HeapTable::new_part(8, 0, 2);
        const S1: SessionId = SessionId(1);
        let mut b = HeapTable::new_part(8, 1, 2);
        assert_eq!(a.alloc(S1, 2), Ok(0));
        assert_eq!(b.alloc(S1, 2), Ok(4));
        assert_eq!(b.alloc(S1, 2), Ok(6));
        assert!(matches!(
            b.alloc(S1, 1),
            Err(HeapError::NoSpace {
                total: 4,
                free: 0,
                ..
            })
        ));
        assert_eq!(a.alloc(S1, 2), Ok(2));
        b.release(4, 1);
        assert_eq!(b.alloc(S1, 1), Ok(4));
    }

    #[test]
    fn lowest_free_hint_follows_frees() {
        let mut t = HeapTable::new(8);
        for i in 0..8 {
            assert_eq!(t.alloc(A, 1), Ok(i));
        }
        t.release(3, 1);
        assert_eq!(t.alloc(B, 1), Ok(3));
        assert!(t.alloc(B, 1).is_err());
    }
}
