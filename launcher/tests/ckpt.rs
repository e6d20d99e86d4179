//! Checkpoint coordination with real mome-run, mome-ckpt, mome-status and
//! mome-restart processes and a fake agent that answers checkpoint
//! commands with the events a real one sends (it writes no data: the
//! stamps it "takes" commit, but do not verify for a restart).

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

const MOME_CKPT: &str = env!("CARGO_BIN_EXE_mome-ckpt");
const MOME_RESTART: &str = env!("CARGO_BIN_EXE_mome-restart");

/// Answers `checkpoint` with progress, paused and durable events (or
/// `failed` when the file `fail` exists in its cwd... of the job: the
/// test's directory, passed in FAKE_DIR); logs every command to
/// $FAKE_DIR/commands.
const CKPT_AGENT: &str = r#"#!/bin/sh
echo ready
while read -r line; do
  echo "$line" >> "$FAKE_DIR/commands"
  case "$line" in
    *'"cmd":"checkpoint"'*)
      s=$(echo "$line" | sed 's/.*"stamp":\([0-9]*\).*/\1/')
      if [ -e "$FAKE_DIR/fail" ]; then
        echo "{\"event\":\"failed\",\"stamp\":$s,\"reason\":\"rank 1 has 2 threads\"}"
        continue
      fi
      echo "{\"event\":\"progress\",\"stamp\":$s,\"phase\":\"write\",\"done_bytes\":1,\"total_bytes\":2}"
      echo "{\"event\":\"paused\",\"stamp\":$s,\"pause_us\":1234,\"pause_pages\":1,\"precopy_pages\":2}"
      echo "{\"event\":\"durable\",\"stamp\":$s,\"node\":0,\"index\":\"node-0/$s.index\",\"index_len\":1,\"index_xxh3\":2,\"pages\":3,\"bytes_written\":4096,\"image_bytes\":5,\"elapsed_us\":6}"
      ;;
  esac
done
"#;

fn ckpt_env() -> TestEnv {
    let env = TestEnv::new();
    write_script(&env.agent, CKPT_AGENT);
    env
}

fn mome_ckpt(env: &TestEnv, args: &[&str]) -> Finished {
    run(Command::new(MOME_CKPT)
        .env("MOME_HOME", &env.home)
        .args(args))
}

#[test]
fn mome_ckpt_commits_and_mome_status_lists_it() {
    let env = ckpt_env();
    let child = env
        .mome_run()
        .env("FAKE_DIR", env.dir.path())
        .args(["--keep", "2", "-n", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, _) = wait_until_running(&env);

    let out = mome_ckpt(&env, &[&job.id]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(
        out.stdout_text(),
        "stamp 1 committed (pause 1.2 ms, 0.0 MB written in 0 ms)\n"
            .replace(" 0 ms", &format!(" {} ms", commit_ms(&out.stdout_text())))
    );
    let out = mome_ckpt(&env, &["--json", &job.id]);
    assert_eq!(out.code(), 0, "{out:?}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["stamp"], 2);
    assert_eq!(done["parent"], 1);
    assert_eq!(done["pause_us"], 1234);
    assert_eq!(done["bytes_written"], 4096);
    // A third: keep 2 would prune stamp 1, but the prune cannot read the
    // fake indexes: logged, the commit stands, nothing is removed.
    assert_eq!(mome_ckpt(&env, &[&job.id]).code(), 0);
    let log = std::fs::read_to_string(job.coordinator_log()).unwrap();
    assert!(
        log.contains("pruning ") && log.contains("after checkpoint 3"),
        "{log}"
    );
    let commands = std::fs::read_to_string(env.path("commands")).unwrap();
    assert!(
        commands.contains(r#"{"cmd":"commit","stamp":3,"#),
        "{commands}"
    );

    let out = run(env.mome_status().args(["--json", &job.id]));
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stamps: Vec<u64> = detail["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stamp"].as_u64().unwrap())
        .collect();
    assert_eq!(stamps, vec![1, 2, 3]);
    let text = run(env.mome_status().arg(&job.id)).stdout_text();
    assert!(text.contains("STAMP") && text.contains("1.2 ms"), "{text}");

    // A running job is not restarted.
    let out = run(Command::new(MOME_RESTART)
        .env("MOME_HOME", &env.home)
        .arg(&job.id));
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("still running"), "{}", out.stderr);

    // A failing checkpoint: reason given, exit 1, the job goes on.
    std::fs::write(env.path("fail"), "").unwrap();
    let out = mome_ckpt(&env, &[&job.id]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr.contains("checkpoint 4 failed") && out.stderr.contains("2 threads"),
        "{}",
        out.stderr
    );
    let commands = std::fs::read_to_string(env.path("commands")).unwrap();
    assert!(
        commands.contains(r#"{"cmd":"abort","stamp":4}"#),
        "{commands}"
    );

    send_signal(child.id(), libc::SIGTERM);
    let finished = wait_output(child, Instant::now());
    assert_eq!(finished.code(), 143, "{finished:?}");
    let status = job.read_status().unwrap();
    assert_eq!(status.checkpoints.len(), 3, "{status:?}");

    // Ended: mome-ckpt says so; mome-restart finds the stamps (the fake
    // agent wrote no index: none verifies) and says why.
    let out = mome_ckpt(&env, &[&job.id]);
    assert_eq!(out.code(), 3, "{out:?}");
    let out = run(Command::new(MOME_RESTART)
        .env("MOME_HOME", &env.home)
        .arg(&job.id));
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(
        out.stderr.contains("mome: stamp 3 rejected")
            && out.stderr.contains("mome: stamp 2 rejected")
            && out.stderr.contains("no usable checkpoint"),
        "{}",
        out.stderr
    );
    let out = run(Command::new(MOME_RESTART)
        .env("MOME_HOME", &env.home)
        .args(["--stamp", "9", &job.id]));
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(
        out.stderr.contains("stamp 9 does not exist")
            && out.stderr.contains("(committed: 1, 2, 3)"),
        "{}",
        out.stderr
    );
}

fn commit_ms(line: &str) -> String {
    line.rsplit(" in ")
        .next()
        .unwrap()
        .trim_end_matches(" ms)\n")
        .to_string()
}

#[test]
fn periodic_checkpoints_and_their_failures() {
    let env = ckpt_env();
    std::fs::write(env.path("fail"), "").unwrap();
    let out = run(env.mome_run().env("FAKE_DIR", env.dir.path()).args([
        "--ckpt-interval",
        "150ms",
        "sh",
        "-c",
        "sleep 0.5",
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr
            .contains("mome: checkpoint 1 failed: node 0: rank 1 has 2 threads"),
        "{}",
        out.stderr
    );
    std::fs::remove_file(env.path("fail")).unwrap();
    let env2 = ckpt_env();
    let out = run(env2.mome_run().env("FAKE_DIR", env2.dir.path()).args([
        "--ckpt-interval",
        "150ms",
        "sh",
        "-c",
        "sleep 0.5",
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    let status = env2.only_job().read_status().unwrap();
    assert!(!status.checkpoints.is_empty(), "{status:?}");
    assert!(status.checkpoints.iter().all(|c| !c.requested));
    let log = std::fs::read_to_string(env2.only_job().coordinator_log()).unwrap();
    assert!(
        log.contains("checkpoint 1 committed: pause_us 1234"),
        "{log}"
    );
}
