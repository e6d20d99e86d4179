//! Manifests: one per committed stamp, `stamps/SSSSSSSS.manifest`. Writing
//! it (atomically) is the commit point of a checkpoint; a stamp without a
//! manifest does not exist for restart.
//!
//! The file is JSON for people to read:
//! `{"manifest": {...}, "xxh3": "<16 hex digits>"}` where the checksum is
//! the xxh3-64 of the compact `serde_json` serialization of the manifest
//! object (fields in declaration order). Unknown fields are rejected, so any
//! change to the file is either a parse error or a checksum mismatch.
//!
//! Also here: listing committed stamps and choosing the next stamp.

use std::path::{Path, PathBuf};

use mome_protocol::ckpt::{files, Stamp};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::fsutil;
use crate::index::IndexRef;

/// Everything about a committed stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub stamp: Stamp,
    pub job_id: String,
    /// How many times the job was (re)started before this checkpoint.
    pub incarnation: u32,
    /// Commit time, RFC 3339.
    pub created: String,
    pub nranks: u32,
    pub nodes: u32,
    pub binary: PathBuf,
    pub binary_xxh3: u64,
    /// The stamp the increments were taken against (the previous commit),
    /// `None` for a full checkpoint.
    pub parent: Option<Stamp>,
    /// One per node, nodes `0..nodes`.
    pub indexes: Vec<IndexRef>,
    /// Longest time a rank was stopped, microseconds.
    pub pause_us: u64,
    /// From the checkpoint request to the commit, milliseconds.
    pub commit_ms: u64,
    /// Bytes written to the store for this stamp (all nodes, data + index).
    pub bytes_written: u64,
    /// Pages in this stamp's increments (all nodes).
    pub pages: u64,
    /// Private image bytes of all ranks (uncompressed).
    pub image_bytes: u64,
}

/// The file layout: the manifest and its checksum.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    manifest: Manifest,
    xxh3: String,
}

fn checksum(manifest: &Manifest) -> u64 {
    let canonical = serde_json::to_vec(manifest).expect("a manifest always serializes to JSON");
    xxhash_rust::xxh3::xxh3_64(&canonical)
}

/// Writes the manifest of `manifest.stamp` atomically (`.tmp` in the stamps
/// directory, fsync, rename, directory fsync; the syncs only with `fsync`)
/// and returns its path. This commits the stamp: call it only once every
/// node's increment is durable.
pub fn commit_manifest(
    root: &Path,
    manifest: &Manifest,
    fsync: bool,
) -> Result<PathBuf, StoreError> {
    if manifest.stamp == 0 {
        return Err(StoreError::InvalidInput("stamp 0 is reserved".into()));
    }
    let dir = files::stamps_dir(root);
    fsutil::create_dir(&dir, fsync)?;
    let file = ManifestFile {
        manifest: manifest.clone(),
        xxh3: format!("{:016x}", checksum(manifest)),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("a manifest always serializes to JSON");
    bytes.push(b'\n');
    let path = files::manifest_file(root, manifest.stamp);
    fsutil::write_atomic(&path, &bytes, fsync)?;
    Ok(path)
}

/// Reads the manifest of `stamp` and checks its checksum and stamp.
pub fn read_manifest(root: &Path, stamp: Stamp) -> Result<Manifest, StoreError> {
    let path = files::manifest_file(root, stamp);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NotCommitted { stamp, path });
        }
        Err(e) => return Err(StoreError::io("read", &path)(e)),
    };
    let file: ManifestFile = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::corrupt(&path, format!("manifest does not parse: {e}")))?;
    let sum = checksum(&file.manifest);
    if format!("{sum:016x}") != file.xxh3 {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "manifest checksum mismatch: content has {sum:016x}, file says {}",
                file.xxh3
            ),
        ));
    }
    if file.manifest.stamp != stamp {
        return Err(StoreError::corrupt(
            &path,
            format!("manifest is of stamp {}", file.manifest.stamp),
        ));
    }
    Ok(file.manifest)
}

/// Committed stamps (those with a manifest file), ascending. Only the name
/// is looked at; temporary and other files are ignored.
pub fn list_committed(root: &Path) -> Result<Vec<Stamp>, StoreError> {
    let mut out: Vec<Stamp> = fsutil::stamp_files(&files::stamps_dir(root))?
        .into_iter()
        .filter(|(stamp, name, _)| *name == format!("{stamp:08}.manifest"))
        .map(|(stamp, _, _)| stamp)
        .collect();
    out.dedup();
    Ok(out)
}

/// The stamp for a new checkpoint: 1 + the largest stamp appearing in any
/// file name of the store (manifests, temporary files, node files, committed
/// or not), so that the number of an aborted checkpoint is never reused; 1
/// for an empty store.
pub fn next_stamp(root: &Path) -> Result<Stamp, StoreError> {
    let mut max = 0;
    let mut see = |dir: &Path| -> Result<(), StoreError> {
        if let Some((stamp, _, _)) = fsutil::stamp_files(dir)?.last() {
            max = max.max(*stamp);
        }
        Ok(())
    };
    see(&files::stamps_dir(root))?;
    for (_, dir) in fsutil::node_dirs(root)? {
        see(&dir)?;
    }
    Ok(max + 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(stamp: Stamp) -> Manifest {
        Manifest {
            stamp,
            job_id: "job-1".into(),
            incarnation: 0,
            created: "2024-05-01T12:00:00Z".into(),
            nranks: 4,
            nodes: 1,
            binary: "/bin/app".into(),
            binary_xxh3: 0x1234,
            parent: None,
            indexes: vec![IndexRef {
                node: 0,
                index: files::index_file(Path::new(""), 0, stamp),
                len: 10,
                xxh3: 0xabcdef,
            }],
            pause_us: 1500,
            commit_ms: 20,
            bytes_written: 100,
            pages: 3,
            image_bytes: 4096,
        }
    }

    #[test]
    fn round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(list_committed(root).unwrap(), Vec::<Stamp>::new());
        assert_eq!(next_stamp(root).unwrap(), 1);
        for s in [3, 1, 2] {
            commit_manifest(root, &sample(s), true).unwrap();
        }
        assert_eq!(read_manifest(root, 2).unwrap(), sample(2));
        std::fs::write(files::stamps_dir(root).join("00000009.manifest.tmp"), b"x").unwrap();
        std::fs::write(files::stamps_dir(root).join("junk"), b"x").unwrap();
        assert_eq!(list_committed(root).unwrap(), vec![1, 2, 3]);
        assert_eq!(next_stamp(root).unwrap(), 10);
        std::fs::create_dir_all(files::node_dir(root, 1)).unwrap();
        std::fs::write(files::pages_file(root, 1, 12), b"x").unwrap();
        assert_eq!(next_stamp(root).unwrap(), 13);
        assert!(matches!(
            read_manifest(root, 7),
            Err(StoreError::NotCommitted { stamp: 7, .. })
        ));
    }

    #[test]
    fn any_flipped_byte_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let path = commit_manifest(root, &sample(5), false).unwrap();
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            for bit in [0x01, 0x02, 0x10] {
                let mut bytes = good.clone();
                bytes[i] ^= bit;
                // Flipping inside insignificant whitespace (space <-> tab,
                // newline <-> CR) changes nothing the manifest says.
                let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
                if ws(good[i]) && ws(bytes[i]) {
                    continue;
                }
                std::fs::write(&path, &bytes).unwrap();
                let err =
                    read_manifest(root, 5).expect_err(&format!("flip {bit:#x} at {i} accepted"));
                assert!(err.to_string().contains("00000005.manifest"), "{err}");
            }
        }
        std::fs::write(&path, &good).unwrap();
        assert_eq!(read_manifest(root, 5).unwrap(), sample(5));
    }
}
