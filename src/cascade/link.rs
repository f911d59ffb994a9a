//! The node link: QUIC between the nodes of a cluster, for cascaded rooms. Media goes as
//! unreliable datagrams (a late packet is worth nothing; the subscriber's own NACKs and
//! keyframe requests repair), control as length-prefixed JSON frames on one stream. TLS 1.3
//! both ways with self-signed certificates pinned by their SHA-256: a node announces its
//! fingerprint with its rooms' state in Redis, a dialing node accepts only the fingerprint the
//! dialed node announced, and a node accepts only dialers whose certificate some node
//! announced. Whoever can write to the cluster's Redis can join the cluster: guard it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::wire::{Control, MAX_CONTROL_FRAME};

const ALPN: &[u8] = b"switchboard-node/1";
/// The name dialing nodes ask for; the pinned fingerprint is what is checked.
const SERVER_NAME: &str = "switchboard-node";
/// A link silent this long is dead (the heartbeat's TTL decides a node's death; this only
/// frees the connection).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// The first packets' size: room for a full RTP packet in one datagram from the start. Path
/// MTU discovery raises it where the network allows.
const INITIAL_MTU: u16 = 1400;
/// Datagrams queued to send before the oldest are dropped.
const DATAGRAM_SEND_BUFFER: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("node link certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("node link TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("node link socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("node link: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("node link: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("node link: cannot resolve `{0}`")]
    Resolve(String),
    #[error("node link control stream: {0}")]
    Frame(String),
}

/// The SHA-256 of a certificate, in hex.
pub fn fingerprint(cert: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fingerprints of the certificates nodes announced, and the node each names.
pub type KnownCerts = Arc<DashMap<String, String>>;

/// This node's end of the link: one UDP socket that accepts and dials.
#[derive(Debug)]
pub struct LinkEndpoint {
    endpoint: quinn::Endpoint,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl LinkEndpoint {
    /// Makes this process's certificate and binds `addr`, accepting dialers in `known`.
    pub fn bind(addr: SocketAddr, known: KnownCerts) -> Result<Self, LinkError> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
        let cert = made.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(KnownClients {
                known,
                provider: provider.clone(),
            }))
            .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls)
            .map_err(|e| LinkError::Frame(format!("QUIC server config: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());
        let endpoint = quinn::Endpoint::server(server, addr)?;
        Ok(LinkEndpoint {
            endpoint,
            fingerprint: fingerprint(&cert),
            cert,
            key,
            provider,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The fingerprint other nodes pin this node's certificate by.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The next node dialing in, its handshake done; None once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<quinn::Connection, LinkError>> {
        let incoming = self.endpoint.accept().await?;
        Some(incoming.await.map_err(LinkError::from))
    }

    /// Dials the node at `addr` (`host:port`), accepting only the certificate `fingerprint`.
    pub async fn dial(
        &self,
        addr: &str,
        fingerprint: &str,
    ) -> Result<quinn::Connection, LinkError> {
        let target = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| LinkError::Resolve(addr.to_owned()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer {
                fingerprint: fingerprint.to_owned(),
                provider: self.provider.clone(),
            }))
            .with_client_auth_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| LinkError::Frame(format!("QUIC client config: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport());
        let connecting = self.endpoint.connect_with(client, target, SERVER_NAME)?;
        Ok(connecting.await?)
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.initial_mtu(INITIAL_MTU)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .datagram_receive_buffer_size(Some(DATAGRAM_SEND_BUFFER));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Writes one control frame.
pub async fn write_frame(stream: &mut quinn::SendStream, frame: &Control) -> Result<(), LinkError> {
    let body = serde_json::to_vec(frame).map_err(|e| LinkError::Frame(e.to_string()))?;
    stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .await
        .map_err(|e| LinkError::Frame(e.to_string()))?;
    stream
        .write_all(&body)
        .await
        .map_err(|e| LinkError::Frame(e.to_string()))
}

/// Reads one control frame; None at the end of the stream.
pub async fn read_frame(stream: &mut quinn::RecvStream) -> Result<Option<Control>, LinkError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(LinkError::Frame(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(LinkError::Frame(format!("a frame of {len} bytes")));
    }
    let mut body = vec![0; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| LinkError::Frame(e.to_string()))?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| LinkError::Frame(format!("bad frame: {e}")))
}

/// Accepts a dialing node whose certificate some node announced.
#[derive(Debug)]
struct KnownClients {
    known: KnownCerts,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for KnownClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.known.contains_key(&fingerprint(end_entity)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "a node link certificate no node announced".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts only the certificate the dialed node announced.
#[derive(Debug)]
struct PinnedServer {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node link certificate is not the one the node announced".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
