//! The fan-out of one published track on one media worker.
//!
//! Every worker that has subscribers of a track holds a `TrackForwarder` for it. The one on the
//! publisher's worker is the *source*: it sees the packets first, removes padding, marks
//! keyframes, throttles keyframe requests to the publisher, and lists the other workers the
//! packet must be relayed to. A forwarder is owned by its worker's event loop, so nothing here
//! takes a lock; subscribers come and go by method calls between packets.

use std::time::{Duration, Instant};

use super::codec::VideoFormat;
use super::padding::PaddingRemover;
use super::rewrite::Rewritten;
use super::{DownTrack, KeyframeThrottle, MediaPacket, Rewriter};

/// One packet for one subscriber: the engine writes `packet.payload` with these header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<K> {
    pub to: K,
    pub header: Rewritten,
    pub marker: bool,
}

#[derive(Debug)]
pub struct TrackForwarder<K> {
    /// Video format whose keyframes are recognised (None: audio, or not recognised).
    format: Option<VideoFormat>,
    is_video: bool,
    downtracks: Vec<DownTrack<K>>,
    /// Other workers with subscribers of this track (source forwarder only).
    relays: Vec<usize>,
    keyframes: KeyframeThrottle,
    padding: PaddingRemover,
}

impl<K: Copy + Eq> TrackForwarder<K> {
    /// `mime` is the track's codec (`video/VP8`, `audio/opus`, ...).
    pub fn new(mime: &str, keyframe_interval: Duration) -> Self {
        TrackForwarder {
            format: VideoFormat::from_mime(mime),
            is_video: mime.len() >= 6 && mime[..6].eq_ignore_ascii_case("video/"),
            downtracks: Vec::new(),
            relays: Vec::new(),
            keyframes: KeyframeThrottle::new(keyframe_interval),
            padding: PaddingRemover::default(),
        }
    }

    pub fn is_video(&self) -> bool {
        self.is_video
    }

    pub fn subscriber_count(&self) -> usize {
        self.downtracks.len()
    }

    /// Neither local subscribers nor other workers to relay to.
    pub fn is_idle(&self) -> bool {
        self.downtracks.is_empty() && self.relays.is_empty()
    }

    /// Starts sending to a subscriber (its connection can decrypt: negotiation and DTLS are
    /// done). A video subscriber waits for a keyframe, which is asked for.
    pub fn add_downtrack(&mut self, to: K, rewriter: Rewriter) {
        self.downtracks.retain(|d| d.subscriber() != to);
        let wait = self.format.is_some();
        self.downtracks.push(DownTrack::new(to, rewriter, wait));
        self.request_keyframe();
    }

    /// Stops sending to a subscriber. True if it was there.
    pub fn remove_downtrack(&mut self, to: K) -> bool {
        let before = self.downtracks.len();
        self.downtracks.retain(|d| d.subscriber() != to);
        self.downtracks.len() != before
    }

    pub fn add_relay(&mut self, worker: usize) {
        if !self.relays.contains(&worker) {
            self.relays.push(worker);
        }
    }

    pub fn remove_relay(&mut self, worker: usize) {
        self.relays.retain(|w| *w != worker);
    }

    /// The other workers this track's packets go to.
    pub fn relays(&self) -> &[usize] {
        &self.relays
    }

    /// Someone lost the picture (a subscriber's PLI/FIR, a new subscriber).
    pub fn request_keyframe(&mut self) {
        if self.is_video {
            self.keyframes.request();
        }
    }

    /// Whether to send a keyframe request on now (throttled).
    pub fn poll_keyframe_request(&mut self, now: Instant) -> bool {
        self.keyframes.poll(now)
    }

    /// When a deferred keyframe request falls due, for the worker's timer.
    pub fn keyframe_request_due(&self, now: Instant) -> Option<Instant> {
        self.keyframes.due(now)
    }

    /// Source side: takes a packet from the publisher. Padding-only packets (bandwidth probes)
    /// carry nothing to forward: they return false and the sequence numbers after them close
    /// the gap (see [`PaddingRemover`]). Otherwise the packet's keyframe flag is set and it is
    /// ready to be forwarded here and relayed.
    pub fn ingest(&mut self, packet: &mut MediaPacket) -> bool {
        let Some(seq) = self.padding.map(packet.seq, packet.payload.is_empty()) else {
            return false;
        };
        packet.seq = seq;
        packet.keyframe = self
            .format
            .is_some_and(|f| f.starts_keyframe(&packet.payload));
        true
    }

    /// Rewrites a packet for every local subscriber into `out` (cleared first). Subscribers
    /// still waiting for a keyframe get nothing and keep the keyframe request alive.
    pub fn forward(&mut self, packet: &MediaPacket, out: &mut Vec<Delivery<K>>) {
        out.clear();
        let mut waiting = false;
        for downtrack in &mut self.downtracks {
            match downtrack.rewrite(packet) {
                Some(header) => out.push(Delivery {
                    to: downtrack.subscriber(),
                    header,
                    marker: packet.marker,
                }),
                None => waiting = true,
            }
        }
        if waiting {
            // Throttled: re-asks every interval until the keyframe arrives (a request may be lost).
            self.request_keyframe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const VP8_KEY: &[u8] = &[0x10, 0x50, 0xaa];
    const VP8_DELTA: &[u8] = &[0x10, 0x51, 0xaa];

    fn pkt(seq: u64, payload: &[u8]) -> MediaPacket {
        MediaPacket {
            seq,
            timestamp: seq as u32 * 3000,
            marker: false,
            keyframe: false,
            payload: Arc::from(payload),
            received_at: Instant::now(),
        }
    }

    fn run(f: &mut TrackForwarder<u32>, mut p: MediaPacket) -> Vec<Delivery<u32>> {
        let mut out = Vec::new();
        if f.ingest(&mut p) {
            f.forward(&p, &mut out);
        }
        out
    }

    #[test]
    fn fans_out_with_per_subscriber_payload_type() {
        let mut f = TrackForwarder::new("audio/opus", KeyframeThrottle::DEFAULT_INTERVAL);
        f.add_downtrack(1, Rewriter::new(111, 0, 0));
        f.add_downtrack(2, Rewriter::new(109, 0, 0));
        let out = run(&mut f, pkt(10, b"x"));
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].to, out[0].header.payload_type), (1, 111));
        assert_eq!((out[1].to, out[1].header.payload_type), (2, 109));
    }

    #[test]
    fn video_subscriber_starts_on_a_keyframe_and_asks_for_one() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::new("video/VP8", Duration::from_millis(500));
        f.add_downtrack(1, Rewriter::new(96, 0, 0));
        assert!(f.poll_keyframe_request(t0), "a new video subscriber asks");
        assert!(run(&mut f, pkt(1, VP8_DELTA)).is_empty(), "held back");
        assert!(!f.poll_keyframe_request(t0), "throttled");
        assert!(
            f.poll_keyframe_request(t0 + Duration::from_millis(600)),
            "asked again"
        );
        let out = run(&mut f, pkt(2, VP8_KEY));
        assert_eq!(out.len(), 1);
        assert_eq!(run(&mut f, pkt(3, VP8_DELTA)).len(), 1, "then everything");
        assert!(!f.poll_keyframe_request(t0 + Duration::from_secs(5)));
        // Audio never waits and never asks.
        let mut a = TrackForwarder::new("audio/opus", Duration::from_millis(500));
        a.add_downtrack(1, Rewriter::new(111, 0, 0));
        a.request_keyframe();
        assert!(!a.poll_keyframe_request(t0));
        assert_eq!(run(&mut a, pkt(1, b"x")).len(), 1);
    }

    #[test]
    fn unrecognised_video_is_not_held_back() {
        let mut f = TrackForwarder::new("video/H265", Duration::from_millis(500));
        f.add_downtrack(1, Rewriter::new(96, 0, 0));
        assert_eq!(run(&mut f, pkt(1, b"x")).len(), 1);
    }

    #[test]
    fn remove_and_readd_replaces() {
        let mut f = TrackForwarder::new("audio/opus", Duration::from_millis(500));
        f.add_downtrack(1, Rewriter::new(1, 0, 0));
        f.add_downtrack(1, Rewriter::new(2, 0, 0));
        assert_eq!(f.subscriber_count(), 1);
        assert!(f.remove_downtrack(1));
        assert!(!f.remove_downtrack(1));
        assert!(f.is_idle());
        f.add_relay(3);
        f.add_relay(3);
        assert_eq!(f.relays(), &[3]);
        assert!(!f.is_idle());
        f.remove_relay(3);
        assert!(f.is_idle());
    }

    #[test]
    fn padding_only_packets_are_removed_without_a_gap() {
        let mut f = TrackForwarder::new("audio/opus", Duration::from_millis(500));
        f.add_downtrack(1, Rewriter::new(1, 0, 0));
        let mut seqs = Vec::new();
        for (seq, payload) in [
            (1, &b"x"[..]),
            (2, b""),
            (3, b""),
            (4, b"y"),
            (6, b"z"),
            (7, b""),
            (8, b"v"),
            (5, b"w"),
        ] {
            seqs.extend(run(&mut f, pkt(seq, payload)).iter().map(|d| d.header.seq));
        }
        let base = 1 << 15;
        // 4 follows 1 directly; 6 after a loss keeps its gap; 8 follows 6 directly; 5 arrives
        // late and takes its own slot, not one shifted by the padding removed after it.
        assert_eq!(seqs, vec![base, base + 1, base + 3, base + 4, base + 2]);
    }
}
