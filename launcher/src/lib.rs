//! mome's launcher: `mome-run` runs a program as the ranks of a job (with
//! preflight checks, a private job directory, node agents, output
//! forwarding, and a coordinator that leaves nothing behind), `mome-status`
//! shows jobs, `mome-ckpt` checkpoints a running job and `mome-restart`
//! runs a job again from its last good checkpoint.
//!
//! Module map:
//! - [`preflight`]: what must hold before a job starts (program, kernel, limits);
//! - [`jobdir`]: creating the job directory and its private files;
//! - [`spawn`]: starting the agents (one per node) and the ranks;
//! - [`output`]: forwarding the ranks' stdout/stderr, tagged per rank;
//! - [`signals`]: signals as pollable events;
//! - [`control`]: the control socket (server and client);
//! - [`coordinator`]: the job's life, one event loop;
//! - [`checkpoint`]: checkpoint coordination (stamps, commit, periodic);
//! - [`pidns`]: pid pinning (mome-rankinit: a pid namespace per rank);
//! - [`restart`]: choosing the stamp a job restarts from;
//! - [`status`]: what mome-status shows;
//! - [`stores`]: where a job's checkpoints are (keepers' memory, disk) and
//!   which store each node of a stamp restores from;
//! - [`os`]: thin wrappers over process and fd system calls.

pub mod checkpoint;
pub mod control;
pub mod coordinator;
pub mod jobdir;
pub mod keepers;
pub mod os;
pub mod output;
pub mod parity;
pub mod pidns;
pub mod preflight;
pub mod restart;
pub mod signals;
pub mod spawn;
pub mod status;
pub mod stores;
