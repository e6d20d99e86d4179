//! Page-granular allocation of the rank's private heaps: the memory behind
//! dlmalloc's segments and the application's anonymous mmaps.
//!
//! The rank gets 8 MiB heaps from its agent (heap ownership is the node's
//! business) and carves them into page runs here. Its bookkeeping lives in
//! the rank's control area, at the start of the window memory it owns, so it
//! is saved and restored with the window like the rest of the heap:
//!
//! ```text
//! control area:  Control header | PageHeap[private_heaps] | owned list: u32[private_heaps]
//! ```
//! Freed pages are dropped at once (MADV_REMOVE), so memory handed out again
//! reads zero, as mmap and dlmalloc's calloc expect.

use mome_protocol::layout::{HEAP_SIZE, PAGES_PER_HEAP, PAGE_SIZE};

use crate::lock::FutexLock;
use crate::sys;

const WORDS: usize = (PAGES_PER_HEAP / 64) as usize;
const CONTROL_MAGIC: u64 = 0x6d6f_6d65_6374_6c31; // "momectl1"
/// Empty heaps kept instead of given back, so that a program that maps and
/// unmaps a buffer in a loop does not ask its agent for a heap every time.
const SPARE_EMPTY_HEAPS: u32 = 2;

/// Per-heap page bitmap.
#[repr(C)]
pub struct PageHeap {
    owned: u32,
    used: u32,
    bits: [u64; WORDS],
}

/// Header of the control area.
#[repr(C)]
pub struct Control {
    magic: u64,
    /// Heaps in the private zone (length of the tables below).
    heaps_total: u32,
    /// First heap and count of the control area itself.
    control_first: u32,
    control_count: u32,
    /// Number of entries in the owned list.
    owned_count: u32,
    /// Owned heaps whose pages are all free.
    empty_count: u32,
    /// Where the last successful small allocation was found.
    hint: u32,
    /// dlmalloc's state (see malloc.rs); lives here so it is in the window.
    pub dl: crate::malloc::Dl,
}

/// Where heaps come from: the agent (a rank) or the process itself (a forked
/// child, whose private zone is its own private memory).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HeapSource {
    Agent,
    Local,
}

pub struct Pages {
    control: *mut Control,
    base: u64,
    source: HeapSource,
}

// SAFETY: the raw pointer is only used under the PAGES lock.
unsafe impl Send for Pages {}

pub static PAGES: FutexLock<Pages> = FutexLock::new(Pages {
    control: core::ptr::null_mut(),
    base: 0,
    source: HeapSource::Agent,
});

/// Bytes of the control area for a zone of `heaps` heaps.
pub fn control_bytes(heaps: u32) -> u64 {
    core::mem::size_of::<Control>() as u64
        + heaps as u64 * core::mem::size_of::<PageHeap>() as u64
        + heaps as u64 * 4
}

impl Pages {
    // The tables live in window memory, not in `self`: `Pages` is a handle
    // reached only through the PAGES lock, which is what makes these
    // accessors exclusive. Callers keep at most one reference to the same
    // entry at a time.
    #[allow(clippy::mut_from_ref)]
    fn ctl(&self) -> &mut Control {
        // SAFETY: `control` points to the control area set up by `init`,
        // mapped for the life of the process; the PAGES lock serialises use.
        unsafe { &mut *self.control }
    }

    #[allow(clippy::mut_from_ref)]
    fn heap(&self, index: u32) -> &mut PageHeap {
        // SAFETY: index < heaps_total, so the entry lies in the control area.
        unsafe {
            &mut *((self.control as *mut u8).add(core::mem::size_of::<Control>()) as *mut PageHeap)
                .add(index as usize)
        }
    }

    fn owned_list(&self) -> *mut u32 {
        let c = self.ctl();
        // SAFETY: the owned list follows the PageHeap table in the control area.
        unsafe {
            (self.control as *mut u8)
                .add(
                    core::mem::size_of::<Control>()
                        + c.heaps_total as usize * core::mem::size_of::<PageHeap>(),
                )
                .cast()
        }
    }

    fn owned_at(&self, i: u32) -> u32 {
        // SAFETY: i < owned_count <= heaps_total.
        unsafe { *self.owned_list().add(i as usize) }
    }

    fn heap_addr(&self, index: u32) -> u64 {
        self.base + index as u64 * HEAP_SIZE
    }

    pub fn control(&self) -> *mut Control {
        self.control
    }

    pub fn set_source(&mut self, source: HeapSource) {
        self.source = source;
    }

    /// Every owned heap, as (first heap, count) runs in list order.
    pub fn for_each_owned(&self, mut f: impl FnMut(u64, u64)) {
        let c = self.ctl();
        for i in 0..c.owned_count {
            f(self.heap_addr(self.owned_at(i)), HEAP_SIZE);
        }
        f(
            self.heap_addr(c.control_first),
            c.control_count as u64 * HEAP_SIZE,
        );
    }

    fn add_owned(&mut self, index: u32) {
        let c = self.ctl();
        let n = c.owned_count;
        // SAFETY: n < heaps_total since each heap is listed at most once.
        unsafe { *self.owned_list().add(n as usize) = index };
        c.owned_count = n + 1;
        let h = self.heap(index);
        h.owned = 1;
        h.used = 0;
        h.bits = [0; WORDS];
        self.ctl().empty_count += 1;
    }

    fn remove_owned(&mut self, index: u32) {
        let c = self.ctl();
        let list = self.owned_list();
        for i in 0..c.owned_count {
            // SAFETY: i < owned_count.
            unsafe {
                if *list.add(i as usize) == index {
                    *list.add(i as usize) = *list.add(c.owned_count as usize - 1);
                    c.owned_count -= 1;
                    break;
                }
            }
        }
        self.heap(index).owned = 0;
    }

    /// Gets `count` contiguous heaps.
    fn acquire(&mut self, count: u32) -> Option<u32> {
        let first = match self.source {
            HeapSource::Agent => crate::state::agent_alloc_heaps(count)?,
            HeapSource::Local => self.find_local_run(count)?,
        };
        for i in first..first + count {
            self.add_owned(i);
        }
        Some(first)
    }

    fn find_local_run(&self, count: u32) -> Option<u32> {
        let c = self.ctl();
        let mut run = 0;
        for i in 0..c.heaps_total {
            let taken = self.heap(i).owned != 0
                || (i >= c.control_first && i < c.control_first + c.control_count);
            run = if taken { 0 } else { run + 1 };
            if run == count {
                return Some(i + 1 - count);
            }
        }
        None
    }

    fn release(&mut self, index: u32) {
        self.remove_owned(index);
        self.ctl().empty_count -= 1;
        if self.source == HeapSource::Agent {
            crate::state::agent_free_heaps(index, 1);
        } else {
            let _ = sys::drop_pages(self.heap_addr(index), HEAP_SIZE);
        }
    }

    fn mark(&mut self, index: u32, first: u32, n: u32) {
        let h = self.heap(index);
        if h.used == 0 {
            self.ctl().empty_count -= 1;
        }
        let h = self.heap(index);
        for p in first..first + n {
            h.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        h.used += n;
    }

    /// Clears pages; returns how many were set.
    fn unmark(&mut self, index: u32, first: u32, n: u32) -> u32 {
        let h = self.heap(index);
        let mut cleared = 0;
        for p in first..first + n {
            let w = &mut h.bits[(p / 64) as usize];
            let bit = 1u64 << (p % 64);
            if *w & bit != 0 {
                *w &= !bit;
                cleared += 1;
            }
        }
        h.used -= cleared;
        if cleared > 0 && h.used == 0 {
            self.ctl().empty_count += 1;
        }
        cleared
    }

    fn find_run(&self, index: u32, n: u32) -> Option<u32> {
        let h = self.heap(index);
        if PAGES_PER_HEAP as u32 - h.used < n {
            return None;
        }
        let mut run = 0;
        let mut w = 0;
        while w < WORDS {
            let word = h.bits[w];
            if word == u64::MAX {
                run = 0;
                w += 1;
                continue;
            }
            if word == 0 {
                run += 64;
                if run >= n {
                    return Some((w as u32 + 1) * 64 - run);
                }
                w += 1;
                continue;
            }
            for b in 0..64 {
                if word & (1 << b) == 0 {
                    run += 1;
                    if run == n {
                        return Some(w as u32 * 64 + b + 1 - n);
                    }
                } else {
                    run = 0;
                }
            }
            w += 1;
        }
        None
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed, page-aligned
    /// window memory.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if self.control.is_null() || len == 0 {
            return None;
        }
        let npages = len.div_ceil(PAGE_SIZE);
        if npages <= PAGES_PER_HEAP / 2 {
            let n = npages as u32;
            let c = self.ctl();
            let hint = c.hint;
            if self.heap(hint).owned != 0 {
                if let Some(p) = self.find_run(hint, n) {
                    self.mark(hint, p, n);
                    return Some(self.heap_addr(hint) + p as u64 * PAGE_SIZE);
                }
            }
            for i in 0..self.ctl().owned_count {
                let index = self.owned_at(i);
                if let Some(p) = self.find_run(index, n) {
                    self.mark(index, p, n);
                    self.ctl().hint = index;
                    return Some(self.heap_addr(index) + p as u64 * PAGE_SIZE);
                }
            }
            let index = self.acquire(1)?;
            self.mark(index, 0, n);
            self.ctl().hint = index;
            return Some(self.heap_addr(index));
        }
        let count = npages.div_ceil(PAGES_PER_HEAP) as u32;
        let first = self.acquire(count)?;
        let mut left = npages;
        for index in first..first + count {
            let n = left.min(PAGES_PER_HEAP);
            self.mark(index, 0, n as u32);
            left -= n;
        }
        Some(self.heap_addr(first))
    }

    /// Whether every page of `[addr, addr+len)` is allocated.
    pub fn owns(&self, addr: u64, len: u64) -> bool {
        if self.control.is_null() || addr < self.base || len == 0 {
            return false;
        }
        let c = self.ctl();
        let end = addr + len;
        let mut a = addr & !(PAGE_SIZE - 1);
        while a < end {
            let index = ((a - self.base) / HEAP_SIZE) as u32;
            if index >= c.heaps_total {
                return false;
            }
            if index >= c.control_first && index < c.control_first + c.control_count {
                return false;
            }
            let h = self.heap(index);
            let p = ((a - self.base) % HEAP_SIZE / PAGE_SIZE) as u32;
            if h.owned == 0 || h.bits[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                return false;
            }
            a += PAGE_SIZE;
        }
        true
    }

    /// Frees the allocated pages of `[addr, addr+len)` and drops their
    /// content; heaps left empty go back to the agent (beyond a small spare).
    pub fn free(&mut self, addr: u64, len: u64) {
        if self.control.is_null() || len == 0 || addr < self.base {
            return;
        }
        let start = addr & !(PAGE_SIZE - 1);
        let end = (addr + len).next_multiple_of(PAGE_SIZE);
        let _ = sys::drop_pages(start, end - start);
        let mut a = start;
        while a < end {
            let index = ((a - self.base) / HEAP_SIZE) as u32;
            let heap_end = self.heap_addr(index) + HEAP_SIZE;
            let upto = end.min(heap_end);
            let c = self.ctl();
            let is_control = index >= c.control_first && index < c.control_first + c.control_count;
            if index < c.heaps_total && !is_control && self.heap(index).owned != 0 {
                let first = ((a - self.heap_addr(index)) / PAGE_SIZE) as u32;
                let n = ((upto - a) / PAGE_SIZE) as u32;
                self.unmark(index, first, n);
                if self.heap(index).used == 0 && self.ctl().empty_count > SPARE_EMPTY_HEAPS {
                    self.release(index);
                }
            }
            a = upto;
        }
    }
}

/// Sets up the control area in heaps `[first, first+count)` just received
/// from the agent; returns the pointer to the Control header.
///
/// # Safety
/// The heaps must be mapped, writable and zero (fresh from the agent).
pub unsafe fn init(base: u64, heaps_total: u32, first: u32, count: u32) -> *mut Control {
    let control = (base + first as u64 * HEAP_SIZE) as *mut Control;
    // SAFETY: guaranteed by the caller; the area is zeroed, so the tables
    // start empty, and we initialise the header in place.
    unsafe {
        (*control).magic = CONTROL_MAGIC;
        (*control).heaps_total = heaps_total;
        (*control).control_first = first;
        (*control).control_count = count;
        (*control).owned_count = 0;
        (*control).empty_count = 0;
        (*control).hint = first;
        core::ptr::write(
            core::ptr::addr_of_mut!((*control).dl),
            crate::malloc::new_dl(),
        );
    }
    let mut pages = PAGES.lock();
    pages.control = control;
    pages.base = base;
    control
}
