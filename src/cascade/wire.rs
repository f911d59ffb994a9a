//! What nodes say to each other when rooms are cascaded: room state and chat on the Redis
//! channel, control frames and media datagrams on the node link.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::forward::{LayerView, MediaPacket, Vp8Ids};
use crate::room::RemoteTrack;
use crate::signal::protocol::ParticipantInfo;

/// The Redis channel every node of a cascading cluster publishes its rooms' state on.
pub const CHANNEL: &str = "switchboard:cascade";

/// A message on [`CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusMessage {
    /// The node that sends it.
    pub node: String,
    pub room: String,
    #[serde(flatten)]
    pub body: BusBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BusBody {
    /// Everything the node holds of the room (nothing: it left the room). Sent on every change
    /// and every heartbeat: a node not heard of for a TTL holds nothing.
    State {
        /// Where its node link listens, and the SHA-256 of its certificate (hex).
        link: String,
        cert: String,
        members: Vec<ParticipantInfo>,
        tracks: Vec<RemoteTrack>,
    },
    /// The node opened the room: the others send their state now.
    Hello,
    /// A chat line (the JSON the data channel carries) from one of the node's members.
    Chat { line: String },
}

/// A control frame on the node link (JSON, length-prefixed, on the stream the subscribing
/// node opens). `key` and `worker` name a track as its publisher's node does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Control {
    /// First frame of a link: who dials.
    Hello {
        node: String,
    },
    /// The dialing node has subscribers of the track now / no longer.
    Attach {
        key: u64,
        worker: usize,
    },
    Detach {
        key: u64,
        worker: usize,
    },
    /// Its subscribers wait for keyframes of these layers (bit i: layer i).
    Keyframe {
        key: u64,
        worker: usize,
        layers: u32,
    },
    /// The layers its subscribers receive.
    Wants {
        key: u64,
        worker: usize,
        layers: u32,
    },
    /// These packets of one layer never arrived: send them again.
    Nack {
        key: u64,
        layer: u8,
        seqs: Vec<u64>,
    },
    /// From the publisher's node: the track's layers as the publisher sends them.
    Views {
        key: u64,
        views: Vec<LayerView>,
    },
    /// From the publisher's node: no such track (any more).
    Gone {
        key: u64,
    },
}

/// Largest control frame accepted.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// A media datagram's header: key 8, sequence number 8, timestamp 4, flags 1, layer 1,
/// VP8 picture id 2, TL0PICIDX 1.
const HEADER: usize = 25;
const MARKER: u8 = 1;
const RED: u8 = 2;
const KEYFRAME: u8 = 4;
const PICTURE_ID: u8 = 8;
const TL0: u8 = 16;

/// One relayed packet as a datagram. Encoded once per packet, whatever the number of nodes.
pub fn encode_packet(key: u64, p: &MediaPacket) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + p.payload.len());
    b.put_u64(key);
    b.put_u64(p.seq);
    b.put_u32(p.timestamp);
    let vp8 = p.vp8.unwrap_or_default();
    let flag = |on: bool, bit: u8| if on { bit } else { 0 };
    let flags = flag(p.marker, MARKER)
        | flag(p.red, RED)
        | flag(p.keyframe, KEYFRAME)
        | flag(vp8.picture_id.is_some(), PICTURE_ID)
        | flag(vp8.tl0_pic_idx.is_some(), TL0);
    b.put_u8(flags);
    b.put_u8(p.layer);
    b.put_u16(vp8.picture_id.unwrap_or(0));
    b.put_u8(vp8.tl0_pic_idx.unwrap_or(0));
    b.put_slice(&p.payload);
    b.freeze()
}

/// A datagram back into the key it names and the packet; None if it is too short.
pub fn decode_packet(mut b: &[u8], now: Instant) -> Option<(u64, MediaPacket)> {
    if b.len() < HEADER {
        return None;
    }
    let key = b.get_u64();
    let seq = b.get_u64();
    let timestamp = b.get_u32();
    let flags = b.get_u8();
    let layer = b.get_u8();
    let picture_id = b.get_u16();
    let tl0 = b.get_u8();
    let mut packet = MediaPacket::received(
        seq,
        timestamp,
        flags & MARKER != 0,
        layer,
        Arc::from(b),
        now,
    );
    packet.red = flags & RED != 0;
    packet.keyframe = flags & KEYFRAME != 0;
    if flags & (PICTURE_ID | TL0) != 0 {
        packet.vp8 = Some(Vp8Ids {
            picture_id: (flags & PICTURE_ID != 0).then_some(picture_id),
            tl0_pic_idx: (flags & TL0 != 0).then_some(tl0),
        });
    }
    Some((key, packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_survives_the_datagram() {
        let now = Instant::now();
        let mut p = MediaPacket::received(70_000, 9, true, 2, Arc::from(&b"payload"[..]), now);
        p.keyframe = true;
        p.vp8 = Some(Vp8Ids {
            picture_id: Some(0x7abc),
            tl0_pic_idx: None,
        });
        let bytes = encode_packet(42, &p);
        let (key, back) = decode_packet(&bytes, now).unwrap();
        assert_eq!(key, 42);
        assert_eq!(
            (
                back.seq,
                back.timestamp,
                back.marker,
                back.layer,
                back.red,
                back.keyframe
            ),
            (70_000, 9, true, 2, false, true)
        );
        assert_eq!(back.vp8, p.vp8);
        assert_eq!(&*back.payload, b"payload");
        assert!(decode_packet(&bytes[..HEADER - 1], now).is_none());
    }

    #[test]
    fn bus_messages_read_back() {
        let m = BusMessage {
            node: "a".into(),
            room: "r".into(),
            body: BusBody::Chat { line: "{}".into() },
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<BusMessage>(&text).unwrap(), m);
        assert!(
            serde_json::from_str::<BusMessage>(r#"{"node":"a","room":"r","kind":"x"}"#).is_err()
        );
    }
}
