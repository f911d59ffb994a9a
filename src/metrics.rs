//! Process-wide counters and live gauges, exported as Prometheus text at `/metrics` and as a
//! snapshot for tests. Gauges are kept by RAII guards, so a leaked task shows as a count that
//! never returns to zero.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! metrics {
    (gauges { $($g:ident: $gdoc:literal),* $(,)? } counters { $($c:ident: $cdoc:literal),* $(,)? }) => {
        /// Live gauges and monotonic counters.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $gdoc] pub $g: AtomicU64,)*
            $(#[doc = $cdoc] pub $c: AtomicU64,)*
        }

        /// A copy of every value at one moment.
        #[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
        pub struct MetricsSnapshot {
            $(pub $g: u64,)*
            $(pub $c: u64,)*
        }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($g: self.$g.load(Ordering::Relaxed),)*
                    $($c: self.$c.load(Ordering::Relaxed),)*
                }
            }

            /// Prometheus text exposition format.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP switchboard_{} {}", stringify!($g), $gdoc);
                    let _ = writeln!(out, "# TYPE switchboard_{} gauge", stringify!($g));
                    let _ = writeln!(out, "switchboard_{} {}", stringify!($g), self.$g.load(Ordering::Relaxed));
                )*
                $(
                    let _ = writeln!(out, "# HELP switchboard_{}_total {}", stringify!($c), $cdoc);
                    let _ = writeln!(out, "# TYPE switchboard_{}_total counter", stringify!($c));
                    let _ = writeln!(out, "switchboard_{}_total {}", stringify!($c), self.$c.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

metrics! {
    gauges {
        rooms: "Rooms open.",
        participants: "Participants joined to a room.",
        sessions: "Signaling WebSocket sessions open.",
        peer_connections: "Server-side peer connections alive.",
        forwarders: "Published tracks being read and forwarded (one task each).",
        downtracks: "Subscriber tracks being written (one task each).",
        forward_rate: "RTP packets per second queued to subscribers, over the last second.",
    }
    counters {
        packets_in: "RTP packets received from publishers.",
        packets_out: "RTP packets queued to subscribers.",
        packets_dropped: "RTP packets dropped because a subscriber queue was full.",
        keyframe_requests: "Keyframe requests (PLI) sent to publishers.",
        signaling_errors: "Error messages sent to clients.",
        chat_messages: "Chat messages relayed (counted once per sender message).",
        joins_refused_at_capacity: "Joins refused because the forwarding rate was at the admission limit.",
    }
}

/// Keeps a gauge raised while alive.
#[derive(Debug)]
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicU64,
}

impl GaugeGuard {
    pub fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicU64) -> Self {
        gauge(metrics).fetch_add(1, Ordering::Relaxed);
        GaugeGuard {
            metrics: metrics.clone(),
            gauge,
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_raise_and_lower() {
        let m = Arc::new(Metrics::default());
        let g = GaugeGuard::new(&m, |m| &m.downtracks);
        assert_eq!(m.snapshot().downtracks, 1);
        drop(g);
        assert_eq!(m.snapshot().downtracks, 0);
        assert!(m.render().contains("switchboard_downtracks 0"));
        assert!(m.render().contains("switchboard_packets_in_total 0"));
    }
}
