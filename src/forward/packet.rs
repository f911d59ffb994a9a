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
    /// The payload starts a keyframe (filled in by the publisher's forwarder from the codec).
    pub keyframe: bool,
    pub payload: Arc<[u8]>,
    /// When the datagram carrying it reached the server, to measure time spent inside.
    pub received_at: Instant,
}
