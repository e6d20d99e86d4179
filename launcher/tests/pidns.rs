//! Pid pinning with real processes: mome-rankinit alone (same pid at each
//! run, exit codes and signals relayed, orphans reaped) and mome-run with
//! `checkpoint.pid_namespace` (pids shown from outside, signals, nothing
//! left behind). Skipped, saying so, where pid namespaces are not
//! permitted.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const RANKINIT: &str = env!("CARGO_BIN_EXE_mome-rankinit");

fn namespaces_permitted() -> bool {
    let ok = Command::new(RANKINIT)
        .arg("--probe")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("pid namespaces are not permitted here: test skipped");
    }
    ok
}

fn rankinit(pid: i32, script: &str) -> Command {
    let mut cmd = Command::new(RANKINIT);
    cmd.args([
        "--pid",
        &pid.to_string(),
        "--",
        "/bin/sh",
        "sh",
        "-c",
        script,
    ]);
    cmd
}

#[test]
fn the_same_pid_at_every_run_and_the_exit_status_relayed() {
    if !namespaces_permitted() {
        return;
    }
    for _ in 0..2 {
        let out = run(&mut rankinit(103, "echo $$; exit 3"));
        assert_eq!(out.code(), 3, "{out:?}");
        assert_eq!(out.stdout_text(), "103\n");
    }
    // /proc is the namespace's: the rank finds itself at /proc/<getpid()>.
    let out = run(&mut rankinit(
        110,
        "echo $$; [ \"$(cut -d' ' -f1 /proc/$$/stat)\" = $$ ] && echo here",
    ));
    assert_eq!(out.stdout_text(), "110\nhere\n", "{out:?}");
    // The preload value travels under another name; the rank gets it back.
    let out = run(rankinit(100, "echo \"$LD_PRELOAD\"")
        .env("MOME_RANKINIT_PRELOAD", "/nonexistent/lib.so")
        .env_remove("LD_PRELOAD"));
    assert!(
        out.stdout_text().starts_with("/nonexistent/lib.so"),
        "{out:?}"
    );
}

#[test]
fn a_signal_that_kills_the_rank_kills_the_relay() {
    if !namespaces_permitted() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let out = run(&mut rankinit(100, "kill -SEGV $$"));
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{out:?}");
    // SIGPIPE is back to its default in the rank.
    let out = run(&mut rankinit(100, "kill -PIPE $$"));
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
}

#[test]
fn sigterm_to_the_relay_reaches_the_rank() {
    if !namespaces_permitted() {
        return;
    }
    // From anyone but its parent (mome-run signals the rank itself): here
    // a shell is the parent and the test sends the signal.
    let script = format!(
        "{RANKINIT} --pid 100 -- /bin/sh sh -c \"trap 'echo got TERM; exit 5' TERM; echo up; while :; do sleep 0.05; done\" & echo $! > relay.pid; wait $!"
    );
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("/bin/sh")
        .args(["-c", &script])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("relay.pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pid_file).map_or(true, |t| !t.ends_with('\n')) {
        assert!(Instant::now() < deadline, "no relay.pid");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give the rank time to install its trap.
    std::thread::sleep(Duration::from_millis(300));
    send_signal(read_pid_file(&pid_file) as u32, libc::SIGTERM);
    let out = wait_output(child, Instant::now());
    assert_eq!(out.code(), 5, "{out:?}");
    assert_eq!(out.stdout_text(), "up\ngot TERM\n");
}

/// Pids of the processes whose pid namespace is `ns` (a /proc/PID/ns/pid
/// link target).
fn in_namespace(ns: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.to_string_lossy() == ns)
        })
        .collect()
}

const STUBBORN_RANK: &str = r#"
trap '' TERM
sleep 30 &
setsid sleep 30 &
echo "pid $$"
wait
"#;

#[test]
fn mome_run_pins_pids_and_leaves_nothing_behind() {
    if !namespaces_permitted() {
        return;
    }
    let env = TestEnv::new();
    let config = env.config(
        "job:\n  kill_grace: 500ms\n  agent_ready_timeout: 2s\ncheckpoint:\n  pid_namespace: always\n",
    );
    let child = env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .env("MOME_RANKINIT_BIN", RANKINIT)
        .args(["-n", "2", "sh", "-c", STUBBORN_RANK])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, status) = wait_until_running(&env);
    let spec = job.read_spec().unwrap();
    assert!(spec.pids_pinned, "{spec:?}");
    let mut namespaces = Vec::new();
    for r in &status.ranks {
        let pid = r.pid.unwrap();
        // The pid shown is the rank's own, seen from outside: its
        // innermost pid is the pinned one.
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = proc_status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .unwrap()
            .to_string();
        assert!(
            nspid.ends_with(&format!("\t{}", 100 + r.rank)),
            "rank {}: {nspid}",
            r.rank
        );
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        namespaces.push(ns.to_string_lossy().into_owned());
    }
    // Wait until the ranks started their children.
    let deadline = Instant::now() + Duration::from_secs(5);
    while namespaces.iter().any(|ns| in_namespace(ns).len() < 4) {
        assert!(
            Instant::now() < deadline,
            "the ranks' children never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    send_signal(child.id(), libc::SIGTERM);
    let finished = wait_output(child, start);
    assert_eq!(finished.code(), 128 + libc::SIGTERM, "{finished:?}");
    let out = finished.stdout_text();
    assert!(
        out.contains("[0] pid 100") && out.contains("[1] pid 101"),
        "{out}"
    );
    for ns in &namespaces {
        let left = in_namespace(ns);
        assert!(left.is_empty(), "left in {ns}: {left:?}");
    }
    let status = job.read_status().unwrap();
    assert!(
        status
            .ranks
            .iter()
            .all(|r| r.state == mome_protocol::job::ProcessState::Killed(libc::SIGKILL)),
        "{status:?}"
    );
}

#[test]
fn a_rank_killed_by_a_signal_is_reported_as_such() {
    if !namespaces_permitted() {
        return;
    }
    let env = TestEnv::new();
    let config = env.config("checkpoint:\n  pid_namespace: always\n");
    let out = run(env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .env("MOME_RANKINIT_BIN", RANKINIT)
        .args([
            "-n",
            "2",
            "sh",
            "-c",
            "[ $MOME_RANK = 1 ] && kill -SEGV $$; exit 0",
        ]));
    assert_eq!(out.code(), 128 + libc::SIGSEGV, "{out:?}");
    assert!(
        out.stderr.contains("was killed by SIGSEGV"),
        "{}",
        out.stderr
    );
    let status = env.only_job().read_status().unwrap();
    assert_eq!(
        status.ranks[1].state,
        mome_protocol::job::ProcessState::Killed(libc::SIGSEGV)
    );
}

#[test]
fn never_runs_the_ranks_as_before() {
    let env = TestEnv::new();
    let config = env.config("checkpoint:\n  pid_namespace: never\n");
    let out = run(env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .args(["sh", "-c", "echo $$"]));
    assert_eq!(out.code(), 0, "{out:?}");
    let spec = env.only_job().read_spec().unwrap();
    assert!(!spec.pids_pinned);
    assert!(spec.pids_note.unwrap().contains("never"));
    let status = env.only_job().read_status().unwrap();
    assert_eq!(
        out.stdout_text().trim(),
        status.ranks[0].pid.unwrap().to_string()
    );
}
