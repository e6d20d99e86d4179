//! mmap, munmap, mremap and madvise, interposed for anonymous memory.
//!
//! In a rank, private anonymous mappings are page runs of its private heaps
//! in the DSM window; MAP_SHARED anonymous mappings and mappings of shm_open
//! fds are shared segments (the k-th MAP_SHARED anonymous mapping of every
//! rank is the same segment, as SPMD programs expect). File mappings,
//! MAP_FIXED outside the window, huge pages and grows-down stacks pass
//! through untouched.
//!
//! Deviations from the kernel's semantics, by design: protection requested
//! for a segment mapping is not applied (all views of a segment share its
//! window address, so one view's protection would apply to every other), and
//! an unmapped window range reads zero instead of faulting.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU32, Ordering};

use mome_protocol::layout::PAGE_SIZE;

use crate::state::{self, Mode};
use crate::{pages, segments, sys};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// Sequence number of MAP_SHARED anonymous mappings in this rank.
static ANON_SHARED_SEQ: AtomicU32 = AtomicU32::new(0);

fn failed(errno: i32) -> *mut c_void {
    sys::set_errno(errno);
    libc::MAP_FAILED
}

fn passthrough(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    match sys::mmap(addr as u64, len as u64, prot, flags, fd, off as u64) {
        Ok(a) => a as *mut c_void,
        Err(e) => failed(e),
    }
}

fn window_overlaps(addr: u64, len: u64) -> bool {
    match state::info() {
        Some(i) => addr < i.layout.end() && addr + len > i.layout.base,
        None => false,
    }
}

fn in_shared_zone(addr: u64, len: u64) -> bool {
    match state::info() {
        Some(i) => addr >= i.layout.shared_base() && addr + len <= i.layout.end(),
        None => false,
    }
}

/// Allocates a private anonymous mapping in the window.
fn private_anon(len: u64, prot: i32, flags: i32) -> *mut c_void {
    let Some(addr) = pages::PAGES.lock().alloc(len) else {
        return failed(libc::ENOMEM);
    };
    let rounded = len.next_multiple_of(PAGE_SIZE);
    if prot != RW {
        let _ = sys::mprotect(addr, rounded, prot);
    }
    if flags & libc::MAP_POPULATE != 0 {
        let _ = sys::madvise(addr, rounded, libc::MADV_POPULATE_WRITE);
    }
    addr as *mut c_void
}

/// # Safety
/// Same contract as mmap(2).
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    let m = state::mode();
    if !matches!(m, Mode::Rank | Mode::Detached) || len == 0 {
        return passthrough(addr, len, prot, flags, fd, off);
    }
    let a = addr as u64;
    let l = len as u64;
    let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
    let anonymous = flags & libc::MAP_ANONYMOUS != 0;
    // The mapping type is a 4-bit field, not a set of bits: MAP_SHARED_VALIDATE
    // (3) has MAP_PRIVATE's bit (2) too.
    let map_type = flags & 0x0f;
    let shared = map_type == libc::MAP_SHARED || map_type == libc::MAP_SHARED_VALIDATE;
    let special = flags & (libc::MAP_HUGETLB | libc::MAP_GROWSDOWN) != 0;

    if fixed && !window_overlaps(a, l) {
        return passthrough(addr, len, prot, flags, fd, off);
    }
    if fixed {
        // Inside the window only a fresh private mapping over memory the
        // rank already owns is meaningful: it zeroes that memory.
        if anonymous && !shared && flags & libc::MAP_FIXED != 0 && pages::PAGES.lock().owns(a, l) {
            let rounded = l.next_multiple_of(PAGE_SIZE);
            let _ = sys::drop_pages(a, rounded);
            let _ = sys::mprotect(a, rounded, prot);
            return addr;
        }
        return failed(libc::EINVAL);
    }
    if special {
        return passthrough(addr, len, prot, flags, fd, off);
    }
    if anonymous && !shared {
        return private_anon(l, prot, flags);
    }
    if anonymous && shared {
        if m == Mode::Detached {
            // A forked child shares anonymous memory with nobody but its
            // own children: the kernel's mapping does exactly that.
            return passthrough(addr, len, prot, flags, fd, off);
        }
        let seq = ANON_SHARED_SEQ.fetch_add(1, Ordering::Relaxed);
        return match segments::open_anonymous(seq, l) {
            Ok(seg) => {
                segments::view_added(seg.id);
                seg.addr as *mut c_void
            }
            Err(e) => failed(e),
        };
    }
    if shared && fd >= 0 {
        if let Some((id, seg_addr)) = segments::shm_fd_address(fd) {
            if off < 0 || !(off as u64).is_multiple_of(PAGE_SIZE) {
                return failed(libc::EINVAL);
            }
            if !segments::fits_reserve(off as u64 + l) {
                return failed(libc::ENOMEM);
            }
            if let Err(e) = segments::shm_view_added(id) {
                return failed(e);
            }
            return (seg_addr + off as u64) as *mut c_void;
        }
    }
    passthrough(addr, len, prot, flags, fd, off)
}

/// # Safety
/// Same contract as mmap(2).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// Same contract as munmap(2).
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
    let a = addr as u64;
    let l = len as u64;
    if matches!(state::mode(), Mode::Rank | Mode::Detached) && window_overlaps(a, l) {
        if !a.is_multiple_of(PAGE_SIZE) || l == 0 {
            sys::set_errno(libc::EINVAL);
            return -1;
        }
        if state::window_contains(a) {
            let rounded = l.next_multiple_of(PAGE_SIZE);
            let mut pages = pages::PAGES.lock();
            if pages.owns(a, rounded) {
                // Restore the window's protection for the next user.
                let _ = sys::mprotect(a, rounded, RW);
                pages.free(a, rounded);
            }
        }
        // Unmapping a view of a shared segment leaves the segment to the
        // other ranks; the agent frees it once nobody maps it (and, for a
        // named one, once it is unlinked).
        if let Some(id) = segments::segment_of(a) {
            segments::view_removed(id);
        }
        return 0;
    }
    segments::forget_alias(a, l);
    match sys::munmap(a, l) {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

/// mremap's fifth argument exists only with MREMAP_FIXED. It is variadic in
/// C; on x86_64 a variadic argument travels in the same register (r8) as a
/// fifth fixed one, so declaring it as a parameter reads it correctly.
///
/// # Safety
/// Same contract as mremap(2).
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: *mut c_void,
) -> *mut c_void {
    let o = old as u64;
    if !(matches!(state::mode(), Mode::Rank | Mode::Detached) && window_overlaps(o, old_len as u64))
    {
        let target = if flags & libc::MREMAP_FIXED != 0 {
            new_addr as u64
        } else {
            0
        };
        return match sys::mremap(o, old_len as u64, new_len as u64, flags, target) {
            Ok(a) => a as *mut c_void,
            Err(e) => failed(e),
        };
    }
    let old_rounded = (old_len as u64).next_multiple_of(PAGE_SIZE);
    let new_rounded = (new_len as u64).next_multiple_of(PAGE_SIZE);
    if in_shared_zone(o, old_rounded)
        || flags & libc::MREMAP_FIXED != 0
        || new_len == 0
        || !o.is_multiple_of(PAGE_SIZE)
    {
        return failed(libc::EINVAL);
    }
    if !pages::PAGES.lock().owns(o, old_rounded) {
        return failed(libc::EFAULT);
    }
    if new_rounded <= old_rounded {
        pages::PAGES
            .lock()
            .free(o + new_rounded, old_rounded - new_rounded);
        return old;
    }
    if flags & libc::MREMAP_MAYMOVE == 0 {
        return failed(libc::ENOMEM);
    }
    let fresh = private_anon(new_rounded, RW, 0);
    if fresh == libc::MAP_FAILED {
        return fresh;
    }
    // SAFETY: both ranges are owned mappings of at least old_len bytes.
    unsafe { core::ptr::copy_nonoverlapping(old as *const u8, fresh as *mut u8, old_len) };
    pages::PAGES.lock().free(o, old_rounded);
    fresh
}

/// # Safety
/// Same contract as madvise(2).
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32 {
    let a = addr as u64;
    let l = len as u64;
    let discard = advice == libc::MADV_DONTNEED || advice == libc::MADV_FREE;
    if discard && matches!(state::mode(), Mode::Rank | Mode::Detached) && state::window_contains(a)
    {
        // On private anonymous memory these advices zero the range; on our
        // shared mapping they would only unmap it, and the data would stay.
        let rounded = l.next_multiple_of(PAGE_SIZE);
        if pages::PAGES.lock().owns(a, rounded) {
            return match sys::drop_pages(a, rounded) {
                Ok(()) => 0,
                Err(e) => {
                    sys::set_errno(e);
                    -1
                }
            };
        }
    }
    match sys::madvise(a, l, advice) {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}
