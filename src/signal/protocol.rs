//! The signaling wire protocol: JSON text frames over one WebSocket per participant.
//!
//! Every message is an object with a `"type"` field. This file owns the shapes only; what a
//! message causes is `session.rs`'s business. The README's "Signaling protocol" section is the
//! prose version of this file; keep them in step.

use serde::{Deserialize, Serialize};

/// Version of the protocol, sent in `joined` so a client can tell what it talks to. A client
/// says in `join` which version it speaks; messages added since are sent only to clients that
/// speak them (version 2: simulcast layers, `track-settings`, `subscription-state`,
/// `publisher-layers`, `active-speakers`; version 3: session resume, `resume`/`resumed`, and
/// mute state: `set-muted`, `participant-updated`).
pub const PROTOCOL_VERSION: u32 = 3;

/// How a room carries media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoomMode {
    /// The server terminates every peer connection and forwards media (the SFU).
    #[default]
    Sfu,
    /// The server relays signaling between participants only; media flows peer to peer.
    Mesh,
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub id: String,
    pub name: String,
    /// Its microphone is muted (protocol 3; absent: not muted).
    #[serde(default, skip_serializing_if = "is_false")]
    pub audio_muted: bool,
    /// Its camera is off (protocol 3; absent: on).
    #[serde(default, skip_serializing_if = "is_false")]
    pub video_muted: bool,
    /// It only watches and never publishes (a WHEP player; absent: false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub viewer: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

pub use crate::types::{IceCandidate, MediaKind};

/// An ICE server for the client's peer connections (`RTCIceServer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A track some participant publishes, as announced to the others (SFU rooms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub track_id: String,
    pub participant_id: String,
    /// The `MediaStream` id the subscriber sees this track in (`{participant_id}-{n}`).
    pub stream_id: String,
    pub kind: MediaKind,
    /// e.g. `video/VP8`.
    pub codec: String,
    /// Simulcast layers by rid, lowest resolution first; absent for a track sent as one
    /// stream (protocol 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// Enter a room. `mode` matters only to the participant who creates the room.
    Join {
        room: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<RoomMode>,
        /// The protocol version the client speaks (absent: 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
        /// An access token (JWT) from the application; required unless the server runs in
        /// development mode (no API keys).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// SDP offer. In SFU rooms to the server (omit `to`); in mesh rooms to participant `to`.
    Offer {
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// SDP answer, addressed like `offer`.
    Answer {
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// Trickle ICE candidate, addressed like `offer`. `null` means end of candidates.
    Candidate {
        candidate: Option<IceCandidate>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// How this participant shows a track it receives (SFU rooms, protocol 2): the size of
    /// its tile in device pixels, or not at all. The server forwards the smallest simulcast
    /// layer that covers the tile, and nothing while it is hidden. Without a report: the
    /// largest layer the downlink allows.
    TrackSettings {
        track_id: String,
        #[serde(default = "yes")]
        visible: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<u32>,
    },
    /// Instead of `join`, on a new socket (protocol 3): take over the session that `token` (from
    /// `joined` or the last `resumed`) belongs to, after its socket dropped. Answered by `resumed`,
    /// or by a `resume-failed` error (then `join` anew).
    Resume { token: String },
    /// This participant's microphone (`audio`) or camera (`video`) is muted or unmuted
    /// (protocol 3): the others are told (`participant-updated`), so that a muted participant and
    /// a stalled connection look different.
    SetMuted { kind: MediaKind, muted: bool },
    /// Leave the room; the server answers `left` and keeps the socket open for another `join`.
    Leave,
    /// Liveness check; answered by `pong`.
    Ping,
}

impl ClientMessage {
    /// The wire names of all client message types, for telling "unknown type" from "bad fields".
    pub const TYPES: &'static [&'static str] = &[
        "join",
        "offer",
        "answer",
        "candidate",
        "track-settings",
        "resume",
        "set-muted",
        "leave",
        "ping",
    ];
}

fn yes() -> bool {
    true
}

/// Why a track you receive is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseReason {
    /// Your downlink has no room for its lowest layer; it resumes when it has.
    Bandwidth,
    /// You reported it hidden (`track-settings` with `visible: false`).
    Hidden,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    /// Answer to `join`: who you are and who is already there (not including you).
    Joined {
        participant_id: String,
        room: String,
        mode: RoomMode,
        participants: Vec<ParticipantInfo>,
        /// Tracks already published in the room (SFU rooms).
        tracks: Vec<TrackInfo>,
        protocol: u32,
        /// Presented in `resume` on a new socket if this one drops (protocol 3; absent when the
        /// server keeps no session for a dropped socket).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
        /// ICE servers for the client's peer connections, with credentials for this participant
        /// (protocol 3).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<IceServer>,
    },
    /// Answer to `resume`: the session goes on on this socket. What the room holds now (messages
    /// sent while the socket was down may be lost: reconcile with these lists); the server's
    /// outstanding offer, `publisher-layers`, `subscription-state` and `active-speakers` follow.
    /// The token for the next resume replaces the old one.
    Resumed {
        participant_id: String,
        room: String,
        mode: RoomMode,
        participants: Vec<ParticipantInfo>,
        tracks: Vec<TrackInfo>,
        resume_token: String,
        /// Fresh ICE server credentials.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<IceServer>,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        participant_id: String,
    },
    /// A participant's state changed: its microphone or camera muted or unmuted (protocol 3).
    ParticipantUpdated {
        participant: ParticipantInfo,
    },
    /// A track was published; the server will offer it to you shortly (SFU rooms).
    TrackPublished {
        track: TrackInfo,
    },
    /// A track was unpublished; the server will renegotiate it away (SFU rooms).
    TrackUnpublished {
        track_id: String,
        participant_id: String,
    },
    /// SDP offer: from the server (no `from`) or relayed from participant `from` (mesh).
    Offer {
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    Answer {
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    Candidate {
        candidate: Option<IceCandidate>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// What you receive of a track changed (SFU rooms, protocol 2): the simulcast layer
    /// forwarded (its rid; absent for a track sent as one stream or while paused), or why it
    /// is paused.
    SubscriptionState {
        track_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paused: Option<PauseReason>,
    },
    /// To a publisher (SFU rooms, protocol 2): the simulcast layers of its track (by the
    /// transceiver's `mid`) that some subscriber receives. Encode only these (dynacast:
    /// `RTCRtpEncodingParameters.active`); the others are off until named again.
    PublisherLayers {
        track_id: String,
        mid: String,
        active: Vec<String>,
    },
    /// Who speaks in the room now, loudest first (SFU rooms, protocol 2): at most three
    /// participant ids, sent when the list changes; empty when nobody speaks. Their videos get
    /// priority in each subscriber's downlink.
    ActiveSpeakers {
        participants: Vec<String>,
    },
    /// The server is shutting down (protocol 3): the call goes on for `deadline_secs`, then
    /// the socket closes. A client should join again then (through a load balancer, another
    /// server takes it).
    ServerDraining {
        deadline_secs: u64,
    },
    /// To a publisher (protocol 3): an administrator muted (or unmuted) one of its tracks.
    /// The server drops that track's packets until an administrator unmutes it; a client
    /// should show it muted (and may stop sending it).
    Muted {
        track_id: String,
        kind: MediaKind,
        muted: bool,
    },
    /// Answer to `join` in a cluster (`--redis-url`): the room is hosted by another node. Open a
    /// socket to `url` (that node's signaling WebSocket) and send the same `join` there; this
    /// socket stays open for another `join` until closed.
    Redirect {
        url: String,
        node: String,
        room: String,
    },
    /// Answer to `leave`.
    Left,
    Pong,
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Machine-readable error codes of `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The frame was not valid JSON (or not a JSON object, or a binary frame).
    MalformedJson,
    /// `type` names no message of this protocol.
    UnknownType,
    /// A required field is missing or has the wrong type.
    MissingField,
    /// A room or participant message was sent before `join`.
    NotJoined,
    /// `join` while already in a room.
    AlreadyJoined,
    /// Room name or display name is empty, too long, or uses characters outside the allowed set.
    InvalidName,
    /// The room holds its maximum number of participants.
    RoomFull,
    /// The server holds its maximum number of rooms or media ports.
    ServerFull,
    /// The SDP could not be parsed or applied.
    BadSdp,
    /// The ICE candidate could not be parsed or applied.
    BadCandidate,
    /// `to` names no participant of this room.
    UnknownParticipant,
    /// `track_id` names no track this participant receives.
    UnknownTrack,
    /// The message does not fit the room's mode (e.g. `to` in an SFU room, no `to` in mesh).
    WrongMode,
    /// The server could not carry out the request (logged server-side).
    Internal,
    /// The participant's media connection failed; the session ends.
    ConnectionFailed,
    /// The client did not answer the server's offer in time; the session ends.
    NegotiationTimeout,
    /// `resume` named no session waiting for its socket (unknown token, or its grace period
    /// ended): `join` anew.
    ResumeFailed,
    /// `join` without a valid access token for this room (missing, expired, forged, or for
    /// another room).
    Unauthorized,
    /// The participant's token does not allow this (publishing, or a mesh room with a
    /// restricted token).
    NotAllowed,
    /// An administrator removed the participant, or closed the room; the session ends.
    Removed,
    /// `join` while the server is shutting down: try again shortly (another server).
    ServerDraining,
}

/// The chat message the server puts on each other participant's `chat` data channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRelay {
    pub from: String,
    pub name: String,
    pub text: String,
}

/// A client message that could not be turned into a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one text frame, telling malformed JSON, unknown types and bad fields apart.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ParseError {
        code: ErrorCode::MalformedJson,
        message: format!("not valid JSON: {e}"),
    })?;
    let Some(object) = value.as_object() else {
        return Err(ParseError {
            code: ErrorCode::MalformedJson,
            message: "a message must be a JSON object".into(),
        });
    };
    let kind = match object.get("type") {
        Some(serde_json::Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Err(ParseError {
                code: ErrorCode::MissingField,
                message: "field `type` must be a string".into(),
            });
        }
        None => {
            return Err(ParseError {
                code: ErrorCode::MissingField,
                message: "missing field `type`".into(),
            });
        }
    };
    if !ClientMessage::TYPES.contains(&kind) {
        return Err(ParseError {
            code: ErrorCode::UnknownType,
            message: format!("unknown message type `{kind}`"),
        });
    }
    serde_json::from_value(value.clone()).map_err(|e| ParseError {
        code: ErrorCode::MissingField,
        message: format!("bad `{kind}` message: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_join() {
        let msg = parse_client_message(r#"{"type":"join","room":"a","name":"b"}"#).unwrap();
        assert_eq!(
            msg,
            ClientMessage::Join {
                room: "a".into(),
                name: "b".into(),
                mode: None,
                protocol: None,
                token: None,
            }
        );
        let msg =
            parse_client_message(r#"{"type":"join","room":"a","name":"b","mode":"mesh"}"#).unwrap();
        assert!(matches!(
            msg,
            ClientMessage::Join {
                mode: Some(RoomMode::Mesh),
                ..
            }
        ));
    }

    #[test]
    fn tells_errors_apart() {
        let code = |t: &str| parse_client_message(t).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::MalformedJson);
        assert_eq!(code("[1,2]"), ErrorCode::MalformedJson);
        assert_eq!(code(r#"{"room":"a"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"join","room":"a"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(code(r#"{"type":"offer"}"#), ErrorCode::MissingField);
    }

    #[test]
    fn track_settings_default_to_visible_at_no_particular_size() {
        let msg = parse_client_message(r#"{"type":"track-settings","track_id":"t1"}"#).unwrap();
        assert_eq!(
            msg,
            ClientMessage::TrackSettings {
                track_id: "t1".into(),
                visible: true,
                width: None,
                height: None
            }
        );
        let text = r#"{"type":"track-settings","track_id":"t1","visible":false,"width":-3}"#;
        assert_eq!(
            parse_client_message(text).unwrap_err().code,
            ErrorCode::MissingField
        );
        let text = serde_json::to_string(&ServerMessage::SubscriptionState {
            track_id: "t1".into(),
            layer: None,
            paused: Some(PauseReason::Bandwidth),
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"type":"subscription-state","track_id":"t1","paused":"bandwidth"}"#
        );
    }

    #[test]
    fn candidate_round_trip_uses_browser_field_names() {
        let text = r#"{"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#;
        let msg = parse_client_message(text).unwrap();
        let ClientMessage::Candidate {
            candidate: Some(c), ..
        } = msg
        else {
            panic!("not a candidate: {msg:?}");
        };
        assert_eq!(c.sdp_mid.as_deref(), Some("0"));
        assert_eq!(c.sdp_mline_index, Some(0));
        let null = parse_client_message(r#"{"type":"candidate","candidate":null}"#).unwrap();
        assert_eq!(
            null,
            ClientMessage::Candidate {
                candidate: None,
                to: None
            }
        );
    }

    #[test]
    fn server_messages_are_kebab_case() {
        let text = serde_json::to_string(&ServerMessage::ParticipantLeft {
            participant_id: "p1".into(),
        })
        .unwrap();
        assert_eq!(text, r#"{"type":"participant-left","participant_id":"p1"}"#);
        let text = serde_json::to_string(&ServerMessage::Error {
            code: ErrorCode::NotJoined,
            message: "x".into(),
        })
        .unwrap();
        assert!(text.contains(r#""code":"not-joined""#));
    }
}
