//! MomeMalloc: malloc in memory shared by every rank of every node
//! (`mome_shmalloc`/`mome_shfree` of mome.h, and the whole malloc family
//! when `memory.malloc` is `shared`).
//!
//! Owns the shared heap area: a segment of the window's shared zone
//! (`mome:shmalloc`, one slot of `window.segment_reserve` bytes) that every
//! rank maps at the same address, so blocks can be linked by pointers and
//! read anywhere; across nodes the page protocol keeps it coherent.
//!
//! ```text
//! heap 0:    page 0 unused | owner[heap]: u16 (node + 1, 0: unclaimed) ...
//!            | at 1 MiB: one block per node, NODE_STRIDE apart (lock, Growth, dlmalloc)
//! heaps 1..: node n's share, a contiguous run: the n-th of `nodes` parts
//! ```
//!
//! - Heaps are claimed without any job-wide lock: a node takes heaps only
//!   from its own share, in order, and records itself in `owner[h]` (a
//!   plain store to shared memory, read by the nodes that free its blocks).
//! - One allocator per node, not per rank: dlmalloc whose state lives in
//!   the node's block of heap 0, guarded by a process-shared futex lock that
//!   only the node's ranks take. A block freed by any rank of the node is a
//!   local free (the common case of a structure built and torn down on one
//!   node), memory freed by one rank is reused by the others, and a rank
//!   ending strands nothing. The lock's page never leaves the node, so it
//!   costs what a local mutex does. Per rank would need a lock-free path
//!   for frees by the node's other ranks, for a gain only under heavy
//!   contention among the few ranks of a node.
//! - A block of another node's heap is not freed here: its address goes to
//!   that node through the agents (`ShmallocFree` -> `RemoteFree`), and
//!   the owner node's ranks apply their queue (`ShmallocTake`) before their
//!   allocator grows and every `DRAIN_EVERY` allocations. The freeing node
//!   gathers such frees in its block (`Outgoing`, shared by its ranks) and
//!   sends them `MAX_SHMALLOC_FREES` at a time, and whatever it holds when
//!   it applies its own queue: one round trip to the agent per batch
//!   instead of per free. A block waiting there is still allocated for its
//!   owner, so the delay only postpones its reuse.
//! - The area, node states and heaps are window memory: a checkpoint saves
//!   them with the shared zone; queued remote frees are in the owner
//!   agent's tables (see dsm-agent/src/shmalloc.rs).

use core::ffi::c_void;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use mome_protocol::layout::{HEAP_SIZE, PAGE_SIZE};
use mome_protocol::rank::{
    AgentReply, RankRequest, MAX_SHMALLOC_FREES, MAX_SHMALLOC_TAKE, SHMALLOC_FREE_ENTRY,
};

use crate::lock::{FutexLock, SharedLock};
use crate::state::{self, Mode};
use crate::{report, segments, sys};

/// Name of the segment holding the area (the agent keeps it strong).
pub const AREA_NAME: &str = mome_protocol::rank::SHMALLOC_AREA;
/// `owner[heap]` table, in heap 0.
const OWNERS_OFFSET: u64 = PAGE_SIZE;
/// Node states, in heap 0, each in pages of its own (only its node writes
/// them, so they stay on that node).
const NODES_OFFSET: u64 = 1 << 20;
const NODE_STRIDE: u64 = 16 << 10;
/// Most nodes a job may have for the area's heap 0 to hold their states.
pub const MAX_NODES: u32 = ((HEAP_SIZE - NODES_OFFSET) / NODE_STRIDE) as u32;
/// Allocations of a node between two looks at its queue of remote frees.
const DRAIN_EVERY: u64 = 1024;
/// Remote frees taken in one request.
const TAKE_MAX: usize = MAX_SHMALLOC_TAKE;
/// dlmalloc grows by at least this much at a time.
const GRANULARITY: usize = 1 << 20;
const MALLOC_ALIGN: usize = 16;
/// dlmalloc chunk header bits (see malloc.rs `usable`).
const PINUSE: usize = 1;
const CINUSE: usize = 2;

/// Why a block cannot be freed; reported on stderr, never fatal.
#[derive(Debug, thiserror::Error, Clone, Copy)]
pub enum ShfreeError {
    #[error("{0:#x} is not in the shared heaps of mome_shmalloc")]
    NotShared(u64),
    #[error("{0:#x} is in the shared heaps' header, not a block")]
    Header(u64),
    #[error("{0:#x} is in a shared heap no node has allocated from")]
    Unclaimed(u64),
    #[error("{0:#x} is not an allocated block (freed twice, or not a block start)")]
    NotAllocated(u64),
    #[error("{addr:#x} belongs to node {node}, which this job does not have")]
    NoSuchNode { addr: u64, node: u32 },
    #[error("{0:#x}: the shared heaps are not available in this process")]
    NoArea(u64),
}

/// A node's block in heap 0: the lock word at offset 0, `Growth` at
/// `GROWTH_OFFSET`, dlmalloc's state at `DL_OFFSET`. Three separate
/// places, reached by raw pointers, because dlmalloc's callback updates
/// `Growth` while the caller holds dlmalloc's state.
const GROWTH_OFFSET: u64 = 64;
const DL_OFFSET: u64 = 512;
const OUT_OFFSET: u64 = NODE_STRIDE - 1024;

/// Frees of other nodes' blocks made on this node, not sent yet; guarded
/// by the node lock.
#[repr(C)]
struct Outgoing {
    count: u32,
    /// `ShmallocFree` entries: owner node, block address, little-endian.
    entries: [[u8; SHMALLOC_FREE_ENTRY]; MAX_SHMALLOC_FREES],
}

/// What a node's allocator knows besides dlmalloc's state; guarded by the
/// node lock.
#[repr(C)]
struct Growth {
    /// dlmalloc state initialised.
    ready: u32,
    /// dlmalloc wanted to grow while queued frees may be waiting: apply
    /// them, then let it grow (`may_grow`).
    want_drain: u32,
    may_grow: u32,
    /// First address of the node's share, next address not yet given to
    /// dlmalloc, end of the share.
    start: u64,
    brk: u64,
    end: u64,
    /// Allocations so far (paces the look at the remote-free queue).
    calls: u64,
}

const _: () = assert!(GROWTH_OFFSET + core::mem::size_of::<Growth>() as u64 <= DL_OFFSET);
const _: () = assert!(DL_OFFSET + core::mem::size_of::<Dl>() as u64 <= OUT_OFFSET);
const _: () = assert!(OUT_OFFSET + core::mem::size_of::<Outgoing>() as u64 <= NODE_STRIDE);

/// dlmalloc's system allocator for a node: page runs of its share, taken
/// in order and never given back (dlmalloc reuses what is freed).
pub struct ShareSystem;
type Dl = dlmalloc::Dlmalloc<ShareSystem>;

/// Area base and end; 0 until this process attached it.
static AREA_BASE: AtomicU64 = AtomicU64::new(0);
static AREA_END: AtomicU64 = AtomicU64::new(0);
/// Serialises attaching within the process.
static ATTACH: FutexLock<()> = FutexLock::new(());
/// Attaching failed (said once).
static ATTACH_FAILED: AtomicU8 = AtomicU8::new(0);
/// `memory.malloc` from MOME_MALLOC: 0 not read yet, 1 private, 2 shared.
static MALLOC_MODE: AtomicU8 = AtomicU8::new(0);

#[derive(Clone, Copy)]
struct Area {
    base: u64,
    heaps: u64,
    node: u32,
    nodes: u32,
}

impl Area {
    fn owner(&self, heap: u64) -> &AtomicU16 {
        // SAFETY: heap < heaps, so the entry lies in heap 0 (heaps * 2
        // bytes from OWNERS_OFFSET stay below NODES_OFFSET, checked at
        // attach); the area is mapped for the life of the process.
        unsafe { &*((self.base + OWNERS_OFFSET + heap * 2) as *const AtomicU16) }
    }

    /// This node's block in heap 0 (node < MAX_NODES, checked at attach).
    fn node_block(&self) -> u64 {
        self.base + NODES_OFFSET + self.node as u64 * NODE_STRIDE
    }

    fn lock_word(&self) -> &'static AtomicU32 {
        // SAFETY: the word lies in the area, mapped for the life of the
        // process, and is only ever used atomically.
        unsafe { &*(self.node_block() as *const AtomicU32) }
    }

    fn growth(&self) -> *mut Growth {
        (self.node_block() + GROWTH_OFFSET) as *mut Growth
    }

    fn dl(&self) -> *mut Dl {
        (self.node_block() + DL_OFFSET) as *mut Dl
    }

    fn outgoing(&self) -> *mut Outgoing {
        (self.node_block() + OUT_OFFSET) as *mut Outgoing
    }

    /// Heap range `[first, end)` of node `n`'s share.
    fn share(&self, n: u32) -> (u64, u64) {
        let usable = self.heaps - 1;
        let nodes = self.nodes as u64;
        (
            1 + usable * n as u64 / nodes,
            1 + usable * (n as u64 + 1) / nodes,
        )
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.base + self.heaps * HEAP_SIZE
    }

    fn multi(&self) -> bool {
        self.nodes > 1
    }
}

/// The area as attached, if it is.
fn attached() -> Option<Area> {
    let base = AREA_BASE.load(Ordering::Acquire);
    if base == 0 {
        return None;
    }
    let info = state::info()?;
    Some(Area {
        base,
        heaps: (AREA_END.load(Ordering::Relaxed) - base) / HEAP_SIZE,
        node: info.node,
        nodes: info.nodes,
    })
}

/// The area, mapped on first use (opening its segment by name creates it
/// on the first rank of the job to ask). Ranks only.
fn attach() -> Option<Area> {
    if let Some(a) = attached() {
        return Some(a);
    }
    if state::mode() != Mode::Rank || ATTACH_FAILED.load(Ordering::Relaxed) != 0 {
        return None;
    }
    let _g = ATTACH.lock();
    if let Some(a) = attached() {
        return Some(a);
    }
    let info = state::info()?;
    let size = info.layout.segment_reserve;
    let heaps = size / HEAP_SIZE;
    let fail = |why: core::fmt::Arguments<'_>| {
        ATTACH_FAILED.store(1, Ordering::Relaxed);
        report!(
            "rank {}: no shared heaps (mome_shmalloc): {}",
            info.rank,
            why
        );
        None
    };
    if info.nodes > MAX_NODES {
        return fail(format_args!(
            "{} nodes, the shared heaps serve at most {MAX_NODES}",
            info.nodes
        ));
    }
    if heaps < 1 + info.nodes as u64 || OWNERS_OFFSET + heaps * 2 > NODES_OFFSET {
        return fail(format_args!(
            "window.segment_reserve ({size} bytes) must give each of the {} nodes an 8 MiB heap, and at most {} heaps in all",
            info.nodes,
            (NODES_OFFSET - OWNERS_OFFSET) / 2
        ));
    }
    let seg = match segments::open(AREA_NAME, size, true, false) {
        Ok(s) => s,
        Err(e) => return fail(format_args!("opening segment {AREA_NAME}: errno {e}")),
    };
    segments::view_added(seg.id);
    AREA_END.store(seg.addr + size, Ordering::Relaxed);
    AREA_BASE.store(seg.addr, Ordering::Release);
    attached()
}

/// Whether `addr` may be a block of the shared heaps: it lies in the
/// window's shared zone (the area is attached on demand by `free`).
#[inline]
pub fn in_shared_zone(addr: u64) -> bool {
    state::info().is_some_and(|i| addr >= i.layout.shared_base() && addr < i.layout.end())
}

/// Whether `addr` lies in the attached area (a dlmalloc chunk if allocated).
#[inline]
pub fn in_area(addr: u64) -> bool {
    let base = AREA_BASE.load(Ordering::Relaxed);
    base != 0 && addr >= base && addr < AREA_END.load(Ordering::Relaxed)
}

/// `memory.malloc: shared` for this rank: the program's malloc family
/// allocates here.
#[inline]
pub fn malloc_is_shared() -> bool {
    match MALLOC_MODE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let shared = sys::getenv(c"MOME_MALLOC") == Some("shared");
            MALLOC_MODE.store(if shared { 2 } else { 1 }, Ordering::Relaxed);
            shared
        }
    }
}

/// The node's allocator locked, dlmalloc ready. Everything reached through
/// `area.growth()` and `area.dl()` is used only while the guard lives.
fn lock_node(area: &Area) -> SharedLock<'static> {
    let guard = SharedLock::lock(area.lock_word());
    // SAFETY: node lock held; no other reference to the node's state.
    let g = unsafe { &mut *area.growth() };
    if g.ready == 0 {
        let (first, end) = area.share(area.node);
        g.start = area.base + first * HEAP_SIZE;
        g.brk = g.start;
        g.end = area.base + end * HEAP_SIZE;
        let mut dl = dlmalloc::Dlmalloc::new_with_allocator(ShareSystem);
        dl.set_granularity(GRANULARITY);
        // SAFETY: the place is zeroed window memory, never initialised,
        // reserved for dlmalloc's state (DL_OFFSET).
        unsafe { core::ptr::write(area.dl(), dl) };
        g.ready = 1;
    }
    guard
}

// SAFETY: alloc hands out page runs of the node's share, never handed out
// before (so zeroed), exclusively to this dlmalloc; nothing is freed.
unsafe impl dlmalloc::Allocator for ShareSystem {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        // Called by dlmalloc, under the node lock of the calling rank.
        let Some(area) = attached() else {
            return (null_mut(), 0, 0);
        };
        // SAFETY: the caller of dlmalloc holds the node lock and no
        // reference to `Growth` while dlmalloc runs.
        let st = unsafe { &mut *area.growth() };
        if area.multi() && st.may_grow == 0 {
            // Blocks freed on other nodes may wait: apply them first.
            st.want_drain = 1;
            return (null_mut(), 0, 0);
        }
        st.may_grow = 0;
        let len = (size as u64).next_multiple_of(PAGE_SIZE);
        if st.brk.saturating_add(len) > st.end {
            return (null_mut(), 0, 0);
        }
        let start = st.brk;
        st.brk += len;
        let tag = area.node as u16 + 1;
        for heap in (start - area.base) / HEAP_SIZE..=(st.brk - 1 - area.base) / HEAP_SIZE {
            let o = area.owner(heap);
            // Load first: a store to the shared header page would take it
            // from the nodes reading it.
            if o.load(Ordering::Relaxed) != tag {
                o.store(tag, Ordering::Release);
            }
        }
        (start as *mut u8, len as usize, 0)
    }
    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        null_mut()
    }
    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }
    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }
    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        PAGE_SIZE as usize
    }
}

/// Runs a dlmalloc allocation; when dlmalloc had to grow while remote frees
/// may be queued, applies the queue and runs it again, growing this time.
/// Node lock held.
fn allocating(area: &Area, op: impl Fn(&mut Dl) -> *mut u8) -> *mut u8 {
    let g = area.growth();
    // SAFETY (all blocks below): node lock held; each reference to the
    // node's state lives for one statement, none while dlmalloc runs
    // (whose callback updates `Growth`).
    let calls = unsafe {
        (*g).calls += 1;
        (*g).calls
    };
    if area.multi() && calls.is_multiple_of(DRAIN_EVERY) {
        drain(area);
    }
    // SAFETY: as above.
    let p = op(unsafe { &mut *area.dl() });
    // SAFETY: as above.
    if !p.is_null() || unsafe { (*g).want_drain } == 0 {
        return p;
    }
    // SAFETY: as above.
    unsafe { (*g).want_drain = 0 };
    drain(area);
    // SAFETY: as above.
    unsafe { (*g).may_grow = 1 };
    // SAFETY: as above.
    let p = op(unsafe { &mut *area.dl() });
    // SAFETY: as above.
    unsafe { (*g).may_grow = 0 };
    p
}

/// Sends the frees of other nodes' blocks gathered on this node; node lock
/// held.
fn flush(area: &Area) {
    let out = area.outgoing();
    // SAFETY: node lock held; no other reference to `Outgoing`.
    let n = (unsafe { (*out).count } as usize).min(MAX_SHMALLOC_FREES);
    if n == 0 {
        return;
    }
    let mut bytes = [0u8; SHMALLOC_FREE_ENTRY * MAX_SHMALLOC_FREES];
    // SAFETY: as above.
    let entries = unsafe { &(&(*out).entries)[..n] };
    for (dst, e) in bytes.chunks_exact_mut(SHMALLOC_FREE_ENTRY).zip(entries) {
        dst.copy_from_slice(e);
    }
    let req = RankRequest::ShmallocFree {
        frees: &bytes[..n * SHMALLOC_FREE_ENTRY],
    };
    // The count is cleared inside the call, where no checkpoint can come
    // (mem_call blocks its signal): a stamp has the frees either still
    // here or sent and queued by their owners, never both.
    state::mem_call(&req, None, "ShmallocFree", |r| {
        // SAFETY: as above.
        unsafe { (*out).count = 0 };
        match r {
            Ok(AgentReply::Ok) => {}
            Ok(AgentReply::Error { message, .. }) => {
                report!("{} frees of other nodes' blocks refused: {}", n, message)
            }
            Ok(_) => report!("the agent answered ShmallocFree with something else"),
            Err(e) => report!("{} frees of other nodes' blocks lost: {}", n, e),
        }
    });
}

/// Applies the frees other nodes sent for this node's blocks (sending this
/// node's own first); node lock held.
fn drain(area: &Area) {
    flush(area);
    loop {
        let mut addrs = [0u64; TAKE_MAX];
        let req = RankRequest::ShmallocTake {
            max: TAKE_MAX as u32,
        };
        let n = state::mem_call(&req, None, "ShmallocTake", |r| match r {
            Ok(AgentReply::Frees { addrs: bytes }) => {
                let mut n = 0;
                for (slot, b) in addrs.iter_mut().zip(bytes.chunks_exact(8)) {
                    *slot = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                    n += 1;
                }
                n
            }
            Ok(AgentReply::Error { message, .. }) => {
                report!("taking the shared blocks freed by other nodes: {}", message);
                0
            }
            Ok(_) => {
                report!("the agent answered ShmallocTake with something else");
                0
            }
            Err(e) => {
                report!("taking the shared blocks freed by other nodes: {}", e);
                0
            }
        });
        for &a in &addrs[..n] {
            if let Err(e) = free_locked(area, a) {
                report!("a block freed on another node: {}: ignored", e);
            }
        }
        if n < TAKE_MAX {
            return;
        }
    }
}

/// Whether `p` is the start of an allocated block of this node's
/// allocator: cheap checks on its chunk header and the next chunk's, which
/// catch a block freed twice unless its memory was merged or reused since.
fn allocated(area: &Area, p: u64) -> bool {
    // SAFETY: node lock held (callers); read of two words.
    let (start, brk) = unsafe { ((*area.growth()).start, (*area.growth()).brk) };
    let st = Bounds { start, brk };
    if !p.is_multiple_of(MALLOC_ALIGN as u64) || p < st.start + 16 || p >= st.brk {
        return false;
    }
    // SAFETY: p - 8 lies in [start, brk), memory of the node's share.
    let head = unsafe { *((p - 8) as *const usize) };
    let size = (head & !7) as u64;
    let chunk = p - 16;
    if head & CINUSE == 0 || size < 32 || chunk + size + 16 > st.brk {
        return false;
    }
    // SAFETY: the next chunk's header lies below brk (checked above).
    let next_head = unsafe { *((chunk + size + 8) as *const usize) };
    next_head & PINUSE != 0
}

struct Bounds {
    start: u64,
    brk: u64,
}

/// Frees a block of this node, node lock held.
fn free_locked(area: &Area, p: u64) -> Result<(), ShfreeError> {
    if !area.contains(p) || !allocated(area, p) {
        return Err(ShfreeError::NotAllocated(p));
    }
    // SAFETY: p is an allocated block of this node's dlmalloc (checked
    // above); node lock held, no other reference to its state.
    unsafe { (*area.dl()).c_free(p as *mut u8) };
    Ok(())
}

/// Allocates `size` bytes aligned to `align` from the node's shared heaps;
/// null (errno not set) when the area is unavailable or full.
pub fn alloc(size: usize, align: usize) -> *mut c_void {
    let Some(area) = attach() else {
        return null_mut();
    };
    let size = size.max(1);
    let _guard = lock_node(&area);
    let p = if align <= MALLOC_ALIGN {
        // SAFETY: dlmalloc's C-style malloc on the node's instance, lock held.
        allocating(&area, |dl| unsafe { dl.c_malloc(size) })
    } else {
        // SAFETY: as above; align is a power of two (checked by callers).
        allocating(&area, |dl| unsafe { dl.c_memalign(align, size) })
    };
    p.cast()
}

/// `alloc` zeroed.
pub fn alloc_zeroed(size: usize) -> *mut c_void {
    let p = alloc(size, MALLOC_ALIGN);
    if !p.is_null() {
        // SAFETY: p is a fresh block of at least `size` bytes.
        unsafe { core::ptr::write_bytes(p.cast::<u8>(), 0, size) };
    }
    p
}

/// Which node owns the heap of `p`, after checking `p` is in a claimed
/// heap of the area.
fn owner_of(p: u64) -> Result<(Area, u32), ShfreeError> {
    let area = if in_area(p) {
        attached()
    } else if in_shared_zone(p) {
        // A block another rank allocated, freed by a rank that never
        // allocated one: map the area to know.
        attach()
    } else {
        return Err(ShfreeError::NotShared(p));
    };
    let Some(area) = area else {
        return Err(ShfreeError::NoArea(p));
    };
    if !area.contains(p) {
        return Err(ShfreeError::NotShared(p));
    }
    let heap = (p - area.base) / HEAP_SIZE;
    if heap == 0 {
        return Err(ShfreeError::Header(p));
    }
    match area.owner(heap).load(Ordering::Acquire) {
        0 => Err(ShfreeError::Unclaimed(p)),
        tag if u32::from(tag) > area.nodes => Err(ShfreeError::NoSuchNode {
            addr: p,
            node: u32::from(tag) - 1,
        }),
        tag => Ok((area, u32::from(tag) - 1)),
    }
}

/// Sends the frees of other nodes' blocks this node gathered so far (at a
/// barrier: their owners can reuse the blocks after it, not only once a
/// batch is full).
pub fn flush_pending_frees() {
    if state::mode() != Mode::Rank {
        return;
    }
    if let Some(area) = attached() {
        let _guard = lock_node(&area);
        flush(&area);
    }
}

/// Frees block `p` of the shared heaps, wherever it was allocated.
pub fn free(p: u64) -> Result<(), ShfreeError> {
    if state::mode() != Mode::Rank {
        // A forked child has no allocator of the node: the block stays
        // (as the parent's heaps do for it).
        return Ok(());
    }
    let (area, owner) = owner_of(p)?;
    if owner == area.node {
        let _guard = lock_node(&area);
        return free_locked(&area, p);
    }
    if !p.is_multiple_of(MALLOC_ALIGN as u64) {
        return Err(ShfreeError::NotAllocated(p));
    }
    let _guard = lock_node(&area);
    let out = area.outgoing();
    // SAFETY: node lock held; no other reference to `Outgoing`.
    unsafe {
        let n = ((*out).count as usize).min(MAX_SHMALLOC_FREES - 1);
        let e = &mut (*out).entries[n];
        e[..4].copy_from_slice(&owner.to_le_bytes());
        e[4..].copy_from_slice(&p.to_le_bytes());
        (*out).count = n as u32 + 1;
    }
    // SAFETY: as above.
    if unsafe { (*out).count } as usize == MAX_SHMALLOC_FREES {
        flush(&area);
    }
    Ok(())
}

/// Reports a failed free of the shared heaps on stderr, naming the rank
/// and the function the program called.
pub fn report_free_error(what: &str, e: ShfreeError) {
    let rank = state::info().map_or(0, |i| i.rank);
    report!("rank {}: {}: {}: ignored", rank, what, e);
}

/// Bytes usable in block `p` (a dlmalloc chunk, see malloc.rs `usable`).
fn usable(p: u64) -> usize {
    // SAFETY: p is an allocated block: its header word precedes it.
    let head = unsafe { *((p - 8) as *const usize) };
    (head & !7) - 8
}

/// realloc of block `p` of the shared heaps. A block of another node is
/// moved to this node's heaps (its old copy freed remotely).
pub fn realloc(p: u64, size: usize) -> Result<*mut c_void, ShfreeError> {
    let (area, owner) = owner_of(p)?;
    if owner == area.node {
        let _guard = lock_node(&area);
        if !allocated(&area, p) {
            return Err(ShfreeError::NotAllocated(p));
        }
        // SAFETY: p is an allocated block of this dlmalloc (checked above).
        let q = allocating(&area, |dl| unsafe { dl.c_realloc(p as *mut u8, size) });
        return Ok(q.cast());
    }
    let q = alloc(size, MALLOC_ALIGN);
    if !q.is_null() {
        // SAFETY: both blocks are valid for min(old, size) bytes.
        unsafe {
            core::ptr::copy_nonoverlapping(p as *const u8, q.cast::<u8>(), usable(p).min(size))
        };
        free(p)?;
    }
    Ok(q)
}

/// Bytes this node's shared allocator took from its heaps so far.
pub fn footprint() -> u64 {
    let Some(area) = attach() else {
        return 0;
    };
    let _guard = lock_node(&area);
    // SAFETY: node lock held.
    unsafe { (*area.growth()).brk - (*area.growth()).start }
}

/// fork's prepare handler: takes the node lock (so the child's copy of the
/// heaps is not taken in the middle of this process's own allocation);
/// whether the area is attached.
pub fn lock_for_fork() -> bool {
    let Some(area) = attached() else {
        return false;
    };
    core::mem::forget(lock_node(&area));
    true
}

/// fork's parent handler: releases the lock `lock_for_fork` took.
pub fn unlock_after_fork() {
    if let Some(area) = attached() {
        SharedLock::unlock(area.lock_word());
    }
}

/// The attached area: first address and size.
pub fn area_range() -> Option<(u64, u64)> {
    let base = AREA_BASE.load(Ordering::Acquire);
    (base != 0).then(|| (base, AREA_END.load(Ordering::Relaxed) - base))
}

// ---- mome.h ----

#[no_mangle]
pub extern "C" fn mome_shmalloc(size: usize) -> *mut c_void {
    if state::mode() != Mode::Rank {
        return crate::malloc::malloc(size);
    }
    let p = alloc(size, MALLOC_ALIGN);
    if p.is_null() {
        sys::set_errno(libc::ENOMEM);
    }
    p
}

#[no_mangle]
pub extern "C" fn mome_shcalloc(n: usize, size: usize) -> *mut c_void {
    if state::mode() != Mode::Rank {
        return crate::malloc::calloc(n, size);
    }
    let Some(total) = n.checked_mul(size) else {
        sys::set_errno(libc::ENOMEM);
        return null_mut();
    };
    let p = alloc_zeroed(total);
    if p.is_null() {
        sys::set_errno(libc::ENOMEM);
    }
    p
}

/// # Safety
/// `p` is null or a block of mome_shmalloc (the C contract).
#[no_mangle]
pub unsafe extern "C" fn mome_shrealloc(p: *mut c_void, size: usize) -> *mut c_void {
    if state::mode() != Mode::Rank {
        // SAFETY: same contract.
        return unsafe { crate::malloc::realloc(p, size) };
    }
    if p.is_null() {
        return mome_shmalloc(size);
    }
    if size == 0 {
        // SAFETY: same contract.
        unsafe { mome_shfree(p) };
        return null_mut();
    }
    match realloc(p as u64, size) {
        Ok(q) if q.is_null() => {
            sys::set_errno(libc::ENOMEM);
            q
        }
        Ok(q) => q,
        Err(e) => {
            report_free_error("mome_shrealloc", e);
            sys::set_errno(libc::EINVAL);
            null_mut()
        }
    }
}

/// # Safety
/// `p` is null or a block of mome_shmalloc (the C contract).
#[no_mangle]
pub unsafe extern "C" fn mome_shfree(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if state::mode() != Mode::Rank {
        // SAFETY: same contract.
        return unsafe { crate::malloc::free(p) };
    }
    if let Err(e) = free(p as u64) {
        report_free_error("mome_shfree", e);
    }
}

#[no_mangle]
pub extern "C" fn mome_shmalloc_footprint() -> usize {
    if state::mode() != Mode::Rank {
        return 0;
    }
    footprint() as usize
}
