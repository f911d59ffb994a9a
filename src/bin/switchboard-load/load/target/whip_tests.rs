//! The WHIP target against an in-process Switchboard: a lite publisher over WHIP, lite players
//! over WHEP, every payload checked, and everything gone at the server after they hang up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchboard::client::ClientOptions;
use switchboard::config::Config;
use switchboard::server::Server;
use switchboard::signal::protocol::MediaKind;

use super::whip;
use crate::load::lite::Engine;
use crate::load::lite::engine::LOOPBACK_DEVICE;
use crate::load::run::Totals;
use crate::load::testing::eventually;

const PLAYERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whip_publisher_reaches_whep_players_and_everything_is_freed() {
    let mut config = Config::for_tests();
    config.workers = Some(1);
    let server = Server::start(config).await.expect("the server starts");
    let base = format!("http://{}", server.http_addr);
    let http = super::http_client().expect("an HTTP client");
    let media = ClientOptions::default().media;

    let publisher = whip::publish(
        &http,
        &format!("{base}/whip/loadroom"),
        "pub0",
        media,
        true,
        true,
    )
    .await
    .expect("the WHIP publisher is answered");
    eventually("the publisher sending", Duration::from_secs(10), || {
        publisher.connected() && publisher.sent().0 > 0
    })
    .await;

    let totals = Arc::new(Totals::default());
    let engine =
        Arc::new(Engine::start(4, totals.clone(), LOOPBACK_DEVICE).expect("the engine starts"));
    let mut players = Vec::new();
    for i in 0..PLAYERS {
        let player = whip::play(
            &http,
            &engine,
            &format!("{base}/whep/loadroom"),
            &format!("player{i}"),
            true,
            true,
        )
        .await
        .unwrap_or_else(|e| panic!("player{i} is not answered: {e:#}"));
        players.push(player);
    }
    eventually(
        "every player receiving audio and video",
        Duration::from_secs(20),
        || {
            players
                .iter()
                .all(|p| p.connected() && p.tracks().iter().filter(|t| t.intact > 0).count() == 2)
        },
    )
    .await;
    assert_eq!(
        server.metrics.snapshot().http_sessions,
        1 + PLAYERS as u64,
        "one WHIP and {PLAYERS} WHEP resources"
    );
    totals.set_measuring(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    totals.set_measuring(false);

    for p in &players {
        let tracks = p.tracks();
        let mut kinds: Vec<MediaKind> = tracks.iter().map(|t| t.kind).collect();
        kinds.sort_by_key(|k| *k == MediaKind::Video);
        assert_eq!(kinds, vec![MediaKind::Audio, MediaKind::Video]);
        for t in &tracks {
            // The sender is learnt from the payloads and then checked on every sampled one.
            assert_eq!(
                t.bad,
                0,
                "{}: damaged or foreign payloads: {t:?}",
                p.participant_id()
            );
            let expected = t.max_seq + 1 - t.first_seq;
            assert!(
                expected.saturating_sub(t.received) * 100 <= expected,
                "{}: over 1 % lost: {t:?}",
                p.participant_id()
            );
            if t.kind == MediaKind::Video {
                assert_eq!(
                    t.first_packet_key,
                    Some(true),
                    "starts on a key frame: {t:?}"
                );
            }
        }
    }
    let audio = totals.audio.snapshot().percentiles(1000.0);
    assert!(audio.count > 0, "sampled payloads gave latencies");
    assert_eq!(engine.stats.not_loopback.load(Ordering::Relaxed), 0);

    // DELETE on every resource: the server lets everything go.
    for p in players {
        assert!(p.close().await, "the WHEP resource was not deleted");
    }
    publisher.close().await;
    eventually(
        "the server's gauges back to zero",
        Duration::from_secs(10),
        || {
            let m = server.metrics.snapshot();
            m.participants == 0 && m.peer_connections == 0 && m.http_sessions == 0
        },
    )
    .await;
    drop(engine);
    server.shutdown().await;
}
