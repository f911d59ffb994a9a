//! One load run: join the participants (real signaling, real WebRTC), wait until every expected
//! stream flows, measure a window, leave. Everything is bounded in time.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use switchboard::client::payload::{self, PayloadHeader};
use switchboard::client::{Client, ClientOptions, MediaProbe, MediaProfile};
use switchboard::signal::protocol::{MediaKind, RoomMode};
use tokio::sync::Semaphore;

use super::Tile;
use super::histogram::{Histogram, HistogramSnapshot};
use super::lite;
use super::report::{self, Outcome};
use super::server::{Server, ServerSample};
use super::system::{self, ProcSample};
use super::target::{self, ExternalPublisher, Target, janus::Janus};

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub label: String,
    /// The server and the protocol it is spoken to in.
    pub target: Target,
    pub rooms: usize,
    /// Publishing participants per room (each publishes the enabled tracks).
    pub publishers: usize,
    /// Silent participants per room (receive only).
    pub subscribers: usize,
    pub mode: RoomMode,
    pub media: MediaProfile,
    pub audio: bool,
    pub video: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// Joins in progress at once.
    pub join_concurrency: usize,
    /// Limit for everyone to join and receive every expected stream.
    pub ready_timeout: Duration,
    pub room_prefix: String,
    pub progress: bool,
    /// What the receive-only participants run on (SFU rooms; mesh rooms always use webrtc-rs).
    pub subscriber_engine: SubscriberEngine,
    /// Lite subscribers: after the first few packets of each stream, one in this many is
    /// decrypted and checked (1: all).
    pub decrypt_every: u32,
    /// Lite subscribers report this tile size for every video they receive (None: no report,
    /// so the server forwards the top layer).
    pub subscriber_tile: Option<Tile>,
    /// The device the lite receivers' socket is tied to (`lo`, or the loopback-only media
    /// interface of `scripts/janus-videoroom`).
    pub receiver_device: String,
    /// Switchboard target: lite receivers join through these signaling URLs in turn (the
    /// nodes of a cascading cluster) instead of the target's; empty: the target's.
    pub subscriber_servers: Vec<String>,
}

/// The implementation of the receive-only participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriberEngine {
    /// str0m receivers on one thread and one UDP socket, counting every packet from its clear
    /// RTP header and decrypting a sample (`lite` module).
    Lite,
    /// webrtc-rs clients (`switchboard::client::Client`), like the publishers.
    Webrtc,
}

impl Scenario {
    pub fn participants(&self) -> usize {
        self.rooms * (self.publishers + self.subscribers)
    }

    pub fn tracks_per_publisher(&self) -> usize {
        usize::from(self.audio) + usize::from(self.video)
    }

    /// The engine the subscribers really run on: lite ones cannot join mesh rooms.
    pub fn effective_subscriber_engine(&self) -> SubscriberEngine {
        if self.mode == RoomMode::Mesh || self.subscribers == 0 {
            SubscriberEngine::Webrtc
        } else {
            self.subscriber_engine
        }
    }
}

/// Counters every client's probe adds to.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    measuring: AtomicBool,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub audio: Histogram,
    pub video: Histogram,
}

impl Totals {
    /// Inside the measurement window: latencies are recorded.
    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    pub fn set_measuring(&self, on: bool) {
        self.measuring.store(on, Ordering::Relaxed);
    }

    /// Adds received packets (a batch at a time from the lite engine).
    pub fn add(&self, packets: u64, bytes: u64) {
        self.packets.fetch_add(packets, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// One client's probe: its own join clock, the shared totals.
#[derive(Debug)]
struct Probe {
    totals: Arc<Totals>,
    start_us: AtomicU64,
    first_us: AtomicU64,
}

impl MediaProbe for Probe {
    fn on_media(&self, header: &PayloadHeader, bytes: usize, now_us: u64) {
        if self.first_us.load(Ordering::Relaxed) == 0 {
            let _ = self
                .first_us
                .compare_exchange(0, now_us, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.totals.packets.fetch_add(1, Ordering::Relaxed);
        self.totals.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.totals.measuring.load(Ordering::Relaxed) {
            let latency = now_us.saturating_sub(header.sent_at_us);
            match header.kind {
                MediaKind::Audio => self.totals.audio.record(latency),
                MediaKind::Video => self.totals.video.record(latency),
            }
        }
    }
}

/// A joined participant's endpoint: a webrtc-rs client (every publisher, and subscribers with
/// `--subscriber-engine webrtc`) or a lite receiver. What the run needs of either: per-track
/// counters, whether it is connected and how many streams flow, whether it sends, and leaving.
pub(crate) enum Peer {
    Webrtc(Client),
    Lite(lite::Receiver),
    /// A lite publisher of a WHIP or Janus target.
    Publisher(ExternalPublisher),
}

/// A peer's media at one moment, for `wait_ready`.
struct MediaState {
    /// Every peer connection is up.
    connected: bool,
    /// Remote tracks with at least one intact packet.
    flowing: usize,
}

impl Peer {
    pub fn counters(&self) -> ClientCounters {
        match self {
            Peer::Webrtc(client) => counters(client),
            Peer::Lite(receiver) => ClientCounters {
                remote: receiver
                    .tracks()
                    .into_iter()
                    .map(|t| {
                        (
                            (None, t.track_id),
                            TrackCounters {
                                intact: t.intact,
                                bad: t.bad,
                                bytes: t.bytes,
                                first_seq: Some(t.first_seq),
                                max_seq: Some(t.max_seq),
                            },
                        )
                    })
                    .collect(),
                sent_packets: 0,
                sent_bytes: 0,
                links: 1,
            },
            Peer::Publisher(publisher) => {
                let (sent_packets, sent_bytes) = publisher.sent();
                ClientCounters {
                    remote: HashMap::new(),
                    sent_packets,
                    sent_bytes,
                    links: 1,
                }
            }
        }
    }

    fn media_state(&self) -> MediaState {
        match self {
            Peer::Webrtc(client) => {
                let (remote, links) = client.media_snapshot();
                MediaState {
                    connected: !links.is_empty()
                        && links.iter().all(|l| {
                            l.state == webrtc::peer_connection::RTCPeerConnectionState::Connected
                        }),
                    flowing: remote.iter().filter(|t| t.intact > 0).count(),
                }
            }
            Peer::Lite(receiver) => MediaState {
                connected: receiver.connected(),
                flowing: receiver.tracks().iter().filter(|t| t.intact > 0).count(),
            },
            Peer::Publisher(publisher) => MediaState {
                connected: publisher.connected(),
                flowing: 0,
            },
        }
    }

    /// Has sent media (publishers).
    fn sending(&self) -> bool {
        match self {
            Peer::Webrtc(client) => client
                .snapshot()
                .local_tracks
                .iter()
                .any(|t| t.sent_packets > 0),
            Peer::Lite(_) => false,
            Peer::Publisher(publisher) => publisher.sent().0 > 0,
        }
    }

    async fn close(self) {
        match self {
            Peer::Webrtc(client) => client.close().await,
            Peer::Lite(receiver) => {
                receiver.close().await;
            }
            Peer::Publisher(publisher) => publisher.close().await,
        }
    }
}

pub(crate) struct Participant {
    pub room: usize,
    pub publisher: bool,
    /// Joined while media was already flowing in its room: its join time counts.
    pub measure_join: bool,
    probe: Arc<Probe>,
    pub peer: Option<Peer>,
}

impl Participant {
    /// Socket open → first media packet, µs.
    pub fn join_us(&self) -> Option<u64> {
        let first = match &self.peer {
            Some(Peer::Lite(receiver)) => receiver.first_media_us().unwrap_or(0),
            _ => self.probe.first_us.load(Ordering::Relaxed),
        };
        let start = self.probe.start_us.load(Ordering::Relaxed);
        (first != 0 && start != 0).then(|| first.saturating_sub(start))
    }
}

/// Per-track counters at one moment, keyed by (link peer, track id).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientCounters {
    pub remote: HashMap<(Option<String>, String), TrackCounters>,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub links: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct TrackCounters {
    pub intact: u64,
    pub bad: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub max_seq: Option<u64>,
}

/// One end of the measurement window.
pub(crate) struct Mark {
    pub at: Instant,
    pub server: ServerSample,
    pub generator: ProcSample,
    /// CPU seconds of the lite receivers' thread (None: no lite engine).
    pub lite_cpu_s: Option<f64>,
    pub clients: Vec<Option<ClientCounters>>,
    pub loadavg: [f64; 3],
    pub cpu: system::CpuTimes,
}

struct Status {
    line: std::sync::Mutex<String>,
    tty: bool,
}

impl Status {
    fn new(enabled: bool) -> Option<Arc<Self>> {
        enabled.then(|| {
            Arc::new(Self {
                line: std::sync::Mutex::new(String::new()),
                tty: std::io::stderr().is_terminal(),
            })
        })
    }

    fn show(&self, text: String) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        if self.tty {
            let pad = line.len().saturating_sub(text.len());
            eprint!("\r{text}{}", " ".repeat(pad));
        } else {
            eprintln!("{text}");
        }
        *line = text;
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn counters(client: &Client) -> ClientCounters {
    let snapshot = client.snapshot();
    ClientCounters {
        remote: snapshot
            .remote_tracks
            .iter()
            .map(|t| {
                (
                    (t.link_peer.clone(), t.track_id.clone()),
                    TrackCounters {
                        intact: t.intact,
                        bad: t.corrupt + t.mismatched,
                        bytes: t.bytes,
                        first_seq: t.first_seq,
                        max_seq: t.max_seq,
                    },
                )
            })
            .collect(),
        sent_packets: snapshot.local_tracks.iter().map(|t| t.sent_packets).sum(),
        sent_bytes: snapshot.local_tracks.iter().map(|t| t.sent_bytes).sum(),
        links: snapshot.links.len(),
    }
}

async fn mark(
    server: &Server,
    participants: &[Participant],
    engine: Option<&lite::Engine>,
) -> Mark {
    let server_sample = server.sample().await;
    let generator = system::sample_self();
    let lite_cpu_s = engine.and_then(lite_engine_cpu_s);
    let at = Instant::now();
    let clients = participants
        .iter()
        .map(|p| p.peer.as_ref().map(Peer::counters))
        .collect();
    Mark {
        at,
        server: server_sample,
        generator,
        lite_cpu_s,
        clients,
        loadavg: system::loadavg(),
        cpu: system::cpu_times(),
    }
}

/// CPU seconds the lite engine's thread used so far.
fn lite_engine_cpu_s(engine: &lite::Engine) -> Option<f64> {
    system::thread_cpu_s(engine.stats.thread.get()?)
}

/// Runs `scenario` against `server` and measures it.
pub async fn run(scenario: &Scenario, server: &Server) -> anyhow::Result<Outcome> {
    anyhow::ensure!(scenario.rooms > 0, "--rooms must be at least 1");
    anyhow::ensure!(
        scenario.publishers > 0,
        "at least one publisher per room is needed"
    );
    anyhow::ensure!(
        scenario.audio || scenario.video,
        "publishing neither audio nor video measures nothing"
    );
    let status = Status::new(scenario.progress);
    let totals = Arc::new(Totals::default());
    let mut warnings = Vec::new();

    let baseline = server.sample().await;
    if server.pid.is_none() {
        warnings.push(format!(
            "server process not found (no --server-pid, nothing listening on port {} seen in /proc): no server CPU or RSS",
            server.addr.port()
        ));
    }
    if server.has_metrics && baseline.metrics.is_empty() {
        warnings.push("server /metrics unreadable: no forwarded-packet counts".into());
    }
    let rooms: Vec<String> = (0..scenario.rooms)
        .map(|r| format!("{}-r{r}", scenario.room_prefix))
        .collect();
    let engine = match scenario.effective_subscriber_engine() {
        SubscriberEngine::Lite => Some(Arc::new(
            lite::Engine::start(
                scenario.decrypt_every,
                totals.clone(),
                &scenario.receiver_device,
            )
            .context(
                "starting the lite subscribers (--subscriber-engine webrtc does without them)",
            )?,
        )),
        SubscriberEngine::Webrtc => None,
    };
    let joiner = Arc::new(Joiner::new(scenario, engine.clone())?);

    // Phase 1: the first publisher of every room, so that media flows before anyone else joins.
    let ramp_started = Instant::now();
    let seeds: Vec<(usize, bool, bool)> = (0..scenario.rooms).map(|r| (r, true, false)).collect();
    let mut participants = connect_all(
        scenario,
        &rooms,
        seeds,
        &totals,
        &joiner,
        status.clone(),
        &mut warnings,
    )
    .await;
    if scenario.mode == RoomMode::Sfu {
        // A mesh publisher alone in its room has nobody to send to yet.
        wait_sending(scenario, &participants, status.clone(), &mut warnings).await;
    }
    // Phase 2: everyone else, publishers first, room by room; their join times count.
    let mut rest = Vec::new();
    for r in 0..scenario.rooms {
        rest.extend((1..scenario.publishers).map(|_| (r, true, true)));
    }
    for r in 0..scenario.rooms {
        rest.extend((0..scenario.subscribers).map(|_| (r, false, true)));
    }
    participants.extend(
        connect_all(
            scenario,
            &rooms,
            rest,
            &totals,
            &joiner,
            status.clone(),
            &mut warnings,
        )
        .await,
    );
    let all_ready = wait_ready(scenario, &participants, status.clone()).await;
    if !all_ready {
        warnings.push(format!(
            "not every participant received every expected stream within {:?}; measuring anyway{}",
            scenario.ready_timeout,
            lite_not_ready(&participants)
        ));
    }
    let ramp = ramp_started.elapsed();

    // Warm-up, then the window.
    let warm_until = Instant::now() + scenario.warmup;
    while Instant::now() < warm_until {
        if let Some(s) = &status {
            s.show(format!(
                "warming up: {:.0} s left",
                (warm_until - Instant::now()).as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250).min(warm_until - Instant::now())).await;
    }
    let start = mark(server, &participants, engine.as_deref()).await;
    totals.set_measuring(true);
    measure(scenario, server, &totals, &start, status.clone()).await;
    totals.set_measuring(false);
    let end = mark(server, &participants, engine.as_deref()).await;
    if let Some(s) = &status {
        s.done();
    }

    let outcome = report::compute(
        scenario,
        server,
        &baseline,
        &participants,
        &start,
        &end,
        &totals,
        engine.as_deref(),
        ramp,
        warnings,
    );

    // Leave, and let the server release everything.
    if let Some(s) = &status {
        s.show(format!("leaving: {} participants", participants.len()));
    }
    let peers: Vec<Peer> = participants.drain(..).filter_map(|p| p.peer).collect();
    let closing = futures_util::stream::iter(peers).for_each_concurrent(64, |c| async move {
        c.close().await;
    });
    if tokio::time::timeout(Duration::from_secs(60), closing)
        .await
        .is_err()
    {
        tracing::warn!("closing the clients took over 60 s; dropping the rest");
    }
    if let Some(janus) = &joiner.janus {
        janus.destroy_rooms().await;
    }
    // The lite receivers have closed (or been dropped): stop their thread.
    drop(joiner);
    drop(engine);
    let mut outcome = outcome;
    let base_participants = baseline.metric("participants");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let after = server.sample().await;
        if after.metric("participants") <= base_participants || Instant::now() >= deadline {
            outcome.set_after_close(&after);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(s) = &status {
        s.show("done".into());
        s.done();
    }
    Ok(outcome)
}

/// How participants join the target: what each protocol needs, shared by the join tasks.
pub(crate) struct Joiner {
    target: Target,
    engine: Option<Arc<lite::Engine>>,
    http: reqwest::Client,
    janus: Option<Janus>,
    tile: Option<Tile>,
    /// The tracks each publisher sends (what a WHEP player asks for).
    audio: bool,
    video: bool,
    /// Where lite receivers join in turn (Switchboard target; empty: its URL).
    subscriber_servers: Vec<String>,
    receivers_joined: std::sync::atomic::AtomicUsize,
}

impl Joiner {
    fn new(scenario: &Scenario, engine: Option<Arc<lite::Engine>>) -> anyhow::Result<Joiner> {
        let http = target::http_client()?;
        let janus = match &scenario.target {
            Target::Janus { url } => Some(Janus::new(http.clone(), url.clone())),
            _ => None,
        };
        Ok(Joiner {
            target: scenario.target.clone(),
            engine,
            http,
            janus,
            tile: scenario.subscriber_tile,
            audio: scenario.audio,
            video: scenario.video,
            subscriber_servers: scenario.subscriber_servers.clone(),
            receivers_joined: Default::default(),
        })
    }

    /// Joins `room` as `name`: a publisher with the tracks `opts` enables, or a receiver.
    async fn join(
        &self,
        room: &str,
        name: &str,
        publisher: bool,
        opts: ClientOptions,
    ) -> anyhow::Result<Peer> {
        let (audio, video) = (opts.publish_audio, opts.publish_video);
        let engine = self.engine.as_ref().filter(|_| !publisher);
        match (&self.target, engine) {
            (Target::Switchboard { ws_url }, Some(engine)) => {
                let n = (self.receivers_joined).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let url = match self.subscriber_servers.len() {
                    0 => ws_url,
                    servers => &self.subscriber_servers[n % servers],
                };
                lite::Receiver::connect(engine, url, room, name, opts.join_timeout, self.tile)
                    .await
                    .map(Peer::Lite)
            }
            (Target::Switchboard { ws_url }, None) => Client::connect(ws_url, room, name, opts)
                .await
                .map(Peer::Webrtc),
            (Target::Whip { whip_url, whep_url }, engine) => match engine {
                None => target::whip::publish(
                    &self.http,
                    &target::room_url(whip_url, room),
                    name,
                    opts.media,
                    audio,
                    video,
                )
                .await
                .map(Peer::Publisher),
                Some(engine) => target::whip::play(
                    &self.http,
                    engine,
                    &target::room_url(whep_url, room),
                    name,
                    self.audio,
                    self.video,
                )
                .await
                .map(Peer::Lite),
            },
            (Target::Janus { .. }, engine) => {
                let janus = self.janus.as_ref().context("no Janus client")?;
                match engine {
                    None => janus
                        .publish(room, name, opts.media, audio, video)
                        .await
                        .map(Peer::Publisher),
                    Some(engine) => janus.subscribe(engine, room, name).await.map(Peer::Lite),
                }
            }
        }
    }
}

/// Joins `specs` (room, publisher, measure_join), `join_concurrency` at a time.
async fn connect_all(
    scenario: &Scenario,
    rooms: &[String],
    specs: Vec<(usize, bool, bool)>,
    totals: &Arc<Totals>,
    joiner: &Arc<Joiner>,
    status: Option<Arc<Status>>,
    warnings: &mut Vec<String>,
) -> Vec<Participant> {
    let total = specs.len();
    let joined = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let printer = status.map(|s| {
        let (joined, failed) = (joined.clone(), failed.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            loop {
                s.show(format!(
                    "joining: {}/{total} joined, {} failed, {:.1} s",
                    joined.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64()
                ));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    });
    let semaphore = Arc::new(Semaphore::new(scenario.join_concurrency.max(1)));
    let mut handles = Vec::with_capacity(total);
    let mut participants = Vec::with_capacity(total);
    for (i, (room, publisher, measure_join)) in specs.into_iter().enumerate() {
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let probe = Arc::new(Probe {
            totals: totals.clone(),
            start_us: AtomicU64::new(0),
            first_us: AtomicU64::new(0),
        });
        let mut opts = if publisher {
            ClientOptions::default()
        } else {
            ClientOptions::silent()
        };
        opts.publish_audio &= scenario.audio;
        opts.publish_video &= scenario.video;
        opts.media = scenario.media;
        opts.mode = Some(scenario.mode);
        opts.join_timeout = Duration::from_secs(30);
        opts.probe = Some(probe.clone() as Arc<dyn MediaProbe>);
        let room_name = rooms[room].clone();
        let name = format!("{}{i}", if publisher { "pub" } else { "sub" });
        let (joined, failed) = (joined.clone(), failed.clone());
        let start_probe = probe.clone();
        let joiner = joiner.clone();
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            start_probe
                .start_us
                .store(payload::now_micros(), Ordering::Relaxed);
            let result = joiner.join(&room_name, &name, publisher, opts).await;
            match &result {
                Ok(_) => joined.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
            result
        }));
        participants.push(Participant {
            room,
            publisher,
            measure_join,
            probe,
            peer: None,
        });
    }
    let mut errors: Vec<String> = Vec::new();
    for (participant, handle) in participants.iter_mut().zip(handles) {
        match handle.await {
            Ok(Ok(peer)) => participant.peer = Some(peer),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("join task: {e}")),
        }
    }
    if let Some(printer) = printer {
        printer.abort();
    }
    if !errors.is_empty() {
        errors.sort();
        errors.dedup();
        warnings.push(format!(
            "{} of {total} joins failed, e.g. {}",
            failed.load(Ordering::Relaxed),
            errors
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    participants
}

/// Waits (at most 30 s) until every joined publisher has sent media.
async fn wait_sending(
    scenario: &Scenario,
    participants: &[Participant],
    status: Option<Arc<Status>>,
    warnings: &mut Vec<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sending = participants
            .iter()
            .filter_map(|p| p.peer.as_ref())
            .filter(|c| c.sending())
            .count();
        let joined = participants.iter().filter(|p| p.peer.is_some()).count();
        if let Some(s) = &status {
            s.show(format!(
                "first publishers: {sending}/{} sending",
                scenario.rooms
            ));
        }
        if sending >= joined {
            return;
        }
        if Instant::now() >= deadline {
            warnings.push(format!(
                "only {sending} of {joined} first publishers were sending after 30 s"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every participant's connections are up and it receives every stream of the
/// other publishers in its room. False on timeout.
async fn wait_ready(
    scenario: &Scenario,
    participants: &[Participant],
    status: Option<Arc<Status>>,
) -> bool {
    let started = Instant::now();
    let deadline = started + scenario.ready_timeout;
    let mut publishers_in_room = vec![0usize; scenario.rooms];
    for p in participants
        .iter()
        .filter(|p| p.peer.is_some() && p.publisher)
    {
        publishers_in_room[p.room] += 1;
    }
    loop {
        let mut ready = 0;
        let mut connected = 0;
        let mut joined = 0;
        for p in participants {
            let Some(peer) = &p.peer else { continue };
            joined += 1;
            let state = peer.media_state();
            connected += usize::from(state.connected);
            let others = publishers_in_room[p.room] - usize::from(p.publisher);
            let expected = others * scenario.tracks_per_publisher();
            ready += usize::from(state.connected && state.flowing >= expected);
        }
        if let Some(s) = &status {
            s.show(format!(
                "connecting: {connected}/{joined} connected, {ready}/{joined} receiving everything, {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
        if ready == joined {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A few lite receivers that do not receive everything, with what the server told them.
fn lite_not_ready(participants: &[Participant]) -> String {
    let expected = participants
        .iter()
        .filter_map(|p| match &p.peer {
            Some(Peer::Lite(r)) => Some(r),
            _ => None,
        })
        .map(|r| r.tracks().iter().filter(|t| t.intact > 0).count())
        .max()
        .unwrap_or(0);
    let lagging: Vec<String> = participants
        .iter()
        .filter_map(|p| match &p.peer {
            Some(Peer::Lite(r)) => Some(r),
            _ => None,
        })
        .filter(|r| !r.connected() || r.tracks().iter().filter(|t| t.intact > 0).count() < expected)
        .take(3)
        .map(|r| {
            format!(
                "{} (connected {}, {} streams flowing on {} SSRCs: {:?}, server errors {:?})",
                r.participant_id(),
                r.connected(),
                r.tracks().iter().filter(|t| t.intact > 0).count(),
                r.ssrcs(),
                r.tracks()
                    .iter()
                    .map(|t| format!(
                        "{:?} {} received, {} decrypted",
                        t.kind, t.received, t.decrypted
                    ))
                    .collect::<Vec<_>>(),
                r.errors()
            )
        })
        .collect();
    if lagging.is_empty() {
        String::new()
    } else {
        format!(" (lite receivers behind, e.g. {})", lagging.join("; "))
    }
}

/// The window: a progress line every second.
async fn measure(
    scenario: &Scenario,
    server: &Server,
    totals: &Totals,
    start: &Mark,
    status: Option<Arc<Status>>,
) {
    let end = start.at + scenario.duration;
    let mut last_at = start.at;
    let mut last_packets = totals.packets.load(Ordering::Relaxed);
    let mut last_gen = start.generator;
    let mut last_server = start.server.process;
    loop {
        let now = Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep((end - now).min(Duration::from_secs(1))).await;
        let Some(s) = &status else { continue };
        let now = Instant::now();
        let dt = (now - last_at).as_secs_f64().max(1e-6);
        let packets = totals.packets.load(Ordering::Relaxed);
        let generator = system::sample_self();
        let server_process = server.pid.and_then(system::sample_pid);
        let mut latency = totals.audio.snapshot();
        latency.merge(&totals.video.snapshot());
        let server_cpu = match (last_server, server_process) {
            (Some(a), Some(b)) => format!("{:.0}%", (b.cpu_s - a.cpu_s) / dt * 100.0),
            _ => "?".into(),
        };
        s.show(format!(
            "measuring {:.0}/{:.0} s: {:.0} pkt/s received, latency p50 {:.2} ms p99 {:.2} ms, server CPU {server_cpu}, generator CPU {:.0}%",
            (now - start.at).as_secs_f64(),
            scenario.duration.as_secs_f64(),
            (packets - last_packets) as f64 / dt,
            latency.quantile(0.5) as f64 / 1000.0,
            latency.quantile(0.99) as f64 / 1000.0,
            (generator.cpu_s - last_gen.cpu_s) / dt * 100.0,
        ));
        last_at = now;
        last_packets = packets;
        last_gen = generator;
        last_server = server_process;
    }
}

/// Join times (µs) of the participants whose join counts.
pub(crate) fn join_times(participants: &[Participant]) -> (HistogramSnapshot, usize) {
    let mut missing = 0;
    let mut values = Vec::new();
    for p in participants.iter().filter(|p| p.measure_join) {
        let expects_media = p.peer.is_some();
        match p.join_us() {
            Some(us) => values.push(us),
            None if expects_media => missing += 1,
            None => {}
        }
    }
    (HistogramSnapshot::from_values(values), missing)
}
