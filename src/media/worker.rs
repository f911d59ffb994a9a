//! One media worker: a thread with its own UDP socket and event loop.
//!
//! Owns every connection that lives on it, the demux map to them, and the forwarders of the
//! tracks published or subscribed here. One loop turn: wait for a datagram batch, a command, a
//! relayed batch or a timer; handle what came (each datagram goes to its connection, whose
//! outputs are drained at once: media to `forward`, events to sessions); after each received
//! batch, drive the connections written to, send everything with `sendmmsg` and hand relayed
//! packets to other workers in one bounded batch each. No locks and no awaits on the packet
//! path; every queue is bounded and counts what it drops. Every 500 ms (and on a subscriber's
//! report) it chooses each subscriber's simulcast layers from its connection's bandwidth
//! estimate (`forward::allocate`), works out dynacast for the tracks published here, and tells
//! publishers' sessions how loud they speak.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use str0m::bwe::{Bitrate, BweKind};
use str0m::config::DtlsCert;
use str0m::media::{KeyframeRequestKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{
    RtpPacket, RtpWrite, Ssrc, StreamTxQueueInfo, Vp8Descriptor, Vp8Patch, Vp8PatchError,
};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tokio::sync::{mpsc, oneshot};

use super::codec::{kind_of, payload_type_for, track_codec};
use super::conn::{Conn, Inbound, Layers, LiveDownTrack, OutState, layer_of, layers_of};
use super::demux::{ConnId, Demux, is_stun};
use super::keepalive;
use super::udp;
use super::{
    IncomingTrack, IncomingTrackId, MediaError, MediaEvent, OfferOutcome, PauseCause, Subscribing,
    Subscription,
};
use crate::forward::{
    Delivery, Demand, Dynacast, KeyframeThrottle, LayerView, MediaPacket, Rewriter, SpeechMeter,
    TrackForwarder, TrackKey, Visibility, Vp8Ids, allocate, red_primary_offset,
};
use crate::metrics::{GaugeGuard, LayerLabel, Metrics, WorkerLabel};
use crate::types::{MediaKind, ParticipantId, random_token};

/// Relayed batches queued per worker before new ones are dropped.
pub const RELAY_QUEUE_BATCHES: usize = 256;
/// Packets in one relayed batch; a full batch is sent at once.
const RELAY_BATCH: usize = 256;
/// Socket batches read per loop turn (each batch's output is sent before the next is read);
/// then timers and commands get their turn.
const RECV_BATCHES_PER_TURN: usize = 4;
/// Bytes a participant's chat data channel may hold unsent before lines are dropped.
const CHAT_BUFFER_LIMIT: usize = 256 * 1024;
/// RTP packets kept per outgoing video stream to answer NACKs: about 0.8 s of 1.2 Mbit/s video,
/// several round trips. The payloads are shared with the other subscribers; the bookkeeping
/// measured about 7 KB per video subscriber (heaptrack).
pub(super) const RTX_CACHE_VIDEO: usize = 128;
/// How often the load figure is refreshed.
const LOAD_WINDOW: Duration = Duration::from_secs(1);
/// Below this downlink estimate, RED audio goes to a subscriber as its primary block only.
const RED_MIN_DOWNLINK: u64 = 600_000;
/// How often every subscriber's layers are chosen again (estimates, tile sizes and what
/// publishers send change meanwhile).
const ALLOCATION_INTERVAL: Duration = Duration::from_millis(500);
/// An estimate unchanged this long while a video is held below its needed layer has stalled.
const ESTIMATE_STALL: Duration = Duration::from_secs(8);
/// At most one restart of a connection's estimator this often (a restart probes).
const ESTIMATOR_RESTART_EVERY: Duration = Duration::from_secs(30);
/// A socket holding more than 1/BACKLOG_SHARE of its receive buffer unread when the load is
/// measured counts as backlogged.
const BACKLOG_SHARE: u64 = 4;

/// A downtrack's target: the subscriber's connection and the SSRC of its send stream.
type SubKey = (ConnId, Ssrc);
pub type RelayBatch = Vec<(TrackKey, MediaPacket)>;

/// What a worker shares with the plane and with the other workers.
#[derive(Debug)]
pub struct WorkerShared {
    pub commands: mpsc::UnboundedSender<Command>,
    pub relay: mpsc::Sender<RelayBatch>,
    /// Busy share of the last second, per mille.
    pub load_permille: AtomicU32,
    pub connections: AtomicUsize,
    /// `connections` when `load_permille` was measured: admission scales the load by the
    /// connections opened since.
    pub load_connections: AtomicUsize,
    /// In the last load window the socket dropped datagrams or held a backlog: the worker does
    /// not keep up, whatever its busy share says.
    pub backlogged: AtomicBool,
    /// Addresses announced in this worker's ICE candidates.
    pub addrs: Vec<SocketAddr>,
}

/// Below this many connections the load figure is too coarse to scale per connection.
const PROJECTION_MIN_CONNECTIONS: usize = 8;

impl WorkerShared {
    pub fn new(
        commands: mpsc::UnboundedSender<Command>,
        relay: mpsc::Sender<RelayBatch>,
        addrs: Vec<SocketAddr>,
    ) -> Self {
        WorkerShared {
            commands,
            relay,
            load_permille: AtomicU32::new(0),
            connections: AtomicUsize::new(0),
            load_connections: AtomicUsize::new(0),
            backlogged: AtomicBool::new(false),
            addrs,
        }
    }

    /// The worker's busy share, per mille, as admission sees it: the last second's figure
    /// scaled by the connections opened since (a new one costs about what the average one did,
    /// so a burst of joins counts before its media arrives), or full while its socket falls
    /// behind.
    pub fn projected_load(&self) -> u32 {
        if self.backlogged.load(Ordering::Relaxed) {
            return 1000;
        }
        let load = self.load_permille.load(Ordering::Relaxed);
        let then = self.load_connections.load(Ordering::Relaxed);
        let now = self.connections.load(Ordering::Relaxed);
        if then < PROJECTION_MIN_CONNECTIONS || now <= then {
            return load;
        }
        (u64::from(load) * now as u64 / then as u64).min(1000) as u32
    }
}

#[derive(Debug)]
pub enum Command {
    Open {
        conn: ConnId,
        participant: ParticipantId,
        subscribing: Subscribing,
        events: mpsc::UnboundedSender<MediaEvent>,
        chat_in: mpsc::Sender<String>,
    },
    RemoteOffer {
        conn: ConnId,
        sdp: String,
        reply: oneshot::Sender<Result<OfferOutcome, MediaError>>,
    },
    RemoteAnswer {
        conn: ConnId,
        sdp: String,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    RemoteCandidate {
        conn: ConnId,
        candidate: String,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    OfferIfNeeded {
        conn: ConnId,
        reply: oneshot::Sender<Option<String>>,
    },
    Subscribe {
        conn: ConnId,
        sub: Subscription,
    },
    Unsubscribe {
        conn: ConnId,
        key: TrackKey,
    },
    TrackSettings {
        conn: ConnId,
        key: TrackKey,
        visibility: Visibility,
    },
    Prioritize {
        conn: ConnId,
        keys: Vec<TrackKey>,
    },
    Publish {
        conn: ConnId,
        mid: Mid,
        key: TrackKey,
    },
    Chat {
        conn: ConnId,
        line: Arc<str>,
    },
    Close {
        conn: ConnId,
    },
    /// From another worker: it has subscribers of this track now / no longer.
    AttachRelay {
        key: TrackKey,
        worker: usize,
    },
    DetachRelay {
        key: TrackKey,
        worker: usize,
    },
    /// From another worker: subscribers there want keyframes of these layers (bit i: layer i).
    KeyframeRequest {
        key: TrackKey,
        worker: usize,
        layers: u32,
    },
    /// From another worker: the layers its subscribers of this track receive (dynacast).
    RelayWants {
        key: TrackKey,
        worker: usize,
        layers: u32,
    },
    /// An administrator muted (or unmuted) a track published on this worker.
    MuteTrack {
        key: TrackKey,
        muted: bool,
    },
    /// From the publisher's worker: the track's layers as the publisher sends them, for the
    /// relay-fed copy to choose from (it receives only the layers its downtracks take).
    LayerViews {
        key: TrackKey,
        views: Arc<[LayerView]>,
    },
    Shutdown,
}

/// One DTLS certificate for every connection: generating a key pair per connection would cost
/// milliseconds of each join.
pub fn dtls_certificate() -> Result<DtlsCert, MediaError> {
    str0m::crypto::from_feature_flags()
        .dtls_provider
        .generate_certificate()
        .ok_or_else(|| MediaError::Io(std::io::Error::other("cannot generate a DTLS certificate")))
}

/// The engine configuration every connection starts from: ICE-lite, RTP mode, the shared DTLS
/// certificate, and bandwidth estimation from `start_bitrate_kbps` (0: off).
pub fn rtc_config(dtls_cert: DtlsCert, start_bitrate_kbps: u64) -> RtcConfig {
    Rtc::builder()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .set_dtls_cert(dtls_cert)
        .set_send_buffer_video(RTX_CACHE_VIDEO)
        // Opus with RED (RFC 2198) where the client takes it; RED is forwarded as it comes.
        .enable_opus(true, true)
        .enable_bwe((start_bitrate_kbps > 0).then(|| Bitrate::kbps(start_bitrate_kbps)))
}

/// How long a subscriber's video may wait in the engine's pacer before more of it is dropped
/// instead of queued. The pacer sends at about the downlink estimate; the queue only grows when
/// more is forwarded than the estimate allows, until the next layer choice (every 500 ms) fits
/// the videos to it. str0m's own limit is 2 s, which is 2 s of added latency.
const PACER_QUEUE_LIMIT: Duration = Duration::from_millis(500);

/// How long the oldest packet of a stream's pacer queue had waited when the pacer last looked.
fn pacer_backlog(info: Option<&dyn StreamTxQueueInfo>) -> Duration {
    info.and_then(|q| {
        q.first_unsent()
            .map(|first| q.created_at().saturating_duration_since(first))
    })
    .unwrap_or_default()
}

/// How long a connection whose ICE went disconnected waits for the client to come back (an
/// ICE restart from its new network) before it is given up.
const ICE_RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// What woke the event loop.
enum Wake {
    Command(Option<Command>),
    Relayed(Option<RelayBatch>),
    Readable(std::io::Result<()>),
    Timer,
}

/// A track's fan-out on this worker, and where its packets come from.
struct Forwarder {
    fwd: TrackForwarder<SubKey>,
    source: Source,
}

enum Source {
    /// Published by a connection on this worker.
    Local {
        conn: ConnId,
        mid: Mid,
        /// Its rids, to ask for a layer's keyframe.
        layers: Layers,
        dynacast: Dynacast,
        /// Audio: who speaks, and the loudness last told to the session.
        speech: Option<(SpeechMeter, f32)>,
        /// Muted by an administrator: its packets are dropped on arrival.
        muted: bool,
        _gauge: GaugeGuard,
    },
    /// Relayed from the publisher's worker.
    Relayed {
        worker: usize,
        /// The layers last reported wanted to the publisher's worker.
        reported: u32,
    },
}

/// Simulcast layers counted apart in the per-layer metrics.
const COUNTED_LAYERS: usize = 4;

/// A worker's own series of the per-worker metrics, and the per-layer ones, looked up once.
struct WorkerSeries {
    connections: Gauge,
    load: Gauge<f64, AtomicU64>,
    receive_drops: Counter,
    out_by_layer: [Counter; COUNTED_LAYERS],
}

impl WorkerSeries {
    fn new(metrics: &Metrics, index: usize) -> Self {
        let label = WorkerLabel {
            worker: index as u32,
        };
        WorkerSeries {
            connections: metrics.worker_connections.get_or_create(&label).clone(),
            load: metrics.worker_load_ratio.get_or_create(&label).clone(),
            receive_drops: metrics.worker_receive_drops.get_or_create(&label).clone(),
            out_by_layer: std::array::from_fn(|layer| {
                metrics
                    .packets_out_by_layer
                    .get_or_create(&LayerLabel {
                        layer: layer as u32,
                    })
                    .clone()
            }),
        }
    }
}

/// Counters kept per loop turn and added to the shared metrics once per turn.
#[derive(Default)]
struct Tally {
    packets_in: u64,
    packets_out: u64,
    red_in: u64,
    red_out: u64,
    packets_dropped: u64,
    packets_dropped_pacer: u64,
    packets_muted: u64,
    relay_skipped: u64,
    unroutable: u64,
    keepalive_indications: u64,
    estimator_restarts: u64,
    keyframe_requests: u64,
    turns: u64,
    video_out_by_layer: [u64; COUNTED_LAYERS],
}

pub struct Worker {
    index: usize,
    socket: std::net::UdpSocket,
    /// Taken out while its datagrams are handled.
    receiver: Option<udp::Receiver>,
    sender: udp::Sender,
    rtc_config: RtcConfig,
    conns: HashMap<ConnId, Conn>,
    demux: Demux,
    forwarders: HashMap<TrackKey, Forwarder>,
    workers: Arc<[WorkerShared]>,
    commands: mpsc::UnboundedReceiver<Command>,
    relay_in: mpsc::Receiver<RelayBatch>,
    relay_out: Vec<RelayBatch>,
    timers: BinaryHeap<Reverse<(Instant, ConnId)>>,
    dirty: Vec<ConnId>,
    deliveries: Vec<Delivery<SubKey>>,
    /// Receive times of the packets forwarded this turn, for the in-server latency histogram.
    forwarded_at: Vec<Instant>,
    metrics: Arc<Metrics>,
    /// This worker's series in the per-worker metric families.
    exported: WorkerSeries,
    /// The kernel's drop count at the socket when the load was last measured.
    receive_drops: u32,
    tally: Tally,
    busy: Duration,
    window_start: Instant,
    next_allocation: Instant,
    stop: bool,
}

impl Worker {
    pub fn new(
        index: usize,
        socket: std::net::UdpSocket,
        workers: Arc<[WorkerShared]>,
        commands: mpsc::UnboundedReceiver<Command>,
        relay_in: mpsc::Receiver<RelayBatch>,
        rtc_config: RtcConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, MediaError> {
        let count = workers.len();
        Ok(Worker {
            index,
            receiver: Some(udp::Receiver::new(&socket)?),
            socket,
            sender: udp::Sender::default(),
            rtc_config,
            conns: HashMap::new(),
            demux: Demux::default(),
            forwarders: HashMap::new(),
            workers,
            commands,
            relay_in,
            relay_out: (0..count).map(|_| Vec::new()).collect(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            deliveries: Vec::new(),
            forwarded_at: Vec::new(),
            exported: WorkerSeries::new(&metrics, index),
            receive_drops: 0,
            metrics,
            tally: Tally::default(),
            busy: Duration::ZERO,
            window_start: Instant::now(),
            next_allocation: Instant::now(),
            stop: false,
        })
    }

    /// Runs the event loop until shutdown.
    pub fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(
                    worker = self.index,
                    "cannot start the worker's runtime: {e}"
                );
                return;
            }
        };
        runtime.block_on(self.event_loop());
    }

    async fn event_loop(mut self) {
        let socket = match self
            .socket
            .try_clone()
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(worker = self.index, "cannot register the media socket: {e}");
                return;
            }
        };
        while !self.stop {
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                biased;
                command = self.commands.recv() => Wake::Command(command),
                batch = self.relay_in.recv() => Wake::Relayed(batch),
                ready = socket.readable() => Wake::Readable(ready),
                _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
            };
            let woke = Instant::now();
            let woken_by_socket = matches!(wake, Wake::Readable(Ok(())));
            match wake {
                Wake::Command(Some(command)) => self.on_command(command),
                // The plane is gone: nobody can reach this worker any more.
                Wake::Command(None) => break,
                Wake::Relayed(Some(batch)) => {
                    for (key, packet) in batch {
                        self.deliver(key, &packet);
                    }
                }
                Wake::Relayed(None) | Wake::Timer | Wake::Readable(Ok(())) => {}
                Wake::Readable(Err(e)) => {
                    tracing::error!(worker = self.index, "media socket: {e}");
                    break;
                }
            }
            // Every turn reads what the socket holds: commands and relayed batches win the
            // select, and a steady stream of them, such as a burst of joins, must not starve the
            // socket and every connection's ICE and DTLS with it.
            self.read_socket(&socket, woken_by_socket);
            self.finish_turn(woke);
        }
        // Closing: every session has gone; let connections go quietly.
        self.conns.clear();
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut deadline = (self.window_start + LOAD_WINDOW).min(self.next_allocation);
        if let Some(Reverse((t, _))) = self.timers.peek() {
            deadline = deadline.min(*t);
        }
        for f in self.forwarders.values() {
            if let Some(due) = f.fwd.keyframe_request_due(now) {
                deadline = deadline.min(due);
            }
        }
        deadline
    }

    /// Reads up to a few batches of datagrams, handing each to its connection. `woken`: the
    /// socket woke the loop, so its readiness goes through tokio (which learns when it is
    /// drained); otherwise the socket is asked directly, since tokio's view of it is only
    /// refreshed when the loop yields, which a steady stream of commands can put off for a
    /// hundred of them.
    fn read_socket(&mut self, socket: &tokio::net::UdpSocket, woken: bool) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        for _ in 0..RECV_BATCHES_PER_TURN {
            let read = if woken {
                socket.try_io(tokio::io::Interest::READABLE, || {
                    receiver.recv(&self.socket)
                })
            } else {
                receiver.recv(&self.socket)
            };
            match read {
                Ok(n) => {
                    let received = Instant::now();
                    for (from, dst, datagram) in receiver.datagrams(n) {
                        self.on_datagram(from, dst, datagram, received);
                    }
                    // Send this batch's copies before reading the next: a packet waits for the
                    // fan-out of its own batch, not of everything that queued up meanwhile.
                    self.send_written(Instant::now());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(worker = self.index, "recv: {e}");
                    break;
                }
            }
        }
        self.receiver = Some(receiver);
    }

    fn on_datagram(
        &mut self,
        from: SocketAddr,
        dst: Option<std::net::IpAddr>,
        datagram: &[u8],
        now: Instant,
    ) {
        let Some(id) = self.demux.route(from, datagram) else {
            self.tally.unroutable += 1;
            return;
        };
        // str0m matches the destination against the candidates it announced: with 1:1 NAT
        // that is the public address, not the one the datagram really reached.
        let announced = &self.workers[self.index].addrs;
        let destination = match dst {
            Some(ip) => announced.iter().find(|a| a.ip() == ip),
            None => None,
        }
        .or(announced.first())
        .copied()
        .unwrap_or(from);
        let Some(conn) = self.conns.get_mut(&id) else {
            self.tally.unroutable += 1;
            return;
        };
        // A keepalive the engine would ignore, from the client's validated address: it counts
        // as the Binding request the engine needs to keep the pair (`keepalive`).
        let liveness = if keepalive::is_binding_indication(datagram)
            && let Some(remote) = &conn.remote_ufrag
        {
            let local = conn.rtc.direct_api().local_ice_credentials();
            keepalive::liveness_request(&local, remote)
        } else {
            None
        };
        let datagram = match &liveness {
            Some((request, transaction)) => {
                conn.liveness_transaction = Some(*transaction);
                self.tally.keepalive_indications += 1;
                request.as_slice()
            }
            None => datagram,
        };
        let receive = match Receive::new(Protocol::Udp, from, destination, datagram) {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(conn = id, "unparseable datagram: {e}");
                self.tally.unroutable += 1;
                return;
            }
        };
        if let Err(e) = conn.rtc.handle_input(Input::Receive(now, receive)) {
            tracing::debug!(participant = %conn.participant, "input refused: {e}");
        }
        // Drain at once: in RTP mode str0m holds one received packet at a time.
        self.drive(id, now);
    }

    /// Polls a connection until it has nothing more to say, acting on what it says.
    fn drive(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            if !conn.rtc.is_alive() {
                self.fail(id, "the connection closed");
                return;
            }
            match conn.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    if is_stun(&t.contents) {
                        if conn.liveness_transaction.is_some()
                            && keepalive::transaction_id(&t.contents) == conn.liveness_transaction
                        {
                            // The answer to a request the client never sent.
                            conn.liveness_transaction = None;
                            continue;
                        }
                        self.demux.bind_addr(t.destination, id);
                    }
                    self.sender.push(t.destination, t.contents.into());
                    if self.sender.len() >= udp::SEND_BATCH {
                        self.flush_socket();
                    }
                }
                Ok(Output::Timeout(t)) => {
                    if conn.scheduled.is_none_or(|s| t < s) {
                        conn.scheduled = Some(t);
                        self.timers.push(Reverse((t, id)));
                    }
                    return;
                }
                Ok(Output::Event(event)) => self.on_event(id, event, now),
                Err(e) => {
                    tracing::info!(conn = id, "connection error: {e}");
                    self.fail(id, &e.to_string());
                    return;
                }
            }
        }
    }

    fn fail(&mut self, id: ConnId, why: &str) {
        if let Some(conn) = self.conns.get_mut(&id)
            && !conn.failed
        {
            conn.failed = true;
            conn.rtc.disconnect();
            conn.emit(MediaEvent::Failed(why.to_string()));
        }
    }

    /// Gives up the connections whose ICE has been disconnected for [`ICE_RECONNECT_GRACE`].
    fn fail_lost_connections(&mut self, now: Instant) {
        let lost: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.ice_lost_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= ICE_RECONNECT_GRACE)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.fail(id, "ICE disconnected");
        }
    }

    fn on_event(&mut self, id: ConnId, event: Event, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        match event {
            Event::Connected => {
                conn.connected = true;
                conn.emit(MediaEvent::Connected);
                self.start_subscriptions(id);
            }
            // Lost: the client may come back (an ICE restart after its network changed), so
            // the connection waits before it is given up (`fail_lost_connections`).
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                tracing::info!(participant = %conn.participant, "ICE disconnected; waiting for the client to restart ICE");
                conn.ice_lost_since.get_or_insert(now);
            }
            Event::IceConnectionStateChange(_) => conn.ice_lost_since = None,
            Event::Closed if !conn.failed => {
                conn.failed = true;
                conn.emit(MediaEvent::ClosedByPeer);
            }
            Event::MediaAdded(added) if added.direction.is_receiving() => {
                conn.inbound
                    .insert(added.mid, Inbound::AwaitingFirstPacket(kind_of(added.kind)));
            }
            Event::MediaChanged(changed) => {
                let known = conn.inbound.contains_key(&changed.mid);
                if changed.direction.is_receiving() && !known {
                    // A client track put on an m-line the server sends on (a plain addTrack).
                    if let Some(media) = conn.rtc.media(changed.mid) {
                        let kind = kind_of(media.kind());
                        conn.inbound
                            .insert(changed.mid, Inbound::AwaitingFirstPacket(kind));
                    }
                } else if !changed.direction.is_receiving() && known {
                    self.end_inbound(id, changed.mid);
                }
            }
            Event::RtpPacket(packet) => self.on_rtp(id, packet, now),
            Event::KeyframeRequest(request) => {
                if let Some(out) = conn.outbound_on(request.mid)
                    && let Some(live) = &out.live
                    && let Some(f) = self.forwarders.get_mut(&out.sub.route.key)
                {
                    f.fwd.request_keyframe_for((id, live.ssrc));
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc {
                estimate,
                can_probe,
            }) => {
                tracing::debug!(participant = %conn.participant, %estimate, can_probe, "downlink estimate");
                if conn.twcc == Some(true) {
                    conn.estimate = Some(estimate.as_u64());
                    conn.estimate_changed_at = Some(now);
                }
            }
            Event::ChannelOpen(channel, label) => {
                if label == "chat" {
                    conn.chat = Some(channel);
                } else {
                    tracing::debug!(label, "ignoring data channel");
                }
            }
            Event::ChannelData(data) => {
                if Some(data.id) != conn.chat || data.binary {
                    return;
                }
                match String::from_utf8(data.data) {
                    Ok(text) => {
                        if conn.chat_in.try_send(text).is_err() {
                            tracing::debug!(participant = %conn.participant, "chat line dropped: session behind");
                        }
                    }
                    Err(_) => {
                        tracing::debug!(participant = %conn.participant, "non-UTF-8 chat ignored")
                    }
                }
            }
            Event::ChannelClose(channel) if conn.chat == Some(channel) => {
                conn.chat = None;
            }
            _ => {}
        }
    }

    fn on_rtp(&mut self, id: ConnId, packet: RtpPacket, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Some((mid, rid)) = conn
            .rtc
            .direct_api()
            .stream_rx(&packet.header.ssrc)
            .map(|s| (s.mid(), s.rid()))
        else {
            return;
        };
        let (key, layer, red) = match conn.inbound.get_mut(&mid) {
            Some(Inbound::Published(key, layers, red)) => match layer_of(layers, rid) {
                Some(layer) => (*key, layer, *red == Some(*packet.header.payload_type)),
                None => return,
            },
            Some(Inbound::AwaitingFirstPacket(kind)) => {
                // The codec is whatever the first packet's payload type names.
                let kind = *kind;
                let pt = packet.header.payload_type;
                // A RED packet names its codec by the RED payload type paired with it.
                let Some(params) = conn
                    .rtc
                    .codec_config()
                    .find(|p| p.pt() == pt || p.red() == Some(pt))
                    .copied()
                else {
                    return;
                };
                let red = params.red().map(|pt| *pt);
                tracing::debug!(participant = %conn.participant, codec = %params.spec().codec, pt = *pt, ?red, "first packet of a track");
                let codec = track_codec(kind, &params);
                let (stream_id, layers) = conn.rtc.media(mid).map_or_else(
                    || (String::new(), Layers::from([])),
                    |m| (m.stream_id().to_string(), layers_of(m.rids_rx())),
                );
                conn.emit(MediaEvent::TrackAdded(IncomingTrack {
                    id: IncomingTrackId(mid),
                    kind,
                    codec: codec.clone(),
                    stream_id,
                    layers: layers.iter().map(|r| r.to_string()).collect(),
                }));
                conn.inbound
                    .insert(mid, Inbound::Announced(codec, layers, red));
                return;
            }
            Some(Inbound::Announced(..)) | None => return,
        };
        let mut media = MediaPacket::received(
            *packet.seq_no,
            packet.header.timestamp,
            packet.header.marker,
            layer,
            packet.payload,
            now,
        );
        media.red = red;
        let Some(f) = self.forwarders.get_mut(&key) else {
            return;
        };
        self.tally.packets_in += 1;
        self.tally.red_in += u64::from(red);
        if let Source::Local { muted: true, .. } = f.source {
            self.tally.packets_muted += 1;
            return;
        }
        if let (
            Source::Local {
                speech: Some((meter, _)),
                ..
            },
            Some(level),
        ) = (&mut f.source, packet.header.ext_vals.audio_level)
        {
            meter.observe(level, now);
        }
        if !f.fwd.ingest(&mut media) {
            return;
        }
        // A layer no downtrack on a relay's worker takes stays here.
        let mut relayed = 0;
        for w in f.fwd.relays_taking(media.layer) {
            relayed += 1;
            let batch = &mut self.relay_out[w];
            if batch.len() >= RELAY_BATCH {
                send_relay(&self.workers[w], batch, &mut self.tally);
            }
            batch.push((key, media.clone()));
        }
        self.tally.relay_skipped += (f.fwd.relay_count() - relayed) as u64;
        self.deliver(key, &media);
    }

    /// Writes a packet to every local subscriber of its track.
    fn deliver(&mut self, key: TrackKey, packet: &MediaPacket) {
        let Some(f) = self.forwarders.get_mut(&key) else {
            return;
        };
        f.fwd.forward(packet, &mut self.deliveries);
        if self.deliveries.is_empty() {
            return;
        }
        let nackable = f.fwd.is_video();
        self.forwarded_at.push(packet.received_at);
        // A RED packet's primary block, cut out once for every subscriber without RED.
        let primary: Option<Arc<[u8]>> =
            if packet.red && self.deliveries.iter().any(|d| d.header.primary_only) {
                red_primary_offset(&packet.payload).map(|at| Arc::from(&packet.payload[at..]))
            } else {
                None
            };
        // Parsed once for every subscriber whose picture ids are rewritten.
        let vp8 = if self.deliveries.iter().any(|d| d.header.vp8.is_some()) {
            Vp8Descriptor::parse(&packet.payload).ok()
        } else {
            None
        };
        for d in &self.deliveries {
            let (conn_id, ssrc) = d.to;
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                continue;
            };
            if conn.failed {
                continue; // its session is closing it; nothing would drain what is written
            }
            let mut api = conn.rtc.direct_api();
            let Some(stream) = api.stream_tx(&ssrc) else {
                self.tally.packets_dropped += 1;
                continue;
            };
            if nackable && pacer_backlog(stream.queue_info()) > PACER_QUEUE_LIMIT {
                self.tally.packets_dropped_pacer += 1;
                continue;
            }
            let payload = if d.header.primary_only {
                let Some(primary) = &primary else {
                    self.tally.packets_dropped += 1; // RED that does not parse
                    continue;
                };
                primary.clone()
            } else {
                packet.payload.clone()
            };
            let mut write = RtpWrite::new(
                d.header.payload_type.into(),
                d.header.seq.into(),
                d.header.timestamp,
                packet.received_at,
                payload,
            )
            .marker(d.marker)
            .nackable(nackable);
            if let (Some(desc), Some(ids)) = (&vp8, d.header.vp8)
                && let Some(patch) = vp8_patch(desc, ids)
            {
                write = write.vp8_patch(patch);
            }
            stream.write_rtp(write);
            self.tally.packets_out += 1;
            self.tally.red_out += u64::from(packet.red && !d.header.primary_only);
            if nackable {
                self.tally.video_out_by_layer[usize::from(packet.layer).min(COUNTED_LAYERS - 1)] +=
                    1;
            }
            mark_dirty(&mut self.dirty, conn_id, conn);
        }
    }

    /// Sends the keyframe requests that are due: to local publishers as PLI on the layer's
    /// stream, to other workers as a command (their source forwarder throttles again).
    fn send_keyframe_requests(&mut self, now: Instant) {
        for (key, f) in &mut self.forwarders {
            let due = f.fwd.poll_keyframe_requests(now);
            if due == 0 {
                continue;
            }
            match &f.source {
                Source::Local {
                    conn, mid, layers, ..
                } => {
                    let Some(c) = self.conns.get_mut(conn) else {
                        continue;
                    };
                    let mut api = c.rtc.direct_api();
                    for layer in 0..layers.len().max(1) {
                        if due & 1 << layer == 0 {
                            continue;
                        }
                        if let Some(rx) = api.stream_rx_by_mid(*mid, layers.get(layer).copied()) {
                            rx.request_keyframe(KeyframeRequestKind::Pli);
                            self.tally.keyframe_requests += 1;
                        }
                    }
                    // Sent with everything else written this turn.
                    mark_dirty(&mut self.dirty, *conn, c);
                }
                Source::Relayed { worker, .. } => {
                    let _ = self.workers[*worker]
                        .commands
                        .send(Command::KeyframeRequest {
                            key: *key,
                            worker: self.index,
                            layers: due,
                        });
                }
            }
        }
    }

    /// Starts forwarding to every open subscription of a connected connection.
    fn start_subscriptions(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.connected {
            return;
        }
        let mut started = Vec::new();
        for out in &mut conn.outbound {
            let OutState::Open(mid) = out.state else {
                continue;
            };
            if out.live.is_some() {
                continue;
            }
            let red_accepted = conn.red_accepted.contains(&mid);
            let Some((pt, red)) =
                payload_type_for(&conn.rtc, mid, out.sub.kind, &out.sub.codec, red_accepted)
            else {
                tracing::warn!(participant = %conn.participant, codec = %out.sub.codec.mime_type, "subscriber did not accept the codec");
                continue;
            };
            let Some(ssrc) = conn
                .rtc
                .direct_api()
                .stream_tx_by_mid(mid, None)
                .map(|s| s.ssrc())
            else {
                tracing::warn!(participant = %conn.participant, "negotiated m-line without a send stream");
                continue;
            };
            tracing::debug!(participant = %conn.participant, track = %out.sub.track_id, %mid, pt, ?red, "downtrack starts");
            out.live = Some(LiveDownTrack::new(ssrc, &self.metrics));
            let parked = conn.parked_rewriters.remove(&ssrc);
            started.push((ssrc, pt, red, out.sub.clone(), parked));
        }
        let any_started = !started.is_empty();
        for (ssrc, pt, red, sub, parked) in started {
            let route = sub.route;
            // A send stream that carried another track goes on in its sequence space: the
            // subscriber's SRTP rollover counter follows it.
            let rewriter = match parked {
                Some(parked) => parked.continue_with(pt, sub.codec.clock_rate, red),
                None => Rewriter::new(
                    pt,
                    sub.codec.clock_rate,
                    rand::random::<u16>() >> 1,
                    rand::random(),
                )
                .with_red(red),
            };
            let forwarder = match self.forwarders.entry(route.key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    if route.worker == self.index {
                        // The publisher left already; its unpublish will reach the session.
                        continue;
                    }
                    let _ = self.workers[route.worker]
                        .commands
                        .send(Command::AttachRelay {
                            key: route.key,
                            worker: self.index,
                        });
                    e.insert(Forwarder {
                        fwd: TrackForwarder::new(
                            &sub.codec.mime_type,
                            sub.layer_count(),
                            KeyframeThrottle::DEFAULT_INTERVAL,
                        ),
                        source: Source::Relayed {
                            worker: route.worker,
                            // What the source assumes until told: every layer.
                            reported: u32::MAX,
                        },
                    })
                }
            };
            // Video waits paused for its first layer choice, just below.
            let layer = (sub.kind == MediaKind::Audio).then_some(0);
            forwarder.fwd.add_downtrack((id, ssrc), rewriter, layer);
            // A relay-fed forwarder asks the source on its next poll.
        }
        if any_started {
            self.allocate_layers(id, Instant::now());
        }
    }

    /// Chooses the layer of every video this connection receives (see [`allocate`]), and tells
    /// the engine's bandwidth estimator what full quality would take, so it probes for it.
    fn allocate_layers(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        // Redundant audio doubles what audio costs: a narrow downlink gets the primary only.
        let red_on = conn.estimate.is_none_or(|e| e >= RED_MIN_DOWNLINK);
        let mut audio = 0;
        let mut videos: Vec<(usize, Vec<LayerView>)> = Vec::new();
        for (i, out) in conn.outbound.iter().enumerate() {
            let Some(live) = &out.live else { continue };
            let Some(f) = self.forwarders.get_mut(&out.sub.route.key) else {
                continue;
            };
            if f.fwd.is_video() {
                videos.push((i, f.fwd.layer_views(now)));
            } else {
                f.fwd.set_red((id, live.ssrc), red_on);
                audio += f.fwd.audio_bitrate(red_on);
            }
        }
        if videos.is_empty() {
            return;
        }
        let mut demands: Vec<Demand<'_>> = Vec::with_capacity(videos.len());
        let mut outs = conn.outbound.iter_mut().enumerate();
        for (i, layers) in &videos {
            let Some((_, out)) = outs.find(|(j, _)| j == i) else {
                break;
            };
            demands.push(Demand {
                layers,
                priority: out.priority(),
                choice: &mut out.choice,
            });
        }
        let desired = audio + allocate(conn.estimate, audio, &mut demands, now);
        // Below the layer its tile needs (paused counts: None is below any layer).
        let limited = demands.iter().any(|d| d.choice.layer < d.choice.needed);
        drop(demands);
        conn.rtc
            .bwe()
            .set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
        // str0m's estimator can stall for good after a congested spell: application-limited
        // on a low layer, and still counting the old losses, it neither grows nor probes
        // (seen: a 400 kbit/s cap lifted, the estimate frozen at 428 kbit/s for 40 s, 1 run in
        // 7). A video held below what its tile needs by an estimate that has not moved for
        // ESTIMATE_STALL restarts the estimator from its last value: a fresh one probes.
        if limited
            && let Some(estimate) = conn.estimate
            && conn
                .estimate_changed_at
                .is_some_and(|t| now.saturating_duration_since(t) >= ESTIMATE_STALL)
            && conn
                .estimator_restarted_at
                .is_none_or(|t| now.saturating_duration_since(t) >= ESTIMATOR_RESTART_EVERY)
        {
            tracing::debug!(participant = %conn.participant, estimate, "estimate stalled: estimator restarted");
            conn.rtc.bwe().reset(Bitrate::bps(estimate));
            conn.estimator_restarted_at = Some(now);
            conn.estimate_changed_at = Some(now);
            self.tally.estimator_restarts += 1;
        }
        for (i, _) in &videos {
            let out = &mut conn.outbound[*i];
            let Some(live) = &mut out.live else { continue };
            if let Some(f) = self.forwarders.get_mut(&out.sub.route.key) {
                f.fwd.set_needed_layer((id, live.ssrc), out.choice.needed);
                if f.fwd.set_layer((id, live.ssrc), out.choice.layer) {
                    tracing::debug!(participant = %conn.participant, track = %out.sub.track_id, layer = ?out.choice.layer, estimate = ?conn.estimate, "layer chosen");
                }
            }
            let state = (out.choice.layer, out.choice.paused());
            if live.reported != Some(state) {
                live.reported = Some(state);
                live.paused = state.1.map(|cause| {
                    GaugeGuard::new(
                        &self.metrics,
                        match cause {
                            PauseCause::Bandwidth => |m| &m.downtracks_paused_bandwidth,
                            PauseCause::Hidden => |m| &m.downtracks_paused_hidden,
                        },
                    )
                });
                let layer = state
                    .0
                    .and_then(|l| out.sub.layers.get(usize::from(l)).cloned());
                let _ = conn.events.send(MediaEvent::DownTrackChanged {
                    track: out.sub.track_id.clone(),
                    layer,
                    paused: state.1,
                });
            }
        }
    }

    /// Once per allocation pass: tells each publisher's session how loud it speaks, when that
    /// changed (started, stopped, or a quarter louder or quieter).
    fn update_speech(&mut self, now: Instant) {
        for f in self.forwarders.values_mut() {
            let Source::Local {
                conn,
                speech: Some((meter, told)),
                ..
            } = &mut f.source
            else {
                continue;
            };
            let Some(loudness) = meter.poll(now) else {
                continue;
            };
            let changed = (loudness > 0.0) != (*told > 0.0)
                || (loudness - *told).abs() > 0.25 * told.max(loudness);
            if changed && let Some(c) = self.conns.get(conn) {
                *told = loudness;
                c.emit(MediaEvent::Speech { loudness });
            }
        }
    }

    /// Dynacast, once per allocation pass: relay-fed forwarders tell the publisher's worker
    /// which layers their subscribers take (only those are relayed); source forwarders work out
    /// which layers anyone takes and tell the publisher when that changes, and give the relays
    /// the layers as the publisher sends them (a relay sees only the layers it takes).
    fn update_dynacast(&mut self, now: Instant) {
        for (key, f) in &mut self.forwarders {
            match &mut f.source {
                Source::Relayed { worker, reported } => {
                    let wanted = f.fwd.wanted_layers();
                    if wanted != *reported {
                        *reported = wanted;
                        let _ = self.workers[*worker].commands.send(Command::RelayWants {
                            key: *key,
                            worker: self.index,
                            layers: wanted,
                        });
                    }
                }
                Source::Local {
                    conn,
                    mid,
                    layers,
                    dynacast,
                    ..
                } => {
                    let wanted = f.fwd.wanted_layers() | f.fwd.relayed_layers();
                    let changed = dynacast.update(wanted, now);
                    if changed.is_some() {
                        f.fwd.set_suspended(dynacast.suspended(), now);
                    }
                    if f.fwd.is_video() && f.fwd.relay_count() > 0 {
                        let views: Arc<[LayerView]> = f.fwd.layer_views(now).into();
                        for w in f.fwd.relays() {
                            let _ = self.workers[w].commands.send(Command::LayerViews {
                                key: *key,
                                views: views.clone(),
                            });
                        }
                    }
                    if let Some(active) = changed
                        && let Some(c) = self.conns.get(conn)
                    {
                        let active = (0..layers.len())
                            .filter(|l| active & 1 << l != 0)
                            .map(|l| layers[l].to_string())
                            .collect();
                        tracing::debug!(participant = %c.participant, ?active, "dynacast");
                        c.emit(MediaEvent::LayersWanted {
                            track: IncomingTrackId(*mid),
                            active,
                        });
                    }
                }
            }
        }
    }

    /// Removes one downtrack, and a relay-fed forwarder left with none.
    /// Returns the downtrack's rewriter.
    fn stop_downtrack(&mut self, key: TrackKey, to: SubKey) -> Option<Rewriter> {
        let f = self.forwarders.get_mut(&key)?;
        let rewriter = f.fwd.remove_downtrack(to);
        self.drop_if_idle(key);
        rewriter
    }

    fn drop_if_idle(&mut self, key: TrackKey) {
        let idle_relay = self.forwarders.get(&key).and_then(|f| match f.source {
            Source::Relayed { worker, .. } if f.fwd.is_idle() => Some(worker),
            _ => None,
        });
        if let Some(worker) = idle_relay {
            self.forwarders.remove(&key);
            let _ = self.workers[worker].commands.send(Command::DetachRelay {
                key,
                worker: self.index,
            });
        }
    }

    /// A published track stopped arriving: its forwarder goes, and the session unpublishes it.
    fn end_inbound(&mut self, id: ConnId, mid: Mid) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if let Some(Inbound::Published(key, ..)) = conn.inbound.remove(&mid) {
            conn.emit(MediaEvent::TrackEnded(IncomingTrackId(mid)));
            self.forwarders.remove(&key);
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Open {
                conn,
                participant,
                subscribing,
                events,
                chat_in,
            } => self.open(conn, participant, subscribing, events, chat_in),
            Command::RemoteOffer { conn, sdp, reply } => {
                let result = match self.conns.get_mut(&conn) {
                    Some(c) => c.remote_offer(&sdp),
                    None => Err(MediaError::Closed),
                };
                self.follow_ice_restart(conn);
                let _ = reply.send(result);
                self.start_subscriptions(conn);
                self.drive(conn, now);
            }
            Command::RemoteAnswer { conn, sdp, reply } => {
                let result = match self.conns.get_mut(&conn) {
                    Some(c) => c.remote_answer(&sdp),
                    None => Err(MediaError::Closed),
                };
                let opened = matches!(result, Ok(true));
                let _ = reply.send(result.map(|_| ()));
                self.drive(conn, now);
                if opened {
                    self.start_subscriptions(conn);
                }
            }
            Command::RemoteCandidate {
                conn,
                candidate,
                reply,
            } => {
                let result = match self.conns.get_mut(&conn) {
                    Some(c) => match Candidate::from_sdp_string(&candidate) {
                        Ok(candidate) => {
                            c.rtc.add_remote_candidate(candidate);
                            Ok(())
                        }
                        Err(e) => Err(MediaError::BadCandidate(e.to_string())),
                    },
                    None => Err(MediaError::Closed),
                };
                let _ = reply.send(result);
                self.drive(conn, now);
            }
            Command::OfferIfNeeded { conn, reply } => {
                let offer = self.conns.get_mut(&conn).and_then(Conn::offer_if_needed);
                let _ = reply.send(offer);
                self.drive(conn, now);
            }
            Command::Subscribe { conn, sub } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subscribe(sub);
                }
                // Into an m-line the client offered, it may start at once (WHEP).
                self.start_subscriptions(conn);
            }
            Command::TrackSettings {
                conn,
                key,
                visibility,
            } => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && let Some(out) = c.outbound.iter_mut().find(|o| o.sub.route.key == key)
                {
                    out.choice.visibility = visibility;
                    self.allocate_layers(conn, now);
                }
            }
            Command::Prioritize { conn, keys } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    for out in &mut c.outbound {
                        out.speaking = keys.contains(&out.sub.route.key);
                    }
                    self.allocate_layers(conn, now);
                }
            }
            Command::Unsubscribe { conn, key } => {
                let stopped = self.conns.get_mut(&conn).and_then(|c| c.unsubscribe(key));
                if let Some(ssrc) = stopped
                    && let Some(rewriter) = self.stop_downtrack(key, (conn, ssrc))
                    && let Some(c) = self.conns.get_mut(&conn)
                    && c.reuses_send_streams()
                {
                    c.parked_rewriters.insert(ssrc, rewriter);
                }
                // A client's receiving m-line freed may go to the next track at once (WHEP).
                self.start_subscriptions(conn);
            }
            Command::Publish { conn, mid, key } => self.publish(conn, mid, key),
            Command::Chat { conn, line } => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && let Some(id) = c.chat
                    && let Some(mut channel) = c.rtc.channel(id)
                {
                    if channel.buffered_amount() > CHAT_BUFFER_LIMIT {
                        tracing::debug!(participant = %c.participant, "chat line dropped: data channel backed up");
                    } else if let Err(e) = channel.write(false, line.as_bytes()) {
                        tracing::debug!(participant = %c.participant, "chat write: {e}");
                    }
                    self.drive(conn, now);
                }
            }
            Command::Close { conn } => self.close(conn),
            Command::AttachRelay { key, worker } => {
                if let Some(f) = self.forwarders.get_mut(&key) {
                    // The other worker's downtracks ask for the keyframes they wait for.
                    f.fwd.add_relay(worker);
                } else {
                    // The track is gone here: let the other worker drop its relay-fed copy.
                    let _ = self.workers[worker].commands.send(Command::DetachRelay {
                        key,
                        worker: self.index,
                    });
                }
            }
            Command::DetachRelay { key, worker } => {
                if let Some(f) = self.forwarders.get_mut(&key) {
                    f.fwd.remove_relay(worker);
                }
            }
            Command::RelayWants {
                key,
                worker,
                layers,
            } => {
                if let Some(f) = self.forwarders.get_mut(&key) {
                    f.fwd.set_relay_layers(worker, layers);
                }
            }
            Command::LayerViews { key, views } => {
                if let Some(f) = self.forwarders.get_mut(&key) {
                    f.fwd.set_source_views(&views);
                }
            }
            Command::MuteTrack { key, muted } => {
                if let Some(f) = self.forwarders.get_mut(&key)
                    && let Source::Local { muted: flag, .. } = &mut f.source
                {
                    *flag = muted;
                    // Video resumes on a keyframe of every layer in use.
                    if !muted && f.fwd.is_video() {
                        for layer in 0..f.fwd.layer_count() {
                            f.fwd.request_keyframe(layer);
                        }
                    }
                }
            }
            Command::KeyframeRequest {
                key,
                worker,
                layers,
            } => {
                if let Some(f) = self.forwarders.get_mut(&key) {
                    f.fwd.widen_relay(worker, layers);
                    for layer in 0..u32::BITS as u8 {
                        if layers & 1 << layer != 0 {
                            f.fwd.request_keyframe(layer);
                        }
                    }
                }
            }
            Command::Shutdown => self.stop = true,
        }
    }

    fn open(
        &mut self,
        id: ConnId,
        participant: ParticipantId,
        subscribing: Subscribing,
        events: mpsc::UnboundedSender<MediaEvent>,
        chat_in: mpsc::Sender<String>,
    ) {
        let ufrag = random_token(16);
        let creds = IceCreds {
            ufrag: ufrag.clone(),
            pass: random_token(24),
        };
        let rtc = self.build_rtc(creds);
        self.demux.add_ufrag(ufrag.clone(), id);
        let gauge = GaugeGuard::new(&self.metrics, |m| &m.peer_connections);
        self.conns.insert(
            id,
            Conn::new(participant, subscribing, rtc, ufrag, events, chat_in, gauge),
        );
        self.exported.connections.set(self.conns.len() as i64);
    }

    /// A connection's engine: the worker's configuration with these ICE credentials and the
    /// worker's host candidates.
    fn build_rtc(&self, creds: IceCreds) -> Rtc {
        let mut rtc = self
            .rtc_config
            .clone()
            .set_local_ice_credentials(creds)
            .build(Instant::now());
        for addr in &self.workers[self.index].addrs {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(%addr, "host candidate: {e}"),
            }
        }
        rtc
    }

    /// After a client offer: an ICE restart gave the connection new local credentials, and the
    /// client's checks (perhaps from a new address) name the new ufrag.
    fn follow_ice_restart(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let ufrag = conn.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != conn.ufrag {
            tracing::info!(participant = %conn.participant, "ICE restart");
            self.demux.replace_ufrag(&conn.ufrag, ufrag.clone(), id);
            conn.ufrag = ufrag;
        }
    }

    fn publish(&mut self, id: ConnId, mid: Mid, key: TrackKey) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(&Inbound::Announced(ref codec, ref layers, red)) = conn.inbound.get(&mid) else {
            return;
        };
        let layers = layers.clone();
        let fwd = TrackForwarder::new(
            &codec.mime_type,
            layers.len().max(1) as u8,
            KeyframeThrottle::DEFAULT_INTERVAL,
        );
        let kind = if fwd.is_video() {
            MediaKind::Video
        } else {
            MediaKind::Audio
        };
        conn.inbound
            .insert(mid, Inbound::Published(key, layers.clone(), red));
        self.forwarders.insert(
            key,
            Forwarder {
                fwd,
                source: Source::Local {
                    conn: id,
                    mid,
                    dynacast: Dynacast::new(layers.len() as u8),
                    speech: (kind == MediaKind::Audio).then(|| (SpeechMeter::default(), 0.0)),
                    muted: false,
                    layers,
                    _gauge: GaugeGuard::new(&self.metrics, |m| &m.forwarders),
                },
            },
        );
    }

    /// Ends a connection and everything it had on this worker.
    fn close(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        self.workers[self.index]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        self.exported.connections.set(self.conns.len() as i64);
        self.demux.remove(id);
        for inbound in conn.inbound.values() {
            if let Inbound::Published(key, ..) = inbound {
                self.forwarders.remove(key);
            }
        }
        for out in conn.outbound.drain(..) {
            if let Some(live) = out.live {
                self.stop_downtrack(out.sub.route.key, (id, live.ssrc));
            }
        }
        conn.rtc.disconnect();
    }

    /// End of a loop turn: due timers, connections written to, keyframe requests, then one
    /// send of everything and the relayed batches.
    fn finish_turn(&mut self, woke: Instant) {
        let now = Instant::now();
        self.tally.turns += 1;
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            if conn.scheduled != Some(t) {
                continue; // superseded by an earlier entry
            }
            conn.scheduled = None;
            if let Err(e) = conn.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(conn = id, "timeout: {e}");
            }
            self.drive(id, now);
        }
        if now >= self.next_allocation {
            self.next_allocation = now + ALLOCATION_INTERVAL;
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            for id in ids {
                self.allocate_layers(id, now);
            }
            self.update_dynacast(now);
            self.update_speech(now);
            self.fail_lost_connections(now);
        }
        self.send_keyframe_requests(now);
        self.send_written(now);
        self.publish_tally();
        let done = Instant::now();
        let turn = done.saturating_duration_since(woke);
        self.busy += turn;
        self.metrics.loop_turn_busy.observe(turn.as_secs_f64());
        let window = done.saturating_duration_since(self.window_start);
        if window >= LOAD_WINDOW {
            self.publish_load(window);
            self.busy = Duration::ZERO;
            self.window_start = done;
        }
    }

    /// Once per load window: the busy share, the connections it was measured with, and whether
    /// the socket kept up (what admission reads), also exported as metrics.
    fn publish_load(&mut self, window: Duration) {
        let permille = ((self.busy.as_secs_f64() / window.as_secs_f64() * 1000.0) as u32).min(1000);
        let shared = &self.workers[self.index];
        shared.load_permille.store(permille, Ordering::Relaxed);
        shared
            .load_connections
            .store(self.conns.len(), Ordering::Relaxed);
        self.exported.load.set(f64::from(permille) / 1000.0);
        let q = match udp::receive_queue(&self.socket) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(worker = self.index, "SO_MEMINFO: {e}");
                return;
            }
        };
        let new_drops = q.drops.wrapping_sub(self.receive_drops);
        self.receive_drops = q.drops;
        self.exported.receive_drops.inc_by(u64::from(new_drops));
        // The queue counts kernel buffer sizes, about twice the datagrams' bytes.
        let backlog = u64::from(q.queued) * BACKLOG_SHARE > u64::from(q.capacity);
        shared
            .backlogged
            .store(new_drops > 0 || backlog, Ordering::Relaxed);
    }

    /// Drives every connection written to, then sends all datagrams and relayed batches.
    fn send_written(&mut self, now: Instant) {
        while let Some(id) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.dirty = false;
            // str0m sends written RTP only once time has moved on: one timeout per connection
            // releases everything written to it since.
            if let Err(e) = conn.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(conn = id, "timeout: {e}");
            }
            self.drive(id, now);
        }
        self.flush_socket();
        for w in 0..self.relay_out.len() {
            if !self.relay_out[w].is_empty() {
                send_relay(&self.workers[w], &mut self.relay_out[w], &mut self.tally);
            }
        }
        // Every copy of the packets forwarded so far is sent now.
        let sent = Instant::now();
        for at in self.forwarded_at.drain(..) {
            self.metrics
                .forward_latency
                .observe(sent.saturating_duration_since(at).as_secs_f64());
        }
    }

    fn flush_socket(&mut self) {
        if self.sender.is_empty() {
            return;
        }
        let flushed = self.sender.flush(&self.socket);
        self.tally.packets_dropped += flushed.dropped as u64;
    }

    fn publish_tally(&mut self) {
        let t = std::mem::take(&mut self.tally);
        let m = &self.metrics;
        for (counter, n) in [
            (&m.packets_in, t.packets_in),
            (&m.packets_out, t.packets_out),
            (&m.red_packets_in, t.red_in),
            (&m.red_packets_out, t.red_out),
            (&m.packets_dropped, t.packets_dropped),
            (&m.packets_dropped_pacer, t.packets_dropped_pacer),
            (&m.packets_muted, t.packets_muted),
            (&m.relay_packets_skipped, t.relay_skipped),
            (&m.datagrams_unroutable, t.unroutable),
            (&m.ice_keepalive_indications, t.keepalive_indications),
            (&m.bwe_estimator_restarts, t.estimator_restarts),
            (&m.keyframe_requests, t.keyframe_requests),
            (&m.media_loop_turns, t.turns),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
        for (counter, n) in self.exported.out_by_layer.iter().zip(t.video_out_by_layer) {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}

/// The VP8 descriptor patch that gives a packet the subscriber's picture numbering (None: it
/// cannot be built, the packet goes as it is). A 7-bit picture id keeps the low bits of the
/// 15-bit count.
fn vp8_patch(desc: &Vp8Descriptor, ids: Vp8Ids) -> Option<Vp8Patch> {
    let build = |picture_id: Option<u16>| {
        let mut builder = desc.patch();
        if let (Some(_), Some(p)) = (desc.picture_id(), picture_id) {
            builder = builder.picture_id(p);
        }
        if let (Some(_), Some(t)) = (desc.tl0_pic_idx(), ids.tl0_pic_idx) {
            builder = builder.tl0_pic_idx(t);
        }
        builder.build()
    };
    match build(ids.picture_id) {
        Err(Vp8PatchError::PictureIdTooLarge) => build(ids.picture_id.map(|p| p & 0x7f)).ok(),
        patch => patch.ok(),
    }
}

/// Lists a connection for the next send, once.
fn mark_dirty(list: &mut Vec<ConnId>, id: ConnId, conn: &mut Conn) {
    if !conn.dirty {
        conn.dirty = true;
        list.push(id);
    }
}

/// Hands a batch to another worker; drops it whole when that worker is behind.
fn send_relay(to: &WorkerShared, batch: &mut RelayBatch, tally: &mut Tally) {
    let full = std::mem::replace(batch, Vec::with_capacity(32));
    let n = full.len() as u64;
    if to.relay.try_send(full).is_err() {
        tally.packets_dropped += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(load: u32, then: usize, now: usize) -> WorkerShared {
        let (commands, _) = mpsc::unbounded_channel();
        let (relay, _) = mpsc::channel(1);
        WorkerShared {
            commands,
            relay,
            load_permille: AtomicU32::new(load),
            connections: AtomicUsize::new(now),
            load_connections: AtomicUsize::new(then),
            backlogged: AtomicBool::new(false),
            addrs: Vec::new(),
        }
    }

    #[test]
    fn admission_counts_connections_opened_since_the_load_was_measured() {
        // 400 connections made the worker 60 % busy; 200 more are joining.
        assert_eq!(shared(600, 400, 600).projected_load(), 900);
        // Fewer than measured (some left): the figure stands until the next window.
        assert_eq!(shared(600, 400, 300).projected_load(), 600);
        // Too few to scale by.
        assert_eq!(shared(100, 2, 50).projected_load(), 100);
        assert_eq!(shared(900, 100, 1_000).projected_load(), 1000, "capped");
        let w = shared(100, 400, 400);
        w.backlogged.store(true, Ordering::Relaxed);
        assert_eq!(
            w.projected_load(),
            1000,
            "a socket that falls behind is full"
        );
    }
}
