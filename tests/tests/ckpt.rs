//! Checkpoint / restart end to end: real jobs checkpointed mid-run with
//! mome-ckpt, killed with SIGKILL (ranks, agent and mome-run), restarted with
//! mome-restart, and compared with an uninterrupted run.

use std::path::Path;
use std::time::Duration;

use mome_tests::*;

/// Runs `args` under mome-run, checkpoints it once `marker` is in its
/// output (or after `delay` when `marker` is empty), kills everything with
/// SIGKILL, restarts it and returns (stdout before the kill, restart output).
fn ckpt_kill_restart(
    home: &Home,
    args: &[&str],
    marker: &str,
    delay: Duration,
) -> (String, std::process::Output, serde_json::Value) {
    let mut job = home.start(args, "first");
    if marker.is_empty() {
        std::thread::sleep(delay);
    } else {
        job.wait_output(marker, 60);
    }
    let stamp = home
        .ckpt(&job.id)
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}\njob stderr:\n{}", job.stderr()));
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "the job ended before it could be killed: make it run longer\n{}",
        job.stdout()
    );
    job.kill9(home);
    let before = job.stdout();
    let out = home.restart(&job.id, &[]);
    (before, out, stamp)
}

fn native_out(app_name: &str, args: &[&str]) -> String {
    let o = native(&app(app_name), args, None);
    assert_ok(&o, app_name);
    stdout(&o)
}

fn check_restarted_app(app_name: &str, args: &[&str], ranks: u32, delay_ms: u64) {
    let home = Home::new();
    let native = native_out(app_name, args);
    let n = ranks.to_string();
    let app_path = app(app_name);
    let mut all = vec!["-n", &n, app_path.to_str().unwrap()];
    all.extend_from_slice(args);
    let (_, out, stamp) = ckpt_kill_restart(&home, &all, "", Duration::from_millis(delay_ms));
    assert_ok(&out, &format!("mome-restart of {app_name}"));
    assert_eq!(
        checksum_line(&stdout(&out)),
        checksum_line(&native),
        "{app_name}: restarted checksum differs\nstderr:\n{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("OK"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("stamp {}", stamp["stamp"])),
        "mome-restart does not say which stamp it restored:\n{}",
        stderr(&out)
    );
}

#[test]
fn counter_resumes_where_it_was_checkpointed() {
    let home = Home::new();
    let counter = app("counter");
    let native = native_out("counter", &["60", "20"]);
    let (before, out, stamp) = ckpt_kill_restart(
        &home,
        &[counter.to_str().unwrap(), "60", "20"],
        "step 10 ",
        Duration::ZERO,
    );
    assert_ok(&out, "mome-restart");
    let after = stdout(&out);
    // The restarted run goes on from the checkpoint: its lines are the end
    // of the uninterrupted run's, starting after a step printed before it.
    assert!(
        native.ends_with(&after),
        "restart output is not the end of the uninterrupted run:\n{after}"
    );
    let first = after.lines().next().expect("restart printed nothing");
    assert!(
        before.contains(
            first
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
                .as_str()
        ) || first.starts_with("step 1"),
        "first restarted line {first:?} is not right after the checkpoint"
    );
    assert!(after.contains("OK"));
    assert!(stamp["pause_us"].as_u64().is_some(), "{stamp}");
    home.assert_nothing_left();
}

#[test]
fn restarting_twice_from_the_same_stamp_gives_the_same_result() {
    let home = Home::new();
    let counter = app("counter");
    let (_, first, stamp) = ckpt_kill_restart(
        &home,
        &[counter.to_str().unwrap(), "40", "20"],
        "step 5 ",
        Duration::ZERO,
    );
    assert_ok(&first, "first restart");
    let s = stamp["stamp"].to_string();
    let second = home.restart(&home.jobs()[0], &["--stamp", &s]);
    assert_ok(&second, "second restart");
    assert_eq!(stdout(&first), stdout(&second));
}

#[test]
fn checkpoint_restart_chains() {
    let home = Home::new();
    let counter = app("counter");
    let native = native_out("counter", &["80", "20"]);
    let mut job = home.start(&[counter.to_str().unwrap(), "80", "20"], "first");
    job.wait_output("step 10 ", 60);
    home.ckpt(&job.id).unwrap();
    job.kill9(&home);
    let id = job.id.clone();
    for round in 0..3 {
        let mut r = home.start_restart(&id, &[], &format!("restart{round}"));
        wait_for(
            || r.stdout().lines().count().ge(&5).then_some(()),
            60,
            "restarted output",
        );
        let ck = home
            .ckpt(&id)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", r.stderr()));
        assert!(ck["stamp"].as_u64().unwrap() >= 2 + round as u64, "{ck}");
        r.kill9(&home);
    }
    let out = home.restart(&id, &[]);
    assert_ok(&out, "last restart");
    assert!(native.ends_with(&stdout(&out)), "{}", stdout(&out));
    assert_eq!(checksum_line(&stdout(&out)), checksum_line(&native));
}

#[test]
fn jacobi_two_ranks() {
    check_restarted_app("jacobi", &["512", "3000"], 2, 400);
}

#[test]
fn mat_two_ranks() {
    check_restarted_app("mat", &["1024", "64"], 2, 500);
}

#[test]
fn nbody_two_ranks() {
    check_restarted_app("nbody", &["4096", "20"], 2, 500);
}

#[test]
fn cell_two_ranks() {
    check_restarted_app("cell", &["1024", "400"], 2, 300);
}

#[test]
fn pcg_two_ranks() {
    check_restarted_app("pcg", &["384", "4000"], 2, 500);
}

#[test]
fn shared_counter_two_ranks() {
    check_restarted_app("shared-counter", &["100000"], 2, 300);
}

#[test]
fn common_f77_two_ranks() {
    if !Path::new(&apps_dir().join("common-f77")).exists() {
        eprintln!("common-f77 not built (no gfortran): skipped");
        return;
    }
    check_restarted_app("common-f77", &["262144", "3000"], 2, 300);
}

/// A real program under `mome-run -n 1`, checkpointed after `delay`, killed,
/// restarted: its whole output must be the uninterrupted run's.
fn check_restarted_program(program: &str, args: &[&str], delay_ms: u64) {
    let home = Home::new();
    let native = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_ok(&native, program);
    let mut all = vec![program];
    all.extend_from_slice(args);
    let (before, out, _) = ckpt_kill_restart(&home, &all, "", Duration::from_millis(delay_ms));
    assert_ok(&out, &format!("mome-restart of {program}"));
    let whole = stdout(&native);
    let after = stdout(&out);
    assert!(
        whole.ends_with(&after) && whole.starts_with(&before) && before.len() + after.len() >= whole.len(),
        "{program}: output before the kill + after the restart is not the uninterrupted output\nbefore:\n{before}\nafter:\n{after}\nstderr:\n{}",
        stderr(&out)
    );
}

fn scratch_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mome-ckpt-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn python_after_importing_c_extensions() {
    let script = scratch_file(
        "work.py",
        r#"
import hashlib, json, zlib, time, sys
h = hashlib.sha256()
data = {"steps": []}
for i in range(60):
    for j in range(2000):
        h.update(str(i * 2000 + j).encode())
    data["steps"].append(h.hexdigest()[:12])
    print(i, h.hexdigest()[:16], zlib.crc32(json.dumps(data).encode()), flush=True)
    time.sleep(0.03)
print("done", hashlib.md5(json.dumps(data).encode()).hexdigest())
"#,
    );
    check_restarted_program("python3", &[script.to_str().unwrap()], 700);
}

#[test]
fn bc_long_computation() {
    let prog = scratch_file("pi.bc", "scale=1400\n4*a(1)\nquit\n");
    check_restarted_program("bc", &["-l", prog.to_str().unwrap()], 300);
}

#[test]
fn long_sort() {
    let mut text = String::new();
    let mut x: u64 = 12345;
    for _ in 0..600_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(&format!("{:016x} {}\n", x, x % 1000));
    }
    let input = scratch_file("sort.in", &text);
    check_restarted_program("sort", &["--parallel=1", input.to_str().unwrap()], 250);
}

fn refused(mode: &str, expect: &str) {
    let home = Home::new();
    let probe = probe("ckpt_refusal_probe");
    let mut job = home.start(&[probe.to_str().unwrap(), mode, "60"], mode);
    job.wait_output("step 3\n", 30);
    let err = home
        .ckpt(&job.id)
        .expect_err("a checkpoint of this rank must be refused");
    assert!(
        err.contains(expect),
        "refusal does not say {expect:?}:\n{err}"
    );
    // The job goes on and ends normally.
    let status = job.wait(60);
    assert!(status.success(), "{}", job.stderr());
    assert!(job.stdout().contains("done"));
    home.assert_nothing_left();
}

#[test]
fn a_rank_with_threads_is_refused_clearly() {
    refused("thread", "threads");
}

#[test]
fn a_rank_with_a_pipe_is_refused_clearly() {
    refused("pipe", "pipe");
}

#[test]
fn restart_refuses_a_changed_binary_and_a_missing_stamp() {
    let home = Home::new();
    let copy = home.path().join("counter-copy");
    std::fs::copy(app("counter"), &copy).unwrap();
    let mut job = home.start(&[copy.to_str().unwrap(), "200", "20"], "first");
    job.wait_output("step 3 ", 30);
    home.ckpt(&job.id).unwrap();
    job.kill9(&home);

    let missing = home.restart(&job.id, &["--stamp", "42"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("42"), "{}", stderr(&missing));

    let mut bytes = std::fs::read(&copy).unwrap();
    bytes.push(0);
    std::fs::write(&copy, bytes).unwrap();
    let changed = home.restart(&job.id, &[]);
    assert!(!changed.status.success());
    assert!(stderr(&changed).contains("changed"), "{}", stderr(&changed));

    let unknown = std::process::Command::new(mome_ckpt())
        .arg("20000101-000000-dead")
        .env("MOME_HOME", home.path())
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("20000101-000000-dead"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn second_checkpoint_is_incremental() {
    let home = Home::new();
    let counter = app("counter");
    let mut job = home.start(&[counter.to_str().unwrap(), "400", "20"], "first");
    job.wait_output("step 3 ", 30);
    let first = home.ckpt(&job.id).unwrap();
    job.wait_output("step 8 ", 30);
    let second = home.ckpt(&job.id).unwrap();
    job.kill9(&home);
    let (b1, b2) = (
        first["bytes_written"].as_u64().unwrap(),
        second["bytes_written"].as_u64().unwrap(),
    );
    assert!(
        b2 < b1,
        "the second checkpoint wrote {b2} bytes, the first {b1}"
    );
    assert_eq!(second["parent"], first["stamp"], "{second}");
}

/// Kills something (mome-ckpt, the agent, a rank, mome-run) at a random
/// moment of a checkpoint, 20 times; after each, the store's committed
/// stamps all verify and the job restarts from the newest one. The job
/// finally ends with the uninterrupted run's result.
#[test]
fn kills_during_checkpoints_never_corrupt_recovery() {
    let home = Home::new();
    let counter = app("counter");
    let args = ["400", "10"];
    let native = native_out("counter", &args);
    let mut job = home.start(&[counter.to_str().unwrap(), args[0], args[1]], "run0");
    job.wait_output("step 3 ", 30);
    home.ckpt(&job.id).unwrap();
    let id = job.id.clone();
    let root = home.path().join("jobs").join(&id).join("ckpt");
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut restarts = 0;
    for round in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % 40_000);
        let target = round % 4;
        let mut ckpt = std::process::Command::new(mome_ckpt())
            .arg(&id)
            .arg("--json")
            .env("MOME_HOME", home.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let status: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(home.path().join("jobs").join(&id).join("status.json"))
                .unwrap(),
        )
        .unwrap();
        let pid_of = |list: &str| status[list][0]["pid"].as_i64().map(|p| p as i32);
        let victim = match target {
            0 => Some(ckpt.id() as i32),
            1 => pid_of("agents"),
            2 => pid_of("ranks"),
            _ => Some(job.child.id() as i32),
        };
        if let Some(pid) = victim {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = ckpt.wait();
        if target == 0 {
            continue;
        }
        // The job is going down (its agent, a rank or mome-run died).
        job.kill9(&home);
        let committed = mome_store::list_committed(&root).unwrap();
        assert!(!committed.is_empty());
        for s in &committed {
            mome_store::verify(&root, *s, mome_store::VerifyLevel::Full).unwrap_or_else(|e| {
                panic!("round {round}: committed stamp {s} does not verify: {e}")
            });
        }
        restarts += 1;
        job = home.start_restart(&id, &[], &format!("run{}", round + 1));
        job.wait_output("step", 60);
    }
    let status = job.wait(120);
    assert!(
        status.success(),
        "last incarnation failed:\n{}",
        job.stderr()
    );
    let last = job.stdout();
    assert!(
        native.ends_with(&last),
        "last incarnation's output is not the end of the uninterrupted run:\n{last}"
    );
    assert_eq!(checksum_line(&last), checksum_line(&native));
    eprintln!("20 kills during checkpoints, {restarts} restarts: all recovered");
}

/// Open files (offset, append), cwd, rlimits, signal handler and mask, pid
/// and tid, clocks (vdso) all survive a checkpoint, SIGKILL and restart.
#[test]
fn private_state_survives_a_restart() {
    let home = Home::new();
    let dir = home.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    let input: String = (0..200).map(|i| format!("line {i:04}\n")).collect();
    std::fs::write(dir.join("input"), &input).unwrap();
    let probe = probe("state_probe");
    let mut job = home.start(
        &[probe.to_str().unwrap(), dir.to_str().unwrap(), "120"],
        "first",
    );
    job.wait_output("read line 0010", 30);
    home.ckpt(&job.id).unwrap();
    job.kill9(&home);
    let before = job.stdout();
    let out = home.restart(&job.id, &[]);
    assert_ok(&out, "restart");
    let after = stdout(&out);
    assert!(after.contains("state OK"), "{after}\n{}", stderr(&out));
    // The input is read on from where the checkpoint was: the lines after
    // the restart follow one another up to line 0119.
    let first = after.lines().next().unwrap();
    assert!(first.starts_with("read line "), "{first}");
    assert!(before.contains(first) || first > before.lines().last().unwrap_or(""));
    assert!(after.contains("read line 0119"));
    // The log file holds each line at least once, in order, ending at 0119.
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    assert!(log.ends_with("line 0119\n"), "{log}");
}

/// `--ckpt-interval` checkpoints the job periodically, `--keep 2` keeps the
/// newest two stamps, and a restart (after the job ended normally) is
/// refused only when there is nothing to restart from.
#[test]
fn periodic_checkpoints_keep_the_newest() {
    let home = Home::new();
    let counter = app("counter");
    let o = home.run(&[
        "--ckpt-interval",
        "300ms",
        "--keep",
        "2",
        counter.to_str().unwrap(),
        "150",
        "20",
    ]);
    assert_ok(&o, "mome-run with periodic checkpoints");
    let id = home.jobs().pop().unwrap();
    let root = home.path().join("jobs").join(&id).join("ckpt");
    let stamps = mome_store::list_committed(&root).unwrap();
    assert_eq!(stamps.len(), 2, "kept stamps: {stamps:?}\n{}", stderr(&o));
    assert!(stamps[1] >= 3, "too few periodic checkpoints: {stamps:?}");
    for s in stamps {
        mome_store::verify(&root, s, mome_store::VerifyLevel::Full).unwrap();
    }
    let status = home.status(&["--json", &id]);
    assert!(
        stdout(&status).contains("checkpoints"),
        "{}",
        stdout(&status)
    );
}

/// A damaged newest stamp is rejected with the reason, and the restart
/// uses the one before it.
#[test]
fn restart_skips_a_damaged_stamp_and_says_why() {
    let home = Home::new();
    let counter = app("counter");
    let native = native_out("counter", &["200", "20"]);
    let mut job = home.start(&[counter.to_str().unwrap(), "200", "20"], "first");
    job.wait_output("step 3 ", 30);
    home.ckpt(&job.id).unwrap();
    job.wait_output("step 8 ", 30);
    let second = home.ckpt(&job.id).unwrap();
    job.kill9(&home);
    let s2 = second["stamp"].as_u64().unwrap();
    let index = home
        .path()
        .join("jobs")
        .join(&job.id)
        .join("ckpt/node-0")
        .join(format!("{s2:08}.index"));
    let mut bytes = std::fs::read(&index).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&index, bytes).unwrap();
    let out = home.restart(&job.id, &[]);
    assert_ok(&out, "restart from the older stamp");
    let err = stderr(&out);
    assert!(err.contains(&format!("stamp {s2} rejected")), "{err}");
    assert!(err.contains(&format!("from stamp {}", s2 - 1)), "{err}");
    assert!(native.ends_with(&stdout(&out)));
}
