//! A rank's connections to its node agent: framed request/reply over a unix
//! stream socket, with file descriptors passed as SCM_RIGHTS, and a timeout
//! on every wait that says what it waited for.
//!
//! Nothing here allocates: heap requests are sent from inside the allocator.

use mome_protocol::frame;
use mome_protocol::rank::{AgentReply, RankRequest};

/// Receive buffer size: replies are small (the largest is an error text).
pub const REPLY_BUF: usize = 1024;

#[derive(Debug, thiserror::Error, Clone, Copy)]
pub enum AgentError {
    #[error("{op} on the agent socket failed: errno {errno}")]
    Io { op: &'static str, errno: i32 },
    #[error("the agent did not answer {what} within {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    #[error("the agent closed the connection")]
    Closed,
    #[error("the agent sent a malformed reply")]
    Malformed,
    #[error("the agent sent a reply that does not answer {what}")]
    Unexpected { what: &'static str },
    #[error("the agent socket path is too long")]
    PathTooLong,
}

/// One connection (memory or sync channel).
pub struct Channel {
    fd: i32,
    timeout_ms: u64,
}

/// Lowest fd number for the library's own descriptors: high, so that they do
/// not take the small numbers programs expect to get from open(2).
pub fn high_fd_floor() -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let soft = lim.rlim_cur.min(1 << 20) as i32;
    (soft - 64).clamp(3, 1000)
}

/// Moves `fd` to a high number (close-on-exec); returns the new fd.
pub fn move_high(fd: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high_fd_floor()) };
    if high < 0 {
        return fd;
    }
    crate::sys::close(fd);
    high
}

impl Channel {
    pub fn connect(path: &str, timeout_ms: u64) -> Result<Channel, AgentError> {
        // SAFETY: creating a socket has no memory-safety preconditions.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(AgentError::Io {
                op: "socket",
                errno: crate::sys::errno(),
            });
        }
        let fd = move_high(fd);
        // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if path.len() >= addr.sun_path.len() {
            crate::sys::close(fd);
            return Err(AgentError::PathTooLong);
        }
        for (dst, src) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: addr is a valid sockaddr_un of the given length.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                core::mem::size_of::<libc::sockaddr_un>() as u32,
            )
        };
        if rc < 0 {
            let errno = crate::sys::errno();
            crate::sys::close(fd);
            return Err(AgentError::Io {
                op: "connect",
                errno,
            });
        }
        Ok(Channel { fd, timeout_ms })
    }

    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// Sends one request, with `pass_fd` attached when given.
    pub fn send(&self, req: &RankRequest<'_>, pass_fd: Option<i32>) -> Result<(), AgentError> {
        let mut buf = [0u8; 512];
        let len = frame::encode(req, &mut buf).map_err(|_| AgentError::Malformed)?;
        self.send_bytes(&buf[..len], pass_fd)
    }

    /// Sends an encoded frame.
    pub fn send_bytes(&self, frame: &[u8], pass_fd: Option<i32>) -> Result<(), AgentError> {
        let mut buf = [0u8; 512];
        let len = frame.len().min(buf.len());
        buf[..len].copy_from_slice(&frame[..len]);
        let mut sent = 0usize;
        while sent < len {
            let mut iov = libc::iovec {
                // SAFETY: within `buf`.
                iov_base: unsafe { buf.as_mut_ptr().add(sent) }.cast(),
                iov_len: len - sent,
            };
            // Room for one SCM_RIGHTS fd, 8-byte aligned.
            let mut cmsg_space = [0u64; 4];
            // SAFETY: msghdr is plain data.
            let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // The fd travels with the first byte of the frame only.
            if let Some(pfd) = pass_fd.filter(|_| sent == 0) {
                // SAFETY: CMSG_SPACE is pure arithmetic.
                let space = unsafe { libc::CMSG_SPACE(4) } as usize;
                msg.msg_control = cmsg_space.as_mut_ptr().cast();
                msg.msg_controllen = space;
                // SAFETY: msg_control points to `space` bytes we own; the
                // first header fits, and CMSG_DATA has room for one i32.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                    core::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), pfd);
                }
            }
            // SAFETY: msg points to our buffer and cmsg, alive for the call.
            let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let errno = crate::sys::errno();
                if errno == libc::EINTR {
                    continue;
                }
                return Err(AgentError::Io {
                    op: "sendmsg",
                    errno,
                });
            }
            sent += n as usize;
        }
        Ok(())
    }

    /// Waits for readability; `None` timeout waits forever. With `mask`,
    /// the wait runs with that signal mask (ppoll): how barriers and locks
    /// let a checkpoint in while they wait, and only then.
    fn wait_readable(
        &self,
        what: &'static str,
        timeout_ms: Option<u64>,
        mask: Option<u64>,
    ) -> Result<(), AgentError> {
        let deadline = timeout_ms.map(|t| crate::sys::now_ms() + t);
        loop {
            let wait = match deadline {
                None => -1,
                Some(d) => {
                    let now = crate::sys::now_ms();
                    if now >= d {
                        return Err(AgentError::Timeout {
                            what,
                            ms: timeout_ms.unwrap_or(0),
                        });
                    }
                    (d - now).min(i32::MAX as u64) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let rc = match mask {
                // SAFETY: poll on one pollfd we own.
                None => unsafe { libc::poll(&mut pfd, 1, wait) },
                Some(m) => {
                    let ts = libc::timespec {
                        tv_sec: (wait.max(0) / 1000) as i64,
                        tv_nsec: ((wait.max(0) % 1000) * 1_000_000) as i64,
                    };
                    let tsp = if wait < 0 { 0 } else { &ts as *const _ as u64 };
                    // SAFETY: raw ppoll with one pollfd, an optional
                    // timespec and an 8-byte mask, all ours.
                    unsafe {
                        crate::ckpt::raw::syscall6(
                            libc::SYS_ppoll,
                            [
                                &mut pfd as *mut _ as u64,
                                1,
                                tsp,
                                &m as *const u64 as u64,
                                8,
                                0,
                            ],
                        )
                    }
                    .try_into()
                    .map(|r: i32| {
                        if r < 0 {
                            crate::sys::set_errno(-r);
                            -1
                        } else {
                            r
                        }
                    })
                    .unwrap_or(-1)
                }
            };
            if rc > 0 {
                return Ok(());
            }
            if rc < 0 {
                let errno = crate::sys::errno();
                if errno != libc::EINTR {
                    return Err(AgentError::Io { op: "poll", errno });
                }
            }
        }
    }

    /// Reads exactly `out.len()` bytes, keeping a passed fd if one comes.
    fn read_exact(
        &self,
        out: &mut [u8],
        what: &'static str,
        timeout_ms: Option<u64>,
        got_fd: &mut Option<i32>,
        mask: Option<u64>,
    ) -> Result<(), AgentError> {
        let mut done = 0;
        while done < out.len() {
            self.wait_readable(what, timeout_ms, mask)?;
            let mut iov = libc::iovec {
                // SAFETY: within `out`.
                iov_base: unsafe { out.as_mut_ptr().add(done) }.cast(),
                iov_len: out.len() - done,
            };
            let mut cmsg_space = [0u64; 4];
            // SAFETY: msghdr is plain data.
            let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg_space.as_mut_ptr().cast();
            msg.msg_controllen = core::mem::size_of_val(&cmsg_space);
            // SAFETY: msg describes buffers we own.
            let n = unsafe { libc::recvmsg(self.fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let errno = crate::sys::errno();
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    continue;
                }
                return Err(AgentError::Io {
                    op: "recvmsg",
                    errno,
                });
            }
            if n == 0 {
                return Err(AgentError::Closed);
            }
            // SAFETY: walking the control messages the kernel filled in.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let fd = core::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                        if got_fd.is_none() {
                            *got_fd = Some(fd);
                        } else {
                            crate::sys::close(fd);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Receives one reply into `buf`. `forever` disables the timeout (for
    /// barriers and locks, which wait for other ranks).
    pub fn recv<'a>(
        &self,
        buf: &'a mut [u8; REPLY_BUF],
        what: &'static str,
        forever: bool,
    ) -> Result<(AgentReply<'a>, Option<i32>), AgentError> {
        self.recv_masked(buf, what, forever, None)
    }

    /// `recv`, waiting with signal mask `mask` (see `wait_readable`).
    pub fn recv_masked<'a>(
        &self,
        buf: &'a mut [u8; REPLY_BUF],
        what: &'static str,
        forever: bool,
        mask: Option<u64>,
    ) -> Result<(AgentReply<'a>, Option<i32>), AgentError> {
        let timeout = if forever { None } else { Some(self.timeout_ms) };
        let mut fd = None;
        let mut head = [0u8; frame::HEADER];
        let r = self
            .read_exact(&mut head, what, timeout, &mut fd, mask)
            .and_then(|_| {
                let len = frame::body_len(head).map_err(|_| AgentError::Malformed)?;
                if len > buf.len() {
                    return Err(AgentError::Malformed);
                }
                self.read_exact(&mut buf[..len], what, timeout, &mut fd, mask)?;
                Ok(len)
            });
        let len = match r {
            Ok(len) => len,
            Err(e) => {
                if let Some(f) = fd {
                    crate::sys::close(f);
                }
                return Err(e);
            }
        };
        match frame::decode::<AgentReply<'a>>(&buf[..len]) {
            Ok(reply) => Ok((reply, fd)),
            Err(_) => {
                if let Some(f) = fd {
                    crate::sys::close(f);
                }
                Err(AgentError::Malformed)
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub fn call<'a>(
        &self,
        req: &RankRequest<'_>,
        pass_fd: Option<i32>,
        buf: &'a mut [u8; REPLY_BUF],
        what: &'static str,
        forever: bool,
    ) -> Result<(AgentReply<'a>, Option<i32>), AgentError> {
        self.send(req, pass_fd)?;
        self.recv(buf, what, forever)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        crate::sys::close(self.fd);
    }
}
