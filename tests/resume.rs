//! Session resume (protocol 3) with an in-process server and synthetic clients on 127.0.0.1:
//! a signaling socket cut while media flows is taken up again on a new socket without anyone
//! seeing a leave; without a resume the participant is removed after the grace period; a token
//! works once.

mod common;

use std::time::Duration;

use common::{
    CLEANUP, assert_all_clean, close_all, eventually, join, serial, start_server_with, summary,
    wait_all, ws_url,
};
use futures_util::{SinkExt, StreamExt};
use switchboard::client::{Client, ClientOptions};
use switchboard::signal::protocol::{ErrorCode, MediaKind, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

const CONNECT: Duration = Duration::from_secs(20);
const MEDIA: Duration = Duration::from_secs(20);

fn intact_from(client: &Client, publisher: &str, kind: MediaKind) -> u64 {
    client.snapshot().intact_from(publisher, kind)
}

fn saw_leave(client: &Client, who: &str) -> bool {
    client.snapshot().events.iter().any(
        |e| matches!(e, ServerMessage::ParticipantLeft { participant_id } if participant_id == who),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_socket_is_resumed_and_nobody_sees_a_leave() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.limits.resume_grace_secs = 20).await;
    let a = join(&server, "resume", "a", ClientOptions::default()).await;
    let b = join(&server, "resume", "b", ClientOptions::default()).await;
    let (a_id, b_id) = (a.id().to_owned(), b.id().to_owned());
    wait_all(&[&a, &b], "connected", CONNECT, |_, s| s.all_connected()).await;
    wait_all(&[&a, &b], "media both ways", MEDIA, |me, s| {
        let other = if me.id() == a_id { &b_id } else { &a_id };
        s.intact_from(other, MediaKind::Video) >= 10 && s.intact_from(other, MediaKind::Audio) >= 10
    })
    .await;

    // b's socket is cut: its media keeps flowing both ways, and a sees nothing.
    b.drop_socket();
    eventually("the server notices the cut", CLEANUP, || async {
        server.metrics.snapshot().sessions_detached == 1
    })
    .await
    .expect("b's session waits for a resume");
    let (to_b, to_a) = (
        intact_from(&b, &a_id, MediaKind::Video),
        intact_from(&a, &b_id, MediaKind::Video),
    );
    // Meanwhile a publishes another track: b cannot hear of it until it resumes.
    a.publish_track(MediaKind::Video)
        .await
        .expect("a publishes a second video");
    eventually("media while detached", MEDIA, || async {
        intact_from(&b, &a_id, MediaKind::Video) >= to_b + 30
            && intact_from(&a, &b_id, MediaKind::Video) >= to_a + 30
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}\n{}",
            summary(&a.snapshot()),
            summary(&b.snapshot())
        )
    });
    assert!(!saw_leave(&a, &b_id), "a saw b leave");

    // b comes back on a new socket: same participant, the room as it is now, and the offer
    // for a's new track that went nowhere.
    b.resume(&ws_url(&server)).await.expect("b resumes");
    assert_eq!(server.metrics.snapshot().sessions_detached, 0);
    b.wait_for("resumed with a's three tracks", CLEANUP, |s| {
        s.events.iter().any(|e| matches!(
            e,
            ServerMessage::Resumed { participant_id, tracks, .. }
                if *participant_id == b_id && tracks.iter().filter(|t| t.participant_id == a_id).count() == 3
        )) && s.announced_tracks.len() == 3
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", b.snapshot().events));
    wait_all(&[&b], "a's second video", MEDIA, |_, s| {
        s.tracks_from(&a_id, MediaKind::Video)
            .filter(|t| t.intact >= 10)
            .count()
            == 2
    })
    .await;
    assert!(!saw_leave(&a, &b_id), "a saw b leave");
    assert_eq!(
        server
            .registry
            .room_snapshot("resume")
            .expect("the room")
            .participants
            .len(),
        2
    );

    // The token of the first join was used up; the new one works after another cut.
    b.drop_socket();
    b.resume(&ws_url(&server))
        .await
        .expect("b resumes a second time");
    let signaling = b.snapshot().events.len();
    b.send_message(&switchboard::signal::protocol::ClientMessage::Ping)
        .expect("ping");
    b.wait_for("pong on the resumed socket", CLEANUP, |s| {
        s.events.len() > signaling && matches!(s.events.last(), Some(ServerMessage::Pong))
    })
    .await
    .expect("the resumed socket carries the session");

    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "resume").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_resume_the_participant_is_removed_after_the_grace_period() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.limits.resume_grace_secs = 2).await;
    let a = join(&server, "grace", "a", ClientOptions::default()).await;
    let b = join(&server, "grace", "b", ClientOptions::default()).await;
    let b_id = b.id().to_owned();
    wait_all(&[&a, &b], "connected", CONNECT, |_, s| s.all_connected()).await;

    b.drop_socket();
    a.wait_for("b removed after the grace period", CLEANUP, |s| {
        !s.participants.contains_key(&b_id)
    })
    .await
    .expect("b is removed");
    let refused = b.resume(&ws_url(&server)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ResumeFailed")),
        "a resume after the grace period: {refused:?}"
    );
    eventually("b's connection freed", CLEANUP, || async {
        let m = server.metrics.snapshot();
        m.peer_connections == 1 && m.sessions_detached == 0 && m.participants == 1
    })
    .await
    .expect("everything of b is gone");

    close_all(&[&a, &b]).await;
    assert_all_clean(&server, "grace").await;
    server.shutdown().await;
}

/// Protocol edge cases on a raw socket: an unknown token is refused and the socket can still
/// `join`; `resume` while joined is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_an_unknown_token_or_while_joined_is_refused() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.limits.resume_grace_secs = 1).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&server))
        .await
        .expect("connect");
    send(&mut ws, r#"{"type":"resume","token":"nope"}"#)
        .await
        .expect("send");
    assert!(matches!(
        read(&mut ws).await,
        ServerMessage::Error {
            code: ErrorCode::ResumeFailed,
            ..
        }
    ));
    send(&mut ws, r#"{"type":"resume"}"#).await.expect("send");
    assert!(matches!(
        read(&mut ws).await,
        ServerMessage::Error {
            code: ErrorCode::MissingField,
            ..
        }
    ));
    send(
        &mut ws,
        r#"{"type":"join","room":"edge","name":"x","protocol":3}"#,
    )
    .await
    .expect("send");
    let ServerMessage::Joined { resume_token, .. } = read(&mut ws).await else {
        panic!("expected joined");
    };
    let token = resume_token.expect("protocol 3 gets a resume token");
    let again = format!(r#"{{"type":"resume","token":"{token}"}}"#);
    ws.send(Message::Text(again.into())).await.expect("send");
    assert!(matches!(
        read(&mut ws).await,
        ServerMessage::Error {
            code: ErrorCode::AlreadyJoined,
            ..
        }
    ));
    // A protocol-2 client gets no token.
    let (mut old, _) = tokio_tungstenite::connect_async(ws_url(&server))
        .await
        .expect("connect");
    send(
        &mut old,
        r#"{"type":"join","room":"edge","name":"y","protocol":2}"#,
    )
    .await
    .expect("send");
    let ServerMessage::Joined { resume_token, .. } = read(&mut old).await else {
        panic!("expected joined");
    };
    assert_eq!(resume_token, None);
    drop((ws, old));
    assert_all_clean(&server, "edge").await;
    server.shutdown().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Socket, text: &str) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::Text(text.to_owned().into())).await
}

async fn read(ws: &mut Socket) -> ServerMessage {
    loop {
        let frame = tokio::time::timeout(CLEANUP, ws.next())
            .await
            .expect("an answer")
            .expect("open socket")
            .expect("a frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(text.as_str()).expect("a server message");
        }
    }
}

/// Mute state goes through signaling (protocol 3): the others are told, a late joiner learns it
/// in `joined`, a resumed client in `resumed`, and a protocol-2 client is not sent the new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_state_is_signaled_to_the_others() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.limits.resume_grace_secs = 20).await;
    let a = join(&server, "mute", "a", ClientOptions::silent()).await;
    let b = join(&server, "mute", "b", ClientOptions::silent()).await;
    let a_id = a.id().to_owned();
    let set_muted =
        |kind, muted| switchboard::signal::protocol::ClientMessage::SetMuted { kind, muted };
    a.send_message(&set_muted(MediaKind::Audio, true))
        .expect("send");
    a.send_message(&set_muted(MediaKind::Audio, true))
        .expect("the same state again is not news");
    a.send_message(&set_muted(MediaKind::Video, true))
        .expect("send");
    let updates = |client: &Client| -> Vec<(bool, bool)> {
        client
            .snapshot()
            .events
            .iter()
            .filter_map(|e| match e {
                ServerMessage::ParticipantUpdated { participant } if participant.id == a_id => {
                    Some((participant.audio_muted, participant.video_muted))
                }
                _ => None,
            })
            .collect()
    };
    b.wait_for("a's mute state", CLEANUP, |_| {
        updates(&b) == [(true, false), (true, true)]
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", updates(&b)));

    // A late joiner is told in `joined`; a protocol-2 socket gets no `participant-updated`.
    let c = join(&server, "mute", "c", ClientOptions::silent()).await;
    let joined_state = c.snapshot().events.iter().find_map(|e| match e {
        ServerMessage::Joined { participants, .. } => participants
            .iter()
            .find(|p| p.id == a_id)
            .map(|p| (p.audio_muted, p.video_muted)),
        _ => None,
    });
    assert_eq!(joined_state, Some((true, true)));
    let (mut old, _) = tokio_tungstenite::connect_async(ws_url(&server))
        .await
        .expect("connect");
    send(
        &mut old,
        r#"{"type":"join","room":"mute","name":"old","protocol":2}"#,
    )
    .await
    .expect("send");
    assert!(matches!(read(&mut old).await, ServerMessage::Joined { .. }));
    a.send_message(&set_muted(MediaKind::Video, false))
        .expect("send");
    b.wait_for("a's camera back on", CLEANUP, |_| {
        updates(&b).last() == Some(&(true, false))
    })
    .await
    .expect("unmute is told");
    send(&mut old, r#"{"type":"ping"}"#).await.expect("send");
    assert!(
        matches!(read(&mut old).await, ServerMessage::Pong),
        "a protocol-2 client got something before its pong"
    );

    // After a cut and a resume, the room's mute state is in `resumed`.
    b.drop_socket();
    a.send_message(&set_muted(MediaKind::Audio, false))
        .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.resume(&ws_url(&server)).await.expect("b resumes");
    b.wait_for("resumed with a's state", CLEANUP, |s| {
        s.events.iter().any(|e| {
            matches!(e, ServerMessage::Resumed { participants, .. }
            if participants.iter().any(|p| p.id == a_id && !p.audio_muted && !p.video_muted))
        })
    })
    .await
    .expect("resumed carries mute state");

    drop(old);
    close_all(&[&a, &b, &c]).await;
    assert_all_clean(&server, "mute").await;
    server.shutdown().await;
}
