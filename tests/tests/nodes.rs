//! Shared memory across nodes, end to end: `mome-run --nodes K` starts K
//! agents (simulated nodes, each its own memory file, talking TCP on
//! loopback) and real ranks whose shared segments the page protocol keeps
//! coherent. Every test application gives the checksum of its native run
//! on 1, 2 and 4 nodes; several nodes write disjoint bytes of the same
//! pages, with and without locks; system calls read into and write from
//! shared pages that are missing or read-only on the calling rank's node.

use std::time::Duration;

use mome_tests::*;

/// A job not done in this time is a hang (a fault or a lock never served).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `mome-run ARGS` to its end (killing it after TIMEOUT), returns
/// (success, stdout, stderr).
fn run_job(home: &Home, args: &[&str], what: &str) -> (bool, String, String) {
    home.run_to_end(args, &[], what, TIMEOUT)
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

#[test]
fn one_writer_many_readers_see_every_round() {
    check_app_on_nodes("fanout", &["128", "3"]);
}

/// The numbers of the agent log's exit line `page protocol: R read and W
/// write faults, S requests sent, ...`.
fn protocol_counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("page protocol:"))
        .unwrap_or_else(|| panic!("no page protocol line in:\n{log}"));
    let num_before = |word: &str| -> u64 {
        let i = line.find(word).unwrap();
        line[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num_before(" read and"), num_before(" requests sent"))
}

#[test]
fn a_node_fetches_a_page_once_for_all_its_ranks() {
    // Ranks 2 and 3 run on node 1 and both read every page rank 0 (node 0)
    // writes, in each of 3 rounds: node 1 asks for each page once a round
    // (scattered reads: no prefetch), however many of its ranks read it.
    let (pages, rounds) = (128u64, 3u64);
    let home = Home::new();
    let (ok, out, err) = run_job(
        &home,
        &[
            "-n",
            "4",
            "--nodes",
            "2",
            app("fanout").to_str().unwrap(),
            &pages.to_string(),
            &rounds.to_string(),
        ],
        "fanout on 2 nodes",
    );
    assert!(ok && out.contains("OK"), "{out}\n{err}");
    let id = home.jobs().pop().unwrap();
    let log_path = home.path().join("jobs").join(id).join("logs/agent-1.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let (read_faults, requests) = protocol_counts(&log);
    assert!(
        requests <= pages * rounds + 8,
        "node 1 sent {requests} requests for {pages} pages x {rounds} rounds:\n{log}"
    );
    assert!(
        read_faults >= pages * rounds,
        "node 1 saw only {read_faults} read faults:\n{log}"
    );
}

#[test]
fn sixteen_ranks_on_four_nodes() {
    // The example: `mome-run -n 16 --nodes 4 ./app`.
    let native_out = native(&app("jacobi"), &["256", "20"], None);
    let expected = checksum_line(&stdout(&native_out));
    for placement in ["block", "cyclic"] {
        let home = Home::new();
        let what = format!("jacobi -n 16 --nodes 4 ({placement})");
        let (ok, out, err) = run_job(
            &home,
            &[
                "-n",
                "16",
                "--nodes",
                "4",
                "--placement",
                placement,
                app("jacobi").to_str().unwrap(),
                "256",
                "20",
            ],
            &what,
        );
        assert!(ok, "{what}:\n{out}\n{err}");
        assert_eq!(checksum_line(&out), expected, "{what}:\n{out}");
        let status = home.last_status();
        let nodes: std::collections::BTreeSet<i64> = status["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["node"].as_i64().unwrap())
            .collect();
        assert_eq!(nodes.len(), 4, "{status}");
        home.assert_nothing_left();
    }
}
