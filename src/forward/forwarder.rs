//! The fan-out of one published track on one media worker.
//!
//! Every worker that has subscribers of a track holds a `TrackForwarder` for it. The one on the
//! publisher's worker is the *source*: it sees the packets first, removes padding, marks
//! keyframes, throttles keyframe requests to the publisher, and lists the other workers the
//! packet must be relayed to. A forwarder is owned by its worker's event loop, so nothing here
//! takes a lock; subscribers come and go by method calls between packets.

use std::time::{Duration, Instant};

use super::codec::VideoFormat;
use super::layer::{self, LayerState, LayerView, NOMINAL_AUDIO_BITRATE};
use super::padding::PaddingRemover;
use super::rewrite::Rewritten;
use super::{DownTrack, MediaPacket, Rewriter};

/// A layer switched back on counts as sent for this long before its first packets arrive: the
/// publisher hears of it over signaling and restarts that encoder (well under a second in
/// Chromium). Without it, layer choice turns away from the layer before it starts, and dynacast
/// switches it off again.
pub const RESUME_GRACE: Duration = Duration::from_secs(2);

/// One packet for one subscriber: the engine writes `packet.payload` with these header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<K> {
    pub to: K,
    pub header: Rewritten,
    pub marker: bool,
}

/// Another worker this track's packets are relayed to, and the layers its downtracks take
/// (bit i: layer i): only those cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Relay {
    worker: usize,
    layers: u32,
}

#[derive(Debug)]
pub struct TrackForwarder<K> {
    /// Video format whose keyframes are recognised (None: audio, or not recognised).
    format: Option<VideoFormat>,
    is_video: bool,
    downtracks: Vec<DownTrack<K>>,
    /// Other workers with subscribers of this track (source forwarder only).
    relays: Vec<Relay>,
    /// Simulcast layers, lowest first (one for a track sent as one stream).
    layers: Vec<LayerState>,
    /// Padding removal per layer: each layer has its own sequence space (source only).
    padding: Vec<PaddingRemover>,
    /// Layers the publisher was asked to switch off (dynacast; bit i: layer i). Layer choice
    /// counts them as sent: asking for one switches it back on.
    suspended: u32,
    /// When each layer was last switched back on: it counts as sent for [`RESUME_GRACE`]
    /// while the publisher's encoder starts, so layer choice does not turn away from it.
    resumed_at: Vec<Option<Instant>>,
    /// The last packet was RED (audio with redundancy, about twice the codec's rate).
    carries_red: bool,
    /// A relay-fed copy: the layers as the source forwarder sees them (it receives only the
    /// layers its downtracks take, so its own measurements would miss the others).
    source_views: Option<Vec<LayerView>>,
}

impl<K: Copy + Eq> TrackForwarder<K> {
    /// `mime` is the track's codec (`video/VP8`, `audio/opus`, ...); `layers` its number of
    /// simulcast layers (1 when sent as one stream).
    pub fn new(mime: &str, layers: u8, keyframe_interval: Duration) -> Self {
        let layers = usize::from(layers.max(1));
        TrackForwarder {
            format: VideoFormat::from_mime(mime),
            is_video: mime.len() >= 6 && mime[..6].eq_ignore_ascii_case("video/"),
            downtracks: Vec::new(),
            relays: Vec::new(),
            layers: vec![LayerState::new(keyframe_interval); layers],
            padding: (0..layers).map(|_| PaddingRemover::default()).collect(),
            suspended: 0,
            resumed_at: vec![None; layers],
            carries_red: false,
            source_views: None,
        }
    }

    pub fn layer_count(&self) -> u8 {
        self.layers.len() as u8
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

    /// The layers as layer choice sees them, lowest first.
    pub fn layer_views(&self, now: Instant) -> Vec<LayerView> {
        if let Some(views) = &self.source_views {
            return views.clone();
        }
        let mut views = layer::views(&self.layers, now);
        for (i, v) in views.iter_mut().enumerate() {
            let starting =
                self.resumed_at[i].is_some_and(|t| now.saturating_duration_since(t) < RESUME_GRACE);
            v.sending |= self.suspended & 1 << i != 0 || starting;
        }
        views
    }

    /// Bits per second a subscriber receives of this audio track: with RED as it comes, or
    /// about half when RED is cut to its primary block for it.
    pub fn audio_bitrate(&self, red_on: bool) -> u64 {
        let rate = match self.layers.first().map_or(0, LayerState::measured_bitrate) {
            0 => NOMINAL_AUDIO_BITRATE,
            measured => measured,
        };
        if self.carries_red && !red_on {
            rate / 2
        } else {
            rate
        }
    }

    /// Sends RED to a subscriber as RED, or as its primary block.
    pub fn set_red(&mut self, to: K, on: bool) {
        if let Some(d) = self.downtracks.iter_mut().find(|d| d.subscriber() == to) {
            d.set_red(on);
        }
    }

    /// The publisher was asked to switch these layers off (bit i: layer i), and the others on.
    pub fn set_suspended(&mut self, layers: u32, now: Instant) {
        for (i, resumed) in self.resumed_at.iter_mut().enumerate() {
            if self.suspended & !layers & 1 << i != 0 {
                *resumed = Some(now);
            }
        }
        self.suspended = layers;
    }

    /// Bits per second the track's layer `layer` carries (measured or nominal).
    pub fn layer_bitrate(&self, layer: u8, now: Instant) -> u64 {
        layer::view(&self.layers, usize::from(layer), now).map_or(0, |l| l.bitrate)
    }

    /// Which layers some local downtrack forwards, waits for, or would take if its downlink
    /// allowed (what its tile needs), as a bit set (bit i: layer i). A layer only held back by
    /// bandwidth stays on: downlinks recover faster than an encoder restarts.
    pub fn wanted_layers(&self) -> u32 {
        self.downtracks
            .iter()
            .flat_map(|d| [d.target(), d.current(), d.needed()])
            .flatten()
            .fold(0, |set, l| set | 1 << l)
    }

    /// Starts sending to a subscriber (its connection can decrypt: negotiation and DTLS are
    /// done), from `layer` on (None: paused). Video waits for a keyframe, which is asked for.
    pub fn add_downtrack(&mut self, to: K, rewriter: Rewriter, layer: Option<u8>) {
        self.downtracks.retain(|d| d.subscriber() != to);
        let layer = layer.map(|l| l.min(self.top_layer()));
        let downtrack = DownTrack::new(to, rewriter, layer, self.format.is_some());
        if let Some(l) = downtrack.awaited_keyframe() {
            self.request_keyframe(l);
        }
        self.downtracks.push(downtrack);
    }

    /// Stops sending to a subscriber; returns its rewriter if it was there.
    pub fn remove_downtrack(&mut self, to: K) -> Option<Rewriter> {
        let i = self.downtracks.iter().position(|d| d.subscriber() == to)?;
        Some(self.downtracks.remove(i).into_rewriter())
    }

    /// Moves a subscriber to another layer (None: pause). A switch waits for the layer's
    /// keyframe, which is asked for. True if the target changed.
    pub fn set_layer(&mut self, to: K, layer: Option<u8>) -> bool {
        let top = self.top_layer();
        let Some(d) = self.downtracks.iter_mut().find(|d| d.subscriber() == to) else {
            return false;
        };
        let layer = layer.map(|l| l.min(top));
        if d.target() == layer {
            return false;
        }
        d.set_target(layer);
        if let Some(l) = d.awaited_keyframe() {
            self.request_keyframe(l);
        }
        true
    }

    /// The highest layer a subscriber's tile needs (None: not shown), whatever its downlink.
    pub fn set_needed_layer(&mut self, to: K, needed: Option<u8>) {
        let top = self.top_layer();
        if let Some(d) = self.downtracks.iter_mut().find(|d| d.subscriber() == to) {
            d.set_needed(needed.map(|l| l.min(top)));
        }
    }

    /// The layer a subscriber is forwarded now (None: none yet, or paused).
    pub fn current_layer(&self, to: K) -> Option<u8> {
        self.downtracks
            .iter()
            .find(|d| d.subscriber() == to)
            .and_then(|d| d.current())
    }

    fn top_layer(&self) -> u8 {
        (self.layers.len() - 1) as u8
    }

    /// Another worker has subscribers of this track: it gets every layer until it says which
    /// its downtracks take.
    pub fn add_relay(&mut self, worker: usize) {
        if !self.relays.iter().any(|r| r.worker == worker) {
            self.relays.push(Relay {
                worker,
                layers: u32::MAX,
            });
        }
    }

    pub fn remove_relay(&mut self, worker: usize) {
        self.relays.retain(|r| r.worker != worker);
    }

    /// A relay-fed copy takes the layers as its source forwarder sees them.
    pub fn set_source_views(&mut self, views: &[LayerView]) {
        match &mut self.source_views {
            Some(mine) => {
                mine.clear();
                mine.extend_from_slice(views);
            }
            None => self.source_views = Some(views.to_vec()),
        }
    }

    /// A relay's downtracks take (forward, await, or need) these layers now.
    pub fn set_relay_layers(&mut self, worker: usize, layers: u32) {
        if let Some(r) = self.relays.iter_mut().find(|r| r.worker == worker) {
            r.layers = layers;
        }
    }

    /// A relay asked for keyframes of these layers: a downtrack there is about to switch to
    /// them, maybe before it has said it takes them.
    pub fn widen_relay(&mut self, worker: usize, layers: u32) {
        if let Some(r) = self.relays.iter_mut().find(|r| r.worker == worker) {
            r.layers |= layers;
        }
    }

    pub fn relay_count(&self) -> usize {
        self.relays.len()
    }

    /// The other workers this track's packets go to.
    pub fn relays(&self) -> impl Iterator<Item = usize> + '_ {
        self.relays.iter().map(|r| r.worker)
    }

    /// The other workers whose downtracks take `layer`.
    pub fn relays_taking(&self, layer: u8) -> impl Iterator<Item = usize> + '_ {
        self.relays
            .iter()
            .filter(move |r| r.layers & 1 << layer != 0)
            .map(|r| r.worker)
    }

    /// The layers any relay's downtracks take (bit i: layer i).
    pub fn relayed_layers(&self) -> u32 {
        self.relays.iter().fold(0, |set, r| set | r.layers)
    }

    /// Someone lost the picture of a layer (a subscriber's PLI/FIR, a new subscriber, a switch).
    pub fn request_keyframe(&mut self, layer: u8) {
        if self.is_video
            && let Some(l) = self.layers.get_mut(usize::from(layer))
        {
            l.keyframes.request();
        }
    }

    /// A subscriber lost the picture: asks for a keyframe of the layer it is forwarded.
    pub fn request_keyframe_for(&mut self, to: K) {
        let layer = self
            .downtracks
            .iter()
            .find(|d| d.subscriber() == to)
            .and_then(|d| d.current().or(d.target()));
        if let Some(l) = layer {
            self.request_keyframe(l);
        }
    }

    /// The layers whose keyframe requests go out now (throttled per layer), as a bit set.
    pub fn poll_keyframe_requests(&mut self, now: Instant) -> u32 {
        let mut due = 0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            if l.keyframes.poll(now) {
                due |= 1 << i;
            }
        }
        due
    }

    /// When a deferred keyframe request falls due, for the worker's timer.
    pub fn keyframe_request_due(&self, now: Instant) -> Option<Instant> {
        self.layers
            .iter()
            .filter_map(|l| l.keyframes.due(now))
            .min()
    }

    /// Source side: takes a packet from the publisher. Padding-only packets (bandwidth probes)
    /// carry nothing to forward: they return false and the sequence numbers after them close
    /// the gap (see [`PaddingRemover`]). So do packets of a layer the track does not have.
    /// Otherwise the packet's keyframe flag and VP8 picture ids are set and it is ready to be
    /// forwarded here and relayed.
    pub fn ingest(&mut self, packet: &mut MediaPacket) -> bool {
        let Some(padding) = self.padding.get_mut(usize::from(packet.layer)) else {
            return false;
        };
        let Some(seq) = padding.map(packet.seq, packet.payload.is_empty()) else {
            return false;
        };
        packet.seq = seq;
        if let Some(f) = self.format {
            packet.keyframe = f.starts_keyframe(&packet.payload);
            packet.vp8 = f.vp8_ids(&packet.payload);
        }
        true
    }

    /// Rewrites a packet for every local subscriber of its layer into `out` (cleared first).
    /// Subscribers waiting for a keyframe keep the request for it alive.
    pub fn forward(&mut self, packet: &MediaPacket, out: &mut Vec<Delivery<K>>) {
        out.clear();
        let Some(layer) = self.layers.get_mut(usize::from(packet.layer)) else {
            return;
        };
        let size = match self.format {
            Some(f) if packet.keyframe => f.keyframe_size(&packet.payload),
            _ => None,
        };
        layer.observe(packet.payload.len(), size, packet.received_at);
        self.carries_red = packet.red;
        let mut waiting = 0u32;
        for downtrack in &mut self.downtracks {
            if let Some(header) = downtrack.rewrite(packet) {
                out.push(Delivery {
                    to: downtrack.subscriber(),
                    header,
                    marker: packet.marker,
                });
            }
            if let Some(l) = downtrack.awaited_keyframe() {
                waiting |= 1 << l;
            }
        }
        // Throttled: re-asks every interval until the keyframe arrives (a request may be lost).
        for l in 0..self.layers.len() {
            if waiting & 1 << l != 0 {
                self.request_keyframe(l as u8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::KeyframeThrottle;
    use std::sync::Arc;

    const VP8_KEY: &[u8] = &[0x10, 0x50, 0xaa];
    const VP8_DELTA: &[u8] = &[0x10, 0x51, 0xaa];
    const INTERVAL: Duration = KeyframeThrottle::DEFAULT_INTERVAL;

    fn pkt(seq: u64, payload: &[u8]) -> MediaPacket {
        layer_pkt(0, seq, payload)
    }

    fn layer_pkt(layer: u8, seq: u64, payload: &[u8]) -> MediaPacket {
        MediaPacket::received(
            seq,
            seq as u32 * 3000,
            false,
            layer,
            Arc::from(payload),
            Instant::now(),
        )
    }

    fn rw(pt: u8) -> Rewriter {
        Rewriter::new(pt, 90_000, 0, 0)
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
        let mut f = TrackForwarder::new("audio/opus", 1, INTERVAL);
        f.add_downtrack(1, Rewriter::new(111, 48_000, 0, 0), Some(0));
        f.add_downtrack(2, Rewriter::new(109, 48_000, 0, 0), Some(0));
        let out = run(&mut f, pkt(10, b"x"));
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].to, out[0].header.payload_type), (1, 111));
        assert_eq!((out[1].to, out[1].header.payload_type), (2, 109));
    }

    #[test]
    fn video_subscriber_starts_on_a_keyframe_and_asks_for_one() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::new("video/VP8", 1, Duration::from_millis(500));
        f.add_downtrack(1, rw(96), Some(0));
        assert_eq!(
            f.poll_keyframe_requests(t0),
            1,
            "a new video subscriber asks"
        );
        assert!(run(&mut f, pkt(1, VP8_DELTA)).is_empty(), "held back");
        assert_eq!(f.poll_keyframe_requests(t0), 0, "throttled");
        assert_eq!(
            f.poll_keyframe_requests(t0 + Duration::from_millis(600)),
            1,
            "asked again"
        );
        let out = run(&mut f, pkt(2, VP8_KEY));
        assert_eq!(out.len(), 1);
        assert_eq!(run(&mut f, pkt(3, VP8_DELTA)).len(), 1, "then everything");
        assert_eq!(f.poll_keyframe_requests(t0 + Duration::from_secs(5)), 0);
        // Audio never waits and never asks.
        let mut a = TrackForwarder::new("audio/opus", 1, Duration::from_millis(500));
        a.add_downtrack(1, rw(111), Some(0));
        a.request_keyframe(0);
        assert_eq!(a.poll_keyframe_requests(t0), 0);
        assert_eq!(run(&mut a, pkt(1, b"x")).len(), 1);
    }

    #[test]
    fn audio_counts_its_nominal_rate_until_measured() {
        let t0 = Instant::now();
        let mut a: TrackForwarder<u32> = TrackForwarder::new("audio/opus", 1, INTERVAL);
        assert_eq!(a.audio_bitrate(true), NOMINAL_AUDIO_BITRATE);
        // 50 packets of 100 bytes a second: 40 kbit/s once a window is complete.
        for i in 0..40u64 {
            let p = MediaPacket::received(
                i,
                i as u32 * 960,
                false,
                0,
                Arc::from(&[0u8; 100][..]),
                t0 + Duration::from_millis(20 * i),
            );
            run(&mut a, p);
        }
        assert_eq!(a.audio_bitrate(true), 40_000);
    }

    #[test]
    fn unrecognised_video_is_not_held_back() {
        let mut f = TrackForwarder::new("video/H265", 1, INTERVAL);
        f.add_downtrack(1, rw(96), Some(0));
        assert_eq!(run(&mut f, pkt(1, b"x")).len(), 1);
    }

    #[test]
    fn remove_and_readd_replaces() {
        let mut f = TrackForwarder::new("audio/opus", 1, INTERVAL);
        f.add_downtrack(1, rw(1), Some(0));
        f.add_downtrack(1, rw(2), Some(0));
        assert_eq!(f.subscriber_count(), 1);
        assert!(f.remove_downtrack(1).is_some());
        assert!(f.remove_downtrack(1).is_none());
        assert!(f.is_idle());
        f.add_relay(3);
        f.add_relay(3);
        assert_eq!(f.relays().collect::<Vec<_>>(), [3]);
        assert!(!f.is_idle());
        f.remove_relay(3);
        assert!(f.is_idle());
    }

    #[test]
    fn relays_get_the_layers_their_downtracks_take() {
        let mut f = TrackForwarder::<u32>::new("video/VP8", 3, INTERVAL);
        f.add_relay(1);
        f.add_relay(2);
        let taking = |f: &TrackForwarder<u32>, layer| f.relays_taking(layer).collect::<Vec<_>>();
        assert_eq!(taking(&f, 2), [1, 2], "every layer until a relay says");
        f.set_relay_layers(1, 0b001);
        f.set_relay_layers(2, 0b010);
        assert_eq!(taking(&f, 0), [1]);
        assert_eq!(taking(&f, 1), [2]);
        assert!(taking(&f, 2).is_empty(), "nobody takes the top layer");
        assert_eq!(f.relayed_layers(), 0b011);
        // A keyframe request for the top layer: about to switch, it gets it at once.
        f.widen_relay(1, 0b100);
        assert_eq!(taking(&f, 2), [1]);
        f.set_relay_layers(1, 0);
        assert!(taking(&f, 0).is_empty() && taking(&f, 2).is_empty());
        assert_eq!(f.relays().collect::<Vec<_>>(), [1, 2], "still attached");
    }

    #[test]
    fn padding_only_packets_are_removed_without_a_gap() {
        let mut f = TrackForwarder::new("audio/opus", 1, INTERVAL);
        f.add_downtrack(1, rw(1), Some(0));
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

    /// A VP8 packet with a 15-bit picture id; `key` sets the keyframe tag.
    fn vp8(layer: u8, seq: u64, picture_id: u16, key: bool) -> MediaPacket {
        let [hi, lo] = picture_id.to_be_bytes();
        let tag = if key { 0x50 } else { 0x51 };
        layer_pkt(layer, seq, &[0x90, 0x80, 0x80 | hi, lo, tag, 0xaa])
    }

    #[test]
    fn simulcast_layers_switch_on_keyframes_with_continuous_numbering() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::new("video/VP8", 3, INTERVAL);
        f.add_downtrack(1, rw(96), Some(0));
        f.add_downtrack(2, rw(96), Some(2));
        assert_eq!(
            f.poll_keyframe_requests(t0),
            0b101,
            "each starting layer is asked"
        );
        let mut got: Vec<(u32, u64, u16)> = Vec::new();
        let mut feed = |f: &mut TrackForwarder<u32>, p: MediaPacket| {
            for d in run(f, p) {
                let pid = d.header.vp8.and_then(|v| v.picture_id).unwrap();
                got.push((d.to, d.header.seq - (1 << 15), pid));
            }
        };
        // Each layer has its own sequence and picture numbering.
        feed(&mut f, vp8(0, 100, 10, true));
        feed(&mut f, vp8(2, 9000, 7000, true));
        feed(&mut f, vp8(1, 5000, 300, false));
        feed(&mut f, vp8(0, 101, 11, false));
        feed(&mut f, vp8(2, 9001, 7001, false));
        // Subscriber 1 moves up to layer 1, subscriber 2 down to layer 1.
        assert!(f.set_layer(1, Some(1)));
        assert!(f.set_layer(2, Some(1)));
        assert!(!f.set_layer(2, Some(1)), "no change");
        assert_eq!(
            f.wanted_layers(),
            0b111,
            "the old layers flow until the switch"
        );
        feed(&mut f, vp8(1, 5001, 301, false)); // not a keyframe: both stay
        feed(&mut f, vp8(0, 102, 12, false));
        feed(&mut f, vp8(2, 9002, 7002, false));
        feed(&mut f, vp8(1, 5002, 302, true)); // both switch
        feed(&mut f, vp8(0, 103, 13, false)); // gone
        feed(&mut f, vp8(1, 5004, 304, false)); // 5003 lost: the gap stays
        assert_eq!(f.wanted_layers(), 0b010);
        let of = |to: u32| -> Vec<(u64, u16)> {
            got.iter()
                .filter(|g| g.0 == to)
                .map(|g| (g.1, g.2))
                .collect()
        };
        assert_eq!(of(1), vec![(0, 10), (1, 11), (2, 12), (3, 13), (5, 15)]);
        assert_eq!(
            of(2),
            vec![(0, 7000), (1, 7001), (2, 7002), (3, 7003), (5, 7005)]
        );
        assert_eq!(f.current_layer(1), Some(1));
    }

    #[test]
    fn a_keyframe_request_goes_to_the_subscribers_layer() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::new("video/VP8", 3, INTERVAL);
        f.add_downtrack(1, rw(96), Some(1));
        f.poll_keyframe_requests(t0);
        run(&mut f, vp8(1, 1, 1, true));
        f.request_keyframe_for(1);
        assert_eq!(f.poll_keyframe_requests(t0 + INTERVAL), 0b010);
        // Layers the track does not have are dropped.
        assert!(run(&mut f, vp8(5, 1, 1, true)).is_empty());
    }

    #[test]
    fn a_layer_switched_back_on_counts_as_sent_while_its_encoder_starts() {
        let t0 = Instant::now();
        let mut f = TrackForwarder::<u32>::new("video/VP8", 3, INTERVAL);
        let sending = |f: &TrackForwarder<u32>, at| -> Vec<bool> {
            f.layer_views(at).iter().map(|v| v.sending).collect()
        };
        assert_eq!(sending(&f, t0), [false; 3], "nothing received yet");
        f.set_suspended(0b100, t0);
        assert_eq!(
            sending(&f, t0),
            [false, false, true],
            "off counts as available"
        );
        let on = t0 + Duration::from_secs(10);
        f.set_suspended(0, on);
        assert_eq!(sending(&f, on + RESUME_GRACE / 2), [false, false, true]);
        assert_eq!(
            sending(&f, on + RESUME_GRACE),
            [false; 3],
            "it never started"
        );
    }

    #[test]
    fn a_layer_held_back_by_bandwidth_stays_wanted() {
        let mut f = TrackForwarder::new("video/VP8", 3, INTERVAL);
        f.add_downtrack(1, rw(96), Some(0));
        assert_eq!(f.wanted_layers(), 0b001);
        // Its tile needs the top layer; its downlink takes the lowest.
        f.set_needed_layer(1, Some(2));
        assert_eq!(f.wanted_layers(), 0b101);
        // The tile shrinks: only what is forwarded.
        f.set_needed_layer(1, Some(0));
        assert_eq!(f.wanted_layers(), 0b001);
        f.remove_downtrack(1);
        assert_eq!(f.wanted_layers(), 0);
    }
}
