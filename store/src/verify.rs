//! Checking that a committed stamp can be restored: its manifest, its node
//! indexes and the pages files they reference, and with
//! [`VerifyLevel::Full`] every block's data. [`verify`] checks a whole
//! stamp in one store; [`verify_node`] checks one node's share, also in a
//! partial store (one holding only some nodes' files) against a manifest
//! read elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use mome_protocol::ckpt::{files, Stamp};

use crate::block::{check_pages_header, BlockReader};
use crate::error::StoreError;
use crate::index::NodeIndex;
use crate::manifest::{read_manifest, Manifest};

/// How much [`verify`] and [`verify_node`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLevel {
    /// Manifest checksum; every index present with the length and xxh3 the
    /// manifest records, and loadable; every pages file the indexes use
    /// present, with a valid header and long enough for its blocks. Reads
    /// manifests, indexes and one header per pages file.
    Quick,
    /// Quick, and every live block decompresses and matches its xxh3.
    /// Reads all the data of the stamp.
    Full,
}

/// What [`verify`] looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub stamp: Stamp,
    pub manifest: Manifest,
    /// Non-zero pages over all nodes.
    pub pages: u64,
    /// Live blocks over all nodes.
    pub blocks: u64,
    /// Stored bytes of the live blocks.
    pub data_bytes: u64,
    /// Pages files used, over all nodes.
    pub pages_files: u64,
    /// Blocks read and checked (0 for Quick).
    pub blocks_checked: u64,
}

/// Loads the index of one node as the manifest records it, checking its
/// length, checksum, node and stamp.
pub(crate) fn load_checked_index(
    root: &Path,
    manifest: &Manifest,
    node: u32,
) -> Result<NodeIndex, StoreError> {
    let iref = manifest
        .indexes
        .iter()
        .find(|i| i.node == node)
        .ok_or_else(|| {
            StoreError::corrupt(
                &files::manifest_file(root, manifest.stamp),
                format!("manifest has no index for node {node}"),
            )
        })?;
    let path = root.join(&iref.index);
    let bytes = std::fs::read(&path).map_err(StoreError::io("read", &path))?;
    if bytes.len() as u64 != iref.len {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "node {node} index is {} bytes, manifest says {}",
                bytes.len(),
                iref.len
            ),
        ));
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
    if sum != iref.xxh3 {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "node {node} index xxh3 mismatch: file has {sum:016x}, manifest says {:016x}",
                iref.xxh3
            ),
        ));
    }
    let index = NodeIndex::from_bytes(&path, &bytes)?;
    if (index.node, index.stamp) != (node, manifest.stamp) {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "index is of node {} stamp {}, manifest expects node {node} stamp {}",
                index.node, index.stamp, manifest.stamp
            ),
        ));
    }
    Ok(index)
}

/// Checks the manifest's list of indexes: exactly one per node `0..nodes`.
fn check_index_list(root: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let nodes: BTreeSet<u32> = manifest.indexes.iter().map(|i| i.node).collect();
    let expect: BTreeSet<u32> = (0..manifest.nodes).collect();
    if nodes != expect || manifest.indexes.len() != manifest.nodes as usize {
        return Err(StoreError::corrupt(
            &files::manifest_file(root, manifest.stamp),
            format!(
                "manifest lists indexes for nodes {:?}, expected one for each of 0..{}",
                manifest.indexes.iter().map(|i| i.node).collect::<Vec<_>>(),
                manifest.nodes
            ),
        ));
    }
    Ok(())
}

/// What [`verify_node`] looked at: one node's share of a stamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: u32,
    /// Non-zero pages of the node.
    pub pages: u64,
    /// Live blocks of the node.
    pub blocks: u64,
    /// Stored bytes of the live blocks.
    pub data_bytes: u64,
    /// Pages files the node's index uses.
    pub pages_files: u64,
    /// Blocks read and checked (0 for Quick).
    pub blocks_checked: u64,
}

/// Checks that `root` holds a restorable copy of node `node`'s share of
/// the committed stamp `manifest` describes: the node's index, checked
/// against the manifest's [`IndexRef`](crate::IndexRef) (length, xxh3, node
/// and stamp), every pages file it uses (header, long enough for its
/// blocks) and, with [`VerifyLevel::Full`], every block's data.
///
/// The manifest need not come from `root`: a partial store (one that holds
/// only some nodes' files, such as a node's checkpoint memory) is checked
/// against the authoritative manifest read elsewhere. A copy of another
/// stamp, or of another run that reused the stamp number, fails the xxh3
/// check. An absent index is an [`StoreError::Io`] error for which
/// [`StoreError::is_not_found`] is true: the node's share is not held.
pub fn verify_node(
    root: &Path,
    manifest: &Manifest,
    node: u32,
    level: VerifyLevel,
) -> Result<NodeSummary, StoreError> {
    let stamp = manifest.stamp;
    let index = load_checked_index(root, manifest, node)?;
    let mut summary = NodeSummary {
        node,
        pages: index.page_count(),
        blocks: index.blocks().len() as u64,
        data_bytes: index.data_bytes(),
        ..Default::default()
    };

    // The furthest block end in each pages file.
    let mut ends: BTreeMap<Stamp, (u64, u64, u32)> = BTreeMap::new();
    for b in index.blocks() {
        let e = ends.entry(b.file).or_default();
        if b.end() > e.0 {
            *e = (b.end(), b.offset, b.clen);
        }
    }
    summary.pages_files = ends.len() as u64;
    for (&file, &(end, offset, clen)) in &ends {
        let path = files::pages_file(root, node, file);
        let f = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::corrupt(
                    &path,
                    format!("pages file used by node {node} index of stamp {stamp} is missing"),
                )
            } else {
                StoreError::io("open", &path)(e)
            }
        })?;
        check_pages_header(&f, &path, node, file)?;
        let len = f.metadata().map_err(StoreError::io("stat", &path))?.len();
        if len < end {
            return Err(StoreError::corrupt(
                &path,
                format!("pages file is {len} bytes, block at {offset}+{clen} goes past it"),
            ));
        }
    }

    if level == VerifyLevel::Full {
        let reader = BlockReader::new(root, node);
        for b in index.blocks() {
            reader.verify_block(b)?;
            summary.blocks_checked += 1;
        }
    }
    Ok(summary)
}

/// Checks that committed stamp `stamp` can be restored from `root` alone
/// (its manifest and every node's files, with [`verify_node`]); the error
/// says what is wrong and in which file.
pub fn verify(root: &Path, stamp: Stamp, level: VerifyLevel) -> Result<VerifySummary, StoreError> {
    let manifest = read_manifest(root, stamp)?;
    check_index_list(root, &manifest)?;
    let mut summary = VerifySummary {
        stamp,
        manifest: manifest.clone(),
        pages: 0,
        blocks: 0,
        data_bytes: 0,
        pages_files: 0,
        blocks_checked: 0,
    };
    for node in 0..manifest.nodes {
        let n = verify_node(root, &manifest, node, level)?;
        summary.pages += n.pages;
        summary.blocks += n.blocks;
        summary.data_bytes += n.data_bytes;
        summary.pages_files += n.pages_files;
        summary.blocks_checked += n.blocks_checked;
    }
    Ok(summary)
}
