//! One peer connection of the client (to the SFU, or to one mesh peer): building it, the
//! library callbacks, and its side of perfect negotiation. The client is always the polite peer
//! toward the server; between mesh peers the one with the lexically greater participant id is
//! polite.
//!
//! A [`Link`] is owned by the session task, which is the only caller of its negotiation methods,
//! so negotiation state needs no lock. The callbacks only record, spawn readers, and forward
//! local ICE candidates to the session task (so a candidate can never overtake the offer or
//! answer it belongs to on the socket).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::RTCOfferOptions;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8,
};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::runtime::TokioRuntime;

use super::decode::FrameDecoder;
use super::media::{AUDIO_LEVEL_EXTENSION, Output};
use super::payload;
use super::relay::MediaRelay;
use super::session::Event;
use super::stats::{ChatMessage, LinkSnapshot, RemoteTrackStats, Shared};
use super::{ClientOptions, MediaProbe};
use crate::signal::protocol::{ChatRelay, IceCandidate, MediaKind, RoomMode};

/// Label of the chat data channel.
pub const CHAT_LABEL: &str = "chat";

/// The part of a link its callbacks and the client handle see.
pub(crate) struct LinkState {
    /// `None` for the SFU, the peer's participant id in mesh rooms.
    pub peer: Option<String>,
    connected: AtomicBool,
    chat: Mutex<Vec<Arc<dyn DataChannel>>>,
    chat_open: AtomicBool,
    shared: Arc<Shared>,
    /// The stop signal of each running track reader. webrtc-rs 0.21 never ends a remote track
    /// whose m-line the remote stopped, so the link ends its reader itself.
    readers: Mutex<HashMap<ReaderKey, Arc<Notify>>>,
}

impl LinkState {
    fn new(peer: Option<String>, shared: Arc<Shared>) -> Self {
        Self {
            peer,
            connected: AtomicBool::new(false),
            chat: Mutex::new(Vec::new()),
            chat_open: AtomicBool::new(false),
            shared,
            readers: Mutex::new(HashMap::new()),
        }
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, HashMap<ReaderKey, Arc<Notify>>> {
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the reader of a track; it stops when the returned signal fires.
    fn add_reader(&self, key: ReaderKey) -> Arc<Notify> {
        let stop = Arc::new(Notify::new());
        self.readers().insert(key, stop.clone());
        stop
    }

    /// Stops the reader of a track, if one runs (`notify_one` keeps the wake-up for a reader
    /// that is not waiting yet).
    fn stop_reader(&self, key: &ReaderKey) {
        if let Some(stop) = self.readers().remove(key) {
            stop.notify_one();
        }
    }

    /// Forgets a reader that has ended (unless its track has a newer reader by now).
    fn reader_ended(&self, key: &ReaderKey, stop: &Arc<Notify>) {
        let mut readers = self.readers();
        if readers.get(key).is_some_and(|s| Arc::ptr_eq(s, stop)) {
            readers.remove(key);
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The open chat channels of this link (normally one).
    pub fn open_chat_channels(&self) -> Vec<Arc<dyn DataChannel>> {
        if !self.chat_open.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.chat.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, state: RTCPeerConnectionState) {
        self.connected.store(
            state == RTCPeerConnectionState::Connected,
            Ordering::Release,
        );
        let peer = self.peer.clone();
        self.shared.update(|r| {
            if let Some(link) = r.links.get_mut(&peer) {
                link.state = state;
            }
        });
    }

    fn set_chat_open(&self) {
        self.chat_open.store(true, Ordering::Release);
        let peer = self.peer.clone();
        self.shared.update(|r| {
            if let Some(link) = r.links.get_mut(&peer) {
                link.chat_open = true;
            }
        });
    }

    /// Starts reading a chat channel of this link.
    fn adopt_chat(self: &Arc<Self>, dc: Arc<dyn DataChannel>, mode: RoomMode) {
        self.chat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dc.clone());
        let state = self.clone();
        tokio::spawn(async move {
            while let Some(event) = dc.poll().await {
                match event {
                    DataChannelEvent::OnOpen => state.set_chat_open(),
                    DataChannelEvent::OnMessage(msg) => {
                        let Ok(text) = std::str::from_utf8(&msg.data) else {
                            continue;
                        };
                        let message = match (mode, &state.peer) {
                            (RoomMode::Mesh, Some(peer)) => ChatMessage {
                                from: peer.clone(),
                                name: None,
                                text: text.to_owned(),
                            },
                            _ => match serde_json::from_str::<ChatRelay>(text) {
                                Ok(relay) => ChatMessage {
                                    from: relay.from,
                                    name: Some(relay.name),
                                    text: relay.text,
                                },
                                Err(_) => ChatMessage {
                                    from: String::new(),
                                    name: None,
                                    text: text.to_owned(),
                                },
                            },
                        };
                        state.shared.push_chat(message);
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
    }
}

/// A remote track as its reader is known by: its stream id and track id. Track ids alone repeat
/// across publishers (every client names its first track `audio-0`).
type ReaderKey = (String, String);

async fn reader_key(track: &Arc<dyn TrackRemote>) -> ReaderKey {
    (track.stream_id().await, track.track_id().await)
}

/// The library's callbacks for one link.
struct LinkHandler {
    state: Arc<LinkState>,
    events: mpsc::UnboundedSender<Event>,
    loopback_only: bool,
    mode: RoomMode,
    probe: Option<Arc<dyn MediaProbe>>,
    /// Packets per video frame the publishers send (this client's own profile's).
    packets_per_frame: u32,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for LinkHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if self.loopback_only && !is_loopback_address(&event.candidate.address) {
            debug!(address = %event.candidate.address, "not offering a non-loopback candidate");
            return;
        }
        match event.candidate.to_json() {
            Ok(init) => {
                let _ = self.events.send(Event::LocalCandidate {
                    peer: self.state.peer.clone(),
                    candidate: Some(init),
                });
            }
            Err(e) => warn!("cannot serialize local candidate: {e}"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.events.send(Event::LocalCandidate {
                peer: self.state.peer.clone(),
                candidate: None,
            });
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        debug!(peer = ?self.state.peer, %state, "connection state");
        self.state.set_state(state);
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let state = self.state.clone();
        let mode = self.mode;
        tokio::spawn(async move {
            match dc.label().await {
                Ok(label) if label == CHAT_LABEL => state.adopt_chat(dc, mode),
                Ok(label) => debug!(%label, "ignoring data channel"),
                Err(e) => debug!("data channel without label: {e}"),
            }
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let key = reader_key(&track).await;
        let stop = self.state.add_reader(key.clone());
        tokio::spawn(receive_track(
            track,
            key,
            stop,
            self.state.clone(),
            self.probe.clone(),
            self.packets_per_frame,
        ));
    }
}

/// Reads one remote track until the connection ends or the remote stops its m-line (`stop`),
/// counting what arrives and, for video, what a decoder would make of it (asking for a key frame
/// when it could not decode).
async fn receive_track(
    track: Arc<dyn TrackRemote>,
    key: ReaderKey,
    stop: Arc<Notify>,
    link: Arc<LinkState>,
    probe: Option<Arc<dyn MediaProbe>>,
    packets_per_frame: u32,
) {
    let (stream_id, track_id) = key.clone();
    let kind = match track.kind().await {
        RtpCodecKind::Audio => MediaKind::Audio,
        _ => MediaKind::Video,
    };
    let publisher = match &link.peer {
        Some(peer) => peer.clone(),
        None => publisher_of_stream(&stream_id).to_owned(),
    };
    let stats = Arc::new(RemoteTrackStats::new(
        stream_id,
        track_id,
        publisher,
        kind,
        link.peer.clone(),
    ));
    link.shared.update(|r| r.remote_tracks.push(stats.clone()));
    let mut decoder = (kind == MediaKind::Video).then(|| FrameDecoder::new(packets_per_frame));
    // One waiter for the whole read, not one per packet.
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let event = tokio::select! {
            event = track.poll() => event,
            () = &mut stopped => break,
        };
        let Some(event) = event else { break };
        match event {
            TrackRemoteEvent::OnRtpPacket(packet) => {
                let now_us = payload::now_micros();
                let Some(header) = stats.record(&packet, now_us) else {
                    continue;
                };
                if let Some(probe) = &probe {
                    probe.on_media(&header, packet.payload.len(), now_us);
                }
                if let Some(decoder) = &mut decoder {
                    let key = payload::is_key(&packet.payload);
                    let request = decoder.packet(header.layer, header.seq, key, Instant::now());
                    stats.set_decoded(decoder.counts());
                    if request {
                        let pli = PictureLossIndication {
                            sender_ssrc: 0,
                            media_ssrc: packet.header.ssrc,
                        };
                        if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                            debug!("cannot request a key frame: {e}");
                        }
                    }
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    link.reader_ended(&key, &stop);
    stats.set_ended();
    link.shared.changed.notify_waiters();
}

/// `sdp` with each stopped media section (port 0) cut down to its m-line, connection line, mid,
/// direction, `rtcp-mux` and formats, as browsers write them. webrtc-rs writes stopped sections
/// in full (feedback, header extensions, ICE and DTLS attributes), about 550 bytes each, and the
/// server keeps one per track that left during the call (str0m 0.25 does not recycle m-lines):
/// a client that stays through a few hundred departures would pass the signaling message limit.
fn without_stopped_detail(sdp: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut in_stopped = false;
    for line in sdp.split("\r\n") {
        if line.starts_with("m=") {
            in_stopped = is_stopped_media_line(line);
        } else if in_stopped {
            let kept = line.starts_with("c=")
                || line.starts_with("a=mid:")
                || line.starts_with("a=rtpmap:")
                || line.starts_with("a=fmtp:")
                || line == "a=inactive"
                || line == "a=rtcp-mux";
            if !kept {
                continue;
            }
        }
        out.push(line);
    }
    out.join("\r\n")
}

/// An audio or video m-line with port 0: a stopped transceiver's.
fn is_stopped_media_line(line: &str) -> bool {
    (line.starts_with("m=audio ") || line.starts_with("m=video "))
        && line.split(' ').nth(1) == Some("0")
}

/// The mids of the audio and video sections an SDP has stopped (port 0).
fn stopped_mids(sdp: &str) -> Vec<String> {
    let mut mids = Vec::new();
    let mut in_stopped = false;
    for line in sdp.lines() {
        if line.starts_with("m=") {
            in_stopped = is_stopped_media_line(line);
        } else if in_stopped && let Some(mid) = line.strip_prefix("a=mid:") {
            mids.push(mid.trim().to_owned());
        }
    }
    mids
}

/// The publisher's participant id in an SFU stream id `{participant_id}-{n}`.
pub fn publisher_of_stream(stream_id: &str) -> &str {
    stream_id
        .rsplit_once('-')
        .map(|(publisher, _)| publisher)
        .unwrap_or(stream_id)
}

fn is_loopback_address(address: &str) -> bool {
    address
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// The connection address of an SDP candidate line (`candidate:f c proto prio ADDR port typ …`).
fn candidate_address(candidate: &str) -> Option<&str> {
    let value = candidate.strip_prefix("candidate:").unwrap_or(candidate);
    value.split_whitespace().nth(4)
}

/// The RTX (RFC 4588) codec repairing `apt`: lost video packets are NACKed and resent on their
/// own SSRC, as browsers do (the server answers and sends NACKs only where RTX is negotiated).
fn rtx_codec(payload_type: u8, apt: u8) -> (RTCRtpCodecParameters, RtpCodecKind) {
    (
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_RTX.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: format!("apt={apt}"),
                rtcp_feedback: vec![],
            },
            payload_type,
        },
        RtpCodecKind::Video,
    )
}

fn codecs() -> [(RTCRtpCodecParameters, RtpCodecKind); 5] {
    let video_feedback = vec![
        RTCPFeedback {
            typ: "goog-remb".to_owned(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "ccm".to_owned(),
            parameter: "fir".to_owned(),
        },
        RTCPFeedback {
            typ: "nack".to_owned(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "nack".to_owned(),
            parameter: "pli".to_owned(),
        },
    ];
    [
        (
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: 111,
            },
            RtpCodecKind::Audio,
        ),
        (
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    rtcp_feedback: video_feedback.clone(),
                    ..vp8_codec()
                },
                payload_type: 96,
            },
            RtpCodecKind::Video,
        ),
        (
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    rtcp_feedback: video_feedback.clone(),
                    ..h264_codec()
                },
                payload_type: 120,
            },
            RtpCodecKind::Video,
        ),
        rtx_codec(97, 96),
        rtx_codec(121, 120),
    ]
}

/// Opus 48 kHz stereo, as published.
pub(crate) fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// H.264 90 kHz, constrained baseline, packetization-mode 1, as published.
pub(crate) fn h264_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/H264".to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .to_owned(),
        rtcp_feedback: vec![],
    }
}

/// VP8 90 kHz, as published.
pub(crate) fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

async fn build_peer_connection(
    opts: &ClientOptions,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let mut media_engine = MediaEngine::default();
    for (codec, kind) in codecs() {
        media_engine.register_codec(codec, kind)?;
    }
    // The audio level of each packet (RFC 6464), from which the server tells who speaks.
    media_engine.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: AUDIO_LEVEL_EXTENSION.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
    let registry = super::keyframe::register(registry);
    let registry = super::rtx::register(registry);
    // Loopback candidates only, and no mDNS (it would multicast off the loopback interface).
    // The server's first connectivity check often arrives before its trickled candidate, so
    // the client meets the server as a peer-reflexive candidate first; webrtc-rs then waits
    // 1 s by default before nominating such a pair. Browsers do not wait. Its connectivity
    // checks also run on a 200 ms tick by default, which puts 200-400 ms into every join
    // (nomination, then DTLS); browsers pace checks at about 50 ms.
    let setting_engine = SettingEngineBuilder::new()
        .with_prflx_acceptance_min_wait(Some(std::time::Duration::ZERO))
        .with_ice_connection_attempts(Some(std::time::Duration::from_millis(50)), Some(25))
        .with_include_loopback_candidate(opts.bind_ip.is_loopback())
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(setting_engine)
        .with_handler(handler)
        .with_runtime(Arc::new(TokioRuntime))
        .with_udp_addrs(vec![SocketAddr::new(opts.bind_ip, 0)])
        .build()
        .await
        .context("building the peer connection")?;
    Ok(Arc::new(pc))
}

/// What the session must put on the socket after a negotiation step.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Offer(String),
    Answer(String),
}

/// One peer connection and its negotiation state.
pub(crate) struct Link {
    pub state: Arc<LinkState>,
    pub pc: Arc<dyn PeerConnection>,
    polite: bool,
    have_local_offer: bool,
    needs_offer: bool,
    /// The next offer restarts ICE (new credentials).
    needs_ice_restart: bool,
    pending_candidates: Vec<RTCIceCandidateInit>,
    pub outputs: Vec<Arc<Output>>,
    loopback_only: bool,
    /// The SFU link's media goes through this relay: the server's candidates are rewritten.
    media_relay: Option<MediaRelay>,
    /// Mids the remote has stopped whose readers were already ended.
    stopped_mids: HashSet<String>,
}

impl Link {
    /// Builds the connection for `peer` (`None` = the SFU) and registers it in the record.
    pub async fn new(
        peer: Option<String>,
        polite: bool,
        mode: RoomMode,
        opts: &ClientOptions,
        shared: Arc<Shared>,
        events: mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<Self> {
        let media_relay = opts.media_relay.filter(|_| peer.is_none());
        let state = Arc::new(LinkState::new(peer.clone(), shared.clone()));
        let handler = Arc::new(LinkHandler {
            state: state.clone(),
            events,
            loopback_only: opts.loopback_only,
            mode,
            probe: opts.probe.clone(),
            packets_per_frame: opts.media.video_packets_per_frame,
        });
        let pc = build_peer_connection(opts, handler).await?;
        shared.update(|r| {
            r.links.insert(
                peer.clone(),
                LinkSnapshot {
                    peer,
                    state: RTCPeerConnectionState::New,
                    chat_open: false,
                },
            );
        });
        Ok(Self {
            state,
            pc,
            polite,
            have_local_offer: false,
            needs_offer: false,
            needs_ice_restart: false,
            pending_candidates: Vec::new(),
            outputs: Vec::new(),
            loopback_only: opts.loopback_only,
            media_relay,
            stopped_mids: HashSet::new(),
        })
    }

    /// Something changed that the next negotiation must carry (a track was attached).
    pub fn mark_needs_offer(&mut self) {
        self.needs_offer = true;
    }

    /// Creates this side's `chat` data channel (before the first offer).
    pub async fn create_chat(&self, mode: RoomMode) -> anyhow::Result<()> {
        let dc = self.pc.create_data_channel(CHAT_LABEL, None).await?;
        self.state.adopt_chat(dc, mode);
        Ok(())
    }

    /// Restarts ICE: an offer with new credentials now, or as soon as the signaling state allows
    /// (what a client does when its network changed).
    pub async fn restart_ice(&mut self) -> anyhow::Result<Option<Outgoing>> {
        self.needs_ice_restart = true;
        self.offer().await
    }

    /// Makes an offer now if the signaling state allows, or remembers to make one.
    pub async fn offer(&mut self) -> anyhow::Result<Option<Outgoing>> {
        if self.have_local_offer {
            self.needs_offer = true;
            return Ok(None);
        }
        self.needs_offer = false;
        let options = std::mem::take(&mut self.needs_ice_restart)
            .then_some(RTCOfferOptions { ice_restart: true });
        let offer = self.pc.create_offer(options).await?;
        let sdp = offer.sdp.clone();
        self.pc.set_local_description(offer).await?;
        self.have_local_offer = true;
        Ok(Some(Outgoing::Offer(without_stopped_detail(&sdp))))
    }

    /// Applies a remote offer (rolling back our own if polite) and answers it; may follow with
    /// our own pending offer.
    pub async fn on_offer(&mut self, sdp: String) -> anyhow::Result<Vec<Outgoing>> {
        let sdp = self.via_relay(sdp);
        let stopped = stopped_mids(&sdp);
        let offer = RTCSessionDescription::offer(sdp).context("parsing the remote offer")?;
        if self.have_local_offer {
            if !self.polite {
                debug!(peer = ?self.state.peer, "glare: impolite, ignoring the remote offer");
                return Ok(Vec::new());
            }
            debug!(peer = ?self.state.peer, "glare: polite, rolling back our offer");
            self.pc
                .set_local_description(RTCSessionDescription::rollback(None)?)
                .await
                .context("rolling back the local offer")?;
            self.have_local_offer = false;
            self.needs_offer = true;
        }
        self.pc
            .set_remote_description(offer)
            .await
            .context("applying the remote offer")?;
        self.end_stopped_readers(stopped).await;
        self.flush_candidates().await;
        let answer = self.pc.create_answer(None).await?;
        let sdp = answer.sdp.clone();
        self.pc.set_local_description(answer).await?;
        // webrtc-rs writes stopped sections in full; sent as is, a member who outlives many
        // departed tracks would pass the server's message limit.
        let mut out = vec![Outgoing::Answer(without_stopped_detail(&sdp))];
        if self.needs_offer
            && let Some(offer) = self.offer().await?
        {
            out.push(offer);
        }
        Ok(out)
    }

    /// Applies the answer to our offer; may follow with a pending offer.
    pub async fn on_answer(&mut self, sdp: String) -> anyhow::Result<Option<Outgoing>> {
        if !self.have_local_offer {
            debug!(peer = ?self.state.peer, "answer without an outstanding offer; ignored");
            return Ok(None);
        }
        let sdp = self.via_relay(sdp);
        let stopped = stopped_mids(&sdp);
        let answer = RTCSessionDescription::answer(sdp).context("parsing the remote answer")?;
        self.pc
            .set_remote_description(answer)
            .await
            .context("applying the remote answer")?;
        self.end_stopped_readers(stopped).await;
        self.have_local_offer = false;
        self.flush_candidates().await;
        if self.needs_offer {
            return self.offer().await;
        }
        Ok(None)
    }

    /// Ends the readers of the tracks on m-lines the remote description stopped (a departed
    /// publisher's, or an unpublished track): a stopped m-line never carries media again.
    async fn end_stopped_readers(&mut self, mut stopped: Vec<String>) {
        stopped.retain(|mid| !self.stopped_mids.contains(mid));
        if stopped.is_empty() {
            return;
        }
        for transceiver in self.pc.get_transceivers().await {
            let Ok(Some(mid)) = transceiver.mid().await else {
                continue;
            };
            if !stopped.contains(&mid) {
                continue;
            }
            if let Ok(Some(receiver)) = transceiver.receiver().await {
                self.state.stop_reader(&reader_key(receiver.track()).await);
            }
        }
        self.stopped_mids.extend(stopped);
    }

    /// Remote SDP (or a candidate line) naming the relay where it named the server.
    fn via_relay(&self, sdp: String) -> String {
        match &self.media_relay {
            Some(relay) => relay.rewrite(&sdp),
            None => sdp,
        }
    }

    /// Adds a remote candidate, or keeps it until a remote description is set.
    pub async fn on_candidate(&mut self, candidate: Option<IceCandidate>) {
        let Some(candidate) = candidate else {
            return; // end of candidates
        };
        if self.loopback_only
            && !candidate_address(&candidate.candidate).is_some_and(is_loopback_address)
        {
            debug!(candidate = %candidate.candidate, "ignoring a non-loopback remote candidate");
            return;
        }
        let init = RTCIceCandidateInit {
            candidate: self.via_relay(candidate.candidate),
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_mline_index,
            username_fragment: candidate.username_fragment,
            ..Default::default()
        };
        if self.pc.remote_description().await.is_none() {
            self.pending_candidates.push(init);
            return;
        }
        if let Err(e) = self.pc.add_ice_candidate(init).await {
            debug!(peer = ?self.state.peer, "remote candidate rejected: {e}");
        }
    }

    async fn flush_candidates(&mut self) {
        for init in std::mem::take(&mut self.pending_candidates) {
            if let Err(e) = self.pc.add_ice_candidate(init).await {
                debug!(peer = ?self.state.peer, "remote candidate rejected: {e}");
            }
        }
    }

    /// Detaches this link's outputs and closes the connection.
    pub async fn close(self) {
        for output in &self.outputs {
            output.detach();
        }
        if let Err(e) = self.pc.close().await {
            debug!(peer = ?self.state.peer, "closing the peer connection: {e}");
        }
        self.state.set_state(RTCPeerConnectionState::Closed);
    }
}

/// A local candidate as the browser's `toJSON()` would put it on the wire.
pub(crate) fn candidate_to_wire(init: RTCIceCandidateInit) -> IceCandidate {
    IceCandidate {
        candidate: init.candidate,
        // webrtc-rs leaves the mid empty; everything is bundled on the first m-line.
        sdp_mid: Some(
            init.sdp_mid
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "0".into()),
        ),
        sdp_mline_index: Some(init.sdp_mline_index.unwrap_or(0)),
        username_fragment: init.username_fragment.filter(|u| !u.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_sections_keep_only_what_identifies_them() {
        let sdp = "v=0\r\na=group:BUNDLE 0 2\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n\
                   a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=inactive\r\na=rtcp-mux\r\n\
                   a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtpmap:97 rtx/90000\r\n\
                   a=fmtp:97 apt=96\r\na=ssrc:1 cname:x\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n\
                   a=sendonly\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\n";
        assert_eq!(
            without_stopped_detail(sdp),
            "v=0\r\na=group:BUNDLE 0 2\r\n\
             m=video 0 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n\
             a=inactive\r\na=rtcp-mux\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\n\
             a=fmtp:97 apt=96\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n\
             a=sendonly\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\n"
        );
    }

    #[test]
    fn stopped_mids_are_those_of_port_zero_media_sections() {
        let sdp = "v=0\r\n\
                   m=audio 0 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=inactive\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n\
                   m=application 0 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:2\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:3\r\n";
        assert_eq!(stopped_mids(sdp), ["0", "3"]);
        assert!(stopped_mids("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n").is_empty());
    }

    use crate::client::media::{LocalTrack, MediaProfile};
    use std::time::Duration;

    /// Feeds one side's gathered candidates to the other.
    async fn shuttle(from: &mut mpsc::UnboundedReceiver<Event>, to: &mut Link) {
        while let Ok(event) = from.try_recv() {
            if let Event::LocalCandidate { candidate, .. } = event {
                to.on_candidate(candidate.map(candidate_to_wire)).await;
            }
        }
    }

    /// Both sides offer at once: the impolite side ignores the polite side's offer, the polite
    /// side rolls back, answers, and then gets its own track negotiated with a fresh offer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn glare_is_resolved_by_the_polite_side() {
        let opts = ClientOptions::default();
        let (shared_a, shared_b) = (Arc::new(Shared::default()), Arc::new(Shared::default()));
        let (events_a, mut rx_a) = mpsc::unbounded_channel();
        let (events_b, mut rx_b) = mpsc::unbounded_channel();
        let mut a = Link::new(
            Some("b".into()),
            true,
            RoomMode::Mesh,
            &opts,
            shared_a.clone(),
            events_a,
        )
        .await
        .unwrap();
        let mut b = Link::new(
            Some("a".into()),
            false,
            RoomMode::Mesh,
            &opts,
            shared_b.clone(),
            events_b,
        )
        .await
        .unwrap();
        let profile = MediaProfile::default();
        let track_a = LocalTrack::new("a", "video-0".into(), MediaKind::Video, profile);
        let track_b = LocalTrack::new("b", "audio-0".into(), MediaKind::Audio, profile);
        track_a.attach(&mut a).await.unwrap();
        track_b.attach(&mut b).await.unwrap();
        a.create_chat(RoomMode::Mesh).await.unwrap();
        b.create_chat(RoomMode::Mesh).await.unwrap();

        let Some(Outgoing::Offer(offer_a)) = a.offer().await.unwrap() else {
            panic!("a offers");
        };
        let Some(Outgoing::Offer(offer_b)) = b.offer().await.unwrap() else {
            panic!("b offers");
        };
        assert!(
            b.on_offer(offer_a).await.unwrap().is_empty(),
            "impolite b ignores"
        );
        let out = a.on_offer(offer_b).await.unwrap();
        let [Outgoing::Answer(answer_a), Outgoing::Offer(offer_a)] = &out[..] else {
            panic!("polite a answers, then re-offers: {out:?}");
        };
        assert!(b.on_answer(answer_a.clone()).await.unwrap().is_none());
        let out = b.on_offer(offer_a.clone()).await.unwrap();
        let [Outgoing::Answer(answer_b)] = &out[..] else {
            panic!("b answers a's re-offer: {out:?}");
        };
        assert!(a.on_answer(answer_b.clone()).await.unwrap().is_none());

        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(track_a.clone().run(stop_rx.clone()));
        tokio::spawn(track_b.clone().run(stop_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            shuttle(&mut rx_a, &mut b).await;
            shuttle(&mut rx_b, &mut a).await;
            let got_b = shared_b.snapshot().intact_from("a", MediaKind::Video);
            let got_a = shared_a.snapshot().intact_from("b", MediaKind::Audio);
            if got_a > 10 && got_b > 10 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "media after glare: a got {got_a}, b got {got_b}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send_replace(true);
        a.close().await;
        b.close().await;
    }

    #[test]
    fn stream_publisher() {
        assert_eq!(publisher_of_stream("p0123456789ab-2"), "p0123456789ab");
        assert_eq!(publisher_of_stream("a-b-3"), "a-b");
        assert_eq!(publisher_of_stream("plain"), "plain");
    }

    #[test]
    fn candidate_addresses() {
        let c = "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host";
        assert_eq!(candidate_address(c), Some("127.0.0.1"));
        assert!(candidate_address(c).is_some_and(is_loopback_address));
        let c = "candidate:1 1 udp 2130706431 10.1.2.3 5000 typ host";
        assert!(!candidate_address(c).is_some_and(is_loopback_address));
        assert!(!candidate_address("garbage").is_some_and(is_loopback_address));
        assert!(!is_loopback_address("abc.local"));
    }
}
