//! mome's launcher: `mome-run` runs a program as the ranks of a job (with
//! preflight checks, a private job directory, a node agent, output
//! forwarding, and a coordinator that leaves nothing behind), and
//! `mome-status` shows jobs.
//!
//! Module map:
//! - [`preflight`]: what must hold before a job starts (program, kernel, limits);
//! - [`jobdir`]: creating the job directory and its private files;
//! - [`spawn`]: starting the agent and the ranks;
//! - [`output`]: forwarding the ranks' stdout/stderr, tagged per rank;
//! - [`signals`]: signals as pollable events;
//! - [`control`]: the control socket (server and client);
//! - [`coordinator`]: the job's life, one event loop;
//! - [`status`]: what mome-status shows;
//! - [`os`]: thin wrappers over process and fd system calls.

pub mod control;
pub mod coordinator;
pub mod jobdir;
pub mod os;
pub mod output;
pub mod preflight;
pub mod signals;
pub mod spawn;
pub mod status;
