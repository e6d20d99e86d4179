//! The coordinator's channel: commands in on stdin, events out on stdout,
//! both one JSON object per line (`mome_protocol::ckpt`).
//!
//! Events from every task (checkpoint engine, sessions, restore threads) go
//! through one channel to one writer thread, so lines never interleave and
//! a slow reader of stdout never blocks a task. Commands are read by a plain
//! thread (stdin may be a terminal or a file that cannot be made
//! non-blocking) and handed to the runtime; end of file closes the channel,
//! which is how the agent learns that mome-run is gone.

use std::io::{BufRead, Write};
use std::sync::mpsc as std_mpsc;

use mome_protocol::ckpt::{AgentCommand, AgentEvent};
use tokio::sync::mpsc;

/// Longest command line accepted; longer lines are malformed.
const MAX_LINE: usize = 64 * 1024;

/// Sends events to the stdout writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    tx: std_mpsc::Sender<AgentEvent>,
}

impl Events {
    /// An event channel whose writer is started later with [`start_writer`]
    /// (after the `ready` line): events sent before wait in the channel.
    pub fn new() -> (Events, std_mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = std_mpsc::channel();
        (Events { tx }, rx)
    }

    pub fn send(&self, event: AgentEvent) {
        // The writer only stops when stdout is gone: nobody reads events then.
        let _ = self.tx.send(event);
    }
}

/// Starts the thread that writes events to stdout, one JSON line each.
pub fn start_writer(rx: std_mpsc::Receiver<AgentEvent>) {
    let spawned = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || {
            let mut broken = false;
            for event in rx {
                if broken {
                    continue;
                }
                let mut line = match serde_json::to_string(&event) {
                    Ok(l) => l,
                    Err(e) => {
                        log!("cannot encode event {event:?}: {e}");
                        continue;
                    }
                };
                line.push('\n');
                let mut out = std::io::stdout().lock();
                if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                    // Keep draining the channel so that senders never see
                    // an error; the events are lost either way.
                    log!("cannot write events on stdout ({e}); dropping them from now on");
                    broken = true;
                }
            }
        });
    if let Err(e) = spawned {
        log!("cannot start the event writer ({e}); no events will be reported");
    }
}

/// Reads commands from stdin. The receiver closes at end of file (or a read
/// error); a malformed line is logged and answered `Failed{stamp: 0}`.
pub fn read_commands(events: Events) -> mpsc::Receiver<AgentCommand> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line(&mut input, &mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log!("cannot read standard input: {e}");
                        break;
                    }
                }
                match parse(&line) {
                    Ok(None) => {}
                    Ok(Some(cmd)) => {
                        if tx.blocking_send(cmd).is_err() {
                            break;
                        }
                    }
                    Err(reason) => {
                        log!("{reason}");
                        events.send(AgentEvent::Failed { stamp: 0, reason });
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log!("cannot read standard input ({e}); only signals stop the agent");
    }
    rx
}

/// Reads one line (without its end), at most [`MAX_LINE`] bytes kept; the
/// rest of a longer line is read and dropped. Returns bytes read, 0 at EOF.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() <= MAX_LINE {
            line.extend_from_slice(&chunk[..chunk.len().min(MAX_LINE + 1 - line.len())]);
        }
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        total += used;
        if done.is_some() {
            return Ok(total);
        }
    }
}

/// A command line: `Ok(None)` for a blank line.
fn parse(line: &[u8]) -> Result<Option<AgentCommand>, String> {
    if line.len() > MAX_LINE {
        return Err(format!(
            "malformed command: line longer than {MAX_LINE} bytes"
        ));
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| "malformed command: not UTF-8".to_string())?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| format!("malformed command {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_rejects_garbage() {
        assert_eq!(
            parse(br#"{"cmd":"commit","stamp":3}"#),
            Ok(Some(AgentCommand::Commit {
                stamp: 3,
                manifest: None,
                keep: 0
            }))
        );
        assert_eq!(parse(b"  "), Ok(None));
        assert!(parse(b"{\"cmd\":\"dance\"}").is_err());
        assert!(parse(b"\xff").is_err());
        assert!(parse(&vec![b'x'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn long_lines_are_cut_not_buffered() {
        let mut input =
            std::io::Cursor::new([vec![b'a'; 3 * MAX_LINE], b"\nnext\n".to_vec()].concat());
        let mut line = Vec::new();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 3 * MAX_LINE + 1);
        assert_eq!(line.len(), MAX_LINE + 1);
        line.clear();
        read_line(&mut input, &mut line).unwrap();
        assert_eq!(line, b"next");
        line.clear();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 0);
    }
}
