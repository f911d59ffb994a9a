//! The two packet-moving tasks: one reads a publisher's track into its [`TrackForwarder`], one
//! per subscriber track drains a downtrack queue into the subscriber's connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, oneshot};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::PeerConnection;
use webrtc::rtp_transceiver::RtpTransceiver;

use super::keyframe::is_keyframe_request;
use crate::forward::{
    DownTrackReceiver, ForwardOutcome, ForwarderCommand, MediaPacket, TrackForwarder,
};
use crate::metrics::{GaugeGuard, Metrics};
use crate::types::{MediaKind, TrackCodec};

/// Most packets a downtrack writer takes from its queue per wake-up.
const WRITE_BATCH: usize = 32;

/// A remote track a participant sends, ready to be published.
#[derive(Clone)]
pub struct PublishedTrack {
    pub(super) track: Arc<dyn TrackRemote>,
    pub kind: MediaKind,
    pub codec: TrackCodec,
    /// The publisher's own `MediaStream` id (msid), to group its tracks into streams.
    pub stream_id: String,
    /// The publisher's own track id (msid track id).
    pub remote_track_id: String,
    /// Payload type of the first packet, when the codec had to be resolved from it.
    pub(super) first_payload_type: Option<u8>,
    pub ssrc: u32,
}

impl std::fmt::Debug for PublishedTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedTrack")
            .field("kind", &self.kind)
            .field("codec", &self.codec.mime_type)
            .field("stream_id", &self.stream_id)
            .field("ssrc", &self.ssrc)
            .finish()
    }
}

/// Adds a send-only transceiver carrying a new RTP track with one encoding under `ssrc`.
/// A fresh transceiver each time: `add_track` may re-use a receiving one, which mixes the
/// directions of unrelated tracks on one m-line.
pub async fn add_sendonly_track(
    pc: &dyn PeerConnection,
    stream_id: &str,
    track_id: &str,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    ssrc: u32,
) -> webrtc::error::Result<(Arc<TrackLocalStaticRTP>, Arc<dyn RtpTransceiver>)> {
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_string(),
        track_id.to_string(),
        track_id.to_string(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            active: true,
            codec,
            ..Default::default()
        }],
    )));
    let transceiver = pc
        .add_transceiver_from_track(
            track.clone() as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: vec![stream_id.to_string()],
                send_encodings: vec![],
            }),
        )
        .await?;
    Ok((track, transceiver))
}

/// A webrtc-rs packet as the forwarder sees it (no copy: the payload moves).
pub fn to_media_packet(packet: rtc::rtp::Packet) -> MediaPacket {
    let h = packet.header;
    MediaPacket {
        marker: h.marker,
        payload_type: h.payload_type,
        sequence: h.sequence_number,
        timestamp: h.timestamp,
        ssrc: h.ssrc,
        payload: packet.payload,
    }
}

/// A forwarded packet as webrtc-rs writes it.
pub fn to_rtp_packet(packet: MediaPacket) -> rtc::rtp::Packet {
    // Header extensions of the publisher's connection mean nothing on the subscriber's (ids are
    // negotiated per connection), so none are carried; the empty vectors do not allocate.
    rtc::rtp::Packet {
        header: rtc::rtp::header::Header {
            version: 2,
            marker: packet.marker,
            payload_type: packet.payload_type,
            sequence_number: packet.sequence,
            timestamp: packet.timestamp,
            ssrc: packet.ssrc,
            ..Default::default()
        },
        payload: packet.payload,
    }
}

fn count_forwarded(metrics: &Metrics, outcome: ForwardOutcome) {
    metrics.packets_in.fetch_add(1, Ordering::Relaxed);
    if outcome.queued > 0 {
        metrics
            .packets_out
            .fetch_add(u64::from(outcome.queued), Ordering::Relaxed);
    }
    if outcome.dropped > 0 {
        metrics
            .packets_dropped
            .fetch_add(u64::from(outcome.dropped), Ordering::Relaxed);
    }
}

/// Reads a published track until it ends or `stop` fires, forwarding every packet. Commands (subscribers coming
/// and going, keyframe requests) are taken between packets, so the forwarder needs no lock.
pub async fn run_publisher(
    published: PublishedTrack,
    mut forwarder: TrackForwarder,
    mut commands: mpsc::Receiver<ForwarderCommand>,
    mut stop: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) {
    let _gauge = GaugeGuard::new(&metrics, |m| &m.forwarders);
    let track = published.track;
    let mut commands_open = true;
    // Kept across loop turns, so a command arriving does not cancel and restart the read.
    let mut next_event = track.poll();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            command = commands.recv(), if commands_open => match command {
                Some(command) => forwarder.handle(command),
                None => commands_open = false,
            },
            event = &mut next_event => {
                next_event = track.poll();
                match event {
                    Some(TrackRemoteEvent::OnRtpPacket(packet)) => {
                        let outcome = forwarder.forward(to_media_packet(packet));
                        count_forwarded(&metrics, outcome);
                    }
                    Some(TrackRemoteEvent::OnEnded) | None => break,
                    Some(_) => {}
                }
            },
        }
        if forwarder.wants_keyframe() && forwarder.poll_keyframe_request(Instant::now()) {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: published.ssrc,
            };
            match track.write_rtcp(vec![Box::new(pli)]).await {
                Ok(()) => {
                    metrics.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("PLI to publisher failed: {e}"),
            }
        }
    }
}

/// Drains one downtrack into the subscriber's connection, and passes the subscriber's keyframe
/// requests back to the publisher's forwarder. Waiting on a slow connection here stalls only
/// this subscriber; the forwarder drops into the full queue meanwhile.
pub(super) async fn run_downtrack(
    local: Arc<TrackLocalStaticRTP>,
    mut queue: DownTrackReceiver,
    forwarder: mpsc::Sender<ForwarderCommand>,
    metrics: Arc<Metrics>,
) {
    let _gauge = GaugeGuard::new(&metrics, |m| &m.downtracks);
    let mut rtcp_open = true;
    // Drain what has queued up in one wake-up: under load this saves a task switch per packet.
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    // The RTCP read is kept across turns rather than re-created (a boxed future) per batch.
    let mut next_rtcp = local.poll();
    loop {
        tokio::select! {
            received = queue.recv_many(&mut batch, WRITE_BATCH) => {
                if received == 0 {
                    break;
                }
                for packet in batch.drain(..) {
                    // A failed write loses this packet only; the task ends with its queue
                    // (the subscriber left or unsubscribed).
                    if let Err(e) = local.write_rtp(to_rtp_packet(packet)).await {
                        tracing::debug!("downtrack write failed: {e}");
                    }
                }
            },
            event = &mut next_rtcp, if rtcp_open => {
                next_rtcp = local.poll();
                match event {
                    Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                        if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                            // Full means a request is already on its way.
                            let _ = forwarder.try_send(ForwarderCommand::RequestKeyframe);
                        }
                    }
                    Some(_) => {}
                    None => rtcp_open = false,
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn packet_conversion_keeps_fields_and_drops_extensions() {
        let mut header = rtc::rtp::header::Header {
            version: 2,
            marker: true,
            payload_type: 111,
            sequence_number: 9,
            timestamp: 77,
            ssrc: 5,
            ..Default::default()
        };
        header.extension = true;
        let media = to_media_packet(rtc::rtp::Packet {
            header,
            payload: Bytes::from_static(b"hello"),
        });
        let back = to_rtp_packet(media);
        assert!(back.header.marker);
        assert_eq!(back.header.payload_type, 111);
        assert_eq!(back.header.sequence_number, 9);
        assert_eq!(back.header.timestamp, 77);
        assert_eq!(back.header.ssrc, 5);
        assert!(!back.header.extension);
        assert_eq!(&back.payload[..], b"hello");
    }
}
