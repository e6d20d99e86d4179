//! `mome-keeper`: the holder of one node's checkpoint memory.
//!
//! mome keeps checkpoint data "diskless": in RAM, on the node that made it
//! and on two other nodes. That memory must behave like a node's RAM: it is
//! lost when the node dies, it survives a restart of the node's agent (the
//! new agent reads it back), and it survives the death of the coordinator
//! (mome-run) long enough for `mome-restart` to use it.
//!
//! Design: one tiny process per node owns a private tmpfs. The checkpoint
//! store format of the `mome-store` crate is files, so a RAM file system
//! whose lifetime is the keeper's gives diskless storage with the same
//! crash-safe format (write, fsync, rename) and zero-copy reads (mmap of a
//! tmpfs file is its page cache). The keeper unshares its mount namespace,
//! makes every mount private (nothing propagates back to the host) and
//! mounts the tmpfs on `DIR/keepers/node-N/` in its own namespace only. Other
//! (root) processes reach it through the magic link
//! `/proc/<keeper pid>/root/<absolute mount dir>`, which resolves in the
//! keeper's namespace. When the keeper dies, by `end` or by kill -9 as a
//! simulated node failure, its namespace goes and the tmpfs with it: a
//! killed node's data is lost, as on a real node.
//!
//! This file owns all of it: the command line, the namespace and mount, the
//! socket, the `ready` line and `DIR/keepers/node-N.json`, and the control
//! loop. Control is line commands on stdin (the coordinator holds the write
//! end); at end of stdin without `end` (the coordinator died), the keeper
//! waits `--grace` seconds on `DIR/keepers/node-N.sock` for a client that
//! sends `adopt` (mome-restart, a new coordinator) and then takes its
//! commands on that connection. The loop is plain blocking code around
//! poll(2), with no thread: unshare(CLONE_NEWNS) refuses a process whose
//! file system attributes are shared with another thread.

use std::ffi::CString;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use serde::Serialize;

/// Longest path a unix socket address holds (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest command line accepted; a longer one is answered as unknown and dropped.
const MAX_LINE: usize = 4096;
/// Connections waiting to send `adopt` at the same time; more are answered `busy`.
const MAX_PENDING: usize = 16;

#[derive(Debug, Parser)]
#[command(
    name = "mome-keeper",
    version,
    about = "mome's per-node holder of checkpoint memory: a private tmpfs that lives as long as the keeper",
    long_about = None,
    after_help = "\
mome-run starts one keeper per node; it is not meant to be run by hand. It
needs CAP_SYS_ADMIN (root): it unshares its mount namespace, makes every
mount private and mounts a tmpfs (mode 0700, size=BYTES with --limit) on
DIR/keepers/node-N/, visible only in its own namespace. The host sees an
empty directory there; other root processes reach the tmpfs through
/proc/<keeper pid>/root/<absolute DIR>/keepers/node-N, the store path.
When the keeper exits or is killed, the tmpfs and its data are gone.

Startup: creates DIR/keepers/ and DIR/keepers/node-N/ (0700), refuses to
start if DIR/keepers/node-N.sock answers (a keeper of that node is alive),
mounts, listens on DIR/keepers/node-N.sock (0600), writes
DIR/keepers/node-N.json (0600):
  {\"node\":N,\"pid\":P,\"path\":\"<store path>\",\"limit\":BYTES|null,\"started\":\"<RFC 3339>\"}
and then prints one line on stdout:
  ready <pid> <store path>
(the store path is the rest of the line).

Commands, one per line, one answer line each (empty lines are ignored):
  usage   ->  usage <used bytes> <limit bytes, 0 without --limit>
  end     ->  ended   (after unmounting and removing the json and the
                        socket; then exits 0)
  adopt   ->  adopted <pid> <store path>
  other   ->  error unknown command: <text>

Commands come on stdin. At end of stdin without `end` (the coordinator
died), the keeper keeps the memory for --grace seconds and waits on the
socket: a client that sends `adopt` gets `adopted <pid> <store path>` and
that connection becomes the control channel (same commands; its end of file
starts a new grace period). While a channel controls the keeper, other
connections get `busy` and are closed. A connection that has not adopted
gets `error send adopt first` for any other command. When a grace period
ends with no adopter, the keeper removes its json and socket and exits 0:
the memory is freed. SIGTERM and SIGINT end it like `end`; SIGHUP is
ignored (a keeper outlives its terminal).

The log goes to stderr, one line per action, prefixed `mome-keeper[node N]: `.

Exit status: 0 after `end`, a signal or an expired grace period; 1 when
startup fails; 2 for a bad command line or without the privilege to mount."
)]
struct Cli {
    /// Job directory ($MOME_HOME/jobs/<jobid>); the keeper works in DIR/keepers/.
    #[arg(long, value_name = "DIR")]
    job_dir: PathBuf,
    /// Number of the node whose checkpoint memory this keeper holds.
    #[arg(long, value_name = "N")]
    node: u32,
    /// Size limit of the tmpfs in bytes (rounded up to whole pages by the kernel); writes beyond fail with ENOSPC. Default: the kernel's tmpfs default (half the RAM).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Seconds to keep the memory after the control channel closed without `end`, waiting for an adopter.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    grace: u64,
}

/// Node number shown in every log line.
static NODE: OnceLock<u32> = OnceLock::new();

/// Writes one log line to stderr, formatted first and written with one call.
fn write_log(args: std::fmt::Arguments<'_>) {
    let line = match NODE.get() {
        Some(node) => format!("mome-keeper[node {node}]: {args}\n"),
        None => format!("mome-keeper: {args}\n"),
    };
    // A log that cannot be written (stderr closed) must not stop the keeper.
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! log {
    ($($arg:tt)*) => {
        write_log(format_args!($($arg)*))
    };
}

/// Why startup failed; the variant decides the exit status.
enum Fail {
    /// No privilege to unshare or mount (exit 2).
    Privilege(String),
    /// Anything else (exit 1).
    Other(String),
}

fn other(what: impl std::fmt::Display) -> Fail {
    Fail::Other(what.to_string())
}

/// A failed namespace or mount call; EPERM says what is missing.
fn sys_fail(step: &str, err: io::Error) -> Fail {
    if err.raw_os_error() == Some(libc::EPERM) {
        Fail::Privilege(format!(
            "{step} failed: {err}: diskless checkpoints need CAP_SYS_ADMIN for a private tmpfs \
             per node (run mome as root, or give mome-keeper CAP_SYS_ADMIN)"
        ))
    } else {
        Fail::Other(format!("{step} failed: {err}"))
    }
}

/// The record other processes find in `DIR/keepers/node-N.json`.
#[derive(Serialize)]
struct Record<'a> {
    node: u32,
    pid: u32,
    path: &'a str,
    limit: Option<u64>,
    started: String,
}

/// Where the keeper's files are, and what it says about itself.
struct Keeper {
    pid: u32,
    limit: Option<u64>,
    grace: Duration,
    /// DIR/keepers/node-N, absolute and free of symlinks: the mount point.
    mount_dir: PathBuf,
    /// /proc/<pid>/root/<mount_dir>: the store path other processes use.
    store: String,
    json: PathBuf,
    sock: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = NODE.set(cli.node);
    // Every file the keeper creates is private to the user (0600/0700).
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    // Blocked from the start, read later from a signalfd by the control loop:
    // a SIGTERM sent as soon as `ready` is out must still clean up.
    if let Err(e) =
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
    {
        log!("cannot block SIGTERM, SIGINT, SIGHUP: {e}");
        return ExitCode::from(1);
    }
    let (keeper, listener) = match start(&cli) {
        Ok(started) => started,
        Err(Fail::Privilege(msg)) => {
            log!("{msg}");
            return ExitCode::from(2);
        }
        Err(Fail::Other(msg)) => {
            log!("cannot start: {msg}");
            return ExitCode::from(1);
        }
    };
    match keeper.serve(&listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log!("control loop failed: {err}; checkpoint memory freed");
            keeper.cleanup();
            ExitCode::from(1)
        }
    }
}

/// Signals the control loop handles: SIGTERM and SIGINT end, SIGHUP is ignored.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    set
}

/// Directories, namespace, mount, socket, json, ready line.
fn start(cli: &Cli) -> Result<(Keeper, UnixListener), Fail> {
    let job_dir = fs::canonicalize(&cli.job_dir)
        .map_err(|e| other(format_args!("job directory {}: {e}", cli.job_dir.display())))?;
    let keepers = job_dir.join("keepers");
    let mount_dir = keepers.join(format!("node-{}", cli.node));
    let sock = keepers.join(format!("node-{}.sock", cli.node));
    let json = keepers.join(format!("node-{}.json", cli.node));
    if sock.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(other(format_args!(
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter MOME_HOME",
            sock.display()
        )));
    }
    let pid = std::process::id();
    let store = format!("/proc/{pid}/root{}", mount_dir.display());
    if mount_dir.to_str().is_none() {
        return Err(other(format_args!(
            "{} is not valid UTF-8: use a job directory with a UTF-8 path",
            mount_dir.display()
        )));
    }

    // The directories, in the host view (the namespace does not exist yet).
    for dir in [&keepers, &mount_dir] {
        make_private_dir(dir)?;
    }
    refuse_live_keeper(&sock, cli.node)?;

    // Before any thread exists: unshare(CLONE_NEWNS) needs an unshared fs struct.
    private_tmpfs(&mount_dir, cli.node, cli.limit)?;
    log!(
        "mounted a private tmpfs ({}) on {} in the keeper's mount namespace; store path {store}",
        match cli.limit {
            Some(bytes) => format!("limit {bytes} bytes"),
            None => "no limit".to_string(),
        },
        mount_dir.display()
    );

    let keeper = Keeper {
        pid,
        limit: cli.limit,
        grace: Duration::from_secs(cli.grace),
        mount_dir,
        store,
        json,
        sock,
    };
    let listener = keeper.listen().inspect_err(|_| keeper.cleanup())?;
    keeper.write_record().inspect_err(|_| keeper.cleanup())?;
    // The json and the socket exist before anyone sees `ready`.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "ready {} {}", keeper.pid, keeper.store).and_then(|()| out.flush());
    Ok((keeper, listener))
}

/// Creates `dir` (mode 0700) if missing; it must be a real directory.
fn make_private_dir(dir: &Path) -> Result<(), Fail> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(other(format_args!("cannot create {}: {e}", dir.display()))),
    }
    let meta =
        fs::symlink_metadata(dir).map_err(|e| other(format_args!("{}: {e}", dir.display())))?;
    if !meta.file_type().is_dir() {
        return Err(other(format_args!(
            "{} exists and is not a directory",
            dir.display()
        )));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| other(format_args!("cannot chmod {}: {e}", dir.display())))
}

/// Refuses to start when the node's socket answers; removes a stale one.
fn refuse_live_keeper(sock: &Path, node: u32) -> Result<(), Fail> {
    match UnixStream::connect(sock) {
        Ok(_) => Err(other(format_args!(
            "{} answers: a keeper of node {node} is already running",
            sock.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            log!("removing the stale socket {}", sock.display());
            match fs::remove_file(sock) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(other(format_args!("cannot remove {}: {e}", sock.display()))),
            }
        }
    }
}

/// New mount namespace, every mount private, a tmpfs on `dir`.
fn private_tmpfs(dir: &Path, node: u32, limit: Option<u64>) -> Result<(), Fail> {
    // SAFETY: unshare takes no pointer. The process has a single thread
    // (nothing has started one), as CLONE_NEWNS requires.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(sys_fail("unshare(CLONE_NEWNS)", io::Error::last_os_error()));
    }
    // SAFETY: a propagation change takes a NUL-terminated target and ignores
    // source, file system type and data, which may be null (mount(2)).
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(sys_fail(
            "making every mount private (mount / MS_REC|MS_PRIVATE)",
            io::Error::last_os_error(),
        ));
    }
    let target = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| other(format_args!("{} contains a NUL byte", dir.display())))?;
    let source = CString::new(format!("mome-keeper-node-{node}")).expect("no NUL in a number");
    let options = match limit {
        Some(bytes) => format!("size={bytes},mode=0700"),
        None => "mode=0700".to_string(),
    };
    let data = CString::new(options).expect("no NUL in mount options");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call;
    // tmpfs reads `data` as its comma-separated option string.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(sys_fail(
            &format!("mounting a tmpfs on {}", dir.display()),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Who controls the keeper now.
enum Control {
    /// The coordinator, on stdin/stdout.
    Stdin,
    /// An adopter, on a socket connection.
    Socket(Conn),
    /// Nobody: waiting for an adopter until the deadline.
    Grace(Instant),
}

/// A socket connection and its unfinished input line.
struct Conn {
    stream: UnixStream,
    lines: Lines,
}

impl Conn {
    fn new(stream: UnixStream) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        // Answers are a few bytes; a client that never reads must not hang the keeper.
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Conn {
            stream,
            lines: Lines::default(),
        })
    }

    /// Sends one line; false when the client is gone.
    fn send(&mut self, line: &str) -> bool {
        (&self.stream)
            .write_all(format!("{line}\n").as_bytes())
            .is_ok()
    }
}

/// Bytes read from a channel, cut into lines.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// One read(2) (poll said it will not block); false at end of file or on error.
    fn fill(&mut self, fd: BorrowedFd<'_>) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return true,
                Err(_) => return false,
            }
        }
    }

    /// The next complete line, without its end; an overlong line comes whole.
    fn next(&mut self) -> Option<String> {
        let end = match self.buf.iter().position(|&b| b == b'\n') {
            Some(pos) => pos + 1,
            None if self.buf.len() > MAX_LINE => self.buf.len(),
            None => return None,
        };
        let line: Vec<u8> = self.buf.drain(..end).collect();
        Some(String::from_utf8_lossy(&line).trim().to_string())
    }
}

/// What a command asks of the loop after its answer.
enum After {
    Continue,
    Exit,
}

impl Keeper {
    /// Binds DIR/keepers/node-N.sock (0600), non-blocking for accept.
    fn listen(&self) -> Result<UnixListener, Fail> {
        let listener = UnixListener::bind(&self.sock).map_err(|e| {
            other(format_args!(
                "cannot listen on {}: {e}",
                self.sock.display()
            ))
        })?;
        fs::set_permissions(&self.sock, fs::Permissions::from_mode(0o600))
            .map_err(|e| other(format_args!("cannot chmod {}: {e}", self.sock.display())))?;
        listener.set_nonblocking(true).map_err(other)?;
        Ok(listener)
    }

    /// Writes DIR/keepers/node-N.json (0600) through a temporary file and a rename.
    fn write_record(&self) -> Result<(), Fail> {
        let record = Record {
            node: *NODE.get().expect("node set in main"),
            pid: self.pid,
            path: &self.store,
            limit: self.limit,
            started: mome_protocol::job::now_rfc3339(),
        };
        let text = serde_json::to_string(&record).map_err(other)?;
        let tmp = self.json.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &self.json)
        };
        write().map_err(|e| other(format_args!("cannot write {}: {e}", self.json.display())))
    }

    /// Removes the socket and the json, unmounts, removes the mount point.
    fn cleanup(&self) {
        for file in [&self.sock, &self.json] {
            if let Err(e) = fs::remove_file(file) {
                if e.kind() != io::ErrorKind::NotFound {
                    log!("cannot remove {}: {e}", file.display());
                }
            }
        }
        if let Ok(target) = CString::new(self.mount_dir.as_os_str().as_bytes()) {
            // SAFETY: `target` is a NUL-terminated path that outlives the call.
            // MNT_DETACH: files still open elsewhere keep their pages until
            // closed; the namespace dies with this process anyway.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                log!(
                    "cannot unmount {}: {}",
                    self.mount_dir.display(),
                    io::Error::last_os_error()
                );
            }
        }
        let _ = fs::remove_dir(&self.mount_dir);
    }

    /// Bytes used in the tmpfs.
    fn used(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.mount_dir)?;
        let used_blocks = (st.blocks() as u64).saturating_sub(st.blocks_free() as u64);
        Ok(used_blocks * st.fragment_size() as u64)
    }

    /// The answer to one command of the controlling channel.
    fn command(&self, line: &str) -> (String, After) {
        match line {
            "usage" => match self.used() {
                Ok(used) => (
                    format!("usage {used} {}", self.limit.unwrap_or(0)),
                    After::Continue,
                ),
                Err(e) => (format!("error usage: {e}"), After::Continue),
            },
            "adopt" => (self.adopted(), After::Continue),
            "end" => {
                self.cleanup();
                log!("end: unmounted the store, removed the json and the socket; checkpoint memory freed");
                ("ended".to_string(), After::Exit)
            }
            other => (format!("error unknown command: {other}"), After::Continue),
        }
    }

    fn adopted(&self) -> String {
        format!("adopted {} {}", self.pid, self.store)
    }

    fn grace_start(&self, why: &str) -> Control {
        log!(
            "{why} without `end`: keeping the checkpoint memory for {} s, waiting for `adopt` on {}",
            self.grace.as_secs(),
            self.sock.display()
        );
        Control::Grace(Instant::now() + self.grace)
    }

    /// The control loop: returns after `end`, a signal or an expired grace period.
    fn serve(&self, listener: &UnixListener) -> io::Result<()> {
        // Blocked since main; read here.
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )?;

        let stdin = io::stdin();
        let mut stdin_lines = Lines::default();
        let mut control = Control::Stdin;
        let mut pending: Vec<Conn> = Vec::new();
        let ready =
            PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;

        loop {
            let timeout = match &control {
                Control::Grace(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up so the loop does not spin on the last millisecond.
                    let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128);
                    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
                }
                _ => PollTimeout::NONE,
            };
            // Readiness: [signals, listener, controller?, pending...].
            let (sig_ready, accept_ready, control_ready, pending_ready) = {
                let mut fds = vec![
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                ];
                let control_fd = match &control {
                    Control::Stdin => Some(stdin.as_fd()),
                    Control::Socket(conn) => Some(conn.stream.as_fd()),
                    Control::Grace(_) => None,
                };
                if let Some(fd) = control_fd {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
                for conn in &pending {
                    fds.push(PollFd::new(conn.stream.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let hit = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| r.intersects(ready));
                let first_pending = if control_fd.is_some() { 3 } else { 2 };
                (
                    hit(&fds[0]),
                    hit(&fds[1]),
                    control_fd.is_some() && hit(&fds[2]),
                    fds[first_pending..].iter().map(hit).collect::<Vec<bool>>(),
                )
            };

            if sig_ready {
                while let Ok(Some(info)) = signals.read_signal() {
                    let signo = info.ssi_signo as i32;
                    let name = Signal::try_from(signo)
                        .map(|s| s.as_str())
                        .unwrap_or("signal");
                    if signo == libc::SIGHUP {
                        log!("{name} ignored: a keeper outlives its terminal");
                        continue;
                    }
                    self.cleanup();
                    log!("{name}: unmounted the store, removed the json and the socket; checkpoint memory freed");
                    return Ok(());
                }
            }

            if control_ready {
                let mut closed = None;
                match &mut control {
                    Control::Stdin => {
                        let open = stdin_lines.fill(stdin.as_fd());
                        while let Some(line) = stdin_lines.next() {
                            if line.is_empty() {
                                continue;
                            }
                            let (answer, after) = self.command(&line);
                            let mut out = io::stdout().lock();
                            // The coordinator may be gone: its end of stdin tells.
                            let _ = writeln!(out, "{answer}").and_then(|()| out.flush());
                            if let After::Exit = after {
                                return Ok(());
                            }
                        }
                        if !open {
                            closed = Some("end of stdin (coordinator gone?)");
                        }
                    }
                    Control::Socket(conn) => {
                        let mut open = conn.lines.fill(conn.stream.as_fd());
                        while let Some(line) = conn.lines.next() {
                            if line.is_empty() {
                                continue;
                            }
                            let (answer, after) = self.command(&line);
                            let sent = conn.send(&answer);
                            if let After::Exit = after {
                                return Ok(());
                            }
                            if !sent {
                                open = false;
                                break;
                            }
                        }
                        if !open {
                            closed = Some("the adopter's connection closed");
                        }
                    }
                    Control::Grace(_) => {}
                }
                if let Some(why) = closed {
                    control = self.grace_start(why);
                }
            }

            // Connections waiting to adopt, in arrival order.
            let mut kept = Vec::with_capacity(pending.len());
            for (mut conn, readable) in std::mem::take(&mut pending).into_iter().zip(pending_ready)
            {
                if !readable {
                    kept.push(conn);
                    continue;
                }
                let mut open = conn.lines.fill(conn.stream.as_fd());
                let mut adopted = false;
                while let Some(line) = conn.lines.next() {
                    match line.as_str() {
                        "" => continue,
                        "adopt" if matches!(control, Control::Grace(_)) => {
                            adopted = true;
                            break;
                        }
                        "adopt" => {
                            conn.send("busy");
                            open = false;
                            break;
                        }
                        _ => {
                            if !conn.send("error send adopt first") {
                                open = false;
                                break;
                            }
                        }
                    }
                }
                if adopted {
                    if conn.send(&self.adopted()) {
                        log!(
                            "adopted: a client took control through {}",
                            self.sock.display()
                        );
                        control = Control::Socket(conn);
                    } else {
                        log!("an adopter went away before its answer");
                    }
                } else if open {
                    kept.push(conn);
                }
            }
            pending = kept;
            if matches!(control, Control::Socket(_)) {
                for mut conn in pending.drain(..) {
                    conn.send("busy");
                }
            }

            if accept_ready {
                loop {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log!("accept on {}: {e}", self.sock.display());
                            break;
                        }
                    };
                    let Ok(mut conn) = Conn::new(stream) else {
                        continue;
                    };
                    if !matches!(control, Control::Grace(_)) || pending.len() >= MAX_PENDING {
                        conn.send("busy");
                    } else {
                        pending.push(conn);
                    }
                }
            }

            if let Control::Grace(deadline) = control {
                if Instant::now() >= deadline {
                    self.cleanup();
                    log!(
                        "grace period of {} s over with no adopter: removed the json and the socket; checkpoint memory freed",
                        self.grace.as_secs()
                    );
                    return Ok(());
                }
            }
        }
    }
}
