//! Process-shared pthread mutexes and barriers in shared memory, on one node
//! (glibc's own objects on the node's shared pages) and across nodes (mapped
//! by the preload to the agents' distributed locks and barriers).
//!
//! `shared-counter` checks mutual exclusion (lock and trylock), the serial
//! return of barrier rounds and that a barrier lets nobody through early;
//! `pthread-sync` checks glibc's answers for recursive, error-checking and
//! timed mutexes, two threads per rank, and a re-initialised barrier. Both
//! must print the checksum of their native run and OK, whatever the number
//! of nodes the 4 ranks are spread over.

use std::time::{Duration, Instant};

use mome_tests::*;

/// A job that does not finish in this time is a hang (a lock or barrier
/// never answered): the test kills it and fails instead of waiting forever.
const TIMEOUT: Duration = Duration::from_secs(180);

/// `app args` with 4 ranks over `nodes` nodes prints its native checksum and
/// OK, and the ranks did run on `nodes` distinct nodes.
fn check_on_nodes(app_name: &str, args: &[&str], nodes: u32) {
    let native_out = native(&app(app_name), args, None);
    assert_ok(&native_out, &format!("native {app_name}"));
    let expected = checksum_line(&stdout(&native_out));

    let home = Home::new();
    let exe = app(app_name);
    let nodes_arg = nodes.to_string();
    let mut argv = vec![
        "-n",
        "4",
        "--nodes",
        nodes_arg.as_str(),
        exe.to_str().unwrap(),
    ];
    argv.extend_from_slice(args);
    let what = format!("{app_name} {args:?} under mome-run -n 4 --nodes {nodes}");
    let mut job = home.start(&argv, "job");
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = job.child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            job.kill9(&home);
            panic!(
                "{what} did not end in {TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                job.stdout(),
                job.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = job.stdout();
    assert!(
        exit.success(),
        "{what} failed ({exit:?})\nstdout:\n{out}\nstderr:\n{}",
        job.stderr()
    );
    assert_eq!(checksum_line(&out), expected, "{what}:\n{out}");
    assert!(!out.contains("MISMATCH"), "{what}:\n{out}");
    assert!(
        out.lines().any(|l| l.ends_with("] OK")),
        "{what} did not report OK:\n{out}\nstderr:\n{}",
        job.stderr()
    );

    let status = home.last_status();
    let mut used: Vec<i64> = status["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_i64().unwrap())
        .collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(
        used.len() as u32,
        nodes,
        "{what}: ranks ran on nodes {used:?}"
    );
    home.assert_nothing_left();
}

#[test]
fn shared_counter_one_node() {
    check_on_nodes("shared-counter", &["300"], 1);
}

#[test]
fn shared_counter_two_nodes() {
    check_on_nodes("shared-counter", &["300"], 2);
}

#[test]
fn shared_counter_four_nodes() {
    check_on_nodes("shared-counter", &["300"], 4);
}

#[test]
fn pthread_sync_one_node() {
    check_on_nodes("pthread-sync", &["100"], 1);
}

#[test]
fn pthread_sync_two_nodes() {
    check_on_nodes("pthread-sync", &["100"], 2);
}

#[test]
fn pthread_sync_four_nodes() {
    check_on_nodes("pthread-sync", &["100"], 4);
}
