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

/// The pids of node `node`'s agent and keeper.
fn node_pids(home: &Home, id: &str, node: u32) -> Vec<i32> {
    let dir = home.path().join("jobs").join(id);
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).unwrap()).unwrap();
    let mut pids: Vec<i32> = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["node"] == node)
        .filter_map(|a| a["pid"].as_i64().map(|p| p as i32))
        .collect();
    let keeper = dir.join("keepers").join(format!("node-{node}.json"));
    if let Ok(text) = std::fs::read_to_string(keeper) {
        let k: serde_json::Value = serde_json::from_str(&text).unwrap();
        pids.push(k["pid"].as_i64().unwrap() as i32);
    }
    pids
}

/// Kills node `node` (its agent and its keeper: its memory is gone).
fn kill_node(home: &Home, id: &str, node: u32) {
    for pid in node_pids(home, id, node) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Starts `jacobi 512 ITERS` with 4 ranks on `nodes` nodes and `config`.
fn start_jacobi(home: &Home, config: &str, nodes: u32, iters: &str) -> BackgroundJob {
    let cfg = home.path().join("job.yaml");
    std::fs::write(&cfg, config).unwrap();
    let (app_path, k) = (app("jacobi"), nodes.to_string());
    home.start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "-n",
            "4",
            "--nodes",
            &k,
            app_path.to_str().unwrap(),
            "512",
            iters,
        ],
        "first",
    )
}

/// Runs jacobi on 4 nodes with `config`, checkpoints it, kills `nodes`,
/// and returns the job's exit status and stderr once it ended.
fn kill_after_checkpoint(config: &str, nodes: &[u32]) -> (i32, String, String) {
    let home = Home::new();
    let mut job = start_jacobi(&home, config, 4, "20000");
    std::thread::sleep(Duration::from_millis(700));
    home.ckpt(&job.id)
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}\n{}", job.stderr()));
    for &n in nodes {
        kill_node(&home, &job.id, n);
    }
    let status = job.wait(120);
    let (out, err) = (job.stdout(), job.stderr());
    home.assert_nothing_left();
    (status.code().unwrap_or(-1), out, err)
}

fn jacobi_native() -> String {
    let o = native(&app("jacobi"), &["512", "20000"], None);
    assert_ok(&o, "jacobi");
    checksum_line(&stdout(&o))
}

#[test]
fn xor_parity_brings_back_a_lost_node() {
    let (code, out, err) = kill_after_checkpoint("redundancy:\n  scheme: xor\n", &[2]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(checksum_line(&out), jacobi_native(), "{err}");
    assert!(
        err.contains("node 2 restores from the data decoded from the parity of its group"),
        "{err}"
    );
}

#[test]
fn reed_solomon_brings_back_two_lost_nodes() {
    let (code, out, err) = kill_after_checkpoint(
        "redundancy:\n  scheme: rs\n  data: 2\n  parity: 2\n",
        &[0, 3],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(checksum_line(&out), jacobi_native(), "{err}");
    for n in [0, 3] {
        assert!(
            err.contains(&format!("node {n} restores from the data decoded")),
            "{err}"
        );
    }
}

#[test]
fn xor_cannot_bring_back_two_nodes_of_a_group() {
    let (code, _, err) = kill_after_checkpoint("redundancy:\n  scheme: xor\n", &[1, 2]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("its parity rebuilds at most 1"),
        "the refusal does not say why:\n{err}"
    );
    assert!(err.contains("no usable checkpoint"), "{err}");
}

#[test]
fn the_memory_limit_fails_a_checkpoint_clearly() {
    let home = Home::new();
    let mut job = start_jacobi(&home, "redundancy:\n  memory_limit: 3M\n", 4, "2000");
    std::thread::sleep(Duration::from_millis(500));
    let e = home.ckpt(&job.id).unwrap_err();
    assert!(
        e.contains("its checkpoint memory is full (redundancy.memory_limit)"),
        "{e}"
    );
    // The job goes on and ends normally.
    assert!(job.wait(120).success(), "{}", job.stderr());
    home.assert_nothing_left();
}

#[test]
fn the_disk_level_survives_the_loss_of_every_node() {
    let home = Home::new();
    let mut job = start_jacobi(&home, "redundancy:\n  disk_every: 1\n", 2, "20000");
    std::thread::sleep(Duration::from_millis(600));
    home.ckpt(&job.id).unwrap();
    // Every node (memory included) and mome-run.
    for n in 0..2 {
        kill_node(&home, &job.id, n);
    }
    job.kill9(&home);
    let out = home.restart(&job.id, &[]);
    assert_ok(&out, "mome-restart from the disk level");
    assert_eq!(checksum_line(&stdout(&out)), jacobi_native());
    assert!(
        stderr(&out).contains("node 1 restores from the disk"),
        "{}",
        stderr(&out)
    );
    home.assert_nothing_left();
}

#[test]
fn incremental_stamps_restore_the_newest_state() {
    // Three stamps: the later ones hold only what changed (shared pages
    // pre-copied, re-dirtied ones taken in the pause, pages that moved to
    // another node removed); the restart of the newest must see it all.
    let home = Home::new();
    let mut job = start_jacobi(&home, "", 4, "20000");
    std::thread::sleep(Duration::from_millis(500));
    let mut last = serde_json::Value::Null;
    for _ in 0..3 {
        last = home
            .ckpt(&job.id)
            .unwrap_or_else(|e| panic!("checkpoint failed: {e}\n{}", job.stderr()));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last["stamp"], 3);
    assert_eq!(last["parent"], 2, "{last}");
    kill_node(&home, &job.id, 3);
    assert!(job.wait(120).success(), "{}", job.stderr());
    assert_eq!(checksum_line(&job.stdout()), jacobi_native());
    assert!(job.stderr().contains("from stamp 3"), "{}", job.stderr());
    home.assert_nothing_left();
}
