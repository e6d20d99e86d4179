//! What mome-restart decides before the job runs again: that the job is
//! not running, which committed stamp to restore (newest first, each
//! verified, the rejected ones with their reason), and that the program is
//! still the one checkpointed. Running the job is the coordinator's, with
//! [`RestartFrom`].
//!
//! The committed stamps are those with a manifest in the disk root
//! (`checkpoint.dir`). A stamp is usable when every node of it has a good
//! copy in some store: the memory of a live keeper or the disk
//! ([`crate::stores::plan_roots`]); [`node_roots`] gives the store each node
//! restores from. A one-node job has no keepers: its only store is the disk
//! root, as before.

use std::path::{Path, PathBuf};

use mome_protocol::ckpt::Stamp;
use mome_protocol::job::{JobDir, JobError, JobSpec, JobState};
use mome_store::{StoreError, VerifyLevel};

use crate::coordinator::{store_root, RestartFrom};
use crate::stores::{self, StoreCandidate};

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("job {id} is still running (mome-run pid {pid}); stop it before restarting it")]
    Running { id: String, pid: i32 },
    #[error("job {id} is still running (its control socket {socket} answers)")]
    Answering { id: String, socket: PathBuf },
    #[error("cannot list the checkpoints of job {id} in {root}: {source}")]
    List {
        id: String,
        root: PathBuf,
        source: StoreError,
    },
    #[error("job {id} has no committed checkpoint in {root}")]
    NoCheckpoint { id: String, root: PathBuf },
    #[error("stamp {stamp} does not exist in {root} (committed: {committed})")]
    NoSuchStamp {
        stamp: Stamp,
        root: PathBuf,
        committed: String,
    },
    #[error("no usable checkpoint of job {id} in {root}: every committed stamp was rejected")]
    NoneUsable { id: String, root: PathBuf },
    #[error("stamp {stamp} cannot be used: {reason}")]
    Rejected { stamp: Stamp, reason: String },
    #[error("binary {path} changed since stamp {stamp} (its xxh3 is {now:016x}, the checkpoint's {then:016x}); restart with the program that was checkpointed")]
    BinaryChanged {
        path: PathBuf,
        stamp: Stamp,
        now: u64,
        then: u64,
    },
    #[error("binary {path} of stamp {stamp} cannot be read: {source}")]
    BinaryUnreadable {
        path: PathBuf,
        stamp: Stamp,
        source: std::io::Error,
    },
}

impl RestartError {
    /// 3 when there is nothing to restart from, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RestartError::NoCheckpoint { .. }
            | RestartError::NoSuchStamp { .. }
            | RestartError::NoneUsable { .. }
            | RestartError::Rejected { .. } => 3,
            _ => 1,
        }
    }
}

/// How the stamp was chosen, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub stamp: Stamp,
    /// Newer stamps that were rejected, newest first, with why.
    pub rejected: Vec<(Stamp, String)>,
}

/// Chooses the stamp among `committed` (ascending): `wanted` if given (it
/// must exist and pass `check`), else the newest that passes `check`.
pub fn choose_stamp(
    committed: &[Stamp],
    wanted: Option<Stamp>,
    check: &mut dyn FnMut(Stamp) -> Result<(), String>,
) -> Result<Choice, ChoiceError> {
    if committed.is_empty() {
        return Err(ChoiceError::Empty);
    }
    if let Some(stamp) = wanted {
        if !committed.contains(&stamp) {
            return Err(ChoiceError::Missing(stamp));
        }
        return match check(stamp) {
            Ok(()) => Ok(Choice {
                stamp,
                rejected: Vec::new(),
            }),
            Err(reason) => Err(ChoiceError::Rejected(stamp, reason)),
        };
    }
    let mut rejected = Vec::new();
    for &stamp in committed.iter().rev() {
        match check(stamp) {
            Ok(()) => return Ok(Choice { stamp, rejected }),
            Err(reason) => rejected.push((stamp, reason)),
        }
    }
    Err(ChoiceError::AllRejected(rejected))
}

/// Why [`choose_stamp`] found nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChoiceError {
    Empty,
    Missing(Stamp),
    Rejected(Stamp, String),
    AllRejected(Vec<(Stamp, String)>),
}

/// Refuses a job whose coordinator is alive (its pid is a mome-run or
/// mome-restart, or its control socket answers); removes a stale socket.
pub fn check_not_running(job: &JobDir) -> Result<(), RestartError> {
    if let Ok(status) = job.read_status() {
        if matches!(status.state, JobState::Starting | JobState::Running)
            && crate::status::coordinator_alive(status.coordinator_pid)
        {
            return Err(RestartError::Running {
                id: job.id.clone(),
                pid: status.coordinator_pid,
            });
        }
    }
    let socket = job.control_socket();
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(RestartError::Answering {
                id: job.id.clone(),
                socket,
            });
        }
        // Left by a mome-run that died: nobody listens.
        let _ = std::fs::remove_file(&socket);
    }
    Ok(())
}

/// Everything mome-restart checks, in order; prints the rejected stamps on
/// `say`. Returns what the coordinator needs.
pub fn plan(
    home: &Path,
    id: &str,
    wanted: Option<Stamp>,
    level: VerifyLevel,
    say: &mut dyn FnMut(String),
) -> Result<RestartFrom, RestartError> {
    plan_with_roots(home, id, wanted, level, say).map(|(from, _)| from)
}

/// [`plan`], and for each node of the chosen stamp (index = node) the
/// store it restores from and that store's label ("memory of node 2",
/// "disk (<path>)"), as [`stores::plan_roots`] chose them while checking
/// the stamp: what [`node_roots`] would give, without verifying again.
pub fn plan_with_roots(
    home: &Path,
    id: &str,
    wanted: Option<Stamp>,
    level: VerifyLevel,
    say: &mut dyn FnMut(String),
) -> Result<(RestartFrom, Vec<(PathBuf, String)>), RestartError> {
    let job = JobDir::open(home, id)?;
    let spec: JobSpec = job.read_spec()?;
    check_not_running(&job)?;
    let root = store_root(&spec.config, &job, &spec.cwd);
    let committed = mome_store::list_committed(&root).or_else(|e| {
        if e.is_not_found() {
            Ok(Vec::new())
        } else {
            Err(RestartError::List {
                id: id.to_string(),
                root: root.clone(),
                source: e,
            })
        }
    })?;
    let keepers = stores::read_keepers(&job);
    let candidates = stores::candidates_from(&keepers.live, &root);
    // The roots of the stamp last found usable: the chosen one.
    let mut usable: Option<(Stamp, Vec<(PathBuf, String)>)> = None;
    let mut check = |stamp: Stamp| {
        let roots = match stamp_roots(&root, stamp, &candidates, level) {
            Ok(roots) => roots,
            Err(reason) => {
                // Parity schemes: a lost member's data is decoded from the
                // others' and their shards.
                let decoded = crate::parity::decode_lost(
                    &job.id,
                    &spec.config.redundancy,
                    spec.nodes,
                    stamp,
                    &candidates,
                )
                .map_err(|e| format!("{reason}. {e}"))?;
                if decoded.is_empty() {
                    return Err(reason);
                }
                let mut all = candidates.clone();
                all.extend(decoded);
                stamp_roots(&root, stamp, &all, level)?
            }
        };
        usable = Some((stamp, roots));
        Ok(())
    };
    // Why some memory was not looked at: said once, before the reasons of
    // the rejected stamps.
    let unreachable: Vec<String> = keepers
        .unreachable
        .iter()
        .map(|k| format!("mome: {k}"))
        .collect();
    let say_rejected = |rejected: &[(Stamp, String)], say: &mut dyn FnMut(String)| {
        if !rejected.is_empty() {
            unreachable.iter().for_each(|line| say(line.clone()));
        }
        for (stamp, reason) in rejected {
            say(format!("mome: stamp {stamp} rejected: {reason}"));
        }
    };
    let choice = choose_stamp(&committed, wanted, &mut check).map_err(|e| match e {
        ChoiceError::Empty => RestartError::NoCheckpoint {
            id: id.to_string(),
            root: root.clone(),
        },
        ChoiceError::Missing(stamp) => RestartError::NoSuchStamp {
            stamp,
            root: root.clone(),
            committed: committed
                .iter()
                .map(Stamp::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        },
        ChoiceError::Rejected(stamp, reason) => {
            unreachable.iter().for_each(|line| say(line.clone()));
            RestartError::Rejected { stamp, reason }
        }
        ChoiceError::AllRejected(rejected) => {
            say_rejected(&rejected, say);
            RestartError::NoneUsable {
                id: id.to_string(),
                root: root.clone(),
            }
        }
    })?;
    say_rejected(&choice.rejected, say);
    let roots = match usable {
        Some((stamp, roots)) if stamp == choice.stamp => roots,
        _ => stamp_roots(&root, choice.stamp, &candidates, level).map_err(|reason| {
            RestartError::Rejected {
                stamp: choice.stamp,
                reason,
            }
        })?,
    };
    let manifest =
        mome_store::read_manifest(&root, choice.stamp).map_err(|e| RestartError::Rejected {
            stamp: choice.stamp,
            reason: e.to_string(),
        })?;
    let now = crate::checkpoint::file_xxh3(&manifest.binary).map_err(|source| {
        RestartError::BinaryUnreadable {
            path: manifest.binary.clone(),
            stamp: choice.stamp,
            source,
        }
    })?;
    if now != manifest.binary_xxh3 {
        return Err(RestartError::BinaryChanged {
            path: manifest.binary,
            stamp: choice.stamp,
            now,
            then: manifest.binary_xxh3,
        });
    }
    Ok((
        RestartFrom {
            job,
            spec,
            stamp: choice.stamp,
            root,
        },
        roots,
    ))
}

/// The store each node of committed stamp `stamp` restores from (index =
/// node): the job's live keepers and its disk root, each node's copy
/// verified at `level` ([`stores::plan_roots`]). For a one-node job (no
/// keepers) it is `[disk root]` once the stamp verifies. The error is
/// [`RestartError::Rejected`] with the reason (per node, every store tried).
pub fn node_roots(
    job: &JobDir,
    spec: &JobSpec,
    stamp: Stamp,
    level: VerifyLevel,
) -> Result<Vec<PathBuf>, RestartError> {
    let root = store_root(&spec.config, job, &spec.cwd);
    let candidates = stores::candidates(job, &root);
    stamp_roots(&root, stamp, &candidates, level)
        .map(|roots| roots.into_iter().map(|(root, _)| root).collect())
        .map_err(|reason| RestartError::Rejected { stamp, reason })
}

/// The per-node roots of `stamp`, whose manifest is read from the disk
/// root `root` (the authoritative one), or why there are none.
fn stamp_roots(
    root: &Path,
    stamp: Stamp,
    candidates: &[StoreCandidate],
    level: VerifyLevel,
) -> Result<Vec<(PathBuf, String)>, String> {
    let manifest = mome_store::read_manifest(root, stamp).map_err(|e| e.to_string())?;
    stores::plan_roots(&manifest, candidates, level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_usable_stamp_with_the_reasons_of_the_others() {
        let mut check = |s: Stamp| {
            if s >= 4 {
                Err(format!("index of {s} is corrupt"))
            } else {
                Ok(())
            }
        };
        let choice = choose_stamp(&[1, 3, 4, 5], None, &mut check).unwrap();
        assert_eq!(choice.stamp, 3);
        assert_eq!(
            choice.rejected,
            vec![
                (5, "index of 5 is corrupt".to_string()),
                (4, "index of 4 is corrupt".to_string())
            ]
        );
        assert_eq!(choose_stamp(&[], None, &mut check), Err(ChoiceError::Empty));
        assert_eq!(
            choose_stamp(&[1, 3], Some(2), &mut check),
            Err(ChoiceError::Missing(2))
        );
        assert_eq!(
            choose_stamp(&[1, 4], Some(4), &mut check),
            Err(ChoiceError::Rejected(4, "index of 4 is corrupt".into()))
        );
        assert_eq!(choose_stamp(&[1, 4], Some(1), &mut check).unwrap().stamp, 1);
        assert!(matches!(
            choose_stamp(&[4, 5], None, &mut check),
            Err(ChoiceError::AllRejected(r)) if r.len() == 2
        ));
    }

    #[test]
    fn nothing_to_restart_from() {
        let home = tempfile::tempdir().unwrap();
        let job = crate::jobdir::create_job_dir(home.path()).unwrap();
        let spec = JobSpec {
            id: job.id.clone(),
            command: "/bin/true".into(),
            argv: vec!["true".into()],
            cwd: "/".into(),
            ranks: 1,
            nodes: 1,
            ..Default::default()
        };
        job.write_spec(&spec).unwrap();
        let e = plan(home.path(), &job.id, None, VerifyLevel::Quick, &mut |_| {}).unwrap_err();
        assert!(matches!(e, RestartError::NoCheckpoint { .. }), "{e}");
        assert_eq!(e.exit_code(), 3);
        let e = plan(home.path(), "nope", None, VerifyLevel::Quick, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    /// A job of `nodes` nodes in a fresh home, with a small "binary".
    fn job_of(nodes: u32) -> (tempfile::TempDir, JobDir, JobSpec, PathBuf, u64) {
        let home = tempfile::tempdir().unwrap();
        let job = crate::jobdir::create_job_dir(home.path()).unwrap();
        let binary = home.path().join("app");
        std::fs::write(&binary, b"not really a program").unwrap();
        let sum = crate::checkpoint::file_xxh3(&binary).unwrap();
        let spec = JobSpec {
            id: job.id.clone(),
            command: binary.clone(),
            argv: vec!["app".into()],
            cwd: "/".into(),
            ranks: nodes,
            nodes,
            ..Default::default()
        };
        job.write_spec(&spec).unwrap();
        (home, job, spec, binary, sum)
    }

    fn keeper_record(job: &JobDir, node: u32, pid: u32, path: &Path) {
        let dir = stores::keepers_dir(job);
        std::fs::create_dir_all(&dir).unwrap();
        let record = serde_json::json!({
            "node": node, "pid": pid, "path": path,
            "limit": null, "started": "2024-01-01T00:00:00Z",
        });
        std::fs::write(dir.join(format!("node-{node}.json")), record.to_string()).unwrap();
    }

    /// Commits `stamp` in `disk` (and `stores`) with node n's files written
    /// into `holders[n]`.
    fn commit(
        disk: &Path,
        stores: &[&Path],
        stamp: Stamp,
        holders: &[&[&Path]],
        binary: &Path,
        sum: u64,
    ) {
        use crate::stores::tests::write_node;
        let irefs = holders
            .iter()
            .enumerate()
            .map(|(node, roots)| {
                let fill = stamp as u8 * 8 + node as u8;
                let mut iref = None;
                for root in *roots {
                    iref = Some(write_node(root, node as u32, stamp, fill));
                }
                iref.unwrap()
            })
            .collect();
        let m = crate::stores::tests::manifest(stamp, binary, sum, irefs);
        for root in std::iter::once(&disk).chain(stores) {
            mome_store::commit_manifest(root, &m, false).unwrap();
        }
    }

    #[test]
    fn one_node_job_restarts_from_its_disk_as_before() {
        let (home, job, spec, binary, sum) = job_of(1);
        let disk = store_root(&spec.config, &job, &spec.cwd);
        commit(&disk, &[], 1, &[&[&disk]], &binary, sum);
        commit(&disk, &[], 2, &[&[&disk]], &binary, sum);
        let mut said = Vec::new();
        let (from, roots) =
            plan_with_roots(home.path(), &job.id, None, VerifyLevel::Full, &mut |l| {
                said.push(l)
            })
            .unwrap();
        assert_eq!((from.stamp, &from.root), (2, &disk));
        assert_eq!(roots, vec![(disk.clone(), stores::disk_label(&disk))]);
        assert!(said.is_empty(), "{said:?}");
        assert_eq!(
            node_roots(&job, &spec, 1, VerifyLevel::Quick).unwrap(),
            vec![disk.clone()]
        );

        // A damaged newest stamp: the older one, and why.
        let index = mome_protocol::ckpt::files::index_file(&disk, 0, 2);
        let mut bytes = std::fs::read(&index).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&index, bytes).unwrap();
        let from = plan(home.path(), &job.id, None, VerifyLevel::Quick, &mut |l| {
            said.push(l)
        })
        .unwrap();
        assert_eq!(from.stamp, 1);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with(&format!("mome: stamp 2 rejected: node 0: disk ({}): node-0/00000002.index: node 0 index xxh3 mismatch", disk.display())),
            "{said:?}"
        );
        let e = node_roots(&job, &spec, 2, VerifyLevel::Quick).unwrap_err();
        assert!(matches!(e, RestartError::Rejected { stamp: 2, .. }), "{e}");
        // A program that changed since.
        std::fs::write(&binary, b"another program").unwrap();
        let e = plan(home.path(), &job.id, None, VerifyLevel::Quick, &mut |_| {}).unwrap_err();
        assert!(
            matches!(e, RestartError::BinaryChanged { stamp: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn newest_stamp_without_a_copy_of_a_node_gives_way_to_an_older_one() {
        let (home, job, spec, binary, sum) = job_of(2);
        let disk = store_root(&spec.config, &job, &spec.cwd);
        let k0 = home.path().join("memory-0");
        let k1 = home.path().join("memory-1");
        std::fs::create_dir_all(&k0).unwrap();
        std::fs::create_dir_all(&k1).unwrap();
        let (k0, k1) = (k0.as_path(), k1.as_path());
        // Stamp 1: node 0 on disk (a disk-level stamp), node 1 in the
        // memory of node 0 (a copy). Stamp 2: node 0 in its memory, node 1
        // in its memory only.
        commit(&disk, &[k0, k1], 1, &[&[&disk], &[k0]], &binary, sum);
        commit(&disk, &[k0, k1], 2, &[&[k0], &[k1]], &binary, sum);
        keeper_record(&job, 0, std::process::id(), k0);
        keeper_record(&job, 1, std::process::id(), k1);
        let (from, roots) =
            plan_with_roots(home.path(), &job.id, None, VerifyLevel::Full, &mut |l| {
                panic!("said {l}")
            })
            .unwrap();
        assert_eq!(from.stamp, 2);
        assert_eq!(
            roots,
            vec![
                (k0.to_path_buf(), "memory of node 0".to_string()),
                (k1.to_path_buf(), "memory of node 1".to_string())
            ]
        );

        // Node 1 fails: its keeper is gone with its memory.
        keeper_record(&job, 1, 1 << 30, k1);
        let mut said = Vec::new();
        let (from, roots) =
            plan_with_roots(home.path(), &job.id, None, VerifyLevel::Quick, &mut |l| {
                said.push(l)
            })
            .unwrap();
        assert_eq!(from.stamp, 1);
        assert_eq!(
            roots,
            vec![
                (disk.clone(), stores::disk_label(&disk)),
                (k0.to_path_buf(), "memory of node 0".to_string())
            ]
        );
        let reason = format!(
            "node 1: memory of node 1 not reachable (no live keeper); \
             memory of node 0: index of stamp 2 missing; \
             disk ({}): no files of node 1",
            disk.display()
        );
        assert_eq!(
            said,
            vec![
                "mome: memory of node 1 not reachable: keeper (pid 1073741824) gone".to_string(),
                format!("mome: stamp 2 rejected: {reason}"),
            ]
        );
        assert_eq!(
            node_roots(&job, &spec, 1, VerifyLevel::Full).unwrap(),
            vec![disk.clone(), k0.to_path_buf()]
        );
        match node_roots(&job, &spec, 2, VerifyLevel::Quick).unwrap_err() {
            RestartError::Rejected {
                stamp: 2,
                reason: r,
            } => assert_eq!(r, reason),
            e => panic!("{e}"),
        }
        // Asked for stamp 2 exactly: refused with the reason.
        let mut said = Vec::new();
        let e = plan(
            home.path(),
            &job.id,
            Some(2),
            VerifyLevel::Quick,
            &mut |l| said.push(l),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), format!("stamp 2 cannot be used: {reason}"));
        assert_eq!(e.exit_code(), 3);
        assert_eq!(said.len(), 1, "{said:?}");

        // Node 0's memory goes too: nothing holds node 1 any more.
        keeper_record(&job, 0, 1 << 30, k0);
        let mut said = Vec::new();
        let e = plan(home.path(), &job.id, None, VerifyLevel::Quick, &mut |l| {
            said.push(l)
        })
        .unwrap_err();
        assert!(matches!(e, RestartError::NoneUsable { .. }), "{e}");
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(
            said[3].starts_with("mome: stamp 1 rejected: node 1: disk ("),
            "{said:?}"
        );
    }
}
