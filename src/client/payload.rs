//! The synthetic media payload the test client sends, and its parser.
//!
//! Every RTP payload the client writes starts with a fixed 25-byte header and is padded to the
//! configured size with a pattern derived from the sequence number, so a receiver can tell that
//! the bytes arrived untouched:
//!
//! ```text
//! offset  size  field
//!      0     4  magic            PAYLOAD_MAGIC
//!      4     4  sender           participant_hash(publisher participant id), big endian
//!      8     1  kind             0 = audio, 1 + simulcast layer = video (1: lowest or only)
//!      9     8  seq              per-track payload sequence, from 0, big endian
//!     17     8  sent_at_us       microseconds since the UNIX epoch, big endian
//!     25     …  padding          byte at offset i is (seq + i) mod 256
//! ```
//!
//! The magic's first two bytes also read as a VP8 payload descriptor with the start-of-partition
//! bit set followed by a VP8 frame tag with the key-frame bit set (`0x10`, `0x50`), so a server
//! that sniffs VP8 key frames before forwarding a video track to a new subscriber sees one in
//! every packet instead of waiting forever. H.264-labelled tracks replace the first byte with
//! [`H264_IDR_BYTE`], an IDR NAL unit header, for the same reason.
//!
//! This module is pure (no I/O, no clock except [`now_micros`]) so the load generator reuses it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::signal::protocol::MediaKind;

/// The first four bytes of every synthetic payload.
pub const PAYLOAD_MAGIC: [u8; 4] = [0x10, 0x50, 0x53, 0x42];

/// First payload byte of H.264-labelled tracks: a NAL unit header of type 5 (IDR slice).
pub const H264_IDR_BYTE: u8 = 0x65;
/// First payload byte of H.264-labelled delta frames: a NAL unit header of type 1.
pub const H264_DELTA_BYTE: u8 = 0x41;
/// Second payload byte of VP8-labelled delta frames: a frame tag with the inter-frame bit.
pub const VP8_DELTA_BYTE: u8 = 0x51;

/// Marks a written payload as a delta (not key) frame of its codec label.
pub fn mark_delta(payload: &mut [u8], h264: bool) {
    if h264 {
        payload[0] = H264_DELTA_BYTE;
    } else {
        payload[1] = VP8_DELTA_BYTE;
    }
}

/// Whether a synthetic payload is labelled as (part of) a key frame.
pub fn is_key(payload: &[u8]) -> bool {
    payload.len() >= 2 && payload[0] != H264_DELTA_BYTE && payload[1] != VP8_DELTA_BYTE
}

/// Length of the fixed header in front of the padding.
pub const PAYLOAD_HEADER_LEN: usize = 25;

/// The fields carried at the start of a synthetic payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    /// [`participant_hash`] of the publishing participant's id.
    pub sender: u32,
    pub kind: MediaKind,
    /// Simulcast layer of a video packet (0: the lowest, or the only one).
    pub layer: u8,
    /// Per-layer payload sequence number, counting every packet the publisher sent on that
    /// layer from 0.
    pub seq: u64,
    /// Send time, microseconds since the UNIX epoch.
    pub sent_at_us: u64,
}

/// Why a payload did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload shorter than the {PAYLOAD_HEADER_LEN}-byte header")]
    TooShort,
    #[error("payload does not start with the synthetic-media magic")]
    BadMagic,
    #[error("unknown media kind byte {0}")]
    BadKind(u8),
    #[error("padding byte at offset {0} does not match the pattern")]
    BadPadding(usize),
}

/// Video layers the kind byte can carry.
const MAX_LAYERS: u8 = 8;

fn kind_byte(kind: MediaKind, layer: u8) -> u8 {
    match kind {
        MediaKind::Audio => 0,
        MediaKind::Video => 1 + layer.min(MAX_LAYERS - 1),
    }
}

/// Appends a payload of `size` bytes (at least the header) for `header` to `out`.
pub fn write_payload(header: &PayloadHeader, size: usize, out: &mut BytesMut) {
    let size = size.max(PAYLOAD_HEADER_LEN);
    out.reserve(size);
    out.put_slice(&PAYLOAD_MAGIC);
    out.put_u32(header.sender);
    out.put_u8(kind_byte(header.kind, header.layer));
    out.put_u64(header.seq);
    out.put_u64(header.sent_at_us);
    let base = header.seq as usize;
    for i in PAYLOAD_HEADER_LEN..size {
        out.put_u8((base.wrapping_add(i) & 0xff) as u8);
    }
}

/// A payload of `size` bytes for `header`.
pub fn encode_payload(header: &PayloadHeader, size: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(size.max(PAYLOAD_HEADER_LEN));
    write_payload(header, size, &mut out);
    out.freeze()
}

/// Parses a synthetic payload and checks its padding; never panics on any input.
pub fn parse_payload(buf: &[u8]) -> Result<PayloadHeader, PayloadError> {
    if buf.len() < PAYLOAD_HEADER_LEN {
        return Err(PayloadError::TooShort);
    }
    let first_ok = [PAYLOAD_MAGIC[0], H264_IDR_BYTE, H264_DELTA_BYTE].contains(&buf[0]);
    let second_ok = buf[1] == PAYLOAD_MAGIC[1] || buf[1] == VP8_DELTA_BYTE;
    if !first_ok || !second_ok || buf[2..4] != PAYLOAD_MAGIC[2..] {
        return Err(PayloadError::BadMagic);
    }
    let sender = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let (kind, layer) = match buf[8] {
        0 => (MediaKind::Audio, 0),
        b @ 1..=MAX_LAYERS => (MediaKind::Video, b - 1),
        other => return Err(PayloadError::BadKind(other)),
    };
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[9..17]);
    let seq = u64::from_be_bytes(seq);
    let mut sent = [0u8; 8];
    sent.copy_from_slice(&buf[17..25]);
    let sent_at_us = u64::from_be_bytes(sent);
    let base = seq as usize;
    for (i, byte) in buf.iter().enumerate().skip(PAYLOAD_HEADER_LEN) {
        if *byte != (base.wrapping_add(i) & 0xff) as u8 {
            return Err(PayloadError::BadPadding(i));
        }
    }
    Ok(PayloadHeader {
        sender,
        kind,
        layer,
        seq,
        sent_at_us,
    })
}

/// 32-bit FNV-1a of a participant id: the `sender` field of payloads it publishes.
pub fn participant_hash(participant_id: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in participant_id.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Microseconds since the UNIX epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let header = PayloadHeader {
            sender: participant_hash("p1"),
            kind: MediaKind::Video,
            layer: 2,
            seq: 123_456,
            sent_at_us: 1_700_000_000_000_000,
        };
        let bytes = encode_payload(&header, 1100);
        assert_eq!(bytes.len(), 1100);
        assert_eq!(parse_payload(&bytes), Ok(header));
        // A header-only payload is valid too.
        let short = encode_payload(&header, 3);
        assert_eq!(short.len(), PAYLOAD_HEADER_LEN);
        assert_eq!(parse_payload(&short), Ok(header));
    }

    #[test]
    fn rejects_damage() {
        let header = PayloadHeader {
            sender: 7,
            kind: MediaKind::Audio,
            layer: 0,
            seq: 9,
            sent_at_us: 1,
        };
        let good = encode_payload(&header, 100);
        assert_eq!(parse_payload(&good[..10]), Err(PayloadError::TooShort));
        let mut bad = good.to_vec();
        bad[0] ^= 1;
        assert_eq!(parse_payload(&bad), Err(PayloadError::BadMagic));
        let mut bad = good.to_vec();
        bad[8] = 9;
        assert_eq!(parse_payload(&bad), Err(PayloadError::BadKind(9)));
        let mut bad = good.to_vec();
        bad[60] ^= 0xff;
        assert_eq!(parse_payload(&bad), Err(PayloadError::BadPadding(60)));
        assert!(parse_payload(&[]).is_err());
    }

    #[test]
    fn hash_is_fnv1a() {
        assert_eq!(participant_hash(""), 0x811c_9dc5);
        assert_eq!(participant_hash("a"), 0xe40c_292c);
        assert_ne!(participant_hash("p1"), participant_hash("p2"));
    }
}
