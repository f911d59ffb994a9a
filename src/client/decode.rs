//! A receiver's model of a video decoder over the synthetic payload, so that tests can count what
//! a viewer would see: frames decoded, frames lost, and freezes.
//!
//! A frame is the publisher's `packets_per_frame` consecutive payload sequence numbers on one
//! layer (the synthetic publisher always sends whole frames). The model
//! - assembles frames from packets in any order, ignoring duplicates;
//! - decodes a complete frame if it is a key frame or every frame before it was decoded (a delta
//!   frame needs its predecessor), in frame order;
//! - gives up on a frame still incomplete [`MAX_WAIT`] after a later packet arrived (what NACK
//!   could not repair in time), or as soon as a complete key frame waits behind it;
//! - asks for a key frame (the caller sends a PLI) when it cannot decode, at most every
//!   [`REQUEST_INTERVAL`];
//! - counts a freeze the way WebRTC's stats do: a gap between decoded frames longer than both
//!   three mean frame intervals and a mean interval plus 150 ms.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// How long an incomplete frame may hold up the frames behind it.
pub const MAX_WAIT: Duration = Duration::from_millis(400);
/// The least time between two keyframe requests.
pub const REQUEST_INTERVAL: Duration = Duration::from_millis(200);
/// Frames waiting for their missing packets at most; beyond it the oldest is given up.
const MAX_PENDING: usize = 64;
/// Weight of a new inter-frame interval in the running mean.
const MEAN_WEIGHT: f64 = 1.0 / 16.0;

/// What the model has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    pub decoded: u64,
    /// Frames never complete in time (lost packets NACK did not bring back).
    pub lost: u64,
    /// Complete delta frames whose predecessor was not decoded.
    pub undecodable: u64,
    pub freezes: u64,
    /// Time spent frozen: the sum of the freezing gaps.
    pub frozen: Duration,
    pub keyframe_requests: u64,
    /// Packets that came after their frame was decoded or given up (late repairs, duplicates).
    pub late_packets: u64,
}

#[derive(Debug)]
struct Frame {
    /// Bit i: packet i of the frame arrived.
    received: u64,
    key: bool,
    first_at: Instant,
}

/// The decoder model of one video track.
#[derive(Debug)]
pub struct FrameDecoder {
    packets_per_frame: u64,
    layer: Option<u8>,
    /// The next frame to decode or give up on.
    next: Option<u64>,
    /// Every frame since the last key frame was decoded.
    in_sync: bool,
    pending: BTreeMap<u64, Frame>,
    last_decoded: Option<Instant>,
    /// Running mean of the intervals between decoded frames, in seconds.
    mean_interval: Option<f64>,
    last_request: Option<Instant>,
    counts: DecodeCounts,
}

impl FrameDecoder {
    /// A decoder for frames of `packets_per_frame` packets (1 to 64).
    pub fn new(packets_per_frame: u32) -> Self {
        FrameDecoder {
            packets_per_frame: u64::from(packets_per_frame.clamp(1, 64)),
            layer: None,
            next: None,
            in_sync: false,
            pending: BTreeMap::new(),
            last_decoded: None,
            mean_interval: None,
            last_request: None,
            counts: DecodeCounts::default(),
        }
    }

    pub fn counts(&self) -> DecodeCounts {
        self.counts
    }

    fn complete(&self, frame: &Frame) -> bool {
        frame.received.count_ones() as u64 == self.packets_per_frame
    }

    /// Takes one intact packet (its layer, payload sequence and key label). Returns whether a key
    /// frame should be requested now.
    pub fn packet(&mut self, layer: u8, seq: u64, key: bool, now: Instant) -> bool {
        if self.layer != Some(layer) {
            // Another layer is another stream: it starts at a key frame.
            self.layer = Some(layer);
            self.next = None;
            self.in_sync = false;
            self.pending.clear();
        }
        let number = seq / self.packets_per_frame;
        let index = seq % self.packets_per_frame;
        // A stream met in the middle of a frame starts at the next one.
        let next = *self
            .next
            .get_or_insert(if index == 0 { number } else { number + 1 });
        if number < next {
            self.counts.late_packets += 1;
        } else {
            let frame = self.pending.entry(number).or_insert(Frame {
                received: 0,
                key: false,
                first_at: now,
            });
            frame.received |= 1 << index;
            frame.key |= key;
            if self.pending.len() > MAX_PENDING {
                self.give_up();
            }
        }
        self.drain(now);
        if self.in_sync
            || self
                .last_request
                .is_some_and(|at| now.duration_since(at) < REQUEST_INTERVAL)
        {
            return false;
        }
        // Out of sync: only a key frame helps. The first frames of a stream wait for one
        // unrequested when the stream starts on one.
        let stuck = self.counts.lost + self.counts.undecodable > 0;
        if stuck {
            self.last_request = Some(now);
            self.counts.keyframe_requests += 1;
        }
        stuck
    }

    fn drain(&mut self, now: Instant) {
        while let Some(next) = self.next {
            if let Some(frame) = self.pending.get(&next)
                && self.complete(frame)
            {
                let key = frame.key;
                self.pending.remove(&next);
                if key || self.in_sync {
                    self.decoded(now);
                } else {
                    self.counts.undecodable += 1;
                }
                self.next = Some(next + 1);
                continue;
            }
            let key_behind = self.pending.iter().any(|(_, f)| f.key && self.complete(f));
            let waited = self
                .pending
                .values()
                .map(|f| f.first_at)
                .min()
                .is_some_and(|first| now.duration_since(first) >= MAX_WAIT);
            if !(key_behind || waited) {
                return;
            }
            self.give_up();
        }
    }

    /// Gives up on the next frame (and any missing ones after it) up to the next pending one.
    fn give_up(&mut self) {
        let Some(next) = self.next else { return };
        let following = self.pending.range(next + 1..).next().map(|(n, _)| *n);
        self.pending.remove(&next);
        let resume = following.unwrap_or(next + 1);
        self.counts.lost += resume - next;
        self.in_sync = false;
        self.next = Some(resume);
    }

    fn decoded(&mut self, now: Instant) {
        self.in_sync = true;
        self.counts.decoded += 1;
        if let Some(last) = self.last_decoded.replace(now) {
            let interval = now.duration_since(last).as_secs_f64();
            match self.mean_interval {
                Some(mean) if interval > (3.0 * mean).max(mean + 0.150) => {
                    self.counts.freezes += 1;
                    self.counts.frozen += Duration::from_secs_f64(interval);
                }
                Some(mean) => {
                    self.mean_interval = Some(mean + (interval - mean) * MEAN_WEIGHT);
                }
                None => self.mean_interval = Some(interval),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(33);

    /// Feeds `frames` frames of 3 packets, one every 33 ms, key every `key_every`; `lose` says
    /// which (frame, packet) never arrives.
    fn feed(
        decoder: &mut FrameDecoder,
        frames: u64,
        key_every: u64,
        lose: impl Fn(u64, u64) -> bool,
    ) -> u64 {
        let start = Instant::now();
        let mut requests = 0;
        for f in 0..frames {
            for p in 0..3 {
                if !lose(f, p) {
                    let at = start + FRAME * f as u32 + Duration::from_millis(p);
                    requests += u64::from(decoder.packet(0, f * 3 + p, f % key_every == 0, at));
                }
            }
        }
        requests
    }

    #[test]
    fn a_clean_stream_decodes_every_frame_without_freezing() {
        let mut d = FrameDecoder::new(3);
        assert_eq!(feed(&mut d, 300, 60, |_, _| false), 0);
        let c = d.counts();
        assert_eq!(
            (c.decoded, c.lost, c.undecodable, c.freezes),
            (300, 0, 0, 0)
        );
    }

    #[test]
    fn a_lost_packet_breaks_the_chain_until_the_next_key_frame_and_asks_for_it() {
        let mut d = FrameDecoder::new(3);
        // Frame 10 loses a packet; key frames every 60: frames 11..59 cannot be decoded.
        let requests = feed(&mut d, 120, 60, |f, p| f == 10 && p == 1);
        let c = d.counts();
        assert_eq!(c.lost, 1);
        assert_eq!(c.decoded, 10 + 60);
        assert_eq!(c.undecodable, 120 - 70 - 1);
        // Frame 10 is given up 400 ms later (MAX_WAIT), then one request per 200 ms while out
        // of sync until frame 60 (about 1.25 s).
        assert!((5..=8).contains(&requests), "{requests} requests");
        assert_eq!(c.keyframe_requests, requests);
        // The picture stood still from frame 9 to frame 60: one freeze of about 1.7 s.
        assert_eq!(c.freezes, 1);
        assert!(c.frozen > Duration::from_millis(1_600), "{:?}", c.frozen);
    }

    #[test]
    fn reordered_and_duplicated_packets_still_decode() {
        let mut d = FrameDecoder::new(3);
        let start = Instant::now();
        for f in 0..30u64 {
            let at = start + FRAME * f as u32;
            for p in [0, 2, 1, 0, 2] {
                d.packet(0, f * 3 + p, f == 0, at);
            }
        }
        assert_eq!(d.counts().decoded, 30);
        assert_eq!(d.counts().lost, 0);
    }

    #[test]
    fn a_repaired_packet_in_time_loses_nothing() {
        let mut d = FrameDecoder::new(3);
        let start = Instant::now();
        d.packet(0, 0, true, start);
        d.packet(0, 2, true, start);
        d.packet(0, 3, false, start + FRAME);
        d.packet(0, 4, false, start + FRAME);
        d.packet(0, 5, false, start + FRAME);
        assert_eq!(d.counts().decoded, 0, "frame 0 waits for its packet");
        d.packet(0, 1, true, start + Duration::from_millis(60));
        assert_eq!(d.counts().decoded, 2);
        assert_eq!(d.counts().lost, 0);
    }

    #[test]
    fn a_hostile_sequence_jump_costs_nothing() {
        let mut d = FrameDecoder::new(3);
        let start = Instant::now();
        d.packet(0, 0, true, start);
        d.packet(0, u64::MAX - 1, false, start);
        d.packet(0, 1, true, start + MAX_WAIT * 2);
        d.packet(0, 2, true, start + MAX_WAIT * 2);
        assert!(d.counts().lost > 0);
        assert!(d.pending.len() <= 2);
    }
}
