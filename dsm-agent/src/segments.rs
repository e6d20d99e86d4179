//! The shared segment table: named shared segments (shm_open, MAP_SHARED
//! anonymous mappings, MomeMMap), each in a slot of `segment_reserve` bytes of
//! the shared zone. Segments belong to the job, not to a session: they
//! outlive the connection that created them.
//!
//! A slot stays allocated once taken, even after its name is unlinked,
//! because ranks may still map it (as a file unlinked while open); slots are
//! reclaimed only when the job ends. Pure bookkeeping: dropping the pages of
//! a shrunk segment is the caller's job.
//!
//! [`SegmentsState`] is the serializable form (checkpoint tables): users are
//! named by rank, since session ids do not survive a restart.

use std::collections::{BTreeSet, HashMap};

use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::rank::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::agent::SessionId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("segment {0:?} exists")]
    Exists(String),
    #[error("no segment {0:?}")]
    NotFound(String),
    #[error("no segment with id {0}")]
    NoSuchId(u32),
    #[error(
        "segment size {size} is above the reservation of {reserve} bytes (window.segment_reserve)"
    )]
    TooBig { size: u64, reserve: u64 },
    #[error("all {0} segment slots of the window are taken")]
    NoSpace(u32),
    #[error("a segment name cannot be empty")]
    EmptyName,
}

impl SegmentError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SegmentError::Exists(_) => ErrorCode::Exists,
            SegmentError::NotFound(_) => ErrorCode::NotFound,
            SegmentError::TooBig { .. } => ErrorCode::TooBig,
            SegmentError::NoSpace(_) => ErrorCode::NoSpace,
            SegmentError::NoSuchId(_) | SegmentError::EmptyName => ErrorCode::Invalid,
        }
    }
}

#[derive(Debug)]
struct Slot {
    size: u64,
    /// None once unlinked.
    name: Option<String>,
    /// A MAP_SHARED anonymous segment (`anon:<k>`): freed when unused even
    /// though it still has its name.
    anonymous: bool,
    /// Sessions that opened the segment and did not release it.
    users: BTreeSet<SessionId>,
}

impl Slot {
    fn freeable(&self) -> bool {
        self.users.is_empty() && (self.name.is_none() || self.anonymous)
    }
}

/// A slot given back: its pages are to be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freed {
    pub slot: u32,
    pub size: u64,
}

/// A segment as the rank sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub slot: u32,
    pub size: u64,
    /// This open created the segment.
    pub created: bool,
}

/// Bytes to drop after a shrink, as offsets inside the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shrunk {
    pub from: u64,
    pub to: u64,
}

/// One taken slot, as saved in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    pub slot: u32,
    pub size: u64,
    /// None once unlinked.
    pub name: Option<String>,
    pub anonymous: bool,
    /// Ranks using the segment.
    pub users: Vec<u32>,
}

/// Serializable segment table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentsState {
    pub slots: Vec<SlotState>,
}

#[derive(Debug)]
pub struct SegmentTable {
    reserve: u64,
    names: HashMap<String, u32>,
    slots: Vec<Option<Slot>>,
}

impl SegmentTable {
    pub fn new(slots: u32, reserve: u64) -> SegmentTable {
        SegmentTable {
            reserve,
            names: HashMap::new(),
            slots: (0..slots).map(|_| None).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Opens `name`, creating it with `create`; grows it to `size` when larger.
    pub fn open(
        &mut self,
        session: SessionId,
        name: &str,
        size: u64,
        create: bool,
        exclusive: bool,
    ) -> Result<SegmentInfo, SegmentError> {
        if name.is_empty() {
            return Err(SegmentError::EmptyName);
        }
        if let Some(&slot) = self.names.get(name) {
            if create && exclusive {
                return Err(SegmentError::Exists(name.to_string()));
            }
            let reserve = self.reserve;
            let s = self.slot_mut(slot)?;
            if size > s.size {
                if size > reserve {
                    return Err(SegmentError::TooBig { size, reserve });
                }
                s.size = size;
            }
            s.users.insert(session);
            return Ok(SegmentInfo {
                slot,
                size: s.size,
                created: false,
            });
        }
        if !create {
            return Err(SegmentError::NotFound(name.to_string()));
        }
        if size > self.reserve {
            return Err(SegmentError::TooBig {
                size,
                reserve: self.reserve,
            });
        }
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            return Err(SegmentError::NoSpace(self.slots.len() as u32));
        };
        self.slots[slot] = Some(Slot {
            size,
            name: Some(name.to_string()),
            anonymous: name.starts_with("anon:"),
            users: BTreeSet::from([session]),
        });
        let slot = slot as u32;
        self.names.insert(name.to_string(), slot);
        Ok(SegmentInfo {
            slot,
            size,
            created: true,
        })
    }

    /// Sets the size of segment `slot`. A shrink returns the bytes to drop:
    /// from the new size to the end of the last page of the old size.
    pub fn resize(
        &mut self,
        slot: u32,
        size: u64,
    ) -> Result<(SegmentInfo, Option<Shrunk>), SegmentError> {
        let reserve = self.reserve;
        let s = self.slot_mut(slot)?;
        if size > reserve {
            return Err(SegmentError::TooBig { size, reserve });
        }
        let old_end = s.size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let shrunk = (size < s.size).then_some(Shrunk {
            from: size,
            to: old_end,
        });
        s.size = size;
        let info = SegmentInfo {
            slot,
            size,
            created: false,
        };
        Ok((info, shrunk))
    }

    /// Removes `name`; its slot and memory stay for the ranks that map it.
    /// Removes a name; returns its slot, and the slot itself when nobody
    /// uses the segment any more.
    pub fn unlink(&mut self, name: &str) -> Result<(u32, Option<Freed>), SegmentError> {
        let slot = self
            .names
            .remove(name)
            .ok_or_else(|| SegmentError::NotFound(name.to_string()))?;
        if let Some(Some(s)) = self.slots.get_mut(slot as usize) {
            s.name = None;
        }
        Ok((slot, self.free_if_unused(slot)))
    }

    /// `session` no longer maps segment `slot`.
    pub fn release(
        &mut self,
        session: SessionId,
        slot: u32,
    ) -> Result<Option<Freed>, SegmentError> {
        self.slot_mut(slot)?.users.remove(&session);
        Ok(self.free_if_unused(slot))
    }

    /// `session` maps segment `slot` again.
    pub fn use_again(
        &mut self,
        session: SessionId,
        slot: u32,
    ) -> Result<SegmentInfo, SegmentError> {
        let s = self.slot_mut(slot)?;
        s.users.insert(session);
        Ok(SegmentInfo {
            slot,
            size: s.size,
            created: false,
        })
    }

    /// A session ended: it uses no segment any more.
    pub fn session_ended(&mut self, session: SessionId) -> Vec<Freed> {
        let mut freed = vec![];
        for slot in 0..self.slots.len() as u32 {
            if let Some(Some(s)) = self.slots.get_mut(slot as usize) {
                if s.users.remove(&session) {
                    freed.extend(self.free_if_unused(slot));
                }
            }
        }
        freed
    }

    /// Slots holding a segment.
    /// Taken slots with their segment's size.
    pub fn taken_slot_sizes(&self) -> Vec<(u32, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s.size)))
            .collect()
    }

    /// The segment uses of `from` become `to`'s (a restored rank's
    /// placeholder handing them to its new memory session).
    pub fn reassign(&mut self, from: SessionId, to: SessionId) -> usize {
        let mut moved = 0;
        for s in self.slots.iter_mut().flatten() {
            if s.users.remove(&from) {
                s.users.insert(to);
                moved += 1;
            }
        }
        moved
    }

    /// The state to save, users named by rank (`rank_of`).
    pub fn to_state(&self, rank_of: impl Fn(SessionId) -> Option<u32>) -> SegmentsState {
        let slots = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                let mut users: Vec<u32> = s.users.iter().filter_map(|&u| rank_of(u)).collect();
                users.sort_unstable();
                users.dedup();
                Some(SlotState {
                    slot: i as u32,
                    size: s.size,
                    name: s.name.clone(),
                    anonymous: s.anonymous,
                    users,
                })
            })
            .collect();
        SegmentsState { slots }
    }

    /// A table from saved state, users being `session_of(rank)`. A slot
    /// outside the table or a name used twice is an error.
    pub fn from_state(
        slots: u32,
        reserve: u64,
        state: &SegmentsState,
        session_of: impl Fn(u32) -> SessionId,
    ) -> Result<SegmentTable, SegmentError> {
        let mut t = SegmentTable::new(slots, reserve);
        for s in &state.slots {
            let entry = t
                .slots
                .get_mut(s.slot as usize)
                .ok_or(SegmentError::NoSuchId(s.slot))?;
            if entry.is_some() || s.size > reserve {
                return Err(SegmentError::NoSuchId(s.slot));
            }
            if let Some(name) = &s.name {
                if t.names.insert(name.clone(), s.slot).is_some() {
                    return Err(SegmentError::Exists(name.clone()));
                }
            }
            *entry = Some(Slot {
                size: s.size,
                name: s.name.clone(),
                anonymous: s.anonymous,
                users: s.users.iter().map(|&r| session_of(r)).collect(),
            });
        }
        Ok(t)
    }

    fn free_if_unused(&mut self, slot: u32) -> Option<Freed> {
        let entry = self.slots.get_mut(slot as usize)?;
        if !entry.as_ref().is_some_and(Slot::freeable) {
            return None;
        }
        let s = entry.take()?;
        if let Some(name) = &s.name {
            self.names.remove(name);
        }
        Some(Freed { slot, size: s.size })
    }

    fn slot_mut(&mut self, slot: u32) -> Result<&mut Slot, SegmentError> {
        self.slots
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
            .ok_or(SegmentError::NoSuchId(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const S: SessionId = SessionId(1);

    #[test]
    fn open_create_exclusive_grow() {
        let mut t = SegmentTable::new(2, 8 * M);
        assert_eq!(
            t.open(S, "/a", M, false, false),
            Err(SegmentError::NotFound("/a".into()))
        );
        assert_eq!(
            t.open(S, "/a", M, true, true),
            Ok(SegmentInfo {
                slot: 0,
                size: M,
                created: true
            })
        );
        assert_eq!(
            t.open(S, "/a", 0, true, true),
            Err(SegmentError::Exists("/a".into()))
        );
        assert_eq!(
            t.open(S, "/a", 0, true, false),
            Ok(SegmentInfo {
                slot: 0,
                size: M,
                created: false
            })
        );
        assert_eq!(
            t.open(S, "/a", 2 * M, false, false),
            Ok(SegmentInfo {
                slot: 0,
                size: 2 * M,
                created: false
            })
        );
        assert!(matches!(
            t.open(S, "/a", 9 * M, false, false),
            Err(SegmentError::TooBig { .. })
        ));
        assert!(matches!(
            t.open(S, "/b", 9 * M, true, false),
            Err(SegmentError::TooBig { .. })
        ));
        assert_eq!(t.open(S, "/b", 0, true, false).unwrap().slot, 1);
        assert_eq!(
            t.open(S, "/c", 0, true, false),
            Err(SegmentError::NoSpace(2))
        );
        assert_eq!(t.open(S, "", 0, true, false), Err(SegmentError::EmptyName));
    }

    #[test]
    fn resize_and_unlink() {
        let mut t = SegmentTable::new(4, 8 * M);
        let s = t.open(S, "/a", 10_000, true, false).unwrap();
        let (info, shrunk) = t.resize(s.slot, 100).unwrap();
        assert_eq!(info.size, 100);
        assert_eq!(
            shrunk,
            Some(Shrunk {
                from: 100,
                to: 12_288
            })
        );
        assert_eq!(t.resize(s.slot, 5000).unwrap().1, None);
        assert!(matches!(
            t.resize(s.slot, 9 * M),
            Err(SegmentError::TooBig { .. })
        ));
        assert_eq!(t.resize(3, 1), Err(SegmentError::NoSuchId(3)));
        assert_eq!(t.unlink("/a"), Ok((0, None)));
        assert_eq!(t.unlink("/a"), Err(SegmentError::NotFound("/a".into())));
        // The unlinked slot stays taken: a new segment gets the next one.
        assert_eq!(t.open(S, "/a", 0, true, true).unwrap().slot, 1);
        // ... and can still be resized through its id by ranks that map it.
        assert!(t.resize(0, 4096).is_ok());
    }

    #[test]
    fn state_round_trip_by_rank() {
        let other = SessionId(2);
        let mut t = SegmentTable::new(4, 8 * M);
        t.open(S, "/a", M, true, false).unwrap();
        t.open(other, "/a", 0, false, false).unwrap();
        let b = t.open(other, "anon:3", 4096, true, false).unwrap();
        t.open(S, "/gone", 0, true, false).unwrap();
        t.unlink("/gone").unwrap();
        let state = t.to_state(|s| Some(s.0 as u32 + 10));
        let json = serde_json::to_string(&state).unwrap();
        let back: SegmentsState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.slots[0].users, vec![11, 12]);
        let ph = |r: u32| SessionId(100 + r as u64);
        let mut r = SegmentTable::from_state(4, 8 * M, &back, ph).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.open(S, "/a", 0, false, false).unwrap().size, M);
        assert!(r.open(S, "/gone", 0, false, false).is_err());
        assert_eq!(r.reassign(ph(12), other), 2);
        assert_eq!(
            r.release(other, b.slot),
            Ok(Some(Freed {
                slot: b.slot,
                size: 4096
            }))
        );
        // The unlinked slot stays taken, by its placeholder user.
        assert_eq!(r.open(S, "/new", 0, true, false).unwrap().slot, 1);
        assert_eq!(r.session_ended(ph(11)), vec![Freed { slot: 2, size: 0 }]);
    }

    #[test]
    fn slots_are_reclaimed_when_unused() {
        let other = SessionId(2);
        let mut t = SegmentTable::new(2, 8 * M);
        // An anonymous segment goes when its last user releases it.
        let a = t.open(S, "anon:0", M, true, false).unwrap();
        assert_eq!(
            t.open(other, "anon:0", M, true, false).unwrap().slot,
            a.slot
        );
        assert_eq!(t.release(S, a.slot), Ok(None));
        assert_eq!(
            t.release(other, a.slot),
            Ok(Some(Freed {
                slot: a.slot,
                size: M
            }))
        );
        assert_eq!(t.len(), 0);
        assert!(t.open(S, "anon:0", M, true, false).unwrap().created);
        // A named one persists while it has its name ...
        let n = t.open(S, "/n", M, true, false).unwrap();
        assert_eq!(t.release(S, n.slot), Ok(None));
        assert_eq!(t.open(other, "/n", 0, false, false).unwrap().slot, n.slot);
        // ... and goes at unlink once nobody uses it, or when its last user ends.
        assert_eq!(t.unlink("/n"), Ok((n.slot, None)));
        assert_eq!(
            t.session_ended(other),
            vec![Freed {
                slot: n.slot,
                size: M
            }]
        );
        assert_eq!(t.session_ended(S), vec![Freed { slot: 0, size: M }]);
        assert_eq!(t.open(S, "/x", 0, true, false).unwrap().slot, 0);
        assert_eq!(t.release(S, 1), Err(SegmentError::NoSuchId(1)));
        // Using a slot again keeps it from being freed at unlink.
        let u = t.open(S, "/u", M, true, false).unwrap();
        assert_eq!(t.release(S, u.slot), Ok(None));
        assert!(t.use_again(S, u.slot).is_ok());
        assert_eq!(t.unlink("/u"), Ok((u.slot, None)));
        assert_eq!(
            t.release(S, u.slot),
            Ok(Some(Freed {
                slot: u.slot,
                size: M
            }))
        );
        assert!(t.use_again(S, u.slot).is_err());
    }
}
