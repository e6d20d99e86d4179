//! Framed messages on a rank's unix socket, with file descriptors passed
//! alongside them (SCM_RIGHTS): the node memfd goes out with `Welcome`,
//! userfaultfds come in with `RegisterUffd`.
//!
//! Frames are those of `mome_protocol::frame` (4-byte length + postcard).
//! A stream socket does not keep message boundaries, but the kernel never
//! merges bytes sent with descriptors into a read together with bytes sent
//! without them, so every descriptor is tied to the stream position of the
//! first byte it arrived with, and belongs to the frame that covers that
//! position.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use mome_protocol::frame::{self, FrameError, HEADER, MAX_FRAME};
use mome_protocol::rank::AgentReply;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Descriptors accepted in one read; a peer that sends more is broken.
const MAX_FDS: usize = 4;
/// Bytes asked for per read.
const CHUNK: usize = 16 * 1024;
/// While a request waits (barrier, lock) the socket is still read to notice
/// the peer leaving; data sent meanwhile is kept up to this much.
const WAIT_BUFFER: usize = HEADER + MAX_FRAME;
/// Largest reply frame: replies carry short error messages.
const REPLY_BUF: usize = 1024;
/// Error messages are cut to this many bytes so a reply always fits.
const MAX_MESSAGE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("connection closed inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("the peer attached more than {MAX_FDS} file descriptors to one message")]
    TooManyFds,
}

/// One received frame: its body and the descriptors that came with it.
#[derive(Debug)]
pub struct Frame {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug)]
pub struct Wire {
    stream: UnixStream,
    /// Received bytes not yet consumed as frames.
    buf: Vec<u8>,
    /// Stream position of `buf[0]`.
    consumed: u64,
    /// Received descriptors, with the stream position they arrived at.
    fds: VecDeque<(u64, OwnedFd)>,
    eof: bool,
}

impl Wire {
    pub fn new(stream: UnixStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            consumed: 0,
            fds: VecDeque::new(),
            eof: false,
        }
    }

    /// Next frame; `None` at a clean end of stream (between frames).
    pub async fn recv(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            if self.eof {
                return match self.buf.len() {
                    0 => Ok(None),
                    n => Err(WireError::Truncated(n)),
                };
            }
            self.fill().await?;
        }
    }

    /// Returns when the peer closes the connection (or it fails); data sent
    /// meanwhile is kept for `recv`. Used while a request waits for other
    /// ranks, so that a rank that goes away leaves the barrier or lock
    /// queue at once. Cancel-safe.
    pub async fn closed(&mut self) -> Result<(), WireError> {
        while !self.eof {
            if self.buf.len() >= WAIT_BUFFER {
                // A peer that pipelines that much is waited for anyway; its
                // leaving is then seen at the next recv.
                std::future::pending::<()>().await;
            }
            self.fill().await?;
        }
        Ok(())
    }

    /// Sends a reply, with `fd` attached to its first byte when given.
    pub async fn send(
        &mut self,
        reply: &AgentReply<'_>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), WireError> {
        let mut buf = [0u8; REPLY_BUF];
        let n = match reply {
            AgentReply::Error { code, message } if message.len() > MAX_MESSAGE => {
                let mut cut = MAX_MESSAGE;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                let short = AgentReply::Error {
                    code: *code,
                    message: &message[..cut],
                };
                frame::encode(&short, &mut buf)?
            }
            _ => frame::encode(reply, &mut buf)?,
        };
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = loop {
                self.stream.writable().await?;
                let raw = self.stream.as_raw_fd();
                match self.stream.try_io(Interest::WRITABLE, || {
                    send_with_fd(raw, &buf[..n], fd.as_raw_fd())
                }) {
                    Ok(sent) => break sent,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(e.into()),
                }
            };
        }
        self.stream.write_all(&buf[sent..n]).await?;
        Ok(())
    }

    fn take_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(header) = self.buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = frame::body_len(*header)?;
        let total = HEADER + len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[HEADER..total].to_vec();
        self.buf.drain(..total);
        let end = self.consumed + total as u64;
        let mut fds = Vec::new();
        while self.fds.front().is_some_and(|(pos, _)| *pos < end) {
            if let Some((_, fd)) = self.fds.pop_front() {
                fds.push(fd);
            }
        }
        self.consumed = end;
        Ok(Some(Frame { body, fds }))
    }

    /// Reads what the socket has (waiting for something), into `buf`.
    async fn fill(&mut self) -> Result<(), WireError> {
        loop {
            self.stream.readable().await?;
            let start = self.buf.len();
            self.buf.resize(start + CHUNK, 0);
            let raw = self.stream.as_raw_fd();
            let mut fds = Vec::new();
            let mut truncated = false;
            let got = self.stream.try_io(Interest::READABLE, || {
                recv_with_fds(raw, &mut self.buf[start..], &mut fds, &mut truncated)
            });
            let n = match got {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(start);
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return Err(e.into());
                }
            };
            self.buf.truncate(start + n);
            // Descriptors go into the queue before any error so they are
            // closed with the connection rather than leaked.
            let pos = self.consumed + start as u64;
            self.fds.extend(fds.into_iter().map(|fd| (pos, fd)));
            if truncated {
                return Err(WireError::TooManyFds);
            }
            if n == 0 {
                self.eof = true;
            }
            return Ok(());
        }
    }
}

/// Room for the control message of `MAX_FDS` descriptors, aligned as cmsghdr.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

const _: () =
    assert!(std::mem::size_of::<libc::cmsghdr>() + MAX_FDS * std::mem::size_of::<RawFd>() <= 64);

/// recvmsg(2) with MSG_CMSG_CLOEXEC; descriptors received go to `fds`, and
/// `truncated` tells that the peer sent more than fit (the kernel closed those).
fn recv_with_fds(
    sock: RawFd,
    dst: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    // SAFETY: msg points at `iov` (into `dst`) and `cmsg`, both alive and
    // writable for the lengths given, for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_* macros
    // walk only inside that buffer, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors, now owned by us.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    *truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok(n as usize)
}

/// sendmsg(2) of `data` with one descriptor attached; returns bytes sent.
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE / CMSG_LEN only compute sizes; CMSG_FIRSTHDR points
    // at the start of `cmsg`, which is large enough for one descriptor (see
    // the assertion above), and the header and data written stay inside it.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
    }
    // SAFETY: msg points at `iov` (into `data`, only read by the kernel) and
    // `cmsg`, alive for the call. MSG_NOSIGNAL: a gone peer is an error,
    // not a SIGPIPE.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
