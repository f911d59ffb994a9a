//! Hostile input at scale (issue 13), property-based with proptest: random bytes and mutations
//! of real input (byte flips, cuts, insertions, repeats) thrown at
//! - the signaling parser (`ClientMessage`), and the cascade's wire formats;
//! - the session state machine of a running server, over real WebSockets: sequences of
//!   mutated and well-formed messages in random order, with real Chromium offers (mutated) as
//!   SDP, each socket then closed or dropped;
//! - a running server's media sockets, during a call: random datagrams and mutated STUN (with
//!   the server's real ICE username), DTLS, RTP and RTCP.
//!
//! No input may panic the server or stop the call; afterwards a fresh call works and every
//! gauge is back at zero. Cases per target come from `SWITCHBOARD_FUZZ_PARSER_CASES`,
//! `SWITCHBOARD_FUZZ_SESSION_CASES` and `SWITCHBOARD_FUZZ_DATAGRAM_CASES` (a short run by
//! default, for CI); `scripts/fuzz-long` runs millions.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use switchboard::cascade::wire::{BusMessage, decode_packet};
use switchboard::client::{Client, ClientOptions};
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::{ClientMessage, MediaKind};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM_OFFER: &str = include_str!("fixtures/chromium-whip-offer.sdp");
const CHROMIUM_RECVONLY_OFFER: &str = include_str!("fixtures/chromium-whep-offer.sdp");
const FIREFOX_OFFER: &str = include_str!("fixtures/firefox-whip-offer.sdp");
const FIREFOX_RECVONLY_OFFER: &str = include_str!("fixtures/firefox-whep-offer.sdp");

fn cases(var: &str, short: u32) -> u32 {
    env_number(var, short)
}

/// A runner with a fixed seed unless `PROPTEST_RNG_SEED` says otherwise: a CI failure is
/// reproducible from its log.
fn runner(cases: u32) -> TestRunner {
    let seed: u64 = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_966_381);
    eprintln!("{cases} cases, seed {seed} (PROPTEST_RNG_SEED)");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        RunnerConfig {
            cases,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(at, n)| Mutation::Repeat(at, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(at, b) if !bytes.is_empty() => bytes[at % len] ^= b | 1,
            Mutation::Cut(at) => bytes.truncate(at % len),
            Mutation::Insert(at, b) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Repeat(at, n) if !bytes.is_empty() => {
                let at = at % len;
                let end = (at + n % 64).min(bytes.len());
                let slice = bytes[at..end].to_vec();
                bytes.splice(end..end, slice);
            }
            _ => {}
        }
    }
    bytes
}

/// Random bytes, or one of `seeds` mutated 1-4 times.
fn hostile(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..1500),
        4 => (0..n, prop::collection::vec(mutation(), 1..5))
            .prop_map(move |(i, m)| apply(seeds[i].clone(), &m)),
    ]
}

/// Real signaling messages of every kind.
fn message_seeds() -> Vec<Vec<u8>> {
    let offer = |sdp: &str| serde_json::json!({"type": "offer", "sdp": sdp}).to_string();
    [
        r#"{"type":"join","room":"fuzz","name":"mallory","protocol":3}"#.to_owned(),
        r#"{"type":"join","room":"fuzz","name":"m","mode":"mesh","token":"x.y.z"}"#.to_owned(),
        offer(CHROMIUM_OFFER),
        offer(CHROMIUM_RECVONLY_OFFER),
        offer(FIREFOX_OFFER),
        offer(FIREFOX_RECVONLY_OFFER),
        serde_json::json!({"type": "answer", "sdp": CHROMIUM_RECVONLY_OFFER}).to_string(),
        r#"{"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#.to_owned(),
        r#"{"type":"candidate","candidate":null}"#.to_owned(),
        r#"{"type":"track-settings","track_id":"t123456789abc","visible":true,"width":640,"height":360}"#.to_owned(),
        r#"{"type":"resume","token":"abcdefghijklmnop"}"#.to_owned(),
        r#"{"type":"set-muted","kind":"audio","muted":true}"#.to_owned(),
        r#"{"type":"leave"}"#.to_owned(),
        r#"{"type":"ping"}"#.to_owned(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

#[test]
fn the_signaling_parser_takes_anything() {
    let mut runner = runner(cases("SWITCHBOARD_FUZZ_PARSER_CASES", 20_000));
    let started = Instant::now();
    runner
        .run(&hostile(message_seeds()), |bytes| {
            if let Ok(message) = serde_json::from_slice::<ClientMessage>(&bytes) {
                // What parses writes back and reads the same.
                let text = serde_json::to_string(&message).expect("serializes");
                let again: ClientMessage = serde_json::from_str(&text).expect("reads back");
                prop_assert_eq!(again, message);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("signaling parser: done in {:?}", started.elapsed());
}

#[test]
fn the_cascade_wire_formats_take_anything() {
    let bus = br#"{"node":"a","room":"r","kind":"state","link":"127.0.0.1:7870","cert":"00","members":[{"id":"p1","name":"n"}],"tracks":[]}"#.to_vec();
    let mut datagram = vec![0u8; 25];
    datagram.extend_from_slice(b"payload");
    let mut runner = runner(cases("SWITCHBOARD_FUZZ_PARSER_CASES", 20_000));
    runner
        .run(&hostile(vec![bus, datagram]), |bytes| {
            let _ = serde_json::from_slice::<BusMessage>(&bytes);
            if let Some((_, packet)) = decode_packet(&bytes, Instant::now()) {
                prop_assert!(packet.payload.len() + 25 == bytes.len());
            }
            Ok(())
        })
        .unwrap();
}

/// Blocks on a future from a proptest closure inside a multi-threaded test runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// One hostile client: its messages in order, then it closes politely or vanishes.
async fn hostile_session(server: &ServerHandle, frames: Vec<Vec<u8>>, vanish: bool) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(ws_url(server)).await else {
        panic!("the server stopped accepting sockets");
    };
    for frame in frames {
        let message = match String::from_utf8(frame) {
            Ok(text) => Message::text(text),
            Err(e) => Message::binary(e.into_bytes()),
        };
        if ws.send(message).await.is_err() {
            return; // closed on us: allowed
        }
    }
    // Read what it says until it is quiet for a moment or closes.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(30), ws.next()).await {}
    if !vanish {
        let _ = ws.close(None).await;
    }
}

/// Waits until each client receives `n` more intact video and audio packets from the other.
async fn call_goes_on(a: &Client, b: &Client, n: u64) {
    for (to, from) in [(a, b), (b, a)] {
        let s = to.snapshot();
        let (video, audio) = (
            s.intact_from(from.id(), MediaKind::Video),
            s.intact_from(from.id(), MediaKind::Audio),
        );
        let from_id = from.id().to_owned();
        to.wait_for("media", Duration::from_secs(20), |s| {
            s.intact_from(&from_id, MediaKind::Video) >= video + n
                && s.intact_from(&from_id, MediaKind::Audio) >= audio + n
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}: {}", summary(&to.snapshot())));
    }
}

async fn a_call(server: &ServerHandle, room: &str) -> (Client, Client) {
    let a = join(server, room, "alice", ClientOptions::default()).await;
    let b = join(server, room, "bob", ClientOptions::default()).await;
    wait_all(&[&a, &b], "connected", Duration::from_secs(20), |_, s| {
        s.all_connected()
    })
    .await;
    call_goes_on(&a, &b, 20).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sessions_break_nothing() {
    let _serial = serial().await;
    // A session whose socket drops waits this long for its client to resume.
    let server = start_server_with(|c| c.limits.resume_grace_secs = 1).await;
    // A call in another room goes on throughout.
    let (a, b) = a_call(&server, "bystanders").await;
    let frames = prop::collection::vec(hostile(message_seeds()), 1..7);
    let mut runner = runner(cases("SWITCHBOARD_FUZZ_SESSION_CASES", 150));
    let started = Instant::now();
    runner
        .run(&(frames, any::<bool>()), |(frames, vanish)| {
            block_on(hostile_session(&server, frames, vanish));
            Ok(())
        })
        .unwrap();
    eprintln!("hostile sessions: done in {:?}", started.elapsed());
    call_goes_on(&a, &b, 20).await;
    close_all(&[&a, &b]).await;
    // Whatever they did, nothing of them stays, and a new call works.
    eventually("every hostile session gone", CLEANUP, || async {
        let m = server.metrics.snapshot();
        m.sessions == 0 && m.participants == 0 && m.peer_connections == 0 && m.rooms == 0
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", server.metrics.snapshot()));
    let (a, b) = a_call(&server, "after").await;
    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "after").await;
    server.shutdown().await;
}

/// Real datagrams of each protocol the media socket demultiplexes, as mutation seeds: a STUN
/// binding request naming the server's ICE username, a DTLS ClientHello record, RTP, RTCP.
fn datagram_seeds(server_ufrag: &str) -> Vec<Vec<u8>> {
    let username = format!("{server_ufrag}:fuzz");
    let mut stun = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7; 12]);
    stun.extend_from_slice(&[0x00, 0x06]);
    stun.extend_from_slice(&(username.len() as u16).to_be_bytes());
    stun.extend_from_slice(username.as_bytes());
    while stun.len() % 4 != 0 {
        stun.push(0);
    }
    stun.extend_from_slice(&[0x00, 0x24, 0, 4, 0x6e, 0, 0x1e, 0xff]); // PRIORITY
    let body = (stun.len() - 20) as u16;
    stun[2..4].copy_from_slice(&body.to_be_bytes());
    let mut dtls = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 60, 1, 0, 0, 48];
    dtls.extend_from_slice(&[0; 60]);
    let mut rtp = vec![0x80, 96, 0, 1, 0, 0, 0, 1, 0x12, 0x34, 0x56, 0x78];
    rtp.extend_from_slice(&[0x55; 200]);
    let rtcp = vec![
        0x81, 201, 0, 7, 0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0,
    ];
    vec![stun, dtls, rtp, rtcp]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_stop_no_call() {
    let _serial = serial().await;
    let server = start_server().await;
    let (a, b) = a_call(&server, "target").await;
    let ufrag = a
        .last_server_offer()
        .and_then(|sdp| {
            sdp.lines()
                .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:").map(str::to_owned))
        })
        .expect("the server's ICE username");
    let targets: Vec<_> = server.media_addrs().into_iter().flatten().collect();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let mut runner = runner(cases("SWITCHBOARD_FUZZ_DATAGRAM_CASES", 20_000));
    let started = Instant::now();
    let sent = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&hostile(datagram_seeds(&ufrag)), |datagram| {
            for target in &targets {
                // A full socket buffer drops it: so be it.
                let _ = socket.send_to(&datagram, target);
            }
            let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            // Paced a little: the point is what each datagram does, not a flood.
            if n.is_multiple_of(2000) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "hostile datagrams: {} to {} sockets in {:?}",
        sent.into_inner(),
        targets.len(),
        started.elapsed()
    );
    call_goes_on(&a, &b, 50).await;
    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "target").await;
    server.shutdown().await;
}
