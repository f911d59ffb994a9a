//! Rooms: the registry (name → room), each room's members and published tracks, and the
//! membership events members receive.
//!
//! Owns no sockets and no webrtc types. A member is reached only through the channels it
//! registered; a published track only through its route on the packet path. Every method
//! takes the room's lock briefly and never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::Limits;
use crate::forward::{TrackKey, TrackRoute};
use crate::metrics::{GaugeGuard, Metrics};
use crate::signal::protocol::{ParticipantInfo, RoomMode, ServerMessage, TrackInfo};
use crate::types::{MediaKind, ParticipantId, RoomName, TrackCodec, TrackId};
use crate::webhook::{self, EventKind, Webhooks};

mod remote;

pub use remote::{RemoteTrack, RemoteUpdate};

/// A track published in a room.
#[derive(Debug)]
pub struct Publication {
    pub info: TrackInfo,
    pub publisher: ParticipantId,
    pub track_id: TrackId,
    pub codec: TrackCodec,
    /// Where the track enters the media plane.
    pub route: TrackRoute,
    /// Published on another node of the cluster (cascading), relayed here.
    pub origin: Option<RemoteOrigin>,
}

/// Where a track published on another node lives there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOrigin {
    pub node: Arc<str>,
    /// Its key and media worker on that node.
    pub key: u64,
    pub worker: usize,
}

/// A track a member starts publishing.
#[derive(Debug, Clone)]
pub struct NewTrack {
    pub kind: MediaKind,
    /// Index of the publisher's stream it belongs to (`{publisher}-{index}`).
    pub stream_index: usize,
    pub codec: TrackCodec,
    /// Simulcast rids, lowest first (empty: one stream).
    pub layers: Vec<String>,
}

impl Publication {
    /// A screen share: any stream of its publisher but the first (camera and microphone), as
    /// the clients here number them.
    pub fn is_screen(&self) -> bool {
        !self.info.stream_id.ends_with("-0")
    }
}

/// What a member hears from its room.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    ParticipantJoined(ParticipantInfo),
    ParticipantLeft(ParticipantId),
    /// A member's mute state changed.
    ParticipantUpdated(ParticipantInfo),
    TrackPublished(Arc<Publication>),
    TrackUnpublished(Arc<Publication>),
    /// A signaling message relayed from another participant (mesh rooms).
    Relay(ServerMessage),
    /// Who speaks now, loudest first (at most [`MAX_ACTIVE_SPEAKERS`]; empty: nobody).
    ActiveSpeakers(Arc<[ParticipantId]>),
    /// An administrator removed this member (or closed the room): its session ends.
    Removed(String),
    /// An administrator muted or unmuted one of this member's tracks.
    MutedByAdmin {
        track: TrackInfo,
        muted: bool,
    },
}

/// Active speakers a room names at once.
pub const MAX_ACTIVE_SPEAKERS: usize = 3;

/// How a room reaches one member.
#[derive(Debug, Clone)]
pub struct MemberChannels {
    /// Membership and track events, and mesh relays: never dropped. Bounded
    /// (`--member-queue`): a member whose session falls a whole queue behind is removed.
    pub events: mpsc::Sender<RoomEvent>,
    /// Chat lines (JSON) for the member's `chat` data channel: bounded, dropped when full.
    pub chat: mpsc::Sender<Arc<str>>,
}

/// Who joins, beyond its display name.
#[derive(Debug, Clone, Default)]
pub struct MemberProfile {
    /// The access token's identity (none in development mode).
    pub identity: Option<String>,
    /// Only watches (a WHEP player): told to the others, whose UIs need not draw it a tile.
    pub viewer: bool,
}

#[derive(Debug)]
struct Member {
    name: String,
    /// The access token's identity (none in development mode).
    identity: Option<String>,
    /// Only watches (a WHEP player): it never publishes.
    viewer: bool,
    audio_muted: bool,
    video_muted: bool,
    channels: MemberChannels,
}

impl Member {
    /// Queues an event for the member's session. A session a whole queue behind is cut off:
    /// the room drops its end of the channel, the session sees it closed once it has read what
    /// is queued, and its leave removes the member.
    fn deliver(&mut self, event: RoomEvent, lagging: &Counter) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.channels.events.try_send(event) {
            self.channels.events = mpsc::channel(1).0;
            lagging.inc();
            tracing::warn!("a member fell a whole event queue behind; removing it from the room");
        }
    }

    fn webhook_participant(&self, id: &ParticipantId) -> webhook::Participant {
        webhook::Participant {
            id: id.to_string(),
            identity: self.identity.clone(),
            name: self.name.clone(),
        }
    }

    fn info(&self, id: &ParticipantId) -> ParticipantInfo {
        ParticipantInfo {
            id: id.to_string(),
            name: self.name.clone(),
            viewer: self.viewer,
            audio_muted: self.audio_muted,
            video_muted: self.video_muted,
        }
    }
}

#[derive(Debug, Default)]
struct RoomState {
    members: HashMap<ParticipantId, Member>,
    /// Members on other nodes of the cluster (cascading), as their node last described them.
    remote: HashMap<ParticipantId, remote::RemoteMember>,
    /// Local and remote members in join order, so `joined` lists participants as they came.
    order: Vec<ParticipantId>,
    tracks: HashMap<TrackId, Arc<Publication>>,
    /// How loud each member speaks now (absent or 0: silent).
    loudness: HashMap<ParticipantId, f32>,
    /// The active speakers last announced, loudest first.
    active_speakers: Arc<[ParticipantId]>,
    /// Set when the registry dropped the room; a late joiner must pick a fresh one.
    closed: bool,
    /// Counts members removed for falling behind (`switchboard_members_lagging_total`).
    lagging: Counter,
}

impl RoomState {
    /// Announces the active speakers when the loudest members changed.
    fn update_speakers(&mut self) {
        let mut speaking: Vec<(&ParticipantId, f32)> = self
            .loudness
            .iter()
            .filter(|(id, l)| **l > 0.0 && self.members.contains_key(*id))
            .map(|(id, l)| (id, *l))
            .collect();
        speaking.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let active: Vec<ParticipantId> = speaking
            .into_iter()
            .take(MAX_ACTIVE_SPEAKERS)
            .map(|(id, _)| id.clone())
            .collect();
        if *active == *self.active_speakers {
            return;
        }
        self.active_speakers = active.into();
        let event = RoomEvent::ActiveSpeakers(self.active_speakers.clone());
        for member in self.members.values_mut() {
            member.deliver(event.clone(), &self.lagging);
        }
    }

    /// Queues a chat line for every local member but `except`; returns how many queues were
    /// full (the line is dropped for them).
    fn chat_except(&self, except: Option<&ParticipantId>, line: &Arc<str>) -> usize {
        let mut dropped = 0;
        for (id, member) in &self.members {
            if Some(id) != except && member.channels.chat.try_send(line.clone()).is_err() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Queues an event for one member; false if there is no such member.
    fn deliver_to(&mut self, to: &ParticipantId, event: RoomEvent) -> bool {
        match self.members.get_mut(to) {
            Some(member) => {
                member.deliver(event, &self.lagging);
                true
            }
            None => false,
        }
    }

    /// The members, local and remote, in join order.
    fn participants(&self) -> Vec<ParticipantInfo> {
        self.order
            .iter()
            .filter_map(|id| match self.members.get(id) {
                Some(m) => Some(m.info(id)),
                None => self.remote.get(id).map(|r| r.info.clone()),
            })
            .collect()
    }
}

#[derive(Debug)]
pub struct Room {
    name: RoomName,
    mode: RoomMode,
    state: Mutex<RoomState>,
    webhooks: Webhooks,
    /// Where changes are told to the cluster (cascading), if this node is in one.
    notices: Option<Notices>,
    _gauge: GaugeGuard,
}

/// What a room tells the cluster when rooms are cascaded across nodes.
#[derive(Debug, Clone)]
pub enum RoomNotice {
    /// The room's local members or tracks changed (or it closed): its state is published again.
    Changed(RoomName),
    /// A local member sent a chat line (JSON), for the room's members on other nodes.
    Chat(RoomName, Arc<str>),
}

/// The bounded queue of notices, and what is dropped when it is full (the next periodic state
/// publication repairs a lost `Changed`).
#[derive(Debug, Clone)]
pub struct Notices {
    pub queue: mpsc::Sender<RoomNotice>,
    pub dropped: Counter,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("room `{0}` is full ({1} participants)")]
    RoomFull(String, usize),
    #[error("the server holds its maximum of {0} rooms")]
    TooManyRooms(usize),
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("a participant may publish at most {0} tracks")]
    TooManyTracks(usize),
    #[error("the participant is no longer in the room")]
    NotAMember,
}

/// What a new member learns on joining.
#[derive(Debug)]
pub struct Joined {
    pub room: Arc<Room>,
    pub participant_id: ParticipantId,
    pub participants: Vec<ParticipantInfo>,
    pub tracks: Vec<Arc<Publication>>,
}

/// Read-only view of a room, for the admin API and tests.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoomSnapshot {
    pub name: String,
    pub mode: RoomMode,
    pub participants: Vec<ParticipantInfo>,
    pub tracks: Vec<TrackInfo>,
}

impl Room {
    pub fn name(&self) -> &RoomName {
        &self.name
    }

    pub fn mode(&self) -> RoomMode {
        self.mode
    }

    /// Tells the cluster (if any) about a change; never blocks.
    fn notify(&self, notice: impl FnOnce() -> RoomNotice) {
        if let Some(n) = &self.notices
            && n.queue.try_send(notice()).is_err()
        {
            n.dropped.inc();
        }
    }

    fn changed(&self) {
        self.notify(|| RoomNotice::Changed(self.name.clone()));
    }

    fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A poisoned lock means a panic while holding it, which is a bug; the state itself is
        // still consistent (every update is a single insert/remove), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broadcast_except(state: &mut RoomState, except: &ParticipantId, event: &RoomEvent) {
        let RoomState {
            members, lagging, ..
        } = state;
        for (id, member) in members.iter_mut() {
            if id != except {
                // A member whose session ended is cleaned up by its own leave; nothing to do.
                member.deliver(event.clone(), lagging);
            }
        }
    }

    /// Whether `publisher` may publish one more track.
    pub fn may_publish(
        &self,
        publisher: &ParticipantId,
        max_tracks: usize,
    ) -> Result<(), PublishError> {
        Self::check_publish(&self.lock(), publisher, max_tracks)
    }

    fn check_publish(
        state: &RoomState,
        publisher: &ParticipantId,
        max_tracks: usize,
    ) -> Result<(), PublishError> {
        if !state.members.contains_key(publisher) {
            return Err(PublishError::NotAMember);
        }
        let published = (state.tracks.values())
            .filter(|t| &t.publisher == publisher)
            .count();
        if published >= max_tracks {
            return Err(PublishError::TooManyTracks(max_tracks));
        }
        Ok(())
    }

    /// Publishes a track and announces it to the other members. The media plane must know the
    /// track's `route` already: a subscriber may ask for it as soon as it is announced.
    pub fn publish(
        &self,
        publisher: &ParticipantId,
        track: NewTrack,
        route: TrackRoute,
        max_tracks: usize,
    ) -> Result<Arc<Publication>, PublishError> {
        let NewTrack {
            kind,
            stream_index,
            codec,
            layers,
        } = track;
        let mut state = self.lock();
        Self::check_publish(&state, publisher, max_tracks)?;
        let track_id = TrackId::random();
        let publication = Arc::new(Publication {
            info: TrackInfo {
                track_id: track_id.to_string(),
                participant_id: publisher.to_string(),
                stream_id: format!("{publisher}-{stream_index}"),
                kind,
                codec: codec.mime_type.clone(),
                layers,
            },
            publisher: publisher.clone(),
            track_id: track_id.clone(),
            codec,
            route,
            origin: None,
        });
        state.tracks.insert(track_id, publication.clone());
        Self::broadcast_except(
            &mut state,
            publisher,
            &RoomEvent::TrackPublished(publication.clone()),
        );
        let member = state.members.get(publisher);
        self.track_webhook(EventKind::TrackPublished, &publication, member);
        drop(state);
        self.changed();
        Ok(publication)
    }

    /// The packet-path keys of the videos these members publish.
    /// Every track published in the room.
    pub fn publications(&self) -> Vec<Arc<Publication>> {
        self.lock().tracks.values().cloned().collect()
    }

    pub fn video_routes_of(&self, members: &[ParticipantId]) -> Vec<TrackKey> {
        let state = self.lock();
        state
            .tracks
            .values()
            .filter(|t| t.info.kind == MediaKind::Video && members.contains(&t.publisher))
            .map(|t| t.route.key)
            .collect()
    }

    /// How loud a member speaks now (0: silent); the room announces its active speakers when
    /// the loudest change.
    pub fn set_loudness(&self, who: &ParticipantId, loudness: f32) {
        let mut state = self.lock();
        if !state.members.contains_key(who) {
            return;
        }
        state.loudness.insert(who.clone(), loudness);
        state.update_speakers();
    }

    /// Removes a track (its publisher stopped it) and tells the subscribers.
    pub fn unpublish(&self, track_id: &TrackId) {
        let mut state = self.lock();
        if let Some(publication) = state.tracks.remove(track_id) {
            let event = RoomEvent::TrackUnpublished(publication.clone());
            Self::broadcast_except(&mut state, &publication.publisher, &event);
            let member = state.members.get(&publication.publisher);
            self.track_webhook(EventKind::TrackUnpublished, &publication, member);
            drop(state);
            self.changed();
        }
    }

    /// A webhook about one track and its publisher.
    fn track_webhook(
        &self,
        kind: EventKind,
        publication: &Publication,
        publisher: Option<&Member>,
    ) {
        self.webhooks.notify(|| {
            let info = &publication.info;
            let mut event =
                webhook::Event::new(kind, self.name.as_str()).with_track(webhook::Track {
                    id: info.track_id.clone(),
                    kind: info.kind,
                    codec: info.codec.clone(),
                    layers: info.layers.clone(),
                });
            if let Some(member) = publisher {
                event = event.with_participant(member.webhook_participant(&publication.publisher));
            }
            event
        });
    }

    pub fn publication(&self, track_id: &TrackId) -> Option<Arc<Publication>> {
        self.lock().tracks.get(track_id).cloned()
    }

    /// Delivers a relayed signaling message to one member (mesh rooms). False if no such member.
    pub fn relay(&self, to: &ParticipantId, message: ServerMessage) -> bool {
        self.lock().deliver_to(to, RoomEvent::Relay(message))
    }

    /// Sends a chat line to every member but the sender. Returns how many were dropped because
    /// the member's chat queue was full.
    pub fn chat(&self, from: &ParticipantId, line: Arc<str>) -> usize {
        let dropped = self.lock().chat_except(Some(from), &line);
        self.notify(|| RoomNotice::Chat(self.name.clone(), line));
        dropped
    }

    /// Asks a member's session to end (admin API). False if no such member.
    pub fn remove(&self, who: &ParticipantId, reason: &str) -> bool {
        self.lock()
            .deliver_to(who, RoomEvent::Removed(reason.to_owned()))
    }

    /// Asks every member's session to end (admin API); the room closes when the last leaves.
    /// Returns how many were asked.
    pub fn remove_all(&self, reason: &str) -> usize {
        let mut state = self.lock();
        let RoomState {
            members, lagging, ..
        } = &mut *state;
        for member in members.values_mut() {
            member.deliver(RoomEvent::Removed(reason.to_owned()), lagging);
        }
        members.len()
    }

    pub fn member_name(&self, id: &ParticipantId) -> Option<String> {
        self.lock().members.get(id).map(|m| m.name.clone())
    }

    /// A member muted or unmuted its microphone or camera: the others are told if it changed.
    pub fn set_muted(&self, who: &ParticipantId, kind: MediaKind, muted: bool) {
        let mut state = self.lock();
        let Some(member) = state.members.get_mut(who) else {
            return;
        };
        let flag = match kind {
            MediaKind::Audio => &mut member.audio_muted,
            MediaKind::Video => &mut member.video_muted,
        };
        if *flag == muted {
            return;
        }
        *flag = muted;
        let event = RoomEvent::ParticipantUpdated(member.info(who));
        Room::broadcast_except(&mut state, who, &event);
        drop(state);
        self.changed();
    }

    /// An administrator muted or unmuted a track (its packets are dropped in the media plane):
    /// the publisher is told, and the others see the publisher's mute state change. The
    /// publication, or None if there is no such track.
    pub fn mute_by_admin(&self, track_id: &TrackId, muted: bool) -> Option<Arc<Publication>> {
        let publication = self.publication(track_id)?;
        let who = &publication.publisher;
        self.set_muted(who, publication.info.kind, muted);
        let event = RoomEvent::MutedByAdmin {
            track: publication.info.clone(),
            muted,
        };
        self.lock().deliver_to(who, event);
        Some(publication)
    }

    /// The active speakers last announced, loudest first.
    pub fn active_speakers(&self) -> Arc<[ParticipantId]> {
        self.lock().active_speakers.clone()
    }

    pub fn is_member(&self, id: &ParticipantId) -> bool {
        self.lock().members.contains_key(id)
    }

    pub fn snapshot(&self) -> RoomSnapshot {
        let state = self.lock();
        let mut tracks: Vec<TrackInfo> = state.tracks.values().map(|t| t.info.clone()).collect();
        tracks.sort_by(|a, b| a.track_id.cmp(&b.track_id));
        RoomSnapshot {
            name: self.name.to_string(),
            mode: self.mode,
            participants: state.participants(),
            tracks,
        }
    }
}

/// All rooms of the server.
#[derive(Debug)]
pub struct Registry {
    rooms: DashMap<RoomName, Arc<Room>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    webhooks: Webhooks,
    notices: Option<Notices>,
}

impl Registry {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Registry {
            rooms: DashMap::new(),
            limits,
            metrics,
            webhooks: Webhooks::default(),
            notices: None,
        }
    }

    /// Tells the cluster what changes in rooms (cascading).
    pub fn with_notices(mut self, notices: Notices) -> Self {
        self.notices = Some(notices);
        self
    }

    /// Tells `webhooks` what happens in rooms.
    pub fn with_webhooks(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = webhooks;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds a participant to a room, creating the room (in `mode`) if it does not exist.
    pub fn join(
        &self,
        room_name: &RoomName,
        name: &str,
        mode: RoomMode,
        channels: MemberChannels,
        profile: MemberProfile,
    ) -> Result<Joined, JoinError> {
        loop {
            let room = self.room_or_create(room_name, mode)?;
            let mut state = room.lock();
            if state.closed {
                // Dropped between lookup and lock: take the fresh one.
                continue;
            }
            let max = self.limits.max_participants_per_room;
            if max != 0 && state.members.len() + state.remote.len() >= max {
                return Err(JoinError::RoomFull(room_name.to_string(), max));
            }
            let participant_id = ParticipantId::random();
            let member = Member {
                name: name.to_string(),
                identity: profile.identity,
                viewer: profile.viewer,
                audio_muted: false,
                video_muted: false,
                channels,
            };
            let participants = state.participants();
            let tracks = state.tracks.values().cloned().collect();
            let joined = RoomEvent::ParticipantJoined(member.info(&participant_id));
            Room::broadcast_except(&mut state, &participant_id, &joined);
            self.webhooks.notify(|| {
                webhook::Event::new(EventKind::ParticipantJoined, room_name.as_str())
                    .with_participant(member.webhook_participant(&participant_id))
            });
            state.members.insert(participant_id.clone(), member);
            state.order.push(participant_id.clone());
            drop(state);
            room.changed();
            return Ok(Joined {
                room,
                participant_id,
                participants,
                tracks,
            });
        }
    }

    fn room_or_create(&self, name: &RoomName, mode: RoomMode) -> Result<Arc<Room>, JoinError> {
        if let Some(room) = self.rooms.get(name) {
            return Ok(room.clone());
        }
        let max = self.limits.max_rooms;
        if max != 0 && self.rooms.len() >= max {
            return Err(JoinError::TooManyRooms(max));
        }
        let room = self
            .rooms
            .entry(name.clone())
            .or_insert_with(|| {
                tracing::info!(room = %name, ?mode, "room created");
                self.webhooks
                    .notify(|| webhook::Event::new(EventKind::RoomStarted, name.as_str()));
                Arc::new(Room {
                    name: name.clone(),
                    mode,
                    state: Mutex::new(RoomState {
                        lagging: self.metrics.members_lagging.clone(),
                        ..RoomState::default()
                    }),
                    webhooks: self.webhooks.clone(),
                    notices: self.notices.clone(),
                    _gauge: GaugeGuard::new(&self.metrics, |m| &m.rooms),
                })
            })
            .clone();
        Ok(room)
    }

    /// Removes a participant and everything it published, tells the others, and drops the room
    /// when it is empty. Idempotent.
    pub fn leave(&self, room: &Room, id: &ParticipantId) {
        {
            let mut state = room.lock();
            let Some(member) = state.members.remove(id) else {
                return;
            };
            state.order.retain(|m| m != id);
            if state.loudness.remove(id).is_some() {
                state.update_speakers();
            }
            let gone: Vec<TrackId> = state
                .tracks
                .iter()
                .filter(|(_, t)| &t.publisher == id)
                .map(|(k, _)| k.clone())
                .collect();
            for track_id in gone {
                if let Some(publication) = state.tracks.remove(&track_id) {
                    room.track_webhook(EventKind::TrackUnpublished, &publication, Some(&member));
                    Room::broadcast_except(
                        &mut state,
                        id,
                        &RoomEvent::TrackUnpublished(publication),
                    );
                }
            }
            Room::broadcast_except(&mut state, id, &RoomEvent::ParticipantLeft(id.clone()));
            self.webhooks.notify(|| {
                webhook::Event::new(EventKind::ParticipantLeft, room.name().as_str())
                    .with_participant(member.webhook_participant(id))
            });
        }
        room.changed();
        self.close_if_empty(room);
    }

    /// Drops `room` if nobody is in it; true if it was dropped (or already gone).
    pub fn close_if_empty(&self, room: &Room) -> bool {
        let removed = self.rooms.remove_if(room.name(), |_, r| {
            let mut state = r.lock();
            if state.members.is_empty() {
                state.closed = true;
                true
            } else {
                false
            }
        });
        if removed.is_some() {
            tracing::info!(room = %room.name(), "room closed (empty)");
            room.changed();
            self.webhooks
                .notify(|| webhook::Event::new(EventKind::RoomFinished, room.name().as_str()));
            release_free_memory_soon();
        }
        removed.is_some() || !self.rooms.contains_key(room.name())
    }

    /// Opens an empty room in `mode` ahead of its participants (admin API), or finds the open
    /// one of that name. It stays until closed, or until its last participant leaves.
    pub fn open(&self, name: &RoomName, mode: RoomMode) -> Result<Arc<Room>, JoinError> {
        self.room_or_create(name, mode)
    }

    /// The mode of a room, if it exists.
    pub fn mode_of(&self, name: &RoomName) -> Option<RoomMode> {
        self.rooms.get(name).map(|room| room.mode())
    }

    /// Every open room and its members' ids (what the cluster's heartbeat reports).
    pub fn membership(&self) -> Vec<(String, Vec<String>)> {
        let rooms: Vec<Arc<Room>> = self.rooms.iter().map(|r| r.value().clone()).collect();
        rooms
            .iter()
            .map(|room| {
                let state = room.lock();
                let ids = (state.order.iter())
                    .filter(|id| state.members.contains_key(*id))
                    .map(|id| id.to_string())
                    .collect();
                (room.name().to_string(), ids)
            })
            .collect()
    }

    pub fn room_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.rooms.iter().map(|r| r.key().to_string()).collect();
        names.sort();
        names
    }

    /// The room called `name`, if it is open.
    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        let name = RoomName::parse(name)?;
        self.rooms.get(&name).map(|r| r.clone())
    }

    pub fn room_snapshot(&self, name: &str) -> Option<RoomSnapshot> {
        let name = RoomName::parse(name)?;
        let room = self.rooms.get(&name)?.clone();
        Some(room.snapshot())
    }

    pub fn snapshots(&self) -> Vec<RoomSnapshot> {
        let rooms: Vec<Arc<Room>> = self.rooms.iter().map(|r| r.value().clone()).collect();
        let mut out: Vec<RoomSnapshot> = rooms.iter().map(|r| r.snapshot()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// After a room closes, hands the memory its calls freed back to the system. glibc keeps freed
/// pages in each thread's arena, so a server that held a big room would keep its peak resident
/// size for good; trimming once the media workers have dropped the room's connections (a second
/// later) brings it back down, and leaves a real leak as the only thing that stays.
fn release_free_memory_soon() {
    #[cfg(target_env = "gnu")]
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels() -> (
        MemberChannels,
        mpsc::Receiver<RoomEvent>,
        mpsc::Receiver<Arc<str>>,
    ) {
        let (events, erx) = mpsc::channel(64);
        let (chat, crx) = mpsc::channel(4);
        (MemberChannels { events, chat }, erx, crx)
    }

    fn registry(max_participants: usize) -> Registry {
        let limits = Limits {
            max_participants_per_room: max_participants,
            ..Limits::default()
        };
        Registry::new(limits, Arc::new(Metrics::default()))
    }

    fn codec() -> TrackCodec {
        TrackCodec {
            mime_type: "video/VP8".into(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: String::new(),
        }
    }

    fn route() -> TrackRoute {
        TrackRoute {
            key: TrackKey::next(),
            worker: 0,
        }
    }

    fn new_track(kind: MediaKind) -> NewTrack {
        NewTrack {
            kind,
            stream_index: 0,
            codec: codec(),
            layers: Vec::new(),
        }
    }

    #[test]
    fn join_announce_leave_and_drop_empty_room() {
        let reg = registry(10);
        let name = RoomName::parse("r").unwrap();
        let (ca, mut ea, _) = channels();
        let a = reg
            .join(&name, "alice", RoomMode::Sfu, ca, MemberProfile::default())
            .unwrap();
        assert!(a.participants.is_empty());
        let (cb, _eb, _) = channels();
        let b = reg
            .join(&name, "bob", RoomMode::Mesh, cb, MemberProfile::default())
            .unwrap();
        assert_eq!(b.participants[0].name, "alice");
        assert_eq!(b.room.mode(), RoomMode::Sfu, "the creator's mode wins");
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::ParticipantJoined(p)) if p.name == "bob"));

        let publication = b
            .room
            .publish(&b.participant_id, new_track(MediaKind::Video), route(), 8)
            .unwrap();
        assert_eq!(
            publication.info.stream_id,
            format!("{}-0", b.participant_id)
        );
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::TrackPublished(_))));

        reg.leave(&b.room, &b.participant_id);
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::TrackUnpublished(_))));
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::ParticipantLeft(_))));
        assert!(reg.room_snapshot("r").unwrap().tracks.is_empty());
        reg.leave(&b.room, &b.participant_id); // idempotent
        reg.leave(&a.room, &a.participant_id);
        assert!(reg.room_names().is_empty());
    }

    #[test]
    fn active_speakers_are_the_loudest_and_announced_on_change() {
        let reg = registry(10);
        let name = RoomName::parse("talk").unwrap();
        let mut members = Vec::new();
        for who in ["a", "b", "c", "d"] {
            let (ch, events, _) = channels();
            members.push((
                reg.join(&name, who, RoomMode::Sfu, ch, MemberProfile::default())
                    .unwrap(),
                events,
            ));
        }
        let room = members[0].0.room.clone();
        let ids: Vec<ParticipantId> = members.iter().map(|m| m.0.participant_id.clone()).collect();
        let id = |i: usize| ids[i].clone();
        let speakers = |events: &mut mpsc::Receiver<RoomEvent>| {
            let mut last = None;
            while let Ok(e) = events.try_recv() {
                if let RoomEvent::ActiveSpeakers(s) = e {
                    last = Some(s.to_vec());
                }
            }
            last
        };
        speakers(&mut members[0].1);
        room.set_loudness(&id(1), 0.2);
        room.set_loudness(&id(2), 0.5);
        assert_eq!(speakers(&mut members[0].1), Some(vec![id(2), id(1)]));
        room.set_loudness(&id(2), 0.5);
        assert_eq!(speakers(&mut members[0].1), None, "no change, no message");
        room.set_loudness(&id(3), 0.1);
        room.set_loudness(&id(0), 0.9);
        assert_eq!(
            speakers(&mut members[0].1),
            Some(vec![id(0), id(2), id(1)]),
            "at most three"
        );
        reg.leave(&room, &id(2));
        assert_eq!(speakers(&mut members[0].1), Some(vec![id(0), id(1), id(3)]));
        room.set_loudness(&id(0), 0.0);
        room.set_loudness(&id(1), 0.0);
        room.set_loudness(&id(3), 0.0);
        assert_eq!(speakers(&mut members[0].1), Some(vec![]));
    }

    #[test]
    fn full_room_and_track_limit() {
        let reg = registry(1);
        let name = RoomName::parse("r").unwrap();
        let (ca, _ea, _) = channels();
        let a = reg
            .join(&name, "alice", RoomMode::Sfu, ca, MemberProfile::default())
            .unwrap();
        let (cb, _eb, _) = channels();
        assert!(matches!(
            reg.join(&name, "bob", RoomMode::Sfu, cb, MemberProfile::default()),
            Err(JoinError::RoomFull(..))
        ));
        a.room
            .publish(&a.participant_id, new_track(MediaKind::Audio), route(), 1)
            .unwrap();
        assert_eq!(
            a.room
                .publish(&a.participant_id, new_track(MediaKind::Audio), route(), 1)
                .unwrap_err(),
            PublishError::TooManyTracks(1)
        );
    }

    #[test]
    fn chat_reaches_others_and_drops_when_full() {
        let reg = registry(10);
        let name = RoomName::parse("r").unwrap();
        let (ca, _ea, mut chat_a) = channels();
        let a = reg
            .join(&name, "alice", RoomMode::Sfu, ca, MemberProfile::default())
            .unwrap();
        let (cb, _eb, mut chat_b) = channels();
        let _b = reg
            .join(&name, "bob", RoomMode::Sfu, cb, MemberProfile::default())
            .unwrap();
        assert_eq!(a.room.chat(&a.participant_id, "hi".into()), 0);
        assert_eq!(&*chat_b.try_recv().unwrap(), "hi");
        assert!(chat_a.try_recv().is_err(), "not echoed to the sender");
        let dropped: usize = (0..10)
            .map(|_| a.room.chat(&a.participant_id, "x".into()))
            .sum();
        assert_eq!(dropped, 6, "queue of 4");
    }

    #[test]
    fn another_node_s_members_and_tracks_come_and_go_as_events() {
        let reg = registry(10);
        let name = RoomName::parse("r").unwrap();
        let (ca, mut ea, _) = channels();
        let a = reg
            .join(&name, "alice", RoomMode::Sfu, ca, MemberProfile::default())
            .unwrap();
        let room = &a.room;
        let bob = ParticipantInfo {
            id: "pbob".into(),
            name: "bob".into(),
            audio_muted: false,
            video_muted: false,
            viewer: false,
        };
        let track = RemoteTrack {
            info: TrackInfo {
                track_id: "tcam".into(),
                participant_id: "pbob".into(),
                stream_id: "pbob-0".into(),
                kind: MediaKind::Video,
                codec: "video/VP8".into(),
                layers: Vec::new(),
            },
            codec: codec(),
            key: 77,
            worker: 1,
        };
        // A node may not describe this node's own member.
        let mut alice = bob.clone();
        alice.id = a.participant_id.to_string();
        let update = room.apply_remote("b", vec![bob.clone(), alice], vec![track.clone()], 9);
        assert_eq!(update.added.len(), 1);
        let relayed = &update.added[0];
        assert_eq!(
            (relayed.route.worker, relayed.origin.as_ref().unwrap().key),
            (9, 77)
        );
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::ParticipantJoined(p)) if p.name == "bob"));
        assert!(
            matches!(ea.try_recv(), Ok(RoomEvent::TrackPublished(t)) if t.info.track_id == "tcam")
        );
        assert!(ea.try_recv().is_err());
        assert_eq!(room.snapshot().participants.len(), 2);
        assert!(
            room.local_state().1.is_empty(),
            "a relayed track is not this node's"
        );
        assert_eq!(reg.membership()[0].1.len(), 1, "nor is a remote member");

        // Said again: nothing changes. Muted: an update.
        assert!(
            room.apply_remote("b", vec![bob.clone()], vec![track.clone()], 9)
                .added
                .is_empty()
        );
        assert!(ea.try_recv().is_err());
        let mut muted = bob.clone();
        muted.audio_muted = true;
        room.apply_remote("b", vec![muted], vec![track], 9);
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::ParticipantUpdated(p)) if p.audio_muted));

        // The node holds nothing any more: the track ends, then its publisher leaves.
        let update = room.apply_remote("b", Vec::new(), Vec::new(), 9);
        assert_eq!(update.removed.len(), 1);
        assert!(matches!(ea.try_recv(), Ok(RoomEvent::TrackUnpublished(_))));
        assert!(
            matches!(ea.try_recv(), Ok(RoomEvent::ParticipantLeft(id)) if id.as_str() == "pbob")
        );
        assert_eq!(room.snapshot().participants.len(), 1);
    }

    #[test]
    fn a_member_a_whole_queue_behind_is_cut_off_and_leaves_cleanly() {
        let reg = registry(10);
        let name = RoomName::parse("r").unwrap();
        let (events, mut behind) = mpsc::channel(4);
        let (chat, _chat) = mpsc::channel(4);
        let slow = reg
            .join(
                &name,
                "slow",
                RoomMode::Mesh,
                MemberChannels { events, chat },
                MemberProfile::default(),
            )
            .unwrap();
        // Others come and go: more events than the slow member's queue holds.
        for i in 0..3 {
            let (c, _e, _) = channels();
            let other = reg
                .join(
                    &name,
                    &format!("o{i}"),
                    RoomMode::Mesh,
                    c,
                    MemberProfile::default(),
                )
                .unwrap();
            reg.leave(&other.room, &other.participant_id);
        }
        assert_eq!(reg.metrics.snapshot().members_lagging, 1);
        // Its session reads what was queued, then finds the channel closed...
        let mut read = 0;
        while behind.try_recv().is_ok() {
            read += 1;
        }
        assert_eq!(read, 4);
        assert!(matches!(
            behind.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        // ... and leaves: the room is gone.
        reg.leave(&slow.room, &slow.participant_id);
        assert!(reg.snapshots().is_empty());
    }
}
