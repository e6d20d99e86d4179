//! mome-run as users run it: exit statuses, environment, output forwarding,
//! stdin, the job directory, and refusals of programs and options.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::*;
use mome_protocol::job::{JobState, ProcessState};

#[test]
fn exit_status_of_the_rank_is_the_job_status() {
    let env = TestEnv::new();
    let out = run(env.mome_run().args(["sh", "-c", "exit 3"]));
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(out.stderr.starts_with("mome: job "), "{}", out.stderr);
    let ok = run(env.mome_run().arg("true"));
    assert_eq!(ok.code(), 0, "{ok:?}");
}

#[test]
fn a_rank_killed_by_a_signal_gives_128_plus_the_signal() {
    let env = TestEnv::new();
    let out = run(env.mome_run().args([
        "-n",
        "2",
        "sh",
        "-c",
        r#"if [ "$MOME_RANK" = 1 ]; then kill -SEGV $$; fi; sleep 20"#,
    ]));
    assert_eq!(out.code(), 139, "{out:?}");
    assert!(
        out.stderr.contains("mome: rank 1 (pid ")
            && out
                .stderr
                .contains(") was killed by SIGSEGV; ending the job"),
        "{}",
        out.stderr
    );
    // Rank 0 was ended by mome-run at once, not after its 20 s sleep.
    assert!(out.elapsed.as_secs() < 5, "{:?}", out.elapsed);
    let status = env.only_job().read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.exit_code, Some(139));
    assert_eq!(status.ranks[1].state, ProcessState::Killed(libc::SIGSEGV));
    assert!(status.reason.unwrap().contains("killed by SIGSEGV"));
}

#[test]
fn ranks_get_their_environment() {
    let env = TestEnv::new();
    let script = r#"echo "$MOME_RANK $MOME_NRANKS $MOME_NODE $MOME_JOBID $MOME_AGENT_SOCKET $MOME_AGENT_TIMEOUT_MS $LD_PRELOAD"; cat /proc/self/personality"#;
    let out = run(env.mome_run().env("LD_PRELOAD", "/already/there.so").args([
        "-n",
        "2",
        "--no-prefix",
        "sh",
        "-c",
        script,
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    let job = env.only_job();
    let text = out.stdout_text();
    for rank in 0..2 {
        let expected = format!(
            "{rank} 2 0 {} {} 30000 {}:/already/there.so",
            job.id,
            job.agent_socket(0).display(),
            env.preload.display()
        );
        assert!(
            text.lines().any(|l| l == expected),
            "no line {expected:?} in\n{text}"
        );
    }
    // ADDR_NO_RANDOMIZE (0x0040000) is set for both ranks.
    assert_eq!(
        text.lines().filter(|l| *l == "00040000").count(),
        2,
        "{text}"
    );
}

#[test]
fn output_is_tagged_with_the_rank() {
    let env = TestEnv::new();
    let out = run(env.mome_run().args([
        "-n",
        "3",
        "sh",
        "-c",
        r#"echo "out $MOME_RANK"; echo "err $MOME_RANK" >&2; printf "tail $MOME_RANK""#,
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    let text = out.stdout_text();
    for rank in 0..3 {
        assert!(text.contains(&format!("[{rank}] out {rank}\n")), "{text}");
        // A last line without newline is tagged too.
        assert!(text.contains(&format!("[{rank}] tail {rank}\n")), "{text}");
        assert!(
            out.stderr.contains(&format!("[{rank}] err {rank}\n")),
            "{}",
            out.stderr
        );
    }
    assert_eq!(text.lines().count(), 6, "{text}");

    let raw = run(env
        .mome_run()
        .args(["-n", "3", "--no-prefix", "sh", "-c", "echo same"]));
    assert_eq!(raw.stdout_text(), "same\nsame\nsame\n");

    // output.prefix: always tags a single rank too.
    let config = env.config("output:\n  prefix: always\n");
    let always = run(env
        .mome_run()
        .arg("--config")
        .arg(&config)
        .args(["echo", "one"]));
    assert_eq!(always.stdout_text(), "[0] one\n");
}

#[test]
fn a_single_rank_passes_bytes_through_unchanged() {
    let env = TestEnv::new();
    // Binary data, no trailing newline, every byte value, bigger than any pipe.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = run_with_input(env.mome_run().arg("cat"), &data);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout == data,
        "output differs from input ({} vs {} bytes)",
        out.stdout.len(),
        data.len()
    );
}

#[test]
fn only_rank_0_reads_stdin() {
    let env = TestEnv::new();
    let out = run_with_input(
        env.mome_run().args([
            "-n",
            "2",
            "sh",
            "-c",
            r#"while read l; do echo "got $l"; done; echo "eof $MOME_RANK""#,
        ]),
        b"alpha\nbeta\n",
    );
    assert_eq!(out.code(), 0, "{out:?}");
    let mut lines: Vec<String> = out.stdout_text().lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(
        lines,
        ["[0] eof 0", "[0] got alpha", "[0] got beta", "[1] eof 1"]
    );
}

#[test]
fn arguments_starting_with_a_dash_reach_the_program() {
    let env = TestEnv::new();
    let out = run(env
        .mome_run()
        .args(["printf", "%s|", "-n", "--no-prefix", "--help"]));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout_text(), "-n|--no-prefix|--help|");
}

#[test]
fn job_directory_files_and_final_status() {
    let env = TestEnv::new();
    let idfile = env.path("jobid");
    let out = run(env.mome_run().arg("--jobid-file").arg(&idfile).args([
        "-n",
        "2",
        "sh",
        "-c",
        "exit 0",
        "extra-arg",
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    let job = env.only_job();
    assert_eq!(
        std::fs::read_to_string(&idfile).unwrap(),
        format!("{}\n", job.id)
    );
    assert!(
        out.stderr.contains(&format!("mome: job {}\n", job.id)),
        "{}",
        out.stderr
    );

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&env.home.join("jobs")), 0o700);
    assert_eq!(mode(&job.path), 0o700);
    assert_eq!(mode(&job.logs()), 0o700);
    assert_eq!(mode(&job.spec_path()), 0o600);
    assert_eq!(mode(&job.status_path()), 0o600);
    assert_eq!(mode(&job.coordinator_log()), 0o600);
    assert_eq!(mode(&job.agent_log(0)), 0o600);

    let spec = job.read_spec().unwrap();
    assert_eq!(spec.id, job.id);
    assert!(
        spec.command.is_absolute() && spec.command.ends_with("sh"),
        "{:?}",
        spec.command
    );
    assert_eq!(spec.argv, ["sh", "-c", "exit 0", "extra-arg"]);
    assert_eq!(spec.ranks, 2);
    assert_eq!(spec.nodes, 1);
    assert_eq!(spec.cwd, env.dir.path());
    assert_eq!(
        spec.env.get("MOME_HOME").map(String::as_str),
        env.home.to_str()
    );
    assert!(spec.env.contains_key("PATH"));

    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Finished);
    assert_eq!(status.exit_code, Some(0));
    assert!(status.ended.is_some() && status.reason.is_none());
    assert!(status
        .ranks
        .iter()
        .all(|r| r.state == ProcessState::Exited(0) && r.pid.is_some()));
    assert_eq!(status.agents.len(), 1);
    assert!(matches!(
        status.agents[0].state,
        ProcessState::Exited(_) | ProcessState::Killed(_)
    ));
    // Sockets are removed at the end.
    assert!(!job.control_socket().exists());
    let log = std::fs::read_to_string(job.coordinator_log()).unwrap();
    assert!(
        log.contains("agent of node 0 is ready") && log.contains("job ended"),
        "{log}"
    );
}

#[test]
fn a_bad_config_key_is_named_with_its_line() {
    let env = TestEnv::new();
    let config = env.config("window:\n  size: 1T\n  sise: 2\n");
    let out = run(env.mome_run().arg("--config").arg(&config).arg("true"));
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.starts_with("mome-run: "), "{}", out.stderr);
    assert!(
        out.stderr.contains("sise") && out.stderr.contains("line 3"),
        "{}",
        out.stderr
    );
    assert!(
        env.job_ids().is_empty(),
        "a refused job leaves no directory"
    );
}

#[test]
fn a_missing_program_is_127() {
    let env = TestEnv::new();
    let out = run(env.mome_run().arg("no-such-program-mome"));
    assert_eq!(out.code(), 127, "{out:?}");
    assert_eq!(
        out.stderr,
        "mome-run: no-such-program-mome: not found (searched PATH)\n"
    );
    let out = run(env.mome_run().arg("./no-such-file"));
    assert_eq!(out.code(), 127, "{out:?}");
    let text = env.path("text");
    std::fs::write(&text, "x").unwrap();
    let out = run(env.mome_run().arg(&text));
    assert_eq!(out.code(), 126, "{out:?}");
    assert!(env.job_ids().is_empty());
}

#[test]
fn a_static_program_is_refused() {
    let env = TestEnv::new();
    let source = env.path("static.c");
    std::fs::write(&source, "int main(void) { return 0; }\n").unwrap();
    let binary = env.path("static-prog");
    let built = Command::new("cc")
        .arg("-static")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .is_ok_and(|o| o.status.success());
    if !built {
        println!("skipped: `cc -static` is not available (no compiler or no static libc)");
        return;
    }
    let out = run(env.mome_run().arg(&binary));
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("is statically linked: LD_PRELOAD cannot inject libmome_preload.so into it; link it dynamically"),
        "{}",
        out.stderr
    );
    assert!(env.job_ids().is_empty());
}

#[test]
fn a_setuid_program_is_refused() {
    let env = TestEnv::new();
    let copy = env.path("true-setuid");
    std::fs::copy("/bin/true", &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let out = run(env.mome_run().arg(&copy));
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr
            .contains("is setuid: the dynamic loader ignores LD_PRELOAD for it"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_script_is_checked_through_its_interpreter() {
    let env = TestEnv::new();
    let script = env.path("script");
    write_script(
        &script,
        "#!/usr/bin/env sh\necho \"script rank $MOME_RANK\"\n",
    );
    let out = run(env.mome_run().arg(&script));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout_text(), "script rank 0\n");
    write_script(&script, "#!/nonexistent/interpreter\n");
    let out = run(env.mome_run().arg(&script));
    assert_eq!(out.code(), 127, "{out:?}");
    assert!(
        out.stderr
            .contains("bad interpreter /nonexistent/interpreter"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_rank_counts_are_refused() {
    let env = TestEnv::new();
    let out = run(env.mome_run().args(["-n", "0", "true"]));
    assert_eq!(out.code(), 2, "{out:?}");
    let out = run(env.mome_run().args(["-n", "1025", "true"]));
    assert_eq!(out.code(), 2, "{out:?}");
}

#[test]
fn a_missing_agent_is_named() {
    let env = TestEnv::new();
    let missing = env.path("no-agent-here");
    let out = run(env.mome_run().env("MOME_AGENT_BIN", &missing).arg("true"));
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("cannot find mome-agent")
            && out.stderr.contains(missing.to_str().unwrap()),
        "{}",
        out.stderr
    );
}

#[test]
fn help_has_examples() {
    let out = run(Command::new(MOME_RUN).arg("--help"));
    assert_eq!(out.code(), 0);
    let text = out.stdout_text();
    for needle in [
        "Examples:",
        "--ranks",
        "--jobid-file",
        "MOME_AGENT_BIN",
        "MOME_PRELOAD_LIB",
        "Exit status:",
    ] {
        assert!(text.contains(needle), "no {needle} in --help:\n{text}");
    }
}
