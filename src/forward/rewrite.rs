//! Per-subscriber header rewrite: each subscriber sees the track under its own SSRC and the
//! payload type negotiated on its own connection, with sequence numbers and timestamps moved to
//! a random base (RFC 3550 §5.1) so that streams restarted or spliced later stay continuous.

use super::MediaPacket;

#[derive(Debug, Clone)]
pub struct Rewriter {
    ssrc: u32,
    payload_type: u8,
    seq_base: u16,
    ts_base: u32,
    /// (first input sequence, first input timestamp) once the first packet went through.
    origin: Option<(u16, u32)>,
}

impl Rewriter {
    pub fn new(ssrc: u32, payload_type: u8, seq_base: u16, ts_base: u32) -> Self {
        Rewriter {
            ssrc,
            payload_type,
            seq_base,
            ts_base,
            origin: None,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The packet as this subscriber must see it. Wrapping arithmetic keeps the distance between
    /// packets (loss and reordering stay visible to the subscriber's NACK and jitter buffer).
    pub fn rewrite(&mut self, packet: &MediaPacket) -> MediaPacket {
        let (seq0, ts0) = *self
            .origin
            .get_or_insert((packet.sequence, packet.timestamp));
        MediaPacket {
            marker: packet.marker,
            payload_type: self.payload_type,
            sequence: self
                .seq_base
                .wrapping_add(packet.sequence.wrapping_sub(seq0)),
            timestamp: self
                .ts_base
                .wrapping_add(packet.timestamp.wrapping_sub(ts0)),
            ssrc: self.ssrc,
            payload: packet.payload.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pkt(seq: u16, ts: u32) -> MediaPacket {
        MediaPacket {
            marker: false,
            payload_type: 96,
            sequence: seq,
            timestamp: ts,
            ssrc: 1,
            payload: Bytes::from_static(b"abc"),
        }
    }

    #[test]
    fn rewrites_ssrc_pt_and_moves_seq_ts_to_base() {
        let mut r = Rewriter::new(7, 100, 1000, 5000);
        let a = r.rewrite(&pkt(65535, u32::MAX - 10));
        assert_eq!(
            (a.ssrc, a.payload_type, a.sequence, a.timestamp),
            (7, 100, 1000, 5000)
        );
        // Wraps in the input, keeps distances in the output.
        let b = r.rewrite(&pkt(1, 20));
        assert_eq!((b.sequence, b.timestamp), (1002, 5031));
        // Reordered (older) packet keeps its place.
        let c = r.rewrite(&pkt(0, 5));
        assert_eq!(c.sequence, 1001);
        // The payload is shared, not copied.
        assert_eq!(c.payload.as_ptr(), pkt(0, 0).payload.as_ptr());
    }

    #[test]
    fn output_wraps_too() {
        let mut r = Rewriter::new(7, 100, 65535, u32::MAX);
        r.rewrite(&pkt(10, 10));
        let b = r.rewrite(&pkt(11, 13));
        assert_eq!((b.sequence, b.timestamp), (0, 2));
    }
}
