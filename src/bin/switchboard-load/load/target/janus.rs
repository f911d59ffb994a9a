//! Janus VideoRoom over Janus's HTTP API (the REST transport, `http://…/janus`), as janus.js
//! speaks it: every participant has its own Janus session with one plugin handle, kept alive
//! every 25 s; requests go as `{"janus":"message"}` POSTs, and the asynchronous answers
//! (`joined` with the SDP answer, `attached` with the subscriber offer) come through the
//! session's long poll, matched by transaction.
//!
//! A room of the run is a VideoRoom room created on first use (its number derived from the
//! room's name); its one publisher joins with `joinandconfigure` and an offer; subscribers join
//! with `streams: [{feed}]`, take Janus's offer and `start` with their answer. Leaving destroys
//! the participant's session, which hangs up its connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use switchboard::client::MediaProfile;
use tokio::task::JoinHandle;

use super::ExternalPublisher;
use crate::load::lite::publisher::PendingPublisher;
use crate::load::lite::{self, Engine, Hangup, OfferShape, Receiver, ReceiverShared};

const PLUGIN: &str = "janus.plugin.videoroom";
/// Janus ends sessions idle for 60 s (its default `session_timeout`).
const KEEPALIVE_PERIOD: Duration = Duration::from_secs(25);
/// How long a participant waits for the event that answers its request.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The run's client of one Janus server.
pub struct Janus {
    http: reqwest::Client,
    url: String,
    /// The run's rooms by name: the VideoRoom room number and its publisher's feed id.
    rooms: tokio::sync::Mutex<HashMap<String, Room>>,
    transactions: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Room {
    number: u64,
    feed: Option<u64>,
}

/// One participant's Janus session and its VideoRoom handle.
struct Session {
    http: reqwest::Client,
    /// `…/janus/<session>`.
    session_url: String,
    /// `…/janus/<session>/<handle>`.
    handle_url: String,
    keepalive: JoinHandle<()>,
}

impl Janus {
    pub fn new(http: reqwest::Client, url: String) -> Janus {
        Janus {
            http,
            url: url.trim_end_matches('/').to_owned(),
            rooms: Default::default(),
            transactions: AtomicU64::new(1),
        }
    }

    fn transaction(&self) -> String {
        format!("t{}", self.transactions.fetch_add(1, Ordering::Relaxed))
    }

    /// POSTs a request; Janus's reply (`success`, `ack`), or its `error` as an error.
    async fn post(&self, url: &str, mut body: Value) -> anyhow::Result<Value> {
        body["transaction"] = json!(self.transaction());
        post(&self.http, url, &body).await
    }

    /// A new session with a VideoRoom handle, kept alive until it is destroyed.
    async fn session(&self) -> anyhow::Result<Session> {
        let created = self.post(&self.url, json!({"janus": "create"})).await?;
        let session = created["data"]["id"]
            .as_u64()
            .context("create: no session id")?;
        let session_url = format!("{}/{session}", self.url);
        let attached = self
            .post(&session_url, json!({"janus": "attach", "plugin": PLUGIN}))
            .await?;
        let handle = attached["data"]["id"]
            .as_u64()
            .context("attach: no handle id")?;
        let keepalive = {
            let (http, url) = (self.http.clone(), session_url.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    tokio::time::sleep(KEEPALIVE_PERIOD).await;
                    n += 1;
                    let body = json!({"janus": "keepalive", "transaction": format!("k{n}")});
                    if let Err(e) = post(&http, &url, &body).await {
                        tracing::debug!("janus keepalive: {e:#}");
                    }
                }
            })
        };
        Ok(Session {
            http: self.http.clone(),
            handle_url: format!("{session_url}/{handle}"),
            session_url,
            keepalive,
        })
    }

    /// Sends a plugin request (with an SDP, if any) and waits for the event that answers it.
    async fn request(
        &self,
        session: &Session,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Value> {
        let transaction = self.transaction();
        let mut message = json!({"janus": "message", "body": body, "transaction": transaction});
        if let Some(jsep) = jsep {
            message["jsep"] = jsep;
        }
        let reply = post(&self.http, &session.handle_url, &message).await?;
        if reply["janus"] == "success" {
            return plugin_data(reply);
        }
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let poll = self
                .http
                .get(format!("{}?maxev=10", session.session_url))
                .send();
            let text = tokio::time::timeout_at(deadline, poll)
                .await
                .map_err(|_| anyhow!("no answer from Janus within {EVENT_TIMEOUT:?}"))??
                .text()
                .await?;
            let events: Value =
                serde_json::from_str(&text).context("a Janus event that is not JSON")?;
            let events = match events {
                Value::Array(events) => events,
                event => vec![event],
            };
            for event in events {
                if event["transaction"] == transaction.as_str() && event["janus"] == "event" {
                    return plugin_data(event);
                }
            }
        }
    }

    /// The room's number, created at Janus on first use.
    async fn room(&self, session: &Session, name: &str) -> anyhow::Result<Room> {
        let mut rooms = self.rooms.lock().await;
        if let Some(room) = rooms.get(name) {
            return Ok(*room);
        }
        // Room numbers from the name; Janus keeps them below 2^53 (JSON numbers).
        let number = u64::from(switchboard::client::payload::participant_hash(name)) + 1;
        let created = self
            .request(
                session,
                json!({
                    "request": "create",
                    "room": number,
                    "description": name,
                    "publishers": 16,
                    "audiocodec": "opus",
                    "videocodec": "vp8",
                    // No REMB cap from Janus, no periodic FIR: the same media as elsewhere.
                    "bitrate": 0,
                    "fir_freq": 0,
                    "notify_joining": false,
                }),
                None,
            )
            .await;
        match created {
            Ok(_) => {}
            // 427: the room exists (left from an earlier run with the same name).
            Err(e) if format!("{e:#}").contains("427") => {}
            Err(e) => return Err(e.context(format!("creating room {number}"))),
        }
        let room = Room { number, feed: None };
        rooms.insert(name.to_owned(), room);
        Ok(room)
    }

    /// Publishes into `room` as `name`: `joinandconfigure` with the offer.
    pub async fn publish(
        &self,
        room: &str,
        name: &str,
        profile: MediaProfile,
        audio: bool,
        video: bool,
    ) -> anyhow::Result<ExternalPublisher> {
        let session = self.session().await?;
        let number = self.room(&session, room).await?.number;
        let pending = PendingPublisher::offer(name, profile, audio, video).await?;
        let joined = self
            .request(
                &session,
                json!({
                    "request": "joinandconfigure",
                    "room": number,
                    "ptype": "publisher",
                    "display": name,
                    "audio": audio,
                    "video": video,
                }),
                Some(json!({"type": "offer", "sdp": pending.offer})),
            )
            .await?;
        let feed = joined["data"]["id"]
            .as_u64()
            .context("joined: no publisher id")?;
        let answer = joined["jsep"]["sdp"]
            .as_str()
            .context("joined: no SDP answer")?;
        let publisher = pending.accept_answer(&lite::loopback_candidates_only(answer))?;
        if let Some(room) = self.rooms.lock().await.get_mut(room) {
            room.feed = Some(feed);
        }
        Ok(ExternalPublisher::new(publisher, Box::new(session)))
    }

    /// Subscribes to `room`'s publisher on a lite receiver: `join` as a subscriber, Janus's
    /// offer answered, `start`.
    pub async fn subscribe(
        &self,
        engine: &Arc<Engine>,
        room: &str,
        name: &str,
    ) -> anyhow::Result<Receiver> {
        let Some(Room {
            number,
            feed: Some(feed),
        }) = self.rooms.lock().await.get(room).copied()
        else {
            bail!("room {room} has no publisher at Janus yet");
        };
        let session = self.session().await?;
        let attached = self
            .request(
                &session,
                json!({
                    "request": "join",
                    "room": number,
                    "ptype": "subscriber",
                    "streams": [{"feed": feed}],
                }),
                None,
            )
            .await?;
        let offer = attached["jsep"]["sdp"]
            .as_str()
            .context("attached: no SDP offer")?;
        let shared = Arc::new(ReceiverShared {
            sender_from_payload: true,
            ..Default::default()
        });
        let opened = engine.open(shared.clone(), OfferShape::None).await?;
        let answer = match engine
            .remote_offer(opened.id, lite::loopback_candidates_only(offer))
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                engine.close(opened.id).await;
                session.hangup().await;
                return Err(e);
            }
        };
        if let Err(e) = self
            .request(
                &session,
                json!({"request": "start"}),
                Some(json!({"type": "answer", "sdp": answer})),
            )
            .await
        {
            engine.close(opened.id).await;
            session.hangup().await;
            return Err(e);
        }
        Ok(Receiver::external(
            engine,
            opened.id,
            shared,
            name.to_owned(),
            Box::new(session),
        ))
    }

    /// Destroys the run's rooms at Janus.
    pub async fn destroy_rooms(&self) {
        let rooms: Vec<Room> = self.rooms.lock().await.drain().map(|(_, r)| r).collect();
        if rooms.is_empty() {
            return;
        }
        let Ok(session) = self.session().await else {
            return;
        };
        for room in rooms {
            let body = json!({"request": "destroy", "room": room.number});
            if let Err(e) = self.request(&session, body, None).await {
                tracing::debug!("destroying Janus room {}: {e:#}", room.number);
            }
        }
        session.hangup().await;
    }
}

#[async_trait::async_trait]
impl Hangup for Session {
    /// Destroys the session (Janus hangs up its connection and detaches its handle).
    async fn hangup(&self) -> bool {
        self.keepalive.abort();
        let body = json!({"janus": "destroy", "transaction": "bye"});
        post(&self.http, &self.session_url, &body).await.is_ok()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// One POST to Janus; its `error` replies become errors.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let text = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("POST {url}"))?
        .error_for_status()?
        .text()
        .await?;
    let reply: Value =
        serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON"))?;
    if reply["janus"] == "error" {
        bail!(
            "Janus error {}: {}",
            reply["error"]["code"],
            reply["error"]["reason"]
        );
    }
    Ok(reply)
}

/// A plugin reply's data (with its `jsep`, if any); a VideoRoom `error` becomes an error.
fn plugin_data(reply: Value) -> anyhow::Result<Value> {
    let data = &reply["plugindata"]["data"];
    if let Some(code) = data["error_code"].as_u64() {
        bail!("VideoRoom error {code}: {}", data["error"]);
    }
    Ok(json!({"data": data, "jsep": reply["jsep"]}))
}
