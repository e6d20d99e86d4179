//! Node failures of multi-node jobs with diskless checkpoints, end to end,
//! with real processes and real SIGKILLs.
//!
//! A "node kill" is `kill -9` of that node's agent and of its keeper (the
//! process holding the node's checkpoint memory); the node's ranks die
//! with their agent. With the default redundancy (mirror, 2 copies: node
//! n's increments are also held by nodes n+1 and n+2) any one or two lost
//! nodes of four are recoverable once a stamp is committed: mome-run says
//! which node failed, becomes mome-restart, which says from whose memory
//! each node restores, and the job ends with its normal output. Without a
//! committed stamp a node failure ends the job (exit 1, `ending the job`).
//!
//! `fault_injection_random_nodes` kills random nodes at random moments (a
//! seeded xorshift: `MOME_FAULT_SEED`, `MOME_FAULT_RUNS`; `MOME_FAULT_KEEP`
//! keeps the home of a failed run, `MOME_FAULT_MOMENT` picks one moment) and prints a table
//! of scenarios and outcomes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mome_tests::*;

/// Bound on every wait for a job's end after a kill.
const END_LIMIT: Duration = Duration::from_secs(60);

// ---- a tiny seeded random generator (xorshift64*) ----

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// `k` distinct nodes of `0..n`, in increasing order.
    fn nodes(&mut self, n: u32, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n).collect();
        for i in 0..k {
            let j = i + (self.next() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        let mut picked = all[..k].to_vec();
        picked.sort_unstable();
        picked
    }
}

// ---- the job's files and processes ----

fn job_dir(home: &Home, id: &str) -> PathBuf {
    home.path().join("jobs").join(id)
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn job_status(home: &Home, id: &str) -> Option<serde_json::Value> {
    read_json(&job_dir(home, id).join("status.json"))
}

/// The incarnation status.json describes (0 for the first run).
fn incarnation(home: &Home, id: &str) -> Option<u64> {
    job_status(home, id)?["incarnation"].as_u64().or(Some(0))
}

/// The pid of node `node`'s agent, from status.json.
fn agent_pid(home: &Home, id: &str, node: u32) -> Option<i32> {
    job_status(home, id)?["agents"][node as usize]["pid"]
        .as_i64()
        .map(|p| p as i32)
}

/// The pid of node `node`'s keeper, from keepers/node-N.json.
fn keeper_pid(home: &Home, id: &str, node: u32) -> Option<i32> {
    let path = job_dir(home, id)
        .join("keepers")
        .join(format!("node-{node}.json"));
    read_json(&path)?["pid"].as_i64().map(|p| p as i32)
}

/// The pids of every keepers/node-*.json of the job.
fn keeper_files(home: &Home, id: &str) -> Vec<(String, Option<i32>)> {
    let dir = job_dir(home, id).join("keepers");
    let mut files: Vec<(String, Option<i32>)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .map(|n| {
                    let pid = read_json(&dir.join(&n))
                        .and_then(|v| v["pid"].as_i64())
                        .map(|p| p as i32);
                    (n, pid)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn sigkill(pid: i32) {
    if pid > 1 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills nodes `nodes` at (nearly) the same time: every pid is read first,
/// then all are sent SIGKILL. Returns what was killed, for the report.
fn kill_nodes(home: &Home, id: &str, nodes: &[u32]) -> String {
    let mut pids = vec![];
    let mut said = vec![];
    for &n in nodes {
        let (a, k) = (agent_pid(home, id, n), keeper_pid(home, id, n));
        said.push(format!("node {n} (agent {a:?}, keeper {k:?})"));
        pids.extend(a);
        pids.extend(k);
    }
    for p in pids {
        sigkill(p);
    }
    said.join(", ")
}

/// Live processes of job `id`: its agents and keepers (the job directory
/// on their command line) and its ranks (`MOME_JOBID` in their
/// environment), with their command lines.
fn job_processes(home: &Home, id: &str) -> Vec<(i32, String)> {
    let dir = job_dir(home, id);
    let dir = dir.to_string_lossy().into_owned();
    let env_key = format!("MOME_JOBID={id}");
    let me = std::process::id() as i32;
    let mut found = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let in_env = environ.split(|&b| b == 0).any(|v| v == env_key.as_bytes());
        if (cmdline.contains(&dir) || in_env) && alive(pid) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

fn is_keeper(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .next()
        .is_some_and(|exe| exe.ends_with("mome-keeper"))
}

/// Waits up to `secs` for every process of the job but the keepers (or
/// every one, keepers included, when `keepers_too`) to be gone; returns
/// those still there.
fn wait_gone(home: &Home, id: &str, keepers_too: bool, secs: u64) -> Vec<(i32, String)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left: Vec<(i32, String)> = job_processes(home, id)
            .into_iter()
            .filter(|(_, c)| keepers_too || !is_keeper(c))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every process of the job (keepers in their grace period
/// included) and waits until they are gone.
fn kill_job_processes(home: &Home, id: &str) -> Vec<(i32, String)> {
    let left = job_processes(home, id);
    for (pid, _) in &left {
        sigkill(*pid);
    }
    for (_, pid) in keeper_files(home, id) {
        sigkill(pid.unwrap_or(0));
    }
    let still = wait_gone(home, id, true, 5);
    assert!(
        still.is_empty(),
        "processes of job {id} survive SIGKILL: {still:?}"
    );
    left
}

/// Waits up to `limit` for `child` to exit.
fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last lines of every log of the job, for a failure report.
fn logs_tail(home: &Home, id: &str, lines: usize) -> String {
    let dir = job_dir(home, id).join("logs");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    let mut out = String::new();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        out += &format!(
            "--- {} (last {} of {} lines)\n",
            p.display(),
            all.len() - from,
            all.len()
        );
        for l in &all[from..] {
            out += l;
            out.push('\n');
        }
    }
    out
}

/// Waits (bounded) for the job's end; on a timeout kills everything of it
/// and panics with its output and logs.
fn end_of(home: &Home, job: &mut BackgroundJob, limit: Duration) -> ExitStatus {
    match wait_child(&mut job.child, limit) {
        Some(s) => s,
        None => {
            // SAFETY: kill has no memory-safety preconditions; negative
            // pid: mome-run's process group.
            unsafe { libc::kill(-(job.child.id() as i32), libc::SIGKILL) };
            let _ = job.child.wait();
            let killed = kill_job_processes(home, &job.id);
            panic!(
                "job {} did not end within {limit:?} (killed: {killed:?})\nstdout:\n{}\nstderr:\n{}\nlogs:\n{}",
                job.id,
                job.stdout(),
                job.stderr(),
                logs_tail(home, &job.id, 30)
            );
        }
    }
}

/// Waits until every rank of the job runs (status.json), then `settle`.
fn wait_running(home: &Home, job: &mut BackgroundJob, settle: Duration) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = job.child.try_wait().unwrap() {
            return Err(format!(
                "the job ended ({s}) before all its ranks ran\nstderr:\n{}",
                job.stderr()
            ));
        }
        let running = job_status(home, &job.id).is_some_and(|v| {
            v["ranks"].as_array().is_some_and(|ranks| {
                !ranks.is_empty()
                    && ranks
                        .iter()
                        .all(|r| r["state"] == "running" && r["pid"].as_i64().is_some())
            })
        });
        if running {
            std::thread::sleep(settle);
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the ranks were not all running within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `mome-ckpt ID --json` in the background, its output in files.
struct CkptProc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

fn spawn_ckpt(home: &Home, id: &str, tag: &str) -> CkptProc {
    let out = home.path().join(format!("{tag}.ckpt.out"));
    let err = home.path().join(format!("{tag}.ckpt.err"));
    let child = Command::new(mome_ckpt())
        .arg(id)
        .arg("--json")
        .env("MOME_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    CkptProc { child, out, err }
}

impl CkptProc {
    /// Its end within `limit`: Ok(stamp) when it committed one, Err(what
    /// it said) when it failed; a hang is killed and reported as such.
    fn finish(mut self, limit: Duration) -> Result<u64, String> {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        match wait_child(&mut self.child, limit) {
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "HUNG: mome-ckpt did not end within {limit:?}\n{}{}",
                    read(&self.out),
                    read(&self.err)
                ))
            }
            Some(s) if s.success() => {
                serde_json::from_str::<serde_json::Value>(read(&self.out).trim())
                    .ok()
                    .and_then(|v| v["stamp"].as_u64())
                    .ok_or_else(|| {
                        format!("mome-ckpt succeeded without a stamp: {}", read(&self.out))
                    })
            }
            Some(s) => Err(format!("{s}: {}{}", read(&self.out), read(&self.err))),
        }
    }
}

/// A checkpoint taken while nothing fails, bounded.
fn checkpoint(home: &Home, id: &str, tag: &str) -> Result<u64, String> {
    spawn_ckpt(home, id, tag).finish(Duration::from_secs(30))
}

/// Writes a job configuration file into the home; returns its path.
fn config_file(home: &Home, text: &str) -> String {
    let p = home.path().join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// Waits until `file` contains `text` (or the child ends, or `limit`).
fn wait_text(file: &Path, text: &str, child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if std::fs::read_to_string(file).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            return std::fs::read_to_string(file).is_ok_and(|s| s.contains(text));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn native_checksum(name: &str, args: &[&str]) -> String {
    let o = native(&app(name), args, None);
    assert_ok(&o, name);
    checksum_line(&stdout(&o))
}

/// Starts `jacobi ARGS` with 4 ranks on `nodes` nodes (`config`: extra
/// mome-run options before `-n`).
fn start_jacobi(
    home: &Home,
    config: &[&str],
    nodes: u32,
    args: &[&str],
    tag: &str,
) -> BackgroundJob {
    let jacobi = app("jacobi");
    let k = nodes.to_string();
    let mut all: Vec<&str> = config.to_vec();
    all.extend(["-n", "4", "--nodes", &k, jacobi.to_str().unwrap()]);
    all.extend_from_slice(args);
    home.start(&all, tag)
}

fn assert_clean_end(home: &Home, job: &BackgroundJob) {
    home.assert_nothing_left();
    let left = wait_gone(home, &job.id, true, 5);
    assert!(
        left.is_empty(),
        "processes of job {} are left after its end: {left:?}",
        job.id
    );
    let files = keeper_files(home, &job.id);
    assert!(
        files.is_empty(),
        "keeper files are left after a clean end: {files:?}"
    );
}

/// Starts jacobi `args` (4 ranks on `nodes` nodes, `config` options),
/// waits until it runs and checkpoints it; the job must still run then.
fn checkpointed_jacobi(
    home: &Home,
    config: &[&str],
    nodes: u32,
    args: &[&str],
) -> (BackgroundJob, u64) {
    let mut job = start_jacobi(home, config, nodes, args, "first");
    wait_running(home, &mut job, Duration::from_millis(400)).unwrap();
    let stamp = checkpoint(home, &job.id, "c1")
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}\njob stderr:\n{}", job.stderr()));
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "the job ended before it could be killed: make it run longer"
    );
    (job, stamp)
}

// ---- 1. one node killed after a checkpoint ----

#[test]
fn a_killed_node_comes_back_from_memory() {
    let home = Home::new();
    let args = ["512", "4000"];
    let native = native_checksum("jacobi", &args);
    let (mut job, stamp) = checkpointed_jacobi(&home, &[], 4, &args);
    let t = Instant::now();
    let killed = kill_nodes(&home, &job.id, &[1]);
    let status = end_of(&home, &mut job, END_LIMIT);
    let err = job.stderr();
    eprintln!(
        "killed {killed}; the job ended {:.1} s later ({status})\n{err}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "the job did not survive the loss of node 1 ({status})\nstdout:\n{}\nstderr:\n{err}\nlogs:\n{}",
        job.stdout(),
        logs_tail(&home, &job.id, 30)
    );
    assert_eq!(checksum_line(&job.stdout()), native, "stderr:\n{err}");
    for said in [
        "mome: node 1 failed: ".to_string(),
        format!(
            "restarting the job from its newest recoverable checkpoint (stamp {stamp} or older)"
        ),
        format!("mome: restarting job {} from stamp {stamp}", job.id),
        "mome: node 1 restores from the memory of node 2".to_string(),
    ] {
        assert!(err.contains(&said), "stderr lacks {said:?}:\n{err}");
    }
    for n in [0, 2, 3] {
        assert!(
            err.contains(&format!("mome: node {n} restores from the memory of node")),
            "stderr does not say where node {n} restores from:\n{err}"
        );
    }
    assert_clean_end(&home, &job);
}

// ---- 2. random faults ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// While the ranks compute, after a committed stamp.
    Compute,
    /// While a checkpoint's nodes park and capture (the pause).
    Pause,
    /// While a checkpoint's increments are duplicated and committed.
    Commit,
    /// While the restart after a first node failure is under way.
    Recovery,
}

#[derive(Debug, Clone)]
struct Scenario {
    moment: Moment,
    /// Nodes killed first (at the same time).
    victims: Vec<u32>,
    /// Recovery: the node killed once the restart is under way.
    second: Option<u32>,
    /// A stamp is committed before the kill.
    prior: bool,
    /// Delay before the kill from the moment's trigger, in microseconds.
    delay_us: u64,
    /// Redundancy scheme of the job, each tolerating the nodes the
    /// scenario loses: mirror (2 copies) and Reed-Solomon 2+2 any 2 of
    /// the 4 nodes, xor (one group of 4) one.
    scheme: &'static str,
}

/// The configuration of a scheme of [`Scenario::scheme`].
fn scheme_config(scheme: &str) -> &'static str {
    match scheme {
        "xor" => "redundancy:\n  scheme: xor\n",
        "rs 2+2" => "redundancy:\n  scheme: rs\n  data: 2\n  parity: 2\n",
        _ => "redundancy:\n  scheme: mirror\n",
    }
}

impl Scenario {
    fn pick(rng: &mut Rng) -> Scenario {
        let moment = match rng.range(0, 3) {
            0 => Moment::Compute,
            1 => Moment::Pause,
            2 => Moment::Commit,
            _ => Moment::Recovery,
        };
        let (victims, second) = if moment == Moment::Recovery {
            let two = rng.nodes(4, 2);
            let first_is_0 = rng.coin();
            let (a, b) = if first_is_0 {
                (two[0], two[1])
            } else {
                (two[1], two[0])
            };
            (vec![a], Some(b))
        } else {
            let k = rng.range(1, 2) as usize;
            (rng.nodes(4, k), None)
        };
        let prior = match moment {
            Moment::Compute | Moment::Recovery => true,
            Moment::Pause | Moment::Commit => rng.coin(),
        };
        let delay_us = match moment {
            Moment::Compute => rng.range(0, 700_000),
            // From "checkpoint S started": pre-copy, parking, capture.
            Moment::Pause => rng.range(0, 8_000),
            // From "every node captured: resume": copies to the holders,
            // durable, manifest.
            Moment::Commit => rng.range(0, 40_000),
            // From "mome: restarting job": keepers adopted, agents
            // started (the first ~30 ms), then mesh, ranks restored,
            // pages fetched.
            Moment::Recovery if rng.coin() => rng.range(0, 30_000),
            Moment::Recovery => rng.range(30_000, 400_000),
        };
        let lost = victims.len() + usize::from(second.is_some());
        let scheme = match rng.range(0, if lost == 1 { 2 } else { 1 }) {
            0 => "mirror",
            1 => "rs 2+2",
            _ => "xor",
        };
        Scenario {
            moment,
            victims,
            second,
            prior,
            delay_us,
            scheme,
        }
    }

    /// The row of the summary table.
    fn label(&self) -> String {
        let what = match self.moment {
            Moment::Compute => "computing",
            Moment::Pause => "ckpt pause",
            Moment::Commit => "ckpt dup/commit",
            Moment::Recovery => "recovery",
        };
        let base = match self.moment {
            Moment::Pause | Moment::Commit if !self.prior => ", first ckpt",
            Moment::Pause | Moment::Commit => ", after a stamp",
            _ => "",
        };
        let n = match self.moment {
            Moment::Recovery => "1+1 nodes".to_string(),
            _ => format!(
                "{} node{}",
                self.victims.len(),
                if self.victims.len() == 1 { "" } else { "s" }
            ),
        };
        format!("{}: {n}, {what}{base}", self.scheme)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Recovered,
    CleanStop,
    /// The job ended before the kill could happen (the scenario did not
    /// take place; not a failure of mome, but the sizes need tuning).
    NotKilled,
    Failure,
}

struct RunReport {
    label: String,
    outcome: Outcome,
    detail: String,
    secs: f64,
}

const FAULT_ARGS: [&str; 2] = ["512", "2000"];

/// Committed stamps of the job (its manifests).
fn committed_stamps(home: &Home, id: &str) -> Vec<String> {
    let dir = job_dir(home, id).join("ckpt").join("stamps");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".manifest"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether the coordinator log says a checkpoint was committed.
fn log_committed(home: &Home, id: &str) -> bool {
    std::fs::read_to_string(job_dir(home, id).join("logs").join("coordinator.log")).is_ok_and(|l| {
        l.lines()
            .any(|l| l.contains("checkpoint ") && l.contains(" committed: "))
    })
}

fn fault_run(home: &Home, run: usize, s: &Scenario, native: &str) -> (Outcome, String) {
    let tag = format!("run{run}");
    let cfg = config_file(home, scheme_config(s.scheme));
    let mut job = start_jacobi(home, &["--config", &cfg], 4, &FAULT_ARGS, &tag);
    let id = job.id.clone();
    let coord_log = job_dir(home, &id).join("logs").join("coordinator.log");
    let mut notes: Vec<String> = vec![format!("job {id}")];
    let fail = |home: &Home, job: &mut BackgroundJob, why: String, notes: &[String]| {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-(job.child.id() as i32), libc::SIGKILL) };
        let _ = job.child.wait();
        let killed = kill_job_processes(home, &job.id);
        (
            Outcome::Failure,
            format!(
                "{why}\n{}\nkilled at the end: {killed:?}\nstdout:\n{}\nstderr:\n{}\nlogs:\n{}",
                notes.join("\n"),
                job.stdout(),
                job.stderr(),
                logs_tail(home, &job.id, 25)
            ),
        )
    };
    if let Err(e) = wait_running(home, &mut job, Duration::from_millis(300)) {
        return fail(home, &mut job, e, &notes);
    }
    if s.prior {
        match checkpoint(home, &id, &format!("{tag}-prior")) {
            Ok(stamp) => notes.push(format!("stamp {stamp} committed before the fault")),
            Err(e) => {
                return fail(
                    home,
                    &mut job,
                    format!("the checkpoint before the fault failed: {e}"),
                    &notes,
                )
            }
        }
    }
    let sleep_us = |us: u64| std::thread::sleep(Duration::from_micros(us));
    let mut ckpt = None;
    match s.moment {
        Moment::Compute => sleep_us(s.delay_us),
        Moment::Pause | Moment::Commit => {
            let before = std::fs::read_to_string(&coord_log).unwrap_or_default();
            let next = before.matches(" committed: ").count() as u64 + 1;
            let marker = match s.moment {
                Moment::Pause => format!("checkpoint {next} started"),
                _ => format!("checkpoint {next}: every node captured: resume"),
            };
            ckpt = Some(spawn_ckpt(home, &id, &tag));
            if !wait_text(&coord_log, &marker, &mut job.child, Duration::from_secs(10)) {
                notes.push(format!("{marker:?} never logged"));
            }
            sleep_us(s.delay_us);
        }
        Moment::Recovery => {}
    }
    if job.child.try_wait().unwrap().is_some() {
        if let Some(c) = ckpt {
            let _ = c.finish(Duration::from_secs(10));
        }
        let left = kill_job_processes(home, &id);
        return (
            Outcome::NotKilled,
            format!("the job ended before the kill (left: {left:?})"),
        );
    }
    let committed_before = committed_stamps(home, &id);
    notes.push(format!(
        "killed {} ({} stamp(s) committed then: {committed_before:?})",
        kill_nodes(home, &id, &s.victims),
        committed_before.len()
    ));
    if let (Moment::Recovery, Some(b)) = (s.moment, s.second) {
        let line = format!("mome: restarting job {id}");
        if !wait_text(&job.err, &line, &mut job.child, Duration::from_secs(20)) {
            return fail(
                home,
                &mut job,
                "no `restarting job` line after the first kill".into(),
                &notes,
            );
        }
        sleep_us(s.delay_us);
        // The keeper of node b survives the first restart (adopted); its
        // agent is the new incarnation's, once status.json has it.
        let k = keeper_pid(home, &id, b);
        sigkill(k.unwrap_or(0));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut agent = None;
        while Instant::now() < deadline && job.child.try_wait().unwrap().is_none() {
            if incarnation(home, &id) == Some(1) {
                if let Some(a) = agent_pid(home, &id, b).filter(|&a| alive(a)) {
                    sigkill(a);
                    agent = Some(a);
                    break;
                }
            } else if incarnation(home, &id).is_some_and(|i| i > 1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        notes.push(format!(
            "then, {} ms after `restarting job`, node {b} (keeper {k:?}, agent of incarnation 1 {agent:?})",
            s.delay_us / 1000
        ));
    }
    let ckpt_result = ckpt.map(|c| c.finish(END_LIMIT));
    if let Some(r) = &ckpt_result {
        notes.push(format!("the checkpoint in flight: {r:?}"));
        if r.as_ref().is_err_and(|e| e.starts_with("HUNG")) {
            return fail(home, &mut job, "mome-ckpt hung".into(), &notes);
        }
    }
    let Some(status) = wait_child(&mut job.child, END_LIMIT) else {
        return fail(
            home,
            &mut job,
            format!("HUNG: the job did not end within {END_LIMIT:?} of the kill"),
            &notes,
        );
    };
    let err = job.stderr();
    let out = job.stdout();
    let restarted = err.contains("restarting the job from its newest recoverable checkpoint");
    let ended = err.contains("; ending the job");
    // A stamp existed at the kill: committed before it, or the one in
    // flight was committed before the failure was seen (then mome-run
    // says it restarts).
    let stamp_existed = s.prior || !committed_before.is_empty();
    if status.success() {
        if checksum_line(&out) != native {
            return fail(
                home,
                &mut job,
                format!(
                    "exit 0 but wrong checksum: {} (native {native})",
                    checksum_line(&out)
                ),
                &notes,
            );
        }
        if !restarted || !err.contains(&format!("mome: restarting job {id} from stamp")) {
            return fail(
                home,
                &mut job,
                "exit 0 without saying it restarted".into(),
                &notes,
            );
        }
        let left = wait_gone(home, &id, true, 5);
        if !left.is_empty() {
            return fail(
                home,
                &mut job,
                format!("recovered, but processes are left: {left:?}"),
                &notes,
            );
        }
        notes.push(format!(
            "{} restart(s)",
            err.matches("mome: restarting job").count()
        ));
        return (Outcome::Recovered, notes.join("; "));
    }
    if status.code() == Some(1)
        && ended
        && !restarted
        && !stamp_existed
        && !log_committed(home, &id)
    {
        let left = wait_gone(home, &id, false, 5);
        if !left.is_empty() {
            return fail(
                home,
                &mut job,
                format!("stopped, but processes other than keepers are left: {left:?}"),
                &notes,
            );
        }
        let keepers = kill_job_processes(home, &id);
        notes.push(format!("{} keeper(s) left in grace, killed", keepers.len()));
        return (Outcome::CleanStop, notes.join("; "));
    }
    let why = format!(
        "ended with {status} (restart said: {restarted}, `ending the job` said: {ended}, stamp existed: {stamp_existed})"
    );
    fail(home, &mut job, why, &notes)
}

#[test]
fn fault_injection_random_nodes() {
    let runs: usize = std::env::var("MOME_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("MOME_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6d6f_6d65_2026);
    eprintln!("fault injection: {runs} run(s), seed {seed} (MOME_FAULT_RUNS, MOME_FAULT_SEED)");
    let native = native_checksum("jacobi", &FAULT_ARGS);
    let mut rng = Rng::new(seed);
    let mut reports: Vec<RunReport> = vec![];
    let started = Instant::now();
    // MOME_FAULT_MOMENT=compute|pause|commit|recovery: only that moment.
    let only = std::env::var("MOME_FAULT_MOMENT").ok();
    for run in 0..runs {
        let s = loop {
            let s = Scenario::pick(&mut rng);
            let name = format!("{:?}", s.moment).to_lowercase();
            if only.as_ref().is_none_or(|m| *m == name) {
                break s;
            }
        };
        let home = Home::new();
        let t = Instant::now();
        let (outcome, detail) = fault_run(&home, run, &s, &native);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "run {run:2}: {:<50} {:?} victims {:?}{} +{} us -> {outcome:?} in {secs:.1} s\n         {}",
            s.label(),
            s.moment,
            s.victims,
            s.second.map(|b| format!(" then {b}")).unwrap_or_default(),
            s.delay_us,
            if outcome == Outcome::Failure {
                detail.clone()
            } else {
                detail.lines().next().unwrap_or("").to_string()
            }
        );
        if outcome == Outcome::Failure && std::env::var_os("MOME_FAULT_KEEP").is_some() {
            eprintln!("         kept {}", home.path().display());
            std::mem::forget(home);
        }
        reports.push(RunReport {
            label: s.label(),
            outcome,
            detail,
            secs,
        });
    }
    // Summary: scenario x outcome.
    let mut table: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    for r in &reports {
        let col = match r.outcome {
            Outcome::Recovered => 0,
            Outcome::CleanStop => 1,
            Outcome::NotKilled => 2,
            Outcome::Failure => 3,
        };
        table.entry(r.label.clone()).or_default()[col] += 1;
    }
    let mut summary = format!(
        "fault injection summary: {runs} run(s), seed {seed}, {:.0} s\n{:<50} {:>9} {:>10} {:>10} {:>8}\n",
        started.elapsed().as_secs_f64(),
        "scenario",
        "recovered",
        "clean stop",
        "not killed",
        "FAILURE"
    );
    for (label, c) in &table {
        summary += &format!(
            "{label:<50} {:>9} {:>10} {:>10} {:>8}\n",
            c[0], c[1], c[2], c[3]
        );
    }
    let slowest = reports.iter().map(|r| r.secs).fold(0.0, f64::max);
    summary += &format!("slowest run {slowest:.1} s\n");
    eprintln!("{summary}");
    let failures: Vec<String> = reports
        .iter()
        .enumerate()
        .filter(|(_, r)| r.outcome == Outcome::Failure)
        .map(|(i, r)| format!("run {i} ({}):\n{}", r.label, r.detail))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed run(s):\n{}\n{summary}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---- 3. one copy: losing a node and its only holder ----

#[test]
fn copies_1_cannot_survive_losing_a_node_and_its_holder() {
    let home = Home::new();
    let cfg = config_file(&home, "redundancy:\n  copies: 1\n");
    let (mut job, stamp) = checkpointed_jacobi(&home, &["--config", &cfg], 4, &["512", "4000"]);
    let killed = kill_nodes(&home, &job.id, &[1, 2]);
    let status = end_of(&home, &mut job, END_LIMIT);
    let err = job.stderr();
    eprintln!("killed {killed} after stamp {stamp}: {status}\n{err}");
    assert_eq!(
        status.code(),
        Some(3),
        "losing node 1 and its only holder must refuse the restart (exit 3)\nstderr:\n{err}\nlogs:\n{}",
        logs_tail(&home, &job.id, 30)
    );
    assert!(
        err.contains(&format!("mome: stamp {stamp} rejected: ")) && err.contains("node 1"),
        "the refusal does not say that stamp {stamp} lacks node 1:\n{err}"
    );
    assert!(
        err.contains("no usable checkpoint"),
        "no `no usable checkpoint` in:\n{err}"
    );
    // Nothing runs but the keepers of the live nodes, in their grace period.
    let left = wait_gone(&home, &job.id, false, 5);
    assert!(left.is_empty(), "processes left: {left:?}");
    let keepers = kill_job_processes(&home, &job.id);
    eprintln!("keepers in grace, killed: {keepers:?}");
    assert!(
        keepers.iter().all(|(_, c)| is_keeper(c)),
        "not only keepers were left: {keepers:?}"
    );
}

// ---- 4. mome-run killed, keepers alive: mome-restart uses their memory ----

#[test]
fn mome_restart_after_mome_run_was_killed() {
    let home = Home::new();
    let args = ["512", "3000"];
    let native = native_checksum("jacobi", &args);
    let (mut job, stamp) = checkpointed_jacobi(&home, &[], 2, &args);
    job.kill9(&home);
    let keepers = keeper_files(&home, &job.id);
    assert!(
        keepers.len() == 2 && keepers.iter().all(|(_, p)| p.is_some_and(alive)),
        "the keepers must outlive mome-run: {keepers:?}"
    );
    let mut again = home.start_restart(&job.id, &[], "restart");
    let status = end_of(&home, &mut again, END_LIMIT);
    let err = again.stderr();
    assert!(
        status.success(),
        "mome-restart failed ({status})\nstdout:\n{}\nstderr:\n{err}\nlogs:\n{}",
        again.stdout(),
        logs_tail(&home, &job.id, 30)
    );
    assert_eq!(checksum_line(&again.stdout()), native, "stderr:\n{err}");
    assert!(
        err.contains(&format!("from stamp {stamp}")),
        "mome-restart does not name stamp {stamp}:\n{err}"
    );
    for n in 0..2 {
        assert!(
            err.contains(&format!("mome: node {n} restores from the memory of node")),
            "node {n} does not restore from memory:\n{err}"
        );
    }
    assert_clean_end(&home, &again);
}

// ---- 5. on_failure: stop ----

#[test]
fn on_failure_stop_ends_the_job() {
    let home = Home::new();
    let cfg = config_file(&home, "redundancy:\n  on_failure: stop\n");
    let (mut job, _) = checkpointed_jacobi(&home, &["--config", &cfg], 4, &["512", "4000"]);
    kill_nodes(&home, &job.id, &[2]);
    let status = end_of(&home, &mut job, END_LIMIT);
    let err = job.stderr();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains("mome: node 2 failed: ") && err.contains("; ending the job"),
        "stderr:\n{err}"
    );
    assert!(
        !err.contains("restarting"),
        "on_failure: stop must not restart:\n{err}"
    );
    home.assert_nothing_left();
    let left = wait_gone(&home, &job.id, false, 5);
    assert!(left.is_empty(), "processes left: {left:?}");
    // The live nodes' keepers keep the stamp for a later mome-restart.
    let keepers = kill_job_processes(&home, &job.id);
    eprintln!("keepers in grace after the stop, killed: {keepers:?}");
}

// ---- 6. the grace period ----

#[test]
fn keepers_free_their_memory_after_the_grace_period() {
    let home = Home::new();
    let cfg = config_file(&home, "redundancy:\n  grace: 1s\n");
    let (mut job, stamp) = checkpointed_jacobi(&home, &["--config", &cfg], 2, &["512", "3000"]);
    let keepers = keeper_files(&home, &job.id);
    assert_eq!(keepers.len(), 2, "{keepers:?}");
    let t = Instant::now();
    job.kill9(&home);
    let deadline = t + Duration::from_secs(4);
    loop {
        let alive_keepers: Vec<i32> = keepers
            .iter()
            .filter_map(|(_, p)| *p)
            .filter(|&p| alive(p))
            .collect();
        let files = keeper_files(&home, &job.id);
        if alive_keepers.is_empty() && files.is_empty() {
            eprintln!(
                "keepers gone {:.1} s after mome-run was killed",
                t.elapsed().as_secs_f64()
            );
            break;
        }
        if Instant::now() > deadline {
            let still = kill_job_processes(&home, &job.id);
            panic!(
                "with grace 1s the keepers are still there 4 s after mome-run died: alive {alive_keepers:?}, files {files:?} (killed {still:?})\nlogs:\n{}",
                logs_tail(&home, &job.id, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut again = home.start_restart(&job.id, &[], "restart");
    let status = end_of(&home, &mut again, END_LIMIT);
    let err = again.stderr();
    eprintln!("mome-restart after the grace period: {status}\n{err}");
    assert_eq!(
        status.code(),
        Some(3),
        "mome-restart must refuse: the memory is gone and nothing is on disk\nstdout:\n{}\nstderr:\n{err}",
        again.stdout()
    );
    assert!(
        err.contains(&format!("mome: stamp {stamp} rejected: "))
            && err.contains("no usable checkpoint"),
        "the refusal does not say why:\n{err}"
    );
    let left = wait_gone(&home, &job.id, true, 5);
    assert!(left.is_empty(), "processes left: {left:?}");
}
