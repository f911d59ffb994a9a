//! A shaped link in user space: a UDP relay between a client and the server's media port whose
//! server-to-client direction is capped like a `tbf` queue (a rate, a burst, and a queue that
//! holds at most [`MAX_QUEUE_DELAY`] of data; what does not fit is dropped). The kernel of the
//! test machines has no `netem`, and `tbf` needs network namespaces per client; this needs
//! neither. A client reaches the server through it with [`super::ClientOptions::media_relay`].

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The longest a datagram waits in the capped direction before the queue drops new ones.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(200);
/// Bytes that may go at once after a quiet spell (`tbf`'s burst).
const BURST_BYTES: f64 = 4_000.0;

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

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub to_client: AtomicU64,
    pub to_server: AtomicU64,
    /// Datagrams toward the client dropped by the full queue.
    pub dropped: AtomicU64,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct ShapedRelay {
    pub route: MediaRelay,
    /// Bits per second toward the client; 0: no cap.
    rate: Arc<AtomicU64>,
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
        let rebind = Arc::new(Notify::new());
        let stats = Arc::new(RelayStats::default());
        let task = tokio::spawn(run(
            client_side,
            server_side,
            server,
            rate.clone(),
            rebind.clone(),
            stats.clone(),
        ));
        Ok(ShapedRelay {
            route,
            rate,
            rebind,
            stats,
            task,
        })
    }

    /// Changes the cap toward the client (0: none).
    pub fn set_rate(&self, rate_bps: u64) {
        self.rate.store(rate_bps, Ordering::Relaxed);
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

async fn run(
    client_side: UdpSocket,
    server_side: UdpSocket,
    server: SocketAddr,
    rate: Arc<AtomicU64>,
    rebind: Arc<Notify>,
    stats: Arc<RelayStats>,
) {
    let mut server_side = server_side;
    let mut client: Option<SocketAddr> = None;
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut queued_bytes = 0usize;
    let mut tokens = BURST_BYTES;
    let mut refilled = Instant::now();
    let mut up = vec![0u8; 2048];
    let mut down = vec![0u8; 2048];
    loop {
        let bytes_per_sec = rate.load(Ordering::Relaxed) as f64 / 8.0;
        let now = Instant::now();
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
                && client_side.send_to(&datagram, to).await.is_ok()
            {
                stats.to_client.fetch_add(1, Ordering::Relaxed);
            }
        }
        let next_send = queue.front().map(|d| {
            let missing = (d.len() as f64 - tokens).max(0.0);
            now + Duration::from_secs_f64(missing / bytes_per_sec.max(1.0))
        });
        tokio::select! {
            received = client_side.recv_from(&mut up) => {
                let Ok((n, from)) = received else { return };
                client = Some(from);
                if server_side.send_to(&up[..n], server).await.is_ok() {
                    stats.to_server.fetch_add(1, Ordering::Relaxed);
                }
            }
            received = server_side.recv_from(&mut down) => {
                let Ok((n, _)) = received else { return };
                let limit = (bytes_per_sec * MAX_QUEUE_DELAY.as_secs_f64()).max(BURST_BYTES);
                if bytes_per_sec > 0.0 && (queued_bytes + n) as f64 > limit {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    queued_bytes += n;
                    queue.push_back(down[..n].to_vec());
                }
            }
            _ = tokio::time::sleep_until(next_send.unwrap_or(now)), if next_send.is_some() => {}
            _ = rebind.notified() => {
                let Ok(ip) = server_side.local_addr().map(|a| a.ip()) else { return };
                let Ok(fresh) = UdpSocket::bind((ip, 0)).await else { return };
                server_side = fresh;
            }
        }
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
