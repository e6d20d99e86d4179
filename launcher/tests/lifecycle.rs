//! How a job ends: signals to mome-run, a failing rank, a dying or silent
//! agent, a closed stdout. In every case the job's processes (ranks, their
//! children, the agent) must all be gone when mome-run exits.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use mome_protocol::job::{JobState, ProcessState};

const FAST: &str = "job:\n  kill_grace: 500ms\n  agent_ready_timeout: 2s\n";

/// A rank that ignores SIGTERM, has a child in its process group and a
/// grandchild that left the group with setsid: all must die.
const STUBBORN_RANK: &str = r#"
trap '' TERM
sleep 30 & echo $! > child.$MOME_RANK
setsid sleep 30 & echo $! > escaped.$MOME_RANK
echo started
wait
"#;

#[test]
fn sigterm_to_mome_run_ends_every_process_of_the_job() {
    let env = TestEnv::new();
    // The ranks write the pids of their children: pids of mome-run's
    // namespace only without pid namespaces (tests/pidns.rs has the
    // namespaced version).
    let config = env.config(&format!("{FAST}checkpoint:\n  pid_namespace: never\n"));
    let child = env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .args(["-n", "3", "sh", "-c", STUBBORN_RANK])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, status) = wait_until_running(&env);
    let mut pids: Vec<i32> = status.ranks.iter().map(|r| r.pid.unwrap()).collect();
    let pgid = pids[0];
    pids.push(status.agents[0].pid.unwrap());
    for rank in 0..3 {
        pids.push(read_pid_file(&env.path(&format!("child.{rank}"))));
        pids.push(read_pid_file(&env.path(&format!("escaped.{rank}"))));
    }

    let start = Instant::now();
    send_signal(child.id(), libc::SIGTERM);
    let finished = wait_output(child, start);
    assert_eq!(finished.code(), 128 + libc::SIGTERM, "{finished:?}");
    // 500 ms of grace, then SIGKILL: well under the ranks' 30 s.
    assert!(
        finished.elapsed < Duration::from_secs(4),
        "{:?}",
        finished.elapsed
    );
    assert!(
        finished.stderr.contains(&format!(
            "mome: interrupted by SIGTERM; ending job {}",
            job.id
        )),
        "{}",
        finished.stderr
    );
    assert_all_gone(&pids, Some(pgid));

    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.exit_code, Some(143));
    assert_eq!(status.reason.as_deref(), Some("interrupted by SIGTERM"));
    assert!(
        status
            .ranks
            .iter()
            .all(|r| r.state == ProcessState::Killed(libc::SIGKILL)),
        "{status:?}"
    );
}

#[test]
fn sigint_is_forwarded_to_the_ranks() {
    let env = TestEnv::new();
    let config = env.config(FAST);
    let mut child = env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .args(["-n", "2", "sh", "-c", r#"trap 'echo "rank $MOME_RANK got INT"; exit 0' INT; echo up; while :; do sleep 0.05; done"#])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_job, status) = wait_until_running(&env);
    // The traps must be set before the signal: wait for the rank's `up`.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.windows(2).filter(|w| w == b"up").count() < 2 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "mome-run closed stdout early");
        seen.extend_from_slice(&buf[..n]);
    }
    let start = Instant::now();
    send_signal(child.id(), libc::SIGINT);
    child.stdout = Some(stdout);
    let finished = wait_output(child, start);
    assert_eq!(finished.code(), 130, "{finished:?}");
    let text = finished.stdout_text();
    assert!(
        text.contains("[0] rank 0 got INT") && text.contains("[1] rank 1 got INT"),
        "{text}"
    );
    let pids: Vec<i32> = status.ranks.iter().map(|r| r.pid.unwrap()).collect();
    assert_all_gone(&pids, Some(pids[0]));
}

#[test]
fn a_failing_rank_ends_the_others() {
    let env = TestEnv::new();
    let config = env.config(FAST);
    let out = run(env.mome_run().arg("--config").arg(&config).args([
        "-n",
        "3",
        "sh",
        "-c",
        r#"if [ "$MOME_RANK" = 1 ]; then sleep 0.2; exit 5; fi; exec sleep 30"#,
    ]));
    assert_eq!(out.code(), 5, "{out:?}");
    assert!(out.elapsed < Duration::from_secs(4), "{:?}", out.elapsed);
    assert!(
        out.stderr.contains("mome: rank 1 (pid ")
            && out
                .stderr
                .contains(") exited with status 5; ending the job"),
        "{}",
        out.stderr
    );
    let status = env.only_job().read_status().unwrap();
    assert_eq!(status.exit_code, Some(5));
    assert_eq!(status.ranks[1].state, ProcessState::Exited(5));
    assert_eq!(status.ranks[0].state, ProcessState::Killed(libc::SIGTERM));
    assert_eq!(status.ranks[2].state, ProcessState::Killed(libc::SIGTERM));
    let pids: Vec<i32> = status.ranks.iter().filter_map(|r| r.pid).collect();
    assert_all_gone(&pids, Some(pids[0]));
}

#[test]
fn killing_the_agent_ends_the_job() {
    let env = TestEnv::new();
    let config = env.config(FAST);
    let child = env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .args(["-n", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, status) = wait_until_running(&env);
    let agent = status.agents[0].pid.unwrap();
    let start = Instant::now();
    send_signal(agent as u32, libc::SIGKILL);
    let finished = wait_output(child, start);
    assert_eq!(finished.code(), 1, "{finished:?}");
    let expected = format!(
        "mome: the agent of node 0 (pid {agent}) exited unexpectedly (killed by SIGKILL); see {}",
        job.agent_log(0).display()
    );
    assert!(finished.stderr.contains(&expected), "{}", finished.stderr);
    assert!(
        finished.elapsed < Duration::from_secs(4),
        "{:?}",
        finished.elapsed
    );
    let mut pids: Vec<i32> = status.ranks.iter().map(|r| r.pid.unwrap()).collect();
    let pgid = pids[0];
    pids.push(agent);
    assert_all_gone(&pids, Some(pgid));
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.agents[0].state, ProcessState::Killed(libc::SIGKILL));
}

#[test]
fn an_agent_that_never_says_ready_times_out() {
    let env = TestEnv::new();
    let slow = env.path("slow-agent");
    write_script(
        &slow,
        "#!/bin/sh\necho 'agent: still thinking' >&2\nexec sleep 30\n",
    );
    let config = env.config("job:\n  agent_ready_timeout: 300ms\n");
    let out = run(env
        .mome_run()
        .env("MOME_AGENT_BIN", &slow)
        .arg("--config")
        .arg(&config)
        .arg("true"));
    assert_eq!(out.code(), 1, "{out:?}");
    let job = env.only_job();
    let expected = format!(
        "mome-run: the agent of node 0 did not become ready within 300ms; see {}",
        job.agent_log(0).display()
    );
    assert!(out.stderr.contains(&expected), "{}", out.stderr);
    // The end of the agent's log is shown.
    assert!(
        out.stderr.contains("agent: still thinking"),
        "{}",
        out.stderr
    );
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert!(
        status.ranks.iter().all(|r| r.pid.is_none()),
        "no rank was started"
    );
    assert_all_gone(&[status.agents[0].pid.unwrap()], None);
}

#[test]
fn an_agent_that_dies_at_startup_is_reported() {
    let env = TestEnv::new();
    let bad = env.path("bad-agent");
    write_script(
        &bad,
        "#!/bin/sh\necho 'cannot create the memfd' >&2\nexit 4\n",
    );
    let out = run(env.mome_run().env("MOME_AGENT_BIN", &bad).arg("true"));
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains("did not become ready (it exited with status 4)")
            && out.stderr.contains("cannot create the memfd"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_closed_stdout_does_not_hang_the_job() {
    let env = TestEnv::new();
    let mut child = env
        .mome_run()
        .args(["-n", "2", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 1000];
    stdout.read_exact(&mut buf).unwrap();
    assert!(buf.starts_with(b"[0] y\n") || buf.starts_with(b"[1] y\n"));
    // Like `mome-run yes | head`: the reader goes away.
    drop(stdout);
    let finished = wait_output(child, Instant::now());
    // The ranks get SIGPIPE, as `yes` would in a native pipeline.
    assert_eq!(finished.code(), 128 + libc::SIGPIPE, "{finished:?}");
    let status = env.only_job().read_status().unwrap();
    let pids: Vec<i32> = status.ranks.iter().filter_map(|r| r.pid).collect();
    assert_all_gone(&pids, Some(pids[0]));
}

#[test]
fn the_control_socket_answers_while_the_job_runs() {
    let env = TestEnv::new();
    let child = env
        .mome_run()
        .args(["-n", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, _) = wait_until_running(&env);
    let socket = job.control_socket();
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&socket).unwrap()) & 0o777;
    assert_eq!(mode, 0o600);
    {
        use std::io::{BufRead, BufReader, Write};
        let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        (&stream)
            .write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":\"fly\"}\nnot json\n")
            .unwrap();
        let mut lines = BufReader::new(&stream).lines();
        let status: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(status["reply"], "status");
        assert_eq!(status["state"], "running");
        assert_eq!(status["id"], job.id.as_str());
        assert_eq!(status["ranks"].as_array().unwrap().len(), 2);
        let unknown: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(unknown["reply"], "error");
        assert!(unknown["message"].as_str().unwrap().contains("fly"));
        let malformed: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(malformed["reply"], "error");
    }
    send_signal(child.id(), libc::SIGTERM);
    let finished = wait_output(child, Instant::now());
    assert_eq!(finished.code(), 143, "{finished:?}");
    assert!(!socket.exists(), "the control socket is removed at the end");
}
