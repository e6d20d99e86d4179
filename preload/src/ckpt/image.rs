//! The private image of a rank: what the checkpoint handler writes into the
//! rank's image heaps in the DSM window, and the restore path reads back.
//!
//! ```text
//! [Header][Region; nregions][FdRecord; nfds][strings][pad to page]
//! [page bitmaps][pad to page][saved pages, page aligned, region by region]
//! ```
//!
//! Plain `repr(C)` records, written and read in place: the handler cannot
//! allocate, and the restore path reads them while libc is being replaced.
//! The image lives in the window, so the agent's page snapshot captures it
//! like any heap page (and incrementally: see `raw::put_if_changed`).

use super::context::Context;

pub const MAGIC: u64 = u64::from_le_bytes(*b"MOMEIMG1");
pub const VERSION: u32 = 1;
pub const MAX_SIGNALS: usize = 65;
pub const MAX_RLIMITS: usize = 16;
pub const PATH_MAX: usize = 4096;

/// Fixed offsets of the image's parts, so that an unchanged part lands on
/// the same pages at every checkpoint and stays clean.
pub const OFF_REGIONS: usize = 16 << 10;
pub const OFF_FDS: usize = 512 << 10;
pub const OFF_STRINGS: usize = 576 << 10;
pub const OFF_BITMAPS: usize = 1 << 20;
pub const OFF_DATA: usize = 2 << 20;
pub const MAX_REGIONS: usize = (OFF_FDS - OFF_REGIONS) / core::mem::size_of::<Region>();
pub const MAX_FDS: usize = (OFF_STRINGS - OFF_FDS) / core::mem::size_of::<FdRecord>();
pub const STRINGS_CAP: usize = OFF_BITMAPS - OFF_STRINGS;
pub const BITMAPS_CAP: usize = OFF_DATA - OFF_BITMAPS;

/// Tail of an image run: scratch space of the handler and of the restore
/// path, never part of the image. From the end of the run backwards: the
/// restore stack, pagemap entries, the metadata being built, maps text.
pub const TAIL_STACK: usize = 1 << 20;
pub const TAIL_PAGEMAP: usize = 256 << 10;
pub const TAIL_META: usize = OFF_DATA;
pub const TAIL_MAPS: usize = 1 << 20;
pub const TAIL: usize = TAIL_STACK + TAIL_PAGEMAP + TAIL_META + TAIL_MAPS;

/// The kernel's `struct sigaction` for rt_sigaction (not glibc's).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Rlimit {
    pub cur: u64,
    pub max: u64,
}

#[repr(C)]
pub struct Header {
    pub magic: u64,
    pub version: u32,
    pub nregions: u32,
    pub nfds: u32,
    /// Nonzero once the image is complete (written last).
    pub complete: u32,
    /// Bytes of the image, header to last saved page.
    pub total_len: u64,
    /// Bytes of the heap run holding the image (its tail is scratch space
    /// and the restore path's temporary stack).
    pub run_bytes: u64,
    pub ctx: Context,
    pub fs_base: u64,
    pub brk: u64,
    /// Signal mask inside the checkpoint handler.
    pub handler_mask: u64,
    pub pid: i32,
    pub rank: u32,
    /// The preload's own descriptors, to be re-created at the same numbers.
    pub mem_fd: i32,
    pub sync_fd: i32,
    pub memfd: i32,
    pub shared_uffd: i32,
    pub vdso: u64,
    pub vvar: u64,
    /// The executable (/proc/self/exe) that was checkpointed: a restarted
    /// rank that first runs a wrapper (a script, `env`) restores only once
    /// it has exec'd this one.
    pub exe_dev: u64,
    pub exe_inode: u64,
    pub regions_off: u64,
    pub fds_off: u64,
    pub strings_off: u64,
    pub bitmaps_off: u64,
    pub data_off: u64,
    pub sigactions: [KernelSigaction; MAX_SIGNALS],
    pub rlimits: [Rlimit; MAX_RLIMITS],
    pub cwd: [u8; PATH_MAX],
}

pub mod kind {
    /// Private anonymous memory (TLS, ld.so's early allocations...).
    pub const ANON: u32 = 0;
    /// A private mapping of a file (a library or the executable, or a file
    /// the program mapped): pages it modified (copy-on-write) are saved.
    pub const FILE: u32 = 1;
    /// The main thread's stack.
    pub const STACK: u32 = 2;
    /// The program break area.
    pub const HEAP: u32 = 3;
    /// A shared mapping of a file: mapped again, nothing saved (the data is
    /// in the file).
    pub const FILE_SHARED: u32 = 4;
    /// A view of the node's memory file outside the window (MomeMMap with
    /// MAP_FIXED): mapped again on the new memfd, its data is in the window.
    pub const ALIAS: u32 = 5;
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub kind: u32,
    pub file_offset: u64,
    pub path_off: u32,
    pub path_len: u32,
    pub dev: u64,
    pub inode: u64,
    /// File size and mtime when the image was taken (a changed library is
    /// refused at restore).
    pub file_size: u64,
    pub file_mtime: i64,
    /// Bitmap of saved pages (1 bit per page), from the image start.
    pub bitmap_off: u64,
    /// First saved page, from the image start; saved pages are contiguous.
    pub data_off: u64,
    pub saved_pages: u64,
}

pub mod fd_kind {
    /// 0, 1, 2: left as the restarted rank gets them (new output pipes).
    pub const STDIO: u32 = 0;
    pub const FILE: u32 = 1;
    pub const DIR: u32 = 2;
    pub const CHAR: u32 = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct FdRecord {
    pub fd: i32,
    pub flags: i32,
    pub offset: i64,
    pub kind: u32,
    pub path_off: u32,
    pub path_len: u32,
    pub cloexec: u32,
}

impl Header {
    /// # Safety
    /// `base` must point to a complete image.
    pub unsafe fn regions<'a>(&self, base: *const u8) -> &'a [Region] {
        // SAFETY: guaranteed by the caller: the table is inside the image.
        unsafe {
            core::slice::from_raw_parts(
                base.add(self.regions_off as usize).cast(),
                self.nregions as usize,
            )
        }
    }

    /// # Safety
    /// As [`Header::regions`].
    pub unsafe fn fds<'a>(&self, base: *const u8) -> &'a [FdRecord] {
        // SAFETY: guaranteed by the caller.
        unsafe {
            core::slice::from_raw_parts(base.add(self.fds_off as usize).cast(), self.nfds as usize)
        }
    }

    /// # Safety
    /// As [`Header::regions`]; `off`/`len` from a record of this image.
    pub unsafe fn string<'a>(&self, base: *const u8, off: u32, len: u32) -> &'a [u8] {
        // SAFETY: guaranteed by the caller.
        unsafe {
            core::slice::from_raw_parts(
                base.add(self.strings_off as usize + off as usize),
                len as usize,
            )
        }
    }
}

/// Bit `i` of a bitmap at `p`.
///
/// # Safety
/// `p` valid for `i / 8 + 1` bytes.
pub unsafe fn bit(p: *const u8, i: u64) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe { *p.add((i / 8) as usize) & (1 << (i % 8)) != 0 }
}
