//! A synthetic participant: joins a room over the signaling WebSocket, publishes synthetic RTP
//! (Opus-labelled audio, VP8-labelled video) with a self-checking [`payload`] format, receives
//! and counts what others publish, chats on the `chat` data channel, and records what the
//! server says. The integration tests drive it, and the load generator reuses it, so it keeps
//! per-packet work to atomics and never panics on network input.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use switchboard::client::{Client, ClientOptions};
//! let alice = Client::connect("ws://127.0.0.1:8080/ws", "room", "alice", ClientOptions::default()).await?;
//! alice.wait_for("connected", Duration::from_secs(10), |s| s.all_connected()).await?;
//! alice.send_chat("hello").await?;
//! alice.close().await;
//! # Ok(()) }
//! ```
//!
//! Sockets are bound to [`ClientOptions::bind_ip`] (127.0.0.1 by default) and, with
//! [`ClientOptions::loopback_only`], only loopback candidates are sent or accepted, so tests need
//! no network namespace and send nothing off the machine.
//!
//! Removed tracks: webrtc-rs 0.21 never emits `TrackRemoteEvent::OnEnded` when the remote side
//! renegotiates a track away (the core has no code path that raises `RTCTrackEvent::OnClose`), so
//! [`Client::remote_track_count`] reads the transceivers instead: a track counts while its
//! transceiver's negotiated direction still includes receiving.

pub mod decode;
mod keyframe;
mod media;
pub mod payload;
mod peer;
pub mod relay;
mod rtx;
mod session;
mod stats;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use media::{MediaProfile, PACED_SHARE, SIMULCAST_RIDS, VideoCodec};
pub use peer::{CHAT_LABEL, publisher_of_stream};
pub use stats::{
    ChatMessage, ClientSnapshot, LinkSnapshot, LocalTrackSnapshot, RemoteTrackSnapshot,
};

use crate::signal::protocol::{
    ClientMessage, MediaKind, PROTOCOL_VERSION, RoomMode, ServerMessage,
};
use session::{Event, LinkRegistry, Session, SinkSwap};
use stats::Shared;

/// How a client joins and what it publishes.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Publish an audio track from the start.
    pub publish_audio: bool,
    /// Publish a video track from the start.
    pub publish_video: bool,
    /// The `mode` field of `join` (only matters to the participant creating the room).
    pub mode: Option<RoomMode>,
    pub media: MediaProfile,
    /// Address the peer connections' UDP sockets bind to.
    pub bind_ip: IpAddr,
    /// Send and accept only loopback ICE candidates.
    pub loopback_only: bool,
    /// Limit for connecting the socket and for the `joined` answer.
    pub join_timeout: Duration,
    /// Called for every intact media packet received (the load generator's latency histograms).
    pub probe: Option<Arc<dyn MediaProbe>>,
    /// Reach the server's media through this relay (a shaped link) instead of directly.
    pub media_relay: Option<relay::MediaRelay>,
    /// The access token sent in `join` (servers with API keys require one).
    pub token: Option<String>,
    /// The TLS configuration for `wss://` URLs (e.g. one that trusts a test's self-signed
    /// certificate). None: the public web's root certificates.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Sees every intact media packet a client receives, on the receive task, right after its
/// payload was parsed. It must be cheap (atomics): it runs once per packet.
pub trait MediaProbe: Send + Sync + std::fmt::Debug {
    /// `header` is the parsed payload, `bytes` its length, `now_us` the receive time
    /// ([`payload::now_micros`], the clock `header.sent_at_us` was taken with).
    fn on_media(&self, header: &payload::PayloadHeader, bytes: usize, now_us: u64);
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            publish_audio: true,
            publish_video: true,
            mode: None,
            media: MediaProfile::default(),
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            loopback_only: true,
            join_timeout: Duration::from_secs(10),
            probe: None,
            media_relay: None,
            token: None,
            tls: None,
        }
    }
}

/// The public web's root certificates (webpki-roots), with the ring provider the rest of the
/// crate uses; built once, shared by every client (the load generator starts hundreds).
fn public_roots() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::LazyLock<Arc<rustls::ClientConfig>> =
        std::sync::LazyLock::new(|| {
            let roots = webpki_roots::TLS_SERVER_ROOTS.iter().cloned();
            tls_client_config(rustls::RootCertStore::from_iter(roots))
        });
    CONFIG.clone()
}

/// A client configuration trusting `roots`: for tests, a store holding their self-signed
/// certificate.
pub fn tls_client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Opens a signaling socket (`ws://` or `wss://`).
async fn open_socket(
    ws_url: &str,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> anyhow::Result<WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>> {
    let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
    let connect =
        tokio_tungstenite::connect_async_tls_with_config(ws_url, None, true, Some(connector));
    let (socket, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| anyhow!("connecting to {ws_url} timed out"))?
        .with_context(|| format!("connecting to {ws_url}"))?;
    Ok(socket)
}

impl ClientOptions {
    /// Publishes nothing at the start.
    pub fn silent() -> Self {
        Self {
            publish_audio: false,
            publish_video: false,
            ..Self::default()
        }
    }

    /// Asks for a mesh room.
    pub fn mesh(mut self) -> Self {
        self.mode = Some(RoomMode::Mesh);
        self
    }
}

/// Reads a signaling socket until the server answers `join`: its `joined` (or, in a cluster,
/// `redirect`) message, and the messages that came before it (kept for the caller). A refusal
/// (`error`), a closed socket or no answer within `timeout` is an error.
pub async fn wait_for_joined<S>(
    stream: &mut S,
    timeout: Duration,
) -> anyhow::Result<(ServerMessage, Vec<ServerMessage>)>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut early = Vec::new();
    let joined = tokio::time::timeout(timeout, async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ServerMessage>(text.as_str()) {
                        Ok(ServerMessage::Error { code, message }) => {
                            bail!("join refused: {code:?}: {message}")
                        }
                        Ok(
                            answer
                            @ (ServerMessage::Joined { .. } | ServerMessage::Redirect { .. }),
                        ) => return Ok(answer),
                        Ok(other) => early.push(other),
                        Err(e) => bail!("unparsable answer to join: {e}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    bail!("socket closed before joined: {frame:?}")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("socket failed before joined: {e}"),
                None => bail!("socket closed before joined"),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no joined answer within {timeout:?}"))??;
    Ok((joined, early))
}

/// Redirects one join follows (a cluster sends a client to the node hosting its room).
const MAX_REDIRECTS: usize = 3;

/// A remote track currently received on one of the client's peer connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRemoteTrack {
    /// `None` for the SFU connection, the peer's id in mesh rooms.
    pub peer: Option<String>,
    pub stream_id: String,
    pub track_id: String,
    pub publisher_id: String,
    pub kind: MediaKind,
}

/// A connected synthetic participant. Dropping it without [`Client::close`] aborts its tasks and
/// closes its connections in the background.
pub struct Client {
    /// The signaling URL of the node the client joined (after any redirects).
    signaling_url: String,
    participant_id: String,
    room: String,
    mode: RoomMode,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    outbox: mpsc::UnboundedSender<Message>,
    /// Gives the writer a new socket, or cuts its current one.
    sink_swap: SinkSwap,
    registry: LinkRegistry,
    session: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<JoinHandle<()>>,
    writer: JoinHandle<()>,
    closed: AtomicBool,
    /// For `wss://` URLs, kept for resumes.
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// Connects to `ws_url`, joins `room` as `name`, and starts negotiating media.
    ///
    /// Returns once the server answered `joined` and the first offer(s) went out; use
    /// [`Client::wait_for`] (e.g. [`ClientSnapshot::all_connected`]) to wait for media.
    pub async fn connect(
        ws_url: &str,
        room: &str,
        name: &str,
        opts: ClientOptions,
    ) -> anyhow::Result<Client> {
        let tls = opts.tls.clone().unwrap_or_else(public_roots);
        let join = ClientMessage::Join {
            room: room.to_owned(),
            name: name.to_owned(),
            mode: opts.mode,
            protocol: Some(PROTOCOL_VERSION),
            token: opts.token.clone(),
        };
        let join = serde_json::to_string(&join)?;
        // In a cluster the room may be hosted by another node: follow a few redirects.
        let mut url = ws_url.to_owned();
        let mut redirects = 0;
        let (sink, stream, joined, early) = loop {
            let socket = open_socket(&url, &tls, opts.join_timeout).await?;
            let (mut sink, mut stream) = socket.split();
            sink.send(Message::Text(join.clone().into()))
                .await
                .context("sending join")?;
            let (answer, early) = wait_for_joined(&mut stream, opts.join_timeout).await?;
            match answer {
                ServerMessage::Redirect { url: next, .. } if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    let _ = sink.close().await;
                    url = next;
                }
                ServerMessage::Redirect { .. } => bail!("more than {MAX_REDIRECTS} redirects"),
                joined => break (sink, stream, joined, early),
            }
        };
        let ServerMessage::Joined {
            ref participant_id,
            room: ref joined_room,
            mode,
            ref participants,
            ref tracks,
            ref resume_token,
            ..
        } = joined
        else {
            bail!("expected joined");
        };
        let participant_id = participant_id.clone();
        let joined_room = joined_room.clone();

        let shared = Arc::new(Shared::default());
        shared.update(|r| {
            r.participant_id = participant_id.clone();
            r.room = joined_room.clone();
            r.mode = mode;
            r.announced_tracks = tracks.clone();
            r.resume_token = resume_token.clone();
        });
        shared.set_participants(participants);
        let others: Vec<String> = participants.iter().map(|p| p.id.clone()).collect();
        shared.push_event(joined.clone());

        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        for message in early {
            let _ = events.send(Event::Server(message));
        }
        let (sink_swap, swaps) = mpsc::unbounded_channel();
        let writer = tokio::spawn(session::run_writer(sink, outbox_rx, swaps));
        let reader = tokio::spawn(session::run_reader(stream, events.clone(), shared.clone()));
        let registry = LinkRegistry::default();
        let mut session = Session::new(
            participant_id.clone(),
            mode,
            opts,
            shared.clone(),
            outbox.clone(),
            events.clone(),
            registry.clone(),
        );
        if let Err(e) = session.start(others).await {
            session.close_all().await;
            reader.abort();
            writer.abort();
            return Err(e.context("starting media"));
        }
        let session = tokio::spawn(session.run(events_rx));
        Ok(Client {
            signaling_url: url,
            participant_id,
            room: joined_room,
            mode,
            shared,
            events,
            outbox,
            sink_swap,
            registry,
            session: Mutex::new(Some(session)),
            reader: Mutex::new(reader),
            writer,
            closed: AtomicBool::new(false),
            tls,
        })
    }

    /// The signaling URL of the node that took the join (in a cluster, where redirects led).
    pub fn signaling_url(&self) -> &str {
        &self.signaling_url
    }

    /// The participant id the server assigned.
    pub fn id(&self) -> &str {
        &self.participant_id
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn mode(&self) -> RoomMode {
        self.mode
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> ClientSnapshot {
        self.shared.snapshot()
    }

    /// The remote tracks' counters and the links' states only: cheaper than
    /// [`Client::snapshot`], which also copies the event log.
    pub fn media_snapshot(&self) -> (Vec<RemoteTrackSnapshot>, Vec<LinkSnapshot>) {
        self.shared.read(|r| {
            (
                r.remote_tracks.iter().map(|t| t.snapshot()).collect(),
                r.links.values().cloned().collect(),
            )
        })
    }

    /// Waits until `condition` holds for a snapshot, or fails after `timeout` naming `what`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&ClientSnapshot) -> bool,
    ) -> anyhow::Result<ClientSnapshot> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let snapshot = self.snapshot();
            if condition(&snapshot) {
                return Ok(snapshot);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{}: timed out after {timeout:?} waiting for {what}",
                    self.participant_id
                );
            }
            // Counters move without notifications: poll them too.
            let _ = tokio::time::timeout(Duration::from_millis(50), changed).await;
        }
    }

    /// Waits until every peer connection is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for("all peer connections connected", timeout, |s| {
            s.all_connected()
        })
        .await
        .map(|_| ())
    }

    /// Publishes another synthetic track and renegotiates (client-side offer). Returns the local
    /// track id.
    pub async fn publish_track(&self, kind: MediaKind) -> anyhow::Result<String> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Publish { kind, reply })
            .map_err(|_| anyhow!("the client is closed"))?;
        answer.await.map_err(|_| anyhow!("the client is closed"))?
    }

    /// Restarts ICE on the connection to the SFU (an offer with new credentials), as a client
    /// does when its network changed. Returns once the offer went out (or is queued behind one
    /// in flight).
    pub async fn restart_ice(&self) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::RestartIce { reply })
            .map_err(|_| anyhow!("the client is closed"))?;
        answer.await.map_err(|_| anyhow!("the client is closed"))?
    }

    /// Stops publishing a track (removes it from the connection and renegotiates), as a browser
    /// does when a screen share ends.
    pub async fn unpublish_track(&self, track_id: &str) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Unpublish {
                track_id: track_id.to_string(),
                reply,
            })
            .map_err(|_| anyhow!("the client is closed"))?;
        answer.await.map_err(|_| anyhow!("the client is closed"))?
    }

    /// Sends `text` on every open `chat` channel (one in SFU rooms, one per peer in mesh rooms),
    /// waiting up to 10 s for one to open. Returns how many channels it went out on.
    pub async fn send_chat(&self, text: &str) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let channels: Vec<_> = {
                let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                registry
                    .values()
                    .flat_map(|link| link.state.open_chat_channels())
                    .collect()
            };
            if !channels.is_empty() {
                let mut sent = 0;
                for channel in channels {
                    match channel.send_text(text).await {
                        Ok(()) => sent += 1,
                        Err(e) => tracing::debug!("chat send failed: {e}"),
                    }
                }
                if sent == 0 {
                    bail!("no chat channel accepted the message");
                }
                return Ok(sent);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no open chat channel");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends any protocol message on the signaling socket (for tests of the server's handling).
    pub fn send_message(&self, message: &ClientMessage) -> anyhow::Result<()> {
        let text = serde_json::to_string(message)?;
        self.outbox
            .send(Message::Text(text.into()))
            .map_err(|_| anyhow!("the signaling socket is closed"))
    }

    /// Sends `leave`, closes the peer connections and stops publishing; waits up to 5 s for the
    /// server's `left`. The socket stays open (the protocol allows another `join` on it).
    pub async fn leave(&self) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Leave { reply })
            .map_err(|_| anyhow!("the client is closed"))?;
        answer
            .await
            .map_err(|_| anyhow!("the client is closed"))??;
        self.wait_for("left", Duration::from_secs(5), |s| s.left)
            .await
            .map(|_| ())
    }

    /// Closes the signaling socket abruptly: no `leave`, no close frame. The peer connections
    /// stay up until [`Client::close`]; messages sent meanwhile wait for [`Client::resume`].
    pub fn drop_socket(&self) {
        self.lock_reader().abort();
        let _ = self.sink_swap.send(None);
        self.shared.update(|r| r.socket_closed = true);
    }

    fn lock_reader(&self) -> std::sync::MutexGuard<'_, JoinHandle<()>> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the session up again on a new socket to `ws_url` with the resume token (protocol
    /// 3), after [`Client::drop_socket`] or a lost connection. Returns once the server answered
    /// `resumed`; the old socket, if still open, is cut.
    pub async fn resume(&self, ws_url: &str) -> anyhow::Result<()> {
        let token = self
            .shared
            .read(|r| r.resume_token.clone())
            .ok_or_else(|| anyhow!("the server gave no resume token"))?;
        let socket = open_socket(ws_url, &self.tls, Duration::from_secs(10)).await?;
        let (mut sink, mut stream) = socket.split();
        let resume = ClientMessage::Resume { token };
        sink.send(Message::Text(serde_json::to_string(&resume)?.into()))
            .await
            .context("sending resume")?;
        let resumed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ServerMessage>(text.as_str()) {
                            Ok(resumed @ ServerMessage::Resumed { .. }) => return Ok(resumed),
                            Ok(ServerMessage::Error { code, message }) => {
                                bail!("resume refused: {code:?}: {message}")
                            }
                            Ok(_) => {}
                            Err(e) => bail!("unparsable answer to resume: {e}"),
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("socket failed before resumed: {e}"),
                    None => bail!("socket closed before resumed"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no resumed answer within 10 s"))??;
        let _ = self.events.send(Event::Server(resumed));
        let reader = tokio::spawn(session::run_reader(
            stream,
            self.events.clone(),
            self.shared.clone(),
        ));
        std::mem::replace(&mut *self.lock_reader(), reader).abort();
        self.sink_swap
            .send(Some(sink))
            .map_err(|_| anyhow!("the client is closed"))
    }

    /// Closes everything: peer connections, publishing, and the socket (with a close frame if it
    /// is still open). Idempotent.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (reply, answer) = oneshot::channel();
        if self.events.send(Event::Close { reply }).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
        }
        let session = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session
            && tokio::time::timeout(Duration::from_secs(5), session)
                .await
                .is_err()
        {
            tracing::warn!("client session task did not stop in time");
        }
        // The writer ends after sending the close frame.
        for _ in 0..100 {
            if self.writer.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.writer.abort();
        self.lock_reader().abort();
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Remote tracks currently received: transceivers whose negotiated direction includes
    /// receiving and on which a track has arrived.
    pub async fn active_remote_tracks(&self) -> Vec<ActiveRemoteTrack> {
        let links: Vec<_> = {
            let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            registry
                .iter()
                .map(|(peer, link)| (peer.clone(), link.pc.clone()))
                .collect()
        };
        let mut tracks = Vec::new();
        for (peer, pc) in links {
            for transceiver in pc.get_transceivers().await {
                match transceiver.current_direction().await {
                    Ok(direction) if direction.has_recv() => {}
                    _ => continue,
                }
                let Ok(Some(receiver)) = transceiver.receiver().await else {
                    continue;
                };
                let track = receiver.track();
                let stream_id = track.stream_id().await;
                let kind = match track.kind().await {
                    RtpCodecKind::Audio => MediaKind::Audio,
                    _ => MediaKind::Video,
                };
                let publisher_id = match &peer {
                    Some(peer) => peer.clone(),
                    None => publisher_of_stream(&stream_id).to_owned(),
                };
                tracks.push(ActiveRemoteTrack {
                    peer: peer.clone(),
                    track_id: track.track_id().await,
                    stream_id,
                    publisher_id,
                    kind,
                });
            }
        }
        tracks
    }

    /// The number of [`Client::active_remote_tracks`].
    pub async fn remote_track_count(&self) -> usize {
        self.active_remote_tracks().await.len()
    }

    /// The SDP of the last offer the SFU server sent this client.
    pub fn last_server_offer(&self) -> Option<String> {
        self.shared.read(|r| r.last_server_offer.clone())
    }

    /// Current participants as the client knows them (id → name), without the client itself.
    pub fn participants(&self) -> BTreeMap<String, String> {
        self.shared.read(|r| r.participants.clone())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(session) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            session.abort();
        }
        self.lock_reader().abort();
        self.writer.abort();
        let pcs: Vec<_> = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|link| link.pc.clone())
            .collect();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for pc in pcs {
                    let _ = pc.close().await;
                }
            });
        }
    }
}
