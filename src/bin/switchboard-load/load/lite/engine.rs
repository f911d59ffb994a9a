//! The lite receivers' media engine: ONE thread with its own event loop, ONE UDP socket, and one
//! str0m `Rtc` (RTP mode, full ICE, controlling) per receiver, as the server's media worker does
//! it (`src/media/worker.rs`): `recvmmsg` batches through quinn-udp, a timer heap, commands from
//! the signaling tasks through a bounded channel, and a `drive` loop over `poll_output`.
//!
//! Receiver k gets its own loopback address, 127.1.0.0 + 1 + k, on the shared socket's port: it
//! announces that as its only host candidate, the datagrams the server sends it are told apart
//! by their destination address (`IP_PKTINFO`, quinn-udp's `RecvMeta::dst_ip`), and what it
//! sends leaves from that address (quinn-udp's `Transmit::src_ip`). The socket is bound to
//! 0.0.0.0 but tied to the loopback device (`SO_BINDTODEVICE lo`), only loopback peers are
//! accepted, and only loopback destinations are sent to.
//!
//! Per packet, the cheap path: STUN, DTLS and SRTCP always go to str0m. An SRTP media packet is
//! counted from its clear RTP header (SSRC, sequence number) with extended sequence numbers
//! (gaps are loss, duplicates and reordering are told apart), and only the first few packets of
//! each SSRC and then one in `decrypt_every` are handed to str0m, which decrypts them: their
//! payload is checked (the self-checking synthetic format), gives the latency, and the first
//! one of a track says whether it starts on a key frame.
//!
//! Compared with a browser, a lite receiver:
//! - does NOT decrypt, depacketize or decode most packets: payload damage in a skipped packet
//!   goes unseen (SRTP authentication would have caught it), and latency is sampled;
//! - sends receiver reports and TWCC feedback that reflect only the packets str0m saw, so they
//!   show the skipped ones as lost (the server reads them but does not act on them: it runs no
//!   bandwidth estimation for forwarded streams);
//! - negotiates no NACK (`rtcp-fb nack` is off in its codec config, and NACK generation is
//!   suppressed on every receive stream, which str0m would otherwise enable when the server's
//!   offer carries an RTX SSRC), so skipped packets cause no retransmission requests and the
//!   server sends it no RTX; it sends no PLI/FIR either (no decoder that could lose sync);
//! - does answer the server's renegotiations, keeps ICE alive (consent checks), opens the `chat`
//!   data channel like the browser client, and leaves with RTCP BYE and DTLS close_notify.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use quinn_udp::{Transmit, UdpSocketState};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind as StrMediaKind};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::rtp::RtpPacket;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use switchboard::client::payload;
use switchboard::client::publisher_of_stream;
use switchboard::media::Receiver;
use switchboard::signal::protocol::MediaKind;
use tokio::sync::{mpsc, oneshot};

use super::rtp::{self, Kind, Seen, SeqTracker};
use crate::load::run::Totals;

/// Commands queued to the engine before senders wait.
const COMMAND_QUEUE: usize = 1024;
/// Socket batches read per loop turn before commands and timers get their turn.
const RECV_BATCHES_PER_TURN: usize = 16;
/// Kernel socket buffers asked for (capped at `net.core.rmem_max`/`wmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;
/// Media packets of each SSRC always handed to str0m, before sampling starts.
pub const FIRST_FEW: u64 = 8;
/// Packets handed to str0m while their SSRC maps to no track, before sampling them too.
const MAX_UNMAPPED_FEEDS: u32 = 64;
/// SSRCs tracked per receiver; packets of more are dropped and counted.
const MAX_SSRCS: usize = 64;
/// Receiver k's address: `FIRST_IP + k` (127.1.0.1, 127.1.0.2, ...).
const FIRST_IP: u32 = u32::from_be_bytes([127, 1, 0, 1]);
/// The last usable one (127.255.255.255 is loopback's broadcast address).
const LAST_IP: u32 = u32::from_be_bytes([127, 255, 255, 254]);
/// Timers wait for at least this long after the loop goes to sleep: every receiver's str0m
/// asks to be woken every few tens of ms (TWCC feedback, reports, consent checks), and waking
/// the thread for each of them costs more (a context switch, on a VM an exit) than handling
/// several together. str0m's timers are soft, so a few ms late is harmless.
const TIMER_SLACK: Duration = Duration::from_millis(5);
/// The largest SRTP trailer believed when learning it (AES-GCM: 16 bytes, HMAC-SHA1-80: 10).
const MAX_SRTP_TRAILER: usize = 32;
/// Simulcast layers told apart in the per-layer counts (the synthetic publisher's three).
pub const LAYERS: usize = switchboard::client::SIMULCAST_RIDS.len();

/// Counters one track of one receiver exposes (written by the engine thread only).
#[derive(Debug)]
pub struct TrackStats {
    pub track_id: String,
    pub stream_id: String,
    pub kind: MediaKind,
    /// Distinct packets counted (including those found damaged).
    pub received: AtomicU64,
    /// Decrypted packets whose payload failed its check or named another publisher or kind.
    pub bad: AtomicU64,
    /// RTP payload bytes (from the datagram length, less the header and the learnt SRTP
    /// trailer).
    pub bytes: AtomicU64,
    pub first_seq: AtomicU64,
    pub max_seq: AtomicU64,
    pub duplicates: AtomicU64,
    /// Packets str0m decrypted (first few, then sampled).
    pub decrypted: AtomicU64,
    /// The first decrypted packet: 0 none yet, 1 labelled key frame, 2 delta frame.
    pub first_key: AtomicU8,
    /// Decrypted intact packets by the simulcast layer their payload names (the last also
    /// counts any higher).
    pub decrypted_by_layer: [AtomicU64; LAYERS],
}

/// What the engine tells a receiver's handle (and the run) about it.
#[derive(Debug, Default)]
pub struct ReceiverShared {
    /// ICE and DTLS are up.
    pub connected: AtomicBool,
    /// The connection failed or was closed.
    pub failed: AtomicBool,
    /// `payload::now_micros()` of the first intact media payload (0: none yet).
    pub first_media_us: AtomicU64,
    /// SSRCs media arrived on (one per track; more would mean retransmissions or strays).
    pub ssrcs: AtomicU64,
    pub tracks: Mutex<Vec<Arc<TrackStats>>>,
    /// The publisher a track comes from is learnt from its first intact payload instead of
    /// from its stream id (servers other than Switchboard name streams their own way).
    pub sender_from_payload: bool,
}

/// What a new receiver offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferShape {
    /// A `chat` data channel, as the browser client does (Switchboard's protocol: the server
    /// then offers the tracks).
    Chat,
    /// Receive-only audio and/or video m-lines (WHEP).
    ReceiveOnly { audio: bool, video: bool },
    /// Nothing: the server offers first (Janus VideoRoom subscribers).
    None,
}

/// The engine's own counters, for the report.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub datagrams: AtomicU64,
    /// Datagrams to an address no live receiver has.
    pub unroutable: AtomicU64,
    /// Datagrams from, or transmits to, a non-loopback address (dropped).
    pub not_loopback: AtomicU64,
    pub malformed: AtomicU64,
    /// SRTP media packets counted.
    pub media_packets: AtomicU64,
    /// Of those, handed to str0m.
    pub decrypted: AtomicU64,
    /// Handed to str0m for a known track, but no packet came out (failed SRTP authentication).
    pub undecrypted: AtomicU64,
    pub duplicates: AtomicU64,
    pub too_old: AtomicU64,
    /// Media packets counted on no track: their SSRC was not (yet) mapped to one.
    pub unmapped: AtomicU64,
    pub ssrc_overflow: AtomicU64,
    pub sent: AtomicU64,
    /// Datagrams the socket would not take at once (dropped, not queued).
    pub send_dropped: AtomicU64,
    pub send_errors: AtomicU64,
    pub input_errors: AtomicU64,
    /// Receivers opened.
    pub opened: AtomicU64,
    /// Event loop turns (wake-ups).
    pub turns: AtomicU64,
    /// Datagrams the kernel dropped at the engine's socket (its receive buffer was full: the
    /// engine fell behind, e.g. sharing a core). Lost DTLS handshake packets delay joins by
    /// the retransmission back-off.
    pub socket_drops: AtomicU64,
    /// The engine thread's /proc entry, for its CPU time.
    pub thread: OnceLock<procfs::process::Task>,
}

/// What [`Engine::open`] gives back.
pub struct Opened {
    pub id: usize,
    /// None with [`OfferShape::None`].
    pub offer: Option<String>,
    /// The receiver's host candidate, `candidate:...`.
    pub candidate: String,
}

enum Command {
    Open {
        shared: Arc<ReceiverShared>,
        shape: OfferShape,
        reply: oneshot::Sender<anyhow::Result<Opened>>,
    },
    RemoteOffer {
        id: usize,
        sdp: String,
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
    RemoteAnswer {
        id: usize,
        sdp: String,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    RemoteCandidate {
        id: usize,
        candidate: String,
    },
    Close {
        id: usize,
    },
    Shutdown,
}

/// The handle: commands in, counters out. Dropping it stops the thread.
pub struct Engine {
    commands: mpsc::Sender<Command>,
    pub stats: Arc<EngineStats>,
    pub decrypt_every: u32,
    pub port: u16,
}

impl Engine {
    /// Binds the socket to `device` (normally `lo`) and starts the thread. `decrypt_every` is
    /// clamped to 1..=1024 (str0m's SRTP needs to see a packet of every stream more often than
    /// every 32,768).
    pub fn start(decrypt_every: u32, totals: Arc<Totals>, device: &str) -> anyhow::Result<Engine> {
        let decrypt_every = decrypt_every.clamp(1, 1024);
        let socket = bind_loopback_any(device)?;
        let port = socket.local_addr()?.port();
        let state = UdpSocketState::new((&socket).into()).context("preparing the UDP socket")?;
        let cert = str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| anyhow!("cannot generate a DTLS certificate"))?;
        let mut config = Rtc::builder()
            .set_rtp_mode(true)
            .set_dtls_cert(cert)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true);
        for params in config.codec_config().iter_mut() {
            params.set_fb_nack(false);
        }
        // No transport-wide congestion control: a lite receiver hands str0m only a sample of
        // its packets, and feedback on a sample would read as heavy loss to the server's
        // bandwidth estimator. Without it the server has no estimate and does not limit them.
        let kept: Vec<(u8, Extension)> = config
            .extension_map()
            .iter()
            .filter(|(_, e)| **e != Extension::TransportSequenceNumber)
            .map(|(id, e)| (id, e.clone()))
            .collect();
        config = config.clear_extension_map();
        for (id, e) in kept {
            config = config.set_extension(id, e);
        }
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let stats = Arc::new(EngineStats::default());
        let event_loop = Loop {
            receiver: Receiver::new(&socket).context("preparing the UDP socket")?,
            config,
            recvs: Vec::new(),
            commands: commands_rx,
            stop: false,
            ctx: Ctx {
                socket,
                state,
                port,
                timers: BinaryHeap::new(),
                tally: Tally::default(),
                stats: stats.clone(),
                totals,
                every: u64::from(decrypt_every),
                expect: None,
                batch_packets: 0,
                batch_bytes: 0,
            },
        };
        std::thread::Builder::new()
            .name("lite-receivers".into())
            .spawn(move || event_loop.run())
            .context("starting the lite receivers' thread")?;
        Ok(Engine {
            commands,
            stats,
            decrypt_every,
            port,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Command,
    ) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| anyhow!("the lite engine stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the lite engine stopped"))?
    }

    /// A new receiver: its connection, and its first offer (if `shape` makes one).
    pub async fn open(
        &self,
        shared: Arc<ReceiverShared>,
        shape: OfferShape,
    ) -> anyhow::Result<Opened> {
        self.call(|reply| Command::Open {
            shared,
            shape,
            reply,
        })
        .await
    }

    /// Applies a server offer (rolling back our own outstanding one: we are polite); gives the
    /// answer.
    pub async fn remote_offer(&self, id: usize, sdp: String) -> anyhow::Result<String> {
        self.call(|reply| Command::RemoteOffer { id, sdp, reply })
            .await
    }

    pub async fn remote_answer(&self, id: usize, sdp: String) -> anyhow::Result<()> {
        self.call(|reply| Command::RemoteAnswer { id, sdp, reply })
            .await
    }

    /// A trickled candidate (`candidate:...`); refused unless loopback.
    pub async fn remote_candidate(&self, id: usize, candidate: String) {
        let _ = self
            .commands
            .send(Command::RemoteCandidate { id, candidate })
            .await;
    }

    /// Closes a receiver's connection (RTCP BYE, DTLS close_notify) and forgets it.
    pub async fn close(&self, id: usize) {
        let _ = self.commands.send(Command::Close { id }).await;
    }

    /// Like [`Engine::close`], without waiting (from `Drop`); false if the queue was full.
    pub fn try_close(&self, id: usize) -> bool {
        self.commands.try_send(Command::Close { id }).is_ok()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A full queue still ends the loop: it stops when every sender is gone.
        let _ = self.commands.try_send(Command::Shutdown);
    }
}

/// The device the receivers' socket is tied to unless told otherwise.
pub const LOOPBACK_DEVICE: &str = "lo";

/// 0.0.0.0:0, tied to `device`: it receives on every 127.0.0.0/8 address (one per receiver)
/// and nothing from other interfaces. A device other than `lo` must carry loopback addresses
/// only: packets a server sends from a socket pinned to such an interface (Janus's libnice,
/// `scripts/janus-videoroom`) arrive on it rather than on `lo`.
fn bind_loopback_any(device: &str) -> anyhow::Result<std::net::UdpSocket> {
    if device != LOOPBACK_DEVICE {
        let addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
            .context("listing the interfaces")?
            .into_iter()
            .filter(|i| i.name == device)
            .map(|i| i.ip())
            .collect();
        if addrs.is_empty() || addrs.iter().any(|ip| !ip.is_loopback()) {
            bail!(
                "--receiver-device {device}: it must exist and carry 127.0.0.0/8 addresses only (it has {addrs:?})"
            );
        }
    }
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket
        .bind_device(Some(device.as_bytes()))
        .with_context(|| {
            format!("SO_BINDTODEVICE {device} (the lite receivers' socket must see loopback only)")
        })?;
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!("SO_RCVBUF: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::debug!("SO_SNDBUF: {e}");
    }
    socket.set_nonblocking(true)?;
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    socket.bind(&any.into()).context("binding 0.0.0.0:0")?;
    Ok(socket.into())
}

fn ip_of(id: usize) -> Option<Ipv4Addr> {
    let ip = FIRST_IP.checked_add(u32::try_from(id).ok()?)?;
    (ip <= LAST_IP).then(|| Ipv4Addr::from(ip))
}

fn id_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) => {
            let ip = u32::from(v4);
            (FIRST_IP..=LAST_IP)
                .contains(&ip)
                .then(|| (ip - FIRST_IP) as usize)
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(|v4| id_of(IpAddr::V4(v4))),
    }
}

/// Per-turn counters, added to [`EngineStats`] once per turn.
#[derive(Default)]
struct Tally {
    datagrams: u64,
    unroutable: u64,
    not_loopback: u64,
    malformed: u64,
    media_packets: u64,
    decrypted: u64,
    undecrypted: u64,
    duplicates: u64,
    too_old: u64,
    unmapped: u64,
    ssrc_overflow: u64,
    sent: u64,
    send_dropped: u64,
    send_errors: u64,
    input_errors: u64,
    turns: u64,
}

/// A packet handed to str0m, waiting to come out decrypted.
#[derive(Clone, Copy)]
struct Expect {
    ssrc: u32,
    len: usize,
    header_len: usize,
}

/// A track's identity once str0m mapped its SSRC.
struct Track {
    stats: Arc<TrackStats>,
    kind: MediaKind,
    /// `participant_hash` of the publisher (from the stream id, or learnt from the first intact
    /// payload: None until then).
    sender: Option<u32>,
}

/// One SSRC a receiver gets: counted here, published to its track's [`TrackStats`].
struct SsrcState {
    seq: SeqTracker,
    received: u64,
    bad: u64,
    bytes: u64,
    duplicates: u64,
    decrypted: u64,
    decrypted_by_layer: [u64; LAYERS],
    /// SRTP trailer bytes (auth tag), learnt from the first decrypted packet.
    trailer: usize,
    unmapped_feeds: u32,
    first_key: u8,
    track: Option<Track>,
}

impl Default for SsrcState {
    fn default() -> Self {
        SsrcState {
            seq: SeqTracker::default(),
            received: 0,
            bad: 0,
            bytes: 0,
            duplicates: 0,
            decrypted: 0,
            decrypted_by_layer: [0; LAYERS],
            trailer: 16,
            unmapped_feeds: 0,
            first_key: 0,
            track: None,
        }
    }
}

impl SsrcState {
    /// Copies the counters to the track (single writer: plain stores).
    fn publish(&self) {
        let Some(track) = &self.track else { return };
        let t = &track.stats;
        t.received.store(self.received, Ordering::Relaxed);
        t.bad.store(self.bad, Ordering::Relaxed);
        t.bytes.store(self.bytes, Ordering::Relaxed);
        t.duplicates.store(self.duplicates, Ordering::Relaxed);
        t.decrypted.store(self.decrypted, Ordering::Relaxed);
        t.first_key.store(self.first_key, Ordering::Relaxed);
        for (counter, n) in t.decrypted_by_layer.iter().zip(self.decrypted_by_layer) {
            counter.store(n, Ordering::Relaxed);
        }
        if let Some((first, max)) = self.seq.range() {
            t.first_seq.store(first, Ordering::Relaxed);
            t.max_seq.store(max, Ordering::Relaxed);
        }
    }
}

struct Recv {
    rtc: Rtc,
    /// Its host candidate: 127.1.x.y on the engine's port.
    local: SocketAddr,
    shared: Arc<ReceiverShared>,
    ssrcs: HashMap<u32, SsrcState>,
    pending: Option<SdpPendingOffer>,
    /// The earliest wake-up of this receiver in the timer heap.
    scheduled: Option<Instant>,
    /// Closing: removed once str0m has sent its goodbyes.
    closing: bool,
}

/// Everything but the receivers, so a receiver and the context borrow apart.
struct Ctx {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    port: u16,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    tally: Tally,
    stats: Arc<EngineStats>,
    totals: Arc<Totals>,
    every: u64,
    expect: Option<Expect>,
    batch_packets: u64,
    batch_bytes: u64,
}

struct Loop {
    /// Batched reads (the server's media worker reads the same way).
    receiver: Receiver,
    config: RtcConfig,
    recvs: Vec<Option<Recv>>,
    commands: mpsc::Receiver<Command>,
    stop: bool,
    ctx: Ctx,
}

impl Loop {
    fn run(self) {
        if let Some(task) = crate::load::system::current_thread() {
            let _ = self.ctx.stats.thread.set(task);
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cannot start the lite receivers' runtime: {e}");
                return;
            }
        };
        runtime.block_on(self.event_loop());
    }

    async fn event_loop(mut self) {
        let socket = match self
            .ctx
            .socket
            .try_clone()
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot register the lite receivers' socket: {e}");
                return;
            }
        };
        while !self.stop {
            let now = Instant::now();
            let deadline = self
                .ctx
                .timers
                .peek()
                .map_or(now + Duration::from_secs(1), |Reverse((t, _))| *t)
                .max(now + TIMER_SLACK);
            let mut woken_by_socket = false;
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(command) => {
                        self.on_command(command);
                        // Take whatever else is queued in the same turn.
                        for _ in 0..64 {
                            match self.commands.try_recv() {
                                Ok(command) => self.on_command(command),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                ready = socket.readable() => match ready {
                    Ok(()) => woken_by_socket = true,
                    Err(e) => {
                        tracing::error!("lite receivers' socket: {e}");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            // Every turn reads what the socket holds: a steady stream of commands (a burst of
            // joins) wins the select and must not starve ICE and DTLS on the socket.
            self.read_socket(&socket, woken_by_socket);
            self.ctx.tally.turns += 1;
            self.run_timers();
            self.publish_tally();
        }
    }

    /// `woken`: the socket woke the loop, so its readiness goes through tokio (which learns
    /// when it is drained); otherwise the socket is asked directly, since tokio's view of it is
    /// only refreshed when the loop yields, which a stream of commands can put off.
    fn read_socket(&mut self, socket: &tokio::net::UdpSocket, woken: bool) {
        for _ in 0..RECV_BATCHES_PER_TURN {
            let read = if woken {
                socket.try_io(tokio::io::Interest::READABLE, || {
                    self.receiver.recv(&self.ctx.socket)
                })
            } else {
                self.receiver.recv(&self.ctx.socket)
            };
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("lite recv: {e}");
                    break;
                }
            };
            let now = Instant::now();
            for (from, dst, d) in self.receiver.datagrams(n) {
                on_datagram(&mut self.recvs, &mut self.ctx, from, dst, d, now);
            }
            let ctx = &mut self.ctx;
            if ctx.batch_packets > 0 {
                ctx.totals.add(ctx.batch_packets, ctx.batch_bytes);
                ctx.batch_packets = 0;
                ctx.batch_bytes = 0;
            }
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, id))) = self.ctx.timers.peek().copied() {
            if t > now {
                break;
            }
            self.ctx.timers.pop();
            let Some(r) = self.recvs.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            if r.scheduled != Some(t) {
                continue; // superseded by an earlier entry
            }
            r.scheduled = None;
            if let Err(e) = r.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(receiver = id, "timeout: {e}");
            }
            drive(r, id, &mut self.ctx);
            self.reap(id);
        }
    }

    /// Forgets a closing receiver once str0m is done with it.
    fn reap(&mut self, id: usize) {
        if let Some(slot) = self.recvs.get_mut(id)
            && slot
                .as_ref()
                .is_some_and(|r| r.closing && !r.rtc.is_alive())
        {
            *slot = None;
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Open {
                shared,
                shape,
                reply,
            } => {
                let result = self.open(shared, shape, now);
                let id = result.as_ref().ok().map(|o| o.id);
                let _ = reply.send(result);
                if let Some(id) = id
                    && let Some(Some(r)) = self.recvs.get_mut(id)
                {
                    drive(r, id, &mut self.ctx);
                }
            }
            Command::RemoteOffer { id, sdp, reply } => {
                let Some(r) = live(&mut self.recvs, id) else {
                    let _ = reply.send(Err(anyhow!("receiver {id} is closed")));
                    return;
                };
                // Polite peer: an offer of our own still outstanding is rolled back.
                r.pending = None;
                let result = SdpOffer::from_sdp_string(&sdp)
                    .map_err(|e| anyhow!("server offer: {e}"))
                    .and_then(|offer| {
                        r.rtc
                            .sdp_api()
                            .accept_offer(offer)
                            .map_err(|e| anyhow!("server offer refused: {e}"))
                    })
                    .map(|answer| answer.to_sdp_string());
                let _ = reply.send(result);
                drive(r, id, &mut self.ctx);
            }
            Command::RemoteAnswer { id, sdp, reply } => {
                let Some(r) = live(&mut self.recvs, id) else {
                    let _ = reply.send(Err(anyhow!("receiver {id} is closed")));
                    return;
                };
                let result = match r.pending.take() {
                    None => Err(anyhow!("an answer without an offer outstanding")),
                    Some(pending) => SdpAnswer::from_sdp_string(&sdp)
                        .map_err(|e| anyhow!("server answer: {e}"))
                        .and_then(|answer| {
                            r.rtc
                                .sdp_api()
                                .accept_answer(pending, answer)
                                .map_err(|e| anyhow!("server answer refused: {e}"))
                        }),
                };
                let _ = reply.send(result);
                drive(r, id, &mut self.ctx);
            }
            Command::RemoteCandidate { id, candidate } => {
                let Some(r) = live(&mut self.recvs, id) else {
                    return;
                };
                let value = candidate.strip_prefix("a=").unwrap_or(&candidate);
                match Candidate::from_sdp_string(value) {
                    Ok(c) if c.addr().ip().is_loopback() => {
                        r.rtc.add_remote_candidate(c);
                        drive(r, id, &mut self.ctx);
                    }
                    Ok(_) => self.ctx.tally.not_loopback += 1,
                    Err(e) => tracing::debug!(receiver = id, "bad server candidate: {e}"),
                }
            }
            Command::Close { id } => {
                let Some(r) = live(&mut self.recvs, id) else {
                    return;
                };
                r.closing = true;
                r.shared.connected.store(false, Ordering::Relaxed);
                if r.rtc.close().is_err() {
                    r.rtc.disconnect();
                }
                drive(r, id, &mut self.ctx);
                self.reap(id);
            }
            Command::Shutdown => self.stop = true,
        }
    }

    fn open(
        &mut self,
        shared: Arc<ReceiverShared>,
        shape: OfferShape,
        now: Instant,
    ) -> anyhow::Result<Opened> {
        let id = self.recvs.len();
        let Some(ip) = ip_of(id) else {
            bail!("out of loopback addresses for lite receivers");
        };
        let local = SocketAddr::new(IpAddr::V4(ip), self.ctx.port);
        let mut rtc = self.config.clone().build(now);
        let candidate = Candidate::host(local, "udp").context("host candidate")?;
        let candidate_sdp = candidate.to_sdp_string();
        if rtc.add_local_candidate(candidate).is_none() {
            bail!("str0m refused the host candidate {local}");
        }
        let mut api = rtc.sdp_api();
        match shape {
            OfferShape::Chat => {
                api.add_channel(switchboard::client::CHAT_LABEL.to_string());
            }
            OfferShape::ReceiveOnly { audio, video } => {
                for (on, kind) in [(audio, StrMediaKind::Audio), (video, StrMediaKind::Video)] {
                    if on {
                        api.add_media(kind, Direction::RecvOnly, None, None, None);
                    }
                }
            }
            OfferShape::None => {}
        }
        let (offer, pending) = match api.apply() {
            Some((offer, pending)) => (Some(offer.to_sdp_string()), Some(pending)),
            None if shape == OfferShape::None => (None, None),
            None => bail!("nothing to offer"),
        };
        self.recvs.push(Some(Recv {
            rtc,
            local,
            shared,
            ssrcs: HashMap::new(),
            pending,
            scheduled: None,
            closing: false,
        }));
        self.ctx.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Opened {
            id,
            offer,
            candidate: candidate_sdp,
        })
    }

    fn publish_tally(&mut self) {
        let t = std::mem::take(&mut self.ctx.tally);
        if t.turns > 0
            && self
                .ctx
                .stats
                .turns
                .load(Ordering::Relaxed)
                .is_multiple_of(1024)
            && let Ok(q) = switchboard::media::receive_queue(&self.ctx.socket)
        {
            self.ctx
                .stats
                .socket_drops
                .store(u64::from(q.drops), Ordering::Relaxed);
        }
        let s = &self.ctx.stats;
        for (counter, n) in [
            (&s.datagrams, t.datagrams),
            (&s.unroutable, t.unroutable),
            (&s.not_loopback, t.not_loopback),
            (&s.malformed, t.malformed),
            (&s.media_packets, t.media_packets),
            (&s.decrypted, t.decrypted),
            (&s.undecrypted, t.undecrypted),
            (&s.duplicates, t.duplicates),
            (&s.too_old, t.too_old),
            (&s.unmapped, t.unmapped),
            (&s.ssrc_overflow, t.ssrc_overflow),
            (&s.sent, t.sent),
            (&s.send_dropped, t.send_dropped),
            (&s.send_errors, t.send_errors),
            (&s.input_errors, t.input_errors),
            (&s.turns, t.turns),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// A receiver that is not closing.
fn live(recvs: &mut [Option<Recv>], id: usize) -> Option<&mut Recv> {
    recvs
        .get_mut(id)
        .and_then(Option::as_mut)
        .filter(|r| !r.closing)
}

fn on_datagram(
    recvs: &mut [Option<Recv>],
    ctx: &mut Ctx,
    from: SocketAddr,
    dst: Option<IpAddr>,
    d: &[u8],
    now: Instant,
) {
    ctx.tally.datagrams += 1;
    if !from.ip().is_loopback() {
        ctx.tally.not_loopback += 1;
        return;
    }
    let Some((id, r)) = dst
        .and_then(id_of)
        .and_then(|id| Some((id, recvs.get_mut(id)?.as_mut()?)))
    else {
        ctx.tally.unroutable += 1;
        return;
    };
    match rtp::classify(d) {
        Kind::Rtp => on_media(r, id, ctx, from, d, now),
        Kind::Stun | Kind::Dtls | Kind::Rtcp => feed(r, id, ctx, from, d, now),
        Kind::Other => ctx.tally.malformed += 1,
    }
}

/// The cheap path: count from the clear header; hand to str0m only the first few and then a
/// sample.
fn on_media(r: &mut Recv, id: usize, ctx: &mut Ctx, from: SocketAddr, d: &[u8], now: Instant) {
    let Some(h) = rtp::parse_header(d) else {
        ctx.tally.malformed += 1;
        return;
    };
    if r.ssrcs.len() >= MAX_SSRCS && !r.ssrcs.contains_key(&h.ssrc) {
        ctx.tally.ssrc_overflow += 1;
        return;
    }
    let st = r.ssrcs.entry(h.ssrc).or_insert_with(|| {
        r.shared.ssrcs.fetch_add(1, Ordering::Relaxed);
        SsrcState::default()
    });
    match st.seq.push(h.seq) {
        Seen::New(_) => {}
        Seen::Duplicate => {
            ctx.tally.duplicates += 1;
            st.duplicates += 1;
            st.publish();
            return;
        }
        Seen::TooOld => {
            ctx.tally.too_old += 1;
            return;
        }
    }
    st.received += 1;
    let payload = d.len().saturating_sub(h.header_len + st.trailer) as u64;
    st.bytes += payload;
    ctx.batch_packets += 1;
    ctx.batch_bytes += payload;
    ctx.tally.media_packets += 1;
    let mapped = st.track.is_some();
    let sampled = st.received.is_multiple_of(ctx.every);
    let decrypt = if mapped {
        st.received <= FIRST_FEW || sampled
    } else {
        st.unmapped_feeds < MAX_UNMAPPED_FEEDS || sampled
    };
    st.publish();
    if !decrypt {
        if !mapped {
            ctx.tally.unmapped += 1;
        }
        return;
    }
    if !mapped {
        st.unmapped_feeds += 1;
    }
    ctx.tally.decrypted += 1;
    ctx.expect = Some(Expect {
        ssrc: h.ssrc,
        len: d.len(),
        header_len: h.header_len,
    });
    feed(r, id, ctx, from, d, now);
    let came_out = ctx.expect.take().is_none();
    if mapped && !came_out {
        ctx.tally.undecrypted += 1;
    }
    if !mapped && !came_out {
        // str0m knows no track for this SSRC (yet): counted, but on no track.
        ctx.tally.unmapped += 1;
    }
}

/// Hands a datagram to the receiver's str0m and drains what it says.
fn feed(r: &mut Recv, id: usize, ctx: &mut Ctx, from: SocketAddr, d: &[u8], now: Instant) {
    match Receive::new(Protocol::Udp, from, r.local, d) {
        Ok(receive) => {
            if let Err(e) = r.rtc.handle_input(Input::Receive(now, receive)) {
                ctx.tally.input_errors += 1;
                tracing::trace!(receiver = id, "input refused: {e}");
            }
        }
        Err(_) => {
            ctx.tally.malformed += 1;
            return;
        }
    }
    drive(r, id, ctx);
}

/// Polls a receiver's str0m until it has nothing more to say, acting on what it says.
fn drive(r: &mut Recv, id: usize, ctx: &mut Ctx) {
    loop {
        if !r.rtc.is_alive() {
            r.shared.failed.store(true, Ordering::Relaxed);
            r.shared.connected.store(false, Ordering::Relaxed);
            return;
        }
        match r.rtc.poll_output() {
            Ok(Output::Transmit(t)) => ctx.send(t.source, t.destination, &t.contents),
            Ok(Output::Timeout(t)) => {
                if r.scheduled.is_none_or(|s| t < s) {
                    r.scheduled = Some(t);
                    ctx.timers.push(Reverse((t, id)));
                }
                return;
            }
            Ok(Output::Event(event)) => on_event(r, ctx, event),
            Err(e) => {
                tracing::debug!(receiver = id, "lite receiver failed: {e}");
                r.rtc.disconnect();
            }
        }
    }
}

fn on_event(r: &mut Recv, ctx: &mut Ctx, event: Event) {
    match event {
        Event::Connected => r.shared.connected.store(true, Ordering::Relaxed),
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
            r.shared.failed.store(true, Ordering::Relaxed);
            r.shared.connected.store(false, Ordering::Relaxed);
        }
        Event::MediaAdded(added) => {
            if let Some(stream) = r.rtc.direct_api().stream_rx_by_mid(added.mid, None) {
                stream.suppress_nack(true);
            }
        }
        Event::RtpPacket(packet) => on_rtp(r, ctx, packet),
        _ => {}
    }
}

/// A packet str0m decrypted (one we handed it): map its SSRC to a track the first time, learn
/// the SRTP trailer, check the payload, and take its latency.
fn on_rtp(r: &mut Recv, ctx: &mut Ctx, packet: RtpPacket) {
    let ssrc = *packet.header.ssrc;
    let Some(expect) = ctx.expect.filter(|e| e.ssrc == ssrc) else {
        return;
    };
    ctx.expect = None;
    let Some(st) = r.ssrcs.get_mut(&ssrc) else {
        return;
    };
    if st.track.is_none() {
        let mut api = r.rtc.direct_api();
        let Some(stream) = api.stream_rx(&packet.header.ssrc) else {
            return;
        };
        stream.suppress_nack(true);
        let mid = stream.mid();
        let Some(media) = r.rtc.media(mid) else {
            return;
        };
        let kind = match media.kind() {
            StrMediaKind::Audio => MediaKind::Audio,
            StrMediaKind::Video => MediaKind::Video,
        };
        let stream_id = media.stream_id().to_owned();
        let stats = Arc::new(TrackStats {
            track_id: media.track_id().to_owned(),
            stream_id: stream_id.clone(),
            kind,
            received: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            first_seq: AtomicU64::new(0),
            max_seq: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            decrypted: AtomicU64::new(0),
            first_key: AtomicU8::new(0),
            decrypted_by_layer: Default::default(),
        });
        r.shared
            .tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats.clone());
        st.track = Some(Track {
            stats,
            kind,
            sender: (!r.shared.sender_from_payload)
                .then(|| payload::participant_hash(publisher_of_stream(&stream_id))),
        });
    }
    let Some(track) = &mut st.track else { return };
    st.decrypted += 1;
    if !packet.header.has_padding {
        let trailer = expect
            .len
            .saturating_sub(expect.header_len + packet.payload.len());
        if trailer <= MAX_SRTP_TRAILER {
            st.trailer = trailer;
        }
    }
    match payload::parse_payload(&packet.payload) {
        Ok(h) if track.sender.is_none_or(|s| s == h.sender) && h.kind == track.kind => {
            track.sender = Some(h.sender);
            st.decrypted_by_layer[usize::from(h.layer).min(LAYERS - 1)] += 1;
            if st.first_key == 0 {
                st.first_key = if payload::is_key(&packet.payload) {
                    1
                } else {
                    2
                };
            }
            let now_us = payload::now_micros();
            let _ = r.shared.first_media_us.compare_exchange(
                0,
                now_us,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if ctx.totals.measuring() {
                let latency = now_us.saturating_sub(h.sent_at_us);
                match track.kind {
                    MediaKind::Audio => ctx.totals.audio.record(latency),
                    MediaKind::Video => ctx.totals.video.record(latency),
                }
            }
        }
        _ => st.bad += 1,
    }
    st.publish();
}

impl Ctx {
    /// Sends one datagram from a receiver's own address; never waits (a full socket drops it).
    fn send(&mut self, from: SocketAddr, to: SocketAddr, contents: &[u8]) {
        if !to.ip().is_loopback() || !from.ip().is_loopback() {
            self.tally.not_loopback += 1;
            return;
        }
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: Some(from.ip()),
        };
        match self.state.try_send((&self.socket).into(), &transmit) {
            Ok(()) => self.tally.sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tally.send_dropped += 1,
            Err(e) => {
                self.tally.send_errors += 1;
                tracing::debug!(%to, "lite send: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        assert_eq!(ip_of(0), Some(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(ip_of(255), Some(Ipv4Addr::new(127, 1, 1, 0)));
        assert_eq!(id_of(IpAddr::V4(Ipv4Addr::new(127, 1, 1, 0))), Some(255));
        assert_eq!(id_of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))), None);
        assert_eq!(id_of(IpAddr::V4(Ipv4Addr::new(127, 255, 255, 255))), None);
        assert_eq!(id_of(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1))), None);
        let last = (LAST_IP - FIRST_IP) as usize;
        assert!(ip_of(last).is_some());
        assert_eq!(ip_of(last + 1), None);
        for id in [0, 1, 7, 65_535, 1 << 20] {
            assert_eq!(id_of(IpAddr::V4(ip_of(id).unwrap())), Some(id));
        }
    }
}
