//! The bootstrap arena: allocations made before the rank is connected to its
//! agent (the dynamic loader's and libc's own, before our constructor runs).
//!
//! A bump allocator over a static buffer; each block carries its size in a
//! 16-byte header so realloc and malloc_usable_size work on it. Blocks are
//! never reused: free() of a bootstrap block does nothing, which costs little
//! because the arena serves only start-up.

use core::sync::atomic::{AtomicUsize, Ordering};

const ARENA_SIZE: usize = 2 << 20;
const HEADER: usize = 16;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn base() -> usize {
    core::ptr::addr_of_mut!(ARENA) as usize
}

/// Whether `p` points into the arena.
pub fn contains(p: *const u8) -> bool {
    let a = p as usize;
    a >= base() && a < base() + ARENA_SIZE
}

/// `size` bytes aligned to `align` (a power of two), zeroed, or null when the
/// arena is exhausted.
pub fn alloc(size: usize, align: usize) -> *mut u8 {
    let align = align.max(16);
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base() + cur + HEADER).next_multiple_of(align);
        let end = start + size;
        if end > base() + ARENA_SIZE {
            return core::ptr::null_mut();
        }
        match NEXT.compare_exchange_weak(cur, end - base(), Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [start-HEADER, end) lies inside the arena and was
                // reserved by the compare-exchange for this call only.
                unsafe { *((start - 8) as *mut usize) = size };
                return start as *mut u8;
            }
            Err(now) => cur = now,
        }
    }
}

/// Size requested for a bootstrap block.
///
/// # Safety
/// `p` must be a block returned by `alloc`.
pub unsafe fn size_of(p: *const u8) -> usize {
    // SAFETY: `alloc` stored the size in the 8 bytes before the block.
    unsafe { *((p as usize - 8) as *const usize) }
}

/// Bytes of the arena used, for diagnostics.
pub fn used() -> usize {
    NEXT.load(Ordering::Relaxed)
}
