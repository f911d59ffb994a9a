//! Graceful drain: with a call in progress the server stops taking joins, `/healthz` turns 503,
//! the participants are told and keep their media until the grace period ends, then everything
//! closes.

mod common;

use std::time::Duration;

use common::*;
use switchboard::client::{Client, ClientOptions};
use switchboard::signal::protocol::{ErrorCode, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MEDIA: Duration = Duration::from_secs(20);

async fn healthz(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_draining_server_lets_calls_finish_then_closes() {
    let _serial = serial().await;
    // The drain's own grace (4 s), not --drain-secs (30 s), is what clients are told.
    let server = start_server().await;
    let (addr, metrics) = (server.http_addr, server.metrics.clone());
    let url = ws_url(&server);
    let a = Client::connect(&url, "late", "a", ClientOptions::default())
        .await
        .expect("joins");
    let b = Client::connect(&url, "late", "b", ClientOptions::default())
        .await
        .expect("joins");
    let both = [&a, &b];
    wait_all(&both, "media", MEDIA, |_, s| {
        s.remote_tracks.iter().filter(|t| t.intact > 10).count() == 2
    })
    .await;
    assert!(healthz(addr).await.contains("200"));

    let drained = tokio::spawn(server.drain(Duration::from_secs(4)));
    wait_all(&both, "told of the drain", MEDIA, |_, s| {
        s.events
            .iter()
            .any(|e| matches!(e, ServerMessage::ServerDraining { deadline_secs: 4 }))
    })
    .await;
    assert!(healthz(addr).await.contains("503"));
    let refused = Client::connect(&url, "late", "c", ClientOptions::default()).await;
    assert!(
        format!("{:#}", refused.err().expect("refused"))
            .contains(&format!("{:?}", ErrorCode::ServerDraining))
    );
    // The call goes on meanwhile.
    let before: u64 = a.snapshot().remote_tracks.iter().map(|t| t.intact).sum();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: u64 = a.snapshot().remote_tracks.iter().map(|t| t.intact).sum();
    assert!(
        after > before + 20,
        "media stopped while draining: {before} -> {after}"
    );
    assert_eq!(metrics.snapshot().draining, 1);

    tokio::time::timeout(Duration::from_secs(15), drained)
        .await
        .expect("the drain ends after its grace period")
        .expect("no panic");
    wait_all(&both, "closed", MEDIA, |_, s| s.socket_closed).await;
    let m = metrics.snapshot();
    assert_eq!((m.sessions, m.participants, m.peer_connections), (0, 0, 0));
}

/// A second signal during a drain (`drain_unless`'s cut) ends the grace at once: the call in
/// progress is closed and everything freed, long before the grace would have run out.
#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    let _serial = serial().await;
    let server = start_server().await;
    let metrics = server.metrics.clone();
    let url = ws_url(&server);
    let a = Client::connect(&url, "cut", "a", ClientOptions::default())
        .await
        .expect("joins");
    wait_all(&[&a], "connected", MEDIA, |_, s| s.all_connected()).await;
    let second_signal = tokio::time::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(15),
        server.drain_unless(Duration::from_secs(300), second_signal),
    )
    .await
    .expect("the drain is cut short");
    assert!(started.elapsed() < Duration::from_secs(15));
    wait_all(&[&a], "closed", MEDIA, |_, s| s.socket_closed).await;
    let m = metrics.snapshot();
    assert_eq!((m.sessions, m.participants, m.peer_connections), (0, 0, 0));
}
