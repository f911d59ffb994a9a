//! The SFU side of a session: the participant's media connection, the tracks it publishes
//! into its room, and the room's tracks it subscribes to.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;

use super::protocol::ServerMessage;
use crate::auth::Grants;
use crate::forward::{TrackKey, TrackRoute};
use crate::media::{IncomingTrack, IncomingTrackId, MediaEvent, MediaHandle, Subscription};
use crate::room::{NewTrack, Publication, Room};
use crate::types::{ParticipantId, TrackId};

/// Whose state a remembered message carries: a track received, or one published (by id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TrackState {
    Received(String),
    Published(String),
}

pub struct SfuMedia {
    pub handle: MediaHandle,
    pub events: mpsc::UnboundedReceiver<MediaEvent>,
    /// Chat lines the participant sent on its `chat` data channel.
    pub chat_in: mpsc::Receiver<String>,
    /// Publisher stream id (msid) → index in the forwarded stream id `{participant}-{index}`.
    streams: HashMap<String, usize>,
    /// What the participant publishes, by the connection's id for it.
    published: Vec<(IncomingTrackId, TrackId)>,
    /// When the server sent the offer it waits an answer for, and that offer.
    pub awaiting_answer: Option<(Instant, String)>,
    /// The last `subscription-state` of each track received and `publisher-layers` of each
    /// track published, by track id: sent again after a resume.
    last_state: HashMap<TrackState, ServerMessage>,
    /// A client offer was ignored for glare: its candidates may fail and that is expected.
    pub ignoring_offer: bool,
    /// When the client closed its connection; a `leave` may be on its way.
    pub closed_by_peer_at: Option<Instant>,
    /// When the connection was opened, until its ICE and DTLS are up (None from then on).
    pub connecting_since: Option<Instant>,
    /// What the participant's token allows.
    pub grants: Grants,
    /// A player of one participant (WHEP): it receives that participant's tracks only.
    pub only_from: Option<ParticipantId>,
    /// A player of the room (WHEP): `only_from` follows the active speaker.
    pub follows_speaker: bool,
    /// Every track goes out in the participant's first stream (`{participant}-0`, its camera
    /// and microphone), whatever its stream id: a WHIP encoder has no screen share, and some
    /// (GStreamer's webrtcbin) give audio and video stream ids of their own, which would
    /// otherwise show its audio as a second, screen-share stream.
    pub one_stream: bool,
}

impl SfuMedia {
    pub fn new(
        handle: MediaHandle,
        events: mpsc::UnboundedReceiver<MediaEvent>,
        chat_in: mpsc::Receiver<String>,
        grants: Grants,
    ) -> Self {
        SfuMedia {
            handle,
            events,
            chat_in,
            streams: HashMap::new(),
            published: Vec::new(),
            awaiting_answer: None,
            last_state: HashMap::new(),
            ignoring_offer: false,
            closed_by_peer_at: None,
            connecting_since: Some(Instant::now()),
            grants,
            only_from: None,
            follows_speaker: false,
            one_stream: false,
        }
    }

    /// Keeps the latest `subscription-state` or `publisher-layers` of a track for a resume.
    pub fn remember(&mut self, message: &ServerMessage) {
        let key = match message {
            ServerMessage::SubscriptionState { track_id, .. } => {
                TrackState::Received(track_id.clone())
            }
            ServerMessage::PublisherLayers { track_id, .. } => {
                TrackState::Published(track_id.clone())
            }
            _ => return,
        };
        self.last_state.insert(key, message.clone());
    }

    /// What a resumed client must hear again: the server's outstanding offer (its answer may
    /// have been lost, and the offer too), and the latest state of every track.
    pub fn resync_messages(&mut self) -> Vec<ServerMessage> {
        let mut messages: Vec<ServerMessage> = self.last_state.values().cloned().collect();
        if let Some((since, sdp)) = self.awaiting_answer.as_mut() {
            *since = Instant::now();
            messages.insert(
                0,
                ServerMessage::Offer {
                    sdp: sdp.clone(),
                    from: None,
                },
            );
        }
        messages
    }

    /// Adds a room's publication to this participant's connection (never its own), if its
    /// token lets it receive media.
    pub fn subscribe(&self, publication: &Publication) {
        if !self.grants.can_subscribe
            || self
                .only_from
                .as_ref()
                .is_some_and(|from| *from != publication.publisher)
        {
            return;
        }
        let sub = Subscription {
            route: publication.route,
            kind: publication.info.kind,
            codec: publication.codec.clone(),
            stream_id: publication.info.stream_id.clone(),
            track_id: publication.track_id.clone(),
            layers: publication.info.layers.clone().into(),
            screen: publication.is_screen(),
        };
        if let Err(e) = self.handle.subscribe(sub) {
            tracing::warn!(track = %publication.track_id, "subscribe failed: {e}");
        }
    }

    /// The active speakers' videos go first in this participant's downlink.
    pub fn prioritize_speakers(&self, room: &Room, speakers: &[ParticipantId]) {
        let keys = room.video_routes_of(speakers);
        if let Err(e) = self.handle.prioritize(keys) {
            tracing::debug!("prioritize: {e}");
        }
    }

    pub fn unsubscribe(&mut self, publication: &Publication) {
        let _ = self.handle.unsubscribe(publication.route.key);
        self.last_state
            .remove(&TrackState::Received(publication.track_id.to_string()));
    }

    /// A player of the room (WHEP) plays the loudest speaker's tracks from now on, if that
    /// speaker publishes any: the player's m-lines change source (the old tracks go first,
    /// freeing them).
    pub fn follow(&mut self, room: &Room, speaker: &ParticipantId) {
        if !self.follows_speaker || self.only_from.as_ref() == Some(speaker) {
            return;
        }
        let publications = room.publications();
        if !publications.iter().any(|p| p.publisher == *speaker) {
            return;
        }
        for publication in publications.iter().filter(|p| p.publisher != *speaker) {
            self.unsubscribe(publication);
        }
        self.only_from = Some(speaker.clone());
        for publication in publications.iter().filter(|p| p.publisher == *speaker) {
            self.subscribe(publication);
        }
    }

    /// A player of the room whose speaker published nothing any more plays the room's first
    /// tracks again, until someone else speaks.
    pub fn followed_track_gone(&mut self, room: &Room) {
        let Some(followed) = self.only_from.as_ref().filter(|_| self.follows_speaker) else {
            return;
        };
        let publications = room.publications();
        if publications.iter().any(|p| p.publisher == *followed) {
            return;
        }
        self.only_from = None;
        for publication in &publications {
            self.subscribe(publication);
        }
    }

    /// Publishes a new incoming track in the room and starts forwarding it.
    pub fn publish(
        &mut self,
        room: &Room,
        publisher: &ParticipantId,
        track: IncomingTrack,
        max_tracks: usize,
    ) {
        let next_index = if self.one_stream {
            0
        } else {
            self.streams.len()
        };
        let stream_index = *self.streams.entry(track.stream_id).or_insert(next_index);
        let kind = track.kind;
        let new_track = NewTrack {
            kind,
            stream_index,
            codec: track.codec,
            layers: track.layers,
        };
        // The worker learns of the track before the room announces it: a subscriber's request
        // for it (on this worker or from another) must find it there.
        if let Err(e) = room.may_publish(publisher, max_tracks) {
            tracing::warn!(participant = %publisher, "track not published: {e}");
            return;
        }
        let route = TrackRoute {
            key: TrackKey::next(),
            worker: self.handle.worker(),
        };
        if self.handle.publish(track.id, route.key).is_err() {
            return;
        }
        let publication = match room.publish(publisher, new_track, route, max_tracks) {
            Ok(publication) => publication,
            Err(e) => {
                // It left meanwhile: its connection is closing, forwarder and all.
                tracing::warn!(participant = %publisher, "track not published: {e}");
                return;
            }
        };
        tracing::info!(participant = %publisher, track = %publication.track_id, ?kind, codec = %publication.codec.mime_type, "track published");
        self.published
            .push((track.id, publication.track_id.clone()));
    }

    /// The room's id for a track the participant publishes.
    pub fn published_id(&self, id: IncomingTrackId) -> Option<TrackId> {
        self.published
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, t)| t.clone())
    }

    /// The participant stopped sending a track: unpublish it.
    pub fn unpublish(&mut self, room: &Room, id: IncomingTrackId) {
        if let Some(i) = self.published.iter().position(|(p, _)| *p == id) {
            let (_, track_id) = self.published.swap_remove(i);
            self.last_state
                .remove(&TrackState::Published(track_id.to_string()));
            room.unpublish(&track_id);
        }
    }
}
