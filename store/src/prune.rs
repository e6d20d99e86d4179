//! Removing old checkpoints ([`prune`], and [`prune_held`] for a partial
//! store) and measuring what a stamp uses ([`stamp_sizes`]).
//!
//! Prune keeps the newest N committed stamps. It first works out every file
//! the kept stamps need (their indexes and the pages files those indexes
//! use), then removes the other manifests (and syncs the stamps directory),
//! and only then removes data files, so a crash in the middle never leaves a
//! manifest whose data is gone. Files of stamps newer than the newest
//! committed one may belong to a checkpoint in progress and are never
//! touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::{files, Stamp};

use crate::error::StoreError;
use crate::fsutil;
use crate::manifest::{list_committed, read_manifest};
use crate::verify::load_checked_index;

/// What [`prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneSummary {
    /// Committed stamps left, ascending.
    pub kept: Vec<Stamp>,
    /// Stamps whose manifest was removed.
    pub removed_stamps: Vec<Stamp>,
    /// Data, index and temporary files removed.
    pub files_removed: u64,
    /// Bytes of all removed files (manifests included).
    pub bytes_freed: u64,
}

/// Keeps the newest `keep` (at least 1) committed stamps and removes
/// everything else that is older than the newest committed stamp: older
/// manifests, data and index files no kept stamp uses, files of stamps
/// never committed, leftover `.tmp` files. Unknown files are left alone.
///
/// Fails, before removing anything, when a kept stamp's manifest or index
/// cannot be read (the files it needs could not be known).
pub fn prune(root: &Path, keep: usize) -> Result<PruneSummary, StoreError> {
    prune_store(root, keep, false)
}

/// [`prune`] for a partial store, one that holds only some nodes' files
/// (a node's checkpoint memory: its own node and the nodes it holds
/// copies for) next to the manifests of every committed stamp. A node
/// whose index of a kept stamp is absent from `root` is simply not held
/// here (no error, nothing of that node is needed by that stamp); an index
/// that is present but does not match the manifest is still an error, as
/// is an unreadable manifest. What is removed is decided as in [`prune`].
pub fn prune_held(root: &Path, keep: usize) -> Result<PruneSummary, StoreError> {
    prune_store(root, keep, true)
}

/// [`prune`], or [`prune_held`] with `partial`.
fn prune_store(root: &Path, keep: usize, partial: bool) -> Result<PruneSummary, StoreError> {
    if keep == 0 {
        return Err(StoreError::InvalidInput(
            "prune must keep at least one stamp".into(),
        ));
    }
    let committed = list_committed(root)?;
    let Some(&newest) = committed.last() else {
        return Ok(PruneSummary::default());
    };
    let split = committed.len().saturating_sub(keep);
    let (dropped, kept) = committed.split_at(split);

    // Everything the kept stamps need.
    let mut needed: BTreeSet<PathBuf> = BTreeSet::new();
    for &stamp in kept {
        let manifest = read_manifest(root, stamp)?;
        for iref in &manifest.indexes {
            let index = match load_checked_index(root, &manifest, iref.node) {
                Ok(index) => index,
                // Not held here: only a missing file, never a damaged one.
                Err(e) if partial && e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            needed.insert(root.join(&iref.index));
            for file in index.referenced_files() {
                needed.insert(files::pages_file(root, iref.node, file));
            }
        }
    }

    let mut summary = PruneSummary {
        kept: kept.to_vec(),
        removed_stamps: dropped.to_vec(),
        ..Default::default()
    };
    // Manifests first, made durable before any data goes.
    let stamps_dir = files::stamps_dir(root);
    for &stamp in dropped {
        remove(&files::manifest_file(root, stamp), &mut summary)?;
    }
    for (stamp, name, path) in fsutil::stamp_files(&stamps_dir)? {
        if stamp < newest && name.ends_with(fsutil::TMP_SUFFIX) {
            remove(&path, &mut summary)?;
            summary.files_removed += 1;
        }
    }
    if stamps_dir.exists() {
        fsutil::fsync_dir(&stamps_dir)?;
    }

    for (_, dir) in fsutil::node_dirs(root)? {
        for (stamp, _, path) in fsutil::stamp_files(&dir)? {
            if stamp < newest && !needed.contains(&path) {
                remove(&path, &mut summary)?;
                summary.files_removed += 1;
            }
        }
    }
    Ok(summary)
}

/// Removes `path`, counting its bytes. A file already gone is fine: the
/// goal is reached.
fn remove(path: &Path, summary: &mut PruneSummary) -> Result<(), StoreError> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    match std::fs::remove_file(path) {
        Ok(()) => {
            summary.bytes_freed += len;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path)(e)),
    }
}

/// Bytes a committed stamp uses on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StampSizes {
    pub manifest: u64,
    /// Index files of all nodes.
    pub indexes: u64,
    /// Pages files the stamp's indexes use, including older stamps' files.
    pub pages: u64,
    /// Of `pages`, the pages files written for this stamp (its increment).
    pub own_pages: u64,
}

impl StampSizes {
    /// Everything needed to restore the stamp.
    pub fn total(&self) -> u64 {
        self.manifest + self.indexes + self.pages
    }
}

/// Sizes of the files committed stamp `stamp` uses (missing files count 0).
pub fn stamp_sizes(root: &Path, stamp: Stamp) -> Result<StampSizes, StoreError> {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let manifest = read_manifest(root, stamp)?;
    let mut sizes = StampSizes {
        manifest: size(&files::manifest_file(root, stamp)),
        ..Default::default()
    };
    for iref in &manifest.indexes {
        sizes.indexes += size(&root.join(&iref.index));
        let index = load_checked_index(root, &manifest, iref.node)?;
        for file in index.referenced_files() {
            let len = size(&files::pages_file(root, iref.node, file));
            sizes.pages += len;
            if file == stamp {
                sizes.own_pages += len;
            }
        }
    }
    Ok(sizes)
}
