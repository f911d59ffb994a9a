//! Synthetic media: one generator task per published track writes RTP with the
//! [`payload`](super::payload) format to every output of the track (one output per peer
//! connection it is sent on: one in SFU rooms, one per peer in mesh rooms), and one task per
//! output counts the keyframe requests that come back.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::watch;
use tracing::debug;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::PeerConnection;
use webrtc::rtp_transceiver::RtpTransceiver;

use super::payload::{self, PayloadHeader};
use super::peer::{Link, LinkState, h264_codec, opus_codec, vp8_codec};
use super::stats::LocalTrackStats;
use crate::signal::protocol::MediaKind;

/// Which codec the synthetic video claims to be (the payload is synthetic either way; an SFU
/// does not look inside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoCodec {
    #[default]
    Vp8,
    /// H.264 constrained baseline, packetization-mode 1, under payload type 120 (the server's
    /// default for it differs, so forwarding must rewrite the payload type).
    H264,
}

/// Rates and sizes of the synthetic media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaProfile {
    pub video_codec: VideoCodec,
    pub video_fps: u32,
    /// RTP packets per video frame; the last carries the marker bit.
    pub video_packets_per_frame: u32,
    /// Payload bytes per video packet.
    pub video_packet_size: usize,
    pub audio_packets_per_second: u32,
    /// Payload bytes per audio packet.
    pub audio_packet_size: usize,
    /// Every n-th video frame is labelled a key frame, and so is the next frame after a
    /// keyframe request (PLI/FIR). 0: every frame is labelled key.
    pub keyframe_interval_frames: u32,
    /// Publish with a plain `addTrack`, as many browser apps do: the track may land on a
    /// transceiver the server created to send to this client. Otherwise each track gets a
    /// send-only transceiver of its own.
    pub plain_add_track: bool,
    /// Spread each video frame's packets over [`PACED_SHARE`] of the frame interval, as a
    /// browser's pacer does (libwebrtc sends at 2.5× the target bitrate), instead of writing them
    /// back to back.
    pub paced: bool,
    /// Video to the SFU goes as three simulcast layers ([`SIMULCAST_RIDS`]), as the browser
    /// client sends its camera: each with the frame's packets, at a quarter, half and all of
    /// `video_packet_size`.
    pub simulcast: bool,
    /// Audio packets carry this level (dBov below full scale, 0..=127) in the audio-level header
    /// extension, flagged as voice: the participant "speaks" that loud. None: no extension.
    pub speaking_dbov: Option<u8>,
}

/// The rids of the synthetic simulcast layers, lowest first (the browser client's too).
pub const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];
/// Each layer's packet size as a divisor of the profile's.
const LAYER_SIZE_DIVISORS: [usize; 3] = [4, 2, 1];
const MID_EXTENSION: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const RID_EXTENSION: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
pub(crate) const AUDIO_LEVEL_EXTENSION: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Share of a frame interval a paced frame's packets are spread over: a 2.5× pacing factor.
pub const PACED_SHARE: f64 = 1.0 / 2.5;

impl Default for MediaProfile {
    fn default() -> Self {
        Self {
            video_codec: VideoCodec::Vp8,
            video_fps: 30,
            video_packets_per_frame: 3,
            video_packet_size: 1100,
            audio_packets_per_second: 50,
            audio_packet_size: 100,
            keyframe_interval_frames: 0,
            plain_add_track: false,
            paced: true,
            simulcast: false,
            speaking_dbov: None,
        }
    }
}

/// How often an output that cannot send yet re-checks whether it can.
const READY_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// What became of one packet written to an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Sent,
    /// The output has no such layer, or it is switched off.
    Skipped,
    Failed,
}

impl Output {
    /// Writes one packet of `layer`, if the output has it and it is active.
    async fn write(
        &self,
        layer: usize,
        marker: bool,
        sequence_number: u16,
        timestamp: u32,
        payload: &Bytes,
        audio_level: Option<u8>,
    ) -> Written {
        let Some(l) = self.layers.get(layer) else {
            return Written::Skipped;
        };
        if !l.active.load(Ordering::Relaxed) {
            return Written::Skipped;
        }
        let mut packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker,
                payload_type: self.payload_type.load(Ordering::Acquire) as u8,
                sequence_number,
                timestamp,
                ssrc: l.ssrc,
                ..Default::default()
            },
            payload: payload.clone(),
        };
        let tags = self.tags.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tags) = tags {
            if let (Some(rid), Some(id)) = (l.rid, tags.rid) {
                let _ = packet
                    .header
                    .set_extension(id, Bytes::from_static(rid.as_bytes()));
                if let Some((id, mid)) = tags.mid {
                    let _ = packet.header.set_extension(id, mid);
                }
            }
            if let (Some(level), Some(id)) = (audio_level, tags.audio_level) {
                // V flag (voice) and the level.
                let _ = packet
                    .header
                    .set_extension(id, Bytes::copy_from_slice(&[0x80 | (level & 0x7f)]));
            }
        }
        match self.track.write_rtp(packet).await {
            Ok(()) => Written::Sent,
            Err(e) => {
                debug!("write_rtp: {e}");
                Written::Failed
            }
        }
    }
}

/// One simulcast layer (or the only stream) of an output.
struct OutputLayer {
    rid: Option<&'static str>,
    ssrc: u32,
    /// Cleared when the server says no subscriber receives the layer (dynacast).
    active: AtomicBool,
}

/// What simulcast packets must carry for the receiver to tell the layers apart: the mid and
/// rid header extensions, under the ids negotiated.
#[derive(Debug, Clone, Default)]
struct LayerTags {
    mid: Option<(u8, Bytes)>,
    rid: Option<u8>,
    /// The audio-level extension's id.
    audio_level: Option<u8>,
}

/// One published track on one peer connection.
pub(crate) struct Output {
    track: Arc<TrackLocalStaticRTP>,
    transceiver: Arc<dyn RtpTransceiver>,
    layers: Vec<OutputLayer>,
    /// Known once ready (simulcast only).
    tags: Mutex<Option<LayerTags>>,
    /// The transceiver's mid, once negotiated.
    mid: Mutex<Option<String>>,
    link: Arc<LinkState>,
    mime_type: &'static str,
    /// Negotiated payload type; `u16::MAX` until known.
    payload_type: AtomicU16,
    ready: AtomicBool,
    detached: AtomicBool,
    next_check: Mutex<Instant>,
}

impl Output {
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// The transceiver's mid, once negotiated.
    pub fn mid(&self) -> Option<String> {
        self.mid.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Encodes only the layers named (dynacast); a single-stream output ignores this.
    pub fn set_active_layers(&self, active: &[String]) {
        if self.layers.len() < 2 {
            return;
        }
        for layer in &self.layers {
            let on = layer.rid.is_some_and(|rid| active.iter().any(|a| a == rid));
            layer.active.store(on, Ordering::Relaxed);
        }
    }

    /// Whether packets can go out: connected, the transceiver negotiated to send, and the
    /// payload type known. Checked at most every [`READY_CHECK_INTERVAL`] until it is.
    async fn check_ready(&self) -> bool {
        if self.ready.load(Ordering::Acquire) {
            return true;
        }
        {
            let mut next = self.next_check.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now < *next {
                return false;
            }
            *next = now + READY_CHECK_INTERVAL;
        }
        if !self.link.connected() {
            return false;
        }
        match self.transceiver.current_direction().await {
            Ok(direction) if direction.has_send() => {}
            _ => return false,
        }
        let Ok(Some(sender)) = self.transceiver.sender().await else {
            return false;
        };
        let Ok(parameters) = sender.get_parameters().await else {
            return false;
        };
        let Some(codec) = parameters
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(self.mime_type))
        else {
            return false;
        };
        let id = |uri: &str| {
            parameters
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == uri)
                .and_then(|e| u8::try_from(e.id).ok())
        };
        let mut tags = LayerTags {
            audio_level: id(AUDIO_LEVEL_EXTENSION),
            ..LayerTags::default()
        };
        if self.layers.len() > 1 {
            let mid = self.transceiver.mid().await.ok().flatten();
            tags.mid = id(MID_EXTENSION).zip(mid.map(Bytes::from));
            tags.rid = id(RID_EXTENSION);
        }
        *self.tags.lock().unwrap_or_else(|e| e.into_inner()) = Some(tags);
        if let Ok(Some(mid)) = self.transceiver.mid().await {
            *self.mid.lock().unwrap_or_else(|e| e.into_inner()) = Some(mid);
        }
        self.payload_type
            .store(u16::from(codec.payload_type), Ordering::Release);
        self.ready.store(true, Ordering::Release);
        true
    }
}

/// A published synthetic track: its generator and its outputs.
pub(crate) struct LocalTrack {
    pub track_id: String,
    pub kind: MediaKind,
    profile: MediaProfile,
    sender_hash: u32,
    stream_id: String,
    outputs: Mutex<Vec<Arc<Output>>>,
    pub stats: Arc<LocalTrackStats>,
}

impl LocalTrack {
    pub fn new(
        participant_id: &str,
        track_id: String,
        kind: MediaKind,
        profile: MediaProfile,
    ) -> Arc<Self> {
        Arc::new(Self {
            stream_id: format!("{participant_id}-local"),
            sender_hash: payload::participant_hash(participant_id),
            track_id,
            kind,
            profile,
            outputs: Mutex::new(Vec::new()),
            stats: Arc::new(LocalTrackStats::new()),
        })
    }

    /// Adds this track to `link`'s connection as a send-only transceiver (never re-using a
    /// receiving one) and starts counting the keyframe requests it gets.
    pub async fn attach(self: &Arc<Self>, link: &mut Link) -> anyhow::Result<()> {
        let (codec, rtp_kind, mime_type) = match self.kind {
            MediaKind::Audio => (opus_codec(), RtpCodecKind::Audio, "audio/opus"),
            MediaKind::Video => match self.profile.video_codec {
                VideoCodec::Vp8 => (vp8_codec(), RtpCodecKind::Video, "video/VP8"),
                VideoCodec::H264 => (h264_codec(), RtpCodecKind::Video, "video/H264"),
            },
        };
        // Simulcast to the SFU only: a mesh peer gets one stream, as from a browser.
        let simulcast =
            self.profile.simulcast && self.kind == MediaKind::Video && link.state.peer.is_none();
        let rids: &[&'static str] = if simulcast { &SIMULCAST_RIDS } else { &[""] };
        let layers: Vec<OutputLayer> = rids
            .iter()
            .map(|rid| OutputLayer {
                rid: (!rid.is_empty()).then_some(*rid),
                ssrc: rand::random(),
                active: AtomicBool::new(true),
            })
            .collect();
        let track = new_rtp_track(&self.stream_id, &self.track_id, rtp_kind, codec, &layers);
        let transceiver = if self.profile.plain_add_track {
            add_track_plainly(link.pc.as_ref(), &track).await?
        } else {
            add_sendonly_track(link.pc.as_ref(), &self.stream_id, &track).await?
        };
        let output = Arc::new(Output {
            track: track.clone(),
            transceiver,
            layers,
            tags: Mutex::new(None),
            mid: Mutex::new(None),
            link: link.state.clone(),
            mime_type,
            payload_type: AtomicU16::new(u16::MAX),
            ready: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            next_check: Mutex::new(Instant::now()),
        });
        let stats = self.stats.clone();
        tokio::spawn(async move {
            // Ends when the track is unbound or the connection closes.
            while let Some(event) = track.poll().await {
                let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                    continue;
                };
                for packet in packets {
                    let any = packet.as_any();
                    if any.is::<PictureLossIndication>() {
                        stats.pli.fetch_add(1, Ordering::Relaxed);
                    } else if any.is::<FullIntraRequest>() {
                        stats.fir.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        link.outputs.push(output.clone());
        link.mark_needs_offer();
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(output);
        Ok(())
    }

    /// Stops sending this track on `link`: removes its sender (the next offer turns the
    /// transceiver to inactive) and stops writing to it.
    pub async fn detach(self: &Arc<Self>, link: &mut Link) -> anyhow::Result<()> {
        let mine: Vec<Arc<Output>> = link
            .outputs
            .iter()
            .filter(|o| {
                self.outputs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|x| Arc::ptr_eq(x, o))
            })
            .cloned()
            .collect();
        for output in mine {
            output.detach();
            if let Some(sender) = output.transceiver.sender().await? {
                link.pc.remove_track(&sender).await?;
            }
            link.outputs.retain(|o| !Arc::ptr_eq(o, &output));
        }
        link.mark_needs_offer();
        Ok(())
    }

    /// Writes packets at the profile's rate until `stop` says so or its sender is dropped.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (period, packets_per_tick, size, ts_step) = match self.kind {
            MediaKind::Video => {
                let fps = self.profile.video_fps.max(1);
                (
                    Duration::from_secs(1) / fps,
                    self.profile.video_packets_per_frame.max(1),
                    self.profile.video_packet_size,
                    90_000 / fps,
                )
            }
            MediaKind::Audio => {
                let pps = self.profile.audio_packets_per_second.max(1);
                (
                    Duration::from_secs(1) / pps,
                    1,
                    self.profile.audio_packet_size,
                    48_000 / pps,
                )
            }
        };
        let gap = if self.profile.paced && packets_per_tick > 1 {
            period.mul_f64(PACED_SHARE) / packets_per_tick
        } else {
            Duration::ZERO
        };
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Per layer: the payload sequence and the RTP sequence of its own SSRC.
        let mut seq = [0u64; SIMULCAST_RIDS.len()];
        let mut rtp_seq: [u16; SIMULCAST_RIDS.len()] = rand::random();
        let mut timestamp: u32 = rand::random();
        let mut ready = Vec::new();
        let mut buf = BytesMut::new();
        let mut frame: u64 = 0;
        let mut requests_seen = 0;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let outputs: Vec<Arc<Output>> = {
                let mut outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
                outputs.retain(|o| !o.is_detached());
                outputs.clone()
            };
            ready.clear();
            for output in outputs {
                if output.check_ready().await {
                    ready.push(output);
                }
            }
            timestamp = timestamp.wrapping_add(ts_step);
            if ready.is_empty() {
                continue;
            }
            let interval = u64::from(self.profile.keyframe_interval_frames);
            let requests =
                self.stats.pli.load(Ordering::Relaxed) + self.stats.fir.load(Ordering::Relaxed);
            let key = interval == 0 || frame.is_multiple_of(interval) || requests != requests_seen;
            requests_seen = requests;
            frame += 1;
            let h264 = self.profile.video_codec == VideoCodec::H264;
            let layer_count = ready.iter().map(|o| o.layers.len()).max().unwrap_or(1);
            for i in 0..packets_per_tick {
                if i > 0 && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                let marker = self.kind == MediaKind::Video && i + 1 == packets_per_tick;
                for layer in 0..layer_count {
                    let header = PayloadHeader {
                        sender: self.sender_hash,
                        kind: self.kind,
                        layer: layer as u8,
                        seq: seq[layer],
                        sent_at_us: payload::now_micros(),
                    };
                    let divisor = if layer_count > 1 {
                        LAYER_SIZE_DIVISORS[layer]
                    } else {
                        1
                    };
                    payload::write_payload(&header, size / divisor, &mut buf);
                    if self.kind == MediaKind::Video {
                        if h264 {
                            buf[0] = payload::H264_IDR_BYTE;
                        }
                        if !key {
                            payload::mark_delta(&mut buf, h264);
                        }
                    }
                    let payload = buf.split().freeze();
                    let mut sent = false;
                    for output in &ready {
                        let level = match self.kind {
                            MediaKind::Audio => self.profile.speaking_dbov,
                            MediaKind::Video => None,
                        };
                        match output
                            .write(layer, marker, rtp_seq[layer], timestamp, &payload, level)
                            .await
                        {
                            Written::Sent => sent = true,
                            Written::Skipped => {}
                            Written::Failed => {
                                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if !sent {
                        continue;
                    }
                    self.stats.sent_packets.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .sent_bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    self.stats.last_seq.store(seq[layer], Ordering::Relaxed);
                    seq[layer] += 1;
                    rtp_seq[layer] = rtp_seq[layer].wrapping_add(1);
                }
            }
            self.stats.frames.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A new RTP track with one encoding per layer (one, without simulcast).
fn new_rtp_track(
    stream_id: &str,
    track_id: &str,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    layers: &[OutputLayer],
) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_string(),
        track_id.to_string(),
        track_id.to_string(),
        kind,
        layers
            .iter()
            .map(|layer| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    rid: layer.rid.unwrap_or_default().to_string(),
                    ssrc: Some(layer.ssrc),
                    ..Default::default()
                },
                active: true,
                codec: codec.clone(),
                ..Default::default()
            })
            .collect(),
    )))
}

/// Adds a send-only transceiver carrying `track`. A fresh transceiver each time: `add_track`
/// may re-use a receiving one, which mixes the directions of unrelated tracks on one m-line.
async fn add_sendonly_track(
    pc: &dyn PeerConnection,
    stream_id: &str,
    track: &Arc<TrackLocalStaticRTP>,
) -> anyhow::Result<Arc<dyn RtpTransceiver>> {
    Ok(pc
        .add_transceiver_from_track(
            track.clone() as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: vec![stream_id.to_string()],
                send_encodings: vec![],
            }),
        )
        .await?)
}

/// Adds `track` with a plain `add_track`, which re-uses a transceiver of the same kind that only
/// receives, if there is one, and returns the transceiver it went on.
async fn add_track_plainly(
    pc: &dyn PeerConnection,
    track: &Arc<TrackLocalStaticRTP>,
) -> anyhow::Result<Arc<dyn RtpTransceiver>> {
    let sender = pc.add_track(track.clone() as Arc<dyn TrackLocal>).await?;
    for transceiver in pc.get_transceivers().await {
        if let Ok(Some(s)) = transceiver.sender().await
            && Arc::ptr_eq(&s, &sender)
        {
            return Ok(transceiver);
        }
    }
    anyhow::bail!("add_track put the track on no transceiver")
}
