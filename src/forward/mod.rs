//! Engine-independent media routing: the packet path.
//!
//! Owns: which subscriber gets which packet of a published track ([`TrackForwarder`]), the
//! simulcast layer each subscriber gets and when it switches (`downtrack.rs`, on a keyframe),
//! which layer a subscriber should get ([`allocate`]: bandwidth estimate, tile size, what the
//! publisher sends), the per-subscriber header rewrite ([`Rewriter`]: payload type, sequence
//! number, timestamp, VP8 picture ids, spliced at every switch), keyframe recognition
//! ([`VideoFormat`]) so a subscriber starts and switches on a keyframe,
//! which layers nobody wants so the publisher can stop encoding them ([`Dynacast`]), who speaks
//! ([`SpeechMeter`], from the audio-level header extension),
//! keyframe-request throttling ([`KeyframeThrottle`]), padding removal (`padding.rs`), and how a track is found
//! on the packet path ([`TrackRoute`]).
//!
//! Must not: know about the media engine, sockets, threads or signaling. The media worker hands
//! packets in as [`MediaPacket`], gets [`Delivery`]s back and writes them to its connections;
//! the forwarding logic would survive a swap of the engine unchanged. Time is passed in, never
//! read here.

mod allocate;
mod codec;
mod downtrack;
mod dynacast;
mod forwarder;
mod keyframe;
mod layer;
mod packet;
mod padding;
mod rewrite;
mod route;
mod speaker;

pub use allocate::{Demand, LayerChoice, PauseCause, Priority, Visibility, allocate};
pub use codec::{VideoFormat, red_primary_offset};
use downtrack::DownTrack;
pub use dynacast::Dynacast;
pub use forwarder::{Delivery, TrackForwarder};
pub use keyframe::KeyframeThrottle;
pub use layer::LayerView;
pub use packet::{MediaPacket, Vp8Ids};
pub use rewrite::{Rewriter, Rewritten};
pub use route::{TrackKey, TrackRoute};
pub use speaker::SpeechMeter;
