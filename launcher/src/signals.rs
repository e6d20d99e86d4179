//! The signals mome-run reacts to, turned into readable file descriptors
//! (signal-hook's self-pipe, one socket pair per signal) so that the event
//! loop sees them in poll() like any other event, and counts them: a second
//! Ctrl-C means "stop waiting".
//!
//! Handlers only write one byte: everything else happens in the loop.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use signal_hook::SigId;

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot create the self-pipe for {name}: {source}")]
    Pipe {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot install a handler for {name}: {source}")]
    Register {
        name: String,
        source: std::io::Error,
    },
}

/// Signals that end the job: forwarded to the ranks, then the job ends.
/// SIGQUIT (Ctrl-\\) too: left to its default it would kill mome-run alone
/// and leave the ranks' children behind.
pub const ENDING: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

#[derive(Debug)]
struct Watched {
    signal: i32,
    read: UnixStream,
    id: SigId,
}

/// Handlers installed for a set of signals; removed on drop.
#[derive(Debug)]
pub struct SignalPipes {
    watched: Vec<Watched>,
}

impl SignalPipes {
    /// Installs handlers for `signals`, except those that were ignored when
    /// mome-run started (under `nohup`, SIGHUP stays ignored) unless listed
    /// in `always` (SIGCHLD must be seen whatever the parent did).
    pub fn install(signals: &[i32], always: &[i32]) -> Result<SignalPipes, SignalError> {
        let mut watched = Vec::new();
        for &signal in signals {
            if !always.contains(&signal) && crate::os::signal_ignored(signal) {
                continue;
            }
            let name = mome_protocol::job::signal_name(signal);
            let (read, write) = UnixStream::pair().map_err(|source| SignalError::Pipe {
                name: name.clone(),
                source,
            })?;
            read.set_nonblocking(true)
                .map_err(|source| SignalError::Pipe {
                    name: name.clone(),
                    source,
                })?;
            let id = signal_hook::low_level::pipe::register(signal, write)
                .map_err(|source| SignalError::Register { name, source })?;
            watched.push(Watched { signal, read, id });
        }
        Ok(SignalPipes { watched })
    }

    /// The readable end of each watched signal, to poll.
    pub fn fds(&self) -> impl Iterator<Item = (i32, BorrowedFd<'_>)> {
        self.watched.iter().map(|w| (w.signal, w.read.as_fd()))
    }

    /// How many times `signal` arrived since the last call (0 if never).
    pub fn take(&self, signal: i32) -> usize {
        let Some(w) = self.watched.iter().find(|w| w.signal == signal) else {
            return 0;
        };
        let mut count = 0;
        let mut buf = [0u8; 64];
        let mut read = &w.read;
        while let Ok(n) = read.read(&mut buf) {
            if n == 0 {
                break;
            }
            count += n;
        }
        count
    }
}

impl Drop for SignalPipes {
    fn drop(&mut self) {
        for w in &self.watched {
            signal_hook::low_level::unregister(w.id);
        }
    }
}
