//! Test harness: starts a real `mome-agent` on a temporary job directory and
//! talks to it as a rank would, over its unix socket.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mome_protocol::config::ByteSize;
use mome_protocol::frame::{self, HEADER};
use mome_protocol::job::{JobDir, JobSpec};
use mome_protocol::rank::{AgentReply, Channel, ErrorCode, RankRequest};
use mome_protocol::{Config, WindowLayout, PROTOCOL_VERSION};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub const JOB_ID: &str = "20260101-000000-test";

/// Test window: 1 GiB (64 heaps of private zone), 64 MiB segments (8 slots).
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.window.size = ByteSize(1 << 30);
    c.window.segment_reserve = ByteSize(64 << 20);
    c
}

pub struct Agent {
    pub home: tempfile::TempDir,
    pub job: JobDir,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    /// The agent's events, after the ready line.
    pub stdout: BufReader<ChildStdout>,
    pub log_path: PathBuf,
    pub layout: WindowLayout,
    /// Node number (0 unless started by [`start_cluster`]).
    pub node: u32,
    /// Several nodes: the address the agent listens on for its peers.
    pub peer_addr: Option<String>,
}

impl Agent {
    /// Starts an agent for a job of `nranks` ranks, serving `local` (e.g. "0,1,2").
    pub fn start(nranks: u32, local: &str) -> Agent {
        Self::start_in(tempfile::tempdir().unwrap(), nranks, local)
    }

    pub fn start_in(home: tempfile::TempDir, nranks: u32, local: &str) -> Agent {
        Self::start_with(home, nranks, local, &[])
    }

    /// Starts an agent with extra arguments (e.g. `--restore`), in `home`
    /// (job.yaml is written again, the log appended to).
    pub fn start_with(home: tempfile::TempDir, nranks: u32, local: &str, extra: &[&str]) -> Agent {
        let job = write_job(home.path(), nranks);
        let log_path = home.path().join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mome-agent"))
            .arg("--job-dir")
            .arg(&job.path)
            .args(["--node", "0", "--nodes", "1", "--ranks", local])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let stdin = child.stdin.take();
        let agent = Agent {
            home,
            job,
            child,
            stdin,
            stdout,
            log_path,
            layout: test_config().layout(),
            node: 0,
            peer_addr: None,
        };
        assert_eq!(
            line,
            "ready\n",
            "agent did not start; log:\n{}",
            agent.log()
        );
        agent
    }

    /// Sends one command line on the agent's stdin.
    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Next event line from the agent's stdout, as JSON (blocks; the agent
    /// writes every event it has, and the test times out otherwise).
    pub fn event(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "agent stdout closed; log:\n{}", self.log());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"))
    }

    /// Events until one named `name` (skipping progress), which is returned.
    pub fn event_named(&mut self, name: &str) -> serde_json::Value {
        loop {
            let e = self.event();
            if e["event"] == name {
                return e;
            }
            assert_eq!(
                e["event"],
                "progress",
                "waiting for {name}: {e}; log:\n{}",
                self.log()
            );
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.job.agent_socket(self.node)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (bounded) for the log to contain `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) for the agent to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the agent by closing its stdin; returns its log.
    pub fn stop(&mut self) -> String {
        self.stdin.take();
        let status = self.wait_exit();
        assert!(status.success(), "{status}; log:\n{}", self.log());
        self.log()
    }

    pub fn connect(&self, rank: u32, channel: Channel) -> Rank {
        Rank::connect(self, rank, channel, JOB_ID)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Secret written by [`start_cluster`].
pub const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Starts one agent per entry of `placement` (the ranks of that node, e.g.
/// "0,1"), for a job of `nranks` ranks with `config`, connects them and
/// waits until each says mesh_ready. Node 0's agent owns the directory.
pub fn start_cluster(nranks: u32, placement: &[&str], config: Config) -> Vec<Agent> {
    let home = tempfile::tempdir().unwrap();
    let nodes = placement.len() as u32;
    let job = write_cluster_job(home.path(), nranks, nodes, &config);
    let mut agents = Vec::new();
    let mut home = Some(home);
    for (k, local) in placement.iter().enumerate() {
        let dir = home.take().unwrap_or_else(|| tempfile::tempdir().unwrap());
        agents.push(spawn_node(dir, &job, k as u32, nodes, local, &config));
    }
    let addrs: Vec<String> = agents
        .iter()
        .map(|a| a.peer_addr.clone().unwrap())
        .collect();
    let peers = serde_json::json!({"cmd": "peers", "addrs": addrs}).to_string();
    for a in agents.iter_mut() {
        a.command(&peers);
    }
    for a in agents.iter_mut() {
        let e = a.event_named("mesh_ready");
        assert!(e["elapsed_us"].is_u64(), "{e}");
    }
    agents
}

/// Starts agent `k` of `nodes` for job `job` (written already, with its
/// secret) and reads its `ready <addr>` line; `home` is kept alive with it.
pub fn spawn_node(
    home: tempfile::TempDir,
    job: &JobDir,
    k: u32,
    nodes: u32,
    local: &str,
    config: &Config,
) -> Agent {
    let log_path = job.path.join(format!("agent-{k}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mome-agent"))
        .arg("--job-dir")
        .arg(&job.path)
        .args(["--node", &k.to_string(), "--nodes", &nodes.to_string()])
        .args(["--ranks", local])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("ready ")
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|| {
            panic!(
                "agent {k} said {line:?}; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
    Agent {
        home,
        job: job.clone(),
        stdin: child.stdin.take(),
        child,
        stdout,
        log_path,
        layout: config.layout(),
        node: k,
        peer_addr: Some(addr),
    }
}

/// job.yaml of a job of `nodes` nodes, and its secret ([`SECRET`]).
pub fn write_cluster_job(
    home: &std::path::Path,
    nranks: u32,
    nodes: u32,
    config: &Config,
) -> JobDir {
    let job = write_job_with(home, nranks, nodes, config.clone());
    std::fs::write(job.path.join("secret"), format!("{SECRET}\n")).unwrap();
    job
}

pub fn write_job(home: &std::path::Path, nranks: u32) -> JobDir {
    write_job_with(home, nranks, 1, test_config())
}

pub fn write_job_with(home: &std::path::Path, nranks: u32, nodes: u32, config: Config) -> JobDir {
    let job = JobDir::new(home, JOB_ID);
    std::fs::create_dir_all(&job.path).unwrap();
    let spec = JobSpec {
        id: JOB_ID.into(),
        command: "/bin/true".into(),
        argv: vec!["true".into()],
        env: BTreeMap::new(),
        cwd: "/".into(),
        ranks: nranks,
        nodes,
        started: mome_protocol::job::now_rfc3339(),
        config,
        pids_pinned: false,
        pids_note: None,
        binary_xxh3: None,
        incarnation: 0,
        restored_from: None,
        ..Default::default()
    };
    job.write_spec(&spec).unwrap();
    job
}

/// A sync-channel request, numbered when sent.
#[derive(Debug, Clone, Copy)]
pub enum SyncReq {
    Barrier,
    Lock(u64),
    Unlock(u64),
    TryLock(u64),
    Keyed(u64, u32),
}

/// A reply, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Welcome {
        layout: WindowLayout,
        node: u32,
        nodes: u32,
        nranks: u32,
    },
    Ok,
    Heaps {
        first: u32,
        count: u32,
    },
    Segment {
        id: u32,
        addr: u64,
        size: u64,
    },
    BarrierDone {
        date: u64,
    },
    KeyedBarrierDone {
        serial: bool,
    },
    Resume {
        stamp: u64,
    },
    Image {
        addr: u64,
        len: u64,
    },
    Error(ErrorCode, String),
    /// Block addresses (ShmallocTake).
    Frees(Vec<u64>),
    /// The agent closed the connection.
    Closed,
    /// Nothing within the read timeout.
    Nothing,
}

impl Got {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Got::Error(c, _) => Some(*c),
            _ => None,
        }
    }
}

fn own(reply: AgentReply<'_>) -> Got {
    match reply {
        AgentReply::Welcome {
            layout,
            node,
            nodes,
            nranks,
        } => Got::Welcome {
            layout,
            node,
            nodes,
            nranks,
        },
        AgentReply::Ok => Got::Ok,
        AgentReply::Heaps { first, count } => Got::Heaps { first, count },
        AgentReply::Segment { id, addr, size } => Got::Segment { id, addr, size },
        AgentReply::BarrierDone { date } => Got::BarrierDone { date },
        AgentReply::KeyedBarrierDone { serial } => Got::KeyedBarrierDone { serial },
        AgentReply::Resume { stamp } => Got::Resume { stamp },
        AgentReply::Image { addr, len } => Got::Image { addr, len },
        AgentReply::Error { code, message } => Got::Error(code, message.to_string()),
        AgentReply::Frees { addrs } => Got::Frees(
            addrs
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ),
    }
}

/// One connection, as the preload library opens it.
pub struct Rank {
    pub sock: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// The node memfd, on the memory channel.
    pub memfd: Option<OwnedFd>,
    pub welcome: Got,
    /// Sequence number of the last sync request sent.
    pub seq: u64,
}

impl Rank {
    /// Connects and says Hello; panics unless welcomed.
    pub fn connect(agent: &Agent, rank: u32, channel: Channel, jobid: &str) -> Rank {
        let mut r = Rank::raw(agent);
        let got = r.hello(rank, channel, jobid, PROTOCOL_VERSION);
        assert!(
            matches!(got, Got::Welcome { .. }),
            "{got:?}; log:\n{}",
            agent.log()
        );
        r.welcome = got;
        r.memfd = r.fds.pop();
        assert_eq!(r.memfd.is_some(), channel == Channel::Memory);
        r
    }

    /// A connection without Hello.
    pub fn raw(agent: &Agent) -> Rank {
        let sock = UnixStream::connect(agent.socket()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Rank {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
            memfd: None,
            welcome: Got::Nothing,
            seq: 0,
        }
    }

    pub fn hello(&mut self, rank: u32, channel: Channel, jobid: &str, protocol: u32) -> Got {
        self.hello_as(rank, channel, jobid, protocol, false)
    }

    pub fn hello_as(
        &mut self,
        rank: u32,
        channel: Channel,
        jobid: &str,
        protocol: u32,
        restoring: bool,
    ) -> Got {
        self.call(&RankRequest::Hello {
            protocol,
            rank,
            pid: std::process::id() as i32,
            channel,
            jobid,
            restoring,
        })
    }

    /// Connects as a rank being restored from a checkpoint.
    pub fn connect_restoring(agent: &Agent, rank: u32, channel: Channel) -> Rank {
        let mut r = Rank::raw(agent);
        let got = r.hello_as(rank, channel, JOB_ID, PROTOCOL_VERSION, true);
        assert!(
            matches!(got, Got::Welcome { .. }),
            "{got:?}; log:\n{}",
            agent.log()
        );
        r.welcome = got;
        r.memfd = r.fds.pop();
        r
    }

    pub fn send(&mut self, req: &RankRequest<'_>) {
        let mut buf = [0u8; 4096];
        let n = frame::encode(req, &mut buf).unwrap();
        self.sock.write_all(&buf[..n]).unwrap();
    }

    pub fn send_with_fd(&mut self, req: &RankRequest<'_>, fd: RawFd) {
        let mut buf = [0u8; 4096];
        let n = frame::encode(req, &mut buf).unwrap();
        let fds = [fd];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&buf[..n])],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, n);
    }

    /// Sends a sync request with the next sequence number.
    pub fn send_sync(&mut self, kind: SyncReq) {
        self.seq += 1;
        let seq = self.seq;
        self.send(&match kind {
            SyncReq::Barrier => RankRequest::Barrier { seq },
            SyncReq::Lock(id) => RankRequest::Lock { id, seq },
            SyncReq::Unlock(id) => RankRequest::Unlock { id, seq },
            SyncReq::TryLock(id) => RankRequest::TryLock { id, seq },
            SyncReq::Keyed(id, count) => RankRequest::KeyedBarrier { id, count, seq },
        });
    }

    pub fn call_sync(&mut self, kind: SyncReq) -> Got {
        self.send_sync(kind);
        self.recv()
    }

    pub fn call(&mut self, req: &RankRequest<'_>) -> Got {
        self.send(req);
        self.recv()
    }

    /// Next reply, `Closed` at end of stream, `Nothing` on read timeout.
    pub fn recv(&mut self) -> Got {
        loop {
            if self.buf.len() >= HEADER {
                let len = frame::body_len(self.buf[..HEADER].try_into().unwrap()).unwrap();
                if self.buf.len() >= HEADER + len {
                    let body: Vec<u8> = self.buf.drain(..HEADER + len).skip(HEADER).collect();
                    return own(frame::decode::<AgentReply>(&body).unwrap());
                }
            }
            let mut chunk = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let got = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let msg = match got {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Got::Nothing,
                Err(nix::errno::Errno::ECONNRESET) => return Got::Closed,
                // A signal to the test process (a child's SIGCHLD).
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("recvmsg: {e}"),
            };
            let n = msg.bytes;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: received descriptors, owned by nobody else.
                    self.fds.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            if n == 0 {
                return Got::Closed;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits up to `ms` for a reply.
    pub fn recv_within(&mut self, ms: u64) -> Got {
        self.sock
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let got = self.recv();
        self.sock
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        got
    }

    /// Reads until the agent closes the connection; panics on a reply.
    pub fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.sock.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes {rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

/// pread of `len` bytes of the memfd at `offset`.
pub fn pread(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let n = nix::sys::uio::pread(fd, &mut v, offset as i64).unwrap();
    assert_eq!(n, len);
    v
}

pub fn pwrite(fd: &OwnedFd, offset: u64, data: &[u8]) {
    let n = nix::sys::uio::pwrite(fd, data, offset as i64).unwrap();
    assert_eq!(n, data.len());
}

/// Polls `f` until it returns true, for at most 1 s.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
