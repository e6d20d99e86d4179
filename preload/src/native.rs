//! glibc's own allocator and shm functions, for processes that inherited the
//! preload library without being a rank (a child a rank forked and exec'd),
//! and for functions the library does not handle itself.
//!
//! glibc 2.34+ no longer exports `__libc_malloc`, so the next definitions are
//! found with dlsym(RTLD_NEXT) once, at start-up.

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicUsize, Ordering};

static MALLOC: AtomicUsize = AtomicUsize::new(0);
static FREE: AtomicUsize = AtomicUsize::new(0);
static CALLOC: AtomicUsize = AtomicUsize::new(0);
static REALLOC: AtomicUsize = AtomicUsize::new(0);
static MEMALIGN: AtomicUsize = AtomicUsize::new(0);
static USABLE: AtomicUsize = AtomicUsize::new(0);
static SHM_OPEN: AtomicUsize = AtomicUsize::new(0);
static SHM_UNLINK: AtomicUsize = AtomicUsize::new(0);

fn next(name: &CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

/// Resolves glibc's definitions; false if the allocator is missing.
pub fn resolve() -> bool {
    let table: [(&AtomicUsize, &CStr); 8] = [
        (&MALLOC, c"malloc"),
        (&FREE, c"free"),
        (&CALLOC, c"calloc"),
        (&REALLOC, c"realloc"),
        (&MEMALIGN, c"memalign"),
        (&USABLE, c"malloc_usable_size"),
        (&SHM_OPEN, c"shm_open"),
        (&SHM_UNLINK, c"shm_unlink"),
    ];
    for (slot, name) in table {
        slot.store(next(name), Ordering::Relaxed);
    }
    [&MALLOC, &FREE, &CALLOC, &REALLOC, &MEMALIGN]
        .iter()
        .all(|s| s.load(Ordering::Relaxed) != 0)
}

macro_rules! call {
    ($slot:expr, fn($($t:ty),*) -> $r:ty, $($a:expr),*) => {{
        let f = $slot.load(Ordering::Relaxed);
        // SAFETY: the slot holds glibc's function of exactly this signature
        // (resolved by `resolve` before Native mode is entered).
        let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { core::mem::transmute(f) };
        // SAFETY: forwarding the caller's arguments unchanged.
        unsafe { f($($a),*) }
    }};
}

pub fn malloc(size: usize) -> *mut c_void {
    call!(MALLOC, fn(usize) -> *mut c_void, size)
}
/// # Safety
/// Same contract as the glibc function.
pub unsafe fn free(p: *mut c_void) {
    call!(FREE, fn(*mut c_void) -> (), p)
}
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    call!(CALLOC, fn(usize, usize) -> *mut c_void, n, size)
}
/// # Safety
/// Same contract as the glibc function.
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    call!(REALLOC, fn(*mut c_void, usize) -> *mut c_void, p, size)
}
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    call!(MEMALIGN, fn(usize, usize) -> *mut c_void, align, size)
}
/// # Safety
/// Same contract as the glibc function.
pub unsafe fn usable_size(p: *mut c_void) -> usize {
    if USABLE.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    call!(USABLE, fn(*mut c_void) -> usize, p)
}

/// glibc's shm_open, resolved on first use (it may be needed in a forked
/// child, which is not connected to the agent).
/// # Safety
/// Same contract as the glibc function.
pub unsafe fn shm_open(name: *const c_char, oflag: c_int, mode: libc::mode_t) -> c_int {
    if SHM_OPEN.load(Ordering::Relaxed) == 0 {
        SHM_OPEN.store(next(c"shm_open"), Ordering::Relaxed);
    }
    if SHM_OPEN.load(Ordering::Relaxed) == 0 {
        crate::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    call!(
        SHM_OPEN,
        fn(*const c_char, c_int, libc::mode_t) -> c_int,
        name,
        oflag,
        mode
    )
}

/// # Safety
/// Same contract as the glibc function.
pub unsafe fn shm_unlink(name: *const c_char) -> c_int {
    if SHM_UNLINK.load(Ordering::Relaxed) == 0 {
        SHM_UNLINK.store(next(c"shm_unlink"), Ordering::Relaxed);
    }
    if SHM_UNLINK.load(Ordering::Relaxed) == 0 {
        crate::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    call!(SHM_UNLINK, fn(*const c_char) -> c_int, name)
}
