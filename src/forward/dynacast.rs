//! Dynacast: a simulcast layer no subscriber wants is switched off at the publisher (its
//! encoder stops, saving its uplink and CPU), and switched back on as soon as someone wants it.
//!
//! Kept by the source forwarder of a track. What is wanted is the union of its own downtracks'
//! layers (forwarded, awaited, or needed by their tile but held back by bandwidth) and what the
//! workers it relays to report for theirs. Switching off waits
//! [`SUSPEND_AFTER`] of nobody wanting the layer, so a subscriber moving between layers does not
//! make the publisher's encoder stop and restart; switching on is immediate.

use std::time::{Duration, Instant};

/// A layer nobody wanted for this long is switched off.
pub const SUSPEND_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Dynacast {
    layers: u8,
    /// Layers asked to be switched off (bit i: layer i).
    suspended: u32,
    /// Since when each layer has been unwanted.
    unwanted_since: Vec<Option<Instant>>,
}

impl Dynacast {
    pub fn new(layers: u8) -> Self {
        Dynacast {
            layers,
            suspended: 0,
            unwanted_since: vec![None; usize::from(layers)],
        }
    }

    /// Layers switched off now (bit i: layer i).
    pub fn suspended(&self) -> u32 {
        self.suspended
    }

    /// Takes what every downtrack wants, local and relayed; returns the layers that should be
    /// active when that changes (bit i: layer i), for the publisher to be told. One layer is
    /// never switched off: there is nothing to choose between.
    pub fn update(&mut self, wanted: u32, now: Instant) -> Option<u32> {
        if self.layers < 2 {
            return None;
        }
        let mut suspended = self.suspended;
        for (layer, since) in self.unwanted_since.iter_mut().enumerate() {
            let bit = 1 << layer;
            if wanted & bit != 0 {
                *since = None;
                suspended &= !bit;
            } else {
                let since = *since.get_or_insert(now);
                if now.saturating_duration_since(since) >= SUSPEND_AFTER {
                    suspended |= bit;
                }
            }
        }
        if suspended == self.suspended {
            return None;
        }
        self.suspended = suspended;
        let all = (1u32 << self.layers) - 1;
        Some(all & !suspended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwanted_layers_go_off_after_a_while_and_come_back_at_once() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let mut d = Dynacast::new(3);
        // Everybody on the low layer.
        assert_eq!(d.update(0b001, t0), None, "not yet");
        assert_eq!(d.update(0b001, later(2_000)), None);
        assert_eq!(d.update(0b001, later(3_000)), Some(0b001), "h and f off");
        assert_eq!(d.update(0b001, later(4_000)), None, "told once");
        // A subscriber (here or on another worker) wants the top layer: on at once.
        assert_eq!(d.update(0b101, later(4_100)), Some(0b101));
        assert_eq!(d.suspended(), 0b010);
        // It leaves; a brief gap does not switch the layer off.
        assert_eq!(d.update(0b001, later(4_200)), None);
        assert_eq!(d.update(0b101, later(5_000)), None);
        assert_eq!(d.update(0b001, later(5_100)), None);
        assert_eq!(d.update(0b001, later(8_100)), Some(0b001));
    }

    #[test]
    fn nobody_at_all_switches_everything_off_and_one_layer_is_left_alone() {
        let t0 = Instant::now();
        let mut d = Dynacast::new(2);
        d.update(0, t0);
        assert_eq!(d.update(0, t0 + SUSPEND_AFTER), Some(0));
        assert_eq!(d.update(0b10, t0 + SUSPEND_AFTER), Some(0b10));
        let mut one = Dynacast::new(1);
        assert_eq!(one.update(0, t0), None);
        assert_eq!(one.update(0, t0 + SUSPEND_AFTER), None);
    }
}
