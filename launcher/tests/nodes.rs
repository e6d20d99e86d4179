//! Multi-node jobs (`--nodes K`) seen from mome-run: placement, the job's
//! secret, the agents' startup contract (`ready <ip:port>`, `peers`,
//! `mesh_ready`), node failures, and the refusals (node counts,
//! checkpoints).
//!
//! Most tests use a fake agent (a shell script speaking the contract), so
//! they test the coordinator alone; the tests at the end run the real
//! mome-agent and preload with a test application.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mome_protocol::job::{JobDir, JobState, ProcessState};

/// A fake agent of a multi-node job. It records its arguments, the
/// secret it finds and every command line in `$FAKE_DIR/agent-<node>`,
/// prints `ready 127.0.0.1:<41000+node>`, and answers `peers` with
/// `mesh_ready`. Knobs: `FAKE_SILENT_NODE=k` (node k never says ready),
/// `FAKE_NO_MESH_NODE=k` (node k never says mesh_ready),
/// `FAKE_REPORT=1` (node 0 reports node 1 failed, twice, 1 s after its
/// mesh_ready).
const NODE_AGENT: &str = r#"#!/bin/sh
node=; nodes=; ranks=; jobdir=
while [ $# -gt 0 ]; do
  case "$1" in
    --node) node=$2; shift ;;
    --nodes) nodes=$2; shift ;;
    --ranks) ranks=$2; shift ;;
    --job-dir) jobdir=$2; shift ;;
  esac
  shift
done
log="$FAKE_DIR/agent-$node"
echo "node=$node nodes=$nodes ranks=$ranks" > "$log"
echo "secret=$(cat "$jobdir/secret" 2>&1)" >> "$log"
if [ "$FAKE_SILENT_NODE" = "$node" ]; then
  echo "agent $node: waiting for something that never comes" >&2
  # Not exec: stdout stays open, as for an agent that hangs.
  cat >/dev/null
  exit 0
fi
echo "ready 127.0.0.1:$((41000 + node))"
while read -r line; do
  echo "$line" >> "$log"
  case "$line" in
    *'"cmd":"peers"'*)
      if [ "$FAKE_NO_MESH_NODE" != "$node" ]; then
        echo '{"event":"mesh_ready","elapsed_us":1500}'
      fi
      if [ "$FAKE_REPORT" = 1 ] && [ "$node" = 0 ]; then
        sleep 1
        echo '{"event":"node_failed","node":1,"reason":"no heartbeat for 2s"}'
        echo '{"event":"node_failed","node":1,"reason":"connection reset"}'
      fi
      ;;
  esac
done
"#;

fn node_env() -> TestEnv {
    let env = TestEnv::new();
    write_script(&env.agent, NODE_AGENT);
    env
}

/// `mome-run` with the fake agent's directory in FAKE_DIR.
fn nodes_run(env: &TestEnv) -> Command {
    let mut cmd = env.mome_run();
    cmd.env("FAKE_DIR", env.dir.path());
    cmd
}

/// What the fake agent of `node` recorded.
fn agent_record(env: &TestEnv, node: u32) -> String {
    std::fs::read_to_string(env.path(&format!("agent-{node}"))).unwrap_or_default()
}

/// The value of a `key   value` line of mome-status's header.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .filter(|rest| rest.starts_with("  "))
                .map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
}

/// The ranks' `MOME_RANK MOME_NODE MOME_AGENT_SOCKET` lines, sorted.
const PRINT_NODE: &str = r#"echo "$MOME_RANK $MOME_NODE $MOME_AGENT_SOCKET""#;

#[test]
fn block_placement_in_job_yaml_status_and_environment() {
    let env = node_env();
    let out = run(nodes_run(&env)
        .args(["-n", "5", "--nodes", "2", "--no-prefix", "sh", "-c"])
        .arg(PRINT_NODE));
    assert_eq!(out.code(), 0, "{out:?}");
    let job = env.only_job();
    let spec = job.read_spec().unwrap();
    assert_eq!((spec.ranks, spec.nodes), (5, 2));
    assert_eq!(spec.placement, vec![0, 0, 0, 1, 1]);
    let yaml = std::fs::read_to_string(job.spec_path()).unwrap();
    assert!(
        yaml.contains("\nplacement:\n- 0\n- 0\n- 0\n- 1\n- 1\n"),
        "{yaml}"
    );

    // Each rank has its node and its node's agent socket.
    let mut lines: Vec<String> = out.stdout_text().lines().map(str::to_string).collect();
    lines.sort();
    let expected: Vec<String> = [0, 0, 0, 1, 1]
        .iter()
        .enumerate()
        .map(|(rank, node)| format!("{rank} {node} {}", job.agent_socket(*node).display()))
        .collect();
    assert_eq!(lines, expected);

    // Each agent got its node, the node count and its ranks, then the
    // addresses of all.
    let peers = r#"{"cmd":"peers","addrs":["127.0.0.1:41000","127.0.0.1:41001"]}"#;
    let zero = agent_record(&env, 0);
    assert!(zero.starts_with("node=0 nodes=2 ranks=0,1,2\n"), "{zero}");
    assert!(zero.contains(peers), "{zero}");
    let one = agent_record(&env, 1);
    assert!(one.starts_with("node=1 nodes=2 ranks=3,4\n"), "{one}");
    assert!(one.contains(peers), "{one}");

    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Finished);
    let nodes: Vec<u32> = status.ranks.iter().map(|r| r.node).collect();
    assert_eq!(nodes, vec![0, 0, 0, 1, 1]);
    assert_eq!(status.agents.len(), 2);
    assert_eq!(status.agents[0].ranks, vec![0, 1, 2]);
    assert_eq!(status.agents[1].ranks, vec![3, 4]);
    assert_eq!(status.agents[1].addr.as_deref(), Some("127.0.0.1:41001"));
    assert!(status.agents.iter().all(|a| a.failed.is_none()));

    let text = run(env.mome_status().arg(&job.id)).stdout_text();
    assert_eq!(field(&text, "nodes"), "2 (block placement)", "{text}");
    let agent_row = |node: u32| {
        text.lines()
            .skip_while(|l| !l.starts_with("NODE  PID"))
            .find(|l| l.starts_with(&format!("{node} ")))
            .unwrap_or_else(|| panic!("no row for node {node} in\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let header = text
        .lines()
        .find(|l| l.starts_with("NODE  PID"))
        .unwrap_or_else(|| panic!("no agents table in\n{text}"));
    // Diskless checkpoints: the nodes holding each node's copies, and the
    // checkpoint memory of its keeper ("-" once the job ended).
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NODE", "PID", "STATE", "LISTEN", "RANKS", "COPIES", "ON", "CKPT", "MEMORY"]
    );
    let zero = agent_row(0);
    assert_eq!(zero[0], "0");
    assert_eq!(&zero[3..], ["127.0.0.1:41000", "0-2", "1", "-"]);
    assert_eq!(&agent_row(1)[3..], ["127.0.0.1:41001", "3,4", "0", "-"]);
    assert_eq!(zero[1], status.agents[0].pid.unwrap().to_string(), "{text}");

    let json: serde_json::Value =
        serde_json::from_slice(&run(env.mome_status().args(["--json", &job.id])).stdout).unwrap();
    assert_eq!(json["nodes"], 2);
    assert_eq!(json["placement_mode"], "block");
    assert_eq!(json["placement"], serde_json::json!([0, 0, 0, 1, 1]));
    assert_eq!(json["agents"][1]["addr"], "127.0.0.1:41001");
    assert_eq!(json["agents"][1]["ranks"], serde_json::json!([3, 4]));
    assert_eq!(json["agents"][0]["pid"], status.agents[0].pid.unwrap());
}

#[test]
fn cyclic_placement_from_the_command_line_or_the_config() {
    let env = node_env();
    let out =
        run(nodes_run(&env).args(["-n", "5", "--nodes", "2", "--placement", "cyclic", "true"]));
    assert_eq!(out.code(), 0, "{out:?}");
    let job = env.only_job();
    assert_eq!(job.read_spec().unwrap().placement, vec![0, 1, 0, 1, 0]);
    assert!(agent_record(&env, 0).starts_with("node=0 nodes=2 ranks=0,2,4\n"));
    assert!(agent_record(&env, 1).starts_with("node=1 nodes=2 ranks=1,3\n"));
    let text = run(env.mome_status().arg(&job.id)).stdout_text();
    assert_eq!(field(&text, "nodes"), "2 (cyclic placement)", "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("0 ") && l.contains(" 0,2,4 ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("1 ") && l.contains(" 1,3 ")),
        "{text}"
    );

    // nodes.placement in the config, and --placement over it.
    let config = env.config("nodes:\n  placement: cyclic\n");
    let ids_before = env.job_ids();
    let out = run(nodes_run(&env)
        .arg("--config")
        .arg(&config)
        .args(["-n", "4", "--nodes", "4", "true"]));
    assert_eq!(out.code(), 0, "{out:?}");
    let out = run(nodes_run(&env).arg("--config").arg(&config).args([
        "-n",
        "4",
        "--nodes",
        "2",
        "--placement",
        "block",
        "true",
    ]));
    assert_eq!(out.code(), 0, "{out:?}");
    let new: Vec<String> = env
        .job_ids()
        .into_iter()
        .filter(|id| !ids_before.contains(id))
        .collect();
    let placements: Vec<Vec<u32>> = new
        .iter()
        .map(|id| JobDir::new(&env.home, id).read_spec().unwrap().placement)
        .collect();
    assert!(placements.contains(&vec![0, 1, 2, 3]), "{placements:?}");
    assert!(placements.contains(&vec![0, 0, 1, 1]), "{placements:?}");
}

#[test]
fn bad_node_counts_are_refused_at_start() {
    let env = node_env();
    let out = run(nodes_run(&env).args(["-n", "2", "--nodes", "3", "true"]));
    assert_eq!(out.code(), 2, "{out:?}");
    assert_eq!(
        out.stderr,
        "mome-run: --nodes 3 is more than the 2 rank(s) of -n 2: every node needs at least one rank\n"
    );
    // The default is one rank.
    let out = run(nodes_run(&env).args(["--nodes", "2", "true"]));
    assert_eq!(out.code(), 2, "{out:?}");
    for bad in ["0", "65", "many"] {
        let out = run(nodes_run(&env).args(["-n", "100", "--nodes", bad, "true"]));
        assert_eq!(out.code(), 2, "--nodes {bad}: {out:?}");
        assert!(out.stderr.contains("--nodes"), "{}", out.stderr);
    }
    let out =
        run(nodes_run(&env).args(["-n", "2", "--nodes", "2", "--placement", "random", "true"]));
    assert_eq!(out.code(), 2, "{out:?}");

    assert!(
        env.job_ids().is_empty(),
        "a refused job leaves no directory"
    );
    // K = N is fine, and so is an interval of 0.
    let out =
        run(nodes_run(&env).args(["-n", "3", "--nodes", "3", "--ckpt-interval", "0", "true"]));
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn the_secret_is_written_before_the_agents_start() {
    let env = node_env();
    let out = run(nodes_run(&env).args(["-n", "2", "--nodes", "2", "true"]));
    assert_eq!(out.code(), 0, "{out:?}");
    let job = env.only_job();
    let meta = std::fs::metadata(job.secret_path()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let secret = std::fs::read_to_string(job.secret_path()).unwrap();
    assert_eq!(secret.len(), 65, "{secret:?}");
    assert!(secret.ends_with('\n'));
    assert!(
        secret[..64]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{secret:?}"
    );
    // Both agents found it when they started.
    for node in 0..2 {
        let record = agent_record(&env, node);
        assert!(
            record.contains(&format!("secret={}", secret.trim_end())),
            "{record}"
        );
    }
    // Another job, another secret; one node, no secret.
    let out = run(nodes_run(&env).args(["-n", "2", "--nodes", "2", "true"]));
    assert_eq!(out.code(), 0, "{out:?}");
    let ids = env.job_ids();
    let other = JobDir::new(&env.home, ids.iter().find(|id| **id != job.id).unwrap());
    assert_ne!(
        std::fs::read_to_string(other.secret_path()).unwrap(),
        secret
    );
    let single = TestEnv::new();
    assert_eq!(run(single.mome_run().args(["-n", "2", "true"])).code(), 0);
    assert!(!single.only_job().secret_path().exists());
}

/// Starts `-n 2 --nodes 2 sleep 30` and waits until its ranks run.
fn running_two_node_job(
    env: &TestEnv,
    extra_env: &[(&str, &str)],
) -> (std::process::Child, JobDir) {
    let config = env.config("job:\n  kill_grace: 500ms\n");
    let child = nodes_run(env)
        .envs(extra_env.iter().copied())
        .arg("--config")
        .arg(&config)
        .args(["-n", "2", "--nodes", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, _) = wait_until_running(env);
    (child, job)
}

/// Every pid of the job that status.json knows (ranks and agents).
fn job_pids(job: &JobDir) -> Vec<i32> {
    let status = job.read_status().unwrap();
    status
        .ranks
        .iter()
        .filter_map(|r| r.pid)
        .chain(status.agents.iter().filter_map(|a| a.pid))
        .collect()
}

/// SIGKILLs agent `pid` of the running job `child`, then waits for
/// mome-run: it must exit 1 within `within`.
fn kill_agent_and_wait(child: std::process::Child, pid: i32, within: Duration) -> Finished {
    let start = Instant::now();
    send_signal(pid as u32, libc::SIGKILL);
    let finished = wait_output(child, start);
    assert_eq!(finished.code(), 1, "{finished:?}");
    assert!(finished.elapsed < within, "{:?}", finished.elapsed);
    finished
}

#[test]
fn killing_one_agent_fails_its_node_and_ends_the_job() {
    let env = node_env();
    let (child, job) = running_two_node_job(&env, &[]);
    let pids = job_pids(&job);
    let status = job.read_status().unwrap();
    let agent = status.agents[1].pid.unwrap();
    let finished = kill_agent_and_wait(child, agent, Duration::from_secs(4));
    let failed: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("failed"))
        .collect();
    assert_eq!(
        failed,
        [format!(
            "mome: node 1 failed: its agent (pid {agent}) was killed by SIGKILL; see {}; ending the job",
            job.agent_log(1).display()
        )],
        "{}",
        finished.stderr
    );
    assert_all_gone(&pids, Some(status.ranks[0].pid.unwrap()));
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.exit_code, Some(1));
    assert!(
        status.reason.as_deref().unwrap().starts_with(&format!(
            "node 1 failed: its agent (pid {agent}) was killed by SIGKILL"
        )),
        "{:?}",
        status.reason
    );
    assert_eq!(status.agents[1].state, ProcessState::Killed(libc::SIGKILL));
    assert!(status.agents[1].failed.is_some());
    // The other agent was stopped by closing its stdin.
    assert_eq!(status.agents[0].state, ProcessState::Exited(0));
    assert!(status
        .ranks
        .iter()
        .all(|r| r.state == ProcessState::Killed(libc::SIGTERM)));
    let text = run(env.mome_status().arg(&job.id)).stdout_text();
    assert!(text.contains("killed(SIGKILL) (failed)"), "{text}");
    assert!(text.contains("node 1 failed: its agent"), "{text}");
}

#[test]
fn a_node_failure_reported_by_an_agent_ends_the_job_once() {
    let env = node_env();
    let (child, job) = running_two_node_job(&env, &[("FAKE_REPORT", "1")]);
    let pids = job_pids(&job);
    let finished = wait_output(child, Instant::now());
    assert_eq!(finished.code(), 1, "{finished:?}");
    let failed: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("failed"))
        .collect();
    assert_eq!(
        failed,
        ["mome: node 1 failed: no heartbeat for 2s (reported by the agent of node 0); ending the job"],
        "{}",
        finished.stderr
    );
    assert_all_gone(&pids, Some(pids[0]));
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("node 1 failed: no heartbeat for 2s (reported by the agent of node 0)")
    );
    // The duplicate is in the log.
    let log = std::fs::read_to_string(job.coordinator_log()).unwrap();
    assert!(
        log.contains("node 1 failed: connection reset (reported by the agent of node 0) (the job is already ending)"),
        "{log}"
    );
}

#[test]
fn agents_that_do_not_get_there_are_named_with_what_was_awaited() {
    let env = node_env();
    let config = env.config("job:\n  agent_ready_timeout: 300ms\n");
    let out = run(nodes_run(&env)
        .env("FAKE_SILENT_NODE", "1")
        .arg("--config")
        .arg(&config)
        .args(["-n", "3", "--nodes", "3", "true"]));
    assert_eq!(out.code(), 1, "{out:?}");
    let job = env.only_job();
    assert!(
        out.stderr.contains(&format!(
            "mome-run: the agent of node 1 did not become ready within 300ms (no `ready <ip:port>` line); see {}\n",
            job.agent_log(1).display()
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("agent 1: waiting for something that never comes"),
        "{}",
        out.stderr
    );
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert!(status.ranks.iter().all(|r| r.pid.is_none()));
    assert_all_gone(&job_pids(&job), None);
    // Nobody got `peers`.
    assert!(!agent_record(&env, 0).contains("peers"));

    let env = node_env();
    let out = run(nodes_run(&env)
        .env("FAKE_NO_MESH_NODE", "0")
        .arg("--config")
        .arg(&config)
        .args(["-n", "2", "--nodes", "2", "true"]));
    assert_eq!(out.code(), 1, "{out:?}");
    let job = env.only_job();
    assert!(
        out.stderr.contains(&format!(
            "mome-run: the agent of node 0 did not report `mesh_ready` within 300ms of `peers` (not connected to every peer); see {}\n",
            job.agent_log(0).display()
        )),
        "{}",
        out.stderr
    );
    let status = job.read_status().unwrap();
    assert!(status.ranks.iter().all(|r| r.pid.is_none()));
    assert_eq!(
        status.reason.as_deref(),
        Some("the agent of node 0 did not report `mesh_ready` within 300ms of `peers` (not connected to every peer)")
    );
    assert_all_gone(&job_pids(&job), None);
}

#[test]
fn an_agent_without_multi_node_support_is_refused_clearly() {
    // The one-node fake agent says `ready` without an address.
    let env = TestEnv::new();
    let out = run(env.mome_run().args(["-n", "2", "--nodes", "2", "true"]));
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr.contains("did not become ready (it printed `ready` without the address it listens on for its peers"),
        "{}",
        out.stderr
    );
    // An agent that refuses --nodes (exits at once with its reason).
    let refusing = env.path("refusing-agent");
    write_script(
        &refusing,
        "#!/bin/sh\necho 'mome-agent: --nodes 2: multi-node agents are not implemented yet' >&2\nexit 2\n",
    );
    let out = run(env
        .mome_run()
        .env("MOME_AGENT_BIN", &refusing)
        .args(["-n", "2", "--nodes", "2", "true"]));
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains("did not become ready (it exited with status 2)")
            && out
                .stderr
                .contains("multi-node agents are not implemented yet"),
        "{}",
        out.stderr
    );
}

#[test]
fn help_documents_nodes_and_placement() {
    let out = run(Command::new(MOME_RUN).arg("--help"));
    assert_eq!(out.code(), 0);
    let text = out.stdout_text();
    for needle in [
        "--nodes <K>",
        "--placement <HOW>",
        "block",
        "cyclic",
        "rank r on node r mod K",
        "1 to 64",
        "MOME_NODE",
        "secret",
        "mome: node K failed: reason; ending the job",
        "Checkpoints of multi-node",
        "nodes.placement",
        "job.agent_ready_timeout",
    ] {
        assert!(text.contains(needle), "no {needle:?} in --help:\n{text}");
    }
}

// ---- with the real agent and preload ----

/// The release build's mome-agent and preload, and a test application,
/// when they are built (`make build`); None (the test is skipped, saying
/// so) otherwise.
fn real_install(app: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let bin = Path::new(MOME_RUN).parent().unwrap().to_path_buf();
    let agent = bin.join("mome-agent");
    let preload = bin.join("libmome_preload.so");
    let app = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../test-apps/build")
        .join(app);
    for p in [&agent, &preload, &app] {
        if !p.exists() {
            println!("skipped: {} is not built (make build)", p.display());
            return None;
        }
    }
    Some((agent, preload, app))
}

/// `mome-run` with the real agent and preload.
fn real_run(env: &TestEnv, agent: &Path, preload: &Path) -> Command {
    let mut cmd = env.mome_run();
    cmd.env("MOME_AGENT_BIN", agent)
        .env("MOME_PRELOAD_LIB", preload);
    cmd
}

fn checksum(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.contains("checksum"))
        .unwrap_or_else(|| panic!("no checksum line in\n{stdout}"))
        .trim_start_matches(|c: char| c != ']')
        .trim_start_matches("] ")
        .to_string()
}

#[test]
fn jacobi_on_two_and_four_nodes_matches_one_node() {
    let Some((agent, preload, jacobi)) = real_install("jacobi") else {
        return;
    };
    let env = TestEnv::new();
    let mut sums = Vec::new();
    for nodes in ["1", "2", "4"] {
        let out = run(real_run(&env, &agent, &preload)
            .args(["-n", "4", "--nodes", nodes])
            .arg(&jacobi)
            .args(["64", "20"]));
        assert_eq!(out.code(), 0, "--nodes {nodes}: {out:?}");
        let text = out.stdout_text();
        assert!(text.lines().any(|l| l.ends_with("OK")), "{text}");
        sums.push(checksum(&text));
    }
    assert_eq!(sums[1], sums[0], "2 nodes vs 1");
    assert_eq!(sums[2], sums[0], "4 nodes vs 1");
    for id in env.job_ids() {
        let job = JobDir::new(&env.home, &id);
        let status = job.read_status().unwrap();
        assert_eq!(status.state, JobState::Finished);
        assert_all_gone(&job_pids(&job), None);
    }
}

#[test]
fn killing_a_real_agent_fails_its_node() {
    let Some((agent, preload, _)) = real_install("jacobi") else {
        return;
    };
    let env = TestEnv::new();
    let config = env.config("job:\n  kill_grace: 500ms\n");
    let child = real_run(&env, &agent, &preload)
        .arg("--config")
        .arg(&config)
        .args(["-n", "2", "--nodes", "2", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (job, status) = wait_until_running(&env);
    let pids = job_pids(&job);
    let victim = status.agents[1].pid.unwrap();
    let finished = kill_agent_and_wait(child, victim, Duration::from_secs(5));
    let failed: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.starts_with("mome: node "))
        .collect();
    assert_eq!(failed.len(), 1, "{}", finished.stderr);
    assert!(
        failed[0].starts_with("mome: node 1 failed: ") && failed[0].ends_with("; ending the job"),
        "{}",
        finished.stderr
    );
    assert_all_gone(&pids, Some(status.ranks[0].pid.unwrap()));
    let status = job.read_status().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert!(status.reason.unwrap().starts_with("node 1 failed: "));
}
