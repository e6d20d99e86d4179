//! Heaps, segments and aliases, through a real agent.

mod common;

use common::{eventually, pread, pwrite, Agent, Got};
use mome_protocol::layout::HEAP_SIZE;
use mome_protocol::rank::{Channel, ErrorCode, RankRequest};

#[test]
fn welcome_carries_layout_and_memfd() {
    let agent = Agent::start(4, "0,1,2,3");
    let r = agent.connect(2, Channel::Memory);
    assert_eq!(
        r.welcome,
        Got::Welcome {
            layout: agent.layout,
            node: 0,
            nodes: 1,
            nranks: 4
        }
    );
    let memfd = r.memfd.as_ref().unwrap();
    let st = nix::sys::stat::fstat(memfd).unwrap();
    assert_eq!(st.st_size as u64, agent.layout.size);
    // The same rank may connect again (an exec'd image), both are served.
    let _again = agent.connect(2, Channel::Memory);
    let sync = agent.connect(2, Channel::Sync);
    assert!(sync.memfd.is_none());
}

#[test]
fn heaps_alloc_free_and_punch() {
    let agent = Agent::start(1, "0");
    let mut r = agent.connect(0, Channel::Memory);
    let memfd = r.memfd.take().unwrap();
    let total = agent.layout.private_heaps();
    assert_eq!(total, 64);

    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 2 }),
        Got::Heaps { first: 0, count: 2 }
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { first: 2, count: 1 }
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 0 }).code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: total }).code(),
        Some(ErrorCode::NoSpace)
    );

    // Data in heaps 0, 1 and 2, through the memfd as a rank's mapping would.
    for heap in 0..3u64 {
        pwrite(&memfd, heap * HEAP_SIZE + 4096, b"hello");
        pwrite(&memfd, heap * HEAP_SIZE + HEAP_SIZE - 1, b"x");
    }
    assert_eq!(
        r.call(&RankRequest::FreeHeaps { first: 0, count: 2 }),
        Got::Ok
    );
    for heap in 0..2u64 {
        assert_eq!(pread(&memfd, heap * HEAP_SIZE + 4096, 5), vec![0; 5]);
        assert_eq!(pread(&memfd, heap * HEAP_SIZE + HEAP_SIZE - 1, 1), vec![0]);
    }
    assert_eq!(pread(&memfd, 2 * HEAP_SIZE + 4096, 5), b"hello");

    // Not owned any more, or never owned by this connection.
    assert_eq!(
        r.call(&RankRequest::FreeHeaps { first: 0, count: 1 })
            .code(),
        Some(ErrorCode::Invalid)
    );
    let mut other = agent.connect(0, Channel::Memory);
    assert_eq!(
        other
            .call(&RankRequest::FreeHeaps { first: 2, count: 1 })
            .code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        r.call(&RankRequest::FreeHeaps {
            first: 60,
            count: 10
        })
        .code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(pread(&memfd, 2 * HEAP_SIZE + 4096, 5), b"hello");

    // First fit: the freed hole is reused.
    assert_eq!(
        other.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { first: 0, count: 1 }
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 2 }),
        Got::Heaps { first: 3, count: 2 }
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { first: 1, count: 1 }
    );
}

#[test]
fn session_end_frees_its_heaps() {
    let agent = Agent::start(2, "0,1");
    let mut a = agent.connect(0, Channel::Memory);
    let memfd = a.memfd.take().unwrap();
    assert_eq!(
        a.call(&RankRequest::AllocHeaps { count: 3 }),
        Got::Heaps { first: 0, count: 3 }
    );
    pwrite(&memfd, HEAP_SIZE + 123, b"data");
    drop(a);

    let mut b = agent.connect(1, Channel::Memory);
    let total = agent.layout.private_heaps();
    // Every heap is free again once the agent has seen the connection go.
    let all = eventually(|| match b.call(&RankRequest::AllocHeaps { count: total }) {
        Got::Heaps { first: 0, count } => count == total,
        Got::Error(ErrorCode::NoSpace, _) => false,
        other => panic!("{other:?}"),
    });
    assert!(
        all,
        "heaps of the closed session were not freed; log:\n{}",
        agent.log()
    );
    assert_eq!(pread(&memfd, HEAP_SIZE + 123, 4), vec![0; 4]);
    assert!(agent.wait_log("3 heaps freed").contains("3 heaps freed"));
}

#[test]
fn segments() {
    let agent = Agent::start(1, "0");
    let l = agent.layout;
    let mut r = agent.connect(0, Channel::Memory);
    let memfd = r.memfd.take().unwrap();
    let open = |r: &mut common::Rank, name: &str, size: u64, create: bool, exclusive: bool| {
        r.call(&RankRequest::SegmentOpen {
            name,
            size,
            create,
            exclusive,
        })
    };
    const M: u64 = 1 << 20;

    assert_eq!(
        open(&mut r, "/b", 0, false, false).code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        open(&mut r, "/a", M, true, true),
        Got::Segment {
            id: 0,
            addr: l.segment_addr(0),
            size: M
        }
    );
    assert_eq!(
        open(&mut r, "/a", 0, true, true).code(),
        Some(ErrorCode::Exists)
    );
    assert_eq!(
        open(&mut r, "/a", 0, false, false),
        Got::Segment {
            id: 0,
            addr: l.segment_addr(0),
            size: M
        }
    );
    assert_eq!(
        open(&mut r, "/a", 2 * M, true, false),
        Got::Segment {
            id: 0,
            addr: l.segment_addr(0),
            size: 2 * M
        }
    );
    assert_eq!(
        open(&mut r, "/a", 65 * M, false, false).code(),
        Some(ErrorCode::TooBig)
    );
    assert_eq!(
        open(&mut r, "/c", 65 * M, true, false).code(),
        Some(ErrorCode::TooBig)
    );

    // Shrinking drops what lies past the new size (ftruncate semantics).
    let base = l.file_offset(l.segment_addr(0));
    pwrite(&memfd, base + 100, b"keep");
    pwrite(&memfd, base + 4999, b"yz");
    pwrite(&memfd, base + 3 * 4096, b"gone");
    let resize =
        |r: &mut common::Rank, id: u32, size: u64| r.call(&RankRequest::SegmentResize { id, size });
    assert_eq!(
        resize(&mut r, 0, 5000),
        Got::Segment {
            id: 0,
            addr: l.segment_addr(0),
            size: 5000
        }
    );
    assert_eq!(pread(&memfd, base + 100, 4), b"keep");
    assert_eq!(pread(&memfd, base + 4999, 2), b"y\0");
    assert_eq!(pread(&memfd, base + 3 * 4096, 4), vec![0; 4]);
    assert_eq!(resize(&mut r, 0, 65 * M).code(), Some(ErrorCode::TooBig));
    assert_eq!(resize(&mut r, 5, M).code(), Some(ErrorCode::Invalid));
    assert_eq!(
        resize(&mut r, 0, 64 * M),
        Got::Segment {
            id: 0,
            addr: l.segment_addr(0),
            size: 64 * M
        }
    );

    // Unlink removes the name; the slot stays taken.
    assert_eq!(r.call(&RankRequest::SegmentUnlink { name: "/a" }), Got::Ok);
    assert_eq!(
        r.call(&RankRequest::SegmentUnlink { name: "/a" }).code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        open(&mut r, "/a", 0, false, false).code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(pread(&memfd, base + 100, 4), b"keep");
    assert_eq!(
        open(&mut r, "/a", 0, true, true),
        Got::Segment {
            id: 1,
            addr: l.segment_addr(1),
            size: 0
        }
    );
    // Segments belong to the job: another connection sees them.
    let mut other = agent.connect(0, Channel::Memory);
    assert_eq!(
        open(&mut other, "/a", 0, false, false),
        Got::Segment {
            id: 1,
            addr: l.segment_addr(1),
            size: 0
        }
    );
    for slot in 2..l.segment_slots() {
        let name = format!("/s{slot}");
        assert_eq!(
            open(&mut r, &name, 0, true, false),
            Got::Segment {
                id: slot,
                addr: l.segment_addr(slot),
                size: 0
            }
        );
    }
    assert_eq!(
        open(&mut r, "/full", 0, true, false).code(),
        Some(ErrorCode::NoSpace)
    );
    assert_eq!(
        open(&mut r, "", 0, true, false).code(),
        Some(ErrorCode::Invalid)
    );
}

#[test]
fn alias_requests() {
    let agent = Agent::start(1, "0");
    let l = agent.layout;
    let mut r = agent.connect(0, Channel::Memory);
    let alias = |addr, len, window_addr| RankRequest::AliasMapped {
        addr,
        len,
        window_addr,
    };
    assert_eq!(
        r.call(&alias(0x1000_0000, 0x4000, l.segment_addr(0))),
        Got::Ok
    );
    assert_eq!(
        r.call(&alias(0x1000_0000, 0, l.segment_addr(0))).code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        r.call(&alias(0x1000_0001, 0x1000, l.segment_addr(0)))
            .code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        r.call(&alias(0x1000_0000, 0x2000, l.end() - 0x1000)).code(),
        Some(ErrorCode::Invalid)
    );
}

#[test]
fn shmalloc_requests_with_bad_frees_are_refused_not_fatal() {
    let agent = Agent::start(1, "0");
    let mut r = agent.connect(0, Channel::Memory);
    let shared = agent.layout.shared_base() + 4096;
    let entry = |node: u32, addr: u64| {
        let mut e = node.to_le_bytes().to_vec();
        e.extend_from_slice(&addr.to_le_bytes());
        e
    };
    // One node owns every heap: a remote free names this node, or no node.
    for frees in [
        entry(0, shared),
        entry(3, shared),
        entry(0, 0x1000),
        entry(0, shared + 8),
        vec![1, 2, 3],
        vec![0; 12 * 40],
    ] {
        let got = r.call(&RankRequest::ShmallocFree { frees: &frees });
        assert_eq!(got.code(), Some(ErrorCode::Invalid), "{frees:?}: {got:?}");
    }
    // Nothing was queued for this node; the agent still serves the rank.
    assert_eq!(
        r.call(&RankRequest::ShmallocTake { max: 500 }),
        Got::Frees(vec![])
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { first: 0, count: 1 }
    );
}
