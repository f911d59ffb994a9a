//! Keyframe-request throttling: many subscribers asking at once must cost the publisher one
//! keyframe, not one each. A request inside the quiet interval is remembered, not dropped, and
//! goes out when the interval ends, so a subscriber that joined just after a keyframe still
//! gets one.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    min_interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframeThrottle {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

    pub fn new(min_interval: Duration) -> Self {
        KeyframeThrottle {
            min_interval,
            last_sent: None,
            pending: false,
        }
    }

    /// Someone wants a keyframe.
    pub fn request(&mut self) {
        self.pending = true;
    }

    /// Whether a keyframe request should go to the publisher now; true at most once per interval.
    pub fn poll(&mut self, now: Instant) -> bool {
        if !self.pending {
            return false;
        }
        let quiet = self
            .last_sent
            .is_some_and(|last| now.saturating_duration_since(last) < self.min_interval);
        if quiet {
            return false;
        }
        self.pending = false;
        self.last_sent = Some(now);
        true
    }

    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// When a pending request may go out (None: nothing pending).
    pub fn due(&self, now: Instant) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        Some(
            self.last_sent
                .map_or(now, |last| (last + self.min_interval).max(now)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_per_interval_and_deferred_not_lost() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut k = KeyframeThrottle::new(Duration::from_millis(500));
        assert!(!k.poll(t0), "nothing requested");
        k.request();
        k.request();
        assert!(k.poll(t0));
        assert!(!k.poll(ms(1)), "two requests, one keyframe");
        k.request();
        assert!(!k.poll(ms(100)), "inside the interval");
        assert!(k.is_pending());
        assert!(
            k.poll(ms(500)),
            "deferred request goes out when the interval ends"
        );
        assert!(!k.poll(ms(2000)));
    }
}
