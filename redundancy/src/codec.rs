//! Parity arithmetic on the stripes of a [`GroupLayout`]: encoding one parity
//! shard, rebuilding the missing shards of a stripe, and cutting a blob into
//! its padded chunks and joining them back.
//!
//! XOR is done here on u64 words, which the compiler vectorizes. Reed-Solomon
//! uses `reed-solomon-erasure` with `simd-accel`, which builds its C kernel
//! with the installed gcc; that build passes `-march=haswell` (AVX2) unless
//! `RUST_REED_SOLOMON_ERASURE_ARCH` names another target, so set it when
//! building for older x86-64 CPUs.

use std::borrow::Cow;

use reed_solomon_erasure::galois_8;

use crate::layout::{Code, GroupLayout};
use crate::RedundancyError;

/// Shards that do not fit the stripe they are given for.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("a stripe of this group has {expected} shards, {got} were given")]
    WrongShardCount { expected: usize, got: usize },
    #[error("the shards of a stripe differ in length ({0} and {1} bytes)")]
    UnequalShards(usize, usize),
    #[error(
        "parity index {index} out of range: stripes of this group have {parity} parity shards"
    )]
    NoSuchParity { index: usize, parity: usize },
    #[error(
        "stripe lost {missing} of its {total} shards, its parity rebuilds at most {tolerated}"
    )]
    TooManyLost {
        missing: usize,
        total: usize,
        tolerated: usize,
    },
    #[error("reed-solomon: {0}")]
    ReedSolomon(reed_solomon_erasure::Error),
}

/// The common length of `shards`, ignoring missing ones; 0 if all are missing.
fn common_len<'a>(mut shards: impl Iterator<Item = &'a [u8]>) -> Result<usize, CodecError> {
    let Some(first) = shards.next().map(<[u8]>::len) else {
        return Ok(0);
    };
    match shards.find(|shard| shard.len() != first) {
        Some(other) => Err(CodecError::UnequalShards(first, other.len())),
        None => Ok(first),
    }
}

/// Parity shard `parity_index` (`0..m`) of a stripe whose `k` data chunks,
/// in stripe order, are `stripe_data`.
pub fn encode_parity(
    layout: &GroupLayout,
    stripe_data: &[&[u8]],
    parity_index: usize,
) -> Result<Vec<u8>, RedundancyError> {
    let len = common_len(stripe_data.iter().copied())?;
    // Zeroed allocations come straight from fresh pages; `encode_parity_into`
    // never reads `out`, so each page is faulted in once, by its first write.
    let mut out = vec![0u8; len];
    encode_parity_into(layout, stripe_data, parity_index, &mut out)?;
    Ok(out)
}

/// [`encode_parity`] into `out`, which must have the chunks' length: a holder
/// that keeps its parity buffers from one checkpoint to the next saves the
/// page faults of a fresh allocation, which cost more than the encoding itself.
pub fn encode_parity_into(
    layout: &GroupLayout,
    stripe_data: &[&[u8]],
    parity_index: usize,
    out: &mut [u8],
) -> Result<(), RedundancyError> {
    let (expected, parity) = (layout.data_shards(), layout.parity_shards());
    if stripe_data.len() != expected {
        return Err(CodecError::WrongShardCount {
            expected,
            got: stripe_data.len(),
        }
        .into());
    }
    if parity_index >= parity {
        return Err(CodecError::NoSuchParity {
            index: parity_index,
            parity,
        }
        .into());
    }
    let len = common_len(stripe_data.iter().copied().chain([&*out]))?;
    let (first, rest) = stripe_data
        .split_first()
        .expect("a stripe has at least one data shard");
    match &layout.code {
        // The first chunk overwrites `out` rather than being combined into it.
        Code::Xor => {
            out.copy_from_slice(first);
            rest.iter().for_each(|chunk| xor_into(out, chunk));
        }
        // The SIMD kernel indexes the first byte: an empty stripe is all done.
        Code::ReedSolomon { .. } if len == 0 => {}
        Code::ReedSolomon { parity_rows, .. } => {
            let row = &parity_rows[parity_index];
            galois_8::mul_slice(row[0], first, out);
            for (&coefficient, chunk) in row[1..].iter().zip(rest) {
                galois_8::mul_slice_xor(coefficient, chunk, out);
            }
        }
    }
    Ok(())
}

/// `acc ^= src`, 8 bytes at a time. Both have the same length.
fn xor_into(acc: &mut [u8], src: &[u8]) {
    let mut acc_words = acc.chunks_exact_mut(8);
    let mut src_words = src.chunks_exact(8);
    for (a, s) in (&mut acc_words).zip(&mut src_words) {
        let word =
            u64::from_ne_bytes(a.try_into().unwrap()) ^ u64::from_ne_bytes(s.try_into().unwrap());
        a.copy_from_slice(&word.to_ne_bytes());
    }
    for (a, s) in acc_words
        .into_remainder()
        .iter_mut()
        .zip(src_words.remainder())
    {
        *a ^= s;
    }
}

/// Rebuilds the missing (`None`) shards of one stripe in place, data and
/// parity alike, so that a restarted holder gets its parity back too.
/// `shards` are the `k` data shards in stripe order, then the `m` parity ones.
pub fn reconstruct(
    layout: &GroupLayout,
    shards: &mut [Option<Vec<u8>>],
) -> Result<(), RedundancyError> {
    let (total, tolerated) = (layout.members(), layout.parity_shards());
    if shards.len() != total {
        return Err(CodecError::WrongShardCount {
            expected: total,
            got: shards.len(),
        }
        .into());
    }
    let len = common_len(shards.iter().flatten().map(Vec::as_slice))?;
    let missing = shards.iter().filter(|shard| shard.is_none()).count();
    if missing > tolerated {
        return Err(CodecError::TooManyLost {
            missing,
            total,
            tolerated,
        }
        .into());
    }
    match &layout.code {
        _ if missing == 0 => {}
        // Empty chunks (empty blobs) are valid, but the RS crate refuses them.
        _ if len == 0 => shards
            .iter_mut()
            .for_each(|shard| *shard = Some(shard.take().unwrap_or_default())),
        Code::Xor => {
            // The XOR of all the shards of a stripe is zero, so the one missing
            // shard is the XOR of the others, whichever of them is the parity.
            let mut rebuilt = vec![0u8; len];
            shards
                .iter()
                .flatten()
                .for_each(|shard| xor_into(&mut rebuilt, shard));
            *shards
                .iter_mut()
                .find(|shard| shard.is_none())
                .expect("one shard missing") = Some(rebuilt);
        }
        Code::ReedSolomon { codec, .. } => {
            codec.reconstruct(shards).map_err(CodecError::ReedSolomon)?
        }
    }
    Ok(())
}

/// The `k` chunks of `blob`, each `chunk_len` long: borrowed where the blob
/// covers the whole chunk, zero padded copies for the tail.
///
/// # Panics
/// If `blob` is longer than `k * chunk_len`: its end would be silently lost.
pub fn split_blob(blob: &[u8], k: u32, chunk_len: u64) -> Vec<Cow<'_, [u8]>> {
    let chunk_len = chunk_len as usize;
    assert!(
        blob.len() <= k as usize * chunk_len,
        "blob of {} bytes does not fit {k} chunks of {chunk_len}",
        blob.len()
    );
    (0..k as usize)
        .map(|i| {
            let start = (i * chunk_len).min(blob.len());
            let part = &blob[start..(start + chunk_len).min(blob.len())];
            if part.len() == chunk_len {
                Cow::Borrowed(part)
            } else {
                let mut padded = part.to_vec();
                padded.resize(chunk_len, 0);
                Cow::Owned(padded)
            }
        })
        .collect()
}

/// The blob of `len` bytes that [`split_blob`] cut into `chunks`.
///
/// # Panics
/// If the chunks hold fewer than `len` bytes.
pub fn join_chunks<C: AsRef<[u8]>>(chunks: &[C], len: u64) -> Vec<u8> {
    let mut blob = Vec::with_capacity(len as usize);
    for chunk in chunks {
        let wanted = (len as usize - blob.len()).min(chunk.as_ref().len());
        blob.extend_from_slice(&chunk.as_ref()[..wanted]);
    }
    assert_eq!(blob.len() as u64, len, "chunks too short for the blob");
    blob
}
