//! Lite receivers against an in-process server over loopback, fed by one webrtc-rs publisher
//! (single-stream, or simulcast with tile sizes reported).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchboard::client::{Client, ClientOptions};
use switchboard::config::Config;
use switchboard::metrics::LayerLabel;
use switchboard::server::{Server, ServerHandle};
use switchboard::signal::protocol::MediaKind;

use super::engine::{FIRST_FEW, LAYERS, LOOPBACK_DEVICE};
use super::{Engine, Receiver, TrackSnapshot, candidate_is_loopback, loopback_candidates_only};
use crate::load::Tile;
use crate::load::run::Totals;
use crate::load::testing::eventually;

const RECEIVERS: usize = 5;
const DECRYPT_EVERY: u32 = 4;

fn init_tracing() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn describe(receivers: &[Receiver]) -> String {
    receivers
        .iter()
        .map(|r| {
            format!(
                "{} connected {} errors {:?} tracks {:?}",
                r.participant_id(),
                r.connected(),
                r.errors(),
                r.tracks()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every receiver leaves and gets `left`, the publisher leaves, and the server lets everything
/// go (its live gauges back to zero) before it shuts down.
async fn leave_clean(
    receivers: impl IntoIterator<Item = Receiver>,
    publisher: Client,
    engine: Arc<Engine>,
    server: ServerHandle,
) {
    for r in receivers {
        assert!(r.close().await, "no `left` from the server");
    }
    publisher.close().await;
    eventually(
        "the server's live gauges back to zero",
        Duration::from_secs(10),
        || gauges_zero(&server),
    )
    .await;
    drop(engine);
    server.shutdown().await;
}

fn gauges_zero(server: &ServerHandle) -> bool {
    let m = server.metrics.snapshot();
    m.participants == 0 && m.peer_connections == 0 && m.forwarders == 0 && m.downtracks == 0
}

fn check_track(who: &str, t: &TrackSnapshot) {
    let expected = t.max_seq + 1 - t.first_seq;
    let lost = expected.saturating_sub(t.received);
    assert!(
        lost * 100 <= expected,
        "{who} {:?}: {lost} of {expected} packets lost: {t:?}",
        t.kind
    );
    assert_eq!(t.bad, 0, "{who}: damaged payloads: {t:?}");
    assert_eq!(t.duplicates, 0, "{who}: duplicates: {t:?}");
    // The first few, then about one in DECRYPT_EVERY: sampling happened, and not more.
    let sampled = (t.received.saturating_sub(FIRST_FEW)) / u64::from(DECRYPT_EVERY);
    assert!(
        t.decrypted >= FIRST_FEW && t.decrypted <= FIRST_FEW + sampled + 1,
        "{who}: {} of {} packets decrypted (expected {FIRST_FEW} + {sampled}): {t:?}",
        t.decrypted,
        t.received
    );
    assert!(t.decrypted < t.received, "{who}: nothing skipped: {t:?}");
    assert!(t.bytes > 0, "{who}: no bytes: {t:?}");
    if t.kind == MediaKind::Video {
        assert_eq!(
            t.first_packet_key,
            Some(true),
            "{who}: the first video packet is not a key frame: {t:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lite_receivers_get_every_stream_and_leave_clean() {
    init_tracing();
    let mut config = Config::for_tests();
    config.workers = Some(1);
    let server = Server::start(config).await.expect("the server starts");
    let url = format!("ws://{}/ws", server.http_addr);
    let opts = ClientOptions::default();
    let per_second = u64::from(
        opts.media.video_fps * opts.media.video_packets_per_frame
            + opts.media.audio_packets_per_second,
    );
    let publisher = Client::connect(&url, "lite", "pub", opts)
        .await
        .expect("the publisher joins");
    eventually("the publisher sending", Duration::from_secs(10), || {
        publisher
            .snapshot()
            .local_tracks
            .iter()
            .filter(|t| t.sent_packets > 0)
            .count()
            == 2
    })
    .await;

    let totals = Arc::new(Totals::default());
    let engine = Arc::new(
        Engine::start(DECRYPT_EVERY, totals.clone(), LOOPBACK_DEVICE).expect("the engine starts"),
    );
    let mut receivers = Vec::new();
    for i in 0..RECEIVERS {
        let receiver = Receiver::connect(
            &engine,
            &url,
            "lite",
            &format!("sub{i}"),
            Duration::from_secs(10),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("sub{i} cannot join: {e:#}"));
        receivers.push(receiver);
    }
    let all_flowing = |receivers: &[Receiver]| {
        receivers
            .iter()
            .all(|r| r.connected() && r.tracks().iter().filter(|t| t.intact > 0).count() == 2)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !all_flowing(&receivers) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every receiver gets both tracks:\n{}",
            describe(&receivers)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.metrics.snapshot().downtracks, 2 * RECEIVERS as u64);

    // Media flows for a while, measured.
    totals.set_measuring(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    totals.set_measuring(false);

    for r in &receivers {
        let tracks = r.tracks();
        let mut kinds: Vec<MediaKind> = tracks.iter().map(|t| t.kind).collect();
        kinds.sort_by_key(|k| *k == MediaKind::Video);
        assert_eq!(
            kinds,
            vec![MediaKind::Audio, MediaKind::Video],
            "{}",
            describe(&receivers)
        );
        for t in &tracks {
            // The server announced the track in the receiver's SDP under the publisher's stream.
            assert!(
                t.stream_id.starts_with(publisher.id()),
                "stream {} is not {}'s",
                t.stream_id,
                publisher.id()
            );
            check_track(r.participant_id(), t);
        }
        // Most of the 3 s measured, at the publisher's rate.
        let received: u64 = tracks.iter().map(|t| t.received).sum();
        assert!(
            received >= 5 * per_second / 2,
            "{}: only {received} packets",
            r.participant_id()
        );
        assert!(r.first_media_us().is_some());
        assert!(r.errors().is_empty(), "server errors: {:?}", r.errors());
    }
    let (audio, video) = (totals.audio.snapshot(), totals.video.snapshot());
    assert!(
        audio.percentiles(1000.0).count > 0 && video.percentiles(1000.0).count > 0,
        "sampled payloads gave latencies"
    );
    assert!(totals.packets.load(Ordering::Relaxed) >= 5 * per_second / 2 * RECEIVERS as u64);
    let s = &engine.stats;
    for (name, counter) in [
        ("unroutable", &s.unroutable),
        ("not loopback", &s.not_loopback),
        ("undecrypted", &s.undecrypted),
        ("ssrc overflow", &s.ssrc_overflow),
        ("send dropped", &s.send_dropped),
        ("too old", &s.too_old),
    ] {
        assert_eq!(counter.load(Ordering::Relaxed), 0, "lite engine {name}");
    }
    // No NACK storm: the skipped packets made no receiver ask for retransmissions, so media
    // came on the two tracks' SSRCs only (no RTX stream).
    for r in &receivers {
        assert_eq!(
            r.ssrcs(),
            2,
            "{}: media on more SSRCs than tracks (retransmissions?)",
            r.participant_id()
        );
    }
    assert_eq!(
        s.unmapped.load(Ordering::Relaxed),
        0,
        "packets of unknown SSRCs"
    );

    // A datagram to a loopback address no receiver has is dropped and counted.
    let stray = std::net::UdpSocket::bind("127.0.0.1:0").expect("a stray socket");
    for to in ["127.1.200.200", "127.0.0.1"] {
        let _ = stray.send_to(
            &[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            (to, engine.port),
        );
    }
    eventually("stray datagrams counted", Duration::from_secs(5), || {
        s.unroutable.load(Ordering::Relaxed) == 2
    })
    .await;

    // Clean leave: every receiver gets `left`, and the server lets everything go.
    leave_clean(receivers, publisher, engine, server).await;
}

/// The server's forwarded video packets by source layer.
fn forwarded_by_layer(server: &ServerHandle) -> [u64; LAYERS] {
    std::array::from_fn(|layer| {
        server
            .metrics
            .packets_out_by_layer
            .get_or_create(&LayerLabel {
                layer: layer as u32,
            })
            .get()
    })
}

/// The receiver's video track, decrypted packets by layer.
fn video_layers(r: &Receiver) -> [u64; LAYERS] {
    r.tracks()
        .iter()
        .find(|t| t.kind == MediaKind::Video)
        .map_or([0; LAYERS], |t| t.decrypted_by_layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_tile_gets_the_layer_that_covers_it() {
    init_tracing();
    let mut config = Config::for_tests();
    config.workers = Some(1);
    let server = Server::start(config).await.expect("the server starts");
    let url = format!("ws://{}/ws", server.http_addr);
    let totals = Arc::new(Totals::default());
    let engine = Arc::new(Engine::start(1, totals, LOOPBACK_DEVICE).expect("the engine starts"));
    let tile = Some(Tile {
        width: 320,
        height: 180,
    });
    let join = |name: &'static str, tile| {
        let (engine, url) = (engine.clone(), url.clone());
        async move {
            Receiver::connect(&engine, &url, "tiles", name, Duration::from_secs(10), tile)
                .await
                .unwrap_or_else(|e| panic!("{name} cannot join: {e:#}"))
        }
    };
    // One hears of the track from `track-published`, the others from `joined`.
    let early = join("early", tile).await;
    let mut opts = ClientOptions::default();
    opts.media.simulcast = true;
    let publisher = Client::connect(&url, "tiles", "pub", opts)
        .await
        .expect("the publisher joins");
    let receivers = [early, join("late", tile).await, join("untiled", None).await];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !receivers
        .iter()
        .all(|r| r.connected() && r.tracks().iter().filter(|t| t.intact > 0).count() == 2)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every receiver gets both tracks:\n{}",
            describe(&receivers)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the start, where the untiled receiver may begin below the top layer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (server_before, before) = (
        forwarded_by_layer(&server),
        receivers.iter().map(video_layers).collect::<Vec<_>>(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_after = forwarded_by_layer(&server);
    let delta = |a: [u64; LAYERS], b: [u64; LAYERS]| -> [u64; LAYERS] {
        std::array::from_fn(|l| b[l].saturating_sub(a[l]))
    };
    for (r, before) in receivers.iter().zip(before) {
        let window = delta(before, video_layers(r));
        let wanted = if r.participant_id() == receivers[2].participant_id() {
            LAYERS - 1
        } else {
            0
        };
        for (layer, n) in window.into_iter().enumerate() {
            assert_eq!(
                n > 0,
                layer == wanted,
                "{}: video packets by layer {window:?}, expected layer {wanted} only:\n{}",
                r.participant_id(),
                describe(&receivers)
            );
        }
        if wanted == 0 {
            // From its first packet on: the tile was known before the video went live.
            let all = video_layers(r);
            assert_eq!(all[1..], [0; LAYERS - 1], "{}: {all:?}", r.participant_id());
        }
        assert!(r.errors().is_empty(), "server errors: {:?}", r.errors());
    }
    // The server's count agrees: two subscribers on layer 0, one on the top layer.
    let forwarded = delta(server_before, server_after);
    assert!(
        forwarded[0] > 0 && forwarded[1] == 0 && forwarded[2] > 0,
        "forwarded by layer {forwarded:?}"
    );
    assert!(
        forwarded[0].abs_diff(2 * forwarded[2]) * 5 <= forwarded[0],
        "two layer-0 subscribers per top-layer one: {forwarded:?}"
    );

    leave_clean(receivers, publisher, engine, server).await;
}

#[test]
fn only_loopback_candidates_pass() {
    let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host\r\n\
               a=candidate:2 1 udp 2130706431 192.0.2.2 7882 typ host\r\n\
               a=candidate:3 1 udp 2130706431 ::1 7882 typ host\r\na=mid:0\r\n";
    assert_eq!(
        loopback_candidates_only(sdp),
        "v=0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host\r\n\
         a=candidate:3 1 udp 2130706431 ::1 7882 typ host\r\na=mid:0\r\n"
    );
    assert!(candidate_is_loopback(
        "candidate:1 1 udp 1 127.9.0.1 5000 typ host"
    ));
    assert!(!candidate_is_loopback(
        "candidate:1 1 udp 1 10.0.0.1 5000 typ host"
    ));
    assert!(!candidate_is_loopback("candidate:garbage"));
}
