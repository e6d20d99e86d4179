//! `mome-status`: lists the jobs of $MOME_HOME, or shows one in detail.

use clap::Parser;
use mome_launcher::os::{print_stderr, print_stdout};
use mome_launcher::status::{self, CONTROL_TIMEOUT};
use mome_protocol::job::mome_home;

const AFTER_HELP: &str = "\
Examples:
  mome-status                         every job: ID STATE RANKS NODES STARTED COMMAND
  mome-status 20261122-001805-3fa2    one job: header, ranks (with their node),
                                      agents (per node: pid, state, listen
                                      address, ranks), checkpoints
  mome-status --json | jq '.[] | select(.state == \"running\")'

States: starting, running, finished, failed, and lost for a job whose
mome-run died without recording its end.

Environment:
  MOME_HOME   where job directories live (default ~/.mome)";

/// Show mome jobs: all of them, or one in detail.
#[derive(Debug, Parser)]
#[command(name = "mome-status", version, after_help = AFTER_HELP)]
struct Cli {
    /// The job to show (as printed by mome-run: `mome: job <id>`).
    #[arg(value_name = "JOBID")]
    job: Option<String>,

    /// Print JSON (a list of jobs, or one job) for scripts.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let home = mome_home().unwrap_or_else(|e| fail(e));
    let text = match &cli.job {
        None => {
            let jobs = status::list_jobs(&home).unwrap_or_else(|e| fail(e));
            if cli.json {
                serde_json::to_string_pretty(&jobs).expect("summaries serialize") + "\n"
            } else if jobs.is_empty() {
                format!("no jobs in {}\n", home.display())
            } else {
                status::render_list(&jobs)
            }
        }
        Some(id) => {
            let (detail, warning) =
                status::job_detail(&home, id, CONTROL_TIMEOUT).unwrap_or_else(|e| fail(e));
            if let Some(warning) = warning {
                print_stderr(&format!("mome-status: {warning}\n"));
            }
            if cli.json {
                serde_json::to_string_pretty(&detail).expect("a job serializes") + "\n"
            } else {
                status::render_detail(&detail)
            }
        }
    };
    // A reader that went away (`mome-status | head -1`) is not an error.
    print_stdout(&text);
}

fn fail(e: impl std::fmt::Display) -> ! {
    print_stderr(&format!("mome-status: {e}\n"));
    std::process::exit(1);
}
