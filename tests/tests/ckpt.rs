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
