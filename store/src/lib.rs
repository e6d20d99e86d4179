//! mome's checkpoint store: the files a checkpoint is made of, how they are
//! written so that a crash never leaves a half-committed stamp, and how they
//! are checked, read back and pruned.
//!
//! # Layout (names from [`mome_protocol::ckpt::files`])
//!
//! ```text
//! ROOT/node-K/SSSSSSSS.pages     page data node K wrote for stamp S (its increment)
//! ROOT/node-K/SSSSSSSS.index     node index: every non-zero page of node K as of S
//! ROOT/stamps/SSSSSSSS.manifest  present = stamp S committed
//! ```
//!
//! Pages are 4096 bytes ([`PAGE_SIZE`]); a page number is
//! `(window address - window base) / 4096`. A page absent from an index is
//! zero: zero pages are never stored.
//!
//! # Who calls what
//!
//! * Agent, checkpoint (background thread): [`write_increment`] with the
//!   last committed [`NodeIndex`] as base, the ranges that became holes, and
//!   the dirty pages in ascending order. It returns the new index (keep it:
//!   it is the base of the next increment once `Commit` arrives) and an
//!   [`IncrementSummary`] whose [`IndexRef`] goes into the `Durable` event.
//! * Launcher, commit: [`commit_manifest`] once every node is durable, then
//!   [`prune`]. Stamps: [`next_stamp`]; listing: [`list_committed`];
//!   checking before restart: [`verify`] (Quick or Full), then
//!   [`read_manifest`]; for mome-status: [`stamp_sizes`].
//! * Partial stores (a node's checkpoint memory, which holds the files of
//!   only some nodes, laid out as above, next to the manifests of every
//!   committed stamp): [`verify_node`] checks one node's share of a stamp
//!   in one store against the authoritative manifest (read from the disk
//!   root), so a restart can take each node from a different store;
//!   [`prune_held`] prunes such a store (nodes it does not hold are no
//!   error).
//! * Agent, restore: [`NodeIndex::load`] on `ROOT/<IndexRef::index>` (or
//!   `files::index_file`), then [`NodeIndex::lookup`] per page and
//!   [`BlockReader::read_block`] to get the block's pages;
//!   [`NodeIndex::blocks`] lists blocks in file order for prefetching.
//!
//! # Formats
//!
//! * Pages file: 32-byte header (`"MOMEPAGE"`, version u32, node u32, stamp
//!   u64, 8 reserved bytes), then blocks back to back. A block is 1..=64
//!   window-contiguous pages, lz4 block format (lz4_flex, no size prefix),
//!   or raw when lz4 does not shrink it ([`BlockRef::raw`]). Its
//!   [`BlockRef`] (in the index) holds its place, stored length and the
//!   xxh3-64 of the uncompressed pages, checked on every read.
//! * Index file: `"MOMEINDX"`, version u32, reserved u32, body length u64,
//!   postcard body, xxh3-64 trailer of all preceding bytes. The index is
//!   complete (not a delta); its blocks may be in older stamps' pages files.
//! * Manifest: pretty JSON `{"manifest": {...}, "xxh3": "hex"}`, the
//!   checksum taken over the compact JSON of the manifest object.
//!
//! # Crash safety and fsync
//!
//! Every write goes in this order: pages file (fsync), index (tmp, fsync,
//! rename, dir fsync), and, by the launcher after all nodes, manifest (same
//! atomic sequence). The manifest rename is the commit point: killed at any
//! moment, the store has either no manifest for the stamp or a complete
//! one. With `fsync: false` nothing is synced: the order still protects
//! against a killed process, not against a power failure. Leftovers of an
//! uncommitted stamp are removed by the next [`prune`] once a newer stamp is
//! committed; [`next_stamp`] never reuses their number.
//!
//! # Threads
//!
//! [`BlockReader`] is `Send + Sync` (positional reads, files opened once and
//! shared): one per node, shared by all restore threads. [`NodeIndex`] is
//! plain data (`Send + Sync`, read-only methods). Everything else is plain
//! functions on paths; two processes must not write the same stamp or prune
//! the same store at once (the launcher is the only writer of manifests).

mod block;
mod error;
mod fsutil;
mod increment;
mod index;
mod manifest;
mod prune;
mod verify;

pub use block::{BlockReader, BlockRef, BLOCK_PAGES, PAGES_HEADER_LEN, PAGE_SIZE};
pub use error::StoreError;
pub use increment::{write_increment, IncrementInput, IncrementSummary, IncrementWriter};
pub use index::{IndexRef, NodeIndex, RankImage};
pub use manifest::{commit_manifest, list_committed, next_stamp, read_manifest, Manifest};
pub use prune::{prune, prune_held, stamp_sizes, PruneSummary, StampSizes};
pub use verify::{verify, verify_node, NodeSummary, VerifyLevel, VerifySummary};

/// Re-exported so users need not depend on mome-protocol for it.
pub use mome_protocol::ckpt::Stamp;
