//! The life of a real job (real agent, preload and ranks): failures, signals,
//! a dead agent, and mome-status while it runs. Nothing may be left behind.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mome_tests::*;

fn wait_for_job_running(home: &Home, ranks: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(id) = home.jobs().pop() {
            let o = home.status(&[&id, "--json"]);
            if o.status.success() {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                    let running = v["ranks"]
                        .as_array()
                        .map(|r| r.iter().filter(|x| x["state"] == "running").count())
                        .unwrap_or(0);
                    if running == ranks {
                        return v;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job never had {ranks} running ranks"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `counter STEPS DELAY_MS` with two ranks in the background.
fn start_counter(home: &Home, steps: &str, delay_ms: &str, stderr: Stdio) -> std::process::Child {
    let exe = app("counter");
    home.command(&["-n", "2", exe.to_str().unwrap(), steps, delay_ms])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mome-run did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_crashing_rank_ends_ranks_blocked_in_a_barrier() {
    let home = Home::new();
    let exe = probe("crash_probe");
    let o = home.run(&["-n", "3", exe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(128 + libc::SIGSEGV), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("rank 1") && err.contains("SIGSEGV"), "{err}");
    assert!(!stdout(&o).contains("unreachable"));
    home.assert_nothing_left();
    assert_eq!(home.last_status()["state"], "failed");
}

#[test]
fn sigint_ends_a_running_job_cleanly() {
    let home = Home::new();
    let mut child = start_counter(&home, "1000", "50", Stdio::null());
    wait_for_job_running(&home, 2);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(st.code(), Some(128 + libc::SIGINT));
    home.assert_nothing_left();
}

#[test]
fn a_killed_agent_ends_the_job_with_a_message() {
    let home = Home::new();
    let mut child = start_counter(&home, "1000", "50", Stdio::piped());
    let status = wait_for_job_running(&home, 2);
    let agent = status["agents"][0]["pid"].as_i64().expect("agent pid") as i32;
    // SAFETY: killing the job's agent, a process this test started.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let st = wait_exit(&mut child, Duration::from_secs(15));
    assert_ne!(st.code(), Some(0));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("agent") && err.contains("node 0"), "{err}");
    home.assert_nothing_left();
}

#[test]
fn mome_status_shows_a_live_job_then_its_end() {
    let home = Home::new();
    let mut child = start_counter(&home, "8", "100", Stdio::null());
    let live = wait_for_job_running(&home, 2);
    assert_eq!(live["state"], "running");
    for r in live["ranks"].as_array().unwrap() {
        let pid = r["pid"].as_i64().unwrap() as i32;
        assert!(alive(pid), "rank pid {pid} reported but not alive");
    }
    let id = home.jobs().pop().unwrap();
    let table = stdout(&home.status(&[&id]));
    assert!(table.contains("running"), "{table}");
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    let done = home.last_status();
    assert_eq!(done["state"], "finished");
    assert_eq!(done["exit_code"], 0);
    let list = stdout(&home.status(&[]));
    assert!(list.contains(&id) && list.contains("finished"), "{list}");
    home.assert_nothing_left();
}
