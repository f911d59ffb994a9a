//! Layer choice: which layer of each video track a subscriber gets, from its downlink estimate,
//! the size it shows each track at, and what the publishers send.
//!
//! The subscriber's budget goes to audio first (never paused), then every visible video gets
//! its lowest layer in priority order (screen shares and active speakers first; a video that
//! does not fit is paused for bandwidth), then the leftover raises layers in the same order, each
//! track up to the layer its tile needs. Hysteresis: a layer above the one forwarded now must
//! fit with [`UP_HEADROOM`] at its peak rate of the last seconds (an encoder's rate swings
//! with the picture), a track that was lowered for bandwidth is not raised again
//! for [`UP_HOLD`], and a video already flowing is paused only when even its lowest layer has
//! not fitted for [`PAUSE_AFTER`], so a wobbling estimate does not flap the picture.

use std::time::{Duration, Instant};

use super::layer::LayerView;

/// A layer above the current one must fit this many times its bitrate.
pub const UP_HEADROOM: f64 = 1.25;
/// After a downgrade for bandwidth, no upgrade for this long.
pub const UP_HOLD: Duration = Duration::from_secs(4);
/// A flowing video's lowest layer must have not fitted for this long before it is paused.
pub const PAUSE_AFTER: Duration = Duration::from_secs(4);
/// A layer serves a tile when it is at least this share of the tile's size.
const SIZE_TOLERANCE: f64 = 0.75;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Normal,
    /// Screen shares and active speakers.
    High,
}

/// How the subscriber shows a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// No report: the largest layer.
    #[default]
    Unknown,
    /// Shown in a tile of this many CSS pixels (times the device pixel ratio).
    Tile { width: u32, height: u32 },
    /// Not shown (scrolled away, hidden tab, minimised): nothing is sent.
    Hidden,
}

/// Why a video a subscriber wants is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// Its lowest layer does not fit the subscriber's downlink.
    Bandwidth,
    /// The subscriber does not show it.
    Hidden,
}

/// The layer-choice state of one video downtrack.
#[derive(Debug, Clone, Default)]
pub struct LayerChoice {
    pub visibility: Visibility,
    /// The layer chosen last (None: paused).
    pub layer: Option<u8>,
    /// The highest layer the tile needs, whatever the budget (None: hidden).
    pub needed: Option<u8>,
    /// Paused because the budget has no room for its lowest layer.
    pub paused_for_bandwidth: bool,
    /// When it was last lowered for bandwidth.
    lowered_at: Option<Instant>,
    /// Since when its lowest layer has not fitted while it was flowing.
    short_since: Option<Instant>,
}

impl LayerChoice {
    /// Why nothing is forwarded, if nothing is.
    pub fn paused(&self) -> Option<PauseCause> {
        if self.visibility == Visibility::Hidden {
            Some(PauseCause::Hidden)
        } else if self.paused_for_bandwidth {
            Some(PauseCause::Bandwidth)
        } else {
            None
        }
    }
}

/// One video downtrack in a subscriber's allocation.
pub struct Demand<'a> {
    pub layers: &'a [LayerView],
    pub priority: Priority,
    pub choice: &'a mut LayerChoice,
}

/// The highest layer a tile needs: the smallest that covers it, or the top one.
fn layer_for_size(layers: &[LayerView], visibility: Visibility) -> Option<u8> {
    let top = layers.len().checked_sub(1)? as u8;
    match visibility {
        Visibility::Unknown => Some(top),
        Visibility::Hidden => None,
        Visibility::Tile { width, height } => {
            let covers = |l: &LayerView| {
                f64::from(l.width) >= f64::from(width) * SIZE_TOLERANCE
                    && f64::from(l.height) >= f64::from(height) * SIZE_TOLERANCE
            };
            Some(layers.iter().position(covers).map_or(top, |i| i as u8))
        }
    }
}

/// Chooses a layer for every demand within `budget` bits per second (None: no estimate, no
/// limit) once `audio` bits per second are set aside. Updates each demand's choice, and returns
/// what raising every video to the layer its tile needs would take (what the estimator should
/// probe for).
pub fn allocate(budget: Option<u64>, audio: u64, demands: &mut [Demand<'_>], now: Instant) -> u64 {
    let mut left = budget.map_or(u64::MAX, |b| b.saturating_sub(audio));
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(demands[i].priority));
    // Layers the publisher sends, up to what the tile needs; lowest first.
    let candidates = |d: &Demand<'_>| -> Vec<u8> {
        let Some(max) = layer_for_size(d.layers, d.choice.visibility) else {
            return Vec::new();
        };
        let sending: Vec<u8> = (0..=max)
            .filter(|&l| d.layers[l as usize].sending)
            .collect();
        // Nothing sent yet (a new track): wait on the lowest layer at no cost.
        if sending.is_empty() && !d.layers.iter().any(|l| l.sending) {
            return vec![0];
        }
        sending
    };
    let cost = |d: &Demand<'_>, layer: u8| -> u64 {
        let view = &d.layers[layer as usize];
        if d.choice.layer.is_none_or(|current| layer > current) {
            (view.peak as f64 * UP_HEADROOM) as u64
        } else {
            view.bitrate
        }
    };
    let mut chosen: Vec<Option<u8>> = vec![None; demands.len()];
    let mut wanted = vec![false; demands.len()];
    let mut shortage: Vec<Option<Instant>> = vec![None; demands.len()];
    // Every visible track's lowest layer.
    for &i in &order {
        let d = &demands[i];
        let c = candidates(d);
        let Some(&lowest) = c.first() else { continue };
        wanted[i] = true;
        let need = if d.layers.iter().any(|l| l.sending) {
            cost(d, lowest)
        } else {
            0
        };
        let fits = need <= left;
        // A flowing video rides out a short dip of the estimate on its lowest layer.
        let flowing = d.choice.layer.is_some();
        let short_since = if fits {
            None
        } else {
            d.choice.short_since.or(Some(now))
        };
        let riding_out =
            flowing && short_since.is_some_and(|t| now.saturating_duration_since(t) < PAUSE_AFTER);
        if fits || riding_out {
            left -= d.layers[lowest as usize].bitrate.min(left);
            chosen[i] = Some(lowest);
        }
        shortage[i] = short_since;
    }
    // The leftover raises layers in priority order.
    for &i in &order {
        let d = &demands[i];
        let Some(base) = chosen[i] else { continue };
        let held = d
            .choice
            .lowered_at
            .is_some_and(|t| now.saturating_duration_since(t) < UP_HOLD);
        let base_rate = d.layers[base as usize].bitrate;
        for layer in candidates(d).into_iter().rev().filter(|&l| l > base) {
            let raises = d.choice.layer.is_none_or(|current| layer > current);
            if raises && held {
                continue;
            }
            let extra = cost(d, layer).saturating_sub(base_rate);
            if extra <= left {
                // A higher layer may measure below a lower one for a moment (just resumed).
                left -= d.layers[layer as usize]
                    .bitrate
                    .saturating_sub(base_rate)
                    .min(left);
                chosen[i] = Some(layer);
                break;
            }
        }
    }
    for (i, d) in demands.iter_mut().enumerate() {
        let layer = chosen[i];
        let lowered = match (d.choice.layer, layer) {
            (Some(old), Some(new)) => new < old,
            (Some(_), None) => wanted[i],
            _ => false,
        };
        // Lowered for bandwidth: below what the tile still needs, not because it shrank.
        let by_size = layer_for_size(d.layers, d.choice.visibility);
        if lowered && layer < by_size.min(d.choice.layer) {
            d.choice.lowered_at = Some(now);
        }
        d.choice.paused_for_bandwidth = wanted[i] && layer.is_none();
        d.choice.layer = layer;
        d.choice.needed = by_size;
        d.choice.short_since = shortage[i];
    }
    demands
        .iter()
        .filter_map(|d| {
            let top = candidates(d).last().copied()?;
            Some((d.layers[usize::from(top)].peak as f64 * UP_HEADROOM) as u64)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder(sending: [bool; 3]) -> Vec<LayerView> {
        [
            (320, 180, 150_000),
            (640, 360, 500_000),
            (1280, 720, 1_700_000),
        ]
        .iter()
        .zip(sending)
        .map(|(&(width, height, bitrate), sending)| LayerView {
            sending,
            bitrate,
            peak: bitrate,
            width,
            height,
        })
        .collect()
    }

    fn run(
        budget: Option<u64>,
        tracks: &mut [(Vec<LayerView>, Priority, LayerChoice)],
        now: Instant,
    ) -> Vec<Option<u8>> {
        let mut demands: Vec<Demand<'_>> = tracks
            .iter_mut()
            .map(|(layers, priority, choice)| Demand {
                layers,
                priority: *priority,
                choice,
            })
            .collect();
        allocate(budget, 64_000, &mut demands, now);
        demands.iter().map(|d| d.choice.layer).collect()
    }

    fn track(
        priority: Priority,
        visibility: Visibility,
    ) -> (Vec<LayerView>, Priority, LayerChoice) {
        (
            ladder([true; 3]),
            priority,
            LayerChoice {
                visibility,
                ..LayerChoice::default()
            },
        )
    }

    #[test]
    fn no_estimate_and_no_report_means_the_top_layer() {
        let now = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        assert_eq!(run(None, &mut t, now), vec![Some(2)]);
    }

    #[test]
    fn the_tile_size_caps_the_layer() {
        let now = Instant::now();
        let tile = |width, height| track(Priority::Normal, Visibility::Tile { width, height });
        let mut t = vec![
            tile(320, 180),
            tile(600, 340),
            tile(1920, 1080),
            tile(100, 50),
        ];
        assert_eq!(
            run(None, &mut t, now),
            vec![Some(0), Some(1), Some(2), Some(0)]
        );
        let mut hidden = vec![track(Priority::Normal, Visibility::Hidden)];
        assert_eq!(run(None, &mut hidden, now), vec![None]);
        assert!(!hidden[0].2.paused_for_bandwidth, "hidden, not starved");
    }

    #[test]
    fn only_layers_the_publisher_sends() {
        let now = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        t[0].0 = ladder([true, true, false]);
        assert_eq!(run(None, &mut t, now), vec![Some(1)]);
        t[0].0 = ladder([false, false, false]);
        assert_eq!(
            run(None, &mut t, now),
            vec![Some(0)],
            "a new track waits on layer 0"
        );
    }

    #[test]
    fn a_low_estimate_gives_low_layers_priority_first_then_pauses() {
        let now = Instant::now();
        let mut t = vec![
            track(Priority::Normal, Visibility::Unknown),
            track(Priority::High, Visibility::Unknown),
        ];
        // 64k audio + 2 x 150k x 1.25 fit; the high-priority track takes what is left.
        assert_eq!(run(Some(1_000_000), &mut t, now), vec![Some(0), Some(1)]);
        let mut t = vec![
            track(Priority::Normal, Visibility::Unknown),
            track(Priority::High, Visibility::Unknown),
        ];
        // Room for one lowest layer only: the high-priority one.
        assert_eq!(run(Some(300_000), &mut t, now), vec![None, Some(0)]);
        assert!(t[0].2.paused_for_bandwidth);
    }

    #[test]
    fn raising_needs_headroom_and_waits_after_a_drop() {
        let t0 = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        assert_eq!(run(Some(3_000_000), &mut t, t0), vec![Some(2)]);
        // The estimate falls: down at once.
        assert_eq!(run(Some(700_000), &mut t, t0), vec![Some(1)]);
        // Recovers: held back for UP_HOLD even with room.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(run(Some(3_000_000), &mut t, t1), vec![Some(1)]);
        let t2 = t0 + UP_HOLD + Duration::from_millis(1);
        // Just enough for 1.7M but not 1.25 x 1.7M: stays.
        assert_eq!(run(Some(1_800_000), &mut t, t2), vec![Some(1)]);
        assert_eq!(run(Some(3_000_000), &mut t, t2), vec![Some(2)]);
        // At the current layer no headroom is needed to stay.
        assert_eq!(run(Some(1_800_000), &mut t, t2), vec![Some(2)]);
    }

    #[test]
    fn a_higher_layer_measuring_below_a_lower_one_is_no_trouble() {
        let now = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        t[0].0[2].bitrate = 10_000;
        assert_eq!(run(Some(3_000_000), &mut t, now), vec![Some(2)]);
    }

    #[test]
    fn raising_counts_a_layer_at_its_peak_rate() {
        let now = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        // The top layer measures 400k for the moment but peaked at 1.7M: 1.25 x 1.7M does
        // not fit.
        t[0].0[2].bitrate = 400_000;
        assert_eq!(run(Some(1_200_000), &mut t, now), vec![Some(1)]);
    }

    #[test]
    fn a_flowing_video_rides_out_a_short_dip_before_it_is_paused() {
        let t0 = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        assert_eq!(run(Some(400_000), &mut t, t0), vec![Some(0)]);
        // The estimate falls below its lowest layer: it stays on it for PAUSE_AFTER.
        assert_eq!(run(Some(100_000), &mut t, t0), vec![Some(0)]);
        let t1 = t0 + PAUSE_AFTER / 2;
        assert_eq!(run(Some(100_000), &mut t, t1), vec![Some(0)]);
        assert!(!t[0].2.paused_for_bandwidth);
        // Recovered in time: the clock restarts.
        assert_eq!(run(Some(400_000), &mut t, t1), vec![Some(0)]);
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(run(Some(100_000), &mut t, t2), vec![Some(0)]);
        // A dip that lasts: paused.
        assert_eq!(run(Some(100_000), &mut t, t2 + PAUSE_AFTER), vec![None]);
        assert!(t[0].2.paused_for_bandwidth);
        // A video not flowing yet does not wait.
        let mut fresh = vec![track(Priority::Normal, Visibility::Unknown)];
        assert_eq!(run(Some(100_000), &mut fresh, t0), vec![None]);
    }

    #[test]
    fn a_shrinking_tile_is_not_a_bandwidth_drop() {
        let t0 = Instant::now();
        let mut t = vec![track(Priority::Normal, Visibility::Unknown)];
        run(None, &mut t, t0);
        t[0].2.visibility = Visibility::Tile {
            width: 320,
            height: 180,
        };
        assert_eq!(run(None, &mut t, t0), vec![Some(0)]);
        t[0].2.visibility = Visibility::Unknown;
        assert_eq!(run(None, &mut t, t0), vec![Some(2)], "no hold");
    }
}
