//! Spike: compare two sans-IO WebRTC engines as the server side of an SFU.
//!
//! One publisher is fanned out to N subscribers over real ICE + DTLS + SRTP on
//! 127.0.0.1 UDP. The server is either `str0m` (RTP mode, ICE-lite) or
//! webrtc-rs `rtc` (sans-IO `RTCPeerConnection`, ICE-lite). The client peers are
//! always str0m `Rtc` instances (full ICE, RTP mode) on a separate thread.
//!
//! Run: `cargo bench --bench engine_spike -- --subscribers 200 --seconds 10`
//!
//! Options (after `--`):
//!   --subscribers N   subscriber connections (default 200)
//!   --seconds S       measurement window in seconds (default 10)
//!   --warmup S        warm-up before the window (default 2)
//!   --pps P           publisher packets per second, 1000-byte payloads (default 250)
//!   --runs R          repetitions of every engine, interleaved (default 1)
//!   --engines LIST    comma list of str0m, str0m-batch, rtc, rtc-direct
//!                     (default str0m,str0m-batch,rtc)
//!   --batch           shorthand: add str0m-batch (sendmmsg) to the list
//!   --rtc-dtls-role R client|server: DTLS role of the rtc server when answering
//!                     (default client; str0m's answerer always takes server/passive)
//!
//! Engines:
//!   str0m        str0m 0.25 server, one `send_to` per datagram
//!   str0m-batch  same, outgoing datagrams of one loop turn sent with `sendmmsg`
//!   rtc          rtc 0.21 server, `RTCRtpSender::write_rtp` per subscriber
//!   rtc-direct   rtc 0.21 server, `RTCPeerConnection::handle_write` (skips the
//!                sender's per-packet parameter validation)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;

// ---------------------------------------------------------------------------
// Counting allocator: live bytes allocated while the thread-local flag is set.
// ---------------------------------------------------------------------------

struct CountingAlloc;

static SERVER_LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    TRACKED.try_with(Cell::get).unwrap_or(false)
}

fn set_tracked(on: bool) -> bool {
    TRACKED.try_with(|t| t.replace(on)).unwrap_or(false)
}

/// Run `f` with allocation tracking switched off on this thread (for memory
/// that crosses threads, e.g. channel traffic).
fn untracked<R>(f: impl FnOnce() -> R) -> R {
    let prev = set_tracked(false);
    let r = f();
    set_tracked(prev);
    r
}

/// Take ownership of a String allocated on another thread: copy it into a
/// tracked allocation and free the foreign one untracked.
fn adopt(s: String) -> String {
    let own = s.clone();
    untracked(|| drop(s));
    own
}

fn count(delta: i64) {
    if tracked() {
        SERVER_LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards unchanged to `System`, which upholds the
// `GlobalAlloc` contract; we only add bookkeeping on an atomic counter and a
// const-initialised, destructor-free thread local (never allocates).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (all our allocations are).
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from `System` via this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Small libc helpers.
// ---------------------------------------------------------------------------

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// (run ns, run-queue wait ns) of the calling thread from /proc/thread-self/schedstat.
fn sched_wait() -> (u64, u64) {
    untracked(|| {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let mut it = text
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    })
}

/// Pin the calling thread to one CPU (best effort).
fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: `cpu_set_t` is plain data (all-zero is the empty set); CPU_SET
    // bounds-checks `cpu`; pid 0 means the calling thread; size is exact.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Ask for a larger socket receive buffer (capped by net.core.rmem_max).
fn set_rcvbuf(sock: &UdpSocket, bytes: i32) {
    let val: libc::c_int = bytes;
    // SAFETY: valid fd owned by `sock`; `val` is a live c_int and the length matches it.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

const RCVBUF: i32 = 4 << 20;

fn sockaddr_v4(addr: &SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(a) = addr else {
        panic!("only IPv4 loopback is used");
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Outgoing datagrams of the server: sent at once, or collected per loop turn
/// and flushed with `sendmmsg`.
struct Outbox {
    sock: UdpSocket,
    batch: bool,
    queue: Vec<(SocketAddr, Vec<u8>)>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    send_errors: u64,
    syscalls: u64,
    datagrams: u64,
}

impl Outbox {
    fn new(sock: UdpSocket, batch: bool) -> Self {
        Outbox {
            sock,
            batch,
            queue: Vec::with_capacity(1024),
            addrs: Vec::with_capacity(1024),
            iovs: Vec::with_capacity(1024),
            msgs: Vec::with_capacity(1024),
            send_errors: 0,
            syscalls: 0,
            datagrams: 0,
        }
    }

    fn send_owned(&mut self, dest: SocketAddr, data: Vec<u8>) {
        if self.batch {
            self.queue.push((dest, data));
        } else {
            self.send_now(dest, &data);
        }
    }

    fn send_ref(&mut self, dest: SocketAddr, data: &[u8]) {
        if self.batch {
            self.queue.push((dest, data.to_vec()));
        } else {
            self.send_now(dest, data);
        }
    }

    fn send_now(&mut self, dest: SocketAddr, data: &[u8]) {
        self.syscalls += 1;
        self.datagrams += 1;
        if self.sock.send_to(data, dest).is_err() {
            self.send_errors += 1;
        }
    }

    fn flush(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let fd = self.sock.as_raw_fd();
        let queue = std::mem::take(&mut self.queue);
        for chunk in queue.chunks(1024) {
            self.addrs.clear();
            self.iovs.clear();
            self.msgs.clear();
            for (dest, data) in chunk {
                self.addrs.push(sockaddr_v4(dest));
                self.iovs.push(libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                });
            }
            for i in 0..chunk.len() {
                self.msgs.push(libc::mmsghdr {
                    msg_hdr: libc::msghdr {
                        msg_name: &mut self.addrs[i] as *mut libc::sockaddr_in as *mut libc::c_void,
                        msg_namelen: std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        msg_iov: &mut self.iovs[i],
                        msg_iovlen: 1,
                        msg_control: std::ptr::null_mut(),
                        msg_controllen: 0,
                        msg_flags: 0,
                    },
                    msg_len: 0,
                });
            }
            let mut done = 0usize;
            while done < self.msgs.len() {
                let rest = &mut self.msgs[done..];
                // SAFETY: `rest` points at `rest.len()` initialised mmsghdr whose
                // name/iov pointers reference `self.addrs`, `self.iovs` and `queue`,
                // all alive and unmoved for the duration of the call.
                let n =
                    unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
                self.syscalls += 1;
                if n <= 0 {
                    // Skip the datagram that failed and go on.
                    self.send_errors += 1;
                    done += 1;
                } else {
                    done += n as usize;
                    self.datagrams += n as u64;
                }
            }
        }
        // Keep the queue's capacity for the next turn.
        self.queue = queue;
        self.queue.clear();
    }
}

/// Local ICE ufrag of the server from a STUN request's USERNAME
/// ("serverufrag:clientufrag").
fn stun_server_ufrag(d: &[u8]) -> Option<&str> {
    if d.len() < 20 || d[0] >= 2 {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    let end = (20 + len).min(d.len());
    let mut i = 20;
    while i + 4 <= end {
        let t = u16::from_be_bytes([d[i], d[i + 1]]);
        let l = u16::from_be_bytes([d[i + 2], d[i + 3]]) as usize;
        let v = d.get(i + 4..i + 4 + l)?;
        if t == 0x0006 {
            let s = std::str::from_utf8(v).ok()?;
            return s.split(':').next();
        }
        i += 4 + l.div_ceil(4) * 4;
    }
    None
}

fn is_stun(d: &[u8]) -> bool {
    d.first().is_some_and(|b| *b < 2)
}

fn sdp_mid(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(str::trim)
}

fn server_creds(idx: usize) -> (String, String) {
    (format!("sfu{idx:05}"), format!("benchpassword{idx:010}"))
}

// ---------------------------------------------------------------------------
// Shared plumbing between main, server and client threads.
// ---------------------------------------------------------------------------

const PH_SETUP: u8 = 0;
const PH_WARMUP: u8 = 1;
const PH_MEASURE: u8 = 2;
const PH_DRAIN: u8 = 3;
const PH_STOP: u8 = 4;

const PAYLOAD_LEN: usize = 1000;
const MAX_WAIT: Duration = Duration::from_millis(5);
const MIN_WAIT: Duration = Duration::from_micros(100);

struct Offer {
    idx: usize,
    publisher: bool,
    sdp: String,
}

struct Answer {
    idx: usize,
    sdp: String,
}

struct ServerIo {
    offers: Receiver<Offer>,
    answers: Sender<Answer>,
    phase: Arc<AtomicU8>,
    addr_tx: Sender<SocketAddr>,
    batch: bool,
    direct: bool,
    rtc_dtls_client: bool,
}

#[derive(Default, Clone)]
struct ServerReport {
    cpu: Duration,
    wall: Duration,
    forwarded: u64,
    connected: usize,
    write_errors: u64,
    send_errors: u64,
    syscalls: u64,
    datagrams: u64,
    pinned: bool,
    setup_cpu: Duration,
    pub_in: u64,
    /// Share of the window the server thread was runnable but waiting for a CPU.
    runq_wait_pct: f64,
    note: String,
}

/// Tracks phase changes on the server thread and snapshots CPU and counters
/// at the window edges.
#[derive(Default)]
struct Window {
    seen: u8,
    cpu0: Duration,
    t0: Option<Instant>,
    fwd0: u64,
    dg0: u64,
    sc0: u64,
    pub0: u64,
    sched0: (u64, u64),
    /// Publisher RTP packets handed to the application by the engine.
    pub_in: u64,
    report: ServerReport,
}

impl Window {
    /// Returns true when the server should stop.
    fn update(&mut self, phase: u8, fwd: u64, out: &Outbox) -> bool {
        if phase == self.seen {
            return phase >= PH_STOP;
        }
        if phase >= PH_WARMUP && self.seen < PH_WARMUP {
            self.report.setup_cpu = thread_cpu();
        }
        if phase >= PH_MEASURE && self.seen < PH_MEASURE {
            self.cpu0 = thread_cpu();
            self.t0 = Some(Instant::now());
            self.fwd0 = fwd;
            self.pub0 = self.pub_in;
            self.sched0 = sched_wait();
            self.dg0 = out.datagrams;
            self.sc0 = out.syscalls;
        }
        if phase >= PH_DRAIN
            && self.seen < PH_DRAIN
            && let Some(t0) = self.t0
        {
            self.report.cpu = thread_cpu() - self.cpu0;
            self.report.wall = t0.elapsed();
            self.report.forwarded = fwd - self.fwd0;
            self.report.pub_in = self.pub_in - self.pub0;
            let s1 = sched_wait();
            let wall_ns = self.report.wall.as_nanos().max(1) as f64;
            self.report.runq_wait_pct = 100.0 * s1.1.saturating_sub(self.sched0.1) as f64 / wall_ns;
            self.report.datagrams = out.datagrams - self.dg0;
            self.report.syscalls = out.syscalls - self.sc0;
        }
        self.seen = phase;
        phase >= PH_STOP
    }
}

fn recv_wait(sock: &UdpSocket, next_wake: Instant, last: &mut Duration) {
    let wait = next_wake
        .saturating_duration_since(Instant::now())
        .clamp(MIN_WAIT, MAX_WAIT);
    // Avoid a setsockopt per turn when the value barely changes.
    if wait.abs_diff(*last) > Duration::from_micros(250) {
        let _ = sock.set_read_timeout(Some(wait));
        *last = wait;
    }
}

// ---------------------------------------------------------------------------
// str0m server.
// ---------------------------------------------------------------------------

mod s0 {
    use super::*;
    use str0m::media::{MediaKind, Mid};
    use str0m::net::{Protocol, Receive};
    use str0m::rtp::{RtpPacket, RtpWrite};
    use str0m::{Candidate, Event, IceCreds, Input, Output, Rtc};

    struct Conn {
        rtc: Rtc,
        publisher: bool,
        mid: Mid,
        connected: bool,
        dead: bool,
        next_seq: u64,
        timeout: Instant,
    }

    /// Poll until Timeout. Returns true if the connection became connected.
    fn drain(
        idx: usize,
        c: &mut Conn,
        out: &mut Outbox,
        by_addr: &mut HashMap<SocketAddr, usize>,
        rtp: &mut Vec<RtpPacket>,
    ) -> bool {
        let mut became = false;
        loop {
            match c.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    c.timeout = t;
                    break;
                }
                Ok(Output::Transmit(t)) => {
                    if is_stun(&t.contents) {
                        by_addr.entry(t.destination).or_insert(idx);
                    }
                    out.send_owned(t.destination, t.contents.into());
                }
                Ok(Output::Event(Event::Connected)) => {
                    if !c.connected {
                        c.connected = true;
                        became = true;
                    }
                }
                Ok(Output::Event(Event::RtpPacket(p))) => {
                    if c.publisher {
                        rtp.push(p);
                    }
                }
                Ok(Output::Event(_)) => {}
                Err(_) => {
                    c.dead = true;
                    c.timeout = Instant::now() + Duration::from_secs(3600);
                    break;
                }
            }
        }
        became
    }

    pub fn server(io: ServerIo) -> ServerReport {
        set_tracked(true);
        let pinned = pin_to_cpu(0);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind server");
        set_rcvbuf(&sock, RCVBUF);
        let local = sock.local_addr().expect("local addr");
        let mut out = Outbox::new(sock.try_clone().expect("clone socket"), io.batch);
        untracked(|| io.addr_tx.send(local)).expect("addr");

        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut by_addr: HashMap<SocketAddr, usize> = HashMap::new();
        let mut by_ufrag: HashMap<String, usize> = HashMap::new();
        let mut subs: Vec<usize> = Vec::new();
        let mut buf = vec![0u8; 2048];
        let mut rtp: Vec<RtpPacket> = Vec::new();
        let mut scratch: Vec<RtpPacket> = Vec::new();
        let mut fwd: u64 = 0;
        let mut next_wake = Instant::now() + MAX_WAIT;
        let mut last_wait = Duration::ZERO;
        let mut win = Window::default();
        let mut mid_in_ext: Option<bool> = None;

        loop {
            if win.update(io.phase.load(Ordering::Acquire), fwd, &out) {
                break;
            }

            // Signaling.
            while let Ok(offer) = untracked(|| io.offers.try_recv()) {
                let Offer {
                    idx,
                    publisher,
                    sdp,
                } = offer;
                let sdp = adopt(sdp);
                let now = Instant::now();
                let (ufrag, pass) = server_creds(idx);
                let mut rtc = Rtc::builder()
                    .set_ice_lite(true)
                    .set_rtp_mode(true)
                    .clear_codecs()
                    .enable_vp8(true)
                    .set_local_ice_credentials(IceCreds {
                        ufrag: ufrag.clone(),
                        pass,
                    })
                    .build(now);
                rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"));
                let offer = str0m::change::SdpOffer::from_sdp_string(&sdp).expect("offer");
                let answer = rtc.sdp_api().accept_offer(offer).expect("accept offer");
                let mid: Mid = sdp_mid(&sdp).expect("mid in offer").into();
                let answer = answer.to_sdp_string();
                let reply = untracked(|| answer.clone());
                untracked(|| io.answers.send(Answer { idx, sdp: reply })).expect("answer");
                if conns.len() <= idx {
                    conns.resize_with(idx + 1, || None);
                }
                by_ufrag.insert(ufrag, idx);
                let mut c = Conn {
                    rtc,
                    publisher,
                    mid,
                    connected: false,
                    dead: false,
                    next_seq: 1,
                    timeout: now,
                };
                drain(idx, &mut c, &mut out, &mut by_addr, &mut scratch);
                next_wake = next_wake.min(c.timeout);
                conns[idx] = Some(c);
            }

            // One datagram (or a receive timeout).
            recv_wait(&sock, next_wake, &mut last_wait);
            match sock.recv_from(&mut buf) {
                Ok((n, src)) => {
                    let now = Instant::now();
                    let data = &buf[..n];
                    let idx = by_addr
                        .get(&src)
                        .copied()
                        .or_else(|| stun_server_ufrag(data).and_then(|u| by_ufrag.get(u).copied()));
                    if let Some(idx) = idx
                        && let Some(c) = conns[idx].as_mut()
                        && let Ok(r) = Receive::new(Protocol::Udp, src, local, data)
                        && c.rtc.handle_input(Input::Receive(now, r)).is_ok()
                        && drain(idx, c, &mut out, &mut by_addr, &mut rtp)
                        && !c.publisher
                    {
                        subs.push(idx);
                    }
                    if let Some(idx) = idx
                        && let Some(c) = conns[idx].as_ref()
                    {
                        next_wake = next_wake.min(c.timeout);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {}
            }

            // Forward publisher packets to every connected subscriber.
            if !rtp.is_empty() {
                let now = Instant::now();
                win.pub_in += rtp.len() as u64;
                for p in rtp.drain(..) {
                    if mid_in_ext.is_none() {
                        mid_in_ext = Some(p.header.ext_vals.mid.is_some());
                    }
                    for &s in &subs {
                        let Some(c) = conns[s].as_mut() else { continue };
                        if c.dead {
                            continue;
                        }
                        let seq = c.next_seq;
                        c.next_seq += 1;
                        let mid = c.mid;
                        let mut api = c.rtc.direct_api();
                        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                            win.report.write_errors += 1;
                            continue;
                        };
                        tx.write_rtp(
                            RtpWrite::new(
                                p.header.payload_type,
                                seq.into(),
                                p.header.timestamp,
                                p.timestamp,
                                p.payload.clone(),
                            )
                            .marker(p.header.marker)
                            .nackable(true),
                        );
                        // Required: queued packets are only released after time moves.
                        let _ = c.rtc.handle_input(Input::Timeout(now));
                        drain(s, c, &mut out, &mut by_addr, &mut scratch);
                        next_wake = next_wake.min(c.timeout);
                        fwd += 1;
                    }
                }
            }

            // Timers: only when the earliest known deadline has passed.
            let now = Instant::now();
            if now >= next_wake {
                let mut earliest = now + MAX_WAIT;
                for (idx, slot) in conns.iter_mut().enumerate() {
                    let Some(c) = slot.as_mut() else { continue };
                    if c.dead {
                        continue;
                    }
                    if c.timeout <= now {
                        let _ = c.rtc.handle_input(Input::Timeout(now));
                        if drain(idx, c, &mut out, &mut by_addr, &mut rtp) && !c.publisher {
                            subs.push(idx);
                        }
                    }
                    earliest = earliest.min(c.timeout);
                }
                next_wake = earliest;
            }
            out.flush();
        }

        let mut report = win.report;
        report.connected = conns.iter().flatten().filter(|c| c.connected).count();
        report.send_errors = out.send_errors;
        report.pinned = pinned;
        report.note = format!(
            "incoming RtpPacket header.ext_vals.mid present: {}",
            mid_in_ext.map_or("n/a".to_string(), |b| b.to_string())
        );
        untracked(|| drop(conns));
        report
    }

    // ------------------------------------------------------------------
    // Client peers (str0m, full ICE), shared by both engines.
    // ------------------------------------------------------------------

    pub struct ClientCfg {
        pub n: usize,
        pub pps: u32,
        pub offers: Sender<Offer>,
        pub answers: Receiver<Answer>,
        pub phase: Arc<AtomicU8>,
        pub events: Sender<ClientEvent>,
    }

    pub enum ClientEvent {
        AllConnected(Duration),
        Done(ClientReport),
    }

    #[derive(Default, Clone)]
    pub struct ClientReport {
        pub sent_window: u64,
        pub received_window: u64,
        pub duplicates: u64,
        pub pub_tx: u64,
        pub tx_err: u64,
        pub min_sub_received: u64,
        pub cpu: Duration,
        pub wall: Duration,
        pub connected: usize,
        pub tx_ready_after_answer: bool,
    }

    struct Client {
        rtc: Rtc,
        sock: UdpSocket,
        local: SocketAddr,
        mid: Mid,
        pending: Option<str0m::change::SdpPendingOffer>,
        connected: bool,
        timeout: Instant,
        received: u64,
        duplicates: u64,
        seen: Vec<u64>,
        tx: u64,
        tx_err: u64,
    }

    fn client_drain(c: &mut Client, win: (u64, u64), connected: &mut usize) {
        loop {
            match c.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    c.timeout = t;
                    break;
                }
                Ok(Output::Transmit(t)) => {
                    c.tx += 1;
                    if c.sock.send_to(&t.contents, t.destination).is_err() {
                        c.tx_err += 1;
                    }
                }
                Ok(Output::Event(Event::Connected)) => {
                    if !c.connected {
                        c.connected = true;
                        *connected += 1;
                    }
                }
                Ok(Output::Event(Event::RtpPacket(p))) => {
                    if p.payload.len() >= 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&p.payload[..8]);
                        let i = u64::from_be_bytes(b);
                        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                        if c.seen.len() <= word {
                            c.seen.resize(word + 1, 0);
                        }
                        if c.seen[word] & bit != 0 {
                            c.duplicates += 1;
                        } else {
                            c.seen[word] |= bit;
                            if i >= win.0 && i < win.1 {
                                c.received += 1;
                            }
                        }
                    }
                }
                Ok(Output::Event(_)) => {}
                Err(_) => {
                    c.timeout = Instant::now() + Duration::from_secs(3600);
                    break;
                }
            }
        }
    }

    pub fn clients(cfg: ClientCfg) {
        pin_to_cpu(1);
        let total = cfg.n + 1;
        let mut clients: Vec<Client> = Vec::with_capacity(total);
        let mut offers = Vec::with_capacity(total);
        for idx in 0..total {
            let now = Instant::now();
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
            sock.set_nonblocking(true).expect("nonblocking");
            set_rcvbuf(&sock, RCVBUF);
            let local = sock.local_addr().expect("client addr");
            let mut rtc = Rtc::builder()
                .set_rtp_mode(true)
                .clear_codecs()
                .enable_vp8(true)
                .build(now);
            rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"));
            let dir = if idx == 0 {
                str0m::media::Direction::SendOnly
            } else {
                str0m::media::Direction::RecvOnly
            };
            let mut api = rtc.sdp_api();
            let mid = api.add_media(MediaKind::Video, dir, None, None, None);
            let (offer, pending) = api.apply().expect("offer");
            offers.push(Offer {
                idx,
                publisher: idx == 0,
                sdp: offer.to_sdp_string(),
            });
            clients.push(Client {
                rtc,
                sock,
                local,
                mid,
                pending: Some(pending),
                connected: false,
                timeout: now,
                received: 0,
                duplicates: 0,
                seen: Vec::new(),
                tx: 0,
                tx_err: 0,
            });
        }

        let setup_start = Instant::now();
        for o in offers {
            cfg.offers.send(o).expect("send offer");
        }

        let mut buf = vec![0u8; 2048];
        let mut connected = 0usize;
        let mut all_connected_at: Option<Instant> = None;
        let mut win = (u64::MAX, u64::MAX);
        let mut next_idx: u64 = 0;
        let interval = Duration::from_secs_f64(1.0 / cfg.pps as f64);
        let mut next_send = Instant::now();
        let mut seen = PH_SETUP;
        let mut cpu0 = Duration::ZERO;
        let mut t0 = Instant::now();
        let mut report = ClientReport::default();
        let mut tx_ready: Option<bool> = None;
        let mut pub_tx0 = 0u64;
        let mut pt = None;

        loop {
            // Answers.
            while let Ok(a) = cfg.answers.try_recv() {
                let c = &mut clients[a.idx];
                let ans = str0m::change::SdpAnswer::from_sdp_string(&a.sdp).expect("answer");
                let pending = c.pending.take().expect("pending");
                c.rtc
                    .sdp_api()
                    .accept_answer(pending, ans)
                    .expect("accept answer");
                if a.idx == 0 {
                    let mid = c.mid;
                    tx_ready = Some(c.rtc.direct_api().stream_tx_by_mid(mid, None).is_some());
                    pt = c
                        .rtc
                        .codec_config()
                        .find(|p| p.spec().codec == str0m::format::Codec::Vp8)
                        .map(|p| p.pt());
                }
                c.timeout = Instant::now();
            }

            // Phase bookkeeping.
            let ph = cfg.phase.load(Ordering::Acquire);
            if ph != seen {
                if ph >= PH_MEASURE && seen < PH_MEASURE {
                    win.0 = next_idx;
                    pub_tx0 = clients[0].tx;
                    cpu0 = thread_cpu();
                    t0 = Instant::now();
                }
                if ph >= PH_DRAIN && seen < PH_DRAIN {
                    win.1 = next_idx;
                    report.pub_tx = clients[0].tx - pub_tx0;
                    report.cpu = thread_cpu() - cpu0;
                    report.wall = t0.elapsed();
                }
                seen = ph;
                if ph >= PH_STOP {
                    break;
                }
            }

            let now = Instant::now();
            let mut busy = false;

            // Publisher.
            if (ph == PH_WARMUP || ph == PH_MEASURE)
                && now >= next_send
                && let Some(pt) = pt
            {
                if now > next_send + Duration::from_millis(100) {
                    next_send = now;
                }
                next_send += interval;
                let c = &mut clients[0];
                let mut payload = vec![0xA5u8; PAYLOAD_LEN];
                payload[..8].copy_from_slice(&next_idx.to_be_bytes());
                let seq = next_idx + 1;
                let ts = (next_idx * 90_000 / cfg.pps as u64) as u32;
                next_idx += 1;
                let mid = c.mid;
                if let Some(tx) = c.rtc.direct_api().stream_tx_by_mid(mid, None) {
                    tx.write_rtp(
                        RtpWrite::new(pt, seq.into(), ts, now, payload)
                            .marker(true)
                            .nackable(true),
                    );
                }
                let _ = c.rtc.handle_input(Input::Timeout(now));
                client_drain(c, win, &mut connected);
                busy = true;
            }

            // Sockets and timers.
            for c in clients.iter_mut() {
                for _ in 0..64 {
                    match c.sock.recv_from(&mut buf) {
                        Ok((n, src)) => {
                            busy = true;
                            let now = Instant::now();
                            if let Ok(r) = Receive::new(Protocol::Udp, src, c.local, &buf[..n])
                                && c.rtc.handle_input(Input::Receive(now, r)).is_ok()
                            {
                                client_drain(c, win, &mut connected);
                            }
                        }
                        Err(_) => break,
                    }
                }
                if c.pending.is_none() && Instant::now() >= c.timeout {
                    let _ = c.rtc.handle_input(Input::Timeout(Instant::now()));
                    client_drain(c, win, &mut connected);
                }
            }

            if all_connected_at.is_none() && connected == total {
                let t = Instant::now();
                all_connected_at = Some(t);
                let _ = cfg.events.send(ClientEvent::AllConnected(t - setup_start));
            }

            if !busy {
                thread::sleep(Duration::from_micros(200));
            }
        }

        report.sent_window = win.1.saturating_sub(win.0);
        report.received_window = clients[1..].iter().map(|c| c.received).sum();
        report.duplicates = clients[1..].iter().map(|c| c.duplicates).sum();
        report.tx_err = clients.iter().map(|c| c.tx_err).sum();
        report.min_sub_received = clients[1..].iter().map(|c| c.received).min().unwrap_or(0);
        report.connected = connected;
        report.tx_ready_after_answer = tx_ready.unwrap_or(false);
        let _ = cfg.events.send(ClientEvent::Done(report));
    }
}

// ---------------------------------------------------------------------------
// webrtc-rs `rtc` server.
// ---------------------------------------------------------------------------

mod wr {
    use super::*;
    use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
    use rtc::interceptor::Registry;
    use rtc::media_stream::MediaStreamTrack;
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
    use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_VP8, MediaEngine};
    use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
    use rtc::peer_connection::event::RTCPeerConnectionEvent;
    use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
    use rtc::peer_connection::sdp::RTCSessionDescription;
    use rtc::peer_connection::state::RTCPeerConnectionState;
    use rtc::peer_connection::transport::RTCDtlsRole;
    use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
    use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
    use rtc::rtp;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
    use rtc::sansio::Protocol;
    use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

    struct Conn {
        pc: RTCPeerConnection,
        publisher: bool,
        connected: bool,
        dead: bool,
        sender: Option<RTCRtpSenderId>,
        ssrc: u32,
        pt: Option<u8>,
        next_seq: u16,
        timeout: Instant,
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Drain writes, events and reads. Returns true if it became connected.
    fn drain(
        idx: usize,
        c: &mut Conn,
        out: &mut Outbox,
        by_addr: &mut HashMap<SocketAddr, usize>,
        rtp_in: &mut Vec<rtp::Packet>,
    ) -> bool {
        let mut became = false;
        for _ in 0..2 {
            while let Some(m) = c.pc.poll_write() {
                let dest = m.transport.peer_addr;
                if is_stun(&m.message) {
                    by_addr.entry(dest).or_insert(idx);
                }
                out.send_ref(dest, &m.message);
            }
            while let Some(e) = c.pc.poll_event() {
                if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = e {
                    match s {
                        RTCPeerConnectionState::Connected if !c.connected => {
                            c.connected = true;
                            became = true;
                        }
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                            c.dead = true;
                        }
                        _ => {}
                    }
                }
            }
            while let Some(m) = c.pc.poll_read() {
                if let RTCMessage::RtpPacket(_, p) = m.message
                    && c.publisher
                {
                    rtp_in.push(p);
                }
            }
        }
        c.timeout = c.pc.poll_timeout().unwrap_or_else(far);
        became
    }

    fn build_pc(idx: usize, now: Instant, dtls_client: bool) -> RTCPeerConnection {
        let (ufrag, pass) = server_creds(idx);
        let se = SettingEngineBuilder::new()
            .with_lite(true)
            .with_ice_credentials(ufrag, pass)
            .with_answering_dtls_role(if dtls_client {
                RTCDtlsRole::Client
            } else {
                RTCDtlsRole::Server
            })
            // str0m's preference order, so both engines end up on AES-256-GCM.
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            .build();
        let mut me = MediaEngine::default();
        me.register_default_codecs().expect("codecs");
        let registry = register_default_interceptors(Registry::new(), &mut me).expect("icpt");
        RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(se)
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .build(now)
            .expect("build pc")
    }

    fn vp8() -> RTCRtpCodec {
        RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        }
    }

    pub fn server(io: ServerIo) -> ServerReport {
        set_tracked(true);
        let pinned = pin_to_cpu(0);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind server");
        set_rcvbuf(&sock, RCVBUF);
        let local = sock.local_addr().expect("local addr");
        let mut out = Outbox::new(sock.try_clone().expect("clone socket"), io.batch);
        untracked(|| io.addr_tx.send(local)).expect("addr");

        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut by_addr: HashMap<SocketAddr, usize> = HashMap::new();
        let mut by_ufrag: HashMap<String, usize> = HashMap::new();
        let mut subs: Vec<usize> = Vec::new();
        let mut buf = vec![0u8; 2048];
        let mut rtp_in: Vec<rtp::Packet> = Vec::new();
        let mut scratch: Vec<rtp::Packet> = Vec::new();
        let mut fwd: u64 = 0;
        let mut next_wake = Instant::now() + MAX_WAIT;
        let mut last_wait = Duration::ZERO;
        let mut win = Window::default();
        let mut first_err: Option<String> = None;

        loop {
            if win.update(io.phase.load(Ordering::Acquire), fwd, &out) {
                break;
            }

            while let Ok(offer) = untracked(|| io.offers.try_recv()) {
                let Offer {
                    idx,
                    publisher,
                    sdp,
                } = offer;
                let sdp = adopt(sdp);
                let now = Instant::now();
                let mut pc = build_pc(idx, now, io.rtc_dtls_client);
                let ssrc = 0x5EED_0000u32 + idx as u32;
                let sender = if publisher {
                    pc.add_transceiver_from_kind(
                        RtpCodecKind::Video,
                        Some(RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Recvonly,
                            streams: vec![],
                            send_encodings: vec![],
                        }),
                    )
                    .expect("transceiver");
                    None
                } else {
                    let track = MediaStreamTrack::new(
                        format!("sfu-stream-{idx}"),
                        format!("sfu-track-{idx}"),
                        format!("sfu-video-{idx}"),
                        RtpCodecKind::Video,
                        vec![RTCRtpEncodingParameters {
                            rtp_coding_parameters: RTCRtpCodingParameters {
                                ssrc: Some(ssrc),
                                ..Default::default()
                            },
                            codec: vp8(),
                            ..Default::default()
                        }],
                    );
                    Some(pc.add_track(track).expect("add track"))
                };
                pc.set_remote_description(
                    now,
                    RTCSessionDescription::offer(sdp).expect("offer parse"),
                )
                .expect("set remote");
                let cand = CandidateHostConfig {
                    base_config: CandidateConfig {
                        network: "udp".to_owned(),
                        address: local.ip().to_string(),
                        port: local.port(),
                        component: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                }
                .new_candidate_host()
                .expect("host candidate");
                pc.add_local_candidate(
                    RTCIceCandidate::from(&cand)
                        .to_json()
                        .expect("candidate json"),
                )
                .expect("add local candidate");
                let answer = pc.create_answer(None).expect("answer");
                pc.set_local_description(now, answer).expect("set local");
                let answer_sdp = pc
                    .local_description()
                    .map(|d| d.sdp.clone())
                    .expect("local description");
                let reply = untracked(|| answer_sdp.clone());
                untracked(|| io.answers.send(Answer { idx, sdp: reply })).expect("answer");
                if conns.len() <= idx {
                    conns.resize_with(idx + 1, || None);
                }
                by_ufrag.insert(server_creds(idx).0, idx);
                let mut c = Conn {
                    pc,
                    publisher,
                    connected: false,
                    dead: false,
                    sender,
                    ssrc,
                    pt: None,
                    next_seq: 1,
                    timeout: now,
                };
                drain(idx, &mut c, &mut out, &mut by_addr, &mut scratch);
                next_wake = next_wake.min(c.timeout);
                conns[idx] = Some(c);
            }

            recv_wait(&sock, next_wake, &mut last_wait);
            match sock.recv_from(&mut buf) {
                Ok((n, src)) => {
                    let now = Instant::now();
                    let data = &buf[..n];
                    let idx = by_addr
                        .get(&src)
                        .copied()
                        .or_else(|| stun_server_ufrag(data).and_then(|u| by_ufrag.get(u).copied()));
                    if let Some(idx) = idx
                        && let Some(c) = conns[idx].as_mut()
                    {
                        let r = c.pc.handle_read(TaggedBytesMut {
                            now,
                            transport: TransportContext {
                                local_addr: local,
                                peer_addr: src,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(data),
                        });
                        if let Err(e) = r
                            && first_err.is_none()
                        {
                            first_err = Some(format!("handle_read: {e}"));
                        }
                        if drain(idx, c, &mut out, &mut by_addr, &mut rtp_in) && !c.publisher {
                            subs.push(idx);
                        }
                        next_wake = next_wake.min(c.timeout);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {}
            }

            if !rtp_in.is_empty() {
                let now = Instant::now();
                win.pub_in += rtp_in.len() as u64;
                for mut p in rtp_in.drain(..) {
                    p.header.extension = false;
                    p.header.extensions.clear();
                    p.header.extensions_padding = 0;
                    for &s in &subs {
                        let Some(c) = conns[s].as_mut() else { continue };
                        if c.dead {
                            continue;
                        }
                        let Some(sender_id) = c.sender else { continue };
                        if c.pt.is_none() {
                            c.pt = c.pc.rtp_sender(sender_id).and_then(|mut snd| {
                                snd.get_parameters()
                                    .rtp_parameters
                                    .codecs
                                    .iter()
                                    .find(|cp| {
                                        cp.rtp_codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8)
                                    })
                                    .map(|cp| cp.payload_type)
                            });
                        }
                        let Some(pt) = c.pt else {
                            win.report.write_errors += 1;
                            continue;
                        };
                        let mut q = p.clone();
                        q.header.ssrc = c.ssrc;
                        q.header.payload_type = pt;
                        q.header.sequence_number = c.next_seq;
                        c.next_seq = c.next_seq.wrapping_add(1);
                        let r = if io.direct {
                            c.pc.handle_write(TaggedRTCMessage {
                                now,
                                message: RTCMessage::RtpPacket(String::new(), q),
                            })
                        } else {
                            match c.pc.rtp_sender(sender_id) {
                                Some(mut snd) => snd.write_rtp(now, q),
                                None => Err(rtc::shared::error::Error::ErrRTPSenderNotExisted),
                            }
                        };
                        match r {
                            Ok(()) => fwd += 1,
                            Err(e) => {
                                win.report.write_errors += 1;
                                if first_err.is_none() {
                                    first_err = Some(format!("write_rtp: {e}"));
                                }
                            }
                        }
                        drain(s, c, &mut out, &mut by_addr, &mut scratch);
                        next_wake = next_wake.min(c.timeout);
                    }
                }
            }

            let now = Instant::now();
            if now >= next_wake {
                let mut earliest = now + MAX_WAIT;
                for (idx, slot) in conns.iter_mut().enumerate() {
                    let Some(c) = slot.as_mut() else { continue };
                    if c.dead {
                        continue;
                    }
                    if c.timeout <= now {
                        if let Err(e) = c.pc.handle_timeout(now)
                            && first_err.is_none()
                        {
                            first_err = Some(format!("handle_timeout: {e}"));
                        }
                        if drain(idx, c, &mut out, &mut by_addr, &mut rtp_in) && !c.publisher {
                            subs.push(idx);
                        }
                    }
                    earliest = earliest.min(c.timeout);
                }
                next_wake = earliest;
            }
            out.flush();
        }

        let mut report = win.report;
        report.connected = conns.iter().flatten().filter(|c| c.connected).count();
        report.send_errors = out.send_errors;
        report.pinned = pinned;
        report.note = first_err.map_or(String::new(), |e| format!("first error: {e}"));
        untracked(|| drop(conns));
        report
    }
}

// ---------------------------------------------------------------------------
// Orchestration.
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Args {
    subscribers: usize,
    seconds: f64,
    warmup: f64,
    pps: u32,
    runs: usize,
    engines: Vec<String>,
    rtc_dtls_client: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        subscribers: 200,
        seconds: 10.0,
        warmup: 2.0,
        pps: 250,
        runs: 1,
        engines: vec!["str0m".into(), "str0m-batch".into(), "rtc".into()],
        rtc_dtls_client: true,
    };
    let mut batch = false;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--subscribers" | "-n" => {
                a.subscribers = val.parse().expect("--subscribers N");
                i += 1;
            }
            "--seconds" => {
                a.seconds = val.parse().expect("--seconds S");
                i += 1;
            }
            "--warmup" => {
                a.warmup = val.parse().expect("--warmup S");
                i += 1;
            }
            "--pps" => {
                a.pps = val.parse().expect("--pps P");
                i += 1;
            }
            "--runs" => {
                a.runs = val.parse().expect("--runs R");
                i += 1;
            }
            "--engines" => {
                a.engines = val.split(',').map(|s| s.trim().to_string()).collect();
                i += 1;
            }
            "--batch" => batch = true,
            "--rtc-dtls-role" => {
                a.rtc_dtls_client = match val.as_str() {
                    "client" => true,
                    "server" => false,
                    _ => panic!("--rtc-dtls-role client|server"),
                };
                i += 1;
            }
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
        i += 1;
    }
    if batch && !a.engines.iter().any(|e| e == "str0m-batch") {
        a.engines.push("str0m-batch".into());
    }
    a
}

#[derive(Clone, Default)]
struct RunResult {
    engine: String,
    ok: bool,
    n: usize,
    pps: u32,
    fwd_pps: f64,
    us_per_pkt: f64,
    server_cpu_pct: f64,
    loss_pct: f64,
    min_sub_delivery_pct: f64,
    heap_setup_per_conn: f64,
    heap_end_per_conn: f64,
    setup_ms: f64,
    client_cpu_pct: f64,
    dgrams_per_syscall: f64,
    dup_pct: f64,
    setup_cpu_ms: f64,
    pub_in_pps: f64,
    udp_rcvbuf_errs: u64,
    udp_sndbuf_errs: u64,
    runq_wait_pct: f64,
    note: String,
}

fn run_one(engine: &str, args: &Args) -> RunResult {
    let n = args.subscribers;
    let phase = Arc::new(AtomicU8::new(PH_SETUP));
    let (offer_tx, offer_rx) = channel::<Offer>();
    let (answer_tx, answer_rx) = channel::<Answer>();
    let (addr_tx, addr_rx) = channel::<SocketAddr>();
    let (ev_tx, ev_rx) = channel::<s0::ClientEvent>();

    let io = ServerIo {
        offers: offer_rx,
        answers: answer_tx,
        phase: phase.clone(),
        addr_tx,
        batch: engine.ends_with("-batch"),
        direct: engine == "rtc-direct",
        rtc_dtls_client: args.rtc_dtls_client,
    };
    let baseline = SERVER_LIVE.load(Ordering::Relaxed);
    let server = match engine {
        "str0m" | "str0m-batch" => thread::Builder::new()
            .name("server".into())
            .spawn(move || s0::server(io)),
        "rtc" | "rtc-direct" | "rtc-batch" => thread::Builder::new()
            .name("server".into())
            .spawn(move || wr::server(io)),
        other => panic!("unknown engine {other}"),
    }
    .expect("spawn server");
    let _server_addr = addr_rx.recv().expect("server addr");

    let cfg = s0::ClientCfg {
        n,
        pps: args.pps,
        offers: offer_tx,
        answers: answer_rx,
        phase: phase.clone(),
        events: ev_tx,
    };
    let client = thread::Builder::new()
        .name("clients".into())
        .spawn(move || s0::clients(cfg))
        .expect("spawn clients");

    let mut res = RunResult {
        engine: engine.to_string(),
        n,
        pps: args.pps,
        ..Default::default()
    };

    let setup = match ev_rx.recv_timeout(Duration::from_secs(90)) {
        Ok(s0::ClientEvent::AllConnected(d)) => Some(d),
        _ => None,
    };
    // Let the server finish its side of the last handshakes.
    thread::sleep(Duration::from_millis(300));
    let heap_setup = SERVER_LIVE.load(Ordering::Relaxed) - baseline;

    let mut udp = (0, 0);
    if setup.is_some() {
        phase.store(PH_WARMUP, Ordering::Release);
        thread::sleep(Duration::from_secs_f64(args.warmup));
        let u0 = udp_errors();
        phase.store(PH_MEASURE, Ordering::Release);
        thread::sleep(Duration::from_secs_f64(args.seconds));
        phase.store(PH_DRAIN, Ordering::Release);
        let u1 = udp_errors();
        udp = (u1.0.saturating_sub(u0.0), u1.1.saturating_sub(u0.1));
        thread::sleep(Duration::from_millis(500));
    }
    let heap_end = SERVER_LIVE.load(Ordering::Relaxed) - baseline;
    phase.store(PH_STOP, Ordering::Release);

    let mut creport = s0::ClientReport::default();
    while let Ok(ev) = ev_rx.recv_timeout(Duration::from_secs(10)) {
        if let s0::ClientEvent::Done(r) = ev {
            creport = r;
            break;
        }
    }
    let sreport = server.join().unwrap_or_default();
    let _ = client.join();

    let conns = (n + 1) as f64;
    res.heap_setup_per_conn = heap_setup as f64 / conns;
    res.heap_end_per_conn = heap_end as f64 / conns;
    res.setup_ms = setup.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let wall = sreport.wall.as_secs_f64();
    if wall > 0.0 && sreport.forwarded > 0 {
        res.fwd_pps = sreport.forwarded as f64 / wall;
        res.us_per_pkt = sreport.cpu.as_secs_f64() * 1e6 / sreport.forwarded as f64;
        res.server_cpu_pct = sreport.cpu.as_secs_f64() / wall * 100.0;
    }
    res.udp_rcvbuf_errs = udp.0;
    res.runq_wait_pct = sreport.runq_wait_pct;
    res.udp_sndbuf_errs = udp.1;
    res.setup_cpu_ms = sreport.setup_cpu.as_secs_f64() * 1e3;
    if wall > 0.0 {
        res.pub_in_pps = sreport.pub_in as f64 / wall;
    }
    if creport.received_window > 0 {
        res.dup_pct = 100.0 * creport.duplicates as f64 / creport.received_window as f64;
    }
    if sreport.syscalls > 0 {
        res.dgrams_per_syscall = sreport.datagrams as f64 / sreport.syscalls as f64;
    }
    let expected = creport.sent_window * n as u64;
    if expected > 0 {
        res.loss_pct = 100.0 * (1.0 - creport.received_window as f64 / expected as f64);
        res.min_sub_delivery_pct =
            100.0 * creport.min_sub_received as f64 / creport.sent_window as f64;
    } else {
        res.loss_pct = f64::NAN;
    }
    if creport.wall.as_secs_f64() > 0.0 {
        res.client_cpu_pct = creport.cpu.as_secs_f64() / creport.wall.as_secs_f64() * 100.0;
    }
    res.ok = setup.is_some() && sreport.forwarded > 0;
    res.note = format!(
        "server conns up {}/{}, clients up {}/{}, sent {} (window), publisher datagrams {}, client send errs {}, srv setup cpu {:.0} ms, srv run-queue wait {:.1}% of window, pub pkts in at server {:.1}/s, srv datagrams out {:.0}/s, dup at subs {:.2}%, UDP RcvbufErrors {} SndbufErrors {} (window, system-wide), write errs {}, send errs {}, pinned {}, publisher tx stream right after answer: {}{}{}",
        sreport.connected,
        n + 1,
        creport.connected,
        n + 1,
        creport.sent_window,
        creport.pub_tx,
        creport.tx_err,
        res.setup_cpu_ms,
        res.runq_wait_pct,
        res.pub_in_pps,
        if wall > 0.0 {
            sreport.datagrams as f64 / wall
        } else {
            0.0
        },
        res.dup_pct,
        res.udp_rcvbuf_errs,
        res.udp_sndbuf_errs,
        sreport.write_errors,
        sreport.send_errors,
        sreport.pinned,
        creport.tx_ready_after_answer,
        if sreport.note.is_empty() { "" } else { "; " },
        sreport.note
    );
    res
}

/// (RcvbufErrors, SndbufErrors) from /proc/net/snmp (system-wide UDP).
fn udp_errors() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return (0, 0);
    };
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(vals)) = (lines.next(), lines.next()) else {
        return (0, 0);
    };
    let get = |key: &str| {
        names
            .split_whitespace()
            .position(|n| n == key)
            .and_then(|i| vals.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("RcvbufErrors"), get("SndbufErrors"))
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (m, v[0], v[v.len() - 1])
}

fn print_row(r: &RunResult) {
    println!(
        "{:<12} {:>5} {:>5} {:>10.0} {:>8.2} {:>7.1} {:>8.3} {:>8.2} {:>11.0} {:>11.0} {:>9.0} {:>7.1} {:>6.1}",
        r.engine,
        r.n,
        r.pps,
        r.fwd_pps,
        r.us_per_pkt,
        r.server_cpu_pct,
        r.loss_pct,
        r.min_sub_delivery_pct,
        r.heap_setup_per_conn,
        r.heap_end_per_conn,
        r.setup_ms,
        r.client_cpu_pct,
        r.dgrams_per_syscall,
    );
}

fn header() {
    println!(
        "{:<12} {:>5} {:>5} {:>10} {:>8} {:>7} {:>8} {:>8} {:>11} {:>11} {:>9} {:>7} {:>6}",
        "engine",
        "N",
        "pps",
        "fwd pkt/s",
        "us/pkt",
        "srv%",
        "loss%",
        "minsub%",
        "heap B/conn",
        "heap@end",
        "setup ms",
        "cli%",
        "dg/sc"
    );
}

fn main() {
    let args = parse_args();
    println!(
        "engine_spike: N={} pps={} window={}s warmup={}s runs={} engines={:?} rtc dtls role={}",
        args.subscribers,
        args.pps,
        args.seconds,
        args.warmup,
        args.runs,
        args.engines,
        if args.rtc_dtls_client {
            "client"
        } else {
            "server"
        }
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("loadavg before: {}", l.trim());
    }
    let mut all: Vec<RunResult> = Vec::new();
    header();
    for run in 0..args.runs {
        for e in &args.engines {
            let r = run_one(e, &args);
            print_row(&r);
            println!("    run {}: {}", run + 1, r.note);
            all.push(r);
        }
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("loadavg after: {}", l.trim());
    }
    println!();
    println!("medians over {} run(s) [min..max]:", args.runs);
    for e in &args.engines {
        let rs: Vec<&RunResult> = all.iter().filter(|r| &r.engine == e).collect();
        let col = |f: fn(&RunResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
        let fwd = col(|r| r.fwd_pps);
        let us = col(|r| r.us_per_pkt);
        let cpu = col(|r| r.server_cpu_pct);
        let loss = col(|r| r.loss_pct);
        let heap = col(|r| r.heap_setup_per_conn);
        let heap_end = col(|r| r.heap_end_per_conn);
        let setup = col(|r| r.setup_ms);
        let setup_cpu = col(|r| r.setup_cpu_ms);
        let dup = col(|r| r.dup_pct);
        let rq = col(|r| r.runq_wait_pct);
        println!(
            "{:<12} N={} pps={} fwd/s {:.0} [{:.0}..{:.0}] | us/pkt {:.2} [{:.2}..{:.2}] | srv cpu {:.1}% | loss% {:.3} [{:.3}..{:.3}] | heap B/conn {:.0} [{:.0}..{:.0}] (end {:.0}) | setup ms {:.0} [{:.0}..{:.0}] (srv cpu {:.0} ms) | dup% {:.2} | srv runq wait {:.1}% [{:.1}..{:.1}] | ok {}/{}",
            e,
            args.subscribers,
            args.pps,
            fwd.0,
            fwd.1,
            fwd.2,
            us.0,
            us.1,
            us.2,
            cpu.0,
            loss.0,
            loss.1,
            loss.2,
            heap.0,
            heap.1,
            heap.2,
            heap_end.0,
            setup.0,
            setup.1,
            setup.2,
            setup_cpu.0,
            dup.0,
            rq.0,
            rq.1,
            rq.2,
            rs.iter().filter(|r| r.ok).count(),
            rs.len()
        );
    }
}
