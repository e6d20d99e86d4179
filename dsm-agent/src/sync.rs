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

use std::collections::{HashMap, VecDeque};

use mome_protocol::rank::ErrorCode;
use tokio::sync::oneshot;

use crate::agent::SessionId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncError {
    #[error("lock {0} is not held by this connection")]
    NotHeld(u64),
    #[error("lock {0} is already held by this connection")]
    AlreadyHeld(u64),
}

impl SyncError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Invalid
    }
}

/// What a `Lock` request got.
#[derive(Debug)]
pub enum LockGrant {
    Granted,
    /// Queued: the sender fires when the lock is handed over.
    Queued(oneshot::Receiver<()>),
}

#[derive(Debug)]
struct BarrierWaiter {
    session: SessionId,
    rank: u32,
    done: oneshot::Sender<u64>,
}

#[derive(Debug, Default)]
struct LockState {
    holder: Option<SessionId>,
    queue: VecDeque<(SessionId, oneshot::Sender<()>)>,
}

#[derive(Debug)]
pub struct SyncTable {
    nranks: u32,
    waiting: Vec<BarrierWaiter>,
    /// Barriers completed so far: the date returned by the next one is this + 1.
    barriers: u64,
    /// Only locks that are held; an entry goes when its last holder releases it.
    locks: HashMap<u64, LockState>,
}

impl SyncTable {
    pub fn new(nranks: u32) -> SyncTable {
        SyncTable {
            nranks,
            waiting: Vec::new(),
            barriers: 0,
            locks: HashMap::new(),
        }
    }

    /// Barriers completed so far.
    pub fn barriers(&self) -> u64 {
        self.barriers
    }

    /// `session` (of `rank`) reaches the barrier; the receiver gets the
    /// barrier's date once every rank of the job has arrived.
    pub fn barrier_arrive(&mut self, session: SessionId, rank: u32) -> oneshot::Receiver<u64> {
        let (done, rx) = oneshot::channel();
        self.waiting.push(BarrierWaiter {
            session,
            rank,
            done,
        });
        let mut ranks: Vec<u32> = self.waiting.iter().map(|w| w.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        if ranks.len() as u64 >= self.nranks as u64 {
            self.barriers += 1;
            for w in self.waiting.drain(..) {
                // A waiter whose session just ended has dropped its receiver.
                let _ = w.done.send(self.barriers);
            }
        }
        rx
    }

    pub fn lock(&mut self, session: SessionId, id: u64) -> Result<LockGrant, SyncError> {
        let state = self.locks.entry(id).or_default();
        match state.holder {
            None => {
                state.holder = Some(session);
                Ok(LockGrant::Granted)
            }
            Some(h) if h == session => Err(SyncError::AlreadyHeld(id)),
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                state.queue.push_back((session, tx));
                Ok(LockGrant::Queued(rx))
            }
        }
    }

    pub fn unlock(&mut self, session: SessionId, id: u64) -> Result<(), SyncError> {
        match self.locks.get(&id) {
            Some(state) if state.holder == Some(session) => {
                self.hand_over(id);
                Ok(())
            }
            _ => Err(SyncError::NotHeld(id)),
        }
    }

    /// Forgets a session that ended: it leaves the barrier and the lock
    /// queues, and the locks it held go to their next waiters.
    pub fn session_ended(&mut self, session: SessionId) {
        self.waiting.retain(|w| w.session != session);
        let mut held = Vec::new();
        for (&id, state) in self.locks.iter_mut() {
            state.queue.retain(|(s, _)| *s != session);
            if state.holder == Some(session) {
                held.push(id);
            }
        }
        for id in held {
            self.hand_over(id);
        }
    }

    /// Gives lock `id` to the first waiter still there, FIFO; removes the
    /// lock when nobody waits.
    fn hand_over(&mut self, id: u64) {
        let Some(state) = self.locks.get_mut(&id) else {
            return;
        };
        state.holder = None;
        while let Some((session, tx)) = state.queue.pop_front() {
            // A failed send means the waiter's session is ending: skip it
            // rather than make the others wait for its cleanup.
            if tx.send(()).is_ok() {
                state.holder = Some(session);
                return;
            }
        }
        self.locks.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);
    const C: SessionId = SessionId(3);

    #[test]
    fn barrier_counts_ranks_and_dates() {
        let mut t = SyncTable::new(2);
        let mut a = t.barrier_arrive(A, 0);
        assert!(a.try_recv().is_err());
        // A second session of rank 0 (an exec'd image) does not complete it.
        let mut a2 = t.barrier_arrive(C, 0);
        assert!(a2.try_recv().is_err());
        t.session_ended(A);
        let mut b = t.barrier_arrive(B, 1);
        assert_eq!(b.try_recv(), Ok(1));
        assert_eq!(a2.try_recv(), Ok(1));
        let _a = t.barrier_arrive(A, 0);
        let mut b = t.barrier_arrive(B, 1);
        assert_eq!(b.try_recv(), Ok(2));
        assert_eq!(t.barriers(), 2);
    }

    #[test]
    fn locks_are_fifo_and_released_by_ending_sessions() {
        let mut t = SyncTable::new(3);
        assert!(matches!(t.lock(A, 7), Ok(LockGrant::Granted)));
        assert_eq!(t.lock(A, 7).err(), Some(SyncError::AlreadyHeld(7)));
        let Ok(LockGrant::Queued(mut b)) = t.lock(B, 7) else {
            panic!()
        };
        let Ok(LockGrant::Queued(mut c)) = t.lock(C, 7) else {
            panic!()
        };
        assert_eq!(t.unlock(B, 7), Err(SyncError::NotHeld(7)));
        t.unlock(A, 7).unwrap();
        assert_eq!(b.try_recv(), Ok(()));
        assert!(c.try_recv().is_err());
        t.session_ended(B);
        assert_eq!(c.try_recv(), Ok(()));
        t.unlock(C, 7).unwrap();
        assert!(t.locks.is_empty());
        assert_eq!(t.unlock(C, 7), Err(SyncError::NotHeld(7)));
    }

    #[test]
    fn dropped_waiter_is_skipped() {
        let mut t = SyncTable::new(1);
        assert!(matches!(t.lock(A, 1), Ok(LockGrant::Granted)));
        let Ok(LockGrant::Queued(b)) = t.lock(B, 1) else {
            panic!()
        };
        let Ok(LockGrant::Queued(mut c)) = t.lock(C, 1) else {
            panic!()
        };
        drop(b);
        t.unlock(A, 1).unwrap();
        assert_eq!(c.try_recv(), Ok(()));
    }
}
