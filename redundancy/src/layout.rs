//! How the blobs of one parity group are cut into chunks and striped.
//!
//! A group of `n` members uses stripes of `k` data and `m` parity shards,
//! `n = k + m` (XOR: `m = 1`; RS: `m = parity`, `k = n - parity`, which is
//! `data` except in an enlarged last group). Each member's blob is cut into
//! `k` chunks of the group's common chunk length (zero padded). Stripe `j`
//! (`0..n`) takes chunk `c` of member `j + c` for `c in 0..k`, and its parity
//! shard `p` is held by member `j + k + p` (all mod `n`).
//!
//! Why rotate rather than give the parity to `m` fixed members: every member
//! holds exactly `m` parity shards and encodes as much as any other, so the
//! memory and CPU cost is the same on every node; and as every stripe spans
//! all `n` members, any `m` lost members cost each stripe at most `m` shards,
//! which its parity rebuilds, while `m + 1` lost members make every stripe
//! undecodable. Whole groups are therefore recoverable or not, never partly.

use reed_solomon_erasure::galois_8;

use crate::placement::{Scheme, SchemeError, RS_MAX_GROUP};
use crate::RedundancyError;

/// Stripe geometry of one parity group, and the code that computes its parity.
#[derive(Debug, Clone)]
pub struct GroupLayout {
    members: usize,
    data: usize,
    parity: usize,
    pub(crate) code: Code,
}

#[derive(Debug, Clone)]
pub(crate) enum Code {
    Xor,
    /// `parity_rows[p][i]` is the GF(2^8) coefficient of data shard `i` in
    /// parity shard `p`: kept so that a holder computes only its own parity
    /// shard, not all `m` of them as `ReedSolomon::encode` would.
    ReedSolomon {
        // Boxed: the codec (with its decode-matrix cache) is large next to `Xor`.
        codec: Box<galois_8::ReedSolomon>,
        parity_rows: Vec<Vec<u8>>,
    },
}

impl GroupLayout {
    /// The layout of a group of `members` nodes under `scheme`.
    pub fn new(scheme: &Scheme, members: u32) -> Result<Self, RedundancyError> {
        let (parity, code) = match *scheme {
            Scheme::Mirror { .. } => return Err(SchemeError::NoParityGroups.into()),
            Scheme::Xor { .. } if members < 2 => return Err(SchemeError::XorGroupTooSmall.into()),
            Scheme::Xor { .. } => (1, Code::Xor),
            Scheme::Rs { data, parity } if data == 0 || parity == 0 => {
                return Err(SchemeError::RsEmptyPart { data, parity }.into())
            }
            Scheme::Rs { data, parity }
                if u64::from(members) < u64::from(data) + u64::from(parity) =>
            {
                return Err(SchemeError::RsGroupTooSmall {
                    members,
                    data,
                    parity,
                }
                .into())
            }
            Scheme::Rs { .. } if members > RS_MAX_GROUP => {
                return Err(SchemeError::RsTooManyShards(members).into())
            }
            Scheme::Rs { parity, .. } => (
                parity as usize,
                rs_code(members as usize - parity as usize, parity as usize),
            ),
        };
        let members = members as usize;
        Ok(Self {
            members,
            data: members - parity,
            parity,
            code,
        })
    }

    /// Members of the group, `n`; also its number of stripes.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Data shards per stripe, `k`: the chunks each member's blob is cut into.
    pub fn data_shards(&self) -> usize {
        self.data
    }

    /// Parity shards per stripe, `m`: the members the group can lose.
    pub fn parity_shards(&self) -> usize {
        self.parity
    }

    /// The common chunk length of the group: `ceil(longest blob / k)`.
    pub fn chunk_len(&self, blob_lens: &[u64]) -> u64 {
        blob_lens
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .div_ceil(self.data as u64)
    }

    /// `(stripe, parity index)` of each of the `m` parity shards `member` holds.
    pub fn stripes_held_by(&self, member: usize) -> Vec<(usize, usize)> {
        if member >= self.members {
            return Vec::new();
        }
        // k + p < n, so adding n keeps the difference from underflowing.
        (0..self.parity)
            .map(|p| ((member + self.members - self.data - p) % self.members, p))
            .collect()
    }

    /// `(member, chunk index of that member)` of the `k` data shards of `stripe`, in order.
    pub fn data_of_stripe(&self, stripe: usize) -> Vec<(usize, usize)> {
        if stripe >= self.members {
            return Vec::new();
        }
        (0..self.data)
            .map(|c| ((stripe + c) % self.members, c))
            .collect()
    }

    /// The members holding parity shards `0..m` of `stripe`, in order.
    pub fn parity_holders(&self, stripe: usize) -> Vec<usize> {
        if stripe >= self.members {
            return Vec::new();
        }
        (0..self.parity)
            .map(|p| (stripe + self.data + p) % self.members)
            .collect()
    }

    /// The stripe that chunk `chunk` (`0..k`) of `member` belongs to.
    pub fn stripe_of_chunk(&self, member: usize, chunk: usize) -> usize {
        debug_assert!(member < self.members && chunk < self.data);
        (member + self.members - chunk) % self.members
    }
}

/// The Reed-Solomon codec of a `data + parity` stripe and its parity rows.
fn rs_code(data: usize, parity: usize) -> Code {
    // The caller checked 1 <= data, 1 <= parity, data + parity <= 256: the
    // only conditions under which `new` and `encode` fail.
    let codec = galois_8::ReedSolomon::new(data, parity).expect("valid rs shard counts");
    let mut parity_rows = vec![vec![0u8; data]; parity];
    // Encoding the unit vector e_i yields column i of the parity rows.
    for i in 0..data {
        let mut shards = vec![vec![0u8; 1]; data + parity];
        shards[i][0] = 1;
        codec
            .encode(&mut shards)
            .expect("shards sized for the codec");
        for (row, shard) in parity_rows.iter_mut().zip(&shards[data..]) {
            row[i] = shard[0];
        }
    }
    Code::ReedSolomon {
        codec: Box::new(codec),
        parity_rows,
    }
}
