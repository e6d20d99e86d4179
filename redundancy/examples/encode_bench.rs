//! Parity encode throughput on one core: every stripe's parity of a group
//! whose members each hold 64 MiB (what the whole group computes per
//! checkpoint), reported as members' data bytes covered per second: into
//! parity buffers kept from one run to the next (`encode_parity_into`, the
//! agent's case), and into fresh ones (`encode_parity`, page faults included).
//!
//! `cargo run --release -p mome-redundancy --example encode_bench [MiB]`

use std::time::Instant;

use mome_redundancy::{encode_parity, encode_parity_into, split_blob, GroupLayout, Scheme};

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map_or(64, |arg| arg.parse().expect("MiB per member"));
    let per_member = mib << 20;
    for (name, scheme, members) in [
        ("xor k=3 m=1", Scheme::Xor { group: 4 }, 4),
        ("rs  k=3 m=1", Scheme::Rs { data: 3, parity: 1 }, 4),
        ("rs  k=2 m=2", Scheme::Rs { data: 2, parity: 2 }, 4),
    ] {
        let layout = GroupLayout::new(&scheme, members).expect("valid scheme");
        let k = layout.data_shards();
        // Non-zero, member-specific data so that nothing is a page of zeros.
        let blobs: Vec<Vec<u8>> = (0..members as usize)
            .map(|m| {
                (0..per_member)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(m as u8))
                    .collect()
            })
            .collect();
        let chunk_len = layout.chunk_len(&vec![per_member; members as usize]);
        let chunks: Vec<_> = blobs
            .iter()
            .map(|b| split_blob(b, k as u32, chunk_len))
            .collect();
        let mut kept =
            vec![vec![0u8; chunk_len as usize]; layout.members() * layout.parity_shards()];
        let (mut best_kept, mut best_fresh) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            for fresh in [false, true] {
                let start = Instant::now();
                for stripe in 0..layout.members() {
                    let data: Vec<&[u8]> = layout
                        .data_of_stripe(stripe)
                        .iter()
                        .map(|&(m, c)| &*chunks[m][c])
                        .collect();
                    for p in 0..layout.parity_shards() {
                        if fresh {
                            std::hint::black_box(encode_parity(&layout, &data, p).expect("encode"));
                        } else {
                            let out = &mut kept[stripe * layout.parity_shards() + p];
                            encode_parity_into(&layout, &data, p, out).expect("encode");
                        }
                    }
                }
                let best = if fresh {
                    &mut best_fresh
                } else {
                    &mut best_kept
                };
                *best = best.min(start.elapsed().as_secs_f64());
            }
        }
        let gbps = |seconds: f64| (per_member * u64::from(members)) as f64 / seconds / 1e9;
        println!(
            "{name}: {:.2} GB/s into kept buffers, {:.2} GB/s into fresh ones ({members} x {mib} MiB)",
            gbps(best_kept),
            gbps(best_fresh)
        );
    }
}
