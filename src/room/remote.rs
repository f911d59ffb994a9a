//! A room's members on other nodes of the cluster (cascading). Their node publishes what it
//! holds of the room; applying it here turns the differences into the same events local
//! members produce, so every node's members hear the same `participant-joined`,
//! `track-published` and the rest.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Publication, RemoteOrigin, Room, RoomEvent, RoomState};
use crate::forward::{TrackKey, TrackRoute};
use crate::signal::protocol::{ParticipantInfo, TrackInfo};
use crate::types::{ParticipantId, TrackCodec, TrackId};

#[derive(Debug)]
pub(super) struct RemoteMember {
    pub node: Arc<str>,
    pub info: ParticipantInfo,
}

/// A track as its node describes it to the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteTrack {
    pub info: TrackInfo,
    pub codec: TrackCodec,
    /// Its key and media worker on its node.
    pub key: u64,
    pub worker: usize,
}

impl RemoteTrack {
    /// How this node describes one of its own tracks to the others.
    pub fn of(publication: &Publication) -> Self {
        RemoteTrack {
            info: publication.info.clone(),
            codec: publication.codec.clone(),
            key: publication.route.key.to_raw(),
            worker: publication.route.worker,
        }
    }
}

/// The remote tracks a state update added and removed.
#[derive(Debug, Default)]
pub struct RemoteUpdate {
    pub added: Vec<Arc<Publication>>,
    pub removed: Vec<Arc<Publication>>,
}

impl Room {
    /// This node's own members and tracks, as the other nodes of the cluster are told.
    pub fn local_state(&self) -> (Vec<ParticipantInfo>, Vec<RemoteTrack>) {
        let state = self.lock();
        let members = (state.order.iter())
            .filter_map(|id| state.members.get(id).map(|m| m.info(id)))
            .collect();
        let tracks = (state.tracks.values())
            .filter(|t| t.origin.is_none())
            .map(|t| RemoteTrack::of(t))
            .collect();
        (members, tracks)
    }

    /// Makes `node`'s members and tracks in this room what it last said (nothing: it left or
    /// died), telling the local members what changed. Relayed tracks enter the media plane at
    /// `relay_worker`, under fresh keys.
    pub fn apply_remote(
        &self,
        node: &str,
        members: Vec<ParticipantInfo>,
        tracks: Vec<RemoteTrack>,
        relay_worker: usize,
    ) -> RemoteUpdate {
        let mut update = RemoteUpdate::default();
        let mut state = self.lock();
        let listed: HashSet<ParticipantId> = (members.iter())
            .map(|m| ParticipantId::from(m.id.as_str()))
            // Not a node's to describe: a member of this node (a confused or hostile peer).
            .filter(|id| !state.members.contains_key(id))
            .collect();
        let track_ids: HashSet<&str> = tracks.iter().map(|t| t.info.track_id.as_str()).collect();

        // Gone tracks first, then gone members: a subscriber hears of a track's end before
        // its publisher's.
        let gone: Vec<TrackId> = (state.tracks.iter())
            .filter(|(id, t)| {
                t.origin.as_ref().is_some_and(|o| &*o.node == node)
                    && (!track_ids.contains(id.as_str()) || !listed.contains(&t.publisher))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(publication) = state.tracks.remove(&id) {
                broadcast(&mut state, RoomEvent::TrackUnpublished(publication.clone()));
                update.removed.push(publication);
            }
        }
        let left: Vec<ParticipantId> = (state.remote.iter())
            .filter(|(id, r)| &*r.node == node && !listed.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in left {
            state.remote.remove(&id);
            state.order.retain(|m| *m != id);
            broadcast(&mut state, RoomEvent::ParticipantLeft(id));
        }

        for info in members {
            let id = ParticipantId::from(info.id.as_str());
            if !listed.contains(&id) {
                continue;
            }
            match state.remote.get_mut(&id) {
                Some(known) if known.info == info => {}
                Some(known) => {
                    known.info = info.clone();
                    broadcast(&mut state, RoomEvent::ParticipantUpdated(info));
                }
                None => {
                    state.remote.insert(
                        id.clone(),
                        RemoteMember {
                            node: node.into(),
                            info: info.clone(),
                        },
                    );
                    state.order.push(id);
                    broadcast(&mut state, RoomEvent::ParticipantJoined(info));
                }
            }
        }
        for track in tracks {
            let publisher = ParticipantId::from(track.info.participant_id.as_str());
            let track_id = TrackId::from(track.info.track_id.as_str());
            if !listed.contains(&publisher) || state.tracks.contains_key(&track_id) {
                continue;
            }
            let publication = Arc::new(Publication {
                info: track.info,
                publisher,
                track_id: track_id.clone(),
                codec: track.codec,
                route: TrackRoute {
                    key: TrackKey::next(),
                    worker: relay_worker,
                },
                origin: Some(RemoteOrigin {
                    node: node.into(),
                    key: track.key,
                    worker: track.worker,
                }),
            });
            state.tracks.insert(track_id, publication.clone());
            broadcast(&mut state, RoomEvent::TrackPublished(publication.clone()));
            update.added.push(publication);
        }
        update
    }

    /// A chat line from a member on another node, for every member here.
    pub fn chat_from_remote(&self, line: &Arc<str>) -> usize {
        self.lock().chat_except(None, line)
    }

    /// Every track relayed here from other nodes.
    pub fn remote_publications(&self) -> Vec<Arc<Publication>> {
        (self.lock().tracks.values())
            .filter(|t| t.origin.is_some())
            .cloned()
            .collect()
    }
}

fn broadcast(state: &mut RoomState, event: RoomEvent) {
    let RoomState {
        members, lagging, ..
    } = state;
    for member in members.values_mut() {
        member.deliver(event.clone(), lagging);
    }
}
