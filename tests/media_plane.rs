//! The media plane's own guarantees, with an in-process server and synthetic clients (an
//! independent WebRTC stack) on 127.0.0.1: rooms spanning workers, routing datagrams without
//! scanning connections, a new subscriber starting on a keyframe, m-lines reused across
//! join/leave cycles, tracks published with a plain `addTrack`, and bounds under a flood.
//!
//! Checks are on what was received and on counters, never on timing: the timeouts are generous
//! limits, not expectations.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    CLEANUP, assert_all_clean, close_all, eventually, join, serial, start_server_with, wait_all,
};
use switchboard::client::{Client, ClientOptions, MediaProfile};
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::{MediaKind, ServerMessage};

const MEDIA: Duration = Duration::from_secs(20);

fn intact_video_from(client: &Client, publisher: &str) -> u64 {
    client.snapshot().intact_from(publisher, MediaKind::Video)
}

async fn wait_video_from(clients: &[&Client], publisher: &str, packets: u64) {
    let publisher = publisher.to_owned();
    wait_all(clients, "video from the publisher", MEDIA, move |c, _| {
        intact_video_from(c, &publisher) >= packets
    })
    .await;
}

/// The body of a plain HTTP GET to the server.
async fn http_get(server: &ServerHandle, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// The address media worker `k` announces.
fn worker_addr(server: &ServerHandle, k: usize) -> SocketAddr {
    server.media_addrs()[k][0]
}

/// Resident memory of this process (server and clients together), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A publisher on one worker, subscribers on both: packets cross workers once per worker and
/// every subscriber gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_room() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(2)).await;
    let publisher = join(&server, "w2", "pub", ClientOptions::default()).await;
    let mut subscribers = Vec::new();
    for i in 0..4 {
        subscribers.push(join(&server, "w2", &format!("sub{i}"), ClientOptions::silent()).await);
    }
    let per_worker = server.media_worker_connections();
    assert_eq!(per_worker.len(), 2);
    assert!(
        per_worker.iter().all(|n| *n >= 2),
        "participants spread over both workers: {per_worker:?}"
    );
    let subs: Vec<&Client> = subscribers.iter().collect();
    wait_video_from(&subs, publisher.id(), 60).await;
    let pub_id = publisher.id().to_owned();
    wait_all(&subs, "audio from the publisher", MEDIA, |_, s| {
        s.intact_from(&pub_id, MediaKind::Audio) >= 50
    })
    .await;
    for s in &subs {
        let snap = s.snapshot();
        assert_eq!(snap.bad_payloads(), 0, "damaged payloads at {}", s.id());
        assert!(
            snap.errors.is_empty(),
            "errors at {}: {:?}",
            s.id(),
            snap.errors
        );
    }
    let m = server.metrics.snapshot();
    assert_eq!(m.media_workers, 2);
    let text = http_get(&server, "/metrics").await;
    for k in 0..2 {
        for metric in [
            "switchboard_worker_connections",
            "switchboard_worker_receive_drops_total",
        ] {
            let line = format!("{metric}{{worker=\"{k}\"}} ");
            assert!(text.contains(&line), "{metric} for worker {k}:\n{text}");
        }
    }
    assert_eq!(m.forwarders, 2, "one source forwarder per published track");

    let mut everyone = subs.clone();
    everyone.push(&publisher);
    close_all(&everyone).await;
    assert_all_clean(&server, "w2").await;
    assert_eq!(server.media_worker_connections(), vec![0, 0]);
    server.shutdown().await;
}

/// A STUN binding request with a ufrag no connection has, and junk, from an address no
/// connection has answered: each is dropped and counted, and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_datagrams_are_dropped_and_counted() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(1)).await;
    let publisher = join(&server, "dx", "pub", ClientOptions::default()).await;
    let viewer = join(&server, "dx", "viewer", ClientOptions::silent()).await;
    wait_video_from(&[&viewer], publisher.id(), 30).await;

    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let to = worker_addr(&server, 0);
    let before = server.metrics.snapshot().datagrams_unroutable;
    stranger
        .send_to(&binding_request("nosuchufrag:someone"), to)
        .expect("send");
    stranger
        .send_to(
            &[0x80, 0x60, 0x00, 0x01, 0, 0, 0, 1, 0, 0, 0, 2, 0xde, 0xad],
            to,
        )
        .expect("send");
    for i in 0..200u32 {
        stranger
            .send_to(&i.to_be_bytes().repeat(50), to)
            .expect("send");
    }
    eventually("202 datagrams counted as unroutable", CLEANUP, || async {
        server.metrics.snapshot().datagrams_unroutable >= before + 202
    })
    .await
    .expect("every stray datagram is counted");

    let seen = intact_video_from(&viewer, publisher.id());
    wait_video_from(&[&viewer], publisher.id(), seen + 30).await;
    close_all(&[&publisher, &viewer]).await;
    assert_all_clean(&server, "dx").await;
    server.shutdown().await;
}

/// A STUN binding request (RFC 5389) carrying `username`, without integrity.
fn binding_request(username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&rand::random::<[u8; 12]>());
    m.extend_from_slice(&attrs);
    m
}

/// The publisher labels only every 5 s a key frame (and answers keyframe requests at once): a
/// subscriber that joins mid-call still starts on a key frame, for VP8 and H.264.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_starts_on_a_keyframe() {
    let _serial = serial().await;
    let server = start_server_with(|_| {}).await;
    for (room, codec) in [
        ("kf-vp8", Default::default()),
        ("kf-h264", switchboard::client::VideoCodec::H264),
    ] {
        let options = ClientOptions {
            media: MediaProfile {
                video_codec: codec,
                keyframe_interval_frames: 150,
                ..Default::default()
            },
            ..Default::default()
        };
        let publisher = join(&server, room, "pub", options).await;
        let early = join(&server, room, "early", ClientOptions::silent()).await;
        wait_video_from(&[&early], publisher.id(), 60).await;
        // Joins well after the last periodic key frame.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let late = join(&server, room, "late", ClientOptions::silent()).await;
        wait_video_from(&[&late], publisher.id(), 10).await;
        for viewer in [&early, &late] {
            let snap = viewer.snapshot();
            let video: Vec<_> = snap
                .remote_tracks
                .iter()
                .filter(|t| t.kind == MediaKind::Video)
                .collect();
            assert!(!video.is_empty());
            for t in video {
                assert_eq!(
                    t.first_packet_key,
                    Some(true),
                    "{room}: {} saw a delta frame first",
                    viewer.id()
                );
            }
        }
        let pub_snap = publisher.snapshot();
        let video = pub_snap.local(MediaKind::Video).expect("video track");
        assert!(
            video.pli + video.fir >= 1,
            "{room}: the server asked for keyframes"
        );
        close_all(&[&publisher, &early, &late]).await;
        assert_all_clean(&server, room).await;
    }
    server.shutdown().await;
}

/// Twenty-five participants join, publish and leave next to one that stays: the stayer's connection
/// keeps only the live tracks' m-lines active; departed tracks' m-lines are stopped (port 0).
///
/// str0m 0.25 never recycles a stopped m-line in its own offers (it accepts recycling only in
/// a remote offer), so the SDP still grows by the stopped m-lines; see the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_tracks_m_lines_are_stopped() {
    let _serial = serial().await;
    let server = start_server_with(|_| {}).await;
    let stayer = join(&server, "cyc", "stayer", ClientOptions::silent()).await;
    let mut total = 0;
    for i in 0..25 {
        let guest = join(
            &server,
            "cyc",
            &format!("guest{i}"),
            ClientOptions::default(),
        )
        .await;
        let guest_id = guest.id().to_owned();
        wait_video_from(&[&stayer], &guest_id, 1).await;
        guest.close().await;
        // Only the stayer's data channel is left active once the departure is negotiated.
        let settled = eventually("the guest's m-lines stopped", CLEANUP, || async {
            stayer.active_remote_tracks().await.is_empty()
                && last_server_offer_active_m_lines(&stayer) == 1
        })
        .await;
        if let Err(e) = settled {
            panic!(
                "cycle {i}: {e:#}; the last offer:\n{:?}",
                stayer.last_server_offer()
            );
        }
        total = last_server_offer_m_lines(&stayer);
    }
    assert!(total > 25, "stopped m-lines stay in the SDP ({total})");
    close_all(&[&stayer]).await;
    assert_all_clean(&server, "cyc").await;
    server.shutdown().await;
}

/// m-lines in the last offer the server sent `client`.
fn last_server_offer_m_lines(client: &Client) -> usize {
    client
        .last_server_offer()
        .map_or(0, |sdp| sdp.lines().filter(|l| l.starts_with("m=")).count())
}

/// m-lines that are not stopped (port 0) in the last offer the server sent `client`.
fn last_server_offer_active_m_lines(client: &Client) -> usize {
    client
        .last_server_offer()
        .map(|sdp| {
            sdp.lines()
                .filter(|l| l.starts_with("m=") && l.split(' ').nth(1) != Some("0"))
                .count()
        })
        .unwrap_or(0)
}

/// A client that publishes with a plain `addTrack` (its track lands on a transceiver the
/// server created to send to it) is published like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_add_track_is_published() {
    let _serial = serial().await;
    let server = start_server_with(|_| {}).await;
    let sender = join(&server, "add", "sender", ClientOptions::default()).await;
    let options = ClientOptions {
        publish_audio: false,
        publish_video: false,
        media: MediaProfile {
            plain_add_track: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let reuser = join(&server, "add", "reuser", options).await;
    // The server's offer gives the reuser receive-only transceivers first.
    wait_video_from(&[&reuser], sender.id(), 10).await;
    reuser
        .publish_track(MediaKind::Video)
        .await
        .expect("publish");
    wait_video_from(&[&sender], reuser.id(), 30).await;
    let reuser_id = reuser.id().to_owned();
    assert!(
        sender.snapshot().events.iter().any(|e| matches!(
            e,
            ServerMessage::TrackPublished { track } if track.participant_id == reuser_id
        )),
        "track-published announced"
    );
    close_all(&[&sender, &reuser]).await;
    assert_all_clean(&server, "add").await;
    server.shutdown().await;
}

/// 200,000 junk datagrams at full speed while a call runs, on one worker: the call keeps its
/// media, every datagram is counted, and memory stays within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_flood_stays_within_bounds() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(1)).await;
    let publisher = join(&server, "flood", "pub", ClientOptions::default()).await;
    let viewer = join(&server, "flood", "viewer", ClientOptions::silent()).await;
    wait_video_from(&[&viewer], publisher.id(), 30).await;
    let rss_before = rss_kib();
    let to = worker_addr(&server, 0);
    let flood = tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let junk = [0x80u8; 1200];
        let mut sent = 0u64;
        for _ in 0..200_000 {
            if socket.send_to(&junk, to).is_ok() {
                sent += 1;
            }
        }
        sent
    });
    let sent = flood.await.expect("flood thread");
    assert!(sent > 0);
    // The kernel may drop some of the flood at the socket; what arrives is counted.
    eventually("the flood is counted", CLEANUP, || async {
        server.metrics.snapshot().datagrams_unroutable > sent / 10
    })
    .await
    .expect("flood datagrams counted");
    let seen = intact_video_from(&viewer, publisher.id());
    wait_video_from(&[&viewer], publisher.id(), seen + 30).await;
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB under a flood of {sent} datagrams"
    );
    close_all(&[&publisher, &viewer]).await;
    assert_all_clean(&server, "flood").await;
    server.shutdown().await;
}

/// Admission follows measured load: with the limit at 0.1 % of a worker's time, a call in
/// progress is enough to turn the next SFU join away with `server-full`, counted, while the call
/// keeps its media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_refused_when_the_workers_are_busy() {
    let _serial = serial().await;
    let server = start_server_with(|c| {
        c.workers = Some(1);
        c.limits.max_worker_load_percent = 0.1;
    })
    .await;
    let publisher = join(&server, "busy", "pub", ClientOptions::default()).await;
    let viewer = join(&server, "busy", "viewer", ClientOptions::silent()).await;
    wait_video_from(&[&viewer], publisher.id(), 60).await;
    let url = common::ws_url(&server);
    let refused = eventually("a join refused for load", CLEANUP, || {
        let url = url.clone();
        async move {
            match switchboard::client::Client::connect(
                &url,
                "busy",
                "late",
                ClientOptions::silent(),
            )
            .await
            {
                Err(e) => format!("{e:#}").contains("ServerFull"),
                // Admitted before the load rose: leave for good (a dropped socket would wait
                // for a resume).
                Ok(client) => {
                    client.close().await;
                    false
                }
            }
        }
    })
    .await;
    refused.expect("the worker's load passes 0.1 % with a call running");
    assert!(server.metrics.snapshot().joins_refused_at_capacity >= 1);
    let seen = intact_video_from(&viewer, publisher.id());
    wait_video_from(&[&viewer], publisher.id(), seen + 30).await;
    close_all(&[&publisher, &viewer]).await;
    assert_all_clean(&server, "busy").await;
    server.shutdown().await;
}
