//! The C API of preload/include/mome.h and its Fortran 77 bindings.
//!
//! Barriers and locks go to the agent over the rank's sync channel, opened on
//! first use, because they may wait for other ranks for as long as it takes
//! and must not hold up the memory channel (a heap request of another thread).

use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};

use mome_protocol::peer::Model;
use mome_protocol::rank::{AgentReply, Channel as ChannelKind, RankRequest};
use mome_protocol::PROTOCOL_VERSION;

use crate::agent::{Channel, REPLY_BUF};
use crate::state::{self, Mode};
use crate::{ckpt, report, segments, sys};

static LAST_BARRIER: AtomicU64 = AtomicU64::new(0);

/// Calls the agent on the sync channel, connecting it first if needed.
///
/// The checkpoint signal is blocked throughout, except while waiting for
/// the reply: a checkpoint then finds the request sent (SYNC_PHASE 1, its
/// bytes kept) and a restored rank sends it again on its new connection.
///
/// An `Error` reply is reported and returned as its errno; `f` sees the
/// other replies.
pub(crate) fn sync_call(
    req: impl FnOnce(u64) -> RankRequest<'static>,
    what: &'static str,
    f: impl FnOnce(AgentReply<'_>) -> i32,
) -> i32 {
    sync_call_any(req, what, |reply| match reply {
        AgentReply::Error { code, message } => {
            let rank = state::info().map_or(0, |i| i.rank);
            report!("rank {}: {} refused: {}", rank, what, message);
            code.errno()
        }
        reply => f(reply),
    })
}

/// `sync_call` for requests where an `Error` reply is an ordinary answer
/// (a `TryLock` of a busy lock): `f` sees every reply, errors included,
/// and nothing is reported.
pub(crate) fn sync_call_any(
    req: impl FnOnce(u64) -> RankRequest<'static>,
    what: &'static str,
    f: impl FnOnce(AgentReply<'_>) -> i32,
) -> i32 {
    let mask = ckpt::block();
    let r = sync_call_blocked(req, what, f, mask);
    ckpt::unblock(mask);
    r
}

fn sync_call_blocked(
    req: impl FnOnce(u64) -> RankRequest<'static>,
    what: &'static str,
    f: impl FnOnce(AgentReply<'_>) -> i32,
    mask: u64,
) -> i32 {
    let Some(info) = state::info() else {
        return libc::ENOTCONN;
    };
    if state::mode() != Mode::Rank {
        // A forked child is not a rank of the job.
        return libc::EPERM;
    }
    let mut guard = state::SYNC.lock();
    if guard.is_none() {
        let ch = match Channel::connect(info.socket, info.timeout_ms) {
            Ok(c) => c,
            Err(e) => {
                report!("rank {}: cannot open the sync channel: {}", info.rank, e);
                return libc::EIO;
            }
        };
        let hello = RankRequest::Hello {
            protocol: PROTOCOL_VERSION,
            rank: info.rank,
            pid: info.pid,
            channel: ChannelKind::Sync,
            jobid: info.jobid,
            restoring: false,
        };
        let mut buf = [0u8; REPLY_BUF];
        match ch.call(&hello, None, &mut buf, "Hello (sync)", false) {
            Ok((AgentReply::Welcome { .. }, fd)) => {
                if let Some(fd) = fd {
                    sys::close(fd);
                }
            }
            Ok(_) => {
                report!("rank {}: the agent refused the sync channel", info.rank);
                return libc::EIO;
            }
            Err(e) => {
                report!("rank {}: opening the sync channel: {}", info.rank, e);
                return libc::EIO;
            }
        }
        state::SYNC_FD.store(ch.fd(), Ordering::Relaxed);
        *guard = Some(ch);
    }
    let ch = guard.as_ref().expect("connected above");
    let seq = ckpt::SYNC_SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    // SAFETY: the request buffer is only written here, with the sync lock
    // held and the checkpoint signal blocked.
    let frame = unsafe { &mut *core::ptr::addr_of_mut!(ckpt::SYNC_REQUEST) };
    let Ok(len) = mome_protocol::frame::encode(&req(seq), frame) else {
        return libc::EINVAL;
    };
    ckpt::SYNC_REQUEST_LEN.store(len as u32, Ordering::Relaxed);
    if let Err(e) = ch.send_bytes(&frame[..len], None) {
        report!("rank {}: {} failed: {}", info.rank, what, e);
        return libc::EIO;
    }
    ckpt::SYNC_PHASE.store(1, Ordering::Release);
    let mut buf = [0u8; REPLY_BUF];
    let got = ch.recv_masked(&mut buf, what, true, Some(ckpt::wait_mask(mask)));
    ckpt::SYNC_PHASE.store(0, Ordering::Release);
    match got {
        Ok((reply, _)) => f(reply),
        Err(e) => {
            report!("rank {}: {} failed: {}", info.rank, what, e);
            libc::EIO
        }
    }
}

#[no_mangle]
pub extern "C" fn mome_barrier() -> i32 {
    // A barrier of one rank waits for nobody: no round trip to the agent.
    let alone = state::mode() == Mode::Rank && state::info().is_some_and(|i| i.nranks == 1);
    if state::mode() == Mode::Native || alone {
        LAST_BARRIER.fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    // Frees of other nodes' shared-malloc blocks go before the barrier, so
    // that their owners can reuse them after it.
    crate::shmalloc::flush_pending_frees();
    sync_call(
        |seq| RankRequest::Barrier { seq },
        "Barrier",
        |r| match r {
            AgentReply::BarrierDone { date } => {
                LAST_BARRIER.store(date, Ordering::Relaxed);
                0
            }
            _ => libc::EIO,
        },
    )
}

#[no_mangle]
pub extern "C" fn mome_last_barrier_date() -> u64 {
    LAST_BARRIER.load(Ordering::Relaxed)
}

#[no_mangle]
pub extern "C" fn mome_lock(id: u64) -> i32 {
    if state::mode() == Mode::Native {
        return 0;
    }
    sync_call(
        move |seq| RankRequest::Lock { id, seq },
        "Lock",
        |r| match r {
            AgentReply::Ok => 0,
            _ => libc::EIO,
        },
    )
}

#[no_mangle]
pub extern "C" fn mome_unlock(id: u64) -> i32 {
    if state::mode() == Mode::Native {
        return 0;
    }
    sync_call(
        move |seq| RankRequest::Unlock { id, seq },
        "Unlock",
        |r| match r {
            AgentReply::Ok => 0,
            _ => libc::EIO,
        },
    )
}

#[no_mangle]
pub extern "C" fn mome_rank() -> i32 {
    state::info().map_or(0, |i| i.rank as i32)
}

#[no_mangle]
pub extern "C" fn mome_nranks() -> i32 {
    state::info().map_or(1, |i| i.nranks as i32)
}

#[no_mangle]
pub extern "C" fn mome_node() -> i32 {
    state::info().map_or(0, |i| i.node as i32)
}

#[no_mangle]
pub extern "C" fn mome_active() -> i32 {
    (state::mode() == Mode::Rank) as i32
}

/// # Safety
/// Same contract as mmap(2) for `addr` with MAP_FIXED.
#[no_mangle]
pub unsafe extern "C" fn MomeMMap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    seg: i32,
    offset: i64,
) -> *mut c_void {
    if state::mode() != Mode::Rank {
        // Not a rank: the memory is this process's own, as without mome.
        let fixed = if addr.is_null() {
            0
        } else {
            flags & libc::MAP_FIXED
        };
        let anon = libc::MAP_SHARED | libc::MAP_ANONYMOUS | fixed;
        return match sys::mmap(addr as u64, len as u64, prot, anon, -1, 0) {
            Ok(a) => a as *mut c_void,
            Err(e) => {
                sys::set_errno(e);
                libc::MAP_FAILED
            }
        };
    }
    match segments::mome_mmap(addr, len, prot, flags, seg, offset) {
        Ok(p) => p,
        Err(e) => {
            sys::set_errno(e);
            libc::MAP_FAILED
        }
    }
}

fn check_range(addr: *mut c_void, len: usize) -> i32 {
    if state::mode() != Mode::Rank {
        return 0;
    }
    let a = addr as u64;
    // The whole range, not just its first byte: inside the window, or
    // inside one view of a segment mapped outside it.
    let in_window = state::info().is_some_and(|i| i.layout.contains_range(a, len as u64));
    if in_window || segments::is_shared_range(a, len as u64) {
        0
    } else {
        libc::EINVAL
    }
}

/// The window range a consistency request names, when it must go to the
/// agent: on one node every rank maps the same physical pages, so every
/// model holds as soon as a write is done and there is nothing to ask.
fn relaxed_target(addr: *mut c_void, len: usize) -> Result<Option<u64>, i32> {
    let rc = check_range(addr, len);
    if rc != 0 {
        return Err(rc);
    }
    if state::mode() != Mode::Rank || state::info().is_none_or(|i| i.nodes <= 1) || len == 0 {
        return Ok(None);
    }
    segments::window_address(addr as u64, len as u64)
        .map(Some)
        .ok_or(libc::EINVAL)
}

#[no_mangle]
pub extern "C" fn MomeConsistency(addr: *mut c_void, len: usize, model: i32) -> i32 {
    let Some(model) = Model::from_c(model) else {
        return libc::EINVAL;
    };
    let window = match relaxed_target(addr, len) {
        Ok(Some(w)) => w,
        Ok(None) => return 0,
        Err(e) => return e,
    };
    sync_call(
        move |seq| RankRequest::Consistency {
            addr: window,
            len: len as u64,
            model,
            seq,
        },
        "MomeConsistency",
        |r| match r {
            AgentReply::Ok => 0,
            _ => libc::EIO,
        },
    )
}

#[no_mangle]
pub extern "C" fn MomeSyncMem(addr: *mut c_void, len: usize, date: u64) -> i32 {
    if date > LAST_BARRIER.load(Ordering::Relaxed) && state::mode() == Mode::Rank {
        return libc::EINVAL;
    }
    let window = match relaxed_target(addr, len) {
        Ok(Some(w)) => w,
        Ok(None) => return 0,
        Err(e) => return e,
    };
    sync_call(
        move |seq| RankRequest::SyncMem {
            addr: window,
            len: len as u64,
            date,
            seq,
        },
        "MomeSyncMem",
        |r| match r {
            AgentReply::Ok => 0,
            _ => libc::EIO,
        },
    )
}

// ---- Fortran 77 bindings: arguments by reference, INTEGER is 4 bytes ----

/// # Safety
/// Fortran passes valid pointers to its arguments.
#[no_mangle]
pub unsafe extern "C" fn momemmap_(
    addr: *mut c_void,
    len: *const i32,
    prot: *const i32,
    flags: *const i32,
    seg: *const i32,
    offset: *const i32,
) -> i32 {
    // SAFETY: Fortran passes every argument by reference.
    let (len, prot, flags, seg, offset) = unsafe { (*len, *prot, *flags, *seg, *offset) };
    if len <= 0 {
        return libc::EINVAL;
    }
    // SAFETY: MAP_FIXED at the address of the caller's COMMON block.
    let r = unsafe {
        MomeMMap(
            addr,
            len as usize,
            prot,
            flags | libc::MAP_FIXED,
            seg,
            offset as i64,
        )
    };
    if r == libc::MAP_FAILED {
        sys::errno()
    } else {
        0
    }
}

#[no_mangle]
pub extern "C" fn mome_barrier_() {
    mome_barrier();
}

/// # Safety
/// Fortran passes a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn mome_lock_(id: *const i32) {
    // SAFETY: by-reference argument.
    mome_lock(unsafe { *id } as u64);
}

/// # Safety
/// Fortran passes a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn mome_unlock_(id: *const i32) {
    // SAFETY: by-reference argument.
    mome_unlock(unsafe { *id } as u64);
}

#[no_mangle]
pub extern "C" fn mome_rank_() -> i32 {
    mome_rank()
}

#[no_mangle]
pub extern "C" fn mome_nranks_() -> i32 {
    mome_nranks()
}

/// # Safety
/// Fortran passes valid pointers.
#[no_mangle]
pub unsafe extern "C" fn momeconsistency_(
    addr: *mut c_void,
    len: *const i32,
    model: *const i32,
) -> i32 {
    // SAFETY: by-reference arguments.
    MomeConsistency(addr, unsafe { *len } as usize, unsafe { *model })
}

/// # Safety
/// Fortran passes valid pointers.
#[no_mangle]
pub unsafe extern "C" fn momesyncmem_(addr: *mut c_void, len: *const i32, date: *const i64) -> i32 {
    // SAFETY: by-reference arguments.
    MomeSyncMem(addr, unsafe { *len } as usize, unsafe { *date } as u64)
}
