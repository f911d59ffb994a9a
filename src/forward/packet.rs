//! Our own RTP packet: the header fields forwarding touches, and the payload shared by reference.

use std::sync::Arc;
use std::time::Instant;

/// One RTP packet on its way through the forwarder. Cloning shares the payload; only the few
/// header fields differ per subscriber, and those are computed per [`Delivery`](super::Delivery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    /// Extended sequence number (no wrap-around), as the publisher's connection received it.
    pub seq: u64,
    pub timestamp: u32,
    pub marker: bool,
    /// Simulcast layer (0 = lowest resolution); 0 for a track sent as one stream.
    pub layer: u8,
    /// The payload is RFC 2198 redundant audio (RED) wrapping the track's codec.
    pub red: bool,
    /// The payload starts a keyframe (filled in by the publisher's forwarder from the codec).
    pub keyframe: bool,
    /// VP8 picture numbering (filled in with `keyframe`), rewritten per subscriber so that a
    /// layer switch does not look like a jump to the decoder.
    pub vp8: Option<Vp8Ids>,
    pub payload: Arc<[u8]>,
    /// When the datagram carrying it reached the server, to measure time spent inside.
    pub received_at: Instant,
}

/// The VP8 payload descriptor's picture numbering (RFC 7741 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Ids {
    /// PictureID, 7 or 15 bits as the publisher sends it.
    pub picture_id: Option<u16>,
    /// TL0PICIDX: index of the last base-temporal-layer picture.
    pub tl0_pic_idx: Option<u8>,
}

impl MediaPacket {
    /// A packet as received, before the source forwarder looked at it.
    pub fn received(
        seq: u64,
        timestamp: u32,
        marker: bool,
        layer: u8,
        payload: Arc<[u8]>,
        received_at: Instant,
    ) -> Self {
        MediaPacket {
            seq,
            timestamp,
            marker,
            layer,
            red: false,
            keyframe: false,
            vp8: None,
            payload,
            received_at,
        }
    }
}
