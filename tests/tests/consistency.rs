//! Consistency models (issue 6): strong, release and weak, selected per range
//! with `MomeConsistency`, with several writers of the same pages.
//!
//! - `false-share MODEL PAGES ITERS PATTERN`: 4 ranks on 2 and 4 nodes write
//!   disjoint words of every page (interleaved words, or contiguous blocks),
//!   then, after a barrier (and under weak `MomeSyncMem` at the barrier's
//!   date), every rank checks every word: a write not visible after the
//!   barrier, or one writer's bytes lost when the copies of a page are
//!   merged, is a MISMATCH. Its lock phase increments counters, under
//!   `mome_lock`, in pages every rank also writes without a lock: an
//!   increment of the previous holder not visible to the next acquirer, or a
//!   merge that drops words, is a MISMATCH. The checksum is the native one.
//! - Every test application under `MOME_APP_MODEL=release` and `=weak` (see
//!   test-apps/apputil.h) on 2 nodes gives its native checksum.
//! - `MomeConsistency` / `MomeSyncMem` refuse an unknown model, a range
//!   outside the DSM window and a date in the future (`false-share
//!   check-args`).

use std::process::{Command, Stdio};
use std::time::Duration;

use mome_tests::*;

/// A job not done in this time is a hang (a fault or a lock never served).
const TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `mome-run ARGS` with `env` to its end (killing it after TIMEOUT);
/// returns (success, stdout, stderr).
fn run_job(home: &Home, args: &[&str], env: &[(&str, &str)], what: &str) -> (bool, String, String) {
    home.run_to_end(args, env, what, TIMEOUT)
}

/// `app args` natively (one rank), with `env`.
fn native_env(app_name: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(app(app_name))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `app args`, 4 ranks on `nodes` nodes with `env`: checksum line
/// `expected`, OK, no MISMATCH, that many agents, nothing left behind.
fn check_job(app_name: &str, args: &[&str], nodes: &str, env: &[(&str, &str)], expected: &str) {
    let home = Home::new();
    let exe = app(app_name);
    let mut argv = vec!["-n", "4", "--nodes", nodes, exe.to_str().unwrap()];
    argv.extend_from_slice(args);
    let what = format!("{app_name} {args:?} on {nodes} nodes, env {env:?}");
    let (ok, out, err) = run_job(&home, &argv, env, &what);
    assert!(ok, "{what} failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("MISMATCH"), "{what}:\n{out}\n{err}");
    assert!(
        out.lines().any(|l| l.ends_with("OK")),
        "{what}:\n{out}\n{err}"
    );
    assert_eq!(checksum_line(&out), expected, "{what}:\n{out}");
    let status = home.last_status();
    let agents = status["agents"].as_array().unwrap().len();
    assert_eq!(agents.to_string(), nodes, "{status}");
    home.assert_nothing_left();
}

/// false-share under `model`: both patterns, 4 ranks on 2 and 4 nodes, the
/// native checksum (the same for every model) and zero wrong words.
fn false_share(model: &str) {
    let (pages, iters) = ("32", "8");
    for pattern in ["interleaved", "blocks"] {
        let args = [model, pages, iters, pattern];
        let native_out = native_env("false-share", &args, &[]);
        assert_ok(&native_out, &format!("native false-share {args:?}"));
        let expected = checksum_line(&stdout(&native_out));
        // The checksum does not depend on the model.
        let strong = native_env("false-share", &["strong", pages, iters, pattern], &[]);
        assert_eq!(checksum_line(&stdout(&strong)), expected);
        for nodes in ["2", "4"] {
            check_job("false-share", &args, nodes, &[], &expected);
        }
    }
}

#[test]
fn false_share_strong() {
    false_share("strong");
}

#[test]
fn false_share_release() {
    false_share("release");
}

#[test]
fn false_share_weak() {
    false_share("weak");
}

/// Nodes using different models on the same pages: release on even nodes,
/// strong on odd ones. A merge of a relaxed writer's changes invalidates
/// the strong nodes' copies before the release completes, so the strong
/// nodes see every write made before a barrier too.
#[test]
fn false_share_mixed_models() {
    false_share("mixed");
}

/// Every test application with shared memory, small sizes.
const APPS: &[(&str, &[&str])] = &[
    ("jacobi", &["128", "30"]),
    ("mat", &["96", "16"]),
    ("nbody", &["256", "4"]),
    ("cell", &["128", "20"]),
    ("pcg", &["32", "100"]),
    ("shared-counter", &["200"]),
    ("pthread-sync", &["50"]),
    ("page-share", &["300"]),
    ("read-into", &["48"]),
    ("fanout", &["128", "3"]),
    ("common-f77", &["4096", "3"]),
];

/// Every app under MOME_APP_MODEL=`model`, 4 ranks on 2 nodes: the native
/// checksum.
fn apps_under(model: &str) {
    let env = [("MOME_APP_MODEL", model)];
    for (name, args) in APPS {
        if *name == "common-f77" && !apps_dir().join(name).exists() {
            eprintln!("common-f77 not built (no gfortran): skipped");
            continue;
        }
        let native_out = native_env(name, args, &env);
        assert_ok(
            &native_out,
            &format!("native {name} {args:?} under {model}"),
        );
        let expected = checksum_line(&stdout(&native_out));
        // page-share's checksum is ROUNDS x ranks: 4 ranks here.
        let expected = if *name == "page-share" {
            "checksum page-share 1200".to_string()
        } else {
            expected
        };
        check_job(name, args, "2", &env, &expected);
    }
}

#[test]
fn every_app_under_release_on_two_nodes() {
    apps_under("release");
}

#[test]
fn every_app_under_weak_on_two_nodes() {
    apps_under("weak");
}

#[test]
fn every_app_under_mixed_models_on_two_nodes() {
    apps_under("mixed");
}

#[test]
fn every_app_reads_mome_app_model() {
    // A bad model is a usage error (exit 2) of every app: each one maps its
    // shared ranges through apputil's helpers, which select the model.
    for (name, args) in APPS {
        if !apps_dir().join(name).exists() {
            continue;
        }
        let o = native_env(name, args, &[("MOME_APP_MODEL", "sequential")]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name} ignored MOME_APP_MODEL=sequential\nstdout:\n{}\nstderr:\n{}",
            stdout(&o),
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("MOME_APP_MODEL"),
            "{name}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn consistency_calls_refuse_bad_arguments() {
    // Natively only the model is checked (one process: no window, no
    // dates); under mome-run, on 2 nodes, also a stack address, a global of
    // the executable, NULL, and dates after the last barrier.
    let o = native_env("false-share", &["check-args"], &[]);
    assert_ok(&o, "native false-share check-args");
    assert!(stdout(&o).contains("OK"), "{}", stdout(&o));
    check_job(
        "false-share",
        &["check-args"],
        "2",
        &[],
        "checksum false-share check-args",
    );
    // Bad arguments of the program itself: usage, exit 2.
    for args in [&["linear"][..], &[], &["weak", "4", "2", "diagonal"]] {
        let o = native_env("false-share", args, &[]);
        assert_eq!(o.status.code(), Some(2), "false-share {args:?}: {o:?}");
        assert!(stderr(&o).contains("usage: false-share"), "{o:?}");
    }
}

/// The agents' logs of job `id`, concatenated.
fn agent_logs(home: &Home, id: &str) -> String {
    home.agent_logs(Some(id))
}

/// A stamp of a job writing shared pages under `model` from several nodes
/// (twinned copies with changes not released yet, at almost any moment) is
/// a state the program could have observed: every node releases its
/// changes before the capture, as at a barrier (docs/consistency.md). The
/// job is checkpointed mid-run (until a stamp found changes to release), killed with SIGKILL, restarted, and
/// must end with the native checksum and no word found wrong, before or
/// after the restart (false-share keeps its error counts in shared memory,
/// so errors seen before the stamp survive it).
fn checkpoint_restart_under(model: &str, ranks: &str, nodes: &str, iters: &str) {
    let args = [model, "48", iters, "interleaved"];
    let native = native_env("false-share", &args, &[]);
    assert!(native.status.success(), "{native:?}");
    let expected = checksum_line(&String::from_utf8_lossy(&native.stdout));
    let home = Home::new();
    let exe = app("false-share");
    let mut argv = vec!["-n", ranks, "--nodes", nodes, exe.to_str().unwrap()];
    argv.extend_from_slice(&args);
    let mut job = home.start_with_env(&argv, &[], "first");
    // Checkpoints until one found changes to release (at least two), at
    // most eight.
    let mut released = false;
    for n in 0..8 {
        if released && n >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        home.ckpt(&job.id)
            .unwrap_or_else(|e| panic!("checkpoint failed: {e}\n{}", job.stderr()));
        released |=
            agent_logs(&home, &job.id).contains("pages written with a twin before the capture");
    }
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "false-share ended before it could be killed: make it run longer\n{}",
        job.stdout()
    );
    job.kill9(&home);
    let out = home.restart(&job.id, &[]);
    let (o, e) = (stdout(&out), stderr(&out));
    assert_ok(
        &out,
        &format!("mome-restart of false-share {model} on {nodes} nodes"),
    );
    assert!(!o.contains("MISMATCH"), "{o}\n{e}");
    assert_eq!(checksum_line(&o), expected, "{o}\n{e}");
    assert!(
        released,
        "no checkpoint found changes to release: the test did not test that"
    );
    home.assert_nothing_left();
}

#[test]
fn release_checkpoints_are_coherent() {
    checkpoint_restart_under("release", "4", "2", "800");
}

#[test]
fn weak_checkpoints_are_coherent_on_four_nodes() {
    // Two ranks per node: one is often writing while the other waits in a
    // barrier, so a stamp finds changes not released yet.
    checkpoint_restart_under("weak", "8", "4", "400");
}
