//! Per-subscriber header rewrite: each subscriber sees a track as one continuous stream under
//! the payload type negotiated on its own connection, whatever the publisher's layer it is fed
//! from. Sequence numbers, timestamps and VP8 picture ids move to a random base (RFC 3550 §5.1)
//! and are spliced at every layer switch, pause or resume, so the decoder never sees a gap or a
//! jump back. The subscriber's SSRC is its connection's business (the engine writes it).

use std::time::Instant;

use super::MediaPacket;
use super::packet::Vp8Ids;

/// VP8 picture ids are 15 bits (a 7-bit one is the low bits of the same count).
const PICTURE_ID_MASK: u16 = 0x7fff;

/// The rewritten header fields of one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub payload_type: u8,
    /// Extended sequence number on the subscriber's stream.
    pub seq: u64,
    pub timestamp: u32,
    /// VP8 picture numbering on the subscriber's stream (None: leave the payload as is).
    pub vp8: Option<Vp8Ids>,
    /// A RED packet for a subscriber without RED: send only its primary block.
    pub primary_only: bool,
}

/// The newest packet sent: where the next segment continues from.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    timestamp: u32,
    at: Instant,
    vp8: Option<Vp8Ids>,
}

/// How input maps to output since the last splice: output = input + offset.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Input sequence number of the segment's first packet: older ones are dropped.
    first_seq: u64,
    seq: u64,
    timestamp: u32,
    picture_id: u16,
    tl0_pic_idx: u8,
}

#[derive(Debug, Clone)]
pub struct Rewriter {
    payload_type: u8,
    /// The subscriber's payload type for RED (RFC 2198) around the codec, if it took RED.
    red_payload_type: Option<u8>,
    /// RED is sent as RED (not cut to its primary block): off on a narrow downlink.
    red_on: bool,
    /// Timestamp ticks per millisecond, to advance the timestamp across a splice by the time
    /// that passed.
    ticks_per_ms: u32,
    seq_base: u64,
    ts_base: u32,
    last: Option<Sent>,
    segment: Option<Segment>,
}

impl Rewriter {
    /// `seq_base` should be below 2^15 so the subscriber's stream starts with rollover counter 0.
    pub fn new(payload_type: u8, clock_rate: u32, seq_base: u16, ts_base: u32) -> Self {
        Rewriter {
            payload_type,
            red_payload_type: None,
            red_on: true,
            ticks_per_ms: (clock_rate / 1000).max(1),
            seq_base: u64::from(seq_base) + (1 << 15),
            ts_base,
            last: None,
            segment: None,
        }
    }

    /// The subscriber takes RED (RFC 2198) under this payload type: RED packets go to it as they
    /// are. Without it, they go as their primary block.
    pub fn with_red(mut self, red_payload_type: Option<u8>) -> Self {
        self.red_payload_type = red_payload_type;
        self
    }

    /// Whether RED goes to the subscriber as RED (true) or as its primary block, which halves
    /// what its audio costs.
    pub fn set_red(&mut self, on: bool) {
        self.red_on = on;
    }

    /// Sends another track's packets from now on, under `payload_type` and `clock_rate`, as a
    /// splice: the output continues where this one left it (one send stream, one sequence
    /// space, whose SRTP rollover counter the subscriber tracks).
    pub fn continue_with(
        mut self,
        payload_type: u8,
        clock_rate: u32,
        red_payload_type: Option<u8>,
    ) -> Self {
        self.payload_type = payload_type;
        self.ticks_per_ms = (clock_rate / 1000).max(1);
        self.red_payload_type = red_payload_type;
        self.splice();
        self
    }

    /// The next packet starts a new segment (another layer, or after a pause): it continues the
    /// output where the newest packet sent left it.
    pub fn splice(&mut self) {
        self.segment = None;
    }

    /// The packet's header as this subscriber must see it, or None for a packet older than the
    /// segment's start. Within a segment distances between packets are kept (loss and
    /// reordering stay visible to the subscriber's NACK and jitter buffer).
    pub fn rewrite(&mut self, packet: &MediaPacket) -> Option<Rewritten> {
        let segment = match self.segment {
            Some(s) if packet.seq < s.first_seq => return None,
            Some(s) => s,
            None => *self.segment.insert(self.start_segment(packet)),
        };
        let seq = packet.seq.wrapping_add(segment.seq);
        let timestamp = packet.timestamp.wrapping_add(segment.timestamp);
        let vp8 = packet.vp8.map(|ids| Vp8Ids {
            picture_id: ids
                .picture_id
                .map(|p| p.wrapping_add(segment.picture_id) & PICTURE_ID_MASK),
            tl0_pic_idx: ids.tl0_pic_idx.map(|t| t.wrapping_add(segment.tl0_pic_idx)),
        });
        if self.last.is_none_or(|l| seq > l.seq) {
            self.last = Some(Sent {
                seq,
                timestamp,
                at: packet.received_at,
                vp8,
            });
        }
        let (payload_type, primary_only) = match (packet.red, self.red_payload_type) {
            (true, Some(red)) if self.red_on => (red, false),
            (true, _) => (self.payload_type, true),
            (false, _) => (self.payload_type, false),
        };
        Some(Rewritten {
            payload_type,
            seq,
            timestamp,
            vp8,
            primary_only,
        })
    }

    /// Offsets that put `first` right after the newest packet sent.
    fn start_segment(&self, first: &MediaPacket) -> Segment {
        let in_ids = first.vp8.unwrap_or_default();
        let (seq, timestamp, picture_id, tl0_pic_idx) = match self.last {
            None => (
                self.seq_base,
                self.ts_base,
                in_ids.picture_id,
                in_ids.tl0_pic_idx,
            ),
            Some(last) => {
                let elapsed = first.received_at.saturating_duration_since(last.at);
                let ticks = (elapsed.as_millis() as u32)
                    .saturating_mul(self.ticks_per_ms)
                    .max(1);
                let ids = last.vp8.unwrap_or_default();
                (
                    last.seq + 1,
                    last.timestamp.wrapping_add(ticks),
                    ids.picture_id.map(|p| p.wrapping_add(1)),
                    ids.tl0_pic_idx.map(|t| t.wrapping_add(1)),
                )
            }
        };
        let offset = |out: Option<u16>, input: Option<u16>| match (out, input) {
            (Some(o), Some(i)) => o.wrapping_sub(i),
            _ => 0,
        };
        Segment {
            first_seq: first.seq,
            seq: seq.wrapping_sub(first.seq),
            timestamp: timestamp.wrapping_sub(first.timestamp),
            picture_id: offset(picture_id, in_ids.picture_id),
            tl0_pic_idx: offset(
                tl0_pic_idx.map(u16::from),
                in_ids.tl0_pic_idx.map(u16::from),
            ) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(seq: u64, ts: u32, at: Instant) -> MediaPacket {
        MediaPacket::received(seq, ts, false, 0, std::sync::Arc::from(&b"abc"[..]), at)
    }

    fn vp8(seq: u64, ts: u32, at: Instant, pid: u16, tl0: u8) -> MediaPacket {
        let mut p = pkt(seq, ts, at);
        p.vp8 = Some(Vp8Ids {
            picture_id: Some(pid),
            tl0_pic_idx: Some(tl0),
        });
        p
    }

    #[test]
    fn moves_seq_ts_to_base_and_keeps_distances() {
        let t = Instant::now();
        let mut r = Rewriter::new(100, 90_000, 1000, 5000);
        let a = r.rewrite(&pkt(65535, u32::MAX - 10, t)).unwrap();
        assert_eq!((a.payload_type, a.seq, a.timestamp), (100, 33768, 5000));
        // Wraps in the input timestamp, keeps distances in the output.
        let b = r.rewrite(&pkt(65537, 20, t)).unwrap();
        assert_eq!((b.seq, b.timestamp), (33770, 5031));
        // A reordered (older) packet keeps its place.
        let c = r.rewrite(&pkt(65536, 5, t)).unwrap();
        assert_eq!(c.seq, 33769);
        // One from before the segment's first packet has no place.
        assert_eq!(r.rewrite(&pkt(65530, 0, t)), None);
    }

    /// Another track on the same send stream (WHEP changing source) continues its sequence
    /// space under the new track's payload type, whatever the new track's own numbers.
    #[test]
    fn another_track_continues_the_send_stream() {
        let t = Instant::now();
        let mut r = Rewriter::new(100, 90_000, 1000, 5000);
        let a = r.rewrite(&pkt(7, 900, t)).unwrap();
        let mut r = r.continue_with(102, 90_000, None);
        let later = t + Duration::from_millis(10);
        let b = r.rewrite(&pkt(40_000, 123_456, later)).unwrap();
        assert_eq!((b.payload_type, b.seq), (102, a.seq + 1));
        assert!(
            b.timestamp.wrapping_sub(a.timestamp) >= 900,
            "advanced by the 10 ms"
        );
    }

    #[test]
    fn red_goes_as_red_where_taken_and_as_its_primary_elsewhere() {
        let t = Instant::now();
        let mut red = pkt(1, 0, t);
        red.red = true;
        let mut with = Rewriter::new(111, 48_000, 0, 0).with_red(Some(63));
        let h = with.rewrite(&red).unwrap();
        assert_eq!((h.payload_type, h.primary_only), (63, false));
        let mut without = Rewriter::new(111, 48_000, 0, 0);
        let h = without.rewrite(&red).unwrap();
        assert_eq!((h.payload_type, h.primary_only), (111, true));
        let h = with.rewrite(&pkt(2, 960, t)).unwrap();
        assert_eq!((h.payload_type, h.primary_only), (111, false), "plain Opus");
        with.set_red(false);
        let h = with.rewrite(&red).unwrap();
        assert_eq!(
            (h.payload_type, h.primary_only),
            (111, true),
            "a narrow downlink"
        );
    }

    #[test]
    fn a_splice_continues_sequence_timestamp_and_picture_ids() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(96, 90_000, 0, 0);
        // Layer A: seq 100.., picture id 500, TL0PICIDX 10; 101 is lost.
        r.rewrite(&vp8(100, 9000, t0, 500, 10)).unwrap();
        let a2 = r.rewrite(&vp8(102, 12000, t0, 501, 11)).unwrap();
        assert_eq!(a2.seq, (1 << 15) + 2, "the loss stays visible");
        // Layer B, 40 ms later: its own numbering, far away.
        r.splice();
        let t1 = t0 + Duration::from_millis(40);
        let b1 = r.rewrite(&vp8(7000, 777_000, t1, 30_000, 200)).unwrap();
        assert_eq!(b1.seq, a2.seq + 1);
        assert_eq!(b1.timestamp, a2.timestamp + 40 * 90);
        let ids = b1.vp8.unwrap();
        assert_eq!((ids.picture_id, ids.tl0_pic_idx), (Some(502), Some(12)));
        // Then B's own distances, and nothing from before its switch point.
        let b2 = r.rewrite(&vp8(7001, 780_000, t1, 30_001, 200)).unwrap();
        assert_eq!(
            (b2.seq, b2.timestamp, b2.vp8.unwrap().picture_id),
            (b1.seq + 1, b1.timestamp + 3000, Some(503))
        );
        assert_eq!(r.rewrite(&vp8(6999, 774_000, t1, 29_999, 199)), None);
    }

    #[test]
    fn picture_ids_wrap_at_15_bits_and_timestamps_always_advance() {
        let t = Instant::now();
        let mut r = Rewriter::new(96, 90_000, 0, u32::MAX);
        let a = r.rewrite(&vp8(1, 0, t, 0x7fff, 255)).unwrap();
        r.splice();
        // Same arrival time: the timestamp still moves on by one tick.
        let b = r.rewrite(&vp8(50, 0, t, 3, 0)).unwrap();
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(1));
        let ids = b.vp8.unwrap();
        assert_eq!((ids.picture_id, ids.tl0_pic_idx), (Some(0), Some(0)));
    }

    #[test]
    fn reordering_across_a_splice_point_is_dropped_not_misplaced() {
        let t = Instant::now();
        let mut r = Rewriter::new(96, 90_000, 0, 0);
        r.rewrite(&pkt(10, 0, t)).unwrap();
        r.rewrite(&pkt(12, 0, t)).unwrap();
        r.splice();
        let s = r.rewrite(&pkt(20, 0, t)).unwrap();
        assert_eq!(s.seq, (1 << 15) + 3);
        // 11 of the old segment and 19 of the new one both come late: neither fits.
        assert_eq!(r.rewrite(&pkt(11, 0, t)), None);
        assert_eq!(r.rewrite(&pkt(19, 0, t)), None);
        assert_eq!(r.rewrite(&pkt(21, 0, t)).unwrap().seq, s.seq + 1);
    }
}
