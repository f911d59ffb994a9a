//! Turns the two ends of a measurement window into figures, and prints them.

use std::time::Duration;

use serde::Serialize;
use switchboard::signal::protocol::RoomMode;

use super::histogram::Percentiles;
use super::lite;
use super::run::{Mark, Participant, Scenario, SubscriberEngine, Totals, join_times};
use super::server::{Server, ServerSample};
use super::system;

const MB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub label: String,
    /// The protocol the server was spoken to in (`switchboard`, `whip`, `janus`).
    pub target: &'static str,
    pub mode: &'static str,
    pub machine: String,
    pub rooms: usize,
    pub publishers_per_room: usize,
    pub subscribers_per_room: usize,
    pub participants_planned: usize,
    pub participants_joined: usize,
    pub subscribers: SubscriberFigures,
    pub media: MediaSummary,
    /// Joining everyone until every stream flowed, seconds.
    pub ramp_s: f64,
    pub window_s: f64,
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    /// Machine CPU busy over the window, in cores (server + generator + anything else).
    pub machine_busy_cores: f64,
    /// `machine_busy_cores` minus the server and the generator.
    pub other_cores: f64,
    /// CPU time the hypervisor took from this VM over the window, % of all cores' time.
    pub steal_pct: f64,
    pub delivery: Delivery,
    pub latency_ms: Latency,
    pub join_ms: JoinTimes,
    pub per_client: PerClient,
    pub server: ServerFigures,
    pub generator: GeneratorFigures,
    pub warnings: Vec<String>,
}

/// What the receive-only participants ran on.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriberFigures {
    pub engine: SubscriberEngine,
    /// Lite: after the first few packets of each stream, one in this many was decrypted (and
    /// gave the latency figures); None for webrtc-rs, which decrypts every packet.
    pub decrypt_every: Option<u32>,
    pub lite: Option<LiteFigures>,
}

/// The lite engine's own counters over the whole run (ramp, window and leave).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiteFigures {
    /// The engine's UDP port (receiver k is 127.1.0.0 + 1 + k on it).
    pub port: u16,
    /// CPU of the engine's one thread over the window, cores (it saturates at 1.0 whatever the
    /// generator's thread count).
    pub thread_cpu_cores: f64,
    /// Datagrams received, and sent (STUN, DTLS, RTCP: receiver reports, TWCC feedback).
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Wake-ups of the engine's event loop.
    pub loop_turns: u64,
    pub media_packets: u64,
    pub decrypted_packets: u64,
    /// Decrypted for a known track, but nothing came out (SRTP authentication failed).
    pub undecrypted: u64,
    pub duplicates: u64,
    pub too_old: u64,
    /// Media packets on an SSRC str0m could not yet name a track for (counted, on no track).
    pub unmapped: u64,
    /// Datagrams the kernel dropped at the engine's socket (the engine fell behind).
    pub socket_drops: u64,
    /// Datagrams to an address no receiver has (dropped).
    pub unroutable: u64,
    /// Datagrams from, or sends to, a non-loopback address (dropped).
    pub not_loopback: u64,
    pub malformed: u64,
    pub ssrc_overflow: u64,
    /// Datagrams the socket did not take at once (dropped), and other send errors.
    pub send_dropped: u64,
    pub send_errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MediaSummary {
    pub audio: bool,
    pub video: bool,
    pub video_kbps: f64,
    pub video_fps: u32,
    pub video_packets_per_frame: u32,
    pub video_packet_bytes: usize,
    /// A frame's packets spread over 40 % of the frame interval, as a browser's pacer does;
    /// otherwise back to back.
    pub video_paced: bool,
    /// Video sent as three simulcast layers (q, h, f: a quarter, half and all of
    /// `video_packet_bytes`, `video_packets_per_frame` each); `video_kbps` is the top layer.
    pub video_simulcast: bool,
    /// The tile size the lite subscribers reported for every video (None: none reported).
    pub subscriber_tile: Option<String>,
    pub audio_packets_per_s: u32,
    pub audio_packet_bytes: usize,
}

/// What the subscribers received in the window, against what the publishers' sequence numbers
/// say was sent to them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delivery {
    /// Received streams (one per subscriber per remote track) measured.
    pub streams: usize,
    /// Streams that started during the window (counted from their first packet).
    pub late_streams: usize,
    pub expected_packets: u64,
    pub received_packets: u64,
    pub lost_packets: u64,
    pub loss_pct: f64,
    /// Payloads that arrived damaged or from the wrong publisher (must be 0).
    pub bad_payloads: u64,
    pub packets_per_s: f64,
    /// Packets per second the publishers generated (each counted once however many
    /// connections it went out on), against what the profile asks for: the generator falls
    /// behind when it is overloaded. With simulcast the configured figure is one layer's (the
    /// server switches off layers nobody receives, so a publisher sends one to three).
    pub sent_packets_per_s: f64,
    pub configured_packets_per_s: f64,
    /// RTP payload bits per second received, all subscribers together.
    pub payload_mbps: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub all: Percentiles,
    pub audio: Percentiles,
    pub video: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JoinTimes {
    #[serde(flatten)]
    pub percentiles: Percentiles,
    /// Participants that joined a room with media flowing but never received any.
    pub without_media: usize,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PerClient {
    /// Peer connections per participant (1 in SFU rooms, n-1 in mesh rooms).
    pub connections: f64,
    /// Copies of each of its streams a publisher uploads (1 SFU, n-1 mesh).
    pub upload_copies: f64,
    /// Payload kbit/s a publisher uploads: SFU, what it sent; mesh, what its peers received
    /// from it.
    pub upload_kbps: f64,
    /// Payload kbit/s a participant receives.
    pub download_kbps: f64,
    /// Media streams uploaded in the whole room(s): publishers × tracks × copies.
    pub uploaded_streams: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    pub pid: Option<u32>,
    pub packets_in_per_s: f64,
    pub packets_out_per_s: f64,
    /// Wake-ups of the media workers' event loops per second; packets out per turn is how well
    /// sends are batched (a paced or busier server sends more per turn, which costs less per
    /// packet).
    pub loop_turns_per_s: f64,
    pub packets_dropped: u64,
    /// Datagrams the kernel dropped at the server's media sockets (receive buffers full).
    pub socket_drops: u64,
    pub keyframe_requests: u64,
    /// CPU time over wall time (1.0 = one core busy).
    pub cpu_cores: f64,
    pub cpu_s_per_million_out: f64,
    /// Server CPU seconds per million packets the subscribers received: the figure that
    /// compares servers that publish no forwarding counters (Janus).
    pub cpu_s_per_million_received: f64,
    pub rss_baseline_mb: f64,
    pub rss_mb: f64,
    pub rss_per_participant_kb: f64,
    pub rss_after_close_mb: f64,
    pub participants_after_close: f64,
    /// The server's own measure of time inside it (datagram in → copies sent), from its
    /// `switchboard_forward_latency_seconds` histogram over the window: the bucket bounds under
    /// which 50 % and 99 % of forwarded packets fall, in ms (None: not reported).
    pub in_server_p50_ms: Option<f64>,
    pub in_server_p99_ms: Option<f64>,
    /// Video packets queued to subscribers over the window by the simulcast layer they came
    /// from (index 0: the lowest layer, or a track sent as one stream), from the server's
    /// `switchboard_video_packets_out_by_layer_total` (empty: not reported).
    pub video_packets_out_by_layer: Vec<u64>,
}

/// The window's deltas of a counter family labelled `layer`, indexed by layer (a layer
/// missing below the highest one seen counts 0). Layer labels above 63 are ignored.
fn by_layer(start: &ServerSample, end: &ServerSample, family: &str) -> Vec<u64> {
    let prefix = format!("switchboard_{family}{{layer=\"");
    let mut counts: Vec<u64> = Vec::new();
    for (key, value) in &end.metrics {
        let Some(layer) = key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix("\"}"))
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|&l| l < 64)
        else {
            continue;
        };
        let before = start.metrics.get(key).copied().unwrap_or(0.0);
        if counts.len() <= layer {
            counts.resize(layer + 1, 0);
        }
        counts[layer] = (value - before).max(0.0) as u64;
    }
    counts
}

/// The bound (in ms) of the histogram bucket under which a share `q` of observations fall, from
/// cumulative Prometheus bucket deltas sorted by bound.
fn bucket_quantile_ms(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= q * total)
        .map(|(le, _)| le * 1000.0)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GeneratorFigures {
    pub threads: usize,
    pub cpu_cores: f64,
    /// Generator CPU time (sending and receiving) per received packet, µs.
    pub cpu_us_per_received_packet: f64,
    pub rss_mb: f64,
    /// The generator used over 90 % of its threads (or the lite engine's thread over 90 % of a
    /// core): the figures may show its limit, not the server's.
    pub saturated: bool,
}

impl Outcome {
    pub(crate) fn set_after_close(&mut self, after: &ServerSample) {
        self.server.rss_after_close_mb = after.process.map_or(0.0, |p| p.rss_bytes as f64 / MB);
        self.server.participants_after_close = after.metric("participants");
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn compute(
    scenario: &Scenario,
    server: &Server,
    baseline: &ServerSample,
    participants: &[Participant],
    start: &Mark,
    end: &Mark,
    totals: &Totals,
    engine: Option<&lite::Engine>,
    ramp: Duration,
    mut warnings: Vec<String>,
) -> Outcome {
    let window = (end.at - start.at).as_secs_f64().max(1e-6);
    let joined = participants.iter().filter(|p| p.peer.is_some()).count();

    let mut delivery = Delivery::default();
    let mut received_bytes = 0u64;
    let mut sent_bytes_publishers = 0u64;
    let mut sent_packets_publishers = 0u64;
    let mut publishers = 0usize;
    let mut receivers = 0usize;
    let mut links = 0usize;
    let mut publisher_links = 0usize;
    for (i, p) in participants.iter().enumerate() {
        let (Some(Some(a)), Some(Some(b))) = (start.clients.get(i), end.clients.get(i)) else {
            continue;
        };
        links += b.links;
        if p.publisher {
            publishers += 1;
            publisher_links += b.links;
            sent_bytes_publishers += b.sent_bytes.saturating_sub(a.sent_bytes);
            sent_packets_publishers += b.sent_packets.saturating_sub(a.sent_packets);
        }
        if !b.remote.is_empty() {
            receivers += 1;
        }
        for (key, tb) in &b.remote {
            let Some(max_b) = tb.max_seq else { continue };
            let (expected, received, bytes, bad) = match a.remote.get(key) {
                Some(ta) if ta.max_seq.is_some() => (
                    max_b.saturating_sub(ta.max_seq.unwrap_or(0)),
                    tb.intact.saturating_sub(ta.intact),
                    tb.bytes.saturating_sub(ta.bytes),
                    tb.bad.saturating_sub(ta.bad),
                ),
                _ => {
                    delivery.late_streams += 1;
                    (
                        max_b + 1 - tb.first_seq.unwrap_or(0).min(max_b),
                        tb.intact,
                        tb.bytes,
                        tb.bad,
                    )
                }
            };
            delivery.streams += 1;
            delivery.expected_packets += expected;
            // Retransmissions can deliver a packet twice; a stream never counts as gaining.
            delivery.received_packets += received.min(expected);
            delivery.bad_payloads += bad;
            received_bytes += bytes;
        }
    }
    delivery.lost_packets = delivery.expected_packets - delivery.received_packets;
    delivery.loss_pct = if delivery.expected_packets > 0 {
        delivery.lost_packets as f64 * 100.0 / delivery.expected_packets as f64
    } else {
        0.0
    };
    delivery.packets_per_s = delivery.received_packets as f64 / window;
    delivery.payload_mbps = received_bytes as f64 * 8.0 / window / 1e6;
    delivery.sent_packets_per_s = sent_packets_publishers as f64 / window;
    {
        let m = scenario.media;
        let per_publisher = if scenario.video {
            f64::from(m.video_fps * m.video_packets_per_frame)
        } else {
            0.0
        } + if scenario.audio {
            f64::from(m.audio_packets_per_second)
        } else {
            0.0
        };
        delivery.configured_packets_per_s = per_publisher * publishers as f64;
        if delivery.sent_packets_per_s < 0.97 * delivery.configured_packets_per_s {
            warnings.push(format!(
                "the publishers sent {:.0} packets/s of the {:.0} configured: the generator fell behind",
                delivery.sent_packets_per_s, delivery.configured_packets_per_s
            ));
        }
    }
    if delivery.bad_payloads > 0 {
        warnings.push(format!(
            "{} payloads arrived damaged or misattributed",
            delivery.bad_payloads
        ));
    }

    let audio = totals.audio.snapshot();
    let video = totals.video.snapshot();
    let mut all = audio.clone();
    all.merge(&video);
    let latency_ms = Latency {
        all: all.percentiles(1000.0),
        audio: audio.percentiles(1000.0),
        video: video.percentiles(1000.0),
    };
    let (joins, without_media) = join_times(participants);
    let join_ms = JoinTimes {
        percentiles: joins.percentiles(1000.0),
        without_media,
        concurrency: scenario.join_concurrency,
    };
    if without_media > 0 {
        warnings.push(format!(
            "{without_media} participants joined but never received media"
        ));
    }

    let mesh = scenario.mode == RoomMode::Mesh;
    let upload_copies = if mesh && publishers > 0 {
        publisher_links as f64 / publishers as f64
    } else {
        1.0
    };
    let per_client = PerClient {
        connections: links as f64 / joined.max(1) as f64,
        upload_copies,
        upload_kbps: if publishers == 0 {
            0.0
        } else if mesh {
            received_bytes as f64 * 8.0 / window / 1000.0 / publishers as f64
        } else {
            sent_bytes_publishers as f64 * 8.0 / window / 1000.0 / publishers as f64
        },
        download_kbps: received_bytes as f64 * 8.0 / window / 1000.0 / receivers.max(1) as f64,
        uploaded_streams: (publishers as f64
            * scenario.tracks_per_publisher() as f64
            * upload_copies)
            .round() as u64,
    };

    let server_figures = {
        let d = |name: &str| end.server.metric(name) - start.server.metric(name);
        let out = d("packets_out_total");
        let mut f = ServerFigures {
            pid: server.pid,
            packets_in_per_s: d("packets_in_total") / window,
            loop_turns_per_s: d("media_loop_turns_total") / window,
            packets_out_per_s: out / window,
            packets_dropped: d("packets_dropped_total").max(0.0) as u64,
            keyframe_requests: d("keyframe_requests_total").max(0.0) as u64,
            socket_drops: end
                .server
                .metrics
                .keys()
                .filter(|k| k.starts_with("switchboard_worker_receive_drops_total{"))
                .filter_map(|k| k.strip_prefix("switchboard_"))
                .map(|k| d(k).max(0.0) as u64)
                .sum(),
            ..Default::default()
        };
        let mut buckets: Vec<(f64, f64)> = end
            .server
            .metrics
            .keys()
            .filter_map(|k| {
                let name = k.strip_prefix("switchboard_")?;
                let le = name
                    .strip_prefix("forward_latency_seconds_bucket{le=\"")?
                    .strip_suffix("\"}")?;
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, d(name)))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        f.video_packets_out_by_layer = by_layer(
            &start.server,
            &end.server,
            "video_packets_out_by_layer_total",
        );
        f.in_server_p50_ms = bucket_quantile_ms(&buckets, 0.5);
        f.in_server_p99_ms = bucket_quantile_ms(&buckets, 0.99);
        if let (Some(a), Some(b)) = (start.server.process, end.server.process) {
            let cpu = b.cpu_s - a.cpu_s;
            f.cpu_cores = cpu / window;
            if out > 0.0 {
                f.cpu_s_per_million_out = cpu / (out / 1e6);
            }
            if delivery.received_packets > 0 {
                f.cpu_s_per_million_received = cpu / (delivery.received_packets as f64 / 1e6);
            }
            f.rss_mb = b.rss_bytes as f64 / MB;
        }
        if let (Some(base), Some(b)) = (baseline.process, end.server.process) {
            f.rss_baseline_mb = base.rss_bytes as f64 / MB;
            f.rss_per_participant_kb =
                (b.rss_bytes as f64 - base.rss_bytes as f64) / 1024.0 / joined.max(1) as f64;
        }
        if f.packets_dropped > 0 {
            warnings.push(format!(
                "the server dropped {} packets at full subscriber queues",
                f.packets_dropped
            ));
        }
        if f.socket_drops > 0 {
            warnings.push(format!(
                "the kernel dropped {} datagrams at the server's full media sockets (the server fell behind its input)",
                f.socket_drops
            ));
        }
        f
    };

    let subscribers = subscriber_figures(scenario, engine, start, end, window);
    if let Some(lite) = &subscribers.lite {
        let dropped = lite.unroutable + lite.not_loopback + lite.send_dropped + lite.ssrc_overflow;
        if dropped > 0 || lite.undecrypted > 0 {
            warnings.push(format!(
                "lite receivers dropped {dropped} datagrams (unroutable {}, not loopback {}, send buffer full {}, too many SSRCs {}); {} sampled packets failed to decrypt",
                lite.unroutable,
                lite.not_loopback,
                lite.send_dropped,
                lite.ssrc_overflow,
                lite.undecrypted
            ));
        }
        if lite.socket_drops > 0 {
            warnings.push(format!(
                "the kernel dropped {} datagrams at the lite receivers' socket: the generator fell behind (give it a core of its own); lost handshake packets delay joins",
                lite.socket_drops
            ));
        }
    }
    let lite_saturated = subscribers
        .lite
        .as_ref()
        .is_some_and(|l| l.thread_cpu_cores > 0.9);
    if lite_saturated {
        warnings.push(format!(
            "the lite receivers' thread used {:.0}% of a core: it may be the bottleneck",
            subscribers
                .lite
                .as_ref()
                .map_or(0.0, |l| l.thread_cpu_cores * 100.0)
        ));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generator = {
        let cpu = end.generator.cpu_s - start.generator.cpu_s;
        let cores = cpu / window;
        GeneratorFigures {
            threads: super::worker_threads().unwrap_or(threads),
            cpu_cores: cores,
            cpu_us_per_received_packet: if delivery.received_packets > 0 {
                cpu * 1e6 / delivery.received_packets as f64
            } else {
                0.0
            },
            rss_mb: end.generator.rss_bytes as f64 / MB,
            saturated: lite_saturated
                || cores > 0.9 * super::worker_threads().unwrap_or(threads) as f64,
        }
    };
    if generator.saturated && !lite_saturated {
        warnings.push(format!(
            "the generator used {:.0}% of its {} thread(s): it may be the bottleneck",
            generator.cpu_cores * 100.0,
            generator.threads
        ));
    }
    let machine_busy_cores = (end.cpu.busy_s - start.cpu.busy_s) / window;
    let other_cores = machine_busy_cores - generator.cpu_cores - server_figures.cpu_cores;
    if server.pid.is_some() && other_cores > 0.15 {
        warnings.push(format!(
            "other processes used {other_cores:.2} cores during the window: the machine was not quiet"
        ));
    }

    let m = scenario.media;
    let bytes_per_s =
        f64::from(m.video_fps * m.video_packets_per_frame) * m.video_packet_size as f64;
    Outcome {
        label: scenario.label.clone(),
        target: scenario.target.name(),
        mode: if mesh { "mesh" } else { "sfu" },
        machine: system::machine(),
        rooms: scenario.rooms,
        publishers_per_room: scenario.publishers,
        subscribers_per_room: scenario.subscribers,
        participants_planned: scenario.participants(),
        participants_joined: joined,
        subscribers,
        media: MediaSummary {
            audio: scenario.audio,
            video: scenario.video,
            video_kbps: bytes_per_s * 8.0 / 1000.0,
            video_fps: m.video_fps,
            video_packets_per_frame: m.video_packets_per_frame,
            video_packet_bytes: m.video_packet_size,
            video_paced: m.paced,
            video_simulcast: m.simulcast && scenario.video,
            subscriber_tile: scenario.subscriber_tile.map(|t| t.to_string()),
            audio_packets_per_s: m.audio_packets_per_second,
            audio_packet_bytes: m.audio_packet_size,
        },
        ramp_s: ramp.as_secs_f64(),
        window_s: window,
        loadavg_start: start.loadavg,
        loadavg_end: end.loadavg,
        machine_busy_cores,
        other_cores,
        steal_pct: (end.cpu.steal_s - start.cpu.steal_s) * 100.0
            / (end.cpu.total_s - start.cpu.total_s).max(1e-6),
        delivery,
        latency_ms,
        join_ms,
        per_client,
        server: server_figures,
        generator,
        warnings,
    }
}

fn subscriber_figures(
    scenario: &Scenario,
    engine: Option<&lite::Engine>,
    start: &Mark,
    end: &Mark,
    window: f64,
) -> SubscriberFigures {
    let kind = scenario.effective_subscriber_engine();
    let lite = engine.map(|e| {
        let s = &e.stats;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        LiteFigures {
            port: e.port,
            thread_cpu_cores: match (start.lite_cpu_s, end.lite_cpu_s) {
                (Some(a), Some(b)) => (b - a) / window,
                _ => 0.0,
            },
            datagrams_in: n(&s.datagrams),
            datagrams_out: n(&s.sent),
            loop_turns: n(&s.turns),
            media_packets: n(&s.media_packets),
            decrypted_packets: n(&s.decrypted),
            undecrypted: n(&s.undecrypted),
            duplicates: n(&s.duplicates),
            too_old: n(&s.too_old),
            unmapped: n(&s.unmapped),
            socket_drops: n(&s.socket_drops),
            unroutable: n(&s.unroutable),
            not_loopback: n(&s.not_loopback),
            malformed: n(&s.malformed),
            ssrc_overflow: n(&s.ssrc_overflow),
            send_dropped: n(&s.send_dropped),
            send_errors: n(&s.send_errors),
        }
    });
    SubscriberFigures {
        engine: kind,
        decrypt_every: engine.map(|e| e.decrypt_every),
        lite,
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
        p.p50, p.p95, p.p99, p.max
    )
}

/// The video packet size, or each layer's (`MediaProfile.simulcast`: a quarter, half and all).
fn video_sizes(m: &MediaSummary) -> String {
    let b = m.video_packet_bytes;
    if m.video_simulcast {
        let min = switchboard::client::payload::PAYLOAD_HEADER_LEN;
        format!("{}/{}/{}", (b / 4).max(min), (b / 2).max(min), b)
    } else {
        b.to_string()
    }
}

/// Video packets the server forwarded by source layer: rate and share of each (layers above
/// the highest that forwarded anything left out, but a simulcast publisher's three shown).
fn layer_line(counts: &[u64], window_s: f64, simulcast: bool) -> String {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return "no video packets forwarded by layer reported by the server".into();
    }
    let rids = switchboard::client::SIMULCAST_RIDS;
    let shown = counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(0, |i| i + 1)
        .max(if simulcast { rids.len() } else { 0 })
        .min(counts.len());
    let layers: Vec<String> = counts[..shown]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let name = match rids.get(i).filter(|_| simulcast) {
                Some(rid) => format!("{i} ({rid})"),
                None => i.to_string(),
            };
            format!(
                "{name} {}/s ({:.1} %)",
                thousands(n as f64 / window_s.max(1e-6)),
                n as f64 * 100.0 / total as f64
            )
        })
        .collect();
    format!("video packets out by source layer: {}", layers.join(", "))
}

fn subscriber_line(s: &SubscriberFigures) -> String {
    match (&s.engine, &s.lite) {
        (SubscriberEngine::Lite, Some(l)) => format!(
            "lite (str0m, one thread, one socket on port {}; decrypts the first {} packets of each stream, then 1 in {}): {} of {} media packets decrypted, {} datagrams sent; thread CPU {:.2} cores in the window",
            l.port,
            lite::engine::FIRST_FEW,
            s.decrypt_every.unwrap_or(1),
            thousands(l.decrypted_packets as f64),
            thousands(l.media_packets as f64),
            thousands(l.datagrams_out as f64),
            l.thread_cpu_cores
        ),
        _ => "webrtc-rs clients (every packet decrypted)".to_string(),
    }
}

/// The readable report of one run.
pub fn print(o: &Outcome) {
    let shape = if o.subscribers_per_room == 0 {
        format!("{} publishing", o.publishers_per_room)
    } else {
        format!(
            "{} publishing + {} subscribing",
            o.publishers_per_room, o.subscribers_per_room
        )
    };
    println!(
        "== {} ({}): {} room(s) × {shape} = {} participants ({} joined)",
        o.label, o.mode, o.rooms, o.participants_planned, o.participants_joined
    );
    let rows: Vec<(&str, String)> = vec![
        ("machine", o.machine.clone()),
        ("subscribers", subscriber_line(&o.subscribers)),
        (
            "media",
            format!(
                "video {}{:.0} kbit/s ({} fps × {} packets of {} B, {}), audio {} packets/s of {} B{}",
                if o.media.video_simulcast {
                    "simulcast q/h/f, top layer "
                } else {
                    ""
                },
                o.media.video_kbps,
                o.media.video_fps,
                o.media.video_packets_per_frame,
                video_sizes(&o.media),
                if o.media.video_paced {
                    "paced"
                } else {
                    "back to back"
                },
                o.media.audio_packets_per_s,
                o.media.audio_packet_bytes,
                match &o.media.subscriber_tile {
                    Some(tile) => format!("; subscribers report {tile} tiles"),
                    None => String::new(),
                }
            ),
        ),
        (
            "window",
            format!(
                "{:.1} s after a {:.1} s ramp; load average {:.2} → {:.2}; machine busy {:.2} cores ({:.2} neither server nor generator), steal {:.1} %",
                o.window_s,
                o.ramp_s,
                o.loadavg_start[0],
                o.loadavg_end[0],
                o.machine_busy_cores,
                o.other_cores,
                o.steal_pct
            ),
        ),
        (
            "received",
            format!(
                "{} packets/s, {:.1} Mbit/s payload, {} streams",
                thousands(o.delivery.packets_per_s),
                o.delivery.payload_mbps,
                o.delivery.streams
            ),
        ),
        (
            "sent",
            format!(
                "{} packets/s by the publishers ({} configured)",
                thousands(o.delivery.sent_packets_per_s),
                thousands(o.delivery.configured_packets_per_s)
            ),
        ),
        (
            "loss",
            format!(
                "{:.3} % ({} of {} packets)",
                o.delivery.loss_pct,
                thousands(o.delivery.lost_packets as f64),
                thousands(o.delivery.expected_packets as f64)
            ),
        ),
        ("latency ms", pct(&o.latency_ms.all)),
        ("  audio", pct(&o.latency_ms.audio)),
        ("  video", pct(&o.latency_ms.video)),
        (
            "join ms",
            format!(
                "{}  ({} joins, {} at a time; socket open → first media packet)",
                pct(&o.join_ms.percentiles),
                o.join_ms.percentiles.count,
                o.join_ms.concurrency
            ),
        ),
        (
            "per client",
            format!(
                "{:.1} connection(s), uploads {:.0} kbit/s ({:.1} copies), downloads {:.0} kbit/s",
                o.per_client.connections,
                o.per_client.upload_kbps,
                o.per_client.upload_copies,
                o.per_client.download_kbps
            ),
        ),
        (
            "server",
            match o.server.pid {
                Some(pid) if o.server.packets_out_per_s == 0.0 => format!(
                    "pid {pid} (no forwarding counters): CPU {:.2} cores = {:.2} CPU-s per million packets received",
                    o.server.cpu_cores, o.server.cpu_s_per_million_received,
                ),
                Some(pid) => format!(
                    "pid {pid}: {} packets/s out, {} in, {} dropped, {} lost at its sockets; CPU {:.2} cores = {:.2} CPU-s per million packets out ({:.2} per million received); {} loop turns/s ({:.1} packets out per turn)",
                    thousands(o.server.packets_out_per_s),
                    thousands(o.server.packets_in_per_s),
                    o.server.packets_dropped,
                    o.server.socket_drops,
                    o.server.cpu_cores,
                    o.server.cpu_s_per_million_out,
                    o.server.cpu_s_per_million_received,
                    thousands(o.server.loop_turns_per_s),
                    o.server.packets_out_per_s / o.server.loop_turns_per_s.max(1e-9)
                ),
                None => format!(
                    "{} packets/s out, {} in (process unknown)",
                    thousands(o.server.packets_out_per_s),
                    thousands(o.server.packets_in_per_s)
                ),
            },
        ),
        (
            "by layer",
            layer_line(
                &o.server.video_packets_out_by_layer,
                o.window_s,
                o.media.video_simulcast,
            ),
        ),
        (
            "in server",
            match (o.server.in_server_p50_ms, o.server.in_server_p99_ms) {
                (Some(p50), Some(p99)) => format!(
                    "datagram in → copies sent: p50 ≤ {p50} ms, p99 ≤ {p99} ms (server histogram bucket bounds)"
                ),
                _ => "not reported by the server".to_string(),
            },
        ),
        (
            "server RSS",
            format!(
                "{:.1} MB idle → {:.1} MB = {:.0} KB per participant; {:.1} MB after everyone left",
                o.server.rss_baseline_mb,
                o.server.rss_mb,
                o.server.rss_per_participant_kb,
                o.server.rss_after_close_mb
            ),
        ),
        (
            "generator",
            format!(
                "CPU {:.2} cores of {} thread(s), {:.1} µs per received packet, RSS {:.0} MB{}",
                o.generator.cpu_cores,
                o.generator.threads,
                o.generator.cpu_us_per_received_packet,
                o.generator.rss_mb,
                if o.generator.saturated {
                    "  (SATURATED)"
                } else {
                    ""
                }
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<11} {v}");
    }
    for w in &o.warnings {
        println!("  warning     {w}");
    }
    println!();
}

/// The SFU-versus-mesh table: one row per room size.
pub fn print_mesh_table(rows: &[(usize, Outcome, Outcome)]) {
    println!(
        "SFU vs mesh, one all-to-all room of n (payload kbit/s per participant; loss %; latency p50 ms)"
    );
    println!(
        "{:>2} | {:>5} {:>8} {:>8} {:>7} {:>6} {:>6} | {:>5} {:>8} {:>8} {:>7} {:>6} {:>6} | {:>8} {:>8}",
        "n",
        "conns",
        "up",
        "down",
        "streams",
        "loss",
        "p50",
        "conns",
        "up",
        "down",
        "streams",
        "loss",
        "p50",
        "srv CPU",
        "gen CPU"
    );
    println!(
        "{:>2} | {:^44} | {:^44} | {:^17}",
        "", "SFU", "mesh", "SFU / mesh"
    );
    for (n, sfu, mesh) in rows {
        let side = |o: &Outcome| {
            format!(
                "{:>5.0} {:>8.0} {:>8.0} {:>7} {:>6.2} {:>6.2}",
                o.per_client.connections,
                o.per_client.upload_kbps,
                o.per_client.download_kbps,
                o.per_client.uploaded_streams,
                o.delivery.loss_pct,
                o.latency_ms.all.p50
            )
        };
        println!(
            "{n:>2} | {} | {} | {:>3.0}%/{:>3.0}% {:>3.0}%/{:>3.0}%",
            side(sfu),
            side(mesh),
            sfu.server.cpu_cores * 100.0,
            mesh.server.cpu_cores * 100.0,
            sfu.generator.cpu_cores * 100.0,
            mesh.generator.cpu_cores * 100.0
        );
    }
    println!(
        "conns: peer connections each participant holds; streams: media streams uploaded by the whole room (n × 2 for SFU, n·(n-1) × 2 for mesh)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::histogram::HistogramSnapshot;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn layer_counts_are_window_deltas() {
        let sample = |pairs: &[(&str, f64)]| ServerSample {
            metrics: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            process: None,
        };
        let series =
            |l: &str| format!("switchboard_video_packets_out_by_layer_total{{layer=\"{l}\"}}");
        let (l0, l2, bad) = (series("0"), series("2"), series("x"));
        let start = sample(&[(&l0, 100.0), (&bad, 5.0)]);
        let end = sample(&[(&l0, 350.0), (&l2, 40.0), (&bad, 9.0)]);
        let counts = by_layer(&start, &end, "video_packets_out_by_layer_total");
        assert_eq!(counts, vec![250, 0, 40]);
        assert!(by_layer(&start, &sample(&[]), "video_packets_out_by_layer_total").is_empty());
        let line = layer_line(&counts, 10.0, true);
        assert!(line.contains("0 (q) 25/s (86.2 %)"), "{line}");
        assert!(line.contains("2 (f) 4/s (13.8 %)"), "{line}");
        assert!(layer_line(&[30, 0, 0, 0], 10.0, false).ends_with(": 0 3/s (100.0 %)"));
        let line = layer_line(&[30, 0, 0, 0], 10.0, true);
        assert!(line.ends_with(", 2 (f) 0/s (0.0 %)"), "{line}");
    }

    #[test]
    fn empty_percentiles_print_a_dash() {
        assert_eq!(pct(&HistogramSnapshot::default().percentiles(1.0)), "-");
    }
}
