//! Job-wide barriers and locks (`mome_barrier`, `mome_lock`/`mome_unlock`),
//! the release points of release consistency.
//!
//! On one node this table is the whole story. With several nodes it becomes
//! the manager side: local arrivals and lock requests are forwarded to the
//! node that manages the barrier or lock id, which answers with the same
//! grants; the session side (a oneshot per waiting request) stays unchanged.
//!
//! Waiters are sessions, not rank numbers (a rank that execs itself has two
//! sessions for a while), but a barrier counts distinct ranks, so that a
//! stale session of an exec'd rank cannot complete a barrier early.
//!
//! Every request carries the rank's sequence number. The table records, per
//! rank, the last request it served and its reply, at the moment it is
//! served (a lock handed over, a barrier completed), not when the session
//! gets to send the reply: a checkpoint taken in between must see the lock
//! held *and* the request served, so that the restored rank, which sends the
//! request again, gets the recorded reply instead of a second grant.
//!
//! [`SyncState`] is the serializable part (checkpoint tables): the barrier
//! date, the lock holders and the served records, by rank. Waiting requests
//! are not saved: a restored rank sends the request it waited in again.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::agent::SessionId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncError {
    #[error("lock {0} is not held by this connection")]
    NotHeld(u64),
    #[error("lock {0} is already held by this connection")]
    AlreadyHeld(u64),
}

/// The reply to a served sync request, as recorded for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncReply {
    Ok,
    BarrierDone { date: u64 },
    Error(String),
    KeyedBarrierDone { serial: bool },
    Busy,
}

/// What a `Lock` request got.
#[derive(Debug)]
pub enum LockGrant {
    Granted,
    /// Queued: the sender fires when the lock is handed over.
    Queued(oneshot::Receiver<()>),
}

/// Who sends a request: the session, its rank and the request's seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub session: SessionId,
    pub rank: u32,
    pub seq: u64,
}

#[derive(Debug)]
struct BarrierWaiter {
    caller: Caller,
    done: oneshot::Sender<u64>,
}

#[derive(Debug)]
struct KeyedWaiter {
    caller: Caller,
    done: oneshot::Sender<bool>,
}

#[derive(Debug, Default)]
struct LockState {
    holder: Option<SessionId>,
    queue: VecDeque<(Caller, oneshot::Sender<()>)>,
}

#[derive(Debug)]
pub struct SyncTable {
    nranks: u32,
    waiting: Vec<BarrierWaiter>,
    /// Date of the last barrier completed (0: none yet). A barrier's date
    /// is after the previous one's and after every arrival's date (a
    /// node's Lamport clock when its rank arrived), so that a copy of a
    /// page dated at or after it reflects every write released before it.
    barriers: u64,
    /// Latest arrival date of the barrier in progress.
    arrivals: u64,
    /// Only locks that are held; an entry goes when its last holder releases it.
    locks: HashMap<u64, LockState>,
    /// Per rank: the last request served (seq) and its reply.
    served: BTreeMap<u32, (u64, SyncReply)>,
    /// Barriers with their own participant count (process-shared pthread
    /// barriers), by id: the waiters of the current round.
    keyed: HashMap<u64, Vec<KeyedWaiter>>,
}

/// Serializable sync state, by rank.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub barriers: u64,
    /// (lock id, rank holding it).
    pub holders: Vec<(u64, u32)>,
    /// (rank, last served seq, its reply).
    pub served: Vec<(u32, u64, SyncReply)>,
}

impl SyncTable {
    pub fn new(nranks: u32) -> SyncTable {
        SyncTable {
            nranks,
            waiting: Vec::new(),
            barriers: 0,
            arrivals: 0,
            locks: HashMap::new(),
            served: BTreeMap::new(),
            keyed: HashMap::new(),
        }
    }

    /// Date of the last barrier completed.
    pub fn barriers(&self) -> u64 {
        self.barriers
    }

    /// The recorded reply when `rank` already had request `seq` served
    /// (a restored rank sending again the request it was blocked in).
    pub fn replay(&self, rank: u32, seq: u64) -> Option<SyncReply> {
        match self.served.get(&rank) {
            Some((last, reply)) if seq <= *last => Some(reply.clone()),
            _ => None,
        }
    }

    /// Forgets what `rank` was served: a new (not restored) process of the
    /// rank numbers its requests from 1 again.
    pub fn reset_rank(&mut self, rank: u32) {
        self.served.remove(&rank);
    }

    /// Records that `caller`'s request was answered with `reply`.
    pub fn record(&mut self, caller: Caller, reply: SyncReply) {
        self.served.insert(caller.rank, (caller.seq, reply));
    }

    /// `caller` reaches the barrier at `date` (its node's clock; 0 on one
    /// node); the receiver gets the barrier's date once every rank of the
    /// job has arrived.
    pub fn barrier_arrive(&mut self, caller: Caller, date: u64) -> oneshot::Receiver<u64> {
        let (done, rx) = oneshot::channel();
        self.arrivals = self.arrivals.max(date);
        self.waiting.push(BarrierWaiter { caller, done });
        let mut ranks: Vec<u32> = self.waiting.iter().map(|w| w.caller.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        if ranks.len() as u64 >= self.nranks as u64 {
            self.barriers = (self.barriers + 1).max(self.arrivals + 1);
            self.arrivals = 0;
            let date = self.barriers;
            for w in std::mem::take(&mut self.waiting) {
                self.record(w.caller, SyncReply::BarrierDone { date });
                // A waiter whose session just ended has dropped its receiver.
                let _ = w.done.send(date);
            }
        }
        rx
    }

    /// `caller` reaches barrier `id` of `count` participants; the receiver
    /// gets `serial` (true for exactly one of them, the last to arrive)
    /// once `count` arrivals were seen.
    pub fn keyed_arrive(&mut self, caller: Caller, id: u64, count: u32) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        let waiters = self.keyed.entry(id).or_default();
        waiters.push(KeyedWaiter { caller, done });
        if waiters.len() as u64 >= count.max(1) as u64 {
            let waiters = self.keyed.remove(&id).unwrap_or_default();
            let last = waiters.len() - 1;
            for (i, w) in waiters.into_iter().enumerate() {
                let serial = i == last;
                self.record(w.caller, SyncReply::KeyedBarrierDone { serial });
                let _ = w.done.send(serial);
            }
        }
        rx
    }

    /// Takes lock `id` when it is free; `Ok(false)` when another session
    /// holds it (or this one: a trylock never waits, and a non-recursive
    /// mutex locked twice is busy).
    pub fn try_lock(&mut self, caller: Caller, id: u64) -> bool {
        let state = self.locks.entry(id).or_default();
        let got = state.holder.is_none();
        if got {
            state.holder = Some(caller.session);
        }
        let reply = if got { SyncReply::Ok } else { SyncReply::Busy };
        self.record(caller, reply);
        got
    }

    pub fn lock(&mut self, caller: Caller, id: u64) -> Result<LockGrant, SyncError> {
        let state = self.locks.entry(id).or_default();
        let got = match state.holder {
            None => {
                state.holder = Some(caller.session);
                Ok(LockGrant::Granted)
            }
            Some(h) if h == caller.session => Err(SyncError::AlreadyHeld(id)),
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                state.queue.push_back((caller, tx));
                return Ok(LockGrant::Queued(rx));
            }
        };
        match &got {
            Ok(_) => self.record(caller, SyncReply::Ok),
            Err(e) => self.record(caller, SyncReply::Error(e.to_string())),
        }
        got
    }

    pub fn unlock(&mut self, caller: Caller, id: u64) -> Result<(), SyncError> {
        let result = match self.locks.get(&id) {
            Some(state) if state.holder == Some(caller.session) => {
                self.hand_over(id);
                Ok(())
            }
            _ => Err(SyncError::NotHeld(id)),
        };
        let reply = match &result {
            Ok(()) => SyncReply::Ok,
            Err(e) => SyncReply::Error(e.to_string()),
        };
        self.record(caller, reply);
        result
    }

    /// Forgets a session that ended: it leaves the barrier and the lock
    /// queues, and the locks it held go to their next waiters.
    pub fn session_ended(&mut self, session: SessionId) {
        self.waiting.retain(|w| w.caller.session != session);
        for waiters in self.keyed.values_mut() {
            waiters.retain(|w| w.caller.session != session);
        }
        self.keyed.retain(|_, w| !w.is_empty());
        let mut held = Vec::new();
        for (&id, state) in self.locks.iter_mut() {
            state.queue.retain(|(c, _)| c.session != session);
            if state.holder == Some(session) {
                held.push(id);
            }
        }
        for id in held {
            self.hand_over(id);
        }
    }

    /// Gives the locks held by `from` (a restored rank's placeholder) to
    /// `to` (its new sync session).
    pub fn reassign(&mut self, from: SessionId, to: SessionId) -> usize {
        let mut moved = 0;
        for state in self.locks.values_mut() {
            if state.holder == Some(from) {
                state.holder = Some(to);
                moved += 1;
            }
        }
        moved
    }

    /// Gives lock `id` to the first waiter still there, FIFO; removes the
    /// lock when nobody waits.
    fn hand_over(&mut self, id: u64) {
        let Some(state) = self.locks.get_mut(&id) else {
            return;
        };
        state.holder = None;
        while let Some((caller, tx)) = state.queue.pop_front() {
            // A failed send means the waiter's session is ending: skip it
            // rather than make the others wait for its cleanup.
            if tx.send(()).is_ok() {
                state.holder = Some(caller.session);
                self.served.insert(caller.rank, (caller.seq, SyncReply::Ok));
                return;
            }
        }
        self.locks.remove(&id);
    }

    /// The state to save, sessions named by their rank (`rank_of`); a
    /// holder whose rank is unknown is left out.
    pub fn to_state(&self, rank_of: impl Fn(SessionId) -> Option<u32>) -> SyncState {
        let mut holders: Vec<(u64, u32)> = self
            .locks
            .iter()
            .filter_map(|(&id, s)| s.holder.and_then(&rank_of).map(|r| (id, r)))
            .collect();
        holders.sort_unstable();
        SyncState {
            barriers: self.barriers,
            holders,
            served: self
                .served
                .iter()
                .map(|(&r, (seq, reply))| (r, *seq, reply.clone()))
                .collect(),
        }
    }

    /// A table from saved state; locks are held by `session_of(rank)` (the
    /// rank's placeholder until its sync session connects).
    pub fn from_state(
        nranks: u32,
        state: &SyncState,
        session_of: impl Fn(u32) -> SessionId,
    ) -> SyncTable {
        let mut t = SyncTable::new(nranks);
        t.barriers = state.barriers;
        for &(id, rank) in &state.holders {
            t.locks.insert(
                id,
                LockState {
                    holder: Some(session_of(rank)),
                    queue: VecDeque::new(),
                },
            );
        }
        for (rank, seq, reply) in &state.served {
            t.served.insert(*rank, (*seq, reply.clone()));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);
    const C: SessionId = SessionId(3);

    fn c(session: SessionId, rank: u32, seq: u64) -> Caller {
        Caller { session, rank, seq }
    }

    #[test]
    fn barrier_counts_ranks_and_dates() {
        let mut t = SyncTable::new(2);
        let mut a = t.barrier_arrive(c(A, 0, 1), 0);
        assert!(a.try_recv().is_err());
        // A second session of rank 0 (an exec'd image) does not complete it.
        let mut a2 = t.barrier_arrive(c(C, 0, 1), 0);
        assert!(a2.try_recv().is_err());
        t.session_ended(A);
        let mut b = t.barrier_arrive(c(B, 1, 1), 0);
        assert_eq!(b.try_recv(), Ok(1));
        assert_eq!(a2.try_recv(), Ok(1));
        let _a = t.barrier_arrive(c(A, 0, 2), 0);
        let mut b = t.barrier_arrive(c(B, 1, 2), 0);
        assert_eq!(b.try_recv(), Ok(2));
        assert_eq!(t.barriers(), 2);
    }

    #[test]
    fn locks_are_fifo_and_released_by_ending_sessions() {
        let mut t = SyncTable::new(3);
        assert!(matches!(t.lock(c(A, 0, 1), 7), Ok(LockGrant::Granted)));
        assert_eq!(t.lock(c(A, 0, 2), 7).err(), Some(SyncError::AlreadyHeld(7)));
        let Ok(LockGrant::Queued(mut b)) = t.lock(c(B, 1, 1), 7) else {
            panic!()
        };
        let Ok(LockGrant::Queued(mut cc)) = t.lock(c(C, 2, 1), 7) else {
            panic!()
        };
        assert_eq!(t.unlock(c(B, 1, 2), 7), Err(SyncError::NotHeld(7)));
        t.unlock(c(A, 0, 3), 7).unwrap();
        assert_eq!(b.try_recv(), Ok(()));
        assert!(cc.try_recv().is_err());
        t.session_ended(B);
        assert_eq!(cc.try_recv(), Ok(()));
        t.unlock(c(C, 2, 2), 7).unwrap();
        assert!(t.locks.is_empty());
        assert_eq!(t.unlock(c(C, 2, 3), 7), Err(SyncError::NotHeld(7)));
    }

    #[test]
    fn dropped_waiter_is_skipped() {
        let mut t = SyncTable::new(1);
        assert!(matches!(t.lock(c(A, 0, 1), 1), Ok(LockGrant::Granted)));
        let Ok(LockGrant::Queued(b)) = t.lock(c(B, 1, 1), 1) else {
            panic!()
        };
        let Ok(LockGrant::Queued(mut cc)) = t.lock(c(C, 2, 1), 1) else {
            panic!()
        };
        drop(b);
        t.unlock(c(A, 0, 2), 1).unwrap();
        assert_eq!(cc.try_recv(), Ok(()));
    }

    #[test]
    fn keyed_barriers_and_trylock() {
        let mut t = SyncTable::new(4);
        let mut a = t.keyed_arrive(c(A, 0, 1), 99, 3);
        let mut b = t.keyed_arrive(c(B, 1, 1), 99, 3);
        // Another barrier id does not mix with this one.
        let mut other = t.keyed_arrive(c(C, 2, 1), 100, 2);
        assert!(a.try_recv().is_err() && b.try_recv().is_err());
        let mut cc = t.keyed_arrive(c(C, 2, 2), 99, 3);
        let serials = [a.try_recv(), b.try_recv(), cc.try_recv()];
        assert_eq!(serials, [Ok(false), Ok(false), Ok(true)]);
        assert!(other.try_recv().is_err());
        t.session_ended(C);
        assert!(t.keyed.is_empty());
        assert!(t.try_lock(c(A, 0, 2), 5));
        assert!(!t.try_lock(c(B, 1, 2), 5));
        assert_eq!(t.replay(1, 2), Some(SyncReply::Busy));
        assert!(!t.try_lock(c(A, 0, 3), 5));
        t.unlock(c(A, 0, 4), 5).unwrap();
        assert!(t.try_lock(c(B, 1, 3), 5));
    }

    #[test]
    fn served_requests_replay_by_rank() {
        let mut t = SyncTable::new(2);
        assert_eq!(t.replay(0, 1), None);
        assert!(matches!(t.lock(c(A, 0, 1), 9), Ok(LockGrant::Granted)));
        // Queued, not served yet: nothing to replay.
        let Ok(LockGrant::Queued(_rx)) = t.lock(c(B, 1, 4), 9) else {
            panic!()
        };
        assert_eq!(t.replay(1, 4), None);
        // Handing over records the grant at once, before B's session replies.
        t.unlock(c(A, 0, 2), 9).unwrap();
        assert_eq!(t.replay(1, 4), Some(SyncReply::Ok));
        assert_eq!(t.replay(1, 3), Some(SyncReply::Ok));
        assert_eq!(t.replay(1, 5), None);
        let _a = t.barrier_arrive(c(A, 0, 3), 0);
        let _b = t.barrier_arrive(c(B, 1, 5), 0);
        assert_eq!(t.replay(0, 3), Some(SyncReply::BarrierDone { date: 1 }));
        assert_eq!(
            t.unlock(c(A, 0, 4), 9),
            Err(SyncError::NotHeld(9)),
            "held by B now"
        );
        assert!(matches!(t.replay(0, 4), Some(SyncReply::Error(_))));
        t.reset_rank(0);
        assert_eq!(t.replay(0, 1), None);
    }

    #[test]
    fn state_round_trip_moves_locks_to_placeholders() {
        let mut t = SyncTable::new(2);
        assert!(matches!(t.lock(c(A, 0, 1), 5), Ok(LockGrant::Granted)));
        assert!(matches!(t.lock(c(B, 1, 1), 6), Ok(LockGrant::Granted)));
        let _a = t.barrier_arrive(c(A, 0, 2), 0);
        let _b = t.barrier_arrive(c(B, 1, 2), 0);
        let rank_of = |s: SessionId| Some(if s == A { 0 } else { 1 });
        let state = t.to_state(rank_of);
        assert_eq!(state.holders, vec![(5, 0), (6, 1)]);
        let json = serde_json::to_string(&state).unwrap();
        let back: SyncState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let ph = |r: u32| SessionId(1000 + r as u64);
        let mut r = SyncTable::from_state(2, &back, ph);
        assert_eq!(r.barriers(), 1);
        assert_eq!(r.replay(1, 2), Some(SyncReply::BarrierDone { date: 1 }));
        // Rank 1's lock waits in its placeholder: others queue behind it.
        let Ok(LockGrant::Queued(mut q)) = r.lock(c(A, 0, 3), 6) else {
            panic!()
        };
        assert_eq!(r.reassign(ph(1), C), 1);
        r.unlock(c(C, 1, 3), 6).unwrap();
        assert_eq!(q.try_recv(), Ok(()));
        assert_eq!(r.to_state(|s| (s == A).then_some(0)).holders, vec![(6, 0)]);
    }
}
