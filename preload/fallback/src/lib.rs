//! `libmome.so`: single-process versions of every function of `mome.h`.
//!
//! Programs written for mome link with `-lmome` so that the same binary also
//! runs natively, as one process: here `mome_nranks() == 1`, barriers and locks
//! return at once, and `MomeMMap` maps ordinary shared memory. Under
//! `mome-run`, `libmome_preload.so` is injected with `LD_PRELOAD`; it comes
//! first in the global symbol lookup scope, so its definitions of the same
//! symbols take precedence over the ones in this library, which is then never
//! called.
//!
//! Shared segments are emulated with one memfd per segment id: every
//! `MomeMMap` of segment `seg` maps that memfd, so two calls naming the same
//! segment see the same memory, as they do under mome. One difference: under
//! mome a segment lives at one fixed address of the DSM window and
//! `MomeMMap(NULL, ...)` always returns that address (plus `offset`); here
//! each call without `MAP_FIXED` returns a new view of the segment, at an
//! address chosen by the kernel. Programs must not rely on either.
//!
//! The Fortran 77 bindings (`momemmap_`, `mome_barrier_`, ...) take every
//! argument by reference; `INTEGER` is 4 bytes, `INTEGER*8` is 8 bytes.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Consistency models accepted by `MomeConsistency` (`MOME_STRONG` ..=
/// `MOME_WEAK` in `mome.h`).
const MOME_MODEL_MAX: libc::c_int = 2;

/// One emulated shared segment: the memfd holding its bytes and its size.
struct Segment {
    fd: libc::c_int,
    size: u64,
}

/// Segment id -> memfd. Segments live as long as the process.
static SEGMENTS: Mutex<BTreeMap<libc::c_int, Segment>> = Mutex::new(BTreeMap::new());
/// Lock ids currently held by this process.
static HELD_LOCKS: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
/// Number of barriers passed (the date returned by `mome_last_barrier_date`).
static BARRIER_DATE: AtomicU64 = AtomicU64::new(0);

/// Locks a table, recovering from poisoning (the tables stay consistent:
/// every update is a single insert or remove).
fn lock_table<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn errno() -> libc::c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn set_errno(e: libc::c_int) {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // valid for writes for the life of the thread.
    unsafe { *libc::__errno_location() = e };
}

/// Returns the memfd of segment `seg`, creating the segment if needed, grown
/// to at least `min_size` bytes.
fn segment_fd(seg: libc::c_int, min_size: u64) -> Result<libc::c_int, libc::c_int> {
    let mut table = lock_table(&SEGMENTS);
    let s = match table.entry(seg) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let name = format!("mome-seg-{seg}\0");
            // SAFETY: `name` is a NUL-terminated string that outlives the call.
            let fd = unsafe { libc::memfd_create(name.as_ptr().cast(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(errno());
            }
            e.insert(Segment { fd, size: 0 })
        }
    };
    if min_size > s.size {
        let Ok(len) = libc::off_t::try_from(min_size) else {
            return Err(libc::EFBIG);
        };
        // SAFETY: `s.fd` is a memfd this library created and never closes.
        if unsafe { libc::ftruncate(s.fd, len) } != 0 {
            return Err(errno());
        }
        s.size = min_size;
    }
    Ok(s.fd)
}

/// The work of `MomeMMap`: the mapped address, or an errno value.
///
/// # Safety
/// With `MAP_FIXED` in `flags`, whatever is mapped at `addr .. addr + len`
/// is replaced: the caller must own that range.
unsafe fn map_segment(
    addr: *mut c_void,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    seg: libc::c_int,
    offset: libc::off_t,
) -> Result<*mut c_void, libc::c_int> {
    let page = page_size(); // a power of two
    let fixed = flags & libc::MAP_FIXED != 0;
    if seg < 0 || len == 0 || offset < 0 {
        return Err(libc::EINVAL);
    }
    let offset = offset as u64;
    // A view must start on a page boundary of the memfd: without MAP_FIXED,
    // map from the page holding `offset` and return the address of `offset`
    // inside it; with MAP_FIXED the caller's page-aligned address must
    // correspond to a page-aligned offset.
    let lead = offset % page;
    if fixed && (addr.is_null() || (addr as u64) & (page - 1) != 0 || lead != 0) {
        return Err(libc::EINVAL);
    }
    let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
    let fd = segment_fd(seg, end)?;
    let map_len = usize::try_from(lead + len as u64).map_err(|_| libc::EINVAL)?;
    let map_off = libc::off_t::try_from(offset - lead).map_err(|_| libc::EINVAL)?;
    let (hint, mflags) = if fixed {
        (addr, libc::MAP_SHARED | libc::MAP_FIXED)
    } else {
        (std::ptr::null_mut(), libc::MAP_SHARED)
    };
    // SAFETY: `fd` is a valid memfd at least `offset + len` bytes long. With
    // MAP_FIXED the caller asked (as with mmap) for whatever is mapped at
    // `addr .. addr + len` to be replaced.
    let p = unsafe { libc::mmap(hint, map_len, prot, mflags, fd, map_off) };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    // `lead` < page size <= map_len, so the result stays inside the mapping.
    Ok(p.cast::<u8>().wrapping_add(lead as usize).cast())
}

/// Maps `len` bytes of shared segment `seg`, from byte `offset`, at `addr`
/// with `MAP_FIXED`, or where the kernel chooses otherwise. Returns the
/// address, or `MAP_FAILED` with `errno` set.
///
/// # Safety
/// With `MAP_FIXED`, whatever is mapped at `addr .. addr + len` is replaced,
/// exactly as with `mmap(2)`: the caller must own that range.
#[no_mangle]
pub unsafe extern "C" fn MomeMMap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    seg: libc::c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarded from the caller (see # Safety).
    match unsafe { map_segment(addr, len, prot, flags, seg, offset) } {
        Ok(p) => p,
        Err(e) => {
            set_errno(e);
            libc::MAP_FAILED
        }
    }
}

/// Selects the consistency model of a range: any valid model is accepted
/// (one process is always consistent). Returns 0, or `EINVAL` for an unknown
/// model.
///
/// # Safety
/// No memory is accessed; `addr` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn MomeConsistency(
    _addr: *mut c_void,
    _len: libc::size_t,
    model: libc::c_int,
) -> libc::c_int {
    if (0..=MOME_MODEL_MAX).contains(&model) {
        0
    } else {
        libc::EINVAL
    }
}

/// Nothing to synchronize in one process. Returns 0.
///
/// # Safety
/// No memory is accessed; `addr` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn MomeSyncMem(
    _addr: *mut c_void,
    _len: libc::size_t,
    _date: u64,
) -> libc::c_int {
    0
}

/// A barrier of one rank: returns at once, advancing the barrier date.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_barrier() -> libc::c_int {
    BARRIER_DATE.fetch_add(1, Ordering::SeqCst);
    0
}

/// Number of barriers this process has passed.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_last_barrier_date() -> u64 {
    BARRIER_DATE.load(Ordering::SeqCst)
}

/// Takes lock `id`: returns 0 at once, or `EDEADLK` if this process already
/// holds it (under mome a second `mome_lock` of a held lock would wait for
/// ever: locks are not recursive).
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_lock(id: u64) -> libc::c_int {
    if lock_table(&HELD_LOCKS).insert(id) {
        0
    } else {
        libc::EDEADLK
    }
}

/// Releases lock `id`: returns 0, or `EINVAL` if it is not held.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_unlock(id: u64) -> libc::c_int {
    if lock_table(&HELD_LOCKS).remove(&id) {
        0
    } else {
        libc::EINVAL
    }
}

/// Always rank 0.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_rank() -> libc::c_int {
    0
}

/// Always one rank.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_nranks() -> libc::c_int {
    1
}

/// Always node 0.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_node() -> libc::c_int {
    0
}

/// 0: not running under `mome-run`.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_active() -> libc::c_int {
    0
}

// ---- Shared malloc: one process shares with nobody, so plain malloc. ----

/// `malloc`.
///
/// # Safety
/// As `malloc`.
#[no_mangle]
pub unsafe extern "C" fn mome_shmalloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding to the C allocator.
    unsafe { libc::malloc(size) }
}

/// `calloc`.
///
/// # Safety
/// As `calloc`.
#[no_mangle]
pub unsafe extern "C" fn mome_shcalloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding to the C allocator.
    unsafe { libc::calloc(n, size) }
}

/// `realloc`.
///
/// # Safety
/// `p` is null or a block of `mome_shmalloc` (the C contract of realloc).
#[no_mangle]
pub unsafe extern "C" fn mome_shrealloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { libc::realloc(p, size) }
}

/// `free`.
///
/// # Safety
/// `p` is null or a block of `mome_shmalloc` (the C contract of free).
#[no_mangle]
pub unsafe extern "C" fn mome_shfree(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { libc::free(p) }
}

/// 0: no shared heaps without mome.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_shmalloc_footprint() -> usize {
    0
}

// ---- Fortran 77 bindings: by reference, trailing underscore. ----

/// `INTEGER FUNCTION MOMEMMAP(ADDR, LEN, PROT, FLAGS, SEG, OFFSET)`: maps
/// segment `SEG` at the address of `ADDR` (page-aligned; `MAP_FIXED` is
/// implied). Returns 0 or an errno value.
///
/// # Safety
/// `len`, `prot`, `flags`, `seg` and `offset` must point to readable
/// `INTEGER`s; the caller must own `addr .. addr + LEN`, which is replaced.
#[no_mangle]
pub unsafe extern "C" fn momemmap_(
    addr: *mut c_void,
    len: *const i32,
    prot: *const i32,
    flags: *const i32,
    seg: *const i32,
    offset: *const i32,
) -> i32 {
    // SAFETY: the caller passes every argument by reference (Fortran).
    let (len, prot, flags, seg, offset) = unsafe { (*len, *prot, *flags, *seg, *offset) };
    let Ok(len) = usize::try_from(len) else {
        return libc::EINVAL;
    };
    // SAFETY: forwarded from the caller, who owns the COMMON block at `addr`.
    let r = unsafe {
        map_segment(
            addr,
            len,
            prot,
            flags | libc::MAP_FIXED,
            seg,
            libc::off_t::from(offset),
        )
    };
    match r {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// `CALL MOME_BARRIER()`.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_barrier_() {
    // SAFETY: mome_barrier has no preconditions.
    unsafe { mome_barrier() };
}

/// `CALL MOME_LOCK(ID)`.
///
/// # Safety
/// `id` must point to a readable `INTEGER`.
#[no_mangle]
pub unsafe extern "C" fn mome_lock_(id: *const i32) {
    // SAFETY: the caller passes ID by reference (Fortran); mome_lock has no
    // preconditions.
    unsafe { mome_lock(i64::from(*id) as u64) };
}

/// `CALL MOME_UNLOCK(ID)`.
///
/// # Safety
/// `id` must point to a readable `INTEGER`.
#[no_mangle]
pub unsafe extern "C" fn mome_unlock_(id: *const i32) {
    // SAFETY: the caller passes ID by reference (Fortran); mome_unlock has no
    // preconditions.
    unsafe { mome_unlock(i64::from(*id) as u64) };
}

/// `INTEGER FUNCTION MOME_RANK()`.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_rank_() -> i32 {
    // SAFETY: mome_rank has no preconditions.
    unsafe { mome_rank() }
}

/// `INTEGER FUNCTION MOME_NRANKS()`.
///
/// # Safety
/// Always safe; `unsafe` only for uniformity with the C API.
#[no_mangle]
pub unsafe extern "C" fn mome_nranks_() -> i32 {
    // SAFETY: mome_nranks has no preconditions.
    unsafe { mome_nranks() }
}

/// `INTEGER FUNCTION MOMECONSISTENCY(ADDR, LEN, MODEL)`.
///
/// # Safety
/// `len` and `model` must point to readable `INTEGER`s.
#[no_mangle]
pub unsafe extern "C" fn momeconsistency_(
    addr: *mut c_void,
    len: *const i32,
    model: *const i32,
) -> i32 {
    // SAFETY: the caller passes LEN and MODEL by reference (Fortran).
    let (len, model) = unsafe { (*len, *model) };
    let Ok(len) = usize::try_from(len) else {
        return libc::EINVAL;
    };
    // SAFETY: MomeConsistency does not dereference `addr`.
    unsafe { MomeConsistency(addr, len, model) }
}

/// `INTEGER FUNCTION MOMESYNCMEM(ADDR, LEN, DATE)` (`DATE` is `INTEGER*8`).
///
/// # Safety
/// `len` must point to a readable `INTEGER` and `date` to an `INTEGER*8`.
#[no_mangle]
pub unsafe extern "C" fn momesyncmem_(addr: *mut c_void, len: *const i32, date: *const i64) -> i32 {
    // SAFETY: the caller passes LEN and DATE by reference (Fortran).
    let (len, date) = unsafe { (*len, *date) };
    let Ok(len) = usize::try_from(len) else {
        return libc::EINVAL;
    };
    // SAFETY: MomeSyncMem does not dereference `addr`.
    unsafe { MomeSyncMem(addr, len, date as u64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

    #[test]
    fn views_of_one_segment_share_memory() {
        // SAFETY: fresh mappings chosen by the kernel; accesses stay inside
        // them (8192 and 4096 bytes).
        unsafe {
            let a = MomeMMap(std::ptr::null_mut(), 8192, RW, 0, 100, 0).cast::<u8>();
            let b = MomeMMap(std::ptr::null_mut(), 8192, RW, 0, 100, 0).cast::<u8>();
            let c = MomeMMap(std::ptr::null_mut(), 4096, RW, 0, 100, 4096).cast::<u8>();
            let other = MomeMMap(std::ptr::null_mut(), 4096, RW, 0, 101, 0).cast::<u8>();
            assert!(![a, b, c, other].contains(&libc::MAP_FAILED.cast()));
            assert_ne!(a, b);
            *a.add(5000) = 42;
            assert_eq!(*b.add(5000), 42);
            assert_eq!(*c.add(5000 - 4096), 42);
            *other.add(10) = 7;
            assert_eq!(*a.add(10), 0);
            // An offset inside a page: the address of that byte.
            let d = MomeMMap(std::ptr::null_mut(), 16, RW, 0, 100, 5000).cast::<u8>();
            assert_eq!(*d, 42);
        }
    }

    #[test]
    fn map_fixed_and_fortran_binding() {
        // SAFETY: the fixed mappings replace pages of a region this test
        // reserved itself with mmap.
        unsafe {
            let region = libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                RW,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(region, libc::MAP_FAILED);
            let base = region.cast::<u8>();
            let a = MomeMMap(std::ptr::null_mut(), 4096, RW, 0, 102, 0).cast::<u8>();
            *a.add(100) = 9;
            let f = MomeMMap(base.add(4096).cast(), 4096, RW, libc::MAP_FIXED, 102, 0);
            assert_eq!(f, base.add(4096).cast());
            assert_eq!(*base.add(4096 + 100), 9);
            // Fortran: MAP_FIXED implied.
            let (len, prot, flags, seg, off) = (4096, RW, 0, 102, 0);
            assert_eq!(momemmap_(region, &len, &prot, &flags, &seg, &off), 0);
            assert_eq!(*base.add(100), 9);
            let misaligned = base.add(1).cast();
            assert_eq!(
                momemmap_(misaligned, &len, &prot, &flags, &seg, &off),
                libc::EINVAL
            );
            let zero = 0;
            assert_eq!(
                momemmap_(region, &zero, &prot, &flags, &seg, &off),
                libc::EINVAL
            );
            libc::munmap(region, 3 * 4096);
        }
    }

    #[test]
    fn bad_mappings_fail_with_einval() {
        // SAFETY: every call is expected to fail before mapping anything.
        unsafe {
            for (addr, len, flags, seg, off) in [
                (std::ptr::null_mut(), 4096, libc::MAP_FIXED, 103, 0),
                (std::ptr::null_mut(), 0, 0, 103, 0),
                (std::ptr::null_mut(), 4096, 0, -1, 0),
                (std::ptr::null_mut(), 4096, 0, 103, -4096),
            ] {
                let p = MomeMMap(addr, len, RW, flags, seg, off);
                assert_eq!(p, libc::MAP_FAILED);
                assert_eq!(errno(), libc::EINVAL);
            }
        }
    }

    #[test]
    fn locks_barriers_and_queries() {
        // SAFETY: none of these functions has preconditions; the Fortran
        // ones get references to live integers.
        unsafe {
            assert_eq!(mome_unlock(1_000_001), libc::EINVAL);
            assert_eq!(mome_lock(1_000_001), 0);
            assert_eq!(mome_lock(1_000_001), libc::EDEADLK);
            assert_eq!(mome_unlock(1_000_001), 0);
            assert_eq!(mome_unlock(1_000_001), libc::EINVAL);
            let id = 1_000_002;
            mome_lock_(&id);
            assert_eq!(mome_unlock(1_000_002), 0);

            let before = mome_last_barrier_date();
            assert_eq!(mome_barrier(), 0);
            mome_barrier_();
            assert!(mome_last_barrier_date() >= before + 2);

            let p = std::ptr::null_mut();
            assert_eq!(MomeConsistency(p, 1, 0), 0);
            assert_eq!(MomeConsistency(p, 1, 2), 0);
            assert_eq!(MomeConsistency(p, 1, 3), libc::EINVAL);
            let (len, model, bad, date) = (1, 1, -1, 0i64);
            assert_eq!(momeconsistency_(p, &len, &model), 0);
            assert_eq!(momeconsistency_(p, &len, &bad), libc::EINVAL);
            assert_eq!(MomeSyncMem(p, 1, 0), 0);
            assert_eq!(momesyncmem_(p, &len, &date), 0);

            assert_eq!((mome_rank(), mome_nranks(), mome_node()), (0, 1, 0));
            assert_eq!((mome_rank_(), mome_nranks_(), mome_active()), (0, 1, 0));
        }
    }
}
