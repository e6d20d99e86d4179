//! Property-based fuzzing of the frame decoders, which agents run on bytes
//! from untrusted peers: whatever the bytes, `frame::body_len`,
//! `frame::decode::<PeerMsg | RankRequest | AgentReply>` and
//! `PeerMsg::validate` must answer (an error for a malformed message), never
//! panic, hang or allocate much more than the input.
//!
//! - `arbitrary_bytes_never_panic`: random bytes, and valid frames of every
//!   message mutated (bytes flipped or set, truncated, extended with garbage,
//!   header replaced, oversized lengths), fed to every decoder as a stream of
//!   frames; any message decoded is validated and re-encoded.
//! - `*_round_trip`: every variant of every message encodes and decodes back
//!   to itself; `validate` accepts exactly page grants of `PAGE_SIZE` bytes
//!   and texts of at most 4096 bytes.
//! - `huge_*`: postcard length prefixes announcing up to 2^64-1 elements fail
//!   fast, without allocating more than the input.
//!
//! Each decode runs under a counting allocator (this test binary's global
//! allocator): the largest single allocation and the total allocated while
//! decoding a body of `n` bytes are checked against `n`.
//!
//! Corpus: `fuzz-corpus/peer/*.bin` (PeerMsg frames) and
//! `fuzz-corpus/rank/*.bin` (RankRequest frames; AgentReply for names
//! containing `-reply-`), each a whole frame (header + body). `valid-*` must
//! decode (and validate), `bad-*` must be refused at some step (header,
//! length, decode or validate). Regenerate with
//! `cargo test -p mome-protocol --test fuzz_decode -- --ignored write_corpus`.
//!
//! The number of cases of each property is fixed (see `config`); set
//! `MOME_FUZZ_CASES` for a longer run. Failures found are saved in
//! `proptest-regressions/fuzz_decode.txt` and replayed first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mome_protocol::frame::{self, FrameError, HEADER, MAX_FRAME};
use mome_protocol::layout::{WindowLayout, Zone, PAGE_SIZE};
use mome_protocol::peer::{
    Model, PageData, PeerMsg, SegmentAnswer, SegmentOp, SyncAnswer, SyncOp, MAX_DELTA,
    MAX_PREFETCH, NONCE_LEN, PEER_PROTOCOL_VERSION,
};
use mome_protocol::rank::{AgentReply, Channel, ErrorCode, RankRequest};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::FileFailurePersistence;

// ---------------------------------------------------------------------------
// Allocation accounting

/// Global allocator counting, on the threads that ask for it, the largest
/// single allocation and the total bytes allocated.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            PEAK.with(|p| p.set(p.get().max(size)));
            TOTAL.with(|t| t.set(t.get().saturating_add(size)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Debug, Clone, Copy)]
struct Usage {
    peak: usize,
    total: usize,
    elapsed: Duration,
}

/// Runs `f` and returns what it allocated on this thread, and how long it took.
fn measured<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    PEAK.with(|p| p.set(0));
    TOTAL.with(|t| t.set(0));
    COUNTING.with(|c| c.set(true));
    let start = Instant::now();
    let r = f();
    let elapsed = start.elapsed();
    COUNTING.with(|c| c.set(false));
    let usage = Usage {
        peak: PEAK.with(|p| p.get()),
        total: TOTAL.with(|t| t.get()),
        elapsed,
    };
    (r, usage)
}

/// Bytes in memory per byte on the wire, at most, of what a decoder builds.
/// postcard gives serde a Vec's length as size hint when the input still
/// holds that many bytes (one per element, whatever the element's least
/// encoding), and serde preallocates that many elements, up to 1 MiB; growth
/// by doubling may reach twice the elements present. A Vec<u8> or String
/// costs at most 2 bytes a byte. But an element of `PageGrant.extra`,
/// `(u64, PageData)`, is 32 bytes in memory: a grant announcing 32768
/// prefetched pages, followed by 32 KiB of anything, has serde allocate
/// 1 MiB before the first element fails (found by `arbitrary_bytes_never_panic`;
/// see `prefetch_list_allocation_is_bounded`).
const PEER_AMPLIFICATION: usize = std::mem::size_of::<(u64, PageData)>();
const RANK_AMPLIFICATION: usize = 2;

fn check_usage(what: &str, body: &[u8], u: Usage) {
    let n = body.len();
    let factor = if what.starts_with("PeerMsg") {
        PEER_AMPLIFICATION
    } else {
        RANK_AMPLIFICATION
    };
    assert!(
        u.peak <= factor * n + 64,
        "{what}: decoding {n} bytes allocated a block of {} bytes: {body:02x?}",
        u.peak
    );
    assert!(
        u.total <= 2 * factor * n + 256,
        "{what}: decoding {n} bytes allocated {} bytes in all: {body:02x?}",
        u.total
    );
    assert!(
        u.elapsed < Duration::from_secs(2),
        "{what}: decoding {n} bytes took {:?}",
        u.elapsed
    );
}

// ---------------------------------------------------------------------------
// Harness: what an agent does with received bytes

fn encode_frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER + MAX_FRAME];
    let n = frame::encode(msg, &mut buf).expect("message fits in a frame");
    buf.truncate(n);
    buf
}

fn header_of(bytes: &[u8]) -> [u8; HEADER] {
    bytes[..HEADER].try_into().unwrap()
}

/// Decodes `body` as every message type; any message decoded is validated
/// (PeerMsg), re-encoded, and must decode again to itself.
fn decode_all(body: &[u8]) {
    let (peer, u) = measured(|| frame::decode::<PeerMsg>(body));
    check_usage("PeerMsg", body, u);
    if let Ok(m) = peer {
        let _ = m.name();
        let _ = m.validate();
        let again = encode_frame(&m);
        assert_eq!(frame::decode::<PeerMsg>(&again[HEADER..]).as_ref(), Ok(&m));
    }
    let (req, u) = measured(|| frame::decode::<RankRequest>(body));
    check_usage("RankRequest", body, u);
    if let Ok(m) = req {
        let again = encode_frame(&m);
        assert_eq!(frame::decode::<RankRequest>(&again[HEADER..]), Ok(m));
    }
    let (reply, u) = measured(|| frame::decode::<AgentReply>(body));
    check_usage("AgentReply", body, u);
    if let Ok(m) = reply {
        let again = encode_frame(&m);
        assert_eq!(frame::decode::<AgentReply>(&again[HEADER..]), Ok(m));
    }
}

/// Reads `bytes` as a stream of frames, as an agent's reader does, decoding
/// each complete body (and a truncated last one); also decodes the raw bytes.
fn exercise(bytes: &[u8]) {
    let mut rest = bytes;
    while rest.len() >= HEADER {
        let header = header_of(rest);
        let announced = u32::from_le_bytes(header) as usize;
        let len = match frame::body_len(header) {
            Ok(len) => {
                assert_eq!(len, announced);
                assert!(len <= MAX_FRAME);
                len
            }
            Err(e) => {
                assert!(announced > MAX_FRAME);
                assert_eq!(e, FrameError::Oversized(announced));
                break;
            }
        };
        match rest.get(HEADER..HEADER + len) {
            Some(body) => {
                decode_all(body);
                rest = &rest[HEADER + len..];
            }
            None => {
                // A reader waits for the rest; a truncated body must not
                // decode as a message of the announced length anyway.
                decode_all(&rest[HEADER..]);
                break;
            }
        }
    }
    decode_all(bytes);
}

// ---------------------------------------------------------------------------
// Strategies: PeerMsg

/// Deterministic filler bytes (splitmix64), cheaper than proptest's per-byte
/// value trees for whole pages.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Short texts of any characters, and ASCII ones around the 4096-byte limit.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect::<String>()),
        1 => (4090usize..4100).prop_map(|n| "n".repeat(n)),
    ]
}

fn arb_page_data() -> impl Strategy<Value = Option<Vec<u8>>> {
    let page = PAGE_SIZE as usize;
    prop_oneof![
        2 => Just(None),
        4 => any::<u64>().prop_map(move |s| Some(filler(s, page))),
        1 => (prop_oneof![Just(0), Just(1), Just(page - 1), Just(page + 1), Just(2 * page)],
              any::<u64>())
            .prop_map(|(n, s)| Some(filler(s, n))),
        1 => (0..3 * page, any::<u64>()).prop_map(|(n, s)| Some(filler(s, n))),
    ]
}

/// Prefetched pages of a grant: none mostly, up to two more than allowed,
/// some of another size than a page.
fn arb_extra() -> impl Strategy<Value = Vec<(u64, PageData)>> {
    let page = PAGE_SIZE as usize;
    let one = (
        any::<u64>(),
        prop_oneof![
            8 => Just(page),
            1 => prop_oneof![Just(0), Just(page - 1), Just(page + 1)],
        ],
        any::<u64>(),
    )
        .prop_map(|(epoch, len, seed)| (epoch, filler(seed, len)));
    prop_oneof![
        2 => Just(Vec::new()),
        2 => vec(one, 0..=MAX_PREFETCH as usize + 2),
    ]
}

/// Drops prefetched pages of a grant until it fits in a frame.
fn fit_in_frame(mut m: PeerMsg) -> PeerMsg {
    if let PeerMsg::PageGrant { data, extra, .. } = &mut m {
        let size = |data: &Option<PageData>, extra: &Vec<(u64, PageData)>| {
            64 + data.as_ref().map_or(0, |d| d.len() + 3)
                + extra.iter().map(|(_, d)| d.len() + 13).sum::<usize>()
        };
        while size(data, extra) > MAX_FRAME {
            extra.pop();
        }
    }
    m
}

const ERROR_CODES: [ErrorCode; 8] = [
    ErrorCode::Invalid,
    ErrorCode::NoSpace,
    ErrorCode::NotFound,
    ErrorCode::Exists,
    ErrorCode::TooBig,
    ErrorCode::Refused,
    ErrorCode::Busy,
    ErrorCode::NodeFailed,
];

/// Position of `code` in ERROR_CODES; no wildcard, so a new code fails to
/// compile here until it is added above.
fn error_code_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::Invalid => 0,
        ErrorCode::NoSpace => 1,
        ErrorCode::NotFound => 2,
        ErrorCode::Exists => 3,
        ErrorCode::TooBig => 4,
        ErrorCode::Refused => 5,
        ErrorCode::Busy => 6,
        ErrorCode::NodeFailed => 7,
    }
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ERROR_CODES.to_vec())
}

fn arb_sync_op() -> impl Strategy<Value = SyncOp> {
    prop_oneof![
        Just(SyncOp::Barrier),
        any::<u64>().prop_map(|id| SyncOp::Lock { id }),
        any::<u64>().prop_map(|id| SyncOp::TryLock { id }),
        any::<u64>().prop_map(|id| SyncOp::Unlock { id }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, count)| SyncOp::KeyedBarrier { id, count }),
    ]
}

fn arb_sync_answer() -> impl Strategy<Value = SyncAnswer> {
    prop_oneof![
        Just(SyncAnswer::Ok),
        any::<u64>().prop_map(|date| SyncAnswer::BarrierDone { date }),
        any::<bool>().prop_map(|serial| SyncAnswer::KeyedBarrierDone { serial }),
        Just(SyncAnswer::Busy),
        arb_text().prop_map(SyncAnswer::Error),
    ]
}

fn arb_segment_op() -> impl Strategy<Value = SegmentOp> {
    prop_oneof![
        (arb_text(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(name, size, create, exclusive)| SegmentOp::Open {
                name,
                size,
                create,
                exclusive
            }
        ),
        (any::<u32>(), any::<u64>()).prop_map(|(id, size)| SegmentOp::Resize { id, size }),
        arb_text().prop_map(|name| SegmentOp::Unlink { name }),
        any::<u32>().prop_map(|id| SegmentOp::Release { id }),
        any::<u32>().prop_map(|id| SegmentOp::Use { id }),
    ]
}

fn arb_segment_answer() -> impl Strategy<Value = SegmentAnswer> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(slot, size, created)| {
            SegmentAnswer::Segment {
                slot,
                size,
                created,
            }
        }),
        Just(SegmentAnswer::Ok),
        (arb_error_code(), arb_text())
            .prop_map(|(code, message)| SegmentAnswer::Error { code, message }),
    ]
}

fn arb_peer_msg() -> impl Strategy<Value = PeerMsg> {
    let nonce = any::<[u8; NONCE_LEN]>;
    prop_oneof![
        (any::<u32>(), arb_text(), any::<u32>(), nonce()).prop_map(
            |(protocol, job, node, nonce)| PeerMsg::Hello {
                protocol,
                job,
                node,
                nonce
            }
        ),
        (any::<u32>(), nonce(), nonce()).prop_map(|(node, nonce, proof)| PeerMsg::Challenge {
            node,
            nonce,
            proof
        }),
        nonce().prop_map(|proof| PeerMsg::Proof { proof }),
        arb_text().prop_map(|reason| PeerMsg::Refused { reason }),
        Just(PeerMsg::Heartbeat),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            prop_oneof![3 => 0..=MAX_PREFETCH, 1 => any::<u32>()],
        )
            .prop_map(|(page, from, req, write, has_copy, hops, prefetch)| {
                PeerMsg::PageRequest {
                    page,
                    from,
                    req,
                    write,
                    has_copy,
                    hops,
                    prefetch,
                    contract: if write { Model::Release } else { Model::Strong },
                    copy_date: req / 2,
                    date: req,
                }
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            arb_page_data(),
            arb_extra(),
        )
            .prop_map(|(page, req, write, epoch, copyset, data, extra)| {
                fit_in_frame(PeerMsg::PageGrant {
                    page,
                    req,
                    write,
                    epoch,
                    copyset,
                    data,
                    extra,
                    date: epoch,
                    twin: write && copyset == 0,
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(page, epoch, new_owner)| {
            PeerMsg::Invalidate {
                page,
                epoch,
                new_owner,
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(page, epoch)| PeerMsg::InvalidateAck { page, epoch }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            prop_oneof![
                3 => proptest::collection::vec(any::<u8>(), 4..=64),
                1 => proptest::collection::vec(any::<u8>(), 0..=MAX_DELTA + 8),
            ],
        )
            .prop_map(|(page, from, date, hops, delta)| PeerMsg::PageDiff {
                page,
                from,
                req: date ^ page,
                date,
                hops,
                delta,
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(page, req, date)| PeerMsg::DiffAck {
            page,
            req,
            date
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(first, count)| PeerMsg::DropPages { first, count }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            arb_sync_op()
        )
            .prop_map(|(req, session, rank, seq, op)| PeerMsg::Sync {
                req,
                session,
                rank,
                seq,
                op,
                date: req,
            }),
        (any::<u64>(), arb_sync_answer()).prop_map(|(req, answer)| PeerMsg::SyncDone {
            req,
            answer,
            date: req,
        }),
        (any::<u64>(), any::<u64>(), any::<u32>(), arb_segment_op()).prop_map(
            |(req, session, rank, op)| PeerMsg::Segment {
                req,
                session,
                rank,
                op
            }
        ),
        (any::<u64>(), arb_segment_answer())
            .prop_map(|(req, answer)| PeerMsg::SegmentDone { req, answer }),
        any::<u64>().prop_map(|session| PeerMsg::SessionEnded { session }),
        Just(PeerMsg::Leaving),
        proptest::collection::vec((any::<u64>(), any::<u32>()), 0..8)
            .prop_map(|runs| PeerMsg::OwnerHints { runs }),
        Just(PeerMsg::HintsDone),
        (
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(source, stamp, index, offset, total, data)| {
                PeerMsg::StoreChunk {
                    source,
                    stamp,
                    index,
                    offset,
                    total,
                    data,
                }
            }),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(source, stamp, pages_len, index_len)| PeerMsg::ParityInfo {
                source,
                stamp,
                pages_len,
                index_len
            }
        ),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(source, stamp, chunk, offset, total, data)| {
                PeerMsg::ParityChunk {
                    source,
                    stamp,
                    chunk,
                    offset,
                    total,
                    data,
                }
            }),
        (any::<u32>(), any::<u64>(), proptest::option::of(".{0,20}")).prop_map(
            |(source, stamp, error)| PeerMsg::StoreHeld {
                source,
                stamp,
                error
            }
        ),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..8))
            .prop_map(|(seq, addrs)| PeerMsg::RemoteFree { seq, addrs }),
        any::<u64>().prop_map(|seq| PeerMsg::RemoteFreeAck { seq }),
    ]
}

/// Wire tag of each PeerMsg variant (its declaration index). No wildcard: a
/// new variant fails to compile here until the strategies cover it.
fn peer_tag(m: &PeerMsg) -> u8 {
    match m {
        PeerMsg::Hello { .. } => 0,
        PeerMsg::Challenge { .. } => 1,
        PeerMsg::Proof { .. } => 2,
        PeerMsg::Refused { .. } => 3,
        PeerMsg::Heartbeat => 4,
        PeerMsg::PageRequest { .. } => 5,
        PeerMsg::PageGrant { .. } => 6,
        PeerMsg::Invalidate { .. } => 7,
        PeerMsg::InvalidateAck { .. } => 8,
        PeerMsg::DropPages { .. } => 9,
        PeerMsg::Sync { .. } => 10,
        PeerMsg::SyncDone { .. } => 11,
        PeerMsg::Segment { .. } => 12,
        PeerMsg::SegmentDone { .. } => 13,
        PeerMsg::SessionEnded { .. } => 14,
        PeerMsg::Leaving => 15,
        PeerMsg::OwnerHints { .. } => 16,
        PeerMsg::HintsDone => 17,
        PeerMsg::StoreChunk { .. } => 18,
        PeerMsg::ParityInfo { .. } => 19,
        PeerMsg::ParityChunk { .. } => 20,
        PeerMsg::StoreHeld { .. } => 21,
        PeerMsg::PageDiff { .. } => 22,
        PeerMsg::DiffAck { .. } => 23,
        PeerMsg::RemoteFree { .. } => 24,
        PeerMsg::RemoteFreeAck { .. } => 25,
    }
}
const PEER_VARIANTS: u8 = 26;

/// What `validate` must answer, written independently of it.
fn expected_valid(m: &PeerMsg) -> bool {
    let page = PAGE_SIZE as usize;
    match m {
        PeerMsg::PageGrant { data, extra, .. } => {
            data.as_ref().is_none_or(|d| d.len() == page)
                && extra.len() <= MAX_PREFETCH as usize
                && extra.iter().all(|(_, d)| d.len() == page)
        }
        PeerMsg::PageRequest { prefetch, .. } => *prefetch <= MAX_PREFETCH,
        PeerMsg::PageDiff { delta, .. } => (4..=MAX_DELTA).contains(&delta.len()),
        PeerMsg::Hello { job, .. } => job.len() <= 4096,
        PeerMsg::Segment {
            op: SegmentOp::Open { name, .. } | SegmentOp::Unlink { name },
            ..
        } => name.len() <= 4096,
        PeerMsg::StoreChunk {
            offset,
            total,
            data,
            ..
        } => {
            data.len() <= mome_protocol::peer::MAX_STORE_CHUNK
                && offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= *total)
        }
        PeerMsg::StoreHeld { error, .. } => error.as_ref().is_none_or(|e| e.len() <= 4096),
        PeerMsg::RemoteFree { addrs, .. } => addrs.len() <= 256,
        PeerMsg::ParityChunk {
            offset,
            total,
            data,
            ..
        } => {
            data.len() <= mome_protocol::peer::MAX_STORE_CHUNK
                && offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= *total)
        }
        _ => true,
    }
}

// ---------------------------------------------------------------------------
// Strategies: RankRequest / AgentReply (they borrow their strings, so the
// strategy makes owned parameters and `rank_request` / `agent_reply` build
// the message from them)

#[derive(Debug, Clone)]
struct Params {
    variant: u8,
    text: String,
    a: u64,
    b: u64,
    c: u64,
    x: u32,
    y: u32,
    pid: i32,
    f1: bool,
    f2: bool,
}

const RANK_VARIANTS: u8 = 24;
const REPLY_VARIANTS: u8 = 10;

fn arb_params(variants: u8) -> impl Strategy<Value = Params> {
    (
        0..variants,
        arb_text(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<i32>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(variant, text, a, b, c, x, y, pid, f1, f2)| Params {
            variant,
            text,
            a,
            b,
            c,
            x,
            y,
            pid,
            f1,
            f2,
        })
}

fn rank_request(p: &Params) -> RankRequest<'_> {
    let (a, b, c, x, y) = (p.a, p.b, p.c, p.x, p.y);
    match p.variant {
        0 => RankRequest::Hello {
            protocol: x,
            rank: y,
            pid: p.pid,
            channel: if p.f1 { Channel::Sync } else { Channel::Memory },
            jobid: &p.text,
            restoring: p.f2,
        },
        1 => RankRequest::RegisterPagemap,
        2 => RankRequest::CkptParked {
            entered_ns: a,
            image_addr: b,
            image_len: c,
        },
        3 => RankRequest::CkptRefused { reason: &p.text },
        4 => RankRequest::RestoreImage,
        5 => RankRequest::Restored,
        6 => RankRequest::RegisterUffd {
            zone: if p.f1 { Zone::Shared } else { Zone::Private },
        },
        7 => RankRequest::AllocHeaps { count: x },
        8 => RankRequest::FreeHeaps { first: x, count: y },
        9 => RankRequest::SegmentOpen {
            name: &p.text,
            size: a,
            create: p.f1,
            exclusive: p.f2,
        },
        10 => RankRequest::SegmentResize { id: x, size: a },
        11 => RankRequest::SegmentUnlink { name: &p.text },
        12 => RankRequest::SegmentRelease { id: x },
        13 => RankRequest::SegmentUse { id: x },
        14 => RankRequest::AliasMapped {
            addr: a,
            len: b,
            window_addr: c,
        },
        15 => RankRequest::Barrier { seq: a },
        16 => RankRequest::Lock { id: a, seq: b },
        17 => RankRequest::Unlock { id: a, seq: b },
        18 => RankRequest::TryLock { id: a, seq: b },
        19 => RankRequest::KeyedBarrier {
            id: a,
            count: x,
            seq: b,
        },
        20 => RankRequest::Consistency {
            addr: a,
            len: b,
            model: [Model::Strong, Model::Release, Model::Weak][x as usize % 3],
            seq: c,
        },
        21 => RankRequest::SyncMem {
            addr: a,
            len: b,
            date: c,
            seq: y as u64,
        },
        22 => RankRequest::ShmallocFree {
            frees: p.text.as_bytes(),
        },
        23 => RankRequest::ShmallocTake { max: x },
        v => unreachable!("RankRequest variant {v}"),
    }
}

/// Wire tag of each RankRequest variant; no wildcard (see `peer_tag`).
fn rank_tag(m: &RankRequest) -> u8 {
    match m {
        RankRequest::Hello { .. } => 0,
        RankRequest::RegisterPagemap => 1,
        RankRequest::CkptParked { .. } => 2,
        RankRequest::CkptRefused { .. } => 3,
        RankRequest::RestoreImage => 4,
        RankRequest::Restored => 5,
        RankRequest::RegisterUffd { .. } => 6,
        RankRequest::AllocHeaps { .. } => 7,
        RankRequest::FreeHeaps { .. } => 8,
        RankRequest::SegmentOpen { .. } => 9,
        RankRequest::SegmentResize { .. } => 10,
        RankRequest::SegmentUnlink { .. } => 11,
        RankRequest::SegmentRelease { .. } => 12,
        RankRequest::SegmentUse { .. } => 13,
        RankRequest::AliasMapped { .. } => 14,
        RankRequest::Barrier { .. } => 15,
        RankRequest::Lock { .. } => 16,
        RankRequest::Unlock { .. } => 17,
        RankRequest::TryLock { .. } => 18,
        RankRequest::KeyedBarrier { .. } => 19,
        RankRequest::Consistency { .. } => 20,
        RankRequest::SyncMem { .. } => 21,
        RankRequest::ShmallocFree { .. } => 22,
        RankRequest::ShmallocTake { .. } => 23,
    }
}

fn agent_reply(p: &Params) -> AgentReply<'_> {
    let (a, b, c, x, y) = (p.a, p.b, p.c, p.x, p.y);
    match p.variant {
        0 => AgentReply::Welcome {
            layout: WindowLayout {
                base: a,
                size: b,
                private_size: c,
                segment_reserve: a ^ b,
            },
            node: x,
            nodes: y,
            nranks: p.pid as u32,
        },
        1 => AgentReply::Ok,
        2 => AgentReply::Heaps { first: x, count: y },
        3 => AgentReply::Segment {
            id: x,
            addr: a,
            size: b,
        },
        4 => AgentReply::BarrierDone { date: a },
        5 => AgentReply::KeyedBarrierDone { serial: p.f1 },
        6 => AgentReply::Resume { stamp: a },
        7 => AgentReply::Image { addr: a, len: b },
        8 => AgentReply::Error {
            code: ERROR_CODES[(y % 8) as usize],
            message: &p.text,
        },
        9 => AgentReply::Frees {
            addrs: p.text.as_bytes(),
        },
        v => unreachable!("AgentReply variant {v}"),
    }
}

/// Wire tag of each AgentReply variant; no wildcard (see `peer_tag`).
fn reply_tag(m: &AgentReply) -> u8 {
    match m {
        AgentReply::Welcome { .. } => 0,
        AgentReply::Ok => 1,
        AgentReply::Heaps { .. } => 2,
        AgentReply::Segment { .. } => 3,
        AgentReply::BarrierDone { .. } => 4,
        AgentReply::KeyedBarrierDone { .. } => 5,
        AgentReply::Resume { .. } => 6,
        AgentReply::Image { .. } => 7,
        AgentReply::Error { .. } => 8,
        AgentReply::Frees { .. } => 9,
    }
}

// ---------------------------------------------------------------------------
// Strategies: malformed inputs

/// A valid frame (header + body) of any message type.
fn arb_valid_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => arb_peer_msg().prop_map(|m| encode_frame(&m)),
        1 => arb_params(RANK_VARIANTS).prop_map(|p| encode_frame(&rank_request(&p))),
        1 => arb_params(REPLY_VARIANTS).prop_map(|p| encode_frame(&agent_reply(&p))),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Xor a byte (of the body, mostly: where the structure is).
    Flip(Index, u8),
    /// Set a byte to a value postcard treats specially (varint continuation,
    /// bool / Option / enum tags out of range).
    Set(Index, u8),
    /// Keep only a prefix.
    Truncate(Index),
    /// Append garbage.
    Extend(Vec<u8>),
    /// Insert garbage in the middle.
    Insert(Index, Vec<u8>),
    /// Remove a few bytes.
    Remove(Index, usize),
    /// Replace the length in the header.
    Header(u32),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let special = prop_oneof![
        Just(0u8),
        Just(1),
        Just(2),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        Just(PEER_VARIANTS),
        Just(RANK_VARIANTS),
        Just(REPLY_VARIANTS),
        any::<u8>(),
    ];
    let header = prop_oneof![
        (MAX_FRAME as u32 + 1..=u32::MAX),
        Just(MAX_FRAME as u32),
        Just(MAX_FRAME as u32 + 1),
        Just(u32::MAX),
        0u32..64,
        any::<u32>(),
    ];
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        3 => (any::<Index>(), special).prop_map(|(i, v)| Mutation::Set(i, v)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        1 => (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(i, g)| Mutation::Insert(i, g)),
        1 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => header.prop_map(Mutation::Header),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip(i, x) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] ^= x;
            }
            Mutation::Set(i, v) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *v;
            }
            Mutation::Truncate(i) => {
                let at = i.index(bytes.len() + 1);
                bytes.truncate(at);
            }
            Mutation::Extend(g) => bytes.extend_from_slice(g),
            Mutation::Insert(i, g) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, g.iter().copied());
            }
            Mutation::Remove(i, n) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Mutation::Header(len) if bytes.len() >= HEADER => {
                bytes[..HEADER].copy_from_slice(&len.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Noise.
        2 => vec(any::<u8>(), 0..4096),
        // Noise behind a header announcing its length.
        2 => vec(any::<u8>(), 0..256).prop_map(|b| {
            let mut f = (b.len() as u32).to_le_bytes().to_vec();
            f.extend(b);
            f
        }),
        // A valid frame, mutated.
        8 => (arb_valid_frame(), vec(arb_mutation(), 1..4)).prop_map(|(f, m)| mutate(f, &m)),
        // Several frames in a row, the last one mutated.
        2 => (vec(arb_valid_frame(), 1..4), vec(arb_mutation(), 0..2)).prop_map(|(fs, m)| {
            let n = fs.len();
            fs.into_iter()
                .enumerate()
                .flat_map(|(i, f)| if i + 1 == n { mutate(f, &m) } else { f })
                .collect()
        }),
    ]
}

// ---------------------------------------------------------------------------
// Properties

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("MOME_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz_decode.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// postcard varint of `v`.
fn varint(mut v: u128) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// `body` with its byte at `at` (the varint 0 of an empty string or Vec)
/// replaced by the varint `len`, and `filler` bytes appended.
fn claim_len(body: &[u8], at: usize, len: u128, filler_len: usize) -> Vec<u8> {
    assert_eq!(
        body[at], 0,
        "byte {at} of {body:02x?} is not an empty length"
    );
    let mut out = body[..at].to_vec();
    out.extend(varint(len));
    out.extend_from_slice(&body[at + 1..]);
    out.extend(filler(len as u64, filler_len));
    out
}

/// Message type a body is meant as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Peer,
    Rank,
    Reply,
}

/// Bodies whose string or Vec length prefix is `len` (with `filler_len`
/// bytes after it), for every message field of variable length.
fn huge_claims(len: u128, filler_len: usize) -> Vec<(&'static str, Kind, Vec<u8>)> {
    let body = |f: Vec<u8>| f[HEADER..].to_vec();
    let empty_grant = body(encode_frame(&PeerMsg::PageGrant {
        page: 1,
        req: 2,
        write: false,
        epoch: 3,
        copyset: 4,
        data: Some(Vec::new()),
        extra: Vec::new(),
        date: 0,
        twin: false,
    }));
    let empty_extra = body(encode_frame(&PeerMsg::PageGrant {
        page: 1,
        req: 2,
        write: false,
        epoch: 3,
        copyset: 4,
        data: None,
        extra: vec![(5, Vec::new())],
        date: 0,
        twin: false,
    }));
    let hello = body(encode_frame(&PeerMsg::Hello {
        protocol: 1,
        job: String::new(),
        node: 2,
        nonce: [7; NONCE_LEN],
    }));
    let refused = body(encode_frame(&PeerMsg::Refused {
        reason: String::new(),
    }));
    let seg_open = body(encode_frame(&PeerMsg::Segment {
        req: 1,
        session: 2,
        rank: 3,
        op: SegmentOp::Open {
            name: String::new(),
            size: 3,
            create: true,
            exclusive: false,
        },
    }));
    let hints = body(encode_frame(&PeerMsg::OwnerHints { runs: Vec::new() }));
    let chunk = body(encode_frame(&PeerMsg::StoreChunk {
        source: 1,
        stamp: 2,
        index: false,
        offset: 3,
        total: 4,
        data: Vec::new(),
    }));
    let sync_err = body(encode_frame(&PeerMsg::SyncDone {
        req: 1,
        answer: SyncAnswer::Error(String::new()),
        date: 0,
    }));
    let seg_err = body(encode_frame(&PeerMsg::SegmentDone {
        req: 1,
        answer: SegmentAnswer::Error {
            code: ErrorCode::Busy,
            message: String::new(),
        },
    }));
    let rank_hello = body(encode_frame(&RankRequest::Hello {
        protocol: 1,
        rank: 2,
        pid: 3,
        channel: Channel::Memory,
        jobid: "",
        restoring: false,
    }));
    let rank_open = body(encode_frame(&RankRequest::SegmentOpen {
        name: "",
        size: 1,
        create: true,
        exclusive: true,
    }));
    let reply_err = body(encode_frame(&AgentReply::Error {
        code: ErrorCode::Invalid,
        message: "",
    }));
    let last = |b: &Vec<u8>| b.len() - 1;
    let claims = [
        // A grant ends with its date (1 byte here) and twin flag.
        (
            "PageGrant.data",
            Kind::Peer,
            &empty_grant,
            last(&empty_grant) - 3,
        ),
        (
            "PageGrant.extra",
            Kind::Peer,
            &empty_grant,
            last(&empty_grant) - 2,
        ),
        (
            "PageGrant.extra.data",
            Kind::Peer,
            &empty_extra,
            last(&empty_extra) - 2,
        ),
        ("Hello.job", Kind::Peer, &hello, 2),
        ("Refused.reason", Kind::Peer, &refused, last(&refused)),
        ("Segment.Open.name", Kind::Peer, &seg_open, 5),
        ("OwnerHints.runs", Kind::Peer, &hints, 1),
        ("StoreChunk.data", Kind::Peer, &chunk, last(&chunk)),
        // SyncDone ends with its date (1 byte here).
        ("SyncDone.Error", Kind::Peer, &sync_err, last(&sync_err) - 1),
        (
            "SegmentDone.Error.message",
            Kind::Peer,
            &seg_err,
            last(&seg_err),
        ),
        ("Hello.jobid", Kind::Rank, &rank_hello, 5),
        ("SegmentOpen.name", Kind::Rank, &rank_open, 1),
        ("Error.message", Kind::Reply, &reply_err, last(&reply_err)),
    ];
    claims
        .into_iter()
        .map(|(what, kind, body, at)| (what, kind, claim_len(body, at, len, filler_len)))
        .collect()
}

/// Decodes a body claiming more elements than it holds: must be an error for
/// its type, quickly and without allocating the claim; the other types must
/// not panic or allocate on it either.
fn check_huge(what: &str, kind: Kind, body: &[u8]) {
    let (r, u) = measured(|| frame::decode::<PeerMsg>(body).map(|_| ()));
    assert!(kind != Kind::Peer || r.is_err(), "{what}: decoded");
    check_usage(&format!("PeerMsg {what}"), body, u);
    let (r, u) = measured(|| frame::decode::<RankRequest>(body).map(|_| ()));
    assert!(kind != Kind::Rank || r.is_err(), "{what}: decoded");
    check_usage(&format!("RankRequest {what}"), body, u);
    let (r, u) = measured(|| frame::decode::<AgentReply>(body).map(|_| ()));
    assert!(kind != Kind::Reply || r.is_err(), "{what}: decoded");
    check_usage(&format!("AgentReply {what}"), body, u);
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in arb_input()) {
        exercise(&bytes);
    }

    #[test]
    fn body_len_accepts_exactly_up_to_max_frame(header in any::<[u8; HEADER]>()) {
        let len = u32::from_le_bytes(header) as usize;
        match frame::body_len(header) {
            Ok(n) => prop_assert!(n == len && n <= MAX_FRAME),
            Err(e) => prop_assert!(len > MAX_FRAME && e == FrameError::Oversized(len)),
        }
    }

    #[test]
    fn peer_msg_round_trip(m in arb_peer_msg()) {
        let f = encode_frame(&m);
        let len = frame::body_len(header_of(&f)).unwrap();
        prop_assert_eq!(len + HEADER, f.len());
        prop_assert_eq!(f[HEADER], peer_tag(&m));
        let back: PeerMsg = frame::decode(&f[HEADER..]).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(back.validate().is_ok(), expected_valid(&m), "{:?}", back.validate());
        // Every strict prefix and one byte more are refused.
        prop_assert!(frame::decode::<PeerMsg>(&f[HEADER..f.len() - 1]).is_err());
        let mut long = f[HEADER..].to_vec();
        long.push(0);
        prop_assert!(frame::decode::<PeerMsg>(&long).is_err());
    }

    #[test]
    fn rank_request_round_trip(p in arb_params(RANK_VARIANTS)) {
        let m = rank_request(&p);
        let f = encode_frame(&m);
        prop_assert_eq!(f[HEADER], rank_tag(&m));
        prop_assert_eq!(frame::decode::<RankRequest>(&f[HEADER..]), Ok(m));
        prop_assert!(frame::decode::<RankRequest>(&f[HEADER..f.len() - 1]).is_err());
    }

    #[test]
    fn agent_reply_round_trip(p in arb_params(REPLY_VARIANTS)) {
        let m = agent_reply(&p);
        let f = encode_frame(&m);
        prop_assert_eq!(f[HEADER], reply_tag(&m));
        prop_assert_eq!(frame::decode::<AgentReply>(&f[HEADER..]), Ok(m));
        prop_assert!(frame::decode::<AgentReply>(&f[HEADER..f.len() - 1]).is_err());
    }
}

proptest! {
    // Fewer cases: each decodes 9 bodies of up to 64 KiB three times.
    #![proptest_config(config(500))]

    #[test]
    fn huge_length_prefixes_fail_fast(
        len in prop_oneof![
            (MAX_FRAME as u128)..(1u128 << 64),
            Just(1u128 << 60),
            Just(u64::MAX as u128),
            // Not a u64 any more: a 10- or 11-byte varint.
            (1u128 << 64)..(1u128 << 77),
        ],
        filler_len in prop_oneof![4 => 0usize..64, 1 => 0usize..MAX_FRAME - 64],
    ) {
        for (what, kind, body) in huge_claims(len, filler_len) {
            check_huge(what, kind, &body);
        }
    }
}

#[test]
fn vec_of_2_pow_60_fails_without_allocating() {
    // The accounting sees the decoder's allocations: a page grant's data.
    let grant = encode_frame(&PeerMsg::PageGrant {
        page: 1,
        req: 2,
        write: true,
        epoch: 3,
        copyset: 4,
        data: Some(filler(1, PAGE_SIZE as usize)),
        extra: Vec::new(),
        date: 0,
        twin: false,
    });
    let (r, u) = measured(|| frame::decode::<PeerMsg>(&grant[HEADER..]));
    assert!(r.is_ok());
    assert!(u.peak >= PAGE_SIZE as usize, "{u:?}");
    drop(r);
    for filler_len in [0, 1, 100, 4096, MAX_FRAME - 64] {
        for (what, kind, body) in huge_claims(1 << 60, filler_len) {
            let (r, u) = measured(|| match kind {
                Kind::Peer => frame::decode::<PeerMsg>(&body).map(|_| ()),
                Kind::Rank => frame::decode::<RankRequest>(&body).map(|_| ()),
                Kind::Reply => frame::decode::<AgentReply>(&body).map(|_| ()),
            });
            assert!(r.is_err(), "{what}: decoded");
            // A few elements may be decoded (and a small first allocation
            // made) before the bytes run out: bytes after the claim (a
            // grant's date and twin flag) read as a first element.
            assert!(u.peak <= 2 * body.len() + 256, "{what}: {u:?}");
            assert!(u.elapsed < Duration::from_secs(1), "{what}: {u:?}");
            check_huge(what, kind, &body);
        }
    }
}

/// Finding (see PEER_AMPLIFICATION): a 32 KiB frame announcing 32768
/// prefetched pages has the decoder allocate 1 MiB before failing, and a
/// 64 KiB frame of 32K empty prefetched pages decodes into a 1 MiB Vec
/// before `validate` refuses it. Bounded (serde caps preallocation at
/// 1 MiB), so tolerated; this test keeps it at most that.
#[test]
fn prefetch_list_allocation_is_bounded() {
    for (what, f) in [
        ("prefetch claim", prefetch_claim()),
        ("prefetch bomb", prefetch_bomb()),
    ] {
        let body = &f[HEADER..];
        let (r, u) = measured(|| frame::decode::<PeerMsg>(body));
        check_usage(&format!("PeerMsg {what}"), body, u);
        assert!(u.peak <= (1 << 20) + 64, "{what}: {u:?}");
        if let Ok(m) = r {
            assert!(m.validate().is_err(), "{what}");
        }
    }
}

#[test]
fn every_variant_is_generated() {
    let mut seen = [false; PEER_VARIANTS as usize];
    for (_, m) in peer_samples() {
        seen[peer_tag(&m) as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "PeerMsg samples miss a variant");
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = arb_peer_msg();
    let mut seen = [false; PEER_VARIANTS as usize];
    for _ in 0..2000 {
        let m = strategy.new_tree(&mut runner).unwrap().current();
        seen[peer_tag(&m) as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "arb_peer_msg misses a variant");
    for v in 0..RANK_VARIANTS {
        let p = Params {
            variant: v,
            ..rank_params()
        };
        assert_eq!(rank_tag(&rank_request(&p)), v);
    }
    for v in 0..REPLY_VARIANTS {
        let p = Params {
            variant: v,
            ..rank_params()
        };
        assert_eq!(reply_tag(&agent_reply(&p)), v);
    }
    for (i, &code) in ERROR_CODES.iter().enumerate() {
        assert_eq!(error_code_index(code), i);
    }
}

#[test]
fn every_truncation_of_every_sample_is_refused() {
    for (name, m) in peer_samples() {
        let f = encode_frame(&m);
        // Decoding a prefix costs its length: every cut of frames up to two
        // pages, and of larger ones (prefetch grants) the first and last
        // 256 bytes and every 509th.
        let near_ends = |cut: usize| cut < 256 || cut + 256 > f.len();
        for cut in (0..f.len()).filter(|&c| f.len() <= 8192 || near_ends(c) || c % 509 == 0) {
            if cut < 64 || cut % 509 == 0 || cut + 64 > f.len() {
                exercise(&f[..cut]);
            }
            assert!(
                frame::decode::<PeerMsg>(&f[HEADER.min(cut)..cut]).is_err(),
                "{name} cut at {cut} decodes"
            );
        }
        exercise(&f);
    }
    for (name, f) in rank_samples() {
        for cut in 0..f.len() {
            exercise(&f[..cut]);
            let body = &f[HEADER.min(cut)..cut];
            if name.contains("-reply-") {
                assert!(
                    frame::decode::<AgentReply>(body).is_err(),
                    "{name} at {cut}"
                );
            } else {
                assert!(
                    frame::decode::<RankRequest>(body).is_err(),
                    "{name} at {cut}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Corpus

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus")
}

fn rank_params() -> Params {
    Params {
        variant: 0,
        text: "20261129-1512-c0ffee".into(),
        a: 0x2000_0000_0000,
        b: 4096,
        c: 1 << 40,
        x: 3,
        y: 4,
        pid: 4242,
        f1: true,
        f2: false,
    }
}

/// One valid PeerMsg of every variant (and of every inner variant).
fn peer_samples() -> Vec<(String, PeerMsg)> {
    let page = PAGE_SIZE as usize;
    let mut out = vec![
        PeerMsg::Hello {
            protocol: PEER_PROTOCOL_VERSION,
            job: "20261129-1512-c0ffee".into(),
            node: 1,
            nonce: [0x11; NONCE_LEN],
        },
        PeerMsg::Challenge {
            node: 0,
            nonce: [0x22; NONCE_LEN],
            proof: [0x33; NONCE_LEN],
        },
        PeerMsg::Proof {
            proof: [0x44; NONCE_LEN],
        },
        PeerMsg::Refused {
            reason: "wrong job".into(),
        },
        PeerMsg::Heartbeat,
        PeerMsg::PageRequest {
            page: 123_456,
            from: 2,
            req: 77,
            write: true,
            has_copy: true,
            hops: 1,
            prefetch: 0,
            contract: Model::Strong,
            copy_date: 0,
            date: 0,
        },
        PeerMsg::PageGrant {
            page: 123_456,
            req: 77,
            write: true,
            epoch: 5,
            copyset: 0b1011,
            data: Some(filler(6, page)),
            extra: Vec::new(),
            date: 0,
            twin: false,
        },
        PeerMsg::Invalidate {
            page: 9,
            epoch: 6,
            new_owner: 3,
        },
        PeerMsg::InvalidateAck { page: 9, epoch: 6 },
        PeerMsg::PageDiff {
            page: 9,
            from: 2,
            req: 41,
            date: 77,
            hops: 1,
            delta: {
                let mut x = vec![0u8; page];
                x[100..108].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
                lz4_flex::compress_prepend_size(&x)
            },
        },
        PeerMsg::DiffAck {
            page: 9,
            req: 41,
            date: 78,
        },
        PeerMsg::DropPages {
            first: 1 << 20,
            count: 256,
        },
    ];
    out.extend(
        [
            SyncOp::Barrier,
            SyncOp::Lock { id: 1 },
            SyncOp::TryLock { id: u64::MAX },
            SyncOp::Unlock { id: 1 },
            SyncOp::KeyedBarrier {
                id: (1 << 63) | 0x2000_0000_1000,
                count: 4,
            },
        ]
        .into_iter()
        .map(|op| PeerMsg::Sync {
            req: 10,
            session: 11,
            rank: 12,
            seq: 13,
            op,
            date: 0,
        }),
    );
    out.extend(
        [
            SyncAnswer::Ok,
            SyncAnswer::BarrierDone { date: 99 },
            SyncAnswer::KeyedBarrierDone { serial: true },
            SyncAnswer::Busy,
            SyncAnswer::Error("node 2 failed".into()),
        ]
        .into_iter()
        .map(|answer| PeerMsg::SyncDone {
            req: 10,
            answer,
            date: 0,
        }),
    );
    out.extend(
        [
            SegmentOp::Open {
                name: "/shm-x".into(),
                size: 1 << 20,
                create: true,
                exclusive: false,
            },
            SegmentOp::Resize { id: 2, size: 8192 },
            SegmentOp::Unlink {
                name: "/shm-x".into(),
            },
            SegmentOp::Release { id: 2 },
            SegmentOp::Use { id: 2 },
        ]
        .into_iter()
        .map(|op| PeerMsg::Segment {
            req: 20,
            session: 21,
            rank: 2,
            op,
        }),
    );
    out.extend(
        [
            SegmentAnswer::Segment {
                slot: 3,
                size: 1 << 20,
                created: true,
            },
            SegmentAnswer::Ok,
            SegmentAnswer::Error {
                code: ErrorCode::Exists,
                message: "segment /shm-x exists".into(),
            },
        ]
        .into_iter()
        .map(|answer| PeerMsg::SegmentDone { req: 20, answer }),
    );
    out.push(PeerMsg::SessionEnded { session: 21 });
    out.push(PeerMsg::Leaving);
    out.push(PeerMsg::OwnerHints {
        runs: vec![(0, 16), (4096, 3)],
    });
    out.push(PeerMsg::HintsDone);
    out.push(PeerMsg::StoreChunk {
        source: 1,
        stamp: 7,
        index: true,
        offset: 0,
        total: 5,
        data: vec![1, 2, 3, 4, 5],
    });
    out.push(PeerMsg::StoreHeld {
        source: 1,
        stamp: 7,
        error: None,
    });
    out.push(PeerMsg::ParityInfo {
        source: 1,
        stamp: 7,
        pages_len: 8192,
        index_len: 300,
    });
    out.push(PeerMsg::ParityChunk {
        source: 1,
        stamp: 7,
        chunk: 2,
        offset: 0,
        total: 3,
        data: vec![9, 8, 7],
    });
    out.push(PeerMsg::StoreHeld {
        source: 1,
        stamp: 7,
        error: Some("no space left on device".into()),
    });
    out.push(PeerMsg::RemoteFree {
        seq: 3,
        addrs: vec![0x3000_0080_0010, 0x3000_0080_0410],
    });
    out.push(PeerMsg::RemoteFreeAck { seq: 3 });
    out.push(PeerMsg::PageGrant {
        page: 1,
        req: 2,
        write: false,
        epoch: 0,
        copyset: 0,
        data: None,
        extra: Vec::new(),
        date: 0,
        twin: false,
    });
    out.push(PeerMsg::PageRequest {
        page: 100,
        from: 1,
        req: 78,
        write: false,
        has_copy: false,
        hops: 0,
        prefetch: MAX_PREFETCH,
        contract: Model::Strong,
        copy_date: 0,
        date: 0,
    });
    // A read grant with the most prefetched pages a frame holds.
    out.push(PeerMsg::PageGrant {
        page: 100,
        req: 78,
        write: false,
        epoch: 2,
        copyset: 0,
        data: Some(filler(100, page)),
        extra: (101..101 + MAX_PREFETCH as u64)
            .map(|p| (p, filler(p, page)))
            .collect(),
        date: 0,
        twin: false,
    });
    let mut names: Vec<String> = Vec::new();
    out.into_iter()
        .map(|m| {
            let mut name = kebab(m.name());
            let inner = match &m {
                PeerMsg::Sync { op, .. } => Some(format!("{op:?}")),
                PeerMsg::SyncDone { answer, .. } => Some(format!("{answer:?}")),
                PeerMsg::Segment { op, .. } => Some(format!("{op:?}")),
                PeerMsg::SegmentDone { answer, .. } => Some(format!("{answer:?}")),
                PeerMsg::PageGrant { data: None, .. } => Some("NoData".into()),
                PeerMsg::PageGrant { extra, .. } if !extra.is_empty() => Some("Prefetch".into()),
                PeerMsg::PageRequest { prefetch, .. } if *prefetch > 0 => Some("Prefetch".into()),
                PeerMsg::StoreHeld { error: Some(_), .. } => Some("Error".into()),
                _ => None,
            };
            if let Some(inner) = inner {
                let word: String = inner.chars().take_while(|c| c.is_alphanumeric()).collect();
                name = format!("{name}-{}", kebab(&word));
            }
            assert!(!names.contains(&name), "two samples named {name}");
            names.push(name.clone());
            (name, m)
        })
        .collect()
}

fn kebab(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 && !out.ends_with('-') {
                out.push('-');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Valid frames of every RankRequest and AgentReply variant, named
/// `valid-<variant>` and `valid-reply-<variant>`.
fn rank_samples() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for v in 0..RANK_VARIANTS {
        let p = Params {
            variant: v,
            f1: v % 2 == 0,
            ..rank_params()
        };
        let m = rank_request(&p);
        let name = format!("{:?}", m);
        let word: String = name.chars().take_while(|c| c.is_alphanumeric()).collect();
        out.push((format!("valid-{}", kebab(&word)), encode_frame(&m)));
    }
    for v in 0..REPLY_VARIANTS {
        let p = Params {
            variant: v,
            text: "segment /shm-x exists".into(),
            ..rank_params()
        };
        let m = agent_reply(&p);
        let name = format!("{:?}", m);
        let word: String = name.chars().take_while(|c| c.is_alphanumeric()).collect();
        out.push((format!("valid-reply-{}", kebab(&word)), encode_frame(&m)));
    }
    out
}

/// A read grant announcing 32768 prefetched pages, followed by 32 KiB of
/// 0xff (the first page number is a bad varint).
fn prefetch_claim() -> Vec<u8> {
    let f = encode_frame(&PeerMsg::PageGrant {
        page: 0,
        req: 0,
        write: false,
        epoch: 0,
        copyset: 0,
        data: None,
        extra: Vec::new(),
        date: 0,
        twin: false,
    });
    let mut body = f[HEADER..f.len() - 1].to_vec();
    body.extend(varint(1 << 15));
    body.resize(body.len() + (1 << 15), 0xff);
    framed(&body)
}

/// A read grant whose extra list fills a whole frame with empty pages.
fn prefetch_bomb() -> Vec<u8> {
    let f = encode_frame(&PeerMsg::PageGrant {
        page: 0,
        req: 0,
        write: false,
        epoch: 0,
        copyset: 0,
        data: None,
        extra: Vec::new(),
        date: 0,
        twin: false,
    });
    let head = &f[HEADER..f.len() - 1];
    let count = (MAX_FRAME - head.len() - 3) / 2;
    let mut body = head.to_vec();
    body.extend(varint(count as u128));
    body.resize(body.len() + 2 * count, 0);
    assert!(body.len() <= MAX_FRAME);
    framed(&body)
}

/// Whole frame of `body` (header announcing its length).
fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Every corpus file: (subdirectory, file name without `.bin`, bytes).
fn corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let samples = peer_samples();
    for (name, m) in &samples {
        out.push(("peer", format!("valid-{name}"), encode_frame(m)));
    }
    let frame_of = |name: &str| {
        encode_frame(
            &samples
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no sample {name}"))
                .1,
        )
    };
    let grant = frame_of("page-grant");
    let hello = frame_of("hello");
    let request = frame_of("page-request");
    let page = PAGE_SIZE as usize;
    let mut peer_bad: Vec<(String, Vec<u8>)> = [
        ("bad-empty", Vec::new()),
        ("bad-short-header", vec![4, 0]),
        ("bad-header-only", vec![4, 0, 0, 0]),
        ("bad-empty-body", vec![0, 0, 0, 0]),
        ("bad-truncated-body", grant[..HEADER + 100].to_vec()),
        ("bad-truncated-last-byte", grant[..grant.len() - 1].to_vec()),
        ("bad-trailing-byte", {
            let mut f = frame_of("heartbeat");
            f.push(0);
            f
        }),
        ("bad-oversized-length", {
            let mut f = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
            f.extend(vec![0; 16]);
            f
        }),
        ("bad-length-u32-max", {
            let mut f = u32::MAX.to_le_bytes().to_vec();
            f.extend_from_slice(&hello[HEADER..]);
            f
        }),
        ("bad-enum-tag", framed(&[PEER_VARIANTS])),
        ("bad-enum-tag-255", framed(&[0xff, 0x01])),
        ("bad-enum-tag-varint-overflow", framed(&[0xff; 6])),
        ("bad-inner-enum-tag", {
            // Sync { op, date } with an op tag past SyncOp's five variants
            // (the date is 1 byte).
            let mut f = frame_of("sync-barrier");
            let last = f.len() - 2;
            f[last] = 5;
            f
        }),
        ("bad-bool-2", {
            // PageRequest.write (then has_copy, hops, prefetch, contract,
            // copy_date, date: 1 byte each here).
            let mut f = request.clone();
            let at = f.len() - 7;
            assert_eq!(f[at], 1);
            f[at] = 2;
            f
        }),
        ("bad-option-tag-2", {
            // Before the data's length (2 bytes) and the page; the grant
            // ends with its empty extra list, date and twin (1 byte each).
            let mut f = grant.clone();
            let at = f.len() - 3 - page - 2 - 1;
            assert_eq!(f[at], 1, "Option tag of {:02x?}", &f[..at + 4]);
            f[at] = 2;
            f
        }),
        ("bad-utf8", {
            let mut body = vec![3, 4];
            body.extend_from_slice(&[0xc3, 0x28, 0xa0, 0xa1]);
            framed(&body)
        }),
        ("bad-overlong-varint", {
            // Heartbeat tag as an 11-byte varint.
            let mut body = vec![0x84; 10];
            body.push(0);
            framed(&body)
        }),
        (
            "bad-page-size-4095",
            encode_frame(&PeerMsg::PageGrant {
                page: 1,
                req: 2,
                write: true,
                epoch: 3,
                copyset: 4,
                data: Some(filler(4095, page - 1)),
                extra: Vec::new(),
                date: 0,
                twin: false,
            }),
        ),
        (
            "bad-page-size-4097",
            encode_frame(&PeerMsg::PageGrant {
                page: 1,
                req: 2,
                write: true,
                epoch: 3,
                copyset: 4,
                data: Some(filler(4097, page + 1)),
                extra: Vec::new(),
                date: 0,
                twin: false,
            }),
        ),
        (
            "bad-prefetch-too-many",
            encode_frame(&PeerMsg::PageRequest {
                page: 1,
                from: 2,
                req: 3,
                write: false,
                has_copy: false,
                hops: 0,
                prefetch: MAX_PREFETCH + 1,
                contract: Model::Strong,
                copy_date: 0,
                date: 0,
            }),
        ),
        (
            "valid-write-grant-with-pages",
            encode_frame(&PeerMsg::PageGrant {
                page: 1,
                req: 2,
                write: true,
                epoch: 3,
                copyset: 4,
                data: Some(filler(1, page)),
                extra: vec![(2, filler(2, page))],
                date: 0,
                twin: false,
            }),
        ),
        (
            "bad-prefetch-too-many-pages",
            encode_frame(&PeerMsg::PageGrant {
                page: 1,
                req: 2,
                write: false,
                epoch: 3,
                copyset: 4,
                data: None,
                extra: (0..=MAX_PREFETCH as u64)
                    .map(|p| (p, filler(p, page)))
                    .collect(),
                date: 0,
                twin: false,
            }),
        ),
        (
            "bad-prefetch-page-size",
            encode_frame(&PeerMsg::PageGrant {
                page: 1,
                req: 2,
                write: false,
                epoch: 3,
                copyset: 4,
                data: Some(filler(1, page)),
                extra: vec![(2, filler(2, page - 1))],
                date: 0,
                twin: false,
            }),
        ),
        // The most prefetched pages a frame holds: each `00 00` (page 0, no
        // data), decoded into a 1 MiB Vec before validate refuses it.
        ("bad-prefetch-32k-empty-pages", prefetch_bomb()),
        // Found by arbitrary_bytes_never_panic: 1 MiB allocated for 32 KiB.
        ("bad-prefetch-claim-32k", prefetch_claim()),
        (
            "bad-job-too-long",
            encode_frame(&PeerMsg::Hello {
                protocol: PEER_PROTOCOL_VERSION,
                job: "j".repeat(4097),
                node: 1,
                nonce: [0; NONCE_LEN],
            }),
        ),
        (
            "bad-segment-name-too-long",
            encode_frame(&PeerMsg::Segment {
                req: 1,
                session: 2,
                rank: 3,
                op: SegmentOp::Unlink {
                    name: "s".repeat(4097),
                },
            }),
        ),
        ("bad-header-says-less", {
            let mut f = hello.clone();
            let n = (f.len() - HEADER - 1) as u32;
            f[..HEADER].copy_from_slice(&n.to_le_bytes());
            f
        }),
        ("bad-header-says-more", {
            let mut f = hello.clone();
            let n = (f.len() - HEADER + 1) as u32;
            f[..HEADER].copy_from_slice(&n.to_le_bytes());
            f
        }),
    ]
    .into_iter()
    .map(|(name, bytes)| (name.to_string(), bytes))
    .collect();
    let dashed = |what: &str| kebab(&what.replace('.', "-"));
    for (len, prefix) in [
        (1u128 << 60, "bad-2pow60"),
        (u64::MAX as u128, "bad-u64-max"),
        (1 << 70, "bad-2pow70"),
    ] {
        for (what, kind, body) in huge_claims(len, 16) {
            if kind == Kind::Peer {
                peer_bad.push((format!("{prefix}-{}", dashed(what)), framed(&body)));
            }
        }
    }
    for (name, bytes) in peer_bad {
        out.push(("peer", name, bytes));
    }

    let rank = rank_samples();
    let rank_of = |name: &str| {
        rank.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no rank sample {name}"))
            .1
            .clone()
    };
    for (name, f) in &rank {
        out.push(("rank", name.clone(), f.clone()));
    }
    let claims = huge_claims(1 << 60, 16);
    let claim = |what: &str| framed(&claims.iter().find(|(w, _, _)| *w == what).unwrap().2);
    let rank_bad: Vec<(&str, Vec<u8>)> = vec![
        ("bad-enum-tag", framed(&[RANK_VARIANTS])),
        ("bad-reply-enum-tag", framed(&[REPLY_VARIANTS])),
        ("bad-2pow60-hello-jobid", claim("Hello.jobid")),
        ("bad-2pow60-segment-open-name", claim("SegmentOpen.name")),
        ("bad-reply-2pow60-error-message", claim("Error.message")),
        ("bad-truncated-hello", {
            let f = rank_of("valid-hello");
            f[..f.len() - 1].to_vec()
        }),
        ("bad-zone-tag", {
            let mut f = rank_of("valid-register-uffd");
            let last = f.len() - 1;
            f[last] = 2;
            f
        }),
        ("bad-channel-tag", {
            // Hello: tag, protocol, rank, pid (zigzag, 2 bytes), channel.
            let mut f = rank_of("valid-hello");
            let at = HEADER + 5;
            assert!(f[at] <= 1, "channel of {f:02x?}");
            f[at] = 7;
            f
        }),
        ("bad-utf8-segment-name", {
            let mut f = rank_of("valid-segment-unlink");
            let last = f.len() - 1;
            f[last] = 0xff;
            f
        }),
        ("bad-reply-error-code-tag", {
            let mut f = rank_of("valid-reply-error");
            f[HEADER + 1] = ERROR_CODES.len() as u8;
            f
        }),
        ("bad-oversized-length", {
            let mut f = rank_of("valid-barrier");
            f[..HEADER].copy_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
            f
        }),
        ("bad-trailing-byte", {
            let mut f = rank_of("valid-barrier");
            f.push(0);
            let n = (f.len() - HEADER) as u32;
            f[..HEADER].copy_from_slice(&n.to_le_bytes());
            f
        }),
    ];
    for (name, bytes) in rank_bad {
        out.push(("rank", name.to_string(), bytes));
    }
    out
}

/// What an agent concludes of a whole corpus frame: Ok for a message it
/// would act on, Err (with the step that refused it) otherwise.
fn check_frame(dir: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < HEADER {
        return Err("short header".into());
    }
    let len = frame::body_len(header_of(bytes)).map_err(|e| e.to_string())?;
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(format!(
            "header announces {len} bytes, frame has {}",
            body.len()
        ));
    }
    match dir {
        "peer" => {
            let m: PeerMsg = frame::decode(body).map_err(|e| e.to_string())?;
            m.validate()
        }
        "rank" if name.contains("-reply-") => frame::decode::<AgentReply>(body)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "rank" => frame::decode::<RankRequest>(body)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => Err(format!("unknown corpus directory {dir}")),
    }
}

fn check_expectation(dir: &str, name: &str, bytes: &[u8]) {
    exercise(bytes);
    let r = check_frame(dir, name, bytes);
    if name.starts_with("valid-") {
        assert_eq!(r, Ok(()), "{dir}/{name}.bin");
    } else if name.starts_with("bad-") {
        assert!(r.is_err(), "{dir}/{name}.bin is accepted");
    } else {
        panic!("{dir}/{name}.bin: corpus names start with valid- or bad-");
    }
}

#[test]
#[ignore = "regenerates fuzz-corpus/; run with --ignored write_corpus"]
fn write_corpus() {
    let root = corpus_dir();
    for dir in ["peer", "rank"] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "bin") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    for (dir, name, bytes) in corpus() {
        std::fs::write(root.join(dir).join(format!("{name}.bin")), bytes).unwrap();
    }
}

#[test]
fn generated_corpus_is_labelled_right() {
    let corpus = corpus();
    for (dir, name, bytes) in &corpus {
        check_expectation(dir, name, bytes);
    }
    for dir in ["peer", "rank"] {
        let mut names: Vec<_> = corpus
            .iter()
            .filter(|(d, _, _)| *d == dir)
            .map(|(_, n, _)| n)
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate corpus names in {dir}");
    }
}

#[test]
fn corpus_decodes_without_panic() {
    let root = corpus_dir();
    for dir in ["peer", "rank"] {
        let (mut valid, mut bad) = (0, 0);
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = e.unwrap().path();
            if path.extension() != Some(std::ffi::OsStr::new("bin")) {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let bytes = std::fs::read(&path).unwrap();
            check_expectation(dir, &name, &bytes);
            if name.starts_with("valid-") {
                valid += 1;
            } else {
                bad += 1;
            }
        }
        assert!(
            valid >= 9 && bad >= 9,
            "{dir}: {valid} valid, {bad} bad files"
        );
    }
}
