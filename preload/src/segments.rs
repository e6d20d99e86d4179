//! Shared segments as the application sees them: shm_open'ed objects,
//! MAP_SHARED anonymous mappings and MomeMMap segments, all backed by slots
//! of the window's shared zone that the agent hands out by name.
//!
//! shm_open returns a real descriptor (an empty memfd standing in for the
//! object, so fstat, ftruncate and close behave) and the library remembers
//! which segment it stands for; mmap of that descriptor returns the
//! segment's window address, the same in every rank.

use core::ffi::{c_char, c_int, c_void, CStr};

use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::rank::{AgentReply, RankRequest};

use crate::lock::FutexLock;
use crate::state::{self, Mode};
use crate::{native, sys};

const MAX_SHM_FDS: usize = 256;
const MAX_ALIASES: usize = 64;
const MAX_VIEWS: usize = 512;

#[derive(Clone, Copy)]
struct ShmFd {
    fd: i32,
    ino: u64,
    id: u32,
    addr: u64,
}

#[derive(Clone, Copy)]
struct Alias {
    addr: u64,
    len: u64,
    id: u32,
    /// Window address the view starts at.
    window: u64,
}

/// How many mappings of a segment this rank holds.
#[derive(Clone, Copy)]
struct Views {
    id: u32,
    count: u32,
}

struct Tables {
    fds: [Option<ShmFd>; MAX_SHM_FDS],
    aliases: [Option<Alias>; MAX_ALIASES],
    views: [Option<Views>; MAX_VIEWS],
}

static TABLES: FutexLock<Tables> = FutexLock::new(Tables {
    fds: [None; MAX_SHM_FDS],
    aliases: [None; MAX_ALIASES],
    views: [None; MAX_VIEWS],
});

/// Counts one more mapping of segment `id`; returns whether it is the
/// rank's only one.
pub fn view_added(id: u32) -> bool {
    let mut t = TABLES.lock();
    if let Some(v) = t.views.iter_mut().flatten().find(|v| v.id == id) {
        v.count += 1;
        return false;
    }
    if let Some(slot) = t.views.iter_mut().find(|v| v.is_none()) {
        *slot = Some(Views { id, count: 1 });
    }
    // A full table only means the segment is released at the rank's exit.
    true
}

/// A new mapping of an shm_open descriptor: when the rank had released the
/// segment (all its mappings gone), it tells the agent it uses it again.
pub fn shm_view_added(id: u32) -> Result<(), i32> {
    if !view_added(id) || state::mode() != Mode::Rank {
        return Ok(());
    }
    state::mem_call(
        &RankRequest::SegmentUse { id },
        None,
        "SegmentUse",
        |r| match r {
            Ok(AgentReply::Segment { .. }) => Ok(()),
            Ok(AgentReply::Error { code, .. }) => Err(code.errno()),
            _ => Err(libc::EIO),
        },
    )
}

/// One mapping of segment `id` is gone; after the rank's last one the
/// agent may free the segment (see SegmentRelease).
pub fn view_removed(id: u32) {
    let last = {
        let mut t = TABLES.lock();
        let mut last = false;
        for slot in t.views.iter_mut() {
            if let Some(v) = slot.as_mut().filter(|v| v.id == id) {
                v.count -= 1;
                if v.count == 0 {
                    *slot = None;
                    last = true;
                }
            }
        }
        last
    };
    if last && state::mode() == Mode::Rank {
        state::mem_call(
            &RankRequest::SegmentRelease { id },
            None,
            "SegmentRelease",
            |r| {
                if let Err(e) = r {
                    crate::report!("releasing segment {}: {}", id, e);
                }
            },
        );
    }
}

/// The segment id of a shared-zone address.
pub fn segment_of(addr: u64) -> Option<u32> {
    let i = state::info()?;
    if addr < i.layout.shared_base() || addr >= i.layout.end() {
        return None;
    }
    Some(((addr - i.layout.shared_base()) / i.layout.segment_reserve) as u32)
}

pub struct Segment {
    pub id: u32,
    pub addr: u64,
    pub size: u64,
}

fn reply_to_segment(
    r: Result<AgentReply<'_>, crate::agent::AgentError>,
    what: &str,
) -> Result<Segment, i32> {
    match r {
        Ok(AgentReply::Segment { id, addr, size }) => Ok(Segment { id, addr, size }),
        Ok(AgentReply::Error { code, .. }) => Err(code.errno()),
        Ok(_) => {
            crate::report!("unexpected answer of the agent to {}", what);
            Err(libc::EIO)
        }
        Err(e) => {
            crate::report!("{} failed: {}", what, e);
            Err(libc::EIO)
        }
    }
}

/// Opens (or creates) a segment by name through the agent.
pub fn open(name: &str, size: u64, create: bool, exclusive: bool) -> Result<Segment, i32> {
    if state::mode() != Mode::Rank {
        return Err(libc::ENOTCONN);
    }
    let req = RankRequest::SegmentOpen {
        name,
        size,
        create,
        exclusive,
    };
    state::mem_call(&req, None, "SegmentOpen", |r| {
        reply_to_segment(r, "SegmentOpen")
    })
}

pub fn resize(id: u32, size: u64) -> Result<Segment, i32> {
    state::mem_call(
        &RankRequest::SegmentResize { id, size },
        None,
        "SegmentResize",
        |r| reply_to_segment(r, "SegmentResize"),
    )
}

pub fn fits_reserve(len: u64) -> bool {
    state::info().is_some_and(|i| len <= i.layout.segment_reserve)
}

/// The k-th MAP_SHARED anonymous mapping of this rank.
pub fn open_anonymous(seq: u32, len: u64) -> Result<Segment, i32> {
    if !fits_reserve(len) {
        crate::report!(
            "a MAP_SHARED anonymous mapping of {} bytes exceeds window.segment_reserve",
            len
        );
        return Err(libc::ENOMEM);
    }
    let mut name = sys::StackBuf::<32>::new();
    let _ = core::fmt::Write::write_fmt(&mut name, format_args!("anon:{seq}"));
    open(name.as_str(), len, true, false)
}

/// Maps `len` bytes of the window at `window_addr` also at `addr` (outside
/// the window), announced to the agent and, when the job has several nodes
/// (shared pages are then fetched), registered with the shared zone's
/// userfaultfd.
pub fn map_alias(addr: u64, len: u64, prot: i32, window_addr: u64, id: u32) -> Result<(), i32> {
    let info = state::info().ok_or(libc::ENOTCONN)?;
    let off = info.layout.file_offset(window_addr);
    let flags = libc::MAP_SHARED | libc::MAP_FIXED;
    sys::mmap(addr, len, prot, flags, info.memfd, off)?;
    if state::mode() == Mode::Rank {
        if info.shared_uffd >= 0 {
            // SAFETY: shared_uffd is the rank's open userfaultfd; the
            // temporary Uffd is forgotten so the fd stays open.
            let uffd = core::mem::ManuallyDrop::new(unsafe {
                mome_uffd::Uffd::from_raw_fd(info.shared_uffd)
            });
            if let Err(e) = uffd.register(addr, len, mome_uffd::mode::MISSING | mome_uffd::mode::WP)
            {
                crate::report!("cannot register the segment view at {:#x}: {}", addr, e);
                return Err(libc::EINVAL);
            }
        }
        let req = RankRequest::AliasMapped {
            addr,
            len,
            window_addr,
        };
        state::mem_call(&req, None, "AliasMapped", |r| match r {
            Ok(AgentReply::Ok) => Ok(()),
            _ => Err(libc::EIO),
        })?;
    }
    let mut t = TABLES.lock();
    if let Some(slot) = t.aliases.iter_mut().find(|a| a.is_none()) {
        *slot = Some(Alias {
            addr,
            len,
            id,
            window: window_addr,
        });
    }
    Ok(())
}

/// Forgets the segment views inside an unmapped range outside the window.
pub fn forget_alias(addr: u64, len: u64) {
    let mut gone = [u32::MAX; 8];
    let mut n = 0;
    {
        let mut t = TABLES.lock();
        for slot in t.aliases.iter_mut() {
            if let Some(a) = slot.filter(|a| a.addr >= addr && a.addr + a.len <= addr + len) {
                *slot = None;
                if n < gone.len() {
                    gone[n] = a.id;
                    n += 1;
                }
            }
        }
    }
    for &id in &gone[..n] {
        view_removed(id);
    }
}

/// Whether `[addr, addr+len)` is shared memory of the job (the shared zone
/// or a segment view).
/// The window address of range `addr..addr+len` of this rank: itself
/// inside the window, the segment's own address for a view outside it.
pub fn window_address(addr: u64, len: u64) -> Option<u64> {
    let info = state::info()?;
    if info.layout.contains_range(addr, len) {
        return Some(addr);
    }
    let t = TABLES.lock();
    t.aliases
        .iter()
        .flatten()
        .find(|a| addr >= a.addr && addr.saturating_add(len) <= a.addr + a.len)
        .map(|a| a.window + (addr - a.addr))
}

pub fn is_shared_range(addr: u64, len: u64) -> bool {
    if let Some(i) = state::info() {
        if addr >= i.layout.shared_base() && addr.saturating_add(len) <= i.layout.end() {
            return true;
        }
    }
    let t = TABLES.lock();
    t.aliases
        .iter()
        .flatten()
        .any(|a| addr >= a.addr && addr.saturating_add(len) <= a.addr + a.len)
}

fn inode(fd: i32) -> Option<u64> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fstat on a caller fd with our buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some(st.st_ino)
}

/// The segment address behind an fd returned by our shm_open, if it is one
/// (and still the same file: the application may have closed and reused it).
pub fn shm_fd_address(fd: i32) -> Option<(u32, u64)> {
    let entry = {
        let t = TABLES.lock();
        t.fds.iter().flatten().find(|e| e.fd == fd).copied()
    }?;
    if inode(fd) == Some(entry.ino) {
        Some((entry.id, entry.addr))
    } else {
        let mut t = TABLES.lock();
        for slot in t.fds.iter_mut() {
            if slot.is_some_and(|e| e.fd == fd) {
                *slot = None;
            }
        }
        None
    }
}

fn shm_entry(fd: i32) -> Option<ShmFd> {
    let t = TABLES.lock();
    let e = t.fds.iter().flatten().find(|e| e.fd == fd).copied()?;
    drop(t);
    (inode(fd) == Some(e.ino)).then_some(e)
}

/// # Safety
/// `name` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn shm_open(name: *const c_char, oflag: c_int, mode: libc::mode_t) -> c_int {
    if state::mode() != Mode::Rank {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { native::shm_open(name, oflag, mode) };
    }
    // SAFETY: the caller passes a C string.
    let Ok(text) = unsafe { CStr::from_ptr(name) }.to_str() else {
        sys::set_errno(libc::EINVAL);
        return -1;
    };
    if text.len() > 200 || text.is_empty() {
        sys::set_errno(libc::ENAMETOOLONG);
        return -1;
    }
    let create = oflag & libc::O_CREAT != 0;
    let exclusive = oflag & libc::O_EXCL != 0;
    let seg = match open(text, 0, create, exclusive) {
        Ok(s) => s,
        Err(e) => {
            sys::set_errno(e);
            return -1;
        }
    };
    let seg = if oflag & libc::O_TRUNC != 0 && seg.size != 0 {
        match resize(seg.id, 0) {
            Ok(s) => s,
            Err(e) => {
                sys::set_errno(e);
                return -1;
            }
        }
    } else {
        seg
    };
    // SAFETY: memfd_create with a literal name.
    let fd = unsafe { libc::memfd_create(c"mome-shm".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return -1;
    }
    let _ = sys::ftruncate(fd, seg.size);
    let Some(ino) = inode(fd) else {
        sys::close(fd);
        sys::set_errno(libc::EIO);
        return -1;
    };
    let mut t = TABLES.lock();
    let Some(slot) = t
        .fds
        .iter_mut()
        .find(|e| e.is_none_or(|e| inode(e.fd) != Some(e.ino)))
    else {
        drop(t);
        sys::close(fd);
        sys::set_errno(libc::EMFILE);
        return -1;
    };
    *slot = Some(ShmFd {
        fd,
        ino,
        id: seg.id,
        addr: seg.addr,
    });
    fd
}

/// # Safety
/// `name` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn shm_unlink(name: *const c_char) -> c_int {
    if state::mode() != Mode::Rank {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { native::shm_unlink(name) };
    }
    // SAFETY: the caller passes a C string.
    let Ok(text) = unsafe { CStr::from_ptr(name) }.to_str() else {
        sys::set_errno(libc::EINVAL);
        return -1;
    };
    let r = state::mem_call(
        &RankRequest::SegmentUnlink { name: text },
        None,
        "SegmentUnlink",
        |r| match r {
            Ok(AgentReply::Ok) => Ok(()),
            Ok(AgentReply::Error { code, .. }) => Err(code.errno()),
            _ => Err(libc::EIO),
        },
    );
    match r {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn ftruncate(fd: c_int, len: i64) -> c_int {
    if len >= 0 && state::mode() == Mode::Rank {
        if let Some(e) = shm_entry(fd) {
            if let Err(errno) = resize(e.id, len as u64) {
                sys::set_errno(errno);
                return -1;
            }
        }
    }
    match sys::ftruncate(fd, len as u64) {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn ftruncate64(fd: c_int, len: i64) -> c_int {
    ftruncate(fd, len)
}

/// MomeMMap: see mome.h.
pub fn mome_mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    seg: i32,
    offset: i64,
) -> Result<*mut c_void, i32> {
    if seg < 0 || offset < 0 || len == 0 || !(offset as u64).is_multiple_of(PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    let end = offset as u64 + len as u64;
    if !fits_reserve(end) {
        return Err(libc::EFBIG);
    }
    let mut name = sys::StackBuf::<32>::new();
    let _ = core::fmt::Write::write_fmt(&mut name, format_args!("mome-seg:{seg}"));
    let s = open(name.as_str(), end, true, false)?;
    let target = s.addr + offset as u64;
    if addr.is_null() || flags & libc::MAP_FIXED == 0 {
        view_added(s.id);
        return Ok(target as *mut c_void);
    }
    let a = addr as u64;
    if !a.is_multiple_of(PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    if window_range(a, len as u64) {
        if a != target {
            return Err(libc::EINVAL);
        }
        view_added(s.id);
        return Ok(addr);
    }
    let rounded = (len as u64).next_multiple_of(PAGE_SIZE);
    map_alias(a, rounded, prot, target, s.id)?;
    view_added(s.id);
    Ok(addr)
}

fn window_range(addr: u64, len: u64) -> bool {
    state::info().is_some_and(|i| addr < i.layout.end() && addr + len > i.layout.base)
}
