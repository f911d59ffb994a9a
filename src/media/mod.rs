//! The media plane: WebRTC (ICE, DTLS, SRTP, RTCP, SCTP) on the sans-IO engine str0m, driven by
//! our own event loops.
//!
//! Owns: the media workers (one thread each, by default one per core), each with one UDP socket
//! on its own port (`--udp-port` + worker index) that serves every participant living on that
//! worker; the demultiplexing of datagrams to connections; every participant's connection and its
//! negotiation; the forwarders of the tracks published or subscribed on each worker; and the
//! bounded hand-off of packets between workers. Packets go from the publisher's connection
//! through [`crate::forward`] to the subscribers' connections without leaving the worker that
//! received them, except as one relayed copy per other worker that has subscribers.
//!
//! Must not: know rooms or signaling messages. A session talks to its connection through a
//! [`MediaHandle`] (commands, some answered) and hears back through [`MediaEvent`]s.

mod codec;
mod conn;
mod demux;
mod gateway;
mod keepalive;
mod udp;
mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use str0m::media::Mid;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
pub use crate::forward::{PauseCause, Visibility};
use crate::forward::{TrackKey, TrackRoute};
use crate::metrics::Metrics;
use crate::types::{IceCandidate, MediaKind, ParticipantId, TrackCodec, TrackId};

use demux::ConnId;
pub use gateway::{Gateway, GatewayEvent};
pub use udp::{ReceiveQueue, Receiver, receive_queue};
use worker::{Command, WorkerShared};

/// Worker loads closer than this (per mille) count as equal when placing a participant.
const LOAD_BAND_PERMILLE: u32 = 50;
/// Chat lines from one participant queued for its session before new ones are dropped.
const CHAT_IN_QUEUE: usize = 64;

/// How a connection's subscriptions get their m-lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Subscribing {
    /// The server offers an m-line for each track it forwards (the WebSocket protocol).
    #[default]
    ServerOffers,
    /// Into the m-lines the client offered to receive on, one track each, in the order the
    /// tracks were subscribed; the server never offers (WHEP: its client cannot take an offer).
    IntoClientOffer,
}

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("every media worker is at capacity")]
    Overloaded,
    #[error("bad SDP: {0}")]
    BadSdp(String),
    #[error("bad ICE candidate: {0}")]
    BadCandidate(String),
    #[error("the media connection is closed")]
    Closed,
    #[error("media socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A track a participant started sending, as its m-line names it (opaque to the session, but
/// for the mid the client knows its transceiver by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingTrackId(Mid);

impl std::fmt::Display for IncomingTrackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A track a participant started sending.
#[derive(Debug, Clone)]
pub struct IncomingTrack {
    pub id: IncomingTrackId,
    pub kind: MediaKind,
    pub codec: TrackCodec,
    /// The publisher's own `MediaStream` id (msid), to group its tracks into streams.
    pub stream_id: String,
    /// Simulcast layers by rid, lowest resolution first (empty: one stream).
    pub layers: Vec<String>,
}

/// What a connection tells its session.
#[derive(Debug)]
pub enum MediaEvent {
    /// The participant sends a new track; the session publishes it with [`MediaHandle::publish`].
    TrackAdded(IncomingTrack),
    /// The participant stopped sending a published track (e.g. ended a screen share).
    TrackEnded(IncomingTrackId),
    /// ICE and DTLS are up.
    Connected,
    /// The client closed the connection (DTLS close): it is leaving, or its media is gone.
    ClosedByPeer,
    /// The connection failed: its media is gone.
    Failed(String),
    /// What the participant receives of a subscribed video changed: the layer forwarded (its
    /// rid; None for a single-stream track or while paused), or why it is paused.
    DownTrackChanged {
        track: TrackId,
        layer: Option<String>,
        paused: Option<PauseCause>,
    },
    /// How loud the participant speaks (0: not speaking), when that changed: smoothed over
    /// half-second readings of the audio-level header extension.
    Speech { loudness: f32 },
    /// The simulcast layers of a published track that anyone receives changed (dynacast):
    /// the participant should encode only these.
    LayersWanted {
        track: IncomingTrackId,
        active: Vec<String>,
    },
}

/// What became of a client's offer.
#[derive(Debug)]
pub enum OfferOutcome {
    /// Applied; send this answer.
    Answer(String),
    /// Collided with the server's own outstanding offer; the server (impolite) ignores it and
    /// the client rolls back.
    IgnoredForGlare,
}

/// A published track to send to a subscriber.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub route: TrackRoute,
    pub kind: MediaKind,
    pub codec: TrackCodec,
    /// The stream the subscriber sees the track in (`{publisher}-{n}`).
    pub stream_id: String,
    pub track_id: TrackId,
    /// Simulcast layers by rid, lowest first (empty: one stream).
    pub layers: Arc<[String]>,
    /// A screen share: first in the subscriber's downlink with the active speakers.
    pub screen: bool,
}

impl Subscription {
    pub fn layer_count(&self) -> u8 {
        self.layers.len().clamp(1, 8) as u8
    }
}

/// The running media workers.
#[derive(Debug)]
pub struct MediaPlane {
    /// The workers, then (cascading) the gateway's slot.
    workers: Arc<[WorkerShared]>,
    /// How many of `workers` are worker threads.
    local: usize,
    /// The gateway to the other nodes, until the node link takes it.
    gateway: std::sync::Mutex<Option<Gateway>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    next_conn: AtomicU32,
    /// Worker load (busy share of the last second, in per mille) above which joins are refused.
    max_load_permille: u32,
    metrics: Arc<Metrics>,
}

impl MediaPlane {
    /// Binds one socket per worker and starts the worker threads.
    pub fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Self, MediaError> {
        let count = config.media_workers();
        // A loopback public address means "local only" (tests, a laptop demo): bind media to
        // it. Anything else: bind every interface and announce the public address (1:1 NAT) or,
        // without one, each interface's own address.
        let bind_ip = match config.public_ip {
            Some(ip) if ip.is_loopback() => ip,
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mut sockets = Vec::with_capacity(count);
        for k in 0..count {
            let port = match config.udp_port {
                0 => 0,
                base => base.checked_add(k as u16).ok_or_else(|| {
                    std::io::Error::other(format!("no port {base} + {k} for worker {k}"))
                })?,
            };
            sockets.push(udp::bind(
                SocketAddr::new(bind_ip, port),
                config.socket_buffer_bytes,
            )?);
        }
        let announce_ips = announced_ips(config.public_ip, bind_ip);
        let rtc_config = worker::rtc_config(worker::dtls_certificate()?, config.start_bitrate_kbps);
        let mut shared = Vec::with_capacity(count);
        let mut inboxes = Vec::with_capacity(count);
        for socket in &sockets {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let (relay, relay_rx) = mpsc::channel(worker::RELAY_QUEUE_BATCHES);
            let port = socket.local_addr()?.port();
            let addrs = announce_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect();
            shared.push(WorkerShared::new(commands, relay, addrs));
            inboxes.push((commands_rx, relay_rx));
        }
        // The gateway's slot: the same channels, driven by the node link.
        let gateway_inbox = config.cascades().then(|| {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let (relay, relay_rx) = mpsc::channel(worker::RELAY_QUEUE_BATCHES);
            shared.push(WorkerShared::new(commands, relay, Vec::new()));
            (commands_rx, relay_rx)
        });
        let workers: Arc<[WorkerShared]> = shared.into();
        let gateway = gateway_inbox
            .map(|(commands, relay)| Gateway::new(count, workers.clone(), commands, relay));
        let mut threads = Vec::with_capacity(count);
        for (index, (socket, (commands, relay))) in sockets.into_iter().zip(inboxes).enumerate() {
            let worker = worker::Worker::new(
                index,
                socket,
                workers.clone(),
                commands,
                relay,
                rtc_config.clone(),
                metrics.clone(),
            )?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("media-{index}"))
                    .spawn(move || worker.run())?,
            );
        }
        metrics.media_workers.set(count as i64);
        Ok(MediaPlane {
            workers,
            local: count,
            gateway: std::sync::Mutex::new(gateway),
            threads: std::sync::Mutex::new(threads),
            next_conn: AtomicU32::new(1),
            max_load_permille: config.limits.worker_load_permille(),
            metrics,
        })
    }

    /// How many connections live on each worker.
    /// The worker threads' shares (not the gateway's).
    fn local_workers(&self) -> &[WorkerShared] {
        &self.workers[..self.local]
    }

    /// The gateway to the other nodes of the cluster (with `--cluster-policy cascade`), once.
    pub fn take_gateway(&self) -> Option<Gateway> {
        self.gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn worker_connections(&self) -> Vec<usize> {
        self.local_workers()
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// The addresses each worker announces, worker by worker.
    pub fn worker_addrs(&self) -> Vec<Vec<SocketAddr>> {
        self.local_workers()
            .iter()
            .map(|w| w.addrs.clone())
            .collect()
    }

    /// The load a new participant would meet: the least-loaded worker's projected busy share,
    /// per mille (what the cluster's heartbeat reports).
    pub fn least_load_permille(&self) -> u32 {
        self.local_workers()
            .iter()
            .map(|w| w.projected_load())
            .min()
            .unwrap_or(1000)
    }

    /// Picks the least-loaded worker for a new participant, or refuses when every worker is
    /// past the load limit (see [`WorkerShared::projected_load`]).
    fn pick_worker(&self) -> Result<usize, MediaError> {
        let (index, load) = self
            .local_workers()
            .iter()
            .enumerate()
            .map(|(i, w)| (i, w.projected_load(), w.connections.load(Ordering::Relaxed)))
            // Loads within the same 5 % are equal: then the fewer connections wins.
            .min_by_key(|(_, load, conns)| (*load / LOAD_BAND_PERMILLE, *conns))
            .map(|(i, load, _)| (i, load))
            .ok_or(MediaError::Overloaded)?;
        if self.max_load_permille > 0 && load >= self.max_load_permille {
            self.metrics.joins_refused_at_capacity.inc();
            return Err(MediaError::Overloaded);
        }
        Ok(index)
    }

    /// A new connection for `participant` on the least-loaded worker. Chat lines the
    /// participant sends arrive on the returned receiver.
    pub fn open(
        &self,
        participant: ParticipantId,
        subscribing: Subscribing,
        events: mpsc::UnboundedSender<MediaEvent>,
    ) -> Result<(MediaHandle, mpsc::Receiver<String>), MediaError> {
        let worker = self.pick_worker()?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (chat_tx, chat_rx) = mpsc::channel(CHAT_IN_QUEUE);
        let shared = &self.workers[worker];
        // Counted here, not when the worker gets to it, so joins in a burst spread out.
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let opened = shared.commands.send(Command::Open {
            conn,
            participant,
            subscribing,
            events,
            chat_in: chat_tx,
        });
        if opened.is_err() {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(MediaError::Closed);
        }
        Ok((
            MediaHandle {
                worker,
                conn,
                commands: shared.commands.clone(),
            },
            chat_rx,
        ))
    }

    /// Mutes or unmutes a published track for everyone (admin API): its packets are dropped
    /// where they arrive, and a video asks for a keyframe when it comes back.
    pub fn set_track_muted(&self, route: &TrackRoute, muted: bool) -> Result<(), MediaError> {
        let worker = self.workers.get(route.worker).ok_or(MediaError::Closed)?;
        worker
            .commands
            .send(Command::MuteTrack {
                key: route.key,
                muted,
            })
            .map_err(|_| MediaError::Closed)
    }

    /// Stops the workers (after every session closed its connection).
    pub fn shutdown(&self) {
        for w in self.workers.iter() {
            let _ = w.commands.send(Command::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The addresses put in ICE candidates: the public one, the loopback one media is bound to, or
/// every non-loopback interface address (loopback if there is none).
fn announced_ips(public: Option<IpAddr>, bind: IpAddr) -> Vec<IpAddr> {
    if let Some(ip) = public {
        return vec![ip];
    }
    if !bind.is_unspecified() {
        return vec![bind];
    }
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|ifs| {
            ifs.into_iter()
                .map(|i| i.ip())
                .filter(|ip| ip.is_ipv4() && !ip.is_loopback())
                .collect()
        })
        .unwrap_or_default();
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ips
}

/// A session's hold on its connection. Dropping it closes the connection.
#[derive(Debug)]
pub struct MediaHandle {
    worker: usize,
    conn: ConnId,
    commands: mpsc::UnboundedSender<Command>,
}

impl MediaHandle {
    pub fn worker(&self) -> usize {
        self.worker
    }

    fn send(&self, command: Command) -> Result<(), MediaError> {
        self.commands.send(command).map_err(|_| MediaError::Closed)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MediaError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| MediaError::Closed)
    }

    pub async fn remote_offer(&self, sdp: String) -> Result<OfferOutcome, MediaError> {
        let conn = self.conn;
        self.ask(|reply| Command::RemoteOffer { conn, sdp, reply })
            .await?
    }

    /// Applies the client's answer to the server's outstanding offer.
    pub async fn remote_answer(&self, sdp: String) -> Result<(), MediaError> {
        let conn = self.conn;
        self.ask(|reply| Command::RemoteAnswer { conn, sdp, reply })
            .await?
    }

    pub async fn remote_candidate(&self, candidate: IceCandidate) -> Result<(), MediaError> {
        let conn = self.conn;
        self.ask(|reply| Command::RemoteCandidate {
            conn,
            candidate: candidate.candidate,
            reply,
        })
        .await?
    }

    /// An offer to send the client, if subscriptions changed and no offer is outstanding.
    pub async fn offer_if_needed(&self) -> Result<Option<String>, MediaError> {
        let conn = self.conn;
        self.ask(|reply| Command::OfferIfNeeded { conn, reply })
            .await
    }

    /// Sends another participant's track to this one, from the next offer on.
    pub fn subscribe(&self, sub: Subscription) -> Result<(), MediaError> {
        self.send(Command::Subscribe {
            conn: self.conn,
            sub,
        })
    }

    /// How the participant shows a subscribed track (its tile's size, or hidden).
    pub fn track_settings(&self, key: TrackKey, visibility: Visibility) -> Result<(), MediaError> {
        self.send(Command::TrackSettings {
            conn: self.conn,
            key,
            visibility,
        })
    }

    /// The videos that go first in this participant's downlink now (the active speakers');
    /// screen shares always do.
    pub fn prioritize(&self, keys: Vec<TrackKey>) -> Result<(), MediaError> {
        self.send(Command::Prioritize {
            conn: self.conn,
            keys,
        })
    }

    pub fn unsubscribe(&self, key: TrackKey) -> Result<(), MediaError> {
        self.send(Command::Unsubscribe {
            conn: self.conn,
            key,
        })
    }

    /// Starts forwarding an incoming track under the key the room gave it. Its route's worker
    /// is this connection's.
    pub fn publish(&self, track: IncomingTrackId, key: TrackKey) -> Result<(), MediaError> {
        self.send(Command::Publish {
            conn: self.conn,
            mid: track.0,
            key,
        })
    }

    /// Sends a chat line on the participant's `chat` data channel (dropped if it is backed up).
    pub fn send_chat(&self, line: Arc<str>) -> Result<(), MediaError> {
        self.send(Command::Chat {
            conn: self.conn,
            line,
        })
    }
}

impl Drop for MediaHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close { conn: self.conn });
    }
}
