//! A soak (issue 13): a real `switchboard` process, a room of 10 synthetic clients with steady
//! churn (every 1.5 s one member goes, politely or by vanishing, and a new one joins) for
//! `SWITCHBOARD_SOAK_SECS` seconds (a short run by default, for CI; `scripts/churn-soak` runs
//! 600), the stable members' media checked throughout. When everyone has left, the server's
//! live gauges are at zero and its resources are back at the baseline taken after a warm-up
//! call: tokio tasks (its `runtime_tasks` gauge), threads, fds, UDP and TCP sockets exactly,
//! resident memory within a margin.
//!
//! The server is a process of its own so that `/proc/<pid>` and its runtime hold nothing but
//! the server (the synthetic clients run in this test process).

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{close_all, env_number, eventually, init_tracing, summary, wait_all};
use procfs::process::{FDTarget, Process};
use switchboard::client::{Client, ClientOptions};
use switchboard::signal::protocol::MediaKind;

const CONNECT: Duration = Duration::from_secs(20);
const ROOM_SIZE: usize = 10;
/// Members that stay from start to end; their media is what must keep flowing.
const STABLE: usize = 4;
/// One member leaves and a new one joins this often.
const CHURN_EVERY: Duration = Duration::from_millis(1500);
/// Resident memory may stay this much above the baseline. The server hands freed memory back to
/// the system when a room closes (`malloc_trim`), so what stays is the allocator's and the
/// runtime's own bookkeeping. Measured (debug build, 120 s, 81 joins): 26.1 MiB idle, 68.1 MiB at
/// the peak, 30.4 MiB after; before the trim, 62 MiB stayed after and grew with the soak's
/// length.
const RSS_MARGIN_BYTES: u64 = 16 << 20;

fn soak_secs() -> u64 {
    env_number("SWITCHBOARD_SOAK_SECS", 30)
}

/// A `switchboard` process on loopback, killed when dropped.
struct ServerProcess {
    http: SocketAddr,
    child: Child,
}

impl ServerProcess {
    async fn start() -> ServerProcess {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let http = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--http", &http.to_string(), "--udp-port", "0"])
            .args(["--public-ip", "127.0.0.1", "--no-turn", "--workers", "2"])
            .args(["--start-bitrate-kbps", "0"])
            // A vanished member waits 1 s for a resume before it is removed.
            .args(["--resume-grace-secs", "1"])
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting switchboard");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(http).await.is_err() {
            assert!(Instant::now() < deadline, "switchboard does not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ServerProcess { http, child }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// `/metrics`, unlabelled series only, by name without the `switchboard_` prefix. One
    /// HTTP/1.0 request per call on a connection of its own, closed after it: no pooled
    /// connection stays open on the server (it would count as a task and an fd).
    async fn metrics(&self) -> HashMap<String, f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connecting for /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .expect("GET /metrics");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("reading /metrics");
        response
            .lines()
            .filter_map(|l| l.strip_prefix("switchboard_"))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    async fn gauge(&self, name: &str) -> u64 {
        let metrics = self.metrics().await;
        match metrics.get(name) {
            Some(v) => *v as u64,
            None => panic!("no switchboard_{name} in /metrics: {metrics:?}"),
        }
    }

    /// Every live gauge of a server nobody is connected to is zero.
    async fn idle(&self) -> bool {
        let m = self.metrics().await;
        LIVE_GAUGES
            .iter()
            .all(|g| m.get(*g).is_some_and(|v| *v == 0.0))
    }

    /// Its resources now.
    async fn resources(&self) -> Resources {
        let tasks = self.gauge("runtime_tasks").await;
        let process = Process::new(self.child.id() as i32).expect("/proc/<pid>");
        let stat = process.stat().expect("/proc/<pid>/stat");
        let rss_kb = process.status().ok().and_then(|s| s.vmrss).expect("VmRSS");
        // Its sockets' inodes by protocol, from its own network namespace's tables.
        let tcp: Vec<u64> = [process.tcp(), process.tcp6()]
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.inode)
            .collect();
        let udp: Vec<u64> = [process.udp(), process.udp6()]
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.inode)
            .collect();
        let (mut fds, mut udp_fds, mut tcp_fds) = (0, 0, 0);
        for fd in process.fd().expect("/proc/<pid>/fd").flatten() {
            fds += 1;
            if let FDTarget::Socket(inode) = fd.target {
                if udp.contains(&inode) {
                    udp_fds += 1;
                } else if tcp.contains(&inode) {
                    tcp_fds += 1;
                }
            }
        }
        Resources {
            tasks,
            threads: stat.num_threads as u64,
            fds,
            udp: udp_fds,
            tcp: tcp_fds,
            rss: rss_kb * 1024,
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LIVE_GAUGES: [&str; 9] = [
    "rooms",
    "participants",
    "sessions",
    "sessions_detached",
    "peer_connections",
    "forwarders",
    "downtracks",
    "downtracks_paused_hidden",
    "downtracks_paused_bandwidth",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    tasks: u64,
    threads: u64,
    fds: u64,
    udp: u64,
    tcp: u64,
    rss: u64,
}

impl Resources {
    fn max(self, o: Resources) -> Resources {
        Resources {
            tasks: self.tasks.max(o.tasks),
            threads: self.threads.max(o.threads),
            fds: self.fds.max(o.fds),
            udp: self.udp.max(o.udp),
            tcp: self.tcp.max(o.tcp),
            rss: self.rss.max(o.rss),
        }
    }

    /// Everything but memory at or below `baseline`, memory within the margin.
    fn back_to(&self, baseline: &Resources) -> bool {
        self.tasks <= baseline.tasks
            && self.threads <= baseline.threads
            && self.fds <= baseline.fds
            && self.udp <= baseline.udp
            && self.tcp <= baseline.tcp
            && self.rss <= baseline.rss + RSS_MARGIN_BYTES
    }
}

async fn join(server: &ServerProcess, name: &str) -> Client {
    match Client::connect(&server.ws_url(), "soak", name, ClientOptions::default()).await {
        Ok(client) => client,
        Err(e) => panic!("{name} cannot join: {e:#}"),
    }
}

/// Intact audio and video `to` has received from each of `from`.
fn received(to: &Client, from: &[&Client]) -> Vec<(u64, u64)> {
    let s = to.snapshot();
    from.iter()
        .map(|f| {
            (
                s.intact_from(f.id(), MediaKind::Audio),
                s.intact_from(f.id(), MediaKind::Video),
            )
        })
        .collect()
}

/// Each stable member receives more intact audio and video from every other stable member than
/// at `before` (at least `n` more packets of each).
async fn stable_media_flows(stable: &[Client], before: &[Vec<(u64, u64)>], n: u64) {
    let ids: Vec<String> = stable.iter().map(|c| c.id().to_owned()).collect();
    for (i, to) in stable.iter().enumerate() {
        let result = to
            .wait_for("more media from the other stable members", CONNECT, |s| {
                ids.iter().enumerate().all(|(j, id)| {
                    i == j
                        || (s.intact_from(id, MediaKind::Audio) >= before[i][j].0 + n
                            && s.intact_from(id, MediaKind::Video) >= before[i][j].1 + n)
                })
            })
            .await;
        if let Err(e) = result {
            panic!("{}: {e:#}\n{}", to.id(), summary(&to.snapshot()));
        }
        let s = to.snapshot();
        assert_eq!(s.bad_payloads(), 0, "{}", summary(&s));
        assert!(s.errors.is_empty(), "{}: {:?}", to.id(), s.errors);
    }
}

/// Waits until `client` is connected and receives audio and video from each of `stable` (but
/// itself). On failure, says what the server and the stable members saw.
async fn connected_with_media(server: &ServerProcess, client: &Client, stable: &[Client]) {
    let result = client
        .wait_for(
            "connected, with media from the stable members",
            CONNECT,
            |s| {
                s.all_connected()
                    && stable.iter().filter(|c| c.id() != client.id()).all(|c| {
                        s.intact_from(c.id(), MediaKind::Audio) > 0
                            && s.intact_from(c.id(), MediaKind::Video) > 0
                    })
            },
        )
        .await;
    if let Err(e) = result {
        let mut stable_state = String::new();
        for c in stable {
            let s = c.snapshot();
            stable_state += &format!(
                "stable {}: socket closed {} ({:?}), errors {:?}, {} others\n",
                c.id(),
                s.socket_closed,
                s.close_code,
                s.errors,
                s.participants.len()
            );
        }
        panic!(
            "{}: {e:#}\n{}{stable_state}server: {:?}",
            client.id(),
            summary(&client.snapshot()),
            server.metrics().await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_under_steady_churn_returns_to_baseline() {
    init_tracing();
    let server = ServerProcess::start().await;

    // A warm-up call, so that what the first call makes once (the runtime's worker state, the
    // allocator's arenas, lazily built tables) is in the baseline, then everyone gone.
    let a = join(&server, "warm-a").await;
    let b = join(&server, "warm-b").await;
    wait_all(&[&a, &b], "connected", CONNECT, |_, s| s.all_connected()).await;
    let warm = [a, b];
    for client in &warm {
        connected_with_media(&server, client, &warm).await;
    }
    let [a, b] = warm;
    close_all(&[&a, &b]).await;
    drop((a, b));
    eventually("the warm-up call gone", CONNECT, || server.idle())
        .await
        .expect("the server is idle after the warm-up");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = server.resources().await;

    // The room: STABLE members for the whole run, the rest come and go.
    let mut stable = Vec::new();
    for i in 0..STABLE {
        stable.push(join(&server, &format!("stable-{i}")).await);
    }
    let mut churners: Vec<Option<Client>> = Vec::new();
    for i in STABLE..ROOM_SIZE {
        churners.push(Some(join(&server, &format!("member-{i}")).await));
    }
    for client in stable.iter().chain(churners.iter().flatten()) {
        connected_with_media(&server, client, &stable).await;
    }
    let mut before: Vec<Vec<(u64, u64)>> = stable
        .iter()
        .map(|c| received(c, &stable.iter().collect::<Vec<_>>()))
        .collect();
    let mut peak = server.resources().await;

    let secs = soak_secs();
    let started = Instant::now();
    let mut tick = tokio::time::interval(CHURN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut joins, mut leaves, mut vanishes) = (0u64, 0u64, 0u64);
    let mut next_check = Instant::now() + Duration::from_secs(5);
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let slot = (joins as usize) % churners.len();
        if let Some(old) = churners[slot].take() {
            match joins % 3 {
                0 => {
                    old.leave().await.expect("leave is answered");
                    old.close().await;
                    leaves += 1;
                }
                1 => {
                    old.close().await;
                    leaves += 1;
                }
                _ => {
                    // Gone without a word: no close frame, peer connections dropped.
                    old.drop_socket();
                    drop(old);
                    vanishes += 1;
                }
            }
        }
        joins += 1;
        let new = join(&server, &format!("member-{}", ROOM_SIZE as u64 + joins)).await;
        connected_with_media(&server, &new, &stable).await;
        churners[slot] = Some(new);
        if Instant::now() >= next_check {
            // The stable members' media keeps flowing (audio is 50 packets/s, video more).
            stable_media_flows(&stable, &before, 20).await;
            before = stable
                .iter()
                .map(|c| received(c, &stable.iter().collect::<Vec<_>>()))
                .collect();
            peak = peak.max(server.resources().await);
            next_check = Instant::now() + Duration::from_secs(5);
        }
    }
    let soak_time = started.elapsed();
    stable_media_flows(&stable, &before, 20).await;
    // The server's last offer to a stable member: every track that left stays in it as a
    // stopped m-line (str0m 0.25 does not recycle them), so it grows with the churn.
    let sdp = stable[0].last_server_offer().unwrap_or_default();
    let (sdp_bytes, m_lines) = (sdp.len(), sdp.matches("\nm=").count());
    peak = peak.max(server.resources().await);

    // Everyone leaves: the stable members politely, the churners by closing.
    for client in &stable {
        client.leave().await.expect("leave is answered");
    }
    let rest: Vec<Client> = churners.into_iter().flatten().collect();
    close_all(&stable.iter().chain(rest.iter()).collect::<Vec<_>>()).await;
    drop((stable, rest));
    if let Err(e) = eventually("every live gauge at zero", CONNECT, || server.idle()).await {
        panic!("{e:#}: {:?}", server.metrics().await);
    }

    // Tokio's blocking pool lets an idle thread go after 10 s; memory is returned as the
    // allocator trims: up to 20 s for both.
    let mut after = server.resources().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !after.back_to(&baseline) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = server.resources().await;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "soak: {secs} s, {joins} joins, {leaves} leaves, {vanishes} vanished; baseline -> peak -> after: \
         tasks {} -> {} -> {}, threads {} -> {} -> {}, fds {} -> {} -> {}, udp {} -> {} -> {}, \
         tcp {} -> {} -> {}, rss {:.1} -> {:.1} -> {:.1} MiB (in {soak_time:.0?}); \
         last offer to a stable member {sdp_bytes} bytes, {m_lines} m-lines",
        baseline.tasks,
        peak.tasks,
        after.tasks,
        baseline.threads,
        peak.threads,
        after.threads,
        baseline.fds,
        peak.fds,
        after.fds,
        baseline.udp,
        peak.udp,
        after.udp,
        baseline.tcp,
        peak.tcp,
        after.tcp,
        mib(baseline.rss),
        mib(peak.rss),
        mib(after.rss),
    );
    assert!(
        after.back_to(&baseline),
        "not back to the baseline: {baseline:?} -> {after:?} (rss margin {RSS_MARGIN_BYTES})"
    );
}
