//! Checkpoint and restore of a rank's private state (see docs/checkpoint.md).
//!
//! The agent brings a rank to a checkpoint with a real-time signal. The
//! handler (`on_signal`) saves the callee-saved registers, writes the
//! private image into the rank's image heaps in the window (`capture`),
//! reports `CkptParked` and waits for `Resume`. A restarted rank runs
//! `restore::run` from the library's constructor instead of starting the
//! program: it rebuilds the address space and jumps back into the handler,
//! which returns into the program through the signal frame.
//!
//! The signal is kept blocked while the rank talks to its agent (a request
//! and its reply must not be split by a checkpoint), except while it waits
//! for a barrier or lock, where `SYNC_PHASE` tells the restored rank to send
//! that request again.

pub mod capture;
pub mod context;
pub mod image;
pub mod procfs;
pub mod raw;
pub mod restore;

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use mome_protocol::rank::{AgentReply, RankRequest};

use crate::agent::REPLY_BUF;
use crate::state::{self, Mode};
use crate::{report, sys};

/// Signal that brings the rank to a checkpoint (MOME_CKPT_SIGNAL).
pub static SIGNAL: AtomicI32 = AtomicI32::new(62);

/// Heaps holding the image: first heap and count (u32::MAX: none yet).
pub static IMAGE_FIRST: AtomicU32 = AtomicU32::new(u32::MAX);
pub static IMAGE_COUNT: AtomicU32 = AtomicU32::new(0);

/// The context saved by the last checkpoint (copied into the image header).
static mut SAVED: context::Context = context::Context {
    rbx: 0,
    rbp: 0,
    r12: 0,
    r13: 0,
    r14: 0,
    r15: 0,
    rsp: 0,
    rip: 0,
    fpu: 0,
};

/// Sync-channel call in progress: 0 none, 1 request sent and its reply not
/// read yet. With the request's bytes, so that a restored rank re-sends it.
pub static SYNC_PHASE: AtomicU32 = AtomicU32::new(0);
pub static SYNC_SEQ: AtomicU64 = AtomicU64::new(0);
pub static mut SYNC_REQUEST: [u8; 128] = [0; 128];
pub static SYNC_REQUEST_LEN: AtomicU32 = AtomicU32::new(0);

fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// Blocks the checkpoint signal; returns the previous mask for `unblock`.
pub fn block() -> u64 {
    let mut old: u64 = 0;
    let set = sigbit(SIGNAL.load(Ordering::Relaxed));
    // SAFETY: rt_sigprocmask with 8-byte sets we own.
    unsafe {
        raw::syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_BLOCK as u64,
                &set as *const u64 as u64,
                &mut old as *mut u64 as u64,
                8,
                0,
                0,
            ],
        )
    };
    old
}

/// Restores the mask `block` returned.
pub fn unblock(old: u64) {
    // SAFETY: rt_sigprocmask with an 8-byte set we own.
    unsafe {
        raw::syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as u64,
                &old as *const u64 as u64,
                0,
                8,
                0,
                0,
            ],
        )
    };
}

/// A mask equal to `mask` with the checkpoint signal deliverable: for the
/// waits (ppoll) of barriers and locks.
pub fn wait_mask(mask: u64) -> u64 {
    mask & !sigbit(SIGNAL.load(Ordering::Relaxed))
}

/// Installs the handler (start-up of a rank, in Rank mode).
pub fn install() {
    if let Some(sig) = sys::getenv(c"MOME_CKPT_SIGNAL").and_then(|s| s.trim().parse::<i32>().ok()) {
        if (34..=64).contains(&sig) {
            SIGNAL.store(sig, Ordering::Relaxed);
        }
    }
    let sig = SIGNAL.load(Ordering::Relaxed);
    // SAFETY: a sigaction struct we fill entirely; the handler has the
    // SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        if crate::signals::real_sigaction(sig, &sa, core::ptr::null_mut()) != 0 {
            report!("cannot install the checkpoint signal handler for signal {sig}");
        }
    }
}

extern "C" fn on_signal(_sig: i32, _info: *mut libc::siginfo_t, _uctx: *mut libc::c_void) {
    if state::mode() != Mode::Rank {
        return;
    }
    let saved_errno = sys::errno();
    take_checkpoint(now_ns());
    sys::set_errno(saved_errno);
}

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn take_checkpoint(entered_ns: u64) {
    // SAFETY: SAVED is only touched from this handler, which runs with
    // every signal blocked in the rank's only thread.
    let resumed = unsafe {
        context::mome_ctx_run(core::ptr::addr_of_mut!(SAVED), checkpoint_now, entered_ns)
    } == 1;
    if resumed {
        after_restore();
    }
}

extern "C" fn checkpoint_now(entered_ns: u64) {
    // SAFETY: as in take_checkpoint.
    let ctx = unsafe { *core::ptr::addr_of!(SAVED) };
    let outcome = capture::capture(&ctx);
    match outcome {
        Ok((addr, len)) => park(RankRequest::CkptParked {
            entered_ns,
            image_addr: addr,
            image_len: len,
        }),
        Err(why) => {
            let mut text = sys::StackBuf::<512>::new();
            let _ = core::fmt::Write::write_fmt(&mut text, format_args!("{why}"));
            report!(
                "rank {}: checkpoint refused: {}",
                state::info().map_or(0, |i| i.rank),
                text.as_str()
            );
            park(RankRequest::CkptRefused {
                reason: text.as_str(),
            });
        }
    }
}

/// Tells the agent and waits for `Resume`.
fn park(req: RankRequest<'_>) {
    let Some(guard) = state::MEM.try_lock() else {
        report!("checkpoint signal while the agent channel is busy: ignored");
        return;
    };
    let Some(ch) = guard.as_ref() else { return };
    let mut buf = [0u8; REPLY_BUF];
    match ch.call(&req, None, &mut buf, "CkptParked", false) {
        Ok((AgentReply::Resume { .. }, _)) => {}
        Ok(_) => report!("the agent answered a checkpoint with something else"),
        Err(e) => report!("checkpoint: {}", e),
    }
}

/// The handler's second return, in a restarted process whose memory was
/// just restored: reconnect what lives outside memory, then let the
/// handler return into the program.
#[inline(never)]
fn after_restore() {
    // A barrier or lock call was waiting for its reply: the new agent gets
    // the request again (same seq: answered from its record if served).
    if SYNC_PHASE.load(Ordering::Acquire) == 1 {
        let len = SYNC_REQUEST_LEN.load(Ordering::Relaxed) as usize;
        let fd = state::SYNC_FD.load(Ordering::Relaxed);
        // SAFETY: the request bytes were written before the phase was set.
        let bytes = unsafe { &(&*core::ptr::addr_of!(SYNC_REQUEST))[..len] };
        if fd >= 0 && !send_all(fd, bytes) {
            report!("restore: cannot send the pending barrier/lock request again");
        }
    }
    let guard = state::MEM.try_lock();
    if let Some(ch) = guard.as_ref().and_then(|g| g.as_ref()) {
        let mut buf = [0u8; REPLY_BUF];
        if let Err(e) = ch.call(&RankRequest::Restored, None, &mut buf, "Restored", false) {
            report!("restore: telling the agent: {}", e);
        }
    }
}

fn send_all(fd: i32, bytes: &[u8]) -> bool {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: send from our own buffer.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().add(done).cast(),
                bytes.len() - done,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            if sys::errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}
