//! Restore mode (`--restore S --ckpt-dir ROOT`): the node index of stamp S,
//! the images of the ranks, and the lazy return of the window's pages.
//!
//! A restoring rank registers the whole window with one userfaultfd in
//! MISSING | WP mode (async write-protect) and hands it over. A thread per
//! such userfaultfd serves its missing-page faults: the page from the store
//! when the index has it, else zeros, installed with UFFDIO_COPY_MODE_WP so
//! it stays clean for dirty tracking (the next checkpoint is incremental
//! against S). A prefetch thread meanwhile copies every page of the index
//! into the memfd, in file order, through the restoring ranks'
//! userfaultfds (EEXIST: the page is there already). Until it is done a
//! checkpoint is refused: a page not yet back is a hole in the memfd, which
//! the checkpoint would take for a freed page.
//!
//! MISSING mode is kept once everything is back (new pages keep costing a
//! round trip to the agent): the kernel cannot drop it without clearing the
//! pages' write protection. Re-registering a range with fewer modes is a
//! no-op (the registration already covers them), and UFFDIO_UNREGISTER
//! clears uffd-wp on every page, which would make every page look written
//! to the next scan (both checked on Linux 6.18).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{files, AgentEvent, Stamp};
use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::WindowLayout;
use mome_store::{BlockReader, BlockRef, NodeIndex, RankImage, StoreError};
use mome_uffd::{copy_mode, Event, Filled, Uffd, UffdError};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::agent::lock;
use crate::events::Events;

const PAGE: usize = PAGE_SIZE as usize;
/// Decompressed blocks kept for the fault threads.
const CACHED_BLOCKS: usize = 16;
/// How often a fault thread checks whether its session ended.
const POLL_MS: libc::c_int = 100;
/// While a copy is refused with EAGAIN (the rank's address space is
/// changing), how long to wait before trying again.
const RETRY_DELAY: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot load the index of stamp {stamp} of node {node} ({path}): {source}")]
    Load {
        stamp: Stamp,
        node: u32,
        path: String,
        source: StoreError,
    },
    #[error(
        "the index {path} is of stamp {found} node {found_node}, not stamp {stamp} node {node}"
    )]
    WrongIndex {
        path: String,
        stamp: Stamp,
        node: u32,
        found: Stamp,
        found_node: u32,
    },
    #[error("the descriptor is not a userfaultfd ({0})")]
    NotUserfaultfd(String),
    #[error("cannot make the userfaultfd non-blocking: {0}")]
    NonBlocking(Errno),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// A decompressed block, by (pages file, offset).
type BlockKey = (Stamp, u64);

#[derive(Debug)]
pub struct Restore {
    pub stamp: Stamp,
    pub index: Arc<NodeIndex>,
    node: u32,
    layout: WindowLayout,
    reader: BlockReader,
    events: Events,
    cache: Mutex<Vec<(BlockKey, Arc<Vec<u8>>)>>,
    /// Live userfaultfds of restoring ranks, by rank: for the prefetch.
    uffds: Mutex<BTreeMap<u32, Arc<Uffd>>>,
    /// Pages whose block could not be read: reported once each.
    bad_pages: Mutex<HashSet<u64>>,
    prefetch_started: AtomicBool,
    filled: AtomicBool,
    pub faults: AtomicU64,
    /// Pages from this one on are not restored lazily: several nodes, the
    /// shared zone, whose pages go back into the node's memory before any
    /// rank starts (see [`Restore::shared_pages`]).
    lazy_end: u64,
}

/// A fault thread of one restoring rank; stops when dropped.
#[derive(Debug)]
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    rank: u32,
    restore: Arc<Restore>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        lock(&self.restore.uffds).remove(&self.rank);
    }
}

impl Restore {
    /// Loads the node index of `stamp`.
    pub fn load(
        root: &Path,
        node: u32,
        stamp: Stamp,
        layout: WindowLayout,
        multi_node: bool,
        events: Events,
    ) -> Result<Restore, RestoreError> {
        let path = files::index_file(root, node, stamp);
        let index = NodeIndex::load(&path).map_err(|source| RestoreError::Load {
            stamp,
            node,
            path: path.display().to_string(),
            source,
        })?;
        if index.stamp != stamp || index.node != node {
            return Err(RestoreError::WrongIndex {
                path: path.display().to_string(),
                stamp,
                node,
                found: index.stamp,
                found_node: index.node,
            });
        }
        let lazy_end = if multi_node {
            layout.private_size / PAGE_SIZE
        } else {
            layout.size / PAGE_SIZE
        };
        let empty = !index.extents().any(|(first, ..)| first < lazy_end);
        Ok(Restore {
            lazy_end,
            stamp,
            index: Arc::new(index),
            node,
            layout,
            reader: BlockReader::new(root, node),
            events,
            cache: Mutex::new(Vec::new()),
            uffds: Mutex::new(BTreeMap::new()),
            bad_pages: Mutex::new(HashSet::new()),
            prefetch_started: AtomicBool::new(false),
            filled: AtomicBool::new(empty),
            faults: AtomicU64::new(0),
        })
    }

    /// Every page of the index is back in the memfd.
    pub fn filled(&self) -> bool {
        self.filled.load(Ordering::Acquire)
    }

    pub fn image_of(&self, rank: u32) -> Option<RankImage> {
        self.index.images.iter().find(|i| i.rank == rank).copied()
    }

    /// Serves the faults of `fd`, the window userfaultfd of restoring rank
    /// `rank`, and starts the prefetch if it is not running yet.
    /// `owner_of(page)` names the rank that owns a page's heap: the prefetch
    /// installs a page through its owner's userfaultfd when it can, so the
    /// page is clean (write-protected) where it will be used.
    pub fn serve(
        self: &Arc<Self>,
        rank: u32,
        fd: OwnedFd,
        label: String,
        owner_of: Arc<dyn Fn(u64) -> Option<u32> + Send + Sync>,
    ) -> Result<FaultServer, RestoreError> {
        crate::faults::check_userfaultfd(fd.as_raw_fd())
            .map_err(|e| RestoreError::NotUserfaultfd(e.to_string()))?;
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(RestoreError::NonBlocking)?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(RestoreError::NonBlocking)?;
        // SAFETY: `fd` is a userfaultfd (checked above) that we own and hand over.
        let uffd = Arc::new(unsafe { Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) });
        let stop = Arc::new(AtomicBool::new(false));
        let (me, u, s) = (self.clone(), uffd.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("restore-{rank}"))
            .spawn(move || me.fault_loop(&u, &s, &label))
            .map_err(RestoreError::Thread)?;
        lock(&self.uffds).insert(rank, uffd);
        if !self.filled() && !self.prefetch_started.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            std::thread::Builder::new()
                .name("prefetch".into())
                .spawn(move || me.prefetch(&*owner_of))
                .map_err(RestoreError::Thread)?;
        }
        Ok(FaultServer {
            stop,
            rank,
            restore: self.clone(),
        })
    }

    fn fault_loop(&self, uffd: &Uffd, stop: &AtomicBool, label: &str) {
        let mut pending: Vec<u64> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = if pending.is_empty() {
                POLL_MS
            } else {
                RETRY_DELAY.as_millis() as libc::c_int
            };
            // SAFETY: poll on one pollfd that lives across the call.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if n < 0 && Errno::last() != Errno::EINTR {
                log!(
                    "session {label}: poll on the userfaultfd failed: {}",
                    Errno::last()
                );
                return;
            }
            if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return;
            }
            for addr in std::mem::take(&mut pending) {
                match self.resolve(uffd, addr) {
                    Outcome::Served | Outcome::Held => {}
                    Outcome::Retry => pending.push(addr),
                    Outcome::Gone => return,
                }
            }
            loop {
                let event = match uffd.read_event() {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(UffdError::Os { errno, .. }) if errno.0 == libc::EINTR => continue,
                    Err(e) => {
                        log!("session {label}: userfaultfd read failed: {e}; no longer serving it");
                        return;
                    }
                };
                match event {
                    Event::PageFault { addr, .. } => match self.resolve(uffd, addr) {
                        Outcome::Served | Outcome::Held => {}
                        Outcome::Retry => pending.push(addr),
                        Outcome::Gone => return,
                    },
                    Event::Fork { uffd } if uffd >= 0 => {
                        // SAFETY: the kernel just gave us this descriptor.
                        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(uffd) });
                    }
                    _ => {}
                }
            }
        }
    }

    /// Installs the page at `addr` (a missing fault) and wakes the faulter.
    fn resolve(&self, uffd: &Uffd, addr: u64) -> Outcome {
        let at = addr & !(PAGE_SIZE - 1);
        let page = self
            .layout
            .contains(at)
            .then(|| (at - self.layout.base) / PAGE_SIZE);
        let found = page.and_then(|p| self.index.lookup(p).map(|(b, i)| (p, *b, i)));
        let result = match found {
            None => install(uffd, at, ZERO_PAGE.0.as_ptr()),
            Some((p, block, i)) => match self.block(&block) {
                Ok(data) => install(uffd, at, data[i as usize * PAGE..].as_ptr()),
                Err(e) => {
                    self.report(p, &e);
                    // The faulting thread stays asleep: its data is lost
                    // and mome-restart ends the job on RestoreError.
                    return Outcome::Held;
                }
            },
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(Filled::Copied) => Outcome::Served,
            Ok(Filled::AlreadyPresent) => match uffd.wake(at, PAGE_SIZE) {
                Ok(()) => Outcome::Served,
                Err(_) => Outcome::Gone,
            },
            Err(UffdError::Os { errno, .. }) if errno.0 == libc::EAGAIN => Outcome::Retry,
            Err(UffdError::Os { errno, .. })
                if errno.0 == libc::ENOENT || errno.0 == libc::ESRCH =>
            {
                Outcome::Gone
            }
            Err(e) => {
                log!("restore: cannot install the page at {at:#x}: {e}; no longer serving this userfaultfd");
                Outcome::Gone
            }
        }
    }

    /// A block's pages, from the cache or the store.
    /// Several nodes: every page of the index in the shared zone (window
    /// page numbers), block by block, to `put` (the node owned them at the
    /// stamp). Returns the pages given.
    pub fn shared_pages(&self, mut put: impl FnMut(u64, &[u8])) -> Result<u64, RestoreError> {
        let mut count = 0;
        let mut data = Vec::new();
        let mut loaded: Option<BlockKey> = None;
        for (first, n, block, first_in_block) in self.index.extents() {
            let from = first.max(self.lazy_end);
            let end = first + u64::from(n);
            if from >= end {
                continue;
            }
            let key = (block.file, block.offset);
            if loaded != Some(key) {
                self.reader
                    .read_block(block, &mut data)
                    .map_err(|source| RestoreError::Load {
                        stamp: self.stamp,
                        node: self.node,
                        path: self.reader.path(block.file).display().to_string(),
                        source,
                    })?;
                loaded = Some(key);
            }
            for page in from..end {
                let at = (first_in_block as usize + (page - first) as usize) * PAGE;
                put(page, &data[at..at + PAGE]);
                count += 1;
            }
        }
        Ok(count)
    }

    fn block(&self, block: &BlockRef) -> Result<Arc<Vec<u8>>, StoreError> {
        let key = (block.file, block.offset);
        if let Some((_, data)) = lock(&self.cache).iter().find(|(k, _)| *k == key) {
            return Ok(data.clone());
        }
        let mut data = Vec::new();
        self.reader.read_block(block, &mut data)?;
        let data = Arc::new(data);
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHED_BLOCKS {
            cache.remove(0);
        }
        cache.push((key, data.clone()));
        Ok(data)
    }

    fn report(&self, page: u64, e: &StoreError) {
        if !lock(&self.bad_pages).insert(page) {
            return;
        }
        let reason = format!(
            "stamp {} node {}: page {page} (address {:#x}) cannot be restored: {e}",
            self.stamp,
            self.node,
            self.layout.base + page * PAGE_SIZE
        );
        log!("restore: {reason}");
        self.events.send(AgentEvent::RestoreError { reason });
    }

    /// Copies every page of the index into the memfd, block by block in
    /// file order.
    fn prefetch(&self, owner_of: &(dyn Fn(u64) -> Option<u32> + Send + Sync)) {
        let started = Instant::now();
        // Which pages each block holds: (first page, pages, first in block).
        let mut parts: HashMap<BlockKey, Vec<(u64, u32, u32)>> = HashMap::new();
        for (first, n, block, first_in_block) in self.index.extents() {
            if first >= self.lazy_end {
                continue;
            }
            let n = n.min((self.lazy_end - first) as u32);
            parts
                .entry((block.file, block.offset))
                .or_default()
                .push((first, n, first_in_block));
        }
        let (mut copied, mut present, mut bad) = (0u64, 0u64, 0u64);
        let mut data = Vec::new();
        for block in self.index.blocks() {
            if !parts.contains_key(&(block.file, block.offset)) {
                continue;
            }
            if let Err(e) = self.reader.read_block(block, &mut data) {
                let first = parts
                    .get(&(block.file, block.offset))
                    .and_then(|p| p.first())
                    .map_or(0, |p| p.0);
                self.report(first, &e);
                bad += 1;
                continue;
            }
            for &(first, n, first_in_block) in
                parts.get(&(block.file, block.offset)).into_iter().flatten()
            {
                for k in 0..u64::from(n) {
                    let page = first + k;
                    let src = data[(first_in_block as usize + k as usize) * PAGE..].as_ptr();
                    match self.prefetch_page(page, src, owner_of) {
                        Some(Filled::Copied) => copied += 1,
                        Some(Filled::AlreadyPresent) => present += 1,
                        None => {
                            log!(
                                "restore: prefetch stopped at page {page}: no restoring rank is left to install pages through"
                            );
                            return;
                        }
                    }
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        log!(
            "restore: prefetch of stamp {} done in {:.3}s: {copied} pages installed, {present} already faulted in, {bad} unreadable blocks ({:.0} MB/s)",
            self.stamp,
            secs,
            (copied + present) as f64 * PAGE_SIZE as f64 / 1e6 / secs.max(1e-9)
        );
        if bad == 0 {
            self.filled.store(true, Ordering::Release);
        }
    }

    /// Installs one page through its owner's userfaultfd if it has one,
    /// else any restoring rank's. `None`: no userfaultfd is left.
    fn prefetch_page(
        &self,
        page: u64,
        src: *const u8,
        owner_of: &(dyn Fn(u64) -> Option<u32> + Send + Sync),
    ) -> Option<Filled> {
        let addr = self.layout.base + page * PAGE_SIZE;
        let owner = owner_of(page);
        let mut tries = 0;
        loop {
            let (rank, uffd) = {
                let uffds = lock(&self.uffds);
                let pick = owner.and_then(|o| uffds.get(&o).map(|u| (o, u.clone())));
                pick.or_else(|| uffds.iter().next().map(|(&r, u)| (r, u.clone())))?
            };
            match install(&uffd, addr, src) {
                Ok(f) => return Some(f),
                Err(UffdError::Os { errno, .. }) if errno.0 == libc::EAGAIN && tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(RETRY_DELAY);
                }
                Err(e) => {
                    // That rank's address space is gone (or refuses):
                    // go on through another one.
                    log!("restore: prefetch through rank {rank}'s userfaultfd failed ({e}); dropping it");
                    lock(&self.uffds).remove(&rank);
                }
            }
        }
    }
}

/// How a fault ended.
enum Outcome {
    Served,
    /// Left asleep on purpose (unreadable data).
    Held,
    Retry,
    Gone,
}

/// A page of zeros.
#[repr(C, align(4096))]
struct Page([u8; PAGE]);
static ZERO_PAGE: Page = Page([0; PAGE]);

/// UFFDIO_COPY of one page, write-protected (clean for dirty tracking).
fn install(uffd: &Uffd, addr: u64, src: *const u8) -> Result<Filled, UffdError> {
    uffd.copy_with_mode(addr, src, PAGE_SIZE, copy_mode::WP)
}
