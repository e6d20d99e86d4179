//! libmome_preload.so: loaded with LD_PRELOAD into every rank of a mome job.
//!
//! Before `main`, its constructor connects the rank to its node agent, maps
//! the DSM window (the same addresses in every rank, `MAP_SHARED` on the
//! node's memfd), registers the window with userfaultfd and hands the
//! userfaultfds to the agent. From then on it is the process's allocator:
//! the malloc family, anonymous mmap and shm_open place memory in the window.
//! It starts no thread of its own.
//!
//! Files: `state` (modes, start-up), `agent` (the rank's sockets),
//! `bootstrap` (allocations before start-up), `pages` (page runs of heaps),
//! `malloc`, `mmap`, `segments` (shm and shared segments), `shmalloc`
//! (malloc in shared heaps, MomeMalloc), `api` (mome.h),
//! `ckpt` (checkpoint and restore of the rank's private state),
//! `fork`, `native` (glibc's definitions), `lock`, `sys` (raw syscalls),
//! `pthread` (process-shared pthread mutexes and barriers across nodes).

pub mod agent;
pub mod api;
pub mod bootstrap;
pub mod ckpt;
pub mod fork;
pub mod lock;
pub mod malloc;
pub mod mmap;
pub mod native;
pub mod pages;
pub mod pthread;
pub mod segments;
pub mod shmalloc;
pub mod signals;
pub mod state;
pub mod sys;

#[global_allocator]
static GLOBAL: malloc::PreloadGlobalAlloc = malloc::PreloadGlobalAlloc;

extern "C" fn mome_preload_init() {
    state::init();
}

/// Runs before the program's own constructors (a preloaded library's
/// initialisers run after libc's and before the executable's).
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = mome_preload_init;
