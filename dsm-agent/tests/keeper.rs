//! mome-keeper as real processes: the private tmpfs reached through
//! /proc/<pid>/root, its limit and usage, `end`, kill -9 (the data is gone),
//! end of stdin (grace period, adoption over the socket, expiry), a second
//! keeper of the same node, and the refusal without CAP_SYS_ADMIN.
//!
//! The keeper needs root; as another user every test says so and passes.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const KEEPER: &str = env!("CARGO_BIN_EXE_mome-keeper");
const MIB: usize = 1 << 20;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mome-keeper needs root (CAP_SYS_ADMIN) to mount its private tmpfs");
        return false;
    }
    true
}

struct Keeper {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    log: Receiver<String>,
    pid: u32,
    /// The store path of the ready line.
    path: PathBuf,
    node: u32,
    dir: tempfile::TempDir,
}

fn spawn(dir: &Path, node: u32, extra: &[&str]) -> Child {
    Command::new(KEEPER)
        .arg("--job-dir")
        .arg(dir)
        .args(["--node", &node.to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mome-keeper")
}

/// Forwards the keeper's stderr to the test's and hands each line over.
fn follow_log(child: &mut Child) -> Receiver<String> {
    let err = child.stderr.take().expect("stderr piped");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Keeper {
    fn start(extra: &[&str]) -> Keeper {
        Keeper::start_in(tempfile::tempdir().expect("tempdir"), 0, extra)
    }

    fn start_in(dir: tempfile::TempDir, node: u32, extra: &[&str]) -> Keeper {
        let mut child = spawn(dir.path(), node, extra);
        let log = follow_log(&mut child);
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        let fields: Vec<&str> = line.trim_end().splitn(3, ' ').collect();
        assert_eq!(fields.len(), 3, "ready line: {line:?}");
        assert_eq!(fields[0], "ready", "ready line: {line:?}");
        let pid: u32 = fields[1].parse().expect("pid in the ready line");
        let path = PathBuf::from(fields[2]);
        Keeper {
            child,
            stdin,
            out,
            log,
            pid,
            path,
            node,
            dir,
        }
    }

    fn keepers(&self) -> PathBuf {
        fs::canonicalize(self.dir.path()).unwrap().join("keepers")
    }
    fn host_dir(&self) -> PathBuf {
        self.keepers().join(format!("node-{}", self.node))
    }
    fn json(&self) -> PathBuf {
        self.keepers().join(format!("node-{}.json", self.node))
    }
    fn sock(&self) -> PathBuf {
        self.keepers().join(format!("node-{}.sock", self.node))
    }

    /// One command on stdin, its answer on stdout.
    fn cmd(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut answer = String::new();
        self.out.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    }

    /// Closes stdin and waits until the keeper says its grace period started.
    fn close_stdin(&mut self) {
        drop(self.stdin.take());
        self.wait_log("keeping the checkpoint memory");
    }

    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?} within 5 s"),
            }
        }
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keeper still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn usage(&mut self) -> (u64, u64) {
        parse_usage(&self.cmd("usage"))
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_usage(answer: &str) -> (u64, u64) {
    let fields: Vec<&str> = answer.split(' ').collect();
    assert_eq!(fields.len(), 3, "usage answer: {answer:?}");
    assert_eq!(fields[0], "usage", "usage answer: {answer:?}");
    (fields[1].parse().unwrap(), fields[2].parse().unwrap())
}

/// A client of the keeper's socket.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let stream = UnixStream::connect(sock).expect("connect to the keeper's socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stream, "{line}").unwrap();
        self.line()
    }

    fn line(&mut self) -> String {
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .expect("an answer from the keeper");
        answer.trim_end().to_string()
    }

    fn at_eof(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .expect("end of file from the keeper")
            == 0
    }
}

fn mnt_ns(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap().ino()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ready_line_and_record() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&["--limit", "1048576"]);
    assert_eq!(k.pid, k.child.id());
    let expected = format!("/proc/{}/root{}", k.pid, k.host_dir().display());
    assert_eq!(k.path, PathBuf::from(&expected));
    assert!(k.path.is_dir(), "store path reachable");

    let record: serde_json::Value = serde_json::from_slice(&fs::read(k.json()).unwrap()).unwrap();
    assert_eq!(record["node"], 0);
    assert_eq!(record["pid"], k.pid);
    assert_eq!(record["path"], expected.as_str());
    assert_eq!(record["limit"], 1048576);
    assert!(
        record["started"].as_str().unwrap().ends_with('Z'),
        "{record}"
    );
    assert_eq!(mode(&k.json()), 0o600);
    assert_eq!(mode(&k.sock()), 0o600);
    assert_eq!(mode(&k.host_dir()), 0o700);
    assert_eq!(mode(&k.keepers()), 0o700);
    // The mount is the keeper's own: another mount namespace than ours.
    assert_ne!(mnt_ns(k.pid), mnt_ns(std::process::id()));
    assert_eq!(k.cmd("bogus stuff"), "error unknown command: bogus stuff");
    assert_eq!(k.cmd("end"), "ended");
    assert!(k.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn no_limit_is_null_in_the_record() {
    if !root() {
        return;
    }
    let mut k = Keeper::start_in(tempfile::tempdir().unwrap(), 7, &[]);
    let record: serde_json::Value = serde_json::from_slice(&fs::read(k.json()).unwrap()).unwrap();
    assert_eq!(record["node"], 7);
    assert!(record["limit"].is_null(), "{record}");
    assert_eq!(k.usage().1, 0);
}

#[test]
fn store_is_reachable_through_proc_only() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    let data = b"checkpoint page bytes";
    fs::write(k.path.join("page"), data).unwrap();
    assert_eq!(fs::read(k.path.join("page")).unwrap(), data);
    // The host sees the empty directory under the mount.
    assert!(!k.host_dir().join("page").exists());
    assert_eq!(fs::read_dir(k.host_dir()).unwrap().count(), 0);
    // And it is a tmpfs.
    let st = nix::sys::statfs::statfs(&k.path).unwrap();
    assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    assert_eq!(k.cmd("end"), "ended");
}

#[test]
fn usage_counts_a_file() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&["--limit", &(4 * MIB).to_string()]);
    let (before, limit) = k.usage();
    assert_eq!(limit, 4 * MIB as u64);
    fs::write(k.path.join("one-mib"), vec![7u8; MIB]).unwrap();
    let (after, _) = k.usage();
    assert!(
        after >= before + MIB as u64 && after <= before + MIB as u64 + 64 * 1024,
        "usage {before} -> {after} after writing 1 MiB"
    );
    fs::remove_file(k.path.join("one-mib")).unwrap();
    assert_eq!(k.usage().0, before);
}

#[test]
fn limit_makes_writes_fail_with_enospc() {
    if !root() {
        return;
    }
    let k = Keeper::start(&["--limit", "1048576"]);
    let mut file = fs::File::create(k.path.join("too-big")).unwrap();
    let err = file
        .write_all(&vec![1u8; 2 * MIB])
        .expect_err("2 MiB into a 1 MiB tmpfs");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
}

#[test]
fn end_exits_and_frees_the_store() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    fs::write(k.path.join("page"), b"x").unwrap();
    assert_eq!(k.cmd("end"), "ended");
    // `ended` comes after the cleanup.
    assert!(!k.json().exists());
    assert!(!k.sock().exists());
    assert!(k.wait_exit(Duration::from_secs(5)).success());
    assert!(!k.path.exists());
    assert!(!k.host_dir().exists());
    k.wait_log("end: unmounted");
}

#[test]
fn kill_9_loses_the_data_and_a_new_keeper_starts_over() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    fs::write(k.path.join("page"), b"lost with the node").unwrap();
    let ns = mnt_ns(k.pid);
    k.child.kill().unwrap();
    k.child.wait().unwrap();
    assert!(!k.path.exists(), "store path unreachable after kill -9");
    // Nothing is left in the keeper's mount namespace, so it and its tmpfs are gone.
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(meta) = fs::metadata(entry.path().join("ns/mnt")) {
            assert_ne!(
                meta.ino(),
                ns,
                "{} is in the dead keeper's namespace",
                entry.path().display()
            );
        }
    }
    // The host never saw the data.
    assert!(!k.host_dir().join("page").exists());

    // A new keeper of the node replaces the stale socket and json.
    let dir = std::mem::replace(&mut k.dir, tempfile::tempdir().unwrap());
    let mut again = Keeper::start_in(dir, 0, &[]);
    again.wait_log("removing the stale socket");
    assert!(!again.path.join("page").exists());
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(again.json()).unwrap()).unwrap();
    assert_eq!(record["pid"], again.pid);
    assert_eq!(again.cmd("end"), "ended");
}

#[test]
fn a_second_keeper_of_a_live_node_is_refused() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    let out = Command::new(KEEPER)
        .arg("--job-dir")
        .arg(k.dir.path())
        .args(["--node", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one is untouched.
    assert_eq!(k.usage().1, 0);
    assert!(k.sock().exists());
}

#[test]
fn end_of_stdin_keeps_the_data_for_an_adopter() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    fs::write(k.path.join("page"), b"survives the coordinator").unwrap();
    // Controlled on stdin: the socket says busy.
    let mut early = Client::connect(&k.sock());
    assert_eq!(early.line(), "busy");
    assert!(early.at_eof());

    k.close_stdin();
    assert!(
        k.child.try_wait().unwrap().is_none(),
        "keeper alive after end of stdin"
    );
    assert!(k.json().exists());

    let mut idle = Client::connect(&k.sock());
    assert_eq!(idle.cmd("usage"), "error send adopt first");
    let mut adopter = Client::connect(&k.sock());
    assert_eq!(
        adopter.cmd("adopt"),
        format!("adopted {} {}", k.pid, k.path.display())
    );
    k.wait_log("adopted");
    assert_eq!(
        fs::read(k.path.join("page")).unwrap(),
        b"survives the coordinator"
    );
    let (used, limit) = parse_usage(&adopter.cmd("usage"));
    assert!(used > 0 && limit == 0);
    // Waiting clients and newcomers are turned away while the adopter controls.
    assert_eq!(idle.line(), "busy");
    assert!(idle.at_eof());
    let mut second = Client::connect(&k.sock());
    assert_eq!(second.line(), "busy");
    assert!(second.at_eof());

    // The adopter goes: a new grace period, a new adopter.
    drop(adopter);
    k.wait_log("the adopter's connection closed");
    let mut next = Client::connect(&k.sock());
    assert_eq!(
        next.cmd("adopt"),
        format!("adopted {} {}", k.pid, k.path.display())
    );
    assert_eq!(
        fs::read(k.path.join("page")).unwrap(),
        b"survives the coordinator"
    );
    assert_eq!(next.cmd("end"), "ended");
    assert!(k.wait_exit(Duration::from_secs(5)).success());
    assert!(!k.path.exists());
    assert!(!k.json().exists() && !k.sock().exists());
}

#[test]
fn grace_period_expires_without_adopter() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&["--grace", "1"]);
    fs::write(k.path.join("page"), b"x").unwrap();
    let start = Instant::now();
    k.close_stdin();
    let status = k.wait_exit(Duration::from_secs(3));
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "left after {:?}",
        start.elapsed()
    );
    k.wait_log("grace period of 1 s over");
    assert!(!k.json().exists());
    assert!(!k.sock().exists());
    assert!(!k.path.exists());
    match UnixStream::connect(k.sock()) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound),
        Ok(_) => panic!("socket still answers"),
    }
}

#[test]
fn sigterm_ends_and_cleans_up() {
    if !root() {
        return;
    }
    let mut k = Keeper::start(&[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(k.wait_exit(Duration::from_secs(5)).success());
    assert!(!k.json().exists() && !k.sock().exists());
}

#[test]
fn without_cap_sys_admin_it_says_so() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(KEEPER)
        .arg("--job-dir")
        .arg(dir.path())
        .args(["--node", "0"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("need CAP_SYS_ADMIN for a private tmpfs per node"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
