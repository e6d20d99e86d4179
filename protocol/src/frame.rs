//! Framing of typed messages: a 4-byte little-endian length, then the message
//! encoded with postcard. Encoding and decoding work on caller buffers and
//! never allocate, so the preload library can use them inside its allocator.

use serde::{Deserialize, Serialize};

/// Largest frame body accepted; anything larger is a malformed peer.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes of the length prefix.
pub const HEADER: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message does not fit in the {0}-byte buffer")]
    TooLarge(usize),
    #[error("frame announces {0} bytes, more than the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
}

/// Encodes `msg` with its length prefix into `buf`; returns the frame length.
pub fn encode<T: Serialize>(msg: &T, buf: &mut [u8]) -> Result<usize, FrameError> {
    if buf.len() < HEADER {
        return Err(FrameError::TooLarge(buf.len()));
    }
    let capacity = buf.len();
    let (head, body) = buf.split_at_mut(HEADER);
    let used = postcard::to_slice(msg, body)
        .map_err(|_| FrameError::TooLarge(capacity))?
        .len();
    head.copy_from_slice(&(used as u32).to_le_bytes());
    Ok(HEADER + used)
}

/// Length of the body announced by a frame header.
pub fn body_len(header: [u8; HEADER]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        Err(FrameError::Oversized(len))
    } else {
        Ok(len)
    }
}

/// Decodes a frame body (without its header). Trailing bytes are an error:
/// a well-formed peer never sends them.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Zone;
    use crate::rank::{AgentReply, Channel, ErrorCode, RankRequest};

    #[test]
    fn round_trip() {
        let mut buf = [0u8; 256];
        let msgs = [
            RankRequest::Hello {
                protocol: 1,
                rank: 3,
                pid: 42,
                channel: Channel::Sync,
                jobid: "20261122-0000-abcd",
                restoring: true,
            },
            RankRequest::CkptParked {
                entered_ns: 5,
                image_addr: 0x2000_0000_0000,
                image_len: 4096,
            },
            RankRequest::Barrier { seq: 9 },
            RankRequest::RegisterUffd { zone: Zone::Shared },
            RankRequest::SegmentOpen {
                name: "/shm-x",
                size: 1 << 20,
                create: true,
                exclusive: false,
            },
        ];
        for m in msgs {
            let n = encode(&m, &mut buf).unwrap();
            let len = body_len(buf[..4].try_into().unwrap()).unwrap();
            assert_eq!(len + HEADER, n);
            let back: RankRequest = decode(&buf[HEADER..n]).unwrap();
            assert_eq!(back, m);
        }
        let reply = AgentReply::Error {
            code: ErrorCode::Exists,
            message: "segment /x exists",
        };
        let n = encode(&reply, &mut buf).unwrap();
        assert_eq!(decode::<AgentReply>(&buf[HEADER..n]).unwrap(), reply);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let mut buf = [0u8; 64];
        let n = encode(&RankRequest::Lock { id: 7, seq: 1 }, &mut buf).unwrap();
        assert!(decode::<RankRequest>(&buf[HEADER..n - 1]).is_err());
        assert!(decode::<RankRequest>(&[0xff, 0xff, 0xff]).is_err());
        let mut long = buf[HEADER..n].to_vec();
        long.push(0);
        assert!(decode::<RankRequest>(&long).is_err());
        assert!(body_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    }

    #[test]
    fn too_small_buffer() {
        let mut buf = [0u8; 6];
        let m = RankRequest::SegmentUnlink {
            name: "a-rather-long-name",
        };
        assert!(matches!(encode(&m, &mut buf), Err(FrameError::TooLarge(_))));
    }
}
