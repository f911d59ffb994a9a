//! Server configuration: command-line flags, each with an environment-variable twin, an
//! optional TOML file (`--config`) under both, and the documented limits. Nothing here touches
//! sockets.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, Parser};

/// Bounds on what clients may use. Every bound has a metric or an error code that shows it
/// being hit. A value of 0 means "no limit" only where the field says so.
#[derive(Debug, Clone, Parser)]
pub struct Limits {
    /// Largest signaling message accepted, in bytes; a bigger one closes the socket (1009). The
    /// default holds a browser's answer in a full room (100 participants: about 75 KB) with
    /// room for the stopped m-lines a long call piles up.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
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
    /// On SIGTERM or SIGINT, how long calls in progress may go on (clients are told, new joins
    /// are refused, `/healthz` says 503) before every socket is closed.
    #[arg(long, env = "SWITCHBOARD_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// Largest chat message relayed, in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_CHAT_BYTES", default_value_t = 4096)]
    pub max_chat_bytes: usize,
    /// Seconds a signaling socket may stay open without joining a room (or after leaving one)
    /// before it is closed (1008). 0: no limit.
    #[arg(long, env = "SWITCHBOARD_JOIN_TIMEOUT_SECS", default_value_t = 10)]
    pub join_timeout_secs: u64,
    /// Seconds an SFU participant may take to connect its media (ICE and DTLS) after joining
    /// before it is removed and everything it holds is freed. 0: no limit.
    #[arg(long, env = "SWITCHBOARD_MEDIA_TIMEOUT_SECS", default_value_t = 30)]
    pub media_timeout_secs: u64,
    /// Signaling WebSockets open at once; more upgrades are refused (503). 0: no limit.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Signaling WebSockets open at once from one IP address; more are refused (429). Behind a
    /// reverse proxy every client has the proxy's address: raise it or set 0 (no limit).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP",
        default_value_t = 200
    )]
    pub max_connections_per_ip: usize,
    /// Messages a client may send per second on its signaling socket, on average; faster
    /// senders are closed (1008). 0: no limit.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGES_PER_SEC", default_value_t = 50)]
    pub max_messages_per_sec: u32,
    /// Messages a client may send at once above that average (ICE candidates come in bursts).
    #[arg(long, env = "SWITCHBOARD_MESSAGE_BURST", default_value_t = 200)]
    pub message_burst: u32,
    /// Messages waiting to be written to one client's socket; a client that lets this many
    /// pile up does not read, and its socket is cut (a protocol-3 session waits for a resume).
    #[arg(long, env = "SWITCHBOARD_SEND_QUEUE", default_value_t = 256)]
    pub send_queue_messages: usize,
    /// Seconds one write to a client's socket may block before the socket is cut.
    #[arg(long, env = "SWITCHBOARD_SEND_TIMEOUT_SECS", default_value_t = 10)]
    pub send_timeout_secs: u64,
    /// Room events (joins, leaves, tracks, mesh relays) waiting for one member's session; a
    /// member that falls this far behind is removed from its room.
    #[arg(long, env = "SWITCHBOARD_MEMBER_QUEUE", default_value_t = 1024)]
    pub member_queue: usize,
    /// Webhook events waiting for one receiver; more are dropped (and counted) while it is
    /// slow or down.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_QUEUE", default_value_t = 1024)]
    pub webhook_queue: usize,
    /// Web origins whose pages may open the signaling socket (the `Origin` header), e.g.
    /// `https://meet.example.com`; comma-separated. Unset: any origin.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
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
        defaults()
    }
}

/// A flag set's command with no environment variables.
fn defaults_command<T: CommandFactory>() -> clap::Command {
    T::command().mut_args(|arg| arg.env(None))
}

/// The built-in defaults of a flag set, whatever `SWITCHBOARD_*` variables the process has
/// (only the real command line reads them).
fn defaults<T: Parser>() -> T {
    let matches = defaults_command::<T>().get_matches_from(["switchboard"]);
    // The defaults are constants of this file: a failure is a bug in them.
    T::from_arg_matches(&matches).expect("the built-in defaults parse")
}

/// Switchboard: a selective forwarding unit for group video calls.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Config {
    /// A TOML file of settings: any flag below by its long name (`max-connections = 500`,
    /// `api-key = ["k1:..."]`), at the top or in tables such as `[limits]`. Flags and
    /// environment variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for HTTP (browser client) and the signaling WebSocket.
    #[arg(long, env = "SWITCHBOARD_HTTP", default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// Serves HTTPS and WSS on `--http` with this PEM certificate chain (leaf first), with
    /// `--tls-key`. Browsers only give the camera to secure pages (and localhost).
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serves HTTPS and WSS with a self-signed certificate made at start-up (for localhost,
    /// `--public-ip` and `--tls-name`), for a LAN test: browsers warn once, then the page may
    /// use the camera. Its SHA-256 fingerprint is printed at start-up.
    #[arg(long, env = "SWITCHBOARD_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// Host names the self-signed certificate is also for; comma-separated.
    #[arg(long, env = "SWITCHBOARD_TLS_NAME", value_delimiter = ',')]
    pub tls_name: Vec<String>,
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
    /// Relays the embedded TURN server holds open at once; more allocations are refused
    /// (0: no limit).
    #[arg(long, env = "SWITCHBOARD_TURN_MAX_ALLOCATIONS", default_value_t = 1000)]
    pub turn_max_allocations: usize,
    /// The rate, in kbit/s, at which one TURN relay may send to its peers; faster datagrams are
    /// dropped (0: no limit). A client relaying a whole call (simulcast up, RTCP) needs 2-3
    /// Mbit/s.
    #[arg(long, env = "SWITCHBOARD_TURN_RELAY_KBPS", default_value_t = 10_000)]
    pub turn_relay_kbps: u64,
    /// Lets the embedded TURN server relay to loopback and private addresses too (tests, LANs).
    /// Off, relays reach public addresses and this server's media ports only.
    #[arg(long, env = "SWITCHBOARD_TURN_ALLOW_PRIVATE")]
    pub turn_allow_private: bool,
    /// API keys access tokens are signed with, as KEY_ID:SECRET (secrets of 32 characters or
    /// more); comma-separated in the environment. Prefer the environment: flags show in `ps`.
    /// None: development mode, anyone may join any room.
    #[arg(
        long = "api-key",
        env = "SWITCHBOARD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// URLs that receive webhooks: JSON POSTs when rooms start and finish, participants join
    /// and leave, tracks are published and unpublished. Comma-separated in the environment.
    #[arg(
        long = "webhook-url",
        env = "SWITCHBOARD_WEBHOOK_URLS",
        value_delimiter = ',',
        requires = "webhook_secret"
    )]
    pub webhook_urls: Vec<String>,
    /// The secret webhooks are signed with (HMAC-SHA256, `Switchboard-Signature` header); 16
    /// characters or more.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Redis of the cluster (`redis://[:password@]host:6379[/db]`), shared by every node. Unset:
    /// a single node, nothing shared.
    #[arg(long, env = "SWITCHBOARD_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// This node's id in the cluster: 1-64 characters of A-Z a-z 0-9 _ . - (unset: a random id,
    /// new at each start).
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,
    /// This node's region: a new room is placed on the least-loaded node of the region of the
    /// node its first client reached.
    #[arg(long, env = "SWITCHBOARD_NODE_REGION", default_value = "default")]
    pub node_region: String,
    /// `host:port` where other nodes reach this one's HTTP listener. Unset: `--public-ip` (else
    /// the `--http` address) with the HTTP port.
    #[arg(long, env = "SWITCHBOARD_NODE_ADDRESS")]
    pub node_address: Option<String>,
    /// This node's base URL for clients (`https://sfu-2.example.com`): where a client is
    /// redirected to join a room this node hosts. Unset: `http(s)://` + `--node-address`.
    #[arg(long, env = "SWITCHBOARD_NODE_URL")]
    pub node_url: Option<String>,
    /// Seconds after its last heartbeat (sent every fifth of it) a node counts as dead: its
    /// rooms go to other nodes and its entries in Redis expire.
    #[arg(long, env = "SWITCHBOARD_NODE_TTL_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_ttl_secs: u64,
    /// What a node does with a join for a room another node hosts: `redirect` the client there,
    /// or `cascade` (serve it here, relaying media between the nodes that host the room).
    #[arg(long, env = "SWITCHBOARD_CLUSTER_POLICY", value_enum, default_value_t = ClusterPolicy::Redirect)]
    pub cluster_policy: ClusterPolicy,
    /// UDP port of the node link (QUIC, mutually authenticated TLS 1.3), which carries cascaded
    /// rooms' media between nodes. 0: an ephemeral port (tests).
    #[arg(long, env = "SWITCHBOARD_NODE_LINK_PORT", default_value_t = 7870)]
    pub node_link_port: u16,
    #[command(flatten)]
    pub limits: Limits,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Prints an access token for one participant of one room, signed with an API key
    /// (`--api-key` or `SWITCHBOARD_API_KEYS`).
    Token(TokenArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The room it admits to.
    #[arg(long)]
    pub room: String,
    /// Who the participant is in your application (the token's `sub`).
    #[arg(long)]
    pub identity: String,
    /// The display name the others see (default: what the client gives in `join`).
    #[arg(long)]
    pub name: Option<String>,
    /// How long the token is valid, e.g. `1h`, `30m`, `2days`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: std::time::Duration,
    /// The key to sign with (default: the only one).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Receive only: no publishing.
    #[arg(long)]
    pub no_publish: bool,
    /// Publish only: receive no one's media.
    #[arg(long)]
    pub no_subscribe: bool,
    /// No chat messages.
    #[arg(long)]
    pub no_data: bool,
    /// May manage the room through the admin API.
    #[arg(long)]
    pub room_admin: bool,
}

/// What a node does with a join for a room hosted by another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClusterPolicy {
    /// Send the client to the node hosting the room: one room, one node.
    #[default]
    Redirect,
    /// Serve the client here and relay media between the nodes hosting the room.
    Cascade,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad flag or value, or `--help`/`--version` (`exit()` prints it).
    #[error(transparent)]
    Args(#[from] clap::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: `{key}` is not a setting (see `switchboard --help`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: `{key}` has a value of a kind no setting takes (a table or a date)")]
    BadValue { path: PathBuf, key: String },
}

impl Config {
    /// Reads the flags and environment of this process, and the `--config` file if named.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// As [`Config::load`], from these arguments (the first is the program name). A setting in
    /// the file counts only where neither a flag nor an environment variable gave one: the
    /// file's settings become flags placed before the given ones, and clap parses the lot, so
    /// the file's values are checked exactly as flags are.
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let matches = Config::command().try_get_matches_from(&args)?;
        let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
            return Ok(Config::try_parse_from(&args)?);
        };
        let from_file = file_args(&path, &matches)?;
        let mut merged = Vec::with_capacity(args.len() + from_file.len());
        merged.extend(args.first().cloned());
        merged.extend(from_file);
        merged.extend(args.into_iter().skip(1));
        Ok(Config::try_parse_from(merged)?)
    }

    /// The number of media workers in force.
    pub fn media_workers(&self) -> usize {
        self.workers
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Rooms are cascaded across the nodes of a cluster.
    pub fn cascades(&self) -> bool {
        self.redis_url.is_some() && self.cluster_policy == ClusterPolicy::Cascade
    }

    /// Loopback everything, ephemeral ports: what in-process tests and benches use.
    pub fn for_tests() -> Self {
        let mut config: Config = defaults();
        config.http = SocketAddr::from(([127, 0, 0, 1], 0));
        config.udp_port = 0;
        config.no_turn = true;
        config.public_ip = Some(IpAddr::from([127, 0, 0, 1]));
        config.node_link_port = 0;
        config
    }
}

/// The settings of a TOML file as flags, leaving out those the command line or environment
/// already set.
fn file_args(path: &Path, given: &clap::ArgMatches) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Toml {
        path: path.to_owned(),
        source,
    })?;
    let command = Config::command();
    let mut entries: Vec<(String, toml::Value)> = Vec::new();
    for (key, value) in table {
        match value {
            // Tables only group settings (`[limits]`, `[webhooks]`): their keys are flags too.
            toml::Value::Table(inner) => entries.extend(inner),
            value => entries.push((key, value)),
        }
    }
    let mut out = Vec::new();
    for (key, value) in entries {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) || a.get_id().as_str() == key)
            .filter(|a| a.get_id() != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            })?;
        let id = arg.get_id().as_str();
        if matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(id));
        let bad = || ConfigError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
        };
        let values = match value {
            toml::Value::Array(items) => items,
            value => vec![value],
        };
        for value in values {
            match value {
                // Switches (`no-turn = true`); false is their default.
                toml::Value::Boolean(true) => out.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(text) => out.extend([flag.clone().into(), text.into()]),
                toml::Value::Integer(n) => out.extend([flag.clone().into(), n.to_string().into()]),
                toml::Value::Float(x) => out.extend([flag.clone().into(), x.to_string().into()]),
                toml::Value::Table(_) | toml::Value::Array(_) | toml::Value::Datetime(_) => {
                    return Err(bad());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_ignore_the_environment() {
        let reads_env = |c: clap::Command| c.get_arguments().any(|a| a.get_env().is_some());
        assert!(
            reads_env(Config::command()),
            "the command line reads SWITCHBOARD_*"
        );
        assert!(!reads_env(defaults_command::<Config>()));
        assert!(!reads_env(defaults_command::<Limits>()));
        assert_eq!(Limits::default().webhook_queue, 1024);
    }

    fn write_config(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "switchboard-config-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_config_file_sets_what_flags_do_not() {
        let path = write_config(
            "sets",
            r#"
            http = "127.0.0.1:9000"
            api-key = ["k1:an-api-secret-of-32-characters-at-least"]
            no_turn = true
            [limits]
            max-connections = 500
            allowed-origins = ["https://meet.example.com", "https://app.example.com"]
            [webhooks]
            webhook-url = ["https://hooks.example.com/switchboard"]
            webhook-secret = "a-webhook-secret-for-tests"
            "#,
        );
        let file = path.to_str().unwrap();
        let config =
            Config::load_from(["switchboard", "--config", file, "--max-connections", "7"]).unwrap();
        assert_eq!(config.http.to_string(), "127.0.0.1:9000");
        assert_eq!(config.api_keys.len(), 1);
        assert!(config.no_turn);
        assert_eq!(
            config.limits.max_connections, 7,
            "the flag wins over the file"
        );
        assert_eq!(config.limits.allowed_origins.len(), 2);
        assert_eq!(
            config.webhook_urls,
            ["https://hooks.example.com/switchboard"]
        );
        assert_eq!(config.limits.max_rooms, 1000, "defaults stay");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_bad_config_file_is_a_clear_error() {
        let unknown = write_config("unknown", "max-conections = 5\n");
        let error =
            Config::load_from(["switchboard", "--config", unknown.to_str().unwrap()]).unwrap_err();
        assert!(
            matches!(&error, ConfigError::UnknownKey { key, .. } if key == "max-conections"),
            "{error}"
        );
        let bad_value = write_config("value", "max-connections = \"many\"\n");
        let error = Config::load_from(["switchboard", "--config", bad_value.to_str().unwrap()])
            .unwrap_err();
        assert!(error.to_string().contains("many"), "{error}");
        let not_toml = write_config("toml", "max-connections = = 5\n");
        let error =
            Config::load_from(["switchboard", "--config", not_toml.to_str().unwrap()]).unwrap_err();
        assert!(matches!(error, ConfigError::Toml { .. }), "{error}");
        let missing = Config::load_from(["switchboard", "--config", "/nonexistent.toml"]);
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
        for path in [unknown, bad_value, not_toml] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/switchboard.example.toml");
        Config::load_from(["switchboard", "--config", example]).unwrap();
    }

    #[test]
    fn defaults() {
        let config = Config::parse_from(["switchboard"]);
        assert_eq!(config.http.port(), 8080);
        assert_eq!(config.limits.max_message_bytes, 262_144);
        assert_eq!(config.udp_port, 7882);
        let config = Config::parse_from(["switchboard", "--udp-port", "40000", "--workers", "3"]);
        assert_eq!((config.udp_port, config.media_workers()), (40000, 3));
    }
}
