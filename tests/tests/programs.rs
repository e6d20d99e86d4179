//! Unmodified real programs under `mome-run -n 1` produce exactly the output
//! of a native run: python3 with C extensions, bc, sort on a large input,
//! gzip.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use mome_tests::*;

fn which(name: &str) -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed (.ci/run installs it)");
}

/// Runs `program args` natively and under mome-run with the same stdin file;
/// asserts identical stdout, stderr and exit status.
fn same_as_native(program: &str, args: &[&str], stdin: Option<&Path>) -> String {
    let exe = which(program);
    let native_out = native(&exe, args, stdin);
    let home = Home::new();
    let mut all = vec!["-n", "1", exe.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut cmd = home.command(&all);
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    let mome_out = cmd.output().unwrap();
    assert_eq!(
        mome_out.status.code(),
        native_out.status.code(),
        "{program}: exit status\n{}",
        stderr(&mome_out)
    );
    assert!(
        mome_out.stdout == native_out.stdout,
        "{program}: stdout differs from the native run\nmome:\n{}\nnative:\n{}",
        stdout(&mome_out),
        stdout(&native_out)
    );
    // mome-run's own diagnostics ("mome: job <id>", "mome: rank 0 ... exited
    // with status 3") are on stderr too, marked "mome: "; the program's are compared.
    let mome_err: String = stderr(&mome_out)
        .lines()
        .filter(|l| !l.starts_with("mome: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(mome_err, stderr(&native_out), "{program}: stderr differs");
    home.assert_nothing_left();
    stdout(&mome_out)
}

const PYTHON: &str = r#"
import hashlib, json, zlib, struct, math, collections, re, decimal
data = b"".join(struct.pack("<d", math.sin(i)) for i in range(200000))
print("sha256", hashlib.sha256(data).hexdigest())
print("md5", hashlib.md5(data).hexdigest())
packed = zlib.compress(data, 6)
assert zlib.decompress(packed) == data
print("zlib", len(packed), zlib.crc32(data))
obj = {"k%d" % i: [i, str(i) * 3, {"x": i / 7}] for i in range(20000)}
text = json.dumps(obj, sort_keys=True)
print("json", len(text), hashlib.sha1(text.encode()).hexdigest())
assert json.loads(text) == obj
words = collections.Counter(re.findall(r"\w+", text))
print("words", len(words), words.most_common(3))
decimal.getcontext().prec = 60
print("decimal", decimal.Decimal(2).sqrt())
big = [list(range(i % 100)) for i in range(50000)]
print("lists", sum(map(len, big)))
"#;

#[test]
fn python3_with_c_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("work.py");
    std::fs::write(&script, PYTHON).unwrap();
    let out = same_as_native("python3", &[script.to_str().unwrap()], None);
    assert!(out.contains("sha256 "), "{out}");
}

#[test]
fn python3_error_exit_is_identical() {
    let out = same_as_native(
        "python3",
        &[
            "-c",
            "import sys; print('before'); sys.stderr.write('bad\\n'); sys.exit(3)",
        ],
        None,
    );
    assert_eq!(out, "before\n");
}

#[test]
fn bc_arbitrary_precision() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bc");
    std::fs::write(&input, "scale=2000\n4*a(1)\n2^10000 % 1000007\nsqrt(2)\n").unwrap();
    let out = same_as_native("bc", &["-l"], Some(&input));
    assert!(out.starts_with("3.14159"), "{out}");
}

#[test]
fn sort_large_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lines");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    let mut x: u64 = 88172645463325252;
    for _ in 0..1_500_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(f, "{:016x} {}", x, x % 1000).unwrap();
    }
    drop(f);
    // Large enough that sort uses big buffers and several threads.
    let out = same_as_native("sort", &["-k2,2n", "-k1,1", input.to_str().unwrap()], None);
    assert_eq!(out.lines().count(), 1_500_000);
}

#[test]
fn gzip_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data");
    let mut blob = Vec::new();
    for i in 0..400_000u32 {
        blob.extend_from_slice(format!("line {} {}\n", i, i.wrapping_mul(2654435761)).as_bytes());
    }
    std::fs::write(&input, &blob).unwrap();
    let out = same_as_native("gzip", &["-c", "-6"], Some(&input));
    assert!(!out.is_empty());
    // And decompression of what mome's gzip produced gives the data back.
    let gz = dir.path().join("data.gz");
    let o = std::process::Command::new(which("gzip"))
        .args(["-c", "-6"])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    std::fs::write(&gz, &o.stdout).unwrap();
    let home = Home::new();
    let o = home
        .command(&["-n", "1", which("gzip").to_str().unwrap(), "-dc"])
        .stdin(std::fs::File::open(&gz).unwrap())
        .output()
        .unwrap();
    assert_ok(&o, "gzip -dc under mome");
    assert!(o.stdout == blob, "decompressed data differs");
}

const MULTIPROCESSING: &str = r#"
import multiprocessing as mp, os
def square(x):
    return x * x
def bump(v, a):
    with v.get_lock():
        v.value += 1
    a[3] = 7.5
if __name__ == "__main__":
    with mp.Pool(3) as p:
        print(sum(p.map(square, range(1000))))
    q = mp.Queue()
    child = mp.Process(target=q.put, args=(os.getpid(),))
    child.start()
    print("child saw parent pid", q.get() == os.getpid())
    child.join()
    v, a = mp.Value("i", 0), mp.Array("d", 10)
    ps = [mp.Process(target=bump, args=(v, a)) for _ in range(4)]
    [x.start() for x in ps]
    [x.join() for x in ps]
    print("shared", v.value, a[3])
"#;

/// fork() children of a rank (multiprocessing's default start method) keep
/// working on their private copy of the heap; pipes, queues, locks work.
#[test]
fn python3_multiprocessing_forks() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mp.py");
    std::fs::write(&script, MULTIPROCESSING).unwrap();
    let out = same_as_native("python3", &[script.to_str().unwrap()], None);
    assert!(out.contains("shared 4 7.5"), "{out}");
}

/// Several ranks each run python (through pyenv's exec chain where present).
#[test]
fn python3_in_several_ranks() {
    let home = Home::new();
    let py = which("python3");
    let code = "import os, hashlib; print(os.environ['MOME_RANK'], os.environ['MOME_NRANKS'], hashlib.sha1(b'x').hexdigest()[:8])";
    let o = home.run(&["-n", "3", py.to_str().unwrap(), "-c", code]);
    assert_ok(&o, "python3 -n 3");
    let mut lines: Vec<String> = stdout(&o).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        vec!["[0] 0 3 11f6ad8e", "[1] 1 3 11f6ad8e", "[2] 2 3 11f6ad8e"]
    );
    home.assert_nothing_left();
}
