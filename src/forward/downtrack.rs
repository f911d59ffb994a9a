//! One published track as one subscriber receives it: the layer it forwards, the layer it
//! wants, and its rewrite state. A switch (up, down, or resuming after a pause) happens on a
//! keyframe of the wanted layer; until then the current layer keeps flowing, so the picture
//! never stops for a switch.

use super::{MediaPacket, Rewriter, rewrite::Rewritten};

#[derive(Debug)]
pub struct DownTrack<K> {
    subscriber: K,
    rewriter: Rewriter,
    /// The layer forwarded now (None: not started yet, or paused).
    current: Option<u8>,
    /// The layer wanted (None: paused).
    target: Option<u8>,
    /// A switch waits for a keyframe (video whose keyframes are recognised).
    switch_on_keyframe: bool,
    /// The highest layer the subscriber's tile needs, even while its downlink keeps it lower
    /// (None: not shown, or not known yet): dynacast keeps that layer on at the publisher.
    needed: Option<u8>,
}

impl<K: Copy + Eq> DownTrack<K> {
    /// Its rewriter, for a downtrack that takes over the same send stream (WHEP: another
    /// source on the same m-line) to continue its sequence numbers and timestamps.
    pub fn into_rewriter(self) -> Rewriter {
        self.rewriter
    }

    /// A downtrack for `subscriber` (the engine's key for the subscriber's track), starting on
    /// `target`.
    pub fn new(subscriber: K, rewriter: Rewriter, target: Option<u8>, video: bool) -> Self {
        DownTrack {
            subscriber,
            rewriter,
            current: None,
            target,
            switch_on_keyframe: video,
            needed: None,
        }
    }

    pub fn needed(&self) -> Option<u8> {
        self.needed
    }

    pub fn set_needed(&mut self, needed: Option<u8>) {
        self.needed = needed;
    }

    pub fn subscriber(&self) -> K {
        self.subscriber
    }

    pub fn current(&self) -> Option<u8> {
        self.current
    }

    pub fn target(&self) -> Option<u8> {
        self.target
    }

    /// The layer whose keyframe this downtrack waits for, if any.
    pub fn awaited_keyframe(&self) -> Option<u8> {
        match self.target {
            Some(t) if self.current != Some(t) && self.switch_on_keyframe => Some(t),
            _ => None,
        }
    }

    /// Whether RED audio goes to it as RED or as its primary block.
    pub fn set_red(&mut self, on: bool) {
        self.rewriter.set_red(on);
    }

    /// Asks for another layer (None pauses at once; a layer starts on its next keyframe).
    pub fn set_target(&mut self, target: Option<u8>) {
        self.target = target;
        if target.is_none() {
            self.current = None;
        }
    }

    /// The packet's header for this subscriber, or None when it is not sent: another layer, a
    /// paused track, a packet older than the last switch.
    pub fn rewrite(&mut self, packet: &MediaPacket) -> Option<Rewritten> {
        if self.target == Some(packet.layer)
            && self.current != self.target
            && (packet.keyframe || !self.switch_on_keyframe)
        {
            self.current = self.target;
            self.rewriter.splice();
        }
        if self.current != Some(packet.layer) {
            return None;
        }
        self.rewriter.rewrite(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn pkt(layer: u8, seq: u64, keyframe: bool) -> MediaPacket {
        let mut p =
            MediaPacket::received(seq, 0, false, layer, Arc::from(&b"x"[..]), Instant::now());
        p.keyframe = keyframe;
        p
    }

    fn seqs(d: &mut DownTrack<u32>, packets: &[MediaPacket]) -> Vec<Option<u64>> {
        let base = 1 << 15;
        packets
            .iter()
            .map(|p| d.rewrite(p).map(|h| h.seq - base))
            .collect()
    }

    #[test]
    fn switches_on_the_target_layers_keyframe_and_keeps_the_old_layer_until_then() {
        let mut d = DownTrack::new(1, Rewriter::new(96, 90_000, 0, 0), Some(0), true);
        assert_eq!(d.awaited_keyframe(), Some(0));
        let out = seqs(
            &mut d,
            &[pkt(0, 10, false), pkt(0, 11, true), pkt(0, 12, false)],
        );
        assert_eq!(out, vec![None, Some(0), Some(1)], "starts on a keyframe");
        d.set_target(Some(2));
        assert_eq!(d.awaited_keyframe(), Some(2));
        let out = seqs(
            &mut d,
            &[
                pkt(2, 500, false), // not a keyframe: layer 0 goes on
                pkt(0, 13, false),
                pkt(2, 501, true), // the switch
                pkt(0, 14, false), // the old layer stops
                pkt(2, 502, false),
            ],
        );
        assert_eq!(out, vec![None, Some(2), Some(3), None, Some(4)]);
        assert_eq!((d.current(), d.awaited_keyframe()), (Some(2), None));
    }

    #[test]
    fn pausing_stops_at_once_and_resuming_waits_for_a_keyframe() {
        let mut d = DownTrack::new(1, Rewriter::new(96, 90_000, 0, 0), Some(1), true);
        seqs(&mut d, &[pkt(1, 1, true)]);
        d.set_target(None);
        assert_eq!(d.awaited_keyframe(), None);
        assert_eq!(
            seqs(&mut d, &[pkt(1, 2, false), pkt(1, 3, true)]),
            vec![None, None]
        );
        d.set_target(Some(1));
        let out = seqs(
            &mut d,
            &[pkt(1, 4, false), pkt(1, 5, true), pkt(1, 6, false)],
        );
        assert_eq!(out, vec![None, Some(1), Some(2)], "continues without a gap");
    }

    #[test]
    fn audio_switches_at_once() {
        let mut d = DownTrack::new(1, Rewriter::new(111, 48_000, 0, 0), Some(0), false);
        assert_eq!(d.awaited_keyframe(), None);
        assert_eq!(seqs(&mut d, &[pkt(0, 7, false)]), vec![Some(0)]);
    }
}
