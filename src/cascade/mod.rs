//! Cascading: one room served by several nodes of a cluster (`--cluster-policy cascade`).
//!
//! Each node hosting a room publishes what it holds of it (its members and tracks) on a Redis
//! channel on every change and every heartbeat; the others apply it to their copy of the room
//! (`Room::apply_remote`), so every node's members hear the same membership and track events,
//! and forget a node not heard of for a TTL. Chat lines go the same way. Media goes between
//! the nodes on the node link ([`link`]), moved by the [`relay`].
//!
//! Knows rooms (above them) and the media plane's gateway; the media plane and `forward/`
//! know nothing of it.

mod link;
mod relay;
mod repair;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::cluster::Cluster;
use crate::media::Gateway;
use crate::metrics::Metrics;
use crate::room::{Registry, RemoteUpdate, RoomNotice};
use crate::signal::protocol::RoomMode;
pub use link::{KnownCerts, LinkEndpoint, LinkError};
use relay::{Relay, RelayCommand};
use wire::{BusBody, BusMessage, CHANNEL};

/// Bus messages queued for the cascade task before new ones are dropped.
const BUS_QUEUE: usize = 4096;

/// Where this node's link is and who it is, as the other nodes are told.
#[derive(Debug, Clone)]
pub struct CascadeConfig {
    /// Where the link's socket binds.
    pub bind: SocketAddr,
    /// The host other nodes reach this one at (the host of `--node-address`).
    pub host: String,
}

/// Starts cascading: the node link, the relay and the room-state exchange. Runs until
/// `shutdown`, then tells the other nodes this node holds nothing any more.
pub async fn start(
    config: CascadeConfig,
    cluster: Cluster,
    registry: Arc<Registry>,
    gateway: Gateway,
    notices: mpsc::Receiver<RoomNotice>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, LinkError> {
    let known = KnownCerts::default();
    let endpoint = Arc::new(LinkEndpoint::bind(config.bind, known.clone())?);
    let port = endpoint.local_addr()?.port();
    let link = match config.host.contains(':') {
        true => format!("[{}]:{port}", config.host.trim_matches(['[', ']'])),
        false => format!("{}:{port}", config.host),
    };
    tracing::info!(%link, "node link listening");
    let me: Arc<str> = cluster.node_id().into();
    let gateway_index = gateway.index();
    let relay = Relay::new(me.clone(), gateway, endpoint.clone(), metrics.clone());
    let (relay_tx, relay_rx) = mpsc::unbounded_channel();
    tokio::spawn(relay.run(relay_rx, shutdown.clone()));
    let bus = cluster.subscribe(CHANNEL, BUS_QUEUE, metrics.cascade_messages_dropped.clone());
    let task = Exchange {
        me,
        link,
        cert: endpoint.fingerprint().to_owned(),
        cluster,
        registry,
        relay: relay_tx,
        known,
        gateway_index,
        metrics,
        announced: HashSet::new(),
        heard: HashMap::new(),
        nodes: HashMap::new(),
        relayed: HashMap::new(),
        expire_after: Instant::now(),
    };
    Ok(tokio::spawn(task.run(bus, notices, shutdown)))
}

/// The room-state exchange on the Redis channel.
struct Exchange {
    me: Arc<str>,
    link: String,
    cert: String,
    cluster: Cluster,
    registry: Arc<Registry>,
    relay: mpsc::UnboundedSender<RelayCommand>,
    known: KnownCerts,
    gateway_index: usize,
    metrics: Arc<Metrics>,
    /// Rooms this node told the others it holds.
    announced: HashSet<String>,
    /// When each (room, node) pair was last heard of.
    heard: HashMap<(String, Arc<str>), Instant>,
    /// Each node heard of: when last, and its certificate's fingerprint.
    nodes: HashMap<Arc<str>, (Instant, String)>,
    /// The keys of the tracks relayed here, per room.
    relayed: HashMap<String, HashSet<crate::forward::TrackKey>>,
    /// Nothing expires before this (Redis was down: silence proves nothing).
    expire_after: Instant,
}

impl Exchange {
    async fn run(
        mut self,
        mut bus: mpsc::Receiver<String>,
        mut notices: mpsc::Receiver<RoomNotice>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.cluster.beat_interval());
        loop {
            tokio::select! {
                Some(notice) = notices.recv() => match notice {
                    RoomNotice::Changed(room) => {
                        self.publish_state(room.as_str()).await;
                    }
                    RoomNotice::Chat(room, line) => {
                        let body = BusBody::Chat { line: line.to_string() };
                        self.publish(room.as_str(), body).await;
                    }
                },
                Some(text) = bus.recv() => self.on_message(&text).await,
                _ = tick.tick() => self.refresh().await,
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
            }
        }
        // Tell the others now rather than let them wait out the TTL.
        let rooms: Vec<String> = self.announced.iter().cloned().collect();
        for room in rooms {
            self.publish(&room, self.empty_state()).await;
        }
    }

    fn empty_state(&self) -> BusBody {
        BusBody::State {
            link: self.link.clone(),
            cert: self.cert.clone(),
            members: Vec::new(),
            tracks: Vec::new(),
        }
    }

    async fn publish(&self, room: &str, body: BusBody) -> bool {
        let message = BusMessage {
            node: self.me.to_string(),
            room: room.to_owned(),
            body,
        };
        let Ok(text) = serde_json::to_string(&message) else {
            return false;
        };
        if let Err(e) = self.cluster.publish(CHANNEL, &text).await {
            self.metrics.cascade_messages_dropped.inc();
            tracing::debug!(room, "cannot publish the room's state: {e}");
            return false;
        }
        true
    }

    /// Publishes what this node holds of `room` (nothing if it closed here).
    async fn publish_state(&mut self, room: &str) -> bool {
        let open = self
            .registry
            .room(room)
            .filter(|r| r.mode() == RoomMode::Sfu);
        let Some(open) = open else {
            if self.announced.remove(room) {
                self.forget_room(room);
                return self.publish(room, self.empty_state()).await;
            }
            return true;
        };
        if self.announced.insert(room.to_owned()) {
            // New here: the others answer with their state.
            self.publish(room, BusBody::Hello).await;
        }
        let (members, tracks) = open.local_state();
        let body = BusBody::State {
            link: self.link.clone(),
            cert: self.cert.clone(),
            members,
            tracks,
        };
        self.publish(room, body).await
    }

    /// Every heartbeat: publishes every room's state (which repairs lost messages and shows
    /// this node alive), and forgets nodes not heard of for a TTL.
    async fn refresh(&mut self) {
        let mut rooms: HashSet<String> = self.registry.room_names().into_iter().collect();
        rooms.extend(self.announced.iter().cloned());
        let ttl = self.cluster.ttl();
        for room in rooms {
            if !self.publish_state(&room).await {
                // Redis is down: nobody is heard meanwhile, so nobody expires until a TTL
                // after it is back (the call goes on over the node links).
                self.expire_after = Instant::now() + ttl;
                break;
            }
        }
        if Instant::now() < self.expire_after {
            return;
        }
        let stale: Vec<(String, Arc<str>)> = (self.heard.iter())
            .filter(|(_, at)| at.elapsed() > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for (room, node) in stale {
            tracing::info!(room, %node, "a node's part of the room expired");
            self.apply(&room, &node, Vec::new(), Vec::new());
        }
        let gone: Vec<Arc<str>> = (self.nodes.iter())
            .filter(|(_, (at, _))| at.elapsed() > ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for node in gone {
            if let Some((_, cert)) = self.nodes.remove(&node) {
                self.known.remove(&cert);
            }
            let _ = self.relay.send(RelayCommand::PeerGone { node });
        }
    }

    async fn on_message(&mut self, text: &str) {
        let message: BusMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("a malformed cascade message: {e}");
                return;
            }
        };
        if *message.node == *self.me {
            return;
        }
        let node: Arc<str> = message.node.into();
        let room = message.room;
        match message.body {
            BusBody::State {
                link,
                cert,
                members,
                tracks,
            } => {
                self.heard_of(&node, &link, &cert);
                self.apply(&room, &node, members, tracks);
            }
            BusBody::Hello => {
                if self.registry.room(&room).is_some() {
                    self.publish_state(&room).await;
                }
            }
            BusBody::Chat { line } => {
                if let Some(open) = self.registry.room(&room) {
                    open.chat_from_remote(&line.into());
                }
            }
        }
    }

    /// Notes a node alive, its link address and certificate.
    fn heard_of(&mut self, node: &Arc<str>, link: &str, cert: &str) {
        let previous = self
            .nodes
            .insert(node.clone(), (Instant::now(), cert.to_owned()));
        if previous.as_ref().is_some_and(|(_, c)| c == cert) {
            return;
        }
        if let Some((_, old)) = previous {
            self.known.remove(&old);
        }
        self.known.insert(cert.to_owned(), node.to_string());
        let _ = self.relay.send(RelayCommand::Peer {
            node: node.clone(),
            addr: link.to_owned(),
            fingerprint: cert.to_owned(),
        });
    }

    /// Applies a node's state of a room open here, and tells the relay of tracks come and gone.
    fn apply(
        &mut self,
        room: &str,
        node: &Arc<str>,
        members: Vec<crate::signal::protocol::ParticipantInfo>,
        tracks: Vec<crate::room::RemoteTrack>,
    ) {
        let key = (room.to_owned(), node.clone());
        let open = self
            .registry
            .room(room)
            .filter(|r| r.mode() == RoomMode::Sfu);
        let Some(open) = open else {
            self.heard.remove(&key);
            return;
        };
        if members.is_empty() {
            self.heard.remove(&key);
        } else {
            self.heard.insert(key, Instant::now());
        }
        let RemoteUpdate { added, removed } =
            open.apply_remote(node, members, tracks, self.gateway_index);
        let relayed = self.relayed.entry(room.to_owned()).or_default();
        for publication in removed {
            relayed.remove(&publication.route.key);
            let key = publication.route.key;
            let _ = self.relay.send(RelayCommand::Untrack { key });
        }
        for publication in added {
            let Some(origin) = &publication.origin else {
                continue;
            };
            relayed.insert(publication.route.key);
            let _ = self.relay.send(RelayCommand::Track {
                key: publication.route.key,
                node: origin.node.clone(),
                remote_key: origin.key,
                remote_worker: origin.worker,
            });
        }
    }

    /// The room closed here: its relayed tracks go with it.
    fn forget_room(&mut self, room: &str) {
        for key in self.relayed.remove(room).unwrap_or_default() {
            let _ = self.relay.send(RelayCommand::Untrack { key });
        }
        self.heard.retain(|(r, _), _| r != room);
    }
}
