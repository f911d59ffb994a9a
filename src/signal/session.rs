//! One WebSocket = one participant's state machine: not joined → joined (SFU: with a peer
//! connection; mesh: relaying only) → left. Everything a participant has (room membership,
//! peer connection, forwarding tasks, chat pump) is owned here and torn down in [`Session::leave`],
//! whatever ended the session: a `leave`, a dropped socket, a failed connection, shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::protocol::{
    ChatRelay, ClientMessage, ErrorCode, PROTOCOL_VERSION, RoomMode, ServerMessage,
    parse_client_message,
};
use crate::config::Limits;
use crate::forward::{KeyframeThrottle, TrackForwarder};
use crate::metrics::{GaugeGuard, Metrics};
use crate::room::{JoinError, MemberChannels, Publication, Registry, Room, RoomEvent};
use crate::rtc::{
    ChatChannel, ChatEvent, Peer, PeerEvent, PublishedTrack, RemoteOfferOutcome, RtcEngine,
    RtcError, run_publisher,
};
use crate::types::{IceCandidate, ParticipantId, RoomName};

/// Chat lines queued per participant before new ones are dropped.
const CHAT_QUEUE: usize = 64;
/// Commands queued per forwarder (subscribers coming and going, keyframe requests).
const FORWARDER_COMMANDS: usize = 64;
/// How often a session checks its timers.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// Longest display name, in characters.
const MAX_NAME_CHARS: usize = 64;

/// What every session shares.
#[derive(Debug)]
pub struct ServerContext {
    pub registry: Arc<Registry>,
    pub engine: RtcEngine,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Flips to true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs a session until the socket closes, the participant's media fails, or shutdown.
pub async fn run_session(socket: WebSocket, ctx: Arc<ServerContext>) {
    let _gauge = GaugeGuard::new(&ctx.metrics, |m| &m.sessions);
    let mut session = Session {
        ctx: ctx.clone(),
        socket,
        joined: None,
    };
    let close = session.run().await;
    session.leave().await;
    if let Some(frame) = close {
        let _ = session.socket.send(Message::Close(Some(frame))).await;
    }
}

struct Session {
    ctx: Arc<ServerContext>,
    socket: WebSocket,
    joined: Option<Membership>,
}

struct Membership {
    room: Arc<Room>,
    id: ParticipantId,
    name: String,
    events: mpsc::UnboundedReceiver<RoomEvent>,
    /// Until the `chat` data channel opens; then the chat pump owns it.
    chat_queue: Option<mpsc::Receiver<Arc<str>>>,
    media: Option<Media>,
    _gauge: GaugeGuard,
}

/// The SFU side of a membership.
struct Media {
    peer: Peer,
    events: mpsc::UnboundedReceiver<PeerEvent>,
    /// Publisher stream id (msid) → index in the forwarded stream id `{participant}-{index}`.
    streams: HashMap<String, usize>,
    chat_pump: Option<JoinHandle<()>>,
    /// A client offer was ignored for glare: its candidates may fail and that is expected.
    ignoring_offer: bool,
}

/// Why the loop stopped, as the close frame to send (None: the socket is already gone).
type Close = Option<CloseFrame>;

fn close_frame(code: u16, reason: &str) -> Close {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

async fn recv_or_pending<T>(rx: Option<&mut mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn run(&mut self) -> Close {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (room_events, peer_events) = match self.joined.as_mut() {
                Some(m) => (Some(&mut m.events), m.media.as_mut().map(|m| &mut m.events)),
                None => (None, None),
            };
            // Room and peer events are split borrows of `self.joined`; select on both.
            let step = tokio::select! {
                frame = self.socket.recv() => Step::Socket(frame),
                event = recv_or_pending(room_events) => Step::Room(event),
                event = recv_or_pending(peer_events) => Step::Peer(event),
                _ = shutdown.wait_for(|stop| *stop) => Step::Shutdown,
                _ = watchdog.tick() => Step::Watchdog,
            };
            let outcome = match step {
                Step::Socket(None) => return None,
                Step::Socket(Some(Err(e))) => {
                    tracing::info!("websocket error, closing session: {e}");
                    return close_frame(close_code::SIZE, "message too big or malformed frame");
                }
                Step::Socket(Some(Ok(message))) => self.on_frame(message).await,
                Step::Room(Some(event)) => self.on_room_event(event).await,
                Step::Peer(Some(event)) => self.on_peer_event(event).await,
                // A closed channel would be ready forever: treat it as what it means.
                Step::Peer(None) => self.on_peer_event(PeerEvent::Failed).await,
                Step::Room(None) => {
                    tracing::error!("room event channel closed while joined");
                    return close_frame(close_code::ERROR, "removed from the room");
                }
                Step::Shutdown => {
                    return close_frame(close_code::AWAY, "server shutting down");
                }
                Step::Watchdog => self.check_negotiation().await,
            };
            if let Err(close) = outcome {
                return close;
            }
        }
    }

    async fn send(&mut self, message: &ServerMessage) -> Result<(), Close> {
        let text = match serde_json::to_string(message) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!("serializing {message:?}: {e}");
                return Ok(());
            }
        };
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|_| None)
    }

    async fn error(&mut self, code: ErrorCode, message: impl Into<String>) -> Result<(), Close> {
        let message = message.into();
        tracing::info!(?code, %message, participant = ?self.joined.as_ref().map(|m| &m.id), "client error");
        self.ctx
            .metrics
            .signaling_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send(&ServerMessage::Error { code, message }).await
    }

    async fn on_frame(&mut self, message: Message) -> Result<(), Close> {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self
                    .error(
                        ErrorCode::MalformedJson,
                        "binary frames are not part of the protocol",
                    )
                    .await;
            }
            Message::Close(_) => return Err(None),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        if text.len() > self.ctx.limits.max_message_bytes {
            tracing::warn!(bytes = text.len(), "oversized signaling message, closing");
            return Err(close_frame(close_code::SIZE, "message too big"));
        }
        match parse_client_message(&text) {
            Ok(message) => self.on_message(message).await,
            Err(e) => self.error(e.code, e.message).await,
        }
    }

    async fn on_message(&mut self, message: ClientMessage) -> Result<(), Close> {
        match message {
            ClientMessage::Join { room, name, mode } => self.join(&room, &name, mode).await,
            ClientMessage::Ping => self.send(&ServerMessage::Pong).await,
            ClientMessage::Leave => {
                if self.joined.is_none() {
                    return self
                        .error(ErrorCode::NotJoined, "`leave` before `join`")
                        .await;
                }
                self.leave().await;
                self.send(&ServerMessage::Left).await
            }
            ClientMessage::Offer { sdp, to } => self.on_sdp(true, sdp, to).await,
            ClientMessage::Answer { sdp, to } => self.on_sdp(false, sdp, to).await,
            ClientMessage::Candidate { candidate, to } => self.on_candidate(candidate, to).await,
        }
    }

    async fn join(&mut self, room: &str, name: &str, mode: Option<RoomMode>) -> Result<(), Close> {
        if self.joined.is_some() {
            return self
                .error(ErrorCode::AlreadyJoined, "already in a room; `leave` first")
                .await;
        }
        let Some(room_name) = RoomName::parse(room) else {
            return self
                .error(
                    ErrorCode::InvalidName,
                    "room name must be 1-64 characters of A-Z a-z 0-9 _ . -",
                )
                .await;
        };
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return self
                .error(
                    ErrorCode::InvalidName,
                    "display name must be 1-64 printable characters",
                )
                .await;
        }
        let effective_mode = self
            .ctx
            .registry
            .mode_of(&room_name)
            .unwrap_or(mode.unwrap_or_default());
        if let Err(message) = self.admit(effective_mode) {
            return self.error(ErrorCode::ServerFull, message).await;
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let (chat_tx, chat_queue) = mpsc::channel(CHAT_QUEUE);
        let channels = MemberChannels {
            events: events_tx,
            chat: chat_tx,
        };
        let joined =
            match self
                .ctx
                .registry
                .join(&room_name, name, mode.unwrap_or_default(), channels)
            {
                Ok(joined) => joined,
                Err(e @ JoinError::RoomFull(..)) => {
                    return self.error(ErrorCode::RoomFull, e.to_string()).await;
                }
                Err(e @ JoinError::TooManyRooms(..)) => {
                    return self.error(ErrorCode::ServerFull, e.to_string()).await;
                }
            };
        let room = joined.room.clone();
        let id = joined.participant_id.clone();
        tracing::info!(room = %room.name(), participant = %id, name, mode = ?room.mode(), "joined");

        let mut membership = Membership {
            room: room.clone(),
            id: id.clone(),
            name: name.to_string(),
            events,
            chat_queue: Some(chat_queue),
            media: None,
            _gauge: GaugeGuard::new(&self.ctx.metrics, |m| &m.participants),
        };
        if room.mode() == RoomMode::Sfu {
            let (peer_tx, peer_events) = mpsc::unbounded_channel();
            let peer = match self.ctx.engine.new_peer(id.clone(), peer_tx).await {
                Ok(peer) => peer,
                Err(e) => {
                    self.ctx.registry.leave(&room, &id);
                    let code = match e {
                        RtcError::NoPort => ErrorCode::ServerFull,
                        _ => ErrorCode::Internal,
                    };
                    tracing::error!("peer connection for {id}: {e}");
                    return self
                        .error(code, format!("cannot open a media connection: {e}"))
                        .await;
                }
            };
            let mut media = Media {
                peer,
                events: peer_events,
                streams: HashMap::new(),
                chat_pump: None,
                ignoring_offer: false,
            };
            for publication in &joined.tracks {
                subscribe(&mut media.peer, publication).await;
            }
            membership.media = Some(media);
        }
        self.joined = Some(membership);
        self.send(&ServerMessage::Joined {
            participant_id: id.to_string(),
            room: room.name().to_string(),
            mode: room.mode(),
            participants: joined.participants,
            tracks: joined.tracks.iter().map(|t| t.info.clone()).collect(),
            protocol: PROTOCOL_VERSION,
        })
        .await
    }

    /// Admission control: past the forwarding-rate limit a new SFU participant would push the
    /// server into overload for everyone already in a call, so it is turned away. Mesh rooms
    /// carry no media through the server and are always admitted.
    fn admit(&self, mode: RoomMode) -> Result<(), String> {
        let Some(limit) = self.ctx.limits.forward_pps_limit() else {
            return Ok(());
        };
        if mode == RoomMode::Mesh {
            return Ok(());
        }
        let rate = self.ctx.metrics.forward_rate.load(Ordering::Relaxed);
        if rate < limit {
            return Ok(());
        }
        self.ctx
            .metrics
            .joins_refused_at_capacity
            .fetch_add(1, Ordering::Relaxed);
        Err(format!(
            "the server is at capacity ({rate} packets/s forwarded, limit {limit}); try again later"
        ))
    }

    /// Removes the participant from its room and ends everything it owned. Idempotent.
    async fn leave(&mut self) {
        let Some(membership) = self.joined.take() else {
            return;
        };
        self.ctx.registry.leave(&membership.room, &membership.id);
        if let Some(media) = membership.media {
            if let Some(pump) = media.chat_pump {
                pump.abort();
            }
            media.peer.close().await;
        }
        tracing::info!(room = %membership.room.name(), participant = %membership.id, "left");
    }

    /// The joined membership, or a `not-joined` error to the client.
    async fn membership(&mut self, what: &str) -> Result<Option<&mut Membership>, Close> {
        if self.joined.is_none() {
            self.error(ErrorCode::NotJoined, format!("`{what}` before `join`"))
                .await?;
            return Ok(None);
        }
        Ok(self.joined.as_mut())
    }

    async fn on_sdp(
        &mut self,
        is_offer: bool,
        sdp: String,
        to: Option<String>,
    ) -> Result<(), Close> {
        let what = if is_offer { "offer" } else { "answer" };
        let Some(membership) = self.membership(what).await? else {
            return Ok(());
        };
        let from = Some(membership.id.to_string());
        if membership.room.mode() == RoomMode::Mesh {
            let relayed = if is_offer {
                ServerMessage::Offer { sdp, from }
            } else {
                ServerMessage::Answer { sdp, from }
            };
            return self.relay(to, relayed).await;
        }
        if to.is_some() {
            return self
                .error(
                    ErrorCode::WrongMode,
                    "`to` is for mesh rooms; SFU offers go to the server",
                )
                .await;
        }
        let Some(media) = membership.media.as_mut() else {
            return Ok(());
        };
        let result = if is_offer {
            match media.peer.handle_remote_offer(sdp).await {
                Ok(RemoteOfferOutcome::Answer(answer)) => {
                    media.ignoring_offer = false;
                    Ok(Some(answer))
                }
                Ok(RemoteOfferOutcome::IgnoredForGlare) => {
                    tracing::debug!("client offer ignored for glare");
                    media.ignoring_offer = true;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        } else {
            media.ignoring_offer = false;
            media.peer.handle_remote_answer(sdp).await.map(|()| None)
        };
        match result {
            Ok(Some(answer)) => {
                self.send(&ServerMessage::Answer {
                    sdp: answer,
                    from: None,
                })
                .await?;
                self.offer_if_needed().await
            }
            Ok(None) => self.offer_if_needed().await,
            Err(RtcError::BadSdp(e)) => {
                self.error(ErrorCode::BadSdp, format!("bad {what}: {e}"))
                    .await
            }
            Err(e) => {
                tracing::error!("applying {what}: {e}");
                self.error(ErrorCode::Internal, format!("could not apply {what}"))
                    .await
            }
        }
    }

    async fn on_candidate(
        &mut self,
        candidate: Option<IceCandidate>,
        to: Option<String>,
    ) -> Result<(), Close> {
        let Some(membership) = self.membership("candidate").await? else {
            return Ok(());
        };
        if membership.room.mode() == RoomMode::Mesh {
            let from = Some(membership.id.to_string());
            return self
                .relay(to, ServerMessage::Candidate { candidate, from })
                .await;
        }
        if to.is_some() {
            return self
                .error(ErrorCode::WrongMode, "`to` is for mesh rooms")
                .await;
        }
        let (Some(media), Some(candidate)) = (membership.media.as_mut(), candidate) else {
            return Ok(()); // end of candidates: nothing to do
        };
        match media.peer.add_remote_candidate(candidate).await {
            Ok(()) => Ok(()),
            Err(_) if media.ignoring_offer => Ok(()),
            Err(e) => self.error(ErrorCode::BadCandidate, e.to_string()).await,
        }
    }

    /// Mesh: passes a signaling message to the participant named by `to`.
    async fn relay(&mut self, to: Option<String>, message: ServerMessage) -> Result<(), Close> {
        let Some(membership) = self.joined.as_ref() else {
            return Ok(());
        };
        let Some(to) = to else {
            return self
                .error(
                    ErrorCode::WrongMode,
                    "mesh rooms need `to`: the participant to signal",
                )
                .await;
        };
        let target = ParticipantId::from(to.as_str());
        if target == membership.id || !membership.room.relay(&target, message) {
            return self
                .error(
                    ErrorCode::UnknownParticipant,
                    format!("no participant `{to}` in this room"),
                )
                .await;
        }
        Ok(())
    }

    /// A client that leaves the server's offer unanswered would never receive another track:
    /// end its session so that it can rejoin in a consistent state.
    async fn check_negotiation(&mut self) -> Result<(), Close> {
        let limit = Duration::from_secs(self.ctx.limits.answer_timeout_secs);
        let overdue = self
            .joined
            .as_ref()
            .and_then(|m| m.media.as_ref())
            .is_some_and(|m| m.peer.answer_overdue(Instant::now(), limit));
        if !overdue {
            return Ok(());
        }
        self.error(
            ErrorCode::NegotiationTimeout,
            format!("no answer to the server's offer within {limit:?}"),
        )
        .await?;
        Err(close_frame(close_code::POLICY, "negotiation timed out"))
    }

    async fn offer_if_needed(&mut self) -> Result<(), Close> {
        let Some(media) = self.joined.as_mut().and_then(|m| m.media.as_mut()) else {
            return Ok(());
        };
        match media.peer.offer_if_needed().await {
            Ok(Some(sdp)) => self.send(&ServerMessage::Offer { sdp, from: None }).await,
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::error!("creating offer: {e}");
                Ok(())
            }
        }
    }

    async fn on_room_event(&mut self, event: RoomEvent) -> Result<(), Close> {
        let Some(membership) = self.joined.as_mut() else {
            return Ok(());
        };
        match event {
            RoomEvent::ParticipantJoined(participant) => {
                self.send(&ServerMessage::ParticipantJoined { participant })
                    .await
            }
            RoomEvent::ParticipantLeft(id) => {
                self.send(&ServerMessage::ParticipantLeft {
                    participant_id: id.to_string(),
                })
                .await
            }
            RoomEvent::TrackPublished(publication) => {
                if let Some(media) = membership.media.as_mut() {
                    subscribe(&mut media.peer, &publication).await;
                }
                self.send(&ServerMessage::TrackPublished {
                    track: publication.info.clone(),
                })
                .await?;
                self.offer_if_needed().await
            }
            RoomEvent::TrackUnpublished(publication) => {
                if let Some(media) = membership.media.as_mut() {
                    media.peer.unsubscribe(&publication.track_id).await;
                }
                self.send(&ServerMessage::TrackUnpublished {
                    track_id: publication.track_id.to_string(),
                    participant_id: publication.publisher.to_string(),
                })
                .await?;
                self.offer_if_needed().await
            }
            RoomEvent::Relay(message) => self.send(&message).await,
        }
    }

    async fn on_peer_event(&mut self, event: PeerEvent) -> Result<(), Close> {
        let Some(membership) = self.joined.as_mut() else {
            return Ok(());
        };
        match event {
            PeerEvent::LocalCandidate(candidate) => {
                self.send(&ServerMessage::Candidate {
                    candidate: Some(candidate),
                    from: None,
                })
                .await
            }
            PeerEvent::Track(mut track) => {
                let Some(media) = membership.media.as_ref() else {
                    return Ok(());
                };
                if media.peer.complete_track(&mut track).await {
                    publish(membership, track, &self.ctx);
                } else {
                    tracing::warn!(participant = %membership.id, ?track, "remote track with no known codec, not published");
                }
                Ok(())
            }
            PeerEvent::Chat(channel) => {
                let (Some(media), Some(queue)) =
                    (membership.media.as_mut(), membership.chat_queue.take())
                else {
                    return Ok(());
                };
                media.chat_pump = Some(tokio::spawn(run_chat_pump(
                    channel,
                    queue,
                    membership.room.clone(),
                    membership.id.clone(),
                    membership.name.clone(),
                    self.ctx.clone(),
                )));
                Ok(())
            }
            PeerEvent::Connected => {
                tracing::info!(participant = %membership.id, "media connected");
                Ok(())
            }
            PeerEvent::Failed => {
                tracing::warn!(participant = %membership.id, "media connection failed or closed");
                self.error(ErrorCode::ConnectionFailed, "the media connection failed")
                    .await?;
                Err(close_frame(close_code::NORMAL, "media connection failed"))
            }
        }
    }
}

enum Step {
    Socket(Option<Result<Message, axum::Error>>),
    Room(Option<RoomEvent>),
    Peer(Option<PeerEvent>),
    Shutdown,
    Watchdog,
}

/// Adds a room's publication to a subscriber's connection (not the publisher's own).
async fn subscribe(peer: &mut Peer, publication: &Publication) {
    if let Err(e) = peer
        .subscribe(
            &publication.track_id,
            &publication.info.stream_id,
            publication.info.kind,
            &publication.codec,
            publication.forwarder.clone(),
        )
        .await
    {
        tracing::warn!(track = %publication.track_id, "subscribe failed: {e}");
    }
}

/// Publishes a participant's new track in its room and starts the task that forwards it.
fn publish(membership: &mut Membership, track: PublishedTrack, ctx: &Arc<ServerContext>) {
    let Some(media) = membership.media.as_mut() else {
        return;
    };
    let next_index = media.streams.len();
    let stream_index = *media
        .streams
        .entry(track.stream_id.clone())
        .or_insert(next_index);
    let (commands_tx, commands) = mpsc::channel(FORWARDER_COMMANDS);
    let publication = match membership.room.publish(
        &membership.id,
        track.kind,
        stream_index,
        track.codec.clone(),
        commands_tx,
        ctx.limits.max_tracks_per_participant,
    ) {
        Ok(publication) => publication,
        Err(e) => {
            tracing::warn!(participant = %membership.id, "track not published: {e}");
            return;
        }
    };
    tracing::info!(participant = %membership.id, track = %publication.track_id, kind = ?track.kind, codec = %track.codec.mime_type, "track published");
    let forwarder = TrackForwarder::new(track.kind, KeyframeThrottle::DEFAULT_INTERVAL);
    let room = membership.room.clone();
    let metrics = ctx.metrics.clone();
    let track_id = publication.track_id.clone();
    let (stop_tx, stop) = oneshot::channel();
    let adopted = track.clone();
    let task = tokio::spawn(async move {
        run_publisher(track, forwarder, commands, stop, metrics).await;
        // The publisher stopped sending this track (e.g. ended a screen share).
        room.unpublish(&track_id);
    });
    media.peer.adopt_publisher(&adopted, stop_tx, task);
}

/// Moves chat between a participant's `chat` data channel and its room.
async fn run_chat_pump(
    channel: ChatChannel,
    mut queue: mpsc::Receiver<Arc<str>>,
    room: Arc<Room>,
    id: ParticipantId,
    name: String,
    ctx: Arc<ServerContext>,
) {
    loop {
        tokio::select! {
            event = channel.recv() => match event {
                ChatEvent::Text(text) => {
                    if text.len() > ctx.limits.max_chat_bytes {
                        tracing::info!(participant = %id, bytes = text.len(), "chat message over the limit, dropped");
                        continue;
                    }
                    let relay = ChatRelay { from: id.to_string(), name: name.clone(), text };
                    let Ok(line) = serde_json::to_string(&relay) else { continue };
                    ctx.metrics.chat_messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let dropped = room.chat(&id, line.into());
                    if dropped > 0 {
                        tracing::debug!(dropped, "chat line dropped for slow participants");
                    }
                }
                ChatEvent::Other => tracing::debug!(participant = %id, "non-text chat message ignored"),
                ChatEvent::Closed => break,
            },
            line = queue.recv() => match line {
                Some(line) => {
                    if !channel.try_send(&line).await {
                        tracing::debug!(participant = %id, "chat line dropped: data channel full");
                    }
                }
                None => break,
            },
        }
    }
}

/// How long shutdown waits for sessions to close.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
