//! Startup, refusals, protocol errors and shutdown of a real agent.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};

use common::{Agent, Got, Rank, SyncReq, JOB_ID};
use mome_protocol::layout::Zone;
use mome_protocol::rank::{Channel, ErrorCode, RankRequest};
use mome_protocol::PROTOCOL_VERSION;

#[test]
fn socket_is_private_and_replaces_a_stale_file() {
    let home = tempfile::tempdir().unwrap();
    let job = common::write_job(home.path(), 1);
    std::fs::write(job.agent_socket(0), b"stale").unwrap();
    let agent = Agent::start_in(home, 1, "0");
    let meta = std::fs::metadata(agent.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn refused_hellos() {
    let agent = Agent::start(3, "0,1");
    let refused = |rank, jobid: &str, protocol| {
        let mut r = Rank::raw(&agent);
        let got = r.hello(rank, Channel::Memory, jobid, protocol);
        assert_eq!(got.code(), Some(ErrorCode::Refused), "{got:?}");
        r.expect_closed();
        got
    };
    let got = refused(0, "20990101-000000-ffff", PROTOCOL_VERSION);
    assert!(
        format!("{got:?}").contains("20990101-000000-ffff"),
        "{got:?}"
    );
    refused(0, JOB_ID, PROTOCOL_VERSION + 1);
    // Rank 2 is in the job but not on this node.
    let got = refused(2, JOB_ID, PROTOCOL_VERSION);
    assert!(format!("{got:?}").contains("rank 2"), "{got:?}");

    let mut r = Rank::raw(&agent);
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 1 }).code(),
        Some(ErrorCode::Refused)
    );
    r.expect_closed();
    let log = agent.wait_log("refused");
    assert!(
        log.contains("refused: job \"20990101-000000-ffff\""),
        "{log}"
    );
}

/// Something a broken rank does on its connection.
type Breaker = Box<dyn Fn(&mut Rank)>;

#[test]
fn protocol_errors_close_only_that_connection() {
    let agent = Agent::start(2, "0,1");
    let mut good = agent.connect(1, Channel::Memory);
    let mut good_sync = agent.connect(1, Channel::Sync);

    // Each of these breaks the protocol after a good Hello.
    let broken: Vec<(&str, Breaker)> = vec![
        (
            "garbage body",
            Box::new(|r| r.sock.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap()),
        ),
        (
            "oversized",
            Box::new(|r| r.sock.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2]).unwrap()),
        ),
        // AllocHeaps { count: 1 } and one byte more.
        (
            "trailing bytes",
            Box::new(|r| r.sock.write_all(&[3, 0, 0, 0, 2, 1, 0]).unwrap()),
        ),
        ("wrong channel", Box::new(|r| r.send_sync(SyncReq::Barrier))),
        (
            "second hello",
            Box::new(|r| {
                r.send(&RankRequest::Hello {
                    protocol: PROTOCOL_VERSION,
                    rank: 0,
                    pid: 1,
                    channel: Channel::Memory,
                    jobid: JOB_ID,
                    restoring: false,
                })
            }),
        ),
        (
            "pagemap without fd",
            Box::new(|r| r.send(&RankRequest::RegisterPagemap)),
        ),
        (
            "uffd without fd",
            Box::new(|r| r.send(&RankRequest::RegisterUffd { zone: Zone::Shared })),
        ),
        (
            "unexpected fd",
            Box::new(|r| {
                let f = std::fs::File::open("/dev/null").unwrap();
                r.send_with_fd(&RankRequest::AllocHeaps { count: 1 }, f.as_raw_fd());
            }),
        ),
        (
            "truncated",
            Box::new(|r| {
                r.sock.write_all(&[10, 0, 0, 0, 1, 2]).unwrap();
                r.sock.shutdown(std::net::Shutdown::Write).unwrap();
            }),
        ),
    ];
    for (what, breaker) in &broken {
        let mut r = agent.connect(0, Channel::Memory);
        assert_eq!(
            r.call(&RankRequest::AllocHeaps { count: 1 }),
            Got::Heaps { first: 0, count: 1 },
            "{what}"
        );
        breaker(&mut r);
        r.expect_closed();
        // Its heap went with it; the others are still served.
        assert_eq!(
            good.call(&RankRequest::AllocHeaps { count: 0 }).code(),
            Some(ErrorCode::Invalid),
            "{what}"
        );
        assert!(
            common::eventually(|| match good.call(&RankRequest::AllocHeaps { count: 1 }) {
                Got::Heaps { first: 0, .. } => true,
                Got::Heaps { first, count } =>
                    good.call(&RankRequest::FreeHeaps { first, count }) != Got::Ok,
                other => panic!("{what}: {other:?}"),
            }),
            "{what}"
        );
        assert_eq!(
            good.call(&RankRequest::FreeHeaps { first: 0, count: 1 }),
            Got::Ok,
            "{what}"
        );
    }
    // A malformed Hello on a fresh connection.
    let mut r = Rank::raw(&agent);
    r.sock.write_all(&[1, 0, 0, 0, 0x7f]).unwrap();
    r.expect_closed();
    // Sync requests on the sync channel still work, and memory requests
    // there close it.
    assert_eq!(good_sync.call_sync(SyncReq::Lock(3)), Got::Ok);
    assert_eq!(good_sync.call_sync(SyncReq::Unlock(3)), Got::Ok);

    let pid = std::process::id();
    let log = agent.log();
    for needle in [
        format!(
            "session rank 0 pid {pid}: malformed request: malformed message: Hit the end of buffer"
        ),
        format!("session rank 0 pid {pid}: frame announces"),
        format!("session rank 0 pid {pid}: Barrier request on the Memory channel; closing"),
        format!("session rank 0 pid {pid}: RegisterUffd came with 0 file descriptors"),
        format!("session rank 0 pid {pid}: RegisterPagemap came with 0 file descriptors"),
        format!("session rank 0 pid {pid}: AllocHeaps request came with 1 unexpected"),
        format!("session rank 0 pid {pid}: connection closed inside a frame"),
    ] {
        assert!(log.contains(&needle), "{needle:?} not in\n{log}");
    }
    good_sync.send(&RankRequest::AllocHeaps { count: 1 });
    good_sync.expect_closed();
}

#[test]
fn exits_on_stdin_eof() {
    let mut agent = Agent::start(1, "0");
    let _r = agent.connect(0, Channel::Memory);
    let log = agent.stop();
    assert!(!agent.socket().exists());
    assert!(
        log.contains(
            "exiting (end of standard input): 1 connections, 0 faults served, 0 heaps in use"
        ),
        "{log}"
    );
}

#[test]
fn exits_on_sigterm() {
    let mut agent = Agent::start(1, "0");
    let mut r = agent.connect(0, Channel::Memory);
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 2 }),
        Got::Heaps { first: 0, count: 2 }
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait_exit();
    assert!(status.success(), "{status}");
    assert!(!agent.socket().exists());
    let log = agent.log();
    assert!(
        log.contains("exiting (SIGTERM): 1 connections, 0 faults served, 2 heaps in use"),
        "{log}"
    );
}

fn run_agent(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mome-agent"))
        .args(args)
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn multi_node_without_secret_says_why() {
    let home = tempfile::tempdir().unwrap();
    let job = common::write_job(home.path(), 2);
    let dir = job.path.to_str().unwrap();
    let (code, err) = run_agent(&[
        "--job-dir",
        dir,
        "--node",
        "0",
        "--nodes",
        "2",
        "--ranks",
        "0",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot read the job secret") && err.contains("secret"),
        "{err}"
    );
}

#[test]
fn bad_startups_say_why() {
    let home = tempfile::tempdir().unwrap();
    let job = common::write_job(home.path(), 2);
    let dir = job.path.to_str().unwrap();
    let (code, err) = run_agent(&[
        "--job-dir",
        dir,
        "--node",
        "0",
        "--nodes",
        "1",
        "--ranks",
        "0,5",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("rank 5") && err.contains("2 ranks"), "{err}");

    let (code, err) = run_agent(&[
        "--job-dir",
        "/nonexistent/job",
        "--node",
        "0",
        "--nodes",
        "1",
        "--ranks",
        "0",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/job/job.yaml"), "{err}");

    // A job directory too deep for a unix socket address.
    let deep = home.path().join("d".repeat(60)).join("e".repeat(60));
    let job = common::write_job(&deep, 1);
    let dir = job.path.to_str().unwrap();
    let (code, err) = run_agent(&[
        "--job-dir",
        dir,
        "--node",
        "0",
        "--nodes",
        "1",
        "--ranks",
        "0",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&job.agent_socket(0).display().to_string()) && err.contains("107"),
        "{err}"
    );

    let (code, err) = run_agent(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(err.is_empty());
}
