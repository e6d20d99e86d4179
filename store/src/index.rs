//! Node indexes: the map from every non-zero page of a node's window, as of
//! one stamp, to the block that holds it, plus the agent's opaque tables and
//! the location of each rank's private image.
//!
//! The map is an interval map of extents (runs of pages that are contiguous
//! both in the window and in one block). A page that is in no extent is
//! zero. An index is complete: restoring a stamp needs only its index and
//! the pages files it references, never the indexes of older stamps.
//!
//! Index file (`node-K/SSSSSSSS.index`), little endian:
//! `"MOMEINDX"`, version u32, reserved u32 (0), body length u64, body
//! (postcard of [`NodeIndex`]), xxh3-64 of everything before it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::Stamp;
use serde::{Deserialize, Serialize};

use crate::block::BlockRef;
use crate::error::StoreError;
use crate::fsutil;

const INDEX_MAGIC: &[u8; 8] = b"MOMEINDX";
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 24;
const INDEX_TRAILER_LEN: usize = 8;

/// Pages `first_in_block..first_in_block + npages` of block `block` hold
/// the pages of the window starting at the extent's first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub npages: u32,
    /// Index into the index's blocks.
    pub block: u32,
    pub first_in_block: u32,
}

/// Where a rank's private image (written by the preload into the window)
/// is: `len` bytes at window address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankImage {
    pub rank: u32,
    pub addr: u64,
    pub len: u64,
}

/// A node index file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    pub node: u32,
    /// The index file, relative to the store root (`node-0/00000003.index`).
    pub index: PathBuf,
    /// Length of the index file in bytes.
    pub len: u64,
    /// xxh3-64 of the whole index file.
    pub xxh3: u64,
}

/// The pages of one node's window as of one stamp. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIndex {
    /// The stamp this index describes (0 for [`NodeIndex::empty`]).
    pub stamp: Stamp,
    pub node: u32,
    /// Live blocks, sorted by (file, offset); every block is used by at
    /// least one extent.
    blocks: Vec<BlockRef>,
    /// First page -> extent. Extents never overlap.
    extents: BTreeMap<u64, Extent>,
    /// The agent's tables (heaps, segments, locks, ...), opaque here.
    pub tables: Vec<u8>,
    /// Private images of the node's ranks.
    pub images: Vec<RankImage>,
}

impl NodeIndex {
    /// An index where every page is zero.
    pub fn empty(node: u32) -> Self {
        NodeIndex {
            stamp: 0,
            node,
            blocks: Vec::new(),
            extents: BTreeMap::new(),
            tables: Vec::new(),
            images: Vec::new(),
        }
    }

    /// The block holding `page` and the page's position in the block, or
    /// `None` when the page is zero.
    pub fn lookup(&self, page: u64) -> Option<(&BlockRef, u32)> {
        let (&first, ext) = self.extents.range(..=page).next_back()?;
        let off = page - first;
        if off >= u64::from(ext.npages) {
            return None;
        }
        // `off < npages <= 64`, so it fits in a u32.
        Some((
            &self.blocks[ext.block as usize],
            ext.first_in_block + off as u32,
        ))
    }

    /// Non-zero pages.
    pub fn page_count(&self) -> u64 {
        self.extents.values().map(|e| u64::from(e.npages)).sum()
    }

    /// Stored (compressed) bytes of the live blocks: what a full restore
    /// reads.
    pub fn data_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.clen)).sum()
    }

    /// The live blocks in (file, offset) order, the best order to read them.
    pub fn blocks(&self) -> impl ExactSizeIterator<Item = &BlockRef> + '_ {
        self.blocks.iter()
    }

    /// Stamps of the pages files (of this node) the index uses.
    pub fn referenced_files(&self) -> BTreeSet<Stamp> {
        self.blocks.iter().map(|b| b.file).collect()
    }

    /// Extents in page order, as (first page, pages, block, first page in
    /// the block).
    pub fn extents(&self) -> impl Iterator<Item = (u64, u32, &BlockRef, u32)> + '_ {
        self.extents.iter().map(|(&first, e)| {
            (
                first,
                e.npages,
                &self.blocks[e.block as usize],
                e.first_in_block,
            )
        })
    }

    /// Makes pages `range` zero, splitting or trimming the extents that
    /// overlap it. May leave unused blocks: call [`Self::compact`] after.
    pub(crate) fn clear(&mut self, range: Range<u64>) {
        let Range { start, end } = range;
        if start >= end {
            return;
        }
        loop {
            // The last extent starting before `end`; since extents are
            // disjoint and sorted, if it ends at or before `start` nothing
            // else overlaps.
            let Some((&first, &ext)) = self.extents.range(..end).next_back() else {
                return;
            };
            let ext_end = first + u64::from(ext.npages);
            if ext_end <= start {
                return;
            }
            self.extents.remove(&first);
            if ext_end > end {
                // Extents hold at most 64 pages: the casts cannot truncate.
                self.extents.insert(
                    end,
                    Extent {
                        npages: (ext_end - end) as u32,
                        block: ext.block,
                        first_in_block: ext.first_in_block + (end - first) as u32,
                    },
                );
            }
            if first < start {
                self.extents.insert(
                    first,
                    Extent {
                        npages: (start - first) as u32,
                        ..ext
                    },
                );
                return;
            }
        }
    }

    /// Maps pages `first..first + block.npages` to `block`, replacing what
    /// they mapped to. Call [`Self::compact`] after a series of inserts.
    pub(crate) fn insert(&mut self, first: u64, block: BlockRef) {
        self.clear(first..first + u64::from(block.npages));
        let idx = u32::try_from(self.blocks.len()).expect("more than 2^32 blocks in one index");
        self.blocks.push(block);
        self.extents.insert(
            first,
            Extent {
                npages: block.npages,
                block: idx,
                first_in_block: 0,
            },
        );
    }

    /// Drops blocks no extent uses and sorts the rest by (file, offset).
    pub(crate) fn compact(&mut self) {
        let mut used = vec![false; self.blocks.len()];
        for e in self.extents.values() {
            used[e.block as usize] = true;
        }
        let mut live: Vec<u32> = (0..self.blocks.len() as u32)
            .filter(|&i| used[i as usize])
            .collect();
        live.sort_by_key(|&i| {
            let b = &self.blocks[i as usize];
            (b.file, b.offset)
        });
        let mut new_of_old = vec![u32::MAX; self.blocks.len()];
        for (new, &old) in live.iter().enumerate() {
            new_of_old[old as usize] = new as u32;
        }
        self.blocks = live.iter().map(|&i| self.blocks[i as usize]).collect();
        for e in self.extents.values_mut() {
            e.block = new_of_old[e.block as usize];
        }
    }

    /// The index file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("postcard serialization to a Vec cannot fail");
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + body.len() + INDEX_TRAILER_LEN);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses and checks index file bytes; `path` is for error messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, StoreError> {
        let bad = |detail: String| StoreError::corrupt(path, detail);
        if bytes.len() < INDEX_HEADER_LEN + INDEX_TRAILER_LEN {
            return Err(bad(format!(
                "index file is {} bytes, shorter than header and trailer",
                bytes.len()
            )));
        }
        if &bytes[0..8] != INDEX_MAGIC {
            return Err(bad("not an index file (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != INDEX_VERSION {
            return Err(bad(format!(
                "index version {version}, this build reads {INDEX_VERSION}"
            )));
        }
        let body_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let expect = (INDEX_HEADER_LEN + INDEX_TRAILER_LEN) as u64 + body_len;
        if bytes.len() as u64 != expect {
            return Err(bad(format!(
                "index file is {} bytes, header says {expect} (truncated or extended)",
                bytes.len()
            )));
        }
        let (content, trailer) = bytes.split_at(bytes.len() - INDEX_TRAILER_LEN);
        let stored = u64::from_le_bytes(trailer.try_into().unwrap());
        let sum = xxhash_rust::xxh3::xxh3_64(content);
        if sum != stored {
            return Err(bad(format!(
                "index checksum mismatch: content has {sum:016x}, trailer says {stored:016x}"
            )));
        }
        let index: NodeIndex = postcard::from_bytes(&content[INDEX_HEADER_LEN..])
            .map_err(|e| bad(format!("index body does not decode: {e}")))?;
        index.check().map_err(bad)?;
        Ok(index)
    }

    /// Checks the invariants `lookup` and the readers rely on, so that a
    /// loaded index can never make them panic.
    fn check(&self) -> Result<(), String> {
        let mut prev_end = 0u64;
        let mut used = vec![false; self.blocks.len()];
        for (&first, e) in &self.extents {
            if first < prev_end {
                return Err(format!("extent at page {first} overlaps the previous one"));
            }
            let b = self.blocks.get(e.block as usize).ok_or_else(|| {
                format!(
                    "extent at page {first} uses block {} of {}",
                    e.block,
                    self.blocks.len()
                )
            })?;
            if e.npages == 0
                || u64::from(e.first_in_block) + u64::from(e.npages) > u64::from(b.npages)
            {
                return Err(format!(
                    "extent at page {first} ({} pages from page {}) does not fit its block of {} pages",
                    e.npages, e.first_in_block, b.npages
                ));
            }
            prev_end = first
                .checked_add(u64::from(e.npages))
                .ok_or_else(|| format!("extent at page {first} overflows"))?;
            used[e.block as usize] = true;
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.check_shape().map_err(|e| format!("block {i}: {e}"))?;
            if b.file > self.stamp {
                return Err(format!(
                    "block {i} is in file of stamp {} > {}",
                    b.file, self.stamp
                ));
            }
            if !used[i] {
                return Err(format!("block {i} is not used by any extent"));
            }
        }
        Ok(())
    }

    /// Writes the index to `path` atomically (`path.tmp`, fsync when
    /// `fsync`, rename, directory fsync when `fsync`). Returns the file's
    /// length and xxh3-64, for the manifest.
    pub fn save(&self, path: &Path, fsync: bool) -> Result<(u64, u64), StoreError> {
        let bytes = self.to_bytes();
        fsutil::write_atomic(path, &bytes, fsync)?;
        Ok((bytes.len() as u64, xxhash_rust::xxh3::xxh3_64(&bytes)))
    }

    /// Reads and checks an index file (magic, version, length, checksum,
    /// structure).
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let bytes = std::fs::read(path).map_err(StoreError::io("read", path))?;
        Self::from_bytes(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: enough randomness for property tests, no dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn block(file: Stamp, offset: u64, npages: u32) -> BlockRef {
        BlockRef {
            file,
            offset,
            clen: npages * 100,
            npages,
            xxh3: offset ^ file,
            raw: false,
        }
    }

    /// Checks `index` against a model giving, per page, the (file, offset)
    /// of its block and its position in it.
    fn check_model(index: &NodeIndex, model: &[Option<(Stamp, u64, u32)>]) {
        for (page, want) in model.iter().enumerate() {
            let got = index
                .lookup(page as u64)
                .map(|(b, i)| (b.file, b.offset, i));
            assert_eq!(got, *want, "page {page}");
        }
        assert_eq!(index.page_count(), model.iter().flatten().count() as u64);
        let mut prev_end = 0;
        for (first, n, _, _) in index.extents() {
            assert!(first >= prev_end && n > 0);
            prev_end = first + u64::from(n);
        }
    }

    #[test]
    fn overlay_random_vs_model() {
        const PAGES: u64 = 600;
        for seed in 0..40 {
            let mut rng = Rng(seed);
            let mut index = NodeIndex::empty(0);
            let mut model = vec![None; PAGES as usize];
            let mut offset = 32;
            for stamp in 1..=8 {
                index.stamp = stamp;
                for _ in 0..rng.below(12) {
                    let a = rng.below(PAGES);
                    let b = (a + rng.below(150)).min(PAGES);
                    index.clear(a..b);
                    model[a as usize..b as usize].fill(None);
                }
                for _ in 0..rng.below(20) {
                    let n = 1 + rng.below(64) as u32;
                    let first = rng.below(PAGES - u64::from(n));
                    index.insert(first, block(stamp, offset, n));
                    for i in 0..n {
                        model[(first + u64::from(i)) as usize] = Some((stamp, offset, i));
                    }
                    offset += u64::from(n) * 100;
                }
                index.compact();
                check_model(&index, &model);
                // Every block is used and they are in file order.
                let blocks: Vec<_> = index.blocks().copied().collect();
                assert!(blocks
                    .windows(2)
                    .all(|w| (w[0].file, w[0].offset) < (w[1].file, w[1].offset)));
                let used: BTreeSet<_> = model.iter().flatten().map(|m| (m.0, m.1)).collect();
                assert_eq!(used.len(), blocks.len());
                index.check().unwrap();
                // Round trip through the file format.
                let again = NodeIndex::from_bytes(Path::new("x"), &index.to_bytes()).unwrap();
                assert_eq!(again, index);
            }
        }
    }

    #[test]
    fn clear_edges() {
        let mut index = NodeIndex::empty(0);
        index.stamp = 1;
        index.insert(10, block(1, 32, 10));
        index.clear(0..10);
        index.clear(20..30);
        assert_eq!(index.page_count(), 10);
        index.clear(12..14);
        assert_eq!(index.lookup(11).unwrap().1, 1);
        assert!(index.lookup(12).is_none() && index.lookup(13).is_none());
        assert_eq!(index.lookup(14).unwrap().1, 4);
        index.clear(5..25);
        index.compact();
        assert_eq!(index.page_count(), 0);
        assert_eq!(index.blocks().len(), 0);
    }

    #[test]
    fn load_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001.index");
        let mut index = NodeIndex::empty(3);
        index.stamp = 1;
        index.insert(5, block(1, 32, 4));
        index.tables = vec![1, 2, 3];
        index.images = vec![RankImage {
            rank: 0,
            addr: 4096,
            len: 100,
        }];
        let (len, sum) = index.save(&path, true).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            (len, sum),
            (bytes.len() as u64, xxhash_rust::xxh3::xxh3_64(&bytes))
        );
        assert_eq!(NodeIndex::load(&path).unwrap(), index);
        assert!(!fsutil::tmp_path(&path).exists());

        let expect = |bytes: &[u8], what: &str| {
            let err = NodeIndex::from_bytes(&path, bytes).unwrap_err().to_string();
            assert!(
                err.contains(what) && err.contains("00000001.index"),
                "{err}"
            );
        };
        let mut b = bytes.clone();
        b[0] ^= 1;
        expect(&b, "bad magic");
        let mut b = bytes.clone();
        b[8] = 9;
        expect(&b, "version 9");
        expect(&bytes[..bytes.len() - 1], "truncated");
        expect(&bytes[..10], "shorter");
        for i in INDEX_HEADER_LEN..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            expect(&b, "checksum mismatch");
        }
    }
}
