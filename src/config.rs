//! Server configuration: command-line flags, each with an environment-variable twin, and the
//! documented limits. Nothing here touches sockets.

use std::net::{IpAddr, SocketAddr};

use clap::Parser;

/// Bounds on what clients may use. Every bound has a metric or an error code that shows it
/// being hit. A value of 0 means "no limit" only where the field says so.
#[derive(Debug, Clone, Parser)]
pub struct Limits {
    /// Largest signaling message accepted, in bytes; a bigger one closes the socket (1009).
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Participants per room (0 = no limit).
    #[arg(long, env = "SWITCHBOARD_MAX_PARTICIPANTS", default_value_t = 100)]
    pub max_participants_per_room: usize,
    /// Rooms on this server (0 = no limit).
    #[arg(long, env = "SWITCHBOARD_MAX_ROOMS", default_value_t = 1000)]
    pub max_rooms: usize,
    /// Tracks one participant may publish; more are not forwarded.
    #[arg(long, env = "SWITCHBOARD_MAX_TRACKS", default_value_t = 8)]
    pub max_tracks_per_participant: usize,
    /// Admission control: a join to an SFU room is refused with `server-full` when even the
    /// least busy media worker was busy more than this share of the last second, in percent.
    /// 0: no limit.
    #[arg(long, env = "SWITCHBOARD_MAX_WORKER_LOAD", default_value_t = 85.0)]
    pub max_worker_load_percent: f64,
    /// An optional fixed cap on top: joins to SFU rooms are refused while the server forwards
    /// more packets per second than this. Unset or 0: no cap.
    #[arg(long, env = "SWITCHBOARD_MAX_FORWARD_PPS")]
    pub max_forward_pps: Option<u64>,
    /// Seconds a client may take to answer the server's offer before its session is ended.
    #[arg(long, env = "SWITCHBOARD_ANSWER_TIMEOUT_SECS", default_value_t = 15)]
    pub answer_timeout_secs: u64,
    /// How long a participant whose signaling socket dropped (without `leave` or a close frame)
    /// stays in its room, media flowing, waiting for its client to `resume` on a new socket
    /// (protocol 3 clients). 0: removed at once.
    #[arg(long, env = "SWITCHBOARD_RESUME_GRACE_SECS", default_value_t = 20)]
    pub resume_grace_secs: u64,
    /// Largest chat message relayed, in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_CHAT_BYTES", default_value_t = 4096)]
    pub max_chat_bytes: usize,
}

impl Limits {
    /// The fixed forwarding-rate cap in force (`None`: no cap).
    pub fn forward_pps_limit(&self) -> Option<u64> {
        self.max_forward_pps.filter(|limit| *limit > 0)
    }

    /// The worker load limit in per mille (0: none).
    pub fn worker_load_permille(&self) -> u32 {
        (self.max_worker_load_percent * 10.0).clamp(0.0, 1000.0) as u32
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::parse_from(["limits"])
    }
}

/// Switchboard: a selective forwarding unit for group video calls.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Config {
    /// Address for HTTP (browser client) and the signaling WebSocket.
    #[arg(long, env = "SWITCHBOARD_HTTP", default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// First UDP port for WebRTC media: media worker k serves all its participants on port
    /// UDP_PORT + k. 0: ephemeral ports (tests).
    #[arg(long, env = "SWITCHBOARD_UDP_PORT", default_value_t = 7882)]
    pub udp_port: u16,
    /// Media worker threads, each with its own UDP socket. Default: one per CPU core.
    #[arg(long, env = "SWITCHBOARD_WORKERS")]
    pub workers: Option<usize>,
    /// Address announced in ICE candidates. A loopback address also binds media to loopback;
    /// otherwise media binds every interface and this address replaces theirs (1:1 NAT).
    #[arg(long, env = "SWITCHBOARD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// Log filter, e.g. `info` or `switchboard=debug,webrtc=warn`.
    #[arg(long, env = "SWITCHBOARD_LOG", default_value = "info")]
    pub log: String,
    /// SO_RCVBUF / SO_SNDBUF asked for on media sockets, in bytes.
    #[arg(long, env = "SWITCHBOARD_SOCKET_BUFFER", default_value_t = 4 * 1024 * 1024)]
    pub socket_buffer_bytes: usize,
    /// Bandwidth estimation: the downlink estimate in kbit/s a subscriber starts with, before
    /// transport-wide congestion control (TWCC) feedback refines it. A client that offers no
    /// TWCC gets no estimate (and no pacer). 0: off for everyone, and every subscriber gets the
    /// layers its tiles ask for.
    #[arg(long, env = "SWITCHBOARD_START_BITRATE_KBPS", default_value_t = 1000)]
    pub start_bitrate_kbps: u64,
    /// The embedded TURN server's port, UDP and TCP, on the HTTP listen address (0: an
    /// ephemeral port). Clients that cannot send UDP to the media ports relay through it over
    /// TCP, and mesh peers behind NATs over either.
    #[arg(long, env = "SWITCHBOARD_TURN_PORT", default_value_t = 3478)]
    pub turn_port: u16,
    /// Runs no embedded TURN server (clients get only `--turn-urls`, if any).
    #[arg(long, env = "SWITCHBOARD_NO_TURN")]
    pub no_turn: bool,
    /// External TURN or STUN URLs handed to clients besides the embedded server's (e.g. a
    /// coturn with `use-auth-secret` and the same `--turn-secret`); comma-separated.
    #[arg(long, env = "SWITCHBOARD_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,
    /// The secret TURN credentials are derived from (TURN REST API scheme). Unset: a random
    /// one per start, which only the embedded server knows.
    #[arg(long, env = "SWITCHBOARD_TURN_SECRET")]
    pub turn_secret: Option<String>,
    /// How long the TURN credentials given at join (and at each resume) stay valid.
    #[arg(long, env = "SWITCHBOARD_TURN_TTL_SECS", default_value_t = 3600)]
    pub turn_ttl_secs: u64,
    /// TURN over TLS (`turns:`): a PEM certificate chain, with `--turn-tls-key`. Clients behind
    /// firewalls that let only HTTPS out reach the TURN server on `--turn-tls-port`.
    #[arg(long, env = "SWITCHBOARD_TURN_TLS_CERT", requires = "turn_tls_key")]
    pub turn_tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--turn-tls-cert`.
    #[arg(long, env = "SWITCHBOARD_TURN_TLS_KEY", requires = "turn_tls_cert")]
    pub turn_tls_key: Option<std::path::PathBuf>,
    /// TURN over TLS port (0: ephemeral, for tests).
    #[arg(long, env = "SWITCHBOARD_TURN_TLS_PORT", default_value_t = 443)]
    pub turn_tls_port: u16,
    /// The name in the `turns:` URL, which the certificate must be for. Unset: the announced
    /// address.
    #[arg(long, env = "SWITCHBOARD_TURN_TLS_HOST")]
    pub turn_tls_host: Option<String>,
    /// Lets the embedded TURN server relay to loopback and private addresses too (tests, LANs).
    /// Off, relays reach public addresses and this server's media ports only.
    #[arg(long, env = "SWITCHBOARD_TURN_ALLOW_PRIVATE")]
    pub turn_allow_private: bool,
    #[command(flatten)]
    pub limits: Limits,
}

impl Config {
    /// The number of media workers in force.
    pub fn media_workers(&self) -> usize {
        self.workers
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Loopback everything, ephemeral ports: what in-process tests and benches use.
    pub fn for_tests() -> Self {
        let mut config = Config::parse_from(["switchboard"]);
        config.http = SocketAddr::from(([127, 0, 0, 1], 0));
        config.udp_port = 0;
        config.no_turn = true;
        config.public_ip = Some(IpAddr::from([127, 0, 0, 1]));
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = Config::parse_from(["switchboard"]);
        assert_eq!(config.http.port(), 8080);
        assert_eq!(config.limits.max_message_bytes, 65536);
        assert_eq!(config.udp_port, 7882);
        let config = Config::parse_from(["switchboard", "--udp-port", "40000", "--workers", "3"]);
        assert_eq!((config.udp_port, config.media_workers()), (40000, 3));
    }
}
