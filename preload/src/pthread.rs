//! Process-shared pthread mutexes and barriers across nodes.
//!
//! On one node every rank maps the same memfd pages, so a process-shared
//! `pthread_mutex_t` or `pthread_barrier_t` placed in a shared segment works
//! as glibc made it: its atomics and futexes act on the same physical page.
//! Across nodes they cannot: a futex wait on one node is never woken by an
//! unlock on another, and spinning on the lock word would make its page
//! travel between nodes at every attempt. So when the job has more than one
//! node, this file owns the pthread functions below for objects whose
//! address lies in the window's shared zone, and maps them to the agent's
//! job-wide locks and barriers over the sync channel (`api::sync_call`),
//! named `PTHREAD_ID_BIT | address`. Everything else (one node, private
//! memory, outside the window, native mode, a forked child) goes to glibc
//! unchanged, found with dlsym(RTLD_NEXT) on first use.
//!
//! Mutexes (`lock`, `trylock`, `timedlock`, `clocklock`, `unlock`,
//! `destroy`): the object's bytes stay glibc's, written by glibc's
//! `pthread_mutex_init` (not interposed); they are only read, for the
//! mutex type, when a thread locks a mutex it already holds. The lock word
//! itself is never used across nodes: mixing glibc's lock and the
//! distributed one on the same object would exclude nothing.
//! - The agent knows locks by rank (one sync session per rank), not by
//!   thread, so the rank keeps a table of the distributed mutexes it holds
//!   (`HELD`): a thread waits for another thread of its rank here, and the
//!   table answers recursive locking (a recursive mutex counts here; an
//!   error-checking one gives EDEADLK / EPERM as glibc does; a normal one
//!   locked again by its owner gives EDEADLK with a report line rather than
//!   hanging forever).
//! - `timedlock` and `clocklock` poll with `TryLock` (1 ms, doubling up to
//!   32 ms) until the deadline: the agent has no timed lock, and a waiter
//!   that left the queue at its deadline could not be told apart from one
//!   that got the lock as the reply crossed. Under contention they are less
//!   fair than `lock`, which queues FIFO at the agent.
//! - Robust mutexes: a lock whose holder dies goes to the next waiter with
//!   an ordinary success, never EOWNERDEAD. Priority inheritance and
//!   protection do not apply across nodes.
//!
//! Barriers (`init`, `wait`, `destroy`): the object's bytes are this file's
//! (32 bytes on x86_64): `init` writes a header, `BARRIER_MAGIC` and the
//! count, and `wait` sends `KeyedBarrier { id, count }` to the agent, which
//! answers when `count` arrivals were seen, `serial` for exactly one of
//! them (PTHREAD_BARRIER_SERIAL_THREAD). A barrier not initialised here
//! (no magic) is refused with EINVAL and a report line. A forked child
//! (not a rank) cannot take part in such a barrier: it gets EINVAL too,
//! rather than glibc reading bytes that are not glibc's.
//!
//! Limitations across nodes:
//! - A rank's threads share its one sync channel, which carries one request
//!   at a time: a thread waiting for a lock or barrier holds up the others'
//!   lock, unlock and barrier requests until it is served. A barrier whose
//!   participants include several threads of one rank, or a thread that
//!   must unlock so that another rank can release what a second thread of
//!   the same rank waits for, deadlocks.
//! - `pthread_cond_*`, `pthread_rwlock_*`, `sem_*` and `pthread_spin_*` are
//!   left to glibc: a process-shared condition variable, rwlock or
//!   semaphore in the shared zone does not work across nodes (futex waits
//!   do not cross nodes), and `pthread_cond_wait` with a mutex handled here
//!   would unlock and relock glibc's lock word, not the distributed lock.
//!   Spin locks are correct but slow (the page moves at every attempt).
//! - Objects in a view of a segment outside the window (`MomeMMap` with
//!   MAP_FIXED, e.g. over a Fortran COMMON block) are left to glibc.
//! - A forked child's mutex operations go to glibc: they do not exclude the
//!   ranks, which use the distributed lock.

use core::ffi::{c_int, c_uint, c_void, CStr};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use mome_protocol::rank::{AgentReply, ErrorCode, RankRequest, PTHREAD_ID_BIT};

use crate::api::{sync_call, sync_call_any};
use crate::lock::FutexLock;
use crate::report;
use crate::state::{self, Mode};

// ---- glibc's definitions ----

static MUTEX_LOCK: AtomicUsize = AtomicUsize::new(0);
static MUTEX_TRYLOCK: AtomicUsize = AtomicUsize::new(0);
static MUTEX_TIMEDLOCK: AtomicUsize = AtomicUsize::new(0);
static MUTEX_CLOCKLOCK: AtomicUsize = AtomicUsize::new(0);
static MUTEX_UNLOCK: AtomicUsize = AtomicUsize::new(0);
static MUTEX_DESTROY: AtomicUsize = AtomicUsize::new(0);
static BARRIER_INIT: AtomicUsize = AtomicUsize::new(0);
static BARRIER_WAIT: AtomicUsize = AtomicUsize::new(0);
static BARRIER_DESTROY: AtomicUsize = AtomicUsize::new(0);

/// glibc's definition of `name`, resolved on first use: these functions
/// may be called before the library's constructor (by another library's)
/// and in processes that never become ranks.
fn next(slot: &AtomicUsize, name: &CStr) -> usize {
    let f = slot.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name. Two threads
    // racing here store the same value.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(f, Ordering::Relaxed);
    f
}

/// Calls glibc's `$name` through `$slot`; ENOSYS when it has none.
macro_rules! real {
    ($slot:expr, $name:expr, fn($($t:ty),*), $($a:expr),*) => {{
        match next(&$slot, $name) {
            0 => libc::ENOSYS,
            f => {
                // SAFETY: the slot holds glibc's function of this name,
                // whose C signature is exactly this one.
                let f: unsafe extern "C" fn($($t),*) -> c_int =
                    unsafe { core::mem::transmute(f) };
                // SAFETY: forwarding the caller's arguments unchanged.
                unsafe { f($($a),*) }
            }
        }
    }};
}

// ---- which objects are distributed ----

/// Whether `addr` is in the shared zone of a job with several nodes (in a
/// rank or in a forked child of one).
fn in_multi_node_shared_zone(addr: u64) -> bool {
    state::info()
        .is_some_and(|i| i.nodes > 1 && addr >= i.layout.shared_base() && addr < i.layout.end())
}

/// Whether the object at `addr` is handled here: a rank of a job with
/// several nodes, the object in the shared zone.
fn distributed(addr: *const c_void) -> bool {
    state::mode() == Mode::Rank && in_multi_node_shared_zone(addr as u64)
}

fn id_of(addr: *const c_void) -> u64 {
    PTHREAD_ID_BIT | addr as u64
}

fn gettid() -> i32 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

// ---- mutexes ----

/// Offset of `__kind` in glibc's `struct __pthread_mutex_s` on x86_64
/// (public ABI, <bits/struct_mutex.h>); its two low bits are the type.
const MUTEX_KIND_OFFSET: usize = 16;
const KIND_TYPE_MASK: i32 = 3;

fn mutex_type(m: *const c_void) -> i32 {
    // SAFETY: `m` is a caller's initialised pthread_mutex_t (40 bytes,
    // 8-aligned); glibc writes `__kind` at init and only reads it after.
    let kind =
        unsafe { core::ptr::read_volatile(m.cast::<u8>().add(MUTEX_KIND_OFFSET).cast::<i32>()) };
    kind & KIND_TYPE_MASK
}

/// A distributed mutex the rank holds (or is taking, or releasing).
#[derive(Clone, Copy)]
struct Held {
    /// The mutex's address; 0 for a free slot.
    addr: u64,
    /// The thread holding it.
    owner: i32,
    /// Recursive locks by `owner` (1 once taken).
    count: u32,
}

const FREE: Held = Held {
    addr: 0,
    owner: 0,
    count: 0,
};

/// How many distributed mutexes one rank may hold at once; a fixed table
/// because it is used with no allocation (this library is the allocator).
const MAX_HELD: usize = 256;

/// The rank's distributed mutexes, by its threads. An entry exists from
/// before the `Lock` request is sent until the `Unlock` reply came back,
/// so that two threads of the rank never send requests for the same lock
/// (the agent would see the rank lock a lock it holds).
static HELD: FutexLock<[Held; MAX_HELD]> = FutexLock::new([FREE; MAX_HELD]);
/// Bumped when an entry is removed; threads waiting for a mutex another
/// thread of the rank holds wait on it (FUTEX_WAIT).
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// Threads waiting on `RELEASED`: the common single-thread case skips the
/// wake syscall.
static WAITERS: AtomicU32 = AtomicU32::new(0);

fn find(table: &mut [Held; MAX_HELD], addr: u64) -> Option<&mut Held> {
    table.iter_mut().find(|h| h.addr == addr)
}

/// Removes the entry of `addr` and wakes the rank's threads waiting for it.
fn forget(addr: u64) {
    {
        let mut t = HELD.lock();
        if let Some(h) = find(&mut t, addr) {
            *h = FREE;
        }
        RELEASED.fetch_add(1, Ordering::Release);
    }
    if WAITERS.load(Ordering::Acquire) > 0 {
        // SAFETY: futex wake on our own atomic word.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                RELEASED.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    /// pthread_mutex_lock: wait as long as it takes.
    Wait,
    /// pthread_mutex_trylock: EBUSY rather than wait.
    Try,
}

/// Takes distributed mutex `m` for the calling thread.
fn acquire(m: *mut c_void, how: How) -> c_int {
    let addr = m as u64;
    let me = gettid();
    loop {
        let mut t = HELD.lock();
        match find(&mut t, addr) {
            Some(h) if h.owner == me => {
                return match (mutex_type(m), how) {
                    (libc::PTHREAD_MUTEX_RECURSIVE, _) => match h.count.checked_add(1) {
                        Some(c) => {
                            h.count = c;
                            0
                        }
                        None => libc::EAGAIN,
                    },
                    (_, How::Try) => libc::EBUSY,
                    (libc::PTHREAD_MUTEX_ERRORCHECK, How::Wait) => libc::EDEADLK,
                    (_, How::Wait) => {
                        // glibc would hang this thread forever.
                        drop(t);
                        report!(
                            "pthread_mutex_lock({:#x}): the calling thread already holds this \
                             non-recursive mutex: EDEADLK",
                            addr
                        );
                        libc::EDEADLK
                    }
                };
            }
            Some(_) if how == How::Try => return libc::EBUSY,
            Some(_) => {
                // Another thread of this rank has it: wait until it gives
                // it back, then queue at the agent like any rank.
                let seen = RELEASED.load(Ordering::Acquire);
                WAITERS.fetch_add(1, Ordering::AcqRel);
                drop(t);
                // SAFETY: futex wait on our own atomic word while it still
                // reads `seen` (a release after the load above changed it).
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        RELEASED.as_ptr(),
                        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                        seen,
                        core::ptr::null::<libc::timespec>(),
                    )
                };
                WAITERS.fetch_sub(1, Ordering::AcqRel);
            }
            None => {
                let Some(slot) = t.iter_mut().find(|h| h.addr == 0) else {
                    drop(t);
                    report!(
                        "pthread mutex {:#x}: this rank already holds {} distributed mutexes: EAGAIN",
                        addr,
                        MAX_HELD
                    );
                    return libc::EAGAIN;
                };
                *slot = Held {
                    addr,
                    owner: me,
                    count: 1,
                };
                break;
            }
        }
    }
    let id = id_of(m);
    let r = match how {
        How::Wait => sync_call(
            move |seq| RankRequest::Lock { id, seq },
            "pthread_mutex_lock",
            |r| match r {
                AgentReply::Ok => 0,
                _ => libc::EIO,
            },
        ),
        How::Try => sync_call_any(
            move |seq| RankRequest::TryLock { id, seq },
            "pthread_mutex_trylock",
            |r| match r {
                AgentReply::Ok => 0,
                AgentReply::Error {
                    code: ErrorCode::Busy,
                    ..
                } => libc::EBUSY,
                AgentReply::Error { code, message } => {
                    report!("pthread_mutex_trylock({:#x}) refused: {}", addr, message);
                    code.errno()
                }
                _ => libc::EIO,
            },
        ),
    };
    if r != 0 {
        forget(addr);
    }
    r
}

/// Gives distributed mutex `m` back.
fn release(m: *mut c_void) -> c_int {
    let addr = m as u64;
    let me = gettid();
    {
        let mut t = HELD.lock();
        match find(&mut t, addr) {
            Some(h) if h.owner == me && h.count > 1 => {
                h.count -= 1;
                return 0;
            }
            Some(h) if h.owner == me => {}
            Some(_) => {
                // Held by another thread of the rank: glibc refuses that for
                // the checking types and lets it through for the others.
                if matches!(
                    mutex_type(m),
                    libc::PTHREAD_MUTEX_RECURSIVE | libc::PTHREAD_MUTEX_ERRORCHECK
                ) {
                    return libc::EPERM;
                }
            }
            None => {
                drop(t);
                // EPERM is the checking types' documented answer; for the
                // others glibc would silently unlock: say so.
                if !matches!(
                    mutex_type(m),
                    libc::PTHREAD_MUTEX_RECURSIVE | libc::PTHREAD_MUTEX_ERRORCHECK
                ) {
                    report!(
                        "pthread_mutex_unlock({:#x}): this rank does not hold the mutex: EPERM",
                        addr
                    );
                }
                return libc::EPERM;
            }
        }
    }
    // The entry stays until the agent confirms, so that no other thread of
    // the rank sends a Lock for it meanwhile.
    let id = id_of(m);
    let r = sync_call(
        move |seq| RankRequest::Unlock { id, seq },
        "pthread_mutex_unlock",
        |r| match r {
            AgentReply::Ok => 0,
            _ => libc::EIO,
        },
    );
    forget(addr);
    r
}

/// Clock time now.
fn now(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; the clock was validated.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

/// Nanoseconds from `now` to `deadline` (0 when passed).
fn remaining_ns(now: &libc::timespec, deadline: &libc::timespec) -> u64 {
    let ns = |t: &libc::timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
    (ns(deadline) - ns(now)).clamp(0, u64::MAX as i128) as u64
}

const POLL_FIRST_NS: u64 = 1_000_000;
const POLL_MAX_NS: u64 = 32_000_000;

/// pthread_mutex_timedlock / clocklock on a distributed mutex: TryLock
/// until it succeeds or `abstime` (on `clock`) passes.
fn acquire_until(m: *mut c_void, clock: libc::clockid_t, abstime: *const libc::timespec) -> c_int {
    if clock != libc::CLOCK_REALTIME && clock != libc::CLOCK_MONOTONIC {
        return libc::EINVAL;
    }
    // An error-checking mutex its owner locks again fails at once, as in
    // glibc; any other busy case (a normal mutex included) waits for the
    // deadline.
    let me = gettid();
    let mine = HELD
        .lock()
        .iter()
        .any(|h| h.addr == m as u64 && h.owner == me);
    if mine && mutex_type(m) == libc::PTHREAD_MUTEX_ERRORCHECK {
        return libc::EDEADLK;
    }
    let mut pause = POLL_FIRST_NS;
    loop {
        let r = acquire(m, How::Try);
        if r != libc::EBUSY {
            return r;
        }
        // glibc checks the deadline only when it has to wait: so here.
        if abstime.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a non-null timespec pointer from the caller.
        let deadline = unsafe { *abstime };
        if !(0..1_000_000_000).contains(&deadline.tv_nsec) {
            return libc::EINVAL;
        }
        let left = remaining_ns(&now(clock), &deadline);
        if left == 0 {
            return libc::ETIMEDOUT;
        }
        let nap = pause.min(left);
        let ts = libc::timespec {
            tv_sec: (nap / 1_000_000_000) as libc::time_t,
            tv_nsec: (nap % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: a relative sleep on our own timespec; EINTR just polls
        // again early.
        unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, core::ptr::null_mut()) };
        pause = (pause * 2).min(POLL_MAX_NS);
    }
}

/// # Safety
/// Same contract as glibc's pthread_mutex_lock.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_lock(m: *mut c_void) -> c_int {
    if distributed(m) {
        return acquire(m, How::Wait);
    }
    real!(MUTEX_LOCK, c"pthread_mutex_lock", fn(*mut c_void), m)
}

/// # Safety
/// Same contract as glibc's pthread_mutex_trylock.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_trylock(m: *mut c_void) -> c_int {
    if distributed(m) {
        return acquire(m, How::Try);
    }
    real!(MUTEX_TRYLOCK, c"pthread_mutex_trylock", fn(*mut c_void), m)
}

/// # Safety
/// Same contract as glibc's pthread_mutex_timedlock.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_timedlock(
    m: *mut c_void,
    abstime: *const libc::timespec,
) -> c_int {
    if distributed(m) {
        return acquire_until(m, libc::CLOCK_REALTIME, abstime);
    }
    real!(
        MUTEX_TIMEDLOCK,
        c"pthread_mutex_timedlock",
        fn(*mut c_void, *const libc::timespec),
        m,
        abstime
    )
}

/// # Safety
/// Same contract as glibc's pthread_mutex_clocklock.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_clocklock(
    m: *mut c_void,
    clock: libc::clockid_t,
    abstime: *const libc::timespec,
) -> c_int {
    if distributed(m) {
        return acquire_until(m, clock, abstime);
    }
    real!(
        MUTEX_CLOCKLOCK,
        c"pthread_mutex_clocklock",
        fn(*mut c_void, libc::clockid_t, *const libc::timespec),
        m,
        clock,
        abstime
    )
}

/// # Safety
/// Same contract as glibc's pthread_mutex_unlock.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_unlock(m: *mut c_void) -> c_int {
    if distributed(m) {
        return release(m);
    }
    real!(MUTEX_UNLOCK, c"pthread_mutex_unlock", fn(*mut c_void), m)
}

/// glibc's, except that a distributed mutex this rank holds is busy: glibc
/// cannot see it, its own lock word being unused.
///
/// # Safety
/// Same contract as glibc's pthread_mutex_destroy.
#[no_mangle]
pub unsafe extern "C" fn pthread_mutex_destroy(m: *mut c_void) -> c_int {
    if distributed(m) && HELD.lock().iter().any(|h| h.addr == m as u64) {
        return libc::EBUSY;
    }
    real!(MUTEX_DESTROY, c"pthread_mutex_destroy", fn(*mut c_void), m)
}

// ---- barriers ----

/// First word of a barrier initialised here ("momebarr").
const BARRIER_MAGIC: u64 = u64::from_le_bytes(*b"momebarr");
/// sizeof(pthread_barrier_t) on x86_64.
const BARRIER_SIZE: usize = 32;

/// The start of a barrier initialised here; the rest of the object is zero.
#[repr(C)]
struct BarrierHeader {
    magic: u64,
    count: u32,
}

/// The count of the barrier at `b`, or None when it has no magic.
fn barrier_count(b: *const c_void) -> Option<u32> {
    let h = b.cast::<BarrierHeader>();
    // SAFETY: `b` is the caller's pthread_barrier_t (32 bytes, 8-aligned).
    // Plain volatile reads: the DSM keeps the page coherent, and the
    // program orders init before any wait (POSIX requires it).
    let (magic, count) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*h).magic)),
            core::ptr::read_volatile(core::ptr::addr_of!((*h).count)),
        )
    };
    (magic == BARRIER_MAGIC).then_some(count)
}

/// # Safety
/// Same contract as glibc's pthread_barrier_init.
#[no_mangle]
pub unsafe extern "C" fn pthread_barrier_init(
    b: *mut c_void,
    attr: *const c_void,
    count: c_uint,
) -> c_int {
    if !distributed(b) {
        return real!(
            BARRIER_INIT,
            c"pthread_barrier_init",
            fn(*mut c_void, *const c_void, c_uint),
            b,
            attr,
            count
        );
    }
    if count == 0 {
        return libc::EINVAL;
    }
    // The attribute (process-shared or not) changes nothing: the barrier
    // is the agent's either way.
    // SAFETY: the caller's 32-byte object, ours from now on: zeroed, the
    // count written before the magic, so that a reader that sees the magic
    // sees the count.
    unsafe {
        core::ptr::write_bytes(b.cast::<u8>(), 0, BARRIER_SIZE);
        let h = b.cast::<BarrierHeader>();
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*h).count), count);
        core::sync::atomic::fence(Ordering::Release);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*h).magic), BARRIER_MAGIC);
    }
    0
}

/// A barrier this file initialised, used by a process that is not a rank.
fn child_barrier(b: *const c_void, what: &str) -> bool {
    if state::mode() == Mode::Detached
        && in_multi_node_shared_zone(b as u64)
        && barrier_count(b).is_some()
    {
        report!(
            "{}({:#x}): a forked child is not a rank of the job and cannot use a \
             barrier shared across nodes: EINVAL",
            what,
            b as u64
        );
        return true;
    }
    false
}

/// # Safety
/// Same contract as glibc's pthread_barrier_wait.
#[no_mangle]
pub unsafe extern "C" fn pthread_barrier_wait(b: *mut c_void) -> c_int {
    if !distributed(b) {
        if child_barrier(b, "pthread_barrier_wait") {
            return libc::EINVAL;
        }
        return real!(BARRIER_WAIT, c"pthread_barrier_wait", fn(*mut c_void), b);
    }
    let Some(count) = barrier_count(b) else {
        report!(
            "pthread_barrier_wait({:#x}): not a barrier initialised by pthread_barrier_init \
             in this job: EINVAL",
            b as u64
        );
        return libc::EINVAL;
    };
    let id = id_of(b);
    sync_call(
        move |seq| RankRequest::KeyedBarrier { id, count, seq },
        "pthread_barrier_wait",
        |r| match r {
            AgentReply::KeyedBarrierDone { serial: true } => libc::PTHREAD_BARRIER_SERIAL_THREAD,
            AgentReply::KeyedBarrierDone { serial: false } => 0,
            _ => libc::EIO,
        },
    )
}

/// # Safety
/// Same contract as glibc's pthread_barrier_destroy.
#[no_mangle]
pub unsafe extern "C" fn pthread_barrier_destroy(b: *mut c_void) -> c_int {
    if !distributed(b) {
        if child_barrier(b, "pthread_barrier_destroy") {
            return libc::EINVAL;
        }
        return real!(
            BARRIER_DESTROY,
            c"pthread_barrier_destroy",
            fn(*mut c_void),
            b
        );
    }
    if barrier_count(b).is_none() {
        report!(
            "pthread_barrier_destroy({:#x}): not a barrier initialised by \
             pthread_barrier_init in this job: EINVAL",
            b as u64
        );
        return libc::EINVAL;
    }
    // Waiters are in the agent, not in the object: clearing the magic is
    // all there is to undo.
    // SAFETY: the caller's barrier, initialised here (magic checked).
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!((*b.cast::<BarrierHeader>()).magic),
            0,
        )
    };
    0
}
