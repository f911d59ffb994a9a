//! Process-wide counters and live gauges, exported as Prometheus text at `/metrics` and as a
//! snapshot for tests. Gauges are kept by RAII guards, so a leaked task shows as a count that
//! never returns to zero.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! metrics {
    (gauges { $($g:ident: $gdoc:literal),* $(,)? } counters { $($c:ident: $cdoc:literal),* $(,)? }
     histograms { $($h:ident: $hdoc:literal),* $(,)? }) => {
        /// Live gauges, monotonic counters and histograms.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $gdoc] pub $g: AtomicU64,)*
            $(#[doc = $cdoc] pub $c: AtomicU64,)*
            $(#[doc = $hdoc] pub $h: Histogram,)*
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
                $(
                    let _ = writeln!(out, "# HELP switchboard_{}_seconds {}", stringify!($h), $hdoc);
                    let _ = writeln!(out, "# TYPE switchboard_{}_seconds histogram", stringify!($h));
                    self.$h.render(&mut out, concat!("switchboard_", stringify!($h), "_seconds"));
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
        forwarders: "Published tracks being forwarded.",
        downtracks: "Subscriber tracks being forwarded to.",
        media_workers: "Media worker threads, each with one UDP socket.",
        forward_rate: "RTP packets per second queued to subscribers, over the last second.",
    }
    counters {
        packets_in: "RTP packets received from publishers.",
        packets_out: "RTP packets queued to subscribers.",
        packets_dropped: "RTP packets dropped: a relay queue to another worker or the socket's send buffer was full.",
        datagrams_unroutable: "Datagrams dropped because they matched no connection (unknown address and ICE ufrag).",
        keyframe_requests: "Keyframe requests (PLI) sent to publishers.",
        media_loop_turns: "Turns of the media workers' event loops (wake-ups); packets per turn is the batching.",
        signaling_errors: "Error messages sent to clients.",
        chat_messages: "Chat messages relayed (counted once per sender message).",
        joins_refused_at_capacity: "Joins refused because every media worker was at the load limit or the forwarding rate at its cap.",
    }
    histograms {
        forward_latency: "Time from a media datagram reaching the server to its forwarded copies being sent.",
    }
}

/// Upper bounds of the histogram buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 15_000, 25_000, 50_000,
    100_000, 1_000_000,
];

/// A Prometheus-style histogram of durations with fixed buckets; lock-free to observe.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations up to each bound (not cumulative); the last slot is above every bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US.partition_point(|b| *b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count());
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
        m.forward_latency
            .observe(std::time::Duration::from_micros(700));
        m.forward_latency
            .observe(std::time::Duration::from_micros(30));
        assert_eq!(m.forward_latency.count(), 2);
        assert!(
            m.render()
                .contains("switchboard_forward_latency_seconds_bucket{le=\"0.001\"} 2")
        );
    }
}
