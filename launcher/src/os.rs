//! Thin wrappers over the process and file-descriptor calls the launcher
//! makes directly: waiting for children without blocking, signalling
//! processes and groups, listing a process's children, polling a single fd.
//!
//! They return `std::io::Error` (with the errno) and leave the wording of
//! errors to the modules that know what was being attempted.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use mome_protocol::job::ProcessState;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// Largest write to a pipe that POLLOUT guarantees will not block.
pub const PIPE_BUF: usize = libc::PIPE_BUF;

/// Sets O_NONBLOCK on a file description this process owns alone (a pipe
/// end it created), never on an inherited one such as a terminal: the flag
/// belongs to the description, shared with every process holding it.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Whether `fd` can be written without blocking right now.
pub fn writable_now(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLOUT | PollFlags::POLLERR))
}

/// Converts a `Duration` to a poll timeout, rounding up so that a wait for
/// 0.4 ms does not become a busy loop of zero-timeout polls.
pub fn poll_timeout(wait: Option<Duration>) -> PollTimeout {
    match wait {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128);
            PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// One child that changed state, from `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    pub state: ProcessState,
}

/// Reaps one terminated child of this process (`pid` = -1: any child)
/// without blocking. `Ok(None)` when none has terminated (or there is no
/// child at all).
///
/// libc rather than nix: nix turns a child killed by a real-time signal into
/// an error, which would lose that child's status after reaping it.
pub fn reap(pid: i32) -> io::Result<Option<Reaped>> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int into `status`, which lives across the call.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if got < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ECHILD) => Ok(None),
            _ => Err(err),
        };
    }
    if got == 0 {
        return Ok(None);
    }
    let state = if libc::WIFEXITED(status) {
        ProcessState::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ProcessState::Killed(libc::WTERMSIG(status))
    } else {
        // Without WUNTRACED/WCONTINUED waitpid reports only terminations.
        return Ok(None);
    };
    Ok(Some(Reaped { pid: got, state }))
}

/// Sends `signal` to a process; `Ok(false)` when it no longer exists.
pub fn signal_process(pid: i32, signal: i32) -> io::Result<bool> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    signal_result(rc)
}

/// Sends `signal` to every process of group `pgid`; `Ok(false)` when the
/// group is empty.
pub fn signal_group(pgid: i32, signal: i32) -> io::Result<bool> {
    if pgid <= 1 {
        // kill(-1, ...) or kill(0, ...) would reach far more than a job.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: as in `signal_process`; a negative pid names the group.
    let rc = unsafe { libc::kill(-pgid, signal) };
    signal_result(rc)
}

fn signal_result(rc: libc::c_int) -> io::Result<bool> {
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(err),
    }
}

/// Whether a process with this pid exists (possibly as a zombie, or owned by
/// another user).
pub fn process_exists(pid: i32) -> bool {
    pid > 0 && !matches!(signal_process(pid, 0), Ok(false))
}

/// Whether `pid` is a zombie (terminated, not yet reaped by its parent).
pub fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|(state, _)| state == 'Z')
}

/// Pids of the live (non-zombie) children of `parent`, from /proc.
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(stat_fields(pid), Some((state, ppid)) if ppid == parent && state != 'Z'))
        .collect()
}

/// State letter and parent pid of a process, from /proc/<pid>/stat.
fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses, so
    // parse from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The argv[0] of a running process, from /proc/<pid>/cmdline.
pub fn process_argv0(pid: i32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|&b| b == 0).next()?;
    Some(String::from_utf8_lossy(first).into_owned())
}

/// Whether `signal` was ignored (SIG_IGN) when this process started: a
/// launcher run under `nohup`, or in the background of a non-interactive
/// shell, keeps ignoring what it was told to ignore.
pub fn signal_ignored(signal: i32) -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; with a null new
    // action, sigaction only reads the current disposition into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Whether `fd` is a terminal and this process is in its foreground process
/// group (reading it would not stop us with SIGTTIN).
pub fn in_foreground_of(fd: BorrowedFd<'_>) -> bool {
    match nix::unistd::tcgetpgrp(fd) {
        Ok(pgrp) => pgrp == nix::unistd::getpgrp(),
        Err(_) => false,
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: impl AsFd) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// What kind of file an output fd is, to decide how to write to it without
/// blocking the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A regular file or a device that never blocks (/dev/null): write all.
    NeverBlocks,
    /// A pipe, socket or terminal: write at most PIPE_BUF after POLLOUT.
    MayBlock,
}

pub fn output_kind(fd: BorrowedFd<'_>) -> OutputKind {
    match nix::sys::stat::fstat(fd) {
        Ok(st) => {
            let fmt = st.st_mode & libc::S_IFMT;
            if fmt == libc::S_IFREG
                || fmt == libc::S_IFBLK
                || (fmt == libc::S_IFCHR && !is_terminal(fd))
            {
                OutputKind::NeverBlocks
            } else {
                OutputKind::MayBlock
            }
        }
        Err(_) => OutputKind::MayBlock,
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "an unknown kernel".to_string())
}

/// Raises the soft limit on open files to what `wanted` needs, up to the
/// hard limit; returns the soft limit to give back to children.
pub fn raise_nofile_limit(wanted: u64) -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard)?;
    }
    Ok((soft, hard))
}

/// Reads what is available from a non-blocking fd: `Ok(0)` at end of file,
/// `Err(WouldBlock)` when nothing is there yet.
pub fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One write(2), retried on EINTR.
pub fn write_some(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::write(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes `text` to stderr, ignoring failure: an error message must not
/// turn into a panic because stderr is a closed pipe.
pub fn print_stderr(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Writes `text` to stdout; false when stdout is gone (`| head`), which is
/// not worth a panic either.
pub fn print_stdout(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}
