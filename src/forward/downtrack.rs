//! One published track as one subscriber receives it: its rewrite state and its bounded queue.

use tokio::sync::mpsc::{self, error::TrySendError};

use super::{DownTrackReceiver, MediaPacket, Rewriter};
use crate::types::ParticipantId;

#[derive(Debug)]
pub struct DownTrack {
    subscriber: ParticipantId,
    rewriter: Rewriter,
    queue: mpsc::Sender<MediaPacket>,
}

/// What became of a packet pushed to a downtrack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    /// The subscriber is behind; this packet is lost to it (its NACK or PLI recovers).
    Dropped,
    /// The subscriber's writer is gone; the downtrack should be removed.
    Closed,
}

impl DownTrack {
    /// A downtrack and the receiving end of its queue, which the media engine drains.
    pub fn new(
        subscriber: ParticipantId,
        rewriter: Rewriter,
        queue_len: usize,
    ) -> (Self, DownTrackReceiver) {
        let (tx, rx) = mpsc::channel(queue_len.max(1));
        (
            DownTrack {
                subscriber,
                rewriter,
                queue: tx,
            },
            rx,
        )
    }

    pub fn subscriber(&self) -> &ParticipantId {
        &self.subscriber
    }

    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Rewrites and enqueues without waiting: a slow subscriber never stalls the publisher.
    pub fn push(&mut self, packet: &MediaPacket) -> PushOutcome {
        match self.queue.try_send(self.rewriter.rewrite(packet)) {
            Ok(()) => PushOutcome::Queued,
            Err(TrySendError::Full(_)) => PushOutcome::Dropped,
            Err(TrySendError::Closed(_)) => PushOutcome::Closed,
        }
    }
}
