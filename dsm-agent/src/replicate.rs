//! Diskless checkpoints: the copies of a node's increment on other nodes.
//!
//! After a node wrote its increment of stamp S into its memory store (the
//! tmpfs of its keeper, same layout as the disk store), it streams the two
//! files (`node-K/S.pages`, then `node-K/S.index`) to each holder over the
//! mesh in [`PeerMsg::StoreChunk`]s, and waits until every holder answers
//! [`PeerMsg::StoreHeld`]. A holder writes the pieces into its own memory
//! store under `.part` names, renames each file when complete, checks the
//! index (its xxh3 trailer, and that it is node K's index of S) and
//! answers. Blocks are checked again (xxh3 of each block) whenever they
//! are read back at a restore.
//!
//! The sender paces its chunks (`Mesh::send_paced`): the copy goes at the
//! speed of the connection without holding the whole increment in memory
//! a second time.
//!
//! This module also owns the disk level: copying a stamp's files (and the
//! older pages files its index still uses) to the disk store.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{files, Stamp};
use mome_protocol::peer::{PeerMsg, MAX_STORE_CHUNK};
use mome_store::NodeIndex;

use crate::agent::{lock, Agent};

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("cannot read {path} to copy it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node {node} cannot hold the copy: {reason}")]
    Holder { node: u32, reason: String },
    #[error("node {node} did not confirm its copy within {timeout:?}")]
    Timeout { node: u32, timeout: Duration },
    #[error("node {0} failed while receiving its copy")]
    HolderFailed(u32),
    #[error("copies need the mesh of a multi-node job")]
    NoMesh,
    #[error("cannot copy {from} to the disk store ({to}): {source}")]
    Disk {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Where a holder's answer goes: Ok, or why it could not keep the copy.
type HolderAnswer = mpsc::Sender<Result<(), String>>;

/// A file being received.
#[derive(Debug)]
struct Incoming {
    file: File,
    part: PathBuf,
    dest: PathBuf,
}

/// The copies in flight, both ways.
#[derive(Debug, Default)]
pub struct Replicas {
    /// Files being received, by (source node, stamp, index?).
    incoming: Mutex<HashMap<(u32, Stamp, bool), Incoming>>,
    /// Errors met while receiving a source's files of a stamp, answered
    /// once its index (the last file) is complete.
    failed: Mutex<HashMap<(u32, Stamp), String>>,
    /// This node's copies waiting for their holder's answer, by (holder,
    /// stamp).
    waiting: Mutex<HashMap<(u32, Stamp), HolderAnswer>>,
}

/// Sends this node's files of `stamp` under `root` to every holder and
/// waits until each holds them; returns the bytes sent to each.
pub fn send(
    agent: &Agent,
    root: &Path,
    stamp: Stamp,
    holders: &[u32],
    timeout: Duration,
) -> Result<u64, ReplicateError> {
    let cluster = agent.cluster.as_ref().ok_or(ReplicateError::NoMesh)?;
    let mesh = &cluster.mesh;
    let node = agent.id.node;
    let answers = expect(agent, stamp, holders);
    let forget = || {
        let mut w = lock(&cluster.replicas.waiting);
        for &h in holders {
            w.remove(&(h, stamp));
        }
    };
    let pages = files::pages_file(root, node, stamp);
    let index = files::index_file(root, node, stamp);
    let mut sent = 0;
    // No pages file: nothing changed that is not zero.
    let parts = [(pages, false), (index, true)];
    for (path, is_index) in parts.iter().filter(|(p, i)| *i || p.exists()) {
        let f = File::open(path).map_err(|source| ReplicateError::Read {
            path: path.clone(),
            source,
        });
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                forget();
                return Err(e);
            }
        };
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = vec![0u8; MAX_STORE_CHUNK];
        let mut offset = 0u64;
        loop {
            let want = ((total - offset) as usize).min(MAX_STORE_CHUNK);
            if let Err(source) = f.read_exact_at(&mut buf[..want], offset) {
                forget();
                return Err(ReplicateError::Read {
                    path: path.clone(),
                    source,
                });
            }
            for &h in holders {
                let chunk = PeerMsg::StoreChunk {
                    source: node,
                    stamp,
                    index: *is_index,
                    offset,
                    total,
                    data: buf[..want].to_vec(),
                };
                if !mesh.send_paced(h, chunk) {
                    forget();
                    return Err(ReplicateError::HolderFailed(h));
                }
            }
            offset += want as u64;
            if offset >= total {
                break;
            }
        }
        sent += total;
    }
    wait_answers(agent, answers, Instant::now() + timeout, timeout).inspect_err(|_| forget())?;
    Ok(sent)
}

/// Waits for every holder's answer (registered with [`expect`]) until
/// `deadline`; the first holder that refuses, fails or does not answer
/// is the error.
pub fn wait_answers(
    agent: &Agent,
    answers: Vec<(u32, mpsc::Receiver<Result<(), String>>)>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ReplicateError> {
    let mesh = &agent.cluster.as_ref().ok_or(ReplicateError::NoMesh)?.mesh;
    for (h, rx) in answers {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Short waits: a holder that fails is noticed at once.
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(Ok(())) => break,
                Ok(Err(reason)) => return Err(ReplicateError::Holder { node: h, reason }),
                Err(_) if mesh.failed(h) => return Err(ReplicateError::HolderFailed(h)),
                Err(_) if Instant::now() >= deadline => {
                    return Err(ReplicateError::Timeout { node: h, timeout })
                }
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// Waits to come for the answers of `holders` about this node's `stamp`.
pub fn expect(
    agent: &Agent,
    stamp: Stamp,
    holders: &[u32],
) -> Vec<(u32, mpsc::Receiver<Result<(), String>>)> {
    let Some(cluster) = agent.cluster.as_ref() else {
        return Vec::new();
    };
    let mut waiting = lock(&cluster.replicas.waiting);
    holders
        .iter()
        .map(|&h| {
            let (tx, rx) = mpsc::channel();
            waiting.insert((h, stamp), tx);
            (h, rx)
        })
        .collect()
}

/// A holder's answer about `source`'s (this node's) files of `stamp`.
pub fn held(agent: &Agent, from: u32, stamp: Stamp, error: Option<String>) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    match lock(&cluster.replicas.waiting).remove(&(from, stamp)) {
        Some(tx) => {
            let _ = tx.send(error.map_or(Ok(()), Err));
        }
        None => log!("node {from} holds a copy of stamp {stamp} nobody waits for: ignored"),
    }
}

/// A piece of node `source`'s file for this node's memory store.
#[allow(clippy::too_many_arguments)]
pub fn receive(
    agent: &Agent,
    from: u32,
    source: u32,
    stamp: Stamp,
    index: bool,
    offset: u64,
    total: u64,
    data: &[u8],
) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    let replicas = &cluster.replicas;
    if source != from {
        log!("node {from} sent a piece of node {source}'s checkpoint: ignored (a node sends its own)");
        return;
    }
    let Some(root) = agent.id.mem_store.as_ref() else {
        if index && offset + data.len() as u64 >= total {
            answer(
                agent,
                source,
                stamp,
                Some("this node has no memory store".into()),
            );
        }
        return;
    };
    let key = (source, stamp, index);
    let mut incoming = lock(&replicas.incoming);
    if offset == 0 {
        let dest = if index {
            files::index_file(root, source, stamp)
        } else {
            files::pages_file(root, source, stamp)
        };
        let mut part = dest.clone().into_os_string();
        part.push(".part");
        let part = PathBuf::from(part);
        let opened = std::fs::create_dir_all(files::node_dir(root, source))
            .and_then(|()| File::create(&part));
        match opened {
            Ok(file) => {
                incoming.insert(key, Incoming { file, part, dest });
            }
            Err(e) => {
                lock(&replicas.failed)
                    .entry((source, stamp))
                    .or_insert(format!("cannot create {}: {e}", part.display()));
            }
        }
    }
    if let Some(f) = incoming.get(&key) {
        if let Err(e) = f.file.write_all_at(data, offset) {
            let why = write_error(&f.part, &e);
            lock(&replicas.failed).entry((source, stamp)).or_insert(why);
            if let Some(f) = incoming.remove(&key) {
                let _ = std::fs::remove_file(&f.part);
            }
        }
    }
    if offset + (data.len() as u64) < total {
        return;
    }
    let done = incoming.remove(&key);
    drop(incoming);
    if let Some(f) = done {
        drop(f.file);
        if let Err(e) = std::fs::rename(&f.part, &f.dest) {
            lock(&replicas.failed)
                .entry((source, stamp))
                .or_insert(format!("cannot rename {}: {e}", f.part.display()));
        } else if index {
            match NodeIndex::load(&f.dest) {
                Ok(i) if i.node == source && i.stamp == stamp => {}
                Ok(i) => {
                    lock(&replicas.failed)
                        .entry((source, stamp))
                        .or_insert(format!(
                            "the index received is node {}'s of stamp {}",
                            i.node, i.stamp
                        ));
                }
                Err(e) => {
                    lock(&replicas.failed)
                        .entry((source, stamp))
                        .or_insert(format!("the index received is unreadable: {e}"));
                }
            }
        }
    }
    if index {
        let error = lock(&replicas.failed).remove(&(source, stamp));
        if let Some(e) = &error {
            log!("copy of node {source}'s stamp {stamp} not kept: {e}");
        }
        answer(agent, source, stamp, error);
    }
}

fn answer(agent: &Agent, source: u32, stamp: Stamp, error: Option<String>) {
    if let Some(cluster) = agent.cluster.as_ref() {
        cluster.mesh.send(
            source,
            PeerMsg::StoreHeld {
                source,
                stamp,
                error,
            },
        );
    }
}

/// The disk level: puts `index`'s files (node `node`, stamp `index.stamp`,
/// under `root`) into the disk store `disk`: the index and every pages
/// file it uses that the disk store does not have yet. Returns the bytes
/// copied.
pub fn copy_to_disk(
    root: &Path,
    disk: &Path,
    node: u32,
    index: &NodeIndex,
) -> Result<u64, ReplicateError> {
    let mut copied = 0;
    let mut wanted: Vec<(PathBuf, PathBuf)> = index
        .referenced_files()
        .into_iter()
        .map(|s| {
            (
                files::pages_file(root, node, s),
                files::pages_file(disk, node, s),
            )
        })
        .collect();
    // The index last: once it is there, everything it names is.
    wanted.push((
        files::index_file(root, node, index.stamp),
        files::index_file(disk, node, index.stamp),
    ));
    for (from, to) in wanted {
        let err = |source| ReplicateError::Disk {
            from: from.clone(),
            to: to.clone(),
            source,
        };
        let size = std::fs::metadata(&from).map_err(err)?.len();
        if std::fs::metadata(&to).is_ok_and(|m| m.len() == size) {
            continue;
        }
        std::fs::create_dir_all(files::node_dir(disk, node)).map_err(err)?;
        let mut tmp = to.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::copy(&from, &tmp).map_err(err)?;
        std::fs::rename(&tmp, &to).map_err(err)?;
        copied += size;
    }
    Ok(copied)
}

/// What a failed write into a memory store means: its size limit
/// reached, or the error itself.
fn write_error(path: &Path, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        "its checkpoint memory is full (redundancy.memory_limit)".to_string()
    } else {
        format!("cannot write {}: {e}", path.display())
    }
}

/// Writes `bytes` to `path` in a memory store, whole or not at all (a
/// `.tmp` file renamed), making its directory if needed.
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| write_error(path, &e))
}

/// Removes every file of `stamp` from a memory store (an aborted stamp):
/// node files, copies being received, parity shards. Returns the bytes.
pub fn forget_stamp(root: &Path, stamp: Stamp) -> u64 {
    let prefix = format!("{stamp:08}.");
    let mut freed = 0;
    let dirs = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.ends_with("stamps"));
    for dir in dirs {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(e.path()).is_ok() {
                    freed += len;
                }
            }
        }
    }
    freed
}

/// Commit of a diskless stamp: its manifest goes into the node's memory
/// store (so that the store describes itself, as the disk store does),
/// and the store keeps the `keep` newest committed stamps.
pub fn commit(root: &Path, stamp: Stamp, manifest: &str, keep: u32) -> Result<(), String> {
    write_whole(&files::manifest_file(root, stamp), manifest.as_bytes())?;
    let summary = mome_store::prune_held(root, keep.max(1) as usize)
        .map_err(|e| format!("cannot prune the memory store: {e}"))?;
    let shards = crate::parity::prune(root, &summary.kept);
    if summary.files_removed + shards > 0 {
        log!(
            "memory store: {} file(s) and {shards} parity file(s) of older stamps removed ({} bytes of data freed)",
            summary.files_removed,
            summary.bytes_freed
        );
    }
    Ok(())
}
