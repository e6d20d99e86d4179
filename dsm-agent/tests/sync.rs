//! Barriers and locks over several connections, through a real agent.

mod common;

use std::time::Duration;

use common::{Agent, Got, SyncReq};
use mome_protocol::rank::{Channel, ErrorCode};

#[test]
fn barrier_over_three_ranks() {
    let agent = Agent::start(3, "0,1,2");
    let mut r: Vec<_> = (0..3).map(|i| agent.connect(i, Channel::Sync)).collect();

    for date in 1..=2 {
        r[0].send_sync(SyncReq::Barrier);
        r[1].send_sync(SyncReq::Barrier);
        assert_eq!(r[0].recv_within(150), Got::Nothing);
        r[2].send_sync(SyncReq::Barrier);
        for c in &mut r {
            assert_eq!(c.recv(), Got::BarrierDone { date });
        }
    }

    // A connection that ends while waiting leaves the count.
    r[0].send_sync(SyncReq::Barrier);
    std::thread::sleep(Duration::from_millis(100));
    drop(r.remove(0));
    let ended = format!(
        "session rank 0 pid {} (Sync channel) ended",
        std::process::id()
    );
    assert!(agent.wait_log(&ended).contains(&ended));
    r[0].send_sync(SyncReq::Barrier);
    r[1].send_sync(SyncReq::Barrier);
    assert_eq!(r[0].recv_within(150), Got::Nothing);
    let mut again = agent.connect(0, Channel::Sync);
    assert_eq!(
        again.call_sync(SyncReq::Barrier),
        Got::BarrierDone { date: 3 }
    );
    assert_eq!(r[0].recv(), Got::BarrierDone { date: 3 });
    assert_eq!(r[1].recv(), Got::BarrierDone { date: 3 });
}

#[test]
fn locks_are_fifo() {
    let agent = Agent::start(4, "0,1,2,3");
    let mut a = agent.connect(0, Channel::Sync);
    let mut b = agent.connect(1, Channel::Sync);
    let mut c = agent.connect(2, Channel::Sync);

    assert_eq!(a.call_sync(SyncReq::Lock(5)), Got::Ok);
    assert_eq!(
        a.call_sync(SyncReq::Lock(5)).code(),
        Some(ErrorCode::Invalid)
    );
    // Another lock id is independent.
    assert_eq!(b.call_sync(SyncReq::Lock(6)), Got::Ok);
    assert_eq!(b.call_sync(SyncReq::Unlock(6)), Got::Ok);

    b.send_sync(SyncReq::Lock(5));
    std::thread::sleep(Duration::from_millis(100));
    c.send_sync(SyncReq::Lock(5));
    assert_eq!(b.recv_within(100), Got::Nothing);
    // Pipelined behind its Lock: answered only after it.
    c.send_sync(SyncReq::Unlock(5));
    assert_eq!(c.recv_within(100), Got::Nothing);

    assert_eq!(a.call_sync(SyncReq::Unlock(5)), Got::Ok);
    assert_eq!(b.recv(), Got::Ok);
    assert_eq!(c.recv_within(100), Got::Nothing);
    assert_eq!(b.call_sync(SyncReq::Unlock(5)), Got::Ok);
    assert_eq!(c.recv(), Got::Ok, "Lock granted");
    // c's pipelined Unlock is answered after its Lock, in order.
    assert_eq!(c.recv(), Got::Ok, "Unlock of the lock c now holds");
    assert_eq!(
        b.call_sync(SyncReq::Unlock(5)).code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        a.call_sync(SyncReq::Unlock(99)).code(),
        Some(ErrorCode::Invalid)
    );
}

#[test]
fn ending_session_releases_its_locks_and_leaves_queues() {
    let agent = Agent::start(3, "0,1,2");
    let mut a = agent.connect(0, Channel::Sync);
    let mut b = agent.connect(1, Channel::Sync);
    let mut c = agent.connect(2, Channel::Sync);
    assert_eq!(a.call_sync(SyncReq::Lock(1)), Got::Ok);
    b.send_sync(SyncReq::Lock(1));
    std::thread::sleep(Duration::from_millis(100));
    c.send_sync(SyncReq::Lock(1));
    std::thread::sleep(Duration::from_millis(100));
    // b leaves the queue while waiting, then a (the holder) goes: c gets it.
    drop(b);
    let ended = format!(
        "session rank 1 pid {} (Sync channel) ended",
        std::process::id()
    );
    assert!(agent.wait_log(&ended).contains(&ended));
    drop(a);
    assert_eq!(c.recv(), Got::Ok);
    assert_eq!(c.call_sync(SyncReq::Unlock(1)), Got::Ok);
}
