//! Abuse limits: sockets that never join, SFU participants whose media never connects, too
//! many sockets from one address or in total, foreign web origins, clients that send too fast,
//! and clients that never read. Each is refused or closed with its code, counted, and frees
//! everything it held; everyone else carries on.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::server::ServerHandle;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(server: &ServerHandle) -> Ws {
    tokio_tungstenite::connect_async(ws_url(server))
        .await
        .expect("websocket connects")
        .0
}

/// Connects from `local` (any 127.0.0.0/8 address), with the request's Origin set if given.
async fn connect_from(
    server: &ServerHandle,
    local: IpAddr,
    origin: Option<&str>,
) -> Result<WebSocketStream<TcpStream>, WsError> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    let stream = socket.connect(server.http_addr).await?;
    let mut request = ws_url(server).into_client_request()?;
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header value"));
    }
    Ok(tokio_tungstenite::client_async(request, stream).await?.0)
}

fn refused_status(result: Result<impl Sized, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("refused with {e}, not an HTTP status"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// Reads until the server closes; returns the close code and every text message before it.
async fn read_until_close(ws: &mut Ws, within: Duration) -> Result<(Option<u16>, Vec<Value>)> {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("the server did not close the socket in time")?;
        match next {
            Some(Ok(Message::Text(text))) => texts.push(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(frame))) => {
                return Ok((frame.map(|f| u16::from(f.code)), texts));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Ok((None, texts)),
        }
    }
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string()))
        .await
        .expect("send");
}

/// Reads until a message of `kind` arrives.
async fn expect(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap_or_else(|_| panic!("no `{kind}` within 10 s"));
        if let Some(Ok(Message::Text(text))) = next {
            let v: Value = serde_json::from_str(&text).expect("json");
            if v["type"] == kind {
                return v;
            }
        } else {
            panic!("socket ended waiting for `{kind}`: {next:?}");
        }
    }
}

#[tokio::test]
async fn a_socket_that_never_joins_is_closed() {
    let server = start_server_with(|c| c.limits.join_timeout_secs = 1).await;
    let mut idle = connect(&server).await;
    let (code, _) = read_until_close(&mut idle, Duration::from_secs(5))
        .await
        .expect("closed");
    assert_eq!(code, Some(u16::from(CloseCode::Policy)));
    // A socket that joins in time is not touched, and one that leaves starts the clock anew.
    let mut member = connect(&server).await;
    send(
        &mut member,
        json!({"type": "join", "room": "r", "name": "m", "mode": "mesh"}),
    )
    .await;
    expect(&mut member, "joined").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send(&mut member, json!({"type": "ping"})).await;
    expect(&mut member, "pong").await;
    send(&mut member, json!({"type": "leave"})).await;
    expect(&mut member, "left").await;
    let (code, _) = read_until_close(&mut member, Duration::from_secs(5))
        .await
        .expect("closed after leaving and idling");
    assert_eq!(code, Some(u16::from(CloseCode::Policy)));
    let m = server.metrics.snapshot();
    assert_eq!(m.sessions_join_timeout, 2);
    eventually("sessions to close", CLEANUP, || async {
        server.metrics.snapshot().sessions == 0
    })
    .await
    .expect("no sessions left");
}

/// Joins that never bring up media (no offer, no ICE) hold a peer connection each until the
/// media timeout removes them: bare joins cannot pile up.
#[tokio::test]
async fn bare_sfu_joins_without_media_are_removed() {
    let server = start_server_with(|c| c.limits.media_timeout_secs = 2).await;
    let mut bare = Vec::new();
    for i in 0..20 {
        let mut ws = connect(&server).await;
        send(
            &mut ws,
            json!({"type": "join", "room": "bare", "name": format!("b{i}"), "protocol": 3}),
        )
        .await;
        expect(&mut ws, "joined").await;
        bare.push(ws);
    }
    eventually("a peer connection each", CLEANUP, || async {
        server.metrics.snapshot().peer_connections == 20
    })
    .await
    .expect("20 peer connections");
    for ws in &mut bare {
        let (code, texts) = read_until_close(ws, Duration::from_secs(10))
            .await
            .expect("closed");
        assert_eq!(code, Some(u16::from(CloseCode::Policy)));
        assert!(
            texts
                .iter()
                .any(|t| t["type"] == "error" && t["code"] == "connection-failed"),
            "no error before the close: {texts:?}"
        );
    }
    eventually("everything to be freed", CLEANUP, || async {
        let m = server.metrics.snapshot();
        m.participants == 0 && m.peer_connections == 0 && m.rooms == 0 && m.sessions == 0
    })
    .await
    .expect("freed");
    assert_eq!(server.metrics.snapshot().sessions_media_timeout, 20);
}

#[tokio::test]
async fn connection_caps_refuse_extra_sockets() {
    let server = start_server_with(|c| {
        c.limits.max_connections = 4;
        c.limits.max_connections_per_ip = 3;
    })
    .await;
    let one: IpAddr = [127, 0, 0, 1].into();
    let two: IpAddr = [127, 0, 0, 2].into();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            connect_from(&server, one, None)
                .await
                .expect("under the caps"),
        );
    }
    assert_eq!(refused_status(connect_from(&server, one, None).await), 429);
    held.push(
        connect_from(&server, two, None)
            .await
            .expect("another address"),
    );
    assert_eq!(refused_status(connect_from(&server, two, None).await), 503);
    assert_eq!(server.metrics.snapshot().connections_refused, 2);
    // A socket that goes frees its place.
    drop(held.remove(0));
    let deadline = std::time::Instant::now() + CLEANUP;
    loop {
        match connect_from(&server, one, None).await {
            Ok(ws) => break held.push(ws),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not admitted again: {e}"),
        }
    }
}

#[tokio::test]
async fn origins_not_on_the_allow_list_are_refused() {
    let server = start_server_with(|c| {
        c.limits.allowed_origins = vec!["https://meet.example".into()];
    })
    .await;
    let local: IpAddr = [127, 0, 0, 1].into();
    let evil = connect_from(&server, local, Some("https://evil.example")).await;
    assert_eq!(refused_status(evil), 403);
    connect_from(&server, local, Some("https://meet.example"))
        .await
        .expect("an allowed origin");
    // Not a browser: no Origin to check.
    connect_from(&server, local, None).await.expect("no origin");
    assert_eq!(server.metrics.snapshot().connections_refused_origin, 1);
}

#[tokio::test]
async fn a_client_sending_too_fast_is_closed() {
    let server = start_server_with(|c| {
        c.limits.max_messages_per_sec = 5;
        c.limits.message_burst = 10;
    })
    .await;
    let mut ws = connect(&server).await;
    for _ in 0..30 {
        // The server may close before all are sent.
        let _ = ws.send(Message::text(r#"{"type":"ping"}"#)).await;
    }
    let (code, texts) = read_until_close(&mut ws, Duration::from_secs(5))
        .await
        .expect("closed");
    assert_eq!(code, Some(u16::from(CloseCode::Policy)));
    let pongs = texts.iter().filter(|t| t["type"] == "pong").count();
    assert!((10..=11).contains(&pongs), "{pongs} pongs before the close");
    assert_eq!(server.metrics.snapshot().sessions_rate_limited, 1);
}

/// A member that stops reading while another relays large messages to it: its socket is cut
/// once its queue is full, it leaves the room, and the sender never waits on it.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_and_the_room_goes_on() -> Result<()> {
    let server = start_server_with(|c| {
        c.limits.send_queue_messages = 8;
        c.limits.send_timeout_secs = 2;
        c.limits.max_messages_per_sec = 0;
    })
    .await;
    let join = |name: &str| json!({"type": "join", "room": "slow", "name": name, "mode": "mesh"});
    let mut sloth = connect(&server).await;
    send(&mut sloth, join("sloth")).await;
    let sloth_id = expect(&mut sloth, "joined").await["participant_id"].clone();
    let mut sender = connect(&server).await;
    send(&mut sender, join("sender")).await;
    expect(&mut sender, "joined").await;
    // 50 KB offers, relayed to a client that reads nothing: its TCP buffers fill, then its
    // queue. The sender's own pongs keep coming.
    let sdp = "a".repeat(50_000);
    let offer = json!({"type": "offer", "to": sloth_id, "sdp": sdp}).to_string();
    let start = std::time::Instant::now();
    let mut cut = false;
    for i in 0..2000 {
        sender.send(Message::text(offer.clone())).await?;
        if i % 20 == 0 {
            send(&mut sender, json!({"type": "ping"})).await;
            if tokio::time::timeout(Duration::from_secs(5), expect(&mut sender, "pong"))
                .await
                .is_err()
            {
                bail!("the sender waited on the slow reader");
            }
        }
        if server.metrics.snapshot().sessions_slow_reader > 0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "still not cut after {:?}", start.elapsed());
    // The slow member leaves the room, and the room goes on.
    eventually("the slow member to leave", CLEANUP, || async {
        server
            .registry
            .room_snapshot("slow")
            .is_some_and(|r| r.participants.len() == 1 && r.participants[0].name == "sender")
    })
    .await?;
    send(&mut sender, json!({"type": "ping"})).await;
    expect(&mut sender, "pong").await;
    drop(sloth);
    Ok(())
}

/// A client that reads, but sends many messages in one go: the server answers them all in a
/// burst that outruns its small outgoing queue before the writer has run. That is not a slow
/// reader; the client gets every answer and stays.
#[tokio::test]
async fn a_burst_of_answers_is_not_taken_for_a_slow_reader() -> Result<()> {
    let server = start_server_with(|c| {
        c.limits.send_queue_messages = 4;
        c.limits.max_messages_per_sec = 0;
    })
    .await;
    let mut client = connect(&server).await;
    send(
        &mut client,
        json!({"type": "join", "room": "burst", "name": "quick"}),
    )
    .await;
    expect(&mut client, "joined").await;
    const PINGS: usize = 200;
    for _ in 0..PINGS {
        client
            .feed(Message::text(json!({"type": "ping"}).to_string()))
            .await?;
    }
    client.flush().await?;
    for i in 0..PINGS {
        let next = tokio::time::timeout(Duration::from_secs(10), expect(&mut client, "pong"))
            .await
            .with_context(|| format!("pong {i} of {PINGS}"))?;
        assert_eq!(next["type"], "pong");
    }
    assert_eq!(server.metrics.snapshot().sessions_slow_reader, 0);
    Ok(())
}
