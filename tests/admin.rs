//! The admin API: its authorization (no token, a participant's token, a room admin's, a
//! server admin's), and what it does to live rooms: a data message reaches everyone, a removed
//! participant's session ends, a closed room empties and goes, a room opened ahead keeps its mode.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard::auth::{Claims, Keys};
use switchboard::client::{Client, ClientOptions};
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "ops:an-api-secret-of-32-characters-at-least";
const MEDIA: Duration = Duration::from_secs(20);

fn token(room: &str, admin: bool) -> String {
    let mut claims = Claims::new(room, "someone", Duration::from_secs(600));
    claims.room_admin = admin;
    Keys::parse(&[KEY.to_string()])
        .expect("key")
        .mint(None, &claims)
        .expect("mint")
}

/// One HTTP/1.1 request; the status and the JSON body (Null when empty or not JSON).
async fn call(
    server: &ServerHandle,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connects");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response[9..12].parse().expect("status");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_api_needs_an_admin_token_for_the_room() {
    let server = start_server_with(|c| c.api_keys = vec![KEY.to_string()]).await;
    for room in ["alpha", "beta"] {
        let (status, _) = call(
            &server,
            "POST",
            "/api/rooms",
            Some(&token("*", true)),
            Some(json!({"name": room})),
        )
        .await;
        assert_eq!(status, 201, "{room}");
    }
    assert_eq!(call(&server, "GET", "/api/rooms", None, None).await.0, 401);
    let participant = token("alpha", false);
    assert_eq!(
        call(&server, "GET", "/api/rooms", Some(&participant), None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/rooms",
            Some("forged.token.here"),
            None
        )
        .await
        .0,
        401
    );
    // A room admin sees and manages its room only.
    let alpha_admin = token("alpha", true);
    let (status, rooms) = call(&server, "GET", "/api/rooms", Some(&alpha_admin), None).await;
    assert_eq!(status, 200);
    assert_eq!(rooms.as_array().map(Vec::len), Some(1), "{rooms}");
    assert_eq!(rooms[0]["name"], "alpha");
    assert_eq!(
        call(&server, "GET", "/api/rooms/beta", Some(&alpha_admin), None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &server,
            "DELETE",
            "/api/rooms/beta",
            Some(&alpha_admin),
            None
        )
        .await
        .0,
        403
    );
    // The server admin sees both, and closes them.
    let (_, rooms) = call(&server, "GET", "/api/rooms", Some(&token("*", true)), None).await;
    assert_eq!(rooms.as_array().map(Vec::len), Some(2), "{rooms}");
    for room in ["alpha", "beta"] {
        let path = format!("/api/rooms/{room}");
        let (status, body) = call(&server, "DELETE", &path, Some(&token("*", true)), None).await;
        assert_eq!((status, body["removed"].clone()), (200, json!(0)));
        assert_eq!(
            call(&server, "GET", &path, Some(&token("*", true)), None)
                .await
                .0,
            404
        );
    }
    assert_eq!(server.metrics.snapshot().admin_unauthorized, 4);
}

#[tokio::test]
async fn admin_calls_act_on_live_rooms() {
    let _serial = serial().await;
    // Development mode: the API is open, as joins are.
    let server = start_server().await;
    let url = ws_url(&server);
    let opts = || ClientOptions::default();
    let ann = Client::connect(&url, "ops", "ann", opts())
        .await
        .expect("joins");
    let ben = Client::connect(&url, "ops", "ben", opts())
        .await
        .expect("joins");
    let both = [&ann, &ben];
    wait_all(&both, "connected", MEDIA, |_, s| s.all_connected()).await;
    // The server writes chat only once it has seen a participant's data channel open, which
    // comes after the client sees it; media flowing both ways is later still.
    wait_all(&both, "media from the other", MEDIA, |_, s| {
        s.remote_tracks.iter().filter(|t| t.intact > 10).count() == 2
    })
    .await;

    // Both joins are timed, and the media workers' turns.
    let text = server.metrics.render();
    assert!(text.contains("switchboard_join_seconds_count 2"), "{text}");
    assert!(
        !text.contains("switchboard_loop_turn_busy_seconds_count 0\n"),
        "{text}"
    );
    let (status, body) = call(
        &server,
        "POST",
        "/api/rooms/ops/data",
        None,
        Some(json!({"text": "maintenance at noon"})),
    )
    .await;
    assert_eq!(
        (status, body["delivered"].clone()),
        (200, json!(2)),
        "{body}"
    );
    wait_all(&both, "the server's message", MEDIA, |_, s| {
        s.chat
            .iter()
            .any(|m| m.from == "server" && m.text == "maintenance at noon")
    })
    .await;

    let path = format!("/api/rooms/ops/participants/{}", ben.id());
    assert_eq!(call(&server, "DELETE", &path, None, None).await.0, 204);
    wait_all(&[&ben], "removed", MEDIA, |_, s| {
        s.socket_closed && s.errors.iter().any(|(c, _)| *c == ErrorCode::Removed)
    })
    .await;
    wait_all(&[&ann], "ben gone", MEDIA, |_, s| s.participants.is_empty()).await;
    assert_eq!(call(&server, "DELETE", &path, None, None).await.0, 404);

    let (status, body) = call(&server, "DELETE", "/api/rooms/ops", None, None).await;
    assert_eq!((status, body["removed"].clone()), (200, json!(1)));
    wait_all(&[&ann], "removed", MEDIA, |_, s| s.socket_closed).await;
    close_all(&both).await;
    assert_all_clean(&server, "ops").await;

    // A room opened ahead keeps the mode it was opened with.
    let (status, body) = call(
        &server,
        "POST",
        "/api/rooms",
        None,
        Some(json!({"name": "town-hall", "mode": "mesh"})),
    )
    .await;
    assert_eq!((status, body["mode"].clone()), (201, json!("mesh")));
    let cal = Client::connect(&url, "town-hall", "cal", opts())
        .await
        .expect("joins");
    assert_eq!(cal.mode(), switchboard::signal::protocol::RoomMode::Mesh);
    cal.close().await;
    assert_all_clean(&server, "town-hall").await;
}

/// The microphone state `participant-updated` last gave for `who`.
fn audio_muted_of(s: &switchboard::client::ClientSnapshot, who: &str) -> Option<bool> {
    s.events.iter().rev().find_map(|e| match e {
        switchboard::signal::protocol::ServerMessage::ParticipantUpdated { participant }
            if participant.id == who =>
        {
            Some(participant.audio_muted)
        }
        _ => None,
    })
}

#[tokio::test]
async fn an_admin_mutes_and_unmutes_a_participants_track() {
    use switchboard::signal::protocol::ServerMessage;
    use switchboard::types::MediaKind;
    let _serial = serial().await;
    let server = start_server().await;
    let ann = join(&server, "hush", "ann", ClientOptions::default()).await;
    let ben = join(&server, "hush", "ben", ClientOptions::default()).await;
    let ann_id = ann.id().to_string();
    let audio_from_ann =
        |s: &switchboard::client::ClientSnapshot| s.intact_from(&ann_id, MediaKind::Audio);
    wait_all(&[&ben], "Ann's audio and video", MEDIA, |_, s| {
        audio_from_ann(s) > 20 && s.intact_from(ann.id(), MediaKind::Video) > 20
    })
    .await;
    let (_, room) = call(&server, "GET", "/api/rooms/hush", None, None).await;
    let track = room["tracks"]
        .as_array()
        .and_then(|tracks| {
            tracks
                .iter()
                .find(|t| t["participant_id"] == ann.id() && t["kind"] == "audio")
        })
        .and_then(|t| t["track_id"].as_str())
        .expect("Ann's audio track in the room")
        .to_string();
    let path = format!("/api/rooms/hush/tracks/{track}/mute");

    let (status, body) = call(&server, "POST", &path, None, Some(json!({"muted": true}))).await;
    assert_eq!(status, 200, "{body}");
    wait_all(&[&ann], "told it is muted", MEDIA, |_, s| {
        s.events.iter().any(|e| {
            matches!(e, ServerMessage::Muted { track_id, muted: true, kind: MediaKind::Audio } if *track_id == track)
        })
    })
    .await;
    wait_all(&[&ben], "Ann shown muted", MEDIA, |_, s| {
        audio_muted_of(s, ann.id()) == Some(true)
    })
    .await;
    // Ann's client keeps sending; the server forwards none of it, and still her video.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audio_before = audio_from_ann(&ben.snapshot());
    let video_before = ben.snapshot().intact_from(ann.id(), MediaKind::Video);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ben.snapshot();
    assert_eq!(
        audio_from_ann(&after),
        audio_before,
        "muted audio still forwarded"
    );
    assert!(after.intact_from(ann.id(), MediaKind::Video) > video_before + 5);
    assert!(server.metrics.snapshot().packets_muted > 20);

    let (status, _) = call(&server, "POST", &path, None, Some(json!({"muted": false}))).await;
    assert_eq!(status, 200);
    wait_all(&[&ben], "Ann's audio again", MEDIA, |_, s| {
        audio_from_ann(s) > audio_before + 20 && audio_muted_of(s, ann.id()) == Some(false)
    })
    .await;
    let unknown = call(
        &server,
        "POST",
        "/api/rooms/hush/tracks/t-none/mute",
        None,
        Some(json!({"muted": true})),
    )
    .await;
    assert_eq!(unknown.0, 404);

    close_all(&[&ann, &ben]).await;
    assert_all_clean(&server, "hush").await;
    server.shutdown().await;
}
