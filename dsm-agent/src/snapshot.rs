//! Page sets and the snapshot buffer of a checkpoint.
//!
//! [`Runs`] is a set of page numbers kept as sorted, disjoint ranges: what
//! a dirty scan returns, what the memfd holds (SEEK_DATA), what an index
//! has. [`Snapshot`] holds copies of pages taken from the node memfd while
//! a checkpoint runs: one growing buffer of 4096-byte slots and a map page
//! -> slot, so a page copied again (dirtied after pre-copy) overwrites its
//! earlier copy in place. Copies use pread on the memfd, not a mapping:
//! reading a hole through a shared mapping would allocate it, and holes are
//! how removed pages are recognized.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use mome_protocol::layout::PAGE_SIZE;
use nix::errno::Errno;

const PAGE: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read pages {first}+{count} of the node memory file: {errno}")]
    Read {
        first: u64,
        count: u64,
        errno: Errno,
    },
    #[error("cannot find the data of the node memory file at offset {offset:#x}: {errno}")]
    Seek { offset: u64, errno: Errno },
    #[error("the snapshot buffer is full ({0} pages)")]
    Full(u64),
}

/// A set of pages as sorted, disjoint, non-adjacent ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs(Vec<Range<u64>>);

impl Runs {
    pub fn new() -> Runs {
        Runs(Vec::new())
    }

    /// From ranges in any order, overlapping or not.
    pub fn from_ranges(mut ranges: Vec<Range<u64>>) -> Runs {
        ranges.retain(|r| r.start < r.end);
        ranges.sort_unstable_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Runs(out)
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }

    pub fn pages(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|r| r.clone())
    }

    pub fn union(&self, other: &Runs) -> Runs {
        Runs::from_ranges(self.0.iter().chain(&other.0).cloned().collect())
    }

    /// Pages of `self` that are not in `other`.
    pub fn subtract(&self, other: &Runs) -> Runs {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.0 {
            let mut start = r.start;
            while j < other.0.len() && other.0[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while start < r.end {
                match other.0.get(k) {
                    Some(o) if o.start < r.end => {
                        if o.start > start {
                            out.push(start..o.start);
                        }
                        start = start.max(o.end);
                        k += 1;
                    }
                    _ => {
                        out.push(start..r.end);
                        break;
                    }
                }
            }
        }
        Runs(out)
    }

    /// Pages in both.
    pub fn intersect(&self, other: &Runs) -> Runs {
        self.subtract(&self.subtract(other))
    }

    #[cfg(test)]
    pub fn contains(&self, page: u64) -> bool {
        let i = self.0.partition_point(|r| r.end <= page);
        self.0.get(i).is_some_and(|r| r.start <= page)
    }
}

/// Pages of the memfd `fd` (of `size` bytes) that hold data, from
/// SEEK_DATA/SEEK_HOLE; partial pages count as whole pages.
pub fn data_runs(fd: BorrowedFd<'_>, size: u64) -> Result<Runs, SnapshotError> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let data = match seek(fd, offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `offset`.
            Err(SnapshotError::Seek {
                errno: Errno::ENXIO,
                ..
            }) => break,
            Err(e) => return Err(e),
        };
        let hole = seek(fd, data, libc::SEEK_HOLE)?.min(size);
        out.push(data / PAGE_SIZE..hole.div_ceil(PAGE_SIZE));
        offset = hole;
    }
    Ok(Runs::from_ranges(out))
}

/// Runs closer than this are looked at in one SEEK_DATA/SEEK_HOLE walk.
const SEEK_GAP: u64 = 64;
/// Below this many pages left in a span, data is found page by page.
const SEEK_HOLE_MIN: u64 = 4096;

/// The pages of `set` that hold data in the memfd `fd`. Costs in proportion
/// to the pages of `set` (the walk stays inside it, mostly), not to the file.
pub fn data_within(fd: BorrowedFd<'_>, set: &Runs) -> Result<Runs, SnapshotError> {
    let mut spans: Vec<Range<u64>> = Vec::new();
    for r in set.ranges() {
        match spans.last_mut() {
            Some(s) if r.start - s.end < SEEK_GAP => s.end = r.end,
            _ => spans.push(r.clone()),
        }
    }
    let mut out = Vec::new();
    for span in spans {
        let (mut offset, end) = (span.start * PAGE_SIZE, span.end * PAGE_SIZE);
        while offset < end {
            let data = match seek(fd, offset, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(SnapshotError::Seek {
                    errno: Errno::ENXIO,
                    ..
                }) => break,
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            // SEEK_HOLE walks the data up to the next hole, which may lie
            // far past the span: only worth it for a long span; in a short
            // one, one SEEK_DATA per data page costs less.
            if end - data > SEEK_HOLE_MIN * PAGE_SIZE {
                let hole = seek(fd, data, libc::SEEK_HOLE)?.min(end);
                out.push(data / PAGE_SIZE..hole.div_ceil(PAGE_SIZE));
                offset = hole;
            } else {
                out.push(data / PAGE_SIZE..data / PAGE_SIZE + 1);
                offset = (data / PAGE_SIZE + 1) * PAGE_SIZE;
            }
        }
    }
    Ok(Runs::from_ranges(out).intersect(set))
}

fn seek(fd: BorrowedFd<'_>, offset: u64, whence: libc::c_int) -> Result<u64, SnapshotError> {
    // SAFETY: lseek on a descriptor we borrow; it changes only the file
    // position, which no one else uses (every read of the memfd is a pread).
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        return Err(SnapshotError::Seek {
            offset,
            errno: Errno::last(),
        });
    }
    Ok(r as u64)
}

/// Pages per chunk of a snapshot (64 MiB).
const CHUNK_PAGES: usize = 16384;

/// Copies of pages, by page number.
///
/// Stored in fixed chunks that are never moved: a growing Vec would copy
/// the whole buffer when it reallocates (milliseconds per GiB, possibly
/// inside the pause), and chunks from `vec![0; n]` come zeroed by the
/// kernel (calloc of fresh pages) instead of by a memset.
#[derive(Debug, Default)]
pub struct Snapshot {
    chunks: Vec<Box<[u8]>>,
    slots: HashMap<u64, u32>,
}

impl Snapshot {
    pub fn new() -> Snapshot {
        Snapshot::default()
    }

    /// Pages held.
    pub fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn get(&self, page: u64) -> Option<&[u8]> {
        let slot = *self.slots.get(&page)? as usize;
        let (chunk, at) = (slot / CHUNK_PAGES, (slot % CHUNK_PAGES) * PAGE);
        Some(&self.chunks[chunk][at..at + PAGE])
    }

    /// The pages held, as runs.
    pub fn runs(&self) -> Runs {
        let mut pages: Vec<u64> = self.slots.keys().copied().collect();
        pages.sort_unstable();
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in pages {
            match out.last_mut() {
                Some(r) if r.end == p => r.end += 1,
                _ => out.push(p..p + 1),
            }
        }
        Runs(out)
    }

    /// Copies `pages` of the memfd `fd` (page `p` at offset `p * 4096`)
    /// into the snapshot, replacing earlier copies. Runs of pages whose
    /// slots are consecutive are read with one pread.
    pub fn copy_from(&mut self, fd: BorrowedFd<'_>, pages: &Runs) -> Result<(), SnapshotError> {
        let mut run: Option<(u64, u32, u64)> = None; // (first page, first slot, count)
        for page in pages.iter() {
            let slot = self.slot_for(page)?;
            match &mut run {
                Some((first, first_slot, count))
                    if *first + *count == page
                        && u64::from(*first_slot) + *count == u64::from(slot)
                        && !(slot as usize).is_multiple_of(CHUNK_PAGES) =>
                {
                    *count += 1
                }
                _ => {
                    if let Some((first, first_slot, count)) = run.take() {
                        self.read(fd, first, first_slot, count)?;
                    }
                    run = Some((page, slot, 1));
                }
            }
        }
        if let Some((first, first_slot, count)) = run {
            self.read(fd, first, first_slot, count)?;
        }
        Ok(())
    }

    fn slot_for(&mut self, page: u64) -> Result<u32, SnapshotError> {
        if let Some(&s) = self.slots.get(&page) {
            return Ok(s);
        }
        let slot = u32::try_from(self.slots.len()).map_err(|_| SnapshotError::Full(self.len()))?;
        if slot as usize / CHUNK_PAGES == self.chunks.len() {
            self.chunks
                .push(vec![0u8; CHUNK_PAGES * PAGE].into_boxed_slice());
        }
        self.slots.insert(page, slot);
        Ok(slot)
    }

    fn read(
        &mut self,
        fd: BorrowedFd<'_>,
        first: u64,
        slot: u32,
        count: u64,
    ) -> Result<(), SnapshotError> {
        // Runs never cross a chunk boundary (see copy_from).
        let (chunk, at) = (
            slot as usize / CHUNK_PAGES,
            (slot as usize % CHUNK_PAGES) * PAGE,
        );
        let buf = &mut self.chunks[chunk][at..at + count as usize * PAGE];
        let mut done = 0usize;
        while done < buf.len() {
            let offset = (first * PAGE_SIZE) as i64 + done as i64;
            match nix::sys::uio::pread(fd, &mut buf[done..], offset) {
                // Past the end of the file (cannot happen inside the
                // window): the rest reads as zeros.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(SnapshotError::Read {
                        first,
                        count,
                        errno,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    fn runs(r: &[Range<u64>]) -> Runs {
        Runs::from_ranges(r.to_vec())
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn run_set_operations() {
        let a = runs(&[5..8, 0..2, 1..3, 8..9]);
        assert_eq!(a.ranges(), &[0..3, 5..9]);
        assert_eq!(a.pages(), 7);
        let b = runs(&[2..6, 8..20]);
        assert_eq!(a.subtract(&b).ranges(), &[0..2, 6..8]);
        assert_eq!(a.intersect(&b).ranges(), &[2..3, 5..6, 8..9]);
        assert_eq!(a.union(&b).ranges(), &[0..20]);
        assert_eq!(b.subtract(&a).ranges(), &[3..5, 9..20]);
        assert_eq!(a.subtract(&Runs::new()), a);
        assert!(a.contains(0) && a.contains(8) && !a.contains(3) && !a.contains(9));
        assert_eq!(
            runs(&[0..10])
                .subtract(&runs(&[1..2, 4..5, 9..12]))
                .ranges(),
            &[0..1, 2..4, 5..9]
        );
    }

    fn memfd(pages: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, (pages * PAGE_SIZE) as i64).unwrap();
        fd
    }

    #[test]
    fn copies_overwrite_and_data_runs_find_holes() {
        let fd = memfd(64);
        for p in [1u64, 2, 3, 10, 40] {
            nix::sys::uio::pwrite(&fd, &[p as u8; PAGE], (p * PAGE_SIZE) as i64).unwrap();
        }
        assert_eq!(
            data_runs(fd.as_fd(), 64 * PAGE_SIZE).unwrap().ranges(),
            &[1..4, 10..11, 40..41]
        );
        let mut s = Snapshot::new();
        s.copy_from(fd.as_fd(), &runs(&[1..4, 10..11])).unwrap();
        assert_eq!(s.len(), 4);
        nix::sys::uio::pwrite(&fd, &[99u8; PAGE], 2 * PAGE_SIZE as i64).unwrap();
        s.copy_from(fd.as_fd(), &runs(&[2..3, 40..41, 50..51]))
            .unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.get(1).unwrap()[0], 1);
        assert_eq!(s.get(2).unwrap()[4095], 99);
        assert_eq!(s.get(10).unwrap()[7], 10);
        assert_eq!(s.get(40).unwrap()[0], 40);
        assert!(s.get(50).unwrap().iter().all(|&b| b == 0));
        assert_eq!(s.get(4), None);
        assert_eq!(s.runs().ranges(), &[1..4, 10..11, 40..41, 50..51]);
        assert_eq!(
            data_within(fd.as_fd(), &runs(&[0..2, 3..5, 9..12, 41..60]))
                .unwrap()
                .ranges(),
            &[1..2, 3..4, 10..11]
        );
        // Reading a hole did not allocate it.
        assert_eq!(
            data_runs(fd.as_fd(), 64 * PAGE_SIZE).unwrap().ranges(),
            &[1..4, 10..11, 40..41]
        );
    }
}
