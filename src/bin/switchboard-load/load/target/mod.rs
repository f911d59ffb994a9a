//! The servers the generator measures, and how it speaks to each: Switchboard's own WebSocket
//! protocol (webrtc-rs publishers, lite receivers), WHIP and WHEP (any server that speaks both),
//! and Janus VideoRoom over its HTTP API. Outside Switchboard's protocol the publishers are
//! lite publishers (`lite::publisher`) and the receivers lite receivers: the same media, payloads and
//! accounting whatever the server.

pub mod janus;
pub mod whip;

use crate::load::lite::Hangup;
use crate::load::lite::publisher::Publisher;

/// Which protocol the server speaks, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Switchboard's signaling WebSocket (`ws://…/ws`).
    Switchboard { ws_url: String },
    /// WHIP and WHEP endpoints; `{room}` in either is replaced by the room's name.
    Whip { whip_url: String, whep_url: String },
    /// Janus's HTTP API (`http://…/janus`), VideoRoom plugin.
    Janus { url: String },
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Switchboard { .. } => "switchboard",
            Target::Whip { .. } => "whip",
            Target::Janus { .. } => "janus",
        }
    }

    /// A URL of the server itself: its host and port locate the process (and, for
    /// Switchboard, its `/metrics`).
    pub fn server_url(&self) -> &str {
        match self {
            Target::Switchboard { ws_url } => ws_url,
            Target::Whip { whip_url, .. } => whip_url,
            Target::Janus { url } => url,
        }
    }

    /// Whether the server publishes Switchboard's `/metrics`.
    pub fn has_metrics(&self) -> bool {
        !matches!(self, Target::Janus { .. })
    }
}

/// `template` with `{room}` replaced by `room`.
pub fn room_url(template: &str, room: &str) -> String {
    template.replace("{room}", room)
}

/// A lite publisher and the session that negotiated it (WHIP, Janus).
pub struct ExternalPublisher {
    publisher: Publisher,
    hangup: Box<dyn Hangup>,
}

impl ExternalPublisher {
    pub fn new(publisher: Publisher, hangup: Box<dyn Hangup>) -> Self {
        ExternalPublisher { publisher, hangup }
    }

    pub fn connected(&self) -> bool {
        self.publisher.connected()
    }

    pub fn sent(&self) -> (u64, u64) {
        (self.publisher.sent_packets(), self.publisher.sent_bytes())
    }

    /// Hangs up at the server, then closes the connection.
    pub async fn close(self) {
        self.hangup.hangup().await;
        self.publisher.close().await;
    }
}

/// The HTTP client the WHIP and Janus targets share (loopback only, so plain HTTP).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(40))
        .pool_max_idle_per_host(64)
        .build()?)
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn room_urls() {
        assert_eq!(
            room_url("http://127.0.0.1:8080/whip/{room}", "r1"),
            "http://127.0.0.1:8080/whip/r1"
        );
        assert_eq!(room_url("http://x/whep", "r1"), "http://x/whep");
    }
}

#[cfg(test)]
mod whip_tests;
