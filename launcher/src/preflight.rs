//! Everything mome-run checks before it starts anything, so that a job that
//! cannot work fails at once with a sentence saying what to change, rather
//! than later in a rank with a cryptic error:
//!
//! - the program: found like execvp finds it, executable, and (through any
//!   chain of `#!` interpreters) a dynamically linked x86_64 ELF that is
//!   neither setuid nor setgid, since LD_PRELOAD must reach it;
//! - the kernel: userfaultfd on shared memory with write-protect, async
//!   write-protect and PAGEMAP_SCAN (Linux 6.7), and the permission to use
//!   them;
//! - the process: disabling ASLR is allowed, and the limits leave room for
//!   the window and for the job's pipes.
//!
//! Each check is a pub fn so that tests and a later `mome-run --check` can
//! call them one by one; [`check_all`] runs them in order.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use goblin::elf::header::{machine_to_str, ELFCLASS64, EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::{ProgramHeader, PT_INTERP};
use goblin::elf::Elf;
use mome_protocol::Config;
use mome_uffd::{feature, ioctl_bit, mode, pagemap, Uffd, UffdError};

/// How deep a chain of `#!` interpreters may go (the kernel allows 4 too).
pub const MAX_INTERPRETER_DEPTH: usize = 4;

/// The advice for a user who may not use userfaultfd.
const UFFD_PERMISSION_ADVICE: &str = "set `sysctl vm.unprivileged_userfaultfd=1`, or give this user read/write access to /dev/userfaultfd, or run with CAP_SYS_PTRACE";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{name}: not found (searched PATH)")]
    NotFoundInPath { name: String },
    #[error("{name}: no such file")]
    NoSuchFile { name: String },
    #[error("{subject}: permission denied: {path} is not executable")]
    NotExecutable { subject: String, path: PathBuf },
    #[error("{subject}: {path} is a directory")]
    IsDirectory { subject: String, path: PathBuf },
    #[error("{subject}: cannot read {path}: {source}")]
    Unreadable {
        subject: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: bad interpreter {interpreter}: not found")]
    InterpreterNotFound { name: String, interpreter: String },
    #[error("{name}: the #! line `{line}` names no interpreter")]
    EmptyInterpreter { name: String, line: String },
    #[error("{name}: more than {MAX_INTERPRETER_DEPTH} levels of #! interpreters ({chain})")]
    InterpreterLoop { name: String, chain: String },
    #[error("{subject} is neither an ELF executable nor a script starting with #!")]
    NotElf { subject: String },
    #[error("{subject} is an ELF {kind}, not a program")]
    NotAProgram { subject: String, kind: String },
    #[error("{subject} is a program for {arch}: mome runs x86_64 (64-bit) programs only")]
    WrongArch { subject: String, arch: String },
    #[error("{subject} is statically linked: LD_PRELOAD cannot inject libmome_preload.so into it; link it dynamically")]
    Static { subject: String },
    #[error("{subject} is {bit}: the dynamic loader ignores LD_PRELOAD for it; run a copy without the {bit} bit (`cp` makes one)")]
    Privileged { subject: String, bit: &'static str },
    #[error("userfaultfd is not available to this user ({detail}): {UFFD_PERMISSION_ADVICE}")]
    UffdPermission { detail: String },
    #[error("this kernel ({release}) has no userfaultfd ({detail}): mome needs Linux 6.7 or later built with CONFIG_USERFAULTFD")]
    UffdMissing { release: String, detail: String },
    #[error("{what}: {advice}")]
    KernelFeature { what: String, advice: String },
    #[error("cannot disable address-space randomization for the ranks (personality(ADDR_NO_RANDOMIZE): {errno}); a seccomp filter (a container's?) forbids it: allow the personality syscall")]
    Aslr { errno: nix::errno::Errno },
    #[error("{0}")]
    Limit(String),
}

impl PreflightError {
    /// Exit status of mome-run for this error: 127 and 126 as a shell
    /// reports a command not found or not executable, 2 for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            PreflightError::NotFoundInPath { .. }
            | PreflightError::NoSuchFile { .. }
            | PreflightError::InterpreterNotFound { .. } => 127,
            PreflightError::NotExecutable { .. }
            | PreflightError::IsDirectory { .. }
            | PreflightError::Unreadable { .. } => 126,
            _ => 2,
        }
    }
}

/// What the checks found, for the coordinator's log.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Absolute path of the program (what is exec'd).
    pub program: PathBuf,
    /// `#!` interpreters the kernel will run, outermost first.
    pub interpreters: Vec<PathBuf>,
    pub kernel: KernelReport,
}

/// Runs every check, in the order a user would fix them.
pub fn check_all(
    program: &OsStr,
    config: &Config,
    ranks: u32,
    nodes: u32,
    cwd: &Path,
) -> Result<Checked, PreflightError> {
    let path_var = std::env::var_os("PATH");
    let resolved = resolve_program(program, path_var.as_deref(), cwd)?;
    let interpreters = check_program(
        &program.to_string_lossy(),
        &resolved,
        path_var.as_deref(),
        cwd,
    )?;
    let kernel = check_kernel()?;
    check_aslr_control()?;
    check_limits(config, ranks, nodes)?;
    Ok(Checked {
        program: resolved,
        interpreters,
        kernel,
    })
}

// ---- the program ----

/// Finds `name` as execvp(3) does: a name with a `/` is a path (relative to
/// `cwd`), any other is looked up in each directory of `path_var` (an empty
/// entry meaning the current directory). Returns an absolute path.
pub fn resolve_program(
    name: &OsStr,
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> Result<PathBuf, PreflightError> {
    let display = name.to_string_lossy().into_owned();
    if name.is_empty() {
        return Err(PreflightError::NoSuchFile { name: display });
    }
    if name.as_bytes().contains(&b'/') {
        let path = absolute(cwd, Path::new(name));
        return match std::fs::metadata(&path) {
            Err(_) => Err(PreflightError::NoSuchFile { name: display }),
            Ok(meta) if meta.is_dir() => Err(PreflightError::IsDirectory {
                subject: display,
                path,
            }),
            Ok(_) if !is_executable(&path) => Err(PreflightError::NotExecutable {
                subject: display,
                path,
            }),
            Ok(_) => Ok(path),
        };
    }
    // glibc's default when PATH is unset (confstr _CS_PATH).
    let search = path_var.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut not_executable = None;
    for dir in search.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = absolute(cwd, &dir.join(name));
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => {
                if is_executable(&candidate) {
                    return Ok(candidate);
                }
                // execvp goes on searching and reports EACCES only if
                // nothing executable is found further on.
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    match not_executable {
        Some(path) => Err(PreflightError::NotExecutable {
            subject: display,
            path,
        }),
        None => Err(PreflightError::NotFoundInPath { name: display }),
    }
}

/// `cwd/path`, with `.` components removed (not `..`: through a symlink
/// that would change the meaning).
fn absolute(cwd: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    joined
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

fn is_executable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
}

/// Checks `path` (the resolved program, `name` as the user typed it) and the
/// `#!` interpreters it goes through; returns those interpreters.
pub fn check_program(
    name: &str,
    path: &Path,
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> Result<Vec<PathBuf>, PreflightError> {
    let mut interpreters: Vec<PathBuf> = Vec::new();
    let mut current = path.to_path_buf();
    loop {
        let subject = match interpreters.last() {
            None => name.to_string(),
            Some(interp) => format!("{name}: its interpreter {}", interp.display()),
        };
        let mut file = File::open(&current).map_err(|source| PreflightError::Unreadable {
            subject: subject.clone(),
            path: current.clone(),
            source,
        })?;
        // The kernel reads at most 256 bytes of a #! line (BINPRM_BUF_SIZE).
        let mut head = [0u8; 256];
        let len =
            read_up_to(&mut file, &mut head).map_err(|source| PreflightError::Unreadable {
                subject: subject.clone(),
                path: current.clone(),
                source,
            })?;
        let head = &head[..len];
        let Some(line) = head.strip_prefix(b"#!") else {
            check_elf(&subject, &current, &mut file)?;
            return Ok(interpreters);
        };
        if interpreters.len() == MAX_INTERPRETER_DEPTH {
            let mut chain = vec![path.display().to_string()];
            chain.extend(interpreters.iter().map(|p| p.display().to_string()));
            return Err(PreflightError::InterpreterLoop {
                name: name.to_string(),
                chain: chain.join(" -> "),
            });
        }
        let next = interpreter_of(name, line, path_var, cwd)?;
        interpreters.push(next.clone());
        current = next;
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The program a `#!` line makes the kernel run. `#!/usr/bin/env NAME`
/// runs NAME from PATH: that is the program that matters, so it is
/// returned instead of env.
fn interpreter_of(
    name: &str,
    line: &[u8],
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> Result<PathBuf, PreflightError> {
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line).trim().to_string();
    let mut words = text.split_whitespace();
    let Some(interpreter) = words.next() else {
        return Err(PreflightError::EmptyInterpreter {
            name: name.to_string(),
            line: format!("#!{text}"),
        });
    };
    let interpreter_path = absolute(cwd, Path::new(interpreter));
    let not_found = || PreflightError::InterpreterNotFound {
        name: name.to_string(),
        interpreter: interpreter.to_string(),
    };
    match std::fs::metadata(&interpreter_path) {
        Err(_) => return Err(not_found()),
        Ok(meta) if meta.is_dir() => {
            return Err(PreflightError::IsDirectory {
                subject: name.to_string(),
                path: interpreter_path,
            })
        }
        Ok(_) if !is_executable(&interpreter_path) => {
            return Err(PreflightError::NotExecutable {
                subject: name.to_string(),
                path: interpreter_path,
            })
        }
        Ok(_) => {}
    }
    if interpreter_path.file_name() != Some(OsStr::new("env")) {
        return Ok(interpreter_path);
    }
    // `env [-S] [-i] [VAR=value]... NAME [args]`: the first word that is
    // neither an option nor an assignment names the program.
    let target = words
        .flat_map(|w| w.split_whitespace())
        .find(|w| !w.starts_with('-') && !w.contains('='));
    match target {
        // `#!/usr/bin/env` alone: env would print the environment.
        None => Ok(interpreter_path),
        Some(command) => resolve_program(OsStr::new(command), path_var, cwd).map_err(|e| match e {
            PreflightError::NotFoundInPath { .. } | PreflightError::NoSuchFile { .. } => {
                PreflightError::InterpreterNotFound {
                    name: name.to_string(),
                    interpreter: format!("{command} (from `#!{text}`, searched PATH)"),
                }
            }
            other => other,
        }),
    }
}

/// Checks that the ELF file at `path` is a dynamically linked x86_64
/// program that the loader will inject LD_PRELOAD into.
fn check_elf(subject: &str, path: &Path, file: &mut File) -> Result<(), PreflightError> {
    let unreadable = |source| PreflightError::Unreadable {
        subject: subject.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let not_elf = || PreflightError::NotElf {
        subject: subject.to_string(),
    };
    let mut head = vec![0u8; 64 * 1024];
    let len = file.read_at(&mut head, 0).map_err(unreadable)?;
    head.truncate(len);
    if !head.starts_with(b"\x7fELF") {
        return Err(not_elf());
    }
    let header = Elf::parse_header(&head).map_err(|_| not_elf())?;
    if header.e_machine != EM_X86_64 || header.e_ident[4] != ELFCLASS64 {
        let bits = if header.e_ident[4] == ELFCLASS64 {
            "64-bit"
        } else {
            "32-bit"
        };
        return Err(PreflightError::WrongArch {
            subject: subject.to_string(),
            arch: format!("{} ({bits})", machine_to_str(header.e_machine)),
        });
    }
    if header.e_type != ET_EXEC && header.e_type != ET_DYN {
        return Err(PreflightError::NotAProgram {
            subject: subject.to_string(),
            kind: goblin::elf::header::et_to_str(header.e_type).to_string(),
        });
    }
    let ctx = goblin::container::Ctx::new(
        header.container().map_err(|_| not_elf())?,
        header.endianness().map_err(|_| not_elf())?,
    );
    let phoff = header.e_phoff as usize;
    let phnum = header.e_phnum as usize;
    let ph_end = phoff.saturating_add(phnum.saturating_mul(header.e_phentsize as usize));
    // Program headers usually follow the ELF header; read them separately
    // when they are further than what was read.
    let program_headers = if ph_end <= head.len() {
        ProgramHeader::parse(&head, phoff, phnum, ctx)
    } else {
        let mut table = vec![0u8; ph_end - phoff];
        file.read_exact_at(&mut table, phoff as u64)
            .map_err(unreadable)?;
        ProgramHeader::parse(&table, 0, phnum, ctx)
    }
    .map_err(|_| not_elf())?;
    // No PT_INTERP means no dynamic loader (static, and static-pie too):
    // nobody reads LD_PRELOAD.
    if !program_headers.iter().any(|ph| ph.p_type == PT_INTERP) {
        return Err(PreflightError::Static {
            subject: subject.to_string(),
        });
    }
    let mode = file.metadata().map_err(unreadable)?.permissions().mode();
    if mode & libc::S_ISUID != 0 {
        return Err(PreflightError::Privileged {
            subject: subject.to_string(),
            bit: "setuid",
        });
    }
    // setgid without group execute is mandatory locking, not setgid exec.
    if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
        return Err(PreflightError::Privileged {
            subject: subject.to_string(),
            bit: "setgid",
        });
    }
    Ok(())
}

// ---- the kernel ----

/// userfaultfd features the agent and the preload library rely on.
pub const REQUIRED_FEATURES: u64 = feature::WP_HUGETLBFS_SHMEM
    | feature::WP_ASYNC
    | feature::WP_UNPOPULATED
    | feature::MISSING_SHMEM;

/// Names and first Linux release of the features mome asks for.
const FEATURE_NAMES: [(u64, &str, (u32, u32)); 4] = [
    (feature::MISSING_SHMEM, "MISSING_SHMEM", (4, 11)),
    (feature::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM", (5, 19)),
    (feature::WP_UNPOPULATED, "WP_UNPOPULATED", (6, 4)),
    (feature::WP_ASYNC, "WP_ASYNC", (6, 7)),
];

/// What the kernel offered.
#[derive(Debug, Clone)]
pub struct KernelReport {
    pub release: String,
    /// userfaultfd features offered.
    pub features: u64,
    /// Whether userfaultfd came from the syscall or /dev/userfaultfd.
    pub via_device: bool,
}

/// Checks userfaultfd (with the features mome uses, on a shared memfd
/// mapping, with MISSING and write-protect registration) and PAGEMAP_SCAN.
pub fn check_kernel() -> Result<KernelReport, PreflightError> {
    let release = crate::os::kernel_release();
    let uffd = Uffd::open(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|e| match e {
        UffdError::Unavailable { syscall, device } if syscall.0 == libc::ENOSYS => {
            PreflightError::UffdMissing {
                release: release.clone(),
                detail: format!("userfaultfd(2): {syscall}; /dev/userfaultfd: {device}"),
            }
        }
        UffdError::Unavailable { syscall, device } => PreflightError::UffdPermission {
            detail: format!("userfaultfd(2): {syscall}; /dev/userfaultfd: {device}"),
        },
        other => PreflightError::KernelFeature {
            what: format!("userfaultfd: {other}"),
            advice: needs_linux((6, 7), &release),
        },
    })?;
    let features = uffd.api(REQUIRED_FEATURES).map_err(|e| match e {
        UffdError::MissingFeatures { missing, .. } => {
            let names: Vec<&str> = FEATURE_NAMES
                .iter()
                .filter(|(bit, ..)| missing & bit != 0)
                .map(|(_, name, _)| *name)
                .collect();
            let needed = FEATURE_NAMES
                .iter()
                .filter(|(bit, ..)| missing & bit != 0)
                .map(|(.., version)| *version)
                .max()
                .unwrap_or((6, 7));
            PreflightError::KernelFeature {
                what: format!(
                    "the kernel lacks the userfaultfd features {}",
                    names.join(", ")
                ),
                advice: needs_linux(needed, &release),
            }
        }
        other => PreflightError::KernelFeature {
            what: format!("the userfaultfd handshake failed: {other}"),
            advice: needs_linux((6, 7), &release),
        },
    })?;
    let via_device = uffd.origin() == mome_uffd::Origin::Device;

    let mapping = SharedTestMapping::new().map_err(|e| PreflightError::KernelFeature {
        what: format!("cannot map a shared memfd to test userfaultfd on: {e}"),
        advice: "check the memory limits of this user (ulimit -v, cgroup)".to_string(),
    })?;
    let ioctls = uffd
        .register(mapping.addr, mapping.len, mode::MISSING | mode::WP)
        .map_err(|e| PreflightError::KernelFeature {
            what: format!("registering shared memory with userfaultfd for missing-page and write-protect faults failed ({e})"),
            advice: needs_linux((6, 7), &release),
        })?;
    let wanted = [
        (ioctl_bit::COPY, "UFFDIO_COPY"),
        (ioctl_bit::WRITEPROTECT, "UFFDIO_WRITEPROTECT"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bit, _)| ioctls & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(PreflightError::KernelFeature {
            what: format!(
                "userfaultfd offers no {} on shared memory",
                missing.join(" or ")
            ),
            advice: needs_linux((6, 7), &release),
        });
    }

    let pagemap = File::open("/proc/self/pagemap").map_err(|e| PreflightError::KernelFeature {
        what: format!("cannot open /proc/self/pagemap ({e})"),
        advice: "mome needs /proc mounted, with pagemap readable by the job's user".to_string(),
    })?;
    let mut regions = [pagemap::PageRegion::default(); 4];
    let query = pagemap::Query {
        category_mask: pagemap::PAGE_IS_WRITTEN,
        return_mask: pagemap::PAGE_IS_WRITTEN,
        ..Default::default()
    };
    pagemap::scan(
        pagemap.as_raw_fd(),
        mapping.addr,
        mapping.addr + mapping.len,
        query,
        &mut regions,
    )
    .map_err(|e| PreflightError::KernelFeature {
        what: format!("the PAGEMAP_SCAN ioctl failed ({e})"),
        advice: needs_linux((6, 7), &release),
    })?;
    // Unregister before the mapping goes away (dropping the fd would too).
    let _ = uffd.unregister(mapping.addr, mapping.len);
    Ok(KernelReport {
        release,
        features,
        via_device,
    })
}

/// "needs Linux X.Y or later (this is R)", or, when the release is already
/// recent enough, the kernel configuration that is missing.
fn needs_linux(version: (u32, u32), release: &str) -> String {
    let (major, minor) = version;
    match parse_release(release) {
        Some(have) if have >= version => format!(
            "needs Linux {major}.{minor} or later with userfaultfd write-protect on shared memory; this kernel ({release}) is recent enough but lacks it: build it with CONFIG_USERFAULTFD and CONFIG_PTE_MARKER_UFFD_WP"
        ),
        _ => format!("needs Linux {major}.{minor} or later (this is {release})"),
    }
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A few pages of a memfd mapped MAP_SHARED, as the window is; unmapped on
/// drop. Never touched: a registered missing page would block forever.
struct SharedTestMapping {
    addr: u64,
    len: u64,
    _memfd: OwnedFd,
}

impl SharedTestMapping {
    fn new() -> std::io::Result<SharedTestMapping> {
        let len: u64 = 4 * 4096;
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"mome-preflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping chosen by the kernel; it overlaps
        // nothing of ours and is unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedTestMapping {
            addr: addr as u64,
            len,
            _memfd: memfd,
        })
    }
}

impl Drop for SharedTestMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which no
        // reference points into.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

// ---- the process ----

/// Checks that this process may run its ranks with ASLR disabled (the
/// personality syscall can be forbidden by a seccomp filter), by setting
/// the flag on itself and putting the old personality back.
pub fn check_aslr_control() -> Result<(), PreflightError> {
    use nix::sys::personality::{self, Persona};
    let current = personality::get().map_err(|errno| PreflightError::Aslr { errno })?;
    personality::set(current | Persona::ADDR_NO_RANDOMIZE)
        .map_err(|errno| PreflightError::Aslr { errno })?;
    personality::set(current).map_err(|errno| PreflightError::Aslr { errno })?;
    Ok(())
}

/// File descriptors mome-run holds per rank (stdout, stderr, stdin) and
/// per agent (stdin, stdout), plus its own.
pub fn fds_needed(ranks: u32, nodes: u32) -> u64 {
    3 * ranks as u64 + 2 * nodes as u64 + 64
}

/// Checks the limits that would make the job fail later: the address-space
/// limit against the window, and open files against the ranks' pipes.
pub fn check_limits(config: &Config, ranks: u32, nodes: u32) -> Result<(), PreflightError> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let window = config.window.size;
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_AS) {
        // The window is address space only, but it counts against RLIMIT_AS;
        // leave room for the program itself.
        let room = window.0.saturating_add(4 << 30);
        if soft != RLIM_INFINITY && soft < room {
            return Err(PreflightError::Limit(format!(
                "the address-space limit (ulimit -v) is {} but the DSM window alone takes {window}: run `ulimit -v unlimited`, or make window.size smaller in the --config file",
                mome_protocol::config::ByteSize(soft)
            )));
        }
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let needed = fds_needed(ranks, nodes);
        if hard != RLIM_INFINITY && hard < needed {
            return Err(PreflightError::Limit(format!(
                "{ranks} ranks need {needed} open files in mome-run but the hard limit (ulimit -Hn) is {hard}: raise it, or run fewer ranks"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        let cwd = Path::new("/");
        let sh = resolve_program(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin:/usr/bin")),
            cwd,
        )
        .unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        let e = resolve_program(
            OsStr::new("no-such-program-xyz"),
            Some(OsStr::new("/bin")),
            cwd,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 127);
        assert_eq!(
            e.to_string(),
            "no-such-program-xyz: not found (searched PATH)"
        );
        let p = resolve_program(OsStr::new("./bin/./sh"), None, Path::new("/usr")).unwrap();
        assert_eq!(p, Path::new("/usr/bin/sh"));
        let e = resolve_program(OsStr::new("/etc/hostname-nope"), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 127);
        let e = resolve_program(OsStr::new("/etc/passwd"), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 126, "{e}");
        let e = resolve_program(OsStr::new("/etc"), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 126, "{e}");
    }

    #[test]
    fn dynamic_elf_passes_and_scripts_check_their_interpreter() {
        let cwd = Path::new("/");
        let path = std::env::var_os("PATH");
        let sh = resolve_program(OsStr::new("sh"), path.as_deref(), cwd).unwrap();
        assert!(check_program("sh", &sh, path.as_deref(), cwd)
            .unwrap()
            .is_empty());

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/usr/bin/env sh\necho hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let chain = check_program("s", &script, path.as_deref(), cwd).unwrap();
        assert_eq!(chain.len(), 1);
        assert!(chain[0].ends_with("sh"));

        std::fs::write(&script, "#!/nonexistent/interp -x\n").unwrap();
        let e = check_program("s", &script, path.as_deref(), cwd).unwrap_err();
        assert_eq!(e.exit_code(), 127, "{e}");

        // A script whose interpreter is itself: too deep.
        std::fs::write(&script, format!("#!{}\n", script.display())).unwrap();
        let e = check_program("s", &script, path.as_deref(), cwd).unwrap_err();
        assert!(e.to_string().contains("levels of #!"), "{e}");

        std::fs::write(&script, "plain text\n").unwrap();
        let e = check_program("s", &script, path.as_deref(), cwd).unwrap_err();
        assert_eq!(
            e.to_string(),
            "s is neither an ELF executable nor a script starting with #!"
        );
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn release_versions() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert!(needs_linux((6, 7), "5.15.0").contains("needs Linux 6.7 or later (this is 5.15.0)"));
        assert!(needs_linux((6, 7), "6.8.0").contains("CONFIG_PTE_MARKER_UFFD_WP"));
    }
}
