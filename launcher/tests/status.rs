//! mome-status: the job list, one job, JSON, unknown ids, lost jobs.

mod common;

use std::process::Stdio;
use std::time::Instant;

use common::*;

#[test]
fn an_empty_home_has_no_jobs() {
    let env = TestEnv::new();
    let out = run(&mut env.mome_status());
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(
        out.stdout_text(),
        format!("no jobs in {}\n", env.home.display())
    );
    let json = run(env.mome_status().arg("--json"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json.stdout).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn lists_and_shows_finished_jobs() {
    let env = TestEnv::new();
    assert_eq!(run(env.mome_run().args(["-n", "2", "true"])).code(), 0);
    assert_eq!(run(env.mome_run().args(["sh", "-c", "exit 7"])).code(), 7);
    let ids = env.job_ids();
    assert_eq!(ids.len(), 2);

    let list = run(&mut env.mome_status());
    assert_eq!(list.code(), 0, "{list:?}");
    let text = list.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "STATE", "RANKS", "NODES", "STARTED", "COMMAND"]
    );
    // Columns are aligned: every STATE starts where the header's does.
    let state_col = lines[0].find("STATE").unwrap();
    for line in &lines[1..] {
        assert!(
            line[state_col..].starts_with("finished") || line[state_col..].starts_with("failed"),
            "{text}"
        );
    }
    let row_of = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap()
            .to_string()
    };
    let ok = row_of(" true");
    assert!(
        ok.contains("finished") && ok.split_whitespace().nth(2) == Some("2"),
        "{ok}"
    );
    let failed = row_of("exit 7");
    assert!(
        failed.contains("failed") && failed.ends_with("sh -c 'exit 7'"),
        "{failed}"
    );

    let failed_id = failed.split_whitespace().next().unwrap().to_string();
    let one = run(env.mome_status().arg(&failed_id));
    assert_eq!(one.code(), 0, "{one:?}");
    let text = one.stdout_text();
    for needle in [
        format!("job        {failed_id}"),
        "state      failed".to_string(),
        "exit code  7".to_string(),
        "reason     rank 0 (pid ".to_string(),
        "RANK  NODE  PID".to_string(),
        "exited(7)".to_string(),
        "NODE  PID".to_string(),
    ] {
        assert!(
            squash(&text).contains(&squash(&needle)),
            "no {needle:?} in\n{text}"
        );
    }

    let json = run(env.mome_status().args(["--json", &failed_id]));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["id"], failed_id.as_str());
    assert_eq!(value["state"], "failed");
    assert_eq!(value["exit_code"], 7);
    assert_eq!(value["argv"], serde_json::json!(["sh", "-c", "exit 7"]));
    assert_eq!(value["ranks"][0]["state"], "exited");
    assert_eq!(value["ranks"][0]["value"], 7);

    let all = run(env.mome_status().arg("--json"));
    let value: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(value.as_array().unwrap().len(), 2);
    assert_eq!(value[0]["id"], ids[0].as_str());
}

/// Runs of spaces as one (the columns' widths depend on the values).
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn an_unknown_job_is_an_error() {
    let env = TestEnv::new();
    let out = run(env.mome_status().arg("no-such-job"));
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "mome-status: no job no-such-job in {} (mome-status lists the jobs)\n",
            env.home.display()
        )
    );
}

#[test]
fn a_live_job_is_asked_and_a_dead_coordinator_means_lost() {
    let env = TestEnv::new();
    let mut child = env
        .mome_run()
        .args(["-n", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (job, status) = wait_until_running(&env);
    let live = run(env.mome_status().args(["--json", &job.id]));
    let value: serde_json::Value = serde_json::from_slice(&live.stdout).unwrap();
    assert_eq!(value["state"], "running");
    assert_eq!(value["source"], "control socket");
    assert_eq!(value["ranks"][1]["pid"], status.ranks[1].pid.unwrap());
    let list = run(&mut env.mome_status());
    assert!(
        list.stdout_text().contains("running"),
        "{}",
        list.stdout_text()
    );

    // mome-run killed outright cannot record its end: the job is lost, and
    // its ranks die with it (PR_SET_PDEATHSIG).
    child.kill().unwrap();
    wait_bounded(&mut child, std::time::Duration::from_secs(5));
    let start = Instant::now();
    let pids: Vec<i32> = status.ranks.iter().filter_map(|r| r.pid).collect();
    assert_all_gone(&pids, None);
    assert!(start.elapsed().as_secs() < 3);
    let list = run(&mut env.mome_status());
    assert!(
        list.stdout_text().contains(" lost "),
        "{}",
        list.stdout_text()
    );
    let one = run(env.mome_status().args(["--json", &job.id]));
    let value: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(value["state"], "lost");
    assert_eq!(value["source"], "status.json");
}
