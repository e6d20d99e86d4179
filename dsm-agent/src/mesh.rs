//! The connections of a multi-node agent to every other agent of its job:
//! one TCP connection per pair of nodes (node i connects to every node
//! below it and accepts the ones above), authenticated by the job's secret,
//! carrying [`PeerMsg`] frames in both directions.
//!
//! This file owns the transport: listening, connecting, the handshake, one
//! writer task per peer (which batches whatever is queued into one write),
//! one reader task per peer (which decodes, checks and hands every message
//! to [`crate::cluster::dispatch`]), heartbeats and the detection of failed
//! nodes. Messages to a peer not connected yet are queued, never lost; a
//! message to this node itself goes through a loopback queue, so the
//! protocol code never special-cases "the manager is me".
//!
//! A peer that breaks the protocol (malformed, oversized, truncated or
//! invalid frame) loses its connection with an error in the log; once
//! authenticated, that is a failed node for the job. Nothing a peer sends
//! can stop the agent.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mome_protocol::ckpt::AgentEvent;
use mome_protocol::frame::{self, FrameError, HEADER, MAX_FRAME};
use mome_protocol::peer::{PeerMsg, NONCE_LEN, PEER_PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::agent::{lock, Agent};
use crate::events::Events;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot read the job secret {path}: {source}")]
    SecretRead {
        path: String,
        source: std::io::Error,
    },
    #[error("the job secret {path} is not 64 hexadecimal digits")]
    SecretFormat { path: String },
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("connection closed inside a frame")]
    Truncated,
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("handshake: {0}")]
    Handshake(String),
}

/// Timings of the mesh (config `nodes:`).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub peer_timeout: Duration,
}

/// The job's shared secret, 32 bytes, from `<jobdir>/secret` (64 hex digits).
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn read(path: &std::path::Path) -> Result<Secret, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::SecretRead {
            path: path.display().to_string(),
            source,
        })?;
        Secret::parse(text.trim()).ok_or_else(|| MeshError::SecretFormat {
            path: path.display().to_string(),
        })
    }

    fn parse(hex: &str) -> Option<Secret> {
        if hex.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Secret(key))
    }

    /// Proof that the sender knows the secret, bound to both nonces, the
    /// job, and the side (so a proof cannot be reflected back).
    fn proof(&self, side: &[u8], job: &str, first: &[u8], second: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(side);
        h.update(&(job.len() as u64).to_le_bytes());
        h.update(job.as_bytes());
        h.update(first);
        h.update(second);
        h.finalize()
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    // SAFETY: getrandom writes at most `n.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != n.len() as isize {
        // Never expected on Linux >= 3.17; a predictable nonce would weaken
        // the handshake, so make it at least unique.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        n[..16].copy_from_slice(&t.to_le_bytes());
        n[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    }
    n
}

/// Bytes for one peer not written yet, and the socket to write them to.
#[derive(Debug, Default)]
struct Outbox {
    /// A descriptor of the connection's socket (non-blocking), for writing
    /// straight from the sending task; None until connected.
    stream: Option<std::net::TcpStream>,
    /// Encoded frames waiting for the socket, in order.
    pending: Vec<u8>,
}

/// One node, as seen from here.
#[derive(Debug)]
struct Peer {
    /// Only this node's own entry: the loopback queue.
    loopback: Option<mpsc::UnboundedSender<PeerMsg>>,
    loopback_rx: Mutex<Option<mpsc::UnboundedReceiver<PeerMsg>>>,
    /// A message is written at once when nothing is pending (no task hop
    /// on the path of a page fault); otherwise it queues behind the pending
    /// bytes, which the peer's writer task sends as the socket takes them.
    out: Mutex<Outbox>,
    wake: tokio::sync::Notify,
    /// Milliseconds since the mesh started when a frame last arrived.
    last_heard_ms: AtomicU64,
    connected: AtomicBool,
    /// It said `Leaving`: its connection closing is the end of the job.
    leaving: AtomicBool,
}

#[derive(Debug)]
pub struct Mesh {
    pub node: u32,
    pub nodes: u32,
    job: String,
    secret: Secret,
    pub timing: Timing,
    peers: Vec<Peer>,
    started: Instant,
    /// Nodes already reported failed (each is reported once).
    failed: Mutex<BTreeSet<u32>>,
    /// This agent is shutting down: peers closing is expected.
    leaving: AtomicBool,
    events: Events,
    /// When `Peers` arrived, for the MeshReady event.
    peers_at: Mutex<Option<Instant>>,
    ready_sent: AtomicBool,
    /// Restore of a multi-node job: the nodes whose `HintsDone` is still
    /// awaited (the directory of the shared zone is complete without them
    /// only once all arrived); empty otherwise.
    hints_awaited: Mutex<BTreeSet<u32>>,
    /// Frames received / sent, for the exit log line.
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl Mesh {
    pub fn new(
        node: u32,
        nodes: u32,
        job: String,
        secret: Secret,
        timing: Timing,
        events: Events,
    ) -> Mesh {
        let peers = (0..nodes)
            .map(|n| {
                let (tx, rx) = if n == node {
                    let (tx, rx) = mpsc::unbounded_channel();
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                Peer {
                    loopback: tx,
                    loopback_rx: Mutex::new(rx),
                    out: Mutex::new(Outbox::default()),
                    wake: tokio::sync::Notify::new(),
                    last_heard_ms: AtomicU64::new(0),
                    connected: AtomicBool::new(false),
                    leaving: AtomicBool::new(false),
                }
            })
            .collect();
        Mesh {
            node,
            nodes,
            job,
            secret,
            timing,
            peers,
            started: Instant::now(),
            failed: Mutex::new(BTreeSet::new()),
            leaving: AtomicBool::new(false),
            events,
            peers_at: Mutex::new(None),
            ready_sent: AtomicBool::new(false),
            hints_awaited: Mutex::new(BTreeSet::new()),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// Queues `msg` for node `to` (this node included: loopback).
    pub fn send(&self, to: u32, msg: PeerMsg) {
        let Some(peer) = self.peers.get(to as usize) else {
            log!(
                "message {} to node {to}, which does not exist: dropped",
                msg.name()
            );
            return;
        };
        if let Some(tx) = &peer.loopback {
            let _ = tx.send(msg);
            return;
        }
        thread_local! {
            // Encoding buffer of the sending thread: a frame is encoded here
            // and only its length copied to the outbox.
            static SCRATCH: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(vec![0; HEADER + MAX_FRAME]);
        }
        let mut out = lock(&peer.out);
        let start = out.pending.len();
        let encoded = SCRATCH.with_borrow_mut(|buf| {
            frame::encode(&msg, buf).map(|len| out.pending.extend_from_slice(&buf[..len]))
        });
        if let Err(e) = encoded {
            log!("cannot encode {} for node {to}: {e}; dropped", msg.name());
            return;
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        if start == 0 {
            if let Some(stream) = out.stream.as_ref() {
                use std::io::Write as _;
                let mut w = stream;
                // A full socket or a broken one: the writer task finds out
                // which (a broken one is a failed node).
                if let Ok(n) = w.write(&out.pending) {
                    out.pending.drain(..n);
                }
            }
        }
        if !out.pending.is_empty() {
            peer.wake.notify_one();
        }
    }

    /// Bytes waiting in node `to`'s outbox.
    fn queued(&self, to: u32) -> usize {
        self.peers
            .get(to as usize)
            .map_or(0, |p| lock(&p.out).pending.len())
    }

    /// [`Mesh::send`] for bulk data (checkpoint copies), from a blocking
    /// thread: waits while more than [`MAX_BULK_QUEUED`] bytes wait for
    /// `to`, so that a large copy goes at the speed of the connection
    /// instead of piling up in memory. False when `to` failed meanwhile.
    pub fn send_paced(&self, to: u32, msg: PeerMsg) -> bool {
        while self.queued(to) > MAX_BULK_QUEUED {
            if self.failed(to) {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.send(to, msg);
        true
    }

    /// Node `node` was reported failed.
    pub fn failed(&self, node: u32) -> bool {
        lock(&self.failed).contains(&node)
    }

    /// Queues `msg` for every other node.
    pub fn broadcast(&self, msg: &PeerMsg) {
        for n in (0..self.nodes).filter(|&n| n != self.node) {
            self.send(n, msg.clone());
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Says once that node `node` failed, unless the job is ending.
    pub fn node_failed(&self, node: u32, reason: String) {
        let peer_leaving = self
            .peers
            .get(node as usize)
            .is_some_and(|p| p.leaving.load(Ordering::Relaxed));
        if self.leaving.load(Ordering::Relaxed) || peer_leaving {
            log!("node {node}: {reason} (the job is ending)");
            return;
        }
        if !lock(&self.failed).insert(node) {
            return;
        }
        log!("node {node} failed: {reason}");
        self.events.send(AgentEvent::NodeFailed { node, reason });
    }

    /// Tells every peer this agent is going away cleanly.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.broadcast(&PeerMsg::Leaving);
    }

    /// The peer said it is leaving.
    pub fn peer_leaving(&self, node: u32) {
        if let Some(p) = self.peers.get(node as usize) {
            p.leaving.store(true, Ordering::Relaxed);
        }
    }

    fn all_connected(&self) -> bool {
        self.peers
            .iter()
            .enumerate()
            .all(|(n, p)| n as u32 == self.node || p.connected.load(Ordering::Relaxed))
    }

    /// Restore: `mesh_ready` waits for every other node's `HintsDone`.
    pub fn await_hints(&self) {
        *lock(&self.hints_awaited) = (0..self.nodes).filter(|&n| n != self.node).collect();
    }

    /// Node `node` sent all its owner hints.
    pub fn hints_done(&self, node: u32) {
        lock(&self.hints_awaited).remove(&node);
        self.maybe_ready();
    }

    /// Says `mesh_ready` once `Peers` arrived, every peer is connected and
    /// (restore) every peer's owner hints are in.
    fn maybe_ready(&self) {
        let got_peers = lock(&self.peers_at).is_some();
        let hints_in = lock(&self.hints_awaited).is_empty();
        if got_peers
            && hints_in
            && self.all_connected()
            && !self.ready_sent.swap(true, Ordering::Relaxed)
        {
            let elapsed_us = lock(&self.peers_at)
                .map(|t| t.elapsed().as_micros() as u64)
                .unwrap_or(0);
            log!(
                "connected to all {} other nodes ({} us after Peers)",
                self.nodes - 1,
                elapsed_us
            );
            self.events.send(AgentEvent::MeshReady { elapsed_us });
        }
    }
}

/// Most bytes of bulk data waiting for one peer (see [`Mesh::send_paced`]).
const MAX_BULK_QUEUED: usize = 8 << 20;

/// Binds the peer listener (config `nodes.listen`).
pub async fn listen(addr: &str) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

/// Starts the loopback queue and accepting peers; returns at once.
pub fn start(agent: &Arc<Agent>, listener: TcpListener) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    let mesh = &cluster.mesh;
    let me = mesh.node;
    // Loopback: messages to this node are dispatched like a peer's.
    if let Some(mut rx) = lock(&mesh.peers[me as usize].loopback_rx).take() {
        let agent = agent.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                crate::cluster::dispatch(&agent, me, msg);
            }
        });
    }
    let a = agent.clone();
    tokio::spawn(async move { accept_loop(a, listener).await });
    let a = agent.clone();
    tokio::spawn(async move { monitor(a).await });
}

/// `Peers` arrived: connect to every node below this one.
pub fn connect_peers(agent: &Arc<Agent>, addrs: Vec<String>) {
    let Some(cluster) = agent.cluster.as_ref() else {
        log!("Peers command for a single-node agent ignored");
        return;
    };
    let mesh = &cluster.mesh;
    if addrs.len() != mesh.nodes as usize {
        log!(
            "Peers lists {} addresses for {} nodes: ignored",
            addrs.len(),
            mesh.nodes
        );
        mesh.node_failed(
            mesh.node,
            format!("bad Peers command: {} addresses", addrs.len()),
        );
        return;
    }
    *lock(&mesh.peers_at) = Some(Instant::now());
    for (n, addr) in addrs.into_iter().enumerate() {
        let n = n as u32;
        if n >= mesh.node {
            continue;
        }
        let agent = agent.clone();
        tokio::spawn(async move {
            let timeout = agent
                .cluster
                .as_ref()
                .map_or(Duration::from_secs(10), |c| c.mesh.timing.peer_timeout);
            let started = Instant::now();
            // The peer printed its ready line before Peers was sent, so it
            // listens; retry briefly all the same (a loaded machine).
            let stream = loop {
                match TcpStream::connect(&addr).await {
                    Ok(s) => break s,
                    Err(e) if started.elapsed() < timeout => {
                        log!("connecting to node {n} at {addr}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        if let Some(c) = agent.cluster.as_ref() {
                            c.mesh
                                .node_failed(n, format!("cannot connect to {addr}: {e}"));
                        }
                        return;
                    }
                }
            };
            match tokio::time::timeout(timeout, handshake_connect(&agent, stream, n)).await {
                Ok(Ok((r, w))) => established(&agent, n, r, w),
                Ok(Err(e)) => {
                    if let Some(c) = agent.cluster.as_ref() {
                        c.mesh
                            .node_failed(n, format!("handshake with {addr} failed: {e}"));
                    }
                }
                Err(_) => {
                    if let Some(c) = agent.cluster.as_ref() {
                        c.mesh.node_failed(
                            n,
                            format!("no handshake answer from {addr} within {timeout:?}"),
                        );
                    }
                }
            }
        });
    }
    mesh.maybe_ready();
}

async fn accept_loop(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log!("peer accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let Some(cluster) = agent.cluster.as_ref() else {
                return;
            };
            let timeout = cluster.mesh.timing.peer_timeout;
            match tokio::time::timeout(timeout, handshake_accept(&agent, stream)).await {
                Ok(Ok((n, r, w))) => established(&agent, n, r, w),
                Ok(Err(e)) => log!("connection from {from} refused: {e}"),
                Err(_) => log!("connection from {from} refused: no handshake within {timeout:?}"),
            }
        });
    }
}

/// Reads one frame body; `None` at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, MeshError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(MeshError::Truncated)
            };
        }
        got += n;
    }
    let len = frame::body_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            MeshError::Truncated
        } else {
            MeshError::Io(e)
        }
    })?;
    Ok(Some(body))
}

fn decode(body: &[u8]) -> Result<PeerMsg, MeshError> {
    let msg: PeerMsg = frame::decode(body)?;
    msg.validate().map_err(MeshError::Invalid)?;
    Ok(msg)
}

async fn write_msg(w: &mut (impl AsyncWriteExt + Unpin), msg: &PeerMsg) -> Result<(), MeshError> {
    let mut buf = vec![0u8; HEADER + MAX_FRAME];
    let n = frame::encode(msg, &mut buf)?;
    w.write_all(&buf[..n]).await?;
    Ok(())
}

async fn read_msg(r: &mut (impl AsyncReadExt + Unpin)) -> Result<PeerMsg, MeshError> {
    match read_frame(r).await? {
        Some(body) => decode(&body),
        None => Err(MeshError::Handshake("connection closed".into())),
    }
}

/// Connecting side: Hello, expect Challenge, send Proof.
async fn handshake_connect(
    agent: &Arc<Agent>,
    stream: TcpStream,
    expect: u32,
) -> Result<(OwnedReadHalf, OwnedWriteHalf), MeshError> {
    let mesh = &agent.cluster.as_ref().expect("multi-node agent").mesh;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let mine = nonce();
    write_msg(
        &mut w,
        &PeerMsg::Hello {
            protocol: PEER_PROTOCOL_VERSION,
            job: mesh.job.clone(),
            node: mesh.node,
            nonce: mine,
        },
    )
    .await?;
    match read_msg(&mut r).await? {
        PeerMsg::Challenge { node, nonce, proof } => {
            if node != expect {
                return Err(MeshError::Handshake(format!(
                    "expected node {expect}, node {node} answered"
                )));
            }
            let want = mesh.secret.proof(b"accept", &mesh.job, &mine, &nonce);
            // blake3::Hash compares in constant time.
            if want != blake3::Hash::from_bytes(proof) {
                return Err(MeshError::Handshake(format!(
                    "node {node} does not know the job's secret"
                )));
            }
            let mine_proof = mesh.secret.proof(b"connect", &mesh.job, &nonce, &mine);
            write_msg(
                &mut w,
                &PeerMsg::Proof {
                    proof: *mine_proof.as_bytes(),
                },
            )
            .await?;
            Ok((r, w))
        }
        PeerMsg::Refused { reason } => Err(MeshError::Handshake(format!("refused: {reason}"))),
        other => Err(MeshError::Handshake(format!(
            "expected Challenge, got {}",
            other.name()
        ))),
    }
}

/// Accepting side: expect Hello, send Challenge, expect Proof.
async fn handshake_accept(
    agent: &Arc<Agent>,
    stream: TcpStream,
) -> Result<(u32, OwnedReadHalf, OwnedWriteHalf), MeshError> {
    let mesh = &agent.cluster.as_ref().expect("multi-node agent").mesh;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let (node, theirs) = match read_msg(&mut r).await? {
        PeerMsg::Hello {
            protocol,
            job,
            node,
            nonce,
        } => {
            let why = if protocol != PEER_PROTOCOL_VERSION {
                Some(format!(
                    "peer protocol {protocol}, this agent speaks {PEER_PROTOCOL_VERSION}"
                ))
            } else if job != mesh.job {
                Some(format!("job {job:?}, this agent serves job {}", mesh.job))
            } else if node <= mesh.node || node >= mesh.nodes {
                Some(format!(
                    "node {node} may not connect to node {} (only nodes {}..{} do)",
                    mesh.node,
                    mesh.node + 1,
                    mesh.nodes
                ))
            } else if mesh.peers[node as usize].connected.load(Ordering::Relaxed) {
                Some(format!("node {node} is connected already"))
            } else {
                None
            };
            if let Some(reason) = why {
                let _ = write_msg(
                    &mut w,
                    &PeerMsg::Refused {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(MeshError::Handshake(reason));
            }
            (node, nonce)
        }
        other => {
            return Err(MeshError::Handshake(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    let mine = nonce();
    let proof = mesh.secret.proof(b"accept", &mesh.job, &theirs, &mine);
    write_msg(
        &mut w,
        &PeerMsg::Challenge {
            node: mesh.node,
            nonce: mine,
            proof: *proof.as_bytes(),
        },
    )
    .await?;
    match read_msg(&mut r).await? {
        PeerMsg::Proof { proof } => {
            let want = mesh.secret.proof(b"connect", &mesh.job, &mine, &theirs);
            if want != blake3::Hash::from_bytes(proof) {
                return Err(MeshError::Handshake(format!(
                    "node {node} does not know the job's secret"
                )));
            }
            Ok((node, r, w))
        }
        other => Err(MeshError::Handshake(format!(
            "expected Proof, got {}",
            other.name()
        ))),
    }
}

/// An authenticated connection to node `n`: start its writer and reader.
fn established(agent: &Arc<Agent>, n: u32, r: OwnedReadHalf, w: OwnedWriteHalf) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    let mesh = &cluster.mesh;
    let peer = &mesh.peers[n as usize];
    {
        let mut out = lock(&peer.out);
        if out.stream.is_some() {
            log!("node {n} connected twice: second connection closed");
            return;
        }
        // SAFETY: dup of the connection's socket, which `w` keeps open; the
        // duplicate is owned by the std stream from here on. It shares the
        // file description, so it is non-blocking like tokio's.
        let dup = unsafe { libc::dup(w.as_ref().as_raw_fd()) };
        if dup < 0 {
            mesh.node_failed(
                n,
                format!(
                    "cannot duplicate its socket: {}",
                    std::io::Error::last_os_error()
                ),
            );
            return;
        }
        // SAFETY: `dup` is a fresh descriptor we own.
        out.stream = Some(unsafe { std::net::TcpStream::from_raw_fd(dup) });
    }
    // Whatever was queued before the connection existed goes now.
    peer.wake.notify_one();
    peer.last_heard_ms.store(mesh.now_ms(), Ordering::Relaxed);
    peer.connected.store(true, Ordering::Relaxed);
    log!("node {n} connected and authenticated");
    let a = agent.clone();
    tokio::spawn(async move { writer(a, n, w).await });
    let a = agent.clone();
    tokio::spawn(async move { reader(a, n, r).await });
    mesh.maybe_ready();
}

/// Sends the bytes pending for node `n` whenever the socket takes them.
async fn writer(agent: Arc<Agent>, n: u32, w: OwnedWriteHalf) {
    let mesh = &agent.cluster.as_ref().expect("multi-node agent").mesh;
    let peer = &mesh.peers[n as usize];
    loop {
        peer.wake.notified().await;
        loop {
            if lock(&peer.out).pending.is_empty() {
                break;
            }
            if let Err(e) = w.as_ref().writable().await {
                mesh.node_failed(n, format!("cannot send to it: {e}"));
                return;
            }
            let mut out = lock(&peer.out);
            if out.pending.is_empty() {
                break;
            }
            match w.as_ref().try_write(&out.pending) {
                Ok(written) => {
                    out.pending.drain(..written);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    drop(out);
                    mesh.node_failed(n, format!("cannot send to it: {e}"));
                    return;
                }
            }
        }
    }
}

/// Receives node `n`'s frames until its connection ends.
async fn reader(agent: Arc<Agent>, n: u32, r: OwnedReadHalf) {
    let mesh = &agent.cluster.as_ref().expect("multi-node agent").mesh;
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let reason = loop {
        match read_frame(&mut r).await {
            Ok(Some(body)) => match decode(&body) {
                Ok(msg) => {
                    mesh.peers[n as usize]
                        .last_heard_ms
                        .store(mesh.now_ms(), Ordering::Relaxed);
                    mesh.received.fetch_add(1, Ordering::Relaxed);
                    match msg {
                        PeerMsg::Heartbeat => {}
                        PeerMsg::Leaving => mesh.peer_leaving(n),
                        msg => crate::cluster::dispatch(&agent, n, msg),
                    }
                }
                Err(e) => {
                    log!("node {n} sent a malformed message ({e}): closing its connection");
                    break format!("it sent a malformed message: {e}");
                }
            },
            Ok(None) => break "its connection closed".to_string(),
            Err(e) => {
                log!("node {n}: {e}: closing its connection");
                break format!("its connection broke: {e}");
            }
        }
    };
    mesh.peers[n as usize]
        .connected
        .store(false, Ordering::Relaxed);
    mesh.node_failed(n, reason);
}

/// Heartbeats out, silence and stuck requests detected.
async fn monitor(agent: Arc<Agent>) {
    let cluster = agent.cluster.as_ref().expect("multi-node agent");
    let mesh = &cluster.mesh;
    let mut tick = tokio::time::interval(mesh.timing.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = mesh.now_ms();
        for (n, peer) in mesh.peers.iter().enumerate() {
            let n = n as u32;
            if n == mesh.node || !peer.connected.load(Ordering::Relaxed) {
                continue;
            }
            mesh.send(n, PeerMsg::Heartbeat);
            let silent = now.saturating_sub(peer.last_heard_ms.load(Ordering::Relaxed));
            if silent > mesh.timing.heartbeat_timeout.as_millis() as u64 {
                mesh.node_failed(n, format!("no heartbeat for {silent} ms"));
            }
        }
        if let Some((node, what)) = cluster.pages.stuck(mesh.timing.peer_timeout) {
            mesh.node_failed(node, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_parse_and_proofs() {
        assert!(Secret::parse("zz").is_none());
        assert!(Secret::parse(&"g".repeat(64)).is_none());
        let s = Secret::parse(&"0a".repeat(32)).unwrap();
        let other = Secret::parse(&"0b".repeat(32)).unwrap();
        let a = s.proof(b"accept", "job", &[1; 32], &[2; 32]);
        assert_eq!(a, s.proof(b"accept", "job", &[1; 32], &[2; 32]));
        assert_ne!(a, other.proof(b"accept", "job", &[1; 32], &[2; 32]));
        assert_ne!(a, s.proof(b"connect", "job", &[1; 32], &[2; 32]));
        assert_ne!(a, s.proof(b"accept", "job2", &[1; 32], &[2; 32]));
        assert_ne!(nonce(), nonce());
    }
}
