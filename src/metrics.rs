//! Process-wide counters, live gauges and histograms, kept in the Prometheus project's own Rust
//! client (`prometheus-client`) and exported at `/metrics` in its OpenMetrics text format, plus
//! a snapshot for tests. Gauges are kept by RAII guards, so a leaked task shows as a count that
//! never returns to zero.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// The label of a per-worker series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: u32,
}

/// The label of a per-simulcast-layer series (0: the lowest layer, or a single stream).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    pub layer: u32,
}

/// Upper bounds of the event-loop turn buckets, in seconds.
const TURN_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1,
];
/// Upper bounds of the join-time buckets, in seconds.
const JOIN_BUCKETS: [f64; 10] = [0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// Upper bounds of the forwarding latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.004, 0.005, 0.007_5, 0.01, 0.015,
    0.025, 0.05, 0.1, 1.0,
];

macro_rules! metrics {
    (gauges { $($g:ident: $gdoc:literal),* $(,)? } counters { $($c:ident: $cdoc:literal),* $(,)? }) => {
        /// Live gauges, monotonic counters and histograms.
        #[derive(Debug)]
        pub struct Metrics {
            $(#[doc = $gdoc] pub $g: Gauge,)*
            $(#[doc = $cdoc] pub $c: Counter,)*
            /// Time from a media datagram reaching the server to its forwarded copies being sent.
            pub forward_latency: Histogram,
            /// Time each media worker's event-loop turn works, from wake-up to done.
            pub loop_turn_busy: Histogram,
            /// Time from an SFU participant's `join` to its media connection being up.
            pub join_time: Histogram,
            /// Connections living on each media worker.
            pub worker_connections: Family<WorkerLabel, Gauge>,
            /// Share of the last second each media worker was busy (what admission looks at).
            pub worker_load_ratio: Family<WorkerLabel, Gauge<f64, AtomicU64>>,
            /// Datagrams the kernel dropped at each media worker's socket, its receive buffer full.
            pub worker_receive_drops: Family<WorkerLabel, Counter>,
            /// Video packets queued to subscribers, by the simulcast layer they came from.
            pub packets_out_by_layer: Family<LayerLabel, Counter>,
            /// The runtime the server runs on, whose tasks `runtime_tasks` counts.
            runtime: std::sync::OnceLock<tokio::runtime::Handle>,
            registry: Registry,
        }

        /// A copy of every gauge and counter at one moment.
        #[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
        pub struct MetricsSnapshot {
            $(pub $g: u64,)*
            $(pub $c: u64,)*
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut m = Metrics {
                    $($g: Gauge::default(),)*
                    $($c: Counter::default(),)*
                    forward_latency: Histogram::new(LATENCY_BUCKETS),
                    loop_turn_busy: Histogram::new(TURN_BUCKETS),
                    join_time: Histogram::new(JOIN_BUCKETS),
                    worker_connections: Family::default(),
                    worker_load_ratio: Family::default(),
                    worker_receive_drops: Family::default(),
                    packets_out_by_layer: Family::default(),
                    runtime: std::sync::OnceLock::new(),
                    registry: Registry::with_prefix("switchboard"),
                };
                let r = &mut m.registry;
                $(r.register(stringify!($g), $gdoc, m.$g.clone());)*
                $(r.register(stringify!($c), $cdoc, m.$c.clone());)*
                r.register(
                    "forward_latency_seconds",
                    "Time from a media datagram reaching the server to its forwarded copies being sent",
                    m.forward_latency.clone(),
                );
                r.register(
                    "loop_turn_busy_seconds",
                    "Time each media worker's event-loop turn works, from wake-up to done (the rest of the time it waits)",
                    m.loop_turn_busy.clone(),
                );
                r.register(
                    "join_seconds",
                    "Time from an SFU participant's join to its media connection being up (ICE and DTLS done)",
                    m.join_time.clone(),
                );
                r.register(
                    "worker_connections",
                    "Connections living on each media worker",
                    m.worker_connections.clone(),
                );
                r.register(
                    "worker_load_ratio",
                    "Share of the last second each media worker was busy",
                    m.worker_load_ratio.clone(),
                );
                r.register(
                    "worker_receive_drops",
                    "Datagrams the kernel dropped at each media worker's socket because its receive buffer was full (the worker fell behind)",
                    m.worker_receive_drops.clone(),
                );
                r.register(
                    "video_packets_out_by_layer",
                    "Video RTP packets queued to subscribers, by the simulcast layer they came from (0 is the lowest, or the only one)",
                    m.packets_out_by_layer.clone(),
                );
                m
            }

            pub fn snapshot(&self) -> MetricsSnapshot {
                self.sample_runtime();
                MetricsSnapshot {
                    $($g: self.$g.get().max(0) as u64,)*
                    $($c: self.$c.get(),)*
                }
            }
        }
    };
}

metrics! {
    gauges {
        rooms: "Rooms open",
        participants: "Participants joined to a room",
        sessions: "Signaling WebSocket sessions open",
        sessions_detached: "Sessions whose socket dropped, waiting (media flowing) for their client to resume",
        http_sessions: "WHIP and WHEP resources (publishers and players that joined over HTTP) alive",
        peer_connections: "Server-side peer connections alive",
        forwarders: "Published tracks being forwarded",
        downtracks: "Subscriber tracks being forwarded to",
        media_workers: "Media worker threads, each with one UDP socket",
        forward_rate: "RTP packets per second queued to subscribers, over the last second",
        downtracks_paused_bandwidth: "Subscribed videos paused because the subscriber's downlink has no room for their lowest layer",
        downtracks_paused_hidden: "Subscribed videos paused because the subscriber does not show them",
        turn_allocations: "Relays the embedded TURN server holds open",
        draining: "1 while the server drains before shutting down (new joins refused, /healthz 503)",
        cluster_nodes: "Live nodes of the cluster (this one included) at the last heartbeat; 0 without --redis-url",
        cluster_rooms_contested: "Rooms open here whose placement in Redis names another live node (joined on both during a Redis outage); new joiners go there",
        cascade_links: "Open QUIC connections of the node link to other nodes (cascading)",
        cascade_tracks_in: "Tracks published on other nodes relayed to this one now (cascading)",
        runtime_tasks: "Tasks alive on the server's tokio runtime (sessions, HTTP connections, timers, webhooks; not the media workers' own loops), sampled when the metrics are read: back to its idle value when everyone has left, or a task leaks",
    }
    counters {
        packets_in: "RTP packets received from publishers",
        packets_out: "RTP packets queued to subscribers",
        red_packets_in: "Audio packets received as RED (RFC 2198 redundant audio)",
        red_packets_out: "Audio packets sent as RED to subscribers that take it (the others get the primary block only)",
        packets_dropped: "RTP packets dropped: a relay queue to another worker or the socket's send buffer was full",
        packets_dropped_pacer: "Video packets dropped because the subscriber's pacer queue already held more than 500 ms (its downlink is congested; layer choice catches up)",
        packets_muted: "RTP packets dropped on arrival because an administrator muted their track",
        relay_packets_skipped: "Packets of a simulcast layer not relayed to a media worker whose subscribers of the track take other layers",
        datagrams_unroutable: "Datagrams dropped because they matched no connection (unknown address and ICE ufrag)",
        bwe_estimator_restarts: "Bandwidth estimators restarted because their estimate stalled while a subscriber's video stayed below the layer its tile needs",
        ice_keepalive_indications: "STUN Binding indications (libnice's keepalives) taken as the client's liveness, which the ICE-lite engine counts from Binding requests only",
        keyframe_requests: "Keyframe requests (PLI) sent to publishers",
        media_loop_turns: "Turns of the media workers' event loops (wake-ups); packets per turn is the batching",
        signaling_errors: "Error messages sent to clients",
        chat_messages: "Chat messages relayed (counted once per sender message)",
        turn_auth_refused: "TURN requests refused for expired or malformed credentials",
        turn_allocations_refused: "TURN allocations refused because the server held --turn-max-allocations relays",
        turn_relay_throttled: "Datagrams a TURN relay dropped because its client sent faster than --turn-relay-kbps",
        turn_relay_denied: "Datagrams a TURN relay was asked to send to a private or loopback address and dropped",
        joins_refused_at_capacity: "Joins refused because every media worker was at the load limit or the forwarding rate at its cap",
        sessions_join_timeout: "Signaling sockets closed because they did not join a room in time",
        sessions_media_timeout: "SFU participants removed because their media did not connect in time",
        sessions_rate_limited: "Signaling sockets closed for sending messages faster than the per-socket rate",
        sessions_slow_reader: "Signaling sockets cut because their client did not read (outgoing queue full, or a write blocked past the send timeout)",
        sessions_panicked: "Sessions that panicked (a bug); their participant was still removed from its room",
        members_lagging: "Members removed from a room because they fell a whole event queue behind",
        admin_unauthorized: "Admin API calls refused: a missing, invalid or non-admin token, or one for another room",
        joins_unauthorized: "Joins refused for a missing, expired, forged or wrong-room access token",
        connections_refused: "Signaling WebSocket upgrades refused: over the total or per-IP connection cap",
        connections_refused_origin: "Signaling WebSocket upgrades refused: an Origin not on the allow-list",
        webhooks_delivered: "Webhook requests a receiver accepted (2xx)",
        webhooks_retried: "Webhook attempts that failed and were retried",
        webhooks_failed: "Webhook events given up on after every attempt failed",
        webhooks_dropped: "Webhook events dropped because a receiver's queue was full",
        cluster_redirects: "Joins answered with `redirect`: the room is placed on another node",
        cluster_redis_errors: "Redis calls that failed or timed out (a join then serves its room here; a heartbeat is retried)",
        cluster_nodes_reaped: "Dead nodes (heartbeat expired) this node removed from the cluster's node set",
        cascade_packets_out: "Media packets relayed to other nodes (one per packet per node)",
        cascade_packets_in: "Media packets relayed here from other nodes",
        cascade_packets_repaired: "Relayed packets sent again to a node that missed them (a NACK on the node link)",
        cascade_packets_dropped: "Relayed media packets dropped: a full queue, a link not up, too large for a datagram, or undecodable",
        cascade_messages_dropped: "Cascading messages dropped: room changes or chat lines not published (full queue, Redis down; the periodic state repairs membership), link control frames to a full or closed link",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The OpenMetrics text exposition of everything (content type [`Metrics::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        self.sample_runtime();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts `runtime`'s tasks in `runtime_tasks` (the first call wins: the server's own).
    pub fn watch_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
    }

    /// Sets `runtime_tasks` from the watched runtime. Called when the metrics are read, so it
    /// costs nothing between scrapes.
    fn sample_runtime(&self) {
        if let Some(runtime) = self.runtime.get() {
            let tasks = runtime.metrics().num_alive_tasks();
            self.runtime_tasks
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
    }

    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";
}

/// Keeps a gauge raised while alive.
#[derive(Debug)]
pub struct GaugeGuard {
    gauge: Gauge,
}

impl GaugeGuard {
    pub fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        let gauge = gauge(metrics).clone();
        gauge.inc();
        GaugeGuard { gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_raise_and_lower_and_everything_is_exported() {
        let m = Arc::new(Metrics::new());
        let g = GaugeGuard::new(&m, |m| &m.downtracks);
        assert_eq!(m.snapshot().downtracks, 1);
        drop(g);
        assert_eq!(m.snapshot().downtracks, 0);
        m.packets_in.inc_by(3);
        m.forward_latency.observe(0.000_7);
        m.forward_latency.observe(0.000_03);
        m.worker_connections
            .get_or_create(&WorkerLabel { worker: 1 })
            .set(4);
        let text = m.render();
        for line in [
            "switchboard_downtracks 0",
            "switchboard_packets_in_total 3",
            "switchboard_forward_latency_seconds_bucket{le=\"0.001\"} 2",
            "switchboard_forward_latency_seconds_count 2",
            "switchboard_worker_connections{worker=\"1\"} 4",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
