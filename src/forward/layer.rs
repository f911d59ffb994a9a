//! What a forwarder knows of each simulcast layer of its track: whether the publisher sends it,
//! at what bitrate, at what picture size, and the keyframe requests waiting for it. Layer 0 is
//! the lowest resolution; a track sent as one stream has one layer.

use std::time::{Duration, Instant};

use super::KeyframeThrottle;

/// A layer that sent nothing for this long is taken as not sent (the publisher's encoder
/// dropped it, or it was switched off).
pub const LAYER_SILENCE: Duration = Duration::from_millis(1500);
/// Bitrates are measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(500);
/// A layer's peak rate is the highest of this many recent windows (5 s): an encoder's rate
/// swings with the picture, and a layer is raised to only if its peaks fit.
const PEAK_WINDOWS: usize = 10;
/// Bitrates assumed for a layer not measured yet, from the lowest to the highest of three
/// (the browser client's ladder; a track with fewer layers takes the top ones).
pub const NOMINAL_BITRATES: [u64; 3] = [100_000, 500_000, 1_700_000];
/// Bits per second assumed for an audio track not measured yet: Opus voice with its RED
/// redundancy and headers, rounded up.
pub const NOMINAL_AUDIO_BITRATE: u64 = 64_000;
/// Picture heights assumed for a layer whose keyframes do not say (codecs other than VP8).
const NOMINAL_HEIGHTS: [u16; 3] = [180, 360, 720];

#[derive(Debug, Clone)]
pub struct LayerState {
    pub keyframes: KeyframeThrottle,
    last_packet: Option<Instant>,
    /// Picture size from the layer's last keyframe, where the codec says it.
    size: Option<(u16, u16)>,
    window_start: Option<Instant>,
    window_bytes: u64,
    /// Bits per second over the last complete window.
    bitrate: u64,
    /// Bits per second of the last complete windows, the newest at `recent_next - 1`.
    recent: [u64; PEAK_WINDOWS],
    recent_next: usize,
}

impl LayerState {
    /// Bits per second over the last complete window; 0 until one is complete.
    pub fn measured_bitrate(&self) -> u64 {
        self.bitrate
    }

    pub fn new(keyframe_interval: Duration) -> Self {
        LayerState {
            keyframes: KeyframeThrottle::new(keyframe_interval),
            last_packet: None,
            size: None,
            window_start: None,
            window_bytes: 0,
            bitrate: 0,
            recent: [0; PEAK_WINDOWS],
            recent_next: 0,
        }
    }

    /// Accounts one packet of this layer.
    pub fn observe(&mut self, bytes: usize, size: Option<(u16, u16)>, now: Instant) {
        self.last_packet = Some(now);
        if size.is_some() {
            self.size = size;
        }
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            self.bitrate = self.window_bytes * 8 * 1000 / elapsed.as_millis().max(1) as u64;
            self.recent[self.recent_next] = self.bitrate;
            self.recent_next = (self.recent_next + 1) % PEAK_WINDOWS;
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
        self.window_bytes += bytes as u64;
    }

    pub fn is_sending(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_SILENCE)
    }
}

/// One layer as layer choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerView {
    /// The publisher sends it.
    pub sending: bool,
    /// Bits per second: measured, or nominal until measured.
    pub bitrate: u64,
    /// The highest of the last seconds' rates (nominal until measured): what raising to this
    /// layer must make room for.
    pub peak: u64,
    pub width: u16,
    pub height: u16,
}

/// The layers of a track as layer choice sees them, lowest first.
pub fn views(layers: &[LayerState], now: Instant) -> Vec<LayerView> {
    (0..layers.len())
        .filter_map(|i| view(layers, i, now))
        .collect()
}

/// Layer `i` of a track as layer choice sees it (a track with n layers takes the top n rungs
/// of the nominal ladder).
pub fn view(layers: &[LayerState], i: usize, now: Instant) -> Option<LayerView> {
    let skip = NOMINAL_BITRATES.len() - layers.len().min(NOMINAL_BITRATES.len());
    layers.get(i).map(|l| {
        let nominal = (i + skip).min(NOMINAL_BITRATES.len() - 1);
        let (width, height) = l.size.unwrap_or_else(|| {
            let h = NOMINAL_HEIGHTS[nominal];
            (h / 9 * 16, h)
        });
        let measured = l.bitrate > 0;
        let bitrate = if measured {
            l.bitrate
        } else {
            NOMINAL_BITRATES[nominal]
        };
        LayerView {
            sending: l.is_sending(now),
            bitrate,
            peak: l.recent.iter().copied().max().unwrap_or(0).max(bitrate),
            width,
            height,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_bitrate_and_silence() {
        let t0 = Instant::now();
        let mut l = LayerState::new(KeyframeThrottle::DEFAULT_INTERVAL);
        assert!(!l.is_sending(t0));
        // 100 packets of 1000 bytes over 500 ms: 1.6 Mbit/s.
        for i in 0..=100 {
            l.observe(1000, None, t0 + Duration::from_millis(5 * i));
        }
        let v = views(std::slice::from_ref(&l), t0 + Duration::from_millis(500));
        assert_eq!(v[0].bitrate, 1_600_000);
        // A quieter window: the rate follows, the peak remembers.
        for i in 101..=200 {
            l.observe(500, None, t0 + Duration::from_millis(5 * i));
        }
        let v = views(std::slice::from_ref(&l), t0 + Duration::from_secs(1));
        assert_eq!((v[0].bitrate, v[0].peak), (808_000, 1_600_000));
        assert!(v[0].sending);
        assert!(!l.is_sending(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn nominal_figures_until_measured() {
        let t0 = Instant::now();
        let mut layers = vec![LayerState::new(KeyframeThrottle::DEFAULT_INTERVAL); 2];
        layers[1].observe(10, Some((1280, 720)), t0);
        let v = views(&layers, t0);
        // Two layers take the top two rungs of the ladder.
        assert_eq!((v[0].bitrate, v[0].width, v[0].height), (500_000, 640, 360));
        assert_eq!(
            (v[1].bitrate, v[1].width, v[1].height),
            (1_700_000, 1280, 720)
        );
        assert!(!v[0].sending && v[1].sending);
    }
}
