//! Creating a job's directory under `$MOME_HOME/jobs/` with the modes the
//! design asks for (directories 0700, files 0600: job.yaml holds the job's
//! whole environment), and the coordinator's log inside it.
//!
//! The layout and the file formats themselves belong to
//! `mome_protocol::job`; this module only creates them.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mome_protocol::job::{new_job_id, JobDir, JobError};

#[derive(Debug, thiserror::Error)]
pub enum JobDirError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot pick a new job id in {jobs}: every id tried already exists")]
    NoFreeId { jobs: PathBuf },
    #[error(transparent)]
    Job(#[from] JobError),
}

/// Creates `home/jobs/<new id>/` and its `logs/`, all 0700 (creating
/// `home` and `home/jobs` too when missing).
pub fn create_job_dir(home: &Path) -> Result<JobDir, JobDirError> {
    let jobs = home.join("jobs");
    create_private_dir(&jobs, true)?;
    // Ids carry 16 random bits per second: a clash is rare, but two jobs
    // started in the same second must not share a directory.
    for _ in 0..8 {
        let dir = JobDir::new(home, &new_job_id());
        match DirBuilder::new().mode(0o700).create(&dir.path) {
            Ok(()) => {
                // The umask may have taken bits away (it cannot add any);
                // set the mode explicitly so the owner keeps rwx.
                set_mode(&dir.path, 0o700)?;
                create_private_dir(&dir.logs(), false)?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(JobDirError::Create {
                    path: dir.path,
                    source,
                })
            }
        }
    }
    Err(JobDirError::NoFreeId { jobs })
}

fn create_private_dir(path: &Path, recursive: bool) -> Result<(), JobDirError> {
    let existed = path.is_dir();
    DirBuilder::new()
        .mode(0o700)
        .recursive(recursive)
        .create(path)
        .map_err(|source| JobDirError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    if !existed {
        set_mode(path, 0o700)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), JobDirError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        JobDirError::Create {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Creates `path` and its missing parents, 0700 (a checkpoint store: it
/// holds the ranks' memory).
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().mode(0o700).recursive(true).create(path)
}

/// Creates (or appends to) a 0600 file, e.g. a log of the job.
pub fn open_private_log(path: &Path) -> Result<File, JobDirError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| JobDirError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `id` and a newline to the file the user asked for with
/// `--jobid-file` (a plain file of theirs: the umask decides its mode).
pub fn write_jobid_file(path: &Path, id: &str) -> Result<(), JobDirError> {
    std::fs::write(path, format!("{id}\n")).map_err(|source| JobDirError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// logs/coordinator.log: mome-run's decisions, one timestamped line each.
/// Logging never fails the job: a full disk loses log lines, not ranks.
#[derive(Debug)]
pub struct CoordinatorLog {
    file: Option<File>,
}

impl CoordinatorLog {
    pub fn open(job: &JobDir) -> Result<CoordinatorLog, JobDirError> {
        Ok(CoordinatorLog {
            file: Some(open_private_log(&job.coordinator_log())?),
        })
    }

    /// A log that discards everything (before the job directory exists).
    pub fn none() -> CoordinatorLog {
        CoordinatorLog { file: None }
    }

    pub fn line(&mut self, message: impl std::fmt::Display) {
        if let Some(file) = self.file.as_mut() {
            let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            // One write per line, so lines stay whole if someone else appends.
            let _ = file.write_all(format!("{stamp} {message}\n").as_bytes());
        }
    }
}

/// The last `count` lines of a text file (e.g. an agent's log for an error
/// message), or nothing when it cannot be read.
pub fn tail_lines(path: &Path, count: usize) -> Vec<String> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    // Only the end matters; a huge log is not worth decoding whole.
    let start = data.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&data[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn job_dir_is_private() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path().join("nested-home");
        let dir = create_job_dir(&home).unwrap();
        for p in [&home.join("jobs"), &dir.path, &dir.logs()] {
            assert_eq!(
                std::fs::metadata(p).unwrap().mode() & 0o777,
                0o700,
                "{}",
                p.display()
            );
        }
        let mut log = CoordinatorLog::open(&dir).unwrap();
        log.line("hello");
        let meta = std::fs::metadata(dir.coordinator_log()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(tail_lines(&dir.coordinator_log(), 5).len(), 1);
        // Two jobs never share a directory.
        let other = create_job_dir(&home).unwrap();
        assert_ne!(other.path, dir.path);
    }
}
