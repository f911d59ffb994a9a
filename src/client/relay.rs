//! A shaped and impaired link in user space: a UDP relay between a client and the server's media
//! port. Each direction can lose datagrams (at random or in bursts), duplicate, delay, jitter and
//! reorder them ([`Impairment`]), and the server-to-client direction can be capped like a `tbf`
//! queue (a rate, a burst, and a queue that holds at most [`MAX_QUEUE_DELAY`] of data; what does
//! not fit is dropped). The kernel of the test machines has no `netem`, and `tbf` needs network
//! namespaces per client; this needs neither. A client reaches the server through it with
//! [`super::ClientOptions::media_relay`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The longest a datagram waits in the capped direction before the queue drops new ones.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(200);
/// Bytes that may go at once after a quiet spell (`tbf`'s burst).
const BURST_BYTES: f64 = 4_000.0;
/// Datagrams held back by one direction's impairment at most; beyond it they are lost (counted).
const MAX_HELD: usize = 10_000;

/// Where the client sends its media instead of the server's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaRelay {
    /// The server's media address as its candidates announce it.
    pub server: SocketAddr,
    /// The relay's address the client sends to instead.
    pub relay: SocketAddr,
}

impl MediaRelay {
    /// `sdp` with every candidate naming the server's address naming the relay's instead.
    pub fn rewrite(&self, sdp: &str) -> String {
        let from = format!(" {} {} typ ", self.server.ip(), self.server.port());
        let to = format!(" {} {} typ ", self.relay.ip(), self.relay.port());
        sdp.replace(&from, &to)
    }
}

/// What one direction of the link does to the datagrams crossing it. The default is a perfect
/// link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Share of datagrams lost, on average (0.05: 5 %).
    pub loss: f64,
    /// Mean length of a run of lost datagrams: a Gilbert model whose bad state loses everything,
    /// entered so that `loss` holds on average. 1 or less: each datagram is lost on its own.
    pub mean_burst: f64,
    /// Share of datagrams held back by `reorder_delay`, so that later ones overtake them.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Share of datagrams sent twice.
    pub duplicate: f64,
    /// One-way delay of every datagram.
    pub delay: Duration,
    /// Extra delay of each datagram, uniform between zero and this (datagrams closer together
    /// than it may swap).
    pub jitter: Duration,
}

impl Impairment {
    /// `loss` lost at random, the rest reordered, duplicated and jittered the way a busy path
    /// does: 2 % held back 15 ms, 1 % duplicated, 10 ms of delay with 5 ms of jitter.
    pub fn lossy(loss: f64) -> Self {
        Impairment {
            loss,
            mean_burst: 1.0,
            reorder: 0.02,
            reorder_delay: Duration::from_millis(15),
            duplicate: 0.01,
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
        }
    }
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub to_client: AtomicU64,
    pub to_server: AtomicU64,
    /// Datagrams toward the client dropped by the full queue.
    pub dropped: AtomicU64,
    /// Datagrams the impairment lost, toward the client and toward the server.
    pub lost_to_client: AtomicU64,
    pub lost_to_server: AtomicU64,
    /// Datagrams the impairment sent twice or held back (both directions).
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct ShapedRelay {
    pub route: MediaRelay,
    /// Bits per second toward the client; 0: no cap.
    rate: Arc<AtomicU64>,
    /// Toward the client, toward the server.
    impairments: Arc<Mutex<[Impairment; 2]>>,
    /// Moves the server-facing side to a fresh port.
    rebind: Arc<Notify>,
    pub stats: Arc<RelayStats>,
    task: JoinHandle<()>,
}

impl ShapedRelay {
    /// Relays to `server` from a fresh port on `ip`, capping what goes to the client at
    /// `rate_bps` (0: no cap).
    pub async fn start(ip: IpAddr, server: SocketAddr, rate_bps: u64) -> std::io::Result<Self> {
        let client_side = UdpSocket::bind((ip, 0)).await?;
        let server_side = UdpSocket::bind((ip, 0)).await?;
        let route = MediaRelay {
            server,
            relay: client_side.local_addr()?,
        };
        let rate = Arc::new(AtomicU64::new(rate_bps));
        let impairments = Arc::new(Mutex::new([Impairment::default(); 2]));
        let rebind = Arc::new(Notify::new());
        let stats = Arc::new(RelayStats::default());
        let task = tokio::spawn(
            Relay {
                client_side,
                server_side,
                server,
                rate: rate.clone(),
                impairments: impairments.clone(),
                rebind: rebind.clone(),
                stats: stats.clone(),
            }
            .run(),
        );
        Ok(ShapedRelay {
            route,
            rate,
            impairments,
            rebind,
            stats,
            task,
        })
    }

    /// Changes the cap toward the client (0: none).
    pub fn set_rate(&self, rate_bps: u64) {
        self.rate.store(rate_bps, Ordering::Relaxed);
    }

    /// From now on the datagrams toward the client and toward the server are impaired so.
    pub fn impair(&self, to_client: Impairment, to_server: Impairment) {
        *self.impairments.lock().unwrap_or_else(|e| e.into_inner()) = [to_client, to_server];
    }

    /// From now on the client's datagrams reach the server from another port, and what the
    /// server sends to the old one is lost: what a NAT rebinding or a network change does.
    pub fn rebind(&self) {
        self.rebind.notify_one();
    }
}

impl Drop for ShapedRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction's impairment: decides each datagram's fate and holds it until it is due.
struct Line {
    rng: SmallRng,
    /// In the Gilbert model's bad (losing) state.
    in_burst: bool,
    /// Due time, arrival order (so equal times keep their order), datagram.
    held: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    arrivals: u64,
}

impl Line {
    fn new(seed: u64) -> Self {
        Line {
            rng: SmallRng::seed_from_u64(seed),
            in_burst: false,
            held: BinaryHeap::new(),
            arrivals: 0,
        }
    }

    fn lose(&mut self, imp: &Impairment) -> bool {
        let loss = imp.loss.clamp(0.0, 1.0);
        if imp.mean_burst <= 1.0 || loss >= 1.0 {
            return self.rng.random_bool(loss);
        }
        if self.in_burst {
            // Runs end with probability 1/mean_burst after each loss: geometric, of that mean.
            self.in_burst = !self.rng.random_bool(1.0 / imp.mean_burst);
            return self.in_burst;
        }
        let enter = (loss / (imp.mean_burst * (1.0 - loss))).min(1.0);
        self.in_burst = self.rng.random_bool(enter);
        self.in_burst
    }

    /// Takes one datagram in: lost (false), or held until its due time.
    fn admit(
        &mut self,
        imp: &Impairment,
        datagram: &[u8],
        now: Instant,
        stats: &RelayStats,
    ) -> bool {
        if self.lose(imp) || self.held.len() >= MAX_HELD {
            return false;
        }
        let copies = if self.rng.random_bool(imp.duplicate.clamp(0.0, 1.0)) {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut due = now + imp.delay;
            if !imp.jitter.is_zero() {
                due += imp.jitter.mul_f64(self.rng.random::<f64>());
            }
            if self.rng.random_bool(imp.reorder.clamp(0.0, 1.0)) {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
                due += imp.reorder_delay;
            }
            self.arrivals += 1;
            self.held
                .push(Reverse((due, self.arrivals, datagram.to_vec())));
        }
        true
    }

    fn next_due(&self) -> Option<Instant> {
        self.held.peek().map(|Reverse((due, _, _))| *due)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        self.held.pop().map(|Reverse((_, _, datagram))| datagram)
    }
}

struct Relay {
    client_side: UdpSocket,
    server_side: UdpSocket,
    server: SocketAddr,
    rate: Arc<AtomicU64>,
    impairments: Arc<Mutex<[Impairment; 2]>>,
    rebind: Arc<Notify>,
    stats: Arc<RelayStats>,
}

impl Relay {
    async fn run(mut self) {
        let stats = self.stats.clone();
        let mut client: Option<SocketAddr> = None;
        let mut to_client = Line::new(0x5b_c1);
        let mut to_server = Line::new(0x5b_5e);
        // The capped queue toward the client, after its impairment.
        let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
        let mut queued_bytes = 0usize;
        let mut tokens = BURST_BYTES;
        let mut refilled = Instant::now();
        let mut up = vec![0u8; 2048];
        let mut down = vec![0u8; 2048];
        loop {
            let bytes_per_sec = self.rate.load(Ordering::Relaxed) as f64 / 8.0;
            let now = Instant::now();
            while let Some(datagram) = to_server.pop_due(now) {
                if self
                    .server_side
                    .send_to(&datagram, self.server)
                    .await
                    .is_ok()
                {
                    stats.to_server.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(datagram) = to_client.pop_due(now) {
                let limit = (bytes_per_sec * MAX_QUEUE_DELAY.as_secs_f64()).max(BURST_BYTES);
                if bytes_per_sec > 0.0 && (queued_bytes + datagram.len()) as f64 > limit {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    queued_bytes += datagram.len();
                    queue.push_back(datagram);
                }
            }
            if bytes_per_sec > 0.0 {
                tokens = (tokens + now.duration_since(refilled).as_secs_f64() * bytes_per_sec)
                    .min(BURST_BYTES);
            }
            refilled = now;
            while let Some(front) = queue.front() {
                if bytes_per_sec > 0.0 && tokens < front.len() as f64 {
                    break;
                }
                let Some(datagram) = queue.pop_front() else {
                    break;
                };
                queued_bytes -= datagram.len();
                if bytes_per_sec > 0.0 {
                    tokens -= datagram.len() as f64;
                }
                if let Some(to) = client
                    && self.client_side.send_to(&datagram, to).await.is_ok()
                {
                    stats.to_client.fetch_add(1, Ordering::Relaxed);
                }
            }
            let next_send = queue.front().map(|d| {
                let missing = (d.len() as f64 - tokens).max(0.0);
                now + Duration::from_secs_f64(missing / bytes_per_sec.max(1.0))
            });
            let wake = [next_send, to_client.next_due(), to_server.next_due()]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                received = self.client_side.recv_from(&mut up) => {
                    let Ok((n, from)) = received else { return };
                    client = Some(from);
                    let imp = self.impairment(1);
                    if !to_server.admit(&imp, &up[..n], Instant::now(), &stats) {
                        stats.lost_to_server.fetch_add(1, Ordering::Relaxed);
                    }
                }
                received = self.server_side.recv_from(&mut down) => {
                    let Ok((n, _)) = received else { return };
                    let imp = self.impairment(0);
                    if !to_client.admit(&imp, &down[..n], Instant::now(), &stats) {
                        stats.lost_to_client.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                _ = self.rebind.notified() => {
                    let Ok(ip) = self.server_side.local_addr().map(|a| a.ip()) else { return };
                    let Ok(fresh) = UdpSocket::bind((ip, 0)).await else { return };
                    self.server_side = fresh;
                }
            }
        }
    }

    /// The impairment toward the client (0) or the server (1).
    fn impairment(&self, direction: usize) -> Impairment {
        self.impairments.lock().unwrap_or_else(|e| e.into_inner())[direction]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_the_servers_candidates_only() {
        let relay = MediaRelay {
            server: "127.0.0.1:5000".parse().unwrap(),
            relay: "127.0.0.1:6000".parse().unwrap(),
        };
        let sdp = "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n\
                   a=candidate:2 1 udp 2130706431 127.0.0.1 50001 typ host\r\n";
        assert_eq!(
            relay.rewrite(sdp),
            "a=candidate:1 1 udp 2130706431 127.0.0.1 6000 typ host\r\n\
             a=candidate:2 1 udp 2130706431 127.0.0.1 50001 typ host\r\n"
        );
    }

    /// Loss runs of a line fed `n` datagrams: (lost, runs).
    fn losses(imp: &Impairment, n: usize) -> (usize, usize) {
        let mut line = Line::new(7);
        let stats = RelayStats::default();
        let now = Instant::now();
        let (mut lost, mut runs, mut previous_lost) = (0, 0, false);
        for _ in 0..n {
            let kept = line.admit(imp, b"x", now, &stats);
            line.held.clear();
            if !kept {
                lost += 1;
                runs += usize::from(!previous_lost);
            }
            previous_lost = !kept;
        }
        (lost, runs)
    }

    #[test]
    fn loses_the_share_asked_for_at_random_and_in_bursts() {
        let random = Impairment {
            loss: 0.1,
            ..Impairment::default()
        };
        let (lost, runs) = losses(&random, 100_000);
        assert!((9_500..10_500).contains(&lost), "{lost} of 100,000 lost");
        // Independent losses: runs of about 1.1 on average.
        assert!(
            lost as f64 / (runs as f64) < 1.2,
            "{lost} lost in {runs} runs"
        );
        let bursty = Impairment {
            loss: 0.1,
            mean_burst: 4.0,
            ..Impairment::default()
        };
        let (lost, runs) = losses(&bursty, 100_000);
        assert!((9_000..11_000).contains(&lost), "{lost} of 100,000 lost");
        let mean = lost as f64 / runs as f64;
        assert!((3.5..4.5).contains(&mean), "mean burst {mean}");
        assert_eq!(losses(&Impairment::default(), 10_000).0, 0);
    }

    #[test]
    fn holds_duplicates_and_reorders_datagrams_until_they_are_due() {
        let imp = Impairment {
            reorder: 0.5,
            reorder_delay: Duration::from_millis(15),
            duplicate: 0.5,
            delay: Duration::from_millis(10),
            ..Impairment::default()
        };
        let mut line = Line::new(1);
        let stats = RelayStats::default();
        let start = Instant::now();
        for i in 0..100u8 {
            assert!(line.admit(
                &imp,
                &[i],
                start + Duration::from_micros(u64::from(i)),
                &stats
            ));
        }
        assert_eq!(
            line.pop_due(start + Duration::from_millis(9)),
            None,
            "delayed"
        );
        let mut out = Vec::new();
        while let Some(d) = line.pop_due(start + Duration::from_millis(30)) {
            out.push(d[0]);
        }
        let duplicated = stats.duplicated.load(Ordering::Relaxed) as usize;
        assert_eq!(out.len(), 100 + duplicated);
        assert!((30..70).contains(&duplicated), "{duplicated} duplicated");
        assert!(
            out.windows(2).any(|w| w[0] > w[1]),
            "some overtaken: {out:?}"
        );
    }

    #[tokio::test]
    async fn caps_the_rate_toward_the_client_and_drops_what_does_not_fit() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let server = UdpSocket::bind((ip, 0)).await.unwrap();
        let client = UdpSocket::bind((ip, 0)).await.unwrap();
        // 80 kbit/s: 10,000 bytes a second.
        let relay = ShapedRelay::start(ip, server.local_addr().unwrap(), 80_000)
            .await
            .unwrap();
        client.send_to(b"hello", relay.route.relay).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, relay_side) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        // 50 datagrams of 1000 bytes at once (fewer than the socket buffer holds): the burst
        // and 200 ms of queue get through within a second, the rest is dropped.
        for _ in 0..50 {
            server.send_to(&[7u8; 1000], relay_side).await.unwrap();
        }
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_millis(1500);
        while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, client.recv_from(&mut buf)).await {
            got += 1;
        }
        let dropped = relay.stats.dropped.load(Ordering::Relaxed);
        assert!(
            (3..=12).contains(&got),
            "{got} datagrams through, {dropped} dropped"
        );
        assert_eq!(got + dropped, 50, "{got} through, {dropped} dropped");
        // Uncapped: everything.
        relay.set_rate(0);
        for _ in 0..50 {
            server.send_to(&[7u8; 1000], relay_side).await.unwrap();
        }
        for _ in 0..50 {
            tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        }
    }
}
