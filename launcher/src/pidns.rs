//! Pid pinning: each rank runs in a pid namespace (and a mount namespace
//! with its own /proc) of its own, at a pid that is the same at every
//! (re)start of that rank, so that a restored program finds the
//! getpid()/gettid() it had.
//!
//! Three processes per rank, all of `mome-rankinit` but the last:
//!
//! ```text
//! mome-run ── relay (mome-run's namespace) ── init (pid 1) ── rank (pid 100 + rank)
//! ```
//!
//! * The *relay* is what mome-run forks, waits for and signals as "the
//!   rank": it ends the way the rank ended (same exit code, or killed by
//!   the same signal), so mome-run's exit handling sees what the rank did.
//!   A pid namespace's init cannot die of a signal it sends itself, hence
//!   this extra process.
//! * The *init* mounts /proc (after making every mount private), writes
//!   `ns_last_pid` so that its next child gets the pinned pid, forks the
//!   rank, reaps every orphan of the namespace and hands the rank's wait
//!   status to the relay through a pipe. When it exits the kernel kills
//!   whatever is left in the namespace: nothing of a rank outlives it.
//! * The *rank* gets mome-run's signal mask, stdio, environment (the
//!   LD_PRELOAD value travels under [`PRELOAD_VAR`] so that mome-rankinit
//!   itself is not preloaded), ASLR-off persona, rlimits and process group.
//!
//! Signals: SIGTERM/SIGINT/SIGHUP/SIGQUIT sent to the relay by anyone but
//! mome-run go through the init to the rank. mome-run itself signals the
//! ranks' process group and each rank's own pid (seen from its namespace,
//! [`find_rank_pid`]), as it does without namespaces, so the relay does not
//! forward what mome-run sent (the rank would get it twice).
//!
//! This module holds both sides: what mome-run uses (the probe, finding a
//! rank's pid) and the body of `mome-rankinit` ([`rankinit_main`]).

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mome_protocol::config::PidNamespaceMode;

/// Environment variable overriding where mome-rankinit is found.
pub const RANKINIT_BIN_VAR: &str = "MOME_RANKINIT_BIN";
pub const RANKINIT_BIN_NAME: &str = "mome-rankinit";
/// LD_PRELOAD for the rank, passed to mome-rankinit under this name.
pub const PRELOAD_VAR: &str = "MOME_RANKINIT_PRELOAD";
/// The pid of rank r in its namespace is `RANK_PID_BASE + r`: distinct per
/// rank, for programs that put getpid() into file names.
pub const RANK_PID_BASE: i32 = 100;
/// How long the probe may take (it forks twice and mounts /proc).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("checkpoint.pid_namespace is `always`, but the ranks cannot be given pid namespaces here: {reason} (run as root, or set checkpoint.pid_namespace: auto)")]
    Required { reason: String },
}

/// The pinned pid of `rank` inside its namespace.
pub fn pinned_pid(rank: u32) -> i32 {
    RANK_PID_BASE + rank as i32
}

/// Whether the job's ranks get pinned pids, and why not when they do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidPinning {
    pub pinned: bool,
    pub note: Option<String>,
}

/// Where mome-rankinit is: MOME_RANKINIT_BIN, else next to `own_dir`.
pub fn locate_rankinit(own_dir: &Path) -> PathBuf {
    match std::env::var_os(RANKINIT_BIN_VAR).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => own_dir.join(RANKINIT_BIN_NAME),
    }
}

/// Applies checkpoint.pid_namespace: `never` pins nothing, `auto` pins when
/// the probe succeeds, `always` fails when it does not.
pub fn decide(mode: PidNamespaceMode, rankinit: &Path) -> Result<PidPinning, PidNsError> {
    if mode == PidNamespaceMode::Never {
        return Ok(PidPinning {
            pinned: false,
            note: Some("checkpoint.pid_namespace is never".into()),
        });
    }
    match probe(rankinit) {
        Ok(()) => Ok(PidPinning {
            pinned: true,
            note: None,
        }),
        Err(reason) if mode == PidNamespaceMode::Always => Err(PidNsError::Required { reason }),
        Err(reason) => Ok(PidPinning {
            pinned: false,
            note: Some(format!("pids are not pinned: {reason}")),
        }),
    }
}

/// Runs `mome-rankinit --probe`, which sets up a namespace as for a rank
/// (pid and mount namespaces, /proc, ns_last_pid) and exits.
pub fn probe(rankinit: &Path) -> Result<(), String> {
    if !rankinit.is_file() {
        return Err(format!(
            "{} does not exist (build the whole workspace, or set {RANKINIT_BIN_VAR})",
            rankinit.display()
        ));
    }
    let mut child = Command::new(rankinit)
        .arg("--probe")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", rankinit.display()))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{} --probe` did not finish within {}",
                    rankinit.display(),
                    humantime::format_duration(PROBE_TIMEOUT)
                ));
            }
            Err(e) => return Err(format!("waiting for `mome-rankinit --probe`: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut text);
    }
    let text = text
        .trim()
        .trim_start_matches("mome-rankinit: ")
        .to_string();
    Err(if text.is_empty() {
        format!("`mome-rankinit --probe` failed ({status})")
    } else {
        text
    })
}

/// The pid, in mome-run's namespace, of the rank under `relay` (relay ->
/// init -> rank whose innermost pid is `inner`); None while it is not
/// forked yet (or when it is already gone).
pub fn find_rank_pid(relay: i32, inner: i32) -> Option<i32> {
    for init in children(relay) {
        for rank in children(init) {
            if innermost_pid(rank) == Some(inner) {
                return Some(rank);
            }
        }
    }
    None
}

/// Waits (bounded) until the rank under `relay` exists; says what it waited
/// for when it gives up.
pub fn wait_rank_pid(relay: i32, inner: i32, timeout: Duration) -> Result<i32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = find_rank_pid(relay, inner) {
            return Ok(pid);
        }
        // A relay that ended (a zombie until mome-run reaps it) means a
        // rank that is already gone: nothing to wait for.
        let gone = !crate::os::process_exists(relay) || crate::os::is_zombie(relay);
        if Instant::now() >= deadline || gone {
            return Err(format!(
                "no process with pid {inner} in the namespace of mome-rankinit {relay} after {}",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Children of `pid`: /proc/<pid>/task/<pid>/children when the kernel has
/// it, else a scan of /proc.
fn children(pid: i32) -> Vec<i32> {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(text) => text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => crate::os::children_of(pid),
    }
}

/// The last field of `NSpid:` in /proc/<pid>/status: the pid as the
/// process's own namespace sees it.
fn innermost_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_nspid(&status)
}

fn parse_nspid(status: &str) -> Option<i32> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line["NSpid:".len()..]
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

// ---- mome-rankinit ----

/// What mome-rankinit was asked to run.
#[derive(Debug, Clone)]
pub struct RankExec {
    /// Pid the rank must have in its namespace.
    pub pid: i32,
    pub program: PathBuf,
    /// Full argv, argv[0] included.
    pub argv: Vec<OsString>,
}

/// The ending signals forwarded to the rank.
const FORWARDED: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// The body of mome-rankinit: `None` probes, `Some` runs a rank. Never
/// returns: the process ends as the rank did.
pub fn rankinit_main(exec: Option<RankExec>) -> ! {
    match relay(exec) {
        Ok(never) => match never {},
        Err(message) => {
            crate::os::print_stderr(&format!("mome-rankinit: {message}\n"));
            // SAFETY: _exit ends the process at once; nothing is pending.
            unsafe { libc::_exit(if exec_is_probe() { 1 } else { 127 }) }
        }
    }
}

// Set once, read after: whether this process is a probe (for its exit code).
static PROBE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
fn exec_is_probe() -> bool {
    PROBE.load(std::sync::atomic::Ordering::Relaxed)
}

enum Never {}

fn errno_text(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t that
    // lives on this stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The relay: blocks the signals it waits for, unshares the pid namespace,
/// forks the init, then relays signals and finally the rank's end.
fn relay(exec: Option<RankExec>) -> Result<Never, String> {
    PROBE.store(exec.is_none(), std::sync::atomic::Ordering::Relaxed);
    // Everything the child will need is built before fork (no allocation
    // should be needed between fork and exec, even if this process is
    // single-threaded).
    let prepared = match &exec {
        Some(e) => Some(Prepared::new(e)?),
        None => None,
    };
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = sigset(&waited);
    // SAFETY: a zeroed sigset_t is a valid out-parameter for sigprocmask.
    let mut original: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigprocmask reads `set` and writes `original`, both on this stack.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut original) } != 0 {
        return Err(errno_text("sigprocmask"));
    }
    // SAFETY: unshare takes flags only; the new pid namespace applies to
    // the children forked from here on.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(errno_text("cannot create a pid namespace (unshare)"));
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(errno_text("pipe"));
    }
    let (status_read, status_write) = (fds[0], fds[1]);
    // SAFETY: this process is single-threaded (mome-rankinit starts no
    // thread), so the child may go on running ordinary code after fork.
    let init = unsafe { libc::fork() };
    if init < 0 {
        return Err(errno_text("fork"));
    }
    if init == 0 {
        // SAFETY: closing our copy of the read end, which only the relay uses.
        unsafe { libc::close(status_read) };
        init_main(prepared.as_ref(), &original, status_write);
    }
    // SAFETY: closing the relay's copy of the write end: EOF on the read end
    // then means the init is gone.
    unsafe { libc::close(status_write) };
    // Out of the ranks' process group (unless we lead it: rank 0's relay),
    // so that what mome-run sends the group reaches the ranks only once.
    // SAFETY: getpgrp/getpid/setpgid take and return integers only.
    unsafe {
        if libc::getpgrp() != libc::getpid() {
            libc::setpgid(0, 0);
        }
    }
    release_stdio();
    let parent = std::os::unix::process::parent_id() as i32;
    loop {
        let (signal, sender, code) = wait_signal(&set);
        if signal == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: waitpid writes one int into `status`.
            let got = unsafe { libc::waitpid(init, &mut status, libc::WNOHANG) };
            if got == init {
                let reported = read_status(status_read);
                // The init's own status when it died before reporting (it
                // failed to set up, or was killed).
                end_like(reported.unwrap_or(status));
            }
        } else if !(code == libc::SI_USER && sender == parent) {
            // SAFETY: kill takes integers only.
            unsafe { libc::kill(init, signal) };
        }
    }
}

/// What the rank is exec'd with, as C strings.
struct Prepared {
    pid: i32,
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Prepared {
    fn new(exec: &RankExec) -> Result<Prepared, String> {
        let c = |b: &[u8]| CString::new(b).map_err(|_| "an argument holds a NUL byte".to_string());
        let program = c(exec.program.as_os_str().as_bytes())?;
        let argv = exec
            .argv
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k == PRELOAD_VAR {
                envp.push(c(&[b"LD_PRELOAD=", v.as_bytes()].concat())?);
            } else if k != "LD_PRELOAD" {
                envp.push(c(&[k.as_bytes(), b"=", v.as_bytes()].concat())?);
            }
        }
        Ok(Prepared {
            pid: exec.pid,
            program,
            argv,
            envp,
        })
    }
}

/// Points stdin and stdout at /dev/null: a relay or init holding the
/// rank's pipes would hide their end from mome-run (stderr stays, for
/// mome-rankinit's own messages).
fn release_stdio() {
    // SAFETY: open/dup2/close on fds this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

/// sigwaitinfo on `set`: (signal, sender pid, si_code).
fn wait_signal(set: &libc::sigset_t) -> (i32, i32, i32) {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigwaitinfo reads `set` and writes `info`.
        let signal = unsafe { libc::sigwaitinfo(set, &mut info) };
        if signal > 0 {
            // SAFETY: si_pid is valid to read for every signal; for kernel
            // signals it is 0.
            let sender = unsafe { info.si_pid() };
            return (signal, sender, info.si_code);
        }
    }
}

/// The wait status the init wrote, if it wrote one.
fn read_status(fd: i32) -> Option<i32> {
    let mut buf = [0u8; 4];
    // SAFETY: read writes at most 4 bytes into `buf`. The write end is
    // closed (the init exited), so this never blocks.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 4) };
    (n == 4).then(|| i32::from_ne_bytes(buf))
}

/// Ends this process as a process with wait status `status` did.
fn end_like(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: setrlimit/signal/sigprocmask/kill on this process only.
        // No core of the relay: the rank dumped its own if it was to.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(signal, libc::SIG_DFL);
            let set = sigset(&[signal]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            // A signal whose default is not to terminate cannot be
            // reproduced; say it with the shell's convention instead.
            libc::_exit(128 + signal)
        }
    }
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// The namespace's pid 1: sets up /proc, forks the rank at its pinned pid,
/// reaps, forwards, reports.
fn init_main(prepared: Option<&Prepared>, original: &libc::sigset_t, status_write: i32) -> ! {
    // SAFETY: prctl takes integers; the init dies with the relay (and with
    // it, the whole namespace).
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if let Err(message) = init_setup(prepared.map_or(2, |p| p.pid)) {
        crate::os::print_stderr(&format!("mome-rankinit: {message}\n"));
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(1) };
    }
    let Some(p) = prepared else {
        // The probe: the namespace works.
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(0) };
    };
    // SAFETY: single-threaded process (see relay): the child may run
    // ordinary code.
    let rank = unsafe { libc::fork() };
    if rank < 0 {
        crate::os::print_stderr(&format!("mome-rankinit: {}\n", errno_text("fork")));
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(1) };
    }
    if rank == 0 {
        exec_rank(p, original);
    }
    if rank != p.pid {
        crate::os::print_stderr(&format!(
            "mome-rankinit: the rank got pid {rank} instead of {} in its namespace\n",
            p.pid
        ));
        // SAFETY: kill/_exit take integers.
        unsafe {
            libc::kill(rank, libc::SIGKILL);
            libc::_exit(1)
        }
    }
    // Out of the ranks' process group: the rank stays in it (it inherited
    // it at fork), the init must not get the group's signals.
    // SAFETY: setpgid takes integers.
    unsafe { libc::setpgid(0, 0) };
    release_stdio();
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = sigset(&waited);
    loop {
        let (signal, _, _) = wait_signal(&set);
        if signal != libc::SIGCHLD {
            // SAFETY: kill takes integers.
            unsafe { libc::kill(rank, signal) };
            continue;
        }
        // Reap every child: the rank, and the orphans of the namespace.
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes one int into `status`.
            let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if got <= 0 {
                break;
            }
            if got == rank {
                let bytes = status.to_ne_bytes();
                // SAFETY: write reads 4 bytes from `bytes`; a pipe takes 4
                // bytes at once.
                unsafe {
                    libc::write(status_write, bytes.as_ptr().cast(), 4);
                    // Exiting kills what is left in the namespace.
                    libc::_exit(0)
                }
            }
        }
    }
}

/// Private mounts, a /proc of the namespace, the next pid.
fn init_setup(pid: i32) -> Result<(), String> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(errno_text("cannot create a mount namespace (unshare)"));
    }
    // SAFETY: mount with null source/type/data changes the propagation of
    // the existing tree; the strings are NUL-terminated literals.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(errno_text("cannot make the mounts private"));
    }
    // SAFETY: as above: NUL-terminated literals, no data.
    if unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(errno_text("cannot mount /proc for the namespace"));
    }
    // The next pid handed out is ns_last_pid + 1; nothing else runs in the
    // namespace to take it first.
    std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1))
        .map_err(|e| format!("cannot choose the rank's pid (ns_last_pid): {e}"))
}

/// In the rank: mome-run's signal mask back, die with the init, exec.
fn exec_rank(p: &Prepared, original: &libc::sigset_t) -> ! {
    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: signal/sigprocmask/prctl take a mask on our stack and integers;
    // execve gets NUL-terminated strings and null-terminated arrays that
    // live until it returns (it returns only on failure).
    unsafe {
        // The Rust runtime ignores SIGPIPE in mome-rankinit; the rank gets
        // the default back, as std's Command gives it to a rank without
        // pid pinning (`mome-run yes | head` ends `yes` by SIGPIPE).
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::sigprocmask(libc::SIG_SETMASK, original, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        libc::execve(p.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    let err = std::io::Error::last_os_error();
    crate::os::print_stderr(&format!(
        "mome-rankinit: cannot execute {}: {err}\n",
        p.program.to_string_lossy()
    ));
    let code = match err.raw_os_error() {
        Some(libc::ENOENT) => 127,
        _ => 126,
    };
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_is_the_innermost() {
        assert_eq!(
            parse_nspid("Name:\tx\nNSpid:\t4242\t101\nX: 1\n"),
            Some(101)
        );
        assert_eq!(parse_nspid("NSpid:\t7\n"), Some(7));
        assert_eq!(parse_nspid("Pid: 7\n"), None);
        assert_eq!(pinned_pid(3), 103);
    }

    #[test]
    fn never_pins_nothing() {
        let p = decide(PidNamespaceMode::Never, Path::new("/nonexistent")).unwrap();
        assert!(!p.pinned);
        let p = decide(PidNamespaceMode::Auto, Path::new("/nonexistent")).unwrap();
        assert!(!p.pinned && p.note.unwrap().contains("/nonexistent"));
        let e = decide(PidNamespaceMode::Always, Path::new("/nonexistent")).unwrap_err();
        assert!(e.to_string().contains("always"), "{e}");
    }
}
