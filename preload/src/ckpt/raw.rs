//! Raw system calls and memory copies that touch no libc state: the restore
//! path runs them while libc's own data is being overwritten with the
//! checkpointed copy, so it cannot go through libc's wrappers (errno lives
//! in TLS being restored) or its memcpy (its GOT entry may be rewritten).

use core::arch::asm;

/// A system call with up to six arguments; returns the raw kernel result
/// (negative errno on failure).
///
/// # Safety
/// The caller must pass arguments valid for system call `nr`.
#[inline(always)]
pub unsafe fn syscall6(nr: i64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the x86_64 Linux system call convention; rcx and r11 are
    // clobbered by `syscall`; memory effects are the caller's contract.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// # Safety
/// As [`syscall6`].
#[inline(always)]
pub unsafe fn sys(nr: i64, a0: u64, a1: u64, a2: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { syscall6(nr, [a0, a1, a2, 0, 0, 0]) }
}

/// Copies `len` bytes with `rep movsb` (no libc, no GOT).
///
/// # Safety
/// Both ranges must be valid for `len` bytes and not overlap.
#[inline(always)]
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: guaranteed by the caller; rep movsb reads [src, src+len) and
    // writes [dst, dst+len) with the direction flag clear (ABI guarantee).
    unsafe {
        asm!(
            "rep movsb",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") len => _,
            options(nostack, preserves_flags),
        );
    }
}

/// Whether two page-sized ranges differ, without libc.
///
/// # Safety
/// Both pointers must be valid for `len` bytes, 8-byte aligned, `len` a
/// multiple of 8.
#[inline]
pub unsafe fn differs(a: *const u8, b: *const u8, len: usize) -> bool {
    let words = len / 8;
    let a = a.cast::<u64>();
    let b = b.cast::<u64>();
    let mut i = 0;
    while i < words {
        // SAFETY: within the ranges the caller vouched for.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return true;
        }
        i += 1;
    }
    false
}

/// Writes `len` bytes of `src` to `dst` only where a 4 KiB page of `dst`
/// differs, so that unchanged pages of an image stay clean for the agent's
/// dirty tracking (and cost nothing in the next increment).
///
/// # Safety
/// As [`copy`]; `dst` page aligned, `len` a multiple of 8.
pub unsafe fn put_if_changed(dst: *mut u8, src: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(4096);
        // SAFETY: within the ranges the caller vouched for.
        unsafe {
            if differs(dst.add(done), src.add(done), n & !7) || !n.is_multiple_of(8) {
                copy(dst.add(done), src.add(done), n);
            }
        }
        done += n;
    }
}
