//! `mome-rankinit`: runs one rank of a mome job in a pid namespace of its
//! own, at a pinned pid. Started by mome-run and mome-restart, not by
//! users; the work is in `mome_launcher::pidns`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use mome_launcher::pidns::{self, RankExec};

const AFTER_HELP: &str = "\
mome-run starts one mome-rankinit per rank when checkpoint.pid_namespace
allows it. mome-rankinit creates a pid namespace and a mount namespace with
the namespace's own /proc, forks PROGRAM there at pid PID (the same at every
restart of the rank), reaps the namespace's orphans, forwards SIGTERM,
SIGINT, SIGHUP and SIGQUIT that anyone but its parent sends it, and ends
the way PROGRAM ended. The rank's LD_PRELOAD is taken from
MOME_RANKINIT_PRELOAD (mome-rankinit itself is not preloaded).

Examples:
  mome-rankinit --probe                        can namespaces be used here?
  mome-rankinit --pid 100 -- /bin/sh sh -c 'echo $$'   prints 100

Exit status:
  --probe: 0 when pid namespaces can be used, 1 (with the reason) when not.
  Otherwise PROGRAM's exit status, or killed by the signal that killed it;
  127/126 when PROGRAM cannot be executed, 127 when the namespace cannot
  be set up.";

/// Run one rank of a mome job in its own pid namespace at a fixed pid.
#[derive(Debug, Parser)]
#[command(name = "mome-rankinit", version, after_help = AFTER_HELP,
          override_usage = "mome-rankinit --probe\n       mome-rankinit --pid PID -- PROGRAM ARGV0 [ARGS]...")]
struct Cli {
    /// Only check that the namespaces can be created, then exit.
    #[arg(long, conflicts_with_all = ["pid", "command"])]
    probe: bool,

    /// Pid of PROGRAM inside its namespace (2 or more).
    #[arg(long, value_name = "PID", required_unless_present = "probe",
          value_parser = clap::value_parser!(i32).range(2..4_194_304))]
    pid: Option<i32>,

    /// PROGRAM (the path exec'd), then its whole argv, argv[0] included.
    #[arg(value_name = "PROGRAM ARGV0 [ARGS]", num_args = 2.., trailing_var_arg = true,
          allow_hyphen_values = true, required_unless_present = "probe")]
    command: Vec<OsString>,
}

fn main() {
    let cli = Cli::parse();
    if cli.probe {
        pidns::rankinit_main(None);
    }
    let mut command = cli.command.into_iter();
    let program = PathBuf::from(command.next().expect("clap requires PROGRAM"));
    pidns::rankinit_main(Some(RankExec {
        pid: cli.pid.expect("clap requires --pid"),
        program,
        argv: command.collect(),
    }));
}
