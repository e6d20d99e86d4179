//! Job configuration: `configs/default.yaml` documents every key; a user file
//! given with `mome-run --config` overrides some of them. Unknown keys and bad
//! values are errors that name the key and its line.

use std::path::Path;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::layout::WindowLayout;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// A byte size written `4096`, `64K`, `16M`, `1G`, `1T` (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A duration written as humantime does: `500ms`, `3s`, `10min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

/// An address written in hex (`0x200000000000`) or decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub window: WindowConfig,
    pub job: JobConfig,
    pub output: OutputConfig,
    pub checkpoint: CheckpointConfig,
    pub nodes: NodesConfig,
    pub redundancy: RedundancyConfig,
    pub memory: MemoryConfig,
}

/// Where the program's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// private: `malloc` and friends allocate from the rank's private
    /// heaps; shared: from the job's shared heaps (MomeMalloc, the same
    /// allocator as `mome_shmalloc`), so a malloc'ed structure can be
    /// reached from every rank of every node through its pointers.
    pub malloc: MallocMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MallocMode {
    #[default]
    Private,
    Shared,
}

/// Diskless checkpoints of multi-node jobs: where each node's checkpoint
/// data is kept besides the node itself, and what happens when a node
/// fails. A one-node job writes to `checkpoint.dir` as before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedundancyConfig {
    /// mirror (each node's increment held in memory by `copies` other
    /// nodes), xor (parity groups of `group` nodes), rs (Reed-Solomon,
    /// `data` + `parity` nodes per group), or disk (no memory copies: every
    /// stamp goes to `checkpoint.dir`, as on one node).
    pub scheme: SchemeName,
    pub copies: u32,
    pub group: u32,
    pub data: u32,
    pub parity: u32,
    /// Every this many stamps the stamp also goes to `checkpoint.dir`
    /// (whole-system failures); 0: never.
    pub disk_every: u32,
    /// Memory each node may use for checkpoint data (its own and what it
    /// holds for others); 0: no limit of its own.
    pub memory_limit: ByteSize,
    /// How long a node keeps its checkpoint memory after mome-run ended
    /// abnormally, for `mome-restart`.
    pub grace: Span,
    /// What mome-run does when a node fails: restart (from the newest
    /// recoverable stamp, the failed node's ranks on a replacement node)
    /// or stop (end the job, as without checkpoints).
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    Mirror,
    Xor,
    Rs,
    Disk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Restart,
    Stop,
}

impl Default for RedundancyConfig {
    fn default() -> Self {
        RedundancyConfig {
            scheme: SchemeName::Mirror,
            copies: 2,
            group: 4,
            data: 2,
            parity: 1,
            disk_every: 0,
            memory_limit: ByteSize(0),
            grace: Span(Duration::from_secs(600)),
            on_failure: OnFailure::Restart,
        }
    }
}

/// How ranks are placed on nodes and how the node agents talk to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Rank placement over `--nodes K`: block (ranks 0..N/K on node 0, ...)
    /// or cyclic (rank r on node r mod K). `mome-run --placement` too.
    pub placement: Placement,
    /// Address agents listen on for their peers (port 0: any free port).
    pub listen: String,
    /// How often an agent tells each peer it is alive.
    pub heartbeat_interval: Span,
    /// A peer silent for this long is declared failed, and the job ends.
    pub heartbeat_timeout: Span,
    /// How long an agent waits for a peer to answer a page or sync request
    /// before declaring the peer failed.
    pub peer_timeout: Span,
    /// Consistency model of the shared zone on every node, until the
    /// program changes it for a range with MomeConsistency: strong
    /// (sequential consistency), release or weak.
    pub consistency: crate::peer::Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Block,
    Cyclic,
}

impl Placement {
    /// Node of each rank, `ranks` ranks over `nodes` nodes.
    pub fn nodes_of(self, ranks: u32, nodes: u32) -> Vec<u32> {
        let nodes = nodes.max(1);
        (0..ranks)
            .map(|r| match self {
                Placement::Cyclic => r % nodes,
                // Contiguous blocks whose sizes differ by at most one.
                Placement::Block => ((r as u64 * nodes as u64) / ranks.max(1) as u64) as u32,
            })
            .collect()
    }
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            placement: Placement::Block,
            listen: "127.0.0.1:0".into(),
            heartbeat_interval: Span(Duration::from_millis(200)),
            heartbeat_timeout: Span(Duration::from_secs(5)),
            peer_timeout: Span(Duration::from_secs(10)),
            consistency: crate::peer::Model::Strong,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Store root; empty: `<jobdir>/ckpt`.
    pub dir: String,
    /// fsync data, indexes and manifests before a stamp counts as committed.
    pub fsync: bool,
    /// Committed stamps kept; older ones are deleted after each commit.
    pub keep: u32,
    /// Periodic checkpoints; 0 (the default) for none.
    pub interval: Span,
    /// Most pre-copy rounds before the pause (fewer when a round finds
    /// little left to copy).
    pub precopy_rounds: u32,
    /// How long ranks get to reach the checkpoint (park), before the
    /// checkpoint is abandoned.
    pub park_timeout: Span,
    /// How long mome-ckpt waits for a whole checkpoint to commit.
    pub timeout: Span,
    /// Signal used to bring ranks to the checkpoint (a real-time signal
    /// number or name: SIGRTMAX-2 by default); the program must not use it.
    pub signal: i32,
    /// Run each rank in its own pid namespace so that its pid (and tid)
    /// stay the same after a restart: auto (when permitted), always, never.
    pub pid_namespace: PidNamespaceMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PidNamespaceMode {
    Auto,
    Always,
    Never,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: String::new(),
            fsync: true,
            keep: 2,
            interval: Span(Duration::ZERO),
            precopy_rounds: 6,
            park_timeout: Span(Duration::from_secs(10)),
            timeout: Span(Duration::from_secs(600)),
            // SIGRTMAX - 2 on Linux/glibc (SIGRTMAX is 64).
            signal: 62,
            pid_namespace: PidNamespaceMode::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    pub base: Address,
    pub size: ByteSize,
    pub segment_reserve: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub kill_grace: Span,
    pub agent_ready_timeout: Span,
    pub agent_timeout: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixMode {
    /// Prefix lines with `[rank] ` when the job has more than one rank.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub prefix: PrefixMode,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            base: Address(0x2000_0000_0000),
            size: ByteSize(1 << 40),
            segment_reserve: ByteSize(16 << 30),
        }
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            kill_grace: Span(Duration::from_secs(3)),
            agent_ready_timeout: Span(Duration::from_secs(10)),
            agent_timeout: Span(Duration::from_secs(30)),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            prefix: PrefixMode::Auto,
        }
    }
}

impl Config {
    /// Parses YAML text; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        };
        // An empty file (or only comments) means "all defaults".
        let config: Config = if text.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#') || t == "---"
        }) {
            Config::default()
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| invalid(describe_yaml_error(&e)))?
        };
        config.validate().map_err(|(key, msg)| {
            let line = find_key_line(text, key)
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            invalid(format!("{key}{line}: {msg}"))
        })?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    pub fn layout(&self) -> WindowLayout {
        WindowLayout::new(
            self.window.base.0,
            self.window.size.0,
            self.window.segment_reserve.0,
        )
    }

    /// Checks values that parse but make no sense; returns the key at fault.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.layout().validate().map_err(|m| {
            let key = if m.starts_with("base") {
                "window.base"
            } else if m.starts_with("segment_reserve") {
                "window.segment_reserve"
            } else {
                "window.size"
            };
            (key, m)
        })?;
        let positive = [
            ("job.agent_ready_timeout", self.job.agent_ready_timeout),
            ("job.agent_timeout", self.job.agent_timeout),
            ("checkpoint.park_timeout", self.checkpoint.park_timeout),
            ("checkpoint.timeout", self.checkpoint.timeout),
            ("nodes.heartbeat_interval", self.nodes.heartbeat_interval),
            ("nodes.heartbeat_timeout", self.nodes.heartbeat_timeout),
            ("nodes.peer_timeout", self.nodes.peer_timeout),
        ];
        for (key, span) in positive {
            if span.0.is_zero() {
                return Err((key, "must be longer than 0".into()));
            }
        }
        if self.nodes.heartbeat_timeout.0 <= self.nodes.heartbeat_interval.0 {
            return Err((
                "nodes.heartbeat_timeout",
                "must be longer than nodes.heartbeat_interval".into(),
            ));
        }
        if self.nodes.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "nodes.listen",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:0",
                    self.nodes.listen
                ),
            ));
        }
        if self.checkpoint.keep == 0 {
            return Err(("checkpoint.keep", "must be at least 1".into()));
        }
        if !(34..=64).contains(&self.checkpoint.signal) {
            return Err((
                "checkpoint.signal",
                format!(
                    "{} is not a real-time signal (34 to 64)",
                    self.checkpoint.signal
                ),
            ));
        }
        Ok(())
    }
}

/// `key.path: message at line L column C`, the full dotted path coming from
/// serde_path_to_error (serde_yaml_ng alone names only the outer key).
fn describe_yaml_error(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> String {
    let inner = e.inner().to_string();
    let inner = inner
        .split_once(": ")
        .filter(|(head, _)| !head.contains(' '))
        .map_or(inner.as_str(), |(_, rest)| rest)
        .to_string();
    let path = e.path().to_string();
    if inner.contains("unknown field") {
        format!("unknown key under `{path}`: {inner}")
    } else {
        format!("{path}: {inner}")
    }
}

/// Line (1-based) of the last component of a dotted key, searched after its
/// parents so that `window.size` is not confused with another `size:`.
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let mut start = 0;
    let mut found = None;
    let lines: Vec<&str> = text.lines().collect();
    for part in dotted.split('.') {
        let idx = lines
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, l)| l.trim_start().starts_with(&format!("{part}:")))?
            .0;
        found = Some(idx + 1);
        start = idx + 1;
    }
    found
}

// ---- value syntaxes ----

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            None => (s, 1u64),
            Some((i, _)) => {
                let unit = s[i..].trim().to_ascii_uppercase();
                let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
                };
                (&s[..i], mult)
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 4096, 64K, 16M, 1G"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if n != 0 && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(ByteSize(n)),
            NumOrStr::Str(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Span).map_err(|e| {
            de::Error::custom(format!(
                "{s:?} is not a duration such as 500ms, 3s, 10min: {e}"
            ))
        })
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(Address(n)),
            NumOrStr::Str(s) => {
                let t = s.trim();
                let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                    None => t.replace('_', "").parse(),
                };
                parsed.map(Address).map_err(|_| {
                    de::Error::custom(format!("{s:?} is not an address such as 0x200000000000"))
                })
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_defaults() {
        let text = include_str!("../../configs/default.yaml");
        assert_eq!(
            Config::from_yaml(text, "default.yaml").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn overrides_and_units() {
        let c =
            Config::from_yaml("window:\n  size: 64G\njob:\n  kill_grace: 500ms\n", "t").unwrap();
        assert_eq!(c.window.size, ByteSize(64 << 30));
        assert_eq!(c.job.kill_grace, Span(Duration::from_millis(500)));
        assert_eq!(c.window.base, Address(0x2000_0000_0000));
        let c = Config::from_yaml("window:\n  base: 0x300000000000\n", "t").unwrap();
        assert_eq!(c.window.base, Address(0x3000_0000_0000));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::from_yaml("window:\n  size: 1T\n  sise: 2\n", "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sise"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let e = Config::from_yaml("job:\n  kill_grace: soon\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kill_grace") && e.contains("line 2"), "{e}");
        let e = Config::from_yaml("\n\nwindow:\n  size: 12M\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("window.size") && e.contains("line 4"), "{e}");
        let e = Config::from_yaml("output:\n  prefix: sometimes\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn placements() {
        assert_eq!(Placement::Block.nodes_of(5, 2), vec![0, 0, 0, 1, 1]);
        assert_eq!(Placement::Block.nodes_of(4, 4), vec![0, 1, 2, 3]);
        assert_eq!(Placement::Cyclic.nodes_of(5, 2), vec![0, 1, 0, 1, 0]);
        let e = Config::from_yaml("nodes:\n  listen: here\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nodes.listen") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn malloc_mode() {
        let c = Config::from_yaml("memory:\n  malloc: shared\n", "j").unwrap();
        assert_eq!(c.memory.malloc, MallocMode::Shared);
        assert_eq!(Config::default().memory.malloc, MallocMode::Private);
        let e = Config::from_yaml("memory:\n  malloc: global\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.malloc") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("4096").unwrap(), ByteSize(4096));
        assert_eq!(ByteSize::parse("16MiB").unwrap(), ByteSize(16 << 20));
        assert!(ByteSize::parse("3X").is_err());
        assert_eq!(ByteSize(1 << 40).to_string(), "1T");
    }
}
