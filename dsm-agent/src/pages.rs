//! The page protocol of a multi-node job: sequential consistency for the
//! pages of the shared zone, single writer / multiple readers, invalidation
//! based, with a directory that has no fixed home.
//!
//! Directory (the dynamic distributed manager of Li and Hudak, as in Mome):
//! the node that owns a page is also its manager; it keeps the page's
//! copyset (the nodes holding a read copy). Every other node keeps a
//! probable owner and sends its requests there; a node that is not the
//! owner forwards them along its own probable owner (and, for a write
//! request, points its hint at the requester, who is about to own the
//! page). The manager thus migrates with ownership toward the node that
//! writes the page, and read-mostly pages keep the manager they have. A
//! page starts owned by its home node, chosen by hash, as a zero page.
//!
//! Node-level states: `None` (not in the node's memfd), `Read` (present,
//! write-protected in every local rank) and `Write` (present, writable).
//! One fetch serves every local rank, since they all map the node's memfd;
//! an invalidation punches the page out of the memfd, which unmaps it from
//! every local rank at once. Write protection lives in each rank's
//! userfaultfd (registered MISSING | WP on the shared zone): before a read
//! copy is installed, the page is write-protected in every local rank (the
//! kernel keeps a marker on ranks that have not mapped it yet), and a write
//! to it is a WP fault that asks for ownership.
//!
//! Races the protocol handles:
//! - a read grant overtaken by an invalidation of a later epoch (different
//!   connections): the epoch of the grant is below the invalidation's, so
//!   the copy is dropped and asked for again;
//! - requests reaching a node that is about to own the page (its write
//!   request is on its way): queued until it owns it;
//! - a page taken away before the woken faulting thread used it: a page
//!   installed for local waiters is kept [`HOLD`] before it is given away.
//!
//! Release and weak consistency (the node's model of a page, `relaxed.rs`,
//! is its contract for its copies): the owner keeps copies under a relaxed
//! contract apart from the copyset and never invalidates them; their
//! holder drops them at its acquire points (release model) or when
//! `MomeSyncMem` asks (weak), when they are older than the date it must
//! reflect. Dates are a scalar Lamport clock: the owner dates every change
//! of a page (`mdate`: a local write starting, a delta merged) and every
//! copy it gives (`valid`). A copy dated at or after an acquire's date
//! holds every write released before that date, because the release
//! merged them at the owner before it told anyone (see docs/consistency.md).
//!
//! Multiple writers: the first writer of a page takes ownership as under
//! strong consistency and writes in place, with no twin. A relaxed write
//! request reaching an owner that is writing the page (or whose page has
//! other writers) gets a copy to write instead (`twin` grant): the writer
//! keeps a twin, and at its next release sends `page ^ twin`, compressed,
//! which the owner merges byte by byte (`PageDiff`, acknowledged).
//!
//! Everything runs under one mutex, never held across an await: each event
//! (a local fault, a message) does its state change, its ioctls, preads,
//! punches and queued sends in one short critical section.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mome_protocol::layout::{WindowLayout, PAGE_SIZE};
use mome_protocol::peer::{Model, PeerMsg, MAX_PREFETCH};
use mome_uffd::{copy_mode, fault_flag, Filled, Uffd, UffdError};
use tokio::sync::oneshot;

use crate::agent::{lock, SessionId};
use crate::faults::AliasTable;
use crate::mesh::Mesh;
use crate::relaxed::{self, ModelMap};

/// How long a page fetched for local waiters stays before another node may
/// take it: the woken threads must get to use it, or two nodes writing the
/// same page could take it from each other forever. Measured on page-share
/// (4 ranks, 2 nodes, 500 rounds): 0 us 0.34 s, 50 us 0.50 s, 200 us
/// 0.55 s, 1 ms 1.3 s: 50 us gives the woken threads their turn at a
/// small cost.
pub const HOLD: Duration = Duration::from_micros(50);
/// MOME_TRACE_PAGES=1 in the agent's environment logs every page event
/// (for chasing protocol races; very verbose).
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MOME_TRACE_PAGES").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            log!($($arg)*);
        }
    };
}

/// Forwards after which a request is logged as going round in circles.
const MAX_HOPS: u32 = 64;

#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Page(..)")
    }
}
static ZERO_PAGE: Page = Page([0; PAGE_SIZE as usize]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    None,
    Read,
    Write,
}

/// A fault of a local rank waiting for the page.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    session: SessionId,
    /// Faulting address (page-aligned), in the rank's address space: the
    /// window address or an alias of it.
    addr: u64,
    flags: u64,
}

/// A request of another node (or forwarded by one), as in `PageRequest`.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub from: u32,
    pub req: u64,
    pub write: bool,
    pub has_copy: bool,
    pub hops: u32,
    pub prefetch: u32,
    pub contract: Model,
    /// With `has_copy`: the date the requester's copy is valid from.
    pub copy_date: u64,
    /// The requester's date when it asked.
    pub date: u64,
}

/// This node's own request in flight.
#[derive(Debug)]
struct Pending {
    req: u64,
    write: bool,
    since: Instant,
    /// Node the request went to (for the failure report).
    asked: u32,
    /// Granted write: nodes whose InvalidateAck is awaited (bit per node).
    acks: u64,
    granted: bool,
    data: Option<Vec<u8>>,
    /// The grant is a copy to write with a twin (relaxed second writer).
    twin: bool,
    /// The owner's date in the grant.
    date: u64,
    /// The contract the request was made under.
    contract: Model,
    /// This node's date when it asked (its answer is dated after it).
    asked_at: u64,
}

/// A delta that reached this node before it owns the page it is for.
#[derive(Debug)]
struct QueuedDiff {
    from: u32,
    req: u64,
    date: u64,
    hops: u32,
    delta: Vec<u8>,
}

#[derive(Debug)]
struct Entry {
    access: Access,
    owner: bool,
    prob_owner: u32,
    /// Owner only: nodes holding a read copy (bit per node).
    copyset: u64,
    /// Epoch of this node's copy or ownership.
    epoch: u64,
    /// Copies of an epoch below this one are stale (an invalidation said so).
    min_epoch: u64,
    /// Boxed: most entries never have one, and the table has an entry per
    /// page touched.
    pending: Option<Box<Pending>>,
    waiters: Vec<Waiter>,
    queued: VecDeque<Request>,
    hold_until: Option<Instant>,
    /// Owner: date of the last change (a local write started, a delta
    /// merged); 0 while the page was never written since it came here.
    mdate: u64,
    /// Not owner: the date this node's copy is valid from.
    valid: u64,
    /// Owner: nodes holding a copy under a relaxed contract (never
    /// invalidated; bit per node).
    relaxed: u64,
    /// Owner: nodes writing a twinned copy (bit per node).
    writers: u64,
    /// Owner: invalidations sent after a merge, not acknowledged yet (bit
    /// per node); the merges wait for them before they are acknowledged.
    loose_acks: u64,
    /// Owner: merges acknowledged once `loose_acks` is empty, as (writer,
    /// its request): a release completes only when no copy kept current
    /// (strong contract) still shows the page as it was before.
    merge_waiting: Vec<(u32, u64)>,
    /// Not owner: this node's copy was given under a relaxed contract (the
    /// owner does not invalidate it).
    held_relaxed: bool,
    /// Second writer: the page as it was when this node started writing.
    twin: Option<Box<Page>>,
    /// Deltas for the owner this node is about to be.
    diffs: Vec<QueuedDiff>,
}

impl Entry {
    /// This node owns the page and can give it (or a copy) at once: no
    /// request of its own or of others in progress, not held.
    fn free_to_give(&self, now: Instant) -> bool {
        self.owner
            && self.pending.is_none()
            && self.queued.is_empty()
            && self.hold_until.is_none_or(|t| t <= now)
    }

    /// Owner: node `node`'s copy, valid from `date`, is the page as it is
    /// now (a copy in the copyset is kept current; a relaxed one is when
    /// the page did not change since it was given and is not being written
    /// in place here).
    fn holds_current(&self, node: u32, date: u64) -> bool {
        // A page written in place here changes without being dated.
        self.copyset & (1 << node) != 0
            || (self.relaxed & (1 << node) != 0
                && self.access != Access::Write
                && date > self.mdate)
    }

    /// Local ranks stop writing the page (it becomes read-only here). An
    /// owner writes in place without dating each write: the end of the
    /// writing dates what it changed, for copies given while it wrote.
    fn end_writing(&mut self, date: u64) {
        if self.access == Access::Write && self.owner {
            self.mdate = date;
        }
        self.access = Access::Read;
    }

    fn initial(home: u32, me: u32) -> Entry {
        Entry {
            access: if home == me {
                Access::Write
            } else {
                Access::None
            },
            owner: home == me,
            prob_owner: home,
            copyset: 0,
            epoch: 0,
            min_epoch: 0,
            pending: None,
            waiters: Vec::new(),
            queued: VecDeque::new(),
            hold_until: None,
            mdate: 0,
            valid: 0,
            relaxed: 0,
            writers: 0,
            loose_acks: 0,
            merge_waiting: Vec::new(),
            held_relaxed: false,
            twin: None,
            diffs: Vec::new(),
        }
    }
}

/// A local rank's view of the shared zone.
#[derive(Debug)]
struct RankView {
    uffd: Uffd,
    aliases: Arc<Mutex<AliasTable>>,
}

impl RankView {
    /// Every address at which this rank maps window address `window_addr`.
    fn addrs_of(&self, window_addr: u64) -> Vec<u64> {
        let mut v = vec![window_addr];
        v.extend(lock(&self.aliases).aliases_of(window_addr));
        v
    }
}

/// Counters, for the log and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageStats {
    pub read_faults: u64,
    pub write_faults: u64,
    pub requests_sent: u64,
    pub requests_served: u64,
    pub forwarded: u64,
    pub invalidations: u64,
    pub stale_grants: u64,
    /// Pages that came with a read grant without being asked for.
    pub prefetched: u64,
    /// Twinned copies granted to this node (second writer of a page).
    pub twins: u64,
    /// Deltas sent, their compressed bytes, and deltas merged here.
    pub diffs_sent: u64,
    pub diff_bytes: u64,
    pub diffs_merged: u64,
    /// Relaxed copies dropped at acquire points or by MomeSyncMem.
    pub stale_dropped: u64,
}

#[derive(Debug)]
struct Directory {
    entries: HashMap<u64, Entry>,
    ranks: BTreeMap<SessionId, RankView>,
    next_req: u64,
    stats: PageStats,
    /// Sequential read and write streams, for prefetch.
    reads: Streams,
    writes: Streams,
    /// Pages that became writable here since the last checkpoint capture:
    /// the only ones whose content this node can have changed (a capture
    /// takes write access back from every page it leaves to this node).
    written: std::collections::BTreeSet<u64>,
    /// Consistency model of each page on this node.
    models: ModelMap,
    /// Pages with a twin (this node writes a copy it does not own).
    twinned: std::collections::BTreeSet<u64>,
    /// Deltas sent and not acknowledged yet: request -> (page, node it
    /// went to, when).
    diffs_out: HashMap<u64, (u64, u32, Instant)>,
    /// Releases waiting for deltas to be acknowledged.
    release_waits: Vec<(std::collections::BTreeSet<u64>, oneshot::Sender<()>)>,
}

/// A few concurrent sequential access streams (a program sweeping two
/// arrays at once has two): the last page of each and its prefetch window,
/// which doubles while the stream goes on page after page.
#[derive(Debug, Default)]
struct Streams {
    /// (last page, window, last use), at most [`STREAMS`].
    streams: Vec<(u64, u32, u64)>,
    clock: u64,
}

const STREAMS: usize = 4;

impl Streams {
    /// A fault at `page`: the prefetch window to ask for.
    fn touch(&mut self, page: u64) -> u32 {
        self.clock += 1;
        let now = self.clock;
        if let Some(s) = self
            .streams
            .iter_mut()
            .find(|s| page > 0 && s.0 == page - 1)
        {
            s.1 = (s.1 * 2).clamp(1, MAX_PREFETCH);
            s.0 = page;
            s.2 = now;
            return s.1;
        }
        if self.streams.len() < STREAMS {
            self.streams.push((page, 0, now));
        } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|s| s.2) {
            *oldest = (page, 0, now);
        }
        0
    }

    /// Pages up to `last` came with the grant for `page`: the stream goes on
    /// from there.
    fn advance(&mut self, page: u64, last: u64) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.0 == page) {
            s.0 = last;
        }
    }
}

#[derive(Debug)]
pub struct PageEngine {
    node: u32,
    nodes: u32,
    layout: WindowLayout,
    /// The node's memory file (its own descriptor of it).
    memfd: std::fs::File,
    mesh: Arc<Mesh>,
    dir: Mutex<Directory>,
    /// The engine itself: hold timers reach it through this.
    me: Weak<PageEngine>,
    /// The node's Lamport clock (dates of release and weak consistency).
    clock: std::sync::atomic::AtomicU64,
    /// The shared zone of the node's memory, mapped here: deltas are merged
    /// through it byte by byte (see relaxed::merge).
    zone: ZoneMap,
}

/// What [`PageEngine::drop_stale`] did, and what is left.
#[derive(Debug)]
pub struct Stale {
    /// Copies dropped.
    pub dropped: usize,
    /// Stale twinned copies were released: their changes are merged when
    /// this fires, and the copies can go on the next call.
    pub merged: Option<oneshot::Receiver<()>>,
    /// Stale copies have a request of this node in flight: call again
    /// shortly.
    pub busy: bool,
    /// Stale twinned copies were released (with or without changes to
    /// merge): they are stale read copies now, dropped by the next call.
    pub again: bool,
}

/// The agent's own mapping of the shared zone of the memfd (not registered
/// with any userfaultfd: touching a page here never faults to the agent).
#[derive(Debug)]
struct ZoneMap {
    base: *mut u8,
    len: usize,
}

// SAFETY: a plain address range; every access goes through `page_ptr`
// under the directory mutex.
unsafe impl Send for ZoneMap {}
// SAFETY: as above.
unsafe impl Sync for ZoneMap {}

impl Drop for ZoneMap {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: the mapping made in `PageEngine::new`, used no more.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }
}

/// Pages of a run that share a home: a sequential first touch of a run is
/// one request (with prefetch) instead of one per page.
const HOME_RUN: u64 = 16;

/// Home (first owner) of a page: runs of [`HOME_RUN`] pages spread by
/// hash, so that no node manages the first touch of every page.
pub fn home_of(page: u64, nodes: u32) -> u32 {
    (((page / HOME_RUN).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % nodes as u64) as u32
}

impl PageEngine {
    pub fn new(
        layout: WindowLayout,
        memfd: OwnedFd,
        mesh: Arc<Mesh>,
        default_model: Model,
    ) -> Arc<PageEngine> {
        let len = layout.shared_size() as usize;
        // SAFETY: a new shared mapping of our memfd, NORESERVE (virtual
        // only: pages appear as they are written); checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                memfd.as_raw_fd(),
                layout.file_offset(layout.shared_base()) as libc::off_t,
            )
        };
        let base = if base == libc::MAP_FAILED {
            log!(
                "cannot map the shared zone in the agent ({}): deltas of multiple writers cannot be merged here",
                std::io::Error::last_os_error()
            );
            std::ptr::null_mut()
        } else {
            base.cast()
        };
        Arc::new_cyclic(|me| PageEngine {
            node: mesh.node,
            nodes: mesh.nodes,
            layout,
            memfd: std::fs::File::from(memfd),
            mesh,
            dir: Mutex::new(Directory {
                entries: HashMap::new(),
                ranks: BTreeMap::new(),
                next_req: 1,
                stats: PageStats::default(),
                reads: Streams::default(),
                writes: Streams::default(),
                written: std::collections::BTreeSet::new(),
                models: ModelMap::new(default_model),
                twinned: std::collections::BTreeSet::new(),
                diffs_out: HashMap::new(),
                release_waits: Vec::new(),
            }),
            me: me.clone(),
            clock: std::sync::atomic::AtomicU64::new(0),
            zone: ZoneMap { base, len },
        })
    }

    /// A new event of this node: its date.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// A date from another node: every later event of this one is after it.
    pub fn observe(&self, date: u64) {
        self.clock
            .fetch_max(date, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stats(&self) -> PageStats {
        lock(&self.dir).stats
    }

    fn window_addr(&self, page: u64) -> u64 {
        self.layout.shared_base() + page * PAGE_SIZE
    }

    fn file_offset(&self, page: u64) -> u64 {
        self.layout.file_offset(self.window_addr(page))
    }

    /// A local rank registered its shared-zone userfaultfd (a duplicate of
    /// it is kept here): pages this node holds read-only must be read-only
    /// for it too.
    pub fn add_rank(&self, session: SessionId, uffd: Uffd, aliases: Arc<Mutex<AliasTable>>) {
        let mut d = lock(&self.dir);
        let view = RankView { uffd, aliases };
        let read_pages: Vec<u64> = d
            .entries
            .iter()
            .filter(|(_, e)| e.access == Access::Read)
            .map(|(&p, _)| p)
            .collect();
        for p in read_pages {
            for addr in view.addrs_of(self.window_addr(p)) {
                report(
                    view.uffd.write_protect(addr, PAGE_SIZE, true, false),
                    "write-protect",
                );
            }
        }
        d.ranks.insert(session, view);
    }

    /// The rank mapped window range `window_addr..+len` also elsewhere:
    /// read-only pages of that range must be read-only there too.
    pub fn alias_added(&self, session: SessionId, window_addr: u64, len: u64) {
        let d = lock(&self.dir);
        let Some(view) = d.ranks.get(&session) else {
            return;
        };
        for (&p, e) in &d.entries {
            let w = self.window_addr(p);
            if e.access == Access::Read && w >= window_addr && w < window_addr + len {
                for addr in view.addrs_of(w) {
                    report(
                        view.uffd.write_protect(addr, PAGE_SIZE, true, false),
                        "write-protect",
                    );
                }
            }
        }
    }

    pub fn remove_rank(&self, session: SessionId) {
        let mut d = lock(&self.dir);
        d.ranks.remove(&session);
        for e in d.entries.values_mut() {
            e.waiters.retain(|w| w.session != session);
        }
    }

    /// A fault of local rank `session` at `addr` (in its address space),
    /// `window_addr` being the shared-zone address it stands for.
    pub fn fault(&self, session: SessionId, addr: u64, window_addr: u64, flags: u64) {
        let page = (window_addr - self.layout.shared_base()) / PAGE_SIZE;
        let waiter = Waiter {
            session,
            addr: addr & !(PAGE_SIZE - 1),
            flags,
        };
        let mut d = lock(&self.dir);
        let write = flags & (fault_flag::WRITE | fault_flag::WP) != 0;
        if write {
            d.stats.write_faults += 1;
        } else {
            d.stats.read_faults += 1;
        }
        // Sequential accesses (page after page, whoever serves them) grow
        // the prefetch window of the next request; others reset it.
        let prefetch = if write {
            d.writes.touch(page)
        } else {
            d.reads.touch(page)
        };
        self.entry(&mut d, page);
        let e = d.entries.get_mut(&page).expect("just made");
        if e.pending.is_some() {
            e.waiters.push(waiter);
            return;
        }
        if let Some(write) = self.resolve(&mut d, page, waiter) {
            let e = d.entries.get_mut(&page).expect("present");
            e.waiters.push(waiter);
            self.start_request(&mut d, page, write, prefetch);
        }
    }

    fn entry<'a>(&self, d: &'a mut Directory, page: u64) -> &'a mut Entry {
        let (home, me) = (home_of(page, self.nodes), self.node);
        d.entries
            .entry(page)
            .or_insert_with(|| Entry::initial(home, me))
    }

    /// Resolves a local fault with what the node holds; `Some(write)` when
    /// the page must be asked for first.
    fn resolve(&self, d: &mut Directory, page: u64, w: Waiter) -> Option<bool> {
        let wp = w.flags & fault_flag::WP != 0;
        let write = wp || w.flags & fault_flag::WRITE != 0;
        let access = d.entries.get(&page).map_or(Access::None, |e| e.access);
        let Some(view) = d.ranks.get(&w.session) else {
            return None; // the rank is gone
        };
        match access {
            Access::Write if wp => {
                d.written.insert(page);
                let view = &d.ranks[&w.session];
                report(
                    retry(|| view.uffd.write_protect(w.addr, PAGE_SIZE, false, false)),
                    "unprotect",
                );
                None
            }
            Access::Write => {
                // Owned and writable, but not in the memfd: never written
                // on any node since it was last dropped, so zero.
                d.written.insert(page);
                let view = &d.ranks[&w.session];
                let r = retry(|| view.uffd.copy(w.addr, ZERO_PAGE.0.as_ptr(), PAGE_SIZE))
                    .and_then(|f| wake_if_present(&view.uffd, w.addr, f));
                report(r, "install a zero page");
                None
            }
            Access::Read if write => Some(true),
            Access::Read => {
                if self.present(page) {
                    report(view.uffd.wake(w.addr, PAGE_SIZE), "wake");
                    None
                } else {
                    Some(false)
                }
            }
            Access::None if wp => {
                // Invalidated after the fault was raised: the retry is a
                // missing-page fault.
                report(view.uffd.wake(w.addr, PAGE_SIZE), "wake");
                None
            }
            Access::None => Some(write),
        }
    }

    /// Logs the first 16 bytes of the page as this node holds it (tracing).
    fn trace_head(&self, page: u64, what: &str) {
        if tracing() {
            let mut head = [0u8; 16];
            let _ = self.memfd.read_exact_at(&mut head, self.file_offset(page));
            log!("trace p{page}: {what} head {head:02x?}");
        }
    }

    /// Whether the page is in the node's memfd (SEEK_DATA at its offset).
    fn present(&self, page: u64) -> bool {
        let off = self.file_offset(page) as libc::off_t;
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let at = unsafe { libc::lseek(self.memfd.as_raw_fd(), off, libc::SEEK_DATA) };
        at == off
    }

    fn read_page(&self, page: u64) -> Vec<u8> {
        self.read_run(page, 1)
    }

    fn punch(&self, page: u64, count: u64) {
        let off = self.file_offset(page) as libc::off_t;
        let len = (count * PAGE_SIZE) as libc::off_t;
        // SAFETY: fallocate on our own memfd, inside its size.
        let rc = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            log!(
                "cannot drop pages {page}+{count} of the node memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Write-protects the page in every local rank, at every address it is
    /// mapped at (markers where not mapped yet).
    fn protect_everywhere(&self, d: &Directory, page: u64) {
        self.protect_except(d, page, None);
    }

    /// [`Self::protect_everywhere`] but at `skip` (a rank's address the
    /// page is about to be copied to write-protected anyway).
    fn protect_except(&self, d: &Directory, page: u64, skip: Option<(SessionId, u64)>) {
        let w = self.window_addr(page);
        for (&session, view) in &d.ranks {
            for addr in view.addrs_of(w) {
                if skip == Some((session, addr)) {
                    continue;
                }
                report(
                    view.uffd.write_protect(addr, PAGE_SIZE, true, false),
                    "write-protect",
                );
            }
        }
    }

    /// Asks for `page` (and, from another node, up to `prefetch` following
    /// pages: sequential accesses, see [`Streams`]).
    fn start_request(&self, d: &mut Directory, page: u64, write: bool, prefetch: u32) {
        let req = d.next_req;
        d.next_req += 1;
        let me = self.node;
        let contract = d.models.of(page);
        let e = self.entry(d, page);
        debug_assert!(e.pending.is_none());
        if e.owner {
            // Only a write upgrade can be needed at the owner, which holds
            // a copy: invalidate the copyset.
            let targets = e.copyset & !(1 << me);
            e.epoch += 1;
            e.min_epoch = e.epoch;
            e.copyset = 0;
            e.pending = Some(Box::new(Pending {
                req,
                write: true,
                since: Instant::now(),
                asked: me,
                acks: targets,
                granted: true,
                data: None,
                twin: false,
                date: 0,
                contract,
                asked_at: 0,
            }));
            let epoch = e.epoch;
            self.invalidate(d, page, epoch, targets);
            return;
        }
        let to = e.prob_owner;
        let asked_at = self.tick();
        let e = self.entry(d, page);
        e.pending = Some(Box::new(Pending {
            req,
            write,
            since: Instant::now(),
            asked: to,
            acks: 0,
            granted: false,
            data: None,
            twin: false,
            date: 0,
            contract,
            asked_at,
        }));
        let has_copy = e.access == Access::Read;
        let copy_date = e.valid;
        d.stats.requests_sent += 1;
        self.mesh.send(
            to,
            PeerMsg::PageRequest {
                page,
                from: me,
                req,
                write,
                has_copy,
                hops: 0,
                prefetch,
                contract,
                copy_date,
                date: asked_at,
            },
        );
    }

    /// The page arrived (and, for a write, every copy is invalidated):
    /// install it, then serve the local waiters and the queued requests.
    fn complete(&self, d: &mut Directory, page: u64) {
        let e = self.entry(d, page);
        let Some(p) = e.pending.take() else { return };
        trace!(
            "trace p{page}: complete req {} write={} owner={} queued={} waiters={}",
            p.req,
            p.write,
            e.owner,
            e.queued.len(),
            e.waiters.len()
        );
        let waiters = std::mem::take(&mut e.waiters);
        let had_copy = e.access == Access::Read;
        // A twin grant is a copy this node writes without owning it.
        let writable = p.write || p.twin;
        e.access = if writable {
            Access::Write
        } else {
            Access::Read
        };
        if !waiters.is_empty() {
            e.hold_until = Some(Instant::now() + HOLD);
        }
        if p.write {
            e.held_relaxed = false;
            d.written.insert(page);
            let date = self.tick();
            self.entry(d, page).mdate = date;
        } else {
            e.valid = p.date;
            e.held_relaxed = p.contract.relaxed();
        }
        let mut data = p.data;
        if let Some(data) = data.as_mut() {
            // New content for a page this node changed without owning it:
            // keep its changes (never expected: such a page is writable and
            // asks for nothing).
            self.merge_own_changes(d, page, data);
        }
        if p.twin {
            let twin = match &data {
                Some(data) => data.clone(),
                // The copy this node holds is current: write-protected in
                // every local rank, so nobody changes it while it is read.
                None => self.read_page(page),
            };
            self.keep_twin(d, page, &twin);
        }
        // The first waiter that missed the page gets it copied straight to
        // its address, woken by the copy.
        let target = waiters.iter().position(|w| {
            w.flags & fault_flag::WP == 0 && (writable || w.flags & fault_flag::WRITE == 0)
        });
        let mut served = None;
        if let Some(data) = data {
            if had_copy {
                self.punch(page, 1);
            }
            let skip = target.map(|i| (waiters[i].session, waiters[i].addr));
            if !writable {
                self.protect_except(d, page, skip);
            }
            if self.install(d, page, &data, !writable, skip) {
                served = target;
            }
            self.trace_head(page, "installed");
        }
        self.take_queued_diffs(d, page);
        let mut waiters = waiters;
        if let Some(i) = served {
            waiters.remove(i);
        }
        let mut rest = waiters.into_iter();
        for w in rest.by_ref() {
            if let Some(write) = self.resolve(d, page, w) {
                let e = self.entry(d, page);
                e.waiters.push(w);
                e.waiters.extend(rest);
                self.start_request(d, page, write, 0);
                return;
            }
        }
        self.serve_queue(d, page);
    }

    /// Puts `data` in the memfd atomically (UFFDIO_COPY through a local
    /// rank: the page appears whole or not at all), write-protected for a
    /// read copy.
    /// Returns true when the page went to `target` (which the copy woke).
    fn install(
        &self,
        d: &Directory,
        page: u64,
        data: &[u8],
        read_only: bool,
        target: Option<(SessionId, u64)>,
    ) -> bool {
        let mode = if read_only { copy_mode::WP } else { 0 };
        let window = self.window_addr(page);
        let candidates = target
            .into_iter()
            .chain(d.ranks.keys().map(|&s| (s, window)));
        for (session, addr) in candidates {
            let Some(view) = d.ranks.get(&session) else {
                continue;
            };
            let is_target = target == Some((session, addr));
            let wake = if is_target { 0 } else { copy_mode::DONTWAKE };
            for _ in 0..100 {
                match view
                    .uffd
                    .copy_with_mode(addr, data.as_ptr(), PAGE_SIZE, mode | wake)
                {
                    Ok(Filled::Copied) => return is_target,
                    // Not expected (the page is ours to install): the
                    // waiters are woken by resolve.
                    Ok(Filled::AlreadyPresent) => return false,
                    // The rank's address space is changing: try again.
                    Err(UffdError::Os { errno, .. }) if errno.0 == libc::EAGAIN => {
                        std::thread::yield_now()
                    }
                    Err(_) => break,
                }
            }
        }
        // No local rank can take it (none connected): no rank can see a
        // partly written page either.
        if let Err(e) = self.memfd.write_all_at(data, self.file_offset(page)) {
            log!("cannot write page {page} into the node memory: {e}");
        }
        false
    }

    /// A request from another node (or this one's loopback).
    pub fn on_request(&self, page: u64, r: Request) {
        let mut d = lock(&self.dir);
        let r = Request {
            prefetch: r.prefetch.min(MAX_PREFETCH),
            ..r
        };
        self.handle_request(&mut d, page, r);
    }

    fn handle_request(&self, d: &mut Directory, page: u64, r: Request) {
        let e = self.entry(d, page);
        trace!(
            "trace p{page}: request {} of n{} write={} owner={} access={:?} pending={:?} prob={} hold={}",
            r.req,
            r.from,
            r.write,
            e.owner,
            e.access,
            e.pending.as_ref().map(|p| (p.req, p.write, p.granted)),
            e.prob_owner,
            e.hold_until.is_some()
        );
        if !e.owner {
            if r.from == self.node {
                // This node's own request came back along the chain of
                // probable owners. Answered meanwhile (a page handed over
                // with another grant), it is done with; still waited for,
                // it goes on. Either way it must not be queued here (it
                // would wait for itself) nor make this node its own
                // probable owner (a request reaching it would loop).
                let waited = e.pending.as_ref().is_some_and(|p| p.req == r.req);
                if waited && e.prob_owner != self.node {
                    let to = e.prob_owner;
                    self.forward_request(to, page, r);
                }
                return;
            }
            if e.pending.as_ref().is_some_and(|p| p.write) {
                // This node is about to own the page.
                e.queued.push_back(r);
                return;
            }
            let to = e.prob_owner;
            if r.write {
                e.prob_owner = r.from;
            }
            if r.hops == MAX_HOPS {
                log!(
                    "request {} of node {} for page {page} forwarded {MAX_HOPS} times (now to node {to})",
                    r.req,
                    r.from
                );
            }
            d.stats.forwarded += 1;
            self.forward_request(to, page, r);
            return;
        }
        if r.from == self.node {
            // This node's own request, answered meanwhile by a page handed
            // over with another grant: nothing left to do.
            return;
        }
        let held = e.hold_until.is_some_and(|t| t > Instant::now());
        if e.pending.is_some() || held {
            e.queued.push_back(r);
            if held && e.pending.is_none() {
                self.after_hold(page, e.hold_until.expect("held"));
            }
            return;
        }
        self.serve(d, page, r);
    }

    /// Passes request `r` for `page` on to node `to`, one hop further.
    fn forward_request(&self, to: u32, page: u64, r: Request) {
        self.mesh.send(
            to,
            PeerMsg::PageRequest {
                page,
                from: r.from,
                req: r.req,
                write: r.write,
                has_copy: r.has_copy,
                hops: r.hops.saturating_add(1),
                prefetch: r.prefetch,
                contract: r.contract,
                copy_date: r.copy_date,
                date: r.date,
            },
        );
    }

    /// Serves queued requests of `page` once its hold time is over.
    fn after_hold(&self, page: u64, until: Instant) {
        let me = self.me.clone();
        // The runtime's timers tick in milliseconds, ten times the hold:
        // a blocking-pool thread sleeps it precisely instead.
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            if let Some(engine) = me.upgrade() {
                let mut d = lock(&engine.dir);
                let e = engine.entry(&mut d, page);
                if e.pending.is_none() {
                    e.hold_until = None;
                    engine.serve_queue(&mut d, page);
                }
            }
        });
    }

    fn serve_queue(&self, d: &mut Directory, page: u64) {
        loop {
            let e = self.entry(d, page);
            if e.pending.is_some() {
                return;
            }
            if e.hold_until.is_some_and(|t| t > Instant::now()) {
                if !e.queued.is_empty() {
                    let until = e.hold_until.expect("held");
                    self.after_hold(page, until);
                }
                return;
            }
            e.hold_until = None;
            let Some(r) = e.queued.pop_front() else {
                return;
            };
            self.handle_request(d, page, r);
        }
    }

    /// The owner, not busy, answers a request.
    fn serve(&self, d: &mut Directory, page: u64, r: Request) {
        let me = self.node;
        d.stats.requests_served += 1;
        let e = self.entry(d, page);
        let access = e.access;
        if !r.write {
            // Downgrade: no local rank may write once the copy is out (its
            // next write is a fault, which dates the change after the copy).
            if access == Access::Write {
                self.protect_everywhere(d, page);
            }
            // Dated before it is read: the copy holds every write made here
            // before its date (ranks may go on writing meanwhile).
            let date = self.tick();
            let data = self.read_page(page);
            let e = self.entry(d, page);
            e.end_writing(date);
            if r.contract.relaxed() {
                e.relaxed |= 1 << r.from;
            } else {
                e.copyset |= 1 << r.from;
            }
            let epoch = e.epoch;
            let extra = self.prefetched(d, page, r.from, r.prefetch, r.contract);
            self.mesh.send(
                r.from,
                PeerMsg::PageGrant {
                    page,
                    req: r.req,
                    write: false,
                    epoch,
                    copyset: 0,
                    data: Some(data),
                    extra,
                    date,
                    twin: false,
                },
            );
            return;
        }
        let e = self.entry(d, page);
        let writing = access == Access::Write && e.mdate != 0;
        if r.contract.relaxed() && (writing || e.writers & !(1 << r.from) != 0) {
            self.serve_twin(d, page, r);
            return;
        }
        if access == Access::Write {
            // Stop local writers before the last read of the page.
            self.protect_everywhere(d, page);
        }
        self.trace_head(page, "ownership given");
        let e = self.entry(d, page);
        let send_data = !(r.has_copy && e.holds_current(r.from, r.copy_date));
        trace!(
            "trace p{page}: to n{} has_copy={} copy_date={} copyset={:#x} relaxed={:#x} access={:?} mdate={} send_data={send_data}",
            r.from, r.has_copy, r.copy_date, e.copyset, e.relaxed, e.access, e.mdate
        );
        let copyset = e.copyset & !(1 << r.from) & !(1 << me);
        let epoch = e.epoch + 1;
        let data = send_data.then(|| self.read_page(page));
        self.punch(page, 1);
        let e = self.entry(d, page);
        e.access = Access::None;
        e.owner = false;
        e.prob_owner = r.from;
        e.copyset = 0;
        e.relaxed = 0;
        e.writers = 0;
        e.epoch = epoch;
        e.min_epoch = epoch;
        let extra = self.handed_over(d, page, r.from, r.prefetch);
        self.mesh.send(
            r.from,
            PeerMsg::PageGrant {
                page,
                req: r.req,
                write: true,
                epoch,
                copyset,
                data,
                extra,
                date: self.tick(),
                twin: false,
            },
        );
    }

    /// A relaxed write request while the page is being written here or by
    /// others: the requester gets a copy to write with a twin, and the
    /// page stays here.
    fn serve_twin(&self, d: &mut Directory, page: u64, r: Request) {
        // This node stops writing in place until its next write fault,
        // which dates its change after the copy.
        let e = self.entry(d, page);
        if e.access == Access::Write {
            self.protect_everywhere(d, page);
        }
        let date = self.tick();
        let e = self.entry(d, page);
        e.end_writing(date);
        let current = r.has_copy && e.holds_current(r.from, r.copy_date);
        e.writers |= 1 << r.from;
        e.relaxed |= 1 << r.from;
        e.copyset &= !(1 << r.from);
        let epoch = e.epoch;
        let data = (!current).then(|| self.read_page(page));
        let extra = self.twinned_run(d, page, r.from, r.prefetch);
        self.mesh.send(
            r.from,
            PeerMsg::PageGrant {
                page,
                req: r.req,
                write: false,
                epoch,
                copyset: 0,
                data,
                extra,
                date,
                twin: true,
            },
        );
    }

    /// Copies to write with a twin of the pages after `page` for `to` (a
    /// sequential relaxed writer), as long as this node owns them, holds
    /// them and can give them at once; this node stops writing them in
    /// place until its next write fault, as for the page asked for.
    fn twinned_run(
        &self,
        d: &mut Directory,
        page: u64,
        to: u32,
        count: u32,
    ) -> Vec<(u64, Vec<u8>)> {
        let (n, any_writable) = self.givable_run(d, page, count, |e| e.access != Access::None);
        if n == 0 {
            return Vec::new();
        }
        if any_writable {
            self.protect_run(d, page + 1, n);
        }
        let date = self.tick();
        let run = self.read_run(page + 1, n);
        run.chunks(PAGE_SIZE as usize)
            .enumerate()
            .map(|(i, data)| {
                let e = self.entry(d, page + 1 + i as u64);
                e.end_writing(date);
                e.writers |= 1 << to;
                e.relaxed |= 1 << to;
                e.copyset &= !(1 << to);
                (e.epoch, data.to_vec())
            })
            .collect()
    }

    /// Installs the copies to write that came with a twin grant, with
    /// their twins: pages this node does not own, asks nothing for, does
    /// not write already, and no invalidation made stale. The others are
    /// dropped (the owner then counts this node among the page's writers
    /// needlessly: it only makes the owner give copies rather than
    /// ownership).
    fn take_twinned(
        &self,
        d: &mut Directory,
        from: u32,
        page: u64,
        extra: Vec<(u64, Vec<u8>)>,
        date: u64,
    ) {
        let mut last = page;
        for (i, (epoch, data)) in extra.into_iter().enumerate() {
            let q = page + 1 + i as u64;
            let e = self.entry(d, q);
            let usable = e.pending.is_none()
                && !e.owner
                && e.twin.is_none()
                && e.access != Access::Write
                && epoch >= e.min_epoch;
            if !usable {
                continue;
            }
            if e.access == Access::Read {
                self.punch(q, 1);
            }
            let e = self.entry(d, q);
            e.access = Access::Write;
            e.prob_owner = from;
            e.epoch = epoch;
            e.valid = date;
            e.held_relaxed = true;
            self.keep_twin(d, q, &data);
            d.stats.prefetched += 1;
            self.install(d, q, &data, false, None);
            last = q;
        }
        d.writes.advance(page, last);
    }

    /// Ownership of the pages after `page` for `to` (sequential writes), as
    /// long as this node owns them, can give them at once and no third node
    /// holds a copy (the new owner then has nothing to invalidate).
    fn handed_over(
        &self,
        d: &mut Directory,
        page: u64,
        to: u32,
        count: u32,
    ) -> Vec<(u64, Vec<u8>)> {
        let others = !(1u64 << self.node) & !(1u64 << to);
        let (n, any_writable) = self.givable_run(d, page, count, |e| e.copyset & others == 0);
        if n == 0 {
            return Vec::new();
        }
        // Stop local writers, read the run, drop it: one call each. Sent
        // even where `to` holds the copy: it replaces it.
        if any_writable {
            self.protect_run(d, page + 1, n);
        }
        let run = self.read_run(page + 1, n);
        self.punch(page + 1, n);
        run.chunks(PAGE_SIZE as usize)
            .enumerate()
            .map(|(i, data)| {
                let e = self.entry(d, page + 1 + i as u64);
                e.access = Access::None;
                e.owner = false;
                e.prob_owner = to;
                e.copyset = 0;
                e.relaxed = 0;
                e.writers = 0;
                e.epoch += 1;
                e.min_epoch = e.epoch;
                (e.epoch, data.to_vec())
            })
            .collect()
    }

    /// How many pages after `page` (at most `count`, inside the window)
    /// this node can give at once and pass `also`; and whether one of them
    /// is writable here.
    fn givable_run(
        &self,
        d: &mut Directory,
        page: u64,
        count: u32,
        also: impl Fn(&Entry) -> bool,
    ) -> (u64, bool) {
        let now = Instant::now();
        let mut n = 0u64;
        let mut any_writable = false;
        for q in page + 1..=page + count as u64 {
            if self.window_addr(q) >= self.layout.end() {
                break;
            }
            let e = self.entry(d, q);
            if !e.free_to_give(now) || !also(e) {
                break;
            }
            any_writable |= e.access == Access::Write;
            n += 1;
        }
        (n, any_writable)
    }

    /// Pages `first..first+count` of the node's memory (holes read as zeros).
    fn read_run(&self, first: u64, count: u64) -> Vec<u8> {
        let mut run = vec![0u8; (count * PAGE_SIZE) as usize];
        if let Err(e) = self.memfd.read_exact_at(&mut run, self.file_offset(first)) {
            log!("cannot read pages {first}+{count} of the node memory: {e}");
        }
        run
    }

    /// This node owns `page` from `epoch` on, with `data`, handed over with
    /// another page's write grant. A request of its own still out for the
    /// page is answered by this (and dropped if it comes back).
    fn take_ownership(&self, d: &mut Directory, from: u32, page: u64, epoch: u64, data: &[u8]) {
        let me = self.node;
        let e = self.entry(d, page);
        trace!(
            "trace p{page}: handed over by n{from} epoch={epoch} owner={} pending={:?} queued={}",
            e.owner,
            e.pending.as_ref().map(|p| (p.req, p.write, p.granted)),
            e.queued.len()
        );
        if e.owner {
            log!("node {from} hands over page {page}, which this node owns: ignored");
            return;
        }
        let mut data = data.to_vec();
        self.merge_own_changes(d, page, &mut data);
        let date = self.tick();
        let e = self.entry(d, page);
        e.mdate = date;
        e.held_relaxed = false;
        let had_copy = e.access != Access::None;
        e.owner = true;
        e.prob_owner = me;
        e.epoch = epoch;
        e.min_epoch = epoch;
        e.copyset = 0;
        e.access = Access::Write;
        let pending = e.pending.take();
        let waiters = std::mem::take(&mut e.waiters);
        if !waiters.is_empty() {
            e.hold_until = Some(Instant::now() + HOLD);
        }
        d.written.insert(page);
        if had_copy {
            self.punch(page, 1);
        }
        self.install(d, page, &data, false, None);
        self.trace_head(page, "handed over, installed");
        self.take_queued_diffs(d, page);
        if pending.is_some() {
            log!("page {page}: handed over by node {from} while this node asked for it");
        }
        for w in waiters {
            // The node owns the page writable: nothing left to ask.
            let _ = self.resolve(d, page, w);
        }
        self.serve_queue(d, page);
    }

    /// Read copies of the pages after `page` for `to`, as long as this node
    /// owns them and can give them at once (not busy, not held).
    fn prefetched(
        &self,
        d: &mut Directory,
        page: u64,
        to: u32,
        count: u32,
        contract: Model,
    ) -> Vec<(u64, Vec<u8>)> {
        // A relaxed copy is dropped by its holder without telling the
        // owner: `relaxed` cannot say whether `to` still has one (the
        // receiver skips what it holds).
        let (n, any_writable) = self.givable_run(d, page, count, |e| {
            e.access != Access::None && e.copyset & (1 << to) == 0
        });
        if n == 0 {
            return Vec::new();
        }
        // One write-protect and one read for the whole run (write-protecting
        // a page already read-only changes nothing).
        if any_writable {
            self.protect_run(d, page + 1, n);
        }
        let run = self.read_run(page + 1, n);
        run.chunks(PAGE_SIZE as usize)
            .enumerate()
            .map(|(i, data)| {
                let date = self.tick();
                let e = self.entry(d, page + 1 + i as u64);
                e.end_writing(date);
                if contract.relaxed() {
                    e.relaxed |= 1 << to;
                } else {
                    e.copyset |= 1 << to;
                }
                (e.epoch, data.to_vec())
            })
            .collect()
    }

    /// Write-protects pages `first..first+count` in every local rank: one
    /// ioctl per rank for the window, one per page mapped elsewhere too.
    fn protect_run(&self, d: &Directory, first: u64, count: u64) {
        let start = self.window_addr(first);
        for view in d.ranks.values() {
            report(
                view.uffd
                    .write_protect(start, count * PAGE_SIZE, true, false),
                "write-protect",
            );
            let aliases = lock(&view.aliases);
            for q in first..first + count {
                for addr in aliases.aliases_of(self.window_addr(q)) {
                    report(
                        view.uffd.write_protect(addr, PAGE_SIZE, true, false),
                        "write-protect",
                    );
                }
            }
        }
    }

    /// The answer to one of this node's requests.
    #[allow(clippy::too_many_arguments)]
    pub fn on_grant(
        &self,
        from: u32,
        page: u64,
        req: u64,
        write: bool,
        epoch: u64,
        copyset: u64,
        data: Option<Vec<u8>>,
        extra: Vec<(u64, Vec<u8>)>,
        date: u64,
        twin: bool,
    ) {
        let me = self.node;
        self.observe(date);
        let mut d = lock(&self.dir);
        if tracing() {
            let e = self.entry(&mut d, page);
            log!(
                "trace p{page}: grant {req} from n{from} write={write} twin={twin} epoch={epoch} copyset={copyset:#x} extra={} owner={} pending={:?}",
                extra.len(),
                e.owner,
                e.pending.as_ref().map(|p| (p.req, p.write, p.granted))
            );
        }
        if !extra.is_empty() && twin {
            self.take_twinned(&mut d, from, page, extra, date);
        } else if !extra.is_empty() && !write {
            let contract = d
                .entries
                .get(&page)
                .and_then(|e| e.pending.as_ref())
                .map_or(Model::Strong, |p| p.contract);
            self.take_prefetched(&mut d, from, page, extra, date, contract);
        } else if !extra.is_empty() {
            let last = page + extra.len() as u64;
            for (i, (epoch, data)) in extra.into_iter().enumerate() {
                self.take_ownership(&mut d, from, page + 1 + i as u64, epoch, &data);
                d.stats.prefetched += 1;
            }
            d.writes.advance(page, last);
        }
        let e = self.entry(&mut d, page);
        let matches = e
            .pending
            .as_ref()
            .is_some_and(|p| p.req == req && !p.granted && p.write == (write || twin));
        if !matches && write && !e.owner {
            // A request this node gave up (a page handed over with another
            // grant answered it) was served after all, by an owner that
            // handed the page back meanwhile: the grant moves ownership
            // here, and ownership must never be dropped. Take it as the
            // answer to the node's current request, if any.
            log!("grant {req} of page {page} from node {from} answers a request this node gave up: taking the ownership it hands over");
            e.pending = Some(Box::new(Pending {
                req,
                write: true,
                since: Instant::now(),
                asked: from,
                acks: 0,
                granted: false,
                data: None,
                twin: false,
                date,
                contract: Model::Strong,
                asked_at: 0,
            }));
        } else if !matches {
            // A read copy nobody waits for: dropping it is safe (the owner's
            // copyset names this node needlessly).
            log!("grant {req} of page {page} from node {from} matches no request: ignored");
            return;
        }
        if !write {
            if epoch < e.min_epoch {
                // Overtaken by an invalidation: ask again.
                e.pending = None;
                d.stats.stale_grants += 1;
                self.start_request(&mut d, page, false, 0);
                return;
            }
            e.prob_owner = from;
            e.epoch = epoch;
            if let Some(p) = e.pending.as_mut() {
                p.granted = true;
                p.data = data;
                p.twin = twin;
                p.write = false;
                p.date = date;
            }
            self.complete(&mut d, page);
            return;
        }
        if data.is_none() && e.access != Access::Read {
            log!("write grant of page {page} from node {from} without data, but this node has no copy");
        }
        e.owner = true;
        e.prob_owner = me;
        e.epoch = epoch;
        e.min_epoch = epoch;
        e.copyset = 0;
        let targets = copyset & !(1 << me);
        if let Some(p) = e.pending.as_mut() {
            p.granted = true;
            p.data = data;
            p.acks = targets;
        }
        self.invalidate(&mut d, page, epoch, targets);
    }

    /// This node owns `page` from `epoch` on and waits for `targets` (the
    /// copyset) to drop their copies; with nobody to wait for, the page is
    /// writable here at once.
    fn invalidate(&self, d: &mut Directory, page: u64, epoch: u64, targets: u64) {
        for n in nodes_in(targets) {
            self.mesh.send(
                n,
                PeerMsg::Invalidate {
                    page,
                    epoch,
                    new_owner: self.node,
                },
            );
        }
        d.stats.invalidations += targets.count_ones() as u64;
        if targets == 0 {
            self.complete(d, page);
        }
    }

    /// Installs the prefetched read copies that are still of use: pages
    /// this node has no copy of, asks nothing for, and no invalidation made
    /// stale. The others are dropped (the owner's copyset then names this
    /// node needlessly: its invalidations find nothing to drop).
    fn take_prefetched(
        &self,
        d: &mut Directory,
        from: u32,
        page: u64,
        extra: Vec<(u64, Vec<u8>)>,
        date: u64,
        contract: Model,
    ) {
        let mut last = page;
        // Runs of consecutive pages still of use, installed a run at a time.
        let mut run: Vec<u8> = Vec::new();
        let mut run_first = 0;
        for (i, (epoch, data)) in extra.into_iter().enumerate() {
            let q = page + 1 + i as u64;
            let e = self.entry(d, q);
            // A read copy of an older epoch is replaced: the owner now
            // counts this node among the holders of the current one (a
            // merge gives copies again before its invalidation of the old
            // one arrived here), so it must be the one held.
            // Taken even with a request of this node in flight for it: the
            // owner counts this node in the copyset from now on, and its
            // answer to that request leaves the data out if so.
            let older = e.access == Access::Read && e.twin.is_none() && e.epoch < epoch;
            let usable = e.pending.as_ref().is_none_or(|p| !p.granted)
                && !e.owner
                && (e.access == Access::None || older)
                && epoch >= e.min_epoch;
            if !usable {
                self.install_run(d, run_first, &run);
                run.clear();
                continue;
            }
            if older {
                self.install_run(d, run_first, &run);
                run.clear();
                self.punch(q, 1);
            }
            let e = self.entry(d, q);
            e.access = Access::Read;
            e.prob_owner = from;
            e.epoch = epoch;
            e.valid = date;
            e.held_relaxed = contract.relaxed();
            if run.is_empty() {
                run_first = q;
            }
            run.extend_from_slice(&data);
            d.stats.prefetched += 1;
            last = q;
        }
        self.install_run(d, run_first, &run);
        d.reads.advance(page, last);
    }

    /// Installs read copies of consecutive pages from `first` (`data` holds
    /// them all): write-protected everywhere first, then one copy for the
    /// run, or page by page when that fails.
    fn install_run(&self, d: &Directory, first: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let count = data.len() as u64 / PAGE_SIZE;
        self.protect_run(d, first, count);
        let window = self.window_addr(first);
        if let Some(view) = d.ranks.values().next() {
            let whole = view.uffd.copy_with_mode(
                window,
                data.as_ptr(),
                data.len() as u64,
                copy_mode::WP | copy_mode::DONTWAKE,
            );
            if matches!(whole, Ok(Filled::Copied)) {
                return;
            }
        }
        // A page of the run was there already, or the rank's address space
        // changed: page by page (each either installed or present).
        for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            self.install(d, first + i as u64, page, true, None);
        }
    }

    pub fn on_invalidate(&self, from: u32, page: u64, epoch: u64, new_owner: u32) {
        let mut d = lock(&self.dir);
        let e = self.entry(&mut d, page);
        trace!(
            "trace p{page}: invalidate from n{from} epoch={epoch} new_owner={new_owner} owner={} pending={:?}",
            e.owner,
            e.pending.as_ref().map(|p| (p.req, p.write, p.granted))
        );
        if e.owner && epoch < e.epoch {
            // An invalidation sent after a merge that did not wait for it,
            // overtaken by the page coming here (with the merge in it):
            // nothing to drop, but the merge waits for this answer.
            self.mesh.send(from, PeerMsg::InvalidateAck { page, epoch });
            return;
        }
        if e.owner {
            log!("node {from} invalidates page {page} (epoch {epoch}), which this node owns (epoch {}): ignored", e.epoch);
            return;
        }
        if e.access != Access::None && e.epoch >= epoch && e.twin.is_none() {
            // A copy given after this invalidation was sent: a merge does
            // not wait for its invalidations before it gives copies again
            // (see `merge_diff`), and such a copy holds the merged page.
            // Dropping it would leave the owner's copyset wrong.
            self.mesh.send(from, PeerMsg::InvalidateAck { page, epoch });
            return;
        }
        e.min_epoch = e.min_epoch.max(epoch);
        e.prob_owner = new_owner;
        // Changes this node made to a twinned copy go to the new owner
        // before the copy does.
        self.flush_page(&mut d, page);
        let e = self.entry(&mut d, page);
        let had = e.access;
        e.access = Access::None;
        if had != Access::None {
            self.punch(page, 1);
        }
        self.mesh.send(from, PeerMsg::InvalidateAck { page, epoch });
    }

    pub fn on_invalidate_ack(&self, from: u32, page: u64, epoch: u64) {
        let mut d = lock(&self.dir);
        let e = self.entry(&mut d, page);
        let awaited = e.epoch == epoch && e.pending.as_ref().is_some_and(|p| p.granted && p.write);
        if !awaited && e.loose_acks & (1 << from) != 0 {
            // A copy dropped after a merge: once none is left, the merges
            // are acknowledged.
            e.loose_acks &= !(1 << from);
            if e.loose_acks == 0 {
                let date = e.mdate;
                for (writer, req) in std::mem::take(&mut e.merge_waiting) {
                    self.ack_merge(&mut d, page, writer, req, date);
                }
            }
            return;
        }
        let Some(p) = e.pending.as_mut().filter(|p| p.granted && p.write) else {
            log!("invalidation ack of page {page} from node {from} matches no request: ignored");
            return;
        };
        if e.epoch != epoch {
            log!("invalidation ack of page {page} epoch {epoch} from node {from}, expected epoch {}: ignored", e.epoch);
            return;
        }
        p.acks &= !(1 << from);
        if p.acks == 0 {
            self.complete(&mut d, page);
        }
    }

    /// Pages of a freed or shrunk segment: dropped and forgotten everywhere.
    pub fn drop_pages(&self, first: u64, count: u64) {
        let mut d = lock(&self.dir);
        self.punch(first, count);
        let mut woken = Vec::new();
        d.entries.retain(|&p, e| {
            if p < first || p >= first + count {
                return true;
            }
            woken.append(&mut e.waiters);
            false
        });
        let gone: Vec<u64> = d.twinned.range(first..first + count).copied().collect();
        for p in gone {
            d.twinned.remove(&p);
        }
        for w in woken {
            if let Some(view) = d.ranks.get(&w.session) {
                let _ = view.uffd.wake(w.addr, PAGE_SIZE);
            }
        }
    }

    /// Requests of this node still in flight (checkpoints wait for none,
    /// on every node, before taking the shared zone).
    pub fn outstanding(&self) -> usize {
        let d = lock(&self.dir);
        d.entries.values().filter(|e| e.pending.is_some()).count() + d.diffs_out.len()
    }

    /// This node's part of a checkpoint of the shared zone, taken while
    /// every rank of the job is parked and no page message is in flight:
    /// the pages this node owns and holds (shared-zone page numbers, in
    /// runs), and those of them it may have changed since the last capture.
    /// Each page of the zone that is not zero is owned by exactly one node
    /// then, so the nodes' parts do not overlap. Write access is taken back
    /// from the pages it keeps (owner, read-only): the next write to one
    /// of them is a local fault, which marks it changed for the next
    /// capture.
    pub fn capture(&self) -> (Vec<std::ops::Range<u64>>, Vec<std::ops::Range<u64>>) {
        let mut d = lock(&self.dir);
        let mut owned: Vec<u64> = d
            .entries
            .iter()
            .filter(|(_, e)| e.owner && e.access != Access::None)
            .map(|(&p, _)| p)
            .filter(|&p| self.present(p))
            .collect();
        owned.sort_unstable();
        let written = std::mem::take(&mut d.written);
        let changed: Vec<u64> = owned
            .iter()
            .copied()
            .filter(|p| written.contains(p))
            .collect();
        self.take_write_access(&mut d);
        (runs_of(&owned), runs_of(&changed))
    }

    /// Every page this node owns and may write becomes read-only (owner,
    /// empty copyset): the next local write to one is a fault that marks
    /// it written, which checkpoints rely on to see what changed.
    fn take_write_access(&self, d: &mut Directory) {
        let mut writable: Vec<u64> = Vec::new();
        let date = self.tick();
        for (&p, e) in d.entries.iter_mut() {
            if e.owner && e.access == Access::Write {
                e.end_writing(date);
                writable.push(p);
            }
        }
        writable.sort_unstable();
        for r in runs_of(&writable) {
            self.protect_run(d, r.start, r.end - r.start);
        }
    }

    /// Pages of a capture whose checkpoint did not make it: changed still.
    pub fn mark_written(&self, runs: impl Iterator<Item = std::ops::Range<u64>>) {
        let mut d = lock(&self.dir);
        for r in runs {
            d.written.extend(r);
        }
    }

    /// Pre-copy of the shared zone (ranks running): the pages this node
    /// owns and holds that changed since the last capture (every one it
    /// holds when `all`), to copy now; write access is taken back from
    /// them first, so that a write from now on marks a page changed again
    /// (and the pause copies it again), as the private zone's pre-copy
    /// relies on its dirty scans.
    pub fn precopy(&self, all: bool) -> Vec<std::ops::Range<u64>> {
        let mut d = lock(&self.dir);
        let mut take: Vec<u64> = d
            .entries
            .iter()
            .filter(|(p, e)| e.owner && e.access != Access::None && (all || d.written.contains(p)))
            .map(|(&p, _)| p)
            .collect();
        self.take_write_access(&mut d);
        take.retain(|&p| self.present(p));
        take.sort_unstable();
        for p in &take {
            d.written.remove(p);
        }
        runs_of(&take)
    }

    /// Restore: this node owned `pages` (shared-zone page numbers) at the
    /// stamp, and their content is already in its memory file.
    pub fn restore_owned(&self, pages: &[std::ops::Range<u64>]) {
        let mut d = lock(&self.dir);
        for r in pages {
            for p in r.clone() {
                let date = self.tick();
                let e = self.entry(&mut d, p);
                e.owner = true;
                e.prob_owner = self.node;
                e.access = Access::Read;
                e.copyset = 0;
                e.mdate = date;
            }
        }
    }

    /// Restore: node `owner` owns `pages` (so this node, their home, sends
    /// requests there instead of serving them as zero pages).
    pub fn restore_owner_hint(&self, owner: u32, first: u64, count: u64) {
        if owner == self.node {
            return;
        }
        let mut d = lock(&self.dir);
        for p in first..first + count {
            let e = self.entry(&mut d, p);
            if e.owner && e.access != Access::None && self.present(p) {
                log!("restore: node {owner} claims page {p}, which this node holds: kept here");
                continue;
            }
            e.owner = false;
            e.access = Access::None;
            e.prob_owner = owner;
        }
    }

    // ---- release and weak consistency ----

    /// Pages `range` (of the shared zone) use `model` on this node from
    /// now on. Copies this node holds under a relaxed contract in a part
    /// that becomes strong must go (their owner does not invalidate them):
    /// the answer is what to wait for before they can (see `drop_stale`).
    pub fn set_model(
        &self,
        range: std::ops::Range<u64>,
        model: Model,
    ) -> Vec<std::ops::Range<u64>> {
        let mut d = lock(&self.dir);
        d.models.set(range, model)
    }

    /// The ranges with a model other than the default (for a checkpoint).
    pub fn models(&self) -> Vec<(u64, u64, Model)> {
        lock(&self.dir)
            .models
            .ranges()
            .map(|(r, m)| (r.start, r.end, m))
            .collect()
    }

    /// Restore: the models this node had and its clock at the stamp.
    pub fn restore_models(&self, models: &[(u64, u64, Model)], clock: u64) {
        let mut d = lock(&self.dir);
        for &(first, end, model) in models {
            d.models.set(first..end, model);
        }
        drop(d);
        self.observe(clock);
    }

    /// Whether any page may be under a relaxed model here (acquire points
    /// have nothing to do otherwise).
    pub fn any_relaxed(&self) -> bool {
        let d = lock(&self.dir);
        d.models.of(u64::MAX).relaxed() || d.models.ranges().any(|(_, m)| m.relaxed())
    }

    /// Pages this node writes with a twin (changes not released yet).
    pub fn twinned(&self) -> usize {
        lock(&self.dir).twinned.len()
    }

    /// A release point of this node: the changes of every twinned copy go
    /// to the owners. The answer fires once every change this node sent so
    /// far is merged (`None`: nothing is in flight).
    pub fn release(&self) -> Option<oneshot::Receiver<()>> {
        let mut d = lock(&self.dir);
        let pages: Vec<u64> = d.twinned.iter().copied().collect();
        for p in pages {
            self.flush_page(&mut d, p);
        }
        Self::wait_for_diffs(&mut d)
    }

    fn wait_for_diffs(d: &mut Directory) -> Option<oneshot::Receiver<()>> {
        if d.diffs_out.is_empty() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let set = d.diffs_out.keys().copied().collect();
        d.release_waits.push((set, tx));
        Some(rx)
    }

    /// Drops the copies held under a relaxed contract that are older than
    /// `date`: in `range` (all pages when `None`), whose model passes
    /// `model_filter`. Twinned copies among them are released first and
    /// dropped by a later call, as are copies with a request of this node
    /// in flight (its answer may be older than `date` too): the caller
    /// calls again until nothing is left (see [`Stale`]).
    pub fn drop_stale(
        &self,
        date: u64,
        range: Option<std::ops::Range<u64>>,
        model_filter: impl Fn(Model) -> bool,
    ) -> Stale {
        let mut d = lock(&self.dir);
        let mut stale = Vec::new();
        let mut twinned = Vec::new();
        let mut busy = false;
        for (&p, e) in &d.entries {
            if e.owner || range.as_ref().is_some_and(|r| !r.contains(&p)) {
                continue;
            }
            if let Some(q) = e.pending.as_ref() {
                // Asked for before the acquire under a relaxed contract: the
                // answer (and the pages that come with it) may be older
                // than the acquire; look again once it is in.
                if !q.granted
                    && q.asked_at < date
                    && q.contract.relaxed()
                    && model_filter(d.models.of(p))
                {
                    busy = true;
                }
                continue;
            }
            if e.access == Access::None || e.valid >= date {
                continue;
            }
            if !(e.held_relaxed || e.twin.is_some()) || !model_filter(d.models.of(p)) {
                continue;
            }
            if e.twin.is_some() {
                twinned.push(p);
            } else {
                stale.push(p);
            }
        }
        stale.sort_unstable();
        if tracing() && !stale.is_empty() {
            log!("trace: acquire at {date} drops {stale:?}, flushes {twinned:?}, busy {busy}");
        }
        for r in runs_of(&stale) {
            self.punch(r.start, r.end - r.start);
            for p in r {
                let e = self.entry(&mut d, p);
                e.access = Access::None;
                e.held_relaxed = false;
            }
        }
        d.stats.stale_dropped += stale.len() as u64;
        for &p in &twinned {
            self.flush_page(&mut d, p);
        }
        Stale {
            dropped: stale.len(),
            merged: if twinned.is_empty() {
                None
            } else {
                Self::wait_for_diffs(&mut d)
            },
            busy,
            again: !twinned.is_empty(),
        }
    }

    /// This node writes `page` from now on with `data` as its twin (the
    /// page as it was when it started writing).
    fn keep_twin(&self, d: &mut Directory, page: u64, data: &[u8]) {
        let mut twin = Box::new(Page([0; PAGE_SIZE as usize]));
        twin.0.copy_from_slice(data);
        self.entry(d, page).twin = Some(twin);
        d.twinned.insert(page);
        d.stats.twins += 1;
    }

    /// Sends the changes of a twinned copy to the page's owner (nothing
    /// when there is no twin or nothing changed); the copy becomes a read
    /// copy again, so that the next local write asks anew.
    fn flush_page(&self, d: &mut Directory, page: u64) {
        let me = self.node;
        let Some(e) = d.entries.get_mut(&page) else {
            return;
        };
        let Some(twin) = e.twin.take() else {
            return;
        };
        let owner = e.owner;
        d.twinned.remove(&page);
        // Stop local writers before the page is read for its delta.
        self.protect_everywhere(d, page);
        let date = self.tick();
        let e = self.entry(d, page);
        e.end_writing(date);
        if owner {
            // The page came here meanwhile: the changes are in place.
            return;
        }
        let to = e.prob_owner;
        let current = self.read_page(page);
        trace!(
            "trace p{page}: flush to n{to} head {:02x?} twin head {:02x?}",
            &current[..16],
            &twin.0[..16]
        );
        let Some(delta) = relaxed::delta(&current, &twin.0) else {
            return;
        };
        let req = d.next_req;
        d.next_req += 1;
        d.stats.diffs_sent += 1;
        d.stats.diff_bytes += delta.len() as u64;
        d.diffs_out.insert(req, (page, to, Instant::now()));
        self.mesh.send(
            to,
            PeerMsg::PageDiff {
                page,
                from: me,
                req,
                date: self.tick(),
                hops: 0,
                delta,
            },
        );
    }

    /// `data` is about to replace the content of `page` here: changes this
    /// node made to a twinned copy of it are carried over (and the twin
    /// goes: the page is no longer a copy of someone else's).
    fn merge_own_changes(&self, d: &mut Directory, page: u64, data: &mut [u8]) {
        let Some(e) = d.entries.get_mut(&page) else {
            return;
        };
        let Some(twin) = e.twin.take() else {
            return;
        };
        d.twinned.remove(&page);
        self.protect_everywhere(d, page);
        let current = self.read_page(page);
        relaxed::merge_into(data, &relaxed::xor(&current, &twin.0));
    }

    /// Node `sender` passed on the changes node `from` made to `page`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_diff(&self, page: u64, from: u32, req: u64, date: u64, hops: u32, delta: Vec<u8>) {
        self.observe(date);
        let mut d = lock(&self.dir);
        let e = self.entry(&mut d, page);
        if e.owner && e.pending.is_none() {
            self.merge_diff(&mut d, page, from, req, &delta);
            return;
        }
        if e.pending.as_ref().is_some_and(|p| p.write) || e.owner {
            // This node owns the page or is about to: merged once it does.
            e.diffs.push(QueuedDiff {
                from,
                req,
                date,
                hops,
                delta,
            });
            return;
        }
        let to = e.prob_owner;
        self.forward_diff(
            to,
            page,
            QueuedDiff {
                from,
                req,
                date,
                hops,
                delta,
            },
        );
    }

    /// Passes changes `q` to `page` on to node `to`, one hop further.
    fn forward_diff(&self, to: u32, page: u64, q: QueuedDiff) {
        if q.hops == MAX_HOPS {
            log!(
                "changes {} of node {} to page {page} forwarded {MAX_HOPS} times (now to node {to})",
                q.req,
                q.from
            );
        }
        self.mesh.send(
            to,
            PeerMsg::PageDiff {
                page,
                from: q.from,
                req: q.req,
                date: q.date,
                hops: q.hops.saturating_add(1),
                delta: q.delta,
            },
        );
    }

    /// Deltas queued while this node waited for `page`: merged if it owns
    /// it now, sent on to the owner otherwise.
    fn take_queued_diffs(&self, d: &mut Directory, page: u64) {
        let e = self.entry(d, page);
        if e.diffs.is_empty() || e.pending.is_some() {
            return;
        }
        let diffs = std::mem::take(&mut e.diffs);
        let (owner, to) = (e.owner, e.prob_owner);
        for q in diffs {
            if owner {
                self.merge_diff(d, page, q.from, q.req, &q.delta);
            } else {
                self.forward_diff(to, page, q);
            }
        }
    }

    /// The owner merges node `from`'s changes to `page` into its copy,
    /// dates the change, drops the copies it keeps current (strong
    /// contracts: relaxed ones are their holders' business) and
    /// acknowledges.
    fn merge_diff(&self, d: &mut Directory, page: u64, from: u32, req: u64, delta: &[u8]) {
        let x = match relaxed::unpack(delta) {
            Ok(x) => x,
            Err(e) => {
                log!("changes {req} of node {from} to page {page}: {e}; dropped");
                return;
            }
        };
        let Some(ptr) = self.page_ptr(page) else {
            log!("changes {req} of node {from} to page {page}: the shared zone is not mapped in the agent; dropped");
            return;
        };
        // SAFETY: `ptr` is page `page` of the agent's mapping of the shared
        // zone (checked in page_ptr); local ranks may write other bytes of
        // it meanwhile, not the ones the delta changes (disjoint writers).
        unsafe { relaxed::merge(ptr, &x) };
        if tracing() {
            // SAFETY: as above, 16 bytes of the page, for the log.
            let head = unsafe { std::slice::from_raw_parts(ptr, 16) };
            log!(
                "trace p{page}: merged {req} of n{from} delta head {:02x?} now {head:02x?}",
                &x[..16]
            );
        }
        d.written.insert(page);
        d.stats.diffs_merged += 1;
        let date = self.tick();
        let me = self.node;
        let e = self.entry(d, page);
        e.mdate = date;
        e.writers &= !(1 << from);
        let targets = e.copyset & !(1 << me) & !(1 << from);
        if targets != 0 {
            e.epoch += 1;
            e.min_epoch = e.epoch;
            e.copyset = 0;
            e.loose_acks |= targets;
            let epoch = e.epoch;
            for n in nodes_in(targets) {
                self.mesh.send(
                    n,
                    PeerMsg::Invalidate {
                        page,
                        epoch,
                        new_owner: me,
                    },
                );
            }
        }
        let e = self.entry(d, page);
        if e.loose_acks != 0 {
            e.merge_waiting.push((from, req));
            return;
        }
        self.ack_merge(d, page, from, req, date);
    }

    fn ack_merge(&self, d: &mut Directory, page: u64, from: u32, req: u64, date: u64) {
        if from == self.node {
            self.diff_acked(d, req);
        } else {
            self.mesh.send(from, PeerMsg::DiffAck { page, req, date });
        }
    }

    pub fn on_diff_ack(&self, from: u32, page: u64, req: u64, date: u64) {
        self.observe(date);
        let mut d = lock(&self.dir);
        if !d.diffs_out.contains_key(&req) {
            log!("merge ack {req} of page {page} from node {from} matches no change sent: ignored");
            return;
        }
        self.diff_acked(&mut d, req);
    }

    fn diff_acked(&self, d: &mut Directory, req: u64) {
        d.diffs_out.remove(&req);
        for (mut set, tx) in std::mem::take(&mut d.release_waits) {
            set.remove(&req);
            if set.is_empty() {
                let _ = tx.send(());
            } else {
                d.release_waits.push((set, tx));
            }
        }
    }

    /// Page `page` of the agent's mapping of the shared zone.
    fn page_ptr(&self, page: u64) -> Option<*mut u8> {
        let off = page.checked_mul(PAGE_SIZE)? as usize;
        if self.zone.base.is_null() || off + PAGE_SIZE as usize > self.zone.len {
            return None;
        }
        // SAFETY: inside the mapping (checked above).
        Some(unsafe { self.zone.base.add(off) })
    }

    /// The oldest request of this node older than `limit`, as (node asked,
    /// description), for failure detection.
    pub fn stuck(&self, limit: Duration) -> Option<(u32, String)> {
        let d = lock(&self.dir);
        let late_delta = d
            .diffs_out
            .values()
            .find(|(_, _, since)| since.elapsed() > limit);
        if let Some(&(page, to, since)) = late_delta {
            return Some((
                to,
                format!(
                    "changes to page {page} not merged after {:.1} s",
                    since.elapsed().as_secs_f64()
                ),
            ));
        }
        d.entries.iter().find_map(|(&page, e)| {
            let p = e.pending.as_ref()?;
            let age = p.since.elapsed();
            if age <= limit {
                return None;
            }
            let what = if p.granted {
                format!(
                    "invalidations of page {page} not acknowledged after {:.1} s",
                    age.as_secs_f64()
                )
            } else {
                format!(
                    "no answer for page {page} ({}) after {:.1} s",
                    if p.write { "write" } else { "read" },
                    age.as_secs_f64()
                )
            };
            let node = if p.granted {
                nodes_in(p.acks).next().unwrap_or(p.asked)
            } else {
                p.asked
            };
            Some((node, what))
        })
    }
}

/// Ascending page numbers as half-open runs.
pub fn runs_of(pages: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if r.end == p => r.end = p + 1,
            _ => runs.push(p..p + 1),
        }
    }
    runs
}

fn nodes_in(set: u64) -> impl Iterator<Item = u32> {
    (0..64u32).filter(move |n| set & (1 << n) != 0)
}

/// Runs a userfaultfd operation again while the kernel answers EAGAIN (the
/// rank's address space is changing): giving up would leave the faulting
/// thread asleep for good.
fn retry<T>(mut op: impl FnMut() -> Result<T, UffdError>) -> Result<T, UffdError> {
    let mut tries = 0;
    loop {
        match op() {
            Err(UffdError::Os { errno, .. }) if errno.0 == libc::EAGAIN && tries < 10_000 => {
                tries += 1;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

fn wake_if_present(uffd: &Uffd, addr: u64, filled: Filled) -> Result<(), UffdError> {
    match filled {
        Filled::Copied => Ok(()),
        Filled::AlreadyPresent => uffd.wake(addr, PAGE_SIZE),
    }
}

/// Logs a failed ioctl, except ENOENT/ESRCH (the rank is exiting).
fn report(r: Result<(), UffdError>, what: &str) {
    match r {
        Ok(()) => {}
        Err(UffdError::Os { errno, .. }) if errno.0 == libc::ENOENT || errno.0 == libc::ESRCH => {}
        Err(e) => log!("cannot {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_spread_over_nodes() {
        let mut count = [0u32; 4];
        for p in 0..4000 {
            count[home_of(p, 4) as usize] += 1;
        }
        assert!(count.iter().all(|&c| c > 800), "{count:?}");
        assert!((0..100).all(|p| home_of(p, 1) == 0));
    }

    #[test]
    fn node_sets() {
        assert_eq!(nodes_in(0b1011).collect::<Vec<_>>(), vec![0, 1, 3]);
    }
}
