//! The malloc family, interposed.
//!
//! In a rank, blocks come from dlmalloc (a proven allocator core) whose
//! system allocator hands out page runs of the rank's private heaps in the
//! DSM window (pages.rs); dlmalloc's own state lives in the window too. Before
//! the rank is connected, blocks come from the bootstrap arena. A process
//! that inherited the preload but is not a rank (a forked-and-exec'd child)
//! forwards to glibc's allocator.
//!
//! With `memory.malloc: shared` the program's calls allocate from the
//! shared heaps instead (shmalloc.rs); the library's own allocations
//! (`PreloadGlobalAlloc`) stay private. Whatever the setting, free,
//! realloc and malloc_usable_size go by the block's address, so a block of
//! the shared heaps (mome_shmalloc, or another rank's malloc) is freed
//! where it belongs.

use core::ffi::c_void;
use core::ptr::null_mut;

use crate::lock::FutexLock;
use crate::state::{self, Mode};
use crate::{bootstrap, native, pages, shmalloc, sys};

/// dlmalloc's system allocator: page runs of the window.
pub struct WindowSystem;

pub type Dl = dlmalloc::Dlmalloc<WindowSystem>;

const MALLOC_ALIGN: usize = 16;

pub fn new_dl() -> Dl {
    let mut dl = dlmalloc::Dlmalloc::new_with_allocator(WindowSystem);
    // 1 MiB segments: few page-allocator calls, and dlmalloc merges adjacent
    // segments, which runs of one heap usually are.
    dl.set_granularity(1 << 20);
    dl
}

// SAFETY: alloc returns page-aligned, zeroed, exclusively owned memory of at
// least the requested size, or null; free releases only what alloc returned.
unsafe impl dlmalloc::Allocator for WindowSystem {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let len = (size as u64).next_multiple_of(4096);
        let Some(a) = pages::PAGES.lock().alloc(len) else {
            return (null_mut(), 0, 0);
        };
        (a as *mut u8, len as usize, 0)
    }
    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        null_mut()
    }
    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }
    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        pages::PAGES.lock().free(ptr as u64, size as u64);
        true
    }
    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        4096
    }
}

struct DlPtr(*mut Dl);
// SAFETY: used only under the MALLOC lock.
unsafe impl Send for DlPtr {}

static MALLOC: FutexLock<DlPtr> = FutexLock::new(DlPtr(null_mut()));

/// Points the allocator at dlmalloc's state in the control area.
///
/// # Safety
/// `control` must be the control area initialised by `pages::init`.
pub unsafe fn attach(control: *mut pages::Control) {
    // SAFETY: guaranteed by the caller.
    MALLOC.lock().0 = unsafe { core::ptr::addr_of_mut!((*control).dl) };
}

pub fn lock_for_fork() {
    MALLOC.lock_for_fork();
}
pub fn unlock_after_fork() {
    MALLOC.force_unlock();
}
pub fn reset_after_fork() {
    MALLOC.reset();
}

fn with_dl<R>(f: impl FnOnce(&mut Dl) -> R) -> R {
    let mut g = MALLOC.lock();
    // SAFETY: the pointer is set by `attach` before the mode becomes Rank.
    f(unsafe { &mut *g.0 })
}

fn in_window(p: *mut c_void) -> bool {
    state::window_contains(p as u64)
}

fn enomem() -> *mut c_void {
    sys::set_errno(libc::ENOMEM);
    null_mut()
}

/// An allocation of the program: from the shared heaps when
/// `memory.malloc` is shared (private heaps if they are unavailable).
fn alloc_program(size: usize, align: usize) -> *mut c_void {
    if state::mode() == Mode::Rank && shmalloc::malloc_is_shared() {
        let p = shmalloc::alloc(size, align);
        if !p.is_null() {
            return p;
        }
    }
    alloc_aligned(size, align)
}

fn alloc_aligned(size: usize, align: usize) -> *mut c_void {
    let size = size.max(1);
    let p = match state::mode() {
        Mode::Rank | Mode::Detached => {
            if align <= MALLOC_ALIGN {
                // SAFETY: dlmalloc's C-style malloc on our instance.
                with_dl(|dl| unsafe { dl.c_malloc(size) })
            } else {
                // SAFETY: as above; align is a power of two.
                with_dl(|dl| unsafe { dl.c_memalign(align, size) })
            }
        }
        Mode::Native => {
            return if align <= MALLOC_ALIGN {
                native::malloc(size)
            } else {
                native::memalign(align, size)
            }
        }
        Mode::Bootstrap => bootstrap::alloc(size, align),
    };
    if p.is_null() {
        enomem()
    } else {
        p.cast()
    }
}

/// Bytes usable in a block.
fn usable(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if shmalloc::in_area(p as u64) {
        // Same chunk format as below (dlmalloc).
        // SAFETY: p is a live block of the shared heaps (caller's contract).
        let head = unsafe { *(p as *const usize).sub(1) };
        return (head & !7) - 8;
    }
    if bootstrap::contains(p.cast()) {
        // SAFETY: p is a bootstrap block.
        return unsafe { bootstrap::size_of(p.cast()) };
    }
    if in_window(p) {
        // dlmalloc keeps no public usable-size call. Its chunk header word
        // sits just before the block: size | flag bits (PINUSE=1, CINUSE=2,
        // FLAG4=4); a chunk with neither INUSE bit was mapped directly and
        // carries two words of overhead instead of one.
        // SAFETY: p is a live dlmalloc block, so the header word is readable.
        let head = unsafe { *(p as *const usize).sub(1) };
        let size = head & !7;
        let overhead = if head & 3 == 0 { 16 } else { 8 };
        return size - overhead;
    }
    if state::mode() == Mode::Native {
        // SAFETY: in Native mode every other block came from glibc.
        return unsafe { native::usable_size(p) };
    }
    0
}

#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc_program(size, MALLOC_ALIGN)
}

/// # Safety
/// `p` is null or a live block of this allocator (the C contract).
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || bootstrap::contains(p.cast()) {
        return;
    }
    if in_window(p) {
        // SAFETY: p is a live block of our dlmalloc (the caller's contract).
        with_dl(|dl| unsafe { dl.c_free(p.cast()) });
    } else if shmalloc::in_shared_zone(p as u64) {
        if let Err(e) = shmalloc::free(p as u64) {
            shmalloc::report_free_error("free", e);
        }
    } else if state::mode() == Mode::Native {
        // SAFETY: in Native mode every other block came from glibc.
        unsafe { native::free(p) };
    }
    // Any other pointer was not allocated by this process's malloc: ignore
    // it rather than corrupt a heap.
}

/// # Safety
/// `p` is null or a live block of this allocator (the C contract).
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { free(p) }
}

#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        return enomem();
    };
    if state::mode() == Mode::Rank && shmalloc::malloc_is_shared() {
        let p = shmalloc::alloc_zeroed(total);
        if !p.is_null() {
            return p;
        }
    }
    match state::mode() {
        Mode::Rank | Mode::Detached => {
            // SAFETY: dlmalloc's calloc zeroes unless the memory is fresh
            // from the system allocator, which hands out zeroed pages.
            let p = with_dl(|dl| unsafe { dl.calloc(total.max(1), MALLOC_ALIGN) });
            if p.is_null() {
                enomem()
            } else {
                p.cast()
            }
        }
        Mode::Native => native::calloc(n, size),
        // The arena starts zeroed and is never reused.
        Mode::Bootstrap => alloc_aligned(total, MALLOC_ALIGN),
    }
}

/// # Safety
/// `p` is null or a live block of this allocator (the C contract).
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: same contract.
        unsafe { free(p) };
        return null_mut();
    }
    if state::mode() == Mode::Rank && shmalloc::in_shared_zone(p as u64) {
        return match shmalloc::realloc(p as u64, size) {
            Ok(q) if q.is_null() => enomem(),
            Ok(q) => q,
            Err(e) => {
                shmalloc::report_free_error("realloc", e);
                sys::set_errno(libc::EINVAL);
                null_mut()
            }
        };
    }
    if bootstrap::contains(p.cast()) || (!in_window(p) && state::mode() != Mode::Native) {
        let old = usable(p);
        let q = malloc(size);
        if !q.is_null() && old > 0 {
            // SAFETY: both blocks are valid for min(old, size) bytes.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(size)) };
        }
        return q;
    }
    if in_window(p) {
        if state::mode() == Mode::Rank && shmalloc::malloc_is_shared() {
            // A block allocated before the shared heaps took over (or when
            // they were unavailable): it moves to them.
            let q = alloc_program(size, MALLOC_ALIGN);
            if !q.is_null() {
                let n = usable(p).min(size);
                // SAFETY: both blocks are valid for n bytes.
                unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n) };
                // SAFETY: p is a live block of our dlmalloc.
                with_dl(|dl| unsafe { dl.c_free(p.cast()) });
                return q;
            }
        }
        // SAFETY: p is a live block of our dlmalloc.
        let q = with_dl(|dl| unsafe { dl.c_realloc(p.cast(), size) });
        return if q.is_null() { enomem() } else { q.cast() };
    }
    // SAFETY: in Native mode every other block came from glibc.
    unsafe { native::realloc(p, size) }
}

/// # Safety
/// `p` is null or a live block of this allocator (the C contract).
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: same contract.
        Some(total) => unsafe { realloc(p, total) },
        None => enomem(),
    }
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        sys::set_errno(libc::EINVAL);
        return null_mut();
    }
    alloc_program(size, align)
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// # Safety
/// `out` must be a valid pointer to store the result in.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = alloc_program(size, align);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = p };
    0
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    alloc_program(size, 4096)
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    alloc_program(size.next_multiple_of(4096), 4096)
}

/// # Safety
/// `p` is null or a live block of this allocator (the C contract).
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    usable(p)
}

/// The library's own Rust allocations go through the same paths.
pub struct PreloadGlobalAlloc;

// SAFETY: delegates to the C allocator above, which honours size and align.
unsafe impl core::alloc::GlobalAlloc for PreloadGlobalAlloc {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        alloc_aligned(layout.size(), layout.align()).cast()
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: core::alloc::Layout) {
        // SAFETY: ptr came from `alloc` above.
        unsafe { free(ptr.cast()) }
    }
}
