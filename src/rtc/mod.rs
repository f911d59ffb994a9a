//! The webrtc-rs adapter: builds server-side peer connections (codecs, interceptors, ICE
//! settings, the UDP port pool, socket buffers), runs a participant's negotiation, and moves
//! packets between webrtc tracks and the engine-independent [`crate::forward`] types.
//!
//! Owns every webrtc-rs type the server uses; nothing above this module names one. It knows
//! nothing of rooms or signaling messages: it reports [`PeerEvent`]s and takes method calls.

pub mod keyframe;
mod media;
mod peer;
pub mod ports;
pub mod runtime;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rtc::ice::mdns::MulticastDnsMode;
use webrtc::peer_connection::{
    MediaEngine, PeerConnectionBuilder, RTCConfigurationBuilder, RTCIceCandidateType, Registry,
    SettingEngineBuilder, register_default_interceptors,
};
use webrtc::runtime::Runtime;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::types::ParticipantId;

pub use media::{
    PublishedTrack, add_sendonly_track, run_publisher, to_media_packet, to_rtp_packet,
};
pub use peer::{ChatChannel, ChatEvent, Peer, PeerEvent, RemoteOfferOutcome};
pub use ports::{PortLease, PortPool};

/// Errors of the media engine, kept apart from webrtc-rs's own type so callers can match them.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("no free media port in the configured range")]
    NoPort,
    #[error("bad SDP: {0}")]
    BadSdp(String),
    #[error("bad ICE candidate: {0}")]
    BadCandidate(String),
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
}

/// Builds peer connections with the server's settings.
#[derive(Debug)]
pub struct RtcEngine {
    runtime: Arc<dyn Runtime>,
    ports: Arc<PortPool>,
    bind_ip: IpAddr,
    nat_ip: Option<IpAddr>,
    metrics: Arc<Metrics>,
    downtrack_queue: usize,
}

impl RtcEngine {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        // A loopback public address means "local only" (tests, a laptop demo): bind media to it.
        // Anything else: bind all interfaces and announce the public address in their place.
        let (bind_ip, nat_ip) = match config.public_ip {
            Some(ip) if ip.is_loopback() => (ip, None),
            public => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), public),
        };
        RtcEngine {
            runtime: Arc::new(runtime::BufferedRuntime::new(config.socket_buffer_bytes)),
            ports: PortPool::new(config.udp_ports),
            bind_ip,
            nat_ip,
            metrics,
            downtrack_queue: config.limits.downtrack_queue_packets,
        }
    }

    pub fn ports(&self) -> &Arc<PortPool> {
        &self.ports
    }

    /// A new server-side peer connection on its own port from the pool. Its events (local
    /// candidates, remote tracks, data channels, state changes) arrive on `events`.
    pub async fn new_peer(
        &self,
        participant: ParticipantId,
        events: tokio::sync::mpsc::UnboundedSender<PeerEvent>,
    ) -> Result<Peer, RtcError> {
        // A port can be taken by another process between the pool's check and the library's
        // bind; try a few before giving up.
        let mut last_err = None;
        for _ in 0..4 {
            let lease = self.ports.lease(self.bind_ip).ok_or(RtcError::NoPort)?;
            match self.build(&lease, events.clone()).await {
                Ok(pc) => {
                    return Ok(Peer::new(
                        participant,
                        pc,
                        lease,
                        self.metrics.clone(),
                        self.downtrack_queue,
                    ));
                }
                Err(e) => {
                    tracing::warn!(port = lease.port(), "peer connection build failed: {e}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(RtcError::NoPort))
    }

    async fn build(
        &self,
        lease: &PortLease,
        events: tokio::sync::mpsc::UnboundedSender<PeerEvent>,
    ) -> Result<Arc<dyn webrtc::peer_connection::PeerConnection>, RtcError> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let registry = keyframe::register(registry);

        let mut settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_include_loopback_candidate(self.bind_ip.is_loopback());
        if let Some(ip) = self.nat_ip {
            settings = settings.with_nat_1to1_ips(vec![ip.to_string()], RTCIceCandidateType::Host);
        }

        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(settings.build())
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(peer::Handler::new(events)))
            .with_runtime(self.runtime.clone())
            .with_udp_addrs(vec![SocketAddr::new(self.bind_ip, lease.port())])
            .build()
            .await?;
        Ok(Arc::new(pc))
    }
}
