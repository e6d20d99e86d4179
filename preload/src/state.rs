//! Which mode this process runs in, what it learned from its agent, and the
//! start-up that connects it (run from the library's constructor).
//!
//! Modes:
//! - `Bootstrap`: before the constructor decided; allocations use the arena.
//! - `Rank`: connected to the node agent; memory lives in the DSM window.
//! - `Native`: the preload was inherited by a process that is not a rank
//!   (another pid than the rank's, or no agent): glibc's allocator is used.
//! - `Detached`: a child the rank forked; it keeps a private copy of the
//!   rank's heaps and allocates from its own private window.

use core::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};

use mome_protocol::layout::{WindowLayout, Zone, HEAP_SIZE};
use mome_protocol::rank::{AgentReply, Channel as ChannelKind, RankRequest};
use mome_protocol::{env, PROTOCOL_VERSION};
use mome_uffd::{feature, mode as uffd_mode, Uffd};

use crate::agent::{self, AgentError, Channel, REPLY_BUF};
use crate::lock::FutexLock;
use crate::sys::fatal;
use crate::{malloc, native, pages, report, sys};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Mode {
    Bootstrap = 0,
    Rank = 1,
    Native = 2,
    Detached = 3,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Bootstrap as u8);
/// Private zone bounds, for the hot "is this pointer ours" test.
static PRIVATE_BASE: AtomicU64 = AtomicU64::new(u64::MAX);
static PRIVATE_END: AtomicU64 = AtomicU64::new(0);

pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        1 => Mode::Rank,
        2 => Mode::Native,
        3 => Mode::Detached,
        _ => Mode::Bootstrap,
    }
}

pub fn set_mode(m: Mode) {
    MODE.store(m as u8, Ordering::Release);
}

/// Whether `addr` lies in the private zone of the window (heap memory).
#[inline]
pub fn window_contains(addr: u64) -> bool {
    addr >= PRIVATE_BASE.load(Ordering::Relaxed) && addr < PRIVATE_END.load(Ordering::Relaxed)
}

/// What the rank learned at start-up; written once, before the mode becomes
/// `Rank`, read-only afterwards.
#[derive(Clone, Copy)]
pub struct RankInfo {
    pub layout: WindowLayout,
    pub rank: u32,
    pub nranks: u32,
    pub node: u32,
    pub nodes: u32,
    pub pid: i32,
    /// The node's memory file, kept to map segment aliases.
    pub memfd: i32,
    /// The userfaultfd of the shared zone, kept to register aliases; -1 on
    /// a single node, where shared pages need no fetching.
    pub shared_uffd: i32,
    pub socket: &'static str,
    pub jobid: &'static str,
    pub timeout_ms: u64,
}

static mut INFO: Option<RankInfo> = None;

/// The rank's info; `None` outside Rank/Detached mode.
pub fn info() -> Option<&'static RankInfo> {
    match mode() {
        Mode::Rank | Mode::Detached => {
            // SAFETY: INFO is written once before the mode leaves Bootstrap
            // and never again.
            unsafe { (*core::ptr::addr_of!(INFO)).as_ref() }
        }
        _ => None,
    }
}

/// Memory channel (heaps, segments) and sync channel (barriers, locks).
pub static MEM: FutexLock<Option<Channel>> = FutexLock::new(None);
pub static SYNC: FutexLock<Option<Channel>> = FutexLock::new(None);
/// Their descriptors, readable without the locks (the checkpoint handler
/// must not wait for a lock the code it interrupted holds).
pub static MEM_FD: AtomicI32 = AtomicI32::new(-1);
pub static SYNC_FD: AtomicI32 = AtomicI32::new(-1);

/// Sends a memory-channel request; returns the reply through `f`.
pub fn mem_call<R>(
    req: &RankRequest<'_>,
    pass_fd: Option<i32>,
    what: &'static str,
    f: impl FnOnce(Result<AgentReply<'_>, AgentError>) -> R,
) -> R {
    // A request and its reply are never split by a checkpoint.
    let mask = crate::ckpt::block();
    let guard = MEM.lock();
    let Some(ch) = guard.as_ref() else {
        drop(guard);
        crate::ckpt::unblock(mask);
        return f(Err(AgentError::Closed));
    };
    let mut buf = [0u8; REPLY_BUF];
    let r = match ch.call(req, pass_fd, &mut buf, what, false) {
        Ok((reply, fd)) => {
            if let Some(fd) = fd {
                sys::close(fd);
            }
            f(Ok(reply))
        }
        Err(e) => f(Err(e)),
    };
    drop(guard);
    crate::ckpt::unblock(mask);
    r
}

pub fn agent_alloc_heaps(count: u32) -> Option<u32> {
    mem_call(
        &RankRequest::AllocHeaps { count },
        None,
        "AllocHeaps",
        |r| match r {
            Ok(AgentReply::Heaps { first, count: got }) if got == count => Some(first),
            Ok(AgentReply::Error { message, .. }) => {
                report!(
                    "rank cannot get {} MiB of heap: {}",
                    count as u64 * 8,
                    message
                );
                None
            }
            Ok(_) => {
                report!("the agent answered AllocHeaps with something else");
                None
            }
            Err(e) => {
                report!("cannot get heap memory: {}", e);
                None
            }
        },
    )
}

pub fn agent_free_heaps(first: u32, count: u32) {
    mem_call(
        &RankRequest::FreeHeaps { first, count },
        None,
        "FreeHeaps",
        |r| {
            if let Err(e) = r {
                report!("cannot give heaps back: {}", e);
            }
        },
    )
}

fn parse_u64(s: Option<&str>) -> Option<u64> {
    s?.trim().parse().ok()
}

/// The constructor's work: decide the mode and, for a rank, join the job.
pub fn init() {
    let Some(socket) = sys::getenv(c"MOME_AGENT_SOCKET") else {
        enter_native();
        return;
    };
    let pid = sys::getpid();
    if let Some(owner) = parse_u64(sys::getenv(c"MOME_RANK_PID")) {
        if owner != pid as u64 {
            // A process the rank started: it runs natively.
            enter_native();
            return;
        }
    }
    let rank = parse_u64(sys::getenv(c"MOME_RANK")).unwrap_or_else(|| {
        fatal(format_args!(
            "{} is set but {} is not",
            env::AGENT_SOCKET,
            env::RANK
        ))
    }) as u32;
    let jobid = sys::getenv(c"MOME_JOBID").unwrap_or("");
    let timeout_ms = parse_u64(sys::getenv(c"MOME_AGENT_TIMEOUT_MS")).unwrap_or(30_000);
    if sys::getenv(c"MOME_RESTORE").is_some() {
        // The rank's first process and what it execs (same pid) restore;
        // anything it forks meanwhile runs natively.
        match parse_u64(sys::getenv(c"MOME_RESTORE_PID")) {
            Some(p) if p != pid as u64 => {
                enter_native();
                return;
            }
            Some(_) => {}
            None => {
                let mut pid_text = sys::StackBuf::<24>::new();
                let _ = core::fmt::Write::write_fmt(&mut pid_text, format_args!("{pid}\0"));
                // SAFETY: both strings are NUL-terminated.
                unsafe {
                    libc::setenv(
                        c"MOME_RESTORE_PID".as_ptr(),
                        pid_text.as_bytes().as_ptr().cast(),
                        1,
                    )
                };
            }
        }
        let _wrapper = crate::ckpt::restore::run(
            crate::ckpt::restore::Start {
                rank,
                pid,
                jobid,
                socket,
                timeout_ms,
            },
            |layout, memfd| map_window(rank, layout, memfd),
        );
        enter_native_keeping_preload();
        return;
    }

    let ch = Channel::connect(socket, timeout_ms).unwrap_or_else(|e| {
        fatal(format_args!(
            "rank {rank}: cannot connect to the agent at {socket}: {e}"
        ))
    });
    let hello = RankRequest::Hello {
        protocol: PROTOCOL_VERSION,
        rank,
        pid,
        channel: ChannelKind::Memory,
        jobid,
        restoring: false,
    };
    let mut buf = [0u8; REPLY_BUF];
    let (welcome, memfd) = match ch.call(&hello, None, &mut buf, "Hello", false) {
        Ok((
            AgentReply::Welcome {
                layout,
                node,
                nodes,
                nranks,
            },
            Some(fd),
        )) => ((layout, node, nodes, nranks), fd),
        Ok((AgentReply::Error { message, .. }, _)) => {
            fatal(format_args!("rank {rank}: the agent refused it: {message}"))
        }
        Ok(_) => fatal(format_args!(
            "rank {rank}: the agent's welcome had no memory file"
        )),
        Err(e) => fatal(format_args!("rank {rank}: joining the job failed: {e}")),
    };
    let (layout, node, nodes, nranks) = welcome;
    let memfd = agent::move_high(memfd);

    map_window(rank, &layout, memfd);
    // One node: a shared page missing from the node's memfd can only be a
    // fresh zero page, which a plain shmem fault provides (for syscalls too)
    // at a fraction of a round trip to the agent (~25 us): the whole window
    // is then registered for dirty tracking only. Several nodes: the shared
    // zone's missing pages are fetched by the agent.
    let multi_node = nodes > 1;
    let (wp_start, wp_len) = if multi_node {
        (layout.base, layout.private_size)
    } else {
        (layout.base, layout.size)
    };
    let private_uffd = make_uffd(
        rank,
        zone_name(Zone::Private),
        feature::WP_HUGETLBFS_SHMEM | feature::WP_ASYNC | feature::WP_UNPOPULATED,
        (wp_start, wp_len),
        uffd_mode::WP,
    );
    let shared_uffd = multi_node.then(|| {
        // MISSING: pages not on this node are fetched by the agent (for
        // the kernel's own accesses too); WP (synchronous): a write to a
        // page this node holds read-only asks the agent for ownership.
        make_uffd(
            rank,
            zone_name(Zone::Shared),
            feature::MISSING_SHMEM | feature::WP_HUGETLBFS_SHMEM,
            (layout.shared_base(), layout.shared_size()),
            uffd_mode::MISSING | uffd_mode::WP,
        )
    });
    let mut handed = [
        (Zone::Private, Some(private_uffd)),
        (Zone::Shared, shared_uffd),
    ];
    for (zone, fd) in handed.iter_mut() {
        let Some(fd) = *fd else { continue };
        let mut buf = [0u8; REPLY_BUF];
        match ch.call(
            &RankRequest::RegisterUffd { zone: *zone },
            Some(fd),
            &mut buf,
            "RegisterUffd",
            false,
        ) {
            Ok((AgentReply::Ok, _)) => {}
            Ok((AgentReply::Error { message, .. }, _)) => fatal(format_args!(
                "rank {rank}: the agent refused its userfaultfd: {message}"
            )),
            Ok(_) => fatal(format_args!(
                "rank {rank}: unexpected answer to RegisterUffd"
            )),
            Err(e) => fatal(format_args!(
                "rank {rank}: registering its userfaultfd failed: {e}"
            )),
        }
    }
    // The agent holds the dirty-tracking userfaultfd now; keeping ours
    // would only keep the context alive if the agent died.
    sys::close(private_uffd);
    register_pagemap(&ch, rank);
    let shared_uffd = shared_uffd.map_or(-1, agent::move_high);

    // SAFETY: single-threaded start-up; INFO is not read before the mode
    // leaves Bootstrap.
    unsafe {
        *core::ptr::addr_of_mut!(INFO) = Some(RankInfo {
            layout,
            rank,
            nranks,
            node,
            nodes,
            pid,
            memfd,
            shared_uffd,
            socket,
            jobid,
            timeout_ms,
        });
    }
    MEM_FD.store(ch.fd(), Ordering::Relaxed);
    *MEM.lock() = Some(ch);

    let heaps = layout.private_heaps();
    let count = pages::control_bytes(heaps).div_ceil(HEAP_SIZE) as u32;
    let first = agent_alloc_heaps(count).unwrap_or_else(|| {
        fatal(format_args!(
            "rank {rank}: no heap for the allocator's state"
        ))
    });
    // SAFETY: the heaps were just handed out by the agent: mapped, writable
    // and zero (the agent drops the pages of heaps it takes back).
    let control = unsafe { pages::init(layout.base, heaps, first, count) };
    // SAFETY: `control` was just initialised.
    unsafe { malloc::attach(control) };
    PRIVATE_BASE.store(layout.base, Ordering::Relaxed);
    PRIVATE_END.store(layout.shared_base(), Ordering::Relaxed);
    set_mode(Mode::Rank);

    // Processes this rank starts see another pid and run natively; an exec of
    // the rank itself (a launcher script exec'ing the real program) joins again.
    let mut pid_text = sys::StackBuf::<24>::new();
    let _ = core::fmt::Write::write_fmt(&mut pid_text, format_args!("{pid}\0"));
    // SAFETY: both strings are NUL-terminated.
    unsafe {
        libc::setenv(
            c"MOME_RANK_PID".as_ptr(),
            pid_text.as_bytes().as_ptr().cast(),
            1,
        )
    };
    crate::fork::install();
    crate::ckpt::install();
}

/// Hands `/proc/self/pagemap` to the agent, which scans it for the pages
/// this rank wrote since the last checkpoint.
pub fn register_pagemap(ch: &Channel, rank: u32) {
    // SAFETY: open of a constant path.
    let fd = unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        fatal(format_args!(
            "rank {rank}: cannot open /proc/self/pagemap (errno {})",
            sys::errno()
        ));
    }
    let mut buf = [0u8; REPLY_BUF];
    let r = ch.call(
        &RankRequest::RegisterPagemap,
        Some(fd),
        &mut buf,
        "RegisterPagemap",
        false,
    );
    sys::close(fd);
    match r {
        Ok((AgentReply::Ok, _)) => {}
        Ok((AgentReply::Error { message, .. }, _)) => fatal(format_args!(
            "rank {rank}: the agent refused its pagemap: {message}"
        )),
        Ok(_) => fatal(format_args!(
            "rank {rank}: unexpected answer to RegisterPagemap"
        )),
        Err(e) => fatal(format_args!("rank {rank}: registering its pagemap: {e}")),
    }
}

pub fn map_window(rank: u32, layout: &WindowLayout, memfd: i32) {
    let flags = libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE;
    match sys::mmap(
        layout.base,
        layout.size,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        memfd,
        0,
    ) {
        Ok(a) if a == layout.base => {}
        Ok(a) => {
            let _ = sys::munmap(a, layout.size);
            fatal(format_args!(
                "rank {rank}: the kernel placed the DSM window at {a:#x} instead of {:#x}",
                layout.base
            ))
        }
        Err(e) => fatal(format_args!(
            "rank {rank}: cannot map the DSM window at {:#x} ({} bytes): errno {e}{}",
            layout.base,
            layout.size,
            if e == libc::EEXIST {
                " (something is already mapped there: choose another window.base)"
            } else {
                ""
            }
        )),
    }
}

fn zone_name(zone: Zone) -> &'static str {
    match zone {
        Zone::Private => "private",
        Zone::Shared => "shared",
    }
}

pub fn make_uffd(rank: u32, what: &str, features: u64, (start, len): (u64, u64), mode: u64) -> i32 {
    let uffd = Uffd::open(libc::O_CLOEXEC | libc::O_NONBLOCK).unwrap_or_else(|e| {
        fatal(format_args!(
            "rank {rank}: {e} (mome-run's preflight says what to change)"
        ))
    });
    if let Err(e) = uffd.api(features) {
        fatal(format_args!(
            "rank {rank}: userfaultfd for the {what} zone: {e}"
        ));
    }
    if let Err(e) = uffd.register(start, len, mode) {
        fatal(format_args!(
            "rank {rank}: registering the {what} zone with userfaultfd: {e}"
        ));
    }
    use std::os::fd::IntoRawFd;
    uffd.into_owned_fd().into_raw_fd()
}

/// Native mode for a wrapper process of a restored rank: the program it
/// execs must load the library again, so LD_PRELOAD stays.
fn enter_native_keeping_preload() {
    if !native::resolve() {
        fatal(format_args!("cannot find glibc's malloc (dlsym RTLD_NEXT)"));
    }
    set_mode(Mode::Native);
}

fn enter_native() {
    if !native::resolve() {
        fatal(format_args!("cannot find glibc's malloc (dlsym RTLD_NEXT)"));
    }
    set_mode(Mode::Native);
    strip_preload_from_env();
}

/// Removes this library from LD_PRELOAD so that what a non-rank process
/// starts does not load it at all.
fn strip_preload_from_env() {
    let Some(value) = sys::getenv(c"LD_PRELOAD") else {
        return;
    };
    let mut kept = sys::StackBuf::<4096>::new();
    let mut first = true;
    for part in value.split([':', ' ']).filter(|p| !p.is_empty()) {
        if part.ends_with("libmome_preload.so") {
            continue;
        }
        if !first {
            let _ = core::fmt::Write::write_str(&mut kept, ":");
        }
        let _ = core::fmt::Write::write_str(&mut kept, part);
        first = false;
    }
    let _ = core::fmt::Write::write_str(&mut kept, "\0");
    // SAFETY: NUL-terminated strings.
    unsafe {
        if first {
            libc::unsetenv(c"LD_PRELOAD".as_ptr());
        } else {
            libc::setenv(c"LD_PRELOAD".as_ptr(), kept.as_bytes().as_ptr().cast(), 1);
        }
    }
}
