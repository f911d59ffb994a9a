//! Engine-independent media routing.
//!
//! Owns: which subscriber gets which packet of a published track ([`TrackForwarder`]), the
//! per-subscriber header rewrite ([`Rewriter`]: SSRC, payload type, sequence number, timestamp),
//! keyframe-request throttling ([`KeyframeThrottle`]) and the drop policy (each subscriber has a
//! bounded queue; a full queue drops the packet and counts it).
//!
//! Must not: know about webrtc-rs, sockets or signaling. The media engine hands packets in as
//! [`MediaPacket`] and drains each [`DownTrack`]'s queue; the forwarding logic would survive a
//! swap of the engine unchanged. Time is passed in, never read here.

mod downtrack;
mod forwarder;
mod keyframe;
mod packet;
mod rewrite;

pub use downtrack::{DownTrack, PushOutcome};
pub use forwarder::{ForwardOutcome, ForwarderCommand, TrackForwarder};
pub use keyframe::KeyframeThrottle;
pub use packet::MediaPacket;
pub use rewrite::Rewriter;

/// The receiving end of a downtrack's queue, drained by the media engine.
pub type DownTrackReceiver = tokio::sync::mpsc::Receiver<MediaPacket>;
