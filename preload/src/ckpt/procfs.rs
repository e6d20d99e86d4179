//! Reading /proc/self without allocating: maps lines, directory entries,
//! symlinks and pagemap entries, into caller-provided buffers.

use crate::sys;

/// One line of /proc/self/maps.
#[derive(Clone, Copy, Debug)]
pub struct MapLine<'a> {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    pub path: &'a [u8],
}

fn hex(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    if s.is_empty() {
        return None;
    }
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(16)?.checked_add(d as u64)?;
    }
    Some(v)
}

fn dec(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    if s.is_empty() {
        return None;
    }
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Parses one maps line (without its newline).
pub fn parse_map_line(line: &[u8]) -> Option<MapLine<'_>> {
    let mut fields = line.splitn(6, |&c| c == b' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = hex(fields.next()?)?;
    let dev = fields.next()?;
    let inode = dec(fields.next()?)?;
    let path = fields.next().unwrap_or(b"");
    let path = match path.iter().position(|&c| c != b' ') {
        Some(i) => &path[i..],
        None => b"",
    };
    let dash = range.iter().position(|&c| c == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    if perms.len() < 4 {
        return None;
    }
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ as u32;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE as u32;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC as u32;
    }
    let colon = dev.iter().position(|&c| c == b':')?;
    let major = hex(&dev[..colon])?;
    let minor = hex(&dev[colon + 1..])?;
    Some(MapLine {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        offset,
        dev: (major << 32) | minor,
        inode,
        path,
    })
}

/// Reads a whole /proc file into `buf`; returns the length. `None` when it
/// does not fit or cannot be read.
pub fn read_file(path: &core::ffi::CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: open/read/close on our own buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let mut len = 0;
        loop {
            if len == buf.len() {
                sys::close(fd);
                return None;
            }
            let n = libc::read(fd, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
            if n < 0 {
                if sys::errno() == libc::EINTR {
                    continue;
                }
                sys::close(fd);
                return None;
            }
            if n == 0 {
                break;
            }
            len += n as usize;
        }
        sys::close(fd);
        Some(len)
    }
}

/// Calls `f` with each numeric entry of a /proc directory.
pub fn for_each_number(
    path: &core::ffi::CStr,
    buf: &mut [u8],
    mut f: impl FnMut(u64, i32),
) -> Result<(), i32> {
    // SAFETY: open/getdents64/close with our own buffer; entries are parsed
    // within the length the kernel returned.
    unsafe {
        let dir = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return Err(sys::errno());
        }
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n < 0 {
                let e = sys::errno();
                sys::close(dir);
                return Err(e);
            }
            if n == 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                let rec = buf.as_ptr().add(off);
                let reclen = u16::from_ne_bytes([*rec.add(16), *rec.add(17)]) as usize;
                let name = core::ffi::CStr::from_ptr(rec.add(19).cast());
                if let Some(v) = dec(name.to_bytes()) {
                    f(v, dir);
                }
                off += reclen.max(1);
            }
        }
        sys::close(dir);
    }
    Ok(())
}

/// readlink into `buf`; returns the target's length.
pub fn readlink(path: &core::ffi::CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: readlink writes at most buf.len() bytes into our buffer.
    let n = unsafe { libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0 && (n as usize) < buf.len()).then_some(n as usize)
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

/// Reads the pagemap entries of pages `[first, first + out.len())`.
pub fn read_pagemap(fd: i32, first_page: u64, out: &mut [u64]) -> bool {
    let bytes = out.len() * 8;
    let mut done = 0usize;
    while done < bytes {
        // SAFETY: pread into our own buffer.
        let n = unsafe {
            libc::pread(
                fd,
                out.as_mut_ptr().cast::<u8>().add(done).cast(),
                bytes - done,
                (first_page * 8 + done as u64) as i64,
            )
        };
        if n <= 0 {
            if n < 0 && sys::errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

/// Whether a page must be saved: modified private data (present and not
/// a page of the file, i.e. copied on write or anonymous) or swapped out.
pub fn page_is_private_data(entry: u64) -> bool {
    (entry & PM_PRESENT != 0 && entry & PM_FILE == 0) || entry & PM_SWAP != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let l = parse_map_line(
            b"7ffff7dd3000-7ffff7df9000 r-xp 00028000 fe:01 1311786                    /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(l.start, 0x7ffff7dd3000);
        assert_eq!(l.end, 0x7ffff7df9000);
        assert_eq!(l.prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert!(!l.shared);
        assert_eq!(l.offset, 0x28000);
        assert_eq!(l.dev, (0xfe << 32) | 1);
        assert_eq!(l.inode, 1311786);
        assert_eq!(l.path, b"/usr/lib/x86_64-linux-gnu/libc.so.6");
        let a = parse_map_line(b"7ffff7fc1000-7ffff7fc3000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(a.path, b"");
        let s = parse_map_line(
            b"7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0                          [stack]",
        )
        .unwrap();
        assert_eq!(s.path, b"[stack]");
        assert!(parse_map_line(b"garbage").is_none());
    }
}
