//! Parity schemes (xor, rs) of diskless checkpoints: instead of whole
//! copies, each member of a parity group keeps parity shards of the others'
//! checkpoint data (Plank's diskless checkpointing with the stripes rotated
//! over the group, as SCR's XOR and Reed-Solomon levels do).
//!
//! A member's "blob" for stamp S is its pages file followed by its index
//! (both complete: parity stamps are full checkpoints, so a blob never
//! needs an older stamp's files). The members first tell each other their
//! file sizes ([`PeerMsg::ParityInfo`]), which fixes the common chunk
//! length; then each sends every chunk of its blob to the parity holders of
//! the chunk's stripe ([`PeerMsg::ParityChunk`]). A holder accumulates its
//! parity shard as pieces arrive (parity is linear: the shard of a stripe
//! is the XOR of each data shard's contribution), writes it into its memory
//! store under `parity/`, with the group's sizes in `parity/S.meta`, and
//! answers every member that contributed ([`PeerMsg::StoreHeld`]).
//!
//! The layout and the codes are `mome_redundancy`'s; mome-restart decodes a
//! lost member's blob from the survivors' blobs and shards
//! (launcher/src/parity.rs).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use mome_protocol::ckpt::{files, ParityPlan, Stamp};
use mome_protocol::peer::{PeerMsg, MAX_STORE_CHUNK};
use mome_redundancy::{GroupLayout, Scheme};
use serde::{Deserialize, Serialize};

use crate::agent::{lock, Agent};

/// What a holder writes next to its shards: enough to decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParityMeta {
    pub stamp: Stamp,
    pub members: Vec<u32>,
    pub xor: bool,
    pub parity: u32,
    pub chunk_len: u64,
    /// (pages file length, index length) of each member, in group order.
    pub lens: Vec<(u64, u64)>,
}

/// Directory of parity shards in a memory store.
pub fn parity_dir(root: &Path) -> std::path::PathBuf {
    root.join("parity")
}

/// File of parity shard `p` of stripe `stripe` of stamp `stamp`.
pub fn shard_file(root: &Path, stamp: Stamp, stripe: usize, p: usize) -> std::path::PathBuf {
    parity_dir(root).join(format!("{stamp:08}.s{stripe}.p{p}"))
}

/// The group's sizes, as written by every holder.
pub fn meta_file(root: &Path, stamp: Stamp) -> std::path::PathBuf {
    parity_dir(root).join(format!("{stamp:08}.meta"))
}

/// The stripe layout of a plan.
pub fn layout_of(plan: &ParityPlan) -> Result<GroupLayout, String> {
    let n = plan.members.len() as u32;
    let scheme = if plan.xor {
        Scheme::Xor { group: n }
    } else {
        Scheme::Rs {
            data: n.saturating_sub(plan.parity),
            parity: plan.parity,
        }
    };
    GroupLayout::new(&scheme, n).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error("parity group: {0}")]
    Plan(String),
    #[error("cannot read {0} to stripe it: {1}")]
    Read(String, std::io::Error),
    #[error("no size from node(s) {nodes:?} of the parity group within {timeout:?}")]
    NoInfo { nodes: Vec<u32>, timeout: Duration },
    #[error("node {node} cannot hold its parity: {reason}")]
    Holder { node: u32, reason: String },
    #[error("node {0} failed during the parity exchange")]
    HolderFailed(u32),
    #[error("{0}")]
    Answer(#[from] crate::replicate::ReplicateError),
}

/// (pages file, index) lengths of each member node.
type GroupSizes = BTreeMap<u32, (u64, u64)>;

/// A parity shard being accumulated.
#[derive(Debug)]
struct Accum {
    stamp: Stamp,
    stripe: usize,
    p: usize,
    buf: Vec<u8>,
    /// Bytes received from each contributing member (group index).
    got: BTreeMap<usize, u64>,
}

/// Parity state of one agent.
#[derive(Debug, Default)]
pub struct Parity {
    /// Sizes heard from the group, by stamp then member node.
    infos: Mutex<HashMap<Stamp, GroupSizes>>,
    heard: Condvar,
    /// The plan of each stamp this node takes part in (from its own
    /// Checkpoint command).
    plans: Mutex<HashMap<Stamp, ParityPlan>>,
    accums: Mutex<Vec<Accum>>,
    /// Stripes completed per stamp (to answer once all this node holds are).
    done: Mutex<HashMap<Stamp, usize>>,
}

/// Takes part in stamp `stamp`'s parity exchange: sends this node's
/// chunks and waits until every holder of them has its shards.
pub fn exchange(
    agent: &Agent,
    root: &Path,
    stamp: Stamp,
    plan: &ParityPlan,
    timeout: Duration,
) -> Result<u64, ParityError> {
    let cluster = agent
        .cluster
        .as_ref()
        .ok_or_else(|| ParityError::Plan("needs several nodes".into()))?;
    let mesh = &cluster.mesh;
    let me = agent.id.node;
    let layout = layout_of(plan).map_err(ParityError::Plan)?;
    let my_idx = plan
        .members
        .iter()
        .position(|&n| n == me)
        .ok_or_else(|| ParityError::Plan(format!("node {me} is not in its group")))?;
    let parity = &cluster.parity;
    // One checkpoint at a time: what older stamps left goes. This stamp's
    // plan stays after this node's own exchange, while it still receives
    // the other members' chunks for the shards it holds.
    {
        let mut plans = lock(&parity.plans);
        plans.clear();
        plans.insert(stamp, plan.clone());
    }
    lock(&parity.infos).retain(|&s, _| s >= stamp);
    lock(&parity.accums).retain(|a| a.stamp >= stamp);
    lock(&parity.done).retain(|&s, _| s >= stamp);
    // The holders of this node's chunks answer with StoreHeld (through
    // `replicate`), possibly before the last piece leaves here: waited for
    // from now on.
    let mut holders: Vec<u32> = (0..layout.data_shards())
        .flat_map(|c| layout.parity_holders(layout.stripe_of_chunk(my_idx, c)))
        .map(|i| plan.members[i])
        .collect();
    holders.sort_unstable();
    holders.dedup();
    let answers = crate::replicate::expect(agent, stamp, &holders);
    let pages = files::pages_file(root, me, stamp);
    let index = files::index_file(root, me, stamp);
    let len_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (pages_len, index_len) = (len_of(&pages), len_of(&index));
    for &n in plan.members.iter().filter(|&&n| n != me) {
        mesh.send(
            n,
            PeerMsg::ParityInfo {
                source: me,
                stamp,
                pages_len,
                index_len,
            },
        );
    }
    info(agent, me, stamp, pages_len, index_len);
    // Every member's sizes: the chunk length is the group's.
    let deadline = Instant::now() + timeout;
    let lens: Vec<(u64, u64)> = {
        let mut infos = lock(&parity.infos);
        loop {
            let have = infos.get(&stamp);
            let missing: Vec<u32> = plan
                .members
                .iter()
                .copied()
                .filter(|n| !have.is_some_and(|h| h.contains_key(n)))
                .collect();
            if missing.is_empty() {
                let have = &infos[&stamp];
                break plan.members.iter().map(|n| have[n]).collect();
            }
            if let Some(&n) = missing.iter().find(|&&n| mesh.failed(n)) {
                return Err(ParityError::HolderFailed(n));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ParityError::NoInfo {
                    nodes: missing,
                    timeout,
                });
            }
            infos = parity
                .heard
                .wait_timeout(infos, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    };
    let chunk_len = layout.chunk_len(&lens.iter().map(|(a, b)| a + b).collect::<Vec<_>>());
    // Every member is a holder: the group's sizes go next to its shards.
    write_meta(
        agent,
        &ParityMeta {
            stamp,
            members: plan.members.clone(),
            xor: plan.xor,
            parity: layout.parity_shards() as u32,
            chunk_len,
            lens,
        },
    )
    .map_err(|reason| ParityError::Holder { node: me, reason })?;
    // Each chunk to the parity holders of its stripe, piece by piece.
    let (pf, xf) = (File::open(&pages).ok(), File::open(&index).ok());
    let read_blob = |at: u64, out: &mut [u8]| -> Result<(), ParityError> {
        out.fill(0);
        // The blob is the pages file then the index; past both, zeros.
        let mut done = 0usize;
        while done < out.len() {
            let pos = at + done as u64;
            let (file, off, len, path) = if pos < pages_len {
                (pf.as_ref(), pos, pages_len - pos, &pages)
            } else if pos < pages_len + index_len {
                (
                    xf.as_ref(),
                    pos - pages_len,
                    pages_len + index_len - pos,
                    &index,
                )
            } else {
                break;
            };
            let n = (out.len() - done).min(len as usize);
            let Some(f) = file else {
                return Err(ParityError::Read(
                    path.display().to_string(),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            };
            f.read_exact_at(&mut out[done..done + n], off)
                .map_err(|e| ParityError::Read(path.display().to_string(), e))?;
            done += n;
        }
        Ok(())
    };
    let mut buf = vec![0u8; MAX_STORE_CHUNK];
    let mut sent = 0;
    for chunk in 0..layout.data_shards() {
        let stripe = layout.stripe_of_chunk(my_idx, chunk);
        let holders: Vec<u32> = layout
            .parity_holders(stripe)
            .into_iter()
            .map(|i| plan.members[i])
            .collect();
        let mut offset = 0u64;
        loop {
            let want = ((chunk_len - offset) as usize).min(MAX_STORE_CHUNK);
            read_blob(chunk as u64 * chunk_len + offset, &mut buf[..want])?;
            for &h in &holders {
                let piece = PeerMsg::ParityChunk {
                    source: me,
                    stamp,
                    chunk: chunk as u32,
                    offset,
                    total: chunk_len,
                    data: buf[..want].to_vec(),
                };
                if !mesh.send_paced(h, piece) {
                    return Err(ParityError::HolderFailed(h));
                }
                sent += want as u64;
            }
            offset += want as u64;
            if offset >= chunk_len {
                break;
            }
        }
    }
    // The holders answer once they have every member's chunks: the wait
    // starts when this node's last chunk left.
    crate::replicate::wait_answers(agent, answers, Instant::now() + timeout, timeout)?;
    Ok(sent)
}

/// A member's sizes.
pub fn info(agent: &Agent, source: u32, stamp: Stamp, pages_len: u64, index_len: u64) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    lock(&cluster.parity.infos)
        .entry(stamp)
        .or_default()
        .insert(source, (pages_len, index_len));
    cluster.parity.heard.notify_all();
}

/// A piece of member `source`'s chunk `chunk` for a shard this node holds.
#[allow(clippy::too_many_arguments)]
pub fn chunk(
    agent: &Agent,
    source: u32,
    stamp: Stamp,
    chunk: u32,
    offset: u64,
    total: u64,
    data: &[u8],
) {
    let Some(cluster) = agent.cluster.as_ref() else {
        return;
    };
    let parity = &cluster.parity;
    let Some(plan) = lock(&parity.plans).get(&stamp).cloned() else {
        log!("parity piece of node {source} for stamp {stamp}, which this node is not taking: ignored");
        return;
    };
    let me = agent.id.node;
    let (Ok(layout), Some(src_idx), Some(my_idx)) = (
        layout_of(&plan),
        plan.members.iter().position(|&n| n == source),
        plan.members.iter().position(|&n| n == me),
    ) else {
        log!("parity piece of node {source} outside this node's group: ignored");
        return;
    };
    if chunk as usize >= layout.data_shards() {
        log!("parity piece of node {source}: chunk {chunk} does not exist: ignored");
        return;
    }
    let stripe = layout.stripe_of_chunk(src_idx, chunk as usize);
    let Some(&(_, p)) = layout
        .stripes_held_by(my_idx)
        .iter()
        .find(|(s, _)| *s == stripe)
    else {
        log!("parity piece of node {source} for stripe {stripe}, which this node does not hold: ignored");
        return;
    };
    let Some(d) = layout
        .data_of_stripe(stripe)
        .iter()
        .position(|&(m, _)| m == src_idx)
    else {
        return;
    };
    // This piece's share of the shard: alone in its stripe (the others
    // zero), encoded; parity being linear, the shard is the XOR of all.
    let contribution = if plan.xor {
        data.to_vec()
    } else {
        let zeros = vec![0u8; data.len()];
        let slices: Vec<&[u8]> = (0..layout.data_shards())
            .map(|i| if i == d { data } else { &zeros[..] })
            .collect();
        match mome_redundancy::encode_parity(&layout, &slices, p) {
            Ok(v) => v,
            Err(e) => {
                log!("parity of stripe {stripe}: {e}");
                return;
            }
        }
    };
    let mut accums = lock(&parity.accums);
    let pos = match accums
        .iter()
        .position(|a| a.stamp == stamp && a.stripe == stripe && a.p == p)
    {
        Some(i) => i,
        None => {
            accums.push(Accum {
                stamp,
                stripe,
                p,
                buf: vec![0u8; total as usize],
                got: BTreeMap::new(),
            });
            accums.len() - 1
        }
    };
    let a = &mut accums[pos];
    let end = (offset as usize + contribution.len()).min(a.buf.len());
    for (x, y) in a.buf[offset as usize..end].iter_mut().zip(&contribution) {
        *x ^= y;
    }
    *a.got.entry(src_idx).or_default() += data.len() as u64;
    let complete = a.got.len() == layout.data_shards() && a.got.values().all(|&g| g == total);
    if !complete {
        return;
    }
    let a = accums.remove(pos);
    drop(accums);
    let error = store_shard(agent, stamp, &a).err();
    let held = layout.stripes_held_by(my_idx).len();
    let finished = {
        let mut done = lock(&parity.done);
        let d = done.entry(stamp).or_default();
        *d += 1;
        *d >= held
    };
    if finished || error.is_some() {
        lock(&parity.done).remove(&stamp);
        // Every member that contributed to a shard this node holds.
        let mut to: Vec<u32> = layout
            .stripes_held_by(my_idx)
            .iter()
            .flat_map(|&(s, _)| layout.data_of_stripe(s))
            .map(|(m, _)| plan.members[m])
            .collect();
        to.sort_unstable();
        to.dedup();
        for n in to {
            cluster.mesh.send(
                n,
                PeerMsg::StoreHeld {
                    source: n,
                    stamp,
                    error: error.clone(),
                },
            );
        }
    }
}

/// The group's sizes of a stamp, next to the shards.
fn write_meta(agent: &Agent, meta: &ParityMeta) -> Result<(), String> {
    let root = agent
        .id
        .mem_store
        .as_ref()
        .ok_or("this node has no memory store")?;
    let text = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
    crate::replicate::write_whole(&meta_file(root, meta.stamp), &text)
}

/// Writes a complete shard into the memory store.
fn store_shard(agent: &Agent, stamp: Stamp, a: &Accum) -> Result<(), String> {
    let root = agent
        .id
        .mem_store
        .as_ref()
        .ok_or("this node has no memory store")?;
    crate::replicate::write_whole(&shard_file(root, stamp, a.stripe, a.p), &a.buf)
}

/// Parity files of stamps that are no longer kept.
pub fn prune(root: &Path, kept: &[Stamp]) -> u64 {
    let Ok(dir) = std::fs::read_dir(parity_dir(root)) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stamp: Option<Stamp> = name.get(..8).and_then(|s| s.parse().ok());
        let newest = kept.iter().copied().max().unwrap_or(0);
        if let Some(s) = stamp {
            if s < newest && !kept.contains(&s) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}
