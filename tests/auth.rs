//! Access tokens: joins with missing, expired, forged, unknown-key and wrong-room tokens are
//! refused; a valid token's name and rights hold (receive-only, publish-only, no chat; no
//! restricted token in mesh rooms); `switchboard token` mints what the server accepts.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::auth::{Claims, Keys};
use switchboard::client::{Client, ClientOptions};
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::ErrorCode;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "k1:an-api-secret-of-32-characters-at-least";
const MEDIA: Duration = Duration::from_secs(20);

fn keys() -> Keys {
    Keys::parse(&[KEY.to_string()]).expect("key")
}

fn token(edit: impl FnOnce(&mut Claims)) -> String {
    let mut claims = Claims::new("team", "user-1", Duration::from_secs(600));
    edit(&mut claims);
    keys().mint(Some("k1"), &claims).expect("mint")
}

async fn server() -> ServerHandle {
    start_server_with(|c| c.api_keys = vec![KEY.to_string()]).await
}

/// The server's first answer to a `join` with `token`.
async fn answer_to_join(server: &ServerHandle, room: &str, token: Option<String>) -> Value {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(server))
        .await
        .expect("connects");
    let mut join = json!({"type": "join", "room": room, "name": "someone", "protocol": 3});
    if let Some(token) = token {
        join["token"] = token.into();
    }
    ws.send(Message::text(join.to_string()))
        .await
        .expect("send");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).expect("json");
        }
    }
}

fn with_token(token: String) -> ClientOptions {
    ClientOptions {
        token: Some(token),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn joins_without_a_valid_token_for_the_room_are_refused() {
    let _serial = serial().await;
    let server = server().await;
    let refused = |answer: &Value, why: &str| {
        assert_eq!(answer["type"], "error", "{why}: {answer}");
        assert_eq!(answer["code"], "unauthorized", "{why}: {answer}");
    };
    refused(&answer_to_join(&server, "team", None).await, "missing");
    let expired = token(|c| c.exp -= 3600);
    let answer = answer_to_join(&server, "team", Some(expired)).await;
    refused(&answer, "expired");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired"))
    );
    let other_key = Keys::parse(&["k1:a-different-secret-of-32-characters!".to_string()])
        .expect("key")
        .mint(
            Some("k1"),
            &Claims::new("team", "mallory", Duration::from_secs(600)),
        )
        .expect("mint");
    refused(
        &answer_to_join(&server, "team", Some(other_key)).await,
        "wrong key",
    );
    refused(
        &answer_to_join(&server, "team", Some("not-a-jwt".into())).await,
        "garbage",
    );
    refused(
        &answer_to_join(&server, "elsewhere", Some(token(|_| {}))).await,
        "wrong room",
    );
    assert_eq!(server.metrics.snapshot().joins_unauthorized, 5);
    // A valid one joins, under the token's name when it has one.
    let answer = answer_to_join(
        &server,
        "team",
        Some(token(|c| c.name = Some("Ada".into()))),
    )
    .await;
    assert_eq!(answer["type"], "joined", "{answer}");
    eventually("the member to show", CLEANUP, || async {
        server
            .registry
            .room_snapshot("team")
            .is_some_and(|r| r.participants.iter().any(|p| p.name == "Ada"))
    })
    .await
    .expect("Ada in the room");
}

#[tokio::test]
async fn rights_in_the_token_are_enforced() {
    let _serial = serial().await;
    let server = server().await;
    let url = ws_url(&server);
    let full = Client::connect(&url, "team", "full", with_token(token(|_| {})))
        .await
        .expect("full joins");
    // Receive-only: its tracks are refused, it receives the others'.
    let viewer = Client::connect(
        &url,
        "team",
        "viewer",
        with_token(token(|c| {
            c.sub = "viewer".into();
            c.can_publish = false;
        })),
    )
    .await
    .expect("viewer joins");
    // Publish-only, no chat: its tracks go out, it receives nothing, its chat is dropped.
    let speaker = Client::connect(
        &url,
        "team",
        "speaker",
        with_token(token(|c| {
            c.sub = "speaker".into();
            c.can_subscribe = false;
            c.can_publish_data = false;
        })),
    )
    .await
    .expect("speaker joins");
    let all = [&full, &viewer, &speaker];
    wait_all(&all, "connected", MEDIA, |_, s| s.all_connected()).await;
    wait_all(&[&viewer], "refused publishing", MEDIA, |_, s| {
        s.errors
            .iter()
            .any(|(code, _)| *code == ErrorCode::NotAllowed)
    })
    .await;
    // `full` gets audio and video from `speaker` only; `viewer` from both publishers.
    wait_all(&[&full], "the speaker's media", MEDIA, |_, s| {
        s.remote_tracks.iter().filter(|t| t.intact > 10).count() == 2
    })
    .await;
    wait_all(&[&viewer], "both publishers' media", MEDIA, |_, s| {
        s.remote_tracks.iter().filter(|t| t.intact > 10).count() == 4
    })
    .await;
    let full_snapshot = full.snapshot();
    assert!(
        full_snapshot
            .remote_tracks
            .iter()
            .all(|t| t.publisher_id == speaker.id()),
        "{}",
        summary(&full_snapshot)
    );
    let room = server.registry.room_snapshot("team").expect("room");
    assert!(room.tracks.iter().all(|t| t.participant_id != viewer.id()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        speaker.snapshot().remote_tracks.len(),
        0,
        "the speaker receives nothing"
    );
    // Chat: the speaker's line is dropped; the viewer's goes through.
    speaker.send_chat("from the speaker").await.expect("sent");
    viewer.send_chat("from the viewer").await.expect("sent");
    wait_all(&[&full], "the viewer's chat", MEDIA, |_, s| {
        !s.chat.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let chat = full.snapshot().chat;
    assert_eq!(chat.len(), 1, "{chat:?}");
    assert_eq!(chat[0].text, "from the viewer");
    close_all(&all).await;
    assert_all_clean(&server, "team").await;
}

#[tokio::test]
async fn a_restricted_token_cannot_join_a_mesh_room() {
    let _serial = serial().await;
    let server = server().await;
    let opts = |t| ClientOptions {
        token: Some(t),
        ..ClientOptions::default().mesh()
    };
    let _host = Client::connect(&ws_url(&server), "team", "host", opts(token(|_| {})))
        .await
        .expect("a full token joins the mesh room");
    let refused = Client::connect(
        &ws_url(&server),
        "team",
        "viewer",
        opts(token(|c| c.can_publish = false)),
    )
    .await;
    let e = refused.err().expect("refused");
    assert!(format!("{e:#}").contains("NotAllowed"), "{e:#}");
}

#[test]
fn the_token_command_mints_what_the_server_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "token",
            "--room",
            "team",
            "--identity",
            "u7",
            "--name",
            "Grace",
            "--ttl",
            "2h",
            "--no-publish",
        ])
        .env("SWITCHBOARD_API_KEYS", KEY)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let claims = keys().verify(token.trim()).expect("verifies");
    assert_eq!((claims.room.as_str(), claims.sub.as_str()), ("team", "u7"));
    assert_eq!(claims.name.as_deref(), Some("Grace"));
    assert!(!claims.can_publish && claims.can_subscribe && !claims.room_admin);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!((now + 7100..=now + 7300).contains(&claims.exp), "2 h");
    // Without a key it says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--room", "team", "--identity", "u7"])
        .env_remove("SWITCHBOARD_API_KEYS")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SWITCHBOARD_API_KEYS"));
}
