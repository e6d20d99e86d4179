//! What mome-restart decides before the job runs again: that the job is
//! not running, which committed stamp to restore (newest first, each
//! verified, the rejected ones with their reason), and that the program is
//! still the one checkpointed. Running the job is the coordinator's, with
//! [`RestartFrom`].

use std::path::{Path, PathBuf};

use mome_protocol::ckpt::Stamp;
use mome_protocol::job::{JobDir, JobError, JobSpec, JobState};
use mome_store::{StoreError, VerifyLevel};

use crate::coordinator::{store_root, RestartFrom};

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
    let mut check = |stamp: Stamp| {
        mome_store::verify(&root, stamp, level)
            .map(|_| ())
            .map_err(|e| e.to_string())
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
        ChoiceError::Rejected(stamp, reason) => RestartError::Rejected { stamp, reason },
        ChoiceError::AllRejected(rejected) => {
            for (stamp, reason) in rejected {
                say(format!("mome: stamp {stamp} rejected: {reason}"));
            }
            RestartError::NoneUsable {
                id: id.to_string(),
                root: root.clone(),
            }
        }
    })?;
    for (stamp, reason) in &choice.rejected {
        say(format!("mome: stamp {stamp} rejected: {reason}"));
    }
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
    Ok(RestartFrom {
        job,
        spec,
        stamp: choice.stamp,
        root,
    })
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
}
