//! The embedded TURN server (RFC 8656), for clients that cannot reach the media ports over UDP
//! (TURN over TCP) and for mesh peers behind NATs. webrtc-rs's `turn` crate does the protocol;
//! this module adds what it lacks:
//! - TCP and TLS listeners (RFC 8656 §3.5 framing: STUN messages and ChannelData, padded to 4
//!   bytes), one `turn` server per connection since the crate serves packet connections only;
//! - time-limited credentials from a shared secret (the "TURN REST API" scheme coturn's
//!   `use-auth-secret` also speaks): username `{expiry}:{participant}`, password
//!   base64(HMAC-SHA1(secret, username)), refused once expired;
//! - a relay that reaches only public addresses and this server's own media ports, so it cannot
//!   be used to probe the server's private network (`--turn-allow-private` lifts that for tests
//!   and LANs).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Mutex, Notify, watch};
use tokio_rustls::TlsAcceptor;
use turn::auth::{AuthHandler, generate_auth_key};
use turn::relay::RelayAddressGenerator;
use turn::server::Server as TurnProtocol;
use turn::server::config::{ConnConfig, ServerConfig};
use webrtc_util::Conn;

use crate::metrics::{GaugeGuard, Metrics};
use crate::signal::protocol::IceServer;
use crate::tls::Certificate;
use crate::types::{TokenBucket, unix_time};

const REALM: &str = "switchboard";
/// Largest STUN message or ChannelData accepted on a TCP connection.
const MAX_FRAME: usize = 1600;

/// The ICE servers handed to clients (the embedded TURN server's URLs and any external ones),
/// with credentials made for each participant.
#[derive(Debug, Clone, Default)]
pub struct IceServers {
    urls: Vec<String>,
    secret: String,
    ttl: Duration,
}

impl IceServers {
    pub fn new(urls: Vec<String>, secret: String, ttl: Duration) -> Self {
        IceServers { urls, secret, ttl }
    }

    /// What `who` puts in its `RTCConfiguration.iceServers` (empty: none configured).
    pub fn for_participant(&self, who: &str) -> Vec<IceServer> {
        if self.urls.is_empty() {
            return Vec::new();
        }
        let (username, credential) = credentials(&self.secret, who, self.ttl);
        vec![IceServer {
            urls: self.urls.clone(),
            username: Some(username),
            credential: Some(credential),
        }]
    }
}

/// Time-limited TURN credentials for `who`, valid for `ttl` (TURN REST API scheme).
pub fn credentials(secret: &str, who: &str, ttl: Duration) -> (String, String) {
    credentials_until(
        secret,
        who,
        unix_time().as_secs().saturating_add(ttl.as_secs()),
    )
}

/// Seconds since the Unix epoch (what REST-API usernames count in).
/// TURN credentials for `who` that expire at `expiry` (seconds since the Unix epoch).
pub fn credentials_until(secret: &str, who: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{who}");
    let password = password_for(secret, &username);
    (username, password)
}

fn password_for(secret: &str, username: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    BASE64_STANDARD.encode(ring::hmac::sign(&key, username.as_bytes()).as_ref())
}

/// Checks REST-API usernames: the expiry must be in the future.
struct RestAuth {
    secret: String,
    metrics: Arc<Metrics>,
}

impl AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        let expiry = username
            .split(':')
            .next()
            .and_then(|e| e.parse::<u64>().ok());
        match expiry {
            Some(expiry) if expiry > unix_time().as_secs() => {
                let password = password_for(&self.secret, username);
                Ok(generate_auth_key(username, realm, &password))
            }
            _ => {
                self.metrics.turn_auth_refused.inc();
                tracing::info!(%src_addr, username, "TURN credentials refused (expired or malformed)");
                Err(turn::Error::Other("expired or malformed username".into()))
            }
        }
    }
}

/// Where relays may send.
#[derive(Debug, Clone)]
struct RelayPolicy {
    /// Also loopback, private and link-local addresses.
    allow_private: bool,
    /// This server's media addresses: always reachable.
    media: Arc<[SocketAddr]>,
    /// Relays open at once, over every transport (0: no limit).
    max_allocations: usize,
    allocations: Arc<AtomicUsize>,
    /// Bytes a second one relay may send to its peers (0: no limit).
    relay_bytes_per_sec: u64,
    metrics: Arc<Metrics>,
}

impl RelayPolicy {
    /// A place for one more relay, or None at the cap.
    fn take_slot(&self) -> Option<AllocationSlot> {
        let held = self.allocations.fetch_add(1, Ordering::Relaxed);
        if self.max_allocations != 0 && held >= self.max_allocations {
            self.allocations.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(AllocationSlot {
            allocations: self.allocations.clone(),
            _gauge: GaugeGuard::new(&self.metrics, |m| &m.turn_allocations),
        })
    }

    fn allows(&self, to: SocketAddr) -> bool {
        if self.allow_private || self.media.contains(&to) {
            return true;
        }
        match to.ip() {
            IpAddr::V4(ip) => {
                !(ip.is_loopback()
                    || ip.is_private()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.is_multicast())
            }
            IpAddr::V6(ip) => {
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_unique_local()
                    || ip.is_unicast_link_local())
            }
        }
    }
}

/// Relay sockets on `bind`, announced as `announce`, sending only where the policy allows.
struct Relays {
    bind: IpAddr,
    announce: IpAddr,
    policy: RelayPolicy,
}

#[async_trait]
impl RelayAddressGenerator for Relays {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        _use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let Some(slot) = self.policy.take_slot() else {
            self.policy.metrics.turn_allocations_refused.inc();
            tracing::warn!(
                max = self.policy.max_allocations,
                "TURN allocation refused: the server holds its maximum of relays"
            );
            return Err(turn::Error::Other("allocation quota reached".into()));
        };
        let socket = UdpSocket::bind((self.bind, requested_port))
            .await
            .map_err(|e| turn::Error::Other(e.to_string()))?;
        let mut announced = socket
            .local_addr()
            .map_err(|e| turn::Error::Other(e.to_string()))?;
        announced.set_ip(self.announce);
        let budget = self.policy.relay_bytes_per_sec;
        let conn = PolicedRelay {
            socket,
            policy: self.policy.clone(),
            // A second's worth of burst.
            rate: std::sync::Mutex::new(TokenBucket::new(
                budget,
                budget,
                std::time::Instant::now(),
            )),
            _slot: slot,
        };
        Ok((Arc::new(conn), announced))
    }
}

/// A relay socket that drops (and counts) what it may not send: to where the policy forbids,
/// or faster than its byte rate.
struct PolicedRelay {
    socket: UdpSocket,
    policy: RelayPolicy,
    rate: std::sync::Mutex<TokenBucket>,
    _slot: AllocationSlot,
}

/// One relay's place under `--turn-max-allocations`, given back when the relay is dropped.
struct AllocationSlot {
    allocations: Arc<AtomicUsize>,
    _gauge: GaugeGuard,
}

impl Drop for AllocationSlot {
    fn drop(&mut self) {
        self.allocations.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Conn for PolicedRelay {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.recv(buf).await?)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok(self.socket.recv_from(buf).await?)
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.policy.allows(target) {
            self.policy.metrics.turn_relay_denied.inc();
            return Ok(buf.len()); // dropped, as a firewall would
        }
        let within_rate = self
            .rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(buf.len() as u64, std::time::Instant::now());
        if !within_rate {
            self.policy.metrics.turn_relay_throttled.inc();
            return Ok(buf.len()); // dropped, as a congested link would
        }
        Ok(self.socket.send_to(buf, target).await?)
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A byte stream (TCP, or TLS over TCP) as the packet connection the `turn` crate serves: each
/// read is one STUN message or ChannelData frame, each write one frame (ChannelData padded to 4
/// bytes). Works for either end of a TURN-over-TCP connection.
pub struct StreamConn {
    reader: Mutex<Reader>,
    writer: Mutex<Writer>,
    local: SocketAddr,
    remote: SocketAddr,
    closed: Arc<Notify>,
}

impl StreamConn {
    pub fn new(
        stream: impl AsyncRead + AsyncWrite + Send + 'static,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        StreamConn {
            reader: Mutex::new(Box::new(reader)),
            writer: Mutex::new(Box::new(writer)),
            local,
            remote,
            closed: Arc::new(Notify::new()),
        }
    }

    async fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut reader = self.reader.lock().await;
        let mut head = [0u8; 4];
        reader.read_exact(&mut head).await?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let (total, padded) = match head[0] >> 6 {
            // STUN: a 20-byte header, then `len` bytes of attributes.
            0 => (20 + len, 20 + len),
            // ChannelData: a 4-byte header, then `len` bytes, padded to 4 over TCP.
            1 => (4 + len, 4 + len.div_ceil(4) * 4),
            _ => return Err(std::io::Error::other("neither STUN nor ChannelData")),
        };
        if padded > MAX_FRAME || padded > buf.len() {
            return Err(std::io::Error::other("TURN frame too large"));
        }
        buf[..4].copy_from_slice(&head);
        reader.read_exact(&mut buf[4..padded]).await?;
        Ok(total)
    }
}

#[async_trait]
impl Conn for StreamConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        match self.read_frame(buf).await {
            Ok(n) => Ok((n, self.remote)),
            Err(e) => {
                self.closed.notify_one();
                Err(e.into())
            }
        }
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.send_to(buf, self.remote).await
    }
    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        let mut writer = self.writer.lock().await;
        writer.write_all(buf).await?;
        let is_channel_data = buf.first().is_some_and(|b| b >> 6 == 1);
        let pad = if is_channel_data {
            (4 - buf.len() % 4) % 4
        } else {
            0
        };
        if pad > 0 {
            writer.write_all(&[0u8; 3][..pad]).await?;
        }
        Ok(buf.len())
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        self.closed.notify_one();
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// What the embedded TURN server needs.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// UDP and TCP listen address (port 0: ephemeral, for tests).
    pub listen: SocketAddr,
    /// Address announced for relays and in the URLs handed to clients.
    pub announce: IpAddr,
    pub secret: String,
    pub allow_private: bool,
    /// The server's media addresses, which relays may always reach.
    pub media: Vec<SocketAddr>,
    /// TURN over TLS (`turns:`), where the server has a certificate.
    pub tls: Option<TurnTls>,
    /// Relays open at once (0: no limit).
    pub max_allocations: usize,
    /// Bytes a second one relay may send to its peers (0: no limit).
    pub relay_bytes_per_sec: u64,
}

/// TURN over TLS: where it listens, the name clients reach it by (what its certificate is
/// for), and the certificate.
#[derive(Clone)]
pub struct TurnTls {
    pub listen: SocketAddr,
    pub host: String,
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TurnTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnTls")
            .field("listen", &self.listen)
            .field("host", &self.host)
            .finish()
    }
}

impl TurnTls {
    /// Loads a PEM certificate chain and private key.
    pub fn load(
        listen: SocketAddr,
        host: String,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let config = Certificate::load(cert, key)?.server_config(&[])?;
        Ok(TurnTls {
            listen,
            host,
            acceptor: TlsAcceptor::from(config),
        })
    }
}

/// A running TURN server: UDP and TCP on one port.
pub struct TurnServer {
    /// Where it listens (UDP and TCP share the port).
    pub addr: SocketAddr,
    /// Where it listens for TURN over TLS, and the name in its URL.
    pub tls: Option<(SocketAddr, String)>,
    announce: IpAddr,
    udp: TurnProtocol,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TurnServer {
    pub async fn start(
        config: TurnConfig,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let udp_socket = UdpSocket::bind(config.listen).await?;
        let addr = udp_socket.local_addr()?;
        // TCP on the same port as UDP.
        let listener = TcpListener::bind(addr).await?;
        let policy = RelayPolicy {
            allow_private: config.allow_private,
            media: config.media.into(),
            max_allocations: config.max_allocations,
            allocations: Arc::default(),
            relay_bytes_per_sec: config.relay_bytes_per_sec,
            metrics: metrics.clone(),
        };
        let auth: Arc<dyn AuthHandler + Send + Sync> = Arc::new(RestAuth {
            secret: config.secret,
            metrics,
        });
        let relays = move || -> Box<dyn RelayAddressGenerator + Send + Sync> {
            Box::new(Relays {
                bind: addr.ip(),
                announce: config.announce,
                policy: policy.clone(),
            })
        };
        let udp = TurnProtocol::new(ServerConfig {
            conn_configs: vec![ConnConfig {
                conn: Arc::new(udp_socket),
                relay_addr_generator: relays(),
            }],
            realm: REALM.into(),
            auth_handler: auth.clone(),
            channel_bind_timeout: Duration::ZERO,
            alloc_close_notify: None,
        })
        .await?;
        let relays = Arc::new(relays);
        let mut listeners = vec![tokio::spawn(accept(
            listener,
            None,
            auth.clone(),
            relays.clone(),
            shutdown.clone(),
        ))];
        let mut tls = None;
        if let Some(turn_tls) = config.tls {
            let listener = TcpListener::bind(turn_tls.listen).await?;
            let tls_addr = listener.local_addr()?;
            tracing::info!(addr = %tls_addr, host = turn_tls.host, "TURN over TLS");
            tls = Some((tls_addr, turn_tls.host));
            listeners.push(tokio::spawn(accept(
                listener,
                Some(turn_tls.acceptor),
                auth,
                relays,
                shutdown,
            )));
        }
        tracing::info!(%addr, announce = %config.announce, "TURN server (UDP and TCP)");
        Ok(TurnServer {
            addr,
            tls,
            announce: config.announce,
            udp,
            listeners,
        })
    }

    /// The URLs clients use: UDP and TCP.
    pub fn urls(&self) -> Vec<String> {
        let host = match self.announce {
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        };
        let port = self.addr.port();
        let mut urls = vec![
            format!("turn:{host}:{port}?transport=udp"),
            format!("turn:{host}:{port}?transport=tcp"),
        ];
        if let Some((addr, host)) = &self.tls {
            urls.push(format!("turns:{host}:{}?transport=tcp", addr.port()));
        }
        urls
    }

    pub async fn stop(self) {
        for listener in &self.listeners {
            listener.abort();
        }
        let _ = self.udp.close().await;
    }
}

/// Accepts TURN over TCP, or over TLS with `tls`.
async fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    auth: Arc<dyn AuthHandler + Send + Sync>,
    relays: Arc<impl Fn() -> Box<dyn RelayAddressGenerator + Send + Sync> + Send + Sync + 'static>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("TURN TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (auth, relays, shutdown, tls) = (auth.clone(), relays(), shutdown.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(local) = stream.local_addr() else {
                return;
            };
            let conn = match tls {
                None => StreamConn::new(stream, local, remote),
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => StreamConn::new(stream, local, remote),
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, "TURN TLS handshake: {e}");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            serve_stream(conn, remote, auth, relays, shutdown).await;
        });
    }
}

/// Serves one TCP or TLS connection until it closes; its allocations go with it.
async fn serve_stream(
    conn: StreamConn,
    remote: SocketAddr,
    auth: Arc<dyn AuthHandler + Send + Sync>,
    relays: Box<dyn RelayAddressGenerator + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    let closed = conn.closed.clone();
    let server = match TurnProtocol::new(ServerConfig {
        conn_configs: vec![ConnConfig {
            conn: Arc::new(conn),
            relay_addr_generator: relays,
        }],
        realm: REALM.into(),
        auth_handler: auth,
        channel_bind_timeout: Duration::ZERO,
        alloc_close_notify: None,
    })
    .await
    {
        Ok(server) => server,
        Err(e) => {
            tracing::warn!(%remote, "TURN over TCP: {e}");
            return;
        }
    };
    tokio::select! {
        _ = closed.notified() => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
    let _ = server.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_rest_api_scheme() {
        let (username, password) = credentials("s3cret", "p1", Duration::from_secs(60));
        let (expiry, who) = username.split_once(':').expect("expiry:who");
        assert_eq!(who, "p1");
        let now = unix_time().as_secs();
        let expiry: u64 = expiry.parse().expect("a number");
        assert!((now + 59..=now + 61).contains(&expiry));
        // base64 of a 20-byte HMAC-SHA1, as coturn's use-auth-secret computes it.
        assert_eq!(password.len(), 28);
        assert_eq!(password, password_for("s3cret", &username));
        assert_ne!(password, password_for("other", &username));
    }

    #[test]
    fn relays_reach_public_addresses_and_the_media_ports_only() {
        let media: SocketAddr = "10.0.0.5:7882".parse().expect("addr");
        let policy = RelayPolicy {
            allow_private: false,
            media: vec![media].into(),
            max_allocations: 0,
            allocations: Arc::default(),
            relay_bytes_per_sec: 0,
            metrics: Arc::new(Metrics::default()),
        };
        assert!(policy.allows("93.184.216.34:5000".parse().expect("addr")));
        assert!(policy.allows(media));
        for denied in [
            "127.0.0.1:22",
            "10.0.0.5:22",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "[::1]:80",
            "[fd00::1]:80",
        ] {
            assert!(!policy.allows(denied.parse().expect("addr")), "{denied}");
        }
        let open = RelayPolicy {
            allow_private: true,
            ..policy
        };
        assert!(open.allows("127.0.0.1:22".parse().expect("addr")));
    }
}
