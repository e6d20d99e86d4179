//! Agents of a multi-node job, as separate processes on loopback: the mesh
//! (authentication, refusals, failure detection) and the job-wide tables
//! (barriers, locks, keyed barriers, segments) across nodes. The page
//! protocol is tested with real ranks in tests/tests/nodes.rs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{start_cluster, Agent, Got, Rank, SyncReq, JOB_ID};
use mome_protocol::config::Span;
use mome_protocol::frame;
use mome_protocol::peer::{Model, PeerMsg};
use mome_protocol::rank::{Channel, ErrorCode, RankRequest};

fn fast_config() -> mome_protocol::Config {
    let mut c = common::test_config();
    c.nodes.heartbeat_interval = Span(Duration::from_millis(50));
    c.nodes.heartbeat_timeout = Span(Duration::from_millis(600));
    c
}

fn sync(agent: &Agent, rank: u32) -> Rank {
    Rank::connect(agent, rank, Channel::Sync, JOB_ID)
}

#[test]
fn barriers_and_locks_span_nodes() {
    let agents = start_cluster(2, &["0", "1"], fast_config());
    let mut r0 = sync(&agents[0], 0);
    let mut r1 = sync(&agents[1], 1);
    // Barrier dates are Lamport dates: the same for every rank, each after
    // the one before.
    let mut last = 0;
    for _ in 1..=3 {
        r0.send_sync(SyncReq::Barrier);
        assert_eq!(r0.recv_within(100), Got::Nothing, "barrier done alone");
        let Got::BarrierDone { date } = r1.call_sync(SyncReq::Barrier) else {
            panic!("barrier not done");
        };
        assert_eq!(r0.recv(), Got::BarrierDone { date });
        assert!(date > last, "barrier date {date} after {last}");
        last = date;
    }
    // Lock ids are spread over the nodes by hash: several ids cover both
    // a local and a remote manager for each rank.
    for id in 1..=6 {
        assert_eq!(r0.call_sync(SyncReq::Lock(id)), Got::Ok);
        let busy = r1.call_sync(SyncReq::TryLock(id));
        assert_eq!(busy.code(), Some(ErrorCode::Busy), "lock {id}: {busy:?}");
        r1.send_sync(SyncReq::Lock(id));
        assert_eq!(r1.recv_within(100), Got::Nothing, "lock {id} granted twice");
        assert_eq!(r0.call_sync(SyncReq::Unlock(id)), Got::Ok);
        assert_eq!(r1.recv(), Got::Ok, "lock {id} not handed over");
        assert_eq!(r1.call_sync(SyncReq::Unlock(id)), Got::Ok);
        assert_eq!(r0.call_sync(SyncReq::TryLock(id)), Got::Ok);
        assert_eq!(r0.call_sync(SyncReq::Unlock(id)), Got::Ok);
    }
    // Keyed barriers (pthread barriers): exactly one serial participant.
    for id in [7u64, 8, 9] {
        r0.send_sync(SyncReq::Keyed(id, 2));
        assert_eq!(r0.recv_within(100), Got::Nothing);
        let a = r1.call_sync(SyncReq::Keyed(id, 2));
        let b = r0.recv();
        let serials = [a, b]
            .iter()
            .filter(|g| **g == Got::KeyedBarrierDone { serial: true })
            .count();
        assert_eq!(serials, 1);
    }
    // A lock held by a rank whose connection ends goes to the next waiter,
    // wherever its manager is.
    for id in 10..=13 {
        assert_eq!(r1.call_sync(SyncReq::Lock(id)), Got::Ok);
    }
    drop(r1);
    for id in 10..=13 {
        assert_eq!(r0.call_sync(SyncReq::Lock(id)), Got::Ok, "lock {id}");
    }
}

#[test]
fn segments_are_job_wide() {
    let agents = start_cluster(3, &["0", "1", "2"], fast_config());
    let mut m: Vec<Rank> = agents
        .iter()
        .enumerate()
        .map(|(k, a)| Rank::connect(a, k as u32, Channel::Memory, JOB_ID))
        .collect();
    let open = |r: &mut Rank, name: &str, create: bool| {
        r.call(&RankRequest::SegmentOpen {
            name,
            size: 8192,
            create,
            exclusive: create,
        })
    };
    let created = open(&mut m[2], "/grid", true);
    let Got::Segment { id, addr, .. } = created else {
        panic!("{created:?}")
    };
    assert_eq!(
        open(&mut m[1], "/grid", false),
        Got::Segment {
            id,
            addr,
            size: 8192
        }
    );
    assert_eq!(
        open(&mut m[0], "/grid", true).code(),
        Some(ErrorCode::Exists)
    );
    assert_eq!(
        m[1].call(&RankRequest::SegmentUnlink { name: "/grid" }),
        Got::Ok
    );
    assert_eq!(
        open(&mut m[0], "/grid", false).code(),
        Some(ErrorCode::NotFound)
    );
    // Heaps are unique across the job: each node hands out its own share.
    let mut firsts = Vec::new();
    for r in m.iter_mut() {
        match r.call(&RankRequest::AllocHeaps { count: 1 }) {
            Got::Heaps { first, .. } => firsts.push(first),
            other => panic!("{other:?}"),
        }
    }
    firsts.sort_unstable();
    firsts.dedup();
    assert_eq!(firsts.len(), 3, "{firsts:?}");
}

/// Reads one peer frame from a raw connection (None when closed).
fn read_peer(s: &mut TcpStream) -> Option<PeerMsg> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).ok()?;
    let len = frame::body_len(head).ok()?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).ok()?;
    frame::decode(&body).ok()
}

fn write_peer(s: &mut TcpStream, msg: &PeerMsg) {
    let mut buf = vec![0u8; 8192];
    let n = frame::encode(msg, &mut buf).unwrap();
    s.write_all(&buf[..n]).unwrap();
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn peers_must_prove_the_secret() {
    let home = tempfile::tempdir().unwrap();
    let config = fast_config();
    let job = common::write_cluster_job(home.path(), 2, 2, &config);
    // Only node 0 runs: its node-1 slot is free for impostors.
    let mut a0 = common::spawn_node(home, &job, 0, 2, "0", &config);
    let addr = a0.peer_addr.clone().unwrap();
    let hello = |node: u32, job: &str| PeerMsg::Hello {
        protocol: mome_protocol::peer::PEER_PROTOCOL_VERSION,
        job: job.to_string(),
        node,
        nonce: [7; 32],
    };

    // Wrong proof of the secret.
    let mut s = TcpStream::connect(&addr).unwrap();
    write_peer(&mut s, &hello(1, JOB_ID));
    assert!(matches!(
        read_peer(&mut s),
        Some(PeerMsg::Challenge { node: 0, .. })
    ));
    write_peer(&mut s, &PeerMsg::Proof { proof: [0; 32] });
    assert!(closed(&mut s));
    a0.wait_log("does not know the job's secret");

    // Another job, a node number out of range: refused with the reason.
    for (msg, why) in [
        (hello(1, "other-job"), "other-job"),
        (hello(9, JOB_ID), "node 9 may not connect"),
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        write_peer(&mut s, &msg);
        match read_peer(&mut s) {
            Some(PeerMsg::Refused { reason }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(closed(&mut s));
    }

    // Garbage and truncated frames: closed and logged, nothing else.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).unwrap();
    assert!(closed(&mut s));
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
    drop(s);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[3, 0, 0, 0, 200, 200, 200]).unwrap();
    assert!(closed(&mut s));
    a0.wait_log("refused");

    // None of that took the slot or stopped the agent: the real node 1
    // still joins.
    let tmp = tempfile::tempdir().unwrap();
    let mut a1 = common::spawn_node(tmp, &job, 1, 2, "1", &config);
    let peers = serde_json::json!({"cmd": "peers", "addrs": [addr, a1.peer_addr.clone().unwrap()]})
        .to_string();
    a0.command(&peers);
    a1.command(&peers);
    a0.event_named("mesh_ready");
    a1.event_named("mesh_ready");
    let log = a0.log();
    assert!(!log.contains("failed"), "{log}");
}

/// The proof a node gives of the secret (as mesh.rs computes it).
fn proof(side: &[u8], first: &[u8], second: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&common::SECRET[2 * i..2 * i + 2], 16).unwrap();
    }
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(side);
    h.update(&(JOB_ID.len() as u64).to_le_bytes());
    h.update(JOB_ID.as_bytes());
    h.update(first);
    h.update(second);
    *h.finalize().as_bytes()
}

#[test]
fn an_authenticated_peer_breaking_the_protocol_is_a_failed_node() {
    let home = tempfile::tempdir().unwrap();
    let config = fast_config();
    let job = common::write_cluster_job(home.path(), 2, 2, &config);
    let mut a0 = common::spawn_node(home, &job, 0, 2, "0", &config);
    let addr = a0.peer_addr.clone().unwrap();
    // A node 1 that knows the secret...
    let mut s = TcpStream::connect(&addr).unwrap();
    let mine = [9u8; 32];
    write_peer(
        &mut s,
        &PeerMsg::Hello {
            protocol: mome_protocol::peer::PEER_PROTOCOL_VERSION,
            job: JOB_ID.to_string(),
            node: 1,
            nonce: mine,
        },
    );
    let Some(PeerMsg::Challenge {
        nonce, proof: p, ..
    }) = read_peer(&mut s)
    else {
        panic!("no challenge")
    };
    assert_eq!(p, proof(b"accept", &mine, &nonce), "agent's proof");
    write_peer(
        &mut s,
        &PeerMsg::Proof {
            proof: proof(b"connect", &nonce, &mine),
        },
    );
    // ... talking nonsense: pages and nodes that do not exist are ignored,
    // a request for a page answered as the protocol says.
    write_peer(
        &mut s,
        &PeerMsg::PageRequest {
            page: u64::MAX,
            from: 1,
            req: 1,
            write: true,
            has_copy: false,
            hops: 0,
            prefetch: 0,
            contract: Model::Strong,
            copy_date: 0,
            date: 0,
        },
    );
    write_peer(
        &mut s,
        &PeerMsg::Invalidate {
            page: 0,
            epoch: 1,
            new_owner: 77,
        },
    );
    a0.wait_log("outside the shared zone");
    a0.wait_log("node 77 does not exist");
    // A page whose home is node 0 (a read request is answered with it).
    let page = (0..64u64)
        .find(|p| {
            // Same hash as pages.rs: runs of 16 pages.
            ((p / 16).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 2 == 0
        })
        .unwrap();
    write_peer(
        &mut s,
        &PeerMsg::PageRequest {
            page,
            from: 1,
            req: 2,
            write: false,
            has_copy: false,
            hops: 0,
            prefetch: 0,
            contract: Model::Strong,
            copy_date: 0,
            date: 0,
        },
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let grant = loop {
        match read_peer(&mut s) {
            Some(PeerMsg::Heartbeat) => continue,
            other => break other,
        }
    };
    match grant {
        Some(PeerMsg::PageGrant {
            page: p,
            req: 2,
            write: false,
            data: Some(d),
            ..
        }) => {
            assert_eq!(p, page);
            assert!(d.iter().all(|&b| b == 0));
        }
        other => panic!("{other:?}"),
    }
    // Changes to that page (node 0 owns it) that do not decompress to a
    // page: refused, nothing merged, no acknowledgement.
    write_peer(
        &mut s,
        &PeerMsg::PageDiff {
            page,
            from: 1,
            req: 3,
            date: 5,
            hops: 0,
            delta: vec![0x10, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        },
    );
    a0.wait_log("changes 3 of node 1 to page");
    // Then a malformed frame: its connection closes, the node is reported
    // failed, and the agent goes on.
    s.write_all(&[5, 0, 0, 0, 0xee, 0xee, 0xee, 0xee, 0xee])
        .unwrap();
    let e = a0.event_named("node_failed");
    assert_eq!(e["node"], 1, "{e}");
    assert!(e["reason"].as_str().unwrap().contains("malformed"), "{e}");
    assert!(a0.child.try_wait().unwrap().is_none(), "the agent died");
    let mut r = Rank::connect(&a0, 0, Channel::Memory, JOB_ID);
    assert!(matches!(
        r.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { .. }
    ));
}

#[test]
fn a_killed_node_is_reported() {
    let mut agents = start_cluster(3, &["0", "1", "2"], fast_config());
    let started = Instant::now();
    agents[2].child.kill().unwrap();
    agents[2].child.wait().unwrap();
    for a in agents.iter_mut().take(2) {
        let e = a.event_named("node_failed");
        assert_eq!(e["node"], 2, "{e}");
        assert!(e["reason"].as_str().unwrap().contains("connection"), "{e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_silent_node_is_reported_after_the_heartbeat_timeout() {
    let mut agents = start_cluster(2, &["0", "1"], fast_config());
    let pid = nix::unistd::Pid::from_raw(agents[1].child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let e = agents[0].event_named("node_failed");
    let waited = started.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(e["node"], 1, "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("no heartbeat"),
        "{e}"
    );
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn a_clean_end_is_not_a_failure() {
    let mut agents = start_cluster(2, &["0", "1"], fast_config());
    agents[1].stdin.take();
    assert!(agents[1].wait_exit().success());
    std::thread::sleep(Duration::from_millis(800));
    agents[0].stdin.take();
    assert!(agents[0].wait_exit().success());
    let mut rest = String::new();
    agents[0].stdout.read_to_string(&mut rest).unwrap();
    assert!(!rest.contains("node_failed"), "{rest}");
}
