//! The fan-out of one published track to its subscribers.
//!
//! A `TrackForwarder` is owned by the one task that reads the published track, so the packet
//! path takes no lock: membership changes arrive as [`ForwarderCommand`]s on a channel that the
//! same task drains between packets.

use std::time::{Duration, Instant};

use super::{DownTrack, KeyframeThrottle, MediaPacket, PushOutcome};
use crate::types::{MediaKind, ParticipantId};

/// Changes to a forwarder, sent by the room and by subscribers.
#[derive(Debug)]
pub enum ForwarderCommand {
    /// Start sending to a subscriber (its negotiation is done). Video asks for a keyframe.
    AddDownTrack(DownTrack),
    /// Stop sending to a subscriber.
    RemoveDownTrack(ParticipantId),
    /// A subscriber lost the picture (PLI/FIR) and wants a keyframe.
    RequestKeyframe,
}

/// Tally of one forwarded packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOutcome {
    pub queued: u32,
    pub dropped: u32,
}

#[derive(Debug)]
pub struct TrackForwarder {
    kind: MediaKind,
    downtracks: Vec<DownTrack>,
    keyframes: KeyframeThrottle,
    /// Padding-only packets removed so far: later sequence numbers close the gap.
    seq_skipped: u16,
    last_seq: Option<u16>,
}

impl TrackForwarder {
    pub fn new(kind: MediaKind, keyframe_interval: Duration) -> Self {
        TrackForwarder {
            kind,
            downtracks: Vec::new(),
            keyframes: KeyframeThrottle::new(keyframe_interval),
            seq_skipped: 0,
            last_seq: None,
        }
    }

    pub fn kind(&self) -> MediaKind {
        self.kind
    }

    pub fn subscriber_count(&self) -> usize {
        self.downtracks.len()
    }

    pub fn handle(&mut self, command: ForwarderCommand) {
        match command {
            ForwarderCommand::AddDownTrack(downtrack) => {
                self.downtracks
                    .retain(|d| d.subscriber() != downtrack.subscriber());
                self.downtracks.push(downtrack);
                self.request_keyframe();
            }
            ForwarderCommand::RemoveDownTrack(subscriber) => {
                self.downtracks.retain(|d| *d.subscriber() != subscriber);
            }
            ForwarderCommand::RequestKeyframe => self.request_keyframe(),
        }
    }

    fn request_keyframe(&mut self) {
        if self.kind == MediaKind::Video {
            self.keyframes.request();
        }
    }

    /// Cheap check for the packet loop: is any keyframe request waiting?
    pub fn wants_keyframe(&self) -> bool {
        self.keyframes.is_pending()
    }

    /// Whether to send the publisher a keyframe request now (throttled).
    pub fn poll_keyframe_request(&mut self, now: Instant) -> bool {
        self.keyframes.poll(now)
    }

    /// Sends one incoming packet to every subscriber's queue. Padding-only packets (bandwidth
    /// probes) carry nothing to forward and are removed; the sequence numbers after them are
    /// shifted so subscribers see no gap and ask for no retransmission.
    pub fn forward(&mut self, mut packet: MediaPacket) -> ForwardOutcome {
        let in_order = self
            .last_seq
            .is_none_or(|last| packet.sequence.wrapping_sub(last) == 1);
        if in_order {
            self.last_seq = Some(packet.sequence);
        }
        if packet.payload.is_empty() {
            if in_order {
                self.seq_skipped = self.seq_skipped.wrapping_add(1);
            }
            return ForwardOutcome::default();
        }
        packet.sequence = packet.sequence.wrapping_sub(self.seq_skipped);

        let mut outcome = ForwardOutcome::default();
        let mut closed = false;
        for downtrack in &mut self.downtracks {
            match downtrack.push(&packet) {
                PushOutcome::Queued => outcome.queued += 1,
                PushOutcome::Dropped => outcome.dropped += 1,
                PushOutcome::Closed => closed = true,
            }
        }
        if closed {
            self.downtracks.retain(|d| !d.is_closed());
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{DownTrackReceiver, Rewriter};
    use bytes::Bytes;

    fn pkt(seq: u16, payload: &'static [u8]) -> MediaPacket {
        MediaPacket {
            marker: false,
            payload_type: 96,
            sequence: seq,
            timestamp: u32::from(seq) * 3000,
            ssrc: 42,
            payload: Bytes::from_static(payload),
        }
    }

    fn subscriber(name: &str, ssrc: u32, queue: usize) -> (DownTrack, DownTrackReceiver) {
        DownTrack::new(
            ParticipantId::from(name),
            Rewriter::new(ssrc, 100, 0, 0),
            queue,
        )
    }

    fn drain(rx: &mut DownTrackReceiver) -> Vec<MediaPacket> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(p);
        }
        out
    }

    #[test]
    fn fans_out_with_per_subscriber_rewrite() {
        let mut f = TrackForwarder::new(MediaKind::Video, Duration::from_millis(500));
        let (a, mut rx_a) = subscriber("a", 1, 16);
        let (b, mut rx_b) = subscriber("b", 2, 16);
        f.handle(ForwarderCommand::AddDownTrack(a));
        f.handle(ForwarderCommand::AddDownTrack(b));
        let out = f.forward(pkt(10, b"x"));
        assert_eq!(
            out,
            ForwardOutcome {
                queued: 2,
                dropped: 0
            }
        );
        let a = drain(&mut rx_a);
        let b = drain(&mut rx_b);
        assert_eq!((a[0].ssrc, a[0].payload_type), (1, 100));
        assert_eq!(b[0].ssrc, 2);
        assert_eq!(a[0].payload, b[0].payload);
    }

    #[test]
    fn slow_subscriber_drops_without_blocking_others() {
        let mut f = TrackForwarder::new(MediaKind::Audio, Duration::from_millis(500));
        let (slow, _rx_slow) = subscriber("slow", 1, 2);
        let (fast, mut rx_fast) = subscriber("fast", 2, 64);
        f.handle(ForwarderCommand::AddDownTrack(slow));
        f.handle(ForwarderCommand::AddDownTrack(fast));
        let mut dropped = 0;
        for seq in 0..10 {
            dropped += f.forward(pkt(seq, b"x")).dropped;
        }
        assert_eq!(dropped, 8, "the slow queue holds 2 of 10");
        assert_eq!(drain(&mut rx_fast).len(), 10, "the fast one got everything");
    }

    #[test]
    fn closed_subscriber_is_removed() {
        let mut f = TrackForwarder::new(MediaKind::Audio, Duration::from_millis(500));
        let (gone, rx_gone) = subscriber("gone", 1, 4);
        f.handle(ForwarderCommand::AddDownTrack(gone));
        drop(rx_gone);
        f.forward(pkt(1, b"x"));
        assert_eq!(f.subscriber_count(), 0);
    }

    #[test]
    fn remove_and_readd_replaces() {
        let mut f = TrackForwarder::new(MediaKind::Audio, Duration::from_millis(500));
        let (a1, _r1) = subscriber("a", 1, 4);
        let (a2, _r2) = subscriber("a", 2, 4);
        f.handle(ForwarderCommand::AddDownTrack(a1));
        f.handle(ForwarderCommand::AddDownTrack(a2));
        assert_eq!(f.subscriber_count(), 1);
        f.handle(ForwarderCommand::RemoveDownTrack(ParticipantId::from("a")));
        assert_eq!(f.subscriber_count(), 0);
    }

    #[test]
    fn padding_only_packets_are_removed_without_a_gap() {
        let mut f = TrackForwarder::new(MediaKind::Video, Duration::from_millis(500));
        let (a, mut rx) = subscriber("a", 1, 16);
        f.handle(ForwarderCommand::AddDownTrack(a));
        f.forward(pkt(1, b"x"));
        f.forward(pkt(2, b""));
        f.forward(pkt(3, b""));
        f.forward(pkt(4, b"y"));
        let seqs: Vec<u16> = drain(&mut rx).iter().map(|p| p.sequence).collect();
        assert_eq!(seqs, vec![0, 1]);
    }

    #[test]
    fn new_video_subscriber_asks_for_one_keyframe() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::new(MediaKind::Video, Duration::from_millis(500));
        assert!(!f.poll_keyframe_request(t0));
        let (a, _ra) = subscriber("a", 1, 4);
        let (b, _rb) = subscriber("b", 2, 4);
        f.handle(ForwarderCommand::AddDownTrack(a));
        f.handle(ForwarderCommand::AddDownTrack(b));
        assert!(f.poll_keyframe_request(t0));
        assert!(!f.poll_keyframe_request(t0));
        f.handle(ForwarderCommand::RequestKeyframe);
        assert!(!f.poll_keyframe_request(t0 + Duration::from_millis(100)));
        assert!(f.poll_keyframe_request(t0 + Duration::from_millis(600)));
        // Audio never asks.
        let mut audio = TrackForwarder::new(MediaKind::Audio, Duration::from_millis(500));
        audio.handle(ForwarderCommand::RequestKeyframe);
        assert!(!audio.poll_keyframe_request(t0));
    }
}
