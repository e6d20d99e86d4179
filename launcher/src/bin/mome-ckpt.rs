//! `mome-ckpt`: asks a running job's mome-run for a checkpoint over the
//! job's control socket, shows its progress, and says how it went.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mome_launcher::control::{self, ControlError};
use mome_launcher::coordinator::parse_duration_arg;
use mome_launcher::os::{is_terminal, print_stderr, print_stdout};
use mome_launcher::status::{shown_state, ShownState};
use mome_protocol::job::{mome_home, CheckpointDone, ControlReply, ControlRequest, JobDir};

const AFTER_HELP: &str = "\
Examples:
  mome-ckpt 20261122-001805-3fa2
      stamp 3 committed (pause 12.4 ms, 18.2 MB written in 840 ms)
  mome-ckpt --json 20261122-001805-3fa2 | jq .pause_us
  mome-ckpt --timeout 30s $(cat id.txt) || echo 'no checkpoint'

The checkpoint is taken by the job's mome-run and its agent: pages are
copied while the ranks run, the ranks stop only for what changed since
(the pause), and the stamp counts once its manifest is written (committed).
The newest checkpoint.keep stamps are kept. mome-status JOBID lists them;
mome-restart JOBID runs the job again from the newest good one.

Exit status:
  0  the checkpoint is committed
  1  it could not be taken: refused (job starting or ending, another
     checkpoint in progress, a rank that cannot be checkpointed),
     failed, or not committed within the timeout (it is then aborted)
  2  bad command line
  3  no such job, or the job is not running

Environment:
  MOME_HOME   where job directories live (default ~/.mome)";

/// Checkpoint a running mome job now.
#[derive(Debug, Parser)]
#[command(name = "mome-ckpt", version, after_help = AFTER_HELP)]
struct Cli {
    /// The job (as printed by mome-run: `mome: job <id>`).
    #[arg(value_name = "JOBID")]
    job: String,

    /// Give up, and abort the checkpoint, after DURATION (default: the
    /// job's checkpoint.timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    timeout: Option<Duration>,

    /// Print one JSON object (every measure of the committed checkpoint,
    /// or {"error": ...}) instead of text.
    #[arg(long)]
    json: bool,
}

/// Beyond the checkpoint's own timeout, how long mome-ckpt waits for
/// mome-run to report that it gave up.
const REPLY_MARGIN: Duration = Duration::from_secs(5);

fn main() {
    let cli = Cli::parse();
    let fail = |code: i32, message: String| -> ! {
        if cli.json {
            print_stdout(&format!("{}\n", serde_json::json!({ "error": message })));
        } else {
            print_stderr(&format!("mome-ckpt: {message}\n"));
        }
        std::process::exit(code);
    };
    let home = mome_home().unwrap_or_else(|e| fail(3, e.to_string()));
    let job = JobDir::open(&home, &cli.job).unwrap_or_else(|e| fail(3, e.to_string()));
    let spec = job.read_spec().unwrap_or_else(|e| fail(3, e.to_string()));
    let state = shown_state(job.read_status().ok().as_ref());
    if !matches!(state, ShownState::Running | ShownState::Starting) {
        fail(3, format!("job {} is not running (it is {state})", job.id));
    }
    let timeout = cli
        .timeout
        .filter(|t| !t.is_zero())
        .unwrap_or(spec.config.checkpoint.timeout.0);
    let request = ControlRequest::Checkpoint {
        timeout_ms: Some(timeout.as_millis() as u64),
    };
    let bar = (!cli.json && is_terminal(std::io::stdout())).then(progress_bar);
    let socket: PathBuf = job.control_socket();
    let result = control::request_streamed(&socket, &request, timeout + REPLY_MARGIN, &mut |r| {
        if let (Some(bar), ControlReply::CkptProgress(p)) = (&bar, r) {
            bar.set_length(p.total_bytes.max(1));
            bar.set_position(p.done_bytes.min(p.total_bytes));
            bar.set_message(format!("stamp {} {}", p.stamp, p.phase));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(ControlReply::Checkpoint(done)) => {
            if cli.json {
                print_stdout(&format!(
                    "{}\n",
                    serde_json::to_string(&done).expect("a checkpoint serializes")
                ));
            } else {
                print_stdout(&format!("{}\n", summary(&done)));
            }
        }
        Ok(ControlReply::Error { message }) => fail(1, message),
        Ok(other) => fail(1, format!("unexpected reply from mome-run: {other:?}")),
        Err(ControlError::Connect { path, source }) => fail(
            3,
            format!(
                "job {} is not running: cannot connect to {} ({source})",
                job.id,
                path.display()
            ),
        ),
        Err(ControlError::Timeout { .. }) => fail(
            1,
            format!(
                "no answer from job {} within {}: the checkpoint is not committed",
                job.id,
                humantime::format_duration(timeout + REPLY_MARGIN)
            ),
        ),
        Err(e) => fail(1, e.to_string()),
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:20} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_message("checkpoint");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `stamp 3 committed (pause 12.4 ms, 18.2 MB written in 840 ms)`.
fn summary(d: &CheckpointDone) -> String {
    format!(
        "stamp {} committed (pause {:.1} ms, {:.1} MB written in {} ms)",
        d.stamp,
        d.pause_us as f64 / 1000.0,
        d.bytes_written as f64 / 1e6,
        d.commit_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let d = CheckpointDone {
            stamp: 3,
            created: "x".into(),
            parent: Some(2),
            pause_us: 12_400,
            pause_pages: 1,
            precopy_pages: 2,
            commit_ms: 840,
            manifest_ms: 1,
            bytes_written: 18_200_000,
            pages: 4,
            image_bytes: 5,
            kept: vec![2, 3],
            requested: true,
        };
        assert_eq!(
            summary(&d),
            "stamp 3 committed (pause 12.4 ms, 18.2 MB written in 840 ms)"
        );
    }

    #[test]
    fn options() {
        let cli = Cli::try_parse_from(["mome-ckpt", "--timeout", "30s", "--json", "j"]).unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_secs(30)));
        assert!(cli.json);
        assert!(Cli::try_parse_from(["mome-ckpt"]).is_err());
        assert!(Cli::try_parse_from(["mome-ckpt", "--timeout", "soon", "j"]).is_err());
    }
}
