//! `mome-restart`: runs a job again from its newest good checkpoint, in
//! the foreground like mome-run. The checks are in
//! `mome_launcher::restart`; the run is mome-run's coordinator.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use mome_launcher::coordinator::{self, parse_duration_arg, CkptOverrides, RunOptions};
use mome_launcher::os::print_stderr;
use mome_launcher::restart;
use mome_protocol::ckpt::Stamp;
use mome_protocol::job::mome_home;

const AFTER_HELP: &str = "\
Examples:
  mome-restart 20261122-001805-3fa2           from the newest good stamp
  mome-restart --stamp 4 20261122-001805-3fa2 from stamp 4 exactly
  mome-restart --verify full --ckpt-interval 10min 20261122-001805-3fa2

What it does:
  Lists the job's committed stamps, verifies them newest first (quick:
  manifest, index checksums, data files present and long enough; full:
  every data block too), and prints `mome: stamp S rejected: why` for each
  one it skips. It refuses when the job is still running, when no stamp is
  usable, when --stamp S does not exist, or when the program changed since
  the stamp (`binary X changed since stamp S`). Then it prints
  `mome: restarting job J from stamp S` and runs the job as mome-run did
  (same job id and directory, argv, environment, cwd, ranks, configuration
  and pinned pids; output, stdin, Ctrl-C, the control socket and periodic
  checkpoints as with mome-run), as the job's next incarnation. The ranks
  continue where the checkpoint left them.

Exit status:
  as mome-run (the job's exit status once it ends; 1 when the agent cannot
  restore the job's memory); 1 when the job is still running or its
  program changed; 3 when there is no usable checkpoint.

Environment:
  MOME_HOME         where job directories live (default ~/.mome)
  MOME_AGENT_BIN, MOME_PRELOAD_LIB, MOME_RANKINIT_BIN  as for mome-run";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Verify {
    /// Manifests, index files and data file sizes.
    Quick,
    /// Quick, and every data block's checksum (reads everything).
    Full,
}

/// Run a mome job again from its last good checkpoint.
#[derive(Debug, Parser)]
#[command(name = "mome-restart", version, after_help = AFTER_HELP)]
struct Cli {
    /// The job (as printed by mome-run: `mome: job <id>`).
    #[arg(value_name = "JOBID")]
    job: String,

    /// Restart from this stamp (default: the newest that verifies).
    #[arg(long, value_name = "S")]
    stamp: Option<Stamp>,

    /// How much of a stamp to check before using it.
    #[arg(long, value_enum, default_value_t = Verify::Quick)]
    verify: Verify,

    /// Periodic checkpoints of the restarted job (default: as before).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    ckpt_interval: Option<Duration>,

    /// Committed checkpoints kept (default: as before).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,

    /// Do not tag output lines with `[rank] `.
    #[arg(long)]
    no_prefix: bool,
}

fn main() {
    let cli = Cli::parse();
    let home = mome_home().unwrap_or_else(|e| {
        print_stderr(&format!("mome-restart: {e}\n"));
        std::process::exit(1);
    });
    let level = match cli.verify {
        Verify::Quick => mome_store::VerifyLevel::Quick,
        Verify::Full => mome_store::VerifyLevel::Full,
    };
    let (from, roots) =
        match restart::plan_with_roots(&home, &cli.job, cli.stamp, level, &mut |line| {
            print_stderr(&format!("{line}\n"))
        }) {
            Ok(planned) => planned,
            Err(e) => {
                print_stderr(&format!("mome-restart: {e}\n"));
                std::process::exit(e.exit_code());
            }
        };
    print_stderr(&format!(
        "mome: restarting job {} from stamp {}\n",
        from.job.id, from.stamp
    ));
    if from.spec.nodes > 1 {
        for (node, (_, label)) in roots.iter().enumerate() {
            print_stderr(&format!("mome: node {node} restores from the {label}\n"));
        }
    }
    let node_roots = roots.into_iter().map(|(root, _)| root).collect();
    let mut config = from.spec.config.clone();
    CkptOverrides {
        dir: None,
        keep: cli.keep,
        interval: cli.ckpt_interval,
    }
    .apply(&mut config);
    let code = coordinator::run(RunOptions {
        ranks: from.spec.ranks,
        nodes: from.spec.nodes,
        config,
        no_prefix: cli.no_prefix,
        jobid_file: None,
        program: from.spec.command.clone().into_os_string(),
        args: Vec::new(),
        restart: Some(from),
        node_roots,
    });
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let cli =
            Cli::try_parse_from(["mome-restart", "--stamp", "4", "--verify", "full", "j"]).unwrap();
        assert_eq!((cli.stamp, cli.verify), (Some(4), Verify::Full));
        assert!(Cli::try_parse_from(["mome-restart", "--verify", "deep", "j"]).is_err());
    }
}
