//! `sigaction` interposition: the checkpoint signal belongs to mome. A rank
//! that tries to take it over gets EINVAL and a message, instead of a
//! checkpoint that would silently never happen.

use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::state::{self, Mode};
use crate::{ckpt, report, sys};

static NEXT: AtomicUsize = AtomicUsize::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;

fn next() -> Option<SigactionFn> {
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"sigaction".as_ptr()) } as usize;
        NEXT.store(f, Ordering::Relaxed);
    }
    // SAFETY: glibc's sigaction has exactly this signature.
    (f != 0).then(|| unsafe { core::mem::transmute::<usize, SigactionFn>(f) })
}

/// # Safety
/// As sigaction(2).
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !act.is_null() && sig == ckpt::SIGNAL.load(Ordering::Relaxed) && state::mode() == Mode::Rank
    {
        if !WARNED.swap(true, Ordering::Relaxed) {
            report!(
                "the program tried to install a handler for signal {sig}, which mome uses for checkpoints (set checkpoint.signal to another one): refused"
            );
        }
        sys::set_errno(libc::EINVAL);
        return -1;
    }
    match next() {
        // SAFETY: forwarded as received.
        Some(f) => unsafe { f(sig, act, old) },
        None => {
            sys::set_errno(libc::ENOSYS);
            -1
        }
    }
}

/// glibc's sigaction, for the library's own handler.
///
/// # Safety
/// As sigaction(2).
pub unsafe fn real_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    match next() {
        // SAFETY: forwarded as received.
        Some(f) => unsafe { f(sig, act, old) },
        None => -1,
    }
}
