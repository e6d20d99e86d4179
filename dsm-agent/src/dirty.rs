//! Dirty-page tracking of a rank: PAGEMAP_SCAN over the window on the
//! rank's `/proc/<pid>/pagemap`, which reports the pages written since the
//! last scan and write-protects them again in the same pass.
//!
//! The rank registered the window with a WP_ASYNC userfaultfd: the kernel
//! resolves write faults on protected pages itself and clears the page's
//! uffd-wp bit, which is what `PAGE_IS_WRITTEN` reports. A page never
//! protected (first scan, or populated later without a marker) also counts
//! as written: the first scan of a rank reports every page it has mapped.

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use mome_protocol::layout::PAGE_SIZE;
use mome_protocol::WindowLayout;
use mome_uffd::pagemap::{self, PageRegion, Query};
use mome_uffd::UffdError;

/// Regions asked for per ioctl; the walk continues from where it stopped.
const REGIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty scan of {start:#x}..{end:#x} failed: {source}")]
    Scan {
        start: u64,
        end: u64,
        source: UffdError,
    },
    #[error("dirty scan made no progress at {0:#x}")]
    Stuck(u64),
}

/// Pages (numbers from the window base) of the addresses `range` (inside
/// the window) written since the last scan of this pagemap, appended to
/// `out`; re-arms write protection on them.
pub fn scan(
    pagemap_fd: BorrowedFd<'_>,
    layout: &WindowLayout,
    range: Range<u64>,
    out: &mut Vec<Range<u64>>,
) -> Result<(), DirtyError> {
    let query = Query {
        flags: pagemap::PM_SCAN_WP_MATCHING | pagemap::PM_SCAN_CHECK_WPASYNC,
        category_mask: pagemap::PAGE_IS_WRITTEN,
        return_mask: pagemap::PAGE_IS_WRITTEN,
        ..Query::default()
    };
    let mut regions = vec![PageRegion::default(); REGIONS];
    let (mut start, end) = (range.start.max(layout.base), range.end.min(layout.end()));
    while start < end {
        let (n, walk_end) = pagemap::scan(pagemap_fd.as_raw_fd(), start, end, query, &mut regions)
            .map_err(|source| DirtyError::Scan { start, end, source })?;
        for r in &regions[..n] {
            let (a, b) = (r.start.max(layout.base), r.end.min(end));
            if a < b {
                out.push((a - layout.base) / PAGE_SIZE..(b - layout.base).div_ceil(PAGE_SIZE));
            }
        }
        if walk_end >= end {
            break;
        }
        // The output vector filled up: go on from where the walk stopped.
        if walk_end <= start {
            return Err(DirtyError::Stuck(start));
        }
        start = walk_end;
    }
    Ok(())
}
