//! Per-subscriber header rewrite: each subscriber sees the track under the payload type
//! negotiated on its own connection, with sequence numbers and timestamps moved to a random base
//! (RFC 3550 §5.1) so that streams restarted or spliced later stay continuous. The subscriber's
//! SSRC is its connection's business (the engine writes it).

use super::MediaPacket;

/// The rewritten header fields of one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub payload_type: u8,
    /// Extended sequence number on the subscriber's stream.
    pub seq: u64,
    pub timestamp: u32,
}

#[derive(Debug, Clone)]
pub struct Rewriter {
    payload_type: u8,
    seq_base: u64,
    ts_base: u32,
    /// (first input sequence, first input timestamp) once the first packet went through.
    origin: Option<(u64, u32)>,
}

impl Rewriter {
    /// `seq_base` should be below 2^15 so the subscriber's stream starts with rollover counter 0
    /// and reordered packets before the first one cannot go below zero.
    pub fn new(payload_type: u8, seq_base: u16, ts_base: u32) -> Self {
        Rewriter {
            payload_type,
            seq_base: u64::from(seq_base) + (1 << 15),
            ts_base,
            origin: None,
        }
    }

    /// The packet's header as this subscriber must see it. Distances between packets are kept
    /// (loss and reordering stay visible to the subscriber's NACK and jitter buffer).
    pub fn rewrite(&mut self, packet: &MediaPacket) -> Rewritten {
        let (seq0, ts0) = *self.origin.get_or_insert((packet.seq, packet.timestamp));
        Rewritten {
            payload_type: self.payload_type,
            seq: self.seq_base.wrapping_add(packet.seq.wrapping_sub(seq0)),
            timestamp: self
                .ts_base
                .wrapping_add(packet.timestamp.wrapping_sub(ts0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pkt(seq: u64, ts: u32) -> MediaPacket {
        MediaPacket {
            seq,
            timestamp: ts,
            marker: false,
            keyframe: false,
            payload: std::sync::Arc::from(&b"abc"[..]),
            received_at: Instant::now(),
        }
    }

    #[test]
    fn moves_seq_ts_to_base_and_sets_payload_type() {
        let mut r = Rewriter::new(100, 1000, 5000);
        let a = r.rewrite(&pkt(65535, u32::MAX - 10));
        assert_eq!((a.payload_type, a.seq, a.timestamp), (100, 33768, 5000));
        // Wraps in the input timestamp, keeps distances in the output.
        let b = r.rewrite(&pkt(65537, 20));
        assert_eq!((b.seq, b.timestamp), (33770, 5031));
        // A reordered (older) packet keeps its place.
        let c = r.rewrite(&pkt(65536, 5));
        assert_eq!(c.seq, 33769);
        // One reordered from before the first still has a place.
        let d = r.rewrite(&pkt(65530, 0));
        assert_eq!(d.seq, 33763);
    }

    #[test]
    fn timestamps_wrap() {
        let mut r = Rewriter::new(100, 0, u32::MAX);
        r.rewrite(&pkt(10, 10));
        let b = r.rewrite(&pkt(11, 13));
        assert_eq!((b.seq, b.timestamp), ((1 << 15) + 1, 2));
    }
}
