//! Shared memory across nodes, end to end: `mome-run --nodes K` starts K
//! agents (simulated nodes, each its own memory file, talking TCP on
//! loopback) and real ranks whose shared segments the page protocol keeps
//! coherent. Every test application gives the checksum of its native run
//! on 1, 2 and 4 nodes; several nodes write disjoint bytes of the same
//! pages, with and without locks; system calls read into and write from
//! shared pages that are missing or read-only on the calling rank's node.

use std::time::{Duration, Instant};

use mome_tests::*;

/// A job not done in this time is a hang (a fault or a lock never served).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `mome-run ARGS` to its end (killing it after TIMEOUT), returns
/// (success, stdout, stderr).
fn run_job(home: &Home, args: &[&str], what: &str) -> (bool, String, String) {
    let mut job = home.start(args, "job");
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = job.child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            job.kill9(home);
            panic!(
                "{what} did not end in {TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                job.stdout(),
                job.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (exit.success(), job.stdout(), job.stderr())
}

/// `app args`, 4 ranks on 1, 2 and 4 nodes (block placement, and cyclic on
/// 2 nodes): the native checksum and OK every time, nothing left behind.
fn check_app_on_nodes(app_name: &str, args: &[&str]) {
    let native_out = native(&app(app_name), args, None);
    assert_ok(&native_out, &format!("native {app_name}"));
    check_on_nodes(app_name, args, &checksum_line(&stdout(&native_out)));
}

/// `app args`, 4 ranks on 1, 2 and 4 nodes: checksum line `expected` and OK.
fn check_on_nodes(app_name: &str, args: &[&str], expected: &str) {
    let exe = app(app_name);
    for (nodes, placement) in [
        ("1", "block"),
        ("2", "block"),
        ("4", "block"),
        ("2", "cyclic"),
    ] {
        let home = Home::new();
        let mut argv = vec![
            "-n",
            "4",
            "--nodes",
            nodes,
            "--placement",
            placement,
            exe.to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        let what = format!("{app_name} {args:?} on {nodes} nodes ({placement})");
        let (ok, out, err) = run_job(&home, &argv, &what);
        assert!(ok, "{what} failed\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(checksum_line(&out), expected, "{what}:\n{out}");
        assert!(!out.contains("MISMATCH"), "{what}:\n{out}");
        assert!(out.lines().any(|l| l.ends_with("OK")), "{what}:\n{out}");
        // The ranks really ran on that many nodes.
        let status = home.last_status();
        let agents = status["agents"].as_array().unwrap().len();
        assert_eq!(agents.to_string(), nodes, "{status}");
        home.assert_nothing_left();
    }
}

#[test]
fn jacobi_on_nodes() {
    check_app_on_nodes("jacobi", &["128", "30"]);
}

#[test]
fn mat_on_nodes() {
    check_app_on_nodes("mat", &["96", "16"]);
}

#[test]
fn nbody_on_nodes() {
    check_app_on_nodes("nbody", &["256", "4"]);
}

#[test]
fn cell_on_nodes() {
    check_app_on_nodes("cell", &["128", "20"]);
}

#[test]
fn pcg_on_nodes() {
    check_app_on_nodes("pcg", &["32", "100"]);
}

#[test]
fn common_block_fortran_on_nodes() {
    if !app("common-f77").exists() {
        eprintln!("common-f77 not built (no gfortran): skipped");
        return;
    }
    check_app_on_nodes("common-f77", &["4096", "3"]);
}

#[test]
fn disjoint_bytes_of_shared_pages_from_several_nodes() {
    // page-share checks every rank's slot and bytes and the locked counter
    // itself; its checksum is the counter: 300 rounds x 4 ranks.
    check_on_nodes("page-share", &["300"], "checksum page-share 1200");
}

#[test]
fn system_calls_into_shared_pages_of_another_node() {
    check_app_on_nodes("read-into", &["48"]);
}
