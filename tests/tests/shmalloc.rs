//! Shared malloc (MomeMalloc), end to end: real ranks on one and two
//! simulated nodes build linked lists with `mome_shmalloc`, read and
//! change each other's blocks, free blocks another node allocated (remote
//! frees through the agents) and reuse the memory; `memory: malloc:
//! shared` does the same for plain malloc; wrong frees are reported; a
//! checkpoint taken while remote frees are queued restarts with them.

use std::time::Duration;

use mome_tests::*;

/// A job not done in this time is a hang.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `mome-run ARGS` to its end; (success, stdout, stderr).
fn run_job(home: &Home, args: &[&str], what: &str) -> (bool, String, String) {
    home.run_to_end(args, &[], what, TIMEOUT)
}

/// Every agent log of the home's jobs, concatenated.
fn agent_logs(home: &Home) -> String {
    home.agent_logs(None)
}

fn shared_malloc_config(home: &Home) -> String {
    let path = home.path().join("shared-malloc.yaml");
    std::fs::write(&path, "memory:\n  malloc: shared\n").unwrap();
    path.to_str().unwrap().to_string()
}

fn native_checksum(args: &[&str]) -> String {
    let out = native(&app("shmalloc"), args, None);
    assert_ok(&out, "native shmalloc");
    checksum_line(&stdout(&out))
}

#[test]
fn lists_shared_across_nodes_with_remote_frees() {
    let args = ["6000", "4"];
    let expected = native_checksum(&args);
    for nodes in ["1", "2"] {
        let home = Home::new();
        let exe = app("shmalloc");
        let mut argv = vec!["-n", "4", "--nodes", nodes, exe.to_str().unwrap()];
        argv.extend_from_slice(&args);
        let what = format!("shmalloc on {nodes} node(s)");
        let (ok, out, err) = run_job(&home, &argv, &what);
        assert!(ok && out.contains("OK"), "{what}:\n{out}\n{err}");
        assert_eq!(checksum_line(&out), expected, "{what}:\n{out}\n{err}");
        assert!(
            !err.contains("mome_shfree"),
            "{what} reported frees:\n{err}"
        );
        home.assert_nothing_left();
    }
}

#[test]
fn plain_malloc_is_shared_with_the_config_switch() {
    let args = ["6000", "3", "malloc"];
    let expected = native_checksum(&args);
    let home = Home::new();
    let config = shared_malloc_config(&home);
    let exe = app("shmalloc");
    let mut argv = vec![
        "--config",
        &config,
        "-n",
        "4",
        "--nodes",
        "2",
        exe.to_str().unwrap(),
    ];
    argv.extend_from_slice(&args);
    let (ok, out, err) = run_job(&home, &argv, "plain malloc, memory.malloc shared");
    assert!(ok && out.contains("OK"), "{out}\n{err}");
    assert_eq!(checksum_line(&out), expected);
    home.assert_nothing_left();
}

#[test]
fn bad_malloc_mode_is_a_clear_error() {
    let home = Home::new();
    let path = home.path().join("bad.yaml");
    std::fs::write(&path, "memory:\n  malloc: global\n").unwrap();
    let out = home.run(&["--config", path.to_str().unwrap(), "-n", "1", "true"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("memory.malloc") && err.contains("line 2") && err.contains("shared"),
        "{err}"
    );
}

#[test]
fn wrong_frees_are_reported_not_fatal() {
    let expected = {
        let out = native(&app("shfree-bad"), &[], None);
        assert_ok(&out, "native shfree-bad");
        checksum_line(&stdout(&out))
    };
    let home = Home::new();
    let exe = app("shfree-bad");
    let (ok, out, err) = run_job(
        &home,
        &["-n", "2", "--nodes", "2", exe.to_str().unwrap()],
        "shfree-bad on 2 nodes",
    );
    assert!(ok && out.contains("OK"), "{out}\n{err}");
    assert_eq!(checksum_line(&out), expected);
    for rank in ["0", "1"] {
        for what in [
            "is not in the shared heaps of mome_shmalloc: ignored",
            "is not an allocated block (freed twice, or not a block start): ignored",
        ] {
            let line = format!("mome: rank {rank}: mome_shfree: ");
            assert!(
                err.lines().any(|l| l.contains(&line) && l.contains(what)),
                "rank {rank} did not report {what:?}:\n{err}"
            );
        }
    }
    // Rank 1 freed rank 0's block twice from the other node: rank 0's node
    // saw it when it applied its queue.
    assert!(
        err.lines().any(|l| l.starts_with("[0] ")
            && l.contains("a block freed on another node")
            && l.contains("not an allocated block")),
        "the remote double free was not reported:\n{err}"
    );
    assert!(!agent_logs(&home).contains("panicked"));
    home.assert_nothing_left();
}

/// Checkpoint while the blocks freed in the round before the last wait
/// for their owners (the app holds before its last round), kill, restart:
/// the queues come back, the owners reuse those blocks (the app checks its
/// footprint) and the checksum is the native one.
#[test]
fn queued_remote_frees_survive_a_restart() {
    let args = ["6000", "3", "sh", "4000"];
    let expected = native_checksum(&args[..2]);
    let home = Home::new();
    let exe = app("shmalloc");
    let mut argv = vec!["-n", "4", "--nodes", "2", exe.to_str().unwrap()];
    argv.extend_from_slice(&args);
    let mut job = home.start(&argv, "first");
    job.wait_output("holding", 60);
    let stamp = home
        .ckpt(&job.id)
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}\njob stderr:\n{}", job.stderr()));
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "the job ended before it could be killed:\n{}",
        job.stdout()
    );
    job.kill9(&home);
    let kept = agent_logs(&home);
    assert!(
        kept.contains(
            "blocks freed by other nodes wait for this node's ranks (kept in the checkpoint)"
        ),
        "no remote free was queued at the checkpoint:\n{kept}"
    );
    let out = home.restart(&job.id, &[]);
    assert_ok(&out, "mome-restart of shmalloc on 2 nodes");
    assert_eq!(
        checksum_line(&stdout(&out)),
        expected,
        "restarted checksum differs\nstderr:\n{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("OK"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("stamp {}", stamp["stamp"])),
        "{}",
        stderr(&out)
    );
    assert!(
        agent_logs(&home).contains("blocks freed by other nodes restored"),
        "the restarted agents did not get the queued frees back"
    );
    home.assert_nothing_left();
}

/// With shared malloc the rank's malloc'ed data is in the shared heaps: a
/// forked child gets its own copy of them (not a view of the parent's), on
/// one node and on two (a shell forking and exec'ing commands).
#[test]
fn fork_copies_the_shared_heaps_for_the_child() {
    let home = Home::new();
    let config = shared_malloc_config(&home);
    let exe = probe("fork_probe");
    let o = home.run(&["--config", &config, "-n", "1", exe.to_str().unwrap()]);
    assert_ok(&o, "fork_probe with memory.malloc shared");
    assert!(stdout(&o).contains("ALL OK"), "{}", stdout(&o));
    let o = home.run(&[
        "--config",
        &config,
        "-n",
        "2",
        "--nodes",
        "2",
        "--no-prefix",
        "bash",
        "-c",
        "x=$(echo forked); for i in 1 2 3; do /bin/echo $x $i; done",
    ]);
    assert_ok(&o, "bash with memory.malloc shared on 2 nodes");
    assert_eq!(stdout(&o).matches("forked 3").count(), 2, "{}", stdout(&o));
}
