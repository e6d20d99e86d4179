//! The stores a job's checkpoint data is in, and which one each node of a
//! stamp is restored from.
//!
//! A multi-node job keeps its checkpoints in memory: each node N has a
//! keeper (`mome-keeper`) holding a private tmpfs, reached through the
//! store path its record `<jobdir>/keepers/node-N.json` gives
//! (`{"node","pid","path","limit","started"}`). Every keeper store has the
//! layout of the on-disk store (`node-K/S.pages`, `node-K/S.index`,
//! `stamps/S.manifest`) but is partial: it holds its own node's files and
//! those of the nodes it keeps copies for. The disk root (`checkpoint.dir`)
//! holds the authoritative manifests, and node files for the stamps that
//! also went to disk (every stamp for a one-node job).
//!
//! [`plan_roots`] picks, for each node of a stamp, the first store whose
//! copy of that node verifies against the manifest ([`verify_node`]): the
//! node's own keeper, then the other keepers by node number, then the disk.
//! A copy that fails is never used, so a node that comes back with stale
//! data (another stamp's or another run's index under the same name)
//! contributes nothing: its index either is absent or does not match the
//! manifest's length and xxh3.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use mome_protocol::ckpt::files;
use mome_protocol::job::JobDir;
use mome_store::{verify_node, Manifest, StoreError, VerifyLevel};
use serde::Deserialize;

/// What a keeper writes in `<jobdir>/keepers/node-N.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeeperRecord {
    pub node: u32,
    pub pid: u32,
    /// The store path: `/proc/<pid>/root/<jobdir>/keepers/node-N`.
    pub path: PathBuf,
    /// Size limit of its tmpfs in bytes, `None` without one.
    pub limit: Option<u64>,
    /// Start time, RFC 3339.
    pub started: String,
}

/// A keeper record that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreachableKeeper {
    /// The node, from the file name.
    pub node: u32,
    /// The record file.
    pub file: PathBuf,
    /// Why: the keeper is gone, its store path cannot be read, or the record
    /// cannot be.
    pub why: String,
}

impl fmt::Display for UnreachableKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} not reachable: {}", keeper_label(self.node), self.why)
    }
}

/// The keeper records of a job, sorted by node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keepers {
    /// Records whose keeper is alive and whose store path is a readable
    /// directory.
    pub live: Vec<KeeperRecord>,
    /// The other records.
    pub unreachable: Vec<UnreachableKeeper>,
}

/// A store that may hold some nodes' files of a stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCandidate {
    /// For people: "memory of node 2", "disk (/path/to/ckpt)".
    pub label: String,
    pub root: PathBuf,
    /// The keeper's node; `None` for the disk.
    pub node: Option<u32>,
}

/// `<jobdir>/keepers`: the keepers' records, sockets and mount points.
pub fn keepers_dir(job: &JobDir) -> PathBuf {
    job.path.join("keepers")
}

/// "memory of node N".
pub fn keeper_label(node: u32) -> String {
    format!("memory of node {node}")
}

/// "disk (<root>)".
pub fn disk_label(root: &Path) -> String {
    format!("disk ({})", root.display())
}

/// The node of a record file name `node-N.json`.
fn node_of_record_name(name: &str) -> Option<u32> {
    let n = name.strip_prefix("node-")?.strip_suffix(".json")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Reads every `<jobdir>/keepers/node-N.json` and sorts the records into
/// live ones (the pid exists and is not a zombie, the store path is a
/// readable directory) and the others. Prints nothing. A job without a
/// keepers directory has no keepers.
pub fn read_keepers(job: &JobDir) -> Keepers {
    let mut out = Keepers::default();
    let dir = keepers_dir(job);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(node) = name.to_str().and_then(node_of_record_name) else {
            continue;
        };
        let file = entry.path();
        match check_record(&file, node) {
            Ok(record) => out.live.push(record),
            Err(why) => out.unreachable.push(UnreachableKeeper { node, file, why }),
        }
    }
    out.live.sort_by_key(|r| r.node);
    out.unreachable.sort_by_key(|u| u.node);
    out
}

/// The record in `file` if its keeper is usable, else why not.
fn check_record(file: &Path, node: u32) -> Result<KeeperRecord, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let record: KeeperRecord = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} does not parse: {e}", file.display()))?;
    if record.node != node {
        return Err(format!(
            "{} is the record of node {}",
            file.display(),
            record.node
        ));
    }
    let pid = i32::try_from(record.pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("{} has pid {}", file.display(), record.pid))?;
    if !crate::os::process_exists(pid) || crate::os::is_zombie(pid) {
        return Err(format!("keeper (pid {pid}) gone"));
    }
    std::fs::read_dir(&record.path).map_err(|e| {
        format!(
            "keeper (pid {pid}) store {} unreadable: {e}",
            record.path.display()
        )
    })?;
    Ok(record)
}

/// The live keepers of a job, by node ([`read_keepers`] without the
/// others).
pub fn live_keepers(job: &JobDir) -> Vec<KeeperRecord> {
    read_keepers(job).live
}

/// The stores of a job in the order [`plan_roots`] takes them: its live
/// keepers by node, then the disk root.
pub fn candidates(job: &JobDir, disk_root: &Path) -> Vec<StoreCandidate> {
    candidates_from(&live_keepers(job), disk_root)
}

/// [`candidates`] from keeper records already read.
pub fn candidates_from(keepers: &[KeeperRecord], disk_root: &Path) -> Vec<StoreCandidate> {
    let mut out: Vec<StoreCandidate> = keepers
        .iter()
        .map(|k| StoreCandidate {
            label: keeper_label(k.node),
            root: k.path.clone(),
            node: Some(k.node),
        })
        .collect();
    out.sort_by_key(|c| c.node);
    out.push(StoreCandidate {
        label: disk_label(disk_root),
        root: disk_root.to_path_buf(),
        node: None,
    });
    out
}

/// For each node of the stamp `manifest` describes, the store to restore
/// it from, as (root, label), index = node. Per node the candidates are
/// tried in this order: the node's own keeper, the other keepers by
/// ascending node, the stores without a node (the disk) in the given
/// order; the first whose copy passes [`verify_node`] at `level` is taken.
///
/// When some node has no good copy, the error has one clause per such
/// node, naming every store tried and why it failed, e.g. `node 1: memory
/// of node 1 not reachable (no live keeper); memory of node 2: index of
/// stamp 5 missing; disk (/ckpt): no files of node 1` (clauses of several
/// nodes are separated by `. `).
pub fn plan_roots(
    manifest: &Manifest,
    candidates: &[StoreCandidate],
    level: VerifyLevel,
) -> Result<Vec<(PathBuf, String)>, String> {
    let listed: BTreeSet<u32> = manifest.indexes.iter().map(|i| i.node).collect();
    if listed != (0..manifest.nodes).collect::<BTreeSet<u32>>()
        || manifest.indexes.len() != manifest.nodes as usize
    {
        return Err(format!(
            "manifest lists indexes for nodes {:?}, expected one for each of 0..{}",
            manifest.indexes.iter().map(|i| i.node).collect::<Vec<_>>(),
            manifest.nodes
        ));
    }
    let has_keepers = candidates.iter().any(|c| c.node.is_some());
    // With Full, every node is first checked Quick (cheap) so that a stamp
    // some node cannot have is rejected without reading the others' data;
    // then the Quick survivors are read in full, in the same order.
    let quick: Vec<Vec<(&StoreCandidate, Result<(), String>)>> = (0..manifest.nodes)
        .map(|node| {
            order(candidates, node)
                .into_iter()
                .map(|c| (c, check(c, manifest, node, VerifyLevel::Quick)))
                .collect()
        })
        .collect();
    let lacking = |outcomes: &[(&StoreCandidate, Result<(), String>)]| {
        outcomes.iter().all(|(_, r)| r.is_err())
    };
    let outcomes = if level == VerifyLevel::Full && !quick.iter().any(|o| lacking(o)) {
        quick
            .into_iter()
            .enumerate()
            .map(|(node, outcomes)| {
                let mut found = false;
                outcomes
                    .into_iter()
                    .map(|(c, r)| {
                        let r = match r {
                            Ok(()) if !found => check(c, manifest, node as u32, level),
                            other => other,
                        };
                        found |= r.is_ok();
                        (c, r)
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    } else {
        quick
    };

    let mut roots = Vec::new();
    let mut missing = Vec::new();
    for (node, outcomes) in outcomes.iter().enumerate() {
        let node = node as u32;
        if let Some((c, _)) = outcomes.iter().find(|(_, r)| r.is_ok()) {
            roots.push((c.root.clone(), c.label.clone()));
            continue;
        }
        let mut tried = Vec::new();
        if has_keepers && !candidates.iter().any(|c| c.node == Some(node)) {
            tried.push(format!(
                "{} not reachable (no live keeper)",
                keeper_label(node)
            ));
        }
        for (c, r) in outcomes {
            if let Err(why) = r {
                tried.push(format!("{}: {why}", c.label));
            }
        }
        if tried.is_empty() {
            tried.push("no store to look in".to_string());
        }
        missing.push(format!("node {node}: {}", tried.join("; ")));
    }
    if missing.is_empty() {
        Ok(roots)
    } else {
        Err(missing.join(". "))
    }
}

/// The candidates in the order they are tried for `node`.
fn order(candidates: &[StoreCandidate], node: u32) -> Vec<&StoreCandidate> {
    let own = candidates.iter().filter(|c| c.node == Some(node));
    let mut others: Vec<&StoreCandidate> = candidates
        .iter()
        .filter(|c| c.node.is_some_and(|n| n != node))
        .collect();
    others.sort_by_key(|c| c.node);
    let disk = candidates.iter().filter(|c| c.node.is_none());
    own.chain(others).chain(disk).collect()
}

/// Whether `c` holds a good copy of `node`'s share of the stamp; if not,
/// why, in words (paths relative to the store).
fn check(
    c: &StoreCandidate,
    manifest: &Manifest,
    node: u32,
    level: VerifyLevel,
) -> Result<(), String> {
    if let Err(e) = std::fs::read_dir(&c.root) {
        return Err(format!("not reachable ({}: {e})", c.root.display()));
    }
    match verify_node(&c.root, manifest, node, level) {
        Ok(_) => Ok(()),
        Err(_) if !files::node_dir(&c.root, node).is_dir() => {
            Err(format!("no files of node {node}"))
        }
        // The only file whose absence verify_node reports as not found.
        Err(e) if e.is_not_found() => Err(format!("index of stamp {} missing", manifest.stamp)),
        Err(e) => Err(describe(&e, &c.root)),
    }
}

/// A store error with its path relative to the store root.
fn describe(e: &StoreError, root: &Path) -> String {
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    match e {
        StoreError::Io { op, path, source } => format!("{op} {}: {source}", rel(path)),
        StoreError::Corrupt { path, detail } => format!("{}: {detail}", rel(path)),
        StoreError::CorruptBlock {
            path,
            offset,
            clen,
            npages,
            detail,
        } => format!(
            "{}: block at offset {offset} ({clen} bytes, {npages} pages): {detail}",
            rel(path)
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mome_store::{commit_manifest, write_increment, IncrementInput, IndexRef, Stamp};

    /// Writes node `node`'s full increment of `stamp` into `root`: pages
    /// 0..20 filled with `fill` (non-zero). Returns its IndexRef.
    pub(crate) fn write_node(root: &Path, node: u32, stamp: Stamp, fill: u8) -> IndexRef {
        let page = vec![fill | 1; mome_store::PAGE_SIZE];
        let (_, summary) = write_increment(
            IncrementInput {
                root,
                node,
                stamp,
                base: None,
                removed: &[],
                tables: vec![],
                images: vec![],
                fsync: false,
            },
            (0..20u64).map(|p| (p, &page[..])),
            &mut |_| {},
        )
        .unwrap();
        summary.index
    }

    pub(crate) fn manifest(
        stamp: Stamp,
        binary: &Path,
        binary_xxh3: u64,
        indexes: Vec<IndexRef>,
    ) -> Manifest {
        Manifest {
            stamp,
            job_id: "j".into(),
            incarnation: 0,
            created: "2024-01-01T00:00:00Z".into(),
            nranks: indexes.len() as u32,
            nodes: indexes.len() as u32,
            binary: binary.to_path_buf(),
            binary_xxh3,
            parent: None,
            indexes,
            pause_us: 1,
            commit_ms: 1,
            bytes_written: 0,
            pages: 0,
            image_bytes: 0,
        }
    }

    /// Writes `stamp` of `nodes` nodes: node n's files into the stores
    /// `holders[n]` (several stores may hold a node), the manifest into
    /// `disk` and every store.
    pub(crate) fn write_stamp(
        disk: &Path,
        stores: &[&Path],
        stamp: Stamp,
        holders: &[&[&Path]],
    ) -> Manifest {
        let mut irefs = Vec::new();
        for (node, roots) in holders.iter().enumerate() {
            let node = node as u32;
            // The same bytes in every holder: one iref.
            let mut iref = None;
            for root in *roots {
                let r = write_node(root, node, stamp, stamp as u8 * 8 + node as u8);
                if let Some(prev) = &iref {
                    assert_eq!(prev, &r);
                }
                iref = Some(r);
            }
            irefs.push(iref.unwrap_or_else(|| {
                // Held nowhere: write it somewhere else for its iref.
                let tmp = tempfile::tempdir().unwrap();
                write_node(tmp.path(), node, stamp, stamp as u8 * 8 + node as u8)
            }));
        }
        let m = manifest(stamp, Path::new("/bin/true"), 1, irefs);
        commit_manifest(disk, &m, false).unwrap();
        for s in stores {
            commit_manifest(s, &m, false).unwrap();
        }
        m
    }

    pub(crate) fn keeper(node: u32, root: &Path) -> StoreCandidate {
        StoreCandidate {
            label: keeper_label(node),
            root: root.to_path_buf(),
            node: Some(node),
        }
    }

    pub(crate) fn disk(root: &Path) -> StoreCandidate {
        StoreCandidate {
            label: disk_label(root),
            root: root.to_path_buf(),
            node: None,
        }
    }

    struct Stores {
        _dir: tempfile::TempDir,
        disk: PathBuf,
        k: Vec<PathBuf>,
    }

    fn stores(keepers: usize) -> Stores {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("ckpt");
        std::fs::create_dir(&disk).unwrap();
        let k = (0..keepers)
            .map(|n| {
                let p = dir.path().join(format!("keeper-{n}"));
                std::fs::create_dir(&p).unwrap();
                p
            })
            .collect();
        Stores { _dir: dir, disk, k }
    }

    #[test]
    fn two_partial_stores_each_give_their_nodes() {
        let s = stores(2);
        let (k0, k1) = (s.k[0].as_path(), s.k[1].as_path());
        // Node 0 in the memory of node 0 only, node 1 in node 1's only.
        let m = write_stamp(&s.disk, &[k0, k1], 3, &[&[k0], &[k1]]);
        let cands = vec![keeper(0, k0), keeper(1, k1), disk(&s.disk)];
        for level in [VerifyLevel::Quick, VerifyLevel::Full] {
            let roots = plan_roots(&m, &cands, level).unwrap();
            assert_eq!(
                roots,
                vec![
                    (k0.to_path_buf(), "memory of node 0".to_string()),
                    (k1.to_path_buf(), "memory of node 1".to_string())
                ]
            );
        }
        // Crossed: node 0's memory holds node 1 and the reverse; each node
        // still finds its copy, in the other keeper.
        let m = write_stamp(&s.disk, &[k0, k1], 4, &[&[k1], &[k0]]);
        let roots = plan_roots(&m, &cands, VerifyLevel::Full).unwrap();
        assert_eq!(roots[0].0, k1);
        assert_eq!(roots[1].0, k0);
        // Own keeper first, then the others by node, then the disk.
        let m = write_stamp(
            &s.disk,
            &[k0, k1],
            5,
            &[&[k0, k1, &s.disk], &[k0, k1, &s.disk]],
        );
        let shuffled = vec![disk(&s.disk), keeper(1, k1), keeper(0, k0)];
        let roots = plan_roots(&m, &shuffled, VerifyLevel::Quick).unwrap();
        assert_eq!(roots[0].0, k0);
        assert_eq!(roots[1].0, k1);
        let roots = plan_roots(&m, &[disk(&s.disk)], VerifyLevel::Quick).unwrap();
        assert_eq!(roots[1], (s.disk.clone(), disk_label(&s.disk)));
    }

    #[test]
    fn a_stale_copy_is_skipped_for_a_good_one() {
        let s = stores(3);
        let (k0, k1, k2) = (s.k[0].as_path(), s.k[1].as_path(), s.k[2].as_path());
        let m = write_stamp(&s.disk, &[k0, k1, k2], 5, &[&[k0], &[k2], &[k2]]);
        // Node 1 came back with another run's stamp 5 in its memory.
        let stale = write_node(k1, 1, 5, 0x55);
        assert_ne!(stale.xxh3, m.indexes[1].xxh3);
        let cands = vec![keeper(0, k0), keeper(1, k1), keeper(2, k2), disk(&s.disk)];
        for level in [VerifyLevel::Quick, VerifyLevel::Full] {
            let roots = plan_roots(&m, &cands, level).unwrap();
            assert_eq!(roots[1], (k2.to_path_buf(), "memory of node 2".into()));
        }
        // Without the good copy, the reason names the mismatch.
        let why = plan_roots(&m, &cands[..2], VerifyLevel::Quick).unwrap_err();
        assert!(
            why.starts_with("node 1: memory of node 1: node-1/00000005.index: "),
            "{why}"
        );
        assert!(why.contains("manifest says"), "{why}");
        // Damaged data in the own copy: Quick takes it, Full goes on to the
        // next good copy.
        let pages = files::pages_file(k0, 0, 5);
        let mut bytes = std::fs::read(&pages).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x11;
        std::fs::write(&pages, &bytes).unwrap();
        write_node(&s.disk, 0, 5, 5 * 8);
        let roots = plan_roots(&m, &cands, VerifyLevel::Quick).unwrap();
        assert_eq!(roots[0].0, k0);
        let roots = plan_roots(&m, &cands, VerifyLevel::Full).unwrap();
        assert_eq!(roots[0].0, s.disk);
    }

    #[test]
    fn a_node_without_a_copy_is_named_with_every_store_tried() {
        let s = stores(3);
        let (k0, k2) = (s.k[0].as_path(), s.k[2].as_path());
        // Node 1's keeper is gone; node 2 holds files of node 1, but not
        // of stamp 5; the disk has none of node 1.
        let _ = write_stamp(&s.disk, &[k0, k2], 4, &[&[k0], &[k2], &[k2]]);
        let m = write_stamp(&s.disk, &[k0, k2], 5, &[&[k0], &[], &[k2]]);
        let cands = vec![keeper(0, k0), keeper(2, k2), disk(&s.disk)];
        let why = plan_roots(&m, &cands, VerifyLevel::Full).unwrap_err();
        assert_eq!(
            why,
            format!(
                "node 1: memory of node 1 not reachable (no live keeper); \
                 memory of node 0: no files of node 1; \
                 memory of node 2: index of stamp 5 missing; \
                 disk ({}): no files of node 1",
                s.disk.display()
            )
        );
        // Two nodes without a copy: one clause each.
        let why = plan_roots(&m, &[disk(&s.disk)], VerifyLevel::Quick).unwrap_err();
        let d = s.disk.display();
        assert_eq!(
            why,
            format!(
                "node 0: disk ({d}): no files of node 0. node 1: disk ({d}): no files of node 1. \
                 node 2: disk ({d}): no files of node 2"
            )
        );
        // A store that went away meanwhile.
        let gone = s.disk.join("gone");
        let why = plan_roots(
            &m,
            &[keeper(0, k0), keeper(1, &gone), keeper(2, k2)],
            VerifyLevel::Quick,
        )
        .unwrap_err();
        assert!(
            why.starts_with("node 1: memory of node 1: not reachable ("),
            "{why}"
        );
        // A manifest that does not list every node.
        let mut bad = m.clone();
        bad.indexes.pop();
        let why = plan_roots(&bad, &cands, VerifyLevel::Quick).unwrap_err();
        assert!(why.contains("expected one for each of 0..3"), "{why}");
    }

    #[test]
    fn keeper_records() {
        let home = tempfile::tempdir().unwrap();
        let job = crate::jobdir::create_job_dir(home.path()).unwrap();
        assert_eq!(read_keepers(&job), Keepers::default());
        let dir = keepers_dir(&job);
        std::fs::create_dir_all(&dir).unwrap();
        let store = home.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let me = std::process::id();
        let record = |node: u32, pid: u32, path: &Path| {
            serde_json::json!({
                "node": node, "pid": pid, "path": path,
                "limit": null, "started": "2024-01-01T00:00:00Z",
            })
            .to_string()
        };
        std::fs::write(dir.join("node-2.json"), record(2, me, &store)).unwrap();
        std::fs::write(dir.join("node-0.json"), record(0, me, &store)).unwrap();
        // A pid that does not exist (above pid_max).
        std::fs::write(dir.join("node-1.json"), record(1, 1 << 30, &store)).unwrap();
        std::fs::write(
            dir.join("node-3.json"),
            record(3, me, &home.path().join("nope")),
        )
        .unwrap();
        std::fs::write(dir.join("node-4.json"), record(5, me, &store)).unwrap();
        std::fs::write(dir.join("node-6.json"), "{").unwrap();
        std::fs::write(dir.join("node-7.json.tmp"), "{").unwrap();
        std::fs::create_dir(dir.join("node-7")).unwrap();
        let k = read_keepers(&job);
        assert_eq!(
            k.live.iter().map(|r| r.node).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(k.live[0].path, store);
        assert_eq!(k.live[0].pid, me);
        let un: Vec<(u32, &str)> = k
            .unreachable
            .iter()
            .map(|u| (u.node, u.why.as_str()))
            .collect();
        assert_eq!(un.len(), 4, "{un:?}");
        assert_eq!(un[0], (1, "keeper (pid 1073741824) gone"));
        assert_eq!(
            k.unreachable[0].to_string(),
            "memory of node 1 not reachable: keeper (pid 1073741824) gone"
        );
        assert!(un[1].0 == 3 && un[1].1.contains("unreadable"), "{un:?}");
        assert!(
            un[2].0 == 4 && un[2].1.contains("record of node 5"),
            "{un:?}"
        );
        assert!(un[3].0 == 6 && un[3].1.contains("does not parse"), "{un:?}");
        let disk_root = home.path().join("ckpt");
        assert_eq!(
            candidates(&job, &disk_root),
            vec![keeper(0, &store), keeper(2, &store), disk(&disk_root)]
        );
    }
}
