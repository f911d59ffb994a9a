//! Join/leave churn (issue 13): many participants with real webrtc-rs peer connections join a
//! room, get their media through, and go (a polite `leave`, a close frame, or a socket dropped
//! without a word), a few at a time, beside a steady call whose media must flow throughout;
//! and clients that vanish half-way through the handshake (after `join`, after the offer and
//! answer, after ICE but before DTLS). Afterwards every live gauge is back at zero, the
//! server's resources are back at their baseline and a fresh call works.
//!
//! Cycles per room mode come from `SWITCHBOARD_CHURN_CYCLES` (a short run by default, for CI);
//! `scripts/churn-soak` runs 1,000.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use switchboard::client::{Client, ClientOptions};
use switchboard::config::Config;
use switchboard::server::{Server, ServerHandle};
use switchboard::signal::protocol::MediaKind;
use tokio_tungstenite::tungstenite::Message;

const CONNECT: Duration = Duration::from_secs(20);
/// Churners at a time: enough to keep joins, renegotiations and departures overlapping.
const BATCH: usize = 5;
/// Cycles beside one steady call; the long run moves to a new room and steady call after each
/// such segment.
const SEGMENT: usize = 250;

fn churn_cycles() -> usize {
    env_number("SWITCHBOARD_CHURN_CYCLES", 60)
}

/// The server on a tokio runtime of its own (its threads in this process), so that its
/// `runtime_tasks` gauge counts the server's tasks only, not the clients'. Dropping it stops
/// that runtime (after `ServerHandle::shutdown`).
struct ServerRuntime {
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_server_apart(
    adjust: impl FnOnce(&mut Config) + Send + 'static,
) -> (ServerHandle, ServerRuntime) {
    init_tracing();
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the server's runtime");
        runtime.block_on(async move {
            let mut config = Config::for_tests();
            config.start_bitrate_kbps = 0;
            adjust(&mut config);
            let server = Server::start(config).await.expect("the server starts");
            let _ = handle_tx.send(server);
            let _ = stopped.await;
        });
    });
    let server = handle_rx.await.expect("the server's thread");
    (server, ServerRuntime { _stop: stop })
}

/// What the server holds: its runtime's live tasks (its own gauge), and this process's threads
/// and fds from `/proc/self` (the server's and the clients' together: a leak of either shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    tasks: u64,
    threads: u64,
    fds: u64,
}

impl Resources {
    fn max(self, o: Resources) -> Resources {
        Resources {
            tasks: self.tasks.max(o.tasks),
            threads: self.threads.max(o.threads),
            fds: self.fds.max(o.fds),
        }
    }
}

fn resources(server: &ServerHandle) -> Resources {
    let me = procfs::process::Process::myself().expect("/proc/self");
    Resources {
        tasks: server.metrics.snapshot().runtime_tasks,
        threads: me.stat().map(|s| s.num_threads as u64).unwrap_or(0),
        fds: me.fd_count().map(|n| n as u64).unwrap_or(0),
    }
}

/// Live tasks of the clients' runtime (the test's own).
fn client_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until `to` receives `n` more intact audio and video packets from `from`.
async fn media_from(to: &Client, from: &Client, n: u64) {
    let s = to.snapshot();
    let from_id = from.id().to_owned();
    let (audio, video) = (
        s.intact_from(&from_id, MediaKind::Audio),
        s.intact_from(&from_id, MediaKind::Video),
    );
    to.wait_for("media from the other", CONNECT, |s| {
        s.intact_from(&from_id, MediaKind::Audio) >= audio + n
            && s.intact_from(&from_id, MediaKind::Video) >= video + n
    })
    .await
    .unwrap_or_else(|e| panic!("{}: {e:#}\n{}", to.id(), summary(&to.snapshot())));
}

async fn steady_call(server: &ServerHandle, room: &str, opts: &ClientOptions) -> (Client, Client) {
    let a = join(server, room, "steady-a", opts.clone()).await;
    let b = join(server, room, "steady-b", opts.clone()).await;
    wait_all(&[&a, &b], "connected", CONNECT, |_, s| s.all_connected()).await;
    media_from(&a, &b, 20).await;
    media_from(&b, &a, 20).await;
    (a, b)
}

/// One churn cycle: joins, connects its media and receives the steady members' media, then
/// goes the way `i` picks.
async fn cycle(
    server: &ServerHandle,
    room: &str,
    opts: ClientOptions,
    i: usize,
    steady: [&str; 2],
    peak: &std::sync::Mutex<Resources>,
) {
    let name = format!("churner-{i}");
    let client = match Client::connect(&ws_url(server), room, &name, opts).await {
        Ok(client) => client,
        Err(e) => panic!("{name} cannot join {room}: {e:#}"),
    };
    let result = client
        .wait_for(
            "connected, with media from the steady members",
            CONNECT,
            |s| {
                s.all_connected()
                    && steady.iter().all(|id| {
                        s.intact_from(id, MediaKind::Audio) > 0
                            && s.intact_from(id, MediaKind::Video) > 0
                    })
            },
        )
        .await;
    if let Err(e) = result {
        panic!("{name}: {e:#}\n{}", summary(&client.snapshot()));
    }
    let now = resources(server);
    {
        let mut peak = peak.lock().expect("lock");
        *peak = peak.max(now);
    }
    match i % 3 {
        // Politely: `leave`, answered by `left`, then a close frame.
        0 => {
            client.leave().await.expect("leave is answered");
            client.close().await;
        }
        // A close frame without `leave` (a tab closed).
        1 => client.close().await,
        // Gone without a word: the socket cut, the peer connections dropped (a crash, a lost
        // network). The server waits the resume grace, then removes it.
        _ => {
            client.drop_socket();
            drop(client);
        }
    }
}

async fn churn(mesh: bool) {
    let _serial = serial().await;
    let (server, _runtime) = start_server_apart(|c| c.limits.resume_grace_secs = 1).await;
    let room = if mesh { "churn-mesh" } else { "churn-sfu" };
    let opts = if mesh {
        ClientOptions::default().mesh()
    } else {
        ClientOptions::default()
    };
    let (mut a, mut b) = steady_call(&server, room, &opts).await;
    let mut room = room.to_owned();
    // The baseline, once the steady call (and everything lazily made for a first call) runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = resources(&server);
    let client_tasks_before = client_tasks();

    let cycles = churn_cycles();
    let started = Instant::now();
    let peak = std::sync::Mutex::new(baseline);
    let mut done = 0;
    while done < cycles {
        if done > 0 && done.is_multiple_of(SEGMENT) {
            // A new steady call in a new room: the old one's SDP carries a stopped m-line per
            // track that left (README, "SDP growth with churn").
            media_from(&a, &b, 10).await;
            close_all(&[&a, &b]).await;
            room = format!("{room}-{done}");
            (a, b) = steady_call(&server, &room, &opts).await;
        }
        let batch = BATCH.min(cycles - done).min(SEGMENT - done % SEGMENT);
        let steady = [a.id(), b.id()];
        let round = (done..done + batch).map(|i| {
            // Staggered a little, so that joins land in each other's negotiations.
            let (server, opts, peak, room) = (&server, opts.clone(), &peak, &room);
            async move {
                tokio::time::sleep(Duration::from_millis(60 * (i % BATCH) as u64)).await;
                cycle(server, room, opts, i, steady, peak).await
            }
        });
        futures_util::future::join_all(round).await;
        done += batch;
        // The steady call keeps going during the churn.
        if (done / BATCH).is_multiple_of(5) {
            media_from(&a, &b, 10).await;
            media_from(&b, &a, 10).await;
        }
    }
    let churn_time = started.elapsed();
    let steady = [a.id(), b.id()];
    let peak = peak.into_inner().expect("lock");

    // The steady call went on and goes on.
    media_from(&a, &b, 50).await;
    media_from(&b, &a, 50).await;
    for client in [&a, &b] {
        let s = client.snapshot();
        assert_eq!(s.bad_payloads(), 0, "{}", summary(&s));
        assert!(s.errors.is_empty(), "{}: {:?}", client.id(), s.errors);
    }
    // Only the steady call is left, on the server and at each steady member.
    let expected = if mesh { 0 } else { 2 };
    let result = eventually("only the steady call left", CLEANUP, || async {
        let m = server.metrics.snapshot();
        m.participants == 2
            && m.sessions == 2
            && m.sessions_detached == 0
            && m.peer_connections == expected
            && m.forwarders == expected * 2
            && m.downtracks == expected * 2
            && a.participants().len() == 1
            && b.participants().len() == 1
    })
    .await;
    if let Err(e) = result {
        panic!(
            "{e:#}: {:?}\n{:?}",
            server.metrics.snapshot(),
            server.registry.room_snapshot(&room)
        );
    }
    for client in [&a, &b] {
        let result = eventually("the churners' tracks gone", CLEANUP, || async {
            client
                .active_remote_tracks()
                .await
                .iter()
                .all(|t| steady.contains(&t.publisher_id.as_str()))
        })
        .await;
        if let Err(e) = result {
            panic!(
                "{}: {e:#}: {:?}",
                client.id(),
                client.active_remote_tracks().await
            );
        }
    }
    // Back to the baseline: the server's tasks and fds, and the clients' tasks, exactly; threads
    // too (tokio's blocking pool keeps an idle thread 10 s, so that is waited out).
    let after = std::sync::Mutex::new(resources(&server));
    let result = eventually(
        "resources back to the baseline",
        Duration::from_secs(20),
        || async {
            let now = resources(&server);
            *after.lock().expect("lock") = now;
            now.tasks <= baseline.tasks
                && now.fds <= baseline.fds
                && now.threads <= baseline.threads
                // The steady clients' readers of departed tracks have ended too.
                && client_tasks() <= client_tasks_before
        },
    )
    .await;
    let after = after.into_inner().expect("lock");
    eprintln!(
        "churn ({}): {cycles} cycles in {churn_time:.1?}; server tasks {} -> {} -> {}, process threads {} -> {} -> {}, fds {} -> {} -> {}; client tasks {client_tasks_before} -> {}",
        if mesh { "mesh" } else { "sfu" },
        baseline.tasks,
        peak.tasks,
        after.tasks,
        baseline.threads,
        peak.threads,
        after.threads,
        baseline.fds,
        peak.fds,
        after.fds,
        client_tasks(),
    );
    if let Err(e) = result {
        panic!(
            "{e:#}: baseline {baseline:?}, after {after:?}; client tasks {client_tasks_before} -> {}",
            client_tasks()
        );
    }

    close_all(&[&a, &b]).await;
    assert_all_clean(&server, &room).await;
    // A fresh call works.
    let (a, b) = steady_call(&server, "after-churn", &opts).await;
    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "after-churn").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_churn_leaves_nothing_behind() {
    churn(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_churn_leaves_nothing_behind_in_mesh_rooms() {
    churn(true).await;
}

// ---- Vanishing half-way through the handshake ----

type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send_json(ws: &mut RawSocket, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("sending on the raw socket");
}

/// Reads server messages until one of `kind` arrives; its JSON.
async fn read_until(ws: &mut RawSocket, kind: &str) -> serde_json::Value {
    let found = tokio::time::timeout(CONNECT, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("server JSON");
                    if v["type"] == kind {
                        return v;
                    }
                    assert_ne!(v["type"], "error", "{v}");
                }
                Ok(_) => {}
                Err(e) => panic!("socket failed waiting for {kind}: {e}"),
            }
        }
        panic!("socket closed waiting for {kind}");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {kind} within {CONNECT:?}"))
}

/// A raw signaling socket that joined `room` (protocol 3: a dropped socket waits for a resume).
async fn raw_join(server: &ServerHandle, room: &str, name: &str, mesh: bool) -> RawSocket {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(server))
        .await
        .expect("websocket");
    let mut join = serde_json::json!({"type": "join", "room": room, "name": name, "protocol": 3});
    if mesh {
        join["mode"] = "mesh".into();
    }
    send_json(&mut ws, join).await;
    read_until(&mut ws, "joined").await;
    ws
}

/// The first value of SDP attribute `a=<name>:`.
fn sdp_attr(sdp: &str, name: &str) -> String {
    let prefix = format!("a={name}:");
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no a={name} in {sdp}"))
        .to_owned()
}

/// The address of the first UDP host candidate in `sdp`.
fn sdp_udp_candidate(sdp: &str) -> SocketAddr {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=candidate:"))
        .find_map(|c| {
            let f: Vec<&str> = c.split_whitespace().collect();
            (f.len() > 5 && f[2].eq_ignore_ascii_case("udp"))
                .then(|| format!("{}:{}", f[4], f[5]).parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no UDP candidate in {sdp}"))
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A STUN Binding request as a controlling full ICE agent nominates a pair with (RFC 8445):
/// USERNAME `remote:local`, PRIORITY, ICE-CONTROLLING, USE-CANDIDATE, MESSAGE-INTEGRITY with the
/// server's password, FINGERPRINT.
fn binding_request(txid: [u8; 12], username: &str, password: &str) -> Vec<u8> {
    fn attr(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(value.len() as u16).to_be_bytes());
        m.extend_from_slice(value);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
    }
    fn set_length(m: &mut [u8], extra: usize) {
        let len = (m.len() - 20 + extra) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
    }
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&txid);
    attr(&mut m, 0x0006, username.as_bytes());
    attr(&mut m, 0x0024, &0x6e00_1eff_u32.to_be_bytes());
    attr(&mut m, 0x802a, &0x1234_5678_9abc_def0_u64.to_be_bytes());
    attr(&mut m, 0x0025, &[]);
    set_length(&mut m, 24);
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        password.as_bytes(),
    );
    let integrity = ring::hmac::sign(&key, &m);
    attr(&mut m, 0x0008, integrity.as_ref());
    set_length(&mut m, 8);
    let fingerprint = crc32(&m) ^ 0x5354_554e;
    attr(&mut m, 0x8028, &fingerprint.to_be_bytes());
    m
}

/// Offers on `ws` (after `join`) and returns the server's answer and our offer.
async fn offer_and_answer(ws: &mut RawSocket) -> (String, String) {
    let (pc, offer) = throwaway_offer().await;
    // Closed, not just dropped: a dropped webrtc-rs connection keeps its UDP socket, which
    // would count against this process's fds.
    let _ = pc.close().await;
    send_json(ws, serde_json::json!({"type": "offer", "sdp": offer})).await;
    let answer = read_until(ws, "answer").await;
    let answer = answer["sdp"].as_str().expect("answer SDP").to_owned();
    (offer, answer)
}

/// Does ICE with the server from a raw UDP socket, as the controlling agent, and gets the
/// Binding success that completes the server's side of it; then sends nothing more, least of
/// all a DTLS ClientHello. The socket is returned (dropping it is the vanishing).
async fn ice_without_dtls(offer: &str, answer: &str) -> tokio::net::UdpSocket {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a UDP socket");
    ice_check(&socket, offer, answer).await;
    socket
}

/// Sends the nominating Binding request for the connection `answer` set up from `socket` until
/// the server answers it with a success.
async fn ice_check(socket: &tokio::net::UdpSocket, offer: &str, answer: &str) {
    let server = sdp_udp_candidate(answer);
    let username = format!(
        "{}:{}",
        sdp_attr(answer, "ice-ufrag"),
        sdp_attr(offer, "ice-ufrag")
    );
    let password = sdp_attr(answer, "ice-pwd");
    let txid: [u8; 12] = rand::random();
    let request = binding_request(txid, &username, &password);
    let mut buf = [0u8; 1500];
    for _ in 0..50 {
        socket.send_to(&request, server).await.expect("STUN out");
        let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await
        else {
            continue;
        };
        // A Binding success response to our transaction.
        if n >= 20 && buf[..2] == [0x01, 0x01] && buf[8..20] == txid {
            return;
        }
    }
    panic!("no STUN Binding success from {server}");
}

/// A client arriving from the UDP address of one that vanished, while the vanished one's
/// connection still waits out its timeout (a NAT or the OS handing the port on; the long churn
/// met it about once in 2,400 joins), gets its checks answered by its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_a_vanished_clients_address_connects() {
    let _serial = serial().await;
    // One media worker: both connections share its socket, so the addresses collide.
    let (server, _runtime) = start_server_apart(|c| c.workers = Some(1)).await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a UDP socket");
    let mut gone = raw_join(&server, "reused-address", "gone", false).await;
    let (gone_offer, gone_answer) = offer_and_answer(&mut gone).await;
    ice_check(&udp, &gone_offer, &gone_answer).await;
    // It vanishes; its connection holds the address for the resume grace and media timeout.
    drop(gone);
    let mut next = raw_join(&server, "reused-address", "next", false).await;
    let (offer, answer) = offer_and_answer(&mut next).await;
    assert_eq!(
        sdp_udp_candidate(&answer),
        sdp_udp_candidate(&gone_answer),
        "both connections on the one media socket"
    );
    ice_check(&udp, &offer, &answer).await;
    drop(next);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_handshake_leave_nothing_behind() {
    let _serial = serial().await;
    // A dropped socket waits 1 s for a resume; media that does not connect in 2 s is given up.
    let (server, _runtime) = start_server_apart(|c| {
        c.limits.resume_grace_secs = 1;
        c.limits.media_timeout_secs = 2;
    })
    .await;
    let room = "handshakes";
    let (a, b) = steady_call(&server, room, &ClientOptions::default()).await;
    let (mesh_a, mesh_b) =
        steady_call(&server, "handshakes-mesh", &ClientOptions::default().mesh()).await;
    let timeouts_before = server.metrics.snapshot().sessions_media_timeout;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = resources(&server);
    let rounds = 3;
    for round in 0..rounds {
        // Gone right after `joined`: the socket dropped (no close frame), or closed politely.
        let ws = raw_join(&server, room, &format!("joined-{round}"), false).await;
        drop(ws);
        let mut ws = raw_join(&server, room, &format!("joined-closed-{round}"), false).await;
        let _ = ws.close(None).await;
        drop(ws);
        // The same in a mesh room (where the others were about to offer to it).
        let ws = raw_join(&server, "handshakes-mesh", &format!("mesh-{round}"), true).await;
        drop(ws);

        // Gone after the offer went out and the answer came back, before any ICE.
        let mut ws = raw_join(&server, room, &format!("answered-{round}"), false).await;
        let _ = offer_and_answer(&mut ws).await;
        drop(ws);

        // Gone during DTLS: ICE completes from a raw socket (the server's connection takes the
        // pair as nominated and waits for the DTLS handshake), then the client disappears:
        // the socket dropped, UDP silent.
        let mut ws = raw_join(&server, room, &format!("ice-{round}"), false).await;
        let (offer, answer) = offer_and_answer(&mut ws).await;
        let udp = ice_without_dtls(&offer, &answer).await;
        drop(ws);
        drop(udp);

        // Stays on its socket but never does DTLS: the media timeout removes it, and the
        // server says why and closes the socket (1008).
        let mut ws = raw_join(&server, room, &format!("stuck-{round}"), false).await;
        let (offer, answer) = offer_and_answer(&mut ws).await;
        let _udp = ice_without_dtls(&offer, &answer).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            let mut error = None;
            while let Some(frame) = ws.next().await {
                match frame {
                    Ok(Message::Text(text)) => {
                        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                        if v["type"] == "error" {
                            error = v["code"].as_str().map(str::to_owned);
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        return (error, frame.map(|f| u16::from(f.code)));
                    }
                    Ok(_) => {}
                    Err(e) => panic!("socket failed: {e}"),
                }
            }
            (error, None)
        })
        .await
        .expect("the server gives up on the connection within 10 s");
        assert_eq!(
            closed,
            (Some("connection-failed".to_owned()), Some(1008)),
            "why the server closed"
        );
    }
    assert_eq!(
        server.metrics.snapshot().sessions_media_timeout - timeouts_before,
        rounds,
        "one media timeout per stuck client"
    );

    // None of them stays, and both calls went on.
    let result = eventually("only the steady calls left", CLEANUP, || async {
        let m = server.metrics.snapshot();
        m.participants == 4
            && m.sessions == 4
            && m.sessions_detached == 0
            && m.peer_connections == 2
            && m.forwarders == 4
            && m.downtracks == 4
    })
    .await;
    if let Err(e) = result {
        panic!("{e:#}: {:?}", server.metrics.snapshot());
    }
    // The server's tasks and this process's fds back to what they were with the steady calls.
    let result = eventually("resources back to the baseline", CLEANUP, || async {
        let now = resources(&server);
        now.tasks <= baseline.tasks && now.fds <= baseline.fds
    })
    .await;
    eprintln!(
        "vanishing mid-handshake: baseline {baseline:?}, after {:?}",
        resources(&server)
    );
    if let Err(e) = result {
        panic!("{e:#}: baseline {baseline:?}, now {:?}", resources(&server));
    }
    media_from(&a, &b, 50).await;
    media_from(&b, &a, 50).await;
    media_from(&mesh_a, &mesh_b, 50).await;
    media_from(&mesh_b, &mesh_a, 50).await;
    close_all(&[&a, &b, &mesh_a, &mesh_b]).await;
    assert_all_clean(&server, room).await;
    assert_all_clean(&server, "handshakes-mesh").await;

    // A fresh call works.
    let (a, b) = steady_call(&server, "after", &ClientOptions::default()).await;
    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "after").await;
    server.shutdown().await;
}
