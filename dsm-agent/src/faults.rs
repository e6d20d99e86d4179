//! userfaultfd service: one task per shared-zone userfaultfd of a rank,
//! resolving the rank's missing-page faults on shared segments.
//!
//! On a single node a page of a shared segment that is not in the node
//! memfd yet is a zero page: the rank's mapping is `MAP_SHARED` on the
//! memfd, so UFFDIO_COPY puts the page in the memfd's page cache and every
//! local rank sees it from then on. With several nodes the task reads the
//! faults (missing pages and writes to read-only copies) and hands them to
//! the page protocol (`pages`), which resolves them once the page is here.
//!
//! The task lives as long as the session that registered the userfaultfd:
//! the userfaultfd belongs to the rank's address space, which is gone when
//! its connection is (exit or exec).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mome_protocol::layout::{WindowLayout, PAGE_SIZE};
use mome_uffd::{fault_flag, Event, Filled, Uffd, UffdError};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;

use crate::agent::lock;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("the descriptor is not a userfaultfd ({0})")]
    NotUserfaultfd(String),
    #[error("cannot make the userfaultfd non-blocking: {0}")]
    NonBlocking(Errno),
    #[error("cannot watch the userfaultfd: {0}")]
    Watch(std::io::Error),
}

/// What the kernel shows for a userfaultfd in /proc/self/fd.
const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// A page of zeros, the content of every page not yet written on this node.
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);
static ZERO_PAGE: Page = Page([0; PAGE_SIZE as usize]);

/// While a copy is refused with EAGAIN (the rank's address space is
/// changing), how long to wait before trying again.
const RETRY_DELAY: Duration = Duration::from_millis(1);

/// The rank mapped part of the window also outside it (MomeMMap with
/// MAP_FIXED): a fault at `addr + x` is a fault on `window_addr + x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    pub addr: u64,
    pub len: u64,
    pub window_addr: u64,
}

/// The aliases of one rank (one session), shared with its fault tasks.
#[derive(Debug, Default)]
pub struct AliasTable {
    aliases: Vec<Alias>,
}

impl AliasTable {
    /// Records `alias`, replacing the aliases it overlaps (a new mapping at
    /// the same place replaces the old one, as mmap does).
    pub fn insert(&mut self, alias: Alias) {
        let end = alias.addr + alias.len;
        self.aliases
            .retain(|a| a.addr + a.len <= alias.addr || a.addr >= end);
        self.aliases.push(alias);
    }

    /// Addresses outside the window at which `window_addr` is also mapped.
    pub fn aliases_of(&self, window_addr: u64) -> impl Iterator<Item = u64> + '_ {
        self.aliases
            .iter()
            .filter(move |a| window_addr >= a.window_addr && window_addr - a.window_addr < a.len)
            .map(move |a| a.addr + (window_addr - a.window_addr))
    }

    /// Window address of `addr`, which lies outside the window.
    pub fn window_addr(&self, addr: u64) -> Option<u64> {
        self.aliases
            .iter()
            .find(|a| addr >= a.addr && addr - a.addr < a.len)
            .map(|a| a.window_addr + (addr - a.addr))
    }
}

/// Counters of one session's fault tasks.
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub served: AtomicU64,
    /// Of which at an alias address, outside the window.
    pub via_alias: AtomicU64,
}

/// What a fault task needs besides its userfaultfd.
#[derive(Debug, Clone)]
pub struct FaultContext {
    /// `rank R pid P`, for the log.
    pub label: String,
    pub layout: WindowLayout,
    pub aliases: Arc<Mutex<AliasTable>>,
    pub session: Arc<FaultCounters>,
    /// Faults served by the whole agent.
    pub total: Arc<AtomicU64>,
    /// Several nodes: faults go to the page protocol, for this session.
    pub pages: Option<(Arc<crate::pages::PageEngine>, crate::agent::SessionId)>,
}

/// Checks that `fd` is a userfaultfd, so that a confused rank gets an error
/// reply instead of a task polling some other file.
pub fn check_userfaultfd(fd: RawFd) -> Result<(), FaultError> {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) if target.as_os_str() == UFFD_LINK => Ok(()),
        Ok(target) => Err(FaultError::NotUserfaultfd(target.display().to_string())),
        Err(e) => Err(FaultError::NotUserfaultfd(e.to_string())),
    }
}

/// Starts serving the faults of `fd`, a userfaultfd of a rank registered in
/// MISSING mode on shared-zone ranges (and maybe aliases of them).
pub fn spawn(fd: OwnedFd, ctx: FaultContext) -> Result<JoinHandle<()>, FaultError> {
    check_userfaultfd(fd.as_raw_fd())?;
    // The rank opens it O_NONBLOCK already; a reader that blocks would stall
    // a runtime thread, so do not depend on it.
    let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(FaultError::NonBlocking)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(FaultError::NonBlocking)?;
    // SAFETY: `fd` is a userfaultfd (checked above) that we own and hand over.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    // SAFETY: `uffd` owns its descriptor, which stays open and the same as
    // long as the AsyncFd that owns `uffd` lives.
    let afd = unsafe { AsyncFd::register_with_interest(uffd, Interest::READABLE) }
        .map_err(|e| FaultError::Watch(e.into_parts().1))?;
    Ok(tokio::spawn(serve(afd, ctx)))
}

/// How a fault ended.
enum Outcome {
    Served,
    /// The copy was refused with EAGAIN: retry after reading pending events.
    Retry,
    /// The rank's address space is gone.
    Gone,
}

async fn serve(afd: AsyncFd<Uffd>, ctx: FaultContext) {
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut warned_stray = false;
    loop {
        if pending.is_empty() {
            if let Err(e) = afd.readable().await.map(|mut g| g.clear_ready()) {
                log!("session {}: userfaultfd watch failed: {e}", ctx.label);
                return;
            }
        } else {
            // Faults refused with EAGAIN wait until the rank's address space
            // settles; events pending meanwhile must still be read, since
            // reading them is what lets it settle.
            if let Ok(Ok(mut guard)) = tokio::time::timeout(RETRY_DELAY, afd.readable()).await {
                guard.clear_ready();
            }
        }
        for (addr, flags) in std::mem::take(&mut pending) {
            match resolve(afd.get_ref(), addr, flags, &ctx, &mut warned_stray) {
                Outcome::Served => {}
                Outcome::Retry => pending.push((addr, flags)),
                Outcome::Gone => return,
            }
        }
        loop {
            let event = match afd.get_ref().read_event() {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(UffdError::Os { errno, .. }) if errno.0 == libc::EINTR => continue,
                Err(e) => {
                    log!(
                        "session {}: userfaultfd read failed: {e}; no longer serving it",
                        ctx.label
                    );
                    return;
                }
            };
            match event {
                Event::PageFault { addr, flags, .. } if ctx.pages.is_some() => {
                    if !to_page_protocol(&ctx, addr, flags) {
                        match resolve(afd.get_ref(), addr, flags, &ctx, &mut warned_stray) {
                            Outcome::Served => {}
                            Outcome::Retry => pending.push((addr, flags)),
                            Outcome::Gone => return,
                        }
                    }
                }
                Event::PageFault { addr, flags, .. } => {
                    match resolve(afd.get_ref(), addr, flags, &ctx, &mut warned_stray) {
                        Outcome::Served => {}
                        Outcome::Retry => pending.push((addr, flags)),
                        Outcome::Gone => return,
                    }
                }
                Event::Fork { uffd } if uffd >= 0 => {
                    // Not asked for; the kernel installed the child's
                    // userfaultfd in this process all the same: close it.
                    // SAFETY: the kernel just gave us this descriptor.
                    drop(unsafe { OwnedFd::from_raw_fd(uffd) });
                }
                Event::Fork { .. } => {}
                Event::Remap { .. } | Event::Remove { .. } | Event::Unmap { .. } => {}
                Event::Unknown(code) => log!(
                    "session {}: unknown userfaultfd event {code:#x} ignored",
                    ctx.label
                ),
            }
        }
    }
}

/// Hands a fault on a shared page to the page protocol, which resolves it
/// when the page is here; false for an address that is neither in the
/// window nor an alias of it (served as on one node).
fn to_page_protocol(ctx: &FaultContext, addr: u64, flags: u64) -> bool {
    let Some((pages, session)) = ctx.pages.as_ref() else {
        return false;
    };
    let page = addr & !(PAGE_SIZE - 1);
    let window_addr = if ctx.layout.contains(page) {
        Some(page)
    } else {
        lock(&ctx.aliases).window_addr(page)
    };
    let Some(window_addr) = window_addr.filter(|&w| w >= ctx.layout.shared_base()) else {
        return false;
    };
    ctx.session.served.fetch_add(1, Ordering::Relaxed);
    ctx.total.fetch_add(1, Ordering::Relaxed);
    if window_addr != page {
        ctx.session.via_alias.fetch_add(1, Ordering::Relaxed);
    }
    pages.fault(*session, page, window_addr, flags);
    true
}

/// Resolves one fault with a zero page (MISSING), by mapping the page
/// already in the memfd (MINOR), or by lifting write protection (WP: on
/// one node there is nobody to take the page from).
fn resolve(
    uffd: &Uffd,
    addr: u64,
    flags: u64,
    ctx: &FaultContext,
    warned_stray: &mut bool,
) -> Outcome {
    let page = addr & !(PAGE_SIZE - 1);
    let result = if flags & fault_flag::WP != 0 {
        uffd.write_protect(page, PAGE_SIZE, false, false)
    } else if flags & fault_flag::MINOR != 0 {
        uffd.continue_range(page, PAGE_SIZE)
            .and_then(|f| wake_if_present(uffd, page, f))
    } else {
        uffd.copy(page, ZERO_PAGE.0.as_ptr(), PAGE_SIZE)
            .and_then(|f| wake_if_present(uffd, page, f))
    };
    match result {
        Ok(()) => {
            ctx.session.served.fetch_add(1, Ordering::Relaxed);
            ctx.total.fetch_add(1, Ordering::Relaxed);
            if !ctx.layout.contains(page) {
                if lock(&ctx.aliases).window_addr(page).is_some() {
                    ctx.session.via_alias.fetch_add(1, Ordering::Relaxed);
                } else if !*warned_stray {
                    *warned_stray = true;
                    log!(
                        "session {}: fault at {page:#x}, outside the window and every alias, served with a zero page",
                        ctx.label
                    );
                }
            }
            Outcome::Served
        }
        Err(UffdError::Os { errno, .. }) if errno.0 == libc::EAGAIN => Outcome::Retry,
        Err(UffdError::Os { errno, .. }) if errno.0 == libc::ENOENT || errno.0 == libc::ESRCH => {
            Outcome::Gone
        }
        Err(e) => {
            log!("session {}: cannot resolve the fault at {addr:#x}: {e}; no longer serving this userfaultfd", ctx.label);
            Outcome::Gone
        }
    }
}

/// Another rank (or thread) installed the page first: the faulting thread
/// still sleeps until woken.
fn wake_if_present(uffd: &Uffd, page: u64, filled: Filled) -> Result<(), UffdError> {
    match filled {
        Filled::Copied => Ok(()),
        Filled::AlreadyPresent => uffd.wake(page, PAGE_SIZE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_translate_and_replace() {
        let mut t = AliasTable::default();
        t.insert(Alias {
            addr: 0x1000_0000,
            len: 0x2000,
            window_addr: 0x2000_0000_0000,
        });
        assert_eq!(t.window_addr(0x1000_1008), Some(0x2000_0000_1008));
        assert_eq!(t.window_addr(0x1000_2000), None);
        t.insert(Alias {
            addr: 0x1000_1000,
            len: 0x1000,
            window_addr: 0x2000_0001_0000,
        });
        assert_eq!(t.window_addr(0x1000_0000), None);
        assert_eq!(t.window_addr(0x1000_1000), Some(0x2000_0001_0000));
    }
}
