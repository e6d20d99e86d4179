//! Shared-segment page faults served by the agent over a real userfaultfd:
//! this test process plays a rank that maps the window's shared zone.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

use common::{pread, Agent, Got};
use mome_protocol::layout::{Zone, PAGE_SIZE};
use mome_protocol::rank::{Channel, RankRequest};
use mome_uffd::{feature, mode, Uffd};

/// Runs `f` in another thread (a faulting access blocks until the agent
/// serves it) and waits at most 2 s for it.
fn in_thread<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(2))
        .unwrap_or_else(|_| panic!("{what}: the fault was not served"))
}

/// mmap of `len` bytes of `fd` at `offset`, at `addr` exactly when given.
fn map(fd: &impl AsRawFd, offset: u64, len: u64, addr: Option<u64>) -> u64 {
    let flags = libc::MAP_SHARED | addr.map_or(0, |_| libc::MAP_FIXED_NOREPLACE);
    // SAFETY: a new shared mapping of the memfd; MAP_FIXED_NOREPLACE never
    // replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr.unwrap_or(0) as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    if let Some(a) = addr {
        assert_eq!(p as u64, a);
    }
    p as u64
}

fn unmap(addr: u64, len: u64) {
    // SAFETY: unmaps a mapping this test made and no longer uses.
    unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
}

#[test]
fn shared_faults_are_zero_filled_by_the_agent() {
    let mut agent = Agent::start(1, "0");
    let l = agent.layout;
    let mut r = agent.connect(0, Channel::Memory);
    let memfd = r.memfd.take().unwrap();

    // The shared zone, at its window address as a rank maps it.
    let shared = map(
        &memfd,
        l.private_size,
        l.shared_size(),
        Some(l.shared_base()),
    );
    let uffd = Uffd::open(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
    uffd.api(feature::MISSING_SHMEM).unwrap();
    uffd.register(shared, l.shared_size(), mode::MISSING)
        .unwrap();
    r.send_with_fd(
        &RankRequest::RegisterUffd { zone: Zone::Shared },
        uffd.as_raw_fd(),
    );
    assert_eq!(r.recv(), Got::Ok);

    let seg = match r.call(&RankRequest::SegmentOpen {
        name: "/f",
        size: 1 << 20,
        create: true,
        exclusive: false,
    }) {
        Got::Segment { addr, .. } => addr,
        other => panic!("{other:?}"),
    };

    // A user-mode read fault: a zero page, then writable.
    let v = in_thread("load", move || {
        let p = seg as *mut u64;
        // SAFETY: `seg` is inside the live mapping of the shared zone.
        unsafe {
            let v = std::ptr::read_volatile(p.add(3));
            std::ptr::write_volatile(p, 0xfeed);
            v
        }
    });
    assert_eq!(v, 0);
    let off = l.file_offset(seg);
    assert_eq!(pread(&memfd, off, 8), 0xfeedu64.to_ne_bytes());

    // A kernel-mode fault: read(2) into a missing page.
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0xab; 100]).unwrap();
    let page2 = seg + 2 * PAGE_SIZE;
    let n = in_thread("read(2)", move || {
        // SAFETY: reads 100 bytes into the live mapping at page2 + 8.
        unsafe { libc::pread(file.as_raw_fd(), (page2 + 8) as *mut libc::c_void, 100, 0) }
    });
    assert_eq!(n, 100);
    let page = pread(&memfd, off + 2 * PAGE_SIZE, PAGE_SIZE as usize);
    assert!(page[..8].iter().all(|&b| b == 0));
    assert!(page[8..108].iter().all(|&b| b == 0xab));
    assert!(page[108..].iter().all(|&b| b == 0));

    // An alias of the segment outside the window, registered on the same
    // userfaultfd: served the same way, into the same memfd pages.
    let alias_win = seg + 16 * PAGE_SIZE;
    let alias = map(&memfd, l.file_offset(alias_win), 2 * PAGE_SIZE, None);
    uffd.register(alias, 2 * PAGE_SIZE, mode::MISSING).unwrap();
    assert_eq!(
        r.call(&RankRequest::AliasMapped {
            addr: alias,
            len: 2 * PAGE_SIZE,
            window_addr: alias_win
        }),
        Got::Ok
    );
    let v = in_thread("alias load", move || {
        // SAFETY: `alias` is a live 2-page mapping.
        unsafe {
            let v = std::ptr::read_volatile((alias + PAGE_SIZE) as *const u32);
            std::ptr::write_volatile((alias + PAGE_SIZE) as *mut u32, 77);
            v
        }
    });
    assert_eq!(v, 0);
    // The window address sees the page the alias fault installed.
    // SAFETY: inside the live shared-zone mapping; the page is present now.
    let w = unsafe { std::ptr::read_volatile((alias_win + PAGE_SIZE) as *const u32) };
    assert_eq!(w, 77);

    drop(r);
    let log = agent.wait_log("3 faults served (1 through aliases)");
    assert!(log.contains("3 faults served (1 through aliases)"), "{log}");
    let log = agent.stop();
    assert!(log.contains("3 faults served, "), "{log}");
    assert!(!log.contains("outside the window"), "{log}");
    unmap(alias, 2 * PAGE_SIZE);
    unmap(shared, l.shared_size());
}

#[test]
fn private_uffd_is_kept_and_bad_fds_refused() {
    let agent = Agent::start(1, "0");
    let mut r = agent.connect(0, Channel::Memory);
    let uffd = Uffd::open(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
    uffd.api(0).unwrap();
    r.send_with_fd(
        &RankRequest::RegisterUffd {
            zone: Zone::Private,
        },
        uffd.as_raw_fd(),
    );
    assert_eq!(r.recv(), Got::Ok);
    // Not a userfaultfd: an error reply, the connection stays.
    let (p, _w) = nix::unistd::pipe().unwrap();
    r.send_with_fd(
        &RankRequest::RegisterUffd { zone: Zone::Shared },
        p.as_raw_fd(),
    );
    assert_eq!(
        r.recv().code(),
        Some(mome_protocol::rank::ErrorCode::Invalid)
    );
    assert_eq!(
        r.call(&RankRequest::AllocHeaps { count: 1 }),
        Got::Heaps { first: 0, count: 1 }
    );
}
