//! One WebSocket = one participant's state machine: not joined → joined (SFU: with a media
//! connection on a worker; mesh: relaying only) → left. Everything a participant has (room
//! membership, its media connection and what it publishes and receives) is owned here and torn
//! down in [`Session::leave`], whatever ended the session: a `leave`, a dropped socket, a failed
//! connection, shutdown. The SFU wiring is in `sfu.rs`, the forwarding-rate cap in
//! `admission.rs`.
//!
//! A socket that drops without `leave` or a close frame does not end a protocol-3 session at
//! once: it goes on detached (media flowing, room events applied, messages to the client
//! dropped) until its client `resume`s on a new socket or the grace period ends (`resume.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use tokio::sync::{mpsc, watch};

use super::admission::admit_to_forwarding_cap;
use super::connections::Connections;
use super::http_session::{HttpClient, HttpPeer, Resources, find_participant};
use super::protocol::{
    ChatRelay, ClientMessage, ErrorCode, PROTOCOL_VERSION, PauseReason, RoomMode, ServerMessage,
    parse_client_message,
};
use super::resume::{Resumable, Resumables};
use super::sfu::SfuMedia;
use super::socket::{SendError, SignalSocket};
use crate::auth::Keys;
use crate::cluster::{Cluster, Placement, signaling_url};
use crate::config::Limits;
use crate::media::{MediaError, MediaEvent, MediaPlane, OfferOutcome, PauseCause, Visibility};
use crate::metrics::{GaugeGuard, Metrics};
use crate::room::{JoinError, MemberChannels, MemberProfile, Registry, Room, RoomEvent};
use crate::turn::IceServers;
use crate::types::{IceCandidate, ParticipantId, RoomName, TokenBucket, TrackId};

/// Chat lines queued per participant before new ones are dropped.
const CHAT_QUEUE: usize = 64;
/// How long a closed media connection waits for the client's `leave`.
const LEAVE_GRACE: Duration = Duration::from_secs(1);
/// How often a session checks its timers.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// Longest display name, in characters.
const MAX_NAME_CHARS: usize = 64;

/// What every session shares.
#[derive(Debug)]
pub struct ServerContext {
    pub registry: Arc<Registry>,
    pub media: Arc<MediaPlane>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Sessions that can be taken over by a `resume`.
    pub resumables: Arc<Resumables>,
    /// Signaling sockets open, in total and per address.
    pub connections: Arc<Connections>,
    /// Sessions of HTTP clients (WHIP, WHEP), by resource id.
    pub http_sessions: Arc<Resources>,
    /// The API keys access tokens are checked with (none: development mode).
    pub keys: Keys,
    /// ICE servers for clients, with per-participant credentials.
    pub ice_servers: IceServers,
    /// Flips to true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Set to the drain's deadline when the server starts draining: no new joins, clients told.
    pub draining: watch::Receiver<Option<Instant>>,
    /// The cluster this node belongs to (`--redis-url`), which places rooms on nodes.
    pub cluster: Option<Cluster>,
    /// SFU rooms are cascaded across the cluster's nodes (`--cluster-policy cascade`).
    pub cascade: bool,
}

/// Runs a session until the socket closes, the participant's media fails, or shutdown.
pub async fn run_session(socket: WebSocket, ctx: Arc<ServerContext>) {
    let limits = &ctx.limits;
    let socket = SignalSocket::new(
        socket,
        limits.send_queue_messages,
        Duration::from_secs(limits.send_timeout_secs),
        TokenBucket::new(
            limits.max_messages_per_sec.into(),
            limits.message_burst.into(),
            Instant::now(),
        ),
    );
    run_session_on(socket, ctx, None).await;
}

/// Runs a session on `socket`: a WebSocket, or the link of an HTTP client (`http_client`).
pub(super) async fn run_session_on(
    socket: SignalSocket,
    ctx: Arc<ServerContext>,
    http_client: Option<HttpPeer>,
) {
    let _gauge = GaugeGuard::new(&ctx.metrics, |m| &m.sessions);
    let mut session = Session {
        ctx: ctx.clone(),
        socket: Some(socket),
        joined: None,
        detached: None,
        idle_since: Instant::now(),
        http_client,
    };
    let close = session.run().await;
    session.leave();
    if let Some(socket) = session.socket.take() {
        socket.close(close).await;
    }
}

struct Session {
    ctx: Arc<ServerContext>,
    /// None while detached (waiting for a resume), or after the socket was handed over.
    socket: Option<SignalSocket>,
    joined: Option<Membership>,
    /// Since when the session has waited for its client to resume.
    detached: Option<(Instant, GaugeGuard)>,
    /// Since when the socket has been open without being in a room (the join timeout).
    idle_since: Instant,
    /// The HTTP client (WHIP, WHEP) behind this session, which bounds what it may do and how
    /// it receives; None: a WebSocket client.
    http_client: Option<HttpPeer>,
}

/// Whatever ends a session, a panic included, its participant leaves its room: no ghost
/// member stays behind, and an empty room is closed.
impl Drop for Session {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.ctx.metrics.sessions_panicked.inc();
            tracing::error!(participant = ?self.joined.as_ref().map(|m| &m.id), "session panicked; removing its participant");
        }
        self.leave();
    }
}

struct Membership {
    room: Arc<Room>,
    id: ParticipantId,
    name: String,
    events: mpsc::Receiver<RoomEvent>,
    /// Chat lines from the room for this participant's `chat` data channel.
    chat_out: mpsc::Receiver<Arc<str>>,
    media: Option<SfuMedia>,
    /// The protocol version the client speaks: newer messages are not sent to older clients.
    protocol: u32,
    /// The session's resume token (protocol 3, resume not turned off).
    resume: Option<Resumable>,
    _gauge: GaugeGuard,
}

/// Why the loop stopped, as the close frame to send (None: the socket is already gone).
type Close = Option<CloseFrame>;

fn close_frame(code: u16, reason: &str) -> Close {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// The next item of an optional channel's receive future; never, when there is no channel.
async fn next_or_pending<T>(
    recv: Option<impl std::future::Future<Output = Option<T>>>,
) -> Option<T> {
    match recv {
        Some(recv) => recv.await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn run(&mut self) -> Close {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut draining = self.ctx.draining.clone();
        let mut told_draining = false;
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (room_events, chat_out, media_events, chat_in, resumed) = match self.joined.as_mut()
            {
                Some(m) => {
                    let (events, chat_in) = match m.media.as_mut() {
                        Some(media) => (Some(&mut media.events), Some(&mut media.chat_in)),
                        None => (None, None),
                    };
                    // Mesh members chat peer to peer; only SFU members read the room's lines.
                    let chat_out = events.is_some().then_some(&mut m.chat_out);
                    let resumed = m.resume.as_mut().map(|r| &mut r.sockets);
                    (Some(&mut m.events), chat_out, events, chat_in, resumed)
                }
                None => (None, None, None, None, None),
            };
            // Room and media channels are split borrows of `self.joined`; select on all.
            let step = tokio::select! {
                frame = next_or_pending(self.socket.as_mut().map(|s| s.recv())) => Step::Socket(frame),
                socket = next_or_pending(resumed.map(|rx| rx.recv())) => Step::Resumed(socket),
                event = next_or_pending(room_events.map(|rx| rx.recv())) => Step::Room(event),
                event = next_or_pending(media_events.map(|rx| rx.recv())) => Step::Media(event),
                line = next_or_pending(chat_in.map(|rx| rx.recv())) => Step::ChatIn(line),
                line = next_or_pending(chat_out.map(|rx| rx.recv())) => Step::ChatOut(line),
                _ = shutdown.wait_for(|stop| *stop) => Step::Shutdown,
                _ = draining.wait_for(Option::is_some), if !told_draining => Step::Draining,
                _ = watchdog.tick() => Step::Watchdog,
            };
            let outcome = match step {
                Step::Socket(None) => {
                    if !self.detach() {
                        return None;
                    }
                    Ok(())
                }
                Step::Socket(Some(Err(e))) => {
                    if !self.detach() {
                        tracing::info!("websocket error, closing session: {e}");
                        return close_frame(close_code::SIZE, "message too big or malformed frame");
                    }
                    Ok(())
                }
                Step::Resumed(Some(socket)) => self.resumed(socket).await,
                // The session's own sender lives in the registry as long as its token does.
                Step::Resumed(None) => Ok(()),
                Step::Socket(Some(Ok(message))) => self.on_frame(message).await,
                Step::Room(Some(event)) => self.on_room_event(event).await,
                Step::Media(Some(event)) => self.on_media_event(event).await,
                // A closed channel would be ready forever: treat it as what it means.
                Step::Media(None) | Step::ChatIn(None) => {
                    self.on_media_event(MediaEvent::Failed("media worker gone".into()))
                        .await
                }
                Step::ChatIn(Some(text)) => {
                    self.on_chat_in(text);
                    Ok(())
                }
                Step::ChatOut(Some(line)) => {
                    if let Some(media) = self.joined.as_ref().and_then(|m| m.media.as_ref()) {
                        let _ = media.handle.send_chat(line);
                    }
                    Ok(())
                }
                Step::Room(None) | Step::ChatOut(None) => {
                    tracing::error!("room event channel closed while joined");
                    return close_frame(close_code::ERROR, "removed from the room");
                }
                Step::Shutdown => {
                    return close_frame(close_code::AWAY, "server shutting down");
                }
                Step::Draining => {
                    told_draining = true;
                    self.tell_draining().await
                }
                Step::Watchdog => match self.detached {
                    Some((since, _)) if since.elapsed() >= self.resume_grace() => {
                        tracing::info!(participant = ?self.joined.as_ref().map(|m| &m.id), "no resume within the grace period");
                        return None;
                    }
                    // Socket and media connection both closed: the client is gone, not
                    // reconnecting (a resuming client keeps its media connection).
                    Some(_) if self.media_closed_by_peer() => {
                        tracing::info!(participant = ?self.joined.as_ref().map(|m| &m.id), "socket dropped and media closed by the client: it left");
                        return None;
                    }
                    Some(_) => Ok(()),
                    None if self.joined.is_none() => self.check_join_timeout(),
                    None => self.check_negotiation().await,
                },
            };
            if let Err(close) = outcome {
                return close;
            }
        }
    }

    /// Queues a message to the client; while detached the message is lost (a resume
    /// resynchronises). A client that does not read has its socket cut, as if it dropped.
    async fn send(&mut self, message: &ServerMessage) -> Result<(), Close> {
        let Some(socket) = self.socket.as_mut() else {
            return Ok(());
        };
        match socket.send(message).await {
            // The next read says what happened: the client's close frame (the session ends)
            // or a dropped connection (it detaches).
            Ok(()) | Err(SendError::Closed) => Ok(()),
            Err(SendError::SlowReader) => {
                self.ctx.metrics.sessions_slow_reader.inc();
                tracing::info!(participant = ?self.joined.as_ref().map(|m| &m.id), "the client does not read its signaling messages; cutting its socket");
                if self.detach() { Ok(()) } else { Err(None) }
            }
        }
    }

    /// The server drains: a joined protocol-3 client hears how long its call has left.
    async fn tell_draining(&mut self) -> Result<(), Close> {
        if self.joined.as_ref().is_none_or(|m| m.protocol < 3) {
            return Ok(());
        }
        let deadline = *self.ctx.draining.borrow();
        let deadline_secs = deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now())
                .as_secs_f64()
                .ceil() as u64
        });
        self.send(&ServerMessage::ServerDraining { deadline_secs })
            .await
    }

    /// A socket that has not joined a room (or left one) within the join timeout is closed.
    fn check_join_timeout(&self) -> Result<(), Close> {
        let limit = Duration::from_secs(self.ctx.limits.join_timeout_secs);
        if limit.is_zero() || self.idle_since.elapsed() < limit {
            return Ok(());
        }
        self.ctx.metrics.sessions_join_timeout.inc();
        tracing::info!("no join within {limit:?}; closing the socket");
        Err(close_frame(close_code::POLICY, "no join in time"))
    }

    fn resume_grace(&self) -> Duration {
        Duration::from_secs(self.ctx.limits.resume_grace_secs)
    }

    /// The socket is gone. A joined session with a resume token goes on detached and returns
    /// true; otherwise the session is over (false).
    fn detach(&mut self) -> bool {
        self.socket = None;
        let resumable = self.joined.as_ref().is_some_and(|m| m.resume.is_some())
            && !*self.ctx.shutdown.borrow();
        if resumable && self.detached.is_none() {
            tracing::info!(participant = ?self.joined.as_ref().map(|m| &m.id), "socket dropped; waiting for a resume");
            self.detached = Some((
                Instant::now(),
                GaugeGuard::new(&self.ctx.metrics, |m| &m.sessions_detached),
            ));
        }
        resumable
    }

    /// `resume` on this (new) socket: hands it to the session the token belongs to, and ends
    /// this one; or, for an unknown token, says so and keeps the socket for a `join`.
    async fn resume_into(&mut self, token: &str) -> Result<(), Close> {
        if self.joined.is_some() {
            return self
                .error(ErrorCode::AlreadyJoined, "already in a room; `leave` first")
                .await;
        }
        let Some(socket) = self.socket.take() else {
            return Err(None);
        };
        match self.ctx.resumables.hand_over(token, Box::new(socket)) {
            Ok(()) => Err(None),
            Err(socket) => {
                self.socket = Some(*socket);
                self.error(
                    ErrorCode::ResumeFailed,
                    "no session to resume for this token (unknown, or its grace period ended): join anew",
                )
                .await
            }
        }
    }

    /// The client came back on `socket`: the session goes on with it. The client is told what
    /// the room holds now and everything it may have missed that still matters.
    async fn resumed(&mut self, socket: Box<SignalSocket>) -> Result<(), Close> {
        if let Some(old) = self.socket.replace(*socket) {
            // The client gave up on it (its network changed): the new socket wins.
            tokio::spawn(old.close(close_frame(
                close_code::NORMAL,
                "replaced by a resumed connection",
            )));
        }
        self.detached = None;
        let Some(membership) = self.joined.as_mut() else {
            return Err(None);
        };
        let Some(resume) = membership.resume.as_mut() else {
            return Err(None);
        };
        resume.rotate();
        tracing::info!(participant = %membership.id, "resumed");
        let snapshot = membership.room.snapshot();
        let speakers = membership.room.active_speakers();
        let mut resync = vec![ServerMessage::Resumed {
            participant_id: membership.id.to_string(),
            room: snapshot.name,
            mode: snapshot.mode,
            participants: snapshot
                .participants
                .into_iter()
                .filter(|p| p.id != membership.id.as_str())
                .collect(),
            tracks: snapshot
                .tracks
                .into_iter()
                .filter(|t| t.participant_id != membership.id.as_str())
                .collect(),
            resume_token: resume.token().to_owned(),
            ice_servers: self.ctx.ice_servers.for_participant(membership.id.as_str()),
        }];
        if let Some(media) = membership.media.as_mut() {
            resync.extend(media.resync_messages());
        }
        resync.push(ServerMessage::ActiveSpeakers {
            participants: speakers.iter().map(ToString::to_string).collect(),
        });
        for message in &resync {
            self.send(message).await?;
        }
        self.offer_if_needed().await
    }

    async fn error(&mut self, code: ErrorCode, message: impl Into<String>) -> Result<(), Close> {
        let message = message.into();
        tracing::info!(?code, %message, participant = ?self.joined.as_ref().map(|m| &m.id), "client error");
        self.ctx.metrics.signaling_errors.inc();
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
        if let Some(socket) = self.socket.as_mut()
            && !socket.take_message_budget(Instant::now())
        {
            self.ctx.metrics.sessions_rate_limited.inc();
            tracing::info!(participant = ?self.joined.as_ref().map(|m| &m.id), "client sends messages too fast; closing its socket");
            return Err(close_frame(close_code::POLICY, "too many messages"));
        }
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
            ClientMessage::Join {
                room,
                name,
                mode,
                protocol,
                token,
            } => {
                let protocol = protocol.unwrap_or(1).clamp(1, PROTOCOL_VERSION);
                self.join(&room, &name, mode, protocol, token.as_deref())
                    .await
            }
            ClientMessage::Resume { token } => self.resume_into(&token).await,
            ClientMessage::SetMuted { kind, muted } => {
                let Some(membership) = self.membership("set-muted").await? else {
                    return Ok(());
                };
                membership.room.set_muted(&membership.id, kind, muted);
                Ok(())
            }
            ClientMessage::TrackSettings {
                track_id,
                visible,
                width,
                height,
            } => {
                let visibility = match (visible, width, height) {
                    (false, _, _) => Visibility::Hidden,
                    (true, Some(width), Some(height)) => Visibility::Tile { width, height },
                    (true, _, _) => Visibility::Unknown,
                };
                self.track_settings(&track_id, visibility).await
            }
            ClientMessage::Ping => self.send(&ServerMessage::Pong).await,
            ClientMessage::Leave => {
                if self.joined.is_none() {
                    return self
                        .error(ErrorCode::NotJoined, "`leave` before `join`")
                        .await;
                }
                self.leave();
                self.send(&ServerMessage::Left).await?;
                // An HTTP client's session is its one membership (a WHIP or WHEP resource).
                if self.socket.as_ref().is_some_and(SignalSocket::is_http) {
                    return Err(None);
                }
                Ok(())
            }
            ClientMessage::Offer { sdp, to } => self.on_sdp(true, sdp, to).await,
            ClientMessage::Answer { sdp, to } => self.on_sdp(false, sdp, to).await,
            ClientMessage::Candidate { candidate, to } => self.on_candidate(candidate, to).await,
        }
    }

    async fn join(
        &mut self,
        room: &str,
        name: &str,
        mode: Option<RoomMode>,
        protocol: u32,
        token: Option<&str>,
    ) -> Result<(), Close> {
        if self.joined.is_some() {
            return self
                .error(ErrorCode::AlreadyJoined, "already in a room; `leave` first")
                .await;
        }
        if self.ctx.draining.borrow().is_some() {
            return self
                .error(
                    ErrorCode::ServerDraining,
                    "the server is shutting down: join again shortly",
                )
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
        let admission = match self.ctx.keys.admit(token, room) {
            Ok(mut admission) => {
                if let Some(peer) = &self.http_client {
                    admission.grants = admission.grants.and(peer.client.grants());
                }
                admission
            }
            Err(e) => {
                self.ctx.metrics.joins_unauthorized.inc();
                return self.error(ErrorCode::Unauthorized, e.to_string()).await;
            }
        };
        // The token's name, when it has one: the application vouches for it.
        let name = admission.name.as_deref().unwrap_or(name).trim();
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
        // In a cluster, a room not open here may be hosted by another node: send the client
        // there, unless SFU rooms are cascaded (served on every node their clients reach).
        let cascaded = self.ctx.cascade && mode != Some(RoomMode::Mesh);
        if let Some(cluster) = &self.ctx.cluster
            && !cascaded
            && self.ctx.registry.room(room).is_none()
            && let Placement::Elsewhere { node, url } = cluster.place(room).await
        {
            self.ctx.metrics.cluster_redirects.inc();
            tracing::info!(room, node, "join redirected to the node hosting the room");
            return self
                .send(&ServerMessage::Redirect {
                    url: signaling_url(&url),
                    node,
                    room: room.to_owned(),
                })
                .await;
        }
        let effective_mode = self
            .ctx
            .registry
            .mode_of(&room_name)
            .unwrap_or(mode.unwrap_or_default());
        if effective_mode == RoomMode::Mesh && admission.grants.is_restricted() {
            return self
                .error(
                    ErrorCode::NotAllowed,
                    "a token with restricted rights cannot join a mesh room: its media would go peer to peer, past the server",
                )
                .await;
        }
        if let Err(message) = admit_to_forwarding_cap(&self.ctx, effective_mode) {
            return self.error(ErrorCode::ServerFull, message).await;
        }
        // A player of one participant (WHEP).
        let source = self.http_client.as_ref().and_then(|p| p.source.as_deref());
        let only_from = match source {
            None => None,
            Some(source) => match find_participant(&self.ctx.registry, room, source) {
                Some(id) => Some(id),
                None => {
                    let message = format!("no participant `{source}` in this room");
                    return self.error(ErrorCode::UnknownParticipant, message).await;
                }
            },
        };
        let (events_tx, events) = mpsc::channel(self.ctx.limits.member_queue.max(1));
        let (chat_tx, chat_out) = mpsc::channel(CHAT_QUEUE);
        let channels = MemberChannels {
            events: events_tx,
            chat: chat_tx,
        };
        let joined = match self.ctx.registry.join(
            &room_name,
            name,
            mode.unwrap_or_default(),
            channels,
            MemberProfile {
                identity: admission.identity.clone(),
                viewer: self
                    .http_client
                    .as_ref()
                    .is_some_and(|p| p.client == HttpClient::Whep),
            },
        ) {
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
        // Display names and identities stay out of info-level logs.
        tracing::info!(room = %room.name(), participant = %id, mode = ?room.mode(), "joined");
        tracing::debug!(participant = %id, name, identity = ?admission.identity, "joined as");

        let mut membership = Membership {
            room: room.clone(),
            id: id.clone(),
            name: name.to_string(),
            events,
            chat_out,
            media: None,
            protocol,
            resume: (protocol >= 3 && self.ctx.limits.resume_grace_secs > 0)
                .then(|| self.ctx.resumables.register()),
            _gauge: GaugeGuard::new(&self.ctx.metrics, |m| &m.participants),
        };
        let resume_token = membership.resume.as_ref().map(|r| r.token().to_owned());
        if room.mode() == RoomMode::Sfu {
            let (media_tx, media_events) = mpsc::unbounded_channel();
            let subscribing = self
                .http_client
                .as_ref()
                .map(|peer| peer.client.subscribing())
                .unwrap_or_default();
            let (handle, chat_in) = match self.ctx.media.open(id.clone(), subscribing, media_tx) {
                Ok(opened) => opened,
                Err(e) => {
                    self.ctx.registry.leave(&room, &id);
                    let code = match e {
                        MediaError::Overloaded => ErrorCode::ServerFull,
                        _ => ErrorCode::Internal,
                    };
                    tracing::warn!("media connection for {id}: {e}");
                    return self
                        .error(code, format!("cannot open a media connection: {e}"))
                        .await;
                }
            };
            let mut media = SfuMedia::new(handle, media_events, chat_in, admission.grants);
            // A WHEP player of the room follows its active speaker.
            media.follows_speaker = only_from.is_none()
                && self
                    .http_client
                    .as_ref()
                    .is_some_and(|p| p.client == HttpClient::Whep);
            media.only_from = only_from;
            media.one_stream = self
                .http_client
                .as_ref()
                .is_some_and(|p| p.client == HttpClient::Whip);
            for publication in &joined.tracks {
                media.subscribe(publication);
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
            resume_token,
            ice_servers: if protocol >= 3 {
                self.ctx.ice_servers.for_participant(id.as_str())
            } else {
                Vec::new()
            },
        })
        .await?;
        // Someone may be speaking already: a joiner hears who (and its downlink puts them
        // first) without waiting for the list to change.
        let speakers = room.active_speakers();
        if speakers.is_empty() {
            return Ok(());
        }
        self.on_room_event(RoomEvent::ActiveSpeakers(speakers))
            .await
    }

    /// How the participant shows a track it receives: passed to its media connection, which
    /// chooses the layer from it.
    async fn track_settings(
        &mut self,
        track_id: &str,
        visibility: Visibility,
    ) -> Result<(), Close> {
        let Some(membership) = self.membership("track-settings").await? else {
            return Ok(());
        };
        let refused = match membership.media.as_ref() {
            None => Some((
                ErrorCode::WrongMode,
                "`track-settings` is for SFU rooms".into(),
            )),
            Some(media) => match membership
                .room
                .publication(&TrackId::from(track_id))
                .filter(|p| p.publisher != membership.id)
            {
                Some(publication) => {
                    if let Err(e) = media
                        .handle
                        .track_settings(publication.route.key, visibility)
                    {
                        tracing::debug!("track settings: {e}");
                    }
                    None
                }
                None => Some((
                    ErrorCode::UnknownTrack,
                    format!("no track `{track_id}` to receive in this room"),
                )),
            },
        };
        match refused {
            Some((code, message)) => self.error(code, message).await,
            None => Ok(()),
        }
    }

    /// Removes the participant from its room and ends everything it owned. Idempotent.
    fn leave(&mut self) {
        let Some(membership) = self.joined.take() else {
            return;
        };
        self.idle_since = Instant::now();
        self.ctx.registry.leave(&membership.room, &membership.id);
        // Dropping the media handle closes the connection on its worker.
        drop(membership.media);
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
            match media.handle.remote_offer(sdp).await {
                Ok(OfferOutcome::Answer(answer)) => {
                    media.ignoring_offer = false;
                    Ok(Some(answer))
                }
                Ok(OfferOutcome::IgnoredForGlare) => {
                    tracing::debug!("client offer ignored for glare");
                    media.ignoring_offer = true;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        } else {
            media.ignoring_offer = false;
            let applied = media.handle.remote_answer(sdp).await;
            if applied.is_ok() {
                media.awaiting_answer = None;
            }
            applied.map(|()| None)
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
            Err(MediaError::BadSdp(e)) => {
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
        match media.handle.remote_candidate(candidate).await {
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

    /// The client closed its media connection at least [`LEAVE_GRACE`] ago.
    fn media_closed_by_peer(&self) -> bool {
        self.joined
            .as_ref()
            .and_then(|m| m.media.as_ref())
            .and_then(|m| m.closed_by_peer_at)
            .is_some_and(|at| at.elapsed() >= LEAVE_GRACE)
    }

    /// A client that leaves the server's offer unanswered would never receive another track:
    /// end its session so that it can rejoin in a consistent state.
    async fn check_negotiation(&mut self) -> Result<(), Close> {
        if self.media_closed_by_peer() {
            tracing::info!("client closed its media connection without leaving");
            self.error(
                ErrorCode::ConnectionFailed,
                "the media connection was closed",
            )
            .await?;
            return Err(close_frame(close_code::NORMAL, "media connection closed"));
        }
        let limit = Duration::from_secs(self.ctx.limits.media_timeout_secs);
        let unconnected = self
            .joined
            .as_ref()
            .and_then(|m| m.media.as_ref())
            .and_then(|m| m.connecting_since)
            .is_some_and(|since| !limit.is_zero() && since.elapsed() > limit);
        if unconnected {
            self.ctx.metrics.sessions_media_timeout.inc();
            self.error(
                ErrorCode::ConnectionFailed,
                format!("the media connection did not come up within {limit:?}"),
            )
            .await?;
            return Err(close_frame(close_code::POLICY, "media did not connect"));
        }
        let limit = Duration::from_secs(self.ctx.limits.answer_timeout_secs);
        let overdue = self
            .joined
            .as_ref()
            .and_then(|m| m.media.as_ref())
            .and_then(|m| m.awaiting_answer.as_ref())
            .is_some_and(|(since, _)| since.elapsed() > limit);
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
        match media.handle.offer_if_needed().await {
            Ok(Some(sdp)) => {
                tracing::debug!(m_lines = sdp.matches("\nm=").count(), "server offer sent");
                media.awaiting_answer = Some((Instant::now(), sdp.clone()));
                self.send(&ServerMessage::Offer { sdp, from: None }).await
            }
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
            RoomEvent::ParticipantUpdated(participant) => {
                if membership.protocol < 3 {
                    return Ok(());
                }
                self.send(&ServerMessage::ParticipantUpdated { participant })
                    .await
            }
            RoomEvent::ParticipantLeft(id) => {
                self.send(&ServerMessage::ParticipantLeft {
                    participant_id: id.to_string(),
                })
                .await
            }
            RoomEvent::TrackPublished(publication) => {
                if let Some(media) = membership.media.as_ref() {
                    media.subscribe(&publication);
                }
                self.send(&ServerMessage::TrackPublished {
                    track: publication.info.clone(),
                })
                .await?;
                self.offer_if_needed().await
            }
            RoomEvent::TrackUnpublished(publication) => {
                if let Some(media) = membership.media.as_mut() {
                    media.unsubscribe(&publication);
                    media.followed_track_gone(&membership.room);
                }
                self.send(&ServerMessage::TrackUnpublished {
                    track_id: publication.track_id.to_string(),
                    participant_id: publication.publisher.to_string(),
                })
                .await?;
                self.offer_if_needed().await
            }
            RoomEvent::Relay(message) => self.send(&message).await,
            RoomEvent::Removed(reason) => {
                tracing::info!(participant = %membership.id, %reason, "removed by an administrator");
                self.error(ErrorCode::Removed, reason).await?;
                Err(close_frame(
                    close_code::NORMAL,
                    "removed by an administrator",
                ))
            }
            RoomEvent::MutedByAdmin { track, muted } => {
                if membership.protocol < 3 {
                    return Ok(());
                }
                self.send(&ServerMessage::Muted {
                    track_id: track.track_id,
                    kind: track.kind,
                    muted,
                })
                .await
            }
            RoomEvent::ActiveSpeakers(speakers) => {
                if let Some(media) = membership.media.as_mut() {
                    media.prioritize_speakers(&membership.room, &speakers);
                    if let Some(loudest) = speakers.first() {
                        media.follow(&membership.room, loudest);
                    }
                }
                if membership.protocol < 2 {
                    return Ok(());
                }
                self.send(&ServerMessage::ActiveSpeakers {
                    participants: speakers.iter().map(ToString::to_string).collect(),
                })
                .await
            }
        }
    }

    async fn on_media_event(&mut self, event: MediaEvent) -> Result<(), Close> {
        let Some(membership) = self.joined.as_mut() else {
            return Ok(());
        };
        let Some(media) = membership.media.as_mut() else {
            return Ok(());
        };
        match event {
            MediaEvent::TrackAdded(_) if !media.grants.can_publish => {
                tracing::info!(participant = %membership.id, "track refused: the token does not allow publishing");
                self.error(
                    ErrorCode::NotAllowed,
                    "this participant's token does not allow publishing: the track is not forwarded",
                )
                .await
            }
            MediaEvent::TrackAdded(track) => {
                media.publish(
                    &membership.room,
                    &membership.id,
                    track,
                    self.ctx.limits.max_tracks_per_participant,
                );
                Ok(())
            }
            MediaEvent::TrackEnded(track) => {
                tracing::info!(participant = %membership.id, "client stopped sending a track");
                media.unpublish(&membership.room, track);
                Ok(())
            }
            MediaEvent::Connected => {
                if let Some(since) = media.connecting_since.take() {
                    self.ctx
                        .metrics
                        .join_time
                        .observe(since.elapsed().as_secs_f64());
                }
                tracing::info!(participant = %membership.id, "media connected");
                Ok(())
            }
            MediaEvent::ClosedByPeer => {
                // A leaving client closes its connection and sends `leave`, in either order:
                // the watchdog ends the session if no `leave` follows soon.
                media.closed_by_peer_at = Some(Instant::now());
                Ok(())
            }
            MediaEvent::DownTrackChanged {
                track,
                layer,
                paused,
            } => {
                if membership.protocol < 2 {
                    return Ok(());
                }
                let paused = paused.map(|p| match p {
                    PauseCause::Bandwidth => PauseReason::Bandwidth,
                    PauseCause::Hidden => PauseReason::Hidden,
                });
                let message = ServerMessage::SubscriptionState {
                    track_id: track.to_string(),
                    layer,
                    paused,
                };
                media.remember(&message);
                self.send(&message).await
            }
            MediaEvent::Speech { loudness } => {
                membership.room.set_loudness(&membership.id, loudness);
                Ok(())
            }
            MediaEvent::LayersWanted { track, active } => {
                let Some(track_id) = media.published_id(track) else {
                    return Ok(());
                };
                if membership.protocol < 2 {
                    return Ok(());
                }
                tracing::debug!(participant = %membership.id, %track_id, ?active, "dynacast");
                let message = ServerMessage::PublisherLayers {
                    track_id: track_id.to_string(),
                    mid: track.to_string(),
                    active,
                };
                media.remember(&message);
                self.send(&message).await
            }
            MediaEvent::Failed(why) => {
                tracing::warn!(participant = %membership.id, why, "media connection failed or closed");
                self.error(ErrorCode::ConnectionFailed, "the media connection failed")
                    .await?;
                Err(close_frame(close_code::NORMAL, "media connection failed"))
            }
        }
    }

    /// A chat line the participant sent: relayed to everyone else in the room.
    fn on_chat_in(&mut self, text: String) {
        let Some(membership) = self.joined.as_ref() else {
            return;
        };
        if membership
            .media
            .as_ref()
            .is_some_and(|m| !m.grants.can_publish_data)
        {
            tracing::debug!(participant = %membership.id, "chat dropped: the token does not allow data");
            return;
        }
        if text.len() > self.ctx.limits.max_chat_bytes {
            tracing::info!(participant = %membership.id, bytes = text.len(), "chat message over the limit, dropped");
            return;
        }
        let relay = ChatRelay {
            from: membership.id.to_string(),
            name: membership.name.clone(),
            text,
        };
        let Ok(line) = serde_json::to_string(&relay) else {
            return;
        };
        self.ctx.metrics.chat_messages.inc();
        let dropped = membership.room.chat(&membership.id, line.into());
        if dropped > 0 {
            tracing::debug!(dropped, "chat line dropped for slow participants");
        }
    }
}

enum Step {
    Socket(Option<Result<Message, axum::Error>>),
    Resumed(Option<Box<SignalSocket>>),
    Room(Option<RoomEvent>),
    Media(Option<MediaEvent>),
    ChatIn(Option<String>),
    ChatOut(Option<Arc<str>>),
    Shutdown,
    Draining,
    Watchdog,
}

/// How long shutdown waits for sessions to close.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A bug that panics inside a session must not leave a ghost member in its room.
    #[tokio::test]
    async fn a_panicking_session_still_leaves_its_room() {
        let config = Config::for_tests();
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(Registry::new(config.limits.clone(), metrics.clone()));
        let media = Arc::new(MediaPlane::start(&config, metrics.clone()).expect("media plane"));
        let (_stop, shutdown) = watch::channel(false);
        let (_drain, draining) = watch::channel(None);
        let ctx = Arc::new(ServerContext {
            registry: registry.clone(),
            media,
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            resumables: Default::default(),
            connections: Default::default(),
            http_sessions: Default::default(),
            keys: Keys::default(),
            ice_servers: IceServers::new(Vec::new(), String::new(), Duration::ZERO),
            shutdown,
            draining,
            cluster: None,
            cascade: false,
        });
        let room = RoomName::parse("ghosts").expect("room name");
        let (events_tx, events) = mpsc::channel(8);
        let (chat_tx, chat_out) = mpsc::channel(8);
        let channels = MemberChannels {
            events: events_tx,
            chat: chat_tx,
        };
        let joined = registry
            .join(
                &room,
                "casper",
                RoomMode::Mesh,
                channels,
                MemberProfile::default(),
            )
            .expect("join");
        let session = Session {
            ctx: ctx.clone(),
            socket: None,
            joined: Some(Membership {
                room: joined.room,
                id: joined.participant_id,
                name: "casper".into(),
                events,
                chat_out,
                media: None,
                protocol: PROTOCOL_VERSION,
                resume: None,
                _gauge: GaugeGuard::new(&metrics, |m| &m.participants),
            }),
            detached: None,
            idle_since: Instant::now(),
            http_client: None,
        };
        assert_eq!(registry.snapshots().len(), 1);
        let task = tokio::spawn(async move {
            let _session = session;
            panic!("a bug in a session");
        });
        assert!(task.await.is_err_and(|e| e.is_panic()));
        assert!(registry.snapshots().is_empty(), "the room is gone");
        let m = metrics.snapshot();
        assert_eq!((m.participants, m.rooms, m.sessions_panicked), (0, 0, 1));
    }
}
