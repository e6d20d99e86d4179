//! What release and weak consistency need besides the page protocol
//! itself (`pages.rs`): the node's table of consistency models by page
//! range (`MomeConsistency`), and the XOR deltas of multiple writers:
//! computed from a page and its twin, compressed for the wire, and merged
//! into the owner's page byte by byte.
//!
//! Why XOR and byte-wise merging: two nodes writing disjoint bytes of a
//! page each send `page ^ twin`, which is zero outside the bytes they
//! changed; XOR-ing it into the owner's page changes exactly those bytes,
//! whatever the owner and the other writers changed meanwhile. The owner's
//! own ranks may be writing other bytes of the page while a delta is merged,
//! so the merge writes only the bytes the delta changes, one at a time: a
//! wider read-modify-write could undo a neighbour's concurrent store.

use std::collections::BTreeMap;
use std::ops::Range;

use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::peer::{Model, MAX_DELTA};

const PAGE: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("page delta of {0} bytes cannot be decompressed: {1}")]
    Corrupt(usize, String),
    #[error("page delta decompresses to {0} bytes instead of {PAGE}")]
    WrongSize(usize),
}

/// Consistency model of each page of the shared zone on this node: ranges
/// set by `MomeConsistency`, the default elsewhere.
#[derive(Debug, Default, Clone)]
pub struct ModelMap {
    default: Model,
    /// First page -> (end page, model); ranges do not overlap and none has
    /// the default model.
    ranges: BTreeMap<u64, (u64, Model)>,
}

impl ModelMap {
    pub fn new(default: Model) -> ModelMap {
        ModelMap {
            default,
            ranges: BTreeMap::new(),
        }
    }

    pub fn of(&self, page: u64) -> Model {
        match self.ranges.range(..=page).next_back() {
            Some((_, &(end, model))) if page < end => model,
            _ => self.default,
        }
    }

    /// Pages `range` use `model` from now on; returns the parts of the range
    /// that were under a relaxed model before and are strong now (their
    /// relaxed copies must go).
    pub fn set(&mut self, range: Range<u64>, model: Model) -> Vec<Range<u64>> {
        if range.is_empty() {
            return Vec::new();
        }
        let mut hardened = Vec::new();
        let mut cursor = range.start;
        // Pieces of existing ranges that overlap: cut out, remembering what
        // becomes strong.
        let overlapping: Vec<(u64, u64, Model)> = self
            .ranges
            .range(..range.end)
            .filter(|(_, &(end, _))| end > range.start)
            .map(|(&s, &(e, m))| (s, e, m))
            .collect();
        for (s, e, m) in overlapping {
            self.ranges.remove(&s);
            if s < range.start {
                self.ranges.insert(s, (range.start, m));
            }
            if e > range.end {
                self.ranges.insert(range.end, (e, m));
            }
            let (cs, ce) = (s.max(range.start), e.min(range.end));
            if self.default.relaxed() && cursor < cs && !model.relaxed() {
                hardened.push(cursor..cs);
            }
            if m.relaxed() && !model.relaxed() {
                hardened.push(cs..ce);
            }
            cursor = ce;
        }
        if self.default.relaxed() && cursor < range.end && !model.relaxed() {
            hardened.push(cursor..range.end);
        }
        if model != self.default {
            self.ranges.insert(range.start, (range.end, model));
        }
        hardened
    }

    /// The ranges with a model other than the default, for a checkpoint.
    pub fn ranges(&self) -> impl Iterator<Item = (Range<u64>, Model)> + '_ {
        self.ranges.iter().map(|(&s, &(e, m))| (s..e, m))
    }
}

/// `page ^ twin` compressed (lz4, size first); `None` when nothing changed.
pub fn delta(page: &[u8], twin: &[u8]) -> Option<Vec<u8>> {
    debug_assert!(page.len() == PAGE && twin.len() == PAGE);
    let mut x = [0u8; PAGE];
    let mut any = 0u8;
    for ((o, a), b) in x.iter_mut().zip(page).zip(twin) {
        *o = a ^ b;
        any |= *o;
    }
    if any == 0 {
        return None;
    }
    let packed = lz4_flex::compress_prepend_size(&x);
    debug_assert!(packed.len() <= MAX_DELTA);
    Some(packed)
}

/// A compressed delta back to its page of XOR bytes, refusing anything
/// that is not exactly one page.
pub fn unpack(delta: &[u8]) -> Result<Box<[u8; PAGE]>, DeltaError> {
    let (size, _) = lz4_flex::block::uncompressed_size(delta)
        .map_err(|e| DeltaError::Corrupt(delta.len(), e.to_string()))?;
    if size != PAGE {
        return Err(DeltaError::WrongSize(size));
    }
    let mut out = Box::new([0u8; PAGE]);
    let n = lz4_flex::decompress_into(&delta[4..], &mut out[..])
        .map_err(|e| DeltaError::Corrupt(delta.len(), e.to_string()))?;
    if n != PAGE {
        return Err(DeltaError::WrongSize(n));
    }
    Ok(out)
}

/// XORs `x` into `page`, touching only the bytes `x` changes.
///
/// # Safety
/// `page` must point to `PAGE_SIZE` bytes mapped readable and writable for
/// the duration of the call. Other processes may write the page meanwhile,
/// but not the bytes `x` changes (the writers of a page write disjoint
/// bytes between synchronisations).
pub unsafe fn merge(page: *mut u8, x: &[u8; PAGE]) {
    for (w, chunk) in x.chunks_exact(8).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        for (i, &b) in chunk.iter().enumerate() {
            if b != 0 {
                // SAFETY: inside the page (guaranteed by the caller); a
                // volatile byte access, so the compiler cannot widen it.
                unsafe {
                    let p = page.add(w * 8 + i);
                    p.write_volatile(p.read_volatile() ^ b);
                }
            }
        }
    }
}

/// `data ^= x` on a page held in memory (no concurrent writer).
pub fn merge_into(data: &mut [u8], x: &[u8; PAGE]) {
    for (d, b) in data.iter_mut().zip(x.iter()) {
        *d ^= b;
    }
}

/// The XOR of a page and its twin, uncompressed (local merges).
pub fn xor(page: &[u8], twin: &[u8]) -> Box<[u8; PAGE]> {
    let mut x = Box::new([0u8; PAGE]);
    for ((o, a), b) in x.iter_mut().zip(page).zip(twin) {
        *o = a ^ b;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ranges_split_and_report_what_becomes_strong() {
        let mut m = ModelMap::new(Model::Strong);
        assert_eq!(m.set(10..20, Model::Release), Vec::<Range<u64>>::new());
        assert_eq!(m.of(9), Model::Strong);
        assert_eq!(m.of(10), Model::Release);
        assert_eq!(m.of(19), Model::Release);
        assert_eq!(m.of(20), Model::Strong);
        assert_eq!(m.set(15..30, Model::Weak), Vec::<Range<u64>>::new());
        assert_eq!(m.of(14), Model::Release);
        assert_eq!(m.of(15), Model::Weak);
        assert_eq!(m.of(29), Model::Weak);
        assert_eq!(m.set(12..25, Model::Strong), vec![12..15, 15..25]);
        assert_eq!(m.of(11), Model::Release);
        assert_eq!(m.of(12), Model::Strong);
        assert_eq!(m.of(25), Model::Weak);
        let all: Vec<_> = m.ranges().collect();
        assert_eq!(all, vec![(10..12, Model::Release), (25..30, Model::Weak)]);

        let mut r = ModelMap::new(Model::Release);
        assert_eq!(r.set(5..8, Model::Strong), vec![5..8]);
        assert_eq!(r.of(6), Model::Strong);
        assert_eq!(r.set(0..10, Model::Strong), vec![0..5, 8..10]);
        assert_eq!(r.set(0..10, Model::Weak), Vec::<Range<u64>>::new());
        assert_eq!(r.of(7), Model::Weak);
    }

    #[test]
    fn deltas_of_disjoint_writers_merge_to_both() {
        let base: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        let mut a = base.clone();
        let mut b = base.clone();
        for i in (0..PAGE).step_by(8) {
            a[i] = 0xAA; // writer A: every 8th byte
            b[i + 1] = 0xBB; // writer B: the byte after
        }
        let da = unpack(&delta(&a, &base).unwrap()).unwrap();
        let db = unpack(&delta(&b, &base).unwrap()).unwrap();
        let mut owner = base.clone();
        // SAFETY: `owner` is a page of our own.
        unsafe { merge(owner.as_mut_ptr(), &da) };
        merge_into(&mut owner, &db);
        for i in 0..PAGE {
            let want = if i % 8 == 0 {
                0xAA
            } else if i % 8 == 1 {
                0xBB
            } else {
                base[i]
            };
            assert_eq!(owner[i], want, "byte {i}");
        }
        assert!(delta(&base, &base).is_none());
    }

    #[test]
    fn bad_deltas_are_refused() {
        assert!(unpack(&[1, 2]).is_err());
        let small = lz4_flex::compress_prepend_size(&[1u8; 100]);
        assert_eq!(unpack(&small).unwrap_err(), DeltaError::WrongSize(100));
        let mut page = lz4_flex::compress_prepend_size(&[3u8; PAGE]);
        let n = page.len();
        page.truncate(n - 3);
        assert!(unpack(&page).is_err());
        // A sparse delta is small on the wire.
        let mut x = vec![0u8; PAGE];
        x[100] = 1;
        assert!(delta(&x, &[0u8; PAGE]).unwrap().len() < 64);
    }
}
