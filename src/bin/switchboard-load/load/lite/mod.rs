//! "Lite" receive-only subscribers: the real signaling protocol (one small tokio task per
//! receiver, on its own WebSocket) and a cheap media path on str0m, all receivers' media on one
//! thread and one UDP socket ([`engine`], whose header says what a lite receiver does and does
//! not do compared with a browser). They exist so the generator's receivers cost less per packet
//! than the server spends forwarding it; publishers stay webrtc-rs [`switchboard::client::Client`]s.
//!
//! A receiver joins with protocol 2. Given a tile size, it reports it (`track-settings`) for
//! every video track it is told of (`joined.tracks`, `track-published`), so the server forwards
//! the simulcast layer that covers the tile; without one it reports nothing, and since it
//! negotiates no transport-cc the server has no bandwidth estimate for it and forwards the top
//! layer. Other messages it does not need (subscription state, participants) are ignored.

pub mod engine;
pub mod publisher;
pub mod rtp;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::client::wait_for_joined;
use switchboard::signal::protocol::{
    ClientMessage, ErrorCode, IceCandidate, MediaKind, PROTOCOL_VERSION, RoomMode, ServerMessage,
    TrackInfo,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use engine::LAYERS;
pub use engine::{Engine, OfferShape, ReceiverShared};

use super::Tile;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long `close` waits for the server's `left`.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive `ping` on the signaling socket.
const PING_PERIOD: Duration = Duration::from_secs(15);

/// One track's counters, as the run reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackSnapshot {
    pub track_id: String,
    pub stream_id: String,
    pub kind: MediaKind,
    /// Distinct packets received (sequence numbers), damaged ones included.
    pub received: u64,
    /// Received and not found damaged (only decrypted packets can be checked).
    pub intact: u64,
    pub bad: u64,
    pub bytes: u64,
    /// Extended RTP sequence numbers, lowest and highest received.
    pub first_seq: u64,
    pub max_seq: u64,
    pub duplicates: u64,
    pub decrypted: u64,
    /// Whether the first decrypted packet was labelled a key frame.
    pub first_packet_key: Option<bool>,
    /// Decrypted intact packets by the simulcast layer their payload says they were sent on
    /// (0: the lowest, or the only one; the last also counts any higher).
    pub decrypted_by_layer: [u64; LAYERS],
}

enum Control {
    Leave(oneshot::Sender<()>),
}

/// How a participant that signals by some other protocol (WHEP, Janus) leaves: the
/// signaling side of its [`Receiver`] or lite publisher.
#[async_trait::async_trait]
pub trait Hangup: Send + Sync {
    /// Ends the session at the server; true if the server confirmed it.
    async fn hangup(&self) -> bool;
}

/// A receive-only participant on the [`Engine`].
pub struct Receiver {
    participant_id: String,
    id: usize,
    shared: Arc<ReceiverShared>,
    signaling: Arc<Signaling>,
    engine: Arc<Engine>,
    link: Link,
}

/// The receiver's signaling.
enum Link {
    /// Switchboard's WebSocket protocol, run by a task.
    Switchboard {
        control: mpsc::Sender<Control>,
        task: Option<JoinHandle<()>>,
    },
    /// Another protocol, whose exchange is over (the caller did it).
    External(Box<dyn Hangup>),
}

/// What the signaling task records.
#[derive(Debug, Default)]
struct Signaling {
    socket_closed: std::sync::atomic::AtomicBool,
    left: std::sync::atomic::AtomicBool,
    /// The last few `error` messages (code: message).
    errors: std::sync::Mutex<Vec<String>>,
}

impl Signaling {
    fn error(&self, text: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() >= 8 {
            errors.remove(0);
        }
        errors.push(text);
    }
}

impl Receiver {
    /// Opens the socket, joins `room`, reports `tile` for the room's video tracks (if given),
    /// makes the first offer (a `chat` data channel, as the browser client does) and trickles
    /// its one candidate. Returns once the offer went out.
    pub async fn connect(
        engine: &Arc<Engine>,
        ws_url: &str,
        room: &str,
        name: &str,
        join_timeout: Duration,
        tile: Option<Tile>,
    ) -> anyhow::Result<Receiver> {
        let (socket, _) =
            tokio::time::timeout(join_timeout, tokio_tungstenite::connect_async(ws_url))
                .await
                .map_err(|_| anyhow!("connecting to {ws_url} timed out"))?
                .with_context(|| format!("connecting to {ws_url}"))?;
        let (mut sink, mut stream) = socket.split();
        send(
            &mut sink,
            &ClientMessage::Join {
                room: room.to_owned(),
                name: name.to_owned(),
                mode: Some(RoomMode::Sfu),
                protocol: Some(PROTOCOL_VERSION),
                // Load runs target servers in development mode (no API keys).
                token: None,
            },
        )
        .await?;
        let (joined, early) = wait_for_joined(&mut stream, join_timeout).await?;
        let ServerMessage::Joined {
            participant_id,
            mode,
            tracks,
            ..
        } = joined
        else {
            bail!("the server answered join with something else");
        };
        if mode != RoomMode::Sfu {
            bail!("the room is a mesh room: lite receivers need SFU");
        }
        for track in &tracks {
            report_tile(&mut sink, tile, track).await?;
        }

        let shared = Arc::new(ReceiverShared::default());
        let opened = engine.open(shared.clone(), OfferShape::Chat).await?;
        let offer = opened.offer.context("the lite engine made no offer")?;
        send(
            &mut sink,
            &ClientMessage::Offer {
                sdp: offer.clone(),
                to: None,
            },
        )
        .await?;
        let sdp_mid = offer
            .lines()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .map(|m| m.trim().to_owned());
        for candidate in [
            Some(IceCandidate {
                candidate: opened.candidate.clone(),
                sdp_mid,
                sdp_mline_index: Some(0),
                ..Default::default()
            }),
            None,
        ] {
            send(
                &mut sink,
                &ClientMessage::Candidate {
                    candidate,
                    to: None,
                },
            )
            .await?;
        }

        let signaling = Arc::new(Signaling::default());
        let (control, control_rx) = mpsc::channel(1);
        let task = tokio::spawn(run_signaling(
            sink,
            stream,
            early,
            ReceiverContext {
                engine: engine.clone(),
                id: opened.id,
                signaling: signaling.clone(),
                tile,
            },
            control_rx,
        ));
        Ok(Receiver {
            participant_id,
            id: opened.id,
            shared,
            signaling,
            engine: engine.clone(),
            link: Link::Switchboard {
                control,
                task: Some(task),
            },
        })
    }

    /// A receiver whose connection `id` on `engine` was negotiated by another protocol;
    /// `hangup` ends its session at the server.
    pub fn external(
        engine: &Arc<Engine>,
        id: usize,
        shared: Arc<ReceiverShared>,
        name: String,
        hangup: Box<dyn Hangup>,
    ) -> Receiver {
        Receiver {
            participant_id: name,
            id,
            shared,
            signaling: Arc::default(),
            engine: engine.clone(),
            link: Link::External(hangup),
        }
    }

    pub fn participant_id(&self) -> &str {
        &self.participant_id
    }

    /// ICE and DTLS up, and neither the connection nor the socket failed.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
            && !self.shared.failed.load(Ordering::Relaxed)
            && !self.signaling.socket_closed.load(Ordering::Relaxed)
    }

    /// When the first intact media payload arrived (`payload::now_micros()`).
    pub fn first_media_us(&self) -> Option<u64> {
        let us = self.shared.first_media_us.load(Ordering::Relaxed);
        (us != 0).then_some(us)
    }

    /// SSRCs media arrived on (one per track unless something else, like RTX, came).
    pub fn ssrcs(&self) -> u64 {
        self.shared.ssrcs.load(Ordering::Relaxed)
    }

    /// The `error` messages the server sent lately.
    pub fn errors(&self) -> Vec<String> {
        self.signaling
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn tracks(&self) -> Vec<TrackSnapshot> {
        let tracks = self
            .shared
            .tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tracks
            .iter()
            .map(|t| {
                let received = t.received.load(Ordering::Relaxed);
                let bad = t.bad.load(Ordering::Relaxed);
                TrackSnapshot {
                    track_id: t.track_id.clone(),
                    stream_id: t.stream_id.clone(),
                    kind: t.kind,
                    received,
                    intact: received.saturating_sub(bad),
                    bad,
                    bytes: t.bytes.load(Ordering::Relaxed),
                    first_seq: t.first_seq.load(Ordering::Relaxed),
                    max_seq: t.max_seq.load(Ordering::Relaxed),
                    duplicates: t.duplicates.load(Ordering::Relaxed),
                    decrypted: t.decrypted.load(Ordering::Relaxed),
                    first_packet_key: match t.first_key.load(Ordering::Relaxed) {
                        0 => None,
                        label => Some(label == 1),
                    },
                    decrypted_by_layer: std::array::from_fn(|l| {
                        t.decrypted_by_layer[l].load(Ordering::Relaxed)
                    }),
                }
            })
            .collect()
    }

    /// Leaves: `leave`, the server's `left` (up to 5 s), then the connection closes (RTCP BYE,
    /// DTLS close_notify) and the socket with a close frame. True if the server answered `left`
    /// (or, for another protocol, confirmed the hang-up).
    pub async fn close(mut self) -> bool {
        match &mut self.link {
            Link::Switchboard { control, task } => {
                let (reply, done) = oneshot::channel();
                if control.send(Control::Leave(reply)).await.is_ok() {
                    let _ =
                        tokio::time::timeout(LEAVE_TIMEOUT + Duration::from_secs(2), done).await;
                }
                if let Some(task) = task.take()
                    && !task.is_finished()
                {
                    task.abort();
                    self.engine.close(self.id).await;
                }
                self.signaling.left.load(Ordering::Relaxed)
            }
            Link::External(hangup) => {
                self.engine.close(self.id).await;
                let confirmed = hangup.hangup().await;
                self.signaling.left.store(true, Ordering::Relaxed);
                confirmed
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let open = match &mut self.link {
            Link::Switchboard { task, .. } => task.take().inspect(|t| t.abort()).is_some(),
            Link::External(_) => !self.signaling.left.load(Ordering::Relaxed),
        };
        if open && !self.engine.try_close(self.id) {
            tracing::debug!(
                receiver = self.id,
                "lite engine queue full: connection left to shutdown"
            );
        }
    }
}

async fn send(
    sink: &mut SplitSink<Socket, Message>,
    message: &ClientMessage,
) -> anyhow::Result<()> {
    let text = serde_json::to_string(message)?;
    sink.send(Message::Text(text.into()))
        .await
        .context("signaling socket")
}

/// Tells the server the tile a video track is shown in (nothing without a tile, or for audio).
async fn report_tile(
    sink: &mut SplitSink<Socket, Message>,
    tile: Option<Tile>,
    track: &TrackInfo,
) -> anyhow::Result<()> {
    let Some(tile) = tile.filter(|_| track.kind == MediaKind::Video) else {
        return Ok(());
    };
    send(
        sink,
        &ClientMessage::TrackSettings {
            track_id: track.track_id.clone(),
            visible: true,
            width: Some(tile.width),
            height: Some(tile.height),
        },
    )
    .await
}

/// Keeps only the SDP's loopback candidates: test traffic stays on 127.0.0.0/8.
pub fn loopback_candidates_only(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .filter(|line| match line.trim_end().strip_prefix("a=candidate:") {
            Some(value) => candidate_is_loopback(value),
            None => true,
        })
        .collect()
}

/// Whether a candidate (`candidate:…` or its value) names a loopback address.
pub fn candidate_is_loopback(candidate: &str) -> bool {
    let value = candidate.strip_prefix("candidate:").unwrap_or(candidate);
    value
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

/// The receiver's signaling after `connect`: answers the server's offers, passes candidates on,
/// reports its tile for new video tracks, pings, and leaves when told.
async fn run_signaling(
    mut sink: SplitSink<Socket, Message>,
    mut stream: SplitStream<Socket>,
    early: Vec<ServerMessage>,
    receiver: ReceiverContext,
    mut control: mpsc::Receiver<Control>,
) {
    let (engine, id, signaling) = (
        receiver.engine.clone(),
        receiver.id,
        receiver.signaling.clone(),
    );
    for message in early {
        if let Err(e) = on_message(&mut sink, &receiver, message).await {
            tracing::debug!(receiver = id, "signaling: {e:#}");
        }
    }
    let mut ping = tokio::time::interval(PING_PERIOD);
    ping.tick().await;
    let mut leaving: Option<(oneshot::Sender<()>, tokio::time::Instant)> = None;
    loop {
        let deadline = leaving
            .as_ref()
            .map_or_else(tokio::time::Instant::now, |(_, d)| *d);
        tokio::select! {
            frame = stream.next() => {
                let message = match frame {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ServerMessage>(text.as_str()) {
                            Ok(message) => message,
                            Err(e) => {
                                signaling.error(format!("unparsable frame: {e}"));
                                continue;
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        signaling.socket_closed.store(true, Ordering::Relaxed);
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                let is_left = matches!(message, ServerMessage::Left);
                if let Err(e) = on_message(&mut sink, &receiver, message).await {
                    tracing::debug!(receiver = id, "signaling: {e:#}");
                }
                if is_left && leaving.is_some() {
                    break;
                }
            }
            command = control.recv(), if leaving.is_none() => match command {
                Some(Control::Leave(reply)) => {
                    if send(&mut sink, &ClientMessage::Leave).await.is_err() {
                        let _ = reply.send(());
                        engine.close(id).await;
                        return;
                    }
                    leaving = Some((reply, tokio::time::Instant::now() + LEAVE_TIMEOUT));
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline), if leaving.is_some() => {
                tracing::debug!(receiver = id, "no `left` within {LEAVE_TIMEOUT:?}");
                break;
            }
            _ = ping.tick(), if leaving.is_none() => {
                if send(&mut sink, &ClientMessage::Ping).await.is_err() {
                    signaling.socket_closed.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    engine.close(id).await;
    if !signaling.socket_closed.load(Ordering::Relaxed) {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "leaving".into(),
            })))
            .await;
        let _ = sink.close().await;
    }
    if let Some((reply, _)) = leaving {
        let _ = reply.send(());
    }
}

/// What the signaling task knows of its receiver.
struct ReceiverContext {
    engine: Arc<Engine>,
    id: usize,
    signaling: Arc<Signaling>,
    /// Reported for every video track (None: nothing reported).
    tile: Option<Tile>,
}

async fn on_message(
    sink: &mut SplitSink<Socket, Message>,
    receiver: &ReceiverContext,
    message: ServerMessage,
) -> anyhow::Result<()> {
    let ReceiverContext {
        engine,
        id,
        signaling,
        tile,
    } = receiver;
    let (id, tile) = (*id, *tile);
    match message {
        ServerMessage::Offer { sdp, from: None } => {
            let answer = engine
                .remote_offer(id, loopback_candidates_only(&sdp))
                .await?;
            send(
                sink,
                &ClientMessage::Answer {
                    sdp: answer,
                    to: None,
                },
            )
            .await?;
        }
        ServerMessage::Answer { sdp, from: None } => {
            engine
                .remote_answer(id, loopback_candidates_only(&sdp))
                .await?;
        }
        ServerMessage::Candidate {
            candidate: Some(c),
            from: None,
        } if candidate_is_loopback(&c.candidate) => {
            engine.remote_candidate(id, c.candidate).await;
        }
        ServerMessage::TrackPublished { track } => report_tile(sink, tile, &track).await?,
        ServerMessage::Left => signaling.left.store(true, Ordering::Relaxed),
        ServerMessage::Error { code, message } => {
            if matches!(
                code,
                ErrorCode::ConnectionFailed | ErrorCode::NegotiationTimeout
            ) {
                signaling.socket_closed.store(true, Ordering::Relaxed);
            }
            signaling.error(format!("{code:?}: {message}"));
        }
        // Non-loopback candidates, unpublished tracks, participant announcements, subscription
        // states, pongs, mesh relays: nothing to do.
        _ => {}
    }
    Ok(())
}
