//! Checkpoints of multi-node jobs, end to end: a job on K simulated nodes
//! is checkpointed mid-run with mome-ckpt (every node parks, the page
//! traffic drains, each node takes the shared pages it owns and its ranks'
//! heaps), killed with SIGKILL (ranks, agents and mome-run), restarted with
//! mome-restart on the same nodes, and compared with an uninterrupted run.

use std::time::Duration;

use mome_tests::*;

/// Runs `app args` with `ranks` ranks on `nodes` nodes, checkpoints it
/// after `delay`, kills it, restarts it and checks the checksum against a
/// native run. Returns the restart's stderr.
fn check_restarted_on_nodes(
    app_name: &str,
    args: &[&str],
    ranks: u32,
    nodes: u32,
    delay: Duration,
) -> String {
    let home = Home::new();
    let native = native(&app(app_name), args, None);
    assert_ok(&native, app_name);
    let (n, k) = (ranks.to_string(), nodes.to_string());
    let app_path = app(app_name);
    let mut all = vec!["-n", &n, "--nodes", &k, app_path.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut job = home.start(&all, "first");
    std::thread::sleep(delay);
    let stamp = home
        .ckpt(&job.id)
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}\njob stderr:\n{}", job.stderr()));
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "{app_name}: the job ended before it could be killed: make it run longer\n{}",
        job.stdout()
    );
    job.kill9(&home);
    let out = home.restart(&job.id, &[]);
    assert_ok(
        &out,
        &format!("mome-restart of {app_name} on {nodes} nodes"),
    );
    assert_eq!(
        checksum_line(&stdout(&out)),
        checksum_line(&stdout(&native)),
        "{app_name} on {nodes} nodes: restarted checksum differs\nstderr:\n{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("stamp {}", stamp["stamp"])),
        "mome-restart does not say which stamp it restored:\n{}",
        stderr(&out)
    );
    home.assert_nothing_left();
    stderr(&out)
}

#[test]
fn jacobi_restarts_on_two_nodes() {
    check_restarted_on_nodes("jacobi", &["512", "3000"], 4, 2, Duration::from_millis(600));
}

#[test]
fn nbody_restarts_on_four_nodes() {
    check_restarted_on_nodes("nbody", &["4096", "20"], 4, 4, Duration::from_millis(700));
}

#[test]
fn mat_restarts_on_two_nodes() {
    check_restarted_on_nodes("mat", &["1024", "64"], 4, 2, Duration::from_millis(700));
}

#[test]
fn cell_restarts_on_two_nodes() {
    check_restarted_on_nodes("cell", &["1024", "400"], 4, 2, Duration::from_millis(500));
}

#[test]
fn pcg_restarts_on_two_nodes() {
    check_restarted_on_nodes("pcg", &["384", "4000"], 4, 2, Duration::from_millis(700));
}

#[test]
fn locks_across_nodes_survive_a_restart() {
    // Ranks of both nodes hold and wait for the same locks at the stamp.
    check_restarted_on_nodes(
        "shared-counter",
        &["3000"],
        4,
        2,
        Duration::from_millis(500),
    );
}

#[test]
fn fortran_common_blocks_restart_on_two_nodes() {
    if !app("common-f77").exists() {
        eprintln!("no Fortran compiler: common-f77 not built, skipped");
        return;
    }
    check_restarted_on_nodes(
        "common-f77",
        &["65536", "400"],
        4,
        2,
        Duration::from_millis(500),
    );
}
