//! The job's control socket (`control.sock` in the job directory, 0600):
//! one JSON object per line in each direction, a
//! [`ControlRequest`](mome_protocol::job::ControlRequest) answered by one
//! final [`ControlReply`](mome_protocol::job::ControlReply), possibly after
//! progress lines (a checkpoint).
//!
//! The server side is driven by mome-run's event loop (non-blocking, never
//! waits for a client); what a request does is decided by the coordinator,
//! through the handler it passes in. A handler may answer later: it returns
//! `None`, and the coordinator sends the lines with [`ControlServer::send`]
//! when they come (the connection stays open until the final one). The
//! client side, with timeouts, is used by mome-status and mome-ckpt.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mome_protocol::job::{ControlReply, ControlRequest};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("talking to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} closed the connection without answering")]
    NoReply { path: PathBuf },
    #[error("{path} sent a reply that is not understood: {message}")]
    BadReply { path: PathBuf, message: String },
}

/// A request line longer than this is refused (and the connection closed).
const MAX_REQUEST: usize = 64 << 10;
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 32;

/// A connection, stable across [`ControlServer::sweep`] (unlike its index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// A request handler: the reply now, or `None` to answer later with
/// [`ControlServer::send`].
pub type Handler<'a> = dyn FnMut(ClientId, ControlRequest) -> Option<ControlReply> + 'a;

#[derive(Debug)]
struct Client {
    id: ClientId,
    /// Requests answered later whose final reply is not sent yet: the
    /// connection is kept for them even after the client's EOF.
    deferred: usize,
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// No more requests will be read (EOF, error or oversized request):
    /// close once `output` is written.
    done_reading: bool,
    broken: bool,
}

/// The listening socket and its clients. Removes the socket file on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
    next_id: u64,
}

/// What the event loop should poll for, and what to call when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFd {
    Listener,
    Client(usize),
}

impl ControlServer {
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(err)?;
        // The job directory (0700) already keeps others out; 0600 says so
        // on the socket too.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            clients: Vec::new(),
            next_id: 0,
        })
    }

    /// Fds to poll: the listener (readable = a client is waiting), each
    /// client (readable, and writable while it has a reply pending).
    pub fn poll_list(&self) -> Vec<(ControlFd, BorrowedFd<'_>, bool)> {
        let mut list = Vec::with_capacity(1 + self.clients.len());
        if self.clients.len() < MAX_CLIENTS {
            list.push((ControlFd::Listener, self.listener.as_fd(), false));
        }
        for (i, c) in self.clients.iter().enumerate() {
            list.push((ControlFd::Client(i), c.stream.as_fd(), !c.output.is_empty()));
        }
        list
    }

    /// Handles readiness of `which`; `handle` answers each request.
    pub fn ready(&mut self, which: ControlFd, handle: &mut Handler<'_>) {
        match which {
            ControlFd::Listener => self.accept(),
            ControlFd::Client(i) => {
                if let Some(client) = self.clients.get_mut(i) {
                    client.serve(handle);
                }
            }
        }
    }

    /// Drops clients that are finished. Call after handling every event of
    /// one poll round (indices stay valid until then).
    pub fn sweep(&mut self) {
        self.clients
            .retain(|c| !(c.broken || (c.done_reading && c.output.is_empty() && c.deferred == 0)));
    }

    /// Sends a later reply to `client`; a final reply ends one deferred
    /// request. False when the client is gone (the reply is dropped).
    pub fn send(&mut self, client: ClientId, reply: &ControlReply) -> bool {
        let Some(c) = self.clients.iter_mut().find(|c| c.id == client) else {
            return false;
        };
        if reply.is_final() {
            c.deferred = c.deferred.saturating_sub(1);
        }
        c.queue_reply(reply);
        c.flush();
        !c.broken
    }

    /// One non-blocking attempt to write what every client still has
    /// queued (before the server goes away).
    pub fn flush_all(&mut self) {
        for c in &mut self.clients {
            c.flush();
        }
    }

    fn accept(&mut self) {
        while self.clients.len() < MAX_CLIENTS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.next_id += 1;
                        self.clients.push(Client {
                            id: ClientId(self.next_id),
                            deferred: 0,
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            done_reading: false,
                            broken: false,
                        });
                    }
                }
                Err(_) => break,
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Client {
    fn serve(&mut self, handle: &mut Handler<'_>) {
        let mut buf = [0u8; 4096];
        while !self.done_reading {
            match self.stream.read(&mut buf) {
                Ok(0) => self.done_reading = true,
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
        while let Some(pos) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=pos).collect();
            self.answer_line(&line[..pos], handle);
        }
        if self.input.len() > MAX_REQUEST {
            self.input.clear();
            self.done_reading = true;
            self.queue_reply(&ControlReply::Error {
                message: format!("request longer than {MAX_REQUEST} bytes"),
            });
        } else if self.done_reading && !self.input.is_empty() {
            // A last request without its newline is still a request.
            let line = std::mem::take(&mut self.input);
            self.answer_line(&line, handle);
        }
        self.flush();
    }

    fn answer_line(&mut self, line: &[u8], handle: &mut Handler<'_>) {
        let id = self.id;
        match answer(line, &mut |request| handle(id, request)) {
            Some(reply) => self.queue_reply(&reply),
            None => self.deferred += 1,
        }
    }

    fn queue_reply(&mut self, reply: &ControlReply) {
        let mut line = serde_json::to_vec(reply).expect("a ControlReply always serializes");
        line.push(b'\n');
        self.output.extend_from_slice(&line);
    }

    fn flush(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
    }
}

/// Parses one request line and asks `handle` for the reply (None: later);
/// a line that is not a known request gets an `Error` reply saying what
/// was wrong.
pub fn answer(
    line: &[u8],
    handle: &mut dyn FnMut(ControlRequest) -> Option<ControlReply>,
) -> Option<ControlReply> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match serde_json::from_slice::<ControlRequest>(line) {
        Ok(request) => handle(request),
        Err(e) => {
            let message = match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(map)) => match map.get("cmd") {
                    Some(serde_json::Value::String(cmd)) => {
                        format!("unknown command {cmd:?} or bad arguments ({e})")
                    }
                    _ => "a request needs a \"cmd\" field, e.g. {\"cmd\":\"status\"}".to_string(),
                },
                _ => format!(
                    "malformed request ({e}): send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
                ),
            };
            Some(ControlReply::Error { message })
        }
    }
}

/// Sends one request to the control socket at `path` and reads the reply,
/// each step bounded by `timeout`.
pub fn request(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ControlError> {
    request_streamed(path, req, timeout, &mut |_| {})
}

/// Sends one request and reads its reply lines until the final one, the
/// whole bounded by `timeout`; `progress` sees every non-final line.
pub fn request_streamed(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
    progress: &mut dyn FnMut(&ControlReply),
) -> Result<ControlReply, ControlError> {
    let deadline = std::time::Instant::now() + timeout;
    let io = |source: std::io::Error| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            ControlError::Timeout {
                path: path.to_path_buf(),
                timeout,
            }
        } else {
            ControlError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    // connect(2) on a unix socket does not wait for the server to accept:
    // it fails at once when nobody listens, or succeeds into the backlog.
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("a ControlRequest always serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(ControlError::Timeout {
                path: path.to_path_buf(),
                timeout,
            });
        }
        stream.set_read_timeout(Some(left)).map_err(io)?;
        let mut line = String::new();
        (&mut reader)
            .take(64 << 20)
            .read_line(&mut line)
            .map_err(io)?;
        if line.is_empty() {
            return Err(ControlError::NoReply {
                path: path.to_path_buf(),
            });
        }
        let reply: ControlReply =
            serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if reply.is_final() {
            return Ok(reply);
        }
        progress(&reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mome_protocol::job::{JobState, JobStatus};

    fn status() -> JobStatus {
        JobStatus {
            id: "j".into(),
            state: JobState::Running,
            coordinator_pid: 1,
            ranks: vec![],
            agents: vec![],
            exit_code: None,
            reason: None,
            ended: None,
            incarnation: 0,
            checkpoints: vec![],
            checkpointing: None,
        }
    }

    #[test]
    fn answers_status_and_explains_errors() {
        let mut handle = |r: ControlRequest| match r {
            ControlRequest::Status => Some(ControlReply::Status(status())),
            ControlRequest::Checkpoint { .. } => None,
        };
        assert_eq!(
            answer(br#"{"cmd":"status"}"#, &mut handle),
            Some(ControlReply::Status(status()))
        );
        assert_eq!(answer(br#"{"cmd":"checkpoint"}"#, &mut handle), None);
        let Some(ControlReply::Error { message }) = answer(br#"{"cmd":"fly"}"#, &mut handle) else {
            panic!()
        };
        assert!(message.contains("fly"), "{message}");
        let Some(ControlReply::Error { message }) = answer(b"not json", &mut handle) else {
            panic!()
        };
        assert!(message.contains("malformed"), "{message}");
    }

    #[test]
    fn serves_a_client_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let client = std::thread::spawn({
            let path = path.clone();
            move || request(&path, &ControlRequest::Status, Duration::from_secs(2))
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !client.is_finished() && std::time::Instant::now() < deadline {
            let ready: Vec<ControlFd> = server.poll_list().iter().map(|(w, ..)| *w).collect();
            for which in ready {
                server.ready(which, &mut |_, _| Some(ControlReply::Status(status())));
            }
            server.sweep();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            client.join().unwrap().unwrap(),
            ControlReply::Status(status())
        );
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn streams_deferred_replies() {
        use mome_protocol::job::CkptProgress;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut seen = Vec::new();
                let last = request_streamed(
                    &path,
                    &ControlRequest::Checkpoint { timeout_ms: None },
                    Duration::from_secs(3),
                    &mut |r| seen.push(r.clone()),
                );
                (seen, last)
            }
        });
        let mut waiting: Vec<ClientId> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while waiting.is_empty() && std::time::Instant::now() < deadline {
            let ready: Vec<ControlFd> = server.poll_list().iter().map(|(w, ..)| *w).collect();
            for which in ready {
                server.ready(which, &mut |id, _| {
                    waiting.push(id);
                    None
                });
            }
            server.sweep();
            std::thread::sleep(Duration::from_millis(5));
        }
        let id = waiting[0];
        let progress = ControlReply::CkptProgress(CkptProgress {
            stamp: 1,
            phase: "write".into(),
            done_bytes: 1,
            total_bytes: 2,
        });
        assert!(server.send(id, &progress));
        server.sweep();
        let error = ControlReply::Error {
            message: "nope".into(),
        };
        assert!(server.send(id, &error));
        let (seen, last) = client.join().unwrap();
        assert_eq!(seen, vec![progress]);
        assert_eq!(last.unwrap(), error);
    }
}
