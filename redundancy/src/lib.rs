//! Where each node's checkpoint data is kept redundantly, and the parity codec.
//!
//! Step 4 of a checkpoint (see DESIGN.md, "Checkpoint") keeps every node's
//! increment somewhere else too, so that a restart on the surviving nodes can
//! rebuild the lost ones, as in SCR/FTI's partner, XOR and Reed-Solomon levels.
//! This crate decides the "where" and does the arithmetic; it does no I/O.
//!
//! * [`placement`]: the [`Scheme`], its validation for a job, mirror holders,
//!   parity groups and the restart-time [`recoverable`] check.
//! * [`layout`]: [`GroupLayout`], how the blobs of one parity group are cut
//!   into chunks and striped so that parity work and memory are spread evenly.
//! * [`codec`]: parity encoding and stripe reconstruction (XOR, Reed-Solomon),
//!   and splitting a blob into chunks and joining them back.
//!
//! Agent-side use for a parity scheme: `group_of` gives the node's group and
//! its index `i` in it, [`GroupLayout::new`] the geometry; the node sends its
//! chunk `c` to the parity holders of stripe [`GroupLayout::stripe_of_chunk`]
//! `(i, c)`; each holder runs [`encode_parity`] for the
//! [`GroupLayout::stripes_held_by`] itself. Restart: [`recoverable`] first,
//! then [`reconstruct`] per stripe and [`join_chunks`] per lost node.

pub mod codec;
pub mod layout;
pub mod placement;

pub use codec::{
    encode_parity, encode_parity_into, join_chunks, reconstruct, split_blob, CodecError,
};
pub use layout::GroupLayout;
pub use placement::{
    effective_copies, group_of, mirror_holders, overhead, recoverable, validate, Scheme,
    SchemeError,
};

/// Any error of this crate; the message is the module error's own.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RedundancyError {
    #[error(transparent)]
    Scheme(#[from] SchemeError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}
