//! The DSM window as an unmodified program sees it: malloc, mmap, fork,
//! shared segments, kernel-mode faults, several ranks. Real mome-run, agent,
//! preload and userfaultfd; the probes are in tests/c/.

use mome_tests::*;

fn run_probe(name: &str, ranks: u32) -> String {
    let home = Home::new();
    let exe = probe(name);
    let n = ranks.to_string();
    let o = home.run(&["-n", &n, "--no-prefix", exe.to_str().unwrap()]);
    assert_ok(&o, &format!("{name} under mome-run -n {ranks}"));
    let out = stdout(&o);
    assert!(out.contains("ALL OK"), "{name}:\n{out}\n{}", stderr(&o));
    assert!(!out.contains("FAIL"), "{name}:\n{out}");
    home.assert_nothing_left();
    out
}

#[test]
fn allocations_live_in_the_window_and_behave() {
    let out = run_probe("window_probe", 1);
    assert!(out.contains("ok malloc-big-in-window"), "{out}");
}

#[test]
fn fork_gives_the_child_a_copy() {
    let out = run_probe("fork_probe", 1);
    // The exec'd child printed how many window mappings it has: none.
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "exec'd child mapped the window:\n{out}"
    );
}

#[test]
fn kernel_writes_into_missing_shared_pages() {
    run_probe("read_shared", 1);
}

#[test]
fn shared_memory_is_shared_between_ranks() {
    for n in [1, 2, 4, 8] {
        run_probe("ranks_probe", n);
    }
}

#[test]
fn probes_fail_natively_so_they_can_fail() {
    // Outside mome the window checks must fail: the probe is not vacuous.
    let o = native(&probe("window_probe"), &[], None);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("FAIL malloc-small-in-window"));
}

#[test]
fn unused_segments_are_given_back() {
    // 200 segments through 32 slots (the default reservation is 16G of a
    // 512G shared zone): only works if unmapped/unlinked ones are reclaimed.
    run_probe("segments_probe", 1);
}
