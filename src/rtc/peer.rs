//! One participant's server-side peer connection: negotiation (the server is the impolite peer
//! of perfect negotiation), the tracks it publishes, and the tracks it is subscribed to.
//!
//! Owned by the participant's session task; every method is called from there, so negotiation
//! state needs no lock. The library's callbacks only turn into [`PeerEvent`]s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtp_transceiver::RTCRtpTransceiverDirection;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState,
};
use webrtc::rtp_transceiver::RtpSender;

use super::media::{PublishedTrack, add_sendonly_track, run_downtrack};
use super::{PortLease, RtcError};
use crate::forward::{DownTrack, ForwarderCommand, Rewriter};
use crate::metrics::{GaugeGuard, Metrics};
use crate::types::{IceCandidate, MediaKind, ParticipantId, TrackCodec, TrackId};

/// What the library tells the session about its connection.
#[derive(Debug)]
pub enum PeerEvent {
    LocalCandidate(IceCandidate),
    /// The participant started sending a track.
    Track(PublishedTrack),
    /// The participant opened its `chat` data channel.
    Chat(ChatChannel),
    Connected,
    /// ICE failed or the connection closed: the participant's media is gone.
    Failed,
}

/// The participant's `chat` data channel.
#[derive(Clone)]
pub struct ChatChannel(Arc<dyn DataChannel>);

impl std::fmt::Debug for ChatChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatChannel")
    }
}

/// One event of a chat channel, as the session needs it.
#[derive(Debug)]
pub enum ChatEvent {
    Text(String),
    /// Binary or non-UTF-8 message: ignored, but counted by the caller.
    Other,
    Closed,
}

impl ChatChannel {
    pub async fn recv(&self) -> ChatEvent {
        loop {
            match self.0.poll().await {
                Some(DataChannelEvent::OnMessage(msg)) => {
                    if !msg.is_string {
                        return ChatEvent::Other;
                    }
                    return match String::from_utf8(msg.data.to_vec()) {
                        Ok(text) => ChatEvent::Text(text),
                        Err(_) => ChatEvent::Other,
                    };
                }
                Some(DataChannelEvent::OnClose) | None => return ChatEvent::Closed,
                Some(_) => {}
            }
        }
    }

    /// Sends unless the channel's send buffer is full, in which case the line is dropped: a
    /// participant that does not read its chat must not hold up the others.
    pub async fn try_send(&self, text: &str) -> bool {
        self.0.try_send_text(text).await.is_ok()
    }
}

/// Turns library callbacks into [`PeerEvent`]s.
pub(super) struct Handler {
    events: mpsc::UnboundedSender<PeerEvent>,
}

impl Handler {
    pub(super) fn new(events: mpsc::UnboundedSender<PeerEvent>) -> Self {
        Handler { events }
    }
}

fn codec_kind(kind: RtpCodecKind) -> Option<MediaKind> {
    match kind {
        RtpCodecKind::Audio => Some(MediaKind::Audio),
        RtpCodecKind::Video => Some(MediaKind::Video),
        _ => None,
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                let _ = self.events.send(PeerEvent::LocalCandidate(IceCandidate {
                    candidate: init.candidate,
                    sdp_mid: init.sdp_mid,
                    sdp_mline_index: init.sdp_mline_index,
                    username_fragment: init.username_fragment,
                }));
            }
            Err(e) => tracing::warn!("local candidate not serializable: {e}"),
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "peer connection state");
        let event = match state {
            RTCPeerConnectionState::Connected => PeerEvent::Connected,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => PeerEvent::Failed,
            _ => return,
        };
        let _ = self.events.send(event);
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        match channel.label().await {
            Ok(label) if label == "chat" => {
                let _ = self.events.send(PeerEvent::Chat(ChatChannel(channel)));
            }
            Ok(label) => tracing::debug!(label, "ignoring data channel"),
            Err(e) => tracing::debug!("data channel without label: {e}"),
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(kind) = codec_kind(track.kind().await) else {
            return;
        };
        // Describing the track may mean waiting for its first packet, which must not hold up
        // the connection's driver that runs this callback.
        let events = self.events.clone();
        tokio::spawn(async move {
            if let Some(published) = describe_track(track, kind).await {
                let _ = events.send(PeerEvent::Track(published));
            }
        });
    }
}

/// How long a new remote track may take to send its first packet before it is given up on.
const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The SSRC and codec of a new remote track, as far as the track itself knows them.
/// webrtc-rs sometimes announces a track before it has resolved them (the codec is resolved
/// from the first packet's payload type, the SSRC comes from that packet when the SDP names
/// none), and the track object keeps what it knew at that moment. Then wait for the first
/// packet and leave the codec to [`Peer::complete_track`], which looks its payload type up in
/// the negotiated parameters. The packet itself is dropped: no subscriber can be attached yet.
async fn describe_track(track: Arc<dyn TrackRemote>, kind: MediaKind) -> Option<PublishedTrack> {
    let known = |codec: Option<RTCRtpCodec>| codec.filter(|c| !c.mime_type.is_empty());
    let mut ssrc = track.ssrcs().await.first().copied();
    let mut codec = match ssrc {
        Some(ssrc) => known(track.codec(ssrc).await),
        None => None,
    };
    let mut first_payload_type = None;
    if codec.is_none() {
        let first = tokio::time::timeout(FIRST_PACKET_TIMEOUT, async {
            loop {
                match track.poll().await {
                    Some(TrackRemoteEvent::OnRtpPacket(packet)) => return Some(packet.header),
                    Some(TrackRemoteEvent::OnEnded) | None => return None,
                    Some(_) => {}
                }
            }
        })
        .await;
        let Ok(Some(header)) = first else {
            tracing::warn!(?kind, "remote track ended or sent nothing, not published");
            return None;
        };
        ssrc = Some(header.ssrc);
        first_payload_type = Some(header.payload_type);
        codec = known(track.codec(header.ssrc).await);
    }
    let ssrc = ssrc?;
    let codec = codec.map_or_else(TrackCodec::default, |c| TrackCodec {
        mime_type: c.mime_type,
        clock_rate: c.clock_rate,
        channels: c.channels,
        sdp_fmtp_line: c.sdp_fmtp_line,
    });
    Some(PublishedTrack {
        stream_id: track.stream_id().await.to_string(),
        remote_track_id: track.track_id().await.to_string(),
        track,
        kind,
        codec,
        first_payload_type,
        ssrc,
    })
}

/// What became of a client's offer.
#[derive(Debug)]
pub enum RemoteOfferOutcome {
    /// Applied; send this answer.
    Answer(String),
    /// Collided with the server's own outstanding offer; the server (impolite) ignores it and
    /// the client rolls back.
    IgnoredForGlare,
}

struct Subscription {
    sender: Arc<dyn RtpSender>,
    local: Arc<TrackLocalStaticRTP>,
    codec: TrackCodec,
    ssrc: u32,
    forwarder: mpsc::Sender<ForwarderCommand>,
    /// The writer task, once negotiation made the subscription live.
    writer: Option<JoinHandle<()>>,
    /// Part of an offer the server sent: once that offer is answered, the track can go live.
    /// A subscription added while an offer was outstanding waits for the next one.
    offered: bool,
}

/// A track this participant publishes, and the task forwarding it.
struct Publisher {
    /// The remote track's id (msid track id), to find its transceiver after renegotiation.
    remote_track_id: String,
    /// Ends the task normally (it then unpublishes); dropped when the task is aborted instead.
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// A participant's server-side peer connection.
pub struct Peer {
    participant: ParticipantId,
    pc: Arc<dyn PeerConnection>,
    metrics: Arc<Metrics>,
    downtrack_queue: usize,
    /// When the server sent the offer it waits an answer for.
    awaiting_answer_since: Option<Instant>,
    /// Tracks were added or removed since the last offer.
    negotiation_needed: bool,
    /// The client's first offer was applied: before it, there is nothing to renegotiate.
    established: bool,
    subscriptions: HashMap<TrackId, Subscription>,
    publishers: Vec<Publisher>,
    _lease: PortLease,
    _gauge: GaugeGuard,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("participant", &self.participant)
            .field("subscriptions", &self.subscriptions.len())
            .finish()
    }
}

impl Peer {
    pub(super) fn new(
        participant: ParticipantId,
        pc: Arc<dyn PeerConnection>,
        lease: PortLease,
        metrics: Arc<Metrics>,
        downtrack_queue: usize,
    ) -> Self {
        Peer {
            participant,
            pc,
            _gauge: GaugeGuard::new(&metrics, |m| &m.peer_connections),
            metrics,
            downtrack_queue,
            awaiting_answer_since: None,
            negotiation_needed: false,
            established: false,
            subscriptions: HashMap::new(),
            publishers: Vec::new(),
            _lease: lease,
        }
    }

    /// Applies a client offer and answers it, unless it collides with the server's own offer.
    pub async fn handle_remote_offer(
        &mut self,
        sdp: String,
    ) -> Result<RemoteOfferOutcome, RtcError> {
        let offer =
            RTCSessionDescription::offer(sdp).map_err(|e| RtcError::BadSdp(e.to_string()))?;
        if self.awaiting_answer_since.is_some() {
            return Ok(RemoteOfferOutcome::IgnoredForGlare);
        }
        self.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| RtcError::BadSdp(e.to_string()))?;
        let answer = self.pc.create_answer(None).await?;
        let sdp = self.apply_local(answer).await?;
        self.established = true;
        self.stop_publishers_no_longer_received().await;
        Ok(RemoteOfferOutcome::Answer(sdp))
    }

    /// Applies the client's answer to the server's offer and starts the subscriptions it made
    /// live.
    pub async fn handle_remote_answer(&mut self, sdp: String) -> Result<(), RtcError> {
        if self.awaiting_answer_since.is_none() {
            return Err(RtcError::BadSdp(
                "answer without an outstanding offer".into(),
            ));
        }
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| RtcError::BadSdp(e.to_string()))?;
        self.pc
            .set_remote_description(answer)
            .await
            .map_err(|e| RtcError::BadSdp(e.to_string()))?;
        self.awaiting_answer_since = None;
        self.start_negotiated_subscriptions().await;
        Ok(())
    }

    pub async fn add_remote_candidate(&self, candidate: IceCandidate) -> Result<(), RtcError> {
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_mline_index,
            username_fragment: candidate.username_fragment,
            url: None,
        };
        self.pc
            .add_ice_candidate(init)
            .await
            .map_err(|e| RtcError::BadCandidate(e.to_string()))
    }

    /// Sets our offer or answer as the local description and returns its SDP (with the
    /// library's final touches) to send.
    async fn apply_local(&self, description: RTCSessionDescription) -> Result<String, RtcError> {
        self.pc.set_local_description(description).await?;
        self.pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| RtcError::BadSdp("no local description after setting it".into()))
    }

    /// An offer to send the client, if tracks changed and the connection is ready for one.
    pub async fn offer_if_needed(&mut self) -> Result<Option<String>, RtcError> {
        if !self.negotiation_needed || self.awaiting_answer_since.is_some() || !self.established {
            return Ok(None);
        }
        let offer = self.pc.create_offer(None).await?;
        let sdp = self.apply_local(offer).await?;
        self.negotiation_needed = false;
        for sub in self.subscriptions.values_mut() {
            sub.offered = true;
        }
        self.awaiting_answer_since = Some(Instant::now());
        Ok(Some(sdp))
    }

    /// Adds a send-only track carrying another participant's published track. It goes live
    /// (packets flow, a keyframe is requested) once the client answers the next offer.
    pub async fn subscribe(
        &mut self,
        track_id: &TrackId,
        stream_id: &str,
        kind: MediaKind,
        codec: &TrackCodec,
        forwarder: mpsc::Sender<ForwarderCommand>,
    ) -> Result<(), RtcError> {
        if self.subscriptions.contains_key(track_id) {
            return Ok(());
        }
        let ssrc: u32 = rand::random();
        let rtc_codec = RTCRtpCodec {
            mime_type: codec.mime_type.clone(),
            clock_rate: codec.clock_rate,
            channels: codec.channels,
            sdp_fmtp_line: codec.sdp_fmtp_line.clone(),
            rtcp_feedback: vec![],
        };
        let rtc_kind = match kind {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        };
        let (local, transceiver) = add_sendonly_track(
            self.pc.as_ref(),
            stream_id,
            track_id.as_str(),
            rtc_kind,
            rtc_codec,
            ssrc,
        )
        .await?;
        let sender = transceiver
            .sender()
            .await?
            .ok_or_else(|| RtcError::BadSdp("transceiver without a sender".into()))?;
        self.subscriptions.insert(
            track_id.clone(),
            Subscription {
                sender,
                local,
                codec: codec.clone(),
                ssrc,
                forwarder,
                writer: None,
                offered: false,
            },
        );
        self.negotiation_needed = true;
        Ok(())
    }

    /// Removes a subscribed track; the next offer takes it off the client's connection.
    pub async fn unsubscribe(&mut self, track_id: &TrackId) {
        let Some(sub) = self.subscriptions.remove(track_id) else {
            return;
        };
        if let Some(writer) = sub.writer {
            writer.abort();
        }
        let _ = sub
            .forwarder
            .try_send(ForwarderCommand::RemoveDownTrack(self.participant.clone()));
        if let Err(e) = self.pc.remove_track(&sub.sender).await {
            tracing::debug!(%track_id, "remove_track: {e}");
        }
        self.negotiation_needed = true;
    }

    /// Whether the server's offer has waited longer than `limit` for an answer.
    pub fn answer_overdue(&self, now: Instant, limit: Duration) -> bool {
        self.awaiting_answer_since
            .is_some_and(|since| now.saturating_duration_since(since) > limit)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Starts forwarding to every subscription the last negotiation made live.
    async fn start_negotiated_subscriptions(&mut self) {
        for (track_id, sub) in self.subscriptions.iter_mut() {
            if sub.writer.is_some() || !sub.offered {
                continue;
            }
            let payload_type = match sub.sender.get_parameters().await {
                Ok(params) => negotiated_payload_type(
                    &sub.codec,
                    params.rtp_parameters.codecs.iter().map(|c| {
                        (
                            c.rtp_codec.mime_type.as_str(),
                            c.rtp_codec.sdp_fmtp_line.as_str(),
                            c.payload_type,
                        )
                    }),
                ),
                Err(e) => {
                    tracing::warn!(%track_id, "sender parameters: {e}");
                    None
                }
            };
            let Some(payload_type) = payload_type else {
                tracing::warn!(%track_id, codec = %sub.codec.mime_type, "subscriber did not accept the codec");
                continue;
            };
            let rewriter = Rewriter::new(sub.ssrc, payload_type, rand::random(), rand::random());
            let (downtrack, queue) =
                DownTrack::new(self.participant.clone(), rewriter, self.downtrack_queue);
            if sub
                .forwarder
                .send(ForwarderCommand::AddDownTrack(downtrack))
                .await
                .is_err()
            {
                // The publisher is gone; its unpublish event will remove this subscription.
                continue;
            }
            sub.writer = Some(tokio::spawn(run_downtrack(
                sub.local.clone(),
                queue,
                sub.forwarder.clone(),
                self.metrics.clone(),
            )));
        }
    }

    /// Fills in the codec of a remote track announced before webrtc-rs knew it, from the
    /// payload type of its first packet and the parameters this connection negotiated.
    /// False if it cannot be found.
    pub async fn complete_track(&self, track: &mut PublishedTrack) -> bool {
        if !track.codec.mime_type.is_empty() {
            return true;
        }
        let Some(payload_type) = track.first_payload_type else {
            return false;
        };
        for receiver in self.pc.get_receivers().await {
            let Ok(params) = receiver.get_parameters().await else {
                continue;
            };
            if let Some(c) = params
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.payload_type == payload_type)
            {
                track.codec = TrackCodec {
                    mime_type: c.rtp_codec.mime_type.clone(),
                    clock_rate: c.rtp_codec.clock_rate,
                    channels: c.rtp_codec.channels,
                    sdp_fmtp_line: c.rtp_codec.sdp_fmtp_line.clone(),
                };
                return true;
            }
        }
        false
    }

    /// Remembers a publisher task: `stop` ends it when the client stops sending the track,
    /// closing the peer aborts it.
    pub fn adopt_publisher(
        &mut self,
        track: &PublishedTrack,
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    ) {
        self.publishers.retain(|p| !p.task.is_finished());
        self.publishers.push(Publisher {
            remote_track_id: track.remote_track_id.clone(),
            stop: Some(stop),
            task,
        });
    }

    /// A client that stops sending a track (ends a screen share) renegotiates its transceiver
    /// to `recvonly`/`inactive`; webrtc-rs raises no event for that, so look after each offer.
    async fn stop_publishers_no_longer_received(&mut self) {
        if self.publishers.is_empty() {
            return;
        }
        for transceiver in self.pc.get_transceivers().await {
            let stopped_receiving = matches!(
                transceiver.current_direction().await,
                Ok(RTCRtpTransceiverDirection::Inactive | RTCRtpTransceiverDirection::Sendonly)
            );
            if !stopped_receiving {
                continue;
            }
            let Ok(Some(receiver)) = transceiver.receiver().await else {
                continue;
            };
            let track_id = receiver.track().track_id().await.to_string();
            for publisher in &mut self.publishers {
                if publisher.remote_track_id == track_id
                    && let Some(stop) = publisher.stop.take()
                {
                    tracing::info!(participant = %self.participant, track_id, "client stopped sending a track");
                    let _ = stop.send(());
                }
            }
        }
    }

    /// Ends everything this connection runs: writers, publisher readers, the connection itself.
    pub async fn close(mut self) {
        for (_, sub) in self.subscriptions.drain() {
            if let Some(writer) = sub.writer {
                writer.abort();
            }
            let _ = sub
                .forwarder
                .try_send(ForwarderCommand::RemoveDownTrack(self.participant.clone()));
        }
        for publisher in self.publishers.drain(..) {
            publisher.task.abort();
        }
        if let Err(e) = self.pc.close().await {
            tracing::debug!("closing peer connection: {e}");
        }
    }
}

/// The payload type the subscriber's connection negotiated for `codec`: same MIME type, and
/// for codecs with parameters (H.264 profiles) the same fmtp line where one matches.
fn negotiated_payload_type<'a>(
    codec: &TrackCodec,
    negotiated: impl Iterator<Item = (&'a str, &'a str, u8)>,
) -> Option<u8> {
    let mut by_mime = None;
    for (mime, fmtp, pt) in negotiated {
        if mime.eq_ignore_ascii_case(&codec.mime_type) {
            if fmtp == codec.sdp_fmtp_line {
                return Some(pt);
            }
            by_mime.get_or_insert(pt);
        }
    }
    by_mime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_type_prefers_exact_fmtp() {
        let codec = TrackCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: "profile-level-id=42e01f;packetization-mode=1".into(),
        };
        let list = [
            ("video/VP8", "", 96),
            (
                "video/h264",
                "profile-level-id=42001f;packetization-mode=0",
                102,
            ),
            (
                "video/H264",
                "profile-level-id=42e01f;packetization-mode=1",
                106,
            ),
        ];
        assert_eq!(
            negotiated_payload_type(&codec, list.iter().copied()),
            Some(106)
        );
        assert_eq!(
            negotiated_payload_type(&codec, list[..2].iter().copied()),
            Some(102)
        );
        assert_eq!(
            negotiated_payload_type(&codec, list[..1].iter().copied()),
            None
        );
    }
}
