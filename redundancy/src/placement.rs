//! Which nodes keep redundancy for which: the [`Scheme`], its validation for
//! a job, mirror holders, parity groups, and the restart-time check that the
//! lost nodes can be rebuilt from what survives.
//!
//! # Groups (XOR and Reed-Solomon)
//!
//! Nodes `0..nodes` are cut into consecutive groups of the scheme's size
//! (`group` for XOR, `data + parity` for Reed-Solomon). A trailing remainder
//! smaller than the scheme's smallest group (2 for XOR, `data + parity` for
//! Reed-Solomon, so any RS remainder) joins the last group; a larger one is a
//! group of its own. Examples: XOR group 4 on 9 nodes gives `0..4, 4..9`, on
//! 10 nodes `0..4, 4..8, 8..10`; RS 2+1 on 7 nodes gives `0..3, 3..7`.
//!
//! A Reed-Solomon group enlarged this way keeps `parity` parity shards per
//! stripe and takes the extra nodes as data shards (`data = members -
//! parity`): it still survives any `parity` lost members, for a little less
//! memory per node. Joining instead of failing lets any job size use RS.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::RedundancyError;

/// The shards of a GF(2^8) Reed-Solomon code: data + parity <= 256.
pub const RS_MAX_GROUP: u32 = 256;

/// How each node's checkpoint data is kept redundantly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Full copies of a node's data on the next `copies` nodes.
    Mirror { copies: u32 },
    /// One XOR parity per stripe in groups of `group` nodes (Plank's 1-D parity).
    Xor { group: u32 },
    /// Reed-Solomon over GF(2^8) in groups of `data + parity` nodes.
    Rs { data: u32, parity: u32 },
}

/// A scheme that cannot protect a job of the given size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemeError {
    #[error("a job needs at least one node")]
    NoNodes,
    #[error("mirror needs at least 1 copy")]
    NoCopies,
    #[error("mirror needs at least 2 nodes to keep a copy off the node (the job has {0})")]
    MirrorAlone(u32),
    #[error("mirror keeps whole copies: it has no parity groups")]
    NoParityGroups,
    #[error("xor needs groups of at least 2 nodes")]
    XorGroupTooSmall,
    #[error("xor group ({group}) exceeds the nodes of the job ({nodes})")]
    XorGroupTooLarge { group: u32, nodes: u32 },
    #[error("rs needs at least 1 data and 1 parity shard (got {data}+{parity})")]
    RsEmptyPart { data: u32, parity: u32 },
    #[error("rs data+parity ({total}) exceeds the nodes of the job ({nodes})")]
    RsGroupTooLarge { total: u64, nodes: u32 },
    #[error("rs {data}+{parity} needs groups of at least data+parity nodes, not {members}")]
    RsGroupTooSmall {
        members: u32,
        data: u32,
        parity: u32,
    },
    #[error("rs group of {0} nodes exceeds the {RS_MAX_GROUP} shards of GF(2^8)")]
    RsTooManyShards(u32),
}

/// Checks that `scheme` can protect a job of `nodes` nodes.
pub fn validate(scheme: &Scheme, nodes: u32) -> Result<(), RedundancyError> {
    if nodes == 0 {
        return Err(SchemeError::NoNodes.into());
    }
    match *scheme {
        Scheme::Mirror { copies: 0 } => Err(SchemeError::NoCopies.into()),
        Scheme::Mirror { .. } if nodes < 2 => Err(SchemeError::MirrorAlone(nodes).into()),
        Scheme::Mirror { .. } => Ok(()),
        Scheme::Xor { group } if group < 2 => Err(SchemeError::XorGroupTooSmall.into()),
        Scheme::Xor { group } if group > nodes => {
            Err(SchemeError::XorGroupTooLarge { group, nodes }.into())
        }
        Scheme::Xor { .. } => Ok(()),
        Scheme::Rs { data, parity } if data == 0 || parity == 0 => {
            Err(SchemeError::RsEmptyPart { data, parity }.into())
        }
        Scheme::Rs { data, parity } if u64::from(data) + u64::from(parity) > u64::from(nodes) => {
            let total = u64::from(data) + u64::from(parity);
            Err(SchemeError::RsGroupTooLarge { total, nodes }.into())
        }
        Scheme::Rs { .. } => match groups(scheme, nodes).iter().map(|g| g.len()).max() {
            Some(largest) if largest > RS_MAX_GROUP as usize => {
                Err(SchemeError::RsTooManyShards(largest as u32).into())
            }
            _ => Ok(()),
        },
    }
}

/// Mirror copies actually kept in a job of `nodes` nodes: a node cannot hold
/// its own copy, nor two copies of the same data, so at most `nodes - 1`.
pub fn effective_copies(copies: u32, nodes: u32) -> u32 {
    copies.min(nodes.saturating_sub(1))
}

/// The nodes holding copies of `node`'s data: `node+1, node+2, ...` (mod
/// `nodes`), [`effective_copies`] of them. Empty if `node` is not in the job.
pub fn mirror_holders(node: u32, nodes: u32, copies: u32) -> Vec<u32> {
    if node >= nodes {
        return Vec::new();
    }
    // u64: node + distance must not wrap before the modulo.
    (1..=u64::from(effective_copies(copies, nodes)))
        .map(|distance| ((u64::from(node) + distance) % u64::from(nodes)) as u32)
        .collect()
}

/// Parity shards per stripe and the group sizes of a parity scheme:
/// `(parity, nominal group size, smallest group accepted)`.
fn parity_geometry(scheme: &Scheme) -> Option<(u32, u32, u32)> {
    match *scheme {
        Scheme::Mirror { .. } => None,
        Scheme::Xor { group } => Some((1, group.max(2), 2)),
        Scheme::Rs { data, parity } => {
            let size = data.saturating_add(parity).max(1);
            Some((parity, size, size))
        }
    }
}

/// The consecutive groups of a parity scheme (see the module docs); empty for
/// mirror. Meaningful for a scheme that [`validate`]s; otherwise a job
/// smaller than one group is a single group.
pub(crate) fn groups(scheme: &Scheme, nodes: u32) -> Vec<Range<u32>> {
    let Some((_, size, smallest)) = parity_geometry(scheme) else {
        return Vec::new();
    };
    let mut groups: Vec<Range<u32>> = (0..nodes / size)
        .map(|g| g * size..(g + 1) * size)
        .collect();
    let remainder_start = nodes - nodes % size;
    match groups.last_mut() {
        _ if remainder_start == nodes => {}
        Some(last) if nodes - remainder_start < smallest => last.end = nodes,
        _ => groups.push(remainder_start..nodes),
    }
    groups
}

/// The members of `node`'s group, in order. Mirror has no groups: there it
/// is the node followed by its [`mirror_holders`]. Empty if `node` is not in
/// the job.
pub fn group_of(scheme: &Scheme, node: u32, nodes: u32) -> Vec<u32> {
    if let Scheme::Mirror { copies } = *scheme {
        let holders = mirror_holders(node, nodes, copies);
        return if node < nodes {
            [vec![node], holders].concat()
        } else {
            holders
        };
    }
    groups(scheme, nodes)
        .into_iter()
        .find(|group| group.contains(&node))
        .map_or_else(Vec::new, Vec::from_iter)
}

/// Whether every lost node's data can be rebuilt from the surviving nodes:
/// mirror needs a live holder per lost node, parity schemes at most `parity`
/// lost members per group. The error names each node that cannot be rebuilt
/// and why, joined by "; ".
pub fn recoverable(scheme: &Scheme, nodes: u32, lost: &[u32]) -> Result<(), String> {
    validate(scheme, nodes).map_err(|e| e.to_string())?;
    let lost: BTreeSet<u32> = lost.iter().copied().collect();
    let mut problems: Vec<String> = lost
        .range(nodes..)
        .map(|node| format!("node {node}: not in the job of {nodes} nodes"))
        .collect();
    if let Scheme::Mirror { copies } = *scheme {
        for &node in lost.range(..nodes) {
            let holders = mirror_holders(node, nodes, copies);
            if holders.iter().all(|holder| lost.contains(holder)) {
                problems.push(format!(
                    "node {node}: every holder of its copies is lost {holders:?}"
                ));
            }
        }
    }
    let tolerated = parity_geometry(scheme).map_or(0, |(parity, _, _)| parity as usize);
    for group in groups(scheme, nodes) {
        let lost_here: Vec<u32> = lost.range(group.clone()).copied().collect();
        if lost_here.len() > tolerated {
            problems.extend(lost_here.iter().map(|node| {
                format!(
                    "node {node}: its group {}..={} lost {} members {lost_here:?}, parity rebuilds at most {tolerated}",
                    group.start, group.end - 1, lost_here.len()
                )
            }));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Bytes a node holds for others per byte of its own data: the copies for
/// mirror, `parity / data` of the node's group for XOR (`1 / (members - 1)`)
/// and RS. Groups may differ in size (see the module docs): this is the
/// largest, the figure to size memory by.
pub fn overhead(scheme: &Scheme, nodes: u32) -> f64 {
    if let Scheme::Mirror { copies } = *scheme {
        return f64::from(effective_copies(copies, nodes));
    }
    let parity = parity_geometry(scheme).map_or(0, |(parity, _, _)| parity);
    groups(scheme, nodes)
        .iter()
        .map(|group| f64::from(parity) / f64::from((group.len() as u32).saturating_sub(parity)))
        .fold(0.0, f64::max)
}
