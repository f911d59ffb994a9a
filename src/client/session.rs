//! The client's signaling session: the WebSocket reader and writer tasks, and the session task
//! that owns the peer connections and reacts to server messages, local ICE candidates and the
//! handle's commands, one at a time.
//!
//! Mesh rooms: the newcomer offers to every participant already there (they never offer to a
//! newcomer first), so the initial negotiations cannot collide; later renegotiations use perfect
//! negotiation with the lexically greater participant id as the polite peer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit};

use super::ClientOptions;
use super::media::LocalTrack;
use super::peer::{Link, LinkState, Outgoing, candidate_to_wire};
use super::stats::Shared;
use crate::signal::protocol::{ClientMessage, MediaKind, RoomMode, ServerMessage};

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Inputs of the session task.
pub(crate) enum Event {
    Server(ServerMessage),
    LocalCandidate {
        peer: Option<String>,
        candidate: Option<RTCIceCandidateInit>,
    },
    Publish {
        kind: MediaKind,
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
    Unpublish {
        track_id: String,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    Leave {
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    /// ICE restart on the connection to the SFU.
    RestartIce {
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What the handle keeps of a link, for queries and chat.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub pc: Arc<dyn PeerConnection>,
    pub state: Arc<LinkState>,
}

pub(crate) type LinkRegistry = Arc<Mutex<BTreeMap<Option<String>, LinkHandle>>>;

/// Replaces the writer's socket (Some) or cuts it (None: frames wait in the outbox).
pub(crate) type SinkSwap = mpsc::UnboundedSender<Option<SplitSink<Socket, Message>>>;

/// Forwards outgoing frames to the socket; ends after a close frame, or when the client is gone.
/// While there is no socket (cut, or a write failed) frames stay queued for the next one (a
/// resume).
pub(crate) async fn run_writer(
    sink: SplitSink<Socket, Message>,
    mut outbox: mpsc::UnboundedReceiver<Message>,
    mut swaps: mpsc::UnboundedReceiver<Option<SplitSink<Socket, Message>>>,
) {
    let mut sink = Some(sink);
    loop {
        tokio::select! {
            biased;
            swap = swaps.recv() => match swap {
                // Dropping the old half without a close frame: an abrupt cut.
                Some(next) => sink = next,
                None => break,
            },
            message = outbox.recv(), if sink.is_some() => {
                let Some(message) = message else { break };
                let Some(current) = sink.as_mut() else { continue };
                let is_close = matches!(message, Message::Close(_));
                if let Err(e) = current.send(message).await {
                    debug!("signaling write failed: {e}");
                    sink = None;
                    continue;
                }
                if is_close {
                    break;
                }
            }
        }
    }
    if let Some(mut sink) = sink {
        let _ = sink.close().await;
    }
}

/// Turns incoming frames into events; records the socket closing.
pub(crate) async fn run_reader(
    mut stream: SplitStream<Socket>,
    events: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
) {
    let mut close_code = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => match serde_json::from_str::<ServerMessage>(text.as_str()) {
                Ok(message) => {
                    if events.send(Event::Server(message)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!("unparsable server frame: {e}");
                    shared.update(|r| r.unparsed_frames += 1);
                }
            },
            Ok(Message::Close(frame)) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Message::Binary(_)) => shared.update(|r| r.unparsed_frames += 1),
            Ok(_) => {}
            Err(e) => {
                debug!("signaling read failed: {e}");
                break;
            }
        }
    }
    shared.update(|r| {
        r.socket_closed = true;
        r.close_code = close_code;
    });
}

/// The session task's state.
pub(crate) struct Session {
    pub participant_id: String,
    pub mode: RoomMode,
    pub opts: ClientOptions,
    pub shared: Arc<Shared>,
    pub outbox: mpsc::UnboundedSender<Message>,
    pub events: mpsc::UnboundedSender<Event>,
    pub registry: LinkRegistry,
    links: HashMap<Option<String>, Link>,
    tracks: Vec<Arc<LocalTrack>>,
    next_track: usize,
    /// After `leave`, offers from peers are no longer answered.
    left: bool,
    /// Tells the generators to stop; dropping it (session aborted) stops them too.
    stop: watch::Sender<bool>,
}

impl Session {
    pub fn new(
        participant_id: String,
        mode: RoomMode,
        opts: ClientOptions,
        shared: Arc<Shared>,
        outbox: mpsc::UnboundedSender<Message>,
        events: mpsc::UnboundedSender<Event>,
        registry: LinkRegistry,
    ) -> Self {
        Self {
            participant_id,
            mode,
            opts,
            shared,
            outbox,
            events,
            registry,
            links: HashMap::new(),
            tracks: Vec::new(),
            next_track: 0,
            left: false,
            stop: watch::channel(false).0,
        }
    }

    fn send(&self, message: &ClientMessage) {
        match serde_json::to_string(message) {
            Ok(text) => {
                let _ = self.outbox.send(Message::Text(text.into()));
            }
            Err(e) => warn!("cannot serialize {message:?}: {e}"),
        }
    }

    fn send_outgoing(&self, peer: &Option<String>, outgoing: Outgoing) {
        let message = match outgoing {
            Outgoing::Offer(sdp) => ClientMessage::Offer {
                sdp,
                to: peer.clone(),
            },
            Outgoing::Answer(sdp) => ClientMessage::Answer {
                sdp,
                to: peer.clone(),
            },
        };
        self.send(&message);
    }

    /// Starts the tracks from the options and the first negotiation(s).
    pub async fn start(&mut self, others: Vec<String>) -> anyhow::Result<()> {
        if self.opts.publish_audio {
            self.new_track(MediaKind::Audio);
        }
        if self.opts.publish_video {
            self.new_track(MediaKind::Video);
        }
        let peers: Vec<Option<String>> = match self.mode {
            RoomMode::Sfu => vec![None],
            RoomMode::Mesh => others.into_iter().map(Some).collect(),
        };
        for peer in peers {
            let mut link = self.new_link(peer.clone()).await?;
            link.create_chat(self.mode).await?;
            if let Some(offer) = link.offer().await? {
                self.send_outgoing(&peer, offer);
            }
            self.links.insert(peer, link);
        }
        Ok(())
    }

    fn new_track(&mut self, kind: MediaKind) -> Arc<LocalTrack> {
        let track_id = format!(
            "{}-{}",
            match kind {
                MediaKind::Audio => "audio",
                MediaKind::Video => "video",
            },
            self.next_track
        );
        self.next_track += 1;
        let track = LocalTrack::new(&self.participant_id, track_id, kind, self.opts.media);
        self.shared.update(|r| {
            r.local_tracks
                .push((track.track_id.clone(), kind, track.stats.clone()))
        });
        tokio::spawn(track.clone().run(self.stop.subscribe()));
        self.tracks.push(track.clone());
        track
    }

    /// Builds a link with every published track attached.
    async fn new_link(&mut self, peer: Option<String>) -> anyhow::Result<Link> {
        let polite = match &peer {
            None => true,
            Some(peer) => self.participant_id.as_str() > peer.as_str(),
        };
        let mut link = Link::new(
            peer.clone(),
            polite,
            self.mode,
            &self.opts,
            self.shared.clone(),
            self.events.clone(),
        )
        .await?;
        for track in &self.tracks {
            track.attach(&mut link).await?;
        }
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer,
                LinkHandle {
                    pc: link.pc.clone(),
                    state: link.state.clone(),
                },
            );
        Ok(link)
    }

    async fn remove_link(&mut self, peer: &Option<String>) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
        if let Some(link) = self.links.remove(peer) {
            link.close().await;
        }
        self.shared.update(|r| {
            r.links.remove(peer);
        });
    }

    pub async fn close_all(&mut self) {
        self.stop.send_replace(true);
        self.tracks.clear();
        let peers: Vec<Option<String>> = self.links.keys().cloned().collect();
        for peer in peers {
            self.remove_link(&peer).await;
        }
    }

    /// Runs until `Close` (or until every sender of events is gone).
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            match event {
                Event::Server(message) => self.on_server(message).await,
                Event::LocalCandidate { peer, candidate } => {
                    if self.links.contains_key(&peer) {
                        self.send(&ClientMessage::Candidate {
                            candidate: candidate.map(candidate_to_wire),
                            to: peer,
                        });
                    }
                }
                Event::Publish { kind, reply } => {
                    let _ = reply.send(self.publish(kind).await);
                }
                Event::Unpublish { track_id, reply } => {
                    let _ = reply.send(self.unpublish(&track_id).await);
                }
                Event::RestartIce { reply } => {
                    let key = None;
                    let result = match self.links.get_mut(&key) {
                        Some(link) => link.restart_ice().await,
                        None => Err(anyhow::anyhow!("no connection to the SFU")),
                    };
                    let _ = reply.send(result.map(|out| {
                        if let Some(outgoing) = out {
                            self.send_outgoing(&key, outgoing);
                        }
                    }));
                }
                Event::Leave { reply } => {
                    self.send(&ClientMessage::Leave);
                    self.left = true;
                    self.close_all().await;
                    let _ = reply.send(Ok(()));
                }
                Event::Close { reply } => {
                    self.close_all().await;
                    let _ = self.outbox.send(Message::Close(None));
                    let _ = reply.send(());
                    return;
                }
            }
        }
        self.close_all().await;
    }

    async fn publish(&mut self, kind: MediaKind) -> anyhow::Result<String> {
        anyhow::ensure!(!self.left, "the client has left the room");
        let track = self.new_track(kind);
        self.change_on_every_link(&track, true).await?;
        Ok(track.track_id.clone())
    }

    async fn unpublish(&mut self, track_id: &str) -> anyhow::Result<()> {
        let Some(pos) = self.tracks.iter().position(|t| t.track_id == track_id) else {
            anyhow::bail!("no published track `{track_id}`");
        };
        let track = self.tracks.remove(pos);
        self.change_on_every_link(&track, false).await
    }

    /// Attaches `track` to (or detaches it from) every connection and renegotiates each.
    async fn change_on_every_link(
        &mut self,
        track: &Arc<LocalTrack>,
        attach: bool,
    ) -> anyhow::Result<()> {
        let peers: Vec<Option<String>> = self.links.keys().cloned().collect();
        for peer in peers {
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            if attach {
                track.attach(link).await?;
            } else {
                track.detach(link).await?;
            }
            if let Some(offer) = link.offer().await? {
                self.send_outgoing(&peer, offer);
            }
        }
        Ok(())
    }

    /// The link a relayed message is for, if this room mode expects one from there.
    fn link_key(&self, from: Option<String>) -> Option<Option<String>> {
        match (self.mode, from) {
            (RoomMode::Sfu, None) => Some(None),
            (RoomMode::Mesh, Some(peer)) => Some(Some(peer)),
            (mode, from) => {
                warn!(?mode, ?from, "signaling message from an unexpected origin");
                None
            }
        }
    }

    async fn on_server(&mut self, message: ServerMessage) {
        match message {
            ServerMessage::Offer { sdp, from } => {
                if from.is_none() {
                    self.shared
                        .update(|r| r.last_server_offer = Some(sdp.clone()));
                }
                let Some(key) = self.link_key(from) else {
                    return;
                };
                if self.left {
                    return;
                }
                if !self.links.contains_key(&key) {
                    if key.is_none() {
                        return; // the SFU link is gone (closed): nothing to negotiate
                    }
                    match self.new_link(key.clone()).await {
                        Ok(link) => {
                            self.links.insert(key.clone(), link);
                        }
                        Err(e) => {
                            warn!(peer = ?key, "cannot create a link for an offer: {e:#}");
                            return;
                        }
                    }
                }
                let Some(link) = self.links.get_mut(&key) else {
                    return;
                };
                let result = link.on_offer(sdp).await;
                match result {
                    Ok(out) => {
                        for outgoing in out {
                            self.send_outgoing(&key, outgoing);
                        }
                    }
                    Err(e) => warn!(peer = ?key, "handling an offer failed: {e:#}"),
                }
            }
            ServerMessage::Answer { sdp, from } => {
                let Some(key) = self.link_key(from) else {
                    return;
                };
                let Some(link) = self.links.get_mut(&key) else {
                    return;
                };
                match link.on_answer(sdp).await {
                    Ok(Some(outgoing)) => self.send_outgoing(&key, outgoing),
                    Ok(None) => {}
                    Err(e) => warn!(peer = ?key, "handling an answer failed: {e:#}"),
                }
            }
            ServerMessage::Candidate { candidate, from } => {
                let Some(key) = self.link_key(from) else {
                    return;
                };
                if let Some(link) = self.links.get_mut(&key) {
                    link.on_candidate(candidate).await;
                }
            }
            ServerMessage::ParticipantJoined { ref participant } => {
                let participant = participant.clone();
                self.shared.update(|r| {
                    r.participants
                        .insert(participant.id.clone(), participant.name.clone());
                });
                self.shared.push_event(message);
            }
            ServerMessage::ParticipantLeft { ref participant_id } => {
                let id = participant_id.clone();
                self.shared.update(|r| {
                    r.participants.remove(&id);
                    r.announced_tracks.retain(|t| t.participant_id != id);
                });
                self.shared.push_event(message);
                if self.mode == RoomMode::Mesh {
                    self.remove_link(&Some(id)).await;
                }
            }
            ServerMessage::TrackPublished { ref track } => {
                let track = track.clone();
                self.shared.update(|r| {
                    r.announced_tracks.retain(|t| t.track_id != track.track_id);
                    r.announced_tracks.push(track);
                });
                self.shared.push_event(message);
            }
            ServerMessage::TrackUnpublished { ref track_id, .. } => {
                let id = track_id.clone();
                self.shared
                    .update(|r| r.announced_tracks.retain(|t| t.track_id != id));
                self.shared.push_event(message);
            }
            ServerMessage::SubscriptionState { .. }
            | ServerMessage::ActiveSpeakers { .. }
            | ServerMessage::ParticipantUpdated { .. }
            | ServerMessage::Muted { .. }
            | ServerMessage::ServerDraining { .. } => self.shared.push_event(message),
            ServerMessage::PublisherLayers {
                ref mid,
                ref active,
                ..
            } => {
                // Dynacast: the SFU link's output on that transceiver encodes only these.
                if let Some(link) = self.links.get(&None) {
                    for output in &link.outputs {
                        if output.mid().as_deref() == Some(mid.as_str()) {
                            output.set_active_layers(active);
                        }
                    }
                }
                self.shared.push_event(message);
            }
            ServerMessage::Error {
                code,
                message: ref text,
            } => {
                let text = text.clone();
                debug!(?code, %text, "server error");
                self.shared.update(|r| r.errors.push((code, text)));
                self.shared.push_event(message);
            }
            ServerMessage::Left => {
                self.shared.update(|r| r.left = true);
                self.shared.push_event(message);
            }
            // Only ever an answer to `join`, which `Client::connect` follows.
            ServerMessage::Redirect { .. } => self.shared.push_event(message),
            ServerMessage::Resumed {
                ref participants,
                ref tracks,
                ref resume_token,
                ..
            } => {
                // Messages sent while the socket was down may be lost: take the room as it is.
                let (participants, tracks) = (participants.clone(), tracks.clone());
                let token = resume_token.clone();
                self.shared.set_participants(&participants);
                self.shared.update(|r| {
                    r.announced_tracks = tracks;
                    r.resume_token = Some(token);
                    r.socket_closed = false;
                });
                self.shared.push_event(message);
            }
            ServerMessage::Joined { .. } | ServerMessage::Pong => {
                self.shared.push_event(message);
            }
        }
    }
}
