//! Partial stores (a node's checkpoint memory: the files of only some
//! nodes, next to the manifests of every committed stamp): `verify_node`
//! against a manifest read elsewhere, and `prune_held`.

use std::path::Path;

use mome_protocol::ckpt::files;
use mome_store::*;

/// Node `node`'s increment of `stamp` in `root`: pages `range`, every byte
/// of page p set to `fill + p` (never zero).
fn write(
    root: &Path,
    node: u32,
    stamp: Stamp,
    base: Option<&NodeIndex>,
    range: std::ops::Range<u64>,
    fill: u8,
) -> (NodeIndex, IncrementSummary) {
    let pages: Vec<(u64, Vec<u8>)> = range
        .map(|p| {
            let b = fill.wrapping_add(p as u8) | 1;
            (p, vec![b; PAGE_SIZE])
        })
        .collect();
    write_increment(
        IncrementInput {
            root,
            node,
            stamp,
            base,
            removed: &[],
            tables: vec![node as u8; 4],
            images: vec![],
            fsync: false,
        },
        pages.iter().map(|(p, d)| (*p, &d[..])),
        &mut |_| {},
    )
    .unwrap()
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

/// Copies node `node`'s directory from `from` to `to`.
fn copy_node(from: &Path, to: &Path, node: u32) {
    let dst = files::node_dir(to, node);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(files::node_dir(from, node)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Stamps 1..=3 of two nodes committed in `disk`; each stamp after the
/// first rewrites pages 0..10, so stamp 3 uses the pages files of stamps 1
/// (pages 10..100) and 3, not 2. Returns the manifests.
fn chain(disk: &Path) -> Vec<Manifest> {
    let mut bases: Vec<Option<NodeIndex>> = vec![None, None];
    let mut out = Vec::new();
    for stamp in 1..=3u64 {
        let mut irefs = Vec::new();
        for node in 0..2u32 {
            let range = if stamp == 1 { 0..100 } else { 0..10 };
            let (index, summary) = write(
                disk,
                node,
                stamp,
                bases[node as usize].as_ref(),
                range,
                (stamp * 16 + u64::from(node)) as u8,
            );
            bases[node as usize] = Some(index);
            irefs.push(summary.index);
        }
        let m = manifest(stamp, stamp.checked_sub(1).filter(|&p| p > 0), irefs);
        commit_manifest(disk, &m, false).unwrap();
        out.push(m);
    }
    out
}

#[test]
fn verify_node_in_a_partial_store() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let held = dir.path().join("held");
    let manifests = chain(&disk);
    let m = &manifests[2];

    // verify is verify_node over every node.
    let whole = verify(&disk, 3, VerifyLevel::Full).unwrap();
    let nodes: Vec<NodeSummary> = (0..2)
        .map(|n| verify_node(&disk, m, n, VerifyLevel::Full).unwrap())
        .collect();
    assert_eq!(nodes[1].node, 1);
    assert_eq!(nodes[0].pages, 100);
    assert_eq!(nodes[0].pages_files, 2, "stamps 1 and 3: {:?}", nodes[0]);
    assert_eq!(whole.pages, nodes.iter().map(|n| n.pages).sum::<u64>());
    assert_eq!(whole.blocks, nodes.iter().map(|n| n.blocks).sum::<u64>());
    assert_eq!(
        whole.blocks_checked,
        nodes.iter().map(|n| n.blocks_checked).sum::<u64>()
    );
    assert_eq!(
        whole.data_bytes,
        nodes.iter().map(|n| n.data_bytes).sum::<u64>()
    );
    assert_eq!(
        whole.pages_files,
        nodes.iter().map(|n| n.pages_files).sum::<u64>()
    );
    assert!(whole.blocks_checked > 0);
    let quick = verify_node(&disk, m, 0, VerifyLevel::Quick).unwrap();
    assert_eq!(quick.blocks_checked, 0);

    // A store holding node 1 only, without any manifest: checked against
    // the disk's manifest.
    copy_node(&disk, &held, 1);
    assert_eq!(
        verify_node(&held, m, 1, VerifyLevel::Full).unwrap(),
        nodes[1]
    );
    let err = verify_node(&held, m, 0, VerifyLevel::Quick).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("00000003.index"), "{err}");
    let err = verify_node(&held, m, 7, VerifyLevel::Quick).unwrap_err();
    assert!(
        err.to_string().contains("manifest has no index for node 7"),
        "{err}"
    );
    // Whole-stamp verify of the partial store fails (no manifest there).
    assert!(verify(&held, 3, VerifyLevel::Quick).is_err());

    // A pages file of an older stamp that the index uses is missing.
    let old_pages = files::pages_file(&held, 1, 1);
    let good = std::fs::read(&old_pages).unwrap();
    std::fs::remove_file(&old_pages).unwrap();
    let err = verify_node(&held, m, 1, VerifyLevel::Quick).unwrap_err();
    assert!(!err.is_not_found(), "a missing pages file is damage: {err}");
    assert!(
        err.to_string()
            .contains("pages file used by node 1 index of stamp 3 is missing"),
        "{err}"
    );
    // A flipped byte in a block: Quick does not see it, Full does.
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 0x20;
    std::fs::write(&old_pages, &bad).unwrap();
    verify_node(&held, m, 1, VerifyLevel::Quick).unwrap();
    let err = verify_node(&held, m, 1, VerifyLevel::Full).unwrap_err();
    assert!(matches!(err, StoreError::CorruptBlock { .. }), "{err}");
    std::fs::write(&old_pages, &good).unwrap();
    verify_node(&held, m, 1, VerifyLevel::Full).unwrap();
}

/// A store whose index of the stamp is another run's (same stamp number,
/// other pages) never passes for the manifest's: stale data is refused.
#[test]
fn verify_node_refuses_a_stale_copy() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let stale = dir.path().join("stale");
    let manifests = chain(&disk);
    // Same layout, same stamps, same page ranges, other contents.
    let mut base = None;
    for stamp in 1..=3u64 {
        let range = if stamp == 1 { 0..100 } else { 0..10 };
        let (index, _) = write(&stale, 1, stamp, base.as_ref(), range, 0x77);
        base = Some(index);
    }
    let err = verify_node(&stale, &manifests[2], 1, VerifyLevel::Quick).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("node 1 index xxh3 mismatch") || text.contains("manifest says"),
        "{text}"
    );
    assert!(!err.is_not_found());
    // The index of another stamp renamed to this one: caught too.
    std::fs::copy(
        files::index_file(&disk, 1, 2),
        files::index_file(&stale, 1, 3),
    )
    .unwrap();
    assert!(verify_node(&stale, &manifests[2], 1, VerifyLevel::Quick).is_err());
}

#[test]
fn prune_held_prunes_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let held = dir.path().join("held");
    let manifests = chain(&disk);
    // The memory of node 1: node 1's files and every manifest.
    copy_node(&disk, &held, 1);
    for m in &manifests {
        commit_manifest(&held, m, false).unwrap();
    }
    // Stamp 4 of node 1 in progress (not committed): never touched.
    let base = NodeIndex::load(&files::index_file(&held, 1, 3)).unwrap();
    write(&held, 1, 4, Some(&base), 0..3, 9);

    // prune wants every node's index; prune_held does not.
    let err = prune(&held, 1).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(list_committed(&held).unwrap(), vec![1, 2, 3]);

    let summary = prune_held(&held, 1).unwrap();
    assert_eq!(summary.kept, vec![3]);
    assert_eq!(summary.removed_stamps, vec![1, 2]);
    assert!(summary.bytes_freed > 0);
    assert_eq!(list_committed(&held).unwrap(), vec![3]);
    // Stamp 3 uses stamp 1's pages (10..100) and its own; stamp 2's pages
    // were all rewritten.
    assert!(files::pages_file(&held, 1, 1).exists());
    assert!(!files::index_file(&held, 1, 1).exists());
    assert!(!files::pages_file(&held, 1, 2).exists());
    assert!(!files::index_file(&held, 1, 2).exists());
    assert!(files::index_file(&held, 1, 3).exists());
    assert!(files::pages_file(&held, 1, 3).exists());
    assert!(files::index_file(&held, 1, 4).exists());
    assert!(files::pages_file(&held, 1, 4).exists());
    verify_node(&held, &manifests[2], 1, VerifyLevel::Full).unwrap();
    let again = prune_held(&held, 1).unwrap();
    assert_eq!((again.files_removed, again.bytes_freed), (0, 0));

    // The same on the complete disk store: prune_held behaves as prune.
    let a = prune_held(&disk, 2).unwrap();
    assert_eq!((a.kept, a.removed_stamps), (vec![2, 3], vec![1]));
    verify(&disk, 2, VerifyLevel::Full).unwrap();
    verify(&disk, 3, VerifyLevel::Full).unwrap();
}

#[test]
fn prune_held_refuses_a_damaged_index() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let held = dir.path().join("held");
    let manifests = chain(&disk);
    copy_node(&disk, &held, 0);
    for m in &manifests {
        commit_manifest(&held, m, false).unwrap();
    }
    // A present index of a kept stamp that does not match the manifest.
    let index = files::index_file(&held, 0, 3);
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&index, &bytes).unwrap();
    let err = prune_held(&held, 1).unwrap_err();
    assert!(!err.is_not_found());
    assert!(err.to_string().contains("00000003.index"), "{err}");
    // Nothing was removed.
    assert_eq!(list_committed(&held).unwrap(), vec![1, 2, 3]);
    assert!(files::index_file(&held, 0, 1).exists());
    assert!(files::pages_file(&held, 0, 2).exists());
    assert!(prune_held(&held, 0).is_err());
    // An empty or missing store has nothing to prune.
    let none = prune_held(&dir.path().join("none"), 1).unwrap();
    assert_eq!(none, PruneSummary::default());
}
