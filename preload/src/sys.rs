//! Raw system calls and allocation-free diagnostics.
//!
//! The preload library exports `mmap`, `munmap`, `mremap`, `madvise` and
//! `ftruncate`: calling the libc wrappers from inside the library would call
//! our own interposers again, so its own mappings go straight to the kernel.
//! Messages are formatted into a stack buffer, because they may be written
//! with the allocator's lock held.

use core::fmt::Write;

/// mmap(2) without going through our interposer. Returns the address or a
/// negated errno.
pub fn mmap(addr: u64, len: u64, prot: i32, flags: i32, fd: i32, off: u64) -> Result<u64, i32> {
    // SAFETY: a raw mmap syscall; callers pass MAP_FIXED only over ranges
    // they own (the DSM window or their own temporaries).
    let r = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    result(r).map(|v| v as u64)
}

pub fn munmap(addr: u64, len: u64) -> Result<(), i32> {
    // SAFETY: raw munmap; callers unmap only ranges they own.
    result(unsafe { libc::syscall(libc::SYS_munmap, addr, len) }).map(|_| ())
}

pub fn mremap(old: u64, old_len: u64, new_len: u64, flags: i32, new_addr: u64) -> Result<u64, i32> {
    // SAFETY: raw mremap; callers move only ranges they own.
    let r = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
    result(r).map(|v| v as u64)
}

pub fn madvise(addr: u64, len: u64, advice: i32) -> Result<(), i32> {
    // SAFETY: raw madvise on a caller-owned range.
    result(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) }).map(|_| ())
}

pub fn mprotect(addr: u64, len: u64, prot: i32) -> Result<(), i32> {
    // SAFETY: raw mprotect on a caller-owned range.
    result(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) }).map(|_| ())
}

pub fn ftruncate(fd: i32, len: u64) -> Result<(), i32> {
    // SAFETY: raw ftruncate on an fd.
    result(unsafe { libc::syscall(libc::SYS_ftruncate, fd, len) }).map(|_| ())
}

pub fn close(fd: i32) {
    // SAFETY: closes an fd the library owns.
    unsafe { libc::close(fd) };
}

/// Drops the pages of a window range: the range reads back as zeros, in this
/// rank and in every rank of the node (the memfd's pages are freed).
pub fn drop_pages(addr: u64, len: u64) -> Result<(), i32> {
    if len == 0 {
        return Ok(());
    }
    match madvise(addr, len, libc::MADV_REMOVE) {
        // A forked child's private zone is private anonymous memory, where
        // MADV_REMOVE does not apply and MADV_DONTNEED zeroes.
        Err(libc::EINVAL) => madvise(addr, len, libc::MADV_DONTNEED),
        other => other,
    }
}

fn result(r: libc::c_long) -> Result<libc::c_long, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Monotonic milliseconds.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A fixed buffer that `write!` can format into without allocating.
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl<const N: usize> Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = N - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `mome: <message>\n` to stderr without allocating.
pub fn report(args: core::fmt::Arguments<'_>) {
    let mut b = StackBuf::<768>::new();
    let _ = b.write_str("mome: ");
    let _ = b.write_fmt(args);
    let _ = b.write_str("\n");
    let bytes = b.as_bytes();
    // SAFETY: writes our own buffer to fd 2.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => { $crate::sys::report(format_args!($($arg)*)) };
}

/// Reports and ends the process: used when the rank cannot join its job.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    report(args);
    // SAFETY: _exit never returns; no atexit handler may run on a broken setup.
    unsafe { libc::_exit(125) }
}

/// Reads an environment variable as a `&'static str` without allocating.
pub fn getenv(name: &core::ffi::CStr) -> Option<&'static str> {
    // SAFETY: getenv returns a pointer into the environment block, valid
    // until the variable is changed; we read it during start-up only.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: p is a NUL-terminated string from the environment.
    unsafe { core::ffi::CStr::from_ptr(p) }.to_str().ok()
}
