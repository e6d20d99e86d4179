//! Placement properties, stripe geometry, and exhaustive loss/rebuild tests.

use std::borrow::Cow;

use mome_redundancy::*;
use proptest::prelude::*;

/// Deterministic bytes (xorshift) so failures replay.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Checkpoints `blobs` (one per member) under `layout`, loses the members in
/// `lost` with their chunks and parity, and rebuilds every blob and parity
/// shard from what survives, checking the rebuilt parity against the original.
fn lose_and_rebuild(
    layout: &GroupLayout,
    blobs: &[Vec<u8>],
    lost: &[usize],
) -> Result<Vec<Vec<u8>>, RedundancyError> {
    let k = layout.data_shards();
    let lens: Vec<u64> = blobs.iter().map(|b| b.len() as u64).collect();
    let chunk_len = layout.chunk_len(&lens);
    let chunks: Vec<Vec<Cow<[u8]>>> = blobs
        .iter()
        .map(|b| split_blob(b, k as u32, chunk_len))
        .collect();
    let mut rebuilt: Vec<Vec<Vec<u8>>> = vec![vec![Vec::new(); k]; blobs.len()];
    for stripe in 0..layout.members() {
        let data = layout.data_of_stripe(stripe);
        let refs: Vec<&[u8]> = data
            .iter()
            .map(|&(member, chunk)| &*chunks[member][chunk])
            .collect();
        let parity: Vec<Vec<u8>> = (0..layout.parity_shards())
            .map(|p| encode_parity(layout, &refs, p).unwrap())
            .collect();
        let holders = data
            .iter()
            .map(|&(member, _)| member)
            .chain(layout.parity_holders(stripe));
        let originals = refs
            .iter()
            .map(|r| r.to_vec())
            .chain(parity.iter().cloned());
        let mut shards: Vec<Option<Vec<u8>>> = holders
            .zip(originals)
            .map(|(holder, shard)| (!lost.contains(&holder)).then_some(shard))
            .collect();
        reconstruct(layout, &mut shards)?;
        let shards: Vec<Vec<u8>> = shards.into_iter().map(Option::unwrap).collect();
        assert_eq!(shards[k..], parity[..], "rebuilt parity of stripe {stripe}");
        for (&(member, chunk), shard) in data.iter().zip(shards) {
            rebuilt[member][chunk] = shard;
        }
    }
    Ok(rebuilt
        .iter()
        .zip(&lens)
        .map(|(chunks, &len)| join_chunks(chunks, len))
        .collect())
}

/// Every parity layout of `n` members: XOR and each RS split.
fn layouts(n: u32) -> Vec<GroupLayout> {
    let mut schemes = vec![Scheme::Xor { group: n }];
    schemes.extend((1..n).map(|parity| Scheme::Rs {
        data: n - parity,
        parity,
    }));
    schemes
        .iter()
        .map(|s| GroupLayout::new(s, n).unwrap())
        .collect()
}

#[test]
fn mirror_holders_are_the_next_nodes_never_self_never_twice() {
    for nodes in 2..=16 {
        for copies in 0..=nodes + 1 {
            for node in 0..nodes {
                let holders = mirror_holders(node, nodes, copies);
                let expected: Vec<u32> = (1..=copies.min(nodes - 1))
                    .map(|d| (node + d) % nodes)
                    .collect();
                assert_eq!(holders, expected);
                assert_eq!(
                    holders,
                    mirror_holders(node, nodes, copies),
                    "deterministic"
                );
                assert!(!holders.contains(&node));
                let mut distinct = holders.clone();
                distinct.sort();
                distinct.dedup();
                assert_eq!(distinct.len(), holders.len());
            }
        }
    }
    assert_eq!(effective_copies(5, 3), 2);
}

#[test]
fn groups_partition_the_job_and_remainders_join_the_last_group() {
    let ranges = |scheme: Scheme, nodes: u32| {
        let mut groups: Vec<Vec<u32>> = (0..nodes).map(|n| group_of(&scheme, n, nodes)).collect();
        groups.dedup();
        groups.iter().map(|g| (g[0], g.len())).collect::<Vec<_>>()
    };
    assert_eq!(ranges(Scheme::Xor { group: 4 }, 9), [(0, 4), (4, 5)]);
    assert_eq!(
        ranges(Scheme::Xor { group: 4 }, 10),
        [(0, 4), (4, 4), (8, 2)]
    );
    assert_eq!(
        ranges(Scheme::Rs { data: 2, parity: 1 }, 7),
        [(0, 3), (3, 4)]
    );
    assert_eq!(group_of(&Scheme::Mirror { copies: 2 }, 3, 4), [3, 0, 1]);
    for nodes in 2..=16 {
        for scheme in [
            Scheme::Xor { group: 2 },
            Scheme::Xor { group: 5 },
            Scheme::Rs { data: 2, parity: 2 },
        ] {
            if validate(&scheme, nodes).is_err() {
                continue;
            }
            for node in 0..nodes {
                let group = group_of(&scheme, node, nodes);
                assert!(group.contains(&node) && group.windows(2).all(|w| w[1] == w[0] + 1));
                assert!(group
                    .iter()
                    .all(|&member| group_of(&scheme, member, nodes) == group));
                GroupLayout::new(&scheme, group.len() as u32).unwrap();
            }
        }
    }
}

#[test]
fn validation_errors_are_clear() {
    let message = |scheme, nodes| validate(&scheme, nodes).unwrap_err().to_string();
    assert_eq!(
        message(Scheme::Xor { group: 1 }, 4),
        "xor needs groups of at least 2 nodes"
    );
    assert_eq!(
        message(Scheme::Xor { group: 5 }, 4),
        "xor group (5) exceeds the nodes of the job (4)"
    );
    assert_eq!(
        message(Scheme::Rs { data: 4, parity: 2 }, 4),
        "rs data+parity (6) exceeds the nodes of the job (4)"
    );
    assert_eq!(
        message(
            Scheme::Rs {
                data: 200,
                parity: 57
            },
            300
        ),
        "rs group of 300 nodes exceeds the 256 shards of GF(2^8)"
    );
    assert_eq!(
        message(Scheme::Mirror { copies: 1 }, 1),
        "mirror needs at least 2 nodes to keep a copy off the node (the job has 1)"
    );
    assert!(validate(&Scheme::Mirror { copies: 9 }, 3).is_ok());
    assert_eq!(overhead(&Scheme::Mirror { copies: 9 }, 3), 2.0);
    assert_eq!(overhead(&Scheme::Xor { group: 4 }, 8), 1.0 / 3.0);
    assert_eq!(
        overhead(&Scheme::Xor { group: 4 }, 10),
        1.0,
        "the 2-node remainder group mirrors"
    );
    assert_eq!(overhead(&Scheme::Rs { data: 4, parity: 2 }, 12), 0.5);
}

#[test]
fn every_stripe_spans_all_members_and_each_member_holds_m_parity_shards() {
    for n in 2..=16 {
        for layout in layouts(n) {
            let (k, m) = (layout.data_shards(), layout.parity_shards());
            let mut chunk_seen = vec![vec![false; k]; n as usize];
            for stripe in 0..n as usize {
                let data = layout.data_of_stripe(stripe);
                let mut members: Vec<usize> = data.iter().map(|&(member, _)| member).collect();
                members.extend(layout.parity_holders(stripe));
                members.sort();
                assert_eq!(
                    members,
                    (0..n as usize).collect::<Vec<_>>(),
                    "stripe {stripe} of {k}+{m}"
                );
                for (member, chunk) in data {
                    assert!(!std::mem::replace(&mut chunk_seen[member][chunk], true));
                    assert_eq!(layout.stripe_of_chunk(member, chunk), stripe);
                }
            }
            for member in 0..n as usize {
                let held = layout.stripes_held_by(member);
                assert_eq!(held.len(), m);
                assert!(held
                    .iter()
                    .all(|&(stripe, p)| layout.parity_holders(stripe)[p] == member));
            }
        }
    }
}

#[test]
fn any_m_lost_members_are_rebuilt_byte_exact_and_m_plus_one_fail() {
    for n in 2..=8u32 {
        for layout in layouts(n) {
            let (k, m) = (layout.data_shards(), layout.parity_shards());
            // Different lengths per member: empty, shorter than k, not multiples of k.
            let lens = [0, 1, k + 1, 7 * k + 3, 64, 5, 100, 31];
            let blobs: Vec<Vec<u8>> = (0..n as usize)
                .map(|i| bytes(i as u64 + 1, lens[i % lens.len()]))
                .collect();
            let empty = vec![Vec::new(); n as usize];
            for mask in 0u32..1 << n {
                let lost: Vec<usize> = (0..n as usize).filter(|i| mask & (1 << i) != 0).collect();
                if lost.len() <= m {
                    assert_eq!(
                        lose_and_rebuild(&layout, &blobs, &lost).unwrap(),
                        blobs,
                        "{k}+{m} lost {lost:?}"
                    );
                    assert_eq!(lose_and_rebuild(&layout, &empty, &lost).unwrap(), empty);
                } else if lost.len() == m + 1 {
                    let error = lose_and_rebuild(&layout, &blobs, &lost)
                        .unwrap_err()
                        .to_string();
                    let expected = format!(
                        "stripe lost {} of its {n} shards, its parity rebuilds at most {m}",
                        m + 1
                    );
                    assert_eq!(error, expected);
                }
            }
        }
    }
}

#[test]
fn xor_parity_is_plain_xor_and_rs_parity_matches_the_full_encoder() {
    let xor = GroupLayout::new(&Scheme::Xor { group: 4 }, 4).unwrap();
    for len in 0..40 {
        let chunks: Vec<Vec<u8>> = (0..3).map(|i| bytes(i + len as u64, len)).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let plain: Vec<u8> = (0..len)
            .map(|b| chunks[0][b] ^ chunks[1][b] ^ chunks[2][b])
            .collect();
        assert_eq!(encode_parity(&xor, &refs, 0).unwrap(), plain);
    }
    let rs = GroupLayout::new(&Scheme::Rs { data: 3, parity: 2 }, 5).unwrap();
    let codec = reed_solomon_erasure::galois_8::ReedSolomon::new(3, 2).unwrap();
    let mut shards: Vec<Vec<u8>> = (0..5).map(|i| bytes(i, 1000)).collect();
    codec.encode(&mut shards).unwrap();
    let refs: Vec<&[u8]> = shards[..3].iter().map(Vec::as_slice).collect();
    for p in 0..2 {
        assert_eq!(encode_parity(&rs, &refs, p).unwrap(), shards[3 + p]);
    }
    assert!(encode_parity(&rs, &refs, 2).is_err());
    assert!(encode_parity(&rs, &refs[..2], 0).is_err());
}

proptest! {
    #[test]
    fn recoverable_agrees_with_rebuilding(nodes in 2u32..=12, kind in 0u8..3, a in 1u32..5, b in 1u32..4, mask in any::<u16>()) {
        let scheme = match kind {
            0 => Scheme::Mirror { copies: a },
            1 => Scheme::Xor { group: a + 1 },
            _ => Scheme::Rs { data: a, parity: b },
        };
        prop_assume!(validate(&scheme, nodes).is_ok());
        let lost: Vec<u32> = (0..nodes).filter(|i| mask & (1 << i) != 0).collect();
        let verdict = recoverable(&scheme, nodes, &lost);
        let rebuilt = lost.iter().all(|&node| match scheme {
            Scheme::Mirror { copies } => mirror_holders(node, nodes, copies).iter().any(|h| !lost.contains(h)),
            _ => {
                let group = group_of(&scheme, node, nodes);
                let layout = GroupLayout::new(&scheme, group.len() as u32).unwrap();
                let blobs: Vec<Vec<u8>> = group.iter().map(|&g| bytes(g.into(), 10 + g as usize)).collect();
                let lost_here: Vec<usize> = (0..group.len()).filter(|&i| lost.contains(&group[i])).collect();
                lose_and_rebuild(&layout, &blobs, &lost_here).is_ok_and(|r| r == blobs)
            }
        });
        prop_assert_eq!(verdict.is_ok(), rebuilt, "{:?}", verdict);
        if let Err(why) = verdict {
            let names_a_node = lost.iter().any(|node| why.contains(&format!("node {node}:")));
            prop_assert!(names_a_node, "{}", why);
        }
    }
}
