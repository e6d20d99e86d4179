//! fork() in a rank: the child gets its own copy of the rank's heaps, not a
//! view of the node's shared memory file.
//!
//! The parent's prepare handler copies the data of every heap the rank owns
//! into a private temporary mapping (holes stay holes: SEEK_DATA/SEEK_HOLE on
//! the memfd), with the allocator locked so the copy is consistent. The child
//! replaces the private zone with private memory and moves the copies into
//! place (mremap, no second copy); the parent drops the temporary. Shared
//! segments stay shared with the child, as MAP_SHARED memory does, except
//! the shared heaps of shared malloc (MomeMalloc): the blocks there are the
//! rank's malloc'ed data, so the child gets a private copy of them too (of
//! the pages present on this node), taken with the node's allocator locked.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::pages::{HeapSource, PAGES};
use crate::state::{self, Mode};
use crate::{malloc, report, shmalloc, sys};

/// The temporary copy: address and length (0 when none).
static TEMP: AtomicU64 = AtomicU64::new(0);
static TEMP_LEN: AtomicU64 = AtomicU64::new(0);
/// Header of the temporary: run count, then (addr, len) pairs.
const RUN_ENTRY: u64 = 16;
/// The shared heaps' copy: a sparse private mapping of the area's size
/// (0 when none).
static AREA_TEMP: AtomicU64 = AtomicU64::new(0);

pub fn install() {
    // SAFETY: registering three extern "C" handlers with no arguments.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

extern "C" fn prepare() {
    let m = state::mode();
    if !matches!(m, Mode::Rank | Mode::Detached) {
        return;
    }
    // A checkpoint between prepare and parent/child would find the agent
    // channel taken: the signal waits until the fork is done.
    FORK_MASK.store(crate::ckpt::block(), Ordering::Relaxed);
    malloc::lock_for_fork();
    PAGES.lock_for_fork();
    if m == Mode::Rank {
        state::MEM.lock_for_fork();
        state::SYNC.lock_for_fork();
        snapshot_heaps();
        if shmalloc::lock_for_fork() {
            snapshot_area();
        }
    }
}

extern "C" fn parent() {
    let m = state::mode();
    if !matches!(m, Mode::Rank | Mode::Detached) {
        return;
    }
    if m == Mode::Rank {
        let (t, l) = (
            TEMP.swap(0, Ordering::Relaxed),
            TEMP_LEN.swap(0, Ordering::Relaxed),
        );
        if t != 0 {
            let _ = sys::munmap(t, l);
        }
        let t = AREA_TEMP.swap(0, Ordering::Relaxed);
        if let Some((_, len)) = shmalloc::area_range().filter(|_| t != 0) {
            let _ = sys::munmap(t, len);
        }
        shmalloc::unlock_after_fork();
        state::SYNC.force_unlock();
        state::MEM.force_unlock();
    }
    PAGES.force_unlock();
    malloc::unlock_after_fork();
    crate::ckpt::unblock(FORK_MASK.load(Ordering::Relaxed));
}

extern "C" fn child() {
    let m = state::mode();
    if !matches!(m, Mode::Rank | Mode::Detached) {
        return;
    }
    malloc::reset_after_fork();
    PAGES.reset();
    if m == Mode::Rank {
        state::MEM.reset();
        state::SYNC.reset();
        privatize();
        // The channels belong to the parent: drop our copies of the fds
        // without a word to the agent.
        // Dropping a Channel only closes its fd.
        drop(state::MEM.lock().take());
        drop(state::SYNC.lock().take());
        if let Some(info) = state::info().filter(|i| i.shared_uffd >= 0) {
            sys::close(info.shared_uffd);
            // With several nodes the child has no userfaultfd on the shared
            // segments (the kernel drops it at fork), so it would read a
            // page missing on this node as zeros, and put them in the
            // node's memory behind the page protocol: it gets no access to
            // them instead (SIGSEGV), which is at least not silent.
            if info.nodes > 1 {
                let l = info.layout;
                if sys::mprotect(l.shared_base(), l.shared_size(), libc::PROT_NONE).is_err() {
                    crate::report!("fork: cannot close the shared segments to the child");
                }
            }
        }
        privatize_area();
        PAGES.lock().set_source(HeapSource::Local);
        state::set_mode(Mode::Detached);
    }
    crate::ckpt::unblock(FORK_MASK.load(Ordering::Relaxed));
}

/// Signal mask before `prepare` blocked the checkpoint signal.
static FORK_MASK: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn snapshot_heaps() {
    let Some(info) = state::info() else { return };
    // SAFETY: prepare holds the PAGES lock for this thread; nothing else
    // touches the page tables until parent/child release it.
    let pages = unsafe { PAGES.get_unchecked() };
    let mut runs = 0u64;
    let mut bytes = 0u64;
    pages.for_each_owned(|_, len| {
        runs += 1;
        bytes += len;
    });
    let header = (8 + runs * RUN_ENTRY).next_multiple_of(4096);
    let total = header + bytes;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let Ok(temp) = sys::mmap(0, total, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) else {
        report!(
            "fork: cannot reserve {} bytes to copy the rank's heaps",
            total
        );
        return;
    };
    // SAFETY: temp is a fresh private mapping of `total` bytes.
    unsafe { *(temp as *mut u64) = runs };
    let mut i = 0u64;
    let mut dst = temp + header;
    pages.for_each_owned(|addr, len| {
        // SAFETY: the header has room for `runs` entries.
        unsafe {
            let e = (temp + 8 + i * RUN_ENTRY) as *mut u64;
            *e = addr;
            *e.add(1) = len;
        }
        copy_data(info.memfd, info.layout.file_offset(addr), addr, len, dst);
        i += 1;
        dst += len;
    });
    TEMP.store(temp, Ordering::Relaxed);
    TEMP_LEN.store(total, Ordering::Relaxed);
}

/// Copies the data extents of `[addr, addr+len)` (file offset `off`) to `dst`.
fn copy_data(memfd: i32, off: u64, addr: u64, len: u64, dst: u64) {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        // SAFETY: lseek on the node's memfd.
        let data = unsafe { libc::lseek(memfd, pos as i64, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(memfd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        let from = data as u64;
        // SAFETY: [from, hole) lies in a heap this rank owns (mapped), and the
        // destination in the temporary of the same layout.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (addr + (from - off)) as *const u8,
                (dst + (from - off)) as *mut u8,
                (hole - from) as usize,
            )
        };
        pos = hole;
    }
}

fn privatize() {
    let Some(info) = state::info() else { return };
    let temp = TEMP.swap(0, Ordering::Relaxed);
    TEMP_LEN.store(0, Ordering::Relaxed);
    let l = &info.layout;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED;
    if let Err(e) = sys::mmap(
        l.base,
        l.private_size,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        -1,
        0,
    ) {
        sys::fatal(format_args!(
            "fork: cannot give the child private memory: errno {e}"
        ));
    }
    if temp == 0 {
        sys::fatal(format_args!(
            "fork: the rank's heaps could not be copied for the child"
        ));
    }
    // SAFETY: temp is our private copy (inherited from the parent).
    let runs = unsafe { *(temp as *const u64) };
    let header = (8 + runs * RUN_ENTRY).next_multiple_of(4096);
    let mut src = temp + header;
    for i in 0..runs {
        // SAFETY: entry i of the header written by snapshot_heaps.
        let (addr, len) = unsafe {
            let e = (temp + 8 + i * RUN_ENTRY) as *const u64;
            (*e, *e.add(1))
        };
        let mv = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if let Err(e) = sys::mremap(src, len, len, mv, addr) {
            sys::fatal(format_args!(
                "fork: cannot move the heap copy into place: errno {e}"
            ));
        }
        src += len;
    }
    let _ = sys::munmap(temp, header);
}

/// Copies the data of the shared heaps present on this node into a sparse
/// private temporary of the area's size, at the same offsets.
fn snapshot_area() {
    let (Some(info), Some((base, len))) = (state::info(), shmalloc::area_range()) else {
        return;
    };
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let Ok(temp) = sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) else {
        report!(
            "fork: cannot reserve {} bytes to copy the shared heaps",
            len
        );
        return;
    };
    copy_data(info.memfd, info.layout.file_offset(base), base, len, temp);
    AREA_TEMP.store(temp, Ordering::Relaxed);
}

/// The child's shared heaps become its private copy (or, without one,
/// private zeros rather than the parent's memory).
fn privatize_area() {
    let Some((base, len)) = shmalloc::area_range() else {
        return;
    };
    let temp = AREA_TEMP.swap(0, Ordering::Relaxed);
    let mv = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    if temp != 0 && sys::mremap(temp, len, len, mv, base).is_ok() {
        return;
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED;
    if let Err(e) = sys::mmap(base, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) {
        sys::fatal(format_args!(
            "fork: cannot give the child private shared heaps: errno {e}"
        ));
    }
    report!("fork: the child's copy of the shared heaps could not be made: they read as zeros");
}
