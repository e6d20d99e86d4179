//! End-to-end tests of the store through its public API: increments written
//! and read back against a model, commit/verify/prune over a chain of
//! stamps, and damage of every kind being reported by `verify`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use mome_protocol::ckpt::files;
use mome_store::*;

/// splitmix64, so the tests need no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A page that is zero, compressible or random.
fn page(rng: &mut Rng) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    match rng.below(4) {
        0 => {}
        1 => {
            let v = rng.next();
            for (i, w) in p.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(v + (i as u64 % 7)).to_le_bytes());
            }
        }
        2 => p.iter_mut().for_each(|b| *b = rng.next() as u8),
        _ => {
            let at = rng.below(PAGE_SIZE as u64) as usize;
            p[at] = 1 + rng.below(255) as u8;
        }
    }
    p
}

/// The window as the model sees it: non-zero pages only.
type Model = BTreeMap<u64, Vec<u8>>;

/// Applies an increment to the model.
fn apply(model: &mut Model, removed: &[Range<u64>], pages: &Model) {
    for r in removed {
        model.retain(|p, _| !r.contains(p));
    }
    for (&p, data) in pages {
        if data.iter().all(|&b| b == 0) {
            model.remove(&p);
        } else {
            model.insert(p, data.clone());
        }
    }
}

/// Reads every page of `index` (and the zero pages around) and compares
/// with the model.
fn check_against(root: &Path, index: &NodeIndex, model: &Model, window_pages: u64) {
    let reader = BlockReader::new(root, index.node);
    let mut buf = Vec::new();
    for page in 0..window_pages {
        match (index.lookup(page), model.get(&page)) {
            (None, None) => {}
            (Some((block, i)), Some(want)) => {
                reader.read_block(block, &mut buf).unwrap();
                let at = i as usize * PAGE_SIZE;
                assert!(buf[at..at + PAGE_SIZE] == want[..], "page {page} differs");
            }
            (got, want) => panic!(
                "page {page}: index has {:?}, model has {}",
                got,
                want.is_some()
            ),
        }
    }
    assert_eq!(index.page_count(), model.len() as u64);
}

fn write(
    root: &Path,
    node: u32,
    stamp: Stamp,
    base: Option<&NodeIndex>,
    removed: &[Range<u64>],
    pages: &Model,
) -> (NodeIndex, IncrementSummary) {
    let mut last = 0;
    let out = write_increment(
        IncrementInput {
            root,
            node,
            stamp,
            base,
            removed,
            tables: vec![stamp as u8; 10],
            images: vec![RankImage {
                rank: node,
                addr: 4096 * stamp,
                len: 100,
            }],
            fsync: true,
        },
        pages.iter().map(|(&p, d)| (p, &d[..])),
        &mut |done| {
            assert!(done >= last);
            last = done;
        },
    )
    .unwrap();
    assert_eq!(last, pages.len() as u64 * PAGE_SIZE as u64);
    out
}

fn manifest(stamp: Stamp, parent: Option<Stamp>, indexes: Vec<IndexRef>) -> Manifest {
    Manifest {
        stamp,
        job_id: "j".into(),
        incarnation: 0,
        created: "2024-01-01T00:00:00Z".into(),
        nranks: 2,
        nodes: indexes.len() as u32,
        binary: "/bin/true".into(),
        binary_xxh3: 1,
        parent,
        indexes,
        pause_us: 1,
        commit_ms: 1,
        bytes_written: 0,
        pages: 0,
        image_bytes: 0,
    }
}

#[test]
fn random_pages_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut rng = Rng(7);
    let mut pages = Model::new();
    let mut p = 0;
    while p < 3000 {
        pages.insert(p, page(&mut rng));
        // Mostly contiguous, sometimes a gap.
        p += if rng.below(10) == 0 {
            1 + rng.below(100)
        } else {
            1
        };
    }
    let (index, summary) = write(root, 0, 1, None, &[], &pages);
    let mut model = Model::new();
    apply(&mut model, &[], &pages);
    check_against(root, &index, &model, 3200);

    let zeros = pages.values().filter(|d| d.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!(summary.pages, pages.len() as u64);
    assert_eq!(summary.zero_pages, zeros);
    let pages_len = std::fs::metadata(files::pages_file(root, 0, 1))
        .unwrap()
        .len();
    assert_eq!(summary.data_bytes_written, pages_len);
    assert_eq!(summary.bytes_written, pages_len + summary.index.len);
    assert!(index.blocks().any(|b| b.raw), "random pages are stored raw");
    assert!(index.blocks().any(|b| !b.raw));
    assert!(index.blocks().all(|b| b.npages <= BLOCK_PAGES));
    assert_eq!(
        NodeIndex::load(&root.join(&summary.index.index)).unwrap(),
        index
    );
    assert_eq!(index.tables, vec![1u8; 10]);
}

#[test]
fn chain_commit_prune() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    const WINDOW: u64 = 2000;
    let mut rng = Rng(11);
    // Per node: model of the window after each stamp, and the last index.
    let mut models: Vec<BTreeMap<Stamp, Model>> = vec![BTreeMap::new(); 2];
    let mut committed_index: Vec<Option<NodeIndex>> = vec![None, None];
    let mut committed_model: Vec<Model> = vec![Model::new(), Model::new()];
    let mut parent = None;

    // 1, 2 committed; 3 written and abandoned; 4 committed (base 2); 5
    // written, not committed yet (in progress).
    for stamp in 1..=5u64 {
        let mut irefs = Vec::new();
        for node in 0..2u32 {
            let n = node as usize;
            let mut pages = Model::new();
            let count = if stamp == 1 { 1500 } else { 300 };
            for _ in 0..count {
                pages.insert(rng.below(WINDOW), page(&mut rng));
            }
            let removed: Vec<Range<u64>> = if stamp == 1 {
                vec![]
            } else {
                (0..3)
                    .map(|_| {
                        let a = rng.below(WINDOW);
                        a..a + rng.below(200)
                    })
                    .collect()
            };
            // A removed page that is also dirty is written: the agent's
            // dirty set wins over the hole list.
            let (index, summary) = write(
                root,
                node,
                stamp,
                committed_index[n].as_ref(),
                &removed,
                &pages,
            );
            let mut model = committed_model[n].clone();
            apply(&mut model, &removed, &pages);
            check_against(root, &index, &model, WINDOW + 200);
            if stamp != 3 && stamp != 5 {
                committed_index[n] = Some(index);
                committed_model[n] = model.clone();
                models[n].insert(stamp, model);
            }
            irefs.push(summary.index);
        }
        if stamp != 3 && stamp != 5 {
            commit_manifest(root, &manifest(stamp, parent, irefs), true).unwrap();
            parent = Some(stamp);
            verify(root, stamp, VerifyLevel::Full).unwrap();
        }
    }
    assert_eq!(list_committed(root).unwrap(), vec![1, 2, 4]);
    assert_eq!(next_stamp(root).unwrap(), 6);
    let sizes = stamp_sizes(root, 4).unwrap();
    assert!(sizes.own_pages > 0 && sizes.pages > sizes.own_pages);

    let summary = prune(root, 2).unwrap();
    assert_eq!(summary.kept, vec![2, 4]);
    assert_eq!(summary.removed_stamps, vec![1]);
    assert!(summary.files_removed >= 2 + 4, "{summary:?}");
    assert!(summary.bytes_freed > 0);
    assert_eq!(list_committed(root).unwrap(), vec![2, 4]);
    for node in 0..2 {
        // Stamp 1's index and the abandoned stamp 3 are gone; stamp 5 (in
        // progress) is untouched; stamp 1's pages survive because the kept
        // indexes still use them.
        assert!(!files::index_file(root, node, 1).exists());
        assert!(!files::index_file(root, node, 3).exists());
        assert!(!files::pages_file(root, node, 3).exists());
        assert!(files::pages_file(root, node, 1).exists());
        assert!(files::index_file(root, node, 5).exists());
        assert!(files::pages_file(root, node, 5).exists());
    }
    for stamp in [2, 4] {
        verify(root, stamp, VerifyLevel::Full).unwrap();
        for node in 0..2u32 {
            let index = NodeIndex::load(&files::index_file(root, node, stamp)).unwrap();
            check_against(root, &index, &models[node as usize][&stamp], WINDOW + 200);
        }
    }
    // Pruning again changes nothing.
    let again = prune(root, 2).unwrap();
    assert_eq!((again.files_removed, again.bytes_freed), (0, 0));
}

/// One committed stamp of one node, for damaging.
fn one_stamp(root: &Path) -> (NodeIndex, Manifest) {
    let mut rng = Rng(3);
    let pages: Model = (0..300).map(|p| (p, page(&mut rng))).collect();
    let (index, summary) = write(root, 0, 1, None, &[], &pages);
    let m = manifest(1, None, vec![summary.index]);
    commit_manifest(root, &m, true).unwrap();
    verify(root, 1, VerifyLevel::Full).unwrap();
    (index, m)
}

fn expect_err(root: &Path, level: VerifyLevel, what: &[&str]) {
    let err = verify(root, 1, level).unwrap_err().to_string();
    for w in what {
        assert!(err.contains(w), "error {err:?} does not say {w:?}");
    }
}

#[test]
fn verify_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (index, _) = one_stamp(root);
    let pages = files::pages_file(root, 0, 1);
    let index_path = files::index_file(root, 0, 1);
    let good_pages = std::fs::read(&pages).unwrap();
    let good_index = std::fs::read(&index_path).unwrap();

    // Truncated pages file.
    std::fs::write(&pages, &good_pages[..good_pages.len() - 1]).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.pages", "goes past it"],
    );
    // Missing pages file.
    std::fs::remove_file(&pages).unwrap();
    expect_err(root, VerifyLevel::Quick, &["00000001.pages", "missing"]);
    // Bad header.
    let mut b = good_pages.clone();
    b[0] ^= 1;
    std::fs::write(&pages, &b).unwrap();
    expect_err(root, VerifyLevel::Quick, &["00000001.pages", "bad magic"]);
    // A flipped byte in a compressed block: Quick does not read blocks,
    // Full does and names the block.
    let block = *index.blocks().find(|b| !b.raw).unwrap();
    let mut b = good_pages.clone();
    b[block.offset as usize + block.clen as usize / 2] ^= 0x55;
    std::fs::write(&pages, &b).unwrap();
    verify(root, 1, VerifyLevel::Quick).unwrap();
    expect_err(
        root,
        VerifyLevel::Full,
        &[
            "00000001.pages",
            &format!("block at offset {}", block.offset),
        ],
    );
    // Same in a raw block.
    let block = *index.blocks().find(|b| b.raw).unwrap();
    let mut b = good_pages.clone();
    b[block.offset as usize + 5] ^= 0x55;
    std::fs::write(&pages, &b).unwrap();
    expect_err(
        root,
        VerifyLevel::Full,
        &["xxh3 mismatch", &format!("offset {}", block.offset)],
    );
    std::fs::write(&pages, &good_pages).unwrap();

    // Index damaged: checked against the manifest before being parsed.
    let mut b = good_index.clone();
    b[30] ^= 1;
    std::fs::write(&index_path, &b).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.index", "node 0 index xxh3 mismatch"],
    );
    std::fs::write(&index_path, &good_index[..good_index.len() - 3]).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.index", "manifest says"],
    );
    std::fs::remove_file(&index_path).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.index", "No such file"],
    );
    std::fs::write(&index_path, &good_index).unwrap();

    // Manifest damaged.
    let mpath = files::manifest_file(root, 1);
    let good_manifest = std::fs::read(&mpath).unwrap();
    let text = String::from_utf8(good_manifest.clone()).unwrap();
    std::fs::write(&mpath, text.replace("\"j\"", "\"k\"")).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.manifest", "checksum mismatch"],
    );
    std::fs::write(&mpath, &good_manifest[..good_manifest.len() / 2]).unwrap();
    expect_err(
        root,
        VerifyLevel::Quick,
        &["00000001.manifest", "does not parse"],
    );
    std::fs::write(&mpath, &good_manifest).unwrap();

    verify(root, 1, VerifyLevel::Full).unwrap();
    assert!(matches!(
        verify(root, 2, VerifyLevel::Quick),
        Err(StoreError::NotCommitted { stamp: 2, .. })
    ));
}

#[test]
fn read_block_reports_corrupt_lz4() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (index, _) = one_stamp(root);
    let pages = files::pages_file(root, 0, 1);
    let mut bytes = std::fs::read(&pages).unwrap();
    let block = *index.blocks().find(|b| !b.raw).unwrap();
    // Garbage over the whole block: lz4 must fail (or the checksum), never
    // panic.
    let mut rng = Rng(1);
    for b in &mut bytes[block.offset as usize..block.end() as usize] {
        *b = rng.next() as u8;
    }
    std::fs::write(&pages, &bytes).unwrap();
    let reader = BlockReader::new(root, 0);
    let err = reader.read_block(&block, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, StoreError::CorruptBlock { offset, .. } if offset == block.offset));
    assert!(err.to_string().contains("00000001.pages"), "{err}");
}

#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let input = || IncrementInput {
        root,
        node: 0,
        stamp: 1,
        base: None,
        removed: &[],
        tables: vec![],
        images: vec![],
        fsync: false,
    };
    let p = vec![1u8; PAGE_SIZE];
    let err =
        write_increment(input(), [(5, &p[..]), (4, &p[..])].into_iter(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("ascending"), "{err}");
    let err = write_increment(input(), [(5, &p[..10])].into_iter(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("page 5 has 10 bytes"), "{err}");
    let mut base = NodeIndex::empty(0);
    base.stamp = 1;
    let err = write_increment(
        IncrementInput {
            base: Some(&base),
            ..input()
        },
        std::iter::empty(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("not older"), "{err}");
    // An empty increment still writes an index (and no pages file).
    let (index, summary) = write_increment(input(), std::iter::empty(), &mut |_| {}).unwrap();
    assert_eq!(index.page_count(), 0);
    assert_eq!(summary.data_bytes_written, 0);
    assert!(!files::pages_file(root, 0, 1).exists());
    assert!(prune(root, 0).is_err());
}

/// Throughput of `write_increment` on compressible pages, for reference:
/// `cargo test --release -p mome-store -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let npages = 256 * 1024u64; // 1 GiB
    let mut rng = Rng(5);
    let data: Vec<u8> = (0..npages as usize * PAGE_SIZE / 8)
        .flat_map(|i| {
            let v = if i % 64 == 0 {
                rng.next()
            } else {
                (i as u64) & 0xff
            };
            v.to_le_bytes()
        })
        .collect();
    let start = std::time::Instant::now();
    let (index, summary) = write_increment(
        IncrementInput {
            root,
            node: 0,
            stamp: 1,
            base: None,
            removed: &[],
            tables: vec![],
            images: vec![],
            fsync: false,
        },
        data.chunks_exact(PAGE_SIZE)
            .enumerate()
            .map(|(i, p)| (i as u64, p)),
        &mut |_| {},
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "write: {:.2} GB/s, ratio {:.2}",
        data.len() as f64 / secs / 1e9,
        summary.data_bytes_written as f64 / data.len() as f64
    );
    let reader = BlockReader::new(root, 0);
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    for b in index.blocks() {
        reader.read_block(b, &mut buf).unwrap();
    }
    println!(
        "read: {:.2} GB/s",
        data.len() as f64 / start.elapsed().as_secs_f64() / 1e9
    );
}

#[test]
fn shared_types_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<BlockReader>();
    check::<NodeIndex>();
    check::<StoreError>();
}

/// Pages appended in several sets: a later copy replaces an earlier one, a
/// zero page and `clear` make pages zero, whatever set they were in.
#[test]
fn increment_in_several_appends() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let fill = |b: u8| vec![b; PAGE_SIZE];
    let (a, b, zero) = (fill(1), fill(2), fill(0));
    let mut w = IncrementWriter::new(root, 0, 1, None, false).unwrap();
    let first: Vec<(u64, &[u8])> = vec![(1, &a), (2, &a), (3, &a), (10, &a)];
    w.append(first.into_iter(), &mut |_| {}).unwrap();
    let second: Vec<(u64, &[u8])> = vec![(2, &b), (3, &zero)];
    w.append(second.into_iter(), &mut |_| {}).unwrap();
    let first_page = std::ops::Range { start: 1, end: 2 };
    w.clear(std::slice::from_ref(&first_page));
    let (index, summary) = w.finish(Vec::new(), Vec::new()).unwrap();
    assert_eq!(summary.pages, 6);
    let reader = BlockReader::new(root, 0);
    let page_of = |p: u64| {
        index.lookup(p).map(|(block, i)| {
            let mut out = Vec::new();
            reader.read_block(block, &mut out).unwrap();
            out[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE].to_vec()
        })
    };
    assert_eq!(page_of(1), None);
    assert_eq!(page_of(2), Some(b.clone()));
    assert_eq!(page_of(3), None);
    assert_eq!(page_of(10), Some(a.clone()));
    let loaded = NodeIndex::load(&root.join(&summary.index.index)).unwrap();
    assert_eq!(loaded.page_count(), 2);
}
