//! The keepers of a multi-node job: one `mome-keeper` per node, holding
//! the node's diskless checkpoint memory (see dsm-agent/src/bin/mome-keeper.rs).
//!
//! mome-run starts them before the agents and keeps each one's stdin: `end`
//! at a clean end frees the memory; anything else (mome-run killed, the job
//! failed, or mome-run handing over to mome-restart after a node failure)
//! leaves them holding it for `redundancy.grace`, and the next coordinator
//! adopts them over their socket (`keepers/node-N.sock`).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use mome_protocol::job::JobDir;

/// How long a keeper may take to say `ready` or answer `adopt`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot start mome-keeper ({path}) for node {node}: {source}")]
    Spawn {
        node: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "mome-keeper of node {node} did not say `ready` within {timeout:?}: {detail} (see {log})"
    )]
    NotReady {
        node: u32,
        timeout: Duration,
        detail: String,
        log: PathBuf,
    },
    #[error("cannot adopt the keeper of node {node}: {detail}")]
    Adopt { node: u32, detail: String },
}

/// How the coordinator speaks to a keeper.
#[derive(Debug)]
enum Control {
    /// It started it: the keeper's stdin and stdout.
    Pipe(ChildStdin, Child, BufReader<ChildStdout>),
    /// It adopted it: the keeper's socket (and a reader of it).
    Socket(UnixStream, BufReader<UnixStream>),
}

/// One node's keeper.
#[derive(Debug)]
pub struct Keeper {
    pub node: u32,
    pub pid: i32,
    /// Its store (a path through /proc/<pid>/root).
    pub path: PathBuf,
    control: Control,
}

/// Where the keeper binary is: `MOME_KEEPER_BIN`, else next to the agent,
/// else next to this program.
pub fn locate(agent: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOME_KEEPER_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let beside_agent = agent.parent().map(|d| d.join("mome-keeper"));
    let beside_me = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("mome-keeper")));
    beside_agent
        .into_iter()
        .chain(beside_me)
        .find(|p| p.is_file())
}

/// Reads one line from `r` within `timeout` (the descriptor is polled).
fn read_line_within(
    fd: std::os::fd::BorrowedFd<'_>,
    r: &mut impl BufRead,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => return Err(format!("nothing within {timeout:?}")),
            Ok(_) => break,
            // A signal (a child's SIGCHLD): wait on.
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err("it closed its output".into()),
        Ok(_) => Ok(line.trim_end().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl Keeper {
    /// Starts the keeper of `node` (own process group: a Ctrl-C at the
    /// terminal must not free the memory mome-restart may need).
    pub fn spawn(
        bin: &Path,
        job: &JobDir,
        node: u32,
        limit: u64,
        grace: Duration,
    ) -> Result<Keeper, KeeperError> {
        let log = job.path.join("logs").join(format!("keeper-{node}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut cmd = Command::new(bin);
        cmd.arg("--job-dir")
            .arg(&job.path)
            .arg("--node")
            .arg(node.to_string())
            .arg("--grace")
            .arg(grace.as_secs().max(1).to_string());
        if limit > 0 {
            cmd.arg("--limit").arg(limit.to_string());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| KeeperError::Spawn {
            node,
            path: bin.to_path_buf(),
            source,
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let fd = stdout.as_fd().try_clone_to_owned().ok();
        let mut reader = BufReader::new(stdout);
        let line = match &fd {
            Some(fd) => read_line_within(fd.as_fd(), &mut reader, ANSWER_TIMEOUT),
            None => Err("cannot watch its output".into()),
        };
        let not_ready = |detail: String| KeeperError::NotReady {
            node,
            timeout: ANSWER_TIMEOUT,
            detail,
            log: log.clone(),
        };
        let line = match line {
            Ok(l) => l,
            Err(detail) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(not_ready(detail));
            }
        };
        let Some((pid, path)) = parse_ready(&line, "ready") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(not_ready(format!("it said {line:?}")));
        };
        Ok(Keeper {
            node,
            pid,
            path,
            control: Control::Pipe(stdin, child, reader),
        })
    }

    /// Takes over the keeper a previous coordinator left for `node`, if one
    /// is alive; `Ok(None)` when there is none.
    pub fn adopt(job: &JobDir, node: u32) -> Result<Option<Keeper>, KeeperError> {
        let socket = job.path.join("keepers").join(format!("node-{node}.sock"));
        if !socket.exists() {
            return Ok(None);
        }
        let err = |detail: String| KeeperError::Adopt { node, detail };
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let mut stream = match UnixStream::connect(&socket) {
                Ok(s) => s,
                // A socket file left by a killed keeper.
                Err(_) => return Ok(None),
            };
            stream
                .set_read_timeout(Some(ANSWER_TIMEOUT))
                .map_err(|e| err(e.to_string()))?;
            stream
                .write_all(b"adopt\n")
                .map_err(|e| err(format!("cannot ask it: {e}")))?;
            let mut reader = BufReader::new(stream.try_clone().map_err(|e| err(e.to_string()))?);
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| err(format!("no answer: {e}")))?;
            let line = line.trim_end();
            if line == "busy" {
                // Its previous coordinator is still going away.
                if Instant::now() >= deadline {
                    return Err(err(format!(
                        "it is still controlled by someone else after {ANSWER_TIMEOUT:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let Some((pid, path)) = parse_ready(line, "adopted") else {
                return Err(err(format!("it answered {line:?}")));
            };
            // Answers stay bounded by the read timeout set above.
            return Ok(Some(Keeper {
                node,
                pid,
                path,
                control: Control::Socket(stream, reader),
            }));
        }
    }

    fn ask(&mut self, command: &str) -> Option<String> {
        let (to, from): (&mut dyn Write, &mut dyn BufRead) = match &mut self.control {
            Control::Pipe(stdin, _, out) => (stdin, out),
            Control::Socket(s, reader) => (s, reader),
        };
        to.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut line = String::new();
        from.read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// The job is over: the keeper frees the memory and exits.
    pub fn end(mut self) {
        let _ = self.ask("end");
        if let Control::Pipe(stdin, mut child, _) = self.control {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Lets go of the keeper without ending it: it keeps the memory for
    /// its grace period, for the next coordinator.
    pub fn release(self) {
        if let Control::Pipe(stdin, child, _) = self.control {
            drop(stdin);
            // Not waited for: it lives on (its own group), and is reaped
            // by init once this process is gone.
            drop(child);
        }
    }
}

fn parse_ready(line: &str, word: &str) -> Option<(i32, PathBuf)> {
    let rest = line.strip_prefix(word)?.strip_prefix(' ')?;
    let (pid, path) = rest.split_once(' ')?;
    Some((pid.parse().ok()?, PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines() {
        assert_eq!(
            parse_ready("ready 12 /proc/12/root/a b", "ready"),
            Some((12, PathBuf::from("/proc/12/root/a b")))
        );
        assert_eq!(parse_ready("adopted 3 /x", "ready"), None);
        assert_eq!(parse_ready("ready x /x", "ready"), None);
    }
}
