//! What a client has seen: counters updated on the media paths (atomics, no locks per packet)
//! and a small locked record of signaling events, read through [`ClientSnapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use rtc::rtp;
use tokio::sync::Notify;
use webrtc::peer_connection::RTCPeerConnectionState;

use super::decode::DecodeCounts;
use super::payload::{self, PayloadError};
use crate::signal::protocol::{ErrorCode, MediaKind, ParticipantInfo, RoomMode, TrackInfo};

/// How many recorded server messages are kept (oldest are dropped first).
const MAX_EVENTS: usize = 4096;
/// How many chat messages are kept (oldest are dropped first).
const MAX_CHAT: usize = 4096;

/// Counters for one remote track (one `on_track`), updated by its receive task.
#[derive(Debug)]
pub(crate) struct RemoteTrackStats {
    pub stream_id: String,
    pub track_id: String,
    pub publisher_id: String,
    pub kind: MediaKind,
    /// `None` for the SFU link, the peer's id on a mesh link.
    pub link_peer: Option<String>,
    expected_sender: u32,
    packets: AtomicU64,
    bytes: AtomicU64,
    intact: AtomicU64,
    corrupt: AtomicU64,
    mismatched: AtomicU64,
    markers: AtomicU64,
    first_seq: AtomicU64,
    max_seq: AtomicU64,
    last_seq: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    /// The first intact packet: 0 none yet, 1 labelled key frame, 2 delta frame.
    first_key: AtomicU8,
    /// Intact packets by the simulcast layer the publisher sent them on.
    layer_packets: [AtomicU64; LAYERS],
    /// The layer of the last intact packet, `u8::MAX` before the first.
    last_layer: AtomicU8,
    ended: AtomicBool,
    /// The decoder model's counts (video only).
    frames_decoded: AtomicU64,
    frames_lost: AtomicU64,
    frames_undecodable: AtomicU64,
    freezes: AtomicU64,
    frozen_us: AtomicU64,
    keyframe_requests: AtomicU64,
    late_packets: AtomicU64,
}

/// Simulcast layers counted apart.
pub const LAYERS: usize = 4;

const NONE: u64 = u64::MAX;

impl RemoteTrackStats {
    pub fn new(
        stream_id: String,
        track_id: String,
        publisher_id: String,
        kind: MediaKind,
        link_peer: Option<String>,
    ) -> Self {
        let expected_sender = payload::participant_hash(&publisher_id);
        Self {
            stream_id,
            track_id,
            publisher_id,
            kind,
            link_peer,
            expected_sender,
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            intact: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            markers: AtomicU64::new(0),
            first_seq: AtomicU64::new(NONE),
            max_seq: AtomicU64::new(NONE),
            last_seq: AtomicU64::new(NONE),
            latency_sum_us: AtomicU64::new(0),
            latency_max_us: AtomicU64::new(0),
            first_key: AtomicU8::new(0),
            layer_packets: Default::default(),
            last_layer: AtomicU8::new(u8::MAX),
            ended: AtomicBool::new(false),
            frames_decoded: AtomicU64::new(0),
            frames_lost: AtomicU64::new(0),
            frames_undecodable: AtomicU64::new(0),
            freezes: AtomicU64::new(0),
            frozen_us: AtomicU64::new(0),
            keyframe_requests: AtomicU64::new(0),
            late_packets: AtomicU64::new(0),
        }
    }

    /// Records one received packet; `now_us` is [`payload::now_micros`]. Returns the payload
    /// header when the packet was intact and from the expected publisher.
    pub fn record(&self, packet: &rtp::Packet, now_us: u64) -> Option<payload::PayloadHeader> {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
        if packet.header.marker {
            self.markers.fetch_add(1, Ordering::Relaxed);
        }
        match payload::parse_payload(&packet.payload) {
            Ok(header) => {
                if header.sender != self.expected_sender || header.kind != self.kind {
                    self.mismatched.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                if self.intact.fetch_add(1, Ordering::Relaxed) == 0 {
                    let label = if payload::is_key(&packet.payload) {
                        1
                    } else {
                        2
                    };
                    self.first_key.store(label, Ordering::Relaxed);
                }
                let layer = usize::from(header.layer).min(LAYERS - 1);
                self.layer_packets[layer].fetch_add(1, Ordering::Relaxed);
                self.last_layer.store(layer as u8, Ordering::Relaxed);
                let _ = self.first_seq.compare_exchange(
                    NONE,
                    header.seq,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                let max = self.max_seq.load(Ordering::Relaxed);
                if max == NONE || header.seq > max {
                    self.max_seq.store(header.seq, Ordering::Relaxed);
                }
                self.last_seq.store(header.seq, Ordering::Relaxed);
                let latency = now_us.saturating_sub(header.sent_at_us);
                self.latency_sum_us.fetch_add(latency, Ordering::Relaxed);
                self.latency_max_us.fetch_max(latency, Ordering::Relaxed);
                Some(header)
            }
            Err(PayloadError::TooShort | PayloadError::BadMagic | PayloadError::BadKind(_)) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(PayloadError::BadPadding(_)) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Publishes the decoder model's counts (only the track's receive task writes them).
    pub fn set_decoded(&self, counts: DecodeCounts) {
        self.frames_decoded.store(counts.decoded, Ordering::Relaxed);
        self.frames_lost.store(counts.lost, Ordering::Relaxed);
        self.frames_undecodable
            .store(counts.undecodable, Ordering::Relaxed);
        self.freezes.store(counts.freezes, Ordering::Relaxed);
        self.frozen_us
            .store(counts.frozen.as_micros() as u64, Ordering::Relaxed);
        self.keyframe_requests
            .store(counts.keyframe_requests, Ordering::Relaxed);
        self.late_packets
            .store(counts.late_packets, Ordering::Relaxed);
    }

    pub fn set_ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RemoteTrackSnapshot {
        let opt = |v: u64| (v != NONE).then_some(v);
        let intact = self.intact.load(Ordering::Relaxed);
        RemoteTrackSnapshot {
            stream_id: self.stream_id.clone(),
            track_id: self.track_id.clone(),
            publisher_id: self.publisher_id.clone(),
            kind: self.kind,
            link_peer: self.link_peer.clone(),
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            intact,
            corrupt: self.corrupt.load(Ordering::Relaxed),
            mismatched: self.mismatched.load(Ordering::Relaxed),
            markers: self.markers.load(Ordering::Relaxed),
            first_seq: opt(self.first_seq.load(Ordering::Relaxed)),
            max_seq: opt(self.max_seq.load(Ordering::Relaxed)),
            last_seq: opt(self.last_seq.load(Ordering::Relaxed)),
            mean_latency_us: self
                .latency_sum_us
                .load(Ordering::Relaxed)
                .checked_div(intact)
                .unwrap_or(0),
            max_latency_us: self.latency_max_us.load(Ordering::Relaxed),
            first_packet_key: match self.first_key.load(Ordering::Relaxed) {
                0 => None,
                label => Some(label == 1),
            },
            layer_packets: std::array::from_fn(|i| self.layer_packets[i].load(Ordering::Relaxed)),
            last_layer: match self.last_layer.load(Ordering::Relaxed) {
                u8::MAX => None,
                l => Some(l),
            },
            ended: self.ended.load(Ordering::Relaxed),
            decode: DecodeCounts {
                decoded: self.frames_decoded.load(Ordering::Relaxed),
                lost: self.frames_lost.load(Ordering::Relaxed),
                undecodable: self.frames_undecodable.load(Ordering::Relaxed),
                freezes: self.freezes.load(Ordering::Relaxed),
                frozen: std::time::Duration::from_micros(self.frozen_us.load(Ordering::Relaxed)),
                keyframe_requests: self.keyframe_requests.load(Ordering::Relaxed),
                late_packets: self.late_packets.load(Ordering::Relaxed),
            },
        }
    }
}

/// Counters for one published track (all its outputs together).
#[derive(Debug, Default)]
pub(crate) struct LocalTrackStats {
    pub sent_packets: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Payload sequence of the last packet sent, `u64::MAX` before the first.
    pub last_seq: AtomicU64,
    pub frames: AtomicU64,
    pub write_errors: AtomicU64,
    pub pli: AtomicU64,
    pub fir: AtomicU64,
}

impl LocalTrackStats {
    pub fn new() -> Self {
        Self {
            last_seq: AtomicU64::new(NONE),
            ..Default::default()
        }
    }
}

/// A point-in-time copy of one remote track's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTrackSnapshot {
    /// The `MediaStream` id as the sender labelled it (`{publisher_id}-{n}` from the SFU).
    pub stream_id: String,
    pub track_id: String,
    /// The publishing participant: the stream id's prefix before its last `-` (SFU), or the
    /// peer's id (mesh).
    pub publisher_id: String,
    pub kind: MediaKind,
    /// `None` when received from the SFU, the peer's id on a mesh link.
    pub link_peer: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    /// Payloads that parsed, had intact padding, and named the expected publisher and kind.
    pub intact: u64,
    /// Payloads that did not parse or whose padding was damaged.
    pub corrupt: u64,
    /// Payloads that parsed but named another publisher or kind.
    pub mismatched: u64,
    /// Packets with the RTP marker bit.
    pub markers: u64,
    pub first_seq: Option<u64>,
    pub max_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub mean_latency_us: u64,
    pub max_latency_us: u64,
    /// Whether the first intact packet was labelled a key frame (None before one arrived).
    pub first_packet_key: Option<bool>,
    /// Intact packets by the simulcast layer they were sent on (0: lowest or only).
    pub layer_packets: [u64; LAYERS],
    /// The layer of the last intact packet.
    pub last_layer: Option<u8>,
    /// The track's reader has stopped: the remote stopped its m-line (a departed publisher's
    /// track), or the connection ended.
    pub ended: bool,
    /// What a decoder made of a video track (see [`super::decode`]); zero for audio.
    pub decode: DecodeCounts,
}

/// A point-in-time copy of one published track's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTrackSnapshot {
    pub track_id: String,
    pub kind: MediaKind,
    /// Packets written (each packet counted once however many mesh peers it went to).
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Payload sequence of the last packet written.
    pub last_seq: Option<u64>,
    pub frames: u64,
    pub write_errors: u64,
    /// Picture Loss Indications received for this track.
    pub pli: u64,
    /// Full Intra Requests received for this track.
    pub fir: u64,
}

impl LocalTrackSnapshot {
    /// PLI + FIR.
    pub fn keyframe_requests(&self) -> u64 {
        self.pli + self.fir
    }
}

/// A chat message received on a `chat` data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// The sender's participant id (from the relay JSON in SFU rooms, the link's peer in mesh).
    pub from: String,
    /// The sender's display name, when the relay carried one.
    pub name: Option<String>,
    pub text: String,
}

/// The state of one peer connection of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSnapshot {
    /// `None` for the connection to the SFU, the peer's id in mesh rooms.
    pub peer: Option<String>,
    pub state: RTCPeerConnectionState,
    pub chat_open: bool,
}

/// Everything the client has recorded, copied out at one moment.
#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    pub participant_id: String,
    pub room: String,
    pub mode: RoomMode,
    /// Other participants currently in the room, id → name.
    pub participants: BTreeMap<String, String>,
    /// Tracks the server announced (joined + track-published − unpublished − left).
    pub announced_tracks: Vec<TrackInfo>,
    pub remote_tracks: Vec<RemoteTrackSnapshot>,
    pub local_tracks: Vec<LocalTrackSnapshot>,
    pub chat: Vec<ChatMessage>,
    /// `error` messages from the server, in order.
    pub errors: Vec<(ErrorCode, String)>,
    /// Server messages of interest (everything except offer/answer/candidate), in order.
    pub events: Vec<crate::signal::protocol::ServerMessage>,
    /// Frames from the server that did not parse as a server message.
    pub unparsed_frames: u64,
    pub links: Vec<LinkSnapshot>,
    /// The server answered `leave` with `left`.
    pub left: bool,
    /// The signaling socket is closed (by either side), with the close code if one came.
    pub socket_closed: bool,
    pub close_code: Option<u16>,
}

impl ClientSnapshot {
    /// Remote tracks (any link) published by `publisher` of `kind`.
    pub fn tracks_from(
        &self,
        publisher: &str,
        kind: MediaKind,
    ) -> impl Iterator<Item = &RemoteTrackSnapshot> {
        self.remote_tracks
            .iter()
            .filter(move |t| t.publisher_id == publisher && t.kind == kind)
    }

    /// Intact packets received from `publisher` of `kind`, summed over its tracks.
    pub fn intact_from(&self, publisher: &str, kind: MediaKind) -> u64 {
        self.tracks_from(publisher, kind).map(|t| t.intact).sum()
    }

    /// Marker bits seen on packets from `publisher` of `kind`.
    pub fn markers_from(&self, publisher: &str, kind: MediaKind) -> u64 {
        self.tracks_from(publisher, kind).map(|t| t.markers).sum()
    }

    /// Damaged or misattributed payloads over all remote tracks.
    pub fn bad_payloads(&self) -> u64 {
        self.remote_tracks
            .iter()
            .map(|t| t.corrupt + t.mismatched)
            .sum()
    }

    /// The published track of `kind` (the first, if several).
    pub fn local(&self, kind: MediaKind) -> Option<&LocalTrackSnapshot> {
        self.local_tracks.iter().find(|t| t.kind == kind)
    }

    /// Every link is connected (and there is at least one).
    pub fn all_connected(&self) -> bool {
        !self.links.is_empty()
            && self
                .links
                .iter()
                .all(|l| l.state == RTCPeerConnectionState::Connected)
    }

    /// Chat messages received from `from`.
    pub fn chat_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = &'a ChatMessage> + 'a {
        self.chat.iter().filter(move |m| m.from == from)
    }

    /// The server sent an `error` with `code`.
    pub fn has_error(&self, code: ErrorCode) -> bool {
        self.errors.iter().any(|(c, _)| *c == code)
    }
}

/// The locked part of the record.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub participant_id: String,
    pub room: String,
    pub mode: RoomMode,
    pub participants: BTreeMap<String, String>,
    pub announced_tracks: Vec<TrackInfo>,
    pub remote_tracks: Vec<std::sync::Arc<RemoteTrackStats>>,
    pub local_tracks: Vec<(String, MediaKind, std::sync::Arc<LocalTrackStats>)>,
    pub chat: std::collections::VecDeque<ChatMessage>,
    pub errors: Vec<(ErrorCode, String)>,
    pub events: std::collections::VecDeque<crate::signal::protocol::ServerMessage>,
    pub unparsed_frames: u64,
    /// The SDP of the last offer the SFU sent.
    pub last_server_offer: Option<String>,
    pub links: BTreeMap<Option<String>, LinkSnapshot>,
    pub left: bool,
    pub socket_closed: bool,
    pub close_code: Option<u16>,
    /// From `joined` or the last `resumed` (protocol 3).
    pub resume_token: Option<String>,
}

/// State shared by the client's tasks and its handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    record: Mutex<Record>,
    /// Woken whenever the record changes (not per packet).
    pub changed: Notify,
}

impl Shared {
    /// Runs `f` on the record and wakes waiters.
    pub fn update<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        let result = {
            let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut record)
        };
        self.changed.notify_waiters();
        result
    }

    /// Runs `f` on the record without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&Record) -> R) -> R {
        let record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        f(&record)
    }

    pub fn push_event(&self, message: crate::signal::protocol::ServerMessage) {
        self.update(|r| {
            if r.events.len() >= MAX_EVENTS {
                r.events.pop_front();
            }
            r.events.push_back(message);
        });
    }

    pub fn push_chat(&self, message: ChatMessage) {
        self.update(|r| {
            if r.chat.len() >= MAX_CHAT {
                r.chat.pop_front();
            }
            r.chat.push_back(message);
        });
    }

    pub fn set_participants(&self, participants: &[ParticipantInfo]) {
        self.update(|r| {
            r.participants = participants
                .iter()
                .map(|p| (p.id.clone(), p.name.clone()))
                .collect();
        });
    }

    pub fn snapshot(&self) -> ClientSnapshot {
        self.read(|r| ClientSnapshot {
            participant_id: r.participant_id.clone(),
            room: r.room.clone(),
            mode: r.mode,
            participants: r.participants.clone(),
            announced_tracks: r.announced_tracks.clone(),
            remote_tracks: r.remote_tracks.iter().map(|t| t.snapshot()).collect(),
            local_tracks: r
                .local_tracks
                .iter()
                .map(|(id, kind, s)| {
                    let last = s.last_seq.load(Ordering::Relaxed);
                    LocalTrackSnapshot {
                        track_id: id.clone(),
                        kind: *kind,
                        sent_packets: s.sent_packets.load(Ordering::Relaxed),
                        sent_bytes: s.sent_bytes.load(Ordering::Relaxed),
                        last_seq: (last != NONE).then_some(last),
                        frames: s.frames.load(Ordering::Relaxed),
                        write_errors: s.write_errors.load(Ordering::Relaxed),
                        pli: s.pli.load(Ordering::Relaxed),
                        fir: s.fir.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            chat: r.chat.iter().cloned().collect(),
            errors: r.errors.clone(),
            events: r.events.iter().cloned().collect(),
            unparsed_frames: r.unparsed_frames,
            links: r.links.values().cloned().collect(),
            left: r.left,
            socket_closed: r.socket_closed,
            close_code: r.close_code,
        })
    }
}
