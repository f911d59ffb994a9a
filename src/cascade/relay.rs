//! The relay: moves cascaded rooms' media and feedback between this node's media plane (its
//! gateway) and the other nodes (the node link). One task owns all of it, so nothing here is
//! locked.
//!
//! A node dials the node publishing a track it has subscribers of (one connection per pair and
//! direction), asks for the track (`attach`), and receives it as datagrams, one copy per track
//! and node pair whatever the number of subscribers; keyframe requests and the layers its
//! subscribers take go back the same way. Tracks are named on the link by the publisher's key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::link::{LinkEndpoint, read_frame, write_frame};
use super::repair::{GapDetector, SentBuffer};
use super::wire::{Control, decode_packet, encode_packet};
use crate::forward::{MediaPacket, TrackKey};
use crate::media::{Gateway, GatewayEvent};
use crate::metrics::{GaugeGuard, Metrics};

/// Link events queued for the relay before datagrams are dropped.
const LINK_EVENT_QUEUE: usize = 8192;
/// Control frames queued per link before they are dropped.
const CONTROL_QUEUE: usize = 1024;
/// How soon a failed or lost link to a node still wanted is dialed again.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// Link events handled before the packets gathered for the workers are handed over.
const EVENTS_PER_TURN: usize = 256;

/// What the room side tells the relay.
#[derive(Debug)]
pub enum RelayCommand {
    /// A track published on `node` is relayed to this node under `key`.
    Track {
        key: TrackKey,
        node: Arc<str>,
        remote_key: u64,
        remote_worker: usize,
    },
    Untrack {
        key: TrackKey,
    },
    /// Where `node`'s link listens and the certificate fingerprint it announced.
    Peer {
        node: Arc<str>,
        addr: String,
        fingerprint: String,
    },
    /// `node` is gone: its links close.
    PeerGone {
        node: Arc<str>,
    },
}

#[derive(Debug)]
enum LinkEvent {
    /// A link this node dialed (to receive `node`'s tracks) is up.
    Dialed {
        node: Arc<str>,
        conn: quinn::Connection,
        control: mpsc::Sender<Control>,
    },
    DialFailed {
        node: Arc<str>,
    },
    /// `node` dialed in (to receive this node's tracks).
    Accepted {
        node: Arc<str>,
        conn: quinn::Connection,
        control: mpsc::Sender<Control>,
    },
    Control {
        node: Arc<str>,
        dialed: bool,
        frame: Control,
    },
    Datagram {
        node: Arc<str>,
        bytes: Bytes,
    },
    Closed {
        node: Arc<str>,
        dialed: bool,
        id: usize,
    },
    Redial {
        node: Arc<str>,
    },
}

/// A track published on another node, relayed here.
struct Inbound {
    origin: Option<Origin>,
    /// Local workers with subscribers of it, and the layers each takes.
    workers: HashMap<usize, u32>,
    /// The layers last asked of the publisher's node.
    wants_sent: u32,
    /// `attach` was sent on the current link.
    attached: bool,
    /// What arrived, to ask again for what did not.
    gaps: GapDetector,
    _gauge: Option<GaugeGuard>,
}

struct Origin {
    node: Arc<str>,
    key: u64,
    worker: usize,
}

/// A local track relayed to other nodes.
struct Outbound {
    worker: usize,
    /// The nodes taking it, and the layers each takes.
    nodes: HashMap<Arc<str>, u32>,
    /// The last datagrams sent, for the nodes that miss some.
    sent: SentBuffer,
}

struct Link {
    conn: quinn::Connection,
    control: mpsc::Sender<Control>,
    _gauge: GaugeGuard,
}

#[derive(Default)]
struct Peer {
    addr: String,
    fingerprint: String,
    dialing: bool,
    /// The link this node dialed to it.
    dialed: Option<Link>,
}

pub struct Relay {
    me: Arc<str>,
    gateway: Gateway,
    endpoint: Arc<LinkEndpoint>,
    metrics: Arc<Metrics>,
    inbound: HashMap<TrackKey, Inbound>,
    /// Relayed tracks by their node and key there.
    by_origin: HashMap<Arc<str>, HashMap<u64, TrackKey>>,
    outbound: HashMap<TrackKey, Outbound>,
    peers: HashMap<Arc<str>, Peer>,
    /// Links other nodes dialed to this one.
    accepted: HashMap<Arc<str>, Link>,
    events_tx: mpsc::Sender<LinkEvent>,
    events: mpsc::Receiver<LinkEvent>,
    /// Packets gathered for each local worker this turn.
    pending: Vec<Vec<(TrackKey, MediaPacket)>>,
}

impl Relay {
    pub fn new(
        me: Arc<str>,
        gateway: Gateway,
        endpoint: Arc<LinkEndpoint>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(LINK_EVENT_QUEUE);
        let workers = gateway.index();
        Relay {
            me,
            gateway,
            endpoint,
            metrics,
            inbound: HashMap::new(),
            by_origin: HashMap::new(),
            outbound: HashMap::new(),
            peers: HashMap::new(),
            accepted: HashMap::new(),
            events_tx,
            events,
            pending: (0..workers).map(|_| Vec::new()).collect(),
        }
    }

    /// Runs until the media plane shuts down or `shutdown`.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<RelayCommand>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let acceptor = tokio::spawn(accept_links(
            self.endpoint.clone(),
            self.events_tx.clone(),
            self.metrics.clone(),
        ));
        loop {
            tokio::select! {
                event = self.gateway.next() => match event {
                    Some(event) => self.on_gateway(event),
                    None => break,
                },
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(event) = self.events.recv() => {
                    self.on_link(event);
                    for _ in 0..EVENTS_PER_TURN {
                        match self.events.try_recv() {
                            Ok(event) => self.on_link(event),
                            Err(_) => break,
                        }
                    }
                    self.flush();
                }
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
            }
        }
        self.endpoint.close();
        acceptor.abort();
    }

    /// Hands the packets gathered this turn to the workers.
    fn flush(&mut self) {
        for (worker, batch) in self.pending.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            if !self.gateway.deliver(worker, std::mem::take(batch)) {
                self.metrics.cascade_packets_dropped.inc_by(n);
            }
        }
    }

    fn on_gateway(&mut self, event: GatewayEvent) {
        match event {
            GatewayEvent::Packets(batch) => self.send_packets(&batch),
            GatewayEvent::Attach { key, worker } => {
                let track = self
                    .inbound
                    .entry(key)
                    .or_insert_with(|| Inbound::new(None));
                track.workers.insert(worker, u32::MAX);
                self.sync_inbound(key);
            }
            GatewayEvent::Detach { key, worker } => {
                if let Some(track) = self.inbound.get_mut(&key) {
                    track.workers.remove(&worker);
                    self.sync_inbound(key);
                } else if let Some(out) = self.outbound.remove(&key) {
                    // The publisher's worker: the track is gone here.
                    for node in out.nodes.keys() {
                        self.control_accepted(node, Control::Gone { key: key.to_raw() });
                    }
                }
            }
            GatewayEvent::KeyframeRequest {
                key,
                worker: _,
                layers,
            } => {
                if let Some(Inbound {
                    origin: Some(o), ..
                }) = self.inbound.get(&key)
                {
                    let frame = Control::Keyframe {
                        key: o.key,
                        worker: o.worker,
                        layers,
                    };
                    let node = o.node.clone();
                    self.control_dialed(&node, frame);
                }
            }
            GatewayEvent::Wants {
                key,
                worker,
                layers,
            } => {
                if let Some(track) = self.inbound.get_mut(&key)
                    && let Some(w) = track.workers.get_mut(&worker)
                {
                    *w = layers;
                    self.sync_inbound(key);
                }
            }
            GatewayEvent::LayerViews { key, views } => {
                let Some(out) = self.outbound.get(&key) else {
                    return;
                };
                let frame = Control::Views {
                    key: key.to_raw(),
                    views: views.to_vec(),
                };
                let nodes: Vec<Arc<str>> = out.nodes.keys().cloned().collect();
                for node in nodes {
                    self.control_accepted(&node, frame.clone());
                }
            }
        }
    }

    /// Local tracks' packets to the nodes taking them: encoded once, one datagram per node.
    fn send_packets(&mut self, batch: &[(TrackKey, MediaPacket)]) {
        let (mut sent, mut dropped) = (0, 0);
        for (key, packet) in batch {
            let Some(out) = self.outbound.get_mut(key) else {
                continue;
            };
            let bytes = encode_packet(key.to_raw(), packet);
            out.sent.keep(packet.layer, packet.seq, bytes.clone());
            for node in out.nodes.keys() {
                match self.accepted.get(node) {
                    Some(link) if link.conn.send_datagram(bytes.clone()).is_ok() => sent += 1,
                    _ => dropped += 1,
                }
            }
        }
        self.metrics.cascade_packets_out.inc_by(sent);
        self.metrics.cascade_packets_dropped.inc_by(dropped);
    }

    /// Brings the publisher's node up to date with what this node's workers take of a relayed
    /// track: attach, the layers wanted, detach; dials its node first if needed.
    fn sync_inbound(&mut self, key: TrackKey) {
        let Some(track) = self.inbound.get_mut(&key) else {
            return;
        };
        let Some(origin) = &track.origin else {
            // Its room state has not reached the relay yet, or the track is gone already and
            // its last subscriber too.
            if track.workers.is_empty() {
                self.inbound.remove(&key);
            }
            return;
        };
        let node = origin.node.clone();
        let (remote_key, worker) = (origin.key, origin.worker);
        let link_up = self.peers.get(&node).is_some_and(|p| p.dialed.is_some());
        let mut frames = Vec::new();
        if track.workers.is_empty() {
            if track.attached {
                track.attached = false;
                frames.push(Control::Detach {
                    key: remote_key,
                    worker,
                });
            }
        } else if link_up {
            if !track.attached {
                track.attached = true;
                track.wants_sent = u32::MAX;
                frames.push(Control::Attach {
                    key: remote_key,
                    worker,
                });
            }
            let wants = track.workers.values().fold(0, |a, w| a | w);
            if wants != track.wants_sent {
                track.wants_sent = wants;
                frames.push(Control::Wants {
                    key: remote_key,
                    worker,
                    layers: wants,
                });
            }
        } else {
            self.dial(&node);
        }
        for frame in frames {
            self.control_dialed(&node, frame);
        }
    }

    fn dial(&mut self, node: &Arc<str>) {
        let Some(peer) = self.peers.get_mut(node) else {
            return; // not announced (yet): its state brings it
        };
        if peer.dialing || peer.dialed.is_some() || peer.addr.is_empty() {
            return;
        }
        peer.dialing = true;
        let (endpoint, events, metrics) = (
            self.endpoint.clone(),
            self.events_tx.clone(),
            self.metrics.clone(),
        );
        let (node, me, addr, fingerprint) = (
            node.clone(),
            self.me.clone(),
            peer.addr.clone(),
            peer.fingerprint.clone(),
        );
        tokio::spawn(async move {
            let dialed = async {
                let conn = endpoint.dial(&addr, &fingerprint).await?;
                let (mut send, recv) = conn.open_bi().await?;
                write_frame(
                    &mut send,
                    &Control::Hello {
                        node: me.to_string(),
                    },
                )
                .await?;
                Ok::<_, super::link::LinkError>((conn, send, recv))
            };
            match dialed.await {
                Ok((conn, send, recv)) => {
                    tracing::info!(%node, %addr, "node link up");
                    start_link(node, true, conn, send, recv, events, metrics).await;
                }
                Err(e) => {
                    tracing::warn!(%node, %addr, "cannot dial the node link: {e}");
                    let _ = events.send(LinkEvent::DialFailed { node }).await;
                }
            }
        });
    }

    fn redial_later(&self, node: Arc<str>) {
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REDIAL_AFTER).await;
            let _ = events.send(LinkEvent::Redial { node }).await;
        });
    }

    /// Whether this node still takes any track from `node`.
    fn wants_from(&self, node: &str) -> bool {
        self.inbound
            .values()
            .any(|t| !t.workers.is_empty() && t.origin.as_ref().is_some_and(|o| &*o.node == node))
    }

    fn control_dialed(&self, node: &str, frame: Control) {
        let sent = (self.peers.get(node).and_then(|p| p.dialed.as_ref()))
            .is_some_and(|link| link.control.try_send(frame).is_ok());
        if !sent {
            self.metrics.cascade_messages_dropped.inc();
        }
    }

    fn control_accepted(&self, node: &str, frame: Control) {
        let sent =
            (self.accepted.get(node)).is_some_and(|link| link.control.try_send(frame).is_ok());
        if !sent {
            self.metrics.cascade_messages_dropped.inc();
        }
    }

    fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Datagram { node, bytes } => {
                let Some((key, packet)) = decode_packet(&bytes, Instant::now()) else {
                    self.metrics.cascade_packets_dropped.inc();
                    return;
                };
                let Some(local) = self.by_origin.get(&node).and_then(|k| k.get(&key)) else {
                    self.metrics.cascade_packets_dropped.inc();
                    return;
                };
                let local = *local;
                let Some(track) = self.inbound.get_mut(&local) else {
                    return;
                };
                self.metrics.cascade_packets_in.inc();
                for &worker in track.workers.keys() {
                    if let Some(batch) = self.pending.get_mut(worker) {
                        batch.push((local, packet.clone()));
                    }
                }
                let missing = track.gaps.observe(packet.layer, packet.seq);
                if !missing.is_empty() {
                    let nack = Control::Nack {
                        key,
                        layer: packet.layer,
                        seqs: missing,
                    };
                    self.control_dialed(&node, nack);
                }
            }
            LinkEvent::Control {
                node,
                dialed: false,
                frame,
            } => self.on_subscriber_control(node, frame),
            LinkEvent::Control {
                node,
                dialed: true,
                frame,
            } => self.on_publisher_control(&node, frame),
            LinkEvent::Dialed {
                node,
                conn,
                control,
            } => {
                let Some(peer) = self.peers.get_mut(&node) else {
                    conn.close(0u32.into(), b"node gone");
                    return;
                };
                peer.dialing = false;
                peer.dialed = Some(Link {
                    conn,
                    control,
                    _gauge: GaugeGuard::new(&self.metrics, |m| &m.cascade_links),
                });
                let keys: Vec<TrackKey> = (self.inbound.iter())
                    .filter(|(_, t)| t.origin.as_ref().is_some_and(|o| o.node == node))
                    .map(|(k, _)| *k)
                    .collect();
                for key in keys {
                    self.sync_inbound(key);
                }
            }
            LinkEvent::DialFailed { node } => {
                if let Some(peer) = self.peers.get_mut(&node) {
                    peer.dialing = false;
                    if self.wants_from(&node) {
                        self.redial_later(node);
                    }
                }
            }
            LinkEvent::Redial { node } => {
                if self.wants_from(&node) {
                    self.dial(&node);
                }
            }
            LinkEvent::Accepted {
                node,
                conn,
                control,
            } => {
                tracing::info!(%node, "node link accepted");
                let link = Link {
                    conn,
                    control,
                    _gauge: GaugeGuard::new(&self.metrics, |m| &m.cascade_links),
                };
                if let Some(old) = self.accepted.insert(node.clone(), link) {
                    old.conn.close(0u32.into(), b"replaced");
                }
            }
            LinkEvent::Closed { node, dialed, id } => {
                if dialed {
                    let Some(peer) = self.peers.get_mut(&node) else {
                        return;
                    };
                    if peer
                        .dialed
                        .as_ref()
                        .is_none_or(|l| l.conn.stable_id() != id)
                    {
                        return;
                    }
                    peer.dialed = None;
                    tracing::info!(%node, "node link lost");
                    for track in self.inbound.values_mut() {
                        if track.origin.as_ref().is_some_and(|o| o.node == node) {
                            track.attached = false;
                        }
                    }
                    if self.wants_from(&node) {
                        self.redial_later(node);
                    }
                } else if self
                    .accepted
                    .get(&node)
                    .is_some_and(|l| l.conn.stable_id() == id)
                {
                    self.accepted.remove(&node);
                    self.drop_subscriber_node(&node);
                }
            }
        }
    }

    /// A node that subscribes to this node's tracks asks something.
    fn on_subscriber_control(&mut self, node: Arc<str>, frame: Control) {
        match frame {
            Control::Attach { key, worker } => {
                let key = TrackKey::from_raw(key);
                let out = self.outbound.entry(key).or_insert_with(|| Outbound {
                    worker,
                    nodes: HashMap::new(),
                    sent: SentBuffer::default(),
                });
                if out.worker != worker {
                    return; // a confused peer: the key lives on another worker
                }
                let first = out.nodes.is_empty();
                out.nodes.insert(node, u32::MAX);
                if first {
                    // The worker answers `detach` if it has no such track.
                    self.gateway.attach(worker, key);
                }
            }
            Control::Detach { key, .. } => {
                let key = TrackKey::from_raw(key);
                if let Some(out) = self.outbound.get_mut(&key) {
                    out.nodes.remove(&node);
                    self.after_subscriber_change(key);
                }
            }
            Control::Wants { key, layers, .. } => {
                let key = TrackKey::from_raw(key);
                if let Some(out) = self.outbound.get_mut(&key)
                    && let Some(w) = out.nodes.get_mut(&node)
                {
                    *w = layers;
                    self.after_subscriber_change(key);
                }
            }
            Control::Keyframe { key, layers, .. } => {
                let key = TrackKey::from_raw(key);
                if let Some(out) = self.outbound.get(&key)
                    && out.nodes.contains_key(&node)
                {
                    self.gateway.request_keyframe(out.worker, key, layers);
                }
            }
            Control::Nack { key, layer, seqs } => {
                let key = TrackKey::from_raw(key);
                let (Some(out), Some(link)) = (self.outbound.get(&key), self.accepted.get(&node))
                else {
                    return;
                };
                // At most what one NACK may name: a peer cannot make this node send more.
                let seqs = &seqs[..seqs.len().min(super::repair::MAX_GAP as usize)];
                for datagram in out.sent.find(layer, seqs) {
                    if link.conn.send_datagram(datagram.clone()).is_ok() {
                        self.metrics.cascade_packets_repaired.inc();
                    }
                }
            }
            other => tracing::debug!(%node, ?other, "unexpected frame from a subscribing node"),
        }
    }

    /// Tells the publisher's worker what the nodes take of a local track now.
    fn after_subscriber_change(&mut self, key: TrackKey) {
        let Some(out) = self.outbound.get(&key) else {
            return;
        };
        if out.nodes.is_empty() {
            self.gateway.detach(out.worker, key);
            self.outbound.remove(&key);
        } else {
            let wants = out.nodes.values().fold(0, |a, w| a | w);
            self.gateway.want(out.worker, key, wants);
        }
    }

    /// A subscribing node's link closed: it takes nothing more.
    fn drop_subscriber_node(&mut self, node: &str) {
        let keys: Vec<TrackKey> = (self.outbound.iter_mut())
            .filter_map(|(k, o)| o.nodes.remove(node).map(|_| *k))
            .collect();
        for key in keys {
            self.after_subscriber_change(key);
        }
    }

    /// The node publishing a relayed track tells something of it.
    fn on_publisher_control(&mut self, node: &str, frame: Control) {
        match frame {
            Control::Views { key, views } => {
                let Some(local) = self.by_origin.get(node).and_then(|k| k.get(&key)) else {
                    return;
                };
                let Some(track) = self.inbound.get(local) else {
                    return;
                };
                let views: Arc<[_]> = views.into();
                for &worker in track.workers.keys() {
                    self.gateway.layer_views(worker, *local, views.clone());
                }
            }
            // The room state that follows removes the track.
            Control::Gone { .. } => {}
            other => tracing::debug!(%node, ?other, "unexpected frame from a publishing node"),
        }
    }

    fn on_command(&mut self, command: RelayCommand) {
        match command {
            RelayCommand::Track {
                key,
                node,
                remote_key,
                remote_worker,
            } => {
                self.by_origin
                    .entry(node.clone())
                    .or_default()
                    .insert(remote_key, key);
                let track = self
                    .inbound
                    .entry(key)
                    .or_insert_with(|| Inbound::new(None));
                track.origin = Some(Origin {
                    node,
                    key: remote_key,
                    worker: remote_worker,
                });
                track._gauge = Some(GaugeGuard::new(&self.metrics, |m| &m.cascade_tracks_in));
                self.sync_inbound(key);
            }
            RelayCommand::Untrack { key } => {
                let Some(mut track) = self.inbound.remove(&key) else {
                    return;
                };
                let Some(origin) = track.origin.take() else {
                    return;
                };
                if let Some(keys) = self.by_origin.get_mut(&origin.node) {
                    keys.remove(&origin.key);
                }
                if track.attached {
                    let frame = Control::Detach {
                        key: origin.key,
                        worker: origin.worker,
                    };
                    self.control_dialed(&origin.node, frame);
                }
            }
            RelayCommand::Peer {
                node,
                addr,
                fingerprint,
            } => {
                let peer = self.peers.entry(node.clone()).or_default();
                if peer.fingerprint != fingerprint || peer.addr != addr {
                    // New or restarted under the same id: whatever link there was is stale.
                    if let Some(old) = peer.dialed.take() {
                        old.conn.close(0u32.into(), b"node restarted");
                    }
                    peer.addr = addr;
                    peer.fingerprint = fingerprint;
                    if self.wants_from(&node) {
                        self.dial(&node);
                    }
                }
            }
            RelayCommand::PeerGone { node } => {
                if let Some(peer) = self.peers.remove(&node)
                    && let Some(link) = peer.dialed
                {
                    link.conn.close(0u32.into(), b"node gone");
                }
                if let Some(link) = self.accepted.remove(&node) {
                    link.conn.close(0u32.into(), b"node gone");
                }
                self.drop_subscriber_node(&node);
                self.by_origin.remove(&node);
            }
        }
    }
}

impl Inbound {
    fn new(origin: Option<Origin>) -> Self {
        Inbound {
            origin,
            workers: HashMap::new(),
            wants_sent: u32::MAX,
            attached: false,
            gaps: GapDetector::default(),
            _gauge: None,
        }
    }
}

/// Accepts nodes dialing in: each says who it is first.
async fn accept_links(
    endpoint: Arc<LinkEndpoint>,
    events: mpsc::Sender<LinkEvent>,
    metrics: Arc<Metrics>,
) {
    while let Some(accepted) = endpoint.accept().await {
        let (events, metrics) = (events.clone(), metrics.clone());
        tokio::spawn(async move {
            let greeted = async {
                let conn = accepted?;
                let (send, mut recv) = conn.accept_bi().await?;
                match read_frame(&mut recv).await? {
                    Some(Control::Hello { node }) => Ok((node, conn, send, recv)),
                    _ => Err(super::link::LinkError::Frame(
                        "a link that did not say hello".into(),
                    )),
                }
            };
            match greeted.await {
                Ok((node, conn, send, recv)) => {
                    start_link(node.into(), false, conn, send, recv, events, metrics).await;
                }
                Err(e) => tracing::warn!("a node link refused: {e}"),
            }
        });
    }
}

/// Starts a link's reader (control frames and datagrams, to the relay) and its control
/// writer, and hands the link to the relay.
async fn start_link(
    node: Arc<str>,
    dialed: bool,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<LinkEvent>,
    metrics: Arc<Metrics>,
) {
    let (control, mut control_rx) = mpsc::channel::<Control>(CONTROL_QUEUE);
    tokio::spawn(async move {
        while let Some(frame) = control_rx.recv().await {
            if let Err(e) = write_frame(&mut send, &frame).await {
                tracing::debug!("node link control: {e}");
                break;
            }
        }
    });
    // Control frames: read_frame is not cancel-safe, so it has a task of its own. Whatever
    // ends it closes the connection, which ends the datagram reader below.
    let (frames_conn, frames_node, frames_events) = (conn.clone(), node.clone(), events.clone());
    let (reader_conn, reader_node, reader_events) = (conn.clone(), node.clone(), events.clone());
    tokio::spawn(async move {
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(frame)) => {
                    let event = LinkEvent::Control {
                        node: frames_node.clone(),
                        dialed,
                        frame,
                    };
                    if frames_events.send(event).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                // A closing connection ends its stream too: that is no news.
                Err(e) if frames_conn.close_reason().is_some() => {
                    tracing::debug!(node = %frames_node, "node link control stream: {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!(node = %frames_node, "node link control stream: {e}");
                    break;
                }
            }
        }
        frames_conn.close(0u32.into(), b"control stream ended");
    });
    tokio::spawn(async move {
        let id = reader_conn.stable_id();
        loop {
            match reader_conn.read_datagram().await {
                Ok(bytes) => {
                    let event = LinkEvent::Datagram {
                        node: reader_node.clone(),
                        bytes,
                    };
                    if reader_events.try_send(event).is_err() {
                        metrics.cascade_packets_dropped.inc();
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %reader_node, "node link closed: {e}");
                    break;
                }
            }
        }
        let _ = reader_events
            .send(LinkEvent::Closed {
                node: reader_node,
                dialed,
                id,
            })
            .await;
    });
    let event = if dialed {
        LinkEvent::Dialed {
            node,
            conn,
            control,
        }
    } else {
        LinkEvent::Accepted {
            node,
            conn,
            control,
        }
    };
    let _ = events.send(event).await;
}
