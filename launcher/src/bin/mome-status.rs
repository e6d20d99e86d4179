//! `mome-status`: lists the jobs of $MOME_HOME, or shows one in detail.

use clap::Parser;
use mome_launcher::status::{self, CONTROL_TIMEOUT};
use mome_protocol::job::mome_home;

const AFTER_HELP: &str = "\
Examples:
  mome-status                         every job: ID STATE RANKS NODES STARTED COMMAND
  mome-status 20261122-001805-3fa2    one job: header, ranks, agents
  mome-status --json | jq '.[] | select(.state == \"running\")'

States: starting, running, finished, failed, and lost for a job whose
mome-run died without recording its end.

Environment:
  MOME_HOME   where job directories live (default ~/.mome)";

/// Show mome jobs: all of them, or one in detail.
#[derive(Debug, Parser)]
#[command(name = "mome-status", version, about, after_help = AFTER_HELP)]
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
    let home = match mome_home() {
        Ok(home) => home,
        Err(e) => fail(e),
    };
    match &cli.job {
        None => {
            let jobs = status::list_jobs(&home).unwrap_or_else(|e| fail(e));
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&jobs).expect("summaries serialize"));
            } else if jobs.is_empty() {
                println!("no jobs in {}", home.display());
            } else {
                print!("{}", status::render_list(&jobs));
            }
        }
        Some(id) => {
            let (detail, warning) = status::job_detail(&home, id, CONTROL_TIMEOUT).unwrap_or_else(|e| fail(e));
            if let Some(warning) = warning {
                eprintln!("mome-status: {warning}");
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&detail).expect("a job serializes"));
            } else {
                print!("{}", status::render_detail(&detail));
            }
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("mome-status: {e}");
    std::process::exit(1);
}
