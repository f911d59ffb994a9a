//! Connectivity with an in-process server and synthetic clients on 127.0.0.1: a client whose
//! address changes mid-call (its datagrams start coming from another port, as after a NAT
//! rebinding or a network change) and that restarts ICE gets its media back with the same
//! participant id, and nobody sees it leave.

mod common;

use std::time::{Duration, Instant};

use common::{
    CLEANUP, assert_all_clean, close_all, eventually, join, serial, start_server_with, summary,
    wait_all,
};
use switchboard::client::relay::ShapedRelay;
use switchboard::client::{Client, ClientOptions};
use switchboard::signal::protocol::{MediaKind, ServerMessage};

const CONNECT: Duration = Duration::from_secs(20);
const MEDIA: Duration = Duration::from_secs(20);
/// How soon media must flow again after the address changed (issue 9).
const BACK_WITHIN: Duration = Duration::from_secs(3);

fn intact_from(client: &Client, publisher: &str) -> u64 {
    client.snapshot().intact_from(publisher, MediaKind::Video)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_gets_its_media_back() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(1)).await;
    let fixed = join(&server, "move", "fixed", ClientOptions::default()).await;
    let media = server.media_addrs()[0][0];
    let path = ShapedRelay::start(media.ip(), media, 0)
        .await
        .expect("relay");
    let moving = join(
        &server,
        "move",
        "moving",
        ClientOptions {
            media_relay: Some(path.route),
            ..ClientOptions::default()
        },
    )
    .await;
    let (fixed_id, moving_id) = (fixed.id().to_owned(), moving.id().to_owned());
    wait_all(&[&fixed, &moving], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    wait_all(&[&fixed, &moving], "video both ways", MEDIA, |me, s| {
        let other = if me.id() == fixed_id {
            &moving_id
        } else {
            &fixed_id
        };
        s.intact_from(other, MediaKind::Video) >= 20
    })
    .await;

    // The client's network changes: its datagrams now come from another address, and it
    // restarts ICE on the same peer connection, as a browser does on a network change.
    path.rebind();
    let moved = Instant::now();
    moving.restart_ice().await.expect("ICE restart offer");
    let (to_moving, to_fixed) = (
        intact_from(&moving, &fixed_id),
        intact_from(&fixed, &moving_id),
    );
    let back = eventually("video both ways again", MEDIA, || async {
        intact_from(&moving, &fixed_id) >= to_moving + 20
            && intact_from(&fixed, &moving_id) >= to_fixed + 20
    })
    .await;
    let took = moved.elapsed();
    if let Err(e) = back {
        panic!(
            "{e:#}\n{}\n{}",
            summary(&fixed.snapshot()),
            summary(&moving.snapshot())
        );
    }
    eprintln!("[connectivity] media back {took:?} after the address changed");
    assert!(
        took <= BACK_WITHIN + Duration::from_secs(1),
        "media came back only {took:?} after the address changed"
    );
    assert_eq!(moving.id(), moving_id);
    assert!(
        !fixed.snapshot().events.iter().any(|e| matches!(
            e,
            ServerMessage::ParticipantLeft { participant_id } if *participant_id == moving_id
        )),
        "the address change looked like a leave"
    );

    close_all(&[&fixed, &moving]).await;
    assert_all_clean(&server, "move").await;
    server.shutdown().await;
    let _ = CLEANUP;
}
