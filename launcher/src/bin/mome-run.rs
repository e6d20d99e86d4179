//! `mome-run`: runs a program as the N ranks of a mome job. The command
//! line is parsed here; everything else is in `mome_launcher::coordinator`.

use std::ffi::OsString;
use std::path::PathBuf;

use std::time::Duration;

use clap::{Parser, ValueEnum};
use mome_launcher::coordinator::{self, parse_duration_arg, CkptOverrides, RunOptions};
use mome_protocol::config::Placement;
use mome_protocol::Config;

const AFTER_HELP: &str = "\
Examples:
  mome-run -n 4 ./nbody 1000            4 ranks of ./nbody, output tagged [0]..[3]
  mome-run -n 2 --no-prefix ./app -v    options after PROGRAM go to the program
  mome-run --config job.yaml -n 8 python3 solver.py
  mome-run --jobid-file id.txt ./app && mome-status $(cat id.txt)
  mome-run -n 4 --ckpt-interval 10min --keep 3 ./solver
                                        a checkpoint every 10 minutes, 3 kept
  mome-ckpt <id>; mome-restart <id>     checkpoint now; restart after a crash
  mome-run -n 8 --nodes 2 ./jacobi 512 100
                                        8 ranks on 2 nodes: ranks 0-3 on node 0,
                                        4-7 on node 1
  mome-run -n 8 --nodes 4 --placement cyclic ./app
                                        rank r on node r mod 4

The job:
  mome-run prints `mome: job <id>` on stderr, keeps the job in
  $MOME_HOME/jobs/<id>/ (job.yaml, status.json, logs/), forwards each rank's
  stdout and stderr as it comes (tagged [rank] by line; untagged output, with
  one rank or --no-prefix, goes straight to mome-run's own stdout/stderr),
  and gives rank 0 its stdin (the others read /dev/null); other descriptors
  mome-run inherited are not passed on (a pipe to outside the job would make
  the ranks uncheckpointable). Ranks run with
  ASLR disabled, and see MOME_RANK, MOME_NRANKS, MOME_NODE and MOME_JOBID.
  Ctrl-C (or SIGTERM, SIGHUP, SIGQUIT) goes to the ranks, which get
  job.kill_grace to exit before SIGKILL; a second Ctrl-C kills at once.
  When a rank fails, the others are ended the same way. Nothing of the
  job (ranks, their children, the agent) outlives mome-run.

Nodes:
  --nodes K runs one agent per node, each with the DSM memory of its
  ranks; on one machine the K nodes are simulated (each agent its own
  memory, talking TCP on loopback, nodes.listen). K is 1 to 64 and at most
  N (every node has at least one rank). --placement (or nodes.placement)
  says which ranks go to which node:
    block   contiguous ranks, blocks whose sizes differ by at most one:
            -n 5 --nodes 2 gives ranks 0-2 on node 0 and 3-4 on node 1
    cyclic  rank r on node r mod K: -n 5 --nodes 2 gives ranks 0,2,4 on
            node 0 and 1,3 on node 1
  A rank sees its node in MOME_NODE. The placement is recorded in job.yaml
  (`placement`, the node of each rank) and shown by mome-status with each
  node's agent (pid, state, listen address, ranks). The agents
  authenticate each other with the job's secret, written at start to
  $MOME_HOME/jobs/<id>/secret (0600). The ranks start once every agent is
  connected to all the others (within job.agent_ready_timeout, else the
  nodes that did not get there are named). If a node fails (its agent
  dies, or another agent loses it), mome-run prints
  `mome: node K failed: reason; ending the job`, ends the ranks as for a
  failing rank, stops every agent and exits 1. Checkpoints of multi-node
  jobs are coordinated: every node's ranks park, the page traffic drains,
  each node takes the shared pages it owns and its ranks' heaps, then all
  resume; mome-restart restores every node.

Checkpoints:
  `mome-ckpt <id>` (or --ckpt-interval) saves the job to the checkpoint
  store (--ckpt-dir, default $MOME_HOME/jobs/<id>/ckpt), keeping the
  newest --keep stamps; `mome-restart <id>` runs it again from the newest
  good one. A failed periodic checkpoint prints
  `mome: checkpoint N failed: reason` and the job goes on. With
  checkpoint.pid_namespace auto (default) or always, each rank runs in a
  pid namespace of its own at pid 100+rank, the same after a restart
  (mome-status shows the pids seen from outside).

Exit status:
  0 when every rank exited 0; else the first failing rank's exit status, or
  128+N for a rank killed by signal N (128+N too when mome-run was
  interrupted by signal N); 1 when the job failed for mome's own reasons
  (an agent, a failed node); 2 for a bad command line (--nodes more than
  -n, --nodes with --ckpt-interval), configuration, or a preflight check
  that failed; 126/127 when PROGRAM cannot be executed / is not found.

Environment:
  MOME_HOME         where job directories live (default ~/.mome)
  MOME_AGENT_BIN    mome-agent to use (default: next to mome-run)
  MOME_PRELOAD_LIB  libmome_preload.so to inject (default: next to mome-run)
  MOME_RANKINIT_BIN mome-rankinit to use (default: next to mome-run)

Status of jobs: mome-status [JOBID]";

/// Run a program as the ranks of a mome job: N processes sharing a
/// distributed shared memory window served by a per-node agent.
#[derive(Debug, Parser)]
#[command(name = "mome-run", version, override_usage = "mome-run [OPTIONS] PROGRAM [ARGS]...", after_help = AFTER_HELP)]
struct Cli {
    /// Number of ranks (processes) to run.
    #[arg(short = 'n', long = "ranks", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    ranks: u32,

    /// Number of nodes: one agent each, the ranks spread over them by
    /// --placement. 1 to 64, and at most N. On one machine, K simulated
    /// nodes (each agent its own memory, TCP on loopback).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=coordinator::MAX_NODES as i64))]
    nodes: u32,

    /// Which ranks go to which node: block (contiguous ranks per node) or
    /// cyclic (rank r on node r mod K); default nodes.placement of the
    /// configuration, itself block by default.
    #[arg(long, value_enum, value_name = "HOW")]
    placement: Option<PlacementArg>,

    /// Job configuration (YAML): the keys to change from configs/default.yaml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Do not tag output lines with `[rank] ` (same as output.prefix: never).
    #[arg(long)]
    no_prefix: bool,

    /// Write the job id (and a newline) to PATH once the job directory exists.
    #[arg(long, value_name = "PATH")]
    jobid_file: Option<PathBuf>,

    /// Take a checkpoint every DURATION (e.g. 60s, 10min; 0: none), same as
    /// checkpoint.interval.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    ckpt_interval: Option<Duration>,

    /// Committed checkpoints kept (older ones are deleted), same as
    /// checkpoint.keep.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,

    /// Checkpoint store (default: the job directory's ckpt/), same as
    /// checkpoint.dir.
    #[arg(long, value_name = "DIR")]
    ckpt_dir: Option<PathBuf>,

    /// The program, then its arguments (passed as they are, even those
    /// starting with `-`).
    #[arg(value_name = "PROGRAM [ARGS]", required = true, num_args = 1.., trailing_var_arg = true,
          allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// `--placement`, as `nodes.placement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlacementArg {
    /// Ranks 0..N/K on node 0, the next ones on node 1, ...
    Block,
    /// Rank r on node r mod K.
    Cyclic,
}

fn main() {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        None => Config::default(),
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                mome_launcher::os::print_stderr(&format!("mome-run: {e}\n"));
                std::process::exit(2);
            }
        },
    };
    CkptOverrides {
        dir: cli.ckpt_dir,
        keep: cli.keep,
        interval: cli.ckpt_interval,
    }
    .apply(&mut config);
    if let Some(placement) = cli.placement {
        config.nodes.placement = match placement {
            PlacementArg::Block => Placement::Block,
            PlacementArg::Cyclic => Placement::Cyclic,
        };
    }
    let mut command = cli.command.into_iter();
    let program = command.next().expect("clap requires PROGRAM");
    let code = coordinator::run(RunOptions {
        ranks: cli.ranks,
        nodes: cli.nodes,
        config,
        no_prefix: cli.no_prefix,
        jobid_file: cli.jobid_file,
        program,
        args: command.collect(),
        restart: None,
        node_roots: Vec::new(),
    });
    std::process::exit(code);
}
