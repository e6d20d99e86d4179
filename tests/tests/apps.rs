//! Every test application under mome-run at 1, 2 and 4 ranks prints the same
//! checksum line as its native single-process run, and its own check (the
//! parallel result against rank 0's sequential computation) passes.

use mome_tests::*;

fn native_checksum(app_name: &str, args: &[&str]) -> String {
    let o = native(&app(app_name), args, None);
    assert_ok(&o, &format!("native {app_name}"));
    checksum_line(&stdout(&o))
}

fn check_app(app_name: &str, args: &[&str], ranks: &[u32]) {
    let expected = native_checksum(app_name, args);
    for &n in ranks {
        let home = Home::new();
        let exe = app(app_name);
        let ns = n.to_string();
        let mut argv = vec!["-n", ns.as_str(), exe.to_str().unwrap()];
        argv.extend_from_slice(args);
        let o = home.run(&argv);
        assert_ok(&o, &format!("{app_name} {args:?} under mome-run -n {n}"));
        let out = stdout(&o);
        assert_eq!(checksum_line(&out), expected, "{app_name} -n {n}:\n{out}");
        assert!(!out.contains("MISMATCH"), "{app_name} -n {n}:\n{out}");
        assert!(
            out.lines().any(|l| l.ends_with("OK")),
            "{app_name} -n {n} did not report OK:\n{out}"
        );
        home.assert_nothing_left();
    }
}

#[test]
fn jacobi() {
    check_app("jacobi", &["128", "40"], &[1, 2, 4]);
}

#[test]
fn mat() {
    check_app("mat", &["128", "32"], &[1, 2, 4]);
}

#[test]
fn nbody() {
    check_app("nbody", &["256", "6"], &[1, 2, 4]);
}

#[test]
fn cell() {
    check_app("cell", &["128", "40"], &[1, 2, 4]);
}

#[test]
fn pcg() {
    check_app("pcg", &["32", "400"], &[1, 2, 4]);
}

#[test]
fn shared_counter_with_locks_and_pthread_objects() {
    check_app("shared-counter", &["300"], &[1, 2, 4]);
}

#[test]
fn common_block_fortran() {
    check_app("common-f77", &["4096", "5"], &[1, 2, 4]);
}

#[test]
fn counter_every_rank_prints() {
    let home = Home::new();
    let exe = app("counter");
    let o = home.run(&["-n", "3", exe.to_str().unwrap(), "4", "1"]);
    assert_ok(&o, "counter -n 3");
    let out = stdout(&o);
    let expected = native_checksum("counter", &["4", "1"]);
    let native_out = stdout(&native(&app("counter"), &["4", "1"], None));
    let native_lines = native_out.lines().count();
    for r in 0..3 {
        let prefix = format!("[{r}] ");
        let mine: Vec<&str> = out.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(mine.len(), native_lines, "rank {r} lines:\n{out}");
        let unprefixed: String = mine
            .iter()
            .map(|l| format!("{}\n", &l[prefix.len()..]))
            .collect();
        assert_eq!(
            unprefixed, native_out,
            "rank {r} output differs from a native run:\n{out}"
        );
        assert!(unprefixed.contains(&expected), "{out}");
    }
}
