//! Forwarding of the ranks' stdout and stderr to mome-run's own, as the
//! bytes arrive (users watch progress), optionally tagging each line with
//! the rank (`[3] line`).
//!
//! Writes never block the event loop: a [`Sink`] queues what its
//! destination cannot take yet and writes it when poll() says it can. The
//! loop stops reading the ranks' pipes while a sink holds more than
//! [`Sink::BACKLOG_LIMIT`], so a slow reader slows the ranks down (as it
//! would a native run) instead of filling mome-run's memory. A destination
//! that went away (EPIPE, e.g. `mome-run ... | head`) discards from then
//! on, so the ranks never hang on a full pipe.

use std::os::fd::BorrowedFd;

use crate::os::{self, OutputKind};

/// mome-run's stdout or stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    Stdout,
    Stderr,
}

/// A destination of forwarded output and what it has not taken yet.
#[derive(Debug)]
pub struct Sink {
    fd: BorrowedFd<'static>,
    kind: OutputKind,
    queue: Vec<u8>,
    /// Bytes of `queue` already written.
    head: usize,
    /// Why the destination stopped taking data, once it did.
    closed: Option<std::io::Error>,
}

impl Sink {
    /// Above this many queued bytes the ranks' pipes are no longer read.
    pub const BACKLOG_LIMIT: usize = 1 << 20;

    pub fn new(fd: BorrowedFd<'static>) -> Sink {
        Sink {
            fd,
            kind: os::output_kind(fd),
            queue: Vec::new(),
            head: 0,
            closed: None,
        }
    }

    pub fn stdout() -> Sink {
        // SAFETY: fd 1 stays open for the life of the process (the Rust
        // runtime reopens it on /dev/null if it was closed at startup, and
        // nothing in mome-run closes it).
        Sink::new(unsafe { BorrowedFd::borrow_raw(1) })
    }

    pub fn stderr() -> Sink {
        // SAFETY: as for fd 1 in `stdout`.
        Sink::new(unsafe { BorrowedFd::borrow_raw(2) })
    }

    pub fn fd(&self) -> BorrowedFd<'static> {
        self.fd
    }

    /// Queues `bytes` and writes what the destination takes at once.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.closed.is_some() || bytes.is_empty() {
            return;
        }
        self.queue.extend_from_slice(bytes);
        self.write_ready();
    }

    pub fn pending(&self) -> usize {
        self.queue.len() - self.head
    }

    pub fn backlogged(&self) -> bool {
        self.pending() > Sink::BACKLOG_LIMIT
    }

    /// Whether the destination went away, and why.
    pub fn closed(&self) -> Option<&std::io::Error> {
        self.closed.as_ref()
    }

    /// Writes as much as the destination takes without blocking. Returns
    /// the error that closed it, the first time that happens.
    pub fn write_ready(&mut self) -> Option<std::io::Error> {
        while self.pending() > 0 && self.closed.is_none() {
            let chunk = &self.queue[self.head..];
            let chunk = match self.kind {
                OutputKind::NeverBlocks => chunk,
                OutputKind::MayBlock => {
                    if !os::writable_now(self.fd) {
                        break;
                    }
                    // POLLOUT on a pipe promises room for PIPE_BUF bytes.
                    &chunk[..chunk.len().min(os::PIPE_BUF)]
                }
            };
            match os::write_some(self.fd, chunk) {
                Ok(n) => self.head += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EPIPE, EIO of a hung-up terminal, ...: discard from now on.
                    self.closed = Some(std::io::Error::from(e.kind()));
                    self.queue = Vec::new();
                    self.head = 0;
                    return Some(e);
                }
            }
        }
        if self.head == self.queue.len() {
            self.queue.clear();
            self.head = 0;
        } else if self.head > (64 << 10) && self.head * 2 > self.queue.len() {
            self.queue.drain(..self.head);
            self.head = 0;
        }
        None
    }
}

/// Cuts one rank stream into lines and writes them tagged `[rank] `, or
/// passes bytes through unchanged when tagging is off.
#[derive(Debug)]
pub struct LineTagger {
    /// `[rank] `, or None to forward bytes unchanged.
    prefix: Option<Vec<u8>>,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
}

impl LineTagger {
    /// A line longer than this is cut: holding it whole could take all of
    /// mome-run's memory (think of a binary dump without newlines).
    pub const MAX_LINE: usize = 64 << 10;

    pub fn new(rank: u32, tagged: bool) -> LineTagger {
        LineTagger {
            prefix: tagged.then(|| format!("[{rank}] ").into_bytes()),
            partial: Vec::new(),
        }
    }

    /// Forwards `data` to `sink`: complete lines now (tagged), the rest
    /// when its newline comes.
    pub fn feed(&mut self, data: &[u8], sink: &mut Sink) {
        let Some(prefix) = &self.prefix else {
            sink.push(data);
            return;
        };
        let mut out = Vec::with_capacity(data.len() + 16);
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&self.partial);
            out.extend_from_slice(&rest[..=pos]);
            self.partial.clear();
            rest = &rest[pos + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() >= Self::MAX_LINE {
            out.extend_from_slice(prefix);
            out.append(&mut self.partial);
            out.push(b'\n');
        }
        sink.push(&out);
    }

    /// End of the stream: a last line without newline is written tagged,
    /// with a newline so the next rank's line does not start on it.
    pub fn finish(&mut self, sink: &mut Sink) {
        if let Some(prefix) = &self.prefix {
            if !self.partial.is_empty() {
                let mut out = prefix.clone();
                out.append(&mut self.partial);
                out.push(b'\n');
                sink.push(&out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// A sink writing into a pipe whose read end the test reads back.
    fn pipe_sink() -> (Sink, std::fs::File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        // 1 MiB of room (the default maximum for any user), so that the
        // tests can write whole lines before reading them back.
        nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20)).unwrap();
        // Leak the write end: a Sink borrows its fd for 'static.
        let w: &'static std::os::fd::OwnedFd = Box::leak(Box::new(w));
        (Sink::new(w.as_fd()), std::fs::File::from(r))
    }

    fn read_available(f: &mut std::fs::File, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn tags_lines_and_keeps_partial_lines() {
        let (mut sink, mut out) = pipe_sink();
        let mut t = LineTagger::new(2, true);
        t.feed(b"hello\nwor", &mut sink);
        t.feed(b"ld\n\nlast", &mut sink);
        t.finish(&mut sink);
        let expected = b"[2] hello\n[2] world\n[2] \n[2] last\n";
        assert_eq!(read_available(&mut out, expected.len()), expected);
    }

    #[test]
    fn untagged_is_byte_identical() {
        let (mut sink, mut out) = pipe_sink();
        let mut t = LineTagger::new(0, false);
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        t.feed(&data, &mut sink);
        t.finish(&mut sink);
        assert_eq!(read_available(&mut out, data.len()), data);
    }

    #[test]
    fn queues_when_the_pipe_is_full_and_discards_after_epipe() {
        let (mut sink, out) = pipe_sink();
        let big = vec![b'x'; 3 << 20];
        sink.push(&big);
        // The pipe holds 1 MiB: the rest waits in the queue.
        assert!(sink.pending() > 0 && sink.pending() < big.len());
        drop(out);
        assert!(sink.write_ready().is_some());
        assert!(sink.closed().is_some());
        assert_eq!(sink.pending(), 0);
        sink.push(b"more");
        assert_eq!(sink.pending(), 0);
    }

    #[test]
    fn very_long_lines_are_cut() {
        let (mut sink, mut out) = pipe_sink();
        let mut t = LineTagger::new(1, true);
        t.feed(&vec![b'a'; LineTagger::MAX_LINE], &mut sink);
        let got = read_available(&mut out, 4 + LineTagger::MAX_LINE + 1);
        assert!(got.starts_with(b"[1] a") && got.ends_with(b"a\n"));
    }
}
