//! Checkpoint and restore through a real agent: this test process plays a
//! rank (maps the window, registers its userfaultfds and pagemap, answers
//! the checkpoint signal), and drives the agent's stdin like mome-run.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, Got, Rank};
use mome_protocol::ckpt::files;
use mome_protocol::layout::{Zone, PAGE_SIZE};
use mome_protocol::rank::{Channel, ErrorCode, RankRequest};
use mome_store::{BlockReader, NodeIndex};
use mome_uffd::{feature, mode, Uffd};

/// Signal the agent sends (job.yaml default).
const SIGNAL: i32 = 62;

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn install_handler() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(SIGNAL, &sa, std::ptr::null_mut()), 0);
    }
}

fn wait_signal() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !SIGNALLED.swap(false, Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no checkpoint signal");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The window mapped in this process, as a rank maps it.
struct Window {
    base: u64,
    size: u64,
}

impl Window {
    fn map(memfd: &OwnedFd, base: u64, size: u64) -> Window {
        // SAFETY: a new shared mapping of the memfd at an address nothing
        // else uses (MAP_FIXED_NOREPLACE never replaces a mapping).
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_eq!(p as u64, base, "mmap: {}", std::io::Error::last_os_error());
        Window { base, size }
    }

    fn write(&self, addr: u64, byte: u8) {
        // SAFETY: inside our live mapping.
        unsafe { std::ptr::write_bytes(addr as *mut u8, byte, PAGE_SIZE as usize) };
    }

    fn read(&self, addr: u64) -> u8 {
        // SAFETY: inside our live mapping.
        unsafe { std::ptr::read_volatile((addr + 17) as *const u8) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

fn uffd(features: u64, base: u64, size: u64, modes: u64) -> Uffd {
    let u = Uffd::open(libc::O_CLOEXEC | libc::O_NONBLOCK).unwrap();
    u.api(features).unwrap();
    u.register(base, size, modes).unwrap();
    u
}

fn register_pagemap(r: &mut Rank) {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    r.send_with_fd(&RankRequest::RegisterPagemap, pagemap.as_raw_fd());
    assert_eq!(r.recv(), Got::Ok);
}

fn checkpoint(agent: &mut Agent, stamp: u64, precopy: u32) {
    let store = agent.home.path().join("ckpt");
    agent.command(&format!(
        r#"{{"cmd":"checkpoint","stamp":{stamp},"store":{:?},"fsync":false,"precopy_rounds":{precopy},"park_timeout_ms":2000}}"#,
        store.display().to_string()
    ));
}

/// Parks like the preload's signal handler does; returns the stamp resumed with.
fn park(r: &mut Rank, image_addr: u64) -> Got {
    wait_signal();
    r.call(&RankRequest::CkptParked {
        entered_ns: now_ns(),
        image_addr,
        image_len: 100,
    })
}

#[test]
fn commands_without_ranks() {
    let mut agent = Agent::start(1, "0");
    agent.command("this is not json");
    let e = agent.event();
    assert_eq!(e["event"], "failed", "{e}");
    assert_eq!(e["stamp"], 0);
    // A stamp must hold every rank of the node: one that is not connected
    // (exited, not started) would have no image to restart from.
    checkpoint(&mut agent, 5, 1);
    let e = agent.event_named("failed");
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("rank 0 is not connected"),
        "{e}"
    );
    agent.stop();
}

#[test]
fn checkpoint_then_restore() {
    install_handler();
    let mut agent = Agent::start(1, "0");
    let layout = agent.layout;
    let mut mem = agent.connect(0, Channel::Memory);
    let mut sync = agent.connect(0, Channel::Sync);
    let memfd = mem.memfd.take().unwrap();
    let window = Window::map(&memfd, layout.base, layout.size);
    let wp = uffd(
        feature::WP_ASYNC | feature::WP_UNPOPULATED | feature::WP_HUGETLBFS_SHMEM,
        layout.base,
        layout.size,
        mode::WP,
    );
    mem.send_with_fd(
        &RankRequest::RegisterUffd {
            zone: Zone::Private,
        },
        wp.as_raw_fd(),
    );
    assert_eq!(mem.recv(), Got::Ok);

    // Parking with no checkpoint resumes at once; a checkpoint without a
    // pagemap is refused.
    assert_eq!(
        mem.call(&RankRequest::CkptParked {
            entered_ns: 0,
            image_addr: 0,
            image_len: 0
        }),
        Got::Resume { stamp: 0 }
    );
    checkpoint(&mut agent, 1, 1);
    let e = agent.event_named("failed");
    assert!(e["reason"].as_str().unwrap().contains("pagemap"), "{e}");
    register_pagemap(&mut mem);

    let Got::Heaps { first, .. } = mem.call(&RankRequest::AllocHeaps { count: 2 }) else {
        panic!()
    };
    let heap = layout.heap_addr(first);
    let heap2 = layout.heap_addr(first + 1);
    for i in 0..8 {
        window.write(heap + i * PAGE_SIZE, 10 + i as u8);
    }
    window.write(heap2, 99);
    assert_eq!(sync.call_sync(common::SyncReq::Lock(7)), Got::Ok);

    // Checkpoint 1: full (no base).
    checkpoint(&mut agent, 1, 1);
    assert_eq!(park(&mut mem, heap), Got::Resume { stamp: 1 });
    let paused = agent.event_named("paused");
    assert_eq!(paused["stamp"], 1);
    assert_eq!(paused["precopy_pages"], 9, "{paused}");
    let durable = agent.event_named("durable");
    assert_eq!(durable["pages"], 9, "{durable}");
    assert_eq!(durable["image_bytes"], 100);
    agent.command(r#"{"cmd":"commit","stamp":1}"#);

    // Checkpoint 2: one page rewritten in pre-copy, one during the pause
    // (before parking), the second heap freed.
    window.write(heap + 3 * PAGE_SIZE, 33);
    assert_eq!(
        mem.call(&RankRequest::FreeHeaps {
            first: first + 1,
            count: 1
        }),
        Got::Ok
    );
    checkpoint(&mut agent, 2, 1);
    wait_signal();
    window.write(heap + 5 * PAGE_SIZE, 55);
    assert_eq!(
        mem.call(&RankRequest::CkptParked {
            entered_ns: now_ns(),
            image_addr: heap,
            image_len: 100,
        }),
        Got::Resume { stamp: 2 }
    );
    let paused = agent.event_named("paused");
    assert_eq!(paused["pause_pages"], 1, "{paused}");
    let durable = agent.event_named("durable");
    assert_eq!(durable["pages"], 2, "{durable}");
    agent.command(r#"{"cmd":"commit","stamp":2}"#);

    let root = agent.home.path().join("ckpt");
    let index = NodeIndex::load(&files::index_file(&root, 0, 2)).unwrap();
    assert_eq!(index.page_count(), 8, "the freed heap's page is removed");
    let reader = BlockReader::new(&root, 0);
    let page_of = |addr: u64| (addr - layout.base) / PAGE_SIZE;
    let content = |page: u64| {
        let (b, i) = index.lookup(page).unwrap();
        let mut v = Vec::new();
        reader.read_block(b, &mut v).unwrap();
        v[i as usize * PAGE_SIZE as usize]
    };
    assert_eq!(content(page_of(heap)), 10);
    assert_eq!(content(page_of(heap + 3 * PAGE_SIZE)), 33);
    assert_eq!(content(page_of(heap + 5 * PAGE_SIZE)), 55);

    // A refusal fails the checkpoint and resumes the rank.
    checkpoint(&mut agent, 3, 0);
    wait_signal();
    assert_eq!(
        mem.call(&RankRequest::CkptRefused {
            reason: "two threads"
        }),
        Got::Resume { stamp: 0 }
    );
    let e = agent.event_named("failed");
    assert_eq!(e["reason"], "rank 0 refused: two threads");
    // Stamps not newer than the committed base are refused.
    checkpoint(&mut agent, 2, 0);
    let e = agent.event_named("failed");
    assert!(e["reason"].as_str().unwrap().contains("not newer"), "{e}");
    // Not parking in time fails it too.
    checkpoint(&mut agent, 3, 0);
    let e = agent.event_named("failed");
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("rank 0 did not reach the checkpoint within 2s"),
        "{e}"
    );
    SIGNALLED.store(false, Ordering::SeqCst);

    // The rank "dies"; restart from stamp 2 in a new agent.
    drop(window);
    drop(wp);
    drop(mem);
    drop(sync);
    agent.stop();
    let home = std::mem::replace(&mut agent.home, tempfile::tempdir().unwrap());
    drop(agent);
    let root_arg = root.display().to_string();
    let mut agent = Agent::start_with(home, 1, "0", &["--restore", "2", "--ckpt-dir", &root_arg]);
    let mut mem = Rank::connect_restoring(&agent, 0, Channel::Memory);
    let mut sync = Rank::connect_restoring(&agent, 0, Channel::Sync);
    let memfd = mem.memfd.take().unwrap();
    let window = Window::map(&memfd, layout.base, layout.size);
    let u = uffd(
        feature::MISSING_SHMEM
            | feature::WP_ASYNC
            | feature::WP_UNPOPULATED
            | feature::WP_HUGETLBFS_SHMEM,
        layout.base,
        layout.size,
        mode::MISSING | mode::WP,
    );
    mem.send_with_fd(
        &RankRequest::RegisterUffd {
            zone: Zone::Private,
        },
        u.as_raw_fd(),
    );
    assert_eq!(mem.recv(), Got::Ok);
    register_pagemap(&mut mem);
    assert_eq!(
        mem.call(&RankRequest::RestoreImage),
        Got::Image {
            addr: heap,
            len: 100
        }
    );
    // Pages come back (faults served by the agent, or prefetched).
    assert_eq!(window.read(heap), 10);
    assert_eq!(window.read(heap + 3 * PAGE_SIZE), 33);
    assert_eq!(window.read(heap + 5 * PAGE_SIZE), 55);
    assert_eq!(window.read(heap2), 0);
    // The restored rank owns its heap and its lock again; the lock call it
    // was in (seq 1) is answered from the record.
    assert_eq!(sync.call(&RankRequest::Lock { id: 7, seq: 1 }), Got::Ok);
    assert_eq!(sync.call(&RankRequest::Unlock { id: 7, seq: 2 }), Got::Ok);
    assert_eq!(
        sync.call(&RankRequest::Unlock { id: 7, seq: 3 }).code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(mem.call(&RankRequest::Restored), Got::Ok);
    let e = agent.event_named("rank_restored");
    assert_eq!(e["rank"], 0);
    assert!(agent
        .wait_log("prefetch of stamp 2 done")
        .contains("prefetch of stamp 2 done"));

    // The next checkpoint is incremental against stamp 2: only the page
    // written since.
    window.write(heap + 7 * PAGE_SIZE, 77);
    checkpoint(&mut agent, 3, 1);
    assert_eq!(park(&mut mem, heap), Got::Resume { stamp: 3 });
    let paused = agent.event_named("paused");
    assert_eq!(paused["precopy_pages"], 1, "{paused}");
    let durable = agent.event_named("durable");
    assert_eq!(durable["pages"], 1, "{durable}; log:\n{}", agent.log());
    assert_eq!(
        mem.call(&RankRequest::FreeHeaps { first, count: 1 }),
        Got::Ok
    );
    drop(window);
    agent.stop();
}

/// Figures for 512 MiB of written heap: `cargo test --release -p
/// mome-agent --test ckpt -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_512_mib() {
    install_handler();
    let mut agent = Agent::start(1, "0");
    let layout = agent.layout;
    let mut mem = agent.connect(0, Channel::Memory);
    let memfd = mem.memfd.take().unwrap();
    let window = Window::map(&memfd, layout.base, layout.size);
    let wp = uffd(
        feature::WP_ASYNC | feature::WP_UNPOPULATED | feature::WP_HUGETLBFS_SHMEM,
        layout.base,
        layout.size,
        mode::WP,
    );
    mem.send_with_fd(
        &RankRequest::RegisterUffd {
            zone: Zone::Private,
        },
        wp.as_raw_fd(),
    );
    assert_eq!(mem.recv(), Got::Ok);
    register_pagemap(&mut mem);
    let Got::Heaps { first, count } = mem.call(&RankRequest::AllocHeaps { count: 64 }) else {
        panic!()
    };
    let heap = layout.heap_addr(first);
    let pages = u64::from(count) * mome_protocol::layout::HEAP_SIZE / PAGE_SIZE;
    for stamp in 1..=3u64 {
        // Distinct, compressible-but-not-trivial content.
        for p in 0..pages {
            if stamp == 1 || p % 100 == 0 {
                // SAFETY: inside our live mapping.
                unsafe {
                    let a = (heap + p * PAGE_SIZE) as *mut u64;
                    for k in 0..512 {
                        *a.add(k) = p * 1_000_003 + k as u64 * stamp;
                    }
                }
            }
        }
        checkpoint(&mut agent, stamp, 1);
        assert_eq!(park(&mut mem, heap), Got::Resume { stamp });
        let paused = agent.event_named("paused");
        let durable = agent.event_named("durable");
        println!("stamp {stamp}: {paused}\n          {durable}");
        agent.command(&format!(r#"{{"cmd":"commit","stamp":{stamp}}}"#));
    }
    drop(window);
    let log = agent.stop();
    for line in log.lines().filter(|l| l.contains("checkpoint")) {
        println!("{line}");
    }
}
