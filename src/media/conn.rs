//! One participant's connection on its worker: the str0m `Rtc`, the negotiation (the server is
//! the impolite peer of perfect negotiation), what the participant publishes (by m-line) and
//! what it is subscribed to (one send-only m-line per subscribed track, stopped when the track
//! goes: str0m 0.25 does not recycle stopped m-lines in its own offers).
//!
//! Owned by the worker's event loop; nothing here touches sockets or other connections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use str0m::Rtc;
use str0m::bwe::Bitrate;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, Mid, Rid, Rids};
use str0m::rtp::Ssrc;
use tokio::sync::mpsc;

use super::codec::{in_client_order, media_sections, negotiates_twcc, str0m_kind};
use super::worker::RTX_CACHE_VIDEO;
use super::{MediaError, MediaEvent, OfferOutcome, Subscribing, Subscription};
use crate::forward::{LayerChoice, PauseCause, Priority, Rewriter, TrackKey};
use crate::metrics::{GaugeGuard, Metrics};
use crate::types::{MediaKind, ParticipantId, TrackCodec};

/// A track the participant sends, by the m-line it arrives on.
#[derive(Debug)]
pub enum Inbound {
    /// Negotiated; its codec is known from the first packet.
    AwaitingFirstPacket(MediaKind),
    /// Announced to the session, which has not published it yet.
    Announced(TrackCodec, Layers, RedPt),
    /// Published: packets go to the forwarder of this key.
    Published(TrackKey, Layers, RedPt),
}

/// The payload type under which the publisher may wrap the track's codec in RFC 2198 RED.
pub type RedPt = Option<u8>;

/// A track's simulcast layers: the rids it is sent with, lowest resolution first (empty for a
/// track sent as one stream).
pub type Layers = Arc<[Rid]>;

/// Rid ladders whose order is known, lowest first; other rids keep their SDP order (browsers
/// list encodings lowest first by convention).
const RID_LADDERS: [[&str; 3]; 3] = [["q", "h", "f"], ["l", "m", "h"], ["0", "1", "2"]];

/// The layers an m-line's rids describe, lowest first.
pub fn layers_of(rids: &Rids) -> Layers {
    let Rids::Specific(rids) = rids else {
        return Arc::from([]);
    };
    let mut rids = rids.clone();
    if let Some(ladder) = RID_LADDERS
        .iter()
        .find(|ladder| rids.iter().all(|r| ladder.iter().any(|l| **r == **l)))
    {
        rids.sort_by_key(|r| ladder.iter().position(|l| **r == **l));
    }
    rids.into()
}

/// The layer a packet belongs to: its rid's place (0 without simulcast), None for a rid the
/// track was not negotiated with.
pub fn layer_of(layers: &[Rid], rid: Option<Rid>) -> Option<u8> {
    match rid {
        _ if layers.is_empty() => Some(0),
        Some(rid) => layers.iter().position(|r| *r == rid).map(|i| i as u8),
        None => None,
    }
}

/// Where a subscribed track's m-line is in the offer/answer cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// Waiting for the next server offer.
    ToOpen,
    /// In the outstanding server offer.
    Negotiating(Mid),
    /// Negotiated: packets may flow once the connection is up.
    Open(Mid),
    /// Unsubscribed: the next offer stops the m-line.
    ToStop(Mid),
    /// Stopped in the outstanding offer; gone once it is answered.
    NegotiatingStop(Mid),
}

/// How old a packet may be and still be resent on a NACK (str0m's default).
const RTX_CACHE_AGE: std::time::Duration = std::time::Duration::from_secs(3);
/// The most of a subscriber's video bytes that may be resends before queued resends are dropped.
/// str0m's default, 15 %, is reached at about 10 % loss each way (each lost packet resent, some
/// twice, plus what reordering makes receivers NACK needlessly), and repairs then stop just when
/// they are needed; 30 % still cuts off a receiver that NACKs without end.
const RTX_RATIO_CAP: f32 = 0.30;

#[derive(Debug)]
pub struct Outbound {
    pub sub: Subscription,
    pub state: OutState,
    /// Set while a downtrack forwards to this m-line.
    pub live: Option<LiveDownTrack>,
    /// Video: the layer chosen for this subscriber, and what it is chosen from.
    pub choice: LayerChoice,
    /// Whether it goes first in the subscriber's downlink (an active speaker's video).
    pub speaking: bool,
}

impl Outbound {
    pub fn priority(&self) -> Priority {
        if self.speaking || self.sub.screen {
            Priority::High
        } else {
            Priority::Normal
        }
    }
}

/// A subscription packets flow to: the SSRC of its send stream (a hash lookup on the packet
/// path, where the m-line would be a scan over the connection's streams).
#[derive(Debug)]
pub struct LiveDownTrack {
    pub ssrc: Ssrc,
    /// The layer and pause cause last told to the session.
    pub reported: Option<(Option<u8>, Option<PauseCause>)>,
    /// Raises the paused gauge of its cause while paused.
    pub paused: Option<GaugeGuard>,
    _gauge: GaugeGuard,
}

impl LiveDownTrack {
    pub fn new(ssrc: Ssrc, metrics: &Arc<Metrics>) -> Self {
        LiveDownTrack {
            ssrc,
            reported: None,
            paused: None,
            _gauge: GaugeGuard::new(metrics, |m| &m.downtracks),
        }
    }
}

/// The pacing estimate of a connection that gives no congestion feedback: no limit.
const UNESTIMATED: Bitrate = Bitrate::gbps(100);

pub struct Conn {
    pub participant: ParticipantId,
    pub rtc: Rtc,
    /// The server's ICE username fragment for this connection (new after an ICE restart).
    pub ufrag: String,
    pub events: mpsc::UnboundedSender<MediaEvent>,
    pub chat_in: mpsc::Sender<String>,
    /// ICE and DTLS are up: SRTP can be sent.
    pub connected: bool,
    /// A failure was reported; the session will close the connection.
    pub failed: bool,
    /// Since when ICE has been disconnected (None: it is not).
    pub ice_lost_since: Option<Instant>,
    /// The earliest wake-up of this connection in the worker's timer heap.
    pub scheduled: Option<Instant>,
    /// Written to since the last send: listed in the worker's dirty list.
    pub dirty: bool,
    /// The engine's estimate of the subscriber's downlink, bits per second (None: no
    /// estimate, e.g. a client without transport-wide congestion control).
    pub estimate: Option<u64>,
    /// When the estimate last changed, and when the estimator was last restarted because it
    /// stalled below what the subscriber's videos need (`Worker::allocate_layers`).
    pub estimate_changed_at: Option<Instant>,
    pub estimator_restarted_at: Option<Instant>,
    pub chat: Option<ChannelId>,
    pub inbound: HashMap<Mid, Inbound>,
    pub outbound: Vec<Outbound>,
    /// Whether the client negotiated transport-wide congestion control (None: no audio or
    /// video m-line negotiated yet). Its downlink estimate counts only if it did.
    pub twcc: Option<bool>,
    /// The m-lines on which the client's last SDP listed RED audio.
    pub red_accepted: HashSet<Mid>,
    /// Payload types of each m-line in the order the client last listed them: the server's
    /// descriptions follow it, so the client sends with the codec it prefers.
    client_pt_order: HashMap<String, Vec<String>>,
    subscribing: Subscribing,
    /// The m-lines the client offered to receive on (`Subscribing::IntoClientOffer`).
    receive_slots: Vec<(Mid, MediaKind)>,
    /// The rewriters of downtracks that left a client's m-line, by its send stream: the next
    /// track on it continues their sequence numbers (`Subscribing::IntoClientOffer`).
    pub parked_rewriters: HashMap<Ssrc, Rewriter>,
    /// The client's ICE username fragment, from its last SDP (keepalive indications become
    /// requests named with it: `keepalive`).
    pub remote_ufrag: Option<String>,
    /// The transaction of the last such request: the engine's answer to it is not sent.
    pub liveness_transaction: Option<[u8; 12]>,
    pending_offer: Option<SdpPendingOffer>,
    /// The client's first offer was applied: before it there is nothing to renegotiate.
    established: bool,
    _gauge: GaugeGuard,
}

impl Conn {
    pub fn new(
        participant: ParticipantId,
        subscribing: Subscribing,
        rtc: Rtc,
        ufrag: String,
        events: mpsc::UnboundedSender<MediaEvent>,
        chat_in: mpsc::Sender<String>,
        gauge: GaugeGuard,
    ) -> Self {
        Conn {
            participant,
            rtc,
            ufrag,
            events,
            chat_in,
            connected: false,
            failed: false,
            ice_lost_since: None,
            scheduled: None,
            dirty: false,
            estimate: None,
            estimate_changed_at: None,
            estimator_restarted_at: None,
            chat: None,
            inbound: HashMap::new(),
            outbound: Vec::new(),
            twcc: None,
            red_accepted: HashSet::new(),
            client_pt_order: HashMap::new(),
            subscribing,
            receive_slots: Vec::new(),
            parked_rewriters: HashMap::new(),
            remote_ufrag: None,
            liveness_transaction: None,
            pending_offer: None,
            established: false,
            _gauge: gauge,
        }
    }

    /// What the client's SDP, once applied, says about RED and congestion control.
    fn note_remote_sdp(&mut self, sdp: &str) {
        if let Some(ufrag) = sdp
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        {
            self.remote_ufrag = Some(ufrag.to_owned());
        }
        if self.twcc.is_none() {
            self.twcc = negotiates_twcc(sdp);
            if self.twcc == Some(false) {
                // Without feedback the estimate would stay at its start value for good, and
                // the engine's pacer would hold this connection's media to it, queueing the
                // rest: lift it out of the way.
                self.rtc.bwe().reset(UNESTIMATED);
            }
        }
        for section in media_sections(sdp) {
            let mid = Mid::from(section.mid.as_str());
            if section.red {
                self.red_accepted.insert(mid);
            } else {
                self.red_accepted.remove(&mid);
            }
            if self.subscribing == Subscribing::IntoClientOffer
                && section.client_receives
                && !self.receive_slots.iter().any(|(m, _)| *m == mid)
            {
                self.receive_slots.push((mid, section.kind));
            }
            self.client_pt_order.insert(section.mid, section.pts);
        }
        self.bind_receive_slots();
    }

    /// Applies a client offer and answers it, unless it collides with the server's own offer.
    pub fn remote_offer(&mut self, sdp: &str) -> Result<OfferOutcome, MediaError> {
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::BadSdp(e.to_string()))?;
        if self.pending_offer.is_some() {
            return Ok(OfferOutcome::IgnoredForGlare);
        }
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::BadSdp(e.to_string()))?;
        self.note_remote_sdp(sdp);
        self.established = true;
        Ok(OfferOutcome::Answer(in_client_order(
            &answer.to_sdp_string(),
            &self.client_pt_order,
        )))
    }

    /// Applies the client's answer to the server's offer. Returns true if m-lines opened.
    pub fn remote_answer(&mut self, sdp: &str) -> Result<bool, MediaError> {
        let Some(pending) = self.pending_offer.take() else {
            return Err(MediaError::BadSdp(
                "answer without an outstanding offer".into(),
            ));
        };
        let accepted = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| MediaError::BadSdp(e.to_string()))
            .and_then(|answer| {
                self.rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| MediaError::BadSdp(e.to_string()))
            });
        if accepted.is_ok() {
            self.note_remote_sdp(sdp);
        }
        let mut opened = false;
        for out in &mut self.outbound {
            out.state = match (out.state, accepted.is_ok()) {
                (OutState::Negotiating(mid), true) => {
                    opened = true;
                    if out.sub.kind == MediaKind::Video
                        && let Some(tx) = self.rtc.direct_api().stream_tx_by_mid(mid, None)
                    {
                        tx.set_rtx_cache(RTX_CACHE_VIDEO, RTX_CACHE_AGE, Some(RTX_RATIO_CAP));
                    }
                    OutState::Open(mid)
                }
                // The offer is void: offer again what it carried.
                (OutState::Negotiating(_), false) => OutState::ToOpen,
                (OutState::NegotiatingStop(mid), false) => OutState::ToStop(mid),
                (state, _) => state,
            };
        }
        if accepted.is_ok() {
            self.outbound
                .retain(|o| !matches!(o.state, OutState::NegotiatingStop(_)));
        }
        accepted.map(|()| opened)
    }

    /// Whether a send stream goes on after its track leaves, to carry another.
    pub fn reuses_send_streams(&self) -> bool {
        self.subscribing == Subscribing::IntoClientOffer
    }

    /// Subscriptions waiting for an m-line take the client's free receiving m-lines of their
    /// kind (`Subscribing::IntoClientOffer`).
    fn bind_receive_slots(&mut self) {
        for i in 0..self.outbound.len() {
            if self.outbound[i].state != OutState::ToOpen {
                continue;
            }
            let kind = self.outbound[i].sub.kind;
            let free = self.receive_slots.iter().find(|(mid, k)| {
                *k == kind
                    && !self
                        .outbound
                        .iter()
                        .any(|o| o.state == OutState::Open(*mid))
            });
            if let Some(&(mid, _)) = free {
                self.outbound[i].state = OutState::Open(mid);
            }
        }
    }

    /// An offer for the client when subscriptions changed and nothing else is outstanding.
    pub fn offer_if_needed(&mut self) -> Option<String> {
        if !self.established
            || self.pending_offer.is_some()
            || self.subscribing == Subscribing::IntoClientOffer
        {
            return None;
        }
        let mut api = self.rtc.sdp_api();
        let mut touched = Vec::new();
        for (i, out) in self.outbound.iter().enumerate() {
            match out.state {
                OutState::ToOpen => {
                    let mid = api.add_media(
                        str0m_kind(out.sub.kind),
                        Direction::SendOnly,
                        Some(out.sub.stream_id.clone()),
                        Some(out.sub.track_id.to_string()),
                        None,
                    );
                    touched.push((i, OutState::Negotiating(mid)));
                }
                OutState::ToStop(mid) => {
                    api.stop_media(mid);
                    touched.push((i, OutState::NegotiatingStop(mid)));
                }
                _ => {}
            }
        }
        if !api.has_changes() {
            return None;
        }
        let (offer, pending) = api.apply()?;
        for (i, state) in touched {
            self.outbound[i].state = state;
        }
        self.pending_offer = Some(pending);
        Some(in_client_order(
            &offer.to_sdp_string(),
            &self.client_pt_order,
        ))
    }

    /// Adds a subscription; the next offer carries it.
    pub fn subscribe(&mut self, sub: Subscription) {
        if self
            .outbound
            .iter()
            .any(|o| o.sub.route.key == sub.route.key)
        {
            return;
        }
        self.outbound.push(Outbound {
            sub,
            state: OutState::ToOpen,
            live: None,
            choice: LayerChoice::default(),
            speaking: false,
        });
        self.bind_receive_slots();
    }

    /// Ends a subscription; returns its send stream's SSRC if a downtrack was forwarding to it.
    pub fn unsubscribe(&mut self, key: TrackKey) -> Option<Ssrc> {
        let i = self.outbound.iter().position(|o| o.sub.route.key == key)?;
        let out = &mut self.outbound[i];
        let live = out.live.take().map(|l| l.ssrc);
        match out.state {
            OutState::ToOpen => {
                self.outbound.remove(i);
            }
            // The client's m-line stays; the next track of its kind takes it.
            OutState::Open(_) if self.subscribing == Subscribing::IntoClientOffer => {
                self.outbound.remove(i);
                self.bind_receive_slots();
            }
            OutState::Negotiating(mid) | OutState::Open(mid) => out.state = OutState::ToStop(mid),
            OutState::ToStop(_) | OutState::NegotiatingStop(_) => {}
        }
        live
    }

    /// The subscription sending on `mid`, if it is open.
    pub fn outbound_on(&self, mid: Mid) -> Option<&Outbound> {
        self.outbound
            .iter()
            .find(|o| o.state == OutState::Open(mid))
    }

    pub fn emit(&self, event: MediaEvent) {
        // The session is gone only while it closes this connection: nothing left to tell.
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rids(names: &[&str]) -> Rids {
        Rids::Specific(names.iter().map(|n| Rid::from(*n)).collect())
    }

    fn names(layers: &Layers) -> Vec<String> {
        layers.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn rids_are_ordered_lowest_first() {
        assert_eq!(names(&layers_of(&rids(&["f", "h", "q"]))), ["q", "h", "f"]);
        assert_eq!(names(&layers_of(&rids(&["h", "l", "m"]))), ["l", "m", "h"]);
        assert_eq!(names(&layers_of(&rids(&["a", "c", "b"]))), ["a", "c", "b"]);
        assert!(layers_of(&Rids::Any).is_empty());
        let layers = layers_of(&rids(&["q", "h"]));
        assert_eq!(layer_of(&layers, Some(Rid::from("h"))), Some(1));
        assert_eq!(layer_of(&layers, Some(Rid::from("x"))), None);
        assert_eq!(layer_of(&layers, None), None);
        assert_eq!(layer_of(&[], None), Some(0));
    }
}
