//! Restart of a job checkpointed with a parity scheme (xor, rs): the data
//! of a member of a parity group whose memory is gone is decoded from the
//! other members' data and the parity shards they hold (see
//! dsm-agent/src/parity.rs for how they were made), into a memory
//! directory (`/dev/shm`), from which that node restores like from any
//! other store. The decoded files are checked like every store's: the
//! index against the manifest's xxh3, every block against its own when read.
//!
//! On this single machine the survivors' stores are read through their
//! keepers' paths; across machines these reads would be network fetches
//! (not built: mome runs its nodes on one machine today).

use std::path::{Path, PathBuf};

use mome_protocol::ckpt::{files, Stamp};
use mome_protocol::config::{RedundancyConfig, SchemeName};
use mome_redundancy::{GroupLayout, Scheme};
use serde::Deserialize;

use crate::stores::StoreCandidate;

/// What every holder wrote next to its shards (dsm-agent's `ParityMeta`).
#[derive(Debug, Deserialize)]
struct Meta {
    members: Vec<u32>,
    chunk_len: u64,
    lens: Vec<(u64, u64)>,
}

/// Where the decoded data of a job's stamp goes (RAM).
pub fn decoded_dir(job_id: &str, stamp: Stamp) -> PathBuf {
    PathBuf::from(format!("/dev/shm/mome-{job_id}-decoded-{stamp}"))
}

/// Removes what [`decode_lost`] wrote for job `job_id`.
pub fn remove_decoded(job_id: &str) {
    let prefix = format!("mome-{job_id}-decoded-");
    if let Ok(dir) = std::fs::read_dir("/dev/shm") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The scheme `redundancy:` names; `None` for the disk store (no copies
/// in memory).
pub fn scheme(red: &RedundancyConfig) -> Option<Scheme> {
    match red.scheme {
        SchemeName::Mirror => Some(Scheme::Mirror { copies: red.copies }),
        SchemeName::Xor => Some(Scheme::Xor { group: red.group }),
        SchemeName::Rs => Some(Scheme::Rs {
            data: red.data,
            parity: red.parity,
        }),
        SchemeName::Disk => None,
    }
}

/// The parity scheme of a job, when it has a valid one.
fn scheme_of(red: &RedundancyConfig, nodes: u32) -> Option<Scheme> {
    scheme(red)
        .filter(|s| !matches!(s, Scheme::Mirror { .. }))
        .filter(|s| mome_redundancy::validate(s, nodes).is_ok())
}

/// A member's own files of `stamp` in its own store, as one blob.
fn own_blob(root: &Path, node: u32, stamp: Stamp) -> Option<Vec<u8>> {
    let index = std::fs::read(files::index_file(root, node, stamp)).ok()?;
    let pages = match std::fs::read(files::pages_file(root, node, stamp)) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(_) => return None,
    };
    let mut blob = pages;
    blob.extend_from_slice(&index);
    Some(blob)
}

/// Decodes, for stamp `stamp`, the data of every parity-group member whose
/// own memory store is not among `candidates`; returns the stores made
/// (none when the job has no parity scheme or nothing is lost), or why a
/// group cannot be decoded.
pub fn decode_lost(
    job_id: &str,
    red: &RedundancyConfig,
    nodes: u32,
    stamp: Stamp,
    candidates: &[StoreCandidate],
) -> Result<Vec<StoreCandidate>, String> {
    let Some(scheme) = scheme_of(red, nodes) else {
        return Ok(Vec::new());
    };
    let store_of = |node: u32| {
        candidates
            .iter()
            .find(|c| c.node == Some(node))
            .map(|c| c.root.clone())
    };
    let out = decoded_dir(job_id, stamp);
    let mut made = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for n in 0..nodes {
        let members = mome_redundancy::group_of(&scheme, n, nodes);
        if !seen.insert(members[0]) {
            continue;
        }
        let blobs: Vec<Option<Vec<u8>>> = members
            .iter()
            .map(|&m| store_of(m).and_then(|r| own_blob(&r, m, stamp)))
            .collect();
        let lost: Vec<usize> = (0..members.len()).filter(|&i| blobs[i].is_none()).collect();
        if lost.is_empty() {
            continue;
        }
        let group = format!("group {}", crate::coordinator::rank_list(&members));
        let meta: Meta = members
            .iter()
            .filter_map(|&m| store_of(m))
            .find_map(|r| {
                let text = std::fs::read(r.join("parity").join(format!("{stamp:08}.meta"))).ok()?;
                serde_json::from_slice(&text).ok()
            })
            .ok_or_else(|| format!("{group}: no member left holds the parity of stamp {stamp}"))?;
        if meta.members != members {
            return Err(format!(
                "{group}: the parity of stamp {stamp} is of group {:?}",
                meta.members
            ));
        }
        let layout = GroupLayout::new(
            // An enlarged last group keeps the parity count, with more
            // data shards: the layout of its size says so.
            &scheme,
            members.len() as u32,
        )
        .map_err(|e| format!("{group}: {e}"))?;
        let (k, m) = (layout.data_shards(), layout.parity_shards());
        if lost.len() > m {
            return Err(format!(
                "{group}: {} members lost (nodes {}), its parity rebuilds at most {m}",
                lost.len(),
                crate::coordinator::rank_list(
                    &lost.iter().map(|&i| members[i]).collect::<Vec<_>>()
                )
            ));
        }
        let chunk_len = meta.chunk_len as usize;
        let chunk_of = |blob: &[u8], c: usize| -> Vec<u8> {
            let mut v = vec![0u8; chunk_len];
            let start = (c * chunk_len).min(blob.len());
            let end = ((c + 1) * chunk_len).min(blob.len());
            v[..end - start].copy_from_slice(&blob[start..end]);
            v
        };
        for &f in &lost {
            let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(k);
            for c in 0..k {
                let stripe = layout.stripe_of_chunk(f, c);
                let data = layout.data_of_stripe(stripe);
                let mut shards: Vec<Option<Vec<u8>>> = data
                    .iter()
                    .map(|&(mi, ci)| blobs[mi].as_ref().map(|b| chunk_of(b, ci)))
                    .collect();
                for (p, holder) in layout.parity_holders(stripe).into_iter().enumerate() {
                    let shard = store_of(members[holder]).and_then(|r| {
                        std::fs::read(r.join("parity").join(format!("{stamp:08}.s{stripe}.p{p}")))
                            .ok()
                            .filter(|s| s.len() == chunk_len)
                    });
                    shards.push(shard);
                }
                mome_redundancy::reconstruct(&layout, &mut shards)
                    .map_err(|e| format!("{group}: stripe {stripe} of stamp {stamp}: {e}"))?;
                let d = data
                    .iter()
                    .position(|&(mi, _)| mi == f)
                    .expect("f is in the stripe");
                chunks.push(shards[d].take().expect("reconstructed"));
            }
            let (pages_len, index_len) = meta.lens[f];
            let blob = mome_redundancy::join_chunks(&chunks, pages_len + index_len);
            let node = members[f];
            let write = |path: PathBuf, bytes: &[u8]| -> Result<(), String> {
                std::fs::create_dir_all(files::node_dir(&out, node))
                    .and_then(|()| std::fs::write(&path, bytes))
                    .map_err(|e| format!("cannot write the decoded {}: {e}", path.display()))
            };
            if pages_len > 0 {
                write(
                    files::pages_file(&out, node, stamp),
                    &blob[..pages_len as usize],
                )?;
            }
            write(
                files::index_file(&out, node, stamp),
                &blob[pages_len as usize..],
            )?;
            if made.is_empty() {
                made.push(StoreCandidate {
                    label: "data decoded from the parity of its group".into(),
                    root: out.clone(),
                    node: None,
                });
            }
        }
    }
    Ok(made)
}
