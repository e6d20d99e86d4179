//! The agent's log: one line per event on stderr, which mome-run redirects to
//! `logs/agent-<k>.log`, in the form `<RFC 3339 time> agent <k>: <message>`.
//!
//! stdout is not a log: it carries the single `ready` line mome-run waits for.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

/// Node number shown in every line; `u32::MAX` until the command line is parsed.
static NODE: AtomicU32 = AtomicU32::new(u32::MAX);

pub fn set_node(node: u32) {
    NODE.store(node, Ordering::Relaxed);
}

/// Writes one log line. The line is formatted first and written with one
/// call, so lines of concurrent tasks never interleave.
pub fn write(args: std::fmt::Arguments<'_>) {
    let node = NODE.load(Ordering::Relaxed);
    let time = mome_protocol::job::now_rfc3339();
    let line = if node == u32::MAX {
        format!("{time} agent: {args}\n")
    } else {
        format!("{time} agent {node}: {args}\n")
    };
    // A log that cannot be written (stderr closed) must not stop the agent.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `log!("format", args...)`: one line on the agent's log.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write(format_args!($($arg)*))
    };
}
