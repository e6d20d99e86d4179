//! Restoring a rank from its private image, in a freshly started process
//! (the library's constructor, MOME_RESTORE set).
//!
//! `run` joins the restored job (the agent serves the window's pages from
//! the checkpoint store as they are touched), checks the image against this
//! machine (same libraries, vdso), opens the connections that will replace
//! the old ones, then switches to a temporary stack in the window and calls
//! `rebuild`, which rewrites the address space and kernel-side state and
//! jumps back into the checkpoint handler of the old process. `rebuild`
//! overwrites libc's and this library's own data: from there on it uses
//! only raw system calls, its stack, and the image.

use core::sync::atomic::Ordering;

use mome_protocol::layout::WindowLayout;
use mome_protocol::rank::{AgentReply, Channel as ChannelKind, RankRequest};
use mome_protocol::PROTOCOL_VERSION;
use mome_uffd::{feature, mode as uffd_mode};

use super::context;
use super::image::{self, fd_kind, kind, Header, Region};
use super::procfs;
use super::raw::{self, sys, syscall6};
use crate::agent::{self, Channel, REPLY_BUF};
use crate::sys::fatal;

/// What `rebuild` needs, copied onto the temporary stack first thing.
#[derive(Clone, Copy)]
#[repr(C)]
struct Plan {
    image: u64,
    mem_fd: i32,
    sync_fd: i32,
    memfd: i32,
    /// Several nodes: the new userfaultfd of the shared zone (-1 on one).
    shared_uffd: i32,
}

/// Everything the constructor knows when it finds MOME_RESTORE set.
pub struct Start<'a> {
    pub rank: u32,
    pub pid: i32,
    pub jobid: &'a str,
    pub socket: &'a str,
    pub timeout_ms: u64,
}

fn hello(ch: &Channel, s: &Start<'_>, channel: ChannelKind) -> Option<i32> {
    let req = RankRequest::Hello {
        protocol: PROTOCOL_VERSION,
        rank: s.rank,
        pid: s.pid,
        channel,
        jobid: s.jobid,
        restoring: true,
    };
    let mut buf = [0u8; REPLY_BUF];
    match ch.call(&req, None, &mut buf, "Hello (restore)", false) {
        Ok((AgentReply::Welcome { .. }, fd)) => fd,
        Ok((AgentReply::Error { message, .. }, _)) => fatal(format_args!(
            "rank {}: the agent refused the restore: {message}",
            s.rank
        )),
        Ok(_) => fatal(format_args!("rank {}: unexpected answer to Hello", s.rank)),
        Err(e) => fatal(format_args!("rank {}: restore: {e}", s.rank)),
    }
}

fn call_ok(ch: &Channel, req: &RankRequest<'_>, fd: Option<i32>, what: &'static str, rank: u32) {
    let mut buf = [0u8; REPLY_BUF];
    match ch.call(req, fd, &mut buf, what, false) {
        Ok((AgentReply::Ok, _)) => {}
        Ok((AgentReply::Error { message, .. }, _)) => {
            fatal(format_args!("rank {rank}: restore: {what}: {message}"))
        }
        Ok(_) => fatal(format_args!(
            "rank {rank}: restore: unexpected answer to {what}"
        )),
        Err(e) => fatal(format_args!("rank {rank}: restore: {what}: {e}")),
    }
}

/// Returned by `run` in a process that is not the checkpointed program
/// itself but a wrapper that will exec it.
pub struct Passthrough;

/// Restores the rank; does not return (the program resumes where it was
/// checkpointed) unless this process is a wrapper of the program.
pub fn run(s: Start<'_>, map_window: impl FnOnce(&WindowLayout, i32)) -> Passthrough {
    let rank = s.rank;
    let ch = Channel::connect(s.socket, s.timeout_ms).unwrap_or_else(|e| {
        fatal(format_args!(
            "rank {rank}: cannot connect to the agent at {}: {e}",
            s.socket
        ))
    });
    let req = RankRequest::Hello {
        protocol: PROTOCOL_VERSION,
        rank,
        pid: s.pid,
        channel: ChannelKind::Memory,
        jobid: s.jobid,
        restoring: true,
    };
    let mut buf = [0u8; REPLY_BUF];
    let (layout, nodes, memfd) = match ch.call(&req, None, &mut buf, "Hello (restore)", false) {
        Ok((AgentReply::Welcome { layout, nodes, .. }, Some(fd))) => {
            (layout, nodes, agent::move_high(fd))
        }
        Ok((AgentReply::Error { message, .. }, _)) => fatal(format_args!(
            "rank {rank}: the agent refused the restore: {message}"
        )),
        Ok(_) => fatal(format_args!(
            "rank {rank}: the agent's welcome had no memory file"
        )),
        Err(e) => fatal(format_args!("rank {rank}: restore: {e}")),
    };
    map_window(&layout, memfd);

    // The same userfaultfd tracks dirty pages (async write-protect) as
    // before; the agent adds MISSING mode on the heaps and segments the
    // checkpoint held, whose pages it then serves from the store. Several
    // nodes: that is the private zone; the shared zone is the page
    // protocol's, as in a fresh start (`state::start`), and its pages the
    // stamp held are back in the node's memory before the rank starts.
    let multi_node = nodes > 1;
    let restored_len = if multi_node {
        layout.private_size
    } else {
        layout.size
    };
    let uffd = crate::state::make_uffd(
        rank,
        "restored",
        feature::MISSING_SHMEM
            | feature::WP_HUGETLBFS_SHMEM
            | feature::WP_ASYNC
            | feature::WP_UNPOPULATED,
        (layout.base, restored_len),
        uffd_mode::WP,
    );
    call_ok(
        &ch,
        &RankRequest::RegisterUffd {
            zone: mome_protocol::layout::Zone::Private,
        },
        Some(uffd),
        "RegisterUffd",
        rank,
    );
    crate::sys::close(uffd);
    let shared_uffd = if multi_node {
        let fd = crate::state::make_uffd(
            rank,
            "shared",
            feature::MISSING_SHMEM | feature::WP_HUGETLBFS_SHMEM,
            (layout.shared_base(), layout.shared_size()),
            uffd_mode::MISSING | uffd_mode::WP,
        );
        let kept = agent::move_high(fd);
        // SCM_RIGHTS hands the agent a copy; the rank keeps `kept` (aliases
        // are registered on it later, as in a fresh start).
        call_ok(
            &ch,
            &RankRequest::RegisterUffd {
                zone: mome_protocol::layout::Zone::Shared,
            },
            Some(kept),
            "RegisterUffd",
            rank,
        );
        kept
    } else {
        -1
    };
    crate::state::register_pagemap(&ch, rank);

    let (addr, len) = match ch.call(
        &RankRequest::RestoreImage,
        None,
        &mut buf,
        "RestoreImage",
        false,
    ) {
        Ok((AgentReply::Image { addr, len }, _)) => (addr, len),
        Ok((AgentReply::Error { message, .. }, _)) => fatal(format_args!(
            "rank {rank}: no private image to restore: {message}"
        )),
        Ok(_) => fatal(format_args!(
            "rank {rank}: unexpected answer to RestoreImage"
        )),
        Err(e) => fatal(format_args!("rank {rank}: RestoreImage: {e}")),
    };
    if !layout.contains_range(addr, len.max(1)) || len < image::OFF_DATA as u64 {
        fatal(format_args!(
            "rank {rank}: the agent gave an image at {addr:#x}+{len} outside the window"
        ));
    }
    // SAFETY: the image is inside the window we just mapped; the agent
    // fills its pages from the store on first touch.
    let h = unsafe { &*(addr as *const Header) };
    if h.magic != image::MAGIC || h.version != image::VERSION || h.complete == 0 {
        fatal(format_args!(
            "rank {rank}: the private image at {addr:#x} is not a complete mome image (version {})",
            h.version
        ));
    }
    if h.rank != rank || h.total_len != len {
        fatal(format_args!(
            "rank {rank}: the image belongs to rank {} ({} bytes, expected {len})",
            h.rank, h.total_len
        ));
    }
    if super::capture::exe_identity() != (h.exe_dev, h.exe_inode) {
        // A wrapper (a script's interpreter, `env`) that will exec the
        // checkpointed program: give the session back untouched (the agent
        // keeps the rank's memory for the next connection) and run natively.
        // SAFETY: unmapping the window we mapped above; nothing uses it.
        let _ = crate::sys::munmap(layout.base, layout.size);
        crate::sys::close(memfd);
        drop(ch);
        return Passthrough;
    }
    check_files(h, addr, rank);
    restore_aliases(h, addr, &layout, &ch, rank, (memfd, shared_uffd));
    move_vdso(h, rank);

    let sync_fd = if h.sync_fd >= 0 {
        let sch = Channel::connect(s.socket, s.timeout_ms)
            .unwrap_or_else(|e| fatal(format_args!("rank {rank}: sync channel: {e}")));
        if let Some(fd) = hello(&sch, &s, ChannelKind::Sync) {
            crate::sys::close(fd);
        }
        let fd = sch.fd();
        core::mem::forget(sch);
        fd
    } else {
        -1
    };
    let plan = Plan {
        image: addr,
        mem_fd: ch.fd(),
        sync_fd,
        memfd,
        shared_uffd,
    };
    core::mem::forget(ch);
    let top = (addr + h.run_bytes) & !15;
    // SAFETY: the top of the image run is a TAIL_STACK-byte area of our own
    // heaps, untouched by the image; `rebuild` never returns.
    unsafe { context::mome_call_on_stack(top, rebuild, &plan as *const Plan as u64) }
}

/// Views of the window outside it (Fortran common blocks): their pages are
/// fetched now through the window (the view itself is not registered with
/// the userfaultfd), and the agent learns of them again.
///
/// Several nodes (`shared_uffd` >= 0): the view is mapped here already and
/// registered with the shared zone's userfaultfd before the agent hears of
/// it, as `segments::map_alias` does, so that writes through it go by the
/// page protocol (the agent write-protects the pages it holds read-only at
/// every address of a page, the view's included).
fn restore_aliases(
    h: &Header,
    base: u64,
    layout: &WindowLayout,
    ch: &Channel,
    rank: u32,
    (memfd, shared_uffd): (i32, i32),
) {
    // SAFETY: the image is complete (checked by the caller).
    let regions = unsafe { h.regions(base as *const u8) };
    for r in regions.iter().filter(|r| r.kind == kind::ALIAS) {
        let window_addr = layout.base + r.file_offset;
        let len = r.end - r.start;
        if !layout.contains_range(window_addr, len) {
            fatal(format_args!(
                "rank {rank}: the image has a view at {:#x} of memory outside the window",
                r.start
            ));
        }
        if shared_uffd >= 0 {
            let off = layout.file_offset(window_addr);
            if crate::sys::mmap(
                r.start,
                len,
                r.prot as i32,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd,
                off,
            )
            .is_err()
            {
                fatal(format_args!(
                    "rank {rank}: cannot map the view at {:#x} of the window again",
                    r.start
                ));
            }
            // SAFETY: shared_uffd is our open userfaultfd; the temporary
            // Uffd is not dropped, so the fd stays open.
            let uffd =
                core::mem::ManuallyDrop::new(unsafe { mome_uffd::Uffd::from_raw_fd(shared_uffd) });
            if let Err(e) = uffd.register(r.start, len, uffd_mode::MISSING | uffd_mode::WP) {
                fatal(format_args!(
                    "rank {rank}: cannot register the view at {:#x}: {e}",
                    r.start
                ));
            }
        }
        let mut p = window_addr;
        while p < window_addr + len {
            // SAFETY: a window page: the read makes the agent fill it.
            unsafe { core::ptr::read_volatile(p as *const u8) };
            p += 4096;
        }
        call_ok(
            ch,
            &RankRequest::AliasMapped {
                addr: r.start,
                len,
                window_addr,
            },
            None,
            "AliasMapped",
            rank,
        );
    }
}

/// Every library and mapped file must be the one that was checkpointed.
fn check_files(h: &Header, base: u64, rank: u32) {
    // SAFETY: the image is complete (checked by the caller).
    let regions = unsafe { h.regions(base as *const u8) };
    for r in regions {
        if (r.kind != kind::FILE && r.kind != kind::FILE_SHARED) || r.file_size == 0 {
            continue;
        }
        // SAFETY: path offsets come from this image.
        let path = unsafe { h.string(base as *const u8, r.path_off, r.path_len) };
        let mut cpath = [0u8; image::PATH_MAX];
        let n = path.len().min(image::PATH_MAX - 1);
        cpath[..n].copy_from_slice(&path[..n]);
        // SAFETY: stat of a NUL-terminated path into our struct.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        let ok = unsafe { libc::stat(cpath.as_ptr().cast(), &mut st) } == 0;
        let shown = core::str::from_utf8(path).unwrap_or("?");
        if !ok {
            fatal(format_args!(
                "rank {rank}: cannot restore: {shown}, mapped at the checkpoint, is gone"
            ));
        }
        if st.st_size as u64 != r.file_size || st.st_mtime != r.file_mtime {
            fatal(format_args!(
                "rank {rank}: cannot restore: {shown} changed since the checkpoint (size {} -> {}, mtime {} -> {})",
                r.file_size, st.st_size, r.file_mtime, st.st_mtime
            ));
        }
    }
}

/// The vdso (and its data pages) must sit where the old process had them:
/// the restored libc holds pointers into it.
fn move_vdso(h: &Header, rank: u32) {
    let mut buf = [0u8; 64 << 10];
    let Some(n) = procfs::read_file(c"/proc/self/maps", &mut buf) else {
        return;
    };
    let mut cur = [(0u64, 0u64); 2]; // vvar, vdso
    for line in buf[..n].split(|&c| c == b'\n') {
        if let Some(m) = procfs::parse_map_line(line) {
            if m.path == b"[vvar]" {
                cur[0] = (m.start, m.end - m.start);
            } else if m.path == b"[vdso]" {
                cur[1] = (m.start, m.end - m.start);
            }
        }
    }
    for ((start, len), want) in cur.into_iter().zip([h.vvar, h.vdso]) {
        if start == want || want == 0 || start == 0 {
            continue;
        }
        if crate::sys::mremap(
            start,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            want,
        )
        .is_err()
        {
            fatal(format_args!(
                "rank {rank}: cannot move the vdso from {start:#x} to {want:#x} where the checkpointed process had it"
            ));
        }
    }
}

// ---- from here on: raw system calls only ----

fn die(msg: &[u8]) -> ! {
    // SAFETY: write to stderr and exit; nothing else is safe any more.
    unsafe {
        sys(libc::SYS_write, 2, msg.as_ptr() as u64, msg.len() as u64);
        sys(libc::SYS_exit_group, 125, 0, 0);
    }
    // SAFETY: exit_group does not return.
    unsafe { core::hint::unreachable_unchecked() }
}

fn cstr(src: &[u8], out: &mut [u8; image::PATH_MAX]) -> u64 {
    let n = src.len().min(image::PATH_MAX - 1);
    let mut i = 0;
    while i < n {
        out[i] = src[i];
        i += 1;
    }
    out[n] = 0;
    out.as_ptr() as u64
}

extern "C" fn rebuild(plan_addr: u64) -> ! {
    // SAFETY: the plan is on the old stack, still intact: nothing has been
    // restored yet.
    let plan = unsafe { *(plan_addr as *const Plan) };
    let base = plan.image as *const u8;
    // SAFETY: checked complete by `run`.
    let h = unsafe { &*(plan.image as *const Header) };
    let tail = plan.image + h.run_bytes - image::TAIL as u64;
    let maps_area = tail as *mut u8;
    let pm_area = (tail + (image::TAIL_MAPS + image::TAIL_META) as u64) as *mut u64;
    let pm_len = image::TAIL_PAGEMAP / 8;

    // The current mappings, before anything changes.
    // SAFETY: raw open/read/close into the maps scratch area.
    let maps_len = unsafe {
        let fd = sys(
            libc::SYS_open,
            c"/proc/self/maps".as_ptr() as u64,
            libc::O_RDONLY as u64,
            0,
        );
        if fd < 0 {
            die(b"mome: restore: cannot read /proc/self/maps\n");
        }
        let mut len = 0usize;
        loop {
            let n = sys(
                libc::SYS_read,
                fd as u64,
                maps_area.add(len) as u64,
                (image::TAIL_MAPS - len) as u64,
            );
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        sys(libc::SYS_close, fd as u64, 0, 0);
        len
    };
    // SAFETY: written just above.
    let maps = unsafe { core::slice::from_raw_parts(maps_area, maps_len) };
    // SAFETY: raw open.
    let pagemap = unsafe {
        sys(
            libc::SYS_open,
            c"/proc/self/pagemap".as_ptr() as u64,
            libc::O_RDONLY as u64,
            0,
        )
    };
    if pagemap < 0 {
        die(b"mome: restore: cannot open /proc/self/pagemap\n");
    }

    // Limits first: the descriptor numbers below must fit under them.
    for (res, lim) in h.rlimits.iter().enumerate() {
        if lim.cur == 0 && lim.max == 0 {
            continue;
        }
        // SAFETY: prlimit64 on ourselves from a struct in the image.
        unsafe {
            syscall6(
                libc::SYS_prlimit64,
                [0, res as u64, lim as *const _ as u64, 0, 0, 0],
            )
        };
    }
    if h.brk != 0 {
        // SAFETY: moves the program break back where it was.
        unsafe { sys(libc::SYS_brk, h.brk, 0, 0) };
    }
    // SAFETY: the image is complete.
    let regions = unsafe { h.regions(base) };
    for r in regions {
        restore_region(
            h,
            base,
            plan.memfd,
            r,
            maps,
            pagemap as i32,
            pm_area,
            pm_len,
        );
    }
    // SAFETY: raw close.
    unsafe { sys(libc::SYS_close, pagemap as u64, 0, 0) };
    restore_fds(h, base, &plan);
    // SAFETY: chdir to the NUL-terminated cwd of the image.
    unsafe { sys(libc::SYS_chdir, h.cwd.as_ptr() as u64, 0, 0) };
    for (sig, act) in h.sigactions.iter().enumerate().skip(1) {
        if sig as i32 == libc::SIGKILL || sig as i32 == libc::SIGSTOP {
            continue;
        }
        // SAFETY: the kernel sigaction saved at the checkpoint.
        unsafe {
            syscall6(
                libc::SYS_rt_sigaction,
                [sig as u64, act as *const _ as u64, 0, 8, 0, 0],
            )
        };
    }
    if h.fs_base != 0 {
        // SAFETY: the thread pointer the old process had; its TLS block is
        // restored at the same address.
        unsafe { sys(libc::SYS_arch_prctl, 0x1002, h.fs_base, 0) };
    }
    // SAFETY: the mask the handler ran with.
    unsafe {
        syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as u64,
                &h.handler_mask as *const u64 as u64,
                0,
                8,
                0,
                0,
            ],
        )
    };
    // SAFETY: the stack the context refers to is restored.
    unsafe { context::mome_ctx_resume(&h.ctx) }
}

fn same_mapping(maps: &[u8], r: &Region) -> bool {
    for line in maps.split(|&c| c == b'\n') {
        let Some(m) = procfs::parse_map_line(line) else {
            continue;
        };
        if m.start == r.start && m.end == r.end {
            if r.kind == kind::ALIAS {
                // Mapped again (and registered) by `restore_aliases`.
                return m.shared && m.offset == r.file_offset;
            }
            let file = r.kind == kind::FILE || r.kind == kind::FILE_SHARED;
            return (!file || (m.inode == r.inode && m.offset == r.file_offset))
                && (m.shared == (r.kind == kind::FILE_SHARED));
        }
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn restore_region(
    h: &Header,
    base: *const u8,
    memfd: i32,
    r: &Region,
    maps: &[u8],
    pagemap: i32,
    pm: *mut u64,
    pm_len: usize,
) {
    let len = r.end - r.start;
    let prot = r.prot as u64;
    let rw = prot | (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let present = same_mapping(maps, r);
    if !present {
        let mut path = [0u8; image::PATH_MAX];
        // SAFETY: raw open/mmap/close; MAP_FIXED over the range the old
        // process had here, which is what the program expects.
        unsafe {
            let res = match r.kind {
                kind::ALIAS => syscall6(
                    libc::SYS_mmap,
                    [
                        r.start,
                        len,
                        prot,
                        (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                        memfd as u64,
                        r.file_offset,
                    ],
                ),
                kind::FILE | kind::FILE_SHARED => {
                    let p = cstr(h.string(base, r.path_off, r.path_len), &mut path);
                    let shared = r.kind == kind::FILE_SHARED;
                    let writable = r.prot & libc::PROT_WRITE as u32 != 0;
                    let mode = if shared && writable {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let fd = sys(libc::SYS_open, p, (mode | libc::O_CLOEXEC) as u64, 0);
                    if fd < 0 {
                        die(b"mome: restore: cannot open a file the checkpointed process had mapped\n");
                    }
                    let flags = if shared {
                        libc::MAP_SHARED
                    } else {
                        libc::MAP_PRIVATE
                    };
                    let m = syscall6(
                        libc::SYS_mmap,
                        [
                            r.start,
                            len,
                            if shared { prot } else { rw },
                            (flags | libc::MAP_FIXED) as u64,
                            fd as u64,
                            r.file_offset,
                        ],
                    );
                    sys(libc::SYS_close, fd as u64, 0, 0);
                    m
                }
                _ => {
                    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                    if r.kind == kind::STACK {
                        flags |= libc::MAP_GROWSDOWN;
                    }
                    syscall6(
                        libc::SYS_mmap,
                        [r.start, len, rw, flags as u64, u64::MAX, 0],
                    )
                }
            };
            if res < 0 {
                die(b"mome: restore: cannot map a region of the checkpointed process again\n");
            }
        }
    } else if r.kind != kind::FILE_SHARED
        && r.kind != kind::ALIAS
        && prot != rw
        && r.saved_pages > 0
    {
        // SAFETY: temporary write access to a mapping being restored.
        unsafe { sys(libc::SYS_mprotect, r.start, len, rw) };
    }
    if r.kind != kind::FILE_SHARED && r.kind != kind::ALIAS && r.bitmap_off != 0 {
        // SAFETY: bitmap and data offsets come from this image.
        let bitmap = unsafe { base.add(r.bitmap_off as usize) };
        let npages = len / 4096;
        let mut slot = 0u64;
        let mut done = 0u64;
        while done < npages {
            let n = (npages - done).min(pm_len as u64);
            // SAFETY: pm is a pm_len-entry scratch area of ours.
            let entries = unsafe { core::slice::from_raw_parts_mut(pm, n as usize) };
            if present {
                // SAFETY: pread into the scratch area.
                let got = unsafe {
                    syscall6(
                        libc::SYS_pread64,
                        [
                            pagemap as u64,
                            pm as u64,
                            n * 8,
                            (r.start / 4096 + done) * 8,
                            0,
                            0,
                        ],
                    )
                };
                if got != (n * 8) as i64 {
                    die(b"mome: restore: cannot read /proc/self/pagemap\n");
                }
            }
            for i in 0..n {
                let p = done + i;
                let addr = r.start + p * 4096;
                // SAFETY: p < npages: inside the bitmap.
                if unsafe { image::bit(bitmap, p) } {
                    // SAFETY: the slot is inside the image; the page is
                    // mapped writable.
                    unsafe {
                        raw::copy(
                            addr as *mut u8,
                            base.add((r.data_off + slot * 4096) as usize),
                            4096,
                        )
                    };
                    slot += 1;
                } else if present && procfs::page_is_private_data(entries[i as usize]) {
                    // Modified by this new process but not by the old one:
                    // back to the file's (or zero) content.
                    // SAFETY: drops one private page of a restored mapping.
                    unsafe { sys(libc::SYS_madvise, addr, 4096, libc::MADV_DONTNEED as u64) };
                }
            }
            done += n;
        }
    }
    let own_prot = r.kind == kind::FILE_SHARED || r.kind == kind::ALIAS;
    if !own_prot && prot != rw && (r.saved_pages > 0 || !present) {
        // SAFETY: the protection the old process had.
        unsafe { sys(libc::SYS_mprotect, r.start, len, prot) };
    }
}

fn restore_fds(h: &Header, base: *const u8, plan: &Plan) {
    // SAFETY: the image is complete.
    let fds = unsafe { h.fds(base) };
    let targets_max = fds
        .iter()
        .map(|f| f.fd)
        .chain([h.mem_fd, h.sync_fd, h.memfd, h.shared_uffd])
        .max()
        .unwrap_or(2);
    let wanted = |fd: i32| {
        fd == h.mem_fd
            || fd == h.sync_fd
            || fd == h.memfd
            || fd == h.shared_uffd
            || fds.iter().any(|f| f.fd == fd && f.kind != fd_kind::STDIO)
    };
    // Our new descriptors out of the way of every number to be restored.
    let mut ours = [
        (plan.mem_fd, h.mem_fd),
        (plan.sync_fd, h.sync_fd),
        (plan.memfd, h.memfd),
        (plan.shared_uffd, h.shared_uffd),
    ];
    for (new, old) in ours.iter_mut() {
        if *new < 0 || *new == *old || !wanted(*new) {
            continue;
        }
        // SAFETY: fcntl/close on our own descriptors.
        unsafe {
            let moved = sys(
                libc::SYS_fcntl,
                *new as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                targets_max as u64 + 1,
            );
            if moved < 0 {
                die(b"mome: restore: out of file descriptors\n");
            }
            sys(libc::SYS_close, *new as u64, 0, 0);
            *new = moved as i32;
        }
    }
    let mut path = [0u8; image::PATH_MAX];
    for f in fds {
        if f.kind == fd_kind::STDIO {
            continue;
        }
        // SAFETY: raw open/dup3/lseek/close on descriptors we manage.
        unsafe {
            let p = cstr(h.string(base, f.path_off, f.path_len), &mut path);
            let mut flags = f.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
            if f.cloexec != 0 {
                flags |= libc::O_CLOEXEC;
            }
            let fd = sys(libc::SYS_open, p, flags as u64, 0);
            if fd < 0 {
                die(b"mome: restore: cannot open again a file the checkpointed process had open\n");
            }
            if fd as i32 != f.fd {
                let cloexec = if f.cloexec != 0 { libc::O_CLOEXEC } else { 0 };
                if sys(libc::SYS_dup3, fd as u64, f.fd as u64, cloexec as u64) < 0 {
                    die(b"mome: restore: cannot give a reopened file its old descriptor number\n");
                }
                sys(libc::SYS_close, fd as u64, 0, 0);
            }
            if f.kind == fd_kind::FILE && f.offset >= 0 {
                sys(
                    libc::SYS_lseek,
                    f.fd as u64,
                    f.offset as u64,
                    libc::SEEK_SET as u64,
                );
            }
        }
    }
    for (new, old) in ours {
        if new < 0 || old < 0 || new == old {
            continue;
        }
        // SAFETY: our descriptors take the numbers the old ones had.
        unsafe {
            if sys(
                libc::SYS_dup3,
                new as u64,
                old as u64,
                libc::O_CLOEXEC as u64,
            ) < 0
            {
                die(b"mome: restore: cannot give the agent connection its old descriptor number\n");
            }
            sys(libc::SYS_close, new as u64, 0, 0);
        }
    }
    let _ = Ordering::Relaxed;
}
