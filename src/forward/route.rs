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
}

/// Where a published track enters the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackRoute {
    pub key: TrackKey,
    /// Index of the media worker the publisher lives on.
    pub worker: usize,
}
