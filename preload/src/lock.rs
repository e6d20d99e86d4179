//! A futex mutex that needs no allocation and no initialisation beyond zero,
//! so it can guard the allocator itself and be reset in a forked child.
//!
//! Written by hand: std's Mutex cannot be reset after fork (a child inherits
//! it in whatever state another thread left it) and may not be used from a
//! malloc that std itself calls.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

pub struct FutexLock<T> {
    state: AtomicU32, // 0 free, 1 locked, 2 locked with waiters
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `state`.
unsafe impl<T: Send> Sync for FutexLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for FutexLock<T> {}

pub struct Guard<'a, T> {
    lock: &'a FutexLock<T>,
}

impl<T> FutexLock<T> {
    pub const fn new(value: T) -> Self {
        FutexLock {
            state: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> Guard<'_, T> {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        Guard { lock: self }
    }

    /// The lock if it is free, without waiting (for the checkpoint signal
    /// handler, which must not wait for the code it interrupted).
    pub fn try_lock(&self) -> Option<Guard<'_, T>> {
        self.state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(Guard { lock: self })
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0;
        loop {
            if self.state.swap(2, Ordering::Acquire) == 0 {
                return;
            }
            if spins < 40 {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            // SAFETY: futex wait on our own atomic word while it equals 2.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    2u32,
                    core::ptr::null::<libc::timespec>(),
                );
            }
        }
    }

    fn unlock(&self) {
        if self.state.swap(0, Ordering::Release) == 2 {
            // SAFETY: futex wake on our own atomic word.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                )
            };
        }
    }

    /// Takes the lock and forgets the guard: for fork's prepare handler,
    /// which releases it in `force_unlock` (parent) or `reset` (child).
    pub fn lock_for_fork(&self) {
        core::mem::forget(self.lock());
    }

    /// Releases a lock taken with `lock_for_fork`.
    pub fn force_unlock(&self) {
        self.unlock();
    }

    /// The value, without taking the lock.
    ///
    /// # Safety
    /// The caller must hold the lock (taken with `lock_for_fork`).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_unchecked(&self) -> &mut T {
        // SAFETY: guaranteed by the caller.
        unsafe { &mut *self.value.get() }
    }

    /// In a forked child only one thread exists: the lock is free whatever
    /// state the parent's threads left it in.
    pub fn reset(&self) {
        self.state.store(0, Ordering::Relaxed);
    }
}

impl<T> core::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves the lock is held.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> core::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves the lock is held, exclusively.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

/// A mutex on a word of memory shared by several processes (a page of the
/// node's memory file): the futex calls are process-shared (no
/// FUTEX_PRIVATE_FLAG, which keys the wait on the address space and so
/// never wakes another process). The word starts at 0 (free), as fresh
/// window memory does, and needs no initialisation.
pub struct SharedLock<'a> {
    word: &'a AtomicU32,
}

/// How long one futex wait lasts before the lock word is looked at again
/// (a holder on another node's page can only release through a page fault,
/// which wakes nobody here).
const SHARED_WAIT_NS: i64 = 50_000_000;

impl<'a> SharedLock<'a> {
    /// Takes the lock on `word`; released when the guard drops.
    pub fn lock(word: &'a AtomicU32) -> SharedLock<'a> {
        if word
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            Self::contended(word);
        }
        SharedLock { word }
    }

    #[cold]
    fn contended(word: &AtomicU32) {
        let mut spins = 0;
        loop {
            if word.swap(2, Ordering::Acquire) == 0 {
                return;
            }
            if spins < 100 {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: SHARED_WAIT_NS,
            };
            // SAFETY: futex wait on the shared word while it equals 2; the
            // timeout bounds the wait if a wake is ever missed.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAIT,
                    2u32,
                    &ts as *const libc::timespec,
                );
            }
        }
    }
}

impl SharedLock<'_> {
    /// Releases the lock on `word`, taken by a guard that was forgotten
    /// (fork's prepare handler holds it across the fork).
    pub fn unlock(word: &AtomicU32) {
        if word.swap(0, Ordering::Release) == 2 {
            // SAFETY: futex wake on the shared word.
            unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
        }
    }
}

impl Drop for SharedLock<'_> {
    fn drop(&mut self) {
        SharedLock::unlock(self.word);
    }
}
