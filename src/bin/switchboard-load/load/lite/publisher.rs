//! A lite publisher: one str0m connection (RTP mode) on its own loopback UDP socket and tokio
//! task, sending the synthetic media of a [`MediaProfile`] (Opus-labelled audio, VP8-labelled
//! video) with the same payloads, sizes and pacing as the webrtc-rs publishers. It is the
//! publisher of the targets that do not speak Switchboard's protocol (WHIP, Janus VideoRoom):
//! the signaling is the caller's (an SDP offer out, an answer in), the media is here.
//!
//! It answers keyframe requests (PLI/FIR) with a key frame on the next video frame, sends a key
//! frame every `keyframe_interval_frames` too, and keeps what it sent for retransmission
//! (str0m answers NACKs). No simulcast.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use bytes::BytesMut;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequest, MediaKind as StrMediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use switchboard::client::payload::{self, PayloadHeader};
use switchboard::client::{MediaProfile, PACED_SHARE};
use switchboard::signal::protocol::MediaKind;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long `close` lets str0m send its goodbyes (RTCP BYE, DTLS close_notify).
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// Packets later than this are not sent in a burst to catch up: the schedule restarts.
const MAX_CATCH_UP: Duration = Duration::from_millis(250);

/// What the publisher's task tells its handle.
#[derive(Debug, Default)]
pub struct PublisherShared {
    pub connected: AtomicBool,
    pub failed: AtomicBool,
    pub sent_packets: AtomicU64,
    pub sent_bytes: AtomicU64,
}

/// A publisher whose offer went out and whose answer has not come yet.
pub struct PendingPublisher {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pending: SdpPendingOffer,
    /// The offer: sendonly audio and/or video, with the one host candidate.
    pub offer: String,
    tracks: Vec<(Mid, MediaKind)>,
    sender: u32,
    profile: MediaProfile,
}

/// A publishing connection; dropping it stops the task.
pub struct Publisher {
    pub shared: Arc<PublisherShared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl PendingPublisher {
    /// A new connection on 127.0.0.1 offering `audio` and `video` sendonly. `sender` is the
    /// name the payloads carry (as [`payload::participant_hash`]).
    pub async fn offer(
        sender: &str,
        profile: MediaProfile,
        audio: bool,
        video: bool,
    ) -> anyhow::Result<PendingPublisher> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the publisher's socket")?;
        let local = socket.local_addr()?;
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);
        let candidate = Candidate::host(local, "udp").context("host candidate")?;
        if rtc.add_local_candidate(candidate).is_none() {
            anyhow::bail!("str0m refused the host candidate {local}");
        }
        let stream_id = format!("{sender}-stream");
        let mut api = rtc.sdp_api();
        let mut tracks = Vec::new();
        for (on, kind, str_kind) in [
            (audio, MediaKind::Audio, StrMediaKind::Audio),
            (video, MediaKind::Video, StrMediaKind::Video),
        ] {
            if on {
                let track_id = format!("{sender}-{kind:?}").to_lowercase();
                let mid = api.add_media(
                    str_kind,
                    Direction::SendOnly,
                    Some(stream_id.clone()),
                    Some(track_id),
                    None,
                );
                tracks.push((mid, kind));
            }
        }
        let (offer, pending) = api.apply().ok_or_else(|| anyhow!("nothing to offer"))?;
        Ok(PendingPublisher {
            rtc,
            socket,
            local,
            pending,
            offer: offer.to_sdp_string(),
            tracks,
            sender: payload::participant_hash(sender),
            profile,
        })
    }

    /// Applies the answer (its candidates must be loopback: nothing else is sent to) and
    /// starts sending once connected.
    pub fn accept_answer(mut self, sdp: &str) -> anyhow::Result<Publisher> {
        let answer = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| anyhow!("the answer does not parse: {e}"))?;
        self.rtc
            .sdp_api()
            .accept_answer(self.pending, answer)
            .map_err(|e| anyhow!("the answer was refused: {e}"))?;
        let mut outputs = Vec::new();
        for (mid, kind) in &self.tracks {
            let pt = payload_type(&self.rtc, *mid, *kind)
                .ok_or_else(|| anyhow!("the answer accepted no {kind:?} codec"))?;
            outputs.push(Stream::new(*mid, *kind, pt, &self.profile));
        }
        let shared = Arc::new(PublisherShared::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            Task {
                rtc: self.rtc,
                socket: self.socket,
                local: self.local,
                streams: outputs,
                sender: self.sender,
                shared: shared.clone(),
                key_wanted: true,
            }
            .run(stop_rx),
        );
        Ok(Publisher {
            shared,
            stop,
            task: Some(task),
        })
    }
}

impl Publisher {
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed) && !self.shared.failed.load(Ordering::Relaxed)
    }

    pub fn sent_packets(&self) -> u64 {
        self.shared.sent_packets.load(Ordering::Relaxed)
    }

    pub fn sent_bytes(&self) -> u64 {
        self.shared.sent_bytes.load(Ordering::Relaxed)
    }

    /// Closes the connection (RTCP BYE, DTLS close_notify) and waits for the task.
    pub async fn close(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(CLOSE_GRACE * 5, task).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The payload type the answer gave `kind`'s codec on `mid` (Opus or VP8).
fn payload_type(rtc: &Rtc, mid: Mid, kind: MediaKind) -> Option<Pt> {
    let want = match kind {
        MediaKind::Audio => Codec::Opus,
        MediaKind::Video => Codec::Vp8,
    };
    let media = rtc.media(mid)?;
    media.remote_pts().iter().find_map(|pt| {
        rtc.codec_config()
            .find(|p| p.pt() == *pt && p.spec().codec == want)
            .map(|p| p.pt())
    })
}

/// One track's send schedule.
struct Stream {
    mid: Mid,
    kind: MediaKind,
    pt: Pt,
    /// Frame (or audio packet) period, packets per frame, payload size, RTP clock step.
    period: Duration,
    packets_per_frame: u32,
    size: usize,
    ts_step: u32,
    /// Pause between the packets of one frame (pacing).
    gap: Duration,
    keyframe_interval: u64,
    /// The next packet: when, and which of its frame.
    due: Instant,
    frame_start: Instant,
    index: u32,
    frame: u64,
    key: bool,
    seq: u64,
    rtp_seq: u64,
    timestamp: u32,
}

impl Stream {
    fn new(mid: Mid, kind: MediaKind, pt: Pt, p: &MediaProfile) -> Self {
        let (period, packets_per_frame, size, ts_step) = match kind {
            MediaKind::Video => {
                let fps = p.video_fps.max(1);
                (
                    Duration::from_secs(1) / fps,
                    p.video_packets_per_frame.max(1),
                    p.video_packet_size,
                    90_000 / fps,
                )
            }
            MediaKind::Audio => {
                let pps = p.audio_packets_per_second.max(1);
                (
                    Duration::from_secs(1) / pps,
                    1,
                    p.audio_packet_size,
                    48_000 / pps,
                )
            }
        };
        let gap = if p.paced && packets_per_frame > 1 {
            period.mul_f64(PACED_SHARE) / packets_per_frame
        } else {
            Duration::ZERO
        };
        let now = Instant::now();
        Stream {
            mid,
            kind,
            pt,
            period,
            packets_per_frame,
            size,
            ts_step,
            gap,
            keyframe_interval: u64::from(p.keyframe_interval_frames),
            due: now,
            frame_start: now,
            index: 0,
            frame: 0,
            key: true,
            seq: 0,
            rtp_seq: u64::from(rand::random::<u16>()),
            timestamp: rand::random(),
        }
    }
}

struct Task {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    streams: Vec<Stream>,
    sender: u32,
    shared: Arc<PublisherShared>,
    /// A keyframe request came: the next video frame is a key frame.
    key_wanted: bool,
}

impl Task {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 2048];
        let mut payload_buf = BytesMut::new();
        while let Some(timeout) = self.drive() {
            let connected = self.shared.connected.load(Ordering::Relaxed);
            let media_due = self
                .streams
                .iter()
                .map(|s| s.due)
                .min()
                .filter(|_| connected);
            let wake = media_due.map_or(timeout, |d| d.min(timeout));
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) if from.ip().is_loopback() => {
                        let now = Instant::now();
                        if let Ok(receive) = Receive::new(Protocol::Udp, from, self.local, &buf[..n])
                            && let Err(e) = self.rtc.handle_input(Input::Receive(now, receive))
                        {
                            tracing::trace!("publisher input refused: {e}");
                        }
                    }
                    Ok(_) => {} // only loopback peers
                    Err(e) => tracing::debug!("publisher socket: {e}"),
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if connected {
                        self.send_due(now, &mut payload_buf);
                    }
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
                        tracing::debug!("publisher timeout: {e}");
                    }
                }
                _ = stop.changed() => {
                    if self.rtc.close().is_err() {
                        self.rtc.disconnect();
                    }
                    let _ = self.drive();
                    tokio::time::sleep(CLOSE_GRACE).await;
                    break;
                }
            }
        }
        self.shared.connected.store(false, Ordering::Relaxed);
    }

    /// Polls str0m until it waits; None once the connection is dead.
    fn drive(&mut self) -> Option<Instant> {
        loop {
            if !self.rtc.is_alive() {
                self.shared.failed.store(true, Ordering::Relaxed);
                return None;
            }
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    if t.destination.ip().is_loopback() {
                        // Never waits: a full socket buffer drops the datagram.
                        let _ = self.socket.try_send_to(&t.contents, t.destination);
                    }
                }
                Ok(Output::Timeout(t)) => return Some(t),
                Ok(Output::Event(event)) => match event {
                    Event::Connected => self.shared.connected.store(true, Ordering::Relaxed),
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        self.shared.failed.store(true, Ordering::Relaxed);
                    }
                    Event::KeyframeRequest(KeyframeRequest { .. }) => self.key_wanted = true,
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!("publisher failed: {e}");
                    self.rtc.disconnect();
                }
            }
        }
    }

    /// Writes every packet that is due (a late task catches up at once, as a pacer would).
    fn send_due(&mut self, now: Instant, buf: &mut BytesMut) {
        for i in 0..self.streams.len() {
            let s = &mut self.streams[i];
            if now.saturating_duration_since(s.due) > MAX_CATCH_UP {
                // Connected only now, or the task was starved: start afresh rather than burst.
                s.due = now;
                s.frame_start = now;
                s.index = 0;
            }
            while self.streams[i].due <= now {
                self.send_one(i, buf);
            }
        }
    }

    fn send_one(&mut self, i: usize, buf: &mut BytesMut) {
        let key_wanted = &mut self.key_wanted;
        let s = &mut self.streams[i];
        if s.index == 0 {
            s.timestamp = s.timestamp.wrapping_add(s.ts_step);
            s.key = s.kind == MediaKind::Video
                && (*key_wanted
                    || s.keyframe_interval == 0
                    || s.frame.is_multiple_of(s.keyframe_interval));
            if s.key {
                *key_wanted = false;
            }
            s.frame += 1;
        }
        let header = PayloadHeader {
            sender: self.sender,
            kind: s.kind,
            layer: 0,
            seq: s.seq,
            sent_at_us: payload::now_micros(),
        };
        payload::write_payload(&header, s.size, buf);
        if s.kind == MediaKind::Video && !s.key {
            payload::mark_delta(buf, false);
        }
        // One copy, into the shared buffer str0m keeps for retransmission; `buf` is reused.
        let data: Arc<[u8]> = Arc::from(&buf[..]);
        buf.clear();
        let len = data.len() as u64;
        let marker = s.kind == MediaKind::Video && s.index + 1 == s.packets_per_frame;
        let (mid, pt, seq, ts) = (s.mid, s.pt, s.rtp_seq, s.timestamp);
        s.seq += 1;
        s.rtp_seq += 1;
        s.index += 1;
        if s.index >= s.packets_per_frame {
            s.index = 0;
            s.frame_start += s.period;
            s.due = s.frame_start;
        } else {
            s.due += s.gap;
        }
        let nackable = s.kind == MediaKind::Video;
        let mut api = self.rtc.direct_api();
        let Some(stream) = api.stream_tx_by_mid(mid, None) else {
            return;
        };
        stream.write_rtp(
            RtpWrite::new(pt, seq.into(), ts, Instant::now(), data)
                .marker(marker)
                .nackable(nackable),
        );
        self.shared.sent_packets.fetch_add(1, Ordering::Relaxed);
        self.shared.sent_bytes.fetch_add(len, Ordering::Relaxed);
    }
}
