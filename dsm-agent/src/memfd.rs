//! The node memory file: one memfd holding the whole DSM window of this node
//! (file offset = window address - base). Every local rank maps it
//! `MAP_SHARED`, so a page put in its page cache is seen by all of them, and
//! punching a hole drops a page from every local rank at once.
//!
//! This module owns the fd and the two operations the agent does on it
//! directly: handing it out and dropping pages. It remembers which pages it
//! dropped since the checkpoint engine last asked: those are the pages that
//! may have become holes (removed from the next increment) or, for a partial
//! page, been zeroed by the kernel behind the ranks' dirty tracking.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use mome_protocol::layout::PAGE_SIZE;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the node memory file {name}: {errno}")]
    Create { name: String, errno: Errno },
    #[error("cannot size the node memory file to {size} bytes: {errno}")]
    Resize { size: u64, errno: Errno },
    #[error("cannot drop pages {offset:#x}+{len:#x} of the node memory file: {errno}")]
    Punch { offset: u64, len: u64, errno: Errno },
}

/// The node's memfd.
#[derive(Debug)]
pub struct NodeMemory {
    fd: OwnedFd,
    size: u64,
    /// Pages touched by punches since [`NodeMemory::take_punched`].
    punched: Mutex<Vec<Range<u64>>>,
}

impl NodeMemory {
    /// Creates `mome-node-<node>` of `size` bytes. The file is sparse: shmem
    /// files are VM_NORESERVE, so a 1 TiB window costs nothing until touched.
    pub fn create(node: u32, size: u64) -> Result<NodeMemory, MemoryError> {
        let name = format!("mome-node-{node}");
        let fd = memfd_create(name.as_str(), MFdFlags::MFD_CLOEXEC)
            .map_err(|errno| MemoryError::Create { name, errno })?;
        let len = libc::off_t::try_from(size).map_err(|_| MemoryError::Resize {
            size,
            errno: Errno::EFBIG,
        })?;
        nix::unistd::ftruncate(&fd, len).map_err(|errno| MemoryError::Resize { size, errno })?;
        Ok(NodeMemory {
            fd,
            size,
            punched: Mutex::new(Vec::new()),
        })
    }

    /// Another descriptor of the same file.
    pub fn duplicate(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Drops the pages of `[offset, offset + len)`: they read back as zeros
    /// and are unmapped from every rank. The file keeps its size. A range
    /// that ends or starts inside a page zeroes that part of the page, as
    /// ftruncate does.
    pub fn punch(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let err = |errno| MemoryError::Punch { offset, len, errno };
        let end = offset.checked_add(len).filter(|&e| e <= self.size);
        let (Some(_), Ok(off), Ok(l)) = (
            end,
            libc::off_t::try_from(offset),
            libc::off_t::try_from(len),
        ) else {
            return Err(err(Errno::EINVAL));
        };
        // Logged before the punch: a checkpoint that takes the log after
        // this point looks at the pages again, whatever it finds.
        crate::agent::lock(&self.punched)
            .push(offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE));
        fallocate(
            &self.fd,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(err)
    }

    /// Writes `data` at `offset` (restore of pages before any rank maps
    /// them: nobody can see a partly written page).
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let n = nix::sys::uio::pwrite(
                &self.fd,
                &data[done..],
                (offset + done as u64) as libc::off_t,
            )
            .map_err(std::io::Error::from)?;
            done += n;
        }
        Ok(())
    }

    /// Pages touched by punches since the last call (whole pages, partial
    /// ones included).
    pub fn take_punched(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *crate::agent::lock(&self.punched))
    }
}

impl AsFd for NodeMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
