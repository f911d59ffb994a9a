//! Server configuration: command-line flags, each with an environment-variable twin, and the
//! documented limits. Nothing here touches sockets.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use clap::Parser;

/// An inclusive UDP port range for WebRTC media; `0-0` means "any ephemeral port" (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const EPHEMERAL: PortRange = PortRange { lo: 0, hi: 0 };

    pub fn is_ephemeral(&self) -> bool {
        self.lo == 0
    }

    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("expected LO-HI, got `{s}`"))?;
        let lo: u16 = lo
            .trim()
            .parse()
            .map_err(|e| format!("bad low port: {e}"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .map_err(|e| format!("bad high port: {e}"))?;
        if lo > hi || (lo == 0) != (hi == 0) {
            return Err(format!("bad port range {lo}-{hi}"));
        }
        Ok(PortRange { lo, hi })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

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
    /// Packets queued per subscriber track before new ones are dropped.
    #[arg(long, env = "SWITCHBOARD_DOWNTRACK_QUEUE", default_value_t = 256)]
    pub downtrack_queue_packets: usize,
    /// Admission control: joins to SFU rooms are refused with `server-full` while the server
    /// forwards more than this many packets per second. Unset: 90,000 per CPU core, below
    /// the load where webrtc-rs's unbounded write queues start to grow (see README figures).
    /// 0: no limit.
    #[arg(long, env = "SWITCHBOARD_MAX_FORWARD_PPS")]
    pub max_forward_pps: Option<u64>,
    /// Seconds a client may take to answer the server's offer before its session is ended.
    #[arg(long, env = "SWITCHBOARD_ANSWER_TIMEOUT_SECS", default_value_t = 15)]
    pub answer_timeout_secs: u64,
    /// Largest chat message relayed, in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_CHAT_BYTES", default_value_t = 4096)]
    pub max_chat_bytes: usize,
}

impl Limits {
    /// Packets per second forwarded per core that the server admits joins up to by default.
    pub const DEFAULT_FORWARD_PPS_PER_CORE: u64 = 90_000;

    /// The admission limit in force (`None`: no limit).
    pub fn forward_pps_limit(&self) -> Option<u64> {
        match self.max_forward_pps {
            Some(0) => None,
            Some(limit) => Some(limit),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
                Some(Self::DEFAULT_FORWARD_PPS_PER_CORE * cores)
            }
        }
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
    /// UDP port range for WebRTC media, one port per participant (a firewall rule names it).
    #[arg(long, env = "SWITCHBOARD_UDP_PORTS", default_value = "50000-50999")]
    pub udp_ports: PortRange,
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
    #[command(flatten)]
    pub limits: Limits,
}

impl Config {
    /// Loopback everything, ephemeral ports: what in-process tests and benches use.
    pub fn for_tests() -> Self {
        let mut config = Config::parse_from(["switchboard"]);
        config.http = SocketAddr::from(([127, 0, 0, 1], 0));
        config.udp_ports = PortRange::EPHEMERAL;
        config.public_ip = Some(IpAddr::from([127, 0, 0, 1]));
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(
            "50000-50999".parse::<PortRange>().unwrap(),
            PortRange {
                lo: 50000,
                hi: 50999
            }
        );
        assert_eq!("50000-50999".parse::<PortRange>().unwrap().len(), 1000);
        assert!("5-1".parse::<PortRange>().is_err());
        assert!("0-5".parse::<PortRange>().is_err());
        assert!("x".parse::<PortRange>().is_err());
        assert!("0-0".parse::<PortRange>().unwrap().is_ephemeral());
    }

    #[test]
    fn defaults() {
        let config = Config::parse_from(["switchboard"]);
        assert_eq!(config.http.port(), 8080);
        assert_eq!(config.limits.max_message_bytes, 65536);
        let config = Config::parse_from(["switchboard", "--udp-ports", "40000-40010"]);
        assert_eq!(config.udp_ports.len(), 11);
    }
}
