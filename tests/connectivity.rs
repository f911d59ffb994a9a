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
    // The same streams go on: nothing was renegotiated but the ICE credentials.
    for (client, from) in [(&moving, &fixed_id), (&fixed, &moving_id)] {
        let streams = client
            .snapshot()
            .tracks_from(from, MediaKind::Video)
            .count();
        assert_eq!(streams, 1, "video streams from {from} after the restart");
    }
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

/// The embedded TURN server over UDP: `joined` hands out its URLs with credentials that
/// allocate a relay; expired or forged credentials are refused; a relay does not reach private
/// addresses (other than the server's media ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_takes_fresh_credentials_and_refuses_expired_ones() {
    use std::sync::Arc;
    use switchboard::turn::credentials_until;
    use tokio::net::UdpSocket;
    use webrtc_util::Conn;

    let _serial = serial().await;
    let server = start_server_with(|c| {
        c.no_turn = false;
        c.turn_port = 0;
        c.turn_secret = Some("test-secret".into());
    })
    .await;
    let turn_addr = server.turn_addr().expect("the TURN server runs");
    let client = join(&server, "turn", "t", ClientOptions::silent()).await;
    let ice = joined_ice_server(&client);
    let port = turn_addr.port();
    assert_eq!(
        ice.urls,
        [
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp")
        ]
    );
    let username = ice.username.clone().expect("a username");
    assert!(
        username.ends_with(&format!(":{}", client.id())),
        "{username}"
    );

    let allocate = |username: String, password: String| async move {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let turn = turn_client(turn_addr, username, password, Arc::new(socket)).await;
        let relay = tokio::time::timeout(Duration::from_secs(10), turn.allocate()).await;
        (turn, relay)
    };

    // The credentials from `joined` allocate a relay.
    let (turn, relay) = allocate(username, ice.credential.clone().expect("a password")).await;
    let relay = relay
        .expect("an answer")
        .expect("an allocation with fresh credentials");
    // It does not reach a private address that is not a media port.
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    relay
        .send_to(b"probe", peer.local_addr().expect("addr"))
        .await
        .expect("send");
    eventually(
        "the relay refuses a private destination",
        CLEANUP,
        || async { server.metrics.snapshot().turn_relay_denied >= 1 },
    )
    .await
    .expect("counted as denied");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), peer.recv_from(&mut buf))
            .await
            .is_err(),
        "the probe got through"
    );
    let _ = relay.close().await;
    let _ = turn.close().await;

    // Expired, and forged, credentials are refused.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let (old_user, old_pass) = credentials_until("test-secret", client.id(), now - 10);
    let (turn, refused) = allocate(old_user, old_pass).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "expired credentials were accepted"
    );
    let _ = turn.close().await;
    let (forged_user, forged_pass) = credentials_until("guessed", client.id(), now + 600);
    let (turn, refused) = allocate(forged_user, forged_pass).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "forged credentials were accepted"
    );
    let _ = turn.close().await;
    assert!(server.metrics.snapshot().turn_auth_refused >= 1);

    close_all(&[&client]).await;
    assert_all_clean(&server, "turn").await;
    server.shutdown().await;
}

/// The embedded TURN server's caps: past `--turn-max-allocations` relays an allocation is
/// refused until one closes, and a relay sending faster than `--turn-relay-kbps` has the excess
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_allocations_and_relay_rates_are_capped() {
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    use webrtc_util::Conn;

    let _serial = serial().await;
    let server = start_server_with(|c| {
        c.no_turn = false;
        c.turn_port = 0;
        c.turn_allow_private = true;
        c.turn_max_allocations = 1;
        c.turn_relay_kbps = 16; // 2,000 bytes a second
    })
    .await;
    let turn_addr = server.turn_addr().expect("the TURN server runs");
    let client = join(&server, "turn-caps", "t", ClientOptions::silent()).await;
    let ice = joined_ice_server(&client);
    let (username, password) = (ice.username.expect("user"), ice.credential.expect("pass"));
    let allocate = || async {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let turn = turn_client(
            turn_addr,
            username.clone(),
            password.clone(),
            Arc::new(socket),
        )
        .await;
        let relay = tokio::time::timeout(Duration::from_secs(10), turn.allocate())
            .await
            .expect("an answer");
        (turn, relay)
    };

    let (first_turn, first) = allocate().await;
    let first = first.expect("the first relay");
    assert_eq!(server.metrics.snapshot().turn_allocations, 1);
    let (second_turn, second) = allocate().await;
    assert!(second.is_err(), "a relay past the cap");
    assert_eq!(server.metrics.snapshot().turn_allocations_refused, 1);
    let _ = second_turn.close().await;

    // 20 datagrams of 500 bytes at once: the burst (a second's worth, 2,000 bytes) passes.
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let to = peer.local_addr().expect("addr");
    for _ in 0..20 {
        first.send_to(&[7u8; 500], to).await.expect("send");
    }
    let mut received = 0;
    let mut buf = [0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), peer.recv_from(&mut buf)).await
    {
        received += 1;
    }
    assert!((1..=5).contains(&received), "{received} of 20 relayed");
    assert!(server.metrics.snapshot().turn_relay_throttled >= 15);

    // Closing the relay gives its place back.
    let _ = first.close().await;
    let _ = first_turn.close().await;
    eventually("the relay's place freed", CLEANUP, || async {
        server.metrics.snapshot().turn_allocations == 0
    })
    .await
    .expect("freed");
    let (third_turn, third) = allocate().await;
    let third = third.expect("a relay once one closed");
    let _ = third.close().await;
    let _ = third_turn.close().await;

    close_all(&[&client]).await;
    assert_all_clean(&server, "turn-caps").await;
    server.shutdown().await;
}

/// TURN over TLS (`turns:`) with the server's certificate: the URL is handed out with the
/// certificate's name, and a client that trusts the certificate allocates a relay over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tls_allocates_a_relay() {
    use std::sync::Arc;
    use switchboard::turn::StreamConn;
    use tokio::net::TcpStream;
    use webrtc_util::Conn;

    let _serial = serial().await;
    let dir = std::env::temp_dir().join(format!("switchboard-turns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, certified.cert.pem()).expect("write cert");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    let server = start_server_with(|c| {
        c.no_turn = false;
        c.turn_port = 0;
        c.turn_tls_port = 0;
        c.turn_tls_cert = Some(cert_path.clone());
        c.turn_tls_key = Some(key_path.clone());
        c.turn_tls_host = Some("localhost".into());
    })
    .await;
    let tls_addr = server.turn_tls_addr().expect("TURN over TLS runs");
    let client = join(&server, "turns", "t", ClientOptions::silent()).await;
    let ice = joined_ice_server(&client);
    let turns = format!("turns:localhost:{}?transport=tcp", tls_addr.port());
    assert!(ice.urls.contains(&turns), "{:?}", ice.urls);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("a root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(tls_addr).await.expect("connect");
    let local = tcp.local_addr().expect("addr");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("a name"),
            tcp,
        )
        .await
        .expect("a TLS handshake with the server's certificate");
    let turn = turn_client(
        tls_addr,
        ice.username.clone().expect("a username"),
        ice.credential.clone().expect("a password"),
        Arc::new(StreamConn::new(stream, local, tls_addr)),
    )
    .await;
    let relay = tokio::time::timeout(Duration::from_secs(10), turn.allocate())
        .await
        .expect("an answer")
        .expect("an allocation over TLS");
    assert!(relay.local_addr().is_ok());
    let _ = relay.close().await;
    let _ = turn.close().await;

    close_all(&[&client]).await;
    assert_all_clean(&server, "turns").await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ICE server `client` was given in `joined`.
fn joined_ice_server(client: &Client) -> switchboard::signal::protocol::IceServer {
    client
        .snapshot()
        .events
        .iter()
        .find_map(|e| match e {
            ServerMessage::Joined { ice_servers, .. } => ice_servers.first().cloned(),
            _ => None,
        })
        .expect("joined lists an ICE server")
}

/// A listening TURN client of the server at `server` over `conn` (UDP, TCP or TLS).
async fn turn_client(
    server: std::net::SocketAddr,
    username: String,
    password: String,
    conn: std::sync::Arc<dyn webrtc_util::Conn + Send + Sync>,
) -> turn::client::Client {
    let turn = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username,
        password,
        realm: "switchboard".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .expect("a TURN client");
    turn.listen().await.expect("listen");
    turn
}
