//! Webhooks, received by a real local HTTP server: every room, participant and track event
//! arrives in order, signed with HMAC-SHA256 over `timestamp.body` (checked here with the
//! receiver's own code), retried after the receiver fails once; a dead receiver does not hold
//! up a live one; a receiver that never answers fills only its own bounded queue.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use serde_json::Value;
use switchboard::auth::{Claims, Keys};
use switchboard::client::ClientOptions;

const SECRET: &str = "a-webhook-secret-for-tests";
const KEY: &str = "k1:an-api-secret-of-32-characters-at-least";

#[derive(Default)]
struct Received {
    /// Requests answered so far (the first gets a 500).
    requests: AtomicUsize,
    /// Verified event bodies accepted, in arrival order.
    events: Mutex<Vec<Value>>,
}

/// Checks a `Switchboard-Signature: t=…,v1=…` header as a receiver would.
fn verify(headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let header = headers
        .get("switchboard-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or("no signature header")?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_string()),
            _ => {}
        }
    }
    let (t, v1) = t.zip(v1).ok_or(format!("malformed signature {header}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(t) > 300 {
        return Err(format!("stale timestamp {t}"));
    }
    let tag: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signed = [format!("{t}.").as_bytes(), body].concat();
    ring::hmac::verify(&key, &signed, &tag).map_err(|_| "bad signature".to_string())
}

async fn receive(
    State(received): State<Arc<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if received.requests.fetch_add(1, Ordering::SeqCst) == 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if let Err(e) = verify(&headers, &body) {
        panic!("webhook fails verification: {e}");
    }
    let event: Value = serde_json::from_slice(&body).expect("a JSON body");
    received.events.lock().unwrap().push(event);
    StatusCode::NO_CONTENT
}

/// A webhook receiver on loopback.
async fn start_receiver() -> (SocketAddr, Arc<Received>) {
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/hooks", axum::routing::post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn token(identity: &str) -> ClientOptions {
    let keys = Keys::parse(&[KEY.to_string()]).unwrap();
    let claims = Claims::new("hooks", identity, Duration::from_secs(600));
    ClientOptions {
        token: Some(keys.mint(None, &claims).unwrap()),
        ..ClientOptions::default()
    }
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn room_participant_and_track_events_arrive_signed_in_order_after_a_retry() {
    let _serial = serial().await;
    let (addr, received) = start_receiver().await;
    let server = start_server_with(|c| {
        c.api_keys = vec![KEY.to_string()];
        c.webhook_urls = vec![
            format!("http://127.0.0.1:{}/dead", dead_port()),
            format!("http://{addr}/hooks"),
        ];
        c.webhook_secret = Some(SECRET.to_string());
    })
    .await;

    let ann = join(&server, "hooks", "Ann", token("user-ann")).await;
    let bob = join(&server, "hooks", "Bob", token("user-bob")).await;
    wait_all(
        &[&ann, &bob],
        "connected",
        Duration::from_secs(20),
        |_, s| s.all_connected(),
    )
    .await;
    let expected_published = 4;
    eventually("the tracks' webhooks", Duration::from_secs(20), || async {
        let events = received.events.lock().unwrap();
        kinds(&events)
            .iter()
            .filter(|k| *k == "track_published")
            .count()
            >= expected_published
    })
    .await
    .unwrap();
    close_all(&[&ann, &bob]).await;
    assert_all_clean(&server, "hooks").await;
    // Shutdown lets what is queued or in flight go out (the dead URL's retries are cut at 5 s).
    let retried = server.metrics.snapshot().webhooks_retried;
    server.shutdown().await;
    assert_eq!(
        kinds(&received.events.lock().unwrap())
            .last()
            .map(String::as_str),
        Some("room_finished"),
        "the last events were flushed at shutdown"
    );

    let events = received.events.lock().unwrap().clone();
    let kinds = kinds(&events);
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("room_started"),
        "{kinds:?}"
    );
    assert_eq!(count("room_started"), 1, "{kinds:?}");
    assert_eq!(count("participant_joined"), 2, "{kinds:?}");
    assert_eq!(count("track_published"), 4, "{kinds:?}");
    assert_eq!(count("track_unpublished"), 4, "{kinds:?}");
    assert_eq!(count("participant_left"), 2, "{kinds:?}");
    assert_eq!(count("room_finished"), 1, "{kinds:?}");
    // The first request failed and was retried: room_started still came, exactly once.
    assert_eq!(
        received.requests.load(Ordering::SeqCst),
        events.len() + 1,
        "one failed request and one per event"
    );
    assert!(retried >= 1);
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "every event has its own id");
    for event in &events {
        assert_eq!(event["room"], "hooks", "{event}");
    }
    let joined: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "participant_joined")
        .collect();
    assert_eq!(joined[0]["participant"]["identity"], "user-ann");
    assert_eq!(joined[0]["participant"]["name"], "Ann");
    assert_eq!(joined[1]["participant"]["identity"], "user-bob");
    let published = events
        .iter()
        .find(|e| e["event"] == "track_published")
        .unwrap();
    assert!(published["track"]["id"].is_string(), "{published}");
    assert!(published["participant"]["id"].is_string(), "{published}");
}

#[tokio::test]
async fn a_receiver_that_never_answers_fills_only_its_bounded_queue() {
    let _serial = serial().await;
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let server = start_server_with(|c| {
        c.webhook_urls = vec![format!("http://{silent_addr}/hooks")];
        c.webhook_secret = Some(SECRET.to_string());
        c.limits.webhook_queue = 2;
    })
    .await;
    // Each join and leave is an event (room started/finished, participant joined/left).
    for i in 0..4 {
        let opts = ClientOptions {
            publish_audio: false,
            publish_video: false,
            ..ClientOptions::default()
        };
        let client = join(&server, &format!("quiet-{i}"), "Q", opts).await;
        client.close().await;
    }
    eventually("events dropped", Duration::from_secs(10), || async {
        server.metrics.snapshot().webhooks_dropped > 0
    })
    .await
    .unwrap();
    // The server goes on: every call ends cleanly.
    for i in 0..4 {
        assert_all_clean(&server, &format!("quiet-{i}")).await;
    }
    assert_eq!(server.metrics.snapshot().webhooks_delivered, 0);
    server.shutdown().await;
    held.abort();
}
