//! Small file system helpers shared by the writers: atomic replacement of a
//! small file (write a `.tmp` sibling, fsync, rename, fsync the directory),
//! directory fsync, and parsing of the stamp at the start of a store file
//! name.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::Stamp;

use crate::error::StoreError;

/// Suffix of files being written; such files are never read back.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// `path` with `.tmp` appended to its file name.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// fsync a directory so that entries created, renamed or removed in it are
/// durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", dir))
}

/// Creates `dir` (and its parents). With `fsync`, also syncs the parent of
/// `dir` and `dir` itself so the new entries survive a crash.
pub(crate) fn create_dir(dir: &Path, fsync: bool) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
    if fsync {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: readers see either the old file
/// (or none) or the complete new one, also after a crash at any point.
/// Without `fsync` the replacement is atomic for running processes but may
/// be lost (not torn) in a power failure.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    let mut file = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
    file.write_all(bytes)
        .map_err(StoreError::io("write", &tmp))?;
    if fsync {
        // The data must be on disk before the rename makes it visible under
        // its real name, otherwise a crash could leave a named, torn file.
        file.sync_all().map_err(StoreError::io("fsync", &tmp))?;
    }
    drop(file);
    fs::rename(&tmp, path).map_err(StoreError::io("rename", &tmp))?;
    if fsync {
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
    }
    Ok(())
}

/// The stamp a store file belongs to: the decimal number at the start of its
/// name (`00000012.pages`, `00000012.index.tmp`, `00000012.manifest`).
pub(crate) fn stamp_of_name(name: &str) -> Option<Stamp> {
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || name.as_bytes().get(digits) != Some(&b'.') {
        return None;
    }
    name[..digits].parse().ok()
}

/// The node number of a node directory name (`node-3`).
pub(crate) fn node_of_dir_name(name: &str) -> Option<u32> {
    let n = name.strip_prefix("node-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The node directories under `root`, as (node, path), sorted by node.
/// A missing root means no node directories.
pub(crate) fn node_dirs(root: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io("read directory", root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StoreError::io("read directory", root))?;
        let Some(node) = entry.file_name().to_str().and_then(node_of_dir_name) else {
            continue;
        };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push((node, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Regular files of `dir` whose name starts with a stamp, as (stamp, name,
/// path). A missing directory has no files.
pub(crate) fn stamp_files(dir: &Path) -> Result<Vec<(Stamp, String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io("read directory", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StoreError::io("read directory", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(stamp) = stamp_of_name(&name) else {
            continue;
        };
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            out.push((stamp, name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(stamp_of_name("00000012.pages"), Some(12));
        assert_eq!(stamp_of_name("00000012.index.tmp"), Some(12));
        assert_eq!(stamp_of_name("12"), None);
        assert_eq!(stamp_of_name("x12.pages"), None);
        assert_eq!(node_of_dir_name("node-3"), Some(3));
        assert_eq!(node_of_dir_name("node-"), None);
        assert_eq!(node_of_dir_name("node-3a"), None);
        assert_eq!(
            tmp_path(Path::new("/a/00000001.index")),
            Path::new("/a/00000001.index.tmp")
        );
    }
}
