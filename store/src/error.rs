//! The one error type of the store. Every variant names the file (or the
//! stamp) concerned and what is wrong with it, so that a message printed by
//! mome-restart or an agent is enough to find the problem on disk.

use std::io;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::Stamp;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on a file or directory failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "read", "rename", ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file exists but its content is not what it should be (bad magic,
    /// version, length, checksum, undecodable body, too short, ...).
    #[error("{}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// A data block cannot be decompressed or does not match its checksum.
    #[error("{}: block at offset {offset} ({clen} bytes, {npages} pages): {detail}", path.display())]
    CorruptBlock {
        path: PathBuf,
        offset: u64,
        clen: u32,
        npages: u32,
        detail: String,
    },
    /// The stamp has no manifest: it was never committed (or was pruned).
    #[error("stamp {stamp} is not committed: {} does not exist", path.display())]
    NotCommitted { stamp: Stamp, path: PathBuf },
    /// The caller passed something the store cannot accept.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl StoreError {
    /// Wraps an I/O error with the operation and the path.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    }

    /// A `Corrupt` error for `path`.
    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// True when a write failed for lack of space (a full disk, or a
    /// memory store at its size limit).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }

    /// True when the error is a missing file or directory.
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            StoreError::NotCommitted { .. } => true,
            _ => false,
        }
    }
}
