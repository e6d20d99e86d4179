//! The DSM window: one virtual range, identical in every rank of a job, mapped
//! `MAP_SHARED` onto the node's memfd at file offset `addr - base`.
//!
//! The window is split in two zones:
//! - the private zone `[base, base + private_size)`: 8 MiB heaps, each owned by
//!   one rank (allocator heaps and anonymous private mappings). Registered
//!   with userfaultfd in async write-protect mode, for dirty tracking only.
//! - the shared zone `[base + private_size, base + size)`: named shared
//!   segments, each in a slot of `segment_reserve` bytes. Registered with
//!   userfaultfd in MISSING mode and served by the agent.

use serde::{Deserialize, Serialize};

/// Size of a heap, the unit of ownership of the window (as in MomeMalloc).
pub const HEAP_SIZE: u64 = 8 << 20;
/// Page size the window is managed in.
pub const PAGE_SIZE: u64 = 4096;
/// Pages in one heap.
pub const PAGES_PER_HEAP: u64 = HEAP_SIZE / PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowLayout {
    /// First address of the window.
    pub base: u64,
    /// Total size in bytes.
    pub size: u64,
    /// Bytes of the private zone (the first half of the window).
    pub private_size: u64,
    /// Address space reserved for each shared segment: its maximum size.
    pub segment_reserve: u64,
}

/// Which zone of the window a userfaultfd or a fault belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Zone {
    Private,
    Shared,
}

impl WindowLayout {
    pub fn new(base: u64, size: u64, segment_reserve: u64) -> Self {
        WindowLayout {
            base,
            size,
            private_size: size / 2,
            segment_reserve,
        }
    }

    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    pub fn shared_base(&self) -> u64 {
        self.base + self.private_size
    }

    pub fn shared_size(&self) -> u64 {
        self.size - self.private_size
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }

    pub fn contains_range(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && len <= self.size && addr - self.base <= self.size - len
    }

    pub fn zone_of(&self, addr: u64) -> Option<Zone> {
        if !self.contains(addr) {
            None
        } else if addr < self.shared_base() {
            Some(Zone::Private)
        } else {
            Some(Zone::Shared)
        }
    }

    /// Number of heaps in the private zone.
    pub fn private_heaps(&self) -> u32 {
        (self.private_size / HEAP_SIZE) as u32
    }

    /// Address of private heap `index`.
    pub fn heap_addr(&self, index: u32) -> u64 {
        self.base + index as u64 * HEAP_SIZE
    }

    /// Heap number of an address of the private zone (`(addr - base) >> 23`).
    pub fn heap_index(&self, addr: u64) -> u32 {
        ((addr - self.base) / HEAP_SIZE) as u32
    }

    /// Number of shared segment slots.
    pub fn segment_slots(&self) -> u32 {
        (self.shared_size() / self.segment_reserve) as u32
    }

    /// Address of shared segment slot `slot`.
    pub fn segment_addr(&self, slot: u32) -> u64 {
        self.shared_base() + slot as u64 * self.segment_reserve
    }

    /// Offset in the node's memfd of a window address.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.base
    }

    /// Checks the invariants the rest of mome relies on.
    pub fn validate(&self) -> Result<(), String> {
        if !self.base.is_multiple_of(HEAP_SIZE) {
            return Err(format!("base {:#x} is not a multiple of 8 MiB", self.base));
        }
        if self.size < 4 * HEAP_SIZE || !self.size.is_multiple_of(2 * HEAP_SIZE) {
            return Err(format!(
                "size {} is not a multiple of 16 MiB of at least 32 MiB",
                self.size
            ));
        }
        // Canonical user addresses on x86_64 end at 2^47.
        if self
            .base
            .checked_add(self.size)
            .is_none_or(|end| end > (1 << 47))
        {
            return Err(format!(
                "window {:#x}+{:#x} goes past the user address space (0x800000000000)",
                self.base, self.size
            ));
        }
        if self.base < (1 << 32) {
            return Err(format!(
                "base {:#x} is below 4 GiB, where executables and their heap live",
                self.base
            ));
        }
        if !self.segment_reserve.is_multiple_of(HEAP_SIZE) || self.segment_reserve == 0 {
            return Err(format!(
                "segment_reserve {} is not a positive multiple of 8 MiB",
                self.segment_reserve
            ));
        }
        if self.segment_reserve > self.shared_size() {
            return Err(format!(
                "segment_reserve {} is larger than the shared zone ({} bytes, half the window)",
                self.segment_reserve,
                self.shared_size()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_and_heaps() {
        let l = WindowLayout::new(0x2000_0000_0000, 1 << 40, 16 << 30);
        assert!(l.validate().is_ok());
        assert_eq!(l.zone_of(l.base), Some(Zone::Private));
        assert_eq!(l.zone_of(l.shared_base()), Some(Zone::Shared));
        assert_eq!(l.zone_of(l.end()), None);
        assert_eq!(l.heap_index(l.heap_addr(7) + 5), 7);
        assert_eq!(l.segment_slots(), 32);
        assert!(!l.contains_range(l.end() - 4096, 8192));
        assert!(l.contains_range(l.end() - 4096, 4096));
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(WindowLayout::new(0x2000_0000_0001, 1 << 40, 16 << 30)
            .validate()
            .is_err());
        assert!(WindowLayout::new(0x7fff_0000_0000, 1 << 40, 16 << 30)
            .validate()
            .is_err());
        assert!(WindowLayout::new(0x2000_0000_0000, 1 << 30, 16 << 30)
            .validate()
            .is_err());
    }
}
