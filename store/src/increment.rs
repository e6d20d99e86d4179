//! Writing one node's increment for a stamp: the pages dirtied since the
//! base stamp go, grouped in blocks, into a new pages file, then the node
//! index of the stamp (the base's index overlaid with what changed) is saved
//! next to it.
//!
//! Order on disk, which is what makes a crash harmless: pages file written
//! (and fsync'ed), then the index written atomically (tmp, fsync, rename,
//! directory fsync). The stamp only exists once the launcher writes its
//! manifest, after every node reported its index.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::{files, Stamp};

use crate::block::{self, BlockRef, BLOCK_PAGES, PAGES_HEADER_LEN, PAGE_SIZE};
use crate::error::StoreError;
use crate::fsutil;
use crate::index::{IndexRef, NodeIndex, RankImage};

/// Size of the write buffer of a pages file: large writes, few syscalls.
const WRITE_BUFFER: usize = 8 << 20;

/// What [`write_increment`] needs besides the pages.
#[derive(Debug)]
pub struct IncrementInput<'a> {
    /// Store root.
    pub root: &'a Path,
    pub node: u32,
    /// The stamp being written; larger than the base's.
    pub stamp: Stamp,
    /// Index of the last committed stamp, `None` for a full checkpoint.
    pub base: Option<&'a NodeIndex>,
    /// Page ranges (half-open, page numbers) that became zero (holes)
    /// since the base. Applied before the pages: a page both removed and
    /// given in `pages` takes the given content.
    pub removed: &'a [Range<u64>],
    /// The agent's tables, stored as is in the index.
    pub tables: Vec<u8>,
    /// Where each local rank's private image is.
    pub images: Vec<RankImage>,
    /// fsync the pages file, the index and the directory.
    pub fsync: bool,
}

/// What [`write_increment`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementSummary {
    /// The saved index, to send to the launcher (`Durable`) for the
    /// manifest.
    pub index: IndexRef,
    /// Pages given to `write_increment` (zero pages included).
    pub pages: u64,
    /// Of those, pages that were all zero (not stored).
    pub zero_pages: u64,
    /// Length of the pages file (0 when no page needed storing, in which
    /// case no pages file is created).
    pub data_bytes_written: u64,
    /// Pages file plus index file.
    pub bytes_written: u64,
}

/// True when the page is all zero. Compares 64-byte chunks OR-ed together so
/// the compiler can vectorize, and stops at the first non-zero chunk (most
/// data pages stop in the first chunk).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|chunk| {
        chunk.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap())
        }) == 0
    })
}

/// The pages file being written, created on the first block.
///
/// Blocks are gathered in batches and compressed (and checksummed) on
/// several threads, then written in order: lz4 and xxh3 are the cost of a
/// checkpoint's background phase, and one core does ~0.4-2 GB/s of them.
struct PagesWriter {
    path: PathBuf,
    node: u32,
    stamp: Stamp,
    out: Option<BufWriter<File>>,
    offset: u64,
    /// Gathered blocks: first page, and the raw pages in `batch_data`.
    batch: Vec<(u64, std::ops::Range<usize>)>,
    batch_data: Vec<u8>,
    /// One reused output buffer per block of a batch.
    outputs: Vec<Vec<u8>>,
    fsync: bool,
    /// Offset up to which write-back was started.
    synced: u64,
}

/// Blocks compressed together: 32 blocks of up to 256 KiB.
const BATCH_BLOCKS: usize = 32;

/// Bytes written between two starts of write-back (with fsync).
const SYNC_STEP: u64 = 32 << 20;

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl PagesWriter {
    /// Queues one block of pages (`raw` is whole pages) to be stored at
    /// page `first`; full batches are stored at once.
    fn push(&mut self, index: &mut NodeIndex, raw: &[u8], first: u64) -> Result<(), StoreError> {
        let start = self.batch_data.len();
        self.batch_data.extend_from_slice(raw);
        self.batch.push((first, start..self.batch_data.len()));
        if self.batch.len() == BATCH_BLOCKS {
            self.store_batch(index)?;
        }
        Ok(())
    }

    /// Compresses the batch in parallel and appends it to the file.
    fn store_batch(&mut self, index: &mut NodeIndex) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.out.is_none() {
            let file = File::create(&self.path).map_err(StoreError::io("create", &self.path))?;
            let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
            out.write_all(&block::pages_header(self.node, self.stamp))
                .map_err(StoreError::io("write", &self.path))?;
            self.out = Some(out);
            self.offset = PAGES_HEADER_LEN;
        }
        let n = self.batch.len();
        if self.outputs.len() < n {
            self.outputs.resize_with(n, Vec::new);
        }
        let data = &self.batch_data;
        let batch = &self.batch;
        let mut results = vec![(false, 0u64); n];
        let per = n.div_ceil(workers());
        std::thread::scope(|scope| {
            for ((outs, res), blocks) in self.outputs[..n]
                .chunks_mut(per)
                .zip(results.chunks_mut(per))
                .zip(batch.chunks(per))
            {
                scope.spawn(move || {
                    for ((out, r), (_, range)) in outs.iter_mut().zip(res.iter_mut()).zip(blocks) {
                        let raw = &data[range.clone()];
                        *r = (block::compress(raw, out), xxhash_rust::xxh3::xxh3_64(raw));
                    }
                });
            }
        });
        let out = self.out.as_mut().expect("opened above");
        for (i, (first, range)) in batch.iter().enumerate() {
            let raw = &data[range.clone()];
            let (compressed, xxh3) = results[i];
            let stored = if compressed {
                &self.outputs[i][..]
            } else {
                raw
            };
            out.write_all(stored)
                .map_err(StoreError::io("write", &self.path))?;
            index.insert(
                *first,
                BlockRef {
                    file: self.stamp,
                    offset: self.offset,
                    // A block is at most 64 pages (256 KiB).
                    clen: stored.len() as u32,
                    npages: (raw.len() / PAGE_SIZE) as u32,
                    xxh3,
                    raw: !compressed,
                },
            );
            self.offset += stored.len() as u64;
        }
        self.batch.clear();
        self.batch_data.clear();
        if self.fsync && self.offset - self.synced >= SYNC_STEP {
            // Start writing back what is written so far while the next
            // batches are compressed: the final fsync then has little left.
            out.flush().map_err(StoreError::io("write", &self.path))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(out.get_ref());
            // SAFETY: sync_file_range on a descriptor we own; it only
            // starts write-back of the given range.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.synced as libc::off64_t,
                    (self.offset - self.synced) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.synced = self.offset;
        }
        Ok(())
    }

    /// Stores what is queued, flushes (and syncs) the file; returns its
    /// length.
    fn finish(mut self, index: &mut NodeIndex, fsync: bool) -> Result<u64, StoreError> {
        self.store_batch(index)?;
        let Some(out) = self.out else {
            return Ok(0);
        };
        let file = out
            .into_inner()
            .map_err(|e| StoreError::io("write", &self.path)(e.into_error()))?;
        if fsync {
            file.sync_all()
                .map_err(StoreError::io("fsync", &self.path))?;
        }
        Ok(self.offset)
    }
}

/// Queues the gathered run `run` (whole pages, maybe none) as one block
/// mapped at page `first`.
fn flush_run(
    index: &mut NodeIndex,
    writer: &mut PagesWriter,
    run: &[u8],
    first: u64,
) -> Result<(), StoreError> {
    if !run.is_empty() {
        writer.push(index, run, first)?;
    }
    Ok(())
}

/// Writes the increment of `input.stamp` for `input.node` and its index.
///
/// `pages` yields (page number, 4096 bytes) in strictly ascending page
/// order: every page dirtied since the base (a page that is all zero is
/// recorded as zero, not stored). Runs of consecutive non-zero pages are
/// stored in blocks of up to 64 pages. The new index is the base (or an
/// empty index) with `removed` cleared and the new blocks overlaid.
///
/// `progress` is called after each block with the bytes of pages consumed
/// so far (4096 per page, zero pages included).
///
/// Files: `pages_file(root, node, stamp)` (only when some page is stored),
/// then `index_file(root, node, stamp)`; with `fsync`, the pages file is
/// synced before the index is written, and the index is synced and renamed
/// into place, and the node directory synced. On error, files of the stamp
/// may be left behind; they are harmless (no manifest refers to them) and
/// the next prune deletes them.
pub fn write_increment<'p>(
    input: IncrementInput<'_>,
    pages: impl Iterator<Item = (u64, &'p [u8])>,
    progress: &mut dyn FnMut(u64),
) -> Result<(NodeIndex, IncrementSummary), StoreError> {
    let mut w = IncrementWriter::new(input.root, input.node, input.stamp, input.base, input.fsync)?;
    w.clear(input.removed);
    w.append(pages, progress)?;
    w.finish(input.tables, input.images)
}

/// An increment written in several parts: what `write_increment` does, for
/// a caller that has the pages in several sets (the agent's pre-copy
/// rounds, written while the next round copies). A page appended again
/// replaces its earlier copy in the index (the earlier block stays in the
/// pages file, unreferenced); `clear` makes pages zero.
pub struct IncrementWriter {
    root: PathBuf,
    node: u32,
    stamp: Stamp,
    fsync: bool,
    index: NodeIndex,
    writer: PagesWriter,
    run: Vec<u8>,
    npages: u64,
    zero_pages: u64,
}

impl IncrementWriter {
    /// Starts the increment of `stamp` for `node` over `base` (or an empty
    /// index).
    pub fn new(
        root: &Path,
        node: u32,
        stamp: Stamp,
        base: Option<&NodeIndex>,
        fsync: bool,
    ) -> Result<IncrementWriter, StoreError> {
        let mut index = match base {
            Some(base) => {
                if base.node != node {
                    return Err(StoreError::InvalidInput(format!(
                        "base index is of node {}, increment of node {node}",
                        base.node
                    )));
                }
                if base.stamp >= stamp {
                    return Err(StoreError::InvalidInput(format!(
                        "base stamp {} is not older than stamp {stamp}",
                        base.stamp
                    )));
                }
                base.clone()
            }
            None => NodeIndex::empty(node),
        };
        if stamp == 0 {
            return Err(StoreError::InvalidInput("stamp 0 is reserved".into()));
        }
        index.stamp = stamp;
        let dir = files::node_dir(root, node);
        fsutil::create_dir(&dir, fsync)?;
        Ok(IncrementWriter {
            root: root.to_path_buf(),
            node,
            stamp,
            fsync,
            index,
            writer: PagesWriter {
                path: files::pages_file(root, node, stamp),
                node,
                stamp,
                out: None,
                offset: 0,
                batch: Vec::with_capacity(BATCH_BLOCKS),
                batch_data: Vec::with_capacity(BATCH_BLOCKS * BLOCK_PAGES as usize * PAGE_SIZE),
                outputs: Vec::new(),
                fsync,
                synced: 0,
            },
            run: vec![0u8; BLOCK_PAGES as usize * PAGE_SIZE],
            npages: 0,
            zero_pages: 0,
        })
    }

    /// Makes `ranges` of pages zero (holes) in the index.
    pub fn clear(&mut self, ranges: &[Range<u64>]) {
        for r in ranges {
            self.index.clear(r.clone());
        }
    }

    /// Stores `pages` (strictly ascending within this call; each 4096
    /// bytes), replacing earlier copies. `progress` gets the bytes of pages
    /// consumed by this call so far.
    pub fn append<'p>(
        &mut self,
        pages: impl Iterator<Item = (u64, &'p [u8])>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), StoreError> {
        let mut run_first = 0u64;
        let mut run_len = 0u32;
        let mut next_page: Option<u64> = None;
        let mut done = 0u64;
        for (page, data) in pages {
            if data.len() != PAGE_SIZE {
                return Err(StoreError::InvalidInput(format!(
                    "page {page} has {} bytes, not {PAGE_SIZE}",
                    data.len()
                )));
            }
            if next_page.is_some_and(|next| page < next) {
                return Err(StoreError::InvalidInput(format!(
                    "page {page} comes after page {}: pages must be in ascending order",
                    next_page.unwrap() - 1
                )));
            }
            next_page = Some(page + 1);
            let zero = is_zero(data);
            // The run ends at a gap, a zero page or when the block is full.
            if run_len > 0
                && (zero || page != run_first + u64::from(run_len) || run_len == BLOCK_PAGES)
            {
                flush_run(
                    &mut self.index,
                    &mut self.writer,
                    &self.run[..run_len as usize * PAGE_SIZE],
                    run_first,
                )?;
                run_len = 0;
                progress(done * PAGE_SIZE as u64);
            }
            done += 1;
            self.npages += 1;
            if zero {
                self.zero_pages += 1;
                self.index.clear(page..page + 1);
                continue;
            }
            if run_len == 0 {
                run_first = page;
            }
            let at = run_len as usize * PAGE_SIZE;
            self.run[at..at + PAGE_SIZE].copy_from_slice(data);
            run_len += 1;
        }
        flush_run(
            &mut self.index,
            &mut self.writer,
            &self.run[..run_len as usize * PAGE_SIZE],
            run_first,
        )?;
        // Every block of this call is in the index before the next call
        // can clear or replace one of its pages.
        self.writer.store_batch(&mut self.index)?;
        progress(done * PAGE_SIZE as u64);
        Ok(())
    }

    /// Syncs the pages file, then writes the index (with the agent's
    /// `tables` and the ranks' `images`).
    pub fn finish(
        mut self,
        tables: Vec<u8>,
        images: Vec<RankImage>,
    ) -> Result<(NodeIndex, IncrementSummary), StoreError> {
        let (root, node, stamp, fsync) = (self.root, self.node, self.stamp, self.fsync);
        let data_bytes = self.writer.finish(&mut self.index, fsync)?;
        let mut index = self.index;
        index.tables = tables;
        index.images = images;
        index.compact();
        let index_path = files::index_file(&root, node, stamp);
        let (len, xxh3) = index.save(&index_path, fsync)?;
        let summary = IncrementSummary {
            index: IndexRef {
                node,
                index: files::index_file(Path::new(""), node, stamp),
                len,
                xxh3,
            },
            pages: self.npages,
            zero_pages: self.zero_pages,
            data_bytes_written: data_bytes,
            bytes_written: data_bytes + len,
        };
        Ok((index, summary))
    }
}
