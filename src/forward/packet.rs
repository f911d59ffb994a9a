//! Our own RTP packet: the header fields forwarding touches, and the payload shared by reference.

use bytes::Bytes;

/// One RTP packet on its way through the forwarder. Cloning shares the payload (`Bytes` is
/// reference-counted); only the few header fields differ per subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload: Bytes,
}
