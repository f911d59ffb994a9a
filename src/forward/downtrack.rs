//! One published track as one subscriber receives it: its rewrite state, and whether it still
//! waits for the keyframe it must start with.

use super::{MediaPacket, Rewriter, rewrite::Rewritten};

#[derive(Debug)]
pub struct DownTrack<K> {
    subscriber: K,
    rewriter: Rewriter,
    /// Video only: nothing is sent before the first packet of a keyframe.
    awaiting_keyframe: bool,
}

impl<K: Copy + Eq> DownTrack<K> {
    /// A downtrack for `subscriber` (the engine's key for the subscriber's track).
    pub fn new(subscriber: K, rewriter: Rewriter, starts_on_keyframe: bool) -> Self {
        DownTrack {
            subscriber,
            rewriter,
            awaiting_keyframe: starts_on_keyframe,
        }
    }

    pub fn subscriber(&self) -> K {
        self.subscriber
    }

    /// The packet's header for this subscriber, or None while it still waits for a keyframe.
    pub fn rewrite(&mut self, packet: &MediaPacket) -> Option<Rewritten> {
        if self.awaiting_keyframe {
            if !packet.keyframe {
                return None;
            }
            self.awaiting_keyframe = false;
        }
        Some(self.rewriter.rewrite(packet))
    }
}
