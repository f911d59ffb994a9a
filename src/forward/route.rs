//! How a published track is found on the packet path: a small numeric key (cheap to hash per
//! packet) and the media worker that receives it from its publisher.

use std::sync::atomic::{AtomicU64, Ordering};

/// A published track's key on the packet path. Unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackKey(u64);

impl TrackKey {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TrackKey(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The key as a number, for another node of the cluster to name the track by.
    pub fn to_raw(self) -> u64 {
        self.0
    }

    /// A key this process handed out, named back by another node (look it up before use: the
    /// number may name nothing).
    pub fn from_raw(raw: u64) -> Self {
        TrackKey(raw)
    }
}

/// Where a published track enters the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackRoute {
    pub key: TrackKey,
    /// Index of the media worker the publisher lives on.
    pub worker: usize,
}
