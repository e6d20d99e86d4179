//! The kernel ABI of userfaultfd(2) and of the PAGEMAP_SCAN ioctl, as mome
//! uses them: creating a userfaultfd (syscall or /dev/userfaultfd), the API
//! handshake, registration, resolving faults (copy, wake, write-protect) and
//! reading fault events.
//!
//! Written by hand because the `userfaultfd` crate stops at Linux 5.13: it has
//! neither UFFD_FEATURE_WP_ASYNC / WP_UNPOPULATED / WP_HUGETLBFS_SHMEM nor
//! PAGEMAP_SCAN (Linux 6.7), which mome's dirty tracking is built on. Nothing
//! here allocates: the preload library calls it from inside its allocator.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Feature bits of `struct uffdio_api` (include/uapi/linux/userfaultfd.h).
pub mod feature {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const EVENT_FORK: u64 = 1 << 1;
    pub const EVENT_REMOVE: u64 = 1 << 3;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const SIGBUS: u64 = 1 << 7;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    pub const WP_ASYNC: u64 = 1 << 15;
}

/// Registration modes.
pub mod mode {
    pub const MISSING: u64 = 1 << 0;
    pub const WP: u64 = 1 << 1;
    pub const MINOR: u64 = 1 << 2;
}

/// Mode bits of UFFDIO_COPY.
pub mod copy_mode {
    /// Do not wake the threads waiting on the range.
    pub const DONTWAKE: u64 = 1 << 0;
    /// Install the page write-protected (uffd-wp set): with async
    /// write-protect it counts as clean until written.
    pub const WP: u64 = 1 << 1;
}

/// Bits of the `ioctls` masks the kernel returns, by ioctl number.
pub mod ioctl_bit {
    pub const REGISTER: u64 = 1 << 0x00;
    pub const WAKE: u64 = 1 << 0x02;
    pub const COPY: u64 = 1 << 0x03;
    pub const WRITEPROTECT: u64 = 1 << 0x06;
    pub const CONTINUE: u64 = 1 << 0x07;
}

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, 40);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, 24);
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0x07, 32);
/// ioctl on /dev/userfaultfd that returns a new userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg`, 32 bytes.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Flags of a page-fault event.
pub mod fault_flag {
    pub const WRITE: u64 = 1 << 0;
    pub const WP: u64 = 1 << 1;
    pub const MINOR: u64 = 1 << 2;
}

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum UffdError {
    #[error(
        "userfaultfd(2) refused ({syscall}) and /dev/userfaultfd could not be used ({device})"
    )]
    Unavailable { syscall: Errno, device: Errno },
    #[error("{op} failed: {errno}")]
    Os { op: &'static str, errno: Errno },
    #[error("the kernel lacks userfaultfd features {missing:#x} (it offers {offered:#x})")]
    MissingFeatures { missing: u64, offered: u64 },
}

/// An errno value that prints its name and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// How a userfaultfd was obtained, for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Syscall,
    Device,
}

/// A fault or other event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    PageFault { addr: u64, flags: u64, tid: u32 },
    Fork { uffd: RawFd },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Unknown(u8),
}

/// Result of a copy into a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The page was installed.
    Copied,
    /// Another thread or rank installed it first (EEXIST): wake the faulter.
    AlreadyPresent,
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    origin: Origin,
}

fn check(op: &'static str, rc: libc::c_int) -> Result<(), UffdError> {
    if rc < 0 {
        Err(UffdError::Os {
            op,
            errno: Errno::last(),
        })
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Creates a userfaultfd that also serves kernel-mode faults (a read(2)
    /// into a missing page), trying userfaultfd(2) first and /dev/userfaultfd
    /// second. `flags` is O_CLOEXEC and/or O_NONBLOCK.
    pub fn open(flags: libc::c_int) -> Result<Uffd, UffdError> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd, nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Uffd {
                fd,
                origin: Origin::Syscall,
            });
        }
        let syscall = Errno::last();
        let device = match Self::open_device(flags) {
            Ok(fd) => {
                return Ok(Uffd {
                    fd,
                    origin: Origin::Device,
                })
            }
            Err(e) => e,
        };
        Err(UffdError::Unavailable { syscall, device })
    }

    fn open_device(flags: libc::c_int) -> Result<OwnedFd, Errno> {
        // SAFETY: the path is a NUL-terminated literal.
        let dev =
            unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(Errno::last());
        }
        // SAFETY: `dev` is an fd we just opened; the ioctl takes the flags by value.
        let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
        let err = Errno::last();
        // SAFETY: `dev` is ours and no longer needed.
        unsafe { libc::close(dev) };
        if fd < 0 {
            return Err(err);
        }
        // SAFETY: the kernel just returned this fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Whether an unprivileged process would get only user-mode faults.
    pub fn user_mode_only_available() -> bool {
        // SAFETY: as in `open`.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
        if fd >= 0 {
            // SAFETY: fd was just returned to us.
            unsafe { libc::close(fd as libc::c_int) };
            true
        } else {
            false
        }
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Adopts an fd received from another process.
    ///
    /// # Safety
    /// `fd` must be an open userfaultfd owned by nobody else.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Uffd {
        Uffd {
            // SAFETY: guaranteed by the caller.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            origin: Origin::Syscall,
        }
    }

    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    /// API handshake asking for `features`; returns the features the kernel
    /// offers. Fails with `MissingFeatures` when one asked for is absent.
    pub fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` is (repr(C), 24 bytes), and lives across the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc < 0 {
            let errno = Errno::last();
            if errno.0 == libc::EINVAL {
                // The kernel rejects unknown feature bits with EINVAL; ask
                // with none to learn what it offers.
                if let Ok(offered) = Self::probe_features() {
                    return Err(UffdError::MissingFeatures {
                        missing: features & !offered,
                        offered,
                    });
                }
            }
            return Err(UffdError::Os {
                op: "UFFDIO_API",
                errno,
            });
        }
        if api.features & features != features {
            return Err(UffdError::MissingFeatures {
                missing: features & !api.features,
                offered: api.features,
            });
        }
        Ok(api.features)
    }

    /// Features the running kernel offers (from a throw-away userfaultfd).
    pub fn probe_features() -> Result<u64, UffdError> {
        let probe = Uffd::open(libc::O_CLOEXEC)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: as in `api`.
        let rc = unsafe { libc::ioctl(probe.fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        check("UFFDIO_API", rc)?;
        Ok(api.features)
    }

    /// Registers `[start, start+len)` with `mode` bits; returns the ioctls
    /// the range supports.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register` (32 bytes).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        check("UFFDIO_REGISTER", rc)?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
        check("UFFDIO_UNREGISTER", rc)
    }

    /// Copies `len` bytes from `src` (in this process) to `dst` (in the
    /// process that registered the range) and wakes the faulting threads.
    pub fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<Filled, UffdError> {
        self.copy_with_mode(dst, src, len, 0)
    }

    /// [`Uffd::copy`] with [`copy_mode`] bits, e.g. `copy_mode::WP` to
    /// install the pages write-protected.
    pub fn copy_with_mode(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: u64,
    ) -> Result<Filled, UffdError> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the kernel reads
        // `len` bytes at `src`, which the caller guarantees readable.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        if rc < 0 {
            let errno = Errno::last();
            if errno.0 == libc::EEXIST {
                return Ok(Filled::AlreadyPresent);
            }
            return Err(UffdError::Os {
                op: "UFFDIO_COPY",
                errno,
            });
        }
        Ok(Filled::Copied)
    }

    /// Maps pages already in the page cache (minor faults) and wakes.
    pub fn continue_range(&self, start: u64, len: u64) -> Result<Filled, UffdError> {
        let mut cont = UffdioContinue {
            range: UffdioRange { start, len },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE as _, &mut cont) };
        if rc < 0 {
            let errno = Errno::last();
            if errno.0 == libc::EEXIST {
                return Ok(Filled::AlreadyPresent);
            }
            return Err(UffdError::Os {
                op: "UFFDIO_CONTINUE",
                errno,
            });
        }
        Ok(Filled::Copied)
    }

    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        check("UFFDIO_WAKE", rc)
    }

    /// Write-protects (`protect`) or unprotects a range. Unprotecting wakes
    /// threads blocked on it unless `dont_wake`.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: (protect as u64) | ((dont_wake as u64) << 1),
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        check("UFFDIO_WRITEPROTECT", rc)
    }

    /// Reads one event; `None` when the fd is non-blocking and has none.
    pub fn read_event(&self) -> Result<Option<Event>, UffdError> {
        let mut msg = UffdMsg::default();
        // SAFETY: reads at most 32 bytes into `msg`, a 32-byte repr(C) struct.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut UffdMsg).cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let errno = Errno::last();
            if errno.0 == libc::EAGAIN {
                return Ok(None);
            }
            return Err(UffdError::Os { op: "read", errno });
        }
        if n as usize != std::mem::size_of::<UffdMsg>() {
            return Err(UffdError::Os {
                op: "read (short uffd_msg)",
                errno: Errno(libc::EIO),
            });
        }
        let a = msg.arg;
        Ok(Some(match msg.event {
            EVENT_PAGEFAULT => Event::PageFault {
                flags: a[0],
                addr: a[1],
                tid: a[2] as u32,
            },
            EVENT_FORK => Event::Fork {
                uffd: a[0] as u32 as RawFd,
            },
            EVENT_REMAP => Event::Remap {
                from: a[0],
                to: a[1],
                len: a[2],
            },
            EVENT_REMOVE => Event::Remove {
                start: a[0],
                end: a[1],
            },
            EVENT_UNMAP => Event::Unmap {
                start: a[0],
                end: a[1],
            },
            other => Event::Unknown(other),
        }))
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// PAGEMAP_SCAN (Linux 6.7): find pages by category and optionally
/// write-protect them again in the same pass (async write-protect dirty tracking).
pub mod pagemap {
    use super::{check, UffdError};

    pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PAGE_IS_FILE: u64 = 1 << 2;
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;

    /// Write-protect the pages that match while scanning.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// Fail unless the range is registered for async write-protect.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }

    /// What to look for.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Query {
        pub flags: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub category_inverted: u64,
        pub return_mask: u64,
        pub max_pages: u64,
    }

    /// Scans `[start, end)` of the process whose `/proc/<pid>/pagemap` is
    /// `pagemap_fd`, filling `out`; returns the number of regions and the
    /// address where the walk stopped (== end when complete).
    pub fn scan(
        pagemap_fd: libc::c_int,
        start: u64,
        end: u64,
        query: Query,
        out: &mut [PageRegion],
    ) -> Result<(usize, u64), UffdError> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: query.flags,
            start,
            end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: query.max_pages,
            category_inverted: query.category_inverted,
            category_mask: query.category_mask,
            category_anyof_mask: query.category_anyof_mask,
            return_mask: query.return_mask,
        };
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` (96 bytes) and
        // writes at most `vec_len` page_region entries into `out`.
        let rc = unsafe { libc::ioctl(pagemap_fd, PAGEMAP_SCAN as _, &mut arg) };
        check("PAGEMAP_SCAN", rc)?;
        Ok((rc as usize, arg.walk_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
    }

    /// Real kernel round trip: a MISSING fault on a memfd mapping, served by
    /// a second thread with UFFDIO_COPY.
    #[test]
    fn serves_a_missing_fault_on_shmem() {
        let uffd = match Uffd::open(libc::O_CLOEXEC) {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd unavailable on this machine: {e}"),
        };
        uffd.api(feature::MISSING_SHMEM).unwrap();
        // SAFETY: plain memfd + mmap of 2 pages, unmapped at the end.
        let addr = unsafe {
            let fd = libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, 8192), 0);
            let a = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            assert_ne!(a, libc::MAP_FAILED);
            a as u64
        };
        uffd.register(addr, 8192, mode::MISSING).unwrap();
        let fd = uffd.as_raw_fd();
        let server = std::thread::spawn(move || {
            // SAFETY: borrowed copy of the fd, kept alive by the test's `uffd`.
            let u = std::mem::ManuallyDrop::new(unsafe { Uffd::from_raw_fd(fd) });
            let page = [7u8; 4096];
            match u.read_event().unwrap() {
                Some(Event::PageFault { addr: a, .. }) => {
                    assert_eq!(
                        u.copy(a & !4095, page.as_ptr(), 4096).unwrap(),
                        Filled::Copied
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        });
        // SAFETY: addr is a live 2-page mapping.
        let v = unsafe { std::ptr::read_volatile((addr + 4096) as *const u8) };
        assert_eq!(v, 7);
        server.join().unwrap();
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(addr as _, 8192) };
    }
}
