//! The vocabulary every layer shares: newtypes for the ids the server hands out (so a participant
//! id cannot be passed as a track id), media kinds, room names and ICE candidates.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// A fresh random id: the prefix and 12 hex digits (no `-`, which separates
            /// the participant id from the stream index in forwarded stream ids).
            pub fn random() -> Self {
                let n: u64 = rand::random();
                Self(format!(concat!($prefix, "{:012x}"), n & 0xffff_ffff_ffff).into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(ParticipantId, "p");
id_type!(TrackId, "t");

/// Media kind of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

/// The codec a publisher sends, as subscribers' tracks must declare it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TrackCodec {
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: u16,
    pub sdp_fmtp_line: String,
}

/// An ICE candidate as the browser's `RTCIceCandidate.toJSON()` gives it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

/// A validated room name: 1–64 characters of `[A-Za-z0-9_.-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        ok.then(|| Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `len` random characters of A-Z a-z 0-9 (ICE credentials, resume tokens).
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The wall-clock time since the Unix epoch (zero if the clock is set before it): for
/// timestamps other systems read (token expiries, TURN usernames, webhooks).
pub fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A token bucket: `per_second` units (messages, bytes) a second on average, up to `burst` at
/// once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `per_second` 0: no limit.
    pub fn new(per_second: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            per_second: per_second as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `cost` units if there are that many; false (and nothing taken) if not.
    pub fn take(&mut self, cost: u64, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        let cost = cost as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_bursts_then_the_average_rate() {
        use std::time::Duration;
        let t0 = Instant::now();
        let mut rate = TokenBucket::new(10, 5, t0);
        assert_eq!((0..7).filter(|_| rate.take(1, t0)).count(), 5, "the burst");
        // 10 a second: one more every 100 ms.
        assert!(rate.take(1, t0 + Duration::from_millis(100)));
        assert!(!rate.take(1, t0 + Duration::from_millis(150)));
        // A long quiet spell refills to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..7).filter(|_| rate.take(1, later)).count(), 5);
        // Costs: a 1200-byte datagram from a 1000-byte bucket is refused whole.
        let mut bytes = TokenBucket::new(1000, 1000, t0);
        assert!(!bytes.take(1200, t0));
        assert!(bytes.take(800, t0));
        let mut open = TokenBucket::new(0, 0, t0);
        assert!((0..1000).all(|_| open.take(1, t0)), "0: no limit");
    }

    #[test]
    fn ids_are_prefixed_and_dashless() {
        let p = ParticipantId::random();
        assert!(p.as_str().starts_with('p'));
        assert_eq!(p.as_str().len(), 13);
        assert!(!p.as_str().contains('-'));
        assert_ne!(p, ParticipantId::random());
    }

    #[test]
    fn room_names() {
        assert!(RoomName::parse("standup").is_some());
        assert!(RoomName::parse("team-a_2.0").is_some());
        assert!(RoomName::parse("").is_none());
        assert!(RoomName::parse("a/b").is_none());
        assert!(RoomName::parse(&"x".repeat(65)).is_none());
    }
}
