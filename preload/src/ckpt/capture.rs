//! The checkpoint handler's work: check that the rank can be checkpointed,
//! then write its private image (see `image`) into its image heaps.
//!
//! Runs inside a signal handler: no allocation, no lock the interrupted
//! code may hold (only the memory channel, which is never held while the
//! checkpoint signal is deliverable).

use core::fmt;
use core::sync::atomic::Ordering;

use mome_protocol::layout::HEAP_SIZE;

use super::context::Context;
use super::image::{self, fd_kind, kind, FdRecord, Header, Region};
use super::procfs::{self, MapLine};
use super::raw;
use super::{IMAGE_COUNT, IMAGE_FIRST};
use crate::state;
use crate::sys;

/// Why a rank cannot be checkpointed (sent to the agent as the reason).
pub enum Refusal {
    Threads(u64),
    Children(i64),
    Fd {
        fd: u64,
        what: [u8; 96],
        len: usize,
    },
    SharedMapping {
        start: u64,
        path: [u8; 96],
        len: usize,
    },
    DeletedFile {
        start: u64,
        path: [u8; 96],
        len: usize,
    },
    TooMany(&'static str),
    NoImageMemory(u64),
    Proc(&'static str, i32),
    NotRank,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn text(b: &[u8]) -> &str {
            core::str::from_utf8(b).unwrap_or("?")
        }
        match self {
            Refusal::Threads(n) => write!(
                f,
                "it runs {n} threads; only single-threaded ranks can be checkpointed so far"
            ),
            Refusal::Children(pid) => write!(
                f,
                "it has a child process (pid {pid}) still running; wait for it before checkpointing"
            ),
            Refusal::Fd { fd, what, len } => write!(
                f,
                "its file descriptor {fd} is {}, which cannot be restored (only regular files, directories and devices can)",
                text(&what[..*len])
            ),
            Refusal::SharedMapping { start, path, len } => write!(
                f,
                "it has a shared mapping outside the DSM window at {start:#x} ({}), which cannot be checkpointed",
                text(&path[..*len])
            ),
            Refusal::DeletedFile { start, path, len } => write!(
                f,
                "its mapping at {start:#x} is of a deleted file ({})",
                text(&path[..*len])
            ),
            Refusal::TooMany(what) => write!(f, "too many {what} for the image"),
            Refusal::NoImageMemory(bytes) => {
                write!(f, "no window heaps for its {bytes}-byte image")
            }
            Refusal::Proc(what, errno) => write!(f, "cannot read {what} (errno {errno})"),
            Refusal::NotRank => write!(f, "it is not connected to its agent"),
        }
    }
}

fn copy_text(src: &[u8]) -> ([u8; 96], usize) {
    let mut out = [0u8; 96];
    let n = src.len().min(96);
    out[..n].copy_from_slice(&src[..n]);
    (out, n)
}

/// The image heaps, grown to hold `need` bytes of image plus the tail.
fn image_run(need: u64) -> Result<(u64, u64), Refusal> {
    let info = state::info().ok_or(Refusal::NotRank)?;
    let layout = info.layout;
    let want = need + image::TAIL as u64;
    let first = IMAGE_FIRST.load(Ordering::Relaxed);
    let count = IMAGE_COUNT.load(Ordering::Relaxed);
    if first != u32::MAX && count as u64 * HEAP_SIZE >= want {
        return Ok((layout.heap_addr(first), count as u64 * HEAP_SIZE));
    }
    // Room to grow: twice what is needed now, at least 4 heaps (32 MiB of
    // address space; pages cost memory only once written).
    let heaps = (want * 2).div_ceil(HEAP_SIZE).max(4) as u32;
    let new_first = state::agent_alloc_heaps(heaps).ok_or(Refusal::NoImageMemory(need))?;
    if first != u32::MAX {
        state::agent_free_heaps(first, count);
    }
    IMAGE_FIRST.store(new_first, Ordering::Relaxed);
    IMAGE_COUNT.store(heaps, Ordering::Relaxed);
    Ok((layout.heap_addr(new_first), heaps as u64 * HEAP_SIZE))
}

/// Threads and children: both make a process image we cannot restore yet.
fn check_process(scratch: &mut [u8]) -> Result<(), Refusal> {
    let mut threads = 0u64;
    procfs::for_each_number(c"/proc/self/task", scratch, |_, _| threads += 1)
        .map_err(|e| Refusal::Proc("/proc/self/task", e))?;
    if threads > 1 {
        return Err(Refusal::Threads(threads));
    }
    if let Some(n) = procfs::read_file(c"/proc/thread-self/children", scratch) {
        let text = &scratch[..n];
        let first = text.split(|&c| c == b' ').find(|w| !w.is_empty());
        if let Some(pid) = first.and_then(|w| core::str::from_utf8(w).ok()?.trim().parse().ok()) {
            return Err(Refusal::Children(pid));
        }
    }
    Ok(())
}

struct Builder {
    meta: *mut u8,
    nregions: usize,
    nfds: usize,
    strings: usize,
    bitmaps: usize,
    data_pages: u64,
}

impl Builder {
    fn header(&mut self) -> &mut Header {
        // SAFETY: meta is a TAIL_META-byte scratch area, 4 KiB aligned, and
        // the header fits in its first OFF_REGIONS bytes.
        unsafe { &mut *self.meta.cast::<Header>() }
    }

    fn push_string(&mut self, s: &[u8]) -> Result<(u32, u32), Refusal> {
        if self.strings + s.len() > image::STRINGS_CAP {
            return Err(Refusal::TooMany("path names"));
        }
        let off = self.strings;
        // SAFETY: within the strings area of the scratch metadata.
        unsafe { raw::copy(self.meta.add(image::OFF_STRINGS + off), s.as_ptr(), s.len()) };
        self.strings += s.len();
        Ok((off as u32, s.len() as u32))
    }

    fn push_region(&mut self, r: Region) -> Result<(), Refusal> {
        if self.nregions == image::MAX_REGIONS {
            return Err(Refusal::TooMany("memory mappings"));
        }
        // SAFETY: within the regions area, Region-aligned (offsets are
        // multiples of 8 and the scratch is page aligned).
        unsafe {
            self.meta
                .add(image::OFF_REGIONS)
                .cast::<Region>()
                .add(self.nregions)
                .write(r)
        };
        self.nregions += 1;
        Ok(())
    }

    fn push_fd(&mut self, r: FdRecord) -> Result<(), Refusal> {
        if self.nfds == image::MAX_FDS {
            return Err(Refusal::TooMany("open files"));
        }
        // SAFETY: within the fds area.
        unsafe {
            self.meta
                .add(image::OFF_FDS)
                .cast::<FdRecord>()
                .add(self.nfds)
                .write(r)
        };
        self.nfds += 1;
        Ok(())
    }

    fn regions(&mut self) -> &mut [Region] {
        // SAFETY: the first `nregions` records were written by push_region.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.meta.add(image::OFF_REGIONS).cast::<Region>(),
                self.nregions,
            )
        }
    }
}

fn is_special(path: &[u8]) -> bool {
    matches!(
        path,
        b"[vvar]" | b"[vdso]" | b"[vsyscall]" | b"[vvar_vclock]"
    )
}

/// Writes the image; returns its window address and length.
pub fn capture(ctx: &Context) -> Result<(u64, u64), Refusal> {
    let info = state::info().ok_or(Refusal::NotRank)?;
    let layout = info.layout;
    // A first run to have scratch space; grown below if the image needs it.
    let (mut run, mut run_len) = image_run(0)?;
    let tail = |run: u64, run_len: u64| run + run_len - image::TAIL as u64;

    // Process checks with the pagemap scratch as buffer.
    {
        let t = tail(run, run_len);
        let pm_area = t + (image::TAIL_MAPS + image::TAIL_META) as u64;
        // SAFETY: a TAIL_PAGEMAP-byte area of our own heaps.
        let scratch =
            unsafe { core::slice::from_raw_parts_mut(pm_area as *mut u8, image::TAIL_PAGEMAP) };
        check_process(scratch)?;
    }

    // SAFETY: open of a constant path.
    let pagemap = unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if pagemap < 0 {
        return Err(Refusal::Proc("/proc/self/pagemap", sys::errno()));
    }
    let result = (|| {
        let mut b = build_metadata(info, pagemap, run, run_len)?;
        let need = (image::OFF_DATA as u64) + b.data_pages * 4096;
        if need + image::TAIL as u64 > run_len {
            // Grow, then build again in the new run's scratch (the counts
            // do not change: nothing ran in between).
            let (r, l) = image_run(need)?;
            run = r;
            run_len = l;
            b = build_metadata(info, pagemap, run, run_len)?;
        }
        write_image(info, &mut b, ctx, pagemap, run, run_len)
    })();
    sys::close(pagemap);
    let _ = layout;
    result
}

fn build_metadata(
    info: &state::RankInfo,
    pagemap: i32,
    run: u64,
    run_len: u64,
) -> Result<Builder, Refusal> {
    let layout = info.layout;
    let t = run + run_len - image::TAIL as u64;
    let maps_area = t;
    let meta_area = t + image::TAIL_MAPS as u64;
    let pm_area = meta_area + image::TAIL_META as u64;
    // SAFETY: the tail areas are ours (image heaps) and disjoint.
    let maps_buf =
        unsafe { core::slice::from_raw_parts_mut(maps_area as *mut u8, image::TAIL_MAPS) };
    // SAFETY: as above.
    let pm_buf =
        unsafe { core::slice::from_raw_parts_mut(pm_area as *mut u64, image::TAIL_PAGEMAP / 8) };
    let maps_len = procfs::read_file(c"/proc/self/maps", maps_buf).ok_or(Refusal::TooMany(
        "memory mappings (/proc/self/maps too large)",
    ))?;
    // SAFETY: the header part of the meta scratch is cleared before use.
    unsafe { core::ptr::write_bytes(meta_area as *mut u8, 0, image::OFF_REGIONS) };
    let mut b = Builder {
        meta: meta_area as *mut u8,
        nregions: 0,
        nfds: 0,
        strings: 0,
        bitmaps: 0,
        data_pages: 0,
    };
    let window = (layout.base, layout.end());
    let mut vdso = 0;
    let mut vvar = 0;
    for line in maps_buf[..maps_len].split(|&c| c == b'\n') {
        let Some(m) = procfs::parse_map_line(line) else {
            continue;
        };
        if m.start < window.1 && m.end > window.0 {
            continue;
        }
        if m.path == b"[vdso]" {
            vdso = m.start;
        }
        if m.path == b"[vvar]" {
            vvar = m.start;
        }
        if is_special(m.path) {
            continue;
        }
        region_of(&mut b, &m, pagemap, pm_buf)?;
    }
    let h = b.header();
    h.vdso = vdso;
    h.vvar = vvar;
    fds_of(&mut b, info, maps_buf, pagemap)?;
    Ok(b)
}

fn region_of(
    b: &mut Builder,
    m: &MapLine<'_>,
    pagemap: i32,
    pm: &mut [u64],
) -> Result<(), Refusal> {
    let deleted = m.path.ends_with(b" (deleted)");
    let file = m.path.first() == Some(&b'/');
    let alias = m.shared && m.path.starts_with(b"/memfd:mome-node-");
    let k = if alias {
        kind::ALIAS
    } else if m.path == b"[stack]" {
        kind::STACK
    } else if m.path == b"[heap]" {
        kind::HEAP
    } else if file && m.shared {
        kind::FILE_SHARED
    } else if file {
        kind::FILE
    } else {
        kind::ANON
    };
    if m.shared && !alias && (k != kind::FILE_SHARED || deleted) {
        let (path, len) = copy_text(m.path);
        return Err(Refusal::SharedMapping {
            start: m.start,
            path,
            len,
        });
    }
    let npages = (m.end - m.start) / 4096;
    let file = file && !alias;
    let (path_off, path_len) = if file { b.push_string(m.path)? } else { (0, 0) };
    let (mut file_size, mut file_mtime) = (0u64, 0i64);
    if k == kind::FILE || k == kind::FILE_SHARED {
        // SAFETY: libc::stat is plain data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        let mut cpath = [0u8; image::PATH_MAX];
        let n = m.path.len().min(image::PATH_MAX - 1);
        cpath[..n].copy_from_slice(&m.path[..n]);
        // SAFETY: NUL-terminated path, stat into our struct.
        if !deleted && unsafe { libc::stat(cpath.as_ptr().cast(), &mut st) } == 0 {
            file_size = st.st_size as u64;
            file_mtime = st.st_mtime;
        }
    }
    let mut region = Region {
        start: m.start,
        end: m.end,
        prot: m.prot,
        kind: k,
        file_offset: m.offset,
        path_off,
        path_len,
        dev: m.dev,
        inode: m.inode,
        file_size,
        file_mtime,
        bitmap_off: 0,
        data_off: 0,
        saved_pages: 0,
    };
    let readable = m.prot & libc::PROT_READ as u32 != 0;
    if k != kind::FILE_SHARED && k != kind::ALIAS && readable {
        let bitmap_bytes = npages.div_ceil(8) as usize;
        let bitmap_bytes = bitmap_bytes.next_multiple_of(8);
        if b.bitmaps + bitmap_bytes > image::BITMAPS_CAP {
            return Err(Refusal::TooMany("mapped pages (bitmaps)"));
        }
        // SAFETY: within the bitmaps area of the metadata scratch.
        let bitmap = unsafe { b.meta.add(image::OFF_BITMAPS + b.bitmaps) };
        // SAFETY: as above.
        unsafe { core::ptr::write_bytes(bitmap, 0, bitmap_bytes) };
        let mut saved = 0u64;
        let first_page = m.start / 4096;
        let mut done = 0u64;
        while done < npages {
            let n = (npages - done).min(pm.len() as u64);
            if !procfs::read_pagemap(pagemap, first_page + done, &mut pm[..n as usize]) {
                return Err(Refusal::Proc("/proc/self/pagemap", sys::errno()));
            }
            for (i, &e) in pm[..n as usize].iter().enumerate() {
                if procfs::page_is_private_data(e) {
                    let p = done + i as u64;
                    // SAFETY: p < npages, within the bitmap.
                    unsafe { *bitmap.add((p / 8) as usize) |= 1 << (p % 8) };
                    saved += 1;
                }
            }
            done += n;
        }
        if saved > 0 && deleted {
            let (path, len) = copy_text(m.path);
            return Err(Refusal::DeletedFile {
                start: m.start,
                path,
                len,
            });
        }
        region.bitmap_off = (image::OFF_BITMAPS + b.bitmaps) as u64;
        region.data_off = image::OFF_DATA as u64 + b.data_pages * 4096;
        region.saved_pages = saved;
        b.bitmaps += bitmap_bytes;
        b.data_pages += saved;
    }
    b.push_region(region)
}

fn own_fd(info: &state::RankInfo, fd: i32) -> bool {
    fd == info.memfd
        || fd == info.shared_uffd
        || fd == state::MEM_FD.load(Ordering::Relaxed)
        || fd == state::SYNC_FD.load(Ordering::Relaxed)
}

fn fds_of(
    b: &mut Builder,
    info: &state::RankInfo,
    scratch: &mut [u8],
    pagemap: i32,
) -> Result<(), Refusal> {
    let mut result = Ok(());
    let mut dir_fd = -1;
    // The directory listing goes to the first half of the scratch, link
    // targets to the second.
    let (list, rest) = scratch.split_at_mut(scratch.len() / 2);
    let r = procfs::for_each_number(c"/proc/self/fd", list, |n, dir| {
        dir_fd = dir;
        if result.is_err() {
            return;
        }
        let fd = n as i32;
        if fd == dir || fd == pagemap || own_fd(info, fd) {
            return;
        }
        result = fd_record(b, fd, rest);
    });
    r.map_err(|e| Refusal::Proc("/proc/self/fd", e))?;
    result
}

fn fd_record(b: &mut Builder, fd: i32, buf: &mut [u8]) -> Result<(), Refusal> {
    let mut link = sys::StackBuf::<32>::new();
    let _ = core::fmt::Write::write_fmt(&mut link, format_args!("/proc/self/fd/{fd}\0"));
    let Ok(link) = core::ffi::CStr::from_bytes_with_nul(link.as_bytes()) else {
        return Ok(());
    };
    let target_len = procfs::readlink(link, buf).unwrap_or(0);
    let target = &buf[..target_len];
    // SAFETY: fstat/fcntl/lseek on an open fd of ours.
    let (st, flags, fdflags, offset) = unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Ok(()); // closed meanwhile
        }
        (
            st,
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
            libc::lseek(fd, 0, libc::SEEK_CUR),
        )
    };
    let fmt = st.st_mode & libc::S_IFMT;
    let fdk = if fd <= 2 {
        fd_kind::STDIO
    } else if fmt == libc::S_IFREG
        && target.first() == Some(&b'/')
        && !target.ends_with(b" (deleted)")
    {
        fd_kind::FILE
    } else if fmt == libc::S_IFDIR && target.first() == Some(&b'/') {
        fd_kind::DIR
    } else if fmt == libc::S_IFCHR && target.first() == Some(&b'/') {
        fd_kind::CHAR
    } else {
        let (what, len) = copy_text(if target.is_empty() {
            b"unknown"
        } else {
            target
        });
        return Err(Refusal::Fd {
            fd: fd as u64,
            what,
            len,
        });
    };
    let (path_off, path_len) = if fdk == fd_kind::STDIO {
        (0, 0)
    } else {
        b.push_string(target)?
    };
    b.push_fd(FdRecord {
        fd,
        flags,
        offset,
        kind: fdk,
        path_off,
        path_len,
        cloexec: (fdflags & libc::FD_CLOEXEC != 0) as u32,
    })
}

fn write_image(
    info: &state::RankInfo,
    b: &mut Builder,
    ctx: &Context,
    _pagemap: i32,
    run: u64,
    run_len: u64,
) -> Result<(u64, u64), Refusal> {
    let total = image::OFF_DATA as u64 + b.data_pages * 4096;
    let (nregions, nfds) = (b.nregions, b.nfds);
    {
        let h = b.header();
        h.magic = image::MAGIC;
        h.version = image::VERSION;
        h.nregions = nregions as u32;
        h.nfds = nfds as u32;
        h.complete = 1;
        h.total_len = total;
        h.run_bytes = run_len;
        h.ctx = *ctx;
        h.pid = info.pid;
        h.rank = info.rank;
        let (exe_dev, exe_inode) = exe_identity();
        h.exe_dev = exe_dev;
        h.exe_inode = exe_inode;
        h.mem_fd = state::MEM_FD.load(Ordering::Relaxed);
        h.sync_fd = state::SYNC_FD.load(Ordering::Relaxed);
        h.memfd = info.memfd;
        h.shared_uffd = info.shared_uffd;
        h.regions_off = image::OFF_REGIONS as u64;
        h.fds_off = image::OFF_FDS as u64;
        h.strings_off = image::OFF_STRINGS as u64;
        h.bitmaps_off = image::OFF_BITMAPS as u64;
        h.data_off = image::OFF_DATA as u64;
        process_state(h);
    }
    // Page data first, metadata last.
    let image = run as *mut u8;
    let _ = run_len;
    let meta = b.meta;
    for r in b.regions().iter() {
        if r.saved_pages == 0 {
            continue;
        }
        // SAFETY: bitmap_off points into the metadata scratch we built.
        let bitmap = unsafe { meta.add(r.bitmap_off as usize) };
        let npages = (r.end - r.start) / 4096;
        let mut slot = 0u64;
        for p in 0..npages {
            // SAFETY: p < npages, within the bitmap.
            if !unsafe { image::bit(bitmap, p) } {
                continue;
            }
            // SAFETY: the page is mapped readable (it is present in the
            // pagemap of a readable region) and the destination slot is
            // inside the run (sized from the page count above).
            unsafe {
                raw::put_if_changed(
                    image.add(r.data_off as usize + (slot * 4096) as usize),
                    (r.start + p * 4096) as *const u8,
                    4096,
                )
            };
            slot += 1;
        }
    }
    let parts = [
        (0usize, core::mem::size_of::<Header>()),
        (
            image::OFF_REGIONS,
            nregions * core::mem::size_of::<Region>(),
        ),
        (image::OFF_FDS, nfds * core::mem::size_of::<FdRecord>()),
        (image::OFF_STRINGS, b.strings.next_multiple_of(8)),
        (image::OFF_BITMAPS, b.bitmaps),
    ];
    for (off, len) in parts {
        // SAFETY: same offsets in the scratch metadata and in the image,
        // both inside their areas.
        unsafe { raw::put_if_changed(image.add(off), b.meta.add(off), len.next_multiple_of(8)) };
    }
    // The scratch pages would otherwise go into every increment.
    let t = run + run_len - image::TAIL as u64;
    let _ = sys::drop_pages(t, (image::TAIL - image::TAIL_STACK) as u64);
    Ok((run, total))
}

/// Kernel-side state of the process: signal actions, limits, cwd, brk, fs.
fn process_state(h: &mut Header) {
    for sig in 1..image::MAX_SIGNALS as i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = image::KernelSigaction::default();
        // SAFETY: rt_sigaction query into our struct (8-byte mask).
        unsafe {
            raw::syscall6(
                libc::SYS_rt_sigaction,
                [sig as u64, 0, &mut old as *mut _ as u64, 8, 0, 0],
            )
        };
        h.sigactions[sig as usize] = old;
    }
    for res in 0..image::MAX_RLIMITS {
        let mut lim = image::Rlimit::default();
        // SAFETY: prlimit64 query of our own process into our struct.
        unsafe {
            raw::syscall6(
                libc::SYS_prlimit64,
                [0, res as u64, 0, &mut lim as *mut _ as u64, 0, 0],
            )
        };
        h.rlimits[res] = lim;
    }
    // SAFETY: getcwd writes at most PATH_MAX bytes into the header's buffer.
    unsafe {
        raw::sys(
            libc::SYS_getcwd,
            h.cwd.as_mut_ptr() as u64,
            image::PATH_MAX as u64,
            0,
        )
    };
    // SAFETY: brk(0) only reports the break.
    h.brk = unsafe { raw::sys(libc::SYS_brk, 0, 0, 0) } as u64;
    let mut fs: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64.
    unsafe { raw::sys(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64 as u64, 0) };
    h.fs_base = fs;
    let mut mask: u64 = 0;
    // SAFETY: rt_sigprocmask query into an 8-byte set.
    unsafe {
        raw::syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_BLOCK as u64,
                0,
                &mut mask as *mut u64 as u64,
                8,
                0,
                0,
            ],
        )
    };
    h.handler_mask = mask;
}

/// Device and inode of this process's executable.
pub fn exe_identity() -> (u64, u64) {
    // SAFETY: stat of a constant path into our struct.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        if libc::stat(c"/proc/self/exe".as_ptr(), &mut st) != 0 {
            return (0, 0);
        }
        (st.st_dev, st.st_ino)
    }
}
