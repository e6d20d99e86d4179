//! Data blocks and the pages files that hold them.
//!
//! A block is 1 to [`BLOCK_PAGES`] pages that are contiguous in the window,
//! lz4-compressed together (lz4_flex block format, no size prefix: the
//! uncompressed size is `npages * PAGE_SIZE`), or stored raw when they do
//! not compress. A [`BlockRef`] says where a block is and carries the xxh3-64
//! of its uncompressed bytes, checked on every read.
//!
//! A pages file (`node-K/SSSSSSSS.pages`) is a [`PAGES_HEADER_LEN`]-byte
//! header (magic, version, node, stamp) followed by blocks back to back;
//! nothing in it says where blocks start: the node indexes do.
//!
//! [`BlockReader`] reads blocks of one node from several threads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mome_protocol::ckpt::{files, Stamp};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Size of a page of the window.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one block.
pub const BLOCK_PAGES: u32 = 64;

const PAGES_MAGIC: &[u8; 8] = b"MOMEPAGE";
const PAGES_VERSION: u32 = 1;
/// Length of the header of a pages file; the first block starts here.
pub const PAGES_HEADER_LEN: u64 = 32;

/// Where a block of pages is and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockRef {
    /// Stamp of the pages file holding the block (same node as the index).
    pub file: Stamp,
    /// Offset of the block in that pages file.
    pub offset: u64,
    /// Stored length of the block in bytes.
    pub clen: u32,
    /// Pages in the block (1..=64); uncompressed length is `npages * 4096`.
    pub npages: u32,
    /// xxh3-64 of the uncompressed bytes.
    pub xxh3: u64,
    /// Stored uncompressed (`clen == npages * 4096`) because lz4 did not
    /// make it smaller.
    pub raw: bool,
}

impl BlockRef {
    /// Uncompressed length of the block.
    pub fn raw_len(&self) -> usize {
        self.npages as usize * PAGE_SIZE
    }

    /// First byte after the block in its pages file.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.clen)
    }

    /// Checks what can be checked without reading the data.
    pub(crate) fn check_shape(&self) -> Result<(), String> {
        if self.npages == 0 || self.npages > BLOCK_PAGES {
            return Err(format!("block has {} pages", self.npages));
        }
        if self.clen == 0 || self.clen as usize > self.raw_len() {
            return Err(format!(
                "block of {} pages has stored length {}",
                self.npages, self.clen
            ));
        }
        if self.raw && self.clen as usize != self.raw_len() {
            return Err(format!(
                "raw block of {} pages has stored length {}",
                self.npages, self.clen
            ));
        }
        if self.offset < PAGES_HEADER_LEN {
            return Err(format!(
                "block at offset {} overlaps the header",
                self.offset
            ));
        }
        Ok(())
    }
}

/// The header of a pages file.
pub(crate) fn pages_header(node: u32, stamp: Stamp) -> [u8; PAGES_HEADER_LEN as usize] {
    let mut h = [0u8; PAGES_HEADER_LEN as usize];
    h[0..8].copy_from_slice(PAGES_MAGIC);
    h[8..12].copy_from_slice(&PAGES_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&node.to_le_bytes());
    h[16..24].copy_from_slice(&stamp.to_le_bytes());
    h
}

/// Reads and checks the header of an open pages file.
pub(crate) fn check_pages_header(
    file: &File,
    path: &Path,
    node: u32,
    stamp: Stamp,
) -> Result<(), StoreError> {
    let mut h = [0u8; PAGES_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::corrupt(path, "shorter than the pages file header")
        } else {
            StoreError::io("read", path)(e)
        }
    })?;
    if &h[0..8] != PAGES_MAGIC {
        return Err(StoreError::corrupt(path, "not a pages file (bad magic)"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if version != PAGES_VERSION {
        return Err(StoreError::corrupt(
            path,
            format!("pages file version {version}, this build reads {PAGES_VERSION}"),
        ));
    }
    let (n, s) = (
        u32::from_le_bytes(h[12..16].try_into().unwrap()),
        u64::from_le_bytes(h[16..24].try_into().unwrap()),
    );
    if (n, s) != (node, stamp) {
        return Err(StoreError::corrupt(
            path,
            format!("header says node {n} stamp {s}, expected node {node} stamp {stamp}"),
        ));
    }
    Ok(())
}

/// Bytes compressed first to tell whether a block is worth compressing.
const PROBE_LEN: usize = 4096;

/// Compresses `raw` (whole pages) into `out`, which is resized as needed and
/// reused between calls. Returns true when `out` holds lz4 data, false when
/// the block does not compress and should be stored raw (`out` is then
/// meaningless).
pub(crate) fn compress(raw: &[u8], out: &mut Vec<u8>) -> bool {
    // Incompressible data (random, already compressed, most floating-point
    // arrays) costs lz4 several times what storing it does: a block whose
    // first page does not shrink by an eighth is stored raw.
    if raw.len() > PROBE_LEN {
        let max = lz4_flex::block::get_maximum_output_size(PROBE_LEN);
        if out.len() < max {
            out.resize(max, 0);
        }
        match lz4_flex::block::compress_into(&raw[..PROBE_LEN], out) {
            Ok(n) if n < PROBE_LEN - PROBE_LEN / 8 => {}
            _ => return false,
        }
    }
    let max = lz4_flex::block::get_maximum_output_size(raw.len());
    if out.len() < max {
        out.resize(max, 0);
    }
    match lz4_flex::block::compress_into(raw, out) {
        Ok(n) if n < raw.len() => {
            out.truncate(n);
            true
        }
        // Error only happens when `out` is too small, which it is not; treat
        // it as incompressible rather than fail the checkpoint.
        _ => false,
    }
}

/// Decompresses the stored bytes of a compressed `block` into `out`
/// (exactly `raw_len()` bytes) and checks the xxh3. `path` is for error
/// messages.
pub(crate) fn decompress(
    block: &BlockRef,
    stored: &[u8],
    out: &mut [u8],
    path: &Path,
) -> Result<(), StoreError> {
    match lz4_flex::block::decompress_into(stored, out) {
        Ok(n) if n == out.len() => check_sum(block, out, path),
        Ok(n) => Err(block_error(
            block,
            path,
            format!("decompressed to {n} bytes, expected {}", out.len()),
        )),
        Err(e) => Err(block_error(
            block,
            path,
            format!("lz4 decompression failed: {e}"),
        )),
    }
}

/// Checks that `data`, the uncompressed pages of `block`, match its xxh3.
pub(crate) fn check_sum(block: &BlockRef, data: &[u8], path: &Path) -> Result<(), StoreError> {
    let sum = xxhash_rust::xxh3::xxh3_64(data);
    if sum != block.xxh3 {
        return Err(block_error(
            block,
            path,
            format!(
                "xxh3 mismatch: data has {sum:016x}, index says {:016x}",
                block.xxh3
            ),
        ));
    }
    Ok(())
}

fn block_error(block: &BlockRef, path: &Path, detail: String) -> StoreError {
    StoreError::CorruptBlock {
        path: path.to_path_buf(),
        offset: block.offset,
        clen: block.clen,
        npages: block.npages,
        detail,
    }
}

thread_local! {
    /// Compressed bytes of the block being read, reused by each thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads blocks of one node's pages files. Files are opened on first use
/// (and their header checked) and stay open; reads use `pread`, so one
/// reader can be shared by any number of threads (`Send + Sync`).
#[derive(Debug)]
pub struct BlockReader {
    root: PathBuf,
    node: u32,
    files: RwLock<HashMap<Stamp, Arc<File>>>,
}

impl BlockReader {
    /// A reader of the pages files of `node` in the store at `root`.
    pub fn new(root: &Path, node: u32) -> Self {
        BlockReader {
            root: root.to_path_buf(),
            node,
            files: RwLock::new(HashMap::new()),
        }
    }

    /// Path of the pages file of `stamp`.
    pub fn path(&self, stamp: Stamp) -> PathBuf {
        files::pages_file(&self.root, self.node, stamp)
    }

    fn file(&self, stamp: Stamp) -> Result<Arc<File>, StoreError> {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always consistent, so keep using it.
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stamp)
        {
            return Ok(f.clone());
        }
        let path = self.path(stamp);
        let file = File::open(&path).map_err(StoreError::io("open", &path))?;
        check_pages_header(&file, &path, self.node, stamp)?;
        let mut map = self.files.write().unwrap_or_else(|e| e.into_inner());
        Ok(map.entry(stamp).or_insert_with(|| Arc::new(file)).clone())
    }

    /// Reads `block` into `out` (resized to `npages * 4096` bytes) and checks
    /// it: a missing or short file, undecodable data or a checksum mismatch
    /// is an error naming the file and the offset.
    pub fn read_block(&self, block: &BlockRef, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let path_of = || self.path(block.file);
        block
            .check_shape()
            .map_err(|detail| StoreError::corrupt(&path_of(), detail))?;
        let file = self.file(block.file)?;
        out.resize(block.raw_len(), 0);
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, block.offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    block_error(block, &path_of(), "goes past the end of the file".into())
                } else {
                    StoreError::io("read", &path_of())(e)
                }
            })
        };
        if block.raw {
            read(out)?;
            return check_sum(block, out, &path_of());
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(block.clen as usize, 0);
            read(&mut scratch)?;
            decompress(block, &scratch, out, &path_of())
        })
    }

    /// Reads and checks `block` without keeping its pages.
    pub fn verify_block(&self, block: &BlockRef) -> Result<(), StoreError> {
        thread_local! {
            static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        OUT.with(|out| self.read_block(block, &mut out.borrow_mut()))
    }
}
